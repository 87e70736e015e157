package imagebuild

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"context"
	"encoding/json"
	"errors"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nodespawn/nodespawn/internal/registrytest"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"golang.org/x/sys/unix"
	"oras.land/oras-go/v2"
	"oras.land/oras-go/v2/content"
)

// makeTree builds a small rootfs with every kind of entry the builder must keep.
func makeTree(t *testing.T) string {
	t.Helper()
	root := t.TempDir()
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	must(os.MkdirAll(filepath.Join(root, "etc/systemd"), 0o755))
	must(os.MkdirAll(filepath.Join(root, "usr/bin"), 0o755))
	must(os.MkdirAll(filepath.Join(root, "tmp"), 0o755))
	must(os.Chmod(filepath.Join(root, "tmp"), os.ModeSticky|0o777))
	must(os.MkdirAll(filepath.Join(root, "dev"), 0o755))
	must(os.WriteFile(filepath.Join(root, "etc/hostname"), []byte("node\n"), 0o644))
	must(os.WriteFile(filepath.Join(root, "etc/shadow"), []byte("root:*:1::::::\n"), 0o640))
	must(os.Chown(filepath.Join(root, "etc/shadow"), 0, 42))
	must(os.WriteFile(filepath.Join(root, "usr/bin/su"), bytes.Repeat([]byte{0x7f}, 5000), 0o755))
	must(os.Chmod(filepath.Join(root, "usr/bin/su"), os.ModeSetuid|0o755))
	must(os.Link(filepath.Join(root, "usr/bin/su"), filepath.Join(root, "usr/bin/su-hardlink")))
	must(os.Symlink("usr/bin", filepath.Join(root, "bin")))
	must(os.WriteFile(filepath.Join(root, "usr/bin/ping"), []byte("ping"), 0o755))
	must(os.Chown(filepath.Join(root, "usr/bin/ping"), 1000, 1001))
	must(unix.Mkfifo(filepath.Join(root, "dev/initctl"), 0o600))
	if err := unix.Lsetxattr(filepath.Join(root, "usr/bin/ping"), "user.nodespawn", []byte("cap"), 0); err != nil {
		t.Fatalf("set xattr (the test tree's file system must support user xattrs): %v", err)
	}
	must(unix.Mknod(filepath.Join(root, "dev/null"), unix.S_IFCHR|0o666, int(unix.Mkdev(1, 3))))
	must(os.Chmod(filepath.Join(root, "dev/null"), 0o666)) // mknod applies the umask
	return root
}

func build(t *testing.T, root string) (Result, string) {
	t.Helper()
	dir := t.TempDir()
	dst, err := Layout(dir)
	if err != nil {
		t.Fatal(err)
	}
	res, err := Build(context.Background(), root, dst, "v1", Options{Platform: "linux/amd64", Created: time.Unix(0, 0), Cmd: []string{"/sbin/init"}})
	if err != nil {
		t.Fatal(err)
	}
	return res, dir
}

func TestBuildIsReproducible(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: the test tree has a device node and files owned by other users")
	}
	tests := []struct {
		name   string
		change func(t *testing.T, root string)
		same   bool
	}{
		{"same tree again", func(*testing.T, string) {}, true},
		{"new mtimes", func(t *testing.T, root string) {
			ts := time.Now().Add(time.Hour)
			if err := os.Chtimes(filepath.Join(root, "etc/hostname"), ts, ts); err != nil {
				t.Fatal(err)
			}
		}, true},
		{"changed contents", func(t *testing.T, root string) {
			if err := os.WriteFile(filepath.Join(root, "etc/hostname"), []byte("other\n"), 0o644); err != nil {
				t.Fatal(err)
			}
		}, false},
		{"changed owner", func(t *testing.T, root string) {
			if err := os.Lchown(filepath.Join(root, "etc/hostname"), 7, 7); err != nil {
				t.Fatal(err)
			}
		}, false},
		{"changed mode", func(t *testing.T, root string) {
			if err := os.Chmod(filepath.Join(root, "etc/hostname"), 0o600); err != nil {
				t.Fatal(err)
			}
		}, false},
		{"changed xattr", func(t *testing.T, root string) {
			if err := unix.Lsetxattr(filepath.Join(root, "usr/bin/ping"), "user.nodespawn", []byte("other"), 0); err != nil {
				t.Fatal(err)
			}
		}, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			root := makeTree(t)
			first, _ := build(t, root)
			tt.change(t, root)
			second, _ := build(t, root)
			if got := first.Manifest.Digest == second.Manifest.Digest; got != tt.same {
				t.Errorf("same manifest digest = %v, want %v (%s, %s)", got, tt.same, first.Manifest.Digest, second.Manifest.Digest)
			}
			if got := first.Layer.Digest == second.Layer.Digest; got != tt.same {
				t.Errorf("same layer digest = %v, want %v", got, tt.same)
			}
		})
	}
}

