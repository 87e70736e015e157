package state

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// DefaultLockTimeout is how long a run (apply, reset) waits by default for
// the lock another run holds.
const DefaultLockTimeout = 2 * time.Minute

// lockPoll is how often a waiting apply retries the lock.
const lockPoll = 100 * time.Millisecond

// Lock is a held lock; Release drops it.
type Lock struct{ f *os.File }

// Lock takes the exclusive flock on <root>/run/nodespawn.lock,
// waiting up to timeout for a running apply or reset to finish. The kernel
// drops an flock when its holder dies, so a crashed run never blocks the
// next one. The holder writes its pid into the file for the error a waiter
// reports.
func (s *Store) Lock(ctx context.Context, timeout time.Duration, log *slog.Logger) (*Lock, error) {
	host := s.host
	path := host.Show(LockFile)
	if err := host.MkdirParents(filepath.Dir(LockFile)); err != nil {
		return nil, fmt.Errorf("create lock directory: %w", err)
	}
	f, err := host.OpenFile(LockFile, os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		return nil, fmt.Errorf("open lock: %w", err)
	}
	deadline := time.Now().Add(timeout)
	waiting := false
	for {
		err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB)
		if err == nil {
			break
		}
		if !errors.Is(err, unix.EWOULDBLOCK) {
			f.Close()
			return nil, fmt.Errorf("lock %s: %w", path, err)
		}
		if !waiting {
			log.Info("waiting for another nodespawn to finish", "lock", path, "holder", lockHolder(f), "timeout", timeout)
			waiting = true
		}
		if !time.Now().Before(deadline) {
			holder := lockHolder(f)
			f.Close()
			return nil, &LockedError{Path: path, Holder: holder}
		}
		select {
		case <-ctx.Done():
			f.Close()
			return nil, fmt.Errorf("wait for lock %s: %w", path, ctx.Err())
		case <-time.After(lockPoll):
		}
	}
	info := fmt.Sprintf("pid %d (%s) since %s\n", os.Getpid(), filepath.Base(os.Args[0]), time.Now().UTC().Format(time.RFC3339))
	if err := f.Truncate(0); err == nil {
		_, _ = f.WriteAt([]byte(info), 0)
	}
	l := &Lock{f: f}
	// The first run that holds the lock moves a state directory from
	// before the machine pair to the current layout.
	if err := s.migrate(); err != nil {
		l.Release()
		return nil, err
	}
	return l, nil
}

// Release empties the holder note and drops the lock.
func (l *Lock) Release() {
	_ = l.f.Truncate(0)
	_ = unix.Flock(int(l.f.Fd()), unix.LOCK_UN)
	l.f.Close()
}

// lockHolder reads the holder's note through the open lock file.
func lockHolder(f *os.File) string {
	b := make([]byte, 512)
	n, _ := f.ReadAt(b, 0)
	if s := strings.TrimSpace(string(b[:n])); s != "" {
		return s
	}
	return "an unknown process"
}

// LockedError is returned when another apply or reset held the lock for
// longer than the caller's timeout.
type LockedError struct {
	Path   string
	Holder string
}

func (e *LockedError) Error() string {
	return fmt.Sprintf("another nodespawn is running (lock %s held by %s); wait for it to finish and run again", e.Path, e.Holder)
}

// LockHeld reports whether a run holds the lock now.
func (s *Store) LockHeld() bool {
	f, err := s.host.OpenFile(LockFile, os.O_RDONLY, 0)
	if err != nil {
		return false
	}
	defer f.Close()
	if err := unix.Flock(int(f.Fd()), unix.LOCK_SH|unix.LOCK_NB); err != nil {
		return errors.Is(err, unix.EWOULDBLOCK)
	}
	unix.Flock(int(f.Fd()), unix.LOCK_UN)
	return false
}
