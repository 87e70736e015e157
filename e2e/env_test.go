//go:build e2e

package e2e

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nodespawn/nodespawn/internal/httpx"
	"github.com/nodespawn/nodespawn/internal/imagebuild"
	"github.com/nodespawn/nodespawn/internal/registrytest"
	"github.com/nodespawn/nodespawn/internal/upstream"
	"oras.land/oras-go/v2"
)

// Pinned component versions: what build-components.sh builds and what the
// manifests ask for.
const (
	k8sVersion        = "1.37.2"
	containerdVersion = "2.4.2"
	runcVersion       = "1.5.3"
	cniVersion        = "1.10.0"
	crictlVersion     = "1.37.0"
	machineName       = "kube1"
	// altMachineName is the machine an upgrade of kube1 prepares.
	altMachineName = "kube2"
	imageRepo      = "nodespawn/machine"
	imageTag       = "e2e"
)

// environment is what TestMain sets up once for every scenario.
type environment struct {
	work        string
	guestKernel string
	guestInitrd string
	// guestDisk is this run's copy of the cached guest image with nodespawn in it.
	guestDisk string
	nodespawn string
	sysprobe  string
	// controller is the fleet controller binary (cmd/nodespawn-controller)
	// and deploy the repository's deploy/ (CRDs, node RBAC).
	controller, deploy string
	// imageRef is the machine image as the guest names it; imageRefV2
	// the same image with one small layer more (the upgrade's image: the
	// layer store fetches that layer only).
	imageRef, imageRefV2 string
	// mirrorFiles maps each component (upstream's name, or a mirror*
	// key for the extra kubelets) to its file in the mirror tree, and
	// mirrorSHA256 to that file's sha256, for scenarios that need the
	// real digest.
	mirrorFiles, mirrorSHA256 map[string]string
	// flaky is the mirror's handler, which fails the first requests for
	// some paths.
	flaky *flakyMirror
	// kubeletPrevVersion is the previous kubelet's version without the
	// "v" (E2E_KUBELET_PREV_VERSION, like k8sVersion).
	kubeletPrevVersion string
	caPEM              string
	// cluster is the control plane the node joins.
	cluster *cluster
	// pauseRef and busyboxRef are the pod images as the guest names them.
	pauseRef, busyboxRef string
}

var env *environment

func TestMain(m *testing.M) {
	os.Exit(testMain(m))
}

func testMain(m *testing.M) int {
	if err := requirePrivateNetns(); err != nil {
		fmt.Fprintln(os.Stderr, "e2e:", err)
		return 2
	}
	var stop func()
	var err error
	env, stop, err = setup(context.Background())
	if stop != nil {
		defer stop()
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "e2e setup:", err)
		return 1
	}
	return m.Run()
}

// requirePrivateNetns refuses to run anywhere but a network namespace whose
// only interface is lo: the network rule for this test has no exception.
func requirePrivateNetns() error {
	ifs, err := net.Interfaces()
	if err != nil {
		return err
	}
	var names []string
	for _, i := range ifs {
		names = append(names, i.Name)
	}
	if len(names) != 1 || names[0] != "lo" {
		return fmt.Errorf("must run in a network namespace with only lo, found %v: use `make e2e` or e2e/run.sh", names)
	}
	return nil
}

func getenv(k string) (string, error) {
	v := os.Getenv(k)
	if v == "" {
		return "", fmt.Errorf("%s is not set: run e2e/prepare.sh first (make e2e does)", k)
	}
	return v, nil
}

