//go:build e2e

package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"regexp"
	"strings"
	"testing"
	"time"
)

// nodeFacts are what the upgrade checks read from the Node and the pod.
type nodeFacts struct {
	uid, kubeletVersion, ready string
	podContainer, podReady     string
}

func readNode(ctx context.Context, t *testing.T) nodeFacts {
	t.Helper()
	c := env.cluster
	out, err := c.run(ctx, "get", "node", nodeName, "-o",
		`jsonpath={.metadata.uid} {.status.nodeInfo.kubeletVersion} {.status.conditions[?(@.type=="Ready")].status}`)
	if err != nil {
		t.Fatalf("get node: %v", err)
	}
	var f nodeFacts
	fmt.Sscan(out, &f.uid, &f.kubeletVersion, &f.ready)
	out, _ = c.run(ctx, "get", "pod", podName, "-o",
		`jsonpath={.status.containerStatuses[0].containerID} {.status.conditions[?(@.type=="Ready")].status}`)
	fmt.Sscan(out, &f.podContainer, &f.podReady)
	return f
}

// applyUpgrade writes m to the guest and runs nodespawn apply with it.
func applyUpgrade(ctx context.Context, t *testing.T, v *vm, name, m string) (execResult, time.Duration) {
	t.Helper()
	file := "/root/" + name + ".yaml"
	v.must(ctx, "cat > "+file+" <<'EOF_MANIFEST'\n"+m+"\nEOF_MANIFEST")
	// --layers: the plan also says which image layers the store lacks.
	if r := v.sh(ctx, "/usr/local/bin/nodespawn apply --dry-run --layers -f "+file+" 2>&1"); r.Code != 0 || !strings.Contains(r.Stdout, "applied as an upgrade") ||
		!strings.Contains(r.Stdout, "apply would fetch and unpack") {
		t.Errorf("apply --dry-run --layers of the %s manifest: exit %d, want the upgrade and its layers described:\n%s", name, r.Code, r.Stdout)
	} else {
		t.Logf("apply --dry-run:\n%s", r.Stdout)
	}
	start := time.Now()
	r := v.sh(ctx, "/usr/local/bin/nodespawn apply -f "+file+" 2>&1")
	return r, time.Since(start).Round(100 * time.Millisecond)
}

// upgradeStatus is nodespawn status -o json, the parts about the pair.
type upgradeStatus struct {
	State       string `json:"status"`
	Summary     string `json:"summary"`
	Machine     string `json:"machine"`
	Previous    string `json:"previous"`
	LastUpgrade *struct {
		From, To, Outcome, Reason       string
		PrepareMS, SwitchMS, RollbackMS int64
	} `json:"lastUpgrade"`
}

func readUpgradeStatus(ctx context.Context, t *testing.T, v *vm) (upgradeStatus, int) {
	t.Helper()
	r := v.sh(ctx, "/usr/local/bin/nodespawn status -o json")
	var st upgradeStatus
	if err := json.Unmarshal([]byte(r.Stdout), &st); err != nil {
		t.Fatalf("status -o json: %v\n%s%s", err, r.Stdout, r.Stderr)
	}
	return st, r.Code
}

// checkMachines checks that machine runs alone, and is the one started at boot.
func checkMachines(ctx context.Context, t *testing.T, v *vm, running, other string) {
	t.Helper()
	checks := []struct{ what, script string }{
		{running + " registered", "machinectl list --no-legend | grep -qw " + running},
		{other + " not running", "! machinectl list --no-legend | grep -qw " + other},
		{running + " is the active machine", "grep -qx " + running + " /var/lib/nodespawn/active-machine"},
		{running + " starts at boot", "test -L /etc/systemd/system/machines.target.wants/systemd-nspawn@" + running + ".service"},
		{other + " does not start at boot", "! test -e /etc/systemd/system/machines.target.wants/systemd-nspawn@" + other + ".service"},
		{"kubelet active in " + running, inMachineOf(running, "systemctl is-active kubelet")},
		{"the node's state bound in " + running, inMachineOf(running, "findmnt -n -o SOURCE /var/lib/kubelet") + " | grep -q nodespawn/node/kubelet"},
	}
	for _, c := range checks {
		if r := v.sh(ctx, c.script); r.Code != 0 {
			t.Errorf("%s: check %q failed: %s%s", c.what, c.script, r.Stdout, r.Stderr)
		}
	}
}

