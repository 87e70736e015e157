package render

import (
	"fmt"
	"path"
	"strings"

	"github.com/nodespawn/nodespawn/plan"
)

// hostNvidiaDir is where the host's NVIDIA library directories are bound,
// read-only, one numbered directory each.
const hostNvidiaDir = "/run/host-nvidia"

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
	r.file(ph, r.inRoot("/etc/systemd/system/nodespawn-nvidia.service"), tmpl("nvidia-refresh.service.tmpl", nil),
		"run the NVIDIA refresh at every machine boot, before containerd")
	r.link(ph, r.inRoot(path.Join(wantsDir, "nodespawn-nvidia.service")), "/etc/systemd/system/nodespawn-nvidia.service",
		"enable the NVIDIA refresh inside the machine")
	r.file(ph, r.inRoot("/etc/containerd/conf.d/10-nvidia.toml"), tmpl("containerd-nvidia.toml.tmpl", r.containerdData()),
		"containerd: CDI and the nvidia runtime")
	return nil
}
