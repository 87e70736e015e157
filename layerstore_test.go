package main

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"maps"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"oras.land/oras-go/v2"
	"oras.land/oras-go/v2/content"
	"oras.land/oras-go/v2/errdef"

	"github.com/nodespawn/nodespawn/internal/imagebuild"
	"github.com/nodespawn/nodespawn/internal/layers"
	"github.com/nodespawn/nodespawn/internal/probe"
)

// layoutImage opens the OCI layout at layout and reads the manifest of
// the image tagged ref.
func layoutImage(t testing.TB, layout, ref string) (oras.Target, ocispec.Descriptor, ocispec.Manifest) {
	t.Helper()
	target, err := imagebuild.Layout(layout)
	if err != nil {
		t.Fatal(err)
	}
	var m ocispec.Manifest
	man, err := target.Resolve(context.Background(), ref)
	if err != nil {
		t.Fatal(err)
	}
	fetchJSON(t, target, man, &m)
	return target, man, m
}

// fetchJSON reads the blob d from target into v.
func fetchJSON(t testing.TB, target oras.Target, d ocispec.Descriptor, v any) {
	t.Helper()
	b, err := content.FetchAll(context.Background(), target, d)
	if err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(b, v); err != nil {
		t.Fatal(err)
	}
}

// extendLayout tags, in the OCI layout at layout, the image from with one
// more layer per tree on top (a tree given twice makes the same layer
// twice: the image repeats it).
func extendLayout(t testing.TB, layout, from, to string, trees []string) {
	t.Helper()
	ctx := context.Background()
	target, man, m := layoutImage(t, layout, from)
	var err error
	res := imagebuild.Result{Manifest: man, Config: m.Config}
	for i, tree := range trees {
		tag := fmt.Sprintf("%s-%d", to, i)
		if i == len(trees)-1 {
			tag = to
		}
		if res, err = imagebuild.Extend(ctx, target, res, tree, tag, imagebuild.Options{Platform: "linux/" + runtime.GOARCH}); err != nil {
			t.Fatal(err)
		}
	}
}

