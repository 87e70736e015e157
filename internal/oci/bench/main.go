// Command bench compares three ways of turning a registry image into a
// rootfs, against Debian's docker-registry on loopback:
//
//	stream   oci.Pull: layers fetched concurrently, verified and unpacked as they stream
//	twopass  oras.Copy into an OCI layout on disk, then oci.Pull from that layout
//	curl     curl | tar -xz per layer, in order: no verification at all (the floor)
//
// It pushes a generated multi-layer image of a few hundred MB (or, with
// -rootfs DIR, an existing tree such as a distribution's rootfs packed into
// -layers layers, the first holding most of it), runs each way in a child
// process and prints, per way, wall time, the ratio to the floor, CPU time,
// peak RSS and the bytes the way wrote. Each is the child's alone: CPU and
// peak RSS from its rusage, bytes from its /proc/self/io at exit (which
// counts the children it reaped, curl and tar included). write_bytes is
// what the process dirtied in the page cache of disk-backed filesystems;
// cancelled is what was dropped again before writeback (a deleted file's
// dirty pages), so written - cancelled is what went to the disk; spilled
// is what the pull's layers fetched ahead put in a temporary file (on
// tmpfs it is not in written). -spool-mem sets the pulls' memory budget
// for those layers. Run it with `make bench`, as root (the unpack sets
// owners).
package main

import (
	"bytes"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"archive/tar"

	"github.com/klauspost/compress/gzip"
	"github.com/opencontainers/go-digest"
	"github.com/opencontainers/image-spec/specs-go"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"oras.land/oras-go/v2"
	"oras.land/oras-go/v2/content/oci"
	"oras.land/oras-go/v2/registry/remote"

	"github.com/nodespawn/nodespawn/internal/confine"
	nsoci "github.com/nodespawn/nodespawn/internal/oci"
)

// spoolMemory is Request.SpoolMemory for the pulls (stream and twopass).
var spoolMemory int64

// spilled is what the child's pull spilled to a temporary file.
var spilled int64

func main() {
	mode := flag.String("mode", "", "internal: run one step in this process (push, stream, twopass, curl)")
	ref := flag.String("ref", "", "internal: image reference")
	dest := flag.String("dest", "", "internal: rootfs destination")
	layers := flag.Int("layers", 5, "number of layers")
	layerMB := flag.Int("layer-mb", 80, "uncompressed MB per layer")
	runs := flag.Int("runs", 2, "runs of each way (the best is reported)")
	workDir := flag.String("dir", "", "scratch directory (default: a temp dir under /var/tmp)")
	rootfsDir := flag.String("rootfs", "", "pack this existing tree (read only) into -layers layers instead of generating files")
	flag.Int64Var(&spoolMemory, "spool-mem", 0, "memory budget in bytes of the layers the pulls fetch ahead (0: the default; negative: none)")
	flag.Parse()

	ctx := context.Background()
	if *mode != "" {
		err := child(ctx, *mode, *ref, *dest, *layers, *layerMB, *rootfsDir)
		if err == nil && *mode != "push" {
			err = reportIO()
		}
		if err != nil {
			fmt.Fprintf(os.Stderr, "bench %s: %v\n", *mode, err)
			os.Exit(1)
		}
		return
	}
	if err := parent(ctx, *workDir, *layers, *layerMB, *runs, *rootfsDir); err != nil {
		fmt.Fprintf(os.Stderr, "bench: %v\n", err)
		os.Exit(1)
	}
}

