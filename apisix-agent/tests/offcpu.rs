//! Root tests of off-CPU recording (`record --mode off-cpu`) against real nginx-lua workers:
//! a handler that blocks in a known Lua function for a measured time, and one that only
//! yields with `ngx.sleep` (idle in epoll, not blocked).

mod common;

use std::time::Duration;

use common::{Lj, Load, Nginx, record};

const LUA: &str = r#"
local ffi = require "ffi"
ffi.cdef [[
    int usleep(unsigned int usec);
    typedef struct { long tv_sec; long tv_nsec; } apx_timespec;
    int clock_gettime(int clk, apx_timespec *tp);
]]
local ts = ffi.new("apx_timespec")
local function now_us()
    ffi.C.clock_gettime(1, ts)
    return tonumber(ts.tv_sec) * 1e6 + tonumber(ts.tv_nsec) / 1e3
end

local _M = {}

-- Blocks the worker for `us` microseconds in a system call; adds the measured time to the
-- `blocked_us` counter of the shared dict.
local function blocker(us)
    local t0 = now_us()
    ffi.C.usleep(us)
    local took = now_us() - t0
    ngx.shared.stats:incr("blocked_us", took, 0)
    return took
end

function _M.block(us)
    local r = blocker(us)
    return r
end

local function sleeper(s)
    ngx.sleep(s)
    return s
end

function _M.sleep(s)
    local r = sleeper(s)
    return r
end

return _M
"#;

const SERVER: &str = r#"
    location /block { content_by_lua_block { ngx.say(require("offwork").block(20000)) } }
    location /sleep { content_by_lua_block { ngx.say(require("offwork").sleep(0.02)) } }
    location /stats { content_by_lua_block {
        ngx.say(ngx.shared.stats:get("blocked_us") or 0)
    } }
    location /reset { content_by_lua_block { ngx.shared.stats:set("blocked_us", 0) ngx.say("ok") } }
"#;

/// The JIT is off: a trace that inlines `blocker` into `block` would hold no frame for it
/// (LuaJIT materializes inlined frames only on trace exit), in off-CPU as in CPU samples.
fn start() -> Nginx {
    Nginx::start(
        Lj::Gc64,
        &[("offwork", LUA)],
        "lua_shared_dict stats 1m; init_by_lua_block { require('jit').off() }",
        SERVER,
    )
}

#[test]
#[ignore = "needs root"]
fn blocking_lua_function_carries_the_blocked_time() {
    common::require_root!();
    let nginx = start();
    let worker = nginx.worker().expect("worker");
    let load = Load::start(nginx.port, "/block", 1, Duration::from_secs(20));
    common::wait_for_requests(&load, 4);
    nginx.get("/reset");
    let rec = record(worker, 4, &["--mode", "off-cpu", "--min-block-us", "1000"]);
    let measured: f64 = nginx.get("/stats").trim().parse().expect("stats");
    assert!(rec.status.success(), "record failed: {}", rec.dump());
    let total = rec.total();
    // Off-CPU stacks count blocked microseconds.
    let in_blocker = rec.count(|f| f.iter().any(|x| x.starts_with("blocker@")));
    let with_kernel = rec.count(|f| {
        f.iter().any(|x| x.starts_with("blocker@")) && f.iter().any(|x| x.ends_with("_[k]"))
    });
    eprintln!(
        "off-CPU: {:.1} ms in total, {:.1} ms under blocker, measured in Lua {:.1} ms",
        total as f64 / 1000.0,
        in_blocker as f64 / 1000.0,
        measured / 1000.0
    );
    assert!(
        in_blocker * 100 >= total * 80,
        "blocker carries {in_blocker} of {total} µs off-CPU\n{}",
        rec.dump()
    );
    assert!(
        with_kernel * 100 >= in_blocker * 95,
        "kernel frames missing under blocker\n{}",
        rec.dump()
    );
    let ratio = in_blocker as f64 / measured;
    assert!(
        (0.8..=1.2).contains(&ratio),
        "blocked time under blocker {in_blocker} µs vs {measured:.0} µs measured in Lua (ratio {ratio:.2})\n{}",
        rec.dump()
    );
    assert!(
        rec.stderr.contains("shorter blocks dropped in the kernel"),
        "{}",
        rec.stderr
    );
}

