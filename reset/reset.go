// Package reset undoes what apply did on a host, for re-provisioning: it
// stops the node's machines (both of an upgrade's pair) and removes them
// (internal/machine's Remove: the rootfs, the systemd files the plan wrote
// for each, its bpffs), then the state directory with the node's identity,
// and reloads systemd. It takes the lock runs take (state.Store.Lock), so
// it never removes what a running apply is writing. Host settings
// (sysctls, kernel modules, swap, packages) stay; Run logs each one it
// leaves, and Plan lists everything beforehand without changing anything.
package reset

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"net"
	"path"
	"slices"
	"strings"
	"time"

	"github.com/nodespawn/nodespawn/internal/confine"
	"github.com/nodespawn/nodespawn/internal/layout"
	"github.com/nodespawn/nodespawn/internal/lazyre"
	"github.com/nodespawn/nodespawn/internal/machine"
	"github.com/nodespawn/nodespawn/plan"
	"github.com/nodespawn/nodespawn/state"
)

// Defaults for Options.
const (
	DefaultStopTimeout   = layout.DefaultStopTimeout
	DefaultRemoveTimeout = machine.DefaultRemoveTimeout
)

// Systemd is what Run needs of the host's service manager and machined
// (apply.Systemd has it; the real one is internal/systemd).
type Systemd interface {
	machine.Systemd
	// DaemonReload makes systemd read unit files again.
	DaemonReload(ctx context.Context) error
}

// Options configure Run and Plan.
type Options struct {
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
	// Log receives what Run does and what it leaves; nil means slog.Default().
	Log *slog.Logger
	// LockTimeout bounds the wait for a running apply (default 2m).
	LockTimeout time.Duration
	// StopTimeout bounds the wait for machined to forget the machine (default 1m).
	StopTimeout time.Duration
	// RemoveTimeout bounds the retries of a rootfs removal that fails
	// with "busy" (default 1m).
	RemoveTimeout time.Duration
	// PollInterval is how often Run looks again (default 2s).
	PollInterval time.Duration
}

// machineName is what machined accepts, and what is safe in a path.
var machineName = lazyre.New(`^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$`)

// Run stops the node's machines (both of an upgrade's pair) and removes
// them and what apply wrote for them: each rootfs, .nspawn file, service
// drop-in and machines.target link, the nftables flush unit, and the state
// directory with the node's state (its identity and image cache); then
// reloads systemd. Host settings (sysctls, modules-load, swap, packages) stay as
// they are; Run logs each one it leaves.
func Run(ctx context.Context, opts Options) error {
	if opts.Root == "" {
		opts.Root = "/"
	}
	if opts.Log == nil {
		opts.Log = slog.Default()
	}
	if opts.LockTimeout <= 0 {
		opts.LockTimeout = state.DefaultLockTimeout
	}
	if opts.StopTimeout <= 0 {
		opts.StopTimeout = DefaultStopTimeout
	}
	if opts.RemoveTimeout <= 0 {
		opts.RemoveTimeout = DefaultRemoveTimeout
	}
	if opts.PollInterval <= 0 {
		opts.PollInterval = machine.DefaultPollInterval
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
	ro := machine.RemoveOptions{StopTimeout: opts.StopTimeout, RemoveTimeout: opts.RemoveTimeout, Poll: opts.PollInterval, Log: log}
	for _, t := range targets {
		if t.leave != "" {
			log.Info("left in place", "machine", t.name, "why", t.leave)
			continue
		}
		if err := machine.Remove(ctx, host, opts.Systemd, t.name, t.plan, ro); err != nil {
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

// resetState is what Run removes of nodespawn's state, after the
// machines: the state directory with the node's state (its identity) in it.
var resetState = []string{layout.ActiveMachineFile, state.Dir}

// resetMachine is the machine opts names, checked.
func resetMachine(opts Options) (string, error) {
	m := opts.Machine
	if opts.Plan != nil {
		m = opts.Plan.Machine
		if err := machine.CheckRootfs(opts.Plan.Rootfs); err != nil {
			return "", err
		}
	}
	if !machineName().MatchString(m) {
		return "", fmt.Errorf("reset: invalid machine name %q", m)
	}
	return m, nil
}

// resetTarget is a machine Run removes, with the plan it was made from
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

// resetTargets are the machines Run looks at: m and the other machine
// of its pair, each with the plan it was made from. The other machine is
// left out when it was never made.
func resetTargets(s *state.Store, opts Options, m string, log *slog.Logger) []resetTarget {
	host := s.Root()
	// Both machines of the pair, each with the plan it was made from.
	st, err := s.Machines()
	if err != nil {
		log.Warn("the machines' state is unreadable; removing the named machine and its pair by name", "error", err)
		st = &state.Machines{Applied: map[string]state.Applied{}}
	}
	machines := []string{m}
	add := func(x string) {
		if x != "" && machineName().MatchString(x) && !slices.Contains(machines, x) {
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
			if _, err := host.Lstat(layout.MachineRoot(x)); err != nil {
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
			case s.File != nil && !strings.HasPrefix(s.File.Path, layout.SystemdConfDir+"/"):
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
	if _, err := host.Lstat(layout.FirstbootUnitPath); err == nil {
		out = append(out, layout.FirstbootUnit+" (enabled; with the state directory gone it provisions again at next boot)")
	}
	return out
}
