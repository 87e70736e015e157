// Package agent is `nodespawn agent`: the node's side of a fleet rollout.
// It runs as a systemd service on the host, outside the machines it
// switches, so it lives through a switch and can report a rollback when
// the new kubelet never comes up.
//
// It watches the node's own NodeSpawnNode (named after the node), which
// the rollout controller writes: the config the node should run
// (spec.configName, spec.configDigest), the permission to prepare it
// (spec.prepare) and the permission to switch to it (spec.switch, one
// grant per spec.switchID). It fetches the NodeSpawnConfig, refuses one
// whose manifest does not hash to the digest, and drives the node through
// the same code as `nodespawn apply`: Prepare (the other machine made
// beside the running one; nothing is disrupted), Switch (switch, verify
// the Node, roll back when it does not come back) or, when the desired
// config is the kept previous machine's, Rollback. It acts on a switch
// grant at most once: the grant's ID is written to the node's state
// before the switch starts, so a restart (a crash, a power cut) never
// switches twice. Every phase is reported in the status, with the
// digests of the active, prepared and previous machines, conditions, the
// last error, timings, a heartbeat and the agent's version; the Node is
// labelled with its active config's digest.
//
// The agent's two sides are interfaces: API (the API server; HTTPAPI is
// the project's HTTP transport) and Node (the host; package agent/host is
// the real one, through package provision).
package agent

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"time"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/nodespawn/nodespawn/api/v1alpha1"
	"github.com/nodespawn/nodespawn/manifest"
	"github.com/nodespawn/nodespawn/state"
)

// Node is the host side: the node's state and the operations on it.
type Node interface {
	// Status is the node as its state says it is now.
	Status(ctx context.Context) (*NodeStatus, error)
	// Resume finishes a switch a killed run left half-done (as apply
	// does); nothing when there is none.
	Resume(ctx context.Context) error
	// Prepare makes the machine of config m (a fleet config, verified,
	// whose digest is digest) beside the running one.
	Prepare(ctx context.Context, m *manifest.Manifest, digest string) error
	// Switch switches to the machine prepared from digest, verifies it
	// and rolls back when the Node does not come back (then the error is
	// a RolledBack one).
	Switch(ctx context.Context, digest string) error
	// Rollback switches back to the kept previous machine.
	Rollback(ctx context.Context) error
	// Agent and WriteAgent keep the agent's own state (state.Agent).
	Agent() (*state.Agent, error)
	WriteAgent(*state.Agent) error
}

// NodeStatus is the node as its state says it is.
type NodeStatus struct {
	// NodeName is the Kubernetes node's name.
	NodeName string
	// ActiveMachine runs the node; ActiveDigest is the config digest
	// (manifest.ConfigDigest) of its manifest.
	ActiveMachine, ActiveDigest string
	// PreparedDigest is the config of the machine prepared beside it
	// (a finished preparation only).
	PreparedDigest string
	// PreviousDigest is the config of the kept previous machine.
	PreviousDigest string
	// Switching is a switch in progress (a killed run's, not finished).
	Switching bool
	// Verifying: the switch has made the new machine active and waits
	// for it to start and its Node to turn Ready.
	Verifying bool
	// Last is how the last upgrade or rollback ended.
	Last *state.UpgradeOutcome
}

// RolledBack is an error of Switch or Rollback after which the node runs
// on the machine it ran on before.
type RolledBack interface{ RolledBackTo() string }

// Condition types the agent reports.
const (
	// ConditionReady: the node runs its active machine, verified (after
	// a switch: the Node came back Ready with the new machine).
	ConditionReady = "Ready"
	// ConditionConfigVerified: the desired config was fetched, parses,
	// holds no secret and hashes to its digest.
	ConditionConfigVerified = "ConfigVerified"
)

// Agent is one node's agent.
type Agent struct {
	API  API
	Node Node
	// Name is the node's (and its NodeSpawnNode's) name.
	Name    string
	Version string
	Log     *slog.Logger
	// Heartbeat is how often the status is renewed with nothing to do
	// (default 30s).
	Heartbeat time.Duration
	// RetryMin and RetryMax bound the backoff after a failed request or
	// a failed prepare (defaults 1s and 5m).
	RetryMin, RetryMax time.Duration
	// VerifyPoll is how often the node's state is read during a switch,
	// to report Verifying once the new machine is active (default 2s).
	VerifyPoll time.Duration
	// Now is the clock (tests).
	Now func() time.Time

	st          *state.Agent
	lastPhase   v1alpha1.NodePhase // the phase last written to the status
	lastLabel   string
	lastStatus  *v1alpha1.NodeSpawnNodeStatus
	failedAt    map[string]time.Time // prepare failures by digest
	failedDelay map[string]time.Duration
}

