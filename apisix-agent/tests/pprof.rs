//! Root tests of the pprof endpoints (`/debug/pprof/profile`, `/debug/pprof/offcpu`,
//! `/flamegraph?…&format=pprof`): the real daemon against real nginx-lua workers (on the host
//! and in a Docker container) under bounded loopback load, read with Go's own reader, `go
//! tool pprof` (Debian's golang-go, installed by scripts/setup-test.sh), and decoded with the
//! agent's own prost types for what Go's text reports do not show.
//!
//! Checked: the profile of a window holds exactly the samples of the collapsed `/flamegraph`
//! of the same window (totals, every function's flat and cumulative counts as `-top` reads
//! them); Lua functions carry their file and first line, locations their current line, and
//! the frames a JIT trace inlined are inline lines of the physical frame's location; labels
//! (container, image, process, plugin, phase, never a pid); two consecutive scrapes cover
//! consecutive windows with every sample once; bad input gets a 400 JSON error; captures
//! with format=pprof (CPU, off-CPU, and Lua heap captures as `alloc_space` / `inuse_space`);
//! off-CPU time against the time measured in Lua.

mod common;

use std::{
    collections::{BTreeMap, BTreeSet},
    process::Command,
    thread,
    time::{Duration, Instant},
};

use apisix_agent::output::pprof::{Profile, decode};
use common::{
    Lj, Load, Nginx,
    container::{Container, IMAGE, require_docker},
    daemon::{Agent, RawResponse, wait_for},
    parse_folded,
};

/// The worker's Lua: `mix` (lines 7–13) is small and called in `burn`'s loop (lines 14–20),
/// so with the JIT on LuaJIT inlines it into the loop's trace; its table stores give the trace
/// snapshots inside it. The line numbers are asserted below.
const WORK: &str = r#"local _M = {}
local bit = require "bit"
local band, bxor = bit.band, bit.bxor
local T = {}
for i = 1, 256 do T[i] = (i * 40503) % 65521 end
local ctx = { 0, 0, 0, 0 }
local function mix(h, i)
    h = band(bxor(h, T[band(h + i, 255) + 1]) * 33, 0xfffff)
    ctx[1] = h
    h = band(bxor(h, T[band(h + 7, 255) + 1]) * 33, 0xfffff)
    ctx[2] = h
    return h
end
function _M.burn(n)
    local h = 0
    for i = 1, n do
        h = mix(h, i)
    end
    return h
end
return _M
"#;

/// An APISIX-style plugin (its file under `apisix/plugins/`) that runs the same work in the
/// access phase (not as a tail call, which would leave no frame of the plugin).
const PLUGIN: &str = r#"local _M = {}
local work = require "pprofwork"
function _M.access()
    local h = work.burn(40000)
    return h
end
return _M
"#;

const SERVER: &str = r#"
    location / {
        access_by_lua_block { require("apisix.plugins.pprof-demo").access() }
        content_by_lua_block { ngx.say(require("pprofwork").burn(80000)) }
    }
"#;

const MIX_LINES: std::ops::RangeInclusive<i64> = 7..=13;
const BURN_LINES: std::ops::RangeInclusive<i64> = 14..=20;

fn host_nginx() -> Nginx {
    Nginx::start(
        Lj::Gc64,
        &[("pprofwork", WORK), ("apisix/plugins/pprof-demo", PLUGIN)],
        "",
        SERVER,
    )
}

/// Waits until the agent profiles `pid`.
fn wait_target(agent: &Agent, pid: u32) {
    let found = wait_for(15, || {
        let (_, body) = agent.get("/targets");
        let targets: serde_json::Value = serde_json::from_str(&body).ok()?;
        targets
            .as_array()?
            .iter()
            .any(|t| t["pid"] == pid)
            .then_some(())
    });
    assert!(
        found.is_some(),
        "pid {pid} never became a target:\n{}",
        agent.log()
    );
}

