package kubecheck

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strings"
	"syscall"
	"time"

	"github.com/nodespawn/nodespawn/internal/httpx"
	"github.com/nodespawn/nodespawn/internal/lazyre"
)

// Node is what GetNode reads of a Node object.
type Node struct {
	Name           string
	UID            string
	KubeletVersion string
	// Ready is whether the Ready condition's status is "True"; Reason and
	// Message are the condition's (KubeletNotReady, "container runtime
	// network not ready: ..."), LastHeartbeat its lastHeartbeatTime. All
	// are zero when the node reports no Ready condition yet.
	Ready         bool
	Reason        string
	Message       string
	LastHeartbeat time.Time
}

// String describes the node's readiness in one line.
func (n *Node) String() string {
	switch {
	case n == nil:
		return "no node"
	case n.Ready:
		return fmt.Sprintf("Ready (heartbeat %s)", n.LastHeartbeat.UTC().Format(time.RFC3339))
	case n.Reason == "" && n.Message == "" && n.LastHeartbeat.IsZero():
		return "no Ready condition reported yet"
	case n.Message == "":
		return n.Reason
	case n.Reason == "":
		return "NotReady: " + n.Message
	}
	return n.Reason + ": " + n.Message
}

// Errors GetNode's error wraps for the API server's answers.
var (
	// ErrUnauthorized: 401, the API server did not accept the credentials
	// (unknown CA, expired certificate, bad token).
	ErrUnauthorized = errors.New("the API server rejected the credentials")
	// ErrForbidden: 403, the credentials were accepted but may not read
	// this Node (a node may read only its own).
	ErrForbidden = errors.New("the credentials may not read the node")
	// ErrNodeNotFound: 404, no Node of that name is registered.
	ErrNodeNotFound = errors.New("node not registered with the API server")
)

// APIError is an answer of the API server other than 200, with the
// message of its Status body.
type APIError struct {
	Code   int    // HTTP status code
	Status string // HTTP status line ("403 Forbidden")
	// Reason and Message are the Status object's (Forbidden, `nodes "x"
	// is forbidden: User "system:node:y" cannot get ...`), or Message is
	// the start of a body that was not a Status.
	Reason  string
	Message string
	// what says what the code means for this request.
	what error
}

func (e *APIError) Error() string {
	s := e.Status
	if e.what != nil {
		s = e.what.Error() + " (" + e.Status + ")"
	}
	if e.Message != "" {
		s += ": " + e.Message
	}
	return s
}

// Unwrap lets errors.Is find ErrUnauthorized, ErrForbidden or
// ErrNodeNotFound.
func (e *APIError) Unwrap() error { return e.what }

// errConfig marks an error in what GetNode was given (the CA, the URL,
// the name, the credentials): asking again cannot help.
type errConfig struct{ error }

func (e errConfig) Unwrap() error { return e.error }

// errServerCert marks a failure to verify the API server's certificate:
// asking again cannot help either.
type errServerCert struct{ error }

func (e errServerCert) Unwrap() error { return e.error }

// errHandshakeRefused marks the server ending the TLS handshake with an
// alert: it did not accept the client certificate (or its absence).
type errHandshakeRefused struct{ error }

func (e errHandshakeRefused) Unwrap() error { return e.error }

// permanent reports whether err cannot go away by asking again.
func permanent(err error) bool {
	var c errConfig
	var s errServerCert
	return errors.As(err, &c) || errors.As(err, &s)
}

// credentialsRefused reports whether err says the API server did not take
// the credentials, so fresh ones may help.
func credentialsRefused(err error) bool {
	var h errHandshakeRefused
	return errors.Is(err, ErrUnauthorized) || errors.As(err, &h)
}

const (
	// maxNodeBytes bounds the Node object read: the API server stores
	// objects of at most about 1.5 MiB.
	maxNodeBytes = 8 << 20
	// maxErrorBytes bounds the error body read.
	maxErrorBytes = 64 << 10
)

// nodeNameRE is a DNS subdomain, what a Node's name is, but for its
// length (validNodeName): a bounded repetition, {0,251}, compiles to 251
// copies, milliseconds at every start of the binary.
var nodeNameRE = lazyre.New(`^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$`)

// validNodeName says whether name is a DNS subdomain of at most 253 bytes.
func validNodeName(name string) bool {
	return len(name) <= 253 && nodeNameRE().MatchString(name)
}

