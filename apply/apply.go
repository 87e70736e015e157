// Package apply is the executor: it runs a plan.Plan's steps against a
// root directory, atomically and resumably, with the record writer.
//
// A Session (Begin) holds the lock and the state it found; InPlace runs a
// plan on its machine, phase by phase. Every step first checks what is
// already there and changes only what differs, so a run that died
// half-way is finished by the next one, and a finished run is recognised
// and not repeated. The record (<root>/var/lib/nodespawn/result.json,
// package state) is rewritten atomically after every step. Package
// upgrade runs an upgrade's preparation and switch through the same
// Session and Executor; package provision decides which to run.
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

	// Hooks are called at every point a run may be killed at; tests
	// crash the process there.
	Hooks Hooks
}

// Hooks are the points between two changes where tests kill a run.
type Hooks struct {
	// AfterStep is called after each step's outcome is recorded, with
	// the number of steps recorded so far.
	AfterStep func(n int)
	// Checkpoint is called between the changes of an upgrade's switch
	// and rollback.
	Checkpoint func(label string)
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
}

// Session is one locked run against a root: the state it found, the
// lock that keeps other runs out until End, and the options. Begin makes
// one; the in-place run (InPlace), an upgrade's preparation, switch and
// rollback (package upgrade) all work in one.
type Session struct {
	Opts     Options
	Log      *slog.Logger
	Store    *state.Store
	Host     *confine.Root // Store.Root()
	Machines *state.Machines
	lock     *state.Lock
}

// Begin opens the root (creating a missing --root directory), takes the
// lock, sweeps what a killed run left in the state directory and reads
// the machines' state. The caller ends it with End.
func Begin(ctx context.Context, opts Options) (*Session, error) {
	opts = WithDefaults(opts)
	s, err := state.Create(opts.Root)
	if err != nil {
		return nil, fmt.Errorf("apply: %w", err)
	}
	lock, err := s.Lock(ctx, opts.LockTimeout, opts.Log)
	if err != nil {
		s.Close()
		return nil, err
	}
	r := &Session{Opts: opts, Log: opts.Log, Store: s, Host: s.Root(), lock: lock}
	// What a run killed while making or saving its state left there.
	err = s.Sweep()
	if err == nil {
		r.Machines, err = s.Machines()
	}
	if err != nil {
		r.End()
		return nil, err
	}
	return r, nil
}

// End releases the lock and closes the root.
func (r *Session) End() {
	r.lock.Release()
	r.Store.Close()
}

// LastRecord is the record as it is on disk now, or nil.
func (r *Session) LastRecord() *state.Record {
	rec, _ := r.Store.Record()
	return rec
}

// StopMachine stops machine m within the upgrade's stop timeout,
// terminating it when that is not enough.
func (r *Session) StopMachine(ctx context.Context, m string) error {
	return machine.Stop(ctx, r.Opts.Deps.Systemd, r.Log, m, r.Opts.Upgrade.StopTimeout, r.Opts.PollInterval)
}

// Checkpoint marks a point between two changes of a switch
// (Options.Hooks.Checkpoint; tests kill the process there).
func (r *Session) Checkpoint(label string) {
	if r.Opts.Hooks.Checkpoint != nil {
		r.Opts.Hooks.Checkpoint(label)
	}
}

// AfterStep calls Options.Hooks.AfterStep with how many steps have an
// outcome.
func (r *Session) AfterStep(n int) {
	if r.Opts.Hooks.AfterStep != nil {
		r.Opts.Hooks.AfterStep(n)
	}
}

// RecordWriter owns rec for the session's run; warn (Options.Warnings)
// collects its warnings.
func (r *Session) RecordWriter(rec *state.Record, warn *Warnings) *RecordWriter {
	return &RecordWriter{store: r.Store, rec: rec, warn: warn}
}

// Executor runs p's steps against the session's root, recording through
// w. machineStarted says the machine has run before (its start unit, not
// apply, flushes nftables from then on).
func (r *Session) Executor(p *plan.Plan, w *RecordWriter, machineStarted bool) *Executor {
	return &Executor{plan: p, opts: r.Opts, log: r.Log, rec: w, host: r.Host, machineStarted: machineStarted}
}

// SameManifest reports whether a is the manifest opts names.
func SameManifest(a state.Applied, opts Options) bool {
	return a.Is(opts.ManifestDigest, opts.SourceDigest)
}

