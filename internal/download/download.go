// Package download carries out the plan's download steps: it fetches an
// artifact with the project's HTTP client (internal/httpx), resuming a body
// that breaks off, verifies it against a pinned sha256 or the one an
// upstream checksum file lists, and installs a binary or unpacks a tool
// archive into place, leaving a record that makes a rerun a no-op.
package download

import (
	"context"
	"errors"
	"fmt"
	"hash"
	"io"
	"io/fs"
	"log/slog"
	"net/http"
	"os"
	"path"
	"strconv"
	"strings"
	"sync"

	"github.com/opencontainers/go-digest"

	"github.com/nodespawn/nodespawn/internal/confine"
	"github.com/nodespawn/nodespawn/internal/httpx"
	"github.com/nodespawn/nodespawn/internal/progress"
	"github.com/nodespawn/nodespawn/internal/redact"
	"github.com/nodespawn/nodespawn/plan"
)

// Fetcher carries out the Plan's download steps: fetch, verify against a
// sha256, then install a binary or unpack an archive into place.
//
// Every path it touches is inside a confine.Root: the cache inside Root,
// the installed files inside the root Fetch is given.
//
// The zero value is not usable; Root and CacheDir are required.
type Fetcher struct {
	// Client does the HTTP; nil means httpx.NewClient(). A body that
	// breaks off is resumed as often as the client's Policy allows
	// (httpx.PolicyOf), so one setting bounds every retry of a download.
	Client *http.Client
	// Root holds CacheDir.
	Root *confine.Root
	// CacheDir holds partial downloads, verified artifacts waiting to be
	// installed, and the records that make reruns no-ops
	// (e.g. /var/lib/nodespawn/downloads), as a path in Root. It is
	// created 0700 if missing.
	CacheDir string
	// Progress reports bytes as they arrive; nil reports nothing.
	Progress *progress.Display
	// Log receives retries and resumptions; nil means slog.Default().
	Log *slog.Logger

	defaultClientOnce sync.Once
	defaultClient     *http.Client
}

// Installed says what a download step did.
type Installed struct {
	// Digest is the artifact's verified sha256 digest.
	Digest digest.Digest
	// Size is the artifact's size in bytes (0 when nothing was fetched).
	Size int64
	// Files are the installed paths in the destination root (or the ones
	// found already installed).
	Files []string
	// Changed is false when everything was already in place.
	Changed bool
}

// Fetched is a fetched and verified artifact waiting to be installed (or
// the knowledge that it already is). Install moves it into place.
type Fetched struct {
	f    *Fetcher
	d    plan.Download
	dst  *confine.Root // where Install puts it
	dest string        // d's destination in dst
	sum  digest.Digest // the artifact's verified digest
	size int64
	// blob is the verified artifact in the cache; "" when installed is set.
	blob      string
	installed bool
}

// Download fetches, verifies and installs d at dest in dst. It is Fetch
// followed by Install.
func (f *Fetcher) Download(ctx context.Context, d plan.Download, dst *confine.Root, dest string) (Installed, error) {
	s, err := f.Fetch(ctx, d, dst, dest)
	if err != nil {
		return Installed{}, err
	}
	return s.Install(ctx, dst, dest)
}

