package manifest

import (
	"errors"
	"strconv"
	"strings"
	"sync"
	"testing"
)

// testCA is a throwaway self-signed CA (the one in the examples).
const testCA = `-----BEGIN CERTIFICATE-----
MIIBojCCAUmgAwIBAgIUAKUVqKhSeW/lFq7ARZzKQeST19swCgYIKoZIzj0EAwIw
HzEdMBsGA1UEAwwUbm9kZXNwYXduLWV4YW1wbGUtY2EwHhcNMjYxMTI4MTkwMDEw
WhcNMzYxMTI1MTkwMDEwWjAfMR0wGwYDVQQDDBRub2Rlc3Bhd24tZXhhbXBsZS1j
YTBZMBMGByqGSM49AgEGCCqGSM49AwEHA0IABA5lLeOrG8cVZtlq15Hl1dBPsAKw
UvvZGUw+Go63JPnoYl7myxvLBGv389njZ8FZb464UIOyi4MaSDxCBrs2TbqjYzBh
MB0GA1UdDgQWBBS/1/UyBnjt5+oBo4ApvbfMW+mJODAfBgNVHSMEGDAWgBS/1/Uy
Bnjt5+oBo4ApvbfMW+mJODAPBgNVHRMBAf8EBTADAQH/MA4GA1UdDwEB/wQEAwIB
BjAKBggqhkjOPQQDAgNHADBEAiBV5CVHgtGefGOICN2Ie0iZ6N7PLVS0wC4RrvIP
yFRlNAIgI4GYGGxXela2SYjjxGXs4sdLUep3ykFVVfyaUnCf2sg=
-----END CERTIFICATE-----
`

// caq is testCA as a one-line YAML double-quoted string, so that test
// documents stay short and their line numbers easy to read.
var caq = strconv.Quote(testCA)

// doc builds a manifest from lines; {CA} stands for the quoted test CA.
func doc(lines ...string) string {
	return strings.ReplaceAll(strings.Join(lines, "\n")+"\n", "{CA}", caq)
}

// valid is a correct manifest; cases append to it.
var valid = []string{
	"apiVersion: nodespawn.dev/v1alpha1", // 1
	"kind: Node",                         // 2
	"kubernetes:",                        // 3
	"  apiServer: https://10.0.0.1:6443", // 4
	"  caCert: {CA}",                     // 5
	"  auth:",                            // 6
	"    bootstrapToken: abcdef.0123456789abcdef", // 7
}

// with is valid plus more lines (8 onwards).
func with(lines ...string) string {
	return doc(append(append([]string{}, valid...), lines...)...)
}

// want is one expected error: its line, the text its column points at
// (the column is where that text starts in the line), its path and a part
// of its message.
type want struct {
	line int
	at   string
	path string
	msg  string
}

func loadErrors(t *testing.T, name, src string) Errors {
	t.Helper()
	m, err := Load(name, []byte(src))
	if err == nil {
		t.Fatalf("Load accepted it: %+v", m)
	}
	var es Errors
	if !errors.As(err, &es) {
		t.Fatalf("error is %T, not manifest.Errors: %v", err, err)
	}
	return es
}

func checkErrors(t *testing.T, name, src string, es Errors, wants []want) {
	t.Helper()
	lines := strings.Split(src, "\n")
	if len(es) != len(wants) {
		t.Fatalf("got %d errors, want %d:\n%v", len(es), len(wants), es)
	}
	for i, w := range wants {
		e := es[i]
		col := 0
		if w.line >= 1 && w.line <= len(lines) {
			col = strings.Index(lines[w.line-1], w.at) + 1
		}
		if col == 0 {
			t.Fatalf("bad test: %q is not in line %d", w.at, w.line)
		}
		if e.File != name || e.Line != w.line || e.Col != col || e.Path != w.path || !strings.Contains(e.Message, w.msg) {
			t.Errorf("error %d:\n got %s:%d:%d: %s: %s\nwant %s:%d:%d: %s: ...%s...", i, e.File, e.Line, e.Col, e.Path, e.Message, name, w.line, col, w.path, w.msg)
		}
	}
}

