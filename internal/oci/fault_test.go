package oci

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/nodespawn/nodespawn/internal/confine/confinetest"
	"github.com/nodespawn/nodespawn/internal/httpx"
	"github.com/nodespawn/nodespawn/internal/registrytest"
	"github.com/nodespawn/nodespawn/internal/rootfs/rootfstest"
)

// randomLayer is a gzip layer holding size bytes of incompressible data,
// so a fault injected half-way through the blob is really mid-stream.
func randomLayer(t testing.TB, seed uint64, name string, size int) layer {
	t.Helper()
	b := make([]byte, size)
	r := rand.New(rand.NewPCG(seed, seed))
	for i := range b {
		b[i] = byte(r.Uint32())
	}
	return gzLayer(t, file(name, string(b), 0o644))
}

// serveBroken answers a blob GET itself: the registry's status and headers
// (honouring Range, and with Accept-Ranges so the client may resume with a
// Range request), the first half of the body, and then either a TCP reset or a stall until the client gives up.
func serveBroken(t testing.TB, w http.ResponseWriter, r *http.Request, upstream, how string) {
	up, err := http.NewRequest(http.MethodGet, "http://"+upstream+r.URL.Path, nil)
	if err != nil {
		t.Errorf("proxy request: %v", err)
		return
	}
	up.Header.Set("Range", r.Header.Get("Range"))
	resp, err := http.DefaultClient.Do(up)
	if err != nil {
		t.Errorf("proxy fetch upstream: %v", err)
		return
	}
	body, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	if err != nil {
		t.Errorf("proxy read upstream: %v", err)
		return
	}
	conn, bufrw, err := w.(http.Hijacker).Hijack()
	if err != nil {
		t.Errorf("hijack: %v", err)
		return
	}
	defer conn.Close()
	status := resp.Status
	if cr := resp.Header.Get("Content-Range"); cr != "" {
		status += "\r\nContent-Range: " + cr
	}
	fmt.Fprintf(bufrw, "HTTP/1.1 %s\r\nContent-Type: application/octet-stream\r\nContent-Length: %d\r\nAccept-Ranges: bytes\r\nDocker-Content-Digest: %s\r\n\r\n",
		status, len(body), resp.Header.Get("Docker-Content-Digest"))
	bufrw.Write(body[:len(body)/2])
	bufrw.Flush()
	switch how {
	case "reset":
		conn.(*net.TCPConn).SetLinger(0)
	case "stall":
		// Hold the connection open, sending nothing, until the client
		// drops it (or a generous bound passes).
		conn.SetReadDeadline(time.Now().Add(30 * time.Second))
		io.Copy(io.Discard, conn)
	}
}

// faultClient retries fast and notices a stall quickly.
func faultClient() *http.Client {
	return httpx.NewClient(httpx.WithPolicy(httpx.Policy{Attempts: 3, Base: 10 * time.Millisecond, Max: 50 * time.Millisecond}),
		httpx.WithStallTimeout(300*time.Millisecond))
}

func TestPullFaults(t *testing.T) {
	requireRoot(t)
	ctx := context.Background()
	reg := registrytest.Start(t)
	repo := pushRepo(t, reg.Addr, "nodespawn/faults")
	layers := []layer{
		randomLayer(t, 1, "one", 1<<20),
		randomLayer(t, 2, "two", 1<<20),
		randomLayer(t, 3, "three", 1<<20),
	}
	good := pushImage(t, ctx, repo, "good", imageSpec{platform: linuxAMD64, layers: layers})
	target := "/v2/nodespawn/faults/blobs/" + fetchManifest(t, ctx, repo, good).Layers[1].Digest.String()
	px := startProxy(t, reg.Addr)

	type faultFn = func(w http.ResponseWriter, r *http.Request, n int) bool
	cases := []struct {
		name    string
		fault   faultFn
		recover bool
		// wantErr is part of the error of a case that must fail.
		wantErr string
		// wantRange: a retry resumed with a Range request.
		wantRange bool
	}{
		{name: "two 500s then success", recover: true, fault: func(w http.ResponseWriter, r *http.Request, n int) bool {
			if r.URL.Path == target && n <= 2 {
				http.Error(w, "boom", http.StatusInternalServerError)
				return true
			}
			return false
		}},
		{name: "always 500", wantErr: "500", fault: func(w http.ResponseWriter, r *http.Request, n int) bool {
			if r.URL.Path == target {
				http.Error(w, "boom", http.StatusInternalServerError)
				return true
			}
			return false
		}},
		{name: "reset mid-blob once", recover: true, wantRange: true, fault: func(w http.ResponseWriter, r *http.Request, n int) bool {
			if r.URL.Path == target && n == 1 {
				serveBroken(t, w, r, reg.Addr, "reset")
				return true
			}
			return false
		}},
		{name: "reset mid-blob every time", wantErr: "attempt 3 of 3", fault: func(w http.ResponseWriter, r *http.Request, n int) bool {
			if r.URL.Path == target {
				serveBroken(t, w, r, reg.Addr, "reset")
				return true
			}
			return false
		}},
		{name: "stall mid-blob once", recover: true, wantRange: true, fault: func(w http.ResponseWriter, r *http.Request, n int) bool {
			if r.URL.Path == target && n == 1 {
				serveBroken(t, w, r, reg.Addr, "stall")
				return true
			}
			return false
		}},
		{name: "manifest answers 503 twice", recover: true, fault: func(w http.ResponseWriter, r *http.Request, n int) bool {
			if strings.Contains(r.URL.Path, "/manifests/") && n <= 2 {
				http.Error(w, "busy", http.StatusServiceUnavailable)
				return true
			}
			return false
		}},
	}
	for i, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			var mu sync.Mutex
			var ranges []string
			// Each case gets fresh counters through a path-unique proxy state.
			px.mu.Lock()
			px.seen = map[string]int{}
			px.mu.Unlock()
			px.setFault(func(w http.ResponseWriter, r *http.Request, n int) bool {
				if r.URL.Path == target {
					mu.Lock()
					ranges = append(ranges, r.Header.Get("Range"))
					mu.Unlock()
				}
				return c.fault(w, r, n)
			})
			defer px.setFault(nil)
			parent := rootfstest.MachinesDir(t)
			dest := filepath.Join(parent, fmt.Sprintf("m%d", i))
			res, err := Pull(ctx, Request{Reference: px.addr + "/nodespawn/faults:good", Platform: "linux/amd64",
				PlainHTTP: []string{px.addr}, Root: confinetest.HostRoot(t), Dest: dest, Log: testLogger(t), HTTPClient: faultClient()})
			t.Logf("pull: %v; requests for the target blob had Range %q", err, ranges)
			if c.recover {
				if err != nil {
					t.Fatalf("Pull did not recover: %v", err)
				}
				if res.ManifestDigest != good.Digest {
					t.Errorf("manifest %s, want %s", res.ManifestDigest, good.Digest)
				}
				if b, err := os.ReadFile(filepath.Join(dest, "two")); err != nil || len(b) != 1<<20 {
					t.Errorf("layer two's file: %d bytes, %v", len(b), err)
				}
				// oras-go opens the blob again, then seeks: the resumed
				// transfer is a Range request.
				if c.wantRange && !strings.HasPrefix(ranges[len(ranges)-1], "bytes=") {
					t.Errorf("the retry did not resume with a Range request: %q", ranges)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), c.wantErr) || !strings.Contains(err.Error(), strings.TrimPrefix(target, "/v2/nodespawn/faults/blobs/")) {
				t.Fatalf("err = %v, want it to name the blob and contain %q", err, c.wantErr)
			}
			rootfstest.AssertOnly(t, parent)
		})
	}
}

