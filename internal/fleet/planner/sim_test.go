package planner

import (
	"fmt"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	v1alpha1 "github.com/nodespawn/nodespawn/api/v1alpha1"
)

// The simulation: a fleet of Nodes with NodeSpawnNodes, a scripted agent
// per node, pods to drain, and the planner called every simulated minute
// with its actions applied to the world. Invariants are checked after every
// step.

const (
	digestOld = "sha256:" + "1111111111111111111111111111111111111111111111111111111111111111"
	digestNew = "sha256:" + "2222222222222222222222222222222222222222222222222222222222222222"
)

type behavior string

const (
	bSuccess  behavior = "success"
	bRollback behavior = "rollback" // rolls back on its first switch, then succeeds
	bHang     behavior = "hang"     // hangs in Switching for hangSteps, then reports RolledBack
	bCrash    behavior = "crash"    // the agent dies mid-switch, restarts and finishes
	bBadPrep  behavior = "badprep"  // prepare fails
	bDead     behavior = "dead"     // the agent never runs
)

const hangSteps = 40

type simNode struct {
	node     corev1.Node
	nsn      v1alpha1.NodeSpawnNode
	behavior behavior
	switches int
	busy     int // steps left in the current phase
	pods     int
	pdb      bool // pods cannot be evicted
	crashed  bool
}

type world struct {
	t       *testing.T
	now     time.Time
	rollout v1alpha1.NodeSpawnRollout
	config  v1alpha1.NodeSpawnConfig
	nodes   map[string]*simNode
	names   []string
	// everGranted: node -> grant IDs seen.
	grants     map[string]bool
	extCordons map[string]bool
	haltedAt   int // failed count when Halted first turned True (0: never)
	lastPlan   Plan
}

func newWorld(t *testing.T, n int, spec v1alpha1.NodeSpawnRolloutSpec) *world {
	w := &world{
		t:          t,
		now:        time.Date(2026, 1, 5, 3, 0, 0, 0, time.UTC),
		nodes:      map[string]*simNode{},
		grants:     map[string]bool{},
		extCordons: map[string]bool{},
	}
	w.config = v1alpha1.NodeSpawnConfig{
		ObjectMeta: metav1.ObjectMeta{Name: "v2", Generation: 1},
		Spec:       v1alpha1.NodeSpawnConfigSpec{Manifest: "x", Digest: digestNew},
		Status: v1alpha1.NodeSpawnConfigStatus{Conditions: []metav1.Condition{{
			Type: "Valid", Status: metav1.ConditionTrue, ObservedGeneration: 1, Reason: "Valid",
		}}},
	}
	spec.ConfigName = "v2"
	w.rollout = v1alpha1.NodeSpawnRollout{ObjectMeta: metav1.ObjectMeta{Name: "r", Generation: 1}, Spec: spec}
	for i := 0; i < n; i++ {
		name := fmt.Sprintf("n%03d", i)
		w.names = append(w.names, name)
		sn := &simNode{behavior: bSuccess, pods: 2}
		sn.node = corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: name, Annotations: map[string]string{}}}
		setReady(&sn.node, true, w.now.Add(-time.Hour))
		sn.nsn = v1alpha1.NodeSpawnNode{ObjectMeta: metav1.ObjectMeta{Name: name, Generation: 1, Annotations: map[string]string{}}}
		sn.nsn.Status = v1alpha1.NodeSpawnNodeStatus{Phase: v1alpha1.PhaseIdle, ActiveDigest: digestOld}
		w.nodes[name] = sn
	}
	return w
}

func setReady(n *corev1.Node, ready bool, at time.Time) {
	s := corev1.ConditionFalse
	if ready {
		s = corev1.ConditionTrue
	}
	for i, c := range n.Status.Conditions {
		if c.Type == corev1.NodeReady {
			if c.Status != s {
				n.Status.Conditions[i].Status = s
				n.Status.Conditions[i].LastTransitionTime = metav1.NewTime(at)
			}
			return
		}
	}
	n.Status.Conditions = append(n.Status.Conditions, corev1.NodeCondition{Type: corev1.NodeReady, Status: s, LastTransitionTime: metav1.NewTime(at)})
}

