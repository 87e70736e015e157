package probe

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
	"github.com/nodespawn/nodespawn/plan"
)

var update = flag.Bool("update", false, "rewrite the golden files under testdata")

// fakeNVML answers Query with fixed data, standing in for the library.
type fakeNVML struct {
	info NVMLInfo
	err  error
}

func (f fakeNVML) Query(context.Context) (NVMLInfo, error) { return f.info, f.err }

var unavailable = fakeNVML{err: errors.Join(ErrNVMLUnavailable, errors.New("nvmlInit: ERROR_LIBRARY_NOT_FOUND"))}

// h100s returns n GPUs as NVML reports them on an HGX H100 board.
func h100s(n int) []plan.GPU {
	gpus := make([]plan.GPU, n)
	for i := range gpus {
		gpus[i] = plan.GPU{Index: i, UUID: "GPU-3b1e0f7a-55c2-4d0e-9a1b-00000000000" + string(rune('0'+i)), Name: "NVIDIA H100 80GB HBM3"}
	}
	return gpus
}

// h200s returns n GPUs as NVML reports them on an HGX H200 board.
func h200s(n int) []plan.GPU {
	gpus := make([]plan.GPU, n)
	for i := range gpus {
		gpus[i] = plan.GPU{Index: i, UUID: "GPU-9c4d2e1b-7a30-4f6e-8b52-1d0e3f4a5b6" + string(rune('0'+i)), Name: "NVIDIA H200"}
	}
	return gpus
}

// gb200s returns n GPUs as NVML reports them on a GB200 NVL compute tray.
func gb200s(n int) []plan.GPU {
	gpus := make([]plan.GPU, n)
	for i := range gpus {
		gpus[i] = plan.GPU{Index: i, UUID: "GPU-5e0b7c2d-91a4-4f3e-a6d8-2c7f1b9e0d4" + string(rune('0'+i)), Name: "NVIDIA GB200", Persistence: ptr(true)}
	}
	return gpus
}

// withPersistence returns gpus with persistence mode set to on.
func withPersistence(gpus []plan.GPU, on bool) []plan.GPU {
	for i := range gpus {
		gpus[i].Persistence = ptr(on)
	}
	return gpus
}

func ptr[T any](v T) *T { return &v }

// fakeUnits answers UnitState from a map, standing in for systemd; a
// unit it does not list is "not-found", as systemd says.
type fakeUnits map[string]string

func (f fakeUnits) UnitState(_ context.Context, unit string) (string, error) {
	if s, ok := f[unit]; ok {
		return s, nil
	}
	return "not-found", nil
}

// captureLog returns a logger that records warnings (debug too when
// debug is set) as text without timestamps.
func captureLog(buf *bytes.Buffer, level slog.Level) *slog.Logger {
	return slog.New(slog.NewTextHandler(buf, &slog.HandlerOptions{
		Level: level,
		ReplaceAttr: func(_ []string, a slog.Attr) slog.Attr {
			if a.Key == slog.TimeKey {
				return slog.Attr{}
			}
			return a
		},
	}))
}

