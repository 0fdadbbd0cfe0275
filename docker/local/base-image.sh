#!/bin/sh
# A local base image for building docker/Dockerfile where no container registry can be
# reached (only the distributions' package archives): Ubuntu 24.04 "noble", the release
# the default CUDA base (nvidia/cuda:*-ubuntu24.04) is built on, made with debootstrap
# from Ubuntu's archive and imported into podman. Root, podman and debootstrap needed.
#
#   sh docker/local/base-image.sh [IMAGE=localhost/ubuntu:noble]
#
# Ubuntu's archive key comes from the ubuntu-keyring package in the same archive and is
# used only if its fingerprint is Ubuntu's published archive signing key (2018).
set -eu
image=${1:-localhost/ubuntu:noble}
mirror=${UBUNTU_MIRROR:-http://archive.ubuntu.com/ubuntu}
suite=noble
fingerprint=F6ECB3762474EDA9D21B7022871920D1991BC93C
if podman image exists "$image"; then echo "$image exists"; exit 0; fi
work=$(mktemp -d /var/tmp/urepa-base.XXXXXX)
trap 'rm -rf "$work"' EXIT
# the keyring: its .deb's path from the archive's index, then the key checked
deb=$(curl -fsS "$mirror/dists/$suite/main/binary-amd64/Packages.gz" | gunzip |
      awk '/^Package: ubuntu-keyring$/ {p = 1} p && /^Filename:/ {print $2; exit}')
curl -fsS -o "$work/keyring.deb" "$mirror/$deb"
dpkg-deb -x "$work/keyring.deb" "$work/keyring"
keyring=$work/keyring/usr/share/keyrings/ubuntu-archive-keyring.gpg
gpg --show-keys --with-colons "$keyring" 2>/dev/null | grep -q "^fpr:*$fingerprint:" || {
    echo "error: $keyring does not hold Ubuntu's archive key $fingerprint" >&2; exit 1; }
# debootstrap of Debian bookworm has no script named noble: Ubuntu's all follow gutsy's
script=/usr/share/debootstrap/scripts/$suite
[ -e "$script" ] || script=/usr/share/debootstrap/scripts/gutsy
debootstrap --variant=minbase --keyring="$keyring" --components=main,universe \
    "$suite" "$work/rootfs" "$mirror" "$script"
cat > "$work/rootfs/etc/apt/sources.list" <<LIST
deb $mirror $suite main universe
deb $mirror $suite-updates main universe
deb $mirror $suite-security main universe
LIST
rm -rf "$work/rootfs/var/lib/apt/lists"/* "$work/rootfs/var/cache/apt"/*.bin
tar -C "$work/rootfs" -c . | podman import - "$image"
echo "made $image"
