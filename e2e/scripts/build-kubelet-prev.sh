#!/bin/bash
# build-kubelet-prev.sh OUT: builds the kubelet of the previous kubernetes
# release, K8S_PREV_VERSION (default v1.36.3), into OUT/bin/kubelet, the same
# way build-components.sh builds the current one (k8s-build.sh), for the
# upgrade scenario: the node starts on this kubelet and is upgraded to the
# current one; the control plane stays current. Only the kubelet: kubectl and
# kube-proxy stay at the current version in every manifest.
#
# OUT is complete only when OUT/.done exists; the caller keys OUT on this
# script's and k8s-build.sh's hash and the version.
# Needs: go (the module proxy reachable).
set -euo pipefail

OUT=${1:?usage: build-kubelet-prev.sh OUT}
K8S_PREV_VERSION=${K8S_PREV_VERSION:-v1.36.3}

[ -e "$OUT/.done" ] && exit 0
mkdir -p "$OUT/bin"
# A private Go cache, as in build-components.sh (E2E-NOTES.md §6).
GO_CACHE_ROOT=${GO_CACHE_ROOT:-$OUT/../go}
export GOMODCACHE=$GO_CACHE_ROOT/mod GOCACHE=$GO_CACHE_ROOT/build GOFLAGS=-modcacherw GOTOOLCHAIN=local
export PATH=/usr/local/go/bin:$PATH
. "$(dirname "$0")/k8s-build.sh"

echo "[build-kubelet-prev $(date +%T)] kubelet $K8S_PREV_VERSION"
t0=$SECONDS
k8s_build "$K8S_PREV_VERSION" "$OUT/bin" kubelet
got=$("$OUT/bin/kubelet" --version)
if [ "$got" != "Kubernetes $K8S_PREV_VERSION" ]; then
	echo "build-kubelet-prev: kubelet --version says \"$got\", want \"Kubernetes $K8S_PREV_VERSION\"" >&2
	exit 1
fi
echo "[build-kubelet-prev $(date +%T)] $got built in $((SECONDS - t0)) s"
touch "$OUT/.done"
