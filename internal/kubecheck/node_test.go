package kubecheck

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"io"
	"log"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"
)

func getNode(t *testing.T, f *fakeAPI, caPEM []byte, creds Credentials, name string) (*Node, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	return GetNode(ctx, f.URL, caPEM, creds, name)
}

func wantErr(t *testing.T, err error, parts ...string) {
	t.Helper()
	if err == nil {
		t.Fatalf("got no error, want one with %q", parts)
	}
	for _, p := range parts {
		if !strings.Contains(err.Error(), p) {
			t.Errorf("error %q does not say %q", err, p)
		}
	}
}

// newTLSServer serves handler over TLS with cert, quietly.
func newTLSServer(t *testing.T, cert tls.Certificate, handler http.HandlerFunc) *httptest.Server {
	srv := httptest.NewUnstartedServer(handler)
	srv.TLS = &tls.Config{Certificates: []tls.Certificate{cert}}
	srv.Config.ErrorLog = log.New(io.Discard, "", 0)
	srv.StartTLS()
	t.Cleanup(srv.Close)
	return srv
}

func TestGetNodeClientCert(t *testing.T) {
	for _, kind := range []keyKind{ecKey, rsaKey} {
		ca := newCA(t, "kubernetes")
		f := newFakeAPI(t, ca, tls.RequireAndVerifyClientCert)
		hb := time.Date(2026, 11, 30, 6, 10, 37, 0, time.UTC)
		f.setState(nodeState{ready: "True", reason: "KubeletReady", message: "kubelet is posting ready status", heartbeat: hb, version: "v1.37.2"})
		n, err := getNode(t, f, ca.pem, ca.nodeCert(t, "e2e-node", kind), "e2e-node")
		if err != nil {
			t.Fatal(err)
		}
		want := Node{Name: "e2e-node", UID: "7c1f1a52-0d55-4a8e-9d1e-2b0b5b4f6a11", KubeletVersion: "v1.37.2",
			Ready: true, Reason: "KubeletReady", Message: "kubelet is posting ready status", LastHeartbeat: hb}
		if !n.LastHeartbeat.Equal(hb) {
			t.Errorf("heartbeat %v, want %v", n.LastHeartbeat, hb)
		}
		n.LastHeartbeat = hb
		if *n != want {
			t.Errorf("got %+v\nwant %+v", *n, want)
		}
		if got := f.user(0); got != "system:node:e2e-node" {
			t.Errorf("the server saw user %q, want the client certificate's", got)
		}
	}
}

func TestGetNodeNotReady(t *testing.T) {
	ca := newCA(t, "kubernetes")
	f := newFakeAPI(t, ca, tls.RequireAndVerifyClientCert)
	creds := ca.nodeCert(t, "e2e-node", ecKey)
	f.setState(nodeState{ready: "False", reason: "KubeletNotReady", message: "container runtime network not ready: NetworkReady=false", heartbeat: time.Now()})
	n, err := getNode(t, f, ca.pem, creds, "e2e-node")
	if err != nil {
		t.Fatal(err)
	}
	if n.Ready || n.String() != "KubeletNotReady: container runtime network not ready: NetworkReady=false" {
		t.Errorf("got %+v (%s), want NotReady with the reason", n, n)
	}
	f.setState(nodeState{ready: "Unknown", reason: "NodeStatusUnknown", message: "Kubelet stopped posting node status.", heartbeat: time.Now()})
	if n, err = getNode(t, f, ca.pem, creds, "e2e-node"); err != nil || n.Ready {
		t.Errorf("Unknown: got %+v, %v; want not Ready", n, err)
	}
	f.setState(nodeState{})
	if n, err = getNode(t, f, ca.pem, creds, "e2e-node"); err != nil || n.Ready || n.String() != "no Ready condition reported yet" {
		t.Errorf("no condition: got %+v (%s), %v", n, n, err)
	}
}

func TestGetNodeBearerToken(t *testing.T) {
	ca := newCA(t, "kubernetes")
	f := newFakeAPI(t, ca, tls.VerifyClientCertIfGiven)
	f.tokens["s3cr3t-token-value"] = "system:node:e2e-node"
	n, err := getNode(t, f, ca.pem, Credentials{Token: "s3cr3t-token-value"}, "e2e-node")
	if err != nil {
		t.Fatal(err)
	}
	if !n.Ready || f.user(0) != "system:node:e2e-node" {
		t.Errorf("got %+v as user %q", n, f.user(0))
	}

	_, err = getNode(t, f, ca.pem, Credentials{Token: "wrong-token-value"}, "e2e-node")
	wantErr(t, err, "rejected the credentials", "401", "bearer token (redacted)")
	if !errors.Is(err, ErrUnauthorized) || !credentialsRefused(err) {
		t.Errorf("401: %v is not ErrUnauthorized", err)
	}
	if strings.Contains(err.Error(), "wrong-token-value") {
		t.Errorf("the error shows the token: %v", err)
	}
	var apiErr *APIError
	if !errors.As(err, &apiErr) || apiErr.Code != 401 || apiErr.Reason != "Unauthorized" {
		t.Errorf("want an *APIError 401 Unauthorized, got %#v", apiErr)
	}
}

