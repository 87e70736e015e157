// Package render turns a manifest and the host's facts into a Plan: every
// file, link, directory and action apply will carry out. render.Plan is pure: no
// I/O, no clock, no randomness; the same inputs give byte-identical plans.
package render

import (
	"bytes"
	"embed"
	"fmt"
	"net/netip"
	"path"
	"sort"
	"strings"
	"sync"
	"text/template"
	"unicode/utf8"

	jsonpath "github.com/coreos/vcontext/path"

	"github.com/nodespawn/nodespawn/internal/layout"
	"github.com/nodespawn/nodespawn/manifest"
	"github.com/nodespawn/nodespawn/plan"
)

//go:embed templates/*.tmpl
var templateFS embed.FS

// templates are parsed when a plan is first rendered, not at start-up:
// `nodespawn version` or `status` never render.
var templates = sync.OnceValue(func() *template.Template {
	return template.Must(template.New("").Funcs(template.FuncMap{
		"join":   strings.Join,
		"header": header,
	}).ParseFS(templateFS, "templates/*.tmpl"))
})

// header is the one-line notice every generated file starts with.
func header(comment string) string {
	return comment + " Managed by nodespawn: changes are overwritten on the next apply."
}

// Error is a render failure caused by the manifest: it asks for something
// this host cannot give (a GPU on a host without one, say), or one of its
// extra entries clashes with another step of the plan.
type Error struct {
	// Path names the manifest field at fault; when the host's facts are at
	// fault instead, its Tag is "facts" (see fact).
	Path jsonpath.ContextPath
	Msg  string
	// Host is set when the manifest is fine as such and this host cannot
	// do what it asks (no address in kubernetes.nodeIP's CIDR, say):
	// validate, which renders for made-up reference hosts, leaves those
	// to apply on the real host.
	Host bool
}

// hostError is a problem of this host with what the manifest field at asks.
func hostError(at jsonpath.ContextPath, msg string) *Error {
	return &Error{Path: at, Msg: msg, Host: true}
}

// Error formats the failure as PATH: MSG, the path as manifest.FormatPath
// writes it.
func (e *Error) Error() string { return manifest.FormatPath(e.Path) + ": " + e.Msg }

// field is the path of a manifest field: member names and array indexes.
func field(elems ...any) jsonpath.ContextPath { return jsonpath.New("", elems...) }

// fact is the path of a field of the host's facts, written facts.NAME.
func fact(name string) jsonpath.ContextPath { return jsonpath.New("facts", name) }

// Plan builds the plan for manifest m on the host described by f. The
// manifest must have been loaded by manifest.Load (validated and defaulted):
// render trusts it and checks only what depends on the host or on the
// whole plan. Errors are *Error values (joined when there are several);
// Locate places them in the manifest's source.
func Plan(m *manifest.Manifest, f plan.Facts) (*plan.Plan, error) {
	return PlanFor(m, f, m.Machine.Name)
}

// PlanFor builds the plan for manifest m as machine, one of the pair
// layout.PairOf(m.Machine.Name): an upgrade prepares the machine
// that is not running. Only the machine's own paths differ between the two
// plans; the node (its name, its state directory) is the same.
func PlanFor(m *manifest.Manifest, f plan.Facts, machine string) (*plan.Plan, error) {
	r, err := build(m, f, machine)
	if err != nil {
		return nil, err
	}
	// The other machine of the pair is prepared by an upgrade with the
	// same host extras: an extra where it has a file (its .nspawn file,
	// its root) is refused now, not when the upgrade fails.
	var alt []plan.Step
	if other, err := build(m, f, r.plan.Alternate); err == nil {
		alt = other.plan.Steps
	}
	if err := r.checkClaims(alt); err != nil {
		return nil, err
	}
	return &r.plan, nil
}

// build renders the steps of machine's plan, without checking their
// claims against each other.
func build(m *manifest.Manifest, f plan.Facts, machine string) (*renderer, error) {
	r := &renderer{m: m, f: f, machine: machine}
	if err := r.decide(); err != nil {
		return nil, err
	}
	steps := []func() error{r.renderHost, r.renderRootfs, r.renderMachine, r.renderGPU, r.renderExtras, r.checkHiddenExtras, r.renderStart}
	for _, step := range steps {
		if err := step(); err != nil {
			return nil, err
		}
	}
	sortByPhase(r.plan.Steps)
	return r, nil
}

