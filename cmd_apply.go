package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/opencontainers/go-digest"
	"github.com/spf13/cobra"

	"github.com/nodespawn/nodespawn/apply"
	"github.com/nodespawn/nodespawn/internal/httpx"
	"github.com/nodespawn/nodespawn/internal/probe"
	"github.com/nodespawn/nodespawn/internal/progress"
	"github.com/nodespawn/nodespawn/manifest"
	"github.com/nodespawn/nodespawn/plan"
	"github.com/nodespawn/nodespawn/render"
	"github.com/nodespawn/nodespawn/state"
	"github.com/nodespawn/nodespawn/userdata"
)

// sourceFlags say where the manifest comes from.
type sourceFlags struct {
	file   string
	source string
	// found says where the last read found the manifest, for the record
	// (status prints it, as cloud-init status does its datasource).
	found string
}

func (s *sourceFlags) register(cmd *cobra.Command) {
	cmd.Flags().StringVarP(&s.file, "file", "f", "", "manifest file (YAML or JSON); - reads stdin")
	cmd.Flags().StringVar(&s.source, "source", "", "where to find the manifest at first boot: auto, nocloud, azure, cloud-init, or a path (instead of -f)")
}

// read returns the manifest's name and bytes, and where it lies in the
// file the user gave. A file given with -f may be user-data
// (#cloud-config, MIME multipart, gzip) holding the manifest.
func (s *sourceFlags) read(ctx context.Context, stdin io.Reader) (userdata.Source, error) {
	spec := s.source
	switch {
	case s.file != "" && s.source != "":
		return userdata.Source{}, usageError{fmt.Errorf("give -f or --source, not both")}
	case s.file != "":
		spec = s.file
	case s.source == "":
		return userdata.Source{}, usageError{fmt.Errorf("no manifest: give -f FILE, -f - for stdin, or --source auto")}
	}
	src, err := userdata.ReadSource(ctx, spec, userdata.Options{
		Stdin: stdin,
		// For Azure IMDS, which answers only requests that reach it directly.
		HTTPClient: httpx.NewClient(httpx.WithLogger(slog.Default()), httpx.WithoutProxy()),
	})
	if err != nil && s.file != "" {
		return userdata.Source{}, usageError{err}
	}
	s.found = src.Name
	if s.file == "" && spec != src.Name {
		s.found = spec + ": " + src.Name
	}
	return src, err
}

// loadSource validates the manifest src holds; its errors name lines of
// the file the user gave, also when the manifest is embedded in it.
func loadSource(src userdata.Source) (*manifest.Manifest, error) {
	if src.Where == "" {
		return manifest.Load(src.Name, src.Data)
	}
	return manifest.LoadEmbedded(manifest.Origin{File: src.File, Where: src.Where, Mapped: src.Mapped, LineOffset: src.LineOffset, Indent: src.Indent}, src.Data)
}

// load reads and validates the manifest.
func (s *sourceFlags) load(ctx context.Context, stdin io.Reader) (*manifest.Manifest, []byte, error) {
	src, err := s.read(ctx, stdin)
	if err != nil {
		return nil, nil, err
	}
	m, err := loadSource(src)
	if err != nil {
		return nil, nil, err
	}
	return m, src.Data, nil
}

// facts returns the host's facts: probed, or read from a file (to review
// the plan for another host).
func loadFacts(ctx context.Context, factsFile, root string) (plan.Facts, error) {
	if factsFile == "" {
		return probe.Gather(ctx, probe.Options{Root: root})
	}
	var f plan.Facts
	data, err := os.ReadFile(factsFile)
	if err != nil {
		return f, usageError{fmt.Errorf("read facts: %w", err)}
	}
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&f); err != nil {
		return f, usageError{fmt.Errorf("facts %s: %w", factsFile, err)}
	}
	return f, nil
}

func signalContext() (context.Context, context.CancelFunc) {
	return signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
}

