package apply

import (
	"context"
	"io/fs"
	"path"

	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"github.com/nodespawn/nodespawn/internal/confine"
	"github.com/nodespawn/nodespawn/internal/download"
	"github.com/nodespawn/nodespawn/plan"
	"github.com/nodespawn/nodespawn/state"
)

// Executor runs one plan.
type Executor struct {
	plan *plan.Plan
	opts Options
	log  *slog.Logger
	rec  *RecordWriter
	// host is opts.Root, opened once; every path goes through it.
	host *confine.Root
	// machineStarted is set when an earlier run got the machine going.
	machineStarted bool
	// RestartLimit fails a wait step whose units keep restarting (an
	// upgrade's new machine); 0 waits out the step's timeout.
	RestartLimit int

	mu       sync.Mutex
	outcomes map[string]state.Outcome
}

// changedAny reports whether any of the steps ids has run in this run and
// changed something.
func (e *Executor) changedAny(ids []string) bool {
	e.mu.Lock()
	defer e.mu.Unlock()
	for _, id := range ids {
		if e.outcomes[id] == state.OutcomeDone {
			return true
		}
	}
	return false
}

// stepResult is one finished step.
type stepResult struct {
	step    *plan.Step
	outcome state.Outcome
	err     error
	start   time.Time
	dur     time.Duration
}

// run executes the phases in order; it stops at the first phase with a
// failed step and marks every step not reached as skipped.
func (e *Executor) Run(ctx context.Context, phases ...plan.Phase) error {
	var failure error
	for _, ph := range phases {
		var steps []*plan.Step
		for i := range e.plan.Steps {
			if e.plan.Steps[i].Phase == ph {
				steps = append(steps, &e.plan.Steps[i])
			}
		}
		if failure != nil {
			if err := e.Skip(steps, "not run: "+failedStep(failure)); err != nil {
				return err
			}
			continue
		}
		if err := e.sweep(steps); err != nil {
			return err
		}
		failure = e.runPhase(ctx, steps)
	}
	return failure
}

// runPhase runs one phase's steps: each starts, in plan order, once the
// steps it runs After have finished, with at most opts.Parallel running.
// Downloads start fetching at once and install when their turn comes. The
// first failure cancels the steps still running and starts no more.
func (e *Executor) runPhase(ctx context.Context, steps []*plan.Step) error {
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)

	fetches := e.prefetch(ctx, steps)
	defer fetches.wait()

	inPhase := map[string]bool{}
	for _, s := range steps {
		inPhase[s.ID] = true
	}
	finished := map[string]bool{}
	ready := func(s *plan.Step) bool {
		for _, a := range s.After {
			if inPhase[a] && !finished[a] {
				return false
			}
		}
		return true
	}

	// Buffered so that running steps can always report, even when a
	// record write failure ends the phase early.
	results := make(chan stepResult, len(steps))
	pending := steps
	running := 0
	var failure error
	for len(pending) > 0 || running > 0 {
		if failure == nil {
			rest := pending[:0]
			for _, s := range pending {
				if running < e.opts.Parallel && ready(s) {
					running++
					go func() { results <- e.runStep(ctx, s, fetches) }()
					continue
				}
				rest = append(rest, s)
			}
			pending = rest
		} else if len(pending) > 0 {
			if err := e.Skip(pending, "not run: "+failedStep(failure)); err != nil {
				return err
			}
			pending = nil
		}
		if running == 0 {
			// validatePlan rules out cycles, so this means nothing is left.
			break
		}
		r := <-results
		running--
		finished[r.step.ID] = true
		if r.outcome == state.OutcomeFailed && failure == nil {
			failure = &StepError{ID: r.step.ID, Kind: r.step.Kind, Err: r.err}
			cancel(failure)
		}
		if r.outcome == state.OutcomeFailed && failure != nil && r.step.ID != failureID(failure) && (errors.Is(r.err, context.Canceled) || errors.Is(r.err, failure)) {
			// Cancelled because another step failed (its error may carry
			// that failure as the cancellation's cause): not a failure of
			// its own.
			r.outcome, r.err = state.OutcomeSkipped, errors.New("cancelled: "+failedStep(failure))
		}
		if err := e.report(r); err != nil {
			return err
		}
	}
	if failure != nil {
		return failure
	}
	return nil
}

