package userdata

import (
	"bytes"
	"context"
	"encoding/base64"
	"errors"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nodespawn/nodespawn/internal/command"
	"github.com/nodespawn/nodespawn/internal/httpx"
	"github.com/nodespawn/nodespawn/manifest"
)

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

// testClient is the project's client, as the CLI passes it, retrying
// without sleeping.
func testClient() *http.Client {
	return httpx.NewClient(httpx.WithoutProxy(), httpx.WithPolicy(httpx.Policy{Attempts: httpx.DefaultPolicy.Attempts, Base: time.Millisecond, Max: 5 * time.Millisecond}),
		httpx.WithLogger(slog.New(slog.NewTextHandler(io.Discard, nil))))
}

// imds is a loopback stand-in for Azure's instance metadata service. It
// answers the first busy requests with 429, as IMDS does when throttling.
func imds(t *testing.T, status int, body string, busy int32) (*httptest.Server, *atomic.Int32) {
	t.Helper()
	var hits atomic.Int32
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if hits.Add(1) <= busy {
			http.Error(w, "Too many requests", http.StatusTooManyRequests)
			return
		}
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

func TestRead(t *testing.T) {
	man := fixture(t, "manifest.yaml")
	b64 := []byte(base64.StdEncoding.EncodeToString(fixture(t, "multipart.txt")))
	tests := []struct {
		name     string
		spec     string
		files    map[string][]byte
		stdin    string
		imds     string // IMDS body (base64), "" for none; 404 when "404"
		imdsBusy int32  // requests IMDS throttles before it answers
		wantName string
		want     []byte
		wantErr  []string
		noMan    bool
		wantIMDS int32 // requests IMDS must see
	}{
		{
			name:     "file spec is returned as is, even broken",
			spec:     "testdata/not-ours.yaml",
			wantName: "testdata/not-ours.yaml",
			want:     fixture(t, "not-ours.yaml"),
		},
		{
			name:     "file spec holding user-data is unwrapped",
			spec:     "testdata/multipart.txt",
			wantName: "testdata/multipart.txt#part2",
			want:     man,
		},
		{name: "missing file", spec: "testdata/nope.yaml", wantErr: []string{"read manifest testdata/nope.yaml", "no such file"}},
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
			name:     "azure: IMDS throttles, the client retries",
			spec:     "azure",
			imds:     base64.StdEncoding.EncodeToString(man),
			imdsBusy: 2,
			wantName: "azure-imds:userData",
			want:     man,
			wantIMDS: 3,
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
			opts := Options{
				Root:  fakeRoot(t, tt.files),
				Stdin: strings.NewReader(tt.stdin),
				// Never the real IMDS: a closed loopback port unless the case serves one.
				IMDSBaseURL: "http://127.0.0.1:1",
				HTTPClient:  testClient(),
				Runner: command.RunnerFunc(func(context.Context, command.Options, string, ...string) ([]byte, error) {
					t.Fatal("no command expected")
					return nil, nil
				}),
			}
			var hits *atomic.Int32
			if tt.imds != "" {
				var srv *httptest.Server
				if tt.imds == "404" {
					srv, hits = imds(t, http.StatusNotFound, "", tt.imdsBusy)
				} else {
					srv, hits = imds(t, http.StatusOK, tt.imds, tt.imdsBusy)
				}
				opts.IMDSBaseURL = srv.URL
			}
			name, got, err := Read(context.Background(), tt.spec, opts)
			if hits != nil && hits.Load() != tt.wantIMDS {
				t.Errorf("IMDS saw %d requests, want %d", hits.Load(), tt.wantIMDS)
			}
			if tt.want == nil {
				if err == nil {
					t.Fatalf("Read succeeded (%s), want error %q", name, tt.wantErr)
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

// TestReadNeedsHTTPClient: without a client, the sources that may ask IMDS
// are refused at once, on any host, not only on an Azure VM; the others
// need none.
func TestReadNeedsHTTPClient(t *testing.T) {
	root := fakeRoot(t, map[string][]byte{"var/lib/cloud/instance/user-data.txt": fixture(t, "manifest.yaml")})
	for _, spec := range []string{"auto", "azure"} {
		_, _, err := Read(context.Background(), spec, Options{Root: root, IMDSBaseURL: "http://127.0.0.1:1"})
		if err == nil || !strings.Contains(err.Error(), "Options.HTTPClient is nil") {
			t.Errorf("%s without an HTTP client: err = %v, want one naming Options.HTTPClient", spec, err)
		}
	}
	for _, spec := range []string{"cloud-init", "testdata/manifest.yaml"} {
		if _, _, err := Read(context.Background(), spec, Options{Root: root}); err != nil {
			t.Errorf("%s without an HTTP client: %v", spec, err)
		}
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
			name, data, err := Read(context.Background(), path, Options{})
			if err != nil {
				t.Fatal(err)
			}
			if name != path+suffix {
				t.Errorf("name = %q, want %q", name, path+suffix)
			}
			m, err := manifest.Load(name, data)
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
	name, data, err := Read(context.Background(), "azure", Options{Root: root, IMDSBaseURL: "http://127.0.0.1:1", HTTPClient: testClient()})
	if err != nil {
		t.Fatal(err)
	}
	if name != "/var/lib/waagent/CustomData" || !bytes.Equal(data, raw) {
		t.Errorf("azure custom data: name %q, %d bytes, want %d", name, len(data), len(raw))
	}
}
