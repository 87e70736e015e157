package apply

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"net"
	"path"
	"regexp"
	"strings"
	"syscall"
	"time"

	"github.com/nodespawn/nodespawn/internal/confine"
	"github.com/nodespawn/nodespawn/internal/layers"
	"github.com/nodespawn/nodespawn/internal/retry"
	"github.com/nodespawn/nodespawn/plan"
	"github.com/nodespawn/nodespawn/render"
	"github.com/nodespawn/nodespawn/state"
	"golang.org/x/sys/unix"
)

// Defaults for ResetOptions.
const (
	DefaultStopTimeout   = time.Minute
	DefaultRemoveTimeout = time.Minute
)

// machinesDir is where machined keeps machine root directories (render
// puts every rootfs there).
const machinesDir = render.MachinesDir

// ResetOptions configure Reset.
type ResetOptions struct {
	// Root is the directory every path is relative to; "" means "/".
	Root string
	// Plan, when set, is the plan that was applied (rendered again from
	// the stored manifest): its machine and rootfs are removed, and so is
	// every systemd file its host phase wrote.
	Plan *plan.Plan
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

// Reset stops the node's machines (both of an upgrade's pair) and removes
// them and what apply wrote for them: each rootfs, .nspawn file, service
// drop-in and machines.target link, the nftables flush unit, and the state
// directory with the node's state (its identity and image cache); then
// reloads systemd. Host settings (sysctls, modules-load, swap, packages) stay as
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
	m, err := resetMachine(opts)
	if err != nil {
		return err
	}

	s, err := state.Open(opts.Root)
	if err != nil {
		return fmt.Errorf("reset: %w", err)
	}
	defer s.Close()
	host := s.Root()
	lock, err := s.Lock(ctx, opts.LockTimeout, log)
	if err != nil {
		return err
	}
	defer lock.Release()

	targets := resetTargets(s, opts, m, log)
	live := opts.Systemd != nil
	if !live {
		log.Warn("not stopping the machines: no systemd (root is not /)", "machines", targetNames(targets), "root", opts.Root)
	}
	ro := removeOptions{stop: opts.StopTimeout, remove: opts.RemoveTimeout, poll: opts.PollInterval, log: log}
	for _, t := range targets {
		if t.leave != "" {
			log.Info("left in place", "machine", t.name, "why", t.leave)
			continue
		}
		if err := removeMachine(ctx, host, opts.Systemd, t.name, t.plan, ro); err != nil {
			return err
		}
	}
	// The state directory, with the node's state (its identity) in it.
	for _, p := range resetState {
		if _, err := host.Lstat(p); errors.Is(err, fs.ErrNotExist) {
			continue
		}
		if err := host.RemoveAll(p); err != nil {
			return fmt.Errorf("reset: %w", err)
		}
		log.Info("removed", "path", host.Show(p))
	}
	if live {
		if err := opts.Systemd.DaemonReload(ctx); err != nil {
			return fmt.Errorf("reset: %w", err)
		}
	}
	for _, s := range leftInPlace(host, opts.Plan) {
		log.Info("left in place", "setting", s)
	}
	if live {
		for _, s := range cniInterfaces() {
			log.Info("left in place", "interface", s, "why", "made by the machine's CNI, not by nodespawn; remove it with 'ip link delete "+s+"' once no machine uses it")
		}
	}
	log.Info("reset finished", "machine", m)
	return nil
}

// resetState is what Reset removes of nodespawn's state, after the
// machines: the state directory with the node's state (its identity) in it.
var resetState = []string{plan.ActiveMachineFile, state.Dir}

// resetMachine is the machine opts names, checked.
func resetMachine(opts ResetOptions) (string, error) {
	m := opts.Machine
	if opts.Plan != nil {
		m = opts.Plan.Machine
		if rootfs := opts.Plan.Rootfs; path.Clean(rootfs) != path.Join(machinesDir, path.Base(rootfs)) {
			// Never RemoveAll something a typo or a bad plan points at.
			return "", fmt.Errorf("reset: refusing to remove rootfs %s: not directly under %s", rootfs, machinesDir)
		}
	}
	if !machineName.MatchString(m) {
		return "", fmt.Errorf("reset: invalid machine name %q", m)
	}
	return m, nil
}

