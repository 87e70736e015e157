package planner

import (
	"strconv"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	v1alpha1 "github.com/nodespawn/nodespawn/api/v1alpha1"
)

func actionFor(p Plan, node string) *Action {
	for i := range p.Actions {
		if p.Actions[i].Node == node {
			return &p.Actions[i]
		}
	}
	return nil
}

func TestRules(t *testing.T) {
	type check func(t *testing.T, w *world, p Plan)
	tests := []struct {
		name  string
		spec  v1alpha1.NodeSpawnRolloutSpec
		setup func(w *world)
		check check
	}{{
		name: "a rollout back to the kept previous machine asks for no prepare",
		spec: v1alpha1.NodeSpawnRolloutSpec{Disruption: v1alpha1.Disruption{Mode: v1alpha1.DisruptionInPlace}},
		setup: func(w *world) {
			w.nodes["n000"].nsn.Status.PreviousDigest = digestNew
		},
		check: func(t *testing.T, w *world, p Plan) {
			a := actionFor(p, "n000")
			if a == nil || a.Spec == nil || !a.Spec.Switch || a.Spec.Prepare {
				t.Fatalf("n000: action %+v, want a switch with no prepare", a)
			}
		},
	}, {
		name: "paused: no prepare, no cordon",
		spec: v1alpha1.NodeSpawnRolloutSpec{Paused: true},
		check: func(t *testing.T, w *world, p Plan) {
			for _, a := range p.Actions {
				if a.Cordon || (a.Spec != nil && (a.Spec.Prepare || a.Spec.Switch)) {
					t.Fatalf("paused rollout acted: %+v", a)
				}
			}
			if c := meta.FindStatusCondition(p.Status.Conditions, v1alpha1.RolloutProgressing); c.Reason != "Paused" {
				t.Fatalf("Progressing %+v", c)
			}
		},
	}, {
		name: "outside the window: prepare yes, cordon no",
		spec: v1alpha1.NodeSpawnRolloutSpec{MaintenanceWindow: &v1alpha1.MaintenanceWindow{Schedule: "0 22 * * *", Duration: metav1.Duration{Duration: 2 * time.Hour}}},
		setup: func(w *world) {
			w.nodes["n001"].nsn.Status.PreparedDigest = digestNew
		},
		check: func(t *testing.T, w *world, p Plan) {
			prepares := 0
			for _, a := range p.Actions {
				if a.Cordon {
					t.Fatalf("cordoned outside the window: %+v", a)
				}
				if a.Spec != nil && a.Spec.Prepare {
					prepares++
				}
			}
			if prepares == 0 {
				t.Fatal("no prepare outside the window")
			}
			c := meta.FindStatusCondition(p.Status.Conditions, v1alpha1.RolloutProgressing)
			if c.Reason != "OutsideWindow" || !strings.Contains(c.Message, "2026-01-05T22:00:00Z") {
				t.Fatalf("Progressing %+v", c)
			}
		},
	}, {
		name: "inside the window: cordon",
		spec: v1alpha1.NodeSpawnRolloutSpec{MaintenanceWindow: &v1alpha1.MaintenanceWindow{Schedule: "0 2 * * *", Duration: metav1.Duration{Duration: 2 * time.Hour}}},
		setup: func(w *world) {
			w.nodes["n001"].nsn.Status.PreparedDigest = digestNew
		},
		check: func(t *testing.T, w *world, p Plan) {
			if a := actionFor(p, "n001"); a == nil || !a.Cordon {
				t.Fatalf("n001 not cordoned inside the window: %+v", a)
			}
		},
	}, {
		name: "a config that is not valid starts nothing",
		setup: func(w *world) {
			w.config.Status.Conditions[0].Status = metav1.ConditionFalse
			w.config.Status.Conditions[0].Message = "the manifest holds a secret at kubernetes.bootstrapToken"
		},
		check: func(t *testing.T, w *world, p Plan) {
			if len(p.Actions) != 0 {
				t.Fatalf("actions %+v", p.Actions)
			}
			c := meta.FindStatusCondition(p.Status.Conditions, v1alpha1.RolloutProgressing)
			if c.Status != metav1.ConditionFalse || c.Reason != "ConfigInvalid" || !strings.Contains(c.Message, "bootstrapToken") {
				t.Fatalf("Progressing %+v", c)
			}
		},
	}, {
		name: "a drain blocked by a PodDisruptionBudget names the pod",
		setup: func(w *world) {
			sn := w.nodes["n000"]
			sn.nsn.Status.PreparedDigest = digestNew
			sn.node.Spec.Unschedulable = true
			sn.node.Annotations[v1alpha1.AnnotationCordonedBy] = "r"
			sn.node.Annotations[v1alpha1.AnnotationCordonedAt] = w.now.Add(-time.Minute).Format(time.RFC3339)
			sn.pdb = true
		},
		check: func(t *testing.T, w *world, p Plan) {
			if a := actionFor(p, "n000"); a == nil || !a.Drain || a.Spec != nil {
				t.Fatalf("n000 action %+v, want a drain and no grant", a)
			}
			if len(p.Status.Blocked) != 1 || p.Status.Blocked[0].Reason != "DrainBlocked" || !strings.Contains(p.Status.Blocked[0].Message, "default/n000-db") {
				t.Fatalf("blocked %+v", p.Status.Blocked)
			}
			if p.RequeueAfter != DrainRetry {
				t.Fatalf("requeue after %s, want %s", p.RequeueAfter, DrainRetry)
			}
		},
	}, {
		name: "WaitForPods waits for the pods left and never asks for an eviction",
		spec: v1alpha1.NodeSpawnRolloutSpec{Disruption: v1alpha1.Disruption{Mode: v1alpha1.DisruptionWaitForPods}},
		setup: func(w *world) {
			sn := w.nodes["n000"]
			sn.nsn.Status.PreparedDigest = digestNew
			sn.node.Spec.Unschedulable = true
			sn.node.Annotations[v1alpha1.AnnotationCordonedBy] = "r"
			sn.node.Annotations[v1alpha1.AnnotationCordonedAt] = w.now.Add(-time.Minute).Format(time.RFC3339)
			sn.pods = 2
		},
		check: func(t *testing.T, w *world, p Plan) {
			a := actionFor(p, "n000")
			if a != nil && (a.Drain || a.Spec != nil) {
				t.Fatalf("n000 action %+v, want no eviction and no grant while its pods run", a)
			}
			if p.RequeueAfter == 0 || p.RequeueAfter > DrainRetry {
				t.Fatalf("requeue after %s, want at most %s (to look again)", p.RequeueAfter, DrainRetry)
			}
		},
	}, {
		name: "a drain past its timeout with onTimeout Proceed switches anyway",
		spec: v1alpha1.NodeSpawnRolloutSpec{Disruption: v1alpha1.Disruption{Timeout: &metav1.Duration{Duration: time.Minute}, OnTimeout: v1alpha1.TimeoutProceed}},
		setup: func(w *world) {
			sn := w.nodes["n000"]
			sn.nsn.Status.PreparedDigest = digestNew
			sn.node.Spec.Unschedulable = true
			sn.node.Annotations[v1alpha1.AnnotationCordonedBy] = "r"
			sn.node.Annotations[v1alpha1.AnnotationCordonedAt] = w.now.Add(-time.Hour).Format(time.RFC3339)
			sn.pdb = true
		},
		check: func(t *testing.T, w *world, p Plan) {
			if a := actionFor(p, "n000"); a == nil || a.Spec == nil || !a.Spec.Switch {
				t.Fatalf("n000 action %+v, want a grant", a)
			}
		},
	}, {
		name: "a node NotReady before the rollout is taken first: it adds no unavailability",
		spec: v1alpha1.NodeSpawnRolloutSpec{Strategy: v1alpha1.RolloutStrategy{MaxUnavailable: cnt(1), Waves: []intstr.IntOrString{intstr.FromInt32(2)}}},
		setup: func(w *world) {
			for _, n := range []string{"n000", "n001", "n002"} {
				w.nodes[n].nsn.Status.PreparedDigest = digestNew
			}
			setReady(&w.nodes["n002"].node, false, w.now.Add(-time.Hour))
		},
		check: func(t *testing.T, w *world, p Plan) {
			var cordoned []string
			for _, a := range p.Actions {
				if a.Cordon {
					cordoned = append(cordoned, a.Node)
				}
			}
			// n002 is down already: taking it adds nothing; n000 would make
			// two unavailable and waits for n002 to come back.
			if strings.Join(cordoned, ",") != "n002" {
				t.Fatalf("cordoned %v, want n002 only", cordoned)
			}
		},
	}, {
		name: "unavailable nodes the rollout cannot touch hold the budget, and the status says so",
		spec: v1alpha1.NodeSpawnRolloutSpec{Strategy: v1alpha1.RolloutStrategy{MaxUnavailable: cnt(1)}},
		setup: func(w *world) {
			w.nodes["n000"].nsn.Status.PreparedDigest = digestNew
			w.nodes["n003"].node.Spec.Unschedulable = true
		},
		check: func(t *testing.T, w *world, p Plan) {
			for _, a := range p.Actions {
				if a.Cordon {
					t.Fatalf("cordoned %s with n003 already unavailable and maxUnavailable 1", a.Node)
				}
			}
			c := meta.FindStatusCondition(p.Status.Conditions, v1alpha1.RolloutProgressing)
			if c.Reason != "UnavailableBudgetHeld" || !strings.Contains(c.Message, "n003") {
				t.Fatalf("Progressing %+v", c)
			}
		},
	}, {
		name: "health gates: a switched node whose GPU condition stays bad fails and stays cordoned",
		spec: v1alpha1.NodeSpawnRolloutSpec{HealthGates: []v1alpha1.HealthGate{{Type: "GPUHealthy", Status: "True"}}, FailureBudget: 5},
		setup: func(w *world) {
			sn := w.nodes["n000"]
			sn.node.Spec.Unschedulable = true
			sn.node.Annotations[v1alpha1.AnnotationCordonedBy] = "r"
			sn.node.Status.Conditions = append(sn.node.Status.Conditions, corev1NodeCondition("GPUHealthy", "False"))
			sn.nsn.Spec = v1alpha1.NodeSpawnNodeSpec{ConfigName: "v2", ConfigDigest: digestNew, Switch: true, SwitchID: "r/1"}
			sn.nsn.Status.SwitchID = "r/1"
			sn.nsn.Status.Phase = v1alpha1.PhaseReady
			sn.nsn.Status.ActiveDigest = digestNew
			fin := metav1.NewTime(w.now.Add(-time.Hour))
			sn.nsn.Status.SwitchFinished = &fin
		},
		check: func(t *testing.T, w *world, p Plan) {
			a := actionFor(p, "n000")
			if a == nil || !strings.HasPrefix(a.Annotations[v1alpha1.AnnotationFailed], "r/1 HealthGate: ") || a.Uncordon {
				t.Fatalf("n000 action %+v, want a HealthGate failure and no uncordon", a)
			}
			if !strings.Contains(a.Annotations[v1alpha1.AnnotationFailed], "GPUHealthy is False, want True") {
				t.Fatalf("failure %q does not name the gate", a.Annotations[v1alpha1.AnnotationFailed])
			}
		},
	}}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			spec := tc.spec
			if spec.FailureBudget == 0 {
				spec.FailureBudget = 1
			}
			w := newWorld(t, 4, spec)
			if tc.setup != nil {
				tc.setup(w)
			}
			p := Decide(w.input())
			tc.check(t, w, p)
		})
	}
}

