// Package layers keeps image layers unpacked, each once, in a
// content-addressed store on the host, and composes machine roots from them
// with overlayfs: the image's layers are the read-only lower directories and
// a per-machine upper directory holds what the machine (and apply) writes.
// Two machines of one node share every layer their images share, so an
// upgrade fetches and unpacks only the layers that changed.
//
// The store never shows a layer that is not whole: a layer is unpacked into
// a staging directory, verified (the caller checks the DiffID as it
// unpacks), synced and only then renamed to its DiffID (the layers of one
// pull share one sync: UnpackAll). A layer is deleted
// by renaming it out of the way first, so a crash during collection leaves
// every name in the store a complete layer. Sweep removes what a crash
// left of either.
package layers

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"path"
	"slices"
	"strings"
	"sync"

	"github.com/opencontainers/go-digest"
	"golang.org/x/sync/errgroup"

	"github.com/nodespawn/nodespawn/internal/confine"
)

// Store is the layer store under a directory of the host root:
//
//	<dir>/sha256/<hex>     one layer's tree, in overlayfs's own format
//	                       (whiteouts as 0/0 character devices, opaque
//	                       directories marked by the trusted.overlay.opaque
//	                       xattr), whole whenever it has this name
//	<dir>/notes/<hex>      what the unpacker noted about the layer, if
//	                       anything (written before the layer's name)
//	<dir>/stamps/<hex>     the layer's top-level entries and note, for
//	                       Check (written before the layer's name)
//	<dir>/.unpack-<rand>   a layer being unpacked
//	<dir>/.trash-<rand>    a layer being deleted
type Store struct {
	root *confine.Root
	dir  string
}

const (
	unpackPrefix = ".unpack-"
	trashPrefix  = ".trash-"
)

// Open is the store at dir (a path in root), created (mode 0700) when
// missing.
func Open(root *confine.Root, dir string) (*Store, error) {
	dir = "/" + confine.Clean(dir)
	if err := root.MkdirAll(path.Join(dir, string(digest.SHA256)), 0o700, 0, 0); err != nil {
		return nil, fmt.Errorf("layer store: %w", err)
	}
	return &Store{root: root, dir: dir}, nil
}

// At is the store at dir (a path in root) as it is, created by nothing: for
// reading (Has, List) on a host a dry run must not change.
func At(root *confine.Root, dir string) *Store {
	return &Store{root: root, dir: "/" + confine.Clean(dir)}
}

// Root is the tree the store is in; Dir the store's path in it.
func (s *Store) Root() *confine.Root { return s.root }
func (s *Store) Dir() string         { return s.dir }

// Path is where the layer with DiffID id is (or would be), a path in the
// root.
func (s *Store) Path(id digest.Digest) string {
	return path.Join(s.dir, string(id.Algorithm()), id.Encoded())
}

// HostPath is Path as the host's kernel sees it (the root's own directory
// joined), for reading a layer's xattrs and naming it in overlayfs options.
func (s *Store) HostPath(id digest.Digest) string { return path.Join(s.root.Dir(), s.Path(id)) }

// Has reports whether the layer with DiffID id is in the store.
func (s *Store) Has(id digest.Digest) (bool, error) {
	if err := id.Validate(); err != nil {
		return false, fmt.Errorf("layer store: diff_id %q: %w", id, err)
	}
	if id.Algorithm() != digest.SHA256 {
		// List, InUse and Collect know sha256 directories only.
		return false, fmt.Errorf("layer store: diff_id %s: the store keeps sha256 diff_ids only; set machine.rootfs.store to flat for this image", id)
	}
	fi, err := s.root.Lstat(s.Path(id))
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return false, nil
	case err != nil:
		return false, fmt.Errorf("layer store: %w", err)
	case !fi.IsDir():
		return false, fmt.Errorf("layer store: %s is not a directory", s.root.Show(s.Path(id)))
	}
	return true, nil
}

// Unpack adds the layer with DiffID id: fill gets an empty staging
// directory (a path in the root) and must leave the layer's tree in it,
// verified against id, and may return a note about the layer (Note reads
// it back). It is UnpackAll of one layer; added is false when the layer
// was already there.
func (s *Store) Unpack(ctx context.Context, id digest.Digest, fill func(dir string) (note []byte, err error)) (added bool, err error) {
	got, err := s.UnpackAll(ctx, []digest.Digest{id}, 1, func(_ context.Context, _ int, dir string) ([]byte, error) { return fill(dir) })
	return len(got) > 0, err
}

