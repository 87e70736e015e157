package controller

import (
	"context"
	"slices"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"sigs.k8s.io/controller-runtime/pkg/client/fake"

	v1alpha1 "github.com/nodespawn/nodespawn/api/v1alpha1"
)

// TestOwnerIsTheNewestThatSelects: the owner of a node is the newest
// rollout selecting it (creation time, then the greater name); a rollout
// being deleted or with a selector that does not parse owns nothing. The
// API-server test of the whole takeover is TestNewerRolloutSupersedesAnOlder.
func TestOwnerIsTheNewestThatSelects(t *testing.T) {
	t0 := metav1.NewTime(time.Date(2026, 12, 6, 3, 0, 0, 0, time.UTC))
	t1 := metav1.NewTime(t0.Add(time.Second))
	ro := func(name string, created metav1.Time, sel map[string]string) *v1alpha1.NodeSpawnRollout {
		r := &v1alpha1.NodeSpawnRollout{ObjectMeta: metav1.ObjectMeta{Name: name, CreationTimestamp: created}}
		if sel != nil {
			r.Spec.NodeSelector = &metav1.LabelSelector{MatchLabels: sel}
		}
		return r
	}
	all := ro("all", t0, nil)
	gpuOld := ro("gpu-a", t0, map[string]string{"gpu": "true"})
	gpuNew := ro("gpu-b", t1, map[string]string{"gpu": "true"})
	sameSecond := ro("gpu-c", t1, map[string]string{"gpu": "true", "zone": "z1"})
	gone := ro("gone", metav1.NewTime(t1.Add(time.Hour)), nil)
	gone.DeletionTimestamp = &t1
	gone.Finalizers = []string{"test/keep"} // the fake client refuses a deletion timestamp without one
	bad := ro("bad", metav1.NewTime(t1.Add(time.Hour)), nil)
	bad.Spec.NodeSelector = &metav1.LabelSelector{MatchExpressions: []metav1.LabelSelectorRequirement{{Key: "gpu", Operator: "Sideways"}}}

	s := runtime.NewScheme()
	if err := v1alpha1.AddToScheme(s); err != nil {
		t.Fatal(err)
	}
	c := fake.NewClientBuilder().WithScheme(s).WithObjects(all, gpuOld, gpuNew, sameSecond, gone, bad).Build()
	cs, err := claimantsOf(context.Background(), c)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, c := range cs {
		names = append(names, c.name)
	}
	if want := []string{"gpu-c", "gpu-b", "gpu-a", "all"}; !slices.Equal(names, want) {
		t.Fatalf("claimants %v; want %v (newest first; the one being deleted and the bad selector left out)", names, want)
	}
	for _, tc := range []struct {
		labels map[string]string
		want   string
	}{
		{map[string]string{"gpu": "true", "zone": "z1"}, "gpu-c"}, // same second as gpu-b: the greater name
		{map[string]string{"gpu": "true", "zone": "z2"}, "gpu-b"},
		{map[string]string{"zone": "z1"}, "all"},
	} {
		if got := ownerOf(cs, tc.labels); got != tc.want {
			t.Errorf("owner of a node labelled %v: %q; want %q", tc.labels, got, tc.want)
		}
	}
	if got := ownerOf(cs[1:3], map[string]string{"zone": "z1"}); got != "" {
		t.Errorf("owner of a node none selects: %q; want none", got)
	}
}
