package oci

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"log/slog"
	"sync"

	"github.com/klauspost/compress/gzip"
	"github.com/klauspost/compress/zstd"
	"github.com/nodespawn/nodespawn/internal/archive"
	"github.com/nodespawn/nodespawn/internal/confine"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/nodespawn/nodespawn/internal/httpx"
)

// unpacker fetches layers concurrently and applies them strictly in order.
type unpacker struct {
	src         *source
	root        *confine.Root
	dir         string // the staging rootfs, in root
	dest        string // where the rootfs goes, in root
	parent      string // dest's parent, in root: the spill's last resort
	layers      []ocispec.Descriptor
	diffIDs     []digest.Digest
	concurrency int
	// spoolMemory is the memory budget of the layers fetched ahead;
	// spoolDir, when set, the host directory they spill to (see spool.go).
	spoolMemory int64
	spoolDir    string
	// retry is the HTTP client's policy, for resuming a blob whose body
	// broke off.
	retry    httpx.Policy
	progress func(Progress)
	log      *slog.Logger

	// spilled and peakMemory are what the spools did: bytes written to
	// overflow files, and the most of the budget held at once.
	spilled, peakMemory int64

	// limit bounds what the pull unpacks, all layers together.
	limit *unpackLimit
}

func (u *unpacker) run(ctx context.Context) error {
	// Cancel first, then wait: on the way out every fetcher is stopped and
	// gone before the staging directory is removed.
	ctx, cancel := context.WithCancel(ctx)
	spill, where := spillTarget(u.root, u.dir, u.parent, u.dest, u.spoolDir)
	u.log.Debug("layers fetched ahead of their turn spill beyond the memory budget to", "dir", where, "budget", u.spoolMemory)
	set, stopWake := newSpools(ctx, u.spoolMemory, spill, where, u.log)
	// slots bounds the layers in flight: a fetch starts only when fewer
	// than concurrency layers are fetched-but-not-yet-applied.
	slots := make(chan struct{}, u.concurrency)
	ready := make([]chan *spool, len(u.layers))
	for i := range ready {
		ready[i] = make(chan *spool, 1)
	}
	var fetchers sync.WaitGroup
	defer func() {
		fetchers.Wait()
		// Spools fetched ahead of a failed layer were never applied.
		for _, c := range ready {
			select {
			case sp := <-c:
				sp.Close()
			default:
			}
		}
		stopWake()
		u.spilled, u.peakMemory = set.stats()
		u.log.Debug("layer spools done", "spilled", u.spilled, "spillDir", where, "peakMemory", u.peakMemory, "budget", u.spoolMemory)
	}()
	defer cancel()
	fetchers.Add(1)
	go func() {
		defer fetchers.Done()
		for i, desc := range u.layers {
			select {
			case slots <- struct{}{}:
			case <-ctx.Done():
				return
			}
			sp := set.newSpool(i)
			fetchers.Add(1)
			go func() {
				defer fetchers.Done()
				sp.finish(u.fetchBlob(ctx, desc, sp))
			}()
			ready[i] <- sp
		}
	}()

	for i, desc := range u.layers {
		var sp *spool
		select {
		case sp = <-ready[i]:
		case <-ctx.Done():
			return ctx.Err()
		}
		err := u.apply(ctx, i, desc, sp)
		sp.Close()
		if err != nil {
			return err
		}
		// The next layer is in turn before its fetch can start, so with
		// one layer in flight nothing is ever fetched ahead.
		set.setTurn(i + 1)
		<-slots
	}
	return nil
}

