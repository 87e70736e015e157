package apply

import (
	"context"
	_ "crypto/sha512" // sha512 verification hashes, through go-digest
	"encoding/base64"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path"
	"strings"

	"github.com/opencontainers/go-digest"

	"github.com/nodespawn/nodespawn/internal/confine"
	"github.com/nodespawn/nodespawn/internal/redact"
	"github.com/nodespawn/nodespawn/plan"
	"github.com/nodespawn/nodespawn/state"
)

// entry is what lies at a path now.
type entry struct {
	exists bool
	fi     fs.FileInfo
	uid    int
	gid    int
	perm   os.FileMode // permission bits plus setuid, setgid, sticky
}

func (s scope) inspect(rel string) (entry, error) {
	fi, err := s.root.Lstat(rel)
	if errors.Is(err, fs.ErrNotExist) {
		return entry{}, nil
	}
	if err != nil {
		return entry{}, err
	}
	uid, gid := confine.Owner(fi)
	return entry{exists: true, fi: fi, uid: uid, gid: gid, perm: confine.ModeOf(fi)}, nil
}

// target is a file, directory or link step's path resolved to its scope.
type target struct {
	s   scope
	rel string // the path in s.root
}

func (t target) show() string { return t.s.root.Show(t.rel) }

func (e *Executor) target(p string) (target, error) {
	sc, err := e.scopeFor(p)
	if err != nil {
		return target{}, err
	}
	rel, err := sc.rel(p)
	if err != nil {
		sc.close()
		return target{}, err
	}
	return target{s: sc, rel: rel}, nil
}

// file makes a File step's path hold its contents, mode and owner.
func (e *Executor) file(ctx context.Context, f *plan.File) (state.Outcome, error) {
	t, err := e.target(f.Path)
	if err != nil {
		return "", err
	}
	defer t.s.close()
	mode := confine.FileMode(f.Mode)
	if f.Secret {
		// Whatever the plan says, a secret is readable by its owner only.
		mode &= 0o600
	}
	uid, gid, err := t.s.owner(f.Owner)
	if err != nil {
		return "", fmt.Errorf("owner of %s: %w", t.show(), err)
	}
	cur, err := t.s.inspect(t.rel)
	if err != nil {
		return "", fmt.Errorf("inspect %s: %w", t.show(), err)
	}
	if cur.exists && cur.fi.IsDir() {
		return "", fmt.Errorf("write %s: a directory is in the way; remove it or change the manifest", t.show())
	}
	if cur.exists && !f.Overwrite {
		return state.OutcomeUnchanged, nil
	}
	if cur.exists && cur.fi.Mode().IsRegular() && f.Source != nil && f.Source.Hash != "" {
		// The verification hash describes the (decompressed) file: no need
		// to fetch when it is already there.
		same, err := t.matchesHash(f.Source.Hash)
		if err != nil {
			return "", err
		}
		if same {
			return t.fixAttrs(cur, mode, uid, gid)
		}
	}
	data, err := e.contents(ctx, f)
	if err != nil {
		return "", err
	}
	if cur.exists && cur.fi.Mode().IsRegular() {
		same, err := t.matchesHash(string(digest.SHA256) + "-" + digest.FromBytes(data).Encoded())
		if err != nil {
			return "", err
		}
		if same {
			return t.fixAttrs(cur, mode, uid, gid)
		}
	}
	if err := t.s.root.MkdirParents(path.Dir(t.rel)); err != nil {
		return "", err
	}
	if err := t.s.root.WriteFile(t.rel, data, mode, uid, gid); err != nil {
		return "", err
	}
	return state.OutcomeDone, nil
}

