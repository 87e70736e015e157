package provision

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"path/filepath"
	"strings"
	"time"

	"github.com/nodespawn/nodespawn/apply"
	"github.com/nodespawn/nodespawn/internal/command"
	"github.com/nodespawn/nodespawn/internal/kubecheck"
	"github.com/nodespawn/nodespawn/manifest"
	"github.com/nodespawn/nodespawn/plan"
	"github.com/nodespawn/nodespawn/render"
	"github.com/nodespawn/nodespawn/state"
)

// upgradeOptions are apply's settings for upgrades by alternating machines
// with manifest m: the plan of either machine of the pair, and the Node
// check against the cluster.
func upgradeOptions(m *manifest.Manifest, facts plan.Facts, root string, render func(*manifest.Manifest, plan.Facts, string) (*plan.Plan, error)) apply.UpgradeOptions {
	return apply.UpgradeOptions{
		Render:       func(machine string) (*plan.Plan, error) { return render(m, facts, machine) },
		NodeReady:    nodeReady(m, root),
		StopTimeout:  manifest.Duration(m.Upgrade.StopTimeout),
		ReadyTimeout: manifest.Duration(m.Upgrade.ReadyTimeout),
	}
}

// nodeReady waits until the API server sees the node Ready with a
// heartbeat after since, asking with the node's own credentials: kubelet's
// client certificate from the node's state (bootstrap token), or what the
// exec credential plugin gives inside the machine.
func nodeReady(m *manifest.Manifest, root string) func(ctx context.Context, p *plan.Plan, since time.Time) error {
	k := m.Kubernetes
	ca := []byte(k.CACert)
	return func(ctx context.Context, p *plan.Plan, since time.Time) error {
		creds := nodeCredentials(m, root, p)
		timeout := kubecheck.DefaultTimeout
		if d, ok := ctx.Deadline(); ok {
			timeout = time.Until(d)
		}
		_, err := kubecheck.WaitReady(ctx, kubecheck.WaitOptions{
			APIServer: k.APIServer, CAPEM: ca, NodeName: p.NodeName, Credentials: creds,
			Since: since, Timeout: timeout, Logger: slog.Default(),
		})
		return err
	}
}

// nodeCredentials are the node's own credentials for machine p of
// manifest m: kubelet's client certificate from the node's state
// (bootstrap token), or what the exec credential plugin gives inside the
// machine.
func nodeCredentials(m *manifest.Manifest, root string, p *plan.Plan) func(ctx context.Context) (kubecheck.Credentials, error) {
	k := m.Kubernetes
	return func(ctx context.Context) (kubecheck.Credentials, error) {
		if k.Auth.Exec != nil {
			return kubecheck.ExecCredential(ctx, machineRunner(p), execPlugin(k.Auth.Exec), k.APIServer, []byte(k.CACert))
		}
		state := p.NodeState
		if state == "" {
			return kubecheck.Credentials{}, errors.New("the plan names no node state directory")
		}
		return kubecheck.KubeletClientCert(filepath.Join(root, state, "kubelet"))
	}
}

// NodeAccess is how the node under root reaches its API server as itself
// (nodespawn agent): the API server and cluster CA of the running
// machine's manifest, the node's name, and its own credentials, asked
// anew on each call (kubelet rotates its certificate).
type NodeAccess struct {
	APIServer   string
	CAPEM       []byte
	NodeName    string
	Credentials func(ctx context.Context) (kubecheck.Credentials, error)
}

