package apply_test

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	. "github.com/nodespawn/nodespawn/apply"
	"github.com/nodespawn/nodespawn/internal/applytest"
	"github.com/nodespawn/nodespawn/internal/confine"
	"github.com/nodespawn/nodespawn/plan"
	"github.com/nodespawn/nodespawn/state"
)

func TestConcurrentApplyRefusedAfterTimeout(t *testing.T) {
	root := t.TempDir()
	applytest.PrepareRoot(t, root)
	release := applytest.StartBlockedApply(t, root)

	deps, host, _, _ := applytest.Deps()
	opts := applytest.Options(deps, slog.New(slog.DiscardHandler))
	opts.Root, opts.LockTimeout = root, 300*time.Millisecond
	_, err := applytest.Run(context.Background(), applytest.Plan(), opts)
	var le *state.LockedError
	if !errors.As(err, &le) {
		t.Fatalf("second apply: err = %v, want state.LockedError", err)
	}
	if want := fmt.Sprintf("pid %d", os.Getpid()); !strings.Contains(err.Error(), want) {
		t.Errorf("error %q does not say who holds the lock (%s)", err, want)
	}
	if len(host.Calls) != 0 {
		t.Errorf("the refused apply ran steps: %q", host.Calls)
	}
	if err := release(); err != nil {
		t.Fatalf("first apply: %v", err)
	}
}

func TestConcurrentApplyWaitsForTheFirst(t *testing.T) {
	root := t.TempDir()
	applytest.PrepareRoot(t, root)
	release := applytest.StartBlockedApply(t, root)

	deps, host, _, _ := applytest.Deps()
	log, waiting := applytest.SignalLog("waiting for another nodespawn")
	opts := applytest.Options(deps, log)
	opts.Root = root
	type result struct {
		res *Result
		err error
	}
	second := make(chan result, 1)
	go func() {
		res, err := applytest.Run(context.Background(), applytest.Plan(), opts)
		second <- result{res, err}
	}()
	<-waiting
	if err := release(); err != nil {
		t.Fatalf("first apply: %v", err)
	}
	r := <-second
	if r.err != nil || !r.res.AlreadyApplied {
		t.Fatalf("second apply after the first finished: %v (already applied: %v)", r.err, r.res != nil && r.res.AlreadyApplied)
	}
	if len(host.Calls) != 0 {
		t.Errorf("second apply ran steps: %q", host.Calls)
	}
}

func TestDownloadsFetchWhileImagePulls(t *testing.T) {
	root := t.TempDir()
	applytest.PrepareRoot(t, root)
	deps, _, _, dl := applytest.Deps()
	dl.FetchStarted = make(chan struct{})
	deps.Images = &applytest.Images{Before: func(ctx context.Context) error {
		// Deadlocks (and fails after the safety timeout) unless downloads
		// are fetched concurrently with the image.
		select {
		case <-dl.FetchStarted:
			return nil
		case <-time.After(30 * time.Second):
			return errors.New("no download was fetched while the image was being pulled")
		}
	}}
	dl.BeforeInstall = func() error {
		if _, err := os.Stat(filepath.Join(root, applytest.RootfsPath("/etc/os-release"))); err != nil {
			return fmt.Errorf("install before the image step finished: %w", err)
		}
		return nil
	}
	opts := applytest.Options(deps, slog.New(slog.DiscardHandler))
	opts.Root = root
	if _, err := applytest.Run(context.Background(), applytest.Plan(), opts); err != nil {
		t.Fatal(err)
	}
}

func TestWait(t *testing.T) {
	w := &plan.Wait{Machine: "kube1", Units: []string{"containerd.service", "kubelet.service"}, TimeoutSeconds: 1}
	tests := []struct {
		name          string
		registerAfter int
		registered    bool
		states        map[string][]string
		wantOutcome   state.Outcome
		wantErr       []string
	}{
		{
			name: "comes up", registerAfter: 3, registered: true,
			states:      map[string][]string{"containerd.service": {"activating", "active"}, "kubelet.service": {"inactive", "activating", "activating", "active"}},
			wantOutcome: state.OutcomeDone,
		},
		{
			name: "already up", registered: true, wantOutcome: state.OutcomeUnchanged,
		},
		{
			name: "kubelet fails", registered: true,
			states: map[string][]string{"kubelet.service": {"activating", "failed"}},
			wantErr: []string{"machine kube1 not ready after 1s", "containerd.service is active", "kubelet.service is failed",
				"last 30 lines of its journal", "open /dev/kmsg: operation not permitted", "journalctl -M kube1"},
		},
		{
			name: "never registered", registered: false,
			wantErr: []string{"machined does not list it", "open /dev/kmsg"},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			sd := applytest.NewSystemd()
			sd.RegisterAfter, sd.States = tt.registerAfter, tt.states
			sd.Registered["kube1"] = tt.registered
			sd.MachineJournal = "kubelet[42]: E1128 failed to run Kubelet: open /dev/kmsg: operation not permitted\n"
			o, err := WaitStep(context.Background(), Options{Deps: Deps{Systemd: sd}, PollInterval: time.Millisecond}, w)
			if tt.wantErr == nil {
				if err != nil || o != tt.wantOutcome {
					t.Fatalf("wait = %s, %v; want %s", o, err, tt.wantOutcome)
				}
				return
			}
			if err == nil {
				t.Fatal("wait succeeded, want a timeout")
			}
			for _, want := range tt.wantErr {
				if !strings.Contains(err.Error(), want) {
					t.Errorf("error does not contain %q:\n%v", want, err)
				}
			}
		})
	}
}

