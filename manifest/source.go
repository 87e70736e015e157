package manifest

import (
	"bufio"
	"bytes"
	"compress/gzip"
	"context"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"mime"
	"mime/multipart"
	"mime/quotedprintable"
	"net/http"
	"net/mail"
	"net/textproto"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"time"

	"go.yaml.in/yaml/v3"

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
	// manifestMediaTypeAlt is the text/x-* spelling cloud-init's own part
	// types use (text/cloud-config, text/x-shellscript).
	manifestMediaTypeAlt = "text/x-nodespawn-manifest"

	// DefaultIMDSBaseURL is Azure's instance metadata service.
	DefaultIMDSBaseURL = "http://169.254.169.254"
	imdsUserDataPath   = "/metadata/instance/compute/userData?api-version=2021-01-01&format=text"

	// azureAssetTag is the DMI chassis asset tag of every Azure VM; "auto"
	// asks IMDS only when it is there, so other clouds never wait on it.
	azureAssetTag = "7783-7084-3265-9085-8269-3286-77"

	nocloudSeedDir   = "/var/lib/cloud/seed/nocloud"
	nocloudNetSeed   = "/var/lib/cloud/seed/nocloud-net"
	byLabelDir       = "/dev/disk/by-label"
	azureCustomData  = "/var/lib/waagent/CustomData"
	cloudInitUserTxt = "/var/lib/cloud/instance/user-data.txt"
	dmiAssetTag      = "/sys/class/dmi/id/chassis_asset_tag"

	// maxSourceBytes bounds what is read from a source, and maxInflated what
	// gzip may expand to: user-data is at most a few hundred KiB on any cloud.
	maxSourceBytes = 8 << 20
	maxInflated    = 32 << 20
)

// ErrNoManifest is wrapped by ReadSource errors that mean "this source holds
// no manifest" (absent, empty, or user-data without a nodespawn part), as
// opposed to a source that exists but could not be read or decoded.
var ErrNoManifest = errors.New("no manifest")

// SourceOptions are the environment ReadSource works in. The zero value is
// the real host.
type SourceOptions struct {
	// Root prefixes every well-known path (/etc, /var/lib/cloud, /dev/disk,
	// /sys); default "/". A file spec given by the user is not prefixed.
	Root string
	// Stdin is read for the spec "-"; default os.Stdin.
	Stdin io.Reader
	// IMDSBaseURL is Azure's instance metadata service; default
	// DefaultIMDSBaseURL. Tests point it at a loopback server.
	IMDSBaseURL string
	// HTTPClient reaches IMDS. Callers pass the project's retrying client
	// (httpx.NewClient). The default tries once, without a proxy.
	HTTPClient *http.Client
	// Runner mounts and unmounts a cidata block device; default command.Exec.
	Runner command.Runner
}

// ReadSource reads the manifest named by spec and returns a name for it (the
// path or source it came from, for messages and positions) and its bytes,
// ready for Load. spec is one of:
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
// User-data may be the manifest itself (apiVersion nodespawn.dev/...), a
// #cloud-config whose write_files entry for WellKnownManifestPath holds it
// (encoding plain, b64, gz or gz+b64), or multipart MIME with a part of type
// ManifestMediaType (or text/x-nodespawn-manifest); any of them may be
// gzip-compressed. When nothing matches, the error says which sources were
// tried and why each did not match, and wraps ErrNoManifest.
func ReadSource(ctx context.Context, spec string, opts SourceOptions) (name string, data []byte, err error) {
	s := &sources{opts: opts}
	if s.opts.Root == "" {
		s.opts.Root = "/"
	}
	switch spec {
	case "":
		return "", nil, errors.New("read manifest: no source given: pass a file, -, auto, nocloud, azure or cloud-init")
	case "-":
		in := s.opts.Stdin
		if in == nil {
			in = os.Stdin
		}
		data, err := readLimited(in)
		if err != nil {
			return "", nil, fmt.Errorf("read manifest from stdin: %w", err)
		}
		return userDataOrAsIs("<stdin>", data)
	case "auto":
		return s.auto(ctx)
	case "nocloud":
		return s.nocloud(ctx)
	case "azure":
		return s.azure(ctx, true)
	case "cloud-init":
		return s.userDataFile(cloudInitUserTxt)
	}
	data, err = readFile(spec)
	if err != nil {
		return "", nil, fmt.Errorf("read manifest %s: %w", spec, err)
	}
	return userDataOrAsIs(spec, data)
}

