#!/usr/bin/env bash
# The kernel matrix's checks, run by the guest's /init (scripts/kernel-matrix/init) against
# real nginx + ngx_lua workers on 127.0.0.1 and the real agent. Each check ends with one line
# `KMX-RESULT <check> <pass|fail|skip> <reason>` on the console and in /results/results.tsv;
# its files (record summaries, folded stacks, stderr, the check-kernel JSON, the daemon's log
# and metrics) go to /results for the host.
# Settings from the kernel command line (the kernel hands them to init as environment):
# KMX_DURATION (seconds per recording, default 4), KMX_CHECKS (which checks, default all),
# KMX_DAEMON_WAIT (seconds the daemon has to show Lua samples, default 20),
# KMX_CHECK_TIMEOUT (seconds one agent command may take, default 120). KMX_RESULTS,
# KMX_AGENT, KMX_NOGC64_LIB, KMX_LUA_DIR and KMX_EPOLL_LOOP move its paths, to try it outside a guest.
set -euo pipefail

R="${KMX_RESULTS:-/results}"
AGENT="${KMX_AGENT:-/usr/local/bin/apisix-agent}"
NOGC64_LIB="${KMX_NOGC64_LIB:-/opt/luajit-nogc64/lib}"
LUA_DIR="${KMX_LUA_DIR:-/kmx/lua}"
EPOLL_LOOP="${KMX_EPOLL_LOOP:-/kmx/epoll-loop}"
DURATION="${KMX_DURATION:-4}"
DAEMON_WAIT="${KMX_DAEMON_WAIT:-20}"
CHECK_TIMEOUT="${KMX_CHECK_TIMEOUT:-120}"
CHECKS="${KMX_CHECKS:-budgets cpu-gc64 cpu-nogc64 offcpu alloc live daemon loopcost}"
CHECKS="${CHECKS//,/ }"
export NO_COLOR=1
mkdir -p "$R"
: >"$R/results.tsv"

# Processes started by the current check (nginx masters, wrk, the daemon), stopped by cleanup.
PIDS=()

# result CHECK STATUS REASON: records one check's outcome.
result() {
    local reason
    reason="$(printf '%s' "$3" | tr '\t\r\n' '   ' | cut -c1-300)"
    printf '%s\t%s\t%s\n' "$1" "$2" "$reason" >>"$R/results.tsv"
    echo "KMX-RESULT $1 $2 $reason"
}

# error_line FILE: the line of an agent's stderr that says what went wrong (joined with the
# next line when it ends in a colon), else its last line.
error_line() {
    sed 's/\x1b\[[0-9;]*m//g' "$1" 2>/dev/null | awk '
        found && NF { print prev " " $0; done = 1; exit }
        !found && tolower($0) ~ /error|failed|refused|invalid|denied|panick/ {
            if ($0 ~ /:[[:space:]]*$/) { prev = $0; found = 1 } else { print; done = 1; exit }
        }
        NF { last = $0 }
        END { if (!done) { if (found) print prev; else if (last != "") print last; else print "no output" } }'
}

# json_u64 FILE KEY: the top-level number KEY of a JSON file, empty when there is none.
json_u64() {
    jq -r --arg k "$2" '.[$k] // empty' "$1" 2>/dev/null || true
}

cleanup() {
    local p
    for p in "${PIDS[@]}"; do
        kill -TERM "$p" 2>/dev/null || true
    done
    for p in "${PIDS[@]}"; do
        for _ in 1 2 3 4 5 6 7 8 9 10; do
            kill -0 "$p" 2>/dev/null || break
            sleep 0.5
        done
        kill -KILL "$p" 2>/dev/null || true
    done
    PIDS=()
}

