// Package kubecheck verifies that a worker node came back after nodespawn
// switched machines: the Node is Ready, checked with the node's own
// credentials against the API server, which may read its own Node object
// (the Node authorizer allows a node to get its own Node).
//
// The credentials are the ones the kubelet in the new machine uses: its
// client certificate as the kubelet keeps it (KubeletClientCert), or what
// the manifest's exec credential plugin prints when run inside the machine
// (ExecCredential). GetNode reads the Node once; WaitReady polls it until
// the Ready condition is True with a heartbeat from after the switch.
//
// The API server is reached over TLS verified against the cluster CA only
// (kubernetes.caCert), never the system roots: a node's API server is
// named by the cluster's own CA, and trusting public CAs for it would let
// any publicly certified host stand in for it.
package kubecheck

import (
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"strings"
	"time"
)

// Credentials are what the node authenticates with: a client certificate
// and its key (PEM), a bearer token, or both (then both are sent, as
// client-go does).
//
// They are secrets. Printing them with any fmt verb, logging them with
// slog, or marshalling them to JSON shows only what they are (the
// certificate's subject and expiry), never the key or the token. That
// cannot cover a Credentials held in an unexported field of another
// struct printed with %v: fmt cannot call methods there.
type Credentials struct {
	// CertPEM is the client certificate chain, PEM, leaf first.
	CertPEM []byte
	// KeyPEM is the certificate's private key, PEM.
	KeyPEM []byte
	// Token is a bearer token.
	Token string
}

// String describes the credentials without their secrets, e.g. "client
// certificate CN=system:node:n1,O=system:nodes (valid until
// 2027-11-30T06:10:37Z), key redacted".
func (c Credentials) String() string {
	var parts []string
	if len(c.CertPEM) > 0 || len(c.KeyPEM) > 0 {
		parts = append(parts, "client certificate "+certSummary(c.CertPEM)+", key redacted")
	}
	if c.Token != "" {
		parts = append(parts, "bearer token (redacted)")
	}
	if len(parts) == 0 {
		return "no credentials"
	}
	return strings.Join(parts, " and ")
}

// GoString is String, for %#v.
func (c Credentials) GoString() string { return "kubecheck.Credentials{" + c.String() + "}" }

// Format writes String for every verb, so that neither %x nor %d (which
// would otherwise print the fields) shows a secret.
func (c Credentials) Format(f fmt.State, verb rune) {
	if verb == 'v' && f.Flag('#') {
		io.WriteString(f, c.GoString())
		return
	}
	io.WriteString(f, c.String())
}

// LogValue is String, for slog.
func (c Credentials) LogValue() slog.Value { return slog.StringValue(c.String()) }

// MarshalJSON writes String as a JSON string, so that a report or a debug
// dump never carries the secrets.
func (c Credentials) MarshalJSON() ([]byte, error) { return json.Marshal(c.String()) }

// empty reports whether c holds nothing to authenticate with.
func (c Credentials) empty() bool {
	return len(c.CertPEM) == 0 && len(c.KeyPEM) == 0 && c.Token == ""
}

// keyPair parses the client certificate and key; ok is false when c has
// none.
func (c Credentials) keyPair() (cert tls.Certificate, ok bool, err error) {
	if len(c.CertPEM) == 0 && len(c.KeyPEM) == 0 {
		return tls.Certificate{}, false, nil
	}
	if len(c.CertPEM) == 0 || len(c.KeyPEM) == 0 {
		return tls.Certificate{}, false, errors.New("a client certificate needs both the certificate and its key")
	}
	cert, err = tls.X509KeyPair(c.CertPEM, c.KeyPEM)
	if err != nil {
		// tls's messages name the problem ("private key does not match
		// public key") and never include the key.
		return tls.Certificate{}, false, fmt.Errorf("client certificate and key do not form a pair: %w", err)
	}
	return cert, true, nil
}

// certSummary names the leaf certificate of certPEM: its subject and
// validity end.
func certSummary(certPEM []byte) string {
	for rest := certPEM; ; {
		var b *pem.Block
		b, rest = pem.Decode(rest)
		if b == nil {
			return "(no certificate)"
		}
		if b.Type != "CERTIFICATE" {
			continue
		}
		c, err := x509.ParseCertificate(b.Bytes)
		if err != nil {
			return "(unparsable certificate)"
		}
		return fmt.Sprintf("%s (valid until %s)", c.Subject, c.NotAfter.UTC().Format(time.RFC3339))
	}
}

// splitPEM splits a PEM bundle holding a certificate chain and one private
// key (kubelet's kubelet-client-current.pem, or an exec plugin's output
// joined) into the certificates and the key. Other blocks are ignored.
func splitPEM(data []byte) (certPEM, keyPEM []byte, err error) {
	rest := data
	for {
		var b *pem.Block
		b, rest = pem.Decode(rest)
		if b == nil {
			break
		}
		switch {
		case b.Type == "CERTIFICATE":
			certPEM = append(certPEM, pem.EncodeToMemory(b)...)
		case strings.HasSuffix(b.Type, "PRIVATE KEY"):
			if keyPEM != nil {
				return nil, nil, errors.New("holds more than one private key")
			}
			keyPEM = pem.EncodeToMemory(b)
		}
	}
	switch {
	case certPEM == nil && keyPEM == nil:
		return nil, nil, errors.New("holds no PEM certificate or key")
	case certPEM == nil:
		return nil, nil, errors.New("holds a private key but no certificate")
	case keyPEM == nil:
		return nil, nil, errors.New("holds a certificate but no private key")
	}
	return certPEM, keyPEM, nil
}
