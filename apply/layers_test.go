package apply

import (
	"context"
	"log/slog"
	"os"
	"path"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/nodespawn/nodespawn/internal/confine"
	"github.com/nodespawn/nodespawn/internal/layers"
	"github.com/nodespawn/nodespawn/render"
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
	must(t, err)
	t.Cleanup(func() { host.Close() }) // after the unmounts below, which use it
	store, err := layers.Open(host, render.LayerStoreDir)
	must(t, err)
	var ids []digest.Digest
	for _, name := range []string{"kube1's", "kube2's", "nobody's"} {
		id := digest.FromString(name)
		ids = append(ids, id)
		_, err := store.Unpack(ctx, id, func(dir string) ([]byte, error) {
			return nil, host.WriteFile(path.Join(dir, "layer"), []byte(name), 0o644, 0, 0)
		})
		must(t, err)
	}
	compose := func(m string, id digest.Digest) layers.Machine {
		lm := layers.Machine{Target: path.Join(machinesDir, m), Dir: render.OverlayDir(m), Unit: mountUnitOf(path.Join(machinesDir, m)), Machine: m}
		_, err := store.Compose(ctx, lm, layers.Image{Manifest: digest.FromString(m), Layers: []digest.Digest{id}}, log)
		must(t, err)
		t.Cleanup(func() { layers.Unmount(context.Background(), host, lm.Target, time.Second, log) })
		return lm
	}
	compose("kube1", ids[0])
	kube2 := compose("kube2", ids[1])
	// kube2's record is gone, but its root is still mounted.
	must(t, os.Remove(filepath.Join(rootDir, kube2.Dir, layers.RecordName)))

	gone, err := collectLayers(host, log)
	must(t, err)
	if !slices.Equal(gone, []digest.Digest{ids[2]}) {
		t.Fatalf("collected %v, want only %s (no machine uses it)", gone, ids[2])
	}
	if b, err := os.ReadFile(filepath.Join(rootDir, machinesDir, "kube2", "layer")); err != nil || string(b) != "kube2's" {
		t.Fatalf("kube2's root after collection: %q, %v", b, err)
	}

	must(t, layers.Unmount(ctx, host, kube2.Target, time.Second, log))
	gone, err = collectLayers(host, log)
	must(t, err)
	if !slices.Equal(gone, []digest.Digest{ids[1]}) {
		t.Fatalf("collected %v once kube2 was unmounted, want %s", gone, ids[1])
	}
	left, err := store.List()
	must(t, err)
	if !slices.Equal(left, []digest.Digest{ids[0]}) {
		t.Fatalf("store holds %v, want kube1's layer only", left)
	}
}
