package download

import (
	"archive/tar"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/nodespawn/nodespawn/internal/confine/confinetest"
	"github.com/nodespawn/nodespawn/plan"
)

// TestHostileArchives serves archives that try to write outside Dest and
// checks each fails with a reason and leaves the whole tree untouched:
// nothing outside Dest changes, and nothing is installed inside it either.
func TestHostileArchives(t *testing.T) {
	tests := []struct {
		name    string
		entries func(outside string) []tarEntry
		members []plan.Member
		wantErr string
	}{
		{name: "parent traversal", wantErr: "leaves the archive root", entries: func(string) []tarEntry {
			return []tarEntry{{name: "ok", body: "fine"}, {name: "../outside/evil", body: "x"}}
		}},
		{name: "traversal hidden in the middle", wantErr: "leaves the archive root", entries: func(string) []tarEntry {
			return []tarEntry{{name: "a/../../outside/evil", body: "x"}}
		}},
		{name: "absolute path", wantErr: "absolute path", entries: func(outside string) []tarEntry {
			return []tarEntry{{name: outside + "/evil", body: "x"}}
		}},
		{name: "symlink to absolute path", wantErr: "absolute path", entries: func(outside string) []tarEntry {
			return []tarEntry{{name: "link", typ: tar.TypeSymlink, link: outside}}
		}},
		{name: "relative symlink escaping", wantErr: "leads outside", entries: func(string) []tarEntry {
			return []tarEntry{{name: "dir/link", typ: tar.TypeSymlink, link: "../../outside"}}
		}},
		{name: "symlink chain escaping", wantErr: "goes through the symlink", entries: func(string) []tarEntry {
			// x/up is harmless on its own (it is the root); x/up2 goes
			// through it and one level further up.
			return []tarEntry{
				{name: "x/", typ: tar.TypeDir},
				{name: "x/up2", typ: tar.TypeSymlink, link: "up/../.."},
				{name: "x/up", typ: tar.TypeSymlink, link: ".."},
			}
		}},
		{name: "write through symlinked parent escaping", wantErr: "symlink; writing through it", entries: func(outside string) []tarEntry {
			return []tarEntry{
				{name: "lnk", typ: tar.TypeSymlink, link: "../../outside"},
				{name: "lnk/evil", body: "x"},
			}
		}},
		{name: "write through symlinked parent inside", wantErr: "symlink; writing through it", entries: func(string) []tarEntry {
			return []tarEntry{
				{name: "d/", typ: tar.TypeDir},
				{name: "lnk", typ: tar.TypeSymlink, link: "d"},
				{name: "lnk/file", body: "x"},
			}
		}},
		{name: "file over a symlink of the same name", wantErr: "duplicate entry", entries: func(outside string) []tarEntry {
			return []tarEntry{
				{name: "f", typ: tar.TypeSymlink, link: "g"},
				{name: "f", body: "x"},
			}
		}},
		{name: "duplicate file", wantErr: "duplicate entry", entries: func(string) []tarEntry {
			return []tarEntry{{name: "f", body: "first"}, {name: "./f", body: "second"}}
		}},
		{name: "hard link escaping", wantErr: "hard link", entries: func(outside string) []tarEntry {
			return []tarEntry{{name: "hl", typ: tar.TypeLink, link: "../outside/secret"}}
		}},
		{name: "hard link absolute", wantErr: "hard link", entries: func(outside string) []tarEntry {
			return []tarEntry{{name: "hl", typ: tar.TypeLink, link: outside + "/secret"}}
		}},
		{name: "device node", wantErr: "not allowed", entries: func(string) []tarEntry {
			return []tarEntry{{name: "null", typ: tar.TypeChar}}
		}},
		{name: "fifo", wantErr: "not allowed", entries: func(string) []tarEntry {
			return []tarEntry{{name: "pipe", typ: tar.TypeFifo}}
		}},
		{name: "member is a symlink", wantErr: "not a regular file", members: []plan.Member{{Path: "crictl", Dest: "crictl"}},
			entries: func(outside string) []tarEntry {
				return []tarEntry{{name: "crictl", typ: tar.TypeSymlink, link: outside + "/secret"}}
			}},
		{name: "member destination escaping", wantErr: "not a relative path", members: []plan.Member{{Path: "crictl", Dest: "../outside/evil"}},
			entries: func(string) []tarEntry { return []tarEntry{{name: "crictl", body: "x"}} }},
		{name: "member missing", wantErr: `no member "crictl"`, members: []plan.Member{{Path: "crictl", Dest: "crictl"}},
			entries: func(string) []tarEntry { return []tarEntry{{name: "other", body: "x"}} }},
		{name: "member twice", wantErr: "appears twice", members: []plan.Member{{Path: "crictl", Dest: "crictl"}},
			entries: func(string) []tarEntry {
				return []tarEntry{{name: "crictl", body: "good"}, {name: "./crictl", body: "evil"}}
			}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			root := t.TempDir()
			cache := filepath.Join(root, "cache")
			outside := filepath.Join(root, "outside")
			dest := filepath.Join(root, "rootfs", "dest")
			for _, d := range []string{outside, dest} {
				if err := os.MkdirAll(d, 0o755); err != nil {
					t.Fatal(err)
				}
			}
			os.WriteFile(filepath.Join(outside, "secret"), []byte("host secret"), 0o600)
			os.WriteFile(filepath.Join(dest, "existing"), []byte("already here"), 0o755)

			archive := makeTarGz(t, tt.entries(outside))
			sum := sha256.Sum256(archive)
			o := newOrigin(t)
			o.put("/hostile.tar.gz", archive)
			step := plan.Download{
				Name: "hostile", URL: o.srv.URL + "/hostile.tar.gz", SHA256: hex.EncodeToString(sum[:]),
				Dest: dest, Mode: 0o755, Archive: "tar.gz", Members: tt.members,
			}
			before := snapshot(t, root, cache)
			_, err := newFetcher(t, cache).Download(context.Background(), step, confinetest.HostRoot(t), step.Dest)
			if err == nil {
				t.Fatal("hostile archive was installed")
			}
			if !strings.Contains(err.Error(), tt.wantErr) || !strings.Contains(err.Error(), "nothing was installed") {
				t.Errorf("error = %v, want %q and \"nothing was installed\"", err, tt.wantErr)
			}
			if d := diffSnapshots(before, snapshot(t, root, cache)); len(d) > 0 {
				t.Errorf("a refused archive changed the tree: %v", d)
			}
			noTempFiles(t, filepath.Dir(dest), dest, cache)
		})
	}
}

