package userdata

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"path/filepath"
)

// file is a manifest file the user named (-f or --source PATH).
type file struct{ path string }

func (file) Name() string { return "file" }

func (f file) Fetch(context.Context) (Source, error) {
	data, err := readFile(f.path)
	if err != nil {
		return Source{}, fmt.Errorf("read manifest %s: %w", f.path, err)
	}
	return userDataOrAsIs(f.path, data)
}

// stdin is the manifest piped to -f -.
type stdin struct{ r io.Reader }

func (stdin) Name() string { return "stdin" }

func (s stdin) Fetch(context.Context) (Source, error) {
	data, err := readLimited(s.r)
	if err != nil {
		return Source{}, fmt.Errorf("read manifest from stdin: %w", err)
	}
	return userDataOrAsIs("<stdin>", data)
}

// wellKnown is the manifest an image builder or cloud-init's write_files
// put at WellKnownManifestPath; "auto" tries it first.
type wellKnown struct{ root string }

func (wellKnown) Name() string { return "file" }

func (w wellKnown) Fetch(context.Context) (Source, error) {
	data, err := readFile(filepath.Join(w.root, WellKnownManifestPath))
	if errors.Is(err, fs.ErrNotExist) {
		return Source{}, fmt.Errorf("%s: %w (not present)", WellKnownManifestPath, ErrNoManifest)
	}
	if err != nil {
		return Source{}, fmt.Errorf("%s: %w", WellKnownManifestPath, err)
	}
	return userDataOrAsIs(WellKnownManifestPath, data)
}
