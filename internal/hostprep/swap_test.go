package hostprep

import (
	"context"
	"errors"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"unsafe"

	"golang.org/x/sys/unix"
)

func TestCommentSwapEntries(t *testing.T) {
	m := swapMarker
	tests := []struct {
		name, in, want string
		n              int
	}{
		{
			name: "uuid swap entry, comments mentioning swap kept",
			in: "# /etc/fstab: static file system information.\n" +
				"# swap was on /dev/sda5 during installation\n" +
				"UUID=1234-abcd /               ext4    errors=remount-ro 0       1\n" +
				"UUID=5678-ef01 none            swap    sw              0       0\n",
			want: "# /etc/fstab: static file system information.\n" +
				"# swap was on /dev/sda5 during installation\n" +
				"UUID=1234-abcd /               ext4    errors=remount-ro 0       1\n" +
				m + "\n#UUID=5678-ef01 none            swap    sw              0       0\n",
			n: 1,
		},
		{
			name: "swap in other fields is not a swap entry",
			in: "/dev/vdb1\t/swapdata\text4\tdefaults,nofail\t0\t2\n" +
				"LABEL=swap /mnt/swap xfs defaults 0 0\n" +
				"/swapfile\tnone\tswap\tsw,pri=5\t0\t0\n",
			want: "/dev/vdb1\t/swapdata\text4\tdefaults,nofail\t0\t2\n" +
				"LABEL=swap /mnt/swap xfs defaults 0 0\n" +
				m + "\n#/swapfile\tnone\tswap\tsw,pri=5\t0\t0\n",
			n: 1,
		},
		{
			name: "missing fields, blank lines, indented entry, no final newline",
			in:   "\n/dev/sdb\n/dev/sdc /data\n   \t/dev/sdd   swap   swap   defaults\n/dev/sde none swap",
			want: "\n/dev/sdb\n/dev/sdc /data\n" +
				m + "\n#   \t/dev/sdd   swap   swap   defaults\n" +
				m + "\n#/dev/sde none swap",
			n: 2,
		},
		{
			name: "already disabled",
			in:   m + "\n#/swapfile none swap sw 0 0\n#/dev/sdb2 none swap sw 0 0\n",
			want: m + "\n#/swapfile none swap sw 0 0\n#/dev/sdb2 none swap sw 0 0\n",
		},
		{
			name: "crlf line endings",
			in:   "/dev/sda1 / ext4 defaults 0 1\r\n/dev/sda2 none swap sw 0 0\r\n",
			want: "/dev/sda1 / ext4 defaults 0 1\r\n" + m + "\r\n#/dev/sda2 none swap sw 0 0\r\n",
			n:    1,
		},
		{name: "empty", in: "", want: ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, n := commentSwapEntries([]byte(tt.in))
			if string(got) != tt.want || n != tt.n {
				t.Errorf("got %d changes:\n%s\nwant %d:\n%s", n, got, tt.n, tt.want)
			}
			again, n2 := commentSwapEntries(got)
			if n2 != 0 || string(again) != string(got) {
				t.Errorf("second pass changed %d entries", n2)
			}
		})
	}
}

func TestActiveSwaps(t *testing.T) {
	p := filepath.Join(t.TempDir(), "swaps")
	data := "Filename\t\t\t\tType\t\tSize\t\tUsed\t\tPriority\n" +
		"/dev/vda3                               partition\t1048572\t\t0\t\t-2\n" +
		`/var/lib/swap\040file                   file		8188		0		-3` + "\n"
	if err := os.WriteFile(p, []byte(data), 0o644); err != nil {
		t.Fatal(err)
	}
	got, err := activeSwaps(p)
	if err != nil {
		t.Fatal(err)
	}
	if want := []string{"/dev/vda3", "/var/lib/swap file"}; !slices.Equal(got, want) {
		t.Errorf("activeSwaps = %q, want %q", got, want)
	}
}

func TestUnescapeOctal(t *testing.T) {
	for in, want := range map[string]string{
		`/a\040b\011c\134`: "/a b\tc\\",
		`/plain`:           "/plain",
		`/trailing\04`:     `/trailing\04`, // too short: kept
		`/not\999octal`:    `/not\999octal`,
		`/big\777`:         `/big\777`, // past a byte: kept
	} {
		if got := unescapeOctal(in); got != want {
			t.Errorf("unescapeOctal(%q) = %q, want %q", in, got, want)
		}
	}
}

