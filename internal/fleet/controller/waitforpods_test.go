package controller_test

import (
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/controller-runtime/pkg/client"

	v1alpha1 "github.com/nodespawn/nodespawn/api/v1alpha1"
)

// TestWaitForPodsWaitsForTheSelectedPods: with disruption WaitForPods the
// node is cordoned and its switch waits, without an eviction, until the
// pods the selector picks have finished; a DaemonSet's pod that matches
// and a pod the selector does not pick neither hold it nor are touched.
func TestWaitForPodsWaitsForTheSelectedPods(t *testing.T) {
	f := newFixture(t)
	n0 := f.addNode("n0", nodeOpts{})
	train := f.workload(n0, "train")
	web := f.workload(n0, "web")
	// A DaemonSet's pod with the training label: node-bound, never
	// waited for.
	yes := true
	ds := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Name: "agent-ds-1", Namespace: train.ns, Labels: train.labels,
		OwnerReferences: []metav1.OwnerReference{{APIVersion: "apps/v1", Kind: "DaemonSet", Name: "agent-ds", UID: "0b4a9d0e-0000-4000-8000-000000000001", Controller: &yes}}},
		Spec: corev1.PodSpec{NodeName: n0, Containers: []corev1.Container{{Name: "c", Image: "registry.invalid/ds"}}}}
	f.create(ds)
	ds.Status.Phase = corev1.PodRunning
	if err := f.c.Client.Status().Update(f.ctx, ds); err != nil {
		t.Fatal(err)
	}
	f.startController(leaderElection{})
	f.waitEnrolled()
	ro := f.rollout(func(s *v1alpha1.NodeSpawnRolloutSpec) {
		s.Disruption = v1alpha1.Disruption{Mode: v1alpha1.DisruptionWaitForPods,
			PodSelector: &metav1.LabelSelector{MatchLabels: train.labels},
			Timeout:     &metav1.Duration{Duration: 10 * time.Minute}}
	})
	st := f.waitRollout(ro, "the wait for the training pod reported", 30*time.Second, func(r *v1alpha1.NodeSpawnRollout) bool {
		for _, b := range r.Status.Blocked {
			if b.Node == n0 && strings.Contains(b.Message, train.ns+"/"+train.pod) {
				return true
			}
		}
		return false
	})
	for _, b := range st.Status.Blocked {
		if strings.Contains(b.Message, ds.Name) || strings.Contains(b.Message, web.pod) {
			t.Errorf("blocked %+v: names a pod WaitForPods does not wait for", b)
		}
	}
	if node := f.getNode(n0); !node.Spec.Unschedulable || node.Annotations[v1alpha1.AnnotationCordonedBy] != ro {
		t.Errorf("%s: unschedulable %v, annotations %v; want cordoned by %s while it waits", n0, node.Spec.Unschedulable, node.Annotations, ro)
	}
	// A while later: still waiting, nothing evicted, nothing granted.
	time.Sleep(3 * time.Second)
	if nsn := f.getNSN(n0); nsn.Spec.Switch {
		t.Errorf("%s granted a switch while its training pod runs: %+v", n0, nsn.Spec)
	}
	for _, w := range []workload{train, web} {
		if exists, term := f.podTerminating(w); !exists || term {
			t.Errorf("pod %s: exists %v, terminating %v; want it left running (WaitForPods evicts nothing)", w.pod, exists, term)
		}
	}

	// The training job finishes: the node switches.
	var p corev1.Pod
	if err := f.c.Client.Get(f.ctx, client.ObjectKey{Namespace: train.ns, Name: train.pod}, &p); err != nil {
		t.Fatal(err)
	}
	p.Status.Phase = corev1.PodSucceeded
	if err := f.c.Client.Status().Update(f.ctx, &p); err != nil {
		t.Fatal(err)
	}
	f.waitRollout(ro, "Complete", 50*time.Second, complete)
	f.checkAllUpdated(ro, []string{n0})
	if exists, term := f.podTerminating(web); !exists || term {
		t.Errorf("the unselected pod: exists %v, terminating %v; want it untouched", exists, term)
	}
}