// ActiveNodeAccess is NodeAccess for the active machine under root.
func ActiveNodeAccess(root string) (*NodeAccess, error) {
	st, err := state.ReadMachines(root)
	if err != nil {
		return nil, err
	}
	if st.Active == "" {
		return nil, errors.New("no machine runs a node here (nodespawn apply makes one)")
	}
	p, err := state.PlanOf(root, st.Active)
	if err != nil {
		return nil, err
	}
	data, err := state.ManifestOf(root, st.Active)
	if err != nil {
		return nil, err
	}
	if p == nil || data == nil {
		return nil, fmt.Errorf("the plan or manifest of running machine %s is missing under %s", st.Active, state.MachinesDir)
	}
	m, err := manifest.Load(state.ManifestFile(st.Active), data)
	if err != nil {
		return nil, fmt.Errorf("the running machine's manifest no longer loads: %w", err)
	}
	return &NodeAccess{APIServer: m.Kubernetes.APIServer, CAPEM: []byte(m.Kubernetes.CACert), NodeName: p.NodeName,
		Credentials: nodeCredentials(m, root, p)}, nil
}

// execPlugin is the manifest's exec credential plugin as kubecheck runs it.
func execPlugin(e *manifest.ExecProvider) kubecheck.ExecPlugin {
	env := make([]string, 0, len(e.Env))
	for _, v := range e.Env {
		env = append(env, v.Name+"="+v.Value)
	}
	return kubecheck.ExecPlugin{APIVersion: e.APIVersion, Command: e.Command, Args: e.Args, Env: env}
}

// envScript is run by /bin/sh inside the machine: it reads the plugin's
// environment as shell assignments from its standard input, then runs the
// plugin. No file holds the environment (on the host or in the machine),
// and the command line, which every user can read, holds none of it.
const envScript = `set -a; . /dev/stdin; set +a; exec "$@"`

