package probe

import (
	"net/netip"
	"strings"

	"github.com/nodespawn/nodespawn/plan"
)

// Resolver lists the probe reads (under Root).
const (
	etcResolvConf      = "/etc/resolv.conf"
	resolvedResolvConf = "/run/systemd/resolve/resolv.conf"
	nmNoStubResolvConf = "/run/NetworkManager/no-stub-resolv.conf"
	nmResolvConf       = "/run/NetworkManager/resolv.conf"
	dnsmasqResolvConf  = "/run/dnsmasq/resolv.conf"
)

// upstreamSources are the files that may name the host's real upstream
// servers, in the order they are tried: the lists local resolvers forward
// to (systemd-resolved's, NetworkManager's without and with its own stub,
// Debian dnsmasq's), then /etc/resolv.conf itself for a host that uses no
// local resolver.
var upstreamSources = []string{resolvedResolvConf, nmNoStubResolvConf, nmResolvConf, dnsmasqResolvConf, etcResolvConf}

// resolvFile is what a resolv.conf says, read as the C library reads it.
type resolvFile struct {
	nameservers []string
	search      []string
	options     []string
}

// parseResolvConf reads a resolv.conf: every "nameserver" address as
// written (an IPv6 zone included), the last "search" or "domain" line's
// domains (each replaces what came before, as in the C library), and the
// words of every "options" line. Lines starting with # or ; are comments;
// other keywords (sortlist, ...) are ignored.
func parseResolvConf(b []byte) resolvFile {
	var rf resolvFile
	for line := range strings.Lines(string(b)) {
		fields := strings.Fields(line)
		if len(fields) < 2 {
			continue
		}
		switch fields[0] {
		case "nameserver":
			rf.nameservers = append(rf.nameservers, fields[1])
		case "search":
			rf.search = fields[1:]
		case "domain":
			rf.search = fields[1:2]
		case "options":
			rf.options = append(rf.options, fields[1:]...)
		}
	}
	return rf
}

// reachable returns the servers a pod in its own network namespace can
// reach, in order: loopback addresses (a local stub) and unspecified ones
// (0.0.0.0 and :: mean this host to the C library) are left out, and so is
// an entry that is no IP address, which the C library ignores as well.
func reachable(servers []string) []string {
	var out []string
	for _, s := range servers {
		addr, err := netip.ParseAddr(s)
		if err != nil || addr.IsLoopback() || addr.IsUnspecified() {
			continue
		}
		out = append(out, s)
	}
	return out
}

// dns fills f's resolver fields: /etc/resolv.conf as the machine sees it
// (it shares the host's network namespace), and the upstream servers pods
// can reach.
func (p *prober) dns(f *plan.Facts) error {
	b, err := readOptional(p.at(etcResolvConf))
	if err != nil {
		return err
	}
	if b != nil {
		rf := parseResolvConf(b)
		f.ResolvConf = etcResolvConf
		f.Nameservers, f.Search, f.ResolvOptions = rf.nameservers, rf.search, rf.options
	}
	if f.Upstream, err = p.upstream(); err != nil {
		return err
	}
	// A fact, not a warning: the manifest may give machine.dns.nameservers,
	// and when it does not, render refuses the manifest and says why.
	switch {
	case f.Upstream != nil:
	case b == nil:
		p.log.Debug("no resolv.conf found; pods need machine.dns.nameservers", "paths", upstreamSources)
	default:
		p.log.Debug("resolv.conf lists only loopback resolvers (a local stub) or none, and no local resolver lists its upstream servers; pods need machine.dns.nameservers",
			"path", etcResolvConf, "nameservers", f.Nameservers, "searched", upstreamSources[:len(upstreamSources)-1])
	}
	return nil
}

// upstream returns the first list among upstreamSources that names a
// server pods can reach; nil when none does.
func (p *prober) upstream() (*plan.Resolvers, error) {
	for _, src := range upstreamSources {
		b, err := readOptional(p.at(src))
		if err != nil {
			return nil, err
		}
		if b == nil {
			continue
		}
		rf := parseResolvConf(b)
		servers := reachable(rf.nameservers)
		if len(servers) == 0 {
			p.log.Debug("resolver list skipped: it names no server outside this host", "path", src, "nameservers", rf.nameservers)
			continue
		}
		return &plan.Resolvers{Source: src, Nameservers: servers, Search: rf.search, Options: rf.options}, nil
	}
	return nil, nil
}
