// Package imagebuild turns a root filesystem directory into a single-layer
// OCI image without a container engine: one reproducible tar.gz layer, the
// image config and the manifest, pushed to any oras target (a registry, an
// OCI image layout).
//
// The same tree always gives the same digests: entries are sorted, every
// mtime is the same fixed time, user and group names are left out (only the
// numeric ids count), and gzip writes a header without name or time.
//
// WriteLayer and WriteFiles are the project's one tar-layer writer; the
// image benchmark (tools/ocibench) packs its layers with WriteFiles too.
package imagebuild

import (
	"archive/tar"
	"compress/gzip"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"github.com/opencontainers/go-digest"
	"golang.org/x/sys/unix"
)

// LayerInfo describes a written layer.
type LayerInfo struct {
	// DiffID is the sha256 of the uncompressed tar (the config's rootfs.diff_ids).
	DiffID digest.Digest
	// TarSize is the size of the uncompressed tar.
	TarSize int64
	// Digest and Size describe the compressed blob.
	Digest digest.Digest
	Size   int64
	// Entries counts the tar entries written.
	Entries int
}

// WriteLayer writes root as a gzip-compressed tar stream to w. Every entry
// gets mtime; ownership, modes (setuid, setgid and sticky bits included),
// symlinks, hard links, device nodes, fifos and extended attributes are kept.
// Sockets are left out (tar cannot hold them and a socket in an image is
// stale anyway), and so are security.selinux labels, which belong to the
// build host's policy.
func WriteLayer(ctx context.Context, root string, mtime time.Time, w io.Writer) (LayerInfo, error) {
	return writeLayer(ctx, mtime, w, root, func(lw *layerWriter) error { return lw.walk(root, "") })
}

// A File is one entry of a layer that WriteFiles writes: the file at Path
// (a symlink itself, not what it points to) under Name, a slash-separated
// path relative to the image's root.
type File struct {
	Name, Path string
}

// WriteFiles writes files, in the order given, as a gzip-compressed tar
// stream to w: a layer made of parts of one or more trees. Each entry is
// what WriteLayer writes for that file; a directory's entry holds the
// directory alone, not its content, and the caller lists the directories
// above each name that the layer needs. Hard links among the files stay
// hard links.
func WriteFiles(ctx context.Context, files []File, mtime time.Time, w io.Writer) (LayerInfo, error) {
	return writeLayer(ctx, mtime, w, "the layer's files", func(lw *layerWriter) error {
		for _, f := range files {
			if err := ctx.Err(); err != nil {
				return err
			}
			if _, err := lw.entry(f.Name, f.Path); err != nil {
				return err
			}
		}
		return nil
	})
}

// writeLayer writes the tar entries add writes as a gzip-compressed tar
// stream to w; what names the content in errors.
func writeLayer(ctx context.Context, mtime time.Time, w io.Writer, what string, add func(*layerWriter) error) (LayerInfo, error) {
	compressed := sha256.New()
	cw := &countWriter{w: io.MultiWriter(w, compressed)}
	// gzip.NewWriter writes no name and a zero mtime into the header, so the
	// compressed bytes depend only on the tar bytes and the Go version.
	zw := gzip.NewWriter(cw)
	uncompressed := sha256.New()
	tarN := &countWriter{w: uncompressed}
	tw := tar.NewWriter(io.MultiWriter(zw, tarN))

	lw := layerWriter{ctx: ctx, mtime: mtime.UTC().Truncate(time.Second), tw: tw, inodes: map[inode]string{}}
	if err := add(&lw); err != nil {
		return LayerInfo{}, err
	}
	if err := tw.Close(); err != nil {
		return LayerInfo{}, fmt.Errorf("finish layer tar of %s: %w", what, err)
	}
	if err := zw.Close(); err != nil {
		return LayerInfo{}, fmt.Errorf("finish layer gzip of %s: %w", what, err)
	}
	return LayerInfo{
		DiffID:  digest.NewDigest(digest.SHA256, uncompressed),
		TarSize: tarN.n,
		Digest:  digest.NewDigest(digest.SHA256, compressed),
		Size:    cw.n,
		Entries: lw.entries,
	}, nil
}

type inode struct{ dev, ino uint64 }

type layerWriter struct {
	ctx     context.Context
	mtime   time.Time
	tw      *tar.Writer
	inodes  map[inode]string // first tar name of each multiply-linked file
	entries int
}

// walk writes the entries below rel (relative to root, "" for root itself)
// in byte order of their names, which keeps the order independent of the
// file system's directory order.
func (lw *layerWriter) walk(root, rel string) error {
	if err := lw.ctx.Err(); err != nil {
		return err
	}
	dir := filepath.Join(root, rel)
	f, err := os.Open(dir)
	if err != nil {
		return fmt.Errorf("read rootfs directory %s: %w", dir, err)
	}
	names, err := f.Readdirnames(-1)
	f.Close()
	if err != nil {
		return fmt.Errorf("read rootfs directory %s: %w", dir, err)
	}
	sort.Strings(names)
	for _, name := range names {
		child := name
		if rel != "" {
			child = rel + "/" + name
		}
		isDir, err := lw.entry(child, filepath.Join(root, child))
		if err != nil {
			return err
		}
		if isDir {
			if err := lw.walk(root, child); err != nil {
				return err
			}
		}
	}
	return nil
}

