package oci

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"sync"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/nodespawn/nodespawn/internal/confine"
)

// A spool carries one compressed layer from its fetcher to the applier.
//
// The layer being applied (the one in turn) streams through memory like a
// pipe with pipeSlack bytes of slack: its fetcher blocks when the applier
// lags, and none of its bytes is ever written to a file. A layer fetched
// ahead of its turn is held in memory from a budget that all the spools of
// one pull share (Request.SpoolMemory); what does not fit is appended to
// an overflow file, an unlinked temporary file, preferably on a filesystem
// other than the rootfs's so that the tree's syncfs does not flush it (see
// spillTarget). A layer in turn may still drain what it spilled before its
// turn, but spills nothing more. If no overflow file can be made or
// written (a full tmpfs, say), that layer's fetcher waits for its turn, or
// for room in the budget, instead.
//
// The applier sees EOF only after the fetcher has verified size and digest,
// and the fetcher's error otherwise.
type spool struct {
	set *spools
	i   int // the layer's index
	// cond wakes this spool's fetcher and applier; it shares set.mu.
	cond *sync.Cond

	// Guarded by set.mu.
	segs   []segment // the bytes fetched and not yet applied, in order
	mem    int64     // of them, the bytes held in memory
	f      *os.File  // the overflow file, made at the first spill
	fsize  int64     // bytes written to f
	noFile bool      // no overflow file could be made or written
	done   bool
	err    error
	closed bool
}

// segment is a run of a spool's bytes: in memory (buf[r:], buf a chunk
// of the set's) or in the overflow file (n bytes at off).
type segment struct {
	buf      []byte
	r        int
	budgeted bool // buf counts against the shared budget
	off, n   int64
}

const (
	// DefaultSpoolMemory is how much memory, in all, the layers fetched
	// ahead of their turn may hold unless Request.SpoolMemory says
	// otherwise.
	DefaultSpoolMemory = 64 << 20
	// pipeSlack is how far the fetcher of the layer in turn may run ahead
	// of the applier.
	pipeSlack = 4 << 20
	// chunkSize is the unit spools allocate memory in.
	chunkSize = 256 << 10
)

var errSpoolClosed = errors.New("layer spool closed: the layer is no longer wanted")

// spools is what the spools of one pull share: the turn, the memory
// budget of the layers fetched ahead, and where they spill.
type spools struct {
	ctx context.Context
	log *slog.Logger
	// spill makes an overflow file; where says where, for messages.
	spill func() (*os.File, error)
	where string

	mu     sync.Mutex
	turn   int // the layer being applied
	budget int64
	used   int64 // budgeted bytes held by all spools
	peak   int64 // the most used ever was
	// spilled counts the bytes written to overflow files.
	spilled int64
	// starved counts fetchers waiting for room because they cannot spill.
	starved int
	live    map[*spool]struct{}
	warned  bool
	// free holds chunks read out, for reuse: what is held in memory stays
	// allocated instead of becoming garbage that the Go heap lets grow
	// to twice the live size before it collects.
	free [][]byte
}

// chunk returns an empty chunk; set.mu is held.
func (set *spools) chunk() []byte {
	if k := len(set.free); k > 0 {
		b := set.free[k-1]
		set.free[k-1] = nil
		set.free = set.free[:k-1]
		return b[:0]
	}
	return make([]byte, 0, chunkSize)
}

// recycle keeps a chunk read out for reuse, as many as the budget and
// a pipe's slack can hold at once; set.mu is held.
func (set *spools) recycle(b []byte) {
	if int64(len(set.free)) < (set.budget+pipeSlack)/chunkSize {
		set.free = append(set.free, b)
	}
}

// newSpools makes the spools of one pull. Cancelling ctx wakes and fails
// every fetcher that waits (the caller stops the returned func when done).
func newSpools(ctx context.Context, budget int64, spill func() (*os.File, error), where string, log *slog.Logger) (*spools, func() bool) {
	set := &spools{ctx: ctx, log: log, spill: spill, where: where, budget: max(budget, 0), live: map[*spool]struct{}{}}
	stop := context.AfterFunc(ctx, func() {
		set.mu.Lock()
		set.wakeAll()
		set.mu.Unlock()
	})
	return set, stop
}

// wakeAll wakes every spool's waiters; set.mu is held.
func (set *spools) wakeAll() {
	for s := range set.live {
		s.cond.Broadcast()
	}
}

// setTurn makes layer i the one in turn.
func (set *spools) setTurn(i int) {
	set.mu.Lock()
	set.turn = i
	set.wakeAll()
	set.mu.Unlock()
}

// stats returns the bytes spilled and the most memory the budget lent.
func (set *spools) stats() (spilled, peak int64) {
	set.mu.Lock()
	defer set.mu.Unlock()
	return set.spilled, set.peak
}

