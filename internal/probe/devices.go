package probe

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path"
	"slices"
	"strconv"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/nodespawn/nodespawn/internal/lazyre"
	"github.com/nodespawn/nodespawn/plan"
)

// Device paths the probe reads (under Root).
const (
	procDevices   = "/proc/devices"
	procModules   = "/proc/modules"
	devInfiniband = "/dev/infiniband"
	devDir        = "/dev"
)

// skippedDevDirs are the directories directly in /dev that DeviceDirs
// leaves out: file systems of their own (pts, shm, mqueue, hugepages) and
// trees of symlinks to nodes that live elsewhere (disk, char, block, fd).
var skippedDevDirs = []string{"pts", "shm", "mqueue", "hugepages", "disk", "char", "block", "fd"}

// deviceType is a device node's type and major number: what systemd's
// DeviceAllow=char-NAME and block-NAME classes match.
type deviceType struct {
	kind  string // "char" or "block"
	major uint32
}

// deviceNames maps each type and major to the driver names /proc/devices
// gives it, in the order listed; one major may carry several names.
type deviceNames map[deviceType][]string

// parseProcDevices reads /proc/devices: a "Character devices:" and a
// "Block devices:" section of "<major> <name>" lines.
func parseProcDevices(b []byte) (deviceNames, error) {
	names := deviceNames{}
	kind := ""
	n := 0
	for line := range strings.Lines(string(b)) {
		n++
		line = strings.TrimSpace(line)
		switch line {
		case "":
			continue
		case "Character devices:":
			kind = "char"
			continue
		case "Block devices:":
			kind = "block"
			continue
		}
		majorText, name, ok := strings.Cut(line, " ")
		name = strings.TrimSpace(name)
		major, err := strconv.ParseUint(majorText, 10, 32)
		if !ok || name == "" || err != nil {
			return nil, fmt.Errorf("line %d: want %q, got %q", n, "<major> <name>", line)
		}
		if kind == "" {
			return nil, fmt.Errorf("line %d comes before the %q heading: %q", n, "Character devices:", line)
		}
		t := deviceType{kind: kind, major: uint32(major)}
		names[t] = append(names[t], name)
	}
	return names, nil
}

// procDeviceNames reads /proc/devices; none when it is absent (a fixture
// tree without one).
func (p *prober) procDeviceNames() (deviceNames, error) {
	b, err := readOptional(p.at(procDevices))
	if err != nil {
		return nil, err
	}
	names, err := parseProcDevices(b)
	if err != nil {
		return nil, fmt.Errorf("parse %s: %w", p.at(procDevices), err)
	}
	return names, nil
}

// fixtureDevice is the content of a regular file standing in for a device
// node in a fixture tree: its type and numbers, as ls -l shows them.
var fixtureDevice = lazyre.New(`^([cb]) ([0-9]+):([0-9]+)$`)

// nodeType returns the type and major of the device node at host path;
// ok is false when it is no device node, or a fixture file that does not
// give its numbers (an empty one).
func (p *prober) nodeType(hostPath string) (t deviceType, ok bool, err error) {
	fi, err := os.Lstat(p.at(hostPath))
	if err != nil {
		return deviceType{}, false, fmt.Errorf("stat %s: %w", p.at(hostPath), err)
	}
	if fi.Mode()&fs.ModeDevice != 0 {
		st, ok := fi.Sys().(*syscall.Stat_t)
		if !ok {
			return deviceType{}, false, fmt.Errorf("stat %s: no device number", p.at(hostPath))
		}
		t = deviceType{kind: "block", major: unix.Major(uint64(st.Rdev))}
		if fi.Mode()&fs.ModeCharDevice != 0 {
			t.kind = "char"
		}
		return t, true, nil
	}
	if !p.fakeRoot() || !fi.Mode().IsRegular() {
		return deviceType{}, false, nil
	}
	b, err := os.ReadFile(p.at(hostPath))
	if err != nil {
		return deviceType{}, false, fmt.Errorf("read %s: %w", p.at(hostPath), err)
	}
	text := strings.TrimSpace(string(b))
	if text == "" {
		return deviceType{}, false, nil
	}
	m := fixtureDevice().FindStringSubmatch(text)
	if m == nil {
		return deviceType{}, false, fmt.Errorf("%s stands for a device node: want %q or %q (type, major:minor) or nothing, got %q",
			p.at(hostPath), "c MAJOR:MINOR", "b MAJOR:MINOR", text)
	}
	major, err := strconv.ParseUint(m[2], 10, 32)
	if err != nil {
		return deviceType{}, false, fmt.Errorf("%s: major %s: %w", p.at(hostPath), m[2], err)
	}
	t = deviceType{kind: "block", major: uint32(major)}
	if m[1] == "c" {
		t.kind = "char"
	}
	return t, true, nil
}

