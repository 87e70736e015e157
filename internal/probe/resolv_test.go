package probe

import (
	"bytes"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
	"github.com/nodespawn/nodespawn/plan"
)

func TestParseResolvConf(t *testing.T) {
	tests := []struct {
		name string
		in   string
		want resolvFile
	}{
		{"empty", "", resolvFile{}},
		{
			name: "systemd-resolved stub",
			in: "# This is /run/systemd/resolve/stub-resolv.conf.\n" +
				"nameserver 127.0.0.53\noptions edns0 trust-ad\nsearch corp.example.com lab.example.com\n",
			want: resolvFile{
				nameservers: []string{"127.0.0.53"},
				search:      []string{"corp.example.com", "lab.example.com"},
				options:     []string{"edns0", "trust-ad"},
			},
		},
		{
			name: "comments in both styles are skipped",
			in:   "#nameserver 10.9.9.9\n; nameserver 10.8.8.8\n   # search old.example\nnameserver 10.0.0.2\n",
			want: resolvFile{nameservers: []string{"10.0.0.2"}},
		},
		{
			name: "options lines add up, tabs separate",
			in:   "options\tndots:2\noptions timeout:1 attempts:3\nnameserver\t10.0.0.2",
			want: resolvFile{nameservers: []string{"10.0.0.2"}, options: []string{"ndots:2", "timeout:1", "attempts:3"}},
		},
		{
			name: "the last search or domain line wins",
			in:   "search a.example b.example\ndomain c.example\n",
			want: resolvFile{search: []string{"c.example"}},
		},
		{
			name: "search after domain",
			in:   "domain c.example\nsearch a.example b.example\n",
			want: resolvFile{search: []string{"a.example", "b.example"}},
		},
		{
			name: "zones and order kept, keywords without a value ignored",
			in:   "nameserver fe80::1%eth0\nnameserver\nnameserver 2001:db8::53\nsortlist 10.0.0.0/8\nnameserver 192.0.2.1\n",
			want: resolvFile{nameservers: []string{"fe80::1%eth0", "2001:db8::53", "192.0.2.1"}},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := parseResolvConf([]byte(tt.in))
			if diff := cmp.Diff(tt.want, got, cmp.AllowUnexported(resolvFile{})); diff != "" {
				t.Errorf("parseResolvConf (-want +got):\n%s", diff)
			}
		})
	}
}

func TestReachable(t *testing.T) {
	got := reachable([]string{
		"127.0.0.53", "10.0.0.2", "127.0.0.1", "::1", "::ffff:127.0.0.1", "0.0.0.0", "::",
		"fe80::1%eth0", "not-an-address", "2001:db8::53", "127.0.1.1",
	})
	want := []string{"10.0.0.2", "fe80::1%eth0", "2001:db8::53"}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("reachable (-want +got):\n%s", diff)
	}
}

