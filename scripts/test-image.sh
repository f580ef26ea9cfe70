#!/usr/bin/env bash
# Builds the local Docker images used by the container tests, from Debian packages only (no
# image registry is needed), idempotently:
#   apisix-profiler-test/nginx-lua:bookworm  debootstrap minbase + nginx, ngx_lua,
#                                            lua-resty-core/lrucache, libluajit2, procps
#                                            (CMD nginx -g 'daemon off;')
#   apisix-profiler-test/debian:bookworm     the same root file system with CMD bash, a base
#                                            for Dockerfiles (--build-arg BASE_IMAGE=...)
# The root file system is tarred to /var/cache/apisix-profiler/ (with debootstrap's .deb
# cache) so that a rerun only has to `docker import`; if both images exist nothing is done.
# The Debian mirror is the one apt on this machine uses. The image's apt sources are the
# host's Debian sources (bookworm, -updates, -security), like the official debian image.
# Needs a running daemon (scripts/docker-up.sh). FORCE=1 rebuilds from scratch.
set -euo pipefail

log() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }
die() { printf 'test-image: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "must run as root"

SUITE=bookworm
IMAGE_LUA="apisix-profiler-test/nginx-lua:$SUITE"
IMAGE_BASE="apisix-profiler-test/debian:$SUITE"
CACHE=/var/cache/apisix-profiler
TARBALL="$CACHE/rootfs-nginx-lua-$SUITE.tar"
DEB_CACHE="$CACHE/debootstrap-debs-$SUITE"
PACKAGES=nginx,libnginx-mod-http-lua,lua-resty-core,lua-resty-lrucache,libluajit2-5.1-2,procps

command -v docker >/dev/null || die "docker not found; run scripts/docker-up.sh"
docker info >/dev/null 2>&1 || die "no docker daemon answers; run scripts/docker-up.sh"

have_image() { docker image inspect "$1" >/dev/null 2>&1; }

if [ "${FORCE:-0}" = 1 ]; then
    log "FORCE=1: removing cached tarball and images"
    rm -f "$TARBALL"
    docker image rm -f "$IMAGE_LUA" "$IMAGE_BASE" >/dev/null 2>&1 || true
fi
if have_image "$IMAGE_LUA" && have_image "$IMAGE_BASE"; then
    log "$IMAGE_LUA and $IMAGE_BASE already exist (FORCE=1 to rebuild)"
    exit 0
fi

# The first Debian "deb" mirror apt uses for $SUITE (deb822 .sources or one-line lists).
apt_mirror() {
    local f
    for f in /etc/apt/sources.list.d/*.sources; do
        [ -f "$f" ] || continue
        awk -v suite="$SUITE" '
            function flush() {
                if (types ~ /(^|[ \t])deb([ \t]|$)/ && (" " suites " ") ~ (" " suite " ") && uris != "") {
                    split(uris, u, /[ \t]+/); print u[1]; found = 1; exit
                }
                types = suites = uris = ""
            }
            /^[ \t]*#/ { next }
            /^[ \t]*$/ { flush(); next }
            /^Types:/  { sub(/^Types:[ \t]*/, "");  types = $0 }
            /^Suites:/ { sub(/^Suites:[ \t]*/, ""); suites = $0 }
            /^URIs:/   { sub(/^URIs:[ \t]*/, "");   uris = $0 }
            END { if (!found) flush() }
        ' "$f"
    done
    { cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null || true; } \
        | sed -E 's/\[[^]]*\]//' \
        | awk -v suite="$SUITE" '$1 == "deb" && $3 == suite { print $2 }'
    return 0
}

