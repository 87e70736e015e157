package download

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"path"
	"strings"

	"github.com/opencontainers/go-digest"

	"github.com/nodespawn/nodespawn/internal/httpx"
)

// maxChecksumFile bounds how much of a checksum file is read; real ones
// are a few hundred bytes.
const maxChecksumFile = 1 << 20

// fetchChecksum downloads checksumURL and returns the sha256 it publishes
// for the file named fileName.
func fetchChecksum(ctx context.Context, client *http.Client, checksumURL, fileName string) (digest.Digest, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, checksumURL, nil)
	if err != nil {
		return "", fmt.Errorf("checksum %s: %w", httpx.Redact(checksumURL), err)
	}
	resp, err := client.Do(req)
	if err != nil {
		return "", fmt.Errorf("fetch checksum %s: %w", httpx.Redact(checksumURL), httpx.WithoutURL(err))
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return "", fmt.Errorf("fetch checksum %s: %w", httpx.Redact(checksumURL), httpx.NewStatusError(resp))
	}
	data, err := io.ReadAll(io.LimitReader(resp.Body, maxChecksumFile+1))
	if err != nil {
		return "", fmt.Errorf("fetch checksum %s: %w", httpx.Redact(checksumURL), err)
	}
	if len(data) > maxChecksumFile {
		return "", fmt.Errorf("checksum file %s is larger than %d bytes; is it really a checksum file?", httpx.Redact(checksumURL), maxChecksumFile)
	}
	sum, err := parseChecksum(string(data), fileName)
	if err != nil {
		return "", fmt.Errorf("checksum file %s: %w", httpx.Redact(checksumURL), err)
	}
	return sum, nil
}

// parseChecksum reads the two formats upstreams publish: a bare hex digest
// (dl.k8s.io's kubelet.sha256), or sha256sum lines "<hex>  <name>" (text
// mode) or "<hex> *<name>" (binary mode), possibly several, of which the one
// naming fileName is taken (containerd's .sha256sum, runc.sha256sum, CNI's
// and crictl's .sha256).
func parseChecksum(data, fileName string) (digest.Digest, error) {
	var bare []string
	for _, line := range strings.Split(data, "\n") {
		fields := strings.Fields(line)
		switch {
		case len(fields) == 0:
			continue
		case len(fields) == 1:
			bare = append(bare, fields[0])
		default:
			name := strings.TrimPrefix(strings.Join(fields[1:], " "), "*")
			if name == fileName || strings.TrimPrefix(name, "./") == fileName || path.Base(name) == fileName {
				return parseSHA256(fields[0])
			}
		}
	}
	switch len(bare) {
	case 0:
		return "", fmt.Errorf("no sha256 listed for %s", fileName)
	case 1:
		return parseSHA256(bare[0])
	default:
		return "", fmt.Errorf("%d digests without file names; cannot tell which is %s", len(bare), fileName)
	}
}

// parseSHA256 reads a sha256 hex digest as upstreams and manifests write
// it: in either case, optionally with a "sha256:" prefix.
func parseSHA256(s string) (digest.Digest, error) {
	d := digest.NewDigestFromEncoded(digest.SHA256, strings.TrimPrefix(strings.ToLower(s), "sha256:"))
	if err := d.Validate(); err != nil {
		return "", fmt.Errorf("%q is not a sha256 digest (want 64 hex digits)", s)
	}
	return d, nil
}

// artifactName is the file name a checksum file lists for rawURL.
func artifactName(rawURL string) (string, error) {
	u, err := url.Parse(rawURL)
	if err != nil {
		return "", err
	}
	name := path.Base(u.Path)
	if name == "/" || name == "." {
		return "", fmt.Errorf("URL %s names no file", httpx.Redact(rawURL))
	}
	return name, nil
}