func TestLoadErrors(t *testing.T) {
	for _, tc := range []struct {
		name  string
		src   string
		wants []want
	}{
		// Decoding.
		{"duplicate key", with("  apiServer: https://10.0.0.2:6443"),
			[]want{{8, "apiServer", "$.kubernetes.apiServer", `duplicate key "apiServer" (first at line 4)`}}},
		{"non-string key", with("  labels:", "    1: x"),
			[]want{{9, "1", "$.kubernetes.labels", `keys must be strings, this one is an integer (quote it: "1")`}}},
		{"null key", with("  labels:", "    ~: x"),
			[]want{{9, "~", "$.kubernetes.labels", `keys must be strings, this one is null (quote it: "~")`}}},
		{"mapping key", with("  labels:", "    ? [a]", "    : x"),
			[]want{{9, "[a]", "$.kubernetes.labels", "keys must be strings, this one is not a string"}}},
		{"bad merge", with("  labels:", "    <<: [1]"),
			[]want{{9, "1", "$.kubernetes.labels", "a merge key (<<) takes a mapping"}}},
		{"infinite number", with("  version: .inf"),
			[]want{{8, ".inf", "$.kubernetes.version", "not a finite number"}}},
		{"unknown tag", with("  version: !foo x"),
			[]want{{8, "!foo", "$.kubernetes.version", "unsupported YAML tag !foo"}}},

		// Schema.
		{"wrong apiVersion", doc("apiVersion: nodespawn.dev/v1", "kind: Node", "kubernetes:", "  apiServer: https://a:6443", "  caCert: {CA}", "  auth: {bootstrapToken: abcdef.0123456789abcdef}"),
			[]want{{1, "nodespawn.dev/v1", "$.apiVersion", `must be "nodespawn.dev/v1alpha1", not "nodespawn.dev/v1"`}}},
		{"missing apiVersion and kind", doc("kubernetes:", "  apiServer: https://a:6443", "  caCert: {CA}", "  auth: {bootstrapToken: abcdef.0123456789abcdef}"),
			[]want{
				{1, "kubernetes", "$", `missing required field "apiVersion"`},
				{1, "kubernetes", "$", `missing required field "kind"`},
			}},
		{"missing nested required", doc("apiVersion: nodespawn.dev/v1alpha1", "kind: Node", "kubernetes:", "  caCert: {CA}", "  auth: {bootstrapToken: abcdef.0123456789abcdef}"),
			[]want{{3, "kubernetes", "$.kubernetes", `missing required field "apiServer"`}}},
		{"unknown field with suggestion", with("  clusterDomian: cluster.local"),
			[]want{{8, "clusterDomian", "$.kubernetes.clusterDomian", `unknown field "clusterDomian" (did you mean "clusterDomain"?)`}}},
		{"unknown field listing the known", with("machine:", "  rootfs:", "    tarball: /x"),
			[]want{{10, "tarball", "$.machine.rootfs.tarball", `unknown field "tarball" (known fields: debootstrap, gpuImage, image, layout, maxUnpackedSize, minFreeSpace, plainHTTP, store)`}}},
		{"switch enum", with("machine:", "  kvm: yes"),
			[]want{{9, "yes", "$.machine.kvm", "must be one of auto, on, off"}}},
		{"number where a string goes", with("  version: 1.30"),
			[]want{{8, "1.30", "$.kubernetes.version", `must be a string, not a number (quote it: "1.30")`}}},
		{"null object", with("  labels:"),
			[]want{{8, "labels", "$.kubernetes.labels", "must be an object, not null (the key has no value)"}}},
		{"taint effect", with("  taints:", "    - {key: a, effect: NoSchedul}"),
			[]want{{9, "NoSchedul", "$.kubernetes.taints[0].effect", "must be one of NoSchedule, PreferNoSchedule, NoExecute"}}},
		{"taint without effect", with("  taints:", "    - key: a"),
			[]want{{9, "key", "$.kubernetes.taints[0]", `missing required field "effect"`}}},
		{"sysctl boolean", with("host:", "  sysctls:", "    vm.swappiness: true"),
			[]want{{10, "true", `$.host.sysctls["vm.swappiness"]`, "must be an integer or a string, not a boolean"}}},
		{"file mode too big", with("machine:", "  extra:", "    storage:", "      files:", "        - path: /etc/x", "          mode: 99999"),
			[]want{{13, "99999", "$.machine.extra.storage.files[0].mode", "must be at most 4095"}}},
		{"empty exec command", with("    exec: {command: ''}"),
			[]want{{8, "''", "$.kubernetes.auth.exec.command", "must not be empty"}}},

		// Machine.
		{"machine name underscore", with("machine:", "  name: kube_1"),
			[]want{{9, "kube_1", "$.machine.name", "only letters, digits, '-' and '.'"}}},
		{"machine name leading dot", with("machine:", "  name: .kube"),
			[]want{{9, ".kube", "$.machine.name", "must not start or end with '.'"}}},
		{"machine name leading hyphen", with("machine:", "  name: -kube"),
			[]want{{9, "-kube", "$.machine.name", "must not start or end with '-'"}}},
		{"machine name too long", with("machine:", "  name: "+strings.Repeat("k", 65)),
			[]want{{9, "kkk", "$.machine.name", "at most 64 characters"}}},
		{"machine name .host", with("machine:", "  name: .host"),
			[]want{{9, ".host", "$.machine.name", "names the host itself"}}},
		{"two rootfs sources", with("machine:", "  rootfs:", "    image: ghcr.io/a/b:1", "    debootstrap: {suite: noble}"),
			[]want{{9, "rootfs", "$.machine.rootfs", "give one rootfs source, not image/gpuImage and debootstrap"}}},
		{"image without tag", with("machine:", "  rootfs:", "    image: ghcr.io/a/b"),
			[]want{{10, "ghcr.io", "$.machine.rootfs.image", "pin the image with a tag or a digest"}}},
		{"image not a reference", with("machine:", "  rootfs:", "    gpuImage: 'Not A Ref'"),
			[]want{{10, "'Not", "$.machine.rootfs.gpuImage", "not a valid image reference"}}},
		{"relative layout", with("machine:", "  rootfs:", "    layout: {path: images/x}"),
			[]want{{10, "images/x", "$.machine.rootfs.layout.path", "must be an absolute path"}}},
		{"debootstrap mirror", with("machine:", "  rootfs:", "    debootstrap: {suite: noble, mirror: ftp://deb.example}"),
			[]want{{10, "ftp://", "$.machine.rootfs.debootstrap.mirror", "must be an http or https URL, not ftp"}}},
		{"plainHTTP with scheme", with("machine:", "  rootfs:", "    plainHTTP: [http://reg:5000]"),
			[]want{{10, "http://", "$.machine.rootfs.plainHTTP[0]", "must be a registry host or host:port"}}},
		{"relative bind", with("machine:", "  binds:", "    - source: data"),
			[]want{{10, "data", "$.machine.binds[0].source", "must be an absolute path"}}},
		{"bind with colon", with("machine:", "  binds:", "    - {source: /a, target: '/b:c'}"),
			[]want{{10, "'/b:c'", "$.machine.binds[0].target", "must not contain ':'"}}},
		{"unclean bind", with("machine:", "  binds:", "    - source: /a/../b"),
			[]want{{10, "/a/../b", "$.machine.binds[0].source", `must be a clean path (no '..', '.', '//' or trailing '/'); did you mean "/b"?`}}},
		{"syscall filter with space", with("machine:", "  systemCallFilter: ['bpf perf_event_open']"),
			[]want{{9, "'bpf", "$.machine.systemCallFilter[0]", "one system call or @group per entry"}}},

		// Kubernetes.
		{"version not semver", with("  version: v1.37"),
			[]want{{8, "v1.37", "$.kubernetes.version", "not a semantic version"}}},
		{"apiServer http", doc("apiVersion: nodespawn.dev/v1alpha1", "kind: Node", "kubernetes:", "  apiServer: http://10.0.0.1:6443", "  caCert: {CA}", "  auth: {bootstrapToken: abcdef.0123456789abcdef}"),
			[]want{{4, "http://", "$.kubernetes.apiServer", "must be an https URL"}}},
		{"apiServer relative", doc("apiVersion: nodespawn.dev/v1alpha1", "kind: Node", "kubernetes:", "  apiServer: 10.0.0.1:6443", "  caCert: {CA}", "  auth: {bootstrapToken: abcdef.0123456789abcdef}"),
			[]want{{4, "10.0", "$.kubernetes.apiServer", "must be an absolute https URL"}}},
		{"caCert not PEM", doc("apiVersion: nodespawn.dev/v1alpha1", "kind: Node", "kubernetes:", "  apiServer: https://a:6443", "  caCert: hello", "  auth: {bootstrapToken: abcdef.0123456789abcdef}"),
			[]want{{5, "hello", "$.kubernetes.caCert", "at least one CERTIFICATE block"}}},
		{"caCert with a broken certificate", doc("apiVersion: nodespawn.dev/v1alpha1", "kind: Node", "kubernetes:", "  apiServer: https://a:6443", `  caCert: "-----BEGIN CERTIFICATE-----\naGVsbG8=\n-----END CERTIFICATE-----\n"`, "  auth: {bootstrapToken: abcdef.0123456789abcdef}"),
			[]want{{5, `"-----`, "$.kubernetes.caCert", "certificate 1 does not parse"}}},
		{"caCert only a key", doc("apiVersion: nodespawn.dev/v1alpha1", "kind: Node", "kubernetes:", "  apiServer: https://a:6443", `  caCert: "-----BEGIN PRIVATE KEY-----\naGVsbG8=\n-----END PRIVATE KEY-----\n"`, "  auth: {bootstrapToken: abcdef.0123456789abcdef}"),
			[]want{{5, `"-----`, "$.kubernetes.caCert", "at least one CERTIFICATE block"}}},
		{"clusterDNS not an IP", with("  clusterDNS: [10.96.0.10, kube-dns]"),
			[]want{{8, "kube-dns", "$.kubernetes.clusterDNS[1]", "must be an IP address"}}},
		{"clusterDomain", with("  clusterDomain: Cluster_Local"),
			[]want{{8, "Cluster_Local", "$.kubernetes.clusterDomain", "must be a DNS domain"}}},
		{"nodeName uppercase", with("  nodeName: Worker1"),
			[]want{{8, "Worker1", "$.kubernetes.nodeName", "must be a DNS-1123 subdomain"}}},
		{"label refused by kubelet", with("  labels:", "    node-role.kubernetes.io/worker: ''"),
			[]want{{9, "node-role", `$.kubernetes.labels["node-role.kubernetes.io/worker"]`, `kubelet refuses to set label "node-role.kubernetes.io/worker"`}}},
		{"label in k8s.io refused", with("  labels:", "    foo.k8s.io/x: y"),
			[]want{{9, "foo.k8s.io", `$.kubernetes.labels["foo.k8s.io/x"]`, "the foo.k8s.io namespace is reserved"}}},
		{"label key bad name", with("  labels:", "    example.com/-x: y"),
			[]want{{9, "example.com", `$.kubernetes.labels["example.com/-x"]`, "must start and end with a letter or digit"}}},
		{"label key bad prefix", with("  labels:", "    Example.com/x: y"),
			[]want{{9, "Example.com", `$.kubernetes.labels["Example.com/x"]`, "prefix must be a DNS subdomain"}}},
		{"label value too long", with("  labels:", "    a: "+strings.Repeat("v", 64)),
			[]want{{9, "vvv", "$.kubernetes.labels.a", "label value must be at most 63 characters"}}},
		{"label value bad", with("  labels:", "    a: 'x y'"),
			[]want{{9, "'x y'", "$.kubernetes.labels.a", "label value may hold"}}},
		{"taint key and value", with("  taints:", "    - {key: 'a b', value: '-v', effect: NoExecute}"),
			[]want{
				{9, "'a b'", "$.kubernetes.taints[0].key", "taint key"},
				{9, "'-v'", "$.kubernetes.taints[0].value", "taint value"},
			}},
		{"token and exec", with("    exec: {command: /bin/cred}"),
			[]want{{6, "auth", "$.kubernetes.auth", "give bootstrapToken or exec, not both"}}},
		{"neither token nor exec", doc("apiVersion: nodespawn.dev/v1alpha1", "kind: Node", "kubernetes:", "  apiServer: https://a:6443", "  caCert: {CA}", "  auth: {}"),
			[]want{{6, "auth", "$.kubernetes.auth", "give bootstrapToken or exec"}}},
		{"exec env duplicate", doc("apiVersion: nodespawn.dev/v1alpha1", "kind: Node", "kubernetes:", "  apiServer: https://a:6443", "  caCert: {CA}", "  auth:", "    exec:", "      command: /bin/cred", "      env: [{name: A, value: x}, {name: A, value: y}]"),
			[]want{{9, "A, value: y", "$.kubernetes.auth.exec.env[1].name", `duplicate variable "A"`}}},
		{"exec apiVersion", doc("apiVersion: nodespawn.dev/v1alpha1", "kind: Node", "kubernetes:", "  apiServer: https://a:6443", "  caCert: {CA}", "  auth:", "    exec:", "      command: /bin/cred", "      apiVersion: v1"),
			[]want{{9, "v1", "$.kubernetes.auth.exec.apiVersion", "must be one of client.authentication.k8s.io/v1, client.authentication.k8s.io/v1beta1"}}},
		{"kubelet arg not a flag", with("  kubeletArgs: [max-pods=10]"),
			[]want{{8, "max-pods", "$.kubernetes.kubeletArgs[0]", "must be a flag"}}},
		{"sandbox image", with("  sandboxImage: pause"),
			[]want{{8, "pause", "$.kubernetes.sandboxImage", "not a valid image reference"}}},

		// Components.
		{"mirror not http", with("components:", "  mirror: file:///srv/mirror"),
			[]want{{9, "file:", "$.components.mirror", "must be an absolute http or https URL"}}},
		{"component version", with("components:", "  runc: {version: latest}"),
			[]want{{9, "latest", "$.components.runc.version", "not a semantic version"}}},
		{"component url", with("components:", "  kubelet: {url: /kubelet}"),
			[]want{{9, "/kubelet", "$.components.kubelet.url", "must be an absolute http or https URL"}}},
		{"component baseURL credentials", with("components:", "  crictl: {baseURL: 'https://u:p@mirror'}"),
			[]want{{9, "'https", "$.components.crictl.baseURL", "must not carry credentials"}}},
		{"component sha256", with("components:", "  containerd:", "    sha256: "+strings.Repeat("A", 64)),
			[]want{{10, "AAA", "$.components.containerd.sha256", "must be 64 lowercase hex digits"}}},

		// Host.
		{"sysctl name", with("host:", "  sysctls:", "    'vm overcommit': 1"),
			[]want{{10, "'vm", `$.host.sysctls["vm overcommit"]`, "not a sysctl name"}}},
		{"sysctl empty value", with("host:", "  sysctls:", "    vm.swappiness: ''"),
			[]want{{10, "''", `$.host.sysctls["vm.swappiness"]`, "sysctl value must be one line, not empty"}}},
		{"sysctl value with a carriage return", with("host:", "  sysctls:", `    vm.swappiness: "10\r"`, "    net.ipv4.tcp_rmem: \"4096\\t87380\\t6291456\""),
			[]want{{10, `"10`, `$.host.sysctls["vm.swappiness"]`, "without control characters"}}},
		{"module name", with("host:", "  modules: [br_netfilter, 'a/b']"),
			[]want{{9, "'a/b'", "$.host.modules[1]", "not a kernel module name"}}},

		// Extras.
		{"extra relative path", with("host:", "  extra:", "    storage:", "      directories: [{path: var/x}]"),
			[]want{{11, "var/x", "$.host.extra.storage.directories[0].path", "must be an absolute path"}}},
		{"extra unclean path", with("machine:", "  extra:", "    storage:", "      files: [{path: /etc/../../x}]"),
			[]want{{11, "/etc/", "$.machine.extra.storage.files[0].path", "must be a clean path"}}},
		{"extra append", with("machine:", "  extra:", "    storage:", "      files:", "        - path: /etc/x", "          append: [{source: 'data:,x'}]"),
			[]want{{13, "append", "$.machine.extra.storage.files[0].append", "append is not supported"}}},
		{"extra http without hash", with("machine:", "  extra:", "    storage:", "      files:", "        - path: /etc/x", "          contents: {source: 'https://example.com/x'}"),
			[]want{{13, "{source", "$.machine.extra.storage.files[0].contents.verification", "needs verification.hash"}}},
		{"extra s3 source", with("machine:", "  extra:", "    storage:", "      files:", "        - path: /etc/x", "          contents: {source: 's3://bucket/x'}"),
			[]want{{13, "'s3", "$.machine.extra.storage.files[0].contents.source", `unsupported source scheme "s3"`}}},
		{"extra bad data URL", with("machine:", "  extra:", "    storage:", "      files:", "        - path: /etc/x", "          contents: {source: 'data:;base64,@@'}"),
			[]want{{13, "'data", "$.machine.extra.storage.files[0].contents.source", "not a valid data: URL"}}},
		{"extra compression", with("host:", "  extra:", "    storage:", "      files:", "        - path: /etc/x", "          contents: {compression: xz, source: 'data:,x'}"),
			[]want{{13, "xz", "$.host.extra.storage.files[0].contents.compression", `compression must be "gzip" or empty`}}},
		{"extra link without target", with("host:", "  extra:", "    storage:", "      links: [{path: /etc/x}]"),
			[]want{{11, "{path", "$.host.extra.storage.links[0].target", "a link needs a target"}}},
		{"extra bad hash (ignition)", with("host:", "  extra:", "    storage:", "      files:", "        - path: /etc/x", "          contents: {source: 'https://e.com/x', verification: {hash: 'md5-00'}}"),
			[]want{{13, "'md5", "$.host.extra.storage.files[0].contents.verification.hash", "unrecognized hash function"}}},
		{"extra unit name", with("machine:", "  extra:", "    systemd:", "      units: [{name: foo}]"),
			[]want{{11, "foo", "$.machine.extra.systemd.units[0].name", "unit name needs a type suffix, like foo.service"}}},
		{"extra unit dropin (ignition)", with("machine:", "  extra:", "    systemd:", "      units: [{name: a.service, dropins: [{name: b.conf, contents: '[Service'}]}]"),
			[]want{{11, "'[Service'", "$.machine.extra.systemd.units[0].dropins[0].contents", "invalid unit content"}}},
		{"unknown field in an array item", with("host:", "  extra:", "    storage:", "      files: [{path: /etc/x, mdoe: 420}]"),
			[]want{{11, "mdoe", "$.host.extra.storage.files[0].mdoe", `unknown field "mdoe" (did you mean "mode"?)`}}},
		{"unknown field in an item of an item", with("machine:", "  extra:", "    systemd:", "      units: [{name: a.service, dropins: [{name: b.conf, content: x}]}]"),
			[]want{{11, "content", "$.machine.extra.systemd.units[0].dropins[0].content", `unknown field "content" (did you mean "contents"?)`}}},
		{"extra duplicate file (ignition)", with("machine:", "  extra:", "    storage:", "      files: [{path: /etc/x}, {path: /etc/x}]"),
			[]want{{11, "{path: /etc/x}]", "$.machine.extra.storage.files[1]", "duplicate entry defined"}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			es := loadErrors(t, "m.yaml", tc.src)
			checkErrors(t, "m.yaml", tc.src, es, tc.wants)
		})
	}
}

