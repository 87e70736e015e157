package report

import (
	"context"
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nodespawn/nodespawn/internal/httpx"
)

// TestSend posts reports to a loopback HTTPS server that answers 503 to
// the first tries: the report arrives once the server recovers, with the
// token, over verified TLS, and the same idempotency key on every try.
func TestSend(t *testing.T) {
	var (
		mu    sync.Mutex
		tries int
		keys  []string
		got   Report
		auth  string
	)
	srv := httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		defer mu.Unlock()
		tries++
		keys = append(keys, r.Header.Get(httpx.IdempotencyKey))
		if r.Method != http.MethodPost || r.Header.Get("Content-Type") != "application/json" {
			http.Error(w, "want a JSON POST", http.StatusBadRequest)
			return
		}
		if tries <= 2 {
			http.Error(w, "warming up", http.StatusServiceUnavailable)
			return
		}
		auth = r.Header.Get("Authorization")
		b, _ := io.ReadAll(r.Body)
		if err := json.Unmarshal(b, &got); err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
		}
	}))
	defer srv.Close()
	tokenFile := filepath.Join(t.TempDir(), "token")
	if err := os.WriteFile(tokenFile, []byte("s3cr3t-token\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	client := httpx.NewClient(httpx.WithCACerts(srv.Certificate()),
		httpx.WithPolicy(httpx.Policy{Attempts: 5, Base: time.Millisecond, Max: 5 * time.Millisecond}))
	started := time.Date(2026, 11, 30, 5, 0, 0, 0, time.UTC)
	r := Report{Status: "error", Summary: "error: step rootfs:image: 503", Hostname: "vm-7", FailedStep: "rootfs:image",
		Reason: "503", Attempts: 3, ToolVersion: "test", Started: &started, Steps: []Step{{ID: "rootfs:image", Outcome: "failed", DurationMS: 1200}}}
	if err := Send(context.Background(), Target{URL: srv.URL + "/nodes?tenant=a", TokenFile: tokenFile, Client: client}, r); err != nil {
		t.Fatal(err)
	}
	if tries != 3 || keys[0] == "" || keys[0] != keys[2] {
		t.Errorf("%d tries with keys %q, want 3 with one key", tries, keys)
	}
	if auth != "Bearer s3cr3t-token" {
		t.Errorf("Authorization %q", auth)
	}
	r.Version = Version
	if got.Version != Version || got.FailedStep != r.FailedStep || got.Attempts != 3 || got.Steps[0] != r.Steps[0] || !got.Started.Equal(started) {
		t.Errorf("received %+v, sent %+v", got, r)
	}

	// TLS is verified: the same server with the system roots only fails,
	// and the error names the URL without its query.
	err := Send(context.Background(), Target{URL: srv.URL + "/nodes?tenant=a", Client: httpx.NewClient(httpx.WithPolicy(httpx.Policy{Attempts: 1}))}, r)
	if err == nil || !strings.Contains(err.Error(), "certificate") || strings.Contains(err.Error(), "tenant") {
		t.Errorf("an unverifiable server: %v", err)
	}
	// A refusal is reported with the server's words.
	bad := httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		http.Error(w, "unknown node", http.StatusForbidden)
	}))
	defer bad.Close()
	err = Send(context.Background(), Target{URL: bad.URL, Client: httpx.NewClient(httpx.WithCACerts(bad.Certificate()))}, r)
	if err == nil || !strings.Contains(err.Error(), "403") || !strings.Contains(err.Error(), "unknown node") {
		t.Errorf("a refusal: %v", err)
	}
}
