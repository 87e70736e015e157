// Package upgrade upgrades a node by alternating machines. The node runs
// in one machine of a pair (kube1); a changed manifest is applied by preparing the other (kube2)
// beside it: its rootfs, binaries, configuration and host files, nothing
// the running machine uses. Then the switch: the old machine is stopped
// (kubelet's graceful shutdown gives pods their time), the new one is made
// active and started, and the node must come back: containerd and kubelet
// active, kubelet not failing, and the Node Ready with a heartbeat from
// after the switch, as the API server sees it. If it does not within the
// manifest's upgrade.readyTimeout, the switch is undone: the new machine
// is stopped and the old one started again and verified the same way.
//
// The node's state (kubelet's client certificate, containerd's images)
// lives in the plan's NodeState directory on the host, bound into
// whichever machine runs, so the new machine is the same Node.
//
// state.MachinesFile records each phase before it starts, and
// layout.ActiveMachineFile (which each machine's service checks before it
// starts) is switched with one rename once the old machine has stopped:
// whatever instant a run is killed at, at most one machine runs, and the
// one that does is the active one. The done stamp is removed for the
// switch, so the first-boot unit finishes an interrupted switch at the
// next boot.
package upgrade

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"path"
	"time"

	"github.com/nodespawn/nodespawn/apply"
	"github.com/nodespawn/nodespawn/internal/layout"
	"github.com/nodespawn/nodespawn/internal/machine"
	"github.com/nodespawn/nodespawn/plan"
	"github.com/nodespawn/nodespawn/state"
)

// run is an upgrade's (or a rollback's) work in one locked session.
type run struct{ *apply.Session }

// Run prepares the machine of p's pair that is not running from p's
// manifest, beside the running one, then switches to it: it stops the
// running machine, makes the new one active, starts it by running its
// plan's start phase through the executor, waits for the Node, and rolls
// back when that does not happen. The caller holds s (apply.Begin) and
// has decided that p is an upgrade (provision.Decide).
func Run(ctx context.Context, s *apply.Session, p *plan.Plan) (*apply.Result, error) {
	return run{s}.upgrade(ctx, p)
}

// ResumeSwitch finishes a switch a killed run left half-done in s: it
// stops the old machine and verifies the new one, or finishes the
// rollback.
func ResumeSwitch(ctx context.Context, s *apply.Session) (*state.UpgradeOutcome, error) {
	return run{s}.resumeSwitch(ctx)
}

// switchRun is one switch from a running machine to another.
type switchRun struct {
	from, to string
	toPlan   *plan.Plan
	ex       *apply.Executor
	w        *apply.RecordWriter
	// started is when the upgrade started; prepared when its
	// preparation ended.
	started, prepared time.Time
	manual            bool
}

// Prepare prepares the machine of p's pair that is not running from p's
// manifest, beside the running one, and stops there: nothing the running
// machine uses is touched. The state records the upgrade in phase
// preparing with its Prepared time (and the manifest digest it is made
// from); SwitchPrepared switches to it later, and Run with the same
// manifest finishes it. Prepare is idempotent: a machine already prepared
// from the same plan is left as it is, and a preparation a killed run
// left is resumed (another manifest's is started over). The caller holds
// s and has decided that p is an upgrade (provision.Prepare).
func Prepare(ctx context.Context, s *apply.Session, p *plan.Plan) (*apply.Result, error) {
	sr, res, err := run{s}.prepare(ctx, p, true)
	if err != nil || sr == nil {
		return res, err
	}
	return run{s}.prepared(sr)
}

// SwitchPrepared switches the node to the machine Prepare made, made from
// the manifest whose digest is manifestDigest (apply.Options'): it stops
// the running machine, starts the prepared one, waits for the Node and
// rolls back when that does not happen, as Run does after its
// preparation. Anything but a finished preparation of that manifest
// beside the running machine is a *NotPreparedError, and nothing changes.
func SwitchPrepared(ctx context.Context, s *apply.Session, manifestDigest string) (*apply.Result, error) {
	return run{s}.switchPrepared(ctx, manifestDigest)
}

// NotPreparedError is a switch asked for a machine that is not prepared.
type NotPreparedError struct {
	Manifest string
	Why      string
}

