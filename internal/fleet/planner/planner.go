// Package planner decides a rollout's next step from the objects alone.
//
// Decide is a pure function: given a NodeSpawnRollout, its NodeSpawnConfig,
// the Nodes it selects with their NodeSpawnNodes (and, for nodes being
// drained, how many pods are left and what blocks them) and the time, it
// returns what to write (NodeSpawnNode specs and controller annotations,
// cordons, uncordons, drains), the rollout's status and when to look
// again. The controller holds no state of its own between reconciles: no
// locks, no TTLs; everything the planner needs to remember lives in the
// objects:
//
//   - a grant is spec.switch with spec.switchID = "ROLLOUT/GENERATION"
//     and the annotation nodespawn.dev/switch-granted (when);
//   - a prepare request is spec.prepare with the annotation
//     nodespawn.dev/prepare-requested ("DIGEST WHEN");
//   - a cordon made by the rollout is the Node's nodespawn.dev/cordoned-by
//     and nodespawn.dev/cordoned-at annotations;
//   - a counted failure is the annotation nodespawn.dev/failed
//     ("SWITCHID REASON: MESSAGE"), so that a failure stays counted even
//     when the evidence for it (a cordon, a status) changes later.
//
// The agent's side of the contract (NodeSpawnNodeStatus): it sets
// status.switchID to spec.switchID when it starts acting on a grant and
// reports phase Switching/Verifying while it works, then Ready (activeDigest
// = the granted digest), RolledBack or Failed; preparing reports Preparing,
// then Prepared with preparedDigest, or Failed with observedGeneration =
// the NodeSpawnNode's generation; previousDigest names the kept previous
// machine (a rollout back to it needs no prepare).
//
// Rules:
//
//   - Failure budget: a node counts as failed for the current generation
//     when its grant (this generation's switchID) rolled back or failed, its
//     prepare failed, its prepare or switch ran past phaseTimeout, its
//     health gates did not pass within phaseTimeout after the switch, or its
//     drain timed out with onTimeout Fail. When the failed count reaches
//     failureBudget the rollout is Halted: no new prepare, cordon or grant;
//     grants in flight finish. Editing the spec (a new generation) resumes:
//     new grants carry the new generation, so the count starts from zero
//     and failed nodes are tried again.
//   - maxUnavailable counts each selected node once if it is NotReady,
//     unschedulable (whoever cordoned it) or in the rollout's hands (being
//     drained, switching, verifying). A node that is already unavailable
//     for another reason (NotReady, not cordoned by someone else) is taken
//     first and takes no extra budget, so nodes that are down do not
//     deadlock the rollout: they are updated first. Nodes that stay
//     unavailable and that the rollout may not touch hold budget, and the
//     status says which.
//   - A node cordoned by someone else (unschedulable without the rollout's
//     annotation) is left alone: not drained, not switched, never
//     uncordoned; it is listed in status.blocked (reason CordonedByOther)
//     and the rollout is not Complete until it is uncordoned and updated.
//   - Waves: explicit sizes (counts or percents of the selected nodes,
//     rounded up, at least 1; the last takes the rest) or, without them,
//     waves of maxUnavailable nodes. Wave k is done when the nodes done
//     (updated and healthy) plus the failed reach the sum of the sizes up to
//     k. A new wave starts only after the last node done became healthy
//     soak ago.
//   - Prepare runs ahead of the switches: the current wave's nodes plus
//     prepareAhead more may hold a prepare request, at most maxPreparing
//     preparing at once. A node whose previousDigest is the rollout's
//     digest needs no prepare: the agent switches back to the kept machine.
//   - Switches (and the cordon and drain before them) start only inside the
//     maintenance window and while not paused; prepare ignores the window.
//   - The rollout uncordons only what it cordoned, when the node is done, or
//     failed and healthy again, or when its drain is abandoned (paused,
//     halted, window closed); a node whose health gates fail stays cordoned.
package planner

import (
	"fmt"
	"sort"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	v1alpha1 "github.com/nodespawn/nodespawn/api/v1alpha1"
)

// Defaults for fields left empty.
const (
	DefaultPhaseTimeout      = 30 * time.Minute
	DefaultDisruptionTimeout = time.Hour
	// DrainRetry is how soon a reconcile looks again at a node being
	// drained (evictions refused by a PodDisruptionBudget are retried).
	DrainRetry = 10 * time.Second
	// Resync bounds the wait between reconciles of an unfinished rollout.
	Resync = 5 * time.Minute
)