// contents returns a File step's bytes: decoded inline contents, or the
// verified remote source. Errors name the source without its password
// and query (redact.URL): they are printed and kept in the result record.
func (e *Executor) contents(ctx context.Context, f *plan.File) ([]byte, error) {
	if f.Source != nil {
		where := redact.URL(f.Source.URL)
		if f.Source.Hash == "" {
			return nil, fmt.Errorf("contents of %s from %s: no verification hash; every remote file must be verified", f.Path, where)
		}
		if e.opts.Deps.Downloader == nil {
			return nil, fmt.Errorf("fetch %s for %s: %w", where, f.Path, errNoDownloader)
		}
		data, err := e.opts.Deps.Downloader.Contents(ctx, f.Source)
		if err != nil {
			return nil, fmt.Errorf("fetch contents of %s: %w", f.Path, err)
		}
		if err := verifyHash(data, f.Source.Hash); err != nil {
			return nil, fmt.Errorf("contents of %s from %s: %w", f.Path, where, err)
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
func (t target) fixAttrs(cur entry, mode os.FileMode, uid, gid int) (state.Outcome, error) {
	if cur.perm == mode && cur.uid == uid && cur.gid == gid {
		return state.OutcomeUnchanged, nil
	}
	// Chown before chmod: chown clears setuid and setgid.
	if cur.uid != uid || cur.gid != gid {
		if err := t.s.root.Lchown(t.rel, uid, gid); err != nil {
			return "", err
		}
	}
	if err := t.s.root.Chmod(t.rel, mode); err != nil {
		return "", err
	}
	return state.OutcomeDone, nil
}

// ignitionDigest turns an Ignition verification hash ("sha256-<hex>" or
// "sha512-<hex>") into the digest it names.
func ignitionDigest(spec string) (digest.Digest, error) {
	algo, enc, ok := strings.Cut(spec, "-")
	d := digest.NewDigestFromEncoded(digest.Algorithm(algo), strings.ToLower(enc))
	if !ok || (algo != "sha256" && algo != "sha512") || d.Validate() != nil {
		return "", fmt.Errorf("verification hash %q: want sha256-<hex> or sha512-<hex>", spec)
	}
	return d, nil
}

// matchesHash reports whether the regular file at t has the verification
// hash; a symlink there is not followed.
func (t target) matchesHash(spec string) (bool, error) {
	want, err := ignitionDigest(spec)
	if err != nil {
		return false, fmt.Errorf("%s: %w", t.show(), err)
	}
	f, err := t.s.root.OpenNoFollow(t.rel)
	if err != nil {
		return false, err
	}
	defer f.Close()
	got, err := want.Algorithm().FromReader(f)
	if err != nil {
		return false, fmt.Errorf("read %s: %w", t.show(), err)
	}
	return got == want, nil
}

// verifyHash checks data against a verification hash.
func verifyHash(data []byte, spec string) error {
	want, err := ignitionDigest(spec)
	if err != nil {
		return err
	}
	if got := want.Algorithm().FromBytes(data); got != want {
		return fmt.Errorf("verification failed: contents hash to %s-%s, want %s", got.Algorithm(), got.Encoded(), spec)
	}
	return nil
}

// directory makes a Directory step's path a directory with its mode and owner.
func (e *Executor) directory(d *plan.Directory) (state.Outcome, error) {
	t, err := e.target(d.Path)
	if err != nil {
		return "", err
	}
	defer t.s.close()
	uid, gid, err := t.s.owner(d.Owner)
	if err != nil {
		return "", fmt.Errorf("owner of %s: %w", t.show(), err)
	}
	mode := confine.FileMode(d.Mode)
	cur, err := t.s.inspect(t.rel)
	if err != nil {
		return "", fmt.Errorf("inspect %s: %w", t.show(), err)
	}
	if cur.exists && cur.fi.IsDir() {
		return t.fixAttrs(cur, mode, uid, gid)
	}
	// MkdirAll refuses a non-directory in the way, with the path.
	if err := t.s.root.MkdirAll(t.rel, mode, uid, gid); err != nil {
		return "", err
	}
	return state.OutcomeDone, nil
}

// link makes a Link step's path a symbolic (or hard) link to its target.
func (e *Executor) link(l *plan.Link) (state.Outcome, error) {
	t, err := e.target(l.Path)
	if err != nil {
		return "", err
	}
	defer t.s.close()
	uid, gid, err := t.s.owner(l.Owner)
	if err != nil {
		return "", fmt.Errorf("owner of %s: %w", t.show(), err)
	}
	cur, err := t.s.inspect(t.rel)
	if err != nil {
		return "", fmt.Errorf("inspect %s: %w", t.show(), err)
	}
	if cur.exists && cur.fi.IsDir() {
		return "", fmt.Errorf("link %s: a directory is in the way; remove it or change the manifest", t.show())
	}
	if l.Hard {
		return t.hardLink(l.Target, cur)
	}
	if cur.exists && cur.fi.Mode()&os.ModeSymlink != 0 {
		if target, err := t.s.root.Readlink(t.rel); err == nil && target == l.Target {
			if cur.uid == uid && cur.gid == gid {
				return state.OutcomeUnchanged, nil
			}
			if err := t.s.root.Lchown(t.rel, uid, gid); err != nil {
				return "", err
			}
			return state.OutcomeDone, nil
		}
	}
	if err := t.s.root.MkdirParents(path.Dir(t.rel)); err != nil {
		return "", err
	}
	if err := t.s.root.Symlink(l.Target, t.rel, uid, gid); err != nil {
		return "", err
	}
	return state.OutcomeDone, nil
}

// hardLink makes t another name of the file at plan path target (in the
// same scope), replacing whatever non-directory was at t.
func (t target) hardLink(targetPath string, cur entry) (state.Outcome, error) {
	src, err := t.s.rel(targetPath)
	if err != nil {
		return "", fmt.Errorf("hard link %s: target: %w", t.show(), err)
	}
	sfi, err := t.s.root.Lstat(src)
	if err != nil {
		return "", fmt.Errorf("hard link %s: %w", t.show(), err)
	}
	if cur.exists && os.SameFile(sfi, cur.fi) {
		return state.OutcomeUnchanged, nil
	}
	if err := t.s.root.MkdirParents(path.Dir(t.rel)); err != nil {
		return "", err
	}
	if err := t.s.root.Link(src, t.rel); err != nil {
		return "", err
	}
	return state.OutcomeDone, nil
}
