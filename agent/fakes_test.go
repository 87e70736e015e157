package agent

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/watch"

	"github.com/nodespawn/nodespawn/api/v1alpha1"
	"github.com/nodespawn/nodespawn/manifest"
	"github.com/nodespawn/nodespawn/state"
)

// fakeNode is the host side in memory: machines by config digest.
type fakeNode struct {
	mu       sync.Mutex
	ns       NodeStatus
	agent    state.Agent
	prepared []string
	switched []string
	rolled   int
	resumed  int
	// switchErr, when set, is what Switch does instead of switching:
	// "rollback" (the new machine never came up), "crash" (the agent is
	// killed mid-switch: the switch is left half-done).
	switchErr string
	// resumeRollsBack: the switch a crash left is finished by a
	// rollback (the new machine never came up).
	resumeRollsBack bool
	// prepareErr fails Prepare.
	prepareErr error
	// verifyGate, when set, holds Switch in its verifying phase (the new
	// machine active, Status says Verifying) until it is closed.
	verifyGate chan struct{}
}

func newFakeNode(active string) *fakeNode {
	return &fakeNode{ns: NodeStatus{NodeName: "n1", ActiveMachine: "kube1", ActiveDigest: active}}
}

func (f *fakeNode) Status(context.Context) (*NodeStatus, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	ns := f.ns
	return &ns, nil
}

func (f *fakeNode) Resume(context.Context) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.ns.Switching {
		// What apply's resume does with a switch whose new machine
		// comes up: it finishes it.
		f.resumed++
		if f.resumeRollsBack {
			f.ns.Switching, f.ns.Verifying, f.ns.PreparedDigest = false, false, ""
			f.ns.Last = &state.UpgradeOutcome{Outcome: state.OutcomeRolledBack, Reason: "node not Ready"}
			return nil
		}
		f.finishSwitch()
	}
	return nil
}

func (f *fakeNode) finishSwitch() {
	f.ns.PreviousDigest, f.ns.ActiveDigest, f.ns.PreparedDigest, f.ns.Switching, f.ns.Verifying = f.ns.ActiveDigest, f.ns.PreparedDigest, "", false, false
	f.ns.ActiveMachine = map[string]string{"kube1": "kube2", "kube2": "kube1"}[f.ns.ActiveMachine]
	f.ns.Last = &state.UpgradeOutcome{Outcome: state.OutcomeSwitched}
}

func (f *fakeNode) Prepare(_ context.Context, m *manifest.Manifest, digest string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.prepared = append(f.prepared, digest)
	if f.prepareErr != nil {
		return f.prepareErr
	}
	if d, _ := m.ConfigDigest(); d.String() != digest {
		return fmt.Errorf("fake: prepare given manifest %s for digest %s", d, digest)
	}
	f.ns.PreparedDigest = digest
	return nil
}

type fakeRolledBack struct{ error }

func (fakeRolledBack) RolledBackTo() string { return "kube1" }

var errCrash = errors.New("fake: killed mid-switch")

func (f *fakeNode) Switch(ctx context.Context, digest string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.switched = append(f.switched, digest)
	if f.ns.PreparedDigest != digest {
		return fmt.Errorf("fake: switch to %s, prepared %s", digest, f.ns.PreparedDigest)
	}
	if f.verifyGate != nil {
		f.ns.Switching, f.ns.Verifying = true, true
		f.mu.Unlock()
		select {
		case <-f.verifyGate:
		case <-ctx.Done():
		}
		f.mu.Lock()
		if ctx.Err() != nil {
			// Killed while verifying: the switch is left half-done,
			// for Resume.
			return ctx.Err()
		}
		f.ns.Switching, f.ns.Verifying = false, false
	}
	switch f.switchErr {
	case "rollback":
		f.ns.PreparedDigest = ""
		f.ns.Last = &state.UpgradeOutcome{Outcome: state.OutcomeRolledBack, Reason: "node not Ready"}
		return fakeRolledBack{errors.New("upgrade from kube1 to kube2 rolled back: node not Ready")}
	case "crash":
		f.ns.Switching = true
		return errCrash
	}
	f.finishSwitch()
	return nil
}