// layerTree is a tree holding the file layers/<name>.
func layerTree(t *testing.T, name string) string {
	t.Helper()
	dir := t.TempDir()
	if err := os.MkdirAll(filepath.Join(dir, "layers"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "layers", name), []byte(name+"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	return dir
}

// runningKernelEnv makes a child CLI (cliCommand) probe this kernel, as
// useRunningKernel does in the test binary; see TestMain.
const runningKernelEnv = "NODESPAWN_TEST_RUNNING_KERNEL"

// useRunningKernel makes the test's apply --root runs see this kernel, with
// its overlayfs, until the test ends: TestMain gives the others a kernel
// without it.
func useRunningKernel(t testing.TB) {
	t.Helper()
	k, err := probe.RunningKernel()
	if err != nil {
		t.Fatal(err)
	}
	if !k.Overlay {
		t.Skip("this kernel has no overlayfs")
	}
	t.Cleanup(probe.SetTestKernel(k))
}

// layerRoot is a test root whose probe finds overlayfs, and the manifest
// of the image tagged ref from layout with store (auto when "").
type layerRoot struct {
	t              testing.TB
	root, manifest string
}

func newLayerRoot(t testing.TB, layout, mirrorURL string) *layerRoot {
	t.Helper()
	work := t.TempDir()
	r := &layerRoot{t: t, root: filepath.Join(work, "root"), manifest: filepath.Join(work, "node.yaml")}
	t.Cleanup(func() { unmountUnder(t, work) })
	if err := os.MkdirAll(r.root, 0o755); err != nil {
		t.Fatal(err)
	}
	useRunningKernel(t)
	return r
}

func (r *layerRoot) use(layout, mirrorURL, ref, store string) {
	m := pipelineManifest(layout, mirrorURL, "")
	m = strings.Replace(m, "reference: v1", "reference: "+ref, 1)
	if store != "" {
		m = strings.Replace(m, "  rootfs:\n", "  rootfs:\n    store: "+store+"\n", 1)
	}
	if err := os.WriteFile(r.manifest, []byte(m), 0o600); err != nil {
		r.t.Fatal(err)
	}
}

func (r *layerRoot) apply(wantCode int, args ...string) (string, string) {
	r.t.Helper()
	code, out, errOut := cli(r.t, "", append([]string{"apply", "-f", r.manifest, "--root", r.root}, args...)...)
	if code != wantCode {
		r.t.Fatalf("apply %v: exit %d, want %d\n%s\n%s", args, code, wantCode, out, errOut)
	}
	return out, errOut
}

func (r *layerRoot) path(p string) string { return filepath.Join(r.root, p) }

// mounted is the layers the machine root's overlayfs mount stacks; nil
// when the root is not mounted.
func (r *layerRoot) mounted() []string {
	ok, super, err := layers.MountedAt(r.path("var/lib/machines/pipe"))
	if err != nil {
		r.t.Fatal(err)
	}
	if !ok {
		return nil
	}
	var dirs []string
	for _, o := range strings.Split(super, ",") {
		if v, ok := strings.CutPrefix(o, "lowerdir="); ok {
			dirs = append(dirs, strings.Split(v, ":")...)
		}
		if v, ok := strings.CutPrefix(o, "lowerdir+="); ok {
			dirs = append(dirs, v)
		}
	}
	if dirs == nil {
		dirs = []string{}
	}
	return dirs
}

func (r *layerRoot) storeSize() int {
	es, err := os.ReadDir(r.path("var/lib/nodespawn/layers/sha256"))
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		r.t.Fatal(err)
	}
	return len(es)
}

// TestLayerStoreRepeatedAndDeepImages: under the default store (auto), an
// image that repeats layers, and one of 128 layers, apply as overlayfs
// roots; where the kernel names a mount's layers in one page of options
// (forced here with NODESPAWN_OVERLAY_BY_PATH=1), the deep image is
// flattened before a layer is fetched, and with store: layers refused
// before a layer is fetched; the dry run says each.
func TestLayerStoreRepeatedAndDeepImages(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: the rootfs keeps the image's owners, overlayfs")
	}
	layout := filepath.Join(t.TempDir(), "layout")
	buildLayout(t, layout)
	_, srv := newMirror(t)
	a, b := layerTree(t, "a"), layerTree(t, "b")
	extendLayout(t, layout, "v1", "repeated", []string{a, b, a, b})
	var deep []string
	for i := range 127 {
		deep = append(deep, layerTree(t, fmt.Sprint(i+2)))
	}
	extendLayout(t, layout, "v1", "deep", deep)

	t.Run("repeated", func(t *testing.T) {
		r := newLayerRoot(t, layout, srv.URL)
		r.use(layout, srv.URL, "repeated", "")
		out, _ := r.apply(0, "--dry-run", "--layers")
		if !strings.Contains(out, "2 of the image's layers repeat") || !strings.Contains(out, "repeated") {
			t.Errorf("the dry run does not say the layers repeat:\n%s", out)
		}
		r.apply(0)
		if got := r.mounted(); len(got) != 3 {
			t.Fatalf("mounted with %d layers %v, want 3 (v1, a, b once each)", len(got), got)
		}
		for _, f := range []string{"layers/a", "layers/b", "etc/os-release"} {
			if _, err := os.Stat(r.path("var/lib/machines/pipe/" + f)); err != nil {
				t.Errorf("%s: %v", f, err)
			}
		}
		r.apply(0) // again: already applied, the mount seen as the record's
	})
	t.Run("deep", func(t *testing.T) {
		if !layers.KernelTakesLayerFDs() {
			t.Skip("this kernel's overlayfs does not take layers by descriptor")
		}
		r := newLayerRoot(t, layout, srv.URL)
		r.use(layout, srv.URL, "deep", "")
		r.apply(0)
		if got := r.mounted(); len(got) != 128 {
			t.Fatalf("mounted with %d layers, want 128", len(got))
		}
		if b, err := os.ReadFile(r.path("var/lib/machines/pipe/layers/128")); err != nil || string(b) != "128\n" {
			t.Fatalf("the top layer's file: %q %v", b, err)
		}
	})
	t.Run("deep by path under auto", func(t *testing.T) {
		t.Setenv(layers.ByPathEnv, "1")
		r := newLayerRoot(t, layout, srv.URL)
		r.use(layout, srv.URL, "deep", "")
		out, _ := r.apply(0, "--dry-run", "--layers")
		t.Logf("dry run, its last lines:\n%s", out[strings.LastIndex(out, "  128  "):])
		if !strings.Contains(out, "apply would flatten: 128 layers, this kernel mounts at most") {
			t.Errorf("the dry run does not say it would flatten:\n%s", out)
		}
		if !strings.Contains(out, "an image with more is flattened instead") {
			t.Errorf("the plan's image step does not say what happens to a deep image:\n%s", out)
		}
		_, errOut := r.apply(0)
		if !strings.Contains(errOut, "flattened instead of made of layers") {
			t.Errorf("apply did not say it flattened:\n%s", errOut)
		}
		if got := r.mounted(); got != nil {
			t.Fatalf("the root is mounted (%d layers), want a flattened tree", len(got))
		}
		if b, err := os.ReadFile(r.path("var/lib/machines/pipe/layers/128")); err != nil || string(b) != "128\n" {
			t.Fatalf("the flattened tree's top file: %q %v", b, err)
		}
		if n := r.storeSize(); n != 0 {
			t.Errorf("the layer store holds %d layers, want none fetched", n)
		}
		if _, err := os.Stat(r.path("var/lib/nodespawn/machines/pipe/overlay")); !errors.Is(err, fs.ErrNotExist) {
			t.Errorf("an overlay record for a flattened root: %v", err)
		}
	})
	t.Run("deep by path under store layers", func(t *testing.T) {
		t.Setenv(layers.ByPathEnv, "1")
		r := newLayerRoot(t, layout, srv.URL)
		r.use(layout, srv.URL, "deep", "layers")
		out, _ := r.apply(0, "--dry-run", "--layers")
		if !strings.Contains(out, "apply would refuse the image: 128 layers") {
			t.Errorf("the dry run does not say it would refuse:\n%s", out)
		}
		_, errOut := r.apply(1)
		if !strings.Contains(errOut, "128 layers") || !strings.Contains(errOut, "at most") || !strings.Contains(errOut, "store is layers") {
			t.Errorf("apply's error does not say why:\n%s", errOut)
		}
		if n := r.storeSize(); n != 0 {
			t.Errorf("the layer store holds %d layers, want none fetched", n)
		}
	})
}

