package apply_test

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io/fs"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"runtime"
	"sort"
	"strings"
	"syscall"
	"testing"

	. "github.com/nodespawn/nodespawn/apply"
	"github.com/nodespawn/nodespawn/internal/applytest"
	"github.com/nodespawn/nodespawn/internal/layout"
	"github.com/nodespawn/nodespawn/reset"

	"golang.org/x/sys/unix"

	"github.com/nodespawn/nodespawn/internal/imagebuild"
	"github.com/nodespawn/nodespawn/internal/layers"
	"github.com/nodespawn/nodespawn/plan"
)

// The escape test: machine images whose directories (or the files apply
// writes themselves) are symlinks of every hostile shape, built with the
// project's image builder and pulled through the real puller, crossed with
// every kind of write apply does inside a rootfs, each followed by reset.
// A canary directory beside the root must stay exactly as it was, and
// nothing may appear outside the root.

const escMachine = "esc"

var escRootfs = layout.MachinesDir + "/" + escMachine

// writeKind is one kind of write: the plan steps that do it, the image
// path its hostile link goes at (a directory the write passes through),
// and the path it writes (where a final-component link goes).
type writeKind struct {
	name   string
	via    string // directory in the image the write goes through
	target string // the path written, inside the machine
	steps  func(srvURL string) []plan.Step
}

// canaryBody is what the canary file holds; a file step writes the same
// bytes, so a mode change that followed a link would find "the same
// contents" and chmod the canary.
const canaryBody = "canary: must never change\n"

func escKinds() []writeKind {
	img := []string{"rootfs:image"}
	step := func(id string, ph plan.Phase, s plan.Step) plan.Step {
		s.ID, s.Phase, s.After = id, ph, img
		return s
	}
	return []writeKind{
		{name: "file", via: "/etc/kubernetes", target: "/etc/kubernetes/bootstrap-kubeconfig", steps: func(string) []plan.Step {
			return []plan.Step{step("machine:file", plan.PhaseMachine, plan.Step{Kind: plan.KindFile, File: &plan.File{
				Path: escRootfs + "/etc/kubernetes/bootstrap-kubeconfig", Mode: 0o600, Contents: "token: s3cr3t\n", Overwrite: true, Secret: true}})}
		}},
		{name: "directory", via: "/var/lib/kubelet", target: "/var/lib/kubelet/pods", steps: func(string) []plan.Step {
			return []plan.Step{step("machine:directory", plan.PhaseMachine, plan.Step{Kind: plan.KindDirectory, Directory: &plan.Directory{
				Path: escRootfs + "/var/lib/kubelet/pods", Mode: 0o700, Owner: plan.Owner{UID: 4242, GID: 4242}}})}
		}},
		{name: "link", via: "/etc/systemd/system/multi-user.target.wants", target: "/etc/systemd/system/multi-user.target.wants/kubelet.service", steps: func(string) []plan.Step {
			return []plan.Step{step("machine:link", plan.PhaseMachine, plan.Step{Kind: plan.KindLink, Link: &plan.Link{
				Path: escRootfs + "/etc/systemd/system/multi-user.target.wants/kubelet.service", Target: "/etc/systemd/system/kubelet.service"}})}
		}},
		{name: "download install", via: "/usr/local/bin", target: "/usr/local/bin/kubelet", steps: func(u string) []plan.Step {
			return []plan.Step{step("rootfs:download:kubelet", plan.PhaseRootfs, plan.Step{Kind: plan.KindDownload, Download: &plan.Download{
				Name: "kubelet", URL: u + "/kubelet", SHA256: applytest.SHA256Hex(escKubelet), Dest: escRootfs + "/usr/local/bin/kubelet", Mode: 0o755}})}
		}},
		{name: "archive extract", via: "/opt/cni", target: "/opt/cni/bin", steps: func(u string) []plan.Step {
			return []plan.Step{step("rootfs:download:cni", plan.PhaseRootfs, plan.Step{Kind: plan.KindDownload, Download: &plan.Download{
				Name: "cni", URL: u + "/cni.tgz", SHA256: applytest.SHA256Hex(string(escCNI)), Dest: escRootfs + "/opt/cni/bin", Mode: 0o755, Archive: "tar.gz"}})}
		}},
		{name: "mode and owner change", via: "/etc/default", target: "/etc/default/kubelet", steps: func(string) []plan.Step {
			return []plan.Step{step("machine:file:mode", plan.PhaseMachine, plan.Step{Kind: plan.KindFile, File: &plan.File{
				Path: escRootfs + "/etc/default/kubelet", Mode: 0o4777, Owner: plan.Owner{UID: 4242, GID: 4242}, Contents: canaryBody, Overwrite: true}})}
		}},
		{name: "hard link", via: "/etc/hl", target: "/etc/hl/passwd", steps: func(string) []plan.Step {
			return []plan.Step{step("machine:link:hard", plan.PhaseMachine, plan.Step{Kind: plan.KindLink, Link: &plan.Link{
				Path: escRootfs + "/etc/hl/passwd", Target: escRootfs + "/etc/default/kubelet", Hard: true}})}
		}},
	}
}

