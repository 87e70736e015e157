// Package machine acts on one machine of the node on the host, outside a
// plan's run: it looks at the machine's root composed from the layer store
// (CheckRoot), stops the machine (Stop), and removes it with what apply
// wrote for it (Remove). apply uses it to repair a root and to clear the
// other machine of the pair before an upgrade, reset to remove the node's
// machines, status to look at the active machine's root.
package machine

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"path"
	"slices"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/nodespawn/nodespawn/internal/confine"
	"github.com/nodespawn/nodespawn/internal/layers"
	"github.com/nodespawn/nodespawn/internal/layout"
	"github.com/nodespawn/nodespawn/internal/retry"
	"github.com/nodespawn/nodespawn/plan"
)

// Defaults of the waits.
const (
	// DefaultRemoveTimeout bounds the retries of a removal (or unmount)
	// that fails with "busy".
	DefaultRemoveTimeout = time.Minute
	// DefaultPollInterval is how often a wait on systemd or machined
	// looks again.
	DefaultPollInterval = 2 * time.Second
)

// Systemd is what Stop and Remove need of the host's service manager and
// machined (apply.Systemd has it; the real one is internal/systemd).
type Systemd interface {
	// Stop stops unit and waits for the job's result; stopping an inactive
	// or unknown unit is not an error.
	Stop(ctx context.Context, unit string) error
	// MachineRegistered reports whether machined knows the machine.
	MachineRegistered(ctx context.Context, machine string) (bool, error)
	// TerminateMachine asks machined to kill the machine.
	TerminateMachine(ctx context.Context, machine string) error
}

// RemoveOptions bound the waits of Remove.
type RemoveOptions struct {
	// StopTimeout bounds the stop (Stop's timeout).
	StopTimeout time.Duration
	// RemoveTimeout bounds the retries of an unmount or removal that
	// fails with "busy".
	RemoveTimeout time.Duration
	// Poll is how often a wait looks again.
	Poll time.Duration
	Log  *slog.Logger
	// Keep are host paths another machine's plan wrote too (the unit that
	// flushes nftables, the machines.target link, extra units): removing
	// the other machine must leave them to the machine that runs.
	Keep []string
}

// Remove stops machine m (when sd is set), and removes its rootfs, what an
// image pull keeps beside it, the systemd files and links p says were
// written for it (or systemd's names for them without p), and its bpffs.
func Remove(ctx context.Context, host *confine.Root, sd Systemd, m string, p *plan.Plan, o RemoveOptions) error {
	rootfs, err := Rootfs(m, p)
	if err != nil {
		return err
	}
	if sd != nil {
		if err := Stop(ctx, sd, o.Log, m, o.StopTimeout, o.Poll); err != nil {
			return fmt.Errorf("reset: %w", err)
		}
	}
	// A root composed from the layer store is unmounted first (a no-op for
	// a flattened one), so what is below the mount point is never removed
	// through it.
	if err := layers.Unmount(ctx, host, rootfs, o.RemoveTimeout, o.Log); err != nil {
		return fmt.Errorf("reset: %w", err)
	}
	// A mount unit an older nodespawn wrote for the root (the machine's
	// service mounts it now); one someone else wrote stays.
	if _, err := layers.RemoveLegacyUnit(host, layers.LegacyUnit(rootfs), o.Log); err != nil {
		return fmt.Errorf("reset: %w", err)
	}
	if err := removeBusy(ctx, host, rootfs, o.RemoveTimeout, o.Poll, o.Log); err != nil {
		return err
	}
	for _, q := range Files(host, rootfs, m, p, o.Keep) {
		if err := host.RemoveAll(q); err != nil {
			return fmt.Errorf("reset: %w", err)
		}
		o.Log.Info("removed", "path", host.Show(q))
	}
	return removeBPFFS(host, m, sd != nil, o.Log)
}

// Rootfs is machine m's rootfs, made from p (nil: systemd's name for it),
// refused unless it is directly under the machines directory.
func Rootfs(m string, p *plan.Plan) (string, error) {
	rootfs := layout.MachineRoot(m)
	if p != nil && p.Rootfs != "" {
		rootfs = p.Rootfs
	}
	if err := CheckRootfs(rootfs); err != nil {
		return "", err
	}
	return rootfs, nil
}

// CheckRootfs refuses a rootfs that is not directly under the machines
// directory: never RemoveAll something a typo or a bad plan points at.
func CheckRootfs(rootfs string) error {
	if path.Clean(rootfs) != layout.MachineRoot(path.Base(rootfs)) {
		return fmt.Errorf("reset: refusing to remove rootfs %s: not directly under %s", rootfs, layout.MachinesDir)
	}
	return nil
}

// Files are the paths Remove removes after the rootfs, those that exist:
// what an image pull keeps beside the rootfs (its marker and leftovers of
// an interrupted pull) and SystemdFiles, less keep.
func Files(host *confine.Root, rootfs, m string, p *plan.Plan, keep []string) []string {
	var remove []string
	if es, err := host.ReadDir(path.Dir(rootfs)); err == nil {
		for _, e := range es {
			if strings.HasPrefix(e.Name(), "."+path.Base(rootfs)+".") {
				remove = append(remove, path.Join(path.Dir(rootfs), e.Name()))
			}
		}
	}
	remove = append(remove, SystemdFiles(m, p)...)
	var out []string
	for _, q := range remove {
		if slices.Contains(keep, q) {
			continue
		}
		if _, err := host.Lstat(q); errors.Is(err, fs.ErrNotExist) {
			continue
		}
		out = append(out, q)
	}
	return out
}

