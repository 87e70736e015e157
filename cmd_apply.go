package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/signal"
	"syscall"

	"github.com/spf13/cobra"

	"github.com/nodespawn/nodespawn/internal/layout"
	"github.com/nodespawn/nodespawn/internal/probe"
	"github.com/nodespawn/nodespawn/provision"
)

// registerSource adds -f and --source, which fill s.
func registerSource(cmd *cobra.Command, s *provision.Source) {
	cmd.Flags().StringVarP(&s.File, "file", "f", "", "manifest file (YAML or JSON); - reads stdin")
	cmd.Flags().StringVar(&s.Spec, "source", "", "where to find the manifest at first boot: auto, nocloud, azure, cloud-init, or a path (instead of -f)")
}

func signalContext() (context.Context, context.CancelFunc) {
	return signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
}

func newApplyCmd(renderOnly bool) *cobra.Command {
	var (
		src       provision.Source
		dryRun    bool
		output    string
		root      string
		force     bool
		factsFile string
		layers    bool
		detailed  bool
		firstBoot bool
		fb        provision.FirstBootOptions
	)
	cmd := &cobra.Command{
		Use:   "apply",
		Short: "Make this host a Kubernetes node in an nspawn machine (--dry-run prints the plan)",
		Long: `apply validates the manifest, probes this host (architecture, GPUs, /dev/kvm,
resolvers), renders the plan and carries it out once: host settings, the
machine's rootfs and configuration, then it starts the machine and waits for
containerd and kubelet inside. A second run with the same manifest exits 0 at
once; a run that died half-way is resumed.

On a node, a changed manifest is an upgrade by alternating machines: the
other machine of the pair (kube1 <-> kube2: a final 1 and 2 swap, any other
name alternates with NAME-b) is prepared beside the running one, then the
running one is stopped (upgrade.stopTimeout), the new one started, and the
Node must be Ready again, as the API server sees it with the node's own
credentials, within upgrade.readyTimeout; otherwise the old machine runs the
node again and apply exits 1. The node's identity and image cache live in
` + layout.NodeStateDir + ` and carry over. The previous machine is kept for
nodespawn rollback. A manifest for another node (machine.name,
kubernetes.nodeName, caCert or apiServer changed) is refused (exit 2): reset
first. The first-boot unit never upgrades; it finishes a switch a power cut
interrupted.

--dry-run prints the plan instead (text grouped by phase, or -o json) and
changes nothing; on a host applied before, it prints what this manifest
would change against the applied plan: the steps added, removed and
changed (old -> new for each changed field, the contents of added files,
what becomes of removed steps), with unified diffs of changed files
(nodespawn render always prints the whole plan). Secrets are shown as
<redacted>. It ends with what apply will do: apply, resume, upgrade,
nothing (already applied), or refuse and why. A dry run that apply would
refuse exits with apply's code (2).

A first run that failed before its machine ever started (a bad sha256
pin, an unreachable mirror) left no node to protect: apply of the
corrected manifest replaces it, without --force.

Exit codes: 0 done or already applied (a dry run: printed), 1 a step
failed, 2 bad input (manifest, flags, a manifest this host cannot
satisfy, or one apply refuses here: another node, a changed manifest
where no upgrade is possible).
With --dry-run --detailed-exitcode (for scripts, Terraform's convention):
0 no changes, 1 an error (bad input and refusals included: 2 means
changes under this flag), 2 changes to apply.`,
		Example: `  nodespawn apply --dry-run -f examples/minimal.yaml
  nodespawn apply --dry-run -o json -f node.yaml --facts gpu-host.json
  nodespawn apply --source auto          # at first boot, from user-data`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if output != "text" && output != "json" {
				return usageError{fmt.Errorf("-o %q: want text or json", output)}
			}
			ctx, cancel := signalContext()
			defer cancel()
			a := &provision.Run{Source: &src, Stdin: cmd.InOrStdin(), Out: cmd.OutOrStdout(), DryRun: dryRun || renderOnly, Diff: dryRun,
				Output: output, Root: root, Force: force, FactsFile: factsFile, Layers: layers, DetailedExit: detailed, ToolVersion: version}
			if layers && !a.DryRun {
				return usageError{fmt.Errorf("--layers goes with --dry-run")}
			}
			if detailed && !dryRun {
				return usageError{fmt.Errorf("--detailed-exitcode goes with --dry-run")}
			}
			if firstBoot {
				return a.FirstBoot(ctx, fb)
			}
			return a.Once(ctx)
		},
	}
	registerSource(cmd, &src)
	f := cmd.Flags()
	f.StringVarP(&output, "output", "o", "text", "plan format for --dry-run: text or json")
	f.StringVar(&root, "root", "/", "apply against this directory instead of / (tests, image building)")
	f.StringVar(&factsFile, "facts", "", "render for the host described by this JSON file (from 'nodespawn facts') instead of probing")
	f.BoolVar(&layers, "layers", false, "with --dry-run: resolve the rootfs image in its registry (index, manifest and config only) and say which layers the layer store has and which apply would fetch")
	if renderOnly {
		cmd.Use = "render"
		cmd.Short = "Print the plan (the same as apply --dry-run)"
		cmd.Long = "render prints the plan apply would carry out, and changes nothing. It is apply --dry-run by another name."
		cmd.Example = "  nodespawn render -f examples/minimal.yaml -o json"
		return cmd
	}
	f.BoolVar(&dryRun, "dry-run", false, "print the plan and change nothing")
	f.BoolVar(&detailed, "detailed-exitcode", false, "with --dry-run, exit as Terraform's plan does: 0 no changes, 1 an error (bad input, or a manifest apply would refuse, included), 2 changes to apply")
	f.BoolVar(&force, "force", false, "check every step again even when this plan was applied; apply a changed manifest in place where no upgrade is possible (--root trees) or no run has finished yet")
	f.BoolVar(&firstBoot, "first-boot", false, "run as the first-boot unit does: retry transient failures for the manifest's firstBoot.retryFor, then write the outcome to the console and send the manifest's report")
	f.StringVar(&fb.Console, "console", "/dev/console", "with --first-boot, where the final status line goes")
	f.DurationVar(&fb.RetryWait, "retry-wait", provision.FirstBootRetry.Base, "with --first-boot, the first pause before a retry (it doubles, up to "+provision.FirstBootRetry.Max.String()+")")
	_ = f.MarkHidden("console")
	_ = f.MarkHidden("retry-wait")
	return cmd
}