# start_nginx NAME PORT gc64|nogc64 on|off HTTP_EXTRA SERVER: a private nginx with one worker
# on 127.0.0.1:PORT (JIT on or off). Sets NGX_MASTER and NGX_WORKER; returns 1 (with
# NGX_ERROR) when it does not come up.
start_nginx() {
    local name=$1 port=$2 lj=$3 jit=$4 extra=$5 server=$6
    local p="/tmp/nginx-$name" init=""
    rm -rf "$p"
    mkdir -p "$p/logs" "$p/tmp" "$p/conf"
    chmod 755 "$p"
    if [ "$jit" = off ]; then
        init="init_by_lua_block { require('jit').off() LEAKS = {} }"
    else
        init="init_by_lua_block { LEAKS = {} }"
    fi
    cat >"$p/conf/nginx.conf" <<CONF
load_module /usr/lib/nginx/modules/ndk_http_module.so;
load_module /usr/lib/nginx/modules/ngx_http_lua_module.so;
user nobody nogroup;
worker_processes 1;
master_process on;
daemon off;
error_log $p/logs/error.log warn;
pid $p/logs/nginx.pid;
events { worker_connections 512; }
http {
  access_log off;
  lua_package_path "$LUA_DIR/?.lua;;";
  client_body_temp_path $p/tmp; proxy_temp_path $p/tmp; fastcgi_temp_path $p/tmp;
  uwsgi_temp_path $p/tmp; scgi_temp_path $p/tmp;
  $init
  $extra
  server {
    listen 127.0.0.1:$port;
    location /ping { return 200 "ok\n"; }
    $server
  }
}
CONF
    if [ "$lj" = nogc64 ]; then
        LD_LIBRARY_PATH="$NOGC64_LIB" nginx -p "$p" -e "$p/logs/error.log" -c conf/nginx.conf \
            </dev/null >"$p/logs/stdout.log" 2>&1 &
    else
        nginx -p "$p" -e "$p/logs/error.log" -c conf/nginx.conf </dev/null >"$p/logs/stdout.log" 2>&1 &
    fi
    NGX_MASTER=$!
    PIDS+=("$NGX_MASTER")
    NGX_WORKER=""
    for _ in $(seq 1 60); do
        if ! kill -0 "$NGX_MASTER" 2>/dev/null; then
            break
        fi
        NGX_WORKER="$(awk '{print $1}' "/proc/$NGX_MASTER/task/$NGX_MASTER/children" 2>/dev/null || true)"
        if [ -n "$NGX_WORKER" ] && curl -fsS -m 2 -o /dev/null "http://127.0.0.1:$port/ping" 2>/dev/null; then
            return 0
        fi
        sleep 0.25
    done
    NGX_ERROR="nginx did not come up: $(grep -m1 -E 'emerg|alert|crit|error' "$p/logs/error.log" "$p/logs/stdout.log" 2>/dev/null | head -n 1 || true)"
    cp "$p/logs/error.log" "$R/$name.nginx-error.log" 2>/dev/null || true
    return 1
}

# load PORT PATH CONNECTIONS: wrk on 127.0.0.1 for up to 2 minutes (stopped by cleanup).
load() {
    wrk -t1 -c"$3" -d120s "http://127.0.0.1:$1$2" >"/tmp/wrk-$1.log" 2>&1 &
    PIDS+=("$!")
}

# record_check CHECK FRAME [record args...]: `apisix-agent record` of the current worker;
# passes when it exits 0 with samples > 0 and a frame starting with FRAME in its stacks.
record_check() {
    local check=$1 frame=$2
    shift 2
    local rc=0
    timeout -s KILL "$CHECK_TIMEOUT" "$AGENT" record --pid "$NGX_WORKER" --duration "$DURATION" --format collapsed \
        --output "$R/$check.folded" --summary "$R/$check.json" "$@" \
        >"$R/$check.stdout" 2>"$R/$check.stderr" || rc=$?
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        result "$check" fail "record did not finish within $CHECK_TIMEOUT s (killed); stderr: $(error_line "$R/$check.stderr")"
        return
    elif [ "$rc" -ne 0 ]; then
        result "$check" fail "record exited $rc: $(error_line "$R/$check.stderr")"
        return
    fi
    local samples stacks under weight total
    samples="$(json_u64 "$R/$check.json" samples)"
    stacks="$(grep -c . "$R/$check.folded" 2>/dev/null || true)"
    under="$(grep -cE "(^|;)$frame@" "$R/$check.folded" 2>/dev/null || true)"
    # Folded lines end in their weight (samples; off-CPU: microseconds; alloc, live: bytes).
    total="$(awk '{s += $NF} END {print s + 0}' "$R/$check.folded" 2>/dev/null || echo 0)"
    weight="$(grep -E "(^|;)$frame@" "$R/$check.folded" 2>/dev/null | awk '{s += $NF} END {print s + 0}' || echo 0)"
    if [ -z "$samples" ]; then
        result "$check" fail "record wrote no summary: $(error_line "$R/$check.stderr")"
    elif [ "$samples" -eq 0 ]; then
        result "$check" fail "0 samples: $(error_line "$R/$check.stderr")"
    elif [ "${under:-0}" -eq 0 ]; then
        result "$check" fail "$samples samples in ${stacks:-0} stacks, none with a $frame@ frame"
    else
        result "$check" pass "$samples samples; $frame@ in $under of $stacks stacks, weight $weight of $total"
    fi
}

