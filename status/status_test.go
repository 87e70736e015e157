package status_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	. "github.com/nodespawn/nodespawn/status"

	"github.com/nodespawn/nodespawn/apply"
	"github.com/nodespawn/nodespawn/internal/applytest"
	"github.com/nodespawn/nodespawn/plan"
	"github.com/nodespawn/nodespawn/state"
)

// TestStatus runs the fixture plan into a root in each way a run can end
// and reads the status back, with the fake systemd as the live host.
func TestStatus(t *testing.T) {
	tests := []struct {
		name string
		// setup makes root's state; sd is the live host afterwards.
		setup       func(t *testing.T, root string, sd *applytest.Systemd)
		state       State
		summary     string
		pending     bool
		failedStep  string
		wantChecks  int
		wantJournal bool
	}{
		{name: "nothing here", setup: func(*testing.T, string, *applytest.Systemd) {}, state: StateNotRun, summary: "not run"},
		{name: "first boot not started yet", setup: func(t *testing.T, root string, _ *applytest.Systemd) {
			applytest.Must(t, apply.InstallFirstboot(root, ""))
		}, state: StateNotRun, summary: "not run", pending: true},
		{name: "first-boot unit failed before a run", setup: func(t *testing.T, root string, sd *applytest.Systemd) {
			applytest.Must(t, apply.InstallFirstboot(root, ""))
			sd.HostStates = map[string]string{apply.FirstbootUnitName: "failed"}
		}, state: StateError, summary: "error: " + apply.FirstbootUnitName + " failed before a run started", pending: true, wantJournal: true},
		{name: "done", setup: func(t *testing.T, root string, sd *applytest.Systemd) {
			applytest.Apply(t, root, nil)
			sd.Registered[applytest.Machine] = true
		}, state: StateDone, summary: "done", wantChecks: 3},
		{name: "machine down", setup: func(t *testing.T, root string, sd *applytest.Systemd) {
			applytest.Apply(t, root, nil)
		}, state: StateDegraded, summary: "degraded: applied, but machine kube1 is not running", wantChecks: 1},
		{name: "kubelet down", setup: func(t *testing.T, root string, sd *applytest.Systemd) {
			applytest.Apply(t, root, nil)
			sd.Registered[applytest.Machine] = true
			sd.States["kubelet.service"] = []string{"inactive"}
		}, state: StateDegraded, summary: "degraded: applied, but kubelet is inactive", wantChecks: 3},
		{name: "failed step", setup: func(t *testing.T, root string, sd *applytest.Systemd) {
			applytest.Apply(t, root, map[string]error{"kubelet": errors.New("download https://dl.test/kubelet: 503 Service Unavailable\nmore detail")})
			sd.HostStates = map[string]string{apply.FirstbootUnitName: "failed"}
		}, state: StateError, summary: "error: step rootfs:download:kubelet: download https://dl.test/kubelet: 503 Service Unavailable", failedStep: "rootfs:download:kubelet", wantJournal: true},
		{name: "killed mid-run", setup: func(t *testing.T, root string, _ *applytest.Systemd) {
			applytest.Apply(t, root, nil)
			rec, err := state.ReadRecord(root)
			applytest.Must(t, err)
			rec.Status, rec.Ended = state.StatusRunning, nil
			for i := 5; i < len(rec.Steps); i++ {
				rec.Steps[i].Outcome = state.OutcomePending
			}
			s, err := state.Open(root)
			applytest.Must(t, err)
			defer s.Close()
			applytest.Must(t, s.WriteRecord(rec))
		}, state: StateError, summary: "error: the run was interrupted at step host:file:dropin (6/29); apply again to resume", wantJournal: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			root := t.TempDir()
			sd := applytest.NewSystemd()
			sd.UnitJournals = map[string]string{apply.FirstbootUnitName: "level=ERROR msg=step step=rootfs:download:kubelet\n"}
			tt.setup(t, root, sd)
			st, err := Read(context.Background(), Options{Root: root, Systemd: sd, Long: true})
			if err != nil {
				t.Fatal(err)
			}
			want := strings.TrimSuffix(tt.summary, "...")
			if st.State != tt.state || !strings.HasPrefix(st.Summary, strings.Split(want, "...")[0]) {
				t.Errorf("status %q, %q; want %q, %q", st.State, st.Summary, tt.state, tt.summary)
			}
			if st.Pending != tt.pending {
				t.Errorf("pending = %v, want %v", st.Pending, tt.pending)
			}
			if tt.failedStep != "" && (st.Step == nil || st.Step.ID != tt.failedStep || !strings.Contains(st.Step.Error, "more detail")) {
				t.Errorf("failed step %+v, want %s with its whole error", st.Step, tt.failedStep)
			}
			if len(st.Checks) != tt.wantChecks {
				t.Errorf("checks %+v, want %d", st.Checks, tt.wantChecks)
			}
			if (st.Journal != "") != tt.wantJournal {
				t.Errorf("journal %q, want one: %v", st.Journal, tt.wantJournal)
			}
			if code := ExitCode(st); code != map[State]int{StateError: 1, StateDegraded: 2}[st.State] {
				t.Errorf("exit code %d for %s", code, st.State)
			}
		})
	}
}

