package probe

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path"
	"regexp"
	"slices"
	"strconv"
	"strings"

	"github.com/nodespawn/nodespawn/internal/lazyre"
	"github.com/nodespawn/nodespawn/plan"
)

// nvidiaNodeNames matches the NVIDIA device nodes directly under /dev:
// one per GPU (nvidia0, nvidia1, ...), the control node, unified memory and
// modeset.
var nvidiaNodeNames = lazyre.New(`^(nvidia[0-9]+|nvidiactl|nvidia-uvm|nvidia-uvm-tools|nvidia-modeset)$`)

// driNodeNames matches the DRM nodes under /dev/dri. The by-path and
// by-id directories only hold symlinks to these same nodes, so they are
// skipped rather than resolved.
var driNodeNames = lazyre.New(`^(card[0-9]+|renderD[0-9]+)$`)

// nvidia gathers the NVIDIA facts; nil when the host has no NVIDIA device
// node and NVML sees no GPU.
func (p *prober) nvidia(ctx context.Context, nv NVML, ldCache string) (*plan.NVIDIA, error) {
	// NVML first: initialising it creates missing /dev/nvidia* nodes (via
	// nvidia-modprobe), so the glob below sees them.
	info, err := nv.Query(ctx)
	nvmlOK := err == nil
	switch {
	case errors.Is(err, ErrNVMLUnavailable):
		p.log.Debug("NVML unavailable; NVIDIA GPUs come from device nodes only", "reason", err.Error())
	case err != nil:
		p.log.Warn("NVML answered in part", "error", err.Error())
		nvmlOK = true
	}

	nodes, err := p.nodes("/dev", nvidiaNodeNames())
	if err != nil {
		return nil, err
	}
	caps, err := p.nodes("/dev/nvidia-caps", nil)
	if err != nil {
		return nil, err
	}
	nodes = append(nodes, caps...)
	imex, err := p.nodes("/dev/nvidia-caps-imex-channels", nil)
	if err != nil {
		return nil, err
	}
	nodes = append(nodes, imex...)
	if len(nodes) == 0 && len(info.GPUs) == 0 {
		if _, err := os.Stat(p.at(procNVIDIAVersion)); err == nil {
			p.log.Warn("the NVIDIA kernel driver is loaded but there is no /dev/nvidia* node; create them (nvidia-modprobe -c 0 -u) to use the GPUs")
		}
		return nil, nil
	}
	if !nvmlOK {
		p.log.Warn("NVIDIA device nodes found but NVML is unavailable: GPU indexes, UUIDs and MIG mode are unknown", "nodes", len(nodes))
	}
	dri, err := p.nodes("/dev/dri", driNodeNames())
	if err != nil {
		return nil, err
	}
	for _, node := range dri {
		if p.nvidiaDRI(path.Base(node)) {
			nodes = append(nodes, node)
		}
	}
	slices.SortFunc(nodes, naturalCompare)

	n := &plan.NVIDIA{DriverVersion: info.DriverVersion, GPUs: info.GPUs, DeviceNodes: nodes}
	if n.Binaries, err = p.nvidiaBinaries(); err != nil {
		return nil, err
	}
	if n.NVSwitchNodes, err = p.nodes("/dev", nvswitchNodeNames()); err != nil {
		return nil, err
	}
	slices.SortFunc(n.NVSwitchNodes, naturalCompare)
	if n.DriverVersion == "" {
		if n.DriverVersion, err = p.procDriverVersion(); err != nil {
			return nil, err
		}
	}
	if n.LibraryDirs, err = p.libraryDirs(ldCache); err != nil {
		return nil, err
	}
	if len(n.LibraryDirs) == 0 {
		p.log.Warn("NVIDIA device nodes found but no NVIDIA driver library in the linker cache", "cache", ldCache, "arch", p.arch)
	}
	return n, nil
}

// nodes lists the device nodes in host directory dir whose names match re
// (every one when re is nil), as host paths.
func (p *prober) nodes(dir string, re *regexp.Regexp) ([]string, error) {
	entries, err := os.ReadDir(p.at(dir))
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("list device nodes in %s: %w", p.at(dir), err)
	}
	var out []string
	for _, e := range entries {
		if (re == nil || re.MatchString(e.Name())) && p.isDeviceNode(e.Type()) {
			out = append(out, path.Join(dir, e.Name()))
		}
	}
	return out, nil
}

// nvidiaDRI reports whether DRM node name (card1, renderD129) belongs to an
// NVIDIA GPU, going by the driver sysfs names for its device. A host with an
// integrated GPU too has DRM nodes that must not be handed over. When sysfs
// does not say (no link), the node is kept: with NVIDIA nodes present it is
// most likely an NVIDIA one.
func (p *prober) nvidiaDRI(name string) bool {
	link, err := os.Readlink(p.at(path.Join("/sys/class/drm", name, "device/driver")))
	if err != nil {
		return true
	}
	return path.Base(link) == "nvidia"
}

// driverVersionRE finds the version in /proc/driver/nvidia/version, whose
// first line reads like
// "NVRM version: NVIDIA UNIX x86_64 Kernel Module  550.54.14  Thu Feb 22 ...".
var driverVersionRE = lazyre.New(`\s([0-9]+\.[0-9]+(?:\.[0-9]+)?)\s`)

