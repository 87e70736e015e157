package main

import (
	"encoding/json"
	"encoding/pem"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nodespawn/nodespawn/apply"
	"github.com/nodespawn/nodespawn/internal/httpx"
	"github.com/nodespawn/nodespawn/internal/report"
	"github.com/nodespawn/nodespawn/state"
	"github.com/nodespawn/nodespawn/status"
)

// TestStatusWaitsForFirstBoot: on a tree whose first-boot unit has not
// run, status --wait blocks; a real apply into the tree ends the wait with
// "done" and exit 0; --timings then shows the run. A failed apply gives
// "error" with the step, and exit 1.
func TestStatusWaitsForFirstBoot(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: the rootfs keeps the image's owners")
	}
	work := t.TempDir()
	layout := filepath.Join(work, "layout")
	buildLayout(t, layout)
	_, srv := newMirror(t)
	root := filepath.Join(work, "root")
	if err := apply.InstallFirstboot(root, ""); err != nil {
		t.Fatal(err)
	}
	mf := filepath.Join(work, "node.yaml")
	if err := os.WriteFile(mf, []byte(pipelineManifest(layout, srv.URL, "")), 0o600); err != nil {
		t.Fatal(err)
	}

	type result struct {
		code     int
		out, err string
	}
	waited := make(chan result, 1)
	go func() {
		code, out, errOut := cli(t, "", "status", "--wait", "--root", root, "-o", "json")
		waited <- result{code, out, errOut}
	}()
	select {
	case r := <-waited:
		t.Fatalf("status --wait returned before any run: exit %d\n%s%s", r.code, r.out, r.err)
	case <-time.After(3 * statusPoll):
	}
	if code, out, errOut := cli(t, "", "apply", "-f", mf, "--root", root); code != 0 {
		t.Fatalf("apply: exit %d\n%s\n%s", code, out, errOut)
	}
	var r result
	select {
	case r = <-waited:
	case <-time.After(30 * time.Second):
		t.Fatal("status --wait did not return after the run")
	}
	var st status.Status
	if err := json.Unmarshal([]byte(r.out), &st); err != nil || r.code != 0 || st.State != status.StateDone || st.Version != status.Version {
		t.Fatalf("status --wait: exit %d, %+v (%v)\n%s", r.code, st, err, r.err)
	}

	// Not the running host: the host and systemd steps were skipped, and
	// status says so rather than a bare "done".
	skipped := st.Outcomes[state.OutcomeSkipped]
	if skipped == 0 || len(st.Skipped) == 0 || st.Source != mf {
		t.Errorf("status -o json: %d skipped (%+v), source %q; want the skipped steps and %s", skipped, st.Skipped, st.Source, mf)
	}
	code, out, _ := cli(t, "", "status", "--root", root, "--timings", "--long")
	wantFirst := fmt.Sprintf("done, %d of %d steps skipped", skipped, st.Total)
	if code != 0 || !strings.HasPrefix(out, wantFirst) || !strings.Contains(out, "critical path") || !strings.Contains(out, "rootfs:image") ||
		!strings.Contains(out, "\nread from:    "+mf+"\n") || !strings.Contains(out, "\nskipped:      ") || !strings.Contains(out, "acts on the running host, and the root is "+root) ||
		!strings.Contains(out, fmt.Sprintf(", %d skipped\n", skipped)) {
		t.Errorf("status --timings --long: exit %d, want it to start %q, name the source and list the skipped steps\n%s", code, wantFirst, out)
	}

	// A root that is not there is bad input, not "not run".
	code, out, errOut := cli(t, "", "status", "--root", filepath.Join(work, "nonexistent"))
	if code != 2 || out != "" || !strings.Contains(errOut, "does not exist") {
		t.Errorf("status --root nonexistent: exit %d\n%s%s", code, out, errOut)
	}

	// A run that fails: exit 1, the step named.
	bad := filepath.Join(work, "bad.yaml")
	wrong := strings.Repeat("ab", 32)
	if err := os.WriteFile(bad, []byte(pipelineManifest(layout, srv.URL, "  runc:\n    sha256: \""+wrong+"\"\n")), 0o600); err != nil {
		t.Fatal(err)
	}
	root2 := filepath.Join(work, "root2")
	cli(t, "", "apply", "-f", bad, "--root", root2)
	code, out, _ = cli(t, "", "status", "--wait", "--root", root2)
	if code != 1 || !strings.HasPrefix(out, "error: step rootfs:download:runc: ") || !strings.Contains(out, wrong) {
		t.Errorf("status after a failed run: exit %d\n%s", code, out)
	}
}

