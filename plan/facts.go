package plan

import "strings"

// Facts is what render needs to know about the host. A probe gathers it
// once (package internal/probe); render never looks at the host itself, so
// tests and --facts FILE can describe any host.
type Facts struct {
	// Arch is the Go architecture name: "amd64", "arm64".
	Arch string `json:"arch"`
	// Hostname is the host's name, the default node name.
	Hostname string `json:"hostname"`
	// ResolvConf is "/etc/resolv.conf" when the host has that file, else
	// "". Nameservers, Search and ResolvOptions are its contents as written
	// (loopback stubs such as 127.0.0.53 included): the machine shares the
	// host's network namespace, so what works on the host works in the
	// machine, but a loopback server is out of reach from a pod's own
	// network namespace; Upstream lists the servers pods can use.
	ResolvConf  string   `json:"resolvConf"`
	Nameservers []string `json:"nameservers,omitempty"`
	// Search is the resolv.conf search list (its last "search" or
	// "domain" line, as the C library reads it).
	Search []string `json:"search,omitempty"`
	// ResolvOptions are the words of the resolv.conf "options" lines, in
	// order: "edns0", "trust-ad", "ndots:2", ...
	ResolvOptions []string `json:"resolvOptions,omitempty"`
	// Upstream are the host's real upstream name servers, the ones a pod
	// (in its own network namespace) can reach; nil when the host has none
	// (only a loopback stub, or no resolv.conf at all).
	Upstream *Resolvers `json:"upstream,omitempty"`
	// Interfaces are the host's network interfaces that can carry the
	// node IP: those that are operationally up and have at least one
	// global unicast address. Sorted by name.
	Interfaces []Interface `json:"interfaces,omitempty"`
	// KVM is true when /dev/kvm exists.
	KVM bool `json:"kvm"`
	// NVIDIA describes NVIDIA GPUs; nil when the host has none.
	NVIDIA *NVIDIA `json:"nvidia,omitempty"`
	// RDMA describes the host's RDMA (InfiniBand, RoCE) devices; nil when
	// /dev/infiniband holds no device node.
	RDMA *RDMA `json:"rdma,omitempty"`
	// DeviceDirs maps each directory under /dev that directly holds
	// device nodes to the device classes of those nodes, for systemd's
	// DeviceAllow= when the whole directory is bound into the machine.
	// Keys are host paths one or two levels below /dev ("/dev/infiniband",
	// "/dev/nvidia-caps", "/dev/snd"); /dev/pts, /dev/shm, /dev/mqueue,
	// /dev/hugepages, /dev/disk, /dev/char, /dev/block and /dev/fd are left
	// out, and so are symlinks. Values are sorted, unique classes as
	// systemd.resource-control(5) spells them, "char-<name>" or
	// "block-<name>" with the driver name /proc/devices gives the node's
	// major: ["char-infiniband_mad", "char-infiniband_verbs", "char-misc"].
	// A class stands for the whole major, every minor: where drivers share
	// a major each of their names is listed (InfiniBand's umad and uverbs
	// nodes both use 231), and "char-misc" (major 10) admits every misc
	// device (fuse, kvm, rdma_cm, ...), so a node in that class is better
	// allowed by its path. A node whose major /proc/devices does not name
	// adds no class; a directory left with none is not listed.
	DeviceDirs map[string][]string `json:"deviceDirs,omitempty"`
	// HasSystemdContainer is true when systemd-nspawn and machinectl exist.
	HasSystemdContainer bool `json:"hasSystemdContainer"`
	// Swap is true when swap is active or configured in fstab.
	Swap bool `json:"swap"`
	// LayerStore is what the probe saw that decides whether machine roots
	// can be overlayfs mounts of the layers in the host's layer store:
	// render decides, and says why not. nil (facts from before it was
	// probed) means unknown, and render flattens.
	LayerStore *LayerStoreFacts `json:"layerStore,omitempty"`
}

