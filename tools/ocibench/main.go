// Command bench measures the ways of turning a registry image into a
// machine's root filesystem, against Debian's docker-registry on loopback,
// each way in a child process of its own:
//
//	floor          curl | tar -xz per layer (as many at once as the pulls
//	               fetch), then syncfs: decompress every layer, write the
//	               tree once, sync, and verify nothing (the disk floor)
//	twopass        oras.Copy into an OCI layout on disk, syncfs (a durable
//	               download, as a content store keeps one), then oci.Pull
//	               from the layout into a flattened tree, syncfs; the layout
//	               is removed at the end
//	stream         oci.Pull: layers fetched concurrently, verified and
//	               applied in order into one flattened tree as they stream,
//	               syncfs
//	store          an empty layer store: oci.PullLayers (each layer fetched,
//	               verified and unpacked on its own, in parallel) and
//	               layers.Store.Compose (overlayfs mounted at the target),
//	               syncfs, unmount
//	store-b        the same for image B: a full pull of B, the yardstick of
//	               the upgrade
//	store-upgrade  the store holds image A's layers and A is mounted at the
//	               target (an unmeasured child sets that up first); the
//	               measured child does PullLayers and Compose of image B,
//	               which differs from A in one layer only, syncfs, unmount
//
// Every way ends with a syncfs of the filesystem it wrote (the pulls sync
// on their own too; the extra syncfs then finds nothing left to write).
//
// The image is, by default, a real distribution tree: the Debian machine
// tree of the e2e cache (images/build-rootfs.sh, under
// $E2E_CACHE or /var/cache/nodespawn-e2e/machine-rootfs) with the e2e's
// node components (kubelet, containerd, ... under /usr/local/bin, the CNI
// plugins under /opt/cni/bin) added, as a node image carries them; -add
// none leaves them out, -rootfs DIR packs another tree instead, -rootfs
// synthetic generates -layers layers of -layer-mb MB of random words (also
// the fallback, with a note, when the cache has no tree). The trees are
// only read. They are packed into -layers layers (default 6) in walk
// order, the first holding -first-pct percent of the bytes (default 40),
// the last -last-pct (default 3: the small top layer an upgrade changes),
// the others the rest in equal parts: several layers of a size, as a real
// image has, so that the parallel unpack is measured, not one big layer. Image B is image A with its last layer
// repacked with one more file, /etc/nodespawn-bench-image.
//
// Per way it prints wall time, the ratio to the floor, CPU time, peak RSS
// and the bytes the way wrote, each the child's alone: CPU and peak RSS
// from its rusage, bytes from its /proc/self/io at exit (which counts the
// children it reaped, curl and tar included). write_bytes is what the
// process dirtied in the page cache of disk-backed filesystems; cancelled
// is what was dropped again before writeback (a deleted file's dirty
// pages), so written - cancelled is what went to the disk; spilled is what
// the flattening pull's layers fetched ahead put in a temporary file (on
// tmpfs it is not in written). -spool-mem sets that pull's memory budget
// for those layers. The ways run -runs times, interleaved (each run in
// another order); the table shows each way's fastest run, and the median
// wall time beside it. Then it checks the goals: the layer store's first
// pull within 0.9x the two-pass way (which syncs too) and 1.1x the floor,
// a one-layer upgrade at least 10x faster than a full pull of the same
// image (store-b), and peak RSS under 100 MiB.
// Run it with `make bench`, as root (the unpack sets owners, Compose
// mounts).
package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"math/rand/v2"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"runtime/pprof"
	"slices"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/opencontainers/go-digest"
	"github.com/opencontainers/image-spec/specs-go"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"golang.org/x/sync/errgroup"
	"oras.land/oras-go/v2"
	"oras.land/oras-go/v2/content/oci"
	"oras.land/oras-go/v2/registry/remote"

	"github.com/nodespawn/nodespawn/internal/confine"
	"github.com/nodespawn/nodespawn/internal/imagebuild"
	"github.com/nodespawn/nodespawn/internal/layers"
	nsoci "github.com/nodespawn/nodespawn/internal/oci"
	"github.com/nodespawn/nodespawn/internal/registrytest"
)

// allWays are the measured ways, in the order the table shows them.
var allWays = []string{"floor", "twopass", "stream", "store", "store-b", "store-upgrade"}

// markerFile is the file image B adds to image A's last layer.
const markerFile = "etc/nodespawn-bench-image"

// Tags of the two images.
const (
	tagA = "a"
	tagB = "b"
)

// spoolMemory is Request.SpoolMemory for the flattening pulls.
var spoolMemory int64

// firstPct and lastPct are the shares of the first and the last layer of
// a packed tree.
var firstPct, lastPct int

// counts are what the child's pull reports besides /proc/self/io.
var counts struct {
	spilled, fetched int64
	fetchedLayers    int
}

