// Package registrytest runs a real OCI registry (Debian's docker-registry,
// distribution v2) on loopback, for the tests of several packages that push
// and pull images, the e2e's environment and tools/ocibench. It is the one
// place that starts it; product code does not import it.
package registrytest

import (
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
)

// Options say how to run the registry. The zero value is a registry on a
// free loopback port without auth that logs errors only.
type Options struct {
	// Dir holds the registry's config, storage (Dir/data) and log
	// (Dir/registry.log); it is made when missing. StartWith defaults it to
	// a directory of the test's.
	Dir string
	// Addr is the loopback address to listen on, e.g. "127.0.0.1:5000";
	// "" picks a free port.
	Addr string
	// Htpasswd, when set, is an htpasswd file (bcrypt) whose users the
	// registry asks for with basic auth (realm nodespawn-test).
	Htpasswd string
	// Verbose logs warnings and one line per request (the access log) too.
	Verbose bool
}

// Registry is a running docker-registry.
type Registry struct {
	// Addr is where it listens (host:port): a reference's registry part.
	Addr string
	// Storage is the root of its filesystem storage.
	Storage string
	// Log is its log file (stdout and stderr).
	Log string

	cmd    *exec.Cmd
	exited chan struct{}
}

// Run starts docker-registry as opts say and returns once it answers HTTP.
// It dies with the calling process too (also one killed before it could
// call Close). Close stops it.
func Run(opts Options) (*Registry, error) {
	bin, err := exec.LookPath("docker-registry")
	if err != nil {
		return nil, fmt.Errorf("docker-registry not found: install it (apt-get install docker-registry, or scripts/install-test-deps.sh as root): %w", err)
	}
	if opts.Dir == "" {
		return nil, errors.New("registrytest: Options.Dir is empty")
	}
	if err := os.MkdirAll(opts.Dir, 0o755); err != nil {
		return nil, err
	}
	// A free port, or the given one while nothing else has it: a registry
	// left running there would answer in place of this one.
	addr := opts.Addr
	if addr == "" {
		addr = "127.0.0.1:0"
	}
	l, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("docker-registry cannot listen on %s (another registry left running?): %w", addr, err)
	}
	addr = l.Addr().String()
	l.Close()
	r := &Registry{Addr: addr, Storage: filepath.Join(opts.Dir, "data"), Log: filepath.Join(opts.Dir, "registry.log"), exited: make(chan struct{})}
	logCfg := "{ level: error, accesslog: { disabled: true } }"
	if opts.Verbose {
		logCfg = "{ level: warn }"
	}
	cfg := fmt.Sprintf("version: 0.1\nlog: %s\nstorage:\n  filesystem: { rootdirectory: %q }\nhttp:\n  addr: %s\n",
		logCfg, r.Storage, addr)
	if opts.Htpasswd != "" {
		cfg += fmt.Sprintf("auth:\n  htpasswd: { realm: nodespawn-test, path: %q }\n", opts.Htpasswd)
	}
	cfgPath := filepath.Join(opts.Dir, "config.yml")
	if err := os.WriteFile(cfgPath, []byte(cfg), 0o644); err != nil {
		return nil, err
	}
	logf, err := os.Create(r.Log)
	if err != nil {
		return nil, err
	}
	defer logf.Close() // the child holds its own copy
	r.cmd = exec.Command(bin, "serve", cfgPath)
	r.cmd.Stdout, r.cmd.Stderr = logf, logf
	r.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := r.cmd.Start(); err != nil {
		return nil, fmt.Errorf("start docker-registry: %w", err)
	}
	go func() { r.cmd.Wait(); close(r.exited) }()
	client := &http.Client{Timeout: time.Second}
	deadline := time.Now().Add(30 * time.Second) // generous: the machine may be busy
	for {
		select {
		case <-r.exited:
			return nil, fmt.Errorf("docker-registry exited before it listened on %s: %s", addr, r.logText())
		default:
		}
		// Any answer will do: with auth, /v2/ answers 401.
		if resp, err := client.Get("http://" + addr + "/v2/"); err == nil {
			resp.Body.Close()
			return r, nil
		}
		if time.Now().After(deadline) {
			r.Close()
			return nil, fmt.Errorf("docker-registry did not listen on %s within 30s: %s", addr, r.logText())
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// Close stops the registry; its directory stays.
func (r *Registry) Close() {
	select {
	case <-r.exited:
	default:
		r.cmd.Process.Kill()
		<-r.exited
	}
}

// BlobPath is where the registry keeps the bytes of the blob d, for a test
// that tampers with them.
func (r *Registry) BlobPath(d digest.Digest) string {
	return filepath.Join(r.Storage, "docker/registry/v2/blobs", d.Algorithm().String(), d.Encoded()[:2], d.Encoded(), "data")
}

// logText is the log's content for an error message.
func (r *Registry) logText() string {
	b, err := os.ReadFile(r.Log)
	if err != nil {
		return fmt.Sprintf("(log %s: %v)", r.Log, err)
	}
	return fmt.Sprintf("log %s:\n%s", r.Log, b)
}

// Start runs a registry on a free loopback port without auth for the
// test's length (StartWith with zero Options).
func Start(t testing.TB) *Registry {
	t.Helper()
	return StartWith(t, Options{})
}

// StartWith runs a registry as opts say for the test's length, its
// directory the test's when opts.Dir is empty. The test is skipped where
// the docker-registry package is not installed, and fails when it does
// not come up.
func StartWith(t testing.TB, opts Options) *Registry {
	t.Helper()
	if _, err := exec.LookPath("docker-registry"); err != nil {
		t.Skip("needs the docker-registry package (Debian; apt-get install docker-registry) for a real registry on loopback")
	}
	if opts.Dir == "" {
		opts.Dir = t.TempDir()
	}
	r, err := Run(opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(r.Close)
	return r
}
