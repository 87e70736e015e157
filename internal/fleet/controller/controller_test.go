package controller_test

// The controller against a real kube-apiserver and etcd (internal/kubetest),
// with the real agent over scripted hosts (fixture_test.go). Each test is
// one claim of issue 23's "How it is proven".

import (
	"fmt"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	eventsv1 "k8s.io/api/events/v1"
	policyv1 "k8s.io/api/policy/v1"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"sigs.k8s.io/controller-runtime/pkg/client"

	v1alpha1 "github.com/nodespawn/nodespawn/api/v1alpha1"
	"github.com/nodespawn/nodespawn/internal/fleet/planner"
	"github.com/nodespawn/nodespawn/internal/kubetest"
)

func intOrStr(i int32) *intstr.IntOrString {
	v := intstr.FromInt32(i)
	return &v
}

// checkAllUpdated: every node switched exactly once (one grant: one
// distinct switchID, that of the rollout's generation, acted on once),
// runs the new config, and is schedulable without the controller's marks.
func (f *fixture) checkAllUpdated(ro string, nodes []string) {
	f.t.Helper()
	grant := planner.GrantID(f.getRollout(ro))
	for _, n := range nodes {
		h := f.hosts[n]
		if sw := h.switches(); len(sw) != 1 || sw[0] != f.newDigest {
			f.t.Errorf("%s: switched %d time(s) %v; want once to the new config", n, len(sw), sw)
		}
		if ids := h.grants(); len(ids) != 1 || ids[0] != grant {
			f.t.Errorf("%s: acted on switch grants %v; want only %s", n, ids, grant)
		}
		nsn := f.getNSN(n)
		if nsn.Status.Phase != v1alpha1.PhaseReady || nsn.Status.ActiveDigest != f.newDigest || nsn.Status.SwitchID != grant {
			f.t.Errorf("%s: status phase=%s active=%s switchID=%s; want Ready on the new config by %s", n, nsn.Status.Phase, short(nsn.Status.ActiveDigest), nsn.Status.SwitchID, grant)
		}
	}
	f.poll("the updated nodes uncordoned", 20*time.Second, func() (bool, string) {
		for _, n := range nodes {
			node := f.getNode(n)
			if node.Spec.Unschedulable || node.Annotations[v1alpha1.AnnotationCordonedBy] != "" || node.Annotations[v1alpha1.AnnotationCordonedAt] != "" {
				return false, fmt.Sprintf("%s: unschedulable=%v annotations=%v", n, node.Spec.Unschedulable, node.Annotations)
			}
		}
		return true, ""
	})
}

// (1) A 6-node rollout with maxUnavailable 2 completes, and no snapshot of
// the Nodes ever shows more than 2 cordoned or NotReady; one node's agent
// dies mid-switch and finishes after its restart.
func TestMaxUnavailableIsNeverExceeded(t *testing.T) {
	f := newFixture(t)
	var nodes []string
	for i := range 6 {
		o := nodeOpts{switchTime: 300 * time.Millisecond}
		if i == 3 {
			o.behaviour, o.crashPause = crash, 2*time.Second
		}
		nodes = append(nodes, f.addNode(fmt.Sprintf("n%d", i), o))
	}
	f.startController(leaderElection{})
	f.waitEnrolled()
	var mu sync.Mutex
	peak := 0
	s := f.sample(unavailableCheck(2, &peak, &mu))
	ro := f.rollout(func(s *v1alpha1.NodeSpawnRolloutSpec) { s.Strategy.MaxUnavailable = intOrStr(2) })
	got := f.waitRollout(ro, "Complete", 50*time.Second, complete)
	errs, samples := s.stop()
	for _, e := range errs {
		t.Error(e)
	}
	mu.Lock()
	t.Logf("%d snapshots of the Nodes; at most %d unavailable at once; at most %d switching at once", samples, peak, f.maxInSwitch)
	if peak == 0 {
		t.Errorf("no snapshot saw a node cordoned or NotReady: the sampling missed the rollout")
	}
	mu.Unlock()
	f.mu.Lock()
	if f.maxInSwitch > 2 {
		t.Errorf("%d nodes were switching at once; maxUnavailable is 2", f.maxInSwitch)
	}
	f.mu.Unlock()
	if got.Status.Updated != 6 || got.Status.Failed != 0 || got.Status.Nodes != 6 {
		t.Errorf("status %s; want 6 of 6 updated", describeRollout(got))
	}
	if c := meta.FindStatusCondition(got.Status.Conditions, v1alpha1.RolloutProgressing); c == nil || c.Status != metav1.ConditionFalse || c.Reason != "Complete" {
		t.Errorf("Progressing %+v; want False, Complete", c)
	}
	f.checkAllUpdated(ro, nodes)
}

