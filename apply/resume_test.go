package apply_test

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"strconv"
	"syscall"
	"testing"

	. "github.com/nodespawn/nodespawn/apply"
	"github.com/nodespawn/nodespawn/internal/applytest"
	"github.com/nodespawn/nodespawn/state"
)

// The crash test runs apply in a child process (this test binary, re-run
// with the env vars below) that SIGKILLs itself right after the n-th step
// outcome is recorded: the harshest crash, with no deferred cleanup.
const (
	childRootEnv   = "NODESPAWN_TEST_APPLY_ROOT"
	childKillEnv   = "NODESPAWN_TEST_KILL_AFTER"
	childDigestEnv = "NODESPAWN_TEST_DIGEST"
)

func TestMain(m *testing.M) {
	if root := os.Getenv(childRootEnv); root != "" {
		os.Exit(childApply(root))
	}
	os.Exit(m.Run())
}

// childApply is the child process: the fixture plan with fresh fakes.
func childApply(root string) int {
	deps, _, _, _ := applytest.Deps()
	opts := Options{Root: root, ManifestDigest: applytest.Digest, Deps: deps, ToolVersion: "test", PollInterval: 1,
		Log: slog.New(slog.NewTextHandler(os.Stderr, nil))}
	if d := os.Getenv(childDigestEnv); d != "" {
		opts.ManifestDigest = d
	}
	if s := os.Getenv(childKillEnv); s != "" {
		n, err := strconv.Atoi(s)
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 3
		}
		SetAfterStep(&opts, func(done int) {
			if done == n {
				syscall.Kill(os.Getpid(), syscall.SIGKILL)
			}
		})
	}
	if _, err := applytest.Run(context.Background(), applytest.Plan(), opts); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return ExitCode(err)
	}
	return 0
}

// runChild runs the child against root; killAfter < 0 means no crash.
func runChild(t *testing.T, root string, killAfter int) (killed bool, out string) {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), childRootEnv+"="+root)
	if killAfter >= 0 {
		cmd.Env = append(cmd.Env, childKillEnv+"="+strconv.Itoa(killAfter))
	}
	b, err := cmd.CombinedOutput()
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		if ws, ok := ee.Sys().(syscall.WaitStatus); ok && ws.Signaled() && ws.Signal() == syscall.SIGKILL {
			return true, string(b)
		}
	}
	if err != nil {
		t.Fatalf("child apply (kill after %d): %v\n%s", killAfter, err, b)
	}
	return false, string(b)
}

// TestCrashAtEveryStepBoundaryResumes kills apply after every step in turn,
// runs it again, and requires the tree an uninterrupted run leaves.
func TestCrashAtEveryStepBoundaryResumes(t *testing.T) {
	if testing.Short() {
		t.Skip("runs the child process twice per step")
	}
	ref := t.TempDir()
	applytest.PrepareRoot(t, ref)
	if killed, out := runChild(t, ref, -1); killed {
		t.Fatalf("uninterrupted run was killed:\n%s", out)
	}
	want := applytest.Snapshot(t, ref, false)
	steps := len(applytest.Plan().Steps)

	for n := 0; n <= steps; n++ {
		t.Run(fmt.Sprintf("after-%d", n), func(t *testing.T) {
			root := t.TempDir()
			applytest.PrepareRoot(t, root)
			killed, out := runChild(t, root, n)
			if n < steps && !killed {
				t.Fatalf("child was not killed after step %d:\n%s", n, out)
			}
			if killed {
				// The record left behind is accurate: still running, with
				// exactly n outcomes.
				rec, err := state.ReadRecord(root)
				if err != nil || rec == nil {
					t.Fatalf("record after crash: %v", err)
				}
				recorded := 0
				for _, s := range rec.Steps {
					if s.Outcome != state.OutcomePending {
						recorded++
					}
				}
				if rec.Status != state.StatusRunning || recorded != n {
					t.Errorf("record after crash at %d: status %s, %d outcomes", n, rec.Status, recorded)
				}
			}
			if killed, out := runChild(t, root, -1); killed {
				t.Fatalf("resumed run was killed:\n%s", out)
			}
			if got := applytest.Snapshot(t, root, false); got != want {
				t.Errorf("tree after crash at step %d and resume differs from an uninterrupted run:\n%s", n, diffLines(want, got))
			}
			rec, _ := state.ReadRecord(root)
			if rec.Status != state.StatusSucceeded {
				t.Errorf("status after resume: %s", rec.Status)
			}
			for _, s := range rec.Steps {
				if s.Outcome != state.OutcomeDone && s.Outcome != state.OutcomeUnchanged {
					t.Errorf("step %s after resume: %s %s", s.ID, s.Outcome, s.Error)
				}
			}
		})
	}
}
