package main

import (
	"log/slog"

	"github.com/spf13/cobra"

	"github.com/nodespawn/nodespawn/apply"
	"github.com/nodespawn/nodespawn/internal/layout"
)

// newMountRootCmd is `nodespawn mount-root MACHINE`, plumbing for the
// machine's service (its drop-in runs it before the machine starts): it
// mounts a root made of the layer store's layers exactly as apply does, so
// no other mechanism (a mount unit, mount(8)) mounts it at boot.
func newMountRootCmd() *cobra.Command {
	var root string
	cmd := &cobra.Command{
		Use:    "mount-root MACHINE",
		Short:  "Mount a machine's root made of layers as its record says (run by the machine's service)",
		Hidden: true,
		Long: `mount-root mounts ` + layout.MachineRoot("MACHINE") + ` as the overlay of the layers its
record (` + layout.OverlayDir("MACHINE") + `/image.json) names, with the
machine's upper directory, every directory opened inside the host root: what
apply does. A root already mounted of those layers is left as it is; a machine
without a record (a flattened root) needs nothing. The machine's service runs
it before the machine starts.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			ctx, cancel := signalContext()
			defer cancel()
			return apply.MountRoot(ctx, root, args[0], slog.Default())
		},
	}
	cmd.Flags().StringVar(&root, "root", "/", "the host root the machine is in")
	return cmd
}