// TestStatusWhileRunning: an apply holding the lock is running, whatever
// its record says, and the step it is at is named.
func TestStatusWhileRunning(t *testing.T) {
	root := t.TempDir()
	applytest.PrepareRoot(t, root)
	release := applytest.StartBlockedApply(t, root)
	st, err := Read(context.Background(), Options{Root: root})
	if err != nil {
		t.Fatal(err)
	}
	// Other host steps may have finished beside it: the count says so.
	if st.State != StateRunning || !strings.HasPrefix(st.Summary, "running: step host:modules (") {
		t.Errorf("status while an apply holds the lock: %q %q", st.State, st.Summary)
	}
	if err := release(); err != nil {
		t.Fatal(err)
	}
	st, err = Read(context.Background(), Options{Root: root})
	if err != nil || st.State != StateDone {
		t.Errorf("status after the run: %+v %v", st, err)
	}
}

// TestCriticalPath builds a record whose timeline has one obvious chain:
// host:a (0-100ms) -> rootfs:image (100-1100) -> rootfs:kubelet after the
// image (1100-1300), while rootfs:cni (a download fetched beside the
// image, 100-400) and machine:f after it are off the path; machine:g
// (1300-1350) waited for the rootfs phase's last step.
func TestCriticalPath(t *testing.T) {
	step := func(id string, ph plan.Phase, start, dur int64) state.StepRecord {
		return state.StepRecord{ID: id, Phase: ph, Kind: plan.KindFile, Outcome: state.OutcomeDone, StartMS: start, DurationMS: dur}
	}
	rec := &state.Record{Steps: []state.StepRecord{
		step("host:a", plan.PhaseHost, 0, 100),
		step("host:b", plan.PhaseHost, 0, 20),
		step("rootfs:image", plan.PhaseRootfs, 100, 1000),
		step("rootfs:cni", plan.PhaseRootfs, 100, 300),
		step("rootfs:kubelet", plan.PhaseRootfs, 1100, 200),
		step("machine:g", plan.PhaseMachine, 1300, 50),
		{ID: "start:skipped", Phase: plan.PhaseStart, Outcome: state.OutcomeSkipped, StartMS: 5000},
	}}
	p := &plan.Plan{Steps: []plan.Step{{ID: "rootfs:kubelet", After: []string{"rootfs:image"}}}}
	var got []string
	for _, s := range CriticalPath(rec, p) {
		got = append(got, s.ID)
	}
	if want := "host:a rootfs:image rootfs:kubelet machine:g"; strings.Join(got, " ") != want {
		t.Errorf("critical path %q, want %q", got, want)
	}
	var blame []string
	for _, s := range Blame(rec) {
		blame = append(blame, s.ID)
	}
	if want := "rootfs:image rootfs:cni rootfs:kubelet host:a machine:g host:b"; strings.Join(blame, " ") != want {
		t.Errorf("blame %q, want %q", blame, want)
	}
}

