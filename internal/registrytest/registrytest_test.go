package registrytest

import (
	"bytes"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
)

// TestStartServesAndStops: the registry takes a blob (a monolithic
// upload), keeps it where BlobPath says, and is gone after Close.
func TestStartServesAndStops(t *testing.T) {
	r := Start(t)
	body := []byte("registrytest blob\n")
	d := digest.FromBytes(body)
	// A monolithic upload: POST starts it, PUT with the digest ends it.
	resp, err := http.Post("http://"+r.Addr+"/v2/registrytest/blobs/uploads/", "", nil)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	loc, err := resp.Location()
	if resp.StatusCode != http.StatusAccepted || err != nil {
		t.Fatalf("start a blob upload: %s (%v), want 202 Accepted and a Location", resp.Status, err)
	}
	q := loc.Query()
	q.Set("digest", d.String())
	loc.RawQuery = q.Encode()
	req, err := http.NewRequest(http.MethodPut, loc.String(), bytes.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	if resp, err = http.DefaultClient.Do(req); err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusCreated {
		t.Fatalf("finish the blob upload: %s, want 201 Created", resp.Status)
	}
	got, err := os.ReadFile(r.BlobPath(d))
	if err != nil || !bytes.Equal(got, body) {
		t.Errorf("BlobPath(%s): %q, %v; want the uploaded bytes", d, got, err)
	}
	r.Close()
	if c, err := net.DialTimeout("tcp", r.Addr, time.Second); err == nil {
		c.Close()
		t.Errorf("%s still answers after Close", r.Addr)
	}
	r.Close() // a second Close (the test's cleanup) is harmless
}

// TestRunReportsATakenAddress: a given address that something else has
// is an error at once, not a registry someone else runs there.
func TestRunReportsATakenAddress(t *testing.T) {
	if _, err := exec.LookPath("docker-registry"); err != nil {
		t.Skip("needs the docker-registry package (Debian; apt-get install docker-registry)")
	}
	other := Start(t)
	r, err := Run(Options{Dir: t.TempDir(), Addr: other.Addr})
	if err == nil {
		r.Close()
		t.Fatalf("Run on the taken address %s: no error", other.Addr)
	}
	if !strings.Contains(err.Error(), other.Addr) || !strings.Contains(err.Error(), "address already in use") {
		t.Errorf("error %q, want it to name %s and say it is in use", err, other.Addr)
	}
}

// TestRunReportsAnExit: a registry that exits before it listens is an
// error with its log, at once. The docker-registry here is a stand-in
// that fails as a bad config makes the real one fail.
func TestRunReportsAnExit(t *testing.T) {
	bin := t.TempDir()
	script := "#!/bin/sh\necho 'configuration error: registry-stand-in refuses' >&2\nexit 1\n"
	if err := os.WriteFile(filepath.Join(bin, "docker-registry"), []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	t.Setenv("PATH", bin)
	t0 := time.Now()
	r, err := Run(Options{Dir: t.TempDir()})
	if err == nil {
		r.Close()
		t.Fatal("Run with a registry that exits: no error")
	}
	if !strings.Contains(err.Error(), "exited before it listened") || !strings.Contains(err.Error(), "registry-stand-in refuses") {
		t.Errorf("error %q, want it to say the registry exited, with its log", err)
	}
	if d := time.Since(t0); d > 5*time.Second {
		t.Errorf("took %s to notice", d)
	}
}