func (e *NotPreparedError) Error() string {
	return fmt.Sprintf("upgrade: no machine is prepared from manifest %s (%s); prepare it first", e.Manifest, e.Why)
}

// Refused marks e an apply.Refusal: nothing changed (exit code 2).
func (e *NotPreparedError) Refused() {}

// upgrade prepares the machine that is not running from p's manifest,
// then switches to it.
func (r run) upgrade(ctx context.Context, p *plan.Plan) (*apply.Result, error) {
	s, res, err := r.prepare(ctx, p, false)
	if err != nil || s == nil {
		return res, err
	}
	return r.switchTo(ctx, s)
}

// prepare makes the machine that is not running from p's manifest and
// returns the switch to it. only (Prepare) returns no switch, and no
// error, when that machine is prepared from the same plan already.
func (r run) prepare(ctx context.Context, p *plan.Plan, only bool) (*switchRun, *apply.Result, error) {
	st, opts, log, host := r.Machines, r.Opts, r.Log, r.Host
	from := st.Active
	to, ok := layout.Pair{p.Machine, p.Alternate}.Other(from)
	if !ok {
		return nil, nil, &apply.ManifestChangedError{Applied: st.Applied[from].ManifestDigest, Given: opts.ManifestDigest, Record: host.Show(state.RecordFile), Machine: from}
	}
	tp := p
	if tp.Machine != to {
		var err error
		if tp, err = opts.Upgrade.Render(to); err != nil {
			return nil, nil, err
		}
		if err := apply.Validate(tp); err != nil {
			return nil, nil, err
		}
	}
	now := time.Now().UTC()
	started := now
	planDigest := tp.Digest()
	if u := st.Upgrade; u != nil && u.To == to && u.From == from && u.ManifestDigest == opts.ManifestDigest {
		started = u.Started
		if u.Prepared != nil && only && st.Applied[to].PlanDigest == planDigest {
			log.Info("upgrade: the other machine is prepared from this manifest already", "running", from, "prepared", to, "at", *u.Prepared)
			return nil, &apply.Result{Record: r.LastRecord(), Machine: from}, nil
		}
		log.Info("resuming the preparation of the upgrade", "from", from, "to", to, "started", u.Started)
		if u.Prepared != nil {
			// Prepared again (the plan changed, or a switch follows):
			// not prepared until this run says so.
			u.Prepared = nil
			if err := r.Store.WriteMachines(st); err != nil {
				return nil, nil, err
			}
		}
	} else {
		if u != nil {
			log.Info("the upgrade being prepared was for another manifest; starting over", "to", u.To, "manifest", u.ManifestDigest)
		}
		if err := r.clearMachine(ctx, to); err != nil {
			return nil, nil, err
		}
		st.Upgrade = &state.Upgrade{From: from, To: to, Phase: state.UpgradePreparing, ManifestDigest: opts.ManifestDigest, Started: now}
		if st.Previous == to {
			st.Previous = ""
		}
		delete(st.Applied, to)
		if err := r.Store.WriteMachines(st); err != nil {
			return nil, nil, err
		}
		r.Checkpoint("upgrade:preparing")
	}
	log.Info("upgrade: preparing the other machine beside the running one", "running", from, "preparing", to, "node", tp.NodeName)

	if err := r.Store.StoreMachine(tp, opts.Manifest); err != nil {
		return nil, nil, err
	}
	st.Applied[to] = state.Applied{ManifestDigest: opts.ManifestDigest, SourceDigest: opts.SourceDigest, PlanDigest: planDigest, At: now}
	if err := r.Store.WriteMachines(st); err != nil {
		return nil, nil, err
	}
	rec := apply.NewRecord(tp, opts, planDigest)
	rec.Upgrade = &state.RecordUpgrade{From: from, To: to}
	w := r.RecordWriter(rec, opts.Warnings)
	if err := w.Save(); err != nil {
		return nil, nil, err
	}
	if opts.Hooks.AfterStep != nil {
		opts.Hooks.AfterStep(0)
	}
	ex := r.Executor(tp, w, true)
	if err := ex.Run(ctx, plan.PhaseHost, plan.PhaseRootfs, plan.PhaseMachine); err != nil {
		if serr := ex.Skip(apply.PhaseSteps(tp, plan.PhaseStart), "not run: the preparation failed; machine "+from+" still runs the node"); serr != nil {
			return nil, nil, serr
		}
		_ = w.Finish(false)
		log.Error("upgrade: the preparation failed; nothing was switched", "running", from, "error", err)
		return nil, &apply.Result{Record: w.Snapshot(), Machine: from}, err
	}
	return &switchRun{from: from, to: to, toPlan: tp, ex: ex, w: w, started: started, prepared: time.Now()}, nil, nil
}