func newValidateCmd() *cobra.Command {
	var src provision.Source
	cmd := &cobra.Command{
		Use:   "validate",
		Short: "Check a manifest: schema and semantic checks, every problem with its line and column",
		Long: `validate checks a manifest without looking at this host: its JSON Schema, the
rules the schema cannot express, and the plan it renders on reference hosts
(so an extra file that clashes with one nodespawn writes is caught). It
reports every problem at once as FILE:LINE:COL: $.path: message and exits 2
when there is one. What depends on the host (gpu: "on" without a GPU) is
left to apply.`,
		Example: `  nodespawn validate -f node.yaml
  cat node.yaml | nodespawn validate -f -`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx, cancel := signalContext()
			defer cancel()
			name, err := provision.Validate(ctx, &src, cmd.InOrStdin())
			if err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "%s: valid\n", name)
			return nil
		},
	}
	registerSource(cmd, &src)
	return cmd
}

func newFactsCmd() *cobra.Command {
	var root string
	cmd := &cobra.Command{
		Use:   "facts",
		Short: "Print what nodespawn sees on this host (JSON), for --facts on another machine",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx, cancel := signalContext()
			defer cancel()
			f, err := probe.Gather(ctx, probe.Options{Root: root})
			if err != nil {
				return err
			}
			enc := json.NewEncoder(cmd.OutOrStdout())
			enc.SetIndent("", "  ")
			return enc.Encode(f)
		},
	}
	cmd.Flags().StringVar(&root, "root", "/", "probe the host tree under this directory")
	return cmd
}
