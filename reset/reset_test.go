package reset

import (
	"bytes"
	"context"
	"errors"
	"log/slog"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/nodespawn/nodespawn/apply"
	"github.com/nodespawn/nodespawn/internal/applytest"
	"github.com/nodespawn/nodespawn/internal/layout"
	"github.com/nodespawn/nodespawn/plan"
	"github.com/nodespawn/nodespawn/state"
	"golang.org/x/sys/unix"
)

// appliedRoot returns a root the fixture plan was applied to, with a
// sysctl.d file and the first-boot unit as apply and install leave them.
func appliedRoot(t *testing.T) (string, *plan.Plan) {
	t.Helper()
	root := t.TempDir()
	applytest.PrepareRoot(t, root)
	p := applytest.Plan()
	p.Steps = append(p.Steps[:1:1], p.Steps...)
	p.Steps[0] = plan.Step{ID: "host:file:sysctl", Phase: plan.PhaseHost, Kind: plan.KindFile,
		File: &plan.File{Path: "/etc/sysctl.d/90-nodespawn.conf", Mode: 0o644, Contents: "net.ipv4.ip_forward = 1\n", Overwrite: true}}
	deps, _, _, _ := applytest.Deps()
	opts := applytest.Options(deps, slog.New(slog.DiscardHandler))
	opts.Root = root
	if _, err := applytest.Run(context.Background(), p, opts); err != nil {
		t.Fatal(err)
	}
	applytest.Must(t, apply.InstallFirstboot(root, ""))
	return root, p
}

func exists(root, p string) bool {
	_, err := os.Lstat(filepath.Join(root, p))
	return err == nil
}

func TestReset(t *testing.T) {
	removed := []string{
		applytest.Rootfs,
		"/etc/systemd/nspawn/kube1.nspawn",
		"/etc/systemd/system/systemd-nspawn@kube1.service.d",
		"/etc/systemd/system/machines.target.wants/systemd-nspawn@kube1.service",
		state.Dir,
	}
	kept := []string{"/etc/keep.conf", "/etc/passwd", "/etc/sysctl.d/90-nodespawn.conf", "/etc/systemd/system/" + apply.FirstbootUnitName}

	tests := []struct {
		name     string
		withPlan bool
		// stopKeeps: the machine stays registered after the stop, so reset
		// must terminate it.
		stopKeeps bool
		wantCalls []string
		wantLog   []string
	}{
		{
			name: "with plan", withPlan: true,
			wantCalls: []string{"stop systemd-nspawn@kube1.service", "daemon-reload"},
			wantLog:   []string{"file /etc/sysctl.d/90-nodespawn.conf", "loaded kernel modules overlay, br_netfilter", "1 sysctl values", apply.FirstbootUnitName},
		},
		{
			name: "machine name only, machine hangs", stopKeeps: true,
			wantCalls: []string{"stop systemd-nspawn@kube1.service", "terminate kube1", "daemon-reload"},
			wantLog:   []string{"file /etc/sysctl.d/90-nodespawn.conf", "installed packages"},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			root, p := appliedRoot(t)
			sd := applytest.NewSystemd()
			sd.Registered["kube1"] = true
			sd.StopKeepsMachine = tt.stopKeeps
			var logs bytes.Buffer
			opts := Options{Root: root, Machine: "kube1", Systemd: sd, Log: slog.New(slog.NewTextHandler(&logs, nil)),
				PollInterval: time.Millisecond, StopTimeout: 50 * time.Millisecond}
			if tt.withPlan {
				opts.Plan, opts.Machine = p, ""
			}
			// The dry run changes nothing and lists what Reset then removes,
			// exactly.
			before := applytest.Snapshot(t, root, true)
			rp, err := Plan(context.Background(), opts)
			if err != nil {
				t.Fatal(err)
			}
			if after := applytest.Snapshot(t, root, true); after != before || len(sd.Calls()) != 0 {
				t.Fatalf("Plan changed the root or called systemd %q", sd.Calls())
			}
			if rp.Machine != "kube1" || !slices.Equal(rp.Stop, []string{"kube1"}) {
				t.Errorf("dry run: machine %q, stops %q; want kube1", rp.Machine, rp.Stop)
			}
			for _, want := range tt.wantLog {
				if !slices.ContainsFunc(rp.Leave, func(l string) bool { return strings.Contains(l, want) }) {
					t.Errorf("dry run leaves %q; want %q among them", rp.Leave, want)
				}
			}
			logs.Reset()
			if err := Run(context.Background(), opts); err != nil {
				t.Fatalf("Reset: %v\n%s", err, logs.String())
			}
			var gone []string
			for _, m := range regexp.MustCompile(`msg=removed path=(\S+)`).FindAllStringSubmatch(logs.String(), -1) {
				gone = append(gone, m[1])
			}
			if !slices.Equal(rp.Remove, gone) {
				t.Errorf("dry run would remove\n  %s\nReset removed\n  %s", strings.Join(rp.Remove, "\n  "), strings.Join(gone, "\n  "))
			}
			for _, p := range kept {
				if slices.Contains(rp.Remove, filepath.Join(root, p)) {
					t.Errorf("dry run lists %s, which reset keeps", p)
				}
			}
			for _, p := range removed {
				if exists(root, p) {
					t.Errorf("%s still there", p)
				}
			}
			for _, p := range kept {
				if !exists(root, p) {
					t.Errorf("%s removed; reset must leave host settings alone", p)
				}
			}
			if got := sd.Calls(); !slices.Equal(got, tt.wantCalls) {
				t.Errorf("systemd calls %q, want %q", got, tt.wantCalls)
			}
			for _, want := range tt.wantLog {
				if !strings.Contains(logs.String(), want) {
					t.Errorf("log does not mention %q:\n%s", want, logs.String())
				}
			}
			// Reset is repeatable: a second one finds nothing and succeeds.
			if err := Run(context.Background(), opts); err != nil {
				t.Errorf("second Reset: %v", err)
			}
		})
	}
}

