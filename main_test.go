package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"

	"go.yaml.in/yaml/v3"

	"github.com/nodespawn/nodespawn/plan"
	"github.com/nodespawn/nodespawn/render"
)

// cli runs the command line in-process and returns the exit code and output.
func cli(t testing.TB, stdin string, args ...string) (int, string, string) {
	t.Helper()
	var out, errb bytes.Buffer
	code := run(args, strings.NewReader(stdin), &out, &errb)
	return code, out.String(), errb.String()
}

const gpuFacts = "render/testdata/facts/gpu8.json"
const cpuFacts = "render/testdata/facts/cpu.json"

// TestExamplesDryRun renders every bundled example, as text and as JSON,
// for a CPU and a GPU host (the GPU example only on the GPU host).
func TestExamplesDryRun(t *testing.T) {
	examples, err := filepath.Glob("examples/*.yaml")
	if err != nil || len(examples) < 4 {
		t.Fatalf("want at least 4 examples, found %v (%v)", examples, err)
	}
	for _, ex := range examples {
		for _, facts := range []string{cpuFacts, gpuFacts} {
			if strings.Contains(ex, "gpu") && facts == cpuFacts {
				continue
			}
			code, out, errOut := cli(t, "", "apply", "--dry-run", "-f", ex, "--facts", facts)
			if code != 0 {
				t.Fatalf("%s on %s: exit %d: %s", ex, facts, code, errOut)
			}
			if !strings.Contains(out, "== host") || !strings.Contains(out, "== start") {
				t.Errorf("%s: text plan lacks its phases", ex)
			}
			code, out, errOut = cli(t, "", "apply", "--dry-run", "-o", "json", "-f", ex, "--facts", facts)
			if code != 0 {
				t.Fatalf("%s -o json: exit %d: %s", ex, code, errOut)
			}
			var p plan.Plan
			if err := json.Unmarshal([]byte(out), &p); err != nil {
				t.Fatalf("%s: -o json does not parse: %v", ex, err)
			}
			if p.Version != plan.Version || len(p.Steps) == 0 {
				t.Errorf("%s: JSON plan version %q with %d steps", ex, p.Version, len(p.Steps))
			}
		}
	}
}

// yaml11Bools are the plain scalars YAML 1.1 tools (PyYAML, Helm,
// kustomize, sigs.k8s.io/yaml) read as booleans but YAML 1.2 reads as
// strings: a manifest that goes through such a tool changes meaning.
var yaml11Bools = regexp.MustCompile(`^(y|Y|yes|Yes|YES|n|N|no|No|NO|on|On|ON|off|Off|OFF)$`)

// TestExamplesSurviveYAML11: the examples quote on and off, so that users
// who copy them into Helm values or kustomize keep strings.
func TestExamplesSurviveYAML11(t *testing.T) {
	files, err := filepath.Glob("examples/*.yaml")
	more, _ := filepath.Glob("examples/cloud-init/*.yaml")
	if err != nil || len(files) < 4 || len(more) < 2 {
		t.Fatalf("examples: %v %v (%v)", files, more, err)
	}
	var walk func(file string, n *yaml.Node)
	walk = func(file string, n *yaml.Node) {
		if n.Kind == yaml.ScalarNode {
			if n.Style == 0 && yaml11Bools.MatchString(n.Value) {
				t.Errorf("%s:%d:%d: %s is a boolean to YAML 1.1 tools; quote it", file, n.Line, n.Column, n.Value)
			}
			// A manifest embedded in user-data (write_files content).
			if strings.Contains(n.Value, "apiVersion: nodespawn.dev/") {
				var doc yaml.Node
				if err := yaml.Unmarshal([]byte(n.Value), &doc); err == nil {
					walk(fmt.Sprintf("%s:%d (embedded)", file, n.Line), &doc)
				}
			}
		}
		for _, c := range n.Content {
			walk(file, c)
		}
	}
	for _, file := range append(files, more...) {
		data, err := os.ReadFile(file)
		if err != nil {
			t.Fatal(err)
		}
		var doc yaml.Node
		if err := yaml.Unmarshal(data, &doc); err != nil {
			t.Fatalf("%s: %v", file, err)
		}
		walk(file, &doc)
	}
}