func (w *world) input() Input {
	in := Input{Rollout: w.rollout.DeepCopy(), Config: w.config.DeepCopy(), Now: w.now}
	for _, name := range w.names {
		sn := w.nodes[name]
		ni := NodeInput{Node: *sn.node.DeepCopy(), NSN: sn.nsn.DeepCopy()}
		if sn.node.Annotations[v1alpha1.AnnotationCordonedBy] != "" {
			ni.PodsLeft = sn.pods
			if sn.pdb && sn.pods > 0 {
				ni.DrainBlocked = "evicting pod default/" + name + "-db: Cannot evict pod as it would violate the pod's disruption budget"
			}
		}
		in.Nodes = append(in.Nodes, ni)
	}
	return in
}

// step runs the planner, applies its actions, checks the invariants, then
// lets every agent act and the clock advance.
func (w *world) step() Plan {
	w.t.Helper()
	in := w.input()
	p := Decide(in)
	w.lastPlan = p
	failedBefore := countFailed(in)
	for _, a := range p.Actions {
		sn := w.nodes[a.Node]
		if a.Spec != nil && *a.Spec != sn.nsn.Spec {
			if a.Spec.Switch && a.Spec.SwitchID != sn.nsn.Spec.SwitchID {
				// Grant invariants: prepared, drained, not halted.
				if !(sn.nsn.Status.PreparedDigest == a.Spec.ConfigDigest || sn.nsn.Status.PreviousDigest == a.Spec.ConfigDigest) {
					w.t.Fatalf("%s: %s granted a switch to %s while not prepared (status %+v)", w.now, a.Node, a.Spec.ConfigDigest, sn.nsn.Status)
				}
				mode := w.rollout.Spec.Disruption.Mode
				if mode != v1alpha1.DisruptionInPlace && sn.pods > 0 && w.rollout.Spec.Disruption.OnTimeout != v1alpha1.TimeoutProceed {
					w.t.Fatalf("%s: %s granted with %d pods left", w.now, a.Node, sn.pods)
				}
				if failedBefore >= int(w.rollout.Spec.FailureBudget) {
					w.t.Fatalf("%s: %s granted after the budget was spent (%d failed)", w.now, a.Node, failedBefore)
				}
				w.grants[a.Node] = true
			}
			sn.nsn.Spec = *a.Spec
			sn.nsn.Generation++
		}
		for k, v := range a.Annotations {
			if v == "" {
				delete(sn.nsn.Annotations, k)
			} else {
				sn.nsn.Annotations[k] = v
			}
		}
		if a.Cordon {
			if sn.node.Spec.Unschedulable {
				w.t.Fatalf("%s: %s cordoned while already cordoned", w.now, a.Node)
			}
			sn.node.Spec.Unschedulable = true
			sn.node.Annotations[v1alpha1.AnnotationCordonedBy] = w.rollout.Name
			sn.node.Annotations[v1alpha1.AnnotationCordonedAt] = w.now.Format(time.RFC3339)
		}
		if a.Uncordon {
			if sn.node.Annotations[v1alpha1.AnnotationCordonedBy] != w.rollout.Name {
				w.t.Fatalf("%s: %s uncordoned though the rollout did not cordon it", w.now, a.Node)
			}
			sn.node.Spec.Unschedulable = false
			delete(sn.node.Annotations, v1alpha1.AnnotationCordonedBy)
			delete(sn.node.Annotations, v1alpha1.AnnotationCordonedAt)
		}
		if a.Drain && !sn.pdb && sn.pods > 0 {
			sn.pods--
		}
	}
	w.checkInvariants(p)
	for _, name := range w.names {
		w.agent(w.nodes[name])
	}
	w.now = w.now.Add(time.Minute)
	return p
}

