package userdata

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/nodespawn/nodespawn/internal/command"
)

// TestNoCloudDeviceFake checks the mount/read/unmount sequence for
// a cidata block device at the command seam.
func TestNoCloudDeviceFake(t *testing.T) {
	root := t.TempDir()
	dev := filepath.Join(root, "dev/sr0")
	if err := os.MkdirAll(filepath.Join(root, "dev/disk/by-label"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(dev, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink("../../sr0", filepath.Join(root, "dev/disk/by-label/CIDATA")); err != nil {
		t.Fatal(err)
	}
	var calls []string
	var mountDir string
	run := command.RunnerFunc(func(_ context.Context, _ command.Options, name string, args ...string) ([]byte, error) {
		calls = append(calls, name+" "+strings.Join(args, " "))
		switch name {
		case "mount":
			mountDir = args[len(args)-1]
			return nil, os.WriteFile(filepath.Join(mountDir, "user-data"), fixture(t, "multipart.txt"), 0o600)
		case "umount":
			return nil, os.Remove(filepath.Join(args[0], "user-data"))
		}
		return nil, errors.New("unexpected command")
	})
	name, got, err := Read(context.Background(), "nocloud", Options{Root: root, Runner: run})
	if err != nil {
		t.Fatal(err)
	}
	if want := dev + ":user-data#part2"; name != want {
		t.Errorf("name = %q, want %q", name, want)
	}
	if !sameManifest(got, fixture(t, "manifest.yaml")) {
		t.Errorf("got:\n%s", got)
	}
	wantCalls := []string{"mount -o ro,nosuid,nodev,noexec " + dev + " " + mountDir, "umount " + mountDir}
	if strings.Join(calls, "\n") != strings.Join(wantCalls, "\n") {
		t.Errorf("calls = %q, want %q", calls, wantCalls)
	}
	if _, err := os.Stat(mountDir); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("mount point %s left behind: %v", mountDir, err)
	}
}

// TestNoCloudDeviceReal mounts a real file system labelled cidata
// (through a loop device), as a NoCloud seed arrives on a VM. The seed is
// ext4 because kernels built for CI may lack vfat and iso9660; mount(8)
// detects the type either way.
func TestNoCloudDeviceReal(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to mount")
	}
	for _, tool := range []string{"mkfs.ext4", "mount", "umount"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("%s not found: install e2fsprogs and mount", tool)
		}
	}
	dir := t.TempDir()
	seed := filepath.Join(dir, "seed")
	if err := os.Mkdir(seed, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(seed, "user-data"), fixture(t, "cloud-config-plain.yaml"), 0o600); err != nil {
		t.Fatal(err)
	}
	img := filepath.Join(dir, "seed.img")
	if out, err := exec.Command("mkfs.ext4", "-q", "-L", "cidata", "-d", seed, img, "4M").CombinedOutput(); err != nil {
		t.Fatalf("mkfs.ext4: %v: %s", err, out)
	}
	root := t.TempDir()
	if err := os.MkdirAll(filepath.Join(root, "dev/disk/by-label"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(img, filepath.Join(root, "dev/disk/by-label/cidata")); err != nil {
		t.Fatal(err)
	}
	name, got, err := Read(context.Background(), "nocloud", Options{Root: root})
	if err != nil {
		t.Fatal(err)
	}
	if want := img + ":user-data#write_files[1]"; name != want {
		t.Errorf("name = %q, want %q", name, want)
	}
	if !sameManifest(got, fixture(t, "manifest.yaml")) {
		t.Errorf("got:\n%s", got)
	}
	mounts, _ := os.ReadFile("/proc/self/mounts")
	if strings.Contains(string(mounts), "nodespawn-cidata-") {
		t.Errorf("seed still mounted:\n%s", mounts)
	}
}