check_budgets() {
    local rc=0 j="$R/check-kernel.json"
    timeout -s KILL "$CHECK_TIMEOUT" "$AGENT" check-kernel --json >"$j" 2>"$R/check-kernel.stderr" || rc=$?
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        result budgets fail "check-kernel did not finish within $CHECK_TIMEOUT s (killed); stderr: $(error_line "$R/check-kernel.stderr")"
        return
    fi
    if grep -qiE "unrecognized subcommand|unexpected argument|invalid subcommand" "$R/check-kernel.stderr"; then
        result budgets fail "this agent build has no check-kernel subcommand: $(error_line "$R/check-kernel.stderr")"
        return
    fi
    if ! jq -e .programs "$j" >/dev/null 2>&1; then
        result budgets fail "check-kernel exited $rc without its JSON: $(error_line "$R/check-kernel.stderr")"
        return
    fi
    local loaded total problems
    loaded="$(jq '[.programs[] | select(.loaded)] | length' "$j")"
    total="$(jq '.programs | length' "$j")"
    problems="$(jq -r '[(.error // empty | "object: " + .),
        (.programs[] | select((.loaded | not) and (.optional | not)) | "\(.program) refused: \(.error // "no reason given")"),
        (.programs[] | .program as $p | .over_budget[] | "\($p) over budget: \(.)")] | join("; ")' "$j")"
    if [ "$rc" -eq 0 ] && [ "$(jq -r .ok "$j")" = true ] && [ "$total" -gt 0 ] && [ -z "$problems" ]; then
        result budgets pass "$(jq -r '[.programs[] | select(.verifier) | .verifier] as $v
            | "\($v | length) programs loaded within budgets, Lua walk \(.kernel.lua_walk // "?");"
            + " most insns \($v | max_by(.insns_processed) | "\(.program) \(.insns_processed)"),"
            + " largest stack \($v | max_by(.combined_stack) | "\(.program) \(.combined_stack) B")"
            + "; optional programs refused: \([.programs[] | select((.loaded | not) and .optional) | .program] | join(",") | if . == "" then "none" else . end)"' "$j")"
    else
        result budgets fail "check-kernel exited $rc, $loaded of $total programs loaded: ${problems:-$(error_line "$R/check-kernel.stderr")}"
    fi
}

# check_cpu CHECK gc64|nogc64 PORT
check_cpu() {
    local check=$1 lj=$2 port=$3
    if [ "$lj" = nogc64 ] && [ ! -f "$NOGC64_LIB/libluajit-5.1.so.2" ]; then
        result "$check" skip "no non-GC64 LuaJIT in the initramfs"
        return
    fi
    if ! start_nginx "$check" "$port" "$lj" on "" \
        'location /cpu { content_by_lua_block { ngx.say(require("kmx").cpu()) } }'; then
        result "$check" fail "$NGX_ERROR"
        return
    fi
    if [ "$lj" = nogc64 ] && ! grep -q "$NOGC64_LIB" "/proc/$NGX_WORKER/maps"; then
        result "$check" fail "the worker did not map $NOGC64_LIB/libluajit-5.1.so.2"
        return
    fi
    load "$port" /cpu 2
    sleep 1
    record_check "$check" burn_a
}

# check_workload CHECK PORT JIT PATH LUA_CALL CLIENTS FRAME [RECORD ARGS...]: a GC64 nginx
# serving `ngx.say(require("kmx").LUA_CALL)` at PATH under CLIENTS connections of load,
# recorded with the extra RECORD ARGS; passes when FRAME's samples are there.
check_workload() {
    local check=$1 port=$2 jit=$3 path=$4 call=$5 clients=$6 frame=$7
    shift 7
    if ! start_nginx "$check" "$port" gc64 "$jit" "" \
        "location $path { content_by_lua_block { ngx.say(require(\"kmx\").$call) } }"; then
        result "$check" fail "$NGX_ERROR"
        return
    fi
    load "$port" "$path" "$clients"
    sleep 1
    record_check "$check" "$frame" "$@"
}

