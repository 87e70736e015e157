package userdata

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"mime"
	"mime/multipart"
	"mime/quotedprintable"
	"net/mail"
	"net/textproto"
	"strings"

	"github.com/nodespawn/nodespawn/internal/lazyre"
)

// manifestMediaTypeAlt is the text/x-* spelling cloud-init's own part types
// use (text/cloud-config, text/x-shellscript).
const manifestMediaTypeAlt = "text/x-nodespawn-manifest"

var (
	mimeHeaderRE   = lazyre.New(`(?i)^(content-type|mime-version)\s*:`)
	manifestMedias = []string{ManifestMediaType, manifestMediaTypeAlt}
)

func isMIME(data []byte) bool {
	return mimeHeaderRE().Match(bytes.TrimPrefix(data, utf8BOM))
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
		return extract(name, body, depth+1)
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
