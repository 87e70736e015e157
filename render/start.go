package render

import "github.com/nodespawn/nodespawn/plan"

// WaitTimeoutSeconds bounds how long apply waits for the machine to boot
// and containerd and kubelet to become active inside it.
const WaitTimeoutSeconds = 300

// renderStart reloads systemd, starts the machine and waits for the node's units.
func (r *renderer) renderStart() error {
	unit := "systemd-nspawn@" + r.machine + ".service"
	reload := r.systemd("daemon-reload", "")
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
