//go:build e2e

package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"k8s.io/apimachinery/pkg/api/meta"

	"github.com/nodespawn/nodespawn/api/v1alpha1"
)

// The fleet scenario: the node the earlier scenarios left is upgraded by a
// NodeSpawnRollout, with no nodespawn command typed on it. The API
// (deploy/crds, deploy/node-rbac.yaml) goes into the test cluster, the
// controller runs beside the control plane as its own binary, and the
// agent runs on the guest as the unit `nodespawn install --agent` writes,
// with the node's own credentials.
const (
	controllerMetrics = "127.0.0.1:18080"
	controllerProbes  = "127.0.0.1:18081"
	fleetTimeout      = 15 * time.Minute
)

// startController runs the fleet controller with the admin kubeconfig and
// Lease leader election as one of the cluster's processes (its log
// beside theirs) until the test ends, and waits until it is ready.
func startController(ctx context.Context, t *testing.T) (logPath string) {
	t.Helper()
	c := env.cluster
	p, err := c.startProc("nodespawn-controller", env.controller, "--kubeconfig="+c.admin,
		"--leader-election-namespace=kube-system",
		"--metrics-bind-address="+controllerMetrics, "--health-probe-bind-address="+controllerProbes)
	if err != nil {
		t.Fatal(err)
	}
	// The scenarios after this one run without it.
	t.Cleanup(p.stop)
	logPath = c.logPath("nodespawn-controller")
	deadline := time.Now().Add(time.Minute)
	for {
		resp, err := http.Get("http://" + controllerProbes + "/readyz")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return logPath
			}
		}
		select {
		case <-p.done:
			t.Fatalf("nodespawn-controller exited:\n%s", tailFile(logPath, 30))
		case <-ctx.Done():
			t.Fatal(ctx.Err())
		case <-time.After(500 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Fatalf("nodespawn-controller not ready within a minute (%v):\n%s", err, tailFile(logPath, 30))
		}
	}
}

// kubectlJSON decodes kubectl get ... -o json into out.
func kubectlJSON(ctx context.Context, out any, args ...string) error {
	s, err := env.cluster.run(ctx, append(args, "-o", "json")...)
	if err != nil {
		return err
	}
	return json.Unmarshal([]byte(s), out)
}

// nodespawnHost runs the nodespawn binary on the test host (config digest,
// config export) and returns its stdout.
func nodespawnHost(args ...string) (string, error) {
	cmd := exec.Command(env.nodespawn, args...)
	var errOut strings.Builder
	cmd.Stderr = &errOut
	out, err := cmd.Output()
	if err != nil {
		return string(out), fmt.Errorf("nodespawn %s: %w: %s", strings.Join(args, " "), err, errOut.String())
	}
	return string(out), nil
}

