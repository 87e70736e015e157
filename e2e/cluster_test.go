//go:build e2e

package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

const podName = "e2e-busybox"

// podManifest is a pod the scheduler must place on the node: it tolerates
// the manifest's taint, uses the pod network, and mounts /lib/modules the
// way kube-proxy and CNI plugins do.
func podManifest() string {
	return fmt.Sprintf(`apiVersion: v1
kind: Pod
metadata: {name: %s, namespace: default}
spec:
  nodeSelector: {%q: %q}
  tolerations: [{key: %q, operator: Equal, value: %q, effect: NoSchedule}]
  terminationGracePeriodSeconds: 1
  containers:
  - name: main
    image: %s
    # PID 1 of a container ignores SIGTERM without a handler: trap it, or
    # stopping the machine (reboot, reset) waits 90 s for the pod.
    command: [/bin/sh, -c, 'echo hello from the pod; ls -d /lib/modules/$(uname -r)/kernel && echo lib-modules-ok; trap "exit 0" TERM; sleep 3600 & wait']
    volumeMounts: [{name: modules, mountPath: /lib/modules, readOnly: true}]
  volumes:
  - name: modules
    hostPath: {path: /lib/modules}
`, podName, labelKey, labelValue, taintKey, taintValue, env.busyboxRef)
}

// waitCluster polls kubectl until check accepts its output.
func waitCluster(ctx context.Context, t *testing.T, timeout time.Duration, what string, check func(out string) bool, args ...string) bool {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		out, err := env.cluster.run(ctx, args...)
		if err == nil && check(out) {
			return true
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			t.Errorf("%s: not within %s; last output %q, error %v", what, timeout, out, err)
			return false
		}
		time.Sleep(time.Second)
	}
}

// waitJoined waits until requester's kubelet client CSR is approved and
// signed and the Node turns Ready, and prints both times (elapsed, from what).
func waitJoined(ctx context.Context, t *testing.T, elapsed func() time.Duration, node, requester, what string) bool {
	t.Helper()
	csrs := `{range .items[*]}{.spec.username}{" "}{.spec.signerName}{" "}{.status.conditions[*].type}{" "}{.status.certificate}{"\n"}{end}`
	issued := func(out string) bool {
		for _, l := range strings.Split(out, "\n") {
			f := strings.Fields(l)
			if len(f) >= 4 && f[0] == requester && f[1] == "kubernetes.io/kube-apiserver-client-kubelet" &&
				strings.Contains(l, "Approved") && len(f[len(f)-1]) > 100 {
				return true
			}
		}
		return false
	}
	if !waitCluster(ctx, t, 5*time.Minute, "the kubelet's client CSR by "+requester+" approved and signed", issued, "get", "csr", "-o", "jsonpath="+csrs) {
		return false
	}
	t.Logf("TIMING %s -> kubelet CSR (by %s) approved and signed: %s", what, requester, elapsed())
	ready := `{.status.conditions[?(@.type=="Ready")].status}`
	if !waitCluster(ctx, t, 5*time.Minute, "Node "+node+" Ready", func(out string) bool { return out == "True" },
		"get", "node", node, "-o", "jsonpath="+ready) {
		return false
	}
	t.Logf("TIMING %s -> Node %s Ready: %s", what, node, elapsed())
	return true
}

// checkExecCredential applies a second manifest on the reset guest whose
// kubelet authenticates with an exec credential plugin the manifest ships
// as a machine extra file: the plugin's token gets the kubelet its client
// certificate (a CSR as system:node:NAME) and the node turns Ready.
func checkExecCredential(ctx context.Context, t *testing.T, v *vm) {
	m := manifest(manifestOptions{execNode: execNodeName})
	v.must(ctx, "cat > /root/exec-node.yaml <<'EOF_MANIFEST'\n"+m+"\nEOF_MANIFEST")
	start := time.Now()
	if r := v.sh(ctx, "/usr/local/bin/nodespawn apply -f /root/exec-node.yaml 2>&1"); r.Code != 0 {
		t.Fatalf("nodespawn apply with the exec credential manifest: exit %d\n%s", r.Code, r.Stdout)
	}
	t.Logf("TIMING exec credential: apply after reset took %s", time.Since(start).Round(100*time.Millisecond))
	if !waitJoined(ctx, t, func() time.Duration { return time.Since(start).Round(100 * time.Millisecond) }, execNodeName, "system:node:"+execNodeName, "exec credential: apply start") {
		out, _ := env.cluster.run(ctx, "get", "csr,nodes", "-o", "wide")
		r := v.sh(ctx, inMachine("journalctl -u kubelet --no-pager | tail -n 40"))
		t.Fatalf("cluster:\n%s\nkubelet journal:\n%s", out, r.Stdout)
	}
	if r := v.sh(ctx, inMachine("grep -c exec: /etc/kubernetes/kubelet.conf; test ! -e /etc/kubernetes/bootstrap-kubelet.conf")); r.Code != 0 {
		t.Errorf("the kubelet's kubeconfig should name the exec plugin and no bootstrap kubeconfig exist: %s%s", r.Stdout, r.Stderr)
	}
}

