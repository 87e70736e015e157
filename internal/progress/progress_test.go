package progress

import (
	"fmt"
	"regexp"

	"bytes"
	"errors"
	"github.com/nodespawn/nodespawn/internal/vtscreen"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"
)

// fakeClock is a clock the test moves by hand.
type fakeClock struct {
	mu  sync.Mutex
	now time.Time
}

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *fakeClock) Advance(d time.Duration) {
	c.mu.Lock()
	c.now = c.now.Add(d)
	c.mu.Unlock()
}

// newTestProgress reports into buffers with a hand-driven clock; the
// renderer's own ticker is not relied on, the test calls tick.
func newTestProgress(tty bool) (*Display, *bytes.Buffer, *bytes.Buffer, *fakeClock) {
	var out, logs bytes.Buffer
	logger := slog.New(slog.NewTextHandler(&logs, &slog.HandlerOptions{
		ReplaceAttr: func(groups []string, a slog.Attr) slog.Attr {
			if a.Key == slog.TimeKey && len(groups) == 0 {
				return slog.Attr{}
			}
			return a
		},
	}))
	clock := &fakeClock{now: time.Date(2026, 11, 28, 12, 0, 0, 0, time.UTC)}
	p := New(&out, logger)
	p.now = clock.Now
	if tty {
		p.term = &Terminal{w: &out, size: func() (int, int) { return 0, 0 }}
	}
	p.interval = time.Hour // the test drives tick itself
	return p, &out, &logs, clock
}

func TestProgressPlainLines(t *testing.T) {
	p, out, logs, clock := newTestProgress(false)
	kubelet := p.Start("kubelet", 0)
	kubelet.SetTotal(100 << 20)
	runc := p.Start("runc", 0) // size unknown: no total, no ETA
	kubelet.Write(make([]byte, 25<<20))
	runc.Write(make([]byte, 3<<20))
	clock.Advance(5 * time.Second)
	p.tick()
	kubelet.Write(make([]byte, 75<<20))
	clock.Advance(5 * time.Second)
	kubelet.Done(nil)
	runc.Done(errors.New("connection reset"))

	want := strings.Join([]string{
		`level=INFO msg=downloading name=kubelet bytes=26214400 total=104857600 rate="5.0 MiB/s" eta=15s`,
		`level=INFO msg=downloading name=runc bytes=3145728 rate="614.4 KiB/s"`,
		`level=INFO msg=downloaded name=kubelet bytes=104857600 total=104857600 rate="10.0 MiB/s" elapsed=10s`,
		`level=INFO msg="download failed" name=runc bytes=3145728 rate="307.2 KiB/s" elapsed=10s error="connection reset"`,
	}, "\n") + "\n"
	if logs.String() != want {
		t.Errorf("log lines:\n%s\nwant:\n%s", logs.String(), want)
	}
	if out.Len() != 0 {
		t.Errorf("non-terminal progress wrote %q to the terminal writer", out.String())
	}
	if p.tick() {
		t.Error("renderer keeps running with no active download")
	}
}

func TestProgressBars(t *testing.T) {
	p, out, logs, clock := newTestProgress(true)
	a := p.Start("kubelet", 80<<20)
	b := p.Start("containerd", 40<<20)
	a.Write(make([]byte, 20<<20))
	b.Write(make([]byte, 40<<20))
	clock.Advance(2 * time.Second)
	p.tick()
	first := out.String()
	wantFirst := "kubelet      [=======>                      ]  25% 20.0 MiB / 80.0 MiB  10.0 MiB/s  ETA 6s\n" +
		"containerd   [==============================] 100% 40.0 MiB / 40.0 MiB  20.0 MiB/s\n"
	if first != wantFirst {
		t.Errorf("first frame:\n%q\nwant\n%q", first, wantFirst)
	}
	out.Reset()
	b.Done(nil)
	// The finished download is printed once, above the redrawn bars.
	wantDone := "\r\x1b[2A\x1b[J" + "containerd   done 40.0 MiB in 2s (20.0 MiB/s)\n" +
		"kubelet      [=======>                      ]  25% 20.0 MiB / 80.0 MiB  10.0 MiB/s  ETA 6s\n"
	if out.String() != wantDone {
		t.Errorf("frame after one finished:\n%q\nwant\n%q", out.String(), wantDone)
	}
	if logs.Len() != 0 {
		t.Errorf("terminal progress also logged: %q", logs.String())
	}
}

func TestFormatBytes(t *testing.T) {
	tests := map[int64]string{0: "0 B", 1023: "1023 B", 1024: "1.0 KiB", 1536: "1.5 KiB", 80 << 20: "80.0 MiB", 3 << 30: "3.0 GiB"}
	for n, want := range tests {
		if got := formatBytes(n); got != want {
			t.Errorf("formatBytes(%d) = %q, want %q", n, got, want)
		}
	}
}

// TestLogLinesAboveBars writes log lines through the Terminal while bars
// are drawn on a narrow screen, as apply does, and reads the screen: every
// log line and every finished download's line is there, in order, and no
// bar is left.
func TestLogLinesAboveBars(t *testing.T) {
	// More downloads than the screen has rows, with names that make the
	// bars wider than the screen.
	screen := vtscreen.New(60, 10)
	screen.ONLCR = true
	term := &Terminal{w: screen, size: func() (int, int) { return 60, 10 }}
	logger := slog.New(slog.NewTextHandler(term, &slog.HandlerOptions{
		ReplaceAttr: func(groups []string, a slog.Attr) slog.Attr {
			if a.Key == slog.TimeKey && len(groups) == 0 {
				return slog.Attr{}
			}
			return a
		},
	}))
	clock := &fakeClock{now: time.Date(2026, 11, 28, 12, 0, 0, 0, time.UTC)}
	p := New(term, logger)
	p.now = clock.Now
	p.interval = time.Hour

	var want []string
	var trackers []*Tracker
	for i := range 12 {
		trackers = append(trackers, p.Start(fmt.Sprintf("download-with-a-long-name-%d", i), 100<<20))
	}
	for i := range 30 {
		trackers[i%12].Write(make([]byte, 3<<20))
		clock.Advance(100 * time.Millisecond)
		p.tick()
		// A log line longer than the screen wraps and stays.
		logger.Info("step", "step", fmt.Sprintf("rootfs:file:/etc/some/long/path/number-%02d", i), "outcome", "done")
		want = append(want, fmt.Sprintf("level=INFO msg=step step=rootfs:file:/etc/some/long/path/number-%02d outcome=done", i))
		if i%8 == 7 {
			tr := trackers[i/8]
			tr.Done(nil)
			want = append(want, fmt.Sprintf("download-with-a-long-name-%d done", i/8))
		}
		// Half a line, then its end: one line on screen, not split by bars.
		term.Write([]byte("partial "))
		p.tick()
		term.Write([]byte("line\n"))
		want = append(want, "partial line")
	}
	term.Close()

	lines := screen.Lines()
	bar := regexp.MustCompile(`^download-with-a-long-name-[0-9]+ \[`)
	next := 0
	for _, l := range lines {
		if next < len(want) && strings.HasPrefix(l, want[next]) {
			next++
		}
		if bar.MatchString(l) || strings.Contains(l, "more") {
			t.Errorf("a bar stayed on screen: %q", l)
		}
	}
	if next < len(want) {
		t.Errorf("line %q missing or out of order on screen:\n%s", want[next], strings.Join(lines, "\n"))
	}
}
