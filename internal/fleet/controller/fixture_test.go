package controller_test

// The fixture: the controller in-process (a controller-runtime manager on
// the shared kubetest control plane, authenticated as the controller's
// service account with deploy/controller's RBAC), fake Nodes (plain Node
// objects whose Ready condition the test keeps), and per node the real
// agent (package agent, over its HTTP client) driving a scripted host in
// memory (host: package agent's Node). Until package agent/host took
// provision (and go-nvml's cgo) out of package agent, a test binary with
// the controller and the agent could not load, and these tests ran a copy
// of the agent.

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"slices"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/client-go/rest"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/config"
	"sigs.k8s.io/controller-runtime/pkg/log/zap"
	"sigs.k8s.io/controller-runtime/pkg/manager"
	metricsserver "sigs.k8s.io/controller-runtime/pkg/metrics/server"

	"github.com/nodespawn/nodespawn/agent"
	v1alpha1 "github.com/nodespawn/nodespawn/api/v1alpha1"
	"github.com/nodespawn/nodespawn/internal/fleet/controller"
	"github.com/nodespawn/nodespawn/internal/kubecheck"
	"github.com/nodespawn/nodespawn/internal/kubetest"
	"github.com/nodespawn/nodespawn/manifest"
	"github.com/nodespawn/nodespawn/state"
)

func TestMain(m *testing.M) {
	// controller-runtime's global logger (each manager gets its own).
	ctrl.SetLogger(zap.New(zap.WriteTo(io.Discard)))
	os.Exit(kubetest.Main(m))
}

// groupLabel keeps each test's Nodes apart on the shared control plane:
// every rollout selects its own test's group.
const groupLabel = "test.nodespawn.dev/group"

// The controller's identity, as deploy/controller/controller.yaml runs it.
const controllerUser = "system:serviceaccount:nodespawn-system:nodespawn-controller"

// logSink collects a test's controller and agent logs; they are printed
// (the tail) only when the test fails.
type logSink struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *logSink) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *logSink) tail(n int) string {
	l.mu.Lock()
	defer l.mu.Unlock()
	s := l.b.String()
	if len(s) > n {
		s = "...\n" + s[len(s)-n:]
	}
	return s
}

type fixture struct {
	t       testing.TB
	c       *kubetest.Cluster
	ctx     context.Context
	group   string
	log     *logSink
	ctrlCfg *rest.Config

	oldCfg, newCfg       string
	oldDigest, newDigest string

	mu       sync.Mutex
	nodes    []string
	hosts    map[string]*host
	rollouts []string
	// inSwitch counts hosts between the start and the end of a switch
	// (a crashed agent's switch lasts until its restart finishes it);
	// maxInSwitch is its peak.
	inSwitch, maxInSwitch int

	apiMu sync.Mutex
	api   agent.API
}

func newFixture(t testing.TB) *fixture {
	c := kubetest.Get(t)
	f := &fixture{t: t, c: c, group: kubetest.NameFor(t, ""), log: &logSink{}, hosts: map[string]*host{}}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("controller and agent logs (tail):\n%s", f.log.tail(60000))
		}
	})
	ctx, cancel := context.WithCancel(context.Background())
	f.ctx = ctx
	t.Cleanup(cancel)
	t.Cleanup(f.deleteObjects)

	// The controller runs with the RBAC it is deployed with.
	c.Apply(t, "deploy/controller/controller.yaml")
	f.ctrlCfg = c.AddUser(t, controllerUser, "system:serviceaccounts", "system:serviceaccounts:nodespawn-system")
	cc, err := client.New(f.ctrlCfg, client.Options{Scheme: c.Scheme})
	if err != nil {
		t.Fatal(err)
	}
	if err := kubetest.Eventually(ctx, func() error {
		var l v1alpha1.NodeSpawnRolloutList
		return cc.List(ctx, &l, client.Limit(1))
	}); err != nil {
		t.Fatalf("the controller's RBAC: %v", err)
	}

	var oldM, newM string
	oldM, f.oldDigest = kubetest.FleetConfig(t, "a")
	newM, f.newDigest = kubetest.FleetConfig(t, "b")
	f.oldCfg, f.newCfg = kubetest.NameFor(t, "a"), kubetest.NameFor(t, "b")
	f.create(&v1alpha1.NodeSpawnConfig{ObjectMeta: metav1.ObjectMeta{Name: f.oldCfg}, Spec: v1alpha1.NodeSpawnConfigSpec{Manifest: oldM, Digest: f.oldDigest}})
	f.create(&v1alpha1.NodeSpawnConfig{ObjectMeta: metav1.ObjectMeta{Name: f.newCfg}, Spec: v1alpha1.NodeSpawnConfigSpec{Manifest: newM, Digest: f.newDigest}})
	return f
}