// TestStatusHostUnits: a node whose plan names host units (Fabric Manager
// on an NVSwitch host) is degraded while one is not active on the host,
// and says which and why.
func TestStatusHostUnits(t *testing.T) {
	for _, tt := range []struct {
		fm      string
		state   State
		summary string
	}{
		{"active", StateDone, "done"},
		{"inactive", StateDegraded, "degraded: applied, but nvidia-fabricmanager is inactive on the host (the GPUs are joined by NVSwitches: CUDA fails with error 802 until it runs)"},
	} {
		t.Run(tt.fm, func(t *testing.T) {
			root := t.TempDir()
			applytest.PrepareRoot(t, root)
			deps, _, _, _ := applytest.Deps()
			opts := applytest.Options(deps, slog.New(slog.DiscardHandler))
			opts.Root = root
			p := applytest.Plan()
			p.HostUnits = []string{plan.FabricManagerUnit}
			if _, err := applytest.Run(context.Background(), p, opts); err != nil {
				t.Fatalf("apply: %v", err)
			}
			sd := applytest.NewSystemd()
			sd.Registered[applytest.Machine] = true
			sd.HostStates = map[string]string{plan.FabricManagerUnit: tt.fm}
			st, err := Read(context.Background(), Options{Root: root, Systemd: sd})
			if err != nil {
				t.Fatal(err)
			}
			if st.State != tt.state || st.Summary != tt.summary {
				t.Errorf("status %q, %q; want %q, %q", st.State, st.Summary, tt.state, tt.summary)
			}
			if len(st.Checks) != 4 || st.Checks[3].What != "nvidia-fabricmanager on the host" {
				t.Errorf("checks %+v, want the machine's three and Fabric Manager's", st.Checks)
			}
		})
	}
}

// TestStatusSkippedWarningsSource: a run into a tree that is not the
// running host skips the host and systemd steps; status still says done,
// but counts them, groups them by reason, and carries the run's warnings
// (not the skipped steps' own log lines) and the manifest's source.
func TestStatusSkippedWarningsSource(t *testing.T) {
	root := t.TempDir()
	applytest.PrepareRoot(t, root)
	deps, _, _, _ := applytest.Deps()
	deps.Host, deps.Systemd = nil, nil
	var logged bytes.Buffer
	warn := apply.NewWarnings(slog.NewTextHandler(&logged, nil))
	log := slog.New(warn)
	// Before the run (probing the host): kept, and a repeat counted.
	for range 2 {
		log.Warn("no resolv.conf found", "paths", "/etc/resolv.conf")
	}
	log.Info("not a warning")
	opts := applytest.Options(deps, log)
	opts.Root, opts.Source, opts.Warnings = root, "nocloud: /var/lib/cloud/seed/nocloud/user-data", warn
	if _, err := applytest.Run(context.Background(), applytest.Plan(), opts); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(logged.String(), "level=WARN msg=step") || !strings.Contains(logged.String(), "not a warning") {
		t.Errorf("the collector did not pass the log on:\n%s", logged.String())
	}
	st, err := Read(context.Background(), Options{Root: root})
	if err != nil {
		t.Fatal(err)
	}
	skipped := st.Outcomes[state.OutcomeSkipped]
	if skipped == 0 || st.Outcomes[state.OutcomeDone]+st.Outcomes[state.OutcomeUnchanged]+skipped != st.Total {
		t.Fatalf("outcomes %v of %d steps; want some skipped, the rest done or unchanged", st.Outcomes, st.Total)
	}
	wantSummary := fmt.Sprintf("done, %d of %d steps skipped, 1 warning (status --long says which)", skipped, st.Total)
	if st.State != StateDone || st.Summary != wantSummary || ExitCode(st) != 0 {
		t.Errorf("status %s %q (exit %d); want done %q, exit 0", st.State, st.Summary, ExitCode(st), wantSummary)
	}
	n := 0
	for _, g := range st.Skipped {
		n += len(g.Steps)
		if !strings.Contains(g.Reason, "acts on the running host, and the root is "+root) {
			t.Errorf("skipped for %q: %v; want the reason to name the root", g.Reason, g.Steps)
		}
	}
	if n != skipped || len(st.Skipped) != 2 {
		t.Errorf("skipped groups %+v; want %d steps in two groups (host operations, systemd)", st.Skipped, skipped)
	}
	if want := []string{"no resolv.conf found paths=/etc/resolv.conf (2 times)"}; !slices.Equal(st.Warnings, want) {
		t.Errorf("warnings %q, want %q", st.Warnings, want)
	}
	if st.Source != opts.Source {
		t.Errorf("source %q, want %q", st.Source, opts.Source)
	}
}