func TestLayerEntries(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: the test tree has a device node and files owned by other users")
	}
	root := makeTree(t)
	res, dir := build(t, root)

	store, err := Layout(dir)
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	desc, err := store.Resolve(ctx, "v1")
	if err != nil {
		t.Fatal(err)
	}
	if desc.Digest != res.Manifest.Digest {
		t.Fatalf("tag v1 resolves to %s, built %s", desc.Digest, res.Manifest.Digest)
	}
	var man ocispec.Manifest
	fetchJSON(t, store, desc, &man)
	var cfg ocispec.Image
	fetchJSON(t, store, man.Config, &cfg)
	if cfg.OS != "linux" || cfg.Architecture != "amd64" || len(cfg.RootFS.DiffIDs) != 1 || cfg.RootFS.DiffIDs[0] != res.DiffID {
		t.Errorf("config platform %s/%s diff_ids %v, want linux/amd64 [%s]", cfg.OS, cfg.Architecture, cfg.RootFS.DiffIDs, res.DiffID)
	}
	if cfg.Created == nil || !cfg.Created.Equal(time.Unix(0, 0)) {
		t.Errorf("config created %v, want the epoch", cfg.Created)
	}

	blob, err := content.FetchAll(ctx, store, man.Layers[0])
	if err != nil {
		t.Fatal(err)
	}
	zr, err := gzip.NewReader(bytes.NewReader(blob))
	if err != nil {
		t.Fatal(err)
	}
	if !zr.ModTime.IsZero() || zr.Name != "" {
		t.Errorf("gzip header name %q mtime %v, want none", zr.Name, zr.ModTime)
	}
	got := map[string]*tar.Header{}
	var order []string
	tr := tar.NewReader(zr)
	for {
		h, err := tr.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		got[h.Name] = h
		order = append(order, h.Name)
	}
	wantOrder := []string{"bin", "dev/", "dev/initctl", "dev/null", "etc/", "etc/hostname", "etc/shadow", "etc/systemd/",
		"tmp/", "usr/", "usr/bin/", "usr/bin/ping", "usr/bin/su", "usr/bin/su-hardlink"}
	if strings.Join(order, " ") != strings.Join(wantOrder, " ") {
		t.Errorf("entries\n%v\nwant\n%v", order, wantOrder)
	}

	tests := []struct {
		name     string
		typ      byte
		mode     int64
		uid, gid int
		link     string
		size     int64
		major    int64
		minor    int64
		xattr    string
	}{
		{name: "bin", typ: tar.TypeSymlink, mode: 0o777, link: "usr/bin"},
		{name: "dev/initctl", typ: tar.TypeFifo, mode: 0o600},
		{name: "dev/null", typ: tar.TypeChar, mode: 0o666, major: 1, minor: 3},
		{name: "etc/shadow", typ: tar.TypeReg, mode: 0o640, gid: 42, size: 15},
		{name: "tmp/", typ: tar.TypeDir, mode: 0o1777},
		{name: "usr/bin/ping", typ: tar.TypeReg, mode: 0o755, uid: 1000, gid: 1001, size: 4, xattr: "cap"},
		{name: "usr/bin/su", typ: tar.TypeReg, mode: 0o4755, size: 5000},
		{name: "usr/bin/su-hardlink", typ: tar.TypeLink, mode: 0o4755, link: "usr/bin/su"},
	}
	for _, tt := range tests {
		h := got[tt.name]
		if h == nil {
			t.Errorf("%s: missing from layer", tt.name)
			continue
		}
		if h.Typeflag != tt.typ || h.Mode != tt.mode || h.Uid != tt.uid || h.Gid != tt.gid || h.Linkname != tt.link || h.Size != tt.size ||
			h.Devmajor != tt.major || h.Devminor != tt.minor || h.PAXRecords["SCHILY.xattr.user.nodespawn"] != tt.xattr {
			t.Errorf("%s: type %c mode %o uid %d gid %d link %q size %d dev %d:%d xattr %q, want type %c mode %o uid %d gid %d link %q size %d dev %d:%d xattr %q",
				tt.name, h.Typeflag, h.Mode, h.Uid, h.Gid, h.Linkname, h.Size, h.Devmajor, h.Devminor, h.PAXRecords["SCHILY.xattr.user.nodespawn"],
				tt.typ, tt.mode, tt.uid, tt.gid, tt.link, tt.size, tt.major, tt.minor, tt.xattr)
		}
		if !h.ModTime.Equal(time.Unix(0, 0)) || h.Uname != "" || h.Gname != "" {
			t.Errorf("%s: mtime %v uname %q gname %q, want the epoch and no names", tt.name, h.ModTime, h.Uname, h.Gname)
		}
	}
}

