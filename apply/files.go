package apply

import (
	"bytes"
	"context"
	"crypto/sha256"
	"crypto/sha512"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"hash"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/nodespawn/nodespawn/internal/fsutil"
	"github.com/nodespawn/nodespawn/render"
)

// entry is what lies at a host path now.
type entry struct {
	exists bool
	fi     os.FileInfo
	uid    int
	gid    int
	perm   os.FileMode // permission bits plus setuid, setgid, sticky
}

func inspect(path string) (entry, error) {
	fi, err := os.Lstat(path)
	if errors.Is(err, os.ErrNotExist) {
		return entry{}, nil
	}
	if err != nil {
		return entry{}, err
	}
	st := fi.Sys().(*syscall.Stat_t)
	return entry{exists: true, fi: fi, uid: int(st.Uid), gid: int(st.Gid), perm: modeBits(st.Mode)}, nil
}

// modeBits turns a raw st_mode into an os.FileMode holding only the
// permission and special bits, comparable with fileMode.
func modeBits(m uint32) os.FileMode {
	mode := os.FileMode(m & 0o777)
	if m&syscall.S_ISUID != 0 {
		mode |= os.ModeSetuid
	}
	if m&syscall.S_ISGID != 0 {
		mode |= os.ModeSetgid
	}
	if m&syscall.S_ISVTX != 0 {
		mode |= os.ModeSticky
	}
	return mode
}

// fileMode converts a plan's octal mode (with 04000/02000/01000 special
// bits) to an os.FileMode.
func fileMode(m uint32) os.FileMode {
	return modeBits(m)
}

// file makes a File step's path hold its contents, mode and owner.
func (e *executor) file(ctx context.Context, f *render.File) (Outcome, error) {
	sc, err := e.scopeFor(f.Path)
	if err != nil {
		return "", err
	}
	path, err := sc.hostPath(f.Path)
	if err != nil {
		return "", err
	}
	mode := fileMode(f.Mode)
	if f.Secret {
		// Whatever the plan says, a secret is readable by its owner only.
		mode &= 0o600
	}
	uid, gid, err := sc.owner(f.Owner)
	if err != nil {
		return "", fmt.Errorf("owner of %s: %w", path, err)
	}
	if err := fsutil.RemoveStaleTemps(path); err != nil {
		return "", err
	}
	cur, err := inspect(path)
	if err != nil {
		return "", fmt.Errorf("inspect %s: %w", path, err)
	}
	if cur.exists && cur.fi.IsDir() {
		return "", fmt.Errorf("write %s: a directory is in the way; remove it or change the manifest", path)
	}
	if cur.exists && !f.Overwrite {
		return OutcomeUnchanged, nil
	}
	if cur.exists && cur.fi.Mode().IsRegular() && f.Source != nil && f.Source.Hash != "" {
		// The verification hash describes the (decompressed) file: no need
		// to fetch when it is already there.
		same, err := matchesHash(path, f.Source.Hash)
		if err != nil {
			return "", err
		}
		if same {
			return fixAttrs(path, cur, mode, uid, gid)
		}
	}
	data, err := e.contents(ctx, f)
	if err != nil {
		return "", err
	}
	if cur.exists && cur.fi.Mode().IsRegular() {
		same, err := sameContents(path, data)
		if err != nil {
			return "", err
		}
		if same {
			return fixAttrs(path, cur, mode, uid, gid)
		}
	}
	if err := ensureParent(path); err != nil {
		return "", err
	}
	if err := fsutil.WriteFile(path, data, mode, uid, gid); err != nil {
		return "", err
	}
	return OutcomeDone, nil
}

// contents returns a File step's bytes: decoded inline contents, or the
// verified remote source.
func (e *executor) contents(ctx context.Context, f *render.File) ([]byte, error) {
	if f.Source != nil {
		if f.Source.Hash == "" {
			return nil, fmt.Errorf("contents of %s from %s: no verification hash; every remote file must be verified", f.Path, f.Source.URL)
		}
		if e.opts.Deps.Downloader == nil {
			return nil, fmt.Errorf("fetch %s for %s: %w", f.Source.URL, f.Path, errNoDownloader)
		}
		data, err := e.opts.Deps.Downloader.Contents(ctx, f.Source)
		if err != nil {
			return nil, fmt.Errorf("fetch contents of %s: %w", f.Path, err)
		}
		if err := verifyHash(data, f.Source.Hash); err != nil {
			return nil, fmt.Errorf("contents of %s from %s: %w", f.Path, f.Source.URL, err)
		}
		return data, nil
	}
	switch f.Encoding {
	case "":
		return []byte(f.Contents), nil
	case "base64":
		data, err := base64.StdEncoding.DecodeString(f.Contents)
		if err != nil {
			// Never quote the contents: they may be a secret.
			return nil, fmt.Errorf("decode base64 contents of %s: %w", f.Path, err)
		}
		return data, nil
	default:
		return nil, fmt.Errorf("contents of %s: unknown encoding %q", f.Path, f.Encoding)
	}
}

