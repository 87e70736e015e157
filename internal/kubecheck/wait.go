package kubecheck

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"time"

	"github.com/nodespawn/nodespawn/internal/layout"
)

// Defaults of WaitOptions.
const (
	DefaultInterval = 5 * time.Second
	// DefaultTimeout is the switch's default wait for the Node.
	DefaultTimeout        = layout.DefaultReadyTimeout
	DefaultRequestTimeout = 30 * time.Second
)

// ErrNotReady is wrapped by WaitReady's error when the node did not
// become Ready in time.
var ErrNotReady = errors.New("node not Ready")

// WaitOptions configure WaitReady.
type WaitOptions struct {
	// APIServer and CAPEM are the cluster (kubernetes.apiServer and
	// kubernetes.caCert).
	APIServer string
	CAPEM     []byte
	// NodeName is the Node to wait for.
	NodeName string
	// Credentials returns the node's credentials (KubeletClientCert,
	// ExecCredential). They may not exist yet when waiting starts (the
	// kubelet is still bootstrapping), so it is called at each poll until
	// it succeeds; its error is then the poll's. Its result is kept, and
	// dropped again (it is called anew) when the API server refuses it: a
	// 401, or a TLS handshake that ended with an alert, as when the
	// kubelet rotated its certificate or an exec token expired.
	Credentials func(ctx context.Context) (Credentials, error)
	// Since is when the switch happened: a time after the old machine's
	// kubelet stopped. The node counts as Ready only when its Ready
	// condition is True and that condition's lastHeartbeatTime is not
	// before Since: the Node object outlives the machine, and a Ready
	// written by the old machine's kubelet (which the node lifecycle
	// controller leaves in place for its grace period, then turns to
	// Unknown without a new heartbeat) must not pass for the new one.
	// lastHeartbeatTime has whole seconds, so Since is compared truncated
	// to the second. The kubelet writes it from the same host clock, and
	// posts the node status as soon as it starts and whenever readiness
	// changes, so a new kubelet gives a fresh heartbeat at once. The zero
	// Since accepts any Ready.
	Since time.Time
	// Interval is the time between polls (DefaultInterval when zero).
	Interval time.Duration
	// Timeout bounds the whole wait (DefaultTimeout when zero); ctx may
	// end it earlier.
	Timeout time.Duration
	// RequestTimeout bounds one poll: the Credentials call, when made,
	// and the request (DefaultRequestTimeout when zero).
	RequestTimeout time.Duration
	// Logger gets the progress: the start, each change of the node's
	// state or of the error met, and the end (nil means slog.Default()).
	Logger *slog.Logger
}

// NotReadyError is WaitReady's error when the node was not Ready in time
// (or ctx ended first). It wraps ErrNotReady, the reason waiting stopped
// (context.DeadlineExceeded at Timeout), and the last poll's error.
type NotReadyError struct {
	NodeName string
	// Waited is how long WaitReady waited (Timeout when it ran out).
	Waited time.Duration
	// Last is the node as last read, nil if it never was.
	Last *Node
	// Err is the last poll's error, nil when the last poll read the node.
	Err error
	// Stopped is why waiting stopped: context.DeadlineExceeded when
	// Timeout ran out, otherwise the cause of ctx's end.
	Stopped error
	since   time.Time
}

func (e *NotReadyError) Error() string {
	var b strings.Builder
	fmt.Fprintf(&b, "node %s not Ready after %s", e.NodeName, shortDuration(e.Waited))
	if !errors.Is(e.Stopped, context.DeadlineExceeded) {
		fmt.Fprintf(&b, " (%v)", e.Stopped)
	}
	b.WriteString(": ")
	switch {
	case e.Err != nil && e.Last != nil:
		fmt.Fprintf(&b, "%v (the node was last seen %s)", e.Err, describe(e.Last, e.since))
	case e.Err != nil:
		b.WriteString(e.Err.Error())
	case e.Last != nil:
		b.WriteString(describe(e.Last, e.since))
	default:
		b.WriteString("no poll completed")
	}
	return b.String()
}

// Unwrap returns ErrNotReady, Stopped and Err.
func (e *NotReadyError) Unwrap() []error {
	errs := []error{ErrNotReady, e.Stopped}
	if e.Err != nil {
		errs = append(errs, e.Err)
	}
	return errs
}

// errTimedOut is the cause of WaitReady's own deadline.
var errTimedOut = errors.New("timed out")

