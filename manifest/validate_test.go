package manifest_test

import (
	"errors"
	"flag"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	jsonpath "github.com/coreos/vcontext/path"

	"github.com/nodespawn/nodespawn/manifest"
	"github.com/nodespawn/nodespawn/plan"
	"github.com/nodespawn/nodespawn/render"
)

var update = flag.Bool("update", false, "rewrite testdata/invalid from the table in validate_test.go")

// This file tests what nodespawn validate promises: every manifest apply
// refuses as bad input is refused by validate first, at the same line,
// column and JSON path. It is an external test because validate is
// manifest.Load followed by render.Check, and render imports manifest.

// ca is a throwaway self-signed CA as a one-line YAML string.
var ca = strconv.Quote(`-----BEGIN CERTIFICATE-----
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
`)

// node is a valid manifest (lines 1-7) followed by lines, from line 8 on.
func node(lines ...string) string {
	return strings.Join(append([]string{
		"apiVersion: nodespawn.dev/v1alpha1",
		"kind: Node",
		"kubernetes:",
		"  apiServer: https://10.0.0.1:6443",
		"  caCert: " + ca,
		"  auth:",
		"    bootstrapToken: abcdef.0123456789abcdef",
	}, lines...), "\n") + "\n"
}

// machineExtra and hostExtra open an extra section at line 8; what follows
// starts at line 11.
func machineExtra(section string, lines ...string) string {
	return node(append([]string{"machine:", "  extra:", "    " + section + ":"}, lines...)...)
}

func hostExtra(section string, lines ...string) string {
	return node(append([]string{"host:", "  extra:", "    " + section + ":"}, lines...)...)
}

// want is one expected problem: its line, the text its column points at,
// its JSON path and a part of its message.
type want struct {
	line int
	at   string
	path string
	msg  string
}

// onGPUHost marks a case whose clash exists only on hosts with an NVIDIA
// GPU: apply refuses it there, on the GPU reference host.
const onGPUHost = "-on-gpu-host"

