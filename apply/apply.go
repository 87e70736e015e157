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
	"context"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"time"

	"github.com/nodespawn/nodespawn/internal/confine"
	"github.com/nodespawn/nodespawn/internal/machine"
	"github.com/nodespawn/nodespawn/plan"
	"github.com/nodespawn/nodespawn/state"
)

// Defaults for Options.
const (
	DefaultParallel     = 4
	DefaultLockTimeout  = state.DefaultLockTimeout
	DefaultPollInterval = machine.DefaultPollInterval
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
	// Source says where the manifest came from (a path, or the first-boot
	// source and where in it: "nocloud: /var/lib/cloud/seed/nocloud/user-data");
	// it goes into the record, for status.
	Source string
	// Warnings, when set, collects what the run warns about into the
	// record; it must be the handler of the logs the run writes to.
	Warnings *Warnings
	// ToolVersion goes into the record.
	ToolVersion string
	// Force re-checks every step even when this plan was already applied,
	// and applies a changed manifest in place where no upgrade is possible
	// (no Upgrade.Render, or no systemd: a tree that is not a running host)
	// or where no run has succeeded yet.
	Force bool
	// Upgrade configures upgrades by alternating machines.
	Upgrade UpgradeOptions
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
	// checkpoint, when set, is called between the changes of an upgrade's
	// switch and rollback; tests kill the process there.
	checkpoint func(label string)
}

// Result is what Run did.
type Result struct {
	// AlreadyApplied is true when the record showed this manifest and plan
	// applied successfully, and nothing was done.
	AlreadyApplied bool
	// Record is the result record as written (the previous one when
	// AlreadyApplied).
	Record *state.Record
	// Machine is the machine that runs the node after the run.
	Machine string
	// Upgrade is how an upgrade or a resumed switch ended, when there was one.
	Upgrade *state.UpgradeOutcome
	// Decision is what the run decided to do (Decide's answer on the
	// state the run found); nil when it stopped before deciding.
	Decision *Decision
}

// Run applies p against opts.Root. It returns a *StepError when a step
// failed (ExitCode maps errors to exit codes).
//
// On a host whose node runs from another manifest, Run upgrades by
// alternating machines when it can (Options.Upgrade.Render, a live
// systemd): it prepares the other machine of the pair, switches to it,
// verifies the node and rolls back when that fails (upgrade.go). A switch
// a killed run left half-done is finished first, whatever p is.
func Run(ctx context.Context, p *plan.Plan, opts Options) (*Result, error) {
	opts = withDefaults(opts)
	if opts.ManifestDigest == "" {
		return nil, errors.New("apply: no manifest digest given (Options.ManifestDigest is required to recognise a finished run)")
	}
	if err := validatePlan(p); err != nil {
		return nil, err
	}
	r, err := begin(ctx, opts)
	if err != nil {
		return nil, err
	}
	defer r.end()
	var resumed *state.UpgradeOutcome
	if u := r.st.Upgrade; u != nil && u.Phase != state.UpgradePreparing {
		out, err := r.resumeSwitch(ctx)
		if err != nil {
			return &Result{Record: r.lastRecord(), Machine: r.st.Active, Upgrade: out}, err
		}
		resumed = out
	}
	res, err := r.decide(ctx, p)
	if res != nil && res.Upgrade == nil {
		res.Upgrade = resumed
	}
	return res, err
}

// run is one locked run against the host.
type run struct {
	opts Options
	log  *slog.Logger
	s    *state.Store
	host *confine.Root // s.Root()
	lock *state.Lock
	st   *state.Machines
}

// begin opens the root, takes the lock, sweeps what a killed run left in
// the state directory and reads the machines'
func begin(ctx context.Context, opts Options) (*run, error) {
	s, err := state.Create(opts.Root)
	if err != nil {
		return nil, fmt.Errorf("apply: %w", err)
	}
	lock, err := s.Lock(ctx, opts.LockTimeout, opts.Log)
	if err != nil {
		s.Close()
		return nil, err
	}
	r := &run{opts: opts, log: opts.Log, s: s, host: s.Root(), lock: lock}
	// What a run killed while making or saving its state left there.
	err = s.Sweep()
	if err == nil {
		r.st, err = s.Machines()
	}
	if err != nil {
		r.end()
		return nil, err
	}
	return r, nil
}

