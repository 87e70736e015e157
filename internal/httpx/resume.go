package httpx

import (
	"context"
	"errors"
	"io"
)

// brokenBody marks an error met while reading a response body, after the
// request itself succeeded: the only kind of failure Resume tries again
// (the transport has already retried the requests themselves).
type brokenBody struct{ error }

func (e brokenBody) Unwrap() error { return e.error }

// BrokenBody marks err as a body that broke off (a short read found after
// the fact, say), for Resume.
func BrokenBody(err error) error { return brokenBody{err} }

// IsBrokenBody reports whether err was met reading a body wrapped by Body
// (or marked by BrokenBody).
func IsBrokenBody(err error) bool {
	var broken brokenBody
	return errors.As(err, &broken)
}

// Body wraps a response body so that its read errors are marked for Resume,
// and told apart from the errors of writing the bytes out.
func Body(r io.Reader) io.Reader { return bodyReader{r} }

type bodyReader struct{ r io.Reader }

func (b bodyReader) Read(p []byte) (int, error) {
	n, err := b.r.Read(p)
	if err != nil && err != io.EOF {
		err = brokenBody{err}
	}
	return n, err
}

// Resume calls try until it succeeds, again only when it failed while
// reading a response body (through Body) for a transient reason, at most
// p.Attempts times in all, waiting p's backoff between tries; try picks
// up where the last one stopped. Before each new try it calls resuming
// (which may be nil) with the try number just failed, the reason and the
// error. It returns try's last error.
func Resume(ctx context.Context, p Policy, try func(attempt int) error, resuming func(attempt int, reason string, err error)) error {
	return p.Do(ctx, try, func(attempt int, err error) bool {
		reason, transient := Retryable(err)
		if !IsBrokenBody(err) || !transient || ctx.Err() != nil {
			return false
		}
		if resuming != nil {
			resuming(attempt, reason, err)
		}
		return true
	})
}
