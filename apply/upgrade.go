package apply

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"path"
	"time"

	"github.com/nodespawn/nodespawn/internal/machine"
	"github.com/nodespawn/nodespawn/plan"
	"github.com/nodespawn/nodespawn/render"
	"github.com/nodespawn/nodespawn/state"
)

// Upgrades by alternating machines. The node runs in one machine of a pair
// (kube1); a changed manifest is applied by preparing the other (kube2)
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
// MachinesFile records each phase before it starts, and
// plan.ActiveMachineFile (which each machine's service checks before it
// starts) is switched with one rename once the old machine has stopped:
// whatever instant a run is killed at, at most one machine runs, and the
// one that does is the active one. The done stamp is removed for the
// switch, so the first-boot unit finishes an interrupted switch at the
// next boot.

// Defaults for UpgradeOptions.
const (
	DefaultUpgradeStopTimeout  = 90 * time.Second
	DefaultUpgradeReadyTimeout = 10 * time.Minute
	// DefaultRestartLimit is how many kubelet or containerd restarts in
	// the new machine fail a switch at once.
	DefaultRestartLimit = 4
)

// UpgradeOptions configure upgrades by alternating machines.
type UpgradeOptions struct {
	// Render renders the manifest for one machine of its pair. Without
	// it, a changed manifest is refused (or, with Force, applied in place).
	Render func(machine string) (*plan.Plan, error)
	// NodeReady returns once the node p describes is Ready as the API
	// server sees it, with a heartbeat after since, or with ctx's error
	// (and what it last saw). nil verifies a switch by the machine's
	// units alone.
	NodeReady func(ctx context.Context, p *plan.Plan, since time.Time) error
	// Refuse makes a changed manifest an error, never an upgrade (the
	// first boot).
	Refuse bool
	// StopTimeout bounds a machine's stop before it is terminated.
	StopTimeout time.Duration
	// ReadyTimeout bounds the wait for the new machine (and, in a
	// rollback, the old one) to run the node again.
	ReadyTimeout time.Duration
	// RestartLimit is how many restarts of containerd or kubelet in the
	// new machine fail the switch without waiting longer.
	RestartLimit int
}

func (u UpgradeOptions) withDefaults() UpgradeOptions {
	if u.StopTimeout <= 0 {
		u.StopTimeout = DefaultUpgradeStopTimeout
	}
	if u.ReadyTimeout <= 0 {
		u.ReadyTimeout = DefaultUpgradeReadyTimeout
	}
	if u.RestartLimit <= 0 {
		u.RestartLimit = DefaultRestartLimit
	}
	return u
}

// switchRun is one switch from a running machine to another.
type switchRun struct {
	from, to string
	toPlan   *plan.Plan
	ex       *executor
	w        *recordWriter
	// started is when the upgrade started; prepared when its
	// preparation ended.
	started, prepared time.Time
	manual            bool
}

// otherMachine is the machine of p's pair that is not m.
func otherMachine(p *plan.Plan, m string) (string, bool) {
	switch m {
	case p.Machine:
		return p.Alternate, p.Alternate != ""
	case p.Alternate:
		return p.Machine, true
	}
	return "", false
}