// TestMinimalHasEveryCustomizationPoint checks the dry-run of the minimal
// example against the specification's customization-points table.
func TestMinimalHasEveryCustomizationPoint(t *testing.T) {
	code, out, errOut := cli(t, "", "apply", "--dry-run", "-f", "examples/minimal.yaml", "--facts", "render/testdata/facts/kvm.json")
	if code != 0 {
		t.Fatalf("exit %d: %s", code, errOut)
	}
	for _, want := range []string{
		"Capability=all",
		"PrivateUsers=no",
		"SystemCallFilter=@keyring bpf perf_event_open",
		"VirtualEthernet=no",
		"Bind=/run/bpffs/kube1:/sys/fs/bpf",
		"ExecStartPre=/bin/mkdir -p /run/bpffs/kube1",
		"Environment=SYSTEMD_NSPAWN_UNIFIED_HIERARCHY=1",
		"Environment=SYSTEMD_NSPAWN_API_VFS_WRITABLE=network",
		"Bind=/dev/kvm",
		"DeviceAllow=/dev/kvm rwm",
		"BindReadOnly=/lib/modules",
	} {
		if !strings.Contains(out, "| "+want+"\n") {
			t.Errorf("the plan lacks %q", want)
		}
	}
	// GPU binds and device permissions come with a GPU host.
	code, out, _ = cli(t, "", "apply", "--dry-run", "-f", "examples/minimal.yaml", "--facts", gpuFacts)
	if code != 0 {
		t.Fatal("GPU host render failed")
	}
	for _, want := range []string{"Bind=/dev/nvidia0", "BindReadOnly=/usr/lib/x86_64-linux-gnu:/run/host-nvidia/0", "DeviceAllow=/dev/nvidia0 rwm"} {
		if !strings.Contains(out, "| "+want+"\n") {
			t.Errorf("the GPU plan lacks %q", want)
		}
	}
}

// urlSecretExtras are machine and host extra files fetched from URLs that
// carry a password, a token as the user, and a signed query: allowed (it
// is how some mirrors authenticate), never shown.
const urlSecretExtras = `machine:
  extra:
    storage:
      files:
        - path: /etc/motd
          contents:
            source: https://mirror-user:MACHINE-PASSWORD@mirror.example/motd
            verification: {hash: sha256-2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae}
host:
  extra:
    storage:
      files:
        - path: /etc/nodespawn-test/a
          contents:
            source: http://HOST-TOKEN-USER@mirror.example/a?X-Amz-Signature=SIGNED-QUERY
            verification: {hash: sha256-2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae}
`

// urlSecrets are the secrets urlSecretExtras holds.
var urlSecrets = []string{"MACHINE-PASSWORD", "HOST-TOKEN-USER", "SIGNED-QUERY"}