// (2) With failureBudget 2, the rollout halts exactly when the second
// node fails (not at the first), says so (Halted, an Event, the metric),
// grants no switch after it, and lets the switch in flight finish.
func TestHaltsExactlyAtTheFailureBudget(t *testing.T) {
	f := newFixture(t)
	holds := []chan struct{}{make(chan struct{}), make(chan struct{}), make(chan struct{})}
	// The first wave (3 nodes: maxUnavailable 3) is n0, n1, n2: n0 and
	// n1 roll back, n2 succeeds; each switch waits for its hold, so that
	// all three are in flight before the first failure.
	n0 := f.addNode("n0", nodeOpts{behaviour: rollBack, hold: holds[0]})
	n1 := f.addNode("n1", nodeOpts{behaviour: rollBack, hold: holds[1]})
	n2 := f.addNode("n2", nodeOpts{hold: holds[2]})
	rest := []string{f.addNode("n3", nodeOpts{}), f.addNode("n4", nodeOpts{}), f.addNode("n5", nodeOpts{})}
	ctl := f.startController(leaderElection{})
	f.waitEnrolled()
	ro := f.rollout(func(s *v1alpha1.NodeSpawnRolloutSpec) {
		s.Strategy.MaxUnavailable = intOrStr(3)
		s.FailureBudget = 2
	})

	// Every status the controller writes: Halted is True exactly when
	// the failed count has reached the budget.
	var smu sync.Mutex
	var statusErrs []string
	stopStatus := make(chan struct{})
	statusDone := make(chan struct{})
	go func() {
		defer close(statusDone)
		for {
			var r v1alpha1.NodeSpawnRollout
			if err := f.c.Client.Get(f.ctx, client.ObjectKey{Name: ro}, &r); err == nil && r.Status.ObservedGeneration == r.Generation {
				halted := condIs(&r, v1alpha1.RolloutHalted, metav1.ConditionTrue)
				if halted != (r.Status.Failed >= 2) {
					smu.Lock()
					statusErrs = append(statusErrs, fmt.Sprintf("Halted=%v with %d failed (budget 2): %s", halted, r.Status.Failed, describeRollout(&r)))
					smu.Unlock()
				}
			}
			select {
			case <-stopStatus:
				return
			case <-time.After(20 * time.Millisecond):
			}
		}
	}()
	t.Cleanup(func() {
		select {
		case <-stopStatus:
		default:
			close(stopStatus)
		}
		<-statusDone
	})

	for _, n := range []string{n0, n1, n2} {
		select {
		case <-f.hosts[n].started:
		case <-time.After(40 * time.Second):
			t.Fatalf("%s was not granted its switch: %s", n, describeRollout(f.getRollout(ro)))
		}
	}
	close(holds[0])
	st := f.waitRollout(ro, "one failure counted", 30*time.Second, func(r *v1alpha1.NodeSpawnRollout) bool {
		return r.Status.ObservedGeneration == r.Generation && r.Status.Failed == 1
	})
	if !condIs(st, v1alpha1.RolloutHalted, metav1.ConditionFalse) {
		t.Errorf("one failure with budget 2: %s; want not halted", describeRollout(st))
	}
	close(holds[1])
	st = f.waitRollout(ro, "Halted", 30*time.Second, func(r *v1alpha1.NodeSpawnRollout) bool {
		return condIs(r, v1alpha1.RolloutHalted, metav1.ConditionTrue)
	})
	t.Logf("halted: %s", describeRollout(st))
	if c := meta.FindStatusCondition(st.Status.Conditions, v1alpha1.RolloutHalted); c.Reason != "FailureBudgetSpent" || !strings.Contains(c.Message, "2 node(s) failed, failureBudget is 2") {
		t.Errorf("Halted %+v; want FailureBudgetSpent, 2 failed", c)
	}
	if st.Status.Failed != 2 || len(st.Status.FailedNodes) != 2 ||
		st.Status.FailedNodes[0].Node != n0 || st.Status.FailedNodes[1].Node != n1 ||
		st.Status.FailedNodes[0].Reason != "RolledBack" || st.Status.FailedNodes[1].Reason != "RolledBack" {
		t.Errorf("at the halt: %s; want %s and %s failed, RolledBack", describeRollout(st), n0, n1)
	}

	// n2 was in flight at the halt: it finishes, counts as updated and
	// is uncordoned; the failed nodes, healthy again, are uncordoned.
	close(holds[2])
	f.waitNSN(n2, "Ready on the new config", 30*time.Second, func(n *v1alpha1.NodeSpawnNode) bool {
		return n.Status.Phase == v1alpha1.PhaseReady && n.Status.ActiveDigest == f.newDigest
	})
	st = f.waitRollout(ro, "the in-flight node counted as updated", 30*time.Second, func(r *v1alpha1.NodeSpawnRollout) bool {
		return r.Status.Updated == 1 && r.Status.Switching == 0
	})
	f.poll("the wave's nodes uncordoned", 30*time.Second, func() (bool, string) {
		for _, n := range []string{n0, n1, n2} {
			if node := f.getNode(n); node.Spec.Unschedulable {
				return false, n + " is still cordoned"
			}
		}
		return true, ""
	})
	// Poke: a label on every remaining Node makes the controller look
	// again; still no new grant, prepare or cordon.
	for _, n := range rest {
		node := f.getNode(n)
		base := node.DeepCopy()
		node.Labels["test.nodespawn.dev/poke"] = "1"
		if err := f.c.Client.Patch(f.ctx, node, client.MergeFrom(base)); err != nil {
			t.Fatal(err)
		}
	}
	sleep(f.ctx, 2*time.Second)
	for _, n := range rest {
		nsn := f.getNSN(n)
		if nsn.Spec.Switch || nsn.Spec.Prepare {
			t.Errorf("%s after the halt: spec %+v annotations %v; want no prepare or switch granted", n, nsn.Spec, nsn.Annotations)
		}
		if sw := f.hosts[n].switches(); len(sw) != 0 {
			t.Errorf("%s switched %v after the halt", n, sw)
		}
		if node := f.getNode(n); node.Spec.Unschedulable {
			t.Errorf("%s cordoned after the halt", n)
		}
	}
	for _, n := range []string{n0, n1} {
		if sw := f.hosts[n].switches(); len(sw) != 1 {
			t.Errorf("%s switched %d times; want once (no second grant after its failure)", n, len(sw))
		}
	}
	if st := f.getRollout(ro); st.Status.Failed != 2 || !condIs(st, v1alpha1.RolloutHalted, metav1.ConditionTrue) {
		t.Errorf("after the halt: %s", describeRollout(st))
	}
	close(stopStatus)
	<-statusDone
	smu.Lock()
	for _, e := range statusErrs {
		t.Error(e)
	}
	smu.Unlock()

	// An Event says so, and the metric.
	f.poll("the Halted Event", 30*time.Second, func() (bool, string) {
		var l eventsv1.EventList
		if err := f.c.Client.List(f.ctx, &l, client.InNamespace(metav1.NamespaceDefault)); err != nil {
			return false, err.Error()
		}
		var seen []string
		for _, e := range l.Items {
			if e.Regarding.Name == ro {
				if e.Reason == "Halted" && e.Type == corev1.EventTypeWarning {
					return true, ""
				}
				seen = append(seen, e.Reason)
			}
		}
		return false, fmt.Sprintf("events of the rollout: %v", seen)
	})
	if v, ok := gaugeValue(t, ctl, "nodespawn_rollout_halted", map[string]string{"rollout": ro}); !ok || v != 1 {
		t.Errorf("nodespawn_rollout_halted{rollout=%s} = %v (found %v); want 1", ro, v, ok)
	}
}

