// Package systemd talks to the host's service manager and machined over
// D-Bus, and to the systemd inside a machine through systemctl -M and
// journalctl -M: what apply's start and wait steps, and reset, ask of them.
package systemd

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"

	"github.com/coreos/go-systemd/v22/dbus"
	"github.com/coreos/go-systemd/v22/machine1"
	godbus "github.com/godbus/dbus/v5"

	"github.com/nodespawn/nodespawn/internal/command"
)

// New returns the host's systemd and machined over D-Bus, with
// `systemctl -M`/`journalctl -M` (through run; nil means command.Exec) for
// what runs inside a machine. Each call opens its own bus connection: apply
// makes a handful of calls, and no connection outlives a failure.
func New(run command.Runner) *Bus {
	if run == nil {
		run = command.Exec{}
	}
	return &Bus{run: run}
}

// Bus is the real systemd; its methods are the apply.Systemd seam.
type Bus struct{ run command.Runner }

func (s *Bus) conn(ctx context.Context) (*dbus.Conn, error) {
	c, err := dbus.NewWithContext(ctx)
	if err != nil {
		return nil, fmt.Errorf("connect to systemd over D-Bus: %w", err)
	}
	return c, nil
}

// DaemonReload makes systemd read unit files again.
func (s *Bus) DaemonReload(ctx context.Context) error {
	c, err := s.conn(ctx)
	if err != nil {
		return err
	}
	defer c.Close()
	if err := c.ReloadContext(ctx); err != nil {
		return fmt.Errorf("systemctl daemon-reload: %w", err)
	}
	return nil
}

// Enable enables unit; changed is false when it already was.
func (s *Bus) Enable(ctx context.Context, unit string) (bool, error) {
	c, err := s.conn(ctx)
	if err != nil {
		return false, err
	}
	defer c.Close()
	_, changes, err := c.EnableUnitFilesContext(ctx, []string{unit}, false, false)
	if err != nil {
		return false, fmt.Errorf("systemctl enable %s: %w", unit, err)
	}
	return len(changes) > 0, nil
}

// Start starts unit and waits for the job; changed is false when the unit
// was already active.
func (s *Bus) Start(ctx context.Context, unit string) (bool, error) {
	c, err := s.conn(ctx)
	if err != nil {
		return false, err
	}
	defer c.Close()
	p, err := c.GetUnitPropertyContext(ctx, unit, "ActiveState")
	if err != nil {
		return false, fmt.Errorf("systemctl show %s: %w", unit, err)
	}
	if state, _ := p.Value.Value().(string); state == "active" {
		return false, nil
	}
	return true, job(ctx, "start", unit, func(ch chan<- string) (int, error) {
		return c.StartUnitContext(ctx, unit, "replace", ch)
	})
}

// Restart restarts unit and waits for the job.
func (s *Bus) Restart(ctx context.Context, unit string) error {
	c, err := s.conn(ctx)
	if err != nil {
		return err
	}
	defer c.Close()
	return job(ctx, "restart", unit, func(ch chan<- string) (int, error) {
		return c.RestartUnitContext(ctx, unit, "replace", ch)
	})
}

// Stop stops unit and waits for the job; an unknown unit is already
// stopped.
func (s *Bus) Stop(ctx context.Context, unit string) error {
	c, err := s.conn(ctx)
	if err != nil {
		return err
	}
	defer c.Close()
	err = job(ctx, "stop", unit, func(ch chan<- string) (int, error) {
		return c.StopUnitContext(ctx, unit, "replace", ch)
	})
	if busErrorIs(err, "org.freedesktop.systemd1.NoSuchUnit") {
		return nil
	}
	return err
}

// job queues a systemd job and waits for its result ("done" or the reason
// it was not).
func job(ctx context.Context, verb, unit string, queue func(chan<- string) (int, error)) error {
	ch := make(chan string, 1)
	if _, err := queue(ch); err != nil {
		return fmt.Errorf("systemctl %s %s: %w", verb, unit, err)
	}
	select {
	case res := <-ch:
		if res != "done" {
			return fmt.Errorf("systemctl %s %s: job %s; see systemctl status %s and journalctl -u %s", verb, unit, res, unit, unit)
		}
		return nil
	case <-ctx.Done():
		return fmt.Errorf("systemctl %s %s: waiting for the job: %w", verb, unit, ctx.Err())
	}
}

