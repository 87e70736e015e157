// Package httpx is nodespawn's one HTTP client.
//
// NewClient returns an *http.Client whose transport retries transient
// failures of idempotent requests and aborts responses whose bodies stall.
// Every package that talks HTTP (downloads, the OCI registry client, image
// pushes) uses it, so retry, timeout and TLS behaviour is the same
// everywhere.
//
// How retries compose: one Policy bounds every retry, and Retryable is the
// one judgement of what is worth retrying. The transport retries a
// request (a failed connection, a 429, a 5xx) up to Policy.Attempts times
// and then returns the last answer. A body that breaks off after the
// answer arrived (a reset, a stall, a short read) is the caller's to
// resume; internal/download and internal/oci do so with the same Policy
// (PolicyOf) and resume only such broken bodies, never a request the
// transport already gave up on, so a persistent 5xx costs Policy.Attempts
// requests in all.
package httpx

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"sync"
	"time"

	"github.com/nodespawn/nodespawn/internal/redact"
	"github.com/nodespawn/nodespawn/internal/retry"
)

// Timeouts of NewClient's transport. There is deliberately no
// whole-request timeout: a large download on a slow link is fine as long
// as bytes keep coming.
const (
	// DefaultStallTimeout is how long a body read may wait for a byte;
	// WithStallTimeout changes it.
	DefaultStallTimeout = 60 * time.Second
	// headerTimeout bounds the wait for response headers once the request
	// is written: a server that accepted the connection but never answers
	// is as stuck as a stalled body.
	headerTimeout = 60 * time.Second
)

type clientConfig struct {
	policy       Policy
	stallTimeout time.Duration
	roots        *x509.CertPool
	extraCAs     []*x509.Certificate
	clientCert   *tls.Certificate
	logger       *slog.Logger
	direct       bool
}

// Option configures NewClient or NewTransport.
type Option func(*clientConfig)

// WithPolicy sets how requests are retried (default DefaultPolicy).
func WithPolicy(p Policy) Option {
	return func(c *clientConfig) { c.policy = p }
}

