// Package archive is nodespawn's one tar extractor: image layers and
// downloaded archives both go through it. The unpacking itself is
// containerd's archive.Apply (whiteouts, opaque directories, hard links,
// xattrs, device nodes, ownership, and every entry kept below the target
// directory by its own resolution); the target directory is handed to it
// through the confinement layer, so the directory it starts from is the one
// the kernel resolved inside the root, whatever symlinks lead to it.
package archive

import (
	"archive/tar"
	"context"
	"fmt"
	"io"
	"slices"
	"strings"

	carchive "github.com/containerd/containerd/v2/pkg/archive"

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
}

// Apply unpacks the tar stream r into the directory dir of root. dir must
// exist; an entry already there is replaced (a directory merged).
func Apply(ctx context.Context, root *confine.Root, dir string, r io.Reader, opts Options) error {
	filter := func(h *tar.Header) (bool, error) {
		if err := checkNames(h); err != nil {
			return false, err
		}
		if opts.Filter != nil {
			return opts.Filter(h)
		}
		return true, nil
	}
	copts := []carchive.ApplyOpt{carchive.WithFilter(filter)}
	if opts.NoSameOwner {
		copts = append(copts, carchive.WithNoSameOwner())
	}
	return root.InDir(dir, func(target string) error {
		_, err := carchive.Apply(ctx, target, r, copts...)
		return err
	})
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
