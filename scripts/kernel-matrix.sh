#!/usr/bin/env bash
# The kernel matrix: boots Debian's cloud kernels (5.10 bullseye, 6.1 bookworm, 6.12 trixie;
# optionally the host's own) under QEMU with one initramfs made from this host's files
# (busybox, bash, curl, jq, nginx + ngx_lua, Debian's GC64 LuaJIT and the non-GC64 build, wrk, the
# agent), runs scripts/kernel-matrix/checks.sh in each guest against real nginx workers on
# 127.0.0.1 (the guests have no network device), and prints a kernel × check table, also
# written to target/kernel-matrix/matrix.md with each kernel's result files beside it.
# Exits non-zero when a check failed on a kernel (KERNEL_MATRIX_ALLOW_FAIL=1: a warning).
# A guest that hangs (soft lockups on its console) or times out before reporting every check
# boots once more for the checks it did not report; their reasons in the matrix say so.
#
# Kernels are fetched with `apt-get download` through a private apt configuration (the
# host's sources and lists are not touched) and unpacked with `dpkg-deb -x` into a cache
# that later runs reuse. Must run as root (it installs packages and builds the initramfs
# with device nodes).
#
# Environment:
#   KERNELS                   which kernels, default "5.10 6.1 6.12"; also "host" (the
#                             running kernel, when /boot has its vmlinuz) or a package name
#                             such as linux-image-6.1.0-57-cloud-amd64
#   AGENT                     the agent binary (default target/release/apisix-agent, built
#                             with cargo build --release when missing)
#   KERNEL_CACHE              kernel cache, default /var/cache/apisix-profiler/kernels
#   KERNEL_MATRIX_OUT         results, default target/kernel-matrix
#   KERNEL_MATRIX_TIMEOUT     seconds a guest may run before it is killed, default 600
#   KERNEL_MATRIX_DURATION    seconds per recording in the guest, default 4
#   KERNEL_MATRIX_CHECK_TIMEOUT  seconds one agent command may take in the guest, default 120
#   KERNEL_MATRIX_CHECKS      which checks, default all: budgets cpu-gc64 cpu-nogc64
#                             offcpu alloc live daemon loopcost
#   KERNEL_MATRIX_REFRESH=1   refresh the private apt lists now (else when older than a day)
#   KERNEL_MATRIX_ALLOW_FAIL=1  failed checks only warn (exit 0), for development
#   KERNEL_MATRIX_VERBOSE=1   show each guest's whole console, not only its result lines
#   KERNEL_MATRIX_LOGLEVEL    the guests' console log level, default 3 (7: backtraces of
#                             soft lockups and warnings, with KERNEL_MATRIX_VERBOSE=1)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
export PATH="$HOME/.cargo/bin:$PATH"
# shellcheck source=scripts/lib.sh
. scripts/lib.sh

KERNELS="${KERNELS:-5.10 6.1 6.12}"
CACHE="${KERNEL_CACHE:-/var/cache/apisix-profiler/kernels}"
OUT="${KERNEL_MATRIX_OUT:-$ROOT/target/kernel-matrix}"
TIMEOUT="${KERNEL_MATRIX_TIMEOUT:-600}"
DURATION="${KERNEL_MATRIX_DURATION:-4}"
CHECK_TIMEOUT="${KERNEL_MATRIX_CHECK_TIMEOUT:-120}"
CHECKS="${KERNEL_MATRIX_CHECKS:-budgets cpu-gc64 cpu-nogc64 offcpu alloc live daemon loopcost}"
CHECKS="${CHECKS//,/ }"
ALLOW_FAIL="${KERNEL_MATRIX_ALLOW_FAIL:-0}"
VERBOSE="${KERNEL_MATRIX_VERBOSE:-0}"
HERE="$ROOT/scripts/kernel-matrix"
# Soft lockups on a guest's console that mean it hung (each CPU reports one every ~25 s).
HUNG_LOCKUPS=6
START="$(date +%s)"

log() {
    printf '\033[1m[kernel-matrix %4ds]\033[0m %s\n' "$(($(date +%s) - START))" "$*" >&2
}
die() {
    log "error: $*"
    exit 1
}

if [ "$(id -u)" -ne 0 ]; then
    echo "the kernel matrix installs packages and builds an initramfs with device nodes: run it as root (sudo $0)" >&2
    exit 1
