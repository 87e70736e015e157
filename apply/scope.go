package apply

import (
	"bufio"
	"bytes"
	"fmt"
	"path"
	"strconv"
	"strings"

	"github.com/nodespawn/nodespawn/internal/confine"
	"github.com/nodespawn/nodespawn/plan"
)

// scope is the tree a plan path is confined to: the host root for host
// paths, the machine's rootfs for paths under Plan.Rootfs. Every path is
// resolved by the kernel inside the scope's root (see internal/confine), so
// a symlink in an image, of any shape, never makes apply read, write,
// chmod or remove anything outside the rootfs; an absolute link means the
// machine's own root, as it will once the machine boots.
type scope struct {
	root *confine.Root
	// prefix is the plan path of the scope's top ("/" or Plan.Rootfs).
	prefix string
	// owned is set when the scope opened its root and must close it.
	owned bool
}

// scopeFor returns the scope of plan path p; close it when done.
func (e *Executor) scopeFor(p string) (scope, error) {
	if e.plan.Rootfs == "" || !within(p, e.plan.Rootfs) {
		return scope{root: e.host, prefix: "/"}, nil
	}
	// Opened per step: the image step replaces the rootfs directory.
	r, err := e.host.OpenRoot(e.plan.Rootfs)
	if err != nil {
		return scope{}, fmt.Errorf("open the machine's rootfs: %w", err)
	}
	return scope{root: r, prefix: path.Clean(e.plan.Rootfs), owned: true}, nil
}

func (s scope) close() {
	if s.owned {
		s.root.Close()
	}
}

// within reports whether plan path p is dir or below it.
func within(p, dir string) bool {
	p, dir = path.Clean(p), path.Clean(dir)
	return p == dir || strings.HasPrefix(p, strings.TrimSuffix(dir, "/")+"/")
}

// rel returns plan path p as a path in the scope's root.
func (s scope) rel(p string) (string, error) {
	p = path.Clean(p)
	if !path.IsAbs(p) {
		return "", fmt.Errorf("path %q is not absolute", p)
	}
	if !within(p, s.prefix) {
		return "", fmt.Errorf("path %s is outside %s", p, s.prefix)
	}
	return "/" + confine.Clean(strings.TrimPrefix(p, s.prefix)), nil
}

// owner returns the numeric owner of o: names are looked up in the scope's
// own /etc/passwd and /etc/group, ids are taken as they are.
func (s scope) owner(o plan.Owner) (uid, gid int, err error) {
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
	b, err := s.root.ReadFile(file)
	if err != nil {
		return 0, fmt.Errorf("look up %q: %w", name, err)
	}
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		fields := strings.Split(sc.Text(), ":")
		if len(fields) < 3 || fields[0] != name {
			continue
		}
		id, err := strconv.Atoi(fields[2])
		if err != nil {
			return 0, fmt.Errorf("look up %q in %s: bad id %q", name, s.root.Show(file), fields[2])
		}
		return id, nil
	}
	if err := sc.Err(); err != nil {
		return 0, fmt.Errorf("look up %q in %s: %w", name, s.root.Show(file), err)
	}
	return 0, fmt.Errorf("%q not found in %s", name, s.root.Show(file))
}