// renderer carries the decisions every part of the plan shares.
type renderer struct {
	m    *manifest.Manifest
	f    plan.Facts
	plan plan.Plan

	machine string
	rootfs  string
	// layerRoot is set when the machine's root is an overlayfs mount of
	// the layer store; flatWhy says why it is not.
	layerRoot *plan.LayerRoot
	flatWhy   string
	nodeName  string
	gpu       bool
	kvm       bool
	rdma      bool
	bpffs     bool
	// containerdConfig is the configuration version the selected
	// containerd reads without migrating it (3 or 4).
	containerdConfig int
	// machineDNS is the machine's resolv.conf; podDNS the upstream
	// servers kubelet hands to pods (dnsPolicy: Default).
	machineDNS, podDNS resolvers
	// nodeIPs are kubelet's --node-ip (none: kubelet chooses).
	nodeIPs []netip.Addr
	// origins maps each step's Origin to the manifest path it was made
	// from (see from).
	origins map[string]jsonpath.ContextPath
	// alternate holds the steps of the alternate machine's plan that
	// checkClaims weighs this plan's extras against.
	alternate map[*plan.Step]bool
}

func (r *renderer) decide() error {
	m := r.m
	if m.Machine.Name == "" {
		return &Error{Path: field("machine", "name"), Msg: "is empty (load the manifest with manifest.Load so defaults apply)"}
	}
	pair := layout.PairOf(m.Machine.Name)
	if !pair.Has(r.machine) {
		return &Error{Path: field("machine", "name"), Msg: fmt.Sprintf("machine %q is not one of this manifest's pair %s and %s", r.machine, pair[0], pair[1])}
	}
	alternate, _ := pair.Other(r.machine)
	r.rootfs = layout.MachineRoot(r.machine)
	if err := r.decideStore(); err != nil {
		return err
	}
	r.nodeName = m.Kubernetes.NodeName
	if r.nodeName == "" {
		r.nodeName = strings.ToLower(r.f.Hostname)
		if !validNodeName(r.nodeName) {
			return hostError(field("kubernetes", "nodeName"), fmt.Sprintf("not set, and the host name %q is not a valid node name; set kubernetes.nodeName", r.f.Hostname))
		}
	}
	if r.f.Arch == "" {
		return &Error{Path: fact("arch"), Msg: "the host architecture is unknown"}
	}

	hasGPU := r.f.NVIDIA != nil && len(r.f.NVIDIA.DeviceNodes) > 0
	switch m.Machine.GPU {
	case manifest.SwitchOn:
		if !hasGPU {
			return hostError(field("machine", "gpu"), "is \"on\" but this host has no NVIDIA device nodes (/dev/nvidia*); use \"auto\" or \"off\"")
		}
		r.gpu = true
	case manifest.SwitchOff:
	default:
		r.gpu = hasGPU
	}
	switch m.Machine.KVM {
	case manifest.SwitchOn:
		if !r.f.KVM {
			return hostError(field("machine", "kvm"), "is \"on\" but this host has no /dev/kvm; use \"auto\" or \"off\"")
		}
		r.kvm = true
	case manifest.SwitchOff:
	default:
		r.kvm = r.f.KVM
	}
	if err := r.decideRDMA(); err != nil {
		return err
	}
	if err := r.decideDNS(); err != nil {
		return err
	}
	if err := r.decideNodeIP(); err != nil {
		return err
	}
	r.bpffs = m.Machine.BPFFS != manifest.SwitchOff
	r.containerdConfig = manifest.ContainerdConfigVersion(m.Components.Containerd.Version)

	if err := r.checkStateBinds(); err != nil {
		return err
	}

	r.plan = plan.Plan{
		Version:   plan.Version,
		Machine:   r.machine,
		Rootfs:    r.rootfs,
		NodeName:  r.nodeName,
		Alternate: alternate,
		NodeState: layout.NodeStateDir,
	}
	return r.decideGPUHost()
}

