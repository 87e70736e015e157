package oci

import (
	"archive/tar"
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"strconv"
	"testing"
	"time"

	"github.com/klauspost/compress/gzip"
	"github.com/klauspost/compress/zstd"
	"github.com/opencontainers/go-digest"
	"github.com/opencontainers/image-spec/specs-go"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"oras.land/oras-go/v2"
	"oras.land/oras-go/v2/content/oci"
	"oras.land/oras-go/v2/registry/remote"
	"oras.land/oras-go/v2/registry/remote/auth"
)

// pushRepo returns a plain-HTTP repository handle for pushing test images.
func pushRepo(t testing.TB, addr, name string) *remote.Repository {
	t.Helper()
	repo, err := remote.NewRepository(addr + "/" + name)
	if err != nil {
		t.Fatal(err)
	}
	repo.PlainHTTP = true
	return repo
}

// layoutStore returns a writable OCI layout at dir.
func layoutStore(t testing.TB, dir string) *oci.Store {
	t.Helper()
	s, err := oci.New(dir)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// entry is one tar member; body is the file content for regular files.
// raw, when set, is written to the stream verbatim instead (for records
// archive/tar refuses to write).
type entry struct {
	hdr  tar.Header
	body string
	raw  []byte
}

func dir(name string, mode int64) entry {
	return entry{hdr: tar.Header{Name: name, Typeflag: tar.TypeDir, Mode: mode}}
}
func file(name, body string, mode int64) entry {
	return entry{hdr: tar.Header{Name: name, Typeflag: tar.TypeReg, Mode: mode}, body: body}
}
func symlink(name, target string) entry {
	return entry{hdr: tar.Header{Name: name, Typeflag: tar.TypeSymlink, Linkname: target, Mode: 0o777}}
}

// hardlink is a hardlink entry; like tar, it repeats the target's mode,
// which archive.Apply applies to the shared inode.
func hardlink(name, target string, mode int64) entry {
	return entry{hdr: tar.Header{Name: name, Typeflag: tar.TypeLink, Linkname: target, Mode: mode}}
}
func whiteout(name string) entry { return file(name, "", 0) }

func owned(e entry, uid, gid int) entry { e.hdr.Uid, e.hdr.Gid = uid, gid; return e }

// mkTar writes entries as a PAX tar stream.
func mkTar(t testing.TB, entries ...entry) []byte {
	t.Helper()
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, e := range entries {
		if e.raw != nil {
			if err := tw.Flush(); err != nil {
				t.Fatal(err)
			}
			buf.Write(e.raw)
			continue
		}
		h := e.hdr
		if h.Typeflag == tar.TypeReg {
			h.Size = int64(len(e.body))
		}
		if h.ModTime.IsZero() {
			h.ModTime = time.Unix(1700000000, 0)
		}
		h.Format = tar.FormatPAX
		if err := tw.WriteHeader(&h); err != nil {
			t.Fatalf("tar header %q: %v", h.Name, err)
		}
		if h.Typeflag == tar.TypeReg {
			if _, err := io.WriteString(tw, e.body); err != nil {
				t.Fatal(err)
			}
		}
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

// layer is a blob ready to push, with the DiffID of its tar.
type layer struct {
	mediaType string
	blob      []byte
	diffID    digest.Digest
}

func compressLayer(t testing.TB, mediaType string, tarball []byte) layer {
	t.Helper()
	l := layer{mediaType: mediaType, diffID: digest.FromBytes(tarball)}
	var buf bytes.Buffer
	switch mediaType {
	case ocispec.MediaTypeImageLayer:
		buf.Write(tarball)
	case ocispec.MediaTypeImageLayerGzip:
		zw := gzip.NewWriter(&buf)
		zw.Write(tarball)
		zw.Close()
	case ocispec.MediaTypeImageLayerZstd:
		zw, err := zstd.NewWriter(&buf)
		if err != nil {
			t.Fatal(err)
		}
		zw.Write(tarball)
		zw.Close()
	default:
		t.Fatalf("media type %s", mediaType)
	}
	l.blob = buf.Bytes()
	return l
}

func gzLayer(t testing.TB, entries ...entry) layer {
	return compressLayer(t, ocispec.MediaTypeImageLayerGzip, mkTar(t, entries...))
}

// imageSpec is an image to push; diffIDs, when set, replace the true ones
// in the config (to build a lying config).
type imageSpec struct {
	platform ocispec.Platform
	layers   []layer
	diffIDs  []digest.Digest
}

var linuxAMD64 = ocispec.Platform{OS: "linux", Architecture: "amd64"}

// pushBlob pushes b unless the target has it.
func pushBlob(t testing.TB, ctx context.Context, target oras.Target, mediaType string, b []byte) ocispec.Descriptor {
	t.Helper()
	desc := ocispec.Descriptor{MediaType: mediaType, Digest: digest.FromBytes(b), Size: int64(len(b))}
	ok, err := target.Exists(ctx, desc)
	if err != nil {
		t.Fatalf("exists %s: %v", desc.Digest, err)
	}
	if !ok {
		if err := target.Push(ctx, desc, bytes.NewReader(b)); err != nil {
			t.Fatalf("push %s %s: %v", mediaType, desc.Digest, err)
		}
	}
	return desc
}

func pushJSON(t testing.TB, ctx context.Context, target oras.Target, mediaType string, v any) ocispec.Descriptor {
	t.Helper()
	b, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	return pushBlob(t, ctx, target, mediaType, b)
}

// pushImage pushes spec's layers, config and manifest; tag, when set, tags it.
func pushImage(t testing.TB, ctx context.Context, target oras.Target, tag string, spec imageSpec) ocispec.Descriptor {
	t.Helper()
	cfg := ocispec.Image{Platform: spec.platform, RootFS: ocispec.RootFS{Type: "layers"}}
	m := ocispec.Manifest{Versioned: specs.Versioned{SchemaVersion: 2}, MediaType: ocispec.MediaTypeImageManifest}
	for _, l := range spec.layers {
		m.Layers = append(m.Layers, pushBlob(t, ctx, target, l.mediaType, l.blob))
		cfg.RootFS.DiffIDs = append(cfg.RootFS.DiffIDs, l.diffID)
	}
	if spec.diffIDs != nil {
		cfg.RootFS.DiffIDs = spec.diffIDs
	}
	m.Config = pushJSON(t, ctx, target, ocispec.MediaTypeImageConfig, cfg)
	desc := pushJSON(t, ctx, target, ocispec.MediaTypeImageManifest, m)
	if tag != "" {
		if err := target.Tag(ctx, desc, tag); err != nil {
			t.Fatalf("tag %s: %v", tag, err)
		}
	}
	return desc
}

// pushIndex pushes one image per spec and an index over them, tagged tag.
func pushIndex(t testing.TB, ctx context.Context, target oras.Target, tag string, imgs ...imageSpec) (ocispec.Descriptor, []ocispec.Descriptor) {
	t.Helper()
	idx := ocispec.Index{Versioned: specs.Versioned{SchemaVersion: 2}, MediaType: ocispec.MediaTypeImageIndex}
	var ms []ocispec.Descriptor
	for _, s := range imgs {
		d := pushImage(t, ctx, target, "", s)
		p := s.platform
		d.Platform = &p
		idx.Manifests = append(idx.Manifests, d)
		ms = append(ms, d)
	}
	desc := pushJSON(t, ctx, target, ocispec.MediaTypeImageIndex, idx)
	if err := target.Tag(ctx, desc, tag); err != nil {
		t.Fatalf("tag %s: %v", tag, err)
	}
	return desc, ms
}

// fetchManifest reads a pushed manifest back (to list an image's blobs).
func fetchManifest(t testing.TB, ctx context.Context, target oras.ReadOnlyTarget, desc ocispec.Descriptor) ocispec.Manifest {
	t.Helper()
	rc, err := target.Fetch(ctx, desc)
	if err != nil {
		t.Fatal(err)
	}
	defer rc.Close()
	var m ocispec.Manifest
	if err := json.NewDecoder(rc).Decode(&m); err != nil {
		t.Fatal(err)
	}
	return m
}

func requireRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root: unpacking sets owners and creates device nodes")
	}
}

// authClient is a registry client with fixed basic credentials (for pushing).
func authClient(host, user, password string) *auth.Client {
	return &auth.Client{Credential: auth.StaticCredential(host, auth.Credential{Username: user, Password: password})}
}

// writeDockerConfig writes a docker config.json with one registry login.
func writeDockerConfig(t testing.TB, path, host, user, password string) {
	t.Helper()
	cfg := map[string]any{"auths": map[string]any{host: map[string]string{
		"auth": base64.StdEncoding.EncodeToString([]byte(user + ":" + password)),
	}}}
	b, err := json.Marshal(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, b, 0o600); err != nil {
		t.Fatal(err)
	}
}

// rawPAX is a PAX extended header block carrying one record of any size;
// archive/tar will not write one over 1 MiB, hostile tools will.
func rawPAX(key, value string) []byte {
	rec := " " + key + "=" + value + "\n"
	// The record length counts its own digits.
	n := len(rec)
	for n != len(strconv.Itoa(n))+len(rec) {
		n = len(strconv.Itoa(n)) + len(rec)
	}
	data := strconv.Itoa(n) + rec
	hdr := make([]byte, 512)
	copy(hdr[0:], "PaxHeaders/f")
	copy(hdr[100:], "0000644\x00")
	copy(hdr[108:], "0000000\x00")
	copy(hdr[116:], "0000000\x00")
	copy(hdr[124:], fmt.Sprintf("%011o\x00", len(data)))
	copy(hdr[136:], "00000000000\x00")
	hdr[156] = tar.TypeXHeader
	copy(hdr[257:], "ustar\x0000")
	copy(hdr[148:], "        ")
	sum := 0
	for _, b := range hdr {
		sum += int(b)
	}
	copy(hdr[148:], fmt.Sprintf("%06o\x00 ", sum))
	out := append(hdr, data...)
	if pad := len(data) % 512; pad != 0 {
		out = append(out, make([]byte, 512-pad)...)
	}
	return out
}