// checkUpgrade upgrades the node from the previous kubelet to the current
// one: kube2 is prepared beside kube1, the switch happens, and the Node
// comes back as itself (same name and UID, no new bootstrap: the client
// certificate lives in the node's state), with the new kubelet, Ready, its
// pod running again from the image cache the machines share.
func checkUpgrade(ctx context.Context, t *testing.T, v *vm) {
	// The scenario before (a reboot) waits for kubelet only: the pod's
	// container may still be starting, slowly on a loaded machine.
	before := readNode(ctx, t)
	for deadline := time.Now().Add(5 * time.Minute); before.podReady != "True" && time.Now().Before(deadline); {
		time.Sleep(5 * time.Second)
		before = readNode(ctx, t)
	}
	if before.ready != "True" || before.kubeletVersion != "v"+k8sVersionOf(kubeletPrev) || before.podReady != "True" {
		t.Fatalf("before the upgrade: node %+v; want Ready on v%s with its pod Ready", before, k8sVersionOf(kubeletPrev))
	}
	csrsBefore, err := env.cluster.run(ctx, "get", "csr", "-o", "name")
	if err != nil || csrsBefore == "" {
		t.Fatalf("the node's CSRs before the upgrade: %q, %v; want its bootstrap CSR", csrsBefore, err)
	}
	switchStart := time.Now()
	// The new image is the old one with one small layer on top: the layer
	// store has the old layer, so the upgrade fetches the new one only.
	r, took := applyUpgrade(ctx, t, v, "upgrade", manifest(manifestOptions{image: env.imageRefV2}))
	if r.Code != 0 || !strings.Contains(r.Stdout, "upgraded: machine "+altMachineName) {
		t.Fatalf("nodespawn apply (upgrade): exit %d after %s\n%s\n%s", r.Code, took, r.Stdout,
			v.sh(ctx, inMachineOf(altMachineName, "journalctl -u kubelet --no-pager | tail -n 40")).Stdout)
	}
	checkLayers(ctx, t, v, r.Stdout)
	st, code := readUpgradeStatus(ctx, t, v)
	if code != 0 || st.State != "done" || st.Machine != altMachineName || st.Previous != machineName || st.LastUpgrade == nil || st.LastUpgrade.Outcome != "switched" {
		t.Errorf("status after the upgrade: exit %d, %+v", code, st)
	} else {
		t.Logf("TIMING upgrade: apply start -> Node Ready on %s: %s (prepare %s, switch: old machine stopping -> new Node Ready %s)", altMachineName, took,
			time.Duration(st.LastUpgrade.PrepareMS)*time.Millisecond, time.Duration(st.LastUpgrade.SwitchMS)*time.Millisecond)
	}
	checkMachines(ctx, t, v, altMachineName, machineName)
	if r := v.sh(ctx, "test -d /var/lib/machines/"+machineName+"/etc"); r.Code != 0 {
		t.Errorf("the previous machine's rootfs is gone; it must be kept for a rollback")
	}

	after := readNode(ctx, t)
	if after.uid != before.uid {
		t.Errorf("Node UID %s after the upgrade, was %s: the node must come back as itself", after.uid, before.uid)
	}
	if after.kubeletVersion != "v"+k8sVersion || after.ready != "True" {
		t.Errorf("after the upgrade: kubelet %s, Ready %s; want v%s, True", after.kubeletVersion, after.ready, k8sVersion)
	}
	if csrs, err := env.cluster.run(ctx, "get", "csr", "-o", "name"); err != nil || csrs != csrsBefore {
		t.Errorf("the upgrade made new CSRs (a new bootstrap), or they could not be listed (%v); the node's client certificate must carry over:\nbefore: %s\nafter: %s", err, csrsBefore, csrs)
	}
	// The pod runs again, in a new container on the new machine, from the
	// image the old machine pulled.
	if !waitCluster(ctx, t, 4*time.Minute, "pod "+podName+" Ready again on "+altMachineName, func(out string) bool {
		f := strings.Fields(out)
		return len(f) == 2 && f[1] == "True" && f[0] != before.podContainer
	}, "get", "pod", podName, "-o", `jsonpath={.status.containerStatuses[0].containerID} {.status.conditions[?(@.type=="Ready")].status}`) {
		t.Errorf("the pod did not run again after the upgrade")
	} else {
		t.Logf("TIMING upgrade: apply start -> pod Ready again: %s", time.Since(switchStart).Round(100*time.Millisecond))
	}
	if !podImageReused(ctx, t, switchStart) {
		t.Errorf("no event says the pod's image was already present after the switch: the image cache should carry over")
	}
	if r := v.sh(ctx, inMachineOf(altMachineName, "kubelet --version")); !strings.Contains(r.Stdout, "v"+k8sVersion) {
		t.Errorf("kubelet in %s: %s%s", altMachineName, r.Stdout, r.Stderr)
	}
}

