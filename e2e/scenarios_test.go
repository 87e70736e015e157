//go:build e2e

package e2e

import (
	"context"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/nodespawn/nodespawn/internal/httpx"
	"github.com/nodespawn/nodespawn/plan"
)

// firstbootCloudConfig installs and starts the first-boot unit from the
// user-data, as examples/cloud-init does.
const firstbootCloudConfig = `runcmd:
  - [/usr/local/bin/nodespawn, install, --binary, /usr/local/bin/nodespawn]
  - [systemctl, daemon-reload]
  - [systemctl, start, --no-block, nodespawn-firstboot.service]
`

const (
	firstbootUnit = "nodespawn-firstboot.service"
	bootTimeout   = 15 * time.Minute
)

// shq quotes s for /bin/sh.
func shq(s string) string { return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'" }

// inMachine is a guest command that runs script inside the nspawn machine.
func inMachine(script string) string { return inMachineOf(machineName, script) }

// inMachineOf runs script in machine m (the other one of the pair, after
// an upgrade).
func inMachineOf(m, script string) string {
	return "systemd-run -M " + m + " --wait --pipe --quiet /bin/sh -c " + shq(script)
}

// scenario is one VM with its own artifacts directory; on failure the
// guest's and the machine's journals are saved next to the serial log.
func newScenario(t *testing.T, name, userData string) (*vm, context.Context) {
	dir := filepath.Join(env.work, name)
	seed := makeSeed(t, dir, "e2e-"+name, userData)
	v := startVM(t, env, dir, seed)
	// TestNode takes 11 minutes here when the machine is quiet, 17 when it
	// is not; CI's 2 cores are slower (the run is bounded at 60m).
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Minute)
	t.Cleanup(cancel)
	t.Cleanup(func() {
		if !t.Failed() || v.cmd.ProcessState != nil {
			return
		}
		// A scenario that failed by running out of time still gets its
		// journals: the collection has its own time.
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
		defer cancel()
		if v.agent.conn == nil {
			actx, cancel := context.WithTimeout(ctx, time.Minute)
			defer cancel()
			if v.agent.connect(actx) != nil {
				t.Logf("artifacts kept in %s (guest agent gone: no journals)", dir)
				return
			}
		}
		for file, script := range map[string]string{
			"journal-guest.txt":   "journalctl -b --no-pager -o short-monotonic",
			"journal-machine.txt": inMachine("journalctl -b --no-pager -o short-monotonic"),
			"plan.json":           "/usr/local/bin/nodespawn render -o json --source auto",
		} {
			if r, err := v.agent.exec(ctx, script); err == nil {
				os.WriteFile(filepath.Join(dir, file), []byte(r.Stdout+r.Stderr), 0o644)
			}
		}
		t.Logf("artifacts kept in %s", dir)
	})
	return v, ctx
}

// reboot runs script, which must return at once and reboot the guest a
// moment later (systemd-run --on-active=1 ...), and waits until the guest
// agent answers from the new boot; it returns when the reboot began.
func (v *vm) reboot(ctx context.Context, t *testing.T, script string) time.Time {
	t.Helper()
	bootID := v.must(ctx, "cat /proc/sys/kernel/random/boot_id")
	v.must(ctx, script)
	v.agent.close()
	rebootAt := time.Now()
	deadline := time.Now().Add(5 * time.Minute)
	for {
		time.Sleep(3 * time.Second)
		v.waitAgent(ctx)
		r, err := v.agent.exec(ctx, "cat /proc/sys/kernel/random/boot_id")
		if err == nil && r.Stdout != bootID {
			return rebootAt
		}
		v.agent.close()
		if time.Now().After(deadline) {
			t.Fatalf("guest did not come back from the reboot\n%s", v.serialTail(40))
		}
	}
}

// waitFirstboot waits until the first-boot unit has run to its end and
// returns its Result property ("success", "exit-code", ...).
func waitFirstboot(ctx context.Context, v *vm) string {
	v.t.Helper()
	r, ok := v.poll(ctx, bootTimeout, firstbootUnit+" finished",
		`s=$(systemctl show -P ActiveState `+firstbootUnit+`) && [ "$s" != activating ] && [ "$(systemctl show -P ExecMainExitTimestampMonotonic `+firstbootUnit+`)" != 0 ] && systemctl show -P Result `+firstbootUnit)
	if !ok {
		v.t.FailNow()
	}
	return strings.TrimSpace(r.Stdout)
}

