//go:build e2e

package e2e

import (
	"cmp"
	"encoding/base64"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/nodespawn/nodespawn/internal/upstream"
)

// manifestOptions vary the manifest between scenarios.
type manifestOptions struct {
	// runcSHA256 pins runc's digest (a wrong one makes the bad-artifact scenario).
	runcSHA256 string
	// execNode, when set, is the node name for a kubelet that authenticates
	// with the exec credential plugin the manifest ships, not the bootstrap token.
	execNode string
	// kubelet picks the kubelet the manifest installs; the zero value is
	// the current one, as before.
	kubelet kubeletChoice
	// readyTimeout, when set, is the manifest's upgrade.readyTimeout.
	readyTimeout string
	// image, when set, is the machine image (default env.imageRef).
	image string
	// fleet leaves kubernetes.auth out: the manifest as a fleet config
	// (NodeSpawnConfig), which holds no secret; the node's identity
	// carries over the upgrade.
	fleet bool
}

// kubeletChoice is a kubelet the mirror serves.
type kubeletChoice int

const (
	// kubeletCurrent is kubelet v<k8sVersion> from the components cache,
	// found by kubernetes.version in the upstream layout with its checksum
	// file: the manifest names no kubelet of its own.
	kubeletCurrent kubeletChoice = iota
	// kubeletPrev is the previous release's kubelet (E2E_KUBELET_PREV,
	// v<env.kubeletPrevVersion>): components.kubelet.version and sha256.
	// kubernetes.version, kubectl and kube-proxy stay at k8sVersion (only
	// the kubelet is built at the previous version; kubernetes.version is
	// only the default of the three components' versions).
	kubeletPrev
	// kubeletBroken is brokenKubelet: components.kubelet.url and sha256; its
	// download verifies, its unit fails at once, no Node turns Ready. The
	// version stays kubernetes.version's (the plan's download step says
	// k8sVersion).
	kubeletBroken
)

func (k kubeletChoice) String() string {
	switch k {
	case kubeletCurrent:
		return "current"
	case kubeletPrev:
		return "prev"
	case kubeletBroken:
		return "broken"
	}
	return fmt.Sprintf("kubeletChoice(%d)", int(k))
}

// mirrorKey is the kubelet's key in env.mirrorFiles and env.mirrorSHA256.
func (k kubeletChoice) mirrorKey() string {
	switch k {
	case kubeletPrev:
		return mirrorKubeletPrev
	case kubeletBroken:
		return mirrorKubeletBroken
	}
	return upstream.Kubelet
}

// k8sVersionOf is the kubernetes version (without the "v", like
// k8sVersion) of the kubelet a manifest with this choice installs: its Node
// reports kubeletVersion "v"+k8sVersionOf(k). kubeletBroken never
// registers; it says k8sVersion, what the manifest's download step does.
func k8sVersionOf(k kubeletChoice) string {
	if k == kubeletPrev {
		return env.kubeletPrevVersion
	}
	return k8sVersion
}

// kubeletComponent is the manifest's components.kubelet entry for k
// (indented under components:), empty for kubeletCurrent.
func kubeletComponent(k kubeletChoice) string {
	sum := env.mirrorSHA256[k.mirrorKey()]
	switch k {
	case kubeletPrev:
		return fmt.Sprintf("\n  kubelet:\n    version: v%s\n    sha256: %q", env.kubeletPrevVersion, sum)
	case kubeletBroken:
		return fmt.Sprintf("\n  kubelet:\n    url: http://%s:%d%s\n    sha256: %q", guestHostIP, mirrorPort, mirrorKubeletBrokenPath, sum)
	}
	return ""
}

// execPluginPath is the exec credential plugin inside the machine: a shell
// script that hands the kubelet a token the test API server maps to the
// node's identity (cluster.go's token file).
const execPluginPath = "/usr/local/bin/e2e-credential"

func execPlugin() string {
	return "#!/bin/sh\n# nodespawn e2e exec credential plugin: a static token for the kubelet.\n" +
		`printf '{"apiVersion":"client.authentication.k8s.io/v1","kind":"ExecCredential","status":{"token":"%s"}}\n' ` + execToken + "\n"
}

// The node as the manifest names it, and what the test expects on the Node object.
const (
	nodeName   = "e2e-node"
	labelKey   = "e2e.nodespawn.dev/pool"
	labelValue = "blue"
	taintKey   = "e2e.nodespawn.dev/dedicated"
	taintValue = "e2e"
)

// cniConflist is the pod network, shipped as a machine extra file: a bridge
// with host-local addresses from the podCIDR the controller manager gives
// the first node.
const cniConflist = `{
  "cniVersion": "1.0.0",
  "name": "e2e-bridge",
  "plugins": [
    {"type": "bridge", "bridge": "cni0", "isGateway": true, "ipMasq": true, "hairpinMode": true,
     "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.244.0.0/24"}]], "routes": [{"dst": "0.0.0.0/0"}]}},
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}
`

// registryHosts lets containerd pull pod images from the loopback registry
// over plain HTTP (it only falls back to HTTP for localhost by itself).
var registryHosts = fmt.Sprintf("server = \"http://%[1]s:%[2]d\"\n[host.\"http://%[1]s:%[2]d\"]\n  capabilities = [\"pull\", \"resolve\"]\n", guestHostIP, registryPort)

