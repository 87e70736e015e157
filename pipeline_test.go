package main

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"testing"

	"github.com/nodespawn/nodespawn/internal/imagebuild"
	"github.com/nodespawn/nodespawn/internal/upstream"
	"github.com/nodespawn/nodespawn/manifest"
	"github.com/nodespawn/nodespawn/provision"
	"golang.org/x/sys/unix"
)

// The whole pipeline with real parts but no systemd: the CLI reads a
// manifest, probes a tree, renders, and applies into --root, pulling the
// rootfs from a real OCI layout built by the daemonless builder and the
// binaries from a real HTTP mirror on loopback in the upstream layouts.
// Host operations and systemd steps are skipped because --root is not /.

// mirror serves every component in its upstream layout, with the checksum
// file each upstream publishes.
type mirror struct {
	files map[string][]byte // written before the server serves

	mu       sync.Mutex // downloads run concurrently
	requests int
	// failFirst answers this many requests of each path with 503, as a
	// mirror that is not up yet at boot does.
	failFirst int
	hits      map[string]int
}

func (m *mirror) requestCount() int {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.requests
}

func sha(b []byte) string {
	s := sha256.Sum256(b)
	return hex.EncodeToString(s[:])
}

func tarGz(t testing.TB, files map[string]string) []byte {
	t.Helper()
	var buf bytes.Buffer
	zw := gzip.NewWriter(&buf)
	tw := tar.NewWriter(zw)
	for name, body := range files {
		if err := tw.WriteHeader(&tar.Header{Name: name, Mode: 0o755, Size: int64(len(body)), Typeflag: tar.TypeReg}); err != nil {
			t.Fatal(err)
		}
		if _, err := tw.Write([]byte(body)); err != nil {
			t.Fatal(err)
		}
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	if err := zw.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

func newMirror(t testing.TB) (*mirror, *httptest.Server) {
	t.Helper()
	m := &mirror{files: map[string][]byte{}, hits: map[string]int{}}
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		m.mu.Lock()
		m.requests++
		m.hits[r.URL.Path]++
		failing := m.hits[r.URL.Path] <= m.failFirst
		m.mu.Unlock()
		if failing {
			http.Error(w, "warming up", http.StatusServiceUnavailable)
			return
		}
		if strings.HasPrefix(r.URL.Path, privatePrefix) {
			if user, pass, ok := r.BasicAuth(); !ok || user != privateUser || pass != privatePassword {
				http.Error(w, "who are you?", http.StatusUnauthorized)
				return
			}
		}
		b, ok := m.files[r.URL.Path]
		if !ok {
			http.NotFound(w, r)
			return
		}
		w.Write(b)
	}))
	t.Cleanup(srv.Close)
	arch := runtime.GOARCH
	put := func(component, version string, artifact []byte) {
		a, err := upstream.Lookup(component, version, arch, srv.URL)
		if err != nil {
			t.Fatal(err)
		}
		u, _ := url.Parse(a.URL)
		c, _ := url.Parse(a.ChecksumURL)
		m.files[u.Path] = artifact
		if strings.HasSuffix(c.Path, ".sha256") && component != upstream.Crictl {
			m.files[c.Path] = []byte(sha(artifact) + "\n") // dl.k8s.io and CNI: bare hex
		} else {
			// sha256sum style, with a neighbour to pick the right line from.
			m.files[c.Path] = []byte(fmt.Sprintf("%s  other-file\n%s  %s\n", strings.Repeat("0", 64), sha(artifact), filepath.Base(u.Path)))
		}
	}
	k8s := strings.TrimPrefix(manifest.DefaultKubernetesVersion, "v")
	for _, name := range []string{upstream.Kubelet, upstream.Kubectl, upstream.KubeProxy} {
		put(name, k8s, []byte("#!/bin/sh\necho "+name+"\n"))
	}
	put(upstream.Runc, manifest.DefaultRuncVersion, []byte("runc binary"))
	put(upstream.Crictl, manifest.DefaultCrictlVersion, tarGz(t, map[string]string{"crictl": "crictl binary"}))
	put(upstream.Containerd, manifest.DefaultContainerdVersion, tarGz(t, map[string]string{
		"bin/containerd": "containerd binary", "bin/ctr": "ctr binary", "bin/containerd-shim-runc-v2": "shim binary",
	}))
	put(upstream.CNIPlugins, manifest.DefaultCNIPluginsVersion, tarGz(t, map[string]string{"./bridge": "bridge", "./loopback": "loopback"}))
	m.files[privatePrefix+"motd"] = []byte(privateMotd)
	return m, srv
}