// UnpackAll adds the layers ids names that the store lacks (a DiffID
// listed twice is unpacked once), at most concurrency of them at once:
// fill(ctx, i, dir) gets an empty staging directory (a path in the root)
// for ids[i] and must leave that layer's tree in it, verified against
// ids[i], and may return a note about the layer (Note reads it back). The
// first fill to fail cancels ctx for the others. It returns the DiffIDs
// it added, in the order of ids.
//
// The layers that filled are committed together, with one sync of the
// filesystem for all of them instead of one each (each syncfs writes back
// every dirty page of the filesystem, so per layer they serialize the
// parallel unpacks and write the same pages out again and again):
//
//  1. every layer is unpacked into its own staging directory (.unpack-*);
//  2. each filled layer's note is written (or a stale one removed), then
//     its stamp (Check compares the layer with it);
//  3. one syncfs: every note, stamp and staged tree is on disk;
//  4. each staged tree is renamed to its DiffID, in the order of ids;
//  5. the directory of names is synced.
//
// So a name in the store is always a whole layer whose files and note
// reached the disk before the name did; a crash anywhere leaves only
// staging directories and notes and stamps without a layer, which Sweep
// removes.
// The layers that filled are committed even when another failed (a rerun
// fetches only the rest), unless ctx itself was cancelled. A layer in the
// store already (another machine's, or one a concurrent unpack committed
// first) is kept as it is.
func (s *Store) UnpackAll(ctx context.Context, ids []digest.Digest, concurrency int, fill func(ctx context.Context, i int, dir string) (note []byte, err error)) (added []digest.Digest, err error) {
	type staged struct {
		i     int
		dir   string
		note  []byte
		ready bool // fill succeeded
	}
	var todo []*staged
	seen := map[digest.Digest]bool{}
	for i, id := range ids {
		if seen[id] {
			continue
		}
		seen[id] = true
		if have, err := s.Has(id); err != nil || have {
			if err != nil {
				return nil, err
			}
			continue
		}
		todo = append(todo, &staged{i: i})
	}
	if len(todo) == 0 {
		return nil, nil
	}
	defer func() {
		for _, st := range todo {
			if st.dir == "" {
				continue
			}
			if rerr := s.root.RemoveAll(st.dir); rerr != nil && err == nil {
				err = fmt.Errorf("layer store: remove staging directory: %w", rerr)
			}
		}
	}()
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(max(concurrency, 1))
	var mu sync.Mutex
	for _, st := range todo {
		if gctx.Err() != nil {
			break
		}
		g.Go(func() error {
			dir, err := s.root.MkdirTemp(s.dir, unpackPrefix, 0o755)
			if err != nil {
				return fmt.Errorf("layer store: %w", err)
			}
			mu.Lock()
			st.dir = dir
			mu.Unlock()
			note, err := fill(gctx, st.i, dir)
			if err != nil {
				return err
			}
			mu.Lock()
			st.note, st.ready = note, true
			mu.Unlock()
			return nil
		})
	}
	ferr := g.Wait()
	if err := ctx.Err(); err != nil {
		if ferr != nil {
			return nil, ferr
		}
		return nil, err
	}
	var ready []*staged
	for _, st := range todo {
		if st.ready {
			ready = append(ready, st)
		}
	}
	if len(ready) == 0 {
		return nil, ferr
	}
	for _, st := range ready {
		if err := s.writeNote(ids[st.i], st.note); err != nil {
			return nil, errors.Join(ferr, err)
		}
		if err := s.writeStamp(ids[st.i], st.dir, st.note); err != nil {
			return nil, errors.Join(ferr, err)
		}
	}
	// The layers' files and notes reach the disk before their names do: a
	// power cut after a rename finds the layer whole.
	if err := s.root.Syncfs(s.dir); err != nil {
		return nil, errors.Join(ferr, fmt.Errorf("layer store: %w", err))
	}
	for _, st := range ready {
		id := ids[st.i]
		err := s.root.RenameNoReplace(st.dir, s.Path(id))
		if errors.Is(err, fs.ErrExist) {
			continue // committed meanwhile; the deferred removal drops ours
		}
		if err != nil {
			return added, errors.Join(ferr, fmt.Errorf("layer store: %w", err))
		}
		st.dir = ""
		added = append(added, id)
	}
	if err := s.root.SyncDir(path.Join(s.dir, string(digest.SHA256))); err != nil {
		return added, errors.Join(ferr, fmt.Errorf("layer store: %w", err))
	}
	return added, ferr
}

