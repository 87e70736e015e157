package apply

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

	"github.com/nodespawn/nodespawn/internal/confine"
)

// lockPoll is how often a waiting apply retries the lock.
const lockPoll = 100 * time.Millisecond

type fileLock struct{ f *os.File }

// acquireLock takes the exclusive flock on <root>/run/nodespawn.lock,
// waiting up to timeout for a running apply or reset to finish. The kernel
// drops an flock when its holder dies, so a crashed run never blocks the
// next one. The holder writes its pid into the file for the error a waiter
// reports.
func acquireLock(ctx context.Context, host *confine.Root, timeout time.Duration, log *slog.Logger) (*fileLock, error) {
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
	return &fileLock{f: f}, nil
}

// release empties the holder note and drops the lock.
func (l *fileLock) release() {
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
