package userdata

import (
	"bufio"
	"bytes"
	"encoding/base64"
	"fmt"
	"strings"

	"github.com/nodespawn/nodespawn/internal/inflate"
	"github.com/nodespawn/nodespawn/internal/lazyre"
	"github.com/nodespawn/nodespawn/manifest"
)

// maxNesting bounds gzip-in-MIME-in-gzip recursion in hostile input.
const maxNesting = 4

var (
	manifestRE    = lazyre.New(`(?m)(^|[\s{,])["']?apiVersion["']?\s*:\s*["']?nodespawn\.dev/`)
	cloudConfigRE = lazyre.New(`^#cloud-config\s*$`)
	utf8BOM       = []byte("\xef\xbb\xbf")
	gzipMagic     = []byte{0x1f, 0x8b}
)

// Extract finds the manifest inside user-data and returns it with name
// grown by a suffix saying where inside it was found (#part2,
// #write_files[0]). User-data may be the manifest itself (apiVersion
// nodespawn.dev/...), a #cloud-config whose write_files entry for
// WellKnownManifestPath holds it (encoding plain, b64, gz or gz+b64), or
// multipart MIME with a part of type ManifestMediaType (or
// text/x-nodespawn-manifest); any of them may be gzip-compressed. An error
// wraps ErrNoManifest when the user-data is fine but holds no manifest.
func Extract(name string, data []byte) (string, []byte, error) {
	return extract(name, data, 0)
}

// userDataOrAsIs is for a source the user named: user-data formats are
// unwrapped, and anything else is returned unchanged so that manifest.Load
// reports its errors with positions in the file itself.
func userDataOrAsIs(name string, data []byte) (Source, error) {
	if isGzip(data) || isMIME(data) || hasFirstLine(data, "#cloud-config") {
		return extractSource(name, data)
	}
	return Source{Name: name, Data: data, File: name, Mapped: true}, nil
}

func extract(name string, data []byte, depth int) (string, []byte, error) {
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
		return extract(name, inflated, depth+1)
	case isMIME(data):
		return extractMIME(name, data, depth)
	case hasFirstLine(data, "#cloud-config"):
		return extractCloudConfig(name, data)
	case hasFirstLine(data, "#!"):
		return "", nil, fmt.Errorf("%s: %w (user-data is a script, not a manifest)", name, ErrNoManifest)
	case hasFirstLine(data, "#include"), hasFirstLine(data, "#cloud-config-archive"), hasFirstLine(data, "#part-handler"):
		return "", nil, fmt.Errorf("%s: %w (%s user-data is not searched; use multipart MIME with a %s part)",
			name, ErrNoManifest, firstLine(data), ManifestMediaType)
	case manifestRE().Match(data):
		return name, data, nil
	}
	return "", nil, fmt.Errorf("%s: %w (neither a manifest with apiVersion %s, nor #cloud-config with write_files %s, nor multipart MIME with a %s part)",
		name, ErrNoManifest, manifest.APIVersion, WellKnownManifestPath, ManifestMediaType)
}

func isGzip(data []byte) bool { return bytes.HasPrefix(data, gzipMagic) }

func firstLine(data []byte) string {
	line, _, _ := bufio.NewReader(bytes.NewReader(data)).ReadLine()
	return strings.TrimRight(string(line), "\r")
}

func hasFirstLine(data []byte, prefix string) bool {
	line := firstLine(bytes.TrimPrefix(data, utf8BOM))
	if prefix == "#cloud-config" {
		return cloudConfigRE().MatchString(line)
	}
	return strings.HasPrefix(line, prefix)
}

func gunzip(data []byte) ([]byte, error) { return inflate.Gzip(data, maxInflated) }

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