// TestGatherFixtures probes the fake hosts under testdata/hosts and compares
// the Facts (and the warnings logged) with the golden files beside them.
func TestGatherFixtures(t *testing.T) {
	lostGPUs := h100s(8)
	lostGPUs = append(lostGPUs[:3], lostGPUs[4:]...)
	tests := []struct {
		name  string
		root  string // fixture whose root/ and ldconfig-p.txt are probed; default name
		arch  string
		nvml  NVML
		units Units
	}{
		{name: "no-gpu", arch: "amd64", nvml: unavailable},
		{name: "one-gpu", arch: "amd64", nvml: fakeNVML{info: NVMLInfo{
			DriverVersion: "550.54.14",
			GPUs:          []plan.GPU{{Index: 0, UUID: "GPU-6f1c2a9e-0d3b-4c4e-8a77-2b9d3c1e5f00", Name: "NVIDIA RTX A4000"}},
		}}},
		// No NVML seam on a fake root: device nodes and /proc only.
		{name: "one-gpu-no-nvml", root: "one-gpu", arch: "amd64"},
		{name: "eight-gpu", arch: "amd64", nvml: fakeNVML{info: NVMLInfo{DriverVersion: "570.124.06", GPUs: h100s(8)}}},
		// GPU 3 fell off the bus: NVML answers for the other seven.
		{name: "eight-gpu-gpu-lost", root: "eight-gpu", arch: "amd64", nvml: fakeNVML{
			info: NVMLInfo{DriverVersion: "570.124.06", GPUs: lostGPUs},
			err:  errors.New("nvmlDeviceGetHandleByIndex(3): ERROR_GPU_IS_LOST"),
		}},
		{name: "mig", arch: "amd64", nvml: fakeNVML{info: NVMLInfo{
			DriverVersion: "550.90.07",
			GPUs: []plan.GPU{
				{Index: 0, UUID: "GPU-aa0f4c11-7e1e-4a0e-b1c3-5d2f6e7a8b90", Name: "NVIDIA H100 PCIe", MIG: true},
				{Index: 1, UUID: "GPU-bb1f4c11-7e1e-4a0e-b1c3-5d2f6e7a8b91", Name: "NVIDIA H100 PCIe"},
			},
		}}},
		{name: "arm64", arch: "arm64", nvml: unavailable},
		// An HGX H200 with eight ConnectX HCAs: RDMA nodes and modules,
		// device classes from /proc/devices, the resolved stub with its
		// upstream list, Ethernet and IPoIB interfaces.
		{name: "h200-connectx", arch: "amd64", nvml: fakeNVML{info: NVMLInfo{DriverVersion: "570.133.20", GPUs: h200s(8)}}},
		// Only a dnsmasq-style 127.0.0.1 and no upstream list anywhere.
		{name: "stub-only", arch: "amd64", nvml: unavailable},
		// Built by hand (see their READMEs): an HGX H100 whose GPUs are
		// joined by four NVSwitches, with Fabric Manager running ...
		{name: "hgx-h100-nvswitch", arch: "amd64",
			nvml:  fakeNVML{info: NVMLInfo{DriverVersion: "570.124.06", GPUs: withPersistence(h100s(8), true)}},
			units: fakeUnits{"nvidia-fabricmanager.service": "active", "nvidia-persistenced.service": "active"}},
		// ... and the same host with Fabric Manager stopped and
		// persistence mode off.
		{name: "hgx-h100-nvswitch-no-fm", root: "hgx-h100-nvswitch", arch: "amd64",
			nvml:  fakeNVML{info: NVMLInfo{DriverVersion: "570.124.06", GPUs: withPersistence(h100s(8), false)}},
			units: fakeUnits{"nvidia-fabricmanager.service": "inactive", "nvidia-persistenced.service": "inactive"}},
		// A GB200 NVL compute tray: an IMEX channel, no NVSwitch node (the
		// switches are in the rack's switch trays), no Fabric Manager.
		{name: "gb200-imex", arch: "arm64",
			nvml:  fakeNVML{info: NVMLInfo{DriverVersion: "580.95.05", GPUs: gb200s(4)}},
			units: fakeUnits{"nvidia-persistenced.service": "active"}},
		// Recorded on a real GPU VM (see its README).
		{name: "h200-vm", arch: "amd64", nvml: fakeNVML{info: NVMLInfo{
			DriverVersion: "580.159.04",
			GPUs:          []plan.GPU{{Index: 0, UUID: "GPU-327675c9-8428-3a19-6516-e8d18f80ed81", Name: "NVIDIA H200"}},
		}}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			fixture := filepath.Join("testdata", "hosts", tt.name)
			if tt.root != "" {
				fixture = filepath.Join("testdata", "hosts", tt.root)
			}
			// A fixture without ldconfig-p.txt keeps a binary cache at
			// root/etc/ld.so.cache, the default place.
			ldCache := filepath.Join(fixture, "ldconfig-p.txt")
			if _, err := os.Stat(ldCache); err != nil {
				ldCache = ""
			}
			// The fixture's facts do not depend on the kernel the tests
			// run on: its proc/filesystems (and lib/modules/fixture)
			// stand for the kernel it was recorded on, which Gather gets
			// as Options.Kernel (it never reads a tree's for it).
			overlay, err := overlayInKernel(filepath.Join(fixture, "root"), "fixture")
			if err != nil {
				t.Fatal(err)
			}
			var logs bytes.Buffer
			facts, err := Gather(context.Background(), Options{
				Root:    filepath.Join(fixture, "root"),
				Arch:    tt.arch,
				LdCache: ldCache,
				NVML:    tt.nvml,
				Units:   tt.units,
				Log:     captureLog(&logs, slog.LevelWarn),
				Kernel:  &Kernel{Overlay: overlay},
			})
			if err != nil {
				t.Fatalf("Gather: %v", err)
			}
			// The fixture's state directory is on whatever filesystem
			// holds this checkout (TestStateDirFilesystem covers the
			// probe's reading of it); the golden files say ext4.
			if facts.LayerStore == nil || facts.LayerStore.StateDirFilesystem == "" {
				t.Fatalf("no filesystem under the state directory in %+v", facts.LayerStore)
			}
			facts.LayerStore.StateDirFilesystem = "ext4"
			got, err := json.MarshalIndent(facts, "", "  ")
			if err != nil {
				t.Fatal(err)
			}
			golden(t, filepath.Join("testdata", "hosts", tt.name, "facts.json"), append(got, '\n'))
			golden(t, filepath.Join("testdata", "hosts", tt.name, "warnings.txt"), logs.Bytes())
		})
	}
}

