package probe

import (
	"context"
	"log/slog"
	"os"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"
)

// writeTree writes files (path -> contents) under dir.
func writeTree(t *testing.T, dir string, files map[string]string) {
	t.Helper()
	for name, contents := range files {
		p := filepath.Join(dir, name)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(contents), 0o644); err != nil {
			t.Fatal(err)
		}
	}
}

func TestOverlayInKernel(t *testing.T) {
	for _, tt := range []struct {
		name  string
		files map[string]string
		want  bool
	}{
		{"listed", map[string]string{"proc/filesystems": "nodev\tsysfs\nnodev\toverlay\n\text4\n"}, true},
		{"not listed, no module lists", map[string]string{"proc/filesystems": "nodev\tsysfs\n\text4\n"}, false},
		{"nothing at all", nil, false},
		{"built in", map[string]string{"lib/modules/6.1.0-test/modules.builtin": "kernel/fs/ext4/ext4.ko\nkernel/fs/overlayfs/overlay.ko\n"}, true},
		{"a module", map[string]string{"lib/modules/6.1.0-test/modules.dep": "kernel/fs/overlayfs/overlay.ko:\n"}, true},
		{"another release's module", map[string]string{"lib/modules/5.10.0/modules.dep": "kernel/fs/overlayfs/overlay.ko:\n"}, false},
		// "overlay" as a word elsewhere on a line is not the filesystem.
		{"a name that ends otherwise", map[string]string{"proc/filesystems": "nodev\toverlay2\n"}, false},
	} {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			writeTree(t, dir, tt.files)
			got, err := overlayInKernel(dir, "6.1.0-test")
			if err != nil || got != tt.want {
				t.Errorf("overlayInKernel = %v, %v; want %v", got, err, tt.want)
			}
		})
	}
}

// TestKernelFactsIgnoreTheTree: under a Root, the kernel facts are the
// running kernel's (or the one the caller names), never read from the
// tree's own /proc and /lib/modules; the filesystem under the state
// directory is the tree's.
func TestKernelFactsIgnoreTheTree(t *testing.T) {
	running, err := RunningKernel()
	if err != nil {
		t.Fatal(err)
	}
	quiet := slog.New(slog.DiscardHandler)
	for _, tree := range []string{"nodev\toverlay\n", "nodev\tsysfs\n"} {
		root := t.TempDir()
		writeTree(t, root, map[string]string{"proc/filesystems": tree})

		f, err := Gather(context.Background(), Options{Root: root, Arch: "amd64", NVML: unavailable, Log: quiet})
		if err != nil {
			t.Fatal(err)
		}
		if got := f.LayerStore; got.Overlay != running.Overlay || got.LayerFDs != running.LayerFDs {
			t.Errorf("tree says %q: facts %+v, want the running kernel's %+v", tree, *got, running)
		}

		for _, k := range []Kernel{{Overlay: true, LayerFDs: true}, {}} {
			f, err := Gather(context.Background(), Options{Root: root, Arch: "amd64", NVML: unavailable, Log: quiet, Kernel: &k})
			if err != nil {
				t.Fatal(err)
			}
			if got := f.LayerStore; got.Overlay != k.Overlay || got.LayerFDs != k.LayerFDs {
				t.Errorf("tree says %q, Options.Kernel %+v: facts %+v", tree, k, *got)
			}
		}

		restore := SetTestKernel(Kernel{Overlay: !running.Overlay})
		f, err = Gather(context.Background(), Options{Root: root, Arch: "amd64", NVML: unavailable, Log: quiet})
		restore()
		if err != nil {
			t.Fatal(err)
		}
		if f.LayerStore.Overlay == running.Overlay {
			t.Errorf("SetTestKernel(overlay %v): facts say %v", !running.Overlay, f.LayerStore.Overlay)
		}
		f, err = Gather(context.Background(), Options{Root: root, Arch: "amd64", NVML: unavailable, Log: quiet})
		if err != nil {
			t.Fatal(err)
		}
		if f.LayerStore.Overlay != running.Overlay {
			t.Errorf("after SetTestKernel's restore: facts say overlay %v, the running kernel %v", f.LayerStore.Overlay, running.Overlay)
		}
	}
}

// TestStateDirFilesystem: the filesystem under the state directory of
// the tree, or under its nearest existing parent (the tree itself need not
// exist yet), by name, or by magic number where it has none.
func TestStateDirFilesystem(t *testing.T) {
	var shm unix.Statfs_t
	if err := unix.Statfs("/dev/shm", &shm); err != nil || shm.Type != unix.TMPFS_MAGIC {
		t.Skip("/dev/shm is not a tmpfs here")
	}
	shmRoot, err := os.MkdirTemp("/dev/shm", "probe-test-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(shmRoot) })
	if err := os.MkdirAll(filepath.Join(shmRoot, "var/lib/nodespawn"), 0o755); err != nil {
		t.Fatal(err)
	}
	for _, tt := range []struct{ name, root, want string }{
		{"state dir on tmpfs", shmRoot, "tmpfs"},
		{"a tree not made yet", filepath.Join(shmRoot, "not", "yet"), "tmpfs"},
		// procfs has no name here: its magic number stands for it.
		{"procfs", "/proc/self", "0x9fa0"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			p := &prober{root: tt.root}
			got, err := p.layerStore(Kernel{Overlay: true})
			if err != nil {
				t.Fatal(err)
			}
			if got.StateDirFilesystem != tt.want || !got.Overlay {
				t.Errorf("layerStore = %+v, want the state dir on %s", *got, tt.want)
			}
		})
	}
}
