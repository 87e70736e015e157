package main

import (
	"context"
	"fmt"
	"path/filepath"

	"github.com/nodespawn/nodespawn/apply"
	"github.com/nodespawn/nodespawn/internal/systemd"
	"github.com/nodespawn/nodespawn/manifest"
	"github.com/nodespawn/nodespawn/plan"
	"github.com/nodespawn/nodespawn/render"
	"github.com/spf13/cobra"
)

// newResetCmd is `nodespawn reset`: the machine and what apply wrote for
// it removed, for re-provisioning.
func newResetCmd() *cobra.Command {
	var (
		root    string
		machine string
	)
	cmd := &cobra.Command{
		Use:   "reset",
		Short: "Stop and remove the node's machines and the files apply wrote, for re-provisioning",
		Long: `reset stops the node's machines (both of an upgrade's pair; it waits until
machined forgets them), removes their rootfs, .nspawn files, service drop-ins
and wants links, the nftables flush unit and nodespawn's state, the node's
identity and image cache (/var/lib/nodespawn/node) included, then reloads
systemd. It lists the host settings it leaves in place (sysctls, kernel
modules, swap, packages).

Without --machine it removes what the plan stored by the last apply wrote.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx, cancel := signalContext()
			defer cancel()
			opts := apply.ResetOptions{Root: root, Machine: machine}
			if filepath.Clean(root) == "/" {
				opts.Systemd = systemd.New(nil)
			}
			if machine == "" {
				p, err := appliedPlan(ctx, root)
				if err != nil {
					return err
				}
				opts.Plan = p
			}
			return apply.Reset(ctx, opts)
		},
	}
	cmd.Flags().StringVar(&root, "root", "/", "reset the tree under this directory instead of /")
	cmd.Flags().StringVar(&machine, "machine", "", "the machine to remove (default: the one the last apply made)")
	return cmd
}

// appliedPlan is the plan the last apply stored. A state directory from a
// version that did not store it has the manifest instead, whose plan is
// rendered again for this host.
func appliedPlan(ctx context.Context, root string) (*plan.Plan, error) {
	p, err := apply.StoredPlan(root)
	if err != nil || p != nil {
		return p, err
	}
	data, err := apply.StoredManifest(root)
	if err != nil {
		return nil, usageError{fmt.Errorf("%w; or give --machine NAME", err)}
	}
	m, err := manifest.Load(apply.ManifestFile, data)
	if err != nil {
		return nil, fmt.Errorf("the stored manifest no longer loads (give --machine NAME): %w", err)
	}
	facts, err := loadFacts(ctx, "", root)
	if err != nil {
		return nil, err
	}
	return render.Plan(m, facts)
}
