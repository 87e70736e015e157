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
	"maps"
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
	// own holds the names this layer has unpacked so far, as the tar names
	// them: what its hard links may link to.
	own := map[string]bool{}
	var o *order
	var re *reopen
	if opts.Overlay {
		re = &reopen{tree: tree, own: own, whited: map[string]bool{}, dirs: map[string]bool{}}
	} else {
		o = &order{tree: tree, w: w, own: own, dirs: map[string]bool{}, pending: map[string]*pending{}}
		defer o.cleanup()
	}
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
		name := confine.Clean(h.Name)
		if h.Typeflag == tar.TypeLink {
			if target := confine.Clean(h.Linkname); !own[target] {
				return false, fmt.Errorf("tar entry %q: %w", h.Name, &LinkError{Target: target})
			}
		}
		if o != nil {
			if err := o.route(h); err != nil {
				return false, err
			}
		}
		if re != nil {
			if err := re.saw(name, h); err != nil {
				return false, err
			}
		}
		if !isWhiteout(name) {
			own[name] = true
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
	err = root.InDir(dir, func(target string) error {
		w.target = target
		_, err := carchive.Apply(ctx, target, r, copts...)
		return err
	})
	if err == nil && o != nil {
		err = o.finish()
	}
	if err == nil && re != nil {
		err = re.finish()
	}
	return err
}

// reopen keeps a layer unpacked on its own (Overlay) true to the same
// layer applied in order where it whites out a path and then has entries
// at or below it: applied in order, the whiteout removes the lower
// layers' entry and the layer's own start afresh there; unpacked on its
// own, the layer's directory would replace the whiteout and merge with
// the lower layers' directory (or, for entries below it, find the
// whiteout in the way). Such a directory is made opaque instead.
type reopen struct {
	tree *confine.Root
	own  map[string]bool
	// whited are the paths this layer whited out before it had an entry
	// there; dirs the directories that replace such a whiteout.
	whited, dirs map[string]bool
}

func (re *reopen) saw(name string, h *tar.Header) error {
	base := path.Base("/" + name)
	if base == whiteoutOpaque {
		return nil
	}
	if strings.HasPrefix(base, whiteoutPrefix) {
		target := path.Join(path.Dir(name), strings.TrimPrefix(base, whiteoutPrefix))
		if !re.own[target] {
			re.whited[target] = true
		}
		return nil
	}
	if re.whited[name] && h.Typeflag == tar.TypeDir {
		re.dirs[name] = true // containerd replaces the whiteout with it
	}
	// A whited-out parent: the directory containerd would have made had
	// the whiteout not been there.
	for d := path.Dir(name); d != "." && d != "/"; d = path.Dir(d) {
		if !re.whited[d] || re.dirs[d] {
			continue
		}
		fi, err := re.tree.Lstat(d)
		if err != nil || fi.Mode()&fs.ModeCharDevice == 0 {
			continue
		}
		if err := re.tree.Remove(d); err != nil {
			return err
		}
		if err := re.tree.MkdirAll(d, 0o755, os.Geteuid(), os.Getegid()); err != nil {
			return err
		}
		re.dirs[d] = true
	}
	return nil
}

// finish marks the directories that replaced the layer's own whiteouts
// opaque, as overlayfs reads them.
func (re *reopen) finish() error {
	for _, d := range slices.Sorted(maps.Keys(re.dirs)) {
		fi, err := re.tree.Lstat(d)
		if err != nil || !fi.IsDir() {
			continue // replaced again
		}
		err = re.tree.InDir(d, func(dir string) error {
			return unix.Setxattr(dir+"/.", "trusted.overlay.opaque", []byte("y"), 0)
		})
		if err != nil {
			return fmt.Errorf("mark %s opaque: %w", d, err)
		}
	}
	return nil
}

// LinkError is a hard link to a name its own layer has not unpacked
// before it: a file of a lower layer (or a later entry). Applied in order
// onto one tree the link could share the lower file's inode; a layer
// unpacked on its own (the layer store) has no such file, so both refuse
// it, and tools that write layers never make one.
type LinkError struct {
	Target string
}

func (e *LinkError) Error() string {
	return fmt.Sprintf("hard link to %s, which this layer has not unpacked before the link: a layer may link only to its own files "+
		"(the layer store unpacks each layer on its own); rebuild the layer with the file itself instead of a link to a lower layer's", "/"+e.Target)
}

// BelowLowerError is a layer that puts entries below a path that a lower
// layer made a symlink (or another non-directory) without a directory
// entry of its own for that path anywhere in the layer. Applied in order
// onto one tree the entries would go through the link (or fail); unpacked
// on its own the layer has a directory there, which overlayfs shows
// instead of the link. Layers made by diffing trees never do this (they
// record usr/bin/tool, or carry bin/ itself); both stores refuse it alike.
type BelowLowerError struct {
	// Dir is the path, Kind what the lower layer made it ("a symlink"),
	// Layer and Lower the 1-based layers when the caller knows them.
	Dir, Kind    string
	Layer, Lower int
}

