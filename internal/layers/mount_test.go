package layers

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/nodespawn/nodespawn/internal/confine"
	"github.com/nodespawn/nodespawn/internal/confine/confinetest"
)

// ways runs fn with the root mounted each way this kernel can: by
// descriptor (where overlayfs takes layers that way) and by path.
func ways(t *testing.T, fn func(t *testing.T)) {
	t.Helper()
	requireRoot(t)
	if KernelTakesLayerFDs() {
		t.Run("descriptor", fn)
	} else {
		t.Log("this kernel's overlayfs does not take layers by descriptor; the path way only")
	}
	t.Run("path", func(t *testing.T) {
		classicOnly = true
		t.Cleanup(func() { classicOnly = false })
		fn(t)
	})
}

// layerSet unpacks n layers, layer i holding the file "i" and "top"
// (whose contents name the layer), and returns their DiffIDs bottom first.
func layerSet(t *testing.T, s *Store, prefix string, n int) []digest.Digest {
	t.Helper()
	var ids []digest.Digest
	for i := range n {
		l := id(fmt.Sprintf("%s-%d", prefix, i))
		if _, err := s.Unpack(context.Background(), l, fill(s.root, map[string]string{fmt.Sprint(i): "x", "top": fmt.Sprint(i)})); err != nil {
			t.Fatal(err)
		}
		ids = append(ids, l)
	}
	return ids
}

// TestComposeRepeatedLayers: an image that lists a layer twice (the empty
// layer of older builders, or any repeated diff_id) mounts, each layer
// once at its topmost position, and shows what the flat tree would: the
// last copy's files on top. The record keeps the image's full list.
func TestComposeRepeatedLayers(t *testing.T) {
	ways(t, func(t *testing.T) {
		s, base := newStore(t)
		ctx := context.Background()
		ls := layerSet(t, s, "l", 3)
		empty := id("empty")
		if _, err := s.Unpack(ctx, empty, fill(s.root, nil)); err != nil {
			t.Fatal(err)
		}
		a, b, c := ls[0], ls[1], ls[2]
		// bottom first: a, empty, b, a, empty, c, empty
		image := []digest.Digest{a, empty, b, a, empty, c, empty}
		m := machine(base, "kube1")
		unmountAtEnd(t, s, m)
		if _, err := s.Compose(ctx, m, Image{Manifest: id("m"), Layers: image}, quiet); err != nil {
			t.Fatalf("Compose of an image with repeated layers: %v", err)
		}
		want := []digest.Digest{empty, c, a, b}
		if got := s.LowerLayers(image); !slices.Equal(got, want) {
			t.Fatalf("LowerLayers = %v, want %v", got, want)
		}
		if _, super, _ := MountedAt(m.Target); !slices.Equal(mountedLayers(super), want) {
			t.Fatalf("mounted %v (%s), want %v", mountedLayers(super), super, want)
		}
		if got, err := os.ReadFile(filepath.Join(m.Target, "top")); err != nil || string(got) != "2" {
			t.Fatalf("top = %q (%v), want the top layer's", got, err)
		}
		for _, f := range []string{"0", "1", "2"} {
			if _, err := os.Stat(filepath.Join(m.Target, f)); err != nil {
				t.Errorf("%s: %v", f, err)
			}
		}
		rec, err := ReadImage(s.root, m.Dir)
		if err != nil || rec == nil || !slices.Equal(rec.Layers, image) {
			t.Fatalf("record %+v (%v), want the image's full list", rec, err)
		}
		// Nothing to do the second time: the mount is seen as the record's.
		if changed, err := s.Compose(ctx, m, Image{Manifest: id("m"), Layers: image}, quiet); err != nil || changed {
			t.Fatalf("second Compose: changed=%v err=%v", changed, err)
		}
	})
}