// upgrade prepares the machine that is not running from p's manifest,
// then switches to it.
func (r *run) upgrade(ctx context.Context, p *plan.Plan) (*Result, error) {
	st, opts, log, host := r.st, r.opts, r.log, r.host
	from := st.Active
	to, ok := otherMachine(p, from)
	if !ok {
		return nil, &ManifestChangedError{Applied: st.Applied[from].ManifestDigest, Given: opts.ManifestDigest, Record: host.Show(state.RecordFile), Machine: from}
	}
	tp := p
	if tp.Machine != to {
		var err error
		if tp, err = opts.Upgrade.Render(to); err != nil {
			return nil, err
		}
		if err := validatePlan(tp); err != nil {
			return nil, err
		}
	}
	now := time.Now().UTC()
	started := now
	if u := st.Upgrade; u != nil && u.To == to && u.From == from && u.ManifestDigest == opts.ManifestDigest {
		started = u.Started
		log.Info("resuming the preparation of the upgrade", "from", from, "to", to, "started", u.Started)
	} else {
		if u != nil {
			log.Info("the upgrade being prepared was for another manifest; starting over", "to", u.To, "manifest", u.ManifestDigest)
		}
		if err := r.clearMachine(ctx, to); err != nil {
			return nil, err
		}
		st.Upgrade = &state.Upgrade{From: from, To: to, Phase: state.UpgradePreparing, ManifestDigest: opts.ManifestDigest, Started: now}
		if st.Previous == to {
			st.Previous = ""
		}
		delete(st.Applied, to)
		if err := r.s.WriteMachines(st); err != nil {
			return nil, err
		}
		r.checkpoint("upgrade:preparing")
	}
	log.Info("upgrade: preparing the other machine beside the running one", "running", from, "preparing", to, "node", tp.NodeName)

	planDigest := tp.Digest()
	if err := r.s.StoreMachine(tp, opts.Manifest); err != nil {
		return nil, err
	}
	st.Applied[to] = state.Applied{ManifestDigest: opts.ManifestDigest, SourceDigest: opts.SourceDigest, PlanDigest: planDigest, At: now}
	if err := r.s.WriteMachines(st); err != nil {
		return nil, err
	}
	rec := newRecord(tp, opts, planDigest)
	rec.Upgrade = &state.RecordUpgrade{From: from, To: to}
	w := &recordWriter{store: r.s, rec: rec, warn: opts.Warnings}
	if err := w.save(); err != nil {
		return nil, err
	}
	if opts.afterStep != nil {
		opts.afterStep(0)
	}
	ex := &executor{plan: tp, opts: opts, log: log, rec: w, host: host, machineStarted: true}
	if err := ex.run(ctx, plan.PhaseHost, plan.PhaseRootfs, plan.PhaseMachine); err != nil {
		if serr := ex.skip(phaseSteps(tp, plan.PhaseStart), "not run: the preparation failed; machine "+from+" still runs the node"); serr != nil {
			return nil, serr
		}
		_ = w.finish(false)
		log.Error("upgrade: the preparation failed; nothing was switched", "running", from, "error", err)
		return &Result{Record: w.snapshot(), Machine: from}, err
	}
	s := &switchRun{from: from, to: to, toPlan: tp, ex: ex, w: w, started: started, prepared: time.Now()}
	return r.switchTo(ctx, s)
}

// switchTo stops the running machine, makes the new one active and
// verifies it.
func (r *run) switchTo(ctx context.Context, s *switchRun) (*Result, error) {
	st, log := r.st, r.log
	u := st.Upgrade
	u.Phase = state.UpgradeSwitching
	if err := r.s.WriteMachines(st); err != nil {
		return nil, err
	}
	r.checkpoint("switch:switching")
	// From here until the node runs again, the first-boot unit finishes
	// an interrupted switch at boot.
	if err := r.s.RemoveStamp(); err != nil {
		return nil, err
	}
	r.checkpoint("switch:stamp-removed")
	log.Info("upgrade: stopping the running machine", "machine", s.from, "timeout", r.opts.Upgrade.StopTimeout)
	if err := r.stopMachine(ctx, s.from); err != nil {
		// The old machine may still run: the new one must not start.
		// Back to a prepared upgrade, with the node where it was.
		u.Phase = state.UpgradePreparing
		_ = r.s.WriteMachines(st)
		// The old machine runs the node as before: the first boot has
		// nothing to finish.
		_ = r.s.WriteStamp(st.Applied[s.from].PlanDigest)
		_ = s.w.finish(false)
		return &Result{Record: s.w.snapshot(), Machine: s.from}, fmt.Errorf("upgrade: stop machine %s: %w; nothing was switched", s.from, err)
	}
	r.checkpoint("switch:stopped")
	switched := time.Now().UTC()
	u.Switched = &switched
	s.w.upgrade(func(ru *state.RecordUpgrade) { ru.SwitchedMS = s.w.since(switched) })
	// Both boot links exist while the active file changes, so a boot at
	// any instant starts the active machine, and only it.
	if err := r.ensureEnableLink(s.to, s.toPlan); err != nil {
		return nil, err
	}
	r.checkpoint("switch:new-linked")
	// One rename decides which machine may start, at boot too.
	if err := r.s.WriteActiveFile(s.to); err != nil {
		return nil, err
	}
	r.checkpoint("switch:active-file")
	st.Active = s.to
	u.Phase = state.UpgradeVerifying
	if err := r.s.WriteMachines(st); err != nil {
		return nil, err
	}
	r.checkpoint("switch:verifying")
	return r.verify(ctx, s)
}

