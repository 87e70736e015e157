package agent

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"slices"
	"strings"
	"testing"
	"time"

	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/nodespawn/nodespawn/api/v1alpha1"
	"github.com/nodespawn/nodespawn/internal/kubetest"
)

// fixture is an agent for node n1 running config "a" with config "b" in
// the cluster.
type fixture struct {
	api        *fakeAPI
	node       *fakeNode
	da, db     string
	configB    string
	manifestsB string
}

func newFixture(t *testing.T) *fixture {
	ma, da := kubetest.FleetConfig(t, "a")
	mb, db := kubetest.FleetConfig(t, "b")
	if da == db {
		t.Fatal("the two configs have one digest")
	}
	f := &fixture{
		api: &fakeAPI{
			node: &v1alpha1.NodeSpawnNode{ObjectMeta: metav1.ObjectMeta{Name: "n1", Generation: 1}},
			configs: map[string]*v1alpha1.NodeSpawnConfig{
				"a": {ObjectMeta: metav1.ObjectMeta{Name: "a"}, Spec: v1alpha1.NodeSpawnConfigSpec{Manifest: ma, Digest: da}},
				"b": {ObjectMeta: metav1.ObjectMeta{Name: "b"}, Spec: v1alpha1.NodeSpawnConfigSpec{Manifest: mb, Digest: db}},
			},
		},
		node: newFakeNode(da),
		da:   da, db: db, configB: "b", manifestsB: mb,
	}
	return f
}

func (f *fixture) agent() *Agent {
	return &Agent{API: f.api, Node: f.node, Name: "n1", Version: "test", Log: slog.New(slog.NewTextHandler(io.Discard, nil))}
}

func step(t *testing.T, a *Agent) {
	t.Helper()
	if err := a.Step(context.Background()); err != nil {
		t.Fatal(err)
	}
}

func cond(st v1alpha1.NodeSpawnNodeStatus, typ string) metav1.Condition {
	if c := meta.FindStatusCondition(st.Conditions, typ); c != nil {
		return *c
	}
	return metav1.Condition{}
}

func TestIdleReportsTheTruth(t *testing.T) {
	f := newFixture(t)
	step(t, f.agent())
	st := f.api.status()
	if st.Phase != v1alpha1.PhaseIdle || st.ActiveDigest != f.da || st.ActiveMachine != "kube1" || st.AgentVersion != "test" || st.Heartbeat == nil || st.ObservedGeneration != 1 {
		t.Errorf("status %+v; want Idle on kube1 with config a", st)
	}
	if c := cond(st, ConditionReady); c.Status != metav1.ConditionTrue || c.Reason != "Running" {
		t.Errorf("Ready %+v; want True, Running", c)
	}
	if got, want := f.api.labels[v1alpha1.LabelConfigDigest], v1alpha1.DigestLabelValue(f.da); got != want {
		t.Errorf("Node label %q, want %q", got, want)
	}
}

