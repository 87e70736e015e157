package httpx_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/nodespawn/nodespawn/internal/confine"
	"github.com/nodespawn/nodespawn/internal/download"
	"github.com/nodespawn/nodespawn/internal/httpx"
	"github.com/nodespawn/nodespawn/plan"
)

// TestPolicy is the one test of the retry policy: a loopback server fails
// in each way, and the test counts the requests it sees, once for a bare
// request through the client (the transport alone) and once for a whole
// download (the transport plus the downloader's body-resume loop), both
// under the same Policy. A failure the transport retries must not be
// retried again by the resume loop: a persistent 5xx costs Attempts
// requests in all, not Attempts squared.
func TestPolicy(t *testing.T) {
	const attempts = 3
	policy := httpx.Policy{Attempts: attempts, Base: time.Millisecond, Max: 2 * time.Millisecond}
	const stall = 200 * time.Millisecond
	body := bytes.Repeat([]byte("nodespawn\n"), 20<<10)
	half := len(body) / 2

	// What the server does with request number n (1-based); cancel ends
	// the context of the request being served.
	type behaviour func(w http.ResponseWriter, r *http.Request, n int, cancel context.CancelFunc)
	serve := func(w http.ResponseWriter, r *http.Request) {
		http.ServeContent(w, r, "", time.Time{}, bytes.NewReader(body))
	}
	status := func(code int) behaviour {
		return func(w http.ResponseWriter, r *http.Request, _ int, _ context.CancelFunc) {
			http.Error(w, "injected", code)
		}
	}
	// reset drops the connection with a TCP RST, after sending the
	// headers and half the body when midBody is set.
	reset := func(midBody bool) behaviour {
		return func(w http.ResponseWriter, r *http.Request, _ int, _ context.CancelFunc) {
			conn, bufrw, err := w.(http.Hijacker).Hijack()
			if err != nil {
				t.Errorf("hijack: %v", err)
				return
			}
			if midBody {
				fmt.Fprintf(bufrw, "HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n", len(body))
				bufrw.Write(body[:half])
				bufrw.Flush()
			}
			conn.(*net.TCPConn).SetLinger(0)
			conn.Close()
		}
	}
	// stalled sends the headers and the first sent bytes of the body, then
	// nothing until the client gives up.
	stalled := func(sent int) behaviour {
		return func(w http.ResponseWriter, r *http.Request, _ int, _ context.CancelFunc) {
			w.Header().Set("Content-Length", fmt.Sprint(len(body)))
			w.WriteHeader(http.StatusOK)
			w.Write(body[:sent])
			w.(http.Flusher).Flush()
			<-r.Context().Done()
		}
	}
	// first answers the first `times` requests with b and serves the
	// file after that.
	first := func(times int, b behaviour) behaviour {
		return func(w http.ResponseWriter, r *http.Request, n int, cancel context.CancelFunc) {
			if n <= times {
				b(w, r, n, cancel)
				return
			}
			serve(w, r)
		}
	}

	tests := []struct {
		name  string
		serve behaviour
		// clientHits is what one GET through the client costs; clientReason
		// is what Retryable says of its outcome ("" when it succeeds, "-"
		// when Retryable refuses it), with alternatives split by "|".
		clientHits   int
		clientReason string
		// downloadHits is what a whole download costs; downloadErr is part
		// of its error ("" when it succeeds).
		downloadHits int
		downloadErr  string
		minDuration  time.Duration
	}{
		{name: "ok", serve: first(0, nil),
			clientHits: 1, downloadHits: 1},
		{name: "connection reset", serve: reset(false),
			clientHits: attempts, clientReason: "connection reset",
			downloadHits: attempts, downloadErr: "connection reset"},
		{name: "persistent 500", serve: status(500),
			clientHits: attempts, clientReason: "500 Internal Server Error",
			downloadHits: attempts, downloadErr: "500 Internal Server Error"},
		{name: "persistent 503", serve: status(503),
			clientHits: attempts, clientReason: "503 Service Unavailable",
			downloadHits: attempts, downloadErr: "503 Service Unavailable"},
		{name: "503 then ok", serve: first(1, status(503)),
			clientHits: 2, downloadHits: 2},
		{name: "429 with Retry-After", serve: first(1, func(w http.ResponseWriter, r *http.Request, _ int, _ context.CancelFunc) {
			w.Header().Set("Retry-After", "1")
			http.Error(w, "slow down", http.StatusTooManyRequests)
		}), clientHits: 2, downloadHits: 2, minDuration: time.Second},
		{name: "stalled before the body", serve: stalled(0),
			clientHits: 1, clientReason: "stalled",
			downloadHits: attempts, downloadErr: "no data for"},
		{name: "stalled mid-body", serve: stalled(half),
			clientHits: 1, clientReason: "stalled",
			downloadHits: attempts, downloadErr: "no data for"},
		{name: "reset mid-body, then ok", serve: first(1, reset(true)),
			clientHits: 1, clientReason: "connection reset|connection closed early",
			downloadHits: 2},
		{name: "reset mid-body, then persistent 500", serve: func(w http.ResponseWriter, r *http.Request, n int, cancel context.CancelFunc) {
			if n == 1 {
				reset(true)(w, r, n, cancel)
				return
			}
			http.Error(w, "injected", 500)
		}, clientHits: 1, clientReason: "connection reset|connection closed early",
			// The broken body is resumed once; the transport spends the
			// Policy on the resume request and the loop stops there.
			downloadHits: 1 + attempts, downloadErr: "500 Internal Server Error"},
		{name: "404", serve: status(404),
			clientHits: 1, clientReason: "-", downloadHits: 1, downloadErr: "404 Not Found"},
		{name: "501", serve: status(501),
			clientHits: 1, clientReason: "-", downloadHits: 1, downloadErr: "501 Not Implemented"},
		{name: "context cancelled", serve: func(w http.ResponseWriter, r *http.Request, _ int, cancel context.CancelFunc) {
			cancel()
			<-r.Context().Done()
		}, clientHits: 1, clientReason: "-", downloadHits: 1, downloadErr: "context canceled"},
		{name: "wrong bytes", serve: func(w http.ResponseWriter, r *http.Request, _ int, _ context.CancelFunc) {
			w.Write(bytes.ToUpper(body))
		}, clientHits: 1, downloadHits: 1, downloadErr: "sha256 mismatch"},
	}
	quiet := slog.New(slog.NewTextHandler(io.Discard, nil))
	client := httpx.NewClient(httpx.WithPolicy(policy), httpx.WithStallTimeout(stall), httpx.WithLogger(quiet))
	root, err := confine.Open("/")
	if err != nil {
		t.Fatal(err)
	}
	defer root.Close()

	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var hits atomic.Int32
			var mu sync.Mutex
			var cancelCurrent context.CancelFunc
			srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				mu.Lock()
				cancel := cancelCurrent
				mu.Unlock()
				tt.serve(w, r, int(hits.Add(1)), cancel)
			}))
			defer srv.Close()
			newContext := func() context.Context {
				hits.Store(0)
				ctx, cancel := context.WithCancel(context.Background())
				t.Cleanup(cancel)
				mu.Lock()
				cancelCurrent = cancel
				mu.Unlock()
				return ctx
			}

			t.Run("client", func(t *testing.T) {
				start := time.Now()
				outcome := get(newContext(), client, srv.URL+"/tool")
				elapsed := time.Since(start)
				if got := int(hits.Load()); got != tt.clientHits {
					t.Errorf("server saw %d requests, want %d (outcome: %v)", got, tt.clientHits, outcome)
				}
				reason, transient := httpx.Retryable(outcome)
				switch {
				case tt.clientReason == "" && outcome != nil:
					t.Errorf("outcome %v, want success", outcome)
				case tt.clientReason == "-" && (outcome == nil || transient):
					t.Errorf("outcome %v: Retryable = %q, %v; want a failure it refuses", outcome, reason, transient)
				case tt.clientReason != "" && tt.clientReason != "-" && (!transient || !slices.Contains(strings.Split(tt.clientReason, "|"), reason)):
					t.Errorf("outcome %v: Retryable = %q, %v; want %q, true", outcome, reason, transient, tt.clientReason)
				}
				if elapsed < tt.minDuration {
					t.Errorf("took %s, want at least %s (Retry-After)", elapsed, tt.minDuration)
				}
			})

			t.Run("download", func(t *testing.T) {
				dir := t.TempDir()
				f := &download.Fetcher{Client: client, Root: root, CacheDir: filepath.Join(dir, "cache"), Log: quiet}
				d := plan.Download{Name: "tool", URL: srv.URL + "/tool", SHA256: digest.FromBytes(body).Encoded(), Dest: filepath.Join(dir, "bin", "tool")}
				start := time.Now()
				_, err := f.Download(newContext(), d, root, d.Dest)
				elapsed := time.Since(start)
				if got := int(hits.Load()); got != tt.downloadHits {
					t.Errorf("server saw %d requests, want %d (error: %v)", got, tt.downloadHits, err)
				}
				switch {
				case tt.downloadErr == "" && err != nil:
					t.Errorf("Download: %v", err)
				case tt.downloadErr != "" && (err == nil || !strings.Contains(err.Error(), tt.downloadErr)):
					t.Errorf("Download error = %v, want one containing %q", err, tt.downloadErr)
				}
				if elapsed < tt.minDuration {
					t.Errorf("took %s, want at least %s (Retry-After)", elapsed, tt.minDuration)
				}
			})
		})
	}
}

