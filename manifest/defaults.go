package manifest

import (
	"strings"
	"time"

	"github.com/nodespawn/nodespawn/internal/layout"
)

// Defaults applied by Load to what the manifest leaves out. render.Plan and the
// documentation show them; the schema's "default" annotations repeat them
// for editors (a test keeps the two in step).
const (
	DefaultMachineName = "kube1"
	// DefaultImage is the rootfs image when the manifest names no source:
	// the base image this project builds (images/base, make images).
	DefaultImage = "ghcr.io/nodespawn/base:noble"
	// DefaultGPUImage is the rootfs image on GPU hosts when the manifest
	// names no source (or only gpuImage's CPU counterpart is left out): the
	// NVIDIA variant (images/nvidia).
	DefaultGPUImage        = "ghcr.io/nodespawn/nvidia:noble"
	DefaultLayoutReference = "latest"
	// DefaultMinFreeSpace is the free space a rootfs pull leaves on the
	// filesystem it unpacks to: an image that would take more is refused
	// before it fills the host's disk.
	DefaultMinFreeSpace      = "1Gi"
	DefaultKubernetesVersion = "v1.37.2"
	DefaultClusterDNS        = "10.96.0.10"
	DefaultClusterDomain     = "cluster.local"
	DefaultSandboxImage      = "registry.k8s.io/pause:3.10.1"
	DefaultExecAPIVersion    = "client.authentication.k8s.io/v1"
	DefaultNodeIP            = "auto"
	// DefaultShutdownGracePeriod is what kubelet gives pods when the
	// machine stops.
	DefaultShutdownGracePeriod = "30s"
	// DefaultRetryFor bounds the first-boot run's retries.
	DefaultRetryFor = "15m"

	// Component versions, without the leading "v". kubelet, kubectl and
	// kube-proxy follow kubernetes.version.
	DefaultContainerdVersion = "2.4.2"
	DefaultRuncVersion       = "1.5.3"
	DefaultCNIPluginsVersion = "1.10.0"
	DefaultCrictlVersion     = "1.37.0"
)

// DefaultReadyTimeout and DefaultStopTimeout bound an upgrade's switch:
// layout's defaults (the one value each that apply, reset and the Node
// check use too), spelt as the schema's "default" annotations and the
// manifest's digest have them ("10m", "1m0s"). The stop timeout's default
// is DefaultShutdownGracePeriod plus layout.StopMargin, and a manifest
// that sets the grace period gets its own period plus the margin.
var (
	DefaultReadyTimeout = shortDuration(layout.DefaultReadyTimeout)
	DefaultStopTimeout  = layout.DefaultStopTimeout.String()
)

// shortDuration is d as Go spells it without zero tails: 10m, 1h, 1m30s.
func shortDuration(d time.Duration) string {
	s := d.String()
	if strings.HasSuffix(s, "m0s") {
		s = strings.TrimSuffix(s, "0s")
	}
	if strings.HasSuffix(s, "h0m") {
		s = strings.TrimSuffix(s, "0m")
	}
	return s
}

// ApplyDefaults fills in what m leaves out and normalises what has more than
// one spelling: component versions lose a leading "v", kubernetes.version
// gains one, bpffs "auto" becomes "on". It is idempotent. NodeName stays
// empty when unset: render fills it from the host's hostname.
//
// When the manifest names image but not gpuImage, gpuImage stays empty and
// the one image serves every host; when it names only gpuImage, image is the
// default CPU image.
func ApplyDefaults(m *Manifest) {
	mc := &m.Machine
	if mc.Name == "" {
		mc.Name = DefaultMachineName
	}
	rf := &mc.Rootfs
	if rf.Layout == nil && rf.Debootstrap == nil {
		if rf.Image == "" && rf.GPUImage == "" {
			rf.GPUImage = DefaultGPUImage
		}
		if rf.Image == "" {
			rf.Image = DefaultImage
		}
	}
	if rf.Store == "" {
		rf.Store = StoreAuto
	}
	if rf.MinFreeSpace == "" {
		rf.MinFreeSpace = DefaultMinFreeSpace
	}
	if rf.Layout != nil && rf.Layout.Reference == "" {
		rf.Layout.Reference = DefaultLayoutReference
	}
	if mc.GPU == "" {
		mc.GPU = SwitchAuto
	}
	// The default is kept as "" (spelt out or not): a manifest from
	// before the field existed keeps its canonical digest, so a new
	// nodespawn does not take an unchanged manifest for an upgrade.
	if mc.GPUDefaultRuntime == RuntimeNvidia {
		mc.GPUDefaultRuntime = ""
	}
	if mc.KVM == "" {
		mc.KVM = SwitchAuto
	}
	if mc.RDMA == "" {
		mc.RDMA = SwitchAuto
	}
	if mc.BPFFS == "" || mc.BPFFS == SwitchAuto {
		mc.BPFFS = SwitchOn
	}

	k := &m.Kubernetes
	if k.Version == "" {
		k.Version = DefaultKubernetesVersion
	}
	k.Version = "v" + strings.TrimPrefix(k.Version, "v")
	if len(k.ClusterDNS) == 0 {
		k.ClusterDNS = []string{DefaultClusterDNS}
	}
	if k.ClusterDomain == "" {
		k.ClusterDomain = DefaultClusterDomain
	}
	if k.SandboxImage == "" {
		k.SandboxImage = DefaultSandboxImage
	}
	if k.NodeIP == "" {
		k.NodeIP = DefaultNodeIP
	}
	if k.ShutdownGracePeriod == "" {
		k.ShutdownGracePeriod = DefaultShutdownGracePeriod
	}
	if m.FirstBoot.RetryFor == "" {
		m.FirstBoot.RetryFor = DefaultRetryFor
	}
	if m.Upgrade.ReadyTimeout == "" {
		m.Upgrade.ReadyTimeout = DefaultReadyTimeout
	}
	if m.Upgrade.StopTimeout == "" {
		// kubelet's graceful shutdown, and 30s for the machine's own stop.
		m.Upgrade.StopTimeout = (parseDuration(k.ShutdownGracePeriod) + layout.StopMargin).String()
	}
	if k.Auth.Exec != nil && k.Auth.Exec.APIVersion == "" {
		k.Auth.Exec.APIVersion = DefaultExecAPIVersion
	}

	c := &m.Components
	kube := strings.TrimPrefix(k.Version, "v")
	for _, cv := range []struct {
		c   *Component
		def string
	}{
		{&c.Containerd, DefaultContainerdVersion},
		{&c.Runc, DefaultRuncVersion},
		{&c.CNIPlugins, DefaultCNIPluginsVersion},
		{&c.Crictl, DefaultCrictlVersion},
		{&c.Kubelet, kube},
		{&c.Kubectl, kube},
		{&c.KubeProxy, kube},
	} {
		if cv.c.Version == "" {
			cv.c.Version = cv.def
		}
		cv.c.Version = strings.TrimPrefix(cv.c.Version, "v")
	}

	h := &m.Host
	for _, b := range []**bool{&h.NftablesFlush, &h.DisableSwap, &h.InstallPackages} {
		if *b == nil {
			t := true
			*b = &t
		}
	}
}