func (r *run) end() {
	r.lock.Release()
	r.s.Close()
}

func (r *run) lastRecord() *state.Record {
	rec, _ := r.s.Record()
	return rec
}

// decide applies p in place, upgrades to the other machine, or refuses:
// what decideOn says, the decision Decide gives the dry run.
func (r *run) decide(ctx context.Context, p *plan.Plan) (*Result, error) {
	st, opts := r.st, r.opts
	prev, err := r.s.Record()
	if err != nil {
		return nil, err
	}
	d, err := decideOn(st, prev, r.s.Show(state.RecordFile), p, opts, canSwitch(opts, false))
	if err != nil {
		return nil, err
	}
	switch d.Action {
	case ActionRefuse:
		return nil, d.Err
	case ActionUpgrade:
		res, err := r.upgrade(ctx, p)
		if res != nil {
			res.Decision = d
		}
		return res, err
	}
	if u := st.Upgrade; u != nil {
		r.log.Info("abandoning the upgrade that was being prepared: the given manifest is the one the node runs", "from", u.From, "to", u.To, "phase", u.Phase)
		st.Upgrade = nil
		if err := r.s.WriteMachines(st); err != nil {
			return nil, err
		}
	}
	if d.Action == ActionReplace {
		r.log.Info("applying this manifest in place of the one whose first run failed; its machine never started", "machine", d.Machine, "manifest", prev.ManifestDigest, "status", prev.Status)
	}
	res, err := r.inPlace(ctx, d.plan, prev)
	if res != nil {
		res.Decision = d
	}
	return res, err
}

// sameManifest reports whether a is the manifest opts names.
func sameManifest(a state.Applied, opts Options) bool {
	return a.Is(opts.ManifestDigest, opts.SourceDigest)
}

