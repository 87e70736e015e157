package download

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"math/rand/v2"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/nodespawn/nodespawn/internal/confine/confinetest"
	"github.com/nodespawn/nodespawn/internal/httpx"
	"github.com/nodespawn/nodespawn/internal/progress"
	"github.com/nodespawn/nodespawn/internal/upstream"
	"github.com/nodespawn/nodespawn/plan"
)

// origin is a release server on loopback: it serves files in the upstream
// layouts and can inject faults per path.
type origin struct {
	srv *httptest.Server

	mu     sync.Mutex
	files  map[string][]byte
	hits   map[string]int
	ranges []string
	// fault, when set for a path, handles request number n (1-based) and
	// returns true, or returns false to serve the file normally.
	fault map[string]func(w http.ResponseWriter, r *http.Request, n int) bool
}

func newOrigin(t *testing.T) *origin {
	o := &origin{
		files: map[string][]byte{},
		hits:  map[string]int{},
		fault: map[string]func(http.ResponseWriter, *http.Request, int) bool{},
	}
	o.srv = httptest.NewServer(http.HandlerFunc(o.serve))
	t.Cleanup(o.srv.Close)
	return o
}

func (o *origin) serve(w http.ResponseWriter, r *http.Request) {
	o.mu.Lock()
	o.hits[r.URL.Path]++
	n := o.hits[r.URL.Path]
	body, ok := o.files[r.URL.Path]
	fault := o.fault[r.URL.Path]
	if rg := r.Header.Get("Range"); rg != "" {
		o.ranges = append(o.ranges, rg)
	}
	o.mu.Unlock()
	if fault != nil && fault(w, r, n) {
		return
	}
	if !ok {
		http.NotFound(w, r)
		return
	}
	sum := sha256.Sum256(body)
	w.Header().Set("ETag", `"`+hex.EncodeToString(sum[:8])+`"`)
	http.ServeContent(w, r, "", time.Time{}, bytes.NewReader(body))
}

func (o *origin) put(path string, body []byte) {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.files[path] = body
}

func (o *origin) count(path string) int {
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.hits[path]
}

func (o *origin) totalHits() int {
	o.mu.Lock()
	defer o.mu.Unlock()
	n := 0
	for _, c := range o.hits {
		n += c
	}
	return n
}

// publish serves an artifact for component under the upstream layout and
// its checksum file in the upstream format, and returns the plan step.
func (o *origin) publish(t *testing.T, component, version string, body []byte, dest string) plan.Download {
	t.Helper()
	a, err := upstream.Lookup(component, version, "amd64", o.srv.URL)
	if err != nil {
		t.Fatal(err)
	}
	u, _ := url.Parse(a.URL)
	cu, _ := url.Parse(a.ChecksumURL)
	sum := sha256.Sum256(body)
	hexsum := hex.EncodeToString(sum[:])
	name := filepath.Base(u.Path)
	var checksum string
	switch component {
	case upstream.Kubelet, upstream.Kubectl, upstream.KubeProxy:
		checksum = hexsum // dl.k8s.io: bare hex, no newline
	case upstream.Runc:
		// runc.sha256sum lists every architecture.
		other := sha256.Sum256([]byte("other arch"))
		checksum = fmt.Sprintf("%x  runc.arm64\n%s  %s\n%x  runc.ppc64le\n", other, hexsum, name, other)
	default:
		checksum = hexsum + "  " + name + "\n"
	}
	o.put(u.Path, body)
	o.put(cu.Path, []byte(checksum))
	return plan.Download{
		Name: component, Version: version, URL: a.URL, ChecksumURL: a.ChecksumURL,
		Dest: dest, Mode: 0o755, Archive: a.Archive, Members: toRenderMembers(a.Members),
	}
}

func toRenderMembers(ms []upstream.Member) []plan.Member {
	var out []plan.Member
	for _, m := range ms {
		out = append(out, plan.Member{Path: m.Path, Dest: m.Dest})
	}
	return out
}

type tarEntry struct {
	name, body, link string
	typ              byte
	mode             int64
}

