// Package applytest holds the test fixture that the tests of apply, status
// and reset share: the fixture plan and root, fakes at apply's Deps seams
// (images, downloads, host operations, systemd, and a systemd whose state
// survives the process for the crash tests), and builders that apply the
// fixture or upgrade a node with them. It is a test helper: only _test.go
// files import it.
//
// apply's own tests are in package apply_test for this reason: applytest
// imports apply, so a test inside package apply could not import it.
package applytest

import (
	"context"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"syscall"
	"testing"

	"github.com/nodespawn/nodespawn/apply"
	"github.com/nodespawn/nodespawn/plan"
	"github.com/nodespawn/nodespawn/provision"
	"github.com/nodespawn/nodespawn/state"
)

// The fixture: a plan touching every file, directory and link kind in the
// host and in the rootfs, plus every other kind through fakes at the Deps
// seams. Owners by name resolve differently on the host (kube = 3001) and
// in the rootfs (kube = 2001), so a lookup in the wrong passwd shows.

// The fixture plan's machine and names.
const (
	Machine   = "kube1"
	Rootfs    = "/var/lib/machines/kube1"
	Secret    = "TOKEN-s3cr3t-abcdef"
	RemoteURL = "https://files.test/extra.conf"
	Remote    = "remote file contents\n"
	// Kept is what the operator's own file holds; Overwrite=false keeps it.
	Kept = "operator's own settings\n"
)

// SHA256Hex is the hex sha256 of s.
func SHA256Hex(s string) string {
	sum := sha256.Sum256([]byte(s))
	return hex.EncodeToString(sum[:])
}

// RootfsPath is a plan path inside the machine's rootfs.
func RootfsPath(p string) string { return Rootfs + p }

// Plan is the fixture plan for machine kube1.
func Plan() *plan.Plan {
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

		{ID: "rootfs:image", Phase: R, Kind: plan.KindImage, Image: &plan.Image{Dest: Rootfs, Reference: "registry.test/base:1", Platform: "linux/amd64"}},
		{ID: "rootfs:download:kubelet", Phase: R, Kind: plan.KindDownload, After: []string{"rootfs:image"},
			Download: &plan.Download{Name: "kubelet", Version: "v1.37.2", URL: "https://dl.test/kubelet", SHA256: SHA256Hex("kubelet"), Dest: RootfsPath("/usr/local/bin/kubelet"), Mode: 0o755}},
		{ID: "rootfs:download:cni", Phase: R, Kind: plan.KindDownload, After: []string{"rootfs:image"},
			Download: &plan.Download{Name: "cni", Version: "v1.10.0", URL: "https://dl.test/cni.tgz", SHA256: SHA256Hex("cni"), Dest: RootfsPath("/opt/cni/bin"), Mode: 0o755, Archive: "tar.gz"}},

		file("machine:file:hostname", M, RootfsPath("/etc/hostname"), 0o644, "node-1\n"),
		file("machine:file:kubeconfig", M, RootfsPath("/var/lib/kubelet/bootstrap-kubeconfig"), 0o644, "token: "+Secret+"\n",
			func(f *plan.File) { f.Secret = true; f.Owner = kube }),
		file("machine:file:ca", M, RootfsPath("/etc/kubernetes/pki/ca.crt"), 0o644, base64.StdEncoding.EncodeToString([]byte("\x00binary\xffca\n")),
			func(f *plan.File) { f.Encoding = "base64" }),
		file("machine:file:resolv", M, RootfsPath("/etc/resolv.conf"), 0o644, "nameserver 192.0.2.53\n"),
		file("machine:file:escape", M, RootfsPath("/var/run/nodespawn-test"), 0o644, "inside the rootfs\n"),
		file("machine:file:remote", M, RootfsPath("/etc/extra.conf"), 0o644, "", func(f *plan.File) {
			f.Source = &plan.Source{URL: RemoteURL, Hash: "sha256-" + SHA256Hex(Remote)}
		}),
		file("machine:file:suid", M, RootfsPath("/usr/local/bin/helper"), 0o4755, "#!/bin/sh\n"),
		dir("machine:dir:manifests", M, RootfsPath("/etc/kubernetes/manifests"), 0o700, owner),
		dir("machine:dir:kubelet", M, RootfsPath("/var/lib/kubelet/pki"), 0o750, kube),
		link("machine:link:mask-resolved", M, RootfsPath("/etc/systemd/system/systemd-resolved.service"), "/dev/null", false),
		file("machine:file:kubelet-unit", M, RootfsPath("/etc/systemd/system/kubelet.service"), 0o644, "[Service]\nExecStart=/usr/local/bin/kubelet\n"),
		link("machine:link:wants-kubelet", M, RootfsPath("/etc/systemd/system/multi-user.target.wants/kubelet.service"), "/etc/systemd/system/kubelet.service", false),
		link("machine:link:hard", M, RootfsPath("/usr/bin/kubelet"), RootfsPath("/usr/local/bin/kubelet"), true),

		{ID: "start:reload", Phase: S, Kind: plan.KindSystemd, Systemd: &plan.Systemd{Action: "daemon-reload"}},
		{ID: "start:flush", Phase: S, Kind: plan.KindSystemd, After: []string{"start:reload"}, Systemd: &plan.Systemd{Action: "start", Unit: "nodespawn-nft-flush.service"}},
		{ID: "start:machine", Phase: S, Kind: plan.KindSystemd, After: []string{"start:flush"}, Systemd: &plan.Systemd{Action: "start", Unit: "systemd-nspawn@kube1.service"}},
		{ID: "start:wait", Phase: S, Kind: plan.KindWait, After: []string{"start:machine"},
			Wait: &plan.Wait{Machine: Machine, Units: []string{"containerd.service", "kubelet.service"}, TimeoutSeconds: 60}},
	}
	return &plan.Plan{Version: plan.Version, Machine: Machine, Rootfs: Rootfs, NodeName: "node-1", Steps: steps}
}