// deviceDirs maps the directories one and two levels below /dev that hold
// device nodes to those nodes' DeviceAllow= classes (see
// plan.Facts.DeviceDirs); nil when there is none.
func (p *prober) deviceDirs(names deviceNames) (map[string][]string, error) {
	top, err := p.subdirs(devDir)
	if err != nil {
		return nil, err
	}
	out := map[string][]string{}
	for _, dir := range top {
		if slices.Contains(skippedDevDirs, path.Base(dir)) {
			continue
		}
		below, err := p.subdirs(dir)
		if err != nil {
			return nil, err
		}
		for _, d := range append([]string{dir}, below...) {
			classes, err := p.deviceClasses(d, names)
			if err != nil {
				return nil, err
			}
			if len(classes) > 0 {
				out[d] = classes
			}
		}
	}
	if len(out) == 0 {
		return nil, nil
	}
	return out, nil
}

// subdirs lists the directories in host directory dir, as host paths;
// symlinks to directories are not followed.
func (p *prober) subdirs(dir string) ([]string, error) {
	entries, err := os.ReadDir(p.at(dir))
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("list %s: %w", p.at(dir), err)
	}
	var out []string
	for _, e := range entries {
		if e.IsDir() {
			out = append(out, path.Join(dir, e.Name()))
		}
	}
	return out, nil
}

// deviceClasses returns the sorted, unique DeviceAllow= classes
// ("char-NAME", "block-NAME") of the device nodes directly in host
// directory dir.
func (p *prober) deviceClasses(dir string, names deviceNames) ([]string, error) {
	entries, err := os.ReadDir(p.at(dir))
	if err != nil {
		return nil, fmt.Errorf("list %s: %w", p.at(dir), err)
	}
	var classes []string
	for _, e := range entries {
		if e.Type()&fs.ModeDevice == 0 && !(p.fakeRoot() && e.Type().IsRegular()) {
			continue
		}
		node := path.Join(dir, e.Name())
		t, ok, err := p.nodeType(node)
		if err != nil {
			return nil, err
		}
		if !ok {
			continue
		}
		known := names[t]
		if len(known) == 0 {
			p.log.Debug("device node's major has no name in /proc/devices; it adds no DeviceAllow class", "node", node, "type", t.kind, "major", t.major)
			continue
		}
		for _, name := range known {
			classes = append(classes, t.kind+"-"+name)
		}
	}
	slices.Sort(classes)
	return slices.Compact(classes), nil
}

// rdmaModules are the kernel modules RDMA in a machine depends on, sorted:
// the verbs, connection manager and MAD interfaces to user space, the
// Mellanox/NVIDIA ConnectX drivers, and GPUDirect RDMA's peer memory.
var rdmaModules = []string{"ib_umad", "ib_uverbs", "mlx5_core", "mlx5_ib", "nvidia_peermem", "rdma_ucm"}

// rdma gathers the RDMA facts; nil when /dev/infiniband has no device node.
func (p *prober) rdma() (*plan.RDMA, error) {
	nodes, err := p.nodes(devInfiniband, nil)
	if err != nil || len(nodes) == 0 {
		return nil, err
	}
	slices.SortFunc(nodes, naturalCompare)
	b, err := readOptional(p.at(procModules))
	if err != nil {
		return nil, err
	}
	return &plan.RDMA{DeviceNodes: nodes, Modules: loadedModules(b, rdmaModules)}, nil
}

// loadedModules returns the modules among want (sorted) that /proc/modules
// lists, in want's order. Each line of /proc/modules starts with a module
// name: "mlx5_ib 479232 0 - Live 0x0000000000000000".
func loadedModules(procModules []byte, want []string) []string {
	loaded := map[string]bool{}
	for line := range strings.Lines(string(procModules)) {
		if name, _, _ := strings.Cut(strings.TrimSpace(line), " "); name != "" {
			loaded[name] = true
		}
	}
	var out []string
	for _, m := range want {
		if loaded[m] {
			out = append(out, m)
		}
	}
	return out
}
