//! Root tests: mixed C + Lua stacks of real nginx + ngx_lua workers, on Debian's GC64 LuaJIT
//! and on the non-GC64 build of the same sources, with the JIT on and off.

mod common;

use std::time::Duration;

use common::{Lj, Load, Nginx, Recorded, record, record_env};

const BENCH_LUA: &str = r#"
local _M = {}

local function work_a(n)
    local x = 0
    for i = 1, n do x = (x * 31 + i) % 1000003 end
    return x
end

local function work_b(n)
    local t = {}
    for i = 1, n do t[(i % 64) + 1] = i * 2 end
    return #t
end

local function work_c(n)
    local s = 0
    for i = 1, n do s = s + bit.bxor(i, 0x5a5a) % 7 end
    return s
end

local works = { a = work_a, b = work_b, c = work_c }

-- CPU seconds per iteration of one function, measured in this worker.
function _M.calib(which)
    local f = works[which]
    f(10000)
    local n, reps, t0 = 100000, 0, os.clock()
    repeat
        f(n)
        reps = reps + 1
    until os.clock() - t0 > 0.4
    return (os.clock() - t0) / (reps * n)
end

-- CPU seconds spent in each function by /run since the last call of _M.spent: os.clock
-- around each whole loop, in the same requests the recording samples.
local spent = { a = 0, b = 0, c = 0 }

function _M.run(na, nb, nc)
    local t0 = os.clock()
    local ra = work_a(na)
    local t1 = os.clock()
    local rb = work_b(nb)
    local t2 = os.clock()
    local rc = work_c(nc)
    local t3 = os.clock()
    spent.a = spent.a + (t1 - t0)
    spent.b = spent.b + (t2 - t1)
    spent.c = spent.c + (t3 - t2)
    return ra + rb + rc
end

-- "a b c": the seconds spent so far; resets them.
function _M.spent()
    local out = string.format("%.9f %.9f %.9f", spent.a, spent.b, spent.c)
    spent.a, spent.b, spent.c = 0, 0, 0
    return out
end

local function spin(n)
    local x = 0
    for i = 1, n do x = (x + i * 3) % 65521 end
    return x
end

-- No tail calls below: a tail call replaces its caller's frame.
local function rec(depth, n)
    local r
    if depth <= 1 then
        r = spin(n)
    else
        r = rec(depth - 1, n) + 1
    end
    return r
end

function _M.deep(n)
    local r = rec(120, n)
    return r
end

local function co_busy(n)
    local r = spin(n)
    return r
end

function _M.co(n)
    local co = coroutine.wrap(function()
        local r = co_busy(n)
        return r
    end)
    local r = co()
    return r
end

local ffi = require "ffi"
ffi.cdef [[ void *memset(void *s, int c, size_t n); ]]
local buf = ffi.new("uint8_t[?]", 1048576)

local function ffi_fill(n)
    for i = 1, n do ffi.C.memset(buf, i % 256, 1048576) end
    return buf[7]
end

function _M.ffi(n)
    local r = ffi_fill(n)
    return r
end

local function churn(n)
    local keep
    for i = 1, n do keep = { i, tostring(i), { i } } end
    return keep[1]
end

function _M.gc(n)
    local r = churn(n)
    return r
end

-- `#big` runs lj_tab_len, which the interpreter calls without storing L->base (a binary
-- search here: the array part has trailing nils).
local big = {}
for i = 1, 100000 do big[i] = i end

local function lenloop(n)
    local s = 0
    for i = 1, n do s = s + #big end
    return s
end

function _M.len(n)
    local r = lenloop(n)
    return r
end

function _M.rep(n)
    local len = 0
    for i = 1, n do len = len + #string.rep("abc", 3000) end
    return len
end

return _M
"#;

