#!/bin/bash
# prepare.sh: everything the e2e needs that takes network access (the Debian
# mirror, the Go module proxy), done before the test enters its network
# namespace. Slow parts are cached under $E2E_CACHE (default
# $XDG_CACHE_HOME/nodespawn-e2e, else /var/cache/nodespawn-e2e), each keyed
# by the hash of the script that makes it:
#   guest/KEY           VM kernel, initrd and ext4 image   (build-guest.sh)
#   components/KEY      kubelet, containerd, runc, ... built from source
#                       (build-components.sh, k8s-build.sh)
#   kubelet-prev/V-KEY  the previous release's kubelet, V=$K8S_PREV_VERSION
#                       (default v1.36.3), for the upgrade scenario
#                       (build-kubelet-prev.sh, k8s-build.sh)
#   machine-rootfs/KEY  the machine's Debian tree          (images/build-rootfs.sh)
# Per run, in $E2E_WORK (default e2e/.work): the nodespawn binary, the fleet
# controller, sysprobe, the test binary, and env, which tells the test where
# everything is (the repository's deploy/ manifests too).
set -euo pipefail
cd "$(dirname "$0")/.."

CACHE=${E2E_CACHE:-${XDG_CACHE_HOME:+$XDG_CACHE_HOME/nodespawn-e2e}}
CACHE=${CACHE:-/var/cache/nodespawn-e2e}
WORK=$(realpath -m "${E2E_WORK:-e2e/.work}")
GO=${GO:-go}
mkdir -p "$CACHE/logs" "$WORK"
CACHE=$(realpath "$CACHE")

# The Debian mirror the host's apt already uses (no other network is reachable).
MIRROR=${E2E_DEBIAN_MIRROR:-$({ grep -hoE '^(URIs:|deb) +https?://[^ ]+/debian/?( |$)' /etc/apt/sources.list.d/* /etc/apt/sources.list 2>/dev/null || true; } | awk '{print $2}' | head -1)}
MIRROR=${MIRROR:-http://deb.debian.org/debian}

key() { cat "$@" | sha256sum | cut -c1-12; }
GUEST=$CACHE/guest/$(key e2e/scripts/build-guest.sh)
COMPONENTS=$CACHE/components/$(key e2e/scripts/build-components.sh e2e/scripts/k8s-build.sh)
MACHINE=$CACHE/machine-rootfs/$(key images/build-rootfs.sh)
K8S_PREV_VERSION=${K8S_PREV_VERSION:-v1.36.3}
KUBELET_PREV=$CACHE/kubelet-prev/$K8S_PREV_VERSION-$(key e2e/scripts/build-kubelet-prev.sh e2e/scripts/k8s-build.sh)

t0=$SECONDS
log() { echo "[e2e prepare +$((SECONDS - t0))s] $*"; }

# The Go builds (CPU) and the debootstraps (mostly network and dpkg) overlap
# well; the two debootstraps share a deb cache, so they run one after the other.
# The two Go builds share one module and build cache (Go locks both): the
# standard library and the third-party modules the two Kubernetes releases
# pin alike (127 of v1.36.3's 202) are compiled once.
export GO_CACHE_ROOT=$CACHE/go
pids=()
if [ ! -e "$COMPONENTS/.done" ]; then
	log "building components into $COMPONENTS (log: $CACHE/logs/components.log; 40-50 min cold on 2 cores)"
	e2e/scripts/build-components.sh "$COMPONENTS" >"$CACHE/logs/components.log" 2>&1 &
	pids+=($!)
fi
if [ ! -e "$KUBELET_PREV/.done" ]; then
	log "building kubelet $K8S_PREV_VERSION into $KUBELET_PREV (log: $CACHE/logs/kubelet-prev.log; 25-30 min cold, beside the components)"
	K8S_PREV_VERSION=$K8S_PREV_VERSION e2e/scripts/build-kubelet-prev.sh "$KUBELET_PREV" >"$CACHE/logs/kubelet-prev.log" 2>&1 &
	pids+=($!)
fi
if [ ! -e "$GUEST/.done" ] || [ ! -e "$MACHINE/.done" ]; then
	log "building guest image and machine rootfs (log: $CACHE/logs/debootstrap.log; ~30 min cold, beside the builds)"
	(
		e2e/scripts/build-guest.sh "$GUEST" "$MIRROR" "$CACHE/debs"
		if [ ! -e "$MACHINE/.done" ]; then
			rm -rf "$MACHINE"
			images/build-rootfs.sh -s bookworm -m "$MIRROR" -c "$CACHE/debs" "$MACHINE/rootfs"
			touch "$MACHINE/.done"
		fi
	) >"$CACHE/logs/debootstrap.log" 2>&1 &
	pids+=($!)
fi

# All three no-cgo and -trimpath: the packages they share are compiled as
# make test's no-cgo vet compiles them (the same Go cache), not again.
log "building nodespawn, the fleet controller, sysprobe and the test binary"
CGO_ENABLED=0 $GO build -trimpath -o "$WORK/nodespawn" .
CGO_ENABLED=0 $GO build -trimpath -o "$WORK/nodespawn-controller" ./cmd/nodespawn-controller
gcc -static -O2 -Wall -Werror -o "$WORK/sysprobe" e2e/sysprobe/sysprobe.c
CGO_ENABLED=0 $GO test -c -trimpath -tags e2e -o "$WORK/e2e.test" ./e2e

for p in "${pids[@]}"; do
	if ! wait "$p"; then
		echo "e2e prepare: a cached build failed; see $CACHE/logs/" >&2
		tail -n 30 "$CACHE/logs/components.log" "$CACHE/logs/kubelet-prev.log" "$CACHE/logs/debootstrap.log" 2>/dev/null >&2
		exit 1
	fi
done

# The Go build cache behind the components is ~5 GB, far more than the
# binaries (~370 MB); keep it only when asked (iterating on the build
# scripts). components/go and kubelet-prev/go are where earlier versions of
# this script kept it.
if [ -z "${E2E_KEEP_GOCACHE:-}" ] && [ -e "$COMPONENTS/.done" ] && [ -e "$KUBELET_PREV/.done" ]; then
	rm -rf "$CACHE/go" "$CACHE/components/go" "$CACHE/kubelet-prev/go"
fi

cat >"$WORK/env" <<EOT
E2E_GUEST=$GUEST
E2E_COMPONENTS=$COMPONENTS
E2E_KUBELET_PREV=$KUBELET_PREV/bin/kubelet
E2E_KUBELET_PREV_VERSION=$K8S_PREV_VERSION
E2E_MACHINE_ROOTFS=$MACHINE/rootfs
E2E_NODESPAWN=$WORK/nodespawn
E2E_CONTROLLER=$WORK/nodespawn-controller
E2E_DEPLOY=$(realpath deploy)
E2E_SYSPROBE=$WORK/sysprobe
E2E_WORK=$WORK
EOT
log "ready: $WORK/env"
