// Package upstream knows where each component's official release files
// live. It is pure (no I/O, no network imports) so render can call it.
//
// Upstream layouts, for version V (without the leading "v") and Go
// architecture A:
//
//	kubelet, kubectl, kube-proxy  https://dl.k8s.io/release/vV/bin/linux/A/NAME
//	                              checksum: the same URL + ".sha256" (bare hex)
//	crictl       https://github.com/kubernetes-sigs/cri-tools/releases/download/vV/crictl-vV-linux-A.tar.gz
//	             checksum: URL + ".sha256"; member "crictl" -> crictl
//	containerd   https://github.com/containerd/containerd/releases/download/vV/containerd-V-linux-A.tar.gz
//	             checksum: URL + ".sha256sum"; members bin/* -> containerd's binaries
//	runc         https://github.com/opencontainers/runc/releases/download/vV/runc.A
//	             checksum: runc.sha256sum in the same directory (one line per architecture)
//	cni-plugins  https://github.com/containernetworking/plugins/releases/download/vV/cni-plugins-linux-A-vV.tgz
//	             checksum: URL + ".sha256"; every regular file, flat
//
// Mirror rule: a mirror base URL keeps the upstream path and replaces only
// the scheme and host. The mirror's own path, if any, is a prefix put before
// the upstream path. So with mirror "http://127.0.0.1:8080" kubelet v1.37.2
// on amd64 is http://127.0.0.1:8080/release/v1.37.2/bin/linux/amd64/kubelet,
// and with "https://mirror.example/k8s/" it is
// https://mirror.example/k8s/release/v1.37.2/bin/linux/amd64/kubelet. A
// mirror must be an http or https URL without query, fragment or user info.
package upstream

import (
	"errors"
	"fmt"
	"net/url"
	"slices"
	"strings"

	"github.com/nodespawn/nodespawn/internal/redact"
)

// Component names, as used in download step names.
const (
	Kubelet    = "kubelet"
	Kubectl    = "kubectl"
	KubeProxy  = "kube-proxy"
	Crictl     = "crictl"
	Containerd = "containerd"
	Runc       = "runc"
	CNIPlugins = "cni-plugins"
)

// Components lists every component this package knows, in a stable order.
var Components = []string{Containerd, Runc, CNIPlugins, Kubelet, Kubectl, KubeProxy, Crictl}

// Arches are the architectures every component publishes.
var Arches = []string{"amd64", "arm64", "ppc64le", "s390x"}

// Member is a file taken out of a release archive: Path inside the
// archive, Dest relative to the install directory.
type Member struct {
	Path string
	Dest string
}

// Artifact is one component's release file.
type Artifact struct {
	// URL is the artifact and ChecksumURL the file publishing its sha256
	// (either bare hex, or sha256sum lines naming the artifact's file name).
	URL         string
	ChecksumURL string
	// Archive is "tar.gz" for tarballs, "" for a plain binary.
	Archive string
	// Members lists what to take out of an archive; empty means every
	// regular file, keeping its path relative to the archive root.
	Members []Member
	// InstallPath is where the artifact goes inside the machine: the
	// binary's path, or for an archive the directory its members land in.
	InstallPath string
}

