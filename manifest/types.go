// Package manifest defines what a user writes: the nodespawn manifest, its
// decoding from YAML or JSON, validation against the JSON Schema in package
// schema plus semantic checks, defaults, and the sources it is read from.
//
// The JSON Schema is the contract for structure; these types must agree with
// it field for field (a test walks both).
package manifest

import (
	igntypes "github.com/coreos/ignition/v2/config/v3_5/types"
)

// APIVersion is the only manifest format version this build understands.
const APIVersion = "nodespawn.dev/v1alpha1"

// Kind is the manifest's kind.
const Kind = "Node"

// Manifest is the whole document.
type Manifest struct {
	APIVersion string     `json:"apiVersion"`
	Kind       string     `json:"kind"`
	Machine    Machine    `json:"machine,omitempty"`
	Kubernetes Kubernetes `json:"kubernetes"`
	Components Components `json:"components,omitempty"`
	Host       Host       `json:"host,omitempty"`
	FirstBoot  FirstBoot  `json:"firstBoot,omitempty"`
	Report     *Report    `json:"report,omitempty"`
	Upgrade    Upgrade    `json:"upgrade,omitempty"`

	// src is where the manifest was read from, for ErrorAt; nil when the
	// manifest was not made by Load.
	src *document
}

// Switch is a tri-state for auto-detected features: "auto" (use it when the
// host has it), "on" (require it; fail when the host lacks it), "off".
type Switch string

// Switch values.
const (
	SwitchAuto Switch = "auto"
	SwitchOn   Switch = "on"
	SwitchOff  Switch = "off"
)

// GPUDefaultRuntime values.
const (
	RuntimeNvidia = "nvidia"
	RuntimeRunc   = "runc"
)

// Machine describes the nspawn machine.
type Machine struct {
	// Name is the machine name (machinectl), default "kube1".
	Name   string `json:"name,omitempty"`
	Rootfs Rootfs `json:"rootfs,omitempty"`
	// Binds are extra bind mounts into the machine.
	Binds []Bind `json:"binds,omitempty"`
	GPU   Switch `json:"gpu,omitempty"`
	// GPUDefaultRuntime is containerd's default runtime in a machine with
	// GPUs: "nvidia" (the default: every pod, the NVIDIA device plugin's
	// own included, gets NVML and the GPUs its device plugin assigns) or
	// "runc" (pods ask for the nvidia runtime by a RuntimeClass whose
	// handler is nvidia). Defaults leaves "nvidia" as "", so that
	// manifests from before this field keep their digest.
	GPUDefaultRuntime string `json:"gpuDefaultRuntime,omitempty"`
	KVM               Switch `json:"kvm,omitempty"`
	// RDMA passes /dev/infiniband in (auto: when the host has it).
	RDMA Switch `json:"rdma,omitempty"`
	// BPFFS gives the machine a private bpffs at /sys/fs/bpf ("on" or "off"; "auto" means on).
	BPFFS Switch `json:"bpffs,omitempty"`
	// SystemCallFilter lists syscalls or groups allowed on top of the defaults.
	SystemCallFilter []string `json:"systemCallFilter,omitempty"`
	// DNS overrides the resolvers found on the host, for the machine and
	// for pods.
	DNS *DNS `json:"dns,omitempty"`
	// Extra holds files, directories, links and units written into the
	// machine's rootfs, in Ignition v3 form.
	Extra Extra `json:"extra,omitempty"`
}

// DNS is resolver settings, as in resolv.conf(5).
type DNS struct {
	Nameservers []string `json:"nameservers,omitempty"`
	Search      []string `json:"search,omitempty"`
	Options     []string `json:"options,omitempty"`
}

