package render_test

import (
	"strings"
	"testing"

	"github.com/nodespawn/nodespawn/manifest"
	"github.com/nodespawn/nodespawn/plan"
	"github.com/nodespawn/nodespawn/render"
)

// TestStoreFromFacts: render decides from what the probe saw whether a
// machine root is composed from the layer store, and says why not: under
// store auto in the image step's summary, under store layers in the
// error.
func TestStoreFromFacts(t *testing.T) {
	for _, tt := range []struct {
		name string
		ls   *plan.LayerStoreFacts
		why  string // "": a layer root
	}{
		{"ext4", &plan.LayerStoreFacts{Overlay: true, StateDirFilesystem: "ext4"}, ""},
		{"tmpfs, layers by descriptor", &plan.LayerStoreFacts{Overlay: true, LayerFDs: true, StateDirFilesystem: "tmpfs"}, ""},
		{"not probed", nil, "the host's overlayfs support is unknown (facts without layerStore)"},
		{"no overlayfs", &plan.LayerStoreFacts{StateDirFilesystem: "ext4"}, "the kernel has no overlay filesystem (not in /proc/filesystems, no overlay module)"},
		{"nfs", &plan.LayerStoreFacts{Overlay: true, StateDirFilesystem: "nfs"}, "/var/lib/nodespawn is on nfs, which cannot hold an overlayfs upper directory"},
		{"zfs", &plan.LayerStoreFacts{Overlay: true, StateDirFilesystem: "zfs"}, "/var/lib/nodespawn is on zfs, which nodespawn does not use for overlayfs upper directories (only ext4, xfs, btrfs, f2fs, tmpfs)"},
		{"unnamed", &plan.LayerStoreFacts{Overlay: true, StateDirFilesystem: "0x1234"}, "/var/lib/nodespawn is on a filesystem of type 0x1234, which nodespawn does not use"},
		{"filesystem not said", &plan.LayerStoreFacts{Overlay: true}, "the filesystem under /var/lib/nodespawn is unknown"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			f := loadFacts(t, "cpu")
			f.LayerStore = tt.ls
			m := loadManifest(t, "minimal")
			p, err := render.Plan(m, f)
			if err != nil {
				t.Fatal(err)
			}
			img := imageStep(t, p)
			if tt.why == "" {
				if img.Image.Layers == nil || strings.Contains(img.Summary, "(flattened: ") {
					t.Fatalf("store auto: no layer root: %s", img.Summary)
				}
				want := 500
				if !tt.ls.LayerFDs {
					want = img.Image.Layers.MaxLayers // the classic bound, whatever the paths give
					if want >= 500 || want < 30 {
						t.Errorf("MaxLayers without layers by descriptor = %d", want)
					}
				}
				if img.Image.Layers.MaxLayers != want {
					t.Errorf("MaxLayers = %d, want %d", img.Image.Layers.MaxLayers, want)
				}
			} else {
				if img.Image.Layers != nil || !strings.Contains(img.Summary, "(flattened: "+tt.why) {
					t.Errorf("store auto: summary %q, want it flattened: %s", img.Summary, tt.why)
				}
			}

			m.Machine.Rootfs.Store = manifest.StoreLayers
			_, err = render.Plan(m, f)
			switch {
			case tt.why == "" && err != nil:
				t.Errorf("store layers: %v", err)
			case tt.why != "" && (err == nil || !strings.Contains(err.Error(), "cannot compose machine roots with overlayfs: "+tt.why)):
				t.Errorf("store layers: error %v, want one saying %s", err, tt.why)
			}
		})
	}
}

// imageStep is p's rootfs image step.
func imageStep(t *testing.T, p *plan.Plan) plan.Step {
	t.Helper()
	for _, s := range p.Steps {
		if s.Image != nil {
			return s
		}
	}
	t.Fatal("no image step")
	return plan.Step{}
}
