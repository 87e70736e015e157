// Package debootstrap is the deprecated rootfs fallback: a Debian tree
// built from a mirror with debootstrap(8) instead of pulled as an image,
// staged and committed like one (internal/rootfs).
package debootstrap

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"log/slog"
	"path"
	"strings"

	"github.com/opencontainers/go-digest"

	"github.com/nodespawn/nodespawn/internal/command"
	"github.com/nodespawn/nodespawn/internal/confine"
	"github.com/nodespawn/nodespawn/internal/rootfs"
)

// Request is the deprecated debootstrap fallback: a Debian
// rootfs built from a mirror instead of pulled as an image.
type Request struct {
	Suite   string
	Mirror  string
	Include []string
	// Root and Dest are where the rootfs goes, as in Request.
	Root *confine.Root
	Dest string
	Log  *slog.Logger
}

// Result is what Build did.
type Result struct {
	// Recipe stands in for an image digest: the digest of debootstrap's
	// arguments (same arguments, same rootfs).
	Recipe digest.Digest
	// NoOp is true when Dest already held this recipe's tree.
	NoOp bool
}

// Build builds Dest with debootstrap, through the same staging
// directory, rename and marker as Pull, so a rerun with the same suite,
// mirror and include list is a no-op. It logs a deprecation warning.
func Build(ctx context.Context, req Request) (Result, error) {
	log := req.Log
	if log == nil {
		log = slog.Default()
	}
	if req.Root == nil || !path.IsAbs(req.Dest) || confine.Clean(req.Dest) == "" {
		return Result{}, fmt.Errorf("debootstrap: destination %q must be an absolute path below /", req.Dest)
	}
	if req.Suite == "" || req.Mirror == "" {
		return Result{}, errors.New("debootstrap: suite and mirror are required")
	}
	log.Warn("the debootstrap rootfs is deprecated: it is slow, needs a Debian mirror at first boot and is not pinned; use an OCI image (machine.image) instead",
		"suite", req.Suite, "mirror", req.Mirror)

	args := debootstrapArgs(req, "")
	// The recipe stands in for a manifest digest: same arguments, same rootfs.
	sum := sha256.Sum256([]byte(strings.Join(args, "\x00")))
	recipe := digest.NewDigestFromBytes(digest.SHA256, sum[:])
	res := Result{Recipe: recipe}
	want := rootfs.Marker{Source: "debootstrap:" + req.Suite, Platform: "debootstrap", Manifest: recipe}

	root := rootfs.New(req.Root, req.Dest)
	if done, err := root.Done(want, log); err != nil || done {
		if err != nil {
			return res, err
		}
		log.Info("rootfs already built by debootstrap with these arguments", "dest", req.Root.Show(req.Dest))
		res.NoOp = true
		return res, nil
	}
	err := root.Build(want, log, func(stage string) error {
		// debootstrap takes a path: the staging directory's, as held open
		// by the confinement layer.
		err := req.Root.InDir(stage, func(dir string) error {
			_, err := command.Run(ctx, "debootstrap", debootstrapArgs(req, dir)...)
			return err
		})
		if err != nil {
			return fmt.Errorf("debootstrap %s into %s: %w", req.Suite, req.Root.Show(stage), err)
		}
		return nil
	})
	return res, err
}

// debootstrapArgs is debootstrap's command line for target dir.
func debootstrapArgs(req Request, dir string) []string {
	args := []string{"--variant=minbase"}
	if len(req.Include) > 0 {
		args = append(args, "--include="+strings.Join(req.Include, ","))
	}
	return append(args, req.Suite, dir, req.Mirror)
}
