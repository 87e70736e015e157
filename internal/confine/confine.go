// Package confine is nodespawn's one way to read and change files inside a
// root directory (the host root, `--root`, or a machine's rootfs) so that no
// path, whatever symlinks the tree holds, reaches outside the root, and so
// that a crash leaves either the old state or the new one, never half of
// each.
//
// # Confinement
//
// Every path is resolved by the kernel with openat2(2) and RESOLVE_IN_ROOT,
// relative to a directory file descriptor held by Root. That is the chosen
// semantics, not os.Root's: inside a machine image an absolute symlink
// (/etc/localtime -> /usr/share/zoneinfo/UTC, /var/run -> /run) means the
// machine's own root, and ".." at the root stays at the root, exactly what
// the machine itself sees once it boots. os.Root instead refuses absolute
// links and links that climb out, which would make ordinary images fail.
// RESOLVE_NO_MAGICLINKS refuses /proc/self/fd-style links in the tree.
//
// Operations that change an entry resolve only its parent directory that
// way, then act on the entry by name relative to the parent's descriptor
// (mkdirat, unlinkat, renameat, symlinkat, linkat, fchownat with
// AT_SYMLINK_NOFOLLOW, and O_NOFOLLOW opens). The last element is therefore
// never followed, and a symlink swapped in anywhere along the path after the
// parent was opened changes nothing: the descriptor stays on the directory
// that was inside the root when it was opened. No path string is ever
// resolved in user space.
//
// A kernel without openat2 (Linux < 5.6) is refused with ErrNoOpenat2
// rather than served by a weaker lexical walk.
//
// # Crash safety
//
// Files and symlinks are created under a temporary name in the destination
// directory, made durable (fsync), given their owner and mode, and renamed
// over the destination; the directory is then fsynced. Directories are
// made under a temporary name, given their final owner and mode, and
// renamed into place, so a directory never exists under its real name with
// a mode nobody asked for. Temporary names start with "." and the target's
// name, so RemoveStaleTemps can clean what a killed run left.
//
// Owner arguments follow os.Chown: -1 leaves that id unchanged (the entry
// then belongs to the calling process).
package confine

import (
	"bytes"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"math"
	"os"
	"path"
	"slices"
	"strings"
	"sync"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/nodespawn/nodespawn/internal/lazyre"
)

// ErrNoOpenat2 is returned by Open on a kernel without openat2(2).
var ErrNoOpenat2 = errors.New("this kernel has no openat2(2) (Linux 5.6 or later is needed): nodespawn will not write inside a root it cannot confine")

// Root is an open directory that every path given to its methods is
// confined to. Paths are slash-separated and taken relative to the root
// whether or not they start with "/": "/etc/hostname" and "etc/hostname"
// name the same entry. A Root is safe for concurrent use.
type Root struct {
	fd  int
	dir string // where the root is, for messages only
}

var (
	openat2Once sync.Once
	openat2Err  error
)

// Open opens dir, a directory on the host, as a Root. dir itself is
// resolved the ordinary way: it is the caller's trusted starting point.
func Open(dir string) (*Root, error) {
	fd, err := unix.Open(dir, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, &os.PathError{Op: "open root", Path: dir, Err: err}
	}
	openat2Once.Do(func() {
		probe, err := unix.Openat2(fd, ".", &unix.OpenHow{Flags: unix.O_PATH | unix.O_CLOEXEC, Resolve: unix.RESOLVE_IN_ROOT})
		if err == nil {
			unix.Close(probe)
			return
		}
		if errors.Is(err, unix.ENOSYS) {
			openat2Err = ErrNoOpenat2
			return
		}
		openat2Err = fmt.Errorf("openat2(2) probe on %s: %w", dir, err)
	})
	if openat2Err != nil {
		unix.Close(fd)
		return nil, openat2Err
	}
	return &Root{fd: fd, dir: strings.TrimSuffix(path.Clean(dir), "/")}, nil
}

// Close releases the root's descriptor.
func (r *Root) Close() error { return unix.Close(r.fd) }

// Dir returns the host path the root was opened at (for messages).
func (r *Root) Dir() string {
	if r.dir == "" {
		return "/"
	}
	return r.dir
}

// Show returns how p is named in messages: the root's host path joined
// with p.
func (r *Root) Show(p string) string {
	rel := Clean(p)
	if rel == "" {
		return r.Dir()
	}
	return r.dir + "/" + rel
}

// Clean returns p relative to a root: no leading "/", no "." or ".."
// elements (".." at the top stays at the top), "" for the root itself.
func Clean(p string) string {
	return strings.TrimPrefix(path.Clean("/"+p), "/")
}

// split returns the cleaned parent and last element of p; base is "" for
// the root itself.
func split(p string) (dir, base string) {
	rel := Clean(p)
	if rel == "" {
		return "", ""
	}
	dir, base = path.Split(rel)
	return strings.TrimSuffix(dir, "/"), base
}

