package kubecheck

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"io"
	"log"
	"math/big"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// A test PKI: a CA made with crypto/x509, and certificates it signs.

type testCA struct {
	cert *x509.Certificate
	key  crypto.Signer
	pem  []byte
}

var serial atomic.Int64

func nextSerial() *big.Int { return big.NewInt(serial.Add(1)) }

func newCA(t *testing.T, cn string) *testCA {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          nextSerial(),
		Subject:               pkix.Name{CommonName: cn},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(24 * time.Hour),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return &testCA{cert: cert, key: key, pem: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})}
}

type keyKind int

const (
	ecKey keyKind = iota
	rsaKey
)

// issue signs a certificate for tmpl's subject and names with a new key,
// and returns the certificate and key PEM (the key as kubelet writes it:
// "EC PRIVATE KEY" or "RSA PRIVATE KEY").
func (ca *testCA) issue(t *testing.T, tmpl *x509.Certificate, kind keyKind) (certPEM, keyPEM []byte) {
	t.Helper()
	var key crypto.Signer
	var keyBlock *pem.Block
	switch kind {
	case ecKey:
		k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			t.Fatal(err)
		}
		der, err := x509.MarshalECPrivateKey(k)
		if err != nil {
			t.Fatal(err)
		}
		key, keyBlock = k, &pem.Block{Type: "EC PRIVATE KEY", Bytes: der}
	case rsaKey:
		k, err := rsa.GenerateKey(rand.Reader, 2048)
		if err != nil {
			t.Fatal(err)
		}
		key, keyBlock = k, &pem.Block{Type: "RSA PRIVATE KEY", Bytes: x509.MarshalPKCS1PrivateKey(k)}
	}
	tmpl.SerialNumber = nextSerial()
	if tmpl.NotBefore.IsZero() {
		tmpl.NotBefore = time.Now().Add(-time.Hour)
	}
	if tmpl.NotAfter.IsZero() {
		tmpl.NotAfter = time.Now().Add(24 * time.Hour)
	}
	tmpl.KeyUsage = x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, key.Public(), ca.key)
	if err != nil {
		t.Fatal(err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), pem.EncodeToMemory(keyBlock)
}

// nodeCert is a kubelet client certificate for node name.
func (ca *testCA) nodeCert(t *testing.T, name string, kind keyKind) Credentials {
	t.Helper()
	c, k := ca.issue(t, &x509.Certificate{
		Subject:     pkix.Name{CommonName: "system:node:" + name, Organization: []string{"system:nodes"}},
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	}, kind)
	return Credentials{CertPEM: c, KeyPEM: k}
}

// serverCert is an API server certificate for names (IPs or DNS names).
func (ca *testCA) serverCert(t *testing.T, names ...string) tls.Certificate {
	t.Helper()
	tmpl := &x509.Certificate{
		Subject:     pkix.Name{CommonName: "kube-apiserver"},
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	for _, n := range names {
		if ip := net.ParseIP(n); ip != nil {
			tmpl.IPAddresses = append(tmpl.IPAddresses, ip)
		} else {
			tmpl.DNSNames = append(tmpl.DNSNames, n)
		}
	}
	c, k := ca.issue(t, tmpl, ecKey)
	pair, err := tls.X509KeyPair(c, k)
	if err != nil {
		t.Fatal(err)
	}
	return pair
}

// leafCN is the common name of the first certificate in certPEM.
func leafCN(t *testing.T, certPEM []byte) string {
	t.Helper()
	b, _ := pem.Decode(certPEM)
	if b == nil {
		t.Fatalf("no PEM certificate in %q", certPEM)
	}
	c, err := x509.ParseCertificate(b.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	return c.Subject.CommonName
}

// A fake API server: real TLS on loopback, authenticating as the API
// server does (a client certificate signed by the cluster CA, or a bearer
// token), serving one Node whose state the test sets.

// nodeState is what the server answers for the node.
type nodeState struct {
	// code, when set, is answered instead of the Node, with a Status of
	// reason and message.
	code            int
	reason, message string
	// ready is the Ready condition's status ("True", "False", "Unknown"),
	// or "" for no condition at all.
	ready     string
	heartbeat time.Time
	version   string
	// hang, when set, holds the answer until it is closed.
	hang chan struct{}
}

type fakeAPI struct {
	*httptest.Server
	ca       *testCA
	nodeName string
	// tokens maps accepted bearer tokens to user names.
	tokens map[string]string

	mu       sync.Mutex
	requests int
	users    []string // who each request authenticated as ("" for none)
	state    func(request int) nodeState
}

// newFakeAPI starts the server with clientAuth (tls.RequireAndVerifyClientCert,
// or tls.VerifyClientCertIfGiven as a real API server does).
func newFakeAPI(t *testing.T, ca *testCA, clientAuth tls.ClientAuthType) *fakeAPI {
	t.Helper()
	f := &fakeAPI{ca: ca, nodeName: "e2e-node", tokens: map[string]string{}}
	f.setState(nodeState{ready: "True", heartbeat: time.Now(), version: "v1.37.2"})
	pool := x509.NewCertPool()
	pool.AddCert(ca.cert)
	f.Server = httptest.NewUnstartedServer(http.HandlerFunc(f.serve))
	f.Server.TLS = &tls.Config{
		Certificates: []tls.Certificate{ca.serverCert(t, "127.0.0.1", "localhost")},
		ClientCAs:    pool,
		ClientAuth:   clientAuth,
	}
	f.Server.Config.ErrorLog = log.New(io.Discard, "", 0)
	f.StartTLS()
	t.Cleanup(f.Close)
	return f
}

func (f *fakeAPI) setState(s nodeState) {
	f.setStates(func(int) nodeState { return s })
}

func (f *fakeAPI) setStates(fn func(request int) nodeState) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.state = fn
}

func (f *fakeAPI) count() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.requests
}