func (f *fixture) create(o client.Object) {
	f.t.Helper()
	if err := f.c.Client.Create(f.ctx, o); err != nil {
		f.t.Fatal(err)
	}
}

// deleteObjects removes the test's Nodes, NodeSpawnNodes and rollouts
// (no garbage collector runs here), so that later tests' controllers do
// not carry them.
func (f *fixture) deleteObjects() {
	ctx := context.Background()
	f.mu.Lock()
	nodes, rollouts := append([]string(nil), f.nodes...), append([]string(nil), f.rollouts...)
	f.mu.Unlock()
	for _, r := range rollouts {
		_ = f.c.Client.Delete(ctx, &v1alpha1.NodeSpawnRollout{ObjectMeta: metav1.ObjectMeta{Name: r}})
	}
	for _, n := range nodes {
		_ = f.c.Client.Delete(ctx, &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: n}})
		_ = f.c.Client.Delete(ctx, &v1alpha1.NodeSpawnNode{ObjectMeta: metav1.ObjectMeta{Name: n}})
	}
}

// ---------------------------------------------------------------------------
// The controller

type controllerHandle struct {
	mgr    manager.Manager
	reg    *prometheus.Registry
	cancel context.CancelFunc
	done   chan error
	once   sync.Once
}

// leaderElection, when ID is set, runs the manager with Lease leader
// election in nodespawn-system (short durations: a test waits for one
// failover). Without release on cancel: a stopped leader is a crashed one,
// whose Lease must expire.
type leaderElection struct{ ID string }