// TestNode boots a fresh VM whose user-data carries the manifest, checks
// the node the first-boot unit makes, reboots it, and resets it.
func TestNode(t *testing.T) {
	// The node starts one Kubernetes release behind, so the upgrade
	// below has a newer kubelet to go to.
	v, ctx := newScenario(t, "node", userData(manifest(manifestOptions{kubelet: kubeletPrev})))
	v.waitAgent(ctx)
	t.Logf("first boot: guest agent up %s after VM start", v.since())

	if res := waitFirstboot(ctx, v); res != "success" {
		t.Fatalf("%s result %q, want success\n%s", firstbootUnit, res, v.sh(ctx, "journalctl -b -u "+firstbootUnit+" --no-pager | tail -n 40").Stdout)
	}
	t.Logf("first boot: %s done %s after VM start", firstbootUnit, v.since())
	t.Run("retried a mirror that was not up", func(t *testing.T) {
		if n := env.flaky.failures(); n < httpx.DefaultPolicy.Attempts {
			t.Errorf("the mirror failed %d requests, want %d: the retry was not exercised", n, httpx.DefaultPolicy.Attempts)
		}
		r := v.sh(ctx, "journalctl -b -u "+firstbootUnit+" --no-pager -o cat | grep -c 'transient reason; trying again'")
		if strings.TrimSpace(r.Stdout) == "0" || r.Code != 0 {
			t.Errorf("the first-boot unit did not retry the run after the mirror's 503s:\n%s", v.sh(ctx, "journalctl -b -u "+firstbootUnit+" --no-pager | tail -n 30").Stdout)
		}
	})
	if _, ok := v.poll(ctx, 5*time.Minute, "kubelet active", inMachine("systemctl is-active kubelet")); !ok {
		t.FailNow()
	}
	t.Logf("TIMING first boot: VM start -> kubelet active in the machine: %s", v.since())

	t.Run("status", func(t *testing.T) { checkStatus(ctx, t, v, "done", "") })
	t.Run("console says done", func(t *testing.T) {
		serial, _ := os.ReadFile(v.serial)
		want := "nodespawn: done: machine " + machineName + " is running node "
		if !strings.Contains(string(serial), want) {
			t.Errorf("no console line %q in the serial log", want)
		}
	})
	t.Run("joins the cluster", func(t *testing.T) { checkCluster(ctx, t, v, kubeletPrev) })
	t.Run("first boot", func(t *testing.T) { checkNode(ctx, t, v) })
	t.Run("files match the plan", func(t *testing.T) { checkPlanFiles(ctx, t, v) })

	rootIno := strings.TrimSpace(v.must(ctx, "stat -c %i /var/lib/machines/"+machineName))
	record := v.must(ctx, "ls -l --time-style=full-iso /var/lib/nodespawn/")
	t.Run("reboot", func(t *testing.T) {
		// -f: no unit stop jobs (the machine's kubelet and shims take ~90 s
		// to stop); systemd still kills everything and unmounts cleanly.
		rebootAt := v.reboot(ctx, t, "sync; systemd-run --on-active=1 systemctl reboot -f")
		if _, ok := v.poll(ctx, 5*time.Minute, "kubelet active after reboot", inMachine("systemctl is-active kubelet")); !ok {
			t.FailNow()
		}
		t.Logf("TIMING reboot: reboot -> kubelet active again: %s", time.Since(rebootAt).Round(100*time.Millisecond))
		// The first-boot unit must not redo anything: the stamp skips it, or
		// it sees the same manifest applied and exits at once.
		st := v.must(ctx, "systemctl show -P ConditionResult "+firstbootUnit+"; systemctl show -P Result "+firstbootUnit)
		if f := strings.Fields(st); len(f) != 2 || (f[0] != "no" && f[1] != "success") {
			t.Errorf("%s after reboot: ConditionResult/Result %q, want it skipped or successful", firstbootUnit, st)
		}
		// The root was mounted at this boot by the machine's service.
		if r := v.sh(ctx, "journalctl -b -u systemd-nspawn@"+machineName+".service --no-pager -o cat | grep -c 'overlay root mounted'"); r.Code != 0 {
			t.Errorf("the machine's service did not mount its root at boot (no \"overlay root mounted\" in its journal of this boot): exit %d %s%s", r.Code, r.Stdout, r.Stderr)
		}
		if ino := strings.TrimSpace(v.must(ctx, "stat -c %i /var/lib/machines/"+machineName)); ino != rootIno {
			t.Errorf("machine rootfs was recreated on reboot (inode %s, was %s)", ino, rootIno)
		}
		if after := v.must(ctx, "ls -l --time-style=full-iso /var/lib/nodespawn/"); after != record {
			t.Errorf("/var/lib/nodespawn changed on reboot:\nbefore:\n%s\nafter:\n%s", record, after)
		}
		checkNode(ctx, t, v)
	})

	// Upgrades by alternating machines, on the node the reboot left: to
	// the current kubelet, then to a broken one that must be rolled back;
	// then the same two through the cluster, by fleet rollouts.
	if t.Run("upgrade", func(t *testing.T) { checkUpgrade(ctx, t, v) }) &&
		t.Run("rollback by hand, power cut mid-switch", func(t *testing.T) { checkRollbackPowerCut(ctx, t, v) }) &&
		t.Run("rollback", func(t *testing.T) { checkRollback(ctx, t, v, machineName, kubeletPrev) }) {
		t.Run("fleet rollout", func(t *testing.T) { checkFleet(ctx, t, v, machineName) })
	}

	resetOK := t.Run("reset", func(t *testing.T) {
		r := v.sh(ctx, "/usr/local/bin/nodespawn reset --yes 2>&1")
		if r.Code != 0 {
			t.Fatalf("nodespawn reset: exit %d\n%s", r.Code, r.Stdout)
		}
		checks := []struct{ what, script string }{
			{"machine gone from machined", "! machinectl list --no-legend | grep -qw " + machineName},
			{"its pair gone from machined", "! machinectl list --no-legend | grep -qw " + altMachineName},
			{"the pair's rootfs removed", "! test -e /var/lib/machines/" + altMachineName},
			{"the node's state removed", "! test -e /var/lib/nodespawn"},
			{"machine service stopped", "! systemctl is-active -q systemd-nspawn@" + machineName + ".service"},
			{"rootfs removed", "! test -e /var/lib/machines/" + machineName},
			{".nspawn file removed", "! test -e /etc/systemd/nspawn/" + machineName + ".nspawn"},
			{"service drop-in removed", "! test -e /etc/systemd/system/systemd-nspawn@" + machineName + ".service.d"},
			{"not enabled at boot", "! test -e /etc/systemd/system/machines.target.wants/systemd-nspawn@" + machineName + ".service"},
			{"no machine root mounted", "! findmnt -n -t overlay | grep /var/lib/machines/"},
			{"the roots' mount units removed", "! ls /etc/systemd/system/var-lib-machines-*.mount"},
		}
		for _, c := range checks {
			if r := v.sh(ctx, c.script); r.Code != 0 {
				t.Errorf("after reset, %s: check %q failed: %s%s", c.what, c.script, r.Stdout, r.Stderr)
			}
		}
	})

	// One more node on the same guest, now empty again: the kubelet signs in
	// with the manifest's exec credential plugin instead of a token.
	if resetOK {
		t.Run("exec credential", func(t *testing.T) { checkExecCredential(ctx, t, v) })
	}
}

