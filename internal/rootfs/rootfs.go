// Package rootfs makes a machine's root directory appear whole or not at
// all: a tree is built in a staging directory beside its destination and
// renamed into place, and a marker beside it records what it holds, so a
// rerun that finds the same contents does nothing. The image pull
// (internal/oci) and the debootstrap fallback (internal/debootstrap) both
// build through it.
package rootfs

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"path"
	"strings"
	"syscall"

	"github.com/opencontainers/go-digest"

	"github.com/nodespawn/nodespawn/internal/confine"
)

// Dest is a destination directory and the names kept beside it, all
// paths in one confine.Root (the host root):
//
//	<parent>/.<name>.staging-<rand>   the rootfs being unpacked
//	<parent>/.<name>.old-<rand>       the previous rootfs while it is removed
//	<parent>/.<name>.nodespawn-image  the marker: what <parent>/<name> holds
//
// All live in the destination's parent, so every rename stays on one
// filesystem, and the marker is outside the machine's root where nothing
// inside the machine sees it. machined ignores dot-names in
// /var/lib/machines, so none of them shows up as an image.
type Dest struct {
	root               *confine.Root
	dest, parent, name string
}

// Parent is the directory the destination, its staging directory and its
// marker are in (a path in the root): a place on the same filesystem for
// what a build spools when there is no better one.
func (r Dest) Parent() string { return r.parent }

// New is the destination dest (a path in root, the host root).
func New(root *confine.Root, dest string) Dest {
	dest = "/" + confine.Clean(dest)
	return Dest{root: root, dest: dest, parent: path.Dir(dest), name: path.Base(dest)}
}

// MarkerPath is where the marker of the rootfs at dest lives.
func MarkerPath(dest string) string {
	dest = "/" + confine.Clean(dest)
	return path.Join(path.Dir(dest), "."+path.Base(dest)+".nodespawn-image")
}

func (r Dest) markerPath() string { return MarkerPath(r.dest) }

// Marker records what was unpacked into the destination.
type Marker struct {
	Source   string        `json:"source"`
	Platform string        `json:"platform"`
	Manifest digest.Digest `json:"manifest"`
	// Dev and Ino identify the directory the image was unpacked into, so a
	// rootfs replaced by hand is not mistaken for the recorded one.
	Dev uint64 `json:"dev"`
	Ino uint64 `json:"ino"`
}

// Current reports whether dest already holds the image want describes.
// The source name is not compared: the same manifest from a mirror is the
// same rootfs.
func (r Dest) Current(want Marker) bool {
	b, err := r.root.ReadFile(r.markerPath())
	if err != nil {
		return false
	}
	var have Marker
	if json.Unmarshal(b, &have) != nil {
		return false
	}
	dev, ino, err := r.devIno(r.dest)
	if err != nil {
		return false
	}
	return have.Manifest == want.Manifest && have.Platform == want.Platform && have.Dev == dev && have.Ino == ino
}

// Owned reports whether dest is the tree nodespawn unpacked there: its
// marker is readable and names this very directory (device and inode), so
// a tree someone put in place of a removed one is not taken for it.
func (r Dest) Owned() bool {
	b, err := r.root.ReadFile(r.markerPath())
	if err != nil {
		return false
	}
	var have Marker
	if json.Unmarshal(b, &have) != nil {
		return false
	}
	dev, ino, err := r.devIno(r.dest)
	return err == nil && have.Dev == dev && have.Ino == ino
}

func (r Dest) devIno(p string) (uint64, uint64, error) {
	fi, err := r.root.Lstat(p)
	if err != nil {
		return 0, 0, err
	}
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !ok || !fi.IsDir() {
		return 0, 0, fmt.Errorf("%s is not a directory", r.root.Show(p))
	}
	return st.Dev, st.Ino, nil
}

// Done reports whether dest already holds the tree want describes, and
// then removes what a run killed after its commit left beside it.
func (r Dest) Done(want Marker, log *slog.Logger) (bool, error) {
	if !r.Current(want) {
		return false, nil
	}
	return true, r.RemoveLeftovers(log)
}

// Build makes dest the tree fill builds: fill gets a fresh staging
// directory (a path in the root) beside dest, and the tree is committed as
// want only when fill succeeds. On any failure dest is as it was and the
// staging directory is gone.
func (r Dest) Build(want Marker, log *slog.Logger, fill func(stage string) error) error {
	stage, err := r.Stage(log)
	if err != nil {
		return err
	}
	if err := fill(stage.Dir); err != nil {
		stage.Discard(log)
		return err
	}
	if err := stage.Commit(want, log); err != nil {
		stage.Discard(log)
		return err
	}
	return nil
}

