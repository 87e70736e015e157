package render_test

import (
	"bytes"
	"encoding/json"
	"errors"
	"flag"
	"os"
	"path/filepath"
	"reflect"
	"strconv"
	"strings"
	"testing"

	igntypes "github.com/coreos/ignition/v2/config/v3_5/types"
	jsonpath "github.com/coreos/vcontext/path"

	"github.com/nodespawn/nodespawn/manifest"
	"github.com/nodespawn/nodespawn/plan"
	"github.com/nodespawn/nodespawn/render"
)

var update = flag.Bool("update", false, "rewrite the golden files under testdata/golden")

func loadManifest(t *testing.T, name string) *manifest.Manifest {
	t.Helper()
	p := filepath.Join("testdata", "manifests", name+".yaml")
	data, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	m, err := manifest.Load(p, data)
	if err != nil {
		t.Fatalf("load %s: %v", p, err)
	}
	return m
}

func loadFacts(t *testing.T, name string) plan.Facts {
	t.Helper()
	data, err := os.ReadFile(filepath.Join("testdata", "facts", name+".json"))
	if err != nil {
		t.Fatal(err)
	}
	var f plan.Facts
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&f); err != nil {
		t.Fatalf("facts %s: %v", name, err)
	}
	return f
}

// goldenCases pin what each manifest renders to on each kind of host.
var goldenCases = []struct{ name, manifest, facts string }{
	{"minimal-cpu", "minimal", "cpu"},
	{"gpu-8", "gpu", "gpu8"},
	{"gpu-1", "gpu", "gpu1"},
	{"gpu-mig", "gpu", "mig"},
	{"gpu-arm64", "gpu", "gpu-arm64"},
	// Probed on a real H200 VM (nodespawn facts): libraries outside the
	// multiarch directory, nvidia-caps, no dri nodes, and only a local
	// stub resolver (127.0.0.1): the manifest names the name servers.
	{"gpu-h200", "gpu-dns", "h200"},
	// An H200 + ConnectX host: RDMA devices, nvidia-peermem, node IPs
	// picked by CIDR (dual stack), a device bind, containerd 2.3.
	{"rdma", "rdma", "h200-connectx"},
	{"minimal-gpu-auto", "minimal", "gpu8"},
	// Hand-built from the driver's device layout (see the probe fixtures'
	// READMEs): an HGX H100 with NVSwitches and Fabric Manager running
	// (switch nodes bound, the machine ordered after Fabric Manager) ...
	{"gpu-nvswitch", "gpu", "nvswitch8"},
	// ... the same host without it, gpu auto: a warning, and persistence
	// mode off: another ...
	{"gpu-nvswitch-no-fm", "minimal", "nvswitch8-nofm"},
	// ... and a GB200 compute tray: the IMEX channel directory bound whole.
	{"gpu-gb200-imex", "gpu", "gb200-imex"},
	{"kvm", "kvm", "kvm"},
	{"minimal-kvm-auto", "minimal", "kvm"},
	{"arm64", "minimal", "arm64"},
	{"lean", "lean", "kvm"},
	{"exec", "exec", "cpu"},
	{"airgapped", "airgapped", "cpu"},
	{"registry", "registry", "cpu"},
	// A systemd-resolved host: the machine uses the 127.0.0.53 stub, pods
	// get resolved's upstream servers.
	{"stub-resolver", "minimal", "resolved"},
}

func TestGolden(t *testing.T) {
	for _, tc := range goldenCases {
		t.Run(tc.name, func(t *testing.T) {
			p, err := render.Plan(loadManifest(t, tc.manifest), loadFacts(t, tc.facts))
			if err != nil {
				t.Fatal(err)
			}
			var text, js bytes.Buffer
			if err := plan.WriteText(&text, p); err != nil {
				t.Fatal(err)
			}
			if err := plan.WriteJSON(&js, p); err != nil {
				t.Fatal(err)
			}
			golden(t, tc.name+".txt", text.Bytes())
			golden(t, tc.name+".json", js.Bytes())
		})
	}
}

func golden(t *testing.T, name string, got []byte) {
	t.Helper()
	p := filepath.Join("testdata", "golden", name)
	if *update {
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, got, 0o644); err != nil {
			t.Fatal(err)
		}
		return
	}
	want, err := os.ReadFile(p)
	if err != nil {
		t.Fatalf("%v (run go test ./render -update to create it)", err)
	}
	if !bytes.Equal(got, want) {
		t.Errorf("%s differs from the golden file; diff it with go test ./render -update && git diff\n%s", name, firstDiff(string(want), string(got)))
	}
}

