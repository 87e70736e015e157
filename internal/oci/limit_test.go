package oci

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"context"
	"crypto/sha256"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/nodespawn/nodespawn/internal/confine/confinetest"
	"github.com/nodespawn/nodespawn/internal/layers"
	"github.com/nodespawn/nodespawn/internal/registrytest"
	"github.com/nodespawn/nodespawn/internal/rootfs/rootfstest"
)

// bombLayer is a gzip layer of n files of size bytes each (zeros), or of
// n empty files when size is 0, streamed so the tar itself is never held:
// 32 files of 8 MiB are 256 MiB unpacked from a blob of about 260 KB.
func bombLayer(t testing.TB, n int, size int64) layer {
	t.Helper()
	var blob bytes.Buffer
	zw, err := gzip.NewWriterLevel(&blob, gzip.BestCompression)
	if err != nil {
		t.Fatal(err)
	}
	diff := sha256.New()
	tw := tar.NewWriter(io.MultiWriter(zw, diff))
	zeros := make([]byte, 1<<20)
	for i := range n {
		if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: fmt.Sprintf("bomb/f%06d", i), Mode: 0o644, Size: size}); err != nil {
			t.Fatal(err)
		}
		for left := size; left > 0; left -= int64(len(zeros)) {
			if _, err := tw.Write(zeros[:min(left, int64(len(zeros)))]); err != nil {
				t.Fatal(err)
			}
		}
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	if err := zw.Close(); err != nil {
		t.Fatal(err)
	}
	return layer{mediaType: ocispec.MediaTypeImageLayerGzip, blob: blob.Bytes(), diffID: digest.NewDigest(digest.SHA256, diff)}
}

// TestUnpackBound: a gzip bomb, and a layer of many empty files, pulled
// from a registry into either store, stop at the bound with an error
// naming the layer, the bound and the setting, and leave nothing: no
// layer of theirs in the store, no staging directory, no tree.
func TestUnpackBound(t *testing.T) {
	requireRoot(t)
	ctx := context.Background()
	reg := registrytest.Start(t)
	repo := pushRepo(t, reg.Addr, "nodespawn/bomb")
	good := gzLayer(t, file("etc/os-release", "ID=test\n", 0o644))
	bomb := bombLayer(t, 32, 8<<20)
	if len(bomb.blob) > 1<<20 {
		t.Fatalf("the bomb's blob is %d bytes; it should compress to well under 1 MiB", len(bomb.blob))
	}
	empties := bombLayer(t, 5000, 0)
	pushImage(t, ctx, repo, "bomb", imageSpec{platform: linuxAMD64, layers: []layer{good, bomb}})
	pushImage(t, ctx, repo, "empties", imageSpec{platform: linuxAMD64, layers: []layer{good, empties}})
	pushImage(t, ctx, repo, "good", imageSpec{platform: linuxAMD64, layers: []layer{good}})

	// room makes MinFree leave about n bytes of the free space of dir's
	// filesystem to the pull.
	room := func(dir string, n int64) int64 {
		root := confinetest.HostRoot(t)
		free, err := root.FreeSpace(dir)
		if err != nil {
			t.Fatal(err)
		}
		if free < 1<<30 {
			t.Skipf("%s has %d bytes free; the test wants 1 GiB", dir, free)
		}
		return free - n
	}
	cases := []struct {
		name, tag    string
		max, minFree func(dir string) int64
		layer        layer
		want         []string
	}{
		{"gzip bomb over maxUnpackedSize", "bomb",
			func(string) int64 { return 64 << 20 }, func(string) int64 { return 0 }, bomb,
			[]string{"layer 2/2 " + bomb.digest().String(), "64.0 MiB", "machine.rootfs.maxUnpackedSize is 64.0 MiB", `entry "bomb/f000007"`, "raise machine.rootfs.maxUnpackedSize"}},
		{"gzip bomb over the free space", "bomb",
			func(string) int64 { return 0 }, func(dir string) int64 { return room(dir, 40<<20) }, bomb,
			[]string{"layer 2/2 " + bomb.digest().String(), "free and machine.rootfs.minFreeSpace keeps", "lower machine.rootfs.minFreeSpace"}},
		{"many empty files", "empties",
			func(string) int64 { return 1 << 20 }, func(string) int64 { return -1 }, empties,
			[]string{"layer 2/2 " + empties.digest().String(), "machine.rootfs.maxUnpackedSize is 1.0 MiB", `entry "bomb/f00`}},
		{"filesystem under the reserve", "good",
			func(string) int64 { return 0 }, func(string) int64 { return 1 << 60 }, good,
			[]string{"less than the", "that machine.rootfs.minFreeSpace keeps free"}},
	}
	for _, c := range cases {
		t.Run("flat/"+c.name, func(t *testing.T) {
			parent := rootfstest.MachinesDir(t)
			dest := filepath.Join(parent, "m")
			_, err := Pull(ctx, Request{Reference: reg.Addr + "/nodespawn/bomb:" + c.tag, Platform: "linux/amd64", PlainHTTP: []string{reg.Addr},
				Root: confinetest.HostRoot(t), Dest: dest, Log: testLogger(t), MaxUnpacked: c.max(parent), MinFree: c.minFree(parent)})
			checkBoundError(t, err, c.want)
			if es, _ := os.ReadDir(parent); len(es) != 0 {
				t.Errorf("the refused pull left %s beside the rootfs", es[0].Name())
			}
		})
		t.Run("layers/"+c.name, func(t *testing.T) {
			base := t.TempDir()
			store, err := layers.Open(confinetest.HostRoot(t), filepath.Join(base, "layers"))
			if err != nil {
				t.Fatal(err)
			}
			_, err = PullLayers(ctx, Request{Reference: reg.Addr + "/nodespawn/bomb:" + c.tag, Platform: "linux/amd64", PlainHTTP: []string{reg.Addr},
				Log: testLogger(t), MaxUnpacked: c.max(base), MinFree: c.minFree(base)}, store)
			checkBoundError(t, err, c.want)
			es, _ := os.ReadDir(store.Dir())
			for _, e := range es {
				if e.Name() != "sha256" && e.Name() != "notes" && e.Name() != "stamps" {
					t.Errorf("the refused pull left %s in the store", e.Name())
				}
			}
			if have, err := store.Has(c.layer.diffID); have || err != nil {
				t.Errorf("the refused layer is in the store (%v)", err)
			}
		})
	}
}

