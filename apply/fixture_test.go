package apply

import (
	"context"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"syscall"
	"testing"

	"github.com/nodespawn/nodespawn/internal/confine"
	"github.com/nodespawn/nodespawn/plan"
	"github.com/nodespawn/nodespawn/state"
)

// The fixture: a plan touching every file, directory and link kind in the
// host and in the rootfs, plus every other kind through fakes at the Deps
// seams. Owners by name resolve differently on the host (kube = 3001) and
// in the rootfs (kube = 2001), so a lookup in the wrong passwd shows.

const (
	testMachine   = "kube1"
	testRootfs    = "/var/lib/machines/kube1"
	testSecret    = "TOKEN-s3cr3t-abcdef"
	testRemoteURL = "https://files.test/extra.conf"
	testRemote    = "remote file contents\n"
	// testKept is what the operator's own file holds; Overwrite=false keeps it.
	testKept = "operator's own settings\n"
)

func sha256Hex(s string) string {
	sum := sha256.Sum256([]byte(s))
	return hex.EncodeToString(sum[:])
}

// rootfsPath is a plan path inside the machine's rootfs.
func rootfsPath(p string) string { return testRootfs + p }

func testPlan() *plan.Plan {
	owner := plan.Owner{}
	kube := plan.Owner{User: "kube", Group: "kube"}
	file := func(id string, ph plan.Phase, path string, mode uint32, contents string, mut ...func(*plan.File)) plan.Step {
		f := &plan.File{Path: path, Mode: mode, Owner: owner, Contents: contents, Overwrite: true}
		for _, m := range mut {
			m(f)
		}
		return plan.Step{ID: id, Phase: ph, Kind: plan.KindFile, Summary: "write " + path, File: f}
	}
	dir := func(id string, ph plan.Phase, path string, mode uint32, o plan.Owner) plan.Step {
		return plan.Step{ID: id, Phase: ph, Kind: plan.KindDirectory, Summary: "mkdir " + path,
			Directory: &plan.Directory{Path: path, Mode: mode, Owner: o}}
	}
	link := func(id string, ph plan.Phase, path, target string, hard bool) plan.Step {
		return plan.Step{ID: id, Phase: ph, Kind: plan.KindLink, Summary: "link " + path,
			Link: &plan.Link{Path: path, Target: target, Hard: hard}}
	}
	H, R, M, S := plan.PhaseHost, plan.PhaseRootfs, plan.PhaseMachine, plan.PhaseStart
	steps := []plan.Step{
		{ID: "host:modules", Phase: H, Kind: plan.KindModules, Modules: &plan.Modules{Names: []string{"overlay", "br_netfilter"}}},
		{ID: "host:sysctl", Phase: H, Kind: plan.KindSysctl, After: []string{"host:modules"},
			Sysctl: &plan.Sysctl{Values: []plan.KeyValue{{Key: "net.ipv4.ip_forward", Value: "1"}}}},
		{ID: "host:nft-flush", Phase: H, Kind: plan.KindNftFlush},
		dir("host:dir:test", H, "/etc/nodespawn-test", 0o750, kube),
		file("host:file:nspawn", H, "/etc/systemd/nspawn/kube1.nspawn", 0o644, "[Exec]\nCapability=all\n"),
		file("host:file:dropin", H, "/etc/systemd/system/systemd-nspawn@kube1.service.d/override.conf", 0o644, "[Service]\nRestart=on-failure\n"),
		link("host:link:wants", H, "/etc/systemd/system/machines.target.wants/systemd-nspawn@kube1.service", "/lib/systemd/system/systemd-nspawn@.service", false),
		file("host:file:keep", H, "/etc/keep.conf", 0o644, "nodespawn default\n", func(f *plan.File) { f.Overwrite = false }),
		file("host:file:owned", H, "/etc/nodespawn-test/owned", 0o640, "owned by kube\n", func(f *plan.File) { f.Owner = kube }),

		{ID: "rootfs:image", Phase: R, Kind: plan.KindImage, Image: &plan.Image{Dest: testRootfs, Reference: "registry.test/base:1", Platform: "linux/amd64"}},
		{ID: "rootfs:download:kubelet", Phase: R, Kind: plan.KindDownload, After: []string{"rootfs:image"},
			Download: &plan.Download{Name: "kubelet", Version: "v1.37.2", URL: "https://dl.test/kubelet", SHA256: sha256Hex("kubelet"), Dest: rootfsPath("/usr/local/bin/kubelet"), Mode: 0o755}},
		{ID: "rootfs:download:cni", Phase: R, Kind: plan.KindDownload, After: []string{"rootfs:image"},
			Download: &plan.Download{Name: "cni", Version: "v1.10.0", URL: "https://dl.test/cni.tgz", SHA256: sha256Hex("cni"), Dest: rootfsPath("/opt/cni/bin"), Mode: 0o755, Archive: "tar.gz"}},

		file("machine:file:hostname", M, rootfsPath("/etc/hostname"), 0o644, "node-1\n"),
		file("machine:file:kubeconfig", M, rootfsPath("/var/lib/kubelet/bootstrap-kubeconfig"), 0o644, "token: "+testSecret+"\n",
			func(f *plan.File) { f.Secret = true; f.Owner = kube }),
		file("machine:file:ca", M, rootfsPath("/etc/kubernetes/pki/ca.crt"), 0o644, base64.StdEncoding.EncodeToString([]byte("\x00binary\xffca\n")),
			func(f *plan.File) { f.Encoding = "base64" }),
		file("machine:file:resolv", M, rootfsPath("/etc/resolv.conf"), 0o644, "nameserver 192.0.2.53\n"),
		file("machine:file:escape", M, rootfsPath("/var/run/nodespawn-test"), 0o644, "inside the rootfs\n"),
		file("machine:file:remote", M, rootfsPath("/etc/extra.conf"), 0o644, "", func(f *plan.File) {
			f.Source = &plan.Source{URL: testRemoteURL, Hash: "sha256-" + sha256Hex(testRemote)}
		}),
		file("machine:file:suid", M, rootfsPath("/usr/local/bin/helper"), 0o4755, "#!/bin/sh\n"),
		dir("machine:dir:manifests", M, rootfsPath("/etc/kubernetes/manifests"), 0o700, owner),
		dir("machine:dir:kubelet", M, rootfsPath("/var/lib/kubelet/pki"), 0o750, kube),
		link("machine:link:mask-resolved", M, rootfsPath("/etc/systemd/system/systemd-resolved.service"), "/dev/null", false),
		file("machine:file:kubelet-unit", M, rootfsPath("/etc/systemd/system/kubelet.service"), 0o644, "[Service]\nExecStart=/usr/local/bin/kubelet\n"),
		link("machine:link:wants-kubelet", M, rootfsPath("/etc/systemd/system/multi-user.target.wants/kubelet.service"), "/etc/systemd/system/kubelet.service", false),
		link("machine:link:hard", M, rootfsPath("/usr/bin/kubelet"), rootfsPath("/usr/local/bin/kubelet"), true),

		{ID: "start:reload", Phase: S, Kind: plan.KindSystemd, Systemd: &plan.Systemd{Action: "daemon-reload"}},
		{ID: "start:flush", Phase: S, Kind: plan.KindSystemd, After: []string{"start:reload"}, Systemd: &plan.Systemd{Action: "start", Unit: "nodespawn-nft-flush.service"}},
		{ID: "start:machine", Phase: S, Kind: plan.KindSystemd, After: []string{"start:flush"}, Systemd: &plan.Systemd{Action: "start", Unit: "systemd-nspawn@kube1.service"}},
		{ID: "start:wait", Phase: S, Kind: plan.KindWait, After: []string{"start:machine"},
			Wait: &plan.Wait{Machine: testMachine, Units: []string{"containerd.service", "kubelet.service"}, TimeoutSeconds: 60}},
	}
	return &plan.Plan{Version: plan.Version, Machine: testMachine, Rootfs: testRootfs, NodeName: "node-1", Steps: steps}
}

