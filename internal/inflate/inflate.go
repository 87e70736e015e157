// Package inflate decompresses what a manifest or user-data may carry
// gzip-compressed (data: URLs, remote extra files, user-data itself), with
// a bound on what it may expand to: a few hundred bytes of hostile input
// must not become gigabytes in memory.
package inflate

import (
	"bytes"
	"compress/gzip"
	"fmt"
	"io"
)

// Gzip returns the decompressed data, or an error when it is not gzip or
// expands to more than limit bytes.
func Gzip(data []byte, limit int64) ([]byte, error) {
	return GzipReader(bytes.NewReader(data), limit)
}

// GzipReader is Gzip for a stream.
func GzipReader(r io.Reader, limit int64) ([]byte, error) {
	zr, err := gzip.NewReader(r)
	if err != nil {
		return nil, fmt.Errorf("gunzip: %w", err)
	}
	defer zr.Close()
	out, err := io.ReadAll(io.LimitReader(zr, limit+1))
	if err != nil {
		return nil, fmt.Errorf("gunzip: %w", err)
	}
	if int64(len(out)) > limit {
		return nil, fmt.Errorf("gunzip: expands to more than %d MiB", limit>>20)
	}
	return out, nil
}
