package agent

import (
	"context"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/nodespawn/nodespawn/internal/kubecheck"
)

// testCAPEM is any certificate, for an Endpoint's CA.
func testCAPEM(t *testing.T) []byte {
	t.Helper()
	b, err := os.ReadFile("../examples/minimal.yaml")
	if err != nil {
		t.Fatal(err)
	}
	s := string(b)
	i, j := strings.Index(s, "-----BEGIN CERTIFICATE-----"), strings.Index(s, "-----END CERTIFICATE-----")
	var out []string
	for _, l := range strings.Split(s[i:j+len("-----END CERTIFICATE-----")], "\n") {
		out = append(out, strings.TrimSpace(l))
	}
	return []byte(strings.Join(out, "\n") + "\n")
}

func TestUnreachableAPIServerSaysSo(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	api, err := NewHTTPAPI(Endpoint{Server: "https://" + addr, CAPEM: testCAPEM(t), Credentials: kubecheck.Credentials{Token: "s3cr3t"}})
	if err != nil {
		t.Fatal(err)
	}
	_, err = api.GetNode(context.Background(), "n1")
	if err == nil || !strings.Contains(err.Error(), "connection refused") || strings.Contains(err.Error(), "s3cr3t") {
		t.Errorf("err %v; want connection refused, said without the token", err)
	}
}

func TestKubeconfigEndpoint(t *testing.T) {
	dir := t.TempDir()
	ca := testCAPEM(t)
	if err := os.WriteFile(filepath.Join(dir, "ca.crt"), ca, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "token"), []byte("tok\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	kc := `apiVersion: v1
kind: Config
current-context: c
contexts:
- name: other
  context: {cluster: x, user: x}
- name: c
  context: {cluster: k, user: u}
clusters:
- name: k
  cluster: {server: "https://127.0.0.1:6443", certificate-authority: ca.crt}
users:
- name: u
  user: {tokenFile: token}
`
	p := filepath.Join(dir, "kubeconfig")
	if err := os.WriteFile(p, []byte(kc), 0o600); err != nil {
		t.Fatal(err)
	}
	e, err := KubeconfigEndpoint(p)
	if err != nil {
		t.Fatal(err)
	}
	if e.Server != "https://127.0.0.1:6443" || string(e.CAPEM) != string(ca) || e.Credentials.Token != "tok" {
		t.Errorf("endpoint %s %q %s", e.Server, e.CAPEM, e.Credentials)
	}
	if err := os.WriteFile(p, []byte(strings.Replace(kc, "{tokenFile: token}", "{exec: {command: x, apiVersion: client.authentication.k8s.io/v1}}", 1)), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := KubeconfigEndpoint(p); err == nil || !strings.Contains(err.Error(), "plugin") {
		t.Errorf("exec user: %v; want refused", err)
	}
}
