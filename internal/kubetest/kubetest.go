// Package kubetest runs a real kube-apiserver and etcd for tests, the way
// controller-runtime's envtest does, with the nodespawn.dev CRDs installed.
//
// One control plane serves a whole test package: the package's TestMain
// calls Main, and each test that needs the API server calls Get, which
// starts the control plane on first use (a package whose selected tests
// need none starts none) and returns the shared Cluster. Tests keep apart by
// object names (NameFor), not by separate servers.
//
// The binaries (kube-apiserver, etcd, kubectl) come from KUBEBUILDER_ASSETS,
// else from the newest complete component build in the e2e cache
// ($E2E_CACHE, else $XDG_CACHE_HOME/nodespawn-e2e, else
// /var/cache/nodespawn-e2e: components/KEY/bin with components/KEY/.done).
// Without them Get skips the test, unless NODESPAWN_REQUIRE_KUBE=1, when it
// fails it (CI sets it after e2e-prepare has built them).
//
// The API server authorizes with RBAC (as envtest runs it), so AddUser's
// client-certificate users (a node: "system:node:NAME" in "system:nodes")
// have only the permissions the test grants them.
package kubetest

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	clientgoscheme "k8s.io/client-go/kubernetes/scheme"
	"k8s.io/client-go/rest"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/envtest"

	v1alpha1 "github.com/nodespawn/nodespawn/api/v1alpha1"
	"github.com/nodespawn/nodespawn/manifest"
)

// RequireEnv, set to 1, turns a missing control plane from a skip into a
// failure.
const RequireEnv = "NODESPAWN_REQUIRE_KUBE"

// SkipEnv, set to 1, skips the tests that need a control plane without
// looking for one: make check sets it for the unit-test pass that runs
// while e2e-prepare builds the control plane, because test-cluster runs
// those tests next, once, with RequireEnv. RequireEnv=1 overrides it.
const SkipEnv = "NODESPAWN_SKIP_KUBE"

// Cluster is a running control plane with the nodespawn.dev CRDs.
type Cluster struct {
	// Config is an admin's (system:masters) client configuration.
	Config *rest.Config
	// Scheme knows the built-in types and nodespawn.dev/v1alpha1.
	Scheme *runtime.Scheme
	// Client is an admin's client.
	Client client.Client
	// Root is the repository's root (deploy/ lies under it).
	Root string

	env *envtest.Environment
}

var (
	once     sync.Once
	shared   *Cluster
	startErr error
	skipWhy  string
)

// Main runs the package's tests and stops the control plane if a test
// started one. Use it from TestMain: os.Exit(kubetest.Main(m)).
func Main(m *testing.M) int {
	code := m.Run()
	if shared != nil {
		if err := shared.env.Stop(); err != nil {
			fmt.Fprintf(os.Stderr, "kubetest: stopping the control plane: %v\n", err)
			if code == 0 {
				code = 1
			}
		}
	}
	return code
}

// Get returns the package's control plane, starting it on first use. It
// skips the test when no binaries are found (fails it when
// NODESPAWN_REQUIRE_KUBE=1) or when NODESPAWN_SKIP_KUBE=1, and fails it
// when the control plane does not start.
func Get(t testing.TB) *Cluster {
	t.Helper()
	if skipAsked() {
		t.Skipf("kubetest: %s=1; the tests against an API server run in make test-cluster", SkipEnv)
		return nil
	}
	once.Do(func() { shared, skipWhy, startErr = start() })
	switch {
	case startErr != nil:
		t.Fatalf("kubetest: %v", startErr)
	case skipWhy != "" && os.Getenv(RequireEnv) == "1":
		t.Fatalf("kubetest: %s, and %s=1 requires one", skipWhy, RequireEnv)
	case skipWhy != "":
		t.Skipf("kubetest: %s; skipping (set %s=1 to fail instead)", skipWhy, RequireEnv)
	}
	return shared
}

// skipAsked says whether SkipEnv asks to skip: RequireEnv=1 overrides it.
func skipAsked() bool { return os.Getenv(SkipEnv) == "1" && os.Getenv(RequireEnv) != "1" }

