package main

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/moby/sys/mountinfo"

	"github.com/nodespawn/nodespawn/internal/layers"
	"github.com/nodespawn/nodespawn/internal/probe"
)

// The randomized crash test: a real `nodespawn apply --root` (this test
// binary run as the CLI, see TestMain) from a real OCI layout and a loopback
// mirror, SIGKILLed at random instants, not only between steps, then run
// again to the end. Every tree must equal, entry for entry (type, mode,
// owner, contents, link target), the tree of an uninterrupted run.

// cliEnv makes the test binary run the CLI instead of the tests.
const cliEnv = "NODESPAWN_TEST_RUN_CLI"

func TestMain(m *testing.M) {
	// apply --root here probes a test tree, not a host: its kernel is
	// one without overlayfs (store auto flattens), unless a test asks for
	// this kernel's (useRunningKernel), in a child CLI too.
	if os.Getenv(runningKernelEnv) == "" {
		probe.SetTestKernel(probe.Kernel{})
	}
	if os.Getenv(cliEnv) != "" {
		os.Exit(run(os.Args[1:], os.Stdin, os.Stdout, stderr()))
	}
	os.Exit(m.Run())
}

// cliCommand returns the CLI as a child process.
func cliCommand(args ...string) *exec.Cmd {
	cmd := exec.Command(os.Args[0], args...)
	cmd.Env = append(os.Environ(), cliEnv+"=1")
	return cmd
}

// Budget of the kill loop: at least minKills kills, and no new tree once
// killBudget has passed with that many done.
const (
	minKills   = 30
	killBudget = 60 * time.Second
)

func TestKillAtRandomInstantsResumes(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: the rootfs keeps the image's owners")
	}
	if testing.Short() {
		t.Skip("kills a real apply at least 30 times")
	}
	// A flattened rootfs, and a root composed from the layer store (the
	// CLI children see this kernel's overlayfs).
	t.Run("flat", func(t *testing.T) { testKillAtRandomInstants(t, false) })
	t.Run("layers", func(t *testing.T) { testKillAtRandomInstants(t, true) })
}

func testKillAtRandomInstants(t *testing.T, layerStore bool) {
	seed := uint64(time.Now().UnixNano())
	if s := os.Getenv("NODESPAWN_KILL_SEED"); s != "" {
		v, err := strconv.ParseUint(s, 10, 64)
		if err != nil {
			t.Fatalf("NODESPAWN_KILL_SEED=%q: %v", s, err)
		}
		seed = v
	}
	t.Logf("seed %d (rerun with NODESPAWN_KILL_SEED=%d)", seed, seed)
	rng := rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15))

	work := t.TempDir()
	t.Cleanup(func() { unmountUnder(t, work) })
	layout := filepath.Join(work, "layout")
	buildLayout(t, layout)
	_, srv := newMirror(t)
	mf := filepath.Join(work, "node.yaml")
	m := pipelineManifest(layout, srv.URL, "")
	if layerStore {
		m = strings.Replace(m, "  rootfs:\n", "  rootfs:\n    store: layers\n", 1)
	}
	if err := os.WriteFile(mf, []byte(m), 0o600); err != nil {
		t.Fatal(err)
	}
	if layerStore {
		useRunningKernel(t) // skips without overlayfs
	}
	apply := func(root string) *exec.Cmd {
		cmd := cliCommand("apply", "-f", mf, "--root", root)
		if layerStore {
			cmd.Env = append(cmd.Env, runningKernelEnv+"=1")
		}
		return cmd
	}

	// The reference tree, and how long a whole run takes.
	ref := filepath.Join(work, "ref")
	start := time.Now()
	if out, err := apply(ref).CombinedOutput(); err != nil {
		t.Fatalf("uninterrupted apply: %v\n%s", err, out)
	}
	whole := time.Since(start)
	want := treeOf(t, ref)
	if layerStore {
		// The machine root must be an overlay of the store, not a tree
		// apply happened to write into the mount point.
		mounted, opts, err := layers.MountedAt(filepath.Join(ref, "var/lib/machines/pipe"))
		if err != nil || !mounted || !strings.Contains(opts, "lowerdir") || !strings.Contains(opts, "="+filepath.Join(ref, "var/lib/nodespawn/layers/sha256")) {
			t.Fatalf("the reference run's machine root is not an overlay of the layer store (mounted %v, %q, %v)", mounted, opts, err)
		}
	}

	kills, trees, identical := 0, 0, 0
	begin := time.Now()
	for kills < minKills || time.Since(begin) < killBudget/4 {
		if kills >= minKills && time.Since(begin) > killBudget {
			break
		}
		if time.Since(begin) > 3*killBudget {
			t.Fatalf("only %d kills in %s", kills, 3*killBudget)
		}
		trees++
		root := filepath.Join(work, fmt.Sprintf("run%d", trees))
		var delays []time.Duration
		for n := 1 + rng.IntN(3); n > 0; n-- {
			// Over the whole run, start-up included, and a little past it
			// (a kill after the end is a run that finished).
			d := time.Duration(rng.Int64N(int64(whole) * 11 / 10))
			delays = append(delays, d)
			if killAt(t, apply(root), d) {
				kills++
			}
		}
		if out, err := apply(root).CombinedOutput(); err != nil {
			t.Fatalf("seed %d, tree %d: apply after kills at %v: %v\n%s", seed, trees, delays, err, out)
		}
		got := treeOf(t, root)
		if got != want {
			t.Errorf("seed %d, tree %d: after kills at %v and a rerun the tree differs from an uninterrupted run:\n%s", seed, trees, delays, lineDiff(want, got))
			continue
		}
		identical++
		unmountUnder(t, root)
		os.RemoveAll(root)
	}
	t.Logf("%d kills over %d trees (a whole run takes %s); %d of %d rerun trees identical to the uninterrupted one", kills, trees, whole.Round(time.Millisecond), identical, trees)
	if kills < minKills {
		t.Errorf("only %d kills landed before the runs ended; want %d", kills, minKills)
	}
}

