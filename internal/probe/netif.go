package probe

import (
	"cmp"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"net/netip"
	"os"
	"path"
	"slices"
	"strconv"
	"strings"

	"github.com/nodespawn/nodespawn/plan"
)

// Network paths the probe reads (under Root). testAddresses exists only in
// fixture trees (see the package doc).
const (
	procNetRoute     = "/proc/net/route"
	procNetIPv6Route = "/proc/net/ipv6_route"
	sysClassNet      = "/sys/class/net"
	testAddresses    = "nodespawn-test-addresses"
)

// rtfReject is the kernel's RTF_REJECT route flag: an unreachable or
// prohibit route, which carries no traffic.
const rtfReject = 0x0200

// link is one network interface as the system lists it, before the probe
// picks the ones that can carry the node IP.
type link struct {
	name string
	// running is the kernel's IFF_RUNNING: administratively up, and
	// operationally up or with no operational state to report (lo, tun).
	running bool
	addrs   []netip.Prefix
}

// interfaces returns the interfaces that can carry the node IP, each with
// its default routes.
func (p *prober) interfaces() ([]plan.Interface, error) {
	var links []link
	var err error
	if p.fakeRoot() {
		links, err = p.fixtureLinks()
	} else {
		links, err = systemLinks()
	}
	if err != nil {
		return nil, err
	}
	route4, err := p.defaultRoutes(procNetRoute, parseRoute)
	if err != nil {
		return nil, err
	}
	route6, err := p.defaultRoutes(procNetIPv6Route, parseIPv6Route)
	if err != nil {
		return nil, err
	}
	return nodeInterfaces(links, route4, route6), nil
}

// nodeInterfaces keeps the running links with a global unicast address
// (loopback, link-local and multicast addresses dropped), sorted by name,
// and marks the ones default routes go out through.
func nodeInterfaces(links []link, route4, route6 map[string]bool) []plan.Interface {
	var out []plan.Interface
	for _, l := range links {
		if !l.running {
			continue
		}
		var addrs []string
		for _, a := range l.addrs {
			if a.Addr().IsGlobalUnicast() {
				addrs = append(addrs, a.String())
			}
		}
		if len(addrs) == 0 {
			continue
		}
		out = append(out, plan.Interface{Name: l.name, Addresses: addrs, DefaultRoute4: route4[l.name], DefaultRoute6: route6[l.name]})
	}
	slices.SortFunc(out, func(a, b plan.Interface) int { return cmp.Compare(a.Name, b.Name) })
	return out
}

// systemLinks lists this host's interfaces and their addresses.
func systemLinks() ([]link, error) {
	ifaces, err := net.Interfaces()
	if err != nil {
		return nil, fmt.Errorf("list network interfaces: %w", err)
	}
	links := make([]link, 0, len(ifaces))
	for _, ifi := range ifaces {
		l := link{name: ifi.Name, running: ifi.Flags&net.FlagUp != 0 && ifi.Flags&net.FlagRunning != 0}
		if l.running {
			addrs, err := ifi.Addrs()
			if err != nil {
				return nil, fmt.Errorf("list the addresses of %s: %w", ifi.Name, err)
			}
			for _, a := range addrs {
				if prefix, ok := prefixOf(a); ok {
					l.addrs = append(l.addrs, prefix)
				}
			}
		}
		links = append(links, l)
	}
	return links, nil
}

// prefixOf turns an interface address into the address with its prefix
// length (not masked: 10.0.0.4/24).
func prefixOf(a net.Addr) (netip.Prefix, bool) {
	ipn, ok := a.(*net.IPNet)
	if !ok {
		return netip.Prefix{}, false
	}
	ip, ok := netip.AddrFromSlice(ipn.IP)
	if !ok {
		return netip.Prefix{}, false
	}
	// Go gives an IPv4 address with a 4-byte mask, so the length counts
	// from the unmapped address.
	ones, _ := ipn.Mask.Size()
	return netip.PrefixFrom(ip.Unmap(), ones), true
}

