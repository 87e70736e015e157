package state

import (
	"errors"
	"fmt"
	"io/fs"
)

// legacy reports whether the state directory is in the layout from before
// the machine pair: a record (or a stored manifest or plan beside it) and
// no machines.json.
func (s *Store) legacy() bool {
	if _, err := s.host.Lstat(MachinesFile); err == nil {
		return false
	}
	for _, f := range []string{RecordFile, legacyManifest, legacyPlan} {
		if _, err := s.host.Lstat(f); err == nil {
			return true
		}
	}
	return false
}

// migrate moves a state directory in the layout from before the machine
// pair to the current one, once; the caller holds the lock. The record's
// machine gets the stored manifest and plan (machines/NAME/), and
// machines.json is written last, from the record: its presence is what
// says the migration is done, so a migration killed half-way is finished
// by the next one.
func (s *Store) migrate() error {
	if !s.legacy() {
		return nil
	}
	rec, err := s.Record()
	if err != nil {
		return fmt.Errorf("migrate state directory: %w", err)
	}
	m := legacyMachines(rec)
	if rec != nil && rec.Machine != "" {
		if err := s.host.MkdirAll(machineFile(rec.Machine, ""), 0o700, -1, -1); err != nil {
			return fmt.Errorf("migrate state directory: %w", err)
		}
		for _, f := range []struct{ from, to string }{
			{legacyManifest, machineFile(rec.Machine, "manifest")},
			{legacyPlan, machineFile(rec.Machine, "plan.json")},
		} {
			if err := s.moveLegacy(f.from, f.to); err != nil {
				return fmt.Errorf("migrate state directory: %w", err)
			}
		}
	}
	for _, f := range []string{legacyManifest, legacyPlan} {
		if err := s.host.Remove(f); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return fmt.Errorf("migrate state directory: %w", err)
		}
	}
	if err := s.WriteMachines(m); err != nil {
		return fmt.Errorf("migrate state directory: %w", err)
	}
	return nil
}

// moveLegacy moves from to to, unless to is already there (a migration
// killed after the move, or a later run that stored it anew).
func (s *Store) moveLegacy(from, to string) error {
	b, err := s.host.ReadFile(from)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	if _, err := s.host.Lstat(to); err == nil {
		return nil
	}
	return s.host.WriteFile(to, b, 0o600, -1, -1)
}

// legacyMachines is the machines' state a record from before the machine
// pair implies: its machine, active when the run succeeded.
func legacyMachines(rec *Record) *Machines {
	m := &Machines{Version: MachinesVersion, Applied: map[string]Applied{}}
	if rec == nil || rec.Machine == "" {
		return m
	}
	a := Applied{ManifestDigest: rec.ManifestDigest, SourceDigest: rec.SourceDigest, PlanDigest: rec.PlanDigest,
		Succeeded: rec.Status == StatusSucceeded, At: rec.Started}
	if rec.Ended != nil {
		a.At = *rec.Ended
	}
	m.Applied[rec.Machine] = a
	if a.Succeeded {
		m.Active = rec.Machine
	}
	return m
}

// legacyView is what a reader sees of a state directory not migrated yet
// (no run has held the lock since the tool was updated; a reader does not
// write, so a dry run stays one): the machines the record implies, and
// its machine's manifest or plan where the old layout kept them. It is
// the only place that reads the old layout besides migrate.
func (s *Store) legacyView(machine, name string) (string, bool) {
	if !s.legacy() {
		return "", false
	}
	rec, err := s.Record()
	if err != nil || rec == nil || rec.Machine != machine {
		return "", false
	}
	switch name {
	case "manifest":
		return legacyManifest, true
	case "plan.json":
		return legacyPlan, true
	}
	return "", false
}