// prepared records a preparation that finished, for a switch later
// (Prepare): the machine runs nothing yet, and its start phase is the
// switch's.
func (r run) prepared(s *switchRun) (*apply.Result, error) {
	st := r.Machines
	at := s.prepared.UTC()
	st.Upgrade.Prepared = &at
	if err := r.Store.WriteMachines(st); err != nil {
		return nil, err
	}
	r.Checkpoint("upgrade:prepared")
	if err := s.ex.Skip(apply.PhaseSteps(s.toPlan, plan.PhaseStart), "not run yet: machine "+s.to+" is prepared; the switch starts it"); err != nil {
		return nil, err
	}
	s.w.Upgrade(func(ru *state.RecordUpgrade) { ru.Outcome = state.OutcomePrepared })
	if err := s.w.Finish(true); err != nil {
		return nil, err
	}
	r.Log.Info("upgrade: the other machine is prepared beside the running one; nothing was switched", "running", s.from, "prepared", s.to,
		"prepare", at.Sub(s.started).Round(time.Millisecond))
	return &apply.Result{Record: s.w.Snapshot(), Machine: s.from}, nil
}

// switchPrepared switches to the machine a Prepare made from the
// manifest whose digest is digest.
func (r run) switchPrepared(ctx context.Context, digest string) (*apply.Result, error) {
	st, opts := r.Machines, r.Opts
	u := st.Upgrade
	switch {
	case u == nil:
		return nil, &NotPreparedError{Manifest: digest, Why: "no upgrade is being prepared"}
	case u.Phase != state.UpgradePreparing:
		return nil, &NotPreparedError{Manifest: digest, Why: fmt.Sprintf("the upgrade from %s to %s is %s", u.From, u.To, u.Phase)}
	case u.ManifestDigest != digest:
		return nil, &NotPreparedError{Manifest: digest, Why: "machine " + u.To + " is being prepared from manifest " + u.ManifestDigest}
	case u.Prepared == nil:
		return nil, &NotPreparedError{Manifest: digest, Why: "the preparation of machine " + u.To + " has not finished"}
	case u.From != st.Active:
		return nil, &NotPreparedError{Manifest: digest, Why: "it was prepared beside machine " + u.From + ", and " + st.Active + " runs the node"}
	}
	if opts.Deps.Systemd == nil {
		return nil, fmt.Errorf("upgrade: switching to machine %s needs the running host's systemd (root %s)", u.To, opts.Root)
	}
	tp, err := r.Store.PlanOf(u.To)
	if err != nil {
		return nil, err
	}
	a := st.Applied[u.To]
	if tp == nil || a.ManifestDigest != digest {
		return nil, &NotPreparedError{Manifest: digest, Why: "the stored plan of machine " + u.To + " is missing"}
	}
	rec := apply.NewRecord(tp, opts, a.PlanDigest)
	rec.ManifestDigest, rec.SourceDigest = a.ManifestDigest, a.SourceDigest
	rec.Upgrade = &state.RecordUpgrade{From: u.From, To: u.To}
	for i := range rec.Steps {
		if rec.Steps[i].Phase != plan.PhaseStart {
			rec.Steps[i].Outcome, rec.Steps[i].Error = state.OutcomeSkipped, "done by the preparation"
		}
	}
	w := r.RecordWriter(rec, opts.Warnings)
	if err := w.Save(); err != nil {
		return nil, err
	}
	r.Log.Info("upgrade: switching to the prepared machine", "running", u.From, "prepared", u.To, "at", *u.Prepared)
	return r.switchTo(ctx, &switchRun{from: u.From, to: u.To, toPlan: tp, ex: r.Executor(tp, w, true), w: w, started: u.Started, prepared: *u.Prepared})
}