// killAt starts cmd, SIGKILLs it after d, and reports whether the kill
// landed (the process was still running).
func killAt(t *testing.T, cmd *exec.Cmd, d time.Duration) bool {
	t.Helper()
	cmd.Stdout, cmd.Stderr = nil, nil
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("apply ended on its own with %v", err)
		}
		return false
	case <-time.After(d):
	}
	cmd.Process.Signal(syscall.SIGKILL)
	err := <-done
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		if ws, ok := ee.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
			return true
		}
	}
	if err != nil {
		t.Fatalf("apply failed before the kill: %v", err)
	}
	return false
}

// treeOf describes every entry under root, one line each: path, type,
// mode, owner, and the contents' digest or the link's target. The
// bookkeeping whose bytes legitimately differ between two runs is
// described by what it must agree on: the result record by its status and
// steps, the machines state without its times, the image marker without the rootfs directory's inode, the lock
// by its existence.
func treeOf(t *testing.T, root string) string {
	t.Helper()
	var lines []string
	err := filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(root, p)
		fi, err := os.Lstat(p)
		if err != nil {
			return err
		}
		st := fi.Sys().(*syscall.Stat_t)
		line := fmt.Sprintf("%s %s %04o %d:%d", rel, fi.Mode().Type(), st.Mode&0o7777, st.Uid, st.Gid)
		switch {
		case fi.Mode().IsRegular():
			b, err := os.ReadFile(p)
			if err != nil {
				return err
			}
			switch {
			case rel == "var/lib/nodespawn/result.json":
				line += " " + recordSummary(b)
			case rel == "var/lib/nodespawn/machines.json":
				line += " " + machinesSummary(b)
			case strings.HasSuffix(rel, ".nodespawn-image"):
				line += " " + markerSummary(b)
			case rel == "run/nodespawn.lock":
			default:
				sum := sha256.Sum256(b)
				line += " " + hex.EncodeToString(sum[:8])
			}
		case fi.Mode()&fs.ModeSymlink != 0:
			target, err := os.Readlink(p)
			if err != nil {
				return err
			}
			line += " -> " + target
		}
		lines = append(lines, line)
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	sort.Strings(lines)
	return strings.Join(lines, "\n") + "\n"
}

func recordSummary(b []byte) string {
	var r struct {
		Status string `json:"status"`
		Steps  []struct {
			ID      string `json:"id"`
			Outcome string `json:"outcome"`
		} `json:"steps"`
	}
	if err := json.Unmarshal(b, &r); err != nil {
		return "unreadable record: " + err.Error()
	}
	s := r.Status
	for _, st := range r.Steps {
		// A rerun finds done work unchanged: both are success.
		ok := st.Outcome == "done" || st.Outcome == "unchanged" || st.Outcome == "skipped"
		s += fmt.Sprintf(" %s=%v", st.ID, ok)
	}
	return s
}

// machinesSummary is the machines state without its times.
func machinesSummary(b []byte) string {
	var m map[string]any
	if err := json.Unmarshal(b, &m); err != nil {
		return "unreadable machines state: " + err.Error()
	}
	if applied, ok := m["applied"].(map[string]any); ok {
		for _, a := range applied {
			if a, ok := a.(map[string]any); ok {
				delete(a, "at")
			}
		}
	}
	out, _ := json.Marshal(m)
	return string(out)
}

func markerSummary(b []byte) string {
	var m map[string]any
	if err := json.Unmarshal(b, &m); err != nil {
		return "unreadable marker: " + err.Error()
	}
	delete(m, "dev")
	delete(m, "ino")
	out, _ := json.Marshal(m)
	return string(out)
}

// lineDiff lists the lines only in a (-) or only in b (+).
func lineDiff(a, b string) string {
	in := func(s string) map[string]bool {
		m := map[string]bool{}
		for _, l := range strings.Split(s, "\n") {
			m[l] = true
		}
		return m
	}
	ia, ib := in(a), in(b)
	var out []string
	for _, l := range strings.Split(a, "\n") {
		if !ib[l] {
			out = append(out, "- "+l)
		}
	}
	for _, l := range strings.Split(b, "\n") {
		if !ia[l] {
			out = append(out, "+ "+l)
		}
	}
	return strings.Join(out, "\n")
}

// unmountUnder unmounts every mount below dir, deepest first.
func unmountUnder(t testing.TB, dir string) {
	t.Helper()
	ms, err := mountinfo.GetMounts(mountinfo.PrefixFilter(dir))
	if err != nil {
		t.Fatal(err)
	}
	var points []string
	for _, m := range ms {
		if m.Mountpoint != dir { // below dir, not dir itself
			points = append(points, m.Mountpoint)
		}
	}
	sort.Sort(sort.Reverse(sort.StringSlice(points)))
	for _, p := range points {
		if err := syscall.Unmount(p, 0); err != nil {
			t.Errorf("unmount %s: %v", p, err)
		}
	}
}
