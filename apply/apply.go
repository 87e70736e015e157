// Package apply executes a plan.Plan against a root directory, once.
//
// Run takes a lock, compares the plan with the result record of the last
// run, and executes the steps phase by phase. Every step first checks what
// is already there and changes only what differs, so a run that died
// half-way is finished by the next one, and a finished run is recognised
// and not repeated. The record (<root>/var/lib/nodespawn/result.json) is
// rewritten atomically after every step.
//
// What apply cannot do itself (pulling the rootfs image, downloading
// binaries, host settings, systemd and machined) it asks of small
// interfaces in Deps; DefaultDeps wires the real implementations.
package apply

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"time"

	"github.com/nodespawn/nodespawn/internal/confine"
	"github.com/nodespawn/nodespawn/plan"
)

// StateDir is where apply keeps its record, relative to the root.
const StateDir = "/var/lib/nodespawn"

// Paths under StateDir.
const (
	// RecordFile is the result record of the last run.
	RecordFile = StateDir + "/result.json"
	// ManifestFile is the manifest of the last run (0600: it may hold a
	// bootstrap token), kept so reset can render the same plan again.
	ManifestFile = StateDir + "/manifest"
	// PlanFile is the plan of the last run, secrets redacted (0600): what
	// reset removes and what a changed manifest is compared against.
	PlanFile = StateDir + "/plan.json"
	// DoneStamp exists once a run succeeded; the first-boot unit does not
	// start again while it is there.
	DoneStamp = StateDir + "/done"
	// LockFile serialises applies (and resets). It lives in /run so it
	// vanishes at reboot and never outlives the state dir it guards.
	LockFile = "/run/nodespawn.lock"
)

// Defaults for Options.
const (
	DefaultParallel     = 4
	DefaultLockTimeout  = 2 * time.Minute
	DefaultPollInterval = 2 * time.Second
)

// Options configure Run.
type Options struct {
	// Root is the directory every plan path is relative to; "" means "/".
	Root string
	// ManifestDigest identifies the manifest the plan was rendered from
	// (required): the canonical digest of the parsed manifest with its
	// defaults (manifest.Digest), so a comment or a reordering is not a
	// change. A record of a different manifest makes Run refuse unless
	// Force is set.
	ManifestDigest string
	// SourceDigest is the digest of the manifest's bytes as given; it is
	// recorded beside ManifestDigest, for the operator.
	SourceDigest string
	// Manifest, when set, is stored (0600) beside the record so reset can
	// render the plan again.
	Manifest []byte
	// ToolVersion goes into the record.
	ToolVersion string
	// Force applies even when the record names another manifest, and
	// re-checks every step even when this plan was already applied.
	Force bool
	// Deps are the implementations of the steps apply does not do itself.
	// A nil member makes the steps that need it "skipped" (DefaultDeps
	// leaves the host-changing ones nil when Root is not "/").
	Deps Deps
	// Log receives one line per step; nil means slog.Default().
	Log *slog.Logger
	// Parallel bounds how many steps of a phase run at once (default 4).
	Parallel int
	// LockTimeout bounds the wait for another apply to finish (default 2m).
	LockTimeout time.Duration
	// PollInterval is how often the wait step looks at the machine (default 2s).
	PollInterval time.Duration

	// afterStep, when set, is called after each step's outcome is recorded
	// with the number of steps recorded so far; tests use it to crash the
	// process at every step boundary.
	afterStep func(n int)
}

// Result is what Run did.
type Result struct {
	// AlreadyApplied is true when the record showed this manifest and plan
	// applied successfully, and nothing was done.
	AlreadyApplied bool
	// Record is the result record as written (the previous one when
	// AlreadyApplied).
	Record *Record
}