/// Bounded load for `secs`, then a quiet second: the worker idles in epoll (the CPU sampler
/// takes no sample) and what was sampled has reached the agent.
fn load_then_quiet(port: u16, secs: u64) -> u64 {
    let load = Load::start(port, "/", 2, Duration::from_secs(secs));
    thread::sleep(Duration::from_secs(secs));
    let requests = load.requests.load(std::sync::atomic::Ordering::Relaxed);
    drop(load);
    thread::sleep(Duration::from_secs(1));
    assert!(requests > 0, "the load made no request");
    requests
}

/// A 200 profile response, decoded.
fn profile(agent: &Agent, path: &str) -> (RawResponse, Profile) {
    let r = agent.get_raw(path);
    assert_eq!(
        r.status,
        200,
        "{path}: {}\n{}",
        String::from_utf8_lossy(&r.body),
        agent.log()
    );
    assert_eq!(r.header("content-type"), Some("application/octet-stream"));
    assert_eq!(&r.body[..2], &[0x1f, 0x8b], "{path}: not gzip-compressed");
    let p = decode(&r.body).unwrap_or_else(|e| panic!("{path}: not a pprof profile: {e}"));
    (r, p)
}

/// `go tool pprof ARGS FILE` on `bytes`; its standard output.
fn go_pprof(args: &[&str], bytes: &[u8]) -> String {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("profile.pb.gz");
    std::fs::write(&file, bytes).expect("write profile");
    let out = Command::new("go")
        .args(["tool", "pprof"])
        .args(args)
        .arg(&file)
        // go needs a home for its caches; CI may run without one.
        .env("HOME", dir.path())
        .env("GOCACHE", dir.path().join("cache"))
        .env("GOTOOLCHAIN", "local")
        .output()
        .unwrap_or_else(|e| {
            panic!("go tool pprof: {e} (apt-get install golang-go, see scripts/setup-test.sh)")
        });
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "go tool pprof {args:?} failed: {stderr}"
    );
    assert!(
        !stderr.contains("rror"),
        "go tool pprof {args:?} complained: {stderr}"
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// What `go tool pprof -raw` printed: the profile's text dump.
#[derive(Debug, Default)]
struct Raw {
    period_type: String,
    period: u64,
    sample_types: String,
    /// (values, labels) per sample.
    samples: Vec<(Vec<u64>, BTreeMap<String, String>)>,
    /// Location id → the function names of its lines, innermost first.
    locations: BTreeMap<u64, Vec<String>>,
}

fn raw(bytes: &[u8]) -> Raw {
    let text = go_pprof(&["-raw"], bytes);
    let mut r = Raw::default();
    let mut section = "";
    let mut last_location = None;
    for line in text.lines() {
        if let Some(v) = line.strip_prefix("PeriodType: ") {
            r.period_type = v.to_owned();
        } else if let Some(v) = line.strip_prefix("Period: ") {
            r.period = v.trim().parse().expect("period");
        } else if line == "Samples:" || line == "Locations" || line == "Mappings" {
            section = line;
        } else if section == "Samples:" && r.sample_types.is_empty() {
            r.sample_types = line.trim().to_owned();
        } else if section == "Samples:" && line.contains(":[") {
            // `key:[value] key:[value]` under the sample.
            let labels = line
                .split_whitespace()
                .filter_map(|kv| kv.split_once(":["))
                .map(|(k, v)| (k.to_owned(), v.strip_suffix(']').unwrap_or(v).to_owned()))
                .collect();
            if let Some(s) = r.samples.last_mut() {
                s.1 = labels;
            }
        } else if section == "Samples:"
            && let Some((values, _)) = line.split_once(':')
        {
            let values = values
                .split_whitespace()
                .map(|v| v.parse().expect("sample value"))
                .collect();
            r.samples.push((values, BTreeMap::new()));
        } else if section == "Locations" {
            // `  ID: 0xADDR M=N NAME FILE:LINE s=START` then, for inlined callers, lines
            // of `NAME FILE:LINE s=START` alone.
            let mut words = line.split_whitespace();
            let first = words.next().unwrap_or("");
            if let Some(id) = first.strip_suffix(':').and_then(|i| i.parse().ok()) {
                let name = words.find(|w| !w.starts_with("0x") && !w.starts_with("M="));
                r.locations
                    .insert(id, name.map(str::to_owned).into_iter().collect());
                last_location = Some(id);
            } else if let Some(id) = last_location
                && !first.is_empty()
            {
                r.locations.entry(id).or_default().push(first.to_owned());
            }
        }
    }
    r
}

/// Function → (flat, cum) in the unit of `sample_index` (bytes unscaled for `*_space`), as
/// `go tool pprof -top` reads them.
fn top(bytes: &[u8], sample_index: &str) -> BTreeMap<String, (u64, u64)> {
    let in_bytes = sample_index.ends_with("_space");
    let index = format!("-sample_index={sample_index}");
    let mut args = vec!["-top", &index, "-nodefraction=0", "-nodecount=1000000"];
    if in_bytes {
        args.push("-unit=B");
    }
    let text = go_pprof(&args, bytes);
    let mut out = BTreeMap::new();
    let mut rows = false;
    for line in text.lines() {
        if line.trim_start().starts_with("flat  flat%") {
            rows = true;
            continue;
        }
        if !rows {
            continue;
        }
        let words: Vec<&str> = line.split_whitespace().collect();
        if words.len() < 6 {
            continue;
        }
        let name = words[5..].join(" ");
        let name = name.trim_end_matches(" (inline)").to_owned();
        let n = |w: &str| {
            let v = if in_bytes { w.trim_end_matches('B') } else { w };
            v.parse::<u64>()
                .unwrap_or_else(|_| panic!("-top value {w:?}"))
        };
        out.insert(name, (n(words[0]), n(words[3])));
    }
    out
}

/// Function → (flat, cum) of folded stacks: the leaf takes flat, every distinct frame of a
/// stack cum once.
fn flat_cum(folded: &BTreeMap<String, u64>) -> BTreeMap<String, (u64, u64)> {
    let mut out: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    for (stack, n) in folded {
        let frames: Vec<&str> = stack.split(';').collect();
        if let Some(leaf) = frames.last() {
            out.entry((*leaf).to_owned()).or_default().0 += n;
        }
        for f in frames.iter().collect::<BTreeSet<_>>() {
            out.entry((*f).to_owned()).or_default().1 += n;
        }
    }
    out
}

fn s(p: &Profile, i: i64) -> &str {
    &p.string_table[usize::try_from(i).expect("string index")]
}

/// Sum of value `index` over the samples of `p`.
fn total(p: &Profile, index: usize) -> i64 {
    p.sample.iter().map(|x| x.value[index]).sum()
}

/// The labels of each sample of `p`.
fn labels(p: &Profile) -> Vec<BTreeMap<&str, &str>> {
    p.sample
        .iter()
        .map(|x| x.label.iter().map(|l| (s(p, l.key), s(p, l.str))).collect())
        .collect()
}

/// The pprof samples (by value `index`) of the stacks holding a frame whose function name
/// contains `needle`.
fn weight_of(p: &Profile, needle: &str, index: usize) -> i64 {
    let names: BTreeMap<u64, &str> = p.function.iter().map(|f| (f.id, s(p, f.name))).collect();
    let lines: BTreeMap<u64, Vec<u64>> = p
        .location
        .iter()
        .map(|l| (l.id, l.line.iter().map(|x| x.function_id).collect()))
        .collect();
    p.sample
        .iter()
        .filter(|x| {
            x.location_id.iter().any(|l| {
                lines[l]
                    .iter()
                    .any(|f| names.get(f).is_some_and(|n| n.contains(needle)))
            })
        })
        .map(|x| x.value[index])
        .sum()
}

fn folded_total(folded: &BTreeMap<String, u64>) -> u64 {
    folded.values().sum()
}

fn collapsed(agent: &Agent, query: &str) -> BTreeMap<String, u64> {
    let (status, body) = agent.get(&format!("/flamegraph?{query}&format=collapsed"));
    assert_eq!(status, 200, "{body}");
    parse_folded(&body)
}

#[test]
#[ignore = "needs root"]
fn profile_endpoint_matches_flamegraph_and_go_pprof_reads_it() {
    common::require_root!();
    let nginx = host_nginx();
    let worker = nginx.worker().expect("worker");
    let agent = Agent::start("sampling:\n  frequency_hz: 99\n  retention_seconds: 30\n");
    wait_target(&agent, worker);
    let pid = format!("pid={worker}");

    // Window A: a first burst of load, then quiet; the scrape covers all of it.
    load_then_quiet(nginx.port, 3);
    let t_a = Instant::now();
    let (ra, a) = profile(&agent, &format!("/debug/pprof/profile?seconds=8&{pid}"));
    assert_eq!(ra.header("x-profile-seconds"), Some("8"));
    assert_eq!(ra.header("x-profile-clamped"), None);
    // The collapsed flame graph of the same (quiet) moment: the retention window, which
    // holds only burst A.
    let folded_a = collapsed(&agent, &pid);
    let pprof_a = total(&a, 0);
    assert!(pprof_a > 50, "only {pprof_a} samples in window A");
    assert_eq!(
        u64::try_from(pprof_a).ok(),
        Some(folded_total(&folded_a)),
        "pprof and /flamegraph totals differ"
    );

    // Window B: the next scrape of the same length, one window later (as a scraper with an
    // 8 s interval). Its start falls in the quiet second before burst B, its end after it.
    thread::sleep(Duration::from_secs(1));
    load_then_quiet(nginx.port, 3);
    thread::sleep(Duration::from_secs(8).saturating_sub(t_a.elapsed()));
    let (_, b) = profile(&agent, &format!("/debug/pprof/profile?seconds=8&{pid}"));
    let folded_ab = collapsed(&agent, &pid);
    let (_, ab) = profile(&agent, &format!("/debug/pprof/profile?seconds=30&{pid}"));
    // The windows meet, up to how late each request reached the agent (the scraper's clock
    // decides where windows start); every sample is in exactly one of them (below).
    let end_a = a.time_nanos + a.duration_nanos;
    let gap_ms = (b.time_nanos - end_a) as f64 / 1e6;
    assert!(
        gap_ms.abs() < 500.0,
        "window B starts {gap_ms:.1} ms after window A ends"
    );
    assert_eq!(b.duration_nanos, 8_000_000_000);
    let pprof_b = total(&b, 0);
    assert!(pprof_b > 50, "only {pprof_b} samples in window B");
    // Every sample once: A and B together are the whole retention window.
    assert_eq!(
        u64::try_from(pprof_a + pprof_b).ok(),
        Some(folded_total(&folded_ab)),
        "A ({pprof_a}) + B ({pprof_b}) vs the flame graph of both"
    );
    assert_eq!(total(&ab, 0), pprof_a + pprof_b);

    // What Go reads: the header, the totals, every function's flat and cumulative counts.
    let go_raw = raw(&ra.body);
    assert_eq!(go_raw.period_type, "cpu nanoseconds");
    assert_eq!(go_raw.period, 1_000_000_000 / 99);
    assert_eq!(go_raw.sample_types, "samples/count cpu/nanoseconds[dflt]");
    let go_total: u64 = go_raw.samples.iter().map(|x| x.0[0]).sum();
    assert_eq!(go_total, folded_total(&folded_a));
    for (values, _) in &go_raw.samples {
        assert_eq!(
            values[1],
            values[0] * go_raw.period,
            "cpu = samples × period"
        );
    }
    let go_top = top(&ra.body, "samples");
    let want = flat_cum(&folded_a);
    let lua: Vec<&String> = want
        .keys()
        .filter(|f| f.contains("pprofwork.lua") || f.contains("pprof-demo.lua"))
        .collect();
    assert!(
        lua.len() >= 3,
        "too few Lua functions in the flame graph: {want:?}"
    );
    for (function, counts) in &want {
        assert_eq!(
            go_top.get(function),
            Some(counts),
            "{function}: go tool pprof -top (flat, cum) vs /flamegraph"
        );
    }
    assert_eq!(
        go_top.len(),
        want.len(),
        "functions only go tool pprof shows"
    );
    // The Lua function with the most samples of its own is the work's.
    let heaviest_lua = go_top
        .iter()
        .filter(|(f, _)| f.contains(".lua:"))
        .max_by_key(|(_, c)| c.0)
        .map(|(f, _)| f.clone());
    assert!(
        heaviest_lua
            .as_deref()
            .is_some_and(|f| f.contains("pprofwork.lua")),
        "heaviest Lua function: {heaviest_lua:?}"
    );

    // Lua functions: file, first line, current lines inside the function; JIT-inlined frames
    // as inline lines of one location (`mix` inlined into `burn`'s loop).
    let chunk = nginx.prefix.path().join("lua/pprofwork.lua");
    let chunk = chunk.to_string_lossy();
    // A function's name comes from its call site, so one function may have several names.
    let funcs = |start: i64| -> Vec<u64> {
        let ids: Vec<u64> = a
            .function
            .iter()
            .filter(|f| s(&a, f.filename) == chunk && f.start_line == start)
            .map(|f| f.id)
            .collect();
        assert!(
            !ids.is_empty(),
            "no function of {chunk} starting at line {start}"
        );
        ids
    };
    let (mix, burn) = (funcs(7), funcs(14));
    let name = |id: u64| s(&a, a.function[id as usize - 1].name);
    let sys = |id: u64| s(&a, a.function[id as usize - 1].system_name);
    assert!(
        mix.iter()
            .any(|&f| name(f) == format!("mix@{chunk}:7") && sys(f) == "mix"),
        "{:?}",
        mix.iter().map(|&f| name(f)).collect::<Vec<_>>()
    );
    let mut inlined = 0;
    for loc in &a.location {
        for l in &loc.line {
            if mix.contains(&l.function_id) {
                assert!(MIX_LINES.contains(&l.line), "mix at line {}", l.line);
            }
            if burn.contains(&l.function_id) {
                assert!(BURN_LINES.contains(&l.line), "burn at line {}", l.line);
            }
        }
        let ids: Vec<u64> = loc.line.iter().map(|l| l.function_id).collect();
        if let [inner, outer] = ids[..]
            && mix.contains(&inner)
            && burn.contains(&outer)
        {
            inlined += 1;
            // The loop's call of mix.
            assert_eq!(loc.line[1].line, 17);
            // Go reads the same location with the caller on a line of its own.
            let names = &go_raw.locations[&loc.id];
            assert_eq!(names, &[name(inner), name(outer)]);
        }
    }
    assert!(
        inlined > 0,
        "no location has mix inlined into burn: {:?}",
        go_raw.locations
    );

    // Labels: process and phase on every sample, the plugin where the plugin ran, never a
    // pid; this host worker has no container.
    for l in labels(&a) {
        assert_eq!(l.get("process"), Some(&"nginx"), "{l:?}");
        assert!(l.contains_key("phase"), "{l:?}");
        assert!(
            !l.contains_key("pid") && !l.contains_key("container"),
            "{l:?}"
        );
    }
    let phases: BTreeSet<&str> = labels(&a)
        .iter()
        .filter_map(|l| l.get("phase").copied())
        .collect();
    assert!(
        phases.contains("access") && phases.contains("content"),
        "{phases:?}"
    );
    let plugins: BTreeSet<&str> = labels(&a)
        .iter()
        .filter_map(|l| l.get("plugin").copied())
        .collect();
    assert!(plugins.contains("pprof-demo"), "{plugins:?}");
    for (_, l) in &go_raw.samples {
        assert_eq!(l.get("process").map(String::as_str), Some("nginx"), "{l:?}");
        assert!(!l.contains_key("pid"));
    }
    let traces = go_pprof(&["-traces"], &ra.body);
    assert!(traces.contains("process:  nginx"), "{traces}");
    assert!(traces.contains("plugin:  pprof-demo"), "{traces}");
    assert!(traces.contains(&format!("mix@{chunk}:7")), "{traces}");
    // plugin= and phase= narrow as on /flamegraph (the window of A and B, still quiet).
    let (_, only) = profile(
        &agent,
        &format!("/debug/pprof/profile?seconds=30&{pid}&plugin=pprof-demo"),
    );
    let folded_plugin = collapsed(&agent, &format!("{pid}&plugin=pprof-demo"));
    assert_eq!(
        u64::try_from(total(&only, 0)).ok(),
        Some(folded_total(&folded_plugin))
    );
    assert!(total(&only, 0) > 0 && total(&only, 0) < pprof_a + pprof_b);
    assert!(
        labels(&only)
            .iter()
            .all(|l| l.get("plugin") == Some(&"pprof-demo"))
    );
    let (_, content) = profile(
        &agent,
        &format!("/debug/pprof/profile?seconds=30&{pid}&phase=content"),
    );
    assert!(
        labels(&content)
            .iter()
            .all(|l| l.get("phase") == Some(&"content"))
    );

    // Every target unless narrowed (other nginx on this machine may add theirs); the clamp.
    let all = agent.get_raw("/debug/pprof/profile?seconds=3600");
    assert_eq!(all.status, 200);
    assert_eq!(all.header("x-profile-seconds"), Some("30"));
    let clamped = all.header("x-profile-clamped").unwrap_or_default();
    assert!(clamped.contains("retention_seconds=30"), "{clamped}");
    let all = decode(&all.body).expect("decode");
    assert!(total(&all, 0) >= pprof_a + pprof_b);
    assert!(all.duration_nanos <= 30_000_000_000);

    // Parca adds its `seconds` to the configured parameters: a repeated one is no error.
    let twice = agent.get_raw(&format!("/debug/pprof/profile?seconds=5&seconds=5&{pid}"));
    assert_eq!(twice.status, 200);
    assert_eq!(twice.header("x-profile-seconds"), Some("5"));

    // Bad input: a 400 with a JSON error, like the other endpoints.
    for bad in [
        "seconds=0",
        "seconds=-5",
        "seconds=86401",
        "seconds=99999999999999999999",
        "seconds=abc",
        "seconds=1.5",
        "seconds=10&debug=1",
        "pid=abc",
        "phase=lunch",
    ] {
        let (status, body) = agent.get(&format!("/debug/pprof/profile?{bad}"));
        assert_eq!(status, 400, "{bad}: {body}");
        let v: serde_json::Value =
            serde_json::from_str(&body).unwrap_or_else(|e| panic!("{bad}: {e}: {body}"));
        assert!(
            v["error"].as_str().is_some_and(|e| !e.is_empty()),
            "{bad}: {body}"
        );
    }
    let (status, body) = agent.get("/debug/pprof/profile?pid=999999999");
    assert_eq!(status, 404, "{body}");
    let (status, body) = agent.get("/debug/pprof/offcpu?seconds=5");
    assert_eq!(status, 404, "off-CPU is disabled here: {body}");
    assert!(body.contains("sampling.offcpu.enabled"), "{body}");
    let (status, body) = agent.get(&format!("/flamegraph?{pid}&format=pdf"));
    assert_eq!(status, 400, "{body}");

    // An on-demand capture in pprof: its own rate and length, the same encoding.
    let _load = Load::start(nginx.port, "/", 2, Duration::from_secs(10));
    thread::sleep(Duration::from_millis(300));
    let (_, cap) = profile(&agent, &format!("/flamegraph?{pid}&seconds=2&format=pprof"));
    assert_eq!(cap.period, 1_000_000_000 / 99, "on_demand_frequency_hz");
    assert!(
        (1_900_000_000..3_000_000_000).contains(&cap.duration_nanos),
        "{}",
        cap.duration_nanos
    );
    assert!(total(&cap, 0) > 50, "only {} samples", total(&cap, 0));
    assert!(weight_of(&cap, "pprofwork.lua", 0) > 0);
    let cap_raw = agent.get_raw(&format!("/flamegraph?{pid}&seconds=1&format=pprof"));
    let go_cap = raw(&cap_raw.body);
    assert_eq!(go_cap.period_type, "cpu nanoseconds");
    assert!(
        go_cap
            .samples
            .iter()
            .all(|(_, l)| l.get("process").map(String::as_str) == Some("nginx"))
    );
    let (_, recent) = profile(&agent, &format!("/flamegraph?{pid}&format=pprof"));
    assert!(total(&recent, 0) >= pprof_a + pprof_b);
}

/// Off-CPU: a handler that blocks in `blocker` (usleep through the FFI), its blocked time
/// measured in Lua; the JIT is off so `blocker` keeps a frame of its own.
const OFF_LUA: &str = r#"local ffi = require "ffi"
ffi.cdef [[
    int usleep(unsigned int usec);
    typedef struct { long tv_sec; long tv_nsec; } pprof_timespec;
    int clock_gettime(int clk, pprof_timespec *tp);
]]
local ts = ffi.new("pprof_timespec")
local function now_us()
    ffi.C.clock_gettime(1, ts)
    return tonumber(ts.tv_sec) * 1e6 + tonumber(ts.tv_nsec) / 1e3
end
local _M = {}
local function blocker(us)
    local t0 = now_us()
    ffi.C.usleep(us)
    ngx.shared.stats:incr("blocked_us", now_us() - t0, 0)
end
function _M.block(us)
    blocker(us)
    return us
end
return _M
"#;

#[test]
#[ignore = "needs root"]
fn offcpu_endpoint_carries_the_blocked_time() {
    common::require_root!();
    let nginx = Nginx::start(
        Lj::Gc64,
        &[("offwork", OFF_LUA)],
        "lua_shared_dict stats 1m; init_by_lua_block { require('jit').off() }",
        r#"
    location /block { content_by_lua_block { ngx.say(require("offwork").block(20000)) } }
    location /stats { content_by_lua_block { ngx.say(ngx.shared.stats:get("blocked_us") or 0) } }
"#,
    );
    let worker = nginx.worker().expect("worker");
    let agent = Agent::start("sampling:\n  offcpu:\n    enabled: true\n");
    wait_target(&agent, worker);
    let before: f64 = nginx.get("/stats").trim().parse().expect("stats");
    {
        let load = Load::start(nginx.port, "/block", 1, Duration::from_secs(3));
        thread::sleep(Duration::from_secs(3));
        drop(load);
    }
    thread::sleep(Duration::from_secs(1));
    let blocked_us: f64 = nginx.get("/stats").trim().parse::<f64>().expect("stats") - before;
    assert!(blocked_us > 1e6, "the handler blocked only {blocked_us} µs");
    let path = format!("/debug/pprof/offcpu?seconds=10&pid={worker}");
    let (r, p) = profile(&agent, &path);
    let go_raw = raw(&r.body);
    assert_eq!(go_raw.sample_types, "blocks/count offcpu/nanoseconds[dflt]");
    assert_eq!(go_raw.period_type, "blocks count");
    let measured = weight_of(&p, "blocker@", 1) as f64 / 1e3;
    let ratio = measured / blocked_us;
    assert!(
        (0.85..1.15).contains(&ratio),
        "off-CPU time in blocker: {measured:.0} µs in the profile vs {blocked_us:.0} µs measured in Lua"
    );
    let go_top = top(&r.body, "blocks");
    assert!(
        go_top.keys().any(|f| f.starts_with("blocker@")),
        "{go_top:?}"
    );
    for l in labels(&p) {
        assert_eq!(l.get("process"), Some(&"nginx"));
        assert!(!l.contains_key("pid"));
    }
    // An off-CPU capture in pprof.
    let _load = Load::start(nginx.port, "/block", 1, Duration::from_secs(10));
    let (_, cap) = profile(
        &agent,
        &format!("/flamegraph?pid={worker}&seconds=2&mode=off-cpu&format=pprof"),
    );
    let types: Vec<&str> = cap.sample_type.iter().map(|t| s(&cap, t.r#type)).collect();
    assert_eq!(types, ["blocks", "offcpu"]);
    assert!(
        weight_of(&cap, "blocker@", 1) > 1_000_000_000,
        "{}",
        weight_of(&cap, "blocker@", 1)
    );
}

/// A handler that keeps every table it builds (a leak) and one that builds garbage.
const HEAP_LUA: &str = r#"local _M = {}
local kept = {}
function _M.leak(n)
    for i = 1, n do kept[#kept + 1] = { i, i + 1, i + 2 } end
    return #kept
end
function _M.garbage(n)
    local t
    for i = 1, n do t = { i, i * 2 } end
    return t[1]
end
return _M
"#;

/// Lua heap captures in pprof: `go tool pprof` reads allocated bytes as `alloc_space` and
/// live bytes as `inuse_space` (period type `space/bytes`, period = `sample_bytes`), and the
/// handler that allocates (or keeps) them is on top.
#[test]
#[ignore = "needs root"]
fn heap_captures_are_space_profiles() {
    common::require_root!();
    let nginx = Nginx::start(
        Lj::Gc64,
        &[("heapwork", HEAP_LUA)],
        "",
        r#"
    location /leak { content_by_lua_block { ngx.say(require("heapwork").leak(200)) } }
    location /garbage { content_by_lua_block { ngx.say(require("heapwork").garbage(2000)) } }
"#,
    );
    let worker = nginx.worker().expect("worker");
    // Several memory captures in a row: no rate limit.
    let agent = Agent::start("sampling:\n  memory:\n    min_interval_seconds: 0\n");
    wait_target(&agent, worker);
    let _leak = Load::start(nginx.port, "/leak", 1, Duration::from_secs(60));
    let _garbage = Load::start(nginx.port, "/garbage", 1, Duration::from_secs(60));
    for (mode, types, top_fn) in [
        (
            "alloc",
            "alloc_samples/count alloc_space/bytes[dflt]",
            "garbage@",
        ),
        (
            "live",
            "inuse_samples/count inuse_space/bytes[dflt]",
            "leak@",
        ),
    ] {
        let path = format!(
            "/flamegraph?pid={worker}&seconds=3&mode={mode}&sample_bytes=16384&format=pprof"
        );
        let (r, p) = profile(&agent, &path);
        let go_raw = raw(&r.body);
        assert_eq!(go_raw.sample_types, types, "{mode}");
        assert_eq!(go_raw.period_type, "space bytes", "{mode}");
        assert_eq!(go_raw.period, 16384, "{mode}");
        let index = if mode == "alloc" {
            "alloc_space"
        } else {
            "inuse_space"
        };
        let go_top = top(&r.body, index);
        let lua_cum = |prefix: &str| {
            go_top
                .iter()
                .filter(|(f, _)| f.starts_with(prefix))
                .map(|(_, (_, cum))| *cum)
                .sum::<u64>()
        };
        let bytes = total(&p, 1) as u64;
        let under = lua_cum(top_fn);
        eprintln!(
            "{mode}: {bytes} bytes in the profile, {under} under {top_fn} (go tool pprof -top)"
        );
        assert!(
            bytes > 0 && under * 10 >= bytes * 8,
            "{mode}: {under} of {bytes} bytes under {top_fn}: {go_top:?}"
        );
        for l in labels(&p) {
            assert_eq!(l.get("process"), Some(&"nginx"));
            assert!(!l.contains_key("pid"));
        }
    }
}

#[test]
#[ignore = "needs root"]
fn container_targets_carry_container_and_image_labels() {
    common::require_root!();
    require_docker();
    let ctr = Container::start("apisix-profiler-pprof", "pprofwork", WORK, "burn(80000)");
    let agent = Agent::start("sampling:\n  frequency_hz: 99\n");
    let seen = wait_for(15, || {
        let (_, body) = agent.get("/targets");
        body.contains(&ctr.name).then_some(())
    });
    assert!(
        seen.is_some(),
        "the container never became a target:\n{}",
        agent.log()
    );
    load_then_quiet(ctr.port, 3);
    let (r, p) = profile(
        &agent,
        &format!("/debug/pprof/profile?seconds=10&container={}", ctr.name),
    );
    assert!(total(&p, 0) > 50, "only {} samples", total(&p, 0));
    assert!(weight_of(&p, "/app/pprofwork.lua", 0) > 0);
    for l in labels(&p) {
        assert_eq!(l.get("container"), Some(&ctr.name.as_str()), "{l:?}");
        assert_eq!(l.get("image"), Some(&IMAGE), "{l:?}");
        assert_eq!(l.get("process"), Some(&"nginx"), "{l:?}");
        assert!(!l.contains_key("pid"));
    }
    let traces = go_pprof(&["-traces"], &r.body);
    assert!(
        traces.contains(&format!("container:  {}", ctr.name)),
        "{traces}"
    );
    assert!(traces.contains(&format!("image:  {IMAGE}")), "{traces}");
}