const escKubelet = "\x7fELF kubelet"

var escCNI = []byte{}

// linkShape is a hostile symlink: its target, given where the link is (a
// path inside the machine) and the canary's real host path.
type linkShape struct {
	name string
	// final puts the link at the written path itself instead of at the
	// directory the write goes through.
	final  bool
	target func(link, canary string) string
	// extra are more links the shape needs, path -> target.
	extra func(link, canary string) map[string]string
}

// up climbs from the directory holding link to far above any root.
func up(link string) string {
	return strings.Repeat("../", strings.Count(link, "/")+12)
}

func escShapes() []linkShape {
	return []linkShape{
		{name: "absolute", target: func(_, c string) string { return c }},
		{name: "dotdot chain", target: func(l, c string) string { return up(l) + strings.TrimPrefix(c, "/") }},
		{name: "missing name then dotdot", target: func(l, c string) string { return "nonexistent/" + up(l) + strings.TrimPrefix(c, "/") }},
		{name: "regular file then dotdot", target: func(l, c string) string {
			return strings.Repeat("../", strings.Count(l, "/")-1) + "etc/os-release/" + up(l) + strings.TrimPrefix(c, "/")
		}},
		{name: "chain of relative links", target: func(l, _ string) string {
			return strings.Repeat("../", strings.Count(l, "/")-1) + "hop1"
		}, extra: func(_, c string) map[string]string {
			return map[string]string{"/hop1": "hop2/x/..", "/hop2": "../../../../../../../../.." + c}
		}},
		{name: "loop", target: func(l, _ string) string { return filepath.Base(l) + "-loop" }, extra: func(l, _ string) map[string]string {
			return map[string]string{l + "-loop": filepath.Base(l)}
		}},
		{name: "final component absolute", final: true, target: func(_, c string) string { return c + "/file" }},
		{name: "final component dotdot", final: true, target: func(l, c string) string { return up(l) + strings.TrimPrefix(c, "/") + "/file" }},
	}
}

func TestNoWriteLeavesTheRoot(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: images keep their owners, steps chown")
	}
	// Flattened roots, and roots composed from the layer store (an
	// overlayfs mount apply writes through).
	t.Run("flat", func(t *testing.T) { testNoWriteLeavesTheRoot(t, nil) })
	t.Run("layers", func(t *testing.T) {
		testNoWriteLeavesTheRoot(t, &plan.LayerRoot{Store: layout.LayerStoreDir, Dir: layout.OverlayDir(escMachine),
			MaxLayers: layers.MaxStack})
	})
}