// prepareRoot gives a fresh root the host files the fixture expects.
func prepareRoot(t testing.TB, root string) {
	t.Helper()
	must(t, os.MkdirAll(filepath.Join(root, "etc"), 0o755))
	must(t, os.WriteFile(filepath.Join(root, "etc/passwd"), []byte("root:x:0:0:root:/root:/bin/sh\nkube:x:3001:3001::/:/bin/false\n"), 0o644))
	must(t, os.WriteFile(filepath.Join(root, "etc/group"), []byte("root:x:0:\nkube:x:3001:\n"), 0o644))
	must(t, os.WriteFile(filepath.Join(root, "etc/keep.conf"), []byte(testKept), 0o600))
}

func must(t testing.TB, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

// fakeImages builds a small rootfs the way a real pull must: in a staging
// directory renamed into place. Its tree has the traps real images have: an
// absolute /var/run -> /run link and /etc/resolv.conf as a symlink.
type fakeImages struct {
	mu    sync.Mutex
	pulls int
	// before, when set, runs at the start of each Pull (ordering tests).
	before func(ctx context.Context) error
}

func (f *fakeImages) Pull(ctx context.Context, img *plan.Image, root *confine.Root, dest string) (bool, error) {
	// A fake at the seam: it builds with plain host paths under the test's
	// root.
	dest = root.Show(dest)
	if f.before != nil {
		if err := f.before(ctx); err != nil {
			return false, err
		}
	}
	if _, err := os.Lstat(dest); err == nil {
		return false, nil
	}
	f.mu.Lock()
	f.pulls++
	f.mu.Unlock()
	stage := dest + ".staging"
	if err := os.RemoveAll(stage); err != nil {
		return false, err
	}
	files := map[string]string{
		"etc/passwd":     "root:x:0:0:root:/root:/bin/sh\nkube:x:2001:2001::/:/bin/false\n",
		"etc/group":      "root:x:0:\nkube:x:2001:\n",
		"etc/os-release": "ID=test\n",
	}
	for _, d := range []string{"etc/systemd/system", "usr/local/bin", "usr/bin", "run/systemd/resolve", "var"} {
		if err := os.MkdirAll(filepath.Join(stage, d), 0o755); err != nil {
			return false, err
		}
	}
	for p, c := range files {
		if err := os.WriteFile(filepath.Join(stage, p), []byte(c), 0o644); err != nil {
			return false, err
		}
	}
	for p, target := range map[string]string{"var/run": "/run", "etc/resolv.conf": "../run/systemd/resolve/stub-resolv.conf"} {
		if err := os.Symlink(target, filepath.Join(stage, p)); err != nil {
			return false, err
		}
	}
	if err := os.Chmod(stage, 0o755); err != nil {
		return false, err
	}
	if err := os.MkdirAll(filepath.Dir(dest), 0o700); err != nil {
		return false, err
	}
	return true, os.Rename(stage, dest)
}

// fakeDownloader "fetches" artifacts whose contents derive from their name;
// an archive installs two files under Dest.
type fakeDownloader struct {
	mu      sync.Mutex
	fetched []string
	// fetchStarted, when set, is closed by the first Fetch.
	fetchStarted chan struct{}
	once         sync.Once
	fail         map[string]error // by download name
	remote       map[string]string
	// beforeInstall, when set, runs at the start of each Install.
	beforeInstall func() error
}

func (f *fakeDownloader) Fetch(ctx context.Context, d *plan.Download, root *confine.Root, dest string) (Artifact, error) {
	f.mu.Lock()
	f.fetched = append(f.fetched, d.Name)
	f.mu.Unlock()
	if f.fetchStarted != nil {
		f.once.Do(func() { close(f.fetchStarted) })
	}
	if err := f.fail[d.Name]; err != nil {
		return nil, err
	}
	files := map[string]string{dest: "binary " + d.Name + " " + d.Version + "\n"}
	if d.Archive != "" {
		files = map[string]string{
			path.Join(dest, "bridge"):   "cni bridge " + d.Version + "\n",
			path.Join(dest, "loopback"): "cni loopback " + d.Version + "\n",
		}
	}
	return &fakeArtifact{files: files, mode: confine.FileMode(d.Mode), before: f.beforeInstall}, nil
}

func (f *fakeDownloader) Contents(ctx context.Context, src *plan.Source) ([]byte, error) {
	c, ok := f.remote[src.URL]
	if !ok {
		return nil, fmt.Errorf("GET %s: 404 Not Found", src.URL)
	}
	return []byte(c), nil
}

type fakeArtifact struct {
	files  map[string]string
	mode   os.FileMode
	before func() error
}

func (a *fakeArtifact) Install(ctx context.Context, root *confine.Root, dest string) (bool, error) {
	if a.before != nil {
		if err := a.before(); err != nil {
			return false, err
		}
	}
	changed := false
	for p, c := range a.files {
		if b, err := root.ReadFile(p); err == nil && string(b) == c {
			continue
		}
		changed = true
		if err := root.MkdirParents(path.Dir(p)); err != nil {
			return false, err
		}
		if err := root.WriteFile(p, []byte(c), a.mode, 0, 0); err != nil {
			return false, err
		}
	}
	return changed, nil
}

// fakeHost records host operations.
type fakeHost struct {
	mu    sync.Mutex
	calls []string
	// block, when set, holds LoadModules until closed (lock tests).
	block   chan struct{}
	entered chan struct{}
}

func (h *fakeHost) record(s string) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.calls = append(h.calls, s)
}