func (f *fakeNode) Rollback(context.Context) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.rolled++
	f.ns.ActiveDigest, f.ns.PreviousDigest = f.ns.PreviousDigest, f.ns.ActiveDigest
	f.ns.ActiveMachine = map[string]string{"kube1": "kube2", "kube2": "kube1"}[f.ns.ActiveMachine]
	f.ns.Last = &state.UpgradeOutcome{Outcome: state.OutcomeManualRollback}
	return nil
}

func (f *fakeNode) Agent() (*state.Agent, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	a := f.agent
	return &a, nil
}

func (f *fakeNode) WriteAgent(a *state.Agent) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.agent = *a
	return nil
}

// fakeAPI is the API server in memory.
type fakeAPI struct {
	mu      sync.Mutex
	node    *v1alpha1.NodeSpawnNode
	configs map[string]*v1alpha1.NodeSpawnConfig
	labels  map[string]string
	patches []v1alpha1.NodeSpawnNodeStatus
	events  []string // "Type Reason: message"
	watcher *watch.FakeWatcher
	down    int // the next down requests fail
}

var errDown = errors.New("fake: connection refused")

func (f *fakeAPI) fail() error {
	if f.down > 0 {
		f.down--
		return errDown
	}
	return nil
}

func (f *fakeAPI) GetNode(_ context.Context, name string) (*v1alpha1.NodeSpawnNode, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.fail(); err != nil {
		return nil, err
	}
	if f.node == nil || f.node.Name != name {
		return nil, apierrors.NewNotFound(schema.GroupResource{Group: "nodespawn.dev", Resource: "nodespawnnodes"}, name)
	}
	return f.node.DeepCopy(), nil
}

func (f *fakeAPI) WatchNode(context.Context, string, string) (watch.Interface, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.watcher == nil {
		f.watcher = watch.NewFake()
	}
	return f.watcher, nil
}

func (f *fakeAPI) GetConfig(_ context.Context, name string) (*v1alpha1.NodeSpawnConfig, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.fail(); err != nil {
		return nil, err
	}
	c, ok := f.configs[name]
	if !ok {
		return nil, apierrors.NewNotFound(schema.GroupResource{Group: "nodespawn.dev", Resource: "nodespawnconfigs"}, name)
	}
	return c.DeepCopy(), nil
}

func (f *fakeAPI) PatchStatus(_ context.Context, name string, st *v1alpha1.NodeSpawnNodeStatus) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.fail(); err != nil {
		return err
	}
	f.patches = append(f.patches, *st.DeepCopy())
	if f.node != nil {
		f.node.Status = *st.DeepCopy()
	}
	return nil
}

func (f *fakeAPI) LabelNode(_ context.Context, name, key, value string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.fail(); err != nil {
		return err
	}
	if f.labels == nil {
		f.labels = map[string]string{}
	}
	f.labels[key] = value
	return nil
}

func (f *fakeAPI) Event(_ context.Context, name, eventType, reason, message string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.fail(); err != nil {
		return err
	}
	f.events = append(f.events, eventType+" "+reason+": "+message)
	return nil
}

// reasons are the reasons of the Events recorded, in order.
func (f *fakeAPI) reasons() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	var out []string
	for _, e := range f.events {
		out = append(out, strings.SplitN(strings.SplitN(e, ":", 2)[0], " ", 2)[1])
	}
	return out
}

func (f *fakeAPI) setSpec(spec v1alpha1.NodeSpawnNodeSpec) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.node.Spec = spec
	f.node.Generation++
	if f.watcher != nil {
		f.watcher.Modify(f.node.DeepCopy())
	}
}

func (f *fakeAPI) status() v1alpha1.NodeSpawnNodeStatus {
	f.mu.Lock()
	defer f.mu.Unlock()
	return *f.node.Status.DeepCopy()
}

// phases are the phases the patches reported, in order, repeats dropped.
func (f *fakeAPI) phases() []v1alpha1.NodePhase {
	f.mu.Lock()
	defer f.mu.Unlock()
	var out []v1alpha1.NodePhase
	for _, p := range f.patches {
		if len(out) == 0 || out[len(out)-1] != p.Phase {
			out = append(out, p.Phase)
		}
	}
	return out
}

func (f *fakeAPI) watching() bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.watcher != nil
}
