// Package status says where provisioning stands on a host, for `nodespawn
// status`: it reads the state under a root (state.Store: the record of the
// last run, the machines, whether a run holds the lock), looks at the
// active machine's root composed from the layer store (machine.CheckRoot),
// and, on the running host, at the machine itself through systemd
// (registered with machined, containerd and kubelet active inside, the
// host units the node needs, the first-boot unit). The result is a Status
// in the words cloud-init status uses, with an exit code (ExitCode), and
// the recorded run's steps on their timeline (Blame, CriticalPath).
//
// status changes nothing and takes no lock.
package status

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"slices"
	"sort"
	"strings"
	"time"

	"github.com/nodespawn/nodespawn/internal/layers"
	"github.com/nodespawn/nodespawn/internal/layout"
	"github.com/nodespawn/nodespawn/internal/machine"
	"github.com/nodespawn/nodespawn/plan"
	"github.com/nodespawn/nodespawn/state"
)

// Version identifies the JSON shape of a Status.
const Version = "nodespawn.dev/status/v1"

// State is where provisioning stands, in the words cloud-init status uses
// where they mean the same.
type State string

// The states. Exit codes (ExitCode): done, running and not run 0,
// error 1, degraded 2.
const (
	// StateNotRun: apply has not run here (or its state was reset).
	StateNotRun State = "not run"
	// StateRunning: an apply is running now.
	StateRunning State = "running"
	// StateDone: the last apply succeeded and the node is up.
	StateDone State = "done"
	// StateError: the last apply failed, or was killed before it ended.
	StateError State = "error"
	// StateDegraded: the last apply succeeded, but the machine or its
	// containerd or kubelet is not running now, or its root is broken
	// (Status.RootProblems).
	StateDegraded State = "degraded"
)

// Status is what `nodespawn status` reports: the result record read
// together with a live look at the machine.
type Status struct {
	Version string `json:"version"`
	State   State  `json:"status"`
	// Summary is the one line: "done", "running: step X (3/40)",
	// "error: step X: reason", "degraded: applied, but ...".
	Summary string `json:"summary"`
	// Machine is the machine that runs the node (the active one of the
	// pair), or the one being made when none runs yet.
	Machine string `json:"machine,omitempty"`
	// Previous is the machine kept for nodespawn rollback.
	Previous string `json:"previous,omitempty"`
	// Upgrade is the upgrade in progress (or interrupted); LastUpgrade how
	// the last one ended.
	Upgrade     *state.Upgrade        `json:"upgrade,omitempty"`
	LastUpgrade *state.UpgradeOutcome `json:"lastUpgrade,omitempty"`
	// RecordMachine is the machine the record's run was for, when it is
	// not Machine (an upgrade's new machine).
	RecordMachine string `json:"recordMachine,omitempty"`
	// Node is the Kubernetes node name the applied plan registers.
	Node string `json:"node,omitempty"`
	// Step is the step running now, or the one that failed.
	Step *state.StepRecord `json:"step,omitempty"`
	// Finished and Total count the steps with an outcome, and all.
	Finished int `json:"finished"`
	Total    int `json:"total"`
	// Outcomes counts the recorded steps by outcome.
	Outcomes map[state.Outcome]int `json:"outcomes,omitempty"`
	// Skipped are the steps that did not run, grouped by why, in the
	// order of their first step.
	Skipped []SkippedSteps `json:"skipped,omitempty"`
	// Warnings are what the recorded run warned about.
	Warnings []string `json:"warnings,omitempty"`
	// Source says where the recorded run's manifest came from.
	Source string `json:"source,omitempty"`

	ManifestDigest string     `json:"manifestDigest,omitempty"`
	SourceDigest   string     `json:"sourceDigest,omitempty"`
	PlanDigest     string     `json:"planDigest,omitempty"`
	PlanVersion    string     `json:"planVersion,omitempty"`
	ToolVersion    string     `json:"toolVersion,omitempty"`
	Started        *time.Time `json:"started,omitempty"`
	Ended          *time.Time `json:"ended,omitempty"`
	// Checks are the live look at the machine (empty when the root is not
	// the running host).
	Checks []Check `json:"checks,omitempty"`
	// RootProblems are what is broken in the machine root composed from
	// the layer store (a layer missing from the store or not as it was
	// unpacked, the upper directory gone), each naming the piece; apply
	// repairs them. Any makes the state degraded.
	RootProblems []layers.Problem `json:"rootProblems,omitempty"`
	// Journal is the first-boot unit's last lines, with Options.Long after
	// an error.
	Journal string `json:"journal,omitempty"`
	// Timings, with Options.Timings, are the recorded run's steps on
	// its timeline.
	Timings *Timings `json:"timings,omitempty"`
	// Pending is set when no run has happened yet but one will: the
	// first-boot unit is installed and has not succeeded.
	Pending bool `json:"pending,omitempty"`
}

