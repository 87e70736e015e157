package controller_test

import (
	"context"
	"fmt"
	"hash/fnv"
	"math"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/apimachinery/pkg/watch"
	"sigs.k8s.io/controller-runtime/pkg/client"
	crmetrics "sigs.k8s.io/controller-runtime/pkg/metrics"

	v1alpha1 "github.com/nodespawn/nodespawn/api/v1alpha1"
	"github.com/nodespawn/nodespawn/internal/kubetest"
)

// BenchmarkRollout1000Nodes rolls a config out to 1,000 fake Nodes
// (maxUnavailable 10%, prepareAhead 10%, drain) with fast fake agents, to
// Complete, and reports the controller's cost. It is a measurement, not a
// timed assertion:
//
//	NODESPAWN_REQUIRE_KUBE=1 go test -run XXX -bench Rollout1000 -benchtime 1x ./internal/fleet/controller/
//
// Metrics (per rollout): s/rollout (wall time from creation to Complete),
// reconciles/rollout (all controllers, controller_runtime_reconcile_total)
// and rollout-reconciles/rollout, rollout-mean-ms and rollout-p99-ms (the
// rollout controller's reconcile latency, from the
// controller_runtime_reconcile_time_seconds histogram: p99 interpolated in
// its buckets), peak-heap-MiB (HeapInuse sampled every 100ms) and
// cpu-s/rollout (user+system of this process). The process also runs the
// fake agents (one watch, a few workers): heap and CPU include them, not
// the API server's or etcd's.
func BenchmarkRollout1000Nodes(b *testing.B) {
	const nodes = 1000
	f := newFixture(b)
	ctx := f.ctx
	prefix := kubetest.NameFor(b, "")

	// The Nodes, created by 16 workers.
	names := make([]string, nodes)
	for i := range names {
		names[i] = fmt.Sprintf("%s-%04d", prefix, i)
	}
	work := make(chan string)
	var wg sync.WaitGroup
	for range 16 {
		wg.Go(func() {
			for name := range work {
				n := &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: name, Labels: map[string]string{
					v1alpha1.LabelManaged: "true", groupLabel: f.group}}}
				if err := f.c.Client.Create(ctx, n); err != nil {
					b.Error(err)
					continue
				}
				now := metav1.Now()
				n.Status.Conditions = []corev1.NodeCondition{{Type: corev1.NodeReady, Status: corev1.ConditionTrue, Reason: "KubeletReady", LastHeartbeatTime: now, LastTransitionTime: now}}
				if err := f.c.Client.Status().Update(ctx, n); err != nil {
					b.Error(err)
				}
			}
		})
	}
	for _, n := range names {
		work <- n
	}
	close(work)
	wg.Wait()
	if b.Failed() {
		b.FailNow()
	}
	f.mu.Lock()
	f.nodes = append(f.nodes, names...)
	f.mu.Unlock()

	fa := newFastAgents(f, prefix, f.oldDigest)
	go fa.run(ctx)
	f.startController(leaderElection{})
	f.poll("1,000 nodes enrolled and reporting", 5*time.Minute, func() (bool, string) {
		n := fa.reporting()
		return n == nodes, fmt.Sprintf("%d reporting", n)
	})

	var totalWall, totalCPU float64
	var totalRec, rolloutRec float64
	var lat histDelta
	var peakHeap uint64
	b.ResetTimer()
	for i := range b.N {
		// Each iteration rolls the fleet to another config.
		cfgName := fmt.Sprintf("%s-v%d", prefix, i)
		m, d := kubetest.FleetConfig(b, fmt.Sprintf("bench%d", i))
		f.create(&v1alpha1.NodeSpawnConfig{ObjectMeta: metav1.ObjectMeta{Name: cfgName}, Spec: v1alpha1.NodeSpawnConfigSpec{Manifest: m, Digest: d}})
		before := gatherReconciles(b)
		cpu0 := cpuTime()
		stopHeap, heap := sampleHeap()
		start := time.Now()
		ro := fmt.Sprintf("%s-ro%d", prefix, i)
		pct := intstr.FromString("10%")
		r := &v1alpha1.NodeSpawnRollout{ObjectMeta: metav1.ObjectMeta{Name: ro}, Spec: v1alpha1.NodeSpawnRolloutSpec{
			ConfigName:    cfgName,
			NodeSelector:  &metav1.LabelSelector{MatchLabels: map[string]string{groupLabel: f.group}},
			Strategy:      v1alpha1.RolloutStrategy{MaxUnavailable: &pct, PrepareAhead: nodes / 10},
			Disruption:    v1alpha1.Disruption{Mode: v1alpha1.DisruptionDrain},
			FailureBudget: 1,
		}}
		f.create(r)
		f.mu.Lock()
		f.rollouts = append(f.rollouts, ro)
		f.mu.Unlock()
		var last *v1alpha1.NodeSpawnRollout
		deadline := time.Now().Add(9 * time.Minute)
		for {
			last = f.getRollout(ro)
			if complete(last) {
				break
			}
			if condIs(last, v1alpha1.RolloutHalted, metav1.ConditionTrue) || time.Now().After(deadline) {
				b.Fatalf("rollout %s: %s", ro, describeRollout(last))
			}
			sleep(ctx, 100*time.Millisecond)
		}
		wall := time.Since(start)
		cpu := cpuTime() - cpu0
		stopHeap()
		after := gatherReconciles(b)
		totalWall += wall.Seconds()
		totalCPU += cpu.Seconds()
		totalRec += after.total - before.total
		rolloutRec += after.rollout - before.rollout
		lat.add(before.latency, after.latency)
		peakHeap = max(peakHeap, *heap)
		b.Logf("rollout %d: %d nodes updated in %s, %d waves, %d rollout reconciles", i, last.Status.Updated, wall.Round(time.Millisecond), len(last.Status.Waves), int(after.rollout-before.rollout))
		// The next rollout must not find this one owning the nodes.
		if err := f.c.Client.Delete(ctx, r); err != nil {
			b.Fatal(err)
		}
	}
	b.StopTimer()
	n := float64(b.N)
	b.ReportMetric(totalWall/n, "s/rollout")
	b.ReportMetric(totalCPU/n, "cpu-s/rollout")
	b.ReportMetric(totalRec/n, "reconciles/rollout")
	b.ReportMetric(rolloutRec/n, "rollout-reconciles/rollout")
	b.ReportMetric(lat.mean()*1000, "rollout-mean-ms")
	b.ReportMetric(lat.quantile(0.99)*1000, "rollout-p99-ms")
	b.ReportMetric(float64(peakHeap)/(1<<20), "peak-heap-MiB")
}