// Rootfs says where the machine's root filesystem comes from. At most one of
// Image (with GPUImage), Layout and Debootstrap is the source; none means the
// pinned default images.
type Rootfs struct {
	// Image is an OCI image reference pinned by tag or digest.
	Image string `json:"image,omitempty"`
	// GPUImage is used instead of Image on hosts with NVIDIA GPUs.
	GPUImage string `json:"gpuImage,omitempty"`
	// Layout is a local OCI image layout (air-gapped hosts).
	Layout *Layout `json:"layout,omitempty"`
	// Debootstrap is the deprecated fallback.
	Debootstrap *Debootstrap `json:"debootstrap,omitempty"`
	// PlainHTTP names registries (host[:port]) reached without TLS.
	PlainHTTP []string `json:"plainHTTP,omitempty"`
	// Store is how the image becomes the machine's root: "layers" (an
	// overlayfs mount of the image's layers from the host's layer store,
	// shared by the machines of an upgrade), "flat" (one unpacked tree per
	// machine) or "auto" (layers where the host can, else flat).
	Store string `json:"store,omitempty"`
	// MaxUnpackedSize bounds what unpacking the image may write, all its
	// layers together (the ones a layer store lacks), as a size ("20Gi");
	// none by default: the free space bounds it.
	MaxUnpackedSize string `json:"maxUnpackedSize,omitempty"`
	// MinFreeSpace is the free space unpacking the image leaves on the
	// filesystem it writes to, measured when apply starts the pull
	// (default DefaultMinFreeSpace; "0": only what is free).
	MinFreeSpace string `json:"minFreeSpace,omitempty"`
}

// Rootfs store values.
const (
	StoreAuto   = "auto"
	StoreLayers = "layers"
	StoreFlat   = "flat"
)

// Layout is an OCI image layout directory on the host.
type Layout struct {
	Path string `json:"path"`
	// Reference is a tag or digest inside the layout; default "latest".
	Reference string `json:"reference,omitempty"`
}

// Debootstrap builds the rootfs with debootstrap (deprecated).
type Debootstrap struct {
	Suite  string `json:"suite,omitempty"`
	Mirror string `json:"mirror,omitempty"`
}

// Bind is an extra bind mount.
type Bind struct {
	Source   string `json:"source"`
	Target   string `json:"target,omitempty"`
	ReadOnly bool   `json:"readOnly,omitempty"`
}

// Kubernetes configures the kubelet and its cluster.
type Kubernetes struct {
	Version       string   `json:"version,omitempty"`
	APIServer     string   `json:"apiServer"`
	CACert        string   `json:"caCert"`
	ClusterDNS    []string `json:"clusterDNS,omitempty"`
	ClusterDomain string   `json:"clusterDomain,omitempty"`
	NodeName      string   `json:"nodeName,omitempty"`
	// NodeIP is "auto", an address, or one or two CIDRs (comma-separated)
	// whose host address kubelet registers.
	NodeIP string            `json:"nodeIP,omitempty"`
	Labels map[string]string `json:"labels,omitempty"`
	Taints []Taint           `json:"taints,omitempty"`
	Auth   Auth              `json:"auth"`
	// KubeletArgs are extra kubelet flags, e.g. "--max-pods=200".
	KubeletArgs []string `json:"kubeletArgs,omitempty"`
	// SandboxImage is the pause image containerd uses.
	SandboxImage string `json:"sandboxImage,omitempty"`
	// ShutdownGracePeriod is kubelet's graceful node shutdown period (a Go
	// duration).
	ShutdownGracePeriod string `json:"shutdownGracePeriod,omitempty"`
}

// Taint is a node taint registered by the kubelet.
type Taint struct {
	Key    string `json:"key"`
	Value  string `json:"value,omitempty"`
	Effect string `json:"effect"`
}

// Auth is how the kubelet authenticates: exactly one of BootstrapToken and Exec.
type Auth struct {
	BootstrapToken string        `json:"bootstrapToken,omitempty"`
	Exec           *ExecProvider `json:"exec,omitempty"`
}

