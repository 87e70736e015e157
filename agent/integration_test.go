package agent

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"slices"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/nodespawn/nodespawn/api/v1alpha1"
	"github.com/nodespawn/nodespawn/internal/kubecheck"
	"github.com/nodespawn/nodespawn/internal/kubetest"
)

func TestMain(m *testing.M) { os.Exit(kubetest.Main(m)) }

// nodeRBAC is what the agent needs, granted to the nodes' group as the
// deployment's RBAC grants it (the admission policy that keeps each node
// to its own object is the controller's manifest, not tested here).
func nodeRBAC(name string) string {
	return `
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: ` + name + `}
rules:
- apiGroups: [nodespawn.dev]
  resources: [nodespawnnodes]
  verbs: [get, list, watch]
- apiGroups: [nodespawn.dev]
  resources: [nodespawnnodes/status]
  verbs: [get, patch, update]
- apiGroups: [nodespawn.dev]
  resources: [nodespawnconfigs]
  verbs: [get, list, watch]
- apiGroups: [""]
  resources: [nodes]
  verbs: [get, patch]
- apiGroups: [""]
  resources: [events]
  verbs: [create]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: ` + name + `}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: ` + name + `}
subjects:
- {apiGroup: rbac.authorization.k8s.io, kind: Group, name: "system:nodes"}
`
}

// cluster is a node name's objects on the real API server: its Node, its
// NodeSpawnNode, configs a and b, and the agent's client as the node.
type cluster struct {
	c      *kubetest.Cluster
	name   string
	api    *HTTPAPI
	da, db string
	ca, cb string
}

func newCluster(t *testing.T) *cluster {
	c := kubetest.Get(t)
	ctx := context.Background()
	k := &cluster{c: c, name: kubetest.NameFor(t, "n")}
	if err := c.ApplyYAML(ctx, []byte(nodeRBAC(kubetest.NameFor(t, "agent")))); err != nil {
		t.Fatal(err)
	}
	mustCreate(t, c, &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: k.name}})
	mustCreate(t, c, &v1alpha1.NodeSpawnNode{ObjectMeta: metav1.ObjectMeta{Name: k.name}})
	var ma, mb string
	ma, k.da = kubetest.FleetConfig(t, "a")
	mb, k.db = kubetest.FleetConfig(t, "b")
	k.ca, k.cb = kubetest.NameFor(t, "a"), kubetest.NameFor(t, "b")
	mustCreate(t, c, &v1alpha1.NodeSpawnConfig{ObjectMeta: metav1.ObjectMeta{Name: k.ca}, Spec: v1alpha1.NodeSpawnConfigSpec{Manifest: ma, Digest: k.da}})
	mustCreate(t, c, &v1alpha1.NodeSpawnConfig{ObjectMeta: metav1.ObjectMeta{Name: k.cb}, Spec: v1alpha1.NodeSpawnConfigSpec{Manifest: mb, Digest: k.db}})
	cfg := c.AddUser(t, "system:node:"+k.name, "system:nodes")
	api, err := NewHTTPAPI(Endpoint{Server: cfg.Host, CAPEM: cfg.CAData, Credentials: kubecheck.Credentials{CertPEM: cfg.CertData, KeyPEM: cfg.KeyData}})
	if err != nil {
		t.Fatal(err)
	}
	k.api = api
	// RBAC's cache catches up with the binding.
	if err := kubetest.Eventually(ctx, func() error { _, err := api.GetNode(ctx, k.name); return err }); err != nil {
		t.Fatal(err)
	}
	return k
}

func mustCreate(t *testing.T, c *kubetest.Cluster, o client.Object) {
	t.Helper()
	if err := c.Client.Create(context.Background(), o); err != nil {
		t.Fatal(err)
	}
}