func TestLoadSyntax(t *testing.T) {
	for _, tc := range []struct {
		name, file, src string
		line, col       int
		msg             string
	}{
		{"empty", "m.yaml", "# nothing\n", 1, 1, "manifest is empty"},
		{"two documents", "m.yaml", "kind: Node\n---\nkind: Node\n", 2, 1, "more than one YAML document"},
		{"yaml syntax", "m.yaml", "kind: Node\nkubernetes: [\n", 2, 13, "invalid YAML"},
		{"tabs", "m.yaml", "kind: Node\n\tapiVersion: x\n", 2, 1, "invalid YAML"},
		// The parser says line 6 (the mapping's): the key on line 7 is
		// indented one space short.
		{"indent", "m.yaml", "apiVersion: nodespawn.dev/v1alpha1\nkind: Node\nmachine:\n  name: x\nkubernetes:\n  version: \"1.37\"\n apiServer: https://a:6443\n  nodeName: n\n", 7, 2, "did not find expected key"},
		// The parser says line 3; the bracket left open is on line 4.
		{"unclosed flow", "m.yaml", "apiVersion: nodespawn.dev/v1alpha1\nmachine:\n  name: x\nkind: [Node\nkubernetes:\n  version: \"1.37\"\n", 4, 7, "did not find expected ',' or ']'"},
		{"mapping value", "m.yaml", "kind: Node\nmachine: name: x\n", 2, 14, "mapping values are not allowed"},
		{"no token starts with", "m.yaml", "kind: Node\nmachine:\n  name: @x\n", 3, 9, "cannot start any token"},
		// A quoted string over two lines: a prefix ending inside it is
		// broken for its own reason, not the error's.
		{"after a multi-line string", "m.yaml", "a: \"multi\n  line\"\nb: @x\n", 3, 4, "cannot start any token"},
		{"json syntax", "m.json", "{\n  \"kind\": \"Node\",\n  \"apiVersion\" \"x\"\n}\n", 3, 16, "invalid JSON"},
		{"json truncated", "m.json", "{\"kind\": \"Node\"", 1, 16, "unexpected end of input"},
		{"nested too deep", "m.yaml", "a: " + strings.Repeat("[", 100) + strings.Repeat("]", 100) + "\n", 1, 68, "nested more than 64 levels deep"},
		{"alias bomb", "m.yaml", "a: &a [x, x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a, *a]\nc: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b, *b]\nd: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c, *c]\ne: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d, *d]\nf: [*e, *e, *e, *e, *e, *e, *e, *e, *e, *e]\n", 0, 0, "more than 200000 values"},
		{"not utf-8", "m.yaml", "kind: \xff\n", 1, 1, "not valid UTF-8"},
		{"null document", "m.yaml", "~\n", 1, 1, "must be an object, not null"},
		{"BOM", "m.json", "\xef\xbb\xbf{\"apiVersion\": \"nodespawn.dev/v1alpha1\", \"kind\": \"Node\", \"kubernetes\": 1}", 1, 72, "must be an object, not a number"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			es := loadErrors(t, tc.file, tc.src)
			if len(es) != 1 {
				t.Fatalf("want 1 error, got %v", es)
			}
			e := es[0]
			if tc.line == 0 && e.Line > 0 {
				tc.line, tc.col = e.Line, e.Col // position not asserted
			}
			if e.Line != tc.line || e.Col != tc.col || !strings.Contains(e.Message, tc.msg) {
				t.Errorf("got %d:%d %q, want %d:%d ...%s...", e.Line, e.Col, e.Message, tc.line, tc.col, tc.msg)
			}
			if text := strings.Split(tc.src, "\n")[max(tc.line, 1)-1]; tc.line > 0 && tc.col > 0 && len(text) < 80 {
				// The snippet shows the line, the caret under the column.
				num := strconv.Itoa(tc.line)
				caret := strings.Repeat(" ", len(num)) + " | " + strings.Repeat(" ", tc.col-1) + "^"
				if !strings.HasPrefix(e.Snippet, num+" | ") || !strings.Contains(e.Snippet, "\n"+caret) {
					t.Errorf("snippet:\n%s\nwant line %d with the caret at column %d", e.Snippet, tc.line, tc.col)
				}
			}
		})
	}
}

