package apply

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"net/http"
	"os"
	"path"
	"path/filepath"
	"syscall"

	"github.com/nodespawn/nodespawn/internal/command"
	"github.com/nodespawn/nodespawn/internal/confine"
	"github.com/nodespawn/nodespawn/internal/debootstrap"
	"github.com/nodespawn/nodespawn/internal/download"
	"github.com/nodespawn/nodespawn/internal/hostprep"
	"github.com/nodespawn/nodespawn/internal/httpx"
	"github.com/nodespawn/nodespawn/internal/inflate"
	"github.com/nodespawn/nodespawn/internal/layers"
	"github.com/nodespawn/nodespawn/internal/layout"
	"github.com/nodespawn/nodespawn/internal/machine"
	"github.com/nodespawn/nodespawn/internal/oci"
	"github.com/nodespawn/nodespawn/internal/progress"
	"github.com/nodespawn/nodespawn/internal/systemd"
	"github.com/nodespawn/nodespawn/plan"
	"github.com/nodespawn/nodespawn/state"
)

// DownloadCache holds verified downloads between fetch and install, and
// the records that make a rerun skip them.
const DownloadCache = state.Dir + "/downloads"

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
	puller := &imagePuller{log: log, client: client, progress: progress, credentials: registryCredentials(root)}
	if filepath.Clean(root) == "/" {
		// The machine's service runs layout.BinaryPath mount-root at boot:
		// this binary goes there (installBinary).
		if self, err := os.Executable(); err == nil {
			puller.self = self
		}
	}
	d := Deps{
		Images: puller,
		Downloader: &downloader{
			f:      &download.Fetcher{Client: client, Root: host, CacheDir: DownloadCache, Log: log, Progress: progress},
			client: client,
		},
	}
	if ManagesHost(root) {
		d.Host = hostprep.Host{Log: log}
		d.Systemd = systemd.New(command.Exec{})
	}
	return d, nil
}

// ManagesHost reports whether apply against root changes the host itself
// (its settings, systemd and machined): only when root is "/". Another
// root is a tree that is not a running host; DefaultDeps leaves the
// host-changing dependencies out for it, and no upgrade can switch there.
func ManagesHost(root string) bool { return filepath.Clean(root) == "/" }

type imagePuller struct {
	log         *slog.Logger
	client      *http.Client
	progress    *progress.Display
	credentials string
	// self is this binary, installed at layout.BinaryPath for the machine's
	// service to mount a root made of layers at boot; "" installs nothing
	// (a run against another root than the host's).
	self string
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
	return p.pullFlat(ctx, req)
}

// pullFlat pulls the image as one flattened tree at req.Dest. A root made
// of layers there before (the machine moved to store flat in place) is
// undone first: unmounted, its overlay record and directories removed.
func (p *imagePuller) pullFlat(ctx context.Context, req oci.Request) (bool, error) {
	undone, err := removeLayerRoot(ctx, req.Root, req.Dest, p.log)
	if err != nil {
		return false, err
	}
	res, err := oci.Pull(ctx, req)
	return undone || (err == nil && !res.NoOp), err
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
	m := machine.LayerRoot(req.Dest, lr.Dir)
	installed, err := installBinary(req.Root, p.self, p.log)
	if err != nil {
		return false, err
	}
	if deep, err := p.tooDeep(ctx, req, store, m); err != nil {
		return false, err
	} else if deep != nil {
		if !lr.FlattenFallback {
			return false, fmt.Errorf("machine root %s: %w (machine.rootfs.store is layers)", req.Dest, deep)
		}
		p.log.Warn("machine root flattened instead of made of layers: "+deep.Error(), "dest", req.Dest,
			"layers", deep.Layers, "max", deep.Max)
		changed, err := p.pullFlat(ctx, req)
		return changed || installed, err
	}
	res, err := oci.PullLayers(ctx, req, store)
	var shows *oci.StoreError
	if errors.As(err, &shows) && lr.FlattenFallback {
		// The two stores build the same tree from every image the store
		// takes; one it cannot show is flattened, as store auto promises.
		p.log.Warn("machine root flattened instead of made of layers: "+shows.Error(), "dest", req.Dest)
		changed, err := p.pullFlat(ctx, req)
		if err != nil {
			return false, err
		}
		// The layers fetched for nothing go now, not at the next switch.
		if _, err := CollectLayers(req.Root, p.log); err != nil {
			return false, err
		}
		return changed || installed, nil
	}
	if err != nil {
		return false, err
	}
	p.log.Info("machine root layers", "dest", req.Dest, "layers", res.Layers, "fetched", res.Fetched,
		"present", res.Layers-res.Fetched, "fetchedBytes", res.FetchedBytes, "imageBytes", res.Bytes)
	changed, err := store.Compose(ctx, m,
		layers.Image{Source: res.Reference, Platform: req.Platform, Manifest: res.ManifestDigest, Layers: res.DiffIDs}, p.log)
	return changed || installed || res.Fetched > 0, err
}

