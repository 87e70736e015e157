package upgrade_test

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	. "github.com/nodespawn/nodespawn/apply"
	"github.com/nodespawn/nodespawn/internal/applytest"
	"github.com/nodespawn/nodespawn/internal/confine"
	"github.com/nodespawn/nodespawn/internal/layout"
	"github.com/nodespawn/nodespawn/provision"
	"github.com/nodespawn/nodespawn/state"
	. "github.com/nodespawn/nodespawn/upgrade"
)

// Child process modes for the crash tests (they re-run this test binary;
// TestMain sends the child to childUpgrade).
const (
	childRootEnv    = "NODESPAWN_TEST_UPGRADE_ROOT"
	upgradeChildEnv = "NODESPAWN_TEST_UPGRADE" // version to apply
	upgradeKillEnv  = "NODESPAWN_TEST_UPGRADE_KILL"
	upgradeModeEnv  = "NODESPAWN_TEST_UPGRADE_MODE" // "apply" or "firstboot"
	brokenEnv       = "NODESPAWN_TEST_BROKEN"
)

func TestMain(m *testing.M) {
	if root := os.Getenv(childRootEnv); root != "" {
		os.Exit(childUpgrade(root, os.Getenv(upgradeChildEnv)))
	}
	os.Exit(m.Run())
}

// childUpgrade applies a version of the upgrade fixture against root with
// an applytest.DiskSystemd, SIGKILLing itself at the n-th checkpoint or step record.
func childUpgrade(root, version string) int {
	broken := strings.Fields(os.Getenv(brokenEnv))
	deps, _, _, _ := applytest.Deps()
	deps.Systemd = applytest.NewDiskSystemd(root)
	opts := applytest.VersionOptions(root, version, deps, broken...)
	count := 0
	kill := -1
	if s := os.Getenv(upgradeKillEnv); s != "" {
		kill, _ = strconv.Atoi(s)
	}
	hit := func(string) {
		count++
		if count == kill {
			syscall.Kill(os.Getpid(), syscall.SIGKILL)
		}
	}
	opts.Hooks.Checkpoint = hit
	opts.Hooks.AfterStep = func(int) { hit("step") }
	defer func() { fmt.Fprintf(os.Stderr, "checkpoints: %d\n", count) }()
	ctx := context.Background()
	switch os.Getenv(upgradeModeEnv) {
	case "prepare":
		_, _, err := provision.Prepare(ctx, applytest.UpgradePlan("kube1", version), opts)
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
		}
		return ExitCode(err)
	case "switch":
		_, err := provision.SwitchPrepared(ctx, opts, applytest.VersionDigest(version))
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
		}
		return ExitCode(err)
	}
	if os.Getenv(upgradeModeEnv) == "firstboot" {
		// What the first-boot unit does at boot: finish a switch, then the
		// user-data's manifest, never an upgrade.
		if _, err := Resume(ctx, opts); err != nil {
			fmt.Fprintln(os.Stderr, err)
			return ExitCode(err)
		}
		opts.Upgrade.Refuse = true
	}
	_, err := applytest.Run(ctx, applytest.UpgradePlan("kube1", version), opts)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
	}
	return ExitCode(err)
}

// runUpgradeChild runs the child; kill < 0 runs it through.
func runUpgradeChild(t *testing.T, root, version, mode string, kill int, broken ...string) (killed bool, code int, out string) {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), upgradeChildEnv+"="+version, childRootEnv+"="+root, upgradeModeEnv+"="+mode, brokenEnv+"="+strings.Join(broken, " "))
	if kill >= 0 {
		cmd.Env = append(cmd.Env, upgradeKillEnv+"="+strconv.Itoa(kill))
	}
	b, err := cmd.CombinedOutput()
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		if ws, ok := ee.Sys().(syscall.WaitStatus); ok && ws.Signaled() && ws.Signal() == syscall.SIGKILL {
			return true, -1, string(b)
		}
		return false, ee.ExitCode(), string(b)
	}
	if err != nil {
		t.Fatalf("child: %v\n%s", err, b)
	}
	return false, 0, string(b)
}

