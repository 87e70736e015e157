package hostprep

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
)

// testNetns creates a named network namespace with `ip netns add` and
// deletes it when the test ends. It returns its path under /run/netns.
func testNetns(t *testing.T, suffix string) string {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root to create network namespaces")
	}
	if _, err := exec.LookPath("ip"); err != nil {
		t.Skip("ip not found: install the iproute2 package")
	}
	name := fmt.Sprintf("nodespawn-test-%d-%s", os.Getpid(), suffix)
	if out, err := exec.Command("ip", "netns", "add", name).CombinedOutput(); err != nil {
		t.Fatalf("ip netns add %s: %v: %s", name, err, out)
	}
	t.Cleanup(func() {
		if out, err := exec.Command("ip", "netns", "delete", name).CombinedOutput(); err != nil {
			t.Errorf("ip netns delete %s: %v: %s", name, err, out)
		}
	})
	return filepath.Join("/run/netns", name)
}

// nftConn opens a lasting nftables connection into the namespace at path.
func nftConn(t *testing.T, path string) *nftables.Conn {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	c, err := nftables.New(nftables.WithNetNSFd(int(f.Fd())), nftables.AsLasting())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.CloseLasting() })
	return c
}

// addRules gives a namespace what a host typically has: an inet filter
// table with a base chain and a drop rule, and an ip nat table.
func addRules(t *testing.T, c *nftables.Conn) {
	t.Helper()
	filter := c.AddTable(&nftables.Table{Family: nftables.TableFamilyINet, Name: "filter"})
	policy := nftables.ChainPolicyAccept
	input := c.AddChain(&nftables.Chain{
		Name: "input", Table: filter, Type: nftables.ChainTypeFilter,
		Hooknum: nftables.ChainHookInput, Priority: nftables.ChainPriorityFilter, Policy: &policy,
	})
	c.AddRule(&nftables.Rule{Table: filter, Chain: input, Exprs: []expr.Any{
		&expr.Counter{},
		&expr.Verdict{Kind: expr.VerdictDrop},
	}})
	c.AddTable(&nftables.Table{Family: nftables.TableFamilyIPv4, Name: "nat"})
	if err := c.Flush(); err != nil {
		t.Fatalf("add test rules: %v", err)
	}
	if n := len(listTables(t, c)); n != 2 {
		t.Fatalf("after setup: %d tables, want 2", n)
	}
}

func listTables(t *testing.T, c *nftables.Conn) []*nftables.Table {
	t.Helper()
	tables, err := c.ListTables()
	if err != nil {
		t.Fatalf("list tables: %v", err)
	}
	return tables
}

func TestFlushNftablesIn(t *testing.T) {
	target := testNetns(t, "target")
	bystander := testNetns(t, "bystander")
	host, err := nftables.New()
	if err != nil {
		t.Fatal(err)
	}
	hostBefore := len(listTables(t, host))

	targetConn, bystanderConn := nftConn(t, target), nftConn(t, bystander)
	addRules(t, targetConn)
	addRules(t, bystanderConn)

	for i := 0; i < 2; i++ { // the second flush finds an empty ruleset
		if err := (Host{NetNS: target}).FlushNftables(context.Background()); err != nil {
			t.Fatalf("flush %d: %v", i+1, err)
		}
	}
	if got := listTables(t, targetConn); len(got) != 0 {
		t.Errorf("target namespace still has %d tables", len(got))
	}
	if got := listTables(t, bystanderConn); len(got) != 2 {
		t.Errorf("bystander namespace has %d tables, want its 2 untouched", len(got))
	}
	if got := len(listTables(t, host)); got != hostBefore {
		t.Errorf("host namespace tables: %d before, %d after", hostBefore, got)
	}
}

func TestFlushNftablesInMissingNamespace(t *testing.T) {
	err := (Host{NetNS: filepath.Join(t.TempDir(), "nope")}).FlushNftables(context.Background())
	if err == nil {
		t.Fatal("flush in a missing namespace succeeded")
	}
}

// TestFlushNftablesCurrent runs FlushNftables, which acts on the calling
// process's own namespace, in a child process started inside a test
// namespace with `ip netns exec`, so the host ruleset is never in reach.
func TestFlushNftablesCurrent(t *testing.T) {
	if os.Getenv("NODESPAWN_NFT_CHILD") == "1" {
		if err := (Host{}).FlushNftables(context.Background()); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		return
	}
	ns := testNetns(t, "current")
	c := nftConn(t, ns)
	addRules(t, c)
	cmd := exec.Command("ip", "netns", "exec", filepath.Base(ns), os.Args[0], "-test.run=^TestFlushNftablesCurrent$")
	cmd.Env = append(os.Environ(), "NODESPAWN_NFT_CHILD=1")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("child: %v: %s", err, out)
	}
	if got := listTables(t, c); len(got) != 0 {
		t.Errorf("namespace still has %d tables after FlushNftables in it", len(got))
	}
}