// TestSyntaxSnippetHidesSecrets: a syntax error on the line of a secret
// shows the line without the secret's value.
func TestSyntaxSnippetHidesSecrets(t *testing.T) {
	src := "kind: Node\nkubernetes:\n  auth:\n    exec:\n      env:\n        - name: T\n          value: s3cr3t-value: x\n"
	es := loadErrors(t, "m.yaml", src)
	if len(es) != 1 || es[0].Line != 7 || es[0].Snippet == "" || strings.Contains(es[0].Snippet, "s3cr3t") {
		t.Errorf("got %v\n%s", es, es[0].Snippet)
	}
}

func TestLoadJSON(t *testing.T) {
	// "\/" is a JSON escape YAML does not know: JSON must be read as JSON.
	src := `{
  "apiVersion": "nodespawn.dev\/v1alpha1",
  "kind": "Node",
  "kubernetes": {
    "apiServer": "https://10.0.0.1:6443",
    "caCert": ` + caq + `,
    "auth": {"bootstrapToken": "abcdef.0123456789abcdef"},
    "labels": {"a": "b", "a": "c"},
    "versoin": "v1.37.2",
    "clusterDNS": ["10.96.0.10", "dns"]
  }
}
`
	es := loadErrors(t, "m.json", src)
	checkErrors(t, "m.json", src, es, []want{
		{8, `"a": "c"`, "$.kubernetes.labels.a", `duplicate key "a" (first at line 8)`},
	})
	src = strings.Replace(src, `, "a": "c"`, "", 1)
	es = loadErrors(t, "m.json", src)
	checkErrors(t, "m.json", src, es, []want{
		{9, `"versoin"`, "$.kubernetes.versoin", `unknown field "versoin" (did you mean "version"?)`},
		{10, `"dns"`, "$.kubernetes.clusterDNS[1]", "must be an IP address"},
	})
	src = strings.Replace(strings.Replace(src, `"versoin"`, `"version"`, 1), `, "dns"`, "", 1)
	m, err := Load("m.json", []byte(src))
	if err != nil {
		t.Fatal(err)
	}
	if m.APIVersion != APIVersion || m.Kubernetes.Labels["a"] != "b" {
		t.Errorf("decoded %+v", m)
	}
}