// WaitReady polls the node (GetNode) every Interval until it is Ready
// with a heartbeat from Since on (see WaitOptions.Since), and returns it.
// It gives up after Timeout, or when ctx ends, with a *NotReadyError
// carrying the node's last state or the last error ("node e2e-node not
// Ready after 10m: KubeletNotReady: container runtime network not ready
// ..."). Errors that asking again cannot cure (a CA that does not verify
// the server, an invalid URL, CA or name) end the wait at once.
func WaitReady(ctx context.Context, o WaitOptions) (*Node, error) {
	log := o.Logger
	if log == nil {
		log = slog.Default()
	}
	interval := cmpOr(o.Interval, DefaultInterval)
	timeout := cmpOr(o.Timeout, DefaultTimeout)
	reqTimeout := cmpOr(o.RequestTimeout, DefaultRequestTimeout)
	if o.Credentials == nil {
		return nil, errors.New("wait for node: no Credentials function")
	}
	if !validNodeName(o.NodeName) {
		return nil, fmt.Errorf("wait for node: node name %q is not a valid Node name (a DNS subdomain)", o.NodeName)
	}
	since := o.Since.Truncate(time.Second)
	start := time.Now()
	ctx, cancel := context.WithTimeoutCause(ctx, timeout, errTimedOut)
	defer cancel()
	log.Info("waiting for the node to be Ready", "node", o.NodeName, "apiServer", o.APIServer,
		"heartbeatSince", since.UTC().Format(time.RFC3339), "timeout", timeout)

	var (
		creds     *Credentials
		last      *Node
		lastErr   error
		lastState string
	)
	ticker := time.NewTicker(interval)
	defer ticker.Stop()
	for {
		node, err := func() (*Node, error) {
			// One bound for the poll, credentials (an exec plugin) included.
			pctx, pcancel := context.WithTimeout(ctx, reqTimeout)
			defer pcancel()
			if creds == nil {
				c, err := o.Credentials(pctx)
				if err != nil {
					return nil, pollTimedOut(ctx, pctx, reqTimeout, fmt.Errorf("node credentials: %w", err))
				}
				creds = &c
			}
			n, err := GetNode(pctx, o.APIServer, o.CAPEM, *creds, o.NodeName)
			if err != nil && credentialsRefused(err) {
				creds = nil // ask for them again next time
			}
			return n, pollTimedOut(ctx, pctx, reqTimeout, err)
		}()
		if err == nil {
			last, lastErr = node, nil
			if fresh(node, since) {
				log.Info("node is Ready", "node", node.Name, "kubeletVersion", node.KubeletVersion,
					"heartbeat", node.LastHeartbeat.UTC().Format(time.RFC3339), "waited", time.Since(start).Round(time.Millisecond))
				return node, nil
			}
		}
		if ctx.Err() != nil {
			// The wait ended during the poll: an error then is the
			// cancellation, not news about the node.
			return nil, notReady(ctx, o.NodeName, start, timeout, last, lastErr, since)
		}
		if err != nil && permanent(err) {
			log.Error("node check cannot succeed", "node", o.NodeName, "error", err)
			return nil, fmt.Errorf("wait for node %s: %w", o.NodeName, err)
		}
		state := ""
		if err != nil {
			lastErr = err
			state = err.Error()
		} else {
			state = describe(node, since)
		}
		if state != lastState {
			log.Info("node not Ready yet", "node", o.NodeName, "state", state)
			lastState = state
		} else {
			log.Debug("node not Ready yet", "node", o.NodeName, "state", state)
		}
		select {
		case <-ctx.Done():
			return nil, notReady(ctx, o.NodeName, start, timeout, last, lastErr, since)
		case <-ticker.C:
		}
	}
}

// pollTimedOut says so when err is the poll's own bound running out (and
// not the whole wait's).
func pollTimedOut(ctx, pctx context.Context, d time.Duration, err error) error {
	if err != nil && ctx.Err() == nil && errors.Is(pctx.Err(), context.DeadlineExceeded) {
		return fmt.Errorf("no answer within %s (WaitOptions.RequestTimeout): %w", shortDuration(d), err)
	}
	return err
}

func notReady(ctx context.Context, name string, start time.Time, timeout time.Duration, last *Node, lastErr error, since time.Time) error {
	e := &NotReadyError{NodeName: name, Waited: time.Since(start), Last: last, Err: lastErr, Stopped: context.Cause(ctx), since: since}
	if errors.Is(e.Stopped, errTimedOut) {
		e.Waited, e.Stopped = timeout, context.DeadlineExceeded
	}
	return e
}

// fresh reports whether n is Ready with a heartbeat from since on.
func fresh(n *Node, since time.Time) bool {
	return n.Ready && !n.LastHeartbeat.Before(since)
}

// describe is n's state for a message, saying when a Ready is stale.
func describe(n *Node, since time.Time) string {
	if n.Ready && !fresh(n, since) {
		return fmt.Sprintf("Ready, but with a heartbeat from %s, before the switch at %s (not from the new machine's kubelet yet)",
			n.LastHeartbeat.UTC().Format(time.RFC3339), since.UTC().Format(time.RFC3339))
	}
	return n.String()
}

// shortDuration prints d without zero tails: 10m, 1h30m, 2.5s.
func shortDuration(d time.Duration) string {
	if d >= time.Second {
		d = d.Round(time.Second)
	} else {
		d = d.Round(time.Millisecond)
	}
	s := d.String()
	if strings.HasSuffix(s, "m0s") {
		s = strings.TrimSuffix(s, "0s")
	}
	if strings.HasSuffix(s, "h0m") {
		s = strings.TrimSuffix(s, "0m")
	}
	return s
}

func cmpOr(d, def time.Duration) time.Duration {
	if d > 0 {
		return d
	}
	return def
}