func parent(ctx context.Context, workDir string, nLayers, layerMB, runs int, rootfsDir string) error {
	if os.Geteuid() != 0 {
		return fmt.Errorf("run as root: the unpack sets file owners")
	}
	if workDir == "" {
		d, err := os.MkdirTemp("/var/tmp", "nodespawn-bench-")
		if err != nil {
			return err
		}
		defer os.RemoveAll(d)
		workDir = d
	}
	addr, stop, err := startRegistry(workDir)
	if err != nil {
		return err
	}
	defer stop()

	self, err := os.Executable()
	if err != nil {
		return err
	}
	if rootfsDir != "" {
		fmt.Printf("packing %s into %d layers and pushing them to %s ...\n", rootfsDir, nLayers, addr)
	} else {
		fmt.Printf("generating and pushing %d layers of %d MB (uncompressed) to %s ...\n", nLayers, layerMB, addr)
	}
	t0 := time.Now()
	ref := addr + "/bench/rootfs:v1"
	// The image is generated in a child too: a child's peak RSS starts at
	// its parent's (it shares the parent's memory until exec), so the
	// parent must stay small.
	push := exec.CommandContext(ctx, self, "-mode", "push", "-ref", ref, "-layers", fmt.Sprint(nLayers), "-layer-mb", fmt.Sprint(layerMB),
		"-rootfs", rootfsDir, "-dest", workDir)
	push.Stderr = os.Stderr
	out, err := push.Output()
	if err != nil {
		return fmt.Errorf("push: %w", err)
	}
	var compressed, plain int64
	fmt.Sscan(string(out), &compressed, &plain)
	fmt.Printf("pushed in %s: %d MB uncompressed, %d MB gzip\n\n", time.Since(t0).Round(time.Millisecond), plain>>20, compressed>>20)
	type result struct {
		wall, cpu time.Duration
		maxRSS    int64 // KiB
		io        ioCounts
	}
	best := map[string]result{}
	ways := []string{"curl", "stream", "twopass"}
	for r := 0; r < runs; r++ {
		for _, way := range ways {
			dest := filepath.Join(workDir, "machines", way)
			os.MkdirAll(filepath.Dir(dest), 0o700)
			cmd := exec.CommandContext(ctx, self, "-mode", way, "-ref", ref, "-dest", dest, "-spool-mem", fmt.Sprint(spoolMemory))
			cmd.Stdout, cmd.Stderr = os.Stdout, os.Stderr
			// The child writes its /proc/self/io to fd 3 as it exits.
			ior, iow, err := os.Pipe()
			if err != nil {
				return err
			}
			cmd.ExtraFiles = []*os.File{iow}
			start := time.Now()
			err = cmd.Start()
			iow.Close()
			if err != nil {
				ior.Close()
				return fmt.Errorf("%s: %w", way, err)
			}
			report, _ := io.ReadAll(ior)
			ior.Close()
			if err := cmd.Wait(); err != nil {
				return fmt.Errorf("%s: %w", way, err)
			}
			wall := time.Since(start)
			ru := cmd.ProcessState.SysUsage().(*syscall.Rusage)
			cpu := cmd.ProcessState.UserTime() + cmd.ProcessState.SystemTime()
			ioc := parseIO(string(report))
			fmt.Printf("run %d %-8s wall %8s  cpu %8s  peak RSS %6.1f MiB  written %6.1f MiB  cancelled %6.1f MiB  spilled %6.1f MiB\n", r+1, way,
				wall.Round(time.Millisecond), cpu.Round(time.Millisecond), float64(ru.Maxrss)/1024, mib(ioc.written), mib(ioc.cancelled), mib(ioc.spilled))
			if b, ok := best[way]; !ok || wall < b.wall {
				best[way] = result{wall, cpu, ru.Maxrss, ioc}
			}
			// Remove the rootfs (and the marker) so every run starts empty.
			os.RemoveAll(filepath.Dir(dest))
		}
	}
	fmt.Printf("(peak RSS of a child cannot read below this process's RSS when it was started, %s)\n", vmLine("VmRSS"))
	floor := best["curl"].wall
	fmt.Printf("\nbest of %d runs (by wall time), %d layers, %d MB gzip, %d MB unpacked:\n", runs, nLayers, compressed>>20, plain>>20)
	fmt.Printf("%-8s %10s %12s %10s %14s %12s %14s %10s %12s\n", "way", "wall", "vs curl|tar", "cpu", "peak RSS MiB", "written MiB", "cancelled MiB", "net MiB", "spilled MiB")
	for _, way := range ways {
		b := best[way]
		fmt.Printf("%-8s %10s %11.2fx %10s %14.1f %12.1f %14.1f %10.1f %12.1f\n", way, b.wall.Round(time.Millisecond), b.wall.Seconds()/floor.Seconds(),
			b.cpu.Round(time.Millisecond), float64(b.maxRSS)/1024, mib(b.io.written), mib(b.io.cancelled), mib(b.io.written-b.io.cancelled), mib(b.io.spilled))
	}
	fmt.Println("(written: dirtied in the page cache of disk filesystems; cancelled: dropped before writeback; spilled: layers fetched ahead that went to a temporary file)")
	fmt.Printf("stream vs twopass: %.2fx the time\n", best["stream"].wall.Seconds()/best["twopass"].wall.Seconds())
	return nil
}