func (h *fakeHost) EnsurePackages(ctx context.Context, names []string, install bool) error {
	h.record("packages " + strings.Join(names, ","))
	return nil
}

func (h *fakeHost) LoadModules(ctx context.Context, names []string) error {
	h.record("modules " + strings.Join(names, ","))
	if h.block != nil {
		close(h.entered)
		<-h.block
	}
	return nil
}

func (h *fakeHost) ApplySysctls(ctx context.Context, values []plan.KeyValue) error {
	h.record(fmt.Sprintf("sysctl %v", values))
	return nil
}

func (h *fakeHost) FlushNftables(ctx context.Context) error {
	h.record("nft-flush")
	return nil
}

func (h *fakeHost) DisableSwap(ctx context.Context, fstab string) error {
	h.record("swap-off " + fstab)
	return nil
}

// fakeSystemd is systemd and machined as seen through the Systemd seam:
// starting systemd-nspawn@<m>.service registers the machine; unit states
// inside follow a script.
type fakeSystemd struct {
	mu         sync.Mutex
	calls      []string
	active     map[string]bool
	registered map[string]bool
	// states[unit] is the sequence UnitState returns; the last one repeats.
	states map[string][]string
	// registerAfter is how many MachineRegistered calls say no first.
	registerAfter int
	regCalls      int
	// stopKeepsMachine makes Stop leave the machine registered (reset must
	// terminate it).
	stopKeepsMachine bool
	journal          string
	unitJournal      map[string]string
	// hostStates are the host units' states (UnitState with no machine).
	hostStates map[string]string
	failStart  map[string]error
	// restarts, when set, answers UnitRestarts.
	restarts func(machine, unit string) int
}

