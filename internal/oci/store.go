package oci

import (
	"archive/tar"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"path"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/nodespawn/nodespawn/internal/archive"
	"github.com/nodespawn/nodespawn/internal/confine"
	"github.com/nodespawn/nodespawn/internal/httpx"
	"github.com/nodespawn/nodespawn/internal/layers"
)

// PullLayers puts every layer of the image req names (for req.Platform)
// into store, each unpacked on its own in overlayfs's format: layers the
// store already has are neither fetched nor unpacked, the others are
// fetched and unpacked in parallel (req.Concurrency at once), each
// streaming through size, digest, decompression and DiffID checks into
// its own staging directory, and committed whole or not at all, all of
// them with one sync. What they unpack, together, is bounded by
// req.MaxUnpacked and the free space of the store's filesystem less
// req.MinFree (measured here, once). req.Dest is
// not used: layers.Store.Compose makes a root of them. Result.DiffIDs are
// the image's layers, bottom first; Fetched and FetchedBytes what this
// call fetched.
func PullLayers(ctx context.Context, req Request, store *layers.Store) (Result, error) {
	req.Root, req.Dest = store.Root(), ""
	src, img, res, err := inspect(ctx, &req)
	if err != nil {
		return res, err
	}
	log := req.Log
	if log == nil {
		log = slog.Default()
	}
	// Which layers the store lacks; a layer listed twice is fetched once.
	var todo []int
	seen := map[digest.Digest]bool{}
	for i, id := range res.DiffIDs {
		have, err := store.Has(id)
		if err != nil {
			return res, err
		}
		if !have && !seen[id] {
			todo = append(todo, i)
		}
		seen[id] = true
	}
	log.Info("image layers", "reference", src.name, "manifest", res.ManifestDigest, "layers", res.Layers,
		"present", res.Layers-len(todo), "fetch", len(todo))

	start := time.Now()
	u := unpacker{src: src, root: store.Root(), layers: img.manifest.Layers, diffIDs: res.DiffIDs,
		retry: httpx.PolicyOf(req.HTTPClient), log: log}
	if len(todo) > 0 {
		if u.limit, err = newUnpackLimit(&req, store.Root(), store.Dir(), "image "+src.name+": layer store"); err != nil {
			return res, err
		}
	}
	var mu sync.Mutex
	report := func(p Progress) {
		if req.Progress != nil {
			mu.Lock()
			defer mu.Unlock()
			req.Progress(p)
		}
	}
	// Every missing layer is fetched and unpacked into its own staging
	// directory, req.Concurrency at once, and the store commits them
	// together with one sync (layers.Store.UnpackAll).
	_, err = store.UnpackAll(ctx, res.DiffIDs, req.Concurrency, func(ctx context.Context, i int, dir string) ([]byte, error) {
		desc, id := img.manifest.Layers[i], res.DiffIDs[i]
		// The note: the directories the layer's entries need that it has
		// no entry of its own for (checkThroughSymlinks).
		names := &layerNames{}
		if err := u.fetchUnpack(ctx, i, desc, id, dir, report, names.saw); err != nil {
			return nil, fmt.Errorf("image %s: layer %d/%d %s: %w", src.name, i+1, len(img.manifest.Layers), desc.Digest, err)
		}
		mu.Lock()
		res.Fetched++
		res.FetchedBytes += desc.Size
		mu.Unlock()
		return names.note(), nil
	})
	if err != nil {
		return res, err
	}
	if err := checkThroughSymlinks(store, res.DiffIDs); err != nil {
		return res, fmt.Errorf("image %s: %w", src.name, err)
	}
	if len(todo) > 0 {
		log.Info("image layers unpacked into the layer store", "reference", src.name, "manifest", res.ManifestDigest,
			"fetched", res.Fetched, "bytes", res.FetchedBytes, "layers", res.Layers, "duration", time.Since(start).Round(time.Millisecond))
	} else {
		res.NoOp = true
	}
	return res, nil
}

// fetchUnpack streams layer i from the source through a pipe into dir:
// the fetch verifies size and digest (and resumes a broken body), the
// unpack decompresses, applies and checks the DiffID.
func (u *unpacker) fetchUnpack(ctx context.Context, i int, desc ocispec.Descriptor, id digest.Digest, dir string, report func(Progress), saw func(*tar.Header)) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	pr, pw := io.Pipe()
	fetched := make(chan error, 1)
	go func() {
		err := u.fetchBlob(ctx, desc, pw)
		pw.CloseWithError(err) // nil: the reader sees EOF only after the digest matched
		fetched <- err
	}()
	compressed := &progressReader{r: pr, fn: report, p: Progress{Layer: i, Layers: len(u.layers), Digest: desc.Digest, Size: desc.Size}}
	err := unpackLayer(ctx, u.root, dir, desc, id, compressed, u.limit, archive.Options{Overlay: true,
		Filter: func(h *tar.Header) (bool, error) { saw(h); return true, nil }})
	if err != nil {
		cancel()
		pr.CloseWithError(err)
	}
	ferr := <-fetched
	switch {
	case ferr != nil && (err == nil || !errors.Is(ferr, context.Canceled)):
		return ferr // the fetch failed on its own: it says more than the reader's view of it
	case err != nil:
		return err
	}
	p := compressed.p
	p.Done = true
	report(p)
	return nil
}

// layerNames collects a layer's entry names as it unpacks.
type layerNames struct {
	dirs, parents map[string]bool
}

