package apply_test

import (
	"log/slog"
	"testing"
	"time"

	. "github.com/nodespawn/nodespawn/apply"
	"github.com/nodespawn/nodespawn/internal/applytest"
	"github.com/nodespawn/nodespawn/state"
)

// TestRecordPlacesSteps: the steps a real run records lie on its
// timeline in the order the plan's edges force.
func TestRecordPlacesSteps(t *testing.T) {
	root := t.TempDir()
	applytest.Apply(t, root, nil)
	rec, err := state.ReadRecord(root)
	applytest.Must(t, err)
	at := map[string]state.StepRecord{}
	for _, s := range rec.Steps {
		at[s.ID] = s
	}
	for _, s := range applytest.Plan().Steps {
		for _, a := range s.After {
			if before, after := at[a], at[s.ID]; after.StartMS < before.StartMS+before.DurationMS-1 {
				t.Errorf("%s (start %dms) runs after %s, which ended at %dms", s.ID, after.StartMS, a, before.StartMS+before.DurationMS)
			}
		}
	}
	if end := rec.Ended.Sub(rec.Started); end < 0 || end > time.Minute {
		t.Errorf("run took %s", end)
	}
}

// TestWarningsBound: past MaxWarnings, warnings are counted, not kept.
func TestWarningsBound(t *testing.T) {
	w := NewWarnings(slog.DiscardHandler)
	log := slog.New(w).With("attempt", 1)
	for i := range MaxWarnings + 3 {
		log.Warn("retrying", "n", i)
	}
	log.Error("failed")
	lines := w.Lines()
	if len(lines) != MaxWarnings+1 || lines[0] != "retrying attempt=1 n=0" || lines[MaxWarnings] != "... and 3 more warnings (see the log)" {
		t.Errorf("%d lines: first %q, last %q", len(lines), lines[0], lines[len(lines)-1])
	}
}