// checkCluster follows the node into the test cluster: the bootstrap CSR is
// approved and signed, the Node registers with the manifest's name, labels
// and taints and turns Ready, and a scheduled pod runs with the sandbox and
// its image from the loopback registry, its log read back through the API
// server (which reaches the kubelet through qemu's hostfwd).
func checkCluster(ctx context.Context, t *testing.T, v *vm, kubelet kubeletChoice) {
	c := env.cluster
	defer func() {
		if !t.Failed() {
			return
		}
		var b strings.Builder
		for _, args := range [][]string{
			{"get", "csr,nodes,pods", "-A", "-o", "wide"},
			{"describe", "node", nodeName},
			{"describe", "pod", podName},
			{"get", "events", "-A"},
		} {
			out, err := c.run(ctx, args...)
			fmt.Fprintf(&b, "$ kubectl %s\n%s%v\n", strings.Join(args, " "), out, err)
		}
		// What the kubelet picks its node address from.
		for _, script := range []string{
			"ip addr; ip -4 route; ip -6 route",
			inMachine("cat /etc/hosts /etc/resolv.conf /etc/nsswitch.conf; getent ahosts " + nodeName + "; cat /proc/net/route"),
		} {
			r := v.sh(ctx, script)
			fmt.Fprintf(&b, "$ %s\n%s%s\n", script, r.Stdout, r.Stderr)
		}
		os.WriteFile(filepath.Join(v.dir, "cluster-state.txt"), []byte(b.String()), 0o644)
		t.Logf("cluster state in %s; control-plane logs in %s", filepath.Join(v.dir, "cluster-state.txt"), c.dir)
	}()

	if !waitJoined(ctx, t, v.since, nodeName, "system:bootstrap:"+bootstrapTokenID, "first boot: VM start") {
		t.FailNow()
	}

	out, err := c.run(ctx, "get", "node", nodeName, "-o", "json")
	if err != nil {
		t.Fatal(err)
	}
	var node struct {
		Metadata struct {
			Labels map[string]string `json:"labels"`
		} `json:"metadata"`
		Spec struct {
			PodCIDR string `json:"podCIDR"`
			Taints  []struct{ Key, Value, Effect string }
		} `json:"spec"`
		Status struct {
			Addresses []struct{ Type, Address string }
			NodeInfo  struct {
				KubeletVersion          string `json:"kubeletVersion"`
				ContainerRuntimeVersion string `json:"containerRuntimeVersion"`
			} `json:"nodeInfo"`
		} `json:"status"`
	}
	if err := json.Unmarshal([]byte(out), &node); err != nil {
		t.Fatalf("node JSON: %v\n%s", err, out)
	}
	if got := node.Metadata.Labels[labelKey]; got != labelValue {
		t.Errorf("node label %s = %q, want %q (labels %v)", labelKey, got, labelValue, node.Metadata.Labels)
	}
	tainted := false
	for _, tn := range node.Spec.Taints {
		tainted = tainted || (tn.Key == taintKey && tn.Value == taintValue && tn.Effect == "NoSchedule")
	}
	if !tainted {
		t.Errorf("node taints %+v, want %s=%s:NoSchedule", node.Spec.Taints, taintKey, taintValue)
	}
	if got, want := node.Status.NodeInfo.KubeletVersion, "v"+k8sVersionOf(kubelet); got != want {
		t.Errorf("kubelet version %q, want %s", got, want)
	}
	if got := node.Status.NodeInfo.ContainerRuntimeVersion; got != "containerd://"+containerdVersion {
		t.Errorf("container runtime %q, want containerd://%s", got, containerdVersion)
	}
	internal := ""
	for _, a := range node.Status.Addresses {
		if a.Type == "InternalIP" {
			internal = a.Address
		}
	}
	if internal != guestNodeIP {
		t.Errorf("node InternalIP %q, want %s (the API server reaches the kubelet there)", internal, guestNodeIP)
	}

	podFile := filepath.Join(v.dir, "pod.yaml")
	if err := os.WriteFile(podFile, []byte(podManifest()), 0o644); err != nil {
		t.Fatal(err)
	}
	applied := time.Now()
	if _, err := c.run(ctx, "apply", "-f", podFile); err != nil {
		t.Fatal(err)
	}
	if !waitCluster(ctx, t, 4*time.Minute, "pod "+podName+" Ready", func(out string) bool { return out == "True" },
		"get", "pod", podName, "-o", `jsonpath={.status.conditions[?(@.type=="Ready")].status}`) {
		t.FailNow()
	}
	t.Logf("TIMING first boot: pod applied -> Ready: %s (VM start -> pod Ready: %s)", time.Since(applied).Round(100*time.Millisecond), v.since())
	if out, err := c.run(ctx, "get", "pod", podName, "-o", "jsonpath={.spec.nodeName} {.status.podIP}"); err != nil {
		t.Error(err)
	} else if f := strings.Fields(out); len(f) != 2 || f[0] != nodeName || !strings.HasPrefix(f[1], "10.244.0.") {
		t.Errorf("pod node and IP %q, want %s and an address from the bridge's 10.244.0.0/24", out, nodeName)
	}
	// The log is read through the API server, which dials the kubelet.
	if !waitCluster(ctx, t, time.Minute, "pod log through the API server", func(out string) bool {
		return strings.Contains(out, "hello from the pod") && strings.Contains(out, "lib-modules-ok")
	}, "logs", podName) {
		t.Errorf("pod log lacks the greeting or lib-modules-ok (the pod must see the kernel's modules)")
	}
	if out, err := c.run(ctx, "exec", podName, "--", "hostname"); err != nil || strings.TrimSpace(out) != podName {
		t.Errorf("kubectl exec hostname: %q, %v; want %s", out, err, podName)
	}
	if r := v.sh(ctx, inMachine("ctr -n k8s.io images ls -q")); !strings.Contains(r.Stdout, env.pauseRef) {
		t.Errorf("containerd's images lack the manifest's sandbox image %s:\n%s%s", env.pauseRef, r.Stdout, r.Stderr)
	}
}
