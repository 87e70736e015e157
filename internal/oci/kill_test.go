package oci

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nodespawn/nodespawn/internal/confine"
	"github.com/nodespawn/nodespawn/internal/confine/confinetest"
	"github.com/nodespawn/nodespawn/internal/rootfs/rootfstest"
)

// killChildEnv makes the test binary run killChild instead of the tests;
// its value is the child's killRequest as JSON.
const killChildEnv = "NODESPAWN_OCI_KILL_CHILD"

type killRequest struct {
	Registry, Ref, Dest, SpoolDir string
}

func TestMain(m *testing.M) {
	if v := os.Getenv(killChildEnv); v != "" {
		os.Exit(killChild(v))
	}
	os.Exit(m.Run())
}

// killChild pulls with a small memory budget and holds the first layer
// once applied, so the layers fetched ahead spill, until it is killed.
func killChild(v string) int {
	var req killRequest
	if err := json.Unmarshal([]byte(v), &req); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 2
	}
	root, err := confine.Open("/")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 2
	}
	_, err = Pull(context.Background(), Request{Reference: req.Ref, Platform: "linux/amd64", PlainHTTP: []string{req.Registry},
		Root: root, Dest: req.Dest, Concurrency: 3, SpoolMemory: 1 << 20, SpoolDir: req.SpoolDir,
		Progress: func(p Progress) {
			if p.Layer == 0 && p.Done {
				time.Sleep(time.Hour)
			}
		}})
	fmt.Fprintln(os.Stderr, "pull returned:", err)
	return 1
}

// A pull killed while layers fetched ahead sit in overflow files leaves
// nothing in the spill directory, and beside the rootfs only the staging
// directory, which the next pull removes.
func TestPullKilledLeavesNothing(t *testing.T) {
	requireRoot(t)
	const n, size = 3, 4 << 20
	reg, ref, _ := spoolImage(t, "nodespawn/kill", n, size)
	for _, c := range []struct {
		name     string
		spoolDir bool
	}{{"spool dir", true}, {"beside the rootfs", false}} {
		t.Run(c.name, func(t *testing.T) {
			parent := rootfstest.MachinesDir(t)
			dest := filepath.Join(parent, "m")
			// TMPDIR on the rootfs's filesystem: without a SpoolDir the
			// spill goes beside the rootfs.
			tmp := t.TempDir()
			spool, where := "", parent
			if c.spoolDir {
				spool = t.TempDir()
				where = spool
			}
			arg, _ := json.Marshal(killRequest{Registry: reg.Addr, Ref: ref, Dest: dest, SpoolDir: spool})
			cmd := exec.Command(os.Args[0], "-test.run=^$")
			cmd.Env = append(os.Environ(), killChildEnv+"="+string(arg), "TMPDIR="+tmp)
			var stderr bytes.Buffer
			cmd.Stdout, cmd.Stderr = &stderr, &stderr
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			pid := fmt.Sprint(cmd.Process.Pid)
			exited := make(chan struct{})
			go func() { cmd.Wait(); close(exited) }()
			spilling := false
			for start := time.Now(); !spilling && time.Since(start) < 30*time.Second; time.Sleep(5 * time.Millisecond) {
				select {
				case <-exited:
					t.Fatalf("the pull ended before it was killed:\n%s", stderr.String())
				default:
				}
				spilling = openIn(t, pid, where) > 0
			}
			cmd.Process.Kill()
			<-exited
			if !spilling {
				t.Fatalf("no overflow file seen open in %s:\n%s", where, stderr.String())
			}
			if spool != "" {
				assertEmpty(t, spool)
			}
			assertEmpty(t, tmp)
			es, err := os.ReadDir(parent)
			if err != nil {
				t.Fatal(err)
			}
			for _, e := range es {
				if !strings.HasPrefix(e.Name(), ".m.staging-") {
					t.Errorf("the kill left %s beside the rootfs", e.Name())
				}
			}

			res, err := Pull(context.Background(), Request{Reference: ref, Platform: "linux/amd64", PlainHTTP: []string{reg.Addr},
				Root: confinetest.HostRoot(t), Dest: dest, Log: testLogger(t)})
			if err != nil || res.NoOp {
				t.Fatalf("pull after the kill: NoOp=%v err=%v", res.NoOp, err)
			}
			checkSpoolRootfs(t, dest, n, size)
			rootfstest.AssertOnly(t, parent, ".m.nodespawn-image", "m")
		})
	}
}