// Assets returns the directory holding kube-apiserver, etcd and kubectl, or
// why there is none.
func Assets() (dir string, why string) {
	if d := os.Getenv("KUBEBUILDER_ASSETS"); d != "" {
		for _, b := range []string{"kube-apiserver", "etcd"} {
			if _, err := os.Stat(filepath.Join(d, b)); err != nil {
				return "", fmt.Sprintf("KUBEBUILDER_ASSETS=%s has no %s", d, b)
			}
		}
		return d, ""
	}
	cache := os.Getenv("E2E_CACHE")
	if cache == "" && os.Getenv("XDG_CACHE_HOME") != "" {
		cache = filepath.Join(os.Getenv("XDG_CACHE_HOME"), "nodespawn-e2e")
		if _, err := os.Stat(cache); err != nil {
			cache = ""
		}
	}
	if cache == "" {
		cache = "/var/cache/nodespawn-e2e"
	}
	type cand struct {
		dir  string
		done time.Time
	}
	var cands []cand
	keys, _ := filepath.Glob(filepath.Join(cache, "components", "*"))
	for _, k := range keys {
		done, err := os.Stat(filepath.Join(k, ".done"))
		if err != nil {
			continue
		}
		bin := filepath.Join(k, "bin")
		if !isExec(filepath.Join(bin, "kube-apiserver")) || !isExec(filepath.Join(bin, "etcd")) {
			continue
		}
		cands = append(cands, cand{bin, done.ModTime()})
	}
	if len(cands) == 0 {
		return "", fmt.Sprintf("no kube-apiserver and etcd: KUBEBUILDER_ASSETS is unset and %s holds no complete build (run 'make e2e-prepare' or set KUBEBUILDER_ASSETS)", filepath.Join(cache, "components"))
	}
	sort.Slice(cands, func(i, j int) bool { return cands[i].done.After(cands[j].done) })
	return cands[0].dir, ""
}

func isExec(p string) bool {
	fi, err := os.Stat(p)
	return err == nil && fi.Mode().IsRegular() && fi.Mode()&0o111 != 0
}

// repoRoot walks up from the working directory (a test runs in its
// package's directory) to the module's go.mod.
func repoRoot() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		b, err := os.ReadFile(filepath.Join(dir, "go.mod"))
		if err == nil && bytes.Contains(b, []byte("module github.com/nodespawn/nodespawn\n")) {
			return dir, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", errors.New("no go.mod of github.com/nodespawn/nodespawn above the working directory")
		}
		dir = parent
	}
}

// NewScheme returns a scheme with the built-in types and
// nodespawn.dev/v1alpha1.
func NewScheme() *runtime.Scheme {
	s := runtime.NewScheme()
	if err := clientgoscheme.AddToScheme(s); err != nil {
		panic(err)
	}
	if err := v1alpha1.AddToScheme(s); err != nil {
		panic(err)
	}
	return s
}

func start() (*Cluster, string, error) {
	assets, why := Assets()
	if why != "" {
		return nil, why, nil
	}
	root, err := repoRoot()
	if err != nil {
		return nil, "", err
	}
	scheme := NewScheme()
	env := &envtest.Environment{
		BinaryAssetsDirectory: assets,
		CRDDirectoryPaths:     []string{filepath.Join(root, "deploy", "crds")},
		ErrorIfCRDPathMissing: true,
		Scheme:                scheme,
		// A loaded 2-core CI machine: the defaults (20 s) are tight.
		ControlPlaneStartTimeout: 90 * time.Second,
		ControlPlaneStopTimeout:  30 * time.Second,
	}
	// Test data needs no durability: etcd skips fsync.
	env.ControlPlane.Etcd = &envtest.Etcd{}
	env.ControlPlane.Etcd.Configure().Append("unsafe-no-fsync", "true")
	cfg, err := env.Start()
	if err != nil {
		_ = env.Stop()
		return nil, "", fmt.Errorf("starting kube-apiserver and etcd from %s: %w", assets, err)
	}
	c, err := client.New(cfg, client.Options{Scheme: scheme})
	if err != nil {
		_ = env.Stop()
		return nil, "", err
	}
	return &Cluster{Config: cfg, Scheme: scheme, Client: c, Root: root, env: env}, "", nil
}

