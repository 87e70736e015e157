#!/bin/bash
# build-components.sh OUT: builds the real node binaries (kubelet, kubectl,
# kube-proxy, containerd, containerd-shim-runc-v2, ctr, runc, CNI plugins,
# crictl) from their Go modules at the pinned versions into OUT/bin, the test
# control plane (kube-apiserver, kube-controller-manager, kube-scheduler,
# etcd) beside them, and the pod sandbox (pause) from the kubernetes source.
#
# The official release binaries cannot be downloaded here (no internet), so the
# e2e serves these from its loopback mirror instead. OUT is complete only when
# OUT/.done exists; the caller keys OUT on this script's and k8s-build.sh's
# hash and the versions.
# Needs: go, gcc, libc6-dev (static pause), libseccomp-dev, pkg-config (runc with seccomp).
set -euo pipefail

OUT=${1:?usage: build-components.sh OUT}
K8S_VERSION=${K8S_VERSION:-v1.37.2}
CONTAINERD_VERSION=${CONTAINERD_VERSION:-v2.4.2}
RUNC_VERSION=${RUNC_VERSION:-v1.5.3}
CNI_VERSION=${CNI_VERSION:-v1.10.0}
CRICTL_VERSION=${CRICTL_VERSION:-v1.37.0}
ETCD_VERSION=${ETCD_VERSION:-v3.7.3}
CNI_PLUGINS=${CNI_PLUGINS:-main/bridge main/loopback main/ptp main/host-device ipam/host-local ipam/static meta/portmap meta/bandwidth meta/firewall meta/tuning}

[ -e "$OUT/.done" ] && exit 0
mkdir -p "$OUT/bin" "$OUT/cni"
# A private Go cache: the shared default one loses files under parallel
# builds on this machine kind (E2E-NOTES.md §6).
GO_CACHE_ROOT=${GO_CACHE_ROOT:-$OUT/../go}
export GOMODCACHE=$GO_CACHE_ROOT/mod GOCACHE=$GO_CACHE_ROOT/build GOFLAGS=-modcacherw GOTOOLCHAIN=local
export PATH=/usr/local/go/bin:$PATH
step() { echo "[build-components $(date +%T)] $*"; }

# Kubernetes: one go build for the node and control-plane binaries (they
# share most of the compile work; CONTROL-PLANE-NOTES.md §2.1), by the same
# k8s_build as the previous release's kubelet (k8s-build.sh).
K8S_CMDS="kubelet kubectl kube-proxy kube-apiserver kube-controller-manager kube-scheduler"
# shellcheck source=k8s-build.sh
. "$(dirname "$0")/k8s-build.sh"
k8s() {
	# shellcheck disable=SC2086 # K8S_CMDS is a list of words
	k8s_build "$K8S_VERSION" "$OUT/bin" $K8S_CMDS
	# The pod sandbox: kubernetes' own pause.c, static, so the e2e needs no
	# registry.k8s.io (CONTROL-PLANE-NOTES.md §2.4).
	gcc -Os -Wall -Werror -static -DVERSION="$K8S_VERSION-e2e" -o "$OUT/bin/pause" \
		"$GOMODCACHE/k8s.io/kubernetes@$K8S_VERSION/build/pause/linux/pause.c"
	strip "$OUT/bin/pause"
}

# etcd: its server module has ../ replace directives and the root module is
# not on the proxy, so a wrapper module pins the sibling modules.
etcd() {
	local v=$ETCD_VERSION w m
	w=$(mktemp -d)
	{
		printf 'module example.com/etcdwrap\n\ngo 1.26.0\n\nrequire go.etcd.io/etcd/server/v3 %s\n\nreplace (\n' "$v"
		for m in api/v3 client/pkg/v3 client/v3 pkg/v3; do printf '\tgo.etcd.io/etcd/%s => go.etcd.io/etcd/%s %s\n' "$m" "$m" "$v"; done
		echo ')'
	} >"$w/go.mod"
	printf '//go:build tools\n\npackage tools\n\nimport _ "go.etcd.io/etcd/server/v3"\n' >"$w/tools.go"
	(cd "$w" && go mod tidy && CGO_ENABLED=0 go build -trimpath -ldflags='-s -w' -o "$OUT/bin/etcd" go.etcd.io/etcd/server/v3)
	rm -rf "$w"
}

containerd() {
	local c
	for c in containerd containerd-shim-runc-v2 ctr; do
		CGO_ENABLED=0 GOBIN=$OUT/bin go install -trimpath -tags no_btrfs \
			-ldflags="-s -w -X github.com/containerd/containerd/v2/version.Version=$CONTAINERD_VERSION" \
			"github.com/containerd/containerd/v2/cmd/$c@$CONTAINERD_VERSION"
	done
}

runc() {
	CGO_ENABLED=1 GOBIN=$OUT/bin go install -trimpath -tags seccomp \
		-ldflags="-s -w -X main.version=${RUNC_VERSION#v}" "github.com/opencontainers/runc@$RUNC_VERSION"
}

cni() {
	local p pkgs=()
	for p in $CNI_PLUGINS; do pkgs+=("github.com/containernetworking/plugins/plugins/$p@$CNI_VERSION"); done
	CGO_ENABLED=0 GOBIN=$OUT/cni go install -trimpath -ldflags='-s -w' "${pkgs[@]}"
}

crictl() {
	CGO_ENABLED=0 GOBIN=$OUT/bin go install -trimpath \
		-ldflags="-s -w -X sigs.k8s.io/cri-tools/pkg/version.Version=$CRICTL_VERSION" \
		"sigs.k8s.io/cri-tools/cmd/crictl@$CRICTL_VERSION"
}

# Small, fast builds first so a failure shows early; kubernetes last (~10 min cold).
# A step counts as done by its marker, written after it returns, not by its
# files being there: a run killed mid-write (gcc, strip, a Go cross-device copy)
# leaves a file that looks whole, so a rerun would trust a partial binary. A
# step killed before its marker is rebuilt; each one overwrites what it wrote.
for s in runc cni crictl containerd etcd k8s; do
	[ -e "$OUT/.step-$s" ] && { step "$s: done by an earlier run"; continue; }
	step "$s"
	t0=$SECONDS
	$s
	touch "$OUT/.step-$s"
	step "$s done in $((SECONDS - t0)) s"
done
touch "$OUT/.done"