// tooDeep says, before any layer is fetched, whether the image has more
// layers than one mount of m's root takes on this kernel (where overlayfs
// names them in one page of mount options): it resolves the image's
// index, manifest and config only. nil when it fits, or the kernel takes
// layers by descriptor (then nothing is resolved twice).
func (p *imagePuller) tooDeep(ctx context.Context, req oci.Request, store *layers.Store, m layers.Machine) (*layers.TooDeepError, error) {
	max := store.MaxLayers(m)
	if max >= layers.MaxStack {
		return nil, nil
	}
	res, _, err := oci.Inspect(ctx, req)
	if err != nil {
		return nil, err
	}
	if n := layers.Distinct(res.DiffIDs); n > max {
		return &layers.TooDeepError{Layers: n, Max: max}, nil
	}
	return nil, nil
}

// installBinary puts self (this binary) at layout.BinaryPath in root, where
// the machine's service runs it at boot to mount a root made of layers,
// whatever path the operator ran nodespawn from: written under a
// temporary name and renamed over the old one, so a boot finds the old
// binary or the new one whole. Nothing is done when self is "" or the
// file there is the same (the first-boot unit runs that very file).
func installBinary(root *confine.Root, self string, log *slog.Logger) (bool, error) {
	if self == "" {
		return false, nil
	}
	if a, b := fileID(os.Stat(self)), fileID(root.Stat(layout.BinaryPath)); a != nil && b != nil && *a == *b {
		return false, nil
	}
	want, err := os.ReadFile(self)
	if err != nil {
		return false, fmt.Errorf("install %s: %w", layout.BinaryPath, err)
	}
	if have, err := root.ReadFile(layout.BinaryPath); err == nil && bytes.Equal(have, want) {
		return false, nil
	}
	if err := root.MkdirAll(path.Dir(layout.BinaryPath), 0o755, 0, 0); err != nil {
		return false, err
	}
	// A run killed while it wrote the binary left its temporary file
	// beside it (confine's temporary names only; apply holds the lock).
	if err := root.RemoveStaleTemps(path.Dir(layout.BinaryPath)); err != nil {
		return false, fmt.Errorf("install %s: %w", layout.BinaryPath, err)
	}
	if err := root.WriteFile(layout.BinaryPath, want, 0o755, 0, 0); err != nil {
		return false, fmt.Errorf("install %s: %w", layout.BinaryPath, err)
	}
	log.Info("installed this nodespawn binary for the machine's service, which mounts its root at boot", "path", root.Show(layout.BinaryPath), "from", self)
	return true, nil
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

// fileID is the device and inode of a file, nil when unknown.
func fileID(fi fs.FileInfo, err error) *[2]uint64 {
	if err != nil {
		return nil
	}
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !ok {
		return nil
	}
	return &[2]uint64{uint64(st.Dev), st.Ino}
}
