package probe

import (
	"bytes"
	"errors"
	"fmt"
	"io/fs"
	"path/filepath"

	"golang.org/x/sys/unix"

	"github.com/nodespawn/nodespawn/internal/layers"
	"github.com/nodespawn/nodespawn/plan"
)

// stateDir is where nodespawn keeps the layer store and the machines'
// overlayfs upper directories.
const stateDir = plan.StateDir

// upperFilesystems are the filesystems (statfs magic) nodespawn puts an
// overlayfs upper directory on: they have what overlayfs needs of one
// (d_type, xattrs, whiteout devices, RENAME_WHITEOUT).
var upperFilesystems = map[int64]string{
	unix.EXT4_SUPER_MAGIC:  "ext4",
	unix.XFS_SUPER_MAGIC:   "xfs",
	unix.BTRFS_SUPER_MAGIC: "btrfs",
	unix.TMPFS_MAGIC:       "tmpfs",
	unix.F2FS_SUPER_MAGIC:  "f2fs",
}

// otherFilesystems names the common ones that are not used, for the reason.
var otherFilesystems = map[int64]string{
	unix.OVERLAYFS_SUPER_MAGIC: "overlayfs",
	unix.NFS_SUPER_MAGIC:       "nfs",
	unix.FUSE_SUPER_MAGIC:      "fuse",
	unix.V9FS_MAGIC:            "9p",
	unix.SQUASHFS_MAGIC:        "squashfs",
	unix.CIFS_SUPER_MAGIC:      "cifs",
	0x2fc12fc1:                 "zfs",
}

// layerStore says whether machine roots can be overlayfs mounts of the
// layer store: the kernel has the overlay filesystem (built in, or a module
// the mount will load), and the filesystem under /var/lib/nodespawn can
// hold an upper directory.
func (p *prober) layerStore() (*plan.LayerStoreSupport, error) {
	ok, err := p.overlayInKernel()
	if err != nil {
		return nil, err
	}
	if !ok {
		return &plan.LayerStoreSupport{Why: "the kernel has no overlay filesystem (not in /proc/filesystems, no overlay module)"}, nil
	}
	// The state directory may not exist yet: its nearest existing parent
	// is the filesystem it will be made on.
	dir := p.at(stateDir)
	var st unix.Statfs_t
	for {
		err := unix.Statfs(dir, &st)
		if err == nil {
			break
		}
		if !errors.Is(err, unix.ENOENT) || dir == p.root {
			return nil, fmt.Errorf("statfs %s: %w", dir, err)
		}
		dir = filepath.Dir(dir)
	}
	if _, ok := upperFilesystems[int64(st.Type)]; ok {
		fds := p.layerFDs
		if fds == nil {
			fds = layers.KernelTakesLayerFDs
		}
		return &plan.LayerStoreSupport{OK: true, LayerFDs: fds()}, nil
	}
	name, known := otherFilesystems[int64(st.Type)]
	if !known {
		name = fmt.Sprintf("a filesystem of type %#x", st.Type)
	}
	return &plan.LayerStoreSupport{Why: fmt.Sprintf("%s is on %s, which nodespawn does not use for overlayfs upper directories (ext4, xfs, btrfs, f2fs or tmpfs)", stateDir, name)}, nil
}

// overlayInKernel reports whether the kernel has overlayfs now or can
// load it: /proc/filesystems lists it, or the running kernel's module
// lists (modules.builtin, modules.dep) name overlay.ko.
func (p *prober) overlayInKernel() (bool, error) {
	fss, err := readOptional(p.at("/proc/filesystems"))
	if err != nil {
		return false, err
	}
	for _, l := range bytes.Split(fss, []byte("\n")) {
		if f := bytes.Fields(l); len(f) > 0 && string(f[len(f)-1]) == "overlay" {
			return true, nil
		}
	}
	var u unix.Utsname
	if err := unix.Uname(&u); err != nil {
		return false, err
	}
	release := unix.ByteSliceToString(u.Release[:])
	for _, list := range []string{"modules.builtin", "modules.dep"} {
		b, err := readOptional(p.at(filepath.Join("/lib/modules", release, list)))
		if err != nil && !errors.Is(err, fs.ErrPermission) {
			return false, err
		}
		if bytes.Contains(b, []byte("/overlay.ko")) {
			return true, nil
		}
	}
	return false, nil
}
