//! Root tests of Lua heap snapshots against real nginx + ngx_lua workers, on both LuaJIT
//! layouts with the JIT on and off: a module-level cache that keeps one record per request
//! beside short-lived garbage, found by the `diff` of two snapshots 10 s apart; a table held
//! only on a coroutine's stack and one held only as a closure's upvalue, each under its
//! root; the snapshot's reached bytes against `collectgarbage("count")` right after a full
//! collection.
//!
//! The VM is found from a thread address Lua prints (`coroutine.running()`), whose `glref`
//! is the `global_State` (checked to be a VM); the walk itself is the library's. The front
//! ends (`record --mode heap`, `/flamegraph?mode=heap&diff_seconds=N`) learn the VM with
//! the real `lua_resume` uprobe and are checked on both layouts.

mod common;

use std::{collections::BTreeMap, process::Command, thread, time::Duration};

use apisix_agent::luajit::{
    layout::{GC32, GC64, Layout},
    snapshot::{self, Limits, Snapshot, UNREACHABLE},
};
use common::{Lj, Load, Nginx, agent, daemon::Agent};

/// Slots of the table only the coroutine's stack holds, and of the one only an upvalue
/// holds: distinct sizes, so each is recognised by its bytes.
const CO_SLOTS: u64 = 9000;
const UP_SLOTS: u64 = 6000;

const HEAPWORK_LUA: &str = r#"
local _M = { cache = {} }
local seq = 0

-- Held only as an upvalue of _M.peek.
local up_held = {}
for i = 1, 6000 do up_held[i] = i end
function _M.peek() return #up_held end

-- Held only on the stack of the suspended coroutine _M.co.
local function hold(n)
    local t = {}
    for i = 1, n do t[i] = i end
    coroutine.yield()
    return t
end
_M.co = coroutine.create(hold)
coroutine.resume(_M.co, 9000)

-- One record per request kept in the module's cache; the rest is garbage.
function _M.record()
    seq = seq + 1
    _M.cache[seq] = { id = seq, payload = string.rep("x", 100) .. seq, at = ngx.now() }
    local garbage = {}
    for i = 1, 40 do garbage[i] = { i, tostring(i) .. ":" .. seq } end
    return seq
end

return _M
"#;

const SERVER: &str = r#"
    location /rec { content_by_lua_block { ngx.say(require("heapwork").record()) } }
    location /thread { content_by_lua_block { ngx.say(tostring(coroutine.running())) } }
    location /gc { content_by_lua_block {
        collectgarbage() collectgarbage()
        ngx.say(string.format("%.0f", collectgarbage("count") * 1024))
    } }
"#;

fn start(lj: Lj, jit: bool) -> Nginx {
    let init = if jit {
        "init_by_lua_block { require('heapwork') }"
    } else {
        "init_by_lua_block { require('jit').off() require('heapwork') }"
    };
    Nginx::start(lj, &[("heapwork", HEAPWORK_LUA)], init, SERVER)
}

/// The worker's pid, layout and `global_State`.
fn vm(n: &Nginx, lj: Lj) -> (u32, &'static Layout, u64) {
    let pid = n.worker().expect("worker");
    let layout = match lj {
        Lj::Gc64 => &GC64,
        Lj::Gc32 => &GC32,
    };
    let body = n.get("/thread");
    let hex = body
        .trim()
        .rsplit_once("0x")
        .map(|x| x.1)
        .unwrap_or_else(|| panic!("no thread address in {body:?}"));
    let l = u64::from_str_radix(hex, 16).expect("thread address");
    let g = snapshot::vm_of_thread(pid, layout, l).expect("the thread's VM");
    (pid, layout, g)
}

fn take(pid: u32, layout: &'static Layout, g: u64) -> Snapshot {
    let s = snapshot::snapshot_pid(pid, layout, g, &Limits::default()).expect("snapshot");
    eprintln!("{}", s.summary());
    assert!(s.truncated.is_none(), "{:?}", s.truncated);
    assert!(s.objects > 1000, "{}", s.summary());
    s
}

