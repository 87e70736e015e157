package render

import (
	"fmt"
	"path"
	"sort"
	"strings"

	"github.com/nodespawn/nodespawn/plan"
)

// Paths inside the machine.
const (
	caPath              = "/etc/kubernetes/pki/ca.crt"
	bootstrapKubeconfig = "/var/lib/kubelet/bootstrap-kubeconfig"
	kubeconfig          = "/var/lib/kubelet/kubeconfig"
	kubeletConfig       = "/var/lib/kubelet/config.yaml"
	wantsDir            = "/etc/systemd/system/multi-user.target.wants"
)

// renderMachine writes the configuration into the rootfs before its first boot.
func (r *renderer) renderMachine() error {
	k := r.m.Kubernetes
	ph := plan.PhaseMachine

	r.file(ph, r.inRoot("/etc/hostname"), r.nodeName+"\n", "the node name as the machine's host name")
	r.file(ph, r.inRoot("/etc/hosts"), r.hosts(), "localhost and the node name (kubelet mounts it into pods)")
	r.file(ph, r.inRoot("/etc/resolv.conf"), r.resolvConf(), "the host's upstream resolvers, not the 127.0.0.53 stub")
	r.link(ph, r.inRoot("/etc/systemd/system/systemd-resolved.service"), "/dev/null",
		"mask systemd-resolved so it cannot replace resolv.conf")
	r.file(ph, r.inRoot("/etc/tmpfiles.d/nodespawn-kmsg.conf"),
		header("#")+"\n# kubelet opens /dev/kmsg at start and dies without it; the machine's device\n# policy blocks the host's, the console is allowed.\nL+ /dev/kmsg - - - - /dev/console\n",
		"/dev/kmsg for kubelet")

	// Container runtime.
	r.file(ph, r.inRoot("/etc/containerd/config.toml"), tmpl("containerd-config.toml.tmpl", r.containerdData()),
		"containerd: CRI with runc and the systemd cgroup driver")
	r.dir(ph, r.inRoot("/etc/containerd/conf.d"), 0o755, "containerd drop-in configuration")
	r.file(ph, r.inRoot("/etc/systemd/system/containerd.service"), tmpl("containerd.service.tmpl", nil), "containerd unit")
	r.link(ph, r.inRoot(path.Join(wantsDir, "containerd.service")), "/etc/systemd/system/containerd.service",
		"enable containerd inside the machine")

	// Kubelet.
	r.file(ph, r.inRoot(caPath), strings.TrimSpace(k.CACert)+"\n", "the cluster CA")
	r.dir(ph, r.inRoot("/etc/kubernetes/manifests"), 0o700, "static pod manifests")
	r.dir(ph, r.inRoot("/var/lib/kubelet"), 0o700, "kubelet state")
	if k.Auth.Exec != nil {
		r.file(ph, r.inRoot(kubeconfig), r.kubeconfig(), "kubeconfig with the exec credential plugin", secret, mode(0o600))
	} else {
		r.file(ph, r.inRoot(bootstrapKubeconfig), r.kubeconfig(), "bootstrap kubeconfig with the bootstrap token", secret, mode(0o600))
	}
	r.file(ph, r.inRoot(kubeletConfig), tmpl("kubelet-config.yaml.tmpl", r.kubeletConfigData()), "kubelet configuration")
	r.file(ph, r.inRoot("/etc/systemd/system/kubelet.service"), tmpl("kubelet.service.tmpl", nil), "kubelet unit")
	r.file(ph, r.inRoot("/etc/systemd/system/kubelet.service.d/10-nodespawn.conf"),
		tmpl("kubelet-dropin.conf.tmpl", struct{ Args []string }{r.kubeletArgs()}),
		"kubelet flags: kubeconfig, node name, labels, taints")
	r.link(ph, r.inRoot(path.Join(wantsDir, "kubelet.service")), "/etc/systemd/system/kubelet.service",
		"enable kubelet inside the machine")
	return nil
}

func (r *renderer) hosts() string {
	short, _, _ := strings.Cut(r.nodeName, ".")
	names := r.nodeName
	if short != r.nodeName {
		names += " " + short
	}
	return header("#") + "\n127.0.0.1 localhost\n::1 localhost ip6-localhost ip6-loopback\n127.0.1.1 " + names + "\n"
}

// resolvConf lists the host's upstream resolvers. The machine shares the
// host's network namespace, but kubelet hands this file to pods with
// dnsPolicy: Default, which cannot reach a 127.0.0.53 stub.
func (r *renderer) resolvConf() string {
	var b strings.Builder
	b.WriteString(header("#") + "\n")
	src := "the host's " + r.f.ResolvConf
	if r.f.ResolvConf == "" {
		src = "the host, which has no resolv.conf"
	}
	fmt.Fprintf(&b, "# From %s.\n", src)
	n := 0
	for _, ns := range r.f.Nameservers {
		if strings.HasPrefix(ns, "127.") {
			continue
		}
		fmt.Fprintf(&b, "nameserver %s\n", ns)
		n++
	}
	if n == 0 {
		r.warn("%s lists no upstream name server (only a local stub or none); the machine's resolv.conf has none, so pods with dnsPolicy: Default cannot resolve names", src)
	}
	if len(r.f.Search) > 0 {
		fmt.Fprintf(&b, "search %s\n", strings.Join(r.f.Search, " "))
	}
	return b.String()
}

type containerdData struct {
	V3           bool
	SandboxImage string
}

func (r *renderer) containerdData() containerdData {
	return containerdData{V3: r.containerdV3, SandboxImage: r.m.Kubernetes.SandboxImage}
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
	FailSwapOn    bool
}

func (r *renderer) kubeletConfigData() kubeletConfigData {
	k := r.m.Kubernetes
	return kubeletConfigData{
		CAPath:        caPath,
		ClusterDomain: k.ClusterDomain,
		ClusterDNS:    k.ClusterDNS,
		FailSwapOn:    boolOr(r.m.Host.DisableSwap, true),
	}
}

// kubeletArgs are the flags without a KubeletConfiguration field. Label
// and taint values are validated to label-value syntax, so they hold no
// spaces or quotes that could break the unit's word splitting.
func (r *renderer) kubeletArgs() []string {
	k := r.m.Kubernetes
	args := []string{"--config=" + kubeletConfig, "--kubeconfig=" + kubeconfig}
	if k.Auth.Exec == nil {
		args = append(args, "--bootstrap-kubeconfig="+bootstrapKubeconfig)
	}
	args = append(args, "--hostname-override="+r.nodeName)
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