// TestUpstreamOrder writes resolver lists into a root and checks which one
// is the upstream, what /etc/resolv.conf reports, and what is logged.
func TestUpstreamOrder(t *testing.T) {
	const (
		stub       = "nameserver 127.0.0.53\noptions edns0 trust-ad\nsearch stub.example\n"
		dnsmasqLo  = "nameserver 127.0.0.1\n"
		resolved   = "nameserver 10.0.0.2\nnameserver 10.0.0.3\nsearch corp.example\n"
		nmNoStub   = "nameserver 192.0.2.53\noptions rotate\n"
		nmStub     = "nameserver 127.0.0.53\n"
		nmStubUp   = "nameserver 198.51.100.53\n"
		dnsmasqUp  = "nameserver 203.0.113.1\nnameserver 127.0.0.1\n"
		mixedEtc   = "nameserver 127.0.0.53\nnameserver 10.1.1.1\n"
		emptyLists = "# no servers known yet\n"
	)
	tests := []struct {
		name     string
		files    map[string]string
		want     *plan.Resolvers
		wantNote string // a debug line containing this (never a warning: render decides)
		wantSkip string // a debug line naming this path as skipped
	}{
		{
			name:  "systemd-resolved first",
			files: map[string]string{etcResolvConf: stub, resolvedResolvConf: resolved, nmNoStubResolvConf: nmNoStub, dnsmasqResolvConf: dnsmasqUp},
			want:  &plan.Resolvers{Source: resolvedResolvConf, Nameservers: []string{"10.0.0.2", "10.0.0.3"}, Search: []string{"corp.example"}},
		},
		{
			name:     "resolved without servers yet is skipped for NetworkManager's no-stub list",
			files:    map[string]string{etcResolvConf: stub, resolvedResolvConf: emptyLists, nmNoStubResolvConf: nmNoStub, nmResolvConf: nmStub},
			want:     &plan.Resolvers{Source: nmNoStubResolvConf, Nameservers: []string{"192.0.2.53"}, Options: []string{"rotate"}},
			wantSkip: resolvedResolvConf,
		},
		{
			name:     "NetworkManager's stub list is skipped for dnsmasq's",
			files:    map[string]string{etcResolvConf: dnsmasqLo, nmResolvConf: nmStub, dnsmasqResolvConf: dnsmasqUp},
			want:     &plan.Resolvers{Source: dnsmasqResolvConf, Nameservers: []string{"203.0.113.1"}},
			wantSkip: nmResolvConf,
		},
		{
			name:  "NetworkManager without a stub",
			files: map[string]string{etcResolvConf: nmStubUp, nmResolvConf: nmStubUp},
			want:  &plan.Resolvers{Source: nmResolvConf, Nameservers: []string{"198.51.100.53"}},
		},
		{
			name:  "no local resolver: /etc/resolv.conf less its loopback servers",
			files: map[string]string{etcResolvConf: mixedEtc},
			want:  &plan.Resolvers{Source: etcResolvConf, Nameservers: []string{"10.1.1.1"}},
		},
		{
			name:     "stub only",
			files:    map[string]string{etcResolvConf: stub, dnsmasqResolvConf: dnsmasqLo},
			wantNote: "resolv.conf lists only loopback resolvers",
			wantSkip: dnsmasqResolvConf,
		},
		{
			name:     "no resolv.conf at all",
			files:    map[string]string{},
			wantNote: "no resolv.conf found",
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			root := t.TempDir()
			for name, content := range tt.files {
				writeFile(t, filepath.Join(root, name), content)
			}
			var logs bytes.Buffer
			p := &prober{root: root, log: captureLog(&logs, slog.LevelDebug)}
			var f plan.Facts
			if err := p.dns(&f); err != nil {
				t.Fatal(err)
			}
			if diff := cmp.Diff(tt.want, f.Upstream); diff != "" {
				t.Errorf("Upstream (-want +got):\n%s", diff)
			}
			if etc, ok := tt.files[etcResolvConf]; ok {
				rf := parseResolvConf([]byte(etc))
				want := plan.Facts{ResolvConf: etcResolvConf, Nameservers: rf.nameservers, Search: rf.search, ResolvOptions: rf.options, Upstream: f.Upstream}
				if diff := cmp.Diff(want, f); diff != "" {
					t.Errorf("/etc/resolv.conf facts (-want +got):\n%s", diff)
				}
			} else if f.ResolvConf != "" || f.Nameservers != nil {
				t.Errorf("no /etc/resolv.conf, yet ResolvConf = %q, Nameservers = %q", f.ResolvConf, f.Nameservers)
			}
			if strings.Contains(logs.String(), "level=WARN") {
				t.Errorf("a warning, though the manifest may give machine.dns.nameservers:\n%s", logs.String())
			}
			if tt.wantNote != "" && !strings.Contains(logs.String(), tt.wantNote) {
				t.Errorf("no debug line containing %q:\n%s", tt.wantNote, logs.String())
			}
			if tt.wantSkip != "" && !strings.Contains(logs.String(), "resolver list skipped: it names no server outside this host\" path="+tt.wantSkip) {
				t.Errorf("no debug line says %s was skipped:\n%s", tt.wantSkip, logs.String())
			}
		})
	}
}

// writeFile writes content to path, making its directory.
func writeFile(t *testing.T, path, content string) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
}