func (e *BelowLowerError) Error() string {
	who, lower := "the layer", "a lower layer"
	if e.Layer > 0 {
		who = fmt.Sprintf("layer %d", e.Layer)
	}
	if e.Lower > 0 {
		lower = fmt.Sprintf("layer %d", e.Lower)
	}
	return fmt.Sprintf("%s puts entries below /%s, which %s made %s, and has no directory entry of its own for /%s: "+
		"applied in order they would go through it, unpacked on its own the layer shows a directory there, so neither store takes it; "+
		"rebuild the layer with the entries at their real paths (or with a directory entry for /%s, which replaces the lower %s)",
		who, e.Dir, lower, e.Kind, e.Dir, e.Dir, strings.TrimPrefix(strings.TrimPrefix(e.Kind, "a "), "an "))
}

// KindOf names what a non-directory is, for BelowLowerError.
func KindOf(m fs.FileMode) string {
	switch {
	case m&fs.ModeSymlink != 0:
		return "a symlink"
	case m.IsRegular():
		return "a file"
	}
	return "a " + strings.TrimPrefix(strings.ToLower(m.Type().String()), "-") + " entry"
}

func isWhiteout(name string) bool { return strings.HasPrefix(path.Base("/"+name), whiteoutPrefix) }

// order makes a layer applied onto the tree of its lower layers (the
// flattened pull) come out as the same layer unpacked on its own and
// stacked by overlayfs (the layer store), whatever the order of its
// entries. In a layer's own tree every path its entries lie below is a
// directory; where a lower layer has a non-directory there (a symlink,
// say), overlayfs shows the layer's directory instead. Applied in order,
// an entry x/file before the layer's own x/ would go through the lower
// symlink x (and x/ then replace the link, losing the file). So an entry
// below a lower non-directory waits in a stash in the tree until the
// layer declares that directory, when the stash becomes it; a layer that
// never declares it is refused (BelowLowerError), as the layer store
// refuses it.
type order struct {
	tree *confine.Root
	w    *whiteouts
	own  map[string]bool
	// dirs are paths known to be directories in the tree now (saves a
	// lookup per entry and level).
	dirs map[string]bool
	// stash is the directory in the tree the waiting entries are in, made
	// when the first one comes; pending the lower non-directories that
	// entries wait below, by path.
	stash   string
	n       int
	pending map[string]*pending
}

type pending struct {
	dir  string // its stash directory, relative to the tree
	kind string // what the lower layer made it
	// whited: the layer whites the path out after entries below it, which
	// hides nothing of its own; the layer store refuses it as one with no
	// directory entry there, and so does finish.
	whited bool
	hdrs   []*tar.Header // directory entries routed into the stash: containerd sets their times at the end, by name
	orig   []string      // their names in the layer
}

// route sends h below its stash when one of its parents is a lower
// non-directory, and turns a stash into its directory when h declares it.
func (o *order) route(h *tar.Header) error {
	name := confine.Clean(h.Name)
	if name == "" {
		return nil
	}
	if p := o.pending[name]; p != nil {
		// The layer's own entry at the path: a directory takes the stash
		// in place of the lower non-directory; anything else replaces both.
		if h.Typeflag == tar.TypeDir {
			if err := o.tree.RemoveAll(name); err != nil {
				return err
			}
			if err := o.tree.Rename(p.dir, name); err != nil {
				return err
			}
			for i, hdr := range p.hdrs {
				hdr.Name = p.orig[i]
			}
			o.dirs[name] = true
		} else {
			if err := o.tree.RemoveAll(p.dir); err != nil {
				return err
			}
			for i, hdr := range p.hdrs {
				hdr.Name = p.orig[i] // gone with the stash, as in the layer's own tree
			}
		}
		delete(o.pending, name)
		return nil
	}
	if h.Typeflag == tar.TypeLink {
		to, ok, err := o.stashed(confine.Clean(h.Linkname), false)
		if err != nil {
			return err
		}
		if ok {
			h.Linkname = to
		}
	}
	to, ok, err := o.stashed(name, true)
	if err != nil || !ok {
		if err == nil {
			o.saw(name, h)
		}
		return err
	}
	if h.Typeflag == tar.TypeDir {
		p := o.pending[o.below(name)]
		p.hdrs, p.orig = append(p.hdrs, h), append(p.orig, name)
	}
	h.Name = to
	return nil
}

// below is the pending path name is below.
func (o *order) below(name string) string {
	for d := path.Dir(name); d != "."; d = path.Dir(d) {
		if o.pending[d] != nil {
			return d
		}
	}
	return ""
}