func firstDiff(want, got string) string {
	wl, gl := strings.Split(want, "\n"), strings.Split(got, "\n")
	for i := 0; i < len(wl) || i < len(gl); i++ {
		var w, g string
		if i < len(wl) {
			w = wl[i]
		}
		if i < len(gl) {
			g = gl[i]
		}
		if w != g {
			return "line " + strconv.Itoa(i+1) + ":\n  want: " + w + "\n  got:  " + g
		}
	}
	return ""
}

func extraFile(path, source string) igntypes.File {
	var f igntypes.File
	f.Path = path
	f.Contents.Source = &source
	return f
}

// TestDeterministic renders each case twice and requires byte-identical plans.
func TestDeterministic(t *testing.T) {
	for _, tc := range goldenCases {
		m, f := loadManifest(t, tc.manifest), loadFacts(t, tc.facts)
		a, err := render.Plan(m, f)
		if err != nil {
			t.Fatal(err)
		}
		for i := 0; i < 5; i++ {
			b, err := render.Plan(m, f)
			if err != nil {
				t.Fatal(err)
			}
			if a.Digest() != b.Digest() {
				t.Fatalf("%s: two renders differ", tc.name)
			}
		}
	}
}

// TestCustomizationPoints checks that the minimal plan carries every
// setting of the specification's customization-points table.
func TestCustomizationPoints(t *testing.T) {
	p, err := render.Plan(loadManifest(t, "minimal"), loadFacts(t, "kvm"))
	if err != nil {
		t.Fatal(err)
	}
	nspawn := fileContents(t, p, "/etc/systemd/nspawn/kube1.nspawn")
	override := fileContents(t, p, "/etc/systemd/system/systemd-nspawn@kube1.service.d/override.conf")
	for _, want := range []string{
		"Capability=all", "PrivateUsers=no", "SystemCallFilter=@keyring bpf perf_event_open",
		"VirtualEthernet=no", "Bind=/run/bpffs/kube1:/sys/fs/bpf", "Bind=/dev/kvm", "BindReadOnly=/lib/modules",
	} {
		if !containsLine(nspawn, want) {
			t.Errorf(".nspawn lacks %q", want)
		}
	}
	for _, want := range []string{
		"Environment=SYSTEMD_NSPAWN_UNIFIED_HIERARCHY=1", "Environment=SYSTEMD_NSPAWN_API_VFS_WRITABLE=network",
		"DeviceAllow=/dev/kvm rwm", "ExecStartPre=/bin/mkdir -p /run/bpffs/kube1", "Restart=on-failure",
		"StartLimitIntervalSec=0", "ExecStartPre=-/usr/bin/machinectl terminate kube1",
		"Requires=nodespawn-nft-flush.service",
	} {
		if !containsLine(override, want) {
			t.Errorf("override.conf lacks %q", want)
		}
	}
	if !containsLine(override, "After=nodespawn-nft-flush.service") {
		t.Errorf("the machine is not ordered after the nftables flush:\n%s", override)
	}
}

// TestTwoMachinesShareTheFlushUnit renders two machines for one host (an
// upgrade's pair, or two nodes): the host files they share are the same
// whichever machine is rendered last, and each machine orders itself
// after the flush.
func TestTwoMachinesShareTheFlushUnit(t *testing.T) {
	shared := map[string]string{}
	for _, name := range []string{"kube1", "kube2"} {
		m := loadManifest(t, "minimal")
		m.Machine.Name = name
		p, err := render.Plan(m, loadFacts(t, "kvm"))
		if err != nil {
			t.Fatal(err)
		}
		for _, s := range p.Steps {
			if s.Phase != plan.PhaseHost || s.File == nil || strings.Contains(s.File.Path, name) {
				continue
			}
			if strings.Contains(s.File.Contents, name) {
				t.Errorf("%s: the shared file %s names the machine:\n%s", name, s.File.Path, s.File.Contents)
			}
			if prev, ok := shared[s.File.Path]; ok && prev != s.File.Contents {
				t.Errorf("%s differs between the machines", s.File.Path)
			}
			shared[s.File.Path] = s.File.Contents
		}
		override := fileContents(t, p, "/etc/systemd/system/systemd-nspawn@"+name+".service.d/override.conf")
		for _, want := range []string{"Requires=nodespawn-nft-flush.service", "After=nodespawn-nft-flush.service"} {
			if !containsLine(override, want) {
				t.Errorf("%s: override.conf lacks %q", name, want)
			}
		}
		for _, s := range p.Steps {
			if s.Link != nil && strings.Contains(s.Link.Path, ".requires/") {
				t.Errorf("%s: a .requires link (%s) ties the shared unit to one machine", name, s.Link.Path)
			}
		}
	}
	if _, ok := shared["/etc/systemd/system/nodespawn-nft-flush.service"]; !ok {
		t.Error("no shared flush unit")
	}
}

