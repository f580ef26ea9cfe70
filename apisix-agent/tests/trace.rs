//! Root tests of JIT-compiled Lua: the frames of functions LuaJIT inlined into a trace come
//! back from the trace's snapshots, on Debian's GC64 LuaJIT and on the non-GC64 build, with
//! the JIT on. Shares are checked against CPU measured in Lua with `os.clock` around whole
//! loops; that the functions really were inlined is shown from inside the VM (they are
//! constants of live traces, which call no Lua function without inlining it).

mod common;

use std::{collections::BTreeMap, fmt::Write as _, time::Duration};

use common::{Lj, Load, Nginx, Recorded, record};

/// Statements of work in each plugin-sized function (loop-free; each reads a table, so the
/// trace has guards and snapshots inside it).
const WORK: [(&str, usize); 5] = [("pa", 40), ("pb", 24), ("pc", 8), ("pd", 8), ("pe", 12)];

/// The Lua module: `pc` calls `pd` calls `pe` (three levels of inlining); `run` is the
/// runner loop, `poly` an APISIX-style plugin list walked with stride 2 (a polymorphic call
/// site), `branchy` a function whose branch spawns side traces, `ffi` an inlined function
/// that calls C through the FFI.
fn module() -> String {
    let mut m = String::from(
        r#"local _M = {}
local bit = require "bit"
local band, bxor = bit.band, bit.bxor
local ffi = require "ffi"
ffi.cdef [[ void *memset(void *s, int c, size_t n); ]]
local buf = ffi.new("uint8_t[?]", 65536)
local T = {}
for i = 1, 256 do T[i] = (i * 40503) % 65521 end
-- What the plugins write to, like APISIX's api_ctx: each store gives the trace a snapshot.
local ctx = { 0, 0, 0, 0, 0, 0, 0, 0 }
"#,
    );
    let body = |n: usize| -> String {
        (0..n)
            .map(|k| {
                format!(
                    "    h = band(bxor(h, T[band(h + i + {k}, 255) + 1]) * 33 + {k}, 0xfffff)\n    \
                     ctx[{}] = h\n",
                    k % 8 + 1
                )
            })
            .collect()
    };
    let work = |name: &str| WORK.iter().find(|(n, _)| *n == name).map_or(0, |w| w.1);
    for (name, calls) in [
        ("pe", None),
        ("pd", Some("pe")),
        ("pc", Some("pd")),
        ("pb", None),
        ("pa", None),
    ] {
        let _ = write!(m, "local function {name}(h, i)\n{}", body(work(name)));
        if let Some(callee) = calls {
            let _ = writeln!(m, "    h = {callee}(h, i)");
        }
        m.push_str("    return h\nend\n");
    }
    let _ = write!(
        m,
        r#"local function pbr(h, i)
    if i % 3 == 0 then
{}    else
{}    end
    return h
end
-- os.time is a C function the JIT does not compile: the trace stitches there (it ends with
-- os.time's frame, and a new trace starts after the call). The statements before the call
-- store nothing, so they have no snapshot of their own: they run in the interval that the
-- stitch's snapshot ends.
local function pst(h, i)
{}    local x = h
{}    h = band(x + os.time(), 0xfffff)
    return h
end
local function pf(h, i)
    local v = T[band(h + i, 255) + 1]
    ffi.C.memset(buf, band(v, 255), 65536)
    h = band(bxor(h, T[band(h + v, 255) + 1]) * 33, 0xfffff)
    ctx[1] = h
    return h
end
"#,
        body(16),
        body(16),
        body(4),
        (0..24)
            .map(|k| format!(
                "    x = band(bxor(x, T[band(x + i + {k}, 255) + 1]) * 33 + {k}, 0xfffff)\n"
            ))
            .collect::<String>()
    );
    m.push_str(
        r#"local funcs = { pa = pa, pb = pb, pc = pc, pd = pd, pe = pe, pbr = pbr, pf = pf, pst = pst }

-- CPU seconds per call of one function, measured in this worker: os.clock around a whole
-- loop that calls it, the same way the runners do.
function _M.calib(which)
    local f = funcs[which]
    local h, n, reps = 0, 200000, 0
    for i = 1, n do h = f(h, i) end
    local t0 = os.clock()
    repeat
        for i = 1, n do h = f(h, i) end
        reps = reps + 1
    until os.clock() - t0 > 0.4
    return (os.clock() - t0) / (reps * n), h
end

function _M.run(n)
    local h = 0
    for i = 1, n do
        h = pa(h, i)
        h = pb(h, i)
        h = pc(h, i)
    end
    return h
end

local plugins = { pa, { name = "a" }, pb, { name = "b" }, pc, { name = "c" } }

function _M.poly(n)
    local h = 0
    for i = 1, n do
        for j = 1, #plugins, 2 do
            h = plugins[j](h, i)
        end
    end
    return h
end

function _M.branchy(n)
    local h = 0
    for i = 1, n do
        h = pa(h, i)
        h = pbr(h, i)
    end
    return h
end

function _M.stitch(n)
    local h = 0
    for i = 1, n do
        h = pa(h, i)
        h = pst(h, i)
    end
    return h
end

-- The link types of the live traces (`stitch` for a trace that ends in a stitch).
function _M.linktypes()
    local jutil = require "jit.util"
    local seen = {}
    for tr = 1, 4000 do
        local info = jutil.traceinfo(tr)
        if info then seen[info.linktype] = true end
    end
    local out = {}
    for k in pairs(seen) do out[#out + 1] = k end
    table.sort(out)
    return table.concat(out, ",")
end

function _M.ffi(n)
    local h = 0
    for i = 1, n do h = pf(h, i) end
    return h
end

function _M.hot(n)
    local x = 0
    for i = 1, n do x = (x * 31 + i) % 1000003 end
    return x
end

-- `key .. number` in a loop: the interpreter's BC_CAT calls lj_meta_cat.
function _M.cat(n)
    local key, s = "key", nil
    for i = 1, n do s = key .. (i % 17) end
    return s
end

-- Which functions are constants of a live trace, i.e. inlined into compiled code (a
-- trace calls no Lua function without inlining it).
function _M.inlined()
    local jutil = require "jit.util"
    local consts = {}
    for tr = 1, 4000 do
        local info = jutil.traceinfo(tr)
        if info then
            -- Constants are numbered -1 downwards (the first is nil).
            for k = -1, -info.nk, -1 do
                local v = jutil.tracek(tr, k)
                if type(v) == "function" then consts[v] = true end
            end
        end
    end
    local out = {}
    for name, f in pairs(funcs) do
        if consts[f] then out[#out + 1] = name end
    end
    table.sort(out)
    return table.concat(out, ",")
end

return _M
"#,
    );
    m
}

const SERVER: &str = r#"
    location /calib { content_by_lua_block {
        ngx.say(string.format("%.17g", (require("plug").calib(ngx.var.arg_f))))
    } }
    location /run { content_by_lua_block { ngx.say(require("plug").run(tonumber(ngx.var.arg_n))) } }
    location /poly { content_by_lua_block { ngx.say(require("plug").poly(tonumber(ngx.var.arg_n))) } }
    location /branchy { content_by_lua_block { ngx.say(require("plug").branchy(tonumber(ngx.var.arg_n))) } }
    location /stitch { content_by_lua_block { ngx.say(require("plug").stitch(tonumber(ngx.var.arg_n))) } }
    location /linktypes { content_by_lua_block { ngx.say(require("plug").linktypes()) } }
    location /ffi { content_by_lua_block { ngx.say(require("plug").ffi(300)) } }
    location /hot { content_by_lua_block { ngx.say(require("plug").hot(3000000)) } }
    location /cat { content_by_lua_block { ngx.say(require("plug").cat(200000)) } }
    location /inlined { content_by_lua_block { ngx.say(require("plug").inlined()) } }
"#;

fn start(lj: Lj, jit: bool, http_extra: &str) -> Nginx {
    let init = if jit {
        "init_by_lua_block { require('jit').on() }"
    } else {
        "init_by_lua_block { require('jit').off() }"
    };
    Nginx::start(
        lj,
        &[("plug", &module())],
        &format!("{init}\n{http_extra}"),
        SERVER,
    )
}

/// Records the worker for `secs` seconds while two clients load `path` (from their first
/// ten requests on until the recording ends); panics if `record` fails.
fn record_under_load(nginx: &Nginx, path: &str, secs: u64, extra: &[&str]) -> Recorded {
    let worker = nginx.worker().expect("worker");
    let load = Load::start(nginx.port, path, 2, Duration::from_secs(secs + 25));
    common::wait_for_requests(&load, 10);
    let rec = record(worker, secs, extra);
    assert!(rec.status.success(), "record failed: {}", rec.dump());
    rec
}

/// Seconds of CPU per call of `f`, measured in the worker.
fn calib(nginx: &Nginx, f: &str) -> f64 {
    let body = nginx.get(&format!("/calib?f={f}"));
    body.trim()
        .parse::<f64>()
        .unwrap_or_else(|_| panic!("calibration of {f}: {body:?}"))
}

fn has(frames: &[&str], prefix: &str) -> bool {
    frames.iter().any(|f| f.starts_with(prefix))
}

/// First line of each function of the module, by name.
fn def_lines() -> BTreeMap<String, u32> {
    module()
        .lines()
        .enumerate()
        .filter_map(|(i, l)| {
            let name = l
                .strip_prefix("local function ")
                .or_else(|| l.strip_prefix("function _M."))?;
            Some((name.split('(').next()?.to_owned(), i as u32 + 1))
        })
        .collect()
}

/// Whether a frame is function `name` of the module, whatever its call site called it
/// (`plugins[j](…)` names it `anonymous`): by its file and first line.
fn is_fn(frame: &str, name: &str) -> bool {
    let line = def_lines()
        .get(name)
        .copied()
        .unwrap_or_else(|| panic!("no function {name} in the module"));
    frame.ends_with(&format!("/lua/plug.lua:{line}")) && frame.contains('@')
}

fn has_fn(frames: &[&str], name: &str) -> bool {
    frames.iter().any(|f| is_fn(f, name))
}

/// Records `path` under load and checks each function's inclusive share of the
/// samples in `roots` against the shares `expected` derives from the CPU per call of the
/// functions `calibrated` (name → seconds), within 5 points. The calibration runs right
/// before and right after the recording, in the same worker, and the two are averaged.
fn check_shares(
    nginx: &Nginx,
    path: &str,
    roots: &[&str],
    calibrated: &[&'static str],
    expected: impl Fn(&BTreeMap<&'static str, f64>) -> BTreeMap<&'static str, f64>,
    what: &str,
) -> Recorded {
    let worker = nginx.worker().expect("worker");
    nginx.get(path);
    let before = costs(nginx, calibrated);
    let rec = {
        let load = Load::start(nginx.port, path, 2, Duration::from_secs(40));
        // Warm: its traces compiled before the recording starts.
        common::wait_for_requests(&load, 10);
        record(worker, 8, &[])
    };
    assert!(rec.status.success(), "record failed: {}", rec.dump());
    let after = costs(nginx, calibrated);
    let cost: BTreeMap<&'static str, f64> = before
        .iter()
        .map(|(n, c)| (*n, (c + after[n]) / 2.0))
        .collect();
    let drift: String = before
        .iter()
        .map(|(n, c)| format!("{n}: {:.1} → {:.1} ns per call\n", c * 1e9, after[n] * 1e9))
        .collect();
    let expected = expected(&cost);
    let total = rec.count(|f| roots.iter().any(|r| has_fn(f, r)));
    assert!(
        total >= 1000,
        "{what}: too few samples ({total}): {}",
        rec.dump()
    );
    let (report, worst) = common::share_report(expected.iter().map(|(n, w)| (*n, *w)), |name| {
        rec.count(|f| has_fn(f, name)) as f64 / total as f64
    });
    eprintln!(
        "{what}:\n{report}calibration before → after:\n{drift}{}",
        rec.stderr
    );
    assert!(
        worst <= 0.05,
        "{what}: a share is off by more than 5 points:\n{report}calibration before → after:\n\
         {drift}{}",
        rec.dump()
    );
    rec
}

/// Inclusive CPU per call: `pc` includes `pd`, which includes `pe`.
fn costs(nginx: &Nginx, names: &[&'static str]) -> BTreeMap<&'static str, f64> {
    names.iter().map(|n| (*n, calib(nginx, n))).collect()
}

fn shares(costs: &BTreeMap<&'static str, f64>, of: &[&str]) -> BTreeMap<&'static str, f64> {
    let sum: f64 = of.iter().map(|n| costs[n]).sum();
    costs.iter().map(|(n, c)| (*n, c / sum)).collect()
}

fn inlined(lj: Lj) {
    common::require_root!();
    let nginx = start(lj, true, "");
    let rec = check_shares(
        &nginx,
        "/run?n=20000",
        &["pa", "pb", "pc"],
        &["pa", "pb", "pc", "pd", "pe"],
        |cost| shares(cost, &["pa", "pb", "pc"]),
        &format!("{lj:?} runner loop"),
    );
    let samples = summary_u64(&rec, &["trace", "samples"]);
    let with_frames = summary_u64(&rec, &["trace", "inlined"]);
    assert!(
        samples > 300 && with_frames * 100 >= samples * 95,
        "{lj:?}: {with_frames}/{samples} trace samples got inlined frames: {}",
        rec.summary["trace"]
    );
    // Inlined for real: the functions are constants of live traces.
    let consts = nginx.get("/inlined");
    for f in ["pa", "pb", "pc", "pd", "pe"] {
        assert!(
            consts.trim().split(',').any(|c| c == f),
            "{f} is not in a trace: {consts}"
        );
    }
    // Three levels: pe under pd under pc under the runner, all in the worker's trace.
    let nested = rec.count(|f| {
        let pos = |p: &str| f.iter().position(|x| is_fn(x, p));
        matches!(
            (pos("run"), pos("pc"), pos("pd"), pos("pe")),
            (Some(r), Some(c), Some(d), Some(e)) if r < c && c < d && d < e
        )
    });
    let in_pe = rec.count(|f| has_fn(f, "pe"));
    assert!(
        in_pe > 20 && nested * 100 >= in_pe * 95,
        "{nested}/{in_pe} samples in pe hang under run;pc;pd\n{}",
        rec.dump()
    );
}

#[test]
#[ignore = "needs root"]
fn inlined_gc64() {
    inlined(Lj::Gc64);
}

#[test]
#[ignore = "needs root"]
fn inlined_gc32() {
    inlined(Lj::Gc32);
}

/// A plugin list walked with stride 2 (a polymorphic call site: side traces per plugin) and a
/// branchy inlined function.
fn trace_shapes(lj: Lj) {
    common::require_root!();
    let nginx = start(lj, true, "");
    check_shares(
        &nginx,
        "/poly?n=20000",
        &["pa", "pb", "pc"],
        &["pa", "pb", "pc"],
        |cost| shares(cost, &["pa", "pb", "pc"]),
        &format!("{lj:?} plugin list"),
    );
    check_shares(
        &nginx,
        "/branchy?n=20000",
        &["pa", "pbr"],
        &["pa", "pbr"],
        |cost| shares(cost, &["pa", "pbr"]),
        &format!("{lj:?} branchy"),
    );
}

#[test]
#[ignore = "needs root"]
fn trace_shapes_gc64() {
    trace_shapes(Lj::Gc64);
}

#[test]
#[ignore = "needs root"]
fn trace_shapes_gc32() {
    trace_shapes(Lj::Gc32);
}

/// A trace that stitches to a C function (`os.time`) from an inlined function: the code
/// before the stitch keeps its inlined frames (none falls back for an unknown function),
/// and the shares hold.
fn stitched(lj: Lj) {
    common::require_root!();
    let nginx = start(lj, true, "");
    let rec = check_shares(
        &nginx,
        "/stitch?n=20000",
        &["pa", "pst"],
        &["pa", "pst"],
        |cost| shares(cost, &["pa", "pst"]),
        &format!("{lj:?} stitch"),
    );
    let links = nginx.get("/linktypes");
    assert!(
        links.trim().split(',').any(|l| l == "stitch"),
        "{lj:?}: no live trace stitches: {links}"
    );
    let samples = summary_u64(&rec, &["trace", "samples"]);
    let unknown = summary_u64(&rec, &["trace", "fallbacks", "trace_func_unknown"]);
    assert!(
        samples > 300 && unknown * 100 <= samples,
        "{lj:?}: {unknown}/{samples} trace samples fell back for an unknown function: {}",
        rec.summary["trace"]
    );
}

#[test]
#[ignore = "needs root"]
fn stitched_gc64() {
    stitched(Lj::Gc64);
}

#[test]
#[ignore = "needs root"]
fn stitched_gc32() {
    stitched(Lj::Gc32);
}

/// A C function called through the FFI from an inlined function appears under it.
fn ffi_from_inlined_function(lj: Lj) {
    common::require_root!();
    let nginx = start(lj, true, "");
    let rec = record_under_load(&nginx, "/ffi", 5, &[]);
    let is_memset = |x: &str| x.contains("memset") || x.starts_with("libc.so.6+");
    let in_memset = rec.count(|f| f.last().is_some_and(|x| is_memset(x)));
    let under_pf = rec.count(|f| {
        let n = f.len();
        n >= 2 && is_memset(f[n - 1]) && is_fn(f[n - 2], "pf")
    });
    assert!(
        in_memset > 50 && under_pf * 100 >= in_memset * 90,
        "{lj:?}: memset directly under pf in {under_pf}/{in_memset} samples\n{}",
        rec.dump()
    );
}

#[test]
#[ignore = "needs root"]
fn ffi_from_inlined_function_gc64() {
    ffi_from_inlined_function(Lj::Gc64);
}

#[test]
#[ignore = "needs root"]
fn ffi_from_inlined_function_gc32() {
    ffi_from_inlined_function(Lj::Gc32);
}

/// `key .. number` in the interpreter: samples in lj_meta_cat keep their Lua frames.
fn concat(lj: Lj) {
    common::require_root!();
    let nginx = start(lj, false, "");
    let rec = record_under_load(&nginx, "/cat", 5, &[]);
    // In Lua: the stack runs through LuaJIT (its VM, a helper, the C API).
    let luajit = |f: &[&str]| {
        f.iter()
            .any(|x| x.starts_with("lj_") || x.starts_with("lua_") || x.contains("libluajit"))
    };
    let in_lua = rec.count(|f| luajit(f) || f.iter().any(|x| x.contains('@')));
    let without = rec.count(|f| luajit(f) && !f.iter().any(|x| x.contains('@')));
    let in_cat = rec.count(|f| has(f, "cat@"));
    let lualess: Vec<String> = rec
        .stacks
        .iter()
        .filter(|(s, _)| {
            let f: Vec<&str> = s.split(';').collect();
            luajit(&f) && !s.contains('@')
        })
        .map(|(s, n)| format!("{n} {s}"))
        .collect();
    let errors: u64 = rec.summary["lua"]["errors"]
        .as_object()
        .map(|m| m.values().filter_map(|v| v.as_u64()).sum())
        .unwrap_or_else(|| panic!("no lua errors in the summary: {}", rec.summary));
    assert!(
        errors * 100 <= rec.total(),
        "{lj:?}: more than 1% Lua unwind errors: {}",
        rec.summary
    );
    assert!(
        in_lua > 200 && without * 100 < in_lua && in_cat * 100 >= in_lua * 90,
        "{lj:?}: {without}/{in_lua} samples in Lua without a Lua frame, {in_cat} under cat\n\
         {lualess:#?}\n{}",
        rec.dump()
    );
}

#[test]
#[ignore = "needs root"]
fn concat_gc64() {
    concat(Lj::Gc64);
}

#[test]
#[ignore = "needs root"]
fn concat_gc32() {
    concat(Lj::Gc32);
}

/// A summary count, 0 when absent.
fn summary_u64(rec: &Recorded, path: &[&str]) -> u64 {
    let mut v = &rec.summary;
    for p in path {
        v = &v[*p];
    }
    v.as_u64().unwrap_or(0)
}

/// Share of Lua samples in the given VM states.
fn vm_share(rec: &Recorded, states: &[&str]) -> f64 {
    let all = rec.summary["vm_states"]
        .as_object()
        .unwrap_or_else(|| panic!("no vm_states in the summary: {}", rec.summary));
    let total: u64 = all.values().filter_map(|v| v.as_u64()).sum();
    let some: u64 = states
        .iter()
        .filter_map(|s| all.get(*s).and_then(|v| v.as_u64()))
        .sum();
    assert!(total > 100, "too few Lua samples: {}", rec.summary);
    some as f64 / total as f64
}

/// Traces flushed every 100 ms while recording: no crash, every fallback counted, no frame
/// from a stale trace (every Lua frame names a function of the module at its own line).
fn flush(lj: Lj) {
    common::require_root!();
    let nginx = start(
        lj,
        true,
        "init_worker_by_lua_block { ngx.timer.every(0.1, function() require('jit').flush() end) }",
    );
    let rec = record_under_load(&nginx, "/run?n=4000", 6, &[]);
    // Function definitions of the module: first line → name.
    let defs: BTreeMap<u32, String> = def_lines().into_iter().map(|(n, l)| (l, n)).collect();
    let file = format!("{}/lua/plug.lua:", nginx.prefix.path().display());
    let mut bad = Vec::new();
    for stack in rec.stacks.keys() {
        for frame in stack.split(';') {
            let Some((name, rest)) = frame.split_once('@') else {
                continue;
            };
            let Some(line) = rest.strip_prefix(&file) else {
                continue;
            };
            let line: u32 = line.parse().unwrap_or(0);
            let ok = match defs.get(&line) {
                Some(def) => name == def || name.ends_with(&format!(".{def}")),
                None => false,
            };
            if !ok {
                bad.push(frame.to_owned());
            }
        }
    }
    assert!(
        bad.is_empty(),
        "frames naming no function of the module: {bad:?}"
    );
    let samples = summary_u64(&rec, &["trace", "samples"]);
    let inlined = summary_u64(&rec, &["trace", "inlined"]);
    let fallbacks: u64 = rec.summary["trace"]["fallbacks"]
        .as_object()
        .map(|m| m.values().filter_map(|v| v.as_u64()).sum())
        .unwrap_or(0);
    eprintln!(
        "{lj:?} flush every 100 ms: {samples} trace samples, {inlined} with inlined frames, \
         {fallbacks} fell back: {}",
        rec.summary["trace"]
    );
    assert!(samples > 50 && inlined > 0, "{}", rec.dump());
}

#[test]
#[ignore = "needs root"]
fn flush_gc64() {
    flush(Lj::Gc64);
}

#[test]
#[ignore = "needs root"]
fn flush_gc32() {
    flush(Lj::Gc32);
}

/// The VM-state split: interpreted code with the JIT off, compiled code for a hot loop.
#[test]
#[ignore = "needs root"]
fn vm_states() {
    common::require_root!();
    for (jit, path, states, min) in [
        (false, "/run?n=3000", &["interpreted", "c"][..], 0.95),
        (true, "/hot", &["compiled"][..], 0.80),
    ] {
        let nginx = start(Lj::Gc64, jit, "");
        let extra: &[&str] = if jit { &["--trace-frames"] } else { &[] };
        let rec = record_under_load(&nginx, path, 4, extra);
        if jit {
            // --trace-frames: the trace shows as a pseudo-frame right above its base frame.
            let marked = rec.count(|f| {
                f.windows(2)
                    .any(|w| w[0].starts_with("hot@") && w[1].starts_with("[trace "))
            });
            let in_hot = rec.count(|f| has(f, "hot@"));
            assert!(
                in_hot > 100 && marked * 100 >= in_hot * 80,
                "[trace N] under hot in {marked}/{in_hot} samples\n{}",
                rec.dump()
            );
        }
        let share = vm_share(&rec, states);
        eprintln!(
            "jit={jit} {path}: {states:?} {:.1}% {}",
            share * 100.0,
            rec.summary["vm_states"]
        );
        assert!(
            share >= min,
            "jit={jit} {path}: {states:?} only {:.1}%: {}",
            share * 100.0,
            rec.summary
        );
    }
}
