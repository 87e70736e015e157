package apply_test

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"strings"
	"sync/atomic"
	"testing"

	. "github.com/nodespawn/nodespawn/apply"
	"github.com/nodespawn/nodespawn/internal/applytest"
	"github.com/nodespawn/nodespawn/internal/hostprep"
	"github.com/nodespawn/nodespawn/plan"
)

var netnsSeq atomic.Int32

// newNetns makes a network namespace holding what a live node's host has
// in its ruleset (a kube-proxy-like table) and returns its path.
func newNetns(t *testing.T) (path string, ruleset func() string) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root to create network namespaces")
	}
	if _, err := exec.LookPath("nft"); err != nil {
		t.Skip("nft not found: install the nftables package")
	}
	name := fmt.Sprintf("nodespawn-apply-%d-%d", os.Getpid(), netnsSeq.Add(1))
	nsExec := func(args ...string) string {
		t.Helper()
		out, err := exec.Command("ip", append([]string{"netns", "exec", name}, args...)...).CombinedOutput()
		if err != nil {
			t.Fatalf("ip netns exec %s %v: %v\n%s", name, args, err, out)
		}
		return string(out)
	}
	if out, err := exec.Command("ip", "netns", "add", name).CombinedOutput(); err != nil {
		t.Fatalf("ip netns add: %v\n%s", err, out)
	}
	t.Cleanup(func() { exec.Command("ip", "netns", "delete", name).Run() })
	nsExec("nft", "add", "table", "ip", "kube-proxy")
	nsExec("nft", "add", "chain", "ip", "kube-proxy", "services", "{ type nat hook prerouting priority -100; }")
	return "/run/netns/" + name, func() string { return nsExec("nft", "list", "ruleset") }
}

func flushPlan() *plan.Plan {
	return &plan.Plan{Version: plan.Version, Machine: applytest.Machine, Rootfs: applytest.Rootfs, Steps: []plan.Step{
		{ID: "host:nft-flush", Phase: plan.PhaseHost, Kind: plan.KindNftFlush},
		{ID: "host:file:/etc/x", Phase: plan.PhaseHost, Kind: plan.KindFile,
			File: &plan.File{Path: "/etc/x", Mode: 0o644, Contents: "x\n", Overwrite: true}},
	}}
}

// TestReapplyKeepsLiveNodesRules: the apply-time flush empties the ruleset
// of a host whose machine never ran, and leaves alone the ruleset of a host
// whose machine is running or has run (kube-proxy's and the CNI's rules).
func TestReapplyKeepsLiveNodesRules(t *testing.T) {
	tests := []struct {
		name      string
		running   bool // machined lists the machine
		applied   bool // an earlier run succeeded
		wantFlush bool
	}{
		{name: "first apply", wantFlush: true},
		{name: "re-apply with the machine running", running: true, applied: true},
		{name: "apply --force while the machine runs", running: true},
		{name: "re-apply after the machine ran", applied: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ns, ruleset := newNetns(t)
			root := t.TempDir()
			sd := applytest.NewSystemd()
			// The real host steps, with the flush in the test's namespace.
			deps := Deps{Host: hostprep.Host{Root: root, NetNS: ns}, Systemd: sd}
			opts := Options{Root: root, ManifestDigest: applytest.Digest, Deps: deps, Log: slog.New(slog.DiscardHandler)}
			if tt.applied {
				// An earlier run of another plan (a changed host fact, say)
				// that succeeded and started the machine.
				prev := flushPlan()
				prev.Steps = prev.Steps[1:]
				if _, err := applytest.Run(context.Background(), prev, opts); err != nil {
					t.Fatal(err)
				}
			}
			sd.Registered[applytest.Machine] = tt.running
			if _, err := applytest.Run(context.Background(), flushPlan(), opts); err != nil {
				t.Fatal(err)
			}
			rules := ruleset()
			flushed := !strings.Contains(rules, "kube-proxy")
			if flushed != tt.wantFlush {
				t.Errorf("flushed = %v, want %v; ruleset now:\n%s", flushed, tt.wantFlush, rules)
			}
		})
	}
}
