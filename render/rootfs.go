package render

import (
	"fmt"
	"path"
	"slices"
	"strings"

	jsonpath "github.com/coreos/vcontext/path"

	"github.com/nodespawn/nodespawn/internal/layers"
	"github.com/nodespawn/nodespawn/internal/layout"
	"github.com/nodespawn/nodespawn/internal/progress"
	"github.com/nodespawn/nodespawn/internal/upstream"
	"github.com/nodespawn/nodespawn/manifest"
	"github.com/nodespawn/nodespawn/plan"
)

const imageStepID = "rootfs:image"

// debootstrapInclude is what the deprecated debootstrap rootfs needs on top
// of the minimal base: the same tools the OCI images carry.
var debootstrapInclude = []string{
	"systemd", "systemd-sysv", "dbus", "udev", "kmod", "iproute2", "iptables", "nftables",
	"procps", "curl", "ca-certificates", "wireguard-tools",
}

// renderRootfs creates the machine's root filesystem and downloads the node's
// binaries into it.
func (r *renderer) renderRootfs() error {
	src := r.m.Machine.Rootfs
	img := &plan.Image{Dest: r.rootfs, Platform: "linux/" + r.f.Arch, PlainHTTP: src.PlainHTTP,
		MaxUnpacked: manifest.Size(src.MaxUnpackedSize), MinFree: manifest.Size(src.MinFreeSpace)}
	what := ""
	switch {
	case src.Layout != nil:
		img.Layout, img.LayoutRef = src.Layout.Path, src.Layout.Reference
		if img.LayoutRef == "" {
			img.LayoutRef = "latest"
		}
		what = "unpack " + img.Layout + ":" + img.LayoutRef + " (OCI layout, " + img.Platform + ")"
	case src.Debootstrap != nil:
		d := &plan.DebootstrapSpec{Suite: src.Debootstrap.Suite, Mirror: src.Debootstrap.Mirror, Include: debootstrapInclude}
		if d.Suite == "" {
			d.Suite = "noble"
		}
		if d.Mirror == "" {
			d.Mirror = "http://archive.ubuntu.com/ubuntu"
			if r.f.Arch != "amd64" {
				d.Mirror = "http://ports.ubuntu.com/ubuntu-ports"
			}
		}
		img.Debootstrap = d
		r.warn("machine.rootfs.debootstrap is deprecated and will be removed; use an OCI image (machine.rootfs.image or layout)")
		what = "debootstrap " + d.Suite + " from " + d.Mirror + " (deprecated)"
	default:
		img.Reference = src.Image
		if r.gpu && src.GPUImage != "" {
			img.Reference = src.GPUImage
		}
		if img.Reference == "" {
			return &Error{Path: field("machine", "rootfs", "image"), Msg: "no rootfs image (load the manifest with manifest.Load so defaults apply)"}
		}
		what = "pull " + img.Reference + " (" + img.Platform + " only) and unpack it"
	}
	summary := what + " into " + r.rootfs + ", staged and renamed into place when verified"
	if lr := r.layerRoot; lr != nil && src.Debootstrap == nil {
		img.Layers = lr
		summary = what + " into the layer store " + lr.Store + " (only the layers it lacks, each verified and unpacked on its own)," +
			" and mount " + r.rootfs + " as an overlay of them, now and at each start of the machine (its service runs " + layout.BinaryPath + " mount-root)," +
			" the machine's changes in " + path.Join(lr.Dir, "upper") + "; " + deepSummary(lr)
	} else if r.flatWhy != "" {
		summary += " (flattened: " + r.flatWhy + ")"
	}
	if src.Debootstrap == nil {
		// The free space is measured at apply: render says the bound's rule.
		summary += "; refused if unpacking would leave under " + progress.Bytes(img.MinFree) + " free on its filesystem"
		if img.MinFree == 0 {
			summary = strings.TrimSuffix(summary, " would leave under 0 B free on its filesystem") + " does not fit in its filesystem's free space"
		}
		if img.MaxUnpacked > 0 {
			summary += " or would write more than " + progress.Bytes(img.MaxUnpacked)
		}
	}
	r.add(plan.Step{
		ID:      imageStepID,
		Phase:   plan.PhaseRootfs,
		Kind:    plan.KindImage,
		Summary: summary,
		Image:   img,
	})

	c := r.m.Components
	k8sVersion := r.m.Kubernetes.Version
	for _, d := range []struct {
		name string
		c    manifest.Component
		at   string
	}{
		{upstream.Containerd, c.Containerd, "containerd"},
		{upstream.Runc, c.Runc, "runc"},
		{upstream.CNIPlugins, c.CNIPlugins, "cniPlugins"},
		{upstream.Kubelet, c.Kubelet, "kubelet"},
		{upstream.Kubectl, c.Kubectl, "kubectl"},
		{upstream.KubeProxy, c.KubeProxy, "kubeProxy"},
		{upstream.Crictl, c.Crictl, "crictl"},
	} {
		if d.c.Version == "" && (d.name == upstream.Kubelet || d.name == upstream.Kubectl || d.name == upstream.KubeProxy) {
			d.c.Version = k8sVersion
		}
		if err := r.download(d.name, d.c, c.Mirror, field("components", d.at)); err != nil {
			return err
		}
	}
	return nil
}

// deepSummary says what becomes of an image with more layers than one
// overlayfs mount takes on this host.
func deepSummary(lr *plan.LayerRoot) string {
	how := "this kernel's overlayfs takes layers by descriptor, at most"
	if lr.MaxLayers < layers.MaxStack {
		how = "this kernel names a mount's layers in one page of options, at most"
	}
	then := "flattened instead (store auto), decided before any layer is fetched; so is one whose layer the store cannot show as the flattened pull would"
	if !lr.FlattenFallback {
		then = "refused before any layer is fetched (store layers); so is one whose layer the store cannot show as the flattened pull would"
	}
	return fmt.Sprintf("%s %d layers per root: an image with more is %s", how, lr.MaxLayers, then)
}