// resetTarget is a machine Reset removes, with the plan it was made from
// (nil when none is stored), or leaves in place, saying why.
type resetTarget struct {
	name  string
	plan  *plan.Plan
	leave string
}

func targetNames(ts []resetTarget) []string {
	var out []string
	for _, t := range ts {
		out = append(out, t.name)
	}
	return out
}

// resetTargets are the machines Reset looks at: m and the other machine
// of its pair, each with the plan it was made from. The other machine is
// left out when it was never made.
func resetTargets(s *state.Store, opts ResetOptions, m string, log *slog.Logger) []resetTarget {
	host := s.Root()
	// Both machines of the pair, each with the plan it was made from.
	st, err := s.Machines()
	if err != nil {
		log.Warn("the machines' state is unreadable; removing the named machine and its pair by name", "error", err)
		st = &state.Machines{Applied: map[string]state.Applied{}}
	}
	machines := []string{m}
	add := func(x string) {
		if x != "" && machineName.MatchString(x) && !contains(machines, x) {
			machines = append(machines, x)
		}
	}
	if opts.Plan != nil {
		add(opts.Plan.Alternate)
	}
	add(st.Active)
	add(st.Previous)
	if st.Upgrade != nil {
		add(st.Upgrade.From)
		add(st.Upgrade.To)
	}
	var targets []resetTarget
	for _, x := range machines {
		p := opts.Plan
		if p == nil || p.Machine != x {
			if p, err = s.PlanOf(x); err != nil {
				log.Warn("the stored plan is unreadable; removing the machine by name", "machine", x, "error", err)
				p = nil
			}
		}
		if x != m && p == nil {
			if _, err := host.Lstat(path.Join(machinesDir, x)); err != nil {
				continue // the other machine of the pair was never made
			}
			if _, known := st.Applied[x]; !known {
				targets = append(targets, resetTarget{name: x, leave: "nodespawn did not make it"})
				continue
			}
		}
		targets = append(targets, resetTarget{name: x, plan: p})
	}
	return targets
}

// removeOptions bound the waits of removeMachine.
type removeOptions struct {
	stop, remove, poll time.Duration
	log                *slog.Logger
	// keep are host paths another machine's plan wrote too (the unit that
	// flushes nftables, the machines.target link, extra units): removing
	// the other machine must leave them to the machine that runs.
	keep []string
}

// removeMachine stops machine m (when sd is set), and removes its rootfs,
// what an image pull keeps beside it, the systemd files and links p says
// were written for it (or systemd's names for them without p), and its
// bpffs.
func removeMachine(ctx context.Context, host *confine.Root, sd Systemd, m string, p *plan.Plan, o removeOptions) error {
	rootfs, err := machineRootfs(m, p)
	if err != nil {
		return err
	}
	if sd != nil {
		if err := stopMachine(ctx, sd, o.log, m, o.stop, o.poll); err != nil {
			return fmt.Errorf("reset: %w", err)
		}
	}
	if err := unmountRoot(ctx, host, rootfs, o); err != nil {
		return fmt.Errorf("reset: %w", err)
	}
	// A mount unit an older nodespawn wrote for the root (the machine's
	// service mounts it now); one someone else wrote stays.
	if _, err := layers.RemoveLegacyUnit(host, mountUnitOf(rootfs), o.log); err != nil {
		return fmt.Errorf("reset: %w", err)
	}
	if err := removeBusy(ctx, host, rootfs, o.remove, o.poll, o.log); err != nil {
		return err
	}
	for _, q := range machineFiles(host, rootfs, m, p, o.keep) {
		if err := host.RemoveAll(q); err != nil {
			return fmt.Errorf("reset: %w", err)
		}
		o.log.Info("removed", "path", host.Show(q))
	}
	return removeBPFFS(host, m, sd != nil, o.log)
}

// machineRootfs is machine m's rootfs, made from p (nil: systemd's name
// for it), refused unless it is directly under machinesDir.
func machineRootfs(m string, p *plan.Plan) (string, error) {
	rootfs := path.Join(machinesDir, m)
	if p != nil && p.Rootfs != "" {
		rootfs = p.Rootfs
	}
	if path.Clean(rootfs) != path.Join(machinesDir, path.Base(rootfs)) {
		// Never RemoveAll something a typo or a bad plan points at.
		return "", fmt.Errorf("reset: refusing to remove rootfs %s: not directly under %s", rootfs, machinesDir)
	}
	return rootfs, nil
}

