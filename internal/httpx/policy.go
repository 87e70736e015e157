package httpx

import (
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/nodespawn/nodespawn/internal/retry"
)

// Policy says how often and how patiently a transient failure is tried
// again: a retry.Policy. The client's transport retries requests with it
// (Retry-After, when a server sends it, replaces the backoff), and the
// loops that resume a response body which broke off (downloads, image
// layers) use the same value (PolicyOf, Resume), so one setting bounds
// both.
type Policy = retry.Policy

// DefaultPolicy is what NewClient retries with unless WithPolicy says
// otherwise.
var DefaultPolicy = Policy{Attempts: 5, Base: 500 * time.Millisecond, Max: 30 * time.Second}

// maxRetryAfter bounds how long a server's Retry-After can hold us.
const maxRetryAfter = 2 * time.Minute

// ErrStalled is wrapped by the error a response body read returns when no
// byte arrived for the stall timeout.
var ErrStalled = errors.New("transfer stalled")

// StatusError is an HTTP answer whose status says the request failed.
type StatusError struct {
	// Code and Status are the response's (503, "503 Service Unavailable").
	Code   int
	Status string
	// Body is the start of the response body, on one line, for the message.
	Body string
}

func (e *StatusError) Error() string {
	if e.Body == "" {
		return e.Status
	}
	return e.Status + ": " + e.Body
}

// NewStatusError describes resp, reading the start of its body.
func NewStatusError(resp *http.Response) *StatusError {
	b, _ := io.ReadAll(io.LimitReader(resp.Body, 256))
	return &StatusError{Code: resp.StatusCode, Status: resp.Status, Body: strings.Join(strings.Fields(string(b)), " ")}
}

// Retryable is the project's one judgement of whether a failure may pass
// if tried again, and why: a reset, refused or broken connection, one
// closed before the answer or in the middle of the body, a timeout, a
// stalled body (ErrStalled), a 429 or a 5xx other than 501. Never the
// caller giving up (context cancellation), an answer that would be the
// same again (4xx, 501), or content that is not what was promised (a
// digest mismatch): those fail at once.
//
// The transport applies it to requests. A loop that resumes a body which
// broke off applies it only to errors met while reading that body: a
// request's failure has already been retried by the transport, and
// retrying it again would multiply the attempts.
func Retryable(err error) (reason string, ok bool) {
	var netErr net.Error
	var status *StatusError
	switch {
	case err == nil:
		return "", false
	case errors.Is(err, ErrStalled):
		// Checked before cancellation: a stall is reported by cancelling
		// the request with ErrStalled as the cause.
		return "stalled", true
	case errors.Is(err, context.Canceled), errors.Is(err, context.DeadlineExceeded):
		// The caller gave up; a transport timeout is a net.Error instead.
		return "", false
	case errors.As(err, &status):
		if status.Code == http.StatusTooManyRequests || status.Code >= 500 && status.Code != http.StatusNotImplemented {
			return status.Status, true
		}
		return "", false
	case errors.Is(err, syscall.ECONNRESET):
		return "connection reset", true
	case errors.Is(err, syscall.ECONNREFUSED):
		return "connection refused", true
	case errors.Is(err, syscall.EPIPE):
		return "broken pipe", true
	case errors.Is(err, io.EOF), errors.Is(err, io.ErrUnexpectedEOF):
		return "connection closed early", true
	case errors.As(err, &netErr) && netErr.Timeout():
		return "timeout", true
	}
	return "", false
}

// retryAfter parses a Retry-After value (seconds or an HTTP date), bounded
// by maxRetryAfter; 0 means absent or unparsable.
func retryAfter(v string, now time.Time) time.Duration {
	if v == "" {
		return 0
	}
	var d time.Duration
	if secs, err := strconv.Atoi(v); err == nil {
		d = time.Duration(secs) * time.Second
	} else if when, err := http.ParseTime(v); err == nil {
		d = when.Sub(now)
	}
	if d < 0 {
		return 0
	}
	return min(d, maxRetryAfter)
}
