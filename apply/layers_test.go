package apply_test

import (
	"context"
	"errors"
	"io/fs"
	"log/slog"
	"os"
	"path"
	"path/filepath"
	"slices"
	"testing"
	"time"

	. "github.com/nodespawn/nodespawn/apply"
	"github.com/nodespawn/nodespawn/internal/applytest"
	"github.com/nodespawn/nodespawn/internal/layout"

	"github.com/opencontainers/go-digest"

	"github.com/nodespawn/nodespawn/internal/confine"
	"github.com/nodespawn/nodespawn/internal/layers"
)

// TestCollectLayersKeepsWhatMachinesUse: after a switch, the store keeps
// the layers a machine's record names and those a mounted root uses (a
// record lost or not yet written), and removes the rest.
func TestCollectLayersKeepsWhatMachinesUse(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: overlayfs mounts")
	}
	ctx := context.Background()
	log := slog.New(slog.DiscardHandler)
	rootDir := t.TempDir()
	host, err := confine.Open(rootDir)
	applytest.Must(t, err)
	t.Cleanup(func() { host.Close() }) // after the unmounts below, which use it
	store, err := layers.Open(host, layout.LayerStoreDir)
	applytest.Must(t, err)
	var ids []digest.Digest
	for _, name := range []string{"kube1's", "kube2's", "nobody's"} {
		id := digest.FromString(name)
		ids = append(ids, id)
		_, err := store.Unpack(ctx, id, func(dir string) ([]byte, error) {
			return nil, host.WriteFile(path.Join(dir, "layer"), []byte(name), 0o644, 0, 0)
		})
		applytest.Must(t, err)
	}
	compose := func(m string, id digest.Digest) layers.Machine {
		lm := layers.Machine{Target: path.Join(layout.MachinesDir, m), Dir: layout.OverlayDir(m), Unit: layers.LegacyUnit(path.Join(layout.MachinesDir, m)), Machine: m}
		_, err := store.Compose(ctx, lm, layers.Image{Manifest: digest.FromString(m), Layers: []digest.Digest{id}}, log)
		applytest.Must(t, err)
		t.Cleanup(func() { layers.Unmount(context.Background(), host, lm.Target, time.Second, log) })
		return lm
	}
	compose("kube1", ids[0])
	kube2 := compose("kube2", ids[1])
	// kube2's record is gone, but its root is still mounted.
	applytest.Must(t, os.Remove(filepath.Join(rootDir, kube2.Dir, layers.RecordName)))

	gone, err := CollectLayers(host, log)
	applytest.Must(t, err)
	if !slices.Equal(gone, []digest.Digest{ids[2]}) {
		t.Fatalf("collected %v, want only %s (no machine uses it)", gone, ids[2])
	}
	if b, err := os.ReadFile(filepath.Join(rootDir, layout.MachinesDir, "kube2", "layer")); err != nil || string(b) != "kube2's" {
		t.Fatalf("kube2's root after collection: %q, %v", b, err)
	}

	applytest.Must(t, layers.Unmount(ctx, host, kube2.Target, time.Second, log))
	gone, err = CollectLayers(host, log)
	applytest.Must(t, err)
	if !slices.Equal(gone, []digest.Digest{ids[1]}) {
		t.Fatalf("collected %v once kube2 was unmounted, want %s", gone, ids[1])
	}
	left, err := store.List()
	applytest.Must(t, err)
	if !slices.Equal(left, []digest.Digest{ids[0]}) {
		t.Fatalf("store holds %v, want kube1's layer only", left)
	}
}

// TestInstallBinary: the binary that applied a root made of layers goes
// to layout.BinaryPath (the machine's service runs it at boot), whole, and
// only when the file there differs.
func TestInstallBinary(t *testing.T) {
	log := slog.New(slog.DiscardHandler)
	rootDir := t.TempDir()
	host, err := confine.Open(rootDir)
	applytest.Must(t, err)
	defer host.Close()
	self := filepath.Join(t.TempDir(), "nodespawn")
	applytest.Must(t, os.WriteFile(self, []byte("binary v1"), 0o700))
	if changed, err := InstallBinary(host, "", log); err != nil || changed {
		t.Fatalf("no binary to install: changed=%v err=%v", changed, err)
	}
	installed := filepath.Join(rootDir, layout.BinaryPath)
	for i, want := range []bool{true, false} {
		if changed, err := InstallBinary(host, self, log); err != nil || changed != want {
			t.Fatalf("install %d: changed=%v err=%v, want changed=%v", i, changed, err, want)
		}
	}
	if b, err := os.ReadFile(installed); err != nil || string(b) != "binary v1" {
		t.Fatalf("installed %q (%v)", b, err)
	}
	if fi, err := os.Stat(installed); err != nil || fi.Mode().Perm() != 0o755 {
		t.Fatalf("installed mode %v (%v), want 0755", fi.Mode(), err)
	}
	// A run killed mid-write left its temporary file beside the binary;
	// the next install removes it, and nothing else there.
	leftover := filepath.Join(filepath.Dir(installed), confine.TempPrefix(layout.BinaryPath, "write")+"0123456789ab")
	neighbour := filepath.Join(filepath.Dir(installed), "kubectl")
	applytest.Must(t, os.WriteFile(leftover, []byte("half a bin"), 0o600))
	applytest.Must(t, os.WriteFile(neighbour, []byte("someone else's"), 0o755))
	applytest.Must(t, os.WriteFile(self, []byte("binary v2"), 0o700))
	if changed, err := InstallBinary(host, self, log); err != nil || !changed {
		t.Fatalf("a new binary: changed=%v err=%v", changed, err)
	}
	if _, err := os.Lstat(leftover); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("the killed run's temporary file is still there: %v", err)
	}
	if b, err := os.ReadFile(neighbour); err != nil || string(b) != "someone else's" {
		t.Errorf("another file beside the binary: %q %v", b, err)
	}
	if b, _ := os.ReadFile(installed); string(b) != "binary v2" {
		t.Fatalf("installed %q after the new binary", b)
	}
	// The installed file itself is not copied onto itself.
	if changed, err := InstallBinary(host, installed, log); err != nil || changed {
		t.Fatalf("run from %s: changed=%v err=%v", layout.BinaryPath, changed, err)
	}
}

// TestMountRootNames: mount-root takes a machine name, never a path, and
// needs nothing for a machine without a record.
func TestMountRootNames(t *testing.T) {
	root := t.TempDir()
	for _, m := range []string{"", ".", "..", "../kube1", "a/b"} {
		if err := MountRoot(context.Background(), root, m, slog.New(slog.DiscardHandler)); err == nil {
			t.Errorf("mount-root %q: no error", m)
		}
	}
	if err := MountRoot(context.Background(), root, "kube1", slog.New(slog.DiscardHandler)); err != nil {
		t.Errorf("mount-root of a machine without a record: %v", err)
	}
	if _, err := os.Stat(filepath.Join(root, layout.LayerStoreDir)); !os.IsNotExist(err) {
		t.Errorf("mount-root without a record made the layer store: %v", err)
	}
}
