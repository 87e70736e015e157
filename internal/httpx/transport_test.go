package httpx

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"io"
	"log"
	"math/big"
	"net/http"
	"net/http/httptest"
	"testing"
	"time"
)

// selfSigned is a certificate for cn signed by its own key.
func selfSigned(t *testing.T, cn string) tls.Certificate {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: cn},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	leaf, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key, Leaf: leaf}
}

// TestTransportRootsAndClientCert: a loopback TLS server that demands a
// client certificate answers with its common name. NewTransport trusts
// WithRoots' pool (plus WithCACerts) and presents WithClientCert's
// certificate, whatever CAs the server names.
func TestTransportRootsAndClientCert(t *testing.T) {
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, r.TLS.PeerCertificates[0].Subject.CommonName)
	}))
	srv.TLS = &tls.Config{ClientAuth: tls.RequireAnyClientCert}
	srv.Config.ErrorLog = log.New(io.Discard, "", 0) // the refused handshakes are expected
	srv.StartTLS()
	defer srv.Close()

	get := func(tr *http.Transport) (string, error) {
		defer tr.CloseIdleConnections()
		resp, err := (&http.Client{Transport: tr}).Get(srv.URL)
		if err != nil {
			return "", err
		}
		defer resp.Body.Close()
		b, err := io.ReadAll(resp.Body)
		return string(b), err
	}
	serverCA := x509.NewCertPool()
	serverCA.AddCert(srv.Certificate())
	node := selfSigned(t, "node-a")

	if got, err := get(NewTransport(WithRoots(serverCA), WithClientCert(node))); err != nil || got != "node-a" {
		t.Errorf("with the server's CA as root and a client certificate: %q, %v; want node-a", got, err)
	}
	if _, err := get(NewTransport(WithRoots(serverCA))); err == nil {
		t.Error("without a client certificate the server's demand for one was met")
	}

	// A pool that lacks the server's CA fails to verify it, system roots
	// or not; WithCACerts adds to the pool, without changing the caller's.
	other := x509.NewCertPool()
	other.AddCert(selfSigned(t, "another CA").Leaf)
	before := other.Clone()
	var unknown x509.UnknownAuthorityError
	if _, err := get(NewTransport(WithRoots(other), WithClientCert(node))); !errors.As(err, &unknown) {
		t.Errorf("with a pool that lacks the server's CA: %v, want an unknown authority", err)
	}
	if got, err := get(NewTransport(WithRoots(other), WithCACerts(srv.Certificate()), WithClientCert(node))); err != nil || got != "node-a" {
		t.Errorf("with the server's CA added to the pool: %q, %v; want node-a", got, err)
	}
	if !other.Equal(before) {
		t.Error("WithCACerts changed the pool WithRoots was given")
	}
	if tr := NewTransport(WithRoots(other)); !tr.TLSClientConfig.RootCAs.Equal(other) {
		t.Error("WithRoots: the transport trusts more than the pool (the system roots?)")
	}
	if tr := NewTransport(); tr.TLSClientConfig.RootCAs != nil || tr.TLSClientConfig.GetClientCertificate != nil {
		t.Error("NewTransport without options: not the system roots, or a client certificate")
	}
}