// Run applies p against opts.Root. It returns a *StepError when a step
// failed (ExitCode maps errors to exit codes).
func Run(ctx context.Context, p *plan.Plan, opts Options) (*Result, error) {
	opts = withDefaults(opts)
	log := opts.Log
	if opts.ManifestDigest == "" {
		return nil, errors.New("apply: no manifest digest given (Options.ManifestDigest is required to recognise a finished run)")
	}
	if err := validatePlan(p); err != nil {
		return nil, err
	}
	host, err := openRoot(opts.Root)
	if err != nil {
		return nil, fmt.Errorf("apply: %w", err)
	}
	defer host.Close()
	lock, err := acquireLock(ctx, host, opts.LockTimeout, log)
	if err != nil {
		return nil, err
	}
	defer lock.release()
	// What a run killed while making or saving its state left there.
	if err := sweepUp(host, StateDir, nil); err != nil {
		return nil, err
	}

	planDigest := p.Digest()
	prev, err := readRecord(host)
	if err != nil {
		return nil, err
	}
	if prev != nil && !prev.sameManifest(opts) && !opts.Force {
		return nil, &ManifestChangedError{Applied: prev.ManifestDigest, Given: opts.ManifestDigest, Record: host.Show(RecordFile)}
	}
	if prev != nil && !opts.Force && prev.Status == StatusSucceeded && prev.PlanDigest == planDigest {
		// A run killed between its record and its stamp: the record is
		// the truth, so the stamp follows it.
		if err := writeStamp(host, planDigest); err != nil {
			return nil, fmt.Errorf("apply: write done stamp: %w", err)
		}
		log.Info("already applied; nothing to do", "manifest", opts.ManifestDigest, "plan", planDigest, "finished", prev.Ended)
		return &Result{AlreadyApplied: true, Record: prev}, nil
	}
	if prev != nil && prev.Status != StatusSucceeded {
		log.Info("resuming an unfinished run; every step checks what is already there", "previous_status", prev.Status, "started", prev.Started)
	} else if prev != nil && prev.PlanDigest != planDigest {
		log.Info("plan changed since the last run (host facts or tool version); converging", "previous_plan", prev.PlanDigest, "plan", planDigest)
	}

	if err := host.MkdirAll(StateDir, 0o700, -1, -1); err != nil {
		return nil, fmt.Errorf("apply: create state directory: %w", err)
	}
	if opts.Manifest != nil {
		if err := host.WriteFile(ManifestFile, opts.Manifest, 0o600, -1, -1); err != nil {
			return nil, fmt.Errorf("apply: store manifest: %w", err)
		}
	}
	if err := storePlan(host, p); err != nil {
		return nil, err
	}

	rec := newRecord(p, opts, planDigest)
	w := &recordWriter{root: host, rec: rec}
	if err := w.save(); err != nil {
		return nil, err
	}
	if opts.afterStep != nil {
		opts.afterStep(0)
	}
	// The apply-time nftables flush is for a host whose machine has never
	// run; once it has, the ruleset holds kube-proxy's and the CNI's rules,
	// and the flush belongs to the machine's start unit alone.
	started := prev != nil && prev.Status == StatusSucceeded
	ex := &executor{plan: p, opts: opts, log: log, rec: w, host: host, machineStarted: started}
	runErr := ex.run(ctx)
	if runErr == nil {
		runErr = ex.pruneDownloads()
	}

	if err := w.finish(runErr == nil); err != nil && runErr == nil {
		runErr = err
	}
	if runErr != nil {
		log.Error("apply failed", "error", runErr, "record", host.Show(RecordFile))
		return &Result{Record: w.snapshot()}, runErr
	}
	if err := writeStamp(host, planDigest); err != nil {
		return &Result{Record: w.snapshot()}, fmt.Errorf("apply: write done stamp: %w", err)
	}
	log.Info("apply finished", "steps", len(p.Steps), "duration", time.Since(rec.Started).Round(time.Millisecond))
	return &Result{Record: w.snapshot()}, nil
}

// openRoot opens the root a run applies to, creating it first when it is
// missing (a fresh --root directory): it is the caller's own starting
// point, the one path taken as given.
func openRoot(root string) (*confine.Root, error) {
	if err := os.MkdirAll(root, 0o755); err != nil {
		return nil, err
	}
	return confine.Open(root)
}

func withDefaults(o Options) Options {
	if o.Root == "" {
		o.Root = "/"
	}
	if abs, err := filepath.Abs(o.Root); err == nil {
		o.Root = abs
	}
	if o.Log == nil {
		o.Log = slog.Default()
	}
	if o.Parallel <= 0 {
		o.Parallel = DefaultParallel
	}
	if o.LockTimeout <= 0 {
		o.LockTimeout = DefaultLockTimeout
	}
	if o.PollInterval <= 0 {
		o.PollInterval = DefaultPollInterval
	}
	return o
}

// StoredManifest returns the manifest the last run stored under root, for
// reset to render the same plan again.
func StoredManifest(root string) ([]byte, error) {
	b, err := readState(root, ManifestFile)
	if err != nil {
		return nil, fmt.Errorf("read stored manifest: %w (was nodespawn apply ever run here?)", err)
	}
	return b, nil
}

// readState reads one of apply's state files under root ("" means "/").
func readState(root, file string) ([]byte, error) {
	if root == "" {
		root = "/"
	}
	host, err := confine.Open(root)
	if err != nil {
		return nil, err
	}
	defer host.Close()
	return host.ReadFile(file)
}

// storePlan keeps the plan being applied, secrets redacted, for reset and
// for the next run to compare a changed plan against.
func storePlan(host *confine.Root, p *plan.Plan) error {
	b, err := json.MarshalIndent(p.RedactKeepingDigests(), "", "  ")
	if err != nil {
		return fmt.Errorf("apply: encode plan: %w", err)
	}
	b = append(b, '\n')
	if cur, err := host.ReadFile(PlanFile); err == nil && bytes.Equal(cur, b) {
		return nil
	}
	if err := host.WriteFile(PlanFile, b, 0o600, -1, -1); err != nil {
		return fmt.Errorf("apply: store plan: %w", err)
	}
	return nil
}

// StoredPlan returns the plan the last run stored under root (secrets
// redacted), or nil when there is none (nothing applied, or a state
// directory from a version that did not store it).
func StoredPlan(root string) (*plan.Plan, error) {
	b, err := readState(root, PlanFile)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read stored plan: %w", err)
	}
	var p plan.Plan
	if err := json.Unmarshal(b, &p); err != nil {
		return nil, fmt.Errorf("read stored plan %s: %w", PlanFile, err)
	}
	if p.Version != plan.Version {
		return nil, fmt.Errorf("read stored plan %s: version %q, this build reads %q", PlanFile, p.Version, plan.Version)
	}
	return &p, nil
}

// writeStamp writes the done stamp unless it already says the same.
func writeStamp(host *confine.Root, planDigest string) error {
	want := []byte(planDigest + "\n")
	if b, err := host.ReadFile(DoneStamp); err == nil && string(b) == string(want) {
		return nil
	}
	return host.WriteFile(DoneStamp, want, 0o644, -1, -1)
}
