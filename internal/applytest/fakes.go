package applytest

import (
	"context"
	"fmt"
	"os"
	"path"
	"path/filepath"
	"strings"
	"sync"

	"github.com/nodespawn/nodespawn/apply"
	"github.com/nodespawn/nodespawn/internal/confine"
	"github.com/nodespawn/nodespawn/plan"
)

// Images builds a small rootfs the way a real pull must: in a staging
// directory renamed into place. Its tree has the traps real images have: an
// absolute /var/run -> /run link and /etc/resolv.conf as a symlink.
type Images struct {
	mu    sync.Mutex
	pulls int
	// Before, when set, runs at the start of each Pull (ordering tests).
	Before func(ctx context.Context) error
}

func (f *Images) Pull(ctx context.Context, img *plan.Image, root *confine.Root, dest string) (bool, error) {
	// A fake at the seam: it builds with plain host paths under the test's
	// root.
	dest = root.Show(dest)
	if f.Before != nil {
		if err := f.Before(ctx); err != nil {
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

// Downloader "fetches" artifacts whose contents derive from their name;
// an archive installs two files under Dest.
type Downloader struct {
	mu      sync.Mutex
	Fetched []string
	// FetchStarted, when set, is closed by the first Fetch.
	FetchStarted chan struct{}
	once         sync.Once
	Fail         map[string]error // by download name
	Remote       map[string]string
	// BeforeInstall, when set, runs at the start of each Install.
	BeforeInstall func() error
}

func (f *Downloader) Fetch(ctx context.Context, d *plan.Download, root *confine.Root, dest string) (apply.Artifact, error) {
	f.mu.Lock()
	f.Fetched = append(f.Fetched, d.Name)
	f.mu.Unlock()
	if f.FetchStarted != nil {
		f.once.Do(func() { close(f.FetchStarted) })
	}
	if err := f.Fail[d.Name]; err != nil {
		return nil, err
	}
	files := map[string]string{dest: "binary " + d.Name + " " + d.Version + "\n"}
	if d.Archive != "" {
		files = map[string]string{
			path.Join(dest, "bridge"):   "cni bridge " + d.Version + "\n",
			path.Join(dest, "loopback"): "cni loopback " + d.Version + "\n",
		}
	}
	return &artifact{files: files, mode: confine.FileMode(d.Mode), before: f.BeforeInstall}, nil
}

func (f *Downloader) Contents(ctx context.Context, src *plan.Source) ([]byte, error) {
	c, ok := f.Remote[src.URL]
	if !ok {
		return nil, fmt.Errorf("GET %s: 404 Not Found", src.URL)
	}
	return []byte(c), nil
}

type artifact struct {
	files  map[string]string
	mode   os.FileMode
	before func() error
}

func (a *artifact) Install(ctx context.Context, root *confine.Root, dest string) (bool, error) {
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

// Host records host operations (Calls).
type Host struct {
	mu    sync.Mutex
	Calls []string
	// Block, when set, holds LoadModules until closed (lock tests).
	Block   chan struct{}
	Entered chan struct{}
}

func (h *Host) record(s string) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.Calls = append(h.Calls, s)
}

func (h *Host) EnsurePackages(ctx context.Context, names []string, install bool) error {
	h.record("packages " + strings.Join(names, ","))
	return nil
}

func (h *Host) LoadModules(ctx context.Context, names []string) error {
	h.record("modules " + strings.Join(names, ","))
	if h.Block != nil {
		close(h.Entered)
		<-h.Block
	}
	return nil
}

func (h *Host) ApplySysctls(ctx context.Context, values []plan.KeyValue) error {
	h.record(fmt.Sprintf("sysctl %v", values))
	return nil
}

func (h *Host) FlushNftables(ctx context.Context) error {
	h.record("nft-flush")
	return nil
}

func (h *Host) DisableSwap(ctx context.Context, fstab string) error {
	h.record("swap-off " + fstab)
	return nil
}

// Systemd is systemd and machined as seen through the Systemd seam:
// starting systemd-nspawn@<m>.service registers the machine; unit states
// inside follow a script.
type Systemd struct {
	mu         sync.Mutex
	calls      []string
	Active     map[string]bool
	Registered map[string]bool
	// States[unit] is the sequence UnitState returns; the last one repeats.
	States map[string][]string
	// RegisterAfter is how many MachineRegistered calls say no first.
	RegisterAfter int
	regCalls      int
	// StopKeepsMachine makes Stop leave the machine registered (reset must
	// terminate it).
	StopKeepsMachine bool
	MachineJournal   string
	UnitJournals     map[string]string
	// HostStates are the host units' states (UnitState with no machine).
	HostStates map[string]string
	FailStart  map[string]error
	// Restarts, when set, answers UnitRestarts.
	Restarts func(machine, unit string) int
}

// NewSystemd is a Systemd with no machine registered and every unit
// active.
func NewSystemd() *Systemd {
	return &Systemd{Active: map[string]bool{}, Registered: map[string]bool{}, States: map[string][]string{}}
}

func (s *Systemd) record(c string) {
	s.calls = append(s.calls, c)
}

// Calls are the calls made so far that change something (and the
// journal reads).
func (s *Systemd) Calls() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]string(nil), s.calls...)
}