// release returns n budgeted bytes; set.mu is held.
func (set *spools) release(n int64) {
	set.used -= n
	if set.starved > 0 {
		set.wakeAll()
	}
}

// newSpool makes the spool of layer i.
func (set *spools) newSpool(i int) *spool {
	s := &spool{set: set, i: i}
	s.cond = sync.NewCond(&set.mu)
	set.mu.Lock()
	set.live[s] = struct{}{}
	set.mu.Unlock()
	return s
}

// Write appends fetched bytes. It blocks while the layer is in turn and
// pipeSlack bytes wait for the applier, or while the layer can neither be
// held in memory nor spilled; it fails once the spool is closed or the
// pull cancelled.
func (s *spool) Write(p []byte) (int, error) {
	set := s.set
	set.mu.Lock()
	defer set.mu.Unlock()
	written := 0
	for len(p) > 0 {
		if s.closed {
			return written, errSpoolClosed
		}
		if err := set.ctx.Err(); err != nil {
			return written, err
		}
		var n int
		if set.turn == s.i {
			// In turn: a pipe. Wait until all of p fits (p is a read's
			// worth, 32 KiB from io.Copy) so that the fetcher and the
			// applier do not wake each other for every few bytes.
			if s.mem > 0 && s.mem+int64(len(p)) > pipeSlack {
				s.cond.Wait()
				continue
			}
			n = len(p)
			s.appendMem(p, false)
		} else if room := set.budget - set.used; room > 0 {
			n = int(min(int64(len(p)), room))
			s.appendMem(p[:n], true)
			set.used += int64(n)
			set.peak = max(set.peak, set.used)
		} else if !s.noFile {
			var err error
			if n, err = s.spillLocked(p); err != nil {
				return written, err
			}
		} else {
			set.starved++
			s.cond.Wait()
			set.starved--
			continue
		}
		p = p[n:]
		written += n
		s.cond.Broadcast()
	}
	return written, nil
}

// spillLocked appends p to the overflow file, made at the first spill. The
// file is written with set.mu released: only this spool's fetcher writes
// it, and the applier reads only what is published in segs. A failure to
// make or write the file is not the fetch's: the spool stops spilling and
// the fetcher waits for room instead (n is 0 then).
func (s *spool) spillLocked(p []byte) (int, error) {
	set := s.set
	f, off := s.f, s.fsize
	set.mu.Unlock()
	var err error
	if f == nil {
		f, err = set.spill()
	}
	n := 0
	if err == nil {
		n, err = f.WriteAt(p, off)
	}
	set.mu.Lock()
	if s.f == nil && f != nil {
		if s.closed {
			f.Close()
		} else {
			s.f = f
		}
	}
	if s.closed {
		return 0, errSpoolClosed
	}
	if err != nil {
		// Bytes written before the error are past fsize: overwritten or
		// never read.
		s.noFile = true
		if !set.warned {
			set.warned = true
			set.log.Warn("cannot spill a layer fetched ahead of its turn; its download waits for room instead",
				"dir", set.where, "error", err)
		}
		return 0, nil
	}
	s.fsize += int64(n)
	set.spilled += int64(n)
	if k := len(s.segs); k > 0 && s.segs[k-1].buf == nil && s.segs[k-1].off+s.segs[k-1].n == off {
		s.segs[k-1].n += int64(n)
	} else {
		s.segs = append(s.segs, segment{off: off, n: int64(n)})
	}
	return n, nil
}

// appendMem copies p into memory segments; set.mu is held.
func (s *spool) appendMem(p []byte, budgeted bool) {
	s.mem += int64(len(p))
	for len(p) > 0 {
		k := len(s.segs)
		if k == 0 || s.segs[k-1].buf == nil || s.segs[k-1].budgeted != budgeted || len(s.segs[k-1].buf) == cap(s.segs[k-1].buf) {
			s.segs = append(s.segs, segment{buf: s.set.chunk(), budgeted: budgeted})
			k++
		}
		last := &s.segs[k-1]
		n := min(len(p), cap(last.buf)-len(last.buf))
		last.buf = append(last.buf, p[:n]...)
		p = p[n:]
	}
}

// finish ends the stream; a nil err means the content was verified.
func (s *spool) finish(err error) {
	s.set.mu.Lock()
	s.done, s.err = true, err
	s.cond.Broadcast()
	s.set.mu.Unlock()
}