// Lookup returns the release artifact for component at version (with or
// without a leading "v") and Go architecture arch. A non-empty mirror
// replaces the upstream scheme and host as the package doc describes.
func Lookup(component, version, arch, mirror string) (Artifact, error) {
	v := strings.TrimPrefix(version, "v")
	if !validVersion(v) {
		return Artifact{}, fmt.Errorf("%s version %q: want a release version like 1.2.3", component, version)
	}
	if !slices.Contains(Arches, arch) {
		return Artifact{}, fmt.Errorf("%s: architecture %q has no upstream release (have %s)", component, arch, strings.Join(Arches, ", "))
	}
	var a Artifact
	switch component {
	case Kubelet, Kubectl, KubeProxy:
		a.URL = fmt.Sprintf("https://dl.k8s.io/release/v%s/bin/linux/%s/%s", v, arch, component)
		a.ChecksumURL = a.URL + ".sha256"
		a.InstallPath = "/usr/local/bin/" + component
	case Crictl:
		a.URL = fmt.Sprintf("https://github.com/kubernetes-sigs/cri-tools/releases/download/v%s/crictl-v%s-linux-%s.tar.gz", v, v, arch)
		a.ChecksumURL = a.URL + ".sha256"
		a.Archive = "tar.gz"
		a.Members = []Member{{Path: "crictl", Dest: "crictl"}}
		a.InstallPath = "/usr/local/bin"
	case Containerd:
		a.URL = fmt.Sprintf("https://github.com/containerd/containerd/releases/download/v%s/containerd-%s-linux-%s.tar.gz", v, v, arch)
		a.ChecksumURL = a.URL + ".sha256sum"
		a.Archive = "tar.gz"
		// Every file in the tarball is under bin/; extracting it whole
		// into /usr/local puts each binary in /usr/local/bin without
		// pinning the list of binaries, which changes between releases.
		a.InstallPath = "/usr/local"
	case Runc:
		dir := fmt.Sprintf("https://github.com/opencontainers/runc/releases/download/v%s/", v)
		a.URL = dir + "runc." + arch
		a.ChecksumURL = dir + "runc.sha256sum"
		a.InstallPath = "/usr/local/bin/runc"
	case CNIPlugins:
		a.URL = fmt.Sprintf("https://github.com/containernetworking/plugins/releases/download/v%s/cni-plugins-linux-%s-v%s.tgz", v, arch, v)
		a.ChecksumURL = a.URL + ".sha256"
		a.Archive = "tar.gz"
		a.InstallPath = "/opt/cni/bin"
	default:
		return Artifact{}, fmt.Errorf("unknown component %q (known: %s)", component, strings.Join(Components, ", "))
	}
	if mirror == "" {
		return a, nil
	}
	var err error
	if a.URL, err = Mirror(a.URL, mirror); err != nil {
		return Artifact{}, fmt.Errorf("%s: %w", component, err)
	}
	if a.ChecksumURL, err = Mirror(a.ChecksumURL, mirror); err != nil {
		return Artifact{}, fmt.Errorf("%s: %w", component, err)
	}
	return a, nil
}

// Mirror rewrites an upstream URL onto a mirror base URL: the mirror's
// scheme and host replace the upstream ones, the mirror's path is
// prefixed, and the upstream path is kept.
func Mirror(upstreamURL, mirror string) (string, error) {
	// The errors name the mirror without its password or query: render
	// shows them as manifest errors.
	m, err := url.Parse(mirror)
	if err != nil {
		// The parser's error would quote the whole URL.
		return "", errors.New("mirror is not a valid URL")
	}
	if (m.Scheme != "http" && m.Scheme != "https") || m.Host == "" {
		return "", fmt.Errorf("mirror %q: want an http:// or https:// base URL", redact.URL(mirror))
	}
	if m.RawQuery != "" || m.Fragment != "" || m.User != nil || m.Opaque != "" {
		return "", fmt.Errorf("mirror %q: a base URL has no query, fragment or user info", redact.URL(mirror))
	}
	u, err := url.Parse(upstreamURL)
	if err != nil {
		return "", fmt.Errorf("upstream URL %q: %w", upstreamURL, err)
	}
	out := url.URL{
		Scheme: m.Scheme,
		Host:   m.Host,
		Path:   strings.TrimSuffix(m.Path, "/") + u.Path,
	}
	return out.String(), nil
}

// validVersion accepts release versions (1.37.2, 2.0.0-rc.1, 1.2.3+meta):
// it starts with a digit and has no character that could change the URL's
// path or the checksum file's name.
func validVersion(v string) bool {
	if v == "" || v[0] < '0' || v[0] > '9' {
		return false
	}
	for _, r := range v {
		if !(r >= '0' && r <= '9' || r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r == '.' || r == '-' || r == '+') {
			return false
		}
	}
	return !strings.Contains(v, "..")
}