func TestPrepareThenSwitchOncePerSwitchID(t *testing.T) {
	f := newFixture(t)
	a := f.agent()
	f.api.setSpec(v1alpha1.NodeSpawnNodeSpec{ConfigName: "b", ConfigDigest: f.db, Prepare: true})
	step(t, a)
	st := f.api.status()
	if !slices.Equal(f.node.prepared, []string{f.db}) || st.Phase != v1alpha1.PhasePrepared || st.PreparedDigest != f.db || st.PrepareFinished == nil {
		t.Fatalf("prepared %v, status %+v; want b prepared", f.node.prepared, st)
	}
	if c := cond(st, ConditionConfigVerified); c.Status != metav1.ConditionTrue {
		t.Errorf("ConfigVerified %+v", c)
	}
	step(t, a)
	if len(f.node.prepared) != 1 || len(f.node.switched) != 0 {
		t.Fatalf("a second step prepared %v, switched %v; want nothing more", f.node.prepared, f.node.switched)
	}
	f.api.setSpec(v1alpha1.NodeSpawnNodeSpec{ConfigName: "b", ConfigDigest: f.db, Prepare: true, Switch: true, SwitchID: "r/1"})
	step(t, a)
	st = f.api.status()
	if !slices.Equal(f.node.switched, []string{f.db}) || st.Phase != v1alpha1.PhaseReady || st.ActiveDigest != f.db || st.PreviousDigest != f.da || st.SwitchID != "r/1" || st.SwitchFinished == nil {
		t.Fatalf("switched %v, status %+v; want switched to b once", f.node.switched, st)
	}
	if c := cond(st, ConditionReady); c.Status != metav1.ConditionTrue || c.Reason != "Verified" || c.ObservedGeneration != 3 {
		t.Errorf("Ready %+v; want True, Verified, generation 3", c)
	}
	if got := f.api.labels[v1alpha1.LabelConfigDigest]; got != v1alpha1.DigestLabelValue(f.db) {
		t.Errorf("Node label %q; want b's digest", got)
	}
	if ph := f.api.phases(); !slices.Contains(ph, v1alpha1.PhasePreparing) || !slices.Contains(ph, v1alpha1.PhaseSwitching) {
		t.Errorf("phases reported %v; want Preparing and Switching among them", ph)
	}
	// Every transition is an Event on the Node, once.
	wantEvents := []string{"Preparing", "Prepared", "Switching", "Ready"}
	if got := f.api.reasons(); !slices.Equal(got, wantEvents) {
		t.Errorf("Events %q; want %q", f.api.events, wantEvents)
	}
	// Again, and after a restart: the grant is used up, and the phase the
	// status holds is no new transition.
	step(t, a)
	step(t, f.agent())
	if len(f.node.switched) != 1 {
		t.Errorf("switched %v; want once for r/1", f.node.switched)
	}
	if got := f.api.reasons(); !slices.Equal(got, wantEvents) {
		t.Errorf("after a restart, Events %q; want still %q", f.api.events, wantEvents)
	}
}

func TestSwitchIsNotRepeatedAfterACrashMidSwitch(t *testing.T) {
	for _, rollsBack := range []bool{false, true} {
		t.Run(map[bool]string{false: "resume-switches", true: "resume-rolls-back"}[rollsBack], func(t *testing.T) {
			f := newFixture(t)
			f.api.setSpec(v1alpha1.NodeSpawnNodeSpec{ConfigName: "b", ConfigDigest: f.db, Prepare: true, Switch: true, SwitchID: "r/1"})
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			a := f.agent()
			// The switch kills the agent: its context ends with the
			// switch half-done.
			f.node.switchErr = "crash"
			a.Node = crashingNode{f.node, cancel}
			if err := a.Step(ctx); !errors.Is(err, context.Canceled) {
				t.Fatalf("step: %v; want the agent stopped mid-switch", err)
			}
			if f.node.agent.SwitchID != "r/1" || f.node.agent.Phase != string(v1alpha1.PhaseSwitching) {
				t.Fatalf("agent state %+v; want r/1 recorded before the switch", f.node.agent)
			}
			// The restarted agent finishes the switch (as apply's resume
			// does), reports how it ended, and never switches again for
			// r/1.
			f.node.switchErr, f.node.resumeRollsBack = "", rollsBack
			b := f.agent()
			step(t, b)
			step(t, b)
			st := f.api.status()
			want, digest := v1alpha1.PhaseReady, f.db
			if rollsBack {
				want, digest = v1alpha1.PhaseRolledBack, f.da
			}
			if len(f.node.switched) != 1 || len(f.node.prepared) != 1 || f.node.resumed != 1 || st.Phase != want || st.ActiveDigest != digest {
				t.Errorf("prepared %v, switched %v, resumed %d, status %+v; want one switch, finished by the restart", f.node.prepared, f.node.switched, f.node.resumed, st)
			}
		})
	}
}

