// Package retry paces an operation that may fail for a while: how many
// times it is tried, and how long to wait between tries (exponential
// backoff with a cap, with full jitter or without).
//
// It judges no error. What is worth another try is the caller's decision:
// httpx.Retryable for HTTP, apt's own messages for apt, EBUSY for a rootfs
// whose mounts linger, a transient failure within firstBoot.retryFor for
// the first-boot run.
package retry

import (
	"context"
	"fmt"
	"math/rand/v2"
	"time"
)

// Policy says how often and how patiently an operation is tried.
type Policy struct {
	// Attempts is how many times the operation is tried in all; below 1
	// means 1 (no retry).
	Attempts int
	// Base and Max shape the exponential backoff: the longest wait before
	// retry n (1-based) is min(Max, Base*2^(n-1)) (Ceiling), and Backoff
	// picks at random below it (full jitter keeps many clients that
	// failed together from trying again together). A zero Base or Max
	// means no wait.
	Base, Max time.Duration
}

// Tries is Attempts, at least 1.
func (p Policy) Tries() int { return max(p.Attempts, 1) }

// Ceiling is the longest wait before retry number retry (1-based):
// Base doubled retry-1 times, at most Max. It is the wait itself for a
// caller that wants no jitter (one process waiting on the kernel, say).
func (p Policy) Ceiling(retry int) time.Duration {
	ceiling := p.Base
	for i := 1; i < retry && ceiling > 0 && ceiling < p.Max; i++ {
		if ceiling > p.Max/2 {
			ceiling = p.Max // doubling would pass Max (or overflow)
			break
		}
		ceiling *= 2
	}
	return max(min(ceiling, p.Max), 0)
}

// Backoff is the wait before retry number retry (1-based): random in
// [0, Ceiling(retry)].
func (p Policy) Backoff(retry int) time.Duration {
	ceiling := p.Ceiling(retry)
	if ceiling <= 0 {
		return 0
	}
	return rand.N(ceiling + 1)
}

// Wait sleeps for Backoff(retry), or returns ctx's error once ctx is done.
func (p Policy) Wait(ctx context.Context, retry int) error {
	return Sleep(ctx, p.Backoff(retry))
}

// Sleep waits for d, or returns ctx's error once ctx is done; a context
// already done returns at once, whatever d.
func Sleep(ctx context.Context, d time.Duration) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	if d <= 0 {
		return nil
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}

// Do calls try with the attempt number (1-based) until it succeeds, at
// most Tries times. After a failure with tries left, again (nil: every
// failure) says whether to try once more, and may log why; Do then waits
// Backoff. It returns nil, try's last error, or, when ctx ends during a
// wait, an error that wraps both ctx's error and try's last one.
func (p Policy) Do(ctx context.Context, try func(attempt int) error, again func(attempt int, err error) bool) error {
	for attempt := 1; ; attempt++ {
		err := try(attempt)
		if err == nil {
			return nil
		}
		if attempt >= p.Tries() || again != nil && !again(attempt, err) {
			return err
		}
		if werr := p.Wait(ctx, attempt); werr != nil {
			return fmt.Errorf("%w (last failure: %w)", werr, err)
		}
	}
}
