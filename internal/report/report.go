// Package report sends the outcome of a first-boot run home, the way
// cloud-init's phone_home does: one JSON POST to an operator's URL when the
// run ends, retried by the project's HTTP client, TLS verified, with an
// optional bearer token. Nothing secret is in it: the status, the failed
// step and its reason (apply's errors never quote secrets), the timings,
// the node, the machine and versions.
package report

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"strings"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/nodespawn/nodespawn/internal/httpx"
)

// Version identifies the JSON shape of a Report.
const Version = "nodespawn.dev/report/v1"

// Report is what is sent.
type Report struct {
	Version string `json:"version"`
	// Status is done, error or degraded (status.State); Summary its line.
	Status  string `json:"status"`
	Summary string `json:"summary"`
	// Hostname is the host's name, so a report can be told from another
	// even when apply failed before the node had a name.
	Hostname string `json:"hostname"`
	Node     string `json:"node,omitempty"`
	Machine  string `json:"machine,omitempty"`
	// FailedStep and Reason are set when a step failed.
	FailedStep string `json:"failedStep,omitempty"`
	Reason     string `json:"reason,omitempty"`
	// Attempts is how many times the run was tried (first-boot retries).
	Attempts       int        `json:"attempts"`
	ToolVersion    string     `json:"toolVersion"`
	ManifestDigest string     `json:"manifestDigest,omitempty"`
	PlanDigest     string     `json:"planDigest,omitempty"`
	Started        *time.Time `json:"started,omitempty"`
	Ended          *time.Time `json:"ended,omitempty"`
	// Steps are the steps that ran, longest first, with their durations.
	Steps []Step `json:"steps,omitempty"`
}

// Step is one step's outcome and duration.
type Step struct {
	ID         string `json:"id"`
	Outcome    string `json:"outcome"`
	DurationMS int64  `json:"durationMs"`
}

// Target is where a report goes.
type Target struct {
	// URL receives the POST: https (the manifest refuses anything else).
	URL string
	// TokenFile, when set, holds a bearer token sent in Authorization
	// (read at send time, never logged).
	TokenFile string
	// Client is the project's HTTP client (retries, TLS verified).
	Client *http.Client
}

// maxAnswer bounds how much of an error answer is quoted.
const maxAnswer = 512

// Send posts r to t.URL and fails unless the answer is 2xx. Errors name
// the URL without its query or credentials.
func Send(ctx context.Context, t Target, r Report) error {
	where := httpx.Redact(t.URL)
	if t.Client == nil {
		return fmt.Errorf("report to %s: no HTTP client", where)
	}
	r.Version = Version
	body, err := json.Marshal(r)
	if err != nil {
		return fmt.Errorf("report to %s: %w", where, err)
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, t.URL, bytes.NewReader(body))
	if err != nil {
		return fmt.Errorf("report to %s: %w", where, httpx.WithoutURL(err))
	}
	// With a replayable body and an idempotency key the client retries
	// the POST like any other request; the key lets the server tell a
	// repeat from a second report.
	req.GetBody = func() (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(body)), nil }
	req.Header.Set(httpx.IdempotencyKey, digest.FromBytes(body).Encoded()[:32])
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("User-Agent", "nodespawn")
	if t.TokenFile != "" {
		tok, err := os.ReadFile(t.TokenFile)
		if err != nil {
			return fmt.Errorf("report to %s: read the token: %w", where, err)
		}
		req.Header.Set("Authorization", "Bearer "+strings.TrimSpace(string(tok)))
	}
	resp, err := t.Client.Do(req)
	if err != nil {
		return fmt.Errorf("report to %s: %w", where, httpx.WithoutURL(err))
	}
	defer resp.Body.Close()
	if resp.StatusCode/100 != 2 {
		snippet, _ := io.ReadAll(io.LimitReader(resp.Body, maxAnswer))
		return fmt.Errorf("report to %s: %s: %s", where, resp.Status, strings.TrimSpace(string(snippet)))
	}
	return nil
}
