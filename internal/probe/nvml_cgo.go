//go:build cgo && linux

package probe

import (
	"context"
	"errors"
	"fmt"

	"github.com/NVIDIA/go-nvml/pkg/nvml"
	"github.com/nodespawn/nodespawn/plan"
)

// SystemNVML returns the host's NVML, loaded from libnvidia-ml.so.1 at Query
// time; a host without the library gets ErrNVMLUnavailable, not a crash.
func SystemNVML() NVML { return systemNVML{} }

type systemNVML struct{}

// Query initialises NVML, reads the driver version and every GPU, and shuts
// NVML down again.
func (systemNVML) Query(ctx context.Context) (NVMLInfo, error) {
	if err := ctx.Err(); err != nil {
		return NVMLInfo{}, err
	}
	ret := nvml.Init()
	// Shutdown pairs with every Init, failed ones included: go-nvml keeps
	// the library loaded when nvmlInit itself failed, and Shutdown after a
	// failed load returns ERROR_UNINITIALIZED without touching C.
	defer nvml.Shutdown()
	if ret != nvml.SUCCESS {
		// Nothing else may be called now: go-nvml links the C symbols
		// unresolved, and calling one whose library is not loaded kills the
		// process. The message is formatted here, while ret's error text
		// is still valid.
		return NVMLInfo{}, fmt.Errorf("%w: nvmlInit: %s", ErrNVMLUnavailable, ret.Error())
	}

	var info NVMLInfo
	var errs []error
	if v, ret := nvml.SystemGetDriverVersion(); ret == nvml.SUCCESS {
		info.DriverVersion = v
	} else {
		errs = append(errs, fmt.Errorf("nvmlSystemGetDriverVersion: %s", ret.Error()))
	}
	count, ret := nvml.DeviceGetCount()
	if ret != nvml.SUCCESS {
		errs = append(errs, fmt.Errorf("nvmlDeviceGetCount: %s", ret.Error()))
		return info, errors.Join(errs...)
	}
	for i := range count {
		gpu, err := queryGPU(i)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		info.GPUs = append(info.GPUs, gpu)
	}
	return info, errors.Join(errs...)
}

// queryGPU reads one GPU. A GPU without a UUID is an error (nodes and
// device plugins name GPUs by it); name and MIG mode are best effort, and
// a GPU that does not support MIG has it off.
func queryGPU(i int) (plan.GPU, error) {
	dev, ret := nvml.DeviceGetHandleByIndex(i)
	if ret != nvml.SUCCESS {
		return plan.GPU{}, fmt.Errorf("nvmlDeviceGetHandleByIndex(%d): %s", i, ret.Error())
	}
	uuid, ret := dev.GetUUID()
	if ret != nvml.SUCCESS {
		return plan.GPU{}, fmt.Errorf("nvmlDeviceGetUUID(GPU %d): %s", i, ret.Error())
	}
	gpu := plan.GPU{Index: i, UUID: uuid}
	if name, ret := dev.GetName(); ret == nvml.SUCCESS {
		gpu.Name = name
	}
	if current, _, ret := dev.GetMigMode(); ret == nvml.SUCCESS {
		gpu.MIG = current == nvml.DEVICE_MIG_ENABLE
	}
	if mode, ret := dev.GetPersistenceMode(); ret == nvml.SUCCESS {
		on := mode == nvml.FEATURE_ENABLED
		gpu.Persistence = &on
	}
	return gpu, nil
}