func checkBoundError(t *testing.T, err error, want []string) {
	t.Helper()
	if err == nil {
		t.Fatal("the pull passed the bound")
	}
	t.Logf("refused: %v", err)
	for _, w := range want {
		if !strings.Contains(err.Error(), w) {
			t.Errorf("error %q does not say %q", err, w)
		}
	}
}

// digest is the layer's blob digest, as errors name it.
func (l layer) digest() digest.Digest { return digest.FromBytes(l.blob) }

// The bound counts what extracting writes: contents by whole blocks and
// the logical size (a sparse file's holes are written as zeros), each
// entry's overhead, names and xattrs.
func TestEntryCost(t *testing.T) {
	for _, c := range []struct {
		h    tar.Header
		want int64
	}{
		{tar.Header{Typeflag: tar.TypeReg, Name: "a", Size: 1}, 512 + 1 + 4096},
		{tar.Header{Typeflag: tar.TypeReg, Name: "a", Size: 4096}, 512 + 1 + 4096},
		{tar.Header{Typeflag: tar.TypeReg, Name: "a", Size: 0}, 512 + 1},
		{tar.Header{Typeflag: tar.TypeDir, Name: "d/", Size: 1 << 40}, 512 + 2},
		{tar.Header{Typeflag: tar.TypeSymlink, Name: "l", Linkname: "target"}, 512 + 1 + 6},
		{tar.Header{Typeflag: tar.TypeReg, Name: "x", PAXRecords: map[string]string{"SCHILY.xattr.user.a": "vv", "path": "x"}}, 512 + 1 + 19 + 2},
	} {
		if got := entryCost(&c.h); got != c.want {
			t.Errorf("entryCost(%c %q size %d) = %d, want %d", c.h.Typeflag, c.h.Name, c.h.Size, got, c.want)
		}
	}
	var l *unpackLimit
	if err := l.charge(1<<62, "x"); err != nil {
		t.Errorf("no limit refused: %v", err)
	}
	l = &unpackLimit{max: 10, why: "test"}
	if err := l.charge(10, "a"); err != nil {
		t.Fatal(err)
	}
	if err := l.charge(1, "b"); err == nil || !strings.Contains(err.Error(), "b would pass") {
		t.Errorf("charge past the bound: %v", err)
	}
	if got := l.used.Load(); got != 10 {
		t.Errorf("a refused charge counted: used %d", got)
	}
}