// gaugeValue reads a gauge from the controller's registry.
func gaugeValue(t *testing.T, h *controllerHandle, name string, labels map[string]string) (float64, bool) {
	mfs, err := h.reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
	metric:
		for _, m := range mf.GetMetric() {
			for k, v := range labels {
				found := false
				for _, lp := range m.GetLabel() {
					if lp.GetName() == k && lp.GetValue() == v {
						found = true
					}
				}
				if !found {
					continue metric
				}
			}
			return m.GetGauge().GetValue(), true
		}
	}
	return 0, false
}

// workload makes a namespace, a ReplicaSet and its pod running on node
// (Running and Ready through the status subresource: no kubelet here), and
// a stand-in for the kubelet that finishes deleting evicted pods.
type workload struct {
	ns, pod string
	labels  map[string]string
}

func (f *fixture) workload(node, app string) workload {
	f.t.Helper()
	ns := kubetest.NameFor(f.t, "ns")
	var existing corev1.Namespace
	if err := f.c.Client.Get(f.ctx, client.ObjectKey{Name: ns}, &existing); err != nil {
		f.create(&corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}})
		f.kubelet(ns)
	}
	labels := map[string]string{"app": app}
	one := int32(1)
	rs := &appsv1.ReplicaSet{ObjectMeta: metav1.ObjectMeta{Name: app, Namespace: ns}, Spec: appsv1.ReplicaSetSpec{
		Replicas: &one,
		Selector: &metav1.LabelSelector{MatchLabels: labels},
		Template: corev1.PodTemplateSpec{ObjectMeta: metav1.ObjectMeta{Labels: labels},
			Spec: corev1.PodSpec{Containers: []corev1.Container{{Name: "c", Image: "registry.invalid/app"}}}},
	}}
	f.create(rs)
	yes := true
	pod := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Name: app + "-1", Namespace: ns, Labels: labels,
		OwnerReferences: []metav1.OwnerReference{{APIVersion: "apps/v1", Kind: "ReplicaSet", Name: rs.Name, UID: rs.UID, Controller: &yes}}},
		Spec: corev1.PodSpec{NodeName: node, Containers: []corev1.Container{{Name: "c", Image: "registry.invalid/app"}}}}
	f.create(pod)
	pod.Status.Phase = corev1.PodRunning
	pod.Status.Conditions = []corev1.PodCondition{{Type: corev1.PodReady, Status: corev1.ConditionTrue}}
	if err := f.c.Client.Status().Update(f.ctx, pod); err != nil {
		f.t.Fatal(err)
	}
	return workload{ns: ns, pod: pod.Name, labels: labels}
}

// kubelet finishes the deletion of the namespace's terminating pods, as a
// node's kubelet does once their containers stopped.
func (f *fixture) kubelet(ns string) {
	go func() {
		for f.ctx.Err() == nil {
			var l corev1.PodList
			if err := f.c.Client.List(f.ctx, &l, client.InNamespace(ns)); err == nil {
				for i := range l.Items {
					if l.Items[i].DeletionTimestamp != nil {
						_ = f.c.Client.Delete(f.ctx, &l.Items[i], client.GracePeriodSeconds(0))
					}
				}
			}
			sleep(f.ctx, 100*time.Millisecond)
		}
	}()
}

func (f *fixture) podTerminating(w workload) (bool, bool) {
	var p corev1.Pod
	if err := f.c.Client.Get(f.ctx, client.ObjectKey{Namespace: w.ns, Name: w.pod}, &p); err != nil {
		return false, false
	}
	return true, p.DeletionTimestamp != nil
}