func setup(ctx context.Context) (*environment, func(), error) {
	t0 := time.Now()
	vars := map[string]string{}
	for _, k := range []string{"E2E_GUEST", "E2E_COMPONENTS", "E2E_KUBELET_PREV", "E2E_KUBELET_PREV_VERSION", "E2E_MACHINE_ROOTFS", "E2E_NODESPAWN", "E2E_CONTROLLER", "E2E_DEPLOY", "E2E_SYSPROBE", "E2E_WORK"} {
		v, err := getenv(k)
		if err != nil {
			return nil, nil, err
		}
		vars[k] = v
	}
	work := filepath.Join(vars["E2E_WORK"], "run")
	if err := os.RemoveAll(work); err != nil {
		return nil, nil, err
	}
	if err := os.MkdirAll(work, 0o755); err != nil {
		return nil, nil, err
	}
	e := &environment{
		work:        work,
		guestKernel: filepath.Join(vars["E2E_GUEST"], "vmlinuz"),
		guestInitrd: filepath.Join(vars["E2E_GUEST"], "initrd.img"),
		guestDisk:   filepath.Join(work, "guest.raw"),
		nodespawn:   vars["E2E_NODESPAWN"],
		sysprobe:    vars["E2E_SYSPROBE"],
		controller:  vars["E2E_CONTROLLER"],
		deploy:      vars["E2E_DEPLOY"],
		imageRef:    fmt.Sprintf("%s:%d/%s:%s", guestHostIP, registryPort, imageRepo, imageTag),
		imageRefV2:  fmt.Sprintf("%s:%d/%s:%s-v2", guestHostIP, registryPort, imageRepo, imageTag),

		kubeletPrevVersion: strings.TrimPrefix(vars["E2E_KUBELET_PREV_VERSION"], "v"),
	}
	if e.kubeletPrevVersion == k8sVersion {
		return nil, nil, fmt.Errorf("E2E_KUBELET_PREV_VERSION is v%s, the current version: the upgrade scenario needs an older one", k8sVersion)
	}
	var stops []func()
	stop := func() {
		for i := len(stops) - 1; i >= 0; i-- {
			stops[i]()
		}
	}

	if err := injectGuestFiles(filepath.Join(vars["E2E_GUEST"], "guest.raw"), e.guestDisk, map[string]string{
		"/usr/local/bin/nodespawn":    e.nodespawn,
		"/usr/local/bin/e2e-sysprobe": e.sysprobe,
	}); err != nil {
		return nil, stop, err
	}
	logf("guest disk with nodespawn ready (+%s)", time.Since(t0).Round(time.Second))

	// The guest reaches it at guestHostIP:registryPort; its log (with
	// one line per request) stays in the work directory.
	reg, err := registrytest.Run(registrytest.Options{Dir: filepath.Join(work, "registry"), Addr: fmt.Sprintf("127.0.0.1:%d", registryPort), Verbose: true})
	if err != nil {
		return nil, stop, err
	}
	stops = append(stops, reg.Close)
	dst, tag, err := imagebuild.Repository(fmt.Sprintf("127.0.0.1:%d/%s:%s", registryPort, imageRepo, imageTag), true)
	if err != nil {
		return nil, stop, err
	}
	res, err := imagebuild.Build(ctx, vars["E2E_MACHINE_ROOTFS"], dst, tag, imagebuild.Options{
		Platform: "linux/amd64", Created: time.Unix(0, 0), Cmd: []string{"/sbin/init"}, TempDir: work,
	})
	if err != nil {
		return nil, stop, fmt.Errorf("push machine image: %w", err)
	}
	logf("machine image %s@%s pushed: layer %d MB, %d entries (+%s)", e.imageRef, res.Manifest.Digest, res.Layer.Size>>20, res.Entries, time.Since(t0).Round(time.Second))
	v2, err := pushImageV2(ctx, dst, res, work)
	if err != nil {
		return nil, stop, err
	}
	logf("machine image %s@%s pushed: the same layer and one of %d bytes", e.imageRefV2, v2.Manifest.Digest, v2.Layer.Size)

	mirror := filepath.Join(work, "mirror")
	if e.mirrorFiles, e.mirrorSHA256, err = buildMirror(vars["E2E_COMPONENTS"], vars["E2E_KUBELET_PREV"], e.kubeletPrevVersion, mirror); err != nil {
		return nil, stop, err
	}
	// The first boot's download of the previous kubelet (TestNode) meets a
	// mirror that answers 503 until the client's retries are spent, twice
	// (the fetch ahead of the image and the fetch again once the image has
	// changed the rootfs): the first-boot unit must retry the whole run.
	prevPath, err := filepath.Rel(mirror, e.mirrorFiles[mirrorKubeletPrev])
	if err != nil {
		return nil, stop, err
	}
	e.flaky = &flakyMirror{h: http.FileServer(http.Dir(mirror)), left: map[string]int{"/" + filepath.ToSlash(prevPath): 2 * httpx.DefaultPolicy.Attempts}}
	srv := &http.Server{Addr: fmt.Sprintf("127.0.0.1:%d", mirrorPort), Handler: logRequests(e.flaky, filepath.Join(work, "mirror.log"))}
	l, err := net.Listen("tcp", srv.Addr)
	if err != nil {
		return nil, stop, fmt.Errorf("mirror listen: %w", err)
	}
	go srv.Serve(l)
	stops = append(stops, func() { srv.Close() })
	logf("mirror on %s (+%s)", srv.Addr, time.Since(t0).Round(time.Second))

	if e.pauseRef, e.busyboxRef, err = pushPodImages(ctx, vars["E2E_COMPONENTS"], filepath.Join(work, "pod-images")); err != nil {
		return nil, stop, err
	}
	logf("pod images %s and %s pushed (+%s)", e.pauseRef, e.busyboxRef, time.Since(t0).Round(time.Second))

	cl, clStop, err := startCluster(ctx, filepath.Join(vars["E2E_COMPONENTS"], "bin"), filepath.Join(work, "cluster"))
	stops = append(stops, clStop)
	if err != nil {
		return nil, stop, fmt.Errorf("control plane: %w", err)
	}
	e.cluster, e.caPEM = cl, cl.caPEM
	logf("control plane ready on 127.0.0.1:%d, bootstrap token created (+%s)", apiServerPort, time.Since(t0).Round(time.Second))
	return e, stop, nil
}