// TestComposeDeepImage: 128 layers (and the most overlayfs stacks) mount
// by descriptor, with no page of options to fill.
func TestComposeDeepImage(t *testing.T) {
	requireRoot(t)
	if !KernelTakesLayerFDs() {
		t.Skip("this kernel's overlayfs does not take layers by descriptor")
	}
	s, base := newStore(t)
	ctx := context.Background()
	ls := layerSet(t, s, "deep", 128)
	m := machine(base, "kube1")
	unmountAtEnd(t, s, m)
	if _, err := s.Compose(ctx, m, Image{Manifest: id("m"), Layers: ls}, quiet); err != nil {
		t.Fatalf("Compose of 128 layers: %v", err)
	}
	if got, err := os.ReadFile(filepath.Join(m.Target, "top")); err != nil || string(got) != "127" {
		t.Fatalf("top = %q (%v)", got, err)
	}
	for _, f := range []string{"0", "64", "127"} {
		if _, err := os.Stat(filepath.Join(m.Target, f)); err != nil {
			t.Errorf("%s: %v", f, err)
		}
	}
	if _, super, _ := MountedAt(m.Target); len(mountedLayers(super)) != 128 {
		t.Fatalf("the mount table shows %d layers", len(mountedLayers(super)))
	}
	used, err := s.InUse()
	if err != nil || len(used) < 128 {
		t.Fatalf("InUse: %d layers (%v)", len(used), err)
	}
	if s.MaxLayers(m) != MaxStack {
		t.Errorf("MaxLayers = %d, want %d", s.MaxLayers(m), MaxStack)
	}
}

// TestComposeTooDeepForPaths: where the layers go by path, one page of
// options bounds them; one more than ClassicMaxLayers is refused with
// the numbers and the way out, before anything is mounted, and exactly
// ClassicMaxLayers mount.
func TestComposeTooDeepForPaths(t *testing.T) {
	requireRoot(t)
	classicOnly = true
	t.Cleanup(func() { classicOnly = false })
	s, base := newStore(t)
	ctx := context.Background()
	m := machine(base, "kube1")
	max := ClassicMaxLayers(s.root.Dir(), s.dir, m.Dir)
	if max < 10 || max > 60 || s.MaxLayers(m) != max {
		t.Fatalf("ClassicMaxLayers = %d, MaxLayers %d", max, s.MaxLayers(m))
	}
	ls := layerSet(t, s, "l", max+1)
	unmountAtEnd(t, s, m)
	_, err := s.Compose(ctx, m, Image{Manifest: id("deep"), Layers: ls}, quiet)
	var deep *TooDeepError
	if !errors.As(err, &deep) || deep.Layers != max+1 || deep.Max != max || !strings.Contains(err.Error(), "flat") {
		t.Fatalf("Compose of %d layers by path: %v, want a TooDeepError naming %d", max+1, err, max)
	}
	if mounted, _, _ := MountedAt(m.Target); mounted {
		t.Fatal("mounted anyway")
	}
	if _, err := s.Compose(ctx, m, Image{Manifest: id("fits"), Layers: ls[:max]}, quiet); err != nil {
		t.Fatalf("Compose of %d layers by path: %v", max, err)
	}
	// The classic formula is the real limit: the options of max layers fit.
	if got := ClassicMaxLayers("/", "/var/lib/nodespawn/layers", "/var/lib/nodespawn/machines/kube1/overlay"); got != 39 {
		t.Errorf("ClassicMaxLayers for the host's paths = %d, want 39", got)
	}
}

