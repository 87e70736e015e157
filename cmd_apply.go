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

// read returns the manifest's name and bytes. A file given with -f may be
// user-data (#cloud-config, MIME multipart, gzip) holding the manifest.
func (s *sourceFlags) read(ctx context.Context, stdin io.Reader) (string, []byte, error) {
	spec := s.source
	switch {
	case s.file != "" && s.source != "":
		return "", nil, usageError{fmt.Errorf("give -f or --source, not both")}
	case s.file != "":
		spec = s.file
	case s.source == "":
		return "", nil, usageError{fmt.Errorf("no manifest: give -f FILE, -f - for stdin, or --source auto")}
	}
	name, data, err := userdata.Read(ctx, spec, userdata.Options{
		Stdin: stdin,
		// For Azure IMDS, which answers only requests that reach it directly.
		HTTPClient: httpx.NewClient(httpx.WithLogger(slog.Default()), httpx.WithoutProxy()),
	})
	if err != nil && s.file != "" {
		return "", nil, usageError{err}
	}
	s.found = name
	if s.file == "" && spec != name {
		s.found = spec + ": " + name
	}
	return name, data, err
}

// load reads and validates the manifest.
func (s *sourceFlags) load(ctx context.Context, stdin io.Reader) (*manifest.Manifest, []byte, error) {
	name, data, err := s.read(ctx, stdin)
	if err != nil {
		return nil, nil, err
	}
	m, err := manifest.Load(name, data)
	if err != nil {
		return nil, nil, err
	}
	return m, data, nil
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
changed, with unified diffs of changed files (nodespawn render always
prints the whole plan). Secrets are shown as <redacted>.`,
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
				output: output, root: root, force: force, factsFile: factsFile, layers: layers}
			if layers && !a.dryRun {
				return usageError{fmt.Errorf("--layers goes with --dry-run")}
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
			name, data, err := src.read(ctx, cmd.InOrStdin())
			if err != nil {
				return err
			}
			m, err := manifest.Load(name, data)
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
	if a.diff && a.factsFile == "" {
		// On a host that was applied before, what matters is what this
		// manifest would change.
		applied, err := apply.StoredPlan(a.root)
		if err != nil {
			return err
		}
		if applied != nil {
			if err := a.writeChange(m, facts, applied, p); err != nil {
				return err
			}
			return a.writeLayers(ctx, p)
		}
	}
	if a.dryRun {
		if a.output == "json" {
			return plan.WriteJSON(a.out, p)
		}
		if err := plan.WriteText(a.out, p); err != nil {
			return err
		}
		return a.writeLayers(ctx, p)
	}
	if a.factsFile != "" {
		return usageError{fmt.Errorf("--facts describes another host; use it with --dry-run only")}
	}
	for _, w := range p.Warnings {
		slog.Warn(w)
	}
	if err := checkSameNode(a.root, m, p); err != nil {
		return err
	}
	deps, err := apply.DefaultDeps(a.root, slog.Default())
	if err != nil {
		return err
	}
	canonical, err := m.Digest()
	if err != nil {
		return err
	}
	up := upgradeOptions(m, facts, a.root, render.PlanFor)
	up.Refuse = a.refuse
	res, err := apply.Run(ctx, p, apply.Options{
		Root:           a.root,
		ManifestDigest: canonical.String(),
		SourceDigest:   digest.FromBytes(data).String(),
		Source:         a.src.found,
		Warnings:       a.warnings,
		Manifest:       data,
		ToolVersion:    version,
		Force:          a.force,
		Deps:           deps,
		Upgrade:        up,
	})
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
	case res.Upgrade != nil && res.Upgrade.Outcome == apply.OutcomeSwitched:
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

// writeChange prints what applying m would change on a host whose node
// runs the applied plan: the diff against it, and, when the manifest
// changed, the upgrade that would carry the change.
func (a *applyRun) writeChange(m *manifest.Manifest, facts plan.Facts, applied, p *plan.Plan) error {
	st, err := apply.ReadMachines(a.root)
	if err != nil {
		return err
	}
	canonical, err := m.Digest()
	if err != nil {
		return err
	}
	// The diff compares plans of the same machine, so it shows what
	// changes, not the machine's name in every path.
	same := p
	if applied.Machine != p.Machine && (applied.Machine == p.Alternate) {
		if same, err = render.PlanFor(m, facts, applied.Machine); err != nil {
			return render.Locate(m, err)
		}
	}
	d := plan.Compare(applied, same)
	cur, ok := st.Applied[st.Active]
	if ok && cur.Succeeded && cur.ManifestDigest != canonical.String() {
		to := p.Alternate
		if st.Active == p.Alternate {
			to = p.Machine
		}
		d.Upgrade = &plan.UpgradeNote{From: st.Active, To: to, StopTimeout: m.Upgrade.StopTimeout, ReadyTimeout: m.Upgrade.ReadyTimeout}
		if err := checkSameNode(a.root, m, p); err != nil {
			d.Upgrade.Refused = err.Error()
		}
	}
	if a.output == "json" {
		return plan.WriteDiffJSON(a.out, d)
	}
	return plan.WriteDiffText(a.out, d)
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
		for i, l := range ls {
			what := "in the store"
			if !l.Present {
				what, bytes = "fetch", bytes+l.Size
				fetch++
			}
			fmt.Fprintf(a.out, "  %2d  %-12s  %s  %9s  (diff_id %s)\n", i+1, what, l.Digest, progress.Bytes(l.Size), l.DiffID)
		}
		fmt.Fprintf(a.out, "apply would fetch and unpack %d of %d layers (%s) into %s; %d are there already.\n",
			fetch, len(ls), progress.Bytes(bytes), img.Layers.Store, len(ls)-fetch)
	}
	return nil
}
