package oci

import (
	"archive/tar"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"

	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"golang.org/x/sys/unix"

	"github.com/nodespawn/nodespawn/internal/confine/confinetest"
	"github.com/nodespawn/nodespawn/internal/layers"
	"github.com/nodespawn/nodespawn/internal/registrytest"
	"github.com/nodespawn/nodespawn/internal/rootfs/rootfstest"
)

// equivShape is one image shape for TestStoresAgree: its layers, bottom
// first, and what both stores must make of it.
type equivShape struct {
	name   string
	layers [][]entry
	// refused, when set, is said by both stores' refusals; storeOnly by
	// the layer store's alone, the flattened pull applying the image (the
	// store cannot show it: StoreError, for machine.rootfs.store: flat).
	refused, storeOnly string
}

// equivBase is a small distribution tree: the lower layer the shapes
// change.
func equivBase() []entry {
	caps := file("usr/bin/ping", "ping", 0o755)
	caps.hdr.PAXRecords = map[string]string{"SCHILY.xattr.user.k": "v", "SCHILY.xattr.security.capability": "\x01\x00\x00\x02\x00\x20\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00"}
	dx := dir("dx", 0o755)
	dx.hdr.PAXRecords = map[string]string{"SCHILY.xattr.user.dir": "yes"}
	return []entry{
		dir("etc", 0o755), file("etc/passwd", "root:x:0:0::/root:/bin/sh\n", 0o644),
		dir("usr", 0o755), dir("usr/bin", 0o755), file("usr/bin/sh", "sh", 0o755), hardlink("usr/bin/sh2", "usr/bin/sh", 0o755), caps,
		symlink("bin", "usr/bin"),
		dir("tmp", 0o1777), dir("root", 0o700),
		dir("home", 0o755), owned(dir("home/u", 0o750), 1000, 1000), owned(file("home/u/f", "mine", 0o600), 1000, 1001),
		dir("some", 0o755), dir("some/dir", 0o755), file("some/dir/keep", "keep", 0o644),
		symlink("x", "/some/dir"), symlink("rx", "some/dir"), file("xf", "a file", 0o644),
		dir("d", 0o755), file("d/a", "a", 0o644), file("d/b", "b", 0o644), dir("d/sub", 0o755), file("d/sub/c", "c", 0o644),
		dir("o", 0o755), file("o/a", "a", 0o644), dir("o/in", 0o755), file("o/in/b", "b", 0o644),
		dir("dev", 0o755), {hdr: tar.Header{Name: "dev/null", Typeflag: tar.TypeChar, Mode: 0o666, Devmajor: 1, Devminor: 3}},
		{hdr: tar.Header{Name: "dev/loop7", Typeflag: tar.TypeBlock, Mode: 0o660, Gid: 6, Devmajor: 7, Devminor: 7}},
		{hdr: tar.Header{Name: "dev/initctl", Typeflag: tar.TypeFifo, Mode: 0o600}},
		dx, file("dx/f", "f", 0o644),
	}
}

