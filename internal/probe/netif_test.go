package probe

import (
	"log/slog"
	"net"
	"net/netip"
	"path/filepath"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
	"github.com/nodespawn/nodespawn/plan"
)

func TestParseRoute(t *testing.T) {
	// As a host with a default route on eth0, a second (higher-metric)
	// one on wlan0, an unreachable default and a link route prints it.
	const table = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT                                                       \n" +
		"eth0\t00000000\t0100140A\t0003\t0\t0\t100\t00000000\t0\t0\t0                                                                               \n" +
		"eth0\t0000140A\t00000000\t0001\t0\t0\t100\t0000FFFF\t0\t0\t0                                                                               \n" +
		"wlan0\t00000000\t0101A8C0\t0003\t0\t0\t600\t00000000\t0\t0\t0                                                                               \n" +
		"*\t00000000\t00000000\t0201\t0\t0\t0\t00000000\t0\t0\t0                                                                               \n" +
		"ib0\t0064A8C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0                                                                               \n" +
		"docker0\t00000000\t00000000\t0001\t0\t0\t0\t000000FF\t0\t0\t0\n"
	tests := []struct {
		name    string
		in      string
		want    map[string]bool
		wantErr string
	}{
		{name: "table", in: table, want: map[string]bool{"eth0": true, "wlan0": true}},
		{name: "header only", in: "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n", want: map[string]bool{}},
		{name: "absent", in: "", want: map[string]bool{}},
		{name: "short line", in: "eth0\t00000000\t0100140A\t0003\n", wantErr: "line 1 has 4 fields"},
		{name: "flags not hex", in: "eth0\t00000000\t0100140A\tzz\t0\t0\t100\t00000000\t0\t0\t0\n", wantErr: `line 1: flags "zz"`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := parseRoute([]byte(tt.in))
			checkRoutes(t, got, err, tt.want, tt.wantErr)
		})
	}
}

func TestParseIPv6Route(t *testing.T) {
	const z = "00000000000000000000000000000000"
	// As a host with a default route on eth0 prints it: the kernel also
	// lists unreachable defaults on lo (flags 00200200, RTF_REJECT).
	table := strings.Join([]string{
		"fd000000000000000000000000000000 40 " + z + " 00 " + z + " 00000100 00000001 00000000 00000001     eth0",
		"fe800000000000000000000000000000 40 " + z + " 00 " + z + " 00000100 00000002 00000000 00000001     eth0",
		z + " 00 " + z + " 00 fd000000000000000000000000000001 00000400 00000002 00000000 00000003     eth0",
		"00000000000000000000000000000001 80 " + z + " 00 " + z + " 00000000 00000002 00000000 80200001       lo",
		"ff000000000000000000000000000000 08 " + z + " 00 " + z + " 00000100 00000003 00000000 00000001     eth0",
		z + " 00 " + z + " 00 " + z + " ffffffff 00000001 00000000 00200200       lo",
		z + " 00 " + z + " 00 " + z + " ffffffff 00000001 00000000 00200200     dummy0",
		// A ::/1 route is no default.
		z + " 01 " + z + " 00 " + z + " 00000400 00000001 00000000 00000001      wg0",
	}, "\n") + "\n"
	tests := []struct {
		name    string
		in      string
		want    map[string]bool
		wantErr string
	}{
		{name: "table", in: table, want: map[string]bool{"eth0": true}},
		{name: "absent", in: "", want: map[string]bool{}},
		{name: "short line", in: z + " 00 " + z + " 00\n", wantErr: "line 1 has 4 fields"},
		{name: "flags not hex", in: z + " 00 " + z + " 00 " + z + " 00000400 00000001 00000000 0x3 eth0\n", wantErr: `line 1: flags "0x3"`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := parseIPv6Route([]byte(tt.in))
			checkRoutes(t, got, err, tt.want, tt.wantErr)
		})
	}
}

func checkRoutes(t *testing.T, got map[string]bool, err error, want map[string]bool, wantErr string) {
	t.Helper()
	if wantErr != "" {
		if err == nil || !strings.Contains(err.Error(), wantErr) {
			t.Fatalf("error = %v, want one containing %q", err, wantErr)
		}
		return
	}
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("default routes (-want +got):\n%s", diff)
	}
}