// verify starts the new machine and waits for the node to run in it; a
// failure rolls back.
func (r *run) verify(ctx context.Context, s *switchRun) (*Result, error) {
	u := r.st.Upgrade
	timeout := r.opts.Upgrade.ReadyTimeout
	log := r.log
	if err := r.removeEnableLink(s.from); err != nil {
		return nil, err
	}
	r.checkpoint("verify:old-unlinked")
	log.Info("upgrade: starting the new machine and waiting for the node", "machine", s.to, "timeout", timeout)
	vctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	s.ex.restartLimit = r.opts.Upgrade.RestartLimit
	err := s.ex.run(vctx, plan.PhaseStart)
	if err == nil {
		since := time.Now()
		if u.Switched != nil {
			since = *u.Switched
		}
		err = r.nodeReady(vctx, s.toPlan, since)
	}
	if err != nil && ctx.Err() != nil {
		// Interrupted (SIGTERM): the next run finishes the switch.
		return &Result{Record: s.w.snapshot(), Machine: s.to}, err
	}
	if err != nil {
		return r.rollback(ctx, s, err)
	}
	r.checkpoint("verify:ready")
	return r.switched(s)
}

// switched records a switch that worked.
func (r *run) switched(s *switchRun) (*Result, error) {
	st, host := r.st, r.host
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
	if err := r.s.WriteMachines(st); err != nil {
		return nil, err
	}
	r.checkpoint("switched:state")
	s.w.upgrade(func(ru *state.RecordUpgrade) { ru.Outcome, ru.ReadyMS = outcome, s.w.since(now) })
	if err := s.w.finish(true); err != nil {
		return nil, err
	}
	if err := r.s.WriteStamp(a.PlanDigest); err != nil {
		return nil, fmt.Errorf("apply: write done stamp: %w", err)
	}
	// Layers only the machine cleared for this upgrade used go now; the
	// previous machine's stay for a rollback. A failure here costs disk
	// space, not the upgrade: the next switch collects them.
	if gone, err := collectLayers(host, r.log); err != nil {
		r.log.Warn("upgrade: layer store not collected", "error", err)
	} else if len(gone) > 0 {
		r.log.Info("upgrade: layers no machine uses removed from the layer store", "layers", len(gone))
	}
	r.checkpoint("switched:collected")
	r.log.Info("upgrade: the node runs on the new machine", "machine", s.to, "node", s.toPlan.NodeName, "previous", s.from,
		"prepare", time.Duration(last.PrepareMS)*time.Millisecond, "switch", time.Duration(last.SwitchMS)*time.Millisecond)
	return &Result{Record: s.w.snapshot(), Machine: s.to, Upgrade: last}, nil
}