// checkpointsOf reads the count the child printed.
func checkpointsOf(t *testing.T, out string) int {
	t.Helper()
	i := strings.LastIndex(out, "checkpoints: ")
	if i < 0 {
		t.Fatalf("no checkpoint count in:\n%s", out)
	}
	n, err := strconv.Atoi(strings.TrimSpace(strings.SplitN(out[i+len("checkpoints: "):], "\n", 2)[0]))
	if err != nil {
		t.Fatal(err)
	}
	return n
}

// checkOneMachine checks what must hold whenever nodespawn is not running:
// the machine that runs is the active one, alone, started at boot alone,
// and no two machines ever ran at once.
func checkOneMachine(t *testing.T, root string, sd *applytest.DiskSystemd, want string) {
	t.Helper()
	st := sd.State()
	if len(st.Violations) > 0 {
		t.Errorf("two machines ran at once: %v\ncalls: %v", st.Violations, st.Calls)
	}
	var running []string
	for m := range st.Registered {
		running = append(running, m)
	}
	active, _ := os.ReadFile(filepath.Join(root, layout.ActiveMachineFile))
	if len(running) != 1 || running[0] != want || strings.TrimSpace(string(active)) != want {
		t.Errorf("running %v, active file %q; want %s alone\ncalls: %v", running, active, want, st.Calls)
	}
	for _, m := range []string{"kube1", "kube2"} {
		_, err := os.Lstat(filepath.Join(root, layout.EnableLink(m)))
		if (m == want) != (err == nil) {
			t.Errorf("boot link of %s: %v (the machine that runs is %s)", m, err, want)
		}
	}
	ms, err := state.ReadMachines(root)
	if err != nil || ms.Active != want || ms.Upgrade != nil {
		t.Errorf("machines state: %+v, %v; want %s active and no upgrade in progress", ms, err, want)
	}
}