// checkNode checks the running node from the guest and from inside the machine.
func checkNode(ctx context.Context, t *testing.T, v *vm) {
	t.Helper()
	v.must(ctx, "machinectl copy-to "+machineName+" /usr/local/bin/e2e-sysprobe /var/tmp/e2e-sysprobe 2>/dev/null || machinectl copy-to --force "+machineName+" /usr/local/bin/e2e-sysprobe /var/tmp/e2e-sysprobe")
	v.sh(ctx, inMachine("rm -f /sys/fs/bpf/e2e-probe"))
	checks := []struct {
		what   string
		script string
		// want lists substrings the output must hold.
		want []string
	}{
		{"machinectl lists the machine", "machinectl list --no-legend", []string{machineName, "container", "systemd-nspawn"}},
		{"systemd is PID 1 in the machine", inMachine("cat /proc/1/comm"), []string{"systemd"}},
		{"containerd active", inMachine("systemctl is-active containerd"), []string{"active"}},
		{"ctr version answers", inMachine("ctr version"), []string{"Server:", containerdVersion}},
		{"kubelet active", inMachine("systemctl is-active kubelet"), []string{"active"}},
		{"kubelet holds its client certificate from the cluster", inMachine("grep -c 'BEGIN CERTIFICATE' /var/lib/kubelet/pki/kubelet-client-current.pem"), nil},
		{"/proc/sys/net writable", inMachine("cat /proc/sys/net/ipv4/tcp_keepalive_time > /proc/sys/net/ipv4/tcp_keepalive_time && echo ok"), []string{"ok"}},
		{"rest of /proc/sys read-only", inMachine("if cat /proc/sys/kernel/panic > /proc/sys/kernel/panic 2>/dev/null; then echo writable; else echo read-only; fi"), []string{"read-only"}},
		{"/sys/fs/bpf is a bpf fs", inMachine("stat -f -c %T /sys/fs/bpf"), []string{"bpf_fs"}},
		{"bpf and perf_event_open pass the syscall filter", inMachine("/var/tmp/e2e-sysprobe /sys/fs/bpf/e2e-probe"), []string{"map create ok", "pinned", "perf_event_open: ok"}},
		{"the pin lands in /run/bpffs/<m> on the host", "ls /run/bpffs/" + machineName + "/", []string{"e2e-probe"}},
		{"cgroup2 in the machine", inMachine("stat -f -c %T /sys/fs/cgroup"), []string{"cgroup2fs"}},
		{"controllers delegated", inMachine("cat /sys/fs/cgroup/cgroup.controllers"), []string{"cpu", "memory", "pids", "io"}},
		{"/lib/modules of the running kernel", inMachine("ls -d /lib/modules/$(uname -r)/kernel"), []string{"/kernel"}},
		// The configuration is the version this containerd reads as is.
		// containerd says "Configuration migrated from version N" (at info
		// level) when it converts an older configuration at each start, and
		// warns with msg="DEPRECATION: ..." for deprecated settings. (Its
		// plugin list names a "deprecations" plugin: not a finding.)
		{"containerd logged no migration or deprecation", inMachine(`! journalctl -u containerd --no-pager -o cat | grep -E 'Configuration migrated|msg="DEPRECATION'`) + " && echo clean", []string{"clean"}},
		// The root is an overlay of the image's layers from the layer
		// store, mounted by apply and at each start by the machine's
		// service (nodespawn mount-root), never by a mount unit; containerd
		// inside keeps its overlayfs snapshotter, on the node's state bound
		// from the host (overlayfs cannot be an overlayfs upper directory).
		// The lower directories show as lowerdir=a:b (mount(2), the guest's
		// kernel) or lowerdir+=a,lowerdir+=b (by descriptor, Linux 6.13+).
		{"the machine root is an overlay of the layer store", "findmnt -n -o FSTYPE,OPTIONS /var/lib/machines/" + machineName, []string{"overlay", "lowerdir", "=/var/lib/nodespawn/layers/sha256/", "upperdir=/var/lib/nodespawn/machines/" + machineName + "/overlay/upper"}},
		{"no mount unit for it", "test -e /etc/systemd/system/var-lib-machines-" + machineName + ".mount || echo none", []string{"none"}},
		{"the machine's service mounts its root before it starts", "systemctl show -P ExecStartPre systemd-nspawn@" + machineName + ".service", []string{"/usr/local/bin/nodespawn mount-root " + machineName}},
		{"containerd's overlayfs snapshotter loaded", inMachine("ctr plugins ls | grep -w io.containerd.snapshotter.v1 | grep -w overlayfs"), []string{" ok"}},
		{"pod images unpacked by it into the node's state", "test $(ls /var/lib/nodespawn/node/containerd/io.containerd.snapshotter.v1.overlayfs/snapshots | wc -l) -gt 0 && echo snapshots", []string{"snapshots"}},
		{"pods get upstream resolvers", inMachine("grep -h nameserver /etc/kubernetes/resolv.conf"), []string{"nameserver 10.0.2.3"}},
		{"kubelet registers the default route's address", inMachine("cat /etc/systemd/system/kubelet.service.d/10-nodespawn.conf"), []string{"--node-ip=10.0.2.15"}},
	}
	// Every check's output goes to checks-<test>.txt beside the serial log,
	// so a passing run can be read too.
	var report strings.Builder
	defer func() {
		name := strings.ReplaceAll(t.Name(), "/", "_")
		os.WriteFile(filepath.Join(v.dir, "checks-"+name+".txt"), []byte(report.String()), 0o644)
	}()
	for _, c := range checks {
		r := v.sh(ctx, c.script)
		fmt.Fprintf(&report, "== %s\n$ %s\nexit %d\n%s%s\n", c.what, c.script, r.Code, r.Stdout, r.Stderr)
		ok := r.Code == 0
		for _, w := range c.want {
			ok = ok && strings.Contains(r.Stdout, w)
		}
		if !ok {
			t.Errorf("%s: %s: exit %d, want output with %q\nstdout: %s\nstderr: %s", c.what, c.script, r.Code, c.want, r.Stdout, r.Stderr)
		}
	}
}