// (3) A drain blocked by a PodDisruptionBudget names the pod in
// status.blocked and grants no switch; when the budget allows, the drain
// goes on and the rollout completes.
func TestPDBBlockedDrainIsReported(t *testing.T) {
	f := newFixture(t)
	n0 := f.addNode("n0", nodeOpts{})
	n1 := f.addNode("n1", nodeOpts{})
	w, pdb := f.guardedWorkload(n0)
	f.startController(leaderElection{})
	f.waitEnrolled()
	ro := f.rollout(func(s *v1alpha1.NodeSpawnRolloutSpec) {
		s.Disruption.Timeout = &metav1.Duration{Duration: 10 * time.Minute}
	})
	want := w.ns + "/" + w.pod
	st := f.waitRollout(ro, "the blocked drain reported", 30*time.Second, func(r *v1alpha1.NodeSpawnRollout) bool {
		for _, b := range r.Status.Blocked {
			if b.Node == n0 && b.Reason == "DrainBlocked" && strings.Contains(b.Message, want) {
				return true
			}
		}
		return false
	})
	t.Logf("blocked: %+v", st.Status.Blocked)
	for _, b := range st.Status.Blocked {
		if b.Node == n0 && !strings.Contains(b.Message, "disruption budget") {
			t.Errorf("blocked %+v: want the PodDisruptionBudget's refusal", b)
		}
	}
	if nsn := f.getNSN(n0); nsn.Spec.Switch {
		t.Errorf("%s granted a switch with its drain blocked: %+v", n0, nsn.Spec)
	}
	if exists, term := f.podTerminating(w); !exists || term {
		t.Errorf("the guarded pod: exists %v, terminating %v; want it running", exists, term)
	}
	if node := f.getNode(n0); !node.Spec.Unschedulable || node.Annotations[v1alpha1.AnnotationCordonedBy] != ro {
		t.Errorf("%s: unschedulable %v, annotations %v; want cordoned by %s", n0, node.Spec.Unschedulable, node.Annotations, ro)
	}
	if node := f.getNode(n1); node.Spec.Unschedulable {
		t.Errorf("%s cordoned while %s holds maxUnavailable 1", n1, n0)
	}

	// Another replica became healthy: one disruption allowed. The next
	// eviction (retried every planner.DrainRetry) goes through.
	pdb.Status.DisruptionsAllowed, pdb.Status.CurrentHealthy, pdb.Status.ExpectedPods = 1, 2, 2
	if err := f.c.Client.Status().Update(f.ctx, pdb); err != nil {
		t.Fatal(err)
	}
	st = f.waitRollout(ro, "Complete", 50*time.Second, complete)
	if len(st.Status.Blocked) != 0 {
		t.Errorf("blocked %+v after completion", st.Status.Blocked)
	}
	if exists, _ := f.podTerminating(w); exists {
		t.Errorf("the guarded pod was not evicted")
	}
	f.checkAllUpdated(ro, []string{n0, n1})
}

// (4) A node someone else cordoned (no rollout's mark) is left alone: not
// drained, not switched, never uncordoned, listed as CordonedByOther, and
// the rollout is not Complete; uncordoned by its owner, it is updated.
func TestNodeCordonedBySomeoneElseIsLeftAlone(t *testing.T) {
	f := newFixture(t)
	n0 := f.addNode("n0", nodeOpts{})
	n1 := f.addNode("n1", nodeOpts{cordoned: true})
	n2 := f.addNode("n2", nodeOpts{})
	w := f.workload(n1, "theirs")
	f.startController(leaderElection{})
	f.waitEnrolled()
	var mu sync.Mutex
	peak := 0
	unavail := unavailableCheck(2, &peak, &mu)
	s := f.sample(func(nodes []corev1.Node) []string {
		errs := unavail(nodes)
		for _, n := range nodes {
			if n.Name == n1 && (!n.Spec.Unschedulable || n.Annotations[v1alpha1.AnnotationCordonedBy] != "") {
				errs = append(errs, fmt.Sprintf("%s: unschedulable %v, annotations %v; want left cordoned, unmarked", n1, n.Spec.Unschedulable, n.Annotations))
			}
		}
		return errs
	})
	ro := f.rollout(func(s *v1alpha1.NodeSpawnRolloutSpec) { s.Strategy.MaxUnavailable = intOrStr(2) })
	st := f.waitRollout(ro, "the other nodes updated, "+n1+" blocked", 50*time.Second, func(r *v1alpha1.NodeSpawnRollout) bool {
		blocked := false
		for _, b := range r.Status.Blocked {
			blocked = blocked || (b.Node == n1 && b.Reason == "CordonedByOther")
		}
		return r.Status.Updated == 2 && r.Status.Switching == 0 && blocked
	})
	if complete(st) {
		t.Errorf("Complete with %s not updated: %s", n1, describeRollout(st))
	}
	// The controller has looked at n1 on every reconcile since: a second
	// more, then nothing may have touched it.
	sleep(f.ctx, time.Second)
	errs, _ := s.stop()
	for _, e := range errs {
		t.Error(e)
	}
	if nsn := f.getNSN(n1); nsn.Spec.Switch {
		t.Errorf("%s granted a switch: %+v", n1, nsn.Spec)
	}
	if sw := f.hosts[n1].switches(); len(sw) != 0 {
		t.Errorf("%s switched %v", n1, sw)
	}
	if exists, term := f.podTerminating(w); !exists || term {
		t.Errorf("the pod on %s: exists %v, terminating %v; want it left running (not drained)", n1, exists, term)
	}

	// Its owner uncordons it: the rollout takes it (cordon, drain,
	// switch) and completes.
	node := f.getNode(n1)
	base := node.DeepCopy()
	node.Spec.Unschedulable = false
	if err := f.c.Client.Patch(f.ctx, node, client.MergeFrom(base)); err != nil {
		t.Fatal(err)
	}
	f.waitRollout(ro, "Complete", 50*time.Second, complete)
	if exists, _ := f.podTerminating(w); exists {
		t.Errorf("the pod on %s was not drained once the rollout took the node", n1)
	}
	f.checkAllUpdated(ro, []string{n0, n1, n2})
}

