// Package httpx is nodespawn's one HTTP client.
//
// NewClient returns an *http.Client whose transport retries transient
// failures of idempotent requests and aborts responses whose bodies stall.
// Every package that talks HTTP (downloads, the OCI registry client) uses it,
// so retry, timeout and TLS behaviour is the same everywhere.
package httpx

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"sync"
	"syscall"
	"time"
)

// ErrStalled is wrapped by the error a response body read returns when no
// byte arrived for the stall timeout.
var ErrStalled = errors.New("download stalled")

// Defaults for NewClient; each can be changed with an Option.
const (
	DefaultMaxAttempts   = 5
	DefaultBackoffBase   = 500 * time.Millisecond
	DefaultBackoffMax    = 30 * time.Second
	DefaultStallTimeout  = 60 * time.Second
	DefaultHeaderTimeout = 60 * time.Second
	// maxRetryAfter bounds how long a server's Retry-After can hold us.
	maxRetryAfter = 2 * time.Minute
)

type clientConfig struct {
	maxAttempts   int
	backoffBase   time.Duration
	backoffMax    time.Duration
	stallTimeout  time.Duration
	headerTimeout time.Duration
	extraCAs      []*x509.Certificate
	logger        *slog.Logger
}

// Option configures NewClient.
type Option func(*clientConfig)

// WithMaxAttempts sets how many times a request is tried in all (1 means no retry).
func WithMaxAttempts(n int) Option {
	return func(c *clientConfig) {
		if n >= 1 {
			c.maxAttempts = n
		}
	}
}

// WithBackoff sets the exponential backoff: the wait before retry i is a
// random duration in [0, min(max, base*2^i)] ("full jitter").
func WithBackoff(base, max time.Duration) Option {
	return func(c *clientConfig) {
		c.backoffBase, c.backoffMax = base, max
	}
}

// WithStallTimeout sets how long a response body read may wait without
// receiving a byte before the request is aborted with ErrStalled. There is
// deliberately no whole-request timeout: a large download on a slow link is
// fine as long as bytes keep coming.
func WithStallTimeout(d time.Duration) Option {
	return func(c *clientConfig) {
		if d > 0 {
			c.stallTimeout = d
		}
	}
}

// WithResponseHeaderTimeout sets how long to wait for response headers
// after the request is written.
func WithResponseHeaderTimeout(d time.Duration) Option {
	return func(c *clientConfig) {
		if d > 0 {
			c.headerTimeout = d
		}
	}
}

// WithCACerts adds certificates to the system roots (a private mirror's CA,
// or a test server's certificate). Verification is never turned off.
func WithCACerts(certs ...*x509.Certificate) Option {
	return func(c *clientConfig) {
		c.extraCAs = append(c.extraCAs, certs...)
	}
}

// WithLogger sets where retries are logged (default slog.Default()).
func WithLogger(l *slog.Logger) Option {
	return func(c *clientConfig) {
		if l != nil {
			c.logger = l
		}
	}
}

// NewClient returns the project's HTTP client. Its transport:
//   - verifies TLS against the system roots plus any WithCACerts;
//   - honours HTTP(S)_PROXY/NO_PROXY;
//   - bounds dialing (30 s), the TLS handshake (15 s) and the wait for
//     response headers, but not the body;
//   - aborts a response whose body delivers no byte for the stall timeout;
//   - retries idempotent requests (GET, HEAD, OPTIONS, PUT, DELETE) whose
//     body is absent or replayable (Request.GetBody) on connection resets,
//     refused connections, timeouts, 429 (honouring Retry-After) and 5xx
//     other than 501, with exponential backoff and full jitter, at most
//     WithMaxAttempts times. The last response or error is returned as is.
//
// The client has no overall Timeout; use the request's context to bound a call.
func NewClient(opts ...Option) *http.Client {
	cfg := clientConfig{
		maxAttempts:   DefaultMaxAttempts,
		backoffBase:   DefaultBackoffBase,
		backoffMax:    DefaultBackoffMax,
		stallTimeout:  DefaultStallTimeout,
		headerTimeout: DefaultHeaderTimeout,
		logger:        slog.Default(),
	}
	for _, o := range opts {
		o(&cfg)
	}
	tlsConfig := &tls.Config{MinVersion: tls.VersionTLS12}
	if len(cfg.extraCAs) > 0 {
		pool, err := x509.SystemCertPool()
		if err != nil || pool == nil {
			pool = x509.NewCertPool()
		}
		for _, c := range cfg.extraCAs {
			pool.AddCert(c)
		}
		tlsConfig.RootCAs = pool
	}
	base := &http.Transport{
		Proxy: http.ProxyFromEnvironment,
		DialContext: (&net.Dialer{
			Timeout:   30 * time.Second,
			KeepAlive: 30 * time.Second,
		}).DialContext,
		TLSClientConfig:       tlsConfig,
		ForceAttemptHTTP2:     true,
		TLSHandshakeTimeout:   15 * time.Second,
		ResponseHeaderTimeout: cfg.headerTimeout,
		ExpectContinueTimeout: time.Second,
		IdleConnTimeout:       90 * time.Second,
		MaxIdleConnsPerHost:   8,
	}
	return &http.Client{Transport: &retryTransport{base: base, cfg: cfg}}
}

// retryTransport wraps a base transport with retries and stall detection.
type retryTransport struct {
	base http.RoundTripper
	cfg  clientConfig
}