// procDriverVersion reads the kernel module's version; "" when the driver
// is not loaded.
func (p *prober) procDriverVersion() (string, error) {
	b, err := readOptional(p.at(procNVIDIAVersion))
	if err != nil || b == nil {
		return "", err
	}
	for line := range strings.Lines(string(b)) {
		if strings.HasPrefix(line, "NVRM version:") {
			if m := driverVersionRE().FindStringSubmatch(line + " "); m != nil {
				return m[1], nil
			}
		}
	}
	p.log.Warn("no driver version found", "path", p.at(procNVIDIAVersion))
	return "", nil
}

// nvidiaLibPrefixes are the NVIDIA driver's userspace libraries (what the
// driver package installs, not the CUDA toolkit: libcudart and friends
// belong in images).
var nvidiaLibPrefixes = []string{
	"libnvidia-", "libcuda.so", "libcudadebugger.so", "libnvcuvid.so", "libnvoptix.so",
	"libEGL_nvidia.so", "libGLX_nvidia.so", "libGLESv1_CM_nvidia.so", "libGLESv2_nvidia.so",
	"libvdpau_nvidia.so",
}

// isNVIDIALibrary reports whether name is an NVIDIA driver library.
// libnvidia-container belongs to the container toolkit, not the driver; the
// machine's image brings its own.
func isNVIDIALibrary(name string) bool {
	if strings.HasPrefix(name, "libnvidia-container") {
		return false
	}
	for _, prefix := range nvidiaLibPrefixes {
		if strings.HasPrefix(name, prefix) {
			return true
		}
	}
	return false
}

// libraryDirs reads the linker cache and groups the NVIDIA libraries for
// the host architecture by directory. A name listed more than once keeps
// its first entry, the one the dynamic linker would load; an entry whose
// file is gone (a stale cache) is left out. Directories are sorted by path,
// names within one by name.
func (p *prober) libraryDirs(ldCache string) ([]plan.LibraryDir, error) {
	data, err := os.ReadFile(ldCache)
	if errors.Is(err, fs.ErrNotExist) {
		p.log.Warn("no linker cache; NVIDIA libraries cannot be found", "path", ldCache)
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read linker cache %s: %w", ldCache, err)
	}
	entries, err := parseLdCache(data)
	if err != nil {
		return nil, fmt.Errorf("parse linker cache %s: %w; run ldconfig to rebuild it", ldCache, err)
	}
	seen := map[string]bool{}
	byDir := map[string][]string{}
	for _, e := range entries {
		if e.Arch != p.arch || !isNVIDIALibrary(e.Name) || seen[e.Name] {
			continue
		}
		seen[e.Name] = true
		// Lstat: a soname is a symlink whose target may be absolute and so
		// point outside a fake Root; that the link exists is what counts.
		if _, err := os.Lstat(p.at(e.Path)); err != nil {
			p.log.Debug("linker cache entry has no file; skipped", "library", e.Name, "path", e.Path)
			continue
		}
		dir := path.Dir(e.Path)
		byDir[dir] = append(byDir[dir], path.Base(e.Path))
	}
	dirs := make([]plan.LibraryDir, 0, len(byDir))
	for dir, libs := range byDir {
		slices.Sort(libs)
		dirs = append(dirs, plan.LibraryDir{Path: dir, Libraries: slices.Compact(libs)})
	}
	slices.SortFunc(dirs, func(a, b plan.LibraryDir) int { return cmp.Compare(a.Path, b.Path) })
	return dirs, nil
}

// naturalCompare orders strings with embedded numbers by value, so that
// /dev/nvidia2 sorts before /dev/nvidia10.
func naturalCompare(a, b string) int {
	for a != "" && b != "" {
		da, db := digitPrefix(a), digitPrefix(b)
		if da > 0 && db > 0 {
			na, _ := strconv.ParseUint(a[:da], 10, 64)
			nb, _ := strconv.ParseUint(b[:db], 10, 64)
			if c := cmp.Compare(na, nb); c != 0 {
				return c
			}
			if c := cmp.Compare(a[:da], b[:db]); c != 0 { // "01" vs "1"
				return c
			}
			a, b = a[da:], b[db:]
			continue
		}
		if c := cmp.Compare(a[0], b[0]); c != 0 {
			return c
		}
		a, b = a[1:], b[1:]
	}
	return cmp.Compare(len(a), len(b))
}

// digitPrefix returns how many leading bytes of s are ASCII digits.
func digitPrefix(s string) int {
	i := 0
	for i < len(s) && s[i] >= '0' && s[i] <= '9' {
		i++
	}
	return i
}

// nvidiaBinaryNames are the driver's utilities a container may be handed
// (what nvidia-ctk cdi generate looks for), sorted.
var nvidiaBinaryNames = []string{"nvidia-cuda-mps-control", "nvidia-cuda-mps-server", "nvidia-debugdump", "nvidia-smi"}

// nvidiaBinaryDirs are where driver packages and installers put them, in
// the order a name is looked up.
var nvidiaBinaryDirs = []string{"/usr/bin", "/usr/local/nvidia/bin", "/usr/local/bin"}

// nvidiaBinaries returns the host paths of the driver's utilities: for
// each name the first regular file (or link to one) in nvidiaBinaryDirs.
func (p *prober) nvidiaBinaries() ([]string, error) {
	var out []string
	for _, name := range nvidiaBinaryNames {
		for _, dir := range nvidiaBinaryDirs {
			hostPath := path.Join(dir, name)
			fi, err := os.Stat(p.at(hostPath))
			if errors.Is(err, fs.ErrNotExist) {
				continue
			}
			if err != nil {
				return nil, fmt.Errorf("look for %s: %w", name, err)
			}
			if fi.Mode().IsRegular() {
				out = append(out, hostPath)
				break
			}
		}
	}
	return out, nil
}
