// Package layout is the one place that says where nodespawn's things live
// on a host: the state directory and every file and directory in it, the
// lock file, the binary, the machines' roots, systemd's directories and
// the names of the units and files nodespawn makes there (the same
// directories inside a machine), the node's units, the rule that pairs the
// two machines of a node, and the default timeouts of an upgrade's switch.
//
// Every other package takes these from here and spells none of them
// itself: TestNoLayoutLiterals parses the repository's Go files and fails
// on a string literal that does (it documents the few exceptions). A path
// here is a path in the host's root ("/"); apply and the probe join it to
// their --root.
//
// The package imports nothing of nodespawn, so any package can use it.
package layout

import (
	"strings"
	"time"
)

// The state directory: everything nodespawn keeps on a host.
const (
	// StateDir holds the record, the pair's state, each machine's
	// manifest and plan, the node's state, the layer store and the
	// download cache. Nothing but nodespawn writes under it (manifest
	// refuses extra files there).
	StateDir = "/var/lib/nodespawn"
	// RecordFile is the result record of the last run.
	RecordFile = StateDir + "/result.json"
	// MachinesFile is the state of the machine pair: which machine runs,
	// which is kept for a rollback, how far an upgrade got.
	MachinesFile = StateDir + "/machines.json"
	// ActiveMachineFile names the machine of a pair that may run: apply
	// writes it (atomically) before it starts a machine, and each
	// machine's service starts only when the file is missing or names it,
	// so the two machines of an upgrade never run at once, at boot
	// included.
	ActiveMachineFile = StateDir + "/active-machine"
	// DoneStamp exists once a run succeeded; the first-boot unit does not
	// start again while it is there.
	DoneStamp = StateDir + "/done"
	// LegacyManifestFile and LegacyPlanFile are where a state directory
	// from before the machine pair kept the manifest and plan of its one
	// machine (each machine's are now in MachineStateDir); only read.
	LegacyManifestFile = StateDir + "/manifest"
	LegacyPlanFile     = StateDir + "/plan.json"
	// MachinesStateDir holds one MachineStateDir per machine.
	MachinesStateDir = StateDir + "/machines"
	// DownloadCache holds verified downloads between fetch and install,
	// and the records that make a rerun skip them.
	DownloadCache = StateDir + "/downloads"
	// NodeStateDir is what the node keeps whichever machine of the pair
	// runs it (kubelet's and containerd's state), bound into the machine.
	NodeStateDir = StateDir + "/node"
	// AgentStateFile is what nodespawn agent keeps across its restarts:
	// the last switch it was granted and acted on (never twice), its
	// phase, error and timings.
	AgentStateFile = StateDir + "/agent.json"
	// LayerStoreDir is the layer store: each image layer unpacked once, by
	// DiffID, shared by every machine root composed of it.
	LayerStoreDir = StateDir + "/layers"
)

// MachineStateDir is what nodespawn keeps of machine m: its manifest and
// plan, and an overlayfs root's upper and work directories.
func MachineStateDir(m string) string { return MachinesStateDir + "/" + m }

// OverlayDir is where the overlayfs root of machine m keeps its upper and
// work directories and its record.
func OverlayDir(m string) string { return MachineStateDir(m) + "/overlay" }

// Other host paths of nodespawn's own.
const (
	// LockFile serialises applies (and resets). It lives in /run so it
	// vanishes at reboot and never outlives the state it guards.
	LockFile = "/run/nodespawn.lock"
	// BinaryPath is where nodespawn's own binary is on a node: the
	// first-boot unit runs it, and the machine's service runs
	// `BinaryPath mount-root` to mount a root made of layers at boot.
	BinaryPath = "/usr/local/bin/nodespawn"
	// BPFFSParent holds each machine's own bpf filesystem (BPFFSDir).
	BPFFSParent = "/run/bpffs"
)

// BPFFSDir is where machine m's own bpf filesystem is mounted on the host
// (its service's drop-in mounts it; its .nspawn file binds it to
// /sys/fs/bpf).
func BPFFSDir(m string) string { return BPFFSParent + "/" + m }

// Machines.
const (
	// MachinesDir is where machined keeps machine root directories.
	MachinesDir = "/var/lib/machines"
)

// MachineRoot is the root directory of machine m on the host.
func MachineRoot(m string) string { return MachinesDir + "/" + m }

// systemd's directories, on the host and, for the unit directories, inside
// a machine alike.
const (
	// SystemdConfDir holds the administrator's systemd configuration:
	// every file nodespawn writes for systemd is below it.
	SystemdConfDir = "/etc/systemd"
	// NspawnDir holds machines' .nspawn files (systemd.nspawn(5)).
	NspawnDir = SystemdConfDir + "/nspawn"
	// UnitDir holds the administrator's units, their drop-in directories
	// and the .wants directories of systemctl enable.
	UnitDir = SystemdConfDir + "/system"
	// SystemUnitDir holds the units the distribution's packages install.
	SystemUnitDir = "/usr/lib/systemd/system"
	// MultiUserWants and MachinesWants are the .wants directories that
	// start a unit at boot: with multi-user.target, and with
	// machines.target (what machinectl enable uses for a machine).
	MultiUserWants = UnitDir + "/multi-user.target.wants"
	MachinesWants  = UnitDir + "/machines.target.wants"
	// MachinesTarget is systemd's target that starts the enabled machines.
	MachinesTarget = "machines.target"
)