func (a *Agent) defaults() {
	if a.Log == nil {
		a.Log = slog.Default()
	}
	if a.Heartbeat <= 0 {
		a.Heartbeat = 30 * time.Second
	}
	if a.RetryMin <= 0 {
		a.RetryMin = time.Second
	}
	if a.RetryMax <= 0 {
		a.RetryMax = 5 * time.Minute
	}
	if a.VerifyPoll <= 0 {
		a.VerifyPoll = 2 * time.Second
	}
	if a.Now == nil {
		a.Now = time.Now
	}
	if a.failedAt == nil {
		a.failedAt, a.failedDelay = map[string]time.Time{}, map[string]time.Duration{}
	}
}

// Run is the agent until ctx ends: it finishes a switch a killed run left
// half-done, reports the node as its state says, and then acts on every
// change of its NodeSpawnNode and renews the heartbeat. Unreachable API
// servers are retried with backoff; Run returns only ctx's error or a
// broken node state.
func (a *Agent) Run(ctx context.Context) error {
	a.defaults()
	if err := a.start(ctx); err != nil {
		return err
	}
	wake := make(chan struct{}, 1)
	go a.watch(ctx, wake)
	delay := time.Duration(0)
	first := true
	for {
		wait := a.Heartbeat
		if delay > 0 {
			wait = delay
		}
		if first {
			wait, first = 0, false
		}
		t := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			return ctx.Err()
		case <-wake:
		case <-t.C:
		}
		t.Stop()
		if err := a.Step(ctx); err != nil {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			delay = a.backoff(delay)
			a.Log.Warn("agent: the API server did not answer; retrying", "in", delay, "error", err)
			continue
		}
		delay = 0
	}
}

// start finishes a switch a killed run left, and settles what the agent
// state says was in flight by what the node's state says happened.
func (a *Agent) start(ctx context.Context) error {
	a.defaults()
	st, err := a.Node.Agent()
	if err != nil {
		return err
	}
	a.st = st
	if err := a.Node.Resume(ctx); err != nil {
		a.Log.Error("agent: finishing the interrupted switch failed", "error", err)
		a.st.LastError = err.Error()
	}
	ns, err := a.Node.Status(ctx)
	if err != nil {
		return err
	}
	switch v1alpha1.NodePhase(a.st.Phase) {
	case v1alpha1.PhaseSwitching, v1alpha1.PhaseVerifying:
		// The agent stopped during a switch (the switch may have
		// restarted it): the node's state says how it ended.
		a.settleSwitch(ns, nil)
	case v1alpha1.PhasePreparing:
		a.st.Phase = string(v1alpha1.PhaseIdle)
		if ns.PreparedDigest != "" {
			a.st.Phase = string(v1alpha1.PhasePrepared)
		}
	}
	return a.Node.WriteAgent(a.st)
}

// settleSwitch records how the switch to a.st.SwitchDigest ended, from
// the node's state and the switch's error.
func (a *Agent) settleSwitch(ns *NodeStatus, err error) {
	now := a.Now().UTC()
	a.st.SwitchFinished = &now
	var rb RolledBack
	switch {
	case err == nil && ns.ActiveDigest == a.st.SwitchDigest && !ns.Switching:
		a.st.Phase, a.st.LastError = string(v1alpha1.PhaseReady), ""
	case errors.As(err, &rb) || (err == nil && ns.Last != nil && ns.Last.Outcome == state.OutcomeRolledBack):
		a.st.Phase = string(v1alpha1.PhaseRolledBack)
		switch {
		case err != nil:
			a.st.LastError = err.Error()
		case ns.Last.Reason != "":
			a.st.LastError = "rolled back: " + ns.Last.Reason
		}
	default:
		a.st.Phase = string(v1alpha1.PhaseFailed)
		if err != nil {
			a.st.LastError = err.Error()
		} else if a.st.LastError == "" {
			a.st.LastError = fmt.Sprintf("the switch to %s did not finish: machine %s runs config %s", a.st.SwitchDigest, ns.ActiveMachine, ns.ActiveDigest)
		}
	}
}