// PrepareRoot gives a fresh root the host files the fixture expects.
func PrepareRoot(t testing.TB, root string) {
	t.Helper()
	Must(t, os.MkdirAll(filepath.Join(root, "etc"), 0o755))
	Must(t, os.WriteFile(filepath.Join(root, "etc/passwd"), []byte("root:x:0:0:root:/root:/bin/sh\nkube:x:3001:3001::/:/bin/false\n"), 0o644))
	Must(t, os.WriteFile(filepath.Join(root, "etc/group"), []byte("root:x:0:\nkube:x:3001:\n"), 0o644))
	Must(t, os.WriteFile(filepath.Join(root, "etc/keep.conf"), []byte(Kept), 0o600))
}

// Must fails the test at once on an error.
func Must(t testing.TB, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

// Deps returns fresh fakes for the fixture, and the fakes themselves.
func Deps() (apply.Deps, *Host, *Systemd, *Downloader) {
	h := &Host{}
	sd := NewSystemd()
	dl := &Downloader{Remote: map[string]string{RemoteURL: Remote}}
	return apply.Deps{Images: &Images{}, Downloader: dl, Host: h, Systemd: sd}, h, sd, dl
}

// Snapshot lists every entry under root: path, type, mode, owner, and the
// sha256 of a file or the target of a link. withIdentity adds inode and
// mtime, to show nothing was rewritten.
func Snapshot(t testing.TB, root string, withIdentity bool) string {
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
		line := fmt.Sprintf("%s %s %04o %d:%d", rel, TypeLetter(fi), uint32(st.Mode)&0o7777, st.Uid, st.Gid)
		switch {
		case fi.Mode().IsRegular():
			b, err := os.ReadFile(p)
			if err != nil {
				return err
			}
			line += " sha256:" + SHA256Hex(string(b))[:16]
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

// TypeLetter is d, l, f or ? for fi's type, as Snapshot writes it.
func TypeLetter(fi os.FileInfo) string {
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

// Digest is the manifest digest the fixture's runs record.
const Digest = "sha256:1111111111111111111111111111111111111111111111111111111111111111"

// Options are Run's options for the fixture with deps, logging to log.
func Options(deps apply.Deps, log *slog.Logger) apply.Options {
	return apply.Options{ManifestDigest: Digest, ToolVersion: "test", Deps: deps, Log: log, PollInterval: 1}
}

// Apply applies the fixture plan into root, the named downloads
// failing with the given errors.
func Apply(t *testing.T, root string, fail map[string]error) {
	t.Helper()
	PrepareRoot(t, root)
	deps, _, _, dl := Deps()
	dl.Fail = fail
	opts := Options(deps, slog.New(slog.DiscardHandler))
	opts.Root = root
	_, err := Run(context.Background(), Plan(), opts)
	if (err != nil) != (len(fail) > 0) {
		t.Fatalf("apply: %v", err)
	}
	Must(t, os.WriteFile(filepath.Join(root, "etc/hostname"), []byte("node\n"), 0o644))
}

// signalHandler is a slog handler that closes a channel when a message
// containing want is logged, so tests wait for an event, not for time.
type signalHandler struct {
	want string
	ch   chan struct{}
	once *sync.Once
}

// SignalLog returns a logger whose channel is closed once a message
// containing want is logged.
func SignalLog(want string) (*slog.Logger, <-chan struct{}) {
	h := signalHandler{want: want, ch: make(chan struct{}), once: &sync.Once{}}
	return slog.New(h), h.ch
}

func (h signalHandler) Enabled(context.Context, slog.Level) bool { return true }

func (h signalHandler) Handle(_ context.Context, r slog.Record) error {
	if strings.Contains(r.Message, h.want) {
		h.once.Do(func() { close(h.ch) })
	}
	return nil
}

func (h signalHandler) WithAttrs([]slog.Attr) slog.Handler { return h }

func (h signalHandler) WithGroup(string) slog.Handler { return h }

// StartBlockedApply starts a Run that holds the lock inside its first host
// step until release is called.
func StartBlockedApply(t *testing.T, root string) (release func() error) {
	t.Helper()
	deps, host, _, _ := Deps()
	host.Block, host.Entered = make(chan struct{}), make(chan struct{})
	opts := Options(deps, slog.New(slog.DiscardHandler))
	opts.Root = root
	done := make(chan error, 1)
	go func() {
		_, err := Run(context.Background(), Plan(), opts)
		done <- err
	}()
	<-host.Entered
	return func() error {
		close(host.Block)
		return <-done
	}
}

// Run is provision.Apply without the decision: what `nodespawn apply`
// runs once the plan is made (lock, resume, decide, in place or upgrade).
func Run(ctx context.Context, p *plan.Plan, opts apply.Options) (*apply.Result, error) {
	res, _, err := provision.Apply(ctx, p, opts)
	return res, err
}