// (5) The leader dies mid-wave (its switch granted and under way, another
// node's agent crashed mid-switch); the other replica takes over through
// the Lease and completes the rollout: maxUnavailable held throughout, no
// node switched twice, one grant per node.
func TestLeaderFailoverMidWaveLosesNothing(t *testing.T) {
	f := newFixture(t)
	hold := make(chan struct{})
	var nodes []string
	for i := range 6 {
		o := nodeOpts{}
		switch i {
		case 0:
			o.hold = hold
		case 1:
			o.behaviour, o.crashPause = crash, 3*time.Second
		}
		nodes = append(nodes, f.addNode(fmt.Sprintf("n%d", i), o))
	}
	id := kubetest.NameFor(t, "lease")
	leader := f.startController(leaderElection{ID: id})
	select {
	case <-leader.mgr.Elected():
	case <-time.After(40 * time.Second):
		t.Fatal("the first controller was not elected")
	}
	standby := f.startController(leaderElection{ID: id})
	f.waitEnrolled()
	var mu sync.Mutex
	peak := 0
	s := f.sample(unavailableCheck(2, &peak, &mu))
	ro := f.rollout(func(s *v1alpha1.NodeSpawnRolloutSpec) { s.Strategy.MaxUnavailable = intOrStr(2) })
	select {
	case <-f.hosts[nodes[0]].started:
	case <-time.After(40 * time.Second):
		t.Fatalf("%s was not granted its switch: %s", nodes[0], describeRollout(f.getRollout(ro)))
	}
	select {
	case <-standby.mgr.Elected():
		t.Fatal("the standby was elected while the leader ran")
	default:
	}
	leader.stop(t)
	close(hold)
	select {
	case <-standby.mgr.Elected():
	case <-time.After(40 * time.Second):
		t.Fatal("the standby did not take over")
	}
	got := f.waitRollout(ro, "Complete", 50*time.Second, complete)
	errs, _ := s.stop()
	for _, e := range errs {
		t.Error(e)
	}
	mu.Lock()
	t.Logf("at most %d nodes unavailable at once", peak)
	mu.Unlock()
	if got.Status.Updated != 6 {
		t.Errorf("status %s", describeRollout(got))
	}
	f.checkAllUpdated(ro, nodes)
}

// (6) After completion the controller has uncordoned every node it
// cordoned, only after that node ran the new config, and never touched
// a node someone else cordoned (here one already on the new config, which
// counts as updated and stays cordoned).
func TestUncordonsOnlyWhatItCordoned(t *testing.T) {
	f := newFixture(t)
	theirs := f.addNode("n0", nodeOpts{cordoned: true, active: f.newDigest})
	mine := []string{f.addNode("n1", nodeOpts{}), f.addNode("n2", nodeOpts{}), f.addNode("n3", nodeOpts{})}
	f.startController(leaderElection{})
	f.waitEnrolled()
	ro := kubetest.NameFor(t, "ro")
	var mu sync.Mutex
	cordonedByUs := map[string]bool{}
	var uncordoned []string
	s := f.sample(func(nodes []corev1.Node) []string {
		var errs []string
		for _, n := range nodes {
			by := n.Annotations[v1alpha1.AnnotationCordonedBy]
			if n.Name == theirs {
				if !n.Spec.Unschedulable || by != "" {
					errs = append(errs, fmt.Sprintf("%s: unschedulable %v, cordoned-by %q; want left as its owner cordoned it", theirs, n.Spec.Unschedulable, by))
				}
				continue
			}
			mu.Lock()
			switch {
			case n.Spec.Unschedulable && by != ro:
				errs = append(errs, fmt.Sprintf("%s cordoned without the rollout's mark (cordoned-by %q)", n.Name, by))
			case n.Spec.Unschedulable:
				cordonedByUs[n.Name] = true
			case cordonedByUs[n.Name]:
				// Uncordoned since: the node ran the new config
				// before (its status is read after the Node).
				delete(cordonedByUs, n.Name)
				uncordoned = append(uncordoned, n.Name)
				var nsn v1alpha1.NodeSpawnNode
				if err := f.c.Client.Get(f.ctx, client.ObjectKey{Name: n.Name}, &nsn); err == nil && nsn.Status.ActiveDigest != f.newDigest {
					errs = append(errs, fmt.Sprintf("%s uncordoned while it runs %s", n.Name, short(nsn.Status.ActiveDigest)))
				}
			}
			mu.Unlock()
		}
		return errs
	})
	f.rollout(func(s *v1alpha1.NodeSpawnRolloutSpec) { s.Strategy.MaxUnavailable = intOrStr(2) })
	got := f.waitRollout(ro, "Complete", 50*time.Second, complete)
	f.checkAllUpdated(ro, mine)
	errs, _ := s.stop()
	for _, e := range errs {
		t.Error(e)
	}
	mu.Lock()
	t.Logf("uncordoned by the controller, in order: %v", uncordoned)
	mu.Unlock()
	if got.Status.Updated != 4 {
		t.Errorf("status %s; want all 4 updated (%s was already)", describeRollout(got), theirs)
	}
	node := f.getNode(theirs)
	if !node.Spec.Unschedulable || node.Annotations[v1alpha1.AnnotationCordonedBy] != "" || node.Annotations[v1alpha1.AnnotationCordonedAt] != "" {
		t.Errorf("%s after the rollout: unschedulable %v, annotations %v; want cordoned by its owner, unmarked", theirs, node.Spec.Unschedulable, node.Annotations)
	}
	if sw := f.hosts[theirs].switches(); len(sw) != 0 {
		t.Errorf("%s switched %v", theirs, sw)
	}
}