func equivShapes() []equivShape {
	base := equivBase()
	on := func(upper ...[]entry) [][]entry { return append([][]entry{base}, upper...) }
	l := func(es ...entry) []entry { return es }
	a := l(dir("etc", 0o755), file("etc/a", "from a", 0o644))
	b := l(dir("etc", 0o755), file("etc/a", "from b", 0o600), file("etc/b", "b", 0o644))
	deep := func(n int) [][]entry {
		ls := [][]entry{base}
		for i := 1; i < n; i++ {
			es := l(dir("deep", 0o755), file(fmt.Sprintf("deep/%03d", i), fmt.Sprint(i), 0o644), file("deep/last", fmt.Sprint(i), 0o644))
			if i%3 == 0 {
				es = append(es, whiteout(fmt.Sprintf("deep/.wh.%03d", i-1)))
			}
			ls = append(ls, es)
		}
		return ls
	}
	const belowSymlink, belowFile = "made a symlink, and has no directory entry of its own for /bin", "made a file, and has no directory entry of its own for /xf"
	return []equivShape{
		{name: "one layer", layers: on()},
		// Entry order.
		{name: "x/file before x/ over a lower symlink", layers: on(l(file("x/file", "in x", 0o644), dir("x", 0o750)))},
		{name: "x/ before x/file over a lower symlink", layers: on(l(dir("x", 0o750), file("x/file", "in x", 0o644)))},
		{name: "deep entries before their dirs over a relative symlink", layers: on(l(file("rx/sub/f", "f", 0o644), dir("rx/sub", 0o711), dir("rx", 0o755)))},
		{name: "file before its dir over a lower file", layers: on(l(file("xf/file", "in xf", 0o644), dir("xf", 0o755)))},
		{name: "file before its new dir", layers: on(l(file("n/f", "f", 0o644), owned(dir("n", 0o700), 5, 5)))},
		{name: "dirs after their contents", layers: on(l(file("p/q/r/f", "f", 0o644), dir("p/q/r", 0o711), dir("p/q", 0o701), dir("p", 0o750)))},
		{name: "hard link waiting for its dir to an entry waiting too", layers: on(l(file("x/f", "f", 0o644), hardlink("x/g", "x/f", 0o644), dir("x", 0o755)))},
		{name: "hard link to an entry waiting for its dir", layers: on(l(file("x/f", "f", 0o644), hardlink("g", "x/f", 0o644), dir("x", 0o755)))},
		{name: "entries below a lower symlink, no dir entry", layers: on(l(file("bin/tool", "through", 0o755))), refused: belowSymlink},
		{name: "entries below a lower file, no dir entry", layers: on(l(file("xf/file", "in xf", 0o644))), refused: belowFile},
		{name: "no dir entry over a lower dir alike", layers: on(l(file("etc/new", "n", 0o644), file("usr/bin/new", "n", 0o755)))},
		{name: "no dir entry over a lower sticky dir", layers: on(l(file("tmp/new", "n", 0o644))), storeOnly: "has /tmp as a directory with mode 1777"},
		{name: "no dir entry over a lower dir of another owner", layers: on(l(file("home/u/new", "n", 0o644))), storeOnly: "owner 1000:1000"},
		{name: "no dir entry over a lower dir with xattrs", layers: on(l(file("dx/new", "n", 0o644))), storeOnly: "xattr user.dir"},
		// Whiteouts.
		{name: "whiteout a file", layers: on(l(dir("d", 0o755), whiteout("d/.wh.a")))},
		{name: "whiteout a dir", layers: on(l(whiteout(".wh.d")))},
		{name: "opaque dir", layers: on(l(dir("o", 0o755), whiteout("o/.wh..wh..opq"), file("o/new", "n", 0o644)))},
		{name: "opaque dir after its own entries", layers: on(l(dir("o", 0o755), file("o/new", "n", 0o644), dir("o/in", 0o755), file("o/in/own", "own", 0o644), whiteout("o/.wh..wh..opq")))},
		{name: "opaque root after own entries with no dir entries", layers: on(l(file("q/r/f", "f", 0o644), file("etc/own", "own", 0o644), whiteout(".wh..wh..opq")))},
		{name: "opaque root", layers: on(l(whiteout(".wh..wh..opq"), dir("etc", 0o755), file("etc/only", "only", 0o644)), l(dir("etc", 0o755), file("etc/more", "more", 0o644)))},
		{name: "whiteout then re-add in one layer", layers: on(l(dir("d", 0o755), whiteout("d/.wh.a"), file("d/a", "again", 0o600)))},
		{name: "re-add then whiteout in one layer", layers: on(l(dir("d", 0o755), file("d/a", "again", 0o600), whiteout("d/.wh.a")))},
		{name: "whiteout a symlink after entries below it, no dir entry", layers: on(l(file("x/f", "f", 0o644), whiteout(".wh.x"))),
			refused: "made a symlink, and has no directory entry of its own for /x"},
		{name: "whiteout a symlink before entries below it, no dir entry", layers: on(l(whiteout(".wh.x"), file("x/f", "f", 0o644)))},
		{name: "entries below a sticky dir, then its whiteout, no dir entry", layers: on(l(file("tmp/new", "n", 0o644), whiteout(".wh.tmp"))), storeOnly: "has /tmp as a directory with mode 1777"},
		{name: "whiteout a sticky dir, then entries below it, no dir entry", layers: on(l(whiteout(".wh.tmp"), file("tmp/new", "n", 0o644)))},
		{name: "whiteout a dir, then re-add it in one layer", layers: on(l(whiteout(".wh.d"), dir("d", 0o700), file("d/new", "n", 0o644)))},
		{name: "whiteout a dir, then entries below it, no dir entry", layers: on(l(whiteout(".wh.d"), file("d/sub/new", "n", 0o644)))},
		{name: "whiteout a symlink, a dir in its place", layers: on(l(whiteout(".wh.x"), dir("x", 0o755), file("x/f", "f", 0o644)))},
		{name: "whiteout one name of a hard-link pair", layers: on(l(dir("usr", 0o755), dir("usr/bin", 0o755), whiteout("usr/bin/.wh.sh2")))},
		// Hard links.
		{name: "hard link to a lower file", layers: on(l(dir("usr", 0o755), dir("usr/bin", 0o755), hardlink("usr/bin/sh3", "usr/bin/sh", 0o755))),
			refused: "which this layer has not unpacked before the link"},
		{name: "hard links within the layer", layers: on(l(dir("n", 0o755), file("n/f", "f", 0o4755), hardlink("n/g", "n/f", 0o4755), hardlink("n/h", "n/f", 0o4755)))},
		// Replacements.
		{name: "symlink replaced by a file", layers: on(l(file("x", "now a file", 0o644)))},
		{name: "dir replaced by a symlink", layers: on(l(symlink("d", "etc")))},
		{name: "dir replaced by a file", layers: on(l(file("d", "now a file", 0o644)))},
		{name: "file replaced by a dir", layers: on(l(dir("xf", 0o700), file("xf/in", "in", 0o644)))},
		{name: "device replaced", layers: on(l(dir("dev", 0o755), entry{hdr: tar.Header{Name: "dev/null", Typeflag: tar.TypeChar, Mode: 0o600, Devmajor: 1, Devminor: 5}}))},
		// Layers repeated, empty, many.
		{name: "same layer twice, not adjacent", layers: on(a, b, a)},
		{name: "empty layer once", layers: on(nil, a)},
		{name: "only an empty layer", layers: [][]entry{nil}},
		{name: "the empty layer many times", layers: [][]entry{nil, base, nil, a, nil, nil}},
		{name: "60 layers", layers: deep(60)},
		{name: "128 layers", layers: deep(128)},
	}
}

