package oci

import (
	"archive/tar"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"

	"github.com/nodespawn/nodespawn/internal/confine/confinetest"
	"github.com/nodespawn/nodespawn/internal/rootfs/rootfstest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

// outcome is what a hostile image must do.
type outcome int

const (
	// mustFail: the pull fails and nothing is renamed into place.
	mustFail outcome = iota
	// confined: the pull may fail or succeed; either way nothing outside
	// the rootfs changes.
	confined
)

// hostileCase is one hostile image: its layers (each a list of tar entries)
// are built knowing the sentinel directory's absolute path, which sits
// beside the machines directory: from the staging root, "../../sentinel".
type hostileCase struct {
	name    string
	layers  func(sentinel string) [][]entry
	outcome outcome
	// check, when set, runs on the rootfs after a successful pull.
	check func(t *testing.T, root, sentinel string)
}

func one(es ...entry) [][]entry { return [][]entry{es} }

func hostileCases() []hostileCase {
	const rel = "../../sentinel"
	chr := func(name string) entry {
		return entry{hdr: tar.Header{Name: name, Typeflag: tar.TypeChar, Mode: 0o666, Devmajor: 1, Devminor: 3}}
	}
	fifo := func(name string) entry {
		return entry{hdr: tar.Header{Name: name, Typeflag: tar.TypeFifo, Mode: 0o666}}
	}
	return []hostileCase{
		{name: "dotdot name", outcome: mustFail, layers: func(s string) [][]entry {
			return one(file(rel+"/pwned", "x", 0o644))
		}},
		{name: "dotdot deep in name", outcome: mustFail, layers: func(s string) [][]entry {
			return one(file("a/b/../../../../sentinel/pwned", "x", 0o644))
		}},
		{name: "dotdot directory", outcome: mustFail, layers: func(s string) [][]entry {
			return one(dir(rel+"/newdir", 0o777))
		}},
		{name: "absolute name", outcome: confined, layers: func(s string) [][]entry {
			return one(file(s+"/pwned", "x", 0o644))
		}, check: func(t *testing.T, root, s string) {
			if _, err := os.Stat(filepath.Join(root, s, "pwned")); err != nil {
				t.Errorf("absolute name not confined under the root: %v", err)
			}
		}},
		{name: "absolute symlink then write through it", outcome: confined, layers: func(s string) [][]entry {
			return one(symlink("esc", s), file("esc/pwned", "x", 0o644))
		}},
		{name: "relative symlink then write through it", outcome: confined, layers: func(s string) [][]entry {
			return one(symlink("esc", rel), file("esc/pwned", "x", 0o644))
		}},
		{name: "deep relative symlink", outcome: confined, layers: func(s string) [][]entry {
			return one(dir("a/b", 0o755), symlink("a/b/esc", "../../../../../sentinel"), file("a/b/esc/pwned", "x", 0o644))
		}},
		{name: "symlink chain out", outcome: confined, layers: func(s string) [][]entry {
			return one(symlink("l1", "l2"), symlink("l2", s), file("l1/pwned", "x", 0o644))
		}},
		{name: "symlink to / then write", outcome: confined, layers: func(s string) [][]entry {
			return one(symlink("r", "/"), file("r"+s+"/pwned", "x", 0o644))
		}},
		{name: "symlink loop", outcome: mustFail, layers: func(s string) [][]entry {
			return one(symlink("loop1", "loop2"), symlink("loop2", "loop1"), file("loop1/x", "x", 0o644))
		}},
		{name: "self symlink", outcome: mustFail, layers: func(s string) [][]entry {
			return one(symlink("self", "self"), file("self/x", "x", 0o644))
		}},
		{name: "symlink in one layer, write through it in the next", outcome: confined, layers: func(s string) [][]entry {
			return [][]entry{{symlink("etc", s)}, {file("etc/pwned", "x", 0o644), file("etc/file", "overwritten", 0o644)}}
		}},
		{name: "regular file over an escaping symlink", outcome: confined, layers: func(s string) [][]entry {
			return one(symlink("victim", s+"/file"), file("victim", "pwned", 0o644))
		}, check: func(t *testing.T, root, s string) {
			if fi, err := os.Lstat(filepath.Join(root, "victim")); err != nil || !fi.Mode().IsRegular() {
				t.Errorf("victim should now be a regular file in the root: %v %v", fi, err)
			}
		}},
		{name: "hardlink to absolute outside path", outcome: confined, layers: func(s string) [][]entry {
			return one(hardlink("hl", s+"/file", 0o777))
		}},
		{name: "hardlink with dotdot target", outcome: mustFail, layers: func(s string) [][]entry {
			return one(hardlink("hl", rel+"/file", 0o777))
		}},
		{name: "hardlink through a symlinked parent", outcome: confined, layers: func(s string) [][]entry {
			return one(symlink("d", s), hardlink("hl", "d/file", 0o777))
		}},
		{name: "hardlink to a symlink pointing out, then chmod and write it", outcome: confined, layers: func(s string) [][]entry {
			return [][]entry{{symlink("s", s+"/file"), hardlink("hl", "s", 0o4777)}, {file("hl", "pwned", 0o644), file("s", "pwned", 0o644)}}
		}},
		{name: "hardlink to a directory", outcome: mustFail, layers: func(s string) [][]entry {
			return one(dir("etc", 0o755), hardlink("hl", "etc", 0o755))
		}},
		{name: "whiteout with dotdot", outcome: mustFail, layers: func(s string) [][]entry {
			return one(whiteout("../.wh.sentinel"))
		}},
		{name: "whiteout through an escaping symlink", outcome: confined, layers: func(s string) [][]entry {
			return [][]entry{{symlink("d", s)}, {whiteout("d/.wh.file"), whiteout("d/.wh.dir")}}
		}},
		{name: "whiteout with an absolute name", outcome: confined, layers: func(s string) [][]entry {
			return one(whiteout(s + "/.wh.file"))
		}},
		{name: "opaque whiteout at the root", outcome: confined, layers: func(s string) [][]entry {
			return [][]entry{{file("old", "o", 0o644)}, {whiteout(".wh..wh..opq"), file("new", "n", 0o644)}}
		}, check: func(t *testing.T, root, s string) {
			if _, err := os.Lstat(filepath.Join(root, "old")); err == nil {
				t.Error("opaque whiteout at the root kept the lower layer's file")
			}
		}},
		{name: "opaque whiteout through an escaping symlink", outcome: confined, layers: func(s string) [][]entry {
			return [][]entry{{symlink("d", rel)}, {whiteout("d/.wh..wh..opq")}}
		}},
		{name: "duplicate entries", outcome: confined, layers: func(s string) [][]entry {
			return one(file("dup", "one", 0o644), dir("dup", 0o755), file("dup", "two", 0o600), symlink("dup2", s), file("dup2", "three", 0o644))
		}, check: func(t *testing.T, root, s string) {
			if b, err := os.ReadFile(filepath.Join(root, "dup")); err != nil || string(b) != "two" {
				t.Errorf("dup = %q (%v), want the last entry's content", b, err)
			}
		}},
		{name: "name component too long", outcome: mustFail, layers: func(s string) [][]entry {
			return one(file(strings.Repeat("n", 300), "x", 0o644))
		}},
		{name: "path longer than PATH_MAX", outcome: mustFail, layers: func(s string) [][]entry {
			return one(file(strings.Repeat("d/", 2100)+"x", "x", 0o644))
		}},
		{name: "huge PAX header", outcome: mustFail, layers: func(s string) [][]entry {
			return one(entry{raw: rawPAX("comment", strings.Repeat("p", 2<<20))}, file("f", "x", 0o644))
		}},
		{name: "device node over an escaping symlink", outcome: confined, layers: func(s string) [][]entry {
			return [][]entry{{symlink("null", s+"/file")}, {chr("null")}}
		}},
		{name: "fifo over a symlink to an outside directory", outcome: confined, layers: func(s string) [][]entry {
			return one(symlink("p", s), fifo("p"))
		}},
		{name: "directory entry over an escaping symlink", outcome: confined, layers: func(s string) [][]entry {
			return one(symlink("d", s), owned(dir("d", 0o777), 4242, 4242), owned(dir("d/", 0o777), 4242, 4242))
		}},
		{name: "directory replaced by an escaping symlink (deferred mtimes)", outcome: confined, layers: func(s string) [][]entry {
			return one(dir("x", 0o755), symlink("x", s))
		}},
		{name: "trusted xattr", outcome: confined, layers: func(s string) [][]entry {
			e := file("f", "x", 0o644)
			e.hdr.PAXRecords = map[string]string{"SCHILY.xattr.trusted.overlay.opaque": "y"}
			return one(e)
		}},
		{name: "root entry with odd mode and owner", outcome: confined, layers: func(s string) [][]entry {
			return one(owned(dir("./", 0o777), 4242, 4242), owned(dir(".", 0o700), 4242, 4242), file("f", "x", 0o644))
		}, check: func(t *testing.T, root, s string) {
			var st syscall.Stat_t
			if err := syscall.Stat(root, &st); err != nil || st.Mode&0o7777 != 0o755 || st.Uid != 0 {
				t.Errorf("root mode %o uid %d (%v), want 0755 root", st.Mode&0o7777, st.Uid, err)
			}
		}},
	}
}

// TestHostileLayers pulls each hostile image from a local layout and checks
// that the sentinel tree beside the machines directory is byte-for-byte,
// mode-for-mode unchanged, and that a failure leaves nothing behind.
func TestHostileLayers(t *testing.T) {
	requireRoot(t)
	cases := hostileCases()
	if len(cases) < 20 {
		t.Fatalf("corpus has %d cases, want at least 20", len(cases))
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			ctx := context.Background()
			base := t.TempDir()
			sentinel := filepath.Join(base, "sentinel")
			makeSentinel(t, sentinel)
			machines := filepath.Join(base, "machines")
			if err := os.Mkdir(machines, 0o700); err != nil {
				t.Fatal(err)
			}
			var layers []layer
			for _, es := range c.layers(sentinel) {
				layers = append(layers, compressLayer(t, ocispec.MediaTypeImageLayerGzip, mkTar(t, es...)))
			}
			layoutDir := filepath.Join(base, "layout")
			pushImage(t, ctx, layoutStore(t, layoutDir), "hostile", imageSpec{platform: linuxAMD64, layers: layers})
			outside := snapshot(t, base, "machines")

			dest := filepath.Join(machines, "m")
			_, err := Pull(ctx, Request{Layout: layoutDir, LayoutRef: "hostile", Platform: "linux/amd64", Root: confinetest.HostRoot(t), Dest: dest, Log: testLogger(t)})
			if msg := fmt.Sprint(err); len(msg) > 600 {
				t.Logf("pull: %s...", msg[:600])
			} else {
				t.Logf("pull: %s", msg)
			}

			if diff := diffSnapshots(outside, snapshot(t, base, "machines")); diff != "" {
				t.Errorf("the pull changed things outside the rootfs:\n%s", diff)
			}
			switch {
			case err != nil:
				rootfstest.AssertOnly(t, machines)
			case c.outcome == mustFail:
				t.Errorf("pull succeeded, want it to fail closed")
			default:
				rootfstest.AssertOnly(t, machines, ".m.nodespawn-image", "m")
				if c.check != nil {
					c.check(t, dest, sentinel)
				}
			}
		})
	}
}

