package manifest

import (
	"fmt"
	"net/netip"
	"strings"
	"time"

	jsonpath "github.com/coreos/vcontext/path"
)

// MinContainerdVersion is the oldest containerd a manifest may pin: the
// first to read the configuration versions nodespawn renders (3 and 4).
const MinContainerdVersion = "2.0.0"

// NodeIPAuto is kubernetes.nodeIP's default: the address of the interface
// with the default route.
const NodeIPAuto = "auto"

// NodeIPs splits kubernetes.nodeIP into its addresses and CIDRs; nil for
// "auto". Load has checked it.
func (k *Kubernetes) NodeIPs() []string {
	if k.NodeIP == "" || k.NodeIP == NodeIPAuto {
		return nil
	}
	var out []string
	for _, f := range strings.Split(k.NodeIP, ",") {
		out = append(out, strings.TrimSpace(f))
	}
	return out
}

// nodeIP checks kubernetes.nodeIP: "auto", or one or two addresses or
// CIDRs, one of each family at most (dual stack).
func (c *checker) nodeIP(p jsonpath.ContextPath, k *Kubernetes) {
	if k.NodeIP == "" || k.NodeIP == NodeIPAuto {
		return
	}
	parts := k.NodeIPs()
	if len(parts) > 2 {
		c.add(p, "at most two entries, one IPv4 and one IPv6 (dual stack)")
		return
	}
	families := map[bool]int{}
	for _, f := range parts {
		var addr netip.Addr
		if pfx, err := netip.ParsePrefix(f); err == nil {
			addr = pfx.Addr()
		} else if a, err := netip.ParseAddr(f); err == nil {
			addr = a
		} else {
			c.add(p, "%q is neither an IP address nor a CIDR; want \"auto\", an address, or CIDRs like 10.20.0.0/16,fd00::/64", f)
			return
		}
		if addr.Zone() != "" {
			// netip takes fe80::1%eth0; kubelet's --node-ip does not.
			c.add(p, "%q: kubelet takes a node IP without a zone; give the address alone", f)
			return
		}
		if addr.IsLoopback() || addr.IsUnspecified() || addr.IsMulticast() {
			c.add(p, "%q: a node IP must be a unicast address other nodes can reach", f)
			return
		}
		families[addr.Is4()]++
	}
	if families[true] > 1 || families[false] > 1 {
		c.add(p, "two entries of one family; dual stack takes one IPv4 and one IPv6")
	}
}

// dns checks machine.dns.
func (c *checker) dns(p jsonpath.ContextPath, d *DNS) {
	if d == nil {
		return
	}
	for i, ns := range d.Nameservers {
		a, err := netip.ParseAddr(ns)
		switch {
		case err != nil:
			c.add(p.Append("nameservers", i), "must be an IP address")
		case a.IsLoopback() || a.IsUnspecified():
			c.add(p.Append("nameservers", i), "%s cannot be reached from a pod's network namespace; give the upstream servers", ns)
		case a.Zone() != "":
			c.add(p.Append("nameservers", i), "must be an address without a zone (%%%s): the zone names a host interface, which a pod's network namespace lacks", a.Zone())
		}
	}
	for i, s := range d.Search {
		if !isDNS1123Subdomain(strings.ToLower(strings.TrimSuffix(s, "."))) {
			c.add(p.Append("search", i), "must be a DNS domain")
		}
	}
	for i, o := range d.Options {
		if o == "" || strings.ContainsFunc(o, isSpaceOrControl) {
			c.add(p.Append("options", i), "one resolv.conf option per entry, like ndots:2, without spaces")
		}
	}
}

// duration checks a Go duration of at least min.
func (c *checker) duration(p jsonpath.ContextPath, v string, min time.Duration) {
	if v == "" {
		return
	}
	d, err := time.ParseDuration(v)
	switch {
	case err != nil:
		c.add(p, "must be a duration like 90s, 10m or 1h30m")
	case d < min:
		c.add(p, "must be at least %s", min)
	}
}

// containerdVersion refuses a containerd too old for every configuration
// nodespawn renders.
func (c *checker) containerdVersion(p jsonpath.ContextPath, v string) {
	if _, ok := strictSemver(v); !ok {
		return // semverProblem says so
	}
	if !versionAtLeast(v, MinContainerdVersion) {
		c.add(p, "containerd %s is too old: nodespawn renders containerd configuration versions 3 and 4, which containerd reads from %s on", v, MinContainerdVersion)
	}
}

// report checks where the first-boot report goes.
func (c *checker) report(r *Report) {
	if r == nil {
		return
	}
	p := jsonpath.New("", "report")
	c.httpURL(p.Append("url"), r.URL, "the report carries the node's outcome and a bearer token")
	if r.TokenFile != "" && !strings.HasPrefix(r.TokenFile, "/") {
		c.add(p.Append("tokenFile"), "must be an absolute path on the host")
	}
	if r.CACert != "" {
		if msg := caProblem(r.CACert); msg != "" {
			c.add(p.Append("caCert"), "%s", msg)
		}
	}
}

// ContainerdConfigVersion is the configuration version containerd v
// reads without migrating it: 4 from containerd 2.4 on, 3 before.
func ContainerdConfigVersion(v string) int {
	if versionAtLeast(v, "2.4.0") {
		return 4
	}
	return 3
}

// Duration is a manifest duration field Load has checked.
func Duration(v string) time.Duration {
	d, err := time.ParseDuration(v)
	if err != nil {
		panic(fmt.Sprintf("manifest: duration %q was not checked by Load: %v", v, err))
	}
	return d
}

// parseDuration is v as a duration, or 0 when it is empty or malformed
// (duration reports that).
func parseDuration(v string) time.Duration {
	d, err := time.ParseDuration(v)
	if err != nil {
		return 0
	}
	return d
}
