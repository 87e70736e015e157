package oci

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/nodespawn/nodespawn/internal/confine/confinetest"
	"github.com/nodespawn/nodespawn/internal/httpx"
	"github.com/nodespawn/nodespawn/internal/registrytest"
	"github.com/nodespawn/nodespawn/internal/rootfs/rootfstest"
)

func randomBytes(seed uint64, n int) []byte {
	b := make([]byte, n)
	r := rand.New(rand.NewPCG(seed, seed))
	for i := range b {
		b[i] = byte(r.Uint32())
	}
	return b
}

// writeAll writes b in the 32 KiB pieces io.Copy hands a fetcher.
func writeAll(w io.Writer, b []byte) error {
	for len(b) > 0 {
		n := min(len(b), 32<<10)
		if _, err := w.Write(b[:n]); err != nil {
			return err
		}
		b = b[n:]
	}
	return nil
}

func testSpools(t *testing.T, ctx context.Context, budget int64, spill func() (*os.File, error)) *spools {
	t.Helper()
	set, stop := newSpools(ctx, budget, spill, "test", testLogger(t))
	t.Cleanup(func() { stop() })
	return set
}

// spillDir is a directory for a test's overflow files, and a count of
// the files made there.
func spillDir(t *testing.T) (string, func() (*os.File, error), *int) {
	dir := t.TempDir()
	var mu sync.Mutex
	made := new(int)
	return dir, func() (*os.File, error) {
		mu.Lock()
		*made++
		mu.Unlock()
		return tmpfileIn(dir)
	}, made
}

// A layer fetched ahead holds no more memory than the budget, spills the
// rest, takes memory again when the budget frees up, and reads back whole
// and in order when its turn comes.
func TestSpoolLookAheadBudget(t *testing.T) {
	_, spill, made := spillDir(t)
	const budget = 1 << 20
	set := testSpools(t, context.Background(), budget, spill)
	one, two := set.newSpool(1), set.newSpool(2)
	a := randomBytes(1, 5<<20)
	if err := writeAll(one, a); err != nil {
		t.Fatal(err)
	}
	one.finish(nil)
	b1 := randomBytes(2, 1<<20)
	if err := writeAll(two, b1); err != nil {
		t.Fatal(err)
	}
	spilled, peak := set.stats()
	if peak > budget || spilled != int64(len(a)+len(b1)-budget) || *made != 2 {
		t.Fatalf("peak %d (budget %d), spilled %d, %d overflow files; want the budget used, %d spilled to 2 files", peak, budget, spilled, *made, len(a)+len(b1)-budget)
	}

	set.setTurn(1)
	got, err := io.ReadAll(one)
	if err != nil || !bytes.Equal(got, a) {
		t.Fatalf("layer 1 read back %d bytes (%v), want its %d", len(got), err, len(a))
	}
	one.Close()
	if set.used != 0 {
		t.Fatalf("%d bytes of the budget still lent after the layer was read", set.used)
	}
	// The budget is free again: layer 2's next bytes are held in memory.
	b2 := randomBytes(3, 512<<10)
	if err := writeAll(two, b2); err != nil {
		t.Fatal(err)
	}
	two.finish(nil)
	if s, _ := set.stats(); s != spilled {
		t.Errorf("spilled %d more bytes with the budget free", s-spilled)
	}
	set.setTurn(2)
	got, err = io.ReadAll(two)
	if want := append(append([]byte(nil), b1...), b2...); err != nil || !bytes.Equal(got, want) {
		t.Fatalf("layer 2 (spilled, then in memory) read back %d bytes (%v), want %d in order", len(got), err, len(want))
	}
	two.Close()
	if _, peak := set.stats(); peak > budget || set.used != 0 {
		t.Errorf("peak %d, %d still lent; budget %d", peak, set.used, budget)
	}
}

