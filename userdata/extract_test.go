package userdata

import (
	"bytes"
	"compress/gzip"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func fixture(t *testing.T, name string) []byte {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("testdata", name))
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func gz(t *testing.T, b []byte) []byte {
	t.Helper()
	var buf bytes.Buffer
	w := gzip.NewWriter(&buf)
	if _, err := w.Write(b); err != nil {
		t.Fatal(err)
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

// sameManifest compares extracted bytes with the fixture manifest; a MIME
// part loses the line break before its closing boundary.
func sameManifest(got, want []byte) bool {
	return bytes.Equal(bytes.TrimRight(got, "\n"), bytes.TrimRight(want, "\n"))
}

func TestExtract(t *testing.T) {
	want := fixture(t, "manifest.yaml")
	tests := []struct {
		name     string
		data     []byte
		wantName string // name returned for user-data called "ud"
		want     []byte // nil: want an error
		wantErr  []string
		noMan    bool // the error wraps ErrNoManifest
	}{
		{name: "manifest itself", data: want, wantName: "ud", want: want},
		{name: "manifest as json", data: fixture(t, "manifest.json"), wantName: "ud", want: fixture(t, "manifest.json")},
		{name: "manifest with BOM", data: append([]byte("\xef\xbb\xbf"), want...), wantName: "ud", want: want},
		{name: "gzip manifest", data: gz(t, want), wantName: "ud", want: want},
		{name: "cloud-config plain", data: fixture(t, "cloud-config-plain.yaml"), wantName: "ud#write_files[1]", want: want},
		{name: "cloud-config b64", data: fixture(t, "cloud-config-b64.yaml"), wantName: "ud#write_files[0]", want: want},
		{name: "cloud-config gzip+base64, unclean path", data: fixture(t, "cloud-config-gzb64.yaml"), wantName: "ud#write_files[0]", want: want},
		{name: "gzip cloud-config", data: gz(t, fixture(t, "cloud-config-b64.yaml")), wantName: "ud#write_files[0]", want: want},
		{name: "multipart", data: fixture(t, "multipart.txt"), wantName: "ud#part2", want: want},
		{name: "multipart base64 part, alt type", data: fixture(t, "multipart-base64.txt"), wantName: "ud#part2", want: want},
		{name: "multipart nested, cloud-config part", data: fixture(t, "multipart-nested.txt"), wantName: "ud#part2#part1#write_files[0]", want: want},
		{name: "gzip multipart", data: gz(t, fixture(t, "multipart.txt")), wantName: "ud#part2", want: want},
		{
			name:    "cloud-config without our entry",
			data:    fixture(t, "cloud-config-other.yaml"),
			wantErr: []string{"ud:", "#cloud-config without a write_files entry for /etc/nodespawn/manifest.yaml"},
			noMan:   true,
		},
		{
			name:    "bad write_files encoding",
			data:    fixture(t, "cloud-config-bad-encoding.yaml"),
			wantErr: []string{"ud#write_files[0]", "not valid base64"},
		},
		{
			name:    "multipart without a manifest part",
			data:    fixture(t, "multipart-none.txt"),
			wantErr: []string{"without a application/vnd.nodespawn.manifest+yaml part", "part 1 (text/cloud-config)", "part 2 (text/x-shellscript)"},
			noMan:   true,
		},
		{
			name:    "two manifest parts",
			data:    fixture(t, "multipart-two.txt"),
			wantErr: []string{"2 parts hold a manifest", "ud#part1", "ud#part2"},
		},
		{name: "script", data: fixture(t, "script.sh"), wantErr: []string{"script"}, noMan: true},
		{name: "other yaml", data: fixture(t, "not-ours.yaml"), wantErr: []string{"neither a manifest"}, noMan: true},
		{name: "empty", data: []byte("\n  \n"), wantErr: []string{"empty"}, noMan: true},
		{name: "include", data: []byte("#include\nhttp://example.invalid/x\n"), wantErr: []string{"#include user-data is not searched"}, noMan: true},
		{name: "corrupt gzip", data: []byte{0x1f, 0x8b, 0x08, 0x00, 0x01}, wantErr: []string{"gzip-compressed user-data"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			name, got, err := Extract("ud", tt.data)
			if tt.want == nil {
				if err == nil {
					t.Fatalf("Extract succeeded (%s), want error %q", name, tt.wantErr)
				}
				for _, s := range tt.wantErr {
					if !strings.Contains(err.Error(), s) {
						t.Errorf("error %q does not contain %q", err, s)
					}
				}
				if errors.Is(err, ErrNoManifest) != tt.noMan {
					t.Errorf("errors.Is(err, ErrNoManifest) = %v, want %v (%v)", !tt.noMan, tt.noMan, err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if name != tt.wantName {
				t.Errorf("name = %q, want %q", name, tt.wantName)
			}
			if !sameManifest(got, tt.want) {
				t.Errorf("extracted:\n%s\nwant:\n%s", got, tt.want)
			}
		})
	}
}
