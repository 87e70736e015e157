package layers

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
	"golang.org/x/sys/unix"

	"github.com/nodespawn/nodespawn/internal/confine"
	"github.com/nodespawn/nodespawn/internal/confine/confinetest"
)

func requireRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root: overlayfs mounts, whiteout devices, trusted xattrs")
	}
}

var quiet = slog.New(slog.DiscardHandler)

func id(s string) digest.Digest { return digest.FromString(s) }

// fill writes files (name -> body) into dir, a path in root.
func fill(root *confine.Root, files map[string]string) func(string) ([]byte, error) {
	return func(dir string) ([]byte, error) {
		for name, body := range files {
			p := filepath.Join(dir, name)
			if err := root.MkdirAll(filepath.Dir(p), 0o755, 0, 0); err != nil {
				return nil, err
			}
			if err := root.WriteFile(p, []byte(body), 0o644, 0, 0); err != nil {
				return nil, err
			}
		}
		return nil, nil
	}
}

func newStore(t *testing.T) (*Store, string) {
	t.Helper()
	base := t.TempDir()
	s, err := Open(confinetest.HostRoot(t), filepath.Join(base, "layers"))
	if err != nil {
		t.Fatal(err)
	}
	return s, base
}

func names(t *testing.T, dir string) []string {
	t.Helper()
	es, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, e := range es {
		out = append(out, e.Name())
	}
	return out
}

func TestUnpackCommitsWholeOrNothing(t *testing.T) {
	s, _ := newStore(t)
	ctx := context.Background()
	a := id("a")
	boom := errors.New("boom")
	_, err := s.Unpack(ctx, a, func(dir string) ([]byte, error) {
		if _, err := fill(s.root, map[string]string{"half": "x"})(dir); err != nil {
			return nil, err
		}
		return nil, boom
	})
	if !errors.Is(err, boom) {
		t.Fatalf("Unpack: %v, want the fill's error", err)
	}
	if have, _ := s.Has(a); have {
		t.Fatal("a failed unpack left the layer in the store")
	}
	if got := names(t, s.dir); !slices.Equal(got, []string{"sha256"}) {
		t.Fatalf("store holds %v after a failed unpack, want only sha256/", got)
	}

	added, err := s.Unpack(ctx, a, fill(s.root, map[string]string{"etc/os-release": "a"}))
	if err != nil || !added {
		t.Fatalf("Unpack: added=%v err=%v", added, err)
	}
	b, err := os.ReadFile(filepath.Join(s.Path(a), "etc/os-release"))
	if err != nil || string(b) != "a" {
		t.Fatalf("layer content %q, %v", b, err)
	}
	// A layer already there is not unpacked again.
	added, err = s.Unpack(ctx, a, func(string) ([]byte, error) { t.Error("fill called for a layer in the store"); return nil, nil })
	if err != nil || added {
		t.Fatalf("second Unpack: added=%v err=%v", added, err)
	}
}

