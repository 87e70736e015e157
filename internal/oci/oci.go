// Package oci creates a machine's root filesystem from an OCI image.
//
// Pull resolves one platform's manifest from a registry or a local OCI image
// layout, streams every layer through size and digest verification,
// decompression and DiffID verification straight into a staging directory
// beside the destination, and renames the staging directory into place only
// when every check passed. Nothing else of the image is kept on disk: the
// layer being applied streams from its download through a few MiB of
// memory, and layers fetched ahead of their turn (at most
// Request.Concurrency layers are in flight) wait in a shared memory budget
// and spill what does not fit to unnamed temporary files, on another
// filesystem than the rootfs's where there is one (see spool.go).
//
// Tar entries are applied by the project's one extractor (internal/archive:
// containerd's archive.Apply, started from a staging directory the kernel
// resolved inside the root), which keeps every parent path inside the
// staging tree (symlinks included), replaces rather than follows an
// existing final component, confines hardlink targets and whiteouts to the
// tree and handles opaque directories. It refuses names that no honest
// layer has.
package oci

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"path"
	"time"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"oras.land/oras-go/v2/content"

	"github.com/nodespawn/nodespawn/internal/confine"
	"github.com/nodespawn/nodespawn/internal/httpx"
	"github.com/nodespawn/nodespawn/internal/rootfs"
)

// DefaultConcurrency is how many layers Pull fetches at once unless
// Request.Concurrency says otherwise.
const DefaultConcurrency = 3

// Request says which image to pull and where its rootfs goes. Exactly one of
// Reference and Layout is set.
type Request struct {
	// Reference is a registry reference pinned by tag or digest:
	// "registry.example/repo:tag" or "registry.example/repo@sha256:...".
	Reference string
	// Layout is a local OCI image layout directory and LayoutRef the tag or
	// digest inside it (air-gapped hosts).
	Layout    string
	LayoutRef string
	// Platform is the one platform taken from a multi-arch index, as
	// "os/arch[/variant]" (e.g. "linux/amd64", "linux/arm64/v8").
	Platform string
	// PlainHTTP lists registries (host[:port], as in Reference) reached
	// without TLS. Every other registry is reached over verified TLS.
	PlainHTTP []string
	// Root is the tree the rootfs is made in (the host root); every path
	// Pull creates, renames or removes is confined to it.
	Root *confine.Root
	// Dest is the rootfs path in Root, e.g. /var/lib/machines/kube1
	// (Pull; PullLayers fills a store, and Compose makes the root).
	Dest string
	// CredentialsFile is a docker-style config.json with registry
	// credentials; empty means anonymous pulls.
	CredentialsFile string
	// Progress, when set, is called as layers apply, never concurrently
	// (PullLayers' parallel layers take turns).
	Progress func(Progress)
	// Log receives progress and retry messages (default slog.Default()).
	Log *slog.Logger
	// HTTPClient is the registry client (default httpx.NewClient: TLS
	// verified, retries on 5xx/resets/timeouts, stalled bodies aborted). A
	// layer whose body breaks off mid-stream is resumed where it stopped,
	// as often as the client's Policy allows (httpx.PolicyOf).
	HTTPClient *http.Client
	// Concurrency bounds how many layers are fetched at once (default 3).
	Concurrency int
	// MaxUnpacked bounds the bytes one pull unpacks, all its layers
	// together, counted entry by entry before each is written: a file's
	// size rounded up to 4 KiB, plus 512 bytes and its name, link target
	// and xattrs for every entry. 0: no bound of its own.
	MaxUnpacked int64
	// MinFree is the free space the pull leaves on the filesystem it
	// writes to (Dest's, or the layer store's): the free space measured
	// when the pull starts, less MinFree, bounds it too (0: the free
	// space alone; negative: not measured, only MaxUnpacked bounds).
	// Either bound passed fails the pull with nothing of it left.
	MinFree int64
	// SpoolMemory and SpoolDir are Pull's alone: PullLayers unpacks every
	// layer as it arrives, each into its own directory, with nothing
	// fetched ahead.
	//
	// SpoolMemory is how many bytes of memory, in all, the layers fetched
	// ahead of their turn may hold (default DefaultSpoolMemory; negative:
	// none, all of them spill). The layer being applied needs none of it:
	// it streams with a few MiB of slack.
	SpoolMemory int64
	// SpoolDir is a host directory (not a path in Root) where what does
	// not fit in SpoolMemory spills, as unnamed files that a kill cannot
	// leave behind. By default the system's temporary directory is used
	// when it is on another filesystem than Dest (so the rootfs's final
	// sync does not write the spill too), else Dest's parent.
	SpoolDir string
}

// Progress reports one layer's state.
type Progress struct {
	// Layer is the 0-based index of the layer being applied, of Layers.
	Layer, Layers int
	Digest        digest.Digest
	// Read is the compressed bytes of this layer applied so far, of Size.
	Read, Size int64
	// Done is set once the layer is applied and verified.
	Done bool
}