// entry writes one tar entry named rel for the file at p and says whether
// it is a directory.
func (lw *layerWriter) entry(rel, p string) (bool, error) {
	var st unix.Stat_t
	if err := unix.Lstat(p, &st); err != nil {
		return false, fmt.Errorf("stat %s: %w", p, err)
	}
	h := &tar.Header{
		Name:    rel,
		Mode:    int64(st.Mode & 0o7777),
		Uid:     int(st.Uid),
		Gid:     int(st.Gid),
		ModTime: lw.mtime,
		Format:  tar.FormatPAX,
	}
	isDir := false
	switch st.Mode & unix.S_IFMT {
	case unix.S_IFDIR:
		h.Typeflag, h.Name, isDir = tar.TypeDir, rel+"/", true
	case unix.S_IFLNK:
		target, err := os.Readlink(p)
		if err != nil {
			return false, fmt.Errorf("read symlink %s: %w", p, err)
		}
		h.Typeflag, h.Linkname = tar.TypeSymlink, target
	case unix.S_IFREG:
		h.Typeflag, h.Size = tar.TypeReg, st.Size
		if st.Nlink > 1 {
			key := inode{uint64(st.Dev), st.Ino}
			if first, ok := lw.inodes[key]; ok {
				h.Typeflag, h.Linkname, h.Size = tar.TypeLink, first, 0
			} else {
				lw.inodes[key] = rel
			}
		}
	case unix.S_IFCHR, unix.S_IFBLK:
		h.Typeflag = tar.TypeChar
		if st.Mode&unix.S_IFMT == unix.S_IFBLK {
			h.Typeflag = tar.TypeBlock
		}
		h.Devmajor, h.Devminor = int64(unix.Major(uint64(st.Rdev))), int64(unix.Minor(uint64(st.Rdev)))
	case unix.S_IFIFO:
		h.Typeflag = tar.TypeFifo
	case unix.S_IFSOCK:
		return false, nil
	default:
		return false, fmt.Errorf("add %s to layer: unsupported file type %#o", p, st.Mode&unix.S_IFMT)
	}
	xattrs, err := readXattrs(p)
	if err != nil {
		return false, err
	}
	if len(xattrs) > 0 {
		h.PAXRecords = map[string]string{}
		for k, v := range xattrs {
			h.PAXRecords["SCHILY.xattr."+k] = v
		}
	}
	if err := lw.tw.WriteHeader(h); err != nil {
		return false, fmt.Errorf("write tar header for %s: %w", p, err)
	}
	lw.entries++
	if h.Typeflag == tar.TypeReg && h.Size > 0 {
		if err := lw.copyFile(p, h.Size); err != nil {
			return false, err
		}
	}
	return isDir, nil
}

func (lw *layerWriter) copyFile(p string, size int64) error {
	f, err := os.Open(p)
	if err != nil {
		return fmt.Errorf("open %s: %w", p, err)
	}
	defer f.Close()
	n, err := io.Copy(lw.tw, f)
	if err != nil {
		return fmt.Errorf("copy %s into layer: %w", p, err)
	}
	if n != size {
		return fmt.Errorf("copy %s into layer: file changed size during the build (%d, then %d bytes)", p, size, n)
	}
	return nil
}

// readXattrs returns the extended attributes of p (not following symlinks),
// without security.selinux.
func readXattrs(p string) (map[string]string, error) {
	buf := make([]byte, 1024)
	var n int
	for {
		var err error
		n, err = unix.Llistxattr(p, buf)
		if errors.Is(err, unix.ERANGE) {
			buf = make([]byte, len(buf)*4)
			continue
		}
		if errors.Is(err, unix.ENOTSUP) {
			return nil, nil
		}
		if err != nil {
			return nil, fmt.Errorf("list xattrs of %s: %w", p, err)
		}
		break
	}
	var out map[string]string
	for _, name := range strings.Split(string(buf[:n]), "\x00") {
		if name == "" || name == "security.selinux" {
			continue
		}
		v, err := getXattr(p, name)
		if errors.Is(err, unix.ENODATA) {
			continue
		}
		if err != nil {
			return nil, err
		}
		if out == nil {
			out = map[string]string{}
		}
		out[name] = string(v)
	}
	return out, nil
}

func getXattr(p, name string) ([]byte, error) {
	buf := make([]byte, 256)
	for {
		n, err := unix.Lgetxattr(p, name, buf)
		if errors.Is(err, unix.ERANGE) {
			buf = make([]byte, len(buf)*4)
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("read xattr %s of %s: %w", name, p, err)
		}
		return buf[:n], nil
	}
}

type countWriter struct {
	w io.Writer
	n int64
}

func (c *countWriter) Write(b []byte) (int, error) {
	n, err := c.w.Write(b)
	c.n += int64(n)
	return n, err
}