func (s *Store) notePath(id digest.Digest) string {
	return path.Join(s.dir, "notes", id.Encoded())
}

// writeNote records note for id, or removes a note an earlier unpack of
// id left (a crash after the note, before the layer's name).
func (s *Store) writeNote(id digest.Digest, note []byte) error {
	if note == nil {
		if err := s.root.Remove(s.notePath(id)); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return fmt.Errorf("layer store: %w", err)
		}
		return nil
	}
	if err := s.root.MkdirAll(path.Dir(s.notePath(id)), 0o700, 0, 0); err != nil {
		return fmt.Errorf("layer store: %w", err)
	}
	if err := s.root.WriteFile(s.notePath(id), note, 0o600, 0, 0); err != nil {
		return fmt.Errorf("layer store: %w", err)
	}
	return nil
}

// Note returns what the unpacker noted about the layer id, nil for nothing.
func (s *Store) Note(id digest.Digest) ([]byte, error) {
	b, err := s.root.ReadFile(s.notePath(id))
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("layer store: %w", err)
	}
	return b, nil
}

// List returns the DiffIDs of the layers in the store, sorted.
func (s *Store) List() ([]digest.Digest, error) {
	es, err := s.root.ReadDir(path.Join(s.dir, string(digest.SHA256)))
	if err != nil {
		return nil, fmt.Errorf("layer store: %w", err)
	}
	var ids []digest.Digest
	for _, e := range es {
		id := digest.NewDigestFromEncoded(digest.SHA256, e.Name())
		if id.Validate() == nil && e.IsDir() {
			ids = append(ids, id)
		}
	}
	slices.Sort(ids)
	return ids, nil
}

// Sweep removes what a crash left in the store: layers being unpacked,
// layers being deleted and notes and stamps of layers that never got
// their name.
// None is ever used.
func (s *Store) Sweep(log *slog.Logger) error {
	notes, err := s.root.ReadDir(path.Join(s.dir, "notes"))
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("layer store: %w", err)
	}
	for _, e := range notes {
		id := digest.NewDigestFromEncoded(digest.SHA256, e.Name())
		if have, err := s.Has(id); err == nil && !have {
			if err := s.root.RemoveAll(s.notePath(id)); err != nil {
				return fmt.Errorf("layer store: %w", err)
			}
		}
	}
	if err := s.sweepStamps(); err != nil {
		return err
	}
	es, err := s.root.ReadDir(s.dir)
	if err != nil {
		return fmt.Errorf("layer store: %w", err)
	}
	for _, e := range es {
		if n := e.Name(); strings.HasPrefix(n, unpackPrefix) || strings.HasPrefix(n, trashPrefix) {
			if err := s.root.RemoveAll(path.Join(s.dir, n)); err != nil {
				return fmt.Errorf("layer store: %w", err)
			}
			log.Info("layer store: removed what an interrupted run left", "path", s.root.Show(path.Join(s.dir, n)))
		}
	}
	return nil
}

// Collect deletes every layer not in keep. Each goes out of its name in
// one rename before it is removed, so a crash leaves only whole layers
// under their names (and trash that Sweep removes). It returns the
// DiffIDs it deleted.
func (s *Store) Collect(keep map[digest.Digest]bool, log *slog.Logger) ([]digest.Digest, error) {
	ids, err := s.List()
	if err != nil {
		return nil, err
	}
	var gone []digest.Digest
	for _, id := range ids {
		if keep[id] {
			continue
		}
		if err := s.discard(id); err != nil {
			return gone, err
		}
		log.Info("layer store: removed a layer no machine uses", "diffID", id)
		gone = append(gone, id)
	}
	return gone, s.Sweep(log)
}

// discard deletes layer id, its note and its stamp: out of its name in
// one rename first, so a crash leaves only whole layers under their names
// (and trash that Sweep removes).
func (s *Store) discard(id digest.Digest) error {
	trash, err := s.root.MkdirTemp(s.dir, trashPrefix, 0o700)
	if err != nil {
		return fmt.Errorf("layer store: %w", err)
	}
	if err := s.root.Rename(s.Path(id), path.Join(trash, "layer")); err != nil {
		return fmt.Errorf("layer store: %w", err)
	}
	if err := s.root.RemoveAll(trash); err != nil {
		return fmt.Errorf("layer store: %w", err)
	}
	if err := s.writeNote(id, nil); err != nil {
		return err
	}
	return s.removeStamp(id)
}