// Fetch downloads d into the cache and verifies its sha256 (pinned, or
// read from d.ChecksumURL) without changing dest (d.Dest, as a path in
// dst), so it may run before the steps d waits for. If d is already
// installed there, Fetch downloads nothing. dst may be nil when the tree
// the download goes into does not exist yet.
func (f *Fetcher) Fetch(ctx context.Context, d plan.Download, dst *confine.Root, dest string) (*Fetched, error) {
	if f.Root == nil || f.CacheDir == "" {
		return nil, errors.New("download: no cache directory configured")
	}
	if d.Archive != "" && d.Archive != "tar.gz" {
		return nil, fmt.Errorf("download %s: archive kind %q is not supported (only tar.gz)", httpx.Redact(d.URL), d.Archive)
	}
	if !path.IsAbs(d.Dest) {
		return nil, fmt.Errorf("download %s: destination %q is not an absolute path", httpx.Redact(d.URL), d.Dest)
	}
	if err := f.Root.MkdirParents(path.Dir(f.CacheDir)); err != nil {
		return nil, fmt.Errorf("download %s: create cache directory: %w", httpx.Redact(d.URL), err)
	}
	if _, err := f.Root.Lstat(f.CacheDir); errors.Is(err, fs.ErrNotExist) {
		if err := f.Root.Mkdir(f.CacheDir, 0o700, -1, -1); err != nil && !errors.Is(err, fs.ErrExist) {
			return nil, fmt.Errorf("download %s: create cache directory: %w", httpx.Redact(d.URL), err)
		}
	}
	s := &Fetched{f: f, d: d}

	// A record of an earlier install whose files are intact answers
	// without the network, checksum file included.
	if rec, err := f.loadRecord(d); err != nil {
		return nil, err
	} else if dst != nil && rec != nil && rec.intact(dst, confine.Clean(dest)) {
		return f.alreadyInstalled(s, rec.digest())
	}

	want, err := f.expectedDigest(ctx, d)
	if err != nil {
		return nil, err
	}
	s.sum = want
	if d.Archive == "" && dst != nil {
		if _, ok := holds(dst, dest, want); ok {
			return f.alreadyInstalled(s, want)
		}
	}

	blob := path.Join(f.CacheDir, want.Encoded())
	if size, ok := holds(f.Root, blob, want); ok {
		// Verified by an earlier run that died before installing.
		s.blob, s.size = blob, size
		return s, nil
	}
	size, err := f.fetchVerified(ctx, d, want, blob)
	if err != nil {
		return nil, err
	}
	s.blob, s.size = blob, size
	return s, nil
}

// alreadyInstalled marks s as needing no download; Install still checks
// a binary's mode, since Fetch must not touch Dest.
func (f *Fetcher) alreadyInstalled(s *Fetched, sum digest.Digest) (*Fetched, error) {
	s.sum = sum
	s.installed = true
	return s, nil
}

// finishInstalled is Install for an artifact already in place: it fixes a
// binary's drifted mode and refreshes the record.
func (s *Fetched) finishInstalled() (Installed, error) {
	d := s.d
	res := Installed{Digest: s.sum}
	rec := s.newRecord()
	if d.Archive == "" {
		mode := binaryMode(d)
		fi, err := s.dst.Lstat(s.dest)
		if err != nil {
			return Installed{}, fmt.Errorf("install %s: %w", d.Dest, err)
		}
		if confine.ModeOf(fi) != mode {
			if err := s.dst.Chmod(s.dest, mode); err != nil {
				return Installed{}, fmt.Errorf("install %s: %w", d.Dest, err)
			}
			res.Changed = true
		}
		rec.Files = []entry{{Kind: kindFile, SHA256: s.sum.Encoded()}}
	} else {
		old, err := s.f.loadRecord(d)
		if err != nil {
			return Installed{}, fmt.Errorf("install %s: %w", d.Dest, err)
		}
		if old == nil {
			return Installed{}, fmt.Errorf("install %s: the record of the earlier install vanished", d.Dest)
		}
		rec.Files = old.Files
	}
	for _, e := range rec.Files {
		res.Files = append(res.Files, path.Join("/"+s.dest, e.Rel))
	}
	if err := s.f.saveRecord(rec, d); err != nil {
		return Installed{}, fmt.Errorf("download %s: %w", httpx.Redact(d.URL), err)
	}
	return res, nil
}

func (s *Fetched) newRecord() *installRecord {
	d := s.d
	// The record keeps the URLs for people reading the cache, without
	// their secrets (redact.URL); its name, not its URLs, matches it to d.
	return &installRecord{URL: redact.URL(d.URL), ChecksumURL: redactOrEmpty(d.ChecksumURL), SHA256: s.sum.Encoded(), Dest: d.Dest, Mode: d.Mode, Archive: d.Archive, Members: d.Members}
}