// checkPlanFiles compares every file and link the plan (nodespawn apply
// --dry-run -o json, on the guest) says it writes with what is on disk.
func checkPlanFiles(ctx context.Context, t *testing.T, v *vm) {
	out := v.must(ctx, "/usr/local/bin/nodespawn render -o json --source auto")
	var p plan.Plan
	if err := json.Unmarshal([]byte(out), &p); err != nil {
		t.Fatalf("dry-run JSON: %v\n%s", err, out)
	}
	want := map[string]string{} // path -> "sha256 mode" or "-> target"
	for _, s := range p.Steps {
		switch {
		case s.File != nil && s.File.Source == nil && !s.File.Secret && s.File.Overwrite:
			b := []byte(s.File.Contents)
			if s.File.Encoding == "base64" {
				var err error
				if b, err = base64.StdEncoding.DecodeString(s.File.Contents); err != nil {
					t.Fatalf("step %s: %v", s.ID, err)
				}
			}
			sum := sha256.Sum256(b)
			want[s.File.Path] = fmt.Sprintf("%s %o", hex.EncodeToString(sum[:]), s.File.Mode)
		case s.Link != nil && !s.Link.Hard:
			want[s.Link.Path] = "-> " + s.Link.Target
		}
	}
	if len(want) < 10 {
		t.Fatalf("the plan lists only %d files and links; want the whole node's", len(want))
	}
	paths := make([]string, 0, len(want))
	for p := range want {
		paths = append(paths, p)
	}
	sort.Strings(paths)
	var script strings.Builder
	for _, p := range paths {
		if strings.HasPrefix(want[p], "-> ") {
			fmt.Fprintf(&script, "printf '%%s\\t-> %%s\\n' %s \"$(readlink %s)\"\n", shq(p), shq(p))
		} else {
			fmt.Fprintf(&script, "printf '%%s\\t%%s %%s\\n' %s \"$(sha256sum < %s | cut -d' ' -f1)\" \"$(stat -c %%a %s)\"\n", shq(p), shq(p), shq(p))
		}
	}
	got := map[string]string{}
	for _, line := range strings.Split(v.must(ctx, script.String()), "\n") {
		if k, val, ok := strings.Cut(line, "\t"); ok {
			got[k] = val
		}
	}
	for _, p := range paths {
		if got[p] != want[p] {
			t.Errorf("%s: on disk %q, plan says %q", p, got[p], want[p])
		}
	}
	t.Logf("%d files and links match the plan", len(paths))
}