func testNoWriteLeavesTheRoot(t *testing.T, lr *plan.LayerRoot) {
	escCNI = tarGz(t, map[string]string{"./bridge": "bridge", "./loopback": "loopback"})
	mux := http.NewServeMux()
	mux.HandleFunc("/kubelet", func(w http.ResponseWriter, r *http.Request) { w.Write([]byte(escKubelet)) })
	mux.HandleFunc("/cni.tgz", func(w http.ResponseWriter, r *http.Request) { w.Write(escCNI) })
	srv := httptest.NewServer(mux)
	defer srv.Close()

	work := t.TempDir()
	canary := filepath.Join(work, "canary")
	applytest.Must(t, os.MkdirAll(filepath.Join(canary, "dir"), 0o755))
	applytest.Must(t, os.WriteFile(filepath.Join(canary, "file"), []byte(canaryBody), 0o644))
	applytest.Must(t, os.WriteFile(filepath.Join(canary, "dir", "kubelet"), []byte("not a kubelet"), 0o755))
	layout := filepath.Join(work, "layout")
	target, err := imagebuild.Layout(layout)
	applytest.Must(t, err)

	shapes, kinds := escShapes(), escKinds()
	tried, escapes, failed := 0, 0, 0
	for si, sh := range shapes {
		// One image per shape, with the shape's link at every place a
		// write kind goes through (or at every written path).
		tree := filepath.Join(work, fmt.Sprintf("tree%d", si))
		for _, d := range []string{"etc/systemd/system", "usr/local", "var/lib", "opt", "etc/default"} {
			applytest.Must(t, os.MkdirAll(filepath.Join(tree, d), 0o755))
		}
		applytest.Must(t, os.WriteFile(filepath.Join(tree, "etc/os-release"), []byte("ID=escape\n"), 0o644))
		applytest.Must(t, os.WriteFile(filepath.Join(tree, "etc/passwd"), []byte("root:x:0:0::/:/bin/sh\n"), 0o644))
		applytest.Must(t, os.WriteFile(filepath.Join(tree, "etc/group"), []byte("root:x:0:\n"), 0o644))
		for _, k := range kinds {
			at := k.via
			if sh.final {
				at = k.target
				applytest.Must(t, os.MkdirAll(filepath.Join(tree, filepath.Dir(at)), 0o755))
			}
			if _, err := os.Lstat(filepath.Join(tree, at)); err == nil {
				continue // the kind shares its place with another
			}
			applytest.Must(t, os.Symlink(sh.target(at, canary), filepath.Join(tree, at)))
			if sh.extra != nil {
				for p, tg := range sh.extra(at, canary) {
					if _, err := os.Lstat(filepath.Join(tree, p)); err != nil {
						applytest.Must(t, os.Symlink(tg, filepath.Join(tree, p)))
					}
				}
			}
		}
		tag := fmt.Sprintf("shape%d", si)
		if _, err := imagebuild.Build(context.Background(), tree, target, tag, imagebuild.Options{Platform: "linux/" + runtime.GOARCH}); err != nil {
			t.Fatal(err)
		}

		for _, k := range kinds {
			tried++
			name := sh.name + "/" + k.name
			root := filepath.Join(work, "root")
			before := outsideRoot(t, work, root)
			p := &plan.Plan{Version: plan.Version, Machine: escMachine, Rootfs: escRootfs, Steps: append([]plan.Step{
				{ID: "rootfs:image", Phase: plan.PhaseRootfs, Kind: plan.KindImage, Image: &plan.Image{
					Dest: escRootfs, Layout: layout, LayoutRef: tag, Platform: "linux/" + runtime.GOARCH, Layers: lr}},
			}, k.steps(srv.URL)...)}
			if k.name == "hard link" {
				// The hard link's target is written first, through the
				// same hostile place.
				p.Steps = append(p.Steps, escKinds()[5].steps(srv.URL)...)
				p.Steps[1].After = append(p.Steps[1].After, "machine:file:mode")
			}
			log := slog.New(slog.DiscardHandler)
			deps, err := DefaultDeps(root, log)
			applytest.Must(t, err)
			_, runErr := applytest.Run(context.Background(), p, Options{Root: root, ManifestDigest: applytest.Digest, Deps: deps, Log: log, Force: true})
			if runErr != nil {
				failed++
			} else if mounted, _, _ := layers.MountedAt(filepath.Join(root, escRootfs)); lr != nil && !mounted {
				t.Errorf("%s: applied, but the machine root is not an overlayfs mount", name)
			}
			resetErr := reset.Run(context.Background(), reset.Options{Root: root, Plan: p, Log: log})
			after := outsideRoot(t, work, root)
			if d := diffLines(before, after); d != "" {
				escapes++
				t.Errorf("%s: a write left the root (apply: %v; reset: %v):\n%s", name, runErr, resetErr, d)
			}
			if resetErr != nil {
				t.Errorf("%s: reset: %v", name, resetErr)
			}
			if mounted, _, _ := layers.MountedAt(filepath.Join(root, escRootfs)); mounted {
				t.Errorf("%s: reset left the machine root mounted", name)
				applytest.Must(t, unix.Unmount(filepath.Join(root, escRootfs), 0))
			}
			applytest.Must(t, os.RemoveAll(root))
		}
	}
	t.Logf("link shapes x write kinds (each applied, then reset): %d x %d = %d tried, %d escapes; %d applies refused the image with an error", len(shapes), len(kinds), tried, escapes, failed)
	if tried != len(shapes)*len(kinds) {
		t.Errorf("tried %d combinations, want %d", tried, len(shapes)*len(kinds))
	}
}

// outsideRoot describes every entry under work except the root (and the
// image trees and layout the test made itself): path, type, mode, owner,
// contents digest or link target.
func outsideRoot(t *testing.T, work, root string) string {
	t.Helper()
	var lines []string
	err := filepath.WalkDir(work, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if p == root {
			return filepath.SkipDir
		}
		fi, err := os.Lstat(p)
		if err != nil {
			return err
		}
		st := fi.Sys().(*syscall.Stat_t)
		line := fmt.Sprintf("%s %v %04o %d:%d", p, fi.Mode().Type(), st.Mode&0o7777, st.Uid, st.Gid)
		switch {
		case fi.Mode().IsRegular():
			b, err := os.ReadFile(p)
			if err != nil {
				return err
			}
			sum := sha256.Sum256(b)
			line += " " + hex.EncodeToString(sum[:8])
		case fi.Mode()&fs.ModeSymlink != 0:
			tg, _ := os.Readlink(p)
			line += " -> " + tg
		}
		lines = append(lines, line)
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	sort.Strings(lines)
	return strings.Join(lines, "\n")
}
