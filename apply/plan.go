package apply

import (
	"fmt"

	"github.com/nodespawn/nodespawn/plan"
)

// Validate checks what the Executor relies on: unique ids, known
// phases, a payload for each kind, and After edges that point at earlier
// or same-phase steps without cycles. A failure here is a render bug.
func Validate(p *plan.Plan) error {
	if p == nil {
		return fmt.Errorf("apply: no plan")
	}
	if p.Version != plan.Version {
		return fmt.Errorf("apply: plan version %q, this build executes %q", p.Version, plan.Version)
	}
	phaseIdx := map[plan.Phase]int{}
	for i, ph := range plan.Phases {
		phaseIdx[ph] = i
	}
	byID := map[string]*plan.Step{}
	for i := range p.Steps {
		s := &p.Steps[i]
		if s.ID == "" {
			return fmt.Errorf("apply: invalid plan: step %d has no id", i)
		}
		if byID[s.ID] != nil {
			return fmt.Errorf("apply: invalid plan: step id %s appears twice", s.ID)
		}
		byID[s.ID] = s
		if _, ok := phaseIdx[s.Phase]; !ok {
			return fmt.Errorf("apply: invalid plan: step %s has unknown phase %q", s.ID, s.Phase)
		}
		if err := checkPayload(s); err != nil {
			return fmt.Errorf("apply: invalid plan: step %s: %w", s.ID, err)
		}
	}
	for i := range p.Steps {
		s := &p.Steps[i]
		for _, a := range s.After {
			d := byID[a]
			if d == nil {
				return fmt.Errorf("apply: invalid plan: step %s runs after unknown step %s", s.ID, a)
			}
			if phaseIdx[d.Phase] > phaseIdx[s.Phase] {
				return fmt.Errorf("apply: invalid plan: step %s (phase %s) runs after %s of the later phase %s", s.ID, s.Phase, a, d.Phase)
			}
		}
	}
	// Depth-first search for a cycle among same-phase edges.
	const (
		unseen = iota
		open
		closed
	)
	state := map[string]int{}
	var visit func(s *plan.Step) error
	visit = func(s *plan.Step) error {
		switch state[s.ID] {
		case open:
			return fmt.Errorf("apply: invalid plan: steps form a cycle through %s", s.ID)
		case closed:
			return nil
		}
		state[s.ID] = open
		for _, a := range s.After {
			if d := byID[a]; d.Phase == s.Phase {
				if err := visit(d); err != nil {
					return err
				}
			}
		}
		state[s.ID] = closed
		return nil
	}
	for i := range p.Steps {
		if err := visit(&p.Steps[i]); err != nil {
			return err
		}
	}
	return nil
}

func checkPayload(s *plan.Step) error {
	var ok bool
	switch s.Kind {
	case plan.KindFile:
		ok = s.File != nil
	case plan.KindDirectory:
		ok = s.Directory != nil
	case plan.KindLink:
		ok = s.Link != nil
	case plan.KindPackages:
		ok = s.Packages != nil
	case plan.KindModules:
		ok = s.Modules != nil
	case plan.KindSysctl:
		ok = s.Sysctl != nil
	case plan.KindNftFlush:
		ok = true
	case plan.KindSwapOff:
		ok = s.Swap != nil
	case plan.KindImage:
		ok = s.Image != nil
	case plan.KindDownload:
		ok = s.Download != nil
	case plan.KindSystemd:
		ok = s.Systemd != nil
	case plan.KindWait:
		ok = s.Wait != nil
	default:
		return fmt.Errorf("unknown kind %q", s.Kind)
	}
	if !ok {
		return fmt.Errorf("kind %s without its %s payload", s.Kind, s.Kind)
	}
	return nil
}

// PhaseSteps are p's steps of phase ph, in plan order.
func PhaseSteps(p *plan.Plan, ph plan.Phase) []*plan.Step {
	var out []*plan.Step
	for i := range p.Steps {
		if p.Steps[i].Phase == ph {
			out = append(out, &p.Steps[i])
		}
	}
	return out
}
