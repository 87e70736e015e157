package progress

import (
	"bytes"
	"errors"
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
	p.tty = tty
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
	erase := "\x1b[1A\x1b[2K"
	wantDone := erase + erase + "containerd   done 40.0 MiB in 2s (20.0 MiB/s)\n" +
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