// While the switch waits for the new machine's Node to turn Ready, the
// status says Verifying (the node's state is read beside the switch call),
// with an Event; a kill in that phase is settled by the restarted agent
// without a second switch.
func TestVerifyingIsReportedDuringTheSwitch(t *testing.T) {
	for _, killed := range []bool{false, true} {
		t.Run(map[bool]string{false: "finishes", true: "killed-while-verifying"}[killed], func(t *testing.T) {
			f := newFixture(t)
			f.node.verifyGate = make(chan struct{})
			f.api.setSpec(v1alpha1.NodeSpawnNodeSpec{ConfigName: "b", ConfigDigest: f.db, Prepare: true})
			a := f.agent()
			a.VerifyPoll = 5 * time.Millisecond
			step(t, a)
			f.api.setSpec(v1alpha1.NodeSpawnNodeSpec{ConfigName: "b", ConfigDigest: f.db, Prepare: true, Switch: true, SwitchID: "r/1"})
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			errc := make(chan error, 1)
			go func() { errc <- a.Step(ctx) }()
			deadline := time.Now().Add(10 * time.Second)
			for f.api.status().Phase != v1alpha1.PhaseVerifying {
				if time.Now().After(deadline) {
					t.Fatalf("phases %v; Verifying never reported while the switch waited", f.api.phases())
				}
				time.Sleep(time.Millisecond)
			}
			if c := cond(f.api.status(), ConditionReady); c.Status != metav1.ConditionFalse || c.Reason != "Switching" {
				t.Errorf("Ready while verifying %+v; want False, Switching", c)
			}
			if ag, _ := f.node.Agent(); ag.Phase != string(v1alpha1.PhaseVerifying) || ag.SwitchID != "r/1" {
				t.Errorf("agent state while verifying %+v; want Verifying for r/1", ag)
			}
			if killed {
				cancel()
			} else {
				close(f.node.verifyGate)
			}
			if err := <-errc; (err != nil) != killed {
				t.Fatalf("step: %v", err)
			}
			if killed {
				f.node.verifyGate = nil
				step(t, f.agent())
			}
			st := f.api.status()
			if st.Phase != v1alpha1.PhaseReady || st.ActiveDigest != f.db || len(f.node.switched) != 1 {
				t.Errorf("switched %v, status %+v; want Ready on b after one switch", f.node.switched, st)
			}
			want := []string{"Preparing", "Prepared", "Switching", "Verifying", "Ready"}
			if got := f.api.reasons(); !slices.Equal(got, want) {
				t.Errorf("Events %q; want %q", f.api.events, want)
			}
		})
	}
}

// crashingNode cancels the agent's context when the switch starts.
type crashingNode struct {
	*fakeNode
	cancel context.CancelFunc
}

func (c crashingNode) Switch(ctx context.Context, digest string) error {
	err := c.fakeNode.Switch(ctx, digest)
	c.cancel()
	return err
}

func TestConfigWithAnotherDigestIsRefused(t *testing.T) {
	for name, tamper := range map[string]func(c *v1alpha1.NodeSpawnConfig){
		"manifest changed": func(c *v1alpha1.NodeSpawnConfig) {
			c.Spec.Manifest = strings.Replace(c.Spec.Manifest, "pool: b", "pool: evil", 1)
		},
		"digest field": func(c *v1alpha1.NodeSpawnConfig) { c.Spec.Digest = "sha256:" + strings.Repeat("0", 64) },
		"with a secret": func(c *v1alpha1.NodeSpawnConfig) {
			c.Spec.Manifest += "\n  auth: {bootstrapToken: abcdef.0123456789abcdef}\n"
		},
	} {
		t.Run(name, func(t *testing.T) {
			f := newFixture(t)
			tamper(f.api.configs["b"])
			f.api.setSpec(v1alpha1.NodeSpawnNodeSpec{ConfigName: "b", ConfigDigest: f.db, Prepare: true, Switch: true, SwitchID: "r/1"})
			step(t, f.agent())
			st := f.api.status()
			c := cond(st, ConditionConfigVerified)
			if len(f.node.prepared) != 0 || len(f.node.switched) != 0 || st.Phase != v1alpha1.PhaseFailed || c.Status != metav1.ConditionFalse || st.LastError == "" {
				t.Errorf("prepared %v, switched %v, status %+v; want refused, nothing done", f.node.prepared, f.node.switched, st)
			}
			if strings.Contains(st.LastError, "0123456789abcdef") {
				t.Errorf("the status shows the token: %s", st.LastError)
			}
			t.Logf("%s: %s", c.Reason, st.LastError)
		})
	}
}