func (s *Systemd) DaemonReload(ctx context.Context) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.record("daemon-reload")
	return nil
}

func (s *Systemd) Enable(ctx context.Context, unit string) (bool, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.record("enable " + unit)
	return true, nil
}

func (s *Systemd) Start(ctx context.Context, unit string) (bool, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.record("start " + unit)
	if err := s.FailStart[unit]; err != nil {
		return false, err
	}
	if s.Active[unit] {
		return false, nil
	}
	s.Active[unit] = true
	if m, ok := strings.CutPrefix(unit, "systemd-nspawn@"); ok {
		s.Registered[strings.TrimSuffix(m, ".service")] = true
	}
	return true, nil
}

func (s *Systemd) Restart(ctx context.Context, unit string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.record("restart " + unit)
	s.Active[unit] = true
	return nil
}

func (s *Systemd) Stop(ctx context.Context, unit string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.record("stop " + unit)
	s.Active[unit] = false
	if m, ok := strings.CutPrefix(unit, "systemd-nspawn@"); ok && !s.StopKeepsMachine {
		delete(s.Registered, strings.TrimSuffix(m, ".service"))
	}
	return nil
}

func (s *Systemd) MachineRegistered(ctx context.Context, m string) (bool, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.regCalls++
	if s.regCalls <= s.RegisterAfter {
		return false, nil
	}
	return s.Registered[m], nil
}

func (s *Systemd) TerminateMachine(ctx context.Context, m string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.record("terminate " + m)
	delete(s.Registered, m)
	return nil
}

func (s *Systemd) UnitState(ctx context.Context, m, unit string) (string, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if m == "" {
		if st, ok := s.HostStates[unit]; ok {
			return st, nil
		}
		return "inactive", nil
	}
	seq := s.States[unit]
	if len(seq) == 0 {
		return "active", nil
	}
	st := seq[0]
	if len(seq) > 1 {
		s.States[unit] = seq[1:]
	}
	return st, nil
}

func (s *Systemd) UnitRestarts(ctx context.Context, m, unit string) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.Restarts == nil {
		return 0, nil
	}
	return s.Restarts(m, unit), nil
}

func (s *Systemd) Journal(ctx context.Context, m string, lines int) (string, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.record(fmt.Sprintf("journal %s -n %d", m, lines))
	return s.MachineJournal, nil
}

func (s *Systemd) UnitJournal(ctx context.Context, unit string, lines int) (string, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.record(fmt.Sprintf("journal -u %s -n %d", unit, lines))
	return s.UnitJournals[unit], nil
}