// GetNode reads the Node name from the API server at apiServer (an https
// URL, as kubernetes.apiServer) with creds: a client certificate, a
// bearer token, or both. TLS is verified against caPEM alone, never the
// system roots. The request is not retried (WaitReady polls).
//
// The transport is httpx.NewTransport's (its dial, TLS handshake and
// response header bounds, HTTPS_PROXY and NO_PROXY), with the cluster CA
// as its only root and creds' client certificate; not httpx.NewClient's
// retries. ctx bounds the whole request.
//
// Errors say what happened: an *APIError wrapping ErrUnauthorized (401),
// ErrForbidden (403) or ErrNodeNotFound (404), with the API's Status
// message; the CA that did not verify the server's certificate; the
// server refusing the client certificate in the handshake; a refused
// connection.
func GetNode(ctx context.Context, apiServer string, caPEM []byte, creds Credentials, name string) (*Node, error) {
	if !validNodeName(name) {
		return nil, errConfig{fmt.Errorf("node name %q is not a valid Node name (a DNS subdomain)", name)}
	}
	u, err := nodeURL(apiServer, name)
	if err != nil {
		return nil, errConfig{err}
	}
	tr, err := newTransport(caPEM, creds)
	if err != nil {
		return nil, errConfig{err}
	}
	defer tr.CloseIdleConnections()

	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
	if err != nil {
		return nil, errConfig{fmt.Errorf("get node %s: %w", name, err)}
	}
	req.Header.Set("Accept", "application/json")
	req.Header.Set("User-Agent", "nodespawn-kubecheck")
	if creds.Token != "" {
		req.Header.Set("Authorization", "Bearer "+creds.Token)
	}
	client := &http.Client{
		Transport: tr,
		// The API server does not redirect this request; a redirect
		// would take the credentials elsewhere. It is answered as is.
		CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
	}
	resp, err := client.Do(req)
	if err != nil {
		return nil, fmt.Errorf("get node %s from %s: %w", name, httpx.Redact(apiServer), transportError(httpx.WithoutURL(err), creds))
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		apiErr := newAPIError(resp)
		if apiErr.Code == http.StatusUnauthorized {
			return nil, fmt.Errorf("get node %s with %s: %w", name, creds, apiErr)
		}
		return nil, fmt.Errorf("get node %s: %w", name, apiErr)
	}
	node, err := decodeNode(resp.Body, name)
	if err != nil {
		return nil, fmt.Errorf("get node %s: %w", name, err)
	}
	return node, nil
}

// nodeURL is apiServer's /api/v1/nodes/name, keeping a path prefix the
// server URL may have.
func nodeURL(apiServer, name string) (string, error) {
	u, err := url.Parse(apiServer)
	if err != nil {
		return "", fmt.Errorf("API server URL: %w", err)
	}
	if u.Scheme != "https" || u.Host == "" {
		return "", fmt.Errorf("API server URL %s: want https://host[:port]", httpx.Redact(apiServer))
	}
	u.RawQuery, u.Fragment = "", ""
	return u.JoinPath("api", "v1", "nodes", name).String(), nil
}

// newTransport is a one-request transport that trusts caPEM only and
// presents creds' client certificate, if any.
func newTransport(caPEM []byte, creds Credentials) (*http.Transport, error) {
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(caPEM) {
		return nil, errors.New("the cluster CA (kubernetes.caCert) holds no PEM certificate")
	}
	if creds.empty() {
		return nil, errors.New("no credentials: want a client certificate or a bearer token")
	}
	opts := []httpx.Option{httpx.WithRoots(pool)}
	if cert, ok, err := creds.keyPair(); err != nil {
		return nil, err
	} else if ok {
		opts = append(opts, httpx.WithClientCert(cert))
	}
	tr := httpx.NewTransport(opts...)
	tr.DisableKeepAlives = true // one request; WaitReady's next poll dials afresh
	return tr, nil
}

// TransportError says in words what a failed request to the API server
// with creds ran into (an unknown CA, a refused client certificate, a
// refused connection...), for other clients of the API server (nodespawn
// agent).
func TransportError(err error, creds Credentials) error { return transportError(err, creds) }