func countFailed(in Input) int {
	g := GrantID(in.Rollout)
	n := 0
	for _, ni := range in.Nodes {
		if f := ni.NSN.Annotations[v1alpha1.AnnotationFailed]; strings.HasPrefix(f, g+" ") {
			n++
		}
	}
	return n
}

func (w *world) checkInvariants(p Plan) {
	w.t.Helper()
	maxU := scaled(w.rollout.Spec.Strategy.MaxUnavailable, len(w.names), false, 1)
	// Unavailable: NotReady, unschedulable or mid-switch, each once; nodes
	// the rollout may not touch (cordoned by someone else) and nodes that
	// were down before it took them are the only excess allowed.
	u, excused := 0, 0
	for _, name := range w.names {
		sn := w.nodes[name]
		ph := sn.nsn.Status.Phase
		un := sn.node.Spec.Unschedulable || !isReady(&sn.node) || ph == v1alpha1.PhaseSwitching || ph == v1alpha1.PhaseVerifying
		if un {
			u++
			if w.extCordons[name] || sn.behavior == bDead || strings.HasPrefix(sn.nsn.Annotations[v1alpha1.AnnotationFailed], GrantID(&w.rollout)+" ") {
				excused++
			}
		}
	}
	if u > maxU+excused {
		w.t.Fatalf("%s: %d nodes unavailable, maxUnavailable %d (+%d not the rollout's doing)", w.now, u, maxU, excused)
	}
	for name := range w.extCordons {
		if !w.nodes[name].node.Spec.Unschedulable {
			w.t.Fatalf("%s: %s, cordoned by someone else, is schedulable again", w.now, name)
		}
		if w.nodes[name].nsn.Spec.Switch {
			w.t.Fatalf("%s: %s, cordoned by someone else, was granted a switch", w.now, name)
		}
	}
	// Halted exactly at the budget.
	failed := int(p.Status.Failed)
	h := meta.FindStatusCondition(p.Status.Conditions, v1alpha1.RolloutHalted)
	halted := h != nil && h.Status == metav1.ConditionTrue
	if halted != (failed >= int(w.rollout.Spec.FailureBudget)) {
		w.t.Fatalf("%s: Halted=%v with %d failed, budget %d", w.now, halted, failed, w.rollout.Spec.FailureBudget)
	}
	if halted && w.haltedAt == 0 {
		w.haltedAt = failed
	}
	for _, c := range p.Status.Conditions {
		if c.ObservedGeneration != w.rollout.Generation {
			w.t.Fatalf("%s: condition %s has observedGeneration %d, want %d", w.now, c.Type, c.ObservedGeneration, w.rollout.Generation)
		}
	}
	// Prepares at once.
	if mp := int(w.rollout.Spec.Strategy.MaxPreparing); mp > 0 {
		preparing := 0
		for _, name := range w.names {
			if w.nodes[name].nsn.Status.Phase == v1alpha1.PhasePreparing {
				preparing++
			}
		}
		if preparing > mp {
			w.t.Fatalf("%s: %d nodes preparing, maxPreparing %d", w.now, preparing, mp)
		}
	}
	// Grants never run ahead of the wave.
	granted := 0
	for _, name := range w.names {
		if s := w.nodes[name].nsn.Spec; s.Switch && s.SwitchID == GrantID(&w.rollout) {
			granted++
		}
	}
	sizes := waveSizes(w.rollout.Spec.Strategy.Waves, len(w.names), maxU)
	cum := 0
	for i := 0; i <= int(p.Status.CurrentWave) && i < len(sizes); i++ {
		cum += sizes[i]
	}
	if granted > cum {
		w.t.Fatalf("%s: %d nodes granted, wave %d ends at %d", w.now, granted, p.Status.CurrentWave, cum)
	}
}

func isReady(n *corev1.Node) bool { return conditionIs(n, corev1.NodeReady, corev1.ConditionTrue) }