// get does one GET through client and reads the whole body. Its outcome
// is nil, the error, or the failed answer as an *httpx.StatusError.
func get(ctx context.Context, client *http.Client, url string) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return err
	}
	resp, err := client.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return httpx.NewStatusError(resp)
	}
	_, err = io.Copy(io.Discard, resp.Body)
	return err
}

// TestRetryableRefuses covers the failures no server is needed to make:
// the caller giving up, and content that is not what was promised.
func TestRetryableRefuses(t *testing.T) {
	for _, err := range []error{
		context.Canceled,
		fmt.Errorf("get: %w", context.DeadlineExceeded),
		errors.New("sha256 mismatch: expected sha256:aa, got sha256:bb"),
		&httpx.StatusError{Code: 416, Status: "416 Requested Range Not Satisfiable"},
		nil,
	} {
		if reason, ok := httpx.Retryable(err); ok {
			t.Errorf("Retryable(%v) = %q, true; want false", err, reason)
		}
	}
	// A stall is reported by cancelling the request with ErrStalled as
	// the cause; that cancellation is the server's fault, not the caller's.
	if reason, ok := httpx.Retryable(fmt.Errorf("no data for 1s: %w", httpx.ErrStalled)); !ok || reason != "stalled" {
		t.Errorf("Retryable(stall) = %q, %v; want \"stalled\", true", reason, ok)
	}
}
