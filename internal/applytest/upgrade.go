package applytest

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nodespawn/nodespawn/apply"
	"github.com/nodespawn/nodespawn/internal/layout"
	"github.com/nodespawn/nodespawn/plan"
)

// UpgradePlan is the fixture plan for machine (kube1 or kube2) of the
// manifest version: the kubelet unit says which version made it. The boot
// link is in the start phase, as render makes it.
func UpgradePlan(machine, version string) *plan.Plan {
	b, err := json.Marshal(Plan())
	if err != nil {
		panic(err)
	}
	b = []byte(strings.ReplaceAll(string(b), "kube1", machine))
	var p plan.Plan
	if err := json.Unmarshal(b, &p); err != nil {
		panic(err)
	}
	p.Alternate = "kube2"
	if machine == "kube2" {
		p.Alternate = "kube1"
	}
	var steps []plan.Step
	var enable plan.Step
	for _, s := range p.Steps {
		switch {
		case s.ID == "host:link:wants":
			enable = s
			enable.ID, enable.Phase = "start:link:wants", plan.PhaseStart
			continue
		case s.ID == "machine:file:kubelet-unit":
			s.File.Contents = "[Service]\nExecStart=/usr/local/bin/kubelet\n# version " + version + "\n"
		case s.ID == "start:reload":
			s.After = []string{enable.ID}
		}
		steps = append(steps, s)
	}
	// A host file both machines' plans write (as render's nft-flush unit
	// and machines.target link are).
	shared := plan.Step{ID: "host:file:shared", Phase: plan.PhaseHost, Kind: plan.KindFile, File: &plan.File{
		Path: SharedUnit, Mode: 0o644, Contents: "[Service]\nType=oneshot\n", Overwrite: true}}
	p.Steps = append(steps, enable, shared)
	sortByPhase(p.Steps)
	return &p
}

// SharedUnit is the host file UpgradePlan's two machines share.
const SharedUnit = "/etc/systemd/system/nodespawn-shared.service"

func sortByPhase(steps []plan.Step) {
	rank := map[plan.Phase]int{}
	for i, ph := range plan.Phases {
		rank[ph] = i
	}
	sort.SliceStable(steps, func(i, j int) bool { return rank[steps[i].Phase] < rank[steps[j].Phase] })
}

// VersionDigest is the manifest digest of version.
func VersionDigest(version string) string { return "sha256:manifest-" + version }

// VersionOptions are Run's options for manifest version on root, with
// deps and a Node check that fails for the machines in broken, and never
// sees the Node Ready on the machines whose kubelet restarts (the
// DiskSystemd's Restarting).
func VersionOptions(root, version string, deps apply.Deps, broken ...string) apply.Options {
	var restarting []string
	if d, ok := deps.Systemd.(*DiskSystemd); ok {
		restarting = d.Restarting
	}
	return apply.Options{
		Root: root, ManifestDigest: VersionDigest(version), Deps: deps, ToolVersion: "test",
		PollInterval: time.Millisecond, Log: slog.New(slog.NewTextHandler(os.Stderr, nil)),
		Manifest: []byte("manifest " + version + "\n"),
		Upgrade: apply.UpgradeOptions{
			Render: func(m string) (*plan.Plan, error) { return UpgradePlan(m, version), nil },
			NodeReady: func(ctx context.Context, p *plan.Plan, since time.Time) error {
				if slices.Contains(restarting, p.Machine) {
					<-ctx.Done()
					return fmt.Errorf("node %s not Ready: %w", p.NodeName, ctx.Err())
				}
				for _, b := range broken {
					if b == p.Machine {
						return fmt.Errorf("node %s not Ready (the test breaks machine %s)", p.NodeName, b)
					}
				}
				return nil
			},
			StopTimeout:  time.Second,
			ReadyTimeout: 5 * time.Second,
		},
	}
}

// DiskSystemd is a fake systemd whose state outlives the process (a file
// beside the root), so a test can kill apply and run it again, or "reboot":
// machines register when started and unregister when stopped, starting a
// machine obeys the ExecCondition the drop-in renders (the active-machine
// file), and two machines registered at once is recorded as a violation.
type DiskSystemd struct {
	root, file string
	// Restarting lists machines whose kubelet restarts at every look.
	Restarting []string
	// StopFails lists machines that neither stop nor go when terminated.
	StopFails []string
	mu        sync.Mutex
}

// NewDiskSystemd is a DiskSystemd for root, its state in a file beside
// it.
func NewDiskSystemd(root string) *DiskSystemd {
	return &DiskSystemd{root: root, file: root + ".systemd.json"}
}

// DiskState is what a DiskSystemd keeps in its file.
type DiskState struct {
	Registered map[string]bool `json:"registered"`
	Restarts   map[string]int  `json:"restarts"`
	Violations []string        `json:"violations"`
	Calls      []string        `json:"calls"`
}

func (d *DiskSystemd) update(f func(*DiskState)) {
	d.mu.Lock()
	defer d.mu.Unlock()
	st := d.load()
	f(st)
	b, _ := json.Marshal(st)
	tmp := d.file + ".tmp"
	if err := os.WriteFile(tmp, b, 0o644); err != nil {
		panic(err)
	}
	if err := os.Rename(tmp, d.file); err != nil {
		panic(err)
	}
}

