package main

import (
	"context"
	"fmt"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"strings"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/nodespawn/nodespawn/internal/imagebuild"
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

// epoch is the mtime of every entry of the bench's layers.
var epoch = time.Unix(1700000000, 0)

// packedLayer is a gzip layer written to a scratch file.
type packedLayer struct {
	path           string
	digest, diffID digest.Digest
	size, plain    int64 // the blob's bytes, the tar stream's bytes
	// files are what the layer holds, in order, to repack it.
	files *layerFiles
}

// packer packs the trees of srcs, as one image tree, into layers, with
// imagebuild.WriteFiles. Its files (layers, stand-ins) go to scratch,
// which its caller removes.
type packer struct {
	srcs    []source
	scratch string
	// emptyDir stands for the directories above where a source goes that
	// no source has (root's, mode 0755); made when first needed.
	emptyDir string
}

// packTree packs the trees (only read) into n gzip layers in the scratch
// directory, in walk order (srcs one after the other): the first layer
// holds about firstPct percent of the file bytes, the last lastPct
// percent, the others share the rest evenly (a distribution image's base
// layer is the largest, what is added on top comes in several layers, and
// the top one, which an upgrade changes, is small: with the defaults, 6
// layers of 40/14/14/14/14/3%). Each
// layer holds the directories above its entries. Hardlinks inside one
// layer stay hardlinks; sockets are left out.
func (p *packer) packTree(ctx context.Context, n, firstPct, lastPct int) ([]packedLayer, error) {
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
			return nil, err
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

	// The layers' file lists first, then the layers.
	var lists []*layerFiles
	var seen int64
	for _, s := range p.srcs {
		err := filepath.WalkDir(s.dir, func(hp string, d fs.DirEntry, err error) error {
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
			if i := len(lists) - 1; i < 0 || (i < n-1 && seen >= bound[i]) {
				lists = append(lists, &layerFiles{p: p, dirs: map[string]bool{}})
			}
			if d.Type().IsRegular() {
				if fi, err := d.Info(); err == nil {
					seen += fi.Size()
				}
			}
			return lists[len(lists)-1].addWithParents(name, hp)
		})
		if err != nil {
			return nil, err
		}
	}
	var layers []packedLayer
	for i, l := range lists {
		pl, err := p.write(ctx, i, l)
		if err != nil {
			return nil, err
		}
		layers = append(layers, pl)
	}
	return layers, nil
}

// repack packs layer l again, as layer i, with one more file, name (with
// its directories), holding body: a new version of the layer.
func (p *packer) repack(ctx context.Context, l packedLayer, i int, name string, body []byte) (packedLayer, error) {
	hp := filepath.Join(p.scratch, "added-file")
	if err := writeFileMode(hp, body, 0o644); err != nil {
		return packedLayer{}, err
	}
	files := l.files.clone()
	if err := files.addFile(name, hp); err != nil {
		return packedLayer{}, err
	}
	return p.write(ctx, i, files)
}

// write writes the layer of the files as layer i to a scratch file.
func (p *packer) write(ctx context.Context, i int, files *layerFiles) (packedLayer, error) {
	f, err := os.CreateTemp(p.scratch, fmt.Sprintf("layer%d-*.tar.gz", i))
	if err != nil {
		return packedLayer{}, err
	}
	info, err := imagebuild.WriteFiles(ctx, files.files, epoch, f)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		os.Remove(f.Name())
		return packedLayer{}, fmt.Errorf("pack layer %d: %w", i+1, err)
	}
	return packedLayer{path: f.Name(), digest: info.Digest, diffID: info.DiffID, size: info.Size, plain: info.TarSize, files: files}, nil
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

// dirStandIn is the host directory that stands for a directory no source
// has: empty, mode 0755, owned by the bench (root).
func (p *packer) dirStandIn() (string, error) {
	if p.emptyDir != "" {
		return p.emptyDir, nil
	}
	d, err := os.MkdirTemp(p.scratch, "empty-dir-")
	if err == nil {
		err = os.Chmod(d, 0o755)
	}
	if err != nil {
		return "", err
	}
	p.emptyDir = d
	return d, nil
}

// layerFiles is the file list of one layer.
type layerFiles struct {
	p     *packer
	files []imagebuild.File
	dirs  map[string]bool // directories already in the layer
}

func (l *layerFiles) clone() *layerFiles {
	c := &layerFiles{p: l.p, files: append([]imagebuild.File(nil), l.files...), dirs: make(map[string]bool, len(l.dirs))}
	for d := range l.dirs {
		c.dirs[d] = true
	}
	return c
}

// addWithParents adds the directories above name that the layer lacks,
// then name from the host path hp.
func (l *layerFiles) addWithParents(name, hp string) error {
	if dir := path.Dir(name); dir != "." && !l.dirs[dir] {
		if err := l.addWithParents(dir, l.p.hostPath(dir)); err != nil {
			return err
		}
		if !l.dirs[dir] {
			return fmt.Errorf("%s: not a directory in the packed tree, but %s is below it", dir, name)
		}
	}
	return l.add(name, hp)
}

// add adds the entry name from the host path hp; hp "" is a directory
// that no source has.
func (l *layerFiles) add(name, hp string) error {
	if l.dirs[name] {
		return nil
	}
	if hp == "" {
		d, err := l.p.dirStandIn()
		if err != nil {
			return err
		}
		l.dirs[name] = true
		l.files = append(l.files, imagebuild.File{Name: name, Path: d})
		return nil
	}
	fi, err := os.Lstat(hp)
	if err != nil {
		return err
	}
	if fi.Mode().Type() == fs.ModeSocket {
		return nil
	}
	if fi.IsDir() {
		l.dirs[name] = true
	}
	l.files = append(l.files, imagebuild.File{Name: name, Path: hp})
	return nil
}

// addFile adds the file at hp, which no source has, as name, with the
// directories above it.
func (l *layerFiles) addFile(name, hp string) error {
	if dir := path.Dir(name); dir != "." && !l.dirs[dir] {
		if err := l.addWithParents(dir, l.p.hostPath(dir)); err != nil {
			return err
		}
	}
	l.files = append(l.files, imagebuild.File{Name: name, Path: hp})
	return nil
}