// startController runs the controller in-process until the test ends (or
// stop). Metrics go to a registry of its own.
func (f *fixture) startController(le leaderElection) *controllerHandle {
	f.t.Helper()
	skip := true
	opts := ctrl.Options{
		Scheme:                 f.c.Scheme,
		Metrics:                metricsserver.Options{BindAddress: "0"},
		HealthProbeBindAddress: "0",
		Logger:                 zap.New(zap.WriteTo(f.log), zap.UseDevMode(true)),
		// Every test (and the failover test's two managers) registers
		// the same controller names in one process.
		Controller: config.Controller{SkipNameValidation: &skip},
	}
	if le.ID != "" {
		lease, renew, retry := 4*time.Second, 3*time.Second, 500*time.Millisecond
		opts.LeaderElection = true
		opts.LeaderElectionID = le.ID
		opts.LeaderElectionNamespace = "nodespawn-system"
		opts.LeaseDuration, opts.RenewDeadline, opts.RetryPeriod = &lease, &renew, &retry
	}
	mgr, err := ctrl.NewManager(f.ctrlCfg, opts)
	if err != nil {
		f.t.Fatal(err)
	}
	h := &controllerHandle{mgr: mgr, reg: prometheus.NewRegistry(), done: make(chan error, 1)}
	if err := controller.Setup(mgr, controller.Options{Registry: h.reg}); err != nil {
		f.t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	h.cancel = cancel
	go func() { h.done <- mgr.Start(ctx) }()
	f.t.Cleanup(func() { h.stop(f.t) })
	return h
}

// stop cancels the manager's context and waits for it to return.
func (h *controllerHandle) stop(t testing.TB) {
	h.once.Do(func() {
		h.cancel()
		select {
		case err := <-h.done:
			if err != nil && !strings.Contains(err.Error(), "leader election lost") {
				t.Errorf("manager: %v", err)
			}
		case <-time.After(60 * time.Second):
			t.Errorf("the manager did not stop within 60s")
		}
	})
}

// ---------------------------------------------------------------------------
// Nodes and agents

type behaviour int

const (
	succeed  behaviour = iota
	rollBack           // the new machine never comes up: rolled back
	hang               // the switch never ends
	crash              // the agent dies mid-switch; restarted later, it finishes the switch
)

// nodeOpts script one fake node.
type nodeOpts struct {
	behaviour behaviour
	// switchTime is how long a switch takes (the node is NotReady).
	switchTime time.Duration
	// hold, when set, keeps a switch from going on until it is closed.
	hold chan struct{}
	// crashPause is how long a crashed agent stays down (crash).
	crashPause time.Duration
	// active is the config the node runs at first (default: old).
	active string
	// cordoned: someone else (no rollout's mark) cordoned the Node.
	cordoned bool
	// labels are added to the Node's.
	labels map[string]string
}

// nodeStatus is what a host says of itself.
type nodeStatus = agent.NodeStatus

// agentAPI is the API the agents use: package agent's HTTP client, with a
// client certificate of the cluster's admins (one for all the fixture's
// agents; the node's own permissions are package agent's tests).
func (f *fixture) agentAPI() agent.API {
	f.apiMu.Lock()
	defer f.apiMu.Unlock()
	if f.api == nil {
		cfg := f.c.AddUser(f.t, kubetest.NameFor(f.t, "agents"), "system:masters")
		api, err := agent.NewHTTPAPI(agent.Endpoint{Server: cfg.Host, CAPEM: cfg.CAData,
			Credentials: kubecheck.Credentials{CertPEM: cfg.CertData, KeyPEM: cfg.KeyData}})
		if err != nil {
			f.t.Fatal(err)
		}
		f.api = api
	}
	return f.api
}

// host is the node's side of the agent (package agent's Node) in memory.
type host struct {
	f    *fixture
	name string
	opts nodeOpts

	mu       sync.Mutex
	ns       nodeStatus
	st       state.Agent
	switched []string // digests switched to, one per switch started
	ids      []string // the distinct switch grants the agent took up
	started  chan struct{}
	kill     context.CancelFunc
	inSwitch bool
}

// addNodes creates Nodes named after the test with the suffixes given,
// each Ready and enrolled, and starts their agents.
func (f *fixture) addNode(suffix string, o nodeOpts) string {
	f.t.Helper()
	name := kubetest.NameFor(f.t, suffix)
	if o.active == "" {
		o.active = f.oldDigest
	}
	if o.switchTime == 0 {
		o.switchTime = 200 * time.Millisecond
	}
	n := &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: name, Labels: map[string]string{
		v1alpha1.LabelManaged: "true", groupLabel: f.group,
	}}, Spec: corev1.NodeSpec{Unschedulable: o.cordoned}}
	for k, v := range o.labels {
		n.Labels[k] = v
	}
	f.create(n)
	f.mu.Lock()
	f.nodes = append(f.nodes, name)
	f.mu.Unlock()
	f.setReady(name, true)
	h := &host{f: f, name: name, opts: o, started: make(chan struct{}, 16),
		ns: nodeStatus{NodeName: name, ActiveMachine: "kube1", ActiveDigest: o.active}}
	f.mu.Lock()
	f.hosts[name] = h
	f.mu.Unlock()
	f.runAgent(h)
	return name
}