// SkippedSteps are steps skipped for one reason.
type SkippedSteps struct {
	Reason string   `json:"reason"`
	Steps  []string `json:"steps"`
}

// Timings are the steps of the recorded run, the way systemd-analyze
// shows a boot.
type Timings struct {
	// Blame is every step that ran, longest first.
	Blame []Timing `json:"blame"`
	// CriticalPath is what the whole run waited for, first to last.
	CriticalPath []Timing `json:"criticalPath"`
}

// Check is one thing looked at on the running host.
type Check struct {
	What   string `json:"what"`
	OK     bool   `json:"ok"`
	Detail string `json:"detail,omitempty"`
}

// Options configure Read.
type Options struct {
	// Root is the tree whose state is read; "" means "/".
	Root string
	// Systemd, when set, is the running host's systemd, for the live look
	// (machine registered, containerd and kubelet active inside, the
	// first-boot unit's state and journal). nil reads the record alone.
	Systemd Systemd
	// Long adds the first-boot unit's journal tail after an error.
	Long bool
	// Timings adds the recorded run's blame list and critical path.
	Timings bool
}

// Systemd is what Read asks the running host's systemd and machined
// (apply.Systemd has it; the real one is internal/systemd).
type Systemd interface {
	// MachineRegistered reports whether machined knows the machine.
	MachineRegistered(ctx context.Context, machine string) (bool, error)
	// UnitState returns the ActiveState ("active", "activating",
	// "failed", ...) of unit inside the machine, or of a host unit when
	// machine is "".
	UnitState(ctx context.Context, machine, unit string) (string, error)
	// UnitJournal returns the last lines a host unit logged.
	UnitJournal(ctx context.Context, unit string, lines int) (string, error)
}

// journalTail is how many lines --long shows.
const journalTail = 20

// MissingRootError is Read's error for a root that does not exist.
type MissingRootError struct{ Root string }

func (e *MissingRootError) Error() string {
	return fmt.Sprintf("status: root %s does not exist (give the directory apply was run with, or / for this host)", e.Root)
}

// Unwrap makes the error fs.ErrNotExist.
func (e *MissingRootError) Unwrap() error { return fs.ErrNotExist }