// badManifests are manifests apply refuses as bad input, each with every
// problem validate must report. The name is the file name under
// testdata/invalid, which main_test.go runs through the command line.
var badManifests = []struct {
	name  string
	src   string
	wants []want
}{
	// Kubelet flags travel in one Environment= value, split at whitespace.
	{"kubelet-arg-space", node("  kubeletArgs: ['--max-pods 10']"),
		[]want{{8, "'--max-pods", "$.kubernetes.kubeletArgs[0]", "one flag per entry, without spaces"}}},
	{"kubelet-arg-tab-and-newline", node(`  kubeletArgs: [--v=2, "--a=1\t--b=2", "--c=1\n--d=2"]`),
		[]want{
			{8, `"--a`, "$.kubernetes.kubeletArgs[1]", "without spaces, tabs, newlines"},
			{8, `"--c`, "$.kubernetes.kubeletArgs[2]", "without spaces, tabs, newlines"},
		}},
	{"kubelet-arg-quote", node(`  kubeletArgs: ['--node-ip="10.0.0.5"']`),
		[]want{{8, "'--node-ip", "$.kubernetes.kubeletArgs[0]", "must not contain quotes or backslashes"}}},
	{"kubelet-arg-backslash", node(`  kubeletArgs: ['--root-dir=/var/lib/kube\let']`),
		[]want{{8, "'--root-dir", "$.kubernetes.kubeletArgs[0]", "must not contain quotes or backslashes"}}},
	{"kubelet-arg-not-a-flag", node("  kubeletArgs: [--max-pods=10, -v=2]"),
		[]want{{8, "-v=2", "$.kubernetes.kubeletArgs[1]", "must be a flag like --max-pods=200"}}},

	// The fields of a real GPU host: DNS, node IP, RDMA, containerd.
	{"dns-loopback-nameserver", node("machine:", "  dns:", "    nameservers: [127.0.0.53, 10.0.0.2, not-an-ip]", "    options: ['ndots 2']"),
		[]want{
			{10, "127.0.0.53", "$.machine.dns.nameservers[0]", "cannot be reached from a pod's network namespace"},
			{10, "not-an-ip", "$.machine.dns.nameservers[2]", "must be an IP address"},
			{11, "'ndots", "$.machine.dns.options[0]", "one resolv.conf option per entry"},
		}},
	{"node-ip-not-an-address", node("  nodeIP: eth0"),
		[]want{{8, "eth0", "$.kubernetes.nodeIP", `"eth0" is neither an IP address nor a CIDR`}}},
	{"node-ip-two-of-a-family", node("  nodeIP: 10.0.0.0/8,192.168.0.0/16"),
		[]want{{8, "10.0.0.0/8", "$.kubernetes.nodeIP", "dual stack takes one IPv4 and one IPv6"}}},
	// What kubelet or systemd would refuse later: a zone in an address,
	// control characters in what lands in unit files.
	{"node-ip-zone", node("  nodeIP: fe80::1%eth0"),
		[]want{{8, "fe80::1%eth0", "$.kubernetes.nodeIP", `"fe80::1%eth0": kubelet takes a node IP without a zone`}}},
	{"node-ip-zone-with-a-newline", node(`  nodeIP: "10.0.0.0/8,fe80::1%x\nExecStartPre=/bin/true"`),
		[]want{{8, `"10.0.0.0/8`, "$.kubernetes.nodeIP", "kubelet takes a node IP without a zone"}}},
	{"cluster-dns-zone", node("  clusterDNS: ['fe80::a%eth0']"),
		[]want{{8, "'fe80::a%eth0'", "$.kubernetes.clusterDNS[0]", "must be an IP address without a zone (%eth0)"}}},
	{"dns-nameserver-zone-and-control-character", node("machine:", "  dns:", "    nameservers: ['fe80::53%eth0']", `    options: ["ndots:2\r"]`),
		[]want{
			{10, "'fe80::53%eth0'", "$.machine.dns.nameservers[0]", "must be an address without a zone (%eth0): the zone names a host interface"},
			{11, `"ndots`, "$.machine.dns.options[0]", "one resolv.conf option per entry"},
		}},
	{"kubelet-arg-nul", node(`  kubeletArgs: ["--v=2\0"]`),
		[]want{{8, `"--v=2`, "$.kubernetes.kubeletArgs[0]", "other control characters"}}},
	{"bind-control-character-and-backslash", node("machine:", "  binds:", `    - {source: "/srv/a\tb", target: '/mnt/a\b'}`),
		[]want{
			{10, `"/srv`, "$.machine.binds[0].source", `must not contain ':', '\' or control characters`},
			{10, `'/mnt`, "$.machine.binds[0].target", `must not contain ':', '\' or control characters`},
		}},
	{"system-call-filter-nul", node("machine:", `  systemCallFilter: ["bpf\0"]`),
		[]want{{9, `"bpf`, "$.machine.systemCallFilter[0]", "without spaces or control characters"}}},
	{"unit-contents-nul", hostExtra("systemd", `      units: [{name: a.service, contents: "[Service]\0ExecStart=/bin/true\n", dropins: [{name: b.conf, contents: "\0"}]}]`),
		[]want{
			{11, `"[Service]`, "$.host.extra.systemd.units[0].contents", "unit a.service must not contain a NUL byte: systemd ends a unit file line there"},
			{11, `"\0"`, "$.host.extra.systemd.units[0].dropins[0].contents", "drop-in b.conf must not contain a NUL byte"},
		}},
	{"node-ip-loopback", node("  nodeIP: 127.0.0.1"),
		[]want{{8, "127.0.0.1", "$.kubernetes.nodeIP", "a node IP must be a unicast address"}}},
	{"rdma-boolean", node("machine:", "  rdma: true"),
		[]want{{9, "true", "$.machine.rdma", `write rdma: "on" (quoted)`}}},
	{"containerd-too-old", node("components:", "  containerd: {version: 1.7.24}"),
		[]want{{9, "1.7.24", "$.components.containerd.version", "containerd 1.7.24 is too old"}}},
	{"rootfs-sizes", node("machine:", "  rootfs:", "    maxUnpackedSize: 20GB", "    minFreeSpace: 1.5Gi"),
		[]want{
			{10, "20GB", "$.machine.rootfs.maxUnpackedSize", `"20GB" is not a size like 20Gi`},
			{11, "1.5Gi", "$.machine.rootfs.minFreeSpace", `"1.5Gi" is not a size like 20Gi`},
		}},
	{"rootfs-max-unpacked-without-unit", node("machine:", "  rootfs:", "    maxUnpackedSize: '20'"),
		[]want{{10, "'20'", "$.machine.rootfs.maxUnpackedSize", "must be at least 1048576 bytes"}}},
	{"grace-period-not-a-duration", node("  shutdownGracePeriod: 30"),
		[]want{{8, "30", "$.kubernetes.shutdownGracePeriod", "must be a string"}}},
	{"report-plain-http", node("report:", "  url: http://reports.example.com/nodes", "  tokenFile: run/token"),
		[]want{
			{9, "http://", "$.report.url", "must be an https URL (the report carries the node's outcome and a bearer token)"},
			{10, "run/token", "$.report.tokenFile", "must be an absolute path"},
		}},
	{"upgrade-timeouts", node("upgrade:", "  readyTimeout: 2s", "  stopTimeout: soon"),
		[]want{
			{9, "2s", "$.upgrade.readyTimeout", "must be at least 10s"},
			{10, "soon", "$.upgrade.stopTimeout", "must be a duration like 90s"},
		}},
	{"stop-timeout-within-grace-period", node("  shutdownGracePeriod: 2m", "upgrade:", "  stopTimeout: 90s"),
		[]want{{10, "90s", "$.upgrade.stopTimeout", "not longer than kubernetes.shutdownGracePeriod (2m0s)"}}},
	{"machine-name-without-room-for-its-pair", node("machine:", "  name: "+strings.Repeat("m", 63)),
		[]want{{9, strings.Repeat("m", 63), "$.machine.name", "upgrades alternate between " + strings.Repeat("m", 63) + " and " + strings.Repeat("m", 63) + "-b"}}},
	{"bind-over-node-state", node("machine:", "  binds:", "    - source: /srv/kubelet", "      target: /var/lib/kubelet"),
		[]want{{10, "source", "$.machine.binds[0]", "binds over /var/lib/kubelet, which nodespawn binds from /var/lib/nodespawn/node/kubelet"}}},

	// Bind= separates source and target with ':'.
	{"bind-source-colon", node("machine:", "  binds:", "    - source: /srv/a:b"),
		[]want{{10, "/srv/a:b", "$.machine.binds[0].source", "must not contain ':'"}}},
	{"bind-target-colon", node("machine:", "  binds:", "    - {source: /srv, target: '/mnt/x:y'}"),
		[]want{{10, "'/mnt/x:y'", "$.machine.binds[0].target", "must not contain ':'"}}},

	// Unit and drop-in names are file names in the unit directory.
	{"unit-name-traversal", hostExtra("systemd", "      units: [{name: ../../../etc/cron.d/x.service, contents: x}]"),
		[]want{{11, "../", "$.host.extra.systemd.units[0].name", "unit name must not contain '/'"}}},
	{"unit-name-empty", machineExtra("systemd", "      units: [{name: '', contents: x}]"),
		[]want{{11, "''", "$.machine.extra.systemd.units[0].name", "unit name must not be empty"}}},
	{"unit-name-no-type", machineExtra("systemd", "      units: [{name: kubelet, mask: true}]"),
		[]want{{11, "kubelet", "$.machine.extra.systemd.units[0].name", "unit name needs a type suffix, like foo.service"}}},
	{"unit-name-only-type", machineExtra("systemd", "      units: [{name: .service, mask: true}]"),
		[]want{{11, ".service", "$.machine.extra.systemd.units[0].name", "needs a name before its type suffix"}}},
	{"unit-name-bad-type", hostExtra("systemd", "      units: [{name: foo.conf, contents: x}, {name: foo.snapshot, contents: x}]"),
		[]want{
			{11, "foo.conf", "$.host.extra.systemd.units[0].name", `".conf" is not a unit type; want one of .service, .socket`},
			{11, "foo.snapshot", "$.host.extra.systemd.units[1].name", `".snapshot" is not a unit type`},
		}},
	{"unit-name-space", machineExtra("systemd", "      units: [{name: 'my unit.service', contents: x}]"),
		[]want{{11, "'my unit", "$.machine.extra.systemd.units[0].name", `unit name may hold only ASCII letters, digits, ':', '-', '_', '.', '\' and '@', not ' '`}}},
	{"unit-name-non-ascii", hostExtra("systemd", "      units: [{name: café.service, contents: x}]"),
		[]want{{11, "café", "$.host.extra.systemd.units[0].name", `not 'é'`}}},
	{"unit-name-leading-at", hostExtra("systemd", "      units: [{name: '@foo.service', contents: x}]"),
		[]want{{11, "'@foo", "$.host.extra.systemd.units[0].name", "must not start with '@'"}}},
	{"unit-name-too-long", hostExtra("systemd", "      units: [{name: "+strings.Repeat("u", 248)+".service, contents: x}]"),
		[]want{{11, "uuu", "$.host.extra.systemd.units[0].name", "unit name must be at most 255 characters"}}},
	{"dropin-name-not-conf", machineExtra("systemd", "      units: [{name: kubelet.service, dropins: [{name: 20-limits, contents: x}]}]"),
		[]want{{11, "20-limits", "$.machine.extra.systemd.units[0].dropins[0].name", `drop-in name must end in ".conf"`}}},
	{"dropin-name-slash", hostExtra("systemd", "      units: [{name: a.service, dropins: [{name: ../../b.service.d/x.conf, contents: x}]}]"),
		[]want{{11, "../../b", "$.host.extra.systemd.units[0].dropins[0].name", "drop-in name must not contain '/'"}}},
	{"dropin-name-hidden", machineExtra("systemd", "      units: [{name: a.service, dropins: [{name: .conf, contents: x}]}]"),
		[]want{{11, ".conf", "$.machine.extra.systemd.units[0].dropins[0].name", "systemd skips hidden files"}}},

	// Extra paths are absolute and clean, hard link targets too.
	{"file-path-relative", machineExtra("storage", "      files: [{path: etc/motd}]"),
		[]want{{11, "etc/motd", "$.machine.extra.storage.files[0].path", "must be an absolute path"}}},
	{"directory-path-unclean", hostExtra("storage", "      directories: [{path: /srv/data/}]"),
		[]want{{11, "/srv/data/", "$.host.extra.storage.directories[0].path", `must be a clean path (no '..', '.', '//' or trailing '/'); did you mean "/srv/data"?`}}},
	{"link-path-relative", machineExtra("storage", "      links: [{path: usr/bin/k, target: kubectl}]"),
		[]want{{11, "usr/bin/k", "$.machine.extra.storage.links[0].path", "must be an absolute path"}}},
	{"link-path-unclean", hostExtra("storage", "      links: [{path: /usr/local/bin/../k, target: /bin/true}]"),
		[]want{{11, "/usr/local/bin/../k", "$.host.extra.storage.links[0].path", `did you mean "/usr/local/k"?`}}},
	{"hard-link-target-relative", machineExtra("storage", "      links: [{path: /etc/k, target: ../../etc/shadow, hard: true}]"),
		[]want{{11, "../../etc/shadow", "$.machine.extra.storage.links[0].target", "a hard link's target must be an absolute path"}}},
	{"hard-link-target-unclean", hostExtra("storage", "      links: [{path: /etc/k, target: /etc/./kubernetes, hard: true}]"),
		[]want{{11, "/etc/./kubernetes", "$.host.extra.storage.links[0].target", `did you mean "/etc/kubernetes"?`}}},
	{"directory-root", hostExtra("storage", "      directories: [{path: /, mode: 0700}]"),
		[]want{{11, "/,", "$.host.extra.storage.directories[0].path", "must name something below /"}}},

	// Extras that clash with what nodespawn writes: validate renders the
	// plan on reference hosts and names the step that owns the path.
	{"machine-file-clashes", machineExtra("storage", "      files:", "        - path: /etc/motd", "        - path: /etc/hostname"),
		[]want{{13, "/etc/hostname", "$.machine.extra.storage.files[1].path", "/etc/hostname is also created by nodespawn (step machine:file:/etc/hostname)"}}},
	{"host-file-clashes", hostExtra("storage", "      files: [{path: /etc/systemd/nspawn/kube1.nspawn}]"),
		[]want{{11, "/etc/systemd", "$.host.extra.storage.files[0].path", "is also created by nodespawn (step host:file:/etc/systemd/nspawn/kube1.nspawn)"}}},
	{"machine-name-changes-the-clash", node("machine:", "  name: web", "  extra:", "    storage:", "      directories: [{path: /etc}]", "host:", "  extra:", "    storage:", "      files: [{path: /etc/systemd/nspawn/web.nspawn}]"),
		[]want{{16, "/etc/systemd", "$.host.extra.storage.files[0].path", "(step host:file:/etc/systemd/nspawn/web.nspawn)"}}},
	{"machine-directory-clashes", machineExtra("storage", "      directories: [{path: /etc/kubernetes/manifests, mode: 0755}]"),
		[]want{{11, "/etc/kubernetes/manifests", "$.machine.extra.storage.directories[0].path", "(step machine:directory:/etc/kubernetes/manifests)"}}},
	{"machine-file-under-node-state", machineExtra("storage", "      files: [{path: /var/lib/kubelet/config.yaml}]"),
		[]want{{11, "/var/lib/kubelet", "$.machine.extra.storage.files[0].path", "/var/lib/kubelet/config.yaml is inside /var/lib/kubelet, where the node's state is bound"}}},
	{"machine-file-replaces-a-binary", machineExtra("storage", "      files: [{path: /usr/local/bin/kubelet}]"),
		[]want{{11, "/usr/local", "$.machine.extra.storage.files[0].path", "/usr/local/bin/kubelet is also created by nodespawn (step rootfs:download:kubelet)"}}},
	{"machine-file-where-a-directory-goes", machineExtra("storage", "      files: [{path: /etc/containerd}]"),
		[]want{{11, "/etc/containerd", "$.machine.extra.storage.files[0].path", "/etc/containerd would be a file, but nodespawn (step machine:"}}},
	{"machine-link-where-a-directory-goes", machineExtra("storage", "      links: [{path: /etc/kubernetes/pki, target: /srv/pki}]"),
		[]want{{11, "/etc/kubernetes/pki", "$.machine.extra.storage.links[0].path", "/etc/kubernetes/pki would be a link, but nodespawn (step machine:file:/etc/kubernetes/pki/ca.crt) needs a directory there"}}},
	{"machine-file-inside-a-generated-file", machineExtra("storage", "      files: [{path: /etc/hostname/x}]"),
		[]want{{11, "/etc/hostname/x", "$.machine.extra.storage.files[0].path", "/etc/hostname/x is inside /etc/hostname, which nodespawn (step machine:file:/etc/hostname) makes a file, not a directory"}}},
	{"host-file-inside-the-rootfs", hostExtra("storage", "      files: [{path: /var/lib/machines/kube1/etc/motd}]"),
		[]want{{11, "/var/lib/machines", "$.host.extra.storage.files[0].path", "is inside machine kube1's root filesystem, which nodespawn (step rootfs:image) puts in place after the host phase; put it under machine.extra"}}},
	{"host-directory-is-the-rootfs", hostExtra("storage", "      directories: [{path: /var/lib/machines/kube1}]"),
		[]want{{11, "/var/lib/machines", "$.host.extra.storage.directories[0].path", "(step rootfs:image)"}}},
	// The mount unit of a layer-store root belongs to the image step
	// whatever the store (apply writes it, or removes it for a flat root).
	{"host-file-at-the-mount-unit", hostExtra("storage", "      files: [{path: /etc/systemd/system/var-lib-machines-kube1.mount}]"),
		[]want{{11, "/etc/systemd", "$.host.extra.storage.files[0].path", "/etc/systemd/system/var-lib-machines-kube1.mount is also created by nodespawn (step rootfs:image)"}}},
	{"host-file-at-the-mount-unit-of-a-flat-root", hostExtra("storage", "      files: [{path: /etc/systemd/system/var-lib-machines-kube1.mount}]", "machine: {rootfs: {store: flat}}"),
		[]want{{11, "/etc/systemd", "$.host.extra.storage.files[0].path", "(step rootfs:image)"}}},
	{"host-unit-is-the-mount-unit", hostExtra("systemd", "      units: [{name: var-lib-machines-kube1.mount, contents: '[Mount]'}]"),
		[]want{{11, "var-lib-machines-kube1.mount", "$.host.extra.systemd.units[0].name", "(step rootfs:image)"}}},
	// The alternate machine's paths: an upgrade prepares it with the same
	// host extras.
	{"host-file-at-the-alternate-nspawn-file", hostExtra("storage", "      files: [{path: /etc/systemd/nspawn/kube2.nspawn}]"),
		[]want{{11, "/etc/systemd", "$.host.extra.storage.files[0].path", "/etc/systemd/nspawn/kube2.nspawn is also created by nodespawn (step host:file:/etc/systemd/nspawn/kube2.nspawn of machine kube2, which upgrades alternate with kube1)"}}},
	{"host-file-at-the-alternate-mount-unit", hostExtra("storage", "      files: [{path: /etc/systemd/system/var-lib-machines-kube2.mount}]"),
		[]want{{11, "/etc/systemd", "$.host.extra.storage.files[0].path", "(step rootfs:image of machine kube2, which upgrades alternate with kube1)"}}},
	{"host-link-at-the-alternate-boot-link", hostExtra("storage", "      links: [{path: /etc/systemd/system/machines.target.wants/systemd-nspawn@kube2.service, target: /dev/null}]"),
		[]want{{11, "/etc/systemd", "$.host.extra.storage.links[0].path", "(step start:link:/etc/systemd/system/machines.target.wants/systemd-nspawn@kube2.service of machine kube2"}}},
	{"host-file-inside-the-alternate-rootfs", hostExtra("storage", "      files: [{path: /var/lib/machines/kube2/etc/motd}]"),
		[]want{{11, "/var/lib/machines", "$.host.extra.storage.files[0].path", "is inside machine kube2's root filesystem, which nodespawn (step rootfs:image of machine kube2, which upgrades alternate with kube1) puts in place after the host phase"}}},
	{"host-file-over-the-alternate-drop-in-dir", hostExtra("storage", "      files: [{path: /etc/systemd/system/systemd-nspawn@web-b.service.d}]", "machine: {name: web}"),
		[]want{{11, "/etc/systemd", "$.host.extra.storage.files[0].path", "would be a file, but nodespawn (step host:file:/etc/systemd/system/systemd-nspawn@web-b.service.d/override.conf of machine web-b, which upgrades alternate with web) needs a directory there"}}},
	{"machine-unit-clashes", machineExtra("systemd", "      units:", "        - name: containerd.service", `          contents: "[Service]\nExecStart=/bin/true\n[Install]\nWantedBy=multi-user.target\n"`, "          enabled: true"),
		[]want{
			{12, "containerd.service", "$.machine.extra.systemd.units[0].name", "/etc/systemd/system/containerd.service is also created by nodespawn (step machine:file:/etc/systemd/system/containerd.service)"},
			{14, "true", "$.machine.extra.systemd.units[0].enabled", "(step machine:link:/etc/systemd/system/multi-user.target.wants/containerd.service)"},
		}},
	{"machine-dropin-clashes", machineExtra("systemd", "      units: [{name: kubelet.service, dropins: [{name: 10-nodespawn.conf, contents: x}]}]"),
		[]want{{11, "10-nodespawn.conf", "$.machine.extra.systemd.units[0].dropins[0].name", "(step machine:file:/etc/systemd/system/kubelet.service.d/10-nodespawn.conf)"}}},
	{"machine-mask-clashes", machineExtra("systemd", "      units: [{name: kubelet.service, mask: true}]"),
		[]want{{11, "true}", "$.machine.extra.systemd.units[0].mask", "(step machine:file:/etc/systemd/system/kubelet.service)"}}},
	{"two-extras-clash", hostExtra("storage", "      links: [{path: /etc/systemd/system/multi-user.target.wants/foo.service, target: /dev/null}]", "    systemd:", "      units:", "        - name: foo.service", `          contents: "[Install]\nWantedBy=multi-user.target\n"`, "          enabled: true"),
		[]want{{16, "true", "$.host.extra.systemd.units[0].enabled", "/etc/systemd/system/multi-user.target.wants/foo.service is also created by $.host.extra.storage.links[0].path (step host:link:/etc/systemd/system/multi-user.target.wants/foo.service)"}}},
	{"machine-file-clashes" + onGPUHost, machineExtra("storage", "      files: [{path: /etc/containerd/conf.d/10-nvidia.toml}]"),
		[]want{{11, "/etc/containerd", "$.machine.extra.storage.files[0].path", "(step machine:file:/etc/containerd/conf.d/10-nvidia.toml)"}}},

	// Enabling needs something to enable from.
	{"machine-unit-enabled-without-contents", machineExtra("systemd", "      units: [{name: foo.service, enabled: true}]"),
		[]want{{11, "true", "$.machine.extra.systemd.units[0].enabled", "unit foo.service has no contents; nodespawn enables machine units from their [Install] section"}}},
	{"host-unit-enabled-without-install", hostExtra("systemd", "      units:", "        - name: foo.service", "          enabled: true", `          contents: "[Service]\nExecStart=/bin/true\n"`),
		[]want{{13, "true", "$.host.extra.systemd.units[0].enabled", "unit foo.service has no WantedBy= or RequiredBy= in its [Install] section"}}},
	{"machine-unit-enabled-install-without-wantedby", machineExtra("systemd", "      units:", "        - name: foo.service", `          contents: "[Service]\nExecStart=/bin/true\n[Install]\nAlias=bar.service\n"`, "          enabled: true"),
		[]want{{14, "true", "$.machine.extra.systemd.units[0].enabled", "has no WantedBy= or RequiredBy="}}},
	{"machine-template-enabled", machineExtra("systemd", "      units:", "        - name: foo@.service", `          contents: "[Service]\nExecStart=/bin/echo %i\n[Install]\nWantedBy=multi-user.target\n"`, "          enabled: true"),
		[]want{{14, "true", "$.machine.extra.systemd.units[0].enabled", "unit foo@.service is a template, which cannot be enabled by itself; name an instance (like foo@1.service)"}}},

	// nodespawn's own state on the host.
	{"host-file-in-state-dir", hostExtra("storage", "      files: [{path: /var/lib/nodespawn/result.json}]"),
		[]want{{11, "/var/lib/nodespawn", "$.host.extra.storage.files[0].path", "/var/lib/nodespawn holds nodespawn's own state"}}},
	{"host-directory-state-dir", hostExtra("storage", "      directories: [{path: /var/lib/nodespawn, mode: 0777}]"),
		[]want{{11, "/var/lib/nodespawn", "$.host.extra.storage.directories[0].path", "/var/lib/nodespawn holds nodespawn's own state"}}},
	{"host-link-lock-file", hostExtra("storage", "      links: [{path: /run/nodespawn.lock, target: /dev/null}]"),
		[]want{{11, "/run/nodespawn.lock", "$.host.extra.storage.links[0].path", "/run/nodespawn.lock is the lock apply holds while it runs"}}},
	{"host-link-above-state-dir", hostExtra("storage", "      links: [{path: /var/lib, target: /srv/lib}]"),
		[]want{{11, "/var/lib,", "$.host.extra.storage.links[0].path", "a file or link here would stand where nodespawn needs the directory /var/lib"}}},
	{"host-file-firstboot-unit", hostExtra("storage", "      files: [{path: /etc/systemd/system/nodespawn-firstboot.service}, {path: /etc/systemd/system/multi-user.target.wants/nodespawn-firstboot.service}]"),
		[]want{
			{11, "/etc/systemd/system/nodespawn-firstboot.service}", "$.host.extra.storage.files[0].path", "/etc/systemd/system/nodespawn-firstboot.service is nodespawn's first-boot unit, which nodespawn install writes and enables; give it a drop-in"},
			{11, "/etc/systemd/system/multi-user.target.wants/", "$.host.extra.storage.files[1].path", "/etc/systemd/system/multi-user.target.wants/nodespawn-firstboot.service is nodespawn's first-boot unit"},
		}},
	{"host-unit-firstboot-masked", hostExtra("systemd", "      units: [{name: nodespawn-firstboot.service, mask: true}]"),
		[]want{{11, "nodespawn-firstboot.service,", "$.host.extra.systemd.units[0].name", "nodespawn-firstboot.service is nodespawn's first-boot unit, which nodespawn install writes; change it with a drop-in"}}},

	// Switches given as YAML 1.1 booleans, and other non-strings where one
	// of a few strings goes.
	{"switch-true", node("machine:", "  gpu: true"),
		[]want{{9, "true", "$.machine.gpu", `must be "auto", "on" or "off", not a boolean; write gpu: "on" (quoted), since YAML 1.1 tools turn on/off into true/false`}}},
	{"switch-false", node("machine: {kvm: false, bpffs: False}"),
		[]want{
			{8, "false", "$.machine.kvm", `write kvm: "off" (quoted)`},
			{8, "False", "$.machine.bpffs", `write bpffs: "off" (quoted)`},
		}},
	{"switch-number", node("machine:", "  kvm: 1"),
		[]want{{9, "1", "$.machine.kvm", `must be "auto", "on" or "off", not a number`}}},
	{"enum-boolean", node("  taints: [{key: a, effect: true}]"),
		[]want{{8, "true", "$.kubernetes.taints[0].effect", `must be "NoSchedule", "PreferNoSchedule" or "NoExecute", not a boolean`}}},

	// What render used to find out late.
	{"gzip-contents-not-gzip", machineExtra("storage", "      files: [{path: /etc/x, contents: {compression: gzip, source: 'data:,plain'}}]"),
		[]want{{11, "'data", "$.machine.extra.storage.files[0].contents.source", "compression is gzip, but the data does not decompress"}}},
	{"mirror-with-query", node("components:", "  mirror: https://mirror.example/k8s?token=x"),
		[]want{{9, "https://mirror", "$.components.mirror", "a mirror base URL has no query or fragment"}}},
	{"component-base-url-with-fragment", node("components:", "  runc: {baseURL: 'https://mirror.example/#x'}"),
		[]want{{9, "'https", "$.components.runc.baseURL", "a mirror base URL has no query or fragment"}}},
}