func main() {
	mode := flag.String("mode", "", "internal: run one step in this process (push, seed, or a way)")
	ref := flag.String("ref", "", "internal: image reference")
	dest := flag.String("dest", "", "internal: the way's directory (push: scratch directory)")
	nLayers := flag.Int("layers", 6, "number of layers")
	flag.IntVar(&firstPct, "first-pct", 40, "packed trees: percent of the bytes in the first layer")
	flag.IntVar(&lastPct, "last-pct", 3, "packed trees: percent of the bytes in the last layer, the one image B changes (the middle layers share the rest)")
	layerMB := flag.Int("layer-mb", 80, "synthetic layers: uncompressed MB per layer")
	runs := flag.Int("runs", 3, "runs of each way, interleaved (the table shows the fastest and the median)")
	workDir := flag.String("dir", "", "scratch directory (default: a temp dir under /var/tmp)")
	rootfsDir := flag.String("rootfs", "", "tree to pack (read only): default the e2e cache's Debian machine tree; \"synthetic\": generated layers")
	add := flag.String("add", "auto", "more trees (read only) for the image, DIR=PATH,...: auto: the e2e cache's node components with the default tree; none")
	waysFlag := flag.String("ways", strings.Join(allWays, ","), "ways to measure, comma-separated")
	flag.Int64Var(&spoolMemory, "spool-mem", 0, "memory budget in bytes of the layers the flattening pulls fetch ahead (0: the default; negative: none)")
	flag.Parse()

	// Ctrl-C stops the runs and still unmounts, stops the registry and
	// removes the scratch directory (the deferred cleanups run).
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if *mode != "" {
		err := child(ctx, *mode, *ref, *dest, *nLayers, *layerMB, *rootfsDir, *add)
		if err == nil && *mode != "push" && *mode != "seed" {
			err = reportIO()
		}
		if err != nil {
			fmt.Fprintf(os.Stderr, "bench %s: %v\n", *mode, err)
			os.Exit(1)
		}
		return
	}
	ways := strings.Split(*waysFlag, ",")
	for _, w := range ways {
		if !slices.Contains(allWays, w) {
			fmt.Fprintf(os.Stderr, "bench: -ways: unknown way %q (ways: %s)\n", w, strings.Join(allWays, ", "))
			os.Exit(2)
		}
	}
	if err := parent(ctx, *workDir, *nLayers, *layerMB, *runs, *rootfsDir, *add, ways); err != nil {
		fmt.Fprintf(os.Stderr, "bench: %v\n", err)
		os.Exit(1)
	}
}

// e2eCache is the e2e's cache directory (as e2e/prepare.sh finds it).
func e2eCache() string {
	if c := os.Getenv("E2E_CACHE"); c != "" {
		return c
	}
	if x := os.Getenv("XDG_CACHE_HOME"); x != "" {
		return filepath.Join(x, "nodespawn-e2e")
	}
	return "/var/cache/nodespawn-e2e"
}

// newestDone is the newest directory matching glob that holds a .done
// file (a finished cache entry), "" when there is none.
func newestDone(glob string) string {
	ms, _ := filepath.Glob(glob)
	best, bestT := "", time.Time{}
	for _, m := range ms {
		if fi, err := os.Stat(filepath.Join(m, ".done")); err == nil && fi.ModTime().After(bestT) {
			best, bestT = m, fi.ModTime()
		}
	}
	return best
}

// pickSources resolves -rootfs and -add: the tree to pack ("" for
// synthetic layers), the -add list to pass on, a line that says what the
// image is, and a note when the default tree was not found.
func pickSources(rootfsFlag, addFlag string) (rootfs, add, what, note string) {
	switch addFlag {
	case "none":
		addFlag = ""
	case "auto":
		addFlag = ""
		if rootfsFlag == "" {
			if c := newestDone(filepath.Join(e2eCache(), "components", "*")); c != "" {
				var parts []string
				for _, a := range [][2]string{{"bin", "usr/local/bin"}, {"cni", "opt/cni/bin"}} {
					if fi, err := os.Stat(filepath.Join(c, a[0])); err == nil && fi.IsDir() {
						parts = append(parts, filepath.Join(c, a[0])+"="+a[1])
					}
				}
				addFlag = strings.Join(parts, ",")
			}
		}
	}
	switch rootfsFlag {
	case "synthetic":
		return "", "", "synthetic layers of random words", ""
	case "":
		m := newestDone(filepath.Join(e2eCache(), "machine-rootfs", "*"))
		if m == "" {
			return "", "", "synthetic layers of random words",
				fmt.Sprintf("NOTE: no Debian machine tree in the e2e cache (%s/machine-rootfs/*/rootfs; run e2e/prepare.sh or pass -rootfs DIR): the image is SYNTHETIC, not a real distribution", e2eCache())
		}
		rootfs = filepath.Join(m, "rootfs")
		what = "the e2e's Debian machine tree " + rootfs
	default:
		rootfs = rootfsFlag
		what = "the tree " + rootfs
	}
	if addFlag != "" {
		what += ", with " + strings.ReplaceAll(strings.ReplaceAll(addFlag, "=", " at /"), ",", ", ")
	}
	return rootfs, addFlag, what + " (read only)", ""
}

// pushInfo is what the push child reports.
type pushInfo struct {
	Compressed, Plain int64
	Layers            []layerInfo // image A's
	Changed           int         // the layer B replaces
	B                 layerInfo   // B's version of it
}

type layerInfo struct{ Size, Plain int64 }

