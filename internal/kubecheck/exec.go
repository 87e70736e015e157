package kubecheck

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
)

// Runner runs argv inside the machine with env ("NAME=value" entries)
// added to the environment the command gets there, and returns its
// standard output. Standard input is empty (the plugin is not
// interactive). The caller builds one on `systemd-run --machine=M --wait
// --pipe --quiet` (internal/command does the running); a Runner should
// stop reading after MaxExecOutput+1 bytes, since more is refused anyway.
type Runner func(ctx context.Context, argv []string, env []string) (stdout []byte, err error)

// MaxExecOutput bounds what an exec credential plugin may print: an
// ExecCredential with a token or a certificate and key is a few KiB.
const MaxExecOutput = 1 << 20

// execInfoEnv is the variable client-go passes the ExecCredential request
// in.
const execInfoEnv = "KUBERNETES_EXEC_INFO"

// execAPIV1 is the ExecCredential version an ExecPlugin without one
// speaks (the manifest's default too).
const execAPIV1 = "client.authentication.k8s.io/v1"

// execAPIVersions are the ExecCredential versions client-go still speaks
// (and manifest's schema allows).
var execAPIVersions = map[string]bool{
	execAPIV1:                              true,
	"client.authentication.k8s.io/v1beta1": true,
}

// ExecPlugin is a client-go exec credential plugin, what a kubeconfig's
// users[].user.exec names (the manifest's kubernetes.auth.exec).
type ExecPlugin struct {
	// APIVersion is the ExecCredential version the plugin speaks
	// (client.authentication.k8s.io/v1 when empty).
	APIVersion string
	Command    string
	Args       []string
	// Env is added to the plugin's environment, "NAME=value" each.
	Env []string
}

// execCredential is the ExecCredential object, v1 and v1beta1 alike for
// the fields used here.
type execCredential struct {
	APIVersion string      `json:"apiVersion"`
	Kind       string      `json:"kind"`
	Spec       execSpec    `json:"spec"`
	Status     *execStatus `json:"status,omitempty"`
}

type execSpec struct {
	Cluster     *execCluster `json:"cluster,omitempty"`
	Interactive bool         `json:"interactive"`
}

type execCluster struct {
	Server string `json:"server"`
	// CertificateAuthorityData is base64 in JSON, as client-go's []byte.
	CertificateAuthorityData []byte `json:"certificate-authority-data,omitempty"`
}

type execStatus struct {
	Token                 string `json:"token,omitempty"`
	ClientCertificateData string `json:"clientCertificateData,omitempty"`
	ClientKeyData         string `json:"clientKeyData,omitempty"`
}

// ExecCredential runs the exec credential plugin e with run (in the
// machine, as kubelet would) and returns the credentials it prints.
//
// The plugin gets what client-go gives it: e's env, then
// KUBERNETES_EXEC_INFO holding an ExecCredential of e's apiVersion with
// spec.interactive false and spec.cluster (server apiServer,
// certificate-authority-data caPEM). client-go sends spec.cluster only
// with provideClusterInfo; the kubeconfig nodespawn renders always sets it,
// so it is always sent here.
//
// The output must be an ExecCredential of the same apiVersion whose status
// holds a token, a client certificate and key, or both; it is bounded by
// MaxExecOutput. Errors never quote the output: it may hold the secret.
func ExecCredential(ctx context.Context, run Runner, e ExecPlugin, apiServer string, caPEM []byte) (Credentials, error) {
	apiVersion := e.APIVersion
	if apiVersion == "" {
		apiVersion = execAPIV1
	}
	if !execAPIVersions[apiVersion] {
		return Credentials{}, fmt.Errorf("exec credential plugin: apiVersion %q is not supported (want client.authentication.k8s.io/v1 or v1beta1)", apiVersion)
	}
	if e.Command == "" {
		return Credentials{}, errors.New("exec credential plugin: no command")
	}
	info, err := json.Marshal(execCredential{
		APIVersion: apiVersion,
		Kind:       "ExecCredential",
		Spec: execSpec{
			Interactive: false,
			Cluster:     &execCluster{Server: apiServer, CertificateAuthorityData: caPEM},
		},
	})
	if err != nil {
		return Credentials{}, fmt.Errorf("exec credential plugin: %w", err)
	}
	// Last, as client-go appends it after the configured env.
	env := append(slices.Clip(e.Env), execInfoEnv+"="+string(info))
	argv := append([]string{e.Command}, e.Args...)

	out, err := run(ctx, argv, env)
	if err != nil {
		return Credentials{}, fmt.Errorf("exec credential plugin %s: %w", e.Command, err)
	}
	creds, err := parseExecOutput(out, apiVersion)
	if err != nil {
		return Credentials{}, fmt.Errorf("exec credential plugin %s: %w", e.Command, err)
	}
	return creds, nil
}

// parseExecOutput checks a plugin's output the way client-go does and
// returns its credentials.
func parseExecOutput(out []byte, apiVersion string) (Credentials, error) {
	if len(out) > MaxExecOutput {
		return Credentials{}, fmt.Errorf("printed more than %d bytes: not an ExecCredential", MaxExecOutput)
	}
	if len(bytes.TrimSpace(out)) == 0 {
		return Credentials{}, errors.New("printed nothing (want an ExecCredential on standard output)")
	}
	var cred execCredential
	if err := json.Unmarshal(out, &cred); err != nil {
		// Not the output: it may hold the secret. encoding/json's syntax
		// errors quote at most one character.
		return Credentials{}, fmt.Errorf("output (%d bytes) is not an ExecCredential in JSON: %w", len(out), err)
	}
	if cred.Kind != "ExecCredential" {
		return Credentials{}, fmt.Errorf("printed kind %q, want ExecCredential", cred.Kind)
	}
	if cred.APIVersion != apiVersion {
		return Credentials{}, fmt.Errorf("printed apiVersion %q, but the manifest configures %q", cred.APIVersion, apiVersion)
	}
	s := cred.Status
	switch {
	case s == nil:
		return Credentials{}, errors.New("printed an ExecCredential without a status")
	case s.Token == "" && s.ClientCertificateData == "" && s.ClientKeyData == "":
		return Credentials{}, errors.New("printed an ExecCredential whose status holds no token and no client certificate")
	case (s.ClientCertificateData == "") != (s.ClientKeyData == ""):
		return Credentials{}, errors.New("printed only one of clientCertificateData and clientKeyData, want both")
	}
	creds := Credentials{Token: s.Token}
	if s.ClientCertificateData != "" {
		creds.CertPEM = []byte(s.ClientCertificateData)
		creds.KeyPEM = []byte(s.ClientKeyData)
		if _, _, err := creds.keyPair(); err != nil {
			return Credentials{}, err
		}
	}
	return creds, nil
}