func failureID(err error) string {
	var se *StepError
	if errors.As(err, &se) {
		return se.ID
	}
	return ""
}

// runStep runs one step and logs it.
func (e *Executor) runStep(ctx context.Context, s *plan.Step, fetches *prefetches) stepResult {
	start := time.Now()
	o, err := e.do(ctx, s, fetches)
	var nc errNotConfigured
	switch {
	case errors.As(err, &nc):
		o = state.OutcomeSkipped
	case err != nil:
		o = state.OutcomeFailed
	}
	return stepResult{step: s, outcome: o, err: err, start: start, dur: time.Since(start)}
}

// report records and logs a finished step.
func (e *Executor) report(r stepResult) error {
	// Under systemd these become journal fields (NODESPAWN_STEP, ...;
	// internal/journal), so a step's lines can be picked out.
	attrs := []any{"step", r.step.ID, "kind", r.step.Kind, "outcome", r.outcome, "duration", r.dur.Round(time.Millisecond)}
	switch r.outcome {
	case state.OutcomeFailed:
		e.log.Error("step", append(attrs, "error", r.err)...)
	case state.OutcomeSkipped:
		e.log.Warn("step", append(attrs, "reason", r.err)...)
	default:
		e.log.Info("step", attrs...)
	}
	e.mu.Lock()
	if e.outcomes == nil {
		e.outcomes = map[string]state.Outcome{}
	}
	e.outcomes[r.step.ID] = r.outcome
	e.mu.Unlock()
	n, err := e.rec.step(r.step.ID, r.outcome, r.start, r.dur, r.err)
	if err != nil {
		return err
	}
	if e.opts.Hooks.AfterStep != nil {
		e.opts.Hooks.AfterStep(n)
	}
	return nil
}

// skip records steps that will not run.
func (e *Executor) Skip(steps []*plan.Step, reason string) error {
	for _, s := range steps {
		if err := e.report(stepResult{step: s, outcome: state.OutcomeSkipped, err: errors.New(reason), start: time.Now()}); err != nil {
			return err
		}
	}
	return nil
}

// errNotConfigured is returned by do for a step whose implementation is
// absent from Deps; the step is recorded as skipped.
type errNotConfigured struct{ what, root string }

func (e errNotConfigured) Error() string {
	if e.root != "/" {
		return fmt.Sprintf("not run: %s acts on the running host, and the root is %s, not /", e.what, e.root)
	}
	return fmt.Sprintf("not run: no %s configured", e.what)
}

func (e *Executor) notConfigured(what string) (state.Outcome, error) {
	return "", errNotConfigured{what: what, root: e.opts.Root}
}

// do dispatches a step to its implementation.
func (e *Executor) do(ctx context.Context, s *plan.Step, fetches *prefetches) (state.Outcome, error) {
	d := e.opts.Deps
	switch s.Kind {
	case plan.KindFile:
		return e.file(ctx, s.File)
	case plan.KindDirectory:
		return e.directory(s.Directory)
	case plan.KindLink:
		return e.link(s.Link)
	case plan.KindImage:
		if d.Images == nil {
			return e.notConfigured("image puller")
		}
		return e.image(ctx, s.Image)
	case plan.KindDownload:
		if d.Downloader == nil {
			return e.notConfigured("downloader")
		}
		return e.download(ctx, s, fetches)
	case plan.KindSystemd:
		if d.Systemd == nil {
			return e.notConfigured("systemd")
		}
		return e.systemd(ctx, s.Systemd)
	case plan.KindWait:
		if d.Systemd == nil {
			return e.notConfigured("systemd")
		}
		return e.wait(ctx, s.Wait)
	}
	if d.Host == nil {
		return e.notConfigured("host operations")
	}
	var err error
	switch s.Kind {
	case plan.KindPackages:
		err = d.Host.EnsurePackages(ctx, s.Packages.Names, s.Packages.Install)
	case plan.KindModules:
		err = d.Host.LoadModules(ctx, s.Modules.Names)
	case plan.KindSysctl:
		err = d.Host.ApplySysctls(ctx, s.Sysctl.Values)
	case plan.KindNftFlush:
		return e.flushNftables(ctx)
	case plan.KindSwapOff:
		err = d.Host.DisableSwap(ctx, s.Swap.Fstab)
	default:
		err = fmt.Errorf("unknown step kind %q", s.Kind)
	}
	if err != nil {
		return "", err
	}
	return state.OutcomeDone, nil
}

