package apply

import (
	"context"
	"fmt"
	"strings"

	"github.com/nodespawn/nodespawn/internal/confine"
	"github.com/nodespawn/nodespawn/internal/layers"
	"github.com/nodespawn/nodespawn/plan"
	"github.com/nodespawn/nodespawn/state"
)

// layerImage is p's image step when it composes the machine root from the
// layer store, else nil.
func layerImage(p *plan.Plan) *plan.Image {
	if p == nil {
		return nil
	}
	for _, s := range p.Steps {
		if s.Kind == plan.KindImage && s.Image != nil && s.Image.Layers != nil {
			return s.Image
		}
	}
	return nil
}

// imageMachine is the composed root img makes.
func imageMachine(img *plan.Image) layers.Machine { return layerMachine(img.Dest, img.Layers.Dir) }

// checkRoot looks at the machine root p composes from the layer store
// (layers.Store.Check), changing nothing: a zero Health and no store when
// p's root is a flattened tree. running (the machine runs) makes an
// unmounted root a problem: the machine would run on its bare mount point.
func checkRoot(host *confine.Root, p *plan.Plan, running bool) (layers.Health, *layers.Store, error) {
	img := layerImage(p)
	if img == nil {
		return layers.Health{}, nil, nil
	}
	store := layers.At(host, img.Layers.Store)
	m := imageMachine(img)
	h, err := store.Check(m)
	if err != nil {
		return h, store, fmt.Errorf("check machine root %s: %w", host.Show(m.Target), err)
	}
	if running && !h.Mounted {
		h.Problems = append(h.Problems, layers.Problem{Part: "mount", Path: host.Show(m.Target),
			Detail: fmt.Sprintf("machine %s runs, but its root %s is not mounted", p.Machine, host.Show(m.Target))})
	}
	return h, store, nil
}

// problemLines are h's problems, one detail each.
func problemLines(h layers.Health) []string {
	var out []string
	for _, p := range h.Problems {
		out = append(out, p.Detail)
	}
	return out
}

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
func (r *run) brokenRoot(ctx context.Context, p *plan.Plan, cur state.Applied) (*rootFix, error) {
	running := false
	if sd := r.opts.Deps.Systemd; sd != nil && layerImage(p) != nil {
		var err error
		if running, err = sd.MachineRegistered(ctx, p.Machine); err != nil {
			return nil, err
		}
	}
	h, store, err := checkRoot(r.host, p, running)
	if err != nil || len(h.Problems) == 0 || (!cur.Succeeded && h.Image == nil) {
		return nil, err
	}
	what := "applied, but the machine root is broken; repairing it instead of saying already applied"
	if !cur.Succeeded {
		what = "the machine root is broken (an interrupted run or repair); repairing it"
	}
	r.log.Warn(what, "machine", p.Machine, "problems", strings.Join(problemLines(h), "; "))
	return &rootFix{p: p, h: h, store: store, running: running}, nil
}

// repair stops the machine when it runs (its root is unmounted and
// mounted again) and readies the root for the run (layers.Store.Repair):
// the image step fetches the missing layers and composes the root again,
// and every other step puts back what the root lacks; the start steps
// start the machine again.
func (r *run) repair(ctx context.Context, f *rootFix) error {
	if f.running {
		r.log.Info("stopping the machine to repair its root; the run starts it again", "machine", f.p.Machine)
		if err := r.stopMachine(ctx, f.p.Machine); err != nil {
			return err
		}
	}
	return f.store.Repair(ctx, imageMachine(layerImage(f.p)), f.h, r.log)
}