// validate is what nodespawn validate does.
func validate(src string) error {
	m, err := manifest.Load("m.yaml", []byte(src))
	if err != nil {
		return err
	}
	return render.Check(m)
}

// applyOn is what nodespawn apply does up to the plan, on the host f.
func applyOn(src string, f plan.Facts) error {
	m, err := manifest.Load("m.yaml", []byte(src))
	if err != nil {
		return err
	}
	_, err = render.Plan(m, f)
	return render.Locate(m, err)
}

// refHost is the reference host a case's clash shows on.
func refHost(name string) plan.Facts {
	hosts := render.ReferenceHosts()
	if strings.HasSuffix(name, onGPUHost) {
		return hosts[1]
	}
	return hosts[0]
}

func asErrors(t *testing.T, what string, err error) manifest.Errors {
	t.Helper()
	var es manifest.Errors
	if err == nil {
		t.Fatalf("%s accepted it", what)
	}
	if !errors.As(err, &es) {
		t.Fatalf("%s: error is %T, not manifest.Errors: %v", what, err, err)
	}
	return es
}

func TestValidateRejects(t *testing.T) {
	for _, tc := range badManifests {
		t.Run(tc.name, func(t *testing.T) {
			es := asErrors(t, "validate", validate(tc.src))
			lines := strings.Split(tc.src, "\n")
			if len(es) != len(tc.wants) {
				t.Fatalf("got %d errors, want %d:\n%v", len(es), len(tc.wants), es)
			}
			for i, w := range tc.wants {
				col := 0
				if w.line >= 1 && w.line <= len(lines) {
					col = strings.Index(lines[w.line-1], w.at) + 1
				}
				if col == 0 {
					t.Fatalf("bad test: %q is not in line %d", w.at, w.line)
				}
				e := es[i]
				if e.File != "m.yaml" || e.Line != w.line || e.Col != col || e.Path != w.path || !strings.Contains(e.Message, w.msg) {
					t.Errorf("error %d:\n got %d:%d: %s: %s\nwant %d:%d: %s: ...%s...", i, e.Line, e.Col, e.Path, e.Message, w.line, col, w.path, w.msg)
				}
				if e.Snippet == "" {
					t.Errorf("error %d has no snippet", i)
				}
			}
		})
	}
}

