package apply

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"path"

	"github.com/opencontainers/go-digest"

	"github.com/nodespawn/nodespawn/internal/confine"
	"github.com/nodespawn/nodespawn/internal/layers"
	"github.com/nodespawn/nodespawn/internal/oci"
	"github.com/nodespawn/nodespawn/plan"
	"github.com/nodespawn/nodespawn/render"
)

// collectLayers deletes the layers in the layer store that no machine root
// is made of: none listed in a machine's overlay record
// (machines/<m>/overlay/image.json) and none a mounted overlayfs uses as a
// lower directory, whatever the records say. It runs after a successful
// switch, with the apply lock held, so no pull or compose runs meanwhile.
func collectLayers(host *confine.Root, log *slog.Logger) ([]digest.Digest, error) {
	if _, err := host.Lstat(render.LayerStoreDir); errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	store, err := layers.Open(host, render.LayerStoreDir)
	if err != nil {
		return nil, err
	}
	keep, err := store.InUse()
	if err != nil {
		return nil, err
	}
	es, err := host.ReadDir(machineStateDir)
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return nil, err
	}
	for _, e := range es {
		img, err := layers.ReadImage(host, render.OverlayDir(e.Name()))
		if err != nil {
			// A record that cannot be read may still name layers in use:
			// collect nothing rather than guess.
			return nil, fmt.Errorf("layer store: %w", err)
		}
		if img != nil {
			for _, id := range img.Layers {
				keep[id] = true
			}
		}
	}
	return store.Collect(keep, log)
}

// unmountRoot unmounts a machine root composed from the layer store (a
// no-op for a flattened one), so what is below the mount point is never
// removed through it.
func unmountRoot(ctx context.Context, host *confine.Root, rootfs string, o removeOptions) error {
	return layers.Unmount(ctx, host, rootfs, o.remove, o.log)
}

// mountUnitOf is the mount unit systemd would have for the machine root
// at rootfs.
func mountUnitOf(rootfs string) string {
	return path.Join("/etc/systemd/system", layers.UnitName(rootfs))
}

// LayerPlan is what a pull into the layer store would do with one layer.
type LayerPlan struct {
	Digest, DiffID digest.Digest
	Size           int64
	// Present is true when the host's layer store has the layer: it is
	// neither fetched nor unpacked.
	Present bool
}

// PlanLayers resolves img (a layer-store image step) in its registry or
// layout, reading the index, manifest and config only, and says which of
// its layers the layer store in root lacks. It changes nothing.
func PlanLayers(ctx context.Context, root string, img *plan.Image, log *slog.Logger) (oci.Result, []LayerPlan, error) {
	host, err := confine.Open(root)
	if err != nil {
		return oci.Result{}, nil, err
	}
	defer host.Close()
	res, ls, err := oci.Inspect(ctx, oci.Request{
		Reference: img.Reference, Layout: img.Layout, LayoutRef: img.LayoutRef, Platform: img.Platform,
		PlainHTTP: img.PlainHTTP, CredentialsFile: registryCredentials(root), Log: log,
	})
	if err != nil {
		return res, nil, err
	}
	store := layers.At(host, img.Layers.Store)
	var out []LayerPlan
	for _, l := range ls {
		have, err := store.Has(l.DiffID)
		if err != nil {
			return res, nil, err
		}
		out = append(out, LayerPlan{Digest: l.Digest, DiffID: l.DiffID, Size: l.Size, Present: have})
	}
	return res, out, nil
}
