package state

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"time"

	"github.com/nodespawn/nodespawn/internal/confine"
	"github.com/nodespawn/nodespawn/internal/layout"
	"github.com/nodespawn/nodespawn/plan"
)

// The machines of a node. A node runs in one machine of a pair (kube1,
// kube2); an upgrade prepares the other beside it and switches. Which one
// runs, which one is kept for a rollback, and how far an upgrade got is
// written in MachinesFile, atomically, before each change it describes:
// a run killed at any instant finds there what to finish or undo.
const (
	// MachinesVersion identifies its JSON shape.
	MachinesVersion = "nodespawn.dev/machines/v1"
)

// UpgradePhase is how far an upgrade got.
type UpgradePhase string

// Upgrade phases, in order. A run that finds one of them in MachinesFile
// finishes it: preparing goes on only when it is given the same manifest
// again (another manifest restarts the preparation, the running one's
// abandons it); the others are finished whatever manifest is given.
const (
	// UpgradePreparing: the new machine is being made; the old one runs.
	UpgradePreparing UpgradePhase = "preparing"
	// UpgradeSwitching: the old machine is being stopped; once it is, the
	// new one is made active.
	UpgradeSwitching UpgradePhase = "switching"
	// UpgradeVerifying: the new machine is active; it must start and its
	// Node turn Ready.
	UpgradeVerifying UpgradePhase = "verifying"
	// UpgradeRollingBack: the new machine failed; the old one is being
	// made active and started again.
	UpgradeRollingBack UpgradePhase = "rolling-back"
)

// Machines is the content of MachinesFile.
type Machines struct {
	Version string `json:"version"`
	// Active is the machine that runs the node ("" until a run has
	// started one). layout.ActiveMachineFile says the same to systemd.
	Active string `json:"active,omitempty"`
	// Previous is the machine the last upgrade switched away from, kept
	// for one rollback (nodespawn rollback); "" when there is none.
	Previous string `json:"previous,omitempty"`
	// Applied says what each machine was made from.
	Applied map[string]Applied `json:"applied,omitempty"`
	// Upgrade is the upgrade in progress, if any.
	Upgrade *Upgrade `json:"upgrade,omitempty"`
	// Last is how the last upgrade or rollback ended.
	Last *UpgradeOutcome `json:"last,omitempty"`
}

// Applied is what a machine was made from.
type Applied struct {
	ManifestDigest string `json:"manifestDigest"`
	SourceDigest   string `json:"sourceDigest,omitempty"`
	PlanDigest     string `json:"planDigest"`
	// Succeeded is true once a run of this plan finished (for the machine
	// that was switched to: once its Node was Ready).
	Succeeded bool      `json:"succeeded"`
	At        time.Time `json:"at"`
	// Started is set before a run first starts the machine (with
	// systemd): from then on there may be a node to protect, and a run of
	// another manifest is refused instead of applied in its place.
	Started bool `json:"started,omitempty"`
}

// Upgrade is an upgrade in progress: from the running machine to the one
// being prepared.
type Upgrade struct {
	From  string       `json:"from"`
	To    string       `json:"to"`
	Phase UpgradePhase `json:"phase"`
	// ManifestDigest is the manifest To is made from.
	ManifestDigest string    `json:"manifestDigest"`
	Started        time.Time `json:"started"`
	// Prepared is when the preparation of To finished, for an upgrade
	// prepared ahead of its switch (upgrade.Prepare; the phase stays
	// UpgradePreparing): To is made, and upgrade.SwitchPrepared switches
	// to it.
	Prepared *time.Time `json:"prepared,omitempty"`
	// Switched is when the old machine was stopped (UpgradeVerifying on).
	Switched *time.Time `json:"switched,omitempty"`
	// Reason is why it is rolling back.
	Reason string `json:"reason,omitempty"`
}

// UpgradeOutcome is how an upgrade or a rollback ended.
type UpgradeOutcome struct {
	From    string    `json:"from"`
	To      string    `json:"to"`
	Outcome string    `json:"outcome"` // "switched", "rolled back", "rollback failed", "rolled back by hand"
	Reason  string    `json:"reason,omitempty"`
	Started time.Time `json:"started"`
	Ended   time.Time `json:"ended"`
	// Durations, in milliseconds: the preparation, the switch (old stopped
	// to new Ready), and the rollback.
	PrepareMS  int64 `json:"prepareMs,omitempty"`
	SwitchMS   int64 `json:"switchMs,omitempty"`
	RollbackMS int64 `json:"rollbackMs,omitempty"`
}

// Upgrade outcomes.
const (
	OutcomeSwitched       = "switched"
	OutcomeRolledBack     = "rolled back"
	OutcomeRollbackFailed = "rollback failed"
	OutcomeManualRollback = "rolled back by hand"
	// OutcomePrepared is a record's upgrade outcome when the run only
	// prepared the other machine (upgrade.Prepare).
	OutcomePrepared = "prepared"
)

// Machines returns the state of the pair; a root where nothing was
// applied has an empty one.
func (s *Store) Machines() (*Machines, error) {
	host := s.host
	b, err := host.ReadFile(MachinesFile)
	if errors.Is(err, fs.ErrNotExist) {
		if s.legacy() {
			rec, err := s.Record()
			return legacyMachines(rec), err
		}
		return &Machines{Version: MachinesVersion, Applied: map[string]Applied{}}, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", host.Show(MachinesFile), err)
	}
	var m Machines
	if err := json.Unmarshal(b, &m); err != nil {
		return nil, fmt.Errorf("read %s: %w", host.Show(MachinesFile), err)
	}
	if m.Version != MachinesVersion {
		return nil, fmt.Errorf("read %s: version %q, this build reads %q", host.Show(MachinesFile), m.Version, MachinesVersion)
	}
	if m.Applied == nil {
		m.Applied = map[string]Applied{}
	}
	return &m, nil
}

