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
	"time"

	"github.com/klauspost/compress/gzip"
	"github.com/opencontainers/go-digest"
)

// source is a host tree (only read) and where it goes in the image: at
// is "" for the image's root, else a path such as "usr/local/bin".
type source struct {
	dir, at string
}

// parseSources is the rootfs tree and the -add list "DIR=PATH,...".
func parseSources(rootfs, add string) ([]source, error) {
	srcs := []source{{dir: rootfs}}
	if add == "" {
		return srcs, nil
	}
	for _, a := range strings.Split(add, ",") {
		dir, at, ok := strings.Cut(a, "=")
		at = strings.Trim(path.Clean("/"+at), "/")
		if !ok || dir == "" || at == "" {
			return nil, fmt.Errorf("-add %q: want DIR=PATH (PATH below the image's root)", a)
		}
		srcs = append(srcs, source{dir: dir, at: at})
	}
	return srcs, nil
}

// packedLayer is a gzip layer written to a scratch file.
type packedLayer struct {
	path           string
	digest, diffID digest.Digest
	size, plain    int64 // the blob's bytes, the tar stream's bytes
	// entries are the names the layer holds, in order, to repack it.
	entries []string
}

// packer packs the trees of srcs, as one image tree, into layers.
type packer struct {
	srcs    []source
	scratch string
}