// Result describes what Pull did.
type Result struct {
	// Reference is what was pulled, as given (reference or layout@ref).
	Reference string
	// ManifestDigest is the platform image manifest's digest (the one
	// recorded in the marker); IndexDigest is set when Reference named an index.
	ManifestDigest digest.Digest
	IndexDigest    digest.Digest
	ConfigDigest   digest.Digest
	// Bytes is the compressed size of all layers; Layers their count.
	Bytes  int64
	Layers int
	// NoOp is true when Dest already held this manifest and nothing changed.
	NoOp bool
	// DiffIDs are the image's layers, bottom first (PullLayers).
	DiffIDs []digest.Digest
	// Fetched is how many layers PullLayers fetched and unpacked into the
	// store (the others were there), FetchedBytes their compressed size.
	Fetched      int
	FetchedBytes int64
	// Spilled is the compressed bytes of layers fetched ahead of their
	// turn that did not fit in SpoolMemory and went to a temporary file.
	Spilled int64
}

// Pull makes req.Dest the root filesystem of the image req names, for
// req.Platform. A rerun with the same manifest returns at once with NoOp set;
// on any failure Dest is left as it was and the staging directory removed.
func Pull(ctx context.Context, req Request) (Result, error) {
	if err := req.validate(); err != nil {
		return Result{}, err
	}
	log := req.Log
	if log == nil {
		log = slog.Default()
	}
	src, img, res, err := inspect(ctx, &req)
	if err != nil {
		return res, err
	}
	root := rootfs.New(req.Root, req.Dest)
	plat, _ := ParsePlatform(req.Platform) // inspect checked it
	want := rootfs.Marker{Source: src.name, Platform: plat.String(), Manifest: res.ManifestDigest}
	if done, err := root.Done(want, log); err != nil || done {
		if err != nil {
			return res, err
		}
		log.Info("rootfs already holds this image", "dest", req.Root.Show(req.Dest), "reference", src.name, "manifest", res.ManifestDigest)
		res.NoOp = true
		return res, nil
	}

	start := time.Now()
	u := unpacker{
		src:         src,
		root:        req.Root,
		dest:        req.Dest,
		parent:      root.Parent(),
		layers:      img.manifest.Layers,
		diffIDs:     res.DiffIDs,
		concurrency: req.Concurrency,
		spoolMemory: req.SpoolMemory,
		spoolDir:    req.SpoolDir,
		retry:       httpx.PolicyOf(req.HTTPClient),
		progress:    req.Progress,
		log:         log,
	}
	err = root.Build(want, log, func(stage string) error {
		u.dir = stage
		var err error
		if u.limit, err = newUnpackLimit(&req, req.Root, root.Parent(), "image "+src.name+": rootfs "+req.Root.Show(req.Dest)); err != nil {
			return err
		}
		return u.run(ctx)
	})
	res.Spilled = u.spilled
	if err != nil {
		return res, err
	}
	log.Info("rootfs unpacked", "dest", req.Root.Show(req.Dest), "reference", src.name, "manifest", res.ManifestDigest,
		"layers", res.Layers, "bytes", res.Bytes, "spilled", res.Spilled, "duration", time.Since(start).Round(time.Millisecond))
	return res, nil
}

func (r *Request) validate() error {
	switch {
	case r.Root == nil:
		return errors.New("oci pull: no root to unpack into")
	case !path.IsAbs(r.Dest) || confine.Clean(r.Dest) == "":
		return fmt.Errorf("oci pull: destination %q must be an absolute path below /", r.Dest)
	}
	return r.validateSource()
}

// validateSource checks what names the image and fills in the defaults.
func (r *Request) validateSource() error {
	switch {
	case (r.Reference == "") == (r.Layout == ""):
		return errors.New("oci pull: set exactly one of a registry reference and a local layout")
	case r.Layout != "" && r.LayoutRef == "":
		return fmt.Errorf("oci pull: layout %s: a tag or digest inside the layout is required", r.Layout)
	}
	if r.Concurrency <= 0 {
		r.Concurrency = DefaultConcurrency
	}
	switch {
	case r.SpoolMemory == 0:
		r.SpoolMemory = DefaultSpoolMemory
	case r.SpoolMemory < 0:
		r.SpoolMemory = 0
	}
	if r.HTTPClient == nil && r.Reference != "" {
		r.HTTPClient = httpx.NewClient(httpx.WithLogger(r.Log))
	}
	return nil
}

// image is the resolved platform manifest.
type image struct {
	indexDigest  digest.Digest
	manifestDesc ocispec.Descriptor
	manifest     ocispec.Manifest
}

// Media types of Docker's schema 2, which registries still serve.
const (
	dockerManifest     = "application/vnd.docker.distribution.manifest.v2+json"
	dockerManifestList = "application/vnd.docker.distribution.manifest.list.v2+json"
	dockerConfig       = "application/vnd.docker.container.image.v1+json"
	dockerLayerGzip    = "application/vnd.docker.image.rootfs.diff.tar.gzip"
)

// isIndex and isManifest classify a top-level descriptor.
func isIndex(mt string) bool    { return mt == ocispec.MediaTypeImageIndex || mt == dockerManifestList }
func isManifest(mt string) bool { return mt == ocispec.MediaTypeImageManifest || mt == dockerManifest }

// verifiedFetchAll fetches a small blob (manifest, index, config) whole;
// content.FetchAll checks its size and digest against desc.
func verifiedFetchAll(ctx context.Context, src *source, desc ocispec.Descriptor, what string) ([]byte, error) {
	b, err := content.FetchAll(ctx, src.target, desc)
	if err != nil {
		return nil, fmt.Errorf("image %s: fetch %s %s (%d bytes): %w", src.name, what, desc.Digest, desc.Size, err)
	}
	return b, nil
}