func makeTarGz(t *testing.T, entries []tarEntry) []byte {
	t.Helper()
	var buf bytes.Buffer
	zw := gzip.NewWriter(&buf)
	tw := tar.NewWriter(zw)
	for _, e := range entries {
		typ := e.typ
		if typ == 0 {
			typ = tar.TypeReg
		}
		mode := e.mode
		if mode == 0 {
			mode = 0o644
		}
		hdr := &tar.Header{Name: e.name, Typeflag: typ, Mode: mode, Linkname: e.link}
		if typ == tar.TypeReg {
			hdr.Size = int64(len(e.body))
		}
		if err := tw.WriteHeader(hdr); err != nil {
			t.Fatal(err)
		}
		if typ == tar.TypeReg {
			io.WriteString(tw, e.body)
		}
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	zw.Close()
	return buf.Bytes()
}

func randomBytes(n int, seed uint64) []byte {
	r := rand.New(rand.NewPCG(seed, seed))
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(r.Uint32())
	}
	return b
}

func newFetcher(t *testing.T, cache string, opts ...httpx.Option) *Fetcher {
	return &Fetcher{
		Client:   httpx.NewClient(append([]httpx.Option{httpx.WithPolicy(fastPolicy(5)), httpx.WithLogger(slog.New(slog.NewTextHandler(io.Discard, nil)))}, opts...)...),
		Root:     confinetest.HostRoot(t),
		CacheDir: cache,
		Log:      slog.New(slog.NewTextHandler(io.Discard, nil)),
	}
}

// fastPolicy retries quickly so the tests do not sleep.
func fastPolicy(attempts int) httpx.Policy {
	return httpx.Policy{Attempts: attempts, Base: time.Millisecond, Max: 2 * time.Millisecond}
}

// snapshot describes every entry under root (type, mode, contents or link
// target) so a test can prove nothing changed.
func snapshot(t *testing.T, root string, skip ...string) map[string]string {
	t.Helper()
	out := map[string]string{}
	filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			t.Fatal(err)
		}
		for _, s := range skip {
			if p == s {
				return filepath.SkipDir
			}
		}
		fi, _ := os.Lstat(p)
		desc := fi.Mode().String()
		switch {
		case fi.Mode()&os.ModeSymlink != 0:
			target, _ := os.Readlink(p)
			desc += " -> " + target
		case fi.Mode().IsRegular():
			b, _ := os.ReadFile(p)
			desc += " " + string(b)
		}
		out[p] = desc
		return nil
	})
	return out
}

func diffSnapshots(before, after map[string]string) []string {
	var diffs []string
	for p, d := range after {
		if before[p] != d {
			diffs = append(diffs, fmt.Sprintf("%s: %q -> %q", p, before[p], d))
		}
	}
	for p := range before {
		if _, ok := after[p]; !ok {
			diffs = append(diffs, p+": removed")
		}
	}
	return diffs
}

// noTempFiles fails if a partial download or staging directory is left.
func noTempFiles(t *testing.T, dirs ...string) {
	t.Helper()
	for _, dir := range dirs {
		ents, _ := os.ReadDir(dir)
		for _, e := range ents {
			if strings.Contains(e.Name(), ".part-") || strings.Contains(e.Name(), "tmp-stage") || strings.Contains(e.Name(), ".tmp-") {
				t.Errorf("temp file left behind: %s", filepath.Join(dir, e.Name()))
			}
		}
	}
}

