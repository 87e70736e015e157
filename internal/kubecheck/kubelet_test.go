package kubecheck

import (
	"bytes"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

const certName = "kubelet-client-2026-11-30-06-10-37.pem"

// stateLayout is a kubelet state directory two levels below a parent, so
// that "../../.." from its pki directory reaches the parent.
type stateLayout struct {
	parent, state, pki string
}

func newStateLayout(t *testing.T) stateLayout {
	t.Helper()
	parent := t.TempDir()
	state := filepath.Join(parent, "machines", "kube2-kubelet")
	pki := filepath.Join(state, "pki")
	if err := os.MkdirAll(pki, 0o700); err != nil {
		t.Fatal(err)
	}
	return stateLayout{parent: parent, state: state, pki: pki}
}

// writeBundle writes creds as kubelet does: certificate then key, one file.
func writeBundle(t *testing.T, path string, creds Credentials) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, append(append([]byte{}, creds.CertPEM...), creds.KeyPEM...), 0o600); err != nil {
		t.Fatal(err)
	}
}

func symlink(t *testing.T, target, path string) {
	t.Helper()
	if err := os.Symlink(target, path); err != nil {
		t.Fatal(err)
	}
}

func TestKubeletClientCert(t *testing.T) {
	ca := newCA(t, "kubernetes")
	inside := ca.nodeCert(t, "inside", ecKey)
	insideRSA := ca.nodeCert(t, "inside-rsa", rsaKey)
	outside := ca.nodeCert(t, "outside", ecKey)

	for _, c := range []struct {
		name   string
		setup  func(t *testing.T, l stateLayout)
		wantCN string // "" means an error is wanted
		errHas []string
	}{
		{"absolute symlink into /var/lib/kubelet", func(t *testing.T, l stateLayout) {
			writeBundle(t, filepath.Join(l.pki, certName), inside)
			symlink(t, "/var/lib/kubelet/pki/"+certName, filepath.Join(l.pki, "kubelet-client-current.pem"))
		}, "system:node:inside", nil},
		{"relative symlink, RSA key", func(t *testing.T, l stateLayout) {
			writeBundle(t, filepath.Join(l.pki, certName), insideRSA)
			symlink(t, certName, filepath.Join(l.pki, "kubelet-client-current.pem"))
		}, "system:node:inside-rsa", nil},
		{"regular file", func(t *testing.T, l stateLayout) {
			writeBundle(t, filepath.Join(l.pki, "kubelet-client-current.pem"), inside)
		}, "system:node:inside", nil},
		{"chain: absolute, then relative", func(t *testing.T, l stateLayout) {
			writeBundle(t, filepath.Join(l.state, "rotated", certName), inside)
			symlink(t, "/var/lib/kubelet/pki/link", filepath.Join(l.pki, "kubelet-client-current.pem"))
			symlink(t, "../rotated/"+certName, filepath.Join(l.pki, "link"))
		}, "system:node:inside", nil},
		{"../../.. stays inside: found inside", func(t *testing.T, l stateLayout) {
			writeBundle(t, filepath.Join(l.parent, "evil.pem"), outside)
			writeBundle(t, filepath.Join(l.state, "evil.pem"), inside)
			symlink(t, "../../../evil.pem", filepath.Join(l.pki, "kubelet-client-current.pem"))
		}, "system:node:inside", nil},
		{"../../.. stays inside: missing inside", func(t *testing.T, l stateLayout) {
			writeBundle(t, filepath.Join(l.parent, "evil.pem"), outside)
			symlink(t, "../../../evil.pem", filepath.Join(l.pki, "kubelet-client-current.pem"))
		}, "", []string{"leads to", "evil.pem", "does not exist"}},
		{"absolute symlink climbing out of /var/lib/kubelet", func(t *testing.T, l stateLayout) {
			writeBundle(t, filepath.Join(l.parent, "evil.pem"), outside)
			writeBundle(t, filepath.Join(l.state, "evil.pem"), inside)
			symlink(t, "/var/lib/kubelet/../../../evil.pem", filepath.Join(l.pki, "kubelet-client-current.pem"))
		}, "", []string{"outside the kubelet's state directory", "refusing"}},
		{"absolute symlink elsewhere in the machine", func(t *testing.T, l stateLayout) {
			symlink(t, "/etc/kubernetes/pki/kubelet.pem", filepath.Join(l.pki, "kubelet-client-current.pem"))
		}, "", []string{"symlink to /etc/kubernetes/pki/kubelet.pem, outside"}},
		{"pki itself a symlink out", func(t *testing.T, l stateLayout) {
			writeBundle(t, filepath.Join(l.parent, "kubelet-client-current.pem"), outside)
			if err := os.Remove(l.pki); err != nil {
				t.Fatal(err)
			}
			symlink(t, "../..", l.pki)
		}, "", []string{"has not bootstrapped"}},
		{"symlink loop", func(t *testing.T, l stateLayout) {
			symlink(t, "/var/lib/kubelet/pki/kubelet-client-current.pem", filepath.Join(l.pki, "kubelet-client-current.pem"))
		}, "", []string{"more than 8 symlinks"}},
		{"dangling symlink", func(t *testing.T, l stateLayout) {
			symlink(t, "/var/lib/kubelet/pki/"+certName, filepath.Join(l.pki, "kubelet-client-current.pem"))
		}, "", []string{"leads to", certName, "does not exist"}},
		{"certificate and key of different pairs", func(t *testing.T, l stateLayout) {
			writeBundle(t, filepath.Join(l.pki, "kubelet-client-current.pem"), Credentials{CertPEM: inside.CertPEM, KeyPEM: outside.KeyPEM})
		}, "", []string{"kubelet-client-current.pem", "do not form a pair"}},
		{"no key", func(t *testing.T, l stateLayout) {
			writeBundle(t, filepath.Join(l.pki, "kubelet-client-current.pem"), Credentials{CertPEM: inside.CertPEM})
		}, "", []string{"holds a certificate but no private key"}},
		{"too large", func(t *testing.T, l stateLayout) {
			big := append(append(bytes.Repeat([]byte("# padding\n"), maxPEMBytes/10+1), inside.CertPEM...), inside.KeyPEM...)
			writeBundle(t, filepath.Join(l.pki, "kubelet-client-current.pem"), Credentials{CertPEM: big})
		}, "", []string{"larger than 1048576 bytes"}},
		{"not PEM", func(t *testing.T, l stateLayout) {
			writeBundle(t, filepath.Join(l.pki, "kubelet-client-current.pem"), Credentials{CertPEM: []byte("garbage")})
		}, "", []string{"holds no PEM certificate or key"}},
	} {
		t.Run(c.name, func(t *testing.T) {
			l := newStateLayout(t)
			c.setup(t, l)
			creds, err := KubeletClientCert(l.state)
			if c.wantCN == "" {
				if err == nil {
					t.Fatalf("got %s, want an error", creds)
				}
				for _, p := range c.errHas {
					if !strings.Contains(err.Error(), p) {
						t.Errorf("error %q does not say %q", err, p)
					}
				}
				if strings.Contains(err.Error(), "PRIVATE KEY") {
					t.Errorf("the error shows the key: %v", err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if got := leafCN(t, creds.CertPEM); got != c.wantCN {
				t.Errorf("got the certificate of %s, want %s", got, c.wantCN)
			}
			if _, ok, err := creds.keyPair(); !ok || err != nil {
				t.Errorf("not a key pair: %v", err)
			}
			if creds.Token != "" {
				t.Error("a token from a certificate file")
			}
		})
	}
}

func TestKubeletClientCertMissing(t *testing.T) {
	l := newStateLayout(t)
	_, err := KubeletClientCert(l.state)
	want := filepath.Join(l.state, "pki/kubelet-client-current.pem")
	wantErr(t, err, "has not bootstrapped", "no client certificate yet", want)
	if !errors.Is(err, ErrNoClientCert) || !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("%v: want ErrNoClientCert and fs.ErrNotExist", err)
	}

	// No pki directory at all: the same.
	if err := os.Remove(l.pki); err != nil {
		t.Fatal(err)
	}
	if _, err := KubeletClientCert(l.state); !errors.Is(err, ErrNoClientCert) {
		t.Errorf("no pki directory: %v, want ErrNoClientCert", err)
	}

	_, err = KubeletClientCert(filepath.Join(l.parent, "no-such-dir"))
	wantErr(t, err, "kubelet state directory", "no-such-dir")
}

func TestLinkTarget(t *testing.T) {
	for _, c := range []struct {
		p, target, want string
		ok              bool
	}{
		{"pki/current.pem", "/var/lib/kubelet/pki/x.pem", "pki/x.pem", true},
		{"pki/current.pem", "x.pem", "pki/x.pem", true},
		{"pki/current.pem", "../../../../x.pem", "x.pem", true},
		{"pki/current.pem", "/var/lib/kubelet", "", true},
		{"pki/current.pem", "/var/lib/kubelet-other/x.pem", "", false},
		{"pki/current.pem", "/var/lib/kubelet/../x.pem", "", false},
		{"pki/current.pem", "/x.pem", "", false},
	} {
		got, ok := linkTarget(c.p, c.target)
		if got != c.want || ok != c.ok {
			t.Errorf("linkTarget(%q, %q) = %q, %v; want %q, %v", c.p, c.target, got, ok, c.want, c.ok)
		}
	}
}
