package apply

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"strings"
	"time"

	"github.com/nodespawn/nodespawn/plan"
	"github.com/nodespawn/nodespawn/state"
)

// image creates the rootfs through the image puller.
func (e *Executor) image(ctx context.Context, img *plan.Image) (state.Outcome, error) {
	// The rootfs is made in the host root: its staging directory and the
	// old tree live beside it.
	changed, err := e.opts.Deps.Images.Pull(ctx, img, e.host, img.Dest)
	if err != nil {
		return "", err
	}
	return changedOutcome(changed), nil
}

// prefetch is one download fetched ahead of its turn.
type prefetch struct {
	done chan struct{}
	art  Artifact
	err  error
}

type prefetches struct {
	m map[string]*prefetch
}

// prefetch starts fetching every download of a phase, at most
// opts.Parallel at once, without waiting for the steps they run after.
func (e *Executor) prefetch(ctx context.Context, steps []*plan.Step) *prefetches {
	pf := &prefetches{m: map[string]*prefetch{}}
	if e.opts.Deps.Downloader == nil {
		return pf
	}
	sem := make(chan struct{}, e.opts.Parallel)
	for _, s := range steps {
		if s.Kind != plan.KindDownload {
			continue
		}
		f := &prefetch{done: make(chan struct{})}
		pf.m[s.ID] = f
		go func() {
			defer close(f.done)
			select {
			case sem <- struct{}{}:
				defer func() { <-sem }()
			case <-ctx.Done():
				f.err = ctx.Err()
				return
			}
			f.art, f.err = e.fetch(ctx, s.Download)
		}()
	}
	return pf
}

// fetch starts a download; it shows the downloader the destination's
// tree as it is now, or none when the machine's rootfs does not exist yet.
func (e *Executor) fetch(ctx context.Context, d *plan.Download) (Artifact, error) {
	t, err := e.target(d.Dest)
	if errors.Is(err, fs.ErrNotExist) {
		return e.opts.Deps.Downloader.Fetch(ctx, d, nil, d.Dest)
	}
	if err != nil {
		return nil, err
	}
	defer t.s.close()
	return e.opts.Deps.Downloader.Fetch(ctx, d, t.s.root, t.rel)
}

// wait waits for every fetch to end, so none outlives its phase to race
// the next phase or the pruning of the download cache.
func (pf *prefetches) wait() {
	for _, f := range pf.m {
		<-f.done
	}
}

// download installs a prefetched artifact once the steps it runs after
// are done.
func (e *Executor) download(ctx context.Context, s *plan.Step, pf *prefetches) (state.Outcome, error) {
	f := pf.m[s.ID]
	select {
	case <-f.done:
	case <-ctx.Done():
		return "", ctx.Err()
	}
	art, err := f.art, f.err
	if e.changedAny(s.After) {
		// The prefetch may have looked at a rootfs that has been replaced
		// since (and found the artifact "installed" there): look again.
		art, err = e.fetch(ctx, s.Download)
	}
	if err != nil {
		return "", err
	}
	t, err := e.target(s.Download.Dest)
	if err != nil {
		return "", err
	}
	defer t.s.close()
	changed, err := art.Install(ctx, t.s.root, t.rel)
	if err != nil {
		return "", err
	}
	return changedOutcome(changed), nil
}

// systemd runs a Systemd step.
func (e *Executor) systemd(ctx context.Context, s *plan.Systemd) (state.Outcome, error) {
	sd := e.opts.Deps.Systemd
	switch s.Action {
	case "daemon-reload":
		return state.OutcomeDone, sd.DaemonReload(ctx)
	case "enable":
		changed, err := sd.Enable(ctx, s.Unit)
		return changedOutcome(changed), err
	case "start":
		changed, err := sd.Start(ctx, s.Unit)
		return changedOutcome(changed), err
	case "restart":
		return state.OutcomeDone, sd.Restart(ctx, s.Unit)
	default:
		return "", fmt.Errorf("unknown systemd action %q for %s", s.Action, s.Unit)
	}
}

// DefaultWaitTimeout applies when a Wait step has no timeout.
const DefaultWaitTimeout = 5 * time.Minute

// journalLines is how much of the machine's journal a wait timeout shows.
const journalLines = 30

// wait runs a Wait step (waitMachine), failing early on restarts when the
// Executor has a restart limit (an upgrade's new machine).
func (e *Executor) wait(ctx context.Context, w *plan.Wait) (state.Outcome, error) {
	first, err := waitMachineFirst(ctx, e.opts.Deps.Systemd, w, e.opts.PollInterval, e.RestartLimit)
	if err != nil {
		return "", err
	}
	if first {
		return state.OutcomeUnchanged, nil
	}
	return state.OutcomeDone, nil
}

