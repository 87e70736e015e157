package main

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"

	"github.com/spf13/cobra"

	"github.com/nodespawn/nodespawn/apply"
	"github.com/nodespawn/nodespawn/manifest"
	"github.com/nodespawn/nodespawn/plan"
	"github.com/nodespawn/nodespawn/render"
	"github.com/nodespawn/nodespawn/schema"
)

func newSchemaCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "schema",
		Short: "Print the manifest's JSON Schema (draft 2020-12), for editors and CI checks",
		Long: `schema prints the JSON Schema every manifest is validated against. Point your
editor at it, e.g. with a modeline on the manifest's first line:

  # yaml-language-server: $schema=./nodespawn.schema.json`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			_, err := cmd.OutOrStdout().Write(schema.JSON)
			return err
		},
	}
}

func newResetCmd() *cobra.Command {
	var (
		root    string
		machine string
	)
	cmd := &cobra.Command{
		Use:   "reset",
		Short: "Stop and remove the machine and the files apply wrote, for re-provisioning",
		Long: `reset stops the machine (and waits until machined forgets it), removes its
rootfs, its .nspawn file, its service drop-in and wants links, the nftables
flush unit and nodespawn's state, then reloads systemd. It lists the host
settings it leaves in place (sysctls, kernel modules, swap, packages).

Without --machine it takes the machine from the manifest stored by the last apply.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx, cancel := signalContext()
			defer cancel()
			deps, err := apply.DefaultDeps(root, slog.Default())
			if err != nil {
				return err
			}
			opts := apply.ResetOptions{Root: root, Machine: machine, Systemd: deps.Systemd}
			if machine == "" {
				plan, err := storedPlan(ctx, root)
				if err != nil {
					return err
				}
				opts.Plan = plan
			}
			return apply.Reset(ctx, opts)
		},
	}
	cmd.Flags().StringVar(&root, "root", "/", "reset the tree under this directory instead of /")
	cmd.Flags().StringVar(&machine, "machine", "", "the machine to remove (default: the one the last apply made)")
	return cmd
}

func newInstallCmd() *cobra.Command {
	var (
		root   string
		binary string
	)
	cmd := &cobra.Command{
		Use:   "install",
		Short: "Install and enable nodespawn-firstboot.service, which applies the manifest from user-data at boot",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if _, err := os.Stat(filepath.Join(root, binary)); err != nil {
				return usageError{fmt.Errorf("the unit would run %s, which is not there (%w); copy nodespawn there or give --binary", binary, err)}
			}
			if err := apply.InstallFirstboot(root, binary); err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "installed and enabled %s: it runs '%s apply --source auto' at boot until one apply succeeds\n", apply.FirstbootUnitName, binary)
			return nil
		},
	}
	cmd.Flags().StringVar(&root, "root", "/", "install into the tree under this directory (image building)")
	cmd.Flags().StringVar(&binary, "binary", apply.DefaultBinaryPath, "the nodespawn binary the unit runs, as seen on the booted host")
	return cmd
}

// storedPlan renders again the plan of the manifest the last apply stored,
// so reset removes exactly what that apply wrote.
func storedPlan(ctx context.Context, root string) (*plan.Plan, error) {
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
