package oci

import (
	"archive/tar"
	"context"
	"errors"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"golang.org/x/sys/unix"

	"github.com/nodespawn/nodespawn/internal/confine/confinetest"
	"github.com/nodespawn/nodespawn/internal/httpx"
	"github.com/nodespawn/nodespawn/internal/registrytest"
	"github.com/nodespawn/nodespawn/internal/rootfs/rootfstest"
)

func testLogger(t testing.TB) *slog.Logger {
	return slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

type testWriter struct{ t testing.TB }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}

// featureLayers is a three-layer image with one layer of each compression
// that exercises what a real rootfs carries.
func featureLayers(t testing.TB) []layer {
	xattr := file("etc/caps", "cap", 0o755)
	xattr.hdr.PAXRecords = map[string]string{"SCHILY.xattr.user.nodespawn": "hello", "SCHILY.xattr.security.capability": "\x01\x00\x00\x02\x00\x20\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00"}
	chr := entry{hdr: tar.Header{Name: "dev/null", Typeflag: tar.TypeChar, Mode: 0o666, Devmajor: 1, Devminor: 3}}
	blk := entry{hdr: tar.Header{Name: "dev/loop7", Typeflag: tar.TypeBlock, Mode: 0o660, Gid: 6, Devmajor: 7, Devminor: 7}}
	fifo := entry{hdr: tar.Header{Name: "run/initctl", Typeflag: tar.TypeFifo, Mode: 0o600}}
	l1 := compressLayer(t, ocispec.MediaTypeImageLayerGzip, mkTar(t,
		dir("etc", 0o755), file("etc/passwd", "root:x:0:0::/root:/bin/sh\n", 0o644), xattr,
		dir("usr", 0o755), dir("usr/bin", 0o755),
		file("usr/bin/su", "su-binary", 0o4755), file("usr/bin/wall", "wall-binary", 0o2755),
		hardlink("usr/bin/su-again", "usr/bin/su", 0o4755),
		symlink("bin", "usr/bin"),
		dir("tmp", 0o1777),
		owned(dir("home/user", 0o750), 1000, 1000), owned(file("home/user/notes", "mine", 0o600), 1000, 1001),
		dir("dev", 0o755), chr, blk, dir("run", 0o755), fifo,
		file("old/a", "a", 0o644), file("old/b", "b", 0o644),
		file("opq/x", "x", 0o644), file("opq/y", "y", 0o644),
		file("gone/file", "g", 0o644),
	))
	l2 := compressLayer(t, ocispec.MediaTypeImageLayerZstd, mkTar(t,
		whiteout("old/.wh.a"),
		whiteout("opq/.wh..wh..opq"), file("opq/z", "z", 0o644),
		whiteout(".wh.gone"),
		file("etc/hostname", "kube1\n", 0o644),
	))
	l3 := compressLayer(t, ocispec.MediaTypeImageLayer, mkTar(t,
		file("etc/passwd", "root:x:0:0::/root:/bin/bash\n", 0o644),
		file("usr/bin/tool", "tool", 0o755),
	))
	return []layer{l1, l2, l3}
}