func logf(format string, args ...any) {
	fmt.Printf("e2e: "+format+"\n", args...)
}

// injectGuestFiles copies the cached guest image and writes files into the
// copy's ext4 file system with debugfs: no mount, no loop device, and the
// cached image stays untouched.
func injectGuestFiles(base, dst string, files map[string]string) error {
	if out, err := exec.Command("cp", "--sparse=always", base, dst).CombinedOutput(); err != nil {
		return fmt.Errorf("copy guest image: %v: %s", err, out)
	}
	var cmds strings.Builder
	paths := make([]string, 0, len(files))
	for p := range files {
		paths = append(paths, p)
	}
	sort.Strings(paths)
	for _, p := range paths {
		fmt.Fprintf(&cmds, "rm %s\ncd %s\nwrite %s %s\nsif %s mode 0100755\nsif %s uid 0\nsif %s gid 0\n",
			p, path.Dir(p), files[p], path.Base(p), p, p, p)
	}
	cmd := exec.Command("debugfs", "-w", "-f", "-", dst)
	cmd.Stdin = strings.NewReader(cmds.String())
	out, err := cmd.CombinedOutput()
	if err != nil {
		return fmt.Errorf("debugfs into %s: %v: %s", dst, err, out)
	}
	// debugfs reports most failures on stdout and still exits 0.
	for _, p := range paths {
		ls, err := exec.Command("debugfs", "-R", "stat "+p, dst).CombinedOutput()
		if err != nil || !bytes.Contains(ls, []byte("Mode:  0755")) {
			return fmt.Errorf("inject %s into guest image: %v\n%s\n%s", p, err, out, ls)
		}
	}
	return nil
}

// imageV2Release is what the upgrade image's extra layer writes.
const imageV2Release = "/etc/nodespawn-e2e-image"