// waitMachine polls machined until the machine is registered, then the
// machine's systemd until every unit is active, up to w.TimeoutSeconds. A
// timeout reports each unit's last state and the tail of the machine's
// journal. With RestartLimit > 0, a unit restarted that many times since
// the wait began fails it at once.
func WaitMachine(ctx context.Context, sd Systemd, w *plan.Wait, poll time.Duration, restartLimit int) error {
	_, err := waitMachineFirst(ctx, sd, w, poll, restartLimit)
	return err
}

// waitMachineFirst is waitMachine, also saying whether everything was up
// at the first look.
func waitMachineFirst(ctx context.Context, sd Systemd, w *plan.Wait, poll time.Duration, restartLimit int) (bool, error) {
	timeout := time.Duration(w.TimeoutSeconds) * time.Second
	if timeout <= 0 {
		timeout = DefaultWaitTimeout
	}
	wctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()

	registered := false
	states := make([]string, len(w.Units))
	restarts := newRestartCounter(sd, w.Machine, w.Units, restartLimit)
	var lastErr error
	for first := true; ; first = false {
		if !registered {
			registered, lastErr = sd.MachineRegistered(wctx, w.Machine)
		}
		if registered {
			all := true
			for i, u := range w.Units {
				st, err := sd.UnitState(wctx, w.Machine, u)
				if err != nil {
					st, lastErr = "unknown", err
				}
				states[i] = st
				all = all && st == "active"
			}
			if err := restarts.check(wctx); err != nil {
				return false, err
			}
			if all {
				return first, nil
			}
		}
		select {
		case <-wctx.Done():
		case <-time.After(poll):
			continue
		}
		break
	}
	if ctx.Err() != nil {
		return false, context.Cause(ctx)
	}
	var b strings.Builder
	fmt.Fprintf(&b, "machine %s not ready after %s: ", w.Machine, timeout)
	if !registered {
		b.WriteString("machined does not list it")
	} else {
		for i, u := range w.Units {
			if i > 0 {
				b.WriteString(", ")
			}
			fmt.Fprintf(&b, "%s is %s", u, states[i])
		}
	}
	if lastErr != nil {
		fmt.Fprintf(&b, " (last error: %v)", lastErr)
	}
	b.WriteString(machineJournalTail(ctx, sd, w.Machine))
	return false, fmt.Errorf("%s", b.String())
}

// machineJournalTail is the end of the machine's journal for an error message.
func machineJournalTail(ctx context.Context, sd Systemd, m string) string {
	journal, err := sd.Journal(ctx, m, journalLines)
	var b strings.Builder
	if err != nil {
		fmt.Fprintf(&b, "; reading its journal failed too: %v", err)
	} else {
		fmt.Fprintf(&b, "; last %d lines of its journal:\n%s", journalLines, strings.TrimRight(journal, "\n"))
	}
	fmt.Fprintf(&b, "\nsee: machinectl status %s; journalctl -M %s -u kubelet -u containerd", m, m)
	return b.String()
}

// restartCounter notices units that keep restarting (a kubelet that exits
// at once is "activating" most of the time and "active" for an instant).
type restartCounter struct {
	sd      Systemd
	machine string
	units   []string
	limit   int
	base    map[string]int
}

func newRestartCounter(sd Systemd, machine string, units []string, limit int) *restartCounter {
	return &restartCounter{sd: sd, machine: machine, units: units, limit: limit, base: map[string]int{}}
}

// check returns an error once a unit has restarted limit times since the
// first check. Units it cannot ask about (the machine still booting) are
// asked again next time.
func (c *restartCounter) check(ctx context.Context) error {
	if c.limit <= 0 {
		return nil
	}
	for _, u := range c.units {
		n, err := c.sd.UnitRestarts(ctx, c.machine, u)
		if err != nil {
			continue
		}
		base, ok := c.base[u]
		if !ok {
			c.base[u] = n
			continue
		}
		if n-base >= c.limit {
			return fmt.Errorf("%s in machine %s keeps failing: restarted %d times%s", u, c.machine, n-base, machineJournalTail(ctx, c.sd, c.machine))
		}
	}
	return nil
}

// watchRestarts checks the units every poll until ctx ends; it returns the
// restart error, or nil when ctx ended.
func WatchRestarts(ctx context.Context, sd Systemd, machine string, units []string, limit int, poll time.Duration) error {
	c := newRestartCounter(sd, machine, units, limit)
	for {
		if err := c.check(ctx); err != nil {
			return err
		}
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(poll):
		}
	}
}

func changedOutcome(changed bool) state.Outcome {
	if changed {
		return state.OutcomeDone
	}
	return state.OutcomeUnchanged
}