// Staging is a rootfs being built.
type Staging struct {
	r Dest
	// Dir is the staging directory, a path in the root.
	Dir string
}

// Stage removes what an interrupted run left beside dest and makes a fresh
// staging directory.
func (r Dest) Stage(log *slog.Logger) (*Staging, error) {
	if err := r.root.MkdirParents(r.parent); err != nil {
		return nil, fmt.Errorf("create %s: %w", r.root.Show(r.parent), err)
	}
	if err := r.RemoveLeftovers(log); err != nil {
		return nil, err
	}
	// A machine's / is 0755 root:root.
	dir, err := r.root.MkdirTemp(r.parent, "."+r.name+".staging-", 0o755)
	if err != nil {
		return nil, fmt.Errorf("create staging directory for %s: %w", r.root.Show(r.dest), err)
	}
	return &Staging{r: r, Dir: dir}, nil
}

// RemoveLeftovers removes what a crash can leave beside dest: a staging
// tree, a previous rootfs that was being removed, a layer spool or a
// marker half written (the last two under confine's temporary names).
func (r Dest) RemoveLeftovers(log *slog.Logger) error {
	if err := r.root.RemoveStaleTemps(r.parent); err != nil {
		return fmt.Errorf("remove leftovers of %s: %w", r.root.Show(r.dest), err)
	}
	es, err := r.root.ReadDir(r.parent)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("list leftovers of %s: %w", r.root.Show(r.dest), err)
	}
	for _, e := range es {
		n := e.Name()
		if !strings.HasPrefix(n, "."+r.name+".staging-") && !strings.HasPrefix(n, "."+r.name+".old-") {
			continue
		}
		p := path.Join(r.parent, n)
		log.Warn("removing leftover of an interrupted rootfs pull", "path", r.root.Show(p))
		if err := r.root.RemoveAll(p); err != nil {
			return fmt.Errorf("remove leftover: %w", err)
		}
	}
	return nil
}

// Discard removes the staging directory after a failure.
func (s *Staging) Discard(log *slog.Logger) {
	if err := s.r.root.RemoveAll(s.Dir); err != nil {
		log.Error("could not remove staging directory; the next run removes it", "path", s.r.root.Show(s.Dir), "error", err)
	}
}

// Commit makes the staging directory the rootfs. The order keeps every
// crash point safe: the marker goes first (no stale claim survives), the
// old rootfs is renamed aside (dest is never half-written: it is the old
// tree, nothing, or the new tree), then the new tree is renamed in, synced,
// and only then is the marker written. The old tree is removed last.
func (s *Staging) Commit(m Marker, log *slog.Logger) error {
	r := s.r
	// Data first: the rename must not publish a tree whose file contents
	// are still only in the page cache.
	if err := r.root.Syncfs(s.Dir); err != nil {
		return err
	}
	if err := r.root.Remove(r.markerPath()); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("remove stale marker: %w", err)
	}
	var aside string
	if _, err := r.root.Lstat(r.dest); err == nil {
		suffix := strings.TrimPrefix(path.Base(s.Dir), "."+r.name+".staging-")
		aside = path.Join(r.parent, "."+r.name+".old-"+suffix)
		if err := r.root.Rename(r.dest, aside); err != nil {
			return fmt.Errorf("move old rootfs aside: %w", err)
		}
		log.Info("replacing existing rootfs", "dest", r.root.Show(r.dest))
	} else if !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("inspect %s: %w", r.root.Show(r.dest), err)
	}
	if err := r.root.Rename(s.Dir, r.dest); err != nil {
		return fmt.Errorf("move rootfs into place: %w", err)
	}
	var err error
	if m.Dev, m.Ino, err = r.devIno(r.dest); err != nil {
		return err
	}
	b, err := json.MarshalIndent(m, "", "  ")
	if err != nil {
		return fmt.Errorf("encode marker: %w", err)
	}
	if err := r.root.WriteFile(r.markerPath(), append(b, '\n'), 0o644, 0, 0); err != nil {
		return err
	}
	if aside != "" {
		if err := r.root.RemoveAll(aside); err != nil {
			// The new rootfs is in place; the next run removes the rest.
			log.Warn("could not remove the previous rootfs", "path", r.root.Show(aside), "error", err)
		}
	}
	return nil
}
