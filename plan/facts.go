package plan

// Facts is what render needs to know about the host. A probe gathers it
// once (package internal/probe); render never looks at the host itself, so
// tests and --facts FILE can describe any host.
type Facts struct {
	// Arch is the Go architecture name: "amd64", "arm64".
	Arch string `json:"arch"`
	// Hostname is the host's name, the default node name.
	Hostname string `json:"hostname"`
	// ResolvConf is the host path of the real upstream resolv.conf
	// (/run/systemd/resolve/resolv.conf where systemd-resolved runs, else
	// /etc/resolv.conf), and Nameservers the servers it lists.
	ResolvConf  string   `json:"resolvConf"`
	Nameservers []string `json:"nameservers,omitempty"`
	// Search is the resolv.conf search list, copied into the machine.
	Search []string `json:"search,omitempty"`
	// KVM is true when /dev/kvm exists.
	KVM bool `json:"kvm"`
	// NVIDIA describes NVIDIA GPUs; nil when the host has none.
	NVIDIA *NVIDIA `json:"nvidia,omitempty"`
	// HasSystemdContainer is true when systemd-nspawn and machinectl exist.
	HasSystemdContainer bool `json:"hasSystemdContainer"`
	// Swap is true when swap is active or configured in fstab.
	Swap bool `json:"swap"`
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
}

// GPU is one NVIDIA GPU as NVML reports it.
type GPU struct {
	Index int    `json:"index"`
	UUID  string `json:"uuid"`
	Name  string `json:"name,omitempty"`
	MIG   bool   `json:"mig,omitempty"`
}

// LibraryDir is one host directory of NVIDIA libraries.
type LibraryDir struct {
	Path      string   `json:"path"`
	Libraries []string `json:"libraries"`
}