// checkFeatureRootfs asserts what featureLayers should produce.
func checkFeatureRootfs(t *testing.T, root string) {
	t.Helper()
	read := func(p string) string {
		b, err := os.ReadFile(filepath.Join(root, p))
		if err != nil {
			t.Errorf("read %s: %v", p, err)
		}
		return string(b)
	}
	stat := func(p string) *syscall.Stat_t {
		var st syscall.Stat_t
		if err := syscall.Lstat(filepath.Join(root, p), &st); err != nil {
			t.Errorf("lstat %s: %v", p, err)
		}
		return &st
	}
	absent := func(p string) {
		if _, err := os.Lstat(filepath.Join(root, p)); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("%s should be gone, lstat says %v", p, err)
		}
	}
	if got := read("etc/passwd"); got != "root:x:0:0::/root:/bin/bash\n" {
		t.Errorf("etc/passwd = %q, want the third layer's", got)
	}
	if got := read("etc/hostname"); got != "kube1\n" {
		t.Errorf("etc/hostname = %q", got)
	}
	if got := read("usr/bin/tool"); got != "tool" {
		t.Errorf("usr/bin/tool = %q", got)
	}
	for _, c := range []struct {
		path     string
		mode     uint32
		uid, gid uint32
	}{
		{"usr/bin/su", unix.S_IFREG | 0o4755, 0, 0},
		{"usr/bin/wall", unix.S_IFREG | 0o2755, 0, 0},
		{"tmp", unix.S_IFDIR | 0o1777, 0, 0},
		{"home/user", unix.S_IFDIR | 0o750, 1000, 1000},
		{"home/user/notes", unix.S_IFREG | 0o600, 1000, 1001},
		{"dev/null", unix.S_IFCHR | 0o666, 0, 0},
		{"dev/loop7", unix.S_IFBLK | 0o660, 0, 6},
		{"run/initctl", unix.S_IFIFO | 0o600, 0, 0},
		{".", unix.S_IFDIR | 0o755, 0, 0},
	} {
		st := stat(c.path)
		if st.Mode != c.mode || st.Uid != c.uid || st.Gid != c.gid {
			t.Errorf("%s: mode %o uid %d gid %d, want mode %o uid %d gid %d", c.path, st.Mode, st.Uid, st.Gid, c.mode, c.uid, c.gid)
		}
	}
	if st := stat("dev/null"); unix.Major(st.Rdev) != 1 || unix.Minor(st.Rdev) != 3 {
		t.Errorf("dev/null is %d:%d, want 1:3", unix.Major(st.Rdev), unix.Minor(st.Rdev))
	}
	if a, b := stat("usr/bin/su"), stat("usr/bin/su-again"); a.Ino != b.Ino || a.Nlink != 2 {
		t.Errorf("usr/bin/su-again is not a hardlink of usr/bin/su (inodes %d, %d, nlink %d)", a.Ino, b.Ino, a.Nlink)
	}
	if target, err := os.Readlink(filepath.Join(root, "bin")); err != nil || target != "usr/bin" {
		t.Errorf("bin -> %q (%v), want usr/bin", target, err)
	}
	buf := make([]byte, 64)
	if n, err := unix.Lgetxattr(filepath.Join(root, "etc/caps"), "user.nodespawn", buf); err != nil || string(buf[:n]) != "hello" {
		t.Errorf("etc/caps xattr user.nodespawn = %q (%v), want hello", buf[:max(n, 0)], err)
	}
	if n, err := unix.Lgetxattr(filepath.Join(root, "etc/caps"), "security.capability", buf); err != nil || n != 20 {
		t.Errorf("etc/caps security.capability: %d bytes (%v), want 20", n, err)
	}
	absent("old/a")
	read("old/b")
	absent("opq/x")
	absent("opq/y")
	read("opq/z")
	absent("gone")
}