func TestDownloadUpstreamLayouts(t *testing.T) {
	o := newOrigin(t)
	root := t.TempDir()
	rootfs := filepath.Join(root, "rootfs")
	cache := filepath.Join(root, "cache")
	kubelet := randomBytes(3<<20, 1)
	runc := randomBytes(1<<20, 2)
	containerd := makeTarGz(t, []tarEntry{
		{name: "bin/", typ: tar.TypeDir, mode: 0o755},
		{name: "bin/containerd", body: "containerd-binary", mode: 0o755},
		{name: "bin/containerd-shim-runc-v2", body: "shim-binary", mode: 0o755},
		{name: "bin/ctr", body: "ctr-binary", mode: 0o755},
	})
	crictl := makeTarGz(t, []tarEntry{{name: "crictl", body: "crictl-binary", mode: 0o755}})
	cni := makeTarGz(t, []tarEntry{
		{name: "./", typ: tar.TypeDir, mode: 0o755},
		{name: "./bridge", body: "bridge-plugin", mode: 0o755},
		{name: "./host-local", body: "host-local-plugin", mode: 0o755},
		{name: "./LICENSE", body: "license text"},
	})

	tests := []struct {
		step  plan.Download
		files map[string]string // path under rootfs -> contents ("" = the artifact)
	}{
		{o.publish(t, upstream.Kubelet, "1.37.2", kubelet, rootfs+"/usr/local/bin/kubelet"),
			map[string]string{"/usr/local/bin/kubelet": string(kubelet)}},
		{o.publish(t, upstream.Runc, "1.5.3", runc, rootfs+"/usr/local/bin/runc"),
			map[string]string{"/usr/local/bin/runc": string(runc)}},
		{o.publish(t, upstream.Containerd, "2.4.2", containerd, rootfs+"/usr/local"),
			map[string]string{
				"/usr/local/bin/containerd":              "containerd-binary",
				"/usr/local/bin/containerd-shim-runc-v2": "shim-binary",
				"/usr/local/bin/ctr":                     "ctr-binary",
			}},
		{o.publish(t, upstream.Crictl, "1.37.0", crictl, rootfs+"/usr/local/bin"),
			map[string]string{"/usr/local/bin/crictl": "crictl-binary"}},
		{o.publish(t, upstream.CNIPlugins, "1.10.0", cni, rootfs+"/opt/cni/bin"),
			map[string]string{"/opt/cni/bin/bridge": "bridge-plugin", "/opt/cni/bin/host-local": "host-local-plugin", "/opt/cni/bin/LICENSE": "license text"}},
	}
	f := newFetcher(t, cache)
	for _, tt := range tests {
		t.Run(tt.step.Name, func(t *testing.T) {
			res, err := f.Download(context.Background(), tt.step, confinetest.HostRoot(t), tt.step.Dest)
			if err != nil {
				t.Fatalf("Download: %v", err)
			}
			if !res.Changed || len(res.Files) == 0 {
				t.Errorf("result = %+v, want a change with files", res)
			}
			for p, want := range tt.files {
				got, err := os.ReadFile(rootfs + p)
				if err != nil || string(got) != want {
					t.Errorf("%s: %d bytes (%v), want the published %d bytes", p, len(got), err, len(want))
				}
				fi, _ := os.Stat(rootfs + p)
				if fi != nil && fi.Mode().Perm() != 0o755 {
					t.Errorf("%s: mode %v, want 0755", p, fi.Mode().Perm())
				}
			}
		})
	}
	noTempFiles(t, cache, rootfs+"/usr/local", rootfs+"/usr/local/bin", rootfs+"/opt/cni")

	// A second run finds everything in place from its records and does
	// not touch the network at all.
	before := o.totalHits()
	for _, tt := range tests {
		res, err := f.Download(context.Background(), tt.step, confinetest.HostRoot(t), tt.step.Dest)
		if err != nil {
			t.Fatalf("rerun %s: %v", tt.step.Name, err)
		}
		if res.Changed {
			t.Errorf("rerun %s changed something: %+v", tt.step.Name, res)
		}
	}
	if after := o.totalHits(); after != before {
		t.Errorf("rerun made %d requests, want none", after-before)
	}
}

func TestDownloadIdempotence(t *testing.T) {
	o := newOrigin(t)
	root := t.TempDir()
	cache := filepath.Join(root, "cache")
	body := randomBytes(64<<10, 3)
	step := o.publish(t, upstream.Kubectl, "1.37.2", body, filepath.Join(root, "bin", "kubectl"))
	artifact, _ := url.Parse(step.URL)
	f := newFetcher(t, cache)

	if _, err := f.Download(context.Background(), step, confinetest.HostRoot(t), step.Dest); err != nil {
		t.Fatal(err)
	}
	// Without the record, a Dest already holding the verified digest is
	// recognised after fetching only the checksum.
	recs, _ := filepath.Glob(filepath.Join(cache, "*.nodespawn-download.json"))
	if len(recs) != 1 {
		t.Fatalf("records = %v, want one", recs)
	}
	os.Remove(recs[0])
	res, err := f.Download(context.Background(), step, confinetest.HostRoot(t), step.Dest)
	if err != nil || res.Changed {
		t.Fatalf("Download with Dest in place = %+v, %v; want no change", res, err)
	}
	if n := o.count(artifact.Path); n != 1 {
		t.Errorf("artifact fetched %d times, want 1", n)
	}
	// A drifted mode is fixed without a download.
	os.Chmod(step.Dest, 0o600)
	if res, err := f.Download(context.Background(), step, confinetest.HostRoot(t), step.Dest); err != nil || !res.Changed {
		t.Fatalf("Download with a wrong mode = %+v, %v; want a change", res, err)
	}
	if fi, _ := os.Stat(step.Dest); fi.Mode().Perm() != 0o755 {
		t.Errorf("mode = %v, want 0755", fi.Mode().Perm())
	}
	// A tampered Dest is downloaded again.
	os.WriteFile(step.Dest, []byte("tampered"), 0o755)
	if res, err := f.Download(context.Background(), step, confinetest.HostRoot(t), step.Dest); err != nil || !res.Changed {
		t.Fatalf("Download over a tampered file = %+v, %v; want a change", res, err)
	}
	if got, _ := os.ReadFile(step.Dest); !bytes.Equal(got, body) {
		t.Error("tampered file was not replaced")
	}
	if n := o.count(artifact.Path); n != 2 {
		t.Errorf("artifact fetched %d times, want 2", n)
	}
}

