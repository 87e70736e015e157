package render

import (
	"fmt"
	"path"
	"sort"
	"strings"

	"github.com/nodespawn/nodespawn/internal/layout"
	"github.com/nodespawn/nodespawn/manifest"
	"github.com/nodespawn/nodespawn/plan"
)

// Paths inside the machine.
const (
	caPath = "/etc/kubernetes/pki/ca.crt"
	// What nodespawn writes for kubelet lives in the machine's /etc: each
	// machine of an upgrade has its own. /var/lib/kubelet is the node's
	// state, bound from the host (NodeStateDir), where kubelet keeps what
	// it writes itself: with a bootstrap token, the kubeconfig it writes
	// after the bootstrap and the client certificate it names.
	bootstrapKubeconfig    = "/etc/kubernetes/bootstrap-kubelet.conf"
	bootstrapKubeconfigOut = "/var/lib/kubelet/kubeconfig"
	execKubeconfig         = "/etc/kubernetes/kubelet.conf"
	kubeletConfig          = "/etc/kubernetes/kubelet-config.yaml"
	// podResolvConf is the resolv.conf kubelet hands to pods with
	// dnsPolicy: Default: upstream servers only, never a loopback stub.
	podResolvConf = "/etc/kubernetes/resolv.conf"
)

// renderMachine writes the configuration into the rootfs before its first boot.
func (r *renderer) renderMachine() error {
	k := r.m.Kubernetes
	ph := plan.PhaseMachine

	r.file(ph, r.inRoot("/etc/hostname"), r.nodeName+"\n", "the node name as the machine's host name")
	r.file(ph, r.inRoot("/etc/hosts"), r.hosts(), "localhost and the node name (kubelet mounts it into pods)")
	r.file(ph, r.inRoot("/etc/resolv.conf"), r.machineDNS.file(), "the machine's resolvers (it shares the host's network: a host stub works)")
	r.file(ph, r.inRoot(podResolvConf), r.podDNS.file(), "the upstream resolvers kubelet gives pods (never a loopback stub)")
	r.link(ph, r.inRoot(path.Join(layout.UnitDir, "systemd-resolved.service")), "/dev/null",
		"mask systemd-resolved so it cannot replace resolv.conf")
	r.file(ph, r.inRoot("/etc/tmpfiles.d/nodespawn-kmsg.conf"),
		header("#")+"\n# kubelet opens /dev/kmsg at start and dies without it; the machine's device\n# policy blocks the host's, the console is allowed.\nL+ /dev/kmsg - - - - /dev/console\n",
		"/dev/kmsg for kubelet")

	// Container runtime.
	r.file(ph, r.inRoot("/etc/containerd/config.toml"), tmpl("containerd-config.toml.tmpl", r.containerdData()),
		"containerd: CRI with runc and the systemd cgroup driver")
	r.dir(ph, r.inRoot("/etc/containerd/conf.d"), 0o755, "containerd drop-in configuration")
	containerd := path.Join(layout.UnitDir, layout.ContainerdUnit)
	r.file(ph, r.inRoot(containerd), tmpl("containerd.service.tmpl", struct{ RDMA bool }{r.rdma}), "containerd unit")
	r.link(ph, r.inRoot(path.Join(layout.MultiUserWants, layout.ContainerdUnit)), containerd,
		"enable containerd inside the machine")

	// Kubelet.
	r.file(ph, r.inRoot(caPath), strings.TrimSpace(k.CACert)+"\n", "the cluster CA")
	r.dir(ph, r.inRoot("/etc/kubernetes/manifests"), 0o700, "static pod manifests")
	if k.Auth.Exec != nil {
		r.file(ph, r.inRoot(execKubeconfig), r.kubeconfig(), "kubeconfig with the exec credential plugin", secret, mode(0o600))
	} else {
		r.file(ph, r.inRoot(bootstrapKubeconfig), r.kubeconfig(), "bootstrap kubeconfig with the bootstrap token", secret, mode(0o600))
	}
	r.file(ph, r.inRoot(kubeletConfig), tmpl("kubelet-config.yaml.tmpl", r.kubeletConfigData()), "kubelet configuration")
	kubelet := path.Join(layout.UnitDir, layout.KubeletUnit)
	r.file(ph, r.inRoot(kubelet), tmpl("kubelet.service.tmpl", nil), "kubelet unit")
	args := r.kubeletArgs()
	if err := r.checkKubeletArgs(args); err != nil {
		return err
	}
	r.file(ph, r.inRoot(path.Join(kubelet+".d", "10-nodespawn.conf")),
		tmpl("kubelet-dropin.conf.tmpl", struct{ Args []string }{args}),
		"kubelet flags: kubeconfig, node name, labels, taints")
	r.link(ph, r.inRoot(path.Join(layout.MultiUserWants, layout.KubeletUnit)), kubelet,
		"enable kubelet inside the machine")
	return nil
}

