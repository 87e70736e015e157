// Package progress is the one display of transfers in flight: image layers
// and downloads report through it, so their lines never interleave.
package progress

import (
	"fmt"
	"io"
	"log/slog"
	"os"
	"strings"
	"sync"
	"time"
)

// Display reports the progress of concurrent downloads through one
// renderer, so lines never interleave. On a terminal it redraws one bar per
// download (bytes, rate, ETA) in place below the log lines (see Terminal);
// elsewhere (journal, CI, a pipe) it logs a plain line per download every
// LogInterval and one when it ends.
type Display struct {
	term     *Terminal // nil off a terminal
	logger   *slog.Logger
	interval time.Duration
	now      func() time.Time

	mu      sync.Mutex
	active  []*Tracker
	running bool
}

// LogInterval is how often a non-terminal Display logs each download.
const LogInterval = 5 * time.Second

// ttyRedraw is how often bars are redrawn on a terminal.
const ttyRedraw = 200 * time.Millisecond

// New reports to w, drawing bars when w is a terminal (and TERM is
// not "dumb"), else logging through logger (nil: slog.Default()). On
// os.Stderr the bars go through Stderr(), the Terminal the logger writes
// to as well, so log lines print above the bars instead of under them.
func New(w io.Writer, logger *slog.Logger) *Display {
	if logger == nil {
		logger = slog.Default()
	}
	p := &Display{logger: logger, interval: LogInterval, now: time.Now}
	switch f := w.(type) {
	case *Terminal:
		p.term = f
	case *os.File:
		if f == os.Stderr {
			p.term = Stderr()
		} else {
			p.term = NewTerminal(f)
		}
	}
	if p.term != nil {
		p.interval = ttyRedraw
	}
	return p
}

// Tracker counts one download's bytes; it is an io.Writer so it can sit in
// an io.MultiWriter beside the file.
type Tracker struct {
	p     *Display
	name  string
	start time.Time

	mu    sync.Mutex
	total int64 // -1 or 0 when unknown
	done  int64
}

// Start begins tracking a download of total bytes (0 if unknown yet).
func (p *Display) Start(name string, total int64) *Tracker {
	t := &Tracker{p: p, name: name, start: p.now(), total: total}
	p.mu.Lock()
	defer p.mu.Unlock()
	p.active = append(p.active, t)
	if !p.running {
		p.running = true
		go p.loop()
	}
	return t
}

// loop renders until no download is active.
func (p *Display) loop() {
	ticker := time.NewTicker(p.interval)
	defer ticker.Stop()
	for range ticker.C {
		if !p.tick() {
			return
		}
	}
}

// tick renders once; it returns false (and marks the renderer stopped)
// when nothing is active.
func (p *Display) tick() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if len(p.active) == 0 {
		p.running = false
		return false
	}
	if p.term != nil {
		p.redrawLocked(nil)
		return true
	}
	for _, t := range p.active {
		done, total := t.counts()
		p.logLocked("downloading", t, done, total)
	}
	return true
}

func (p *Display) logLocked(msg string, t *Tracker, done, total int64, extra ...any) {
	elapsed := p.now().Sub(t.start)
	attrs := []any{"name", t.name, "bytes", done}
	if total > 0 {
		attrs = append(attrs, "total", total)
	}
	attrs = append(attrs, "rate", formatRate(done, elapsed))
	if eta, ok := etaOf(done, total, elapsed); ok {
		attrs = append(attrs, "eta", eta)
	}
	p.logger.Info(msg, append(attrs, extra...)...)
}

// redrawLocked prints the lines above the bars, then the active bars in
// place of the last ones.
func (p *Display) redrawLocked(above []string) {
	bars := make([]string, 0, len(p.active))
	for _, t := range p.active {
		done, total := t.counts()
		bars = append(bars, p.barLine(t, done, total))
	}
	p.term.update(above, bars)
}