func newFakeSystemd() *fakeSystemd {
	return &fakeSystemd{active: map[string]bool{}, registered: map[string]bool{}, states: map[string][]string{}}
}

func (s *fakeSystemd) record(c string) {
	s.calls = append(s.calls, c)
}

func (s *fakeSystemd) Calls() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]string(nil), s.calls...)
}

func (s *fakeSystemd) DaemonReload(ctx context.Context) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.record("daemon-reload")
	return nil
}

func (s *fakeSystemd) Enable(ctx context.Context, unit string) (bool, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.record("enable " + unit)
	return true, nil
}

func (s *fakeSystemd) Start(ctx context.Context, unit string) (bool, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.record("start " + unit)
	if err := s.failStart[unit]; err != nil {
		return false, err
	}
	if s.active[unit] {
		return false, nil
	}
	s.active[unit] = true
	if m, ok := strings.CutPrefix(unit, "systemd-nspawn@"); ok {
		s.registered[strings.TrimSuffix(m, ".service")] = true
	}
	return true, nil
}

func (s *fakeSystemd) Restart(ctx context.Context, unit string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.record("restart " + unit)
	s.active[unit] = true
	return nil
}

func (s *fakeSystemd) Stop(ctx context.Context, unit string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.record("stop " + unit)
	s.active[unit] = false
	if m, ok := strings.CutPrefix(unit, "systemd-nspawn@"); ok && !s.stopKeepsMachine {
		delete(s.registered, strings.TrimSuffix(m, ".service"))
	}
	return nil
}