// inRoot returns the host path of p inside the machine's rootfs.
func (r *renderer) inRoot(p string) string { return path.Join(r.rootfs, p) }

// stepID builds a stable id: phase, kind and the thing it changes. Rootfs
// paths are named inside the machine, which reads better and does not
// change with the machine name.
func (r *renderer) stepID(phase plan.Phase, kind plan.Kind, name string) string {
	if rel, ok := strings.CutPrefix(name, r.rootfs+"/"); ok {
		name = "/" + rel
	}
	return string(phase) + ":" + string(kind) + ":" + name
}

func (r *renderer) add(s plan.Step) *plan.Step {
	r.plan.Steps = append(r.plan.Steps, s)
	return &r.plan.Steps[len(r.plan.Steps)-1]
}

func (r *renderer) warn(format string, args ...any) {
	r.plan.Warnings = append(r.plan.Warnings, fmt.Sprintf(format, args...))
}

// fileOpt adjusts a file step.
type fileOpt func(*plan.File)

func secret(f *plan.File)        { f.Secret = true }
func mode(m uint32) fileOpt      { return func(f *plan.File) { f.Mode = m } }
func owned(o plan.Owner) fileOpt { return func(f *plan.File) { f.Owner = o } }

// setContents stores data as text, or as base64 when it is not UTF-8 text.
func setContents(f *plan.File, data []byte) {
	if utf8.Valid(data) {
		f.Contents, f.Encoding = string(data), ""
		return
	}
	f.Contents, f.Encoding = base64Std(data), "base64"
}

// file adds a file step with mode 0644 owned by root, overwriting.
func (r *renderer) file(phase plan.Phase, p, contents, what string, opts ...fileOpt) *plan.Step {
	f := &plan.File{Path: p, Mode: 0o644, Contents: contents, Overwrite: true}
	for _, o := range opts {
		o(f)
	}
	setContents(f, []byte(f.Contents))
	return r.add(plan.Step{
		ID:      r.stepID(phase, plan.KindFile, p),
		Phase:   phase,
		Kind:    plan.KindFile,
		Summary: what,
		File:    f,
	})
}

// tmpl renders one embedded template.
func tmpl(name string, data any) string {
	var b bytes.Buffer
	if err := templates().ExecuteTemplate(&b, name, data); err != nil {
		// Templates are embedded and their data is built here: a failure
		// is a programming error that every golden test would catch.
		panic(fmt.Sprintf("render: template %s: %v", name, err))
	}
	return b.String()
}

func (r *renderer) dir(phase plan.Phase, p string, m uint32, what string) *plan.Step {
	return r.add(plan.Step{
		ID:        r.stepID(phase, plan.KindDirectory, p),
		Phase:     phase,
		Kind:      plan.KindDirectory,
		Summary:   what,
		Directory: &plan.Directory{Path: p, Mode: m},
	})
}

func (r *renderer) link(phase plan.Phase, p, target, what string) *plan.Step {
	return r.add(plan.Step{
		ID:      r.stepID(phase, plan.KindLink, p),
		Phase:   phase,
		Kind:    plan.KindLink,
		Summary: what,
		Link:    &plan.Link{Path: p, Target: target},
	})
}

func (r *renderer) systemd(action, unit string, after ...string) *plan.Step {
	id := string(plan.PhaseStart) + ":" + string(plan.KindSystemd) + ":" + action
	what := "systemctl " + action
	if unit != "" {
		id += ":" + unit
		what += " " + unit
	}
	return r.add(plan.Step{
		ID:      id,
		Phase:   plan.PhaseStart,
		Kind:    plan.KindSystemd,
		Summary: what,
		After:   after,
		Systemd: &plan.Systemd{Action: action, Unit: unit},
	})
}

// sortByPhase orders steps by phase, keeping the order within a phase.
func sortByPhase(steps []plan.Step) {
	rank := map[plan.Phase]int{}
	for i, p := range plan.Phases {
		rank[p] = i
	}
	sort.SliceStable(steps, func(i, j int) bool { return rank[steps[i].Phase] < rank[steps[j].Phase] })
}
