package provision

import (
	"context"
	"errors"

	"github.com/nodespawn/nodespawn/apply"
	"github.com/nodespawn/nodespawn/plan"
	"github.com/nodespawn/nodespawn/state"
	"github.com/nodespawn/nodespawn/upgrade"
)

// Apply applies p against opts.Root under the lock: in place (the first
// run, a resumed one, a converge) through apply's executor, or, on a host
// whose node runs from another manifest, as an upgrade by alternating
// machines when it can (Options.Upgrade.Render, a live systemd; package
// upgrade), or not at all, refused before anything changes. A switch a
// killed run left half-done is finished first, whatever p is. The
// decision is Decide's, made again under the lock; Apply returns it with
// what the run did. A failed step is a *apply.StepError
// (ExitCode maps errors to exit codes).
func Apply(ctx context.Context, p *plan.Plan, opts apply.Options) (*apply.Result, *Decision, error) {
	if opts.ManifestDigest == "" {
		return nil, nil, errors.New("apply: no manifest digest given (Options.ManifestDigest is required to recognise a finished run)")
	}
	if err := apply.Validate(p); err != nil {
		return nil, nil, err
	}
	r, err := apply.Begin(ctx, opts)
	if err != nil {
		return nil, nil, err
	}
	defer r.End()
	var resumed *state.UpgradeOutcome
	if u := r.Machines.Upgrade; u != nil && u.Phase != state.UpgradePreparing {
		out, err := upgrade.ResumeSwitch(ctx, r)
		if err != nil {
			return &apply.Result{Record: r.LastRecord(), Machine: r.Machines.Active, Upgrade: out}, nil, err
		}
		resumed = out
	}
	res, d, err := decided(ctx, r, p)
	if res != nil && res.Upgrade == nil {
		res.Upgrade = resumed
	}
	return res, d, err
}

// decided applies p in place, upgrades to the other machine, or refuses:
// what decideOn says, the decision Decide gives the dry run.
func decided(ctx context.Context, r *apply.Session, p *plan.Plan) (*apply.Result, *Decision, error) {
	st, opts := r.Machines, r.Opts
	prev, err := r.Store.Record()
	if err != nil {
		return nil, nil, err
	}
	d, err := decideOn(st, prev, r.Store.Show(state.RecordFile), p, opts, canSwitch(opts, false))
	if err != nil {
		return nil, nil, err
	}
	switch d.Action {
	case ActionRefuse:
		return nil, d, d.Err
	case ActionUpgrade:
		res, err := upgrade.Run(ctx, r, p)
		return res, d, err
	}
	if u := st.Upgrade; u != nil {
		r.Log.Info("abandoning the upgrade that was being prepared: the given manifest is the one the node runs", "from", u.From, "to", u.To, "phase", u.Phase)
		st.Upgrade = nil
		if err := r.Store.WriteMachines(st); err != nil {
			return nil, d, err
		}
	}
	if d.Action == ActionReplace {
		r.Log.Info("applying this manifest in place of the one whose first run failed; its machine never started", "machine", d.Machine, "manifest", prev.ManifestDigest, "status", prev.Status)
	}
	res, err := r.InPlace(ctx, d.plan, prev)
	return res, d, err
}
