package provision

import (
	"errors"
	"fmt"
	"io/fs"

	"github.com/nodespawn/nodespawn/apply"
	"github.com/nodespawn/nodespawn/internal/layout"
	"github.com/nodespawn/nodespawn/plan"
	"github.com/nodespawn/nodespawn/state"
)

// Action is what Run does with a plan on a host. Decide says it before
// anything runs (the dry run prints it) and Run carries out the same
// decision, made by the same function on the state it finds under its
// lock, so the dry run never promises what apply then refuses.
type Action string

// Actions.
const (
	// ActionApply: nothing was applied on this host; the plan is applied.
	ActionApply Action = "apply"
	// ActionResume: a run of the same manifest did not finish; it is
	// finished (every step checks what is already there).
	ActionResume Action = "resume"
	// ActionReplace: the first run, of another manifest, failed before
	// its machine ever started: there is no node to protect, so the
	// given manifest is applied in its place.
	ActionReplace Action = "replace"
	// ActionAlreadyApplied: this manifest's plan was applied; nothing is
	// done.
	ActionAlreadyApplied Action = "already applied"
	// ActionConverge: the same manifest, but its plan changed (host facts
	// or the tool's version): applied in place to the running machine.
	ActionConverge Action = "converge"
	// ActionForce: --force: every step checked again, and a changed
	// manifest applied in place over the old one.
	ActionForce Action = "force"
	// ActionUpgrade: the other machine of the pair is prepared from the
	// plan and the node switched to it.
	ActionUpgrade Action = "upgrade"
	// ActionRefuse: Run returns Decision.Err and changes nothing.
	ActionRefuse Action = "refuse"
)

// Decision is what Run will do with a plan on a host.
type Decision struct {
	Action Action
	// Machine is the machine the plan is applied to; for an upgrade, the
	// one prepared beside the running one.
	Machine string
	// From is the running machine an upgrade switches away from.
	From string
	// Finish is a switch a killed run left half-done: Run finishes it
	// before anything else (and decides again on the state it leaves).
	Finish *state.Upgrade
	// Abandon is the upgrade being prepared that this run gives up (the
	// running manifest given again) or starts over (another manifest).
	Abandon *state.Upgrade
	// NodeStarted is true once the node's machine has been started: a
	// manifest for another node is refused from then on.
	NodeStarted bool
	// Err is the refusal (ActionRefuse); Exit its exit code (ExitCode's,
	// or the caller's for a refusal of its own).
	Err  error
	Exit int

	// plan is the plan for Machine (rendered for the running machine
	// when the given plan names the other one).
	plan *plan.Plan
}

// String says the decision in one line, for people.
func (d *Decision) String() string {
	s := ""
	if f := d.Finish; f != nil {
		s = fmt.Sprintf("first the interrupted switch from %s to %s is finished (%s); then ", f.From, f.To, f.Phase)
	}
	switch d.Action {
	case ActionApply:
		s += "apply makes machine " + d.Machine
	case ActionResume:
		s += "apply finishes the unfinished run of this manifest on machine " + d.Machine
	case ActionReplace:
		s += "apply makes machine " + d.Machine + " from this manifest in place of the one whose first run failed (the machine never started: no node to protect)"
	case ActionAlreadyApplied:
		s += "already applied on machine " + d.Machine + ": apply changes nothing"
	case ActionConverge:
		s += "apply converges machine " + d.Machine + " (the same manifest; the host or the tool changed the plan)"
	case ActionForce:
		s += "apply (--force) checks every step of machine " + d.Machine + " again and applies this manifest in place"
	case ActionUpgrade:
		s += "applied as an upgrade: machine " + d.Machine + " is prepared beside running " + d.From + ", then the node is switched to it"
	case ActionRefuse:
		s += fmt.Sprintf("apply would refuse (exit %d): %v", d.Exit, d.Err)
	}
	if a := d.Abandon; a != nil && d.Action != ActionRefuse {
		if d.Action == ActionUpgrade {
			s += fmt.Sprintf("; the upgrade prepared for another manifest (%s) starts over", a.ManifestDigest)
		} else {
			s += fmt.Sprintf("; the upgrade being prepared (%s to %s) is abandoned", a.From, a.To)
		}
	}
	return s
}

// Decide says what Run(ctx, p, opts) would do on the host at opts.Root
// now, changing nothing: a root that does not exist is a fresh one. A
// dry run builds no Deps; Decide then assumes DefaultDeps' (systemd only
// when Root is "/").
func Decide(p *plan.Plan, opts apply.Options) (*Decision, error) {
	opts = apply.WithDefaults(opts)
	s, err := state.Open(opts.Root)
	if errors.Is(err, fs.ErrNotExist) {
		return decideOn(&state.Machines{Version: state.MachinesVersion, Applied: map[string]state.Applied{}}, nil, "", p, opts, canSwitch(opts, true))
	}
	if err != nil {
		return nil, fmt.Errorf("apply: %w", err)
	}
	defer s.Close()
	st, err := s.Machines()
	if err != nil {
		return nil, err
	}
	prev, err := s.Record()
	if err != nil {
		return nil, err
	}
	return decideOn(st, prev, s.Show(state.RecordFile), p, opts, canSwitch(opts, true))
}

