package render

import (
	"fmt"
	"path"
	"strings"

	"github.com/nodespawn/nodespawn/internal/layout"
	"github.com/nodespawn/nodespawn/plan"
)

// NodeStateDir (layout.NodeStateDir) is the host directory with what the
// node keeps whichever machine of the pair runs it: kubelet's state (its
// client certificate and key, so an upgraded machine comes back as the
// same Node without a bootstrap token) and containerd's (the image cache,
// so pods restart without pulling again). It is bound into the machine, as
// an in-place kubelet upgrade would find it.
const NodeStateDir = layout.NodeStateDir

// nodeStateBinds are the members of NodeStateDir and where they appear in
// the machine, with the mode of the host directory.
var nodeStateBinds = []struct {
	name, target string
	mode         uint32
}{
	{"kubelet", "/var/lib/kubelet", 0o700},
	{"containerd", "/var/lib/containerd", 0o711},
}

// KubeletStateDir is the host directory bound at /var/lib/kubelet.
func KubeletStateDir() string { return path.Join(NodeStateDir, "kubelet") }

// renderNodeState creates the node's state directories on the host.
func (r *renderer) renderNodeState() {
	r.dir(plan.PhaseHost, NodeStateDir, 0o700, "the node's state, kept across the machines of an upgrade")
	for _, b := range nodeStateBinds {
		r.dir(plan.PhaseHost, path.Join(NodeStateDir, b.name), b.mode, fmt.Sprintf("the node's %s, bound at %s in the machine", b.target, b.target))
	}
}

// stateBinds are the .nspawn lines binding the node's state.
func (r *renderer) stateBinds() []string {
	var out []string
	for _, b := range nodeStateBinds {
		out = append(out, "Bind="+path.Join(NodeStateDir, b.name)+":"+b.target)
	}
	return out
}

// checkStateBinds refuses manifest binds onto or into the node's state
// paths: they would hide or split what carries the node across upgrades.
func (r *renderer) checkStateBinds() error {
	for i, b := range r.m.Machine.Binds {
		target := b.Target
		if target == "" {
			target = b.Source
		}
		for _, s := range nodeStateBinds {
			if within(target, s.target) || within(s.target, target) {
				return &Error{Path: field("machine", "binds", i), Msg: fmt.Sprintf("binds over %s, which nodespawn binds from %s to keep the node's state across upgrades", s.target, path.Join(NodeStateDir, s.name))}
			}
		}
	}
	return nil
}

// checkHiddenExtras refuses machine extras written where the node's state
// is bound: the bind would hide them once the machine runs.
func (r *renderer) checkHiddenExtras() error {
	for _, s := range r.plan.Steps {
		at, ok := r.origins[s.Origin]
		if s.Origin == "" || !ok || len(at.Path) == 0 || at.Path[0] != "machine" {
			continue
		}
		p := stepPath(&s)
		for _, b := range nodeStateBinds {
			if p != "" && within(p, r.inRoot(b.target)) {
				return &Error{Path: at, Msg: fmt.Sprintf("%s is inside %s, where the node's state is bound (from %s); the bind would hide it", strings.TrimPrefix(p, r.rootfs), b.target, path.Join(NodeStateDir, b.name))}
			}
		}
	}
	return nil
}

// within reports whether p is dir or inside it.
func within(p, dir string) bool {
	p, dir = path.Clean(p), path.Clean(dir)
	return p == dir || strings.HasPrefix(p, strings.TrimSuffix(dir, "/")+"/")
}

// stepPath is the path a file, directory or link step creates.
func stepPath(s *plan.Step) string {
	switch {
	case s.File != nil:
		return s.File.Path
	case s.Directory != nil:
		return s.Directory.Path
	case s.Link != nil:
		return s.Link.Path
	}
	return ""
}
