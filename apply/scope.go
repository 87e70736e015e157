package apply

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/nodespawn/nodespawn/render"
)

// maxLinks bounds symlink hops while resolving one path, as the kernel does.
const maxLinks = 40

// scope is a directory tree that plan paths are confined to: the root for
// host paths, the machine's rootfs for paths under Plan.Rootfs. Symlinks
// met while resolving a path are followed as they would be inside the
// scope (an absolute target starts again at the scope's top), so a link in
// an image never makes apply write outside the rootfs.
type scope struct {
	// dir is the scope's top on the host, symlinks resolved.
	dir string
	// prefix is the plan path of the scope's top ("/" or Plan.Rootfs).
	prefix string
}

// scopeFor returns the scope of plan path p.
func (e *executor) scopeFor(p string) (scope, error) {
	root := scope{dir: e.opts.Root, prefix: "/"}
	if e.plan.Rootfs == "" || !within(p, e.plan.Rootfs) {
		return root, nil
	}
	dir, err := root.resolve(e.plan.Rootfs, true)
	if err != nil {
		return scope{}, err
	}
	return scope{dir: dir, prefix: filepath.Clean(e.plan.Rootfs)}, nil
}

// within reports whether plan path p is dir or below it.
func within(p, dir string) bool {
	p, dir = filepath.Clean(p), filepath.Clean(dir)
	return p == dir || strings.HasPrefix(p, strings.TrimSuffix(dir, "/")+"/")
}

// hostPath returns where plan path p lies on the host: its parent
// directories resolved inside the scope, its last element not followed (a
// step replaces or inspects the entry itself).
func (s scope) hostPath(p string) (string, error) {
	rel, err := s.rel(p)
	if err != nil {
		return "", err
	}
	if rel == "/" {
		return s.dir, nil
	}
	parent, err := s.resolve(filepath.Dir(rel), true)
	if err != nil {
		return "", err
	}
	return filepath.Join(parent, filepath.Base(rel)), nil
}

// rel returns p relative to the scope's top, as an absolute path.
func (s scope) rel(p string) (string, error) {
	p = filepath.Clean(p)
	if !filepath.IsAbs(p) {
		return "", fmt.Errorf("path %q is not absolute", p)
	}
	if !within(p, s.prefix) {
		return "", fmt.Errorf("path %s is outside %s", p, s.prefix)
	}
	return "/" + strings.TrimPrefix(strings.TrimPrefix(p, s.prefix), "/"), nil
}

// resolve maps rel (absolute, relative to the scope's top) to a host path,
// following symlinks inside the scope; follow=false leaves the last element
// as it is. Elements that do not exist are appended as they are.
func (s scope) resolve(rel string, follow bool) (string, error) {
	if s.dir == "/" {
		// The host root: the kernel's own resolution is the right one.
		return filepath.Clean(rel), nil
	}
	todo := strings.Split(strings.Trim(filepath.Clean(rel), "/"), "/")
	var done []string // resolved elements below s.dir
	hops := 0
	for len(todo) > 0 {
		el := todo[0]
		todo = todo[1:]
		switch el {
		case "", ".":
			continue
		case "..":
			if len(done) > 0 {
				done = done[:len(done)-1]
			}
			continue
		}
		cur := filepath.Join(append([]string{s.dir}, append(done, el)...)...)
		fi, err := os.Lstat(cur)
		if errors.Is(err, os.ErrNotExist) {
			done = append(done, el)
			done = append(done, todo...)
			break
		}
		if err != nil {
			return "", fmt.Errorf("resolve %s: %w", rel, err)
		}
		if fi.Mode()&os.ModeSymlink == 0 || (len(todo) == 0 && !follow) {
			done = append(done, el)
			continue
		}
		if hops++; hops > maxLinks {
			return "", fmt.Errorf("resolve %s: too many levels of symbolic links", rel)
		}
		target, err := os.Readlink(cur)
		if err != nil {
			return "", fmt.Errorf("resolve %s: %w", rel, err)
		}
		if filepath.IsAbs(target) {
			done = nil
		}
		todo = append(strings.Split(strings.Trim(target, "/"), "/"), todo...)
	}
	return filepath.Join(append([]string{s.dir}, done...)...), nil
}

// owner returns the numeric owner of o: names are looked up in the scope's
// own /etc/passwd and /etc/group, ids are taken as they are.
func (s scope) owner(o render.Owner) (uid, gid int, err error) {
	uid, gid = o.UID, o.GID
	if o.User != "" {
		if uid, err = s.lookup("/etc/passwd", o.User); err != nil {
			return 0, 0, err
		}
	}
	if o.Group != "" {
		if gid, err = s.lookup("/etc/group", o.Group); err != nil {
			return 0, 0, err
		}
	}
	return uid, gid, nil
}

// lookup finds name in a passwd(5) or group(5) file of the scope; the id
// is the third field in both.
func (s scope) lookup(file, name string) (int, error) {
	path, err := s.resolve(file, true)
	if err != nil {
		return 0, err
	}
	f, err := os.Open(path)
	if err != nil {
		return 0, fmt.Errorf("look up %q: %w", name, err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Split(sc.Text(), ":")
		if len(fields) < 3 || fields[0] != name {
			continue
		}
		id, err := strconv.Atoi(fields[2])
		if err != nil {
			return 0, fmt.Errorf("look up %q in %s: bad id %q", name, path, fields[2])
		}
		return id, nil
	}
	if err := sc.Err(); err != nil {
		return 0, fmt.Errorf("look up %q in %s: %w", name, path, err)
	}
	return 0, fmt.Errorf("%q not found in %s", name, path)
}