if [ ! -s "$TARBALL" ]; then
    MIRROR="${DEBIAN_MIRROR:-$(apt_mirror | sed -n 1p)}"
    [ -n "$MIRROR" ] || die "no Debian mirror for $SUITE found in /etc/apt/sources.list(.d); set DEBIAN_MIRROR"
    if ! command -v debootstrap >/dev/null; then
        log "apt-get install debootstrap"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null
    fi
    mkdir -p "$CACHE" "$DEB_CACHE"
    ROOTFS="$(mktemp -d "$CACHE/rootfs.XXXXXX")"
    cleanup() {
        # debootstrap mounts proc/sys inside the chroot; never let rm walk into a mount.
        grep -o " $ROOTFS/[^ ]*" /proc/mounts | sort -r | xargs -r -n1 umount -l 2>/dev/null || true
        rm -rf --one-file-system "$ROOTFS" "$TARBALL.tmp"
    }
    trap cleanup EXIT
    keyring=()
    [ -f /usr/share/keyrings/debian-archive-keyring.gpg ] \
        && keyring=(--keyring=/usr/share/keyrings/debian-archive-keyring.gpg)
    log "debootstrap --variant=minbase $SUITE from $MIRROR (log: $CACHE/debootstrap.log)"
    start=$SECONDS
    if ! debootstrap --variant=minbase "${keyring[@]}" --cache-dir="$DEB_CACHE" \
        --include="$PACKAGES" "$SUITE" "$ROOTFS" "$MIRROR" >"$CACHE/debootstrap.log" 2>&1; then
        tail -n 30 "$CACHE/debootstrap.log" >&2
        die "debootstrap failed; see $CACHE/debootstrap.log"
    fi
    log "debootstrap done in $((SECONDS - start))s"

    # apt sources like the official image: the host's Debian sources, binary packages only.
    if [ -f /etc/apt/sources.list.d/debian.sources ]; then
        sed 's/^Types:.*/Types: deb/' /etc/apt/sources.list.d/debian.sources \
            >"$ROOTFS/etc/apt/sources.list.d/debian.sources"
        : >"$ROOTFS/etc/apt/sources.list"
    fi
    # The packaged default site listens on port 80; with --network host that is the host's
    # port 80. Tests always pass their own configuration.
    rm -f "$ROOTFS/etc/nginx/sites-enabled/default"
    rm -rf "$ROOTFS"/var/cache/apt/archives/*.deb "$ROOTFS"/var/lib/apt/lists/* \
        "$ROOTFS"/var/log/*.log "$ROOTFS"/tmp/* "$ROOTFS"/run/*
    # Leftovers of the host's name resolution / identity must not end up in the image
    # (docker bind-mounts its own resolv.conf, hosts and hostname).
    : >"$ROOTFS/etc/resolv.conf"
    echo localhost >"$ROOTFS/etc/hostname"

    log "tar root file system -> $TARBALL"
    tar --numeric-owner --xattrs -C "$ROOTFS" -cf "$TARBALL.tmp" .
    mv "$TARBALL.tmp" "$TARBALL"
    cleanup
    trap - EXIT
    log "tarball $(du -h "$TARBALL" | cut -f1)"
else
    log "using cached $TARBALL"
fi

common=(--change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin'
        --change 'ENV LANG=C.UTF-8')
if ! have_image "$IMAGE_BASE"; then
    log "docker import -> $IMAGE_BASE"
    docker import "${common[@]}" --change 'CMD ["bash"]' \
        --message "debootstrap minbase $SUITE + $PACKAGES" "$TARBALL" "$IMAGE_BASE" >/dev/null
fi
if ! have_image "$IMAGE_LUA"; then
    log "docker import -> $IMAGE_LUA"
    docker import "${common[@]}" \
        --change 'CMD ["nginx", "-g", "daemon off;"]' \
        --message "debootstrap minbase $SUITE + $PACKAGES" "$TARBALL" "$IMAGE_LUA" >/dev/null
fi
docker image ls --format '{{.Repository}}:{{.Tag}}  {{.ID}}  {{.Size}}' \
    | grep -F -e "$IMAGE_LUA" -e "$IMAGE_BASE" >&2