type sources struct {
	opts SourceOptions
}

// auto tries every source in order. A source without a manifest is noted
// and passed over; one that is there but broken stops the search, so a
// manifest is never silently taken from a lesser source.
func (s *sources) auto(ctx context.Context) (string, []byte, error) {
	type try struct {
		kind string
		read func() (string, []byte, error)
	}
	tries := []try{
		{"file", func() (string, []byte, error) { return s.wellKnownFile() }},
		{"nocloud", func() (string, []byte, error) { return s.nocloud(ctx) }},
		{"azure", func() (string, []byte, error) { return s.azure(ctx, false) }},
		{"cloud-init", func() (string, []byte, error) { return s.userDataFile(cloudInitUserTxt) }},
	}
	var misses []string
	for _, t := range tries {
		name, data, err := t.read()
		if err == nil {
			slog.InfoContext(ctx, "manifest source found", "source", t.kind, "name", name)
			return name, data, nil
		}
		if !errors.Is(err, ErrNoManifest) {
			return "", nil, fmt.Errorf("read manifest (auto, source %s): %w", t.kind, err)
		}
		misses = append(misses, err.Error())
	}
	return "", nil, fmt.Errorf("read manifest (auto): %w in any source:\n  %s\nwrite it to %s, or pass one with -f",
		ErrNoManifest, strings.Join(misses, "\n  "), WellKnownManifestPath)
}

func (s *sources) path(p string) string { return filepath.Join(s.opts.Root, p) }

func (s *sources) wellKnownFile() (string, []byte, error) {
	data, err := readFile(s.path(WellKnownManifestPath))
	if errors.Is(err, fs.ErrNotExist) {
		return "", nil, fmt.Errorf("%s: %w (not present)", WellKnownManifestPath, ErrNoManifest)
	}
	if err != nil {
		return "", nil, fmt.Errorf("%s: %w", WellKnownManifestPath, err)
	}
	return userDataOrAsIs(WellKnownManifestPath, data)
}

// userDataFile reads a stored user-data file and extracts the manifest.
func (s *sources) userDataFile(p string) (string, []byte, error) {
	data, err := readFile(s.path(p))
	if errors.Is(err, fs.ErrNotExist) {
		return "", nil, fmt.Errorf("%s: %w (not present)", p, ErrNoManifest)
	}
	if err != nil {
		return "", nil, fmt.Errorf("%s: %w", p, err)
	}
	return extract(p, data)
}

// nocloud reads user-data from a seed directory, or from a cidata volume.
func (s *sources) nocloud(ctx context.Context) (string, []byte, error) {
	var misses []string
	for _, dir := range []string{nocloudSeedDir, nocloudNetSeed} {
		p := filepath.Join(dir, "user-data")
		name, data, err := s.userDataFile(p)
		if err == nil || !errors.Is(err, ErrNoManifest) {
			return name, data, err
		}
		misses = append(misses, err.Error())
	}
	for _, label := range []string{"cidata", "CIDATA"} {
		link := filepath.Join(byLabelDir, label)
		if _, err := os.Stat(s.path(link)); err != nil {
			continue
		}
		return s.nocloudDevice(ctx, link)
	}
	return "", nil, fmt.Errorf("nocloud: %w: %s; no block device labelled cidata or CIDATA in %s",
		ErrNoManifest, strings.Join(misses, "; "), byLabelDir)
}

