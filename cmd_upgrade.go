package main

import (
	"errors"
	"fmt"
	"path/filepath"

	"github.com/spf13/cobra"

	"github.com/nodespawn/nodespawn/provision"
	"github.com/nodespawn/nodespawn/state"
	"github.com/nodespawn/nodespawn/upgrade"
)

// newRollbackCmd is `nodespawn rollback`: the node back on the machine the
// last upgrade switched away from.
func newRollbackCmd() *cobra.Command {
	var root string
	cmd := &cobra.Command{
		Use:   "rollback",
		Short: "Switch the node back to the machine the last upgrade replaced",
		Long: `rollback stops the machine that runs the node and starts the previous one (kept
by the last successful upgrade), then waits, as an upgrade does, until
containerd and kubelet run in it and the API server sees the Node Ready. If
that does not happen within the manifest's upgrade.readyTimeout, it switches
back. The machine rolled back from is kept, so a second rollback returns
to it; the next upgrade replaces it.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx, cancel := signalContext()
			defer cancel()
			if filepath.Clean(root) != "/" {
				return usageError{errors.New("rollback switches running machines: it works on / only")}
			}
			st, err := state.ReadMachines(root)
			if err != nil {
				return err
			}
			// Said before the stored manifest is read (upgrade.Rollback
			// checks again under its lock).
			if err := st.RollbackProblem(); err != nil {
				return err
			}
			opts, err := provision.StoredOptions(root, version, st.Previous, st.Active)
			if err != nil {
				return err
			}
			res, err := upgrade.Rollback(ctx, opts)
			if err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "rolled back: machine %s runs the node again (%s is kept for another rollback)\n", res.Machine, res.Upgrade.From)
			return nil
		},
	}
	cmd.Flags().StringVar(&root, "root", "/", "the host root (only / is supported)")
	return cmd
}