// hosts maps localhost, and the node name to the node's address (the
// one kubelet registers), or to 127.0.1.1 when kubelet chooses it.
func (r *renderer) hosts() string {
	short, _, _ := strings.Cut(r.nodeName, ".")
	names := r.nodeName
	if short != r.nodeName {
		names += " " + short
	}
	var b strings.Builder
	b.WriteString(header("#") + "\n127.0.0.1 localhost\n::1 localhost ip6-localhost ip6-loopback\n")
	if len(r.nodeIPs) == 0 {
		b.WriteString("127.0.1.1 " + names + "\n")
	}
	for _, ip := range r.nodeIPs {
		b.WriteString(ip.String() + " " + names + "\n")
	}
	return b.String()
}

type containerdData struct {
	// Version is the configuration version the selected containerd reads
	// without migrating (and warning at every start): 4 from 2.4 on.
	Version      int
	SandboxImage string
	// DefaultRuntime is the GPU drop-in's default runtime ("nvidia"), or
	// "" to keep runc.
	DefaultRuntime string
}

func (r *renderer) containerdData() containerdData {
	d := containerdData{Version: r.containerdConfig, SandboxImage: r.m.Kubernetes.SandboxImage}
	if r.gpu && r.m.Machine.GPUDefaultRuntime != manifest.RuntimeRunc {
		d.DefaultRuntime = manifest.RuntimeNvidia
	}
	return d
}

// kubeconfig is the bootstrap kubeconfig (token) or the kubeconfig with an
// exec credential plugin. It is built as YAML by hand so the output is
// stable and the secret sits in one known place.
func (r *renderer) kubeconfig() string {
	k := r.m.Kubernetes
	var b strings.Builder
	b.WriteString(header("#") + "\n")
	b.WriteString("apiVersion: v1\nkind: Config\nclusters:\n- name: cluster\n  cluster:\n")
	fmt.Fprintf(&b, "    server: %s\n    certificate-authority: %s\n", yamlQuote(k.APIServer), caPath)
	b.WriteString("contexts:\n- name: kubelet\n  context:\n    cluster: cluster\n    user: kubelet\ncurrent-context: kubelet\nusers:\n- name: kubelet\n  user:\n")
	if e := k.Auth.Exec; e != nil {
		b.WriteString("    exec:\n")
		fmt.Fprintf(&b, "      apiVersion: %s\n      command: %s\n", yamlQuote(e.APIVersion), yamlQuote(e.Command))
		if len(e.Args) > 0 {
			b.WriteString("      args:\n")
			for _, a := range e.Args {
				fmt.Fprintf(&b, "      - %s\n", yamlQuote(a))
			}
		}
		if len(e.Env) > 0 {
			b.WriteString("      env:\n")
			for _, v := range e.Env {
				fmt.Fprintf(&b, "      - name: %s\n        value: %s\n", yamlQuote(v.Name), yamlQuote(v.Value))
			}
		}
		b.WriteString("      interactiveMode: Never\n      provideClusterInfo: true\n")
	} else {
		fmt.Fprintf(&b, "    token: %s\n", yamlQuote(k.Auth.BootstrapToken))
	}
	return b.String()
}

// yamlQuote writes s as a double-quoted YAML scalar.
func yamlQuote(s string) string {
	var b strings.Builder
	b.WriteByte('"')
	for _, c := range s {
		switch {
		case c == '"' || c == '\\':
			b.WriteByte('\\')
			b.WriteRune(c)
		case c < 0x20:
			fmt.Fprintf(&b, "\\x%02x", c)
		default:
			b.WriteRune(c)
		}
	}
	b.WriteByte('"')
	return b.String()
}