func TestDownloadRemovesLeftoverPartialFiles(t *testing.T) {
	o := newOrigin(t)
	root := t.TempDir()
	cache := filepath.Join(root, "cache")
	body := randomBytes(10000, 4)
	step := o.publish(t, upstream.KubeProxy, "1.37.2", body, filepath.Join(root, "kube-proxy"))
	sum := sha256.Sum256(body)
	os.MkdirAll(cache, 0o700)
	// What a crash mid-download leaves: a partial file of garbage.
	leftover := filepath.Join(cache, hex.EncodeToString(sum[:])+".part-123456")
	os.WriteFile(leftover, []byte("garbage from a crashed run"), 0o600)

	if _, err := newFetcher(t, cache).Download(context.Background(), step, confinetest.HostRoot(t), step.Dest); err != nil {
		t.Fatal(err)
	}
	if got, _ := os.ReadFile(step.Dest); !bytes.Equal(got, body) {
		t.Error("installed file does not match the artifact")
	}
	if _, err := os.Stat(leftover); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("leftover partial file still there (%v)", err)
	}
	noTempFiles(t, cache, root)
}

func TestDownloadFaults(t *testing.T) {
	body := randomBytes(256<<10, 5)
	half := len(body) / 2
	// cutOff sends half the body and then drops the connection.
	cutOff := func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Length", fmt.Sprint(len(body)))
		w.Write(body[:half])
		w.(http.Flusher).Flush()
		panic(http.ErrAbortHandler)
	}
	stall := func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Length", fmt.Sprint(len(body)))
		w.Write(body[:half])
		w.(http.Flusher).Flush()
		<-r.Context().Done()
	}
	tests := []struct {
		name  string
		fault func(w http.ResponseWriter, r *http.Request, n int) bool
		// wantErr empty means the download must recover.
		wantErr    string
		wantStall  bool
		wantRanges int
	}{
		{name: "reset mid-body resumes with Range", fault: func(w http.ResponseWriter, r *http.Request, n int) bool {
			if n == 1 {
				cutOff(w, r)
				return true
			}
			return false
		}, wantRanges: 1},
		{name: "500 twice then ok", fault: func(w http.ResponseWriter, r *http.Request, n int) bool {
			if n <= 2 {
				http.Error(w, "overloaded", http.StatusInternalServerError)
				return true
			}
			return false
		}},
		{name: "stall then resume", fault: func(w http.ResponseWriter, r *http.Request, n int) bool {
			if n == 1 {
				stall(w, r)
				return true
			}
			return false
		}, wantRanges: 1},
		{name: "server ignores Range and restarts", fault: func(w http.ResponseWriter, r *http.Request, n int) bool {
			if n == 1 {
				cutOff(w, r)
				return true
			}
			w.Write(body) // 200 with the whole file despite the Range header
			return true
		}, wantRanges: 1},
		{name: "stalls every time", fault: func(w http.ResponseWriter, r *http.Request, n int) bool {
			stall(w, r)
			return true
		}, wantErr: "no data for", wantStall: true, wantRanges: 2},
		{name: "404 fails at once", fault: func(w http.ResponseWriter, r *http.Request, n int) bool {
			http.NotFound(w, r)
			return true
		}, wantErr: "404 Not Found"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			o := newOrigin(t)
			root := t.TempDir()
			cache := filepath.Join(root, "cache")
			step := o.publish(t, upstream.Kubelet, "1.37.2", body, filepath.Join(root, "bin", "kubelet"))
			u, _ := url.Parse(step.URL)
			o.fault[u.Path] = tt.fault
			f := newFetcher(t, cache, httpx.WithStallTimeout(300*time.Millisecond), httpx.WithPolicy(fastPolicy(3)))

			_, err := f.Download(context.Background(), step, confinetest.HostRoot(t), step.Dest)
			if tt.wantErr == "" {
				if err != nil {
					t.Fatalf("Download: %v", err)
				}
				if got, _ := os.ReadFile(step.Dest); !bytes.Equal(got, body) {
					t.Error("installed file does not match the artifact")
				}
			} else {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) || !strings.Contains(err.Error(), step.URL) {
					t.Fatalf("Download error = %v, want one naming %s and %q", err, step.URL, tt.wantErr)
				}
				if tt.wantStall && !errors.Is(err, httpx.ErrStalled) {
					t.Errorf("error %v does not wrap httpx.ErrStalled", err)
				}
				if _, err := os.Stat(step.Dest); !errors.Is(err, os.ErrNotExist) {
					t.Errorf("a failed download installed %s", step.Dest)
				}
			}
			if len(o.ranges) != tt.wantRanges {
				t.Errorf("Range requests = %q, want %d", o.ranges, tt.wantRanges)
			}
			for _, rg := range o.ranges {
				if rg != fmt.Sprintf("bytes=%d-", half) {
					t.Errorf("Range = %q, want bytes=%d-", rg, half)
				}
			}
			noTempFiles(t, cache, filepath.Join(root, "bin"))
		})
	}
}

