package probe

import (
	"bytes"
	"errors"
	"fmt"
	"io/fs"
	"path/filepath"
	"sync/atomic"

	"golang.org/x/sys/unix"

	"github.com/nodespawn/nodespawn/internal/layers"
	"github.com/nodespawn/nodespawn/internal/layout"
	"github.com/nodespawn/nodespawn/plan"
)

// filesystemNames are Linux's names of the filesystems (by statfs magic)
// the state directory is commonly on.
var filesystemNames = map[int64]string{
	unix.EXT4_SUPER_MAGIC:      "ext4",
	unix.XFS_SUPER_MAGIC:       "xfs",
	unix.BTRFS_SUPER_MAGIC:     "btrfs",
	unix.TMPFS_MAGIC:           "tmpfs",
	unix.F2FS_SUPER_MAGIC:      "f2fs",
	unix.OVERLAYFS_SUPER_MAGIC: "overlayfs",
	unix.NFS_SUPER_MAGIC:       "nfs",
	unix.FUSE_SUPER_MAGIC:      "fuse",
	unix.V9FS_MAGIC:            "9p",
	unix.SQUASHFS_MAGIC:        "squashfs",
	unix.CIFS_SUPER_MAGIC:      "cifs",
	0x2fc12fc1:                 "zfs",
}

// filesystemName is Linux's name of the filesystem with statfs magic
// number t, or "0x" and t in hex.
func filesystemName(t int64) string {
	if name, ok := filesystemNames[t]; ok {
		return name
	}
	return fmt.Sprintf("%#x", t)
}

// Kernel is what the probe reports of the running kernel. It never comes
// from files under Options.Root: a machine root in a tree under Root is
// mounted by the running kernel, so the tree's own /proc and /lib/modules
// say nothing about what can mount it.
type Kernel struct {
	// Overlay is true when the kernel has overlayfs now (/proc/filesystems
	// lists it) or can load it (modules.builtin or modules.dep of its
	// release name overlay.ko).
	Overlay bool
	// LayerFDs is true when its overlayfs takes layers by descriptor
	// (layers.KernelTakesLayerFDs).
	LayerFDs bool
}

// RunningKernel reads the running kernel's facts from this host:
// /proc/filesystems, uname's release and /lib/modules/RELEASE in "/".
func RunningKernel() (Kernel, error) {
	var u unix.Utsname
	if err := unix.Uname(&u); err != nil {
		return Kernel{}, fmt.Errorf("uname: %w", err)
	}
	overlay, err := overlayInKernel("/", unix.ByteSliceToString(u.Release[:]))
	if err != nil {
		return Kernel{}, err
	}
	return Kernel{Overlay: overlay, LayerFDs: layers.KernelTakesLayerFDs()}, nil
}

// testKernel, when set, stands for the running kernel (see SetTestKernel).
var testKernel atomic.Pointer[Kernel]

// SetTestKernel makes every Gather not given Options.Kernel report k
// instead of the running kernel, until the returned function restores the
// one set before (nil: the running kernel). It is for tests that reach
// Gather only through other code, such as the CLI's apply --root on a test
// tree; nothing in nodespawn calls it. A caller that can should set
// Options.Kernel instead.
func SetTestKernel(k Kernel) (restore func()) {
	old := testKernel.Swap(&k)
	return func() { testKernel.Store(old) }
}

// kernel is the kernel facts Gather reports: opts.Kernel, else
// SetTestKernel's, else the running kernel's.
func kernel(opts Options) (Kernel, error) {
	if opts.Kernel != nil {
		return *opts.Kernel, nil
	}
	if k := testKernel.Load(); k != nil {
		return *k, nil
	}
	return RunningKernel()
}

// layerStore reports what decides whether machine roots can be overlayfs
// mounts of the layer store: the kernel's overlayfs (k), and the
// filesystem under the state directory in the tree, which holds the store
// and the machines' upper directories. render decides from them.
func (p *prober) layerStore(k Kernel) (*plan.LayerStoreFacts, error) {
	// The state directory may not exist yet, nor the tree: the nearest
	// existing parent is the filesystem it will be made on.
	dir := p.at(layout.StateDir)
	var st unix.Statfs_t
	for {
		err := unix.Statfs(dir, &st)
		if err == nil {
			break
		}
		if !errors.Is(err, unix.ENOENT) || dir == "/" {
			return nil, fmt.Errorf("statfs %s: %w", dir, err)
		}
		dir = filepath.Dir(dir)
	}
	return &plan.LayerStoreFacts{
		Overlay:            k.Overlay,
		LayerFDs:           k.LayerFDs,
		StateDirFilesystem: filesystemName(int64(st.Type)),
	}, nil
}

// overlayInKernel reports whether kernel release has overlayfs now or can
// load it, as the tree at sys ("/" for this host) says:
// sys/proc/filesystems lists it, or its module lists
// (sys/lib/modules/RELEASE/modules.builtin, modules.dep) name overlay.ko.
func overlayInKernel(sys, release string) (bool, error) {
	fss, err := readOptional(filepath.Join(sys, "/proc/filesystems"))
	if err != nil {
		return false, err
	}
	for _, l := range bytes.Split(fss, []byte("\n")) {
		if f := bytes.Fields(l); len(f) > 0 && string(f[len(f)-1]) == "overlay" {
			return true, nil
		}
	}
	for _, list := range []string{"modules.builtin", "modules.dep"} {
		b, err := readOptional(filepath.Join(sys, "/lib/modules", release, list))
		if err != nil && !errors.Is(err, fs.ErrPermission) {
			return false, err
		}
		if bytes.Contains(b, []byte("/overlay.ko")) {
			return true, nil
		}
	}
	return false, nil
}
