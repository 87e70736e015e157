package layers

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"path"
	"slices"
	"strings"
	"time"

	"github.com/coreos/go-systemd/v22/unit"
	"github.com/moby/sys/mountinfo"
	"github.com/opencontainers/go-digest"
	"golang.org/x/sys/unix"

	"github.com/nodespawn/nodespawn/internal/confine"
	"github.com/nodespawn/nodespawn/internal/layout"
	"github.com/nodespawn/nodespawn/internal/rootfs"
)

// Machine is a machine root composed with overlayfs, all paths in the
// store's root (the host root):
//
//	Target          the mount point, e.g. /var/lib/machines/kube1
//	Dir/upper       what is written to the machine's root
//	Dir/work        overlayfs's work directory (same filesystem as upper)
//	Dir/image.json  the record: which image and which layers, bottom first
//
// Nothing else mounts Target: apply mounts it with Compose, and at boot the
// machine's service runs `nodespawn mount-root`, which reads the record and
// mounts it the same way (Mount).
type Machine struct {
	Target string
	Dir    string
	// Unit is where nodespawn before the root was mounted by the machine's
	// service wrote a systemd mount unit for Target (see LegacyUnit):
	// Compose and RemoveRoot delete it when nodespawn wrote it, so that
	// no boot mounts the root another way.
	Unit string
	// Machine is the machine's name, for messages.
	Machine string
}

// Image is what a composed root holds: the record Compose writes and
// compares.
type Image struct {
	Source   string        `json:"source"`
	Platform string        `json:"platform"`
	Manifest digest.Digest `json:"manifest"`
	// Layers are the image's DiffIDs, bottom layer first, as the image
	// lists them (a layer listed twice is here twice; LowerLayers says
	// what is mounted).
	Layers []digest.Digest `json:"layers"`
}

// RecordName is the record's name in Machine.Dir.
const RecordName = "image.json"

// maxOptions bounds the mount options of a mount(2) call, which the
// kernel takes as one page: every lower directory is named there, so on a
// kernel without layers by descriptor it bounds the layers of one root
// (about 40 with the store under /var/lib/nodespawn).
const maxOptions = 4000

// MaxStack is the most lower layers one overlayfs mount stacks
// (OVL_MAX_STACK in the kernel), however they are passed.
const MaxStack = 500

// flags are the overlayfs settings every root is mounted with:
// redirect_dir=nofollow and metacopy=off make overlayfs ignore redirect
// and metacopy xattrs a layer might carry (the unpacking refuses them
// too); index=off keeps the lower layers shareable by several mounts.
var flags = [][2]string{{"redirect_dir", "nofollow"}, {"metacopy", "off"}, {"index", "off"}}

// LowerLayers are the layers an overlayfs mount of a root made of layers
// (bottom first) stacks, top layer first.
//
// A layer the image lists more than once is stacked once, at its topmost
// position (overlayfs refuses a directory twice among its layers, ELOOP).
// The lower copy adds nothing: a lookup that reaches it has already passed
// the same tree higher up, where every entry of it was found (a file, a
// whiteout, an opaque directory end the lookup there) or merged (a
// directory's entries are listed from the higher copy first, and the lower
// copy has no name the higher one lacks). So the view is the same without
// it, and the same as the flat tree that applies the image's layers in
// order, where the last copy's entries are written last.
//
// The list then stops at the topmost layer whose root is opaque: overlayfs
// ignores the opaque mark on a lower directory's root, so the layers below
// it are left out instead.
func (s *Store) LowerLayers(layers []digest.Digest) []digest.Digest {
	var lower []digest.Digest
	seen := map[digest.Digest]bool{}
	for _, id := range slices.Backward(layers) {
		if seen[id] {
			continue
		}
		seen[id] = true
		lower = append(lower, id)
		if opaqueRoot(s.HostPath(id)) {
			break
		}
	}
	return lower
}

// Distinct is how many different layers layers (DiffIDs) lists: the most
// a root of them stacks, known before any layer is fetched.
func Distinct(layers []digest.Digest) int {
	seen := map[digest.Digest]bool{}
	for _, id := range layers {
		seen[id] = true
	}
	return len(seen)
}

