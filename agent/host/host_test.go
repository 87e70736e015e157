package host

import (
	"context"
	"testing"

	"github.com/nodespawn/nodespawn/state"
)

// Status reads the switch's phase from the node's real state file, as
// upgrade writes it: the agent reports Verifying from this alone.
func TestStatusSaysVerifyingFromTheState(t *testing.T) {
	for _, c := range []struct {
		phase                state.UpgradePhase
		switching, verifying bool
	}{
		{state.UpgradePreparing, false, false},
		{state.UpgradeSwitching, true, false},
		{state.UpgradeVerifying, true, true},
		{state.UpgradeRollingBack, true, false},
	} {
		root := t.TempDir()
		s, err := state.Create(root)
		if err != nil {
			t.Fatal(err)
		}
		if err := s.WriteMachines(&state.Machines{Active: "kube2", Upgrade: &state.Upgrade{From: "kube1", To: "kube2", Phase: c.phase}}); err != nil {
			t.Fatal(err)
		}
		ns, err := (&Host{Root: root}).Status(context.Background())
		if err != nil {
			t.Fatalf("%s: %v", c.phase, err)
		}
		if ns.Switching != c.switching || ns.Verifying != c.verifying {
			t.Errorf("phase %s: Switching %v, Verifying %v; want %v, %v", c.phase, ns.Switching, ns.Verifying, c.switching, c.verifying)
		}
	}
}