// sample is one run of one way.
type sample struct {
	wall, cpu time.Duration
	maxRSS    int64 // KiB
	io        ioCounts
	// others is the CPU time the rest of the machine used meanwhile (other
	// processes, and the kernel's writeback of what the way wrote).
	others time.Duration
}

func parent(ctx context.Context, workDir string, nLayers, layerMB, runs int, rootfsFlag, addFlag string, ways []string) error {
	if os.Geteuid() != 0 {
		return fmt.Errorf("run as root: the unpack sets file owners and Compose mounts overlayfs")
	}
	made := workDir == ""
	if made {
		d, err := os.MkdirTemp("/var/tmp", "nodespawn-bench-")
		if err != nil {
			return err
		}
		workDir = d
	}
	root, err := confine.Open("/")
	if err != nil {
		return err
	}
	defer root.Close()
	quiet := slog.New(slog.NewTextHandler(io.Discard, nil))
	waysDir := filepath.Join(workDir, "w")
	defer func() {
		// Nothing may stay mounted in the scratch directory, and nothing
		// is removed while it is.
		for _, w := range allWays {
			if cleanWay(ctx, root, filepath.Join(waysDir, w), quiet) != nil {
				fmt.Fprintf(os.Stderr, "bench: left %s in place\n", workDir)
				return
			}
		}
		if made {
			os.RemoveAll(workDir)
		} else {
			os.RemoveAll(waysDir)
			os.RemoveAll(filepath.Join(workDir, "registry"))
		}
	}()
	reg, err := registrytest.Run(registrytest.Options{Dir: filepath.Join(workDir, "registry")})
	if err != nil {
		return err
	}
	defer reg.Close()
	addr := reg.Addr

	self, err := os.Executable()
	if err != nil {
		return err
	}
	rootfs, add, what, note := pickSources(rootfsFlag, addFlag)
	if note != "" {
		fmt.Println(note)
	}
	if rootfs != "" {
		fmt.Printf("image: %s, packed into %d layers (the first %d%% of the bytes, the last %d%%)\n", what, nLayers, firstPct, lastPct)
	} else {
		fmt.Printf("image: %s, %d layers of %d MB\n", what, nLayers, layerMB)
	}
	fmt.Printf("pushing images A and B to docker-registry at %s ...\n", addr)
	t0 := time.Now()
	refA, refB := addr+"/bench/rootfs:"+tagA, addr+"/bench/rootfs:"+tagB
	// The image is made in a child too: a child's peak RSS starts at its
	// parent's (it shares the parent's memory until exec), so the parent
	// must stay small.
	push := exec.CommandContext(ctx, self, "-mode", "push", "-ref", addr, "-layers", fmt.Sprint(nLayers), "-layer-mb", fmt.Sprint(layerMB), "-first-pct", fmt.Sprint(firstPct), "-last-pct", fmt.Sprint(lastPct),
		"-rootfs", rootfs, "-add", add, "-dest", workDir)
	push.Stderr = os.Stderr
	out, err := push.Output()
	if err != nil {
		return fmt.Errorf("push: %w", err)
	}
	var info pushInfo
	if err := json.Unmarshal(out, &info); err != nil {
		return fmt.Errorf("push: %w (%q)", err, out)
	}
	fmt.Printf("pushed in %s: image A %s MiB unpacked, %s MiB gzip, %d layers (MiB unpacked/gzip):",
		time.Since(t0).Round(time.Millisecond), mibs(info.Plain), mibs(info.Compressed), len(info.Layers))
	for i, l := range info.Layers {
		fmt.Printf(" %d: %s/%s", i+1, mibs(l.Plain), mibs(l.Size))
	}
	fmt.Printf("\nimage B: A with layer %d repacked with /%s added: %s/%s MiB; the other %d layers shared\n",
		info.Changed+1, markerFile, mibs(info.B.Plain), mibs(info.B.Size), len(info.Layers)-1)
	fmt.Printf("load average before the runs: %s (2 CPUs here may be shared)\n\n", loadavg())

	// One unmeasured run first: the session's first child otherwise meets a
	// page cache no earlier tree has filled, and is faster for it than any
	// later one (measured: the floor at 6.3s and 9.3s as the first child,
	// 11.8-13.2s after).
	warm := filepath.Join(waysDir, "warm-up")
	if err := os.MkdirAll(warm, 0o700); err != nil {
		return err
	}
	if _, err := measure(ctx, self, "floor", refA, warm); err != nil {
		return fmt.Errorf("warm-up: %w", err)
	}
	if err := cleanWay(ctx, root, warm, quiet); err != nil {
		return err
	}
	samples := map[string][]sample{}
	for r := 0; r < runs; r++ {
		for i := range ways {
			way := ways[(i+r)%len(ways)]
			dir := filepath.Join(waysDir, way)
			if err := cleanWay(ctx, root, dir, quiet); err != nil {
				return err
			}
			if err := os.MkdirAll(dir, 0o700); err != nil {
				return err
			}
			ref := refA
			if way == "store-b" || way == "store-upgrade" {
				ref = refB
			}
			if way == "store-upgrade" {
				// The store holds A and A is mounted, as on a machine that
				// runs A; none of it is measured.
				seed := exec.CommandContext(ctx, self, "-mode", "seed", "-ref", refA, "-dest", dir)
				seed.Stdout, seed.Stderr = os.Stdout, os.Stderr
				if err := seed.Run(); err != nil {
					return fmt.Errorf("seed the store with image A: %w", err)
				}
			}
			// What earlier ways (and their removal) left to write goes to
			// the disk now, not during this way.
			syscall.Sync()
			s, err := measure(ctx, self, way, ref, dir)
			if err != nil {
				return err
			}
			fmt.Printf("run %d %-13s wall %8s  cpu %8s  others' cpu %7s  peak RSS %6.1f MiB  written %7.1f MiB  cancelled %6.1f MiB  spilled %6.1f MiB%s\n", r+1, way,
				s.wall.Round(time.Millisecond), s.cpu.Round(time.Millisecond), s.others.Round(100*time.Millisecond), float64(s.maxRSS)/1024,
				mib(s.io.written), mib(s.io.cancelled), mib(s.io.spilled), fetchedText(way, s.io))
			samples[way] = append(samples[way], s)
			if err := cleanWay(ctx, root, dir, quiet); err != nil {
				return err
			}
		}
	}
	fmt.Printf("(others' cpu: what the rest of the machine used meanwhile, other processes and the kernel's writeback of the way's writes;\n 2 CPUs give %s of CPU per second of wall)\n", 2*time.Second)
	fmt.Printf("(peak RSS of a child cannot read below this process's RSS when it was started, %s)\n", vmLine("VmRSS"))
	fmt.Printf("load average after the runs: %s\n", loadavg())

	best := map[string]sample{}
	median := map[string]time.Duration{}
	for w, ss := range samples {
		walls := make([]time.Duration, len(ss))
		for i, s := range ss {
			walls[i] = s.wall
			if b, ok := best[w]; !ok || s.wall < b.wall {
				best[w] = s
			}
		}
		sort.Slice(walls, func(i, j int) bool { return walls[i] < walls[j] })
		if n := len(walls); n%2 == 1 {
			median[w] = walls[n/2]
		} else {
			median[w] = (walls[n/2-1] + walls[n/2]) / 2
		}
	}
	floor, haveFloor := best["floor"]
	fmt.Printf("\nfastest of %d runs per way (the row is that run; median: the median wall time of the %d), image A: %d layers, %s MiB gzip, %s MiB unpacked:\n",
		runs, runs, len(info.Layers), mibs(info.Compressed), mibs(info.Plain))
	fmt.Printf("%-13s %9s %9s %9s %9s %12s %13s %12s %14s %9s %12s  %s\n", "way", "wall", "median", "vs floor", "cpu", "others' cpu", "peak RSS MiB", "written MiB", "cancelled MiB", "net MiB", "spilled MiB", "fetched")
	for _, w := range allWays {
		b, ok := best[w]
		if !ok {
			continue
		}
		ratio := "-"
		if haveFloor {
			ratio = fmt.Sprintf("%.2fx", b.wall.Seconds()/floor.wall.Seconds())
		}
		row := fmt.Sprintf("%-13s %9s %9s %9s %9s %12s %13.1f %12.1f %14.1f %9.1f %12.1f  %s", w, b.wall.Round(time.Millisecond), median[w].Round(time.Millisecond), ratio,
			b.cpu.Round(time.Millisecond), b.others.Round(100*time.Millisecond), float64(b.maxRSS)/1024, mib(b.io.written), mib(b.io.cancelled), mib(b.io.written-b.io.cancelled), mib(b.io.spilled),
			strings.TrimSpace(fetchedText(w, b.io)))
		fmt.Println(strings.TrimRight(row, " "))
	}
	fmt.Println("(written: dirtied in the page cache of disk filesystems; cancelled: dropped before writeback; spilled: layers the flattening pull fetched ahead that went to a temporary file)")
	var wallAll, othersAll time.Duration
	for _, ss := range samples {
		for _, s := range ss {
			wallAll += s.wall
			othersAll += s.others
		}
	}
	if wallAll > 0 {
		share := othersAll.Seconds() / (2 * wallAll.Seconds()) * 100
		fmt.Printf("(while the ways ran, the rest of the machine kept %.0f%% of 2 CPUs busy", share)
		if share > 20 {
			fmt.Printf(": the times above are contended, compare them with care")
		}
		fmt.Println(")")
	}

	fmt.Printf("\ngoals (time: on the fastest runs and on the median wall times, both shown, as this machine is shared; RSS: the highest of all runs):\n")
	verdict := func(ok bool) string {
		if ok {
			return "PASS"
		}
		return "MISS"
	}
	// timeGoal prints a goal on a ratio of two ways' wall times.
	timeGoal := func(goal, num, den string, ok func(float64) bool, format string) {
		if _, have := best[num]; !have || len(samples[den]) == 0 {
			fmt.Printf("  %-34s not measured (needs the ways %s and %s)\n", goal, num, den)
			return
		}
		fast := best[num].wall.Seconds() / best[den].wall.Seconds()
		med := median[num].Seconds() / median[den].Seconds()
		fmt.Printf("  %-34s fastest: %s  %s %s / %s %s = "+format+";  median: %s  %s %s / %s %s = "+format+"\n", goal,
			verdict(ok(fast)), num, best[num].wall.Round(time.Millisecond), den, best[den].wall.Round(time.Millisecond), fast,
			verdict(ok(med)), num, median[num].Round(time.Millisecond), den, median[den].Round(time.Millisecond), med)
	}
	timeGoal("first pull <= 0.9x two-pass (synced):", "store", "twopass", func(r float64) bool { return r <= 0.9 }, "%.2fx")
	timeGoal("first pull <= 1.1x the floor:", "store", "floor", func(r float64) bool { return r <= 1.1 }, "%.2fx")
	timeGoal("one-layer upgrade >= 10x faster:", "store-b", "store-upgrade", func(r float64) bool { return r >= 10 }, "%.1fx")
	if len(samples["store-b"]) > 0 {
		fmt.Printf("  %-34s (the full pull of the same image is store-b: image B into an empty layer store)\n", "")
	}
	var rssWays []string
	var maxRSS int64
	for _, w := range []string{"store", "store-b", "store-upgrade"} {
		var m int64
		for _, s := range samples[w] {
			m = max(m, s.maxRSS)
		}
		if len(samples[w]) > 0 {
			rssWays = append(rssWays, fmt.Sprintf("%s %.1f", w, float64(m)/1024))
			maxRSS = max(maxRSS, m)
		}
	}
	if len(rssWays) > 0 {
		size := fmt.Sprintf("on a %s MiB image", mibs(info.Plain))
		if info.Plain < 1<<30 {
			size += fmt.Sprintf(", %.2f GiB: smaller than the goal's 1 GiB", float64(info.Plain)/(1<<30))
		}
		fmt.Printf("  %-34s %s  highest of all runs: %s MiB (%s)\n", "peak RSS < 100 MiB (layer store):", verdict(maxRSS < 100<<10), strings.Join(rssWays, ", "), size)
	}
	if note != "" {
		fmt.Println(note)
	}
	return nil
}