// (7) A switch that hangs counts against the budget once phaseTimeout
// has passed since its grant: the rollout halts and the next node is not
// touched.
func TestHungSwitchCountsAfterPhaseTimeout(t *testing.T) {
	f := newFixture(t)
	n0 := f.addNode("n0", nodeOpts{behaviour: hang})
	n1 := f.addNode("n1", nodeOpts{})
	f.startController(leaderElection{})
	f.waitEnrolled()
	ro := f.rollout(func(s *v1alpha1.NodeSpawnRolloutSpec) {
		s.Strategy.PhaseTimeout = &metav1.Duration{Duration: 3 * time.Second}
	})
	select {
	case <-f.hosts[n0].started:
	case <-time.After(40 * time.Second):
		t.Fatalf("%s was not granted its switch: %s", n0, describeRollout(f.getRollout(ro)))
	}
	st := f.waitRollout(ro, "Halted", 30*time.Second, func(r *v1alpha1.NodeSpawnRollout) bool {
		return condIs(r, v1alpha1.RolloutHalted, metav1.ConditionTrue)
	})
	if len(st.Status.FailedNodes) != 1 || st.Status.FailedNodes[0].Node != n0 || st.Status.FailedNodes[0].Reason != "PhaseTimeout" {
		t.Errorf("failed nodes %+v; want %s, PhaseTimeout", st.Status.FailedNodes, n0)
	}
	if nsn := f.getNSN(n0); nsn.Status.Phase != v1alpha1.PhaseSwitching || !strings.HasPrefix(nsn.Annotations[v1alpha1.AnnotationFailed], ro+"/1 PhaseTimeout") {
		t.Errorf("%s: phase %s, failed annotation %q", n0, nsn.Status.Phase, nsn.Annotations[v1alpha1.AnnotationFailed])
	}
	if nsn := f.getNSN(n1); nsn.Spec.Switch {
		t.Errorf("%s granted a switch after the halt: %+v", n1, nsn.Spec)
	}
	if sw := f.hosts[n1].switches(); len(sw) != 0 {
		t.Errorf("%s switched %v", n1, sw)
	}
	// The hung node is not uncordoned (not healthy): its cordon stays.
	if node := f.getNode(n0); !node.Spec.Unschedulable {
		t.Errorf("%s uncordoned while its switch hangs", n0)
	}
}

// TestDeletingARolloutStopsIt: a rollout deleted while its drain is
// blocked leaves no trace: its cordon is undone and the node's
// NodeSpawnNode no longer asks for a prepare or a switch, nor names it.
func TestDeletingARolloutStopsIt(t *testing.T) {
	f := newFixture(t)
	n0 := f.addNode("n0", nodeOpts{})
	f.guardedWorkload(n0)
	f.startController(leaderElection{})
	f.waitEnrolled()
	ro := f.rollout(func(s *v1alpha1.NodeSpawnRolloutSpec) {
		s.Disruption.Timeout = &metav1.Duration{Duration: 10 * time.Minute}
	})
	f.waitRollout(ro, "the drain blocked", 30*time.Second, func(r *v1alpha1.NodeSpawnRollout) bool {
		return len(r.Status.Blocked) > 0
	})
	if node := f.getNode(n0); node.Annotations[v1alpha1.AnnotationCordonedBy] != ro {
		t.Fatalf("%s not cordoned by %s: %v", n0, ro, node.Annotations)
	}
	if nsn := f.getNSN(n0); nsn.Labels[v1alpha1.LabelRollout] != ro || !nsn.Spec.Prepare {
		t.Fatalf("%s's NodeSpawnNode before the deletion: labels %v, spec %+v; want the rollout's prepare", n0, nsn.Labels, nsn.Spec)
	}
	if err := f.c.Client.Delete(f.ctx, &v1alpha1.NodeSpawnRollout{ObjectMeta: metav1.ObjectMeta{Name: ro}}); err != nil {
		t.Fatal(err)
	}
	f.poll("the deleted rollout's cordon and requests undone", 30*time.Second, func() (bool, string) {
		node, nsn := f.getNode(n0), f.getNSN(n0)
		s := fmt.Sprintf("node unschedulable %v, annotations %v; NodeSpawnNode labels %v, spec %+v", node.Spec.Unschedulable, node.Annotations, nsn.Labels, nsn.Spec)
		return !node.Spec.Unschedulable && node.Annotations[v1alpha1.AnnotationCordonedBy] == "" &&
			nsn.Labels[v1alpha1.LabelRollout] == "" && !nsn.Spec.Prepare && !nsn.Spec.Switch, s
	})
	if g := f.hosts[n0].switches(); len(g) != 0 {
		t.Errorf("%s switched: %v", n0, g)
	}
}