func cpuTime() time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// sampleHeap samples HeapInuse every 100ms until stopped; *peak is the
// highest seen.
func sampleHeap() (stop func(), peak *uint64) {
	peak = new(uint64)
	done := make(chan struct{})
	finished := make(chan struct{})
	go func() {
		defer close(finished)
		var ms runtime.MemStats
		for {
			runtime.ReadMemStats(&ms)
			*peak = max(*peak, ms.HeapInuse)
			select {
			case <-done:
				return
			case <-time.After(100 * time.Millisecond):
			}
		}
	}()
	return func() { close(done); <-finished }, peak
}

// reconcileStats is controller-runtime's reconcile metrics at one moment.
type reconcileStats struct {
	total, rollout float64
	// latency: the rollout controller's histogram (upper bounds and
	// cumulative counts, sum, count).
	latency hist
}

type hist struct {
	bounds []float64
	cum    []uint64
	sum    float64
	count  uint64
}

func gatherReconciles(b *testing.B) reconcileStats {
	mfs, err := crmetrics.Registry.Gather()
	if err != nil {
		b.Fatal(err)
	}
	var s reconcileStats
	for _, mf := range mfs {
		switch mf.GetName() {
		case "controller_runtime_reconcile_total":
			for _, m := range mf.GetMetric() {
				v := m.GetCounter().GetValue()
				s.total += v
				for _, lp := range m.GetLabel() {
					if lp.GetName() == "controller" && lp.GetValue() == "rollout" {
						s.rollout += v
					}
				}
			}
		case "controller_runtime_reconcile_time_seconds":
			for _, m := range mf.GetMetric() {
				isRollout := false
				for _, lp := range m.GetLabel() {
					isRollout = isRollout || (lp.GetName() == "controller" && lp.GetValue() == "rollout")
				}
				if !isRollout {
					continue
				}
				h := m.GetHistogram()
				s.latency.sum, s.latency.count = h.GetSampleSum(), h.GetSampleCount()
				for _, bk := range h.GetBucket() {
					s.latency.bounds = append(s.latency.bounds, bk.GetUpperBound())
					s.latency.cum = append(s.latency.cum, bk.GetCumulativeCount())
				}
			}
		}
	}
	return s
}