func TestDownloadChecksumMismatch(t *testing.T) {
	body := randomBytes(4096, 6)
	tests := []struct {
		name string
		// tamper changes the published step or server so the digest cannot match.
		tamper func(o *origin, step *plan.Download, art []byte) (expected string)
	}{
		{name: "checksum file lists another digest", tamper: func(o *origin, step *plan.Download, art []byte) string {
			cu, _ := url.Parse(step.ChecksumURL)
			wrong := sha256.Sum256([]byte("something else"))
			o.put(cu.Path, []byte(hex.EncodeToString(wrong[:])))
			return hex.EncodeToString(wrong[:])
		}},
		{name: "pinned digest is wrong", tamper: func(o *origin, step *plan.Download, art []byte) string {
			wrong := sha256.Sum256([]byte("pinned elsewhere"))
			step.SHA256 = strings.ToUpper(hex.EncodeToString(wrong[:]))
			return hex.EncodeToString(wrong[:])
		}},
		{name: "mirror serves other bytes", tamper: func(o *origin, step *plan.Download, art []byte) string {
			u, _ := url.Parse(step.URL)
			good := sha256.Sum256(art)
			o.put(u.Path, append([]byte("evil"), art...))
			return hex.EncodeToString(good[:])
		}},
	}
	for _, tt := range tests {
		for _, archive := range []bool{false, true} {
			t.Run(fmt.Sprintf("%s/archive=%v", tt.name, archive), func(t *testing.T) {
				o := newOrigin(t)
				root := t.TempDir()
				cache := filepath.Join(root, "cache")
				var step plan.Download
				if archive {
					art := makeTarGz(t, []tarEntry{{name: "bridge", body: "plugin"}})
					step = o.publish(t, upstream.CNIPlugins, "1.10.0", art, filepath.Join(root, "rootfs", "opt", "cni", "bin"))
				} else {
					step = o.publish(t, upstream.Kubelet, "1.37.2", body, filepath.Join(root, "rootfs", "kubelet"))
				}
				os.MkdirAll(filepath.Join(root, "rootfs"), 0o755)
				os.WriteFile(filepath.Join(root, "rootfs", "existing"), []byte("keep"), 0o644)
				u, _ := url.Parse(step.URL)
				expected := tt.tamper(o, &step, o.files[u.Path])
				before := snapshot(t, root, cache)

				_, err := newFetcher(t, cache).Download(context.Background(), step, confinetest.HostRoot(t), step.Dest)
				if err == nil {
					t.Fatal("Download succeeded with a wrong digest")
				}
				msg := err.Error()
				if !strings.Contains(msg, "sha256 mismatch") || !strings.Contains(msg, step.URL) || !strings.Contains(msg, expected) {
					t.Errorf("error %q must name the URL and the expected digest %s", msg, expected)
				}
				served := o.files[u.Path]
				actual := sha256.Sum256(served)
				if !strings.Contains(msg, hex.EncodeToString(actual[:])) {
					t.Errorf("error %q must name the actual digest %x", msg, actual)
				}
				if d := diffSnapshots(before, snapshot(t, root, cache)); len(d) > 0 {
					t.Errorf("a failed download changed files: %v", d)
				}
				noTempFiles(t, cache)
				if ents, _ := os.ReadDir(cache); len(ents) != 0 {
					t.Errorf("cache holds %d entries after a mismatch, want none", len(ents))
				}
			})
		}
	}
}