const SERVER: &str = r#"
    location /calib { content_by_lua_block {
        local b = require "bench"
        ngx.say(string.format("%.17g", b.calib(ngx.var.arg_f)))
    } }
    location /run { content_by_lua_block {
        local b = require "bench"
        ngx.say(b.run(tonumber(ngx.var.arg_a), tonumber(ngx.var.arg_b), tonumber(ngx.var.arg_c)))
    } }
    location /spent { content_by_lua_block { ngx.say(require("bench").spent()) } }
    location /deep { content_by_lua_block { ngx.say(require("bench").deep(20000)) } }
    location /co { content_by_lua_block { ngx.say(require("bench").co(200000)) } }
    location /rep { content_by_lua_block { ngx.say(require("bench").rep(300)) } }
    location /ffi { content_by_lua_block { ngx.say(require("bench").ffi(200)) } }
    location /gc { content_by_lua_block { ngx.say(require("bench").gc(100000)) } }
    location /len { content_by_lua_block { ngx.say(require("bench").len(2000000)) } }
"#;

fn start(lj: Lj, jit: bool) -> Nginx {
    let init = if jit {
        "init_by_lua_block { require('jit').on() }"
    } else {
        "init_by_lua_block { require('jit').off() }"
    };
    let nginx = Nginx::start(lj, &[("bench", BENCH_LUA)], init, SERVER);
    let lib = nginx.luajit_path();
    match lj {
        Lj::Gc64 => assert!(lib.contains("/usr/lib/"), "GC64 worker maps {lib}"),
        Lj::Gc32 => assert!(lib.contains("nogc64"), "non-GC64 worker maps {lib}"),
    }
    nginx
}

fn has(frames: &[&str], prefix: &str) -> bool {
    frames.iter().any(|f| f.starts_with(prefix))
}

fn lua_flavour_line(rec: &Recorded, lj: Lj) {
    let want = match lj {
        Lj::Gc64 => "GC64)",
        Lj::Gc32 => "non-GC64)",
    };
    assert!(
        rec.stderr.contains(want),
        "flavour not detected as {want}: {}",
        rec.stderr
    );
}

fn accuracy(lj: Lj, jit: bool) {
    let nginx = start(lj, jit);
    let (rec, report, worst) = measure_shares(&nginx, lj, jit);
    assert!(
        worst <= 0.05,
        "{lj:?} jit={jit}: a share is off by more than 5 points:\n{report}{}",
        rec.dump()
    );
    // The module's functions carry its file path, under the content handler.
    let file = format!("{}/lua/bench.lua:", nginx.prefix.path().display());
    assert!(
        rec.stacks
            .keys()
            .any(|s| s.contains(&format!("work_a@{file}"))
                && s.contains("ngx_http_lua_content_by_chunk")),
        "no work_a@{file}… under ngx_http_lua_content_by_chunk: {}",
        rec.dump()
    );
    let errors = lua_errors(&rec);
    assert!(
        errors * 100 <= rec.total(),
        "more than 1% Lua unwind errors ({errors}): {}",
        rec.stderr
    );
}

/// The CPU seconds `/run` spent in work_a, work_b and work_c since the last call, measured in
/// the worker with `os.clock` around each function's whole loop (and reset).
fn spent(nginx: &Nginx) -> [f64; 3] {
    let body = nginx.get("/spent");
    let v: Vec<f64> = body
        .split_whitespace()
        .map(|x| {
            x.parse()
                .unwrap_or_else(|_| panic!("/spent answered {body:?}"))
        })
        .collect();
    <[f64; 3]>::try_from(v).unwrap_or_else(|v| panic!("/spent answered {v:?}"))
}

