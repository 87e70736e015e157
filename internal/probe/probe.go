// Package probe gathers the host Facts that render needs: architecture,
// hostname, resolvers and the upstream servers pods can reach, network
// interfaces with their default routes, KVM, swap, systemd-container,
// NVIDIA GPUs with their device nodes and driver libraries, RDMA devices,
// and the device classes of the directories under /dev, and what decides
// whether machine roots can be composed from the layer store (overlayfs in
// the kernel, the filesystem under the state directory). It reports what
// it saw and decides nothing: render does, from these Facts. It only
// reads; every path it reads lies under Options.Root, so tests describe a
// host with a directory tree, with one exception: what the running
// kernel can mount (Kernel: overlayfs, layers by descriptor) is the
// running kernel's whatever Root is, since it mounts the roots of a tree
// under Root too (Options.Kernel describes another in tests).
//
// Under any Root other than "/" the tree follows these conventions, so
// that fixture trees in testdata need no mknod and no network namespace
// (and can live in git):
//
//   - Device nodes: on the real root only device nodes count (only
//     character devices where the probe looks for GPU or RDMA nodes). Under
//     a fake Root a regular file stands in for a device node as well. Its
//     content may give its type and numbers as ls -l shows them,
//     "c 231:192" (character device, major 231, minor 192) or "b 8:0"
//     (block device); an empty file is a node whose numbers are unknown,
//     which adds no class to Facts.DeviceDirs.
//   - Network interfaces: each directory <Root>/sys/class/net/<name> is an
//     interface; its operstate file ("up" or "unknown" for a running one,
//     as in sysfs) says whether it runs, and its nodespawn-test-addresses
//     file lists its addresses, one in CIDR form ("10.0.0.4/24") a line.
//     A real /sys has no such file: on the real root the addresses come
//     from the kernel (net.Interfaces). Default routes come from
//     <Root>/proc/net/route and <Root>/proc/net/ipv6_route either way.
//   - NVML is not consulted (see Options.NVML).
package probe

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strings"

	"github.com/nodespawn/nodespawn/plan"
)

// Options say where and how to probe. The zero value probes this host.
type Options struct {
	// Root is the host's root directory; "" means "/".
	Root string
	// Arch is the Go architecture name to report and to pick linker-cache
	// entries for; "" means runtime.GOARCH.
	Arch string
	// LdCache is the linker cache to read NVIDIA libraries from: a binary
	// ld.so.cache or the text `ldconfig -p` prints (told apart by content).
	// It is a path as given, not under Root; "" means Root/etc/ld.so.cache.
	LdCache string
	// NVML is consulted for the driver version and GPUs. nil means
	// SystemNVML() when Root is "/", and none otherwise (NVML describes the
	// running kernel, not a tree under Root).
	NVML NVML
	// Units is asked for the state of nvidia-persistenced and, on an
	// NVSwitch host, nvidia-fabricmanager. nil means SystemUnits() when
	// Root is "/", and none otherwise.
	Units Units
	// Log receives warnings (a stub-only resolv.conf, NVIDIA device
	// nodes without NVML, ...) and debug notes; nil means slog.Default().
	Log *slog.Logger
	// Kernel is the kernel to report (Facts.LayerStore's Overlay and
	// LayerFDs); nil means the running kernel's (RunningKernel), whatever
	// Root is: a machine root under Root is mounted by the running
	// kernel, so the files of a tree (its /proc/filesystems, its
	// /lib/modules) are never read for it. Tests that describe another
	// kernel set it (or, through code that calls Gather, SetTestKernel).
	Kernel *Kernel
}

// Host paths the probe reads (under Root).
const (
	etcHostname       = "/etc/hostname"
	devKVM            = "/dev/kvm"
	procSwaps         = "/proc/swaps"
	etcFstab          = "/etc/fstab"
	etcLdCache        = "/etc/ld.so.cache"
	procNVIDIAVersion = "/proc/driver/nvidia/version"
)

// prober carries one Gather's settings.
type prober struct {
	root string
	arch string
	log  *slog.Logger
}

// at returns the path of host path p under Root.
func (p *prober) at(hostPath string) string { return filepath.Join(p.root, hostPath) }

// fakeRoot reports whether Root is a tree standing in for a host.
func (p *prober) fakeRoot() bool { return p.root != "/" }