// TooDeepError is a root with more layers than one overlayfs mount takes
// on this kernel.
type TooDeepError struct {
	Layers, Max int
}

func (e *TooDeepError) Error() string {
	return fmt.Sprintf("the image has %d layers, and one overlayfs mount on this kernel takes at most %d (a kernel before Linux 6.13 names every layer in one page of mount options); squash the image or set machine.rootfs.store to flat (auto flattens such an image)",
		e.Layers, e.Max)
}

// MaxLayers is the most layers one mount of m's root takes on this
// kernel: MaxStack where overlayfs takes its layers by descriptor, else
// what fits in one page of options (ClassicMaxLayers).
func (s *Store) MaxLayers(m Machine) int {
	if KernelTakesLayerFDs() {
		return MaxStack
	}
	return ClassicMaxLayers(s.root.Dir(), s.dir, m.Dir)
}

// ClassicMaxLayers is the most layers a mount(2) call's one page of
// options names (each by its path: prefix, the host path of the root the
// store is in, joined with the store's directory store), with the upper
// and work directories in overlayDir; at most MaxStack.
func ClassicMaxLayers(prefix, store, overlayDir string) int {
	layer := len(path.Join(prefix, store, string(digest.SHA256))) + 1 + digest.SHA256.Size()*2
	dir := path.Join(prefix, overlayDir)
	fixed := len(classicOptions(nil, path.Join(dir, "upper"), path.Join(dir, "work")))
	// n layers add n paths and n-1 colons.
	return min(MaxStack, (maxOptions-fixed+1)/(layer+1))
}

// classicOptions are the mount(2) options naming lower (top first), upper
// and work by path.
func classicOptions(lower []string, upper, work string) string {
	opts := "lowerdir=" + strings.Join(lower, ":") + ",upperdir=" + upper + ",workdir=" + work
	for _, f := range flags {
		opts += "," + f[0] + "=" + f[1]
	}
	return opts
}

// opaqueRoot reports whether the layer directory dir (a host path) has an
// opaque root: the layer began with an opaque whiteout at its top.
func opaqueRoot(dir string) bool {
	b := make([]byte, 2)
	n, err := unix.Lgetxattr(dir, "trusted.overlay.opaque", b)
	return err == nil && string(b[:n]) == "y"
}

// UnitName is systemd's name for the mount unit of target (a host path).
func UnitName(target string) string { return unit.UnitNamePathEscape(target) + ".mount" }

// LegacyUnit is where nodespawn once wrote the mount unit that mounted the
// root at target (a host path) at boot, before the machine's service
// mounted it itself.
func LegacyUnit(target string) string { return path.Join(layout.UnitDir, UnitName(target)) }

// unitHeader starts every mount unit nodespawn wrote.
const unitHeader = "# Written by nodespawn"

// RemoveLegacyUnit removes the mount unit at unitPath (a path in root)
// when nodespawn wrote it (it starts with nodespawn's header); a unit
// someone else wrote there is left alone and reported, since systemd
// would mount the root with it at boot. removed is true when it went.
func RemoveLegacyUnit(root *confine.Root, unitPath string, log *slog.Logger) (removed bool, err error) {
	if unitPath == "" {
		return false, nil
	}
	fi, err := root.Lstat(unitPath)
	if errors.Is(err, fs.ErrNotExist) {
		return false, nil
	}
	if err != nil {
		return false, err
	}
	head := make([]byte, len(unitHeader))
	if fi.Mode().IsRegular() {
		f, err := root.OpenNoFollow(unitPath)
		if err != nil {
			return false, err
		}
		n, _ := io.ReadFull(f, head)
		head = head[:n]
		f.Close()
	}
	if string(head) != unitHeader {
		log.Warn("a mount unit nodespawn did not write is at the machine root's path; systemd mounts the root with it at boot", "unit", root.Show(unitPath))
		return false, nil
	}
	if err := root.Remove(unitPath); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return false, err
	}
	log.Info("removed the mount unit an older nodespawn wrote; the machine's service mounts its root now", "unit", root.Show(unitPath))
	return true, nil
}