// watch signals wake on every event of the NodeSpawnNode, re-watching
// with backoff when the watch ends or cannot start.
func (a *Agent) watch(ctx context.Context, wake chan<- struct{}) {
	delay := time.Duration(0)
	for ctx.Err() == nil {
		w, err := a.API.WatchNode(ctx, a.Name, "")
		if err != nil {
			delay = a.backoff(delay)
			a.Log.Debug("agent: watch failed; retrying", "in", delay, "error", err)
			sleep(ctx, delay)
			continue
		}
		delay = 0
		for range w.ResultChan() {
			select {
			case wake <- struct{}{}:
			default:
			}
		}
		w.Stop()
		sleep(ctx, a.RetryMin)
	}
}

func sleep(ctx context.Context, d time.Duration) {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
	case <-t.C:
	}
}

func (a *Agent) backoff(d time.Duration) time.Duration {
	if d <= 0 {
		return a.RetryMin
	}
	return min(2*d, a.RetryMax)
}

// Step reads the NodeSpawnNode, acts on its spec, and reports the status.
// Its error is the API server's (the caller retries); what the node did
// is in the status.
func (a *Agent) Step(ctx context.Context) error {
	a.defaults()
	if a.st == nil {
		if err := a.start(ctx); err != nil {
			return err
		}
	}
	nsn, err := a.API.GetNode(ctx, a.Name)
	if apierrors.IsNotFound(err) {
		a.Log.Debug("agent: no NodeSpawnNode for this node yet; the controller makes it", "name", a.Name)
		return nil
	}
	if err != nil {
		return fmt.Errorf("get NodeSpawnNode %s: %w", a.Name, err)
	}
	ns, err := a.Node.Status(ctx)
	if err != nil {
		return err
	}
	var cfgCond *metav1.Condition
	ns, cfgCond, err = a.act(ctx, nsn, ns)
	if err != nil {
		return err
	}
	if err := a.report(ctx, nsn, ns, cfgCond); err != nil {
		return err
	}
	a.label(ctx)
	return nil
}

// act does what the spec asks that has not been done, and returns the
// node's status after it.
func (a *Agent) act(ctx context.Context, nsn *v1alpha1.NodeSpawnNode, ns *NodeStatus) (*NodeStatus, *metav1.Condition, error) {
	spec := nsn.Spec
	want := spec.ConfigDigest
	if want == "" || ns.Switching {
		return ns, nil, nil
	}
	granted := spec.Switch && spec.SwitchID != "" && spec.SwitchID != a.st.SwitchID
	if want == ns.ActiveDigest {
		if granted {
			// Nothing to switch: the grant is used up all the same.
			a.st.SwitchID, a.st.SwitchDigest = spec.SwitchID, want
			a.st.Phase, a.st.LastError = string(v1alpha1.PhaseReady), ""
			return ns, nil, a.Node.WriteAgent(a.st)
		}
		return ns, nil, nil
	}
	if !granted && a.st.SwitchDigest == want && (a.st.Phase == string(v1alpha1.PhaseRolledBack) || a.st.Phase == string(v1alpha1.PhaseFailed)) {
		// The last switch to this config failed: the node stays as it
		// is, reporting why, until a new grant (a new switchID).
		return ns, nil, nil
	}
	if granted && want == ns.PreviousDigest && want != ns.PreparedDigest {
		return a.switchTo(ctx, want, spec.SwitchID, true)
	}
	if ns.PreparedDigest != want && (spec.Prepare || granted) {
		cond, err := a.prepare(ctx, spec)
		if err != nil || cond.Status != metav1.ConditionTrue {
			return ns, cond, err
		}
		if ns, err = a.Node.Status(ctx); err != nil {
			return nil, cond, err
		}
		if ns.PreparedDigest != want || !granted {
			return ns, cond, nil
		}
		ns2, _, err := a.switchTo(ctx, want, spec.SwitchID, false)
		return ns2, cond, err
	}
	if granted && ns.PreparedDigest == want {
		return a.switchTo(ctx, want, spec.SwitchID, false)
	}
	return ns, nil, nil
}

