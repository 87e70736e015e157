package manifest

import (
	"bytes"
	"compress/gzip"
	"context"
	"encoding/base64"
	"errors"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/nodespawn/nodespawn/internal/command"
)

func fixture(t *testing.T, name string) []byte {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("testdata/sources", name))
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
			name, got, err := extract("ud", tt.data)
			if tt.want == nil {
				if err == nil {
					t.Fatalf("extract succeeded (%s), want error %q", name, tt.wantErr)
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

// fakeRoot builds a root directory from a map of paths to contents.
func fakeRoot(t *testing.T, files map[string][]byte) string {
	t.Helper()
	root := t.TempDir()
	for p, b := range files {
		full := filepath.Join(root, p)
		if err := os.MkdirAll(filepath.Dir(full), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(full, b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	return root
}

// imds is a loopback stand-in for Azure's instance metadata service.
func imds(t *testing.T, status int, body string) (*httptest.Server, *atomic.Int32) {
	t.Helper()
	var hits atomic.Int32
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		hits.Add(1)
		if r.Header.Get("Metadata") != "true" {
			http.Error(w, "Required metadata header not specified", http.StatusBadRequest)
			return
		}
		if r.URL.Path != "/metadata/instance/compute/userData" || r.URL.Query().Get("api-version") != "2021-01-01" || r.URL.Query().Get("format") != "text" {
			http.NotFound(w, r)
			return
		}
		w.WriteHeader(status)
		w.Write([]byte(body))
	}))
	t.Cleanup(srv.Close)
	return srv, &hits
}

func TestReadSource(t *testing.T) {
	man := fixture(t, "manifest.yaml")
	b64 := []byte(base64.StdEncoding.EncodeToString(fixture(t, "multipart.txt")))
	tests := []struct {
		name     string
		spec     string
		files    map[string][]byte
		stdin    string
		imds     string // IMDS body (base64), "" for none; 404 when "404"
		wantName string
		want     []byte
		wantErr  []string
		noMan    bool
		wantIMDS int32 // requests IMDS must see
	}{
		{
			name:     "file spec is returned as is, even broken",
			spec:     "testdata/sources/not-ours.yaml",
			wantName: "testdata/sources/not-ours.yaml",
			want:     fixture(t, "not-ours.yaml"),
		},
		{
			name:     "file spec holding user-data is unwrapped",
			spec:     "testdata/sources/multipart.txt",
			wantName: "testdata/sources/multipart.txt#part2",
			want:     man,
		},
		{name: "missing file", spec: "testdata/sources/nope.yaml", wantErr: []string{"read manifest testdata/sources/nope.yaml", "no such file"}},
		{name: "stdin", spec: "-", stdin: string(man), wantName: "<stdin>", want: man},
		{name: "empty spec", spec: "", wantErr: []string{"no source given"}},
		{
			name:     "auto: well-known file wins",
			spec:     "auto",
			files:    map[string][]byte{"etc/nodespawn/manifest.yaml": man, "var/lib/cloud/seed/nocloud/user-data": fixture(t, "multipart-two.txt")},
			wantName: "/etc/nodespawn/manifest.yaml",
			want:     man,
		},
		{
			name:     "auto: nocloud-net seed",
			spec:     "auto",
			files:    map[string][]byte{"var/lib/cloud/seed/nocloud-net/user-data": fixture(t, "cloud-config-plain.yaml")},
			wantName: "/var/lib/cloud/seed/nocloud-net/user-data#write_files[1]",
			want:     man,
		},
		{
			name: "auto: azure custom data, base64",
			spec: "auto",
			files: map[string][]byte{
				"var/lib/cloud/seed/nocloud/user-data": fixture(t, "multipart-none.txt"),
				"var/lib/waagent/CustomData":           b64,
			},
			wantName: "/var/lib/waagent/CustomData#part2",
			want:     man,
		},
		{
			name:     "auto: azure custom data, plain",
			spec:     "auto",
			files:    map[string][]byte{"var/lib/waagent/CustomData": fixture(t, "cloud-config-gzb64.yaml")},
			wantName: "/var/lib/waagent/CustomData#write_files[0]",
			want:     man,
		},
		{
			name:     "auto: IMDS on an Azure VM",
			spec:     "auto",
			files:    map[string][]byte{"sys/class/dmi/id/chassis_asset_tag": []byte(azureAssetTag + "\n")},
			imds:     string(b64),
			wantName: "azure-imds:userData#part2",
			want:     man,
			wantIMDS: 1,
		},
		{
			name:     "auto: cloud-init stored user-data, IMDS not asked off Azure",
			spec:     "auto",
			files:    map[string][]byte{"var/lib/cloud/instance/user-data.txt": gz(t, man)},
			imds:     string(b64),
			wantName: "/var/lib/cloud/instance/user-data.txt",
			want:     man,
		},
		{
			name:  "auto: nothing anywhere",
			spec:  "auto",
			files: map[string][]byte{"var/lib/cloud/instance/user-data.txt": fixture(t, "cloud-config-other.yaml")},
			wantErr: []string{
				"no manifest in any source",
				"/etc/nodespawn/manifest.yaml: no manifest (not present)",
				"nocloud: no manifest: /var/lib/cloud/seed/nocloud/user-data: no manifest (not present)",
				"no block device labelled cidata or CIDATA",
				"azure: no manifest: /var/lib/waagent/CustomData: not present; IMDS not asked: not an Azure VM",
				"/var/lib/cloud/instance/user-data.txt: no manifest (#cloud-config without a write_files entry",
			},
			noMan: true,
		},
		{
			name:    "auto: a broken source stops the search",
			spec:    "auto",
			files:   map[string][]byte{"var/lib/cloud/seed/nocloud/user-data": {0x1f, 0x8b, 0, 0}, "var/lib/cloud/instance/user-data.txt": man},
			wantErr: []string{"auto, source nocloud", "/var/lib/cloud/seed/nocloud/user-data: gzip-compressed user-data"},
		},
		{
			name:     "azure: IMDS asked without DMI when named",
			spec:     "azure",
			imds:     base64.StdEncoding.EncodeToString(man),
			wantName: "azure-imds:userData",
			want:     man,
			wantIMDS: 1,
		},
		{
			name:     "azure: IMDS without user data",
			spec:     "azure",
			imds:     "404",
			wantErr:  []string{"/var/lib/waagent/CustomData: not present", "404 Not Found"},
			noMan:    true,
			wantIMDS: 1,
		},
		{
			name:     "azure: IMDS sends no base64",
			spec:     "azure",
			imds:     "apiVersion: nodespawn.dev/v1alpha1",
			wantErr:  []string{"not base64"},
			wantIMDS: 1,
		},
		{
			name:     "cloud-init",
			spec:     "cloud-init",
			files:    map[string][]byte{"var/lib/cloud/instance/user-data.txt": fixture(t, "multipart-base64.txt")},
			wantName: "/var/lib/cloud/instance/user-data.txt#part2",
			want:     man,
		},
		{
			name:    "cloud-init: absent",
			spec:    "cloud-init",
			wantErr: []string{"/var/lib/cloud/instance/user-data.txt: no manifest (not present)"},
			noMan:   true,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			opts := SourceOptions{
				Root:  fakeRoot(t, tt.files),
				Stdin: strings.NewReader(tt.stdin),
				// Never the real IMDS: a closed loopback port unless the case serves one.
				IMDSBaseURL: "http://127.0.0.1:1",
				Runner: command.RunnerFunc(func(context.Context, command.Options, string, ...string) ([]byte, error) {
					t.Fatal("no command expected")
					return nil, nil
				}),
			}
			var hits *atomic.Int32
			if tt.imds != "" {
				var srv *httptest.Server
				if tt.imds == "404" {
					srv, hits = imds(t, http.StatusNotFound, "")
				} else {
					srv, hits = imds(t, http.StatusOK, tt.imds)
				}
				opts.IMDSBaseURL = srv.URL
			}
			name, got, err := ReadSource(context.Background(), tt.spec, opts)
			if hits != nil && hits.Load() != tt.wantIMDS {
				t.Errorf("IMDS saw %d requests, want %d", hits.Load(), tt.wantIMDS)
			}
			if tt.want == nil {
				if err == nil {
					t.Fatalf("ReadSource succeeded (%s), want error %q", name, tt.wantErr)
				}
				for _, s := range tt.wantErr {
					if !strings.Contains(err.Error(), s) {
						t.Errorf("error %q\ndoes not contain %q", err, s)
					}
				}
				if errors.Is(err, ErrNoManifest) != tt.noMan {
					t.Errorf("errors.Is(err, ErrNoManifest) = %v, want %v", !tt.noMan, tt.noMan)
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
				t.Errorf("got:\n%s\nwant:\n%s", got, tt.want)
			}
		})
	}
}

// TestReadSourceNoCloudDeviceFake checks the mount/read/unmount sequence for
// a cidata block device at the command seam.
func TestReadSourceNoCloudDeviceFake(t *testing.T) {
	root := t.TempDir()
	dev := filepath.Join(root, "dev/sr0")
	if err := os.MkdirAll(filepath.Join(root, "dev/disk/by-label"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(dev, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink("../../sr0", filepath.Join(root, "dev/disk/by-label/CIDATA")); err != nil {
		t.Fatal(err)
	}
	var calls []string
	var mountDir string
	run := command.RunnerFunc(func(_ context.Context, _ command.Options, name string, args ...string) ([]byte, error) {
		calls = append(calls, name+" "+strings.Join(args, " "))
		switch name {
		case "mount":
			mountDir = args[len(args)-1]
			return nil, os.WriteFile(filepath.Join(mountDir, "user-data"), fixture(t, "multipart.txt"), 0o600)
		case "umount":
			return nil, os.Remove(filepath.Join(args[0], "user-data"))
		}
		return nil, errors.New("unexpected command")
	})
	name, got, err := ReadSource(context.Background(), "nocloud", SourceOptions{Root: root, Runner: run})
	if err != nil {
		t.Fatal(err)
	}
	if want := dev + ":user-data#part2"; name != want {
		t.Errorf("name = %q, want %q", name, want)
	}
	if !sameManifest(got, fixture(t, "manifest.yaml")) {
		t.Errorf("got:\n%s", got)
	}
	wantCalls := []string{"mount -o ro,nosuid,nodev,noexec " + dev + " " + mountDir, "umount " + mountDir}
	if strings.Join(calls, "\n") != strings.Join(wantCalls, "\n") {
		t.Errorf("calls = %q, want %q", calls, wantCalls)
	}
	if _, err := os.Stat(mountDir); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("mount point %s left behind: %v", mountDir, err)
	}
}

// TestReadSourceNoCloudDeviceReal mounts a real file system labelled cidata
// (through a loop device), as a NoCloud seed arrives on a VM. The seed is
// ext4 because kernels built for CI may lack vfat and iso9660; mount(8)
// detects the type either way.
func TestReadSourceNoCloudDeviceReal(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to mount")
	}
	for _, tool := range []string{"mkfs.ext4", "mount", "umount"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("%s not found: install e2fsprogs and mount", tool)
		}
	}
	dir := t.TempDir()
	seed := filepath.Join(dir, "seed")
	if err := os.Mkdir(seed, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(seed, "user-data"), fixture(t, "cloud-config-plain.yaml"), 0o600); err != nil {
		t.Fatal(err)
	}
	img := filepath.Join(dir, "seed.img")
	if out, err := exec.Command("mkfs.ext4", "-q", "-L", "cidata", "-d", seed, img, "4M").CombinedOutput(); err != nil {
		t.Fatalf("mkfs.ext4: %v: %s", err, out)
	}
	root := t.TempDir()
	if err := os.MkdirAll(filepath.Join(root, "dev/disk/by-label"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(img, filepath.Join(root, "dev/disk/by-label/cidata")); err != nil {
		t.Fatal(err)
	}
	name, got, err := ReadSource(context.Background(), "nocloud", SourceOptions{Root: root})
	if err != nil {
		t.Fatal(err)
	}
	if want := img + ":user-data#write_files[1]"; name != want {
		t.Errorf("name = %q, want %q", name, want)
	}
	if !sameManifest(got, fixture(t, "manifest.yaml")) {
		t.Errorf("got:\n%s", got)
	}
	mounts, _ := os.ReadFile("/proc/self/mounts")
	if strings.Contains(string(mounts), "nodespawn-cidata-") {
		t.Errorf("seed still mounted:\n%s", mounts)
	}
}

// TestCloudInitExamples keeps examples/cloud-init working as they are: each
// yields a manifest that loads and validates.
func TestCloudInitExamples(t *testing.T) {
	tests := map[string]string{
		"nocloud-user-data.yaml":  "#write_files[0]",
		"multipart-user-data.txt": "#part2",
		"azure-custom-data.yaml":  "",
	}
	for file, suffix := range tests {
		t.Run(file, func(t *testing.T) {
			path := filepath.Join("../examples/cloud-init", file)
			name, data, err := ReadSource(context.Background(), path, SourceOptions{})
			if err != nil {
				t.Fatal(err)
			}
			if name != path+suffix {
				t.Errorf("name = %q, want %q", name, path+suffix)
			}
			m, err := Load(name, data)
			if err != nil {
				t.Fatalf("load: %v", err)
			}
			if m.Kubernetes.Auth.BootstrapToken != "abcdef.0123456789abcdef" {
				t.Errorf("bootstrap token = %q", m.Kubernetes.Auth.BootstrapToken)
			}
		})
	}
	// Azure stores custom data base64-encoded by default.
	raw, err := os.ReadFile("../examples/cloud-init/azure-custom-data.yaml")
	if err != nil {
		t.Fatal(err)
	}
	root := fakeRoot(t, map[string][]byte{"var/lib/waagent/CustomData": []byte(base64.StdEncoding.EncodeToString(raw))})
	name, data, err := ReadSource(context.Background(), "azure", SourceOptions{Root: root, IMDSBaseURL: "http://127.0.0.1:1"})
	if err != nil {
		t.Fatal(err)
	}
	if name != "/var/lib/waagent/CustomData" || !bytes.Equal(data, raw) {
		t.Errorf("azure custom data: name %q, %d bytes, want %d", name, len(data), len(raw))
	}
}
