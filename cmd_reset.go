package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"

	"github.com/nodespawn/nodespawn/internal/layout"
	"github.com/nodespawn/nodespawn/internal/systemd"
	"github.com/nodespawn/nodespawn/provision"
	"github.com/nodespawn/nodespawn/reset"
	"github.com/spf13/cobra"
	"golang.org/x/term"
)

// newResetCmd is `nodespawn reset`: the machine and what apply wrote for
// it removed, for re-provisioning.
func newResetCmd() *cobra.Command {
	var (
		root    string
		machine string
		yes     bool
		dryRun  bool
	)
	cmd := &cobra.Command{
		Use:   "reset",
		Short: "Stop and remove the node's machines and the files apply wrote, for re-provisioning",
		Long: `reset stops the node's machines (both of an upgrade's pair; it waits until
machined forgets them), removes their rootfs, .nspawn files, service drop-ins
and wants links, the nftables flush unit and nodespawn's state, the node's
identity and image cache (` + layout.NodeStateDir + `) included, then reloads
systemd. It lists the host settings it leaves in place (sysctls, kernel
modules, swap, packages).

Without --machine it removes what the plan stored by the last apply wrote.

It cannot be undone, so on a terminal reset lists what it would remove and
asks [y/N] first; --yes skips the question. When standard input is not a
terminal (a script, a pipe) it refuses without --yes (exit 2). --dry-run lists
the machines it would stop, the paths it would remove and what it leaves in
place, and changes nothing.

Exit codes: 0 reset (or listed), 1 failed or not confirmed, 2 bad input
(nothing applied here, stdin not a terminal without --yes).`,
		Example: `  nodespawn reset --dry-run
  nodespawn reset                   # lists, then asks [y/N]
  nodespawn reset --yes             # in a script
  nodespawn reset --yes --root /srv/node-tree`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx, cancel := signalContext()
			defer cancel()
			opts := reset.Options{Root: root, Machine: machine}
			if filepath.Clean(root) == "/" {
				opts.Systemd = systemd.New(nil)
			}
			if machine == "" {
				p, err := provision.AppliedPlan(ctx, root)
				if err != nil {
					return err
				}
				opts.Plan = p
			}
			if dryRun {
				rp, err := reset.Plan(ctx, opts)
				if err != nil {
					return err
				}
				writeResetPlan(cmd.OutOrStdout(), rp, "would")
				return nil
			}
			if !yes {
				if err := confirmReset(ctx, cmd.InOrStdin(), cmd.ErrOrStderr(), opts); err != nil {
					return err
				}
			}
			return reset.Run(ctx, opts)
		},
	}
	cmd.Flags().StringVar(&root, "root", "/", "reset the tree under this directory instead of /")
	cmd.Flags().StringVar(&machine, "machine", "", "the machine to remove (default: the one the last apply made)")
	cmd.Flags().BoolVarP(&yes, "yes", "y", false, "do not ask for confirmation (needed when stdin is not a terminal)")
	cmd.Flags().BoolVar(&dryRun, "dry-run", false, "list what reset would stop, remove and leave in place, and change nothing")
	return cmd
}

// confirmReset asks on a terminal whether to reset, after listing what
// reset removes; it refuses when in is not a terminal (use --yes).
func confirmReset(ctx context.Context, in io.Reader, out io.Writer, opts reset.Options) error {
	f, ok := in.(*os.File)
	if !ok || !term.IsTerminal(int(f.Fd())) {
		return usageError{errors.New("reset removes the node's machines, identity and state and cannot be undone; standard input is not a terminal to ask on: pass --yes (reset --dry-run lists what it removes)")}
	}
	rp, err := reset.Plan(ctx, opts)
	if err != nil {
		return err
	}
	writeResetPlan(out, rp, "will")
	fmt.Fprintf(out, "This cannot be undone. Reset machine %s? [y/N] ", rp.Machine)
	answer, err := bufio.NewReader(f).ReadString('\n')
	if err != nil && !errors.Is(err, io.EOF) {
		return fmt.Errorf("reset: read the answer: %w", err)
	}
	switch strings.ToLower(strings.TrimSpace(answer)) {
	case "y", "yes":
		return nil
	}
	return errors.New("reset not confirmed; nothing was changed")
}

// writeResetPlan prints what reset will (or would) do.
func writeResetPlan(w io.Writer, rp *reset.Preview, will string) {
	if len(rp.Stop) > 0 {
		fmt.Fprintf(w, "reset %s stop machines: %s\n", will, strings.Join(rp.Stop, ", "))
	}
	if len(rp.Remove) == 0 {
		fmt.Fprintf(w, "reset %s remove nothing: nothing of machine %s is left\n", will, rp.Machine)
	} else {
		fmt.Fprintf(w, "reset %s remove (a machine's rootfs unmounted first):\n", will)
		for _, p := range rp.Remove {
			fmt.Fprintf(w, "  %s\n", p)
		}
	}
	if len(rp.Leave) > 0 {
		fmt.Fprintf(w, "and leave in place:\n")
		for _, l := range rp.Leave {
			fmt.Fprintf(w, "  %s\n", l)
		}
	}
}