// apply decompresses one layer from its spool into the staging dir and
// checks the uncompressed stream against the config's DiffID.
func (u *unpacker) apply(ctx context.Context, i int, desc ocispec.Descriptor, sp *spool) error {
	what := fmt.Sprintf("image %s: layer %d/%d %s", u.src.name, i+1, len(u.layers), desc.Digest)
	compressed := &progressReader{r: sp, fn: u.progress, p: Progress{Layer: i, Layers: len(u.layers), Digest: desc.Digest, Size: desc.Size}}
	if err := unpackLayer(ctx, u.root, u.dir, desc, u.diffIDs[i], compressed, u.limit, archive.Options{}); err != nil {
		return fmt.Errorf("%s: %w", what, err)
	}
	if u.progress != nil {
		p := compressed.p
		p.Done = true
		u.progress(p)
	}
	u.log.Debug("layer applied", "layer", i+1, "layers", len(u.layers), "digest", desc.Digest, "bytes", desc.Size)
	return nil
}

// unpackLayer decompresses the layer desc read from r into dir (a path in
// root) and checks the uncompressed stream against the config's DiffID
// want (inspect validated it). Every entry is charged to limit before it
// is written, and so is what follows the end of the archive (read, never
// written, but decompressing it is not free either). Errors say what
// failed; the caller says which layer.
func unpackLayer(ctx context.Context, root *confine.Root, dir string, desc ocispec.Descriptor, want digest.Digest, r io.Reader, limit *unpackLimit, opts archive.Options) error {
	plain, closeFn, err := decompress(desc.MediaType, r)
	if err != nil {
		return err
	}
	defer closeFn()
	diff := want.Algorithm().Digester()
	tee := io.TeeReader(plain, diff.Hash())
	opts.Filter = limit.filter(opts.Filter)
	if err := archive.Apply(ctx, root, dir, tee, opts); err != nil {
		return fmt.Errorf("apply: %w", err)
	}
	// The tar reader stops at the end-of-archive marker; the DiffID (and,
	// for gzip, the trailer checksum) cover the padding after it too.
	if _, err := io.CopyBuffer(chargeWriter{limit}, tee, make([]byte, 64<<10)); err != nil {
		return fmt.Errorf("read after end of archive: %w", err)
	}
	if got := diff.Digest(); got != want {
		return fmt.Errorf("uncompressed content has digest %s, the image config says diff_id %s; the image is corrupt or tampered with", got, want)
	}
	return nil
}

// chargeWriter discards what it is given, charging it to a limit.
type chargeWriter struct{ l *unpackLimit }

func (w chargeWriter) Write(p []byte) (int, error) {
	if err := w.l.charge(int64(len(p)), "the data after the end of the archive"); err != nil {
		return 0, err
	}
	return len(p), nil
}

// readBuffer is the buffer between a layer's compressed stream and its
// decompressor.
const readBuffer = 256 << 10

// decompress wraps r by the layer's media type.
func decompress(mediaType string, r io.Reader) (io.Reader, func(), error) {
	switch mediaType {
	case ocispec.MediaTypeImageLayer:
		return r, func() {}, nil
	case ocispec.MediaTypeImageLayerGzip, dockerLayerGzip:
		// The inflater reads through a bufio.Reader it makes itself, of
		// 4 KiB, unless it is given one: a larger one takes each of the
		// fetcher's writes (32 KiB, through a pipe or a spool) in one read
		// instead of eight handoffs.
		zr, err := gzip.NewReader(bufio.NewReaderSize(r, readBuffer))
		if err != nil {
			return nil, nil, fmt.Errorf("gzip header: %w", err)
		}
		return zr, func() { zr.Close() }, nil
	case ocispec.MediaTypeImageLayerZstd:
		zr, err := zstd.NewReader(r)
		if err != nil {
			return nil, nil, fmt.Errorf("zstd: %w", err)
		}
		return zr, zr.Close, nil
	}
	return nil, nil, fmt.Errorf("unsupported layer media type %q (want tar, tar+gzip or tar+zstd)", mediaType)
}

