#!/usr/bin/env bash
# Base images made here, for a Docker engine that reaches no image registry:
#   bash scripts/base-image.sh            cocoon-base:bookworm      Debian 12 + Python 3.11
#   bash scripts/base-image.sh services   cocoon-services:bookworm  the base + Redis + PostgreSQL
#                                         (what .ci/compose runs in place of the redis and
#                                         postgres images of Docker Hub)
# Prints the image's name. An image already in the engine is used as it is; otherwise the root
# file system is made with debootstrap from Debian's packages (needs root and the network, not
# the engine's), kept as a tarball in $COCOON_CACHE/images (default ~/.cache/cocoon), and
# loaded with `docker import`. Delete the tarball and the image to make it anew.
# Pass the result to the Dockerfiles: docker build --build-arg BASE_IMAGE=cocoon-base:bookworm
set -euo pipefail
kind="${1:-base}"
cache="${COCOON_CACHE:-$HOME/.cache/cocoon}/images"
mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
case "$kind" in
    base) image=cocoon-base:bookworm ;;
    services) image=cocoon-services:bookworm ;;
    *) echo "usage: $0 [base|services]" >&2; exit 2 ;;
esac
if docker image inspect "$image" >/dev/null 2>&1; then
    echo "$image"
    exit 0
fi
mkdir -p "$cache"
tarball="$cache/$kind.tar"
# The base: Python 3.11 with venv (the images install into /opt/venv, Debian's Python stays
# as it is), libgomp for llama.cpp's threads, tzdata for the logs' times. No compiler.
base_packages=python3,python3-venv,libgomp1,tzdata,ca-certificates
services_packages="redis-server postgresql-15"

if [ ! -s "$tarball" ]; then
    work="$(mktemp -d "$cache/rootfs.XXXXXX")"
    cleanup() {
        umount "$work/proc" 2>/dev/null || true
        rm -rf "$work"
    }
    trap cleanup EXIT
    log="$cache/$kind.log"
    if [ "$kind" = base ]; then
        command -v debootstrap >/dev/null || {
            echo "debootstrap is missing: apt-get install debootstrap" >&2; exit 1; }
        echo "debootstrap bookworm into $work" >&2
        debootstrap --variant=minbase --include="$base_packages" bookworm "$work" "$mirror" \
            >"$log" 2>&1 || { tail -n 30 "$log" >&2; exit 1; }
        # What Debian's images do: no service starts inside a build, no docs, no man pages.
        printf '#!/bin/sh\nexit 101\n' >"$work/usr/sbin/policy-rc.d"
        chmod 755 "$work/usr/sbin/policy-rc.d"
        printf '%s\n' 'path-exclude /usr/share/doc/*' 'path-exclude /usr/share/man/*' \
            'path-exclude /usr/share/locale/*' 'path-include /usr/share/locale/locale.alias' \
            >"$work/etc/dpkg/dpkg.cfg.d/01-slim"
        printf 'deb %s bookworm main\ndeb %s bookworm-updates main\n' "$mirror" "$mirror" \
            >"$work/etc/apt/sources.list"
    else
        # The base's root file system, and Debian's Redis and PostgreSQL installed into it.
        base_image="$(bash "$0" base)"
        if [ -s "$cache/base.tar" ]; then
            tar -C "$work" -xf "$cache/base.tar"
        else  # the image without its tarball (a cache cleared by hand): its file system
            container="$(docker create "$base_image")"
            docker export "$container" | tar -C "$work" -xf -
            docker rm "$container" >/dev/null
        fi
        mkdir -p "$work/etc/postgresql-common/createcluster.d"
        echo "create_main_cluster = false" >"$work/etc/postgresql-common/createcluster.d/ci.conf"
        cp /etc/resolv.conf "$work/etc/resolv.conf"
        mount -t proc proc "$work/proc"
        { chroot "$work" apt-get update -qq \
            && DEBIAN_FRONTEND=noninteractive chroot "$work" apt-get install -y -qq \
                --no-install-recommends $services_packages; } >"$log" 2>&1 \
            || { tail -n 30 "$log" >&2; exit 1; }
        umount "$work/proc"
        : >"$work/etc/resolv.conf"
    fi
    chroot "$work" apt-get clean
    rm -rf "$work"/var/lib/apt/lists/* "$work"/usr/share/doc/* "$work"/usr/share/man/* \
        "$work"/var/log/*.log "$work"/var/cache/debconf/*-old "$work"/tmp/*
    tar -C "$work" --numeric-owner -cf "$tarball.part" .
    mv "$tarball.part" "$tarball"
    cleanup
    trap - EXIT
fi
docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["/bin/bash"]' \
    "$tarball" "$image" >/dev/null
echo "$image"
