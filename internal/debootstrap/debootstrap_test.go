package debootstrap

import (
	"context"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/nodespawn/nodespawn/internal/confine/confinetest"
	"github.com/nodespawn/nodespawn/internal/rootfs/rootfstest"
)

// fakeDebootstrap puts a debootstrap on PATH that records its arguments
// and, unless told to fail, writes a file into the target directory. A real
// debootstrap needs a Debian mirror, which tests do not have; this checks
// the command line and the staging, rename and marker around it.
func fakeDebootstrap(t *testing.T, fail bool) (argsFile string) {
	t.Helper()
	bin := t.TempDir()
	argsFile = filepath.Join(bin, "args")
	// The target debootstrap gets is a /proc/<pid>/fd path (see
	// confine.Root.InDir); where it leads is recorded after the arguments.
	script := `#!/bin/sh
printf '%s\n' "$@" > ` + argsFile + `
eval dir=\"\${$(($# - 1))}\"; readlink -f "$dir" >> ` + argsFile + `
`
	if fail {
		script += "echo 'E: Failed getting release file' >&2\nexit 1\n"
	} else {
		script += `eval target=\"\${$(($# - 1))}\"; mkdir -p "$target/etc" && echo debian > "$target/etc/os-release"` + "\n"
	}
	if err := os.WriteFile(filepath.Join(bin, "debootstrap"), []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	t.Setenv("PATH", bin+string(os.PathListSeparator)+os.Getenv("PATH"))
	return argsFile
}

func TestDebootstrap(t *testing.T) {
	ctx := context.Background()
	argsFile := fakeDebootstrap(t, false)
	parent := rootfstest.MachinesDir(t)
	dest := filepath.Join(parent, "deb")
	req := Request{Suite: "bookworm", Mirror: "http://deb.example/debian", Include: []string{"systemd", "dbus"}, Root: confinetest.HostRoot(t), Dest: dest, Log: testLogger(t)}

	res, err := Build(ctx, req)
	if err != nil || res.NoOp {
		t.Fatalf("Debootstrap: NoOp=%v err=%v", res.NoOp, err)
	}
	args, _ := os.ReadFile(argsFile)
	lines := strings.Split(strings.TrimSpace(string(args)), "\n")
	if len(lines) != 6 || lines[0] != "--variant=minbase" || lines[1] != "--include=systemd,dbus" || lines[2] != "bookworm" ||
		!strings.HasPrefix(lines[3], "/proc/") || lines[4] != "http://deb.example/debian" ||
		!strings.HasPrefix(filepath.Base(lines[5]), ".deb.staging-") || filepath.Dir(lines[5]) != parent {
		t.Errorf("debootstrap ran with %q, want --variant=minbase --include=systemd,dbus bookworm <staging beside dest> mirror", lines)
	}
	if b, _ := os.ReadFile(filepath.Join(dest, "etc/os-release")); string(b) != "debian\n" {
		t.Errorf("rootfs not renamed into place: etc/os-release = %q", b)
	}
	rootfstest.AssertOnly(t, parent, ".deb.nodespawn-image", "deb")

	if res, err := Build(ctx, req); err != nil || !res.NoOp {
		t.Errorf("rerun: NoOp=%v err=%v, want a no-op", res.NoOp, err)
	}
	req.Include = append(req.Include, "iproute2")
	if res, err := Build(ctx, req); err != nil || res.NoOp {
		t.Errorf("changed include list: NoOp=%v err=%v, want a rebuild", res.NoOp, err)
	}
}

func TestDebootstrapFailureLeavesNothing(t *testing.T) {
	fakeDebootstrap(t, true)
	parent := rootfstest.MachinesDir(t)
	_, err := Build(context.Background(), Request{Suite: "bookworm", Mirror: "http://deb.example/debian",
		Root: confinetest.HostRoot(t), Dest: filepath.Join(parent, "deb"), Log: testLogger(t)})
	if err == nil || !strings.Contains(err.Error(), "Failed getting release file") {
		t.Fatalf("err = %v, want debootstrap's stderr in it", err)
	}
	rootfstest.AssertOnly(t, parent)
}

func testLogger(t testing.TB) *slog.Logger {
	return slog.New(slog.NewTextHandler(io.Discard, nil))
}
