package upstream

import (
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
)

var update = flag.Bool("update", false, "rewrite golden files")

// TestLookupKnownURLs pins each layout by hand, as published upstream.
func TestLookupKnownURLs(t *testing.T) {
	tests := []struct {
		component, version, arch, mirror string
		want                             Artifact
	}{
		{Kubelet, "1.37.2", "amd64", "", Artifact{
			URL:         "https://dl.k8s.io/release/v1.37.2/bin/linux/amd64/kubelet",
			ChecksumURL: "https://dl.k8s.io/release/v1.37.2/bin/linux/amd64/kubelet.sha256",
			InstallPath: "/usr/local/bin/kubelet",
		}},
		{KubeProxy, "v1.37.2", "arm64", "", Artifact{
			URL:         "https://dl.k8s.io/release/v1.37.2/bin/linux/arm64/kube-proxy",
			ChecksumURL: "https://dl.k8s.io/release/v1.37.2/bin/linux/arm64/kube-proxy.sha256",
			InstallPath: "/usr/local/bin/kube-proxy",
		}},
		{Kubelet, "1.37.2", "amd64", "http://127.0.0.1:8080", Artifact{
			URL:         "http://127.0.0.1:8080/release/v1.37.2/bin/linux/amd64/kubelet",
			ChecksumURL: "http://127.0.0.1:8080/release/v1.37.2/bin/linux/amd64/kubelet.sha256",
			InstallPath: "/usr/local/bin/kubelet",
		}},
		{Crictl, "1.37.0", "amd64", "", Artifact{
			URL:         "https://github.com/kubernetes-sigs/cri-tools/releases/download/v1.37.0/crictl-v1.37.0-linux-amd64.tar.gz",
			ChecksumURL: "https://github.com/kubernetes-sigs/cri-tools/releases/download/v1.37.0/crictl-v1.37.0-linux-amd64.tar.gz.sha256",
			Archive:     "tar.gz",
			Members:     []Member{{Path: "crictl", Dest: "crictl"}},
			InstallPath: "/usr/local/bin",
		}},
		{Containerd, "2.4.2", "arm64", "https://mirror.example/artifacts/", Artifact{
			URL:         "https://mirror.example/artifacts/containerd/containerd/releases/download/v2.4.2/containerd-2.4.2-linux-arm64.tar.gz",
			ChecksumURL: "https://mirror.example/artifacts/containerd/containerd/releases/download/v2.4.2/containerd-2.4.2-linux-arm64.tar.gz.sha256sum",
			Archive:     "tar.gz",
			InstallPath: "/usr/local",
		}},
		{Runc, "1.5.3", "amd64", "", Artifact{
			URL:         "https://github.com/opencontainers/runc/releases/download/v1.5.3/runc.amd64",
			ChecksumURL: "https://github.com/opencontainers/runc/releases/download/v1.5.3/runc.sha256sum",
			InstallPath: "/usr/local/bin/runc",
		}},
		{CNIPlugins, "1.10.0", "amd64", "", Artifact{
			URL:         "https://github.com/containernetworking/plugins/releases/download/v1.10.0/cni-plugins-linux-amd64-v1.10.0.tgz",
			ChecksumURL: "https://github.com/containernetworking/plugins/releases/download/v1.10.0/cni-plugins-linux-amd64-v1.10.0.tgz.sha256",
			Archive:     "tar.gz",
			InstallPath: "/opt/cni/bin",
		}},
	}
	for _, tt := range tests {
		t.Run(tt.component+"/"+tt.arch+"/"+tt.mirror, func(t *testing.T) {
			got, err := Lookup(tt.component, tt.version, tt.arch, tt.mirror)
			if err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(got, tt.want) {
				t.Errorf("Lookup =\n%+v\nwant\n%+v", got, tt.want)
			}
		})
	}
}

// TestLookupMatrix renders every component x arch x mirror into a golden
// file, so a change to any layout shows up in review.
func TestLookupMatrix(t *testing.T) {
	versions := map[string]string{
		Kubelet: "1.37.2", Kubectl: "1.37.2", KubeProxy: "1.37.2", Crictl: "1.37.0",
		Containerd: "2.4.2", Runc: "1.5.3", CNIPlugins: "1.10.0",
	}
	mirrors := []string{"", "http://127.0.0.1:8080", "https://mirror.example/base/"}
	var b strings.Builder
	for _, c := range Components {
		for _, arch := range Arches {
			for _, m := range mirrors {
				a, err := Lookup(c, versions[c], arch, m)
				if err != nil {
					t.Fatalf("Lookup(%s, %s, %q): %v", c, arch, m, err)
				}
				if !strings.HasSuffix(a.URL, fileSuffix(c, arch)) {
					t.Errorf("%s/%s: URL %s does not end in the file name %s", c, arch, a.URL, fileSuffix(c, arch))
				}
				if m != "" && !strings.HasPrefix(a.URL, strings.TrimSuffix(m, "/")+"/") {
					t.Errorf("%s/%s: URL %s is not under mirror %s", c, arch, a.URL, m)
				}
				fmt.Fprintf(&b, "%s %s mirror=%q\n  url: %s\n  checksum: %s\n  archive: %q members: %v install: %s\n",
					c, arch, m, a.URL, a.ChecksumURL, a.Archive, a.Members, a.InstallPath)
			}
		}
	}
	golden := filepath.Join("testdata", "matrix.golden")
	if *update {
		if err := os.WriteFile(golden, []byte(b.String()), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	want, err := os.ReadFile(golden)
	if err != nil {
		t.Fatalf("%v (run go test -update to create it)", err)
	}
	if b.String() != string(want) {
		t.Errorf("matrix differs from %s; run go test ./internal/upstream -update and review the diff", golden)
	}
}

// fileSuffix is the artifact's file name, derived independently of Lookup.
func fileSuffix(c, arch string) string {
	switch c {
	case Runc:
		return "/runc." + arch
	case Crictl:
		return "-linux-" + arch + ".tar.gz"
	case Containerd:
		return "-linux-" + arch + ".tar.gz"
	case CNIPlugins:
		return "cni-plugins-linux-" + arch + "-v1.10.0.tgz"
	}
	return "/linux/" + arch + "/" + c
}

func TestLookupErrors(t *testing.T) {
	tests := []struct {
		name, component, version, arch, mirror, wantErr string
	}{
		{"unknown component", "etcd", "3.7.3", "amd64", "", "unknown component"},
		{"empty version", Kubelet, "", "amd64", "", "version"},
		{"path in version", Kubelet, "1.2.3/../../evil", "amd64", "", "version"},
		{"dots in version", Kubelet, "1..2", "amd64", "", "version"},
		{"unknown arch", Kubelet, "1.37.2", "mips", "", "architecture"},
		{"mirror without scheme", Kubelet, "1.37.2", "amd64", "127.0.0.1:8080", "mirror"},
		{"ftp mirror", Kubelet, "1.37.2", "amd64", "ftp://m/", "mirror"},
		{"mirror with query", Kubelet, "1.37.2", "amd64", "https://m/?token=x", "query"},
		{"mirror with user", Kubelet, "1.37.2", "amd64", "https://u:p@m/", "user info"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := Lookup(tt.component, tt.version, tt.arch, tt.mirror)
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
				t.Fatalf("Lookup error = %v, want one mentioning %q", err, tt.wantErr)
			}
		})
	}
}