// stopSlack is how much longer than the stop timeout a stop job may take:
// systemd kills the machine at the drop-in's TimeoutStopSec, the same
// timeout, and needs a moment for that.
const stopSlack = 10 * time.Second

// Stop stops the machine's service, waiting for the stop job up to
// timeout (kubelet's graceful shutdown gets its time), then until machined
// forgets the machine. One still listed a moment later is terminated and
// given half the timeout again to go.
func Stop(ctx context.Context, sd Systemd, log *slog.Logger, m string, timeout, poll time.Duration) error {
	unit := layout.NspawnUnit(m)
	sctx, cancel := context.WithTimeout(ctx, timeout+stopSlack)
	err := sd.Stop(sctx, unit)
	cancel()
	if err != nil {
		if ctx.Err() != nil {
			return ctx.Err()
		}
		log.Warn("stopping the machine failed or took too long; terminating it", "unit", unit, "error", err)
	}
	// machined forgets a machine a moment after its unit stopped.
	linger := time.Now().Add(min(timeout/2, 15*time.Second))
	var deadline time.Time
	terminated := false
	for {
		registered, err := sd.MachineRegistered(ctx, m)
		if err != nil {
			return err
		}
		if !registered {
			log.Info("machine stopped", "machine", m)
			return nil
		}
		now := time.Now()
		switch {
		case !terminated && now.After(linger):
			log.Warn("machine still registered after stop; terminating it", "machine", m)
			if err := sd.TerminateMachine(ctx, m); err != nil {
				return err
			}
			terminated, deadline = true, now.Add(timeout/2)
			continue
		case terminated && now.After(deadline):
			return fmt.Errorf("machine %s still registered with machined after stopping %s and terminating it; see machinectl status %s", m, unit, m)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(poll):
		}
	}
}

// removeBusy removes dir, retrying with growing pauses while the kernel
// says it is busy (a machine's mounts linger a moment after it stopped).
func removeBusy(ctx context.Context, host *confine.Root, dir string, timeout, pause time.Duration, log *slog.Logger) error {
	deadline := time.Now().Add(timeout)
	backoff := retry.Policy{Base: pause, Max: 10 * time.Second}
	for try := 1; ; try++ {
		err := host.RemoveAll(dir)
		if err == nil {
			log.Info("removed", "path", host.Show(dir))
			return nil
		}
		if !errors.Is(err, syscall.EBUSY) || time.Now().After(deadline) {
			return fmt.Errorf("reset: remove rootfs: %w (is something still mounted below it? see findmnt -R %s)", err, host.Show(dir))
		}
		wait := backoff.Ceiling(try)
		log.Info("rootfs busy; retrying", "path", host.Show(dir), "error", err, "in", wait)
		if err := retry.Sleep(ctx, wait); err != nil {
			return err
		}
	}
}

// SystemdFiles lists the host paths Remove removes besides the rootfs.
// With the applied plan, they are every systemd file and link its host
// phase wrote (a per-machine directory whole). Without one (reset
// --machine on a host with no stored plan), they are the names systemd
// itself gives a machine's settings (systemd.nspawn(5), systemctl enable).
func SystemdFiles(m string, p *plan.Plan) []string {
	svc := layout.NspawnUnit(m)
	if p == nil {
		return []string{layout.NspawnFile(m), layout.NspawnDropInDir(m), layout.EnableLink(m)}
	}
	var paths []string
	seen := map[string]bool{}
	for _, s := range p.Steps {
		if s.Phase != plan.PhaseHost && s.Phase != plan.PhaseStart {
			continue
		}
		var q string
		switch {
		case s.File != nil:
			q = s.File.Path
		case s.Link != nil:
			q = s.Link.Path
		case s.Directory != nil:
			q = s.Directory.Path
		}
		if !strings.HasPrefix(q, layout.SystemdConfDir+"/") {
			continue
		}
		if d := path.Dir(q); strings.HasPrefix(path.Base(d), svc) {
			q = d
		}
		if !seen[q] {
			seen[q] = true
			paths = append(paths, q)
		}
	}
	return paths
}

// removeBPFFS unmounts the machine's bpffs on a live host and removes its
// directory. The directory is removed only once it is empty and no longer
// a mount point: what is pinned in a still-mounted bpffs is not deleted.
func removeBPFFS(host *confine.Root, m string, live bool, log *slog.Logger) error {
	dir := layout.BPFFSDir(m)
	if _, err := host.Lstat(dir); errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if live {
		// The host root is "/": host.Show(dir) is the real path.
		for i := 0; i < 8; i++ {
			err := unix.Unmount(host.Show(dir), unix.MNT_DETACH|unix.UMOUNT_NOFOLLOW)
			if errors.Is(err, unix.EINVAL) || errors.Is(err, unix.ENOENT) {
				break // not (or no longer) a mount point
			}
			if err != nil {
				return fmt.Errorf("reset: unmount the machine's bpffs %s: %w", host.Show(dir), err)
			}
			log.Info("unmounted", "path", host.Show(dir))
		}
	}
	if err := host.Remove(dir); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("reset: remove the machine's bpffs directory: %w (is it still mounted? see findmnt %s)", err, host.Show(dir))
	}
	log.Info("removed", "path", host.Show(dir))
	return nil
}