// Cordoning prepared nodes in a pass must not free prepare slots: the
// wave's nodes plus prepareAhead hold prepare requests, no more. (The
// nodes cordoned in the pass left "holding" without being counted as
// active, and as many nodes beyond the wave were asked to prepare.)
func TestCordonsDoNotFreePrepareSlots(t *testing.T) {
	for _, ahead := range []int32{0, 1} {
		w := newWorld(t, 6, v1alpha1.NodeSpawnRolloutSpec{FailureBudget: 1,
			Strategy: v1alpha1.RolloutStrategy{PrepareAhead: ahead, MaxUnavailable: &intstr.IntOrString{Type: intstr.Int, IntVal: 2}}})
		// The first wave (n000, n001) is prepared; nothing else asked.
		for _, n := range []string{"n000", "n001"} {
			sn := w.nodes[n]
			sn.nsn.Spec = v1alpha1.NodeSpawnNodeSpec{ConfigName: "v2", ConfigDigest: digestNew, Prepare: true}
			sn.nsn.Status.Phase, sn.nsn.Status.PreparedDigest = v1alpha1.PhasePrepared, digestNew
		}
		p := Decide(w.input())
		var cordoned, prepares []string
		for _, a := range p.Actions {
			if a.Cordon {
				cordoned = append(cordoned, a.Node)
			}
			if a.Spec != nil && a.Spec.Prepare && !a.Spec.Switch {
				prepares = append(prepares, a.Node)
			}
		}
		if len(cordoned) != 2 {
			t.Fatalf("prepareAhead %d: cordoned %v, want the first wave", ahead, cordoned)
		}
		if len(prepares) != int(ahead) {
			t.Errorf("prepareAhead %d: prepare requested for %v while the wave's 2 nodes are cordoned; want %d node(s) ahead", ahead, prepares, ahead)
		}
	}
}

