package machine

import (
	"bytes"
	"errors"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/nodespawn/nodespawn/internal/confine"
	"github.com/nodespawn/nodespawn/internal/layout"
)

// TestRemoveUnmountsBPFFS mounts a real bpf filesystem where the machine's
// drop-in mounts it and checks reset leaves nothing of it: not mounted, no
// directory.
func TestRemoveUnmountsBPFFS(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to mount a bpf filesystem")
	}
	const m = "kube1"
	root := t.TempDir()
	dir := filepath.Join(root, layout.BPFFSDir(m))
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := unix.Mount("bpf", dir, "bpf", 0, "mode=0700"); err != nil {
		t.Skipf("cannot mount a bpf filesystem here: %v", err)
	}
	t.Cleanup(func() { unix.Unmount(dir, unix.MNT_DETACH) })
	var sfs unix.Statfs_t
	if err := unix.Statfs(dir, &sfs); err != nil || sfs.Type != unix.BPF_FS_MAGIC {
		t.Fatalf("bpffs not mounted at %s: %v", dir, err)
	}
	host, err := confine.Open(root)
	if err != nil {
		t.Fatal(err)
	}
	defer host.Close()
	var logBuf bytes.Buffer
	log := slog.New(slog.NewTextHandler(&logBuf, nil))
	// live: reset is on the host the machine ran on; Remove itself calls
	// this with a real systemd.
	if err := removeBPFFS(host, m, true, log); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Lstat(dir); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("reset left %s: %v", dir, err)
	}
	mounts, _ := os.ReadFile("/proc/self/mountinfo")
	if strings.Contains(string(mounts), dir) {
		t.Errorf("%s is still mounted", dir)
	}
	if !strings.Contains(logBuf.String(), "unmounted") {
		t.Errorf("reset did not say it unmounted the bpffs:\n%s", logBuf.String())
	}
}
