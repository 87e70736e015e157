package kubecheck

import (
	"bytes"
	"encoding/json"
	"fmt"
	"log/slog"
	"strings"
	"testing"
)

// No way of printing Credentials shows the key or the token.
func TestCredentialsRedacted(t *testing.T) {
	ca := newCA(t, "kubernetes")
	creds := ca.nodeCert(t, "e2e-node", ecKey)
	creds.Token = "tok-0123456789abcdef"
	keyBody := string(bytes.Split(creds.KeyPEM, []byte("\n"))[1])

	var shown []string
	for _, verb := range []string{"%v", "%+v", "%#v", "%s", "%q", "%x", "%X", "%d"} {
		shown = append(shown, fmt.Sprintf(verb, creds), fmt.Sprintf(verb, &creds))
	}
	shown = append(shown, fmt.Sprint(creds), fmt.Sprintln(creds), fmt.Sprintf("%T %v", creds, creds), fmt.Sprintf("%v", []Credentials{creds}),
		fmt.Sprintf("%+v", struct{ C Credentials }{creds}))
	var logs bytes.Buffer
	slog.New(slog.NewTextHandler(&logs, nil)).Info("x", "creds", creds)
	slog.New(slog.NewJSONHandler(&logs, nil)).Info("x", "creds", creds, "ptr", &creds)
	shown = append(shown, logs.String())
	j, err := json.Marshal(map[string]any{"creds": creds})
	if err != nil {
		t.Fatal(err)
	}
	shown = append(shown, string(j))

	for _, s := range shown {
		for _, secret := range []string{"tok-0123456789abcdef", keyBody, "PRIVATE KEY", fmt.Sprintf("%x", creds.KeyPEM[:16]), fmt.Sprint(creds.KeyPEM[:8])} {
			if strings.Contains(s, secret) {
				t.Errorf("%q shows a secret (%q)", s, secret)
			}
		}
		if !strings.Contains(s, "CN=system:node:e2e-node") {
			t.Errorf("%q does not say whose certificate it is", s)
		}
	}
	if got := fmt.Sprint(Credentials{Token: "x"}); got != "bearer token (redacted)" {
		t.Errorf("token only: %q", got)
	}
	if got := fmt.Sprint(Credentials{}); got != "no credentials" {
		t.Errorf("empty: %q", got)
	}
}

func TestSplitPEM(t *testing.T) {
	ca := newCA(t, "kubernetes")
	nc := ca.nodeCert(t, "n", rsaKey)
	// kubelet writes the certificate, then the key; the order must not
	// matter, nor a chain.
	bundle := bytes.Join([][]byte{nc.KeyPEM, nc.CertPEM, ca.pem}, nil)
	certPEM, keyPEM, err := splitPEM(bundle)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(keyPEM, nc.KeyPEM) || !bytes.Equal(certPEM, append(append([]byte{}, nc.CertPEM...), ca.pem...)) {
		t.Errorf("split wrong:\ncert %s\nkey %s", certPEM, keyPEM)
	}
	if _, _, err := splitPEM(bytes.Join([][]byte{nc.CertPEM, nc.KeyPEM, nc.KeyPEM}, nil)); err == nil || !strings.Contains(err.Error(), "more than one private key") {
		t.Errorf("two keys: %v", err)
	}
	if _, _, err := splitPEM(nc.KeyPEM); err == nil || !strings.Contains(err.Error(), "no certificate") {
		t.Errorf("key only: %v", err)
	}
}