// agent plays the node's agent for one simulated minute.
func (w *world) agent(sn *simNode) {
	s := &sn.nsn.Status
	spec := sn.nsn.Spec
	now := metav1.NewTime(w.now)
	if sn.behavior == bDead {
		return
	}
	if sn.busy > 0 {
		sn.busy--
		return
	}
	switch s.Phase {
	case v1alpha1.PhasePreparing:
		if sn.behavior == bBadPrep {
			s.Phase = v1alpha1.PhaseFailed
			s.LastError = "pulling the image: manifest unknown"
			s.ObservedGeneration = sn.nsn.Generation
			return
		}
		s.Phase = v1alpha1.PhasePrepared
		s.PreparedDigest = spec.ConfigDigest
		s.PrepareFinished = &now
		s.ObservedGeneration = sn.nsn.Generation
		return
	case v1alpha1.PhaseSwitching:
		sn.switches++
		switch {
		case sn.behavior == bHang && sn.switches == 1:
			s.Phase = v1alpha1.PhaseRolledBack
			s.LastError = "the new kubelet never became Ready"
			setReady(&sn.node, true, w.now)
			return
		case sn.behavior == bRollback && sn.switches == 1:
			s.Phase = v1alpha1.PhaseRolledBack
			s.LastError = "verify: node not Ready within 5m"
			setReady(&sn.node, true, w.now)
			return
		case sn.behavior == bCrash && !sn.crashed:
			sn.crashed = true
			sn.switches--
			sn.busy = 3 // the agent is down, then restarts and resumes
			return
		}
		s.Phase = v1alpha1.PhaseVerifying
		sn.busy = 1
		return
	case v1alpha1.PhaseVerifying:
		s.Phase = v1alpha1.PhaseReady
		s.PreviousDigest = s.ActiveDigest
		s.ActiveDigest = s.PreparedDigest
		if spec.ConfigDigest == s.PreviousDigest || s.PreparedDigest != spec.ConfigDigest {
			s.ActiveDigest = spec.ConfigDigest
		}
		s.PreparedDigest = ""
		s.SwitchFinished = &now
		s.ObservedGeneration = sn.nsn.Generation
		setReady(&sn.node, true, w.now)
		return
	}
	if spec.Switch && spec.SwitchID != s.SwitchID {
		s.SwitchID = spec.SwitchID
		s.Phase = v1alpha1.PhaseSwitching
		s.SwitchStarted = &now
		s.SwitchFinished = nil
		s.LastError = ""
		setReady(&sn.node, false, w.now)
		sn.busy = 1
		if sn.behavior == bHang && sn.switches == 0 {
			sn.busy = hangSteps
		}
		return
	}
	if spec.Prepare && spec.ConfigDigest != "" && s.PreparedDigest != spec.ConfigDigest && s.ActiveDigest != spec.ConfigDigest &&
		!(s.Phase == v1alpha1.PhaseFailed && s.ObservedGeneration == sn.nsn.Generation) {
		s.Phase = v1alpha1.PhasePreparing
		s.PrepareStarted = &now
		sn.busy = 2
	}
}

func (w *world) run(maxSteps int, until func(Plan) bool) Plan {
	w.t.Helper()
	var p Plan
	for i := 0; i < maxSteps; i++ {
		p = w.step()
		if until(p) {
			return p
		}
	}
	w.t.Fatalf("not done after %d steps; status %+v", maxSteps, summary(p.Status))
	return p
}

func summary(s v1alpha1.NodeSpawnRolloutStatus) string {
	var b strings.Builder
	fmt.Fprintf(&b, "nodes=%d updated=%d preparing=%d prepared=%d switching=%d unavailable=%d failed=%d wave=%d",
		s.Nodes, s.Updated, s.Preparing, s.Prepared, s.Switching, s.Unavailable, s.Failed, s.CurrentWave)
	for _, c := range s.Conditions {
		fmt.Fprintf(&b, " %s=%s(%s: %s)", c.Type, c.Status, c.Reason, c.Message)
	}
	for _, x := range s.Blocked {
		fmt.Fprintf(&b, " blocked[%s %s]", x.Node, x.Reason)
	}
	return b.String()
}