func TestNodeInterfaces(t *testing.T) {
	pfx := func(ss ...string) []netip.Prefix {
		var out []netip.Prefix
		for _, s := range ss {
			out = append(out, netip.MustParsePrefix(s))
		}
		return out
	}
	links := []link{
		{name: "lo", running: true, addrs: pfx("127.0.0.1/8", "::1/128")},
		{name: "wlan0", running: true, addrs: pfx("fe80::1/64", "192.168.1.20/24", "2001:db8::20/64")},
		{name: "eth1", running: false, addrs: pfx("10.9.0.1/24")},
		{name: "eth0", running: true, addrs: pfx("fe80::2/64", "10.0.0.4/24", "169.254.3.4/16", "fd00::5/64")},
		{name: "docker0", running: true, addrs: pfx("172.17.0.1/16")},
		{name: "ib0", running: true, addrs: pfx("fe80::3/64", "169.254.0.7/16")},
		{name: "mcast", running: true, addrs: pfx("224.0.0.1/32", "ff02::1/128")},
	}
	got := nodeInterfaces(links, map[string]bool{"eth0": true, "eth1": true}, map[string]bool{"wlan0": true})
	want := []plan.Interface{
		{Name: "docker0", Addresses: []string{"172.17.0.1/16"}},
		{Name: "eth0", Addresses: []string{"10.0.0.4/24", "fd00::5/64"}, DefaultRoute4: true},
		{Name: "wlan0", Addresses: []string{"192.168.1.20/24", "2001:db8::20/64"}, DefaultRoute6: true},
	}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("nodeInterfaces (-want +got):\n%s", diff)
	}
}

// TestFixtureLinks reads interfaces from a fixture /sys: operstate "up"
// and "unknown" (wireguard, tun) run, "down" does not.
func TestFixtureLinks(t *testing.T) {
	root := t.TempDir()
	for name, files := range map[string][2]string{
		"eth0": {"up\n", "10.0.0.4/24\n\nfe80::1/64\n"},
		"wg0":  {"unknown\n", "10.99.0.1/32\n"},
		"eth1": {"down\n", "10.1.0.4/24\n"},
		"eth2": {"up\n", ""},
	} {
		writeFile(t, filepath.Join(root, sysClassNet, name, "operstate"), files[0])
		if files[1] != "" {
			writeFile(t, filepath.Join(root, sysClassNet, name, testAddresses), files[1])
		}
	}
	writeFile(t, filepath.Join(root, procNetRoute), "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n"+
		"eth0\t00000000\t0100000A\t0003\t0\t0\t100\t00000000\t0\t0\t0\n")
	p := &prober{root: root, log: slog.New(slog.DiscardHandler)}
	got, err := p.interfaces()
	if err != nil {
		t.Fatal(err)
	}
	want := []plan.Interface{
		{Name: "eth0", Addresses: []string{"10.0.0.4/24"}, DefaultRoute4: true},
		{Name: "wg0", Addresses: []string{"10.99.0.1/32"}},
	}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("interfaces (-want +got):\n%s", diff)
	}
}

func TestFixtureLinksBadAddress(t *testing.T) {
	root := t.TempDir()
	writeFile(t, filepath.Join(root, sysClassNet, "eth0", "operstate"), "up\n")
	writeFile(t, filepath.Join(root, sysClassNet, "eth0", testAddresses), "10.0.0.4/24\n10.0.0.5\n")
	p := &prober{root: root, log: slog.New(slog.DiscardHandler)}
	_, err := p.interfaces()
	if err == nil || !strings.Contains(err.Error(), testAddresses+":2: want one address in CIDR form") {
		t.Fatalf("error = %v, want one naming line 2 of %s", err, testAddresses)
	}
}

func TestPrefixOf(t *testing.T) {
	for _, tt := range []struct {
		in   string
		want string
	}{
		{"10.0.0.4/24", "10.0.0.4/24"},
		{"fd00::5/64", "fd00::5/64"},
	} {
		// As Go's interface listing gives them: an IPv4 address in its
		// 16-byte form with a 4-byte mask.
		ip, ipn, err := net.ParseCIDR(tt.in)
		if err != nil {
			t.Fatal(err)
		}
		ipn.IP = ip
		got, ok := prefixOf(ipn)
		if !ok || got.String() != tt.want {
			t.Errorf("prefixOf(%s) = %v, %v; want %s", tt.in, got, ok, tt.want)
		}
	}
}
