package apply_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	. "github.com/nodespawn/nodespawn/apply"
	"github.com/nodespawn/nodespawn/internal/applytest"
	"github.com/nodespawn/nodespawn/plan"
	"github.com/nodespawn/nodespawn/state"
)

var errInjected = errors.New("injected failure")

var update = flag.Bool("update", false, "rewrite golden files under testdata/")

// captureLog returns a logger writing JSON lines into buf.
func captureLog(buf *bytes.Buffer) *slog.Logger {
	return slog.New(slog.NewJSONHandler(buf, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

func golden(t *testing.T, name, got string) {
	t.Helper()
	path := filepath.Join("testdata", name)
	if *update {
		applytest.Must(t, os.WriteFile(path, []byte(got), 0o644))
	}
	want, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("%v (run go test ./apply -update to create it)", err)
	}
	if string(want) != got {
		t.Errorf("%s differs from the golden file (go test ./apply -update rewrites it):\n--- got\n%s\n--- want\n%s", path, got, want)
	}
}

func TestApplyTree(t *testing.T) {
	root := t.TempDir()
	applytest.PrepareRoot(t, root)
	deps, host, sd, dl := applytest.Deps()
	var logs bytes.Buffer
	opts := applytest.Options(deps, captureLog(&logs))
	opts.Root = root
	res, err := applytest.Run(context.Background(), applytest.Plan(), opts)
	if err != nil {
		t.Fatalf("Run: %v\n%s", err, logs.String())
	}
	if res.AlreadyApplied {
		t.Fatal("first run reported already applied")
	}
	golden(t, "tree.golden", applytest.Snapshot(t, root, false))

	// The points the golden file holds, spelled out.
	checks := []struct {
		path, want string
	}{
		{"etc/keep.conf", "kept: f 0600 0:0"},
		{"etc/nodespawn-test/owned", "f 0640 3001:3001"},
		{"var/lib/machines/kube1/var/lib/kubelet/bootstrap-kubeconfig", "f 0600 2001:2001"},
		{"var/lib/machines/kube1/var/lib/kubelet/pki", "d 0750 2001:2001"},
		{"var/lib/machines/kube1/etc/resolv.conf", "f 0644 0:0"},
		{"var/lib/machines/kube1/run/nodespawn-test", "f 0644 0:0"},
		{"var/lib/machines/kube1/usr/local/bin/helper", "f 4755 0:0"},
		{"var/lib/machines/kube1/etc/kubernetes/manifests", "d 0700 0:0"},
	}
	for _, c := range checks {
		fi, err := os.Lstat(filepath.Join(root, c.path))
		if err != nil {
			t.Errorf("%s: %v", c.path, err)
			continue
		}
		st := statOf(fi)
		got := fmt.Sprintf("%s %04o %d:%d", applytest.TypeLetter(fi), st.mode, st.uid, st.gid)
		want := strings.TrimPrefix(c.want, "kept: ")
		if got != want {
			t.Errorf("%s: got %s, want %s", c.path, got, want)
		}
	}
	if b, _ := os.ReadFile(filepath.Join(root, "etc/keep.conf")); string(b) != applytest.Kept {
		t.Errorf("Overwrite=false file replaced: %q", b)
	}
	if _, err := os.Lstat(filepath.Join(root, "run/nodespawn-test")); err == nil {
		t.Error("a file meant for the rootfs's /var/run landed in the host root's /run (absolute symlink followed outside the rootfs)")
	}
	a, _ := os.Stat(filepath.Join(root, applytest.RootfsPath("/usr/bin/kubelet")))
	b, _ := os.Stat(filepath.Join(root, applytest.RootfsPath("/usr/local/bin/kubelet")))
	if a == nil || b == nil || !os.SameFile(a, b) {
		t.Error("hard link /usr/bin/kubelet is not the same file as /usr/local/bin/kubelet")
	}
	if ca, _ := os.ReadFile(filepath.Join(root, applytest.RootfsPath("/etc/kubernetes/pki/ca.crt"))); string(ca) != "\x00binary\xffca\n" {
		t.Errorf("base64 contents not decoded: %q", ca)
	}

	wantHost := []string{"modules overlay,br_netfilter", "sysctl [{net.ipv4.ip_forward 1}]", "nft-flush"}
	if got := host.Calls; !sameSet(got, wantHost) {
		t.Errorf("host calls = %q, want %q", got, wantHost)
	}
	wantSD := []string{"daemon-reload", "start nodespawn-nft-flush.service", "start systemd-nspawn@kube1.service"}
	if got := sd.Calls(); strings.Join(got, "|") != strings.Join(wantSD, "|") {
		t.Errorf("systemd calls = %q, want %q (in this order)", got, wantSD)
	}
	// Each download is fetched ahead of the image, and again after the
	// image step replaced the rootfs (the real fetcher answers that second
	// call from its cache).
	if !sameSet(dl.Fetched, []string{"kubelet", "cni", "kubelet", "cni"}) {
		t.Errorf("fetched %q", dl.Fetched)
	}

	rec, err := state.ReadRecord(root)
	if err != nil || rec == nil {
		t.Fatalf("ReadRecord: %v %v", rec, err)
	}
	if rec.Status != state.StatusSucceeded || rec.ManifestDigest != applytest.Digest || rec.PlanDigest != applytest.Plan().Digest() {
		t.Errorf("record = %+v", rec)
	}
	for _, s := range rec.Steps {
		// The kept file and the wait (the fake machine is up at once) change nothing.
		if s.Outcome != state.OutcomeDone && !((s.ID == "host:file:keep" || s.ID == "start:wait") && s.Outcome == state.OutcomeUnchanged) {
			t.Errorf("step %s: outcome %s (%s), want done", s.ID, s.Outcome, s.Error)
		}
	}
	// One log line per step, each with the step id, kind, outcome and duration.
	steps := 0
	for _, line := range strings.Split(strings.TrimSpace(logs.String()), "\n") {
		var m map[string]any
		applytest.Must(t, json.Unmarshal([]byte(line), &m))
		if m["msg"] == "step" {
			steps++
			for _, k := range []string{"step", "kind", "outcome", "duration"} {
				if _, ok := m[k]; !ok {
					t.Errorf("step log line without %s: %s", k, line)
				}
			}
		}
	}
	if steps != len(applytest.Plan().Steps) {
		t.Errorf("%d step log lines, want %d", steps, len(applytest.Plan().Steps))
	}
	recBytes, _ := os.ReadFile(filepath.Join(root, state.RecordFile))
	for what, b := range map[string][]byte{"log": logs.Bytes(), "result record": recBytes} {
		if bytes.Contains(b, []byte(applytest.Secret)) {
			t.Errorf("the secret appears in the %s", what)
		}
	}
}

type statInfo struct {
	mode     uint32
	uid, gid uint32
}

func statOf(fi os.FileInfo) statInfo {
	s := fi.Sys().(*syscall.Stat_t)
	return statInfo{mode: s.Mode & 0o7777, uid: s.Uid, gid: s.Gid}
}

func sameSet(a, b []string) bool {
	if len(a) != len(b) {
		return false
	}
	m := map[string]int{}
	for _, x := range a {
		m[x]++
	}
	for _, x := range b {
		m[x]--
	}
	for _, v := range m {
		if v != 0 {
			return false
		}
	}
	return true
}

func TestSecondRunChangesNothing(t *testing.T) {
	root := t.TempDir()
	applytest.PrepareRoot(t, root)
	deps, _, _, _ := applytest.Deps()
	opts := applytest.Options(deps, slog.New(slog.DiscardHandler))
	opts.Root = root
	if _, err := applytest.Run(context.Background(), applytest.Plan(), opts); err != nil {
		t.Fatal(err)
	}
	before := applytest.Snapshot(t, root, true)
	recBefore, _ := os.ReadFile(filepath.Join(root, state.RecordFile))

	t.Run("already applied", func(t *testing.T) {
		deps, host, sd, dl := applytest.Deps()
		opts.Deps = deps
		res, err := applytest.Run(context.Background(), applytest.Plan(), opts)
		if err != nil || !res.AlreadyApplied {
			t.Fatalf("second run: AlreadyApplied=%v err=%v, want true, nil", res != nil && res.AlreadyApplied, err)
		}
		if ExitCode(err) != 0 {
			t.Errorf("ExitCode = %d", ExitCode(err))
		}
		if len(host.Calls)+len(sd.Calls())+len(dl.Fetched) > 0 {
			t.Errorf("an already applied run touched the host: %q %q %q", host.Calls, sd.Calls(), dl.Fetched)
		}
		if after := applytest.Snapshot(t, root, true); after != before {
			t.Errorf("tree changed:\n%s", diffLines(before, after))
		}
		if rec, _ := os.ReadFile(filepath.Join(root, state.RecordFile)); !bytes.Equal(rec, recBefore) {
			t.Error("the record was rewritten by an already applied run")
		}
	})

	t.Run("forced", func(t *testing.T) {
		// Force re-checks every step: all must find their target as wanted.
		deps, _, _, _ := applytest.Deps()
		opts.Deps, opts.Force = deps, true
		res, err := applytest.Run(context.Background(), applytest.Plan(), opts)
		if err != nil || res.AlreadyApplied {
			t.Fatalf("forced run: %v", err)
		}
		for _, s := range res.Record.Steps {
			// Host and systemd fakes cannot know the state before; the
			// steps apply checks itself must all find nothing to do.
			checked := s.Kind == plan.KindFile || s.Kind == plan.KindDirectory || s.Kind == plan.KindLink ||
				s.Kind == plan.KindImage || s.Kind == plan.KindDownload || s.Kind == plan.KindWait
			if checked && s.Outcome != state.OutcomeUnchanged {
				t.Errorf("step %s: %s, want unchanged (%s)", s.ID, s.Outcome, s.Error)
			}
		}
		if after := applytest.Snapshot(t, root, true); after != before {
			t.Errorf("tree changed (inode or mtime of a file that needed no change):\n%s", diffLines(before, after))
		}
	})
}

func diffLines(a, b string) string {
	am, bm := map[string]bool{}, map[string]bool{}
	for _, l := range strings.Split(a, "\n") {
		am[l] = true
	}
	for _, l := range strings.Split(b, "\n") {
		bm[l] = true
	}
	var out []string
	for _, l := range strings.Split(a, "\n") {
		if !bm[l] {
			out = append(out, "- "+l)
		}
	}
	for _, l := range strings.Split(b, "\n") {
		if !am[l] {
			out = append(out, "+ "+l)
		}
	}
	return strings.Join(out, "\n")
}

func TestManifestChanged(t *testing.T) {
	root := t.TempDir()
	applytest.PrepareRoot(t, root)
	deps, _, _, _ := applytest.Deps()
	opts := applytest.Options(deps, slog.New(slog.DiscardHandler))
	opts.Root = root
	if _, err := applytest.Run(context.Background(), applytest.Plan(), opts); err != nil {
		t.Fatal(err)
	}
	const other = "sha256:2222222222222222222222222222222222222222222222222222222222222222"
	opts.ManifestDigest = other
	_, err := applytest.Run(context.Background(), applytest.Plan(), opts)
	var mc *ManifestChangedError
	if !errors.As(err, &mc) {
		t.Fatalf("different manifest: err = %v, want ManifestChangedError", err)
	}
	for _, want := range []string{applytest.Digest, other, "--force", "reset"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not mention %s", err, want)
		}
	}
	if ExitCode(err) != ExitInput {
		t.Errorf("ExitCode = %d, want %d", ExitCode(err), ExitInput)
	}
	if rec, _ := state.ReadRecord(root); rec.ManifestDigest != applytest.Digest {
		t.Errorf("a refused run changed the record to %s", rec.ManifestDigest)
	}

	opts.Force = true
	res, err := applytest.Run(context.Background(), applytest.Plan(), opts)
	if err != nil {
		t.Fatalf("forced: %v", err)
	}
	if res.Record.ManifestDigest != other || res.Record.Status != state.StatusSucceeded {
		t.Errorf("forced run record: %s %s", res.Record.ManifestDigest, res.Record.Status)
	}
}

func TestStepFailureThenResume(t *testing.T) {
	root := t.TempDir()
	applytest.PrepareRoot(t, root)
	deps, _, _, dl := applytest.Deps()
	dl.Fail = map[string]error{"cni": fmt.Errorf("GET https://dl.test/cni.tgz: 503 Service Unavailable: %w", errInjected)}
	opts := applytest.Options(deps, slog.New(slog.DiscardHandler))
	opts.Root = root
	_, err := applytest.Run(context.Background(), applytest.Plan(), opts)
	var se *StepError
	if !errors.As(err, &se) || se.ID != "rootfs:download:cni" || !errors.Is(err, errInjected) {
		t.Fatalf("err = %v, want a StepError for rootfs:download:cni", err)
	}
	if !strings.Contains(err.Error(), "https://dl.test/cni.tgz") {
		t.Errorf("error does not name the URL: %v", err)
	}
	if ExitCode(err) != ExitFailed {
		t.Errorf("ExitCode = %d", ExitCode(err))
	}
	rec, _ := state.ReadRecord(root)
	if rec.Status != state.StatusFailed {
		t.Errorf("status %s", rec.Status)
	}
	outcomes := map[string]state.Outcome{}
	for _, s := range rec.Steps {
		outcomes[s.ID] = s.Outcome
	}
	if outcomes["rootfs:download:cni"] != state.OutcomeFailed || outcomes["host:file:nspawn"] != state.OutcomeDone ||
		outcomes["machine:file:hostname"] != state.OutcomeSkipped || outcomes["start:wait"] != state.OutcomeSkipped {
		t.Errorf("outcomes after a failure: %v", outcomes)
	}
	if _, err := os.Stat(filepath.Join(root, state.DoneStamp)); err == nil {
		t.Error("done stamp written by a failed run")
	}

	deps, _, _, _ = applytest.Deps()
	opts.Deps = deps
	res, err := applytest.Run(context.Background(), applytest.Plan(), opts)
	if err != nil || res.AlreadyApplied {
		t.Fatalf("resume: %v (already applied %v)", err, res.AlreadyApplied)
	}
	if _, err := os.Stat(filepath.Join(root, state.DoneStamp)); err != nil {
		t.Error("no done stamp after success")
	}
}

func TestRemoteFileVerified(t *testing.T) {
	root := t.TempDir()
	applytest.PrepareRoot(t, root)
	deps, _, _, dl := applytest.Deps()
	dl.Remote[applytest.RemoteURL] = "tampered\n"
	opts := applytest.Options(deps, slog.New(slog.DiscardHandler))
	opts.Root = root
	_, err := applytest.Run(context.Background(), applytest.Plan(), opts)
	var se *StepError
	if !errors.As(err, &se) || se.ID != "machine:file:remote" || !strings.Contains(err.Error(), "verification failed") {
		t.Fatalf("err = %v, want verification failure of machine:file:remote", err)
	}
	if _, err := os.Lstat(filepath.Join(root, applytest.RootfsPath("/etc/extra.conf"))); err == nil {
		t.Error("unverified contents were written")
	}
}

func TestHostStepsSkippedWithoutDeps(t *testing.T) {
	root := t.TempDir()
	applytest.PrepareRoot(t, root)
	deps, _, _, _ := applytest.Deps()
	deps.Host, deps.Systemd = nil, nil
	opts := applytest.Options(deps, slog.New(slog.DiscardHandler))
	opts.Root = root
	res, err := applytest.Run(context.Background(), applytest.Plan(), opts)
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range res.Record.Steps {
		hostKind := s.Kind == plan.KindModules || s.Kind == plan.KindSysctl || s.Kind == plan.KindNftFlush ||
			s.Kind == plan.KindSystemd || s.Kind == plan.KindWait
		if hostKind != (s.Outcome == state.OutcomeSkipped) {
			t.Errorf("step %s (%s): %s", s.ID, s.Kind, s.Outcome)
		}
		if hostKind && !strings.Contains(s.Error, root) {
			t.Errorf("skip reason %q does not say the root is %s", s.Error, root)
		}
	}
}
