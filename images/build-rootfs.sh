#!/bin/bash
# build-rootfs.sh [-s SUITE] [-m MIRROR] [-c DEB_CACHE] [-p EXTRA,PKGS] DEST
#
# Debootstraps a machine rootfs with the same packages as images/base/Containerfile
# (as close as the suite allows), for hosts without a container engine. Turn
# the tree into an OCI image with `nodespawn image build --rootfs DEST ...`.
#
# Default suite is Ubuntu noble; Debian suites (bookworm) work the same way and
# the e2e uses bookworm. MIRROR defaults to the first deb URI in the host's
# apt sources for Debian suites, archive.ubuntu.com for Ubuntu ones.
# Needs: debootstrap, root.
set -euo pipefail

suite=noble mirror= debcache= extra=
while getopts s:m:c:p: o; do
	case $o in
	s) suite=$OPTARG ;;
	m) mirror=$OPTARG ;;
	c) debcache=$OPTARG ;;
	p) extra=$OPTARG ;;
	*) echo "usage: $0 [-s SUITE] [-m MIRROR] [-c DEB_CACHE] [-p EXTRA,PKGS] DEST" >&2; exit 2 ;;
	esac
done
shift $((OPTIND - 1))
dest=${1:?usage: $0 [-s SUITE] [-m MIRROR] [-c DEB_CACHE] [-p EXTRA,PKGS] DEST}

case $suite in
bionic | focal | jammy | noble | oracular | plucky | questing) distro=ubuntu ;;
*) distro=debian ;;
esac
if [ -z "$mirror" ]; then
	if [ $distro = ubuntu ]; then
		mirror=http://archive.ubuntu.com/ubuntu
	else
		mirror=$({ grep -hoE '^(URIs:|deb) +https?://[^ ]+/debian/?( |$)' /etc/apt/sources.list.d/* /etc/apt/sources.list 2>/dev/null || true; } |
			awk '{print $2}' | head -1)
		mirror=${mirror:-http://deb.debian.org/debian}
	fi
fi

# The base image's package set. bpftool and wireguard-tools are in main on
# both distributions; libseccomp2 is what a seccomp-enabled runc links to.
pkgs=systemd,systemd-sysv,dbus,udev,kmod,curl,ca-certificates,iproute2,nftables,iptables,procps,wireguard-tools,bpftool,libseccomp2,netbase,tzdata,less
[ $distro = ubuntu ] && pkgs=$pkgs,systemd-resolved
[ -n "$extra" ] && pkgs=$pkgs,$extra

args=(--variant=minbase --include="$pkgs")
[ $distro = ubuntu ] && args+=(--components=main,universe)
if [ -n "$debcache" ]; then
	mkdir -p "$debcache"
	args+=(--cache-dir="$(realpath "$debcache")")
fi

debootstrap "${args[@]}" "$suite" "$dest" "$mirror"

# First-boot semantics: systemd makes a fresh machine-id in each machine.
: >"$dest/etc/machine-id"
rm -f "$dest/var/lib/dbus/machine-id"
# The image carries no package indexes or downloaded debs, and no host name.
rm -rf "$dest"/var/lib/apt/lists/* "$dest"/var/cache/apt/archives/*.deb "$dest"/var/cache/apt/*.bin
rm -f "$dest/etc/hostname"
# debootstrap copies the build host's resolv.conf; nodespawn writes the real one.
rm -f "$dest/etc/resolv.conf"