func TestValidatePlan(t *testing.T) {
	file := func(id string, ph plan.Phase, after ...string) plan.Step {
		return plan.Step{ID: id, Phase: ph, Kind: plan.KindFile, After: after, File: &plan.File{Path: "/x"}}
	}
	tests := []struct {
		name  string
		steps []plan.Step
		want  string
	}{
		{"ok", []plan.Step{file("a", plan.PhaseHost), file("b", plan.PhaseMachine, "a"), file("c", plan.PhaseMachine, "b")}, ""},
		{"duplicate", []plan.Step{file("a", plan.PhaseHost), file("a", plan.PhaseHost)}, "appears twice"},
		{"unknown after", []plan.Step{file("a", plan.PhaseHost, "zz")}, "unknown step zz"},
		{"later phase", []plan.Step{file("a", plan.PhaseHost, "b"), file("b", plan.PhaseStart)}, "later phase"},
		{"cycle", []plan.Step{file("a", plan.PhaseHost, "b"), file("b", plan.PhaseHost, "a")}, "cycle"},
		{"no payload", []plan.Step{{ID: "a", Phase: plan.PhaseHost, Kind: plan.KindLink}}, "without its link payload"},
		{"bad phase", []plan.Step{{ID: "a", Phase: "later", Kind: plan.KindNftFlush}}, "unknown phase"},
		{"no id", []plan.Step{{Phase: plan.PhaseHost, Kind: plan.KindNftFlush}}, "has no id"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := ValidatePlan(&plan.Plan{Version: plan.Version, Steps: tt.steps})
			if tt.want == "" && err != nil || tt.want != "" && (err == nil || !strings.Contains(err.Error(), tt.want)) {
				t.Errorf("validatePlan = %v, want %q", err, tt.want)
			}
		})
	}
}

// TestScopeConfinesPaths writes through the links a real image has and a
// few hostile ones: every write lands inside the scope, where the machine
// itself would see it.
func TestScopeConfinesPaths(t *testing.T) {
	top := t.TempDir()
	applytest.Must(t, os.MkdirAll(filepath.Join(top, "usr/lib"), 0o755))
	applytest.Must(t, os.MkdirAll(filepath.Join(top, "run"), 0o755))
	for p, target := range map[string]string{
		"lib":     "usr/lib",   // relative, merged /usr
		"var-run": "/run",      // absolute: the scope's own /run
		"up":      "../../../", // climbs above the top: clamped
		"loop":    "loop",
	} {
		applytest.Must(t, os.Symlink(target, filepath.Join(top, p)))
	}
	root, err := confine.Open(top)
	applytest.Must(t, err)
	defer root.Close()
	tests := []struct {
		path, want, err string
	}{
		{"/var/lib/machines/m/lib/x.so", top + "/usr/lib/x.so", ""},
		{"/var/lib/machines/m/var-run/foo", top + "/run/foo", ""},
		{"/var/lib/machines/m/up/etc-file", top + "/etc-file", ""},
		{"/var/lib/machines/m/loop/x", "", "too many levels"},
		{"/etc/passwd", "", "outside"},
	}
	for _, tt := range tests {
		rel, err := ScopeRel(root, "/var/lib/machines/m", tt.path)
		if err == nil {
			err = root.WriteFile(rel, []byte(tt.path), 0o644, -1, -1)
		}
		if tt.err != "" {
			if err == nil || !strings.Contains(err.Error(), tt.err) {
				t.Errorf("write %s: %v; want error %q", tt.path, err, tt.err)
			}
			continue
		}
		if err != nil {
			t.Errorf("write %s: %v", tt.path, err)
			continue
		}
		if b, err := os.ReadFile(tt.want); err != nil || string(b) != tt.path {
			t.Errorf("write %s: %s holds %q, %v", tt.path, tt.want, b, err)
		}
	}
}

