package provision

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"time"

	"github.com/nodespawn/nodespawn/apply"
	"github.com/nodespawn/nodespawn/internal/progress"
	"github.com/nodespawn/nodespawn/manifest"
	"github.com/nodespawn/nodespawn/plan"
	"github.com/nodespawn/nodespawn/render"
	"github.com/nodespawn/nodespawn/schema"
	"github.com/nodespawn/nodespawn/state"
	"github.com/opencontainers/go-digest"
)

// Run is one `nodespawn apply` (or render): the whole pipeline, source
// to exit.
type Run struct {
	Source *Source
	Stdin  io.Reader
	Out    io.Writer // the plan, the diff, the one-line outcome
	DryRun bool      // print, change nothing
	Diff   bool      // on an applied host, print the change (apply --dry-run)
	Output string    // text or json
	Root   string
	Force  bool
	// FactsFile renders for the host it describes instead of probing
	// (dry runs only).
	FactsFile string
	// Layers: say which image layers apply would fetch (--dry-run --layers).
	Layers bool
	// DetailedExit: --dry-run --detailed-exitcode (0 no changes, 1 error,
	// 2 changes).
	DetailedExit bool
	// ToolVersion goes into the record and the report.
	ToolVersion string

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

// Once reads the manifest, renders the plan and applies it (or prints it).
func (a *Run) Once(ctx context.Context) error {
	if a.refuse && !a.DryRun {
		// A power cut in the middle of an upgrade's switch: the node must
		// run again before anything else, whatever the user-data says.
		if err := resumeAtBoot(ctx, a.Root, a.ToolVersion); err != nil {
			return err
		}
	}
	if !a.DryRun {
		// What this run warns about, probing the host included, goes into
		// its record (status --long shows it).
		prev := slog.Default()
		a.warnings = apply.NewWarnings(prev.Handler())
		slog.SetDefault(slog.New(a.warnings))
		defer slog.SetDefault(prev)
	}
	// The schema compiles and the host is probed while the source is read
	// and parsed: none of the three needs another, and on a dry run they
	// are most of the time taken.
	schema.Warm()
	probeCtx, stopProbe := context.WithCancel(ctx)
	defer stopProbe()
	pending := startFacts(probeCtx, a.FactsFile, a.Root)
	m, data, err := a.Source.Load(ctx, a.Stdin)
	if err != nil {
		stopProbe()
		pending.discard()
		return err
	}
	a.manifest = m
	facts, err := pending.wait(ctx)
	if err != nil {
		return err
	}
	p, err := render.Plan(m, facts)
	if err != nil {
		// The same positions validate reports.
		return render.Locate(m, err)
	}
	a.plan = p
	if a.FactsFile != "" && !a.DryRun {
		return InputError{fmt.Errorf("--facts describes another host; use it with --dry-run only")}
	}
	if a.DryRun && (a.FactsFile != "" || !a.Diff) {
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
	if a.DryRun {
		// On a host that was applied before, what matters is what this
		// manifest would change, and what apply will do about it.
		applied, err := apply.StoredPlan(a.Root)
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
		if d.Action == ActionRefuse {
			// The plan's output says why; the exit code is apply's.
			return ExitError{Code: d.Exit, Detailed: a.DetailedExit}
		}
		return a.changesExit(d.Action != ActionAlreadyApplied)
	}
	for _, w := range p.Warnings {
		slog.Warn(w)
	}
	var res *apply.Result
	if d.Action == ActionRefuse {
		err = d.Err
	} else {
		if opts.Deps, err = apply.DefaultDeps(a.Root, slog.Default()); err != nil {
			return err
		}
		res, _, err = Apply(ctx, p, opts)
	}
	a.result = res
	var changed *apply.ManifestChangedError
	if a.refuse && errors.As(err, &changed) && changed.FirstBoot {
		// The node runs a manifest applied since (an upgrade): the first
		// boot leaves it alone.
		slog.Warn("the node runs another manifest than the user-data's, applied by nodespawn apply; the first boot changes nothing", "machine", changed.Machine, "manifest", changed.Applied, "user-data", changed.Given)
		fmt.Fprintf(a.Out, "already provisioned: machine %s runs the node from manifest %s (the user-data's manifest is not applied at boot)\n", changed.Machine, changed.Applied)
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
		fmt.Fprintf(a.Out, "upgraded: machine %s runs node %s (was %s, kept for nodespawn rollback); prepared in %s, switched in %s\n", u.To, p.NodeName, u.From,
			time.Duration(u.PrepareMS)*time.Millisecond, time.Duration(u.SwitchMS)*time.Millisecond)
	case res.AlreadyApplied:
		fmt.Fprintf(a.Out, "already applied: machine %s, node %s\n", res.Machine, p.NodeName)
	case a.Root != "/":
		fmt.Fprintf(a.Out, "applied the files of machine %s under %s (host settings and systemd steps skipped: not the running host)\n", res.Machine, a.Root)
	default:
		fmt.Fprintf(a.Out, "applied: machine %s is running node %s\n", res.Machine, p.NodeName)
	}
	return nil
}

// decide is what apply will do with m's plan p on the host at a.Root,
// and the options Apply gets: the one decision that the dry run
// prints and apply carries out (Apply makes it again, by the same
// function, under its lock). A manifest for another node than the one
// the host runs is refused here (an upgrade cannot change the node's
// identity), unless its first run failed before the machine started:
// then there is no node, and any manifest for that machine replaces it.
func (a *Run) decide(m *manifest.Manifest, facts plan.Facts, p *plan.Plan, data []byte) (apply.Options, *Decision, error) {
	canonical, err := m.Digest()
	if err != nil {
		return apply.Options{}, nil, err
	}
	up := upgradeOptions(m, facts, a.Root, render.PlanFor)
	up.Refuse = a.refuse
	opts := apply.Options{
		Root:           a.Root,
		ManifestDigest: canonical.String(),
		SourceDigest:   digest.FromBytes(data).String(),
		Source:         a.Source.found,
		Warnings:       a.warnings,
		Manifest:       data,
		ToolVersion:    a.ToolVersion,
		Force:          a.Force,
		Upgrade:        up,
	}
	refuse := func(err error) (apply.Options, *Decision, error) {
		return opts, &Decision{Action: ActionRefuse, Machine: p.Machine, Err: err, Exit: ExitCode(err)}, nil
	}
	// Another machine pair first: the plan of the running machine cannot
	// even be made from this manifest.
	if err := checkSameNode(a.Root, m, p, false); err != nil {
		return refuse(err)
	}
	d, err := Decide(p, opts)
	if err != nil {
		return opts, nil, render.Locate(m, err)
	}
	if d.Action != ActionReplace {
		if err := checkSameNode(a.Root, m, p, true); err != nil {
			return refuse(err)
		}
	}
	return opts, d, nil
}

// writePlan prints the whole plan (--dry-run on a host with nothing
// applied, render, --facts), then, in text, what apply will do.
func (a *Run) writePlan(ctx context.Context, p *plan.Plan, d *Decision) error {
	if a.Output == "json" {
		return plan.WriteJSON(a.Out, p)
	}
	if err := plan.WriteText(a.Out, p); err != nil {
		return err
	}
	if d != nil {
		if _, err := fmt.Fprintf(a.Out, "\n%s\n", d); err != nil {
			return err
		}
	}
	return a.writeLayers(ctx, p)
}

// ExitChanges is --detailed-exitcode's "the dry run found changes".
const ExitChanges = 2

// ExitError ends a dry run whose output said everything: apply's
// refusal code, or with --detailed-exitcode 1 for it (an error).
type ExitError struct {
	Code     int
	Detailed bool
}

func (e ExitError) Error() string { return fmt.Sprintf("dry run exit %d", e.ExitCode()) }

// ExitCode is the process's exit code.
func (e ExitError) ExitCode() int {
	if e.Detailed && e.Code != apply.ExitOK {
		return apply.ExitFailed
	}
	return e.Code
}

// changesExit is a dry run's end: with --detailed-exitcode, 2 when apply
// would change something (Terraform's convention), else nil (exit 0).
func (a *Run) changesExit(changes bool) error {
	if a.DetailedExit && changes {
		return ExitError{Code: ExitChanges}
	}
	return nil
}

// writeChange prints what applying m would change on a host whose node
// runs the applied plan: the diff against it, and what apply will do
// about it (d): an upgrade, in place, or a refusal and why.
func (a *Run) writeChange(m *manifest.Manifest, facts plan.Facts, applied, p *plan.Plan, d *Decision) error {
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
	if d.Action == ActionRefuse {
		diff.Apply.ExitCode = d.Exit
	}
	if d.Action == ActionUpgrade {
		diff.SetUpgrade(&plan.UpgradeNote{From: d.From, To: d.Machine, StopTimeout: m.Upgrade.StopTimeout, ReadyTimeout: m.Upgrade.ReadyTimeout})
	}
	if a.Output == "json" {
		return plan.WriteDiffJSON(a.Out, diff)
	}
	return plan.WriteDiffText(a.Out, diff)
}

// writeLayers says, for --dry-run --layers, which of the rootfs image's
// layers apply would fetch: it resolves the image (reading its index,
// manifest and config, nothing else) and looks for each layer in the
// host's layer store.
func (a *Run) writeLayers(ctx context.Context, p *plan.Plan) error {
	if !a.Layers {
		return nil
	}
	for _, s := range p.Steps {
		img := s.Image
		if img == nil {
			continue
		}
		if img.Layers == nil {
			fmt.Fprintf(a.Out, "\nImage layers: the machine root is a flattened tree; apply fetches every layer of the image.\n")
			continue
		}
		res, ls, err := apply.PlanLayers(ctx, a.Root, img, slog.Default())
		if err != nil {
			return fmt.Errorf("--layers: %w", err)
		}
		fmt.Fprintf(a.Out, "\nImage layers of %s (manifest %s, %d layers, %s):\n", res.Reference, res.ManifestDigest, res.Layers, progress.Bytes(res.Bytes))
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
			fmt.Fprintf(a.Out, "  %2d  %-12s  %s  %9s  (diff_id %s)\n", i+1, what, l.Digest, progress.Bytes(l.Size), l.DiffID)
		}
		distinct := len(seen)
		if distinct < len(ls) {
			fmt.Fprintf(a.Out, "%d of the image's layers repeat a layer listed before: each layer is fetched once and mounted once, at its topmost position.\n", len(ls)-distinct)
		}
		max, err := apply.MaxLayers(a.Root, img)
		if err != nil {
			return fmt.Errorf("--layers: %w", err)
		}
		if distinct > max {
			if img.Layers.FlattenFallback {
				fmt.Fprintf(a.Out, "apply would flatten: %d layers, this kernel mounts at most %d per root (it names a mount's layers in one page of options); it pulls the image as one tree into %s and fetches nothing into the layer store.\n", distinct, max, img.Dest)
			} else {
				fmt.Fprintf(a.Out, "apply would refuse the image: %d layers, this kernel mounts at most %d per root, and machine.rootfs.store is layers (auto flattens such an image).\n", distinct, max)
			}
			continue
		}
		fmt.Fprintf(a.Out, "apply would fetch and unpack %d of %d layers (%s) into %s; %d are there already.\n",
			fetch, distinct, progress.Bytes(bytes), img.Layers.Store, distinct-fetch)
	}
	return nil
}