// inPlace applies p to its machine: the first run, a resumed one, or a
// converge of the running machine when the host or the tool changed.
// prev is the last run's record (nil when none). decideOn has ruled out
// a manifest other than prev's unless its machine never started.
func (r *run) inPlace(ctx context.Context, p *plan.Plan, prev *state.Record) (*Result, error) {
	opts, log, host, st := r.opts, r.log, r.host, r.st
	planDigest := p.Digest()
	cur := st.Applied[p.Machine]
	// A machine this manifest made whose root is broken (a layer gone from
	// the store, its upper directory gone) is repaired by running the plan
	// again, never taken as applied.
	var fix *rootFix
	if sameManifest(cur, opts) {
		var err error
		if fix, err = r.brokenRoot(ctx, p, cur); err != nil {
			return nil, fmt.Errorf("apply: %w", err)
		}
	}
	if !opts.Force && fix == nil && cur.Succeeded && sameManifest(cur, opts) && cur.PlanDigest == planDigest {
		// A run killed between its record and its stamp: the record is
		// the truth, so the stamp follows it.
		if err := r.s.WriteStamp(planDigest); err != nil {
			return nil, fmt.Errorf("apply: %w", err)
		}
		log.Info("already applied; nothing to do", "machine", p.Machine, "manifest", opts.ManifestDigest, "plan", planDigest, "finished", cur.At)
		return &Result{AlreadyApplied: true, Record: prev, Machine: p.Machine}, nil
	}
	if prev != nil && prev.Machine == p.Machine && prev.Status != state.StatusSucceeded {
		log.Info("resuming an unfinished run; every step checks what is already there", "previous_status", prev.Status, "started", prev.Started)
	} else if cur.Succeeded && cur.PlanDigest != planDigest {
		log.Info("plan changed since the last run (host facts or tool version); converging", "previous_plan", cur.PlanDigest, "plan", planDigest)
	}

	// The machine being made is the one that may run: say so before
	// anything starts it.
	if st.Active != p.Machine {
		if err := r.s.SetActive(st, p.Machine); err != nil {
			return nil, fmt.Errorf("apply: %w", err)
		}
	}
	if err := r.s.StoreMachine(p, opts.Manifest); err != nil {
		return nil, fmt.Errorf("apply: %w", err)
	}
	// The apply-time nftables flush is for a host whose machine has never
	// run; once it has, the ruleset holds kube-proxy's and the CNI's rules,
	// and the flush belongs to the machine's start unit alone.
	started := cur.Succeeded || (prev != nil && prev.Status == state.StatusSucceeded)
	st.Applied[p.Machine] = state.Applied{ManifestDigest: opts.ManifestDigest, SourceDigest: opts.SourceDigest, PlanDigest: planDigest, At: time.Now().UTC(), Started: cur.Started}
	if err := r.s.WriteMachines(st); err != nil {
		return nil, err
	}

	rec := newRecord(p, opts, planDigest)
	w := &recordWriter{store: r.s, rec: rec, warn: opts.Warnings}
	if err := w.save(); err != nil {
		return nil, err
	}
	if opts.afterStep != nil {
		opts.afterStep(0)
	}
	ex := &executor{plan: p, opts: opts, log: log, rec: w, host: host, machineStarted: started}
	var runErr error
	if fix != nil {
		// Only now, with the run recorded: a run killed during the repair
		// is resumed, not taken for applied.
		runErr = r.repair(ctx, fix)
	}
	if runErr == nil {
		runErr = ex.run(ctx, plan.PhaseHost, plan.PhaseRootfs, plan.PhaseMachine)
	}
	if runErr != nil {
		if err := ex.skip(phaseSteps(p, plan.PhaseStart), "not run: "+failedStep(runErr)); err != nil {
			return nil, err
		}
	} else {
		if opts.Deps.Systemd != nil && !st.Applied[p.Machine].Started {
			// From here on there may be a node to protect: another
			// manifest is refused (decideOn), not applied in its place.
			a := st.Applied[p.Machine]
			a.Started = true
			st.Applied[p.Machine] = a
			if err := r.s.WriteMachines(st); err != nil {
				return nil, err
			}
		}
		runErr = ex.run(ctx, plan.PhaseStart)
	}
	if runErr == nil {
		runErr = ex.pruneDownloads()
	}
	if err := w.finish(runErr == nil); err != nil && runErr == nil {
		runErr = err
	}
	if runErr == nil {
		a := st.Applied[p.Machine]
		a.Succeeded, a.At = true, time.Now().UTC()
		st.Applied[p.Machine] = a
		runErr = r.s.WriteMachines(st)
	}
	if runErr != nil {
		// A failed step's line carries its error; this line says which
		// step, and where the record is, without repeating it.
		if se := (*StepError)(nil); errors.As(runErr, &se) {
			log.Error("apply failed", "step", se.ID, "record", r.s.Show(state.RecordFile))
		} else {
			log.Error("apply failed", "error", runErr, "record", r.s.Show(state.RecordFile))
		}
		return &Result{Record: w.snapshot(), Machine: p.Machine}, loggedError{runErr}
	}
	if err := r.s.WriteStamp(planDigest); err != nil {
		return &Result{Record: w.snapshot(), Machine: p.Machine}, fmt.Errorf("apply: %w", err)
	}
	log.Info("apply finished", "machine", p.Machine, "steps", len(p.Steps), "duration", time.Since(rec.Started).Round(time.Millisecond))
	return &Result{Record: w.snapshot(), Machine: p.Machine}, nil
}

// openRoot opens the root a run writes to, creating it first when it is
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
	o.Upgrade = o.Upgrade.withDefaults()
	return o
}

// StoredManifest returns the manifest the active machine was made from
// (or the last run's machine, when none is active yet), for reset to
// render the same plan again.
func StoredManifest(root string) ([]byte, error) {
	b, err := withState(root, func(s *state.Store, m string) ([]byte, error) { return s.ManifestOf(m) })
	if err == nil && b == nil {
		err = fs.ErrNotExist
	}
	if err != nil {
		return nil, fmt.Errorf("read stored manifest: %w (was nodespawn apply ever run here?)", err)
	}
	return b, nil
}

// StoredPlan returns the plan the active machine was made from (or the
// last run's machine's, when none is active yet), secrets redacted, or nil
// when there is none.
func StoredPlan(root string) (*plan.Plan, error) {
	return withState(root, (*state.Store).PlanOf)
}

// withState calls f with the state under root and the machine that runs
// the node: the active one, else the last run's.
func withState[T any](root string, f func(*state.Store, string) (T, error)) (T, error) {
	var zero T
	s, err := state.Open(root)
	if err != nil {
		return zero, err
	}
	defer s.Close()
	m, err := s.Current()
	if err != nil || m == "" {
		return zero, err
	}
	return f(s, m)
}
