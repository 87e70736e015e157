package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/nodespawn/nodespawn/internal/registrytest"
	"github.com/nodespawn/nodespawn/status"

	"github.com/opencontainers/go-digest"

	"github.com/nodespawn/nodespawn/internal/confine"
	"github.com/nodespawn/nodespawn/internal/imagebuild"
	"github.com/nodespawn/nodespawn/internal/layers"
)

// TestStatusAndApplyRepairABrokenLayerRoot: a machine root composed from
// the layer store, pulled from a real registry (Debian's docker-registry)
// on loopback, is broken as an operator or a failing disk would break it:
// a layer deleted from the store, then the machine's upper directory
// deleted. Each time status says degraded (exit 2) naming the piece, apply
// repairs instead of saying "already applied" (fetching the one missing
// layer, or none), and status says done again.
func TestStatusAndApplyRepairABrokenLayerRoot(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: overlayfs mounts, the rootfs keeps the image's owners")
	}
	work := t.TempDir()
	t.Cleanup(func() { unmountUnder(t, work) })
	addr := registrytest.Start(t).Addr
	ref, layerIDs := pushTwoLayers(t, addr)
	_, srv := newMirror(t)
	m := pipelineManifest("LAYOUT", srv.URL, "")
	m = strings.Replace(m, "    layout:\n      path: LAYOUT\n      reference: v1\n",
		fmt.Sprintf("    image: %s\n    store: layers\n    plainHTTP: [%s]\n", ref, addr), 1)
	mf := filepath.Join(work, "node.yaml")
	must(t, os.WriteFile(mf, []byte(m), 0o600))
	root := filepath.Join(work, "root")
	useRunningKernel(t)

	fetched := regexp.MustCompile(`msg="machine root layers".* fetched=(\d+)`)
	applyRun := func(wantFetched string) string {
		t.Helper()
		code, out, errOut := cli(t, "", "apply", "-f", mf, "--root", root)
		if code != 0 {
			t.Fatalf("apply: exit %d\n%s\n%s", code, out, errOut)
		}
		if strings.Contains(out, "already applied") {
			t.Fatalf("apply said already applied:\n%s\n%s", out, errOut)
		}
		if got := fetched.FindStringSubmatch(errOut); got == nil || got[1] != wantFetched {
			t.Fatalf("apply fetched %v layers, want %s:\n%s", got, wantFetched, errOut)
		}
		for _, l := range strings.Split(errOut, "\n") {
			if strings.Contains(l, "level=WARN") && (strings.Contains(l, "machine root") || strings.Contains(l, "layer store")) {
				t.Logf("apply: %s", l)
			}
		}
		return errOut
	}
	cliStatus := func(wantCode int, want ...string) *status.Status {
		t.Helper()
		code, out, errOut := cli(t, "", "status", "--root", root, "--long")
		if code != wantCode {
			t.Fatalf("status: exit %d, want %d\n%s\n%s", code, wantCode, out, errOut)
		}
		for _, w := range want {
			if !strings.Contains(out, w) {
				t.Errorf("status lacks %q:\n%s", w, out)
			}
		}
		t.Logf("status (exit %d): %s", code, out)
		_, js, _ := cli(t, "", "status", "--root", root, "-o", "json")
		var st status.Status
		must(t, json.Unmarshal([]byte(js), &st))
		return &st
	}
	machineRoot := filepath.Join(root, "var/lib/machines/pipe")
	hostname := func() string {
		b, _ := os.ReadFile(filepath.Join(machineRoot, "etc/hostname"))
		return string(b)
	}

	applyRun("2")
	cliStatus(0, "done")
	if code, out, _ := cli(t, "", "apply", "-f", mf, "--root", root); code != 0 || !strings.Contains(out, "already applied") {
		t.Fatalf("a whole root applied again: exit %d, %q; want already applied", code, out)
	}
	wantHostname := hostname()
	if wantHostname == "" {
		t.Fatal("apply wrote no etc/hostname into the machine root")
	}

	// A layer deleted from the store (the root unmounted first: this
	// test's own scratch root).
	top := layerIDs[1]
	unmountUnder(t, root)
	must(t, os.RemoveAll(filepath.Join(root, "var/lib/nodespawn/layers/sha256", top.Encoded())))
	st := cliStatus(2, "degraded: applied, but layer 2/2 "+top.String()+" is missing from the layer store", "run nodespawn apply to repair")
	if len(st.RootProblems) != 1 || st.RootProblems[0].DiffID != top || st.RootProblems[0].Part != "layer" || st.State != status.StateDegraded {
		t.Fatalf("status JSON: %s, %+v; want degraded with the one missing layer %s", st.State, st.RootProblems, top)
	}
	applyRun("1")
	cliStatus(0, "done")
	if got := hostname(); got != wantHostname {
		t.Errorf("etc/hostname after the layer's repair: %q, want %q", got, wantHostname)
	}
	if b, err := os.ReadFile(filepath.Join(machineRoot, "etc/release")); err != nil || string(b) != "v2\n" {
		t.Errorf("the fetched layer's file: %q, %v", b, err)
	}

	// The upper directory deleted: made again, empty; apply writes its
	// files again, and what the machine wrote is gone (the log says so).
	must(t, os.WriteFile(filepath.Join(machineRoot, "etc/machine-wrote"), []byte("x"), 0o644))
	unmountUnder(t, root)
	upper := "/var/lib/nodespawn/machines/pipe/overlay/upper"
	must(t, os.RemoveAll(filepath.Join(root, upper)))
	st = cliStatus(2, "degraded: applied, but the upper directory of machine root", upper)
	if len(st.RootProblems) != 1 || st.RootProblems[0].Part != "upper" || !strings.HasSuffix(st.RootProblems[0].Path, upper) {
		t.Fatalf("status JSON: %+v; want the upper directory %s", st.RootProblems, upper)
	}
	if log := applyRun("0"); !strings.Contains(log, "is lost") {
		t.Errorf("the repair of the upper directory does not say what is lost:\n%s", log)
	}
	cliStatus(0, "done")
	if got := hostname(); got != wantHostname {
		t.Errorf("etc/hostname after the upper directory's repair: %q, want %q", got, wantHostname)
	}
	if _, err := os.Lstat(filepath.Join(machineRoot, "etc/machine-wrote")); !os.IsNotExist(err) {
		t.Errorf("the machine's own file after its upper directory was lost: %v", err)
	}
}

