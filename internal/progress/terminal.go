package progress

import (
	"bytes"
	"fmt"
	"io"
	"os"
	"strings"
	"sync"

	"golang.org/x/sys/unix"
)

// Terminal is one terminal shared by log lines and progress bars. The bars
// stay at the bottom: every write of log text first erases them, prints the
// text where they were (so it scrolls up and is never erased again), then
// draws them anew below it. Everything written to the terminal while bars
// may be drawn goes through one Terminal: text written around it would sit
// where the next redraw erases.
type Terminal struct {
	w    io.Writer
	size func() (cols, rows int) // 0 when unknown

	mu      sync.Mutex
	bars    []string // drawn at the bottom, one row each
	drawn   int      // rows the bars occupy on screen now
	pending []byte   // written text after its last newline, held while bars are drawn
	closed  bool
}

// NewTerminal returns the Terminal of f, or nil when f is not a terminal
// (or TERM is "dumb": no cursor movement).
func NewTerminal(f *os.File) *Terminal {
	if os.Getenv("TERM") == "dumb" {
		return nil
	}
	fd := int(f.Fd())
	if _, err := unix.IoctlGetTermios(fd, unix.TCGETS); err != nil {
		return nil
	}
	return &Terminal{w: f, size: func() (int, int) {
		ws, err := unix.IoctlGetWinsize(fd, unix.TIOCGWINSZ)
		if err != nil {
			return 0, 0
		}
		return int(ws.Col), int(ws.Row)
	}}
}

// Stderr is the Terminal of os.Stderr, nil when stderr is no terminal. The
// logger and every progress display on stderr share it.
var Stderr = sync.OnceValue(func() *Terminal { return NewTerminal(os.Stderr) })

// Write prints log text above the bars. Whole lines are printed at once;
// a line's start without its newline waits for the rest while bars are
// drawn, so a bar never lands in the middle of a line.
func (t *Terminal) Write(p []byte) (int, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.drawn == 0 && len(t.pending) == 0 {
		_, err := t.w.Write(p)
		return len(p), err
	}
	t.pending = append(t.pending, p...)
	i := bytes.LastIndexByte(t.pending, '\n')
	if i < 0 {
		return len(p), nil
	}
	var b bytes.Buffer
	t.eraseLocked(&b)
	b.Write(t.pending[:i+1])
	t.pending = append(t.pending[:0], t.pending[i+1:]...)
	t.drawLocked(&b)
	_, err := t.w.Write(b.Bytes())
	return len(p), err
}

// update prints lines above the bars, then draws bars in place of the old
// ones, in one write.
func (t *Terminal) update(above, bars []string) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.closed {
		bars = nil
	}
	var b bytes.Buffer
	t.eraseLocked(&b)
	if len(t.pending) > 0 && (len(above) > 0 || len(bars) == 0) {
		// A line's start held back: it ends here rather than be lost.
		b.Write(t.pending)
		b.WriteByte('\n')
		t.pending = t.pending[:0]
	}
	for _, l := range above {
		b.WriteString(l)
		b.WriteByte('\n')
	}
	t.bars = bars
	t.drawLocked(&b)
	if b.Len() > 0 {
		t.w.Write(b.Bytes())
	}
}

// Close erases the bars and draws none after: what the process prints
// last (its result, an error) is not followed by bars that stopped.
func (t *Terminal) Close() {
	t.update(nil, nil)
	t.mu.Lock()
	t.closed = true
	t.mu.Unlock()
}

// eraseLocked moves to the first row of the bars and clears from there to
// the end of the screen.
func (t *Terminal) eraseLocked(b *bytes.Buffer) {
	if t.drawn > 0 {
		fmt.Fprintf(b, "\r\x1b[%dA\x1b[J", t.drawn)
	}
	t.drawn = 0
}

// drawLocked draws the bars, each cut to the terminal's width so that it
// takes one row: a wrapped bar would take two, and the erase, which
// counts rows, would leave half of it on screen. For the same reason they
// take less than the screen's height; the bars that do not fit are
// counted on the last row.
func (t *Terminal) drawLocked(b *bytes.Buffer) {
	cols, rows := t.size()
	bars := t.bars
	if rows > 2 && len(bars) > rows-2 {
		n := rows - 3
		bars = append(bars[:n:n], fmt.Sprintf("... and %d more", len(t.bars)-n))
	}
	for _, l := range bars {
		if cols > 1 && len(l) >= cols {
			l = l[:cols-1] // bars are ASCII
		}
		b.WriteString(strings.TrimRight(l, " "))
		b.WriteByte('\n')
	}
	t.drawn = len(bars)
}
