package layers

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path"
	"strings"
	"time"

	"github.com/opencontainers/go-digest"
	"golang.org/x/sys/unix"

	"github.com/nodespawn/nodespawn/internal/confine"
)

// A layer's stamp is what Check compares to notice a layer directory
// emptied, replaced or changed by hand without walking it: the top-level
// entries of the layer (names and types, which nothing changes once the
// layer has its name: overlayfs never writes to a lower directory) and
// the digest of its note. Unpack writes it after the fill and before the
// layer's name, beside the note, so a layer with a name always has its
// stamp; a stamp whose layer never got its name is swept like a note.
// Layers committed before stamps existed have none and are taken as they
// are.
//
// The stamp names no inode: a store copied whole to another disk keeps
// its stamps true, and two hosts unpacking the same layer write the same
// stamp.
const stampVersion = "nodespawn-layer-stamp/v1"

func (s *Store) stampPath(id digest.Digest) string {
	return path.Join(s.dir, "stamps", id.Encoded())
}

// stampOf is the stamp of the layer tree in dir (a path in the root) with
// note.
func (s *Store) stampOf(dir string, note []byte) ([]byte, error) {
	// The entries' names and types as the directory lists them (d_type),
	// the directory resolved in the root: Root.ReadDir would stat every
	// entry on its own, three calls each, on every status.
	var es []fs.DirEntry
	err := s.root.InDir(dir, func(d string) error {
		var err error
		es, err = os.ReadDir(d)
		return err
	})
	if err != nil {
		return nil, err
	}
	h := sha256.New()
	for _, e := range es {
		fmt.Fprintf(h, "%s\x00%s\n", e.Name(), e.Type())
	}
	noteSum := "-"
	if note != nil {
		sum := sha256.Sum256(note)
		noteSum = hex.EncodeToString(sum[:])
	}
	return fmt.Appendf(nil, "%s\nentries %d %s\nnote %s\n", stampVersion, len(es), hex.EncodeToString(h.Sum(nil)), noteSum), nil
}

// writeStamp records the stamp of the staged layer tree in stage for id,
// with its note.
func (s *Store) writeStamp(id digest.Digest, stage string, note []byte) error {
	st, err := s.stampOf(stage, note)
	if err != nil {
		return fmt.Errorf("layer store: %w", err)
	}
	if err := s.root.MkdirAll(path.Dir(s.stampPath(id)), 0o700, 0, 0); err != nil {
		return fmt.Errorf("layer store: %w", err)
	}
	if err := s.root.WriteFile(s.stampPath(id), st, 0o600, 0, 0); err != nil {
		return fmt.Errorf("layer store: %w", err)
	}
	return nil
}

// removeStamp removes id's stamp, if any.
func (s *Store) removeStamp(id digest.Digest) error {
	if err := s.root.Remove(s.stampPath(id)); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("layer store: %w", err)
	}
	return nil
}

// sweepStamps removes the stamps of layers not in the store.
func (s *Store) sweepStamps() error {
	es, err := s.root.ReadDir(path.Join(s.dir, "stamps"))
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("layer store: %w", err)
	}
	for _, e := range es {
		id := digest.NewDigestFromEncoded(digest.SHA256, e.Name())
		if have, err := s.Has(id); err != nil || !have {
			if err := s.root.RemoveAll(path.Join(s.dir, "stamps", e.Name())); err != nil {
				return fmt.Errorf("layer store: %w", err)
			}
		}
	}
	return nil
}

// Problem is one thing wrong with a machine root composed of layers.
type Problem struct {
	// Part is what is wrong: "record", "layer", "upper" or "work" (and
	// "mount" or "check" where apply adds what it knows: the machine runs
	// on an unmounted root, the root could not be looked at).
	Part string `json:"part"`
	// Path is the missing or damaged piece, a path in the root (as
	// Root.Show writes it).
	Path string `json:"path"`
	// DiffID is the layer's, for a layer.
	DiffID digest.Digest `json:"diffID,omitempty"`
	// Detail says what is wrong, in one line.
	Detail string `json:"detail"`
}

func (p Problem) String() string { return p.Detail }