// Read reports where provisioning under opts.Root stands.
func Read(ctx context.Context, opts Options) (*Status, error) {
	if opts.Root == "" {
		opts.Root = "/"
	}
	st := &Status{Version: Version}
	s, err := state.Open(opts.Root)
	if errors.Is(err, fs.ErrNotExist) {
		// Not "not run": a mistyped --root would read as a fresh host.
		return nil, &MissingRootError{Root: opts.Root}
	}
	if err != nil {
		return nil, err
	}
	defer s.Close()
	host := s.Root()
	rec, err := s.Record()
	if err != nil {
		return nil, err
	}
	// The plan the active machine was made from (or the last run's
	// machine's, when none is active yet).
	var applied *plan.Plan
	if m, err := s.Current(); err != nil {
		return nil, err
	} else if m != "" {
		if applied, err = s.PlanOf(m); err != nil {
			return nil, err
		}
	}
	running := s.LockHeld()
	unitFailed := false
	if sd := opts.Systemd; sd != nil {
		// At first boot the unit is "activating" for the whole run,
		// retries included, also while no apply holds the lock.
		us, err := sd.UnitState(ctx, "", layout.FirstbootUnit)
		running = running || (err == nil && (us == "activating" || us == "reloading"))
		unitFailed = err == nil && us == "failed"
	}
	if _, err := host.Lstat(layout.FirstbootUnitPath); err == nil {
		if _, err := host.Lstat(state.DoneStamp); errors.Is(err, fs.ErrNotExist) {
			st.Pending = rec == nil || rec.Status != state.StatusSucceeded
		}
	}
	ms, err := s.Machines()
	if err != nil {
		return nil, err
	}
	st.Previous, st.Upgrade, st.LastUpgrade = ms.Previous, ms.Upgrade, ms.Last
	if applied != nil {
		st.Machine, st.Node, st.PlanVersion = applied.Machine, applied.NodeName, applied.Version
	}
	if rec != nil {
		st.Machine = rec.Machine
		st.ManifestDigest, st.SourceDigest, st.PlanDigest, st.ToolVersion = rec.ManifestDigest, rec.SourceDigest, rec.PlanDigest, rec.ToolVersion
		st.Started, st.Ended = &rec.Started, rec.Ended
		st.Total = len(rec.Steps)
		for _, s := range rec.Steps {
			if s.Outcome != state.OutcomePending {
				st.Finished++
			}
		}
		st.Outcomes, st.Skipped = countOutcomes(rec)
		st.Warnings, st.Source = rec.Warnings, rec.Source
	}

	if ms.Active != "" && st.Machine != ms.Active {
		st.RecordMachine, st.Machine = st.Machine, ms.Active
	}
	u := ms.Upgrade
	switch {
	case rec == nil && running:
		st.State, st.Summary = StateRunning, "running: starting"
	case rec == nil && unitFailed:
		// The unit failed before apply began (no manifest found, say).
		st.State = StateError
		st.Summary = "error: " + layout.FirstbootUnit + " failed before a run started; see journalctl -u " + layout.FirstbootUnit
	case rec == nil:
		st.State, st.Summary = StateNotRun, string(StateNotRun)
	case running:
		st.State = StateRunning
		st.Step = firstWith(rec, state.OutcomePending)
		st.Summary = fmt.Sprintf("running: %d/%d steps done", st.Finished, st.Total)
		if st.Step != nil {
			st.Summary = fmt.Sprintf("running: step %s (%d/%d)", st.Step.ID, st.Finished+1, st.Total)
		}
		if u != nil {
			st.Summary += "; " + describeUpgrade(u)
		}
	case u != nil && u.Phase != state.UpgradePreparing:
		// No run holds the lock, and a switch is half-done: killed.
		st.State = StateError
		st.Summary = fmt.Sprintf("error: the %s was interrupted; machine %s is active; run nodespawn apply (or reboot: the first-boot unit finishes it)", describeUpgrade(u), ms.Active)
	case rec.Status == state.StatusFailed && rec.Upgrade != nil && rec.Upgrade.Outcome == state.OutcomeRolledBack:
		st.State = StateError
		st.Summary = fmt.Sprintf("error: the upgrade from %s to %s was rolled back: %s; %s runs the node", rec.Upgrade.From, rec.Upgrade.To, firstLine(rec.Upgrade.Reason), rec.Upgrade.From)
	case rec.Status == state.StatusFailed && rec.Upgrade != nil && rec.Upgrade.Outcome == state.OutcomeRollbackFailed:
		st.State = StateError
		st.Summary = fmt.Sprintf("error: the upgrade from %s to %s failed (%s) and so did the rollback; run nodespawn apply to retry the rollback", rec.Upgrade.From, rec.Upgrade.To, firstLine(rec.Upgrade.Reason))
	case rec.Status == state.StatusFailed:
		st.State = StateError
		st.Step = firstWith(rec, state.OutcomeFailed)
		st.Summary = "error: " + failureLine(st.Step)
		if u != nil {
			st.Summary += fmt.Sprintf(" (preparing the upgrade to %s; %s still runs the node)", u.To, u.From)
		}
	case rec.Status == state.StatusRunning:
		// Recorded as running, but no apply holds the lock: it was killed.
		st.State = StateError
		st.Step = firstWith(rec, state.OutcomePending)
		st.Summary = fmt.Sprintf("error: the run was interrupted after %d/%d steps; apply again to resume", st.Finished, st.Total)
		if st.Step != nil {
			st.Summary = fmt.Sprintf("error: the run was interrupted at step %s (%d/%d); apply again to resume", st.Step.ID, st.Finished+1, st.Total)
		}
	default:
		st.State, st.Summary = StateDone, string(StateDone)+doneNotes(st)
		var bad []string
		running := false
		if opts.Systemd != nil && st.Machine != "" {
			var hostUnits []string
			if applied != nil {
				hostUnits = applied.HostUnits
			}
			st.Checks = liveChecks(ctx, opts.Systemd, st.Machine, hostUnits)
			running = len(st.Checks) > 0 && st.Checks[0].OK
			for _, c := range st.Checks {
				if !c.OK {
					bad = append(bad, c.Detail)
				}
			}
		}
		if applied != nil && applied.Machine == st.Machine {
			// The machine root composed from the layer store: its record,
			// layers, upper and work directories (no tree is walked).
			h, _, err := machine.CheckRoot(host, applied, running)
			if err != nil {
				h.Problems = append(h.Problems, layers.Problem{Part: "check", Detail: err.Error()})
			}
			st.RootProblems = h.Problems
		}
		if len(st.RootProblems) > 0 {
			bad = append(bad, machine.ProblemLines(layers.Health{Problems: st.RootProblems})...)
		}
		if len(bad) > 0 {
			st.State = StateDegraded
			st.Summary = "degraded: applied, but " + strings.Join(bad, ", ")
			if len(st.RootProblems) > 0 {
				st.Summary += "; run nodespawn apply to repair the machine root"
			}
		}
	}
	if opts.Timings && rec != nil {
		st.Timings = &Timings{Blame: Blame(rec), CriticalPath: CriticalPath(rec, applied)}
	}
	if opts.Long && opts.Systemd != nil && st.State == StateError {
		if j, err := opts.Systemd.UnitJournal(ctx, layout.FirstbootUnit, journalTail); err == nil {
			st.Journal = strings.TrimRight(j, "\n")
		}
	}
	return st, nil
}