func TestParseChecksum(t *testing.T) {
	const a = "2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae"
	const b = "fcde2b2edba56bf408601fb721fe9b5c338d10ee429ea04fae5511b68fbf8fb9"
	tests := []struct {
		name, data, file, want, wantErr string
	}{
		{name: "bare hex", data: a, file: "kubelet", want: a},
		{name: "bare hex with newline", data: a + "\n", file: "kubelet", want: a},
		{name: "uppercase", data: strings.ToUpper(a), file: "kubelet", want: a},
		{name: "sha256sum one line", data: a + "  cni-plugins-linux-amd64-v1.10.0.tgz\n", file: "cni-plugins-linux-amd64-v1.10.0.tgz", want: a},
		{name: "binary mode marker", data: a + " *crictl-v1.37.0-linux-amd64.tar.gz\n", file: "crictl-v1.37.0-linux-amd64.tar.gz", want: a},
		{name: "several lines", data: b + "  runc.arm64\n" + a + "  runc.amd64\n", file: "runc.amd64", want: a},
		{name: "path prefix", data: a + "  ./bin/runc.amd64\n", file: "runc.amd64", want: a},
		{name: "no entry for the file", data: b + "  runc.arm64\n", file: "runc.amd64", wantErr: "no sha256 listed for runc.amd64"},
		{name: "empty", data: "\n", file: "kubelet", wantErr: "no sha256"},
		{name: "not hex", data: "<html>", file: "kubelet", wantErr: "not a sha256"}, {name: "bad hex on the matching line", data: "xyz  kubelet\n", file: "kubelet", wantErr: "not a sha256"},
		{name: "ambiguous bare lines", data: a + "\n" + b + "\n", file: "kubelet", wantErr: "cannot tell"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := parseChecksum(tt.data, tt.file)
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("error = %v, want %q", err, tt.wantErr)
				}
				return
			}
			if err != nil || got.Encoded() != tt.want {
				t.Fatalf("parseChecksum = %q, %v; want %q", got, err, tt.want)
			}
		})
	}
}

// TestConcurrentDownloadsShareOneProgress runs several downloads at once
// through one Fetcher and one Progress (run with -race).
func TestConcurrentDownloadsShareOneProgress(t *testing.T) {
	o := newOrigin(t)
	root := t.TempDir()
	var logs syncBuffer
	f := newFetcher(t, filepath.Join(root, "cache"))
	f.Progress = progress.New(io.Discard, slog.New(slog.NewTextHandler(&logs, nil)))
	components := []string{upstream.Kubelet, upstream.Kubectl, upstream.KubeProxy, upstream.Runc}
	var steps []plan.Download
	for i, c := range components {
		steps = append(steps, o.publish(t, c, "1.5.3", randomBytes(512<<10, uint64(10+i)), filepath.Join(root, "bin", c)))
	}
	var wg sync.WaitGroup
	errs := make([]error, len(steps))
	for i, s := range steps {
		wg.Go(func() { _, errs[i] = f.Download(context.Background(), s, confinetest.HostRoot(t), s.Dest) })
	}
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Errorf("%s: %v", steps[i].Name, err)
		}
	}
	for _, c := range components {
		line := fmt.Sprintf("msg=downloaded name=%s bytes=%d total=%d", c, 512<<10, 512<<10)
		if n := strings.Count(logs.String(), line); n != 1 {
			t.Errorf("%d lines with %q, want 1; logs:\n%s", n, line, logs.String())
		}
	}
}

type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

func TestDownloadErrorsRedactURLSecrets(t *testing.T) {
	o := newOrigin(t)
	root := t.TempDir()
	for _, step := range []plan.Download{
		{Name: "x", URL: o.srv.URL + "/missing?token=s3cret", SHA256: strings.Repeat("a", 64), Dest: filepath.Join(root, "x")},
		{Name: "y", URL: o.srv.URL + "/y", ChecksumURL: o.srv.URL + "/missing.sha256?token=s3cret", Dest: filepath.Join(root, "y")},
		{Name: "z", URL: "http://user:s3cret@127.0.0.1:1/z?token=s3cret", SHA256: strings.Repeat("a", 64), Dest: filepath.Join(root, "z")},
	} {
		f := newFetcher(t, filepath.Join(root, "cache"), httpx.WithPolicy(fastPolicy(1)))
		_, err := f.Download(context.Background(), step, confinetest.HostRoot(t), step.Dest)
		if err == nil {
			t.Fatalf("%s: Download succeeded", step.Name)
		}
		if strings.Contains(err.Error(), "s3cret") {
			t.Errorf("%s: error leaks a secret: %v", step.Name, err)
		}
		if !strings.Contains(err.Error(), "127.0.0.1") {
			t.Errorf("%s: error %v does not name the server", step.Name, err)
		}
	}
}