fi

# ---------------------------------------------------------------------------------------
# What it needs
# ---------------------------------------------------------------------------------------
log "installing what is missing (Debian packages)"
apt_ensure --quiet-services qemu-system-x86 busybox-static cpio debian-archive-keyring \
    nginx libnginx-mod-http-lua lua-resty-core lua-resty-lrucache libluajit2-5.1-2 wrk curl jq \
    gcc libc6-dev
log "non-GC64 LuaJIT (scripts/build-luajit-nogc64.sh)"
NOGC64_DIR="$(./scripts/build-luajit-nogc64.sh | tail -n 1)"
[ -f "$NOGC64_DIR/lib/libluajit-5.1.so.2" ] || die "no non-GC64 LuaJIT in $NOGC64_DIR"

if [ -z "${AGENT:-}" ]; then
    AGENT="$ROOT/target/release/apisix-agent"
    if [ ! -x "$AGENT" ]; then
        log "building the agent (cargo build --release)"
        cargo build --release
    fi
fi
[ -x "$AGENT" ] || die "no agent binary at $AGENT"
AGENT="$(readlink -f "$AGENT")"
# What the guests run (the file may be rebuilt while they do).
AGENT_INFO="\`$AGENT\` ($(date -u -r "$AGENT" '+built %Y-%m-%d %H:%M:%S UTC'), sha256 $(sha256sum "$AGENT" | cut -c1-12))"
log "agent: $AGENT_INFO"

# ---------------------------------------------------------------------------------------
# Kernels: Debian's cloud images, through a private apt configuration
# ---------------------------------------------------------------------------------------
APTD="$CACHE/apt"
KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg
APT_OPTS=(
    -o "Dir::Etc::sourcelist=$APTD/sources.list" -o "Dir::Etc::sourceparts=-"
    -o "Dir::State::Lists=$APTD/lists" -o "Dir::Cache=$APTD/cache"
    -o "Acquire::Languages=none"
)
APT_READY=""

# apt_private_ready: the private lists, refreshed when older than a day. Returns 1 when
# there are none (offline and never fetched).
apt_private_ready() {
    [ -z "$APT_READY" ] || return "$APT_READY"
    mkdir -p "$APTD/lists/partial" "$APTD/cache/archives/partial"
    cat >"$APTD/sources.list" <<EOF
deb [signed-by=$KEYRING] http://deb.debian.org/debian bullseye main
deb [signed-by=$KEYRING] http://deb.debian.org/debian-security bullseye-security main
deb [signed-by=$KEYRING] http://deb.debian.org/debian bookworm main
deb [signed-by=$KEYRING] http://deb.debian.org/debian-security bookworm-security main
deb [signed-by=$KEYRING] http://deb.debian.org/debian trixie main
deb [signed-by=$KEYRING] http://deb.debian.org/debian-security trixie-security main
EOF
    if [ "${KERNEL_MATRIX_REFRESH:-0}" = 1 ] || [ ! -f "$APTD/updated" ] \
        || [ -n "$(find "$APTD/updated" -mmin +1440)" ]; then
        log "apt-get update (private lists in $APTD: bullseye, bookworm, trixie)"
        if apt-get "${APT_OPTS[@]}" -qq update >"$APTD/update.log" 2>&1; then
            touch "$APTD/updated"
        else
            log "warning: apt-get update failed ($(tail -n 1 "$APTD/update.log")); using what is cached"
        fi
    fi
    if compgen -G "$APTD/lists/*_Packages*" >/dev/null; then
        APT_READY=0
    else
        APT_READY=1
    fi
    return "$APT_READY"
}

# pattern SERIES: the package names of a kernel series, as an extended regex.
pattern() {
    case "$1" in
        5.10) echo '^linux-image-5\.10\.0-[0-9]+-cloud-amd64$' ;;
        6.1) echo '^linux-image-6\.1\.0-[0-9]+-cloud-amd64$' ;;
        6.12) echo '^linux-image-6\.12\.[0-9]+\+deb13(\.[0-9]+)?-cloud-amd64$' ;;
        linux-image-*) printf '^%s$\n' "${1//./\\.}" ;;
        *) return 1 ;;
    esac
}

