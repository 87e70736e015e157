package apply_test

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"testing"
	"time"

	. "github.com/nodespawn/nodespawn/apply"
	"github.com/nodespawn/nodespawn/internal/applytest"
	"github.com/nodespawn/nodespawn/internal/layout"
	"github.com/nodespawn/nodespawn/status"

	"github.com/nodespawn/nodespawn/internal/confine"
	"github.com/nodespawn/nodespawn/internal/imagebuild"
	"github.com/nodespawn/nodespawn/internal/layers"
	"github.com/nodespawn/nodespawn/internal/machine"
	"github.com/nodespawn/nodespawn/plan"
)

// layerFixture is the fixture plan with its image pulled for real from an
// OCI layout of the fixture's tree into the layer store, the other steps
// through the fakes.
func layerFixture(t *testing.T, root string) (*plan.Plan, Options, *applytest.Systemd, *bytes.Buffer) {
	t.Helper()
	tree := filepath.Join(t.TempDir(), "tree")
	for _, d := range []string{"etc/systemd/system", "usr/local/bin", "usr/bin", "run/systemd/resolve", "var"} {
		applytest.Must(t, os.MkdirAll(filepath.Join(tree, d), 0o755))
	}
	for p, c := range map[string]string{
		"etc/passwd":     "root:x:0:0:root:/root:/bin/sh\nkube:x:2001:2001::/:/bin/false\n",
		"etc/group":      "root:x:0:\nkube:x:2001:\n",
		"etc/os-release": "ID=test\n",
	} {
		applytest.Must(t, os.WriteFile(filepath.Join(tree, p), []byte(c), 0o644))
	}
	applytest.Must(t, os.Symlink("/run", filepath.Join(tree, "var/run")))
	applytest.Must(t, os.Symlink("../run/systemd/resolve/stub-resolv.conf", filepath.Join(tree, "etc/resolv.conf")))
	ociDir := filepath.Join(t.TempDir(), "layout")
	target, err := imagebuild.Layout(ociDir)
	applytest.Must(t, err)
	_, err = imagebuild.Build(context.Background(), tree, target, "v1", imagebuild.Options{Platform: "linux/" + runtime.GOARCH})
	applytest.Must(t, err)

	p := applytest.Plan()
	for i := range p.Steps {
		if p.Steps[i].Kind == plan.KindImage {
			p.Steps[i].Image = &plan.Image{Dest: applytest.Rootfs, Layout: ociDir, LayoutRef: "v1", Platform: "linux/" + runtime.GOARCH,
				Layers: &plan.LayerRoot{Store: layout.LayerStoreDir, Dir: layout.OverlayDir(applytest.Machine)}}
		}
	}
	applytest.PrepareRoot(t, root)
	var buf bytes.Buffer
	log := captureLog(&buf)
	deps, _, sd, _ := applytest.Deps()
	real, err := DefaultDeps(root, log)
	applytest.Must(t, err)
	deps.Images = real.Images
	opts := applytest.Options(deps, log)
	opts.Root = root
	return p, opts, sd, &buf
}

// TestApplyRepairsLayerRoot breaks the machine root of an applied plan
// in the ways a status on a live host sees (the machine running on an
// unmounted root, a layer emptied by hand, the record damaged): each is
// degraded with the piece named, apply repairs it (stopping the machine
// and starting it again), and the status is done again.
func TestApplyRepairsLayerRoot(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: overlayfs mounts, the image keeps its owners")
	}
	ctx := context.Background()
	root, host, p, opts, sd, logBuf := appliedLayerFixture(t)
	wantStatus := func(state status.State, part, want string) {
		t.Helper()
		st, err := status.Read(ctx, status.Options{Root: root, Systemd: sd})
		applytest.Must(t, err)
		if st.State != state || !strings.Contains(st.Summary, want) {
			t.Fatalf("status %s %q, want %s with %q", st.State, st.Summary, state, want)
		}
		if part == "" && len(st.RootProblems) != 0 || part != "" && (len(st.RootProblems) != 1 || st.RootProblems[0].Part != part) {
			t.Fatalf("root problems %+v, want one of %q", st.RootProblems, part)
		}
		if code := status.ExitCode(st); code != map[status.State]int{status.StateDone: 0, status.StateDegraded: 2}[state] {
			t.Errorf("exit code %d for %s", code, st.State)
		}
	}
	repair := func(what string) {
		t.Helper()
		logBuf.Reset()
		calls := len(sd.Calls())
		res, err := applytest.Run(ctx, p, opts)
		if err != nil {
			t.Fatalf("%s: apply: %v", what, err)
		}
		if res.AlreadyApplied {
			t.Fatalf("%s: apply said already applied", what)
		}
		if !strings.Contains(logBuf.String(), "repairing it instead of saying already applied") {
			t.Errorf("%s: the log does not say what is repaired:\n%s", what, logBuf)
		}
		after := sd.Calls()[calls:]
		stop, start := slices.Index(after, "stop systemd-nspawn@kube1.service"), slices.Index(after, "start systemd-nspawn@kube1.service")
		if stop < 0 || start < stop {
			t.Errorf("%s: systemd calls %v, want the machine stopped and started again", what, after)
		}
		wantStatus(status.StateDone, "", "done")
		if b, err := os.ReadFile(filepath.Join(root, applytest.Rootfs, "etc/hostname")); err != nil || string(b) != "node-1\n" {
			t.Errorf("%s: etc/hostname in the repaired root: %q %v", what, b, err)
		}
	}
	wantStatus(status.StateDone, "", "done")
	if res, err := applytest.Run(ctx, p, opts); err != nil || !res.AlreadyApplied {
		t.Fatalf("a whole root applied again: %+v %v, want already applied", res, err)
	}

	// The machine runs, but its root is not mounted.
	applytest.Must(t, layers.Unmount(ctx, host, applytest.Rootfs, 10*time.Second, quietLog))
	wantStatus(status.StateDegraded, "mount", "machine kube1 runs, but its root "+filepath.Join(root, applytest.Rootfs)+" is not mounted")
	repair("not mounted")

	// A layer emptied by hand: its stamp no longer matches.
	img, err := layers.ReadImage(host, layout.OverlayDir(applytest.Machine))
	applytest.Must(t, err)
	store := layers.At(host, layout.LayerStoreDir)
	layerDir := filepath.Join(root, store.Path(img.Layers[0]))
	es, err := os.ReadDir(layerDir)
	applytest.Must(t, err)
	for _, e := range es {
		applytest.Must(t, os.RemoveAll(filepath.Join(layerDir, e.Name())))
	}
	wantStatus(status.StateDegraded, "layer", "layer 1/1 "+img.Layers[0].String()+" in the layer store")
	repair("layer emptied")

	// The record damaged.
	applytest.Must(t, os.WriteFile(filepath.Join(root, layout.OverlayDir(applytest.Machine), layers.RecordName), []byte("{"), 0o600))
	wantStatus(status.StateDegraded, "record", "is unreadable")
	repair("record damaged")
}