// TestFirstBootRetriesAndReports runs apply as the first-boot unit does,
// against a mirror that answers 503 to each path more often than one
// run's HTTP retries cover: the run fails, is tried again after a pause and
// succeeds; the console gets the outcome line and a loopback HTTPS server
// gets the report, over verified TLS with the bearer token, without the
// bootstrap token. A manifest that is bad input is not retried.
func TestFirstBootRetriesAndReports(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: the rootfs keeps the image's owners")
	}
	work := t.TempDir()
	layout := filepath.Join(work, "layout")
	buildLayout(t, layout)
	mir, srv := newMirror(t)
	// One more than a request's retries: the first run fails.
	mir.failFirst = httpx.DefaultPolicy.Attempts + 1

	var (
		mu      sync.Mutex
		reports []report.Report
		auth    []string
	)
	home := httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		var rep report.Report
		b, _ := io.ReadAll(r.Body)
		if err := json.Unmarshal(b, &rep); err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		mu.Lock()
		reports, auth = append(reports, rep), append(auth, r.Header.Get("Authorization"))
		mu.Unlock()
		if strings.Contains(string(b), "0123456789abcdef") {
			t.Errorf("the report holds the bootstrap token:\n%s", b)
		}
	}))
	defer home.Close()
	caPEM := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: home.Certificate().Raw})
	tokenFile := filepath.Join(work, "report-token")
	if err := os.WriteFile(tokenFile, []byte("fleet-token\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	extra := "report:\n  url: " + home.URL + "/nodes\n  tokenFile: " + tokenFile + "\n  caCert: |\n    " +
		strings.ReplaceAll(strings.TrimSpace(string(caPEM)), "\n", "\n    ") + "\n"
	mf := filepath.Join(work, "node.yaml")
	if err := os.WriteFile(mf, []byte(pipelineManifest(layout, srv.URL, "")+extra), 0o600); err != nil {
		t.Fatal(err)
	}
	root := filepath.Join(work, "root")
	console := filepath.Join(work, "console")
	code, out, errOut := cli(t, "", "apply", "-f", mf, "--root", root, "--first-boot", "--console", console, "--retry-wait", "10ms")
	if code != 0 {
		t.Fatalf("first boot: exit %d\n%s\n%s", code, out, errOut)
	}
	if !strings.Contains(errOut, "apply failed for a transient reason; trying again") || !strings.Contains(errOut, "503") {
		t.Errorf("no retry after the mirror's 503s:\n%s", errOut)
	}
	if b, _ := os.ReadFile(console); string(b) != "nodespawn: done: machine pipe is running node pipe-node\n" {
		t.Errorf("console: %q", b)
	}
	mu.Lock()
	if len(reports) != 1 || reports[0].Status != "done" || reports[0].Attempts < 2 || reports[0].Node != "pipe-node" ||
		reports[0].Version != report.Version || len(reports[0].Steps) == 0 || auth[0] != "Bearer fleet-token" {
		t.Errorf("reports %+v, authorization %q", reports, auth)
	}
	mu.Unlock()

	// Bad input is never retried: one attempt, exit 2, the line says why.
	bad := filepath.Join(work, "bad.yaml")
	if err := os.WriteFile(bad, []byte("apiVersion: nodespawn.dev/v1alpha1\nkind: Node\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	code, _, errOut = cli(t, "", "apply", "-f", bad, "--root", filepath.Join(work, "root2"), "--first-boot", "--console", console, "--retry-wait", "10ms")
	if code != exitBadInput || strings.Contains(errOut, "trying again") {
		t.Errorf("bad input at first boot: exit %d\n%s", code, errOut)
	}
	if b, _ := os.ReadFile(console); !strings.Contains(string(b), "nodespawn: error: ") {
		t.Errorf("console after bad input: %q", b)
	}
}