// TestHostFactErrors: what the manifest asks of a host that cannot give
// it is bad input naming the field (apply exits 2), with what was seen.
func TestHostFactErrors(t *testing.T) {
	tests := []struct {
		name, manifest, facts string
		edit                  func(*manifest.Manifest)
		path, want            string
	}{
		{"only a stub resolver", "minimal", "stub-only", nil, "$.machine.dns.nameservers", "only 127.0.0.53 in /etc/resolv.conf"},
		{"rdma on without devices", "minimal", "cpu", func(m *manifest.Manifest) { m.Machine.RDMA = manifest.SwitchOn }, "$.machine.rdma", "no RDMA devices"},
		{"no address in the CIDR", "minimal", "h200-connectx", func(m *manifest.Manifest) { m.Kubernetes.NodeIP = "172.16.0.0/12" },
			"$.kubernetes.nodeIP", "no address of this host is in 172.16.0.0/12 (addresses here: 10.20.0.7/16, fd20:0:0:1::7/64, 192.168.100.7/24)"},
		{"an address of another host", "minimal", "h200-connectx", func(m *manifest.Manifest) { m.Kubernetes.NodeIP = "10.20.0.8" },
			"$.kubernetes.nodeIP", "10.20.0.8 is not an address of this host"},
		{"gpu on, NVSwitches, no Fabric Manager", "gpu", "nvswitch8-nofm", nil,
			"$.machine.gpu", "is \"on\" but this host's GPUs are joined by NVSwitches and nvidia-fabricmanager.service is inactive"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			m := loadManifest(t, tt.manifest)
			if tt.edit != nil {
				tt.edit(m)
			}
			_, err := render.Plan(m, loadFacts(t, tt.facts))
			var rerr *render.Error
			if !errors.As(err, &rerr) || manifest.FormatPath(rerr.Path) != tt.path || !strings.Contains(rerr.Msg, tt.want) {
				t.Errorf("render: %v; want %s: ...%s...", err, tt.path, tt.want)
			}
		})
	}
}

// TestNodeIPAuto: "auto" registers the address of the default route's
// interface and maps the node name to it.
func TestNodeIPAuto(t *testing.T) {
	p, err := render.Plan(loadManifest(t, "minimal"), loadFacts(t, "h200-connectx"))
	if err != nil {
		t.Fatal(err)
	}
	if hosts := fileContents(t, p, "/var/lib/machines/kube1/etc/hosts"); !containsLine(hosts, "10.20.0.7 hgx-h200-07") || strings.Contains(hosts, "127.0.1.1") {
		t.Errorf("/etc/hosts:\n%s", hosts)
	}
	dropin := fileContents(t, p, "/var/lib/machines/kube1/etc/systemd/system/kubelet.service.d/10-nodespawn.conf")
	if !strings.Contains(dropin, "--node-ip=10.20.0.7 ") && !strings.Contains(dropin, "--node-ip=10.20.0.7\"") {
		t.Errorf("kubelet flags:\n%s", dropin)
	}
}

func fileContents(t *testing.T, p *plan.Plan, path string) string {
	t.Helper()
	for _, s := range p.Steps {
		if s.File != nil && s.File.Path == path {
			return s.File.Contents
		}
	}
	t.Fatalf("no file step for %s", path)
	return ""
}

func containsLine(text, line string) bool {
	for _, l := range strings.Split(text, "\n") {
		if strings.TrimSpace(l) == line {
			return true
		}
	}
	return false
}

