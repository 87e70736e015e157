package oci

import (
	"archive/tar"
	"fmt"
	"strings"
	"sync/atomic"

	"github.com/nodespawn/nodespawn/internal/confine"
	"github.com/nodespawn/nodespawn/internal/progress"
)

const (
	// entryOverhead is what each tar entry counts on top of its content:
	// its inode and directory entry, so that a layer of a billion empty
	// files is bounded like one of a few huge ones.
	entryOverhead = 512
	// blockSize is what file contents are rounded up to, as the
	// filesystem allocates them.
	blockSize = 4096
)

// Setting names, for the errors that say which one bounded a pull.
const (
	maxUnpackedSetting = "machine.rootfs.maxUnpackedSize"
	minFreeSetting     = "machine.rootfs.minFreeSpace"
)

// unpackLimit bounds what one pull writes, counted entry by entry before
// the entry is written (entryCost): a gzip bomb, or a sparse file of a
// terabyte, is refused at the first entry that would pass the bound, with
// nothing of it written. Parallel layers share one limit.
type unpackLimit struct {
	max  int64  // bytes; 0: no bound
	why  string // how max came about, for the error
	fix  string // what lifts it
	used atomic.Int64
}

// newUnpackLimit is the bound for a pull writing into dir (a path in
// root): req.MaxUnpacked if set, and the free space of dir's filesystem,
// measured now, less req.MinFree (after validateSource: negative means
// no reserve and no free-space bound), whichever is smaller. A filesystem
// already under the reserve refuses the pull at once.
func newUnpackLimit(req *Request, root *confine.Root, dir, what string) (*unpackLimit, error) {
	l := &unpackLimit{max: req.MaxUnpacked}
	if l.max > 0 {
		l.why = fmt.Sprintf("%s is %s", maxUnpackedSetting, progress.Bytes(l.max))
		l.fix = "raise " + maxUnpackedSetting
	}
	if req.MinFree < 0 {
		return l, nil
	}
	free, err := root.FreeSpace(dir)
	if err != nil {
		return nil, fmt.Errorf("%s: measure free space: %w", what, err)
	}
	room := free - req.MinFree
	if room <= 0 {
		return nil, fmt.Errorf("%s: the filesystem of %s has %s free, less than the %s that %s keeps free; free some space or lower %s",
			what, root.Show(dir), progress.Bytes(free), progress.Bytes(req.MinFree), minFreeSetting, minFreeSetting)
	}
	if l.max == 0 || room < l.max {
		l.max = room
		l.why = fmt.Sprintf("the filesystem of %s has %s free and %s keeps %s of it", root.Show(dir), progress.Bytes(free),
			minFreeSetting, progress.Bytes(req.MinFree))
		l.fix = "free space there or lower " + minFreeSetting
	}
	return l, nil
}

// entryCost is what one tar entry counts against the limit: its content
// rounded up to whole blocks (regular files; the logical size, so a sparse
// file counts what extracting it writes), its name, link target and
// extended attributes, and entryOverhead.
func entryCost(h *tar.Header) int64 {
	n := int64(entryOverhead + len(h.Name) + len(h.Linkname))
	switch h.Typeflag {
	case tar.TypeLink, tar.TypeSymlink, tar.TypeChar, tar.TypeBlock, tar.TypeDir, tar.TypeFifo:
	default:
		if h.Size > 0 {
			n += (h.Size + blockSize - 1) / blockSize * blockSize
		}
	}
	for k, v := range h.PAXRecords {
		if strings.HasPrefix(k, "SCHILY.xattr.") {
			n += int64(len(k) + len(v))
		}
	}
	return n
}

// charge counts n bytes about to be written; it fails, counting nothing,
// when they would pass the bound. where says what (an entry's name).
func (l *unpackLimit) charge(n int64, where string) error {
	if l == nil || l.max == 0 {
		return nil
	}
	if used := l.used.Add(n); used > l.max {
		l.used.Add(-n)
		return fmt.Errorf("unpacking %s would pass the bound on unpacked size, %s (%s were unpacked before it): the image unpacks to more than this host allows; %s, or use a smaller image",
			where, l.bound(), progress.Bytes(used-n), l.fix)
	}
	return nil
}

// bound says the bound and why it is that.
func (l *unpackLimit) bound() string {
	return progress.Bytes(l.max) + ": " + l.why
}

// filter is an archive.Filter that charges each entry, then passes it to
// next (if any).
func (l *unpackLimit) filter(next func(*tar.Header) (bool, error)) func(*tar.Header) (bool, error) {
	return func(h *tar.Header) (bool, error) {
		if err := l.charge(entryCost(h), fmt.Sprintf("entry %q", h.Name)); err != nil {
			return false, err
		}
		if next != nil {
			return next(h)
		}
		return true, nil
	}
}
