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
	"syscall"
	"time"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"golang.org/x/sys/unix"

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
		// no entry of its own for (checkImplicitDirs).
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
	if err := checkImplicitDirs(store, res.DiffIDs); err != nil {
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
	dirs, parents, whited map[string]bool
}

func (n *layerNames) saw(h *tar.Header) {
	if n.dirs == nil {
		n.dirs, n.parents, n.whited = map[string]bool{}, map[string]bool{}, map[string]bool{}
	}
	name := confine.Clean(h.Name)
	if h.Typeflag == tar.TypeDir {
		n.dirs[name] = true
	}
	if base := path.Base(name); strings.HasPrefix(base, ".wh.") {
		// A whiteout before the layer's own entries there: both stores
		// start afresh at the path (archive's reopen). After them it hides
		// nothing of the layer's own, and the lower entry stays.
		if t := path.Join(path.Dir(name), strings.TrimPrefix(base, ".wh.")); !n.parents[t] && !n.dirs[t] {
			n.whited[t] = true
		}
	}
	for d := path.Dir(name); d != "." && d != "/" && d != ""; d = path.Dir(d) {
		n.parents[d] = true
	}
}

// note lists, one per line, the parent directories the layer's entries
// have that the layer has no directory entry for (nor a whiteout: then
// the lower layers' entry is gone in both stores); nil when there are
// none, as in every layer made by diffing trees. Unpacked on its own the
// layer has such a directory all the same (made as containerd makes a
// missing parent: mode 0755, owned by root), and overlayfs shows it, its
// mode and owner, over whatever lower layers have there
// (checkImplicitDirs).
func (n *layerNames) note() []byte {
	var out []string
	for d := range n.parents {
		if !n.dirs[d] && !n.whited[d] {
			out = append(out, d)
		}
	}
	if len(out) == 0 {
		return nil
	}
	slices.Sort(out)
	return []byte(strings.Join(out, "\n") + "\n")
}

// StoreError is an image the layer store cannot show as the flattened
// pull makes it, though the flattened pull takes it: a layer with no
// directory entry for a directory it puts entries in, over a lower
// layer's directory of another mode, owner or xattrs. The layers stay in
// the store (Collect removes them when no machine uses them); the image
// needs machine.rootfs.store: flat.
type StoreError struct {
	Layer, Lower int
	Dir          string
	Has          string // what the lower layer's directory is: mode, owner, xattrs
}

func (e *StoreError) Error() string {
	return fmt.Sprintf("layer %d puts entries in /%s but has no directory entry for it, and layer %d has /%s as a directory with %s: "+
		"unpacked on its own the layer has a plain one there (mode 0755, owner 0:0), which overlayfs would show instead, "+
		"so this image needs machine.rootfs.store: flat (or rebuild the layer with its directory entries, as tools that diff trees do)",
		e.Layer, e.Dir, e.Lower, e.Dir, e.Has)
}

// checkImplicitDirs refuses an image a layer store cannot show as the
// flattened pull (every layer applied in order onto one tree) makes it:
// one whose layer has a directory it has no entry for (the note) where
// the layers below show a symlink or another non-directory (applied in
// order, the entries go through the link; archive.BelowLowerError, which
// the flattened pull gives too), or a directory that differs from the
// plain one the layer has (StoreError). Layers built by diffing trees
// never do this (they carry every parent's entry); hand-made tars can.
// Every layer of the image is checked, the ones already in the store too,
// from the note PullLayers kept of it: a layer is checked against this
// image's lower layers, whichever image brought it.
func checkImplicitDirs(store *layers.Store, ids []digest.Digest) error {
	c := &lowerView{store: store, ids: ids, trees: map[int]*confine.Root{}}
	defer c.close()
	for i := 1; i < len(ids); i++ {
		note, err := store.Note(ids[i])
		if err != nil {
			return err
		}
		for _, d := range strings.Fields(string(note)) {
			own, err := c.tree(i)
			if err != nil {
				return err
			}
			// The layer's own tree decides first: an opaque directory
			// above d hides what is below, an entry that replaced d
			// after its children makes d no implicit directory.
			if hidden, err := c.hidden(i, d); err != nil || hidden {
				if err != nil {
					return err
				}
				continue
			}
			mine, err := own.Lstat(d)
			if err != nil || !mine.IsDir() {
				if err != nil && !errors.Is(err, fs.ErrNotExist) {
					return err
				}
				continue
			}
			j, fi, err := c.at(i, d)
			switch {
			case err != nil:
				return err
			case fi == nil:
				continue
			case !fi.IsDir():
				return &archive.BelowLowerError{Layer: i + 1, Lower: j + 1, Dir: d, Kind: archive.KindOf(fi.Mode())}
			}
			if has, err := c.differs(j, d, fi, mine); err != nil || has != "" {
				if err != nil {
					return err
				}
				return &StoreError{Layer: i + 1, Lower: j + 1, Dir: d, Has: has}
			}
		}
	}
	return nil
}

