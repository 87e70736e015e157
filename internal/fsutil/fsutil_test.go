package fsutil

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
)

// failingReader yields some bytes, then an error, like a download cut off
// half-way.
type failingReader struct{ sent bool }

func (r *failingReader) Read(p []byte) (int, error) {
	if !r.sent {
		r.sent = true
		return copy(p, "half of the new conte"), nil
	}
	return 0, errors.New("connection lost")
}

func listDir(t *testing.T, dir string) []string {
	t.Helper()
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range ents {
		names = append(names, e.Name())
	}
	return names
}

func TestWriteReaderFailureKeepsOldContents(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "config")
	if err := WriteFile(path, []byte("old"), 0o644, -1, -1); err != nil {
		t.Fatal(err)
	}
	err := WriteReader(path, &failingReader{}, 0o600, -1, -1)
	if err == nil || !strings.Contains(err.Error(), "connection lost") || !strings.Contains(err.Error(), path) {
		t.Fatalf("WriteReader error = %v, want one naming %s and the cause", err, path)
	}
	got, err := os.ReadFile(path)
	if err != nil || string(got) != "old" {
		t.Fatalf("after a failed write the file holds %q (%v), want the old contents", got, err)
	}
	if names := listDir(t, dir); len(names) != 1 {
		t.Errorf("directory holds %v, want only the original file (no temp files)", names)
	}
}

func TestWriteFileModesAndOwners(t *testing.T) {
	old := syscall.Umask(0o077)
	defer syscall.Umask(old)
	tests := []struct {
		name     string
		mode     os.FileMode
		uid, gid int
		root     bool
	}{
		{name: "executable", mode: 0o755, uid: -1, gid: -1},
		{name: "secret", mode: 0o600, uid: -1, gid: -1},
		{name: "world readable despite umask", mode: 0o644, uid: -1, gid: -1},
		{name: "setuid survives chown", mode: 0o755 | os.ModeSetuid, uid: 1000, gid: 1000, root: true},
		{name: "owned by nobody", mode: 0o640, uid: 65534, gid: 65534, root: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if tt.root && os.Geteuid() != 0 {
				t.Skip("chown to another user needs root")
			}
			path := filepath.Join(t.TempDir(), "f")
			if err := WriteFile(path, []byte("x"), tt.mode, tt.uid, tt.gid); err != nil {
				t.Fatal(err)
			}
			fi, err := os.Stat(path)
			if err != nil {
				t.Fatal(err)
			}
			want := tt.mode & (os.ModePerm | os.ModeSetuid)
			if got := fi.Mode() & (os.ModePerm | os.ModeSetuid); got != want {
				t.Errorf("mode = %v, want %v", got, want)
			}
			st := fi.Sys().(*syscall.Stat_t)
			wantUID, wantGID := tt.uid, tt.gid
			if wantUID < 0 {
				wantUID, wantGID = os.Geteuid(), os.Getegid()
			}
			if int(st.Uid) != wantUID || int(st.Gid) != wantGID {
				t.Errorf("owner = %d:%d, want %d:%d", st.Uid, st.Gid, wantUID, wantGID)
			}
		})
	}
}

func TestWriteFileReplacesSymlinkInsteadOfWritingThrough(t *testing.T) {
	dir := t.TempDir()
	outside := filepath.Join(dir, "outside")
	if err := os.WriteFile(outside, []byte("precious"), 0o644); err != nil {
		t.Fatal(err)
	}
	link := filepath.Join(dir, "link")
	if err := os.Symlink(outside, link); err != nil {
		t.Fatal(err)
	}
	if err := WriteFile(link, []byte("new"), 0o644, -1, -1); err != nil {
		t.Fatal(err)
	}
	if got, _ := os.ReadFile(outside); string(got) != "precious" {
		t.Errorf("symlink target changed to %q", got)
	}
	fi, err := os.Lstat(link)
	if err != nil || !fi.Mode().IsRegular() {
		t.Fatalf("%s is %v (%v), want a regular file", link, fi.Mode(), err)
	}
}

