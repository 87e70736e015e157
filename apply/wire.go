package apply

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"os"
	"path"
	"path/filepath"

	"github.com/nodespawn/nodespawn/internal/command"
	"github.com/nodespawn/nodespawn/internal/confine"
	"github.com/nodespawn/nodespawn/internal/debootstrap"
	"github.com/nodespawn/nodespawn/internal/download"
	"github.com/nodespawn/nodespawn/internal/hostprep"
	"github.com/nodespawn/nodespawn/internal/httpx"
	"github.com/nodespawn/nodespawn/internal/inflate"
	"github.com/nodespawn/nodespawn/internal/layers"
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
	req := oci.Request{
		Reference: img.Reference, Layout: img.Layout, LayoutRef: img.LayoutRef,
		Platform: img.Platform, PlainHTTP: img.PlainHTTP, Root: root, Dest: dest,
		Log: p.log, HTTPClient: p.client, Progress: p.layerProgress(), CredentialsFile: p.credentials,
		MaxUnpacked: img.MaxUnpacked, MinFree: img.MinFree,
	}
	if img.Layers != nil {
		return p.pullLayers(ctx, req, img.Layers)
	}
	res, err := oci.Pull(ctx, req)
	return err == nil && !res.NoOp, err
}

// pullLayers puts the image's layers the store lacks into it and makes
// the machine root an overlayfs mount of them.
func (p *imagePuller) pullLayers(ctx context.Context, req oci.Request, lr *plan.LayerRoot) (bool, error) {
	store, err := layers.Open(req.Root, lr.Store)
	if err != nil {
		return false, err
	}
	if err := store.Sweep(p.log); err != nil {
		return false, err
	}
	res, err := oci.PullLayers(ctx, req, store)
	if err != nil {
		return false, err
	}
	p.log.Info("machine root layers", "dest", req.Dest, "layers", res.Layers, "fetched", res.Fetched,
		"present", res.Layers-res.Fetched, "fetchedBytes", res.FetchedBytes, "imageBytes", res.Bytes)
	changed, err := store.Compose(ctx, layers.Machine{Target: req.Dest, Dir: lr.Dir, Unit: lr.MountUnit, Machine: path.Base(req.Dest)},
		layers.Image{Source: res.Reference, Platform: req.Platform, Manifest: res.ManifestDigest, Layers: res.DiffIDs}, p.log)
	return changed || res.Fetched > 0, err
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
// trackers, one per layer. The puller never calls it concurrently, but
// layers fetched in parallel (the layer store) report interleaved.
func (p *imagePuller) layerProgress() func(oci.Progress) {
	type layer struct {
		t    *progress.Tracker
		seen int64
	}
	open := map[int]*layer{}
	return func(pr oci.Progress) {
		l := open[pr.Layer]
		if l == nil {
			l = &layer{t: p.progress.Start(fmt.Sprintf("layer %d/%d", pr.Layer+1, pr.Layers), pr.Size)}
			open[pr.Layer] = l
		}
		l.t.Add(pr.Read - l.seen)
		l.seen = pr.Read
		if pr.Done {
			l.t.Done(nil)
			delete(open, pr.Layer)
		}
	}
}
