// Package fsutil is nodespawn's one way to change files on disk so that a
// crash leaves either the old state or the new one, never half of each.
//
// Files and symlinks are created under a temporary name in the destination
// directory, made durable (fsync), given their mode and owner, and renamed
// over the destination; the directory is then fsynced so the rename itself
// survives a power loss. Because rename replaces the directory entry, an
// existing symlink at the destination is replaced, never written through.
//
// Owner arguments follow os.Chown: -1 leaves that id unchanged (the file
// then belongs to the calling process).
package fsutil

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"syscall"
)

// WriteFile atomically replaces path with data, with mode (the umask does
// not apply) and owner uid:gid. The parent directory must exist.
func WriteFile(path string, data []byte, mode os.FileMode, uid, gid int) error {
	return WriteReader(path, bytes.NewReader(data), mode, uid, gid)
}

// WriteReader is WriteFile with contents streamed from r. If reading r or
// any later step fails, path keeps its previous contents (or stays absent)
// and the temporary file is removed.
func WriteReader(path string, r io.Reader, mode os.FileMode, uid, gid int) (err error) {
	dir, base := filepath.Split(path)
	if dir == "" {
		dir = "."
	}
	f, err := os.CreateTemp(dir, "."+base+".tmp-")
	if err != nil {
		return fmt.Errorf("write %s: create temp file: %w", path, err)
	}
	tmp := f.Name()
	defer func() {
		if err != nil {
			f.Close()
			os.Remove(tmp)
		}
	}()
	if _, err = io.Copy(f, r); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err = f.Sync(); err != nil {
		return fmt.Errorf("write %s: fsync: %w", path, err)
	}
	// Chown before chmod: chown clears setuid/setgid bits.
	if uid >= 0 || gid >= 0 {
		if err = f.Chown(uid, gid); err != nil {
			return fmt.Errorf("write %s: chown %d:%d: %w", path, uid, gid, err)
		}
	}
	if err = f.Chmod(mode); err != nil {
		return fmt.Errorf("write %s: chmod %v: %w", path, mode, err)
	}
	if err = f.Close(); err != nil {
		return fmt.Errorf("write %s: close: %w", path, err)
	}
	if err = os.Rename(tmp, path); err != nil {
		return fmt.Errorf("write %s: rename into place: %w", path, err)
	}
	return SyncDir(dir)
}

// Symlink atomically makes path a symbolic link to target, replacing
// whatever non-directory entry was there, and sets the link's own owner.
func Symlink(target, path string, uid, gid int) error {
	dir, base := filepath.Split(path)
	if dir == "" {
		dir = "."
	}
	if cur, err := os.Readlink(path); err == nil && cur == target {
		if uid >= 0 || gid >= 0 {
			if err := os.Lchown(path, uid, gid); err != nil {
				return fmt.Errorf("symlink %s: lchown %d:%d: %w", path, uid, gid, err)
			}
		}
		return nil
	}
	tmp, err := tempName(dir, "."+base+".tmp-")
	if err != nil {
		return fmt.Errorf("symlink %s: %w", path, err)
	}
	if err := os.Symlink(target, tmp); err != nil {
		return fmt.Errorf("symlink %s -> %s: %w", path, target, err)
	}
	if uid >= 0 || gid >= 0 {
		if err := os.Lchown(tmp, uid, gid); err != nil {
			os.Remove(tmp)
			return fmt.Errorf("symlink %s: lchown %d:%d: %w", path, uid, gid, err)
		}
	}
	if err := os.Rename(tmp, path); err != nil {
		os.Remove(tmp)
		return fmt.Errorf("symlink %s: rename into place: %w", path, err)
	}
	return SyncDir(dir)
}

