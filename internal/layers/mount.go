package layers

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path"
	"slices"
	"strings"
	"time"

	"github.com/coreos/go-systemd/v22/unit"
	"github.com/opencontainers/go-digest"
	"golang.org/x/sys/unix"

	"github.com/nodespawn/nodespawn/internal/confine"
	"github.com/nodespawn/nodespawn/internal/mounts"
	"github.com/nodespawn/nodespawn/internal/rootfs"
)

// Machine is a machine root composed with overlayfs, all paths in the
// store's root (the host root):
//
//	Target          the mount point, e.g. /var/lib/machines/kube1
//	Dir/upper       what is written to the machine's root
//	Dir/work        overlayfs's work directory (same filesystem as upper)
//	Dir/image.json  the record: which image and which layers, bottom first
//	Unit            the systemd mount unit that mounts Target at boot
type Machine struct {
	Target string
	Dir    string
	Unit   string
	// Machine is the machine's name, for the unit's description and order.
	Machine string
}

// Image is what a composed root holds: the record Compose writes and
// compares.
type Image struct {
	Source   string        `json:"source"`
	Platform string        `json:"platform"`
	Manifest digest.Digest `json:"manifest"`
	// Layers are the image's DiffIDs, bottom layer first.
	Layers []digest.Digest `json:"layers"`
}

// RecordName is the record's name in Machine.Dir.
const RecordName = "image.json"

// maxOptions bounds the mount options, which the kernel takes as one
// page: every lower directory is named there, so it bounds the layers of
// one root (about 40 with the store under /var/lib/nodespawn).
const maxOptions = 4000

// MountOptions are the overlayfs options of m's root made of layers
// (bottom first), with the paths as the kernel sees them now: the lower
// directories top layer first, down to the topmost layer whose root is
// opaque (overlayfs ignores the opaque mark on a lower directory's root,
// so the layers below it are left out instead). redirect_dir=nofollow and
// metacopy=off make overlayfs ignore redirect and metacopy xattrs a layer
// might carry (the unpacking refuses them too); index=off keeps the lower
// layers shareable by several mounts.
func (s *Store) MountOptions(m Machine, layers []digest.Digest) (string, error) {
	return s.mountOptions(m, layers, s.root.Dir())
}