// switchTo stops the running machine, makes the new one active and
// verifies it.
func (r run) switchTo(ctx context.Context, s *switchRun) (*apply.Result, error) {
	st, log := r.Machines, r.Log
	u := st.Upgrade
	u.Phase = state.UpgradeSwitching
	if err := r.Store.WriteMachines(st); err != nil {
		return nil, err
	}
	r.Checkpoint("switch:switching")
	// From here until the node runs again, the first-boot unit finishes
	// an interrupted switch at boot.
	if err := r.Store.RemoveStamp(); err != nil {
		return nil, err
	}
	r.Checkpoint("switch:stamp-removed")
	log.Info("upgrade: stopping the running machine", "machine", s.from, "timeout", r.Opts.Upgrade.StopTimeout)
	if err := r.StopMachine(ctx, s.from); err != nil {
		// The old machine may still run: the new one must not start.
		// Back to a prepared upgrade, with the node where it was.
		u.Phase = state.UpgradePreparing
		_ = r.Store.WriteMachines(st)
		// The old machine runs the node as before: the first boot has
		// nothing to finish.
		_ = r.Store.WriteStamp(st.Applied[s.from].PlanDigest)
		_ = s.w.Finish(false)
		return &apply.Result{Record: s.w.Snapshot(), Machine: s.from}, fmt.Errorf("upgrade: stop machine %s: %w; nothing was switched", s.from, err)
	}
	r.Checkpoint("switch:stopped")
	switched := time.Now().UTC()
	u.Switched = &switched
	s.w.Upgrade(func(ru *state.RecordUpgrade) { ru.SwitchedMS = s.w.Since(switched) })
	// Both boot links exist while the active file changes, so a boot at
	// any instant starts the active machine, and only it.
	if err := r.ensureEnableLink(s.to, s.toPlan); err != nil {
		return nil, err
	}
	r.Checkpoint("switch:new-linked")
	// One rename decides which machine may start, at boot too.
	if err := r.Store.WriteActiveFile(s.to); err != nil {
		return nil, err
	}
	r.Checkpoint("switch:active-file")
	st.Active = s.to
	u.Phase = state.UpgradeVerifying
	if err := r.Store.WriteMachines(st); err != nil {
		return nil, err
	}
	r.Checkpoint("switch:verifying")
	return r.verify(ctx, s)
}

// verify starts the new machine and waits for the node to run in it; a
// failure rolls back.
func (r run) verify(ctx context.Context, s *switchRun) (*apply.Result, error) {
	u := r.Machines.Upgrade
	timeout := r.Opts.Upgrade.ReadyTimeout
	log := r.Log
	if err := r.removeEnableLink(s.from); err != nil {
		return nil, err
	}
	r.Checkpoint("verify:old-unlinked")
	log.Info("upgrade: starting the new machine and waiting for the node", "machine", s.to, "timeout", timeout)
	vctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	s.ex.RestartLimit = r.Opts.Upgrade.RestartLimit
	err := s.ex.Run(vctx, plan.PhaseStart)
	if err == nil {
		since := time.Now()
		if u.Switched != nil {
			since = *u.Switched
		}
		err = r.nodeReady(vctx, s.toPlan, since)
	}
	if err != nil && ctx.Err() != nil {
		// Interrupted (SIGTERM): the next run finishes the switch.
		return &apply.Result{Record: s.w.Snapshot(), Machine: s.to}, err
	}
	if err != nil {
		return r.rollback(ctx, s, err)
	}
	r.Checkpoint("verify:ready")
	return r.switched(s)
}