// setSpec is the controller's write.
func (k *cluster) setSpec(t *testing.T, spec v1alpha1.NodeSpawnNodeSpec) {
	t.Helper()
	ctx := context.Background()
	// The agent writes the status meanwhile: on a conflict, again.
	err := kubetest.Eventually(ctx, func() error {
		var n v1alpha1.NodeSpawnNode
		if err := k.c.Client.Get(ctx, client.ObjectKey{Name: k.name}, &n); err != nil {
			return err
		}
		n.Spec = spec
		return k.c.Client.Update(ctx, &n)
	})
	if err != nil {
		t.Fatal(err)
	}
}

// waitStatus waits until the NodeSpawnNode's status satisfies ok.
func (k *cluster) waitStatus(t *testing.T, what string, ok func(v1alpha1.NodeSpawnNodeStatus) bool) v1alpha1.NodeSpawnNodeStatus {
	t.Helper()
	var last v1alpha1.NodeSpawnNodeStatus
	err := kubetest.Eventually(context.Background(), func() error {
		var n v1alpha1.NodeSpawnNode
		if err := k.c.Client.Get(context.Background(), client.ObjectKey{Name: k.name}, &n); err != nil {
			return err
		}
		last = n.Status
		if !ok(n.Status) {
			return errors.New("not yet")
		}
		return nil
	})
	if err != nil {
		t.Fatalf("waiting for %s: status %+v", what, last)
	}
	return last
}

// start runs an agent over node until the test ends or stop is called.
func (k *cluster) start(t *testing.T, node Node) (stop func()) {
	a := &Agent{API: k.api, Node: node, Name: k.name, Version: "itest", Log: slog.New(slog.NewTextHandler(testWriter{t}, nil)),
		Heartbeat: 200 * time.Millisecond, RetryMin: 10 * time.Millisecond, RetryMax: 200 * time.Millisecond}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- a.Run(ctx) }()
	stopped := false
	stop = func() {
		if stopped {
			return
		}
		stopped = true
		cancel()
		if err := <-done; !errors.Is(err, context.Canceled) {
			t.Errorf("agent: %v", err)
		}
	}
	t.Cleanup(stop)
	return stop
}