// openat2 resolves p below the root with the kernel's in-root resolution.
// It retries EAGAIN, which the kernel returns when a concurrent rename
// could have made a ".." step unsafe, and EINTR.
func (r *Root) openat2(p string, flags int, mode uint32) (int, error) {
	rel := Clean(p)
	if rel == "" {
		rel = "."
	}
	how := unix.OpenHow{
		Flags:   uint64(flags | unix.O_CLOEXEC),
		Mode:    uint64(mode),
		Resolve: unix.RESOLVE_IN_ROOT | unix.RESOLVE_NO_MAGICLINKS,
	}
	for i := 0; ; i++ {
		fd, err := unix.Openat2(r.fd, rel, &how)
		if err == nil {
			return fd, nil
		}
		if (errors.Is(err, unix.EAGAIN) && i < 100) || errors.Is(err, unix.EINTR) {
			continue
		}
		return -1, err
	}
}

func (r *Root) pathErr(op, p string, err error) error {
	return &os.PathError{Op: op, Path: r.Show(p), Err: err}
}

// parent opens the directory that holds p (resolved in the root) for
// reading and returns its descriptor and p's last element. p must not be
// the root itself.
func (r *Root) parent(op, p string) (int, string, error) {
	dir, base := split(p)
	if base == "" {
		return -1, "", r.pathErr(op, p, errors.New("not allowed on the root itself"))
	}
	fd, err := r.openat2(dir, unix.O_RDONLY|unix.O_DIRECTORY, 0)
	if err != nil {
		return -1, "", r.pathErr(op, p, fmt.Errorf("parent directory: %w", err))
	}
	return fd, base, nil
}

// OpenRoot opens the directory p (symlinks followed, inside r) as a Root of
// its own: a machine's rootfs inside the host root.
func (r *Root) OpenRoot(p string) (*Root, error) {
	fd, err := r.openat2(p, unix.O_PATH|unix.O_DIRECTORY, 0)
	if err != nil {
		return nil, r.pathErr("open root", p, err)
	}
	return &Root{fd: fd, dir: strings.TrimSuffix(r.Show(p), "/")}, nil
}

// OpenDirFD opens the directory p as an O_PATH descriptor for the kernel
// to use by descriptor (an overlayfs mount's layers, its upper and work
// directories, a mount point): resolved in the root like every path here,
// and its last element never followed, so a symlink planted there is
// refused (ENOTDIR) instead of leading the kernel elsewhere. The caller
// closes it.
func (r *Root) OpenDirFD(p string) (*os.File, error) {
	fd, err := r.openat2(p, unix.O_PATH|unix.O_DIRECTORY|unix.O_NOFOLLOW, 0)
	if err != nil {
		return nil, r.pathErr("open", p, err)
	}
	return os.NewFile(uintptr(fd), r.Show(p)), nil
}

// Lstat describes the entry at p without following it if it is a symlink.
func (r *Root) Lstat(p string) (fs.FileInfo, error) {
	fd, err := r.openat2(p, unix.O_PATH|unix.O_NOFOLLOW, 0)
	if err != nil {
		return nil, r.pathErr("lstat", p, err)
	}
	f := os.NewFile(uintptr(fd), r.Show(p))
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return nil, r.pathErr("lstat", p, err)
	}
	return fi, nil
}

// Stat describes the entry at p, following symlinks inside the root.
func (r *Root) Stat(p string) (fs.FileInfo, error) {
	fd, err := r.openat2(p, unix.O_PATH, 0)
	if err != nil {
		return nil, r.pathErr("stat", p, err)
	}
	f := os.NewFile(uintptr(fd), r.Show(p))
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return nil, r.pathErr("stat", p, err)
	}
	return fi, nil
}

// Open opens the regular file at p for reading, following symlinks inside
// the root (what the machine would read at p).
func (r *Root) Open(p string) (*os.File, error) { return r.openRegular(p, 0) }

// OpenNoFollow opens the regular file at p for reading; a symlink at p is
// an error, not followed.
func (r *Root) OpenNoFollow(p string) (*os.File, error) { return r.openRegular(p, unix.O_NOFOLLOW) }

func (r *Root) openRegular(p string, extra int) (*os.File, error) {
	// O_NONBLOCK: a FIFO planted where a file was expected must not hang
	// the run; anything but a regular file is refused below.
	fd, err := r.openat2(p, unix.O_RDONLY|unix.O_NONBLOCK|unix.O_NOCTTY|extra, 0)
	if err != nil {
		return nil, r.pathErr("open", p, err)
	}
	f := os.NewFile(uintptr(fd), r.Show(p))
	fi, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, r.pathErr("open", p, err)
	}
	if !fi.Mode().IsRegular() {
		f.Close()
		return nil, r.pathErr("open", p, fmt.Errorf("not a regular file (%v)", fi.Mode().Type()))
	}
	if err := unix.SetNonblock(fd, false); err != nil {
		f.Close()
		return nil, r.pathErr("open", p, err)
	}
	return f, nil
}

// ReadFile returns the contents of the regular file at p, following
// symlinks inside the root.
func (r *Root) ReadFile(p string) ([]byte, error) {
	f, err := r.Open(p)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	return io.ReadAll(f)
}