// expectedDigest is the pinned digest, or the one the checksum file lists.
func (f *Fetcher) expectedDigest(ctx context.Context, d plan.Download) (digest.Digest, error) {
	if d.SHA256 != "" {
		sum, err := parseSHA256(d.SHA256)
		if err != nil {
			return "", fmt.Errorf("download %s: pinned sha256: %w", httpx.Redact(d.URL), err)
		}
		return sum, nil
	}
	if d.ChecksumURL == "" {
		return "", fmt.Errorf("download %s: neither a sha256 nor a checksum URL; every download must be verified", httpx.Redact(d.URL))
	}
	name, err := artifactName(d.URL)
	if err != nil {
		return "", fmt.Errorf("download %s: %w", httpx.Redact(d.URL), err)
	}
	return fetchChecksum(ctx, f.client(), d.ChecksumURL, name)
}

// fetchVerified streams d.URL into a temp file in the cache while hashing
// it and renames it to blob only if the digest is want. On any failure
// nothing is left behind.
func (f *Fetcher) fetchVerified(ctx context.Context, d plan.Download, want digest.Digest, blob string) (int64, error) {
	// Partial files of an earlier run that crashed are of unknown state:
	// drop them rather than trust them.
	partial := want.Encoded() + ".part-"
	if err := f.Root.RemoveLeftovers(f.CacheDir, partial); err != nil {
		return 0, fmt.Errorf("download %s: %w", httpx.Redact(d.URL), err)
	}
	tmp, tmpPath, err := f.Root.CreateTemp(f.CacheDir, partial)
	if err != nil {
		return 0, fmt.Errorf("download %s: %w", httpx.Redact(d.URL), err)
	}
	ok := false
	defer func() {
		if !ok {
			tmp.Close()
			f.Root.Remove(tmpPath)
		}
	}()
	digester := want.Algorithm().Digester()
	var tr *progress.Tracker
	if f.Progress != nil {
		tr = f.Progress.Start(d.Name, 0)
	}
	size, err := f.get(ctx, d.URL, tmp, digester.Hash(), tr)
	if tr != nil {
		tr.Done(progressError(ctx, err))
	}
	if err != nil {
		return 0, err
	}
	if got := digester.Digest(); got != want {
		return 0, fmt.Errorf("download %s: sha256 mismatch: expected %s, got %s; nothing was installed (check the pinned sha256 or the mirror's copy)", httpx.Redact(d.URL), want, got)
	}
	if err := tmp.Sync(); err != nil {
		return 0, fmt.Errorf("download %s: fsync: %w", httpx.Redact(d.URL), err)
	}
	if err := tmp.Close(); err != nil {
		return 0, fmt.Errorf("download %s: %w", httpx.Redact(d.URL), err)
	}
	if err := f.Root.Rename(tmpPath, blob); err != nil {
		return 0, fmt.Errorf("download %s: %w", httpx.Redact(d.URL), err)
	}
	ok = true
	return size, nil
}

// get writes the body of rawURL to file, hashing it into h. The client's
// transport retries the request itself; get resumes a body that broke off
// mid-way (reset, stall, short read: what httpx.Retryable calls transient)
// with a Range request (If-Range guards against the file changing
// meanwhile), or restarts it when the server will not resume, trying at
// most as often as the client's Policy allows. A request that failed is
// not tried again here: the transport already spent the Policy on it.
func (f *Fetcher) get(ctx context.Context, rawURL string, file *os.File, h hash.Hash, tr *progress.Tracker) (int64, error) {
	var written int64
	var validator string
	err := httpx.Resume(ctx, httpx.PolicyOf(f.client()), func(int) error {
		_, err := f.getOnce(ctx, rawURL, file, h, tr, &written, &validator)
		return err
	}, func(attempt int, reason string, err error) {
		f.logger().Warn("download interrupted, resuming",
			"url", httpx.Redact(rawURL), "received", written, "attempt", attempt, "reason", reason, "error", err)
	})
	if err != nil {
		return 0, fmt.Errorf("download %s: %w", httpx.Redact(rawURL), err)
	}
	return written, nil
}