func (n *layerNames) saw(h *tar.Header) {
	if n.dirs == nil {
		n.dirs, n.parents = map[string]bool{}, map[string]bool{}
	}
	name := confine.Clean(h.Name)
	if h.Typeflag == tar.TypeDir {
		n.dirs[name] = true
	}
	for d := path.Dir(name); d != "." && d != "/" && d != ""; d = path.Dir(d) {
		n.parents[d] = true
	}
}

// note lists, one per line, the parent directories the layer's entries
// have that the layer has no directory entry for, itself or above them
// (below a directory entry the layer's own tree replaces what lower layers
// had); nil when there are none, as in every layer made by diffing trees.
func (n *layerNames) note() []byte {
	var out []string
dirs:
	for d := range n.parents {
		for a := d; a != "." && a != "/"; a = path.Dir(a) {
			if n.dirs[a] {
				continue dirs
			}
		}
		out = append(out, d)
	}
	if len(out) == 0 {
		return nil
	}
	slices.Sort(out)
	return []byte(strings.Join(out, "\n") + "\n")
}

// checkThroughSymlinks refuses an image a layer store cannot show as its
// author meant: one whose layer puts entries below a path that a lower
// layer made a symlink (bin/tool over bin -> usr/bin). Applied in order
// onto one tree, the entry goes through the symlink; unpacked on its own
// the layer has a directory there, and overlayfs would show that directory
// instead of the symlink. Layers built by diffing trees never do this
// (the diff records usr/bin/tool); hand-made tars can. Every layer of the
// image is checked, the ones already in the store too, from the note
// PullLayers kept of it: a layer is checked against this image's lower
// layers, whichever image brought it.
func checkThroughSymlinks(store *layers.Store, ids []digest.Digest) error {
	trees := map[int]*confine.Root{}
	defer func() {
		for _, t := range trees {
			t.Close()
		}
	}()
	tree := func(j int) (*confine.Root, error) {
		if trees[j] == nil {
			t, err := store.Root().OpenRoot(store.Path(ids[j]))
			if err != nil {
				return nil, err
			}
			trees[j] = t
		}
		return trees[j], nil
	}
	for i := 1; i < len(ids); i++ {
		note, err := store.Note(ids[i])
		if err != nil || note == nil {
			if err != nil {
				return err
			}
			continue
		}
		for _, d := range strings.Fields(string(note)) {
			// The topmost lower layer with anything at d decides what d is.
			for j := i - 1; j >= 0; j-- {
				t, err := tree(j)
				if err != nil {
					return err
				}
				fi, err := t.Lstat(d)
				if err != nil {
					continue
				}
				if fi.Mode()&fs.ModeSymlink != 0 {
					return fmt.Errorf("layer %d puts entries below %s, which layer %d made a symlink; unpacked on their own the layers cannot show that, so this image needs machine.rootfs.store: flat (or rebuild it with the entries at their real paths)",
						i+1, d, j+1)
				}
				break
			}
		}
	}
	return nil
}

// LayerInfo is one layer of an image: its blob and what it unpacks to.
type LayerInfo struct {
	Digest digest.Digest
	DiffID digest.Digest
	Size   int64
}

// Inspect resolves the image req names (for req.Platform) and reads its
// config, fetching nothing else: the layers, bottom first, for a plan that
// says which of them a layer store lacks. req.Root and req.Dest are not
// used.
func Inspect(ctx context.Context, req Request) (Result, []LayerInfo, error) {
	req.Root, req.Dest = nil, ""
	_, img, res, err := inspect(ctx, &req)
	if err != nil {
		return res, nil, err
	}
	var out []LayerInfo
	for i, l := range img.manifest.Layers {
		out = append(out, LayerInfo{Digest: l.Digest, DiffID: res.DiffIDs[i], Size: l.Size})
	}
	return res, out, nil
}

// inspect validates req (filling its defaults), resolves the image and
// fetches and checks its config.
func inspect(ctx context.Context, req *Request) (*source, image, Result, error) {
	if err := req.validateSource(); err != nil {
		return nil, image{}, Result{}, err
	}
	plat, err := ParsePlatform(req.Platform)
	if err != nil {
		return nil, image{}, Result{}, err
	}
	src, err := openSource(ctx, *req)
	if err != nil {
		return nil, image{}, Result{}, err
	}
	res := Result{Reference: src.name}
	img, err := resolve(ctx, src, plat)
	if err != nil {
		return nil, image{}, res, err
	}
	res.ManifestDigest = img.manifestDesc.Digest
	res.IndexDigest = img.indexDigest
	res.ConfigDigest = img.manifest.Config.Digest
	res.Layers = len(img.manifest.Layers)
	for _, l := range img.manifest.Layers {
		res.Bytes += l.Size
	}
	cfg, err := fetchConfig(ctx, src, img.manifest.Config, plat)
	if err != nil {
		return nil, image{}, res, err
	}
	if got, want := len(cfg.RootFS.DiffIDs), len(img.manifest.Layers); got != want {
		return nil, image{}, res, fmt.Errorf("image %s: config %s lists %d diff_ids for %d layers; the image is malformed, rebuild or repush it",
			src.name, img.manifest.Config.Digest, got, want)
	}
	res.DiffIDs = cfg.RootFS.DiffIDs
	for i, id := range res.DiffIDs {
		if err := id.Validate(); err != nil {
			return nil, image{}, res, fmt.Errorf("image %s: config %s: diff_id %d %q: %w", src.name, img.manifest.Config.Digest, i+1, id, err)
		}
	}
	return src, img, res, nil
}