func (d *DiskSystemd) load() *DiskState {
	st := &DiskState{Registered: map[string]bool{}, Restarts: map[string]int{}}
	if b, err := os.ReadFile(d.file); err == nil {
		if err := json.Unmarshal(b, st); err != nil {
			panic(err)
		}
	}
	if st.Registered == nil {
		st.Registered = map[string]bool{}
	}
	if st.Restarts == nil {
		st.Restarts = map[string]int{}
	}
	return st
}

// State reads the state.
func (d *DiskSystemd) State() *DiskState {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.load()
}

// mayStart is the drop-in's ExecCondition.
func mayStart(root, m string) bool {
	b, err := os.ReadFile(filepath.Join(root, layout.ActiveMachineFile))
	return err != nil || strings.TrimSpace(string(b)) == m
}

func (d *DiskSystemd) DaemonReload(ctx context.Context) error { return nil }

func (d *DiskSystemd) Enable(ctx context.Context, unit string) (bool, error) {
	return true, nil
}

func (d *DiskSystemd) Restart(ctx context.Context, unit string) error { return nil }

func (d *DiskSystemd) Start(ctx context.Context, unit string) (bool, error) {
	m, ok := strings.CutPrefix(unit, "systemd-nspawn@")
	if !ok {
		return true, nil
	}
	m = strings.TrimSuffix(m, ".service")
	changed := false
	d.update(func(st *DiskState) {
		if !mayStart(d.root, m) {
			st.Calls = append(st.Calls, "start "+m+" (condition failed)")
			return
		}
		st.Calls = append(st.Calls, "start "+m)
		if st.Registered[m] {
			return
		}
		for other := range st.Registered {
			st.Violations = append(st.Violations, fmt.Sprintf("%s started while %s runs", m, other))
		}
		st.Registered[m], changed = true, true
	})
	return changed, nil
}

func (d *DiskSystemd) Stop(ctx context.Context, unit string) error {
	if m, ok := strings.CutPrefix(unit, "systemd-nspawn@"); ok {
		m = strings.TrimSuffix(m, ".service")
		if slices.Contains(d.StopFails, m) {
			return fmt.Errorf("job for %s failed", unit)
		}
		d.update(func(st *DiskState) {
			st.Calls = append(st.Calls, "stop "+m)
			delete(st.Registered, m)
		})
	}
	return nil
}

func (d *DiskSystemd) MachineRegistered(ctx context.Context, m string) (bool, error) {
	return d.State().Registered[m], nil
}

func (d *DiskSystemd) TerminateMachine(ctx context.Context, m string) error {
	if slices.Contains(d.StopFails, m) {
		return fmt.Errorf("machine %s does not go", m)
	}
	d.update(func(st *DiskState) { delete(st.Registered, m) })
	return nil
}

func (d *DiskSystemd) UnitState(ctx context.Context, m, unit string) (string, error) {
	if m == "" {
		return "inactive", nil
	}
	if d.State().Registered[m] {
		return "active", nil
	}
	return "inactive", nil
}

func (d *DiskSystemd) UnitRestarts(ctx context.Context, m, unit string) (int, error) {
	n := 0
	if unit == "kubelet.service" && slices.Contains(d.Restarting, m) {
		d.update(func(st *DiskState) { st.Restarts[m]++; n = st.Restarts[m] })
	}
	return n, nil
}

func (d *DiskSystemd) Journal(ctx context.Context, m string, lines int) (string, error) {
	return "kubelet: exited (the test's broken machine)\n", nil
}

func (d *DiskSystemd) UnitJournal(ctx context.Context, unit string, lines int) (string, error) {
	return "", nil
}

// Boot is a power cut and the next boot: every machine is gone, then
// machines.target starts each machine whose boot link exists, each
// subject to its ExecCondition. It returns the machines that run.
func (d *DiskSystemd) Boot(t *testing.T) []string {
	t.Helper()
	var running []string
	d.update(func(st *DiskState) {
		st.Registered = map[string]bool{}
		for _, m := range []string{"kube1", "kube2"} {
			if _, err := os.Lstat(filepath.Join(d.root, layout.EnableLink(m))); err != nil || !mayStart(d.root, m) {
				continue
			}
			st.Registered[m] = true
			running = append(running, m)
		}
	})
	return running
}

// NodeOnKube1 is a fresh root with version A applied on kube1, through a
// DiskSystemd whose restarting machines are given.
func NodeOnKube1(t *testing.T, restarting []string) (string, apply.Deps, *DiskSystemd, *Downloader) {
	t.Helper()
	root := t.TempDir()
	PrepareRoot(t, root)
	deps, _, _, dl := Deps()
	sd := NewDiskSystemd(root)
	sd.Restarting = restarting
	deps.Systemd = sd
	if _, err := Run(context.Background(), UpgradePlan("kube1", "A"), VersionOptions(root, "A", deps)); err != nil {
		t.Fatal(err)
	}
	return root, deps, sd, dl
}

// LiveUpgrade applies A then B in-process against a fresh root with a
// DiskSystemd; it returns the root, the fake and B's result.
func LiveUpgrade(t *testing.T, restarting []string, broken ...string) (string, *DiskSystemd, *apply.Result, error) {
	t.Helper()
	root, deps, sd, _ := NodeOnKube1(t, restarting)
	res, err := Run(context.Background(), UpgradePlan("kube1", "B"), VersionOptions(root, "B", deps, broken...))
	return root, sd, res, err
}