// switched records a switch that worked.
func (r run) switched(s *switchRun) (*apply.Result, error) {
	st, host := r.Machines, r.Host
	now := time.Now().UTC()
	a := st.Applied[s.to]
	a.Succeeded, a.At = true, now
	st.Applied[s.to] = a
	st.Previous = s.from
	outcome := state.OutcomeSwitched
	if s.manual {
		outcome = state.OutcomeManualRollback
	}
	last := &state.UpgradeOutcome{From: s.from, To: s.to, Outcome: outcome, Started: s.started, Ended: now}
	if !s.prepared.IsZero() {
		last.PrepareMS = s.prepared.Sub(s.started).Milliseconds()
	}
	if u := st.Upgrade; u != nil && u.Switched != nil {
		last.SwitchMS = now.Sub(*u.Switched).Milliseconds()
	}
	st.Upgrade, st.Last = nil, last
	if err := r.Store.WriteMachines(st); err != nil {
		return nil, err
	}
	r.Checkpoint("switched:state")
	s.w.Upgrade(func(ru *state.RecordUpgrade) { ru.Outcome, ru.ReadyMS = outcome, s.w.Since(now) })
	if err := s.w.Finish(true); err != nil {
		return nil, err
	}
	if err := r.Store.WriteStamp(a.PlanDigest); err != nil {
		return nil, fmt.Errorf("apply: write done stamp: %w", err)
	}
	// Layers only the machine cleared for this upgrade used go now; the
	// previous machine's stay for a rollback. A failure here costs disk
	// space, not the upgrade: the next switch collects them.
	if gone, err := apply.CollectLayers(host, r.Log); err != nil {
		r.Log.Warn("upgrade: layer store not collected", "error", err)
	} else if len(gone) > 0 {
		r.Log.Info("upgrade: layers no machine uses removed from the layer store", "layers", len(gone))
	}
	r.Checkpoint("switched:collected")
	r.Log.Info("upgrade: the node runs on the new machine", "machine", s.to, "node", s.toPlan.NodeName, "previous", s.from,
		"prepare", time.Duration(last.PrepareMS)*time.Millisecond, "switch", time.Duration(last.SwitchMS)*time.Millisecond)
	return &apply.Result{Record: s.w.Snapshot(), Machine: s.to, Upgrade: last}, nil
}

// rollback stops the new machine and runs the node on the old one again.
func (r run) rollback(ctx context.Context, s *switchRun, reason error) (*apply.Result, error) {
	st, log := r.Machines, r.Log
	u := st.Upgrade
	u.Phase, u.Reason = state.UpgradeRollingBack, reason.Error()
	if err := r.Store.WriteMachines(st); err != nil {
		return nil, err
	}
	r.Checkpoint("rollback:rolling-back")
	log.Error("upgrade: the new machine did not run the node; rolling back", "machine", s.to, "back to", s.from, "reason", reason)
	begun := time.Now().UTC()
	err := r.runOn(ctx, s.w, s.to, s.from, begun)
	now := time.Now().UTC()
	last := &state.UpgradeOutcome{From: s.from, To: s.to, Reason: reason.Error(), Started: s.started, Ended: now, RollbackMS: now.Sub(begun).Milliseconds()}
	if !s.prepared.IsZero() {
		last.PrepareMS = s.prepared.Sub(s.started).Milliseconds()
	}
	if err != nil {
		// The rollback is retried by the next run (and at boot).
		last.Outcome = state.OutcomeRollbackFailed
		st.Last = last
		_ = r.Store.WriteMachines(st)
		s.w.Upgrade(func(ru *state.RecordUpgrade) { ru.Outcome, ru.Reason = last.Outcome, last.Reason })
		_ = s.w.Finish(false)
		log.Error("upgrade: the rollback failed too", "machine", s.from, "error", err)
		return &apply.Result{Record: s.w.Snapshot(), Machine: st.Active, Upgrade: last}, &UpgradeError{From: s.from, To: s.to, Reason: reason, RollbackErr: err}
	}
	last.Outcome = state.OutcomeRolledBack
	st.Upgrade, st.Last = nil, last
	if s.manual {
		// A rollback by hand that failed: the machine it left still
		// holds the previous one.
		st.Previous = s.to
	} else {
		a := st.Applied[s.to]
		a.Succeeded = false
		st.Applied[s.to] = a
		if st.Previous == s.to {
			st.Previous = ""
		}
	}
	if err := r.Store.WriteMachines(st); err != nil {
		return nil, err
	}
	r.Checkpoint("rollback:state")
	if err := r.Store.WriteStamp(st.Applied[s.from].PlanDigest); err != nil {
		return nil, fmt.Errorf("apply: write done stamp: %w", err)
	}
	s.w.Upgrade(func(ru *state.RecordUpgrade) {
		ru.Outcome, ru.Reason, ru.RolledBackMS = last.Outcome, last.Reason, s.w.Since(now)
	})
	_ = s.w.Finish(false)
	log.Info("upgrade: rolled back; the node runs on the old machine", "machine", s.from, "rollback", time.Duration(last.RollbackMS)*time.Millisecond)
	return &apply.Result{Record: s.w.Snapshot(), Machine: s.from, Upgrade: last}, &UpgradeError{From: s.from, To: s.to, RolledBack: true, Reason: reason}
}

