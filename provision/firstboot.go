package provision

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"strings"
	"syscall"
	"time"

	"github.com/nodespawn/nodespawn/apply"
	"github.com/nodespawn/nodespawn/internal/httpx"
	"github.com/nodespawn/nodespawn/internal/report"
	"github.com/nodespawn/nodespawn/internal/retry"
	"github.com/nodespawn/nodespawn/manifest"
	"github.com/nodespawn/nodespawn/status"
)

// FirstBootRetry paces the first-boot run's retries: a registry or mirror
// that is not up yet at boot gets a growing pause between whole runs.
var FirstBootRetry = retry.Policy{Attempts: 1 << 20, Base: 10 * time.Second, Max: 2 * time.Minute}

// FirstBootOptions are apply --first-boot's hidden settings (tests).
type FirstBootOptions struct {
	// Console is where the final status line goes (/dev/console).
	Console string
	// RetryWait, when set, is the first pause before a retry (tests).
	RetryWait time.Duration
}

// firstBoot is what nodespawn-firstboot.service runs: apply, again after
// a transient failure (a network error, a registry's 5xx or 429, a
// timeout; never bad input or a checksum mismatch) until the manifest's
// firstBoot.retryFor has passed, then the outcome as one line on the
// console, and the report home when the manifest asks for one.
func (a *Run) FirstBoot(ctx context.Context, fb FirstBootOptions) error {
	started := time.Now()
	a.refuse = true
	policy := FirstBootRetry
	if fb.RetryWait > 0 {
		policy.Base, policy.Max = fb.RetryWait, 12*fb.RetryWait
	}
	var err error
	attempt := 1
	for ; ; attempt++ {
		err = a.Once(ctx)
		reason, again := transient(err)
		if !again {
			break
		}
		retryFor := manifest.Duration(manifest.DefaultRetryFor)
		if a.manifest != nil {
			retryFor = manifest.Duration(a.manifest.FirstBoot.RetryFor)
		}
		wait := policy.Backoff(attempt)
		if time.Since(started)+wait > retryFor {
			slog.Error("giving up: the failure is transient, but firstBoot.retryFor has passed", "attempts", attempt, "retryFor", retryFor, "reason", reason)
			break
		}
		slog.Warn("apply failed for a transient reason; trying again", "attempt", attempt, "reason", reason, "wait", wait.Round(time.Second), "error", err)
		if werr := retry.Sleep(ctx, wait); werr != nil {
			return errors.Join(werr, err)
		}
	}
	line := firstBootLine(a, err)
	if werr := writeConsole(fb.Console, line); werr != nil {
		slog.Warn("could not write the outcome to the console", "console", fb.Console, "error", werr)
	}
	if a.manifest != nil && a.manifest.Report != nil {
		if rerr := a.sendReport(ctx, err, attempt); rerr != nil {
			slog.Error("could not send the report", "error", rerr)
		} else {
			slog.Info("report sent", "url", httpx.Redact(a.manifest.Report.URL))
		}
	}
	return err
}

// transient says whether err is worth a whole new run, and why.
func transient(err error) (string, bool) {
	if err == nil || ExitCode(err) == apply.ExitInput {
		return "", false
	}
	return httpx.Retryable(err)
}

// firstBootLine is the outcome for a person at the console.
func firstBootLine(a *Run, err error) string {
	var se *apply.StepError
	switch {
	case err == nil && a.plan != nil:
		return fmt.Sprintf("nodespawn: done: machine %s is running node %s", a.plan.Machine, a.plan.NodeName)
	case err == nil:
		return "nodespawn: done"
	case errors.As(err, &se):
		return fmt.Sprintf("nodespawn: error: step %s: %v", se.ID, se.Err)
	}
	return "nodespawn: error: " + strings.ReplaceAll(err.Error(), "\n", " ")
}

// writeConsole appends line to the console (a serial console user sees
// why a node did not come up).
func writeConsole(path, line string) error {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_APPEND|os.O_CREATE|syscall.O_NOCTTY, 0o600)
	if err != nil {
		return err
	}
	if _, err := f.WriteString(line + "\n"); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

// sendReport posts the outcome to the manifest's report.url.
func (a *Run) sendReport(ctx context.Context, runErr error, attempts int) error {
	rc := a.manifest.Report
	opts := []httpx.Option{httpx.WithLogger(slog.Default())}
	if rc.CACert != "" {
		certs, err := manifest.Certificates(rc.CACert)
		if err != nil {
			return fmt.Errorf("report.caCert: %w", err)
		}
		opts = append(opts, httpx.WithCACerts(certs...))
	}
	hostname, _ := os.Hostname()
	r := report.Report{Status: string(status.StateDone), Summary: "done", Hostname: hostname, Attempts: attempts, ToolVersion: a.ToolVersion}
	if a.plan != nil {
		r.Node, r.Machine, r.PlanDigest = a.plan.NodeName, a.plan.Machine, a.plan.Digest()
	}
	if d, err := a.manifest.Digest(); err == nil {
		r.ManifestDigest = d.String()
	}
	if runErr != nil {
		r.Status = string(status.StateError)
		r.Summary = strings.TrimPrefix(firstBootLine(a, runErr), "nodespawn: ")
		r.Reason = runErr.Error()
		var se *apply.StepError
		if errors.As(runErr, &se) {
			r.FailedStep, r.Reason = se.ID, se.Err.Error()
		}
	}
	if a.result != nil && a.result.Record != nil {
		rec := a.result.Record
		r.Started, r.Ended = &rec.Started, rec.Ended
		for _, t := range status.Blame(rec) {
			r.Steps = append(r.Steps, report.Step{ID: t.ID, Outcome: string(t.Outcome), DurationMS: t.DurationMS})
		}
	}
	// A report the run waits for, but not forever.
	ctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	return report.Send(ctx, report.Target{URL: rc.URL, TokenFile: rc.TokenFile, Client: httpx.NewClient(opts...)}, r)
}