/// Records a load mixing work_a/b/c about 50/30/20 (by a calibration of their cost in the
/// worker) and returns the recording, a report and the largest share error against the CPU
/// the same requests were measured to spend in each function during the recording.
fn measure_shares(nginx: &Nginx, lj: Lj, jit: bool) -> (Recorded, String, f64) {
    let worker = nginx.worker().expect("worker");
    // Calibrate: CPU time per iteration of each function alone, in this worker and mode. It
    // only sets the mix; the expected shares are measured during the recording.
    let cost: Vec<f64> = ["a", "b", "c"]
        .iter()
        .map(|f| {
            let body = nginx.get(&format!("/calib?f={f}"));
            body.trim()
                .parse::<f64>()
                .unwrap_or_else(|_| panic!("calibration of {f}: {body:?}"))
        })
        .collect();
    let mix = [0.5, 0.3, 0.2];
    let per_request = 0.04; // seconds of Lua work per request
    let n: Vec<u64> = mix
        .iter()
        .zip(&cost)
        .map(|(s, c)| (s * per_request / c).max(1.0) as u64)
        .collect();
    let path = format!("/run?a={}&b={}&c={}", n[0], n[1], n[2]);
    nginx.get(&path);
    let load = Load::start(nginx.port, &path, 2, Duration::from_secs(30));
    common::wait_for_requests(&load, 4);
    spent(nginx);
    let rec = record(worker, 8, &[]);
    let truth = spent(nginx);
    assert!(rec.status.success(), "record failed: {}", rec.dump());
    lua_flavour_line(&rec, lj);
    let counts: Vec<u64> = ["work_a@", "work_b@", "work_c@"]
        .iter()
        .map(|p| rec.count(|f| has(f, p)))
        .collect();
    let lua_total: u64 = counts.iter().sum();
    assert!(
        lua_total >= 300,
        "too few Lua samples ({lua_total}): {}",
        rec.dump()
    );
    let truth_total: f64 = truth.iter().sum();
    assert!(
        truth_total > 1.0,
        "the worker spent only {truth_total:.3} s in the functions while recording"
    );
    let names = ["work_a", "work_b", "work_c"];
    let expected = names.iter().zip(truth).map(|(n, t)| (*n, t / truth_total));
    let (report, worst) = common::share_report(expected, |name| {
        let i = names.iter().position(|n| *n == name).unwrap_or(0);
        counts[i] as f64 / lua_total as f64
    });
    eprintln!("{lj:?} jit={jit}:\n{report}{}", rec.stderr);
    (rec, report, worst)
}

/// Sum of the Lua walk errors of the BPF side, as `record --summary` reports them.
fn lua_errors(rec: &Recorded) -> u64 {
    let errors = rec.summary["lua"]["errors"]
        .as_object()
        .unwrap_or_else(|| panic!("no lua.errors in the summary: {}", rec.summary));
    errors.values().filter_map(serde_json::Value::as_u64).sum()
}

#[test]
#[ignore = "needs root"]
fn accuracy_gc64_jit_on() {
    common::require_root!();
    accuracy(Lj::Gc64, true);
}

#[test]
#[ignore = "needs root"]
fn accuracy_gc64_jit_off() {
    common::require_root!();
    accuracy(Lj::Gc64, false);
}

#[test]
#[ignore = "needs root"]
fn accuracy_gc32_jit_on() {
    common::require_root!();
    accuracy(Lj::Gc32, true);
}

#[test]
#[ignore = "needs root"]
fn accuracy_gc32_jit_off() {
    common::require_root!();
    accuracy(Lj::Gc32, false);
}

/// The bounded Lua walk (the variant for kernels without `bpf_loop`), forced here.
const BOUNDED: &[(&str, &str)] = &[("APISIX_AGENT_LUA_WALK", "bounded")];

fn shape(lj: Lj, jit: bool) {
    shape_with(lj, jit, &[]);
}