// The layer in turn is a pipe: it never spills, even with no budget at
// all, and its fetcher waits when pipeSlack bytes wait for the applier.
func TestSpoolInTurnIsAPipe(t *testing.T) {
	set := testSpools(t, context.Background(), 0, func() (*os.File, error) {
		t.Error("the layer in turn spilled")
		return nil, errors.New("no spill")
	})
	sp := set.newSpool(0)
	data := randomBytes(4, 24<<20)
	go func() { sp.finish(writeAll(sp, data)) }()
	var got []byte
	buf := make([]byte, 4096)
	for i := 0; ; i++ {
		if i%256 == 0 {
			time.Sleep(time.Millisecond) // an applier that lags
		}
		set.mu.Lock()
		mem := sp.mem
		set.mu.Unlock()
		if mem > pipeSlack+32<<10 {
			t.Fatalf("%d bytes wait in the pipe, its slack is %d", mem, pipeSlack)
		}
		n, err := sp.Read(buf)
		got = append(got, buf[:n]...)
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
	}
	if !bytes.Equal(got, data) {
		t.Fatalf("read %d bytes, want the %d written", len(got), len(data))
	}
	if s, _ := set.stats(); s != 0 {
		t.Errorf("spilled %d bytes", s)
	}
}

// The applier sees the fetcher's error, not EOF, after the bytes that came.
func TestSpoolFetchError(t *testing.T) {
	set := testSpools(t, context.Background(), DefaultSpoolMemory, nil)
	sp := set.newSpool(1)
	sp.Write([]byte("partial"))
	boom := errors.New("digest mismatch")
	sp.finish(boom)
	set.setTurn(1)
	got, err := io.ReadAll(sp)
	if string(got) != "partial" || !errors.Is(err, boom) {
		t.Fatalf("read %q, %v; want the bytes and then the fetch's error", got, err)
	}
}

// With nowhere to spill, a layer fetched ahead waits for its turn (and is
// whole then); with the pull cancelled, it stops waiting.
func TestSpoolCannotSpill(t *testing.T) {
	noSpill := func() (*os.File, error) { return nil, errors.New("no space left on device") }
	t.Run("waits for its turn", func(t *testing.T) {
		set := testSpools(t, context.Background(), 64<<10, noSpill)
		sp := set.newSpool(1)
		data := randomBytes(5, 1<<20)
		done := make(chan error, 1)
		go func() {
			err := writeAll(sp, data)
			sp.finish(err)
			done <- err
		}()
		select {
		case err := <-done:
			t.Fatalf("the fetch ahead finished (%v) with only %d bytes of memory and no spill", err, set.budget)
		case <-time.After(100 * time.Millisecond):
		}
		set.setTurn(1)
		got, err := io.ReadAll(sp)
		if err != nil || !bytes.Equal(got, data) {
			t.Fatalf("read %d bytes (%v), want %d", len(got), err, len(data))
		}
		if err := <-done; err != nil {
			t.Fatal(err)
		}
	})
	t.Run("cancelled", func(t *testing.T) {
		ctx, cancel := context.WithCancel(context.Background())
		set := testSpools(t, ctx, 64<<10, noSpill)
		sp := set.newSpool(1)
		done := make(chan error, 1)
		go func() { done <- writeAll(sp, randomBytes(6, 1<<20)) }()
		time.Sleep(50 * time.Millisecond)
		cancel()
		select {
		case err := <-done:
			if !errors.Is(err, context.Canceled) {
				t.Fatalf("write: %v, want context.Canceled", err)
			}
		case <-time.After(10 * time.Second):
			t.Fatal("a waiting fetcher did not stop when the pull was cancelled")
		}
	})
}