// TestAllMistakesAtOnce: a user fixing a manifest at first boot must see
// every problem in one run, schema and semantic alike.
func TestAllMistakesAtOnce(t *testing.T) {
	src := doc(
		"apiVersion: nodespawn.dev/v1alpha1",
		"kind: Node",
		"machine:",
		"  gpu: maybe",
		"kubernetes:",
		"  apiServer: https://10.0.0.1:6443",
		"  caCert: {CA}",
		"  version: banana",
		"  labels: {node-role.kubernetes.io/worker: ''}",
		"  auth:",
		"    bootstrapToken: abcdef.0123456789abcdef",
	)
	es := loadErrors(t, "m.yaml", src)
	checkErrors(t, "m.yaml", src, es, []want{
		{4, "maybe", "$.machine.gpu", "must be one of auto, on, off"},
		{8, "banana", "$.kubernetes.version", "not a semantic version"},
		{9, "node-role", `$.kubernetes.labels["node-role.kubernetes.io/worker"]`, "kubelet refuses"},
	})
}

func TestErrorFormat(t *testing.T) {
	src := with("  version: 1.30", "machine: {kvm: maybe}")
	_, err := Load("user-data.yaml", []byte(src))
	wantText := `user-data.yaml:8:12: $.kubernetes.version: must be a string, not a number (quote it: "1.30")
8 |   version: 1.30
  |            ^
user-data.yaml:9:16: $.machine.kvm: must be one of auto, on, off
9 | machine: {kvm: maybe}
  |                ^`
	if err == nil || err.Error() != wantText {
		t.Fatalf("got:\n%v\nwant:\n%s", err, wantText)
	}
	var es Errors
	if !errors.As(err, &es) || es[0].Error() != `user-data.yaml:8:12: $.kubernetes.version: must be a string, not a number (quote it: "1.30")` {
		t.Fatalf("single error: %v", es)
	}
}