// Input is what the planner sees.
type Input struct {
	Rollout *v1alpha1.NodeSpawnRollout
	// Config is the rollout's config; nil when it does not exist.
	Config *v1alpha1.NodeSpawnConfig
	// Nodes are the enrolled Nodes the rollout selects.
	Nodes []NodeInput
	Now   time.Time
}

// NodeInput is one selected node.
type NodeInput struct {
	Node corev1.Node
	// NSN is the node's NodeSpawnNode; nil when the controller has not
	// created it yet.
	NSN *v1alpha1.NodeSpawnNode
	// PodsLeft is, for a node the rollout has cordoned, how many pods are
	// still to go (Drain: evictable pods; WaitForPods: pods matching the
	// selector).
	PodsLeft int
	// DrainBlocked says why the last eviction pass left pods (e.g. a
	// PodDisruptionBudget refused pod NS/NAME).
	DrainBlocked string
}

// Action is what to do to one node.
type Action struct {
	Node string
	// Spec, when set, is the NodeSpawnNode spec to write.
	Spec *v1alpha1.NodeSpawnNodeSpec
	// Annotations to set on the NodeSpawnNode ("" removes one).
	Annotations map[string]string
	// Cordon marks the Node unschedulable with the rollout's annotations;
	// Uncordon undoes it (only ever on a node the rollout cordoned); Drain
	// evicts its evictable pods (disruption Drain only: WaitForPods never
	// evicts).
	Cordon, Uncordon, Drain bool
	// Events to record, one per transition.
	Events []Event
}

// Event is a transition worth telling.
type Event struct {
	Warning bool
	Reason  string
	Message string
}

// Plan is the planner's answer.
type Plan struct {
	Actions []Action
	Status  v1alpha1.NodeSpawnRolloutStatus
	// Events about the rollout as a whole (halted, complete).
	Events []Event
	// RequeueAfter is when to look again even if nothing changes (0: only
	// on change).
	RequeueAfter time.Duration
	// Durations of switches that finished under this generation's grants,
	// by node (for metrics).
	SwitchDurations map[string]time.Duration
}

// GrantID is the switchID of a rollout's grants at its generation.
func GrantID(r *v1alpha1.NodeSpawnRollout) string {
	return fmt.Sprintf("%s/%d", r.Name, r.Generation)
}

type state int

const (
	stPending   state = iota // nothing asked yet
	stPreparing              // prepare asked, not prepared
	stPrepared               // ready to be switched
	stDraining               // cordoned by the rollout, not granted yet
	stSwitching              // granted, the agent is not done
	stVerifying              // switched, health gates not passing yet
	stDone                   // on the digest and healthy
	stUpdated                // on the digest, not switched by this grant, unhealthy
	stFailed                 // counted against the budget
	stSkipped                // left alone (cordoned by someone else, no NodeSpawnNode)
)

type node struct {
	in          *NodeInput
	name        string
	st          state
	ready       bool
	healthy     bool
	ourCordon   bool
	extCordon   bool
	unavailable bool
	inflight    bool // the agent is (or should be) switching
	prepared    bool
	byPrevious  bool
	granted     bool // spec carries this generation's grant
	grant       string
	failure     string
	newFailure  bool
	act         Action
	touched     bool
}

