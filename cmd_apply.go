package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"syscall"

	"github.com/opencontainers/go-digest"
	"github.com/spf13/cobra"

	"github.com/nodespawn/nodespawn/apply"
	"github.com/nodespawn/nodespawn/internal/httpx"
	"github.com/nodespawn/nodespawn/internal/probe"
	"github.com/nodespawn/nodespawn/manifest"
	"github.com/nodespawn/nodespawn/plan"
	"github.com/nodespawn/nodespawn/render"
	"github.com/nodespawn/nodespawn/userdata"
)

// sourceFlags say where the manifest comes from.
type sourceFlags struct {
	file   string
	source string
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
once; a run that died half-way is resumed; a different manifest is refused
unless --force.

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
				output: output, root: root, force: force, factsFile: factsFile}
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
	if renderOnly {
		cmd.Use = "render"
		cmd.Short = "Print the plan (the same as apply --dry-run)"
		cmd.Long = "render prints the plan apply would carry out, and changes nothing. It is apply --dry-run by another name."
		cmd.Example = "  nodespawn render -f examples/minimal.yaml -o json"
		return cmd
	}
	f.BoolVar(&dryRun, "dry-run", false, "print the plan and change nothing")
	f.BoolVar(&force, "force", false, "apply even though another manifest was applied on this host")
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

	// What the last attempt got to, for the first-boot report.
	manifest *manifest.Manifest
	plan     *plan.Plan
	result   *apply.Result
}

// once reads the manifest, renders the plan and applies it (or prints it).
func (a *applyRun) once(ctx context.Context) error {
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
			d := plan.Compare(applied, p)
			if a.output == "json" {
				return plan.WriteDiffJSON(a.out, d)
			}
			return plan.WriteDiffText(a.out, d)
		}
	}
	if a.dryRun {
		if a.output == "json" {
			return plan.WriteJSON(a.out, p)
		}
		return plan.WriteText(a.out, p)
	}
	if a.factsFile != "" {
		return usageError{fmt.Errorf("--facts describes another host; use it with --dry-run only")}
	}
	for _, w := range p.Warnings {
		slog.Warn(w)
	}
	deps, err := apply.DefaultDeps(a.root, slog.Default())
	if err != nil {
		return err
	}
	canonical, err := m.Digest()
	if err != nil {
		return err
	}
	res, err := apply.Run(ctx, p, apply.Options{
		Root:           a.root,
		ManifestDigest: canonical.String(),
		SourceDigest:   digest.FromBytes(data).String(),
		Manifest:       data,
		ToolVersion:    version,
		Force:          a.force,
		Deps:           deps,
	})
	a.result = res
	if err != nil {
		return err
	}
	switch {
	case res.AlreadyApplied:
		fmt.Fprintf(a.out, "already applied: machine %s, node %s\n", p.Machine, p.NodeName)
	case a.root != "/":
		fmt.Fprintf(a.out, "applied the files of machine %s under %s (host settings and systemd steps skipped: not the running host)\n", p.Machine, a.root)
	default:
		fmt.Fprintf(a.out, "applied: machine %s is running node %s\n", p.Machine, p.NodeName)
	}
	return nil
}
