package render

import (
	"fmt"
	"path"
	"sort"
	"strings"
)

// Host paths nodespawn writes.
const (
	nspawnDir      = "/etc/systemd/nspawn"
	unitDir        = "/etc/systemd/system"
	sysctlFile     = "/etc/sysctl.d/90-nodespawn.conf"
	modulesFile    = "/etc/modules-load.d/90-nodespawn.conf"
	nftFlushUnit   = "nodespawn-nft-flush.service"
	systemUnitDir  = "/usr/lib/systemd/system"
	needrestartCfg = "/etc/needrestart/conf.d/90-nodespawn.conf"
	aptGuardCfg    = "/etc/apt/apt.conf.d/51nodespawn-unattended-upgrades"
)

// DefaultSysctls are the host values kubelet checks or the node needs, set
// on the host because /proc/sys is read-only inside the machine (but for
// /proc/sys/net).
var DefaultSysctls = []KeyValue{
	{"vm.overcommit_memory", "1"},
	{"vm.panic_on_oom", "0"},
	{"kernel.panic", "10"},
	{"kernel.panic_on_oops", "1"},
	{"kernel.keys.root_maxkeys", "1000000"},
	{"kernel.keys.root_maxbytes", "25000000"},
	{"net.ipv4.ip_forward", "1"},
	{"net.bridge.bridge-nf-call-iptables", "1"},
	{"net.bridge.bridge-nf-call-ip6tables", "1"},
	{"net.ipv4.conf.all.src_valid_mark", "1"},
	{"net.ipv4.conf.default.src_valid_mark", "1"},
	{"net.ipv4.conf.all.rp_filter", "0"},
	{"net.ipv4.conf.default.rp_filter", "0"},
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
	r.add(Step{
		ID:       "host:packages",
		Phase:    PhaseHost,
		Kind:     KindPackages,
		Summary:  "make sure the host has " + strings.Join(pkgs, ", "),
		Packages: &Packages{Names: pkgs, Install: boolOr(h.InstallPackages, true)},
	})

	modules := append([]string{}, requiredModules...)
	for _, mod := range h.Modules {
		if !contains(modules, mod) {
			modules = append(modules, mod)
		}
	}
	r.file(PhaseHost, modulesFile, header("#")+"\n"+strings.Join(modules, "\n")+"\n",
		"load "+strings.Join(modules, ", ")+" at every boot")
	r.add(Step{
		ID:      "host:modules",
		Phase:   PhaseHost,
		Kind:    KindModules,
		Summary: "load kernel modules " + strings.Join(modules, ", ") + " now",
		Modules: &Modules{Names: modules},
	})

	sysctls := r.sysctls()
	var b strings.Builder
	b.WriteString(header("#") + "\n")
	b.WriteString("# Host values kubelet needs; /proc/sys is read-only inside the machine.\n")
	for _, kv := range sysctls {
		fmt.Fprintf(&b, "%s = %s\n", kv.Key, kv.Value)
	}
	r.file(PhaseHost, sysctlFile, b.String(), "keep the node's sysctls across boots")
	r.add(Step{
		ID:      "host:sysctl",
		Phase:   PhaseHost,
		Kind:    KindSysctl,
		Summary: fmt.Sprintf("set %d sysctls now (after the modules that create net.bridge.*)", len(sysctls)),
		After:   []string{"host:modules"},
		Sysctl:  &Sysctl{Values: sysctls},
	})

	if flush {
		r.file(PhaseHost, path.Join(unitDir, nftFlushUnit), tmpl("nft-flush.service.tmpl", struct{ Machine string }{r.machine}),
			"flush the host nftables ruleset before every start of the machine")
		r.link(PhaseHost, path.Join(unitDir, "systemd-nspawn@"+r.machine+".service.requires", nftFlushUnit),
			path.Join(unitDir, nftFlushUnit), "the machine requires the nftables flush")
		r.add(Step{
			ID:      "host:nft-flush",
			Phase:   PhaseHost,
			Kind:    KindNftFlush,
			Summary: "flush the host nftables ruleset now (netlink)",
			After:   []string{"host:packages"},
		})
	}
	if boolOr(h.DisableSwap, true) {
		r.add(Step{
			ID:      "host:swap-off",
			Phase:   PhaseHost,
			Kind:    KindSwapOff,
			Summary: "turn swap off now and comment out swap entries in /etc/fstab",
			Swap:    &Swap{Fstab: "/etc/fstab"},
		})
	}

	r.file(PhaseHost, path.Join(nspawnDir, r.machine+".nspawn"), tmpl("machine.nspawn.tmpl", r.nspawnData()),
		"nspawn settings of machine "+r.machine)
	r.file(PhaseHost, path.Join(unitDir, "systemd-nspawn@"+r.machine+".service.d", "override.conf"),
		tmpl("nspawn-override.conf.tmpl", r.overrideData(flush)),
		"service drop-in: cgroup v2, writable /proc/sys/net, bpffs, device access, self-healing")
	r.link(PhaseHost, path.Join(unitDir, "machines.target.wants", "systemd-nspawn@"+r.machine+".service"),
		path.Join(systemUnitDir, "systemd-nspawn@.service"), "start the machine at every boot")
	r.link(PhaseHost, path.Join(unitDir, "multi-user.target.wants", "machines.target"),
		path.Join(systemUnitDir, "machines.target"), "start machines.target at boot")

	if h.AptGuard {
		r.file(PhaseHost, needrestartCfg, header("#")+`
# Never let needrestart restart machined or the machine's unit: that stops
# the running Kubernetes node.
$nrconf{override_rc}{qr(^systemd-machined)} = 0;
$nrconf{override_rc}{qr(^systemd-nspawn@)} = 0;
`, "keep needrestart from restarting systemd-machined")
		r.file(PhaseHost, aptGuardCfg, header("//")+`
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
func (r *renderer) sysctls() []KeyValue {
	out := append([]KeyValue{}, DefaultSysctls...)
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
			out = append(out, KeyValue{k, v})
		}
	}
	return out
}

type nspawnData struct {
	Machine          string
	Hostname         string
	SystemCallFilter []string
	Binds            []string
}

func (r *renderer) bpffsDir() string { return "/run/bpffs/" + r.machine }

func (r *renderer) nspawnData() nspawnData {
	d := nspawnData{
		Machine:          r.machine,
		SystemCallFilter: append([]string{"@keyring", "bpf", "perf_event_open"}, r.m.Machine.SystemCallFilter...),
	}
	// The kernel's host name is at most 64 bytes; a longer node name still
	// reaches kubelet through --hostname-override.
	if len(r.nodeName) <= 64 {
		d.Hostname = r.nodeName
	}
	if r.bpffs {
		d.Binds = append(d.Binds, "Bind="+r.bpffsDir()+":/sys/fs/bpf")
	}
	if r.kvm {
		d.Binds = append(d.Binds, "Bind=/dev/kvm")
	}
	if r.gpu {
		for _, n := range r.f.NVIDIA.DeviceNodes {
			d.Binds = append(d.Binds, "Bind="+n)
		}
		for i, dir := range r.f.NVIDIA.LibraryDirs {
			d.Binds = append(d.Binds, fmt.Sprintf("BindReadOnly=%s:%s/%d", dir.Path, hostNvidiaDir, i))
		}
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

type overrideData struct {
	Machine      string
	NftFlushUnit string
	BPFFS        string
	GPU          bool
	DeviceAllow  []string
}

func (r *renderer) overrideData(flush bool) overrideData {
	d := overrideData{Machine: r.machine, GPU: r.gpu}
	if flush {
		d.NftFlushUnit = nftFlushUnit
	}
	if r.bpffs {
		d.BPFFS = r.bpffsDir()
	}
	// Bind= alone is not enough: the unit's device policy must allow each node.
	if r.kvm {
		d.DeviceAllow = append(d.DeviceAllow, "/dev/kvm rwm")
	}
	if r.gpu {
		for _, n := range r.f.NVIDIA.DeviceNodes {
			d.DeviceAllow = append(d.DeviceAllow, n+" rwm")
		}
		// Nodes the driver creates later (nvidia-uvm on first CUDA use, new
		// MIG capabilities) are covered by their major numbers.
		d.DeviceAllow = append(d.DeviceAllow, gpuDeviceClasses...)
	}
	return d
}

// gpuDeviceClasses are the /proc/devices names of NVIDIA's character devices.
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
