#!/bin/sh
# A local base image for building docker/Dockerfile where no container registry can be
# reached (only the distributions' package archives): Ubuntu 24.04 "noble", the release
# the default CUDA base (nvidia/cuda:*-ubuntu24.04) is built on, made with debootstrap
# from Ubuntu's archive and imported into podman. Root, podman and debootstrap needed.
#
#   sh docker/local/base-image.sh [IMAGE=localhost/ubuntu:noble]
#
# Ubuntu's archive key comes from the ubuntu-keyring package in the same archive; only the
# key with the fingerprint of Ubuntu's published archive signing key (2018) is used. The
# base holds the release's packages; the Dockerfile's apt-get install takes those it
# installs (and what they need) from noble-updates and noble-security.
set -eu
image=${1:-localhost/ubuntu:noble}
mirror=${UBUNTU_MIRROR:-http://archive.ubuntu.com/ubuntu}
suite=noble
fingerprint=F6ECB3762474EDA9D21B7022871920D1991BC93C
if podman image exists "$image"; then echo "$image exists"; exit 0; fi
for tool in curl gpg dpkg-deb debootstrap; do
    command -v "$tool" >/dev/null || { echo "error: $tool is needed" >&2; exit 1; }
done
work=$(mktemp -d /var/tmp/urepa-base.XXXXXX)
trap 'rm -rf "$work"' EXIT
# the keyring: its .deb's path from the archive's index, then the key checked
deb=$(curl -fsS "$mirror/dists/$suite/main/binary-amd64/Packages.gz" | gunzip |
      awk '/^Package: ubuntu-keyring$/ {p = 1} p && /^Filename:/ {print $2; exit}')
curl -fsS -o "$work/keyring.deb" "$mirror/$deb"
dpkg-deb -x "$work/keyring.deb" "$work/keyring"
# only that one key goes on: a keyring from the archive could carry others as well
export GNUPGHOME="$work/gnupg"
mkdir -m 700 "$GNUPGHOME"
keyring=$work/trusted.gpg
gpg -q --no-default-keyring --keyring "$work/keyring/usr/share/keyrings/ubuntu-archive-keyring.gpg" \
    --export "$fingerprint" > "$keyring"
keys=$(gpg --show-keys --with-colons "$keyring" | grep -c '^pub:' || true)
gpg --show-keys --with-colons "$keyring" | grep -q "^fpr:*$fingerprint:" && [ "$keys" = 1 ] || {
    echo "error: the ubuntu-keyring package holds no key $fingerprint" >&2; exit 1; }
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
tar -C "$work/rootfs" -cf "$work/rootfs.tar" .    # a file: a failed tar stops here
podman import "$work/rootfs.tar" "$image"
echo "made $image"