// fixAttrs gives an entry whose contents are right its mode and owner.
func fixAttrs(path string, cur entry, mode os.FileMode, uid, gid int) (Outcome, error) {
	if cur.perm == mode && cur.uid == uid && cur.gid == gid {
		return OutcomeUnchanged, nil
	}
	// Chown before chmod: chown clears setuid and setgid.
	if cur.uid != uid || cur.gid != gid {
		if err := os.Lchown(path, uid, gid); err != nil {
			return "", fmt.Errorf("chown %s to %d:%d: %w", path, uid, gid, err)
		}
	}
	if err := os.Chmod(path, mode); err != nil {
		return "", fmt.Errorf("chmod %s to %v: %w", path, mode, err)
	}
	return OutcomeDone, nil
}

func sameContents(path string, want []byte) (bool, error) {
	f, err := os.Open(path)
	if err != nil {
		return false, fmt.Errorf("read %s: %w", path, err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return false, fmt.Errorf("read %s: %w", path, err)
	}
	if fi.Size() != int64(len(want)) {
		return false, nil
	}
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return false, fmt.Errorf("read %s: %w", path, err)
	}
	w := sha256.Sum256(want)
	return bytes.Equal(h.Sum(nil), w[:]), nil
}

// newHash returns the hash of an Ignition verification hash
// ("sha256-<hex>" or "sha512-<hex>") and the hex digest it expects.
func newHash(spec string) (hash.Hash, string, error) {
	algo, want, _ := strings.Cut(spec, "-")
	switch algo {
	case "sha256":
		return sha256.New(), strings.ToLower(want), nil
	case "sha512":
		return sha512.New(), strings.ToLower(want), nil
	}
	return nil, "", fmt.Errorf("verification hash %q: want sha256-<hex> or sha512-<hex>", spec)
}

// matchesHash reports whether the file at path has the verification hash.
func matchesHash(path, spec string) (bool, error) {
	h, want, err := newHash(spec)
	if err != nil {
		return false, fmt.Errorf("%s: %w", path, err)
	}
	f, err := os.Open(path)
	if err != nil {
		return false, fmt.Errorf("read %s: %w", path, err)
	}
	defer f.Close()
	if _, err := io.Copy(h, f); err != nil {
		return false, fmt.Errorf("read %s: %w", path, err)
	}
	return hex.EncodeToString(h.Sum(nil)) == want, nil
}

// verifyHash checks data against a verification hash.
func verifyHash(data []byte, spec string) error {
	h, want, err := newHash(spec)
	if err != nil {
		return err
	}
	h.Write(data)
	if got := hex.EncodeToString(h.Sum(nil)); got != want {
		return fmt.Errorf("verification failed: contents hash to %s-%s, want %s", spec[:strings.Index(spec, "-")], got, spec)
	}
	return nil
}

// directory makes a Directory step's path a directory with its mode and owner.
func (e *executor) directory(d *render.Directory) (Outcome, error) {
	sc, err := e.scopeFor(d.Path)
	if err != nil {
		return "", err
	}
	path, err := sc.hostPath(d.Path)
	if err != nil {
		return "", err
	}
	uid, gid, err := sc.owner(d.Owner)
	if err != nil {
		return "", fmt.Errorf("owner of %s: %w", path, err)
	}
	mode := fileMode(d.Mode)
	cur, err := inspect(path)
	if err != nil {
		return "", fmt.Errorf("inspect %s: %w", path, err)
	}
	if cur.exists && cur.fi.IsDir() {
		return fixAttrs(path, cur, mode, uid, gid)
	}
	if err := ensureParent(path); err != nil {
		return "", err
	}
	// fsutil.MkdirAll refuses a non-directory in the way, with the path.
	if err := fsutil.MkdirAll(path, mode, uid, gid); err != nil {
		return "", err
	}
	return OutcomeDone, nil
}

