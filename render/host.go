package render

import (
	"fmt"
	"path"
	"sort"
	"strings"
	"time"

	"github.com/nodespawn/nodespawn/internal/layout"
	"github.com/nodespawn/nodespawn/manifest"
	"github.com/nodespawn/nodespawn/plan"
)

// Host paths nodespawn writes (systemd's directories and the machine's
// own files are package layout's).
const (
	sysctlFile     = "/etc/sysctl.d/90-nodespawn.conf"
	modulesFile    = "/etc/modules-load.d/90-nodespawn.conf"
	nftFlushUnit   = "nodespawn-nft-flush.service"
	needrestartCfg = "/etc/needrestart/conf.d/90-nodespawn.conf"
	aptGuardCfg    = "/etc/apt/apt.conf.d/51nodespawn-unattended-upgrades"
)

// DefaultSysctls are the host values kubelet checks or the node needs, set
// on the host because /proc/sys is read-only inside the machine (but for
// /proc/sys/net).
var DefaultSysctls = []plan.KeyValue{
	{Key: "vm.overcommit_memory", Value: "1"},
	{Key: "vm.panic_on_oom", Value: "0"},
	{Key: "kernel.panic", Value: "10"},
	{Key: "kernel.panic_on_oops", Value: "1"},
	{Key: "kernel.keys.root_maxkeys", Value: "1000000"},
	{Key: "kernel.keys.root_maxbytes", Value: "25000000"},
	{Key: "net.ipv4.ip_forward", Value: "1"},
	{Key: "net.bridge.bridge-nf-call-iptables", Value: "1"},
	{Key: "net.bridge.bridge-nf-call-ip6tables", Value: "1"},
	{Key: "net.ipv4.conf.all.src_valid_mark", Value: "1"},
	{Key: "net.ipv4.conf.default.src_valid_mark", Value: "1"},
	{Key: "net.ipv4.conf.all.rp_filter", Value: "0"},
	{Key: "net.ipv4.conf.default.rp_filter", Value: "0"},
}

// requiredModules must be loaded before the sysctls: net.bridge.* only exist
// once br_netfilter is loaded, and containerd's snapshotter needs overlay.
var requiredModules = []string{"overlay", "br_netfilter"}

func boolOr(p *bool, def bool) bool {
	if p == nil {
		return def
	}
	return *p
}

