package oci

import (
	"context"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"golang.org/x/sys/unix"

	"github.com/nodespawn/nodespawn/internal/confine/confinetest"
	"github.com/nodespawn/nodespawn/internal/layers"
	"github.com/nodespawn/nodespawn/internal/registrytest"
)

// blobCounter counts the layer blobs a client fetches from a registry.
type blobCounter struct {
	mu    sync.Mutex
	blobs map[string]int
	rt    http.RoundTripper
}

func (c *blobCounter) RoundTrip(req *http.Request) (*http.Response, error) {
	if i := strings.Index(req.URL.Path, "/blobs/"); i >= 0 && req.Method == http.MethodGet {
		c.mu.Lock()
		c.blobs[req.URL.Path[i+len("/blobs/"):]]++
		c.mu.Unlock()
	}
	return c.rt.RoundTrip(req)
}

func (c *blobCounter) fetched(d digest.Digest) int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.blobs[d.String()]
}

// storeMachine composes a root named name in base from res.
func storeMachine(t *testing.T, s *layers.Store, base, name string, res Result) string {
	t.Helper()
	m := layers.Machine{
		Target: filepath.Join(base, "machines", name), Dir: filepath.Join(base, "state", name),
		Unit: filepath.Join(base, "units", name+".mount"), Machine: name,
	}
	t.Cleanup(func() {
		if err := layers.Unmount(context.Background(), s.Root(), m.Target, 10*time.Second, testLogger(t)); err != nil {
			t.Errorf("cleanup: %v", err)
		}
	})
	if _, err := s.Compose(context.Background(), m, layers.Image{Source: res.Reference, Platform: "linux/amd64", Manifest: res.ManifestDigest, Layers: res.DiffIDs}, testLogger(t)); err != nil {
		t.Fatalf("Compose %s: %v", name, err)
	}
	return m.Target
}