// ReadImage returns the record of the root in dir, nil when there is none
// (or it is not whole).
func ReadImage(root *confine.Root, dir string) (*Image, error) {
	b, err := root.ReadFile(path.Join(dir, RecordName))
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var img Image
	if err := json.Unmarshal(b, &img); err != nil {
		return nil, fmt.Errorf("%s: %w", root.Show(path.Join(dir, RecordName)), err)
	}
	return &img, nil
}

func (img *Image) same(o *Image) bool {
	return o != nil && img.Manifest == o.Manifest && img.Platform == o.Platform && slices.Equal(img.Layers, o.Layers)
}

// Compose makes m.Target the overlay of img's layers (all in the store)
// with m's upper directory, and mounts it now; the machine's service mounts
// it the same way at boot (Mount). A root already composed of img is
// mounted if it is not and otherwise left as it is (what the machine wrote
// stays); a root of another image is unmounted and its upper directory
// emptied first. The record is written only once the upper directory is
// fresh, so a crash at any point leaves either the old record (and a rerun
// redoes the work) or the new one with its upper directory ready. A mount
// unit an older nodespawn wrote for the root is removed. changed is false
// when nothing needed doing.
func (s *Store) Compose(ctx context.Context, m Machine, img Image, log *slog.Logger) (changed bool, err error) {
	root := s.root
	if err := s.check(m, img); err != nil {
		return false, err
	}
	// What a run killed while it wrote the record left beside it.
	if err := root.RemoveStaleTemps(m.Dir); err != nil {
		return false, err
	}
	have, err := ReadImage(root, m.Dir)
	if err != nil {
		return false, fmt.Errorf("overlay root %s: %w", root.Show(m.Target), err)
	}
	if !img.same(have) {
		changed = true
		if err := Unmount(ctx, root, m.Target, 30*time.Second, log); err != nil {
			return true, err
		}
		if err := root.Remove(path.Join(m.Dir, RecordName)); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return true, err
		}
		if err := root.MkdirAll(m.Dir, 0o700, 0, 0); err != nil {
			return true, err
		}
		for _, d := range []string{"upper", "work"} {
			if err := root.RemoveAll(path.Join(m.Dir, d)); err != nil {
				return true, err
			}
			if err := root.Mkdir(path.Join(m.Dir, d), 0o755, 0, 0); err != nil {
				return true, err
			}
		}
		if err := root.SyncDir(m.Dir); err != nil {
			return true, err
		}
		rec, err := json.MarshalIndent(img, "", "  ")
		if err != nil {
			return true, err
		}
		if err := root.WriteFile(path.Join(m.Dir, RecordName), append(rec, '\n'), 0o600, 0, 0); err != nil {
			return true, err
		}
		log.Info("overlay root prepared", "target", root.Show(m.Target), "layers", len(img.Layers), "manifest", img.Manifest)
	}
	if removed, err := RemoveLegacyUnit(root, m.Unit, log); err != nil {
		return changed, err
	} else if removed {
		changed = true
	}
	mounted, err := s.mount(ctx, m, img, log)
	return changed || mounted, err
}

// Mount mounts m's root as its record says, for the machine's service at
// boot (`nodespawn mount-root`): the same mount Compose makes, changing
// nothing else. A root already mounted of its layers is left as it is.
// found is false when m has no record: its root is not made of layers
// (a flattened tree), and nothing is done.
func (s *Store) Mount(ctx context.Context, m Machine, log *slog.Logger) (found bool, err error) {
	img, err := ReadImage(s.root, m.Dir)
	if err != nil || img == nil {
		return false, err
	}
	if err := s.check(m, *img); err != nil {
		return true, err
	}
	_, err = s.mount(ctx, m, *img, log)
	return true, err
}

// check refuses a root whose layers are not all in the store, or more than
// one mount of them takes here.
func (s *Store) check(m Machine, img Image) error {
	if len(img.Layers) == 0 {
		return fmt.Errorf("overlay root %s: the image has no layers", s.root.Show(m.Target))
	}
	for _, id := range img.Layers {
		if ok, err := s.Has(id); err != nil || !ok {
			if err == nil {
				err = fmt.Errorf("layer %s is not in the store", id)
			}
			return fmt.Errorf("overlay root %s: %w", s.root.Show(m.Target), err)
		}
	}
	if n := len(s.LowerLayers(img.Layers)); n > MaxStack {
		return fmt.Errorf("overlay root %s: %w", s.root.Show(m.Target), &TooDeepError{Layers: n, Max: MaxStack})
	}
	return nil
}

