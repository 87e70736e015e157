package probe

import (
	"bytes"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
	"github.com/nodespawn/nodespawn/plan"
)

func TestParseProcDevices(t *testing.T) {
	const procDevices = "Character devices:\n  1 mem\n  4 /dev/vc/0\n  4 tty\n 10 misc\n195 nvidia-frontend\n203 cpu/cpuid\n" +
		"231 infiniband_mad\n231 infiniband_verbs\n508 nvidia-uvm\n\nBlock devices:\n  8 sd\n 65 sd\n253 device-mapper\n259 blkext\n"
	got, err := parseProcDevices([]byte(procDevices))
	if err != nil {
		t.Fatal(err)
	}
	want := deviceNames{
		{"char", 1}: {"mem"}, {"char", 4}: {"/dev/vc/0", "tty"}, {"char", 10}: {"misc"},
		{"char", 195}: {"nvidia-frontend"}, {"char", 203}: {"cpu/cpuid"},
		{"char", 231}: {"infiniband_mad", "infiniband_verbs"}, {"char", 508}: {"nvidia-uvm"},
		{"block", 8}: {"sd"}, {"block", 65}: {"sd"}, {"block", 253}: {"device-mapper"}, {"block", 259}: {"blkext"},
	}
	if diff := cmp.Diff(want, got, cmp.AllowUnexported(deviceType{})); diff != "" {
		t.Errorf("parseProcDevices (-want +got):\n%s", diff)
	}

	for _, tt := range []struct{ name, in, wantErr string }{
		{"before a heading", "  1 mem\n", `line 1 comes before the "Character devices:" heading`},
		{"no name", "Character devices:\n  1\n", `line 2: want "<major> <name>"`},
		{"major not a number", "Character devices:\nx mem\n", `line 2: want "<major> <name>"`},
	} {
		t.Run(tt.name, func(t *testing.T) {
			_, err := parseProcDevices([]byte(tt.in))
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
				t.Fatalf("error = %v, want one containing %q", err, tt.wantErr)
			}
		})
	}
}

// TestDeviceDirs builds a /dev of fixture files and checks which
// directories get which classes.
func TestDeviceDirs(t *testing.T) {
	root := t.TempDir()
	files := map[string]string{
		"/proc/devices":                "Character devices:\n 10 misc\n116 alsa\n189 usb_device\n231 infiniband_mad\n231 infiniband_verbs\n508 vfio\n\nBlock devices:\n  7 loop\n",
		"/dev/infiniband/uverbs0":      "c 231:192\n",
		"/dev/infiniband/rdma_cm":      "c 10:58",
		"/dev/snd/controlC0":           "c 116:3\n",
		"/dev/snd/pcmC0D0p":            "c 116:16\n",
		"/dev/vfio/vfio":               "c 10:196\n",
		"/dev/vfio/42":                 "c 508:0\n",
		"/dev/loops/loop0":             "b 7:0\n",
		"/dev/bus/usb/001/001":         "c 189:0\n", // three levels down: not listed
		"/dev/pts/0":                   "c 136:0\n", // skipped directory
		"/dev/disk/by-id/nvme-x":       "b 259:0\n",
		"/dev/unknown/thing":           "c 99:0\n", // major /proc/devices does not name
		"/dev/empty/node":              "",         // fixture node without numbers
		"/dev/two/levels":              "c 10:1\n",
		"/dev/two/levels-below/node":   "c 231:0\n",
		"/dev/kvm":                     "c 10:232\n", // directly in /dev: /dev is no key
		"/dev/snd/by-path/placeholder": "",
	}
	for name, content := range files {
		writeFile(t, filepath.Join(root, name), content)
	}
	if err := os.Symlink("snd", filepath.Join(root, "dev", "sound")); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink("../vfio/42", filepath.Join(root, "dev", "two", "link")); err != nil {
		t.Fatal(err)
	}
	var logs bytes.Buffer
	p := &prober{root: root, log: captureLog(&logs, slog.LevelDebug)}
	names, err := p.procDeviceNames()
	if err != nil {
		t.Fatal(err)
	}
	got, err := p.deviceDirs(names)
	if err != nil {
		t.Fatal(err)
	}
	want := map[string][]string{
		"/dev/infiniband":       {"char-infiniband_mad", "char-infiniband_verbs", "char-misc"},
		"/dev/snd":              {"char-alsa"},
		"/dev/vfio":             {"char-misc", "char-vfio"},
		"/dev/loops":            {"block-loop"},
		"/dev/two":              {"char-misc"},
		"/dev/two/levels-below": {"char-infiniband_mad", "char-infiniband_verbs"},
	}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("deviceDirs (-want +got):\n%s", diff)
	}
	if !strings.Contains(logs.String(), "node=/dev/unknown/thing type=char major=99") {
		t.Errorf("no debug line names the node whose major is unknown:\n%s", logs.String())
	}
}