fn shape_with(lj: Lj, jit: bool, env: &[(&str, &str)]) {
    let nginx = start(lj, jit);
    let worker = nginx.worker().expect("worker");
    let record = |pid, secs, extra: &[&str]| record_env(pid, secs, extra, env);

    // A recursion 120 Lua frames deep comes out whole.
    {
        let load = Load::start(nginx.port, "/deep", 2, Duration::from_secs(20));
        common::wait_for_requests(&load, 4);
        let rec = record(worker, 4, &[]);
        assert!(rec.status.success(), "record failed: {}", rec.dump());
        let in_spin = rec.count(|f| has(f, "spin@"));
        let whole = rec.count(|f| {
            has(f, "spin@") && f.iter().filter(|x| x.starts_with("rec@")).count() == 120
        });
        assert!(
            in_spin > 50 && whole * 100 >= in_spin * 95,
            "{whole}/{in_spin} samples in spin have all 120 rec frames\n{}",
            rec.dump()
        );
        let walk = if env.is_empty() {
            "bpf_loop"
        } else {
            "bounded"
        };
        assert_eq!(rec.summary["kernel"]["lua_walk"], walk, "{}", rec.dump());
        assert_eq!(
            rec.summary["kernel"]["max_lua_frames"],
            192,
            "{}",
            rec.dump()
        );
        let deepest = rec.counter(&["deepest_lua"]);
        assert!(
            deepest >= 120,
            "deepest Lua stack {deepest} < 120: {}",
            rec.dump()
        );
        // The seam: the Lua frames hang under ngx_lua's native frames, not under an unknown
        // root (the interpreter's subroutines such as lj_vm_mod push a return address).
        let seamed = rec.count(|f| {
            let run = f.iter().position(|x| *x == "ngx_http_lua_run_thread");
            let lua = f.iter().position(|x| x.starts_with("rec@"));
            matches!((run, lua), (Some(r), Some(l)) if r < l)
                && f.first().is_some_and(|x| *x == "_start" || *x == "main")
        });
        assert!(
            seamed * 100 >= in_spin * 95,
            "{seamed}/{in_spin} samples in spin hang under ngx_http_lua_run_thread\n{}",
            rec.dump()
        );
    }

    // A coroutine shows its own frames.
    {
        let load = Load::start(nginx.port, "/co", 2, Duration::from_secs(20));
        common::wait_for_requests(&load, 4);
        let rec = record(worker, 3, &[]);
        assert!(rec.status.success(), "record failed: {}", rec.dump());
        let total = rec.count(|f| has(f, "spin@"));
        let in_co = rec.count(|f| has(f, "co_busy@") && has(f, "spin@"));
        assert!(
            total > 50 && in_co * 100 >= total * 90,
            "{in_co}/{total} spin samples under co_busy\n{}",
            rec.dump()
        );
    }
}

#[test]
#[ignore = "needs root"]
fn shape_gc64_jit_on() {
    common::require_root!();
    shape(Lj::Gc64, true);
}

/// The bounded walk (kernels before 5.17) walks as deep and names the same frames.
#[test]
#[ignore = "needs root"]
fn shape_gc64_jit_on_bounded_walk() {
    common::require_root!();
    shape_with(Lj::Gc64, true, BOUNDED);
}

#[test]
#[ignore = "needs root"]
fn shape_gc32_jit_on_bounded_walk() {
    common::require_root!();
    shape_with(Lj::Gc32, true, BOUNDED);
}

#[test]
#[ignore = "needs root"]
fn shape_gc32_jit_off() {
    common::require_root!();
    shape(Lj::Gc32, false);
}

#[test]
#[ignore = "needs root"]
fn shape_gc32_jit_on() {
    common::require_root!();
    shape(Lj::Gc32, true);
}

/// `--lines` names frames by their current line: inside the function, not its first line.
#[test]
#[ignore = "needs root"]
fn lines_option_names_the_current_line() {
    common::require_root!();
    let nginx = start(Lj::Gc64, false);
    let worker = nginx.worker().expect("worker");
    let load = Load::start(nginx.port, "/deep", 2, Duration::from_secs(30));
    common::wait_for_requests(&load, 4);
    let line_of = |label: &str| -> u32 {
        label
            .rsplit_once(':')
            .and_then(|(_, l)| l.parse().ok())
            .unwrap_or_else(|| panic!("no line in {label}"))
    };
    let spin_lines = |rec: &Recorded| -> std::collections::BTreeSet<u32> {
        rec.stacks
            .keys()
            .flat_map(|s| s.split(';').map(str::to_owned).collect::<Vec<_>>())
            .filter(|f| f.starts_with("spin@"))
            .map(|f| line_of(&f))
            .collect()
    };
    let plain = record(worker, 2, &[]);
    assert!(plain.status.success(), "{}", plain.dump());
    let first = spin_lines(&plain);
    assert_eq!(first.len(), 1, "one first line for spin: {first:?}");
    let first = *first.iter().next().expect("spin line");
    let lines = record(worker, 2, &["--lines"]);
    assert!(lines.status.success(), "{}", lines.dump());
    let current = spin_lines(&lines);
    // A sample whose current line cannot be read (counted as `proto_line_unknown`) keeps
    // the first line: most, not all, samples name the current one.
    let spin_weight = |keep: &dyn Fn(u32) -> bool| -> u64 {
        lines
            .stacks
            .iter()
            .filter(|(stack, _)| {
                stack
                    .split(';')
                    .any(|f| f.starts_with("spin@") && keep(line_of(f)))
            })
            .map(|(_, n)| *n)
            .sum()
    };
    let in_body = spin_weight(&|l| l > first && l <= first + 3);
    let all = spin_weight(&|_| true);
    assert!(
        all > 0 && in_body * 100 >= all * 95,
        "spin starts at line {first}; --lines gave {current:?}, {in_body} of {all} samples \
         in its body\n{}",
        lines.dump()
    );
}