// ExecProvider is a client-go exec credential plugin.
type ExecProvider struct {
	APIVersion string   `json:"apiVersion,omitempty"`
	Command    string   `json:"command"`
	Args       []string `json:"args,omitempty"`
	Env        []EnvVar `json:"env,omitempty"`
}

// EnvVar is one environment variable for an exec plugin.
type EnvVar struct {
	Name  string `json:"name"`
	Value string `json:"value"`
}

// Components pins the binaries downloaded into the rootfs.
type Components struct {
	// Mirror is a base URL that keeps the upstream layouts; it replaces
	// every component's default upstream host unless the component says otherwise.
	Mirror     string    `json:"mirror,omitempty"`
	Containerd Component `json:"containerd,omitempty"`
	Runc       Component `json:"runc,omitempty"`
	CNIPlugins Component `json:"cniPlugins,omitempty"`
	Kubelet    Component `json:"kubelet,omitempty"`
	Kubectl    Component `json:"kubectl,omitempty"`
	KubeProxy  Component `json:"kubeProxy,omitempty"`
	Crictl     Component `json:"crictl,omitempty"`
}

// Component is one downloadable artifact.
type Component struct {
	Version string `json:"version,omitempty"`
	// URL is the exact artifact URL (wins over BaseURL and Mirror).
	URL string `json:"url,omitempty"`
	// BaseURL is a mirror base URL that keeps the upstream layout.
	BaseURL string `json:"baseURL,omitempty"`
	// SHA256 pins the artifact; empty means the published checksum file.
	SHA256 string `json:"sha256,omitempty"`
}

// Host configures the host outside the machine.
type Host struct {
	Sysctls map[string]SysctlValue `json:"sysctls,omitempty"`
	// NftablesFlush flushes the host ruleset before the machine starts (default true).
	NftablesFlush *bool `json:"nftablesFlush,omitempty"`
	// DisableSwap turns swap off and keeps it off (default true).
	DisableSwap *bool `json:"disableSwap,omitempty"`
	// Modules are extra kernel modules loaded at boot.
	Modules []string `json:"modules,omitempty"`
	// InstallPackages allows installing missing host packages (default true).
	InstallPackages *bool `json:"installPackages,omitempty"`
	// AptGuard keeps unattended-upgrades and needrestart from restarting
	// systemd-machined under a running machine (default false).
	AptGuard bool  `json:"aptGuard,omitempty"`
	Extra    Extra `json:"extra,omitempty"`
}

// FirstBoot configures the first-boot run.
type FirstBoot struct {
	// RetryFor bounds how long transient failures are retried (a Go
	// duration).
	RetryFor string `json:"retryFor,omitempty"`
}

// Report is where the outcome of the first-boot run is sent.
type Report struct {
	URL       string `json:"url"`
	TokenFile string `json:"tokenFile,omitempty"`
	CACert    string `json:"caCert,omitempty"`
}

// Upgrade configures the switch to a new node stack.
type Upgrade struct {
	// ReadyTimeout bounds the wait for the new machine's Node to be Ready.
	ReadyTimeout string `json:"readyTimeout,omitempty"`
	// StopTimeout bounds the old machine's stop.
	StopTimeout string `json:"stopTimeout,omitempty"`
}

// Extra holds files, directories, links and units in Ignition v3 form, so
// Butane output can be pasted as is.
type Extra struct {
	Storage Storage          `json:"storage,omitempty"`
	Systemd igntypes.Systemd `json:"systemd,omitempty"`
}

// Storage is the part of Ignition's storage section nodespawn applies.
type Storage struct {
	Directories []igntypes.Directory `json:"directories,omitempty"`
	Files       []igntypes.File      `json:"files,omitempty"`
	Links       []igntypes.Link      `json:"links,omitempty"`
}

// SysctlValue is a sysctl value; the manifest may write it as a string or an
// integer (vm.overcommit_memory: 1).
type SysctlValue string