// measure runs one way in a child and returns what it used.
func measure(ctx context.Context, self, way, ref, dir string) (sample, error) {
	cmd := exec.CommandContext(ctx, self, "-mode", way, "-ref", ref, "-dest", dir, "-spool-mem", fmt.Sprint(spoolMemory))
	cmd.Stdout, cmd.Stderr = os.Stdout, os.Stderr
	// The child writes its /proc/self/io to fd 3 as it exits.
	ior, iow, err := os.Pipe()
	if err != nil {
		return sample{}, err
	}
	cmd.ExtraFiles = []*os.File{iow}
	busy0 := busyCPU()
	start := time.Now()
	err = cmd.Start()
	iow.Close()
	if err != nil {
		ior.Close()
		return sample{}, fmt.Errorf("%s: %w", way, err)
	}
	report, _ := io.ReadAll(ior)
	ior.Close()
	if err := cmd.Wait(); err != nil {
		return sample{}, fmt.Errorf("%s: %w", way, err)
	}
	wall := time.Since(start)
	busy := busyCPU() - busy0
	ru := cmd.ProcessState.SysUsage().(*syscall.Rusage)
	cpu := cmd.ProcessState.UserTime() + cmd.ProcessState.SystemTime()
	return sample{wall: wall, cpu: cpu, maxRSS: ru.Maxrss, io: parseIO(string(report)), others: max(0, busy-cpu)}, nil
}

