package inflate

import (
	"bytes"
	"compress/gzip"
	"strings"
	"testing"
)

func gz(t *testing.T, b []byte) []byte {
	t.Helper()
	var buf bytes.Buffer
	zw := gzip.NewWriter(&buf)
	zw.Write(b)
	zw.Close()
	return buf.Bytes()
}

func TestGzip(t *testing.T) {
	big := bytes.Repeat([]byte("a"), 3<<20)
	tests := []struct {
		name    string
		in      []byte
		limit   int64
		want    []byte
		wantErr string
	}{
		{"round trip", gz(t, []byte("hello")), 1 << 20, []byte("hello"), ""},
		{"exactly the limit", gz(t, big), 3 << 20, big, ""},
		{"a byte over the limit (a bomb)", gz(t, big), 3<<20 - 1, nil, "more than"},
		{"not gzip", []byte("plain text"), 1 << 20, nil, "gunzip"},
		{"cut short", gz(t, big)[:100], 1 << 30, nil, "gunzip"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := Gzip(tt.in, tt.limit)
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("err = %v, want %q", err, tt.wantErr)
				}
				return
			}
			if err != nil || !bytes.Equal(got, tt.want) {
				t.Fatalf("got %d bytes, %v", len(got), err)
			}
		})
	}
}
