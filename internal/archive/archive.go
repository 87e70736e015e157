// Package archive is nodespawn's one tar extractor: image layers and
// downloaded archives both go through it. The unpacking itself is
// containerd's archive.Apply (hard links, xattrs, device nodes, ownership,
// and every entry kept below the target directory by its own resolution);
// the target directory is handed to it through the confinement layer
// (confine.Root.InDir), so everything starts at the directory the kernel
// resolved inside the root, whatever symlinks lead to it or are swapped in
// above it meanwhile. Whiteouts are applied here, through the same layer.
package archive

import (
	"archive/tar"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path"
	"slices"
	"strings"

	carchive "github.com/containerd/containerd/v2/pkg/archive"
	"golang.org/x/sys/unix"

	"github.com/nodespawn/nodespawn/internal/confine"
)

// Filter sees every entry before it is unpacked; it may change the header
// (a mode, say) or refuse the entry (false) or the whole archive (an error).
type Filter func(*tar.Header) (bool, error)

// Options tune Apply.
type Options struct {
	// Filter, when set, runs after the built-in check that refuses names
	// and hard-link targets that climb out with "..".
	Filter Filter
	// NoSameOwner leaves unpacked entries owned by the caller instead of
	// the archive's uid and gid.
	NoSameOwner bool
	// Overlay unpacks an image layer on its own, as an overlayfs lower
	// directory: its whiteouts are written in overlayfs's format (a 0/0
	// character device for .wh.NAME, the trusted.overlay.opaque xattr for
	// .wh..wh..opq) instead of removing anything, and an entry carrying
	// overlayfs's own trusted.overlay.* xattrs is refused (a layer could
	// otherwise redirect lookups to other layers' files).
	Overlay bool
}

// Apply unpacks the tar stream r into the directory dir of root. dir must
// exist; an entry already there is replaced (a directory merged). OCI
// whiteouts (.wh.NAME, .wh..wh..opq) remove what they name from the tree.
func Apply(ctx context.Context, root *confine.Root, dir string, r io.Reader, opts Options) error {
	tree, err := root.OpenRoot(dir)
	if err != nil {
		return err
	}
	defer tree.Close()
	w := &whiteouts{tree: tree, unpacked: map[string]bool{}, opaque: map[string]bool{}}
	filter := func(h *tar.Header) (bool, error) {
		if err := checkNames(h); err != nil {
			return false, err
		}
		if opts.Overlay {
			if err := checkOverlayXattrs(h); err != nil {
				return false, err
			}
		}
		if opts.Filter != nil {
			if ok, err := opts.Filter(h); !ok || err != nil {
				return ok, err
			}
		}
		w.saw(h.Name)
		return true, nil
	}
	convert := w.convert
	if opts.Overlay {
		convert = overlayWhiteout
	}
	copts := []carchive.ApplyOpt{carchive.WithFilter(filter), carchive.WithConvertWhiteout(convert)}
	if opts.NoSameOwner {
		copts = append(copts, carchive.WithNoSameOwner())
	}
	return root.InDir(dir, func(target string) error {
		w.target = target
		_, err := carchive.Apply(ctx, target, r, copts...)
		return err
	})
}

// whiteouts applies a layer's OCI whiteouts through the confinement layer.
// containerd's own conversion walks the target path with lstat, which does
// not descend into the /proc/<pid>/fd path InDir hands out; this one works
// on the tree's descriptor, so it also holds for an opaque directory at
// the top of the layer.
type whiteouts struct {
	tree   *confine.Root
	target string // the path containerd was given
	// unpacked holds the paths this layer has put in place so far; an
	// opaque whiteout keeps them (they may precede it in the tar).
	unpacked map[string]bool
	opaque   map[string]bool
}

const (
	whiteoutPrefix = ".wh."
	whiteoutOpaque = ".wh..wh..opq"
)

// saw records a layer entry, by its path in the tree.
func (w *whiteouts) saw(name string) {
	rel := "/" + confine.Clean(name)
	if !strings.HasPrefix(path.Base(rel), whiteoutPrefix) {
		w.unpacked[rel] = true
	}
}

