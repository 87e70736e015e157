package render

import (
	"fmt"
	"path"
	"strings"

	"github.com/nodespawn/nodespawn/internal/layout"
	"github.com/nodespawn/nodespawn/manifest"
	"github.com/nodespawn/nodespawn/plan"
)

// hostNvidiaDir is where the host's NVIDIA library directories are bound,
// read-only, one numbered directory each.
const hostNvidiaDir = "/run/host-nvidia"

// hostNvidiaBinDir is where the host driver's utilities (nvidia-smi, ...)
// are bound, read-only, each by its name; the per-boot unit links them
// into /usr/bin, where the CDI spec generator finds them.
const hostNvidiaBinDir = "/run/host-nvidia/bin"

// nvidiaRefreshUnit is the machine's unit that refreshes the NVIDIA
// library links, device nodes and CDI spec at every boot.
const nvidiaRefreshUnit = "nodespawn-nvidia.service"

// nvidiaLibPatterns are the shell patterns of the NVIDIA userspace libraries
// the per-boot unit links into the machine.
var nvidiaLibPatterns = []string{
	"libcuda.so*", "libcudadebugger.so*", "libnvcuvid.so*", "libnvidia-*.so*",
	"libnvoptix.so*", "libEGL_nvidia.so*", "libGLX_nvidia.so*", "libGLESv1_CM_nvidia.so*",
	"libGLESv2_nvidia.so*", "libnvidia-ml.so*",
}

// multiarchLibDir is the Debian/Ubuntu multiarch library directory.
func multiarchLibDir(arch string) string {
	switch arch {
	case "arm64":
		return "/usr/lib/aarch64-linux-gnu"
	case "amd64":
		return "/usr/lib/x86_64-linux-gnu"
	}
	return "/usr/lib/" + arch + "-linux-gnu"
}

// renderGPU links the host's driver libraries into the rootfs, installs the unit
// that refreshes them and the CDI spec at every machine boot, and enables
// CDI and the nvidia runtime in containerd. Binds and device access are in
// the .nspawn file and the service drop-in.
func (r *renderer) renderGPU() error {
	if !r.gpu {
		return nil
	}
	ph := plan.PhaseMachine
	libDir := multiarchLibDir(r.f.Arch)
	if len(r.f.NVIDIA.LibraryDirs) == 0 {
		r.warn("NVIDIA device nodes exist but no NVIDIA driver libraries were found in the linker cache; CUDA will not work inside the machine")
	}
	for i, dir := range r.f.NVIDIA.LibraryDirs {
		for _, lib := range dir.Libraries {
			target := fmt.Sprintf("%s/%d/%s", hostNvidiaDir, i, lib)
			r.link(ph, r.inRoot(path.Join(libDir, lib)), target, "link the host's "+lib)
		}
	}
	script := tmpl("nvidia-refresh.sh.tmpl", struct{ LibDir, Patterns string }{libDir, strings.Join(nvidiaLibPatterns, "|")})
	r.file(ph, r.inRoot("/usr/local/lib/nodespawn/nvidia-refresh"), script,
		"per-boot refresh of NVIDIA library links, device nodes and the CDI spec", mode(0o755))
	unit := path.Join(layout.UnitDir, nvidiaRefreshUnit)
	r.file(ph, r.inRoot(unit), tmpl("nvidia-refresh.service.tmpl", nil),
		"run the NVIDIA refresh at every machine boot, before containerd")
	r.link(ph, r.inRoot(path.Join(layout.MultiUserWants, nvidiaRefreshUnit)), unit,
		"enable the NVIDIA refresh inside the machine")
	r.file(ph, r.inRoot("/etc/containerd/conf.d/10-nvidia.toml"), tmpl("containerd-nvidia.toml.tmpl", r.containerdData()),
		"containerd: CDI and the nvidia runtime")
	return nil
}

// gpuLiveDirs are the NVIDIA device directories whose members the driver
// adds and removes while the machine runs, each with the class
// /proc/devices gives its nodes' major: MIG capabilities appear in
// /dev/nvidia-caps when mig-manager (or nvidia-smi mig) makes GPU or
// compute instances, IMEX channels in /dev/nvidia-caps-imex-channels when
// the IMEX service creates them (GB200 NVL). Each is bound as a directory
// and allowed by class, so a new member is usable in the machine without
// a re-apply.
var gpuLiveDirs = []struct{ dir, class string }{
	{"/dev/nvidia-caps", "char-nvidia-caps"},
	{"/dev/nvidia-caps-imex-channels", "char-nvidia-caps-imex-channels"},
}

// nvswitchClasses are the classes of the NVSwitch (nvidia-nvswitchctl,
// nvidia-nvswitchN) and NVLink (nvidia-nvlink) nodes.
var nvswitchClasses = []string{"char-nvidia-nvswitch", "char-nvidia-nvlink"}