# fetch_kernel SERIES: prints the cache directory holding the newest kernel of SERIES
# (vmlinuz, config, package), fetching and unpacking it when it is not cached.
fetch_kernel() {
    local series=$1 re name="" dir tmp deb
    re="$(pattern "$series")" || { log "unknown kernel '$series' (5.10, 6.1, 6.12, host or a linux-image-* package)"; return 1; }
    if apt_private_ready; then
        name="$(apt-cache "${APT_OPTS[@]}" search --names-only "$re" 2>/dev/null \
            | awk '{print $1}' | grep -E "$re" | sort -V | tail -n 1 || true)"
    fi
    if [ -z "$name" ]; then
        # Offline: the newest one cached.
        name="$(find "$CACHE" -mindepth 1 -maxdepth 1 -type d -printf '%f\n' 2>/dev/null \
            | grep -E "$re" | sort -V | tail -n 1 || true)"
        [ -n "$name" ] || { log "$series: no package found (apt lists: $APTD)"; return 1; }
        log "$series: apt found nothing, using the cached $name"
    fi
    dir="$CACHE/$name"
    if [ -f "$dir/vmlinuz" ]; then
        log "$series: $name (cached)"
        echo "$dir"
        return 0
    fi
    log "$series: fetching $name (apt-get download)"
    tmp="$(mktemp -d "$CACHE/.fetch.XXXXXX")"
    if ! (cd "$tmp" && apt-get "${APT_OPTS[@]}" -qq download "$name" >download.log 2>&1); then
        log "$series: apt-get download $name failed: $(tail -n 1 "$tmp/download.log")"
        rm -rf "$tmp"
        return 1
    fi
    deb="$(find "$tmp" -maxdepth 1 -name '*.deb' | head -n 1)"
    dpkg-deb -x "$deb" "$tmp/x"
    mkdir -p "$tmp/k"
    cp "$tmp"/x/boot/vmlinuz-* "$tmp/k/vmlinuz"
    cp "$tmp"/x/boot/config-* "$tmp/k/config" 2>/dev/null || true
    printf '%s %s\n' "$name" "$(dpkg-deb -f "$deb" Version)" >"$tmp/k/package"
    rm -rf "$dir"
    mv "$tmp/k" "$dir"
    rm -rf "$tmp"
    echo "$dir"
}

# host_kernel: prints a directory with the running kernel's vmlinuz, when /boot has it.
host_kernel() {
    local r v
    r="$(uname -r)"
    v="/boot/vmlinuz-$r"
    [ -r "$v" ] || { log "host: no $v, the host's kernel is skipped"; return 1; }
    mkdir -p "$CACHE/host-$r"
    cp -u "$v" "$CACHE/host-$r/vmlinuz"
    [ ! -r "/boot/config-$r" ] || cp -u "/boot/config-$r" "$CACHE/host-$r/config"
    echo "host $r" >"$CACHE/host-$r/package"
    echo "$CACHE/host-$r"
}

mkdir -p "$CACHE" "$OUT"
declare -A KDIR=()
SELECTED=()
for k in $KERNELS; do
    SELECTED+=("$k")
    rm -rf "${OUT:?}/$k"
    d=""
    if [ "$k" = host ]; then
        d="$(host_kernel)" || true
    else
        d="$(fetch_kernel "$k")" || true
    fi
    KDIR[$k]="$d"
done

# ---------------------------------------------------------------------------------------
# The initramfs: one for every kernel, from this host's files
# ---------------------------------------------------------------------------------------
log "building the initramfs"
STAGE="$OUT/initramfs.d"
rm -rf "$STAGE"
mkdir -p "$STAGE"/usr/{bin,sbin,lib,lib64,local/bin} "$STAGE"/{proc,sys,dev,tmp,run,root,etc,results}
mkdir -p "$STAGE"/var/{log/nginx,lib/nginx,tmp} "$STAGE"/kmx/lua "$STAGE"/opt/luajit-nogc64/lib
for l in bin sbin lib lib64; do
    ln -s "usr/$l" "$STAGE/$l"
done
chmod 1777 "$STAGE/tmp" "$STAGE/var/tmp"
mknod -m 600 "$STAGE/dev/console" c 5 1
mknod -m 666 "$STAGE/dev/null" c 1 3

# put SRC [DEST]: copies a file (symlinks followed) to DEST (default: the same path).
put() {
    local dest="$STAGE${2:-$1}"
    mkdir -p "$(dirname "$dest")"
    cp -L "$1" "$dest"
}

