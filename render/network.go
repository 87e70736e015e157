package render

import (
	"fmt"
	"net/netip"
	"strings"

	"github.com/nodespawn/nodespawn/manifest"
)

// resolvers is what one resolv.conf says, and where it came from.
type resolvers struct {
	source      string
	nameservers []string
	search      []string
	options     []string
}

// maxNameservers is how many servers the C library reads from resolv.conf.
const maxNameservers = 3

func (rs resolvers) file() string {
	var b strings.Builder
	b.WriteString(header("#") + "\n")
	fmt.Fprintf(&b, "# From %s.\n", rs.source)
	for i, ns := range rs.nameservers {
		if i == maxNameservers {
			fmt.Fprintf(&b, "# (%d more servers left out: resolvers read %d)\n", len(rs.nameservers)-i, maxNameservers)
			break
		}
		fmt.Fprintf(&b, "nameserver %s\n", ns)
	}
	if len(rs.search) > 0 {
		fmt.Fprintf(&b, "search %s\n", strings.Join(rs.search, " "))
	}
	if len(rs.options) > 0 {
		fmt.Fprintf(&b, "options %s\n", strings.Join(rs.options, " "))
	}
	return b.String()
}

// decideDNS picks the machine's resolvers and the ones kubelet hands to
// pods. The machine shares the host's network namespace, so the host's
// own resolv.conf (a loopback stub included) works for it; pods have
// their own namespaces and need upstream servers.
func (r *renderer) decideDNS() error {
	if d := r.m.Machine.DNS; d != nil {
		rs := resolvers{source: "the manifest's machine.dns", nameservers: d.Nameservers, search: d.Search, options: d.Options}
		r.machineDNS, r.podDNS = rs, rs
		return nil
	}
	up := r.upstream()
	if up == nil {
		stub := "no resolv.conf at all"
		if r.f.ResolvConf != "" {
			stub = fmt.Sprintf("only %s in %s", strings.Join(r.f.Nameservers, ", "), r.f.ResolvConf)
			if len(r.f.Nameservers) == 0 {
				stub = "no name server in " + r.f.ResolvConf
			}
		}
		return hostError(field("machine", "dns", "nameservers"), fmt.Sprintf(
			"this host has no upstream name server pods could reach (%s, and none in systemd-resolved's, NetworkManager's or dnsmasq's lists); give the servers in machine.dns.nameservers", stub))
	}
	r.podDNS = *up
	r.machineDNS = *up
	if r.f.ResolvConf != "" && len(r.f.Nameservers) > 0 {
		r.machineDNS = resolvers{source: "the host's " + r.f.ResolvConf + " (the machine shares the host's network)",
			nameservers: r.f.Nameservers, search: r.f.Search, options: r.f.ResolvOptions}
	}
	return nil
}

// upstream is the host's upstream resolvers from the facts; facts recorded
// before Upstream existed name them in ResolvConf and Nameservers.
func (r *renderer) upstream() *resolvers {
	if u := r.f.Upstream; u != nil && len(u.Nameservers) > 0 {
		return &resolvers{source: "the host's " + u.Source, nameservers: u.Nameservers, search: u.Search, options: u.Options}
	}
	var servers []string
	for _, ns := range r.f.Nameservers {
		if a, err := netip.ParseAddr(strings.SplitN(ns, "%", 2)[0]); err == nil && !a.IsLoopback() && !a.IsUnspecified() {
			servers = append(servers, ns)
		}
	}
	if len(servers) == 0 {
		return nil
	}
	return &resolvers{source: "the host's " + r.f.ResolvConf, nameservers: servers, search: r.f.Search, options: r.f.ResolvOptions}
}

