package main

import (
	"errors"
	"fmt"
	"io"
	"os"
	"strings"

	"github.com/spf13/cobra"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/validation"
	"sigs.k8s.io/yaml"

	"github.com/nodespawn/nodespawn/api/v1alpha1"
	"github.com/nodespawn/nodespawn/manifest"
)

// newConfigCmd is `nodespawn config`: a manifest as a fleet config
// (NodeSpawnConfig) of the nodespawn.dev API.
func newConfigCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "config",
		Short: "A manifest as a fleet config (NodeSpawnConfig): its digest, its object",
		Args:  cobra.NoArgs,
	}
	cmd.AddCommand(newConfigDigestCmd(), newConfigExportCmd())
	return cmd
}

func newConfigDigestCmd() *cobra.Command {
	var file string
	cmd := &cobra.Command{
		Use:   "digest -f FILE",
		Short: "Print the manifest's config digest (sha256:<hex>), the one a NodeSpawnConfig and a NodeSpawnNode's status name",
		Long: `digest prints the canonical digest of a manifest as the nodespawn.dev API uses
it: the sha256 of its canonical JSON (defaults applied, key order and
formatting ignored), without the bootstrap token. A node manifest with its
token and the same manifest as a fleet config without it have the same
digest.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			m, _, err := loadConfigFile(cmd.InOrStdin(), file, true)
			if err != nil {
				return err
			}
			d, err := m.ConfigDigest()
			if err != nil {
				return err
			}
			_, err = fmt.Fprintln(cmd.OutOrStdout(), d)
			return err
		},
	}
	cmd.Flags().StringVarP(&file, "file", "f", "", "the manifest (- for stdin)")
	_ = cmd.MarkFlagRequired("file")
	return cmd
}

func newConfigExportCmd() *cobra.Command {
	var file, name string
	cmd := &cobra.Command{
		Use:   "export -f FILE [--name NAME]",
		Short: "Print the manifest as a NodeSpawnConfig (YAML) for kubectl apply; a manifest with secrets is refused",
		Long: `export prints a NodeSpawnConfig holding the manifest as written and its digest,
labelled with the digest (nodespawn.dev/config-digest). The default name is
"config-" and the digest's first 12 hex digits. A fleet config is readable
by every node, so a manifest holding a secret (a bootstrap token, an exec
plugin's environment value, an HTTP header value) is refused: leave
kubernetes.auth out, the node's identity carries over an upgrade.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			m, data, err := loadConfigFile(cmd.InOrStdin(), file, false)
			if err != nil {
				return err
			}
			d, err := m.ConfigDigest()
			if err != nil {
				return err
			}
			if name == "" {
				name = "config-" + d.Encoded()[:12]
			}
			if errs := validation.IsDNS1123Subdomain(name); len(errs) > 0 {
				return usageError{fmt.Errorf("--name %q: %s", name, strings.Join(errs, "; "))}
			}
			c := v1alpha1.NodeSpawnConfig{
				TypeMeta:   metav1.TypeMeta{APIVersion: v1alpha1.GroupVersion.String(), Kind: "NodeSpawnConfig"},
				ObjectMeta: metav1.ObjectMeta{Name: name, Labels: map[string]string{v1alpha1.LabelConfigDigest: v1alpha1.DigestLabelValue(d.String())}},
				Spec:       v1alpha1.NodeSpawnConfigSpec{Manifest: string(data), Digest: d.String()},
			}
			b, err := yaml.Marshal(exported{TypeMeta: c.TypeMeta, ObjectMeta: exportedMeta{Name: name, Labels: c.Labels}, Spec: c.Spec})
			if err != nil {
				return err
			}
			_, err = cmd.OutOrStdout().Write(b)
			return err
		},
	}
	cmd.Flags().StringVarP(&file, "file", "f", "", "the manifest (- for stdin)")
	cmd.Flags().StringVar(&name, "name", "", "the NodeSpawnConfig's name (default config-<digest prefix>)")
	_ = cmd.MarkFlagRequired("file")
	return cmd
}

// exported is a NodeSpawnConfig as export prints it: no status, no
// creationTimestamp.
type exported struct {
	metav1.TypeMeta `json:",inline"`
	ObjectMeta      exportedMeta                 `json:"metadata"`
	Spec            v1alpha1.NodeSpawnConfigSpec `json:"spec"`
}

type exportedMeta struct {
	Name   string            `json:"name"`
	Labels map[string]string `json:"labels,omitempty"`
}

// loadConfigFile reads and validates a fleet config; withSecrets takes a
// node manifest holding secrets too (for its digest alone).
func loadConfigFile(stdin io.Reader, file string, withSecrets bool) (*manifest.Manifest, []byte, error) {
	var data []byte
	var err error
	if file == "-" {
		data, err = io.ReadAll(stdin)
		file = "stdin"
	} else {
		data, err = os.ReadFile(file)
	}
	if err != nil {
		return nil, nil, usageError{fmt.Errorf("read manifest: %w", err)}
	}
	m, err := manifest.LoadConfig(file, data)
	var se *manifest.SecretsError
	if withSecrets && errors.As(err, &se) {
		m, err = manifest.Load(file, data)
	}
	if errors.As(err, &se) {
		err = usageError{err}
	}
	return m, data, err
}
