package controller_test

// fakeAgent mirrors package agent's Agent (agent/agent.go: start, Step,
// act, prepare, switchTo, settleSwitch, status, label) closely enough that
// the controller sees what a real agent writes, phase by phase, through the
// admin client instead of the node's credentials (the fixture's comment
// says why package agent cannot be linked here). Where it differs: it polls
// its NodeSpawnNode every 100ms instead of watching, and after a switch
// whose new machine came up it reports Verifying once before Ready (the
// real agent goes from Switching to Ready; the controller must take both).

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/equality"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/controller-runtime/pkg/client"

	v1alpha1 "github.com/nodespawn/nodespawn/api/v1alpha1"
	"github.com/nodespawn/nodespawn/manifest"
	"github.com/nodespawn/nodespawn/state"
)

// nodeStatus is package agent's NodeStatus: the node as its state says.
type nodeStatus struct {
	NodeName                    string
	ActiveMachine, ActiveDigest string
	PreparedDigest              string
	PreviousDigest              string
	Switching                   bool
	Last                        *state.UpgradeOutcome
}

type fakeAgent struct {
	c    client.Client
	node *host
	name string
	log  *slog.Logger

	st         *state.Agent
	lastStatus *v1alpha1.NodeSpawnNodeStatus
	reportedAt time.Time
	lastLabel  string
}

const heartbeat = time.Second

func (a *fakeAgent) run(ctx context.Context) error {
	if err := a.start(ctx); err != nil {
		return err
	}
	for ctx.Err() == nil {
		if err := a.step(ctx); err != nil && ctx.Err() == nil {
			a.log.Warn("fake agent: step", "error", err)
		}
		sleep(ctx, 100*time.Millisecond)
	}
	return ctx.Err()
}

// start: agent.start (finish a switch a killed run left, settle).
func (a *fakeAgent) start(ctx context.Context) error {
	st, err := a.node.Agent()
	if err != nil {
		return err
	}
	a.st = st
	if err := a.node.Resume(ctx); err != nil {
		a.st.LastError = err.Error()
	}
	ns, err := a.node.Status(ctx)
	if err != nil {
		return err
	}
	switch v1alpha1.NodePhase(a.st.Phase) {
	case v1alpha1.PhaseSwitching, v1alpha1.PhaseVerifying:
		a.settleSwitch(ns, nil)
	case v1alpha1.PhasePreparing:
		a.st.Phase = string(v1alpha1.PhaseIdle)
		if ns.PreparedDigest != "" {
			a.st.Phase = string(v1alpha1.PhasePrepared)
		}
	}
	return a.node.WriteAgent(a.st)
}