// Units nodespawn makes or runs.
const (
	// FirstbootUnit applies the manifest from user-data at boot until a
	// run has succeeded once (nodespawn install writes and enables it).
	FirstbootUnit = "nodespawn-firstboot.service"
	// FirstbootUnitPath is where the first-boot unit is installed, and
	// FirstbootWantsLink the link that enables it.
	FirstbootUnitPath  = UnitDir + "/" + FirstbootUnit
	FirstbootWantsLink = MultiUserWants + "/" + FirstbootUnit
	// AgentUnit runs nodespawn agent on the host, outside the machines it
	// switches (nodespawn install --agent writes and enables it).
	AgentUnit      = "nodespawn-agent.service"
	AgentUnitPath  = UnitDir + "/" + AgentUnit
	AgentWantsLink = MultiUserWants + "/" + AgentUnit
	// NspawnUnitPrefix starts the name of every machine's service, an
	// instance of systemd's template NspawnTemplate.
	NspawnUnitPrefix = "systemd-nspawn@"
	// NspawnTemplate is the unit every machine's service is an instance
	// of, and the target of its EnableLink.
	NspawnTemplate = SystemUnitDir + "/" + NspawnUnitPrefix + ".service"
	// ContainerdUnit and KubeletUnit are the node's units inside a
	// machine (NodeUnits).
	ContainerdUnit = "containerd.service"
	KubeletUnit    = "kubelet.service"
)

// NspawnUnit is the systemd service that runs machine m.
func NspawnUnit(m string) string { return NspawnUnitPrefix + m + ".service" }

// NspawnDropInDir is the drop-in directory of machine m's service.
func NspawnDropInDir(m string) string { return UnitDir + "/" + NspawnUnit(m) + ".d" }

// NspawnFile is machine m's .nspawn file.
func NspawnFile(m string) string { return NspawnDir + "/" + m + ".nspawn" }

// EnableLink is the link that makes machines.target start machine m at
// boot (what machinectl enable writes).
func EnableLink(m string) string { return MachinesWants + "/" + NspawnUnit(m) }

// NodeUnits are the units that run the node inside a machine, in the
// order they start: apply waits for them, an upgrade watches them restart,
// status reports them. Each call returns a new slice.
func NodeUnits() []string { return []string{ContainerdUnit, KubeletUnit} }

// Pair is the two machines a node takes turns in: an upgrade prepares the
// one that does not run beside the one that does, and switches.
type Pair [2]string

// PairOf is the pair of a manifest whose machine.name is name: name
// itself, then its alternate. A name ending in "1" pairs with the same
// name ending in "2" and back (kube1 <-> kube2); any other name pairs with
// itself plus "-b" (node <-> node-b). Only machine.name as the manifest
// gives it is ever passed here, so the pair of a manifest never changes
// (node-b's own pair would be node-b and node-b-b).
func PairOf(name string) Pair {
	switch {
	case strings.HasSuffix(name, "1"):
		return Pair{name, name[:len(name)-1] + "2"}
	case strings.HasSuffix(name, "2"):
		return Pair{name, name[:len(name)-1] + "1"}
	}
	return Pair{name, name + "-b"}
}

// Has reports whether m is one of the pair.
func (p Pair) Has(m string) bool { return m != "" && (m == p[0] || m == p[1]) }

// Other is the machine of the pair that is not m; false when m is not one
// of the pair, or the pair has no other (a record from before the pair
// knew its alternate).
func (p Pair) Other(m string) (string, bool) {
	switch {
	case m == "":
		return "", false
	case m == p[0]:
		return p[1], p[1] != ""
	case m == p[1]:
		return p[0], p[0] != ""
	}
	return "", false
}

// Default timeouts of an upgrade's switch. Each has one value, used by
// whatever has no manifest to take it from (apply and reset with no
// stored manifest, the Node check); the manifest's defaults are these.
const (
	// StopMargin is what a machine gets to stop after kubelet's graceful
	// node shutdown has given pods their time: the default stop timeout
	// is kubernetes.shutdownGracePeriod plus StopMargin.
	StopMargin = 30 * time.Second
	// DefaultStopTimeout bounds a machine's stop before it is killed:
	// kubelet's default shutdownGracePeriod (30s) plus StopMargin, the
	// TimeoutStopSec=60s every rendered plan's service drop-in carries.
	// (apply's upgrade default was 90s and reset's 1m; the one the plans
	// and the manifest defaults carry won.)
	DefaultStopTimeout = time.Minute
	// DefaultReadyTimeout bounds the wait for an upgraded (or rolled back)
	// machine's Node to be Ready: the manifest's default
	// upgrade.readyTimeout, apply's and the Node check's.
	DefaultReadyTimeout = 10 * time.Minute
)