// mount mounts m's root of img's layers unless it is mounted of them
// already; a root mounted of other layers (by hand, or a record changed
// under it) is unmounted first. mounted is true when it mounted.
func (s *Store) mount(ctx context.Context, m Machine, img Image, log *slog.Logger) (mounted bool, err error) {
	root := s.root
	lower := s.LowerLayers(img.Layers)
	have, super, err := mountedIn(root, m.Target)
	if err != nil {
		return false, err
	}
	if have {
		if slices.Equal(mountedLayers(super), lower) {
			return false, nil
		}
		if err := Unmount(ctx, root, m.Target, 30*time.Second, log); err != nil {
			return false, err
		}
	}
	if err := s.prepareTarget(m.Target); err != nil {
		return false, err
	}
	how, err := s.mountLayers(m, lower)
	if err != nil {
		return false, err
	}
	log.Info("overlay root mounted", "target", root.Show(m.Target), "layers", len(lower), "imageLayers", len(img.Layers), "by", how)
	return true, nil
}

// classicOnly makes mountLayers use mount(2) with path options whatever
// the kernel can do, for tests of that way; so does ByPathEnv=1 in the
// environment, for tests of whole runs (and to try that way by hand).
var classicOnly bool

// ByPathEnv, set to 1, makes every overlayfs mount name its layers by path
// in one page of mount(2) options, as on a kernel before Linux 6.13.
const ByPathEnv = "NODESPAWN_OVERLAY_BY_PATH"

func byPathOnly() bool { return classicOnly || os.Getenv(ByPathEnv) == "1" }

// mountLayers mounts the overlay of lower (top first) with m's upper and
// work directories at m.Target. Every directory is opened first through
// the root (OpenDirFD: resolved inside it, the last element never a
// symlink), and the kernel gets those very directories: by descriptor
// where overlayfs takes them (fsopen, fsconfig FSCONFIG_SET_FD with
// upperdir, workdir and lowerdir+, fsmount, move_mount onto the opened
// mount point; Linux 6.13 and later), else by path in one page of mount(2)
// options, each path checked to lead to the opened directory just before
// the call. how says which.
func (s *Store) mountLayers(m Machine, lower []digest.Digest) (how string, err error) {
	root := s.root
	var files []*os.File
	defer func() {
		for _, f := range files {
			f.Close()
		}
	}()
	open := func(p string) (dir, error) {
		f, err := root.OpenDirFD(p)
		if err != nil {
			return dir{}, fmt.Errorf("overlay root %s: %w", root.Show(m.Target), err)
		}
		files = append(files, f)
		return dir{fd: int(f.Fd()), path: path.Join(root.Dir(), p)}, nil
	}
	var lowers []dir
	for _, id := range lower {
		d, err := open(s.Path(id))
		if err != nil {
			return "", err
		}
		lowers = append(lowers, d)
	}
	upper, err := open(path.Join(m.Dir, "upper"))
	if err != nil {
		return "", err
	}
	work, err := open(path.Join(m.Dir, "work"))
	if err != nil {
		return "", err
	}
	target, err := open(m.Target)
	if err != nil {
		return "", err
	}
	if !byPathOnly() {
		err := mountFDs(lowers, upper, work, target)
		if !errors.Is(err, errNoLayerFDs) {
			if err != nil {
				return "", fmt.Errorf("overlay root: mount %s (%d layers by descriptor): %w", root.Show(m.Target), len(lowers), err)
			}
			return "descriptor", nil
		}
	}
	var paths []string
	for _, d := range lowers {
		paths = append(paths, d.path)
	}
	opts := classicOptions(paths, upper.path, work.path)
	for _, p := range append(paths[:1:1], upper.path) {
		if strings.ContainsAny(p, " \\\n\t\"',:") {
			return "", fmt.Errorf("overlay root: %s: a path with a space, quote, backslash, comma or colon cannot be an overlayfs option", p)
		}
	}
	if len(opts) > maxOptions {
		return "", fmt.Errorf("overlay root %s: %w", root.Show(m.Target),
			&TooDeepError{Layers: len(lower), Max: ClassicMaxLayers(root.Dir(), s.dir, m.Dir)})
	}
	// The kernel resolves these strings itself, following every symlink
	// on the host: each must lead to the directory opened in the root.
	for _, d := range append(lowers, upper, work) {
		if err := d.verify(); err != nil {
			return "", fmt.Errorf("overlay root %s: %w", root.Show(m.Target), err)
		}
	}
	// The mount point by its descriptor's /proc entry: the kernel follows
	// it to exactly the opened directory.
	if err := unix.Mount("overlay", procSelfFD(target.fd), "overlay", 0, opts); err != nil {
		return "", fmt.Errorf("overlay root: mount %s: %w (options %s)", root.Show(m.Target), err, opts)
	}
	return "path", nil
}

