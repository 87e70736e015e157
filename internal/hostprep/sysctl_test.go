package hostprep

import (
	"context"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/nodespawn/nodespawn/plan"
	"golang.org/x/sys/unix"
)

func TestSysctlPath(t *testing.T) {
	tests := []struct {
		key, want, wantErr string
	}{
		{key: "net.ipv4.ip_forward", want: "net/ipv4/ip_forward"},
		{key: "net/ipv4/ip_forward", want: "net/ipv4/ip_forward"},
		{key: "net.ipv4.conf.eth0/100.rp_filter", want: "net/ipv4/conf/eth0.100/rp_filter"},
		{key: "net/ipv4/conf/eth0.100/rp_filter", want: "net/ipv4/conf/eth0.100/rp_filter"},
		{key: "kernel", want: "kernel"},
		{key: "net..ipv4", wantErr: "not a plain key"},
		{key: "../../etc/passwd", wantErr: "not a plain key"},
		{key: "net.ipv4.conf.*.rp_filter", wantErr: "not a plain key"},
		{key: "", wantErr: "not a plain key"},
	}
	for _, tt := range tests {
		got, err := sysctlPath(tt.key)
		if tt.wantErr != "" {
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
				t.Errorf("sysctlPath(%q) = %q, %v; want error %q", tt.key, got, err, tt.wantErr)
			}
			continue
		}
		if err != nil || got != tt.want {
			t.Errorf("sysctlPath(%q) = %q, %v; want %q", tt.key, got, err, tt.want)
		}
	}
}

// fakeProcSys makes root/proc/sys with the given files and sets their
// modification time into the past, so a test can tell written from untouched.
func fakeProcSys(t *testing.T, files map[string]string) string {
	t.Helper()
	root := t.TempDir()
	for rel, v := range files {
		p := filepath.Join(root, "proc/sys", rel)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(v), 0o644); err != nil {
			t.Fatal(err)
		}
		if err := os.Chtimes(p, time.Unix(1e9, 0), time.Unix(1e9, 0)); err != nil {
			t.Fatal(err)
		}
	}
	return root
}

func TestApplySysctls(t *testing.T) {
	base := map[string]string{
		"net/ipv4/ip_forward":              "0\n",
		"net/ipv4/ip_local_port_range":     "32768\t60999\n",
		"net/ipv4/conf/eth0.100/rp_filter": "2\n",
		"vm/overcommit_memory":             "0\n",
		"kernel/panic":                     "10\n",
	}
	tests := []struct {
		name        string
		values      []plan.KeyValue
		wantWritten map[string]string // rel path -> new contents
		wantErr     []string
	}{
		{
			name: "changes only what differs",
			values: []plan.KeyValue{
				{Key: "net.ipv4.ip_forward", Value: "1"},
				{Key: "kernel.panic", Value: "10"},
				{Key: "net.ipv4.ip_local_port_range", Value: "32768 60999"},
				{Key: "net.ipv4.conf.eth0/100.rp_filter", Value: "0"},
				{Key: "vm/overcommit_memory", Value: "1"},
			},
			wantWritten: map[string]string{
				"net/ipv4/ip_forward":              "1\n",
				"net/ipv4/conf/eth0.100/rp_filter": "0\n",
				"vm/overcommit_memory":             "1\n",
			},
		},
		{
			name: "all missing keys reported, nothing written",
			values: []plan.KeyValue{
				{Key: "net.ipv4.ip_forward", Value: "1"},
				{Key: "net.bridge.bridge-nf-call-iptables", Value: "1"},
				{Key: "kernel.nodespawn_nope", Value: "1"},
			},
			wantErr: []string{"net.bridge.bridge-nf-call-iptables, kernel.nodespawn_nope", "br_netfilter"},
		},
		{
			name:    "bad key",
			values:  []plan.KeyValue{{Key: "net.ipv4.conf.*.rp_filter", Value: "0"}},
			wantErr: []string{`"net.ipv4.conf.*.rp_filter"`},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			root := fakeProcSys(t, base)
			err := (Host{Root: root}).ApplySysctls(context.Background(), tt.values)
			if (err != nil) != (len(tt.wantErr) > 0) {
				t.Fatalf("err = %v, want %q", err, tt.wantErr)
			}
			for _, s := range tt.wantErr {
				if !strings.Contains(err.Error(), s) {
					t.Errorf("error %q does not contain %q", err, s)
				}
			}
			for rel, orig := range base {
				p := filepath.Join(root, "proc/sys", rel)
				got, err := os.ReadFile(p)
				if err != nil {
					t.Fatal(err)
				}
				fi, _ := os.Stat(p)
				untouched := fi.ModTime().Equal(time.Unix(1e9, 0))
				if want, ok := tt.wantWritten[rel]; ok {
					if string(got) != want || untouched {
						t.Errorf("%s = %q (untouched %v), want written %q", rel, got, untouched, want)
					}
				} else if string(got) != orig || !untouched {
					t.Errorf("%s = %q (untouched %v), want untouched %q", rel, got, untouched, orig)
				}
			}
		})
	}
}

// TestApplySysctlsRealProc writes real /proc/sys values in a private network
// namespace, where net.* sysctls belong to that namespace alone.
func TestApplySysctlsRealProc(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to create a network namespace")
	}
	errc := make(chan error, 1)
	var before, after string
	go func() {
		// The thread is never unlocked, so it exits with the goroutine and
		// its namespace never leaks to other goroutines.
		runtime.LockOSThread()
		if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
			errc <- err
			return
		}
		// /proc/sys/net shows the calling thread's network namespace.
		b, _ := os.ReadFile("/proc/sys/net/ipv4/ip_forward")
		before = string(b)
		want := "1"
		if strings.TrimSpace(before) == "1" {
			want = "0"
		}
		err := (Host{}).ApplySysctls(context.Background(), []plan.KeyValue{{Key: "net.ipv4.ip_forward", Value: want}, {Key: "net.ipv4.conf.lo.rp_filter", Value: "0"}})
		a, _ := os.ReadFile("/proc/sys/net/ipv4/ip_forward")
		after = string(a)
		if err == nil && strings.TrimSpace(after) != want {
			t.Errorf("ip_forward = %q after setting %q", after, want)
		}
		errc <- err
	}()
	if err := <-errc; err != nil {
		t.Fatal(err)
	}
	if before == after {
		t.Errorf("ip_forward unchanged: %q", before)
	}
}
