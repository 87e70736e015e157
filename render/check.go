package render

import (
	"cmp"
	"errors"
	"slices"

	"github.com/nodespawn/nodespawn/manifest"
	"github.com/nodespawn/nodespawn/plan"
)

// ReferenceHosts are the hosts Check renders a manifest for: a plain amd64
// host, and one with an NVIDIA GPU, RDMA devices and /dev/kvm, whose extra
// steps (the driver library links, the GPU units and configuration, the
// RDMA binds) can clash with a manifest's extras too. Both have a valid
// host name, upstream name servers and overlayfs for the layer store, so
// nothing about them is in doubt.
func ReferenceHosts() []plan.Facts {
	plain := plan.Facts{
		Arch:                "amd64",
		Hostname:            "node-1",
		ResolvConf:          "/run/systemd/resolve/resolv.conf",
		Nameservers:         []string{"10.0.0.2"},
		Upstream:            &plan.Resolvers{Source: "/run/systemd/resolve/resolv.conf", Nameservers: []string{"10.0.0.2"}},
		HasSystemdContainer: true,
		LayerStore:          &plan.LayerStoreFacts{Overlay: true, StateDirFilesystem: "ext4"},
	}
	gpu := plain
	gpu.KVM = true
	gpu.NVIDIA = &plan.NVIDIA{
		DriverVersion: "580.95.05",
		GPUs:          []plan.GPU{{Index: 0, UUID: "GPU-00000000-0000-0000-0000-000000000000", Name: "NVIDIA H200"}},
		DeviceNodes:   []string{"/dev/nvidia0", "/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools"},
		LibraryDirs: []plan.LibraryDir{{
			Path:      "/usr/lib/x86_64-linux-gnu",
			Libraries: []string{"libcuda.so.1", "libnvidia-ml.so.1", "libnvidia-ptxjitcompiler.so.1"},
		}},
	}
	gpu.RDMA = &plan.RDMA{DeviceNodes: []string{"/dev/infiniband/rdma_cm", "/dev/infiniband/uverbs0"}}
	gpu.DeviceDirs = map[string][]string{"/dev/infiniband": {"char-infiniband_verbs", "char-misc"}}
	return []plan.Facts{plain, gpu}
}

// Check reports what Plan refuses in m whatever the host: it renders m
// for each reference host that can satisfy m's switches (gpu, kvm or rdma
// "on" need the device) and returns every problem as manifest.Errors
// placed in m's source, or nil. What only a real host decides (an address
// in kubernetes.nodeIP's CIDR, say: an Error with Host set) is left to
// apply. This is how validate finds an extra file that clashes
// with one nodespawn writes, without probing the host it runs on.
func Check(m *manifest.Manifest) error {
	var errs []error
	seen := map[string]bool{}
	for _, f := range ReferenceHosts() {
		hasGPU := f.NVIDIA != nil && len(f.NVIDIA.DeviceNodes) > 0
		if m.Machine.GPU == manifest.SwitchOn && !hasGPU || m.Machine.KVM == manifest.SwitchOn && !f.KVM || m.Machine.RDMA == manifest.SwitchOn && f.RDMA == nil {
			continue
		}
		_, err := Plan(m, f)
		if err == nil {
			continue
		}
		for _, e := range leaves(err) {
			// One problem per field: the hosts may word one clash two ways.
			if HostOnly(e) {
				continue
			}
			var rerr *Error
			if errors.As(e, &rerr) {
				p := manifest.FormatPath(rerr.Path)
				if seen[p] {
					continue
				}
				seen[p] = true
			}
			errs = append(errs, e)
		}
	}
	return Locate(m, errors.Join(errs...))
}

// HostOnly reports whether every problem in err is the host's (an Error
// with Host set), none the manifest's.
func HostOnly(err error) bool {
	for _, e := range leaves(err) {
		var rerr *Error
		if !errors.As(e, &rerr) || !rerr.Host {
			return false
		}
	}
	return err != nil
}

// Locate returns err with its *Error values, which name manifest fields by
// path, turned into manifest.Errors placed in the source m was loaded from,
// in source order and without repeats; the command line reports those as
// bad input, with line and column, like Load's own errors. An err that
// holds anything else (a problem with the host's facts, whose path has a
// Tag, say) is returned as it is.
func Locate(m *manifest.Manifest, err error) error {
	if err == nil {
		return nil
	}
	var out manifest.Errors
	seen := map[string]bool{}
	for _, e := range leaves(err) {
		var rerr *Error
		if !errors.As(e, &rerr) || rerr.Path.Tag != "" {
			return err
		}
		me := m.ErrorAt(rerr.Path, rerr.Msg)
		if !seen[me.Error()] {
			seen[me.Error()] = true
			out = append(out, me)
		}
	}
	slices.SortStableFunc(out, func(a, b *manifest.Error) int {
		return cmp.Or(cmp.Compare(a.Line, b.Line), cmp.Compare(a.Col, b.Col))
	})
	return out
}

// leaves flattens errors joined with errors.Join.
func leaves(err error) []error {
	j, ok := err.(interface{ Unwrap() []error })
	if !ok {
		return []error{err}
	}
	var out []error
	for _, e := range j.Unwrap() {
		out = append(out, leaves(e)...)
	}
	return out
}