// renderHost prepares the host: packages, kernel modules, sysctls, the
// nftables flush, swap, the .nspawn file, the service drop-in and the links
// that start the machine at boot.
func (r *renderer) renderHost() error {
	h := r.m.Host
	flush := boolOr(h.NftablesFlush, true)

	pkgs := []string{"systemd-container"}
	if flush {
		pkgs = append(pkgs, "nftables")
	}
	r.add(plan.Step{
		ID:       "host:packages",
		Phase:    plan.PhaseHost,
		Kind:     plan.KindPackages,
		Summary:  "make sure the host has " + strings.Join(pkgs, ", "),
		Packages: &plan.Packages{Names: pkgs, Install: boolOr(h.InstallPackages, true)},
	})

	modules := append([]string{}, requiredModules...)
	for _, mod := range append(r.rdmaModules(), h.Modules...) {
		if !contains(modules, mod) {
			modules = append(modules, mod)
		}
	}
	r.file(plan.PhaseHost, modulesFile, header("#")+"\n"+strings.Join(modules, "\n")+"\n",
		"load "+strings.Join(modules, ", ")+" at every boot")
	r.add(plan.Step{
		ID:      "host:modules",
		Phase:   plan.PhaseHost,
		Kind:    plan.KindModules,
		Summary: "load kernel modules " + strings.Join(modules, ", ") + " now",
		Modules: &plan.Modules{Names: modules},
	})

	sysctls := r.sysctls()
	var b strings.Builder
	b.WriteString(header("#") + "\n")
	b.WriteString("# Host values kubelet needs; /proc/sys is read-only inside the machine.\n")
	for _, kv := range sysctls {
		fmt.Fprintf(&b, "%s = %s\n", kv.Key, kv.Value)
	}
	r.file(plan.PhaseHost, sysctlFile, b.String(), "keep the node's sysctls across boots")
	r.add(plan.Step{
		ID:      "host:sysctl",
		Phase:   plan.PhaseHost,
		Kind:    plan.KindSysctl,
		Summary: fmt.Sprintf("set %d sysctls now (after the modules that create net.bridge.*)", len(sysctls)),
		After:   []string{"host:modules"},
		Sysctl:  &plan.Sysctl{Values: sysctls},
	})

	if flush {
		// One unit for every machine on the host: its contents name no
		// machine, and each machine's drop-in requires it and orders
		// itself after it. It runs once a boot, before the first machine.
		r.file(plan.PhaseHost, path.Join(layout.UnitDir, nftFlushUnit), tmpl("nft-flush.service.tmpl", nil),
			"flush the host nftables ruleset once a boot, before the first machine starts")
		r.add(plan.Step{
			ID:      "host:nft-flush",
			Phase:   plan.PhaseHost,
			Kind:    plan.KindNftFlush,
			Summary: "flush the host nftables ruleset now (netlink)",
			After:   []string{"host:packages"},
		})
	}
	if boolOr(h.DisableSwap, true) {
		r.add(plan.Step{
			ID:      "host:swap-off",
			Phase:   plan.PhaseHost,
			Kind:    plan.KindSwapOff,
			Summary: "turn swap off now and comment out swap entries in /etc/fstab",
			Swap:    &plan.Swap{Fstab: "/etc/fstab"},
		})
	}

	r.renderNodeState()
	r.file(plan.PhaseHost, layout.NspawnFile(r.machine), tmpl("machine.nspawn.tmpl", r.nspawnData()),
		"nspawn settings of machine "+r.machine)
	r.file(plan.PhaseHost, path.Join(layout.NspawnDropInDir(r.machine), "override.conf"),
		tmpl("nspawn-override.conf.tmpl", r.overrideData(flush)),
		"service drop-in: cgroup v2, writable /proc/sys/net, bpffs, device access, self-healing")
	r.link(plan.PhaseHost, path.Join(layout.MultiUserWants, layout.MachinesTarget),
		path.Join(layout.SystemUnitDir, layout.MachinesTarget), "start machines.target at boot")

	if h.AptGuard {
		r.file(plan.PhaseHost, needrestartCfg, header("#")+`
# Never let needrestart restart machined or the machine's unit: that stops
# the running Kubernetes node.
$nrconf{override_rc}{qr(^systemd-machined)} = 0;
$nrconf{override_rc}{qr(^`+layout.NspawnUnitPrefix+`)} = 0;
`, "keep needrestart from restarting systemd-machined")
		r.file(plan.PhaseHost, aptGuardCfg, header("//")+`
// Unattended upgrades of systemd-container restart systemd-machined, which
// stops the running machine; upgrade it in a maintenance window instead.
Unattended-Upgrade::Package-Blacklist {
	"systemd-container";
};
`, "keep unattended-upgrades from upgrading systemd-container")
	}
	return nil
}

// sysctls merges the manifest's values over the defaults; the manifest's new
// keys follow the defaults in name order.
func (r *renderer) sysctls() []plan.KeyValue {
	out := append([]plan.KeyValue{}, DefaultSysctls...)
	var extra []string
	for k := range r.m.Host.Sysctls {
		extra = append(extra, k)
	}
	sort.Strings(extra)
	for _, k := range extra {
		v := string(r.m.Host.Sysctls[k])
		found := false
		for i := range out {
			if out[i].Key == k {
				out[i].Value, found = v, true
			}
		}
		if !found {
			out = append(out, plan.KeyValue{Key: k, Value: v})
		}
	}
	return out
}

type nspawnData struct {
	Machine          string
	Hostname         string
	SystemCallFilter []string
	// LimitMemlock lifts the machine's locked-memory limit (RDMA).
	LimitMemlock bool
	Binds        []string
}

func (r *renderer) bpffsDir() string { return layout.BPFFSDir(r.machine) }

