package controller_test

import (
	"testing"
	"time"

	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/controller-runtime/pkg/client"

	v1alpha1 "github.com/nodespawn/nodespawn/api/v1alpha1"
)

// TestSwitchesWaitForTheMaintenanceWindow: outside the window the nodes
// prepare (that disrupts nothing) but none is cordoned or switched, and
// the rollout says it waits for the window; once the window is open (the
// spec edited) the rollout completes.
func TestSwitchesWaitForTheMaintenanceWindow(t *testing.T) {
	f := newFixture(t)
	n0 := f.addNode("n0", nodeOpts{})
	n1 := f.addNode("n1", nodeOpts{})
	f.startController(leaderElection{})
	f.waitEnrolled()
	ro := f.rollout(func(s *v1alpha1.NodeSpawnRolloutSpec) {
		// Midnight on the first of January, a minute long: not now
		// (unless the test runs then, which the check below says).
		s.MaintenanceWindow = &v1alpha1.MaintenanceWindow{Schedule: "0 0 1 1 *", Duration: metav1.Duration{Duration: time.Minute}}
		s.Strategy.PrepareAhead = 1
	})
	if now := time.Now().UTC(); now.Month() == time.January && now.Day() == 1 && now.Hour() == 0 && now.Minute() < 2 {
		t.Skip("runs inside the window it uses as closed")
	}
	f.waitRollout(ro, "waiting for the window", 30*time.Second, func(r *v1alpha1.NodeSpawnRollout) bool {
		c := meta.FindStatusCondition(r.Status.Conditions, v1alpha1.RolloutProgressing)
		return c != nil && c.Reason == "OutsideWindow" && r.Status.Prepared == 2
	})
	time.Sleep(3 * time.Second)
	for _, n := range []string{n0, n1} {
		if node := f.getNode(n); node.Spec.Unschedulable {
			t.Errorf("%s cordoned outside the window", n)
		}
		if nsn := f.getNSN(n); nsn.Spec.Switch || nsn.Status.PreparedDigest != f.newDigest {
			t.Errorf("%s outside the window: switch %v, prepared %s; want prepared, no switch", n, nsn.Spec.Switch, short(nsn.Status.PreparedDigest))
		}
	}

	// Every minute, for an hour: open now.
	var r v1alpha1.NodeSpawnRollout
	if err := f.c.Client.Get(f.ctx, client.ObjectKey{Name: ro}, &r); err != nil {
		t.Fatal(err)
	}
	r.Spec.MaintenanceWindow = &v1alpha1.MaintenanceWindow{Schedule: "* * * * *", Duration: metav1.Duration{Duration: time.Hour}}
	if err := f.c.Client.Update(f.ctx, &r); err != nil {
		t.Fatal(err)
	}
	f.waitRollout(ro, "Complete", 60*time.Second, complete)
	f.checkAllUpdated(ro, []string{n0, n1})
}

// TestNextWaveWaitsForTheSoak: with one node per wave and a soak, the
// second node is cordoned no sooner than the soak after the first came
// back Ready.
func TestNextWaveWaitsForTheSoak(t *testing.T) {
	f := newFixture(t)
	n0 := f.addNode("n0", nodeOpts{})
	n1 := f.addNode("n1", nodeOpts{})
	f.startController(leaderElection{})
	f.waitEnrolled()
	const soak = 6 * time.Second
	ro := f.rollout(func(s *v1alpha1.NodeSpawnRolloutSpec) {
		s.Strategy.Soak = &metav1.Duration{Duration: soak}
		s.Disruption.Mode = v1alpha1.DisruptionInPlace
	})
	var first string
	var firstDone time.Time
	f.poll("one node switched", 40*time.Second, func() (bool, string) {
		for _, n := range []string{n0, n1} {
			if st := f.getNSN(n).Status; st.Phase == v1alpha1.PhaseReady && st.ActiveDigest == f.newDigest && st.SwitchFinished != nil {
				first, firstDone = n, st.SwitchFinished.Time
				return true, ""
			}
		}
		return false, "no node on the new config yet"
	})
	second := map[string]string{n0: n1, n1: n0}[first]
	f.waitRollout(ro, "Complete", 60*time.Second, complete)
	f.checkAllUpdated(ro, []string{n0, n1})
	st := f.getNSN(second).Status
	if st.SwitchStarted == nil {
		t.Fatalf("%s: no switch start in its status", second)
	}
	// Both times are whole seconds: a second of slack.
	if gap := st.SwitchStarted.Sub(firstDone); gap < soak-time.Second {
		t.Errorf("%s switched %s after %s came back; want at least the soak, %s", second, gap, first, soak)
	} else {
		t.Logf("%s switched %s after %s came back (soak %s)", second, gap, first, soak)
	}
}