// mountOptions are MountOptions with every path below prefix: the root's
// own directory for a mount now, "/" for the unit a boot of the tree
// mounts.
func (s *Store) mountOptions(m Machine, layers []digest.Digest, prefix string) (string, error) {
	if len(layers) == 0 {
		return "", errors.New("overlay root: the image has no layers")
	}
	var lower []string
	for _, id := range slices.Backward(layers) {
		lower = append(lower, path.Join(prefix, s.Path(id)))
		if opaqueRoot(s.HostPath(id)) {
			break
		}
	}
	dir := path.Join(prefix, m.Dir)
	for _, p := range []string{lower[0], dir} {
		if strings.ContainsAny(p, " \\\n\t\"',:") {
			return "", fmt.Errorf("overlay root: %s: a path with a space, quote, backslash, comma or colon cannot be an overlayfs option", p)
		}
	}
	opts := "lowerdir=" + strings.Join(lower, ":") + ",upperdir=" + path.Join(dir, "upper") + ",workdir=" + path.Join(dir, "work") +
		",redirect_dir=nofollow,metacopy=off,index=off"
	if len(opts) > maxOptions {
		return "", fmt.Errorf("overlay root: the image has %d layers, too many for one overlayfs mount here (its options would be %d bytes, the kernel takes %d); squash the image or set machine.rootfs.store to flat",
			len(layers), len(opts), maxOptions)
	}
	return opts, nil
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

// unitFile is the mount unit that mounts m.Target at boot; systemd's own
// systemd-nspawn@.service requires it (RequiresMountsFor=/var/lib/machines/%i).
func (s *Store) unitFile(m Machine, img Image, opts string) []byte {
	var b bytes.Buffer
	fmt.Fprintf(&b, "# Written by nodespawn; do not edit: the next apply rewrites it.\n")
	fmt.Fprintf(&b, "# The root of machine %s: %d layers of %s (%s) from %s, and the machine's own\n# changes in %s/upper.\n\n",
		m.Machine, len(img.Layers), img.Source, img.Manifest, s.dir, m.Dir)
	fmt.Fprintf(&b, "[Unit]\nDescription=Root of nodespawn machine %s (overlay of %d image layers)\n", m.Machine, len(img.Layers))
	fmt.Fprintf(&b, "RequiresMountsFor=%s %s\n", s.dir, m.Dir)
	if m.Machine != "" {
		fmt.Fprintf(&b, "Before=systemd-nspawn@%s.service\n", m.Machine)
	}
	fmt.Fprintf(&b, "\n[Mount]\nWhat=overlay\nWhere=%s\nType=overlay\nOptions=%s\n", m.Target, opts)
	return b.Bytes()
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
// with m's upper directory, writes the mount unit that mounts it at boot,
// and mounts it now. A root already composed of img is mounted if it is
// not and otherwise left as it is (what the machine wrote stays); a root
// of another image is unmounted and its upper directory emptied first.
// The record is written only once the upper directory is fresh, so a
// crash at any point leaves either the old record (and a rerun redoes the
// work) or the new one with its upper directory ready. changed is false
// when nothing needed doing.
func (s *Store) Compose(ctx context.Context, m Machine, img Image, log *slog.Logger) (changed bool, err error) {
	root := s.root
	for _, id := range img.Layers {
		if ok, err := s.Has(id); err != nil || !ok {
			if err == nil {
				err = fmt.Errorf("layer %s is not in the store", id)
			}
			return false, fmt.Errorf("overlay root %s: %w", root.Show(m.Target), err)
		}
	}
	opts, err := s.MountOptions(m, img.Layers)
	if err != nil {
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
	mounted, mountedOpts, err := mountedIn(root, m.Target)
	if err != nil {
		return false, err
	}
	if !img.same(have) {
		changed = true
		if mounted {
			if err := Unmount(ctx, root, m.Target, 30*time.Second, log); err != nil {
				return true, err
			}
			mounted = false
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
	unitOpts, err := s.mountOptions(m, img.Layers, "/")
	if err != nil {
		return changed, err
	}
	unitBytes := s.unitFile(m, img, unitOpts)
	if old, err := root.ReadFile(m.Unit); err != nil || !bytes.Equal(old, unitBytes) {
		if err := root.MkdirAll(path.Dir(m.Unit), 0o755, 0, 0); err != nil {
			return changed, err
		}
		if err := root.WriteFile(m.Unit, unitBytes, 0o644, 0, 0); err != nil {
			return changed, err
		}
		changed = true
	}
	if mounted && mountedOpts != "" && !sameLower(mountedOpts, opts) {
		// Mounted by hand, or of other layers: not what the record says.
		if err := Unmount(ctx, root, m.Target, 30*time.Second, log); err != nil {
			return changed, err
		}
		mounted = false
	}
	if mounted {
		return changed, nil
	}
	if err := s.prepareTarget(m.Target); err != nil {
		return changed, err
	}
	err = root.InDir(m.Target, func(dir string) error {
		if err := unix.Mount("overlay", dir, "overlay", 0, opts); err != nil {
			return fmt.Errorf("overlay root: mount %s: %w (options %s)", root.Show(m.Target), err, opts)
		}
		return nil
	})
	if err != nil {
		return changed, err
	}
	log.Info("overlay root mounted", "target", root.Show(m.Target), "layers", len(img.Layers))
	return true, nil
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

// sameLower compares the lowerdir= of two option strings.
func sameLower(a, b string) bool { return optionValue(a, "lowerdir") == optionValue(b, "lowerdir") }

func optionValue(opts, key string) string {
	for _, o := range strings.Split(opts, ",") {
		if v, ok := strings.CutPrefix(o, key+"="); ok {
			return v
		}
	}
	return ""
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
	ms, err := mounts.Read()
	if err != nil {
		return false, "", err
	}
	host = path.Clean(host)
	found, opts := false, ""
	for _, m := range ms {
		if m.Point == host {
			found, opts = true, m.Super
		}
	}
	return found, opts, nil
}

// InUse returns the layers of this store that a mounted overlayfs uses as
// a lower directory, whatever records say.
func (s *Store) InUse() (map[digest.Digest]bool, error) {
	ms, err := mounts.Read()
	if err != nil {
		return nil, err
	}
	prefix := path.Join(s.root.Dir(), s.dir, string(digest.SHA256)) + "/"
	used := map[digest.Digest]bool{}
	for _, m := range ms {
		if m.FSType != "overlay" {
			continue
		}
		for _, l := range strings.Split(optionValue(m.Super, "lowerdir"), ":") {
			if hex, ok := strings.CutPrefix(l, prefix); ok {
				used[digest.NewDigestFromEncoded(digest.SHA256, hex)] = true
			}
		}
	}
	return used, nil
}