// pushImageV2 pushes the machine image with one small layer on top, tagged
// imageTag-v2.
func pushImageV2(ctx context.Context, dst oras.Target, base imagebuild.Result, work string) (imagebuild.Result, error) {
	tree := filepath.Join(work, "image-v2")
	if err := os.MkdirAll(filepath.Join(tree, "etc"), 0o755); err != nil {
		return imagebuild.Result{}, err
	}
	for _, d := range []string{tree, filepath.Join(tree, "etc")} {
		if err := os.Chmod(d, 0o755); err != nil {
			return imagebuild.Result{}, err
		}
	}
	if err := os.WriteFile(filepath.Join(tree, imageV2Release), []byte("v2\n"), 0o644); err != nil {
		return imagebuild.Result{}, err
	}
	res, err := imagebuild.Extend(ctx, dst, base, tree, imageTag+"-v2", imagebuild.Options{Created: time.Unix(0, 0), TempDir: work})
	if err != nil {
		return res, fmt.Errorf("push the v2 machine image: %w", err)
	}
	return res, nil
}

// Mirror keys (environment.mirrorFiles, mirrorSHA256) of the kubelets the
// mirror serves besides the current one (key upstream.Kubelet).
const (
	// mirrorKubeletPrev is the previous release's kubelet
	// (E2E_KUBELET_PREV), in the upstream layout under its own version.
	mirrorKubeletPrev = "kubelet-prev"
	// mirrorKubeletBroken is brokenKubelet, at mirrorKubeletBrokenPath.
	mirrorKubeletBroken = "kubelet-broken"
)

// mirrorKubeletBrokenPath is where the mirror serves brokenKubelet: outside
// the upstream layout, so a manifest names it by components.kubelet.url.
const mirrorKubeletBrokenPath = "/e2e/kubelet-broken/kubelet"

// brokenKubelet is a kubelet that never starts (the rollback scenario): the
// download verifies and installs, the unit fails at once, the Node never
// turns Ready.
const brokenKubelet = "#!/bin/sh\n# nodespawn e2e: a broken kubelet, for the rollback scenario.\n" +
	"echo 'e2e broken kubelet: this kubelet always fails' >&2\nexit 1\n"