// Decide computes the next step.
func Decide(in Input) Plan {
	r := in.Rollout
	now := in.Now
	p := Plan{SwitchDurations: map[string]time.Duration{}}
	st := &p.Status
	st.ObservedGeneration = r.Generation
	st.Conditions = append([]metav1.Condition(nil), r.Status.Conditions...)
	st.Nodes = int32(len(in.Nodes))
	grant := GrantID(r)
	phaseTimeout := durOr(r.Spec.Strategy.PhaseTimeout, DefaultPhaseTimeout)
	disTimeout := durOr(r.Spec.Disruption.Timeout, DefaultDisruptionTimeout)
	mode := r.Spec.Disruption.Mode
	if mode == "" {
		mode = v1alpha1.DisruptionDrain
	}
	budget := int(r.Spec.FailureBudget)
	if budget < 1 {
		budget = 1
	}
	var wake []time.Time
	wakeAt := func(t time.Time) {
		if t.After(now) {
			wake = append(wake, t)
		}
	}

	// The config must exist and be valid; otherwise nothing new starts.
	configProblem := ""
	digest := ""
	switch c := in.Config; {
	case c == nil:
		configProblem = fmt.Sprintf("NodeSpawnConfig %q does not exist", r.Spec.ConfigName)
	default:
		digest = c.Spec.Digest
		if v := meta.FindStatusCondition(c.Status.Conditions, "Valid"); v == nil || v.Status != metav1.ConditionTrue || v.ObservedGeneration != c.Generation {
			msg := "not validated yet"
			if v != nil && v.Status == metav1.ConditionFalse {
				msg = v.Message
			}
			configProblem = fmt.Sprintf("NodeSpawnConfig %q is not valid: %s", c.Name, msg)
		}
	}
	st.ConfigDigest = digest

	inWindow, windowNext, windowErr := InWindow(r.Spec.MaintenanceWindow, now)
	if windowErr == nil && !windowNext.IsZero() {
		wakeAt(windowNext)
	}

	gates := healthGates(r.Spec.HealthGates)

	// Classify every node.
	nodes := make([]*node, 0, len(in.Nodes))
	for i := range in.Nodes {
		ni := &in.Nodes[i]
		n := &node{in: ni, name: ni.Node.Name, grant: grant, act: Action{Node: ni.Node.Name}}
		nodes = append(nodes, n)
		n.ready = conditionIs(&ni.Node, corev1.NodeReady, corev1.ConditionTrue)
		n.healthy = n.ready && gatesPass(&ni.Node, gates)
		n.ourCordon = ni.Node.Annotations[v1alpha1.AnnotationCordonedBy] == r.Name
		n.extCordon = ni.Node.Spec.Unschedulable && !n.ourCordon
		nsn := ni.NSN
		if nsn == nil {
			n.st = stSkipped
			n.unavailable = !n.ready || ni.Node.Spec.Unschedulable
			continue
		}
		s := nsn.Status
		spec := nsn.Spec
		n.granted = spec.Switch && spec.SwitchID == grant && spec.ConfigDigest == digest && digest != ""
		n.inflight = s.Phase == v1alpha1.PhaseSwitching || s.Phase == v1alpha1.PhaseVerifying ||
			(spec.Switch && spec.SwitchID != "" && s.SwitchID != spec.SwitchID)
		n.prepared = digest != "" && (s.PreparedDigest == digest || s.PreviousDigest == digest)
		n.byPrevious = digest != "" && s.PreviousDigest == digest && s.PreparedDigest != digest
		if f := nsn.Annotations[v1alpha1.AnnotationFailed]; f != "" {
			if id, rest, ok := strings.Cut(f, " "); ok && id == grant {
				n.failure = rest
			}
		}
		switch {
		case n.failure != "":
			n.st = stFailed
		case digest == "":
			n.st = stPending
		case n.inflight && !n.granted:
			// A grant from an earlier generation (or rollout) is finishing.
			n.st = stSwitching
		case n.granted && n.inflight:
			n.st = stSwitching
			if t, ok := parseTime(nsn.Annotations[v1alpha1.AnnotationSwitchGranted]); ok {
				if now.Sub(t) >= phaseTimeout {
					n.fail("PhaseTimeout", fmt.Sprintf("the switch did not finish within %s of its grant (agent phase %q)", phaseTimeout, orNone(string(s.Phase))))
				} else {
					wakeAt(t.Add(phaseTimeout))
				}
			}
		case n.granted && s.SwitchID == grant && (s.Phase == v1alpha1.PhaseRolledBack || s.Phase == v1alpha1.PhaseFailed):
			reason := "RolledBack"
			if s.Phase == v1alpha1.PhaseFailed {
				reason = "SwitchFailed"
			}
			n.fail(reason, orNone(s.LastError))
		case n.granted && s.SwitchID == grant && s.ActiveDigest != digest:
			n.fail("SwitchFailed", fmt.Sprintf("the agent finished the grant in phase %q but runs %q", orNone(string(s.Phase)), orNone(s.ActiveDigest)))
		case s.ActiveDigest == digest && n.healthy:
			n.st = stDone
			if n.granted && s.SwitchStarted != nil && s.SwitchFinished != nil {
				p.SwitchDurations[n.name] = s.SwitchFinished.Sub(s.SwitchStarted.Time)
			}
		case s.ActiveDigest == digest && n.granted:
			n.st = stVerifying
			from := now
			if s.SwitchFinished != nil {
				from = s.SwitchFinished.Time
			} else if t, ok := parseTime(nsn.Annotations[v1alpha1.AnnotationSwitchGranted]); ok {
				from = t
			}
			if now.Sub(from) >= phaseTimeout {
				n.fail("HealthGate", fmt.Sprintf("not healthy within %s of the switch: %s", phaseTimeout, unhealthy(&ni.Node, gates)))
			} else {
				wakeAt(from.Add(phaseTimeout))
			}
		case s.ActiveDigest == digest:
			n.st = stUpdated
		case n.extCordon:
			n.st = stSkipped
		case n.ourCordon:
			n.st = stDraining
		case n.prepared:
			n.st = stPrepared
		case spec.Prepare && spec.ConfigDigest == digest:
			n.st = stPreparing
			req, ok := prepareRequested(nsn, digest)
			if s.Phase == v1alpha1.PhaseFailed && s.ObservedGeneration >= nsn.Generation {
				n.fail("PrepareFailed", orNone(s.LastError))
				break
			}
			if !ok {
				break
			}
			if s.PrepareStarted != nil && s.PrepareStarted.After(req) {
				req = s.PrepareStarted.Time
			}
			if now.Sub(req) >= phaseTimeout {
				n.fail("PhaseTimeout", fmt.Sprintf("prepare did not finish within %s (agent phase %q)", phaseTimeout, orNone(string(s.Phase))))
			} else {
				wakeAt(req.Add(phaseTimeout))
			}
		default:
			n.st = stPending
		}
		// A failure that is still in flight stays in flight (it finishes).
		n.unavailable = !n.ready || ni.Node.Spec.Unschedulable || n.inflight ||
			n.st == stDraining || n.st == stSwitching || n.st == stVerifying
	}

	failed := 0
	for _, n := range nodes {
		if n.st == stFailed {
			failed++
		}
	}
	halted := failed >= budget

	// Halted: the condition and an Event on the transition.
	if halted {
		if setCond(st, r, v1alpha1.RolloutHalted, true, "FailureBudgetSpent",
			fmt.Sprintf("%d node(s) failed, failureBudget is %d: no new node is switched; nodes in flight finish. Edit the spec to resume (the count restarts)", failed, budget)) {
			p.Events = append(p.Events, Event{Warning: true, Reason: "Halted", Message: fmt.Sprintf("failure budget spent: %d node(s) failed (budget %d)", failed, budget)})
		}
	} else {
		setCond(st, r, v1alpha1.RolloutHalted, false, "WithinBudget", fmt.Sprintf("%d of %d allowed failure(s)", failed, budget))
	}

	// Waves.
	total := len(nodes)
	maxUnavail := scaled(r.Spec.Strategy.MaxUnavailable, total, false, 1)
	sizes := waveSizes(r.Spec.Strategy.Waves, total, maxUnavail)
	done, active := 0, 0
	var lastHealthy time.Time
	for _, n := range nodes {
		switch n.st {
		case stDone:
			done++
			if n.granted {
				if t := healthySince(n, gates); t.After(lastHealthy) {
					lastHealthy = t
				}
			}
		case stDraining, stSwitching, stVerifying:
			active++
		}
	}
	processed := done + failed
	cum, wave := 0, len(sizes)-1
	prevCum := 0
	for i, s := range sizes {
		if processed < cum+s {
			wave = i
			prevCum = cum
			cum += s
			break
		}
		cum += s
		prevCum = cum - s
	}
	st.CurrentWave = int32(wave)
	soaking := false
	if soak := durOr(r.Spec.Strategy.Soak, 0); soak > 0 && wave > 0 && processed+active <= prevCum && !lastHealthy.IsZero() {
		if end := lastHealthy.Add(soak); now.Before(end) {
			soaking = true
			wakeAt(end)
		}
	}
	capacity := cum - processed - active
	if capacity < 0 {
		capacity = 0
	}

	canSwitch := configProblem == "" && windowErr == nil && !r.Spec.Paused && !halted && inWindow && !soaking
	canPrepare := configProblem == "" && !r.Spec.Paused && !halted

	// Count unavailable nodes, each once.
	unavailable := 0
	for _, n := range nodes {
		if n.unavailable {
			unavailable++
		}
	}

	// Nodes being drained: grant when empty, fail or proceed on timeout,
	// abandon when switching is not allowed now.
	order := append([]*node(nil), nodes...)
	sort.SliceStable(order, func(i, j int) bool {
		if order[i].unavailable != order[j].unavailable {
			return order[i].unavailable
		}
		return order[i].name < order[j].name
	})
	for _, n := range order {
		if n.st != stDraining {
			continue
		}
		if !canSwitch {
			n.uncordon("switches are not allowed now (" + whyNot(r, configProblem, windowErr, halted, inWindow, soaking) + "): drain abandoned")
			n.st = stPrepared
			continue
		}
		cordonedAt, _ := parseTime(n.in.Node.Annotations[v1alpha1.AnnotationCordonedAt])
		if mode == v1alpha1.DisruptionInPlace || n.in.PodsLeft == 0 {
			n.grantSwitch(r, digest, grant, now)
			n.st = stSwitching
			continue
		}
		if !cordonedAt.IsZero() && now.Sub(cordonedAt) >= disTimeout {
			if r.Spec.Disruption.OnTimeout == v1alpha1.TimeoutProceed {
				n.event(true, "DrainTimeout", fmt.Sprintf("%d pod(s) left after %s; switching anyway (onTimeout Proceed)", n.in.PodsLeft, disTimeout))
				n.grantSwitch(r, digest, grant, now)
				n.st = stSwitching
				continue
			}
			n.fail("DrainTimeout", fmt.Sprintf("%d pod(s) left after %s: %s", n.in.PodsLeft, disTimeout, orNone(n.in.DrainBlocked)))
			n.uncordon("drain timed out")
			failed++
			continue
		}
		if !cordonedAt.IsZero() {
			wakeAt(cordonedAt.Add(disTimeout))
		}
		// Drain evicts; WaitForPods only waits (its pods, a training
		// job, finish on their own; the next plan counts what is left).
		n.act.Drain = mode == v1alpha1.DisruptionDrain
		n.touched = true
		wakeAt(now.Add(DrainRetry))
	}
	if failed >= budget && !halted {
		// A drain timeout just spent the budget.
		halted = true
		canSwitch, canPrepare = false, false
		setCond(st, r, v1alpha1.RolloutHalted, true, "FailureBudgetSpent",
			fmt.Sprintf("%d node(s) failed, failureBudget is %d: no new node is switched; nodes in flight finish. Edit the spec to resume (the count restarts)", failed, budget))
		p.Events = append(p.Events, Event{Warning: true, Reason: "Halted", Message: fmt.Sprintf("failure budget spent: %d node(s) failed (budget %d)", failed, budget)})
	}

	// New switches: prepared nodes, within the wave and maxUnavailable.
	budgetHeld := false
	if canSwitch {
		for _, n := range order {
			if capacity <= 0 {
				break
			}
			if n.st != stPrepared {
				continue
			}
			if !n.unavailable {
				if unavailable >= maxUnavail {
					budgetHeld = true
					continue
				}
				unavailable++
				n.unavailable = true
			}
			capacity--
			// The node leaves the prepared (holding) nodes for the active
			// ones: counted there too, or the prepare limit below
			// (cum - processed - active) would hand its slot to a node
			// beyond the wave and prepareAhead in this same pass (found by
			// TestHaltsExactlyAtTheFailureBudget in internal/fleet/controller:
			// a 4th node prepared in a wave of 3 with prepareAhead 0).
			active++
			if mode == v1alpha1.DisruptionInPlace {
				n.grantSwitch(r, digest, grant, now)
				n.st = stSwitching
			} else {
				n.act.Cordon = true
				n.touched = true
				n.event(false, "Cordoned", fmt.Sprintf("cordoned for the switch to %s (wave %d)", short(digest), wave))
				n.st = stDraining
				wakeAt(now.Add(time.Second))
			}
		}
	}

	// Prepare requests: the wave's remaining nodes plus prepareAhead, at
	// most maxPreparing at once.
	if canPrepare {
		limit := cum - processed - active + int(r.Spec.Strategy.PrepareAhead)
		holding, preparing := 0, 0
		for _, n := range nodes {
			switch n.st {
			case stPreparing:
				holding++
				preparing++
			case stPrepared:
				holding++
			}
		}
		maxPrep := int(r.Spec.Strategy.MaxPreparing)
		for _, n := range order {
			if holding >= limit || (maxPrep > 0 && preparing >= maxPrep) {
				break
			}
			if n.st != stPending {
				continue
			}
			holding++
			preparing++
			n.st = stPreparing
			n.act.Spec = &v1alpha1.NodeSpawnNodeSpec{ConfigName: r.Spec.ConfigName, ConfigDigest: digest, Prepare: true}
			n.setAnn(v1alpha1.AnnotationPrepareRequested, digest+" "+now.UTC().Format(time.RFC3339))
			n.event(false, "PrepareRequested", "prepare "+short(digest))
			wakeAt(now.Add(phaseTimeout))
		}
	}

	// Specs of the nodes not acted on: point them at the digest (a stale
	// spec from an earlier config or grant is replaced unless in flight).
	for _, n := range nodes {
		nsn := n.in.NSN
		if nsn == nil || configProblem != "" || n.act.Spec != nil || n.inflight || n.st == stFailed {
			continue
		}
		want := nsn.Spec
		switch n.st {
		case stDone, stUpdated:
			if want.ConfigDigest == digest {
				continue
			}
			want = v1alpha1.NodeSpawnNodeSpec{ConfigName: r.Spec.ConfigName, ConfigDigest: digest}
		case stPending, stPrepared:
			if want.ConfigDigest == digest && !want.Switch {
				continue
			}
			want = v1alpha1.NodeSpawnNodeSpec{ConfigName: r.Spec.ConfigName, ConfigDigest: digest, Prepare: n.st == stPrepared && !n.byPrevious}
		default:
			continue
		}
		n.act.Spec = &want
		n.touched = true
	}

	// Uncordon what the rollout cordoned once it is no longer needed.
	for _, n := range nodes {
		if !n.ourCordon || n.act.Uncordon || n.act.Cordon || n.act.Drain || n.inflight {
			continue
		}
		switch n.st {
		case stDone, stUpdated, stPending, stPreparing, stPrepared:
			n.uncordon("")
		case stFailed:
			if n.healthy {
				n.uncordon("failed, healthy again")
			}
		}
	}

	// Status.
	for _, n := range nodes {
		switch n.st {
		case stDone, stUpdated:
			st.Updated++
		case stPreparing:
			st.Preparing++
		case stPrepared:
			st.Prepared++
		case stDraining, stSwitching, stVerifying:
			st.Switching++
		case stFailed:
			st.Failed++
			st.FailedNodes = append(st.FailedNodes, problem(n.name, n.failure))
		case stSkipped:
			switch {
			case n.in.NSN == nil:
				st.Blocked = append(st.Blocked, v1alpha1.NodeProblem{Node: n.name, Reason: "NoNodeSpawnNode", Message: "the controller has not created its NodeSpawnNode yet"})
			case n.extCordon:
				st.Blocked = append(st.Blocked, v1alpha1.NodeProblem{Node: n.name, Reason: "CordonedByOther", Message: "cordoned by someone else: left alone (not drained, not switched); uncordon it to let the rollout update it"})
			}
		}
		if n.unavailable {
			st.Unavailable++
		}
		if n.st == stDraining && n.in.DrainBlocked != "" {
			st.Blocked = append(st.Blocked, v1alpha1.NodeProblem{Node: n.name, Reason: "DrainBlocked", Message: n.in.DrainBlocked})
		}
		if n.st == stSwitching && !n.granted {
			st.Blocked = append(st.Blocked, v1alpha1.NodeProblem{Node: n.name, Reason: "EarlierGrantInFlight", Message: "a switch granted earlier (" + n.in.NSN.Spec.SwitchID + ") is finishing"})
		}
	}
	st.Waves = waveStatus(sizes, st.Updated, int32(failed), wave, lastHealthy)

	// Conditions.
	remaining := total - processed
	switch {
	case configProblem != "":
		setCond(st, r, v1alpha1.RolloutProgressing, false, "ConfigInvalid", configProblem)
	case windowErr != nil:
		setCond(st, r, v1alpha1.RolloutProgressing, false, "WindowInvalid", windowErr.Error())
	case halted:
		setCond(st, r, v1alpha1.RolloutProgressing, false, "Halted", "the failure budget is spent")
	case remaining == 0 && active == 0 && failed == 0:
		setCond(st, r, v1alpha1.RolloutProgressing, false, "Complete", fmt.Sprintf("all %d node(s) run %s", total, short(digest)))
	case remaining == 0 && active == 0:
		setCond(st, r, v1alpha1.RolloutProgressing, false, "NodesFailed", fmt.Sprintf("%d node(s) updated, %d failed", done, failed))
	case r.Spec.Paused:
		setCond(st, r, v1alpha1.RolloutProgressing, false, "Paused", "paused: no new prepare or switch; nodes in flight finish")
	case !inWindow:
		setCond(st, r, v1alpha1.RolloutProgressing, true, "OutsideWindow", "waiting for the maintenance window (opens "+windowNext.UTC().Format(time.RFC3339)+")")
	case soaking:
		setCond(st, r, v1alpha1.RolloutProgressing, true, "Soaking", fmt.Sprintf("wave %d soaks until %s", wave-1, lastHealthy.Add(durOr(r.Spec.Strategy.Soak, 0)).UTC().Format(time.RFC3339)))
	case budgetHeld && active == 0:
		setCond(st, r, v1alpha1.RolloutProgressing, true, "UnavailableBudgetHeld", fmt.Sprintf("%d node(s) already unavailable, maxUnavailable is %d: %s", unavailable, maxUnavail, unavailableNames(nodes)))
	default:
		setCond(st, r, v1alpha1.RolloutProgressing, true, "Rolling", fmt.Sprintf("wave %d: %d of %d node(s) done", wave, done, total))
	}
	complete := total > 0 && st.Updated == int32(total) && active == 0
	if complete {
		if setCond(st, r, v1alpha1.RolloutComplete, true, "AllNodesUpdated", fmt.Sprintf("all %d node(s) run %s", total, short(digest))) {
			p.Events = append(p.Events, Event{Reason: "Complete", Message: fmt.Sprintf("all %d node(s) run %s", total, short(digest))})
		}
	} else {
		setCond(st, r, v1alpha1.RolloutComplete, false, "InProgress", fmt.Sprintf("%d of %d node(s) updated", st.Updated, total))
	}

	// Actions, in node order.
	for _, n := range nodes {
		if n.touched {
			p.Actions = append(p.Actions, n.act)
		}
	}
	if !complete && !halted && configProblem == "" {
		wakeAt(now.Add(Resync))
	}
	for _, t := range wake {
		if d := t.Sub(now); p.RequeueAfter == 0 || d < p.RequeueAfter {
			p.RequeueAfter = d
		}
	}
	return p
}