// upperFilesystems are the filesystems nodespawn puts an overlayfs upper
// directory (and the layer store beside it) on: they have what overlayfs
// needs of one (d_type, xattrs, whiteout devices, RENAME_WHITEOUT).
var upperFilesystems = []string{"ext4", "xfs", "btrfs", "f2fs", "tmpfs"}

// noUpperFilesystems are common filesystems overlayfs refuses as an upper
// layer: network and FUSE filesystems, read-only ones, overlayfs itself.
var noUpperFilesystems = []string{"overlayfs", "nfs", "fuse", "9p", "squashfs", "cifs"}

// layerStoreProblem is why the host the facts f describe cannot compose
// machine roots with overlayfs, or "" when it can: its kernel has overlayfs
// and its state directory is on a filesystem that holds upper directories.
func layerStoreProblem(f *plan.LayerStoreFacts) string {
	if f == nil {
		return "the host's overlayfs support is unknown (facts without layerStore)"
	}
	switch fs := f.StateDirFilesystem; {
	case !f.Overlay:
		return "the kernel has no overlay filesystem (not in /proc/filesystems, no overlay module)"
	case slices.Contains(upperFilesystems, fs):
		return ""
	case fs == "":
		return "the filesystem under " + layout.StateDir + " is unknown (facts without layerStore.stateDirFilesystem)"
	case slices.Contains(noUpperFilesystems, fs):
		return layout.StateDir + " is on " + fs + ", which cannot hold an overlayfs upper directory"
	default:
		if strings.HasPrefix(fs, "0x") {
			fs = "a filesystem of type " + fs
		}
		return layout.StateDir + " is on " + fs + ", which nodespawn does not use for overlayfs upper directories (only " + strings.Join(upperFilesystems, ", ") + ")"
	}
}

// decideStore chooses between a root composed from the layer store and a
// flattened tree: the manifest's machine.rootfs.store, and for auto what
// the host can do.
func (r *renderer) decideStore() error {
	src := r.m.Machine.Rootfs
	at := field("machine", "rootfs", "store")
	switch {
	case src.Store == manifest.StoreFlat:
		r.flatWhy = "machine.rootfs.store is flat"
		return nil
	case src.Debootstrap != nil:
		if src.Store == manifest.StoreLayers {
			return &Error{Path: at, Msg: "debootstrap builds one flattened tree; the layer store needs an OCI image or layout"}
		}
		return nil
	}
	if why := layerStoreProblem(r.f.LayerStore); why != "" {
		if src.Store == manifest.StoreLayers {
			return hostError(at, "is layers, but this host cannot compose machine roots with overlayfs: "+why)
		}
		r.flatWhy = why
		return nil
	}
	r.layerRoot = &plan.LayerRoot{
		Store:           layout.LayerStoreDir,
		Dir:             layout.OverlayDir(r.machine),
		MaxLayers:       layers.ClassicMaxLayers("/", layout.LayerStoreDir, layout.OverlayDir(r.machine)),
		FlattenFallback: src.Store != manifest.StoreLayers,
	}
	if r.f.LayerStore.LayerFDs {
		r.layerRoot.MaxLayers = layers.MaxStack
	}
	return nil
}

// MountUnit is where an older nodespawn wrote the mount unit of the
// machine root at root (the machine's service mounts it now). The image
// step owns the path whatever the store: apply removes a unit nodespawn
// wrote there, and a unit of anyone else's would mount the root at boot
// behind the machine's back, so no extra file may stand there.
func MountUnit(root string) string { return layers.LegacyUnit(root) }

func (r *renderer) download(name string, c manifest.Component, mirror string, at jsonpath.ContextPath) error {
	base := c.BaseURL
	if base == "" {
		base = mirror
	}
	a, err := upstream.Lookup(name, c.Version, r.f.Arch, base)
	if err != nil {
		return &Error{Path: at, Msg: err.Error()}
	}
	if c.URL != "" {
		// An explicit URL keeps the upstream's checksum file convention.
		if rest, ok := strings.CutPrefix(a.ChecksumURL, a.URL); ok {
			a.ChecksumURL = c.URL + rest
		} else {
			a.ChecksumURL = c.URL[:strings.LastIndex(c.URL, "/")+1] + path.Base(a.ChecksumURL)
		}
		a.URL = c.URL
	}
	d := &plan.Download{
		Name:    name,
		Version: strings.TrimPrefix(c.Version, "v"),
		URL:     a.URL,
		SHA256:  c.SHA256,
		Dest:    r.inRoot(a.InstallPath),
		Mode:    0o755,
		Archive: a.Archive,
	}
	if d.SHA256 == "" {
		d.ChecksumURL = a.ChecksumURL
	}
	for _, m := range a.Members {
		d.Members = append(d.Members, plan.Member{Path: m.Path, Dest: m.Dest})
	}
	verify := "pinned sha256"
	if d.SHA256 == "" {
		verify = "sha256 from " + d.ChecksumURL
	}
	r.add(plan.Step{
		ID:       "rootfs:download:" + name,
		Phase:    plan.PhaseRootfs,
		Kind:     plan.KindDownload,
		Summary:  fmt.Sprintf("download %s %s, verify (%s), install into %s", name, d.Version, verify, a.InstallPath),
		After:    []string{imageStepID},
		Download: d,
	})
	return nil
}