// decideNodeIP picks the addresses kubelet registers (--node-ip) from
// kubernetes.nodeIP and the host's interfaces. With "auto" and facts that
// list no interfaces, kubelet chooses, as it does on its own.
func (r *renderer) decideNodeIP() error {
	want := r.m.Kubernetes.NodeIPs()
	seen := r.hostAddresses()
	if want == nil {
		if ip := r.defaultRouteAddress(); ip.IsValid() {
			r.nodeIPs = []netip.Addr{ip}
		} else if len(r.f.Interfaces) > 0 {
			return hostError(field("kubernetes", "nodeIP"), fmt.Sprintf(
				"is \"auto\", but no interface with the default route has an address (addresses here: %s); give an address or a CIDR", seenList(seen)))
		}
		return nil
	}
	for _, w := range want {
		if pfx, err := netip.ParsePrefix(w); err == nil {
			pfx = pfx.Masked()
			var found netip.Addr
			for _, a := range seen {
				if pfx.Contains(a.Addr()) {
					found = a.Addr()
					break
				}
			}
			if !found.IsValid() {
				return hostError(field("kubernetes", "nodeIP"), fmt.Sprintf("no address of this host is in %s (addresses here: %s)", pfx, seenList(seen)))
			}
			r.nodeIPs = append(r.nodeIPs, found)
			continue
		}
		a := netip.MustParseAddr(w)
		if len(seen) > 0 && !hasAddr(seen, a) {
			return hostError(field("kubernetes", "nodeIP"), fmt.Sprintf("%s is not an address of this host (addresses here: %s)", a, seenList(seen)))
		}
		r.nodeIPs = append(r.nodeIPs, a)
	}
	return nil
}

// hostAddresses are the interfaces' addresses, in interface order.
func (r *renderer) hostAddresses() []netip.Prefix {
	var out []netip.Prefix
	for _, i := range r.f.Interfaces {
		for _, c := range i.Addresses {
			if p, err := netip.ParsePrefix(c); err == nil {
				out = append(out, p)
			}
		}
	}
	return out
}

// defaultRouteAddress is the first IPv4 address of the interface with the
// IPv4 default route, else the first IPv6 one of the IPv6 default route.
func (r *renderer) defaultRouteAddress() netip.Addr {
	for _, v4 := range []bool{true, false} {
		for _, i := range r.f.Interfaces {
			if (v4 && !i.DefaultRoute4) || (!v4 && !i.DefaultRoute6) {
				continue
			}
			for _, c := range i.Addresses {
				if p, err := netip.ParsePrefix(c); err == nil && p.Addr().Is4() == v4 {
					return p.Addr()
				}
			}
		}
	}
	return netip.Addr{}
}

func hasAddr(seen []netip.Prefix, a netip.Addr) bool {
	for _, p := range seen {
		if p.Addr() == a {
			return true
		}
	}
	return false
}

func seenList(seen []netip.Prefix) string {
	if len(seen) == 0 {
		return "none"
	}
	s := make([]string, len(seen))
	for i, p := range seen {
		s[i] = p.String()
	}
	return strings.Join(s, ", ")
}

// decideRDMA passes the host's RDMA devices in per machine.rdma.
func (r *renderer) decideRDMA() error {
	has := r.f.RDMA != nil && len(r.f.RDMA.DeviceNodes) > 0
	switch r.m.Machine.RDMA {
	case manifest.SwitchOn:
		if !has {
			return hostError(field("machine", "rdma"), "is \"on\" but this host has no RDMA devices (/dev/infiniband/*: load ib_uverbs and rdma_ucm, or check the NIC); use \"auto\" or \"off\"")
		}
		r.rdma = true
	case manifest.SwitchOff:
	default:
		r.rdma = has
	}
	return nil
}

// rdmaDir is where the host's RDMA device nodes are.
const rdmaDir = "/dev/infiniband"

// rdmaModules are the host modules an RDMA machine relies on: verbs and
// the connection manager for the devices, nvidia-peermem with GPUs for
// GPUDirect RDMA.
func (r *renderer) rdmaModules() []string {
	if !r.rdma {
		return nil
	}
	mods := []string{"ib_uverbs", "rdma_ucm"}
	if r.gpu {
		mods = append(mods, "nvidia-peermem")
	}
	return mods
}

// deviceAllow is the device policy for a bound path under /dev: for a
// directory the probe found device nodes in, every character or block
// class it saw there (so nodes made later, such as another uverbs, are
// allowed too); otherwise the node itself.
func (r *renderer) deviceAllow(src string) []string {
	if !strings.HasPrefix(src, "/dev/") {
		return nil
	}
	if classes, ok := r.f.DeviceDirs[src]; ok {
		var out []string
		for _, c := range classes {
			if c == miscClass {
				// Allowing the class would allow every misc device on the
				// host (fuse, kvm, tun, ...): only the ones named.
				if src != rdmaDir {
					r.warn("%s holds misc devices; they are not allowed as a class (that would allow every misc device on the host): bind each one by its path to allow it", src)
				}
				continue
			}
			out = append(out, c+" rwm")
		}
		return out
	}
	return []string{src + " rwm"}
}

// miscClass is the character class of every misc device (major 10).
const miscClass = "char-misc"