// nocloudDevice mounts the cidata volume read-only on a temporary directory,
// reads its user-data and unmounts it again.
func (s *sources) nocloudDevice(ctx context.Context, link string) (name string, data []byte, err error) {
	dev, err := filepath.EvalSymlinks(s.path(link))
	if err != nil {
		return "", nil, fmt.Errorf("nocloud: resolve %s: %w", link, err)
	}
	run := s.opts.Runner
	if run == nil {
		run = command.Exec{}
	}
	dir, err := os.MkdirTemp("", "nodespawn-cidata-")
	if err != nil {
		return "", nil, fmt.Errorf("nocloud: mount point for %s: %w", dev, err)
	}
	defer os.Remove(dir)
	if _, err := run.Run(ctx, command.Options{}, "mount", "-o", "ro,nosuid,nodev,noexec", dev, dir); err != nil {
		return "", nil, fmt.Errorf("nocloud: mount %s (%s) read-only: %w", dev, link, err)
	}
	defer func() {
		// A mount left behind would keep the seed device busy; say so.
		if _, uerr := run.Run(context.WithoutCancel(ctx), command.Options{}, "umount", dir); uerr != nil {
			err = errors.Join(err, fmt.Errorf("nocloud: unmount %s: %w", dir, uerr))
		}
	}()
	data, err = readFile(filepath.Join(dir, "user-data"))
	name = dev + ":user-data"
	if errors.Is(err, fs.ErrNotExist) {
		return "", nil, fmt.Errorf("nocloud: %s: %w (the cidata volume has no user-data file)", name, ErrNoManifest)
	}
	if err != nil {
		return "", nil, fmt.Errorf("nocloud: %s: %w", name, err)
	}
	return extract(name, data)
}

// azure reads custom data as waagent stored it, then IMDS user data. With
// always false (auto), IMDS is asked only when DMI says this is Azure.
func (s *sources) azure(ctx context.Context, always bool) (string, []byte, error) {
	var misses []string
	data, err := readFile(s.path(azureCustomData))
	switch {
	case err == nil:
		if decoded, ok := decodeBase64(data); ok {
			if n, d, err := extract(azureCustomData, decoded); err == nil || !errors.Is(err, ErrNoManifest) {
				return n, d, err
			}
		}
		n, d, err := extract(azureCustomData, data)
		if err == nil || !errors.Is(err, ErrNoManifest) {
			return n, d, err
		}
		misses = append(misses, err.Error())
	case errors.Is(err, fs.ErrNotExist):
		misses = append(misses, azureCustomData+": not present")
	default:
		return "", nil, fmt.Errorf("azure: %s: %w", azureCustomData, err)
	}
	if !always {
		tag, _ := os.ReadFile(s.path(dmiAssetTag))
		if strings.TrimSpace(string(tag)) != azureAssetTag {
			return "", nil, fmt.Errorf("azure: %w: %s; IMDS not asked: not an Azure VM (%s)", ErrNoManifest, strings.Join(misses, "; "), dmiAssetTag)
		}
	}
	name, data, err := s.imdsUserData(ctx)
	if err != nil {
		if errors.Is(err, ErrNoManifest) {
			return "", nil, fmt.Errorf("azure: %w: %s; %s", ErrNoManifest, strings.Join(misses, "; "), strings.TrimPrefix(err.Error(), "azure: "))
		}
		return "", nil, err
	}
	return name, data, nil
}

// imdsUserData fetches the VM's user data (base64) from IMDS.
func (s *sources) imdsUserData(ctx context.Context) (string, []byte, error) {
	base := s.opts.IMDSBaseURL
	if base == "" {
		base = DefaultIMDSBaseURL
	}
	client := s.opts.HTTPClient
	if client == nil {
		// IMDS answers only direct requests, never through a proxy.
		client = &http.Client{Transport: &http.Transport{Proxy: nil}, Timeout: 30 * time.Second}
	}
	url := strings.TrimSuffix(base, "/") + imdsUserDataPath
	const name = "azure-imds:userData"
	ctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return "", nil, fmt.Errorf("azure: IMDS request %s: %w", url, err)
	}
	req.Header.Set("Metadata", "true")
	resp, err := client.Do(req)
	if err != nil {
		return "", nil, fmt.Errorf("azure: IMDS user data %s: %w", url, err)
	}
	defer resp.Body.Close()
	body, err := readLimited(resp.Body)
	if err != nil {
		return "", nil, fmt.Errorf("azure: IMDS user data %s: read: %w", url, err)
	}
	switch {
	case resp.StatusCode == http.StatusNotFound:
		return "", nil, fmt.Errorf("azure: IMDS user data %s: %w (%s)", url, ErrNoManifest, resp.Status)
	case resp.StatusCode != http.StatusOK:
		return "", nil, fmt.Errorf("azure: IMDS user data %s: %s: %s", url, resp.Status, bytes.TrimSpace(body[:min(len(body), 200)]))
	case len(bytes.TrimSpace(body)) == 0:
		return "", nil, fmt.Errorf("azure: IMDS user data %s: %w (the VM has no user data)", url, ErrNoManifest)
	}
	decoded, ok := decodeBase64(body)
	if !ok {
		return "", nil, fmt.Errorf("azure: IMDS user data %s: not base64, as IMDS always sends it", url)
	}
	return extract(name, decoded)
}