// dir is a directory opened in the root (fd, O_PATH) and the host path
// that names it.
type dir struct {
	fd   int
	path string
}

// verify checks that the host path names the opened directory now.
func (d dir) verify() error {
	var held, named unix.Stat_t
	if err := unix.Fstat(d.fd, &held); err != nil {
		return err
	}
	if err := unix.Stat(d.path, &named); err != nil {
		return fmt.Errorf("%s: %w", d.path, err)
	}
	if held.Dev != named.Dev || held.Ino != named.Ino {
		return fmt.Errorf("%s does not lead to the directory opened inside the root (a symlink on the way leads out of it); refusing to mount it", d.path)
	}
	return nil
}

func procSelfFD(fd int) string { return fmt.Sprintf("/proc/self/fd/%d", fd) }

// errNoLayerFDs is a kernel whose overlayfs does not take its layers by
// descriptor.
var errNoLayerFDs = errors.New("overlayfs does not take layers by descriptor here")

// mountFDs mounts the overlay of lower (top first), upper and work at
// target with the new mount API, every directory by its descriptor. It
// returns errNoLayerFDs, having mounted nothing, where the kernel lacks
// that (no fsopen, or overlayfs refusing a descriptor for upperdir as an
// invalid or unsupported parameter).
func mountFDs(lower []dir, upper, work, target dir) error {
	fsfd, err := unix.Fsopen("overlay", unix.FSOPEN_CLOEXEC)
	if errors.Is(err, unix.ENOSYS) {
		return errNoLayerFDs
	}
	if err != nil {
		return fmt.Errorf("fsopen: %w", err)
	}
	defer unix.Close(fsfd)
	if err := unix.FsconfigSetFd(fsfd, "upperdir", upper.fd); err != nil {
		// Overlayfs on the new mount API but without descriptors for its
		// layers (6.5 to 6.12) says EINVAL; older kernels, where it is
		// still a legacy filesystem (Debian 12's 6.1), EOPNOTSUPP.
		if errors.Is(err, unix.EINVAL) || errors.Is(err, unix.EOPNOTSUPP) {
			return errNoLayerFDs
		}
		return fsError(fsfd, "upperdir "+upper.path, err)
	}
	if err := unix.FsconfigSetFd(fsfd, "workdir", work.fd); err != nil {
		return fsError(fsfd, "workdir "+work.path, err)
	}
	for _, l := range lower {
		if err := unix.FsconfigSetFd(fsfd, "lowerdir+", l.fd); err != nil {
			return fsError(fsfd, "lowerdir+ "+l.path, err)
		}
	}
	if err := unix.FsconfigSetString(fsfd, "source", "overlay"); err != nil {
		return fsError(fsfd, "source", err)
	}
	for _, f := range flags {
		if err := unix.FsconfigSetString(fsfd, f[0], f[1]); err != nil {
			return fsError(fsfd, f[0]+"="+f[1], err)
		}
	}
	if err := unix.FsconfigCreate(fsfd); err != nil {
		return fsError(fsfd, "create", err)
	}
	mfd, err := unix.Fsmount(fsfd, unix.FSMOUNT_CLOEXEC, 0)
	if err != nil {
		return fsError(fsfd, "fsmount", err)
	}
	defer unix.Close(mfd)
	if err := unix.MoveMount(mfd, "", target.fd, "", unix.MOVE_MOUNT_F_EMPTY_PATH|unix.MOVE_MOUNT_T_EMPTY_PATH); err != nil {
		return fmt.Errorf("move_mount onto %s: %w", target.path, err)
	}
	return nil
}

