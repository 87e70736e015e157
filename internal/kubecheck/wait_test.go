package kubecheck

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"
)

// syncBuffer is a log sink safe for the logger's concurrent use.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

func testLogger(t *testing.T) (*slog.Logger, *syncBuffer) {
	buf := &syncBuffer{}
	return slog.New(slog.NewTextHandler(buf, &slog.HandlerOptions{Level: slog.LevelDebug})), buf
}

// fixedCreds returns creds every time and counts the calls.
func fixedCreds(creds Credentials, calls *int) func(context.Context) (Credentials, error) {
	return func(context.Context) (Credentials, error) {
		*calls++
		return creds, nil
	}
}

func waitOpts(f *fakeAPI, creds func(context.Context) (Credentials, error), since time.Time, log *slog.Logger) WaitOptions {
	return WaitOptions{
		APIServer: f.URL, CAPEM: f.ca.pem, NodeName: "e2e-node", Credentials: creds,
		Since: since, Interval: 5 * time.Millisecond, Timeout: 20 * time.Second, Logger: log,
	}
}

// The node goes NotReady, then Ready with the old machine's heartbeat
// (which must not count), then Ready with a new heartbeat. The
// credentials appear only at the third call.
func TestWaitReady(t *testing.T) {
	ca := newCA(t, "kubernetes")
	f := newFakeAPI(t, ca, tls.RequireAndVerifyClientCert)
	since := time.Now()
	old, fresh := since.Add(-2*time.Minute), since.Add(time.Second)
	f.setStates(func(n int) nodeState {
		switch {
		case n <= 2:
			return nodeState{ready: "False", reason: "KubeletNotReady", message: "container runtime network not ready", heartbeat: fresh, version: "v1.37.2"}
		case n <= 4:
			return nodeState{ready: "True", reason: "KubeletReady", heartbeat: old, version: "v1.36.0"}
		}
		return nodeState{ready: "True", reason: "KubeletReady", heartbeat: fresh, version: "v1.37.2"}
	})
	creds := ca.nodeCert(t, "e2e-node", ecKey)
	calls := 0
	credsFn := func(context.Context) (Credentials, error) {
		calls++
		if calls < 3 {
			return Credentials{}, fmt.Errorf("%w: /var/lib/kubelet/pki/kubelet-client-current.pem", ErrNoClientCert)
		}
		return creds, nil
	}
	log, logs := testLogger(t)
	n, err := WaitReady(context.Background(), waitOpts(f, credsFn, since, log))
	if err != nil {
		t.Fatal(err)
	}
	if !n.Ready || !n.LastHeartbeat.Equal(fresh.Truncate(time.Second)) || n.KubeletVersion != "v1.37.2" {
		t.Errorf("got %+v, want Ready with the new heartbeat", n)
	}
	if got := f.count(); got != 5 {
		t.Errorf("%d requests, want 5 (two NotReady, two stale Ready, one fresh)", got)
	}
	if calls != 3 {
		t.Errorf("Credentials called %d times, want 3 (until it succeeds, then kept)", calls)
	}
	for _, want := range []string{"waiting for the node to be Ready", "not bootstrapped", "KubeletNotReady: container runtime network not ready",
		"before the switch", "node is Ready", "kubeletVersion=v1.37.2"} {
		if !strings.Contains(logs.String(), want) {
			t.Errorf("the log does not say %q:\n%s", want, logs)
		}
	}
	if strings.Contains(logs.String(), "PRIVATE KEY") {
		t.Errorf("the log shows the key:\n%s", logs)
	}
}

// lastHeartbeatTime has whole seconds: one in Since's second counts, one
// a second earlier does not.
func TestWaitReadyHeartbeatSecond(t *testing.T) {
	ca := newCA(t, "kubernetes")
	f := newFakeAPI(t, ca, tls.RequireAndVerifyClientCert)
	since := time.Now().Truncate(time.Second).Add(700 * time.Millisecond)
	calls := 0
	creds := fixedCreds(ca.nodeCert(t, "e2e-node", ecKey), &calls)

	f.setState(nodeState{ready: "True", heartbeat: since.Truncate(time.Second)})
	if _, err := WaitReady(context.Background(), waitOpts(f, creds, since, slog.New(slog.DiscardHandler))); err != nil {
		t.Errorf("a heartbeat in Since's second: %v", err)
	}

	f.setState(nodeState{ready: "True", heartbeat: since.Truncate(time.Second).Add(-time.Second)})
	o := waitOpts(f, creds, since, slog.New(slog.DiscardHandler))
	o.Timeout = 200 * time.Millisecond
	_, err := WaitReady(context.Background(), o)
	wantErr(t, err, "before the switch")
}