func newApplyCmd(renderOnly bool) *cobra.Command {
	var (
		src       sourceFlags
		dryRun    bool
		output    string
		root      string
		force     bool
		factsFile string
		layers    bool
		detailed  bool
		firstBoot bool
		fb        firstBootFlags
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
/var/lib/nodespawn/node and carry over. The previous machine is kept for
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
			a := &applyRun{src: &src, stdin: cmd.InOrStdin(), out: cmd.OutOrStdout(), dryRun: dryRun || renderOnly, diff: dryRun,
				output: output, root: root, force: force, factsFile: factsFile, layers: layers, detailedExit: detailed}
			if layers && !a.dryRun {
				return usageError{fmt.Errorf("--layers goes with --dry-run")}
			}
			if detailed && !dryRun {
				return usageError{fmt.Errorf("--detailed-exitcode goes with --dry-run")}
			}
			if firstBoot {
				return a.firstBoot(ctx, fb)
			}
			return a.once(ctx)
		},
	}
	src.register(cmd)
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
	f.StringVar(&fb.console, "console", "/dev/console", "with --first-boot, where the final status line goes")
	f.DurationVar(&fb.retryWait, "retry-wait", firstBootRetry.Base, "with --first-boot, the first pause before a retry (it doubles, up to "+firstBootRetry.Max.String()+")")
	_ = f.MarkHidden("console")
	_ = f.MarkHidden("retry-wait")
	return cmd
}

func newValidateCmd() *cobra.Command {
	var src sourceFlags
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
			source, err := src.read(ctx, cmd.InOrStdin())
			if err != nil {
				return err
			}
			name := source.Name
			m, err := loadSource(source)
			if err != nil {
				return err
			}
			// What only the whole plan shows (an extra file where nodespawn
			// writes one), found on reference hosts, not this one.
			if err := render.Check(m); err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "%s: valid\n", name)
			return nil
		},
	}
	src.register(cmd)
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

// applyRun is one `nodespawn apply` (or render) invocation.
type applyRun struct {
	src       *sourceFlags
	stdin     io.Reader
	out       io.Writer
	dryRun    bool // print, change nothing
	diff      bool // on an applied host, print the change (apply --dry-run)
	output    string
	root      string
	force     bool
	factsFile string
	// layers: say which image layers apply would fetch (--dry-run --layers).
	layers bool
	// detailedExit: --dry-run --detailed-exitcode (0 no changes, 1 error,
	// 2 changes).
	detailedExit bool

	// refuse makes a changed manifest an error, never an upgrade (the
	// first boot).
	refuse bool

	// warnings collects what the run warns about, for its record.
	warnings *apply.Warnings

	// What the last attempt got to, for the first-boot report.
	manifest *manifest.Manifest
	plan     *plan.Plan
	result   *apply.Result
}

// once reads the manifest, renders the plan and applies it (or prints it).
func (a *applyRun) once(ctx context.Context) error {
	if a.refuse && !a.dryRun {
		// A power cut in the middle of an upgrade's switch: the node must
		// run again before anything else, whatever the user-data says.
		if err := resumeAtBoot(ctx, a.root); err != nil {
			return err
		}
	}
	if !a.dryRun {
		// What this run warns about, probing the host included, goes into
		// its record (status --long shows it).
		prev := slog.Default()
		a.warnings = apply.NewWarnings(prev.Handler())
		slog.SetDefault(slog.New(a.warnings))
		defer slog.SetDefault(prev)
	}
	m, data, err := a.src.load(ctx, a.stdin)
	if err != nil {
		return err
	}
	a.manifest = m
	facts, err := loadFacts(ctx, a.factsFile, a.root)
	if err != nil {
		return err
	}
	p, err := render.Plan(m, facts)
	if err != nil {
		// The same positions validate reports.
		return render.Locate(m, err)
	}
	a.plan = p
	if a.factsFile != "" && !a.dryRun {
		return usageError{fmt.Errorf("--facts describes another host; use it with --dry-run only")}
	}
	if a.dryRun && (a.factsFile != "" || !a.diff) {
		// Another host's plan, or render: the whole plan, no decision.
		if err := a.writePlan(ctx, p, nil); err != nil {
			return err
		}
		return a.changesExit(true)
	}
	opts, d, err := a.decide(m, facts, p, data)
	if err != nil {
		return err
	}
	if a.dryRun {
		// On a host that was applied before, what matters is what this
		// manifest would change, and what apply will do about it.
		applied, err := apply.StoredPlan(a.root)
		if err != nil {
			return err
		}
		if applied != nil {
			if err = a.writeChange(m, facts, applied, p, d); err == nil {
				err = a.writeLayers(ctx, p)
			}
		} else {
			err = a.writePlan(ctx, p, d)
		}
		if err != nil {
			return err
		}
		if d.Action == apply.ActionRefuse {
			// The plan's output says why; the exit code is apply's.
			return dryRunExit{d.Exit, a.detailedExit}
		}
		return a.changesExit(d.Action != apply.ActionAlreadyApplied)
	}
	for _, w := range p.Warnings {
		slog.Warn(w)
	}
	var res *apply.Result
	if d.Action == apply.ActionRefuse {
		err = d.Err
	} else {
		if opts.Deps, err = apply.DefaultDeps(a.root, slog.Default()); err != nil {
			return err
		}
		res, err = apply.Run(ctx, p, opts)
	}
	a.result = res
	var changed *apply.ManifestChangedError
	if a.refuse && errors.As(err, &changed) && changed.FirstBoot {
		// The node runs a manifest applied since (an upgrade): the first
		// boot leaves it alone.
		slog.Warn("the node runs another manifest than the user-data's, applied by nodespawn apply; the first boot changes nothing", "machine", changed.Machine, "manifest", changed.Applied, "user-data", changed.Given)
		fmt.Fprintf(a.out, "already provisioned: machine %s runs the node from manifest %s (the user-data's manifest is not applied at boot)\n", changed.Machine, changed.Applied)
		a.plan.Machine = changed.Machine
		return nil
	}
	if res != nil && res.Machine != "" && a.plan != nil {
		a.plan.Machine = res.Machine
	}
	if err != nil {
		return err
	}
	switch {
	case res.Upgrade != nil && res.Upgrade.Outcome == state.OutcomeSwitched:
		u := res.Upgrade
		fmt.Fprintf(a.out, "upgraded: machine %s runs node %s (was %s, kept for nodespawn rollback); prepared in %s, switched in %s\n", u.To, p.NodeName, u.From,
			time.Duration(u.PrepareMS)*time.Millisecond, time.Duration(u.SwitchMS)*time.Millisecond)
	case res.AlreadyApplied:
		fmt.Fprintf(a.out, "already applied: machine %s, node %s\n", res.Machine, p.NodeName)
	case a.root != "/":
		fmt.Fprintf(a.out, "applied the files of machine %s under %s (host settings and systemd steps skipped: not the running host)\n", res.Machine, a.root)
	default:
		fmt.Fprintf(a.out, "applied: machine %s is running node %s\n", res.Machine, p.NodeName)
	}
	return nil
}