// TestTokenNeverShown: neither messages nor snippets repeat a token, even
// a malformed one or one under a misspelled key.
func TestTokenNeverShown(t *testing.T) {
	for _, src := range []string{
		doc("apiVersion: nodespawn.dev/v1alpha1", "kind: Node", "kubernetes:", "  apiServer: https://a:6443", "  caCert: {CA}", "  auth: {bootstrapToken: ABCDEF.0123456789ABCDEF}"),
		doc("apiVersion: nodespawn.dev/v1alpha1", "kind: Node", "kubernetes:", "  apiServer: https://a:6443", "  caCert: {CA}", "  auth: {bootstrapTokn: s3cret.0123456789abcdef}"),
		doc("apiVersion: nodespawn.dev/v1alpha1", "kind: Node", "kubernetes:", "  apiServer: https://a:6443", "  caCert: {CA}", "  auth: {bootstrapToken: 12345}"),
		`{"apiVersion": "nodespawn.dev/v1alpha1", "kind": "Node", "kubernetes": {"apiServer": "http://a", "caCert": "x", "auth": {"bootstrapToken": "abcdef.0123456789abcdef"}}}`,
		// URL passwords, token users and queries: refused, misspelled,
		// quoted, in one-line JSON with escaped slashes.
		doc("apiVersion: nodespawn.dev/v1alpha1", "kind: Node", "kubernetes:", "  apiServer: https://admin:12345@a:6443", "  caCert: {CA}", "  auth: {bootstrapToken: abcdef.0123456789abcdef}"),
		doc("apiVersion: nodespawn.dev/v1alpha1", "kind: Node", "kubernetes:", "  apiServer: https://a:6443", "  caCert: {CA}", "  auth: {bootstrapToken: abcdef.0123456789abcdef}",
			"components:", "  mirorr: 'https://s3cret.0123456789abcdef@m/x?12345'"),
		`{"apiVersion": "nodespawn.dev/v1alpha1", "kind": "Node", "kubernetes": {"apiServer": "https:\/\/u:12345@a:6443", "caCert": "x", "auth": {"bootstrapToken": "abcdef.0123456789abcdef"}}}`,
	} {
		_, err := Load("m.yaml", []byte(src))
		if err == nil {
			t.Fatalf("accepted %s", src)
		}
		text := err.Error()
		for _, secret := range []string{"ABCDEF.0123456789ABCDEF", "s3cret.0123456789abcdef", "12345", "abcdef.0123456789abcdef"} {
			if strings.Contains(text, secret) {
				t.Errorf("error shows the token %q:\n%s", secret, text)
			}
		}
	}
}