// TestValidateLimits: values too long for kubelet's environment or for
// a systemd unit file line are refused where they are written. (Not in
// the table: their manifests are megabytes.)
func TestValidateLimits(t *testing.T) {
	big := "--node-labels=" + strings.Repeat("x", manifest.MaxExecString)
	third := "--v=" + strings.Repeat("1", manifest.MaxExecString/3)
	longLine := strings.Repeat("#", 1<<20)
	for _, tc := range []struct {
		name, src string
		want      want
	}{
		{"one flag over the limit", node("  kubeletArgs: [--v=2, " + big + "]"),
			want{8, big[:20], "$.kubernetes.kubeletArgs[1]", "Linux starts no program with one over 131071 bytes (MAX_ARG_STRLEN)"}},
		{"flags together over the limit", node("  kubeletArgs: [" + third + ", " + third + ", " + third + "]"),
			want{8, "kubeletArgs", "$.kubernetes.kubeletArgs", "in the KUBELET_NODESPAWN_ARGS environment variable; Linux starts no program with an environment entry over 131071 bytes"}},
		{"unit line over LONG_LINE_MAX", hostExtra("systemd", "      units: [{name: a.service, contents: '"+longLine+"'}]"),
			want{11, "'###", "$.host.extra.systemd.units[0].contents", "unit a.service has a line of 1048576 bytes; systemd refuses unit files with a line of 1048576 bytes or more"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			for what, err := range map[string]error{"validate": validate(tc.src), "apply": applyOn(tc.src, render.ReferenceHosts()[0])} {
				es := asErrors(t, what, err)
				w := tc.want
				col := strings.Index(strings.Split(tc.src, "\n")[w.line-1], w.at) + 1
				if len(es) != 1 || es[0].Line != w.line || es[0].Col != col || es[0].Path != w.path || !strings.Contains(es[0].Message, w.msg) {
					t.Errorf("%s: got %v, want %d:%d: %s: ...%s...", what, es, w.line, col, w.path, w.msg)
				}
			}
		})
	}
}