func TestDisableSwapFake(t *testing.T) {
	tests := []struct {
		name       string
		procSwaps  string // empty: no proc/swaps file
		fstab      string // empty: no fstab file
		failOn     string
		wantOff    []string
		wantFstab  string
		wantErr    string
		wantChange bool
	}{
		{
			name:       "active areas and fstab",
			procSwaps:  "Filename Type Size Used Priority\n/swapfile file 1024 0 -2\n/dev/vda3 partition 1024 0 -3\n",
			fstab:      "/dev/vda1 / ext4 defaults 0 1\n/swapfile none swap sw 0 0\n",
			wantOff:    []string{"/swapfile", "/dev/vda3"},
			wantFstab:  "/dev/vda1 / ext4 defaults 0 1\n" + swapMarker + "\n#/swapfile none swap sw 0 0\n",
			wantChange: true,
		},
		{
			name:  "no proc, no swap entries",
			fstab: "/dev/vda1 / ext4 defaults 0 1\n",
		},
		{
			name: "no fstab at all",
		},
		{
			name:      "swapoff failure keeps fstab",
			procSwaps: "Filename Type Size Used Priority\n/swapfile file 1024 0 -2\n",
			fstab:     "/swapfile none swap sw 0 0\n",
			failOn:    "/swapfile",
			wantOff:   []string{"/swapfile"},
			wantFstab: "/swapfile none swap sw 0 0\n",
			wantErr:   "swapoff /swapfile: cannot allocate memory",
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			root := t.TempDir()
			write := func(rel, s string) {
				if s == "" {
					return
				}
				p := filepath.Join(root, rel)
				if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
					t.Fatal(err)
				}
				if err := os.WriteFile(p, []byte(s), 0o640); err != nil {
					t.Fatal(err)
				}
			}
			write("proc/swaps", tt.procSwaps)
			write("etc/fstab", tt.fstab)
			var off []string
			fake := func(p string) error {
				off = append(off, p)
				if p == tt.failOn {
					return syscall.ENOMEM
				}
				return nil
			}
			err := disableSwap(context.Background(), slog.Default(), root, "/etc/fstab", fake)
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("err = %v, want %q", err, tt.wantErr)
				}
			} else if err != nil {
				t.Fatal(err)
			}
			if !slices.Equal(off, tt.wantOff) {
				t.Errorf("swapoff calls = %q, want %q", off, tt.wantOff)
			}
			if tt.fstab == "" {
				if _, err := os.Stat(filepath.Join(root, "etc/fstab")); !errors.Is(err, os.ErrNotExist) {
					t.Errorf("fstab created: %v", err)
				}
				return
			}
			want := tt.wantFstab
			if want == "" {
				want = tt.fstab
			}
			fi, err := os.Stat(filepath.Join(root, "etc/fstab"))
			if err != nil {
				t.Fatal(err)
			}
			if fi.Mode().Perm() != 0o640 {
				t.Errorf("fstab mode = %v, want 0640 kept", fi.Mode().Perm())
			}
			got, _ := os.ReadFile(filepath.Join(root, "etc/fstab"))
			if string(got) != want {
				t.Errorf("fstab =\n%s\nwant\n%s", got, want)
			}
			entries, _ := os.ReadDir(filepath.Join(root, "etc"))
			if len(entries) != 1 {
				t.Errorf("etc holds %d entries, want only fstab (temp file left behind?)", len(entries))
			}
		})
	}
}

// TestDisableSwapReal turns off a real swap file that the test itself turned
// on. The fake root's proc/swaps lists only that file, so the host's own swap
// is never touched.
func TestDisableSwapReal(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root for swapon/swapoff")
	}
	if _, err := exec.LookPath("mkswap"); err != nil {
		t.Skip("mkswap not found: install the util-linux package")
	}
	// Swap files need a disk file system; t.TempDir may be tmpfs.
	dir, err := os.MkdirTemp("/var/tmp", "nodespawn-swap-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	swapFile := filepath.Join(dir, "swap file") // a blank, escaped by the kernel
	if err := os.WriteFile(swapFile, make([]byte, 8<<20), 0o600); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("mkswap", swapFile).CombinedOutput(); err != nil {
		t.Fatalf("mkswap: %v: %s", err, out)
	}
	p, _ := unix.BytePtrFromString(swapFile)
	if _, _, errno := unix.Syscall(unix.SYS_SWAPON, uintptr(unsafe.Pointer(p)), 0, 0); errno != 0 {
		t.Skipf("swapon %s: %v: this kernel or file system cannot swap to a file", swapFile, errno)
	}
	t.Cleanup(func() { swapoff(swapFile) })

	real, err := os.ReadFile("/proc/swaps")
	if err != nil {
		t.Fatal(err)
	}
	escaped := strings.ReplaceAll(swapFile, " ", `\040`)
	var ours []string
	for _, line := range strings.Split(string(real), "\n") {
		if strings.HasPrefix(line, escaped+" ") {
			ours = append(ours, line)
		}
	}
	if len(ours) != 1 {
		t.Fatalf("swap file not in /proc/swaps:\n%s", real)
	}
	root := t.TempDir()
	os.MkdirAll(filepath.Join(root, "proc"), 0o755)
	os.MkdirAll(filepath.Join(root, "etc"), 0o755)
	if err := os.WriteFile(filepath.Join(root, "proc/swaps"), []byte("Filename Type Size Used Priority\n"+ours[0]+"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	fstab := escaped + " none swap sw 0 0\n"
	if err := os.WriteFile(filepath.Join(root, "etc/fstab"), []byte(fstab), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := (Host{Root: root}).DisableSwap(context.Background(), "/etc/fstab"); err != nil {
		t.Fatal(err)
	}
	after, _ := os.ReadFile("/proc/swaps")
	if strings.Contains(string(after), escaped) {
		t.Errorf("swap file still active:\n%s", after)
	}
	got, _ := os.ReadFile(filepath.Join(root, "etc/fstab"))
	if want := swapMarker + "\n#" + fstab; string(got) != want {
		t.Errorf("fstab = %q, want %q", got, want)
	}
}