// TestNoSecretInOutput renders the token and exec manifests and requires
// that no secret appears in either output format.
func TestNoSecretInOutput(t *testing.T) {
	for _, tc := range []struct{ manifest, secret string }{
		{"minimal", "0123456789abcdef"},
		{"exec", "s3cr3t-value-never-printed"},
	} {
		p, err := render.Plan(loadManifest(t, tc.manifest), loadFacts(t, "cpu"))
		if err != nil {
			t.Fatal(err)
		}
		var out bytes.Buffer
		if err := plan.WriteText(&out, p); err != nil {
			t.Fatal(err)
		}
		if err := plan.WriteJSON(&out, p); err != nil {
			t.Fatal(err)
		}
		if strings.Contains(out.String(), tc.secret) {
			t.Errorf("%s: the secret appears in the printed plan", tc.manifest)
		}
		if !strings.Contains(out.String(), plan.Redacted) {
			t.Errorf("%s: no redacted file in the printed plan", tc.manifest)
		}
		// The plan itself keeps the secret, for apply.
		found := false
		for _, s := range p.Steps {
			if s.File != nil && strings.Contains(s.File.Contents, tc.secret) {
				found = s.File.Secret && s.File.Mode == 0o600
			}
		}
		if !found {
			t.Errorf("%s: the secret is not in a 0600 secret file of the plan", tc.manifest)
		}
	}
}

func TestSwitchOnWithoutDevice(t *testing.T) {
	for _, tc := range []struct{ manifest, path string }{
		{"gpu", "$.machine.gpu"},
		{"kvm", "$.machine.kvm"},
	} {
		_, err := render.Plan(loadManifest(t, tc.manifest), loadFacts(t, "cpu"))
		var rerr *render.Error
		if !errors.As(err, &rerr) || manifest.FormatPath(rerr.Path) != tc.path {
			t.Errorf("%s on a host without the device: got %v, want a render.Error at %s", tc.manifest, err, tc.path)
		}
	}
}

func TestGPUImageChosenOnGPUHost(t *testing.T) {
	m := loadManifest(t, "minimal")
	cpu, err := render.Plan(m, loadFacts(t, "cpu"))
	if err != nil {
		t.Fatal(err)
	}
	gpu, err := render.Plan(m, loadFacts(t, "gpu8"))
	if err != nil {
		t.Fatal(err)
	}
	if got := cpu.Step("rootfs:image").Image.Reference; got != manifest.DefaultImage {
		t.Errorf("CPU host image %s, want %s", got, manifest.DefaultImage)
	}
	if got := gpu.Step("rootfs:image").Image.Reference; got != manifest.DefaultGPUImage {
		t.Errorf("GPU host image %s, want %s", got, manifest.DefaultGPUImage)
	}
}

// TestExtraFileClashesWithGenerated: a clash is reported at the extra
// entry, naming the generated step that owns the path; validate and apply
// turn the path into a line and column (see manifest/validate_test.go).
func TestExtraFileClashesWithGenerated(t *testing.T) {
	m := loadManifest(t, "minimal")
	src := "data:,x"
	m.Host.Extra.Storage.Files = append(m.Host.Extra.Storage.Files,
		extraFile("/etc/motd", src), extraFile("/etc/systemd/nspawn/kube1.nspawn", src))
	m.Machine.Extra.Storage.Files = append(m.Machine.Extra.Storage.Files, extraFile("/etc/hostname", src))
	_, err := render.Plan(m, loadFacts(t, "cpu"))
	want := []render.Error{
		{Path: jsonpath.New("", "host", "extra", "storage", "files", 1, "path"), Msg: "/etc/systemd/nspawn/kube1.nspawn is also created by nodespawn (step host:file:/etc/systemd/nspawn/kube1.nspawn)"},
		{Path: jsonpath.New("", "machine", "extra", "storage", "files", 0, "path"), Msg: "/etc/hostname is also created by nodespawn (step machine:file:/etc/hostname)"},
	}
	j, ok := err.(interface{ Unwrap() []error })
	if !ok || len(j.Unwrap()) != len(want) {
		t.Fatalf("got %v, want %d clashes", err, len(want))
	}
	for i, e := range j.Unwrap() {
		var rerr *render.Error
		if !errors.As(e, &rerr) || !reflect.DeepEqual(*rerr, want[i]) {
			t.Errorf("clash %d: got %v, want %v", i, e, &want[i])
		}
	}
	// Located in a manifest not made by Load, the errors keep their paths.
	var es manifest.Errors
	if !errors.As(render.Locate(m, err), &es) || len(es) != 2 || es[0].Path != manifest.FormatPath(want[0].Path) {
		t.Errorf("Locate: %v", es)
	}
}