// busyCPU is the CPU time all CPUs have spent busy since boot (user,
// nice, system, irq, softirq, steal in /proc/stat), at USER_HZ 100.
func busyCPU() time.Duration {
	b, err := os.ReadFile("/proc/stat")
	if err != nil {
		return 0
	}
	line, _, _ := strings.Cut(string(b), "\n")
	f := strings.Fields(line)
	var t int64
	for _, i := range []int{1, 2, 3, 6, 7, 8} {
		if i < len(f) {
			n, _ := strconv.ParseInt(f[i], 10, 64)
			t += n
		}
	}
	return time.Duration(t) * 10 * time.Millisecond
}

// cleanWay unmounts what a way mounted in its directory and removes the
// directory; it removes nothing while something stays mounted.
func cleanWay(ctx context.Context, root *confine.Root, dir string, log *slog.Logger) error {
	target := filepath.Join(dir, "root")
	if err := layers.Unmount(ctx, root, target, 10*time.Second, log); err != nil {
		return fmt.Errorf("clean up: %w", err)
	}
	if mounted, _, err := layers.MountedAt(target); err != nil || mounted {
		return fmt.Errorf("clean up: %s is still mounted (%v)", target, err)
	}
	return os.RemoveAll(dir)
}

func fetchedText(way string, c ioCounts) string {
	if !strings.HasPrefix(way, "store") {
		return ""
	}
	return fmt.Sprintf("  fetched %d layers, %.1f MiB", c.fetchedLayers, mib(c.fetched))
}

func loadavg() string {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return "unknown"
	}
	return strings.Join(strings.Fields(string(b))[:3], " ")
}

// ioCounts is what /proc/self/io says a process wrote, and what its pull
// spilled and fetched.
type ioCounts struct {
	written, cancelled, spilled, fetched int64
	fetchedLayers                        int
}

