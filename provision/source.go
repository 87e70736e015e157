package provision

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"os"

	"github.com/nodespawn/nodespawn/internal/httpx"
	"github.com/nodespawn/nodespawn/internal/probe"
	"github.com/nodespawn/nodespawn/manifest"
	"github.com/nodespawn/nodespawn/plan"
	"github.com/nodespawn/nodespawn/render"
	"github.com/nodespawn/nodespawn/schema"
	"github.com/nodespawn/nodespawn/userdata"
)

// Source say where the manifest comes from.
type Source struct {
	// File is -f: a manifest file, user-data holding one, or "-" for stdin.
	File string
	// Spec is --source: auto, nocloud, azure, cloud-init, or a path.
	Spec string
	// found says where the last read found the manifest, for the record
	// (status prints it, as cloud-init status does its datasource).
	found string
}

// read returns the manifest's name and bytes, and where it lies in the
// file the user gave. A file given with -f may be user-data
// (#cloud-config, MIME multipart, gzip) holding the manifest.
func (s *Source) Read(ctx context.Context, stdin io.Reader) (userdata.Source, error) {
	spec := s.Spec
	switch {
	case s.File != "" && s.Spec != "":
		return userdata.Source{}, InputError{fmt.Errorf("give -f or --source, not both")}
	case s.File != "":
		spec = s.File
	case s.Spec == "":
		return userdata.Source{}, InputError{fmt.Errorf("no manifest: give -f FILE, -f - for stdin, or --source auto")}
	}
	src, err := userdata.ReadSource(ctx, spec, userdata.Options{
		Stdin: stdin,
		// For Azure IMDS, which answers only requests that reach it directly.
		HTTPClient: httpx.NewClient(httpx.WithLogger(slog.Default()), httpx.WithoutProxy()),
	})
	if err != nil && s.File != "" {
		return userdata.Source{}, InputError{err}
	}
	s.found = src.Name
	if s.File == "" && spec != src.Name {
		s.found = spec + ": " + src.Name
	}
	return src, err
}

// loadSource validates the manifest src holds; its errors name lines of
// the file the user gave, also when the manifest is embedded in it.
func LoadSource(src userdata.Source) (*manifest.Manifest, error) {
	if src.Where == "" {
		return manifest.Load(src.Name, src.Data)
	}
	return manifest.LoadEmbedded(manifest.Origin{File: src.File, Where: src.Where, Mapped: src.Mapped, LineOffset: src.LineOffset, Indent: src.Indent}, src.Data)
}

// load reads and validates the manifest.
func (s *Source) Load(ctx context.Context, stdin io.Reader) (*manifest.Manifest, []byte, error) {
	src, err := s.Read(ctx, stdin)
	if err != nil {
		return nil, nil, err
	}
	m, err := LoadSource(src)
	if err != nil {
		return nil, nil, err
	}
	return m, src.Data, nil
}

// facts returns the host's facts: probed, or read from a file (to review
// the plan for another host).
func Facts(ctx context.Context, factsFile, root string) (plan.Facts, error) {
	return facts(ctx, factsFile, root, nil)
}

// facts is Facts with the probe's logger (nil: slog.Default).
func facts(ctx context.Context, factsFile, root string, log *slog.Logger) (plan.Facts, error) {
	if factsFile == "" {
		return probe.Gather(ctx, probe.Options{Root: root, Log: log})
	}
	var f plan.Facts
	data, err := os.ReadFile(factsFile)
	if err != nil {
		return f, InputError{fmt.Errorf("read facts: %w", err)}
	}
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&f); err != nil {
		return f, InputError{fmt.Errorf("facts %s: %w", factsFile, err)}
	}
	return f, nil
}

// Validate checks the manifest src holds without looking at this host:
// the schema, the rules it cannot express, and what only the whole plan
// shows (an extra file where nodespawn writes one), found on reference
// hosts. It returns the name of what it read.
func Validate(ctx context.Context, src *Source, stdin io.Reader) (string, error) {
	schema.Warm()
	s, err := src.Read(ctx, stdin)
	if err != nil {
		return "", err
	}
	m, err := LoadSource(s)
	if err != nil {
		return s.Name, err
	}
	return s.Name, render.Check(m)
}