// userDataOrAsIs is for a source the user named: user-data formats are
// unwrapped, and anything else is returned unchanged so that Load reports
// its errors with positions in the file itself.
func userDataOrAsIs(name string, data []byte) (string, []byte, error) {
	if isGzip(data) || isMIME(data) || hasFirstLine(data, "#cloud-config") {
		return extract(name, data)
	}
	return name, data, nil
}

// extract finds the manifest inside user-data. name grows a suffix saying
// where inside it was found (#part2, #write_files[0]).
func extract(name string, data []byte) (string, []byte, error) {
	return extractDepth(name, data, 0)
}

// maxNesting bounds gzip-in-MIME-in-gzip recursion in hostile input.
const maxNesting = 4

var (
	manifestRE     = regexp.MustCompile(`(?m)(^|[\s{,])["']?apiVersion["']?\s*:\s*["']?nodespawn\.dev/`)
	cloudConfigRE  = regexp.MustCompile(`^#cloud-config\s*$`)
	utf8BOM        = []byte("\xef\xbb\xbf")
	gzipMagic      = []byte{0x1f, 0x8b}
	mimeHeaderRE   = regexp.MustCompile(`(?i)^(content-type|mime-version)\s*:`)
	manifestMedias = []string{ManifestMediaType, manifestMediaTypeAlt}
)

func extractDepth(name string, data []byte, depth int) (string, []byte, error) {
	if depth > maxNesting {
		return "", nil, fmt.Errorf("%s: user-data nested more than %d levels deep (gzip, MIME)", name, maxNesting)
	}
	data = bytes.TrimPrefix(data, utf8BOM)
	switch {
	case len(bytes.TrimSpace(data)) == 0:
		return "", nil, fmt.Errorf("%s: %w (empty)", name, ErrNoManifest)
	case isGzip(data):
		inflated, err := gunzip(data)
		if err != nil {
			return "", nil, fmt.Errorf("%s: gzip-compressed user-data: %w", name, err)
		}
		return extractDepth(name, inflated, depth+1)
	case isMIME(data):
		return extractMIME(name, data, depth)
	case hasFirstLine(data, "#cloud-config"):
		return extractCloudConfig(name, data, depth)
	case hasFirstLine(data, "#!"):
		return "", nil, fmt.Errorf("%s: %w (user-data is a script, not a manifest)", name, ErrNoManifest)
	case hasFirstLine(data, "#include"), hasFirstLine(data, "#cloud-config-archive"), hasFirstLine(data, "#part-handler"):
		return "", nil, fmt.Errorf("%s: %w (%s user-data is not searched; use multipart MIME with a %s part)",
			name, ErrNoManifest, firstLine(data), ManifestMediaType)
	case manifestRE.Match(data):
		return name, data, nil
	}
	return "", nil, fmt.Errorf("%s: %w (neither a manifest with apiVersion %s, nor #cloud-config with write_files %s, nor multipart MIME with a %s part)",
		name, ErrNoManifest, APIVersion, WellKnownManifestPath, ManifestMediaType)
}