// TestNoTokenInDryRun: the dry run, as text and JSON, never prints the
// bootstrap token, nor a URL's password, token user or query.
func TestNoTokenInDryRun(t *testing.T) {
	data, err := os.ReadFile("examples/minimal.yaml")
	if err != nil {
		t.Fatal(err)
	}
	token := regexp.MustCompile(`bootstrapToken:\s*"?([a-z0-9]{6}\.[a-z0-9]{16})`).FindSubmatch(data)
	if token == nil {
		t.Fatal("examples/minimal.yaml has no bootstrap token to look for")
	}
	secret := string(token[1])
	src := string(data) + urlSecretExtras
	for _, format := range []string{"text", "json"} {
		code, out, errOut := cli(t, src, "apply", "--dry-run", "-o", format, "-f", "-", "--facts", cpuFacts)
		if code != exitOK {
			t.Fatalf("-o %s: exit %d:\n%s", format, code, errOut)
		}
		if strings.Contains(out+errOut, secret) || strings.Contains(out+errOut, secret[7:]) {
			t.Errorf("-o %s prints the bootstrap token", format)
		}
		for _, s := range urlSecrets {
			if strings.Contains(out+errOut, s) {
				t.Errorf("-o %s prints %s", format, s)
			}
		}
		for _, want := range []string{"https://mirror-user:<redacted>@mirror.example/motd", "http://<redacted>@mirror.example/a?<redacted>"} {
			if format == "json" {
				want = strings.NewReplacer("<", `\u003c`, ">", `\u003e`).Replace(want)
			}
			if !strings.Contains(out, want) {
				t.Errorf("-o %s lacks %s", format, want)
			}
		}
	}
}

// TestURLPasswordsInRefusals: a URL nodespawn refuses credentials in
// (component and mirror URLs, the report's, debootstrap's mirror, the API
// server) is refused without the credential being shown: not by
// validate, the dry run or the first-boot console line, in YAML or JSON.
func TestURLPasswordsInRefusals(t *testing.T) {
	data, err := os.ReadFile("examples/minimal.yaml")
	if err != nil {
		t.Fatal(err)
	}
	yamlSrc := strings.Replace(string(data), "https://10.0.0.1:6443", "https://admin:PASSWORD-0@10.0.0.1:6443", 1) + `machine:
  rootfs:
    debootstrap: {mirror: "http://u:PASSWORD-1@archive.example/ubuntu"}
components:
  mirror: https://u:PASSWORD-2@mirror.example/k8s
  kubelet: {url: "https://u:PASSWORD-3@mirror.example/kubelet?sig=PASSWORD-4"}
  runc: {baseURL: https://PASSWORD-5@mirror.example/runc}
report:
  url: https://u:PASSWORD-6@reports.example/nodes
`
	paths := []string{"$.kubernetes.apiServer", "$.machine.rootfs.debootstrap.mirror", "$.components.mirror", "$.components.kubelet.url", "$.components.runc.baseURL", "$.report.url"}
	m, err := yaml.Marshal(yamlNode(t, yamlSrc))
	if err != nil {
		t.Fatal(err)
	}
	// The same manifest as one line of JSON, with the escaped slashes some
	// encoders write.
	var v any
	if err := yaml.Unmarshal(m, &v); err != nil {
		t.Fatal(err)
	}
	js, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	jsonSrc := strings.ReplaceAll(string(js), "/", `\/`)
	console := filepath.Join(t.TempDir(), "console")
	for name, src := range map[string]string{"yaml": yamlSrc, "json": jsonSrc} {
		for _, args := range [][]string{
			{"validate", "-f", "-"},
			{"apply", "--dry-run", "-f", "-", "--facts", cpuFacts},
			{"apply", "-f", "-", "--root", t.TempDir(), "--first-boot", "--console", console, "--retry-wait", "10ms"},
		} {
			code, out, errOut := cli(t, src, args...)
			b, _ := os.ReadFile(console)
			all := out + errOut + string(b)
			if code != exitBadInput {
				t.Errorf("%s %v: exit %d, want %d:\n%s", name, args, code, exitBadInput, all)
			}
			for _, p := range paths {
				if !strings.Contains(errOut, p+": must not carry credentials") {
					t.Errorf("%s %v: no refusal at %s:\n%s", name, args, p, errOut)
				}
			}
			if strings.Contains(all, "PASSWORD") {
				t.Errorf("%s %v shows a password:\n%s", name, args, all)
			}
		}
	}
}

// yamlNode parses src as YAML.
func yamlNode(t *testing.T, src string) *yaml.Node {
	t.Helper()
	var n yaml.Node
	if err := yaml.Unmarshal([]byte(src), &n); err != nil {
		t.Fatal(err)
	}
	return &n
}