func dataURL(s string) string { return "data:;base64," + base64.StdEncoding.EncodeToString([]byte(s)) }

// manifest is the node manifest the guest receives: the machine image from
// the loopback registry, every binary from the loopback mirror, the test
// cluster's API server with a bootstrap token, the pod sandbox from the
// loopback registry, and the CNI configuration as an extra file.
func manifest(o manifestOptions) string {
	runc := ""
	if o.runcSHA256 != "" {
		runc = "\n    sha256: \"" + o.runcSHA256 + "\""
	}
	node, auth, extra := nodeName, "\n  auth:\n    bootstrapToken: "+bootstrapToken, ""
	if o.execNode != "" {
		node = o.execNode
		auth = "\n  auth:\n    exec:\n      apiVersion: client.authentication.k8s.io/v1\n      command: " + execPluginPath
		extra = "\n        - path: " + execPluginPath + "\n          mode: 493\n          contents:\n            source: " + dataURL(execPlugin())
	}
	if o.fleet {
		auth = ""
	}
	return fmt.Sprintf(`apiVersion: nodespawn.dev/v1alpha1
kind: Node
machine:
  name: %s
  rootfs:
    image: %s
    store: layers
    plainHTTP:
      - %s:%d
  extra:
    storage:
      files:
        - path: /etc/cni/net.d/10-e2e-bridge.conflist
          contents:
            source: %s
        - path: /etc/containerd/certs.d/%s:%d/hosts.toml
          contents:
            source: %s%s
kubernetes:
  version: v%s
  apiServer: https://%s:%d
  nodeName: %s
  labels:
    %s: %s
  taints:
    - key: %s
      value: %s
      effect: NoSchedule
  sandboxImage: %s%s
  caCert: |
%s
components:
  mirror: http://%s:%d%s
  containerd:
    version: v%s
  runc:
    version: v%s%s
  cniPlugins:
    version: v%s
  crictl:
    version: v%s
%s`, machineName, cmp.Or(o.image, env.imageRef), guestHostIP, registryPort,
		dataURL(cniConflist), guestHostIP, registryPort, dataURL(registryHosts), extra,
		k8sVersion, guestHostIP, apiServerPort, node, labelKey, labelValue, taintKey, taintValue,
		env.pauseRef, auth, indent(env.caPEM, "    "), guestHostIP, mirrorPort, kubeletComponent(o.kubelet), containerdVersion, runcVersion, runc, cniVersion, crictlVersion, upgradeSection(o))
}

// upgradeSection is the manifest's upgrade settings, when o sets any.
func upgradeSection(o manifestOptions) string {
	if o.readyTimeout == "" {
		return ""
	}
	return "upgrade:\n  readyTimeout: " + o.readyTimeout + "\n"
}

func indent(s, prefix string) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	for i := range lines {
		lines[i] = prefix + lines[i]
	}
	return strings.Join(lines, "\n")
}

// userData embeds the manifest the way examples/cloud-init does: cloud-init
// writes it to /etc/nodespawn/manifest.yaml, and the first-boot unit reads
// it with --source auto.
func userData(manifest string) string {
	return "#cloud-config\nwrite_files:\n  - path: /etc/nodespawn/manifest.yaml\n    permissions: '0600'\n    content: |\n" +
		indent(manifest, "      ") + "\n" + firstbootCloudConfig
}

// networkConfig gives the guest slirp's addresses with an IPv4 default
// route, like a real host. cloud-init's fallback (DHCP) gets no router from
// slirp with restrict=on, so the only default route was IPv6 from slirp's
// router advertisement, and the kubelet, finding no IPv4 default route,
// registered the node with that fec0:: address, which the API server
// cannot reach.
const networkConfig = `version: 2
ethernets:
  slirp:
    match: {name: "en*"}
    addresses: [` + guestNodeIP + `/24]
    routes: [{to: default, via: 10.0.2.2}]
    nameservers: {addresses: [10.0.2.3]}
`

// makeSeed writes a NoCloud seed (a vfat volume labelled CIDATA) and returns its path.
func makeSeed(t *testing.T, dir, instanceID, userData string) string {
	t.Helper()
	src := filepath.Join(dir, "seed")
	if err := os.MkdirAll(src, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(src, "user-data"), []byte(userData), 0o644); err != nil {
		t.Fatal(err)
	}
	meta := fmt.Sprintf("instance-id: %s\nlocal-hostname: e2e-node\n", instanceID)
	if err := os.WriteFile(filepath.Join(src, "meta-data"), []byte(meta), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(src, "network-config"), []byte(networkConfig), 0o644); err != nil {
		t.Fatal(err)
	}
	img := filepath.Join(dir, "seed.vfat")
	for _, c := range [][]string{
		{"truncate", "-s", "2M", img},
		{"mkfs.vfat", "-n", "CIDATA", img},
		{"mcopy", "-i", img, filepath.Join(src, "user-data"), filepath.Join(src, "meta-data"), filepath.Join(src, "network-config"), "::/"},
	} {
		if out, err := exec.Command(c[0], c[1:]...).CombinedOutput(); err != nil {
			t.Fatalf("%s: %v\n%s", strings.Join(c, " "), err, out)
		}
	}
	return img
}
