#!/usr/bin/env bash
# Installs the Debian packages the tests need (make test and make e2e),
# those that are missing only, and says which. `make check` runs it first,
# and so does CI (.ci/run runs make check). As root on Debian it installs
# them; elsewhere it lists what is missing and leaves the choice to you (the
# tests that need a missing tool fail or skip, each saying what it needs).
set -euo pipefail

packages=(
	# The real OCI registry the rootfs tests start on loopback.
	docker-registry
	# Network namespaces for the nftables flush tests.
	iproute2 nftables
	# Real swap, the loop-mounted NoCloud seed volume.
	util-linux mount e2fsprogs
	# Real modprobe.
	kmod
	# The cgo build (NVML) and the real ld.so.cache tests.
	gcc libc6-dev libc-bin
	# xattr checks in the unpack tests.
	attr
	curl ca-certificates
	# The end-to-end test (e2e/README.md): qemu (TCG), debootstrap for the
	# guest and machine images, dosfstools/mtools for the NoCloud seed,
	# socat for qemu's guestfwd, libseccomp-dev/pkg-config for runc,
	# busybox-static for the test pod's image.
	qemu-system-x86 qemu-utils debootstrap dosfstools mtools socat
	libseccomp-dev pkg-config busybox-static
)

missing=()
for p in "${packages[@]}"; do
	if [ "$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null)" != "install ok installed" ]; then
		missing+=("$p")
	fi
done

if [ ${#missing[@]} -eq 0 ]; then
	echo "test packages: all ${#packages[@]} installed"
	exit 0
fi
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null || [ ! -e /etc/debian_version ]; then
	echo "test packages missing: ${missing[*]}" >&2
	echo "install them (as root on Debian: apt-get install ${missing[*]}), or run make check as root" >&2
	exit 0
fi
echo "test packages: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
echo "test packages: installed ${missing[*]}"
