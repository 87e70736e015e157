package probe

import (
	"context"
	"errors"

	"github.com/nodespawn/nodespawn/plan"
)

// ErrNVMLUnavailable means the NVIDIA Management Library could not be used:
// not built in (no cgo), libnvidia-ml.so.1 absent (every host without the
// driver), or no kernel driver loaded. The probe then works from device
// nodes alone.
var ErrNVMLUnavailable = errors.New("NVML unavailable")

// NVML is the seam to the NVIDIA Management Library. SystemNVML is the real
// one; tests pass a fake.
type NVML interface {
	// Query reports the driver version and the GPUs. An error wrapping
	// ErrNVMLUnavailable means there is nothing to report. Any other error
	// may come with a partial NVMLInfo (a GPU that failed to answer is left
	// out, the others are kept).
	Query(ctx context.Context) (NVMLInfo, error)
}

// NVMLInfo is what NVML reports about the host.
type NVMLInfo struct {
	DriverVersion string
	GPUs          []plan.GPU
}

// noNVML is used for a fake Root: NVML describes the running kernel's GPUs,
// not the tree under Root.
type noNVML struct{}

func (noNVML) Query(context.Context) (NVMLInfo, error) {
	return NVMLInfo{}, errors.Join(ErrNVMLUnavailable, errors.New("not consulted for a Root other than /"))
}