// fail counts the node against the budget for this grant and records it
// in the annotation, so that it stays counted.
func (n *node) fail(reason, msg string) {
	n.st = stFailed
	n.failure = reason + ": " + msg
	n.newFailure = true
	n.setAnn(v1alpha1.AnnotationFailed, n.grant+" "+n.failure)
	n.event(true, "NodeFailed", n.failure)
}

func (n *node) grantSwitch(r *v1alpha1.NodeSpawnRollout, digest, grant string, now time.Time) {
	n.act.Spec = &v1alpha1.NodeSpawnNodeSpec{ConfigName: r.Spec.ConfigName, ConfigDigest: digest, Prepare: !n.byPrevious, Switch: true, SwitchID: grant}
	n.setAnn(v1alpha1.AnnotationSwitchGranted, now.UTC().Format(time.RFC3339))
	n.granted = true
	n.inflight = true
	n.event(false, "SwitchGranted", "switch to "+short(digest)+" granted ("+grant+")")
}

func (n *node) uncordon(why string) {
	n.act.Uncordon = true
	n.touched = true
	msg := "uncordoned"
	if why != "" {
		msg += ": " + why
	}
	n.event(false, "Uncordoned", msg)
}

func (n *node) setAnn(k, v string) {
	if n.act.Annotations == nil {
		n.act.Annotations = map[string]string{}
	}
	n.act.Annotations[k] = v
	n.touched = true
}