// pushTwoLayers pushes an image of two layers (a small base tree and a
// release file on top) to the registry at addr and returns its reference
// and DiffIDs, bottom first.
func pushTwoLayers(t *testing.T, addr string) (string, []digest.Digest) {
	t.Helper()
	ctx := context.Background()
	ref := addr + "/nodespawn/repair:v2"
	dst, tag, err := imagebuild.Repository(ref, true)
	must(t, err)
	// The pipeline test's base tree (buildLayout's), then a file on top.
	tree := filepath.Join(t.TempDir(), "tree")
	for p, body := range map[string]string{
		"etc/os-release": "ID=test\n",
		"etc/passwd":     "root:x:0:0:root:/root:/bin/sh\n",
		"etc/group":      "root:x:0:\n",
	} {
		must(t, os.MkdirAll(filepath.Join(tree, filepath.Dir(p)), 0o755))
		must(t, os.WriteFile(filepath.Join(tree, p), []byte(body), 0o644))
	}
	for _, d := range []string{"run", "var", "usr/local/bin"} {
		must(t, os.MkdirAll(filepath.Join(tree, d), 0o755))
	}
	must(t, os.Symlink("/run", filepath.Join(tree, "var/run")))
	must(t, os.Symlink("../run/systemd/resolve/stub-resolv.conf", filepath.Join(tree, "etc/resolv.conf")))
	opts := imagebuild.Options{Platform: "linux/" + runtime.GOARCH}
	b, err := imagebuild.Build(ctx, tree, dst, tag, opts)
	must(t, err)
	topTree := t.TempDir()
	must(t, os.MkdirAll(filepath.Join(topTree, "etc"), 0o755))
	must(t, os.WriteFile(filepath.Join(topTree, "etc/release"), []byte("v2\n"), 0o644))
	res, err := imagebuild.Extend(ctx, dst, b, topTree, tag, opts)
	must(t, err)
	return ref, []digest.Digest{b.DiffID, res.DiffID}
}

