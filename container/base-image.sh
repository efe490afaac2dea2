#!/usr/bin/env bash
# Makes the container base image from Debian's packages, for machines that cannot pull
# `debian:bookworm-slim` from a registry (an air-gapped cluster, a build host that reaches only
# a Debian mirror):
#   bash container/base-image.sh [TAG] [MIRROR]
# debootstraps a minimal Debian 12 into a temporary folder and imports it as TAG (default
# localhost/debian:bookworm-slim), with podman (or docker where its engine runs). Then:
#   podman build --build-arg BASE=localhost/debian:bookworm-slim -t dwave:cpu .
# Needs root (debootstrap) and the debootstrap package.
set -euo pipefail
TAG=${1:-localhost/debian:bookworm-slim}
MIRROR=${2:-http://deb.debian.org/debian}
ENGINE=${DWAVE_CONTAINER_ENGINE:-$(command -v podman || command -v docker || true)}
[ -n "$ENGINE" ] || { echo "base-image.sh: neither podman nor docker is installed" >&2; exit 1; }
command -v debootstrap >/dev/null || {
  echo "base-image.sh: debootstrap is not installed (apt-get install debootstrap)" >&2; exit 1; }
if "$ENGINE" image exists "$TAG" 2>/dev/null; then
  echo "base-image.sh: $TAG already exists"; exit 0
fi
root=$(mktemp -d /tmp/dwave-rootfs.XXXXXX)
trap 'rm -rf "$root"' EXIT   # only the folder this script made
echo "base-image.sh: debootstrap bookworm from $MIRROR into $root (a few minutes)"
debootstrap --variant=minbase bookworm "$root" "$MIRROR" >"$root.log" 2>&1 \
  || { echo "base-image.sh: debootstrap failed, see $root.log" >&2; exit 1; }
rm -f "$root.log"
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
tar -C "$root" -c . | "$ENGINE" import --change 'CMD ["/bin/bash"]' - "$TAG"
echo "base-image.sh: imported $TAG"
