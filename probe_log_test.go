package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestProbeWarningsFollowTheManifest: the host is probed while the
// manifest loads, but what the probe says is printed after the manifest
// loaded, once, and not at all when it did not (a broken manifest gets its
// error, not warnings about the host).
func TestProbeWarningsFollowTheManifest(t *testing.T) {
	root := t.TempDir()
	// A driver without device nodes: the probe warns.
	must(t, os.MkdirAll(filepath.Join(root, "proc/driver/nvidia"), 0o755))
	must(t, os.WriteFile(filepath.Join(root, "proc/driver/nvidia/version"), []byte("NVRM version: 580.95.05\n"), 0o644))
	must(t, os.MkdirAll(filepath.Join(root, "etc"), 0o755))
	must(t, os.WriteFile(filepath.Join(root, "etc/hostname"), []byte("node-1\n"), 0o644))
	must(t, os.WriteFile(filepath.Join(root, "etc/resolv.conf"), []byte("nameserver 10.0.0.2\n"), 0o644))
	const warning = "the NVIDIA kernel driver is loaded but there is no /dev/nvidia* node"

	code, out, errOut := cli(t, "", "apply", "--dry-run", "-f", "examples/minimal.yaml", "--root", root)
	if code != 0 {
		t.Fatalf("dry run: exit %d\n%s\n%s", code, out, errOut)
	}
	if n := strings.Count(errOut, warning); n != 1 {
		t.Errorf("the probe's warning printed %d times, want once:\n%s", n, errOut)
	}

	bad := filepath.Join(t.TempDir(), "bad.yaml")
	must(t, os.WriteFile(bad, []byte("apiVersion: nodespawn.dev/v1alpha1\nkind: Nod\n"), 0o644))
	code, out, errOut = cli(t, "", "apply", "--dry-run", "-f", bad, "--root", root)
	if code != exitBadInput {
		t.Fatalf("bad manifest: exit %d, want %d\n%s\n%s", code, exitBadInput, out, errOut)
	}
	if strings.Contains(errOut, warning) {
		t.Errorf("a manifest that did not load printed the probe's warning:\n%s", errOut)
	}
}