// OpenFile opens or creates the regular file at p with flags (O_NOFOLLOW is
// always added: a symlink at p is refused), and perm for a new file (the
// umask applies, as with os.OpenFile).
func (r *Root) OpenFile(p string, flags int, perm os.FileMode) (*os.File, error) {
	var mode uint32
	if flags&(unix.O_CREAT|unix.O_TMPFILE) != 0 {
		// openat2 refuses a mode without a file to create.
		mode = uint32(perm.Perm())
	}
	fd, err := r.openat2(p, flags|unix.O_NOFOLLOW|unix.O_NOCTTY, mode)
	if err != nil {
		return nil, r.pathErr("open", p, err)
	}
	return os.NewFile(uintptr(fd), r.Show(p)), nil
}

// Readlink returns the target of the symlink at p.
func (r *Root) Readlink(p string) (string, error) {
	pfd, base, err := r.parent("readlink", p)
	if err != nil {
		return "", err
	}
	defer unix.Close(pfd)
	buf := make([]byte, 256)
	for {
		n, err := unix.Readlinkat(pfd, base, buf)
		if err != nil {
			return "", r.pathErr("readlink", p, err)
		}
		if n < len(buf) {
			return string(buf[:n]), nil
		}
		buf = make([]byte, 2*len(buf))
	}
}