func TestDeviceDirsNone(t *testing.T) {
	p := &prober{root: t.TempDir(), log: slog.New(slog.DiscardHandler)}
	got, err := p.deviceDirs(nil)
	if err != nil || got != nil {
		t.Fatalf("deviceDirs of a root without /dev = %v, %v; want nil, nil", got, err)
	}
}

func TestFixtureDeviceContent(t *testing.T) {
	for _, tt := range []struct {
		content string
		want    deviceType
		ok      bool
		wantErr string
	}{
		{content: "c 231:192\n", want: deviceType{"char", 231}, ok: true},
		{content: "b 8:0", want: deviceType{"block", 8}, ok: true},
		{content: "", ok: false},
		{content: "c 231", wantErr: `want "c MAJOR:MINOR" or "b MAJOR:MINOR"`},
		{content: "crw-rw-rw- 1 root root 231, 192", wantErr: `want "c MAJOR:MINOR"`},
		{content: "c 99999999999:0", wantErr: "major 99999999999"},
	} {
		t.Run(tt.content, func(t *testing.T) {
			root := t.TempDir()
			writeFile(t, filepath.Join(root, "dev", "node"), tt.content)
			p := &prober{root: root, log: slog.New(slog.DiscardHandler)}
			got, ok, err := p.nodeType("/dev/node")
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("error = %v, want one containing %q", err, tt.wantErr)
				}
				return
			}
			if err != nil || ok != tt.ok || got != tt.want {
				t.Errorf("nodeType = %v, %v, %v; want %v, %v, nil", got, ok, err, tt.want, tt.ok)
			}
		})
	}
}

// TestNodeTypeRealDevice reads a real device node's numbers: /dev/null is
// character device 1:3 on every Linux host.
func TestNodeTypeRealDevice(t *testing.T) {
	fi, err := os.Lstat("/dev/null")
	if err != nil || fi.Mode()&os.ModeCharDevice == 0 {
		t.Skipf("/dev/null is no character device here (%v)", err)
	}
	p := &prober{root: "/", log: slog.New(slog.DiscardHandler)}
	got, ok, err := p.nodeType("/dev/null")
	if err != nil || !ok || got != (deviceType{"char", 1}) {
		t.Errorf("nodeType(/dev/null) = %v, %v, %v; want {char 1}, true, nil", got, ok, err)
	}
	// On the real root a regular file is no device node.
	got, ok, err = p.nodeType("/proc/devices")
	if err != nil || ok {
		t.Errorf("nodeType(/proc/devices) = %v, %v, %v; want not a device node", got, ok, err)
	}
}

func TestLoadedModules(t *testing.T) {
	const procModules = "nvidia_peermem 16384 0 - Live 0x0000000000000000 (OE)\n" +
		"ib_uverbs 188416 3 nvidia_peermem,rdma_ucm,mlx5_ib, Live 0x0000000000000000\n" +
		"mlx5_ib 479232 0 - Live 0x0000000000000000\n" +
		"ib_core 495616 8 rdma_ucm,mlx5_ib,ib_uverbs, Live 0x0000000000000000\n" +
		"mlx5_ib_extra 1 0 - Live 0x0000000000000000\n"
	got := loadedModules([]byte(procModules), rdmaModules)
	want := []string{"ib_uverbs", "mlx5_ib", "nvidia_peermem"}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("loadedModules (-want +got):\n%s", diff)
	}
	if got := loadedModules(nil, rdmaModules); got != nil {
		t.Errorf("loadedModules without /proc/modules = %q, want none", got)
	}
}

// TestRDMA checks that RDMA facts need a node in /dev/infiniband, and that
// the modules come along.
func TestRDMA(t *testing.T) {
	root := t.TempDir()
	writeFile(t, filepath.Join(root, "proc", "modules"), "ib_uverbs 188416 0 - Live 0x0000000000000000\n")
	p := &prober{root: root, log: slog.New(slog.DiscardHandler)}
	if got, err := p.rdma(); err != nil || got != nil {
		t.Fatalf("rdma without /dev/infiniband = %+v, %v; want nil, nil", got, err)
	}
	for _, n := range []string{"uverbs10", "uverbs2", "rdma_cm"} {
		writeFile(t, filepath.Join(root, "dev", "infiniband", n), "")
	}
	got, err := p.rdma()
	if err != nil {
		t.Fatal(err)
	}
	want := &plan.RDMA{
		DeviceNodes: []string{"/dev/infiniband/rdma_cm", "/dev/infiniband/uverbs2", "/dev/infiniband/uverbs10"},
		Modules:     []string{"ib_uverbs"},
	}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("rdma (-want +got):\n%s", diff)
	}
}