// setReady sets the Node's Ready condition, as its kubelet would.
func (f *fixture) setReady(name string, ready bool) {
	s := corev1.ConditionFalse
	if ready {
		s = corev1.ConditionTrue
	}
	ctx := context.Background()
	err := kubetest.Eventually(ctx, func() error {
		var n corev1.Node
		if err := f.c.Client.Get(ctx, client.ObjectKey{Name: name}, &n); err != nil {
			if apierrors.IsNotFound(err) {
				return nil // the test is over
			}
			return err
		}
		now := metav1.Now()
		for _, c := range n.Status.Conditions {
			if c.Type == corev1.NodeReady && c.Status == s {
				return nil
			}
		}
		n.Status.Conditions = []corev1.NodeCondition{{Type: corev1.NodeReady, Status: s, Reason: "KubeletReady",
			LastHeartbeatTime: now, LastTransitionTime: now}}
		return f.c.Client.Status().Update(ctx, &n)
	})
	if err != nil {
		f.t.Errorf("setting Node %s Ready=%s: %v", name, s, err)
	}
}

// runAgent runs the agent (package agent) over h until the test ends. A crashed
// agent (h.kill) is restarted after the crash pause, as systemd would.
func (f *fixture) runAgent(h *host) {
	api := f.agentAPI()
	done := make(chan struct{})
	lg := slog.New(slog.NewTextHandler(f.log, &slog.HandlerOptions{Level: slog.LevelInfo})).With("node", h.name)
	life, end := context.WithCancel(f.ctx)
	go func() {
		defer close(done)
		for life.Err() == nil {
			ctx, kill := context.WithCancel(life)
			h.mu.Lock()
			h.kill = kill
			h.mu.Unlock()
			a := &agent.Agent{API: api, Node: h, Name: h.name, Version: "ctest", Log: lg,
				Heartbeat: time.Second, RetryMin: 100 * time.Millisecond, RetryMax: time.Second}
			if err := a.Run(ctx); err != nil && ctx.Err() == nil {
				lg.Error("agent", "error", err)
			}
			kill()
			if life.Err() != nil {
				return
			}
			lg.Info("test: the agent crashed; restarting it later", "in", h.opts.crashPause)
			sleep(life, h.opts.crashPause)
		}
	}()
	f.t.Cleanup(func() {
		end()
		<-done
	})
}

func sleep(ctx context.Context, d time.Duration) {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
	case <-t.C:
	}
}

func (h *host) Status(context.Context) (*nodeStatus, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	ns := h.ns
	return &ns, nil
}

// Resume finishes a switch a crashed agent left (its new machine comes
// up), as apply's resume does.
func (h *host) Resume(context.Context) error {
	h.mu.Lock()
	switching := h.ns.Switching
	h.mu.Unlock()
	if !switching {
		return nil
	}
	h.f.setReady(h.name, true)
	h.mu.Lock()
	h.finishSwitch()
	h.mu.Unlock()
	h.endSwitch()
	return nil
}

func (h *host) finishSwitch() {
	h.ns.PreviousDigest, h.ns.ActiveDigest, h.ns.PreparedDigest, h.ns.Switching = h.ns.ActiveDigest, h.ns.PreparedDigest, "", false
	h.ns.ActiveMachine = map[string]string{"kube1": "kube2", "kube2": "kube1"}[h.ns.ActiveMachine]
	h.ns.Last = &state.UpgradeOutcome{Outcome: state.OutcomeSwitched}
}