// ReadDir lists the directory at p (symlinks followed inside the root),
// sorted by name.
func (r *Root) ReadDir(p string) ([]fs.DirEntry, error) {
	fd, err := r.openat2(p, unix.O_RDONLY|unix.O_DIRECTORY, 0)
	if err != nil {
		return nil, r.pathErr("readdir", p, err)
	}
	f := os.NewFile(uintptr(fd), r.Show(p))
	defer f.Close()
	es, err := f.ReadDir(-1)
	if err != nil {
		return nil, r.pathErr("readdir", p, err)
	}
	// The Info method of an os.File's entries lstats r.Show(p)+"/"+name,
	// a host path resolved in user space: through a symlink in p it would
	// describe a file outside the root. Describe each entry now, relative
	// to the descriptor.
	out := es[:0]
	for _, e := range es {
		efd, err := unix.Openat(fd, e.Name(), unix.O_PATH|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
		if errors.Is(err, unix.ENOENT) {
			continue // removed since it was listed
		}
		if err != nil {
			return nil, r.pathErr("readdir", path.Join(p, e.Name()), err)
		}
		ef := os.NewFile(uintptr(efd), e.Name())
		fi, err := ef.Stat()
		ef.Close()
		if err != nil {
			return nil, r.pathErr("readdir", path.Join(p, e.Name()), err)
		}
		out = append(out, fs.FileInfoToDirEntry(fi))
	}
	es = out
	slices.SortFunc(es, func(a, b fs.DirEntry) int { return strings.Compare(a.Name(), b.Name()) })
	return es, nil
}

// WriteFile atomically replaces p with data, with mode (the umask does not
// apply) and owner uid:gid. The parent directory must exist.
func (r *Root) WriteFile(p string, data []byte, mode os.FileMode, uid, gid int) error {
	return r.WriteReader(p, bytes.NewReader(data), mode, uid, gid)
}

// WriteReader is WriteFile with contents streamed from src. If reading src
// or any later step fails, p keeps its previous contents (or stays absent)
// and the temporary file is removed.
func (r *Root) WriteReader(p string, src io.Reader, mode os.FileMode, uid, gid int) (err error) {
	pfd, base, err := r.parent("write", p)
	if err != nil {
		return err
	}
	defer unix.Close(pfd)
	tmp, fd, err := createTemp(pfd, "."+base+".tmp-")
	if err != nil {
		return r.pathErr("write", p, fmt.Errorf("create temp file: %w", err))
	}
	f := os.NewFile(uintptr(fd), r.Show(p))
	defer func() {
		if err != nil {
			f.Close()
			unix.Unlinkat(pfd, tmp, 0)
		}
	}()
	if _, err = io.Copy(f, src); err != nil {
		return fmt.Errorf("write %s: %w", r.Show(p), err)
	}
	if err = f.Sync(); err != nil {
		return fmt.Errorf("write %s: fsync: %w", r.Show(p), err)
	}
	if err = fchownMod(fd, mode, uid, gid); err != nil {
		return fmt.Errorf("write %s: %w", r.Show(p), err)
	}
	if err = f.Close(); err != nil {
		return fmt.Errorf("write %s: close: %w", r.Show(p), err)
	}
	if err = unix.Renameat(pfd, tmp, pfd, base); err != nil {
		return r.pathErr("write", p, fmt.Errorf("rename into place: %w", err))
	}
	return syncFD(pfd, r.Show(path.Dir("/"+Clean(p))))
}

// fchownMod gives an open file its owner, then its mode: chown clears the
// setuid and setgid bits, so chmod comes last.
func fchownMod(fd int, mode os.FileMode, uid, gid int) error {
	if uid >= 0 || gid >= 0 {
		if err := unix.Fchown(fd, uid, gid); err != nil {
			return fmt.Errorf("chown %d:%d: %w", uid, gid, err)
		}
	}
	if err := unix.Fchmod(fd, unixMode(mode)); err != nil {
		return fmt.Errorf("chmod %v: %w", mode, err)
	}
	return nil
}

// createTemp creates a new file named prefix+random in the directory dfd.
func createTemp(dfd int, prefix string) (string, int, error) {
	for i := 0; i < 100; i++ {
		name := prefix + randomSuffix()
		fd, err := unix.Openat(dfd, name, unix.O_RDWR|unix.O_CREAT|unix.O_EXCL|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0o600)
		if errors.Is(err, unix.EEXIST) {
			continue
		}
		if err != nil {
			return "", -1, err
		}
		return name, fd, nil
	}
	return "", -1, errors.New("no unused temporary name after 100 tries")
}

func randomSuffix() string {
	var b [6]byte
	_, _ = rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

// CreateTemp creates a new, empty regular file named prefix+random in the
// directory dir, open for reading and writing (mode 0600). It returns the
// file and its path in the root.
func (r *Root) CreateTemp(dir, prefix string) (*os.File, string, error) {
	fd, err := r.openat2(dir, unix.O_RDONLY|unix.O_DIRECTORY, 0)
	if err != nil {
		return nil, "", r.pathErr("create temp", dir, err)
	}
	defer unix.Close(fd)
	name, tfd, err := createTemp(fd, prefix)
	if err != nil {
		return nil, "", r.pathErr("create temp", path.Join(dir, prefix+"*"), err)
	}
	p := path.Join("/"+Clean(dir), name)
	return os.NewFile(uintptr(tfd), r.Show(p)), p, nil
}

// Symlink atomically makes p a symbolic link to target, replacing whatever
// non-directory entry was there, and sets the link's own owner. A link
// that already has the target only gets its owner set.
func (r *Root) Symlink(target, p string, uid, gid int) error {
	pfd, base, err := r.parent("symlink", p)
	if err != nil {
		return err
	}
	defer unix.Close(pfd)
	if cur, err := readlinkat(pfd, base); err == nil && cur == target {
		if uid >= 0 || gid >= 0 {
			if err := unix.Fchownat(pfd, base, uid, gid, unix.AT_SYMLINK_NOFOLLOW); err != nil {
				return r.pathErr("symlink", p, fmt.Errorf("lchown %d:%d: %w", uid, gid, err))
			}
		}
		return nil
	}
	var tmp string
	for i := 0; ; i++ {
		tmp = "." + base + ".tmp-" + randomSuffix()
		err := unix.Symlinkat(target, pfd, tmp)
		if err == nil {
			break
		}
		if !errors.Is(err, unix.EEXIST) || i >= 100 {
			return r.pathErr("symlink", p, err)
		}
	}
	if uid >= 0 || gid >= 0 {
		if err := unix.Fchownat(pfd, tmp, uid, gid, unix.AT_SYMLINK_NOFOLLOW); err != nil {
			unix.Unlinkat(pfd, tmp, 0)
			return r.pathErr("symlink", p, fmt.Errorf("lchown %d:%d: %w", uid, gid, err))
		}
	}
	if err := unix.Renameat(pfd, tmp, pfd, base); err != nil {
		unix.Unlinkat(pfd, tmp, 0)
		return r.pathErr("symlink", p, fmt.Errorf("rename into place: %w", err))
	}
	return syncFD(pfd, r.Show(path.Dir("/"+Clean(p))))
}

func readlinkat(dfd int, name string) (string, error) {
	buf := make([]byte, 4096)
	n, err := unix.Readlinkat(dfd, name, buf)
	if err != nil {
		return "", err
	}
	return string(buf[:n]), nil
}

// Link atomically makes p another name (a hard link) of the entry at
// target, replacing whatever non-directory entry was at p. Neither path's
// last element is followed.
func (r *Root) Link(target, p string) error {
	sfd, sbase, err := r.parent("link", target)
	if err != nil {
		return err
	}
	defer unix.Close(sfd)
	pfd, base, err := r.parent("link", p)
	if err != nil {
		return err
	}
	defer unix.Close(pfd)
	var tmp string
	for i := 0; ; i++ {
		tmp = "." + base + ".tmp-" + randomSuffix()
		err := unix.Linkat(sfd, sbase, pfd, tmp, 0)
		if err == nil {
			break
		}
		if !errors.Is(err, unix.EEXIST) || i >= 100 {
			return r.pathErr("link", p, fmt.Errorf("to %s: %w", r.Show(target), err))
		}
	}
	if err := unix.Renameat(pfd, tmp, pfd, base); err != nil {
		unix.Unlinkat(pfd, tmp, 0)
		return r.pathErr("link", p, fmt.Errorf("rename into place: %w", err))
	}
	// rename(2) of a name onto another link of the same inode succeeds
	// and does nothing: the temporary name would stay.
	if err := unix.Unlinkat(pfd, tmp, 0); err != nil && !errors.Is(err, unix.ENOENT) {
		return r.pathErr("link", p, fmt.Errorf("remove temporary link: %w", err))
	}
	return syncFD(pfd, r.Show(path.Dir("/"+Clean(p))))
}

// Chmod sets the mode of the file or directory at p; a symlink at p is not
// followed but refused (symlinks have no mode of their own), and so is any
// other kind of entry.
func (r *Root) Chmod(p string, mode os.FileMode) error {
	fd, err := r.openat2(p, unix.O_PATH|unix.O_NOFOLLOW, 0)
	if err != nil {
		return r.pathErr("chmod", p, err)
	}
	defer unix.Close(fd)
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return r.pathErr("chmod", p, err)
	}
	switch st.Mode & unix.S_IFMT {
	case unix.S_IFREG, unix.S_IFDIR:
	default:
		return r.pathErr("chmod", p, fmt.Errorf("not a regular file or directory (mode %#o)", st.Mode&unix.S_IFMT))
	}
	// An O_PATH descriptor cannot be fchmod'ed before Linux 6.6
	// (fchmodat2 with AT_EMPTY_PATH); its /proc/<pid>/fd entry names the
	// very inode that was opened, with no path resolution in between.
	if err := unix.Fchmodat(unix.AT_FDCWD, procFD(fd), unixMode(mode), 0); err != nil {
		return r.pathErr("chmod", p, err)
	}
	return nil
}

// procFD names descriptor fd of this process in /proc by pid, not "self",
// so that a child process given the name reaches the same directory.
func procFD(fd int) string { return fmt.Sprintf("/proc/%d/fd/%d", os.Getpid(), fd) }

// Lchown sets the owner of the entry at p, not following a symlink.
func (r *Root) Lchown(p string, uid, gid int) error {
	if Clean(p) == "" {
		if err := unix.Fchownat(r.fd, "", uid, gid, unix.AT_EMPTY_PATH); err != nil {
			return r.pathErr("chown", p, err)
		}
		return nil
	}
	pfd, base, err := r.parent("chown", p)
	if err != nil {
		return err
	}
	defer unix.Close(pfd)
	if err := unix.Fchownat(pfd, base, uid, gid, unix.AT_SYMLINK_NOFOLLOW); err != nil {
		return r.pathErr("chown", p, err)
	}
	return nil
}

// Mkdir atomically makes p a new directory with mode and owner (see the
// package comment); an existing entry at p is an fs.ErrExist error.
func (r *Root) Mkdir(p string, mode os.FileMode, uid, gid int) error {
	pfd, base, err := r.parent("mkdir", p)
	if err != nil {
		return err
	}
	defer unix.Close(pfd)
	if err := mkdirAt(pfd, base, mode, uid, gid); err != nil {
		return r.pathErr("mkdir", p, err)
	}
	return syncFD(pfd, r.Show(path.Dir("/"+Clean(p))))
}

// mkdirAt makes name in dfd a directory with mode and owner, under a
// temporary name first so that it never exists with another mode. It
// returns an EEXIST error when name already exists.
func mkdirAt(dfd int, name string, mode os.FileMode, uid, gid int) error {
	var tmp string
	for i := 0; ; i++ {
		tmp = "." + name + ".mkdir-" + randomSuffix()
		err := unix.Mkdirat(dfd, tmp, 0o700)
		if err == nil {
			break
		}
		if !errors.Is(err, unix.EEXIST) || i >= 100 {
			return err
		}
	}
	fd, err := unix.Openat(dfd, tmp, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err == nil {
		err = fchownMod(fd, mode, uid, gid)
		unix.Close(fd)
	}
	if err == nil {
		err = unix.Renameat2(dfd, tmp, dfd, name, unix.RENAME_NOREPLACE)
	}
	if err != nil {
		unix.Unlinkat(dfd, tmp, unix.AT_REMOVEDIR)
		return err
	}
	return nil
}

// MkdirAll makes p a directory with mode and owner, creating missing
// parents 0755 owned by the caller. An existing directory at p gets mode
// and owner applied; existing parents are left as they are. An existing
// entry that is not a directory (or a symlink that leads nowhere in the
// root) is an error naming it.
func (r *Root) MkdirAll(p string, mode os.FileMode, uid, gid int) error {
	return r.mkdirAll(p, mode, uid, gid, true)
}

// MkdirParents makes p a directory if it is missing, with missing parents,
// all 0755 owned by the caller; existing directories are left as they are.
func (r *Root) MkdirParents(p string) error {
	return r.mkdirAll(p, 0o755, -1, -1, false)
}

func (r *Root) mkdirAll(p string, mode os.FileMode, uid, gid int, fix bool) error {
	rel := Clean(p)
	fd, err := r.openat2("", unix.O_RDONLY|unix.O_DIRECTORY, 0)
	if err != nil {
		return r.pathErr("mkdir", p, err)
	}
	defer func() { unix.Close(fd) }()
	var elems []string
	if rel != "" {
		elems = strings.Split(rel, "/")
	}
	for i, el := range elems {
		prefix := strings.Join(elems[:i+1], "/")
		leaf := i == len(elems)-1
		made := false
		next, err := r.openat2(prefix, unix.O_RDONLY|unix.O_DIRECTORY, 0)
		if errors.Is(err, unix.ENOENT) {
			// fd is the directory the prefix's parent resolved to.
			m, u, g := os.FileMode(0o755), -1, -1
			if leaf {
				m, u, g = mode, uid, gid
			}
			merr := mkdirAt(fd, el, m, u, g)
			switch {
			case merr == nil:
				made = true
				if err := syncFD(fd, r.Show(path.Dir("/"+prefix))); err != nil {
					return err
				}
				next, err = unix.Openat(fd, el, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
			case errors.Is(merr, unix.EEXIST):
				// Made meanwhile by a concurrent caller (with its own
				// mode, which the leaf's is applied over below), or a
				// symlink that leads nowhere inside the root.
				next, err = r.openat2(prefix, unix.O_RDONLY|unix.O_DIRECTORY, 0)
				if errors.Is(err, unix.ENOENT) {
					return r.pathErr("mkdir", p, fmt.Errorf("%s exists but does not lead to a directory inside the root (a dangling symlink?)", r.Show(prefix)))
				}
			default:
				return r.pathErr("mkdir", prefix, merr)
			}
		}
		if errors.Is(err, unix.ENOTDIR) {
			return r.pathErr("mkdir", p, fmt.Errorf("%s exists and is not a directory", r.Show(prefix)))
		}
		if err != nil {
			return r.pathErr("mkdir", prefix, err)
		}
		unix.Close(fd)
		fd = next
		if leaf && fix && !made {
			var st unix.Stat_t
			if err := unix.Fstat(fd, &st); err != nil {
				return r.pathErr("mkdir", p, err)
			}
			if (uid >= 0 && int(st.Uid) != uid) || (gid >= 0 && int(st.Gid) != gid) || st.Mode&0o7777 != unixMode(mode) {
				if err := fchownMod(fd, mode, uid, gid); err != nil {
					return r.pathErr("mkdir", p, err)
				}
			}
		}
	}
	return nil
}

// MkdirTemp makes a new directory named prefix+random in dir with mode and
// returns its path in the root. It is for staging trees that are renamed
// into place or removed as leftovers, so it is not fsynced.
func (r *Root) MkdirTemp(dir, prefix string, mode os.FileMode) (string, error) {
	fd, err := r.openat2(dir, unix.O_RDONLY|unix.O_DIRECTORY, 0)
	if err != nil {
		return "", r.pathErr("mkdir", path.Join(dir, prefix+"*"), err)
	}
	defer unix.Close(fd)
	for i := 0; i < 100; i++ {
		name := prefix + randomSuffix()
		err := unix.Mkdirat(fd, name, 0o700)
		if errors.Is(err, unix.EEXIST) {
			continue
		}
		if err != nil {
			return "", r.pathErr("mkdir", path.Join(dir, name), err)
		}
		dfd, err := unix.Openat(fd, name, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
		if err == nil {
			err = unix.Fchmod(dfd, unixMode(mode))
			unix.Close(dfd)
		}
		if err != nil {
			unix.Unlinkat(fd, name, unix.AT_REMOVEDIR)
			return "", r.pathErr("mkdir", path.Join(dir, name), err)
		}
		return path.Join("/"+Clean(dir), name), nil
	}
	return "", r.pathErr("mkdir", path.Join(dir, prefix+"*"), errors.New("no unused name after 100 tries"))
}

// Rename moves the entry at from to to (both in the root, neither's last
// element followed), replacing what is at to as rename(2) does.
func (r *Root) Rename(from, to string) error { return r.rename(from, to, 0) }

// RenameNoReplace is Rename that fails with an fs.ErrExist error when to
// exists.
func (r *Root) RenameNoReplace(from, to string) error {
	return r.rename(from, to, unix.RENAME_NOREPLACE)
}

// Exchange atomically swaps the entries at a and b (both must exist).
func (r *Root) Exchange(a, b string) error { return r.rename(a, b, unix.RENAME_EXCHANGE) }

func (r *Root) rename(from, to string, flags uint) error {
	ffd, fbase, err := r.parent("rename", from)
	if err != nil {
		return err
	}
	defer unix.Close(ffd)
	tfd, tbase, err := r.parent("rename", to)
	if err != nil {
		return err
	}
	defer unix.Close(tfd)
	if err := unix.Renameat2(ffd, fbase, tfd, tbase, flags); err != nil {
		return &os.LinkError{Op: "rename", Old: r.Show(from), New: r.Show(to), Err: err}
	}
	if err := syncFD(tfd, r.Show(path.Dir("/"+Clean(to)))); err != nil {
		return err
	}
	return syncFD(ffd, r.Show(path.Dir("/"+Clean(from))))
}

// Remove removes the file, symlink or empty directory at p.
func (r *Root) Remove(p string) error {
	pfd, base, err := r.parent("remove", p)
	if err != nil {
		return err
	}
	defer unix.Close(pfd)
	err = unix.Unlinkat(pfd, base, 0)
	if errors.Is(err, unix.EISDIR) {
		err = unix.Unlinkat(pfd, base, unix.AT_REMOVEDIR)
	}
	if err != nil {
		return r.pathErr("remove", p, err)
	}
	return nil
}

// RemoveAll removes the entry at p and, for a directory, everything below
// it, never following a symlink. A missing p is not an error. A mount point
// below p makes it fail with EBUSY (the mount is left alone).
func (r *Root) RemoveAll(p string) error {
	pfd, base, err := r.parent("remove", p)
	if errors.Is(err, unix.ENOENT) {
		return nil
	}
	if err != nil {
		return err
	}
	defer unix.Close(pfd)
	if err := removeAllAt(pfd, base); err != nil {
		return r.pathErr("remove", p, err)
	}
	return nil
}

// removeAllAt removes name in dfd, depth first, by descriptor.
func removeAllAt(dfd int, name string) error {
	var st unix.Stat_t
	if err := unix.Fstatat(dfd, name, &st, unix.AT_SYMLINK_NOFOLLOW); err != nil {
		if errors.Is(err, unix.ENOENT) {
			return nil
		}
		return err
	}
	if st.Mode&unix.S_IFMT != unix.S_IFDIR {
		if err := unix.Unlinkat(dfd, name, 0); err != nil && !errors.Is(err, unix.ENOENT) {
			return err
		}
		return nil
	}
	fd, err := unix.Openat(dfd, name, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return err
	}
	d := os.NewFile(uintptr(fd), name)
	defer d.Close()
	for {
		names, err := d.Readdirnames(1024)
		for _, n := range names {
			if err := removeAllAt(fd, n); err != nil {
				return fmt.Errorf("%s/%s: %w", name, n, err)
			}
		}
		if errors.Is(err, io.EOF) || (err == nil && len(names) == 0) {
			break
		}
		if err != nil {
			return err
		}
		// Entries removed meanwhile shift the directory offset; read the
		// rest from the start.
		if _, err := d.Seek(0, io.SeekStart); err != nil {
			return err
		}
	}
	if err := unix.Unlinkat(dfd, name, unix.AT_REMOVEDIR); err != nil && !errors.Is(err, unix.ENOENT) {
		return err
	}
	return nil
}

// SyncDir fsyncs the directory at p so that creations and renames in it
// are durable.
func (r *Root) SyncDir(p string) error {
	fd, err := r.openat2(p, unix.O_RDONLY|unix.O_DIRECTORY, 0)
	if err != nil {
		return r.pathErr("fsync", p, err)
	}
	defer unix.Close(fd)
	return syncFD(fd, r.Show(p))
}

func syncFD(fd int, what string) error {
	if err := unix.Fsync(fd); err != nil {
		return fmt.Errorf("fsync directory %s: %w", what, err)
	}
	return nil
}

// Syncfs flushes the whole filesystem that holds p.
func (r *Root) Syncfs(p string) error {
	fd, err := r.openat2(p, unix.O_RDONLY|unix.O_DIRECTORY, 0)
	if err != nil {
		return r.pathErr("syncfs", p, err)
	}
	defer unix.Close(fd)
	if err := unix.Syncfs(fd); err != nil {
		return r.pathErr("syncfs", p, err)
	}
	return nil
}

// FreeSpace is how many bytes the filesystem holding the directory p has
// free for unprivileged writers (statfs's f_bavail: the blocks reserved
// for root are left out, so a bound taken from it is on the safe side).
func (r *Root) FreeSpace(p string) (int64, error) {
	fd, err := r.openat2(p, unix.O_RDONLY|unix.O_DIRECTORY, 0)
	if err != nil {
		return 0, r.pathErr("statfs", p, err)
	}
	defer unix.Close(fd)
	var st unix.Statfs_t
	if err := unix.Fstatfs(fd, &st); err != nil {
		return 0, r.pathErr("statfs", p, err)
	}
	return int64(min(st.Bavail, uint64(math.MaxInt64)/uint64(max(st.Bsize, 1)))) * st.Bsize, nil
}

// InDir runs fn with a host path for the directory at p, for libraries
// and commands that take a directory path (containerd's archive.Apply,
// debootstrap) and keep every path they create below it themselves.
//
// The directory is resolved in the root by the kernel and held open while
// fn runs; the path fn gets is that descriptor's /proc/<pid>/fd entry (by
// pid, so a child process reaches it too). Every path below it starts at
// the open directory, so no rename or symlink swapped in above it
// afterwards can send fn elsewhere. The entry is itself a symlink to the
// directory: code given it must not lstat the path as given and expect a
// directory (internal/archive handles whiteouts itself for that reason).
func (r *Root) InDir(p string, fn func(dir string) error) error {
	fd, err := r.openat2(p, unix.O_PATH|unix.O_DIRECTORY, 0)
	if err != nil {
		return r.pathErr("open", p, err)
	}
	defer unix.Close(fd)
	dir := procFD(fd)
	var held, named unix.Stat_t
	if err := unix.Fstat(fd, &held); err != nil {
		return r.pathErr("open", p, err)
	}
	if err := unix.Stat(dir, &named); err != nil || held.Dev != named.Dev || held.Ino != named.Ino {
		return r.pathErr("open", p, fmt.Errorf("%s does not lead to the opened directory (is /proc mounted?): %v", dir, err))
	}
	return fn(dir)
}

// tempName matches every temporary name this package makes: "." and the
// target's name, then ".tmp-" or ".mkdir-" (or a caller's ".tmp-<word>-",
// see TempPrefix) and the random suffix.
var tempName = lazyre.New(`^\..+\.(tmp-([a-z]+-)?|mkdir-)[0-9a-f]{12}$`)

// TempPrefix is how a caller names a temporary entry of its own for the
// target p (a staging directory, say) so that RemoveStaleTemps removes it
// too: use it as the prefix of CreateTemp or MkdirTemp. word is [a-z]+.
func TempPrefix(p, word string) string { return "." + path.Base("/"+Clean(p)) + ".tmp-" + word + "-" }

// RemoveStaleTemps removes, whole, every temporary entry that a killed
// run of WriteFile, WriteReader, Symlink, Link, Mkdir, MkdirAll or a
// TempPrefix user left in the directory dir. Call it only where nothing
// else writes in dir at the same time (apply holds a lock and runs it
// before a phase's steps start). A missing dir has none.
func (r *Root) RemoveStaleTemps(dir string) error {
	return r.removeMatching(dir, tempName().MatchString)
}

// RemoveStaleTempsUp is RemoveStaleTemps for dir and each of its parents
// up to the root, stopping early at the first directory for which done
// (when not nil) says it was already swept.
func (r *Root) RemoveStaleTempsUp(dir string, done func(string) bool) error {
	for d := "/" + Clean(dir); ; d = path.Dir(d) {
		if done != nil && done(d) {
			return nil
		}
		if err := r.RemoveStaleTemps(d); err != nil {
			return err
		}
		if d == "/" {
			return nil
		}
	}
}

// RemoveLeftovers removes, whole, every entry of the directory dir whose
// name starts with prefix. A missing dir has none.
func (r *Root) RemoveLeftovers(dir, prefix string) error {
	return r.removeMatching(dir, func(name string) bool { return strings.HasPrefix(name, prefix) })
}

// removeMatching removes, whole, the entries of the directory dir whose
// names match. A missing dir has none.
func (r *Root) removeMatching(dir string, match func(string) bool) error {
	fd, err := r.openat2(dir, unix.O_RDONLY|unix.O_DIRECTORY, 0)
	if errors.Is(err, unix.ENOENT) || errors.Is(err, unix.ENOTDIR) {
		return nil
	}
	if err != nil {
		return r.pathErr("look for leftovers in", dir, err)
	}
	d := os.NewFile(uintptr(fd), r.Show(dir))
	defer d.Close()
	names, err := d.Readdirnames(-1)
	if err != nil {
		return r.pathErr("look for leftovers in", dir, err)
	}
	for _, n := range names {
		if !match(n) {
			continue
		}
		if err := removeAllAt(fd, n); err != nil {
			return r.pathErr("remove leftover", path.Join(dir, n), err)
		}
	}
	return nil
}

// FileMode converts a Unix mode as the Plan carries it (e.g. 0o4755) to an
// os.FileMode; a plain os.FileMode(m) conversion would drop the setuid,
// setgid and sticky bits.
func FileMode(unixMode uint32) os.FileMode {
	m := os.FileMode(unixMode) & os.ModePerm
	if unixMode&0o4000 != 0 {
		m |= os.ModeSetuid
	}
	if unixMode&0o2000 != 0 {
		m |= os.ModeSetgid
	}
	if unixMode&0o1000 != 0 {
		m |= os.ModeSticky
	}
	return m
}

// ModeOf returns the permission and special bits of an entry as an
// os.FileMode comparable with FileMode's.
func ModeOf(fi fs.FileInfo) os.FileMode {
	if st, ok := fi.Sys().(*syscall.Stat_t); ok {
		return FileMode(st.Mode & 0o7777)
	}
	return fi.Mode() & (os.ModePerm | os.ModeSetuid | os.ModeSetgid | os.ModeSticky)
}

// Owner returns the numeric owner of an entry described by Lstat or Stat.
func Owner(fi fs.FileInfo) (uid, gid int) {
	if st, ok := fi.Sys().(*syscall.Stat_t); ok {
		return int(st.Uid), int(st.Gid)
	}
	return -1, -1
}

// unixMode converts an os.FileMode to the bits chmod(2) takes.
func unixMode(m os.FileMode) uint32 {
	u := uint32(m.Perm())
	if m&os.ModeSetuid != 0 {
		u |= unix.S_ISUID
	}
	if m&os.ModeSetgid != 0 {
		u |= unix.S_ISGID
	}
	if m&os.ModeSticky != 0 {
		u |= unix.S_ISVTX
	}
	return u
}
