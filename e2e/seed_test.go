//go:build e2e

package e2e

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// manifestOptions vary the manifest between scenarios.
type manifestOptions struct {
	// runcSHA256 pins runc's digest (a wrong one makes the bad-artifact scenario).
	runcSHA256 string
}

// manifest is the node manifest the guest receives: the machine image from
// the loopback registry, every binary from the loopback mirror, and an API
// server that nothing serves (the kubelet must be seen reaching for it).
func manifest(o manifestOptions) string {
	runc := ""
	if o.runcSHA256 != "" {
		runc = "\n    sha256: \"" + o.runcSHA256 + "\""
	}
	return fmt.Sprintf(`apiVersion: nodespawn.dev/v1alpha1
kind: Node
machine:
  name: %s
  rootfs:
    image: %s
    plainHTTP:
      - %s:%d
kubernetes:
  version: v%s
  apiServer: https://%s:%d
  nodeName: e2e-node
  auth:
    bootstrapToken: abcdef.0123456789abcdef
  caCert: |
%s
components:
  mirror: http://%s:%d
  containerd:
    version: v%s
  runc:
    version: v%s%s
  cniPlugins:
    version: v%s
  crictl:
    version: v%s
`, machineName, env.imageRef, guestHostIP, registryPort, k8sVersion, guestHostIP, apiServerPort,
		indent(env.caPEM, "    "), guestHostIP, mirrorPort, containerdVersion, runcVersion, runc, cniVersion, crictlVersion)
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
	img := filepath.Join(dir, "seed.vfat")
	for _, c := range [][]string{
		{"truncate", "-s", "2M", img},
		{"mkfs.vfat", "-n", "CIDATA", img},
		{"mcopy", "-i", img, filepath.Join(src, "user-data"), filepath.Join(src, "meta-data"), "::/"},
	} {
		if out, err := exec.Command(c[0], c[1:]...).CombinedOutput(); err != nil {
			t.Fatalf("%s: %v\n%s", strings.Join(c, " "), err, out)
		}
	}
	return img
}
