package retry

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"testing"
	"time"
)

func TestCeiling(t *testing.T) {
	tests := []struct {
		p    Policy
		want []time.Duration // for retries 1, 2, ...
	}{
		// httpx.DefaultPolicy's shape: doubles up to the cap, then stays.
		{Policy{Base: 500 * time.Millisecond, Max: 30 * time.Second},
			[]time.Duration{500 * time.Millisecond, time.Second, 2 * time.Second, 4 * time.Second, 8 * time.Second, 16 * time.Second, 30 * time.Second, 30 * time.Second}},
		// A Base above Max is cut to Max from the first retry.
		{Policy{Base: time.Minute, Max: 10 * time.Second}, []time.Duration{10 * time.Second, 10 * time.Second}},
		// No Base or no Max: no wait.
		{Policy{Max: time.Second}, []time.Duration{0, 0, 0}},
		{Policy{Base: time.Second}, []time.Duration{0, 0}},
		{Policy{Base: -time.Second, Max: time.Second}, []time.Duration{0, 0}},
	}
	for _, tt := range tests {
		var got []time.Duration
		for n := 1; n <= len(tt.want); n++ {
			got = append(got, tt.p.Ceiling(n))
		}
		if !slices.Equal(got, tt.want) {
			t.Errorf("%+v: ceilings %v, want %v", tt.p, got, tt.want)
		}
	}
	// Far past the cap, doubling neither overflows nor goes negative.
	huge := Policy{Base: time.Nanosecond, Max: time.Duration(1<<63 - 1)}
	if got := huge.Ceiling(200); got <= 0 {
		t.Errorf("Ceiling(200) of %+v = %v, want positive", huge, got)
	}
}

func TestBackoffIsJitteredBelowCeiling(t *testing.T) {
	p := Policy{Base: time.Second, Max: 4 * time.Second}
	for retry := 1; retry <= 4; retry++ {
		ceiling := p.Ceiling(retry)
		low, high := false, false
		for range 200 {
			d := p.Backoff(retry)
			if d < 0 || d > ceiling {
				t.Fatalf("Backoff(%d) = %v, outside [0, %v]", retry, d, ceiling)
			}
			low = low || d < ceiling/2
			high = high || d >= ceiling/2
		}
		// Full jitter: 200 draws all in one half has odds of 2^-199.
		if !low || !high {
			t.Errorf("Backoff(%d): 200 draws in one half of [0, %v] only: not jittered", retry, ceiling)
		}
	}
	if d := (Policy{}).Backoff(3); d != 0 {
		t.Errorf("zero Policy backs off %v, want 0", d)
	}
}

func TestSleep(t *testing.T) {
	if err := Sleep(context.Background(), 0); err != nil {
		t.Errorf("Sleep(0) = %v", err)
	}
	start := time.Now()
	if err := Sleep(context.Background(), 20*time.Millisecond); err != nil || time.Since(start) < 20*time.Millisecond {
		t.Errorf("Sleep(20ms) = %v after %v", err, time.Since(start))
	}

	done, cancel := context.WithCancel(context.Background())
	cancel()
	// A done context wins even when there is nothing to wait for.
	for _, d := range []time.Duration{0, time.Hour} {
		if err := Sleep(done, d); !errors.Is(err, context.Canceled) {
			t.Errorf("Sleep(%v) on a cancelled context = %v, want context.Canceled", d, err)
		}
	}

	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
	defer cancel()
	start = time.Now()
	if err := Sleep(ctx, time.Hour); !errors.Is(err, context.DeadlineExceeded) || time.Since(start) > 10*time.Second {
		t.Errorf("Sleep(1h) with a 20ms deadline = %v after %v", err, time.Since(start))
	}
}

