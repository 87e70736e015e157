package kubecheck

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/nodespawn/nodespawn/internal/command"
)

// hostRunner runs argv on this host with env added, as the systemd-run
// Runner does in the machine.
func hostRunner(ctx context.Context, argv []string, env []string) ([]byte, error) {
	return command.RunWith(ctx, command.Options{Env: env}, argv[0], argv[1:]...)
}

// plugin is a real exec credential plugin: a shell script that records
// KUBERNETES_EXEC_INFO, its arguments and a variable from the manifest's
// env, then prints the file OUTPUT.
type plugin struct {
	dir, script, output string
}

const pluginScript = `#!/bin/sh
printf '%s' "$KUBERNETES_EXEC_INFO" > "$RECORD_DIR/info"
printf '%s\n' "$@" > "$RECORD_DIR/args"
printf '%s' "$GREETING" > "$RECORD_DIR/greeting"
if [ -n "$FAIL" ]; then echo "$FAIL" >&2; exit 3; fi
cat "$RECORD_DIR/output"
`

func newPlugin(t *testing.T) *plugin {
	t.Helper()
	dir := t.TempDir()
	p := &plugin{dir: dir, script: filepath.Join(dir, "plugin.sh"), output: filepath.Join(dir, "output")}
	if err := os.WriteFile(p.script, []byte(pluginScript), 0o755); err != nil {
		t.Fatal(err)
	}
	return p
}

func (p *plugin) provider(apiVersion string, env ...string) ExecPlugin {
	return ExecPlugin{
		APIVersion: apiVersion,
		Command:    p.script,
		Args:       []string{"get-token", "--cluster=e2e"},
		Env:        append([]string{"RECORD_DIR=" + p.dir, "GREETING=hello world"}, env...),
	}
}

func (p *plugin) prints(t *testing.T, out any) {
	t.Helper()
	var data []byte
	switch o := out.(type) {
	case string:
		data = []byte(o)
	case []byte:
		data = o
	default:
		var err error
		if data, err = json.Marshal(o); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.WriteFile(p.output, data, 0o600); err != nil {
		t.Fatal(err)
	}
}

func (p *plugin) recorded(t *testing.T, name string) string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(p.dir, name))
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

func execCred(apiVersion string, status map[string]string) map[string]any {
	m := map[string]any{"apiVersion": apiVersion, "kind": "ExecCredential", "spec": map[string]any{"interactive": false}}
	if status != nil {
		m["status"] = status
	}
	return m
}

const v1 = "client.authentication.k8s.io/v1"

func TestExecCredentialToken(t *testing.T) {
	p := newPlugin(t)
	p.prints(t, execCred(v1, map[string]string{"token": "exec-token-123", "expirationTimestamp": "2026-11-30T07:00:00Z"}))
	ca := newCA(t, "kubernetes")
	creds, err := ExecCredential(context.Background(), hostRunner, p.provider(v1), "https://10.0.0.1:6443", ca.pem)
	if err != nil {
		t.Fatal(err)
	}
	if creds.Token != "exec-token-123" || creds.CertPEM != nil || creds.KeyPEM != nil {
		t.Errorf("got %#v (token %q)", creds, creds.Token)
	}

	// What the plugin got, as client-go gives it.
	var info struct {
		APIVersion string `json:"apiVersion"`
		Kind       string `json:"kind"`
		Spec       struct {
			Interactive *bool `json:"interactive"`
			Cluster     *struct {
				Server                   string `json:"server"`
				CertificateAuthorityData []byte `json:"certificate-authority-data"`
			} `json:"cluster"`
		} `json:"spec"`
		Status any `json:"status"`
	}
	raw := p.recorded(t, "info")
	if err := json.Unmarshal([]byte(raw), &info); err != nil {
		t.Fatalf("KUBERNETES_EXEC_INFO %q: %v", raw, err)
	}
	if info.APIVersion != v1 || info.Kind != "ExecCredential" || info.Status != nil {
		t.Errorf("KUBERNETES_EXEC_INFO %s: want an ExecCredential %s without status", raw, v1)
	}
	if info.Spec.Interactive == nil || *info.Spec.Interactive {
		t.Errorf("KUBERNETES_EXEC_INFO %s: want spec.interactive false", raw)
	}
	if c := info.Spec.Cluster; c == nil || c.Server != "https://10.0.0.1:6443" || !bytes.Equal(c.CertificateAuthorityData, ca.pem) {
		t.Errorf("KUBERNETES_EXEC_INFO %s: want spec.cluster with the server and the CA", raw)
	}
	if got := p.recorded(t, "args"); got != "get-token\n--cluster=e2e\n" {
		t.Errorf("args %q", got)
	}
	if got := p.recorded(t, "greeting"); got != "hello world" {
		t.Errorf("the manifest's env did not reach the plugin: GREETING=%q", got)
	}
}