// TestUpgradeCrashAtEveryCheckpoint kills an upgrade at every step record
// and between every two changes of its switch (and, with the new machine
// broken, of its rollback), then either runs apply again or cuts the
// power: the boot must start exactly one machine, the active one, and the
// first-boot unit's run must finish the switch. In the end the node runs
// on the new machine (on the old one when the new one is broken), alone.
func TestUpgradeCrashAtEveryCheckpoint(t *testing.T) {
	if testing.Short() {
		t.Skip("runs the child process several times per checkpoint")
	}
	for _, tc := range []struct {
		name   string
		broken []string
		want   string
		code   int
	}{
		{"switch", nil, "kube2", ExitOK},
		{"rollback", []string{"kube2"}, "kube1", ExitFailed},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			// The node on kube1 from version A: the starting point of every case.
			base := t.TempDir()
			applytest.PrepareRoot(t, base)
			if _, code, out := runUpgradeChild(t, base, "A", "apply", -1); code != 0 {
				t.Fatalf("apply A: exit %d\n%s", code, out)
			}
			start := func(t *testing.T) (string, *applytest.DiskSystemd) {
				root := filepath.Join(t.TempDir(), "root")
				if out, err := exec.Command("cp", "-a", base, root).CombinedOutput(); err != nil {
					t.Fatalf("cp: %v %s", err, out)
				}
				if out, err := exec.Command("cp", "-a", base+".systemd.json", root+".systemd.json").CombinedOutput(); err != nil {
					t.Fatalf("cp: %v %s", err, out)
				}
				return root, applytest.NewDiskSystemd(root)
			}
			ref, sd := start(t)
			_, code, out := runUpgradeChild(t, ref, "B", "apply", -1, tc.broken...)
			if code != tc.code {
				t.Fatalf("uninterrupted upgrade: exit %d, want %d\n%s", code, tc.code, out)
			}
			checkOneMachine(t, ref, sd, tc.want)
			n := checkpointsOf(t, out)
			t.Logf("%d checkpoints in an uninterrupted upgrade", n)

			for k := 1; k <= n; k++ {
				for _, after := range []string{"rerun", "power-cut"} {
					t.Run(fmt.Sprintf("kill-%d-%s", k, after), func(t *testing.T) {
						root, sd := start(t)
						killed, _, out := runUpgradeChild(t, root, "B", "apply", k, tc.broken...)
						if !killed {
							t.Fatalf("not killed at checkpoint %d:\n%s", k, out)
						}
						if after == "power-cut" {
							running := sd.Boot(t)
							active, _ := os.ReadFile(filepath.Join(root, layout.ActiveMachineFile))
							if len(running) != 1 || running[0] != strings.TrimSpace(string(active)) {
								t.Fatalf("boot after a power cut at checkpoint %d started %v (active file %q); want the active machine alone", k, running, active)
							}
							// The first-boot unit runs when the switch removed
							// the stamp; it finishes the switch.
							if _, err := os.Stat(filepath.Join(root, state.DoneStamp)); err != nil {
								if _, code, out := runUpgradeChild(t, root, "A", "firstboot", -1, tc.broken...); code != ExitOK && code != ExitInput && code != tc.code {
									t.Fatalf("first boot after the power cut: exit %d\n%s", code, out)
								}
							}
						}
						// The operator applies the new manifest again.
						_, code, out := runUpgradeChild(t, root, "B", "apply", -1, tc.broken...)
						if code != tc.code {
							t.Fatalf("apply again after a kill at checkpoint %d: exit %d, want %d\n%s", k, code, tc.code, out)
						}
						checkOneMachine(t, root, sd, tc.want)
						if _, err := os.Stat(filepath.Join(root, state.DoneStamp)); err != nil {
							t.Errorf("no done stamp with the node running: %v", err)
						}
					})
				}
			}
		})
	}
}

func TestUpgradeSwitchesToTheOtherMachine(t *testing.T) {
	root, sd, res, err := applytest.LiveUpgrade(t, nil)
	if err != nil {
		t.Fatal(err)
	}
	checkOneMachine(t, root, sd, "kube2")
	if res.Machine != "kube2" || res.Upgrade == nil || res.Upgrade.Outcome != state.OutcomeSwitched {
		t.Errorf("result %+v, upgrade %+v; want switched to kube2", res, res.Upgrade)
	}
	ms, _ := state.ReadMachines(root)
	if ms.Previous != "kube1" || !ms.Applied["kube2"].Succeeded || ms.Applied["kube2"].ManifestDigest != applytest.VersionDigest("B") {
		t.Errorf("machines state %+v: want kube1 kept for a rollback and kube2 made from B", ms)
	}
	// The old machine is stopped before the new one starts.
	calls := strings.Join(sd.State().Calls, "; ")
	if !strings.Contains(calls, "stop kube1; start kube2") {
		t.Errorf("calls %s: want kube1 stopped, then kube2 started", calls)
	}
	// Both rootfs exist; the new one holds version B, the old one A.
	for m, v := range map[string]string{"kube1": "A", "kube2": "B"} {
		b, err := os.ReadFile(filepath.Join(root, "var/lib/machines", m, "etc/systemd/system/kubelet.service"))
		if err != nil || !strings.Contains(string(b), "version "+v) {
			t.Errorf("%s's kubelet unit: %q %v; want version %s", m, b, err, v)
		}
	}
	rec, _ := state.ReadRecord(root)
	if rec.Machine != "kube2" || rec.Status != state.StatusSucceeded || rec.Upgrade == nil || rec.Upgrade.From != "kube1" || rec.Upgrade.Outcome != state.OutcomeSwitched {
		t.Errorf("record: machine %s, status %s, upgrade %+v", rec.Machine, rec.Status, rec.Upgrade)
	}
	// A second apply of B finds it applied.
	deps, _, _, _ := applytest.Deps()
	deps.Systemd = sd
	again, err := applytest.Run(context.Background(), applytest.UpgradePlan("kube1", "B"), applytest.VersionOptions(root, "B", deps))
	if err != nil || !again.AlreadyApplied || again.Machine != "kube2" {
		t.Errorf("apply B again: %+v %v; want already applied on kube2", again, err)
	}
}