func parseIO(s string) ioCounts {
	var c ioCounts
	for _, l := range strings.Split(s, "\n") {
		k, v, _ := strings.Cut(l, ":")
		n, _ := strconv.ParseInt(strings.TrimSpace(v), 10, 64)
		switch k {
		case "write_bytes":
			c.written = n
		case "cancelled_write_bytes":
			c.cancelled = n
		case "spilled":
			c.spilled = n
		case "fetched":
			c.fetched = n
		case "fetched_layers":
			c.fetchedLayers = int(n)
		}
	}
	return c
}

func mib(n int64) float64 { return float64(n) / (1 << 20) }

func mibs(n int64) string { return strconv.FormatFloat(mib(n), 'f', 1, 64) }

// reportIO writes this process's /proc/self/io (its own threads and the
// children it waited for) to fd 3, where the parent reads it.
func reportIO() error {
	b, err := os.ReadFile("/proc/self/io")
	if err != nil {
		return err
	}
	f := os.NewFile(3, "io-report")
	if f == nil {
		return nil
	}
	defer f.Close()
	_, err = fmt.Fprintf(f, "%sspilled: %d\nfetched: %d\nfetched_layers: %d\n", b, counts.spilled, counts.fetched, counts.fetchedLayers)
	return err
}

// child runs one step in this process. dir is the way's directory: a
// flattened tree goes to dir/rootfs; the layer store is dir/layers, the
// composed root dir/root, its state dir/state, its mount unit in dir/units.
func child(ctx context.Context, mode, ref, dir string, nLayers, layerMB int, rootfsDir, add string) error {
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	if p := os.Getenv("BENCH_CPUPROFILE"); p != "" && mode != "push" && mode != "seed" {
		// BENCH_CPUPROFILE=DIR: each way's child writes DIR/<way>.pprof.
		f, err := os.Create(filepath.Join(p, mode+".pprof"))
		if err != nil {
			return err
		}
		defer f.Close()
		if err := pprof.StartCPUProfile(f); err != nil {
			return err
		}
		defer pprof.StopCPUProfile()
	}
	if mode == "push" {
		info, err := pushImages(ctx, ref, nLayers, layerMB, rootfsDir, add, dir)
		if err != nil {
			return err
		}
		return json.NewEncoder(os.Stdout).Encode(info)
	}
	host := strings.SplitN(ref, "/", 2)[0]
	isB := strings.HasSuffix(ref, ":"+tagB)
	// The benchmark's paths are host paths: the whole host is its root.
	root, err := confine.Open("/")
	if err != nil {
		return err
	}
	defer root.Close()
	flat := filepath.Join(dir, "rootfs")
	switch mode {
	case "floor":
		m, repo, err := fetchManifest(ctx, ref)
		if err != nil {
			return err
		}
		if err := os.MkdirAll(flat, 0o755); err != nil {
			return err
		}
		// Layers fetched and unpacked as many at once as the pulls fetch;
		// the layers of this image overlap in directories only.
		g, gctx := errgroup.WithContext(ctx)
		g.SetLimit(nsoci.DefaultConcurrency)
		for _, l := range m.Layers {
			url := fmt.Sprintf("http://%s/v2/%s/blobs/%s", host, repo, l.Digest)
			g.Go(func() error {
				cmd := exec.CommandContext(gctx, "bash", "-c", `set -eo pipefail; curl -sSf "$1" | tar -xz -C "$2"`, "floor", url, flat)
				cmd.Stdout, cmd.Stderr = os.Stdout, os.Stderr
				return cmd.Run()
			})
		}
		if err := g.Wait(); err != nil {
			return err
		}
		if err := root.Syncfs(flat); err != nil {
			return err
		}
		return checkTree(flat, false)
	case "stream":
		res, err := nsoci.Pull(ctx, nsoci.Request{Reference: ref, Platform: "linux/amd64", PlainHTTP: []string{host}, Root: root, Dest: flat, Log: log,
			SpoolMemory: spoolMemory})
		counts.spilled = res.Spilled
		if err != nil {
			return err
		}
		if err := root.Syncfs(flat); err != nil {
			return err
		}
		return checkTree(flat, isB)
	case "twopass":
		layout := filepath.Join(dir, "layout")
		store, err := oci.New(layout)
		if err != nil {
			return err
		}
		repo, err := remote.NewRepository(ref)
		if err != nil {
			return err
		}
		repo.PlainHTTP = true
		tag := repo.Reference.Reference
		if _, err := oras.Copy(ctx, repo, tag, store, tag, oras.DefaultCopyOptions); err != nil {
			return fmt.Errorf("copy to layout: %w", err)
		}
		if err := root.Syncfs(layout); err != nil {
			return err
		}
		res, err := nsoci.Pull(ctx, nsoci.Request{Layout: layout, LayoutRef: tag, Platform: "linux/amd64", Root: root, Dest: flat, Log: log,
			SpoolMemory: spoolMemory})
		counts.spilled = res.Spilled
		if err != nil {
			return err
		}
		if err := os.RemoveAll(layout); err != nil {
			return err
		}
		if err := root.Syncfs(flat); err != nil {
			return err
		}
		return checkTree(flat, isB)
	case "store", "store-b", "store-upgrade", "seed":
		st, err := layers.Open(root, filepath.Join(dir, "layers"))
		if err != nil {
			return err
		}
		res, err := nsoci.PullLayers(ctx, nsoci.Request{Reference: ref, Platform: "linux/amd64", PlainHTTP: []string{host}, Log: log}, st)
		counts.fetched, counts.fetchedLayers = res.FetchedBytes, res.Fetched
		if err != nil {
			return err
		}
		m := layers.Machine{Target: filepath.Join(dir, "root"), Dir: filepath.Join(dir, "state"), Unit: filepath.Join(dir, "units", "bench.mount"), Machine: "bench"}
		img := layers.Image{Source: ref, Platform: "linux/amd64", Manifest: res.ManifestDigest, Layers: res.DiffIDs}
		if _, err := st.Compose(ctx, m, img, log); err != nil {
			return err
		}
		if err := root.Syncfs(m.Dir); err != nil {
			return err
		}
		if err := checkTree(m.Target, isB); err != nil {
			return err
		}
		if mode == "seed" {
			return nil // stays mounted: the machine runs image A
		}
		return layers.Unmount(ctx, root, m.Target, 10*time.Second, log)
	}
	return fmt.Errorf("unknown mode %q", mode)
}