func TestWaitReadyTimeout(t *testing.T) {
	ca := newCA(t, "kubernetes")
	f := newFakeAPI(t, ca, tls.RequireAndVerifyClientCert)
	f.setState(nodeState{ready: "False", reason: "KubeletNotReady", message: "container runtime network not ready: NetworkReady=false reason:NetworkPluginNotReady", heartbeat: time.Now()})
	calls := 0
	o := waitOpts(f, fixedCreds(ca.nodeCert(t, "e2e-node", ecKey), &calls), time.Now(), slog.New(slog.DiscardHandler))
	o.Timeout = 300 * time.Millisecond
	start := time.Now()
	_, err := WaitReady(context.Background(), o)
	if took := time.Since(start); took < o.Timeout || took > 10*time.Second {
		t.Errorf("gave up after %v, want about %v", took, o.Timeout)
	}
	if got, want := err.Error(), "node e2e-node not Ready after 300ms: KubeletNotReady: container runtime network not ready: NetworkReady=false reason:NetworkPluginNotReady"; got != want {
		t.Errorf("got  %q\nwant %q", got, want)
	}
	var nr *NotReadyError
	if !errors.As(err, &nr) || nr.Last == nil || nr.Last.Reason != "KubeletNotReady" {
		t.Errorf("want a *NotReadyError with the last Node, got %#v", err)
	}
	if !errors.Is(err, ErrNotReady) || !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("%v: want ErrNotReady and DeadlineExceeded", err)
	}
	if f.count() < 3 {
		t.Errorf("only %d polls in %v at %v", f.count(), o.Timeout, o.Interval)
	}
	if calls != 1 {
		t.Errorf("Credentials called %d times, want once", calls)
	}
}

// A poll that fails after the node was seen: the error says both.
func TestWaitReadyTimeoutLastError(t *testing.T) {
	ca := newCA(t, "kubernetes")
	f := newFakeAPI(t, ca, tls.RequireAndVerifyClientCert)
	f.setStates(func(n int) nodeState {
		if n == 1 {
			return nodeState{ready: "False", reason: "KubeletNotReady", message: "PLEG is not healthy", heartbeat: time.Now()}
		}
		return nodeState{code: 403, reason: "Forbidden", message: `nodes "e2e-node" is forbidden`}
	})
	calls := 0
	o := waitOpts(f, fixedCreds(ca.nodeCert(t, "e2e-node", ecKey), &calls), time.Now(), slog.New(slog.DiscardHandler))
	o.Timeout = 200 * time.Millisecond
	_, err := WaitReady(context.Background(), o)
	wantErr(t, err, "not Ready after 200ms", `403 Forbidden): nodes "e2e-node" is forbidden`, "last seen KubeletNotReady: PLEG is not healthy")
	if !errors.Is(err, ErrForbidden) {
		t.Errorf("%v: want ErrForbidden in the chain", err)
	}
}

func TestWaitReadyNoCredentials(t *testing.T) {
	ca := newCA(t, "kubernetes")
	f := newFakeAPI(t, ca, tls.RequireAndVerifyClientCert)
	calls := 0
	o := waitOpts(f, func(context.Context) (Credentials, error) {
		calls++
		return KubeletClientCert(t.TempDir())
	}, time.Now(), slog.New(slog.DiscardHandler))
	o.Timeout = 200 * time.Millisecond
	_, err := WaitReady(context.Background(), o)
	wantErr(t, err, "node e2e-node not Ready after 200ms: node credentials: the kubelet has not bootstrapped", "kubelet-client-current.pem")
	if !errors.Is(err, ErrNoClientCert) || calls < 3 || f.count() != 0 {
		t.Errorf("%v: %d calls, %d requests; want ErrNoClientCert, Credentials called each poll, no request", err, calls, f.count())
	}
}