func TestPullRegistryFeatures(t *testing.T) {
	requireRoot(t)
	ctx := context.Background()
	reg := registrytest.Start(t)
	repo := pushRepo(t, reg.Addr, "nodespawn/base")
	desc := pushImage(t, ctx, repo, "v1", imageSpec{platform: linuxAMD64, layers: featureLayers(t)})

	parent := rootfstest.MachinesDir(t)
	dest := filepath.Join(parent, "kube1")
	var progress []Progress
	res, err := Pull(ctx, Request{
		Reference: reg.Addr + "/nodespawn/base:v1", Platform: "linux/amd64", PlainHTTP: []string{reg.Addr},
		Root: confinetest.HostRoot(t), Dest: dest, Log: testLogger(t), Progress: func(p Progress) { progress = append(progress, p) },
	})
	if err != nil {
		t.Fatalf("Pull: %v", err)
	}
	if res.ManifestDigest != desc.Digest || res.Layers != 3 || res.NoOp {
		t.Errorf("result %+v, want manifest %s, 3 layers, not a no-op", res, desc.Digest)
	}
	checkFeatureRootfs(t, dest)
	done := 0
	for _, p := range progress {
		if p.Done {
			done++
		}
	}
	if done != 3 {
		t.Errorf("progress reported %d layers done, want 3", done)
	}
	rootfstest.AssertOnly(t, parent, ".kube1.nodespawn-image", "kube1")

	// Same digest by digest reference: a no-op, dest untouched.
	before := stat(t, dest)
	res, err = Pull(ctx, Request{
		Reference: reg.Addr + "/nodespawn/base@" + desc.Digest.String(), Platform: "linux/amd64",
		PlainHTTP: []string{reg.Addr}, Root: confinetest.HostRoot(t), Dest: dest, Log: testLogger(t),
	})
	if err != nil || !res.NoOp {
		t.Fatalf("second Pull: NoOp=%v err=%v, want a no-op", res.NoOp, err)
	}
	if after := stat(t, dest); after.Ino != before.Ino {
		t.Errorf("no-op pull replaced the rootfs (inode %d -> %d)", before.Ino, after.Ino)
	}
}

func stat(t testing.TB, p string) *syscall.Stat_t {
	t.Helper()
	var st syscall.Stat_t
	if err := syscall.Lstat(p, &st); err != nil {
		t.Fatal(err)
	}
	return &st
}

