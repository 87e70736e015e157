package manifest

import (
	"errors"
	"strings"
	"testing"
)

var configDoc = doc(
	"apiVersion: nodespawn.dev/v1alpha1",
	"kind: Node",
	"kubernetes:",
	"  apiServer: https://10.0.0.1:6443",
	"  caCert: {CA}",
	"  labels: {pool: gpu}",
)

func TestLoadConfigWithoutAuth(t *testing.T) {
	m, err := LoadConfig("config.yaml", []byte(configDoc))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := Load("config.yaml", []byte(configDoc)); err == nil {
		t.Fatal("Load took a manifest without credentials: a node manifest needs them")
	}
	cd, err := m.ConfigDigest()
	if err != nil {
		t.Fatal(err)
	}
	d, _ := m.Digest()
	if cd != d {
		t.Errorf("a config's ConfigDigest %s is not its Digest %s", cd, d)
	}
	// The same config with a token: the machine the agent makes from it.
	node, err := Load("node.yaml", []byte(configDoc+"  auth: {bootstrapToken: abcdef.0123456789abcdef}\n"))
	if err != nil {
		t.Fatal(err)
	}
	nd, _ := node.ConfigDigest()
	if nd != cd {
		t.Errorf("the node manifest's ConfigDigest %s differs from the config's %s", nd, cd)
	}
	if full, _ := node.Digest(); full == cd {
		t.Error("the token does not change Digest: apply would not tell the two manifests apart")
	}
	merged := m.WithAuthOf(node)
	if merged.Kubernetes.Auth.BootstrapToken == "" || m.Kubernetes.Auth.BootstrapToken != "" {
		t.Error("WithAuthOf did not copy the running manifest's auth into a copy")
	}
	if md, _ := merged.Digest(); md.String() != func() string { d, _ := node.Digest(); return d.String() }() {
		t.Error("the config with the node's auth is not the node's manifest")
	}
	// The canonical form loads back to the same manifest.
	b, err := merged.Canonical()
	if err != nil {
		t.Fatal(err)
	}
	back, err := Load("canonical.json", b)
	if err != nil {
		t.Fatalf("the canonical form does not load: %v", err)
	}
	if bd, _ := back.Digest(); bd.String() != func() string { d, _ := merged.Digest(); return d.String() }() {
		t.Errorf("the canonical form loads to another digest")
	}
	// Different key order and an explicit default: the same digest.
	other, err := LoadConfig("other.yaml", []byte(doc(
		"kind: Node",
		"apiVersion: nodespawn.dev/v1alpha1",
		"kubernetes:",
		"  labels: {pool: gpu}",
		"  caCert: {CA}",
		"  clusterDomain: cluster.local",
		"  apiServer: https://10.0.0.1:6443",
		"  auth: {}",
	)))
	if err != nil {
		t.Fatal(err)
	}
	if od, _ := other.ConfigDigest(); od != cd {
		t.Errorf("key order or a spelt-out default changed the digest: %s vs %s", od, cd)
	}
}

func TestLoadConfigRefusesSecrets(t *testing.T) {
	for name, extra := range map[string]string{
		"token":       "  auth: {bootstrapToken: abcdef.0123456789abcdef}\n",
		"exec env":    "  auth: {exec: {command: /bin/cred, env: [{name: K, value: s3cr3tvalue}]}}\n",
		"http header": "machine:\n  extra:\n    storage:\n      files:\n      - path: /etc/x\n        contents: {source: 'https://e.example/x', httpHeaders: [{name: Authorization, value: s3cr3tvalue}], verification: {hash: sha256-0000000000000000000000000000000000000000000000000000000000000000}}\n",
	} {
		t.Run(name, func(t *testing.T) {
			_, err := LoadConfig("config.yaml", []byte(configDoc+extra))
			var se *SecretsError
			if !errors.As(err, &se) {
				t.Fatalf("LoadConfig = %v, want a SecretsError", err)
			}
			if strings.Contains(err.Error(), "abcdef.0123456789abcdef") || strings.Contains(err.Error(), "s3cr3tvalue") {
				t.Errorf("the error shows the secret: %v", err)
			}
			if len(se.Paths) != 1 {
				t.Errorf("paths %v, want one", se.Paths)
			}
		})
	}
	// An exec plugin without secrets is a config's own auth, kept.
	m, err := LoadConfig("config.yaml", []byte(configDoc+"  auth: {exec: {command: /bin/cred, args: [x]}}\n"))
	if err != nil {
		t.Fatal(err)
	}
	if m.WithAuthOf(&Manifest{Kubernetes: Kubernetes{Auth: Auth{BootstrapToken: "abcdef.0123456789abcdef"}}}).Kubernetes.Auth.Exec == nil {
		t.Error("WithAuthOf replaced the config's own exec auth")
	}
}
