package manifest

import (
	"sort"
	"strings"
	"testing"

	jsonpath "github.com/coreos/vcontext/path"
	"github.com/kaptinlin/jsonschema"

	"github.com/nodespawn/nodespawn/schema"
)

// Verdicts in TestSchemaPatternsAgree.
const (
	okBoth  = "ok"  // the schema's pattern and the semantic checks accept it
	badBoth = "bad" // both refuse it
	// goOnly: the semantic checks refuse it and the pattern does not: a
	// rule a pattern cannot say (a minimum, an overflow, a control
	// character, an IP address's ranges). The reverse, a pattern refusing
	// what the checks accept, is never right: Load would refuse a manifest
	// nodespawn can apply.
	goOnly = "go"
)

// TestSchemaPatternsAgree checks every pattern in the schema against the
// semantic check of the same field, value by value: the editor (which
// sees only the schema) and the CLI must agree on what a bad token, URL,
// duration, version or checksum is. Every field with a pattern must have
// rows here.
func TestSchemaPatternsAgree(t *testing.T) {
	sch, err := schema.Compile()
	if err != nil {
		t.Fatal(err)
	}
	durations := map[string]string{
		"": okBoth, "30s": okBoth, "1h30m": okBoth, "1.5h": okBoth, ".5s": okBoth, "1.s": okBoth, "0": okBoth, "+0": okBoth, "-0": okBoth,
		"-0s": okBoth, "+10m": okBoth, "300ms": okBoth, "5us": okBoth, "5µs": okBoth, "5μs": okBoth, "10ns": okBoth, "1h2m3s4ms": okBoth,
		"30": badBoth, "30 s": badBoth, "30S": badBoth, "1d": badBoth, "s": badBoth, ".s": badBoth, "- 1s": badBoth, "1h ": badBoth, "-5s": badBoth,
		"thirty seconds": badBoth, "1e3s": badBoth,
		"9999999999999999999h": goOnly, // overflows
	}
	semvers := map[string]string{
		"": okBoth, "v1.37.2": okBoth, "1.37.2": okBoth, "v1.37.2-rc.1": okBoth, "1.0.0-alpha.beta+build.7": okBoth, "1.0.0+20260101": okBoth, "1.0.0-0a": okBoth,
		"v1.37": badBoth, "1.37": badBoth, "v01.2.3": badBoth, "1.2.3-01": badBoth, "V1.2.3": badBoth, "1.2.3-": badBoth, "1.2.3+": badBoth, "latest": badBoth,
		"1.2.3-a..b": badBoth, " 1.2.3": badBoth,
	}
	httpsOnly := map[string]string{
		"https://10.0.0.1:6443": okBoth, "HTTPS://api.example.com": okBoth, "https://[fd00::1]:6443/": okBoth, "https://h/p?q#f": okBoth, "https://h/a@b": okBoth,
		"http://10.0.0.1:6443": badBoth, "10.0.0.1:6443": badBoth, "https://": badBoth, "https:///path": badBoth, "https://user:pw@h": badBoth, "ftp://h": badBoth,
		"https//h":    badBoth,
		"https://a b": goOnly, "https://h/\x7f": goOnly,
	}
	httpURL := map[string]string{
		"": okBoth, "https://dl.example.com/k": okBoth, "http://10.0.0.9:8080/a/b": okBoth, "Http://h": okBoth, "http://h?x=1": okBoth,
		"dl.example.com/k": badBoth, "file:///k": badBoth, "http://u@h/k": badBoth, "http://": badBoth, "//h/k": badBoth,
		"http://h/%zz": goOnly,
	}
	baseURL := map[string]string{
		"": okBoth, "https://mirror.example.com/k8s": okBoth, "http://10.0.0.9:8080": okBoth, "https://h/": okBoth, "https://h/#": okBoth,
		"https://h/?x=1": badBoth, "https://h/?": badBoth, "https://h/#f": badBoth, "mirror.example.com": badBoth, "https://u:p@h": badBoth,
		"https://h/a\nb": goOnly,
	}
	rows := []struct {
		path   []any
		set    func(m *Manifest, v string)
		values map[string]string
	}{
		{[]any{"kubernetes", "auth", "bootstrapToken"}, func(m *Manifest, v string) { m.Kubernetes.Auth.BootstrapToken = v }, map[string]string{
			"abcdef.0123456789abcdef": okBoth, "07401b.f395accd246ae52d": okBoth,
			"ABCDEF.0123456789abcdef": badBoth, "abcdef0123456789abcdef": badBoth, "abcdef.0123456789abcde": badBoth, "abcdefg.0123456789abcdef": badBoth,
			"abcdef:0123456789abcdef": badBoth, " abcdef.0123456789abcdef": badBoth, "abcdef.0123456789abcdef\n": badBoth,
		}},
		{[]any{"components", "kubelet", "sha256"}, func(m *Manifest, v string) { m.Components.Kubelet.SHA256 = v }, map[string]string{
			"": okBoth, strings.Repeat("ab", 32): okBoth,
			strings.Repeat("AB", 32): badBoth, strings.Repeat("ab", 31): badBoth, "sha256:" + strings.Repeat("ab", 32): badBoth, strings.Repeat("ab", 32) + "\n": badBoth,
		}},
		{[]any{"kubernetes", "shutdownGracePeriod"}, func(m *Manifest, v string) { m.Kubernetes.ShutdownGracePeriod = v }, durations},
		{[]any{"firstBoot", "retryFor"}, func(m *Manifest, v string) { m.FirstBoot.RetryFor = v }, durations},
		{[]any{"upgrade", "readyTimeout"}, func(m *Manifest, v string) { m.Upgrade.ReadyTimeout = v }, map[string]string{
			"10m": okBoth, "10 m": badBoth, "ten": badBoth, "5s": goOnly, // at least 10s
		}},
		{[]any{"upgrade", "stopTimeout"}, func(m *Manifest, v string) { m.Upgrade.StopTimeout = v }, map[string]string{
			"2m": okBoth, "2 m": badBoth, "-1m": badBoth, "0.5s": goOnly, // at least 1s
		}},
		{[]any{"kubernetes", "version"}, func(m *Manifest, v string) { m.Kubernetes.Version = v }, semvers},
		{[]any{"components", "runc", "version"}, func(m *Manifest, v string) { m.Components.Runc.Version = v }, semvers},
		{[]any{"kubernetes", "apiServer"}, func(m *Manifest, v string) { m.Kubernetes.APIServer = v }, httpsOnly},
		{[]any{"report", "url"}, func(m *Manifest, v string) { m.Report = &Report{URL: v} }, httpsOnly},
		{[]any{"report", "tokenFile"}, func(m *Manifest, v string) { m.Report = &Report{URL: "https://h/r", TokenFile: v} }, map[string]string{
			"": okBoth, "/etc/nodespawn/token": okBoth, "/": okBoth, "etc/token": badBoth, "./token": badBoth, " /token": badBoth,
		}},
		{[]any{"components", "kubelet", "url"}, func(m *Manifest, v string) { m.Components.Kubelet.URL = v }, httpURL},
		{[]any{"machine", "rootfs", "debootstrap", "mirror"}, func(m *Manifest, v string) {
			m.Machine.Rootfs = Rootfs{Debootstrap: &Debootstrap{Mirror: v}}
		}, httpURL},
		{[]any{"components", "mirror"}, func(m *Manifest, v string) { m.Components.Mirror = v }, baseURL},
		{[]any{"components", "kubelet", "baseURL"}, func(m *Manifest, v string) { m.Components.Kubelet.BaseURL = v }, baseURL},
		{[]any{"kubernetes", "nodeIP"}, func(m *Manifest, v string) { m.Kubernetes.NodeIP = v }, map[string]string{
			"": okBoth, "auto": okBoth, "10.20.0.5": okBoth, "10.20.0.0/16": okBoth, "10.20.0.0/16,fd00::/64": okBoth, " 10.20.0.0/16 , fd00::/64 ": okBoth,
			"10.20.0.5\v": okBoth, "\u00a010.20.0.5": okBoth, "fe80::1%eth0": badBoth, "::ffff:10.0.0.1": okBoth,
			"eth0": badBoth, "auto,10.0.0.1": badBoth, " auto": badBoth, "10.0.0.1,": badBoth, "10.0.0.1 10.0.0.2": badBoth, "node.example.com": badBoth,
			"10.0.0.1,10.0.0.2,fd00::1": badBoth, "10.0.0.0/16/8": badBoth,
			"10.0.0.1,10.0.0.2": goOnly, "127.0.0.1": goOnly, "10.0.0.300": goOnly, "10.0.0.0/99": goOnly, // one per family; unicast; ranges
		}},
		{[]any{"kubernetes", "clusterDNS", 0}, func(m *Manifest, v string) { m.Kubernetes.ClusterDNS = []string{v} }, map[string]string{
			"10.96.0.10": okBoth, "fd00::a": okBoth, "fe80::1%eth0": badBoth,
			"kube-dns": badBoth, "10.96.0.10/32": badBoth, " 10.96.0.10": badBoth, "": badBoth,
			"10.96.0": goOnly, "1.2.3.4.5": goOnly,
		}},
		{[]any{"machine", "dns", "nameservers", 0}, func(m *Manifest, v string) { m.Machine.DNS = &DNS{Nameservers: []string{v}} }, map[string]string{
			"10.0.0.2": okBoth, "2001:db8::53": okBoth,
			"dns.example.com": badBoth, "10.0.0.2:53": goOnly, "127.0.0.53": goOnly, // a port, a loopback stub
		}},
		{[]any{"machine", "rootfs", "layout", "path"}, func(m *Manifest, v string) { m.Machine.Rootfs = Rootfs{Layout: &Layout{Path: v}} }, map[string]string{
			"/srv/images/base": okBoth, "/": okBoth, "srv/images": badBoth, "./x": badBoth,
		}},
	}
	covered := map[*jsonschema.Schema]bool{}
	for _, r := range rows {
		path := jsonpath.New("", r.path...)
		name := FormatPath(path)
		s := schemaAt(sch, path)
		for s != nil && s.Pattern == nil && s.ResolvedRef != nil {
			s = s.ResolvedRef
		}
		if s == nil || s.Pattern == nil {
			t.Errorf("%s: the schema has no pattern there; drop the row or add the pattern", name)
			continue
		}
		covered[s] = true
		for v, verdict := range r.values {
			schemaOK := s.ValidateStruct(v).IsValid()
			m, err := Load("base.yaml", []byte(with()))
			if err != nil {
				t.Fatal(err)
			}
			r.set(m, v)
			goOK := true
			for _, p := range check(m) {
				if within(p.path, path) {
					goOK = false
				}
			}
			want := map[string][2]bool{okBoth: {true, true}, badBoth: {false, false}, goOnly: {true, false}}[verdict]
			if schemaOK != want[0] || goOK != want[1] {
				t.Errorf("%s = %q: the schema says ok=%v, the semantic checks ok=%v; want %s", name, v, schemaOK, goOK, verdict)
			}
		}
	}
	// Every pattern in the schema is under test.
	var missing []string
	seen := map[*jsonschema.Schema]bool{}
	var walk func(s *jsonschema.Schema)
	walk = func(s *jsonschema.Schema) {
		if s == nil || seen[s] {
			return
		}
		seen[s] = true
		if s.Pattern != nil && !covered[s] {
			missing = append(missing, *s.Pattern)
		}
		walk(s.ResolvedRef)
		walk(s.Items)
		if ap := s.AdditionalProperties; ap != nil && ap.Boolean == nil {
			walk(ap)
		}
		for _, p := range properties(s) {
			walk(p)
		}
	}
	walk(sch)
	sort.Strings(missing)
	if len(missing) > 0 {
		t.Errorf("patterns without rows in this test: %s", strings.Join(missing, ", "))
	}
}