// machineFiles are the paths removeMachine removes after the rootfs, those
// that exist: what an image pull keeps beside the rootfs (its marker and
// leftovers of an interrupted pull) and resetPaths, less keep.
func machineFiles(host *confine.Root, rootfs, m string, p *plan.Plan, keep []string) []string {
	var remove []string
	if es, err := host.ReadDir(path.Dir(rootfs)); err == nil {
		for _, e := range es {
			if strings.HasPrefix(e.Name(), "."+path.Base(rootfs)+".") {
				remove = append(remove, path.Join(path.Dir(rootfs), e.Name()))
			}
		}
	}
	remove = append(remove, resetPaths(m, p)...)
	var out []string
	for _, q := range remove {
		if contains(keep, q) {
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

// stopMachine stops the machine's service, waiting for the stop job up to
// timeout (kubelet's graceful shutdown gets its time), then until machined
// forgets the machine. One still listed a moment later is terminated and
// given half the timeout again to go.
func stopMachine(ctx context.Context, sd Systemd, log *slog.Logger, m string, timeout, poll time.Duration) error {
	unit := nspawnUnit(m)
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

// resetPaths lists the host paths reset removes besides the rootfs and the
// state dir. With the applied plan, they are every systemd file and link
// its host phase wrote (a per-machine directory whole). Without one (reset
// --machine on a host with no stored plan), they are the names systemd
// itself gives a machine's settings (systemd.nspawn(5), systemctl enable).
func resetPaths(m string, p *plan.Plan) []string {
	svc := "systemd-nspawn@" + m + ".service"
	if p == nil {
		return []string{
			"/etc/systemd/nspawn/" + m + ".nspawn",
			"/etc/systemd/system/" + svc + ".d",
			"/etc/systemd/system/machines.target.wants/" + svc,
		}
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
		if !strings.HasPrefix(q, "/etc/systemd/") {
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

// BPFFSDir is where the machine's own bpf filesystem is mounted on the
// host (the drop-in mounts it; the .nspawn file binds it to /sys/fs/bpf).
func BPFFSDir(machine string) string { return "/run/bpffs/" + machine }

// removeBPFFS unmounts the machine's bpffs on a live host and removes its
// directory. The directory is removed only once it is empty and no longer
// a mount point: what is pinned in a still-mounted bpffs is not deleted.
func removeBPFFS(host *confine.Root, m string, live bool, log *slog.Logger) error {
	dir := BPFFSDir(m)
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

// cniPrefixes are the name prefixes of the interfaces common CNI plugins
// create in the shared network namespace.
var cniPrefixes = []string{"cni", "flannel", "cilium", "cali", "vxlan", "tunl", "weave", "kube-", "veth", "genev", "antrea", "ovn", "nodelocaldns"}

// cniInterfaces lists the host's interfaces that look like a CNI's.
func cniInterfaces() []string {
	ifs, err := net.Interfaces()
	if err != nil {
		return nil
	}
	var out []string
	for _, i := range ifs {
		for _, p := range cniPrefixes {
			if strings.HasPrefix(i.Name, p) {
				out = append(out, i.Name)
				break
			}
		}
	}
	return out
}

// leftInPlace describes the host settings apply made that reset keeps.
func leftInPlace(host *confine.Root, p *plan.Plan) []string {
	var out []string
	if p != nil {
		for _, s := range p.Steps {
			if s.Phase != plan.PhaseHost {
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
		for _, dir := range []string{"/etc/sysctl.d", "/etc/modules-load.d", "/etc/needrestart/conf.d", "/etc/apt/apt.conf.d"} {
			es, _ := host.ReadDir(dir)
			for _, e := range es {
				if strings.Contains(e.Name(), "nodespawn") {
					out = append(out, "file "+path.Join(dir, e.Name()))
				}
			}
		}
		out = append(out, "swap settings in /etc/fstab, loaded kernel modules, sysctl values and installed packages")
	}
	if _, err := host.Lstat(path.Join("/etc/systemd/system", FirstbootUnitName)); err == nil {
		out = append(out, FirstbootUnitName+" (enabled; with the state directory gone it provisions again at next boot)")
	}
	return out
}

func contains(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}