var quietLog = captureLog(new(bytes.Buffer))

// appliedLayerFixture is layerFixture in a fresh root, applied once; the
// root is unmounted when the test ends.
func appliedLayerFixture(t *testing.T) (string, *confine.Root, *plan.Plan, Options, *applytest.Systemd, *bytes.Buffer) {
	t.Helper()
	root := t.TempDir()
	host, err := confine.Open(root)
	applytest.Must(t, err)
	t.Cleanup(func() {
		layers.Unmount(context.Background(), host, applytest.Rootfs, 10*time.Second, quietLog)
		host.Close()
	})
	p, opts, sd, logBuf := layerFixture(t, root)
	if _, err := applytest.Run(context.Background(), p, opts); err != nil {
		t.Fatal(err)
	}
	return root, host, p, opts, sd, logBuf
}

// TestInterruptedRepairResumes: a repair killed after it began (the run
// recorded, the root unmounted, the lost upper directory made again,
// empty, the machine stopped) is never taken for applied: the next apply
// resumes it and puts back every file the plan writes into the root.
func TestInterruptedRepairResumes(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: overlayfs mounts, the image keeps its owners")
	}
	ctx := context.Background()
	root, host, p, opts, sd, _ := appliedLayerFixture(t)
	applytest.Must(t, layers.Unmount(ctx, host, applytest.Rootfs, 10*time.Second, quietLog))
	applytest.Must(t, os.RemoveAll(filepath.Join(root, layout.OverlayDir(applytest.Machine), "upper")))

	// The repairing run dies once its run is recorded, before its steps;
	// what it did of the repair is done here by hand.
	type killed struct{}
	killing := opts
	SetAfterStep(&killing, func(n int) {
		if n == 0 {
			panic(killed{})
		}
	})
	func() {
		defer func() {
			if v := recover(); v != (killed{}) {
				t.Fatalf("the repairing run was not stopped at its start: %v", v)
			}
		}()
		applytest.Run(ctx, p, killing)
	}()
	store := layers.At(host, layout.LayerStoreDir)
	lm := machine.ImageRoot(machine.LayerImage(p))
	h, err := store.Check(lm)
	applytest.Must(t, err)
	applytest.Must(t, store.Repair(ctx, lm, h, quietLog))
	delete(sd.Registered, applytest.Machine)
	sd.Active["systemd-nspawn@kube1.service"] = false
	if h, err := store.Check(lm); err != nil || len(h.Problems) != 0 {
		t.Fatalf("after the interrupted repair Check finds %+v %v; want nothing (what makes this test)", h.Problems, err)
	}

	res, err := applytest.Run(ctx, p, opts)
	if err != nil || res.AlreadyApplied {
		t.Fatalf("apply after an interrupted repair: %+v %v; want a resumed run", res, err)
	}
	st, err := status.Read(ctx, status.Options{Root: root, Systemd: sd})
	applytest.Must(t, err)
	if st.State != status.StateDone {
		t.Fatalf("status after the resumed repair: %s %q", st.State, st.Summary)
	}
	if b, err := os.ReadFile(filepath.Join(root, applytest.Rootfs, "etc/hostname")); err != nil || string(b) != "node-1\n" {
		t.Errorf("etc/hostname after the resumed repair: %q %v", b, err)
	}
}