// TestMountFromRecord: what the machine's service runs at boot mounts the
// root its record names, as Compose did, and does nothing for a machine
// without a record (a flattened root).
func TestMountFromRecord(t *testing.T) {
	ways(t, func(t *testing.T) {
		s, base := newStore(t)
		ctx := context.Background()
		ls := layerSet(t, s, "l", 2)
		m := machine(base, "kube1")
		unmountAtEnd(t, s, m)
		if found, err := s.Mount(ctx, m, quiet); err != nil || found {
			t.Fatalf("Mount without a record: found=%v err=%v", found, err)
		}
		if _, err := s.Compose(ctx, m, Image{Manifest: id("m"), Layers: ls}, quiet); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(m.Target, "written"), []byte("by the machine"), 0o644); err != nil {
			t.Fatal(err)
		}
		if err := Unmount(ctx, s.root, m.Target, time.Second, quiet); err != nil {
			t.Fatal(err)
		}
		if found, err := s.Mount(ctx, m, quiet); err != nil || !found {
			t.Fatalf("Mount: found=%v err=%v", found, err)
		}
		if b, err := os.ReadFile(filepath.Join(m.Target, "written")); err != nil || string(b) != "by the machine" {
			t.Fatalf("after Mount: %q (%v)", b, err)
		}
		// Mounted already: nothing more (one mount, not two stacked).
		if _, err := s.Mount(ctx, m, quiet); err != nil {
			t.Fatal(err)
		}
		if err := Unmount(ctx, s.root, m.Target, time.Second, quiet); err != nil {
			t.Fatal(err)
		}
		if mounted, _, _ := MountedAt(m.Target); mounted {
			t.Fatal("a second mount was stacked")
		}
	})
}

