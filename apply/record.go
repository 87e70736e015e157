package apply

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"sync"
	"time"

	"github.com/nodespawn/nodespawn/internal/confine"
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

	// warn collects Warnings while the run goes on.
	warn *Warnings
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

func newRecord(p *plan.Plan, opts Options, planDigest string) *Record {
	r := &Record{
		Version:        RecordVersion,
		ToolVersion:    opts.ToolVersion,
		ManifestDigest: opts.ManifestDigest,
		SourceDigest:   opts.SourceDigest,
		PlanDigest:     planDigest,
		Machine:        p.Machine,
		Status:         StatusRunning,
		Started:        time.Now().UTC(),
		Steps:          make([]StepRecord, len(p.Steps)),
		Source:         opts.Source,
		warn:           opts.Warnings,
	}
	for i, s := range p.Steps {
		r.Steps[i] = StepRecord{ID: s.ID, Phase: s.Phase, Kind: s.Kind, Outcome: OutcomePending}
	}
	return r
}

// sameManifest reports whether the record is of the manifest opts names.
func (r *Record) sameManifest(opts Options) bool {
	if r.SourceDigest == "" {
		// An older record: it knows only the bytes' digest.
		return r.ManifestDigest == opts.SourceDigest || r.ManifestDigest == opts.ManifestDigest
	}
	return r.ManifestDigest == opts.ManifestDigest
}

// ReadRecord returns the record of the last run under root, or nil when
// there is none.
func ReadRecord(root string) (*Record, error) {
	b, err := readState(root, RecordFile)
	return decodeRecord(b, err, RecordFile)
}

func readRecord(host *confine.Root) (*Record, error) {
	b, err := host.ReadFile(RecordFile)
	return decodeRecord(b, err, host.Show(RecordFile))
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

// recordWriter owns the record during a run; steps finishing concurrently
// report through it, and each report rewrites the file atomically.
type recordWriter struct {
	root *confine.Root
	mu   sync.Mutex
	rec  *Record
	n    int // steps recorded so far
}

// step records one step's outcome and saves the record; it returns how
// many steps have been recorded.
func (w *recordWriter) step(id string, o Outcome, start time.Time, d time.Duration, stepErr error) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	for i := range w.rec.Steps {
		if w.rec.Steps[i].ID == id {
			s := &w.rec.Steps[i]
			s.Outcome, s.DurationMS, s.Error = o, d.Milliseconds(), ""
			s.StartMS = max(start.Sub(w.rec.Started).Milliseconds(), 0)
			if stepErr != nil {
				s.Error = stepErr.Error()
			}
		}
	}
	w.n++
	return w.n, w.saveLocked()
}

func (w *recordWriter) finish(ok bool) error {
	w.mu.Lock()
	defer w.mu.Unlock()
	now := time.Now().UTC()
	w.rec.Ended = &now
	w.rec.Status = StatusFailed
	if ok {
		w.rec.Status = StatusSucceeded
	}
	return w.saveLocked()
}

func (w *recordWriter) save() error {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.saveLocked()
}

func (w *recordWriter) saveLocked() error {
	if w.rec.warn != nil {
		w.rec.Warnings = w.rec.warn.Lines()
	}
	b, err := json.MarshalIndent(w.rec, "", "  ")
	if err != nil {
		return fmt.Errorf("encode result record: %w", err)
	}
	if err := w.root.WriteFile(RecordFile, append(b, '\n'), 0o644, -1, -1); err != nil {
		return fmt.Errorf("save result record: %w", err)
	}
	return nil
}

// upgrade changes the record's upgrade part and saves the record.
func (w *recordWriter) upgrade(f func(*RecordUpgrade)) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.rec.Upgrade == nil {
		return
	}
	f(w.rec.Upgrade)
	_ = w.saveLocked()
}

// since is t in milliseconds after the run started.
func (w *recordWriter) since(t time.Time) int64 {
	return max(t.Sub(w.rec.Started).Milliseconds(), 0)
}

func (w *recordWriter) snapshot() *Record {
	w.mu.Lock()
	defer w.mu.Unlock()
	c := *w.rec
	c.Steps = append([]StepRecord(nil), w.rec.Steps...)
	if w.rec.Upgrade != nil {
		u := *w.rec.Upgrade
		c.Upgrade = &u
	}
	return &c
}