// TestRecordKeepsNoURLSecret: the install record in the cache names the
// URLs without their queries (signed URLs) and still makes a rerun a no-op.
func TestRecordKeepsNoURLSecret(t *testing.T) {
	o := newOrigin(t)
	root := t.TempDir()
	cache := filepath.Join(root, "cache")
	step := o.publish(t, upstream.Kubectl, "1.37.2", randomBytes(4<<10, 5), filepath.Join(root, "bin", "kubectl"))
	step.URL += "?X-Amz-Signature=s3cret"
	step.ChecksumURL += "?X-Amz-Signature=s3cret"
	f := newFetcher(t, cache)
	for i, changed := range []bool{true, false} {
		res, err := f.Download(context.Background(), step, confinetest.HostRoot(t), step.Dest)
		if err != nil || res.Changed != changed {
			t.Fatalf("run %d: %+v, %v; want changed %t", i, res, err, changed)
		}
	}
	recs, _ := filepath.Glob(filepath.Join(cache, "*"+RecordSuffix))
	if len(recs) != 1 {
		t.Fatalf("records = %v, want one", recs)
	}
	b, err := os.ReadFile(recs[0])
	if err != nil || strings.Contains(string(b), "s3cret") || !strings.Contains(string(b), `?\u003credacted\u003e`) {
		t.Errorf("record %s: %v\n%s", recs[0], err, b)
	}
}

// TestFetchThenInstall checks the split apply uses to download early: Fetch
// verifies into the cache without touching Dest, a rerun of Fetch reuses the
// verified artifact, and Install moves it into place.
func TestFetchThenInstall(t *testing.T) {
	o := newOrigin(t)
	root := t.TempDir()
	cache := filepath.Join(root, "cache")
	body := randomBytes(100<<10, 7)
	step := o.publish(t, upstream.Runc, "1.5.3", body, filepath.Join(root, "rootfs", "usr", "local", "bin", "runc"))
	artifact, _ := url.Parse(step.URL)

	if _, err := newFetcher(t, cache).Fetch(context.Background(), step, confinetest.HostRoot(t), step.Dest); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(root, "rootfs")); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("Fetch touched the destination tree (%v)", err)
	}
	// A new run (the first died before installing) reuses the verified file.
	s, err := newFetcher(t, cache).Fetch(context.Background(), step, confinetest.HostRoot(t), step.Dest)
	if err != nil {
		t.Fatal(err)
	}
	if n := o.count(artifact.Path); n != 1 {
		t.Errorf("artifact fetched %d times, want 1", n)
	}
	res, err := s.Install(context.Background(), confinetest.HostRoot(t), step.Dest)
	if err != nil {
		t.Fatal(err)
	}
	if got, _ := os.ReadFile(step.Dest); !bytes.Equal(got, body) || !res.Changed || res.Size != int64(len(body)) {
		t.Errorf("Install result %+v; installed file matches: %v", res, bytes.Equal(got, body))
	}
	sum := sha256.Sum256(body)
	if _, err := os.Stat(filepath.Join(cache, hex.EncodeToString(sum[:]))); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("cached artifact kept after install (%v)", err)
	}
}

func TestDownloadRestartsWhenRangeIsRefused(t *testing.T) {
	o := newOrigin(t)
	root := t.TempDir()
	body := randomBytes(64<<10, 8)
	step := o.publish(t, upstream.Kubelet, "1.37.2", body, filepath.Join(root, "kubelet"))
	u, _ := url.Parse(step.URL)
	o.fault[u.Path] = func(w http.ResponseWriter, r *http.Request, n int) bool {
		switch n {
		case 1:
			w.Header().Set("Content-Length", fmt.Sprint(len(body)))
			w.Write(body[:1000])
			w.(http.Flusher).Flush()
			panic(http.ErrAbortHandler)
		case 2:
			http.Error(w, "no ranges here", http.StatusRequestedRangeNotSatisfiable)
			return true
		}
		return false
	}
	if _, err := newFetcher(t, filepath.Join(root, "cache")).Download(context.Background(), step, confinetest.HostRoot(t), step.Dest); err != nil {
		t.Fatal(err)
	}
	if got, _ := os.ReadFile(step.Dest); !bytes.Equal(got, body) {
		t.Error("installed file does not match the artifact")
	}
	if want := []string{"bytes=1000-"}; fmt.Sprint(o.ranges) != fmt.Sprint(want) {
		t.Errorf("Range requests = %q, want %q (then a plain GET)", o.ranges, want)
	}
}