// MkdirAll makes path a directory with mode (the umask does not apply) and
// owner uid:gid. Missing parents are created 0755 and keep the caller's
// owner, like the Plan's Directory step asks. An existing directory at path
// gets mode and owner applied; an existing non-directory is an error.
func MkdirAll(path string, mode os.FileMode, uid, gid int) error {
	path = filepath.Clean(path)
	fi, err := os.Lstat(path)
	switch {
	case err == nil && !fi.IsDir():
		return fmt.Errorf("mkdir %s: exists and is not a directory (%v)", path, fi.Mode().Type())
	case errors.Is(err, os.ErrNotExist):
		parent := filepath.Dir(path)
		if parent != path {
			if err := mkdirParents(parent); err != nil {
				return err
			}
		}
		if err := os.Mkdir(path, 0o700); err != nil && !errors.Is(err, os.ErrExist) {
			return fmt.Errorf("mkdir %s: %w", path, err)
		}
		if err := SyncDir(parent); err != nil {
			return err
		}
	case err != nil:
		return fmt.Errorf("mkdir %s: %w", path, err)
	}
	if uid >= 0 || gid >= 0 {
		if err := os.Lchown(path, uid, gid); err != nil {
			return fmt.Errorf("mkdir %s: chown %d:%d: %w", path, uid, gid, err)
		}
	}
	if err := os.Chmod(path, mode); err != nil {
		return fmt.Errorf("mkdir %s: chmod %v: %w", path, mode, err)
	}
	return nil
}

// mkdirParents creates path and its missing parents 0755.
func mkdirParents(path string) error {
	fi, err := os.Stat(path)
	if err == nil {
		if !fi.IsDir() {
			return fmt.Errorf("mkdir %s: exists and is not a directory", path)
		}
		return nil
	}
	if !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("mkdir %s: %w", path, err)
	}
	parent := filepath.Dir(path)
	if parent != path {
		if err := mkdirParents(parent); err != nil {
			return err
		}
	}
	if err := os.Mkdir(path, 0o755); err != nil && !errors.Is(err, os.ErrExist) {
		return fmt.Errorf("mkdir %s: %w", path, err)
	}
	if err := os.Chmod(path, 0o755); err != nil {
		return fmt.Errorf("mkdir %s: chmod: %w", path, err)
	}
	return SyncDir(parent)
}

// SyncDir fsyncs a directory so renames and creations in it are durable.
func SyncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return fmt.Errorf("fsync directory %s: %w", dir, err)
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("fsync directory %s: %w", dir, err)
	}
	return nil
}

// tempName returns an unused name in dir for a symlink (os.CreateTemp only
// makes regular files).
func tempName(dir, prefix string) (string, error) {
	f, err := os.CreateTemp(dir, prefix)
	if err != nil {
		return "", fmt.Errorf("reserve temp name in %s: %w", dir, err)
	}
	name := f.Name()
	f.Close()
	if err := os.Remove(name); err != nil {
		return "", fmt.Errorf("reserve temp name in %s: %w", dir, err)
	}
	return name, nil
}

// FileMode converts a Unix mode as the Plan carries it (e.g. 0o4755) to an
// os.FileMode; a plain os.FileMode(m) conversion would drop the setuid,
// setgid and sticky bits.
func FileMode(unixMode uint32) os.FileMode {
	m := os.FileMode(unixMode) & os.ModePerm
	if unixMode&0o4000 != 0 {
		m |= os.ModeSetuid
	}
	if unixMode&0o2000 != 0 {
		m |= os.ModeSetgid
	}
	if unixMode&0o1000 != 0 {
		m |= os.ModeSticky
	}
	return m
}

// RemoveStaleTemps removes the temporary files WriteFile, WriteReader and
// Symlink leave beside path when the process is killed mid-write. Call it
// only where nothing else writes path at the same time (apply holds a lock).
func RemoveStaleTemps(path string) error {
	return RemoveLeftovers(filepath.Dir(path), "."+filepath.Base(path)+".tmp-")
}

// RemoveLeftovers removes the entries of dir whose names start with prefix:
// files, links and empty directories. A non-empty directory is kept.
func RemoveLeftovers(dir, prefix string) error {
	entries, err := os.ReadDir(dir)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("look for leftovers in %s: %w", dir, err)
	}
	for _, e := range entries {
		if !strings.HasPrefix(e.Name(), prefix) {
			continue
		}
		p := filepath.Join(dir, e.Name())
		if err := os.Remove(p); err != nil && !errors.Is(err, os.ErrNotExist) && !errors.Is(err, syscall.ENOTEMPTY) && !errors.Is(err, syscall.EEXIST) {
			return fmt.Errorf("remove leftover %s: %w", p, err)
		}
	}
	return nil
}