// TestPullLayersFeatures pulls the feature image into the store, mounts it
// and checks the merged tree is what the flattened pull makes; then an
// image that differs in one layer fetches that one layer only.
func TestPullLayersFeatures(t *testing.T) {
	requireRoot(t)
	ctx := context.Background()
	reg := registrytest.Start(t)
	repo := pushRepo(t, reg.Addr, "nodespawn/base")
	// The feature image, and one whose third layer names usr/bin/tool
	// through layer 1's bin -> usr/bin, with no bin/ entry of its own:
	// both stores refuse that (checked below; TestStoresAgree has more).
	ls := featureLayers(t)
	through := slices.Clone(ls)
	through[2] = compressLayer(t, ocispec.MediaTypeImageLayer, mkTar(t,
		file("etc/passwd", "root:x:0:0::/root:/bin/bash\n", 0o644),
		file("bin/tool", "through the bin symlink", 0o755),
	))
	pushImage(t, ctx, repo, "through", imageSpec{platform: linuxAMD64, layers: through})
	desc := pushImage(t, ctx, repo, "v1", imageSpec{platform: linuxAMD64, layers: ls})
	changed := compressLayer(t, ocispec.MediaTypeImageLayerGzip, mkTar(t,
		file("etc/passwd", "root:x:0:0::/root:/bin/zsh\n", 0o644),
		file("usr/bin/tool", "tool", 0o755),
	))
	pushImage(t, ctx, repo, "v2", imageSpec{platform: linuxAMD64, layers: []layer{ls[0], ls[1], changed}})

	base := t.TempDir()
	store, err := layers.Open(confinetest.HostRoot(t), filepath.Join(base, "layers"))
	if err != nil {
		t.Fatal(err)
	}
	count := &blobCounter{blobs: map[string]int{}, rt: http.DefaultTransport}
	req := func(tag string) Request {
		return Request{Reference: reg.Addr + "/nodespawn/base:" + tag, Platform: "linux/amd64", PlainHTTP: []string{reg.Addr},
			Log: testLogger(t), HTTPClient: &http.Client{Transport: count}}
	}
	var mu sync.Mutex
	done := 0
	r1 := req("v1")
	r1.Progress = func(p Progress) {
		mu.Lock()
		defer mu.Unlock()
		if p.Done {
			done++
		}
	}
	res, err := PullLayers(ctx, r1, store)
	if err != nil {
		t.Fatalf("PullLayers: %v", err)
	}
	if res.ManifestDigest != desc.Digest || res.Layers != 3 || res.Fetched != 3 || len(res.DiffIDs) != 3 || done != 3 {
		t.Fatalf("result %+v, %d layers reported done; want manifest %s, 3 layers fetched", res, done, desc.Digest)
	}
	checkFeatureRootfs(t, storeMachine(t, store, base, "kube1", res))
	// The second layer's whiteouts, as overlayfs reads them: a 0/0
	// character device for .wh.a, the opaque xattr on opq.
	l2 := store.Path(res.DiffIDs[1])
	var st unix.Stat_t
	if err := unix.Lstat(filepath.Join(l2, "old/a"), &st); err != nil || st.Mode&unix.S_IFMT != unix.S_IFCHR || st.Rdev != 0 {
		t.Errorf("old/a in layer 2: mode %o rdev %d (%v), want a 0/0 character device", st.Mode, st.Rdev, err)
	}
	if _, err := os.Lstat(filepath.Join(l2, "old/.wh.a")); !os.IsNotExist(err) {
		t.Errorf("the whiteout entry itself was unpacked: %v", err)
	}
	buf := make([]byte, 8)
	if n, err := unix.Lgetxattr(filepath.Join(l2, "opq"), "trusted.overlay.opaque", buf); err != nil || string(buf[:n]) != "y" {
		t.Errorf("opq in layer 2: trusted.overlay.opaque = %q (%v), want y", buf[:max(n, 0)], err)
	}

	// Again: nothing fetched.
	again, err := PullLayers(ctx, req("v1"), store)
	if err != nil || again.Fetched != 0 || !again.NoOp {
		t.Fatalf("second PullLayers: %+v %v, want nothing fetched", again, err)
	}
	for _, l := range ls {
		if n := count.fetched(digest.FromBytes(l.blob)); n != 1 {
			t.Errorf("layer %s fetched %d times, want once", digest.FromBytes(l.blob), n)
		}
	}

	// v2 shares the first two layers: only the third is fetched.
	res2, err := PullLayers(ctx, req("v2"), store)
	if err != nil {
		t.Fatalf("PullLayers v2: %v", err)
	}
	if res2.Fetched != 1 || res2.FetchedBytes != int64(len(changed.blob)) || count.fetched(digest.FromBytes(changed.blob)) != 1 {
		t.Fatalf("v2: %+v, changed layer fetched %d times; want exactly the changed layer", res2, count.fetched(digest.FromBytes(changed.blob)))
	}
	for _, l := range ls[:2] {
		if n := count.fetched(digest.FromBytes(l.blob)); n != 1 {
			t.Errorf("shared layer %s fetched %d times in all, want once", digest.FromBytes(l.blob), n)
		}
	}
	kube2 := storeMachine(t, store, base, "kube2", res2)
	if b, err := os.ReadFile(filepath.Join(kube2, "etc/passwd")); err != nil || string(b) != "root:x:0:0::/root:/bin/zsh\n" {
		t.Errorf("kube2 etc/passwd = %q (%v)", b, err)
	}
	// Both machines share the store; the first still sees its own image.
	checkFeatureRootfs(t, filepath.Join(base, "machines", "kube1"))
	ids, _ := store.List()
	if len(ids) != 4 {
		t.Errorf("store holds %d layers, want 4", len(ids))
	}

	// The image whose third layer writes bin/tool through layer 1's bin ->
	// usr/bin: refused, saying why and what to do; the flattened pull
	// refuses it alike.
	const refusal = "below /bin, which layer 1 made a symlink, and has no directory entry of its own for /bin"
	flat := req("through")
	flat.Root, flat.Dest = confinetest.HostRoot(t), filepath.Join(base, "flat", "through")
	if _, err := Pull(ctx, flat); err == nil || !strings.Contains(err.Error(), strings.Replace(refusal, "layer 1", "a lower layer", 1)) {
		t.Errorf("Pull of an image writing through a symlink: %v", err)
	}
	for try := 1; try <= 2; try++ {
		// Again: its layers are in the store by now; it is refused all the same.
		_, err = PullLayers(ctx, req("through"), store)
		if err == nil || !strings.Contains(err.Error(), refusal) || !strings.Contains(err.Error(), "rebuild the layer") {
			t.Fatalf("PullLayers of an image writing through a symlink (try %d): %v", try, err)
		}
	}
}