func (a *fakeAgent) settleSwitch(ns *nodeStatus, err error) {
	now := time.Now().UTC()
	a.st.SwitchFinished = &now
	var rb rolledBack
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

// step: agent.Step.
func (a *fakeAgent) step(ctx context.Context) error {
	var nsn v1alpha1.NodeSpawnNode
	if err := a.c.Get(ctx, client.ObjectKey{Name: a.name}, &nsn); err != nil {
		if apierrors.IsNotFound(err) {
			return nil // the controller makes it
		}
		return err
	}
	ns, err := a.node.Status(ctx)
	if err != nil {
		return err
	}
	var cfgCond *metav1.Condition
	ns, cfgCond, err = a.act(ctx, &nsn, ns)
	if err != nil {
		return err
	}
	if err := a.report(ctx, &nsn, ns, cfgCond); err != nil {
		return err
	}
	a.label(ctx)
	return nil
}

// act: agent.act.
func (a *fakeAgent) act(ctx context.Context, nsn *v1alpha1.NodeSpawnNode, ns *nodeStatus) (*nodeStatus, *metav1.Condition, error) {
	spec := nsn.Spec
	want := spec.ConfigDigest
	if want == "" || ns.Switching {
		return ns, nil, nil
	}
	granted := spec.Switch && spec.SwitchID != "" && spec.SwitchID != a.st.SwitchID
	if want == ns.ActiveDigest {
		if granted {
			a.st.SwitchID, a.st.SwitchDigest = spec.SwitchID, want
			a.st.Phase, a.st.LastError = string(v1alpha1.PhaseReady), ""
			return ns, nil, a.node.WriteAgent(a.st)
		}
		return ns, nil, nil
	}
	if !granted && a.st.SwitchDigest == want && (a.st.Phase == string(v1alpha1.PhaseRolledBack) || a.st.Phase == string(v1alpha1.PhaseFailed)) {
		return ns, nil, nil
	}
	if granted && want == ns.PreviousDigest && want != ns.PreparedDigest {
		return a.switchTo(ctx, nsn, want, spec.SwitchID, true)
	}
	if ns.PreparedDigest != want && (spec.Prepare || granted) {
		cond, err := a.prepare(ctx, nsn, spec)
		if err != nil || cond.Status != metav1.ConditionTrue {
			return ns, cond, err
		}
		if ns, err = a.node.Status(ctx); err != nil {
			return nil, cond, err
		}
		if ns.PreparedDigest != want || !granted {
			return ns, cond, nil
		}
		ns2, _, err := a.switchTo(ctx, nsn, want, spec.SwitchID, false)
		return ns2, cond, err
	}
	if granted && ns.PreparedDigest == want {
		return a.switchTo(ctx, nsn, want, spec.SwitchID, false)
	}
	return ns, nil, nil
}

// prepare: agent.prepare (fetch the config, verify its digest, prepare).
func (a *fakeAgent) prepare(ctx context.Context, nsn *v1alpha1.NodeSpawnNode, spec v1alpha1.NodeSpawnNodeSpec) (*metav1.Condition, error) {
	want := spec.ConfigDigest
	var cfg v1alpha1.NodeSpawnConfig
	if err := a.c.Get(ctx, client.ObjectKey{Name: spec.ConfigName}, &cfg); err != nil {
		if apierrors.IsNotFound(err) {
			return a.refuse("ConfigNotFound", "NodeSpawnConfig "+spec.ConfigName+" does not exist"), nil
		}
		return nil, err
	}
	m, err := manifest.LoadConfig("NodeSpawnConfig "+cfg.Name, []byte(cfg.Spec.Manifest))
	if err != nil {
		return a.refuse("InvalidManifest", err.Error()), nil
	}
	if d, err := m.ConfigDigest(); err != nil || d.String() != want || cfg.Spec.Digest != want {
		return a.refuse("DigestMismatch", fmt.Sprintf("NodeSpawnConfig %s does not hash to %s", cfg.Name, want)), nil
	}
	cond := &metav1.Condition{Type: "ConfigVerified", Status: metav1.ConditionTrue, Reason: "Verified", Message: "NodeSpawnConfig " + cfg.Name + " hashes to " + want}
	now := time.Now().UTC()
	a.st.Phase, a.st.LastError, a.st.PrepareStarted, a.st.PrepareFinished = string(v1alpha1.PhasePreparing), "", &now, nil
	if err := a.node.WriteAgent(a.st); err != nil {
		return cond, err
	}
	_ = a.patchStatus(ctx, nsn, a.status(nil, nil, cond))
	perr := a.node.Prepare(ctx, m, want)
	end := time.Now().UTC()
	a.st.PrepareFinished = &end
	if perr != nil {
		if ctx.Err() != nil {
			return cond, ctx.Err()
		}
		a.st.Phase, a.st.LastError = string(v1alpha1.PhaseFailed), "prepare: "+perr.Error()
	} else {
		a.st.Phase = string(v1alpha1.PhasePrepared)
	}
	return cond, a.node.WriteAgent(a.st)
}

func (a *fakeAgent) refuse(reason, msg string) *metav1.Condition {
	a.st.Phase, a.st.LastError = string(v1alpha1.PhaseFailed), msg
	_ = a.node.WriteAgent(a.st)
	return &metav1.Condition{Type: "ConfigVerified", Status: metav1.ConditionFalse, Reason: reason, Message: msg}
}

// switchTo: agent.switchTo (the grant is used up before the switch).
func (a *fakeAgent) switchTo(ctx context.Context, nsn *v1alpha1.NodeSpawnNode, digest, id string, back bool) (*nodeStatus, *metav1.Condition, error) {
	now := time.Now().UTC()
	a.st.SwitchID, a.st.SwitchDigest = id, digest
	a.st.Phase, a.st.LastError, a.st.SwitchStarted, a.st.SwitchFinished = string(v1alpha1.PhaseSwitching), "", &now, nil
	if err := a.node.WriteAgent(a.st); err != nil {
		return nil, nil, err
	}
	_ = a.patchStatus(ctx, nsn, a.status(nil, nil, nil))
	var err error
	if back {
		err = a.node.Rollback(ctx)
	} else {
		err = a.node.Switch(ctx, digest)
	}
	if err != nil && ctx.Err() != nil {
		return nil, nil, ctx.Err()
	}
	ns, serr := a.node.Status(ctx)
	if serr != nil {
		return nil, nil, serr
	}
	if err == nil && ns.ActiveDigest == digest {
		// The new machine runs; its Node is checked (Verifying).
		a.st.Phase = string(v1alpha1.PhaseVerifying)
		_ = a.patchStatus(ctx, nsn, a.status(nil, ns, nil))
	}
	a.settleSwitch(ns, err)
	return ns, nil, a.node.WriteAgent(a.st)
}

// report patches the status when it changed or the heartbeat is due.
func (a *fakeAgent) report(ctx context.Context, nsn *v1alpha1.NodeSpawnNode, ns *nodeStatus, cfgCond *metav1.Condition) error {
	st := a.status(nsn, ns, cfgCond)
	if a.lastStatus != nil && time.Since(a.reportedAt) < heartbeat {
		old, cur := a.lastStatus.DeepCopy(), st.DeepCopy()
		old.Heartbeat, cur.Heartbeat = nil, nil
		if equality.Semantic.DeepEqual(old, cur) {
			return nil
		}
	}
	return a.patchStatus(ctx, nsn, st)
}

// patchStatus replaces the status by a merge patch of the status
// subresource, as agent.HTTPAPI.PatchStatus does.
func (a *fakeAgent) patchStatus(ctx context.Context, nsn *v1alpha1.NodeSpawnNode, st *v1alpha1.NodeSpawnNodeStatus) error {
	cur := nsn.DeepCopy()
	cur.Status = *st
	if err := a.c.Status().Patch(ctx, cur, client.MergeFrom(nsn)); err != nil {
		return err
	}
	a.lastStatus, a.reportedAt = st, time.Now()
	nsn.Status = *st.DeepCopy()
	return nil
}

// status: agent.status.
func (a *fakeAgent) status(nsn *v1alpha1.NodeSpawnNode, ns *nodeStatus, cfgCond *metav1.Condition) *v1alpha1.NodeSpawnNodeStatus {
	now := metav1.NewTime(time.Now().UTC().Truncate(time.Second))
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
	st.Heartbeat, st.AgentVersion = &now, "ctest"
	if cfgCond != nil {
		cfgCond.ObservedGeneration = st.ObservedGeneration
		meta.SetStatusCondition(&st.Conditions, *cfgCond)
	}
	ready := metav1.Condition{Type: "Ready", ObservedGeneration: st.ObservedGeneration}
	switch {
	case ns != nil && ns.Switching, st.Phase == v1alpha1.PhaseSwitching || st.Phase == v1alpha1.PhaseVerifying:
		ready.Status, ready.Reason, ready.Message = metav1.ConditionFalse, "Switching", "the node is switching machines"
	case st.ActiveMachine == "":
		ready.Status, ready.Reason, ready.Message = metav1.ConditionFalse, "NoMachine", "no machine runs the node"
	case st.Phase == v1alpha1.PhaseReady:
		ready.Status, ready.Reason, ready.Message = metav1.ConditionTrue, "Verified", "machine "+st.ActiveMachine+" runs the node, verified Ready after the switch"
	case st.Phase == v1alpha1.PhaseRolledBack:
		ready.Status, ready.Reason, ready.Message = metav1.ConditionFalse, "RolledBack", st.LastError
	default:
		ready.Status, ready.Reason, ready.Message = metav1.ConditionTrue, "Running", "machine "+st.ActiveMachine+" runs the node"
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

// label: agent.label (the Node's config-digest label).
func (a *fakeAgent) label(ctx context.Context) {
	if a.lastStatus == nil || a.lastStatus.ActiveDigest == "" {
		return
	}
	v := v1alpha1.DigestLabelValue(a.lastStatus.ActiveDigest)
	if v == a.lastLabel {
		return
	}
	var n corev1.Node
	if err := a.c.Get(ctx, client.ObjectKey{Name: a.name}, &n); err != nil {
		return
	}
	base := n.DeepCopy()
	metav1.SetMetaDataLabel(&n.ObjectMeta, v1alpha1.LabelConfigDigest, v)
	if err := a.c.Patch(ctx, &n, client.MergeFrom(base)); err != nil {
		return
	}
	a.lastLabel = v
}
