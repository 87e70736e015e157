package agent

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	clientcmdv1 "k8s.io/client-go/tools/clientcmd/api/v1"
	"sigs.k8s.io/yaml"

	"github.com/nodespawn/nodespawn/internal/kubecheck"
)

// KubeconfigEndpoint is the Endpoint of a kubeconfig file's current
// context (nodespawn agent --kubeconfig): its cluster's server and CA, its
// user's client certificate or token, inline or in files (relative to the
// kubeconfig's directory). Exec and auth-provider users are not
// supported: the agent runs as the node, or as a certificate or token.
func KubeconfigEndpoint(path string) (Endpoint, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return Endpoint{}, err
	}
	var kc clientcmdv1.Config
	if err := yaml.Unmarshal(b, &kc); err != nil {
		return Endpoint{}, fmt.Errorf("kubeconfig %s: %w", path, err)
	}
	dir := filepath.Dir(path)
	read := func(data []byte, file string) ([]byte, error) {
		if len(data) > 0 || file == "" {
			return data, nil
		}
		if !filepath.IsAbs(file) {
			file = filepath.Join(dir, file)
		}
		return os.ReadFile(file)
	}
	var ctx *clientcmdv1.Context
	for i := range kc.Contexts {
		if kc.Contexts[i].Name == kc.CurrentContext {
			ctx = &kc.Contexts[i].Context
		}
	}
	if ctx == nil {
		return Endpoint{}, fmt.Errorf("kubeconfig %s: no context %q (current-context)", path, kc.CurrentContext)
	}
	var e Endpoint
	found := false
	for _, c := range kc.Clusters {
		if c.Name == ctx.Cluster {
			found = true
			e.Server = c.Cluster.Server
			if e.CAPEM, err = read(c.Cluster.CertificateAuthorityData, c.Cluster.CertificateAuthority); err != nil {
				return Endpoint{}, fmt.Errorf("kubeconfig %s: cluster %s: %w", path, c.Name, err)
			}
		}
	}
	if !found {
		return Endpoint{}, fmt.Errorf("kubeconfig %s: no cluster %q", path, ctx.Cluster)
	}
	for _, u := range kc.AuthInfos {
		if u.Name != ctx.AuthInfo {
			continue
		}
		a := u.AuthInfo
		if a.Exec != nil || a.AuthProvider != nil {
			return Endpoint{}, fmt.Errorf("kubeconfig %s: user %s authenticates with a plugin, which nodespawn agent does not run: give a client certificate or a token", path, u.Name)
		}
		var c kubecheck.Credentials
		if c.CertPEM, err = read(a.ClientCertificateData, a.ClientCertificate); err == nil {
			c.KeyPEM, err = read(a.ClientKeyData, a.ClientKey)
		}
		if err != nil {
			return Endpoint{}, fmt.Errorf("kubeconfig %s: user %s: %w", path, u.Name, err)
		}
		c.Token = a.Token
		if c.Token == "" && a.TokenFile != "" {
			t, err := read(nil, a.TokenFile)
			if err != nil {
				return Endpoint{}, fmt.Errorf("kubeconfig %s: user %s: %w", path, u.Name, err)
			}
			c.Token = strings.TrimSpace(string(t))
		}
		e.Credentials = c
		return e, nil
	}
	return Endpoint{}, errors.New("kubeconfig " + path + ": no user " + fmt.Sprintf("%q", ctx.AuthInfo))
}
