package oci

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
)

// DebootstrapRequest is the deprecated debootstrap fallback: a Debian
// rootfs built from a mirror instead of pulled as an image.
type DebootstrapRequest struct {
	Suite   string
	Mirror  string
	Include []string
	// Root and Dest are where the rootfs goes, as in Request.
	Root *confine.Root
	Dest string
	Log  *slog.Logger
}

// Debootstrap builds Dest with debootstrap, through the same staging
// directory, rename and marker as Pull, so a rerun with the same suite,
// mirror and include list is a no-op. It logs a deprecation warning.
func Debootstrap(ctx context.Context, req DebootstrapRequest) (Result, error) {
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
	res := Result{Reference: "debootstrap:" + req.Suite, ManifestDigest: recipe}
	want := marker{Source: res.Reference, Platform: "debootstrap", Manifest: recipe}

	root := newRootfs(req.Root, req.Dest)
	if root.current(want) {
		if err := root.removeLeftovers(log); err != nil {
			return res, err
		}
		log.Info("rootfs already built by debootstrap with these arguments", "dest", req.Root.Show(req.Dest))
		res.NoOp = true
		return res, nil
	}
	stage, err := root.stage(log)
	if err != nil {
		return res, err
	}
	committed := false
	defer func() {
		if !committed {
			stage.discard(log)
		}
	}()
	// debootstrap takes a path; the staging directory's /proc/self/fd
	// name is the one the kernel resolved inside the root.
	err = req.Root.InDir(stage.dir, func(dir string) error {
		_, err := command.Run(ctx, "debootstrap", debootstrapArgs(req, dir)...)
		return err
	})
	if err != nil {
		return res, fmt.Errorf("debootstrap %s into %s: %w", req.Suite, req.Root.Show(stage.dir), err)
	}
	if err := stage.commit(want, log); err != nil {
		return res, err
	}
	committed = true
	return res, nil
}

// debootstrapArgs is debootstrap's command line for target dir.
func debootstrapArgs(req DebootstrapRequest, dir string) []string {
	args := []string{"--variant=minbase"}
	if len(req.Include) > 0 {
		args = append(args, "--include="+strings.Join(req.Include, ","))
	}
	return append(args, req.Suite, dir, req.Mirror)
}