// extractCloudConfig takes the manifest from a write_files entry.
func extractCloudConfig(name string, data []byte, depth int) (string, []byte, error) {
	var cc struct {
		WriteFiles []struct {
			Path     string `yaml:"path"`
			Content  string `yaml:"content"`
			Encoding string `yaml:"encoding"`
			Source   any    `yaml:"source"`
		} `yaml:"write_files"`
	}
	if err := yaml.Unmarshal(data, &cc); err != nil {
		return "", nil, fmt.Errorf("%s: #cloud-config is not valid YAML: %w", name, err)
	}
	for i, wf := range cc.WriteFiles {
		if filepath.Clean(wf.Path) != WellKnownManifestPath {
			continue
		}
		where := fmt.Sprintf("%s#write_files[%d]", name, i)
		if wf.Source != nil && wf.Content == "" {
			return "", nil, fmt.Errorf("%s: write_files source: URLs are not fetched at this stage; put the manifest in content", where)
		}
		content, err := decodeWriteFile(wf.Content, wf.Encoding)
		if err != nil {
			return "", nil, fmt.Errorf("%s: %w", where, err)
		}
		if len(bytes.TrimSpace(content)) == 0 {
			return "", nil, fmt.Errorf("%s: %w (content is empty)", where, ErrNoManifest)
		}
		return where, content, nil
	}
	return "", nil, fmt.Errorf("%s: %w (#cloud-config without a write_files entry for %s)", name, ErrNoManifest, WellKnownManifestPath)
}

// decodeWriteFile undoes cloud-init's write_files encodings.
func decodeWriteFile(content, encoding string) ([]byte, error) {
	switch strings.ToLower(strings.TrimSpace(encoding)) {
	case "", "text/plain":
		return []byte(content), nil
	case "b64", "base64":
		b, ok := decodeBase64([]byte(content))
		if !ok {
			return nil, fmt.Errorf("encoding %s: content is not valid base64", encoding)
		}
		return b, nil
	case "gz", "gzip":
		return gunzip([]byte(content))
	case "gz+base64", "gzip+base64", "gz+b64", "gzip+b64":
		b, ok := decodeBase64([]byte(content))
		if !ok {
			return nil, fmt.Errorf("encoding %s: content is not valid base64", encoding)
		}
		return gunzip(b)
	}
	return nil, fmt.Errorf("encoding %q not supported (use plain, b64 or gz+b64)", encoding)
}

// extractMIME finds the manifest part of multipart user-data, looking into
// nested multiparts, gzip parts and #cloud-config parts.
func extractMIME(name string, data []byte, depth int) (string, []byte, error) {
	msg, err := mail.ReadMessage(bytes.NewReader(data))
	if err != nil {
		return "", nil, fmt.Errorf("%s: MIME user-data: %w", name, err)
	}
	body, err := readLimited(msg.Body)
	if err != nil {
		return "", nil, fmt.Errorf("%s: MIME user-data: %w", name, err)
	}
	return extractEntity(name, textproto.MIMEHeader(msg.Header), body, depth)
}

func extractEntity(name string, h textproto.MIMEHeader, body []byte, depth int) (string, []byte, error) {
	ctype := h.Get("Content-Type")
	media, params, err := mime.ParseMediaType(ctype)
	if ctype == "" {
		media, err = "text/plain", nil
	}
	if err != nil {
		return "", nil, fmt.Errorf("%s: Content-Type %q: %w", name, ctype, err)
	}
	body, err = decodeTransfer(h.Get("Content-Transfer-Encoding"), body)
	if err != nil {
		return "", nil, fmt.Errorf("%s: %w", name, err)
	}
	switch {
	case isManifestMedia(media):
		if isGzip(body) {
			if body, err = gunzip(body); err != nil {
				return "", nil, fmt.Errorf("%s: %w", name, err)
			}
		}
		return name, body, nil
	case strings.HasPrefix(media, "multipart/"):
	default:
		return extractDepth(name, body, depth+1)
	}

	boundary := params["boundary"]
	if boundary == "" {
		return "", nil, fmt.Errorf("%s: %s without a boundary parameter", name, media)
	}
	mr := multipart.NewReader(bytes.NewReader(body), boundary)
	var found []string
	var foundData []byte
	var misses []string
	for i := 1; ; i++ {
		part, err := mr.NextRawPart()
		if err == io.EOF {
			break
		}
		if err != nil {
			return "", nil, fmt.Errorf("%s: MIME part %d: %w", name, i, err)
		}
		pb, err := readLimited(part)
		if err != nil {
			return "", nil, fmt.Errorf("%s: MIME part %d: %w", name, i, err)
		}
		pname := fmt.Sprintf("%s#part%d", name, i)
		n, d, err := extractEntity(pname, part.Header, pb, depth+1)
		switch {
		case err == nil:
			found = append(found, n)
			foundData = d
		case errors.Is(err, ErrNoManifest):
			misses = append(misses, fmt.Sprintf("part %d (%s)", i, mediaOf(part.Header)))
		default:
			return "", nil, err
		}
	}
	switch len(found) {
	case 1:
		return found[0], foundData, nil
	case 0:
		return "", nil, fmt.Errorf("%s: %w (multipart user-data without a %s part; parts: %s)",
			name, ErrNoManifest, ManifestMediaType, strings.Join(misses, ", "))
	}
	return "", nil, fmt.Errorf("%s: %d parts hold a manifest (%s); keep exactly one", name, len(found), strings.Join(found, ", "))
}

