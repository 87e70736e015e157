//go:build cgo && linux

package probe

// nvmlInBuild tells tests that this build loads the real NVML.
const nvmlInBuild = true