/// A C function called through the FFI appears under the Lua function that called it.
fn ffi(lj: Lj, jit: bool) {
    let nginx = start(lj, jit);
    let worker = nginx.worker().expect("worker");
    let load = Load::start(nginx.port, "/ffi", 2, Duration::from_secs(20));
    common::wait_for_requests(&load, 4);
    let rec = record(worker, 3, &[]);
    assert!(rec.status.success(), "record failed: {}", rec.dump());
    // libc's memset is an IFUNC variant without a dynamic symbol: `libc.so.6+0x…` unless
    // debug symbols are installed.
    let is_memset = |x: &str| x.contains("memset") || x.starts_with("libc.so.6+");
    let in_fill = rec.count(|f| f.iter().any(|x| x.starts_with("ffi_fill@")));
    // Trace code calls memset directly; the interpreter goes through the FFI's call
    // machinery (`builtin:ffi.meta___call;lj_cf_ffi_meta___call;…;lj_vm_ffi_call`), which
    // shows between the two, but no other Lua frame may.
    let under_lua = rec.count(|f| {
        let Some(lua) = f.iter().position(|x| x.starts_with("ffi_fill@")) else {
            return false;
        };
        let Some(c) = f.iter().rposition(|x| is_memset(x)) else {
            return false;
        };
        c > lua && !f[lua + 1..c].iter().any(|x| x.contains('@'))
    });
    assert!(
        in_fill > 30 && under_lua * 100 >= in_fill * 80,
        "memset under ffi_fill in {under_lua}/{in_fill} samples of ffi_fill\n{}",
        rec.dump()
    );
}

#[test]
#[ignore = "needs root"]
fn ffi_gc64_jit_on() {
    common::require_root!();
    ffi(Lj::Gc64, true);
}

#[test]
#[ignore = "needs root"]
fn ffi_gc32_jit_off() {
    common::require_root!();
    ffi(Lj::Gc32, false);
}

/// Allocation-heavy code shows garbage-collector samples as `[lua:gc]` under its frame.
#[test]
#[ignore = "needs root"]
fn gc_marker() {
    common::require_root!();
    let nginx = start(Lj::Gc64, false);
    let worker = nginx.worker().expect("worker");
    let load = Load::start(nginx.port, "/gc", 2, Duration::from_secs(20));
    common::wait_for_requests(&load, 4);
    let rec = record(worker, 3, &[]);
    assert!(rec.status.success(), "record failed: {}", rec.dump());
    // The collector runs where an allocation triggers it: in churn itself or in a fast
    // function it calls (`churn@…;builtin:tostring;[lua:gc]`); the marker is the leaf-most
    // Lua-side frame either way.
    let gc = rec.count(|f| {
        let churn = f.iter().position(|x| x.starts_with("churn@"));
        let marker = f.iter().position(|x| *x == "[lua:gc]");
        matches!((churn, marker), (Some(c), Some(m))
            if c < m && f[c + 1..m].iter().all(|x| x.starts_with("builtin:")))
    });
    let stray = rec.count(|f| f.contains(&"[lua:gc]") && !f.iter().any(|x| x.contains('@')));
    assert!(
        gc >= 5 && gc * 100 >= rec.total() * 2 && stray == 0,
        "[lua:gc] under churn in {gc}/{} samples, {stray} without Lua frames\n{}",
        rec.total(),
        rec.dump()
    );
}