// runOn stops machine off and runs the node on machine on again: boot
// link, active file, the stored plan's start phase, Node Ready (since).
// What its steps do is recorded through w.
func (r run) runOn(ctx context.Context, w *apply.RecordWriter, off, on string, since time.Time) error {
	sd := r.Opts.Deps.Systemd
	if err := r.StopMachine(ctx, off); err != nil {
		return fmt.Errorf("stop machine %s: %w", off, err)
	}
	r.Checkpoint("runon:stopped")
	onPlan, err := r.Store.PlanOf(on)
	if err != nil {
		return err
	}
	if err := r.ensureEnableLink(on, onPlan); err != nil {
		return err
	}
	r.Checkpoint("runon:linked")
	if err := r.Store.WriteActiveFile(on); err != nil {
		return err
	}
	r.Checkpoint("runon:active-file")
	r.Machines.Active = on
	if err := r.Store.WriteMachines(r.Machines); err != nil {
		return err
	}
	if err := r.removeEnableLink(off); err != nil {
		return err
	}
	r.Checkpoint("runon:unlinked")
	ctx, cancel := context.WithTimeout(ctx, r.Opts.Upgrade.ReadyTimeout)
	defer cancel()
	if onPlan == nil {
		// No stored plan (a state directory damaged by hand): start the
		// machine's service and wait for the node's units, as its plan's
		// start phase would.
		if err := sd.DaemonReload(ctx); err != nil {
			return err
		}
		unit := layout.NspawnUnit(on)
		if _, err := sd.Start(ctx, unit); err != nil {
			return fmt.Errorf("start %s: %w", unit, err)
		}
		r.Checkpoint("runon:started")
		return apply.WaitMachine(ctx, sd, waitOf(nil, on), r.Opts.PollInterval, 0)
	}
	// The machine is started the way it was first started: its stored
	// plan's start phase (boot link, daemon-reload, start, wait), run by
	// the executor.
	if err := r.Executor(onPlan, w, true).Run(ctx, plan.PhaseStart); err != nil {
		return err
	}
	r.Checkpoint("runon:started")
	return r.nodeReady(ctx, onPlan, since)
}

// nodeReady waits for the Node to be Ready through Options.Upgrade.NodeReady,
// failing early when containerd or kubelet in the machine keep restarting.
func (r run) nodeReady(ctx context.Context, p *plan.Plan, since time.Time) error {
	check := r.Opts.Upgrade.NodeReady
	if check == nil {
		r.Log.Warn("no Node check configured: the switch is verified by the machine's units alone", "machine", p.Machine)
		return nil
	}
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	go func() {
		if err := apply.WatchRestarts(ctx, r.Opts.Deps.Systemd, p.Machine, layout.NodeUnits(), r.Opts.Upgrade.RestartLimit, r.Opts.PollInterval); err != nil {
			cancel(err)
		}
	}()
	err := check(ctx, p, since)
	if cause := context.Cause(ctx); err != nil && cause != nil && !errors.Is(cause, context.Canceled) && !errors.Is(cause, context.DeadlineExceeded) {
		return cause
	}
	if err != nil {
		return fmt.Errorf("node %s: %w", p.NodeName, err)
	}
	return nil
}

// stopMachine stops a machine within the upgrade's stop timeout,

func (r run) removeEnableLink(m string) error {
	p := layout.EnableLink(m)
	if err := r.Host.Remove(p); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("disable machine %s at boot: %w", m, err)
	}
	return nil
}

