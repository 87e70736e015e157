package httpx

import (
	"bytes"
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

// fastClient retries quickly so the tests do not sleep.
func fastClient(opts ...Option) *http.Client {
	opts = append([]Option{WithLogger(slog.New(slog.NewTextHandler(io.Discard, nil)))}, opts...)
	return NewClient(append([]Option{WithPolicy(Policy{Attempts: 4, Base: time.Millisecond, Max: 5 * time.Millisecond})}, opts...)...)
}

// resetConn closes the client's connection with a TCP RST.
func resetConn(t *testing.T, w http.ResponseWriter) {
	t.Helper()
	conn, _, err := w.(http.Hijacker).Hijack()
	if err != nil {
		t.Errorf("hijack: %v", err)
		return
	}
	conn.(*net.TCPConn).SetLinger(0)
	conn.Close()
}

func TestClientRetries(t *testing.T) {
	tests := []struct {
		name string
		// fail is what the server does on the first `failures` requests.
		fail     func(t *testing.T, w http.ResponseWriter)
		failures int
		method   string
		body     func() (io.Reader, bool) // body, and whether GetBody is set
		wantCode int
		wantHits int
	}{
		{name: "500 then ok", fail: status(500), failures: 2, method: "GET", wantCode: 200, wantHits: 3},
		{name: "503 then ok HEAD", fail: status(503), failures: 1, method: "HEAD", wantCode: 200, wantHits: 2},
		{name: "429 with Retry-After", fail: tooMany("0"), failures: 1, method: "GET", wantCode: 200, wantHits: 2},
		{name: "reset then ok", fail: resetConn, failures: 2, method: "GET", wantCode: 200, wantHits: 3},
		{name: "501 not retried", fail: status(501), failures: 5, method: "GET", wantCode: 501, wantHits: 1},
		{name: "404 not retried", fail: status(404), failures: 5, method: "GET", wantCode: 404, wantHits: 1},
		{name: "attempts bounded", fail: status(502), failures: 100, method: "GET", wantCode: 502, wantHits: 4},
		{name: "POST not retried", fail: status(500), failures: 1, method: "POST", wantCode: 500, wantHits: 1},
		{
			name: "PUT with unreplayable body not retried", fail: status(500), failures: 1, method: "PUT",
			body:     func() (io.Reader, bool) { return io.MultiReader(strings.NewReader("payload")), false },
			wantCode: 500, wantHits: 1,
		},
		{
			name: "PUT with replayable body retried", fail: status(500), failures: 1, method: "PUT",
			body:     func() (io.Reader, bool) { return strings.NewReader("payload"), true },
			wantCode: 200, wantHits: 2,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var hits atomic.Int32
			srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				n := hits.Add(1)
				got, _ := io.ReadAll(r.Body)
				if int(n) <= tt.failures {
					tt.fail(t, w)
					return
				}
				if tt.body != nil && string(got) != "payload" {
					t.Errorf("attempt %d got body %q, want the replayed payload", n, got)
				}
				io.WriteString(w, "ok")
			}))
			defer srv.Close()

			var body io.Reader
			if tt.body != nil {
				var replayable bool
				body, replayable = tt.body()
				if !replayable {
					// Hide the concrete type so NewRequest cannot set GetBody.
					body = struct{ io.Reader }{body}
				}
			}
			req, err := http.NewRequestWithContext(context.Background(), tt.method, srv.URL+"/x", body)
			if err != nil {
				t.Fatal(err)
			}
			resp, err := fastClient().Do(req)
			if err != nil {
				t.Fatalf("Do: %v", err)
			}
			io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			if resp.StatusCode != tt.wantCode {
				t.Errorf("status = %d, want %d", resp.StatusCode, tt.wantCode)
			}
			if got := int(hits.Load()); got != tt.wantHits {
				t.Errorf("server saw %d requests, want %d", got, tt.wantHits)
			}
		})
	}
}

func status(code int) func(*testing.T, http.ResponseWriter) {
	return func(_ *testing.T, w http.ResponseWriter) { http.Error(w, "injected", code) }
}