// TestSwitchStoresInPlace: a machine moved from the layer store to a
// flattened tree (apply --force, store: flat), mounted or not, loses its
// overlay mount, record and directories and the mount unit an older
// nodespawn wrote; moved back, the flat tree goes and the overlay is
// mounted; reset leaves no mount, record or unit.
func TestSwitchStoresInPlace(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: the rootfs keeps the image's owners, overlayfs")
	}
	layout := filepath.Join(t.TempDir(), "layout")
	buildLayout(t, layout)
	_, srv := newMirror(t)
	for _, mounted := range []bool{true, false} {
		t.Run(fmt.Sprintf("mounted=%v", mounted), func(t *testing.T) {
			r := newLayerRoot(t, layout, srv.URL)
			overlay := r.path("var/lib/nodespawn/machines/pipe/overlay")
			unit := r.path("etc/systemd/system/var-lib-machines-pipe.mount")
			plantUnit := func() {
				if err := os.MkdirAll(filepath.Dir(unit), 0o755); err != nil {
					t.Fatal(err)
				}
				if err := os.WriteFile(unit, []byte("# Written by nodespawn; do not edit: the next apply rewrites it.\n[Mount]\nWhere=/var/lib/machines/pipe\n"), 0o644); err != nil {
					t.Fatal(err)
				}
			}
			gone := func(what, p string) {
				t.Helper()
				if _, err := os.Lstat(p); !errors.Is(err, fs.ErrNotExist) {
					t.Errorf("%s %s is still there (%v)", what, p, err)
				}
			}
			r.use(layout, srv.URL, "v1", "layers")
			r.apply(0)
			if r.mounted() == nil {
				t.Fatal("store layers: the root is not mounted")
			}
			plantUnit() // what an older nodespawn left
			if !mounted {
				unmountUnder(t, r.root) // a reboot without the service's mount, say
			}
			r.use(layout, srv.URL, "v1", "flat")
			r.apply(0, "--force")
			if got := r.mounted(); got != nil {
				t.Fatalf("store flat: still mounted (%v)", got)
			}
			gone("overlay record and directories", overlay)
			gone("the old mount unit", unit)
			if _, err := os.Stat(r.path("var/lib/machines/pipe/etc/os-release")); err != nil {
				t.Fatalf("no flat tree: %v", err)
			}

			r.use(layout, srv.URL, "v1", "layers")
			plantUnit()
			r.apply(0, "--force")
			if r.mounted() == nil {
				t.Fatal("back to store layers: the root is not mounted")
			}
			gone("the old mount unit", unit)
			gone("the flat tree's marker", r.path("var/lib/machines/.pipe.nodespawn-image"))

			plantUnit()
			if code, out, errOut := cli(t, "", "reset", "--yes", "--root", r.root); code != 0 {
				t.Fatalf("reset: exit %d\n%s\n%s", code, out, errOut)
			}
			if r.mounted() != nil {
				t.Error("reset left the root mounted")
			}
			gone("overlay record and directories", overlay)
			gone("the old mount unit", unit)
		})
	}
}