func TestAgentAgainstTheAPIServer(t *testing.T) {
	k := newCluster(t)
	node := newFakeNode(k.da)
	stop := k.start(t, node)
	st := k.waitStatus(t, "the first report", func(s v1alpha1.NodeSpawnNodeStatus) bool { return s.AgentVersion == "itest" })
	if st.Phase != v1alpha1.PhaseIdle || st.ActiveDigest != k.da {
		t.Errorf("first report %+v; want Idle on a", st)
	}
	k.setSpec(t, v1alpha1.NodeSpawnNodeSpec{ConfigName: k.cb, ConfigDigest: k.db, Prepare: true})
	k.waitStatus(t, "prepared", func(s v1alpha1.NodeSpawnNodeStatus) bool {
		return s.Phase == v1alpha1.PhasePrepared && s.PreparedDigest == k.db
	})
	k.setSpec(t, v1alpha1.NodeSpawnNodeSpec{ConfigName: k.cb, ConfigDigest: k.db, Prepare: true, Switch: true, SwitchID: "r/1"})
	st = k.waitStatus(t, "switched", func(s v1alpha1.NodeSpawnNodeStatus) bool {
		return s.Phase == v1alpha1.PhaseReady && s.ActiveDigest == k.db && s.SwitchID == "r/1"
	})
	if c := meta.FindStatusCondition(st.Conditions, ConditionReady); c == nil || c.Status != metav1.ConditionTrue || c.Reason != "Verified" {
		t.Errorf("Ready condition %+v", c)
	}
	if st.PreparedDigest != "" || st.PreviousDigest != k.da || st.SwitchFinished == nil || st.PrepareFinished == nil {
		t.Errorf("status %+v; want the prepared digest cleared (null in the patch), a kept", st)
	}
	err := kubetest.Eventually(context.Background(), func() error {
		var n corev1.Node
		if err := k.c.Client.Get(context.Background(), client.ObjectKey{Name: k.name}, &n); err != nil {
			return err
		}
		if got := n.Labels[v1alpha1.LabelConfigDigest]; got != v1alpha1.DigestLabelValue(k.db) {
			return fmt.Errorf("label %q", got)
		}
		return nil
	})
	if err != nil {
		t.Errorf("Node label: %v", err)
	}
	// Each transition is an Event on the Node, where kubectl describe node
	// looks (involvedObject kind Node, uid the node's name).
	want := []string{"Preparing", "Prepared", "Switching", "Ready"}
	var got []string
	err = kubetest.Eventually(context.Background(), func() error {
		var evs corev1.EventList
		if err := k.c.Client.List(context.Background(), &evs, client.InNamespace(metav1.NamespaceDefault)); err != nil {
			return err
		}
		slices.SortFunc(evs.Items, func(a, b corev1.Event) int { return strings.Compare(a.Name, b.Name) })
		got = nil
		for _, e := range evs.Items {
			if e.InvolvedObject.Kind == "Node" && e.InvolvedObject.Name == k.name && string(e.InvolvedObject.UID) == k.name && e.Source.Component == "nodespawn-agent" {
				got = append(got, e.Reason)
			}
		}
		if !slices.Equal(got, want) {
			return fmt.Errorf("events %q", got)
		}
		return nil
	})
	if err != nil {
		t.Errorf("Events on the Node: %q; want %q", got, want)
	}
	// The agent restarts (the switch may restart it): r/1 is not acted on
	// again, and the new agent reports.
	stop()
	before := st.Heartbeat
	k.start(t, node)
	k.waitStatus(t, "a heartbeat from the restarted agent", func(s v1alpha1.NodeSpawnNodeStatus) bool {
		return s.Heartbeat != nil && s.Heartbeat.After(before.Time) && s.Phase == v1alpha1.PhaseReady
	})
	if len(node.switched) != 1 {
		t.Errorf("switched %v; want once for r/1", node.switched)
	}
}