func (n *node) event(warning bool, reason, msg string) {
	n.act.Events = append(n.act.Events, Event{Warning: warning, Reason: reason, Message: msg})
	n.touched = true
}

// problem is a failed node as the rollout's status lists it: the first
// line of the failure (an agent's error may carry 30 lines of a kubelet
// journal, which stay in the node's NodeSpawnNode).
func problem(node, failure string) v1alpha1.NodeProblem {
	reason, msg, _ := strings.Cut(failure, ": ")
	if first, rest, ok := strings.Cut(msg, "\n"); ok && strings.TrimSpace(rest) != "" {
		msg = strings.TrimSpace(first) + " (more in NodeSpawnNode " + node + "'s status.lastError)"
	}
	return v1alpha1.NodeProblem{Node: node, Reason: reason, Message: msg}
}

func setCond(st *v1alpha1.NodeSpawnRolloutStatus, r *v1alpha1.NodeSpawnRollout, typ string, status bool, reason, msg string) (changed bool) {
	s := metav1.ConditionFalse
	if status {
		s = metav1.ConditionTrue
	}
	old := meta.FindStatusCondition(st.Conditions, typ)
	changed = old == nil || old.Status != s
	meta.SetStatusCondition(&st.Conditions, metav1.Condition{Type: typ, Status: s, Reason: reason, Message: msg, ObservedGeneration: r.Generation})
	return changed && status
}