// prepare fetches, verifies and prepares the config the spec names. The
// condition says whether the config was verified; a failed preparation is
// in the agent state (phase Failed, its error).
func (a *Agent) prepare(ctx context.Context, spec v1alpha1.NodeSpawnNodeSpec) (*metav1.Condition, error) {
	want := spec.ConfigDigest
	if at, ok := a.failedAt[want]; ok && a.Now().Before(at.Add(a.failedDelay[want])) {
		return &metav1.Condition{Type: ConditionConfigVerified, Status: metav1.ConditionTrue, Reason: "Verified"}, nil
	}
	cfg, err := a.API.GetConfig(ctx, spec.ConfigName)
	if apierrors.IsNotFound(err) {
		return a.refuse(want, "ConfigNotFound", fmt.Sprintf("NodeSpawnConfig %s does not exist", spec.ConfigName)), nil
	}
	if err != nil {
		return nil, fmt.Errorf("get NodeSpawnConfig %s: %w", spec.ConfigName, err)
	}
	m, reason, msg := verify(cfg, want)
	if m == nil {
		return a.refuse(want, reason, msg), nil
	}
	cond := &metav1.Condition{Type: ConditionConfigVerified, Status: metav1.ConditionTrue, Reason: "Verified",
		Message: fmt.Sprintf("NodeSpawnConfig %s hashes to %s", cfg.Name, want)}
	now := a.Now().UTC()
	a.st.Phase, a.st.LastError, a.st.PrepareStarted, a.st.PrepareFinished = string(v1alpha1.PhasePreparing), "", &now, nil
	if err := a.Node.WriteAgent(a.st); err != nil {
		return cond, err
	}
	// Say so before the pull, which may take long.
	_ = a.patch(ctx, a.status(nil, nil, cond), "")
	a.Log.Info("agent: preparing the config beside the running machine", "config", cfg.Name, "digest", want)
	perr := a.Node.Prepare(ctx, m, want)
	end := a.Now().UTC()
	a.st.PrepareFinished = &end
	if perr != nil {
		if ctx.Err() != nil {
			return cond, ctx.Err()
		}
		d := a.backoff(a.failedDelay[want])
		a.failedAt[want], a.failedDelay[want] = end, d
		a.st.Phase, a.st.LastError = string(v1alpha1.PhaseFailed), "prepare: "+perr.Error()
		a.Log.Error("agent: the preparation failed; retrying later", "digest", want, "in", d, "error", perr)
	} else {
		delete(a.failedAt, want)
		delete(a.failedDelay, want)
		a.st.Phase = string(v1alpha1.PhasePrepared)
		a.Log.Info("agent: prepared", "digest", want, "took", end.Sub(now).Round(time.Millisecond))
	}
	return cond, a.Node.WriteAgent(a.st)
}

// refuse records a config the agent will not prepare.
func (a *Agent) refuse(digest, reason, msg string) *metav1.Condition {
	a.Log.Error("agent: refusing the config", "digest", digest, "reason", reason, "error", msg)
	a.st.Phase, a.st.LastError = string(v1alpha1.PhaseFailed), msg
	_ = a.Node.WriteAgent(a.st)
	return &metav1.Condition{Type: ConditionConfigVerified, Status: metav1.ConditionFalse, Reason: reason, Message: msg}
}

// verify loads the config's manifest as a fleet config and checks it
// against want: the digest the spec names, the config's own, and the
// manifest's. It returns the manifest, or why not.
func verify(cfg *v1alpha1.NodeSpawnConfig, want string) (*manifest.Manifest, string, string) {
	if cfg.Spec.Digest != want {
		return nil, "DigestMismatch", fmt.Sprintf("NodeSpawnConfig %s has digest %s, and the node is to run %s", cfg.Name, cfg.Spec.Digest, want)
	}
	m, err := manifest.LoadConfig("NodeSpawnConfig "+cfg.Name, []byte(cfg.Spec.Manifest))
	if err != nil {
		return nil, "InvalidManifest", err.Error()
	}
	d, err := m.ConfigDigest()
	if err != nil {
		return nil, "InvalidManifest", err.Error()
	}
	if d.String() != want {
		return nil, "DigestMismatch", fmt.Sprintf("the manifest of NodeSpawnConfig %s hashes to %s, not to its digest %s: refusing it", cfg.Name, d, want)
	}
	return m, "", ""
}