// TestSecondUpgradeKeepsSharedHostFiles: the second upgrade clears the
// previous machine (kube1) to prepare it again; what the running machine's
// plan wrote too (a shared unit) must stay while it is cleared.
func TestSecondUpgradeKeepsSharedHostFiles(t *testing.T) {
	root, sd, _, err := applytest.LiveUpgrade(t, nil)
	if err != nil {
		t.Fatal(err)
	}
	deps, _, _, _ := applytest.Deps()
	deps.Systemd = sd
	opts := applytest.VersionOptions(root, "C", deps)
	checked := false
	opts.Hooks.Checkpoint = (func(label string) {
		if label != "upgrade:preparing" {
			return
		}
		checked = true
		if _, err := os.Stat(filepath.Join(root, applytest.SharedUnit)); err != nil {
			t.Errorf("while kube1 was cleared for the next upgrade, the running kube2's %s went: %v", applytest.SharedUnit, err)
		}
		if _, err := os.Stat(filepath.Join(root, "etc/systemd/nspawn/kube1.nspawn")); err == nil {
			t.Errorf("kube1's own .nspawn file was kept")
		}
	})
	res, err := applytest.Run(context.Background(), applytest.UpgradePlan("kube1", "C"), opts)
	if err != nil || res.Machine != "kube1" {
		t.Fatalf("second upgrade: %+v %v; want kube1", res, err)
	}
	if !checked {
		t.Fatal("the upgrade never reached upgrade:preparing")
	}
}

// TestUpgradeWhoseStopFails: the old machine does not stop; nothing is
// switched, the node stays on it, and the done stamp is back so the next
// boot's first-boot unit has nothing to finish.
func TestUpgradeWhoseStopFails(t *testing.T) {
	root, deps, sd, _ := applytest.NodeOnKube1(t, nil)
	sd.StopFails = []string{"kube1"}
	res, err := applytest.Run(context.Background(), applytest.UpgradePlan("kube1", "B"), applytest.VersionOptions(root, "B", deps))
	if err == nil || !strings.Contains(err.Error(), "nothing was switched") || res == nil || res.Machine != "kube1" {
		t.Fatalf("upgrade with a failing stop: %+v, %v; want an error and the node on kube1", res, err)
	}
	if _, err := os.Stat(filepath.Join(root, state.DoneStamp)); err != nil {
		t.Errorf("done stamp after a failed stop: %v; want it back (kube1 runs the node)", err)
	}
	if ms, _ := state.ReadMachines(root); ms.Active != "kube1" {
		t.Errorf("active machine %q, want kube1", ms.Active)
	}
}