func whyNot(r *v1alpha1.NodeSpawnRollout, configProblem string, windowErr error, halted, inWindow, soaking bool) string {
	switch {
	case configProblem != "":
		return configProblem
	case windowErr != nil:
		return windowErr.Error()
	case halted:
		return "halted"
	case r.Spec.Paused:
		return "paused"
	case !inWindow:
		return "outside the maintenance window"
	case soaking:
		return "soaking"
	}
	return "?"
}

func unavailableNames(nodes []*node) string {
	var names []string
	for _, n := range nodes {
		if n.unavailable {
			names = append(names, n.name)
		}
	}
	if len(names) > 10 {
		names = append(names[:10], fmt.Sprintf("and %d more", len(names)-10))
	}
	return strings.Join(names, ", ")
}

type gate struct {
	typ    corev1.NodeConditionType
	status corev1.ConditionStatus
}

func healthGates(hs []v1alpha1.HealthGate) []gate {
	gs := []gate{{corev1.NodeReady, corev1.ConditionTrue}}
	for _, h := range hs {
		if h.Type == string(corev1.NodeReady) {
			continue
		}
		s := corev1.ConditionFalse
		if h.Status != "" {
			s = corev1.ConditionStatus(h.Status)
		}
		gs = append(gs, gate{corev1.NodeConditionType(h.Type), s})
	}
	return gs
}

