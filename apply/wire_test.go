package apply_test

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"context"
	"crypto/sha512"
	"encoding/hex"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"

	. "github.com/nodespawn/nodespawn/apply"
	"github.com/nodespawn/nodespawn/internal/applytest"
	"github.com/nodespawn/nodespawn/internal/httpx"
	"github.com/nodespawn/nodespawn/plan"
	"github.com/nodespawn/nodespawn/state"
)

func gzipped(t *testing.T, b []byte) []byte {
	var buf bytes.Buffer
	zw := gzip.NewWriter(&buf)
	zw.Write(b)
	applytest.Must(t, zw.Close())
	return buf.Bytes()
}

func tarGz(t *testing.T, files map[string]string) []byte {
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for name, c := range files {
		applytest.Must(t, tw.WriteHeader(&tar.Header{Name: name, Mode: 0o755, Size: int64(len(c)), Typeflag: tar.TypeReg}))
		tw.Write([]byte(c))
	}
	applytest.Must(t, tw.Close())
	return gzipped(t, buf.Bytes())
}

// TestDefaultDepsOnLoopback runs downloads and a remote file through the
// real downloader against a real HTTP server on loopback, under a root
// that is not "/" (so host and systemd steps are skipped).
func TestDefaultDepsOnLoopback(t *testing.T) {
	const remote = "[Service]\nEnvironment=FROM_REMOTE=1\n"
	kubelet := []byte("\x7fELF kubelet v1.37.2")
	cni := tarGz(t, map[string]string{"./bridge": "bridge v1.10.0", "./loopback": "loopback v1.10.0"})
	var hits atomic.Int32
	mux := http.NewServeMux()
	serve := func(path string, body []byte) {
		mux.HandleFunc(path, func(w http.ResponseWriter, r *http.Request) {
			hits.Add(1)
			w.Write(body)
		})
	}
	serve("/kubelet", kubelet)
	serve("/cni.tgz", cni)
	serve("/extra.conf.gz", gzipped(t, []byte(remote)))
	srv := httptest.NewServer(mux)
	defer srv.Close()

	sum512 := sha512.Sum512([]byte(remote))
	p := &plan.Plan{Version: plan.Version, Machine: applytest.Machine, Rootfs: applytest.Rootfs, Steps: []plan.Step{
		{ID: "host:modules", Phase: plan.PhaseHost, Kind: plan.KindModules, Modules: &plan.Modules{Names: []string{"overlay"}}},
		{ID: "rootfs:download:kubelet", Phase: plan.PhaseRootfs, Kind: plan.KindDownload, Download: &plan.Download{
			Name: "kubelet", URL: srv.URL + "/kubelet", SHA256: applytest.SHA256Hex(string(kubelet)), Dest: applytest.RootfsPath("/usr/local/bin/kubelet"), Mode: 0o755}},
		{ID: "rootfs:download:cni", Phase: plan.PhaseRootfs, Kind: plan.KindDownload, Download: &plan.Download{
			Name: "cni", URL: srv.URL + "/cni.tgz", SHA256: applytest.SHA256Hex(string(cni)), Dest: applytest.RootfsPath("/opt/cni/bin"), Mode: 0o755, Archive: "tar.gz"}},
		{ID: "machine:file:remote", Phase: plan.PhaseMachine, Kind: plan.KindFile, File: &plan.File{
			Path: applytest.RootfsPath("/etc/systemd/system/kubelet.service.d/20-remote.conf"), Mode: 0o644, Overwrite: true,
			Source: &plan.Source{URL: srv.URL + "/extra.conf.gz", Compression: "gzip", Hash: "sha512-" + hex.EncodeToString(sum512[:])}}},
	}}
	root := t.TempDir()
	// No image step: the rootfs is there already.
	applytest.Must(t, os.MkdirAll(filepath.Join(root, applytest.Rootfs), 0o755))
	log := slog.New(slog.DiscardHandler)
	deps, err := DefaultDeps(root, log)
	applytest.Must(t, err)
	opts := Options{Root: root, ManifestDigest: applytest.Digest, Deps: deps, Log: log}
	res, err := applytest.Run(context.Background(), p, opts)
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]string{
		"/usr/local/bin/kubelet":                               string(kubelet),
		"/opt/cni/bin/bridge":                                  "bridge v1.10.0",
		"/opt/cni/bin/loopback":                                "loopback v1.10.0",
		"/etc/systemd/system/kubelet.service.d/20-remote.conf": remote,
	}
	for p, c := range want {
		b, err := os.ReadFile(filepath.Join(root, applytest.RootfsPath(p)))
		if err != nil || string(b) != c {
			t.Errorf("%s = %q, %v; want %q", p, b, err, c)
		}
	}
	if o := res.Record.Steps[0]; o.Outcome != state.OutcomeSkipped {
		t.Errorf("host step with root %s: %s, want skipped", root, o.Outcome)
	}

	// A forced rerun finds everything in place without asking the server.
	before := hits.Load()
	opts.Force = true
	res, err = applytest.Run(context.Background(), p, opts)
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range res.Record.Steps[1:] {
		if s.Outcome != state.OutcomeUnchanged {
			t.Errorf("rerun: step %s %s %s", s.ID, s.Outcome, s.Error)
		}
	}
	if n := hits.Load() - before; n != 0 {
		t.Errorf("rerun made %d requests, want none", n)
	}
}

// TestContentsErrorsRedactURLSecrets fetches remote file contents that
// fail, from URLs carrying secrets: the errors name the server, never the
// secret.
func TestContentsErrorsRedactURLSecrets(t *testing.T) {
	srv := httptest.NewServer(http.NotFoundHandler())
	defer srv.Close()
	d := ContentsDownloader(httpx.NewClient(httpx.WithPolicy(httpx.Policy{Attempts: 1}), httpx.WithLogger(slog.New(slog.DiscardHandler))))
	for _, u := range []string{
		srv.URL + "/missing?token=s3cret",
		"http://user:s3cret@127.0.0.1:1/refused?token=s3cret",
	} {
		_, err := d.Contents(context.Background(), &plan.Source{URL: u})
		if err == nil {
			t.Fatalf("Contents(%s) succeeded", u)
		}
		if strings.Contains(err.Error(), "s3cret") || !strings.Contains(err.Error(), "127.0.0.1") {
			t.Errorf("error %q must name the server and not the secret", err)
		}
	}
}