func TestAnchorsAndMerges(t *testing.T) {
	src := with(
		"  labels: &l",
		"    example.com/a: x",
		"    example.com/b: y",
		"host:",
		"  sysctls:",
		"    <<: {vm.swappiness: 10, fs.file-max: 5}",
		"    vm.swappiness: 1",
		"  modules: &m [overlay]",
		"machine:",
		"  systemCallFilter: *m",
	)
	m, err := Load("m.yaml", []byte(src))
	if err != nil {
		t.Fatal(err)
	}
	if got := m.Host.Sysctls; got["vm.swappiness"] != "1" || got["fs.file-max"] != "5" {
		t.Errorf("merge: explicit keys must win over merged ones: %v", got)
	}
	if len(m.Machine.SystemCallFilter) != 1 || m.Kubernetes.Labels["example.com/b"] != "y" {
		t.Errorf("aliases: %+v", m)
	}
}

func TestAcceptedValues(t *testing.T) {
	for name, extra := range map[string][]string{
		"kubelet labels": {"  labels:",
			"    kubernetes.io/hostname: w1",
			"    kubernetes.io/arch: amd64",
			"    beta.kubernetes.io/os: linux",
			"    topology.kubernetes.io/zone: z1",
			"    failure-domain.beta.kubernetes.io/region: r1",
			"    node.kubernetes.io/instance-type: big",
			"    node.kubernetes.io/pool: a",
			"    kubelet.kubernetes.io/x: y",
			"    team.node.kubernetes.io/x: y",
			"    example.com/kubernetes.io: y",
			"    plain: ''"},
		"machine name":      {"machine: {name: Kube-1.example}"},
		"semver prerelease": {"  version: 1.38.0-rc.1"},
		"ipv6 dns":          {"  clusterDNS: ['fd00::10']"},
		"image by digest":   {"machine:", "  rootfs:", "    image: ghcr.io/a/b@sha256:" + strings.Repeat("ab", 32)},
		"big sysctl":        {"host: {sysctls: {kernel.shmmax: 18446744073692774399, net.ipv4.conf.eth0/1.rp_filter: '0'}}"},
		"http with hash": {"host:", "  extra:", "    storage:", "      files:", "        - path: /etc/x", "          contents:",
			"            source: https://example.com/x",
			"            verification: {hash: sha256-" + strings.Repeat("0", 64) + "}"},
	} {
		t.Run(name, func(t *testing.T) {
			if _, err := Load("m.yaml", []byte(with(extra...))); err != nil {
				t.Fatal(err)
			}
		})
	}
}