// lowerView looks paths up in an image's layers as overlayfs stacks them.
type lowerView struct {
	store *layers.Store
	ids   []digest.Digest
	trees map[int]*confine.Root
}

func (c *lowerView) close() {
	for _, t := range c.trees {
		t.Close()
	}
}

func (c *lowerView) tree(j int) (*confine.Root, error) {
	if c.trees[j] == nil {
		t, err := c.store.Root().OpenRoot(c.store.Path(c.ids[j]))
		if err != nil {
			return nil, err
		}
		c.trees[j] = t
	}
	return c.trees[j], nil
}

// opaque reports whether layer j marks its directory p opaque ("" the
// layer's root).
func (c *lowerView) opaque(j int, p string) (bool, error) {
	t, err := c.tree(j)
	if err != nil {
		return false, err
	}
	var opaque bool
	err = t.InDir("/"+p, func(dir string) error {
		b := make([]byte, 2)
		n, err := unix.Lgetxattr(dir+"/.", "trusted.overlay.opaque", b)
		opaque = err == nil && string(b[:n]) == "y"
		return nil
	})
	return opaque, err
}

// hidden reports whether layer i has an opaque directory above d (its
// root included), which hides whatever lower layers have at d.
func (c *lowerView) hidden(i int, d string) (bool, error) {
	for p := path.Dir(d); ; p = path.Dir(p) {
		if p == "." {
			p = ""
		}
		if o, err := c.opaque(i, p); err != nil || o {
			return o, err
		}
		if p == "" {
			return false, nil
		}
	}
}

// at returns what layers 1..i (0-based, below i) stacked show at d and
// the layer it comes from; a nil FileInfo when nothing is there.
func (c *lowerView) at(i int, d string) (int, fs.FileInfo, error) {
	var active []int
	for j := i - 1; j >= 0; j-- {
		active = append(active, j)
		if o, err := c.opaque(j, ""); err != nil || o {
			if err != nil {
				return 0, nil, err
			}
			break
		}
	}
	elems := strings.Split(d, "/")
	for e := 1; e <= len(elems); e++ {
		p := strings.Join(elems[:e], "/")
		var next []int
		for _, j := range active {
			t, err := c.tree(j)
			if err != nil {
				return 0, nil, err
			}
			fi, err := t.Lstat(p)
			if errors.Is(err, fs.ErrNotExist) {
				continue
			}
			if err != nil {
				return 0, nil, err
			}
			if st, ok := fi.Sys().(*syscall.Stat_t); ok && fi.Mode()&fs.ModeCharDevice != 0 && st.Rdev == 0 {
				break // a whiteout: nothing below it
			}
			if !fi.IsDir() {
				if len(next) == 0 && e == len(elems) {
					return j, fi, nil
				}
				break
			}
			if e == len(elems) {
				return j, fi, nil // the topmost directory gives the merged one's mode and owner
			}
			next = append(next, j)
			if o, err := c.opaque(j, p); err != nil || o {
				if err != nil {
					return 0, nil, err
				}
				break
			}
		}
		if len(next) == 0 {
			return 0, nil, nil
		}
		active = next
	}
	return 0, nil, nil
}

// differs says how layer j's directory d (fi) differs from mine, the
// plain directory a layer has where it has no entry of its own: mode,
// owner and xattrs (overlayfs's own aside), "" when it does not.
func (c *lowerView) differs(j int, d string, fi, mine fs.FileInfo) (string, error) {
	uid, gid := confine.Owner(fi)
	muid, mgid := confine.Owner(mine)
	var has []string
	if confine.ModeOf(fi) != confine.ModeOf(mine) || uid != muid || gid != mgid {
		mode := uint32(fi.Mode().Perm())
		if st, ok := fi.Sys().(*syscall.Stat_t); ok {
			mode = st.Mode & 0o7777
		}
		has = append(has, fmt.Sprintf("mode %04o, owner %d:%d", mode, uid, gid))
	}
	t, err := c.tree(j)
	if err != nil {
		return "", err
	}
	err = t.InDir("/"+d, func(dir string) error {
		names, err := xattrNames(dir + "/.")
		for _, n := range names {
			if !strings.HasPrefix(n, "trusted.overlay.") {
				has = append(has, "xattr "+n)
			}
		}
		return err
	})
	return strings.Join(has, ", "), err
}

// xattrNames lists the extended attributes of p (not followed).
func xattrNames(p string) ([]string, error) {
	sz, err := unix.Llistxattr(p, nil)
	if err != nil || sz == 0 {
		return nil, err
	}
	buf := make([]byte, sz)
	n, err := unix.Llistxattr(p, buf)
	if err != nil {
		return nil, err
	}
	var out []string
	for _, s := range strings.Split(string(buf[:n]), "\x00") {
		if s != "" {
			out = append(out, s)
		}
	}
	return out, nil
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