func gatesPass(n *corev1.Node, gs []gate) bool {
	for _, g := range gs {
		if !conditionIs(n, g.typ, g.status) {
			return false
		}
	}
	return true
}

func unhealthy(n *corev1.Node, gs []gate) string {
	var bad []string
	for _, g := range gs {
		if !conditionIs(n, g.typ, g.status) {
			got := "missing"
			for _, c := range n.Status.Conditions {
				if c.Type == g.typ {
					got = string(c.Status)
				}
			}
			bad = append(bad, fmt.Sprintf("%s is %s, want %s", g.typ, got, g.status))
		}
	}
	return strings.Join(bad, "; ")
}

func conditionIs(n *corev1.Node, t corev1.NodeConditionType, s corev1.ConditionStatus) bool {
	for _, c := range n.Status.Conditions {
		if c.Type == t {
			return c.Status == s
		}
	}
	return false
}

// healthySince is when a done node last became healthy: the latest of its
// switch's end and its gate conditions' transitions.
func healthySince(n *node, gs []gate) time.Time {
	var t time.Time
	if s := n.in.NSN.Status.SwitchFinished; s != nil {
		t = s.Time
	}
	for _, g := range gs {
		for _, c := range n.in.Node.Status.Conditions {
			if c.Type == g.typ && c.LastTransitionTime.After(t) {
				t = c.LastTransitionTime.Time
			}
		}
	}
	return t
}