// Closing a spool (the applier failed) stops its fetcher, even one that
// waits for room in the pipe.
func TestSpoolCloseStopsFetcher(t *testing.T) {
	set := testSpools(t, context.Background(), 0, nil)
	sp := set.newSpool(0)
	done := make(chan error, 1)
	go func() { done <- writeAll(sp, randomBytes(7, 3*pipeSlack)) }()
	time.Sleep(50 * time.Millisecond)
	sp.Close()
	select {
	case err := <-done:
		if !errors.Is(err, errSpoolClosed) {
			t.Fatalf("write: %v, want errSpoolClosed", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the fetcher of a closed spool still waits")
	}
}

func digestOf(l layer) digest.Digest { return digest.FromBytes(l.blob) }

// openIn counts the regular files right in dir that process pid ("self"
// for this one) holds open: overflow files, which read "dir/#inode
// (deleted)" when made with O_TMPFILE and "dir/name (deleted)" once
// unlinked.
func openIn(t testing.TB, pid, dir string) int {
	fds, err := os.ReadDir("/proc/" + pid + "/fd")
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, fd := range fds {
		p := "/proc/" + pid + "/fd/" + fd.Name()
		target, err := os.Readlink(p)
		if err != nil || filepath.Dir(strings.TrimSuffix(target, " (deleted)")) != dir {
			continue
		}
		if fi, err := os.Stat(p); err == nil && fi.Mode().IsRegular() {
			n++
		}
	}
	return n
}

func assertEmpty(t testing.TB, dir string) {
	t.Helper()
	es, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	if len(es) != 0 {
		t.Errorf("%s holds %d entries, want none", dir, len(es))
	}
}

// spoolImage pushes an image of n layers of size incompressible bytes
// each (files l0, l1, ...) and returns its reference and layers.
func spoolImage(t *testing.T, name string, n, size int) (*registrytest.Registry, string, []layer) {
	t.Helper()
	reg := registrytest.Start(t)
	repo := pushRepo(t, reg.Addr, name)
	var layers []layer
	for i := range n {
		layers = append(layers, randomLayer(t, uint64(10+i), fmt.Sprintf("l%d", i), size))
	}
	pushImage(t, context.Background(), repo, "v1", imageSpec{platform: linuxAMD64, layers: layers})
	return reg, reg.Addr + "/" + name + ":v1", layers
}

func checkSpoolRootfs(t *testing.T, dest string, n, size int) {
	t.Helper()
	for i := range n {
		b, err := os.ReadFile(filepath.Join(dest, fmt.Sprintf("l%d", i)))
		if err != nil || !bytes.Equal(b, randomBytes(uint64(10+i), size)) {
			t.Errorf("l%d: %d bytes (%v), want the layer's %d", i, len(b), err, size)
		}
	}
}

// One layer at a time, nothing is fetched ahead: not a byte goes to the
// overflow directory, even with no memory budget at all.
func TestPullInTurnNeverSpills(t *testing.T) {
	requireRoot(t)
	const n, size = 3, 2 << 20
	reg, ref, _ := spoolImage(t, "nodespawn/pipe", n, size)
	spool := t.TempDir()
	parent := rootfstest.MachinesDir(t)
	dest := filepath.Join(parent, "m")
	seen := 0
	res, err := Pull(context.Background(), Request{Reference: ref, Platform: "linux/amd64", PlainHTTP: []string{reg.Addr},
		Root: confinetest.HostRoot(t), Dest: dest, Log: testLogger(t), Concurrency: 1, SpoolMemory: -1, SpoolDir: spool,
		Progress: func(Progress) { seen += openIn(t, "self", spool) + openIn(t, "self", parent) },
	})
	if err != nil {
		t.Fatalf("Pull: %v", err)
	}
	if res.Spilled != 0 || seen != 0 {
		t.Errorf("spilled %d bytes, %d overflow files seen open; the layer in turn must stream through memory", res.Spilled, seen)
	}
	checkSpoolRootfs(t, dest, n, size)
	assertEmpty(t, spool)
	rootfstest.AssertOnly(t, parent, ".m.nodespawn-image", "m")
}

// Layers fetched ahead of a slow one overflow a small budget to the
// overflow directory; the rootfs is still right and nothing is left open
// or behind.
func TestPullLookAheadSpills(t *testing.T) {
	requireRoot(t)
	const n, size = 3, 4 << 20
	reg, ref, _ := spoolImage(t, "nodespawn/ahead", n, size)
	for _, c := range []struct{ name, dir string }{{"spool dir", "set"}, {"beside the rootfs", ""}} {
		t.Run(c.name, func(t *testing.T) {
			parent := rootfstest.MachinesDir(t)
			spool, where := c.dir, parent
			if spool != "" {
				spool = t.TempDir()
				where = spool
			} else {
				// A temporary directory on the rootfs's filesystem: the
				// spill goes beside the rootfs.
				t.Setenv("TMPDIR", t.TempDir())
			}
			dest := filepath.Join(parent, "m")
			held := false
			res, err := Pull(context.Background(), Request{Reference: ref, Platform: "linux/amd64", PlainHTTP: []string{reg.Addr},
				Root: confinetest.HostRoot(t), Dest: dest, Log: testLogger(t), Concurrency: 3, SpoolMemory: 1 << 20, SpoolDir: spool,
				Progress: func(p Progress) {
					// Hold the first layer until the next ones spill.
					if p.Layer != 0 || !p.Done {
						return
					}
					for start := time.Now(); time.Since(start) < 20*time.Second; time.Sleep(5 * time.Millisecond) {
						if openIn(t, "self", where) > 0 {
							held = true
							return
						}
					}
				},
			})
			if err != nil {
				t.Fatalf("Pull: %v", err)
			}
			if !held || res.Spilled == 0 {
				t.Errorf("overflow file seen open: %v; spilled %d bytes; want layers ahead of the first to spill", held, res.Spilled)
			}
			checkSpoolRootfs(t, dest, n, size)
			if k := openIn(t, "self", where); k != 0 {
				t.Errorf("%d overflow files still open after the pull", k)
			}
			if spool != "" {
				assertEmpty(t, spool)
			}
			rootfstest.AssertOnly(t, parent, ".m.nodespawn-image", "m")
		})
	}
}

// A layer whose fetch fails while it waits ahead of its turn fails the
// pull as that layer's error, once the layers before it are applied.
func TestPullLookAheadFetchError(t *testing.T) {
	requireRoot(t)
	const n, size = 3, 1 << 20
	reg, _, layers := spoolImage(t, "nodespawn/aheadfail", n, size)
	px := startProxy(t, reg.Addr)
	bad := "/v2/nodespawn/aheadfail/blobs/" + digestOf(layers[2]).String()
	failed := make(chan struct{})
	var once sync.Once
	px.setFault(func(w http.ResponseWriter, r *http.Request, _ int) bool {
		if r.URL.Path != bad {
			return false
		}
		http.Error(w, "boom", http.StatusInternalServerError)
		once.Do(func() { close(failed) })
		return true
	})
	parent := rootfstest.MachinesDir(t)
	var done []int
	_, err := Pull(context.Background(), Request{Reference: px.addr + "/nodespawn/aheadfail:v1", Platform: "linux/amd64",
		PlainHTTP: []string{px.addr}, Root: confinetest.HostRoot(t), Dest: filepath.Join(parent, "m"), Log: testLogger(t),
		HTTPClient: httpx.NewClient(httpx.WithPolicy(httpx.Policy{Attempts: 1})), Concurrency: 3,
		Progress: func(p Progress) {
			if !p.Done {
				return
			}
			done = append(done, p.Layer)
			if p.Layer == 0 {
				select {
				case <-failed:
				case <-time.After(20 * time.Second):
					t.Error("the third layer was not fetched while the first was applied")
				}
			}
		},
	})
	if err == nil || !strings.Contains(err.Error(), "layer 3/3 "+digestOf(layers[2]).String()) || !strings.Contains(err.Error(), "500") {
		t.Fatalf("err = %v, want the third layer's fetch error", err)
	}
	if fmt.Sprint(done) != "[0 1]" {
		t.Errorf("layers %v applied before the error, want [0 1]", done)
	}
	rootfstest.AssertOnly(t, parent)
}

// The spill goes to SpoolDir when set; else to the temporary directory
// when that is on another filesystem than the staging tree; else beside
// the rootfs.
func TestSpillTarget(t *testing.T) {
	root := confinetest.HostRoot(t)
	parent := rootfstest.MachinesDir(t)
	stage := filepath.Join(parent, ".m.staging-1")
	if err := os.Mkdir(stage, 0o755); err != nil {
		t.Fatal(err)
	}
	try := func(dir string) string {
		t.Helper()
		spill, where := spillTarget(root, stage, parent, filepath.Join(parent, "m"), dir)
		f, err := spill()
		if err != nil {
			t.Fatalf("spill to %s: %v", where, err)
		}
		f.Close()
		return where
	}
	own := t.TempDir()
	if got := try(own); got != own {
		t.Errorf("with SpoolDir %s: spills to %s", own, got)
	}
	t.Setenv("TMPDIR", t.TempDir()) // the same filesystem as parent
	if got := try(""); got != parent {
		t.Errorf("with TMPDIR on the rootfs's filesystem: spills to %s, want %s", got, parent)
	}
	rootfstest.AssertOnly(t, parent, ".m.staging-1")

	other, err := os.MkdirTemp("/dev/shm", "nodespawn-spill-")
	if err != nil {
		t.Skipf("no /dev/shm for a temporary directory on another filesystem: %v", err)
	}
	defer os.RemoveAll(other)
	if a, b := stat(t, other), stat(t, parent); a.Dev == b.Dev {
		t.Skip("/dev/shm is on the test's filesystem")
	}
	t.Setenv("TMPDIR", other)
	if got := try(""); got != other {
		t.Errorf("with TMPDIR on another filesystem: spills to %s, want %s", got, other)
	}
	assertEmpty(t, other)
}
