package layers

import (
	"context"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
)

// TestCheckFindsEachBrokenPiece breaks a composed root one piece at a time
// (a layer gone, a layer emptied, a layer's note changed, the upper and
// work directories gone, the record damaged) and asks Check and Repair:
// each break is one problem naming the piece, Repair and Compose make the
// root whole, and Check finds nothing again.
func TestCheckFindsEachBrokenPiece(t *testing.T) {
	requireRoot(t)
	s, base := newStore(t)
	ctx := context.Background()
	lower, upper := id("lower"), id("upper")
	layerFiles := map[digest.Digest]map[string]string{
		lower: {"etc/os-release": "lower", "usr/bin/tool": "tool"},
		upper: {"etc/os-release": "upper"},
	}
	unpack := func(l digest.Digest) {
		t.Helper()
		_, err := s.Unpack(ctx, l, func(dir string) ([]byte, error) {
			if _, err := fill(s.root, layerFiles[l])(dir); err != nil {
				return nil, err
			}
			if l == upper {
				return []byte("etc\n"), nil // a note, to be changed below
			}
			return nil, nil
		})
		if err != nil {
			t.Fatal(err)
		}
	}
	unpack(lower)
	unpack(upper)
	m := machine(base, "kube1")
	unmountAtEnd(t, s, m)
	img := Image{Source: "test", Platform: "linux/amd64", Manifest: id("m1"), Layers: []digest.Digest{lower, upper}}
	if _, err := s.Compose(ctx, m, img, quiet); err != nil {
		t.Fatal(err)
	}
	check := func() Health {
		t.Helper()
		h, err := s.Check(m)
		if err != nil {
			t.Fatalf("Check: %v", err)
		}
		return h
	}
	if h := check(); len(h.Problems) != 0 || !h.Mounted || h.Image == nil {
		t.Fatalf("a whole root: %+v, want no problems, mounted, the record", h)
	}
	// The machine writes to its root; a repair that does not concern the
	// upper directory keeps it.
	if err := os.WriteFile(filepath.Join(m.Target, "etc/machine-id"), []byte("abc\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	unmount := func() {
		t.Helper()
		if err := Unmount(ctx, s.root, m.Target, 10*time.Second, quiet); err != nil {
			t.Fatal(err)
		}
	}

	cases := []struct {
		name  string
		brk   func()
		part  string
		want  string // in the problem's detail
		lost  bool   // the machine's write is gone after the repair
		diff  digest.Digest
		unpak digest.Digest // the layer the repair leaves for the pull
	}{
		{"layer removed", func() { unmount(); must(t, os.RemoveAll(s.Path(lower))) }, "layer", "is missing from the layer store", false, lower, lower},
		{"layer a file", func() {
			unmount()
			must(t, os.RemoveAll(s.Path(lower)))
			must(t, os.WriteFile(s.Path(lower), nil, 0o644))
		}, "layer", "is not a directory", false, lower, lower},
		{"layer emptied", func() {
			es, _ := os.ReadDir(s.Path(lower))
			for _, e := range es {
				must(t, os.RemoveAll(filepath.Join(s.Path(lower), e.Name())))
			}
		}, "layer", "top-level entries changed (0 now, 2 when it was unpacked)", false, lower, lower},
		{"layer replaced", func() {
			unmount()
			must(t, os.RemoveAll(s.Path(upper)))
			must(t, os.MkdirAll(filepath.Join(s.Path(upper), "something-else"), 0o755))
		}, "layer", "top-level entries changed (1 now, 1 when", false, upper, upper},
		{"note changed", func() { must(t, os.WriteFile(filepath.Join(s.dir, "notes", upper.Encoded()), []byte("usr\n"), 0o600)) }, "layer", "lost or changed its note", false, upper, upper},
		{"note removed", func() { must(t, os.Remove(filepath.Join(s.dir, "notes", upper.Encoded()))) }, "layer", "lost or changed its note", false, upper, upper},
		{"upper removed", func() { unmount(); must(t, os.RemoveAll(filepath.Join(m.Dir, "upper"))) }, "upper", "upper directory of machine root", true, "", ""},
		{"upper a file", func() {
			unmount()
			must(t, os.RemoveAll(filepath.Join(m.Dir, "upper")))
			must(t, os.WriteFile(filepath.Join(m.Dir, "upper"), nil, 0o644))
		}, "upper", "is not a directory", true, "", ""},
		{"work removed", func() { unmount(); must(t, os.RemoveAll(filepath.Join(m.Dir, "work"))) }, "work", "work directory", false, "", ""},
		{"record damaged", func() { must(t, os.WriteFile(filepath.Join(m.Dir, RecordName), []byte("{"), 0o600)) }, "record", "unreadable", true, "", ""},
	}
	for _, c := range cases {
		// Each case starts from a whole root with the machine's write.
		if err := os.WriteFile(filepath.Join(m.Target, "etc/machine-id"), []byte("abc\n"), 0o644); err != nil {
			t.Fatal(err)
		}
		c.brk()
		h := check()
		if len(h.Problems) != 1 || h.Problems[0].Part != c.part || !strings.Contains(h.Problems[0].Detail, c.want) || h.Problems[0].DiffID != c.diff {
			t.Fatalf("%s: problems %+v, want one %s problem with %q for %q", c.name, h.Problems, c.part, c.want, c.diff)
		}
		if c.diff != "" && h.Problems[0].Path != s.Path(c.diff) {
			t.Errorf("%s: the problem names %s, want the layer's path %s", c.name, h.Problems[0].Path, s.Path(c.diff))
		}
		if h.LostUpper != (c.part == "upper") {
			t.Errorf("%s: LostUpper %v", c.name, h.LostUpper)
		}
		if err := s.Repair(ctx, m, h, quiet); err != nil {
			t.Fatalf("%s: Repair: %v", c.name, err)
		}
		if mounted, err := overlayMountedAt(s.root, m.Target); err != nil || mounted {
			t.Errorf("%s: after Repair the root is mounted: %v %v", c.name, mounted, err)
		}
		if c.unpak != "" {
			if have, _ := s.Has(c.unpak); have {
				t.Fatalf("%s: Repair left the broken layer in the store", c.name)
			}
			unpack(c.unpak) // what the pull does
		}
		if _, err := s.Compose(ctx, m, img, quiet); err != nil {
			t.Fatalf("%s: Compose after Repair: %v", c.name, err)
		}
		if h := check(); len(h.Problems) != 0 || !h.Mounted {
			t.Fatalf("%s: after Repair and Compose: %+v, want a whole mounted root", c.name, h)
		}
		b, err := os.ReadFile(filepath.Join(m.Target, "etc/machine-id"))
		if kept := err == nil && string(b) == "abc\n"; kept == c.lost {
			t.Errorf("%s: the machine's write after the repair: %q %v (lost expected: %v)", c.name, b, err, c.lost)
		}
		if b, err := os.ReadFile(filepath.Join(m.Target, "usr/bin/tool")); err != nil || string(b) != "tool" {
			t.Errorf("%s: the lower layer's file after the repair: %q %v", c.name, b, err)
		}
	}

	// Not mounted is a fact, not a problem.
	unmount()
	if h := check(); len(h.Problems) != 0 || h.Mounted {
		t.Fatalf("unmounted: %+v, want no problems, not mounted", h)
	}
}

// TestCheckTakesLayersWithoutStampAsTheyAre: a layer unpacked by a version
// that wrote no stamp is checked for being there, and nothing more.
func TestCheckTakesLayersWithoutStampAsTheyAre(t *testing.T) {
	s, base := newStore(t)
	ctx := context.Background()
	a := id("a")
	if _, err := s.Unpack(ctx, a, fill(s.root, map[string]string{"f": "a"})); err != nil {
		t.Fatal(err)
	}
	if got := names(t, filepath.Join(s.dir, "stamps")); !slices.Equal(got, []string{a.Encoded()}) {
		t.Fatalf("stamps %v, want a's", got)
	}
	must(t, os.Remove(filepath.Join(s.dir, "stamps", a.Encoded())))
	must(t, os.WriteFile(filepath.Join(s.Path(a), "added-later"), nil, 0o644))
	m := machine(base, "old")
	must(t, os.MkdirAll(filepath.Join(m.Dir, "upper"), 0o755))
	must(t, os.MkdirAll(filepath.Join(m.Dir, "work"), 0o755))
	must(t, os.WriteFile(filepath.Join(m.Dir, RecordName), []byte(`{"layers":["`+a.String()+`"]}`), 0o600))
	h, err := s.Check(m)
	if err != nil || len(h.Problems) != 0 || h.Mounted {
		t.Fatalf("Check: %+v %v, want no problems, not mounted", h, err)
	}
	// A stamp whose layer never got its name goes with Sweep, like a note.
	orphan := id("orphan")
	must(t, os.WriteFile(filepath.Join(s.dir, "stamps", orphan.Encoded()), []byte("x"), 0o600))
	must(t, s.Sweep(quiet))
	if _, err := os.Stat(filepath.Join(s.dir, "stamps", orphan.Encoded())); !os.IsNotExist(err) {
		t.Fatalf("Sweep kept a stamp without its layer: %v", err)
	}
	// Collect takes the stamp with the layer.
	must(t, s.writeStamp(a, s.Path(a), nil))
	if _, err := s.Collect(nil, quiet); err != nil {
		t.Fatal(err)
	}
	if got := names(t, filepath.Join(s.dir, "stamps")); len(got) != 0 {
		t.Fatalf("stamps after Collect: %v", got)
	}
}

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}
