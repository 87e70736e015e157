package render

import (
	"github.com/nodespawn/nodespawn/internal/layout"
	"github.com/nodespawn/nodespawn/plan"
)

// WaitTimeoutSeconds bounds how long apply waits for the machine to boot
// and containerd and kubelet to become active inside it.
const WaitTimeoutSeconds = 300

// renderStart reloads systemd, starts the machine and waits for the node's units.
func (r *renderer) renderStart() error {
	unit := layout.NspawnUnit(r.machine)
	// The boot link is made here, with the start: an upgrade prepares a
	// machine beside the running one, and only the machine that runs is
	// wanted at boot.
	enable := r.link(plan.PhaseStart, layout.EnableLink(r.machine), layout.NspawnTemplate, "start the machine at every boot")
	reload := r.systemd("daemon-reload", "", enable.ID)
	started := r.systemd("start", unit, reload.ID)
	units := layout.NodeUnits()
	r.add(plan.Step{
		ID:      "start:wait:" + r.machine,
		Phase:   plan.PhaseStart,
		Kind:    plan.KindWait,
		Summary: "wait until machined lists " + r.machine + " and containerd and kubelet are active inside",
		After:   []string{started.ID},
		Wait:    &plan.Wait{Machine: r.machine, Units: units, TimeoutSeconds: WaitTimeoutSeconds},
	})
	return nil
}