// user is whom request i (0-based) authenticated as.
func (f *fakeAPI) user(i int) string {
	f.mu.Lock()
	defer f.mu.Unlock()
	if i >= len(f.users) {
		return "(no such request)"
	}
	return f.users[i]
}

func writeStatus(w http.ResponseWriter, code int, reason, message string) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	json.NewEncoder(w).Encode(map[string]any{
		"kind": "Status", "apiVersion": "v1", "metadata": map[string]any{},
		"status": "Failure", "message": message, "reason": reason, "code": code,
	})
}

func (f *fakeAPI) serve(w http.ResponseWriter, r *http.Request) {
	f.mu.Lock()
	f.requests++
	n := f.requests
	state := f.state(n)
	user := ""
	if r.TLS != nil && len(r.TLS.VerifiedChains) > 0 {
		user = r.TLS.VerifiedChains[0][0].Subject.CommonName
	}
	if tok, ok := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer "); ok && user == "" {
		user = f.tokens[tok]
	}
	f.users = append(f.users, user)
	f.mu.Unlock()

	if state.hang != nil {
		<-state.hang
		return
	}
	if user == "" {
		writeStatus(w, http.StatusUnauthorized, "Unauthorized", "Unauthorized")
		return
	}
	name, ok := strings.CutPrefix(r.URL.Path, "/api/v1/nodes/")
	if !ok || r.Method != http.MethodGet {
		writeStatus(w, http.StatusNotFound, "NotFound", "the server could not find the requested resource")
		return
	}
	if state.code != 0 {
		writeStatus(w, state.code, state.reason, state.message)
		return
	}
	if name != f.nodeName {
		writeStatus(w, http.StatusNotFound, "NotFound", `nodes "`+name+`" not found`)
		return
	}
	var conditions []any
	conditions = append(conditions, map[string]any{
		"type": "MemoryPressure", "status": "False", "reason": "KubeletHasSufficientMemory",
		"lastHeartbeatTime": time.Now().UTC().Format(time.RFC3339),
	})
	if state.ready != "" {
		conditions = append(conditions, map[string]any{
			"type": "Ready", "status": state.ready, "reason": state.reason, "message": state.message,
			"lastHeartbeatTime":  state.heartbeat.UTC().Format(time.RFC3339),
			"lastTransitionTime": state.heartbeat.Add(-time.Hour).UTC().Format(time.RFC3339),
		})
	}
	w.Header().Set("Content-Type", "application/json")
	json.NewEncoder(w).Encode(map[string]any{
		"kind": "Node", "apiVersion": "v1",
		"metadata": map[string]any{"name": f.nodeName, "uid": "7c1f1a52-0d55-4a8e-9d1e-2b0b5b4f6a11",
			"labels": map[string]string{"kubernetes.io/hostname": f.nodeName}},
		"spec": map[string]any{"podCIDR": "10.244.1.0/24"},
		"status": map[string]any{
			"conditions": conditions,
			"nodeInfo":   map[string]any{"kubeletVersion": state.version, "containerRuntimeVersion": "containerd://2.4.2"},
			"images":     []any{map[string]any{"names": []string{"registry.k8s.io/pause:3.10"}, "sizeBytes": 320368}},
		},
	})
}
