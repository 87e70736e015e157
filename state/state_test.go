package state

import (
	"context"
	"encoding/json"
	"errors"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/nodespawn/nodespawn/plan"
)

var quiet = slog.New(slog.DiscardHandler)

// legacyRoot writes a state directory as a version from before the
// machine pair left it: a succeeded record of kube1 and its manifest and
// plan beside it, no machines.json.
func legacyRoot(t *testing.T) string {
	t.Helper()
	root := t.TempDir()
	dir := filepath.Join(root, Dir)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	end := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	rec := Record{Version: RecordVersion, ManifestDigest: "sha256:m", PlanDigest: "sha256:p", Machine: "kube1",
		Status: StatusSucceeded, Started: end.Add(-time.Minute), Ended: &end, Steps: []StepRecord{}}
	b, _ := json.Marshal(rec)
	p, _ := json.Marshal(plan.Plan{Version: plan.Version, Machine: "kube1"})
	for name, data := range map[string][]byte{"result.json": b, "manifest": []byte("kind: Node\n"), "plan.json": p} {
		if err := os.WriteFile(filepath.Join(dir, name), data, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	return root
}

func TestLegacyLayoutReadThenMigrated(t *testing.T) {
	root := legacyRoot(t)
	s, err := Open(root)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	// A reader sees the layout as migrated and writes nothing.
	check := func(when string) {
		t.Helper()
		m, err := s.Machines()
		if err != nil || m.Active != "kube1" || !m.Applied["kube1"].Succeeded || m.Applied["kube1"].ManifestDigest != "sha256:m" {
			t.Fatalf("%s: machines %+v, %v", when, m, err)
		}
		if b, err := s.ManifestOf("kube1"); err != nil || string(b) != "kind: Node\n" {
			t.Fatalf("%s: manifest %q, %v", when, b, err)
		}
		if p, err := s.PlanOf("kube1"); err != nil || p == nil || p.Machine != "kube1" {
			t.Fatalf("%s: plan %+v, %v", when, p, err)
		}
		if m, err := s.Current(); err != nil || m != "kube1" {
			t.Fatalf("%s: current %q, %v", when, m, err)
		}
	}
	check("before the lock")
	if _, err := os.Stat(filepath.Join(root, MachinesFile)); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("a reader wrote machines.json: %v", err)
	}
	l, err := s.Lock(context.Background(), time.Second, quiet)
	if err != nil {
		t.Fatal(err)
	}
	l.Release()
	check("after the migration")
	for _, f := range []string{legacyManifest, legacyPlan} {
		if _, err := os.Stat(filepath.Join(root, f)); !errors.Is(err, fs.ErrNotExist) {
			t.Errorf("%s still there after the migration: %v", f, err)
		}
	}
	for _, f := range []string{MachinesFile, ManifestFile("kube1"), machineFile("kube1", "plan.json")} {
		if _, err := os.Stat(filepath.Join(root, f)); err != nil {
			t.Errorf("%s missing after the migration: %v", f, err)
		}
	}
	if s.legacy() {
		t.Error("still legacy after the migration")
	}
}

// A migration killed after moving the files but before machines.json is
// finished by the next lock, and the files moved are not lost.
func TestMigrationKilledHalfWayFinishes(t *testing.T) {
	root := legacyRoot(t)
	s, err := Open(root)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	// What migrate does before machines.json: the files moved.
	must(s.host.MkdirAll(machineFile("kube1", ""), 0o700, -1, -1))
	must(s.moveLegacy(legacyManifest, ManifestFile("kube1")))
	must(s.moveLegacy(legacyPlan, machineFile("kube1", "plan.json")))
	must(s.host.Remove(legacyManifest))
	must(s.host.Remove(legacyPlan))
	if !s.legacy() {
		t.Fatal("a half-done migration must still read as legacy (no machines.json)")
	}
	l, err := s.Lock(context.Background(), time.Second, quiet)
	must(err)
	l.Release()
	m, err := s.Machines()
	if err != nil || m.Active != "kube1" {
		t.Fatalf("machines %+v, %v", m, err)
	}
	if b, err := s.ManifestOf("kube1"); err != nil || string(b) != "kind: Node\n" {
		t.Fatalf("manifest %q, %v", b, err)
	}
}

func TestEmptyAndMissingRoot(t *testing.T) {
	root := t.TempDir()
	s, err := Open(root)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if m, err := s.Machines(); err != nil || m.Active != "" || len(m.Applied) != 0 {
		t.Fatalf("machines of an empty root: %+v, %v", m, err)
	}
	if rec, err := s.Record(); err != nil || rec != nil {
		t.Fatalf("record of an empty root: %+v, %v", rec, err)
	}
	if _, err := Open(filepath.Join(root, "nope")); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("open of a missing root: %v, want fs.ErrNotExist", err)
	}
	if m, err := ReadMachines(filepath.Join(root, "nope")); err != nil || m.Active != "" {
		t.Fatalf("ReadMachines of a missing root: %+v, %v", m, err)
	}
}

func TestLockExcludesAndTimesOut(t *testing.T) {
	root := t.TempDir()
	a, err := Open(root)
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	b, err := Open(root)
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	l, err := a.Lock(context.Background(), time.Second, quiet)
	if err != nil {
		t.Fatal(err)
	}
	if !b.LockHeld() {
		t.Error("LockHeld is false while a lock is held")
	}
	_, err = b.Lock(context.Background(), 200*time.Millisecond, quiet)
	var le *LockedError
	if !errors.As(err, &le) || le.Holder == "" {
		t.Fatalf("second lock: %v, want a LockedError naming the holder", err)
	}
	l.Release()
	if b.LockHeld() {
		t.Error("LockHeld is true after Release")
	}
	l2, err := b.Lock(context.Background(), time.Second, quiet)
	if err != nil {
		t.Fatalf("lock after release: %v", err)
	}
	l2.Release()
}

func TestAgentStateRoundTrip(t *testing.T) {
	s, err := Create(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	a, err := s.Agent()
	if err != nil || a.SwitchID != "" {
		t.Fatalf("fresh root: %+v %v; want an empty agent state", a, err)
	}
	now := time.Now().UTC().Truncate(time.Second)
	want := &Agent{SwitchID: "r/3", SwitchDigest: "sha256:x", Phase: "Switching", SwitchStarted: &now}
	if err := s.WriteAgent(want); err != nil {
		t.Fatal(err)
	}
	got, err := s.Agent()
	if err != nil || got.SwitchID != "r/3" || got.Phase != "Switching" || !got.SwitchStarted.Equal(now) {
		t.Fatalf("read back %+v %v", got, err)
	}
}