// The mirror serves what is under privatePrefix only with HTTP basic
// authentication as privateUser and privatePassword.
const (
	privatePrefix   = "/private/"
	privateUser     = "mirror-user"
	privatePassword = "MIRROR-PASSWORD"
	privateMotd     = "behind a password\n"
)

// privateExtra is a host extra file from the mirror at base (the
// mirror's URL) with the credential in its source URL.
func privateExtra(base string) string {
	src := strings.Replace(base, "http://", "http://"+privateUser+":"+privatePassword+"@", 1) + privatePrefix + "motd"
	return "host:\n  extra:\n    storage:\n      files:\n        - path: /etc/nodespawn-test/motd\n" +
		"          contents:\n            source: " + src + "\n            verification: {hash: sha256-" + sha([]byte(privateMotd)) + "}\n"
}

// buildLayout makes a small rootfs tree with the traps a real image has (an
// absolute /var/run link, resolv.conf as a link to the stub) and writes it
// as an OCI layout with the daemonless builder.
func buildLayout(t *testing.T, dir string) {
	t.Helper()
	tree := filepath.Join(t.TempDir(), "tree")
	for p, body := range map[string]string{
		"etc/os-release": "ID=test\n",
		"etc/passwd":     "root:x:0:0:root:/root:/bin/sh\n",
		"etc/group":      "root:x:0:\n",
	} {
		if err := os.MkdirAll(filepath.Join(tree, filepath.Dir(p)), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(tree, p), []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	for _, d := range []string{"run", "var", "usr/local/bin"} {
		if err := os.MkdirAll(filepath.Join(tree, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.Symlink("/run", filepath.Join(tree, "var/run")); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink("../run/systemd/resolve/stub-resolv.conf", filepath.Join(tree, "etc/resolv.conf")); err != nil {
		t.Fatal(err)
	}
	target, err := imagebuild.Layout(dir)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := imagebuild.Build(context.Background(), tree, target, "v1", imagebuild.Options{Platform: "linux/" + runtime.GOARCH}); err != nil {
		t.Fatal(err)
	}
}

func pipelineManifest(layout, mirrorURL, extra string) string {
	ca, err := os.ReadFile("render/testdata/manifests/minimal.yaml")
	if err != nil {
		panic(err)
	}
	// Reuse the test CA block of the minimal fixture.
	pem := string(ca[strings.Index(string(ca), "  caCert: |"):strings.Index(string(ca), "  auth:")])
	return `apiVersion: nodespawn.dev/v1alpha1
kind: Node
machine:
  name: pipe
  kvm: "off"
  # The test's root has no resolv.conf to take upstream servers from.
  dns:
    nameservers: [10.0.0.53]
  rootfs:
    layout:
      path: ` + layout + `
      reference: v1
kubernetes:
  apiServer: https://10.0.0.1:6443
  nodeName: pipe-node
` + pem + `  auth:
    bootstrapToken: abcdef.0123456789abcdef
components:
  mirror: ` + mirrorURL + `
` + extra
}

func TestApplyIntoRoot(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: the rootfs keeps the image's owners")
	}
	work := t.TempDir()
	layout := filepath.Join(work, "layout")
	buildLayout(t, layout)
	mir, srv := newMirror(t)
	root := filepath.Join(work, "root")
	mf := filepath.Join(work, "node.yaml")
	if err := os.WriteFile(mf, []byte(pipelineManifest(layout, srv.URL, privateExtra(srv.URL))), 0o600); err != nil {
		t.Fatal(err)
	}

	code, out, errOut := cli(t, "", "apply", "-f", mf, "--root", root)
	if code != 0 {
		t.Fatalf("apply: exit %d\n%s\n%s", code, out, errOut)
	}
	// The file behind the mirror's password is fetched with it, and the
	// password is shown nowhere: not in the output, not in what apply
	// keeps (the stored plan, the result record), only in the stored
	// manifest, which is the input itself.
	if b, err := os.ReadFile(filepath.Join(root, "etc/nodespawn-test/motd")); string(b) != privateMotd {
		t.Errorf("the file from the mirror with a password: %q, %v", b, err)
	}
	if strings.Contains(out+errOut, privatePassword) {
		t.Errorf("apply's output shows the mirror's password:\n%s\n%s", out, errOut)
	}
	kept := 0
	filepath.WalkDir(filepath.Join(root, "var/lib/nodespawn"), func(p string, d fs.DirEntry, err error) error {
		switch {
		case err != nil:
			return err
		case d.IsDir() && (d.Name() == "layers" || d.Name() == "overlay"):
			return fs.SkipDir // machine roots: the kubeconfig holds the token
		case d.IsDir() || d.Name() == "manifest":
			return nil
		}
		b, err := os.ReadFile(p)
		if err != nil {
			return err
		}
		kept++
		if strings.Contains(string(b), privatePassword) || strings.Contains(string(b), "0123456789abcdef") {
			t.Errorf("%s holds a secret", p)
		}
		return nil
	})
	if kept < 3 {
		t.Errorf("only %d files under var/lib/nodespawn: the walk looked at nothing", kept)
	}
	rootfs := filepath.Join(root, "var/lib/machines/pipe")
	for p, want := range map[string]string{
		"usr/local/bin/kubelet":    "#!/bin/sh\necho kubelet\n",
		"usr/local/bin/runc":       "runc binary",
		"usr/local/bin/containerd": "containerd binary",
		"usr/local/bin/crictl":     "crictl binary",
		"opt/cni/bin/bridge":       "bridge",
		"etc/hostname":             "pipe-node\n",
		"etc/os-release":           "ID=test\n",
	} {
		got, err := os.ReadFile(filepath.Join(rootfs, p))
		if err != nil || string(got) != want {
			t.Errorf("%s: %q, %v; want %q", p, got, err, want)
		}
	}
	if fi, err := os.Stat(filepath.Join(rootfs, "usr/local/bin/kubelet")); err != nil || fi.Mode().Perm() != 0o755 {
		t.Errorf("kubelet mode: %v %v", fi, err)
	}
	if fi, err := os.Lstat(filepath.Join(rootfs, "etc/resolv.conf")); err != nil || !fi.Mode().IsRegular() {
		t.Errorf("resolv.conf should replace the image's stub link with a file: %v %v", fi, err)
	}
	kc := filepath.Join(rootfs, "etc/kubernetes/bootstrap-kubelet.conf")
	if fi, err := os.Stat(kc); err != nil || fi.Mode().Perm() != 0o600 {
		t.Errorf("bootstrap kubeconfig must be 0600: %v %v", fi, err)
	}
	if b, _ := os.ReadFile(kc); !strings.Contains(string(b), "abcdef.0123456789abcdef") {
		t.Errorf("bootstrap kubeconfig lacks the token")
	}
	if _, err := os.Stat(filepath.Join(root, "etc/systemd/nspawn/pipe.nspawn")); err != nil {
		t.Errorf("no .nspawn file: %v", err)
	}
	if strings.Contains(out+errOut, "0123456789abcdef") {
		t.Errorf("the token appears in apply's output")
	}
	// Off a terminal, progress is log lines: one per finished download and layer.
	for _, want := range []string{"msg=downloaded name=kubelet", `msg=downloaded name="layer 1/1"`} {
		if !strings.Contains(errOut, want) {
			t.Errorf("no progress line %q in:\n%s", want, errOut)
		}
	}

	// A second run is recognised and changes nothing.
	before := mir.requestCount()
	code, out, errOut = cli(t, "", "apply", "-f", mf, "--root", root)
	if code != 0 || !strings.Contains(out, "already applied") {
		t.Fatalf("second apply: exit %d\n%s\n%s", code, out, errOut)
	}
	if mir.requestCount() != before {
		t.Errorf("the second run went to the mirror")
	}

	// A different manifest is refused without --force: bad input.
	if err := os.WriteFile(mf, []byte(pipelineManifest(layout, srv.URL, "host:\n  aptGuard: true\n")), 0o600); err != nil {
		t.Fatal(err)
	}
	if code, _, errOut = cli(t, "", "apply", "-f", mf, "--root", root); code != exitBadInput {
		t.Errorf("changed manifest: exit %d, want %d: %s", code, exitBadInput, errOut)
	}
	// Its dry run says what it would change against the applied plan,
	// and that apply refuses it, with apply's exit code.
	code, out, errOut = cli(t, "", "apply", "--dry-run", "-f", mf, "--root", root)
	if code != exitBadInput || !strings.Contains(out, "Changes against the applied plan (machine pipe, node pipe-node)") || !strings.Contains(out, "\n+ host:file:") || strings.Contains(out, "0123456789abcdef") ||
		!strings.Contains(out, "apply would refuse (exit 2): refusing to apply manifest") || !strings.Contains(out, "pass --force") {
		t.Errorf("dry run of a changed manifest: exit %d\n%s\n%s", code, out, errOut)
	}
	if code, _, _ = cli(t, "", "apply", "--dry-run", "--detailed-exitcode", "-f", mf, "--root", root); code != exitFailed {
		t.Errorf("dry run of a refused manifest with --detailed-exitcode: exit %d, want %d (an error)", code, exitFailed)
	}
	if code, out, errOut = cli(t, "", "apply", "-f", mf, "--root", root, "--force"); code != 0 {
		t.Errorf("changed manifest with --force: exit %d\n%s\n%s", code, out, errOut)
	}
	// A manifest for another node (its name, its cluster) is no upgrade:
	// refused before anything is done, with or without --force.
	other := filepath.Join(work, "other.yaml")
	for what, m := range map[string]string{
		"kubernetes.nodeName":   strings.Replace(pipelineManifest(layout, srv.URL, ""), "nodeName: pipe-node", "nodeName: another-node", 1),
		"kubernetes.apiServer":  strings.Replace(pipelineManifest(layout, srv.URL, ""), "https://10.0.0.1:6443", "https://10.9.9.9:6443", 1),
		"machine.name: machine": strings.Replace(pipelineManifest(layout, srv.URL, ""), "name: pipe\n", "name: elsewhere\n", 1),
	} {
		if err := os.WriteFile(other, []byte(m), 0o600); err != nil {
			t.Fatal(err)
		}
		code, _, errOut := cli(t, "", "apply", "-f", other, "--root", root, "--force")
		if code != exitBadInput || !strings.Contains(errOut, what) || !strings.Contains(errOut, "nodespawn reset") {
			t.Errorf("a manifest with another %s: exit %d, want %d naming it and reset:\n%s", what, code, exitBadInput, errOut)
		}
	}

	// reset takes the machine from the stored manifest and removes what
	// apply made for it. It asks first: without a terminal to ask on it
	// refuses unless --yes; its dry run lists what it removes and changes
	// nothing; on a terminal anything but y keeps everything.
	gone := []string{"var/lib/machines/pipe", "etc/systemd/nspawn/pipe.nspawn", "etc/systemd/system/systemd-nspawn@pipe.service.d", "var/lib/nodespawn"}
	stillThere := func(what string) {
		t.Helper()
		for _, p := range gone {
			if _, err := os.Lstat(filepath.Join(root, p)); err != nil {
				t.Fatalf("%s removed %s: %v", what, p, err)
			}
		}
	}
	if code, out, errOut = cli(t, "y\n", "reset", "--root", root); code != exitBadInput || !strings.Contains(errOut, "--yes") {
		t.Errorf("reset from a pipe without --yes: exit %d, want %d naming --yes\n%s%s", code, exitBadInput, out, errOut)
	}
	stillThere("reset without --yes")
	code, out, errOut = cli(t, "", "reset", "--root", root, "--dry-run")
	if code != 0 {
		t.Fatalf("reset --dry-run: exit %d\n%s%s", code, out, errOut)
	}
	for _, p := range gone {
		if !strings.Contains(out, "\n  "+filepath.Join(root, p)+"\n") {
			t.Errorf("reset --dry-run does not list %s:\n%s", p, out)
		}
	}
	if !strings.Contains(out, "and leave in place:\n") || !strings.Contains(out, "not stopped") {
		t.Errorf("reset --dry-run does not say what it leaves:\n%s", out)
	}
	stillThere("reset --dry-run")
	if code, out, errOut = resetOnTerminal(t, "n\n", root); code != 1 || !strings.Contains(out, "[y/N]") || !strings.Contains(out, filepath.Join(root, gone[0])) || !strings.Contains(errOut, "not confirmed") {
		t.Errorf("reset answered n: exit %d, want 1 after listing and asking\n%s%s", code, out, errOut)
	}
	stillThere("reset answered n")
	if code, out, errOut = resetOnTerminal(t, "y\n", root); code != 0 {
		t.Fatalf("reset answered y: exit %d\n%s\n%s", code, out, errOut)
	}
	for _, p := range gone {
		if _, err := os.Lstat(filepath.Join(root, p)); !os.IsNotExist(err) {
			t.Errorf("reset left %s: %v", p, err)
		}
	}
	if code, _, _ = cli(t, "", "reset", "--root", root, "--yes"); code != exitBadInput {
		t.Errorf("reset with nothing applied: exit %d, want %d", code, exitBadInput)
	}
}

// resetOnTerminal runs reset --root root with a pseudo-terminal as its
// standard input, typing answer; it returns the exit code, the terminal's
// output (the question) with stderr's, and stderr.
func resetOnTerminal(t *testing.T, answer, root string) (int, string, string) {
	t.Helper()
	ptmx, err := os.OpenFile("/dev/ptmx", os.O_RDWR|unix.O_NOCTTY, 0)
	if err != nil {
		t.Skipf("no pseudo-terminal: %v", err)
	}
	defer ptmx.Close()
	if err := unix.IoctlSetPointerInt(int(ptmx.Fd()), unix.TIOCSPTLCK, 0); err != nil {
		t.Fatal(err)
	}
	n, err := unix.IoctlGetInt(int(ptmx.Fd()), unix.TIOCGPTN)
	if err != nil {
		t.Fatal(err)
	}
	tty, err := os.OpenFile(fmt.Sprintf("/dev/pts/%d", n), os.O_RDWR|unix.O_NOCTTY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer tty.Close()
	// Typed ahead: the terminal's line discipline holds it for the read.
	if _, err := ptmx.WriteString(answer); err != nil {
		t.Fatal(err)
	}
	var out, errb bytes.Buffer
	code := run([]string{"reset", "--root", root}, tty, &out, &errb)
	return code, out.String() + errb.String(), errb.String()
}

func TestApplyWrongChecksumInstallsNothing(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: the rootfs keeps the image's owners")
	}
	work := t.TempDir()
	layout := filepath.Join(work, "layout")
	buildLayout(t, layout)
	_, srv := newMirror(t)
	root := filepath.Join(work, "root")
	mf := filepath.Join(work, "node.yaml")
	wrong := strings.Repeat("ab", 32)
	if err := os.WriteFile(mf, []byte(pipelineManifest(layout, srv.URL, "  kubelet:\n    sha256: \""+wrong+"\"\n")), 0o600); err != nil {
		t.Fatal(err)
	}
	code, _, errOut := cli(t, "", "apply", "-f", mf, "--root", root)
	if code != exitFailed {
		t.Fatalf("exit %d, want %d\n%s", code, exitFailed, errOut)
	}
	actual := sha([]byte("#!/bin/sh\necho kubelet\n"))
	for _, want := range []string{"rootfs:download:kubelet", wrong, actual} {
		if !strings.Contains(errOut, want) {
			t.Errorf("the error lacks %q:\n%s", want, errOut)
		}
	}
	// Said once: in the failed step's line, not again by "apply failed"
	// and the CLI's last line.
	if n := strings.Count(errOut, actual); n != 1 {
		t.Errorf("the error is printed %d times:\n%s", n, errOut)
	}
	if _, err := os.Stat(filepath.Join(root, "var/lib/machines/pipe/usr/local/bin/kubelet")); !os.IsNotExist(err) {
		t.Errorf("an unverified kubelet is in the rootfs: %v", err)
	}

	// The first run failed before the machine ever started: no node to
	// protect. The dry run of the corrected manifest says apply replaces
	// the failed run, and apply does, without --force.
	if err := os.WriteFile(mf, []byte(pipelineManifest(layout, srv.URL, "")), 0o600); err != nil {
		t.Fatal(err)
	}
	code, out, errOut := cli(t, "", "apply", "--dry-run", "-f", mf, "--root", root)
	if code != 0 || !strings.Contains(out, "apply makes machine pipe from this manifest in place of the one whose first run failed") ||
		!strings.Contains(out, `download.sha256: "`+wrong+`" -> (none)`) {
		t.Errorf("dry run of the corrected manifest: exit %d\n%s\n%s", code, out, errOut)
	}
	if code, _, _ = cli(t, "", "apply", "--dry-run", "--detailed-exitcode", "-f", mf, "--root", root); code != provision.ExitChanges {
		t.Errorf("--detailed-exitcode with changes: exit %d, want %d", code, provision.ExitChanges)
	}
	if code, out, errOut = cli(t, "", "apply", "-f", mf, "--root", root); code != 0 {
		t.Fatalf("apply of the corrected manifest: exit %d\n%s\n%s", code, out, errOut)
	}
	if got, err := os.ReadFile(filepath.Join(root, "var/lib/machines/pipe/usr/local/bin/kubelet")); err != nil || string(got) != "#!/bin/sh\necho kubelet\n" {
		t.Errorf("kubelet after the corrected run: %q %v", got, err)
	}
	code, out, errOut = cli(t, "", "apply", "--dry-run", "--detailed-exitcode", "-f", mf, "--root", root)
	if code != 0 || !strings.Contains(out, "already applied on machine pipe: apply changes nothing") {
		t.Errorf("--detailed-exitcode with nothing to change: exit %d, want 0\n%s\n%s", code, out, errOut)
	}
}

// TestDryRunSaysWhichLayersItFetches: --dry-run --layers resolves the
// image and says which layers the layer store lacks, changing nothing;
// after apply, none; after an image with one more layer, that one.
func TestDryRunSaysWhichLayersItFetches(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: the rootfs keeps the image's owners, overlayfs")
	}
	work := t.TempDir()
	layout := filepath.Join(work, "layout")
	buildLayout(t, layout)
	_, srv := newMirror(t)
	root := filepath.Join(work, "root")
	t.Cleanup(func() { unmountUnder(t, work) })
	if err := os.MkdirAll(root, 0o755); err != nil {
		t.Fatal(err)
	}
	useRunningKernel(t)
	mf := filepath.Join(work, "node.yaml")
	if err := os.WriteFile(mf, []byte(strings.Replace(pipelineManifest(layout, srv.URL, ""), "  rootfs:\n", "  rootfs:\n    store: layers\n", 1)), 0o600); err != nil {
		t.Fatal(err)
	}
	// --force: on a --root tree a changed manifest is applied in place
	// only with it (the dry run would say apply refuses, exit 2).
	dryRun := func(want ...string) {
		t.Helper()
		code, out, errOut := cli(t, "", "apply", "--dry-run", "--layers", "--force", "-f", mf, "--root", root)
		if code != 0 {
			t.Fatalf("apply --dry-run --layers: exit %d\n%s\n%s", code, out, errOut)
		}
		for _, w := range want {
			if !strings.Contains(out, w) {
				t.Errorf("dry run output lacks %q:\n%s", w, out)
			}
		}
		t.Logf("dry run:\n%s", out[max(0, strings.Index(out, "Image layers")):])
	}
	dryRun("into the layer store /var/lib/nodespawn/layers", "   1  fetch  ", "apply would fetch and unpack 1 of 1 layers")
	if _, err := os.Stat(filepath.Join(root, "var/lib/nodespawn")); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("the dry run made /var/lib/nodespawn: %v", err)
	}
	if code, out, errOut := cli(t, "", "apply", "-f", mf, "--root", root); code != 0 {
		t.Fatalf("apply: exit %d\n%s\n%s", code, out, errOut)
	}
	dryRun("   1  in the store  ", "apply would fetch and unpack 0 of 1 layers")

	// v2: the same image with one more layer on top.
	top := t.TempDir()
	if err := os.WriteFile(filepath.Join(top, "release"), []byte("v2\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	extendLayout(t, layout, "v1", "v2", []string{top})
	mv2, err := os.ReadFile(mf)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(mf, []byte(strings.Replace(string(mv2), "reference: v1", "reference: v2", 1)), 0o600); err != nil {
		t.Fatal(err)
	}
	dryRun("   1  in the store  ", "   2  fetch  ", "apply would fetch and unpack 1 of 2 layers")
	if es, err := os.ReadDir(filepath.Join(root, "var/lib/nodespawn/layers/sha256")); err != nil || len(es) != 1 {
		t.Errorf("the dry run of v2 changed the layer store: %d layers (%v), want the 1 apply put there", len(es), err)
	}

	if code, _, errOut := cli(t, "", "apply", "--layers", "-f", mf, "--root", root); code != 2 || !strings.Contains(errOut, "--dry-run") {
		t.Errorf("--layers without --dry-run: exit %d, want 2 (usage) naming --dry-run\n%s", code, errOut)
	}
}