// fsError is err of the fsconfig step what, with the messages the kernel
// left in the filesystem context (overlayfs says there why it refused).
func fsError(fsfd int, what string, err error) error {
	var msgs []string
	buf := make([]byte, 1024)
	for {
		n, rerr := unix.Read(fsfd, buf)
		if rerr != nil || n <= 0 {
			break
		}
		msgs = append(msgs, strings.TrimSpace(string(buf[:n])))
	}
	if len(msgs) > 0 {
		return fmt.Errorf("%s: %w (%s)", what, err, strings.Join(msgs, "; "))
	}
	return fmt.Errorf("%s: %w", what, err)
}

// KernelTakesLayerFDs reports whether this kernel's overlayfs takes its
// layers by descriptor (fsconfig FSCONFIG_SET_FD with lowerdir+: Linux
// 6.13 and later), so that one root stacks up to MaxStack layers. It
// configures a filesystem context with the root directory as a layer and
// discards it: nothing is mounted. Without the privilege to try (not
// root) it says false.
func KernelTakesLayerFDs() bool {
	fsfd, err := unix.Fsopen("overlay", unix.FSOPEN_CLOEXEC)
	if err != nil {
		return false
	}
	defer unix.Close(fsfd)
	fd, err := unix.Open("/", unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return false
	}
	defer unix.Close(fd)
	return !byPathOnly() && unix.FsconfigSetFd(fsfd, "lowerdir+", fd) == nil
}

// prepareTarget makes the mount point an empty directory. A flattened
// rootfs nodespawn made there before (a host that could not do overlayfs
// then) is removed; anything else there is refused.
func (s *Store) prepareTarget(target string) error {
	root := s.root
	fi, err := root.Lstat(target)
	if errors.Is(err, fs.ErrNotExist) {
		// A marker a kill left after its tree went names nothing.
		if err := root.Remove(rootfs.MarkerPath(target)); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return err
		}
		return root.MkdirAll(target, 0o755, 0, 0)
	}
	if err != nil {
		return err
	}
	if !fi.IsDir() {
		return fmt.Errorf("overlay root: %s exists and is not a directory", root.Show(target))
	}
	es, err := root.ReadDir(target)
	if err != nil || len(es) == 0 {
		return err
	}
	flat := rootfs.New(root, target)
	if !flat.Owned() {
		return fmt.Errorf("overlay root: %s is not empty and nodespawn did not make it; move it away or remove it", root.Show(target))
	}
	// The tree first, its marker last: a kill in between finds the marker
	// still naming the directory and goes on.
	if err := root.RemoveAll(target); err != nil {
		return err
	}
	if err := root.Remove(rootfs.MarkerPath(target)); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	return root.Mkdir(target, 0o755, 0, 0)
}

// mountedLayers are the layers (top first) an overlayfs mount with the
// super options super stacks, as the mount table shows them: the lower
// directories named by lowerdir= (colon separated, mount(2)) or one
// lowerdir+= each (layers by descriptor, shown by their paths), each of
// the form .../sha256/<hex> in a layer store. A lower directory of
// another form gives nil: not a root of layers alone.
func mountedLayers(super string) []digest.Digest {
	var ids []digest.Digest
	for _, dir := range lowerDirs(super) {
		id, ok := layerOf(dir)
		if !ok {
			return nil
		}
		ids = append(ids, id)
	}
	return ids
}