func TestExitCode(t *testing.T) {
	tests := []struct {
		err  error
		want int
	}{
		{nil, 0},
		{&StepError{ID: "x", Err: errInjected}, 1},
		{fmt.Errorf("wrapped: %w", &ManifestChangedError{Applied: "a", Given: "b"}), 2},
		{&state.LockedError{Path: "/run/nodespawn.lock", Holder: "pid 1"}, 1},
	}
	for _, tt := range tests {
		if got := ExitCode(tt.err); got != tt.want {
			t.Errorf("ExitCode(%v) = %d, want %d", tt.err, got, tt.want)
		}
	}
}

func TestFirstboot(t *testing.T) {
	golden(t, "nodespawn-firstboot.service", FirstbootUnit(""))
	root := t.TempDir()
	for i := 0; i < 2; i++ { // the second install changes nothing and does not fail
		applytest.Must(t, InstallFirstboot(root, "/opt/bin/nodespawn"))
	}
	unit, err := os.ReadFile(filepath.Join(root, "etc/systemd/system", FirstbootUnitName))
	applytest.Must(t, err)
	for _, want := range []string{"ExecStart=/opt/bin/nodespawn apply --source auto", "ConditionPathExists=!" + state.DoneStamp, "Type=oneshot", "WantedBy=multi-user.target"} {
		if !strings.Contains(string(unit), want) {
			t.Errorf("unit lacks %q", want)
		}
	}
	target, err := os.Readlink(filepath.Join(root, "etc/systemd/system/multi-user.target.wants", FirstbootUnitName))
	if err != nil || target != "/etc/systemd/system/"+FirstbootUnitName {
		t.Errorf("wants link -> %q, %v", target, err)
	}
	if err := InstallFirstboot(root, "nodespawn"); err == nil {
		t.Error("a relative binary path was accepted")
	}
}

func TestAgentUnit(t *testing.T) {
	golden(t, "nodespawn-agent.service", AgentUnit(""))
	root := t.TempDir()
	for i := 0; i < 2; i++ {
		applytest.Must(t, InstallAgent(root, "/opt/bin/nodespawn"))
	}
	unit, err := os.ReadFile(filepath.Join(root, "etc/systemd/system", AgentUnitName))
	applytest.Must(t, err)
	for _, want := range []string{"ExecStart=/opt/bin/nodespawn agent\n", "Restart=always", "WantedBy=multi-user.target"} {
		if !strings.Contains(string(unit), want) {
			t.Errorf("unit lacks %q", want)
		}
	}
	target, err := os.Readlink(filepath.Join(root, "etc/systemd/system/multi-user.target.wants", AgentUnitName))
	if err != nil || target != "/etc/systemd/system/"+AgentUnitName {
		t.Errorf("wants link -> %q, %v", target, err)
	}
	if err := InstallAgent(root, "nodespawn"); err == nil {
		t.Error("a relative binary path was accepted")
	}
}

// causeDownloader fails one download and makes every other wait for the
// phase's cancellation, returning an error that carries its cause, the
// way an HTTP request cancelled with context.Cause does.
type causeDownloader struct{ applytest.Downloader }

type causeArtifact struct{ fail bool }

func (a causeArtifact) Install(ctx context.Context, _ *confine.Root, _ string) (bool, error) {
	if a.fail {
		return false, errors.New("sha256 mismatch")
	}
	<-ctx.Done()
	return false, fmt.Errorf("fetch checksum: %w", context.Cause(ctx))
}

func (d *causeDownloader) Fetch(ctx context.Context, dl *plan.Download, _ *confine.Root, _ string) (Artifact, error) {
	return causeArtifact{fail: dl.Name == "kubelet"}, nil
}

// TestCancelledStepsAreNotFailures: when one step fails, the steps
// cancelled because of it are recorded as skipped, naming it, even when
// their error carries the failure as the cancellation's cause; only the
// step that failed is a failure.
func TestCancelledStepsAreNotFailures(t *testing.T) {
	root := t.TempDir()
	applytest.PrepareRoot(t, root)
	deps, _, _, _ := applytest.Deps()
	deps.Downloader = &causeDownloader{}
	opts := applytest.Options(deps, slog.New(slog.DiscardHandler))
	opts.Root = root
	_, err := applytest.Run(context.Background(), applytest.Plan(), opts)
	var se *StepError
	if !errors.As(err, &se) || se.ID != "rootfs:download:kubelet" {
		t.Fatalf("Run: %v, want the kubelet download's failure", err)
	}
	rec, err := state.ReadRecord(root)
	applytest.Must(t, err)
	for _, s := range rec.Steps {
		if s.Outcome == state.OutcomeFailed && s.ID != "rootfs:download:kubelet" {
			t.Errorf("%s recorded as failed (%s); it was cancelled", s.ID, s.Error)
		}
		if s.ID == "rootfs:download:cni" && (s.Outcome != state.OutcomeSkipped || !strings.Contains(s.Error, "rootfs:download:kubelet")) {
			t.Errorf("the cancelled download: %s %q", s.Outcome, s.Error)
		}
	}
}