// getOnce does one attempt of get: a request for the rest of the file
// (all of it when nothing is written yet), and when the server will not
// resume, a plain request for the whole file. It returns the bytes this
// attempt copied.
func (f *Fetcher) getOnce(ctx context.Context, rawURL string, file *os.File, h hash.Hash, tr *progress.Tracker, written *int64, validator *string) (int64, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, rawURL, nil)
	if err != nil {
		return 0, err
	}
	if *written > 0 {
		req.Header.Set("Range", fmt.Sprintf("bytes=%d-", *written))
		if *validator != "" {
			req.Header.Set("If-Range", *validator)
		}
	}
	resp, err := f.client().Do(req)
	if err != nil {
		return 0, httpx.WithoutURL(err)
	}
	defer resp.Body.Close()
	total := int64(-1)
	switch {
	case resp.StatusCode == http.StatusOK:
		if *written > 0 {
			// The server sent the whole file again: start over.
			if err := restart(file, h, tr); err != nil {
				return 0, err
			}
			*written = 0
		}
		total = resp.ContentLength
		*validator = resumeValidator(resp.Header)
	case resp.StatusCode == http.StatusPartialContent && *written > 0:
		start, size, ok := parseContentRange(resp.Header.Get("Content-Range"))
		if !ok || start != *written {
			// Not the part we asked for: start over with the whole file.
			f.logger().Warn("server answered a range request with another range, fetching the whole file",
				"url", httpx.Redact(rawURL), "asked", *written, "contentRange", resp.Header.Get("Content-Range"))
			return f.getWhole(ctx, rawURL, file, h, tr, written, validator)
		}
		total = size
	case resp.StatusCode == http.StatusRequestedRangeNotSatisfiable && *written > 0:
		// The partial file cannot be continued (it may already be whole
		// but unconfirmed); start over rather than guess.
		f.logger().Warn("server refused to resume, fetching the whole file", "url", httpx.Redact(rawURL), "status", resp.Status)
		return f.getWhole(ctx, rawURL, file, h, tr, written, validator)
	default:
		return 0, httpx.NewStatusError(resp)
	}
	if tr != nil && total >= 0 {
		tr.SetTotal(total)
	}
	w := io.MultiWriter(file, h)
	if tr != nil {
		w = io.MultiWriter(file, h, tr)
	}
	n, err := io.Copy(w, httpx.Body(resp.Body))
	*written += n
	switch {
	case err != nil:
		if !httpx.IsBrokenBody(err) {
			return n, fmt.Errorf("write %s: %w", file.Name(), err)
		}
		return n, err
	case total >= 0 && *written != total:
		return n, httpx.BrokenBody(fmt.Errorf("got %d of %d bytes: %w", *written, total, io.ErrUnexpectedEOF))
	}
	return n, nil
}

// getWhole empties the partial file and fetches the whole file in the
// same attempt.
func (f *Fetcher) getWhole(ctx context.Context, rawURL string, file *os.File, h hash.Hash, tr *progress.Tracker, written *int64, validator *string) (int64, error) {
	if err := restart(file, h, tr); err != nil {
		return 0, err
	}
	*written, *validator = 0, ""
	return f.getOnce(ctx, rawURL, file, h, tr, written, validator)
}

// restart empties the partial file and the hash.
func restart(file *os.File, h hash.Hash, tr *progress.Tracker) error {
	if err := file.Truncate(0); err != nil {
		return err
	}
	if _, err := file.Seek(0, io.SeekStart); err != nil {
		return err
	}
	h.Reset()
	if tr != nil {
		tr.Reset()
	}
	return nil
}

// resumeValidator is what If-Range may carry: a strong ETag, else
// Last-Modified.
func resumeValidator(hdr http.Header) string {
	if et := hdr.Get("ETag"); et != "" && !strings.HasPrefix(et, "W/") {
		return et
	}
	return hdr.Get("Last-Modified")
}