// guardedWorkload runs a pod on node under a PodDisruptionBudget that
// allows no disruption, as the disruption controller (none runs here)
// would say of 1 healthy pod of 1 needed.
func (f *fixture) guardedWorkload(node string) (workload, *policyv1.PodDisruptionBudget) {
	f.t.Helper()
	w := f.workload(node, "guarded")
	pdb := &policyv1.PodDisruptionBudget{ObjectMeta: metav1.ObjectMeta{Name: "guarded", Namespace: w.ns}, Spec: policyv1.PodDisruptionBudgetSpec{
		MinAvailable: intOrStr(1), Selector: &metav1.LabelSelector{MatchLabels: w.labels}}}
	f.create(pdb)
	pdb.Status = policyv1.PodDisruptionBudgetStatus{ObservedGeneration: pdb.Generation, DisruptionsAllowed: 0, CurrentHealthy: 1, DesiredHealthy: 1, ExpectedPods: 1}
	if err := f.c.Client.Status().Update(f.ctx, pdb); err != nil {
		f.t.Fatal(err)
	}
	return w, pdb
}

// TestNewerRolloutSupersedesAnOlder: a rollout created over nodes an
// older one holds takes them over. The older lets go at once of a node
// whose drain is blocked (its cordon undone, its prepare withdrawn), and
// of a node in the middle of its switch only when the switch has ended
// (until then neither touches it); it lists both as SupersededByRollout
// and completes over the node it keeps. The newer updates the two it took.
func TestNewerRolloutSupersedesAnOlder(t *testing.T) {
	f := newFixture(t)
	hold := make(chan struct{})
	pick := map[string]string{"nodespawn.test/pick": "newer"}
	n0 := f.addNode("n0", nodeOpts{labels: pick})
	n1 := f.addNode("n1", nodeOpts{labels: pick, hold: hold})
	n2 := f.addNode("n2", nodeOpts{})
	f.guardedWorkload(n0)
	f.startController(leaderElection{})
	f.waitEnrolled()
	older := f.rollout(func(s *v1alpha1.NodeSpawnRolloutSpec) {
		s.Strategy.MaxUnavailable = intOrStr(2)
		s.Disruption.Timeout = &metav1.Duration{Duration: 10 * time.Minute}
	})
	select {
	case <-f.hosts[n1].started:
	case <-time.After(40 * time.Second):
		t.Fatalf("%s was not granted its switch: %s", n1, describeRollout(f.getRollout(older)))
	}
	f.waitRollout(older, n0+"'s drain blocked", 30*time.Second, func(r *v1alpha1.NodeSpawnRollout) bool {
		for _, b := range r.Status.Blocked {
			if b.Node == n0 && b.Reason == "DrainBlocked" {
				return true
			}
		}
		return false
	})
	for _, n := range []string{n0, n1} {
		if by := f.getNode(n).Annotations[v1alpha1.AnnotationCordonedBy]; by != older {
			t.Fatalf("%s cordoned by %q before the newer rollout; want %s", n, by, older)
		}
	}

	cM, cDigest := kubetest.FleetConfig(t, "c")
	cCfg := kubetest.NameFor(t, "c")
	f.create(&v1alpha1.NodeSpawnConfig{ObjectMeta: metav1.ObjectMeta{Name: cCfg}, Spec: v1alpha1.NodeSpawnConfigSpec{Manifest: cM, Digest: cDigest}})
	newer := f.rolloutNamed("ro-newer", func(s *v1alpha1.NodeSpawnRolloutSpec) {
		s.ConfigName = cCfg
		s.NodeSelector.MatchLabels["nodespawn.test/pick"] = "newer"
		s.Strategy.MaxUnavailable = intOrStr(2)
		s.Disruption.Mode = v1alpha1.DisruptionInPlace
	})

	superseded := func(r *v1alpha1.NodeSpawnRollout) []string {
		var out []string
		for _, b := range r.Status.Blocked {
			if b.Reason == "SupersededByRollout" && strings.Contains(b.Message, newer) {
				out = append(out, b.Node)
			}
		}
		return out
	}
	f.waitRollout(older, "listing "+n0+" and "+n1+" as superseded", 30*time.Second, func(r *v1alpha1.NodeSpawnRollout) bool {
		return slices.Equal(superseded(r), []string{n0, n1})
	})
	f.poll(n0+" let go by the older rollout", 30*time.Second, func() (bool, string) {
		node, nsn := f.getNode(n0), f.getNSN(n0)
		return node.Annotations[v1alpha1.AnnotationCordonedBy] != older && nsn.Labels[v1alpha1.LabelRollout] != older,
			fmt.Sprintf("node annotations %v; NodeSpawnNode labels %v spec %+v", node.Annotations, nsn.Labels, nsn.Spec)
	})
	// n1 is still in its switch: kept as it is, by both.
	if node, nsn := f.getNode(n1), f.getNSN(n1); node.Annotations[v1alpha1.AnnotationCordonedBy] != older ||
		nsn.Spec.SwitchID != planner.GrantID(f.getRollout(older)) || nsn.Status.Phase != v1alpha1.PhaseSwitching {
		t.Errorf("%s during its switch: node annotations %v, NodeSpawnNode spec %+v phase %s; want the older rollout's cordon and grant, Switching",
			n1, node.Annotations, nsn.Spec, nsn.Status.Phase)
	}
	close(hold)

	gotNewer := f.waitRollout(newer, "Complete", 60*time.Second, complete)
	gotOlder := f.waitRollout(older, "Complete", 60*time.Second, complete)
	for n, want := range map[string]string{n0: cDigest, n1: cDigest, n2: f.newDigest} {
		if nsn := f.getNSN(n); nsn.Status.Phase != v1alpha1.PhaseReady || nsn.Status.ActiveDigest != want {
			t.Errorf("%s: phase %s, active %s; want Ready on %s", n, nsn.Status.Phase, short(nsn.Status.ActiveDigest), short(want))
		}
	}
	if gotNewer.Status.Nodes != 2 || gotNewer.Status.Updated != 2 {
		t.Errorf("newer rollout: %s; want 2 nodes, 2 updated", describeRollout(gotNewer))
	}
	if gotOlder.Status.Nodes != 1 || gotOlder.Status.Updated != 1 || !slices.Equal(superseded(gotOlder), []string{n0, n1}) {
		t.Errorf("older rollout: %s; want 1 node, updated, and %s, %s superseded", describeRollout(gotOlder), n0, n1)
	}
	for n, want := range map[string][]string{n0: {cDigest}, n1: {f.newDigest, cDigest}, n2: {f.newDigest}} {
		if got := f.hosts[n].switches(); !slices.Equal(got, want) {
			t.Errorf("%s switched to %v; want %v", n, shortAll(got), shortAll(want))
		}
	}
	f.poll("no node cordoned at the end", 30*time.Second, func() (bool, string) {
		var s []string
		for _, n := range []string{n0, n1, n2} {
			if node := f.getNode(n); node.Spec.Unschedulable || node.Annotations[v1alpha1.AnnotationCordonedBy] != "" {
				s = append(s, fmt.Sprintf("%s: unschedulable %v, annotations %v", n, node.Spec.Unschedulable, node.Annotations))
			}
		}
		return len(s) == 0, strings.Join(s, "; ")
	})
}