// packTree packs the trees (only read) into n gzip layers in the scratch
// directory, in walk order (srcs one after the other): the first layer
// holds about firstPct percent of the file bytes, the last lastPct
// percent, the others share the rest evenly (a distribution image's base
// layer is the largest, what is added on top comes in several layers, and
// the top one, which an upgrade changes, is small: with the defaults, 6
// layers of 40/14/14/14/14/3%). Each
// layer holds the directories above its entries. Hardlinks inside one
// layer stay hardlinks; sockets and xattrs are left out. It returns the
// layers and the bytes of the tar streams.
func (p *packer) packTree(n, firstPct, lastPct int) ([]packedLayer, int64, error) {
	if n < 1 {
		n = 1
	}
	var total int64
	for _, s := range p.srcs {
		err := filepath.WalkDir(s.dir, func(_ string, d fs.DirEntry, err error) error {
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
	}
	// bound[i] is the cumulative file bytes after which layer i ends.
	bound := make([]int64, n)
	first := total
	if n > 1 {
		first = total * int64(min(max(firstPct, 1), 100)) / 100
	}
	// The middle layers end where the last one's share begins.
	last := int64(0)
	if n > 2 {
		last = total * int64(min(max(lastPct, 0), 100-firstPct)) / 100
	}
	for i := range bound {
		switch {
		case i == 0:
			bound[i] = first
		case i == n-1:
			bound[i] = total
		case n > 2:
			bound[i] = first + (total-first-last)*int64(i)/int64(n-2)
		}
	}

	var layers []packedLayer
	var plain int64
	var cur *layerWriter
	closeCur := func() error {
		if cur == nil {
			return nil
		}
		l, err := cur.close()
		cur = nil
		if err != nil {
			return err
		}
		layers = append(layers, l)
		plain += l.plain
		return nil
	}
	var seen int64
	var err error
	for _, s := range p.srcs {
		err = filepath.WalkDir(s.dir, func(hp string, d fs.DirEntry, err error) error {
			if err != nil {
				return err
			}
			rel, err := filepath.Rel(s.dir, hp)
			if err != nil {
				return err
			}
			name := path.Join(s.at, filepath.ToSlash(rel))
			if name == "." {
				return nil
			}
			if cur == nil || (len(layers) < n-1 && seen >= bound[len(layers)]) {
				if err := closeCur(); err != nil {
					return err
				}
				if cur, err = newLayerWriter(p, len(layers)); err != nil {
					return err
				}
			}
			if d.Type().IsRegular() {
				if fi, err := d.Info(); err == nil {
					seen += fi.Size()
				}
			}
			return cur.addWithParents(name, hp)
		})
		if err != nil {
			break
		}
	}
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

// repack packs layer l again, its entries read anew, with one more file,
// name (with its directories), holding body: a new version of the layer.
func (p *packer) repack(l packedLayer, i int, name string, body []byte) (packedLayer, error) {
	w, err := newLayerWriter(p, i)
	if err != nil {
		return packedLayer{}, err
	}
	for _, e := range l.entries {
		if err = w.addWithParents(e, p.hostPath(e)); err != nil {
			break
		}
	}
	if err == nil {
		err = w.addFile(name, body)
	}
	if err != nil {
		w.abort()
		return packedLayer{}, err
	}
	return w.close()
}

// hostPath is the host path of the image's entry name: the last source
// that has it; "" when none does (a directory above where a source goes).
func (p *packer) hostPath(name string) string {
	for i := len(p.srcs) - 1; i >= 0; i-- {
		s := p.srcs[i]
		var rest string
		switch {
		case s.at == "":
			rest = name
		case name == s.at:
			rest = ""
		case strings.HasPrefix(name, s.at+"/"):
			rest = name[len(s.at)+1:]
		default:
			continue
		}
		hp := filepath.Join(s.dir, filepath.FromSlash(rest))
		if _, err := os.Lstat(hp); err == nil {
			return hp
		}
	}
	return ""
}

// layerWriter writes one layer: tar into gzip into a scratch file, with
// the digests of both streams.
type layerWriter struct {
	p       *packer
	f       *os.File
	tarSum  digest.Digester
	blob    digest.Digester
	zw      *gzip.Writer
	tw      *tar.Writer
	counts  *countWriter
	blobN   *countWriter
	links   map[[2]uint64]string
	dirs    map[string]bool // directories already in the layer
	entries []string
}

type countWriter struct{ n int64 }

func (c *countWriter) Write(p []byte) (int, error) { c.n += int64(len(p)); return len(p), nil }

func newLayerWriter(p *packer, i int) (*layerWriter, error) {
	f, err := os.CreateTemp(p.scratch, fmt.Sprintf("layer%d-*.tar.gz", i))
	if err != nil {
		return nil, err
	}
	w := &layerWriter{p: p, f: f, tarSum: digest.Canonical.Digester(), blob: digest.Canonical.Digester(),
		counts: &countWriter{}, blobN: &countWriter{}, links: map[[2]uint64]string{}, dirs: map[string]bool{}}
	w.zw = gzip.NewWriter(io.MultiWriter(f, w.blob.Hash(), w.blobN))
	w.tw = tar.NewWriter(io.MultiWriter(w.zw, w.tarSum.Hash(), w.counts))
	return w, nil
}

// addWithParents adds the directories above name that the layer lacks,
// then name from the host path hp.
func (w *layerWriter) addWithParents(name, hp string) error {
	if dir := path.Dir(name); dir != "." && !w.dirs[dir] {
		if err := w.addWithParents(dir, w.p.hostPath(dir)); err != nil {
			return err
		}
		if !w.dirs[dir] {
			return fmt.Errorf("%s: not a directory in the packed tree, but %s is below it", dir, name)
		}
	}
	return w.add(name, hp)
}

var epoch = time.Unix(1700000000, 0)

// add writes the entry name from the host path hp; hp "" is a directory
// that no source has (root's, mode 0755).
func (w *layerWriter) add(name, hp string) error {
	if w.dirs[name] {
		return nil
	}
	if hp == "" {
		w.dirs[name] = true
		w.entries = append(w.entries, name)
		return w.tw.WriteHeader(&tar.Header{Typeflag: tar.TypeDir, Name: name + "/", Mode: 0o755, ModTime: epoch, Format: tar.FormatPAX})
	}
	fi, err := os.Lstat(hp)
	if err != nil {
		return err
	}
	if fi.Mode().Type() == fs.ModeSocket {
		return nil
	}
	link := ""
	if fi.Mode().Type() == fs.ModeSymlink {
		if link, err = os.Readlink(hp); err != nil {
			return err
		}
	}
	hdr, err := tar.FileInfoHeader(fi, link)
	if err != nil {
		return fmt.Errorf("%s: %w", hp, err)
	}
	hdr.Name, hdr.Uname, hdr.Gname = name, "", ""
	hdr.Format = tar.FormatPAX
	w.entries = append(w.entries, name)
	if fi.IsDir() {
		hdr.Name += "/"
		w.dirs[name] = true
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
		w.links[key] = name
	}
	// Read whole, so a file that changes while it is read still makes a
	// consistent entry.
	b, err := os.ReadFile(hp)
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

// addFile adds a regular file (and the directories above it) that no
// source has.
func (w *layerWriter) addFile(name string, body []byte) error {
	if dir := path.Dir(name); dir != "." && !w.dirs[dir] {
		if err := w.addWithParents(dir, w.p.hostPath(dir)); err != nil {
			return err
		}
	}
	w.entries = append(w.entries, name)
	err := w.tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: name, Mode: 0o644, Size: int64(len(body)), ModTime: epoch, Format: tar.FormatPAX})
	if err == nil {
		_, err = w.tw.Write(body)
	}
	return err
}

func (w *layerWriter) close() (packedLayer, error) {
	err := w.tw.Close()
	if err == nil {
		err = w.zw.Close()
	}
	if cerr := w.f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		os.Remove(w.f.Name())
		return packedLayer{}, err
	}
	return packedLayer{path: w.f.Name(), digest: w.blob.Digest(), diffID: w.tarSum.Digest(), size: w.blobN.n, plain: w.counts.n,
		entries: w.entries}, nil
}

func (w *layerWriter) abort() {
	w.f.Close()
	os.Remove(w.f.Name())
}
