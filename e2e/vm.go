//go:build e2e

package e2e

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// Guest addresses that qemu user networking forwards (guestfwd) to servers
// on the host's 127.0.0.1. restrict=on keeps every other guest packet inside
// slirp, and the whole test runs in a network namespace with only lo.
const (
	guestHostIP  = "10.0.2.100"
	registryPort = 5000
	mirrorPort   = 8080
	// apiServerPort is the test cluster's kube-apiserver (cluster.go).
	apiServerPort = 6443
)

// vm is one qemu process booting the guest image from a throw-away overlay.
type vm struct {
	t       *testing.T
	dir     string
	serial  string
	cmd     *exec.Cmd
	done    chan error
	agent   *agent
	started time.Time
}

// startVM boots a fresh copy-on-write overlay of base with the NoCloud seed
// (may be empty). Files land in dir, which is kept for inspection.
func startVM(t *testing.T, env *environment, dir, seed string) *vm {
	t.Helper()
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	overlay := filepath.Join(dir, "disk.qcow2")
	run(t, "qemu-img", "create", "-q", "-f", "qcow2", "-b", env.guestDisk, "-F", "raw", overlay)
	v := &vm{t: t, dir: dir, serial: filepath.Join(dir, "serial.log"), done: make(chan error, 1)}
	qga := filepath.Join(dir, "qga.sock")
	fwd := func(port int) string {
		return fmt.Sprintf("guestfwd=tcp:%s:%d-cmd:socat STDIO TCP:127.0.0.1:%d", guestHostIP, port, port)
	}
	// TCG by default: /dev/kvm on the runners this was built on is a PVM
	// nested hypervisor that hangs a stock kernel (E2E-NOTES.md §1). Set
	// E2E_ACCEL=kvm where VT-x/AMD-V really works.
	accel := "tcg,thread=multi"
	if a := os.Getenv("E2E_ACCEL"); a != "" {
		accel = a
	}
	args := []string{
		"-machine", "q35", "-accel", accel, "-cpu", "max", "-smp", "2", "-m", "3072",
		"-nographic", "-monitor", "none", "-vga", "none", "-serial", "file:" + v.serial,
		"-kernel", env.guestKernel, "-initrd", env.guestInitrd,
		"-append", "root=/dev/vda rw console=ttyS0 panic=-1",
		"-drive", "file=" + overlay + ",format=qcow2,if=virtio,cache=unsafe",
		// hostfwd: the API server reaches the kubelet (logs, exec) on the
		// node's address, which run.sh routes to lo in the namespace.
		"-nic", fmt.Sprintf("user,model=virtio-net-pci,restrict=on,%s,%s,%s,hostfwd=tcp:%s:%d-%s:%d",
			fwd(registryPort), fwd(mirrorPort), fwd(apiServerPort), guestNodeIP, kubeletPort, guestNodeIP, kubeletPort),
		"-device", "virtio-serial",
		"-chardev", "socket,path=" + qga + ",server=on,wait=off,id=qga0",
		"-device", "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0",
	}
	if seed != "" {
		args = append(args, "-drive", "file="+seed+",format=raw,if=virtio,readonly=on")
	}
	v.cmd = exec.Command("qemu-system-x86_64", args...)
	out, err := os.Create(filepath.Join(dir, "qemu.log"))
	if err != nil {
		t.Fatal(err)
	}
	v.cmd.Stdout, v.cmd.Stderr = out, out
	// qemu must not outlive a test binary that is killed.
	v.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	v.started = time.Now()
	if err := v.cmd.Start(); err != nil {
		t.Fatalf("start qemu: %v", err)
	}
	go func() { v.done <- v.cmd.Wait(); out.Close() }()
	v.agent = &agent{sock: qga}
	t.Cleanup(v.stop)
	return v
}

// stop kills qemu: the overlay is thrown away, so a clean poweroff (which
// waits ~90 s for the machine's kubelet and shims) buys nothing.
func (v *vm) stop() {
	if v.cmd.ProcessState != nil {
		return
	}
	v.agent.close()
	v.cmd.Process.Kill()
	<-v.done
}

// since is the time from qemu start, for the timings the test prints.
func (v *vm) since() time.Duration { return time.Since(v.started).Round(100 * time.Millisecond) }

// waitAgent waits for the guest agent, failing fast when qemu dies.
func (v *vm) waitAgent(ctx context.Context) {
	v.t.Helper()
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	go func() {
		select {
		case err := <-v.done:
			v.done <- err
			cancel()
		case <-ctx.Done():
		}
	}()
	if err := v.agent.connect(ctx); err != nil {
		v.t.Fatalf("guest agent: %v\nserial tail:\n%s", err, v.serialTail(40))
	}
}

// sh runs script in the guest and returns its result; an agent failure is fatal.
func (v *vm) sh(ctx context.Context, script string) execResult {
	v.t.Helper()
	r, err := v.agent.exec(ctx, script)
	if err != nil {
		v.t.Fatalf("guest: %v\nserial tail:\n%s", err, v.serialTail(40))
	}
	return r
}

// must runs script and fails the test when it exits non-zero.
func (v *vm) must(ctx context.Context, script string) string {
	v.t.Helper()
	r := v.sh(ctx, script)
	if r.Code != 0 {
		v.t.Fatalf("guest: %s: exit %d\nstdout: %s\nstderr: %s", script, r.Code, r.Stdout, r.Stderr)
	}
	return r.Stdout
}

// poll runs script every 2 s until it exits 0 or timeout passes.
func (v *vm) poll(ctx context.Context, timeout time.Duration, what, script string) (execResult, bool) {
	v.t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		r := v.sh(ctx, script)
		if r.Code == 0 {
			return r, true
		}
		if time.Now().After(deadline) {
			v.t.Errorf("%s: not within %s: last exit %d\nstdout: %s\nstderr: %s", what, timeout, r.Code, r.Stdout, r.Stderr)
			return r, false
		}
		time.Sleep(2 * time.Second)
	}
}

func (v *vm) serialTail(n int) string { return tailFile(v.serial, n) }

// tailFile is the last n lines of the file at path.
func tailFile(path string, n int) string {
	b, _ := os.ReadFile(path)
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

func run(t *testing.T, name string, args ...string) string {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}