// checkTree checks that a rootfs was made, of image B or of image A.
func checkTree(dir string, isB bool) error {
	es, err := os.ReadDir(dir)
	if err != nil {
		return err
	}
	if len(es) == 0 {
		return fmt.Errorf("%s is empty", dir)
	}
	b, err := os.ReadFile(filepath.Join(dir, markerFile))
	switch {
	case isB && err != nil:
		return fmt.Errorf("image B's file is not in the tree: %w", err)
	case isB && string(b) != "B\n":
		return fmt.Errorf("image B's file holds %q", b)
	case !isB && !errors.Is(err, fs.ErrNotExist):
		return fmt.Errorf("image A's tree has /%s (%v)", markerFile, err)
	}
	return nil
}

// fetchManifest fetches the image manifest of ref; it returns it and the
// repository's name.
func fetchManifest(ctx context.Context, ref string) (ocispec.Manifest, string, error) {
	var m ocispec.Manifest
	repo, err := remote.NewRepository(ref)
	if err != nil {
		return m, "", err
	}
	repo.PlainHTTP = true
	_, rc, err := repo.FetchReference(ctx, repo.Reference.Reference)
	if err != nil {
		return m, "", err
	}
	defer rc.Close()
	return m, repo.Reference.Repository, json.NewDecoder(rc).Decode(&m)
}

// pushImages packs the sources (or generates layers when rootfsDir is
// ""), pushes image A as tag a and image B (A with its last layer
// repacked with markerFile added) as tag b. scratch is where packed
// layers wait for their push.
func pushImages(ctx context.Context, addr string, nLayers, layerMB int, rootfsDir, add, scratch string) (pushInfo, error) {
	var info pushInfo
	repo, err := remote.NewRepository(addr + "/bench/rootfs")
	if err != nil {
		return info, err
	}
	repo.PlainHTTP = true
	packDir, err := os.MkdirTemp(scratch, "pack-")
	if err != nil {
		return info, err
	}
	defer os.RemoveAll(packDir)
	var packed []packedLayer
	var b packedLayer
	if rootfsDir != "" {
		srcs, err := parseSources(rootfsDir, add)
		if err != nil {
			return info, err
		}
		p := &packer{srcs: srcs, scratch: packDir}
		if packed, err = p.packTree(ctx, nLayers, firstPct, lastPct); err != nil {
			return info, err
		}
		last := len(packed) - 1
		if b, err = p.repack(ctx, packed[last], last, markerFile, []byte("B\n")); err != nil {
			return info, err
		}
	} else if packed, b, err = genLayers(ctx, packDir, nLayers, layerMB); err != nil {
		return info, err
	}

	cfg := ocispec.Image{Platform: ocispec.Platform{OS: "linux", Architecture: "amd64"}, RootFS: ocispec.RootFS{Type: "layers"}}
	m := ocispec.Manifest{Versioned: specs.Versioned{SchemaVersion: 2}, MediaType: ocispec.MediaTypeImageManifest}
	pushLayer := func(l packedLayer) (ocispec.Descriptor, layerInfo, error) {
		desc := ocispec.Descriptor{MediaType: ocispec.MediaTypeImageLayerGzip, Digest: l.digest, Size: l.size}
		f, err := os.Open(l.path)
		if err != nil {
			return desc, layerInfo{}, err
		}
		defer f.Close()
		if err := repo.Push(ctx, desc, f); err != nil {
			return desc, layerInfo{}, fmt.Errorf("push layer %s: %w", desc.Digest, err)
		}
		return desc, layerInfo{Size: l.size, Plain: l.plain}, nil
	}
	for _, l := range packed {
		desc, li, err := pushLayer(l)
		if err != nil {
			return info, err
		}
		info.Layers = append(info.Layers, li)
		info.Plain += l.plain
		info.Compressed += l.size
		m.Layers = append(m.Layers, desc)
		cfg.RootFS.DiffIDs = append(cfg.RootFS.DiffIDs, l.diffID)
	}
	bDesc, bInfo, err := pushLayer(b)
	if err != nil {
		return info, err
	}
	info.B = bInfo
	info.Changed = len(m.Layers) - 1
	pushJSON := func(mt string, v any) (ocispec.Descriptor, error) {
		b, _ := json.Marshal(v)
		d := ocispec.Descriptor{MediaType: mt, Digest: digest.FromBytes(b), Size: int64(len(b))}
		return d, repo.Push(ctx, d, bytes.NewReader(b))
	}
	tag := func(tag string) error {
		if m.Config, err = pushJSON(ocispec.MediaTypeImageConfig, cfg); err != nil {
			return err
		}
		md, err := pushJSON(ocispec.MediaTypeImageManifest, m)
		if err != nil {
			return err
		}
		return repo.Tag(ctx, md, tag)
	}
	if err := tag(tagA); err != nil {
		return info, err
	}
	m.Layers[info.Changed] = bDesc
	cfg.RootFS.DiffIDs[info.Changed] = b.diffID
	return info, tag(tagB)
}