// TestRenderFacts keeps render's facts that stand for a probed fixture
// host equal to its golden facts and readable the way apply --facts reads
// them (unknown fields refused).
func TestRenderFacts(t *testing.T) {
	for render, host := range map[string]string{
		"h200-connectx":  "h200-connectx",
		"nvswitch8":      "hgx-h100-nvswitch",
		"nvswitch8-nofm": "hgx-h100-nvswitch-no-fm",
		"gb200-imex":     "gb200-imex",
	} {
		path := filepath.Join("..", "..", "render", "testdata", "facts", render+".json")
		probed := filepath.Join("testdata", "hosts", host, "facts.json")
		got, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		want, err := os.ReadFile(probed)
		if err != nil {
			t.Fatal(err)
		}
		if diff := cmp.Diff(string(want), string(got)); diff != "" {
			t.Errorf("%s differs from %s (-want +got); copy it over:\n%s", path, probed, diff)
		}
		var f plan.Facts
		dec := json.NewDecoder(bytes.NewReader(got))
		dec.DisallowUnknownFields()
		if err := dec.Decode(&f); err != nil {
			t.Errorf("%s: %v", path, err)
		}
	}
}

// golden compares got with the file at path, or rewrites it under -update.
func golden(t *testing.T, path string, got []byte) {
	t.Helper()
	if *update {
		if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(path, got, 0o644); err != nil {
			t.Fatal(err)
		}
		return
	}
	want, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("read golden file (regenerate with go test -update): %v", err)
	}
	if diff := cmp.Diff(string(want), string(got)); diff != "" {
		t.Errorf("%s differs (-want +got); regenerate with go test -update if intended:\n%s", path, diff)
	}
}

// TestGatherErrors covers what must fail loudly rather than silently drop
// the GPU libraries.
func TestGatherErrors(t *testing.T) {
	root := filepath.Join("testdata", "hosts", "one-gpu", "root")
	dir := t.TempDir()
	write := func(name, content string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
		return p
	}
	canceled, cancel := context.WithCancel(context.Background())
	cancel()
	tests := []struct {
		name    string
		ctx     context.Context
		ldCache string
		want    string
	}{
		{"truncated binary cache", context.Background(), write("truncated", newCacheMagic+"\x05\x00\x00\x00"), "header is truncated"},
		{"entry table past the end", context.Background(), write("short", newCacheMagic+"\xff\x00\x00\x00"+strings.Repeat("\x00", 4)+"\x02"+strings.Repeat("\x00", 19)), "runs past the end"},
		{"neither binary nor text", context.Background(), write("garbage", "\x7fELF\x02\x01\x01"), "neither a binary ld.so.cache nor an `ldconfig -p` entry"},
		{"old format only", context.Background(), write("old", oldCacheMagic+"\x00\x00\x00\x00\x00"), "old-format-only cache"},
		{"canceled", canceled, filepath.Join(root, "..", "ldconfig-p.txt"), context.Canceled.Error()},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := Gather(tt.ctx, Options{Root: root, Arch: "amd64", LdCache: tt.ldCache, NVML: unavailable, Log: slog.New(slog.DiscardHandler)})
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("Gather error = %v, want one containing %q", err, tt.want)
			}
			if tt.ctx.Err() == nil && !strings.Contains(err.Error(), "run ldconfig to rebuild it") {
				t.Errorf("error %q does not say how to fix it", err)
			}
		})
	}
}

func TestNaturalCompare(t *testing.T) {
	got := []string{
		"/dev/nvidia10", "/dev/nvidia2", "/dev/nvidiactl", "/dev/nvidia1", "/dev/dri/renderD129",
		"/dev/dri/card10", "/dev/dri/card9", "/dev/nvidia-caps/nvidia-cap102", "/dev/nvidia-caps/nvidia-cap21",
		"/dev/nvidia-caps/nvidia-cap2", "/dev/nvidia-uvm-tools", "/dev/nvidia-uvm", "/dev/nvidia0",
	}
	want := []string{
		"/dev/dri/card9", "/dev/dri/card10", "/dev/dri/renderD129",
		"/dev/nvidia-caps/nvidia-cap2", "/dev/nvidia-caps/nvidia-cap21", "/dev/nvidia-caps/nvidia-cap102",
		"/dev/nvidia-uvm", "/dev/nvidia-uvm-tools",
		"/dev/nvidia0", "/dev/nvidia1", "/dev/nvidia2", "/dev/nvidia10", "/dev/nvidiactl",
	}
	slices.SortFunc(got, naturalCompare)
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("natural order (-want +got):\n%s", diff)
	}
}