func TestDo(t *testing.T) {
	fast := Policy{Attempts: 4, Base: time.Millisecond, Max: 2 * time.Millisecond}
	errBusy := errors.New("busy")
	errGone := errors.New("gone")
	tests := []struct {
		name string
		p    Policy
		// fail is try's answer to attempt n (nil: success).
		fail func(n int) error
		// stop makes again refuse the error.
		stop      error
		wantTries int
		wantAgain []int // attempts again was asked about
		wantErr   error
		wantMsg   string
	}{
		{name: "first try", p: fast, fail: func(int) error { return nil },
			wantTries: 1},
		{name: "third try", p: fast, fail: func(n int) error { return cond(n < 3, errBusy) },
			wantTries: 3, wantAgain: []int{1, 2}},
		{name: "attempts spent: the last error, again not asked after it", p: fast,
			fail:      func(n int) error { return fmt.Errorf("try %d: %w", n, errBusy) },
			wantTries: 4, wantAgain: []int{1, 2, 3}, wantErr: errBusy, wantMsg: "try 4: busy"},
		{name: "again refuses", p: fast, stop: errGone,
			fail:      func(n int) error { return cond(n < 2, errBusy, errGone) },
			wantTries: 2, wantAgain: []int{1, 2}, wantErr: errGone},
		{name: "zero attempts means one", p: Policy{}, fail: func(int) error { return errBusy },
			wantTries: 1, wantErr: errBusy},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var tries, asked []int
			err := tt.p.Do(context.Background(), func(n int) error {
				tries = append(tries, n)
				return tt.fail(n)
			}, func(n int, err error) bool {
				asked = append(asked, n)
				return tt.stop == nil || !errors.Is(err, tt.stop)
			})
			if len(tries) != tt.wantTries || !slices.Equal(tries, seq(tt.wantTries)) {
				t.Errorf("tried %v, want attempts 1..%d", tries, tt.wantTries)
			}
			if !slices.Equal(asked, tt.wantAgain) {
				t.Errorf("again asked about %v, want %v", asked, tt.wantAgain)
			}
			if !errors.Is(err, tt.wantErr) || (err == nil) != (tt.wantErr == nil) {
				t.Errorf("err = %v, want %v", err, tt.wantErr)
			}
			if tt.wantMsg != "" && (err == nil || err.Error() != tt.wantMsg) {
				t.Errorf("err = %v, want %q", err, tt.wantMsg)
			}
		})
	}
}

func TestDoWaitsBetweenTries(t *testing.T) {
	// Ceilings 40ms, 80ms: jitter may pick 0, so only an upper bound and
	// the count of tries are certain; the waits' own bounds are
	// TestBackoffIsJitteredBelowCeiling's.
	p := Policy{Attempts: 3, Base: 40 * time.Millisecond, Max: 80 * time.Millisecond}
	start := time.Now()
	var at []time.Duration
	err := p.Do(context.Background(), func(int) error {
		at = append(at, time.Since(start))
		return errors.New("no")
	}, nil)
	if err == nil || len(at) != 3 {
		t.Fatalf("err %v after %d tries, want an error after 3", err, len(at))
	}
	if total := at[2]; total > 120*time.Millisecond+time.Second {
		t.Errorf("3 tries took %v, want at most the ceilings' 120ms (plus slack)", total)
	}
}

func TestDoCancelledWhileWaiting(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	errLock := errors.New("could not get lock")
	p := Policy{Attempts: 5, Base: time.Hour, Max: time.Hour}
	tries := 0
	start := time.Now()
	err := p.Do(ctx, func(int) error {
		tries++
		cancel()
		return errLock
	}, nil)
	if tries != 1 || time.Since(start) > 10*time.Second {
		t.Fatalf("%d tries in %v, want 1 and no wait", tries, time.Since(start))
	}
	if !errors.Is(err, context.Canceled) || !errors.Is(err, errLock) {
		t.Fatalf("err = %v, want both the cancellation and the last failure", err)
	}
	if want := "context canceled (last failure: could not get lock)"; err.Error() != want {
		t.Errorf("err = %q, want %q", err, want)
	}
}

func cond(ok bool, yes error, no ...error) error {
	if ok {
		return yes
	}
	if len(no) > 0 {
		return no[0]
	}
	return nil
}

func seq(n int) []int {
	var s []int
	for i := 1; i <= n; i++ {
		s = append(s, i)
	}
	return s
}
