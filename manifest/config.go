package manifest

import (
	"encoding/json"
	"fmt"
	"strings"

	"github.com/opencontainers/go-digest"
)

// A fleet config (the NodeSpawnConfig of the nodespawn.dev API) is a node
// manifest that the cluster holds and every node of a rollout reads: it
// must hold no secret. An upgrade needs none: the node's identity (the
// kubelet's client certificate in the node's state) carries over, so a
// config's kubernetes.auth may be left out, and the agent that applies it
// takes the running machine's (WithAuthOf).

// LoadConfig is Load for a fleet config: kubernetes.auth may be missing or
// empty, and a manifest holding a secret is refused (Secrets names them,
// never their values).
func LoadConfig(filename string, data []byte) (*Manifest, error) {
	d := newDocument(filename, data)
	d.config = true
	m, err := load(d, data)
	if err != nil {
		return nil, err
	}
	if s := m.Secrets(); len(s) > 0 {
		return nil, &SecretsError{File: filename, Paths: s}
	}
	return m, nil
}

// SecretsError is a fleet config that holds secrets.
type SecretsError struct {
	File  string
	Paths []string
}

func (e *SecretsError) Error() string {
	return fmt.Sprintf("%s holds secrets (%s), and a fleet config is readable by every node: remove them. "+
		"An upgrade keeps the node's identity, so kubernetes.auth.bootstrapToken is not needed; "+
		"give other credentials in files on the host, not in the manifest", e.File, strings.Join(e.Paths, ", "))
}

// Secrets lists where m holds a secret (JSON paths, no values): the
// bootstrap token, the values of the exec credential plugin's environment,
// the values of extra files' HTTP headers. The one list of what a
// manifest may not carry into a fleet config; the controller's validation
// calls it too.
func (m *Manifest) Secrets() []string {
	var out []string
	a := m.Kubernetes.Auth
	if a.BootstrapToken != "" {
		out = append(out, "kubernetes.auth.bootstrapToken")
	}
	if a.Exec != nil {
		for i, e := range a.Exec.Env {
			if e.Value != "" {
				out = append(out, fmt.Sprintf("kubernetes.auth.exec.env[%d].value", i))
			}
		}
	}
	for _, x := range []struct {
		at string
		e  *Extra
	}{{"machine.extra", &m.Machine.Extra}, {"host.extra", &m.Host.Extra}} {
		for i, f := range x.e.Storage.Files {
			for j, h := range f.Contents.HTTPHeaders {
				if h.Value != nil && *h.Value != "" {
					out = append(out, fmt.Sprintf("%s.storage.files[%d].contents.httpHeaders[%d].value", x.at, i, j))
				}
			}
			for k, r := range f.Append {
				for j, h := range r.HTTPHeaders {
					if h.Value != nil && *h.Value != "" {
						out = append(out, fmt.Sprintf("%s.storage.files[%d].append[%d].httpHeaders[%d].value", x.at, i, k, j))
					}
				}
			}
		}
	}
	return out
}

// ConfigDigest identifies the node configuration m asks for, whatever the
// credentials the node joined with: Digest of m without its bootstrap
// token. For a fleet config (which holds none) it is Digest itself, and a
// machine made from the config with the running machine's token put back
// (WithAuthOf) has the config's ConfigDigest. It is the digest of the
// nodespawn.dev API ("sha256:<hex>"): a NodeSpawnConfig's spec.digest, and
// the digests a NodeSpawnNode's status reports.
func (m *Manifest) ConfigDigest() (digest.Digest, error) {
	c := *m
	c.Kubernetes.Auth.BootstrapToken = ""
	return c.Digest()
}

// WithAuthOf returns a copy of m whose empty kubernetes.auth is running's:
// the node keeps joining the way it joined. A config with its own auth
// (an exec plugin) keeps it.
func (m *Manifest) WithAuthOf(running *Manifest) *Manifest {
	c := *m
	if c.Kubernetes.Auth.BootstrapToken == "" && c.Kubernetes.Auth.Exec == nil {
		c.Kubernetes.Auth = running.Kubernetes.Auth
	}
	return &c
}

// Canonical is m's canonical JSON, the form its Digest is taken of: every
// default applied, keys in the types' order. It loads back (Load) to the
// same manifest.
func (m *Manifest) Canonical() ([]byte, error) {
	b, err := json.Marshal(m)
	if err != nil {
		return nil, fmt.Errorf("manifest: %w", err)
	}
	return b, nil
}
