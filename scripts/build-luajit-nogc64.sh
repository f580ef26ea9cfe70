#!/usr/bin/env bash
# Builds Debian's own luajit2 source package with 32-bit GC references
# (-DLUAJIT_DISABLE_GC64) for the non-GC64 tests. Idempotent: an existing build is reused.
# Prints the directory holding lib/libluajit-5.1.so.2 on its last line.
set -euo pipefail
DIR="${LUAJIT_NOGC64_DIR:-/var/cache/apisix-profiler/luajit-nogc64}"
if [ -f "$DIR/lib/libluajit-5.1.so.2" ]; then
    echo "$DIR"
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
if ! grep -rqs '^Types:.*deb-src' /etc/apt/sources.list.d/ && ! grep -qs '^deb-src' /etc/apt/sources.list; then
    sed 's/^Types: deb$/Types: deb-src/' /etc/apt/sources.list.d/debian.sources \
        > /etc/apt/sources.list.d/debian-src.sources
    apt-get update -qq
fi
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
( cd "$work" && apt-get source -qq luajit2 >/dev/null 2>&1 )
src="$(find "$work" -maxdepth 1 -type d -name 'luajit2-*' | head -n 1)"
[ -n "$src" ] || { echo "apt-get source luajit2 failed" >&2; exit 1; }
make -C "$src" -j"$(nproc)" XCFLAGS=-DLUAJIT_DISABLE_GC64 >"$work/build.log" 2>&1 \
    || { tail -n 30 "$work/build.log" >&2; exit 1; }
mkdir -p "$DIR/lib" "$DIR/bin"
cp "$src/src/libluajit.so" "$DIR/lib/libluajit-5.1.so.2"
cp "$src/src/luajit" "$DIR/bin/luajit"
if [ "$(LD_LIBRARY_PATH="$DIR/lib" "$DIR/bin/luajit" -e 'print(require("ffi").abi("gc64"))')" != "false" ]; then
    echo "the build in $DIR is not non-GC64" >&2
    exit 1
fi
echo "$DIR"