// TestUnpackAllCommitsTheLayersThatFilled: the layers of one UnpackAll
// are unpacked at once; one that fails does not take the others with it
// (they are committed, with their notes, a DiffID listed twice once),
// and nothing of the failed one or of any staging directory stays. A
// cancelled caller commits nothing.
func TestUnpackAllCommitsTheLayersThatFilled(t *testing.T) {
	s, _ := newStore(t)
	a, b, c, d := id("a"), id("b"), id("c"), id("d")
	ids := []digest.Digest{a, b, a, c, d}
	boom := errors.New("boom")
	var mu sync.Mutex
	calls := map[digest.Digest]int{}
	var others sync.WaitGroup
	others.Add(3)
	added, err := s.UnpackAll(context.Background(), ids, 4, func(ctx context.Context, i int, dir string) ([]byte, error) {
		mu.Lock()
		calls[ids[i]]++
		mu.Unlock()
		if ids[i] == c {
			// All four run at once: c fails once the others are done.
			others.Wait()
			fill(s.root, map[string]string{"half": "c"})(dir)
			return nil, boom
		}
		defer others.Done()
		if _, err := fill(s.root, map[string]string{"f": ids[i].String()})(dir); err != nil {
			return nil, err
		}
		return []byte("note of " + ids[i].String()), nil
	})
	if !errors.Is(err, boom) {
		t.Fatalf("UnpackAll: %v, want the failed fill's error", err)
	}
	if !slices.Equal(added, []digest.Digest{a, b, d}) {
		t.Errorf("added %v, want a, b, d in order", added)
	}
	for _, l := range []digest.Digest{a, b, d} {
		if calls[l] != 1 {
			t.Errorf("layer %s filled %d times, want once", l, calls[l])
		}
		note, err := s.Note(l)
		if err != nil || string(note) != "note of "+l.String() {
			t.Errorf("note of %s: %q, %v", l, note, err)
		}
		got, err := os.ReadFile(filepath.Join(s.Path(l), "f"))
		if err != nil || string(got) != l.String() {
			t.Errorf("layer %s: %q, %v", l, got, err)
		}
	}
	if have, _ := s.Has(c); have {
		t.Error("the failed layer is in the store")
	}
	if got := names(t, s.dir); !slices.Equal(got, []string{"notes", "sha256", "stamps"}) {
		t.Errorf("store holds %v, want notes/, sha256/ and stamps/ only", got)
	}

	// Cancelled while filling: nothing is committed, nothing stays.
	ctx, cancel := context.WithCancel(context.Background())
	e, f := id("e"), id("f")
	added, err = s.UnpackAll(ctx, []digest.Digest{e, f}, 2, func(_ context.Context, i int, dir string) ([]byte, error) {
		fill(s.root, map[string]string{"f": "x"})(dir)
		if i == 1 {
			cancel()
		}
		return nil, nil
	})
	if !errors.Is(err, context.Canceled) || len(added) > 0 {
		t.Fatalf("cancelled UnpackAll: added %v, err %v", added, err)
	}
	for _, l := range []digest.Digest{e, f} {
		if have, _ := s.Has(l); have {
			t.Errorf("layer %s committed by a cancelled UnpackAll", l)
		}
	}
	if got := names(t, s.dir); !slices.Equal(got, []string{"notes", "sha256", "stamps"}) {
		t.Errorf("store holds %v after a cancelled UnpackAll, want notes/, sha256/ and stamps/ only", got)
	}
	for _, l := range []digest.Digest{e, f} {
		if _, err := os.Stat(filepath.Join(s.dir, "stamps", l.Encoded())); !errors.Is(err, fs.ErrNotExist) {
			t.Errorf("a stamp of %s, which a cancelled UnpackAll did not commit: %v", l, err)
		}
	}
}

func TestUnpackSameLayerConcurrently(t *testing.T) {
	s, _ := newStore(t)
	a := id("a")
	var wg sync.WaitGroup
	errs := make([]error, 8)
	for i := range errs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			_, errs[i] = s.Unpack(context.Background(), a, fill(s.root, map[string]string{"f": "a"}))
		}()
	}
	wg.Wait()
	for _, err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
	if got := names(t, s.dir); !slices.Equal(got, []string{"sha256", "stamps"}) {
		t.Fatalf("store holds %v, want only sha256/ and stamps/ (no staging left)", got)
	}
	if got := names(t, filepath.Join(s.dir, "sha256")); !slices.Equal(got, []string{a.Encoded()}) {
		t.Fatalf("layers %v", got)
	}
}

func TestSweepAndCollect(t *testing.T) {
	s, _ := newStore(t)
	ctx := context.Background()
	ids := []digest.Digest{id("a"), id("b"), id("c")}
	for _, l := range ids {
		if _, err := s.Unpack(ctx, l, fill(s.root, map[string]string{"f": l.String()})); err != nil {
			t.Fatal(err)
		}
	}
	// What a crash leaves: a half-unpacked layer and a half-deleted one.
	for _, n := range []string{".unpack-x1", ".trash-x2/layer/deep"} {
		if err := os.MkdirAll(filepath.Join(s.dir, n), 0o700); err != nil {
			t.Fatal(err)
		}
	}
	if err := s.Sweep(quiet); err != nil {
		t.Fatal(err)
	}
	if got := names(t, s.dir); !slices.Equal(got, []string{"sha256", "stamps"}) {
		t.Fatalf("after Sweep: %v", got)
	}
	gone, err := s.Collect(map[digest.Digest]bool{ids[1]: true}, quiet)
	if err != nil {
		t.Fatal(err)
	}
	want := []digest.Digest{ids[0], ids[2]}
	slices.Sort(want)
	if !slices.Equal(gone, want) {
		t.Fatalf("Collect removed %v, want %v", gone, want)
	}
	left, _ := s.List()
	if !slices.Equal(left, []digest.Digest{ids[1]}) {
		t.Fatalf("left %v, want %v", left, ids[1])
	}
	if got := names(t, s.dir); !slices.Equal(got, []string{"sha256", "stamps"}) {
		t.Fatalf("after Collect: %v", got)
	}
	if got := names(t, filepath.Join(s.dir, "stamps")); !slices.Equal(got, []string{ids[1].Encoded()}) {
		t.Fatalf("stamps after Collect: %v, want the kept layer's only", got)
	}
}