// countOutcomes counts rec's steps by outcome and groups the skipped ones
// by reason.
func countOutcomes(rec *state.Record) (map[state.Outcome]int, []SkippedSteps) {
	n := map[state.Outcome]int{}
	var skipped []SkippedSteps
	at := map[string]int{}
	for _, s := range rec.Steps {
		n[s.Outcome]++
		if s.Outcome != state.OutcomeSkipped {
			continue
		}
		reason := firstLine(s.Error)
		if reason == "" {
			reason = "no reason recorded"
		}
		i, ok := at[reason]
		if !ok {
			i = len(skipped)
			at[reason] = i
			skipped = append(skipped, SkippedSteps{Reason: reason})
		}
		skipped[i].Steps = append(skipped[i].Steps, s.ID)
	}
	return n, skipped
}

// describeUpgrade is a one-line account of an upgrade in progress.
func describeUpgrade(u *state.Upgrade) string {
	var b strings.Builder
	fmt.Fprintf(&b, "upgrade from %s to %s %s", u.From, u.To, u.Phase)
	if u.Reason != "" {
		fmt.Fprintf(&b, " (%s)", u.Reason)
	}
	return b.String()
}

// doneNotes is what a successful run's summary adds to "done": the steps
// it skipped and how many warnings it had, so neither hides behind "done".
func doneNotes(st *Status) string {
	var notes []string
	if n := st.Outcomes[state.OutcomeSkipped]; n > 0 {
		notes = append(notes, fmt.Sprintf("%d of %d steps skipped", n, st.Total))
	}
	switch n := len(st.Warnings); n {
	case 0:
	case 1:
		notes = append(notes, "1 warning")
	default:
		notes = append(notes, fmt.Sprintf("%d warnings", n))
	}
	if len(notes) == 0 {
		return ""
	}
	return ", " + strings.Join(notes, ", ") + " (status --long says which)"
}

// ExitCode is the exit code of `nodespawn status` for st, as cloud-init
// status gives them: 0 done (or nothing to report yet), 1 error, 2
// degraded.
func ExitCode(st *Status) int {
	switch st.State {
	case StateError:
		return 1
	case StateDegraded:
		return 2
	}
	return 0
}

// liveChecks looks at the machine: registered with machined, the node
// units active inside it, and the host units it needs active on the host.
func liveChecks(ctx context.Context, sd Systemd, machine string, hostUnits []string) []Check {
	checks := machineChecks(ctx, sd, machine)
	// Host services the node needs (plan.HostUnits): Fabric Manager on an
	// NVSwitch host, without which every CUDA call in the node fails.
	for _, u := range hostUnits {
		state, err := sd.UnitState(ctx, "", u)
		name := strings.TrimSuffix(u, ".service")
		c := Check{What: name + " on the host", OK: err == nil && state == "active"}
		if !c.OK {
			if err != nil {
				state = "unknown (" + err.Error() + ")"
			}
			c.Detail = name + " is " + state + " on the host"
			if u == plan.FabricManagerUnit {
				c.Detail += " (the GPUs are joined by NVSwitches: CUDA fails with error 802 until it runs)"
			}
		}
		checks = append(checks, c)
	}
	return checks
}

