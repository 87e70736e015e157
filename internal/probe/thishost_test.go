package probe

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"runtime"
	"slices"
	"strings"
	"testing"

	"github.com/nodespawn/nodespawn/plan"
)

// TestGatherThisHost probes the machine the test runs on, with the build's
// real NVML. Without libnvidia-ml.so.1 (every CI machine) it must not
// crash, must report no GPU and must log that NVML is unavailable. On a GPU
// host NVML's GPUs must be the ones nvidia-smi lists.
func TestGatherThisHost(t *testing.T) {
	var logs bytes.Buffer
	facts, err := Gather(context.Background(), Options{Log: captureLog(&logs, slog.LevelDebug)})
	if err != nil {
		t.Fatalf("Gather(/): %v", err)
	}
	if facts.Arch != runtime.GOARCH {
		t.Errorf("Arch = %q, want %q", facts.Arch, runtime.GOARCH)
	}
	if facts.Hostname == "" {
		t.Error("Hostname is empty on the real root")
	}
	t.Logf("log:\n%s", logs.String())
	checkThisHostNetwork(t, facts)
	checkThisHostDevices(t, facts)

	_, nvmlErr := SystemNVML().Query(context.Background())
	if nvmlErr != nil {
		if !errors.Is(nvmlErr, ErrNVMLUnavailable) {
			t.Fatalf("NVML failed in another way than unavailable: %v", nvmlErr)
		}
		if nvmlInBuild && hostHasNVML(t) {
			t.Fatalf("libnvidia-ml.so.1 is in the linker cache and /dev/nvidiactl exists, yet NVML is unavailable: %v", nvmlErr)
		}
		if facts.NVIDIA != nil && len(facts.NVIDIA.GPUs) > 0 {
			t.Errorf("NVML is unavailable but Gather reported GPUs: %+v", facts.NVIDIA.GPUs)
		}
		if !strings.Contains(logs.String(), "NVML unavailable") {
			t.Errorf("no log line says NVML is unavailable; log:\n%s", logs.String())
		}
		return
	}

	// A GPU host with a working driver.
	if facts.NVIDIA == nil || len(facts.NVIDIA.GPUs) == 0 {
		t.Fatalf("NVML works but Gather reported no GPU: %+v", facts.NVIDIA)
	}
	if facts.NVIDIA.DriverVersion == "" {
		t.Error("NVML works but the driver version is empty")
	}
	if len(facts.NVIDIA.DeviceNodes) == 0 {
		t.Error("GPUs but no device nodes")
	}
	out, err := exec.Command("nvidia-smi", "--query-gpu=index,uuid", "--format=csv,noheader").Output()
	if err != nil {
		t.Fatalf("nvidia-smi (to compare with NVML): %v", err)
	}
	var got []string
	for _, g := range facts.NVIDIA.GPUs {
		got = append(got, fmt.Sprintf("%d, %s", g.Index, g.UUID))
	}
	want := strings.Split(strings.TrimSpace(string(out)), "\n")
	if strings.Join(got, "\n") != strings.Join(want, "\n") {
		t.Errorf("GPUs differ from nvidia-smi:\n probe: %q\n nvidia-smi: %q", got, want)
	}
}

// hostHasNVML reports whether this host's linker cache lists NVML for its
// architecture and the driver's control node exists: then NVML must load.
func hostHasNVML(t *testing.T) bool {
	if _, err := os.Stat("/dev/nvidiactl"); err != nil {
		return false
	}
	data, err := os.ReadFile("/etc/ld.so.cache")
	if err != nil {
		return false
	}
	entries, err := parseLdCache(data)
	if err != nil {
		t.Fatalf("parse /etc/ld.so.cache: %v", err)
	}
	for _, e := range entries {
		if e.Name == "libnvidia-ml.so.1" && e.Arch == runtime.GOARCH {
			return true
		}
	}
	return false
}

// checkThisHostNetwork checks what must hold for any host's resolvers and
// interfaces.
func checkThisHostNetwork(t *testing.T, facts plan.Facts) {
	t.Helper()
	if u := facts.Upstream; u != nil {
		if len(u.Nameservers) == 0 || len(reachable(u.Nameservers)) != len(u.Nameservers) {
			t.Errorf("Upstream from %s lists loopback or no servers: %q", u.Source, u.Nameservers)
		}
	}
	if !slices.IsSortedFunc(facts.Interfaces, func(a, b plan.Interface) int { return strings.Compare(a.Name, b.Name) }) {
		t.Errorf("Interfaces are not sorted by name: %+v", facts.Interfaces)
	}
	for _, ifc := range facts.Interfaces {
		if _, err := net.InterfaceByName(ifc.Name); err != nil {
			t.Errorf("interface %s: %v", ifc.Name, err)
		}
		if len(ifc.Addresses) == 0 {
			t.Errorf("interface %s has no address", ifc.Name)
		}
		for _, a := range ifc.Addresses {
			prefix, err := netip.ParsePrefix(a)
			if err != nil || !prefix.Addr().IsGlobalUnicast() {
				t.Errorf("interface %s: address %q is no global unicast address in CIDR form (%v)", ifc.Name, a, err)
			}
		}
	}
}

// checkThisHostDevices checks the device classes against a node every
// host with the tun driver has: /dev/net/tun, a misc device (major 10).
func checkThisHostDevices(t *testing.T, facts plan.Facts) {
	t.Helper()
	for dir, classes := range facts.DeviceDirs {
		for _, c := range classes {
			if !strings.HasPrefix(c, "char-") && !strings.HasPrefix(c, "block-") {
				t.Errorf("DeviceDirs[%s] has class %q, want char-NAME or block-NAME", dir, c)
			}
		}
	}
	fi, err := os.Lstat("/dev/net/tun")
	if err != nil || fi.Mode()&os.ModeCharDevice == 0 {
		t.Logf("no /dev/net/tun character device here; its class is not checked")
		return
	}
	if !slices.Contains(facts.DeviceDirs["/dev/net"], "char-misc") {
		t.Errorf("DeviceDirs[/dev/net] = %q, want char-misc for /dev/net/tun", facts.DeviceDirs["/dev/net"])
	}
}