// MachineRegistered reports whether machined knows the machine.
func (s *Bus) MachineRegistered(ctx context.Context, machine string) (bool, error) {
	c, err := machine1.New()
	if err != nil {
		return false, fmt.Errorf("connect to systemd-machined over D-Bus: %w", err)
	}
	defer c.Close()
	if _, err := c.GetMachine(machine); err != nil {
		if busErrorIs(err, "org.freedesktop.machine1.NoSuchMachine") {
			return false, nil
		}
		return false, fmt.Errorf("machinectl show %s: %w", machine, err)
	}
	return true, nil
}

// TerminateMachine asks machined to kill the machine; an unknown machine
// is gone already.
func (s *Bus) TerminateMachine(ctx context.Context, machine string) error {
	c, err := machine1.New()
	if err != nil {
		return fmt.Errorf("connect to systemd-machined over D-Bus: %w", err)
	}
	defer c.Close()
	if err := c.TerminateMachine(machine); err != nil && !busErrorIs(err, "org.freedesktop.machine1.NoSuchMachine") {
		return fmt.Errorf("machinectl terminate %s: %w", machine, err)
	}
	return nil
}

// UnitState returns the ActiveState of unit inside the machine, or of a
// host unit when machine is "".
func (s *Bus) UnitState(ctx context.Context, machine, unit string) (string, error) {
	args := []string{"is-active", unit}
	if machine != "" {
		args = append([]string{"-M", machine}, args...)
	}
	// is-active prints the state and exits non-zero unless it is "active";
	// the printed state is the answer, the exit status only a summary.
	out, err := s.run.Run(ctx, command.Options{}, "systemctl", args...)
	if st := strings.TrimSpace(string(out)); st != "" {
		return st, nil
	}
	if err == nil {
		err = errors.New("no state printed")
	}
	return "", fmt.Errorf("state of %s in machine %s: %w", unit, machine, err)
}

// Journal returns the last lines of the machine's journal.
func (s *Bus) Journal(ctx context.Context, machine string, lines int) (string, error) {
	out, err := s.run.Run(ctx, command.Options{}, "journalctl", "-M", machine, "-n", strconv.Itoa(lines), "--no-pager")
	if err != nil {
		return "", err
	}
	return string(out), nil
}

func busErrorIs(err error, name string) bool {
	var be godbus.Error
	if errors.As(err, &be) {
		return be.Name == name
	}
	var bp *godbus.Error
	return errors.As(err, &bp) && bp.Name == name
}

// UnitJournal returns the last lines a host unit logged.
func (s *Bus) UnitJournal(ctx context.Context, unit string, lines int) (string, error) {
	out, err := s.run.Run(ctx, command.Options{}, "journalctl", "-u", unit, "-n", strconv.Itoa(lines), "--no-pager", "-o", "cat")
	if err != nil {
		return "", err
	}
	return string(out), nil
}

// UnitRestarts returns how often systemd inside the machine restarted unit.
func (s *Bus) UnitRestarts(ctx context.Context, machine, unit string) (int, error) {
	out, err := s.run.Run(ctx, command.Options{}, "systemctl", "-M", machine, "show", "-P", "NRestarts", unit)
	if err != nil {
		return 0, err
	}
	n, err := strconv.Atoi(strings.TrimSpace(string(out)))
	if err != nil {
		return 0, fmt.Errorf("NRestarts of %s in machine %s: %q: %w", unit, machine, strings.TrimSpace(string(out)), err)
	}
	return n, nil
}

// HostUnitState returns a host unit's ActiveState ("active", "inactive",
// "failed", ...), or "not-found" when systemd has no such unit file (its
// package is not installed). Reading the unit's properties makes systemd
// load it, so a unit nothing has started yet still has a LoadState.
func (s *Bus) HostUnitState(ctx context.Context, unit string) (string, error) {
	c, err := s.conn(ctx)
	if err != nil {
		return "", err
	}
	defer c.Close()
	props, err := c.GetUnitPropertiesContext(ctx, unit)
	if err != nil {
		return "", fmt.Errorf("systemctl show %s: %w", unit, err)
	}
	if load, _ := props["LoadState"].(string); load == "not-found" {
		return "not-found", nil
	}
	active, _ := props["ActiveState"].(string)
	if active == "" {
		return "", fmt.Errorf("systemctl show %s: no ActiveState", unit)
	}
	return active, nil
}
