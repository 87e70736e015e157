package apply

import (
	"context"
	"strings"

	"github.com/nodespawn/nodespawn/internal/layers"
	"github.com/nodespawn/nodespawn/internal/machine"
	"github.com/nodespawn/nodespawn/plan"
	"github.com/nodespawn/nodespawn/state"
)

// rootFix is a repair of the machine root of p that Check found broken.
type rootFix struct {
	p       *plan.Plan
	h       layers.Health
	store   *layers.Store
	running bool
}

// brokenRoot is what apply does before it says "already applied" (and
// before it resumes or converges): it looks at the machine root of p and
// returns the repair it needs, nil for none. A root that was never
// composed (no record, and no run of p succeeded: a first run killed
// before its image step ended) is left to the image step.
func (r *Session) brokenRoot(ctx context.Context, p *plan.Plan, cur state.Applied) (*rootFix, error) {
	running := false
	if sd := r.Opts.Deps.Systemd; sd != nil && machine.LayerImage(p) != nil {
		var err error
		if running, err = sd.MachineRegistered(ctx, p.Machine); err != nil {
			return nil, err
		}
	}
	h, store, err := machine.CheckRoot(r.Host, p, running)
	if err != nil || len(h.Problems) == 0 || (!cur.Succeeded && h.Image == nil) {
		return nil, err
	}
	what := "applied, but the machine root is broken; repairing it instead of saying already applied"
	if !cur.Succeeded {
		what = "the machine root is broken (an interrupted run or repair); repairing it"
	}
	r.Log.Warn(what, "machine", p.Machine, "problems", strings.Join(machine.ProblemLines(h), "; "))
	return &rootFix{p: p, h: h, store: store, running: running}, nil
}

// repair stops the machine when it runs (its root is unmounted and
// mounted again) and readies the root for the run (layers.Store.Repair):
// the image step fetches the missing layers and composes the root again,
// and every other step puts back what the root lacks; the start steps
// start the machine again.
func (r *Session) repair(ctx context.Context, f *rootFix) error {
	if f.running {
		r.Log.Info("stopping the machine to repair its root; the run starts it again", "machine", f.p.Machine)
		if err := r.StopMachine(ctx, f.p.Machine); err != nil {
			return err
		}
	}
	return f.store.Repair(ctx, machine.ImageRoot(machine.LayerImage(f.p)), f.h, r.Log)
}