func TestGetNodeClientCertFromAnotherCA(t *testing.T) {
	ca := newCA(t, "kubernetes")
	f := newFakeAPI(t, ca, tls.VerifyClientCertIfGiven)
	// Not trusted by the server, which asks for a certificate but does
	// not require one, as a real API server: the certificate is sent
	// anyway (as kubelet does) and refused.
	other := newCA(t, "someone-else")
	_, err := getNode(t, f, ca.pem, other.nodeCert(t, "e2e-node", ecKey), "e2e-node")
	if err == nil || !credentialsRefused(err) {
		t.Fatalf("got %v, want the credentials refused", err)
	}
	wantErr(t, err, "refused the TLS handshake with the client certificate CN=system:node:e2e-node", "remote error: tls:")
}

func TestGetNodeHandshakeRefused(t *testing.T) {
	ca := newCA(t, "kubernetes")
	f := newFakeAPI(t, ca, tls.RequireAndVerifyClientCert)
	f.tokens["tok"] = "system:node:e2e-node"
	_, err := getNode(t, f, ca.pem, Credentials{Token: "tok"}, "e2e-node")
	wantErr(t, err, "refused the TLS handshake with no client certificate")
	if !credentialsRefused(err) || permanent(err) {
		t.Errorf("%v: want credentials refused, not permanent", err)
	}
	other := newCA(t, "someone-else")
	_, err = getNode(t, f, ca.pem, other.nodeCert(t, "e2e-node", ecKey), "e2e-node")
	wantErr(t, err, "refused the TLS handshake with the client certificate CN=system:node:e2e-node")
}

func TestGetNodeForbidden(t *testing.T) {
	ca := newCA(t, "kubernetes")
	f := newFakeAPI(t, ca, tls.RequireAndVerifyClientCert)
	msg := `nodes "e2e-node" is forbidden: User "system:node:e2e-node" cannot get resource "nodes" in API group "" at the cluster scope`
	f.setState(nodeState{code: http.StatusForbidden, reason: "Forbidden", message: msg})
	_, err := getNode(t, f, ca.pem, ca.nodeCert(t, "e2e-node", ecKey), "e2e-node")
	wantErr(t, err, "may not read the node", "403 Forbidden", msg)
	if !errors.Is(err, ErrForbidden) || errors.Is(err, ErrUnauthorized) {
		t.Errorf("%v: want ErrForbidden only", err)
	}
}

func TestGetNodeNotFound(t *testing.T) {
	ca := newCA(t, "kubernetes")
	f := newFakeAPI(t, ca, tls.RequireAndVerifyClientCert)
	_, err := getNode(t, f, ca.pem, ca.nodeCert(t, "other-node", ecKey), "other-node")
	wantErr(t, err, "get node other-node: node not registered with the API server (404 Not Found): "+`nodes "other-node" not found`)
	if !errors.Is(err, ErrNodeNotFound) {
		t.Errorf("%v: want ErrNodeNotFound", err)
	}
}

func TestGetNodeOtherStatus(t *testing.T) {
	ca := newCA(t, "kubernetes")
	f := newFakeAPI(t, ca, tls.RequireAndVerifyClientCert)
	f.setState(nodeState{code: http.StatusServiceUnavailable, reason: "ServiceUnavailable", message: "etcd is down"})
	_, err := getNode(t, f, ca.pem, ca.nodeCert(t, "e2e-node", ecKey), "e2e-node")
	wantErr(t, err, "503 Service Unavailable: etcd is down")
	if errors.Is(err, ErrForbidden) || errors.Is(err, ErrUnauthorized) || errors.Is(err, ErrNodeNotFound) || permanent(err) {
		t.Errorf("%v: wraps the wrong sentinel", err)
	}
}

func TestGetNodeNotANode(t *testing.T) {
	ca := newCA(t, "kubernetes")
	srv := newTLSServer(t, ca.serverCert(t, "127.0.0.1"), func(w http.ResponseWriter, r *http.Request) {
		w.Write([]byte(`{"kind":"Pod","metadata":{"name":"e2e-node"}}`))
	})
	_, err := GetNode(context.Background(), srv.URL, ca.pem, Credentials{Token: "t"}, "e2e-node")
	wantErr(t, err, `not Node e2e-node (kind "Pod"`)
}