check_daemon() {
    if ! start_nginx daemon 18006 gc64 on "" \
        'location /cpu { content_by_lua_block { ngx.say(require("kmx").cpu()) } }'; then
        result daemon fail "$NGX_ERROR"
        return
    fi
    load 18006 /cpu 2
    cat >/tmp/agent.yaml <<'YAML'
http:
  listen: 127.0.0.1:9464
sampling:
  frequency_hz: 99
discovery:
  interval_seconds: 1
  docker:
    enabled: false
YAML
    RUST_LOG=info "$AGENT" run --config /tmp/agent.yaml </dev/null >"$R/daemon.stdout" 2>"$R/daemon.log" &
    local agent=$!
    PIDS+=("$agent")
    local waited=0 seen="" health=""
    while [ "$waited" -lt "$DAEMON_WAIT" ]; do
        sleep 1
        waited=$((waited + 1))
        if ! kill -0 "$agent" 2>/dev/null; then
            local rc=0
            wait "$agent" || rc=$?
            result daemon fail "the daemon exited ($rc) after ${waited} s: $(error_line "$R/daemon.log")"
            return
        fi
        curl -fsS -m 5 -o "$R/daemon.metrics" http://127.0.0.1:9464/metrics 2>/dev/null || continue
        seen="$(grep -E '^apisix_profiler_lua_function_self_samples_total\{function="burn_a"' "$R/daemon.metrics" \
            | awk '$NF > 0 {print $NF; exit}' || true)"
        [ -z "$seen" ] || break
    done
    if curl -fsS -m 5 -o "$R/daemon.healthz" http://127.0.0.1:9464/healthz 2>/dev/null; then
        health=ok
    fi
    curl -fsS -m 5 -o "$R/daemon.targets.json" http://127.0.0.1:9464/targets 2>/dev/null || true
    if [ -z "$seen" ]; then
        local why
        if [ -s "$R/daemon.metrics" ]; then
            why="no burn_a samples in /metrics after ${waited} s (samples_total: $(grep -m1 '^apisix_profiler_samples_total' "$R/daemon.metrics" | awk '{print $NF}'))"
        else
            why="/metrics did not answer within ${waited} s"
        fi
        result daemon fail "$why; log: $(error_line "$R/daemon.log")"
    elif [ -z "$health" ]; then
        result daemon fail "burn_a has $seen samples in /metrics, but /healthz did not answer 200"
    else
        daemon_loops "burn_a self samples $seen in /metrics after ${waited} s, /healthz 200"
    fi
}

# daemon_loops SO_FAR: the daemon's event-loop pair, attached to the epoll functions
# (fentry/fexit: Debian's kernels have BTF and are not locked down in the guest), counts the
# loaded worker's iterations.
daemon_loops() {
    local iterations="" hooks
    for _ in 1 2 3 4 5; do
        curl -fsS -m 5 -o "$R/daemon.metrics" http://127.0.0.1:9464/metrics 2>/dev/null || true
        iterations="$(grep -E '^apisix_profiler_event_loop_iteration_seconds_count\{container=""' "$R/daemon.metrics" \
            | awk '$NF > 0 {print $NF; exit}' || true)"
        [ -z "$iterations" ] || break
        sleep 1
    done
    hooks="$(sed 's/\x1b\[[0-9;]*m//g' "$R/daemon.log" | grep -c 'event-loop pair attached to the epoll functions' || true)"
    if [ -z "$iterations" ]; then
        result daemon fail "$1, but no event-loop iterations in /metrics"
    elif [ "$hooks" -eq 0 ]; then
        result daemon fail "$1, $iterations loop iterations, but not on the epoll functions: $(grep -m1 'not on the epoll functions' "$R/daemon.log" | cut -c1-300)"
    else
        result daemon pass "$1, $iterations loop iterations on the epoll functions (fentry/fexit)"
    fi
}

# loop_ns: sets NS to the best of 3 of the epoll loop's (coprocess LOOP) ns per
# epoll_wait(0). Not in a command substitution: a subshell does not have the coprocess's
# descriptors.
loop_ns() {
    local ns
    NS=""
    for _ in 1 2 3; do
        echo >&"${LOOP[1]}"
        read -r -t "$CHECK_TIMEOUT" ns <&"${LOOP[0]}" || return 1
        if [ -z "$NS" ] || awk -v a="$ns" -v b="$NS" 'BEGIN { exit !(a < b) }'; then
            NS=$ns
        fi
    done
}

# loop_count: the loop iterations the daemon on port 9465 counted (0 when it says none).
loop_count() {
    curl -fsS -m 5 http://127.0.0.1:9465/metrics 2>/dev/null \
        | awk '/^apisix_profiler_event_loop_iteration_seconds_count\{container=""/ {n = $NF} END {print n + 0}'
}