// lowerDirs are the lower directories in the super options of an overlayfs
// mount, top first, as the mount table shows them: with the kernel's
// octal escapes (\040 for a space) left in, which only layerOf reads and
// which cannot change its answer: escaping never adds or removes a '/',
// and a layer's last two names (sha256, the hex) have no character the
// kernel escapes.
func lowerDirs(super string) []string {
	var dirs []string
	for _, o := range strings.Split(super, ",") {
		if v, ok := strings.CutPrefix(o, "lowerdir="); ok {
			// mount(2) options: one colon-separated list; overlayfs shows
			// a colon in a name as "\:", which the store's names never have.
			dirs = append(dirs, strings.Split(v, ":")...)
		}
		if v, ok := strings.CutPrefix(o, "lowerdir+="); ok {
			dirs = append(dirs, v)
		}
	}
	return dirs
}

// layerOf is the DiffID of a layer directory path .../sha256/<hex>.
func layerOf(dir string) (digest.Digest, bool) {
	parent, hex := path.Split(dir)
	if path.Base(parent) != string(digest.SHA256) {
		return "", false
	}
	id := digest.NewDigestFromEncoded(digest.SHA256, hex)
	return id, id.Validate() == nil
}

// Unmount unmounts target (a path in root) when something is mounted
// there, retrying while it is busy (a machine's processes going away) up
// to timeout.
func Unmount(ctx context.Context, root *confine.Root, target string, timeout time.Duration, log *slog.Logger) error {
	deadline := time.Now().Add(timeout)
	for {
		host, err := kernelPath(root, target)
		if err != nil || host == "" {
			return err
		}
		mounted, _, err := MountedAt(host)
		if err != nil || !mounted {
			return err
		}
		err = unix.Unmount(host, unix.UMOUNT_NOFOLLOW)
		if err == nil {
			log.Info("unmounted", "path", root.Show(target))
			continue // something may be mounted below it too
		}
		if !errors.Is(err, unix.EBUSY) || time.Now().After(deadline) {
			return fmt.Errorf("unmount %s: %w", root.Show(target), err)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// kernelPath is where target (a path in root) is as the mount table names
// it: resolved by the kernel inside the root, symlinks on the way (a
// symlinked /var/lib/machines, say) followed; "" when it does not exist.
func kernelPath(root *confine.Root, target string) (string, error) {
	var host string
	err := root.InDir(target, func(dir string) error {
		p, err := os.Readlink(dir)
		host = p
		return err
	})
	if errors.Is(err, fs.ErrNotExist) {
		return "", nil
	}
	return host, err
}

// MountedIn is MountedAt for target, a path in root.
func MountedIn(root *confine.Root, target string) (bool, string, error) {
	return mountedIn(root, target)
}

// mountedIn is MountedAt for target, a path in root.
func mountedIn(root *confine.Root, target string) (bool, string, error) {
	host, err := kernelPath(root, target)
	if err != nil || host == "" {
		return false, "", err
	}
	return MountedAt(host)
}

// MountedAt reports whether a filesystem is mounted at host (a path as the
// kernel sees it), and the super options of the topmost one there.
func MountedAt(host string) (bool, string, error) {
	host = path.Clean(host)
	ms, err := mountinfo.GetMounts(func(m *mountinfo.Info) (skip, stop bool) {
		return m.Mountpoint != host, false
	})
	if err != nil {
		return false, "", fmt.Errorf("read the mount table: %w", err)
	}
	if len(ms) == 0 {
		return false, "", nil
	}
	// The table lists mounts in the order they were made: the last is on top.
	return true, ms[len(ms)-1].VFSOptions, nil
}

// InUse returns the layers that a mounted overlayfs uses as a lower
// directory, whatever records say. It goes by the layers' names alone
// (a lower directory .../sha256/<hex>, however the mount table shows the
// path, by descriptor or by path, through a symlinked state directory or
// not): a layer of another store that shares a DiffID is kept too, which
// errs on the safe side.
func (s *Store) InUse() (map[digest.Digest]bool, error) {
	ms, err := mountinfo.GetMounts(mountinfo.FSTypeFilter("overlay"))
	if err != nil {
		return nil, fmt.Errorf("read the mount table: %w", err)
	}
	used := map[digest.Digest]bool{}
	for _, m := range ms {
		for _, d := range lowerDirs(m.VFSOptions) {
			if id, ok := layerOf(d); ok {
				used[id] = true
			}
		}
	}
	return used, nil
}