#[test]
#[ignore = "needs root"]
fn ngx_sleep_is_not_blocked_worker_time() {
    common::require_root!();
    let nginx = start();
    let worker = nginx.worker().expect("worker");
    let _load = Load::start(nginx.port, "/sleep", 2, Duration::from_secs(20));
    // Not `common::wait_for_requests`: started once the load's first requests are served,
    // the recording sees no blocked time at all (and fails); why is not known yet.
    std::thread::sleep(Duration::from_millis(500));
    let rec = record(worker, 3, &["--mode", "off-cpu"]);
    assert!(rec.status.success(), "record failed: {}", rec.dump());
    // Idle epoll waits are excluded by default: what remains is small and not under sleeper.
    let in_sleeper = rec.count(|f| f.iter().any(|x| x.starts_with("sleeper@")));
    assert!(
        in_sleeper < 30_000,
        "ngx.sleep shows as {in_sleeper} µs of blocked worker time\n{}",
        rec.dump()
    );
    assert!(
        rec.stderr.contains("idle (epoll_wait) excluded"),
        "{}",
        rec.stderr
    );
    // With idle waits kept, the worker's time shows in epoll_wait.
    let idle = record(worker, 2, &["--mode", "off-cpu", "--include-idle"]);
    assert!(idle.status.success(), "{}", idle.dump());
    let in_epoll = idle.count(|f| {
        f.iter()
            .any(|x| *x == "ep_poll_[k]" || *x == "do_epoll_wait_[k]" || x.contains("epoll_wait"))
    });
    assert!(
        in_epoll * 100 >= idle.total() * 80,
        "{in_epoll} of {} µs in epoll_wait with --include-idle\n{}",
        idle.total(),
        idle.dump()
    );
}

#[test]
#[ignore = "needs root"]
fn daemon_serves_offcpu_metrics_and_flame_graphs() {
    common::require_root!();
    let nginx = start();
    let worker = nginx.worker().expect("worker");
    let _load = Load::start(nginx.port, "/block", 1, Duration::from_secs(30));
    let agent = common::daemon::Agent::start(
        "  docker:\n    enabled: false\nsampling:\n  offcpu:\n    enabled: true\n    min_block_us: 1000\n",
    );
    let seen = common::daemon::wait_for(15, || {
        let (_, m) = agent.get("/metrics");
        common::daemon::series_f64(
            &m,
            "apisix_profiler_lua_function_offcpu_seconds_total",
            &["function=\"blocker\""],
        )
        .filter(|s| *s > 0.1)
    });
    assert!(
        seen.is_some(),
        "no off-CPU seconds for blocker in /metrics:\n{}\n{}",
        agent.get("/metrics").1,
        agent.log()
    );
    let (status, folded) = agent.get(&format!(
        "/flamegraph?pid={worker}&seconds=3&mode=off-cpu&format=collapsed"
    ));
    assert_eq!(status, 200, "{folded}");
    let stacks = common::parse_folded(&folded);
    let total: u64 = stacks.values().sum();
    let under: u64 = stacks
        .iter()
        .filter(|(s, _)| s.contains("blocker@"))
        .map(|(_, n)| n)
        .sum();
    // One client, 20 ms blocks: about 3 s blocked in 3 s.
    assert!(
        total > 2_000_000 && under * 100 >= total * 80,
        "{under} of {total} µs under blocker:\n{folded}"
    );
    let (status, svg) = agent.get(&format!("/flamegraph?pid={worker}&seconds=2&mode=off-cpu"));
    assert_eq!(status, 200);
    assert!(
        svg.contains("off-CPU") && svg.contains("blocker@"),
        "SVG title or frames missing"
    );
    let (status, _) = agent.get(&format!("/flamegraph?pid={worker}&mode=off-cpu"));
    assert_eq!(status, 400);
}