// histDelta accumulates the difference of two histogram readings.
type histDelta struct {
	bounds []float64
	cum    []uint64
	sum    float64
	count  uint64
}

func (d *histDelta) add(before, after hist) {
	if d.bounds == nil {
		d.bounds = after.bounds
		d.cum = make([]uint64, len(after.bounds))
	}
	for i := range after.cum {
		var b uint64
		if i < len(before.cum) {
			b = before.cum[i]
		}
		d.cum[i] += after.cum[i] - b
	}
	d.sum += after.sum - before.sum
	d.count += after.count - before.count
}

func (d *histDelta) mean() float64 {
	if d.count == 0 {
		return math.NaN()
	}
	return d.sum / float64(d.count)
}

// quantile interpolates linearly within the bucket holding q (as
// Prometheus' histogram_quantile does); beyond the last bound it answers
// the last bound.
func (d *histDelta) quantile(q float64) float64 {
	if d.count == 0 {
		return math.NaN()
	}
	rank := q * float64(d.count)
	lower, prev := 0.0, uint64(0)
	for i, ub := range d.bounds {
		if float64(d.cum[i]) >= rank {
			in := d.cum[i] - prev
			if in == 0 {
				return ub
			}
			return lower + (ub-lower)*(rank-float64(prev))/float64(in)
		}
		lower, prev = ub, d.cum[i]
	}
	return d.bounds[len(d.bounds)-1]
}

// fastAgents stand in for 1,000 agents: one watch over the NodeSpawnNodes
// and a few workers (a node always on the same one) that write the status
// the agent would, phase by phase (Preparing, Prepared; Switching, Ready
// with the new active digest), without delays. The Nodes stay Ready (no
// kubelet restart is simulated here).
type fastAgents struct {
	f      *fixture
	prefix string
	old    string

	mu     sync.Mutex
	latest map[string]*v1alpha1.NodeSpawnNode
	queued map[string]bool
	shards []chan string
	seen   map[string]bool
}

func newFastAgents(f *fixture, prefix, old string) *fastAgents {
	a := &fastAgents{f: f, prefix: prefix, old: old, latest: map[string]*v1alpha1.NodeSpawnNode{}, queued: map[string]bool{}, seen: map[string]bool{}}
	for range 8 {
		a.shards = append(a.shards, make(chan string, 2048))
	}
	return a
}

func (a *fastAgents) reporting() int {
	a.mu.Lock()
	defer a.mu.Unlock()
	return len(a.seen)
}

func (a *fastAgents) run(ctx context.Context) {
	for _, ch := range a.shards {
		go a.worker(ctx, ch)
	}
	wc, err := client.NewWithWatch(a.f.c.Config, client.Options{Scheme: a.f.c.Scheme})
	if err != nil {
		a.f.t.Error(err)
		return
	}
	for ctx.Err() == nil {
		// List (catch up), then watch from there.
		var l v1alpha1.NodeSpawnNodeList
		if err := wc.List(ctx, &l); err != nil {
			sleep(ctx, 100*time.Millisecond)
			continue
		}
		for i := range l.Items {
			a.offer(&l.Items[i])
		}
		w, err := wc.Watch(ctx, &v1alpha1.NodeSpawnNodeList{}, &client.ListOptions{Raw: &metav1.ListOptions{ResourceVersion: l.ResourceVersion}})
		if err != nil {
			sleep(ctx, 100*time.Millisecond)
			continue
		}
		for ev := range w.ResultChan() {
			if ev.Type != watch.Added && ev.Type != watch.Modified {
				continue
			}
			if nsn, ok := ev.Object.(*v1alpha1.NodeSpawnNode); ok {
				a.offer(nsn)
			}
		}
		w.Stop()
	}
}