// createConfig writes m as a NodeSpawnConfig named name with `nodespawn
// config export`, applies it, waits for the controller to find it Valid,
// and returns its digest.
func createConfig(ctx context.Context, t *testing.T, name, m string) string {
	t.Helper()
	file := filepath.Join(env.cluster.dir, name+".manifest.yaml")
	if err := os.WriteFile(file, []byte(m), 0o600); err != nil {
		t.Fatal(err)
	}
	obj, err := nodespawnHost("config", "export", "-f", file, "--name", name)
	if err != nil {
		t.Fatal(err)
	}
	objFile := filepath.Join(env.cluster.dir, name+".config.yaml")
	if err := os.WriteFile(objFile, []byte(obj), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := env.cluster.run(ctx, "apply", "-f", objFile); err != nil {
		t.Fatal(err)
	}
	digest, err := nodespawnHost("config", "digest", "-f", file)
	if err != nil {
		t.Fatal(err)
	}
	digest = strings.TrimSpace(digest)
	if !waitCluster(ctx, t, time.Minute, "config "+name+" Valid", func(out string) bool { return out == "True" },
		"get", "nodespawnconfig", name, "-o", `jsonpath={.status.conditions[?(@.type=="Valid")].status}`) {
		t.FailNow()
	}
	return digest
}

// rolloutYAML is a rollout of config to the e2e pool.
func rolloutYAML(name, config, disruption string) string {
	return fmt.Sprintf(`apiVersion: nodespawn.dev/v1alpha1
kind: NodeSpawnRollout
metadata: {name: %s}
spec:
  configName: %s
  nodeSelector: {matchLabels: {%q: %q}}
  strategy: {maxUnavailable: 1, soak: 10s, phaseTimeout: 20m}
  disruption: %s
  failureBudget: 1
`, name, config, labelKey, labelValue, disruption)
}

func applyRollout(ctx context.Context, t *testing.T, name, yaml string) time.Time {
	t.Helper()
	file := filepath.Join(env.cluster.dir, name+".rollout.yaml")
	if err := os.WriteFile(file, []byte(yaml), 0o644); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	if _, err := env.cluster.run(ctx, "apply", "-f", file); err != nil {
		t.Fatal(err)
	}
	return start
}

// fleetWatch is what a poll of the rollout saw along the way.
type fleetWatch struct {
	phases   []v1alpha1.NodePhase
	cordoned bool
	blocked  []string
	ro       v1alpha1.NodeSpawnRollout
	nsn      v1alpha1.NodeSpawnNode
}

// watchRollout polls the rollout, the node's NodeSpawnNode and the Node
// until the rollout's condition cond is True or the timeout passes.
func watchRollout(ctx context.Context, t *testing.T, v *vm, name, cond string) (fleetWatch, bool) {
	t.Helper()
	var w fleetWatch
	deadline := time.Now().Add(fleetTimeout)
	sampleNSN := func() {
		if err := kubectlJSON(ctx, &w.nsn, "get", "nodespawnnode", nodeName); err == nil {
			if ph := w.nsn.Status.Phase; ph != "" && (len(w.phases) == 0 || w.phases[len(w.phases)-1] != ph) {
				w.phases = append(w.phases, ph)
			}
		}
	}
	for time.Now().Before(deadline) && ctx.Err() == nil {
		sampleNSN()
		var node struct {
			Metadata struct{ Annotations map[string]string }
			Spec     struct{ Unschedulable bool }
		}
		if err := kubectlJSON(ctx, &node, "get", "node", nodeName); err == nil &&
			node.Spec.Unschedulable && node.Metadata.Annotations[v1alpha1.AnnotationCordonedBy] == name {
			w.cordoned = true
		}
		if err := kubectlJSON(ctx, &w.ro, "get", "nodespawnrollout", name); err == nil {
			for _, b := range w.ro.Status.Blocked {
				if msg := b.Reason + ": " + b.Message; !slices.Contains(w.blocked, msg) {
					w.blocked = append(w.blocked, msg)
				}
			}
			if meta.IsStatusConditionTrue(w.ro.Status.Conditions, cond) {
				// The report that made it so may have come after this
				// round's first look at the NodeSpawnNode (seen once:
				// Ready missing from the phases of a Complete rollout).
				sampleNSN()
				return w, true
			}
		}
		time.Sleep(2 * time.Second)
	}
	out, _ := env.cluster.run(ctx, "get", "nodespawnrollout,nodespawnnode", "-o", "yaml")
	t.Errorf("rollout %s: %s not True within %s; phases seen %v\n%s\nagent:\n%s", name, cond, fleetTimeout, w.phases, out,
		v.sh(ctx, "journalctl -u nodespawn-agent --no-pager | tail -n 40").Stdout)
	return w, false
}

// checkFleet rolls the node (on machine running, kubelet prev) to config
// v2 (the current kubelet, the image with one more layer) through a
// rollout, then rolls out a config whose kubelet never starts: the node
// rolls back and the rollout halts at its failure budget.
func checkFleet(ctx context.Context, t *testing.T, v *vm, running string) {
	other := altMachineName
	if running == altMachineName {
		other = machineName
	}
	c := env.cluster
	for _, args := range [][]string{
		{"apply", "-f", filepath.Join(env.deploy, "crds")},
		{"wait", "--for=condition=Established", "--timeout=60s", "crd/nodespawnconfigs.nodespawn.dev", "crd/nodespawnnodes.nodespawn.dev", "crd/nodespawnrollouts.nodespawn.dev"},
		{"apply", "-f", filepath.Join(env.deploy, "node-rbac.yaml")},
	} {
		if _, err := c.run(ctx, args...); err != nil {
			t.Fatalf("installing the nodespawn.dev API: %v", err)
		}
	}
	controllerLog := startController(ctx, t)
	defer func() {
		if t.Failed() {
			t.Logf("controller log:\n%s", tailFile(controllerLog, 60))
		}
	}()

	// Enrol: the agent's unit, then the label.
	v.must(ctx, "/usr/local/bin/nodespawn install --agent --binary /usr/local/bin/nodespawn && systemctl daemon-reload && systemctl start nodespawn-agent")
	defer v.sh(ctx, "systemctl disable --now nodespawn-agent")
	if _, err := c.run(ctx, "label", "node", nodeName, v1alpha1.LabelManaged+"=true"); err != nil {
		t.Fatal(err)
	}
	before := readNode(ctx, t)
	runningFile := filepath.Join(c.dir, "running.manifest.yaml")
	if err := os.WriteFile(runningFile, []byte(manifest(manifestOptions{kubelet: kubeletPrev})), 0o600); err != nil {
		t.Fatal(err)
	}
	runningDigest, err := nodespawnHost("config", "digest", "-f", runningFile)
	if err != nil {
		t.Fatal(err)
	}
	runningDigest = strings.TrimSpace(runningDigest)
	// The agent reports the running machine's config, as the node, and
	// labels the Node with it.
	if !waitCluster(ctx, t, 3*time.Minute, "the agent's report of the running config", func(out string) bool {
		return out == runningDigest+" "+running
	}, "get", "nodespawnnode", nodeName, "-o", `jsonpath={.status.activeDigest} {.status.activeMachine}`) {
		t.Fatalf("agent:\n%s", v.sh(ctx, "journalctl -u nodespawn-agent --no-pager | tail -n 40").Stdout)
	}
	checkDigestLabel(ctx, t, runningDigest)

	// A fleet config holds no secret: the node's manifest, with its
	// bootstrap token, is refused.
	if out, err := nodespawnHost("config", "export", "-f", runningFile); err == nil || !strings.Contains(err.Error(), "kubernetes.auth.bootstrapToken") {
		t.Errorf("config export of a manifest with a bootstrap token: %v, want it refused naming the token\n%s", err, out)
	}

	// Config v2 and its rollout: drain (the bare test pod cannot be
	// evicted, so the drain is reported blocked, then proceeds at its
	// timeout), prepare, grant, switch, Node Ready, Complete.
	v2 := createConfig(ctx, t, "e2e-v2", manifest(manifestOptions{image: env.imageRefV2, fleet: true}))
	start := applyRollout(ctx, t, "e2e-v2", rolloutYAML("e2e-v2", "e2e-v2", "{mode: Drain, timeout: 45s, onTimeout: Proceed}"))
	w, ok := watchRollout(ctx, t, v, "e2e-v2", v1alpha1.RolloutComplete)
	t.Logf("rollout e2e-v2: phases %v, cordoned %v, blocked %q", w.phases, w.cordoned, w.blocked)
	if !ok {
		t.FailNow()
	}
	t.Logf("TIMING fleet upgrade: rollout created -> Complete: %s", time.Since(start).Round(100*time.Millisecond))
	if !w.cordoned {
		t.Errorf("the node was never seen cordoned by the rollout (annotation %s)", v1alpha1.AnnotationCordonedBy)
	}
	if !slices.ContainsFunc(w.blocked, func(s string) bool { return strings.Contains(s, podName) }) {
		t.Errorf("the drain of the unevictable pod %s was never reported in status.blocked: %q", podName, w.blocked)
	}
	for _, ph := range []v1alpha1.NodePhase{v1alpha1.PhaseSwitching, v1alpha1.PhaseReady} {
		if !slices.Contains(w.phases, ph) {
			t.Errorf("the agent never reported phase %s (saw %v)", ph, w.phases)
		}
	}
	if st := w.ro.Status; st.Updated != 1 || st.Failed != 0 || st.ConfigDigest != v2 {
		t.Errorf("rollout status: updated %d, failed %d, digest %s; want 1, 0, %s", st.Updated, st.Failed, st.ConfigDigest, v2)
	}
	checkMachines(ctx, t, v, other, running)
	after := readNode(ctx, t)
	if after.uid != before.uid || after.ready != "True" || after.kubeletVersion != "v"+k8sVersion {
		t.Errorf("after the rollout: node %+v; want UID %s, Ready, v%s", after, before.uid, k8sVersion)
	}
	if out, _ := c.run(ctx, "get", "node", nodeName, "-o", `jsonpath={.spec.unschedulable} {.metadata.annotations.nodespawn\.dev/cordoned-by}`); strings.TrimSpace(out) != "" {
		t.Errorf("the node is still cordoned after the rollout (unschedulable, cordoned-by: %q)", out)
	}
	if out, _ := c.run(ctx, "get", "nodespawnnode", nodeName, "-o", `jsonpath={.status.activeDigest} {.status.activeMachine} {.status.phase}`); out != v2+" "+other+" "+string(v1alpha1.PhaseReady) {
		t.Errorf("NodeSpawnNode status after the rollout: %q, want %q", out, v2+" "+other+" Ready")
	}
	checkDigestLabel(ctx, t, v2)
	st, code := readUpgradeStatus(ctx, t, v)
	if code != 0 || st.Machine != other || st.LastUpgrade == nil || st.LastUpgrade.Outcome != "switched" {
		t.Errorf("nodespawn status on the node after the rollout: exit %d, %+v", code, st)
	}
	checkEvents(ctx, t, "e2e-v2", "")
	checkAgentEvents(ctx, t, "Preparing", "Prepared", "Switching", "Verifying", "Ready")
	if _, err := c.run(ctx, "delete", "nodespawnrollout", "e2e-v2"); err != nil {
		t.Fatal(err)
	}

	// A config whose kubelet never starts, switched in place: the agent
	// rolls the node back to the machine it ran, the failure spends the
	// budget of 1, and the rollout halts.
	broken := createConfig(ctx, t, "e2e-broken", manifest(manifestOptions{kubelet: kubeletBroken, readyTimeout: "2m", fleet: true}))
	start = applyRollout(ctx, t, "e2e-broken", rolloutYAML("e2e-broken", "e2e-broken", "{mode: InPlace}"))
	w, ok = watchRollout(ctx, t, v, "e2e-broken", v1alpha1.RolloutHalted)
	t.Logf("rollout e2e-broken: phases %v, blocked %q", w.phases, w.blocked)
	if !ok {
		t.FailNow()
	}
	t.Logf("TIMING fleet rollback: rollout created -> Halted: %s", time.Since(start).Round(100*time.Millisecond))
	if st := w.ro.Status; st.Failed != 1 || st.Updated != 0 || len(st.FailedNodes) != 1 || st.FailedNodes[0].Node != nodeName {
		t.Errorf("halted rollout status: failed %d, updated %d, failedNodes %+v; want the node failed", st.Failed, st.Updated, st.FailedNodes)
	} else {
		t.Logf("failed node: %s: %s", st.FailedNodes[0].Reason, st.FailedNodes[0].Message)
	}
	if w.nsn.Status.Phase != v1alpha1.PhaseRolledBack || !strings.Contains(w.nsn.Status.LastError, "kubelet") || w.nsn.Status.ActiveDigest != v2 {
		t.Errorf("NodeSpawnNode after the broken config: phase %s, active %s, lastError %q; want RolledBack on %s and the kubelet named",
			w.nsn.Status.Phase, w.nsn.Status.ActiveDigest, w.nsn.Status.LastError, v2)
	}
	if broken == v2 {
		t.Errorf("the broken config has the digest of v2")
	}
	checkMachines(ctx, t, v, other, running)
	if back := readNode(ctx, t); back.uid != before.uid || back.ready != "True" || back.kubeletVersion != "v"+k8sVersion {
		t.Errorf("after the rollback: node %+v; want UID %s, Ready, v%s", back, before.uid, k8sVersion)
	}
	checkDigestLabel(ctx, t, v2)
	checkEvents(ctx, t, "e2e-broken", "Halted")
	checkAgentEvents(ctx, t, "Verifying", "RolledBack")
	checkMetrics(t, `nodespawn_rollout_halted{rollout="e2e-broken"} 1`)
	if _, err := c.run(ctx, "delete", "nodespawnrollout", "e2e-broken"); err != nil {
		t.Error(err)
	}
}

// checkDigestLabel checks the Node's config digest label.
func checkDigestLabel(ctx context.Context, t *testing.T, digest string) {
	t.Helper()
	want := v1alpha1.DigestLabelValue(digest)
	if !waitCluster(ctx, t, time.Minute, "the Node labelled with config "+digest, func(out string) bool { return out == want },
		"get", "node", nodeName, "-o", `jsonpath={.metadata.labels.nodespawn\.dev/config-digest}`) {
		t.Errorf("the Node's %s label is not the active config's digest", v1alpha1.LabelConfigDigest)
	}
}

// checkEvents checks that the rollout has Events, one with reason when set.
func checkEvents(ctx context.Context, t *testing.T, rollout, reason string) {
	t.Helper()
	out, err := env.cluster.run(ctx, "get", "events", "-A", "--field-selector", "involvedObject.kind=NodeSpawnRollout,involvedObject.name="+rollout,
		"-o", `jsonpath={range .items[*]}{.reason}{"\n"}{end}`)
	reasons := strings.Fields(out)
	if err != nil || len(reasons) == 0 || (reason != "" && !slices.Contains(reasons, reason)) {
		t.Errorf("events of rollout %s: %q (%v); want some%s", rollout, reasons, err, map[bool]string{true: ", one " + reason}[reason != ""])
	} else {
		t.Logf("events of rollout %s: %s", rollout, strings.Join(reasons, " "))
	}
}

// checkAgentEvents checks that the agent, with the node's credentials
// (the Node authorizer lets a node record Events about itself), recorded
// Events on the Node with these reasons.
func checkAgentEvents(ctx context.Context, t *testing.T, reasons ...string) {
	t.Helper()
	out, err := env.cluster.run(ctx, "get", "events", "-n", "default", "--field-selector", "involvedObject.kind=Node,involvedObject.name="+nodeName+",source=nodespawn-agent",
		"-o", `jsonpath={range .items[*]}{.reason}{"\n"}{end}`)
	got := strings.Fields(out)
	for _, r := range reasons {
		if err != nil || !slices.Contains(got, r) {
			t.Errorf("the agent's Events on the Node: %q (%v); want %q among them", got, err, reasons)
			return
		}
	}
	t.Logf("the agent's Events on the Node: %s", strings.Join(got, " "))
}

// checkMetrics checks that the controller's metrics hold line.
func checkMetrics(t *testing.T, line string) {
	t.Helper()
	resp, err := http.Get("http://" + controllerMetrics + "/metrics")
	if err != nil {
		t.Errorf("controller metrics: %v", err)
		return
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if !strings.Contains(string(b), line) {
		var ours []string
		for _, l := range strings.Split(string(b), "\n") {
			if strings.HasPrefix(l, "nodespawn_") {
				ours = append(ours, l)
			}
		}
		t.Errorf("controller metrics lack %q; nodespawn metrics:\n%s", line, strings.Join(ours, "\n"))
	}
}
