package rootfstest

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"
)

// Node is one entry of a tree as Tree records it: what two roots built
// from one image must agree on, whichever store built them.
type Node struct {
	// Mode is the whole st_mode: type and permission bits.
	Mode     uint32
	UID, GID uint32
	// Size and SHA256 are a regular file's; Target a symlink's; Rdev a
	// device node's.
	Size   int64
	SHA256 string
	Target string
	Rdev   uint64
	// MTime is a non-directory's modification time (a directory's
	// changes with every entry made in it, differently by store).
	MTime int64
	// Xattrs are the extended attributes but overlayfs's own
	// (trusted.overlay.*, which a merged overlayfs tree never shows).
	Xattrs map[string]string
	// Links are the other paths in the tree that share this inode (a
	// hard-link group), sorted; nil for a directory.
	Links []string
}

func (n Node) String() string {
	s := fmt.Sprintf("mode=%o uid=%d gid=%d", n.Mode, n.UID, n.GID)
	switch n.Mode & unix.S_IFMT {
	case unix.S_IFREG:
		s += fmt.Sprintf(" size=%d sha256=%s", n.Size, n.SHA256)
	case unix.S_IFLNK:
		s += " -> " + n.Target
	case unix.S_IFCHR, unix.S_IFBLK:
		s += fmt.Sprintf(" rdev=%d:%d", unix.Major(n.Rdev), unix.Minor(n.Rdev))
	}
	if n.Mode&unix.S_IFMT != unix.S_IFDIR {
		s += fmt.Sprintf(" mtime=%d", n.MTime)
	}
	if len(n.Xattrs) > 0 {
		var xs []string
		for k, v := range n.Xattrs {
			xs = append(xs, fmt.Sprintf("%s=%q", k, v))
		}
		slices.Sort(xs)
		s += " xattrs{" + strings.Join(xs, " ") + "}"
	}
	if len(n.Links) > 0 {
		s += " links=" + strings.Join(n.Links, ",")
	}
	return s
}

// Tree records every entry below root (root itself as "."), by its path
// relative to root; nothing is followed. It reads the tree with plain
// calls: root is a test's own directory or mount.
func Tree(t testing.TB, root string) map[string]Node {
	t.Helper()
	out := map[string]Node{}
	inodes := map[[2]uint64][]string{}
	err := filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(root, p)
		var st unix.Stat_t
		if err := unix.Lstat(p, &st); err != nil {
			return err
		}
		n := Node{Mode: st.Mode, UID: st.Uid, GID: st.Gid}
		switch st.Mode & unix.S_IFMT {
		case unix.S_IFREG:
			b, err := os.ReadFile(p)
			if err != nil {
				return err
			}
			sum := sha256.Sum256(b)
			n.Size, n.SHA256 = st.Size, hex.EncodeToString(sum[:12])
		case unix.S_IFLNK:
			if n.Target, err = os.Readlink(p); err != nil {
				return err
			}
		case unix.S_IFCHR, unix.S_IFBLK:
			n.Rdev = st.Rdev
		}
		if st.Mode&unix.S_IFMT != unix.S_IFDIR {
			n.MTime = st.Mtim.Nano()
			key := [2]uint64{st.Dev, st.Ino}
			inodes[key] = append(inodes[key], rel)
		}
		if n.Xattrs, err = xattrs(p); err != nil {
			return err
		}
		out[rel] = n
		return nil
	})
	if err != nil {
		t.Fatalf("read tree %s: %v", root, err)
	}
	for _, names := range inodes {
		if len(names) < 2 {
			continue
		}
		for _, p := range names {
			n := out[p]
			for _, q := range names {
				if q != p {
					n.Links = append(n.Links, q)
				}
			}
			slices.Sort(n.Links)
			out[p] = n
		}
	}
	return out
}

func xattrs(p string) (map[string]string, error) {
	sz, err := unix.Llistxattr(p, nil)
	if err != nil || sz == 0 {
		if err == syscall.ENOTSUP {
			err = nil
		}
		return nil, err
	}
	buf := make([]byte, sz)
	n, err := unix.Llistxattr(p, buf)
	if err != nil {
		return nil, err
	}
	out := map[string]string{}
	for _, k := range strings.Split(string(buf[:n]), "\x00") {
		if k == "" || strings.HasPrefix(k, "trusted.overlay.") {
			continue
		}
		v := make([]byte, 4096)
		m, err := unix.Lgetxattr(p, k, v)
		if err != nil {
			return nil, fmt.Errorf("%s: xattr %s: %w", p, k, err)
		}
		out[k] = string(v[:m])
	}
	if len(out) == 0 {
		return nil, nil
	}
	return out, nil
}

// DiffTrees lists, one per line and sorted, how the tree b differs from
// a: entries only in one, and entries that differ (type, mode, owner,
// size and content, link target, device number, a non-directory's mtime,
// xattrs, hard-link group). "" means identical.
func DiffTrees(a, b map[string]Node) string {
	var out []string
	for p, na := range a {
		nb, ok := b[p]
		switch {
		case !ok:
			out = append(out, fmt.Sprintf("only in the first: %s (%s)", p, na))
		case na.String() != nb.String():
			out = append(out, fmt.Sprintf("%s: %s <> %s", p, na, nb))
		}
	}
	for p, nb := range b {
		if _, ok := a[p]; !ok {
			out = append(out, fmt.Sprintf("only in the second: %s (%s)", p, nb))
		}
	}
	slices.Sort(out)
	return strings.Join(out, "\n")
}
