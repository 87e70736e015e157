package apply

import (
	"context"
	"fmt"
	"path"
	"strings"

	"github.com/nodespawn/nodespawn/internal/confine"
	"github.com/nodespawn/nodespawn/internal/layers"
	"github.com/nodespawn/nodespawn/plan"
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

// layerMachine is the composed root img makes.
func layerMachine(img *plan.Image) layers.Machine {
	return layers.Machine{Target: img.Dest, Dir: img.Layers.Dir, Unit: img.Layers.MountUnit, Machine: path.Base(img.Dest)}
}

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
	m := layerMachine(img)
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

// repairRoot is what apply does instead of "already applied" when the
// machine root of p, applied, is broken: it says what is broken, stops
// the machine when it runs (its root is unmounted and mounted again), and
// readies the root for the run that follows (layers.Store.Repair): the
// image step fetches the missing layers and composes the root again, and
// every other step puts back what the root lacks.
func (r *run) repairRoot(ctx context.Context, p *plan.Plan) (repairing bool, err error) {
	running := false
	if sd := r.opts.Deps.Systemd; sd != nil {
		if running, err = sd.MachineRegistered(ctx, p.Machine); err != nil {
			return false, err
		}
	}
	h, store, err := checkRoot(r.host, p, running)
	if err != nil || len(h.Problems) == 0 {
		return false, err
	}
	r.log.Warn("applied, but the machine root is broken; repairing it instead of saying already applied",
		"machine", p.Machine, "problems", strings.Join(problemLines(h), "; "))
	if running {
		r.log.Info("stopping the machine to repair its root; the run starts it again", "machine", p.Machine)
		if err := r.stopMachine(ctx, p.Machine); err != nil {
			return true, err
		}
	}
	if err := store.Repair(ctx, layerMachine(layerImage(p)), h, r.log); err != nil {
		return true, err
	}
	return true, nil
}
