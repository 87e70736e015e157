// Package vtscreen is a small model of a terminal screen for tests: it
// reads what a program wrote to a terminal, cursor movements and erasures
// included, and says what a person would see after it, scrolled-off lines
// included. It understands what nodespawn writes (text, CR, LF, BS, tabs,
// cursor up/down/forward/back, erase in display and in line, autowrap at
// the width); other escape sequences are skipped, not drawn.
package vtscreen

import (
	"strconv"
	"strings"
)

// Screen is a terminal of fixed size with unlimited scrollback.
type Screen struct {
	// ONLCR makes a line feed return the carriage too, as a terminal
	// device's output processing does: set it when the program's output
	// reaches the screen directly rather than through a pty.
	ONLCR bool

	cols, rows int
	history    []row // scrolled off the top
	screen     []row
	x, y       int
	wrapNext   bool // the last column was written: the next character wraps

	esc []byte // an escape sequence being read, nil outside one
}

type row struct {
	cells   []rune
	wrapped bool // continues on the next row (autowrap, not a newline)
}

// New returns an empty screen of cols by rows.
func New(cols, rows int) *Screen {
	return &Screen{cols: cols, rows: rows, screen: make([]row, rows)}
}

// Write interprets p as terminal output; it never fails.
func (s *Screen) Write(p []byte) (int, error) {
	for _, r := range string(p) {
		s.put(r)
	}
	return len(p), nil
}

func (s *Screen) put(r rune) {
	if s.esc != nil {
		s.esc = append(s.esc, string(r)...)
		s.escape()
		return
	}
	switch r {
	case 0x1b:
		s.esc = []byte{}
	case '\r':
		s.x, s.wrapNext = 0, false
	case '\n':
		if s.ONLCR {
			s.x = 0
		}
		s.lineFeed()
	case '\b':
		s.x, s.wrapNext = max(s.x-1, 0), false
	case '\t':
		s.x = min((s.x/8+1)*8, s.cols-1)
	default:
		if r < 0x20 {
			return
		}
		if s.wrapNext {
			s.screen[s.y].wrapped = true
			s.x, s.wrapNext = 0, false
			s.lineFeed()
		}
		line := &s.screen[s.y]
		for len(line.cells) <= s.x {
			line.cells = append(line.cells, ' ')
		}
		line.cells[s.x] = r
		if s.x == s.cols-1 {
			s.wrapNext = true
		} else {
			s.x++
		}
	}
}

func (s *Screen) lineFeed() {
	s.wrapNext = false
	if s.y < s.rows-1 {
		s.y++
		return
	}
	s.history = append(s.history, s.screen[0])
	copy(s.screen, s.screen[1:])
	s.screen[s.rows-1] = row{}
}

// escape acts on a complete sequence and forgets it; an incomplete one
// waits for more.
func (s *Screen) escape() {
	seq := s.esc
	if len(seq) == 1 && seq[0] != '[' {
		s.esc = nil // a two-character sequence (ESC 7, ESC c, ...): skipped
		return
	}
	if len(seq) < 2 {
		return
	}
	final := seq[len(seq)-1]
	if final < 0x40 || final > 0x7e {
		return
	}
	s.esc = nil
	params := string(seq[1 : len(seq)-1])
	n := 1
	if v, err := strconv.Atoi(params); err == nil && v > 0 {
		n = v
	}
	s.wrapNext = false
	switch final {
	case 'A':
		s.y = max(s.y-n, 0)
	case 'B':
		s.y = min(s.y+n, s.rows-1)
	case 'C':
		s.x = min(s.x+n, s.cols-1)
	case 'D':
		s.x = max(s.x-n, 0)
	case 'G':
		s.x = min(n-1, s.cols-1)
	case 'J':
		switch params {
		case "", "0":
			s.clearLine(s.x)
			for y := s.y + 1; y < s.rows; y++ {
				s.screen[y] = row{}
			}
		case "2":
			for y := range s.screen {
				s.screen[y] = row{}
			}
		}
	case 'K':
		switch params {
		case "", "0":
			s.clearLine(s.x)
		case "2":
			s.screen[s.y] = row{}
		}
	}
}

// clearLine clears the cursor's row from column x to its end.
func (s *Screen) clearLine(x int) {
	line := &s.screen[s.y]
	if x < len(line.cells) {
		line.cells = line.cells[:x]
	}
	line.wrapped = false
}

// Lines returns what was shown, scrollback first, each wrapped line joined
// into one, trailing spaces and trailing empty rows dropped.
func (s *Screen) Lines() []string {
	var out []string
	var cur strings.Builder
	for _, r := range append(append([]row{}, s.history...), s.screen...) {
		cur.WriteString(string(r.cells))
		if r.wrapped {
			continue
		}
		out = append(out, strings.TrimRight(cur.String(), " "))
		cur.Reset()
	}
	for len(out) > 0 && out[len(out)-1] == "" {
		out = out[:len(out)-1]
	}
	return out
}