func TestAgentRefusesAConfigWhoseDigestDoesNotMatch(t *testing.T) {
	k := newCluster(t)
	ctx := context.Background()
	// A config that claims b's digest with another manifest.
	bad := kubetest.NameFor(t, "bad")
	other, _ := kubetest.FleetConfig(t, "other")
	mustCreate(t, k.c, &v1alpha1.NodeSpawnConfig{ObjectMeta: metav1.ObjectMeta{Name: bad}, Spec: v1alpha1.NodeSpawnConfigSpec{Manifest: other, Digest: k.db}})
	node := newFakeNode(k.da)
	k.start(t, node)
	k.setSpec(t, v1alpha1.NodeSpawnNodeSpec{ConfigName: bad, ConfigDigest: k.db, Prepare: true, Switch: true, SwitchID: "r/1"})
	st := k.waitStatus(t, "the refusal", func(s v1alpha1.NodeSpawnNodeStatus) bool { return s.Phase == v1alpha1.PhaseFailed })
	c := meta.FindStatusCondition(st.Conditions, ConditionConfigVerified)
	if c == nil || c.Status != metav1.ConditionFalse || c.Reason != "DigestMismatch" || !strings.Contains(st.LastError, "hashes to") {
		t.Errorf("ConfigVerified %+v, lastError %q", c, st.LastError)
	}
	if len(node.prepared) != 0 || len(node.switched) != 0 {
		t.Errorf("prepared %v, switched %v; want nothing done", node.prepared, node.switched)
	}
	_ = ctx
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(b []byte) (int, error) {
	w.t.Log(strings.TrimSpace(string(b)))
	return len(b), nil
}

// TestNodeWritesOnlyItsOwnNodeSpawnNode applies the deployment's node
// permissions (deploy/node-rbac.yaml: RBAC for system:nodes and the
// ValidatingAdmissionPolicy) and checks them with two nodes' own client
// certificates: node A writes its own status, is refused B's status, and
// cannot write any spec (it cannot grant itself a switch); it reads
// configs.
func TestNodeWritesOnlyItsOwnNodeSpawnNode(t *testing.T) {
	c := kubetest.Get(t)
	ctx := context.Background()
	c.Apply(t, "deploy/node-rbac.yaml")
	a, b, probe := kubetest.NameFor(t, "a"), kubetest.NameFor(t, "b"), kubetest.NameFor(t, "probe")
	for _, n := range []string{a, b, probe} {
		mustCreate(t, c, &v1alpha1.NodeSpawnNode{ObjectMeta: metav1.ObjectMeta{Name: n}})
	}
	m, d := kubetest.FleetConfig(t, "perm")
	cfgName := kubetest.NameFor(t, "cfg")
	mustCreate(t, c, &v1alpha1.NodeSpawnConfig{ObjectMeta: metav1.ObjectMeta{Name: cfgName}, Spec: v1alpha1.NodeSpawnConfigSpec{Manifest: m, Digest: d}})
	cfg := c.AddUser(t, "system:node:"+a, "system:nodes")
	api, err := NewHTTPAPI(Endpoint{Server: cfg.Host, CAPEM: cfg.CAData, Credentials: kubecheck.Credentials{CertPEM: cfg.CertData, KeyPEM: cfg.KeyData}})
	if err != nil {
		t.Fatal(err)
	}
	st := &v1alpha1.NodeSpawnNodeStatus{Phase: v1alpha1.PhaseIdle, AgentVersion: "perm"}
	// RBAC and the policy take a moment to be in force (the policy is
	// compiled on its first use): wait on a third object, so that B's is
	// written to only once, below.
	err = kubetest.Eventually(ctx, func() error {
		if err := api.PatchStatus(ctx, a, st); err != nil {
			return fmt.Errorf("own status: %w", err)
		}
		err := api.PatchStatus(ctx, probe, st)
		if err == nil || !strings.Contains(err.Error(), "may write only its own NodeSpawnNode") {
			return fmt.Errorf("another node's status not refused by the policy yet: %v", err)
		}
		return nil
	})
	if err != nil {
		t.Fatalf("node A and the policy: %v", err)
	}
	errB := api.PatchStatus(ctx, b, st)
	if errB == nil || !strings.Contains(errB.Error(), "may write only its own NodeSpawnNode") {
		t.Errorf("node A writing node B's status: %v; want it refused by the admission policy", errB)
	}
	t.Logf("node A writing B's status: %v", errB)
	var nb v1alpha1.NodeSpawnNode
	if err := c.Client.Get(ctx, client.ObjectKey{Name: b}, &nb); err != nil {
		t.Fatal(err)
	}
	if nb.Status.AgentVersion != "" {
		t.Errorf("node B's status was written by node A: %+v", nb.Status)
	}
	if _, err := api.GetConfig(ctx, cfgName); err != nil {
		t.Errorf("node A reading a config: %v", err)
	}
	// The spec is the controller's: a node's client may not write it,
	// not even its own (no grant to itself).
	nodeClient, err := client.New(cfg, client.Options{Scheme: c.Scheme})
	if err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{a, b} {
		var n v1alpha1.NodeSpawnNode
		if err := c.Client.Get(ctx, client.ObjectKey{Name: name}, &n); err != nil {
			t.Fatal(err)
		}
		n.Spec = v1alpha1.NodeSpawnNodeSpec{ConfigName: cfgName, ConfigDigest: d, Switch: true, SwitchID: "self/1"}
		if err := nodeClient.Update(ctx, &n); err == nil {
			t.Errorf("node A wrote the spec of %s (a switch grant to itself)", name)
		}
		if err := nodeClient.Delete(ctx, &n); err == nil {
			t.Errorf("node A deleted NodeSpawnNode %s", name)
		}
	}
}