// buildMirror lays the built binaries out the way the upstream release
// sites do (internal/upstream knows the paths), with their checksum files,
// so nodespawn downloads them exactly as it would from upstream. Beside the
// current kubelet it serves the previous one (kubeletPrev, at
// prevVersion's upstream path) and brokenKubelet. It returns each file's
// path and sha256 by component (or mirror* key).
func buildMirror(components, kubeletPrev, prevVersion, root string) (files, sums map[string]string, err error) {
	bin := func(name string) string { return filepath.Join(components, "bin", name) }
	files, sums = map[string]string{}, map[string]string{}
	lookup := func(key, c, v string) (upstream.Artifact, string, error) {
		a, err := upstream.Lookup(c, v, "amd64", "http://mirror.invalid")
		if err != nil {
			return a, "", err
		}
		u, err := url.Parse(a.URL)
		if err != nil {
			return a, "", err
		}
		dst := filepath.Join(root, filepath.FromSlash(u.Path))
		files[key] = dst
		return a, dst, os.MkdirAll(filepath.Dir(dst), 0o755)
	}
	// dl.k8s.io's layout: the binary and NAME.sha256 with the bare hex.
	k8sBinary := func(key, c, v, src string) error {
		_, dst, err := lookup(key, c, v)
		if err != nil {
			return err
		}
		sum, err := copyFile(src, dst)
		if err != nil {
			return err
		}
		sums[key] = sum
		return os.WriteFile(dst+".sha256", []byte(sum), 0o644)
	}
	for _, c := range []string{upstream.Kubelet, upstream.Kubectl, upstream.KubeProxy} {
		if err := k8sBinary(c, c, k8sVersion, bin(c)); err != nil {
			return nil, nil, err
		}
	}
	if err := k8sBinary(mirrorKubeletPrev, upstream.Kubelet, prevVersion, kubeletPrev); err != nil {
		return nil, nil, fmt.Errorf("previous kubelet (E2E_KUBELET_PREV): %w", err)
	}
	broken := filepath.Join(root, filepath.FromSlash(mirrorKubeletBrokenPath))
	if err := os.MkdirAll(filepath.Dir(broken), 0o755); err != nil {
		return nil, nil, err
	}
	if err := os.WriteFile(broken, []byte(brokenKubelet), 0o755); err != nil {
		return nil, nil, err
	}
	bsum := sha256.Sum256([]byte(brokenKubelet))
	files[mirrorKubeletBroken], sums[mirrorKubeletBroken] = broken, hex.EncodeToString(bsum[:])
	if err := os.WriteFile(broken+".sha256", []byte(sums[mirrorKubeletBroken]), 0o644); err != nil {
		return nil, nil, err
	}

	_, dst, err := lookup(upstream.Runc, upstream.Runc, runcVersion)
	if err != nil {
		return nil, nil, err
	}
	sum, err := copyFile(bin("runc"), dst)
	if err != nil {
		return nil, nil, err
	}
	sums[upstream.Runc] = sum
	if err := os.WriteFile(filepath.Join(filepath.Dir(dst), "runc.sha256sum"), []byte(sum+"  runc.amd64\n"), 0o644); err != nil {
		return nil, nil, err
	}
	tarballs := []struct {
		component, version, checksumExt string
		members                         map[string]string // archive path -> file
	}{
		{upstream.Containerd, containerdVersion, ".sha256sum", map[string]string{
			"bin/containerd": bin("containerd"), "bin/containerd-shim-runc-v2": bin("containerd-shim-runc-v2"), "bin/ctr": bin("ctr")}},
		{upstream.Crictl, crictlVersion, ".sha256", map[string]string{"crictl": bin("crictl")}},
		{upstream.CNIPlugins, cniVersion, ".sha256", cniMembers(filepath.Join(components, "cni"))},
	}
	for _, tb := range tarballs {
		_, dst, err := lookup(tb.component, tb.component, tb.version)
		if err != nil {
			return nil, nil, err
		}
		sum, err := writeTarball(dst, tb.members)
		if err != nil {
			return nil, nil, err
		}
		sums[tb.component] = sum
		if err := os.WriteFile(dst+tb.checksumExt, []byte(sum+"  "+filepath.Base(dst)+"\n"), 0o644); err != nil {
			return nil, nil, err
		}
	}
	return files, sums, nil
}

func cniMembers(dir string) map[string]string {
	m := map[string]string{}
	ents, _ := os.ReadDir(dir)
	for _, e := range ents {
		m["./"+e.Name()] = filepath.Join(dir, e.Name())
	}
	return m
}

func copyFile(src, dst string) (string, error) {
	in, err := os.Open(src)
	if err != nil {
		return "", err
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_CREATE|os.O_TRUNC|os.O_WRONLY, 0o755)
	if err != nil {
		return "", err
	}
	h := sha256.New()
	if _, err := io.Copy(io.MultiWriter(out, h), in); err != nil {
		out.Close()
		return "", err
	}
	return hex.EncodeToString(h.Sum(nil)), out.Close()
}

func writeTarball(dst string, members map[string]string) (string, error) {
	f, err := os.Create(dst)
	if err != nil {
		return "", err
	}
	h := sha256.New()
	zw, _ := gzip.NewWriterLevel(io.MultiWriter(f, h), gzip.BestSpeed)
	tw := tar.NewWriter(zw)
	names := make([]string, 0, len(members))
	for n := range members {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		src, err := os.Open(members[n])
		if err != nil {
			return "", err
		}
		fi, _ := src.Stat()
		if err := tw.WriteHeader(&tar.Header{Name: n, Mode: 0o755, Size: fi.Size(), ModTime: time.Unix(0, 0), Typeflag: tar.TypeReg}); err != nil {
			return "", err
		}
		if _, err := io.Copy(tw, src); err != nil {
			return "", err
		}
		src.Close()
	}
	if err := tw.Close(); err != nil {
		return "", err
	}
	if err := zw.Close(); err != nil {
		return "", err
	}
	return hex.EncodeToString(h.Sum(nil)), f.Close()
}