// checkLayers checks the upgrade's machine root: an overlay of the old
// image's layer and the new one, fetched alone, beside the old machine's
// root that shares the old layer.
func checkLayers(ctx context.Context, t *testing.T, v *vm, applyOutput string) {
	t.Helper()
	if !regexp.MustCompile(`msg="machine root layers" dest=/var/lib/machines/` + altMachineName + ` layers=2 fetched=1 present=1 `).MatchString(applyOutput) {
		t.Errorf("the upgrade's apply did not say it fetched 1 layer of 2:\n%s", applyOutput)
	}
	checks := []struct{ what, script, want string }{
		{"the store holds the two layers", "ls /var/lib/nodespawn/layers/sha256 | wc -l", "2"},
		{"the new machine sees the new layer", "cat /var/lib/machines/" + altMachineName + imageV2Release, "v2"},
		{"the old machine does not", "test -e /var/lib/machines/" + machineName + imageV2Release + " || echo absent", "absent"},
		{"the new root has two lower layers", "findmnt -n -o OPTIONS /var/lib/machines/" + altMachineName + " | tr ',:' '\\n\\n' | grep -c /var/lib/nodespawn/layers/sha256/", "2"},
	}
	for _, c := range checks {
		if r := v.sh(ctx, c.script); strings.TrimSpace(r.Stdout) != c.want {
			t.Errorf("%s: %s: got %q (exit %d, %s), want %q", c.what, c.script, strings.TrimSpace(r.Stdout), r.Code, r.Stderr, c.want)
		}
	}
}

// podImageReused reports whether kubelet found the pod's image present
// (an event "already present on machine") after since.
func podImageReused(ctx context.Context, t *testing.T, since time.Time) bool {
	out, err := env.cluster.run(ctx, "get", "events", "--field-selector", "involvedObject.name="+podName, "-o", "json")
	if err != nil {
		t.Logf("events: %v", err)
		return false
	}
	var evs struct {
		Items []struct {
			Reason, Message string
			LastTimestamp   time.Time `json:"lastTimestamp"`
			EventTime       time.Time `json:"eventTime"`
		}
	}
	if err := json.Unmarshal([]byte(out), &evs); err != nil {
		t.Logf("events: %v", err)
		return false
	}
	for _, e := range evs.Items {
		at := e.LastTimestamp
		if at.IsZero() {
			at = e.EventTime
		}
		if e.Reason == "Pulled" && strings.Contains(e.Message, "already present") && !at.Before(since.Add(-2*time.Second)) {
			return true
		}
	}
	return false
}