func (s *fakeSystemd) MachineRegistered(ctx context.Context, m string) (bool, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.regCalls++
	if s.regCalls <= s.registerAfter {
		return false, nil
	}
	return s.registered[m], nil
}

func (s *fakeSystemd) TerminateMachine(ctx context.Context, m string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.record("terminate " + m)
	delete(s.registered, m)
	return nil
}

func (s *fakeSystemd) UnitState(ctx context.Context, m, unit string) (string, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if m == "" {
		if st, ok := s.hostStates[unit]; ok {
			return st, nil
		}
		return "inactive", nil
	}
	seq := s.states[unit]
	if len(seq) == 0 {
		return "active", nil
	}
	st := seq[0]
	if len(seq) > 1 {
		s.states[unit] = seq[1:]
	}
	return st, nil
}

func (s *fakeSystemd) UnitRestarts(ctx context.Context, m, unit string) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.restarts == nil {
		return 0, nil
	}
	return s.restarts(m, unit), nil
}

func (s *fakeSystemd) Journal(ctx context.Context, m string, lines int) (string, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.record(fmt.Sprintf("journal %s -n %d", m, lines))
	return s.journal, nil
}

func (s *fakeSystemd) UnitJournal(ctx context.Context, unit string, lines int) (string, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.record(fmt.Sprintf("journal -u %s -n %d", unit, lines))
	return s.unitJournal[unit], nil
}

// testDeps returns fresh fakes for the fixture.
func testDeps() (Deps, *fakeHost, *fakeSystemd, *fakeDownloader) {
	h := &fakeHost{}
	sd := newFakeSystemd()
	dl := &fakeDownloader{remote: map[string]string{testRemoteURL: testRemote}}
	return Deps{Images: &fakeImages{}, Downloader: dl, Host: h, Systemd: sd}, h, sd, dl
}

// snapshot lists every entry under root: path, type, mode, owner, and the
// sha256 of a file or the target of a link. withIdentity adds inode and
// mtime, to show nothing was rewritten.
func snapshot(t testing.TB, root string, withIdentity bool) string {
	t.Helper()
	var lines []string
	err := filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(root, p)
		// The record and the machines state hold times, the lock its holder: bookkeeping, not
		// plan targets.
		if rel == strings.TrimPrefix(state.RecordFile, "/") || rel == strings.TrimPrefix(state.LockFile, "/") || rel == strings.TrimPrefix(state.MachinesFile, "/") {
			return nil
		}
		fi, err := os.Lstat(p)
		if err != nil {
			return err
		}
		st := fi.Sys().(*syscall.Stat_t)
		line := fmt.Sprintf("%s %s %04o %d:%d", rel, typeLetter(fi), uint32(st.Mode)&0o7777, st.Uid, st.Gid)
		switch {
		case fi.Mode().IsRegular():
			b, err := os.ReadFile(p)
			if err != nil {
				return err
			}
			line += " sha256:" + sha256Hex(string(b))[:16]
		case fi.Mode()&os.ModeSymlink != 0:
			target, err := os.Readlink(p)
			if err != nil {
				return err
			}
			line += " -> " + target
		}
		if withIdentity && !fi.IsDir() {
			line += fmt.Sprintf(" ino=%d mtime=%d", st.Ino, fi.ModTime().UnixNano())
		}
		lines = append(lines, line)
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	sort.Strings(lines)
	return strings.Join(lines, "\n") + "\n"
}

func typeLetter(fi os.FileInfo) string {
	switch {
	case fi.IsDir():
		return "d"
	case fi.Mode()&os.ModeSymlink != 0:
		return "l"
	case fi.Mode().IsRegular():
		return "f"
	}
	return "?"
}

var errInjected = errors.New("injected failure")
