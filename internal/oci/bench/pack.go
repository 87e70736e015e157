package main

import (
	"archive/tar"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"strings"
	"syscall"

	"github.com/klauspost/compress/gzip"
	"github.com/opencontainers/go-digest"
)

// packedLayer is a gzip layer written to a scratch file.
type packedLayer struct {
	path           string
	digest, diffID digest.Digest
	size           int64
}

// packTree packs the tree at dir (only read) into n gzip layers in
// scratch, in walk order: the first layer holds about 70% of the file
// bytes, the others share the rest (as a distribution image's base layer
// dwarfs what is added on top). Each layer starts with the directories
// above its first entry. Hardlinks inside one layer stay hardlinks;
// sockets and xattrs are left out. It returns the layers and the bytes of
// the tar streams.
func packTree(dir string, n int, scratch string) ([]packedLayer, int64, error) {
	if n < 1 {
		n = 1
	}
	var total int64
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.Type().IsRegular() {
			if fi, err := d.Info(); err == nil {
				total += fi.Size()
			}
		}
		return nil
	})
	if err != nil {
		return nil, 0, err
	}
	// bound[i] is the cumulative file bytes after which layer i ends.
	bound := make([]int64, n)
	first := total
	if n > 1 {
		first = total * 7 / 10
	}
	for i := range bound {
		if i == 0 {
			bound[i] = first
		} else {
			bound[i] = first + (total-first)*int64(i)/int64(n-1)
		}
	}

	var layers []packedLayer
	var plain int64
	var cur *layerWriter
	closeCur := func() error {
		if cur == nil {
			return nil
		}
		l, size, err := cur.close()
		cur = nil
		if err != nil {
			return err
		}
		layers = append(layers, l)
		plain += size
		return nil
	}
	var seen int64
	err = filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, err := filepath.Rel(dir, p)
		if err != nil || rel == "." {
			return err
		}
		if cur == nil || (len(layers) < n-1 && seen >= bound[len(layers)]) {
			if err := closeCur(); err != nil {
				return err
			}
			if cur, err = newLayerWriter(scratch, len(layers)); err != nil {
				return err
			}
			// The new layer starts with the directories above rel.
			parts := strings.Split(filepath.ToSlash(rel), "/")
			for i := 1; i < len(parts); i++ {
				if err := cur.add(dir, path.Join(parts[:i]...)); err != nil {
					return err
				}
			}
		}
		if d.Type().IsRegular() {
			if fi, err := d.Info(); err == nil {
				seen += fi.Size()
			}
		}
		return cur.add(dir, filepath.ToSlash(rel))
	})
	if err == nil {
		err = closeCur()
	} else if cur != nil {
		cur.abort()
	}
	if err != nil {
		for _, l := range layers {
			os.Remove(l.path)
		}
		return nil, 0, err
	}
	return layers, plain, nil
}

// layerWriter writes one layer: tar into gzip into a scratch file, with
// the digests of both streams.
type layerWriter struct {
	f      *os.File
	tarSum digest.Digester
	blob   digest.Digester
	zw     *gzip.Writer
	tw     *tar.Writer
	counts *countWriter
	blobN  *countWriter
	links  map[[2]uint64]string
}

type countWriter struct{ n int64 }

func (c *countWriter) Write(p []byte) (int, error) { c.n += int64(len(p)); return len(p), nil }

func newLayerWriter(scratch string, i int) (*layerWriter, error) {
	f, err := os.CreateTemp(scratch, fmt.Sprintf("layer%d-*.tar.gz", i))
	if err != nil {
		return nil, err
	}
	w := &layerWriter{f: f, tarSum: digest.Canonical.Digester(), blob: digest.Canonical.Digester(),
		counts: &countWriter{}, blobN: &countWriter{}, links: map[[2]uint64]string{}}
	w.zw = gzip.NewWriter(io.MultiWriter(f, w.blob.Hash(), w.blobN))
	w.tw = tar.NewWriter(io.MultiWriter(w.zw, w.tarSum.Hash(), w.counts))
	return w, nil
}

// add writes the entry rel of the tree at dir.
func (w *layerWriter) add(dir, rel string) error {
	p := filepath.Join(dir, filepath.FromSlash(rel))
	fi, err := os.Lstat(p)
	if err != nil {
		return err
	}
	if fi.Mode().Type() == fs.ModeSocket {
		return nil
	}
	link := ""
	if fi.Mode().Type() == fs.ModeSymlink {
		if link, err = os.Readlink(p); err != nil {
			return err
		}
	}
	hdr, err := tar.FileInfoHeader(fi, link)
	if err != nil {
		return fmt.Errorf("%s: %w", p, err)
	}
	hdr.Name, hdr.Uname, hdr.Gname = rel, "", ""
	hdr.Format = tar.FormatPAX
	if fi.IsDir() {
		hdr.Name += "/"
	}
	if !fi.Mode().IsRegular() {
		return w.tw.WriteHeader(hdr)
	}
	if st, ok := fi.Sys().(*syscall.Stat_t); ok && st.Nlink > 1 {
		key := [2]uint64{st.Dev, st.Ino}
		if first, ok := w.links[key]; ok {
			hdr.Typeflag, hdr.Linkname, hdr.Size = tar.TypeLink, first, 0
			return w.tw.WriteHeader(hdr)
		}
		w.links[key] = rel
	}
	// Read whole, so a file that changes while it is read still makes a
	// consistent entry.
	b, err := os.ReadFile(p)
	if err != nil {
		return err
	}
	hdr.Size = int64(len(b))
	if err := w.tw.WriteHeader(hdr); err != nil {
		return err
	}
	_, err = w.tw.Write(b)
	return err
}

func (w *layerWriter) close() (packedLayer, int64, error) {
	err := w.tw.Close()
	if err == nil {
		err = w.zw.Close()
	}
	if cerr := w.f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		os.Remove(w.f.Name())
		return packedLayer{}, 0, err
	}
	return packedLayer{path: w.f.Name(), digest: w.blob.Digest(), diffID: w.tarSum.Digest(), size: w.blobN.n}, w.counts.n, nil
}

func (w *layerWriter) abort() {
	w.f.Close()
	os.Remove(w.f.Name())
}