func TestUpgradeRollsBackWhenTheNodeIsNotReady(t *testing.T) {
	root, sd, res, err := applytest.LiveUpgrade(t, nil, "kube2")
	var ue *UpgradeError
	if !errors.As(err, &ue) || !ue.RolledBack || ExitCode(err) != ExitFailed {
		t.Fatalf("err %v (exit %d); want a rolled-back UpgradeError, exit 1", err, ExitCode(err))
	}
	if !strings.Contains(err.Error(), "not Ready") {
		t.Errorf("error %q does not say why", err)
	}
	checkOneMachine(t, root, sd, "kube1")
	ms, _ := state.ReadMachines(root)
	if ms.Last == nil || ms.Last.Outcome != state.OutcomeRolledBack || !strings.Contains(ms.Last.Reason, "not Ready") || ms.Previous != "" {
		t.Errorf("machines state %+v, last %+v: want the rollback and its reason recorded, nothing to roll back to", ms, ms.Last)
	}
	rec, _ := state.ReadRecord(root)
	if rec.Status != state.StatusFailed || rec.Upgrade == nil || rec.Upgrade.Outcome != state.OutcomeRolledBack || !strings.Contains(rec.Upgrade.Reason, "not Ready") {
		t.Errorf("record: status %s, upgrade %+v", rec.Status, rec.Upgrade)
	}
	if res.Machine != "kube1" {
		t.Errorf("result machine %s, want kube1", res.Machine)
	}
	if _, err := os.Stat(filepath.Join(root, state.DoneStamp)); err != nil {
		t.Errorf("the node runs on kube1 again, but the done stamp is gone: %v", err)
	}
	// Applying A again: the node runs A; nothing to do.
	deps, _, _, _ := applytest.Deps()
	deps.Systemd = sd
	again, err := applytest.Run(context.Background(), applytest.UpgradePlan("kube1", "A"), applytest.VersionOptions(root, "A", deps))
	if err != nil || !again.AlreadyApplied {
		t.Errorf("apply A after the rollback: %+v %v; want already applied", again, err)
	}
}

func TestUpgradeFailsFastWhenKubeletKeepsRestarting(t *testing.T) {
	began := time.Now()
	root, sd, _, err := applytest.LiveUpgrade(t, []string{"kube2"})
	var ue *UpgradeError
	if !errors.As(err, &ue) || !ue.RolledBack || !strings.Contains(err.Error(), "keeps failing") {
		t.Fatalf("err %v; want a rollback because kubelet keeps failing", err)
	}
	// ReadyTimeout is 5 s: the restarts, not the timeout, ended the wait.
	if d := time.Since(began); d > 4*time.Second {
		t.Errorf("took %s; the restart limit should end the wait early", d)
	}
	checkOneMachine(t, root, sd, "kube1")
}

func TestUpgradePreparationFailureLeavesTheNodeAlone(t *testing.T) {
	root, deps, sd, dl := applytest.NodeOnKube1(t, nil)
	dl.Fail = map[string]error{"kubelet": errors.New("mirror down")}
	_, err := applytest.Run(context.Background(), applytest.UpgradePlan("kube1", "B"), applytest.VersionOptions(root, "B", deps))
	var se *StepError
	if !errors.As(err, &se) || !strings.Contains(err.Error(), "mirror down") {
		t.Fatalf("err %v; want the failed download step", err)
	}
	checkOneMachineDuringUpgrade(t, root, sd, "kube1")
	if strings.Contains(strings.Join(sd.State().Calls, ";"), "stop kube1") {
		t.Errorf("kube1 was stopped although kube2 was never ready: %v", sd.State().Calls)
	}
	// The mirror is back: the same apply finishes the upgrade.
	dl.Fail = nil
	if _, err := applytest.Run(context.Background(), applytest.UpgradePlan("kube1", "B"), applytest.VersionOptions(root, "B", deps)); err != nil {
		t.Fatal(err)
	}
	checkOneMachine(t, root, sd, "kube2")
}

// checkOneMachineDuringUpgrade is checkOneMachine for a node whose
// upgrade is being prepared.
func checkOneMachineDuringUpgrade(t *testing.T, root string, sd *applytest.DiskSystemd, want string) {
	t.Helper()
	st := sd.State()
	if len(st.Violations) > 0 || len(st.Registered) != 1 || !st.Registered[want] {
		t.Errorf("running %v, violations %v; want %s alone", st.Registered, st.Violations, want)
	}
	ms, _ := state.ReadMachines(root)
	if ms.Active != want || ms.Upgrade == nil || ms.Upgrade.Phase != state.UpgradePreparing {
		t.Errorf("machines state %+v; want %s active and the upgrade still preparing", ms, want)
	}
}

