package oci

import (
	"fmt"
	"io"
	"os"
	"sync"

	"github.com/nodespawn/nodespawn/internal/confine"
)

// spool carries one compressed layer from its fetcher to the applier. The
// fetcher appends to an unlinked temporary file; the applier reads behind it
// and blocks when it catches up. A layer fetched ahead of its turn thus waits
// in the page cache of a file that has no name (nothing is left behind by a
// crash, and pages freed before writeback never reach the disk), while the
// layer being applied streams through with a lag of a few buffers. The
// applier sees EOF only after the fetcher has verified size and digest, and
// the fetcher's error otherwise.
type spool struct {
	f *os.File

	mu      sync.Mutex
	cond    *sync.Cond
	written int64
	done    bool
	err     error
}

func newSpool(root *confine.Root, dir, dest string) (*spool, error) {
	// A temporary name of dest's: a kill before the unlink leaves a file
	// the next pull's leftover sweep removes.
	f, name, err := root.CreateTemp(dir, confine.TempPrefix(dest, "layer"))
	if err != nil {
		return nil, fmt.Errorf("create layer spool: %w", err)
	}
	if err := root.Remove(name); err != nil {
		f.Close()
		return nil, fmt.Errorf("unlink layer spool: %w", err)
	}
	s := &spool{f: f}
	s.cond = sync.NewCond(&s.mu)
	return s, nil
}

// Write appends fetched bytes.
func (s *spool) Write(p []byte) (int, error) {
	n, err := s.f.Write(p)
	s.mu.Lock()
	s.written += int64(n)
	s.cond.Broadcast()
	s.mu.Unlock()
	return n, err
}

// finish ends the stream; a nil err means the content was verified.
func (s *spool) finish(err error) {
	s.mu.Lock()
	s.done, s.err = true, err
	s.cond.Broadcast()
	s.mu.Unlock()
}

// Close releases the file (and with it the space).
func (s *spool) Close() error { return s.f.Close() }

// reader returns the applier's view of the stream.
func (s *spool) reader() io.Reader { return &spoolReader{s: s} }

type spoolReader struct {
	s   *spool
	off int64
}

func (r *spoolReader) Read(p []byte) (int, error) {
	s := r.s
	s.mu.Lock()
	for r.off >= s.written && !s.done {
		s.cond.Wait()
	}
	avail, done, ferr := s.written-r.off, s.done, s.err
	s.mu.Unlock()
	if avail == 0 && done {
		if ferr != nil {
			return 0, ferr
		}
		return 0, io.EOF
	}
	if int64(len(p)) > avail {
		p = p[:avail]
	}
	n, err := s.f.ReadAt(p, r.off)
	r.off += int64(n)
	if err == io.EOF && n > 0 {
		err = nil
	}
	return n, err
}
