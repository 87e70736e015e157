//go:build !cgo || !linux

package probe

import (
	"context"
	"errors"
	"strings"
	"testing"
)

// nvmlInBuild tells tests that this build has no NVML.
const nvmlInBuild = false

func TestSystemNVMLNotInBuild(t *testing.T) {
	_, err := SystemNVML().Query(context.Background())
	if !errors.Is(err, ErrNVMLUnavailable) || !strings.Contains(err.Error(), "not available in this build") {
		t.Fatalf("Query error = %v, want ErrNVMLUnavailable saying NVML is not in this build", err)
	}
}