func TestValidateReportsEveryMistake(t *testing.T) {
	bad := `apiVersion: nodespawn.dev/v1alpha1
kind: Node
machine:
  gpu: maybe
kubernetes:
  version: v1.37.2
  apiServer: https://10.0.0.1:6443
  caCert: not a certificate
  auth:
    bootstrapToken: abcdef.0123456789abcdef
  clustrDomain: cluster.local
`
	code, _, errOut := cli(t, bad, "validate", "-f", "-")
	if code != exitBadInput {
		t.Fatalf("exit %d, want %d", code, exitBadInput)
	}
	for _, want := range []string{
		"<stdin>:4:8: $.machine.gpu:",
		"<stdin>:8:11: $.kubernetes.caCert:",
		"<stdin>:11:3: $.kubernetes.clustrDomain:",
		"3 problems found",
	} {
		if !strings.Contains(errOut, want) {
			t.Errorf("output lacks %q:\n%s", want, errOut)
		}
	}
}

// writeReferenceFacts writes render's reference hosts as --facts files:
// the plain host first, then the GPU host.
func writeReferenceFacts(t *testing.T) []string {
	t.Helper()
	var files []string
	for i, h := range render.ReferenceHosts() {
		data, err := json.Marshal(h)
		if err != nil {
			t.Fatal(err)
		}
		p := filepath.Join(t.TempDir(), "host"+strconv.Itoa(i)+".json")
		if err := os.WriteFile(p, data, 0o644); err != nil {
			t.Fatal(err)
		}
		files = append(files, p)
	}
	return files
}

// places lists the FILE:LINE:COL: $.path prefixes of the errors in out.
func places(file, out string) []string {
	re := regexp.MustCompile(`(?m)^` + regexp.QuoteMeta(file) + `:\d+:\d+: \$\S*:`)
	return re.FindAllString(out, -1)
}

// TestValidateAndApplyAgree runs every bad manifest of the table in
// manifest/validate_test.go (written to manifest/testdata/invalid) through
// validate and through apply --dry-run on a reference host: both must exit
// 2 and name the same lines, columns and paths.
func TestValidateAndApplyAgree(t *testing.T) {
	files, err := filepath.Glob("manifest/testdata/invalid/*.yaml")
	if err != nil || len(files) < 10 {
		t.Fatalf("want the bad manifests of manifest/testdata/invalid, found %d (%v)", len(files), err)
	}
	facts := writeReferenceFacts(t)
	for _, file := range files {
		t.Run(filepath.Base(file), func(t *testing.T) {
			host := facts[0]
			if strings.HasSuffix(file, "-on-gpu-host.yaml") {
				host = facts[1]
			}
			vcode, _, vout := cli(t, "", "validate", "-f", file)
			acode, _, aout := cli(t, "", "apply", "--dry-run", "-f", file, "--facts", host)
			if vcode != exitBadInput || acode != exitBadInput {
				t.Fatalf("exit codes: validate %d, apply %d, want %d\n%s\n%s", vcode, acode, exitBadInput, vout, aout)
			}
			vp, ap := places(file, vout), places(file, aout)
			if len(vp) == 0 || strings.Join(vp, "\n") != strings.Join(ap, "\n") {
				t.Errorf("validate names\n%s\napply names\n%s", vout, aout)
			}
		})
	}
}

func TestExitCodes(t *testing.T) {
	for _, tc := range []struct {
		args []string
		want int
	}{
		{[]string{"validate", "-f", "examples/minimal.yaml"}, exitOK},
		{[]string{"validate", "-f", "does/not/exist.yaml"}, exitBadInput},
		{[]string{"apply", "--dry-run", "-o", "yaml", "-f", "examples/minimal.yaml"}, exitBadInput},
		{[]string{"apply", "--no-such-flag"}, exitBadInput},
		{[]string{"apply", "--dry-run"}, exitBadInput},
		// gpu: on on a host without GPUs is a manifest this host cannot satisfy.
		{[]string{"apply", "--dry-run", "-f", "examples/gpu.yaml", "--facts", cpuFacts}, exitBadInput},
		{[]string{"version"}, exitOK},
	} {
		if code, _, errOut := cli(t, "", tc.args...); code != tc.want {
			t.Errorf("%v: exit %d, want %d (%s)", tc.args, code, tc.want, errOut)
		}
	}
}