// genLayers writes n synthetic layers of ~layerMB MB each to scratch
// (genTree's trees, packed with imagebuild.WriteLayer), and image B's
// version of the last: the same tree with markerFile added.
func genLayers(ctx context.Context, scratch string, n, layerMB int) ([]packedLayer, packedLayer, error) {
	var layers []packedLayer
	var tree string
	for i := range n {
		tree = filepath.Join(scratch, fmt.Sprintf("tree%d", i))
		if err := genTree(tree, uint64(i), layerMB<<20); err != nil {
			return nil, packedLayer{}, err
		}
		l, err := writeTree(ctx, scratch, i, tree)
		if err != nil {
			return nil, packedLayer{}, err
		}
		layers = append(layers, l)
		if i < n-1 {
			os.RemoveAll(tree) // B repacks the last one only
		}
	}
	marker := filepath.Join(tree, markerFile)
	if err := os.Mkdir(filepath.Dir(marker), 0o755); err != nil {
		return nil, packedLayer{}, err
	}
	if err := writeFileMode(marker, []byte("B\n"), 0o644); err != nil {
		return nil, packedLayer{}, err
	}
	if err := os.Chmod(filepath.Dir(marker), 0o755); err != nil {
		return nil, packedLayer{}, err
	}
	b, err := writeTree(ctx, scratch, n-1, tree)
	return layers, b, err
}

// writeTree packs the tree as layer i into a scratch file.
func writeTree(ctx context.Context, scratch string, i int, tree string) (packedLayer, error) {
	f, err := os.CreateTemp(scratch, fmt.Sprintf("layer%d-*.tar.gz", i))
	if err != nil {
		return packedLayer{}, err
	}
	info, err := imagebuild.WriteLayer(ctx, tree, epoch, f)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		os.Remove(f.Name())
		return packedLayer{}, fmt.Errorf("pack layer %d: %w", i+1, err)
	}
	return packedLayer{path: f.Name(), digest: info.Digest, diffID: info.DiffID, size: info.Size, plain: info.TarSize}, nil
}

// genTree makes the directory dir holding layer<seed>/ with ~size bytes
// in files of 1 MiB or less of random words (compressible roughly 3:1,
// like binaries and text), directories mode 0755, files 0644.
func genTree(dir string, seed uint64, size int) error {
	r := rand.New(rand.NewPCG(seed, 42))
	words := make([]string, 4096)
	for i := range words {
		w := make([]byte, 3+r.IntN(8))
		for j := range w {
			w[j] = byte('a' + r.IntN(26))
		}
		words[i] = string(w)
	}
	sub := filepath.Join(dir, fmt.Sprintf("layer%d", seed))
	if err := os.MkdirAll(sub, 0o755); err != nil {
		return err
	}
	if err := os.Chmod(sub, 0o755); err != nil {
		return err
	}
	var body bytes.Buffer
	for n, written := 0, 0; written < size; n++ {
		fsize := min(1<<20, size-written) - r.IntN(64<<10)
		if fsize <= 0 {
			fsize = size - written
		}
		body.Reset()
		for body.Len() < fsize {
			body.WriteString(words[r.IntN(len(words))])
			body.WriteByte(' ')
		}
		if err := writeFileMode(filepath.Join(sub, fmt.Sprintf("f%05d", n)), body.Bytes()[:fsize], 0o644); err != nil {
			return err
		}
		written += fsize
	}
	return nil
}

// writeFileMode writes a file with exactly mode perm, whatever the umask.
func writeFileMode(name string, b []byte, perm os.FileMode) error {
	if err := os.WriteFile(name, b, perm); err != nil {
		return err
	}
	return os.Chmod(name, perm)
}

// vmLine returns a field of /proc/self/status, e.g. "VmRSS: 10 MB".
func vmLine(field string) string {
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		return "unknown"
	}
	for _, l := range strings.Split(string(b), "\n") {
		if strings.HasPrefix(l, field+":") {
			return strings.Join(strings.Fields(l), " ")
		}
	}
	return "unknown"
}