func TestSymlink(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "l")
	for _, target := range []string{"/dev/null", "/dev/null", "../other"} {
		if err := Symlink(target, path, -1, -1); err != nil {
			t.Fatalf("Symlink(%q): %v", target, err)
		}
		if got, err := os.Readlink(path); err != nil || got != target {
			t.Fatalf("link points to %q (%v), want %q", got, err, target)
		}
	}
	if names := listDir(t, dir); len(names) != 1 {
		t.Errorf("directory holds %v, want only the link", names)
	}
	// A regular file in the way is replaced.
	file := filepath.Join(dir, "file")
	os.WriteFile(file, nil, 0o644)
	if err := Symlink("/x", file, -1, -1); err != nil {
		t.Fatal(err)
	}
	if got, _ := os.Readlink(file); got != "/x" {
		t.Errorf("file was not replaced by a link, readlink = %q", got)
	}
}

func TestMkdirAll(t *testing.T) {
	old := syscall.Umask(0o077)
	defer syscall.Umask(old)
	root := t.TempDir()
	path := filepath.Join(root, "a", "b", "c")
	if err := MkdirAll(path, 0o700, -1, -1); err != nil {
		t.Fatal(err)
	}
	for p, want := range map[string]os.FileMode{
		filepath.Join(root, "a"):      0o755,
		filepath.Join(root, "a", "b"): 0o755,
		path:                          0o700,
	} {
		fi, err := os.Stat(p)
		if err != nil || !fi.IsDir() || fi.Mode().Perm() != want {
			t.Errorf("%s: %v %v, want a directory with mode %v", p, fi.Mode(), err, want)
		}
	}
	// An existing directory gets its mode corrected.
	if err := MkdirAll(path, 0o750, -1, -1); err != nil {
		t.Fatal(err)
	}
	if fi, _ := os.Stat(path); fi.Mode().Perm() != 0o750 {
		t.Errorf("existing directory mode = %v, want 0750", fi.Mode().Perm())
	}
	// A file in the way is an error, not silently replaced.
	file := filepath.Join(root, "file")
	os.WriteFile(file, nil, 0o644)
	if err := MkdirAll(file, 0o755, -1, -1); err == nil {
		t.Error("MkdirAll over a regular file succeeded")
	}
	if err := MkdirAll(filepath.Join(file, "sub"), 0o755, -1, -1); err == nil {
		t.Error("MkdirAll below a regular file succeeded")
	}
}

func TestMkdirAllOwner(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("chown to another user needs root")
	}
	path := filepath.Join(t.TempDir(), "kubelet")
	if err := MkdirAll(path, 0o700, 1234, 5678); err != nil {
		t.Fatal(err)
	}
	fi, _ := os.Stat(path)
	if st := fi.Sys().(*syscall.Stat_t); st.Uid != 1234 || st.Gid != 5678 {
		t.Errorf("owner = %d:%d, want 1234:5678", st.Uid, st.Gid)
	}
}

func TestFileMode(t *testing.T) {
	tests := []struct {
		in   uint32
		want os.FileMode
	}{
		{0o644, 0o644},
		{0o4755, 0o755 | os.ModeSetuid},
		{0o2755, 0o755 | os.ModeSetgid},
		{0o1777, 0o777 | os.ModeSticky},
		{0o100644, 0o644}, // file type bits from stat are ignored
	}
	for _, tt := range tests {
		if got := FileMode(tt.in); got != tt.want {
			t.Errorf("FileMode(%#o) = %v, want %v", tt.in, got, tt.want)
		}
	}
}

func TestRemoveStaleTemps(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "kubelet")
	mk := func(name string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte("x"), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	stale := mk(".kubelet.tmp-123")
	other := mk(".kubectl.tmp-456")
	target := mk("kubelet")
	busy := filepath.Join(dir, ".kubelet.tmp-dir")
	if err := os.MkdirAll(filepath.Join(busy, "child"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := RemoveStaleTemps(path); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Lstat(stale); !os.IsNotExist(err) {
		t.Errorf("the stale temp file is still there: %v", err)
	}
	for _, keep := range []string{other, target, busy} {
		if _, err := os.Lstat(keep); err != nil {
			t.Errorf("%s was removed: %v", keep, err)
		}
	}
}