fn bytes_under(s: &Snapshot, prefix: &str) -> u64 {
    s.folded
        .lines()
        .iter()
        .filter_map(|l| l.rsplit_once(' '))
        .filter(|(stack, _)| stack.starts_with(prefix))
        .map(|(_, n)| n.parse::<u64>().unwrap_or(0))
        .sum()
}

/// Runs `apisix-agent diff BEFORE AFTER --format collapsed` on two snapshots' folded text.
fn diff(a: &Snapshot, b: &Snapshot) -> BTreeMap<String, (u64, u64)> {
    let dir = tempfile::tempdir().expect("tempdir");
    let (pa, pb) = (dir.path().join("a.folded"), dir.path().join("b.folded"));
    std::fs::write(&pa, a.folded.lines().join("\n")).expect("write");
    std::fs::write(&pb, b.folded.lines().join("\n")).expect("write");
    let out = Command::new(agent())
        .arg("diff")
        .arg(&pa)
        .arg(&pb)
        .args(["--format", "collapsed"])
        .output()
        .expect("run apisix-agent diff");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The SVG renders too.
    let svg = Command::new(agent())
        .arg("diff")
        .arg(&pa)
        .arg(&pb)
        .output()
        .expect("run apisix-agent diff");
    assert!(String::from_utf8_lossy(&svg.stdout).contains("<svg"));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let mut it = l.rsplitn(3, ' ');
            let after = it.next()?.parse().ok()?;
            let before = it.next()?.parse().ok()?;
            Some((it.next()?.to_owned(), (before, after)))
        })
        .collect()
}

fn check(lj: Lj, jit: bool) {
    common::require_root!();
    let n = start(lj, jit);
    let (pid, layout, g) = vm(&n, lj);
    // Right after a full collection, the walk reaches about everything gc.total counts.
    let count: f64 = n.get("/gc").trim().parse().expect("count");
    let s0 = take(pid, layout, g);
    let ratio = s0.reached_bytes as f64 / count;
    eprintln!(
        "{lj:?} jit={jit}: reached {} of gc.total {count:.0} ({ratio:.3}) in {:?}",
        s0.reached_bytes, s0.elapsed
    );
    assert!((0.75..=1.25).contains(&ratio), "reached/gc.total {ratio}");
    // The coroutine's stack and the upvalue hold their tables, each under its root.
    let m = "registry;_LOADED;heapwork;";
    let co = bytes_under(&s0, &format!("{m}co;[stack];table"));
    let up = bytes_under(&s0, &format!("{m}peek;[upvalue up_held];table"));
    assert!(co >= CO_SLOTS * 8, "coroutine-held table: {co} bytes");
    assert!(up >= UP_SLOTS * 8, "upvalue-held table: {up} bytes");
    assert!(bytes_under(&s0, &format!("{m}co;thread")) > 0);
    // The cache grows by one record per request, beside garbage.
    let load = Load::start(n.port, "/rec", 2, Duration::from_secs(30));
    thread::sleep(Duration::from_secs(1));
    let a = take(pid, layout, g);
    thread::sleep(Duration::from_secs(10));
    let b = take(pid, layout, g);
    let requests = load.requests.load(std::sync::atomic::Ordering::Relaxed);
    drop(load);
    let d = diff(&a, &b);
    let grown = |f: &dyn Fn(&str) -> bool| -> u64 {
        d.iter()
            .filter(|(s, _)| f(s))
            .map(|(_, (x, y))| y.saturating_sub(*x))
            .sum()
    };
    let reachable = grown(&|s| s != UNREACHABLE);
    let cache = grown(&|s| s.starts_with(&format!("{m}cache;")));
    let all = grown(&|_| true);
    let share = cache as f64 / reachable.max(1) as f64;
    eprintln!(
        "{lj:?} jit={jit}: {requests} requests; grown {reachable} reachable bytes ({all} with \
         [unreachable]), {cache} under {m}cache ({share:.3}; {:.3} of all)",
        cache as f64 / all.max(1) as f64
    );
    assert!(requests > 100, "load ran: {requests}");
    assert!(share >= 0.8, "share under the cache: {share}");
    // Each record holds at least its table and its payload string.
    assert!(
        cache >= 150 * (requests / 2),
        "{cache} bytes for {requests} requests"
    );
}

