#!/bin/bash
# build-guest.sh OUT MIRROR DEBCACHE: builds the e2e guest VM image, a Debian
# 12 system with systemd, cloud-init and qemu-guest-agent, into OUT:
#   OUT/vmlinuz, OUT/initrd.img  passed to qemu with -kernel/-initrd
#   OUT/guest.raw                ext4 root filesystem (no partition table)
# No loop device or mount is needed: mkfs.ext4 -d fills the image from the
# tree. nodespawn itself is not in the image; the harness injects it per run,
# so the image is cached by this script's hash alone.
# Needs: root, debootstrap, e2fsprogs.
set -euo pipefail

OUT=${1:?usage: build-guest.sh OUT MIRROR DEBCACHE}
MIRROR=${2:?usage: build-guest.sh OUT MIRROR DEBCACHE}
DEBCACHE=${3:?usage: build-guest.sh OUT MIRROR DEBCACHE}
[ -e "$OUT/.done" ] && exit 0
mkdir -p "$OUT" "$DEBCACHE"
R=$OUT/rootfs
rm -rf "$R"

# Only the base through debootstrap: its --include does not resolve virtual
# packages, which cloud-init's dependencies need (E2E-NOTES.md §2).
debootstrap --variant=minbase --cache-dir="$(realpath "$DEBCACHE")" \
	--include=systemd,systemd-sysv,dbus,udev,kmod,iproute2,linux-image-amd64,initramfs-tools,e2fsprogs,procps,netbase,ca-certificates \
	bookworm "$R" "$MIRROR"

cleanup() { umount -R "$R/dev" 2>/dev/null || true; umount "$R/proc" "$R/sys" 2>/dev/null || true; }
trap cleanup EXIT
mount -t proc proc "$R/proc"
mount -t sysfs sys "$R/sys"
mount --rbind /dev "$R/dev"
cp /etc/resolv.conf "$R/etc/resolv.conf"
chroot "$R" apt-get update -qq
DEBIAN_FRONTEND=noninteractive chroot "$R" apt-get install -y -qq --no-install-recommends \
	cloud-init qemu-guest-agent systemd-container nftables iptables python3-cffi-backend
chroot "$R" apt-get clean
cleanup
trap - EXIT
rm -rf "$R"/var/lib/apt/lists/*

echo e2e-guest >"$R/etc/hostname"
printf '127.0.0.1 localhost\n127.0.1.1 e2e-guest\n' >"$R/etc/hosts"
echo '/dev/vda / ext4 rw,errors=remount-ro 0 1' >"$R/etc/fstab"
chroot "$R" passwd -d root >/dev/null
: >"$R/etc/machine-id"
# qemu user networking: static address, the slirp gateway, the slirp resolver
# (which answers nothing in the test's network namespace).
mkdir -p "$R/etc/systemd/network"
printf '[Match]\nName=en* eth*\n[Network]\nAddress=10.0.2.15/24\nGateway=10.0.2.2\nDNS=10.0.2.3\n' >"$R/etc/systemd/network/10-slirp.network"
ln -sf /lib/systemd/system/systemd-networkd.service "$R/etc/systemd/system/multi-user.target.wants/"
ln -sf /lib/systemd/system/systemd-networkd-wait-online.service "$R/etc/systemd/system/network-online.target.wants/" 2>/dev/null ||
	{ mkdir -p "$R/etc/systemd/system/network-online.target.wants" && ln -sf /lib/systemd/system/systemd-networkd-wait-online.service "$R/etc/systemd/system/network-online.target.wants/"; }
printf 'nameserver 10.0.2.3\n' >"$R/etc/resolv.conf"
# cloud-init without locales or ssh: these settings turn "status: error" into
# "done" and save ~15 s under TCG. Do not set datasource_list (E2E-NOTES.md §4).
mkdir -p "$R/etc/cloud/cloud.cfg.d"
printf 'locale: C.UTF-8\nssh_genkeytypes: []\nssh_deletekeys: false\n' >"$R/etc/cloud/cloud.cfg.d/90-e2e.cfg"
# The guest agent's unit starts on its virtio port by udev; keep its log quiet.
mkdir -p "$R/usr/local/bin"

cp -L "$R/vmlinuz" "$OUT/vmlinuz"
cp -L "$R/initrd.img" "$OUT/initrd.img"
rm -f "$OUT/guest.raw"
truncate -s 8G "$OUT/guest.raw"
mkfs.ext4 -q -F -L root -d "$R" "$OUT/guest.raw"
rm -rf "$R"
touch "$OUT/.done"