func mediaOf(h textproto.MIMEHeader) string {
	media, _, err := mime.ParseMediaType(h.Get("Content-Type"))
	if err != nil || media == "" {
		return "text/plain"
	}
	return media
}

func isManifestMedia(media string) bool {
	for _, m := range manifestMedias {
		if strings.EqualFold(media, m) {
			return true
		}
	}
	return false
}

// decodeTransfer undoes a part's Content-Transfer-Encoding (cloud-init's
// write-mime-multipart and Python's email package use base64 for any part
// that is not plain ASCII).
func decodeTransfer(cte string, body []byte) ([]byte, error) {
	switch strings.ToLower(strings.TrimSpace(cte)) {
	case "", "7bit", "8bit", "binary":
		return body, nil
	case "base64":
		b, ok := decodeBase64(body)
		if !ok {
			return nil, errors.New("Content-Transfer-Encoding base64: body is not valid base64")
		}
		return b, nil
	case "quoted-printable":
		return io.ReadAll(quotedprintable.NewReader(bytes.NewReader(body)))
	}
	return nil, fmt.Errorf("Content-Transfer-Encoding %q not supported", cte)
}

func isGzip(data []byte) bool { return bytes.HasPrefix(data, gzipMagic) }

func isMIME(data []byte) bool {
	return mimeHeaderRE.Match(bytes.TrimPrefix(data, utf8BOM))
}

func firstLine(data []byte) string {
	line, _, _ := bufio.NewReader(bytes.NewReader(data)).ReadLine()
	return strings.TrimRight(string(line), "\r")
}

func hasFirstLine(data []byte, prefix string) bool {
	line := firstLine(bytes.TrimPrefix(data, utf8BOM))
	if prefix == "#cloud-config" {
		return cloudConfigRE.MatchString(line)
	}
	return strings.HasPrefix(line, prefix)
}

func gunzip(data []byte) ([]byte, error) {
	zr, err := gzip.NewReader(bytes.NewReader(data))
	if err != nil {
		return nil, fmt.Errorf("gunzip: %w", err)
	}
	out, err := io.ReadAll(io.LimitReader(zr, maxInflated+1))
	if err != nil {
		return nil, fmt.Errorf("gunzip: %w", err)
	}
	if len(out) > maxInflated {
		return nil, fmt.Errorf("gunzip: expands to more than %d MiB", maxInflated>>20)
	}
	return out, nil
}

// decodeBase64 decodes standard base64, ignoring line breaks and blanks.
func decodeBase64(data []byte) ([]byte, bool) {
	clean := bytes.Map(func(r rune) rune {
		switch r {
		case ' ', '\t', '\r', '\n':
			return -1
		}
		return r
	}, data)
	if len(clean) == 0 {
		return nil, false
	}
	out, err := base64.StdEncoding.DecodeString(string(clean))
	if err != nil {
		return nil, false
	}
	return out, true
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
