package apply

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

// NewSystemd returns the real Systemd: the host's systemd and machined over
// D-Bus, and `systemctl -M`/`journalctl -M` (through the command runner)
// for what runs inside a machine. Each call opens its own bus connection:
// apply makes a handful of calls, and no connection outlives a failure.
func NewSystemd(run command.Runner) Systemd {
	if run == nil {
		run = command.Exec{}
	}
	return &busSystemd{run: run}
}

type busSystemd struct{ run command.Runner }

func (s *busSystemd) conn(ctx context.Context) (*dbus.Conn, error) {
	c, err := dbus.NewWithContext(ctx)
	if err != nil {
		return nil, fmt.Errorf("connect to systemd over D-Bus: %w", err)
	}
	return c, nil
}

func (s *busSystemd) DaemonReload(ctx context.Context) error {
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

func (s *busSystemd) Enable(ctx context.Context, unit string) (bool, error) {
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

func (s *busSystemd) Start(ctx context.Context, unit string) (bool, error) {
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

func (s *busSystemd) Restart(ctx context.Context, unit string) error {
	c, err := s.conn(ctx)
	if err != nil {
		return err
	}
	defer c.Close()
	return job(ctx, "restart", unit, func(ch chan<- string) (int, error) {
		return c.RestartUnitContext(ctx, unit, "replace", ch)
	})
}

func (s *busSystemd) Stop(ctx context.Context, unit string) error {
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

func (s *busSystemd) MachineRegistered(ctx context.Context, machine string) (bool, error) {
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

func (s *busSystemd) TerminateMachine(ctx context.Context, machine string) error {
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

func (s *busSystemd) UnitState(ctx context.Context, machine, unit string) (string, error) {
	// is-active prints the state and exits non-zero unless it is "active";
	// the printed state is the answer, the exit status only a summary.
	out, err := s.run.Run(ctx, command.Options{}, "systemctl", "-M", machine, "is-active", unit)
	if st := strings.TrimSpace(string(out)); st != "" {
		return st, nil
	}
	if err == nil {
		err = errors.New("no state printed")
	}
	return "", fmt.Errorf("state of %s in machine %s: %w", unit, machine, err)
}

func (s *busSystemd) Journal(ctx context.Context, machine string, lines int) (string, error) {
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
