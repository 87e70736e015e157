// Package userdata finds the manifest a VM was given at first boot: in a
// file, on standard input, in a NoCloud seed, in Azure custom data or IMDS
// user data, or in the user-data cloud-init stored. Each source is a small
// provider in a file named for it; Extract, which all of them share, takes
// the manifest out of user-data (#cloud-config write_files, multipart MIME,
// gzip).
//
// This package reads the host (files, block devices, IMDS) so that manifest
// never has to: manifest.Load gets the bytes Read returns.
package userdata

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"strings"

	"github.com/nodespawn/nodespawn/internal/command"
)

// Where a manifest can come from at first boot, and how it is marked inside
// user-data.
const (
	// WellKnownManifestPath is where cloud-init's write_files (or an image
	// builder) puts the manifest; "auto" looks here first.
	WellKnownManifestPath = "/etc/nodespawn/manifest.yaml"
	// ManifestMediaType marks the manifest part of multipart MIME user-data.
	ManifestMediaType = "application/vnd.nodespawn.manifest+yaml"
	// DefaultIMDSBaseURL is Azure's instance metadata service.
	DefaultIMDSBaseURL = "http://169.254.169.254"

	// maxSourceBytes bounds what is read from a source, and maxInflated what
	// gzip may expand to: user-data is at most a few hundred KiB on any cloud.
	maxSourceBytes = 8 << 20
	maxInflated    = 32 << 20
)

// ErrNoManifest is wrapped by Read errors that mean "this source holds no
// manifest" (absent, empty, or user-data without a nodespawn part), as
// opposed to a source that exists but could not be read or decoded.
var ErrNoManifest = errors.New("no manifest")

// Options are the environment Read works in. Apart from HTTPClient, which
// "azure" and "auto" need, the zero value is the real host.
type Options struct {
	// Root prefixes every well-known path (/etc, /var/lib/cloud, /dev/disk,
	// /sys); default "/". A file spec given by the user is not prefixed.
	Root string
	// Stdin is read for the spec "-"; default os.Stdin.
	Stdin io.Reader
	// IMDSBaseURL is Azure's instance metadata service; default
	// DefaultIMDSBaseURL. Tests point it at a loopback server.
	IMDSBaseURL string
	// HTTPClient reaches IMDS; Read refuses "azure" and "auto" without one.
	// It must connect directly, not through a proxy (IMDS refuses proxied
	// requests), and should retry: IMDS throttles with 429 and is briefly
	// unavailable during host maintenance. The CLI passes
	// fetch.NewHTTPClient(fetch.WithoutProxy()).
	HTTPClient *http.Client
	// Runner mounts and unmounts a cidata block device; default command.Exec.
	Runner command.Runner
}

// A provider is one place a manifest can come from.
type provider interface {
	// Name is the source's name in "auto"'s log and errors.
	Name() string
	// Fetch returns the manifest and a name saying where it was found (a
	// path, with a suffix for where inside user-data: #part2,
	// #write_files[0]). An error wrapping ErrNoManifest means the source
	// holds none, so the next one may be tried.
	Fetch(ctx context.Context) (Source, error)
}

// Read reads the manifest named by spec and returns a name for it (the
// path or source it came from, for messages and positions) and its bytes,
// ready for manifest.Load. spec is one of:
//
//   - a file path (use ./auto for a file named like a keyword), or "-" for
//     standard input;
//   - "nocloud": the NoCloud seed (/var/lib/cloud/seed/nocloud{,-net}, or a
//     block device labelled cidata/CIDATA, mounted read-only for the read);
//   - "azure": Azure custom data (/var/lib/waagent/CustomData, base64 or
//     plain), else IMDS user data;
//   - "cloud-init": the user-data cloud-init stored
//     (/var/lib/cloud/instance/user-data.txt);
//   - "auto": WellKnownManifestPath, then nocloud, azure (IMDS only on an
//     Azure VM) and cloud-init, in that order; the first that holds a
//     manifest wins and is logged.
//
// User-data may be the manifest itself or wrap it in any of the ways
// Extract understands. When nothing matches, the error says which sources
// were tried and why each did not match, and wraps ErrNoManifest.
func Read(ctx context.Context, spec string, opts Options) (name string, data []byte, err error) {
	src, err := ReadSource(ctx, spec, opts)
	return src.Name, src.Data, err
}