// ioCounts is what /proc/self/io says a process wrote, and what its pull
// spilled.
type ioCounts struct {
	written, cancelled, spilled int64
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
		}
	}
	return c
}

func mib(n int64) float64 { return float64(n) / (1 << 20) }

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
	_, err = fmt.Fprintf(f, "%sspilled: %d\n", b, spilled)
	return err
}

// child runs one way in this process.
func child(ctx context.Context, mode, ref, dest string, nLayers, layerMB int, rootfsDir string) error {
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	host := strings.SplitN(ref, "/", 2)[0]
	// The benchmark's paths are host paths: the whole host is its root.
	root, err := confine.Open("/")
	if err != nil {
		return err
	}
	defer root.Close()
	switch mode {
	case "push":
		n, plain, err := pushImage(ctx, host, nLayers, layerMB, rootfsDir, dest)
		fmt.Println(n, plain)
		return err
	case "stream":
		res, err := nsoci.Pull(ctx, nsoci.Request{Reference: ref, Platform: "linux/amd64", PlainHTTP: []string{host}, Root: root, Dest: dest, Log: log,
			SpoolMemory: spoolMemory})
		spilled = res.Spilled
		return err
	case "twopass":
		layout := dest + ".layout"
		defer os.RemoveAll(layout)
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
		res, err := nsoci.Pull(ctx, nsoci.Request{Layout: layout, LayoutRef: tag, Platform: "linux/amd64", Root: root, Dest: dest, Log: log,
			SpoolMemory: spoolMemory})
		spilled = res.Spilled
		return err
	case "curl":
		// The manifest is read here; the layers go through curl | tar.
		repo, err := remote.NewRepository(ref)
		if err != nil {
			return err
		}
		repo.PlainHTTP = true
		_, rc, err := repo.FetchReference(ctx, repo.Reference.Reference)
		if err != nil {
			return err
		}
		var m ocispec.Manifest
		err = json.NewDecoder(rc).Decode(&m)
		rc.Close()
		if err != nil {
			return err
		}
		if err := os.MkdirAll(dest, 0o755); err != nil {
			return err
		}
		var script strings.Builder
		script.WriteString("set -e\n")
		for _, l := range m.Layers {
			fmt.Fprintf(&script, "curl -sSf http://%s/v2/%s/blobs/%s | tar -xz -C %s\n", host, repo.Reference.Repository, l.Digest, dest)
		}
		// Same durability as the other two, which syncfs before renaming.
		fmt.Fprintf(&script, "sync -f %s\n", dest)
		cmd := exec.CommandContext(ctx, "sh", "-c", script.String())
		cmd.Stdout, cmd.Stderr = os.Stdout, os.Stderr
		return cmd.Run()
	}
	return fmt.Errorf("unknown mode %q", mode)
}

// startRegistry runs docker-registry on a free loopback port.
func startRegistry(dir string) (string, func(), error) {
	bin, err := exec.LookPath("docker-registry")
	if err != nil {
		return "", nil, fmt.Errorf("docker-registry not found (apt-get install docker-registry): %w", err)
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", nil, err
	}
	addr := l.Addr().String()
	l.Close()
	cfg := fmt.Sprintf("version: 0.1\nlog: { level: error, accesslog: { disabled: true } }\nstorage:\n  filesystem: { rootdirectory: %s }\nhttp:\n  addr: %s\n",
		filepath.Join(dir, "registry"), addr)
	cfgPath := filepath.Join(dir, "registry.yml")
	if err := os.WriteFile(cfgPath, []byte(cfg), 0o644); err != nil {
		return "", nil, err
	}
	cmd := exec.Command(bin, "serve", cfgPath)
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		return "", nil, err
	}
	stop := func() { cmd.Process.Kill(); cmd.Wait() }
	for i := 0; i < 200; i++ {
		if resp, err := http.Get("http://" + addr + "/v2/"); err == nil {
			resp.Body.Close()
			return addr, stop, nil
		}
		time.Sleep(50 * time.Millisecond)
	}
	stop()
	return "", nil, fmt.Errorf("docker-registry did not come up on %s", addr)
}