// LayerStoreFacts is what the probe saw of the running kernel's overlayfs
// and of the filesystem the layer store and the machines' upper
// directories would be on.
type LayerStoreFacts struct {
	// Overlay is true when the running kernel has the overlay filesystem
	// (/proc/filesystems lists it) or can load it (modules.builtin or
	// modules.dep of its release, under /lib/modules, name overlay.ko).
	// It describes the running kernel also when the probe looks at
	// another tree (--root): that kernel mounts the tree's roots.
	Overlay bool `json:"overlay"`
	// LayerFDs is true when the kernel's overlayfs takes its layers by
	// descriptor (fsconfig FSCONFIG_SET_FD with lowerdir+: Linux 6.13 and
	// later): a root stacks up to 500 layers. Otherwise each mount names
	// its layers in one page of mount(2) options, about 39 of them.
	LayerFDs bool `json:"layerFDs,omitempty"`
	// StateDirFilesystem is the type of the filesystem under the state
	// directory (/var/lib/nodespawn in the probed tree; before it exists,
	// its nearest existing parent), as Linux names it: "ext4" (which
	// ext2 and ext3 share), "xfs", "btrfs", "f2fs", "tmpfs", "overlayfs",
	// "nfs", "fuse", "9p", "squashfs", "cifs", "zfs"; another is "0x"
	// and its statfs magic number in hex.
	StateDirFilesystem string `json:"stateDirFilesystem,omitempty"`
}

// NVIDIA is the host's NVIDIA driver and devices.
type NVIDIA struct {
	// DriverVersion is from NVML or /proc/driver/nvidia/version; may be empty.
	DriverVersion string `json:"driverVersion,omitempty"`
	GPUs          []GPU  `json:"gpus,omitempty"`
	// DeviceNodes are the NVIDIA device nodes present now (/dev/nvidia0,
	// /dev/nvidiactl, /dev/nvidia-uvm, /dev/nvidia-caps/..., /dev/dri/...).
	DeviceNodes []string `json:"deviceNodes"`
	// LibraryDirs are host directories holding the NVIDIA userspace
	// libraries for the host architecture, each with the library file names.
	LibraryDirs []LibraryDir `json:"libraryDirs,omitempty"`
	// Binaries are the host paths of the driver's utilities
	// (nvidia-smi, nvidia-debugdump, the CUDA MPS control and server),
	// the first of each name in /usr/bin, /usr/local/nvidia/bin,
	// /usr/local/bin; sorted by name. The machine gets them, so the CDI
	// spec generated there hands them to pods (nvidia-smi in a pod).
	Binaries []string `json:"binaries,omitempty"`
	// NVSwitchNodes are the NVSwitch and NVLink device nodes directly in
	// /dev (/dev/nvidia-nvswitchctl, /dev/nvidia-nvswitch0, ...,
	// /dev/nvidia-nvlink), in natural order; empty on a host whose GPUs
	// are not joined by NVSwitches (PCIe cards, one-GPU VMs, GB200
	// compute trays, whose switches live in switch trays).
	NVSwitchNodes []string `json:"nvswitchNodes,omitempty"`
	// FabricManager is the host's nvidia-fabricmanager service, which must
	// run (with the driver's version) before CUDA works on an NVSwitch
	// host; nil when it was not looked at (no NVSwitch node, facts from a
	// tree or from before it was probed).
	FabricManager *FabricManager `json:"fabricManager,omitempty"`
	// Persistenced is the ActiveState of the host's nvidia-persistenced
	// service ("active", "inactive", "failed", ...); "" when not looked at.
	Persistenced string `json:"persistenced,omitempty"`
}

// HasNVSwitch reports whether the GPUs are joined by NVSwitches that
// Fabric Manager must set up: NVSwitchNodes holds a switch's own node
// (/dev/nvidia-nvswitchN), not only the control or NVLink node.
func (n *NVIDIA) HasNVSwitch() bool {
	for _, node := range n.NVSwitchNodes {
		rest, ok := strings.CutPrefix(node, "/dev/nvidia-nvswitch")
		if ok && rest != "" && strings.Trim(rest, "0123456789") == "" {
			return true
		}
	}
	return false
}

// FabricManagerUnit is the systemd unit of NVIDIA's Fabric Manager, as its
// packages install it.
const FabricManagerUnit = "nvidia-fabricmanager.service"

