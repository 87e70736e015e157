package imagebuild

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"runtime"
	"strconv"
	"strings"
	"time"

	"github.com/opencontainers/go-digest"
	specs "github.com/opencontainers/image-spec/specs-go"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"oras.land/oras-go/v2"
	"oras.land/oras-go/v2/content"
)

// Options is what goes into the image besides the tree.
type Options struct {
	// Platform is "os/arch[/variant]"; empty means linux and the running
	// architecture.
	Platform string
	// Created is the config's creation time and every file's mtime; see
	// SourceDateEpoch.
	Created time.Time
	// Cmd is the image's default command (for a systemd rootfs, /sbin/init).
	Cmd []string
	// Labels go into the image config.
	Labels map[string]string
	// TempDir holds the compressed layer until it is pushed; empty means
	// os.TempDir(). The layer is as large as the compressed tree.
	TempDir string
}

// Result describes a built image.
type Result struct {
	Manifest ocispec.Descriptor
	Config   ocispec.Descriptor
	Layer    ocispec.Descriptor
	// DiffID is the uncompressed layer's digest.
	DiffID digest.Digest
	// Entries counts the files, directories and links in the layer.
	Entries int
}

// SourceDateEpoch is the reproducible-builds time: $SOURCE_DATE_EPOCH
// (seconds since 1970) when set, else the Unix epoch itself.
func SourceDateEpoch() (time.Time, error) {
	v := os.Getenv("SOURCE_DATE_EPOCH")
	if v == "" {
		return time.Unix(0, 0).UTC(), nil
	}
	s, err := strconv.ParseInt(v, 10, 64)
	if err != nil || s < 0 {
		return time.Time{}, fmt.Errorf("SOURCE_DATE_EPOCH=%q: want whole seconds since 1970", v)
	}
	return time.Unix(s, 0).UTC(), nil
}

// ParsePlatform parses "os/arch[/variant]".
func ParsePlatform(s string) (ocispec.Platform, error) {
	if s == "" {
		return ocispec.Platform{OS: "linux", Architecture: runtime.GOARCH}, nil
	}
	parts := strings.Split(s, "/")
	if len(parts) < 2 || len(parts) > 3 || parts[0] == "" || parts[1] == "" {
		return ocispec.Platform{}, fmt.Errorf("platform %q: want os/arch or os/arch/variant, e.g. linux/amd64", s)
	}
	p := ocispec.Platform{OS: parts[0], Architecture: parts[1]}
	if len(parts) == 3 {
		p.Variant = parts[2]
	}
	return p, nil
}

// Build packs root into a single-layer image, pushes its blobs and manifest
// to dst (blobs dst already has are not sent again) and tags the manifest
// with tag when tag is not empty. Building the same tree with the same
// Options twice gives the same manifest digest.
func Build(ctx context.Context, root string, dst oras.Target, tag string, opts Options) (Result, error) {
	platform, err := ParsePlatform(opts.Platform)
	if err != nil {
		return Result{}, err
	}
	if fi, err := os.Stat(root); err != nil {
		return Result{}, fmt.Errorf("rootfs %s: %w", root, err)
	} else if !fi.IsDir() {
		return Result{}, fmt.Errorf("rootfs %s: not a directory", root)
	}
	created := opts.Created.UTC()
	layer, info, err := pushLayer(ctx, dst, root, created, opts.TempDir)
	if err != nil {
		return Result{}, err
	}

	cfg := ocispec.Image{
		Created:  &created,
		Platform: platform,
		Config:   ocispec.ImageConfig{Cmd: opts.Cmd, Labels: opts.Labels},
		RootFS:   ocispec.RootFS{Type: "layers", DiffIDs: []digest.Digest{info.DiffID}},
		// No paths in the history: the same tree built elsewhere must match.
		History: []ocispec.History{{Created: &created, CreatedBy: "nodespawn image build"}},
	}
	config, err := pushJSON(ctx, dst, ocispec.MediaTypeImageConfig, cfg)
	if err != nil {
		return Result{}, err
	}
	manifest := ocispec.Manifest{
		Versioned: specs.Versioned{SchemaVersion: 2},
		MediaType: ocispec.MediaTypeImageManifest,
		Config:    config,
		Layers:    []ocispec.Descriptor{layer},
		Annotations: map[string]string{
			ocispec.AnnotationCreated: created.Format(time.RFC3339),
		},
	}
	man, err := pushJSON(ctx, dst, ocispec.MediaTypeImageManifest, manifest)
	if err != nil {
		return Result{}, err
	}
	man.Platform = &platform
	if tag != "" {
		if err := dst.Tag(ctx, man, tag); err != nil {
			return Result{}, fmt.Errorf("tag manifest %s as %q: %w", man.Digest, tag, err)
		}
	}
	return Result{Manifest: man, Config: config, Layer: layer, DiffID: info.DiffID, Entries: info.Entries}, nil
}

