#!/usr/bin/env bash
# Make every image docker-compose.yml and the Dockerfile name, without a container registry.
#
# For each image: keep it if it exists (never replaced, so a real image or an earlier build
# stays), else pull it, else build a stand-in from Debian packages (tests/containers/<name>/)
# on a base image made here with debootstrap from the mirror apt is configured with. Images
# stay in the engine, so a later run on the same machine builds nothing.
#
#   tests/containers/images.sh        # as root, with dockerd running and debootstrap installed
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
export DOCKER_BUILDKIT=0  # the stand-ins need no BuildKit feature, and buildx may be missing

BASE=increment-service-standin/debian:bookworm

log() { printf '==> %s\n' "$*"; }
have() { docker image inspect "$1" >/dev/null 2>&1; }
root=""
trap '[ -z "$root" ] || rm -rf "$root" "$root.log"' EXIT

# The mirror the host's apt uses for bookworm (the stand-ins' apt uses it too).
mirror() {
    apt-get indextargets --format '$(REPO_URI)' 'Codename: bookworm' 'Identifier: Packages' \
        | grep -v -- -security | head -n1
}

base_image() {
    have "$BASE" && return
    local mirror_uri
    root="$(mktemp -d /var/tmp/increment-rootfs.XXXXXX)"
    mirror_uri="$(mirror)"
    log "debootstrap bookworm from $mirror_uri"
    debootstrap --variant=minbase bookworm "$root" "$mirror_uri" >"$root.log" 2>&1 \
        || { tail -n 30 "$root.log"; exit 1; }
    rm -f "$root.log"
    # Debian's Docker images do the same: no services started by package scripts, no caches.
    printf '#!/bin/sh\nexit 101\n' >"$root/usr/sbin/policy-rc.d"
    chmod 755 "$root/usr/sbin/policy-rc.d"
    # The mirror may serve a frozen snapshot whose Release files have passed their Valid-Until.
    printf '%s\n' 'APT::Install-Recommends "false";' 'APT::Install-Suggests "false";' \
        'Acquire::Check-Valid-Until "false";' >"$root/etc/apt/apt.conf.d/90standin"
    # testing, at a low priority: only what a stand-in asks for with -t testing comes from it.
    printf 'deb %s testing main\n' "$mirror_uri" >"$root/etc/apt/sources.list.d/testing.list"
    printf 'Package: *\nPin: release a=testing\nPin-Priority: 100\n' \
        >"$root/etc/apt/preferences.d/testing"
    # The CAs this machine trusts, so that pip in an image build reaches PyPI through whatever
    # this machine's network does to TLS. Copied at build time, never committed.
    mkdir -p "$root/etc/ssl"
    cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/host-ca-certificates.crt"
    rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/archives/*.deb
    log "importing $BASE"
    tar -C "$root" -c . | docker import --change 'CMD ["bash"]' \
        --change 'ENV LANG=C.UTF-8' - "$BASE" >/dev/null
    rm -rf "$root"
    root=""
}

# image, then the stand-in directory under tests/containers/
images=(
    "python:3.11-slim python"
    "postgres:16-alpine postgres"
    "redis:7-alpine redis"
    "nginx:1.27.5-alpine nginx"
    "prom/prometheus:v3.5.0 prometheus"
)
for entry in "${images[@]}"; do
    read -r image dir <<<"$entry"
    if have "$image"; then
        log "$image: present"
        continue
    fi
    if timeout 120 docker pull -q "$image" >/dev/null 2>&1; then
        log "$image: pulled"
        continue
    fi
    base_image
    log "$image: building a stand-in from Debian packages (tests/containers/$dir)"
    started=$SECONDS
    out="$(mktemp)"
    docker build --force-rm --build-arg "BASE=$BASE" -t "$image" "$here/$dir" >"$out" 2>&1 \
        || { tail -n 40 "$out"; rm -f "$out"; exit 1; }
    rm -f "$out"
    log "$image: built in $((SECONDS - started)) s"
done