// A 401 drops the credentials: the next poll asks for new ones (a
// rotated certificate, a new token).
func TestWaitReadyRefreshesRejectedCredentials(t *testing.T) {
	ca := newCA(t, "kubernetes")
	f := newFakeAPI(t, ca, tls.VerifyClientCertIfGiven)
	f.tokens["new-token"] = "system:node:e2e-node"
	f.setState(nodeState{ready: "True", heartbeat: time.Now()})
	var tokens []string
	credsFn := func(context.Context) (Credentials, error) {
		tok := "expired-token"
		if len(tokens) > 0 {
			tok = "new-token"
		}
		tokens = append(tokens, tok)
		return Credentials{Token: tok}, nil
	}
	n, err := WaitReady(context.Background(), waitOpts(f, credsFn, time.Now().Add(-time.Minute), slog.New(slog.DiscardHandler)))
	if err != nil || !n.Ready {
		t.Fatalf("got %v, %v", n, err)
	}
	if len(tokens) != 2 || f.count() != 2 {
		t.Errorf("tokens %q over %d requests, want one rejected then a new one", tokens, f.count())
	}
}

// A server the cluster CA does not verify will not change: give up at once.
func TestWaitReadyWrongCAFailsFast(t *testing.T) {
	ca := newCA(t, "kubernetes")
	f := newFakeAPI(t, ca, tls.RequireAndVerifyClientCert)
	calls := 0
	o := waitOpts(f, fixedCreds(ca.nodeCert(t, "e2e-node", ecKey), &calls), time.Now(), slog.New(slog.DiscardHandler))
	o.CAPEM = newCA(t, "other").pem
	start := time.Now()
	_, err := WaitReady(context.Background(), o)
	wantErr(t, err, "wait for node e2e-node", "not signed by the cluster CA")
	if time.Since(start) > 5*time.Second || errors.Is(err, ErrNotReady) {
		t.Errorf("%v after %v: want an immediate failure", err, time.Since(start))
	}
}

func TestWaitReadyCancelled(t *testing.T) {
	ca := newCA(t, "kubernetes")
	f := newFakeAPI(t, ca, tls.RequireAndVerifyClientCert)
	f.setState(nodeState{ready: "False", reason: "KubeletNotReady", heartbeat: time.Now()})
	ctx, cancel := context.WithCancel(context.Background())
	time.AfterFunc(100*time.Millisecond, cancel)
	calls := 0
	_, err := WaitReady(ctx, waitOpts(f, fixedCreds(ca.nodeCert(t, "e2e-node", ecKey), &calls), time.Now(), slog.New(slog.DiscardHandler)))
	wantErr(t, err, "(context canceled): KubeletNotReady")
	if !errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("%v: want Canceled", err)
	}
}

func TestShortDuration(t *testing.T) {
	for d, want := range map[time.Duration]string{
		10 * time.Minute:                      "10m",
		90 * time.Minute:                      "1h30m",
		2 * time.Hour:                         "2h",
		300 * time.Millisecond:                "300ms",
		10*time.Minute + 200*time.Microsecond: "10m",
		61 * time.Second:                      "1m1s",
	} {
		if got := shortDuration(d); got != want {
			t.Errorf("shortDuration(%v) = %q, want %q", d, got, want)
		}
	}
}

// A server that accepts the connection and never answers costs one
// RequestTimeout per poll, and the error says so.
func TestWaitReadyRequestTimeout(t *testing.T) {
	ca := newCA(t, "kubernetes")
	f := newFakeAPI(t, ca, tls.RequireAndVerifyClientCert)
	block := make(chan struct{})
	defer close(block)
	f.setState(nodeState{hang: block})
	calls := 0
	o := waitOpts(f, fixedCreds(ca.nodeCert(t, "e2e-node", ecKey), &calls), time.Now(), slog.New(slog.DiscardHandler))
	o.RequestTimeout = 50 * time.Millisecond
	o.Timeout = 400 * time.Millisecond
	_, err := WaitReady(context.Background(), o)
	wantErr(t, err, "not Ready after 400ms: no answer within 50ms (WaitOptions.RequestTimeout)")
}