// convert is containerd's whiteout hook: p is the entry's path below
// w.target, its parents resolved in the tree. It returns whether the entry
// itself is to be written (false for every whiteout).
func (w *whiteouts) convert(h *tar.Header, p string) (bool, error) {
	rel := "/" + confine.Clean(strings.TrimPrefix(p, w.target))
	base, dir := path.Base(rel), path.Dir(rel)
	switch {
	case base == whiteoutOpaque:
		if w.opaque[dir] {
			return false, nil
		}
		w.opaque[dir] = true
		return false, w.clear(dir)
	case strings.HasPrefix(base, whiteoutPrefix):
		name := path.Join(dir, strings.TrimPrefix(base, whiteoutPrefix))
		if w.unpacked[name] {
			// A whiteout hides lower layers only, never the entry its own
			// layer has (OCI image spec, "Whiteouts").
			return false, nil
		}
		return false, w.tree.RemoveAll(name)
	}
	return true, nil
}

// clear removes what lower layers left in dir, keeping what this layer
// unpacked (and looking inside the directories it did).
func (w *whiteouts) clear(dir string) error {
	es, err := w.tree.ReadDir(dir)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	for _, e := range es {
		child := path.Join(dir, e.Name())
		if !w.unpacked[child] {
			if err := w.tree.RemoveAll(child); err != nil {
				return err
			}
			continue
		}
		if e.IsDir() {
			if err := w.clear(child); err != nil {
				return err
			}
		}
	}
	return nil
}

// overlayWhiteout is containerd's whiteout hook for a layer unpacked on
// its own: p is the entry's path below the target, its parent directory
// resolved inside the target by containerd (no symlink left in it).
func overlayWhiteout(h *tar.Header, p string) (bool, error) {
	dir, base := path.Dir(p), path.Base(p)
	switch {
	case base == whiteoutOpaque:
		// "/." makes the call act on the directory itself, also when dir
		// is the /proc/<pid>/fd link InDir hands out.
		if err := unix.Setxattr(dir+"/.", "trusted.overlay.opaque", []byte("y"), 0); err != nil {
			return false, fmt.Errorf("tar entry %q: mark %s opaque: %w", h.Name, path.Dir(h.Name), err)
		}
		return false, nil
	case strings.HasPrefix(base, whiteoutPrefix):
		name := strings.TrimPrefix(base, whiteoutPrefix)
		if name == "" || name == "." {
			return false, fmt.Errorf("tar entry %q: whiteout of nothing", h.Name)
		}
		wp := path.Join(dir, name)
		if _, err := os.Lstat(wp); err == nil {
			// The layer's own entry: a whiteout hides lower layers only.
			return false, nil
		}
		if err := unix.Mknod(wp, unix.S_IFCHR, 0); err != nil {
			return false, fmt.Errorf("tar entry %q: whiteout: %w", h.Name, err)
		}
		if err := unix.Lchown(wp, h.Uid, h.Gid); err != nil {
			return false, fmt.Errorf("tar entry %q: whiteout: %w", h.Name, err)
		}
		return false, nil
	}
	return true, nil
}

// checkOverlayXattrs refuses an entry that sets an xattr overlayfs reads
// (redirect, metacopy, opaque, origin...): in a lower directory they would
// change what the merged tree shows.
func checkOverlayXattrs(h *tar.Header) error {
	for k := range h.PAXRecords {
		if x, ok := strings.CutPrefix(k, "SCHILY.xattr."); ok && (strings.HasPrefix(x, "trusted.overlay.") || strings.HasPrefix(x, "user.overlay.")) {
			return fmt.Errorf("tar entry %q: sets overlayfs's own xattr %s; refused", h.Name, x)
		}
	}
	for x := range h.Xattrs { //nolint:staticcheck // old archives carry them here
		if strings.HasPrefix(x, "trusted.overlay.") || strings.HasPrefix(x, "user.overlay.") {
			return fmt.Errorf("tar entry %q: sets overlayfs's own xattr %s; refused", h.Name, x)
		}
	}
	return nil
}

// checkNames refuses entries no honest archive contains. containerd would
// confine them to the target anyway; refusing them makes a hostile archive
// fail loudly instead of unpacking to something its author did not describe.
func checkNames(h *tar.Header) error {
	if HasDotDot(h.Name) {
		return fmt.Errorf("tar entry %q: name leaves the archive root", h.Name)
	}
	if h.Typeflag == tar.TypeLink && HasDotDot(h.Linkname) {
		return fmt.Errorf("tar entry %q: hard link target %q leaves the archive root", h.Name, h.Linkname)
	}
	return nil
}

// HasDotDot reports whether any element of the slash path name is "..".
func HasDotDot(name string) bool {
	return slices.Contains(strings.Split(name, "/"), "..")
}
