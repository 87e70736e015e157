package apply

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"time"

	"github.com/nodespawn/nodespawn/render"
)

// Defaults for ResetOptions.
const (
	DefaultStopTimeout   = time.Minute
	DefaultRemoveTimeout = time.Minute
)

// machinesDir is where machined keeps machine root directories.
const machinesDir = "/var/lib/machines"

// ResetOptions configure Reset.
type ResetOptions struct {
	// Root is the directory every path is relative to; "" means "/".
	Root string
	// Plan, when set, is the plan that was applied (rendered again from
	// the stored manifest): its machine and rootfs are removed, and so is
	// every systemd file its host phase wrote.
	Plan *render.Plan
	// Machine is the machine name when there is no Plan.
	Machine string
	// Systemd stops the machine and reloads systemd; nil skips both
	// (for a Root that is not a live system).
	Systemd Systemd
	// Log receives what Reset does and what it leaves; nil means slog.Default().
	Log *slog.Logger
	// LockTimeout bounds the wait for a running apply (default 2m).
	LockTimeout time.Duration
	// StopTimeout bounds the wait for machined to forget the machine (default 1m).
	StopTimeout time.Duration
	// RemoveTimeout bounds the retries of a rootfs removal that fails
	// with "busy" (default 1m).
	RemoveTimeout time.Duration
	// PollInterval is how often Reset looks again (default 2s).
	PollInterval time.Duration
}

