package main

import (
	"errors"
	"fmt"
	"strings"

	"github.com/spf13/cobra"
	"oras.land/oras-go/v2"

	"github.com/nodespawn/nodespawn/internal/imagebuild"
)

// newImageCmd is `nodespawn image`: building machine rootfs images without
// a container engine.
func newImageCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "image",
		Short: "Build machine rootfs images without a container engine",
	}
	cmd.AddCommand(newImageBuildCmd())
	return cmd
}

func newImageBuildCmd() *cobra.Command {
	var (
		rootfs, ref, layout, platform string
		plainHTTP                     bool
		cmdline                       []string
	)
	cmd := &cobra.Command{
		Use:   "build --rootfs DIR --ref REF [--layout DIR] [--plain-http] [--platform linux/amd64]",
		Short: "Pack a rootfs directory into a reproducible single-layer OCI image",
		Long: `Packs a root filesystem directory (made by images/build-rootfs.sh, debootstrap
or anything else) into a single-layer OCI image and pushes it to a registry, or
writes it into an OCI image layout with --layout (then --ref is the tag inside
the layout, or a full reference whose tag is used).

The same tree always gives the same digest: entries are sorted, every mtime is
$SOURCE_DATE_EPOCH (or 1970-01-01), ownership, modes, hard links, device nodes
and xattrs are kept. Run it as root so every file can be read.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			// Every mistake in the flags is bad input (exit 2), found
			// before anything is read or pushed.
			switch {
			case rootfs == "" || ref == "":
				return usageError{errors.New("image build needs --rootfs DIR and --ref REF")}
			case layout != "" && plainHTTP:
				return usageError{fmt.Errorf("--plain-http is for registries; --layout %s writes a local directory", layout)}
			}
			if platform != "" {
				if _, err := imagebuild.ParsePlatform(platform); err != nil {
					return usageError{fmt.Errorf("--platform: %w", err)}
				}
			}
			created, err := imagebuild.SourceDateEpoch()
			if err != nil {
				return usageError{err}
			}
			var (
				dst oras.Target
				tag string
			)
			if layout != "" {
				tag = layoutTag(ref)
				dst, err = imagebuild.Layout(layout)
			} else {
				dst, tag, err = imagebuild.Repository(ref, plainHTTP)
			}
			if err != nil {
				return err
			}
			res, err := imagebuild.Build(cmd.Context(), rootfs, dst, tag, imagebuild.Options{
				Platform: platform,
				Created:  created,
				Cmd:      cmdline,
			})
			if err != nil {
				return fmt.Errorf("build image from %s: %w", rootfs, err)
			}
			fmt.Fprintf(cmd.OutOrStdout(), "%s@%s\n", ref, res.Manifest.Digest)
			fmt.Fprintf(cmd.ErrOrStderr(), "layer %s (%d bytes, %d entries), config %s\n", res.Layer.Digest, res.Layer.Size, res.Entries, res.Config.Digest)
			return nil
		},
	}
	f := cmd.Flags()
	f.StringVar(&rootfs, "rootfs", "", "root filesystem directory to pack (required)")
	f.StringVar(&ref, "ref", "", "image reference to push, host[:port]/name:tag; with --layout, the tag (required)")
	f.StringVar(&layout, "layout", "", "write an OCI image layout into this directory instead of pushing")
	f.BoolVar(&plainHTTP, "plain-http", false, "reach the registry named in --ref over plain HTTP (a loopback or lab registry)")
	f.StringVar(&platform, "platform", "", "image platform os/arch[/variant] (default linux/<this machine's arch>)")
	f.StringSliceVar(&cmdline, "cmd", []string{"/sbin/init"}, "the image's default command")
	return cmd
}

// layoutTag is the tag a --ref names inside a layout: the part after the
// last colon that follows the last slash, or the whole value when it is a
// bare tag.
func layoutTag(ref string) string {
	name := ref[strings.LastIndex(ref, "/")+1:]
	if i := strings.LastIndex(name, ":"); i >= 0 {
		return name[i+1:]
	}
	if strings.Contains(ref, "/") {
		return "latest"
	}
	return ref
}
