package kubetest

import (
	"context"
	"fmt"
	"os"
	"strings"
	"testing"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/controller-runtime/pkg/client"

	v1alpha1 "github.com/nodespawn/nodespawn/api/v1alpha1"
)

func TestMain(m *testing.M) { os.Exit(Main(m)) }

// The CRDs are installed and served: an admin creates a NodeSpawnNode and
// writes its status through the status subresource.
func TestCRDsServed(t *testing.T) {
	c := Get(t)
	ctx := context.Background()
	n := &v1alpha1.NodeSpawnNode{ObjectMeta: metav1.ObjectMeta{Name: NameFor(t, "a")}}
	if err := c.Client.Create(ctx, n); err != nil {
		t.Fatal(err)
	}
	n.Status.Phase = v1alpha1.PhaseIdle
	if err := c.Client.Status().Update(ctx, n); err != nil {
		t.Fatal(err)
	}
	var got v1alpha1.NodeSpawnNode
	if err := c.Client.Get(ctx, client.ObjectKeyFromObject(n), &got); err != nil {
		t.Fatal(err)
	}
	if got.Status.Phase != v1alpha1.PhaseIdle {
		t.Fatalf("status.phase = %q, want Idle", got.Status.Phase)
	}
}

// RBAC is on: a certificate user with no grants is forbidden, and a grant
// applied from YAML lets it read.
func TestUsersAreAuthorizedByRBAC(t *testing.T) {
	c := Get(t)
	ctx := context.Background()
	user := "system:node:" + NameFor(t, "")
	cfg := c.AddUser(t, user, "system:nodes")
	uc, err := client.New(cfg, client.Options{Scheme: c.Scheme})
	if err != nil {
		t.Fatal(err)
	}
	var l v1alpha1.NodeSpawnConfigList
	if err := uc.List(ctx, &l); !apierrors.IsForbidden(err) {
		t.Fatalf("listing configs with no grant: err = %v, want Forbidden", err)
	}
	role := NameFor(t, "reader")
	err = c.ApplyYAML(ctx, []byte(`
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: `+role+`}
rules:
- apiGroups: [nodespawn.dev]
  resources: [nodespawnconfigs]
  verbs: [list]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: `+role+`}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: `+role+`}
subjects:
- {kind: User, apiGroup: rbac.authorization.k8s.io, name: "`+user+`"}
`))
	if err != nil {
		t.Fatal(err)
	}
	// RBAC's authorizer sees new bindings through an informer: retry briefly.
	if err := Eventually(ctx, func() error { return uc.List(ctx, &l) }); err != nil {
		t.Fatalf("listing configs after the grant: %v", err)
	}
}

func TestNameFor(t *testing.T) {
	if got := NameFor(t, "x"); got != "testnamefor-x" {
		t.Fatalf("NameFor = %q", got)
	}
}

// skipRecorder records a Skipf instead of ending the test, so Get's skip can
// be seen from outside it.
type skipRecorder struct {
	testing.TB
	skipped string
}

func (r *skipRecorder) Helper() {}

func (r *skipRecorder) Skipf(format string, args ...any) { r.skipped = fmt.Sprintf(format, args...) }

// NODESPAWN_SKIP_KUBE=1 (make check's unit-test pass) skips without starting
// or looking for a control plane; NODESPAWN_REQUIRE_KUBE=1 (test-cluster)
// wins over it, so a run that must test against an API server cannot skip.
func TestSkipEnv(t *testing.T) {
	for _, c := range []struct {
		skip, require string
		want          bool
	}{{"1", "", true}, {"1", "1", false}, {"", "", false}, {"0", "", false}} {
		t.Setenv(SkipEnv, c.skip)
		t.Setenv(RequireEnv, c.require)
		if got := skipAsked(); got != c.want {
			t.Errorf("%s=%q %s=%q: skipAsked = %v, want %v", SkipEnv, c.skip, RequireEnv, c.require, got, c.want)
		}
	}
	t.Setenv(SkipEnv, "1")
	t.Setenv(RequireEnv, "")
	r := &skipRecorder{TB: t}
	if c := Get(r); c != nil || !strings.Contains(r.skipped, "test-cluster") {
		t.Fatalf("with %s=1: Get = %v, skip %q; want nil and a skip naming test-cluster", SkipEnv, c, r.skipped)
	}
}
