package provision

import (
	"context"
	"errors"
	"fmt"

	"github.com/nodespawn/nodespawn/apply"
	"github.com/nodespawn/nodespawn/plan"
	"github.com/nodespawn/nodespawn/state"
	"github.com/nodespawn/nodespawn/upgrade"
)

// An upgrade in two halves, for the agent (nodespawn agent), through the
// same decision and the same code as Apply: Prepare makes the other
// machine beside the running one and stops (it disrupts nothing, so it
// can run long before the switch is allowed); SwitchPrepared switches to
// it, verifies the Node and rolls back as Apply's upgrade does.
// upgrade.Rollback undoes a switch that worked.

// Prepare is Apply up to the switch: under the lock it finishes a switch
// a killed run left half-done, decides as Apply does, and when the
// decision is an upgrade, prepares the other machine from p's manifest
// (upgrade.Prepare) and returns with the node untouched. Any other
// decision is refused (a *NotAnUpgradeError, or the decision's own
// refusal) and changes nothing: Prepare never applies in place.
func Prepare(ctx context.Context, p *plan.Plan, opts apply.Options) (*apply.Result, *Decision, error) {
	if opts.ManifestDigest == "" {
		return nil, nil, errors.New("prepare: no manifest digest given (Options.ManifestDigest is required)")
	}
	if err := apply.Validate(p); err != nil {
		return nil, nil, err
	}
	r, err := apply.Begin(ctx, opts)
	if err != nil {
		return nil, nil, err
	}
	defer r.End()
	if u := r.Machines.Upgrade; u != nil && u.Phase != state.UpgradePreparing {
		out, err := upgrade.ResumeSwitch(ctx, r)
		if err != nil {
			return &apply.Result{Record: r.LastRecord(), Machine: r.Machines.Active, Upgrade: out}, nil, err
		}
	}
	prev, err := r.Store.Record()
	if err != nil {
		return nil, nil, err
	}
	d, err := decideOn(r.Machines, prev, r.Store.Show(state.RecordFile), p, r.Opts, canSwitch(r.Opts, false))
	if err != nil {
		return nil, nil, err
	}
	switch d.Action {
	case ActionUpgrade:
		res, err := upgrade.Prepare(ctx, r, p)
		return res, d, err
	case ActionRefuse:
		return nil, d, d.Err
	}
	return nil, d, &NotAnUpgradeError{Decision: d}
}

// NotAnUpgradeError is a Prepare whose manifest is not an upgrade of the
// running node: the node runs it already, or runs nothing yet.
type NotAnUpgradeError struct{ Decision *Decision }

func (e *NotAnUpgradeError) Error() string {
	return fmt.Sprintf("prepare: nothing to prepare beside a running node: %s (nodespawn apply does that)", e.Decision)
}

// Refused marks e an apply.Refusal: nothing changed (exit code 2).
func (e *NotAnUpgradeError) Refused() {}

// SwitchPrepared switches the node to the machine Prepare made from the
// manifest whose digest is manifestDigest (what apply.Options.ManifestDigest
// was), verifies it and rolls back when the Node does not come back
// (upgrade.SwitchPrepared). A switch a killed run left half-done is
// finished instead, and its outcome returned: it is the switch asked for
// again. opts are StoredOptions'.
func SwitchPrepared(ctx context.Context, opts apply.Options, manifestDigest string) (*apply.Result, error) {
	r, err := apply.Begin(ctx, opts)
	if err != nil {
		return nil, err
	}
	defer r.End()
	if u := r.Machines.Upgrade; u != nil && u.Phase != state.UpgradePreparing {
		out, err := upgrade.ResumeSwitch(ctx, r)
		return &apply.Result{Record: r.LastRecord(), Machine: r.Machines.Active, Upgrade: out}, err
	}
	return upgrade.SwitchPrepared(ctx, r, manifestDigest)
}
