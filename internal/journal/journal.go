// Package journal logs to the systemd journal with structured fields, so
// that a unit's lines can be filtered by what they are about (journalctl
// NODESPAWN_STEP=rootfs:image), while the message text stays the logfmt a
// terminal shows.
package journal

import (
	"bytes"
	"context"
	"log/slog"
	"strconv"
	"strings"
	"sync"
	"time"
	"unicode"

	"github.com/coreos/go-systemd/v22/journal"
)

// FieldPrefix starts the name of every field taken from a log attribute.
const FieldPrefix = "NODESPAWN_"

// UnderJournal reports whether stderr is connected to the journal (the
// process runs under systemd with StandardError=journal), where logging
// natively keeps the fields.
func UnderJournal() bool {
	ok, err := journal.StderrIsJournalStream()
	return err == nil && ok && journal.Enabled()
}

// Handler is a slog.Handler that sends each record to the journal: its
// priority from the level, MESSAGE the logfmt text of the message and its
// attributes, and one field per attribute (FieldPrefix + the key in upper
// case; a duration also as <KEY>_MS).
type Handler struct {
	level slog.Leveler
	attrs []slog.Attr
	group string
	send  func(msg string, pri journal.Priority, vars map[string]string) error
	mu    *sync.Mutex
}

// NewHandler returns a Handler for records at level or above.
func NewHandler(level slog.Leveler) *Handler {
	return &Handler{level: level, send: journal.Send, mu: &sync.Mutex{}}
}

// Enabled implements slog.Handler.
func (h *Handler) Enabled(_ context.Context, l slog.Level) bool { return l >= h.level.Level() }

// WithAttrs implements slog.Handler.
func (h *Handler) WithAttrs(as []slog.Attr) slog.Handler {
	c := *h
	for _, a := range as {
		c.attrs = append(c.attrs[:len(c.attrs):len(c.attrs)], qualify(h.group, a))
	}
	return &c
}

// WithGroup implements slog.Handler.
func (h *Handler) WithGroup(name string) slog.Handler {
	c := *h
	c.group = join(h.group, name)
	return &c
}

// Handle implements slog.Handler.
func (h *Handler) Handle(_ context.Context, r slog.Record) error {
	attrs := append([]slog.Attr(nil), h.attrs...)
	r.Attrs(func(a slog.Attr) bool {
		attrs = append(attrs, qualify(h.group, a))
		return true
	})
	msg, vars := Entry(r.Message, attrs)
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.send(msg, priority(r.Level), vars)
}

// Entry is what Handler sends for a message and its attributes: the
// MESSAGE text (message, then key=value pairs as slog's text handler
// writes them) and the fields.
func Entry(message string, attrs []slog.Attr) (string, map[string]string) {
	var b bytes.Buffer
	th := slog.NewTextHandler(&b, &slog.HandlerOptions{ReplaceAttr: func(groups []string, a slog.Attr) slog.Attr {
		if len(groups) == 0 && (a.Key == slog.TimeKey || a.Key == slog.LevelKey || a.Key == slog.MessageKey) {
			return slog.Attr{}
		}
		return a
	}})
	rec := slog.NewRecord(time.Time{}, slog.LevelInfo, "", 0)
	rec.AddAttrs(attrs...)
	_ = th.Handle(context.Background(), rec)
	text := strings.TrimSpace(b.String())
	if text != "" {
		message += " " + text
	}
	vars := map[string]string{}
	for _, a := range attrs {
		addField(vars, "", a)
	}
	return message, vars
}

func addField(vars map[string]string, prefix string, a slog.Attr) {
	a.Value = a.Value.Resolve()
	key := join(prefix, a.Key)
	if a.Value.Kind() == slog.KindGroup {
		for _, g := range a.Value.Group() {
			addField(vars, key, g)
		}
		return
	}
	name := FieldPrefix + fieldName(key)
	vars[name] = a.Value.String()
	if a.Value.Kind() == slog.KindDuration {
		vars[name+"_MS"] = strconv.FormatInt(a.Value.Duration().Milliseconds(), 10)
	}
}

// fieldName makes a journal field name of a key: upper case letters,
// digits and underscores, as journald requires.
func fieldName(key string) string {
	return strings.Map(func(r rune) rune {
		switch {
		case r >= 'a' && r <= 'z':
			return unicode.ToUpper(r)
		case r >= 'A' && r <= 'Z', r >= '0' && r <= '9':
			return r
		}
		return '_'
	}, key)
}

func qualify(group string, a slog.Attr) slog.Attr {
	if group == "" {
		return a
	}
	return slog.Group(group, a)
}

func join(a, b string) string {
	if a == "" {
		return b
	}
	return a + "." + b
}

func priority(l slog.Level) journal.Priority {
	switch {
	case l >= slog.LevelError:
		return journal.PriErr
	case l >= slog.LevelWarn:
		return journal.PriWarning
	case l >= slog.LevelInfo:
		return journal.PriInfo
	}
	return journal.PriDebug
}
