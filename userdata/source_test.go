package userdata

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestSourceMapsLines: ReadSource says where in the user-data file the
// manifest's lines are when they are there as written (a literal block,
// a plain MIME part, the file itself), and that they are not when encoded.
func TestSourceMapsLines(t *testing.T) {
	for _, c := range []struct {
		file   string
		where  string
		mapped bool
	}{
		{"manifest.yaml", "", true},
		{"cloud-config-plain.yaml", "write_files[1]", true},
		{"multipart.txt", "part2", true},
		{"cloud-config-b64.yaml", "write_files[0]", false},
		{"cloud-config-gzb64.yaml", "write_files[0]", false},
		{"multipart-base64.txt", "part2", false},
	} {
		t.Run(c.file, func(t *testing.T) {
			p := filepath.Join("testdata", c.file)
			src, err := ReadSource(context.Background(), p, Options{})
			if err != nil {
				t.Fatal(err)
			}
			if src.File != p || src.Where != c.where || src.Mapped != c.mapped {
				t.Fatalf("file %q where %q mapped %t; want %q %q %t", src.File, src.Where, src.Mapped, p, c.where, c.mapped)
			}
			if !c.mapped {
				return
			}
			// Every line of the manifest is that line of the file, indented.
			outer, _ := os.ReadFile(p)
			lines := strings.Split(string(outer), "\n")
			for i, l := range strings.Split(strings.TrimRight(string(src.Data), "\n"), "\n") {
				got := lines[i+src.LineOffset]
				if strings.TrimSpace(l) == "" && strings.TrimSpace(got) == "" {
					continue
				}
				if got != strings.Repeat(" ", src.Indent)+l {
					t.Fatalf("manifest line %d %q is file line %d %q (offset %d, indent %d)", i+1, l, i+1+src.LineOffset, got, src.LineOffset, src.Indent)
				}
			}
		})
	}
}

// TestLocateRefusesWhatIsNotThere: a folded block (its lines joined), an
// ambiguous place (the same text twice) and an absent text are not mapped.
func TestLocateRefusesWhatIsNotThere(t *testing.T) {
	for name, c := range map[string]struct{ outer, inner string }{
		"folded": {"a: >\n  one\n  two\n", "one two\n"},
		"twice":  {"a: |\n  x: 1\nb: |\n  x: 1\n", "x: 1\n"},
		"absent": {"a: b\n", "c: d\n"},
	} {
		if off, ind, ok := locate([]byte(c.outer), []byte(c.inner)); ok {
			t.Errorf("%s: mapped at offset %d indent %d", name, off, ind)
		}
	}
	if off, ind, ok := locate([]byte("a: |\n  x: 1\n\n  y: 2\nb: c\n"), []byte("x: 1\n\ny: 2\n")); !ok || off != 1 || ind != 2 {
		t.Errorf("a literal block with a blank line: %d %d %t, want 1 2 true", off, ind, ok)
	}
}