func TestDefaults(t *testing.T) {
	m, err := Load("m.yaml", []byte(with()))
	if err != nil {
		t.Fatal(err)
	}
	mc, k, c, h := m.Machine, m.Kubernetes, m.Components, m.Host
	for _, x := range []struct{ name, got, want string }{
		{"machine.name", mc.Name, DefaultMachineName},
		{"image", mc.Rootfs.Image, DefaultImage},
		{"gpuImage", mc.Rootfs.GPUImage, DefaultGPUImage},
		{"gpu", string(mc.GPU), "auto"},
		{"kvm", string(mc.KVM), "auto"},
		{"bpffs", string(mc.BPFFS), "on"},
		{"version", k.Version, "v1.37.2"},
		{"clusterDomain", k.ClusterDomain, "cluster.local"},
		{"clusterDNS", strings.Join(k.ClusterDNS, ","), "10.96.0.10"},
		{"sandboxImage", k.SandboxImage, "registry.k8s.io/pause:3.10.1"},
		{"nodeName", k.NodeName, ""},
		{"containerd", c.Containerd.Version, "2.4.2"},
		{"runc", c.Runc.Version, "1.5.3"},
		{"cniPlugins", c.CNIPlugins.Version, "1.10.0"},
		{"crictl", c.Crictl.Version, "1.37.0"},
		{"kubelet", c.Kubelet.Version, "1.37.2"},
		{"kubectl", c.Kubectl.Version, "1.37.2"},
		{"kubeProxy", c.KubeProxy.Version, "1.37.2"},
	} {
		if x.got != x.want {
			t.Errorf("%s = %q, want %q", x.name, x.got, x.want)
		}
	}
	if h.NftablesFlush == nil || !*h.NftablesFlush || h.DisableSwap == nil || !*h.DisableSwap ||
		h.InstallPackages == nil || !*h.InstallPackages || h.AptGuard {
		t.Errorf("host defaults: %+v", h)
	}

	// Normalised spellings, and defaults that follow other fields.
	m, err = Load("m.yaml", []byte(with(
		"  version: 1.38.1",
		"machine: {bpffs: auto, rootfs: {gpuImage: 'r.io/g:1'}}",
		"components: {runc: {version: v1.5.4}}",
		"host: {nftablesFlush: false}",
	)))
	if err != nil {
		t.Fatal(err)
	}
	if m.Kubernetes.Version != "v1.38.1" || m.Components.Kubelet.Version != "1.38.1" || m.Components.Runc.Version != "1.5.4" {
		t.Errorf("versions: %q %q %q", m.Kubernetes.Version, m.Components.Kubelet.Version, m.Components.Runc.Version)
	}
	if m.Machine.BPFFS != SwitchOn || m.Machine.Rootfs.Image != DefaultImage || m.Machine.Rootfs.GPUImage != "r.io/g:1" {
		t.Errorf("machine: %+v", m.Machine)
	}
	if *m.Host.NftablesFlush {
		t.Errorf("nftablesFlush: false was overridden")
	}

	m, err = Load("m.yaml", []byte(doc("apiVersion: nodespawn.dev/v1alpha1", "kind: Node", "kubernetes:", "  apiServer: https://a:6443", "  caCert: {CA}", "  auth: {exec: {command: /c, env: [{name: A, value: b}]}}", "machine: {rootfs: {layout: {path: /l}}}")))
	if err != nil {
		t.Fatal(err)
	}
	if m.Kubernetes.Auth.Exec.APIVersion != DefaultExecAPIVersion || m.Machine.Rootfs.Layout.Reference != "latest" || m.Machine.Rootfs.Image != "" {
		t.Errorf("exec/layout defaults: %+v %+v", m.Kubernetes.Auth.Exec, m.Machine.Rootfs)
	}
	before := *m
	ApplyDefaults(m)
	if m.Kubernetes.Version != before.Kubernetes.Version || m.Machine.Rootfs.Image != "" {
		t.Errorf("ApplyDefaults is not idempotent")
	}
}

func TestUnknownFieldHints(t *testing.T) {
	for _, tc := range []struct {
		name    string
		allowed []string
		want    string
	}{
		{"apiserver", []string{"apiServer", "auth", "caCert"}, `unknown field "apiserver" (did you mean "apiServer"?)`},
		{"tokn", []string{"token", "exec"}, `unknown field "tokn" (did you mean "token"?)`},
		{"zzz", []string{"a", "b"}, `unknown field "zzz" (known fields: a, b)`},
		{"zzz", strings.Split("a b c d e f g h i", " "), `unknown field "zzz"`},
	} {
		if got := unknownField(tc.name, tc.allowed); got != tc.want {
			t.Errorf("unknownField(%q) = %s, want %s", tc.name, got, tc.want)
		}
	}
}

// TestGPUDefaultRuntime: "nvidia", spelt out or left out, is one manifest
// with the digest manifests had before the field existed; "runc" is kept
// and changes the digest; anything else is refused where it is written.
func TestGPUDefaultRuntime(t *testing.T) {
	digest := func(src string) string {
		t.Helper()
		m, err := Load("m.yaml", []byte(src))
		if err != nil {
			t.Fatal(err)
		}
		d, err := m.Digest()
		if err != nil {
			t.Fatal(err)
		}
		return d.String()
	}
	plain := digest(with())
	if got := digest(with("machine:", "  gpuDefaultRuntime: nvidia")); got != plain {
		t.Errorf("gpuDefaultRuntime: nvidia has digest %s, want the default's %s", got, plain)
	}
	m, err := Load("m.yaml", []byte(with("machine:", "  gpuDefaultRuntime: runc")))
	if err != nil {
		t.Fatal(err)
	}
	if m.Machine.GPUDefaultRuntime != RuntimeRunc {
		t.Errorf("gpuDefaultRuntime = %q, want runc", m.Machine.GPUDefaultRuntime)
	}
	if digest(with("machine:", "  gpuDefaultRuntime: runc")) == plain {
		t.Error("gpuDefaultRuntime: runc has the default's digest")
	}
	es := loadErrors(t, "m.yaml", with("machine:", "  gpuDefaultRuntime: crun"))
	if len(es) != 1 || es[0].Path != "$.machine.gpuDefaultRuntime" {
		t.Errorf("gpuDefaultRuntime: crun: %v, want one error at $.machine.gpuDefaultRuntime", es)
	}
}

// TestLoadConcurrently: the compiled schema is shared, and the library
// caches on it (a pattern's regexp, compiled on its first use), so Load
// validates under a lock; go test -race fails this test without it.
func TestLoadConcurrently(t *testing.T) {
	var wg sync.WaitGroup
	for range 8 {
		wg.Go(func() {
			if _, err := Load("m.yaml", []byte(with())); err != nil {
				t.Error(err)
			}
		})
	}
	wg.Wait()
}