// envAssignments writes env ("KEY=value") as shell assignments for
// envScript: names must be shell names, values are double-quoted with \,
// ", ` and $ escaped, and a line break in a value is refused.
func envAssignments(env []string) (string, error) {
	var b strings.Builder
	for _, kv := range env {
		k, v, _ := strings.Cut(kv, "=")
		if !shellName(k) {
			return "", fmt.Errorf("exec credential plugin: %q is not a variable name", k)
		}
		if strings.ContainsAny(v, "\n\r") {
			return "", fmt.Errorf("exec credential plugin: the value of %s holds a line break", k)
		}
		fmt.Fprintf(&b, "%s=\"%s\"\n", k, strings.NewReplacer(`\`, `\\`, `"`, `\"`, "`", "\\`", "$", `\$`).Replace(v))
	}
	return b.String(), nil
}

func shellName(k string) bool {
	for i, r := range k {
		if !(r == '_' || r >= 'A' && r <= 'Z' || r >= 'a' && r <= 'z' || i > 0 && r >= '0' && r <= '9') {
			return false
		}
	}
	return k != ""
}

// machineRunner runs a command inside p's machine (systemd-run -M) with
// env, for the exec credential plugin; the environment goes through the
// command's standard input (envScript).
func machineRunner(p *plan.Plan) kubecheck.Runner {
	return func(ctx context.Context, argv, env []string) ([]byte, error) {
		assign, err := envAssignments(env)
		if err != nil {
			return nil, err
		}
		var secrets []string
		for _, kv := range env {
			if k, v, _ := strings.Cut(kv, "="); k != "KUBERNETES_EXEC_INFO" && v != "" {
				secrets = append(secrets, v)
			}
		}
		args := append([]string{"-M", p.Machine, "--wait", "--pipe", "--quiet", "--collect", "--", "/bin/sh", "-c", envScript, "sh"}, argv...)
		return command.Exec{}.Run(ctx, command.Options{Stdin: strings.NewReader(assign), Redact: secrets}, "systemd-run", args...)
	}
}

// checkSameNode refuses a manifest that changes what an upgrade cannot:
// the machine pair, the node's name, the cluster's CA or API server.
// Those need a new node: nodespawn reset, then apply.
//
// identity false leaves out the node's identity (its name, cluster CA and
// API server) and checks the machine's name alone: for a first run that
// failed before its machine started, which made no node.
func checkSameNode(root string, m *manifest.Manifest, p *plan.Plan, identity bool) error {
	st, err := state.ReadMachines(root)
	if err != nil || st.Active == "" {
		return err
	}
	applied, err := state.PlanOf(root, st.Active)
	if err != nil || applied == nil {
		return err
	}
	var changed []string
	if st.Active != p.Machine && st.Active != p.Alternate {
		changed = append(changed, fmt.Sprintf("machine.name: machine %s runs the node, and this manifest's machines are %s and %s", st.Active, p.Machine, p.Alternate))
	}
	if identity && applied.NodeName != p.NodeName {
		changed = append(changed, fmt.Sprintf("kubernetes.nodeName: the node is %s, this manifest makes %s", applied.NodeName, p.NodeName))
	}
	if data, err := state.ManifestOf(root, st.Active); identity && err == nil && data != nil {
		if old, err := manifest.Load(state.ManifestFile(st.Active), data); err == nil {
			if strings.TrimSpace(old.Kubernetes.CACert) != strings.TrimSpace(m.Kubernetes.CACert) {
				changed = append(changed, "kubernetes.caCert: another cluster CA")
			}
			if old.Kubernetes.APIServer != m.Kubernetes.APIServer {
				changed = append(changed, fmt.Sprintf("kubernetes.apiServer: %s, was %s", m.Kubernetes.APIServer, old.Kubernetes.APIServer))
			}
		}
	}
	if len(changed) == 0 {
		return nil
	}
	return InputError{fmt.Errorf("this manifest is for another node than the one machine %s runs, which an upgrade cannot change:\n  %s\nrun nodespawn reset first, then apply it as a new node", st.Active, strings.Join(changed, "\n  "))}
}

// resumeAtBoot finishes a switch a power cut interrupted, before the
// first-boot unit reads its manifest: the node must run again whatever
// the user-data holds.
func resumeAtBoot(ctx context.Context, root, toolVersion string) error {
	out, err := Resume(ctx, root, toolVersion)
	if out != nil {
		slog.Info("finished the interrupted upgrade", "from", out.From, "to", out.To, "outcome", out.Outcome)
	}
	return err
}

// StoredOptions are apply's options for finishing or undoing a switch
// without a manifest given: the Node check and timeouts come from the
// manifest the first of machines was made from (the cluster and the
// timeouts are the same for both machines of a node).
func StoredOptions(root, toolVersion string, machines ...string) (apply.Options, error) {
	var data []byte
	var err error
	name := "the stored manifest"
	for _, m := range machines {
		if data, err = state.ManifestOf(root, m); err == nil && data != nil {
			name = state.ManifestFile(m)
			break
		}
	}
	if err == nil && data == nil {
		data, err = apply.StoredManifest(root)
	}
	if err != nil {
		return apply.Options{}, err
	}
	m, err := manifest.Load(name, data)
	if err != nil {
		return apply.Options{}, fmt.Errorf("the stored manifest no longer loads: %w", err)
	}
	deps, err := apply.DefaultDeps(root, slog.Default())
	if err != nil {
		return apply.Options{}, err
	}
	return apply.Options{Root: root, Deps: deps, ToolVersion: toolVersion,
		Upgrade: apply.UpgradeOptions{NodeReady: nodeReady(m, root), StopTimeout: manifest.Duration(m.Upgrade.StopTimeout), ReadyTimeout: manifest.Duration(m.Upgrade.ReadyTimeout)}}, nil
}

// AppliedPlan is the plan the last apply stored. A state directory from a
// version that did not store it has the manifest instead, whose plan is
// rendered again for this host.
func AppliedPlan(ctx context.Context, root string) (*plan.Plan, error) {
	p, err := apply.StoredPlan(root)
	if err != nil || p != nil {
		return p, err
	}
	data, err := apply.StoredManifest(root)
	if err != nil {
		return nil, InputError{fmt.Errorf("%w; or give --machine NAME", err)}
	}
	m, err := manifest.Load("the stored manifest", data)
	if err != nil {
		return nil, fmt.Errorf("the stored manifest no longer loads (give --machine NAME): %w", err)
	}
	facts, err := Facts(ctx, "", root)
	if err != nil {
		return nil, err
	}
	return render.Plan(m, facts)
}