func TestPullReplacesAndCleansLeftovers(t *testing.T) {
	requireRoot(t)
	ctx := context.Background()
	reg := registrytest.Start(t)
	repo := pushRepo(t, reg.Addr, "nodespawn/swap")
	pushImage(t, ctx, repo, "one", imageSpec{platform: linuxAMD64, layers: []layer{gzLayer(t, file("version", "one", 0o644))}})
	pushImage(t, ctx, repo, "two", imageSpec{platform: linuxAMD64, layers: []layer{gzLayer(t, file("version", "two", 0o644))}})

	parent := rootfstest.MachinesDir(t)
	dest := filepath.Join(parent, "m")
	pull := func(tag string) Result {
		t.Helper()
		res, err := Pull(ctx, Request{Reference: reg.Addr + "/nodespawn/swap:" + tag, Platform: "linux/amd64",
			PlainHTTP: []string{reg.Addr}, Root: confinetest.HostRoot(t), Dest: dest, Log: testLogger(t)})
		if err != nil {
			t.Fatalf("Pull %s: %v", tag, err)
		}
		return res
	}
	pull("one")
	// A crash left a staging dir and an aside dir behind.
	for _, p := range []string{".m.staging-123", ".m.old-456"} {
		if err := os.MkdirAll(filepath.Join(parent, p, "junk"), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if res := pull("two"); res.NoOp {
		t.Fatal("pull of a different image was a no-op")
	}
	if b, _ := os.ReadFile(filepath.Join(dest, "version")); string(b) != "two" {
		t.Errorf("version = %q after replacing, want two", b)
	}
	rootfstest.AssertOnly(t, parent, ".m.nodespawn-image", "m")

	// A rootfs swapped by hand under the same marker is not taken for the image.
	if err := os.Rename(dest, dest+"-saved"); err != nil {
		t.Fatal(err)
	}
	if err := os.Mkdir(dest, 0o755); err != nil {
		t.Fatal(err)
	}
	if res := pull("two"); res.NoOp {
		t.Error("pull into a rootfs replaced by hand was a no-op")
	}
}

func TestPullMultiArchFetchesOnlyOnePlatform(t *testing.T) {
	requireRoot(t)
	ctx := context.Background()
	reg := registrytest.Start(t)
	repo := pushRepo(t, reg.Addr, "nodespawn/multi")
	plats := []ocispec.Platform{
		{OS: "linux", Architecture: "amd64"},
		{OS: "linux", Architecture: "arm64", Variant: "v8"},
		{OS: "linux", Architecture: "arm", Variant: "v7"},
		{OS: "linux", Architecture: "ppc64le"},
	}
	var imgs []imageSpec
	for _, p := range plats {
		imgs = append(imgs, imageSpec{platform: p, layers: []layer{
			gzLayer(t, file("arch", p.Architecture, 0o644)),
			gzLayer(t, file("etc/"+p.Architecture, p.Architecture+p.Variant, 0o644)),
		}})
	}
	_, manifests := pushIndex(t, ctx, repo, "multi", imgs...)
	px := startProxy(t, reg.Addr)

	for _, c := range []struct{ platform, arch string }{{"linux/arm64/v8", "arm64"}, {"linux/arm64", "arm64"}, {"linux/amd64", "amd64"}, {"linux/arm/v7", "arm"}} {
		t.Run(c.platform, func(t *testing.T) {
			start := len(px.log())
			dest := filepath.Join(rootfstest.MachinesDir(t), "m")
			res, err := Pull(ctx, Request{Reference: px.addr + "/nodespawn/multi:multi", Platform: c.platform,
				PlainHTTP: []string{px.addr}, Root: confinetest.HostRoot(t), Dest: dest, Log: testLogger(t)})
			if err != nil {
				t.Fatalf("Pull: %v", err)
			}
			if b, _ := os.ReadFile(filepath.Join(dest, "arch")); string(b) != c.arch {
				t.Errorf("arch file = %q, want %q", b, c.arch)
			}
			requests := strings.Join(px.log()[start:], "\n")
			for i, m := range manifests {
				mine := m.Digest == res.ManifestDigest
				if mine != (plats[i].Architecture == c.arch) {
					t.Errorf("pulled manifest %s; index entry %d is %s", res.ManifestDigest, i, plats[i].Architecture)
				}
				mf := fetchManifest(t, ctx, repo, m)
				digests := []string{m.Digest.String(), mf.Config.Digest.String()}
				for _, l := range mf.Layers {
					digests = append(digests, l.Digest.String())
				}
				for _, d := range digests {
					if got := strings.Contains(requests, d); got != mine {
						t.Errorf("platform %s/%s: blob or manifest %s requested=%v, want %v\nrequests:\n%s",
							plats[i].Architecture, plats[i].Variant, d, got, mine, requests)
					}
				}
			}
		})
	}

	t.Run("missing platform", func(t *testing.T) {
		parent := rootfstest.MachinesDir(t)
		_, err := Pull(ctx, Request{Reference: px.addr + "/nodespawn/multi:multi", Platform: "linux/s390x",
			PlainHTTP: []string{px.addr}, Root: confinetest.HostRoot(t), Dest: filepath.Join(parent, "m"), Log: testLogger(t)})
		if err == nil || !strings.Contains(err.Error(), "no manifest for platform linux/s390x") || !strings.Contains(err.Error(), "linux/arm64/v8") {
			t.Fatalf("err = %v, want no manifest for platform linux/s390x listing what the index has", err)
		}
		rootfstest.AssertOnly(t, parent)
	})
}

func TestPullSingleArchWrongPlatform(t *testing.T) {
	ctx := context.Background()
	reg := registrytest.Start(t)
	repo := pushRepo(t, reg.Addr, "nodespawn/arm")
	pushImage(t, ctx, repo, "v1", imageSpec{platform: ocispec.Platform{OS: "linux", Architecture: "arm64"}, layers: []layer{gzLayer(t, file("a", "a", 0o644))}})
	parent := rootfstest.MachinesDir(t)
	_, err := Pull(ctx, Request{Reference: reg.Addr + "/nodespawn/arm:v1", Platform: "linux/amd64",
		PlainHTTP: []string{reg.Addr}, Root: confinetest.HostRoot(t), Dest: filepath.Join(parent, "m"), Log: testLogger(t)})
	if err == nil || !strings.Contains(err.Error(), "is for platform linux/arm64, want linux/amd64") {
		t.Fatalf("err = %v, want a platform mismatch", err)
	}
	rootfstest.AssertOnly(t, parent)
}

func TestPullCredentials(t *testing.T) {
	requireRoot(t)
	ctx := context.Background()
	htpasswd, err := filepath.Abs("testdata/htpasswd") // user nodespawn, password s3cret
	if err != nil {
		t.Fatal(err)
	}
	reg := registrytest.StartWith(t, registrytest.Options{Htpasswd: htpasswd})
	repo := pushRepo(t, reg.Addr, "nodespawn/private")
	repo.Client = authClient(reg.Addr, "nodespawn", "s3cret")
	pushImage(t, ctx, repo, "v1", imageSpec{platform: linuxAMD64, layers: []layer{gzLayer(t, file("secret", "s", 0o600))}})

	dir := t.TempDir()
	good := filepath.Join(dir, "good.json")
	bad := filepath.Join(dir, "bad.json")
	writeDockerConfig(t, good, reg.Addr, "nodespawn", "s3cret")
	writeDockerConfig(t, bad, reg.Addr, "nodespawn", "wrong")
	for _, c := range []struct {
		name, creds string
		ok          bool
	}{{"anonymous", "", false}, {"wrong password", bad, false}, {"docker config", good, true}} {
		t.Run(c.name, func(t *testing.T) {
			parent := rootfstest.MachinesDir(t)
			_, err := Pull(ctx, Request{Reference: reg.Addr + "/nodespawn/private:v1", Platform: "linux/amd64",
				PlainHTTP: []string{reg.Addr}, Root: confinetest.HostRoot(t), Dest: filepath.Join(parent, "m"), CredentialsFile: c.creds, Log: testLogger(t),
				HTTPClient: httpx.NewClient(httpx.WithPolicy(httpx.Policy{Attempts: 1}))})
			if c.ok && err != nil {
				t.Fatalf("Pull: %v", err)
			}
			if !c.ok {
				t.Logf("refused as expected: %v", err)
				if err == nil || !(strings.Contains(err.Error(), "401") || strings.Contains(err.Error(), "credential not found")) {
					t.Fatalf("err = %v, want an unauthorized error", err)
				}
				rootfstest.AssertOnly(t, parent)
			}
		})
	}
}

func TestPullPlainHTTPOnlyWhenListed(t *testing.T) {
	reg := registrytest.Start(t)
	parent := rootfstest.MachinesDir(t)
	_, err := Pull(context.Background(), Request{Reference: reg.Addr + "/nodespawn/any:v1", Platform: "linux/amd64",
		Root: confinetest.HostRoot(t), Dest: filepath.Join(parent, "m"), Log: testLogger(t), HTTPClient: httpx.NewClient(httpx.WithPolicy(httpx.Policy{Attempts: 1}))})
	if err == nil || !strings.Contains(err.Error(), "https://"+reg.Addr) {
		t.Fatalf("err = %v, want a failed HTTPS request to a registry not listed as plain HTTP", err)
	}
	rootfstest.AssertOnly(t, parent)
}

func TestPullLayout(t *testing.T) {
	requireRoot(t)
	ctx := context.Background()
	layoutDir := t.TempDir()
	store := layoutStore(t, layoutDir)
	_, manifests := pushIndex(t, ctx, store, "v1",
		imageSpec{platform: linuxAMD64, layers: featureLayers(t)},
		imageSpec{platform: ocispec.Platform{OS: "linux", Architecture: "arm64"}, layers: []layer{gzLayer(t, file("arm", "", 0o644))}})

	parent := rootfstest.MachinesDir(t)
	dest := filepath.Join(parent, "air")
	res, err := Pull(ctx, Request{Layout: layoutDir, LayoutRef: "v1", Platform: "linux/amd64", Root: confinetest.HostRoot(t), Dest: dest, Log: testLogger(t)})
	if err != nil {
		t.Fatalf("Pull from layout: %v", err)
	}
	if res.ManifestDigest != manifests[0].Digest {
		t.Errorf("manifest %s, want the amd64 one %s", res.ManifestDigest, manifests[0].Digest)
	}
	checkFeatureRootfs(t, dest)

	// By digest too, and it is the same rootfs.
	res, err = Pull(ctx, Request{Layout: layoutDir, LayoutRef: manifests[0].Digest.String(), Platform: "linux/amd64", Root: confinetest.HostRoot(t), Dest: dest, Log: testLogger(t)})
	if err != nil || !res.NoOp {
		t.Fatalf("Pull by digest: NoOp=%v err=%v, want a no-op", res.NoOp, err)
	}
}

func TestRequestValidation(t *testing.T) {
	for _, c := range []struct {
		name string
		req  Request
		want string
	}{
		{"nothing", Request{Root: confinetest.HostRoot(t), Dest: "/x", Platform: "linux/amd64"}, "exactly one"},
		{"both", Request{Reference: "r/x:1", Layout: "/l", LayoutRef: "v", Root: confinetest.HostRoot(t), Dest: "/x", Platform: "linux/amd64"}, "exactly one"},
		{"layout without ref", Request{Layout: "/l", Root: confinetest.HostRoot(t), Dest: "/x", Platform: "linux/amd64"}, "tag or digest inside"},
		{"relative dest", Request{Reference: "r/x:1", Root: confinetest.HostRoot(t), Dest: "x", Platform: "linux/amd64"}, "absolute path"},
		{"root dest", Request{Reference: "r/x:1", Root: confinetest.HostRoot(t), Dest: "/", Platform: "linux/amd64"}, "absolute path"},
		{"bad platform", Request{Reference: "r/x:1", Root: confinetest.HostRoot(t), Dest: "/x", Platform: "amd64"}, "want os/arch"},
		{"unpinned", Request{Reference: "registry.example/x", Root: confinetest.HostRoot(t), Dest: "/x", Platform: "linux/amd64"}, "pin it"},
	} {
		t.Run(c.name, func(t *testing.T) {
			_, err := Pull(context.Background(), c.req)
			if err == nil || !strings.Contains(err.Error(), c.want) {
				t.Fatalf("err = %v, want it to contain %q", err, c.want)
			}
		})
	}
}

func TestPlatformChoose(t *testing.T) {
	entries := []ocispec.Descriptor{
		{Digest: "sha256:a", Platform: &ocispec.Platform{OS: "linux", Architecture: "arm64", Variant: "v9"}},
		{Digest: "sha256:b", Platform: &ocispec.Platform{OS: "linux", Architecture: "arm64"}},
		{Digest: "sha256:c", Platform: &ocispec.Platform{OS: "linux", Architecture: "amd64", Variant: "v3"}},
		{Digest: "sha256:d", Platform: &ocispec.Platform{OS: "unknown", Architecture: "unknown"}},
	}
	for _, c := range []struct{ platform, want string }{
		{"linux/arm64", "sha256:b"}, {"linux/arm64/v8", "sha256:b"}, {"linux/arm64/v9", "sha256:a"},
		{"linux/amd64", "sha256:c"}, {"linux/amd64/v3", "sha256:c"}, {"linux/amd64/v2", ""}, {"linux/riscv64", ""},
	} {
		p, err := ParsePlatform(c.platform)
		if err != nil {
			t.Fatal(err)
		}
		got, err := p.choose(entries)
		if string(got.Digest) != c.want || (err == nil) != (c.want != "") {
			t.Errorf("%s: chose %q (%v), want %q", c.platform, got.Digest, err, c.want)
		}
	}
}