func condTrue(s v1alpha1.NodeSpawnRolloutStatus, typ string) bool {
	return meta.IsStatusConditionTrue(s.Conditions, typ)
}

func pct(s string) *intstr.IntOrString { v := intstr.FromString(s); return &v }
func cnt(n int) *intstr.IntOrString    { v := intstr.FromInt32(int32(n)); return &v }
func dur(d time.Duration) *metav1.Duration {
	return &metav1.Duration{Duration: d}
}

// A fleet of 60 with every kind of agent: the rollout halts exactly at the
// budget, resumes when the spec is edited, and completes once the node
// cordoned by someone else is released; no invariant breaks on the way.
func TestSimulationFleet(t *testing.T) {
	w := newWorld(t, 60, v1alpha1.NodeSpawnRolloutSpec{
		Strategy: v1alpha1.RolloutStrategy{
			MaxUnavailable: pct("10%"),
			Waves:          []intstr.IntOrString{intstr.FromInt32(1), intstr.FromString("10%"), intstr.FromString("50%")},
			Soak:           dur(10 * time.Minute),
			PrepareAhead:   3,
			MaxPreparing:   4,
			PhaseTimeout:   dur(20 * time.Minute),
		},
		Disruption:    v1alpha1.Disruption{Mode: v1alpha1.DisruptionDrain, Timeout: dur(15 * time.Minute), OnTimeout: v1alpha1.TimeoutFail},
		FailureBudget: 4,
	})
	w.nodes["n005"].behavior = bRollback
	w.nodes["n012"].behavior = bHang
	w.nodes["n013"].behavior = bCrash
	w.nodes["n020"].behavior = bRollback
	w.nodes["n030"].pdb = true // drain times out
	// Down before the rollout: updated first, no budget taken.
	setReady(&w.nodes["n040"].node, false, w.now.Add(-time.Hour))
	// Cordoned by someone else.
	w.nodes["n050"].node.Spec.Unschedulable = true
	w.extCordons["n050"] = true

	halted := w.run(600, func(p Plan) bool { return condTrue(p.Status, v1alpha1.RolloutHalted) })
	if halted.Status.Failed != 4 || w.haltedAt != 4 {
		t.Fatalf("halted with %d failed (first seen at %d), want exactly the budget 4: %s", halted.Status.Failed, w.haltedAt, summary(halted.Status))
	}
	if w.grants["n040"] == false {
		t.Errorf("n040 (NotReady before the rollout) was not among the first switched")
	}
	reasons := map[string]string{}
	for _, f := range halted.Status.FailedNodes {
		reasons[f.Node] = f.Reason
	}
	want := map[string]string{"n005": "RolledBack", "n012": "PhaseTimeout", "n020": "RolledBack", "n030": "DrainTimeout"}
	for n, r := range want {
		if reasons[n] != r {
			t.Errorf("failedNodes[%s] = %q, want %q (all: %v)", n, reasons[n], r, reasons)
		}
	}
	// Halted: nothing new is granted however long it waits; in-flight
	// nodes finish.
	grantedAtHalt := len(w.grants)
	for i := 0; i < 60; i++ {
		w.step()
	}
	if len(w.grants) != grantedAtHalt {
		t.Fatalf("grants went from %d to %d while halted", grantedAtHalt, len(w.grants))
	}
	for _, name := range w.names {
		if ph := w.nodes[name].nsn.Status.Phase; ph == v1alpha1.PhaseSwitching || ph == v1alpha1.PhaseVerifying {
			t.Fatalf("%s still %s after the halt: in-flight nodes should have finished", name, ph)
		}
	}

	// Resume by editing the spec: the new generation's count starts at zero
	// and the failed nodes are retried (their second switch succeeds).
	w.rollout.Generation++
	w.rollout.Spec.FailureBudget = 2
	w.nodes["n030"].pdb = false
	w.rollout.Status = w.lastPlan.Status
	p := w.run(900, func(p Plan) bool {
		w.rollout.Status = p.Status
		return p.Status.Updated == 59
	})
	if condTrue(p.Status, v1alpha1.RolloutComplete) {
		t.Fatalf("Complete with n050 (cordoned by someone else) not updated: %s", summary(p.Status))
	}
	if len(p.Status.Blocked) != 1 || p.Status.Blocked[0].Node != "n050" || p.Status.Blocked[0].Reason != "CordonedByOther" {
		t.Fatalf("blocked = %+v, want n050 CordonedByOther", p.Status.Blocked)
	}
	// Its owner uncordons it; the rollout finishes.
	w.nodes["n050"].node.Spec.Unschedulable = false
	delete(w.extCordons, "n050")
	p = w.run(200, func(p Plan) bool { return condTrue(p.Status, v1alpha1.RolloutComplete) })
	for _, name := range w.names {
		sn := w.nodes[name]
		if sn.node.Spec.Unschedulable || sn.node.Annotations[v1alpha1.AnnotationCordonedBy] != "" {
			t.Errorf("%s left cordoned after Complete", name)
		}
		if sn.nsn.Status.ActiveDigest != digestNew {
			t.Errorf("%s runs %s after Complete", name, sn.nsn.Status.ActiveDigest)
		}
	}
	if p.Status.Failed != 0 || p.Status.Updated != 60 {
		t.Fatalf("final status: %s", summary(p.Status))
	}
}