func TestRollbackByHand(t *testing.T) {
	root, sd, _, err := applytest.LiveUpgrade(t, nil)
	if err != nil {
		t.Fatal(err)
	}
	deps, _, _, _ := applytest.Deps()
	deps.Systemd = sd
	opts := applytest.VersionOptions(root, "B", deps)
	res, err := Rollback(context.Background(), opts)
	if err != nil {
		t.Fatal(err)
	}
	checkOneMachine(t, root, sd, "kube1")
	ms, _ := state.ReadMachines(root)
	if res.Upgrade == nil || res.Upgrade.Outcome != state.OutcomeManualRollback || ms.Previous != "kube2" {
		t.Errorf("result %+v, state %+v; want rolled back by hand, kube2 kept", res.Upgrade, ms)
	}
	// The node runs A again: applying A changes nothing; applying B
	// upgrades again.
	if again, err := applytest.Run(context.Background(), applytest.UpgradePlan("kube1", "A"), applytest.VersionOptions(root, "A", deps)); err != nil || !again.AlreadyApplied {
		t.Errorf("apply A after the rollback: %+v %v", again, err)
	}
	if _, err := applytest.Run(context.Background(), applytest.UpgradePlan("kube1", "B"), applytest.VersionOptions(root, "B", deps)); err != nil {
		t.Fatal(err)
	}
	checkOneMachine(t, root, sd, "kube2")
}

func TestRollbackWithoutAPreviousMachine(t *testing.T) {
	root, deps, _, _ := applytest.NodeOnKube1(t, nil)
	_, err := Rollback(context.Background(), applytest.VersionOptions(root, "A", deps))
	var nr *state.NoRollbackError
	if !errors.As(err, &nr) || !strings.Contains(err.Error(), "no previous machine") {
		t.Errorf("err %v; want no previous machine", err)
	}
}

func TestUpgradeRefusesAMachineItDidNotMake(t *testing.T) {
	root, deps, sd, _ := applytest.NodeOnKube1(t, nil)
	mine := filepath.Join(root, "var/lib/machines/kube2/etc/mine")
	applytest.Must(t, os.MkdirAll(filepath.Dir(mine), 0o755))
	applytest.Must(t, os.WriteFile(mine, []byte("the operator's own machine\n"), 0o644))
	_, err := applytest.Run(context.Background(), applytest.UpgradePlan("kube1", "B"), applytest.VersionOptions(root, "B", deps))
	var me *MachineExistsError
	if !errors.As(err, &me) {
		t.Fatalf("err %v; want MachineExistsError", err)
	}
	if _, err := os.Stat(mine); err != nil {
		t.Errorf("the operator's machine was touched: %v", err)
	}
	checkOneMachine(t, root, sd, "kube1")
}

func TestFirstBootNeverUpgrades(t *testing.T) {
	root, deps, _, _ := applytest.NodeOnKube1(t, nil)
	opts := applytest.VersionOptions(root, "B", deps)
	opts.Upgrade.Refuse = true
	_, err := applytest.Run(context.Background(), applytest.UpgradePlan("kube1", "B"), opts)
	var mc *ManifestChangedError
	if !errors.As(err, &mc) || !mc.FirstBoot || ExitCode(err) != ExitInput {
		t.Errorf("err %v; want the first boot's refusal", err)
	}
}

func openTestRoot(t *testing.T, root string) *confine.Root {
	t.Helper()
	host, err := confine.Open(root)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { host.Close() })
	return host
}