# loop_hooked MODE PID: starts the daemon targeting PID with its event-loop pair on MODE
# (functions, tracepoints, raw), measures the loop (NS), checks the daemon counted its
# iterations where it says it attached (else WHY, and returns 1), stops the daemon.
loop_hooked() {
    local mode=$1 pid=$2 env=() said
    case "$mode" in
        functions) said="epoll functions" ;;
        tracepoints) said="epoll tracepoints"; env=(APISIX_AGENT_LOOP_HOOKS=tracepoints) ;;
        raw) said="raw tracepoints"; env=(APISIX_AGENT_LOOP_HOOKS=raw) ;;
    esac
    printf 'http:\n  listen: 127.0.0.1:9465\ndiscovery:\n  interval_seconds: 1\n  pids: [%s]\n  docker:\n    enabled: false\n' \
        "$pid" >/tmp/loop-agent.yaml
    env "${env[@]}" RUST_LOG=info "$AGENT" run --config /tmp/loop-agent.yaml </dev/null \
        >/dev/null 2>"$R/loopcost-$mode.log" &
    local agent=$! waited=0 count="" ns
    # Until the daemon counts the loop's iterations (it lists a target before its sampler
    # thread has put it in the BPF map): one batch of calls a second.
    while [ "$waited" -lt "$DAEMON_WAIT" ]; do
        sleep 1
        waited=$((waited + 1))
        curl -fsS -m 5 http://127.0.0.1:9465/targets 2>/dev/null | grep -q "\"pid\":$pid," || continue
        echo >&"${LOOP[1]}"
        read -r -t "$CHECK_TIMEOUT" ns <&"${LOOP[0]}" || break
        [ "$(loop_count)" -gt 0 ] && break
    done
    loop_ns || NS=""
    for _ in 1 2 3 4 5; do # the daemon reads the counts once a second
        sleep 1
        count="$(loop_count)"
        [ "$count" -lt 1000 ] || break
    done
    kill -TERM "$agent" 2>/dev/null || true
    wait "$agent" 2>/dev/null || true
    WHY=""
    if ! sed 's/\x1b\[[0-9;]*m//g' "$R/loopcost-$mode.log" | grep -q "event-loop pair attached to the $said"; then
        WHY="not on the $said: $(error_line "$R/loopcost-$mode.log")"
    elif [ -z "$NS" ] || [ "$count" -lt 1000 ]; then
        WHY="on the $said, ${count:-no} iterations counted, loop: ${NS:-no answer}"
    fi
    [ -z "$WHY" ]
}

# check_loopcost: what one event-loop iteration costs on each of the pair's attachments: a
# targeted process's epoll_wait(0) (one iteration each), hooked against bare. Under TCG
# the nanoseconds are emulation's; compare the attachments with one another, not with a
# real machine's figures (BENCHMARKS.md section 11).
check_loopcost() {
    coproc LOOP { exec "$EPOLL_LOOP" 20000; }
    PIDS+=("$LOOP_PID")
    local pid=$LOOP_PID bare mode summary=""
    loop_ns || { result loopcost fail "the epoll loop did not answer"; return; }
    bare=$NS
    for mode in functions tracepoints raw; do
        if ! loop_hooked "$mode" "$pid"; then
            result loopcost fail "$mode: $WHY"
            return
        fi
        summary+="$(awk -v m="$mode" -v a="$NS" -v b="$bare" 'BEGIN { printf "%s +%.0f ns (%.2fx); ", m, a - b, a / b }')"
    done
    result loopcost pass "epoll_wait(0) of a target, $bare ns bare; added per iteration: ${summary%; }"
}

run_check() {
    local check=$1 t0 t1
    t0="$(date +%s)"
    echo "KMX-START $check"
    case "$check" in
        budgets) check_budgets ;;
        cpu-gc64) check_cpu cpu-gc64 gc64 18001 ;;
        cpu-nogc64) check_cpu cpu-nogc64 nogc64 18002 ;;
        offcpu) check_workload offcpu 18003 off /block 'block(20000)' 1 blocker --mode off-cpu --min-block-us 1000 ;;
        alloc) check_workload alloc 18004 on /alloc 'alloc()' 2 make_tables --mode alloc --sample-bytes 65536 ;;
        live) check_workload live 18005 on /leak 'leak()' 2 leak_some --mode live --sample-bytes 16384 ;;
        daemon) check_daemon ;;
        loopcost) check_loopcost ;;
        *) result "$check" skip "unknown check" ;;
    esac
    t1="$(date +%s)"
    echo "KMX-TIME $check $((t1 - t0)) s (uptime $(cut -d" " -f1 /proc/uptime) s)"
}

for c in $CHECKS; do
    # Each check in a subshell that stops what it started, also when it breaks (set -e):
    # a broken check must not take the others with it.
    rc=0
    (
        trap cleanup EXIT
        run_check "$c"
    ) || rc=$?
    if ! grep -q "^$c	" "$R/results.tsv"; then
        result "$c" fail "the check itself broke (exit $rc)"
    fi
done