// TestApplyRejectsTheSame: apply, on a host where the problem shows, refuses
// each bad manifest as bad input with the very errors validate reports.
func TestApplyRejectsTheSame(t *testing.T) {
	for _, tc := range badManifests {
		t.Run(tc.name, func(t *testing.T) {
			want := asErrors(t, "validate", validate(tc.src)).Error()
			got := asErrors(t, "apply", applyOn(tc.src, refHost(tc.name))).Error()
			if got != want {
				t.Errorf("apply reports\n%s\nvalidate reports\n%s", got, want)
			}
		})
	}
	// A clash that needs a GPU is not one on a host without: apply there
	// goes ahead, and validate still reports it.
	for _, tc := range badManifests {
		if strings.HasSuffix(tc.name, onGPUHost) {
			if err := applyOn(tc.src, render.ReferenceHosts()[0]); err != nil {
				t.Errorf("%s on the plain host: %v", tc.name, err)
			}
		}
	}
}

// TestInvalidFiles keeps testdata/invalid, which the command-line tests in
// package main run through validate and apply, equal to the table.
func TestInvalidFiles(t *testing.T) {
	dir := filepath.Join("testdata", "invalid")
	if *update {
		if err := os.RemoveAll(dir); err != nil {
			t.Fatal(err)
		}
		if err := os.MkdirAll(dir, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	names := map[string]bool{}
	for _, tc := range badManifests {
		file := tc.name + ".yaml"
		if names[file] {
			t.Fatalf("two cases are named %s", tc.name)
		}
		names[file] = true
		p := filepath.Join(dir, file)
		if *update {
			if err := os.WriteFile(p, []byte(tc.src), 0o644); err != nil {
				t.Fatal(err)
			}
			continue
		}
		got, err := os.ReadFile(p)
		if err != nil || string(got) != tc.src {
			t.Errorf("%s is not the table's case (go test ./manifest -run TestInvalidFiles -update rewrites it): %v", p, err)
		}
	}
	files, err := filepath.Glob(filepath.Join(dir, "*.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range files {
		if !names[filepath.Base(f)] {
			t.Errorf("%s is in no case of the table", f)
		}
	}
}

// TestValidateAccepts: what is close to a bad case but fine stays fine, for
// validate and for apply on every reference host.
func TestValidateAccepts(t *testing.T) {
	for name, src := range map[string]string{
		"kubelet args":         node("  kubeletArgs: [--max-pods=200, '--node-labels=a=b,c=d', --v=2]"),
		"unit names":           hostExtra("systemd", `      units: [{name: 'a@.service', contents: x}, {name: a@b.service, contents: x}, {name: 'x\x2dy.service', contents: x}, {name: 'dev-sda1.device', mask: true}, {name: 'a:b_c.mount', contents: x}, {name: foo.timer, dropins: [{name: 10-x.conf, contents: x}]}]`),
		"host unit enabled":    hostExtra("systemd", "      units: [{name: ssh.service, enabled: true}]"),
		"instance enabled":     machineExtra("systemd", "      units:", "        - name: foo@bar.service", `          contents: "[Install]\nRequiredBy=multi-user.target\n"`, "          enabled: true"),
		"unit disabled":        machineExtra("systemd", "      units: [{name: foo.service, enabled: false}]"),
		"masked and enabled":   machineExtra("systemd", "      units: [{name: foo.service, mask: true, enabled: true}]"),
		"machine state dir":    machineExtra("storage", "      files: [{path: /var/lib/nodespawn/x}]", "      links: [{path: /run/nodespawn.lock, target: /dev/null}]"),
		"first-boot drop-in":   hostExtra("systemd", `      units: [{name: nodespawn-firstboot.service, dropins: [{name: 10-env.conf, contents: "[Service]\nEnvironment=A=1\n"}]}]`),
		"host dirs above":      hostExtra("storage", "      directories: [{path: /var/lib}, {path: /run}, {path: /var/lib/machines}]"),
		"symlink relative":     machineExtra("storage", "      links: [{path: /usr/local/bin/k, target: kubectl}]"),
		"hard link absolute":   machineExtra("storage", "      links: [{path: /etc/k, target: /etc/kubernetes/pki/ca.crt, hard: true}]"),
		"extra dir above":      machineExtra("storage", "      directories: [{path: /etc/containerd}, {path: /etc/kubernetes/pki/extra}]"),
		"kubelet dropin":       machineExtra("systemd", "      units: [{name: kubelet.service, dropins: [{name: 20-limits.conf, contents: x}]}]"),
		"quoted switches":      node("machine: {gpu: 'off', kvm: \"on\", bpffs: auto}"),
		"gzip contents":        machineExtra("storage", "      files: [{path: /etc/x, contents: {compression: gzip, source: 'data:;base64,H4sIAAAAAAAC/ytJLS4BAAx+f9gEAAAA'}}]"),
		"mirror with path":     node("components:", "  mirror: https://mirror.example/k8s/"),
		"other machine rootfs": hostExtra("storage", "      files: [{path: /var/lib/machines/other/etc/x}]"),
	} {
		t.Run(name, func(t *testing.T) {
			if err := validate(src); err != nil {
				t.Fatalf("validate: %v", err)
			}
			m, err := manifest.Load("m.yaml", []byte(src))
			if err != nil {
				t.Fatal(err)
			}
			for _, f := range render.ReferenceHosts() {
				if m.Machine.KVM == manifest.SwitchOn && !f.KVM {
					continue
				}
				if _, err := render.Plan(m, f); err != nil {
					t.Errorf("render on %+v: %v", f, err)
				}
			}
		})
	}
}

// TestLocate: apply's render errors name the line of the field at fault,
// errors that are not about the manifest pass through, and a manifest not
// made by Load still gets its path.
func TestLocate(t *testing.T) {
	src := node("machine:", "  gpu: 'on'")
	m, err := manifest.Load("m.yaml", []byte(src))
	if err != nil {
		t.Fatal(err)
	}
	_, err = render.Plan(m, render.ReferenceHosts()[0])
	es := asErrors(t, "apply without a GPU", render.Locate(m, err))
	if len(es) != 1 || es[0].Line != 9 || es[0].Col != 8 || es[0].Path != "$.machine.gpu" {
		t.Errorf("got %v, want the gpu switch at 9:8", es)
	}
	if err := render.Check(m); err != nil {
		t.Errorf("validate must leave a GPU host's absence to apply: %v", err)
	}

	noArch := render.ReferenceHosts()[0]
	noArch.Arch = ""
	_, err = render.Plan(m, noArch)
	var es2 manifest.Errors
	if err == nil || errors.As(render.Locate(m, err), &es2) {
		t.Errorf("a facts problem became a manifest error: %v", err)
	}

	e := (&manifest.Manifest{}).ErrorAt(jsonpath.New("", "machine", "gpu"), "x")
	if e.Error() != "$.machine.gpu: x" {
		t.Errorf("ErrorAt without a source: %q", e.Error())
	}
}

// FuzzValidateThenApply: a manifest validate accepts renders on every
// reference host that can satisfy its switches, and one validate refuses is
// refused by apply on some host or by Load, with validate's positions.
func FuzzValidateThenApply(f *testing.F) {
	for _, pattern := range []string{"../examples/*.yaml", "../render/testdata/manifests/*.yaml", "testdata/invalid/*.yaml"} {
		files, _ := filepath.Glob(pattern)
		for _, file := range files {
			if data, err := os.ReadFile(file); err == nil {
				f.Add(data)
			}
		}
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		m, err := manifest.Load("m.yaml", data)
		if err != nil {
			return // Load's own fuzz test covers its errors
		}
		verr := render.Check(m)
		var refused []string
		for _, h := range render.ReferenceHosts() {
			hasGPU := h.NVIDIA != nil
			if m.Machine.GPU == manifest.SwitchOn && !hasGPU || m.Machine.KVM == manifest.SwitchOn && !h.KVM || m.Machine.RDMA == manifest.SwitchOn && h.RDMA == nil {
				continue
			}
			_, err := render.Plan(m, h)
			if err == nil || render.HostOnly(err) {
				// Only a real host can say (an address in nodeIP's CIDR).
				continue
			}
			if verr == nil {
				t.Fatalf("validate accepts what apply refuses: %v", err)
			}
			var es manifest.Errors
			if !errors.As(render.Locate(m, err), &es) {
				t.Fatalf("apply's error is not placed in the manifest: %v", err)
			}
			for _, e := range es {
				refused = append(refused, e.Path)
			}
		}
		if verr == nil {
			return
		}
		for _, e := range asErrors(t, "validate", verr) {
			found := false
			for _, p := range refused {
				found = found || p == e.Path
			}
			if !found || e.Line == 0 {
				t.Fatalf("validate reports %v, which apply on no reference host does", e)
			}
		}
	})
}