// TestPrepareThenSwitch: the agent's halves of an upgrade. Prepare makes
// kube2 beside the running kube1 and disrupts nothing; again, it does
// nothing; SwitchPrepared switches only to what was prepared.
func TestPrepareThenSwitch(t *testing.T) {
	root, deps, sd, dl := applytest.NodeOnKube1(t, nil)
	ctx := context.Background()
	opts := applytest.VersionOptions(root, "B", deps)
	res, d, err := provision.Prepare(ctx, applytest.UpgradePlan("kube1", "B"), opts)
	if err != nil {
		t.Fatal(err)
	}
	if d.Action != provision.ActionUpgrade || res.Machine != "kube1" || res.Record.Upgrade == nil || res.Record.Upgrade.Outcome != state.OutcomePrepared {
		t.Fatalf("decision %s, result %+v; want an upgrade prepared beside kube1", d, res)
	}
	checkOneMachineDuringUpgrade(t, root, sd, "kube1")
	ms, _ := state.ReadMachines(root)
	if u := ms.Upgrade; u.To != "kube2" || u.Prepared == nil || u.ManifestDigest != applytest.VersionDigest("B") || ms.Applied["kube2"].Succeeded {
		t.Fatalf("upgrade %+v, applied %+v; want kube2 prepared from B, not yet succeeded", u, ms.Applied["kube2"])
	}
	if calls := strings.Join(sd.State().Calls, "; "); strings.Contains(calls, "stop kube1") || strings.Contains(calls, "start kube2") {
		t.Errorf("prepare touched the machines: %s", calls)
	}
	if b, err := os.ReadFile(filepath.Join(root, "var/lib/machines/kube2/etc/systemd/system/kubelet.service")); err != nil || !strings.Contains(string(b), "version B") {
		t.Errorf("kube2's kubelet unit: %q %v; want version B", b, err)
	}
	// Again: already prepared, nothing fetched, the same preparation.
	fetched := len(dl.Fetched)
	if _, _, err := provision.Prepare(ctx, applytest.UpgradePlan("kube1", "B"), opts); err != nil {
		t.Fatal(err)
	}
	again, _ := state.ReadMachines(root)
	if !again.Upgrade.Prepared.Equal(*ms.Upgrade.Prepared) || len(dl.Fetched) != fetched {
		t.Errorf("a second prepare prepared again: %v vs %v, %d downloads after %d", again.Upgrade.Prepared, ms.Upgrade.Prepared, len(dl.Fetched), fetched)
	}
	// The running manifest is not an upgrade: refused, nothing changes.
	if _, _, err := provision.Prepare(ctx, applytest.UpgradePlan("kube1", "A"), applytest.VersionOptions(root, "A", deps)); !errors.As(err, new(*provision.NotAnUpgradeError)) {
		t.Errorf("prepare of the running manifest: %v; want NotAnUpgradeError", err)
	}
	// A switch to another manifest than the prepared one is refused.
	_, err = provision.SwitchPrepared(ctx, opts, applytest.VersionDigest("C"))
	var np *NotPreparedError
	if !errors.As(err, &np) || ExitCode(err) != ExitInput {
		t.Fatalf("switch to C: %v; want NotPreparedError", err)
	}
	checkOneMachineDuringUpgrade(t, root, sd, "kube1")
	res, err = provision.SwitchPrepared(ctx, opts, applytest.VersionDigest("B"))
	if err != nil {
		t.Fatal(err)
	}
	checkOneMachine(t, root, sd, "kube2")
	if res.Upgrade == nil || res.Upgrade.Outcome != state.OutcomeSwitched || res.Machine != "kube2" {
		t.Errorf("result %+v; want switched to kube2", res.Upgrade)
	}
	ms, _ = state.ReadMachines(root)
	if ms.Previous != "kube1" || !ms.Applied["kube2"].Succeeded {
		t.Errorf("machines state %+v: want kube2 succeeded and kube1 kept", ms)
	}
	// Nothing prepared any more: a second switch is refused.
	if _, err := provision.SwitchPrepared(ctx, opts, applytest.VersionDigest("B")); !errors.As(err, &np) {
		t.Errorf("second switch: %v; want NotPreparedError", err)
	}
	checkOneMachine(t, root, sd, "kube2")
}

