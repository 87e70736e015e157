package oci

import (
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"syscall"

	"github.com/opencontainers/go-digest"
	"golang.org/x/sys/unix"

	"github.com/nodespawn/nodespawn/internal/fsutil"
)

// rootfs is a destination directory and the names kept beside it:
//
//	<parent>/.<name>.staging-<rand>   the rootfs being unpacked
//	<parent>/.<name>.old-<rand>       the previous rootfs while it is removed
//	<parent>/.<name>.nodespawn-image  the marker: what <parent>/<name> holds
//
// All live in the destination's parent, so every rename stays on one
// filesystem, and the marker is outside the machine's root where nothing
// inside the machine sees it. machined ignores dot-names in
// /var/lib/machines, so none of them shows up as an image.
type rootfs struct {
	dest, parent, name string
}

func newRootfs(dest string) rootfs {
	dest = filepath.Clean(dest)
	return rootfs{dest: dest, parent: filepath.Dir(dest), name: filepath.Base(dest)}
}

func (r rootfs) markerPath() string { return filepath.Join(r.parent, "."+r.name+".nodespawn-image") }

// marker records what was unpacked into the destination.
type marker struct {
	Source   string        `json:"source"`
	Platform string        `json:"platform"`
	Manifest digest.Digest `json:"manifest"`
	// Dev and Ino identify the directory the image was unpacked into, so a
	// rootfs replaced by hand is not mistaken for the recorded one.
	Dev uint64 `json:"dev"`
	Ino uint64 `json:"ino"`
}

// current reports whether dest already holds the image want describes.
// The source name is not compared: the same manifest from a mirror is the
// same rootfs.
func (r rootfs) current(want marker) bool {
	b, err := os.ReadFile(r.markerPath())
	if err != nil {
		return false
	}
	var have marker
	if json.Unmarshal(b, &have) != nil {
		return false
	}
	dev, ino, err := devIno(r.dest)
	if err != nil {
		return false
	}
	return have.Manifest == want.Manifest && have.Platform == want.Platform && have.Dev == dev && have.Ino == ino
}

func devIno(p string) (uint64, uint64, error) {
	fi, err := os.Lstat(p)
	if err != nil {
		return 0, 0, err
	}
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !ok || !fi.IsDir() {
		return 0, 0, fmt.Errorf("%s is not a directory", p)
	}
	return st.Dev, st.Ino, nil
}

// staging is a rootfs being built.
type staging struct {
	root rootfs
	dir  string
}

// stage removes what an interrupted run left beside dest and makes a fresh
// staging directory.
func (r rootfs) stage(log *slog.Logger) (*staging, error) {
	if err := os.MkdirAll(r.parent, 0o700); err != nil {
		return nil, fmt.Errorf("create %s: %w", r.parent, err)
	}
	if err := r.removeLeftovers(log); err != nil {
		return nil, err
	}
	dir, err := os.MkdirTemp(r.parent, "."+r.name+".staging-")
	if err != nil {
		return nil, fmt.Errorf("create staging directory for %s: %w", r.dest, err)
	}
	// MkdirTemp makes 0700; a machine's / is 0755 root:root.
	if err := os.Chmod(dir, 0o755); err != nil {
		os.RemoveAll(dir)
		return nil, fmt.Errorf("chmod staging directory %s: %w", dir, err)
	}
	return &staging{root: r, dir: dir}, nil
}

// Leftover names a crash can leave beside dest.
func (r rootfs) leftovers() ([]string, error) {
	var all []string
	for _, pat := range []string{".staging-*", ".old-*"} {
		m, err := filepath.Glob(filepath.Join(r.parent, "."+globEscape(r.name)+pat))
		if err != nil {
			return nil, err
		}
		all = append(all, m...)
	}
	return all, nil
}

func (r rootfs) removeLeftovers(log *slog.Logger) error {
	left, err := r.leftovers()
	if err != nil {
		return fmt.Errorf("list leftovers of %s: %w", r.dest, err)
	}
	for _, p := range left {
		log.Warn("removing leftover of an interrupted rootfs pull", "path", p)
		if err := os.RemoveAll(p); err != nil {
			return fmt.Errorf("remove leftover %s: %w", p, err)
		}
	}
	return nil
}

// discard removes the staging directory after a failure.
func (s *staging) discard(log *slog.Logger) {
	if err := os.RemoveAll(s.dir); err != nil {
		log.Error("could not remove staging directory; the next run removes it", "path", s.dir, "error", err)
	}
}

// commit makes the staging directory the rootfs. The order keeps every
// crash point safe: the marker goes first (no stale claim survives), the
// old rootfs is renamed aside (dest is never half-written: it is the old
// tree, nothing, or the new tree), then the new tree is renamed in, synced,
// and only then is the marker written. The old tree is removed last.
func (s *staging) commit(m marker, log *slog.Logger) error {
	r := s.root
	// Data first: the rename must not publish a tree whose file contents
	// are still only in the page cache.
	if err := syncfs(s.dir); err != nil {
		return err
	}
	if err := os.Remove(r.markerPath()); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("remove stale marker %s: %w", r.markerPath(), err)
	}
	var aside string
	if _, err := os.Lstat(r.dest); err == nil {
		suffix := strings.TrimPrefix(filepath.Base(s.dir), "."+r.name+".staging-")
		aside = filepath.Join(r.parent, "."+r.name+".old-"+suffix)
		if err := os.Rename(r.dest, aside); err != nil {
			return fmt.Errorf("move old rootfs %s aside to %s: %w", r.dest, aside, err)
		}
		log.Info("replacing existing rootfs", "dest", r.dest)
	} else if !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("inspect %s: %w", r.dest, err)
	}
	if err := os.Rename(s.dir, r.dest); err != nil {
		return fmt.Errorf("move rootfs %s into place at %s: %w", s.dir, r.dest, err)
	}
	var err error
	if m.Dev, m.Ino, err = devIno(r.dest); err != nil {
		return err
	}
	b, err := json.MarshalIndent(m, "", "  ")
	if err != nil {
		return fmt.Errorf("encode marker: %w", err)
	}
	if err := fsutil.WriteFile(r.markerPath(), append(b, '\n'), 0o644, 0, 0); err != nil {
		return err
	}
	if aside != "" {
		if err := os.RemoveAll(aside); err != nil {
			// The new rootfs is in place; the next run removes the rest.
			log.Warn("could not remove the previous rootfs", "path", aside, "error", err)
		}
	}
	return nil
}

// syncfs flushes the filesystem holding dir.
func syncfs(dir string) error {
	f, err := os.Open(dir)
	if err != nil {
		return fmt.Errorf("open %s to sync: %w", dir, err)
	}
	defer f.Close()
	if err := unix.Syncfs(int(f.Fd())); err != nil {
		return fmt.Errorf("sync filesystem of %s: %w", dir, err)
	}
	return nil
}

// globEscape quotes the glob metacharacters in a literal name.
func globEscape(s string) string {
	var b []byte
	for i := 0; i < len(s); i++ {
		switch s[i] {
		case '*', '?', '[', '\\':
			b = append(b, '\\')
		}
		b = append(b, s[i])
	}
	return string(b)
}