# put_elf SRC [DEST]: a program or library and every shared library ldd finds for it.
put_elf() {
    put "$@"
    local lib
    while read -r lib; do
        [ -e "$STAGE$lib" ] || put "$lib"
    done < <(ldd "$1" 2>/dev/null | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}')
}

put /usr/bin/busybox
put_elf /usr/bin/bash
put_elf /usr/sbin/nginx
put_elf /usr/lib/nginx/modules/ndk_http_module.so
put_elf /usr/lib/nginx/modules/ngx_http_lua_module.so
put_elf /usr/bin/wrk
gcc -O2 -o "$OUT/epoll-loop" "$ROOT/bench/epoll_loop.c"
put_elf "$OUT/epoll-loop" /kmx/epoll-loop
put_elf /usr/bin/curl
put_elf /usr/bin/jq
put_elf "$AGENT" /usr/local/bin/apisix-agent
put_elf "$NOGC64_DIR/lib/libluajit-5.1.so.2" /opt/luajit-nogc64/lib/libluajit-5.1.so.2
while read -r f; do
    [ -f "$f" ] && put "$f"
done < <(dpkg -L lua-resty-core lua-resty-lrucache | grep '^/usr/share/lua/')
put "$HERE/init" /init
put "$HERE/checks.sh" /kmx/checks.sh
put "$HERE/kmx.lua" /kmx/lua/kmx.lua
chmod 755 "$STAGE/init"
printf 'root:x:0:0:root:/root:/usr/bin/bash\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n' >"$STAGE/etc/passwd"
printf 'root:x:0:\nnogroup:x:65534:\n' >"$STAGE/etc/group"
printf 'passwd: files\ngroup: files\nhosts: files\n' >"$STAGE/etc/nsswitch.conf"
printf '127.0.0.1 localhost kmx-guest\n' >"$STAGE/etc/hosts"
INITRAMFS="$OUT/initramfs.cpio"
(cd "$STAGE" && find . -print0 | cpio --null -o -H newc --quiet) >"$INITRAMFS"
rm -rf "$STAGE"
log "initramfs: $INITRAMFS ($(($(stat -c %s "$INITRAMFS") / 1048576)) MiB)"

# ---------------------------------------------------------------------------------------
# Booting each kernel
# ---------------------------------------------------------------------------------------
if [ -e /sys/module/kvm_intel ] || [ -e /sys/module/kvm_amd ]; then
    ACCEL=(-accel kvm -cpu host)
else
    ACCEL=(-accel "tcg,thread=multi" -cpu max)
fi
declare -A STATUS=() REASON=() KVER=() KTIME=()