// ReadSource is Read that also says where in the file the user-data came
// from the manifest lies (Source.File, Where and the line mapping), so
// errors in it can name lines of that file.
func ReadSource(ctx context.Context, spec string, opts Options) (Source, error) {
	p, err := open(spec, opts)
	if err != nil {
		return Source{}, err
	}
	return p.Fetch(ctx)
}

// open returns the provider for spec.
func open(spec string, opts Options) (provider, error) {
	if opts.Root == "" {
		opts.Root = "/"
	}
	if opts.Stdin == nil {
		opts.Stdin = os.Stdin
	}
	if opts.IMDSBaseURL == "" {
		opts.IMDSBaseURL = DefaultIMDSBaseURL
	}
	if opts.Runner == nil {
		opts.Runner = command.Exec{}
	}
	if (spec == "auto" || spec == "azure") && opts.HTTPClient == nil {
		return nil, fmt.Errorf("read manifest (%s): no HTTP client for Azure IMDS: userdata.Options.HTTPClient is nil", spec)
	}
	switch spec {
	case "":
		return nil, errors.New("read manifest: no source given: pass a file, -, auto, nocloud, azure or cloud-init")
	case "-":
		return stdin{r: opts.Stdin}, nil
	case "auto":
		return auto{
			wellKnown{root: opts.Root},
			newNoCloud(opts),
			newAzure(opts, false),
			cloudInit{root: opts.Root},
		}, nil
	case "nocloud":
		return newNoCloud(opts), nil
	case "azure":
		return newAzure(opts, true), nil
	case "cloud-init":
		return cloudInit{root: opts.Root}, nil
	}
	return file{path: spec}, nil
}

// auto tries every source in order. A source without a manifest is noted
// and passed over; one that is there but broken stops the search, so a
// manifest is never silently taken from a lesser source.
type auto []provider

func (auto) Name() string { return "auto" }

func (a auto) Fetch(ctx context.Context) (Source, error) {
	var misses []string
	for _, p := range a {
		src, err := p.Fetch(ctx)
		if err == nil {
			slog.InfoContext(ctx, "manifest source found", "source", p.Name(), "name", src.Name)
			return src, nil
		}
		if !errors.Is(err, ErrNoManifest) {
			return Source{}, fmt.Errorf("read manifest (auto, source %s): %w", p.Name(), err)
		}
		misses = append(misses, err.Error())
	}
	return Source{}, fmt.Errorf("read manifest (auto): %w in any source:\n  %s\nwrite it to %s, or pass one with -f",
		ErrNoManifest, strings.Join(misses, "\n  "), WellKnownManifestPath)
}

// storedUserData reads a user-data file at p under root, as cloud-init or a
// seed left it, and extracts the manifest. Messages name p as it is on the
// host, without root.
func storedUserData(root, p string) (Source, error) {
	data, err := readFile(filepath.Join(root, p))
	if errors.Is(err, fs.ErrNotExist) {
		return Source{}, fmt.Errorf("%s: %w (not present)", p, ErrNoManifest)
	}
	if err != nil {
		return Source{}, fmt.Errorf("%s: %w", p, err)
	}
	return extractSource(p, data)
}

func readFile(p string) ([]byte, error) {
	f, err := os.Open(p)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	return readLimited(f)
}

func readLimited(r io.Reader) ([]byte, error) {
	data, err := io.ReadAll(io.LimitReader(r, maxSourceBytes+1))
	if err != nil {
		return nil, err
	}
	if len(data) > maxSourceBytes {
		return nil, fmt.Errorf("larger than %d MiB", maxSourceBytes>>20)
	}
	return data, nil
}