// rollback stops the new machine and runs the node on the old one again.
func (r *run) rollback(ctx context.Context, s *switchRun, reason error) (*Result, error) {
	st, log := r.st, r.log
	u := st.Upgrade
	u.Phase, u.Reason = state.UpgradeRollingBack, reason.Error()
	if err := r.s.WriteMachines(st); err != nil {
		return nil, err
	}
	r.checkpoint("rollback:rolling-back")
	log.Error("upgrade: the new machine did not run the node; rolling back", "machine", s.to, "back to", s.from, "reason", reason)
	begun := time.Now().UTC()
	err := r.runOn(ctx, s.to, s.from, begun)
	now := time.Now().UTC()
	last := &state.UpgradeOutcome{From: s.from, To: s.to, Reason: reason.Error(), Started: s.started, Ended: now, RollbackMS: now.Sub(begun).Milliseconds()}
	if !s.prepared.IsZero() {
		last.PrepareMS = s.prepared.Sub(s.started).Milliseconds()
	}
	if err != nil {
		// The rollback is retried by the next run (and at boot).
		last.Outcome = state.OutcomeRollbackFailed
		st.Last = last
		_ = r.s.WriteMachines(st)
		s.w.upgrade(func(ru *state.RecordUpgrade) { ru.Outcome, ru.Reason = last.Outcome, last.Reason })
		_ = s.w.finish(false)
		log.Error("upgrade: the rollback failed too", "machine", s.from, "error", err)
		return &Result{Record: s.w.snapshot(), Machine: st.Active, Upgrade: last}, &UpgradeError{From: s.from, To: s.to, Reason: reason, RollbackErr: err}
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
	if err := r.s.WriteMachines(st); err != nil {
		return nil, err
	}
	r.checkpoint("rollback:state")
	if err := r.s.WriteStamp(st.Applied[s.from].PlanDigest); err != nil {
		return nil, fmt.Errorf("apply: write done stamp: %w", err)
	}
	s.w.upgrade(func(ru *state.RecordUpgrade) {
		ru.Outcome, ru.Reason, ru.RolledBackMS = last.Outcome, last.Reason, s.w.since(now)
	})
	_ = s.w.finish(false)
	log.Info("upgrade: rolled back; the node runs on the old machine", "machine", s.from, "rollback", time.Duration(last.RollbackMS)*time.Millisecond)
	return &Result{Record: s.w.snapshot(), Machine: s.from, Upgrade: last}, &UpgradeError{From: s.from, To: s.to, RolledBack: true, Reason: reason}
}

// runOn stops machine off and runs the node on machine on again: active
// file, boot link, start, units, Node Ready (since).
func (r *run) runOn(ctx context.Context, off, on string, since time.Time) error {
	sd := r.opts.Deps.Systemd
	if err := r.stopMachine(ctx, off); err != nil {
		return fmt.Errorf("stop machine %s: %w", off, err)
	}
	r.checkpoint("runon:stopped")
	onPlan, err := r.s.PlanOf(on)
	if err != nil {
		return err
	}
	if err := r.ensureEnableLink(on, onPlan); err != nil {
		return err
	}
	r.checkpoint("runon:linked")
	if err := r.s.WriteActiveFile(on); err != nil {
		return err
	}
	r.checkpoint("runon:active-file")
	r.st.Active = on
	if err := r.s.WriteMachines(r.st); err != nil {
		return err
	}
	if err := r.removeEnableLink(off); err != nil {
		return err
	}
	r.checkpoint("runon:unlinked")
	ctx, cancel := context.WithTimeout(ctx, r.opts.Upgrade.ReadyTimeout)
	defer cancel()
	if err := sd.DaemonReload(ctx); err != nil {
		return err
	}
	unit := nspawnUnit(on)
	if _, err := sd.Start(ctx, unit); err != nil {
		return fmt.Errorf("start %s: %w", unit, err)
	}
	r.checkpoint("runon:started")
	w := waitOf(onPlan, on)
	if err := waitMachine(ctx, sd, w, r.opts.PollInterval, 0); err != nil {
		return err
	}
	if onPlan == nil {
		return nil
	}
	return r.nodeReady(ctx, onPlan, since)
}

// checkpoint marks a point between two changes of the switch; tests kill
// the process there.
func (r *run) checkpoint(label string) {
	if r.opts.checkpoint != nil {
		r.opts.checkpoint(label)
	}
}

// nodeReady waits for the Node to be Ready through Options.Upgrade.NodeReady,
// failing early when containerd or kubelet in the machine keep restarting.
func (r *run) nodeReady(ctx context.Context, p *plan.Plan, since time.Time) error {
	check := r.opts.Upgrade.NodeReady
	if check == nil {
		r.log.Warn("no Node check configured: the switch is verified by the machine's units alone", "machine", p.Machine)
		return nil
	}
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	go func() {
		if err := watchRestarts(ctx, r.opts.Deps.Systemd, p.Machine, []string{"containerd.service", "kubelet.service"}, r.opts.Upgrade.RestartLimit, r.opts.PollInterval); err != nil {
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
// terminating it when that is not enough.
func (r *run) stopMachine(ctx context.Context, m string) error {
	return machine.Stop(ctx, r.opts.Deps.Systemd, r.log, m, r.opts.Upgrade.StopTimeout, r.opts.PollInterval)
}

func nspawnUnit(m string) string { return "systemd-nspawn@" + m + ".service" }

func (r *run) removeEnableLink(m string) error {
	p := render.EnableLink(m)
	if err := r.host.Remove(p); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("disable machine %s at boot: %w", m, err)
	}
	return nil
}

func (r *run) ensureEnableLink(m string, p *plan.Plan) error {
	target := render.NspawnTemplate
	if p != nil {
		for _, s := range p.Steps {
			if s.Link != nil && s.Link.Path == render.EnableLink(m) {
				target = s.Link.Target
			}
		}
	}
	if cur, err := r.host.Readlink(render.EnableLink(m)); err == nil && cur == target {
		return nil
	}
	if err := r.host.MkdirParents(path.Dir(render.EnableLink(m))); err != nil {
		return err
	}
	if err := r.host.Symlink(target, render.EnableLink(m), -1, -1); err != nil {
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
	return &plan.Wait{Machine: m, Units: []string{"containerd.service", "kubelet.service"}}
}

// clearMachine removes what an earlier upgrade left of machine m (the
// previous machine, or a half-made one) so it can be prepared afresh. A
// rootfs nodespawn knows nothing about is refused, never removed.
func (r *run) clearMachine(ctx context.Context, m string) error {
	st, host := r.st, r.host
	if m == st.Active {
		return fmt.Errorf("upgrade: refusing to clear machine %s: it runs the node", m)
	}
	p, err := r.s.PlanOf(m)
	if err != nil {
		return err
	}
	_, applied := st.Applied[m]
	known := p != nil || applied || st.Previous == m
	rootfs := path.Join(machinesDir, m)
	if _, err := host.Lstat(rootfs); err == nil && !known {
		return &MachineExistsError{Machine: m, Rootfs: host.Show(rootfs), Running: st.Active}
	}
	if !known {
		return nil
	}
	r.log.Info("upgrade: removing what is left of the other machine", "machine", m, "previous", st.Previous == m)
	active, err := r.s.PlanOf(st.Active)
	if err != nil {
		return err
	}
	if err := machine.Remove(ctx, host, r.opts.Deps.Systemd, m, p, machine.RemoveOptions{
		StopTimeout: r.opts.Upgrade.StopTimeout, RemoveTimeout: machine.DefaultRemoveTimeout, Poll: r.opts.PollInterval, Log: r.log,
		// What the running machine's plan wrote stays, shared or not.
		Keep: machine.SystemdFiles(st.Active, active),
	}); err != nil {
		return err
	}
	if err := host.RemoveAll(plan.MachineStateDir(m)); err != nil {
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

func phaseSteps(p *plan.Plan, ph plan.Phase) []*plan.Step {
	var out []*plan.Step
	for i := range p.Steps {
		if p.Steps[i].Phase == ph {
			out = append(out, &p.Steps[i])
		}
	}
	return out
}

// resumeSwitch finishes a switch a killed run left half-done: it stops the
// old machine and verifies the new one, or finishes the rollback.
func (r *run) resumeSwitch(ctx context.Context) (*state.UpgradeOutcome, error) {
	st, host, opts := r.st, r.host, r.opts
	u := st.Upgrade
	if opts.Deps.Systemd == nil {
		return nil, fmt.Errorf("apply: an upgrade from %s to %s was interrupted while %s; finishing it needs the running host's systemd (root %s)", u.From, u.To, u.Phase, opts.Root)
	}
	tp, err := r.s.PlanOf(u.To)
	if err != nil {
		return nil, err
	}
	r.log.Warn("finishing an upgrade a killed run left half-done", "from", u.From, "to", u.To, "phase", u.Phase)
	if tp == nil {
		// Nothing to verify against: go back to the machine that ran.
		tp = &plan.Plan{Version: plan.Version, Machine: u.To}
		if u.Phase != state.UpgradeRollingBack {
			u.Phase, u.Reason = state.UpgradeRollingBack, "the plan of "+u.To+" is missing"
		}
	}
	rec := newRecord(tp, opts, st.Applied[u.To].PlanDigest)
	rec.ManifestDigest, rec.SourceDigest = st.Applied[u.To].ManifestDigest, st.Applied[u.To].SourceDigest
	rec.Upgrade = &state.RecordUpgrade{From: u.From, To: u.To}
	for i := range rec.Steps {
		if rec.Steps[i].Phase != plan.PhaseStart {
			rec.Steps[i].Outcome, rec.Steps[i].Error = state.OutcomeSkipped, "done by the run that was interrupted"
		}
	}
	w := &recordWriter{store: r.s, rec: rec, warn: opts.Warnings}
	if err := w.save(); err != nil {
		return nil, err
	}
	ex := &executor{plan: tp, opts: opts, log: r.log, rec: w, host: host, machineStarted: true}
	s := &switchRun{from: u.From, to: u.To, toPlan: tp, ex: ex, w: w, started: u.Started}
	var res *Result
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
func Resume(ctx context.Context, opts Options) (*state.UpgradeOutcome, error) {
	opts = withDefaults(opts)
	r, err := begin(ctx, opts)
	if err != nil {
		return nil, err
	}
	defer r.end()
	if u := r.st.Upgrade; u == nil || u.Phase == state.UpgradePreparing {
		return nil, nil
	}
	return r.resumeSwitch(ctx)
}

// Rollback switches the node back to the previous machine (the one the
// last upgrade switched away from), verified like an upgrade and undone
// the same way when the previous machine does not run the node.
func Rollback(ctx context.Context, opts Options) (*Result, error) {
	opts = withDefaults(opts)
	if opts.Deps.Systemd == nil {
		return nil, errors.New("rollback: needs the running host's systemd")
	}
	r, err := begin(ctx, opts)
	if err != nil {
		return nil, err
	}
	defer r.end()
	st := r.st
	if err := st.RollbackProblem(); err != nil {
		return nil, err
	}
	prev, err := r.s.PlanOf(st.Previous)
	if err != nil {
		return nil, err
	}
	a, ok := st.Applied[st.Previous]
	if prev == nil || !ok {
		return nil, &state.NoRollbackError{Why: "the plan of previous machine " + st.Previous + " is missing"}
	}
	if _, err := r.host.Lstat(prev.Rootfs); err != nil {
		return nil, &state.NoRollbackError{Why: fmt.Sprintf("the rootfs of previous machine %s is gone: %v", st.Previous, err)}
	}
	now := time.Now().UTC()
	st.Upgrade = &state.Upgrade{From: st.Active, To: st.Previous, Phase: state.UpgradeSwitching, ManifestDigest: a.ManifestDigest, Started: now}
	if err := r.s.WriteMachines(st); err != nil {
		return nil, err
	}
	o := opts
	o.ManifestDigest, o.SourceDigest = a.ManifestDigest, a.SourceDigest
	o.Source = "" // the previous manifest's, not known here
	rec := newRecord(prev, o, a.PlanDigest)
	rec.Upgrade = &state.RecordUpgrade{From: st.Active, To: st.Previous}
	for i := range rec.Steps {
		if rec.Steps[i].Phase != plan.PhaseStart {
			rec.Steps[i].Outcome, rec.Steps[i].Error = state.OutcomeSkipped, "made by an earlier run"
		}
	}
	w := &recordWriter{store: r.s, rec: rec, warn: o.Warnings}
	if err := w.save(); err != nil {
		return nil, err
	}
	ex := &executor{plan: prev, opts: opts, log: r.log, rec: w, host: r.host, machineStarted: true}
	r.log.Info("rollback: switching the node back to the previous machine", "from", st.Active, "to", st.Previous)
	return r.switchTo(ctx, &switchRun{from: st.Active, to: st.Previous, toPlan: prev, ex: ex, w: w, started: now, manual: true})
}