// TestPreparedSwitchRollsBack: a prepared machine whose Node never comes
// back is rolled back from, as apply's upgrade is.
func TestPreparedSwitchRollsBack(t *testing.T) {
	root, deps, sd, _ := applytest.NodeOnKube1(t, nil)
	ctx := context.Background()
	opts := applytest.VersionOptions(root, "B", deps, "kube2")
	if _, _, err := provision.Prepare(ctx, applytest.UpgradePlan("kube1", "B"), opts); err != nil {
		t.Fatal(err)
	}
	res, err := provision.SwitchPrepared(ctx, opts, applytest.VersionDigest("B"))
	var ue *UpgradeError
	if !errors.As(err, &ue) || !ue.RolledBack {
		t.Fatalf("err %v; want rolled back", err)
	}
	checkOneMachine(t, root, sd, "kube1")
	if res.Upgrade == nil || res.Upgrade.Outcome != state.OutcomeRolledBack {
		t.Errorf("result %+v; want rolled back", res.Upgrade)
	}
}

// TestPrepareCrashAtEveryCheckpoint: a prepare killed at any instant
// leaves kube1 running the node alone; the next prepare resumes or redoes
// it, and the switch then works.
func TestPrepareCrashAtEveryCheckpoint(t *testing.T) {
	if testing.Short() {
		t.Skip("runs the child process once per checkpoint")
	}
	base := t.TempDir()
	applytest.PrepareRoot(t, base)
	if _, code, out := runUpgradeChild(t, base, "A", "apply", -1); code != 0 {
		t.Fatalf("apply A: exit %d\n%s", code, out)
	}
	start := func(t *testing.T) (string, *applytest.DiskSystemd) {
		root := filepath.Join(t.TempDir(), "root")
		for _, p := range [][2]string{{base, root}, {base + ".systemd.json", root + ".systemd.json"}} {
			if out, err := exec.Command("cp", "-a", p[0], p[1]).CombinedOutput(); err != nil {
				t.Fatalf("cp: %v %s", err, out)
			}
		}
		return root, applytest.NewDiskSystemd(root)
	}
	ref, _ := start(t)
	_, code, out := runUpgradeChild(t, ref, "B", "prepare", -1)
	if code != 0 {
		t.Fatalf("uninterrupted prepare: exit %d\n%s", code, out)
	}
	n := checkpointsOf(t, out)
	t.Logf("%d checkpoints in an uninterrupted prepare", n)
	for k := 1; k <= n; k++ {
		t.Run(fmt.Sprintf("kill-%d", k), func(t *testing.T) {
			t.Parallel()
			root, sd := start(t)
			if killed, _, out := runUpgradeChild(t, root, "B", "prepare", k); !killed {
				t.Fatalf("not killed at checkpoint %d:\n%s", k, out)
			}
			st := sd.State()
			if len(st.Violations) > 0 || len(st.Registered) != 1 || !st.Registered["kube1"] || strings.Contains(strings.Join(st.Calls, ";"), "stop kube1") {
				t.Fatalf("after a kill at checkpoint %d: running %v, calls %v; want kube1 alone, untouched", k, st.Registered, st.Calls)
			}
			if _, err := os.Stat(filepath.Join(root, state.DoneStamp)); err != nil {
				t.Errorf("the done stamp went during a prepare: %v", err)
			}
			if _, code, out := runUpgradeChild(t, root, "B", "prepare", -1); code != 0 {
				t.Fatalf("prepare again: exit %d\n%s", code, out)
			}
			checkOneMachineDuringUpgrade(t, root, sd, "kube1")
			if _, code, out := runUpgradeChild(t, root, "B", "switch", -1); code != 0 {
				t.Fatalf("switch: exit %d\n%s", code, out)
			}
			checkOneMachine(t, root, sd, "kube2")
		})
	}
}
