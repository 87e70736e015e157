package journal

import (
	"context"
	"errors"
	"log/slog"
	"testing"
	"time"

	"github.com/coreos/go-systemd/v22/journal"
	"github.com/google/go-cmp/cmp"
)

type sent struct {
	msg  string
	pri  journal.Priority
	vars map[string]string
}

// TestHandler logs what apply logs for a step through the handler, with
// the journal's send replaced by a recorder, and checks the MESSAGE text,
// the priority and the fields journalctl filters on.
func TestHandler(t *testing.T) {
	var got []sent
	h := NewHandler(slog.LevelInfo)
	h.send = func(msg string, pri journal.Priority, vars map[string]string) error {
		got = append(got, sent{msg, pri, vars})
		return nil
	}
	log := slog.New(h).With("run", 2)
	log.Info("step", "step", "rootfs:download:kubelet", "kind", "download", "outcome", "done", "duration", 1234*time.Millisecond)
	log.Error("step", "step", "rootfs:image", "error", errors.New("pull: 503 Service Unavailable"))
	log.WithGroup("pull").Warn("retry", "layer", 3)
	log.Debug("not sent")

	want := []sent{
		{`step run=2 step=rootfs:download:kubelet kind=download outcome=done duration=1.234s`, journal.PriInfo, map[string]string{
			"NODESPAWN_RUN": "2", "NODESPAWN_STEP": "rootfs:download:kubelet", "NODESPAWN_KIND": "download",
			"NODESPAWN_OUTCOME": "done", "NODESPAWN_DURATION": "1.234s", "NODESPAWN_DURATION_MS": "1234"}},
		{`step run=2 step=rootfs:image error="pull: 503 Service Unavailable"`, journal.PriErr, map[string]string{
			"NODESPAWN_RUN": "2", "NODESPAWN_STEP": "rootfs:image", "NODESPAWN_ERROR": "pull: 503 Service Unavailable"}},
		{`retry run=2 pull.layer=3`, journal.PriWarning, map[string]string{"NODESPAWN_RUN": "2", "NODESPAWN_PULL_LAYER": "3"}},
	}
	if d := cmp.Diff(want, got, cmp.AllowUnexported(sent{})); d != "" {
		t.Errorf("sent (-want +got):\n%s", d)
	}
	if h.Enabled(context.Background(), slog.LevelDebug) {
		t.Error("debug enabled at info level")
	}
}
