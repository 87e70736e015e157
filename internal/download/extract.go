package download

import (
	"archive/tar"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path"
	"sort"
	"strings"

	"github.com/klauspost/compress/gzip"

	"github.com/nodespawn/nodespawn/internal/archive"
	"github.com/nodespawn/nodespawn/internal/confine"
	"github.com/nodespawn/nodespawn/plan"
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
	Rel  string    `json:"path"`
	Kind entryKind `json:"kind"`
	// SHA256 is a file's digest as bare hex, like installRecord's.
	SHA256 string `json:"sha256,omitempty"`
	Target string `json:"target,omitempty"`
	// from is where the entry lies in the staging directory (members are
	// renamed on their way into place); not recorded.
	from string
}

// extractTarGz unpacks a gzipped tar from r into the empty directory stage
// of root with the project's one extractor. With members, only those
// archive paths are taken, each to its Dest name; otherwise every regular
// file, directory and symlink keeps its path. mode, when non-zero,
// replaces the archive's file permissions; setuid and setgid bits, owners
// and extended attributes are never taken from a download.
//
// Only regular files, directories and symlinks whose target is relative
// and has no ".." are accepted: a tool archive has no use for anything
// else, so anything else makes the whole archive fail.
func extractTarGz(ctx context.Context, r io.Reader, root *confine.Root, stage string, members []plan.Member, mode os.FileMode) ([]entry, error) {
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
	seen := map[string]bool{}
	filter := func(h *tar.Header) (bool, error) {
		if h.Typeflag == tar.TypeXGlobalHeader {
			return false, nil
		}
		rel, err := safeRel(h.Name)
		if err != nil {
			return false, fmt.Errorf("entry %q: %w", h.Name, err)
		}
		if rel == "" {
			return false, nil // the archive's root directory
		}
		dst := rel
		if len(want) > 0 {
			var ok bool
			if dst, ok = want[rel]; !ok {
				return false, nil
			}
			if h.Typeflag != tar.TypeReg {
				return false, fmt.Errorf("member %q is not a regular file", h.Name)
			}
		}
		if seen[rel] {
			if len(want) > 0 {
				return false, fmt.Errorf("member %q appears twice in the archive", h.Name)
			}
			return false, fmt.Errorf("entry %q: duplicate entry", h.Name)
		}
		seen[rel] = true
		h.Uid, h.Gid, h.Uname, h.Gname = 0, 0, "", ""
		h.Xattrs = nil //nolint:staticcheck // containerd still reads it
		for k := range h.PAXRecords {
			if strings.HasPrefix(k, "SCHILY.xattr.") {
				delete(h.PAXRecords, k)
			}
		}
		switch h.Typeflag {
		case tar.TypeReg:
			m := os.FileMode(h.Mode) & os.ModePerm
			if mode != 0 {
				m = mode.Perm()
			}
			h.Mode = int64(m)
			entries = append(entries, entry{Rel: dst, Kind: kindFile, from: rel})
		case tar.TypeDir:
			h.Mode = 0o755
			entries = append(entries, entry{Rel: rel, Kind: kindDir, from: rel})
		case tar.TypeSymlink:
			if path.IsAbs(h.Linkname) {
				return false, fmt.Errorf("entry %q: symlink to absolute path %q is not allowed", h.Name, h.Linkname)
			}
			entries = append(entries, entry{Rel: rel, Kind: kindSymlink, Target: h.Linkname, from: rel})
		case tar.TypeLink:
			return false, fmt.Errorf("entry %q: hard link to %q is not allowed", h.Name, h.Linkname)
		default:
			return false, fmt.Errorf("entry %q: type %q is not allowed (only files, directories and symlinks)", h.Name, h.Typeflag)
		}
		return true, nil
	}
	if err := archive.Apply(ctx, root, stage, zr, archive.Options{Filter: filter, NoSameOwner: true}); err != nil {
		return nil, err
	}
	for src := range want {
		if !seen[src] {
			return nil, fmt.Errorf("archive has no member %q", src)
		}
	}
	if err := checkLinks(entries); err != nil {
		return nil, err
	}
	for i := range entries {
		e := &entries[i]
		if e.Kind != kindFile {
			continue
		}
		sum, err := fileDigest(root, path.Join(stage, e.from))
		if err != nil {
			return nil, fmt.Errorf("entry %q: %w", e.from, err)
		}
		e.SHA256 = sum.Encoded()
	}
	return entries, nil
}

// checkLinks keeps a download's symlinks plain: each target, read as text
// from the link's own directory, stays inside the archive and never passes
// through another symlink of the archive, and no entry lies below a
// symlink. Nothing is resolved on disk: the rules are about the archive's
// own list of entries, so the order of entries does not matter.
func checkLinks(entries []entry) error {
	links := map[string]bool{}
	for _, e := range entries {
		if e.Kind == kindSymlink {
			links[e.Rel] = true
		}
	}
	if len(links) == 0 {
		return nil
	}
	below := func(rel string) string {
		for d := path.Dir(rel); d != "."; d = path.Dir(d) {
			if links[d] {
				return d
			}
		}
		return ""
	}
	for _, e := range entries {
		if l := below(e.Rel); l != "" {
			return fmt.Errorf("entry %q: %q is a symlink; writing through it is not allowed", e.Rel, l)
		}
	}
	for _, e := range entries {
		if e.Kind != kindSymlink {
			continue
		}
		var stack []string
		if d := path.Dir(e.Rel); d != "." {
			stack = strings.Split(d, "/")
		}
		for _, el := range strings.Split(e.Target, "/") {
			switch el {
			case "", ".":
				continue
			case "..":
				if len(stack) == 0 {
					return fmt.Errorf("entry %q: symlink to %q leads outside the archive", e.Rel, e.Target)
				}
				stack = stack[:len(stack)-1]
				continue
			}
			stack = append(stack, el)
			if p := strings.Join(stack, "/"); links[p] && p != e.Rel {
				return fmt.Errorf("entry %q: symlink to %q goes through the symlink %q, which leads outside the archive or nowhere useful; link to the file itself", e.Rel, e.Target, p)
			}
		}
	}
	return nil
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
	if archive.HasDotDot(name) {
		return "", errors.New(`".." in path is not allowed`)
	}
	rel := path.Clean(name)
	if rel == "." {
		return "", nil
	}
	return rel, nil
}

// installEntries moves extracted entries from stage into dest (renames in
// one root), creating missing directories 0755.
func installEntries(root *confine.Root, stage, dest string, entries []entry) error {
	// Directories first, shallow before deep, so every parent exists.
	sorted := append([]entry(nil), entries...)
	sort.SliceStable(sorted, func(i, j int) bool {
		return (sorted[i].Kind == kindDir) && (sorted[j].Kind != kindDir)
	})
	for _, e := range sorted {
		target := path.Join(dest, e.Rel)
		if e.Kind == kindDir {
			if err := root.MkdirParents(target); err != nil {
				return fmt.Errorf("install %s: %w", root.Show(target), err)
			}
			continue
		}
		if err := root.MkdirParents(path.Dir(target)); err != nil {
			return fmt.Errorf("install %s: %w", root.Show(target), err)
		}
		if fi, err := root.Lstat(target); err == nil && fi.IsDir() {
			return fmt.Errorf("install %s: a directory is in the way", root.Show(target))
		}
		if err := root.Rename(path.Join(stage, e.from), target); err != nil {
			return fmt.Errorf("install %s: %w", root.Show(target), err)
		}
	}
	return nil
}