// PersistencedUnit is the systemd unit of NVIDIA's persistence daemon.
const PersistencedUnit = "nvidia-persistenced.service"

// FabricManager is what the probe saw of nvidia-fabricmanager.
type FabricManager struct {
	// State is the unit's ActiveState ("active", "inactive", "failed",
	// "activating", ...); "not-found" when systemd has no such unit (the
	// package is not installed).
	State string `json:"state"`
	// Version is the installed Fabric Manager's version ("570.124.06"),
	// from the package database; "" when unknown. Fabric Manager refuses
	// to run against a driver of another version.
	Version string `json:"version,omitempty"`
}

// Running reports whether Fabric Manager runs.
func (fm *FabricManager) Running() bool { return fm != nil && fm.State == "active" }

// GPU is one NVIDIA GPU as NVML reports it.
type GPU struct {
	Index int    `json:"index"`
	UUID  string `json:"uuid"`
	Name  string `json:"name,omitempty"`
	MIG   bool   `json:"mig,omitempty"`
	// Persistence is the GPU's persistence mode as NVML reports it; nil
	// when unknown (no NVML). With it off the driver tears the GPU's state
	// down whenever no process holds it open, and every pod's first CUDA
	// call pays for initialising it again.
	Persistence *bool `json:"persistence,omitempty"`
}

// LibraryDir is one host directory of NVIDIA libraries.
type LibraryDir struct {
	Path      string   `json:"path"`
	Libraries []string `json:"libraries"`
}

// Resolvers is one resolv.conf's list of name servers.
type Resolvers struct {
	// Source is the host path of the file the list comes from:
	// /run/systemd/resolve/resolv.conf (systemd-resolved),
	// /run/NetworkManager/no-stub-resolv.conf or
	// /run/NetworkManager/resolv.conf (NetworkManager),
	// /run/dnsmasq/resolv.conf (Debian's dnsmasq) or /etc/resolv.conf.
	Source string `json:"source"`
	// Nameservers are the file's servers in order, loopback and
	// unspecified (0.0.0.0, ::) addresses left out, so never empty. An IPv6
	// address keeps its zone as written: "fe80::1%eth0".
	Nameservers []string `json:"nameservers"`
	// Search is the file's search list (its last "search" or "domain"
	// line).
	Search []string `json:"search,omitempty"`
	// Options are the words of the file's "options" lines, in order.
	Options []string `json:"options,omitempty"`
}

// Interface is one host network interface that can carry the node IP.
type Interface struct {
	// Name is the kernel's interface name: "eth0", "ib0".
	Name string `json:"name"`
	// Addresses are the interface's global unicast addresses in CIDR form
	// ("10.0.0.4/24", "fd00::5/64") in the order the kernel lists them:
	// never a loopback, link-local, multicast or unspecified address.
	// Private ranges (10/8, fc00::/7, ...) count as global here. Never
	// empty.
	Addresses []string `json:"addresses"`
	// DefaultRoute4 is true when an IPv4 default route (0.0.0.0/0, as
	// /proc/net/route lists the main table) goes out through this
	// interface, DefaultRoute6 the same for IPv6 (::/0, as
	// /proc/net/ipv6_route lists it). Unreachable and prohibit routes do
	// not count.
	DefaultRoute4 bool `json:"defaultRoute4,omitempty"`
	DefaultRoute6 bool `json:"defaultRoute6,omitempty"`
}

// RDMA is the host's RDMA stack: what a machine needs bound and loaded for
// InfiniBand or RoCE verbs (and GPUDirect RDMA) to work inside it.
type RDMA struct {
	// DeviceNodes are the device nodes in /dev/infiniband, as host paths
	// in natural order: /dev/infiniband/issm0, ..., /dev/infiniband/rdma_cm,
	// /dev/infiniband/umad0, ..., /dev/infiniband/uverbs0, ... Never empty.
	DeviceNodes []string `json:"deviceNodes"`
	// Modules are the loaded kernel modules among ib_uverbs, rdma_ucm,
	// ib_umad, mlx5_ib, mlx5_core and nvidia_peermem (from /proc/modules),
	// sorted by name. A module built into the kernel is not listed.
	Modules []string `json:"modules,omitempty"`
}