func (a *fastAgents) offer(nsn *v1alpha1.NodeSpawnNode) {
	if !strings.HasPrefix(nsn.Name, a.prefix+"-") {
		return
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	if old, ok := a.latest[nsn.Name]; ok && newerOrSame(old, nsn) {
		return
	}
	a.latest[nsn.Name] = nsn
	if a.queued[nsn.Name] {
		return
	}
	a.queued[nsn.Name] = true
	h := fnv.New32a()
	h.Write([]byte(nsn.Name))
	a.shards[h.Sum32()%uint32(len(a.shards))] <- nsn.Name
}

// newerOrSame: old's resourceVersion is at least nsn's (etcd revisions
// are numbers; a watch never goes back, a relist may).
func newerOrSame(old, nsn *v1alpha1.NodeSpawnNode) bool {
	if len(old.ResourceVersion) != len(nsn.ResourceVersion) {
		return len(old.ResourceVersion) > len(nsn.ResourceVersion)
	}
	return old.ResourceVersion >= nsn.ResourceVersion
}

func (a *fastAgents) worker(ctx context.Context, ch chan string) {
	for {
		select {
		case <-ctx.Done():
			return
		case name := <-ch:
			a.mu.Lock()
			nsn := a.latest[name].DeepCopy()
			delete(a.queued, name)
			a.mu.Unlock()
			a.step(ctx, nsn)
		}
	}
}

// step writes the next status(es) the agent would for this spec.
func (a *fastAgents) step(ctx context.Context, nsn *v1alpha1.NodeSpawnNode) {
	st := nsn.Status
	spec := nsn.Spec
	now := metav1.NewTime(time.Now().UTC().Truncate(time.Second))
	var next []v1alpha1.NodeSpawnNodeStatus
	if st.ActiveDigest == "" {
		st.Phase, st.ActiveDigest, st.ActiveMachine, st.AgentVersion = v1alpha1.PhaseIdle, a.old, "kube1", "fast"
		next = append(next, st)
	}
	want := spec.ConfigDigest
	granted := spec.Switch && spec.SwitchID != "" && spec.SwitchID != st.SwitchID
	switch {
	case want == "" || want == st.ActiveDigest:
		if granted {
			st.SwitchID, st.Phase = spec.SwitchID, v1alpha1.PhaseReady
			next = append(next, st)
		}
	case st.PreparedDigest != want && (spec.Prepare || granted):
		st.Phase, st.PrepareStarted, st.PrepareFinished = v1alpha1.PhasePreparing, &now, nil
		next = append(next, st)
		st.Phase, st.PreparedDigest, st.PrepareFinished = v1alpha1.PhasePrepared, want, &now
		next = append(next, st)
		if granted {
			next = append(next, a.switchTo(&st, spec, now)...)
		}
	case granted && st.PreparedDigest == want:
		next = append(next, a.switchTo(&st, spec, now)...)
	}
	for i := range next {
		next[i].ObservedGeneration = nsn.Generation
		next[i].Heartbeat = &now
		base := nsn.DeepCopy()
		nsn.Status = next[i]
		if err := a.f.c.Client.Status().Patch(ctx, nsn, client.MergeFrom(base)); err != nil {
			if ctx.Err() == nil {
				// Offer it again: the watch brings the next event.
				a.f.t.Logf("fast agent %s: %v", nsn.Name, err)
			}
			return
		}
	}
	if len(next) > 0 {
		a.mu.Lock()
		a.seen[nsn.Name] = true
		// Its own write is the newest it knows: an event older than it,
		// still to come, must not make it act on a stale status.
		if old := a.latest[nsn.Name]; old == nil || !newerOrSame(old, nsn) {
			a.latest[nsn.Name] = nsn.DeepCopy()
		}
		a.mu.Unlock()
	}
}

func (a *fastAgents) switchTo(st *v1alpha1.NodeSpawnNodeStatus, spec v1alpha1.NodeSpawnNodeSpec, now metav1.Time) []v1alpha1.NodeSpawnNodeStatus {
	st.SwitchID, st.Phase, st.SwitchStarted, st.SwitchFinished = spec.SwitchID, v1alpha1.PhaseSwitching, &now, nil
	s1 := *st
	st.PreviousDigest, st.ActiveDigest, st.PreparedDigest = st.ActiveDigest, spec.ConfigDigest, ""
	st.ActiveMachine = map[string]string{"kube1": "kube2", "kube2": "kube1"}[st.ActiveMachine]
	st.Phase, st.SwitchFinished = v1alpha1.PhaseReady, &now
	return []v1alpha1.NodeSpawnNodeStatus{s1, *st}
}