func fetchJSON(t *testing.T, store oras.ReadOnlyTarget, desc ocispec.Descriptor, v any) {
	t.Helper()
	b, err := content.FetchAll(context.Background(), store, desc)
	if err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(b, v); err != nil {
		t.Fatal(err)
	}
}

// TestPushToRegistry pushes to a real registry (Debian's docker-registry,
// distribution v2) on a loopback port and checks that the registry serves
// the same manifest the layout build produced.
func TestPushToRegistry(t *testing.T) {
	root := t.TempDir()
	if err := os.WriteFile(filepath.Join(root, "hello"), []byte("hello\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	addr := registrytest.Start(t).Addr

	local, _ := build(t, root)
	ref := addr + "/nodespawn/test:v1"
	dst, tag, err := Repository(ref, true)
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	pushed, err := Build(ctx, root, dst, tag, Options{Platform: "linux/amd64", Created: time.Unix(0, 0), Cmd: []string{"/sbin/init"}})
	if err != nil {
		t.Fatal(err)
	}
	if pushed.Manifest.Digest != local.Manifest.Digest {
		t.Errorf("registry build %s, layout build %s: same tree must give the same digest", pushed.Manifest.Digest, local.Manifest.Digest)
	}
	// A second push finds every blob already there and must still succeed.
	if _, err := Build(ctx, root, dst, tag, Options{Platform: "linux/amd64", Created: time.Unix(0, 0), Cmd: []string{"/sbin/init"}}); err != nil {
		t.Fatalf("second push: %v", err)
	}
	src, _, err := Repository(ref, true)
	if err != nil {
		t.Fatal(err)
	}
	desc, err := src.Resolve(ctx, tag)
	if err != nil {
		t.Fatal(err)
	}
	if desc.Digest != local.Manifest.Digest {
		t.Errorf("registry serves %s for %s, want %s", desc.Digest, ref, local.Manifest.Digest)
	}
	if _, _, err := Repository(addr+"/nodespawn/test", true); err == nil {
		t.Error("a reference without a tag was accepted for a push")
	}
}

// TestBuildIndependentOfPath builds two equal trees in different
// directories: nothing about where the tree lives may reach the image.
func TestBuildIndependentOfPath(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: the test tree has a device node and files owned by other users")
	}
	a, _ := build(t, makeTree(t))
	b, _ := build(t, makeTree(t))
	if a.Manifest.Digest != b.Manifest.Digest {
		t.Errorf("equal trees in two directories: %s and %s", a.Manifest.Digest, b.Manifest.Digest)
	}
}

// TestExtendSharesTheBase: the extended image lists the base's layer, then
// the new one, with the config's diff_ids to match, under its own tag.
func TestExtendSharesTheBase(t *testing.T) {
	ctx := context.Background()
	root := t.TempDir()
	if err := os.WriteFile(filepath.Join(root, "base"), []byte("base"), 0o644); err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	dst, err := Layout(dir)
	if err != nil {
		t.Fatal(err)
	}
	opts := Options{Platform: "linux/amd64", Created: time.Unix(0, 0)}
	base, err := Build(ctx, root, dst, "v1", opts)
	if err != nil {
		t.Fatal(err)
	}
	top := t.TempDir()
	if err := os.WriteFile(filepath.Join(top, "release"), []byte("v2"), 0o644); err != nil {
		t.Fatal(err)
	}
	ext, err := Extend(ctx, dst, base, top, "v2", opts)
	if err != nil {
		t.Fatal(err)
	}
	desc, err := dst.Resolve(ctx, "v2")
	if err != nil || desc.Digest != ext.Manifest.Digest {
		t.Fatalf("v2 resolves to %v (%v), want %s", desc.Digest, err, ext.Manifest.Digest)
	}
	var m ocispec.Manifest
	var cfg ocispec.Image
	for v, d := range map[any]ocispec.Descriptor{&m: ext.Manifest, &cfg: ext.Config} {
		b, err := content.FetchAll(ctx, dst, d)
		if err != nil {
			t.Fatal(err)
		}
		if err := json.Unmarshal(b, v); err != nil {
			t.Fatal(err)
		}
	}
	if len(m.Layers) != 2 || m.Layers[0].Digest != base.Layer.Digest || m.Layers[1].Digest != ext.Layer.Digest {
		t.Errorf("layers %v, want the base's %s then %s", m.Layers, base.Layer.Digest, ext.Layer.Digest)
	}
	if len(cfg.RootFS.DiffIDs) != 2 || cfg.RootFS.DiffIDs[0] != base.DiffID || cfg.RootFS.DiffIDs[1] != ext.DiffID {
		t.Errorf("diff_ids %v, want %s then %s", cfg.RootFS.DiffIDs, base.DiffID, ext.DiffID)
	}
}

// TestWriteFiles: a layer from a list of files of two trees holds exactly
// those entries, in the list's order and under the list's names (a
// directory without its content), each as WriteLayer writes it; a hard
// link among them stays one; the digests and sizes it reports are those
// of the blob and of the tar in it.
func TestWriteFiles(t *testing.T) {
	a, b := t.TempDir(), t.TempDir()
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	must(os.MkdirAll(filepath.Join(a, "etc/skipped"), 0o750))
	must(os.Chmod(filepath.Join(a, "etc"), 0o755))
	must(os.Chmod(filepath.Join(a, "etc/skipped"), 0o750))
	must(os.WriteFile(filepath.Join(a, "etc/skipped/file"), []byte("not listed"), 0o644))
	must(os.WriteFile(filepath.Join(a, "etc/hostname"), []byte("node\n"), 0o600))
	must(os.Chmod(filepath.Join(a, "etc/hostname"), 0o600))
	must(os.WriteFile(filepath.Join(b, "kubelet"), []byte("binary"), 0o755))
	must(os.Chmod(filepath.Join(b, "kubelet"), 0o755))
	must(os.Link(filepath.Join(b, "kubelet"), filepath.Join(b, "kubelet-link")))
	must(os.Symlink("kubelet", filepath.Join(b, "kl")))
	files := []File{
		{Name: "etc", Path: filepath.Join(a, "etc")},
		{Name: "etc/skipped", Path: filepath.Join(a, "etc/skipped")},
		{Name: "usr/local/bin/kubelet", Path: filepath.Join(b, "kubelet")},
		{Name: "etc/hostname", Path: filepath.Join(a, "etc/hostname")},
		{Name: "usr/local/bin/kubelet2", Path: filepath.Join(b, "kubelet-link")},
		{Name: "usr/local/bin/kl", Path: filepath.Join(b, "kl")},
	}
	var blob bytes.Buffer
	mtime := time.Unix(1700000000, 0)
	info, err := WriteFiles(context.Background(), files, mtime, &blob)
	if err != nil {
		t.Fatal(err)
	}
	if info.Size != int64(blob.Len()) || info.Digest != digest.FromBytes(blob.Bytes()) || info.Entries != len(files) {
		t.Errorf("info size %d digest %s entries %d, want %d %s %d", info.Size, info.Digest, info.Entries, blob.Len(), digest.FromBytes(blob.Bytes()), len(files))
	}
	zr, err := gzip.NewReader(&blob)
	if err != nil {
		t.Fatal(err)
	}
	plain, err := io.ReadAll(zr)
	if err != nil {
		t.Fatal(err)
	}
	if info.TarSize != int64(len(plain)) || info.DiffID != digest.FromBytes(plain) {
		t.Errorf("info tar size %d diff id %s, want %d %s", info.TarSize, info.DiffID, len(plain), digest.FromBytes(plain))
	}
	type entry struct {
		name     string
		typ      byte
		mode     int64
		link     string
		size     int64
		contents string
	}
	want := []entry{
		{"etc/", tar.TypeDir, 0o755, "", 0, ""},
		{"etc/skipped/", tar.TypeDir, 0o750, "", 0, ""},
		{"usr/local/bin/kubelet", tar.TypeReg, 0o755, "", 6, "binary"},
		{"etc/hostname", tar.TypeReg, 0o600, "", 5, "node\n"},
		{"usr/local/bin/kubelet2", tar.TypeLink, 0o755, "usr/local/bin/kubelet", 0, ""},
		{"usr/local/bin/kl", tar.TypeSymlink, 0o777, "kubelet", 0, ""},
	}
	var got []entry
	tr := tar.NewReader(bytes.NewReader(plain))
	for {
		h, err := tr.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		body, err := io.ReadAll(tr)
		if err != nil {
			t.Fatal(err)
		}
		if !h.ModTime.Equal(mtime) {
			t.Errorf("%s: mtime %v, want %v", h.Name, h.ModTime, mtime)
		}
		got = append(got, entry{h.Name, h.Typeflag, h.Mode, h.Linkname, h.Size, string(body)})
	}
	if len(got) != len(want) {
		t.Fatalf("entries %v, want %v", got, want)
	}
	for i := range want {
		if got[i] != want[i] {
			t.Errorf("entry %d: %+v, want %+v", i, got[i], want[i])
		}
	}

	// A file that is not there is an error naming it.
	_, err = WriteFiles(context.Background(), []File{{Name: "gone", Path: filepath.Join(a, "gone")}}, mtime, io.Discard)
	if err == nil || !strings.Contains(err.Error(), filepath.Join(a, "gone")) {
		t.Errorf("missing file: error %v, want one naming %s", err, filepath.Join(a, "gone"))
	}
}