// Health is what Check found.
type Health struct {
	// Image is the root's record; nil when it is missing or unreadable.
	Image *Image
	// Mounted is true when an overlayfs is mounted at the target. Whether
	// it should be depends on who asks (a running machine needs it; a
	// stopped one may be mounted at its start), so it is a fact here and
	// not a problem.
	Mounted bool
	// Problems are what a repair must fix, in the order Check found them.
	Problems []Problem
	// LostUpper is true when the machine's upper directory (what the
	// machine and apply wrote to its root) is gone or not a directory:
	// a repair makes it again, empty.
	LostUpper bool
}

// Check looks at the machine root m cheaply enough for every status: the
// record is readable, every layer it names is a directory in the store
// whose top-level entries and note are the ones its stamp recorded when it
// was unpacked, and the upper and work directories are directories. It
// reads the record, one directory listing and two small files per layer,
// and never walks a layer. err is for what stops the look itself (the
// root unreadable); a broken root is Problems.
func (s *Store) Check(m Machine) (Health, error) {
	root := s.root
	var h Health
	add := func(p Problem) { h.Problems = append(h.Problems, p) }
	rec := path.Join(m.Dir, RecordName)
	img, err := ReadImage(root, m.Dir)
	switch {
	case err != nil:
		add(Problem{Part: "record", Path: root.Show(rec), Detail: fmt.Sprintf("the record of machine root %s is unreadable: %v", root.Show(m.Target), err)})
	case img == nil:
		add(Problem{Part: "record", Path: root.Show(rec), Detail: fmt.Sprintf("the record of machine root %s (%s) is missing", root.Show(m.Target), root.Show(rec))})
	}
	h.Image = img
	if img != nil {
		seen := map[digest.Digest]bool{}
		for i, id := range img.Layers {
			if seen[id] {
				continue
			}
			seen[id] = true
			if p := s.checkLayer(id); p != "" {
				add(Problem{Part: "layer", Path: root.Show(s.Path(id)), DiffID: id,
					Detail: fmt.Sprintf("layer %d/%d %s %s", i+1, len(img.Layers), id, p)})
			}
		}
	}
	for _, d := range []string{"upper", "work"} {
		p := path.Join(m.Dir, d)
		fi, err := root.Lstat(p)
		var what string
		switch {
		case errors.Is(err, fs.ErrNotExist):
			what = "is missing"
		case err != nil:
			what = fmt.Sprintf("cannot be read (%v)", err)
		case !fi.IsDir():
			what = "is not a directory"
		default:
			continue
		}
		add(Problem{Part: d, Path: root.Show(p), Detail: fmt.Sprintf("the %s directory of machine root %s (%s) %s", d, root.Show(m.Target), root.Show(p), what)})
		if d == "upper" {
			h.LostUpper = true
		}
	}
	mounted, err := overlayMountedAt(root, m.Target)
	if err != nil {
		return h, err
	}
	h.Mounted = mounted
	return h, nil
}

// checkLayer says what is wrong with layer id, "" for nothing.
func (s *Store) checkLayer(id digest.Digest) string {
	have, err := s.Has(id)
	switch {
	case err != nil:
		return fmt.Sprintf("cannot be looked at: %v", err)
	case !have:
		return fmt.Sprintf("is missing from the layer store (%s)", s.root.Show(s.Path(id)))
	}
	want, err := s.root.ReadFile(s.stampPath(id))
	if errors.Is(err, fs.ErrNotExist) {
		return "" // unpacked by a version that wrote no stamps
	}
	if err != nil {
		return fmt.Sprintf("has an unreadable stamp: %v", err)
	}
	note, err := s.Note(id)
	if err != nil {
		return fmt.Sprintf("has an unreadable note: %v", err)
	}
	got, err := s.stampOf(s.Path(id), note)
	if err != nil {
		return fmt.Sprintf("cannot be listed: %v", err)
	}
	if string(got) == string(want) {
		return ""
	}
	g, w := parseStamp(got), parseStamp(want)
	if g.note != w.note {
		return fmt.Sprintf("has lost or changed its note (%s): it is not the one the layer was unpacked with", s.root.Show(s.notePath(id)))
	}
	return fmt.Sprintf("in the layer store (%s) is not the tree that was unpacked: its top-level entries changed (%s now, %s when it was unpacked)",
		s.root.Show(s.Path(id)), g.entries, w.entries)
}

type stamp struct{ entries, note string }