// TestPullLayersVerifies: a layer whose content does not match its
// DiffID, or that sets overlayfs's own xattrs, leaves nothing in the store.
func TestPullLayersVerifies(t *testing.T) {
	requireRoot(t)
	ctx := context.Background()
	redirect := file("etc/x", "x", 0o644)
	redirect.hdr.PAXRecords = map[string]string{"SCHILY.xattr.trusted.overlay.redirect": "/etc/shadow"}
	good := compressLayer(t, ocispec.MediaTypeImageLayerGzip, mkTar(t, file("etc/ok", "ok", 0o644)))
	for _, c := range []struct {
		name string
		spec imageSpec
		want string
	}{
		{"wrong diff_id", imageSpec{platform: linuxAMD64, layers: []layer{good, compressLayer(t, ocispec.MediaTypeImageLayerGzip, mkTar(t, file("a", "a", 0o644)))},
			diffIDs: []digest.Digest{good.diffID, digest.FromString("not it")}}, "diff_id"},
		{"overlay xattr", imageSpec{platform: linuxAMD64, layers: []layer{good, compressLayer(t, ocispec.MediaTypeImageLayerGzip, mkTar(t, redirect))}}, "trusted.overlay.redirect"},
	} {
		t.Run(c.name, func(t *testing.T) {
			base := t.TempDir()
			layout := filepath.Join(base, "layout")
			pushImage(t, ctx, layoutStore(t, layout), "bad", c.spec)
			store, err := layers.Open(confinetest.HostRoot(t), filepath.Join(base, "layers"))
			if err != nil {
				t.Fatal(err)
			}
			_, err = PullLayers(ctx, Request{Layout: layout, LayoutRef: "bad", Platform: "linux/amd64", Log: testLogger(t)}, store)
			if err == nil || !strings.Contains(err.Error(), c.want) {
				t.Fatalf("PullLayers: %v, want an error about %s", err, c.want)
			}
			es, _ := os.ReadDir(store.Dir())
			for _, e := range es {
				if e.Name() != "sha256" && e.Name() != "notes" && e.Name() != "stamps" {
					t.Errorf("store holds %s after a failed pull", e.Name())
				}
			}
			ids, _ := store.List()
			for _, id := range ids {
				if id != good.diffID {
					t.Errorf("store holds layer %s, want only the good one (if any)", id)
				}
			}
		})
	}
}