// Gather probes the host under opts.Root and returns its Facts. Missing
// optional things (no GPU, no swap, no resolv.conf) are facts, not errors;
// Gather fails only when something exists but cannot be read or parsed.
func Gather(ctx context.Context, opts Options) (plan.Facts, error) {
	if err := ctx.Err(); err != nil {
		return plan.Facts{}, err
	}
	p := &prober{root: filepath.Clean(opts.Root), arch: opts.Arch, log: opts.Log}
	if opts.Root == "" {
		p.root = "/"
	}
	if p.arch == "" {
		p.arch = runtime.GOARCH
	}
	if p.log == nil {
		p.log = slog.Default()
	}
	nv := opts.NVML
	if nv == nil {
		nv = SystemNVML()
		if p.fakeRoot() {
			nv = noNVML{}
		}
	}
	units := opts.Units
	if units == nil {
		units = SystemUnits()
		if p.fakeRoot() {
			units = noUnits{}
		}
	}
	ldCache := opts.LdCache
	if ldCache == "" {
		ldCache = p.at(etcLdCache)
	}

	f := plan.Facts{Arch: p.arch}
	var err error
	if f.Hostname, err = p.hostname(); err != nil {
		return plan.Facts{}, err
	}
	if err := p.dns(&f); err != nil {
		return plan.Facts{}, err
	}
	if f.Interfaces, err = p.interfaces(); err != nil {
		return plan.Facts{}, err
	}
	if f.KVM, err = p.deviceNode(devKVM); err != nil {
		return plan.Facts{}, err
	}
	if f.HasSystemdContainer, err = p.systemdContainer(); err != nil {
		return plan.Facts{}, err
	}
	if f.Swap, err = p.swap(); err != nil {
		return plan.Facts{}, err
	}
	if f.NVIDIA, err = p.nvidia(ctx, nv, ldCache); err != nil {
		return plan.Facts{}, err
	}
	if f.NVIDIA != nil {
		if err := p.nvidiaServices(ctx, units, f.NVIDIA); err != nil {
			return plan.Facts{}, err
		}
	}
	if f.RDMA, err = p.rdma(); err != nil {
		return plan.Facts{}, err
	}
	names, err := p.procDeviceNames()
	if err != nil {
		return plan.Facts{}, err
	}
	if f.DeviceDirs, err = p.deviceDirs(names); err != nil {
		return plan.Facts{}, err
	}
	k, err := kernel(opts)
	if err != nil {
		return plan.Facts{}, err
	}
	if f.LayerStore, err = p.layerStore(k); err != nil {
		return plan.Facts{}, err
	}
	return f, nil
}

// readOptional reads a file, returning nil content (no error) when it is
// absent.
func readOptional(path string) ([]byte, error) {
	b, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", path, err)
	}
	return b, nil
}

// hostname is the first name in /etc/hostname; on the real root the
// kernel's hostname when that file is missing or empty.
func (p *prober) hostname() (string, error) {
	b, err := readOptional(p.at(etcHostname))
	if err != nil {
		return "", err
	}
	for line := range strings.Lines(string(b)) {
		line = strings.TrimSpace(line)
		if line != "" && !strings.HasPrefix(line, "#") {
			return line, nil
		}
	}
	if p.fakeRoot() {
		return "", nil
	}
	name, err := os.Hostname()
	if err != nil {
		return "", fmt.Errorf("read the kernel hostname (%s is missing): %w", etcHostname, err)
	}
	return name, nil
}

// isDeviceNode tells whether an entry stands for a device node: a character
// device, or under a fake Root also a regular file (see the package doc).
func (p *prober) isDeviceNode(mode fs.FileMode) bool {
	if mode&fs.ModeCharDevice != 0 {
		return true
	}
	return p.fakeRoot() && mode.IsRegular()
}

// deviceNode reports whether the device node at host path exists.
func (p *prober) deviceNode(hostPath string) (bool, error) {
	fi, err := os.Lstat(p.at(hostPath))
	if errors.Is(err, fs.ErrNotExist) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("stat %s: %w", p.at(hostPath), err)
	}
	return p.isDeviceNode(fi.Mode()), nil
}

// systemdContainer reports whether systemd-nspawn and machinectl (the
// systemd-container package) are installed.
func (p *prober) systemdContainer() (bool, error) {
	for _, prog := range []string{"systemd-nspawn", "machinectl"} {
		found := false
		for _, dir := range []string{"/usr/bin", "/bin"} {
			fi, err := os.Stat(p.at(filepath.Join(dir, prog)))
			if err == nil && fi.Mode().IsRegular() {
				found = true
				break
			}
			if err != nil && !errors.Is(err, fs.ErrNotExist) {
				return false, fmt.Errorf("stat %s: %w", p.at(filepath.Join(dir, prog)), err)
			}
		}
		if !found {
			return false, nil
		}
	}
	return true, nil
}

// swap reports whether swap is active (/proc/swaps lists a device) or
// configured (/etc/fstab has a swap entry).
func (p *prober) swap() (bool, error) {
	swaps, err := readOptional(p.at(procSwaps))
	if err != nil {
		return false, err
	}
	// The first line is the column header.
	lines := bytes.Split(bytes.TrimSpace(swaps), []byte("\n"))
	if len(lines) > 1 {
		return true, nil
	}
	fstab, err := readOptional(p.at(etcFstab))
	if err != nil {
		return false, err
	}
	sc := bufio.NewScanner(bytes.NewReader(fstab))
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) < 3 || strings.HasPrefix(fields[0], "#") || fields[2] != "swap" {
			continue
		}
		// A noauto entry is never enabled at boot, so it is no swap kubelet
		// would meet.
		if len(fields) >= 4 && slices.Contains(strings.Split(fields[3], ","), "noauto") {
			continue
		}
		return true, nil
	}
	return false, sc.Err()
}