// liveDir returns the live directory node n lies in, or "".
func liveDir(n string) string {
	for _, d := range gpuLiveDirs {
		if path.Dir(n) == d.dir {
			return d.dir
		}
	}
	return ""
}

// gpuDevices are what the machine gets of the host's NVIDIA devices: the
// device nodes bound one by one, the live directories bound whole, and
// the device policy for both.
type gpuDevices struct {
	Nodes, Dirs, Allow []string
}

func (r *renderer) gpuDevices() gpuDevices {
	var d gpuDevices
	nv := r.f.NVIDIA
	dirs := map[string]bool{}
	for _, n := range nv.DeviceNodes {
		if dir := liveDir(n); dir != "" {
			dirs[dir] = true
			continue
		}
		d.Nodes = append(d.Nodes, n)
		d.Allow = append(d.Allow, n+" rwm")
	}
	for _, n := range nv.NVSwitchNodes {
		d.Nodes = append(d.Nodes, n)
		d.Allow = append(d.Allow, n+" rwm")
	}
	// Nodes the driver creates later (nvidia-uvm on first CUDA use,
	// nvidia-modeset, new MIG capabilities) are covered by their majors.
	d.Allow = append(d.Allow, gpuDeviceClasses...)
	for _, ld := range gpuLiveDirs {
		if !dirs[ld.dir] {
			continue
		}
		d.Dirs = append(d.Dirs, ld.dir)
		d.Allow = append(d.Allow, ld.class+" rwm")
		// Whatever else the probe saw there (a driver that names the
		// major otherwise); never the misc class.
		for _, c := range r.f.DeviceDirs[ld.dir] {
			if c != miscClass {
				d.Allow = append(d.Allow, c+" rwm")
			}
		}
	}
	if len(nv.NVSwitchNodes) > 0 {
		for _, c := range nvswitchClasses {
			d.Allow = append(d.Allow, c+" rwm")
		}
	}
	return d
}

// decideGPUHost checks what a GPU machine needs of the host beyond its
// devices. On an NVSwitch host (HGX/DGX A100, H100, H200) CUDA fails with
// error 802 ("system not yet initialized") until nvidia-fabricmanager runs
// on the host with the driver's own version: with gpu "on" that is a host
// error, with "auto" a warning. Either way the machine's service is
// ordered after Fabric Manager and status watches it. GPUs with
// persistence mode off get a warning.
func (r *renderer) decideGPUHost() error {
	if !r.gpu {
		return nil
	}
	nv := r.f.NVIDIA
	var off []string
	for _, g := range nv.GPUs {
		if g.Persistence != nil && !*g.Persistence {
			off = append(off, fmt.Sprint(g.Index))
		}
	}
	if len(off) > 0 {
		r.warn("persistence mode is off on GPU %s (%s is %s): the driver tears a GPU's state down whenever no process holds it open, so pods' first CUDA calls wait for it to initialise again; run systemctl enable --now nvidia-persistenced on the host",
			strings.Join(off, ", "), plan.PersistencedUnit, orUnknown(nv.Persistenced))
	}
	if !nv.HasNVSwitch() {
		return nil
	}
	r.plan.HostUnits = append(r.plan.HostUnits, plan.FabricManagerUnit)
	fm := nv.FabricManager
	if fm == nil {
		r.warn("this host's GPUs are joined by NVSwitches, and whether %s runs is unknown (facts without it): CUDA fails with error 802 until it runs with the driver's version", plan.FabricManagerUnit)
		return nil
	}
	var problem string
	switch {
	case fm.State == "not-found":
		problem = "nvidia-fabricmanager is not installed"
	case !fm.Running():
		problem = plan.FabricManagerUnit + " is " + orUnknown(fm.State)
	case fm.Version != "" && nv.DriverVersion != "" && fm.Version != nv.DriverVersion:
		problem = fmt.Sprintf("Fabric Manager %s runs against driver %s (it needs the same version)", fm.Version, nv.DriverVersion)
	default:
		return nil
	}
	want := "the nvidia-fabricmanager package of the driver's version"
	if nv.DriverVersion != "" {
		want = "nvidia-fabricmanager " + nv.DriverVersion
	}
	msg := fmt.Sprintf("this host's GPUs are joined by NVSwitches and %s: CUDA fails with error 802 (system not yet initialized) until Fabric Manager runs; install %s and run systemctl enable --now nvidia-fabricmanager",
		problem, want)
	if r.m.Machine.GPU == manifest.SwitchOn {
		return hostError(field("machine", "gpu"), "is \"on\" but "+msg)
	}
	r.warn("%s", msg)
	return nil
}

// orUnknown is s, or "unknown" when s is empty.
func orUnknown(s string) string {
	if s == "" {
		return "unknown"
	}
	return s
}
