package apply

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"path"
	"strings"

	"github.com/opencontainers/go-digest"

	"github.com/nodespawn/nodespawn/internal/confine"
	"github.com/nodespawn/nodespawn/internal/layers"
	"github.com/nodespawn/nodespawn/internal/layout"
	"github.com/nodespawn/nodespawn/internal/machine"
	"github.com/nodespawn/nodespawn/internal/oci"
	"github.com/nodespawn/nodespawn/plan"
	"github.com/nodespawn/nodespawn/state"
)

// machinesDir is where machined keeps machine root directories (render
// puts every rootfs there).
const machinesDir = layout.MachinesDir

// collectLayers deletes the layers in the layer store that no machine root
// is made of: none listed in a machine's overlay record
// (machines/<m>/overlay/image.json) and none a mounted overlayfs uses as a
// lower directory, whatever the records say. It runs after a successful
// switch, with the apply lock held, so no pull or compose runs meanwhile.
func CollectLayers(host *confine.Root, log *slog.Logger) ([]digest.Digest, error) {
	if _, err := host.Lstat(layout.LayerStoreDir); errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	store, err := layers.Open(host, layout.LayerStoreDir)
	if err != nil {
		return nil, err
	}
	keep, err := store.InUse()
	if err != nil {
		return nil, err
	}
	es, err := host.ReadDir(state.MachinesDir)
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return nil, err
	}
	for _, e := range es {
		img, err := layers.ReadImage(host, layout.OverlayDir(e.Name()))
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

// MountRoot mounts the root of machine m in root as its overlay record
// says, as apply does: what the machine's service runs before it starts
// (`nodespawn mount-root`). A machine without a record has a flattened
// root (or none) and nothing is done.
func MountRoot(ctx context.Context, root, m string, log *slog.Logger) error {
	if m == "" || m == "." || m == ".." || strings.Contains(m, "/") {
		return fmt.Errorf("mount-root: %q is not a machine name", m)
	}
	host, err := openRoot(root)
	if err != nil {
		return err
	}
	defer host.Close()
	lm := machine.LayerRoot(path.Join(machinesDir, m), layout.OverlayDir(m))
	if _, err := host.Lstat(layout.LayerStoreDir); errors.Is(err, fs.ErrNotExist) {
		if img, err := layers.ReadImage(host, lm.Dir); err != nil || img == nil {
			log.Info("machine root is not made of layers; nothing to mount", "machine", m)
			return err
		}
	}
	store, err := layers.Open(host, layout.LayerStoreDir)
	if err != nil {
		return err
	}
	found, err := store.Mount(ctx, lm, log)
	if err == nil && !found {
		log.Info("machine root is not made of layers; nothing to mount", "machine", m)
	}
	return err
}

// removeLayerRoot undoes a root made of layers at rootfs when the machine
// gets a flattened tree instead (machine.rootfs.store flat, a host that
// lost overlayfs, an image too deep to mount): the overlay is unmounted,
// its record, upper and work directories removed, and a mount unit an
// older nodespawn wrote for it too. The store's layers stay for the
// collection after a switch. changed is false when there was none.
func removeLayerRoot(ctx context.Context, host *confine.Root, rootfs string, log *slog.Logger) (changed bool, err error) {
	lm := machine.LayerRoot(rootfs, layout.OverlayDir(path.Base(rootfs)))
	mounted, _, err := layers.MountedIn(host, rootfs)
	if err != nil {
		return false, err
	}
	if mounted {
		if err := layers.Unmount(ctx, host, rootfs, machine.DefaultRemoveTimeout, log); err != nil {
			return false, err
		}
		changed = true
	}
	if _, err := host.Lstat(lm.Dir); err == nil {
		if err := host.RemoveAll(lm.Dir); err != nil {
			return changed, err
		}
		log.Info("removed the machine's overlay record, upper and work directories: its root is a flattened tree now", "path", host.Show(lm.Dir))
		changed = true
	} else if !errors.Is(err, fs.ErrNotExist) {
		return changed, err
	}
	removed, err := layers.RemoveLegacyUnit(host, lm.Unit, log)
	return changed || removed, err
}

// MaxLayers is the most layers one mount of img's root (a layer-store
// image step) takes on this kernel, with the layer store in root: an
// image with more distinct layers is flattened or refused before any
// layer is fetched.
func MaxLayers(root string, img *plan.Image) (int, error) {
	host, err := confine.Open(root)
	if err != nil {
		return 0, err
	}
	defer host.Close()
	return layers.At(host, img.Layers.Store).MaxLayers(machine.LayerRoot(img.Dest, img.Layers.Dir)), nil
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
