// Package state is everything nodespawn keeps under /var/lib/nodespawn on
// a host, behind one Open(root): the result record of the last run
// (result.json), the machines of the node (machines.json: which machine
// runs, what each was made from, an upgrade in flight), each machine's
// stored manifest and plan (machines/NAME/), the done stamp the first-boot
// unit checks, and the lock (/run/nodespawn.lock) that serialises the
// runs that change them.
//
// A state directory written before the machine pair (one manifest and plan
// beside the record, no machines.json) is migrated once, the first time a
// run holds the lock (Lock); readers after that know only the current
// layout.
//
// Every write replaces its file atomically (confine.Root.WriteFile), so a
// run killed at any instant leaves each file whole, old or new.
package state

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path"

	"github.com/nodespawn/nodespawn/internal/confine"
	"github.com/nodespawn/nodespawn/internal/layout"
	"github.com/nodespawn/nodespawn/plan"
)

// Paths, relative to the root: layout's, named here for the state they
// hold.
const (
	// Dir is the state directory.
	Dir = layout.StateDir
	// RecordFile is the result record of the last run.
	RecordFile = layout.RecordFile
	// MachinesFile is the machines' state (machines.go).
	MachinesFile = layout.MachinesFile
	// MachinesDir holds each machine's stored manifest and plan
	// (layout.MachineStateDir is one machine's).
	MachinesDir = layout.MachinesStateDir
	// DoneStamp exists once a run succeeded; the first-boot unit does not
	// start again while it is there.
	DoneStamp = layout.DoneStamp
	// LockFile serialises applies (and resets). It lives in /run so it
	// vanishes at reboot and never outlives the state dir it guards.
	LockFile = layout.LockFile

	// Where a state directory from before the machine pair kept the
	// manifest and plan of its one machine; migrate moves them.
	legacyManifest = layout.LegacyManifestFile
	legacyPlan     = layout.LegacyPlanFile
)

// Store is the state under one root.
type Store struct {
	host *confine.Root
}

// Open opens the state under root ("" means "/"). A root that does not
// exist is an error that wraps fs.ErrNotExist; a root without a state
// directory is a Store with nothing in it.
func Open(root string) (*Store, error) {
	if root == "" {
		root = "/"
	}
	host, err := confine.Open(root)
	if err != nil {
		return nil, err
	}
	return &Store{host: host}, nil
}

// Create is Open for a run that will write: it creates root first when it
// is missing (a fresh --root directory), the one path taken as given.
func Create(root string) (*Store, error) {
	if root == "" {
		root = "/"
	}
	if err := os.MkdirAll(root, 0o755); err != nil {
		return nil, err
	}
	return Open(root)
}

// Root is the root the state is under, for the steps that write beside it.
func (s *Store) Root() *confine.Root { return s.host }

// Show is p as the operator knows it: under the root.
func (s *Store) Show(p string) string { return s.host.Show(p) }

// Close closes the root.
func (s *Store) Close() error { return s.host.Close() }

// Sweep removes what a run killed while writing a state file left beside
// it (confine's temporary names only), in the state directory, the
// machines' directory and their parents.
func (s *Store) Sweep() error {
	for _, d := range []string{Dir, MachinesDir} {
		if err := s.host.RemoveStaleTempsUp(d, nil); err != nil {
			return fmt.Errorf("remove leftovers of an interrupted run: %w", err)
		}
	}
	return nil
}

// WriteStamp writes the done stamp unless it already says the same.
func (s *Store) WriteStamp(planDigest string) error {
	want := []byte(planDigest + "\n")
	if b, err := s.host.ReadFile(DoneStamp); err == nil && string(b) == string(want) {
		return nil
	}
	if err := s.host.WriteFile(DoneStamp, want, 0o644, -1, -1); err != nil {
		return fmt.Errorf("write done stamp: %w", err)
	}
	return nil
}

// RemoveStamp removes the done stamp, so a first boot interrupted from
// here on runs again.
func (s *Store) RemoveStamp() error {
	if err := s.host.Remove(DoneStamp); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("remove done stamp: %w", err)
	}
	return nil
}

// Stamped reports whether the done stamp is there.
func (s *Store) Stamped() bool {
	_, err := s.host.Lstat(DoneStamp)
	return err == nil
}

// Current is the machine that runs the node: the active one, else the
// last run's (a first run that has not finished); "" when nothing was
// applied.
func (s *Store) Current() (string, error) {
	st, err := s.Machines()
	if err != nil {
		return "", err
	}
	if st.Active != "" {
		return st.Active, nil
	}
	rec, err := s.Record()
	if err != nil || rec == nil {
		return "", err
	}
	return rec.Machine, nil
}

// machineFile is a file of machine's stored state.
func machineFile(machine, name string) string {
	return path.Join(layout.MachineStateDir(machine), name)
}

// ReadRecord is the result record under root, or nil; for one read.
func ReadRecord(root string) (*Record, error) {
	return read(root, (*Store).Record)
}

// ReadMachines is the machines' state under root (empty when root has
// none, or does not exist); for one read.
func ReadMachines(root string) (*Machines, error) {
	m, err := read(root, (*Store).Machines)
	if errors.Is(err, fs.ErrNotExist) {
		return &Machines{Version: MachinesVersion, Applied: map[string]Applied{}}, nil
	}
	return m, err
}

// PlanOf and ManifestOf are Store's, for one read.
func PlanOf(root, machine string) (*plan.Plan, error) {
	return read(root, func(s *Store) (*plan.Plan, error) { return s.PlanOf(machine) })
}

// ManifestOf is the manifest machine was made from under root, or nil.
func ManifestOf(root, machine string) ([]byte, error) {
	return read(root, func(s *Store) ([]byte, error) { return s.ManifestOf(machine) })
}

func read[T any](root string, f func(*Store) (T, error)) (T, error) {
	var zero T
	s, err := Open(root)
	if err != nil {
		return zero, err
	}
	defer s.Close()
	return f(s)
}

// ManifestFile is where machine's manifest is stored, relative to the
// root: the name errors about it give.
func ManifestFile(machine string) string { return machineFile(machine, "manifest") }
