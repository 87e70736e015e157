package provision

import (
	"context"
	"log/slog"
	"sync"

	"github.com/nodespawn/nodespawn/plan"
)

// pendingFacts is the host probe running beside the manifest's loading
// (reading the source, compiling the schema and checking the manifest take
// most of a dry run's time, and the probe needs none of it). What the probe
// logs is held back and printed by wait, after the manifest loaded, in the
// order a probe after the load would have printed it; a manifest that does
// not load shows no host warnings at all.
type pendingFacts struct {
	done  chan struct{}
	facts plan.Facts
	err   error
	held  *heldLog
}

// startFacts begins Facts in the background, logging through a holder
// in front of slog.Default.
func startFacts(ctx context.Context, factsFile, root string) *pendingFacts {
	p := &pendingFacts{done: make(chan struct{}), held: &heldLog{}}
	log := slog.New(&holdHandler{held: p.held, next: slog.Default().Handler()})
	go func() {
		defer close(p.done)
		p.facts, p.err = facts(ctx, factsFile, root, log)
	}()
	return p
}

// wait returns the probe's result and prints what it logged.
func (p *pendingFacts) wait(ctx context.Context) (plan.Facts, error) {
	<-p.done
	p.held.release(ctx)
	return p.facts, p.err
}

// discard waits for the probe (it stops with ctx) and drops its log.
func (p *pendingFacts) discard() { <-p.done }

// heldLog is the records a holdHandler kept, each with the handler (its
// attributes and groups applied) that prints it.
type heldLog struct {
	mu   sync.Mutex
	recs []heldRecord
}

type heldRecord struct {
	next slog.Handler
	rec  slog.Record
}

func (h *heldLog) release(ctx context.Context) {
	h.mu.Lock()
	recs := h.recs
	h.recs = nil
	h.mu.Unlock()
	for _, r := range recs {
		_ = r.next.Handle(ctx, r.rec)
	}
}

// holdHandler keeps records for later instead of printing them.
type holdHandler struct {
	held *heldLog
	next slog.Handler
}

func (h *holdHandler) Enabled(ctx context.Context, l slog.Level) bool {
	return h.next.Enabled(ctx, l)
}

func (h *holdHandler) Handle(_ context.Context, r slog.Record) error {
	h.held.mu.Lock()
	h.held.recs = append(h.held.recs, heldRecord{next: h.next, rec: r.Clone()})
	h.held.mu.Unlock()
	return nil
}

func (h *holdHandler) WithAttrs(attrs []slog.Attr) slog.Handler {
	return &holdHandler{held: h.held, next: h.next.WithAttrs(attrs)}
}

func (h *holdHandler) WithGroup(name string) slog.Handler {
	return &holdHandler{held: h.held, next: h.next.WithGroup(name)}
}
