//go:build !cgo || !linux

package probe

import (
	"context"
	"fmt"
)

// SystemNVML returns the host's NVML. This build has none (go-nvml needs
// cgo on Linux), so Query always reports ErrNVMLUnavailable and the probe
// works from device nodes alone.
func SystemNVML() NVML { return systemNVML{} }

type systemNVML struct{}

// Query reports that NVML is not in this build.
func (systemNVML) Query(context.Context) (NVMLInfo, error) {
	return NVMLInfo{}, fmt.Errorf("%w: NVML not available in this build (built without cgo); GPUs come from device nodes only", ErrNVMLUnavailable)
}