// fetchBlob writes desc's content to w, verifying size and digest as it
// goes. A body that breaks off mid-stream (what httpx.Retryable calls
// transient: a reset, a stall, an early EOF) is fetched again from where it
// stopped, as often as the client's Policy allows in all. A request that
// fails is not tried again here: the transport below has already retried
// it with the same Policy.
func (u *unpacker) fetchBlob(ctx context.Context, desc ocispec.Descriptor, w io.Writer) error {
	what := fmt.Sprintf("image %s: blob %s", u.src.name, desc.Digest)
	if err := desc.Digest.Validate(); err != nil {
		return fmt.Errorf("%s: %w", what, err)
	}
	digester := desc.Digest.Algorithm().Digester()
	out := io.MultiWriter(w, digester.Hash())
	attempts := u.retry.Tries()
	var off int64
	tries := 0
	err := httpx.Resume(ctx, u.retry, func(attempt int) error {
		tries = attempt
		n, err := u.fetchFrom(ctx, desc, off, out)
		off += n
		return err
	}, func(attempt int, reason string, err error) {
		u.log.Warn("layer download broke off, resuming", "blob", desc.Digest, "offset", off, "size", desc.Size,
			"attempt", attempt, "maxAttempts", attempts, "reason", reason, "error", err)
	})
	if ctx.Err() != nil {
		return fmt.Errorf("%s: %w", what, ctx.Err())
	}
	if err != nil {
		return fmt.Errorf("%s: fetch failed after %d bytes of %d (attempt %d of %d): %w", what, off, desc.Size, tries, attempts, err)
	}
	if off != desc.Size {
		return fmt.Errorf("%s: size mismatch: expected %d bytes, got %d", what, desc.Size, off)
	}
	if got := digester.Digest(); got != desc.Digest {
		return fmt.Errorf("%s: digest mismatch: expected %s, got %s; the registry or layout serves tampered content", what, desc.Digest, got)
	}
	return nil
}

// fetchFrom copies desc's content from offset off to out, reading at most
// one byte past the declared size so an oversized blob is caught. Errors
// reading the body are marked (httpx.Body) for Resume; the others (the
// requests, writing to out) are not.
func (u *unpacker) fetchFrom(ctx context.Context, desc ocispec.Descriptor, off int64, out io.Writer) (int64, error) {
	rc, err := u.src.target.Fetch(ctx, desc)
	if err != nil {
		return 0, err
	}
	defer rc.Close()
	if off > 0 {
		// A registry that answers Accept-Ranges gives a seekable body
		// (oras-go then re-requests with a Range header); one that does
		// not, or whose Range request fails, is read from the start and
		// the bytes already verified are skipped.
		seeker, ok := rc.(io.Seeker)
		if ok {
			if _, err := seeker.Seek(off, io.SeekStart); err != nil {
				if _, transient := httpx.Retryable(err); transient {
					// The connection failed, and the transport has
					// already retried it: not a refusal to resume.
					return 0, err
				}
				u.log.Warn("range request failed, fetching the blob from the start", "blob", desc.Digest, "offset", off, "error", err)
				rc.Close()
				if rc, err = u.src.target.Fetch(ctx, desc); err != nil {
					return 0, err
				}
				defer rc.Close()
				ok = false
			}
		}
		if !ok {
			if _, err := io.CopyN(io.Discard, httpx.Body(rc), off); err != nil {
				return 0, fmt.Errorf("skip %d bytes already fetched: %w", off, err)
			}
		}
	}
	return io.Copy(out, io.LimitReader(httpx.Body(rc), desc.Size-off+1))
}

// progressReader reports compressed bytes as the applier consumes them,
// at most once per 4 MiB.
type progressReader struct {
	r    io.Reader
	fn   func(Progress)
	p    Progress
	last int64
}

func (r *progressReader) Read(b []byte) (int, error) {
	n, err := r.r.Read(b)
	r.p.Read += int64(n)
	if r.fn != nil && r.p.Read-r.last >= 4<<20 {
		r.last = r.p.Read
		r.fn(r.p)
	}
	return n, err
}