// decide is what apply will do with m's plan p on the host at a.root,
// and the options apply.Run gets: the one decision that the dry run
// prints and apply carries out (apply.Run makes it again, by the same
// function, under its lock). A manifest for another node than the one
// the host runs is refused here (an upgrade cannot change the node's
// identity), unless its first run failed before the machine started:
// then there is no node, and any manifest for that machine replaces it.
func (a *applyRun) decide(m *manifest.Manifest, facts plan.Facts, p *plan.Plan, data []byte) (apply.Options, *apply.Decision, error) {
	canonical, err := m.Digest()
	if err != nil {
		return apply.Options{}, nil, err
	}
	up := upgradeOptions(m, facts, a.root, render.PlanFor)
	up.Refuse = a.refuse
	opts := apply.Options{
		Root:           a.root,
		ManifestDigest: canonical.String(),
		SourceDigest:   digest.FromBytes(data).String(),
		Source:         a.src.found,
		Warnings:       a.warnings,
		Manifest:       data,
		ToolVersion:    version,
		Force:          a.force,
		Upgrade:        up,
	}
	refuse := func(err error) (apply.Options, *apply.Decision, error) {
		return opts, &apply.Decision{Action: apply.ActionRefuse, Machine: p.Machine, Err: err, Exit: exitCode(err)}, nil
	}
	// Another machine pair first: the plan of the running machine cannot
	// even be made from this manifest.
	if err := checkSameNode(a.root, m, p, false); err != nil {
		return refuse(err)
	}
	d, err := apply.Decide(p, opts)
	if err != nil {
		return opts, nil, render.Locate(m, err)
	}
	if d.Action != apply.ActionReplace {
		if err := checkSameNode(a.root, m, p, true); err != nil {
			return refuse(err)
		}
	}
	return opts, d, nil
}

// writePlan prints the whole plan (--dry-run on a host with nothing
// applied, render, --facts), then, in text, what apply will do.
func (a *applyRun) writePlan(ctx context.Context, p *plan.Plan, d *apply.Decision) error {
	if a.output == "json" {
		return plan.WriteJSON(a.out, p)
	}
	if err := plan.WriteText(a.out, p); err != nil {
		return err
	}
	if d != nil {
		if _, err := fmt.Fprintf(a.out, "\n%s\n", d); err != nil {
			return err
		}
	}
	return a.writeLayers(ctx, p)
}

// exitChanges is --detailed-exitcode's "the dry run found changes".
const exitChanges = 2

// dryRunExit ends a dry run whose output said everything: apply's
// refusal code, or with --detailed-exitcode 1 for it (an error).
type dryRunExit struct {
	code     int
	detailed bool
}