func TestWaveSizes(t *testing.T) {
	tests := []struct {
		waves []intstr.IntOrString
		total int
		maxU  int
		want  string
	}{
		{nil, 10, 3, "[3 3 3 1]"},
		{[]intstr.IntOrString{intstr.FromInt32(1), intstr.FromString("10%"), intstr.FromString("50%")}, 60, 6, "[1 6 53]"},
		{[]intstr.IntOrString{intstr.FromString("1%")}, 7, 1, "[7]"},
		{[]intstr.IntOrString{intstr.FromInt32(1), intstr.FromInt32(5)}, 3, 1, "[1 2]"},
		{nil, 0, 1, "[0]"},
	}
	for _, tc := range tests {
		if got := fmtInts(waveSizes(tc.waves, tc.total, tc.maxU)); got != tc.want {
			t.Errorf("waveSizes(%v, %d, %d) = %s, want %s", tc.waves, tc.total, tc.maxU, got, tc.want)
		}
	}
	if got := scaled(pct("10%"), 9, false, 1); got != 1 {
		t.Errorf("10%% of 9 = %d, want 1 (rounded down, at least 1)", got)
	}
	if got := scaled(pct("25%"), 100, false, 1); got != 25 {
		t.Errorf("25%% of 100 = %d", got)
	}
}