// TestHostileLayersStore runs the hostile corpus through the layer store:
// every layer unpacked on its own and the root mounted; nothing outside
// the store and the machine may change, whatever the pull's outcome.
func TestHostileLayersStore(t *testing.T) {
	requireRoot(t)
	for _, c := range hostileCases() {
		t.Run(c.name, func(t *testing.T) {
			ctx := context.Background()
			// Not t.TempDir: test names have commas, which overlayfs
			// options cannot carry.
			base, err := os.MkdirTemp("", "hostile-store-")
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { os.RemoveAll(base) })
			sentinel := filepath.Join(base, "sentinel")
			makeSentinel(t, sentinel)
			work := filepath.Join(base, "machines")
			if err := os.Mkdir(work, 0o700); err != nil {
				t.Fatal(err)
			}
			var ls []layer
			for _, es := range c.layers(sentinel) {
				ls = append(ls, compressLayer(t, ocispec.MediaTypeImageLayerGzip, mkTar(t, es...)))
			}
			layoutDir := filepath.Join(base, "layout")
			pushImage(t, ctx, layoutStore(t, layoutDir), "hostile", imageSpec{platform: linuxAMD64, layers: ls})
			outside := snapshot(t, base, "machines")

			store, err := layers.Open(confinetest.HostRoot(t), filepath.Join(work, "layers"))
			if err != nil {
				t.Fatal(err)
			}
			res, err := PullLayers(ctx, Request{Layout: layoutDir, LayoutRef: "hostile", Platform: "linux/amd64", Log: testLogger(t)}, store)
			if err == nil {
				root := storeMachine(t, store, work, "m", res)
				// The merged tree is what the flattened pull makes.
				if c.check != nil {
					c.check(t, root, sentinel)
				}
				// Write through the merged tree as apply would, by name.
				_ = os.WriteFile(filepath.Join(root, "probe"), []byte("x"), 0o644)
			}
			msg := fmt.Sprint(err)
			if len(msg) > 600 {
				msg = msg[:600] + "..."
			}
			t.Logf("pull: %s", msg)
			if diff := diffSnapshots(outside, snapshot(t, base, "machines")); diff != "" {
				t.Errorf("the pull changed things outside the store:\n%s", diff)
			}
			if err == nil && c.outcome == mustFail {
				t.Errorf("pull succeeded, want it to fail closed as the flattened pull does")
			}
			if err != nil {
				// Verified layers may stay (collected later); nothing half-made.
				es, _ := os.ReadDir(store.Dir())
				for _, e := range es {
					if e.Name() != "sha256" && e.Name() != "notes" && e.Name() != "stamps" {
						t.Errorf("store holds %s after a failed pull", e.Name())
					}
				}
			}
		})
	}
}

// TestWhiteoutSparesItsOwnLayer: a whiteout hides what lower layers have
// at its name, never the entry its own layer has there (OCI image spec);
// the flattened pull and the layer store agree, whatever the tar order.
func TestWhiteoutSparesItsOwnLayer(t *testing.T) {
	requireRoot(t)
	ctx := context.Background()
	base, err := os.MkdirTemp("", "whiteout-own-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(base) })
	lower := compressLayer(t, ocispec.MediaTypeImageLayerGzip, mkTar(t, file("a", "lower", 0o644), file("b", "lower", 0o644)))
	upper := compressLayer(t, ocispec.MediaTypeImageLayerGzip, mkTar(t,
		file("a", "own", 0o644), whiteout(".wh.a"), // the whiteout after its layer's own entry
		whiteout(".wh.b"), file("b", "own", 0o644), // and before it
	))
	layout := filepath.Join(base, "layout")
	pushImage(t, ctx, layoutStore(t, layout), "v1", imageSpec{platform: linuxAMD64, layers: []layer{lower, upper}})
	req := Request{Layout: layout, LayoutRef: "v1", Platform: "linux/amd64", Log: testLogger(t)}

	flat := filepath.Join(base, "machines", "flat")
	fr := req
	fr.Root, fr.Dest = confinetest.HostRoot(t), flat
	if _, err := Pull(ctx, fr); err != nil {
		t.Fatalf("Pull: %v", err)
	}
	store, err := layers.Open(confinetest.HostRoot(t), filepath.Join(base, "layers"))
	if err != nil {
		t.Fatal(err)
	}
	res, err := PullLayers(ctx, req, store)
	if err != nil {
		t.Fatalf("PullLayers: %v", err)
	}
	merged := storeMachine(t, store, base, "m", res)
	for _, root := range []string{flat, merged} {
		for _, name := range []string{"a", "b"} {
			if b, err := os.ReadFile(filepath.Join(root, name)); err != nil || string(b) != "own" {
				t.Errorf("%s/%s = %q (%v), want the upper layer's own entry", root, name, b, err)
			}
		}
	}
}