func must(t testing.TB, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

// BenchmarkStatusLayerRoot times `nodespawn status --root` on a root whose
// machine root is composed of an image of benchLayers layers (a base with
// a distribution's top level, small layers on it), and the part of it that
// is the root's check. With NODESPAWN_BENCH_STATUS_BIN set to nodespawn
// binaries (colon-separated: an older build to compare with, say), each is
// also timed as a whole process on the same root.
func BenchmarkStatusLayerRoot(b *testing.B) {
	if os.Geteuid() != 0 {
		b.Skip("needs root: overlayfs mounts")
	}
	work := b.TempDir()
	b.Cleanup(func() { unmountUnder(b, work) })
	addr := registrytest.Start(b).Addr
	ref := benchImage(b, addr)
	_, srv := newMirror(b)
	m := pipelineManifest("LAYOUT", srv.URL, "")
	m = strings.Replace(m, "    layout:\n      path: LAYOUT\n      reference: v1\n",
		fmt.Sprintf("    image: %s\n    store: layers\n    plainHTTP: [%s]\n", ref, addr), 1)
	mf := filepath.Join(work, "node.yaml")
	must(b, os.WriteFile(mf, []byte(m), 0o600))
	root := filepath.Join(work, "root")
	useRunningKernel(b)
	var out, errb bytes.Buffer
	if code := run([]string{"apply", "-f", mf, "--root", root}, strings.NewReader(""), &out, &errb); code != 0 {
		b.Fatalf("apply: exit %d\n%s", code, errb.String())
	}
	b.Run("status", func(b *testing.B) {
		defer reportCPU(b)()
		for b.Loop() {
			out.Reset()
			if code := run([]string{"status", "--root", root}, strings.NewReader(""), &out, io.Discard); code != 0 {
				b.Fatalf("status: exit %d: %s", code, out.String())
			}
		}
	})
	b.Run("check", func(b *testing.B) {
		host, err := confine.Open(root)
		must(b, err)
		defer host.Close()
		store := layers.At(host, "/var/lib/nodespawn/layers")
		lm := layers.Machine{Target: "/var/lib/machines/pipe", Dir: "/var/lib/nodespawn/machines/pipe/overlay"}
		defer reportCPU(b)()
		for b.Loop() {
			h, err := store.Check(lm)
			if err != nil || len(h.Problems) != 0 || !h.Mounted || len(h.Image.Layers) != benchLayers {
				b.Fatalf("Check: %+v %v", h, err)
			}
		}
	})
	for _, exe := range strings.Split(os.Getenv("NODESPAWN_BENCH_STATUS_BIN"), ":") {
		if exe == "" {
			continue
		}
		b.Run("process="+filepath.Base(filepath.Dir(exe))+"/"+filepath.Base(exe), func(b *testing.B) {
			// The processes' own CPU time too: on a shared machine it
			// varies less than the wall clock.
			var cpu time.Duration
			for b.Loop() {
				cmd := exec.Command(exe, "status", "--root", root)
				if out, err := cmd.CombinedOutput(); err != nil || string(out) != "done\n" {
					b.Fatalf("%s status: %v %s", exe, err, out)
				}
				cpu += cmd.ProcessState.UserTime() + cmd.ProcessState.SystemTime()
			}
			b.ReportMetric(float64(cpu.Microseconds())/float64(b.N), "cpu-µs/op")
		})
	}
}

// reportCPU, deferred with its result called, reports the process's CPU
// time per op of the benchmark: on a shared machine it varies less than
// the wall clock.
func reportCPU(b *testing.B) func() {
	cpu := func() time.Duration {
		var ru syscall.Rusage
		syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
		return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
	}
	start := cpu()
	return func() { b.ReportMetric(float64((cpu()-start).Microseconds())/float64(b.N), "cpu-µs/op") }
}

// benchLayers is how many layers BenchmarkStatusLayerRoot's image has.
const benchLayers = 12

// benchImage pushes an image of benchLayers layers to the registry at
// addr: a base with a distribution's top level (the pipeline's files in
// it), then small layers of a few top-level entries each.
func benchImage(b *testing.B, addr string) string {
	ctx := context.Background()
	ref := addr + "/nodespawn/bench:v1"
	dst, tag, err := imagebuild.Repository(ref, true)
	must(b, err)
	tree := filepath.Join(b.TempDir(), "tree")
	for p, body := range map[string]string{
		"etc/os-release": "ID=test\n",
		"etc/passwd":     "root:x:0:0:root:/root:/bin/sh\n",
		"etc/group":      "root:x:0:\n",
	} {
		must(b, os.MkdirAll(filepath.Join(tree, filepath.Dir(p)), 0o755))
		must(b, os.WriteFile(filepath.Join(tree, p), []byte(body), 0o644))
	}
	for _, d := range []string{"run", "var/lib", "usr/local/bin", "usr/lib", "boot", "dev", "home", "media", "mnt", "opt", "proc", "root", "srv", "sys", "tmp"} {
		must(b, os.MkdirAll(filepath.Join(tree, d), 0o755))
	}
	for _, l := range []string{"bin", "sbin", "lib", "lib64"} {
		must(b, os.Symlink("usr/"+l, filepath.Join(tree, l)))
	}
	must(b, os.Symlink("/run", filepath.Join(tree, "var/run")))
	must(b, os.Symlink("../run/systemd/resolve/stub-resolv.conf", filepath.Join(tree, "etc/resolv.conf")))
	opts := imagebuild.Options{Platform: "linux/" + runtime.GOARCH}
	res, err := imagebuild.Build(ctx, tree, dst, tag, opts)
	must(b, err)
	for i := 2; i <= benchLayers; i++ {
		top := b.TempDir()
		must(b, os.MkdirAll(filepath.Join(top, "etc"), 0o755))
		must(b, os.MkdirAll(filepath.Join(top, "usr/lib", fmt.Sprint("pkg", i)), 0o755))
		must(b, os.WriteFile(filepath.Join(top, "etc", fmt.Sprint("layer", i)), []byte("x\n"), 0o644))
		if res, err = imagebuild.Extend(ctx, dst, res, top, tag, opts); err != nil {
			b.Fatal(err)
		}
	}
	return ref
}