func shortAll(ds []string) []string {
	out := make([]string, len(ds))
	for i, d := range ds {
		out[i] = short(d)
	}
	return out
}

// TestEditedSelectorLetsGo: a node that a rollout's edited selector no
// longer selects is let go by the rollout's own reconcile (the edit is no
// Node event, so nothing else would look): its cordon undone and its
// prepare request withdrawn, while the rollout completes over the nodes it
// still selects.
func TestEditedSelectorLetsGo(t *testing.T) {
	f := newFixture(t)
	n0 := f.addNode("n0", nodeOpts{})
	n1 := f.addNode("n1", nodeOpts{labels: map[string]string{"nodespawn.test/keep": "yes"}})
	f.guardedWorkload(n0)
	f.startController(leaderElection{})
	f.waitEnrolled()
	ro := f.rollout(func(s *v1alpha1.NodeSpawnRolloutSpec) {
		s.Disruption.Timeout = &metav1.Duration{Duration: 10 * time.Minute}
	})
	f.waitRollout(ro, n0+"'s drain blocked", 30*time.Second, func(r *v1alpha1.NodeSpawnRollout) bool {
		return len(r.Status.Blocked) > 0 && r.Status.Blocked[0].Node == n0
	})
	if node, nsn := f.getNode(n0), f.getNSN(n0); node.Annotations[v1alpha1.AnnotationCordonedBy] != ro || nsn.Labels[v1alpha1.LabelRollout] != ro || !nsn.Spec.Prepare {
		t.Fatalf("%s before the edit: node annotations %v, NodeSpawnNode labels %v spec %+v; want the rollout's cordon and prepare", n0, node.Annotations, nsn.Labels, nsn.Spec)
	}
	r := f.getRollout(ro)
	r.Spec.NodeSelector.MatchLabels["nodespawn.test/keep"] = "yes"
	if err := f.c.Client.Update(f.ctx, r); err != nil {
		t.Fatal(err)
	}
	f.poll(n0+" let go after the edit", 30*time.Second, func() (bool, string) {
		node, nsn := f.getNode(n0), f.getNSN(n0)
		return !node.Spec.Unschedulable && node.Annotations[v1alpha1.AnnotationCordonedBy] == "" &&
				nsn.Labels[v1alpha1.LabelRollout] == "" && !nsn.Spec.Prepare && !nsn.Spec.Switch,
			fmt.Sprintf("node unschedulable %v, annotations %v; NodeSpawnNode labels %v, spec %+v", node.Spec.Unschedulable, node.Annotations, nsn.Labels, nsn.Spec)
	})
	got := f.waitRollout(ro, "Complete", 60*time.Second, complete)
	if got.Status.Nodes != 1 || got.Status.Updated != 1 {
		t.Errorf("after the edit: %s; want 1 node (%s), updated", describeRollout(got), n1)
	}
	if sw := f.hosts[n0].switches(); len(sw) != 0 {
		t.Errorf("%s switched %v after it was let go", n0, shortAll(sw))
	}
	if sw := f.hosts[n1].switches(); !slices.Equal(sw, []string{f.newDigest}) {
		t.Errorf("%s switched %v; want once to the new config", n1, shortAll(sw))
	}
}