func (r *renderer) nspawnData() nspawnData {
	d := nspawnData{
		Machine:          r.machine,
		SystemCallFilter: append([]string{"@keyring", "bpf", "perf_event_open"}, r.m.Machine.SystemCallFilter...),
		LimitMemlock:     r.rdma,
	}
	// The kernel's host name is at most 64 bytes; a longer node name still
	// reaches kubelet through --hostname-override.
	if len(r.nodeName) <= 64 {
		d.Hostname = r.nodeName
	}
	d.Binds = append(d.Binds, r.stateBinds()...)
	if r.bpffs {
		d.Binds = append(d.Binds, "Bind="+r.bpffsDir()+":/sys/fs/bpf")
	}
	if r.kvm {
		d.Binds = append(d.Binds, "Bind=/dev/kvm")
	}
	if r.gpu {
		dev := r.gpuDevices()
		for _, n := range dev.Nodes {
			d.Binds = append(d.Binds, "Bind="+n)
		}
		// Whole directories: members the driver adds later (a MIG
		// instance, an IMEX channel) show up in the machine at once.
		for _, dir := range dev.Dirs {
			if !r.manifestBinds(dir) {
				d.Binds = append(d.Binds, "Bind="+dir)
			}
		}
		for i, dir := range r.f.NVIDIA.LibraryDirs {
			d.Binds = append(d.Binds, fmt.Sprintf("BindReadOnly=%s:%s/%d", dir.Path, hostNvidiaDir, i))
		}
		for _, b := range r.f.NVIDIA.Binaries {
			d.Binds = append(d.Binds, fmt.Sprintf("BindReadOnly=%s:%s/%s", b, hostNvidiaBinDir, path.Base(b)))
		}
	}
	if r.rdma {
		d.Binds = append(d.Binds, "Bind="+rdmaDir)
	}
	for _, b := range r.m.Machine.Binds {
		target := b.Target
		if target == "" {
			target = b.Source
		}
		key := "Bind="
		if b.ReadOnly {
			key = "BindReadOnly="
		}
		d.Binds = append(d.Binds, key+b.Source+":"+target)
	}
	return d
}

// manifestBinds reports whether one of the manifest's binds has target
// in the machine: that bind, with its own options, is the one to keep.
func (r *renderer) manifestBinds(target string) bool {
	for _, b := range r.m.Machine.Binds {
		if b.Target == target || b.Target == "" && b.Source == target {
			return true
		}
	}
	return false
}

type overrideData struct {
	Machine string
	// ActiveFile is layout.ActiveMachineFile; StopTimeout the
	// manifest's upgrade.stopTimeout.
	ActiveFile, StopTimeout string
	NftFlushUnit            string
	BPFFS                   string
	GPU                     bool
	DeviceAllow             []string
	// HostUnits are plan.HostUnits: the machine starts after them.
	HostUnits []string
	// MountRoot is the command that mounts a root made of layers before
	// the machine starts; "" for a flattened root.
	MountRoot string
}

func (r *renderer) overrideData(flush bool) overrideData {
	d := overrideData{Machine: r.machine, GPU: r.gpu, ActiveFile: layout.ActiveMachineFile, StopTimeout: systemdSeconds(manifest.Duration(r.m.Upgrade.StopTimeout)), HostUnits: r.plan.HostUnits}
	if flush {
		d.NftFlushUnit = nftFlushUnit
	}
	if r.layerRoot != nil && r.m.Machine.Rootfs.Debootstrap == nil {
		d.MountRoot = layout.BinaryPath + " mount-root " + r.machine
	}
	if r.bpffs {
		d.BPFFS = r.bpffsDir()
	}
	// Bind= alone is not enough: the unit's device policy must allow each node.
	if r.kvm {
		d.DeviceAllow = append(d.DeviceAllow, "/dev/kvm rwm")
	}
	if r.gpu {
		d.DeviceAllow = append(d.DeviceAllow, r.gpuDevices().Allow...)
	}
	if r.rdma {
		d.DeviceAllow = append(d.DeviceAllow, r.deviceAllow(rdmaDir)...)
		// rdma_cm is a misc device: allowed by itself, not by class.
		for _, n := range r.f.RDMA.DeviceNodes {
			if path.Base(n) == "rdma_cm" {
				d.DeviceAllow = append(d.DeviceAllow, n+" rwm")
			}
		}
	}
	for _, b := range r.m.Machine.Binds {
		d.DeviceAllow = append(d.DeviceAllow, r.deviceAllow(b.Source)...)
	}
	d.DeviceAllow = dedupe(d.DeviceAllow)
	return d
}

// systemdSeconds writes d as whole seconds (rounded up), a time span
// every systemd version reads the same.
func systemdSeconds(d time.Duration) string {
	return fmt.Sprintf("%ds", int64((d+time.Second-1)/time.Second))
}

// dedupe keeps the first of each entry.
func dedupe(list []string) []string {
	seen := map[string]bool{}
	out := list[:0]
	for _, s := range list {
		if !seen[s] {
			seen[s] = true
			out = append(out, s)
		}
	}
	return out
}

// gpuDeviceClasses are the /proc/devices names of the NVIDIA character
// devices every GPU host has: the GPUs, nvidiactl and nvidia-modeset
// (nvidia-frontend), unified memory, MIG capabilities and DRM.
var gpuDeviceClasses = []string{
	"char-nvidia-frontend rwm",
	"char-nvidia-uvm rwm",
	"char-nvidia-caps rwm",
	"char-drm rwm",
}

func contains(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}