func (h *host) Prepare(_ context.Context, m *manifest.Manifest, digest string) error {
	if d, err := m.ConfigDigest(); err != nil || d.String() != digest {
		return fmt.Errorf("fake: prepare given the manifest of %v for %s", d, digest)
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	h.ns.PreparedDigest = digest
	return nil
}

type rolledBack struct{ error }

func (rolledBack) RolledBackTo() string { return "kube1" }

func (h *host) beginSwitch() {
	h.mu.Lock()
	h.inSwitch = true
	h.mu.Unlock()
	h.f.mu.Lock()
	h.f.inSwitch++
	h.f.maxInSwitch = max(h.f.maxInSwitch, h.f.inSwitch)
	h.f.mu.Unlock()
}

func (h *host) endSwitch() {
	h.mu.Lock()
	was := h.inSwitch
	h.inSwitch = false
	h.mu.Unlock()
	if was {
		h.f.mu.Lock()
		h.f.inSwitch--
		h.f.mu.Unlock()
	}
}

// Switch is the scripted switch: the node goes NotReady (its kubelet
// restarts on the other machine), and after switchTime (and hold) comes
// back on the new machine, or rolls back, hangs, or the agent dies.
func (h *host) Switch(ctx context.Context, digest string) error {
	h.mu.Lock()
	h.switched = append(h.switched, digest)
	prepared := h.ns.PreparedDigest
	h.mu.Unlock()
	if prepared != digest {
		return fmt.Errorf("fake: switch to %s, prepared %s", digest, prepared)
	}
	h.beginSwitch()
	select {
	case h.started <- struct{}{}:
	default:
	}
	h.f.setReady(h.name, false)
	if h.opts.hold != nil {
		select {
		case <-h.opts.hold:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	sleep(ctx, h.opts.switchTime)
	if ctx.Err() != nil {
		return ctx.Err()
	}
	switch h.opts.behaviour {
	case hang:
		<-ctx.Done()
		return ctx.Err()
	case crash:
		// Killed mid-switch: the switch is left half-done, the agent
		// reports nothing until it is restarted, and its restart
		// (Resume) finishes the switch.
		h.mu.Lock()
		h.ns.Switching = true
		h.opts.behaviour = succeed // one crash
		kill := h.kill
		h.mu.Unlock()
		kill()
		return ctx.Err()
	case rollBack:
		h.f.setReady(h.name, true)
		h.mu.Lock()
		h.ns.PreparedDigest = ""
		h.ns.Last = &state.UpgradeOutcome{Outcome: state.OutcomeRolledBack, Reason: "node not Ready"}
		h.mu.Unlock()
		h.endSwitch()
		return rolledBack{errors.New("upgrade from kube1 to kube2 rolled back: node not Ready")}
	}
	h.f.setReady(h.name, true)
	h.mu.Lock()
	h.finishSwitch()
	h.mu.Unlock()
	h.endSwitch()
	return nil
}

func (h *host) Rollback(context.Context) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.ns.ActiveDigest, h.ns.PreviousDigest = h.ns.PreviousDigest, h.ns.ActiveDigest
	h.ns.ActiveMachine = map[string]string{"kube1": "kube2", "kube2": "kube1"}[h.ns.ActiveMachine]
	h.ns.Last = &state.UpgradeOutcome{Outcome: state.OutcomeManualRollback}
	return nil
}

func (h *host) Agent() (*state.Agent, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	a := h.st
	return &a, nil
}

func (h *host) WriteAgent(a *state.Agent) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.st = *a
	if a.SwitchID != "" && !slices.Contains(h.ids, a.SwitchID) {
		h.ids = append(h.ids, a.SwitchID)
	}
	return nil
}

func (h *host) grants() []string {
	h.mu.Lock()
	defer h.mu.Unlock()
	return append([]string(nil), h.ids...)
}

func (h *host) switches() []string {
	h.mu.Lock()
	defer h.mu.Unlock()
	return append([]string(nil), h.switched...)
}

// ---------------------------------------------------------------------------
// Rollouts and waiting

// rollout creates a rollout of the new config over the test's group
// (maxUnavailable 1, drain, failure budget 1 unless mod says otherwise).
func (f *fixture) rollout(mod func(*v1alpha1.NodeSpawnRolloutSpec)) string {
	f.t.Helper()
	return f.rolloutNamed("ro", mod)
}

// rolloutNamed is rollout with the name's suffix given (a test's second
// rollout).
func (f *fixture) rolloutNamed(suffix string, mod func(*v1alpha1.NodeSpawnRolloutSpec)) string {
	f.t.Helper()
	one := intstr.FromInt32(1)
	ro := &v1alpha1.NodeSpawnRollout{ObjectMeta: metav1.ObjectMeta{Name: kubetest.NameFor(f.t, suffix)}, Spec: v1alpha1.NodeSpawnRolloutSpec{
		ConfigName:    f.newCfg,
		NodeSelector:  &metav1.LabelSelector{MatchLabels: map[string]string{groupLabel: f.group}},
		Strategy:      v1alpha1.RolloutStrategy{MaxUnavailable: &one},
		Disruption:    v1alpha1.Disruption{Mode: v1alpha1.DisruptionDrain},
		FailureBudget: 1,
	}}
	if mod != nil {
		mod(&ro.Spec)
	}
	f.create(ro)
	f.mu.Lock()
	f.rollouts = append(f.rollouts, ro.Name)
	f.mu.Unlock()
	return ro.Name
}

// waitEnrolled waits until every node has its NodeSpawnNode with a first
// report of its agent.
func (f *fixture) waitEnrolled() {
	f.t.Helper()
	f.mu.Lock()
	nodes := append([]string(nil), f.nodes...)
	f.mu.Unlock()
	for _, n := range nodes {
		f.waitNSN(n, "its agent's first report", 30*time.Second, func(nsn *v1alpha1.NodeSpawnNode) bool {
			return nsn.Status.AgentVersion == "ctest" && nsn.Status.ActiveDigest != ""
		})
	}
}

func (f *fixture) getRollout(name string) *v1alpha1.NodeSpawnRollout {
	var ro v1alpha1.NodeSpawnRollout
	if err := f.c.Client.Get(f.ctx, client.ObjectKey{Name: name}, &ro); err != nil {
		f.t.Fatal(err)
	}
	return &ro
}

func (f *fixture) getNSN(name string) *v1alpha1.NodeSpawnNode {
	var nsn v1alpha1.NodeSpawnNode
	if err := f.c.Client.Get(f.ctx, client.ObjectKey{Name: name}, &nsn); err != nil {
		f.t.Fatal(err)
	}
	return &nsn
}

func (f *fixture) getNode(name string) *corev1.Node {
	var n corev1.Node
	if err := f.c.Client.Get(f.ctx, client.ObjectKey{Name: name}, &n); err != nil {
		f.t.Fatal(err)
	}
	return &n
}

// poll calls ok every 50ms until it returns true or timeout passes (then
// the test fails, saying what and last). It waits on the system under
// test; it is not a timed assertion (the timeouts are generous).
func (f *fixture) poll(what string, timeout time.Duration, ok func() (bool, string)) {
	f.t.Helper()
	deadline := time.Now().Add(timeout)
	last := ""
	for {
		done, s := ok()
		if done {
			return
		}
		last = s
		if time.Now().After(deadline) {
			f.t.Fatalf("waiting %s for %s; last seen: %s", timeout, what, last)
		}
		sleep(f.ctx, 50*time.Millisecond)
		if f.ctx.Err() != nil {
			f.t.Fatalf("waiting for %s: %v", what, f.ctx.Err())
		}
	}
}

func (f *fixture) waitRollout(name, what string, timeout time.Duration, ok func(*v1alpha1.NodeSpawnRollout) bool) *v1alpha1.NodeSpawnRollout {
	f.t.Helper()
	var ro *v1alpha1.NodeSpawnRollout
	f.poll("rollout "+what, timeout, func() (bool, string) {
		ro = f.getRollout(name)
		return ok(ro), describeRollout(ro)
	})
	return ro
}

func (f *fixture) waitNSN(name, what string, timeout time.Duration, ok func(*v1alpha1.NodeSpawnNode) bool) *v1alpha1.NodeSpawnNode {
	f.t.Helper()
	var nsn *v1alpha1.NodeSpawnNode
	f.poll(name+": "+what, timeout, func() (bool, string) {
		var n v1alpha1.NodeSpawnNode
		if err := f.c.Client.Get(f.ctx, client.ObjectKey{Name: name}, &n); err != nil {
			return false, err.Error()
		}
		nsn = &n
		return ok(nsn), fmt.Sprintf("spec %+v status phase=%s active=%s switchID=%s", n.Spec, n.Status.Phase, short(n.Status.ActiveDigest), n.Status.SwitchID)
	})
	return nsn
}

func condIs(ro *v1alpha1.NodeSpawnRollout, typ string, s metav1.ConditionStatus) bool {
	c := meta.FindStatusCondition(ro.Status.Conditions, typ)
	return c != nil && c.Status == s && c.ObservedGeneration == ro.Generation
}

func complete(ro *v1alpha1.NodeSpawnRollout) bool {
	return condIs(ro, v1alpha1.RolloutComplete, metav1.ConditionTrue)
}

func describeRollout(ro *v1alpha1.NodeSpawnRollout) string {
	st := ro.Status
	var conds []string
	for _, c := range st.Conditions {
		conds = append(conds, fmt.Sprintf("%s=%s(%s: %s)", c.Type, c.Status, c.Reason, c.Message))
	}
	return fmt.Sprintf("nodes=%d updated=%d preparing=%d prepared=%d switching=%d unavailable=%d failed=%d wave=%d blocked=%+v failedNodes=%+v conditions=[%s]",
		st.Nodes, st.Updated, st.Preparing, st.Prepared, st.Switching, st.Unavailable, st.Failed, st.CurrentWave, st.Blocked, st.FailedNodes, strings.Join(conds, "; "))
}

func short(d string) string {
	if len(d) > 15 {
		return d[:15]
	}
	return d
}

// ---------------------------------------------------------------------------
// Sampling

// sampler lists the test's Nodes every 20ms (one List is one consistent
// snapshot) and hands them to check, until stopped.
type sampler struct {
	stopc chan struct{}
	done  chan struct{}
	mu    sync.Mutex
	errs  []string
	n     int
}

func (f *fixture) sample(check func(nodes []corev1.Node) []string) *sampler {
	s := &sampler{stopc: make(chan struct{}), done: make(chan struct{})}
	go func() {
		defer close(s.done)
		for {
			var l corev1.NodeList
			if err := f.c.Client.List(f.ctx, &l, client.MatchingLabels{groupLabel: f.group}); err == nil {
				sort.Slice(l.Items, func(i, j int) bool { return l.Items[i].Name < l.Items[j].Name })
				errs := check(l.Items)
				s.mu.Lock()
				s.n++
				if len(s.errs) < 20 {
					s.errs = append(s.errs, errs...)
				}
				s.mu.Unlock()
			}
			select {
			case <-s.stopc:
				return
			case <-f.ctx.Done():
				return
			case <-time.After(20 * time.Millisecond):
			}
		}
	}()
	f.t.Cleanup(func() { s.stop() })
	return s
}

// stop ends the sampling and returns the violations seen and how many
// samples were taken.
func (s *sampler) stop() ([]string, int) {
	select {
	case <-s.stopc:
	default:
		close(s.stopc)
	}
	<-s.done
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.errs, s.n
}

func ready(n *corev1.Node) bool {
	for _, c := range n.Status.Conditions {
		if c.Type == corev1.NodeReady {
			return c.Status == corev1.ConditionTrue
		}
	}
	return false
}

// unavailableCheck counts the nodes unavailable in one snapshot
// (cordoned or NotReady: a switching node's kubelet is down) and reports
// more than limit, and keeps the peak.
func unavailableCheck(limit int, peak *int, mu *sync.Mutex) func([]corev1.Node) []string {
	return func(nodes []corev1.Node) []string {
		var down []string
		for i := range nodes {
			if nodes[i].Spec.Unschedulable || !ready(&nodes[i]) {
				down = append(down, nodes[i].Name)
			}
		}
		mu.Lock()
		*peak = max(*peak, len(down))
		mu.Unlock()
		if len(down) > limit {
			return []string{fmt.Sprintf("%d nodes unavailable at once (maxUnavailable %d): %v", len(down), limit, down)}
		}
		return nil
	}
}