func fmtInts(xs []int) string {
	s := "["
	for i, x := range xs {
		if i > 0 {
			s += " "
		}
		s += itoa(x)
	}
	return s + "]"
}

func itoa(x int) string { return strconv.Itoa(x) }

func corev1NodeCondition(typ, status string) corev1.NodeCondition {
	return corev1.NodeCondition{Type: corev1.NodeConditionType(typ), Status: corev1.ConditionStatus(status)}
}

func TestInWindow(t *testing.T) {
	at := func(s string) time.Time {
		tm, err := time.Parse(time.RFC3339, s)
		if err != nil {
			t.Fatal(err)
		}
		return tm
	}
	w := &v1alpha1.MaintenanceWindow{Schedule: "0 22 * * 1-5", Duration: metav1.Duration{Duration: 3 * time.Hour}}
	tests := []struct {
		now    string
		inside bool
		next   string
	}{
		{"2026-01-05T21:59:00Z", false, "2026-01-05T22:00:00Z"}, // Monday
		{"2026-01-05T22:00:00Z", true, "2026-01-06T01:00:00Z"},
		{"2026-01-06T00:59:00Z", true, "2026-01-06T01:00:00Z"},
		{"2026-01-06T01:00:00Z", false, "2026-01-06T22:00:00Z"},
		{"2026-01-10T12:00:00Z", false, "2026-01-12T22:00:00Z"}, // Saturday
	}
	for _, tc := range tests {
		in, next, err := InWindow(w, at(tc.now))
		if err != nil || in != tc.inside || !next.Equal(at(tc.next)) {
			t.Errorf("InWindow(%s) = %v, %s, %v; want %v, %s", tc.now, in, next.UTC().Format(time.RFC3339), err, tc.inside, tc.next)
		}
	}
	// A time zone moves the window.
	tz := &v1alpha1.MaintenanceWindow{Schedule: "0 22 * * *", Duration: metav1.Duration{Duration: time.Hour}, TimeZone: "Europe/Berlin"}
	if in, _, err := InWindow(tz, at("2026-01-05T21:30:00Z")); err != nil || !in {
		t.Errorf("Berlin 22:30 is inside a 22:00 Berlin window: %v %v", in, err)
	}
	for _, bad := range []*v1alpha1.MaintenanceWindow{
		{Schedule: "every day", Duration: metav1.Duration{Duration: time.Hour}},
		{Schedule: "0 22 * * *"},
		{Schedule: "0 22 * * *", Duration: metav1.Duration{Duration: time.Hour}, TimeZone: "Mars/Olympus"},
	} {
		if _, _, err := InWindow(bad, at("2026-01-05T21:30:00Z")); err == nil {
			t.Errorf("InWindow(%+v) accepted", bad)
		}
	}
}

// TestFailedNodeListsTheFirstLine: a rollback's error carries the kubelet's
// journal; the rollout lists its first line and points at the rest.
func TestFailedNodeListsTheFirstLine(t *testing.T) {
	p := problem("n1", "RolledBack: upgrade from kube2 to kube1 rolled back: kubelet keeps failing; last 30 lines of its journal:\nline 1\nline 2\n")
	want := "upgrade from kube2 to kube1 rolled back: kubelet keeps failing; last 30 lines of its journal: (more in NodeSpawnNode n1's status.lastError)"
	if p.Node != "n1" || p.Reason != "RolledBack" || p.Message != want {
		t.Errorf("problem: %+v\nwant message %q", p, want)
	}
	if p := problem("n2", "PhaseTimeout: no switch within 30m"); p.Message != "no switch within 30m" {
		t.Errorf("a one-line failure changed: %+v", p)
	}
}