// machineName is what machined accepts, and what is safe in a path.
var machineName = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$`)

// Reset stops the machine and removes it and what apply wrote for it: the
// rootfs, the .nspawn file, the service drop-ins, the machines.target
// link, the nftables flush unit and the state directory; then reloads
// systemd. Host settings (sysctls, modules-load, swap, packages) stay as
// they are; Reset logs each one it leaves.
func Reset(ctx context.Context, opts ResetOptions) error {
	if opts.Root == "" {
		opts.Root = "/"
	}
	if opts.Log == nil {
		opts.Log = slog.Default()
	}
	if opts.LockTimeout <= 0 {
		opts.LockTimeout = DefaultLockTimeout
	}
	if opts.StopTimeout <= 0 {
		opts.StopTimeout = DefaultStopTimeout
	}
	if opts.RemoveTimeout <= 0 {
		opts.RemoveTimeout = DefaultRemoveTimeout
	}
	if opts.PollInterval <= 0 {
		opts.PollInterval = DefaultPollInterval
	}
	log := opts.Log
	m, rootfs := opts.Machine, ""
	if opts.Plan != nil {
		m, rootfs = opts.Plan.Machine, opts.Plan.Rootfs
	}
	if !machineName.MatchString(m) {
		return fmt.Errorf("reset: invalid machine name %q", m)
	}
	if rootfs == "" {
		rootfs = filepath.Join(machinesDir, m)
	}
	if filepath.Clean(rootfs) != filepath.Join(machinesDir, filepath.Base(rootfs)) {
		// Never RemoveAll something a typo or a bad plan points at.
		return fmt.Errorf("reset: refusing to remove rootfs %s: not directly under %s", rootfs, machinesDir)
	}

	lock, err := acquireLock(ctx, opts.Root, opts.LockTimeout, log)
	if err != nil {
		return err
	}
	defer lock.release()

	if opts.Systemd != nil {
		if err := stopMachine(ctx, opts, m); err != nil {
			return err
		}
	} else {
		log.Warn("not stopping the machine: no systemd (root is not /)", "machine", m, "root", opts.Root)
	}

	hostRootfs := filepath.Join(opts.Root, rootfs)
	if err := removeBusy(ctx, hostRootfs, opts.RemoveTimeout, opts.PollInterval, log); err != nil {
		return err
	}
	// What an image pull keeps beside the rootfs: its marker and leftovers
	// of an interrupted pull.
	beside, _ := filepath.Glob(filepath.Join(filepath.Dir(hostRootfs), "."+filepath.Base(hostRootfs)+".*"))
	remove := append([]string{}, beside...)
	for _, p := range resetPaths(m, opts.Plan) {
		remove = append(remove, filepath.Join(opts.Root, p))
	}
	remove = append(remove, filepath.Join(opts.Root, StateDir))
	for _, p := range remove {
		if _, err := os.Lstat(p); errors.Is(err, os.ErrNotExist) {
			continue
		}
		if err := os.RemoveAll(p); err != nil {
			return fmt.Errorf("reset: remove %s: %w", p, err)
		}
		log.Info("removed", "path", p)
	}
	if opts.Systemd != nil {
		if err := opts.Systemd.DaemonReload(ctx); err != nil {
			return fmt.Errorf("reset: %w", err)
		}
	}
	for _, s := range leftInPlace(opts.Root, opts.Plan) {
		log.Info("left in place", "setting", s)
	}
	log.Info("reset finished", "machine", m)
	return nil
}

// stopMachine stops the machine's service and waits until machined forgets
// the machine, terminating it when a stop alone does not do it in half the
// time.
func stopMachine(ctx context.Context, opts ResetOptions, m string) error {
	sd, log := opts.Systemd, opts.Log
	unit := "systemd-nspawn@" + m + ".service"
	if err := sd.Stop(ctx, unit); err != nil {
		log.Warn("stopping the machine failed; terminating it", "unit", unit, "error", err)
	}
	deadline := time.Now().Add(opts.StopTimeout)
	terminated := false
	for {
		registered, err := sd.MachineRegistered(ctx, m)
		if err != nil {
			return fmt.Errorf("reset: %w", err)
		}
		if !registered {
			log.Info("machine stopped", "machine", m)
			return nil
		}
		now := time.Now()
		if terminated && now.After(deadline) {
			return fmt.Errorf("reset: machine %s still registered with machined %s after stopping %s; see machinectl status %s", m, opts.StopTimeout, unit, m)
		}
		if !terminated && now.After(deadline.Add(-opts.StopTimeout/2)) {
			log.Warn("machine still registered after stop; terminating it", "machine", m)
			if err := sd.TerminateMachine(ctx, m); err != nil {
				return fmt.Errorf("reset: %w", err)
			}
			terminated = true
			continue
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(opts.PollInterval):
		}
	}
}

// removeBusy removes dir, retrying with growing pauses while the kernel
// says it is busy (a machine's mounts linger a moment after it stopped).
func removeBusy(ctx context.Context, dir string, timeout, pause time.Duration, log *slog.Logger) error {
	deadline := time.Now().Add(timeout)
	for {
		err := os.RemoveAll(dir)
		if err == nil {
			log.Info("removed", "path", dir)
			return nil
		}
		if !errors.Is(err, syscall.EBUSY) || time.Now().After(deadline) {
			return fmt.Errorf("reset: remove rootfs %s: %w (is something still mounted below it? see findmnt -R %s)", dir, err, dir)
		}
		log.Info("rootfs busy; retrying", "path", dir, "error", err, "in", pause)
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(pause):
		}
		pause = min(2*pause, 10*time.Second)
	}
}

// resetPaths lists the host paths reset removes besides the rootfs and the
// state dir: the names render uses for machine m, and with a plan every
// systemd file its host phase wrote (a per-machine directory whole).
func resetPaths(m string, p *render.Plan) []string {
	svc := "systemd-nspawn@" + m + ".service"
	paths := []string{
		"/etc/systemd/nspawn/" + m + ".nspawn",
		"/etc/systemd/system/" + svc + ".d",
		"/etc/systemd/system/" + svc + ".requires",
		"/etc/systemd/system/" + svc + ".wants",
		"/etc/systemd/system/machines.target.wants/" + svc,
		"/etc/systemd/system/nodespawn-nft-flush.service",
	}
	if p == nil {
		return paths
	}
	seen := map[string]bool{}
	for _, q := range paths {
		seen[q] = true
	}
	for _, s := range p.Steps {
		if s.Phase != render.PhaseHost {
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
		if !strings.HasPrefix(q, "/etc/systemd/") {
			continue
		}
		if d := filepath.Dir(q); strings.HasPrefix(filepath.Base(d), svc) {
			q = d
		}
		if !seen[q] {
			seen[q] = true
			paths = append(paths, q)
		}
	}
	return paths
}

// leftInPlace describes the host settings apply made that reset keeps.
func leftInPlace(root string, p *render.Plan) []string {
	var out []string
	if p != nil {
		for _, s := range p.Steps {
			if s.Phase != render.PhaseHost {
				continue
			}
			switch {
			case s.File != nil && !strings.HasPrefix(s.File.Path, "/etc/systemd/"):
				out = append(out, "file "+s.File.Path)
			case s.Packages != nil:
				out = append(out, "installed packages "+strings.Join(s.Packages.Names, ", "))
			case s.Modules != nil:
				out = append(out, "loaded kernel modules "+strings.Join(s.Modules.Names, ", "))
			case s.Sysctl != nil:
				out = append(out, fmt.Sprintf("%d sysctl values set now", len(s.Sysctl.Values)))
			case s.Swap != nil:
				out = append(out, "swap off, swap entries commented out in "+s.Swap.Fstab)
			}
		}
	} else {
		for _, pat := range []string{"/etc/sysctl.d/*nodespawn*", "/etc/modules-load.d/*nodespawn*", "/etc/needrestart/conf.d/*nodespawn*", "/etc/apt/apt.conf.d/*nodespawn*"} {
			m, _ := filepath.Glob(filepath.Join(root, pat))
			for _, f := range m {
				out = append(out, "file "+strings.TrimPrefix(f, strings.TrimSuffix(root, "/")))
			}
		}
		out = append(out, "swap settings in /etc/fstab, loaded kernel modules, sysctl values and installed packages")
	}
	if _, err := os.Stat(filepath.Join(root, "/etc/systemd/system", FirstbootUnitName)); err == nil {
		out = append(out, FirstbootUnitName+" (enabled; with the state directory gone it provisions again at next boot)")
	}
	return out
}