// WriteMachines saves the state (atomically, durably).
func (s *Store) WriteMachines(m *Machines) error {
	host := s.host
	m.Version = MachinesVersion
	b, err := json.MarshalIndent(m, "", "  ")
	if err != nil {
		return fmt.Errorf("encode machines state: %w", err)
	}
	if err := host.MkdirAll(Dir, 0o700, -1, -1); err != nil {
		return fmt.Errorf("create state directory: %w", err)
	}
	if err := host.WriteFile(MachinesFile, append(b, '\n'), 0o644, -1, -1); err != nil {
		return fmt.Errorf("save machines state: %w", err)
	}
	return nil
}

// SetActive makes machine the one systemd may start (layout.ActiveMachineFile)
// and the one the state names. The file is written first: it is what
// decides at boot.
func (s *Store) SetActive(st *Machines, machine string) error {
	if err := s.WriteActiveFile(machine); err != nil {
		return err
	}
	st.Active = machine
	return s.WriteMachines(st)
}

func (s *Store) WriteActiveFile(machine string) error {
	host := s.host
	want := []byte(machine + "\n")
	if b, err := host.ReadFile(layout.ActiveMachineFile); err == nil && string(b) == string(want) {
		return nil
	}
	if err := host.MkdirAll(Dir, 0o700, -1, -1); err != nil {
		return fmt.Errorf("create state directory: %w", err)
	}
	if err := host.WriteFile(layout.ActiveMachineFile, want, 0o644, -1, -1); err != nil {
		return fmt.Errorf("make %s the active machine: %w", machine, err)
	}
	return nil
}

// StoreMachine keeps the manifest and plan a machine is made from.
func (s *Store) StoreMachine(p *plan.Plan, manifest []byte) error {
	host := s.host
	if err := host.MkdirAll(MachinesDir, 0o700, -1, -1); err != nil {
		return fmt.Errorf("create state directory: %w", err)
	}
	dir := layout.MachineStateDir(p.Machine)
	if err := host.MkdirAll(dir, 0o700, -1, -1); err != nil {
		return fmt.Errorf("create state directory: %w", err)
	}
	// What a run killed while storing these left.
	if err := host.RemoveStaleTemps(dir); err != nil {
		return fmt.Errorf("remove leftovers of an interrupted run: %w", err)
	}
	if manifest != nil {
		if err := writeIfChanged(host, machineFile(p.Machine, "manifest"), manifest, 0o600); err != nil {
			return fmt.Errorf("store manifest: %w", err)
		}
	}
	b, err := json.MarshalIndent(p.RedactKeepingDigests(), "", "  ")
	if err != nil {
		return fmt.Errorf("encode plan: %w", err)
	}
	if err := writeIfChanged(host, machineFile(p.Machine, "plan.json"), append(b, '\n'), 0o600); err != nil {
		return fmt.Errorf("store plan: %w", err)
	}
	return nil
}

func writeIfChanged(host *confine.Root, p string, b []byte, mode fs.FileMode) error {
	if cur, err := host.ReadFile(p); err == nil && string(cur) == string(b) {
		return nil
	}
	return host.WriteFile(p, b, mode, -1, -1)
}

// PlanOf is the plan a machine was made from (secrets redacted), or nil.
func (s *Store) PlanOf(machine string) (*plan.Plan, error) {
	host := s.host
	name := machineFile(machine, "plan.json")
	b, err := host.ReadFile(name)
	if old, ok := s.legacyView(machine, "plan.json"); ok && errors.Is(err, fs.ErrNotExist) {
		name = old
		b, err = host.ReadFile(name)
	}
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read stored plan: %w", err)
	}
	var p plan.Plan
	if err := json.Unmarshal(b, &p); err != nil {
		return nil, fmt.Errorf("read stored plan %s: %w", host.Show(name), err)
	}
	if p.Version != plan.Version {
		return nil, fmt.Errorf("read stored plan %s: version %q, this build reads %q", host.Show(name), p.Version, plan.Version)
	}
	if p.Machine != machine {
		return nil, nil
	}
	return &p, nil
}

// ManifestOf is the manifest a machine was made from, or nil.
func (s *Store) ManifestOf(machine string) ([]byte, error) {
	b, err := s.host.ReadFile(machineFile(machine, "manifest"))
	if old, ok := s.legacyView(machine, "manifest"); ok && errors.Is(err, fs.ErrNotExist) {
		b, err = s.host.ReadFile(old)
	}
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	return b, err
}

// RollbackProblem says why there is nothing to roll back to (a
// *NoRollbackError), or nil.
func (st *Machines) RollbackProblem() error {
	if u := st.Upgrade; u != nil {
		return &NoRollbackError{Why: fmt.Sprintf("an upgrade from %s to %s is %s; run nodespawn apply to finish it first", u.From, u.To, u.Phase)}
	}
	if st.Previous == "" || st.Active == "" {
		why := "no previous machine is kept"
		if st.Last != nil {
			why += fmt.Sprintf(" (the last upgrade, %s to %s, %s)", st.Last.From, st.Last.To, st.Last.Outcome)
		}
		return &NoRollbackError{Why: why}
	}
	return nil
}

// NoRollbackError is a rollback that cannot be done.
type NoRollbackError struct{ Why string }

func (e *NoRollbackError) Error() string { return "rollback: " + e.Why }

// Refused marks e an apply.Refusal: nothing changed (exit code 2).
func (e *NoRollbackError) Refused() {}