func TestExecCredentialClientCert(t *testing.T) {
	ca := newCA(t, "kubernetes")
	nc := ca.nodeCert(t, "e2e-node", ecKey)
	p := newPlugin(t)
	const beta = "client.authentication.k8s.io/v1beta1"
	p.prints(t, execCred(beta, map[string]string{"clientCertificateData": string(nc.CertPEM), "clientKeyData": string(nc.KeyPEM)}))
	creds, err := ExecCredential(context.Background(), hostRunner, p.provider(beta), "https://10.0.0.1:6443", ca.pem)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(creds.CertPEM, nc.CertPEM) || !bytes.Equal(creds.KeyPEM, nc.KeyPEM) || creds.Token != "" {
		t.Errorf("got %s", creds)
	}
	if !strings.Contains(p.recorded(t, "info"), `"apiVersion":"`+beta+`"`) {
		t.Errorf("KUBERNETES_EXEC_INFO %s: want apiVersion %s", p.recorded(t, "info"), beta)
	}

	// The credentials work against an API server.
	f := newFakeAPI(t, ca, tls.VerifyClientCertIfGiven)
	if _, err := getNode(t, f, ca.pem, creds, "e2e-node"); err != nil || f.user(0) != "system:node:e2e-node" {
		t.Errorf("GetNode with the plugin's certificate: %v (user %q)", err, f.user(0))
	}
}

// A plugin without an apiVersion speaks v1, as a manifest's does when it
// was not defaulted.
func TestExecCredentialDefaultAPIVersion(t *testing.T) {
	p := newPlugin(t)
	p.prints(t, execCred(v1, map[string]string{"token": "t"}))
	if _, err := ExecCredential(context.Background(), hostRunner, p.provider(""), "https://a", nil); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(p.recorded(t, "info"), `"apiVersion":"`+v1+`"`) {
		t.Errorf("KUBERNETES_EXEC_INFO %s: want %s", p.recorded(t, "info"), v1)
	}
}

func TestExecCredentialBadOutput(t *testing.T) {
	ca := newCA(t, "kubernetes")
	a, b := ca.nodeCert(t, "a", ecKey), ca.nodeCert(t, "b", ecKey)
	big := append(bytes.Repeat([]byte(" "), MaxExecOutput), []byte(`{"apiVersion":"`+v1+`","kind":"ExecCredential","status":{"token":"t"}}`)...)
	for _, c := range []struct {
		name string
		out  any
		want string
	}{
		{"nothing", "", "printed nothing"},
		{"not JSON", "token: secret-value-xyz\n", "is not an ExecCredential in JSON"},
		{"trailing garbage", `{"apiVersion":"` + v1 + `","kind":"ExecCredential","status":{"token":"t"}} and more`, "not an ExecCredential in JSON"},
		{"wrong kind", map[string]any{"apiVersion": v1, "kind": "Secret", "status": map[string]string{"token": "t"}}, `kind "Secret"`},
		{"wrong apiVersion", execCred("client.authentication.k8s.io/v1beta1", map[string]string{"token": "t"}), `apiVersion "client.authentication.k8s.io/v1beta1", but the manifest configures "client.authentication.k8s.io/v1"`},
		{"no status", execCred(v1, nil), "without a status"},
		{"empty status", execCred(v1, map[string]string{}), "holds no token and no client certificate"},
		{"only expiry", execCred(v1, map[string]string{"expirationTimestamp": "2026-11-30T07:00:00Z"}), "holds no token"},
		{"certificate without key", execCred(v1, map[string]string{"clientCertificateData": string(a.CertPEM)}), "only one of"},
		{"key without certificate", execCred(v1, map[string]string{"clientKeyData": string(a.KeyPEM)}), "only one of"},
		{"mismatched pair", execCred(v1, map[string]string{"clientCertificateData": string(a.CertPEM), "clientKeyData": string(b.KeyPEM)}), "do not form a pair"},
		{"too large", big, "more than 1048576 bytes"},
	} {
		t.Run(c.name, func(t *testing.T) {
			p := newPlugin(t)
			p.prints(t, c.out)
			_, err := ExecCredential(context.Background(), hostRunner, p.provider(v1), "https://a", ca.pem)
			wantErr(t, err, "exec credential plugin "+p.script, c.want)
			if err != nil && (strings.Contains(err.Error(), "secret-value-xyz") || strings.Contains(err.Error(), "PRIVATE KEY")) {
				t.Errorf("the error quotes the output: %v", err)
			}
		})
	}
}

func TestExecCredentialPluginFails(t *testing.T) {
	p := newPlugin(t)
	_, err := ExecCredential(context.Background(), hostRunner,
		p.provider(v1, "FAIL=cannot reach the identity provider"), "https://a", nil)
	wantErr(t, err, "exec credential plugin", "exit status 3", "cannot reach the identity provider")
}

func TestExecCredentialRefusedBeforeRunning(t *testing.T) {
	ran := false
	run := func(context.Context, []string, []string) ([]byte, error) { ran = true; return nil, nil }
	_, err := ExecCredential(context.Background(), run, ExecPlugin{APIVersion: "client.authentication.k8s.io/v1alpha1", Command: "x"}, "https://a", nil)
	wantErr(t, err, `apiVersion "client.authentication.k8s.io/v1alpha1" is not supported`)
	_, err = ExecCredential(context.Background(), run, ExecPlugin{APIVersion: v1}, "https://a", nil)
	wantErr(t, err, "no command")
	if ran {
		t.Error("the plugin ran")
	}
}