// switchTo switches to the machine prepared from digest (or back to the
// previous machine), at most once for id.
func (a *Agent) switchTo(ctx context.Context, digest, id string, back bool) (*NodeStatus, *metav1.Condition, error) {
	now := a.Now().UTC()
	// The grant is used up before the switch starts: whatever happens
	// from here, it is never acted on again.
	a.st.SwitchID, a.st.SwitchDigest = id, digest
	a.st.Phase, a.st.LastError, a.st.SwitchStarted, a.st.SwitchFinished = string(v1alpha1.PhaseSwitching), "", &now, nil
	if err := a.Node.WriteAgent(a.st); err != nil {
		return nil, nil, err
	}
	_ = a.patch(ctx, a.status(nil, nil, nil), "")
	var err error
	stop := a.reportVerifying(ctx)
	if back {
		a.Log.Info("agent: switching back to the previous machine", "digest", digest, "switchID", id)
		err = a.Node.Rollback(ctx)
	} else {
		a.Log.Info("agent: switching to the prepared machine", "digest", digest, "switchID", id)
		err = a.Node.Switch(ctx, digest)
	}
	stop()
	if err != nil && ctx.Err() != nil {
		// Stopped mid-switch: the next start finishes it and settles.
		return nil, nil, ctx.Err()
	}
	ns, serr := a.Node.Status(ctx)
	if serr != nil {
		return nil, nil, serr
	}
	a.settleSwitch(ns, err)
	if err != nil {
		a.Log.Error("agent: the switch did not leave the node on the new machine", "phase", a.st.Phase, "error", err)
	} else {
		a.Log.Info("agent: the node runs the new machine, verified", "machine", ns.ActiveMachine, "digest", ns.ActiveDigest)
	}
	return ns, nil, a.Node.WriteAgent(a.st)
}

// reportVerifying reports phase Verifying, once, when the node's state
// says the switch under way has made the new machine active and waits for
// it to start and its Node to turn Ready: Switch and Rollback are one call
// each, and the state is where they record how far they got. It runs
// beside that call, which leaves a.st to it until the returned func has
// stopped it.
func (a *Agent) reportVerifying(ctx context.Context) (stop func()) {
	ctx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() {
		defer close(done)
		t := time.NewTicker(a.VerifyPoll)
		defer t.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-t.C:
			}
			ns, err := a.Node.Status(ctx)
			if err != nil || !ns.Verifying {
				continue
			}
			a.st.Phase = string(v1alpha1.PhaseVerifying)
			if err := a.Node.WriteAgent(a.st); err != nil {
				a.Log.Warn("agent: could not record the phase in the node's state", "phase", a.st.Phase, "error", err)
			}
			if err := a.patch(ctx, a.status(nil, ns, nil), ""); err != nil && ctx.Err() == nil {
				a.Log.Warn("agent: could not report the phase", "phase", a.st.Phase, "error", err)
			}
			return
		}
	}()
	return func() { cancel(); <-done }
}

// report patches the status with what the node's state says.
func (a *Agent) report(ctx context.Context, nsn *v1alpha1.NodeSpawnNode, ns *NodeStatus, cfgCond *metav1.Condition) error {
	st := a.status(nsn, ns, cfgCond)
	var before v1alpha1.NodePhase
	if nsn != nil {
		before = nsn.Status.Phase
	}
	if err := a.patch(ctx, st, before); err != nil {
		return fmt.Errorf("report the status of NodeSpawnNode %s: %w", a.Name, err)
	}
	a.lastStatus = st
	return nil
}

// patch writes st to the NodeSpawnNode's status and, when its phase is
// not the one last written (by this agent, or before it started: before),
// records the transition in an Event on the Node. An Event that cannot be
// written is logged; the status is what the controller reads.
func (a *Agent) patch(ctx context.Context, st *v1alpha1.NodeSpawnNodeStatus, before v1alpha1.NodePhase) error {
	if err := a.API.PatchStatus(ctx, a.Name, st); err != nil {
		return err
	}
	prev := a.lastPhase
	if prev == "" {
		prev = before
	}
	a.lastPhase = st.Phase
	if st.Phase == prev || (prev == "" && st.Phase == v1alpha1.PhaseIdle) {
		return nil
	}
	typ, msg := phaseEvent(st)
	if err := a.API.Event(ctx, a.Name, typ, string(st.Phase), msg); err != nil {
		a.Log.Warn("agent: could not record the phase in an Event on the Node", "node", a.Name, "phase", st.Phase, "error", err)
	}
	return nil
}

// phaseEvent is the Event type and message of a transition to st.Phase.
func phaseEvent(st *v1alpha1.NodeSpawnNodeStatus) (string, string) {
	switch st.Phase {
	case v1alpha1.PhasePreparing:
		return "Normal", "preparing the desired config's machine beside " + st.ActiveMachine
	case v1alpha1.PhasePrepared:
		return "Normal", "prepared " + st.PreparedDigest + " beside " + st.ActiveMachine
	case v1alpha1.PhaseSwitching:
		return "Normal", "switching machines for grant " + st.SwitchID
	case v1alpha1.PhaseVerifying:
		return "Normal", "machine " + st.ActiveMachine + " is active; waiting for it to start and the Node to turn Ready (grant " + st.SwitchID + ")"
	case v1alpha1.PhaseReady:
		return "Normal", "machine " + st.ActiveMachine + " runs " + st.ActiveDigest + ", verified Ready after the switch"
	case v1alpha1.PhaseRolledBack:
		return "Warning", "rolled back to machine " + st.ActiveMachine + ": " + st.LastError
	case v1alpha1.PhaseFailed:
		return "Warning", st.LastError
	default:
		return "Normal", "machine " + st.ActiveMachine + " runs " + st.ActiveDigest
	}
}

