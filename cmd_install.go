package main

import (
	"fmt"
	"os"
	"path/filepath"

	"github.com/nodespawn/nodespawn/apply"
	"github.com/nodespawn/nodespawn/internal/layout"
	"github.com/spf13/cobra"
)

// newInstallCmd is `nodespawn install`: the first-boot unit, on a host or
// into an image tree.
func newInstallCmd() *cobra.Command {
	var (
		root   string
		binary string
		agent  bool
	)
	cmd := &cobra.Command{
		Use:   "install",
		Short: "Install and enable " + layout.FirstbootUnit + ", which applies the manifest from user-data at boot",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if _, err := os.Stat(filepath.Join(root, binary)); err != nil {
				return usageError{fmt.Errorf("the unit would run %s, which is not there (%w); copy nodespawn there or give --binary", binary, err)}
			}
			if err := apply.InstallFirstboot(root, binary); err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "installed and enabled %s: it runs '%s apply --source auto' at boot until one apply succeeds\n", apply.FirstbootUnitName, binary)
			if agent {
				if err := apply.InstallAgent(root, binary); err != nil {
					return err
				}
				fmt.Fprintf(cmd.OutOrStdout(), "installed and enabled %s: it runs '%s agent' for fleet rollouts (on a running host: systemctl daemon-reload && systemctl start %s)\n", apply.AgentUnitName, binary, apply.AgentUnitName)
			}
			return nil
		},
	}
	cmd.Flags().StringVar(&root, "root", "/", "install into the tree under this directory (image building)")
	cmd.Flags().BoolVar(&agent, "agent", false, "also install and enable "+layout.AgentUnit+", the node's agent for fleet rollouts (nodespawn agent)")
	cmd.Flags().StringVar(&binary, "binary", apply.DefaultBinaryPath, "the nodespawn binary the unit runs, as seen on the booted host")
	return cmd
}