# boot SERIES DIR [CHECKS]: boots one kernel for CHECKS (default all) and collects their
# results into $OUT/SERIES. A guest whose console reports soft lockups again and again has
# hung: it is stopped then rather than at the timeout.
boot() {
    local k=$1 kd=$2 dir="$OUT/$1" t0 rc checks="${3:-$CHECKS}"
    rm -rf "$dir"
    mkdir -p "$dir"
    cp "$kd/package" "$dir/package" 2>/dev/null || true
    log "booting $k ($(cut -d' ' -f1 "$kd/package" 2>/dev/null || echo "$kd")) with ${ACCEL[*]}, timeout ${TIMEOUT} s"
    t0="$(date +%s)"
    local filter='^KMX-(KERNEL|RESULT|NOTE|TIME)|Kernel panic|BUG:'
    [ "$VERBOSE" != 1 ] || filter='.'
    set +o errexit +o pipefail
    (
        while sleep 10; do
            if [ "$(grep -c 'soft lockup' "$dir/console.raw" 2>/dev/null)" -ge "$HUNG_LOCKUPS" ]; then
                pkill -f -- "file:$dir/serial1.out"
                break
            fi
        done
    ) &
    local watcher=$!
    timeout -k 10 "$TIMEOUT" qemu-system-x86_64 "${ACCEL[@]}" -m 2G -smp 2 \
        -nographic -monitor none -nic none -no-reboot \
        -kernel "$kd/vmlinuz" -initrd "$INITRAMFS" \
        -append "console=ttyS0 quiet loglevel=${KERNEL_MATRIX_LOGLEVEL:-3} panic=-1 KMX_DURATION=$DURATION KMX_CHECK_TIMEOUT=$CHECK_TIMEOUT KMX_CHECKS=${checks// /,}" \
        -serial stdio -serial "file:$dir/serial1.out" </dev/null 2>&1 \
        | tee "$dir/console.raw" | sed -u 's/\r$//' | grep --line-buffered -aE "$filter" | sed -u "s/^/    [$k] /" >&2
    rc="${PIPESTATUS[0]}"
    kill "$watcher" 2>/dev/null
    wait "$watcher" 2>/dev/null
    set -o errexit -o pipefail
    KTIME[$k]=$(($(date +%s) - t0))
    tr -d '\r' <"$dir/console.raw" >"$dir/console.log"
    rm -f "$dir/console.raw"
    # The guest's result files, from the second serial port.
    if grep -q '^KMX-END-RESULTS' "$dir/serial1.out" 2>/dev/null; then
        tr -d '\r' <"$dir/serial1.out" | sed -n '/^KMX-BEGIN-RESULTS/,/^KMX-END-RESULTS/p' \
            | grep -v '^KMX-' | base64 -d | tar -xzf - -C "$dir" \
            || log "$k: the result files from ttyS1 do not unpack"
    fi
    rm -f "$dir/serial1.out"
    # Fall back on the console's result lines.
    if [ ! -s "$dir/results.tsv" ]; then
        grep '^KMX-RESULT ' "$dir/console.log" \
            | sed -E 's/^KMX-RESULT ([^ ]+) ([^ ]+) (.*)$/\1\t\2\t\3/' >"$dir/results.tsv" || true
    fi
    KVER[$k]="$(grep -o 'KMX-KERNEL .*' "$dir/console.log" | head -n 1 | cut -d' ' -f2)"
    local why="" c st
    local during
    during="$(sed -n 's/^KMX-START //p' "$dir/console.log" | tail -n 1)"
    if [ "$(grep -c 'soft lockup' "$dir/console.log")" -ge "$HUNG_LOCKUPS" ]; then
        why="the guest hung during $during: $(grep -c 'soft lockup' "$dir/console.log") soft lockups, $(grep -m1 'soft lockup' "$dir/console.log" | sed 's/^\[[ 0-9.]*\] //')"
    elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        why="the guest timed out after ${TIMEOUT} s (during $(sed -n 's/^KMX-START //p' "$dir/console.log" | tail -n 1))"
    elif grep -q 'Kernel panic' "$dir/console.log"; then
        why="$(grep -m1 'Kernel panic' "$dir/console.log")"
    elif ! grep -q '^KMX-DONE' "$dir/console.log"; then
        why="the guest stopped early (qemu exit $rc): $(grep -v '^[[:space:]]*$' "$dir/console.log" | tail -n 1)"
    fi
    for c in $checks; do
        st="$(awk -F'\t' -v c="$c" '$1 == c {print $2; exit}' "$dir/results.tsv")"
        if [ -n "$st" ]; then
            STATUS[$k.$c]="$st"
            REASON[$k.$c]="$(awk -F'\t' -v c="$c" '$1 == c {print $3; exit}' "$dir/results.tsv")"
        else
            STATUS[$k.$c]=fail
            REASON[$k.$c]="no result: ${why:-the guest did not report it}"
        fi
    done
    log "$k: done in ${KTIME[$k]} s (qemu exit $rc)"
}

# boot_twice SERIES DIR: boot; when the guest hung, timed out or stopped before reporting
# every check, once more for the checks it did not report (the first boot's files kept in
# $OUT/SERIES/first-boot), their reasons saying why. Guests under TCG have hung (soft
# lockups on both CPUs; 5.10, the offcpu check, once in several runs): the second boot tells
# a hang of the emulation from a check that fails each time.
boot_twice() {
    local k=$1 kd=$2 missing=() c first_time first_why
    boot "$k" "$kd"
    for c in $CHECKS; do
        case "${REASON[$k.$c]}" in "no result: "*) missing+=("$c") ;; esac
    done
    [ "${#missing[@]}" -gt 0 ] || return 0
    first_time=${KTIME[$k]}
    first_why="${REASON[$k.${missing[0]}]#no result: }"
    rm -rf "$OUT/$k.first-boot"
    mv "$OUT/$k" "$OUT/$k.first-boot"
    log "$k: no result for ${missing[*]} ($first_why); booting it once more for them"
    boot "$k" "$kd" "${missing[*]}"
    mv "$OUT/$k.first-boot" "$OUT/$k/first-boot"
    KTIME[$k]=$((KTIME[$k] + first_time))
    for c in "${missing[@]}"; do
        REASON[$k.$c]="${REASON[$k.$c]} (on a second boot; the first gave no result: $first_why)"
    done
}