#[test]
#[ignore = "needs root"]
fn heap_diff_finds_the_cache_gc64_jit() {
    check(Lj::Gc64, true);
}

#[test]
#[ignore = "needs root"]
fn heap_diff_finds_the_cache_gc64_nojit() {
    check(Lj::Gc64, false);
}

#[test]
#[ignore = "needs root"]
fn heap_diff_finds_the_cache_gc32_jit() {
    check(Lj::Gc32, true);
}

#[test]
#[ignore = "needs root"]
fn heap_diff_finds_the_cache_gc32_nojit() {
    check(Lj::Gc32, false);
}

/// `record --mode heap` and `/flamegraph?mode=heap&diff_seconds=N` under load: the VM is
/// learned by the uprobe, the snapshot names the cache, the difference puts its growth there.
fn front_ends(lj: Lj) {
    common::require_root!();
    let n = start(lj, true);
    let pid = n.worker().expect("worker");
    let _load = Load::start(n.port, "/rec", 1, Duration::from_secs(60));
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("heap.folded");
    let st = Command::new(agent())
        .args(["record", "--pid", &pid.to_string(), "--mode", "heap"])
        .args(["--format", "collapsed", "--output"])
        .arg(&out)
        .output()
        .expect("run record");
    let stderr = String::from_utf8_lossy(&st.stderr);
    assert!(st.status.success(), "{stderr}");
    let text = std::fs::read_to_string(&out).expect("output");
    let cache: u64 = common::parse_folded(&text)
        .iter()
        .filter(|(s, _)| s.starts_with("registry;_LOADED;heapwork;cache;"))
        .map(|(_, n)| *n)
        .sum();
    eprintln!("{lj:?} record: {stderr}cache {cache} bytes");
    assert!(cache > 0, "{text}");
    // The daemon: its continuous sampler knows the VM; a 3 s difference.
    let agent = Agent::start("");
    let (status, body) = common::daemon::wait_for(20, || {
        let (status, body) = agent.get(&format!(
            "/flamegraph?pid={pid}&mode=heap&diff_seconds=3&format=collapsed"
        ));
        (status == 200).then_some((status, body))
    })
    .map(|(r, _)| r)
    .unwrap_or_else(|| panic!("no heap diff from the daemon:\n{}", agent.log()));
    assert_eq!(status, 200);
    let mut grown = 0u64;
    let mut in_cache = 0u64;
    for l in body.lines() {
        let mut it = l.rsplitn(3, ' ');
        let (Some(a), Some(b), Some(stack)) = (it.next(), it.next(), it.next()) else {
            continue;
        };
        let g = a
            .parse::<u64>()
            .unwrap_or(0)
            .saturating_sub(b.parse().unwrap_or(0));
        if stack != UNREACHABLE {
            grown += g;
            if stack.starts_with("registry;_LOADED;heapwork;cache;") {
                in_cache += g;
            }
        }
    }
    eprintln!("{lj:?} daemon diff: {in_cache} of {grown} grown reachable bytes under the cache");
    assert!(
        in_cache as f64 >= 0.8 * grown as f64 && in_cache > 0,
        "{body}"
    );
    let (status, svg) = agent.get(&format!("/flamegraph?pid={pid}&mode=heap"));
    assert_eq!(status, 200);
    assert!(svg.contains("heapwork"));
    let (status, _) = agent.get(&format!("/flamegraph?pid={pid}&mode=heap&format=pprof"));
    assert_eq!(status, 400);
}

#[test]
#[ignore = "needs root"]
fn heap_front_ends_gc64() {
    front_ends(Lj::Gc64);
}

#[test]
#[ignore = "needs root"]
fn heap_front_ends_gc32() {
    front_ends(Lj::Gc32);
}
