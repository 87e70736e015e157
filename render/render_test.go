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
	// multiarch directory, nvidia-caps, no dri nodes.
	{"gpu-h200", "gpu", "h200"},
	{"minimal-gpu-auto", "minimal", "gpu8"},
	{"kvm", "kvm", "kvm"},
	{"minimal-kvm-auto", "minimal", "kvm"},
	{"arm64", "minimal", "arm64"},
	{"lean", "lean", "kvm"},
	{"exec", "exec", "cpu"},
	{"airgapped", "airgapped", "cpu"},
	{"registry", "registry", "cpu"},
	{"stub-resolver", "minimal", "stub-only"},
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
	flush := fileContents(t, p, "/etc/systemd/system/nodespawn-nft-flush.service")
	if !containsLine(flush, "Before=systemd-nspawn@kube1.service") {
		t.Errorf("the flush unit is not ordered before the machine's instance:\n%s", flush)
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