type kubeletConfigData struct {
	CAPath        string
	ClusterDomain string
	ClusterDNS    []string
	ResolvConf    string
	FailSwapOn    bool
	// ShutdownGracePeriod and its part for critical pods: kubelet's
	// graceful node shutdown when the machine stops.
	ShutdownGracePeriod, ShutdownGracePeriodCritical string
}

func (r *renderer) kubeletConfigData() kubeletConfigData {
	k := r.m.Kubernetes
	grace := manifest.Duration(k.ShutdownGracePeriod)
	return kubeletConfigData{
		CAPath:                      caPath,
		ClusterDomain:               k.ClusterDomain,
		ClusterDNS:                  k.ClusterDNS,
		ResolvConf:                  podResolvConf,
		FailSwapOn:                  boolOr(r.m.Host.DisableSwap, true),
		ShutdownGracePeriod:         grace.String(),
		ShutdownGracePeriodCritical: (grace / 3).String(),
	}
}

// kubeletArgsVar is the environment variable the kubelet drop-in hands
// the flags over in (kubelet-dropin.conf.tmpl, kubelet.service.tmpl).
const kubeletArgsVar = "KUBELET_NODESPAWN_ARGS"

// checkKubeletArgs refuses flags that make the drop-in's Environment=
// assignment longer than the kernel passes to kubelet (systemd puts it in
// kubelet's environment whole): kubelet would never start. The problem
// is reported at the manifest field that adds the most to it.
func (r *renderer) checkKubeletArgs(args []string) error {
	n := len(kubeletArgsVar) + 1 + len(strings.Join(args, " "))
	if n <= manifest.MaxExecString {
		return nil
	}
	k := r.m.Kubernetes
	sizes := map[string]int{"kubeletArgs": len(strings.Join(k.KubeletArgs, " "))}
	for key, v := range k.Labels {
		sizes["labels"] += len(key) + len(v) + 2
	}
	for _, t := range k.Taints {
		sizes["taints"] += len(t.Key) + len(t.Value) + len(t.Effect) + 3
	}
	at := "kubeletArgs"
	for _, f := range []string{"labels", "taints"} {
		if sizes[f] > sizes[at] {
			at = f
		}
	}
	return &Error{Path: field("kubernetes", at), Msg: fmt.Sprintf(
		"the kubelet flags (with labels and taints) come to %d bytes in the %s environment variable; Linux starts no program with an environment entry over %d bytes (MAX_ARG_STRLEN), so kubelet would never start",
		n, kubeletArgsVar, manifest.MaxExecString)}
}

// kubeletArgs are the flags without a KubeletConfiguration field. Label
// and taint values are validated to label-value syntax, so they hold no
// spaces or quotes that could break the unit's word splitting.
func (r *renderer) kubeletArgs() []string {
	k := r.m.Kubernetes
	args := []string{"--config=" + kubeletConfig}
	if k.Auth.Exec == nil {
		args = append(args, "--kubeconfig="+bootstrapKubeconfigOut, "--bootstrap-kubeconfig="+bootstrapKubeconfig)
	} else {
		args = append(args, "--kubeconfig="+execKubeconfig)
	}
	args = append(args, "--hostname-override="+r.nodeName)
	if len(r.nodeIPs) > 0 {
		ips := make([]string, len(r.nodeIPs))
		for i, ip := range r.nodeIPs {
			ips[i] = ip.String()
		}
		args = append(args, "--node-ip="+strings.Join(ips, ","))
	}
	if len(k.Labels) > 0 {
		keys := make([]string, 0, len(k.Labels))
		for key := range k.Labels {
			keys = append(keys, key)
		}
		sort.Strings(keys)
		pairs := make([]string, len(keys))
		for i, key := range keys {
			pairs[i] = key + "=" + k.Labels[key]
		}
		args = append(args, "--node-labels="+strings.Join(pairs, ","))
	}
	if len(k.Taints) > 0 {
		ts := make([]string, len(k.Taints))
		for i, t := range k.Taints {
			ts[i] = t.Key
			if t.Value != "" {
				ts[i] += "=" + t.Value
			}
			ts[i] += ":" + t.Effect
		}
		args = append(args, "--register-with-taints="+strings.Join(ts, ","))
	}
	for _, a := range k.KubeletArgs {
		args = append(args, systemdEscape(a))
	}
	return args
}