// TestBadArtifact gives runc a wrong sha256: the first-boot unit must fail,
// say which step failed with both digests on the console, start no machine,
// and leave no unverified binary in the rootfs.
func TestBadArtifact(t *testing.T) {
	wrong := sha256.Sum256([]byte("not runc"))
	wrongHex := hex.EncodeToString(wrong[:])
	realHex := fileSHA256(t, env.mirrorFiles["runc"])
	v, ctx := newScenario(t, "bad-artifact", userData(manifest(manifestOptions{runcSHA256: wrongHex})))
	v.waitAgent(ctx)
	if res := waitFirstboot(ctx, v); res == "success" {
		t.Fatalf("%s succeeded with a wrong runc digest", firstbootUnit)
	}
	t.Logf("bad artifact: %s failed %s after VM start", firstbootUnit, v.since())

	var p plan.Plan
	if err := json.Unmarshal([]byte(v.must(ctx, "/usr/local/bin/nodespawn render -o json --source auto")), &p); err != nil {
		t.Fatal(err)
	}
	stepID := ""
	for _, s := range p.Steps {
		if s.Download != nil && s.Download.Name == "runc" {
			stepID = s.ID
		}
	}
	if stepID == "" {
		t.Fatal("the plan has no download step for runc")
	}
	serial, _ := os.ReadFile(v.serial)
	found := false
	for _, line := range strings.Split(string(serial), "\n") {
		if strings.Contains(line, stepID) && strings.Contains(line, wrongHex) && strings.Contains(line, realHex) {
			found = true
			t.Logf("console: %s", strings.TrimSpace(line))
			break
		}
	}
	if !found {
		t.Errorf("no console line names step %s and both digests (want %s, got %s)\njournal:\n%s", stepID, wrongHex, realHex,
			v.sh(ctx, "journalctl -b -u "+firstbootUnit+" --no-pager | tail -n 30").Stdout)
	}
	t.Run("status", func(t *testing.T) { checkStatus(ctx, t, v, "error", stepID) })
	checks := []struct{ what, script string }{
		{"no machine registered", "! machinectl list --no-legend | grep -qw " + machineName},
		{"machine service never started", "[ \"$(systemctl show -P ExecMainStartTimestampMonotonic systemd-nspawn@" + machineName + ".service)\" = 0 ]"},
		{"no runc in the rootfs", "! test -e /var/lib/machines/" + machineName + "/usr/local/bin/runc"},
		{"no file with runc's bytes anywhere under /var/lib", "! find /var/lib /tmp /var/tmp -xdev -type f -size +1M -exec sha256sum {} + 2>/dev/null | grep -q " + realHex},
	}
	for _, c := range checks {
		if r := v.sh(ctx, c.script); r.Code != 0 {
			t.Errorf("%s: check %q failed: %s%s", c.what, c.script, r.Stdout, r.Stderr)
		}
	}
}