func TestSchemaPrintsTheEmbeddedSchema(t *testing.T) {
	code, out, _ := cli(t, "", "schema")
	if code != 0 {
		t.Fatal("schema failed")
	}
	var s map[string]any
	if err := json.Unmarshal([]byte(out), &s); err != nil {
		t.Fatalf("schema output is not JSON: %v", err)
	}
	if s["$schema"] != "https://json-schema.org/draft/2020-12/schema" {
		t.Errorf("$schema = %v", s["$schema"])
	}
}

// TestValidateLeavesHostQuestionsToApply: switches only a real host can
// satisfy (RDMA devices, an address in a nodeIP CIDR, overlayfs for the
// layer store) pass validate, and apply refuses them on a host without.
func TestValidateLeavesHostQuestionsToApply(t *testing.T) {
	data, err := os.ReadFile("examples/minimal.yaml")
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct{ name, find, replace, refusal, facts string }{
		{"rdma on", "kind: Node\n", "kind: Node\nmachine:\n  rdma: \"on\"\n", "$.machine.rdma", cpuFacts},
		{"nodeIP CIDR", "kubernetes:\n", "kubernetes:\n  nodeIP: 10.20.0.0/16\n", "$.kubernetes.nodeIP", cpuFacts},
		// gpu1.json: /var/lib/nodespawn on nfs.
		{"layer store", "kind: Node\n", "kind: Node\nmachine:\n  rootfs:\n    store: layers\n", "$.machine.rootfs.store", "render/testdata/facts/gpu1.json"},
		// An NVSwitch host whose Fabric Manager does not run.
		{"gpu on without Fabric Manager", "kind: Node\n", "kind: Node\nmachine:\n  gpu: \"on\"\n", "$.machine.gpu: is \"on\" but this host's GPUs are joined by NVSwitches and nvidia-fabricmanager.service is inactive", "render/testdata/facts/nvswitch8-nofm.json"},
	} {
		t.Run(c.name, func(t *testing.T) {
			src := strings.Replace(string(data), c.find, c.replace, 1)
			if src == string(data) {
				t.Fatalf("%q not in examples/minimal.yaml", c.find)
			}
			if code, _, out := cli(t, src, "validate", "-f", "-"); code != exitOK {
				t.Errorf("validate: exit %d, want 0:\n%s", code, out)
			}
			code, _, out := cli(t, src, "apply", "--dry-run", "-f", "-", "--facts", c.facts)
			if code != exitBadInput || !strings.Contains(out, c.refusal) {
				t.Errorf("apply --dry-run on a host without it: exit %d, want %d naming %s:\n%s", code, exitBadInput, c.refusal, out)
			}
		})
	}
}

// TestShortRun: the commands that answer and exit get the higher GC
// percent; apply, the agent and the image commands keep the default.
func TestShortRun(t *testing.T) {
	for _, tc := range []struct {
		args []string
		want bool
	}{
		{nil, true},
		{[]string{"version"}, true},
		{[]string{"status", "--long"}, true},
		{[]string{"apply", "--dry-run", "-f", "n.yaml"}, true},
		{[]string{"apply", "-f", "n.yaml"}, false},
		{[]string{"agent"}, false},
		{[]string{"image", "build"}, false},
		{[]string{"rollback"}, false},
	} {
		if got := shortRun(tc.args); got != tc.want {
			t.Errorf("shortRun(%q) = %v, want %v", tc.args, got, tc.want)
		}
	}
}
