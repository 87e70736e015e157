package main

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nodespawn/nodespawn/apply"
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
	var st apply.Status
	if err := json.Unmarshal([]byte(r.out), &st); err != nil || r.code != 0 || st.State != apply.StateDone || st.Version != apply.StatusVersion {
		t.Fatalf("status --wait: exit %d, %+v (%v)\n%s", r.code, st, err, r.err)
	}

	code, out, _ := cli(t, "", "status", "--root", root, "--timings", "--long")
	if code != 0 || !strings.HasPrefix(out, "done\n") || !strings.Contains(out, "critical path") || !strings.Contains(out, "rootfs:image") {
		t.Errorf("status --timings --long: exit %d\n%s", code, out)
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