// TestSchemaShapeAndEnumMessages: a value the schema's pattern refuses is
// reported once, in the semantic check's words (a token never echoed); an
// enum value near an allowed one gets a did-you-mean, as unknown keys do.
func TestSchemaShapeAndEnumMessages(t *testing.T) {
	tests := []struct {
		name, src, path, msg string
	}{
		{"bad token", doc(strings.Replace(strings.Join(valid, "\n"), "abcdef.0123456789abcdef", "ABCDEF.0123456789abcdef", 1)),
			"$.kubernetes.auth.bootstrapToken", "not a bootstrap token: want 6 lowercase letters or digits"},
		{"bad duration", with("upgrade:", "  readyTimeout: 10 m"), "$.upgrade.readyTimeout", "must be a duration like 90s, 10m or 1h30m"},
		{"http API server", doc(strings.Replace(strings.Join(valid, "\n"), "https://", "http://", 1)),
			"$.kubernetes.apiServer", "must be an https URL (kubelet verifies the API server with caCert)"},
		{"store typo", with("machine:", "  rootfs:", "    store: layer"), "$.machine.rootfs.store", `must be one of auto, layers, flat (did you mean "layers"?)`},
		{"effect case", with("  taints:", "  - key: gpu", "    effect: noschedule"), "$.kubernetes.taints[0].effect", `(did you mean "NoSchedule"?)`},
		{"switch far off", with("machine:", "  gpu: maybe"), "$.machine.gpu", "must be one of auto, on, off"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			es := loadErrors(t, "m.yaml", tt.src)
			if len(es) != 1 || es[0].Path != tt.path || !strings.Contains(es[0].Message, tt.msg) {
				t.Fatalf("got %v; want one error at %s saying %q", es, tt.path, tt.msg)
			}
			if strings.Contains(es.Error(), "ABCDEF") {
				t.Errorf("the token is echoed: %v", es)
			}
			if tt.name == "switch far off" && strings.Contains(es[0].Message, "did you mean") {
				t.Errorf("a guess for a word that is none of them: %s", es[0].Message)
			}
		})
	}

	// The guard for a pattern no semantic check repeats: it says so once,
	// quoting the value unless the path holds a secret.
	src := []byte(with())
	d := newDocument("m.yaml", src)
	if !d.parse(src) {
		t.Fatal("parse")
	}
	d.shapeProblems([]jsonpath.ContextPath{jsonpath.New("", "kubernetes", "auth", "bootstrapToken"), jsonpath.New("", "kubernetes", "apiServer")})
	es := d.errors()
	if len(es) != 2 || strings.Contains(es.Error(), "abcdef") || !strings.Contains(es.Error(), `"https://10.0.0.1:6443" does not have the shape the schema asks for`) {
		t.Errorf("guard messages: %v", es)
	}
}