// flakyMirror answers 503 to the first left[path] GET requests for each
// path, then serves h.
type flakyMirror struct {
	h      http.Handler
	mu     sync.Mutex
	left   map[string]int
	failed int
}

func (f *flakyMirror) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	f.mu.Lock()
	fail := r.Method == http.MethodGet && f.left[r.URL.Path] > 0
	if fail {
		f.left[r.URL.Path]--
		f.failed++
	}
	f.mu.Unlock()
	if fail {
		http.Error(w, "the e2e mirror is not up yet", http.StatusServiceUnavailable)
		return
	}
	f.h.ServeHTTP(w, r)
}

// failures is how many requests it failed.
func (f *flakyMirror) failures() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.failed
}

func logRequests(h http.Handler, logPath string) http.Handler {
	f, _ := os.Create(logPath)
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(f, "%s %s %s\n", time.Now().Format(time.RFC3339), r.Method, r.URL.Path)
		h.ServeHTTP(w, r)
	})
}

// pushPodImages pushes the pod sandbox (kubernetes' pause, built with the
// components) and a busybox image (the host's busybox-static) to the
// loopback registry, so no pod needs an image from the internet.
func pushPodImages(ctx context.Context, components, dir string) (pause, busybox string, err error) {
	pauseDir, bbDir := filepath.Join(dir, "pause"), filepath.Join(dir, "busybox")
	if err := os.MkdirAll(pauseDir, 0o755); err != nil {
		return "", "", err
	}
	if err := os.MkdirAll(filepath.Join(bbDir, "bin"), 0o755); err != nil {
		return "", "", err
	}
	if _, err := copyFile(filepath.Join(components, "bin", "pause"), filepath.Join(pauseDir, "pause")); err != nil {
		return "", "", fmt.Errorf("pause image: %w", err)
	}
	if _, err := copyFile("/bin/busybox", filepath.Join(bbDir, "bin", "busybox")); err != nil {
		return "", "", fmt.Errorf("busybox image needs the host's static busybox (apt-get install busybox-static): %w", err)
	}
	for _, a := range []string{"sh", "echo", "sleep", "cat", "ls", "uname", "hostname", "ip", "wget"} {
		if err := os.Symlink("busybox", filepath.Join(bbDir, "bin", a)); err != nil {
			return "", "", err
		}
	}
	for _, img := range []struct {
		dir, repo, tag string
		cmd            []string
	}{
		{pauseDir, "e2e/pause", "3.10.2", []string{"/pause"}},
		{bbDir, "e2e/busybox", "e2e", []string{"/bin/sh"}},
	} {
		dst, tag, err := imagebuild.Repository(fmt.Sprintf("127.0.0.1:%d/%s:%s", registryPort, img.repo, img.tag), true)
		if err != nil {
			return "", "", err
		}
		if _, err := imagebuild.Build(ctx, img.dir, dst, tag, imagebuild.Options{
			Platform: "linux/amd64", Created: time.Unix(0, 0), Cmd: img.cmd, TempDir: dir,
		}); err != nil {
			return "", "", fmt.Errorf("push %s: %w", img.repo, err)
		}
	}
	ref := func(repo, tag string) string { return fmt.Sprintf("%s:%d/%s:%s", guestHostIP, registryPort, repo, tag) }
	return ref("e2e/pause", "3.10.2"), ref("e2e/busybox", "e2e"), nil
}
