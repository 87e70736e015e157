package state

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"time"

	"github.com/nodespawn/nodespawn/plan"
)

// RecordVersion identifies the JSON shape of a Record.
const RecordVersion = "nodespawn.dev/result/v1"

// RunStatus is the state of a whole run.
type RunStatus string

// Run statuses. A record left "running" belongs to a run that died.
const (
	StatusRunning   RunStatus = "running"
	StatusSucceeded RunStatus = "succeeded"
	StatusFailed    RunStatus = "failed"
)

// Outcome is what happened to one step.
type Outcome string

// Step outcomes.
const (
	// OutcomePending: not reached yet (a record left by a run that died).
	OutcomePending Outcome = "pending"
	// OutcomeDone: the step changed something.
	OutcomeDone Outcome = "done"
	// OutcomeUnchanged: the target already held the wanted state.
	OutcomeUnchanged Outcome = "unchanged"
	// OutcomeFailed: the step failed; Error says why.
	OutcomeFailed Outcome = "failed"
	// OutcomeSkipped: the step did not run; Error says why (an earlier
	// failure, or a host-changing step with --root not "/").
	OutcomeSkipped Outcome = "skipped"
)

// Record is the result record of one run. It holds no secrets: step errors
// name paths, URLs and commands, never file contents.
type Record struct {
	Version     string `json:"version"`
	ToolVersion string `json:"toolVersion,omitempty"`
	// ManifestDigest is the canonical digest of the manifest (parsed, with
	// defaults); SourceDigest the digest of its bytes as given. Records
	// written before SourceDigest existed hold the bytes' digest here.
	ManifestDigest string       `json:"manifestDigest"`
	SourceDigest   string       `json:"sourceDigest,omitempty"`
	PlanDigest     string       `json:"planDigest"`
	Machine        string       `json:"machine"`
	Status         RunStatus    `json:"status"`
	Started        time.Time    `json:"started"`
	Ended          *time.Time   `json:"ended,omitempty"`
	Steps          []StepRecord `json:"steps"`
	// Upgrade is set when the run upgraded (or rolled back) by switching
	// machines.
	Upgrade *RecordUpgrade `json:"upgrade,omitempty"`
	// Source says where the manifest came from (Options.Source).
	Source string `json:"source,omitempty"`
	// Warnings are what the run warned about (Options.Warnings), as
	// cloud-init keeps recoverable_errors.
	Warnings []string `json:"warnings,omitempty"`
}

// StepRecord is one step's outcome.
type StepRecord struct {
	ID      string     `json:"id"`
	Phase   plan.Phase `json:"phase"`
	Kind    plan.Kind  `json:"kind"`
	Outcome Outcome    `json:"outcome"`
	// StartMS is when the step started, in milliseconds after the run's
	// Started; with DurationMS it places the step on the run's timeline.
	StartMS    int64  `json:"startMs"`
	DurationMS int64  `json:"durationMs"`
	Error      string `json:"error,omitempty"`
}

// Is reports whether the record is of the manifest with these digests
// (the canonical one and the bytes' one).
func (r *Record) Is(manifestDigest, sourceDigest string) bool {
	return same(r.ManifestDigest, r.SourceDigest, manifestDigest, sourceDigest)
}

// Is reports whether the machine was made from the manifest with these
// digests.
func (a Applied) Is(manifestDigest, sourceDigest string) bool {
	return same(a.ManifestDigest, a.SourceDigest, manifestDigest, sourceDigest)
}

func same(have, haveSource, manifestDigest, sourceDigest string) bool {
	if haveSource == "" {
		// An older record: it knows only the bytes' digest.
		return have == sourceDigest || have == manifestDigest
	}
	return have == manifestDigest
}

// Record is the result record of the last run, or nil when there is none.
func (s *Store) Record() (*Record, error) {
	b, err := s.host.ReadFile(RecordFile)
	return decodeRecord(b, err, s.host.Show(RecordFile))
}

// WriteRecord saves rec (atomically, durably).
func (s *Store) WriteRecord(rec *Record) error {
	b, err := json.MarshalIndent(rec, "", "  ")
	if err != nil {
		return fmt.Errorf("encode result record: %w", err)
	}
	if err := s.host.WriteFile(RecordFile, append(b, '\n'), 0o644, -1, -1); err != nil {
		return fmt.Errorf("save result record: %w", err)
	}
	return nil
}

// decodeRecord is a record read from path: nil when there is none.
func decodeRecord(b []byte, err error, path string) (*Record, error) {
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read result record: %w", err)
	}
	var r Record
	if err := json.Unmarshal(b, &r); err != nil {
		return nil, fmt.Errorf("read result record %s: %w (remove it to start over)", path, err)
	}
	if r.Version != RecordVersion {
		return nil, fmt.Errorf("read result record %s: unknown version %q (want %q)", path, r.Version, RecordVersion)
	}
	return &r, nil
}

// RecordUpgrade is the part of a run's record about an upgrade.
type RecordUpgrade struct {
	From string `json:"from"`
	To   string `json:"to"`
	// Outcome is one of the UpgradeOutcome outcomes once the switch ended.
	Outcome string `json:"outcome,omitempty"`
	Reason  string `json:"reason,omitempty"`
	// Milliseconds after the record's Started: old machine stopped, new
	// node Ready, rollback done.
	SwitchedMS   int64 `json:"switchedMs,omitempty"`
	ReadyMS      int64 `json:"readyMs,omitempty"`
	RolledBackMS int64 `json:"rolledBackMs,omitempty"`
}
