#!/usr/bin/env bash
# Installs what building and running apisix-agent needs on Debian 12, idempotently: apt
# packages (LLVM 22 for bpf-linker, compilers, nginx + ngx_lua and wrk for the quickstart
# demo), the pinned nightly toolchain of apisix-ebpf/rust-toolchain.toml with rust-src (the
# BPF programs are built with -Z build-std), and bpf-linker 0.13.0 against LLVM 22.1.8: the
# same commit builds the same BPF object everywhere. What only the test suite needs is in
# scripts/setup-test.sh. Safe to run again: finished steps are skipped.
set -euo pipefail

log() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }
# shellcheck source=scripts/lib.sh
. "$(dirname "$0")/lib.sh"

if [ "$(id -u)" -ne 0 ]; then
    echo "setup.sh installs packages and must run as root" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
export PATH="$HOME/.cargo/bin:$PATH"

APT_PACKAGES=(
    build-essential pkg-config curl ca-certificates
    llvm-22-dev libpolly-22-dev libzstd-dev zlib1g-dev
    nginx libnginx-mod-http-lua lua-resty-core lua-resty-lrucache libluajit2-5.1-2
    dpkg-dev procps util-linux wrk
)
apt_ensure "${APT_PACKAGES[@]}"
# The packaged nginx starts a system instance on port 80; the tools never need it.
if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet nginx 2>/dev/null; then
    systemctl stop nginx || true
fi

if ! command -v rustup >/dev/null 2>&1; then
    echo "rustup is required (https://rustup.rs); install it and run this again" >&2
    exit 1
fi
# The BPF toolchain: the exact nightly the programs are built and verified with.
NIGHTLY="$(sed -n 's/^channel *= *"\(.*\)"/\1/p' "$(dirname "$0")/../apisix-ebpf/rust-toolchain.toml")"
[ -n "$NIGHTLY" ] || { echo "no channel in apisix-ebpf/rust-toolchain.toml" >&2; exit 1; }
if ! rustup toolchain list | grep -q "^$NIGHTLY"; then
    log "rustup toolchain install $NIGHTLY"
    rustup toolchain install "$NIGHTLY" --profile minimal
fi
for c in rust-src clippy rustfmt; do
    if ! rustup component list --toolchain "$NIGHTLY" --installed | grep -q "^$c"; then
        log "rustup component add $c --toolchain $NIGHTLY"
        rustup component add "$c" --toolchain "$NIGHTLY"
    fi
done
for c in rustfmt clippy; do
    if ! rustup component list --installed | grep -q "^$c"; then
        rustup component add "$c"
    fi
done
# bpf-linker links with the system's LLVM 22: the version it is built against is checked.
LLVM_VERSION="22.1.8"
if [ "$(/usr/lib/llvm-22/bin/llvm-config --version)" != "$LLVM_VERSION" ]; then
    echo "warning: LLVM $(/usr/lib/llvm-22/bin/llvm-config --version) installed, the build is pinned to $LLVM_VERSION: the BPF object may differ" >&2
fi
if ! command -v bpf-linker >/dev/null 2>&1 || ! bpf-linker --version 2>/dev/null | grep -q '0\.13\.0'; then
    log "cargo install bpf-linker 0.13.0 (LLVM 22)"
    LLVM_PREFIX=/usr/lib/llvm-22 cargo install bpf-linker --version 0.13.0 --locked \
        --no-default-features --features llvm-22
fi

log "setup done (runtime; scripts/setup-test.sh adds the test tools)"