func TestGetNodeNoRedirect(t *testing.T) {
	ca := newCA(t, "kubernetes")
	srv := newTLSServer(t, ca.serverCert(t, "127.0.0.1"), func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/elsewhere" {
			http.Redirect(w, r, "/elsewhere", http.StatusFound)
			return
		}
		w.Write([]byte(`{"kind":"Node","metadata":{"name":"e2e-node"}}`))
	})
	_, err := GetNode(context.Background(), srv.URL, ca.pem, Credentials{Token: "t"}, "e2e-node")
	wantErr(t, err, "302 Found")
}

func TestGetNodeWrongCA(t *testing.T) {
	ca := newCA(t, "kubernetes")
	f := newFakeAPI(t, ca, tls.RequireAndVerifyClientCert)
	other := newCA(t, "not-the-cluster-ca")
	_, err := getNode(t, f, other.pem, ca.nodeCert(t, "e2e-node", ecKey), "e2e-node")
	wantErr(t, err, "not signed by the cluster CA (kubernetes.caCert)", "CN=kube-apiserver", "issued by CN=kubernetes")
	if !permanent(err) {
		t.Errorf("%v: an unverifiable server is not worth asking again", err)
	}
}

func TestGetNodeWrongHost(t *testing.T) {
	ca := newCA(t, "kubernetes")
	srv := newTLSServer(t, ca.serverCert(t, "apiserver.example"), func(http.ResponseWriter, *http.Request) {})
	_, err := GetNode(context.Background(), srv.URL, ca.pem, Credentials{Token: "t"}, "e2e-node")
	wantErr(t, err, "not valid for the host in kubernetes.apiServer", "127.0.0.1")
}

func TestGetNodeNoSystemRoots(t *testing.T) {
	ca := newCA(t, "kubernetes")
	tr, err := newTransport(ca.pem, Credentials{Token: "t"})
	if err != nil {
		t.Fatal(err)
	}
	want := x509.NewCertPool()
	want.AddCert(ca.cert)
	if !tr.TLSClientConfig.RootCAs.Equal(want) {
		t.Error("the transport trusts more than the cluster CA")
	}
	if tr.TLSClientConfig.InsecureSkipVerify {
		t.Error("verification is off")
	}
}

func TestGetNodeNotTLS(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(http.ResponseWriter, *http.Request) {}))
	defer srv.Close()
	ca := newCA(t, "kubernetes")
	_, err := GetNode(context.Background(), strings.Replace(srv.URL, "http:", "https:", 1), ca.pem, Credentials{Token: "t"}, "e2e-node")
	wantErr(t, err, "did not answer with TLS")
}

func TestGetNodeConnectionRefused(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	ca := newCA(t, "kubernetes")
	_, err = GetNode(context.Background(), "https://"+addr, ca.pem, Credentials{Token: "t"}, "e2e-node")
	wantErr(t, err, "connection refused: nothing listens at the API server's address", "https://"+addr)
	if permanent(err) {
		t.Errorf("%v: an API server not up yet may come up", err)
	}
}

func TestGetNodeBadInput(t *testing.T) {
	ca := newCA(t, "kubernetes")
	creds := Credentials{Token: "t"}
	for _, c := range []struct {
		name      string
		apiServer string
		caPEM     []byte
		creds     Credentials
		node      string
		want      string
	}{
		{"http URL", "http://127.0.0.1:6443", ca.pem, creds, "n", "want https://"},
		{"no host", "https://", ca.pem, creds, "n", "want https://"},
		{"no CA", "https://127.0.0.1:6443", []byte("not PEM"), creds, "n", "holds no PEM certificate"},
		{"no credentials", "https://127.0.0.1:6443", ca.pem, Credentials{}, "n", "no credentials"},
		{"key missing", "https://127.0.0.1:6443", ca.pem, Credentials{CertPEM: ca.pem}, "n", "needs both"},
		{"bad name", "https://127.0.0.1:6443", ca.pem, creds, "../secrets", "not a valid Node name"},
		{"empty name", "https://127.0.0.1:6443", ca.pem, creds, "", "not a valid Node name"},
	} {
		_, err := GetNode(context.Background(), c.apiServer, c.caPEM, c.creds, c.node)
		if err == nil || !strings.Contains(err.Error(), c.want) || !permanent(err) {
			t.Errorf("%s: got %v, want a permanent error with %q", c.name, err, c.want)
		}
	}
}

func TestNodeURL(t *testing.T) {
	for in, want := range map[string]string{
		"https://10.0.0.1:6443":         "https://10.0.0.1:6443/api/v1/nodes/n1",
		"https://api.example/":          "https://api.example/api/v1/nodes/n1",
		"https://api.example/prefix":    "https://api.example/prefix/api/v1/nodes/n1",
		"https://api.example/p/?x=1#ab": "https://api.example/p/api/v1/nodes/n1",
	} {
		got, err := nodeURL(in, "n1")
		if err != nil || got != want {
			t.Errorf("nodeURL(%q) = %q, %v; want %q", in, got, err, want)
		}
	}
}