// checkStatus runs nodespawn status on the guest as a user would after
// first boot (--wait, so it also covers a run still going) and checks the
// state, the exit code that goes with it, and, for an error, the step named.
func checkStatus(ctx context.Context, t *testing.T, v *vm, state, failedStep string) {
	t.Helper()
	human := v.sh(ctx, "/usr/local/bin/nodespawn status --wait --timeout 5m --long --timings 2>&1")
	t.Logf("nodespawn status --wait --long --timings: exit %d\n%s", human.Code, human.Stdout)
	r := v.sh(ctx, "/usr/local/bin/nodespawn status -o json --timings")
	var st struct {
		Version string `json:"version"`
		State   string `json:"status"`
		Summary string `json:"summary"`
		Machine string `json:"machine"`
		Step    *struct {
			ID    string `json:"id"`
			Error string `json:"error"`
		} `json:"step"`
		Finished int `json:"finished"`
		Total    int `json:"total"`
		Timings  *struct {
			Blame        []json.RawMessage `json:"blame"`
			CriticalPath []json.RawMessage `json:"criticalPath"`
		} `json:"timings"`
	}
	if err := json.Unmarshal([]byte(r.Stdout), &st); err != nil {
		t.Fatalf("status -o json: exit %d: %v\n%s%s", r.Code, err, r.Stdout, r.Stderr)
	}
	wantCode := map[string]int{"done": 0, "error": 1}[state]
	if st.State != state || r.Code != wantCode || human.Code != wantCode {
		t.Errorf("status %q (exit %d, --wait exit %d), want %q (exit %d)\n%s", st.State, r.Code, human.Code, state, wantCode, r.Stdout)
	}
	if !strings.HasPrefix(human.Stdout, st.Summary) {
		t.Errorf("status --wait printed %q first, want the summary %q", strings.SplitN(human.Stdout, "\n", 2)[0], st.Summary)
	}
	switch state {
	case "done":
		if st.Machine != machineName || st.Total == 0 || st.Finished != st.Total {
			t.Errorf("done, but machine %q and %d/%d steps with an outcome", st.Machine, st.Finished, st.Total)
		}
		if st.Timings == nil || len(st.Timings.Blame) == 0 || len(st.Timings.CriticalPath) == 0 {
			t.Errorf("status --timings gave no blame or critical path:\n%s", r.Stdout)
		}
	case "error":
		if st.Step == nil || st.Step.ID != failedStep || !strings.Contains(st.Step.Error, "sha256") {
			t.Errorf("status names step %+v, want %s with its digest error", st.Step, failedStep)
		}
		if !strings.Contains(human.Stdout, failedStep) {
			t.Errorf("status --long does not name step %s", failedStep)
		}
	}
}

func fileSHA256(t *testing.T, p string) string {
	t.Helper()
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256(b)
	return hex.EncodeToString(sum[:])
}