// AddUser returns a client configuration authenticated by a client
// certificate as the user name in groups (system:authenticated is added
// by the API server). A node's: AddUser("system:node:a", "system:nodes").
func (c *Cluster) AddUser(t testing.TB, name string, groups ...string) *rest.Config {
	t.Helper()
	u, err := c.env.AddUser(envtest.User{Name: name, Groups: groups}, &rest.Config{QPS: 1000, Burst: 2000})
	if err != nil {
		t.Fatalf("kubetest: adding user %s: %v", name, err)
	}
	return u.Config()
}

// Apply creates or updates (server-side apply, field manager "kubetest")
// every object in the YAML files (paths relative to the repository root;
// documents separated by ---).
func (c *Cluster) Apply(t testing.TB, paths ...string) {
	t.Helper()
	for _, p := range paths {
		if !filepath.IsAbs(p) {
			p = filepath.Join(c.Root, p)
		}
		b, err := os.ReadFile(p)
		if err != nil {
			t.Fatalf("kubetest: %v", err)
		}
		if err := c.ApplyYAML(context.Background(), b); err != nil {
			t.Fatalf("kubetest: applying %s: %v", p, err)
		}
	}
}

// ApplyYAML server-side applies every object in a YAML stream.
func (c *Cluster) ApplyYAML(ctx context.Context, data []byte) error {
	dec := utilyaml.NewYAMLOrJSONDecoder(bytes.NewReader(data), 4096)
	for {
		var u unstructured.Unstructured
		if err := dec.Decode(&u.Object); err != nil {
			if errors.Is(err, io.EOF) {
				return nil
			}
			return err
		}
		if len(u.Object) == 0 {
			continue
		}
		if err := c.Client.Patch(ctx, &u, client.Apply, client.FieldOwner("kubetest"), client.ForceOwnership); err != nil {
			return fmt.Errorf("%s %s: %w", u.GetKind(), u.GetName(), err)
		}
	}
}

// NameFor returns a DNS-1123 name unique to the test, with a suffix.
func NameFor(t testing.TB, suffix string) string {
	n := strings.ToLower(t.Name())
	var b strings.Builder
	for _, r := range n {
		switch {
		case r >= 'a' && r <= 'z', r >= '0' && r <= '9':
			b.WriteRune(r)
		default:
			b.WriteByte('-')
		}
	}
	s := strings.Trim(b.String(), "-")
	if len(s) > 40 {
		s = s[len(s)-40:]
		s = strings.Trim(s, "-")
	}
	if suffix != "" {
		s += "-" + suffix
	}
	return s
}

// Eventually calls f until it returns nil or 30 s pass (the API server's
// caches, RBAC's among them, catch up with writes asynchronously); it
// returns f's last error. It is for waiting on the system under test, not a
// timed assertion: a slow machine only waits longer.
func Eventually(ctx context.Context, f func() error) error {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
	for {
		err := f()
		if err == nil {
			return nil
		}
		select {
		case <-ctx.Done():
			return err
		case <-tick.C:
		}
	}
}

// FleetConfig is a fleet config for tests: examples/minimal.yaml without
// its token, with the node label pool=v (each v another config), and its
// config digest.
func FleetConfig(t testing.TB, v string) (manifestText, digest string) {
	t.Helper()
	root, err := repoRoot()
	if err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(filepath.Join(root, "examples", "minimal.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	var lines []string
	for _, l := range strings.Split(string(b), "\n") {
		if strings.Contains(l, "auth:") || strings.Contains(l, "bootstrapToken:") {
			continue
		}
		lines = append(lines, l)
		if strings.HasPrefix(l, "kubernetes:") {
			lines = append(lines, "  labels: {pool: "+v+"}")
		}
	}
	text := strings.Join(lines, "\n")
	m, err := manifest.LoadConfig("config "+v, []byte(text))
	if err != nil {
		t.Fatal(err)
	}
	d, err := m.ConfigDigest()
	if err != nil {
		t.Fatal(err)
	}
	return text, d.String()
}