// fixtureLinks reads the interfaces of a fixture tree: each directory in
// /sys/class/net is one, running when its operstate says "up" or "unknown"
// (as IFF_RUNNING is set for both), with the addresses its
// nodespawn-test-addresses file lists.
func (p *prober) fixtureLinks() ([]link, error) {
	entries, err := os.ReadDir(p.at(sysClassNet))
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("list network interfaces in %s: %w", p.at(sysClassNet), err)
	}
	var links []link
	for _, e := range entries {
		dir := path.Join(sysClassNet, e.Name())
		state, err := readOptional(p.at(path.Join(dir, "operstate")))
		if err != nil {
			return nil, err
		}
		st := strings.TrimSpace(string(state))
		l := link{name: e.Name(), running: st == "up" || st == "unknown"}
		file := p.at(path.Join(dir, testAddresses))
		b, err := readOptional(file)
		if err != nil {
			return nil, err
		}
		n := 0
		for line := range strings.Lines(string(b)) {
			n++
			line = strings.TrimSpace(line)
			if line == "" {
				continue
			}
			prefix, err := netip.ParsePrefix(line)
			if err != nil {
				return nil, fmt.Errorf("%s:%d: want one address in CIDR form a line: %w", file, n, err)
			}
			l.addrs = append(l.addrs, prefix)
		}
		links = append(links, l)
	}
	return links, nil
}

// defaultRoutes parses the routing table at host path file with parse; an
// absent table has no routes.
func (p *prober) defaultRoutes(file string, parse func([]byte) (map[string]bool, error)) (map[string]bool, error) {
	b, err := readOptional(p.at(file))
	if err != nil {
		return nil, err
	}
	routes, err := parse(b)
	if err != nil {
		return nil, fmt.Errorf("parse %s: %w", p.at(file), err)
	}
	return routes, nil
}

// parseRoute reads /proc/net/route and returns the interfaces IPv4
// default routes go out through: lines with Destination and Mask
// 00000000, leaving out reject routes and lo.
//
//	Iface	Destination	Gateway 	Flags	RefCnt	Use	Metric	Mask		MTU	Window	IRTT
//	eth0	00000000	0100140A	0003	0	0	100	00000000	0	0	0
func parseRoute(b []byte) (map[string]bool, error) {
	out := map[string]bool{}
	n := 0
	for line := range strings.Lines(string(b)) {
		n++
		fields := strings.Fields(line)
		if len(fields) == 0 || fields[0] == "Iface" {
			continue
		}
		if len(fields) < 8 {
			return nil, fmt.Errorf("line %d has %d fields, want 11: %q", n, len(fields), strings.TrimSpace(line))
		}
		flags, err := strconv.ParseUint(fields[3], 16, 32)
		if err != nil {
			return nil, fmt.Errorf("line %d: flags %q are not hexadecimal", n, fields[3])
		}
		if fields[1] == "00000000" && fields[7] == "00000000" && flags&rtfReject == 0 && fields[0] != "lo" {
			out[fields[0]] = true
		}
	}
	return out, nil
}

// ipv6Any is ::/0's destination as /proc/net/ipv6_route writes it.
var ipv6Any = strings.Repeat("0", 32)

// parseIPv6Route reads /proc/net/ipv6_route and returns the interfaces
// IPv6 default routes go out through: destination ::, prefix length 00,
// leaving out reject routes (the kernel lists unreachable defaults on lo).
//
//	dest prefix-len src src-prefix-len next-hop metric refcnt use flags device
func parseIPv6Route(b []byte) (map[string]bool, error) {
	out := map[string]bool{}
	n := 0
	for line := range strings.Lines(string(b)) {
		n++
		fields := strings.Fields(line)
		if len(fields) == 0 {
			continue
		}
		if len(fields) < 10 {
			return nil, fmt.Errorf("line %d has %d fields, want 10: %q", n, len(fields), strings.TrimSpace(line))
		}
		flags, err := strconv.ParseUint(fields[8], 16, 32)
		if err != nil {
			return nil, fmt.Errorf("line %d: flags %q are not hexadecimal", n, fields[8])
		}
		if fields[0] == ipv6Any && fields[1] == "00" && flags&rtfReject == 0 && fields[9] != "lo" {
			out[fields[9]] = true
		}
	}
	return out, nil
}
