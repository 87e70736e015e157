package render

import (
	"errors"
	"fmt"
	"path"
	"strings"

	"github.com/nodespawn/nodespawn/internal/layout"
	"github.com/nodespawn/nodespawn/plan"
)

// claim is a path a step creates.
type claim struct {
	path string
	step *plan.Step
	// dir is true when other steps may create paths inside it.
	dir bool
}

// claims lists the paths step s creates. An archive download claims its
// directory and the members it names; one that takes every member (the
// containerd tarball) claims only its directory. The image step claims
// the machine's root and its mount unit (MountUnit), which apply writes
// or removes.
func claims(s *plan.Step) []claim {
	switch {
	case s.File != nil:
		return []claim{{s.File.Path, s, false}}
	case s.Directory != nil:
		return []claim{{s.Directory.Path, s, true}}
	case s.Link != nil:
		return []claim{{s.Link.Path, s, false}}
	case s.Image != nil:
		return []claim{{s.Image.Dest, s, true}, {MountUnit(s.Image.Dest), s, false}}
	case s.Download != nil:
		d := s.Download
		if d.Archive == "" {
			return []claim{{d.Dest, s, false}}
		}
		cs := []claim{{d.Dest, s, true}}
		for _, m := range d.Members {
			cs = append(cs, claim{path.Join(d.Dest, m.Dest), s, false})
		}
		return cs
	}
	return nil
}

// checkClaims rejects steps that fight over a path: two that create the same
// path, one that creates a path inside what another makes a file or link,
// and one that creates a path inside a directory a later phase creates (a
// host file inside the machine's root filesystem, which the rootfs phase
// pulls into place). Each clash is reported at the manifest entry it
// involves, naming the other step; a clash between two generated steps is a
// bug here and is reported at "$". alt are the steps of the alternate
// machine's plan: the paths its generated steps create are claimed too
// (its own extras are this plan's, and the paths both plans create are
// claimed once).
func (r *renderer) checkClaims(alt []plan.Step) error {
	rank := map[plan.Phase]int{}
	for i, p := range plan.Phases {
		rank[p] = i
	}
	var errs []error
	reported := map[string]bool{}
	// report files the clash between the earlier step a and the later b
	// under the manifest entry of b, else of a.
	report := func(a, b *plan.Step, msg func(x, other *plan.Step) string) {
		x, other := b, a
		if x.Origin == "" {
			x, other = a, b
		}
		if x.Origin == "" {
			errs = append(errs, &Error{Path: field(), Msg: fmt.Sprintf("steps %s and %s clash: %s", a.ID, b.ID, msg(b, a))})
			return
		}
		if !reported[x.Origin] {
			reported[x.Origin] = true
			errs = append(errs, &Error{Path: r.origins[x.Origin], Msg: msg(x, other)})
		}
	}

	byPath := map[string]claim{}
	var all []claim
	for i := range r.plan.Steps {
		s := &r.plan.Steps[i]
		for _, c := range claims(s) {
			if prev, ok := byPath[c.path]; ok {
				report(prev.step, s, func(x, other *plan.Step) string {
					return fmt.Sprintf("%s is also created by %s", r.show(x, c.path), r.by(other))
				})
				continue
			}
			byPath[c.path] = c
			all = append(all, c)
		}
	}
	r.alternate = map[*plan.Step]bool{}
	for i := range alt {
		r.alternate[&alt[i]] = true
	}
	altRoot := layout.MachineRoot(r.plan.Alternate) + "/"
	for i := range alt {
		s := &alt[i]
		if s.Origin != "" {
			continue
		}
		for _, c := range claims(s) {
			if strings.HasPrefix(c.path, altRoot) {
				// Inside the other machine's root, which the image step
				// claims as a whole: no extra of this plan reaches there.
				continue
			}
			prev, ok := byPath[c.path]
			switch {
			case !ok:
				byPath[c.path] = c
				all = append(all, c)
			case prev.step.Origin != "":
				report(s, prev.step, func(x, other *plan.Step) string {
					return fmt.Sprintf("%s is also created by %s", r.show(x, c.path), r.by(other))
				})
			}
		}
	}
	for _, c := range all {
		for d := path.Dir(c.path); ; d = path.Dir(d) {
			a, ok := byPath[d]
			switch {
			case !ok || a.step == c.step:
			case !a.dir:
				report(a.step, c.step, func(x, other *plan.Step) string {
					if x == c.step {
						return fmt.Sprintf("%s is inside %s, which %s makes a %s, not a directory", r.show(x, c.path), r.show(x, a.path), r.by(other), kindWord(other))
					}
					return fmt.Sprintf("%s would be a %s, but %s needs a directory there", r.show(x, a.path), kindWord(x), r.by(other))
				})
			case rank[a.step.Phase] > rank[c.step.Phase]:
				report(a.step, c.step, func(x, other *plan.Step) string {
					if other.Image != nil {
						return fmt.Sprintf("%s is inside machine %s's root filesystem, which %s puts in place after the host phase; put it under machine.extra, with its path inside the machine", c.path, path.Base(other.Image.Dest), r.by(other))
					}
					return fmt.Sprintf("%s is inside %s, which %s creates in a later phase", r.show(x, c.path), r.show(x, a.path), r.by(other))
				})
			}
			if d == "/" {
				break
			}
		}
	}
	ids := map[string]*plan.Step{}
	for i := range r.plan.Steps {
		s := &r.plan.Steps[i]
		prev, ok := ids[s.ID]
		if !ok {
			ids[s.ID] = s
			continue
		}
		report(prev, s, func(_, other *plan.Step) string {
			return fmt.Sprintf("step id %s is also used by %s", s.ID, r.by(other))
		})
	}
	return errors.Join(errs...)
}

// show names the host path p the way the manifest entry of step x writes
// it: as seen inside the machine, unless x is a host step.
func (r *renderer) show(x *plan.Step, p string) string {
	if x.Phase == plan.PhaseHost {
		return p
	}
	if rel, ok := strings.CutPrefix(p, r.rootfs+"/"); ok {
		return "/" + rel
	}
	return p
}

// by names the step s for a message: its id, and where it comes from.
func (r *renderer) by(s *plan.Step) string {
	switch {
	case s.Origin != "":
		return fmt.Sprintf("%s (step %s)", s.Origin, s.ID)
	case r.alternate[s]:
		return fmt.Sprintf("nodespawn (step %s of machine %s, which upgrades alternate with %s)", s.ID, r.plan.Alternate, r.machine)
	}
	return "nodespawn (step " + s.ID + ")"
}

// kindWord is what a step that claims a path not to be a directory makes there.
func kindWord(s *plan.Step) string {
	if s.Link != nil {
		return "link"
	}
	return "file"
}