// link makes a Link step's path a symbolic (or hard) link to its target.
func (e *executor) link(l *render.Link) (Outcome, error) {
	sc, err := e.scopeFor(l.Path)
	if err != nil {
		return "", err
	}
	path, err := sc.hostPath(l.Path)
	if err != nil {
		return "", err
	}
	uid, gid, err := sc.owner(l.Owner)
	if err != nil {
		return "", fmt.Errorf("owner of %s: %w", path, err)
	}
	if err := fsutil.RemoveStaleTemps(path); err != nil {
		return "", err
	}
	cur, err := inspect(path)
	if err != nil {
		return "", fmt.Errorf("inspect %s: %w", path, err)
	}
	if cur.exists && cur.fi.IsDir() {
		return "", fmt.Errorf("link %s: a directory is in the way; remove it or change the manifest", path)
	}
	if l.Hard {
		return hardLink(sc, path, l.Target, cur)
	}
	if cur.exists && cur.fi.Mode()&os.ModeSymlink != 0 {
		if target, err := os.Readlink(path); err == nil && target == l.Target {
			if cur.uid == uid && cur.gid == gid {
				return OutcomeUnchanged, nil
			}
			if err := os.Lchown(path, uid, gid); err != nil {
				return "", fmt.Errorf("chown link %s to %d:%d: %w", path, uid, gid, err)
			}
			return OutcomeDone, nil
		}
	}
	if err := ensureParent(path); err != nil {
		return "", err
	}
	if err := fsutil.Symlink(l.Target, path, uid, gid); err != nil {
		return "", err
	}
	return OutcomeDone, nil
}

// hardLink makes path another name of the file at plan path target (in
// the same scope), replacing whatever non-directory was at path.
func hardLink(sc scope, path, target string, cur entry) (Outcome, error) {
	rel, err := sc.rel(target)
	if err != nil {
		return "", fmt.Errorf("hard link %s: target: %w", path, err)
	}
	src, err := sc.resolve(rel, false)
	if err != nil {
		return "", err
	}
	sfi, err := os.Lstat(src)
	if err != nil {
		return "", fmt.Errorf("hard link %s to %s: %w", path, src, err)
	}
	if cur.exists && os.SameFile(sfi, cur.fi) {
		return OutcomeUnchanged, nil
	}
	if err := ensureParent(path); err != nil {
		return "", err
	}
	dir := filepath.Dir(path)
	tmp := filepath.Join(dir, "."+filepath.Base(path)+".link-tmp")
	_ = os.Remove(tmp)
	if err := os.Link(src, tmp); err != nil {
		return "", fmt.Errorf("hard link %s to %s: %w", path, src, err)
	}
	if err := os.Rename(tmp, path); err != nil {
		os.Remove(tmp)
		return "", fmt.Errorf("hard link %s: rename into place: %w", path, err)
	}
	if err := fsutil.SyncDir(dir); err != nil {
		return "", err
	}
	return OutcomeDone, nil
}

// parentMu serialises the creation of parent directories, so that
// concurrent steps sharing a parent never see each other's temporary
// directories as leftovers.
var parentMu sync.Mutex

// ensureParent creates path's missing parent directories 0755, leaving
// existing ones (and their modes) alone.
func ensureParent(path string) error {
	dir := filepath.Dir(path)
	if fi, err := os.Stat(dir); err == nil && fi.IsDir() {
		return nil
	}
	parentMu.Lock()
	defer parentMu.Unlock()
	return mkdirParents(dir)
}

// mkdirParents creates dir and its missing parents 0755. Each is made
// under a temporary name, given its mode, and renamed into place, so a
// crash never leaves a directory with the wrong mode that a later run
// would take as intended.
func mkdirParents(dir string) error {
	// Steps of one phase run concurrently and share parents; one at a time
	// here keeps one step's leftover cleanup off another's fresh temp dir.
	mkdirMu.Lock()
	defer mkdirMu.Unlock()
	return mkdirParentsLocked(dir)
}

var mkdirMu sync.Mutex

func mkdirParentsLocked(dir string) error {
	fi, err := os.Stat(dir)
	if err == nil {
		if !fi.IsDir() {
			return fmt.Errorf("mkdir %s: exists and is not a directory", dir)
		}
		return nil
	}
	if !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("mkdir %s: %w", dir, err)
	}
	parent, base := filepath.Dir(dir), filepath.Base(dir)
	if parent != dir {
		if err := mkdirParentsLocked(parent); err != nil {
			return err
		}
	}
	pattern := "." + base + ".mkdir-"
	// Empty leftovers of a killed run go; a non-empty one is not ours and stays.
	fsutil.RemoveLeftovers(parent, pattern)
	tmp, err := os.MkdirTemp(parent, pattern)
	if err != nil {
		return fmt.Errorf("mkdir %s: %w", dir, err)
	}
	if err := os.Chmod(tmp, 0o755); err != nil {
		os.Remove(tmp)
		return fmt.Errorf("mkdir %s: chmod: %w", dir, err)
	}
	// Never replace a directory a Directory step made meanwhile (with its
	// own mode): if one is there now, it wins.
	if err := unix.Renameat2(unix.AT_FDCWD, tmp, unix.AT_FDCWD, dir, unix.RENAME_NOREPLACE); err != nil {
		os.Remove(tmp)
		if fi, serr := os.Stat(dir); errors.Is(err, unix.EEXIST) && serr == nil && fi.IsDir() {
			return nil
		}
		return fmt.Errorf("mkdir %s: rename into place: %w", dir, err)
	}
	return fsutil.SyncDir(parent)
}