func (t *retryTransport) RoundTrip(req *http.Request) (*http.Response, error) {
	retryable := idempotent(req) && (req.Body == nil || req.Body == http.NoBody || req.GetBody != nil)
	for attempt := 1; ; attempt++ {
		areq := req
		if attempt > 1 && req.GetBody != nil && req.Body != nil && req.Body != http.NoBody {
			body, err := req.GetBody()
			if err != nil {
				return nil, fmt.Errorf("replay body of %s %s: %w", req.Method, redactURL(req), err)
			}
			areq = req.Clone(req.Context())
			areq.Body = body
		}
		ctx, cancel := context.WithCancelCause(req.Context())
		resp, err := t.base.RoundTrip(areq.WithContext(ctx))

		reason, wait := "", time.Duration(0)
		switch {
		case err != nil:
			reason = transientError(err)
		case resp.StatusCode == http.StatusTooManyRequests:
			reason = resp.Status
			wait = retryAfter(resp.Header.Get("Retry-After"), time.Now())
		case resp.StatusCode >= 500 && resp.StatusCode != http.StatusNotImplemented:
			reason = resp.Status
		}
		if reason == "" || !retryable || attempt >= t.cfg.maxAttempts || req.Context().Err() != nil {
			if err != nil {
				cancel(nil)
				return nil, err
			}
			resp.Body = newStallReader(ctx, cancel, resp.Body, t.cfg.stallTimeout)
			return resp, nil
		}
		if resp != nil {
			// Drain a little so the connection can be reused, then drop it.
			_, _ = io.CopyN(io.Discard, resp.Body, 64<<10)
			resp.Body.Close()
		}
		cancel(nil)
		if wait == 0 {
			wait = t.backoff(attempt)
		}
		t.cfg.logger.Warn("retrying HTTP request",
			"method", req.Method, "url", redactURL(req), "attempt", attempt,
			"maxAttempts", t.cfg.maxAttempts, "reason", reason, "wait", wait.Round(time.Millisecond))
		timer := time.NewTimer(wait)
		select {
		case <-req.Context().Done():
			timer.Stop()
			return nil, fmt.Errorf("%s %s: %w (after %s)", req.Method, redactURL(req), req.Context().Err(), reason)
		case <-timer.C:
		}
	}
}

// backoff is the full-jitter wait before retry number attempt (1-based).
func (t *retryTransport) backoff(attempt int) time.Duration {
	ceiling := t.cfg.backoffBase << (attempt - 1)
	if ceiling <= 0 || ceiling > t.cfg.backoffMax {
		ceiling = t.cfg.backoffMax
	}
	if ceiling <= 0 {
		return 0
	}
	return rand.N(ceiling + 1)
}

func idempotent(req *http.Request) bool {
	switch req.Method {
	case "", http.MethodGet, http.MethodHead, http.MethodOptions, http.MethodPut, http.MethodDelete:
		return true
	}
	return false
}

// transientError says why err is worth a retry, or "" when it is not.
func transientError(err error) string {
	var netErr net.Error
	switch {
	case errors.Is(err, context.Canceled), errors.Is(err, context.DeadlineExceeded):
		// The caller gave up; a transport timeout is a net.Error instead.
		return ""
	case errors.Is(err, syscall.ECONNRESET):
		return "connection reset"
	case errors.Is(err, syscall.ECONNREFUSED):
		return "connection refused"
	case errors.Is(err, syscall.EPIPE):
		return "broken pipe"
	case errors.Is(err, io.EOF), errors.Is(err, io.ErrUnexpectedEOF):
		return "connection closed before response"
	case errors.As(err, &netErr) && netErr.Timeout():
		return "timeout"
	}
	return ""
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

// WithoutURL strips the *url.Error wrapper http.Client.Do adds, whose
// message carries the full URL (query included); callers name the URL
// themselves, redacted (Redact).
func WithoutURL(err error) error {
	var ue *url.Error
	if errors.As(err, &ue) {
		return ue.Err
	}
	return err
}

// redactURL is Redact for a request's URL.
func redactURL(req *http.Request) string {
	return redactParsed(*req.URL)
}

// Redact drops user info and the query (which may carry signed tokens)
// from a URL before it goes into an error or a log line.
func Redact(raw string) string {
	u, err := url.Parse(raw)
	if err != nil {
		return "<unparsable URL>"
	}
	return redactParsed(*u)
}

func redactParsed(u url.URL) string {
	if u.User != nil {
		u.User = url.User("redacted")
	}
	if u.RawQuery != "" {
		u.RawQuery = "redacted"
	}
	u.ForceQuery = false
	return u.String()
}

// stallReader aborts the request (through its context) when one Read waits
// longer than timeout for data. Only time spent inside Read counts, so a
// slow consumer is never mistaken for a stalled server.
type stallReader struct {
	body    io.ReadCloser
	ctx     context.Context
	cancel  context.CancelCauseFunc
	timeout time.Duration
	timer   *time.Timer
	once    sync.Once
}

func newStallReader(ctx context.Context, cancel context.CancelCauseFunc, body io.ReadCloser, timeout time.Duration) io.ReadCloser {
	r := &stallReader{body: body, ctx: ctx, cancel: cancel, timeout: timeout}
	r.timer = time.AfterFunc(timeout, func() {
		cancel(fmt.Errorf("no data for %s: %w", timeout, ErrStalled))
	})
	r.timer.Stop()
	return r
}

func (r *stallReader) Read(p []byte) (int, error) {
	r.timer.Reset(r.timeout)
	n, err := r.body.Read(p)
	r.timer.Stop()
	if err != nil && err != io.EOF {
		if cause := context.Cause(r.ctx); errors.Is(cause, ErrStalled) {
			err = cause
		}
	}
	return n, err
}

func (r *stallReader) Close() error {
	err := r.body.Close()
	r.once.Do(func() {
		r.timer.Stop()
		r.cancel(nil)
	})
	return err
}