// appendRawLayer tags, in the OCI layout at layout, the image from with one
// more layer on top made of exactly the tar entries given (hand-made, not
// from a tree: imagebuild's layers always carry their directories).
func appendRawLayer(t *testing.T, layout, from, to string, files map[string]string) {
	t.Helper()
	ctx := context.Background()
	target, _, m := layoutImage(t, layout, from)
	push := func(mediaType string, b []byte) ocispec.Descriptor {
		d := content.NewDescriptorFromBytes(mediaType, b)
		if err := target.Push(ctx, d, bytes.NewReader(b)); err != nil && !errors.Is(err, errdef.ErrAlreadyExists) {
			t.Fatal(err)
		}
		return d
	}
	var cfg ocispec.Image
	fetchJSON(t, target, m.Config, &cfg)

	var tarball bytes.Buffer
	tw := tar.NewWriter(&tarball)
	for _, name := range slices.Sorted(maps.Keys(files)) {
		body := files[name]
		if err := tw.WriteHeader(&tar.Header{Name: name, Typeflag: tar.TypeReg, Mode: 0o644, Size: int64(len(body))}); err != nil {
			t.Fatal(err)
		}
		if _, err := tw.Write([]byte(body)); err != nil {
			t.Fatal(err)
		}
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	var gz bytes.Buffer
	zw := gzip.NewWriter(&gz)
	if _, err := zw.Write(tarball.Bytes()); err != nil {
		t.Fatal(err)
	}
	if err := zw.Close(); err != nil {
		t.Fatal(err)
	}
	cfg.RootFS.DiffIDs = append(cfg.RootFS.DiffIDs, digest.FromBytes(tarball.Bytes()))
	cfg.History = append(cfg.History, ocispec.History{CreatedBy: "appendRawLayer"})
	cb, err := json.Marshal(cfg)
	if err != nil {
		t.Fatal(err)
	}
	m.Config = push(ocispec.MediaTypeImageConfig, cb)
	m.Layers = append(m.Layers, push(ocispec.MediaTypeImageLayerGzip, gz.Bytes()))
	mb, err := json.Marshal(m)
	if err != nil {
		t.Fatal(err)
	}
	if err := target.Tag(ctx, push(ocispec.MediaTypeImageManifest, mb), to); err != nil {
		t.Fatal(err)
	}
}

// TestLayerStoreFlattensWhatItCannotShow: an image whose top layer fills a
// directory it has no entry for, over a lower layer's directory of mode
// 0700, cannot be shown by the layer store (unpacked on its own the layer
// has a plain 0755 directory there). Under store auto it is flattened,
// with the layers fetched for it collected; under store: layers refused.
func TestLayerStoreFlattensWhatItCannotShow(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: the rootfs keeps the image's owners, overlayfs")
	}
	layout := filepath.Join(t.TempDir(), "layout")
	buildLayout(t, layout)
	_, srv := newMirror(t)
	private := t.TempDir()
	if err := os.Mkdir(filepath.Join(private, "private"), 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(filepath.Join(private, "private"), 0o700); err != nil { // past the umask
		t.Fatal(err)
	}
	extendLayout(t, layout, "v1", "private", []string{private})
	appendRawLayer(t, layout, "private", "implicit", map[string]string{"private/f": "f\n"})

	t.Run("auto", func(t *testing.T) {
		r := newLayerRoot(t, layout, srv.URL)
		r.use(layout, srv.URL, "implicit", "")
		_, errOut := r.apply(0)
		if !strings.Contains(errOut, "flattened instead of made of layers") || !strings.Contains(errOut, "/private") {
			t.Errorf("apply did not say it flattened, and why:\n%s", errOut)
		}
		if got := r.mounted(); got != nil {
			t.Fatalf("the root is mounted (%d layers), want a flattened tree", len(got))
		}
		fi, err := os.Stat(r.path("var/lib/machines/pipe/private"))
		if err != nil || fi.Mode().Perm() != 0o700 {
			t.Fatalf("the flattened tree's /private: %v %v, want mode 0700 as the lower layer made it", fi, err)
		}
		if b, err := os.ReadFile(r.path("var/lib/machines/pipe/private/f")); err != nil || string(b) != "f\n" {
			t.Fatalf("the top layer's file: %q %v", b, err)
		}
		if n := r.storeSize(); n != 0 {
			t.Errorf("the layer store keeps %d layers fetched for nothing", n)
		}
		r.apply(0) // again: the flattened tree is what was applied
	})
	t.Run("store layers", func(t *testing.T) {
		r := newLayerRoot(t, layout, srv.URL)
		r.use(layout, srv.URL, "implicit", "layers")
		_, errOut := r.apply(1)
		if !strings.Contains(errOut, "needs machine.rootfs.store: flat") {
			t.Errorf("apply's error does not say why:\n%s", errOut)
		}
	})
}

// BenchmarkApplyLayerStoreUpgrade times whole `nodespawn apply --root`
// runs with store: layers on a real tree (NODESPAWN_BENCH_TREE, e.g. the
// e2e cache's machine-rootfs/*/rootfs; skipped without it), packed as one
// layer (image A) with a small layer on top for image B: the first apply of
// A into an empty store, the full apply of B into another empty store, and
// B applied (--force, in place: a --root tree has no machine pair) over
// A's, where only B's top layer is fetched. It reports the upgrade's speed
// up over the full apply of the same image.
func BenchmarkApplyLayerStoreUpgrade(b *testing.B) {
	tree := os.Getenv("NODESPAWN_BENCH_TREE")
	if os.Geteuid() != 0 || tree == "" {
		b.Skip("needs root and NODESPAWN_BENCH_TREE, a real distribution tree")
	}
	layout := filepath.Join(b.TempDir(), "layout")
	target, err := imagebuild.Layout(layout)
	if err != nil {
		b.Fatal(err)
	}
	if _, err := imagebuild.Build(context.Background(), tree, target, "v1", imagebuild.Options{Platform: "linux/" + runtime.GOARCH}); err != nil {
		b.Fatal(err)
	}
	top := b.TempDir()
	if err := os.MkdirAll(filepath.Join(top, "etc"), 0o755); err != nil {
		b.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(top, "etc/nodespawn-bench"), []byte("b\n"), 0o644); err != nil {
		b.Fatal(err)
	}
	extendLayout(b, layout, "v1", "v2", []string{top})
	_, srv := newMirror(b)
	timed := func(r *layerRoot, args ...string) time.Duration {
		start := time.Now()
		r.apply(0, args...)
		return time.Since(start)
	}
	var first, full, upgrade time.Duration
	for b.Loop() {
		a := newLayerRoot(b, layout, srv.URL)
		a.use(layout, srv.URL, "v1", "layers")
		first += timed(a)
		a.use(layout, srv.URL, "v2", "layers")
		upgrade += timed(a, "--force")
		c := newLayerRoot(b, layout, srv.URL)
		c.use(layout, srv.URL, "v2", "layers")
		full += timed(c)
		unmountUnder(b, filepath.Dir(a.root))
		unmountUnder(b, filepath.Dir(c.root))
	}
	n := float64(b.N)
	b.ReportMetric(first.Seconds()/n, "s/first-apply")
	b.ReportMetric(full.Seconds()/n, "s/full-apply-B")
	b.ReportMetric(upgrade.Seconds()/n, "s/upgrade-apply")
	b.ReportMetric(full.Seconds()/upgrade.Seconds(), "x-upgrade-speedup")
}
