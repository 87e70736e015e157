package fetch

import (
	"archive/tar"
	"compress/gzip"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"path"
	"path/filepath"
	"strings"
	"syscall"

	"github.com/nodespawn/nodespawn/internal/fsutil"
	"github.com/nodespawn/nodespawn/render"
)

// entryKind is what an extracted entry is.
type entryKind string

const (
	kindFile    entryKind = "file"
	kindDir     entryKind = "dir"
	kindSymlink entryKind = "symlink"
)

// entry is one thing extracted from an archive, relative to the install
// directory (and to the staging directory it is first extracted into).
type entry struct {
	Rel    string    `json:"path"`
	Kind   entryKind `json:"kind"`
	SHA256 string    `json:"sha256,omitempty"`
	Target string    `json:"target,omitempty"`
}

// extractTarGz unpacks a gzipped tar from r into the empty directory stage.
// With members, only those archive paths are taken, each to its Dest name;
// otherwise every regular file, directory and relative symlink keeps its
// path. mode, when non-zero, replaces the archive's file permissions.
//
// Nothing is written outside stage: absolute names, ".." components, hard
// links, device nodes and other special files are refused, no entry is
// written through a symlink, duplicate entries are refused, and every
// symlink must resolve inside the tree.
func extractTarGz(r io.Reader, stage string, members []render.Member, mode os.FileMode) ([]entry, error) {
	zr, err := gzip.NewReader(r)
	if err != nil {
		return nil, fmt.Errorf("read gzip: %w", err)
	}
	defer zr.Close()

	want := map[string]string{} // cleaned member path -> dest rel
	for _, m := range members {
		src, err := safeRel(m.Path)
		if err != nil || src == "" {
			return nil, fmt.Errorf("member %q: not a relative path inside the archive", m.Path)
		}
		dst, err := safeRel(m.Dest)
		if err != nil || dst == "" {
			return nil, fmt.Errorf("member %q: destination %q is not a relative path", m.Path, m.Dest)
		}
		want[src] = dst
	}

	var entries []entry
	found := map[string]bool{}
	tr := tar.NewReader(zr)
	for {
		hdr, err := tr.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return nil, fmt.Errorf("read tar: %w", err)
		}
		if hdr.Typeflag == tar.TypeXGlobalHeader {
			continue
		}
		rel, err := safeRel(hdr.Name)
		if err != nil {
			return nil, fmt.Errorf("entry %q: %w", hdr.Name, err)
		}
		if rel == "" {
			continue // the archive's root directory
		}
		if len(want) > 0 {
			dst, ok := want[rel]
			if !ok {
				continue
			}
			if hdr.Typeflag != tar.TypeReg && hdr.Typeflag != tar.TypeRegA {
				return nil, fmt.Errorf("member %q is not a regular file", hdr.Name)
			}
			if found[rel] {
				return nil, fmt.Errorf("member %q appears twice in the archive", hdr.Name)
			}
			found[rel] = true
			e, err := writeEntry(stage, dst, hdr, tr, mode)
			if err != nil {
				return nil, err
			}
			entries = append(entries, e)
			continue
		}
		switch hdr.Typeflag {
		case tar.TypeReg, tar.TypeRegA:
			e, err := writeEntry(stage, rel, hdr, tr, mode)
			if err != nil {
				return nil, err
			}
			entries = append(entries, e)
		case tar.TypeDir:
			if err := mkdirInside(stage, rel); err != nil {
				return nil, fmt.Errorf("entry %q: %w", hdr.Name, err)
			}
			entries = append(entries, entry{Rel: rel, Kind: kindDir})
		case tar.TypeSymlink:
			if path.IsAbs(hdr.Linkname) {
				return nil, fmt.Errorf("entry %q: symlink to absolute path %q is not allowed", hdr.Name, hdr.Linkname)
			}
			if err := mkdirInside(stage, path.Dir(rel)); err != nil {
				return nil, fmt.Errorf("entry %q: %w", hdr.Name, err)
			}
			if err := os.Symlink(hdr.Linkname, filepath.Join(stage, rel)); err != nil {
				if errors.Is(err, os.ErrExist) {
					return nil, fmt.Errorf("entry %q: duplicate entry", hdr.Name)
				}
				return nil, fmt.Errorf("entry %q: %w", hdr.Name, err)
			}
			entries = append(entries, entry{Rel: rel, Kind: kindSymlink, Target: hdr.Linkname})
		case tar.TypeLink:
			return nil, fmt.Errorf("entry %q: hard link to %q is not allowed", hdr.Name, hdr.Linkname)
		default:
			return nil, fmt.Errorf("entry %q: type %q is not allowed (only files, directories and symlinks)", hdr.Name, hdr.Typeflag)
		}
	}
	for src := range want {
		if !found[src] {
			return nil, fmt.Errorf("archive has no member %q", src)
		}
	}
	// Symlinks are checked once the tree is complete: a later entry can
	// change where an earlier link leads.
	for _, e := range entries {
		if e.Kind == kindSymlink {
			if err := resolvesInside(stage, e.Rel); err != nil {
				return nil, fmt.Errorf("entry %q: %w", e.Rel, err)
			}
		}
	}
	return entries, nil
}