// TestArchiveInstallsTreeAndSymlinks checks what a benign archive with
// subdirectories and in-tree symlinks becomes, and that a truncated archive
// installs nothing even when its first entries were fine.
func TestArchiveInstallsTreeAndSymlinks(t *testing.T) {
	root := t.TempDir()
	cache := filepath.Join(root, "cache")
	dest := filepath.Join(root, "opt", "tool")
	archive := makeTarGz(t, []tarEntry{
		{name: "./", typ: tar.TypeDir},
		{name: "bin/tool", body: "tool", mode: 0o4755},
		{name: "share/doc/README", body: "docs"},
		{name: "empty/", typ: tar.TypeDir},
		{name: "bin/alias", typ: tar.TypeSymlink, link: "tool"},
		{name: "docs", typ: tar.TypeSymlink, link: "share/doc/../doc"},
	})
	sum := sha256.Sum256(archive)
	o := newOrigin(t)
	o.put("/tool.tar.gz", archive)
	step := plan.Download{Name: "tool", URL: o.srv.URL + "/tool.tar.gz", SHA256: hex.EncodeToString(sum[:]), Dest: dest, Archive: "tar.gz"}
	res, err := newFetcher(t, cache).Download(context.Background(), step, confinetest.HostRoot(t), step.Dest)
	if err != nil {
		t.Fatal(err)
	}
	got := snapshot(t, dest)
	want := map[string]string{
		dest:                       "drwxr-xr-x",
		dest + "/bin":              "drwxr-xr-x",
		dest + "/bin/tool":         "-rwxr-xr-x tool", // setuid from the archive is dropped
		dest + "/bin/alias":        "Lrwxrwxrwx -> tool",
		dest + "/share":            "drwxr-xr-x",
		dest + "/share/doc":        "drwxr-xr-x",
		dest + "/share/doc/README": "-rw-r--r-- docs",
		dest + "/empty":            "drwxr-xr-x",
		dest + "/docs":             "Lrwxrwxrwx -> share/doc/../doc",
	}
	if d := diffSnapshots(want, got); len(d) > 0 {
		t.Errorf("installed tree differs: %v", d)
	}
	if len(res.Files) != 5 {
		t.Errorf("result lists %d entries, want 5 (the root entry is not one): %v", len(res.Files), res.Files)
	}

	// A truncated archive: valid entries first, then the stream ends.
	dest2 := filepath.Join(root, "opt", "tool2")
	cut := archive[:len(archive)*2/3]
	sum2 := sha256.Sum256(cut)
	o.put("/cut.tar.gz", cut)
	step2 := plan.Download{Name: "cut", URL: o.srv.URL + "/cut.tar.gz", SHA256: hex.EncodeToString(sum2[:]), Dest: dest2, Archive: "tar.gz"}
	if _, err := newFetcher(t, cache).Download(context.Background(), step2, confinetest.HostRoot(t), step2.Dest); err == nil {
		t.Fatal("a truncated archive was installed")
	}
	if _, err := os.Lstat(filepath.Join(dest2, "bin", "tool")); err == nil {
		t.Error("a truncated archive installed some of its files")
	}
	noTempFiles(t, filepath.Join(root, "opt"), cache)
}