func (r run) ensureEnableLink(m string, p *plan.Plan) error {
	target := layout.NspawnTemplate
	if p != nil {
		for _, s := range p.Steps {
			if s.Link != nil && s.Link.Path == layout.EnableLink(m) {
				target = s.Link.Target
			}
		}
	}
	if cur, err := r.Host.Readlink(layout.EnableLink(m)); err == nil && cur == target {
		return nil
	}
	if err := r.Host.MkdirParents(path.Dir(layout.EnableLink(m))); err != nil {
		return err
	}
	if err := r.Host.Symlink(target, layout.EnableLink(m), -1, -1); err != nil {
		return fmt.Errorf("enable machine %s at boot: %w", m, err)
	}
	return nil
}

// waitOf is the plan's wait for machine m, or the default one.
func waitOf(p *plan.Plan, m string) *plan.Wait {
	if p != nil {
		for _, s := range p.Steps {
			if s.Wait != nil && s.Wait.Machine == m {
				return s.Wait
			}
		}
	}
	return &plan.Wait{Machine: m, Units: layout.NodeUnits()}
}

// clearMachine removes what an earlier upgrade left of machine m (the
// previous machine, or a half-made one) so it can be prepared afresh. A
// rootfs nodespawn knows nothing about is refused, never removed.
func (r run) clearMachine(ctx context.Context, m string) error {
	st, host := r.Machines, r.Host
	if m == st.Active {
		return fmt.Errorf("upgrade: refusing to clear machine %s: it runs the node", m)
	}
	p, err := r.Store.PlanOf(m)
	if err != nil {
		return err
	}
	_, applied := st.Applied[m]
	known := p != nil || applied || st.Previous == m
	rootfs := layout.MachineRoot(m)
	if _, err := host.Lstat(rootfs); err == nil && !known {
		return &MachineExistsError{Machine: m, Rootfs: host.Show(rootfs), Running: st.Active}
	}
	if !known {
		return nil
	}
	r.Log.Info("upgrade: removing what is left of the other machine", "machine", m, "previous", st.Previous == m)
	active, err := r.Store.PlanOf(st.Active)
	if err != nil {
		return err
	}
	if err := machine.Remove(ctx, host, r.Opts.Deps.Systemd, m, p, machine.RemoveOptions{
		StopTimeout: r.Opts.Upgrade.StopTimeout, RemoveTimeout: machine.DefaultRemoveTimeout, Poll: r.Opts.PollInterval, Log: r.Log,
		// What the running machine's plan wrote stays, shared or not.
		Keep: machine.SystemdFiles(st.Active, active),
	}); err != nil {
		return err
	}
	if err := host.RemoveAll(layout.MachineStateDir(m)); err != nil {
		return fmt.Errorf("upgrade: %w", err)
	}
	return nil
}

// MachineExistsError is an upgrade refused because the machine it would
// prepare exists and nodespawn did not make it.
type MachineExistsError struct {
	Machine, Rootfs, Running string
}

func (e *MachineExistsError) Error() string {
	return fmt.Sprintf("upgrade: machine %s runs the node and the upgrade prepares %s, but %s exists and nodespawn did not make it; "+
		"move it away (machinectl remove %s) or run nodespawn reset and apply with another machine.name", e.Running, e.Machine, e.Rootfs, e.Machine)
}

// resumeSwitch finishes a switch a killed run left half-done: it stops the
// old machine and verifies the new one, or finishes the rollback.
func (r run) resumeSwitch(ctx context.Context) (*state.UpgradeOutcome, error) {
	st, opts := r.Machines, r.Opts
	u := st.Upgrade
	if opts.Deps.Systemd == nil {
		return nil, fmt.Errorf("apply: an upgrade from %s to %s was interrupted while %s; finishing it needs the running host's systemd (root %s)", u.From, u.To, u.Phase, opts.Root)
	}
	tp, err := r.Store.PlanOf(u.To)
	if err != nil {
		return nil, err
	}
	r.Log.Warn("finishing an upgrade a killed run left half-done", "from", u.From, "to", u.To, "phase", u.Phase)
	if tp == nil {
		// Nothing to verify against: go back to the machine that ran.
		tp = &plan.Plan{Version: plan.Version, Machine: u.To}
		if u.Phase != state.UpgradeRollingBack {
			u.Phase, u.Reason = state.UpgradeRollingBack, "the plan of "+u.To+" is missing"
		}
	}
	rec := apply.NewRecord(tp, opts, st.Applied[u.To].PlanDigest)
	rec.ManifestDigest, rec.SourceDigest = st.Applied[u.To].ManifestDigest, st.Applied[u.To].SourceDigest
	rec.Upgrade = &state.RecordUpgrade{From: u.From, To: u.To}
	for i := range rec.Steps {
		if rec.Steps[i].Phase != plan.PhaseStart {
			rec.Steps[i].Outcome, rec.Steps[i].Error = state.OutcomeSkipped, "done by the run that was interrupted"
		}
	}
	w := r.RecordWriter(rec, opts.Warnings)
	if err := w.Save(); err != nil {
		return nil, err
	}
	ex := r.Executor(tp, w, true)
	s := &switchRun{from: u.From, to: u.To, toPlan: tp, ex: ex, w: w, started: u.Started}
	var res *apply.Result
	switch u.Phase {
	case state.UpgradeSwitching:
		res, err = r.switchTo(ctx, s)
	case state.UpgradeVerifying:
		res, err = r.verify(ctx, s)
	default:
		reason := u.Reason
		if reason == "" {
			reason = "interrupted"
		}
		res, err = r.rollback(ctx, s, errors.New(reason))
	}
	var out *state.UpgradeOutcome
	if res != nil {
		out = res.Upgrade
	}
	return out, err
}