// parseStamp reads what stampOf wrote; fields it lacks stay "?".
func parseStamp(b []byte) stamp {
	st := stamp{entries: "?", note: "?"}
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		switch {
		case len(f) == 3 && f[0] == "entries":
			st.entries = f[1]
		case len(f) == 2 && f[0] == "note":
			st.note = f[1]
		}
	}
	return st
}

// overlayMountedAt reports whether an overlayfs is mounted at target (a
// path in root): the directory the kernel finds there is an overlayfs on
// another device than its parent. No mount table is read, and how the
// overlay was mounted (options or descriptors) does not matter.
func overlayMountedAt(root *confine.Root, target string) (bool, error) {
	mounted := false
	err := root.InDir(target, func(dir string) error {
		var sfs unix.Statfs_t
		if err := unix.Statfs(dir, &sfs); err != nil || sfs.Type != unix.OVERLAYFS_SUPER_MAGIC {
			return err
		}
		// dir/.. is the mount point's parent as the kernel walks it,
		// across the mount.
		var here, up unix.Stat_t
		if err := unix.Stat(dir, &here); err != nil {
			return err
		}
		if err := unix.Stat(dir+"/..", &up); err != nil {
			return err
		}
		mounted = here.Dev != up.Dev
		return nil
	})
	if errors.Is(err, fs.ErrNotExist) {
		return false, nil
	}
	return mounted, err
}

// Repair readies the machine root m, found broken by Check (h), for the
// image step to make whole again: it unmounts the root, deletes each
// layer that is there but not what was unpacked (the pull then fetches it
// again, with the missing ones), makes a missing upper directory again,
// empty (what was written to the root since it was made is lost; log says
// so), and a missing work directory, and removes an unreadable record
// (Compose then starts the root afresh, its upper directory emptied). The
// caller stops the machine first. Compose, after the pull, mounts the
// root again.
func (s *Store) Repair(ctx context.Context, m Machine, h Health, log *slog.Logger) error {
	root := s.root
	if err := Unmount(ctx, root, m.Target, 30*time.Second, log); err != nil {
		return fmt.Errorf("repair machine root %s: %w", root.Show(m.Target), err)
	}
	if err := root.MkdirAll(m.Dir, 0o700, 0, 0); err != nil {
		return err
	}
	for _, p := range h.Problems {
		switch p.Part {
		case "record":
			rec := path.Join(m.Dir, RecordName)
			if err := root.Remove(rec); err != nil && !errors.Is(err, fs.ErrNotExist) {
				return fmt.Errorf("repair machine root %s: %w", root.Show(m.Target), err)
			}
			log.Warn("machine root: its record is missing or unreadable; the root is made again from its image, and what was written to it is lost",
				"target", root.Show(m.Target), "record", root.Show(rec))
		case "layer":
			// Whatever is at the layer's name (a directory not as
			// unpacked, or not a directory at all) goes.
			if _, err := root.Lstat(s.Path(p.DiffID)); err == nil {
				if err := s.discard(p.DiffID); err != nil {
					return fmt.Errorf("repair machine root %s: %w", root.Show(m.Target), err)
				}
				log.Warn("layer store: removed a layer that is not what was unpacked; it is fetched again", "diffID", p.DiffID, "path", p.Path)
			} else {
				log.Warn("layer store: a layer of the machine root is missing; it is fetched again", "diffID", p.DiffID, "path", p.Path)
			}
		case "upper", "work":
			dir := path.Join(m.Dir, p.Part)
			if fi, err := root.Lstat(dir); err == nil && !fi.IsDir() {
				if err := root.Remove(dir); err != nil {
					return fmt.Errorf("repair machine root %s: %w", root.Show(m.Target), err)
				}
			}
			if err := root.Mkdir(dir, 0o755, 0, 0); err != nil && !errors.Is(err, fs.ErrExist) {
				return fmt.Errorf("repair machine root %s: %w", root.Show(m.Target), err)
			}
			if p.Part == "upper" {
				log.Warn("machine root: its upper directory was gone; made again, empty: what the machine and apply wrote to its root since it was made is lost (apply writes its own files again)",
					"target", root.Show(m.Target), "upper", root.Show(dir))
			}
		}
	}
	return root.SyncDir(m.Dir)
}