// failedStep names the step that failed, for the steps skipped after it;
// its error is logged once, with the step itself.
func failedStep(failure error) string {
	if id := failureID(failure); id != "" {
		return "step " + id + " failed"
	}
	return failure.Error()
}

// sweep removes the temporary entries a killed run left in the
// directories a phase's steps write in: beside each path, beside every
// directory above it, and inside an archive's destination. It runs before
// any of the phase's steps, so no step's own temporary entry is mistaken
// for a leftover. A machine path whose rootfs does not exist yet has none.
func (e *Executor) sweep(steps []*plan.Step) error {
	seen := map[string]bool{}
	for _, s := range steps {
		var p string
		inside := false
		switch {
		case s.File != nil:
			p = s.File.Path
		case s.Directory != nil:
			p, inside = s.Directory.Path, true
		case s.Link != nil:
			p = s.Link.Path
		case s.Download != nil:
			p, inside = s.Download.Dest, s.Download.Archive != ""
		default:
			continue
		}
		t, err := e.target(p)
		if errors.Is(err, fs.ErrNotExist) {
			continue
		}
		if err != nil {
			return fmt.Errorf("apply: look for leftovers of %s: %w", p, err)
		}
		dir := path.Dir(t.rel)
		if inside {
			dir = t.rel
		}
		err = t.s.root.RemoveStaleTempsUp(dir, func(d string) bool {
			key := t.s.prefix + "\x00" + d
			done := seen[key]
			seen[key] = true
			return done
		})
		if err != nil {
			t.s.close()
			return fmt.Errorf("apply: remove leftovers of an interrupted run: %w", err)
		}
		t.s.close()
	}
	return nil
}

// flushNftables flushes the host's ruleset before the machine's first
// start, and leaves a running node's rules alone.
func (e *Executor) flushNftables(ctx context.Context) (state.Outcome, error) {
	if e.machineStarted {
		e.log.Info("not flushing nftables: the machine has started before; its start unit flushes the ruleset", "machine", e.plan.Machine)
		return state.OutcomeUnchanged, nil
	}
	if sd := e.opts.Deps.Systemd; sd != nil {
		running, err := sd.MachineRegistered(ctx, e.plan.Machine)
		if err != nil {
			return "", err
		}
		if running {
			e.log.Info("not flushing nftables: the machine is running and its rules are in the ruleset", "machine", e.plan.Machine)
			return state.OutcomeUnchanged, nil
		}
	}
	if err := e.opts.Deps.Host.FlushNftables(ctx); err != nil {
		return "", err
	}
	return state.OutcomeDone, nil
}

// pruneDownloads leaves in the download cache only the records of this
// plan's downloads: verified artifacts a killed run fetched but never
// installed, and records of downloads no longer planned, go.
func (e *Executor) pruneDownloads() error {
	keep := map[string]bool{}
	for _, s := range e.plan.Steps {
		if s.Download != nil {
			keep[download.RecordName(*s.Download)] = true
		}
	}
	es, err := e.host.ReadDir(DownloadCache)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("apply: prune the download cache: %w", err)
	}
	for _, de := range es {
		if keep[de.Name()] {
			continue
		}
		if err := e.host.RemoveAll(path.Join(DownloadCache, de.Name())); err != nil {
			return fmt.Errorf("apply: prune the download cache: %w", err)
		}
	}
	return nil
}
