package oci

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"slices"
	"strings"

	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"oras.land/oras-go/v2"
	"oras.land/oras-go/v2/content/oci"
	"oras.land/oras-go/v2/registry"
	"oras.land/oras-go/v2/registry/remote"
	"oras.land/oras-go/v2/registry/remote/auth"
	"oras.land/oras-go/v2/registry/remote/credentials"
)

// source is where the image comes from: a registry repository or a local
// OCI layout, both read through oras-go's read-only target interface.
type source struct {
	target oras.ReadOnlyTarget
	// ref is the tag or digest resolved in target.
	ref string
	// name is the human form used in errors and the marker.
	name string
}

func openSource(ctx context.Context, req Request) (*source, error) {
	if req.Layout != "" {
		if _, err := os.Stat(req.Layout); err != nil {
			return nil, fmt.Errorf("oci layout %s: %w", req.Layout, err)
		}
		store, err := oci.NewFromFS(ctx, os.DirFS(req.Layout))
		if err != nil {
			return nil, fmt.Errorf("oci layout %s: read index: %w", req.Layout, err)
		}
		return &source{target: store, ref: req.LayoutRef, name: req.Layout + "@" + req.LayoutRef}, nil
	}

	ref, err := registry.ParseReference(req.Reference)
	if err != nil {
		return nil, fmt.Errorf("image reference %q: %w", req.Reference, err)
	}
	if ref.Reference == "" {
		return nil, fmt.Errorf("image reference %q: pin it with a :tag or an @sha256: digest", req.Reference)
	}
	repo, err := remote.NewRepository(ref.Registry + "/" + ref.Repository)
	if err != nil {
		return nil, fmt.Errorf("image reference %q: %w", req.Reference, err)
	}
	repo.PlainHTTP = slices.Contains(req.PlainHTTP, ref.Registry)
	client := &auth.Client{Client: req.HTTPClient, Cache: auth.NewCache()}
	client.SetUserAgent("nodespawn")
	if req.CredentialsFile != "" {
		store, err := credentials.NewStore(req.CredentialsFile, credentials.StoreOptions{})
		if err != nil {
			return nil, fmt.Errorf("registry credentials %s: %w", req.CredentialsFile, err)
		}
		client.Credential = credentials.Credential(store)
	}
	repo.Client = client
	return &source{target: repo, ref: ref.Reference, name: req.Reference}, nil
}

// resolve finds the manifest for plat: the reference's own manifest, or the
// one entry of an index that matches plat. Only the index and that one
// manifest are fetched; other platforms' manifests and blobs never are.
func resolve(ctx context.Context, src *source, plat Platform) (image, error) {
	top, err := src.target.Resolve(ctx, src.ref)
	if err != nil {
		return image{}, fmt.Errorf("image %s: resolve: %w", src.name, err)
	}
	var img image
	desc := top
	if isIndex(top.MediaType) {
		b, err := verifiedFetchAll(ctx, src, top, "index")
		if err != nil {
			return image{}, err
		}
		var idx ocispec.Index
		if err := json.Unmarshal(b, &idx); err != nil {
			return image{}, fmt.Errorf("image %s: index %s: %w", src.name, top.Digest, err)
		}
		desc, err = plat.choose(idx.Manifests)
		if err != nil {
			return image{}, fmt.Errorf("image %s: index %s: %w", src.name, top.Digest, err)
		}
		img.indexDigest = top.Digest
	}
	if !isManifest(desc.MediaType) {
		return image{}, fmt.Errorf("image %s: %s has media type %q, want an image manifest or index", src.name, desc.Digest, desc.MediaType)
	}
	b, err := verifiedFetchAll(ctx, src, desc, "manifest")
	if err != nil {
		return image{}, err
	}
	if err := json.Unmarshal(b, &img.manifest); err != nil {
		return image{}, fmt.Errorf("image %s: manifest %s: %w", src.name, desc.Digest, err)
	}
	if len(img.manifest.Layers) == 0 {
		return image{}, fmt.Errorf("image %s: manifest %s has no layers", src.name, desc.Digest)
	}
	img.manifestDesc = desc
	return img, nil
}