// pushLayer writes the tree at root as one gzip layer, staged in a
// temporary file in tempDir, and pushes it unless dst has it.
func pushLayer(ctx context.Context, dst oras.Target, root string, created time.Time, tempDir string) (ocispec.Descriptor, LayerInfo, error) {
	tmp, err := os.CreateTemp(tempDir, "nodespawn-layer-*.tar.gz")
	if err != nil {
		return ocispec.Descriptor{}, LayerInfo{}, fmt.Errorf("stage layer: %w", err)
	}
	defer os.Remove(tmp.Name())
	defer tmp.Close()
	info, err := WriteLayer(ctx, root, created, tmp)
	if err != nil {
		return ocispec.Descriptor{}, info, err
	}
	if _, err := tmp.Seek(0, io.SeekStart); err != nil {
		return ocispec.Descriptor{}, info, fmt.Errorf("rewind staged layer %s: %w", tmp.Name(), err)
	}
	layer := ocispec.Descriptor{MediaType: ocispec.MediaTypeImageLayerGzip, Digest: info.Digest, Size: info.Size}
	return layer, info, pushIfMissing(ctx, dst, layer, tmp)
}

func pushJSON(ctx context.Context, dst oras.Target, mediaType string, v any) (ocispec.Descriptor, error) {
	b, err := json.Marshal(v)
	if err != nil {
		return ocispec.Descriptor{}, fmt.Errorf("encode %s: %w", mediaType, err)
	}
	desc := ocispec.Descriptor{MediaType: mediaType, Digest: digest.FromBytes(b), Size: int64(len(b))}
	return desc, pushIfMissing(ctx, dst, desc, bytes.NewReader(b))
}

func pushIfMissing(ctx context.Context, dst oras.Target, desc ocispec.Descriptor, r io.Reader) error {
	ok, err := dst.Exists(ctx, desc)
	if err != nil {
		return fmt.Errorf("check for %s %s: %w", desc.MediaType, desc.Digest, err)
	}
	if ok {
		return nil
	}
	if err := dst.Push(ctx, desc, r); err != nil {
		return fmt.Errorf("push %s %s (%d bytes): %w", desc.MediaType, desc.Digest, desc.Size, err)
	}
	return nil
}

// Extend pushes an image that is base (an image Build or Extend pushed to
// dst) with one more layer on top, made of the tree at root, and tags it.
// The base's layers are shared, not copied: a puller with them fetches only
// the new one.
func Extend(ctx context.Context, dst oras.Target, base Result, root string, tag string, opts Options) (Result, error) {
	b, err := content.FetchAll(ctx, dst, base.Config)
	if err != nil {
		return Result{}, fmt.Errorf("fetch base config %s: %w", base.Config.Digest, err)
	}
	var cfg ocispec.Image
	if err := json.Unmarshal(b, &cfg); err != nil {
		return Result{}, fmt.Errorf("base config %s: %w", base.Config.Digest, err)
	}
	if b, err = content.FetchAll(ctx, dst, base.Manifest); err != nil {
		return Result{}, fmt.Errorf("fetch base manifest %s: %w", base.Manifest.Digest, err)
	}
	var manifest ocispec.Manifest
	if err := json.Unmarshal(b, &manifest); err != nil {
		return Result{}, fmt.Errorf("base manifest %s: %w", base.Manifest.Digest, err)
	}
	created := opts.Created.UTC()
	layer, info, err := pushLayer(ctx, dst, root, created, opts.TempDir)
	if err != nil {
		return Result{}, err
	}
	cfg.RootFS.DiffIDs = append(cfg.RootFS.DiffIDs, info.DiffID)
	cfg.History = append(cfg.History, ocispec.History{Created: &created, CreatedBy: "nodespawn image build (extend)"})
	config, err := pushJSON(ctx, dst, ocispec.MediaTypeImageConfig, cfg)
	if err != nil {
		return Result{}, err
	}
	manifest.Config = config
	manifest.Layers = append(manifest.Layers, layer)
	man, err := pushJSON(ctx, dst, ocispec.MediaTypeImageManifest, manifest)
	if err != nil {
		return Result{}, err
	}
	man.Platform = base.Manifest.Platform
	if tag != "" {
		if err := dst.Tag(ctx, man, tag); err != nil {
			return Result{}, fmt.Errorf("tag manifest %s as %q: %w", man.Digest, tag, err)
		}
	}
	return Result{Manifest: man, Config: config, Layer: layer, DiffID: info.DiffID, Entries: info.Entries}, nil
}