func TestResetRefusesBadTargets(t *testing.T) {
	root := t.TempDir()
	tests := []struct {
		name string
		opts Options
		want string
	}{
		{"path in name", Options{Machine: "../etc"}, "invalid machine name"},
		{"empty name", Options{}, "invalid machine name"},
		{"rootfs elsewhere", Options{Plan: &plan.Plan{Machine: "kube1", Rootfs: "/etc"}}, "not directly under /var/lib/machines"},
		{"machines dir itself", Options{Plan: &plan.Plan{Machine: "kube1", Rootfs: "/var/lib/machines/"}}, "not directly under"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			tt.opts.Root = root
			err := Run(context.Background(), tt.opts)
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Errorf("Reset = %v, want %q", err, tt.want)
			}
		})
	}
}

// TestResetRetriesBusyRootfs mounts a real tmpfs inside the rootfs (as a
// machine's lingering mount would be) and lifts it only once reset has
// met "busy".
func TestResetRetriesBusyRootfs(t *testing.T) {
	root, _ := appliedRoot(t)
	mnt := filepath.Join(root, applytest.Rootfs, "mnt")
	applytest.Must(t, os.MkdirAll(mnt, 0o755))
	if err := unix.Mount("tmpfs", mnt, "tmpfs", 0, "size=1m"); err != nil {
		if errors.Is(err, unix.EPERM) {
			t.Skipf("mounting a tmpfs needs CAP_SYS_ADMIN (CI runs as root): %v", err)
		}
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Unmount(mnt, unix.MNT_DETACH) })

	log, busy := applytest.SignalLog("rootfs busy")
	go func(mnt string) {
		<-busy
		unix.Unmount(mnt, 0)
	}(mnt)
	err := Run(context.Background(), Options{Root: root, Machine: "kube1", Log: log, PollInterval: time.Millisecond})
	if err != nil {
		t.Fatalf("Reset: %v", err)
	}
	if exists(root, applytest.Rootfs) {
		t.Error("rootfs still there")
	}

	// A mount that never goes away: bounded, and the error says what to look at.
	root, _ = appliedRoot(t)
	mnt = filepath.Join(root, applytest.Rootfs, "mnt")
	applytest.Must(t, os.MkdirAll(mnt, 0o755))
	applytest.Must(t, unix.Mount("tmpfs", mnt, "tmpfs", 0, "size=1m"))
	t.Cleanup(func() { unix.Unmount(mnt, unix.MNT_DETACH) })
	err = Run(context.Background(), Options{Root: root, Machine: "kube1", Log: slog.New(slog.DiscardHandler),
		PollInterval: time.Millisecond, RemoveTimeout: 20 * time.Millisecond})
	if err == nil || !errors.Is(err, unix.EBUSY) || !strings.Contains(err.Error(), "findmnt") {
		t.Errorf("Reset with a stuck mount = %v, want EBUSY naming findmnt", err)
	}
}

func TestResetRemovesBothMachinesAndTheNodeState(t *testing.T) {
	root, sd, _, err := applytest.LiveUpgrade(t, nil)
	if err != nil {
		t.Fatal(err)
	}
	nodeState := filepath.Join(root, "var/lib/nodespawn/node/kubelet/pki")
	applytest.Must(t, os.MkdirAll(nodeState, 0o700))
	p, err := apply.StoredPlan(root)
	if err != nil || p == nil || p.Machine != "kube2" {
		t.Fatalf("stored plan %v %v; want kube2's", p, err)
	}
	if err := Run(context.Background(), Options{Root: root, Plan: p, Systemd: sd, PollInterval: time.Millisecond}); err != nil {
		t.Fatal(err)
	}
	for _, gone := range []string{"var/lib/machines/kube1", "var/lib/machines/kube2", "var/lib/nodespawn",
		"etc/systemd/nspawn/kube1.nspawn", "etc/systemd/nspawn/kube2.nspawn", strings.TrimPrefix(layout.EnableLink("kube2"), "/")} {
		if _, err := os.Lstat(filepath.Join(root, gone)); err == nil {
			t.Errorf("%s is still there after reset", gone)
		}
	}
	if len(sd.State().Registered) != 0 {
		t.Errorf("machines still running after reset: %v", sd.State().Registered)
	}
}
