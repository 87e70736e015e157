package machine

import (
	"fmt"
	"path"

	"github.com/nodespawn/nodespawn/internal/confine"
	"github.com/nodespawn/nodespawn/internal/layers"
	"github.com/nodespawn/nodespawn/plan"
)

// LayerRoot is the layer store's view of the machine root at rootfs with
// its overlay directory dir.
func LayerRoot(rootfs, dir string) layers.Machine {
	return layers.Machine{Target: rootfs, Dir: dir, Unit: layers.LegacyUnit(rootfs), Machine: path.Base(rootfs)}
}

// LayerImage is p's image step when it composes the machine root from the
// layer store, else nil.
func LayerImage(p *plan.Plan) *plan.Image {
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

// ImageRoot is the composed root img (a layer-store image step) makes.
func ImageRoot(img *plan.Image) layers.Machine { return LayerRoot(img.Dest, img.Layers.Dir) }

// CheckRoot looks at the machine root p composes from the layer store
// (layers.Store.Check), changing nothing: a zero Health and no store when
// p's root is a flattened tree. running (the machine runs) makes an
// unmounted root a problem: the machine would run on its bare mount point.
func CheckRoot(host *confine.Root, p *plan.Plan, running bool) (layers.Health, *layers.Store, error) {
	img := LayerImage(p)
	if img == nil {
		return layers.Health{}, nil, nil
	}
	store := layers.At(host, img.Layers.Store)
	m := ImageRoot(img)
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

// ProblemLines are h's problems, one detail each.
func ProblemLines(h layers.Health) []string {
	var out []string
	for _, p := range h.Problems {
		out = append(out, p.Detail)
	}
	return out
}