// fetchConfig fetches and checks the image config: its digest, and that it
// describes plat (a manifest pulled by digest carries no platform otherwise).
func fetchConfig(ctx context.Context, src *source, desc ocispec.Descriptor, plat Platform) (ocispec.Image, error) {
	if desc.MediaType != ocispec.MediaTypeImageConfig && desc.MediaType != dockerConfig {
		return ocispec.Image{}, fmt.Errorf("image %s: config %s has media type %q, want an image config", src.name, desc.Digest, desc.MediaType)
	}
	b, err := verifiedFetchAll(ctx, src, desc, "config")
	if err != nil {
		return ocispec.Image{}, err
	}
	var cfg ocispec.Image
	if err := json.Unmarshal(b, &cfg); err != nil {
		return ocispec.Image{}, fmt.Errorf("image %s: config %s: %w", src.name, desc.Digest, err)
	}
	if !plat.matches(cfg.Platform) {
		got := Platform{OS: cfg.OS, Architecture: cfg.Architecture, Variant: cfg.Variant}
		return ocispec.Image{}, fmt.Errorf("image %s: config %s is for platform %s, want %s; name the image for this host's platform",
			src.name, desc.Digest, got, plat)
	}
	return cfg, nil
}

// Platform is an OCI platform: os/arch[/variant].
type Platform struct {
	OS, Architecture, Variant string
}

// ParsePlatform parses "os/arch[/variant]", e.g. "linux/arm64/v8".
func ParsePlatform(s string) (Platform, error) {
	parts := strings.Split(s, "/")
	if len(parts) < 2 || len(parts) > 3 || slices.Contains(parts, "") {
		return Platform{}, fmt.Errorf("platform %q: want os/arch or os/arch/variant, e.g. linux/amd64", s)
	}
	p := Platform{OS: parts[0], Architecture: parts[1]}
	if len(parts) == 3 {
		p.Variant = parts[2]
	}
	return p, nil
}

func (p Platform) String() string {
	if p.Variant == "" {
		return p.OS + "/" + p.Architecture
	}
	return p.OS + "/" + p.Architecture + "/" + p.Variant
}

// defaultVariant is the variant an architecture has when none is written
// (arm64 images rarely say v8; arm ones usually mean v7).
func defaultVariant(arch string) string {
	switch arch {
	case "arm64":
		return "v8"
	case "arm":
		return "v7"
	}
	return ""
}

func (p Platform) matches(q ocispec.Platform) bool {
	if q.OS != p.OS || q.Architecture != p.Architecture {
		return false
	}
	if p.Variant == "" {
		return true
	}
	qv := q.Variant
	if qv == "" {
		qv = defaultVariant(q.Architecture)
	}
	return qv == p.Variant
}

// choose picks the index entry for p. With no variant asked for, an entry
// with the architecture's default variant wins over other variants.
func (p Platform) choose(entries []ocispec.Descriptor) (ocispec.Descriptor, error) {
	var found []ocispec.Descriptor
	var have []string
	for _, e := range entries {
		if e.Platform == nil {
			continue
		}
		have = append(have, Platform{e.Platform.OS, e.Platform.Architecture, e.Platform.Variant}.String())
		if p.matches(*e.Platform) {
			found = append(found, e)
		}
	}
	if len(found) == 0 {
		return ocispec.Descriptor{}, fmt.Errorf("no manifest for platform %s (the index has: %s)", p, strings.Join(have, ", "))
	}
	if p.Variant == "" {
		for _, e := range found {
			if v := e.Platform.Variant; v == "" || v == defaultVariant(p.Architecture) {
				return e, nil
			}
		}
	}
	return found[0], nil
}
