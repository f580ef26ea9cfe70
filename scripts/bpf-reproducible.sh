#!/usr/bin/env bash
# Checks that the BPF object is reproducible: two clean builds of the committed HEAD, from
# clones at two different paths with two fresh target directories, must give byte-identical
# objects (the pinned nightly of apisix-ebpf/rust-toolchain.toml, bpf-linker 0.13.0, and
# paths remapped by apisix-agent/build.rs). Prints both SHA-256 sums; exits 1 if they differ.
# `cargo check` runs the build script (which builds the object) without compiling the agent.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
sums=()
for name in first second-build; do
    dir="$work/$name/apisix-agent"
    git clone -q --no-hardlinks . "$dir"
    echo "==> clean build in $dir" >&2
    started=$SECONDS
    (cd "$dir" && CARGO_TARGET_DIR="$work/$name/target" cargo check -q --release -p apisix-agent --lib)
    obj="$(find "$work/$name/target/release/build" -path '*apisix-agent-*/out/apisix-ebpf' -type f | head -n 1)"
    [ -s "$obj" ] || { echo "no BPF object built in $work/$name" >&2; exit 1; }
    sum="$(sha256sum "$obj" | cut -d' ' -f1)"
    echo "    $sum ($(stat -c %s "$obj") bytes, $((SECONDS - started)) s)" >&2
    sums+=("$sum")
done
if [ "${sums[0]}" != "${sums[1]}" ]; then
    echo "FAIL: the two clean builds differ: ${sums[0]} vs ${sums[1]}" >&2
    exit 1
fi
echo "ok: the BPF object is reproducible (sha256 ${sums[0]})"