for k in "${SELECTED[@]}"; do
    if [ -z "${KDIR[$k]}" ]; then
        KTIME[$k]=0
        for c in $CHECKS; do
            if [ "$k" = host ]; then
                STATUS[$k.$c]=skip
                REASON[$k.$c]="no /boot/vmlinuz-$(uname -r) on this host"
            else
                STATUS[$k.$c]=fail
                REASON[$k.$c]="the kernel could not be fetched"
            fi
        done
        continue
    fi
    boot_twice "$k" "${KDIR[$k]}"
done

# ---------------------------------------------------------------------------------------
# The matrix
# ---------------------------------------------------------------------------------------
MD="$OUT/matrix.md"
failed=0
{
    echo "# Kernel matrix"
    echo
    echo "Agent: $AGENT_INFO; run $(date -u -d "@$START" '+%Y-%m-%d %H:%M UTC'), QEMU ${ACCEL[*]}, ${DURATION} s per recording."
    echo
    printf '| kernel |'
    for c in $CHECKS; do printf ' %s |' "$c"; done
    printf ' seconds |\n|---|'
    for c in $CHECKS; do printf -- '---|'; done
    printf -- '---:|\n'
    for k in "${SELECTED[@]}"; do
        printf '| %s |' "$k${KVER[$k]:+ (${KVER[$k]})}"
        for c in $CHECKS; do
            case "${STATUS[$k.$c]}" in
                pass) printf ' pass |' ;;
                skip) printf ' skip |' ;;
                *) printf ' **FAIL** |' ;;
            esac
        done
        printf ' %s |\n' "${KTIME[$k]}"
    done
    echo
    echo "## Reasons"
    echo
    for k in "${SELECTED[@]}"; do
        for c in $CHECKS; do
            secs="$(sed -n "s/^KMX-TIME $c \([0-9]*\) s.*/ (\1 s)/p" "$OUT/$k/console.log" 2>/dev/null | head -n 1)"
            printf -- '- %s %s: %s%s — %s\n' "$k" "$c" "${STATUS[$k.$c]}" "$secs" "${REASON[$k.$c]}"
        done
    done
    # The verifier's figures per program, from each guest's check-kernel JSON.
    if compgen -G "$OUT/*/check-kernel.json" >/dev/null && command -v jq >/dev/null; then
        echo
        echo "## Verifier figures (check-kernel)"
        echo
        echo "| kernel | program | loaded | insns processed | stack depths | combined stack | over budget |"
        echo "|---|---|---|---:|---|---:|---|"
        for k in "${SELECTED[@]}"; do
            [ -s "$OUT/$k/check-kernel.json" ] || continue
            jq -r --arg k "$k" '.programs[]? | "| \($k) | \(.program) | \(if .loaded then "yes" else "**no**: \(.error // "")" end) | \(.verifier.insns_processed // "-") | \(.verifier.stack_depths // [] | map(tostring) | join("+")) | \(.verifier.combined_stack // "-") | \(.over_budget | join("; "))|"' \
                "$OUT/$k/check-kernel.json" 2>/dev/null || true
        done
    fi
} >"$MD"
passed=0
skipped=0
for k in "${SELECTED[@]}"; do
    for c in $CHECKS; do
        case "${STATUS[$k.$c]}" in
            pass) passed=$((passed + 1)) ;;
            skip) skipped=$((skipped + 1)) ;;
            *) failed=$((failed + 1)) ;;
        esac
    done
done

echo
cat "$MD"
echo
log "total $(($(date +%s) - START)) s; matrix: $MD; per-kernel files: $OUT/<kernel>/"
if [ "$failed" -gt 0 ]; then
    if [ "$ALLOW_FAIL" = 1 ]; then
        log "warning: $failed check(s) failed, $passed passed, $skipped skipped (KERNEL_MATRIX_ALLOW_FAIL=1)"
        exit 0
    fi
    log "$failed check(s) failed, $passed passed, $skipped skipped"
    exit 1
fi
log "no check failed ($passed passed, $skipped skipped)"