// machineChecks: the machine registered with machined, and the node units
// active inside it.
func machineChecks(ctx context.Context, sd Systemd, machine string) []Check {
	registered, err := sd.MachineRegistered(ctx, machine)
	c := Check{What: "machine " + machine, OK: err == nil && registered}
	switch {
	case err != nil:
		c.Detail = fmt.Sprintf("machine %s cannot be looked up (%v)", machine, err)
	case !registered:
		c.Detail = "machine " + machine + " is not running"
	}
	checks := []Check{c}
	if !c.OK {
		return checks
	}
	for _, u := range layout.NodeUnits() {
		state, err := sd.UnitState(ctx, machine, u)
		name := strings.TrimSuffix(u, ".service")
		c := Check{What: name + " in " + machine, OK: err == nil && state == "active"}
		if !c.OK {
			if err != nil {
				state = "unknown (" + err.Error() + ")"
			}
			c.Detail = name + " is " + state
		}
		checks = append(checks, c)
	}
	return checks
}

// firstWith is the first step, in plan order, with outcome o.
func firstWith(rec *state.Record, o state.Outcome) *state.StepRecord {
	for i := range rec.Steps {
		if rec.Steps[i].Outcome == o {
			s := rec.Steps[i]
			return &s
		}
	}
	return nil
}

func firstLine(s string) string {
	line, _, _ := strings.Cut(s, "\n")
	return line
}

// failureLine is "step X: reason", the reason's first line.
func failureLine(s *state.StepRecord) string {
	if s == nil {
		return "the run failed before its first step"
	}
	reason, _, _ := strings.Cut(s.Error, "\n")
	return fmt.Sprintf("step %s: %s", s.ID, reason)
}

// Timing is one step on the run's timeline.
type Timing struct {
	ID      string        `json:"id"`
	Phase   plan.Phase    `json:"phase"`
	Kind    plan.Kind     `json:"kind"`
	Outcome state.Outcome `json:"outcome"`
	// StartMS and DurationMS place the step after the run's start.
	StartMS    int64 `json:"startMs"`
	DurationMS int64 `json:"durationMs"`
}

// Start is when the step started, after the run's start.
func (t Timing) Start() time.Duration { return time.Duration(t.StartMS) * time.Millisecond }

// Duration is how long the step took.
func (t Timing) Duration() time.Duration { return time.Duration(t.DurationMS) * time.Millisecond }

// End is when the step ended, after the run's start.
func (t Timing) End() time.Duration { return t.Start() + t.Duration() }

// Blame lists the steps that ran, longest first (systemd-analyze blame).
func Blame(rec *state.Record) []Timing {
	var out []Timing
	for _, s := range rec.Steps {
		if s.Outcome == state.OutcomePending || s.Outcome == state.OutcomeSkipped {
			continue
		}
		out = append(out, timing(s))
	}
	sort.SliceStable(out, func(i, j int) bool { return out[i].DurationMS > out[j].DurationMS })
	return out
}

func timing(s state.StepRecord) Timing {
	return Timing{ID: s.ID, Phase: s.Phase, Kind: s.Kind, Outcome: s.Outcome, StartMS: s.StartMS, DurationMS: s.DurationMS}
}

// CriticalPath is the chain of steps the whole run waited for, first to
// last (systemd-analyze critical-chain): from the step that ended last,
// back through what it waited for. A step waits for the steps it runs
// After and, implicitly, for every step of the earlier phases; of those,
// the one that ended last is what held it up.
func CriticalPath(rec *state.Record, p *plan.Plan) []Timing {
	byID := map[string]Timing{}
	var ran []Timing
	for _, s := range rec.Steps {
		if s.Outcome == state.OutcomePending || s.Outcome == state.OutcomeSkipped {
			continue
		}
		t := timing(s)
		byID[s.ID] = t
		ran = append(ran, t)
	}
	if len(ran) == 0 {
		return nil
	}
	after := map[string][]string{}
	if p != nil {
		for _, s := range p.Steps {
			after[s.ID] = s.After
		}
	}
	rank := map[plan.Phase]int{}
	for i, ph := range plan.Phases {
		rank[ph] = i
	}
	last := ran[0]
	for _, t := range ran[1:] {
		if t.End() > last.End() {
			last = t
		}
	}
	chain := []Timing{last}
	for cur := last; ; {
		var waited []Timing
		for _, id := range after[cur.ID] {
			if t, ok := byID[id]; ok {
				waited = append(waited, t)
			}
		}
		for _, t := range ran {
			if rank[t.Phase] < rank[cur.Phase] {
				waited = append(waited, t)
			}
		}
		var prev *Timing
		for i := range waited {
			// Ended by the time cur started (the record rounds to
			// milliseconds).
			if waited[i].End() <= cur.Start()+time.Millisecond && (prev == nil || waited[i].End() > prev.End()) {
				prev = &waited[i]
			}
		}
		if prev == nil {
			break
		}
		chain = append(chain, *prev)
		cur = *prev
	}
	slices.Reverse(chain)
	return chain
}