// pushImage generates (or packs rootfsDir into) the layers and pushes the
// image; it returns the compressed and uncompressed sizes. scratch is
// where packed layers wait for their push.
func pushImage(ctx context.Context, addr string, nLayers, layerMB int, rootfsDir, scratch string) (int64, int64, error) {
	repo, err := remote.NewRepository(addr + "/bench/rootfs")
	if err != nil {
		return 0, 0, err
	}
	repo.PlainHTTP = true
	cfg := ocispec.Image{Platform: ocispec.Platform{OS: "linux", Architecture: "amd64"}, RootFS: ocispec.RootFS{Type: "layers"}}
	m := ocispec.Manifest{Versioned: specs.Versioned{SchemaVersion: 2}, MediaType: ocispec.MediaTypeImageManifest}
	var total, plain int64
	add := func(i int, diffID digest.Digest, desc ocispec.Descriptor, blob io.Reader) error {
		if err := repo.Push(ctx, desc, blob); err != nil {
			return fmt.Errorf("push layer %d: %w", i, err)
		}
		m.Layers = append(m.Layers, desc)
		cfg.RootFS.DiffIDs = append(cfg.RootFS.DiffIDs, diffID)
		total += desc.Size
		return nil
	}
	if rootfsDir != "" {
		packed, n, err := packTree(rootfsDir, nLayers, scratch)
		if err != nil {
			return 0, 0, err
		}
		plain = n
		for i, l := range packed {
			f, err := os.Open(l.path)
			if err != nil {
				return 0, 0, err
			}
			err = add(i, l.diffID, ocispec.Descriptor{MediaType: ocispec.MediaTypeImageLayerGzip, Digest: l.digest, Size: l.size}, f)
			f.Close()
			os.Remove(l.path)
			if err != nil {
				return 0, 0, err
			}
		}
	} else {
		for i := 0; i < nLayers; i++ {
			tarball, blob := genLayer(uint64(i), layerMB<<20)
			desc := ocispec.Descriptor{MediaType: ocispec.MediaTypeImageLayerGzip, Digest: digest.FromBytes(blob), Size: int64(len(blob))}
			if err := add(i, tarball, desc, bytes.NewReader(blob)); err != nil {
				return 0, 0, err
			}
		}
		plain = int64(nLayers*layerMB) << 20
	}
	push := func(mt string, v any) (ocispec.Descriptor, error) {
		b, _ := json.Marshal(v)
		d := ocispec.Descriptor{MediaType: mt, Digest: digest.FromBytes(b), Size: int64(len(b))}
		return d, repo.Push(ctx, d, bytes.NewReader(b))
	}
	if m.Config, err = push(ocispec.MediaTypeImageConfig, cfg); err != nil {
		return 0, 0, err
	}
	md, err := push(ocispec.MediaTypeImageManifest, m)
	if err != nil {
		return 0, 0, err
	}
	return total, plain, repo.Tag(ctx, md, "v1")
}

// genLayer makes a tar of ~size bytes in files of 1 MiB or less of
// random words (compressible roughly 3:1, like binaries and text), and its
// gzip; it returns the tar's digest (the DiffID) and the blob.
func genLayer(seed uint64, size int) (digest.Digest, []byte) {
	r := rand.New(rand.NewPCG(seed, 42))
	words := make([]string, 4096)
	for i := range words {
		w := make([]byte, 3+r.IntN(8))
		for j := range w {
			w[j] = byte('a' + r.IntN(26))
		}
		words[i] = string(w)
	}
	var tarBuf bytes.Buffer
	tw := tar.NewWriter(&tarBuf)
	dir := fmt.Sprintf("layer%d", seed)
	tw.WriteHeader(&tar.Header{Name: dir + "/", Typeflag: tar.TypeDir, Mode: 0o755, ModTime: time.Unix(1700000000, 0)})
	for n, written := 0, 0; written < size; n++ {
		fsize := min(1<<20, size-written) - r.IntN(64<<10)
		if fsize <= 0 {
			fsize = size - written
		}
		var body bytes.Buffer
		for body.Len() < fsize {
			body.WriteString(words[r.IntN(len(words))])
			body.WriteByte(' ')
		}
		b := body.Bytes()[:fsize]
		tw.WriteHeader(&tar.Header{Name: fmt.Sprintf("%s/f%05d", dir, n), Typeflag: tar.TypeReg, Mode: 0o644, Size: int64(len(b)), ModTime: time.Unix(1700000000, 0)})
		tw.Write(b)
		written += fsize
	}
	tw.Close()
	var gz bytes.Buffer
	zw, _ := gzip.NewWriterLevel(&gz, gzip.DefaultCompression)
	zw.Write(tarBuf.Bytes())
	zw.Close()
	return digest.FromBytes(tarBuf.Bytes()), gz.Bytes()
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
