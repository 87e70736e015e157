package apply

import (
	"bytes"
	"context"
	"fmt"
	"log/slog"
	"strings"
	"sync"
)

// maxWarnings bounds the warnings a record keeps; later ones are counted.
const maxWarnings = 50

// Warnings collects what a run warned about, for its record, the way
// cloud-init keeps recoverable_errors: it is a slog.Handler that passes
// every log record on to the handler it wraps and keeps each warning
// (level WARN, below ERROR) as one line, "message key=value ...", without
// the time. A failure is not kept: the record holds the failed step's
// error. Log records about a step (a "step" attribute) are not kept
// either: the record holds every step's outcome and, for a skipped one,
// why. Repeats of a line are counted, not kept again.
//
// Install it as the logger of everything the run does (the CLI makes it
// slog's default for the command) and pass it in Options.Warnings.
type Warnings struct {
	next slog.Handler
	text slog.Handler
	log  *warnLog
}

type warnLog struct {
	mu      sync.Mutex
	buf     bytes.Buffer
	lines   []string
	count   map[string]int
	dropped int
}

// NewWarnings returns a collector that passes log records on to next.
func NewWarnings(next slog.Handler) *Warnings {
	l := &warnLog{count: map[string]int{}}
	text := slog.NewTextHandler(&l.buf, &slog.HandlerOptions{ReplaceAttr: func(groups []string, a slog.Attr) slog.Attr {
		if len(groups) == 0 && (a.Key == slog.TimeKey || a.Key == slog.LevelKey || a.Key == slog.MessageKey) {
			return slog.Attr{}
		}
		return a
	}})
	return &Warnings{next: next, text: text, log: l}
}

// Enabled implements slog.Handler: warnings are always wanted.
func (w *Warnings) Enabled(ctx context.Context, l slog.Level) bool {
	return isWarning(l) || w.next.Enabled(ctx, l)
}

func isWarning(l slog.Level) bool { return l >= slog.LevelWarn && l < slog.LevelError }

// Handle implements slog.Handler.
func (w *Warnings) Handle(ctx context.Context, r slog.Record) error {
	if isWarning(r.Level) && !aboutStep(r) {
		w.keep(ctx, r)
	}
	if !w.next.Enabled(ctx, r.Level) {
		return nil
	}
	return w.next.Handle(ctx, r)
}

func aboutStep(r slog.Record) bool {
	step := false
	r.Attrs(func(a slog.Attr) bool {
		step = a.Key == "step"
		return !step
	})
	return step
}

func (w *Warnings) keep(ctx context.Context, r slog.Record) {
	l := w.log
	l.mu.Lock()
	defer l.mu.Unlock()
	l.buf.Reset()
	if err := w.text.Handle(ctx, r); err != nil {
		return
	}
	line := strings.TrimSpace(r.Message + " " + strings.TrimSpace(l.buf.String()))
	switch {
	case l.count[line] > 0:
		l.count[line]++
	case len(l.lines) >= maxWarnings:
		l.dropped++
	default:
		l.count[line] = 1
		l.lines = append(l.lines, line)
	}
}

// WithAttrs implements slog.Handler.
func (w *Warnings) WithAttrs(as []slog.Attr) slog.Handler {
	return &Warnings{next: w.next.WithAttrs(as), text: w.text.WithAttrs(as), log: w.log}
}

// WithGroup implements slog.Handler.
func (w *Warnings) WithGroup(name string) slog.Handler {
	return &Warnings{next: w.next.WithGroup(name), text: w.text.WithGroup(name), log: w.log}
}

// Lines are the warnings kept so far, in the order they came, a repeated
// one with its count, and a last line for those past the bound.
func (w *Warnings) Lines() []string {
	if w == nil {
		return nil
	}
	l := w.log
	l.mu.Lock()
	defer l.mu.Unlock()
	var out []string
	for _, line := range l.lines {
		if n := l.count[line]; n > 1 {
			line += fmt.Sprintf(" (%d times)", n)
		}
		out = append(out, line)
	}
	if l.dropped > 0 {
		out = append(out, fmt.Sprintf("... and %d more warnings (see the log)", l.dropped))
	}
	return out
}
