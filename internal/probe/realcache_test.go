package probe

import (
	"context"
	"encoding/binary"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
	"github.com/nodespawn/nodespawn/plan"
)

// Directories the real-cache host keeps NVIDIA libraries in: both
// multiarch directories (their entries get that arch's flags) and one
// outside them, as GPU cloud images lay them out.
const (
	x86Dir  = "/usr/lib/x86_64-linux-gnu"
	armDir  = "/usr/lib/aarch64-linux-gnu"
	nvidDir = "/usr/local/nvidia/lib64"
)

// realCacheHost builds a root with tiny real shared objects (gcc) and has
// the real ldconfig write its cache in the given format ("new" or
// "compat"). It returns the root.
func realCacheHost(t *testing.T, format string) string {
	t.Helper()
	if _, err := exec.LookPath("gcc"); err != nil {
		t.Skip("gcc is not installed: it builds the shared objects ldconfig indexes (apt-get install gcc)")
	}
	if _, err := exec.LookPath("ldconfig"); err != nil {
		t.Skip("ldconfig is not installed (glibc's libc-bin)")
	}
	if os.Geteuid() != 0 {
		t.Skip("ldconfig -r chroots into the fake root, which needs root")
	}
	root := t.TempDir()
	src := filepath.Join(t.TempDir(), "lib.c")
	if err := os.WriteFile(src, []byte("int nodespawn_probe_test(void) { return 1; }\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	// soname -> (directory, real file name); ldconfig makes the soname
	// symlinks, as it does on a real host.
	libs := []struct{ dir, soname, file string }{
		{x86Dir, "libcuda.so.1", "libcuda.so.550.54.14"},
		{x86Dir, "libnvidia-ml.so.1", "libnvidia-ml.so.550.54.14"},
		{x86Dir, "libnvidia-container.so.1", "libnvidia-container.so.1.14.6"},
		{x86Dir, "libz.so.1", "libz.so.1.2.13"},
		{armDir, "libcuda.so.1", "libcuda.so.550.54.14"},
		{armDir, "libnvidia-ml.so.1", "libnvidia-ml.so.550.54.14"},
		{nvidDir, "libnvidia-encode.so.1", "libnvidia-encode.so.550.54.14"},
		{nvidDir, "libEGL_nvidia.so.0", "libEGL_nvidia.so.550.54.14"},
	}
	for _, l := range libs {
		dir := filepath.Join(root, l.dir)
		if err := os.MkdirAll(dir, 0o755); err != nil {
			t.Fatal(err)
		}
		out, err := exec.Command("gcc", "-shared", "-fPIC", "-nostdlib", "-Wl,-soname,"+l.soname,
			"-o", filepath.Join(dir, l.file), src).CombinedOutput()
		if err != nil {
			t.Fatalf("gcc: %v\n%s", err, out)
		}
	}
	if err := os.MkdirAll(filepath.Join(root, "etc"), 0o755); err != nil {
		t.Fatal(err)
	}
	conf := strings.Join([]string{x86Dir, armDir, nvidDir}, "\n") + "\n"
	if err := os.WriteFile(filepath.Join(root, "etc/ld.so.conf"), []byte(conf), 0o644); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("ldconfig", "-r", root, "-c", format).CombinedOutput(); err != nil {
		t.Fatalf("ldconfig -r %s -c %s: %v\n%s", root, format, err, out)
	}
	return root
}

// setArchFlags rewrites the flags of every entry in a real new-format cache
// to the ABI its directory names. gcc here builds for one architecture
// only, and ldconfig flags by the ELF header; the rest of the file stays
// exactly as glibc wrote it.
func setArchFlags(t *testing.T, cache []byte) {
	t.Helper()
	start := strings.Index(string(cache), newCacheMagic)
	if start < 0 {
		t.Fatal("no new-format part in the cache ldconfig wrote")
	}
	data := cache[start:]
	order := binary.ByteOrder(binary.LittleEndian)
	if data[28]&3 == 3 {
		order = binary.BigEndian
	}
	for i := range int(order.Uint32(data[20:24])) {
		rec := data[newHeaderSize+i*newEntrySize:]
		path, err := cString(data, order.Uint32(rec[8:12]))
		if err != nil {
			t.Fatal(err)
		}
		flags := uint32(flagELFLibc6 | flagX8664)
		if strings.HasPrefix(path, armDir+"/") {
			flags = flagELFLibc6 | flagAArch64
		}
		order.PutUint32(rec[0:4], flags)
	}
}

// TestRealLdCache has glibc's own ldconfig write caches (new and compat
// format) over real shared objects, checks the binary reader against what
// `ldconfig -p` prints for the same file, and probes the host for each
// architecture.
func TestRealLdCache(t *testing.T) {
	for _, format := range []string{"new", "compat"} {
		t.Run(format, func(t *testing.T) {
			root := realCacheHost(t, format)
			cachePath := filepath.Join(root, "etc/ld.so.cache")
			cache, err := os.ReadFile(cachePath)
			if err != nil {
				t.Fatal(err)
			}
			setArchFlags(t, cache)
			if err := os.WriteFile(cachePath, cache, 0o644); err != nil {
				t.Fatal(err)
			}

			fromBin, err := parseLdCache(cache)
			if err != nil {
				t.Fatalf("parse %s cache: %v", format, err)
			}
			text, err := exec.Command("ldconfig", "-r", root, "-p").Output()
			if err != nil {
				t.Fatalf("ldconfig -p: %v", err)
			}
			fromText, err := parseLdCache(text)
			if err != nil {
				t.Fatalf("parse ldconfig -p: %v", err)
			}
			if diff := cmp.Diff(fromText, fromBin); diff != "" {
				t.Errorf("binary cache vs ldconfig -p (-text +binary):\n%s", diff)
			}

			for _, dev := range []string{"dev/nvidia0", "dev/nvidiactl"} {
				if err := os.MkdirAll(filepath.Join(root, "dev"), 0o755); err != nil {
					t.Fatal(err)
				}
				if err := os.WriteFile(filepath.Join(root, dev), nil, 0o644); err != nil {
					t.Fatal(err)
				}
			}
			want := map[string][]plan.LibraryDir{
				"amd64": {
					{Path: x86Dir, Libraries: []string{"libcuda.so.1", "libnvidia-ml.so.1"}},
					{Path: nvidDir, Libraries: []string{"libEGL_nvidia.so.0", "libnvidia-encode.so.1"}},
				},
				"arm64": {
					{Path: armDir, Libraries: []string{"libcuda.so.1", "libnvidia-ml.so.1"}},
				},
			}
			for arch, wantDirs := range want {
				facts, err := Gather(context.Background(), Options{Root: root, Arch: arch, NVML: unavailable, Log: slog.New(slog.DiscardHandler)})
				if err != nil {
					t.Fatalf("Gather(%s): %v", arch, err)
				}
				if facts.NVIDIA == nil {
					t.Fatalf("Gather(%s): no NVIDIA facts", arch)
				}
				if diff := cmp.Diff(wantDirs, facts.NVIDIA.LibraryDirs); diff != "" {
					t.Errorf("Gather(%s) library dirs (-want +got):\n%s", arch, diff)
				}
			}
		})
	}
}

// TestLdCacheHostCrossCheck parses this machine's own binary cache and the
// text `ldconfig -p` prints from the same file: both readers must agree,
// over hundreds of real entries (hwcap subdirectories included where the
// host has them).
func TestLdCacheHostCrossCheck(t *testing.T) {
	if _, err := exec.LookPath("ldconfig"); err != nil {
		t.Skip("ldconfig is not installed (glibc's libc-bin)")
	}
	bin, err := os.ReadFile("/etc/ld.so.cache")
	if err != nil {
		t.Skipf("this machine has no readable /etc/ld.so.cache: %v", err)
	}
	// A copy, so that a package install running ldconfig meanwhile cannot
	// make the two readers look at different caches.
	copyPath := filepath.Join(t.TempDir(), "ld.so.cache")
	if err := os.WriteFile(copyPath, bin, 0o644); err != nil {
		t.Fatal(err)
	}
	text, err := exec.Command("ldconfig", "-p", "-C", copyPath).Output()
	if err != nil {
		t.Fatalf("ldconfig -p -C %s: %v", copyPath, err)
	}
	fromBin, err := parseLdCache(bin)
	if err != nil {
		t.Fatalf("parse binary cache: %v", err)
	}
	fromText, err := parseLdCache(text)
	if err != nil {
		t.Fatalf("parse ldconfig -p: %v", err)
	}
	if len(fromBin) == 0 {
		t.Fatal("binary cache parsed to no entries")
	}
	if diff := cmp.Diff(fromText, fromBin); diff != "" {
		t.Errorf("binary cache vs ldconfig -p (-text +binary):\n%s", diff)
	}
}