// status is the status to report: ns's digests and machine, the agent's
// phase, error and timings, the conditions. nsn or ns nil keep the last
// reported ones.
func (a *Agent) status(nsn *v1alpha1.NodeSpawnNode, ns *NodeStatus, cfgCond *metav1.Condition) *v1alpha1.NodeSpawnNodeStatus {
	now := metav1.NewTime(a.Now().UTC().Truncate(time.Second))
	st := &v1alpha1.NodeSpawnNodeStatus{}
	if a.lastStatus != nil {
		st = a.lastStatus.DeepCopy()
	}
	if nsn != nil {
		st.ObservedGeneration = nsn.Generation
	}
	if ns != nil {
		st.ActiveDigest, st.ActiveMachine, st.PreparedDigest, st.PreviousDigest = ns.ActiveDigest, ns.ActiveMachine, ns.PreparedDigest, ns.PreviousDigest
	}
	st.Phase = v1alpha1.NodePhase(a.st.Phase)
	if st.Phase == "" {
		st.Phase = v1alpha1.PhaseIdle
		if st.PreparedDigest != "" {
			st.Phase = v1alpha1.PhasePrepared
		}
	}
	st.SwitchID, st.LastError = a.st.SwitchID, a.st.LastError
	st.PrepareStarted, st.PrepareFinished = metaTime(a.st.PrepareStarted), metaTime(a.st.PrepareFinished)
	st.SwitchStarted, st.SwitchFinished = metaTime(a.st.SwitchStarted), metaTime(a.st.SwitchFinished)
	st.Heartbeat, st.AgentVersion = &now, a.Version
	if cfgCond != nil {
		cfgCond.ObservedGeneration = st.ObservedGeneration
		meta.SetStatusCondition(&st.Conditions, *cfgCond)
	}
	ready := metav1.Condition{Type: ConditionReady, ObservedGeneration: st.ObservedGeneration}
	switch {
	case ns != nil && ns.Switching, st.Phase == v1alpha1.PhaseSwitching || st.Phase == v1alpha1.PhaseVerifying:
		ready.Status, ready.Reason, ready.Message = metav1.ConditionFalse, "Switching", "the node is switching machines"
	case st.ActiveMachine == "":
		ready.Status, ready.Reason, ready.Message = metav1.ConditionFalse, "NoMachine", "no machine runs the node"
	case st.Phase == v1alpha1.PhaseReady:
		ready.Status, ready.Reason, ready.Message = metav1.ConditionTrue, "Verified", fmt.Sprintf("machine %s runs the node, verified Ready after the switch", st.ActiveMachine)
	case st.Phase == v1alpha1.PhaseRolledBack:
		ready.Status, ready.Reason, ready.Message = metav1.ConditionFalse, "RolledBack", st.LastError
	default:
		ready.Status, ready.Reason, ready.Message = metav1.ConditionTrue, "Running", fmt.Sprintf("machine %s runs the node", st.ActiveMachine)
	}
	meta.SetStatusCondition(&st.Conditions, ready)
	return st
}

func metaTime(t *time.Time) *metav1.Time {
	if t == nil {
		return nil
	}
	m := metav1.NewTime(t.UTC().Truncate(time.Second))
	return &m
}

// label sets the Node's config-digest label to the active config's. A
// failure is logged, not returned: the status is what matters.
func (a *Agent) label(ctx context.Context) {
	if a.lastStatus == nil || a.lastStatus.ActiveDigest == "" {
		return
	}
	v := v1alpha1.DigestLabelValue(a.lastStatus.ActiveDigest)
	if v == a.lastLabel {
		return
	}
	if err := a.API.LabelNode(ctx, a.Name, v1alpha1.LabelConfigDigest, v); err != nil {
		a.Log.Warn("agent: could not label the Node with its config digest", "node", a.Name, "label", v1alpha1.LabelConfigDigest, "error", err)
		return
	}
	a.lastLabel = v
}
