package apply

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"

	"github.com/nodespawn/nodespawn/internal/command"
	"github.com/nodespawn/nodespawn/internal/confine"
	"github.com/nodespawn/nodespawn/internal/debootstrap"
	"github.com/nodespawn/nodespawn/internal/download"
	"github.com/nodespawn/nodespawn/internal/hostprep"
	"github.com/nodespawn/nodespawn/internal/httpx"
	"github.com/nodespawn/nodespawn/internal/inflate"
	"github.com/nodespawn/nodespawn/internal/oci"
	"github.com/nodespawn/nodespawn/internal/progress"
	"github.com/nodespawn/nodespawn/internal/systemd"
	"github.com/nodespawn/nodespawn/plan"
)

// DownloadCache holds verified downloads between fetch and install, and
// the records that make a rerun skip them.
const DownloadCache = StateDir + "/downloads"

// maxSourceSize bounds a remote file's contents held in memory.
const maxSourceSize = 64 << 20

// DefaultDeps returns the real implementations for a run against root. The
// rootfs image and the downloads land under root whatever it is; host
// operations and systemd act on the running host, so they are left out
// (their steps skipped) unless root is "/".
func DefaultDeps(root string, log *slog.Logger) (Deps, error) {
	if root == "" {
		root = "/"
	}
	if log == nil {
		log = slog.Default()
	}
	// The download cache is nodespawn's own state in root, confined like
	// everything else there; the root stays open for the process.
	host, err := openRoot(root)
	if err != nil {
		return Deps{}, err
	}
	client := httpx.NewClient(httpx.WithLogger(log))
	// One progress display for the image's layers and the downloads that
	// run beside them: bars on a terminal, periodic log lines otherwise.
	progress := progress.New(os.Stderr, log)
	d := Deps{
		Images: &imagePuller{log: log, client: client, progress: progress, credentials: registryCredentials(root)},
		Downloader: &downloader{
			f:      &download.Fetcher{Client: client, Root: host, CacheDir: DownloadCache, Log: log, Progress: progress},
			client: client,
		},
	}
	if filepath.Clean(root) == "/" {
		d.Host = hostprep.Host{Log: log}
		d.Systemd = systemd.New(command.Exec{})
	}
	return d, nil
}

type imagePuller struct {
	log         *slog.Logger
	client      *http.Client
	progress    *progress.Display
	credentials string
}

// RegistryCredentials is where apply looks first for registry credentials,
// a docker-style config.json (what `docker login` or `oras login` write);
// then root's own ~/.docker/config.json. Without either, pulls are anonymous.
const RegistryCredentials = "/etc/nodespawn/registry-auth.json"

func registryCredentials(root string) string {
	for _, p := range []string{RegistryCredentials, "/root/.docker/config.json"} {
		if _, err := os.Stat(filepath.Join(root, p)); err == nil {
			return filepath.Join(root, p)
		}
	}
	return ""
}

func (p *imagePuller) Pull(ctx context.Context, img *plan.Image, root *confine.Root, dest string) (bool, error) {
	if img.Debootstrap != nil {
		res, err := debootstrap.Build(ctx, debootstrap.Request{
			Suite: img.Debootstrap.Suite, Mirror: img.Debootstrap.Mirror, Include: img.Debootstrap.Include,
			Root: root, Dest: dest, Log: p.log,
		})
		return err == nil && !res.NoOp, err
	}
	res, err := oci.Pull(ctx, oci.Request{
		Reference: img.Reference, Layout: img.Layout, LayoutRef: img.LayoutRef,
		Platform: img.Platform, PlainHTTP: img.PlainHTTP, Root: root, Dest: dest,
		Log: p.log, HTTPClient: p.client, Progress: p.layerProgress(), CredentialsFile: p.credentials,
	})
	return err == nil && !res.NoOp, err
}

type downloader struct {
	f      *download.Fetcher
	client *http.Client
}

func (d *downloader) Fetch(ctx context.Context, dl *plan.Download, root *confine.Root, dest string) (Artifact, error) {
	s, err := d.f.Fetch(ctx, *dl, root, dest)
	if err != nil {
		return nil, err
	}
	return staged{s}, nil
}

type staged struct{ s *download.Fetched }

func (s staged) Install(ctx context.Context, root *confine.Root, dest string) (bool, error) {
	res, err := s.s.Install(ctx, root, dest)
	return res.Changed, err
}

// Contents fetches a remote file's contents with the project's HTTP
// client and decompresses them. Errors name the URL without its user
// info and query, which may carry credentials.
func (d *downloader) Contents(ctx context.Context, src *plan.Source) ([]byte, error) {
	where := httpx.Redact(src.URL)
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, src.URL, nil)
	if err != nil {
		return nil, fmt.Errorf("fetch %s: %w", where, httpx.WithoutURL(err))
	}
	resp, err := d.client.Do(req)
	if err != nil {
		return nil, fmt.Errorf("fetch %s: %w", where, httpx.WithoutURL(err))
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("fetch %s: %s", where, resp.Status)
	}
	var data []byte
	switch src.Compression {
	case "":
		data, err = io.ReadAll(io.LimitReader(resp.Body, maxSourceSize+1))
		if err == nil && len(data) > maxSourceSize {
			err = fmt.Errorf("larger than %d MiB; use a download instead", maxSourceSize>>20)
		}
	case "gzip":
		data, err = inflate.GzipReader(resp.Body, maxSourceSize)
	default:
		err = fmt.Errorf("unknown compression %q", src.Compression)
	}
	if err != nil {
		return nil, fmt.Errorf("fetch %s: %w", where, err)
	}
	return data, nil
}

// layerProgress turns the puller's per-layer reports into progress
// trackers. The puller calls it from one goroutine, layer after layer.
func (p *imagePuller) layerProgress() func(oci.Progress) {
	var (
		t     *progress.Tracker
		layer = -1
		seen  int64
	)
	return func(pr oci.Progress) {
		if pr.Layer != layer {
			if t != nil {
				t.Done(nil)
			}
			layer, seen = pr.Layer, 0
			t = p.progress.Start(fmt.Sprintf("layer %d/%d", pr.Layer+1, pr.Layers), pr.Size)
		}
		t.Add(pr.Read - seen)
		seen = pr.Read
		if pr.Done {
			t.Done(nil)
			t, layer = nil, -1
		}
	}
}