// With waves of 10% and a soak, no node of a wave is cordoned before the
// previous wave has been healthy for the soak.
func TestSimulationSoakBetweenWaves(t *testing.T) {
	w := newWorld(t, 20, v1alpha1.NodeSpawnRolloutSpec{
		Strategy:      v1alpha1.RolloutStrategy{MaxUnavailable: cnt(2), Soak: dur(30 * time.Minute)},
		Disruption:    v1alpha1.Disruption{Mode: v1alpha1.DisruptionInPlace},
		FailureBudget: 1,
	})
	var waveDone time.Time
	lastWave := int32(0)
	w.run(1000, func(p Plan) bool {
		if p.Status.CurrentWave != lastWave {
			lastWave = p.Status.CurrentWave
			waveDone = w.now
		}
		for _, a := range p.Actions {
			if a.Spec != nil && a.Spec.Switch && !waveDone.IsZero() && w.now.Sub(waveDone) < 30*time.Minute-2*time.Minute {
				t.Fatalf("%s: %s granted %s after wave %d finished, soak is 30m", w.now, a.Node, w.now.Sub(waveDone), lastWave-1)
			}
		}
		return condTrue(p.Status, v1alpha1.RolloutComplete)
	})
	if lastWave != 9 {
		t.Fatalf("last wave %d, want 9 (20 nodes in waves of 2)", lastWave)
	}
}

// Agents that never answer: prepares time out and count as failures; the
// rollout halts at the budget without ever cordoning.
func TestSimulationDeadAgents(t *testing.T) {
	w := newWorld(t, 10, v1alpha1.NodeSpawnRolloutSpec{
		Strategy:      v1alpha1.RolloutStrategy{MaxUnavailable: cnt(3), PhaseTimeout: dur(10 * time.Minute)},
		FailureBudget: 2,
	})
	for _, n := range w.names {
		w.nodes[n].behavior = bDead
	}
	p := w.run(100, func(p Plan) bool { return condTrue(p.Status, v1alpha1.RolloutHalted) })
	if p.Status.Failed < 2 {
		t.Fatalf("halted with %d failed", p.Status.Failed)
	}
	for _, f := range p.Status.FailedNodes {
		if f.Reason != "PhaseTimeout" {
			t.Fatalf("failure %+v, want PhaseTimeout", f)
		}
	}
	for _, n := range w.names {
		if w.nodes[n].node.Spec.Unschedulable {
			t.Fatalf("%s cordoned though never prepared", n)
		}
	}
}