func tooMany(after string) func(*testing.T, http.ResponseWriter) {
	return func(_ *testing.T, w http.ResponseWriter) {
		w.Header().Set("Retry-After", after)
		http.Error(w, "slow down", http.StatusTooManyRequests)
	}
}

func TestClientStallDetector(t *testing.T) {
	release := make(chan struct{})
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Length", "1000")
		w.Write(bytes.Repeat([]byte("a"), 100))
		w.(http.Flusher).Flush()
		select { // hold the body open without sending more
		case <-release:
		case <-r.Context().Done():
		}
	}))
	defer srv.Close()
	defer close(release)

	resp, err := fastClient(WithStallTimeout(200 * time.Millisecond)).Get(srv.URL)
	if err != nil {
		t.Fatalf("Get: %v", err)
	}
	defer resp.Body.Close()
	n, err := io.Copy(io.Discard, resp.Body)
	if !errors.Is(err, ErrStalled) {
		t.Fatalf("read error = %v, want ErrStalled", err)
	}
	if n != 100 {
		t.Errorf("read %d bytes before the stall, want 100", n)
	}
}

func TestClientSlowConsumerIsNotStalled(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Write(bytes.Repeat([]byte("a"), 10))
	}))
	defer srv.Close()
	resp, err := fastClient(WithStallTimeout(50 * time.Millisecond)).Get(srv.URL)
	if err != nil {
		t.Fatalf("Get: %v", err)
	}
	defer resp.Body.Close()
	// The consumer waits longer than the stall timeout before reading:
	// that is not the server's fault and must not abort the body.
	time.Sleep(150 * time.Millisecond)
	b, err := io.ReadAll(resp.Body)
	if err != nil || len(b) != 10 {
		t.Fatalf("ReadAll = %d bytes, %v; want 10 bytes, nil", len(b), err)
	}
}

func TestClientVerifiesTLS(t *testing.T) {
	srv := httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, "ok")
	}))
	defer srv.Close()

	if _, err := fastClient().Get(srv.URL); err == nil {
		t.Fatal("Get of a server with an unknown CA succeeded; TLS must be verified")
	}
	resp, err := fastClient(WithCACerts(srv.Certificate())).Get(srv.URL)
	if err != nil {
		t.Fatalf("Get with the server's CA added: %v", err)
	}
	resp.Body.Close()
}

// TestClientWithoutProxy: the default client takes proxies from the
// environment; WithoutProxy goes direct and keeps the retries. The proxy
// function is inspected rather than exercised because net/http reads the
// environment once per process and never proxies loopback addresses.
func TestClientWithoutProxy(t *testing.T) {
	base := func(c *http.Client) *http.Transport {
		t.Helper()
		rt, ok := c.Transport.(*retryTransport)
		if !ok {
			t.Fatalf("transport is %T, want the retrying transport", c.Transport)
		}
		return rt.base.(*http.Transport)
	}
	if base(NewClient()).Proxy == nil {
		t.Error("the default client ignores HTTP(S)_PROXY")
	}
	if base(NewClient(WithoutProxy())).Proxy != nil {
		t.Error("WithoutProxy: the client still uses a proxy function")
	}
}

func TestRetryAfter(t *testing.T) {
	now := time.Date(2026, 11, 28, 12, 0, 0, 0, time.UTC)
	tests := []struct {
		in   string
		want time.Duration
	}{
		{"", 0},
		{"3", 3 * time.Second},
		{"junk", 0},
		{"-4", 0},
		{"100000", maxRetryAfter},
		{now.Add(10 * time.Second).Format(http.TimeFormat), 10 * time.Second},
		{now.Add(-10 * time.Second).Format(http.TimeFormat), 0},
	}
	for _, tt := range tests {
		if got := retryAfter(tt.in, now); got != tt.want {
			t.Errorf("retryAfter(%q) = %v, want %v", tt.in, got, tt.want)
		}
	}
}