// checkRollbackPowerCut rolls the upgraded node back by hand (nodespawn
// rollback, kube2 -> kube1) and cuts the power (sysrq reboot, no sync) once
// the switch has made kube1 active but before it is verified. The boot must
// start kube1 alone, and the first-boot unit (the switch removed its done
// stamp) must finish the switch: the node on kube1, on the previous
// kubelet, Ready.
func checkRollbackPowerCut(ctx context.Context, t *testing.T, v *vm) {
	before := readNode(ctx, t)
	v.must(ctx, "systemd-run --unit=e2e-rollback --collect /usr/local/bin/nodespawn rollback")
	if _, ok := v.poll(ctx, 3*time.Minute, "the rollback's switch at the verifying phase",
		`grep -q '"phase": "verifying"' /var/lib/nodespawn/machines.json`); !ok {
		t.Fatalf("the rollback never reached the verifying phase:\n%s", v.sh(ctx, "journalctl -u e2e-rollback --no-pager | tail -n 30").Stdout)
	}
	cutAt := v.reboot(ctx, t, `systemd-run --on-active=1 /bin/sh -c 'echo b > /proc/sysrq-trigger'`)
	if res := waitFirstboot(ctx, v); res != "success" {
		t.Fatalf("%s after the power cut: %q\n%s", firstbootUnit, res, v.sh(ctx, "journalctl -b -u "+firstbootUnit+" --no-pager | tail -n 40").Stdout)
	}
	t.Logf("TIMING power cut mid-switch -> first-boot unit finished the switch: %s", time.Since(cutAt).Round(100*time.Millisecond))
	if r := v.sh(ctx, "journalctl -b -u "+firstbootUnit+" --no-pager -o cat | grep -i 'interrupted\\|half-done'"); r.Code != 0 {
		t.Errorf("the first-boot unit's journal does not say it finished an interrupted switch:\n%s", v.sh(ctx, "journalctl -b -u "+firstbootUnit+" --no-pager | tail -n 30").Stdout)
	}
	checkMachines(ctx, t, v, machineName, altMachineName)
	st, code := readUpgradeStatus(ctx, t, v)
	if code != 0 || st.State != "done" || st.Machine != machineName || st.Previous != altMachineName {
		t.Errorf("status after the finished switch: exit %d, %+v", code, st)
	}
	if !waitCluster(ctx, t, 3*time.Minute, "Node Ready on v"+k8sVersionOf(kubeletPrev), func(out string) bool {
		return out == "True v"+k8sVersionOf(kubeletPrev)
	}, "get", "node", nodeName, "-o", `jsonpath={.status.conditions[?(@.type=="Ready")].status} {.status.nodeInfo.kubeletVersion}`) {
		t.Errorf("the node did not come back on %s with the previous kubelet", machineName)
	}
	if after := readNode(ctx, t); after.uid != before.uid {
		t.Errorf("Node UID %s after the rollback, was %s", after.uid, before.uid)
	}
}

// checkRollback applies a manifest whose kubelet exits at once on the
// node running in machine running with kubelet: the other machine is
// prepared with it, the switch fails (kubelet keeps restarting), and the
// node must run on the same machine again, Ready, with apply exiting 1 and
// the reason in the record.
func checkRollback(ctx context.Context, t *testing.T, v *vm, running string, kubelet kubeletChoice) {
	other := altMachineName
	if running == altMachineName {
		other = machineName
	}
	before := readNode(ctx, t)
	r, took := applyUpgrade(ctx, t, v, "broken", manifest(manifestOptions{kubelet: kubeletBroken, readyTimeout: "4m"}))
	if r.Code != 1 || !strings.Contains(r.Stdout, "rolled back") {
		t.Fatalf("nodespawn apply (broken kubelet): exit %d after %s, want 1 and a rollback\n%s", r.Code, took, r.Stdout)
	}
	st, code := readUpgradeStatus(ctx, t, v)
	if code != 1 || st.State != "error" || st.Machine != running || st.LastUpgrade == nil || st.LastUpgrade.Outcome != "rolled back" ||
		!strings.Contains(st.LastUpgrade.Reason, "kubelet") {
		t.Errorf("status after the rollback: exit %d, %+v", code, st)
	} else {
		t.Logf("rollback reason: %s", strings.SplitN(st.LastUpgrade.Reason, "\n", 2)[0])
		t.Logf("TIMING rollback: apply start -> exit 1 with the node on %s again: %s (prepare %s, rollback %s)", running, took,
			time.Duration(st.LastUpgrade.PrepareMS)*time.Millisecond, time.Duration(st.LastUpgrade.RollbackMS)*time.Millisecond)
	}
	checkMachines(ctx, t, v, running, other)
	after := readNode(ctx, t)
	if after.uid != before.uid || after.ready != "True" || after.kubeletVersion != "v"+k8sVersionOf(kubelet) {
		t.Errorf("after the rollback: node %+v; want UID %s, Ready, v%s", after, before.uid, k8sVersionOf(kubelet))
	}
	if r := v.sh(ctx, "/usr/local/bin/nodespawn rollback 2>&1"); r.Code != 2 {
		t.Errorf("nodespawn rollback after an automatic rollback: exit %d, want 2 (nothing kept to roll back to)\n%s", r.Code, r.Stdout)
	}
}
