package userdata

import (
	"bytes"
	"strings"
)

// Source is a manifest as it was found, and where in the file the user
// gave (or the source read) it lies, so that errors in it can name lines
// of that file: a manifest inside #cloud-config user-data is reported at
// the user-data's lines, not at lines of the embedded text.
type Source struct {
	// Name says where the manifest was found, for logs: the file, with a
	// suffix for where inside user-data (#part2, #write_files[0]).
	Name string
	Data []byte
	// File is the file (or source) the manifest was read from; Where is
	// where inside it ("write_files[0]", "part2", "part1#write_files[0]"),
	// "" when File is the manifest itself.
	File, Where string
	// Mapped says the manifest's text is in File as it is, each line
	// indented alike (a literal block scalar, a plain MIME part): line L,
	// column C of the manifest is File's line L+LineOffset, column
	// C+Indent. It is false when the manifest is encoded there (base64,
	// gzip) or folded: no line of File holds it.
	Mapped             bool
	LineOffset, Indent int
}

// extractSource is Extract, saying where in data the manifest lies.
func extractSource(name string, data []byte) (Source, error) {
	n, d, err := Extract(name, data)
	if err != nil {
		return Source{}, err
	}
	src := Source{Name: n, Data: d, File: name, Where: strings.TrimPrefix(strings.TrimPrefix(n, name), "#")}
	src.LineOffset, src.Indent, src.Mapped = locate(bytes.TrimPrefix(data, utf8BOM), d)
	return src, nil
}

// locate finds inner's lines in outer, each indented by the same number of
// spaces (blank lines may lack them, as in a YAML block scalar): it
// returns the number of outer lines before the first, and the indent,
// when there is exactly one such place.
func locate(outer, inner []byte) (lineOffset, indent int, ok bool) {
	in := splitLines(bytes.TrimPrefix(inner, utf8BOM))
	for len(in) > 0 && strings.TrimSpace(in[len(in)-1]) == "" {
		in = in[:len(in)-1]
	}
	if len(in) == 0 {
		return 0, 0, false
	}
	out := splitLines(outer)
	found := 0
	for j := 0; j+len(in) <= len(out); j++ {
		pre, ok := strings.CutSuffix(out[j], in[0])
		if !ok || strings.Trim(pre, " ") != "" || (in[0] == "" && pre != "") {
			continue
		}
		if !sameIndented(out[j:j+len(in)], in, pre) {
			continue
		}
		if found++; found > 1 {
			return 0, 0, false
		}
		lineOffset, indent = j, len(pre)
	}
	return lineOffset, indent, found == 1
}

// sameIndented reports whether each of out is pre followed by the same
// line of in (a blank line of in may be blank in out).
func sameIndented(out, in []string, pre string) bool {
	for i := range in {
		if out[i] == pre+in[i] || (strings.TrimSpace(in[i]) == "" && strings.TrimSpace(out[i]) == "") {
			continue
		}
		return false
	}
	return true
}

func splitLines(b []byte) []string {
	lines := strings.Split(string(b), "\n")
	for i, l := range lines {
		lines[i] = strings.TrimSuffix(l, "\r")
	}
	return lines
}