// barLine is "name [=====>     ]  45% 36.0 MiB / 80.0 MiB  12.0 MiB/s  ETA 4s".
func (p *Display) barLine(t *Tracker, done, total int64) string {
	const width = 30
	elapsed := p.now().Sub(t.start)
	bar := strings.Repeat(" ", width)
	pct := "    "
	if total > 0 {
		filled := int(min(done, total) * width / total)
		bar = strings.Repeat("=", filled) + strings.Repeat(" ", width-filled)
		if filled < width {
			bar = strings.Repeat("=", filled) + ">" + strings.Repeat(" ", width-filled-1)
		}
		pct = fmt.Sprintf("%3d%%", min(done, total)*100/total)
	}
	line := fmt.Sprintf("%-12s [%s] %s %s", t.name, bar, pct, formatBytes(done))
	if total > 0 {
		line += " / " + formatBytes(total)
	}
	line += "  " + formatRate(done, elapsed)
	if eta, ok := etaOf(done, total, elapsed); ok {
		line += "  ETA " + eta.String()
	}
	return line
}

// Write counts n bytes received.
func (t *Tracker) Write(b []byte) (int, error) {
	t.mu.Lock()
	t.done += int64(len(b))
	t.mu.Unlock()
	return len(b), nil
}

// Add counts n bytes received, for callers that learn a count rather than
// see the bytes (an image layer's applier).
func (t *Tracker) Add(n int64) {
	t.mu.Lock()
	t.done += n
	t.mu.Unlock()
}

// SetTotal sets the expected size once the response says it.
func (t *Tracker) SetTotal(total int64) {
	t.mu.Lock()
	t.total = total
	t.mu.Unlock()
}

// Reset starts the count over (the server sent the whole file again).
func (t *Tracker) Reset() {
	t.mu.Lock()
	t.done = 0
	t.mu.Unlock()
}

func (t *Tracker) counts() (done, total int64) {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.done, t.total
}

// Done ends tracking and reports the outcome once.
func (t *Tracker) Done(err error) {
	p := t.p
	p.mu.Lock()
	defer p.mu.Unlock()
	for i, a := range p.active {
		if a == t {
			p.active = append(p.active[:i], p.active[i+1:]...)
			break
		}
	}
	done, total := t.counts()
	elapsed := p.now().Sub(t.start)
	if p.term != nil {
		status := "done"
		if err != nil {
			status = "failed"
		}
		p.redrawLocked([]string{fmt.Sprintf("%-12s %s %s in %s (%s)", t.name, status, formatBytes(done), elapsed.Round(100*time.Millisecond), formatRate(done, elapsed))})
		return
	}
	if err != nil {
		p.logLocked("download failed", t, done, total, "elapsed", elapsed.Round(time.Millisecond), "error", err)
		return
	}
	p.logLocked("downloaded", t, done, total, "elapsed", elapsed.Round(time.Millisecond))
}

func etaOf(done, total int64, elapsed time.Duration) (time.Duration, bool) {
	if total <= 0 || done <= 0 || done >= total || elapsed <= 0 {
		return 0, false
	}
	rest := time.Duration(float64(elapsed) * float64(total-done) / float64(done))
	return rest.Round(time.Second), true
}

func formatRate(done int64, elapsed time.Duration) string {
	if elapsed <= 0 {
		return "- B/s"
	}
	return formatBytes(int64(float64(done)/elapsed.Seconds())) + "/s"
}

// Bytes prints n in binary units with one decimal ("80.1 MiB"), as the
// progress lines do.
func Bytes(n int64) string { return formatBytes(n) }

// formatBytes prints n in binary units with one decimal ("80.1 MiB").
func formatBytes(n int64) string {
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%d B", n)
	}
	div, exp := int64(unit), 0
	for m := n / unit; m >= unit && exp < 4; m /= unit {
		div *= unit
		exp++
	}
	return fmt.Sprintf("%.1f %ciB", float64(n)/float64(div), "KMGTP"[exp])
}
