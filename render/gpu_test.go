package render_test

import (
	"errors"
	"slices"
	"strings"
	"testing"

	"github.com/nodespawn/nodespawn/manifest"
	"github.com/nodespawn/nodespawn/plan"
	"github.com/nodespawn/nodespawn/render"
)

// TestFabricManager: on an NVSwitch host, gpu "on" without a running
// Fabric Manager of the driver's version is a host error on machine.gpu
// (apply exits 2; validate leaves it to apply), "auto" a warning; either
// way the plan names the unit the node needs.
func TestFabricManager(t *testing.T) {
	tests := []struct {
		name   string
		gpu    manifest.Switch
		fm     *plan.FabricManager
		err    string // host error's message, "" for none
		warn   string // a warning that must be there, "" for none about Fabric Manager
		noUnit bool
	}{
		{name: "running, same version", gpu: manifest.SwitchOn, fm: &plan.FabricManager{State: "active", Version: "570.124.06"}},
		{name: "running, version unknown (rpm host)", gpu: manifest.SwitchOn, fm: &plan.FabricManager{State: "active"}},
		{name: "not installed", gpu: manifest.SwitchOn, fm: &plan.FabricManager{State: "not-found"},
			err: "nvidia-fabricmanager is not installed: CUDA fails with error 802 (system not yet initialized) until Fabric Manager runs; install nvidia-fabricmanager 570.124.06"},
		{name: "failed", gpu: manifest.SwitchOn, fm: &plan.FabricManager{State: "failed", Version: "570.124.06"},
			err: "nvidia-fabricmanager.service is failed"},
		{name: "another version", gpu: manifest.SwitchOn, fm: &plan.FabricManager{State: "active", Version: "570.86.15"},
			err: "Fabric Manager 570.86.15 runs against driver 570.124.06 (it needs the same version)"},
		{name: "auto, inactive", gpu: manifest.SwitchAuto, fm: &plan.FabricManager{State: "inactive"},
			warn: "nvidia-fabricmanager.service is inactive: CUDA fails with error 802"},
		{name: "not probed", gpu: manifest.SwitchOn, warn: "whether nvidia-fabricmanager.service runs is unknown"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			m := loadManifest(t, "gpu")
			m.Machine.GPU = tt.gpu
			f := loadFacts(t, "nvswitch8")
			f.NVIDIA.FabricManager = tt.fm
			p, err := render.Plan(m, f)
			if tt.err != "" {
				var rerr *render.Error
				if !errors.As(err, &rerr) || !rerr.Host || manifest.FormatPath(rerr.Path) != "$.machine.gpu" || !strings.Contains(rerr.Msg, tt.err) {
					t.Fatalf("render: %v; want a host error at $.machine.gpu containing %q", err, tt.err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			var fmWarnings []string
			for _, w := range p.Warnings {
				if strings.Contains(w, "NVSwitch") {
					fmWarnings = append(fmWarnings, w)
				}
			}
			switch {
			case tt.warn == "" && len(fmWarnings) > 0:
				t.Errorf("warnings %q, want none about Fabric Manager", fmWarnings)
			case tt.warn != "" && (len(fmWarnings) != 1 || !strings.Contains(fmWarnings[0], tt.warn)):
				t.Errorf("warnings %q, want one containing %q", fmWarnings, tt.warn)
			}
			if !slices.Equal(p.HostUnits, []string{plan.FabricManagerUnit}) {
				t.Errorf("HostUnits = %q", p.HostUnits)
			}
			dropIn := fileContents(t, p, "/etc/systemd/system/systemd-nspawn@gpu1.service.d/override.conf")
			if !containsLine(dropIn, "After=nvidia-fabricmanager.service") || !containsLine(dropIn, "Wants=nvidia-fabricmanager.service") {
				t.Errorf("the machine's drop-in does not order it after Fabric Manager:\n%s", dropIn)
			}
		})
	}

	// No NVSwitch (the control and NVLink nodes alone do not count): no
	// Fabric Manager needed.
	f := loadFacts(t, "nvswitch8-nofm")
	f.NVIDIA.NVSwitchNodes = []string{"/dev/nvidia-nvlink", "/dev/nvidia-nvswitchctl"}
	p, err := render.Plan(loadManifest(t, "gpu"), f)
	if err != nil {
		t.Fatal(err)
	}
	if len(p.HostUnits) != 0 {
		t.Errorf("HostUnits = %q without an NVSwitch", p.HostUnits)
	}
}

// TestGPUDefaultRuntime: nvidia is containerd's default runtime in a GPU
// machine unless the manifest keeps runc; a machine without GPUs has no
// nvidia drop-in at all.
func TestGPUDefaultRuntime(t *testing.T) {
	const dropIn = "/var/lib/machines/gpu1/etc/containerd/conf.d/10-nvidia.toml"
	for _, tt := range []struct {
		runtime string
		want    bool
	}{{"", true}, {manifest.RuntimeNvidia, true}, {manifest.RuntimeRunc, false}} {
		m := loadManifest(t, "gpu")
		m.Machine.GPUDefaultRuntime = tt.runtime
		p, err := render.Plan(m, loadFacts(t, "gpu8"))
		if err != nil {
			t.Fatal(err)
		}
		toml := fileContents(t, p, dropIn)
		if got := containsLine(toml, `default_runtime_name = "nvidia"`); got != tt.want {
			t.Errorf("gpuDefaultRuntime %s: default_runtime_name nvidia in the drop-in = %v, want %v:\n%s", tt.runtime, got, tt.want, toml)
		}
		if !strings.Contains(toml, "runtimes.nvidia]") {
			t.Errorf("gpuDefaultRuntime %s: no nvidia runtime:\n%s", tt.runtime, toml)
		}
	}
	m := loadManifest(t, "minimal")
	p, err := render.Plan(m, loadFacts(t, "cpu"))
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range p.Steps {
		if s.File != nil && strings.HasSuffix(s.File.Path, "/10-nvidia.toml") {
			t.Errorf("a machine without GPUs gets %s", s.File.Path)
		}
	}
}

// TestGPULiveDirs: the NVIDIA directories whose members change at run
// time are bound whole and allowed by class, never member by member, so a
// MIG instance or IMEX channel made later is usable without a re-apply.
func TestGPULiveDirs(t *testing.T) {
	p, err := render.Plan(loadManifest(t, "gpu"), loadFacts(t, "gb200-imex"))
	if err != nil {
		t.Fatal(err)
	}
	nspawn := fileContents(t, p, "/etc/systemd/nspawn/gpu1.nspawn")
	dropIn := fileContents(t, p, "/etc/systemd/system/systemd-nspawn@gpu1.service.d/override.conf")
	for _, line := range []string{"Bind=/dev/nvidia-caps", "Bind=/dev/nvidia-caps-imex-channels"} {
		if !containsLine(nspawn, line) {
			t.Errorf("no %s in the .nspawn file:\n%s", line, nspawn)
		}
	}
	for _, line := range []string{"DeviceAllow=char-nvidia-caps rwm", "DeviceAllow=char-nvidia-caps-imex-channels rwm"} {
		if !containsLine(dropIn, line) {
			t.Errorf("no %s in the drop-in:\n%s", line, dropIn)
		}
	}
	// The driver's utilities come along, for the CDI spec to hand to pods.
	if !containsLine(nspawn, "BindReadOnly=/usr/bin/nvidia-smi:/run/host-nvidia/bin/nvidia-smi") {
		t.Errorf("nvidia-smi is not bound into the machine:\n%s", nspawn)
	}
	for _, text := range []string{nspawn, dropIn} {
		if strings.Contains(text, "/dev/nvidia-caps/") || strings.Contains(text, "/dev/nvidia-caps-imex-channels/") {
			t.Errorf("a member of a live directory is bound or allowed by itself:\n%s", text)
		}
	}
}