// stashed returns where name goes when one of its parents is a lower
// non-directory: below that one's stash (made when add is set).
func (o *order) stashed(name string, add bool) (string, bool, error) {
	elems := strings.Split(name, "/")
	for i := 1; i < len(elems); i++ {
		d := strings.Join(elems[:i], "/")
		if p := o.pending[d]; p != nil {
			return path.Join(p.dir, strings.Join(elems[i:], "/")), true, nil
		}
		if o.dirs[d] {
			continue
		}
		fi, err := o.tree.Lstat(d)
		switch {
		case errors.Is(err, fs.ErrNotExist):
			return name, false, nil // containerd makes the rest
		case err != nil:
			return "", false, err
		case fi.IsDir():
			o.dirs[d] = true
			continue
		case o.own[d] || !add:
			// The layer's own symlink (or file): its own tree has the
			// same, and containerd resolves through it alike.
			return name, false, nil
		}
		if o.stash == "" {
			s, err := o.tree.MkdirTemp("/", ".nodespawn-order-", 0o700)
			if err != nil {
				return "", false, err
			}
			o.stash = confine.Clean(s)
			o.w.unpacked["/"+o.stash] = true // an opaque root keeps it
		}
		p := &pending{dir: path.Join(o.stash, fmt.Sprint(o.n)), kind: KindOf(fi.Mode())}
		o.n++
		// What containerd's mkparent would make: 0755, the caller's.
		if err := o.tree.Mkdir(p.dir, 0o755, os.Geteuid(), os.Getegid()); err != nil {
			return "", false, err
		}
		o.w.unpacked["/"+p.dir] = true
		o.pending[d] = p
		return path.Join(p.dir, strings.Join(elems[i:], "/")), true, nil
	}
	return name, false, nil
}

// saw keeps dirs true to the tree after the entry h at name (not stashed).
func (o *order) saw(name string, h *tar.Header) {
	base := path.Base(name)
	switch {
	case base == whiteoutOpaque:
		o.forget(path.Dir(name), false)
	case strings.HasPrefix(base, whiteoutPrefix):
		target := path.Join(path.Dir(name), strings.TrimPrefix(base, whiteoutPrefix))
		if p := o.pending[target]; p != nil {
			p.whited = true
		}
		o.forget(target, true)
	case h.Typeflag == tar.TypeDir:
		o.dirs[name] = true
	case o.dirs[name]:
		o.forget(name, true)
	}
}

// forget drops what is below d (and d itself when self is set) from dirs.
func (o *order) forget(d string, self bool) {
	if d == "." {
		d = ""
	}
	if self {
		delete(o.dirs, d)
	}
	for k := range o.dirs {
		if d == "" || strings.HasPrefix(k, d+"/") {
			delete(o.dirs, k)
		}
	}
}

// finish settles what still waits at the layer's end: a stash whose lower
// non-directory the layer removed with an opaque parent becomes its
// directory, as one containerd would have made; one still below a lower
// non-directory, or whose own whiteout came after it, is refused.
func (o *order) finish() error {
	for _, d := range slices.Sorted(maps.Keys(o.pending)) {
		p := o.pending[d]
		fi, err := o.tree.Lstat(d)
		if err == nil {
			if fi.IsDir() {
				// A lower directory cannot appear; the layer's own came
				// through route. Nothing else makes one.
				return fmt.Errorf("internal error: %s became a directory while entries waited for it", o.tree.Show(d))
			}
			return &BelowLowerError{Dir: d, Kind: p.kind}
		}
		if !errors.Is(err, fs.ErrNotExist) {
			return err
		}
		if p.whited {
			return &BelowLowerError{Dir: d, Kind: p.kind}
		}
		if err := o.tree.MkdirAll(path.Dir(d), 0o755, os.Geteuid(), os.Getegid()); err != nil {
			return err
		}
		if err := o.tree.Rename(p.dir, d); err != nil {
			return err
		}
		delete(o.pending, d)
	}
	return nil
}

// cleanup removes the stash (empty unless the layer failed).
func (o *order) cleanup() {
	if o.stash != "" {
		o.tree.RemoveAll(o.stash)
	}
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

// saw records a layer entry, by its path in the tree, and the directories
// above it: the layer's own tree has them too (made for the entry if the
// layer has no entry of its own for them), so an opaque whiteout in the
// layer keeps them.
func (w *whiteouts) saw(name string) {
	rel := "/" + confine.Clean(name)
	if strings.HasPrefix(path.Base(rel), whiteoutPrefix) {
		rel = path.Dir(rel)
	}
	for ; rel != "/" && !w.unpacked[rel]; rel = path.Dir(rel) {
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
