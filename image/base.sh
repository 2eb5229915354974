#!/usr/bin/env bash
# Make the Dockerfile's base image, debian:bookworm-slim, in local podman
# storage from Debian's archive, for machines that reach no container
# registry: `debootstrap --variant=minbase bookworm` (~30 s, ~150 MB), then
# `podman import`. Where a registry is reachable, `podman pull
# debian:bookworm-slim` (or docker's) gives the same name and this is not
# needed. Does nothing when the image is already there (FORCE=1 rebuilds).
#
#   image/base.sh            [MIRROR=http://deb.debian.org/debian]
set -euo pipefail
cd "$(dirname "$0")/.."
export CONTAINERS_CONF="${CONTAINERS_CONF:-$PWD/image/containers.conf}"
BASE_IMAGE="${BASE_IMAGE:-docker.io/library/debian:bookworm-slim}"
MIRROR="${MIRROR:-http://deb.debian.org/debian}"

if [[ -z "${FORCE:-}" ]] && podman image exists "$BASE_IMAGE"; then
  echo "base: $BASE_IMAGE already present"
  exit 0
fi
for tool in debootstrap podman; do
  command -v "$tool" >/dev/null || {
    echo "base: $tool missing (apt-get install -y podman runc debootstrap)" >&2
    exit 1
  }
done

rootfs="$(mktemp -d /var/tmp/diglett-rootfs.XXXXXX)"
trap 'rm -rf "$rootfs"' EXIT
t0=$SECONDS
debootstrap --variant=minbase bookworm "$rootfs" "$MIRROR" >/dev/null
# What the official slim image also does: security updates on, no apt lists
# or caches in the image, no docs.
cat >"$rootfs/etc/apt/sources.list" <<EOF
deb $MIRROR bookworm main
deb $MIRROR bookworm-updates main
deb http://deb.debian.org/debian-security bookworm-security main
EOF
rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin \
  "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/usr/share/doc/* \
  "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/*
tar --numeric-owner -C "$rootfs" -c . |
  podman import --change 'CMD ["bash"]' - "$BASE_IMAGE" >/dev/null
echo "base: $BASE_IMAGE imported from debootstrap in $((SECONDS - t0)) s" \
  "($(podman image inspect --format '{{.Size}}' "$BASE_IMAGE") bytes)"