// Read gives the applier the bytes in order, blocking until there are
// some; at the end, EOF if the fetch verified the layer and its error if
// not.
func (s *spool) Read(p []byte) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	set := s.set
	set.mu.Lock()
	for len(s.segs) == 0 && !s.done && !s.closed {
		s.cond.Wait()
	}
	switch {
	case s.closed:
		set.mu.Unlock()
		return 0, errSpoolClosed
	case len(s.segs) == 0:
		err := s.err
		set.mu.Unlock()
		if err != nil {
			return 0, err
		}
		return 0, io.EOF
	}
	if seg := &s.segs[0]; seg.buf != nil {
		n := copy(p, seg.buf[seg.r:])
		seg.r += n
		s.mem -= int64(n)
		if seg.budgeted {
			set.release(int64(n))
		}
		if seg.r == len(seg.buf) {
			set.recycle(seg.buf)
			s.pop()
		}
		// The fetcher in turn waits for room for a whole write.
		if s.mem <= pipeSlack/2 {
			s.cond.Broadcast()
		}
		set.mu.Unlock()
		return n, nil
	}
	off, n, f := s.segs[0].off, min(int64(len(p)), s.segs[0].n), s.f
	set.mu.Unlock()
	// The range was written before it was published; only this reader
	// moves the head.
	m, err := f.ReadAt(p[:n], off)
	set.mu.Lock()
	if len(s.segs) > 0 && !s.closed {
		s.segs[0].off += int64(m)
		if s.segs[0].n -= int64(m); s.segs[0].n == 0 {
			s.pop()
		}
	}
	set.mu.Unlock()
	if err == io.EOF && int64(m) == n {
		err = nil
	} else if err != nil {
		err = fmt.Errorf("read spilled layer: %w", err)
	}
	return m, err
}

// pop drops the head segment; set.mu is held.
func (s *spool) pop() {
	s.segs[0] = segment{}
	s.segs = s.segs[1:]
}

// Close releases the spool: its memory goes back to the budget, its
// overflow file (and with it the space) is closed, and its fetcher, if
// still running, fails at its next write.
func (s *spool) Close() error {
	set := s.set
	set.mu.Lock()
	s.closed = true
	for _, seg := range s.segs {
		if seg.budgeted {
			set.release(int64(len(seg.buf) - seg.r))
		}
	}
	s.segs, s.mem = nil, 0
	f := s.f
	s.f = nil
	delete(set.live, s)
	s.cond.Broadcast()
	set.mu.Unlock()
	if f != nil {
		return f.Close()
	}
	return nil
}

// devOf is the device of a file's filesystem (0 if unknown).
func devOf(fi os.FileInfo) uint64 {
	if st, ok := fi.Sys().(*syscall.Stat_t); ok {
		return st.Dev
	}
	return 0
}

// tmpfileIn makes an unnamed temporary file in the host directory dir
// (O_TMPFILE): it has no name at any instant, so a kill leaves nothing.
func tmpfileIn(dir string) (*os.File, error) {
	return os.OpenFile(dir, os.O_RDWR|unix.O_TMPFILE|os.O_EXCL, 0o600)
}

// spillTarget decides where the layers fetched ahead spill what does not
// fit in memory, and returns how to make such a file and where it is.
//
//   - dir, when set (Request.SpoolDir), a host directory: unnamed files
//     there, whatever its filesystem.
//   - otherwise the system's temporary directory (os.TempDir, $TMPDIR or
//     /tmp) when it takes unnamed files and is on another filesystem than
//     the staging tree, so the tree's syncfs does not flush the spill
//     (a tmpfs /tmp keeps it in memory, swappable, up to its size).
//   - otherwise (a /tmp on the rootfs's own filesystem) the rootfs's
//     parent in the root, as before: the spill is on the tree's
//     filesystem, though its pages are dropped unwritten if the file is
//     closed before writeback starts. An unnamed file where the
//     filesystem takes one; else a temporary name of dest's, unlinked at
//     once, which the next pull's leftover sweep removes if a kill comes
//     in between.
func spillTarget(root *confine.Root, stage, parent, dest, dir string) (func() (*os.File, error), string) {
	if dir != "" {
		return func() (*os.File, error) { return tmpfileIn(dir) }, dir
	}
	tmp := os.TempDir()
	if f, err := tmpfileIn(tmp); err == nil {
		tfi, terr := f.Stat()
		f.Close()
		if sfi, err := root.Stat(stage); terr == nil && err == nil && devOf(tfi) != devOf(sfi) {
			return func() (*os.File, error) { return tmpfileIn(tmp) }, tmp
		}
	}
	return func() (*os.File, error) {
		f, err := root.OpenFile(parent, os.O_RDWR|unix.O_TMPFILE|os.O_EXCL, 0o600)
		if err == nil {
			return f, nil
		}
		// A temporary name of dest's: a kill before the unlink leaves a
		// file the next pull's leftover sweep removes.
		f, name, err := root.CreateTemp(parent, confine.TempPrefix(dest, "layer"))
		if err != nil {
			return nil, fmt.Errorf("create layer spool: %w", err)
		}
		if err := root.Remove(name); err != nil {
			f.Close()
			return nil, fmt.Errorf("unlink layer spool: %w", err)
		}
		return f, nil
	}, root.Show(parent)
}