// WithStallTimeout sets how long a response body read may wait without
// receiving a byte before the request is aborted with ErrStalled.
func WithStallTimeout(d time.Duration) Option {
	return func(c *clientConfig) {
		if d > 0 {
			c.stallTimeout = d
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

// WithRoots verifies servers against pool alone instead of the system
// roots (a cluster's own CA); WithCACerts adds to it. Verification is
// never turned off.
func WithRoots(pool *x509.CertPool) Option {
	return func(c *clientConfig) {
		c.roots = pool
	}
}

// WithClientCert presents cert when a server asks for a client
// certificate, whatever CAs the server names as acceptable (as client-go
// does): a certificate the server does not trust is then refused in the
// handshake, in words, instead of silently left out.
func WithClientCert(cert tls.Certificate) Option {
	return func(c *clientConfig) {
		c.clientCert = &cert
	}
}

// WithoutProxy makes the client connect directly, whatever HTTP(S)_PROXY
// says: for link-local services such as a cloud's instance metadata, which
// a proxy cannot reach (and Azure's refuses requests that went through one).
func WithoutProxy() Option {
	return func(c *clientConfig) {
		c.direct = true
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
//   - is NewTransport's (TLS, proxy, timeouts);
//   - aborts a response whose body delivers no byte for the stall timeout;
//   - retries idempotent requests (GET, HEAD, OPTIONS, PUT, DELETE, and
//     any request with an Idempotency-Key header) whose body is absent or
//     replayable (Request.GetBody) when Retryable says
//     the failure is transient, with the Policy's backoff or the server's
//     Retry-After, at most Policy.Attempts times. The last response or
//     error is returned as is.
//
// The client has no overall Timeout; use the request's context to bound a call.
func NewClient(opts ...Option) *http.Client {
	cfg := newConfig(opts)
	return &http.Client{Transport: &retryTransport{base: newTransport(cfg), cfg: cfg}}
}

// NewTransport returns the transport under NewClient's retries, for a
// caller that does its own (one request a poll loop repeats, say). It:
//   - verifies TLS (1.2 or later) against the system roots, or WithRoots'
//     pool, plus any WithCACerts, and presents WithClientCert's
//     certificate when asked;
//   - honours HTTP(S)_PROXY/NO_PROXY, unless WithoutProxy;
//   - bounds dialing (30 s), the TLS handshake (15 s) and the wait for
//     response headers (60 s), but not the body.
//
// WithPolicy, WithStallTimeout and WithLogger are NewClient's and do
// nothing here.
func NewTransport(opts ...Option) *http.Transport {
	return newTransport(newConfig(opts))
}

func newConfig(opts []Option) clientConfig {
	cfg := clientConfig{
		policy:       DefaultPolicy,
		stallTimeout: DefaultStallTimeout,
		logger:       slog.Default(),
	}
	for _, o := range opts {
		o(&cfg)
	}
	return cfg
}

func newTransport(cfg clientConfig) *http.Transport {
	tlsConfig := &tls.Config{MinVersion: tls.VersionTLS12}
	if cfg.roots != nil || len(cfg.extraCAs) > 0 {
		pool := cfg.roots
		if pool != nil {
			pool = pool.Clone()
		} else if sys, err := x509.SystemCertPool(); err == nil && sys != nil {
			pool = sys
		} else {
			pool = x509.NewCertPool()
		}
		for _, c := range cfg.extraCAs {
			pool.AddCert(c)
		}
		tlsConfig.RootCAs = pool
	}
	if cert := cfg.clientCert; cert != nil {
		tlsConfig.GetClientCertificate = func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return cert, nil }
	}
	proxy := http.ProxyFromEnvironment
	if cfg.direct {
		proxy = nil
	}
	return &http.Transport{
		Proxy: proxy,
		DialContext: (&net.Dialer{
			Timeout:   30 * time.Second,
			KeepAlive: 30 * time.Second,
		}).DialContext,
		TLSClientConfig:       tlsConfig,
		ForceAttemptHTTP2:     true,
		TLSHandshakeTimeout:   15 * time.Second,
		ResponseHeaderTimeout: headerTimeout,
		ExpectContinueTimeout: time.Second,
		IdleConnTimeout:       90 * time.Second,
		MaxIdleConnsPerHost:   8,
	}
}

// PolicyOf is the Policy c's transport retries with, for a loop that
// resumes bodies c returned; DefaultPolicy for a client NewClient did not
// make (or nil).
func PolicyOf(c *http.Client) Policy {
	if c != nil {
		if t, ok := c.Transport.(*retryTransport); ok {
			return t.cfg.policy
		}
	}
	return DefaultPolicy
}

// retryTransport wraps a base transport with retries and stall detection.
type retryTransport struct {
	base http.RoundTripper
	cfg  clientConfig
}

func (t *retryTransport) RoundTrip(req *http.Request) (*http.Response, error) {
	replayable := idempotent(req) && (req.Body == nil || req.Body == http.NoBody || req.GetBody != nil)
	attempts := t.cfg.policy.Tries()
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

		failure := err
		if err == nil && resp.StatusCode >= 400 {
			failure = &StatusError{Code: resp.StatusCode, Status: resp.Status}
		}
		reason, transient := Retryable(failure)
		if !transient || !replayable || attempt >= attempts || req.Context().Err() != nil {
			if err != nil {
				cancel(nil)
				return nil, err
			}
			resp.Body = newStallReader(ctx, cancel, resp.Body, t.cfg.stallTimeout)
			return resp, nil
		}
		wait := time.Duration(0)
		if resp != nil {
			wait = retryAfter(resp.Header.Get("Retry-After"), time.Now())
			// Drain a little so the connection can be reused, then drop it.
			_, _ = io.CopyN(io.Discard, resp.Body, 64<<10)
			resp.Body.Close()
		}
		cancel(nil)
		if wait == 0 {
			wait = t.cfg.policy.Backoff(attempt)
		}
		t.cfg.logger.Warn("retrying HTTP request",
			"method", req.Method, "url", redactURL(req), "attempt", attempt,
			"maxAttempts", attempts, "reason", reason, "wait", wait.Round(time.Millisecond))
		if err := retry.Sleep(req.Context(), wait); err != nil {
			return nil, fmt.Errorf("%s %s: %w (after %s)", req.Method, redactURL(req), err, reason)
		}
	}
}

// IdempotencyKey is the header that makes a POST safe to retry: the
// server can tell a repeat from a new request by it.
const IdempotencyKey = "Idempotency-Key"

func idempotent(req *http.Request) bool {
	switch req.Method {
	case "", http.MethodGet, http.MethodHead, http.MethodOptions, http.MethodPut, http.MethodDelete:
		return true
	}
	return req.Header.Get(IdempotencyKey) != ""
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
	return redact.URL(req.URL.String())
}

// Redact hides a URL's password (or token user) and query, which may
// carry credentials or signed tokens, before it goes into an error or a
// log line: redact.URL, for the client's callers.
func Redact(raw string) string { return redact.URL(raw) }

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