// machine is a root in base composed of the store's layers.
func machine(base, name string) Machine {
	return Machine{
		Target:  filepath.Join(base, "machines", name),
		Dir:     filepath.Join(base, "state", name, "overlay"),
		Unit:    filepath.Join(base, "units", name+".mount"),
		Machine: name,
	}
}

func unmountAtEnd(t *testing.T, s *Store, m Machine) {
	t.Cleanup(func() {
		if err := Unmount(context.Background(), s.root, m.Target, 10*time.Second, quiet); err != nil {
			t.Errorf("cleanup: %v", err)
		}
	})
}

func TestComposeMountsUpdatesAndRemounts(t *testing.T) {
	requireRoot(t)
	s, base := newStore(t)
	ctx := context.Background()
	lower, upper, other := id("lower"), id("upper"), id("other")
	for l, files := range map[digest.Digest]map[string]string{
		lower: {"etc/os-release": "lower", "etc/keep": "keep", "opt/gone": "gone"},
		upper: {"etc/os-release": "upper"},
		other: {"etc/os-release": "other"},
	} {
		if _, err := s.Unpack(ctx, l, fill(s.root, files)); err != nil {
			t.Fatal(err)
		}
	}
	// A whiteout in the upper layer hides opt/gone.
	if err := os.MkdirAll(filepath.Join(s.Path(upper), "opt"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := unix.Mknod(filepath.Join(s.Path(upper), "opt", "gone"), unix.S_IFCHR, 0); err != nil {
		t.Fatal(err)
	}

	m := machine(base, "kube1")
	unmountAtEnd(t, s, m)
	img := Image{Source: "test", Platform: "linux/amd64", Manifest: id("m1"), Layers: []digest.Digest{lower, upper}}
	changed, err := s.Compose(ctx, m, img, quiet)
	if err != nil || !changed {
		t.Fatalf("Compose: changed=%v err=%v", changed, err)
	}
	read := func(p string) string {
		b, err := os.ReadFile(filepath.Join(m.Target, p))
		if err != nil {
			return "<" + err.Error() + ">"
		}
		return string(b)
	}
	if got := read("etc/os-release"); got != "upper" {
		t.Errorf("etc/os-release = %q, want the upper layer's", got)
	}
	if got := read("etc/keep"); got != "keep" {
		t.Errorf("etc/keep = %q", got)
	}
	if _, err := os.Lstat(filepath.Join(m.Target, "opt/gone")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("opt/gone shows through its whiteout: %v", err)
	}
	if _, super, err := MountedAt(m.Target); err != nil || !slices.Equal(mountedLayers(super), []digest.Digest{upper, lower}) {
		t.Errorf("mount table shows layers %v (%v) in %q, want upper then lower", mountedLayers(super), err, super)
	}
	// Writes go to the upper directory; the layers stay as they were.
	if err := os.WriteFile(filepath.Join(m.Target, "etc/keep"), []byte("changed"), 0o644); err != nil {
		t.Fatal(err)
	}
	if b, _ := os.ReadFile(filepath.Join(s.Path(lower), "etc/keep")); string(b) != "keep" {
		t.Fatalf("a write through the mount changed the layer: %q", b)
	}
	if b, _ := os.ReadFile(filepath.Join(m.Dir, "upper/etc/keep")); string(b) != "changed" {
		t.Fatalf("upper holds %q", b)
	}
	used, err := s.InUse()
	if err != nil || !used[lower] || !used[upper] || used[other] {
		t.Fatalf("InUse = %v (%v), want lower and upper only", used, err)
	}

	// The same image again: nothing to do, the machine's write stays.
	if changed, err := s.Compose(ctx, m, img, quiet); err != nil || changed {
		t.Fatalf("second Compose: changed=%v err=%v", changed, err)
	}
	// Unmounted (a reboot before the service mounted it): mounted again as it was.
	if err := Unmount(ctx, s.root, m.Target, time.Second, quiet); err != nil {
		t.Fatal(err)
	}
	if changed, err := s.Compose(ctx, m, img, quiet); err != nil || !changed {
		t.Fatalf("Compose after unmount: changed=%v err=%v", changed, err)
	}
	if got := read("etc/keep"); got != "changed" {
		t.Errorf("after remount etc/keep = %q, want the machine's write", got)
	}

	// Another image: a fresh upper directory on the new layers.
	img2 := Image{Source: "test", Platform: "linux/amd64", Manifest: id("m2"), Layers: []digest.Digest{lower, other}}
	if changed, err := s.Compose(ctx, m, img2, quiet); err != nil || !changed {
		t.Fatalf("Compose of another image: changed=%v err=%v", changed, err)
	}
	if got, want := read("etc/os-release")+"|"+read("etc/keep"), "other|keep"; got != want {
		t.Errorf("after the image changed: %q, want %q", got, want)
	}
	rec, err := ReadImage(s.root, m.Dir)
	if err != nil || rec == nil || rec.Manifest != img2.Manifest {
		t.Fatalf("record %+v (%v), want manifest %s", rec, err, img2.Manifest)
	}
}

func TestComposeRefusesForeignTreeReplacesFlatOne(t *testing.T) {
	requireRoot(t)
	s, base := newStore(t)
	ctx := context.Background()
	l := id("l")
	if _, err := s.Unpack(ctx, l, fill(s.root, map[string]string{"f": "layer"})); err != nil {
		t.Fatal(err)
	}
	m := machine(base, "kube1")
	unmountAtEnd(t, s, m)
	if err := os.MkdirAll(filepath.Join(m.Target, "etc"), 0o755); err != nil {
		t.Fatal(err)
	}
	img := Image{Manifest: id("m"), Layers: []digest.Digest{l}}
	_, err := s.Compose(ctx, m, img, quiet)
	if err == nil || !strings.Contains(err.Error(), "nodespawn did not make it") {
		t.Fatalf("Compose over a foreign tree: %v, want a refusal", err)
	}
	if _, err := os.Stat(filepath.Join(m.Target, "etc")); err != nil {
		t.Fatalf("the foreign tree was touched: %v", err)
	}
	// A marker that names another directory (the tree was replaced by
	// hand) does not make the tree nodespawn's.
	marker := filepath.Join(filepath.Dir(m.Target), ".kube1.nodespawn-image")
	var st unix.Stat_t
	if err := unix.Stat(m.Target, &st); err != nil {
		t.Fatal(err)
	}
	writeMarker := func(ino uint64) {
		t.Helper()
		b := fmt.Sprintf(`{"manifest":"sha256:x","dev":%d,"ino":%d}`, st.Dev, ino)
		if err := os.WriteFile(marker, []byte(b), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	writeMarker(st.Ino + 1)
	if _, err := s.Compose(ctx, m, img, quiet); err == nil || !strings.Contains(err.Error(), "nodespawn did not make it") {
		t.Fatalf("Compose over a tree its marker does not name: %v, want a refusal", err)
	}
	// A flattened rootfs nodespawn made (its marker naming it) goes.
	writeMarker(st.Ino)
	if _, err := s.Compose(ctx, m, img, quiet); err != nil {
		t.Fatalf("Compose over nodespawn's flat tree: %v", err)
	}
	if b, err := os.ReadFile(filepath.Join(m.Target, "f")); err != nil || string(b) != "layer" {
		t.Fatalf("root shows %q (%v)", b, err)
	}
	if _, err := os.Lstat(marker); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("flat marker left: %v", err)
	}
}

func TestComposeNeedsEveryLayer(t *testing.T) {
	s, base := newStore(t)
	_, err := s.Compose(context.Background(), machine(base, "kube1"), Image{Layers: []digest.Digest{id("missing")}}, quiet)
	if err == nil || !strings.Contains(err.Error(), "not in the store") {
		t.Fatalf("Compose of a missing layer: %v", err)
	}
}

func TestUnitName(t *testing.T) {
	for in, want := range map[string]string{
		"/var/lib/machines/kube1":  "var-lib-machines-kube1.mount",
		"/var/lib/machines/kube-b": `var-lib-machines-kube\x2db.mount`,
	} {
		if got := UnitName(in); got != want {
			t.Errorf("UnitName(%s) = %s, want %s", in, got, want)
		}
	}
}

// TestComposeInATreeAndThroughSymlinks: in a tree that is not the host's
// root (an image being built) a machines directory reached through a symlink is still seen mounted, so
// a second Compose does nothing and Unmount unmounts it.
func TestComposeInATreeAndThroughSymlinks(t *testing.T) {
	requireRoot(t)
	base := t.TempDir()
	tree, err := confine.Open(base)
	if err != nil {
		t.Fatal(err)
	}
	defer tree.Close()
	s, err := Open(tree, "/var/lib/nodespawn/layers")
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	l := id("l")
	if _, err := s.Unpack(ctx, l, fill(tree, map[string]string{"f": "layer"})); err != nil {
		t.Fatal(err)
	}
	// /var/lib/machines -> /srv/machines inside the tree.
	if err := os.MkdirAll(filepath.Join(base, "srv/machines"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink("/srv/machines", filepath.Join(base, "var/lib/machines")); err != nil {
		t.Fatal(err)
	}
	m := Machine{Target: "/var/lib/machines/kube1", Dir: "/var/lib/nodespawn/machines/kube1/overlay", Unit: "/etc/systemd/system/var-lib-machines-kube1.mount", Machine: "kube1"}
	t.Cleanup(func() { Unmount(context.Background(), tree, m.Target, time.Second, quiet) })
	img := Image{Manifest: id("m"), Layers: []digest.Digest{l}}
	if _, err := s.Compose(ctx, m, img, quiet); err != nil {
		t.Fatal(err)
	}
	if b, err := os.ReadFile(filepath.Join(base, "srv/machines/kube1/f")); err != nil || string(b) != "layer" {
		t.Fatalf("root through the symlink shows %q (%v)", b, err)
	}
	if changed, err := s.Compose(ctx, m, img, quiet); err != nil || changed {
		t.Fatalf("second Compose: changed=%v err=%v; want nothing to do", changed, err)
	}
	if err := Unmount(ctx, tree, m.Target, time.Second, quiet); err != nil {
		t.Fatal(err)
	}
	if mounted, _, _ := MountedAt(filepath.Join(base, "srv/machines/kube1")); mounted {
		t.Fatal("Unmount left the root mounted")
	}
}

// TestComposeOpaqueLayerRoot: overlayfs ignores the opaque mark on a
// lower directory's root, so a layer that starts with an opaque whiteout
// at its top hides the layers below it by leaving them out.
func TestComposeOpaqueLayerRoot(t *testing.T) {
	requireRoot(t)
	s, base := newStore(t)
	ctx := context.Background()
	lower, top := id("lower"), id("top")
	if _, err := s.Unpack(ctx, lower, fill(s.root, map[string]string{"old": "hidden"})); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Unpack(ctx, top, func(dir string) ([]byte, error) {
		if _, err := fill(s.root, map[string]string{"new": "shown"})(dir); err != nil {
			return nil, err
		}
		return nil, unix.Setxattr(dir, "trusted.overlay.opaque", []byte("y"), 0)
	}); err != nil {
		t.Fatal(err)
	}
	m := machine(base, "kube1")
	unmountAtEnd(t, s, m)
	if _, err := s.Compose(ctx, m, Image{Manifest: id("m"), Layers: []digest.Digest{lower, top}}, quiet); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Lstat(filepath.Join(m.Target, "old")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("the lower layer shows through the opaque top layer: %v", err)
	}
	if b, err := os.ReadFile(filepath.Join(m.Target, "new")); err != nil || string(b) != "shown" {
		t.Errorf("new = %q (%v)", b, err)
	}
}

// TestNotes: a layer's note is there with it and goes with it.
func TestNotes(t *testing.T) {
	s, _ := newStore(t)
	ctx := context.Background()
	a, b := id("a"), id("b")
	if _, err := s.Unpack(ctx, a, func(dir string) ([]byte, error) { return []byte("bin\n"), nil }); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Unpack(ctx, b, func(dir string) ([]byte, error) { return nil, nil }); err != nil {
		t.Fatal(err)
	}
	if n, err := s.Note(a); err != nil || string(n) != "bin\n" {
		t.Fatalf("note of a: %q %v", n, err)
	}
	if n, err := s.Note(b); err != nil || n != nil {
		t.Fatalf("note of b: %q %v, want none", n, err)
	}
	if _, err := s.Collect(map[digest.Digest]bool{b: true}, quiet); err != nil {
		t.Fatal(err)
	}
	if n, _ := s.Note(a); n != nil {
		t.Fatalf("a's note outlived a: %q", n)
	}
	// A note whose layer never got its name (a crash between the two).
	orphan := id("orphan")
	if err := s.writeNote(orphan, []byte("x\n")); err != nil {
		t.Fatal(err)
	}
	if err := s.Sweep(quiet); err != nil {
		t.Fatal(err)
	}
	if n, _ := s.Note(orphan); n != nil {
		t.Fatalf("Sweep kept a note without its layer")
	}
	if n, _ := s.Note(b); n != nil {
		t.Fatalf("b has no note, got %q", n)
	}
}