// parseContentRange reads "bytes START-END/SIZE" (SIZE may be "*").
func parseContentRange(v string) (start, size int64, ok bool) {
	rest, found := strings.CutPrefix(v, "bytes ")
	if !found {
		return 0, 0, false
	}
	rng, sz, found := strings.Cut(rest, "/")
	if !found {
		return 0, 0, false
	}
	s, _, found := strings.Cut(rng, "-")
	if !found {
		return 0, 0, false
	}
	start, err := strconv.ParseInt(s, 10, 64)
	if err != nil {
		return 0, 0, false
	}
	size = -1
	if sz != "*" {
		if size, err = strconv.ParseInt(sz, 10, 64); err != nil {
			return 0, 0, false
		}
	}
	return start, size, true
}

// Install moves the verified artifact into place at dest in dst (d.Dest as
// a path there): a binary atomically with Mode (0755 when 0), an archive unpacked into a staging
// directory beside Dest and then renamed into Dest, so a failed extraction
// installs nothing. Extracted files get Mode, or the archive's permission
// bits when Mode is 0 (setuid and setgid bits are never taken from an
// archive); missing directories are created 0755, existing ones keep their
// mode. Files are owned by the caller (root). Install writes the record
// that makes a rerun a no-op and removes the cached artifact.
func (s *Fetched) Install(ctx context.Context, dst *confine.Root, dest string) (Installed, error) {
	s.dst, s.dest = dst, confine.Clean(dest)
	if s.installed {
		return s.finishInstalled()
	}
	if err := ctx.Err(); err != nil {
		return Installed{}, err
	}
	d := s.d
	rec := s.newRecord()
	res := Installed{Digest: s.sum, Size: s.size, Changed: true}
	var err error
	if d.Archive == "" {
		err = s.installBinary()
		rec.Files = []entry{{Kind: kindFile, SHA256: s.sum.Encoded()}}
		res.Files = []string{"/" + s.dest}
	} else {
		rec.Files, err = s.installArchive(ctx)
		for _, e := range rec.Files {
			res.Files = append(res.Files, path.Join("/"+s.dest, e.Rel))
		}
	}
	if err != nil {
		return Installed{}, err
	}
	if err := s.f.saveRecord(rec, d); err != nil {
		return Installed{}, fmt.Errorf("download %s: %w", httpx.Redact(d.URL), err)
	}
	if err := s.f.Root.Remove(s.blob); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return Installed{}, fmt.Errorf("download %s: remove the installed artifact from the cache: %w", httpx.Redact(d.URL), err)
	}
	return res, nil
}

func (s *Fetched) installBinary() error {
	d := s.d
	if err := s.dst.MkdirParents(path.Dir("/" + s.dest)); err != nil {
		return fmt.Errorf("install %s: %w", d.Dest, err)
	}
	src, err := s.f.Root.OpenNoFollow(s.blob)
	if err != nil {
		return fmt.Errorf("install %s: %w", d.Dest, err)
	}
	defer src.Close()
	// Check the bytes once more on their way out of the cache, so a file
	// changed there after Fetch can never land in Dest.
	vr := &verifyingReader{r: src, d: s.sum.Algorithm().Digester(), want: s.sum, name: s.f.Root.Show(s.blob)}
	if err := s.dst.WriteReader(s.dest, vr, binaryMode(d), -1, -1); err != nil {
		return fmt.Errorf("install %s from %s: %w", d.Dest, httpx.Redact(d.URL), err)
	}
	return nil
}

// stagePrefix starts the name of the directory an archive is unpacked into
// beside its destination before its entries are moved into place. It is a
// temporary name of the destination's (see confine.RemoveStaleTemps), so
// what a killed run left is removed with the rest of its leftovers.
func stagePrefix(dest string) string { return confine.TempPrefix(dest, "stage") }