// makeSentinel builds the tree a hostile layer would like to change.
func makeSentinel(t *testing.T, s string) {
	t.Helper()
	for _, d := range []string{s, s + "/dir"} {
		if err := os.Mkdir(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	for p, body := range map[string]string{"file": "precious", "dir/inner": "inner"} {
		if err := os.WriteFile(filepath.Join(s, p), []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
	}
}

// snapshot records type, mode, owner, size, mtime, link target and content
// hash of everything under root but the skipped top-level name.
func snapshot(t *testing.T, root, skip string) map[string]string {
	t.Helper()
	snap := map[string]string{}
	err := filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(root, p)
		if rel == skip {
			return filepath.SkipDir
		}
		var st syscall.Stat_t
		if err := syscall.Lstat(p, &st); err != nil {
			return err
		}
		desc := fmt.Sprintf("mode=%o uid=%d gid=%d size=%d mtime=%d.%d", st.Mode, st.Uid, st.Gid, st.Size, st.Mtim.Sec, st.Mtim.Nsec)
		switch {
		case d.Type()&fs.ModeSymlink != 0:
			target, _ := os.Readlink(p)
			desc += " -> " + target
		case d.Type().IsRegular():
			b, err := os.ReadFile(p)
			if err != nil {
				return err
			}
			sum := sha256.Sum256(b)
			desc += " sha256=" + hex.EncodeToString(sum[:8])
		}
		if rel != "." {
			snap[rel] = desc
		}
		return nil
	})
	if err != nil {
		t.Fatalf("snapshot %s: %v", root, err)
	}
	return snap
}

func diffSnapshots(before, after map[string]string) string {
	var out []string
	for p, b := range before {
		if a, ok := after[p]; !ok {
			out = append(out, "removed "+p)
		} else if a != b {
			out = append(out, fmt.Sprintf("changed %s: %s => %s", p, b, a))
		}
	}
	for p := range after {
		if _, ok := before[p]; !ok {
			out = append(out, "added "+p)
		}
	}
	slices.Sort(out)
	return strings.Join(out, "\n")
}

// TestSnapshotSeesChanges keeps TestHostileLayers honest: the snapshot
// must notice each kind of change an escape would make.
func TestSnapshotSeesChanges(t *testing.T) {
	for _, change := range []struct {
		name string
		do   func(s string) error
	}{
		{"content", func(s string) error { return os.WriteFile(s+"/file", []byte("PWNED..."), 0o644) }},
		{"mode", func(s string) error { return os.Chmod(s+"/file", 0o4777) }},
		{"owner", func(s string) error { return os.Lchown(s+"/file", 1, 1) }},
		{"new file", func(s string) error { return os.WriteFile(s+"/dir/new", nil, 0o644) }},
		{"removed", func(s string) error { return os.Remove(s + "/dir/inner") }},
		{"replaced by symlink", func(s string) error { os.Remove(s + "/file"); return os.Symlink("/", s+"/file") }},
	} {
		t.Run(change.name, func(t *testing.T) {
			base := t.TempDir()
			makeSentinel(t, base+"/sentinel")
			before := snapshot(t, base, "machines")
			if err := change.do(base + "/sentinel"); err != nil {
				t.Fatal(err)
			}
			if diffSnapshots(before, snapshot(t, base, "machines")) == "" {
				t.Error("snapshot missed the change")
			}
		})
	}
}
