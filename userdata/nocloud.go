package userdata

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"

	"github.com/nodespawn/nodespawn/internal/command"
)

// Where a NoCloud seed is found: a directory an image or cloud-init left,
// or a volume labelled cidata (either case).
const (
	nocloudSeedDir = "/var/lib/cloud/seed/nocloud"
	nocloudNetSeed = "/var/lib/cloud/seed/nocloud-net"
	byLabelDir     = "/dev/disk/by-label"
)

// nocloud reads user-data from a seed directory, or from a cidata volume.
type nocloud struct {
	root string
	run  command.Runner
}

func newNoCloud(opts Options) nocloud { return nocloud{root: opts.Root, run: opts.Runner} }

func (nocloud) Name() string { return "nocloud" }

func (n nocloud) Fetch(ctx context.Context) (Source, error) {
	var misses []string
	for _, dir := range []string{nocloudSeedDir, nocloudNetSeed} {
		src, err := storedUserData(n.root, filepath.Join(dir, "user-data"))
		if err == nil || !errors.Is(err, ErrNoManifest) {
			return src, err
		}
		misses = append(misses, err.Error())
	}
	for _, label := range []string{"cidata", "CIDATA"} {
		link := filepath.Join(byLabelDir, label)
		if _, err := os.Stat(filepath.Join(n.root, link)); err != nil {
			continue
		}
		return n.device(ctx, link)
	}
	return Source{}, fmt.Errorf("nocloud: %w: %s; no block device labelled cidata or CIDATA in %s",
		ErrNoManifest, strings.Join(misses, "; "), byLabelDir)
}

// device mounts the cidata volume read-only on a temporary directory,
// reads its user-data and unmounts it again.
func (n nocloud) device(ctx context.Context, link string) (src Source, err error) {
	dev, err := filepath.EvalSymlinks(filepath.Join(n.root, link))
	if err != nil {
		return Source{}, fmt.Errorf("nocloud: resolve %s: %w", link, err)
	}
	dir, err := os.MkdirTemp("", "nodespawn-cidata-")
	if err != nil {
		return Source{}, fmt.Errorf("nocloud: mount point for %s: %w", dev, err)
	}
	defer os.Remove(dir)
	if _, err := n.run.Run(ctx, command.Options{}, "mount", "-o", "ro,nosuid,nodev,noexec", dev, dir); err != nil {
		return Source{}, fmt.Errorf("nocloud: mount %s (%s) read-only: %w", dev, link, err)
	}
	defer func() {
		// A mount left behind would keep the seed device busy; say so.
		if _, uerr := n.run.Run(context.WithoutCancel(ctx), command.Options{}, "umount", dir); uerr != nil {
			err = errors.Join(err, fmt.Errorf("nocloud: unmount %s: %w", dir, uerr))
		}
	}()
	data, err := readFile(filepath.Join(dir, "user-data"))
	name := dev + ":user-data"
	if errors.Is(err, fs.ErrNotExist) {
		return Source{}, fmt.Errorf("nocloud: %s: %w (the cidata volume has no user-data file)", name, ErrNoManifest)
	}
	if err != nil {
		return Source{}, fmt.Errorf("nocloud: %s: %w", name, err)
	}
	return extractSource(name, data)
}