// installArchive unpacks the artifact into a staging directory beside the
// destination, then renames its entries into the destination, so a failed
// or refused archive installs nothing.
func (s *Fetched) installArchive(ctx context.Context) ([]entry, error) {
	d := s.d
	dest := "/" + s.dest
	parent := path.Dir(dest)
	if err := s.dst.MkdirParents(parent); err != nil {
		return nil, fmt.Errorf("install %s: %w", d.Dest, err)
	}
	if fi, err := s.dst.Lstat(dest); err == nil && !fi.IsDir() {
		return nil, fmt.Errorf("install into %s: it is not a directory (%v)", d.Dest, fi.Mode().Type())
	}
	stage, err := s.dst.MkdirTemp(parent, stagePrefix(dest), 0o755)
	if err != nil {
		return nil, fmt.Errorf("install %s: staging directory: %w", d.Dest, err)
	}
	defer s.dst.RemoveAll(stage)
	src, err := s.f.Root.OpenNoFollow(s.blob)
	if err != nil {
		return nil, fmt.Errorf("install %s: %w", d.Dest, err)
	}
	defer src.Close()
	vr := &verifyingReader{r: src, d: s.sum.Algorithm().Digester(), want: s.sum, name: s.f.Root.Show(s.blob)}
	var mode os.FileMode
	if d.Mode != 0 {
		mode = confine.FileMode(d.Mode)
	}
	entries, err := extractTarGz(ctx, vr, s.dst, stage, d.Members, mode)
	// Read to the end so the digest check covers the whole file, also when
	// unpacking failed: a file changed in the cache explains a broken
	// archive better than the parse error it caused.
	if _, verr := io.Copy(io.Discard, vr); verr != nil {
		err = verr
	}
	if err != nil {
		return nil, fmt.Errorf("unpack %s (from %s): %w; nothing was installed", s.f.Root.Show(s.blob), httpx.Redact(d.URL), err)
	}
	if err := s.dst.MkdirParents(dest); err != nil {
		return nil, fmt.Errorf("install %s: %w", d.Dest, err)
	}
	if err := installEntries(s.dst, stage, dest, entries); err != nil {
		return nil, fmt.Errorf("unpack %s: %w", httpx.Redact(d.URL), err)
	}
	return entries, nil
}

// binaryMode is the mode of an installed binary; 0755 when the plan says 0.
func binaryMode(d plan.Download) os.FileMode {
	if d.Mode == 0 {
		return 0o755
	}
	return confine.FileMode(d.Mode)
}

// verifyingReader digests what passes through and turns EOF into an error
// when the digest is not want, so a consumer never completes on bad bytes:
// an atomic write commits when it reads EOF. (content.NewVerifyReader from
// oras-go tells only after EOF, and without the digest it got.)
type verifyingReader struct {
	r    io.Reader
	d    digest.Digester
	want digest.Digest
	name string
}

func (v *verifyingReader) Read(p []byte) (int, error) {
	n, err := v.r.Read(p)
	v.d.Hash().Write(p[:n])
	if errors.Is(err, io.EOF) {
		if got := v.d.Digest(); got != v.want {
			return n, fmt.Errorf("%s changed after it was verified: sha256 expected %s, got %s", v.name, v.want, got)
		}
	}
	return n, err
}

func (f *Fetcher) client() *http.Client {
	if f.Client != nil {
		return f.Client
	}
	f.defaultClientOnce.Do(func() { f.defaultClient = httpx.NewClient(httpx.WithLogger(f.logger())) })
	return f.defaultClient
}

func (f *Fetcher) logger() *slog.Logger {
	if f.Log != nil {
		return f.Log
	}
	return slog.Default()
}

// redactOrEmpty is redact.URL, keeping an absent URL absent.
func redactOrEmpty(u string) string {
	if u == "" {
		return ""
	}
	return redact.URL(u)
}

// errCancelled is what a progress line says of a download stopped by its
// context: the cause (often another step's failure, already reported on
// that step's own line) is the caller's to print, once.
var errCancelled = errors.New("cancelled")

func progressError(ctx context.Context, err error) error {
	if err != nil && ctx.Err() != nil {
		return errCancelled
	}
	return err
}