// TestLegacyUnitRemoved: the mount unit an older nodespawn wrote for the
// root goes at the next Compose; one someone else wrote stays.
func TestLegacyUnitRemoved(t *testing.T) {
	requireRoot(t)
	s, base := newStore(t)
	ctx := context.Background()
	ls := layerSet(t, s, "l", 1)
	m := machine(base, "kube1")
	unmountAtEnd(t, s, m)
	if err := os.MkdirAll(filepath.Dir(m.Unit), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(m.Unit, []byte("# Written by nodespawn; do not edit: the next apply rewrites it.\n[Mount]\nWhere="+m.Target+"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if changed, err := s.Compose(ctx, m, Image{Manifest: id("m"), Layers: ls}, quiet); err != nil || !changed {
		t.Fatal(changed, err)
	}
	if _, err := os.Lstat(m.Unit); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("nodespawn's old mount unit stays: %v", err)
	}
	// Mounted and unchanged, the unit back: removed, and that is a change.
	if err := os.WriteFile(m.Unit, []byte("# Written by nodespawn; do not edit.\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if changed, err := s.Compose(ctx, m, Image{Manifest: id("m"), Layers: ls}, quiet); err != nil || !changed {
		t.Fatal(changed, err)
	}
	if _, err := os.Lstat(m.Unit); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("nodespawn's old mount unit stays: %v", err)
	}
	if err := os.WriteFile(m.Unit, []byte("[Mount]\nWhat=mine\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Compose(ctx, m, Image{Manifest: id("m"), Layers: ls}, quiet); err != nil {
		t.Fatal(err)
	}
	if b, err := os.ReadFile(m.Unit); err != nil || string(b) != "[Mount]\nWhat=mine\n" {
		t.Fatalf("a unit nodespawn did not write was touched: %q %v", b, err)
	}
}

// TestMountTableWithBlanks: a machine root under a directory whose name
// holds a blank and a tab (which the mount table escapes as \040 and
// \011), and a store and state directory there too when layers go by
// descriptor, are still read right from the table: the root is seen
// mounted with its layers, so a second Compose does nothing, its layers
// are in use, and Unmount finds it.
func TestMountTableWithBlanks(t *testing.T) {
	ways(t, func(t *testing.T) {
		blank := filepath.Join(t.TempDir(), "node spawn\tdir")
		base := blank
		if classicOnly {
			// Mount options cannot name a store or state directory with
			// a blank (Compose refuses it); the mount point still has one.
			base = t.TempDir()
		}
		s, err := Open(confinetest.HostRoot(t), filepath.Join(base, "layers"))
		if err != nil {
			t.Fatal(err)
		}
		m := machine(base, "kube1")
		m.Target = filepath.Join(blank, "machines", "kube 1")
		ctx := context.Background()
		ls := layerSet(t, s, "l", 2)
		unmountAtEnd(t, s, m)
		img := Image{Manifest: id("m"), Layers: ls}
		if _, err := s.Compose(ctx, m, img, quiet); err != nil {
			t.Fatal(err)
		}
		mounted, super, err := MountedAt(m.Target)
		if err != nil || !mounted {
			t.Fatalf("MountedAt(%q) = %v, %v; want mounted", m.Target, mounted, err)
		}
		if got, want := mountedLayers(super), []digest.Digest{ls[1], ls[0]}; !slices.Equal(got, want) {
			t.Errorf("mountedLayers(%s) = %v, want %v", super, got, want)
		}
		if changed, err := s.Compose(ctx, m, img, quiet); err != nil || changed {
			t.Errorf("second Compose: changed=%v err=%v; want nothing to do", changed, err)
		}
		used, err := s.InUse()
		if err != nil || !used[ls[0]] || !used[ls[1]] {
			t.Errorf("InUse = %v, %v; want both layers", used, err)
		}
		if err := Unmount(ctx, s.root, m.Target, 10*time.Second, quiet); err != nil {
			t.Fatal(err)
		}
		if mounted, _, err := MountedAt(m.Target); err != nil || mounted {
			t.Errorf("after Unmount: MountedAt = %v, %v", mounted, err)
		}
	})
}

// TestMountedLayers: both ways the mount table shows an overlayfs root's
// layers map to their DiffIDs; anything else is not a root of layers.
func TestMountedLayers(t *testing.T) {
	a, b := id("a"), id("b")
	p := func(d digest.Digest) string { return "/x/layers/sha256/" + d.Encoded() }
	for super, want := range map[string][]digest.Digest{
		"rw,lowerdir=" + p(a) + ":" + p(b) + ",upperdir=/u,workdir=/w":            {a, b},
		"rw,lowerdir+=" + p(b) + ",lowerdir+=" + p(a) + ",upperdir=/u,workdir=/w": {b, a},
		"rw,lowerdir=/usr:" + p(a) + ",upperdir=/u":                               nil,
		"rw,lowerdir+=/x/layers/sha512/" + a.Encoded():                            nil,
		// The table's escapes (a blank, a tab) are above a layer's names.
		`rw,lowerdir+=/x/my\040lay\011ers/sha256/` + b.Encoded() + `,lowerdir+=/x/my\040layers/sha256/` + a.Encoded(): {b, a},
	} {
		if got := mountedLayers(super); !slices.Equal(got, want) {
			t.Errorf("mountedLayers(%s) = %v, want %v", super, got, want)
		}
	}
}

// TestPlantedLinks: a symlink planted in the state tree at a layer, the
// upper or work directory, the overlay directory or the mount point,
// pointing out of the root, never makes a mount (or the writes through it)
// land outside: the link is refused with an error naming it, or replaced,
// or followed inside the root only. Each way the kernel is given the
// directories; -v prints the table of outcomes.
func TestPlantedLinks(t *testing.T) {
	type outcome struct{ way, link, when, result string }
	var table []outcome
	ways(t, func(t *testing.T) {
		way := strings.TrimPrefix(t.Name(), "TestPlantedLinks/")
		for _, c := range []struct {
			name string
			// prepared: the root was composed (and unmounted) before the
			// link was planted, so the record matches and only the mount
			// follows; else the link is there at the first apply.
			prepared bool
			at       func(s *Store, m Machine, l digest.Digest) string
		}{
			{"upper", false, func(s *Store, m Machine, _ digest.Digest) string { return filepath.Join(m.Dir, "upper") }},
			{"upper", true, func(s *Store, m Machine, _ digest.Digest) string { return filepath.Join(m.Dir, "upper") }},
			{"work", true, func(s *Store, m Machine, _ digest.Digest) string { return filepath.Join(m.Dir, "work") }},
			{"layer", true, func(s *Store, m Machine, l digest.Digest) string { return s.Path(l) }},
			{"overlay dir", false, func(s *Store, m Machine, _ digest.Digest) string { return m.Dir }},
			{"overlay dir", true, func(s *Store, m Machine, _ digest.Digest) string { return m.Dir }},
			{"machine state dir", true, func(s *Store, m Machine, _ digest.Digest) string { return filepath.Dir(m.Dir) }},
			{"target", true, func(s *Store, m Machine, _ digest.Digest) string { return m.Target }},
		} {
			when := "first apply"
			if c.prepared {
				when = "remount"
			}
			t.Run(strings.ReplaceAll(c.name, " ", "-")+"/"+when, func(t *testing.T) {
				base := t.TempDir()
				outside := filepath.Join(base, "outside")
				if err := os.MkdirAll(filepath.Join(outside, "upper"), 0o755); err != nil {
					t.Fatal(err)
				}
				if err := os.MkdirAll(filepath.Join(outside, "work"), 0o755); err != nil {
					t.Fatal(err)
				}
				if err := os.MkdirAll(filepath.Join(base, "root"), 0o755); err != nil {
					t.Fatal(err)
				}
				// The link's target exists inside the root too, so a link
				// followed in the root leads to a directory.
				if err := os.MkdirAll(filepath.Join(base, "root", outside), 0o755); err != nil {
					t.Fatal(err)
				}
				tree, err := confine.Open(filepath.Join(base, "root"))
				if err != nil {
					t.Fatal(err)
				}
				t.Cleanup(func() { tree.Close() })
				s, err := Open(tree, "/var/lib/nodespawn/layers")
				if err != nil {
					t.Fatal(err)
				}
				ctx := context.Background()
				l := id("layer")
				if _, err := s.Unpack(ctx, l, fill(tree, map[string]string{"etc/os-release": "layer"})); err != nil {
					t.Fatal(err)
				}
				m := Machine{Target: "/var/lib/machines/kube1", Dir: "/var/lib/nodespawn/machines/kube1/overlay", Machine: "kube1"}
				t.Cleanup(func() { Unmount(context.Background(), tree, m.Target, time.Second, quiet) })
				img := Image{Manifest: id("m"), Layers: []digest.Digest{l}}
				if c.prepared {
					if _, err := s.Compose(ctx, m, img, quiet); err != nil {
						t.Fatal(err)
					}
					if err := Unmount(ctx, tree, m.Target, time.Second, quiet); err != nil {
						t.Fatal(err)
					}
				}
				planted := c.at(s, m, l)
				host := filepath.Join(base, "root", planted)
				if err := os.MkdirAll(filepath.Dir(host), 0o755); err != nil {
					t.Fatal(err)
				}
				if c.prepared {
					// The real directory moves aside (a layer, the overlay
					// dir with its record) so the link replaces it.
					if err := os.Rename(host, host+".real"); err != nil {
						t.Fatal(err)
					}
				}
				// An absolute link: on the host it leads out of the root;
				// resolved in the root, to the same path inside it.
				if err := os.Symlink(outside, host); err != nil {
					t.Fatal(err)
				}
				_, err = s.Compose(ctx, m, img, quiet)
				result := ""
				if err != nil {
					if !strings.Contains(err.Error(), tree.Show(planted)) && !strings.Contains(err.Error(), filepath.Join(base, "root", planted)) {
						t.Errorf("the error does not name the planted link %s: %v", tree.Show(planted), err)
					}
					result = "refused: " + strings.ReplaceAll(err.Error(), base, "$T")
				} else {
					// What apply writes next (the bootstrap token, say).
					if err := os.WriteFile(filepath.Join(base, "root", m.Target, "token"), []byte("secret"), 0o600); err != nil {
						t.Fatalf("write into the mounted root: %v", err)
					}
					result = "mounted; the link followed inside the root"
					if fi, err := os.Lstat(host); err == nil && fi.Mode()&os.ModeSymlink == 0 {
						result = "mounted; the link replaced by a fresh directory"
					}
				}
				// Nothing outside changed.
				filepath.WalkDir(outside, func(p string, d os.DirEntry, err error) error {
					if err == nil && !d.IsDir() {
						t.Errorf("written outside the root: %s", p)
					}
					return nil
				})
				if mounted, _, _ := MountedAt(outside); mounted {
					t.Errorf("mounted outside the root at %s", outside)
				}
				table = append(table, outcome{way, c.name, when, result})
			})
		}
	})
	for _, o := range table {
		t.Logf("%-10s  %-17s  %-11s  %s", o.way, o.link, o.when, o.result)
	}
}