/// Time in a C helper the interpreter calls without storing `L->base` (`lj_tab_len` for
/// `#t`) stays under the Lua function that called it, without unwind errors.
fn c_helper(lj: Lj) {
    let nginx = start(lj, false);
    let worker = nginx.worker().expect("worker");
    let load = Load::start(nginx.port, "/len", 2, Duration::from_secs(20));
    common::wait_for_requests(&load, 4);
    let rec = record(worker, 3, &[]);
    assert!(rec.status.success(), "record failed: {}", rec.dump());
    let total = rec.total();
    let in_len = rec.count(|f| has(f, "lenloop@"));
    assert!(
        total > 100 && in_len * 100 >= total * 90,
        "lenloop in only {in_len}/{total} samples\n{}",
        rec.dump()
    );
    let errors = lua_errors(&rec);
    let lualess: Vec<String> = rec
        .stacks
        .iter()
        .filter(|(s, _)| s.contains("lua") && !s.contains('@'))
        .map(|(s, n)| format!("{n} {s}"))
        .collect();
    assert!(
        errors * 100 <= total,
        "more than 1% Lua unwind errors ({errors}/{total}): {}\nstacks without a Lua frame: {lualess:#?}",
        rec.stderr
    );
}

#[test]
#[ignore = "needs root"]
fn c_helper_gc64() {
    common::require_root!();
    c_helper(Lj::Gc64);
}

#[test]
#[ignore = "needs root"]
fn c_helper_gc32() {
    common::require_root!();
    c_helper(Lj::Gc32);
}

fn builtin(lj: Lj) {
    // Interpreted, so that string.rep runs as the fast function it is.
    let nginx = start(lj, false);
    let worker = nginx.worker().expect("worker");
    let load = Load::start(nginx.port, "/rep", 2, Duration::from_secs(20));
    common::wait_for_requests(&load, 4);
    let rec = record(worker, 3, &[]);
    assert!(rec.status.success(), "record failed: {}", rec.dump());
    let in_rep = rec.count(|f| {
        f.windows(2)
            .any(|w| w[0].contains("rep@") && w[1] == "builtin:string.rep")
    });
    let total = rec.total();
    assert!(
        in_rep * 100 >= total * 30,
        "builtin:string.rep under the rep function in only {in_rep}/{total} samples\n{}",
        rec.dump()
    );
}

#[test]
#[ignore = "needs root"]
fn builtin_gc64() {
    common::require_root!();
    builtin(Lj::Gc64);
}

#[test]
#[ignore = "needs root"]
fn builtin_gc32() {
    common::require_root!();
    builtin(Lj::Gc32);
}

#[test]
#[ignore = "needs root"]
fn reload_and_killed_workers_end_the_recording_cleanly() {
    common::require_root!();
    let nginx = start(Lj::Gc64, true);
    let worker = nginx.worker().expect("worker");
    let _load = Load::start(nginx.port, "/deep", 2, Duration::from_secs(20));
    let handle = std::thread::spawn(move || record(worker, 15, &[]));
    std::thread::sleep(Duration::from_secs(2));
    // Reload: the old worker finishes its requests and exits; a new one starts.
    let st = std::process::Command::new("kill")
        .args(["-HUP", &nginx.master_pid().to_string()])
        .status()
        .expect("kill -HUP");
    assert!(st.success());
    let rec = handle.join().expect("record thread");
    assert!(rec.status.success(), "record failed: {}", rec.dump());
    assert_eq!(rec.summary["exited"], true, "{}", rec.dump());
    assert!(rec.total() > 50, "samples lost: {}", rec.dump());
    // Now kill the new worker while recording it.
    std::thread::sleep(Duration::from_millis(500));
    let worker = nginx.worker().expect("new worker");
    let handle = std::thread::spawn(move || record(worker, 15, &[]));
    std::thread::sleep(Duration::from_secs(2));
    let _ = std::process::Command::new("kill")
        .args(["-KILL", &worker.to_string()])
        .status();
    let rec = handle.join().expect("record thread");
    assert!(rec.status.success(), "record failed: {}", rec.dump());
    assert_eq!(rec.summary["exited"], true, "{}", rec.dump());
    assert!(rec.total() > 50, "samples lost: {}", rec.dump());
}
