package vtscreen

import (
	"slices"
	"testing"
)

func TestScreen(t *testing.T) {
	s := New(10, 3)
	// Two lines, a bar drawn below them, erased and overdrawn by a third
	// line, a long line that wraps, then the bottom scrolls twice.
	s.Write([]byte("one\r\ntwo\r\n[==>  ] 5%\r\n"))
	s.Write([]byte("\r\x1b[1A\x1b[Jthree\r\n"))
	s.Write([]byte("0123456789abc\r\nx\x1b[2K\ry\r\n"))
	want := []string{"one", "two", "three", "0123456789abc", "y"}
	if got := s.Lines(); !slices.Equal(got, want) {
		t.Errorf("lines %q, want %q", got, want)
	}
	// Cursor up stops at the top row; ED clears what is below.
	s = New(10, 3)
	s.Write([]byte("a\r\nb\r\nc\r\x1b[9A\x1b[Jz"))
	if got := s.Lines(); !slices.Equal(got, []string{"z"}) {
		t.Errorf("after clearing from the top: %q", got)
	}
}