// Resume finishes a switch a killed run left half-done, and does nothing
// when there is none. The first-boot unit calls it before anything else,
// so a switch cut by a power failure is finished at the next boot.
func Resume(ctx context.Context, opts apply.Options) (*state.UpgradeOutcome, error) {
	s, err := apply.Begin(ctx, opts)
	if err != nil {
		return nil, err
	}
	defer s.End()
	if u := s.Machines.Upgrade; u == nil || u.Phase == state.UpgradePreparing {
		return nil, nil
	}
	return ResumeSwitch(ctx, s)
}

// Rollback switches the node back to the previous machine (the one the
// last upgrade switched away from), verified like an upgrade and undone
// the same way when the previous machine does not run the node.
func Rollback(ctx context.Context, opts apply.Options) (*apply.Result, error) {
	if opts.Deps.Systemd == nil {
		return nil, errors.New("rollback: needs the running host's systemd")
	}
	s, err := apply.Begin(ctx, opts)
	if err != nil {
		return nil, err
	}
	defer s.End()
	r := run{s}
	opts = s.Opts
	st := r.Machines
	if err := st.RollbackProblem(); err != nil {
		return nil, err
	}
	prev, err := r.Store.PlanOf(st.Previous)
	if err != nil {
		return nil, err
	}
	a, ok := st.Applied[st.Previous]
	if prev == nil || !ok {
		return nil, &state.NoRollbackError{Why: "the plan of previous machine " + st.Previous + " is missing"}
	}
	if _, err := r.Host.Lstat(prev.Rootfs); err != nil {
		return nil, &state.NoRollbackError{Why: fmt.Sprintf("the rootfs of previous machine %s is gone: %v", st.Previous, err)}
	}
	now := time.Now().UTC()
	st.Upgrade = &state.Upgrade{From: st.Active, To: st.Previous, Phase: state.UpgradeSwitching, ManifestDigest: a.ManifestDigest, Started: now}
	if err := r.Store.WriteMachines(st); err != nil {
		return nil, err
	}
	o := opts
	o.ManifestDigest, o.SourceDigest = a.ManifestDigest, a.SourceDigest
	o.Source = "" // the previous manifest's, not known here
	rec := apply.NewRecord(prev, o, a.PlanDigest)
	rec.Upgrade = &state.RecordUpgrade{From: st.Active, To: st.Previous}
	for i := range rec.Steps {
		if rec.Steps[i].Phase != plan.PhaseStart {
			rec.Steps[i].Outcome, rec.Steps[i].Error = state.OutcomeSkipped, "made by an earlier run"
		}
	}
	w := r.RecordWriter(rec, o.Warnings)
	if err := w.Save(); err != nil {
		return nil, err
	}
	ex := r.Executor(prev, w, true)
	r.Log.Info("rollback: switching the node back to the previous machine", "from", st.Active, "to", st.Previous)
	return r.switchTo(ctx, &switchRun{from: st.Active, to: st.Previous, toPlan: prev, ex: ex, w: w, started: now, manual: true})
}