// transportError says in words what a failed request ran into.
func transportError(err error, creds Credentials) error {
	var (
		unknownCA   x509.UnknownAuthorityError
		hostname    x509.HostnameError
		invalid     x509.CertificateInvalidError
		recordHdr   tls.RecordHeaderError
		opErr       *net.OpError
		dnsErr      *net.DNSError
		netErr      net.Error
		clientCerts = "no client certificate"
	)
	if len(creds.CertPEM) > 0 {
		clientCerts = "the client certificate " + certSummary(creds.CertPEM)
	}
	switch {
	case errors.Is(err, context.Canceled), errors.Is(err, context.DeadlineExceeded):
		return err
	case errors.As(err, &unknownCA):
		issuer := ""
		if unknownCA.Cert != nil {
			issuer = fmt.Sprintf(" (it is %s, issued by %s)", unknownCA.Cert.Subject, unknownCA.Cert.Issuer)
		}
		return errServerCert{fmt.Errorf("the API server's certificate is not signed by the cluster CA (kubernetes.caCert)%s: %w", issuer, err)}
	case errors.As(err, &hostname):
		return errServerCert{fmt.Errorf("the API server's certificate is not valid for the host in kubernetes.apiServer: %w", err)}
	case errors.As(err, &invalid):
		return errServerCert{fmt.Errorf("the API server's certificate does not verify against the cluster CA (kubernetes.caCert): %w", err)}
	case errors.As(err, &recordHdr), strings.Contains(err.Error(), "server gave HTTP response to HTTPS client"):
		// net/http replaces a RecordHeaderError that looks like HTTP with
		// a plain error of that text.
		return errServerCert{fmt.Errorf("the API server did not answer with TLS (wrong port, or not https?): %w", err)}
	case errors.As(err, &opErr) && opErr.Op == "remote error":
		// The server sent a TLS alert: with an API server that is about
		// the client certificate (bad_certificate, unknown_ca,
		// certificate_required, certificate_expired).
		return errHandshakeRefused{fmt.Errorf("the API server refused the TLS handshake with %s (is it signed by a CA the API server trusts, and still valid?): %w", clientCerts, err)}
	case errors.Is(err, syscall.ECONNREFUSED):
		return fmt.Errorf("connection refused: nothing listens at the API server's address (is it up, is kubernetes.apiServer right?): %w", err)
	case errors.As(err, &dnsErr):
		return fmt.Errorf("cannot resolve the API server's host: %w", err)
	case errors.As(err, &netErr) && netErr.Timeout():
		return fmt.Errorf("the API server did not answer in time: %w", err)
	}
	return err
}

// apiStatus is the Status object an API server answers errors with.
type apiStatus struct {
	Kind    string `json:"kind"`
	Reason  string `json:"reason"`
	Message string `json:"message"`
}

func newAPIError(resp *http.Response) *APIError {
	e := &APIError{Code: resp.StatusCode, Status: resp.Status}
	switch resp.StatusCode {
	case http.StatusUnauthorized:
		e.what = ErrUnauthorized
	case http.StatusForbidden:
		e.what = ErrForbidden
	case http.StatusNotFound:
		e.what = ErrNodeNotFound
	}
	body, _ := io.ReadAll(io.LimitReader(resp.Body, maxErrorBytes))
	var st apiStatus
	if json.Unmarshal(body, &st) == nil && st.Kind == "Status" {
		e.Reason, e.Message = st.Reason, st.Message
	} else {
		msg := strings.Join(strings.Fields(string(body)), " ")
		if len(msg) > 256 {
			msg = msg[:256] + "..."
		}
		e.Message = msg
	}
	return e
}

// nodeJSON is the part of a Node object that is read.
type nodeJSON struct {
	Kind     string `json:"kind"`
	Metadata struct {
		Name string `json:"name"`
		UID  string `json:"uid"`
	} `json:"metadata"`
	Status struct {
		NodeInfo struct {
			KubeletVersion string `json:"kubeletVersion"`
		} `json:"nodeInfo"`
		Conditions []struct {
			Type              string    `json:"type"`
			Status            string    `json:"status"`
			Reason            string    `json:"reason"`
			Message           string    `json:"message"`
			LastHeartbeatTime time.Time `json:"lastHeartbeatTime"`
		} `json:"conditions"`
	} `json:"status"`
}

func decodeNode(body io.Reader, name string) (*Node, error) {
	data, err := io.ReadAll(io.LimitReader(body, maxNodeBytes+1))
	if err != nil {
		return nil, fmt.Errorf("read the Node: %w", err)
	}
	if len(data) > maxNodeBytes {
		return nil, fmt.Errorf("the answer is larger than %d bytes: not a Node", maxNodeBytes)
	}
	var nj nodeJSON
	if err := json.Unmarshal(data, &nj); err != nil {
		return nil, fmt.Errorf("the answer is not a Node in JSON: %w", err)
	}
	if nj.Kind != "Node" || nj.Metadata.Name != name {
		return nil, fmt.Errorf("the answer is not Node %s (kind %q, name %q)", name, nj.Kind, nj.Metadata.Name)
	}
	n := &Node{Name: nj.Metadata.Name, UID: nj.Metadata.UID, KubeletVersion: nj.Status.NodeInfo.KubeletVersion}
	for _, c := range nj.Status.Conditions {
		if c.Type == "Ready" {
			n.Ready = c.Status == "True"
			n.Reason, n.Message, n.LastHeartbeat = c.Reason, c.Message, c.LastHeartbeatTime
			break
		}
	}
	return n, nil
}