// TestStoresAgree builds each image shape, pulls it flattened (Pull) and
// into the layer store (PullLayers, Compose: an overlayfs mount), and
// compares the two trees entry by entry (rootfstest.DiffTrees). A shape
// one store refuses the other refuses alike, or (storeOnly) the layer
// store refuses it with a StoreError naming store: flat. It logs the
// table of shapes and outcomes.
func TestStoresAgree(t *testing.T) {
	requireRoot(t)
	ctx := context.Background()
	reg := registrytest.Start(t)
	repo := pushRepo(t, reg.Addr, "nodespawn/equiv")
	// Not t.TempDir: overlayfs options cannot carry the commas of test
	// names, and 128 layers' paths must stay short.
	base, err := os.MkdirTemp("", "equiv-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(base) })
	store, err := layers.Open(confinetest.HostRoot(t), filepath.Join(base, "l"))
	if err != nil {
		t.Fatal(err)
	}
	var table []string
	for i, c := range equivShapes() {
		t.Run(c.name, func(t *testing.T) {
			var ls []layer
			for _, es := range c.layers {
				ls = append(ls, compressLayer(t, ocispec.MediaTypeImageLayerGzip, mkTar(t, es...)))
			}
			tag := fmt.Sprintf("s%d", i)
			pushImage(t, ctx, repo, tag, imageSpec{platform: linuxAMD64, layers: ls})
			req := Request{Reference: reg.Addr + "/nodespawn/equiv:" + tag, Platform: "linux/amd64", PlainHTTP: []string{reg.Addr}, Log: testLogger(t)}

			flatDir := filepath.Join(base, "f", tag)
			if err := os.MkdirAll(flatDir, 0o700); err != nil {
				t.Fatal(err)
			}
			fr := req
			fr.Root, fr.Dest = confinetest.HostRoot(t), filepath.Join(flatDir, "root")
			_, flatErr := Pull(ctx, fr)
			if flatErr != nil {
				rootfstest.AssertOnly(t, flatDir) // a refusal leaves nothing behind
			}

			res, storeErr := PullLayers(ctx, req, store)
			var merged string
			if storeErr == nil {
				m := layers.Machine{Target: filepath.Join(base, "m", tag), Dir: filepath.Join(base, "s", tag), Unit: filepath.Join(base, "u", tag+".mount"), Machine: tag}
				t.Cleanup(func() {
					if err := layers.Unmount(context.Background(), store.Root(), m.Target, 0, testLogger(t)); err != nil {
						t.Errorf("cleanup: %v", err)
					}
				})
				_, storeErr = store.Compose(ctx, m, layers.Image{Source: res.Reference, Platform: "linux/amd64", Manifest: res.ManifestDigest, Layers: res.DiffIDs}, testLogger(t))
				merged = m.Target
			}
			t.Logf("flat: %v", flatErr)
			t.Logf("layers: %v", storeErr)

			outcome := ""
			switch {
			case c.refused != "":
				for what, err := range map[string]error{"flattened pull": flatErr, "layer store": storeErr} {
					if err == nil || !strings.Contains(err.Error(), c.refused) {
						t.Errorf("%s: %v, want a refusal saying %q", what, err, c.refused)
					}
				}
				outcome = "refused by both: " + c.refused
			case c.storeOnly != "":
				var se *StoreError
				if flatErr != nil {
					t.Errorf("flattened pull: %v", flatErr)
				}
				if !errors.As(storeErr, &se) || !strings.Contains(storeErr.Error(), c.storeOnly) || !strings.Contains(storeErr.Error(), "store: flat") {
					t.Errorf("layer store: %v, want a StoreError saying %q and naming store: flat", storeErr, c.storeOnly)
				}
				outcome = "flat applies; layer store refuses (StoreError: " + c.storeOnly + ")"
			case flatErr != nil || storeErr != nil:
				t.Errorf("want both stores to apply the image: flat %v, layers %v", flatErr, storeErr)
			default:
				if diff := rootfstest.DiffTrees(rootfstest.Tree(t, fr.Dest), rootfstest.Tree(t, merged)); diff != "" {
					t.Errorf("the trees differ (flat <> layer store):\n%s", diff)
					outcome = "DIFFERS"
				} else {
					outcome = "identical"
				}
			}
			if t.Failed() && outcome != "DIFFERS" {
				outcome = "FAILED: " + outcome
			}
			table = append(table, fmt.Sprintf("| %s | %d | %s |", c.name, len(c.layers), outcome))
		})
	}
	t.Logf("shape | layers | outcome\n%s", strings.Join(table, "\n"))
}

// TestTreeDiffSeesChanges keeps TestStoresAgree honest: the comparison
// must notice each kind of difference.
func TestTreeDiffSeesChanges(t *testing.T) {
	requireRoot(t)
	mk := func(r string) {
		for _, d := range []string{"d", "e"} {
			if err := os.Mkdir(filepath.Join(r, d), 0o755); err != nil {
				t.Fatal(err)
			}
		}
		for _, f := range []string{"d/f", "d/g", "e/h"} {
			if err := os.WriteFile(filepath.Join(r, f), []byte("body"), 0o644); err != nil {
				t.Fatal(err)
			}
		}
		if err := os.Symlink("d", filepath.Join(r, "l")); err != nil {
			t.Fatal(err)
		}
		if err := unix.Mknod(filepath.Join(r, "null"), unix.S_IFCHR|0o666, int(unix.Mkdev(1, 3))); err != nil {
			t.Fatal(err)
		}
	}
	// Every non-directory gets one mtime, so that only the change differs.
	settle := func(r string) {
		filepath.WalkDir(r, func(p string, d fs.DirEntry, err error) error {
			if err == nil && !d.IsDir() {
				ts := []unix.Timespec{{Sec: 1700000000}, {Sec: 1700000000}}
				err = unix.UtimesNanoAt(unix.AT_FDCWD, p, ts, unix.AT_SYMLINK_NOFOLLOW)
			}
			return err
		})
	}
	for _, change := range []struct {
		name string
		do   func(r string) error
	}{
		{"content", func(r string) error { return os.WriteFile(r+"/d/f", []byte("BODY"), 0o644) }},
		{"mode", func(r string) error { return os.Chmod(r+"/d/f", 0o4755) }},
		{"dir mode", func(r string) error { return os.Chmod(r+"/d", 0o1777) }},
		{"owner", func(r string) error { return os.Lchown(r+"/d/f", 1, 1) }},
		{"dir owner", func(r string) error { return os.Lchown(r+"/e", 1, 1) }},
		{"symlink target", func(r string) error { os.Remove(r + "/l"); return os.Symlink("e", r+"/l") }},
		{"type", func(r string) error { os.Remove(r + "/l"); return os.Mkdir(r+"/l", 0o777) }},
		{"missing", func(r string) error { return os.Remove(r + "/e/h") }},
		{"extra", func(r string) error { return os.WriteFile(r+"/e/i", nil, 0o644) }},
		{"hard link", func(r string) error { os.Remove(r + "/d/g"); return os.Link(r+"/d/f", r+"/d/g") }},
		{"xattr", func(r string) error { return unix.Lsetxattr(r+"/d/f", "user.k", []byte("v"), 0) }},
		{"dir xattr", func(r string) error { return unix.Lsetxattr(r+"/e", "user.k", []byte("v"), 0) }},
		{"device number", func(r string) error {
			os.Remove(r + "/null")
			return unix.Mknod(r+"/null", unix.S_IFCHR|0o666, int(unix.Mkdev(1, 5)))
		}},
	} {
		t.Run(change.name, func(t *testing.T) {
			a, b := t.TempDir(), t.TempDir()
			mk(a)
			mk(b)
			settle(a)
			settle(b)
			if d := rootfstest.DiffTrees(rootfstest.Tree(t, a), rootfstest.Tree(t, b)); d != "" {
				t.Fatalf("identical trees differ:\n%s", d)
			}
			if err := change.do(b); err != nil {
				t.Fatal(err)
			}
			settle(b)
			if rootfstest.DiffTrees(rootfstest.Tree(t, a), rootfstest.Tree(t, b)) == "" {
				t.Error("the comparison missed the change")
			}
		})
	}
	t.Run("mtime", func(t *testing.T) {
		a, b := t.TempDir(), t.TempDir()
		mk(a)
		mk(b)
		settle(a)
		if rootfstest.DiffTrees(rootfstest.Tree(t, a), rootfstest.Tree(t, b)) == "" {
			t.Error("the comparison missed a file's mtime")
		}
	})
}