func (e dryRunExit) Error() string { return fmt.Sprintf("dry run exit %d", e.exitCode()) }

func (e dryRunExit) exitCode() int {
	if e.detailed && e.code != exitOK {
		return exitFailed
	}
	return e.code
}

// changesExit is a dry run's end: with --detailed-exitcode, 2 when apply
// would change something (Terraform's convention), else nil (exit 0).
func (a *applyRun) changesExit(changes bool) error {
	if a.detailedExit && changes {
		return dryRunExit{code: exitChanges}
	}
	return nil
}

// writeChange prints what applying m would change on a host whose node
// runs the applied plan: the diff against it, and what apply will do
// about it (d): an upgrade, in place, or a refusal and why.
func (a *applyRun) writeChange(m *manifest.Manifest, facts plan.Facts, applied, p *plan.Plan, d *apply.Decision) error {
	// The diff compares plans of the same machine, so it shows what
	// changes, not the machine's name in every path.
	same := p
	var err error
	if applied.Machine != p.Machine && (applied.Machine == p.Alternate) {
		if same, err = render.PlanFor(m, facts, applied.Machine); err != nil {
			return render.Locate(m, err)
		}
	}
	diff := plan.Compare(applied, same)
	diff.Apply = &plan.ApplyNote{Action: string(d.Action), Summary: d.String()}
	if d.Action == apply.ActionRefuse {
		diff.Apply.ExitCode = d.Exit
	}
	if d.Action == apply.ActionUpgrade {
		diff.SetUpgrade(&plan.UpgradeNote{From: d.From, To: d.Machine, StopTimeout: m.Upgrade.StopTimeout, ReadyTimeout: m.Upgrade.ReadyTimeout})
	}
	if a.output == "json" {
		return plan.WriteDiffJSON(a.out, diff)
	}
	return plan.WriteDiffText(a.out, diff)
}

// writeLayers says, for --dry-run --layers, which of the rootfs image's
// layers apply would fetch: it resolves the image (reading its index,
// manifest and config, nothing else) and looks for each layer in the
// host's layer store.
func (a *applyRun) writeLayers(ctx context.Context, p *plan.Plan) error {
	if !a.layers {
		return nil
	}
	for _, s := range p.Steps {
		img := s.Image
		if img == nil {
			continue
		}
		if img.Layers == nil {
			fmt.Fprintf(a.out, "\nImage layers: the machine root is a flattened tree; apply fetches every layer of the image.\n")
			continue
		}
		res, ls, err := apply.PlanLayers(ctx, a.root, img, slog.Default())
		if err != nil {
			return fmt.Errorf("--layers: %w", err)
		}
		fmt.Fprintf(a.out, "\nImage layers of %s (manifest %s, %d layers, %s):\n", res.Reference, res.ManifestDigest, res.Layers, progress.Bytes(res.Bytes))
		fetch, bytes := 0, int64(0)
		seen := map[digest.Digest]bool{}
		for i, l := range ls {
			what := "in the store"
			switch {
			case seen[l.DiffID]:
				what = "repeated"
			case !l.Present:
				what, bytes = "fetch", bytes+l.Size
				fetch++
			}
			seen[l.DiffID] = true
			fmt.Fprintf(a.out, "  %2d  %-12s  %s  %9s  (diff_id %s)\n", i+1, what, l.Digest, progress.Bytes(l.Size), l.DiffID)
		}
		distinct := len(seen)
		if distinct < len(ls) {
			fmt.Fprintf(a.out, "%d of the image's layers repeat a layer listed before: each layer is fetched once and mounted once, at its topmost position.\n", len(ls)-distinct)
		}
		max, err := apply.MaxLayers(a.root, img)
		if err != nil {
			return fmt.Errorf("--layers: %w", err)
		}
		if distinct > max {
			if img.Layers.FlattenFallback {
				fmt.Fprintf(a.out, "apply would flatten: %d layers, this kernel mounts at most %d per root (it names a mount's layers in one page of options); it pulls the image as one tree into %s and fetches nothing into the layer store.\n", distinct, max, img.Dest)
			} else {
				fmt.Fprintf(a.out, "apply would refuse the image: %d layers, this kernel mounts at most %d per root, and machine.rootfs.store is layers (auto flattens such an image).\n", distinct, max)
			}
			continue
		}
		fmt.Fprintf(a.out, "apply would fetch and unpack %d of %d layers (%s) into %s; %d are there already.\n",
			fetch, distinct, progress.Bytes(bytes), img.Layers.Store, distinct-fetch)
	}
	return nil
}