// InPlace applies p to its machine: the first run, a resumed one, or a
// converge of the running machine when the host or the tool changed.
// prev is the last run's record (nil when none). decideOn has ruled out
// a manifest other than prev's unless its machine never started.
func (r *Session) InPlace(ctx context.Context, p *plan.Plan, prev *state.Record) (*Result, error) {
	opts, log, st := r.Opts, r.Log, r.Machines
	planDigest := p.Digest()
	cur := st.Applied[p.Machine]
	// A machine this manifest made whose root is broken (a layer gone from
	// the store, its upper directory gone) is repaired by running the plan
	// again, never taken as applied.
	var fix *rootFix
	if SameManifest(cur, opts) {
		var err error
		if fix, err = r.brokenRoot(ctx, p, cur); err != nil {
			return nil, fmt.Errorf("apply: %w", err)
		}
	}
	if !opts.Force && fix == nil && cur.Succeeded && SameManifest(cur, opts) && cur.PlanDigest == planDigest {
		// A run killed between its record and its stamp: the record is
		// the truth, so the stamp follows it.
		if err := r.Store.WriteStamp(planDigest); err != nil {
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
		if err := r.Store.SetActive(st, p.Machine); err != nil {
			return nil, fmt.Errorf("apply: %w", err)
		}
	}
	if err := r.Store.StoreMachine(p, opts.Manifest); err != nil {
		return nil, fmt.Errorf("apply: %w", err)
	}
	// The apply-time nftables flush is for a host whose machine has never
	// run; once it has, the ruleset holds kube-proxy's and the CNI's rules,
	// and the flush belongs to the machine's start unit alone.
	started := cur.Succeeded || (prev != nil && prev.Status == state.StatusSucceeded)
	st.Applied[p.Machine] = state.Applied{ManifestDigest: opts.ManifestDigest, SourceDigest: opts.SourceDigest, PlanDigest: planDigest, At: time.Now().UTC(), Started: cur.Started}
	if err := r.Store.WriteMachines(st); err != nil {
		return nil, err
	}

	rec := NewRecord(p, opts, planDigest)
	w := r.RecordWriter(rec, opts.Warnings)
	if err := w.Save(); err != nil {
		return nil, err
	}
	if opts.Hooks.AfterStep != nil {
		opts.Hooks.AfterStep(0)
	}
	ex := r.Executor(p, w, started)
	var runErr error
	if fix != nil {
		// Only now, with the run recorded: a run killed during the repair
		// is resumed, not taken for applied.
		runErr = r.repair(ctx, fix)
	}
	if runErr == nil {
		runErr = ex.Run(ctx, plan.PhaseHost, plan.PhaseRootfs, plan.PhaseMachine)
	}
	if runErr != nil {
		if err := ex.Skip(PhaseSteps(p, plan.PhaseStart), "not run: "+failedStep(runErr)); err != nil {
			return nil, err
		}
	} else {
		if opts.Deps.Systemd != nil && !st.Applied[p.Machine].Started {
			// From here on there may be a node to protect: another
			// manifest is refused (decideOn), not applied in its place.
			a := st.Applied[p.Machine]
			a.Started = true
			st.Applied[p.Machine] = a
			if err := r.Store.WriteMachines(st); err != nil {
				return nil, err
			}
		}
		runErr = ex.Run(ctx, plan.PhaseStart)
	}
	if runErr == nil {
		runErr = ex.pruneDownloads()
	}
	if err := w.Finish(runErr == nil); err != nil && runErr == nil {
		runErr = err
	}
	if runErr == nil {
		a := st.Applied[p.Machine]
		a.Succeeded, a.At = true, time.Now().UTC()
		st.Applied[p.Machine] = a
		runErr = r.Store.WriteMachines(st)
	}
	if runErr != nil {
		// A failed step's line carries its error; this line says which
		// step, and where the record is, without repeating it.
		if se := (*StepError)(nil); errors.As(runErr, &se) {
			log.Error("apply failed", "step", se.ID, "record", r.Store.Show(state.RecordFile))
		} else {
			log.Error("apply failed", "error", runErr, "record", r.Store.Show(state.RecordFile))
		}
		return &Result{Record: w.Snapshot(), Machine: p.Machine}, loggedError{runErr}
	}
	if err := r.Store.WriteStamp(planDigest); err != nil {
		return &Result{Record: w.Snapshot(), Machine: p.Machine}, fmt.Errorf("apply: %w", err)
	}
	log.Info("apply finished", "machine", p.Machine, "steps", len(p.Steps), "duration", time.Since(rec.Started).Round(time.Millisecond))
	return &Result{Record: w.Snapshot(), Machine: p.Machine}, nil
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

// WithDefaults is o with every unset option at its default.
func WithDefaults(o Options) Options {
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