// TestStatusMissingRoot: a root that does not exist is an error, not "not
// run" (a mistyped --root must not read as a fresh host).
func TestStatusMissingRoot(t *testing.T) {
	missing := filepath.Join(t.TempDir(), "nonexistent")
	st, err := Read(context.Background(), Options{Root: missing})
	var me *MissingRootError
	if !errors.As(err, &me) || !errors.Is(err, fs.ErrNotExist) || !strings.Contains(err.Error(), missing) {
		t.Errorf("status of a missing root: %+v, %v; want a MissingRootError naming it", st, err)
	}
}

func TestStatusOfUpgrades(t *testing.T) {
	t.Run("switched", func(t *testing.T) {
		root, sd, _, err := applytest.LiveUpgrade(t, nil)
		if err != nil {
			t.Fatal(err)
		}
		st, err := Read(context.Background(), Options{Root: root, Systemd: sd})
		if err != nil {
			t.Fatal(err)
		}
		if st.State != StateDone || st.Machine != "kube2" || st.Previous != "kube1" || st.LastUpgrade == nil || st.LastUpgrade.Outcome != state.OutcomeSwitched {
			t.Errorf("status %+v; want done on kube2, kube1 kept, the switch recorded", st)
		}
	})
	t.Run("rolled back", func(t *testing.T) {
		root, sd, _, _ := applytest.LiveUpgrade(t, nil, "kube2")
		st, err := Read(context.Background(), Options{Root: root, Systemd: sd})
		if err != nil {
			t.Fatal(err)
		}
		if st.State != StateError || st.Machine != "kube1" || !strings.Contains(st.Summary, "rolled back") || !strings.Contains(st.Summary, "not Ready") || ExitCode(st) != 1 {
			t.Errorf("status %s %q on %s; want an error naming the rollback and its reason, kube1 running", st.State, st.Summary, st.Machine)
		}
	})
	t.Run("interrupted", func(t *testing.T) {
		root, sd, _, err := applytest.LiveUpgrade(t, nil)
		if err != nil {
			t.Fatal(err)
		}
		s, err := state.Open(root)
		applytest.Must(t, err)
		defer s.Close()
		ms, _ := s.Machines()
		ms.Upgrade = &state.Upgrade{From: "kube1", To: "kube2", Phase: state.UpgradeVerifying, Started: time.Now()}
		applytest.Must(t, s.WriteMachines(ms))
		st, err := Read(context.Background(), Options{Root: root, Systemd: sd})
		if err != nil {
			t.Fatal(err)
		}
		if st.State != StateError || !strings.Contains(st.Summary, "interrupted") || st.Upgrade == nil {
			t.Errorf("status %s %q; want the interrupted switch reported", st.State, st.Summary)
		}
	})
}