// writeEntry writes the regular file hdr/r at stage/rel, hashing it.
func writeEntry(stage, rel string, hdr *tar.Header, r io.Reader, mode os.FileMode) (entry, error) {
	if err := mkdirInside(stage, path.Dir(rel)); err != nil {
		return entry{}, fmt.Errorf("entry %q: %w", hdr.Name, err)
	}
	if mode == 0 {
		mode = os.FileMode(hdr.Mode) & os.ModePerm
	}
	p := filepath.Join(stage, rel)
	// O_EXCL refuses duplicates; O_NOFOLLOW refuses a symlink in the way.
	f, err := os.OpenFile(p, os.O_WRONLY|os.O_CREATE|os.O_EXCL|syscall.O_NOFOLLOW, 0o600)
	if err != nil {
		if errors.Is(err, os.ErrExist) {
			return entry{}, fmt.Errorf("entry %q: duplicate entry", hdr.Name)
		}
		return entry{}, fmt.Errorf("entry %q: %w", hdr.Name, err)
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(io.MultiWriter(f, h), r); err != nil {
		return entry{}, fmt.Errorf("entry %q: %w", hdr.Name, err)
	}
	if err := f.Chmod(mode); err != nil {
		return entry{}, fmt.Errorf("entry %q: %w", hdr.Name, err)
	}
	if err := f.Sync(); err != nil {
		return entry{}, fmt.Errorf("entry %q: fsync: %w", hdr.Name, err)
	}
	return entry{Rel: rel, Kind: kindFile, SHA256: hex.EncodeToString(h.Sum(nil))}, f.Close()
}

// safeRel cleans an archive or member name into a relative slash path
// that stays inside the tree; "" is the tree's root.
func safeRel(name string) (string, error) {
	if name == "" {
		return "", errors.New("empty name")
	}
	if path.IsAbs(name) {
		return "", errors.New("absolute path is not allowed")
	}
	for _, c := range strings.Split(name, "/") {
		if c == ".." {
			return "", errors.New(`".." in path is not allowed`)
		}
	}
	rel := path.Clean(name)
	if rel == "." {
		return "", nil
	}
	return rel, nil
}

// mkdirInside makes stage/rel a directory, creating missing parents, and
// refuses any existing component that is not a real directory, so nothing
// is ever written through a symlink.
func mkdirInside(stage, rel string) error {
	if rel == "." || rel == "" {
		return nil
	}
	cur := stage
	for _, c := range strings.Split(rel, "/") {
		cur = filepath.Join(cur, c)
		fi, err := os.Lstat(cur)
		switch {
		case errors.Is(err, os.ErrNotExist):
			if err := os.Mkdir(cur, 0o755); err != nil {
				return err
			}
			// The umask must not make tool directories unreadable.
			if err := os.Chmod(cur, 0o755); err != nil {
				return err
			}
		case err != nil:
			return err
		case fi.Mode()&os.ModeSymlink != 0:
			return fmt.Errorf("%s is a symlink; writing through it is not allowed", strings.TrimPrefix(cur, stage+"/"))
		case !fi.IsDir():
			return fmt.Errorf("%s is not a directory", strings.TrimPrefix(cur, stage+"/"))
		}
	}
	return nil
}

// resolvesInside follows the symlink stage/rel through the extracted tree,
// link by link, and fails if it would leave stage.
func resolvesInside(stage, rel string) error {
	var stack []string // resolved components below stage
	if d := path.Dir(rel); d != "." {
		stack = strings.Split(d, "/")
	}
	target, err := os.Readlink(filepath.Join(stage, rel))
	if err != nil {
		return err
	}
	todo := strings.Split(target, "/")
	for hops := 0; len(todo) > 0; {
		c := todo[0]
		todo = todo[1:]
		switch c {
		case "", ".":
			continue
		case "..":
			if len(stack) == 0 {
				return fmt.Errorf("symlink to %q leads outside the archive", target)
			}
			stack = stack[:len(stack)-1]
			continue
		}
		p := filepath.Join(append([]string{stage}, append(stack, c)...)...)
		if fi, err := os.Lstat(p); err == nil && fi.Mode()&os.ModeSymlink != 0 {
			if hops++; hops > 40 {
				return fmt.Errorf("symlink to %q: too many levels of links", target)
			}
			next, err := os.Readlink(p)
			if err != nil {
				return err
			}
			if path.IsAbs(next) {
				return fmt.Errorf("symlink to %q leads through an absolute link", target)
			}
			todo = append(strings.Split(next, "/"), todo...)
			continue
		}
		stack = append(stack, c)
	}
	return nil
}

// installEntries moves extracted entries from stage into dest (renames,
// same filesystem), creating missing directories 0755 and refusing to
// write through a symlink below dest.
func installEntries(stage, dest string, entries []entry) error {
	touched := map[string]bool{}
	for _, e := range entries {
		target := filepath.Join(dest, e.Rel)
		if e.Kind == kindDir {
			if err := mkdirInside(dest, e.Rel); err != nil {
				return fmt.Errorf("install %s: %w", target, err)
			}
			continue
		}
		if err := mkdirInside(dest, path.Dir(e.Rel)); err != nil {
			return fmt.Errorf("install %s: %w", target, err)
		}
		if fi, err := os.Lstat(target); err == nil && fi.IsDir() {
			return fmt.Errorf("install %s: a directory is in the way", target)
		}
		if err := os.Rename(filepath.Join(stage, e.Rel), target); err != nil {
			return fmt.Errorf("install %s: %w", target, err)
		}
		touched[filepath.Dir(target)] = true
	}
	for dir := range touched {
		if err := fsutil.SyncDir(dir); err != nil {
			return err
		}
	}
	return nil
}
