package render

import (
	"path"

	"github.com/nodespawn/nodespawn/plan"
)

// EnableLink is the link that makes machines.target start machine at boot
// (what machinectl enable writes).
func EnableLink(machine string) string {
	return path.Join(unitDir, "machines.target.wants", "systemd-nspawn@"+machine+".service")
}

// NspawnTemplate is the unit every machine's EnableLink points at.
const NspawnTemplate = systemUnitDir + "/systemd-nspawn@.service"

// WaitTimeoutSeconds bounds how long apply waits for the machine to boot
// and containerd and kubelet to become active inside it.
const WaitTimeoutSeconds = 300

// renderStart reloads systemd, starts the machine and waits for the node's units.
func (r *renderer) renderStart() error {
	unit := "systemd-nspawn@" + r.machine + ".service"
	// The boot link is made here, with the start: an upgrade prepares a
	// machine beside the running one, and only the machine that runs is
	// wanted at boot.
	enable := r.link(plan.PhaseStart, EnableLink(r.machine), NspawnTemplate, "start the machine at every boot")
	reload := r.systemd("daemon-reload", "", enable.ID)
	started := r.systemd("start", unit, reload.ID)
	units := []string{"containerd.service", "kubelet.service"}
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