// TestPullTampered covers content that does not match what the manifest
// and config promise: the old rootfs must stay, marker and all.
func TestPullTampered(t *testing.T) {
	requireRoot(t)
	ctx := context.Background()
	reg := registrytest.Start(t)
	repo := pushRepo(t, reg.Addr, "nodespawn/tamper")
	pushImage(t, ctx, repo, "old", imageSpec{platform: linuxAMD64, layers: []layer{gzLayer(t, file("version", "old", 0o644))}})

	// An uncompressed layer with a flipped byte in the registry's storage.
	plain := compressLayer(t, ocispec.MediaTypeImageLayer, mkTar(t, file("version", "tampered", 0o644)))
	pushImage(t, ctx, repo, "tampered", imageSpec{platform: linuxAMD64, layers: []layer{gzLayer(t, file("base", "b", 0o644)), plain}})
	blob := reg.BlobPath(digest.FromBytes(plain.blob))
	b, err := os.ReadFile(blob)
	if err != nil {
		t.Fatalf("read stored blob: %v", err)
	}
	at := bytes.Index(b, []byte("tampered"))
	if at < 0 {
		t.Fatal("file content not found in the stored blob")
	}
	b[at] ^= 0x20 // same size, still a valid tar: only the digest tells
	if err := os.WriteFile(blob, b, 0o644); err != nil {
		t.Fatal(err)
	}

	l := gzLayer(t, file("version", "lying", 0o644))
	pushImage(t, ctx, repo, "wrong-diffid", imageSpec{platform: linuxAMD64, layers: []layer{l}, diffIDs: []digest.Digest{digest.FromString("something else")}})
	pushImage(t, ctx, repo, "short-diffids", imageSpec{platform: linuxAMD64, layers: []layer{l, l}, diffIDs: []digest.Digest{l.diffID}})

	for _, c := range []struct{ tag, want string }{
		{"tampered", "digest mismatch: expected " + digest.FromBytes(plain.blob).String() + ", got " + digest.FromBytes(b).String()},
		{"wrong-diffid", "says diff_id " + digest.FromString("something else").String()},
		{"short-diffids", "lists 1 diff_ids for 2 layers"},
	} {
		t.Run(c.tag, func(t *testing.T) {
			parent := rootfstest.MachinesDir(t)
			dest := filepath.Join(parent, "m")
			req := Request{Reference: reg.Addr + "/nodespawn/tamper:old", Platform: "linux/amd64",
				PlainHTTP: []string{reg.Addr}, Root: confinetest.HostRoot(t), Dest: dest, Log: testLogger(t)}
			if _, err := Pull(ctx, req); err != nil {
				t.Fatal(err)
			}
			marker, _ := os.ReadFile(filepath.Join(parent, ".m.nodespawn-image"))
			req.Reference = reg.Addr + "/nodespawn/tamper:" + c.tag
			_, err := Pull(ctx, req)
			if err == nil || !strings.Contains(err.Error(), c.want) {
				t.Fatalf("err = %v, want it to contain %q", err, c.want)
			}
			rootfstest.AssertOnly(t, parent, ".m.nodespawn-image", "m")
			if v, _ := os.ReadFile(filepath.Join(dest, "version")); string(v) != "old" {
				t.Errorf("version = %q after a failed pull, want the old rootfs kept", v)
			}
			if after, _ := os.ReadFile(filepath.Join(parent, ".m.nodespawn-image")); !bytes.Equal(after, marker) {
				t.Errorf("marker changed by a failed pull:\n%s\n=>\n%s", marker, after)
			}
		})
	}
}