// canSwitch reports whether Run may upgrade by switching machines: it
// can render the other machine's plan and drive systemd. guessDeps
// stands a dry run's missing Deps in for DefaultDeps'.
func canSwitch(opts apply.Options, guessDeps bool) bool {
	systemd := opts.Deps.Systemd != nil
	if guessDeps && opts.Deps.Images == nil && opts.Deps.Downloader == nil && opts.Deps.Host == nil && opts.Deps.Systemd == nil {
		systemd = apply.ManagesHost(opts.Root)
	}
	return opts.Upgrade.Render != nil && systemd
}

// decideOn is the decision, on the machines' state st and the last run's
// record prev (nil when none), shown as recordPath.
func decideOn(st *state.Machines, prev *state.Record, recordPath string, p *plan.Plan, opts apply.Options, switchable bool) (*Decision, error) {
	d := &Decision{Machine: p.Machine, plan: p}
	if u := st.Upgrade; u != nil && u.Phase != state.UpgradePreparing {
		d.Finish = u
	}
	active := st.Active
	d.NodeStarted = nodeStarted(st, prev, active)
	refuse := func(err error) (*Decision, error) {
		d.Action, d.Err, d.Exit, d.plan = ActionRefuse, err, ExitCode(err), nil
		return d, nil
	}
	cur, known := st.Applied[active]
	healthy := active != "" && known && cur.Succeeded
	forced := false
	if healthy && !apply.SameManifest(cur, opts) {
		u := opts.Upgrade
		switch {
		case switchable && !u.Refuse:
			to, ok := layout.Pair{p.Machine, p.Alternate}.Other(active)
			if !ok {
				return refuse(&apply.ManifestChangedError{Applied: cur.ManifestDigest, Given: opts.ManifestDigest, Record: recordPath, Machine: active})
			}
			d.Action, d.From, d.Machine = ActionUpgrade, active, to
			if pu := st.Upgrade; pu != nil && pu.Phase == state.UpgradePreparing && (pu.To != to || pu.From != active || pu.ManifestDigest != opts.ManifestDigest) {
				d.Abandon = pu
			}
			if p.Machine != to {
				d.plan = nil // upgrade renders it
			}
			return d, nil
		case !opts.Force || u.Refuse:
			return refuse(&apply.ManifestChangedError{Applied: cur.ManifestDigest, Given: opts.ManifestDigest, Record: recordPath, Machine: active,
				FirstBoot: u.Refuse, CanUpgrade: switchable})
		}
		// --force without upgrades (a tree that is not a running host):
		// the new manifest over the old one, in place.
		forced = true
	}
	if u := st.Upgrade; u != nil && u.Phase == state.UpgradePreparing {
		d.Abandon = u
	}
	if active != "" && p.Machine != active {
		if opts.Upgrade.Render == nil {
			return refuse(fmt.Errorf("apply: machine %s runs this node, and the plan is for %s (no renderer to make the plan for %s)", active, p.Machine, active))
		}
		rp, err := opts.Upgrade.Render(active)
		if err != nil {
			return nil, err
		}
		if err := apply.Validate(rp); err != nil {
			return nil, err
		}
		d.Machine, d.plan = active, rp
	}
	planDigest := d.plan.Digest()
	if prev != nil && prev.Machine == d.Machine && !prev.Is(opts.ManifestDigest, opts.SourceDigest) && !opts.Force {
		if d.NodeStarted || prev.Status == state.StatusSucceeded {
			return refuse(&apply.ManifestChangedError{Applied: prev.ManifestDigest, Given: opts.ManifestDigest, Record: recordPath, Machine: d.Machine, CanUpgrade: switchable})
		}
		d.Action = ActionReplace
		return d, nil
	}
	cur = st.Applied[d.Machine]
	switch {
	case forced || (opts.Force && (prev != nil || cur.Succeeded)):
		// (On a fresh host --force changes nothing: a first run.)
		d.Action = ActionForce
	case cur.Succeeded && apply.SameManifest(cur, opts) && cur.PlanDigest == planDigest:
		d.Action = ActionAlreadyApplied
	case prev != nil && prev.Machine == d.Machine && prev.Status != state.StatusSucceeded:
		d.Action = ActionResume
	case cur.Succeeded:
		d.Action = ActionConverge
	default:
		d.Action = ActionApply
	}
	return d, nil
}

// nodeStarted reports whether machine m has been started: its state says
// so, the last run's record shows a start step it reached, or an upgrade
// or rollback ran on the pair.
func nodeStarted(st *state.Machines, prev *state.Record, m string) bool {
	if m == "" {
		return false
	}
	if st.Applied[m].Started || st.Last != nil || st.Previous != "" || st.Upgrade != nil {
		return true
	}
	if prev == nil || prev.Machine != m {
		return false
	}
	for _, s := range prev.Steps {
		if s.Phase == plan.PhaseStart && (s.Kind == plan.KindSystemd || s.Kind == plan.KindWait) {
			switch s.Outcome {
			case state.OutcomeDone, state.OutcomeUnchanged, state.OutcomeFailed:
				return true
			}
		}
	}
	return false
}
