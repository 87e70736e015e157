package apply

import (
	"sync"
	"time"

	"github.com/nodespawn/nodespawn/plan"
	"github.com/nodespawn/nodespawn/state"
)

// newRecord is the record of a run of p, every step pending.
func NewRecord(p *plan.Plan, opts Options, planDigest string) *state.Record {
	r := &state.Record{
		Version:        state.RecordVersion,
		ToolVersion:    opts.ToolVersion,
		ManifestDigest: opts.ManifestDigest,
		SourceDigest:   opts.SourceDigest,
		PlanDigest:     planDigest,
		Machine:        p.Machine,
		Status:         state.StatusRunning,
		Started:        time.Now().UTC(),
		Steps:          make([]state.StepRecord, len(p.Steps)),
		Source:         opts.Source,
	}
	for i, s := range p.Steps {
		r.Steps[i] = state.StepRecord{ID: s.ID, Phase: s.Phase, Kind: s.Kind, Outcome: state.OutcomePending}
	}
	return r
}

// RecordWriter owns the record during a run; steps finishing concurrently
// report through it, and each report rewrites the file atomically.
type RecordWriter struct {
	store *state.Store
	mu    sync.Mutex
	rec   *state.Record
	warn  *Warnings // collects rec.Warnings while the run goes on
	n     int       // steps recorded so far
}

// step records one step's outcome and saves the record; it returns how
// many steps have been recorded.
func (w *RecordWriter) step(id string, o state.Outcome, start time.Time, d time.Duration, stepErr error) (int, error) {
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

func (w *RecordWriter) Finish(ok bool) error {
	w.mu.Lock()
	defer w.mu.Unlock()
	now := time.Now().UTC()
	w.rec.Ended = &now
	w.rec.Status = state.StatusFailed
	if ok {
		w.rec.Status = state.StatusSucceeded
	}
	return w.saveLocked()
}

func (w *RecordWriter) Save() error {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.saveLocked()
}

func (w *RecordWriter) saveLocked() error {
	if w.warn != nil {
		w.rec.Warnings = w.warn.Lines()
	}
	return w.store.WriteRecord(w.rec)
}

// upgrade changes the record's upgrade part and saves the record.
func (w *RecordWriter) Upgrade(f func(*state.RecordUpgrade)) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.rec.Upgrade == nil {
		return
	}
	f(w.rec.Upgrade)
	_ = w.saveLocked()
}

// since is t in milliseconds after the run started.
func (w *RecordWriter) Since(t time.Time) int64 {
	return max(t.Sub(w.rec.Started).Milliseconds(), 0)
}

func (w *RecordWriter) Snapshot() *state.Record {
	w.mu.Lock()
	defer w.mu.Unlock()
	c := *w.rec
	c.Steps = append([]state.StepRecord(nil), w.rec.Steps...)
	if w.rec.Upgrade != nil {
		u := *w.rec.Upgrade
		c.Upgrade = &u
	}
	return &c
}