func prepareRequested(nsn *v1alpha1.NodeSpawnNode, digest string) (time.Time, bool) {
	d, ts, ok := strings.Cut(nsn.Annotations[v1alpha1.AnnotationPrepareRequested], " ")
	if !ok || d != digest {
		return time.Time{}, false
	}
	return parseTime(ts)
}

func parseTime(s string) (time.Time, bool) {
	t, err := time.Parse(time.RFC3339, s)
	return t, err == nil
}

func durOr(d *metav1.Duration, def time.Duration) time.Duration {
	if d == nil || d.Duration <= 0 {
		return def
	}
	return d.Duration
}

func orNone(s string) string {
	if s == "" {
		return "(none reported)"
	}
	return s
}

func short(digest string) string {
	if len(digest) > 19 {
		return digest[:19]
	}
	return digest
}

// scaled resolves a count or percent of total (percent rounded up or
// down), at least min.
func scaled(v *intstr.IntOrString, total int, roundUp bool, min int) int {
	n := min
	if v != nil {
		if x, err := intstr.GetScaledValueFromIntOrPercent(v, total, roundUp); err == nil {
			n = x
		}
	}
	if n < min {
		n = min
	}
	return n
}

// waveSizes splits total nodes into waves: the explicit sizes (the last
// wave takes the rest), else waves of maxUnavailable.
func waveSizes(waves []intstr.IntOrString, total, maxUnavail int) []int {
	var sizes []int
	left := total
	for i := range waves {
		if left <= 0 {
			break
		}
		s := scaled(&waves[i], total, true, 1)
		if s > left || i == len(waves)-1 {
			s = left
		}
		sizes = append(sizes, s)
		left -= s
	}
	for left > 0 {
		s := min(maxUnavail, left)
		sizes = append(sizes, s)
		left -= s
	}
	if len(sizes) == 0 {
		sizes = []int{0}
	}
	return sizes
}

func waveStatus(sizes []int, updated, failed int32, current int, lastHealthy time.Time) []v1alpha1.WaveStatus {
	ws := make([]v1alpha1.WaveStatus, len(sizes))
	u, f := updated, failed
	for i, s := range sizes {
		w := v1alpha1.WaveStatus{Index: int32(i), Size: int32(s)}
		w.Failed = min(f, w.Size)
		f -= w.Failed
		w.Updated = min(u, w.Size-w.Failed)
		u -= w.Updated
		if i == current-1 && !lastHealthy.IsZero() {
			t := metav1.NewTime(lastHealthy)
			w.SoakedAt = &t
		}
		ws[i] = w
	}
	return ws
}