func TestRolledBackSwitchIsReported(t *testing.T) {
	f := newFixture(t)
	f.node.switchErr = "rollback"
	f.api.setSpec(v1alpha1.NodeSpawnNodeSpec{ConfigName: "b", ConfigDigest: f.db, Prepare: true, Switch: true, SwitchID: "r/1"})
	step(t, f.agent())
	st := f.api.status()
	if st.Phase != v1alpha1.PhaseRolledBack || st.ActiveDigest != f.da || !strings.Contains(st.LastError, "rolled back") {
		t.Errorf("status %+v; want RolledBack on a", st)
	}
	if c := cond(st, ConditionReady); c.Status != metav1.ConditionFalse || c.Reason != "RolledBack" {
		t.Errorf("Ready %+v; want False, RolledBack", c)
	}
	if n := len(f.api.events); n == 0 || !strings.HasPrefix(f.api.events[n-1], "Warning RolledBack: rolled back to machine kube1: ") {
		t.Errorf("Events %q; want the last a Warning, RolledBack, naming the machine", f.api.events)
	}
	// Not again for the same grant; a new grant prepares and tries again.
	step(t, f.agent())
	if len(f.node.switched) != 1 {
		t.Errorf("switched %v; want once for r/1", f.node.switched)
	}
	f.node.switchErr = ""
	f.api.setSpec(v1alpha1.NodeSpawnNodeSpec{ConfigName: "b", ConfigDigest: f.db, Prepare: true, Switch: true, SwitchID: "r/2"})
	step(t, f.agent())
	if st := f.api.status(); st.Phase != v1alpha1.PhaseReady || st.ActiveDigest != f.db || len(f.node.switched) != 2 {
		t.Errorf("status %+v after grant r/2; want Ready on b", st)
	}
}

func TestBackToThePreviousConfigRollsBack(t *testing.T) {
	f := newFixture(t)
	f.node.ns.ActiveDigest, f.node.ns.PreviousDigest = f.db, f.da
	f.api.setSpec(v1alpha1.NodeSpawnNodeSpec{ConfigName: "a", ConfigDigest: f.da, Prepare: true, Switch: true, SwitchID: "back/1"})
	step(t, f.agent())
	st := f.api.status()
	if f.node.rolled != 1 || len(f.node.prepared) != 0 || st.Phase != v1alpha1.PhaseReady || st.ActiveDigest != f.da {
		t.Errorf("rolled back %d, prepared %v, status %+v; want one rollback, no prepare", f.node.rolled, f.node.prepared, st)
	}
}

func TestFailedPrepareIsReportedAndRetriedLater(t *testing.T) {
	f := newFixture(t)
	f.node.prepareErr = errors.New("mirror down")
	now := time.Date(2026, 12, 5, 10, 0, 0, 0, time.UTC)
	a := f.agent()
	a.Now = func() time.Time { return now }
	f.api.setSpec(v1alpha1.NodeSpawnNodeSpec{ConfigName: "b", ConfigDigest: f.db, Prepare: true})
	step(t, a)
	if st := f.api.status(); st.Phase != v1alpha1.PhaseFailed || !strings.Contains(st.LastError, "mirror down") {
		t.Errorf("status %+v; want Failed with the error", st)
	}
	step(t, a) // within the backoff: not again
	if len(f.node.prepared) != 1 {
		t.Errorf("prepared %d times within the backoff", len(f.node.prepared))
	}
	f.node.prepareErr = nil
	now = now.Add(time.Hour)
	step(t, a)
	if st := f.api.status(); len(f.node.prepared) != 2 || st.Phase != v1alpha1.PhasePrepared || st.LastError != "" {
		t.Errorf("prepared %v, status %+v; want prepared on the retry", f.node.prepared, st)
	}
}

// Run acts on a watch event and survives an API server that is down.
func TestRunActsOnWatchEventsAndRetries(t *testing.T) {
	f := newFixture(t)
	f.api.down = 3
	a := f.agent()
	a.Heartbeat, a.RetryMin, a.RetryMax = time.Hour, time.Millisecond, 10*time.Millisecond
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- a.Run(ctx) }()
	// The first report comes once the API server answers; then a spec
	// change arrives by the watch (the heartbeat is an hour away).
	for deadline := time.Now().Add(20 * time.Second); ; {
		if f.api.status().AgentVersion != "" {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("no status reported")
		}
		time.Sleep(5 * time.Millisecond)
	}
	for deadline := time.Now().Add(20 * time.Second); f.api.status().Phase != v1alpha1.PhasePrepared; {
		if f.api.watching() {
			f.api.setSpec(v1alpha1.NodeSpawnNodeSpec{ConfigName: "b", ConfigDigest: f.db, Prepare: true})
		}
		if time.Now().After(deadline) {
			t.Fatalf("the spec change was not acted on: %+v", f.api.status())
		}
		time.Sleep(20 * time.Millisecond)
	}
	cancel()
	if err := <-done; !errors.Is(err, context.Canceled) {
		t.Errorf("Run: %v", err)
	}
}