// TestInstallRechecksTheCache changes the verified artifact in the cache
// between Fetch and Install: Install must refuse it, name both digests
// and install nothing.
func TestInstallRechecksTheCache(t *testing.T) {
	for _, archive := range []bool{false, true} {
		t.Run(fmt.Sprintf("archive=%v", archive), func(t *testing.T) {
			o := newOrigin(t)
			root := t.TempDir()
			cache := filepath.Join(root, "cache")
			var step plan.Download
			if archive {
				art := makeTarGz(t, []tarEntry{{name: "bridge", body: "plugin"}})
				step = o.publish(t, upstream.CNIPlugins, "1.10.0", art, filepath.Join(root, "rootfs", "opt", "cni", "bin"))
			} else {
				step = o.publish(t, upstream.Runc, "1.5.3", randomBytes(8<<10, 9), filepath.Join(root, "rootfs", "runc"))
			}
			u, _ := url.Parse(step.URL)
			want := digest.FromBytes(o.files[u.Path])
			f := newFetcher(t, cache)
			s, err := f.Fetch(context.Background(), step, confinetest.HostRoot(t), step.Dest)
			if err != nil {
				t.Fatal(err)
			}
			blob := filepath.Join(cache, want.Encoded())
			b, err := os.ReadFile(blob)
			if err != nil {
				t.Fatal(err)
			}
			b[len(b)/2] ^= 1
			if err := os.WriteFile(blob, b, 0o600); err != nil {
				t.Fatal(err)
			}
			_, err = s.Install(context.Background(), confinetest.HostRoot(t), step.Dest)
			if err == nil {
				t.Fatal("Install took an artifact changed in the cache")
			}
			for _, d := range []digest.Digest{want, digest.FromBytes(b)} {
				if !strings.Contains(err.Error(), d.String()) {
					t.Errorf("error %q does not name %s", err, d)
				}
			}
			if _, err := os.Lstat(step.Dest); !errors.Is(err, os.ErrNotExist) {
				t.Errorf("something was installed at %s (%v)", step.Dest, err)
			}
		})
	}
}

// TestCancelledDownloadLeavesTheCauseToItsOwner: a download stopped because
// another step failed says "cancelled" on its progress line; the other
// step's error is printed once, by whoever reports that step.
func TestCancelledDownloadLeavesTheCauseToItsOwner(t *testing.T) {
	o := newOrigin(t)
	root := t.TempDir()
	var logs syncBuffer
	f := newFetcher(t, filepath.Join(root, "cache"))
	f.Progress = progress.New(io.Discard, slog.New(slog.NewTextHandler(&logs, nil)))
	step := o.publish(t, upstream.Runc, "1.5.3", randomBytes(64<<10, 3), filepath.Join(root, "bin", "runc"))
	ctx, cancel := context.WithCancelCause(context.Background())
	cause := errors.New("step rootfs:download:kubelet failed: sha256 mismatch 52e1390e")
	u, _ := url.Parse(step.URL)
	// The sibling fails while runc's body is on the wire.
	o.mu.Lock()
	o.fault[u.Path] = func(w http.ResponseWriter, r *http.Request, _ int) bool {
		w.Header().Set("Content-Length", strconv.Itoa(64<<10))
		w.Write(make([]byte, 1<<10))
		w.(http.Flusher).Flush()
		cancel(cause)
		<-r.Context().Done()
		return true
	}
	o.mu.Unlock()
	_, err := f.Download(ctx, step, confinetest.HostRoot(t), step.Dest)
	if err == nil {
		t.Fatal("a cancelled download succeeded")
	}
	out := logs.String()
	if !strings.Contains(out, "msg=\"download failed\" name=runc") || !strings.Contains(out, "error=cancelled") {
		t.Errorf("no cancelled progress line for runc:\n%s", out)
	}
	if strings.Contains(out, "52e1390e") {
		t.Errorf("the progress line repeats another step's error:\n%s", out)
	}
}
