//! Root tests of APISIX-aware attribution: CPU per plugin and per request phase, on an
//! APISIX-shaped workload written for the test (phase entry points in `apisix/init.lua`, a
//! stride-2 plugin runner in `apisix/plugin.lua`, a core helper in `apisix/core/`, plugins in
//! `apisix/plugins/`, one in Kong's layout, one in a custom layout found only through a
//! configured rule), nginx + ngx_lua on Debian's GC64 LuaJIT and on the non-GC64 build, with
//! the JIT on. The daemon's
//! `apisix_profiler_plugin_cpu_seconds_total` is checked against each plugin's CPU measured
//! in Lua with `os.clock` around whole loops, within 5 points; `record --plugin` and
//! `/flamegraph?plugin=&phase=` keep only the matching stacks, whose plugin frames carry
//! the name the plugin map read from the VM's `package.loaded`. With off-CPU profiling, a
//! log-phase plugin's blocked time is its `plugin_offcpu_seconds_total`.

mod common;

use std::{collections::BTreeMap, fmt::Write as _, thread, time::Duration};

use common::{
    Lj, Load, Nginx,
    daemon::{Agent, wait_for},
    record,
};

/// One plugin of the workload.
struct Plugin {
    /// Module path under `lua/`.
    module: &'static str,
    /// The name the rules give it.
    name: &'static str,
    /// Its phase function.
    phase: &'static str,
    /// Statements of its own.
    own: usize,
    /// Calls of the core helper.
    core: usize,
    /// Iterations of an inner loop.
    inner: usize,
}

const fn plugin(
    module: &'static str,
    name: &'static str,
    phase: &'static str,
    own: usize,
    core: usize,
    inner: usize,
) -> Plugin {
    Plugin {
        module,
        name,
        phase,
        own,
        core,
        inner,
    }
}

/// Loop-free phase functions (the runner's loop is what gets compiled), some calling the
/// core helper, one with an inner loop.
const PLUGINS: [Plugin; 7] = [
    plugin("apisix/plugins/key-auth", "key-auth", "access", 32, 1, 0),
    plugin(
        "apisix/plugins/limit-count",
        "limit-count",
        "access",
        12,
        2,
        0,
    ),
    plugin(
        "apisix/plugins/proxy-rewrite",
        "proxy-rewrite",
        "access",
        40,
        0,
        0,
    ),
    plugin(
        "apisix/plugins/response-rewrite",
        "response-rewrite",
        "header_filter",
        24,
        0,
        0,
    ),
    plugin(
        "apisix/plugins/serverless-post-function",
        "serverless-post-function",
        "log",
        8,
        0,
        48,
    ),
    // Kong's layout, found by a built-in rule.
    plugin(
        "kong/plugins/rate-limiting/handler",
        "rate-limiting",
        "access",
        16,
        0,
        0,
    ),
    plugin(
        "gw/plugins/bot-detection/handler",
        "bot-detection",
        "access",
        20,
        1,
        0,
    ),
];

/// The custom rule the agent is given for the `gw/plugins/<name>/handler.lua` layout.
const CUSTOM_RULE: &str = r"/lua/gw/plugins/(?P<plugin>[^/]+)/handler\.lua$";

/// Times each phase entry point runs the plugin list per request.
const REPS: usize = 1000;

/// `n` statements of work, each reading a table and writing the request context (so a
/// trace has guards and snapshots inside the function).
fn body(n: usize, indent: &str) -> String {
    (0..n)
        .map(|k| {
            format!(
                "{indent}h = band(bxor(h, T[band(h + i + {k}, 255) + 1]) * 33 + {k}, 0xfffff)\n\
                 {indent}ctx[{}] = h\n",
                k % 8 + 1
            )
        })
        .collect()
}

const PRELUDE: &str = r#"local bit = require "bit"
local band, bxor = bit.band, bit.bxor
"#;

/// `apisix/core/hash.lua`: a helper the plugins share, like APISIX's core libraries.
fn core_module() -> String {
    format!(
        r#"{PRELUDE}local _M = {{}}
local T = {{}}
for i = 1, 256 do T[i] = (i * 40503) % 65521 end
_M.T = T

function _M.mix(h, i, ctx)
{}    return h
end

return _M
"#,
        body(24, "    ")
    )
}

fn plugin_module(name: &str, phase: &str, own: usize, core: usize, inner: usize) -> String {
    let mut m = format!(
        "{PRELUDE}local core = require \"apisix.core.hash\"\nlocal T = core.T\n\
         local _M = {{ name = \"{name}\", version = 0.1 }}\n\n\
         function _M.{phase}(conf, ctx)\n    local h, i = ctx.h, ctx.i\n{}",
        body(own, "    ")
    );
    for _ in 0..core {
        m.push_str("    h = core.mix(h, i, ctx)\n");
    }
    if inner > 0 {
        let _ = write!(
            m,
            "    for k = 1, {inner} do\n        h = band(bxor(h, T[band(h + k, 255) + 1]) * 33 + k, 0xfffff)\n    end\n    ctx[1] = h\n"
        );
    }
    m.push_str("    ctx.h = h\nend\n\nreturn _M\n");
    m
}

/// `apisix/plugin.lua`: the runner, walking `plugins` with stride 2 (module, conf).
const RUNNER: &str = r#"local _M = {}

function _M.run_plugin(phase, plugins, api_ctx)
    for i = 1, #plugins, 2 do
        local phase_func = plugins[i][phase]
        if phase_func then
            phase_func(plugins[i + 1], api_ctx)
        end
    end
    return api_ctx
end

return _M
"#;

/// `apisix/init.lua`: the phase entry points nginx.conf calls, and the calibration.
fn init_module() -> String {
    let mut list = String::new();
    for p in &PLUGINS {
        let _ = writeln!(
            list,
            "    require(\"{}\"), {{ name = \"{}\" }},",
            p.module.replace('/', "."),
            p.name
        );
    }
    format!(
        r#"local plugin = require "apisix.plugin"
local _M = {{}}

local plugins = {{
{list}}}

local function new_ctx()
    return {{ 0, 0, 0, 0, 0, 0, 0, 0, h = 0, i = 0 }}
end

local function run(phase)
    local api_ctx = ngx.ctx.api_ctx
    if not api_ctx then
        api_ctx = new_ctx()
        ngx.ctx.api_ctx = api_ctx
    end
    for r = 1, {REPS} do
        api_ctx.i = r
        plugin.run_plugin(phase, plugins, api_ctx)
    end
end

function _M.http_access_phase() run("access") end
function _M.http_header_filter_phase() run("header_filter") end
function _M.http_log_phase() run("log") end

-- CPU seconds per call of one plugin's phase function, measured in this worker: os.clock
-- around a whole loop that calls it.
function _M.calib(module, phase)
    local f = require(module)[phase]
    local conf, ctx = {{ name = module }}, new_ctx()
    local n, reps = 20000, 0
    for i = 1, n do ctx.i = i; f(conf, ctx) end
    local t0 = os.clock()
    repeat
        for i = 1, n do ctx.i = i; f(conf, ctx) end
        reps = reps + 1
    until os.clock() - t0 > 0.4
    return (os.clock() - t0) / (reps * n)
end

return _M
"#
    )
}

const SERVER: &str = r#"
    location /api {
        access_by_lua_block { require("apisix.init").http_access_phase() }
        header_filter_by_lua_block { require("apisix.init").http_header_filter_phase() }
        log_by_lua_block { require("apisix.init").http_log_phase() }
        content_by_lua_block { ngx.print("ok") }
    }
    location /calib { content_by_lua_block {
        ngx.say(string.format("%.17g", require("apisix.init").calib(ngx.var.arg_m, ngx.var.arg_phase)))
    } }
"#;

fn start(lj: Lj) -> Nginx {
    let mut files: Vec<(String, String)> = vec![
        ("apisix/init".into(), init_module()),
        ("apisix/plugin".into(), RUNNER.into()),
        ("apisix/core/hash".into(), core_module()),
    ];
    for p in &PLUGINS {
        files.push((
            p.module.into(),
            plugin_module(p.name, p.phase, p.own, p.core, p.inner),
        ));
    }
    let lua: Vec<(&str, &str)> = files
        .iter()
        .map(|(n, s)| (n.as_str(), s.as_str()))
        .collect();
    Nginx::start(
        lj,
        &lua,
        "init_by_lua_block { require('jit').on() }",
        SERVER,
    )
}

/// CPU seconds per call of each plugin's phase function (by rule name), with its phase,
/// measured in the worker.
fn calibrate(nginx: &Nginx) -> BTreeMap<&'static str, (f64, &'static str)> {
    let mut cost = BTreeMap::new();
    for p in &PLUGINS {
        let (name, phase) = (p.name, p.phase);
        let body = nginx.get(&format!(
            "/calib?m={}&phase={phase}",
            p.module.replace('/', ".")
        ));
        let c: f64 = body
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("calibration of {name}: {body:?}"));
        cost.insert(name, (c, phase));
    }
    cost
}

/// Expected share of each plugin (by rule name) and of each phase, from the mean of two
/// calibrations (before and after the measured window).
fn expected(
    before: &BTreeMap<&'static str, (f64, &'static str)>,
    after: &BTreeMap<&'static str, (f64, &'static str)>,
) -> (BTreeMap<&'static str, f64>, BTreeMap<&'static str, f64>) {
    let cost: BTreeMap<&'static str, (f64, &'static str)> = before
        .iter()
        .map(|(n, (c, phase))| (*n, ((c + after[n].0) / 2.0, *phase)))
        .collect();
    let sum: f64 = cost.values().map(|(c, _)| c).sum();
    let plugins = cost.iter().map(|(n, (c, _))| (*n, c / sum)).collect();
    let mut phases = BTreeMap::new();
    for (c, phase) in cost.values() {
        *phases.entry(*phase).or_insert(0.0) += c / sum;
    }
    for (n, (c, _)) in before {
        eprintln!(
            "calibration of {n}: {:.0} → {:.0} ns per call",
            c * 1e9,
            after[n].0 * 1e9
        );
    }
    (plugins, phases)
}

/// `apisix_profiler_plugin_cpu_seconds_total` as (plugin, phase) → seconds.
fn plugin_cpu(metrics: &str) -> BTreeMap<(String, String), f64> {
    let label = |l: &str, name: &str| -> Option<String> {
        let start = l.find(&format!("{name}=\""))? + name.len() + 2;
        let len = l[start..].find('"')?;
        Some(l[start..start + len].to_owned())
    };
    metrics
        .lines()
        .filter(|l| l.starts_with("apisix_profiler_plugin_cpu_seconds_total{"))
        .filter_map(|l| {
            let v = l.rsplit(' ').next()?.parse::<f64>().ok()?;
            Some(((label(l, "plugin")?, label(l, "phase")?), v))
        })
        .collect()
}

/// Asserts each measured share (over the plugins of `expected`) is within 5 points.
fn check(what: &str, measured: &BTreeMap<String, f64>, expected: &BTreeMap<&str, f64>) {
    let total: f64 = expected
        .keys()
        .map(|k| measured.get(*k).copied().unwrap_or(0.0))
        .sum();
    let (report, worst) = common::share_report(expected.iter().map(|(n, w)| (*n, *w)), |name| {
        measured.get(name).copied().unwrap_or(0.0) / total.max(1e-9)
    });
    eprintln!("{what} ({total:.2} s of plugin CPU):\n{report}");
    assert!(
        worst <= 0.05,
        "{what}: a share is off by more than 5 points:\n{report}{measured:?}"
    );
}

#[test]
#[ignore = "needs root"]
fn plugin_and_phase_cpu_match_calibration_gc64() {
    common::require_root!();
    plugin_and_phase_cpu(Lj::Gc64);
}

#[test]
#[ignore = "needs root"]
fn plugin_and_phase_cpu_match_calibration_gc32() {
    common::require_root!();
    plugin_and_phase_cpu(Lj::Gc32);
}

fn plugin_and_phase_cpu(lj: Lj) {
    let nginx = start(lj);
    for _ in 0..5 {
        if let Err(e) = common::get(nginx.port, "/api") {
            panic!("GET /api: {e}\n{}", nginx.error_log());
        }
    }
    let calibrated_before = calibrate(&nginx);
    let worker = nginx.worker().expect("worker");
    let config = format!(
        "  process_names: [no-such-process]\n  pids: [{worker}]\n  docker:\n    enabled: false\n\
         sampling:\n  frequency_hz: 499\n\
         attribution:\n  plugin_rules:\n    - regex: '{CUSTOM_RULE}'\n"
    );
    let agent = Agent::start(&config);
    let _load = Load::start(nginx.port, "/api", 2, Duration::from_secs(40));
    // The target is added and the plugin series appear.
    let seen = wait_for(20, || {
        let (_, m) = agent.get("/metrics");
        plugin_cpu(&m)
            .keys()
            .any(|(p, _)| p == "key-auth")
            .then_some(())
    });
    assert!(
        seen.is_some(),
        "no key-auth series within 20 s:\n{}\n{}",
        agent.get("/metrics").1,
        agent.log()
    );
    thread::sleep(Duration::from_secs(2));
    let before = plugin_cpu(&agent.get("/metrics").1);
    // Meanwhile: record keeps only key-auth's stacks.
    let rec = record(
        worker,
        5,
        &["--plugin", "key-auth", "--plugin-rule", CUSTOM_RULE],
    );
    assert!(rec.status.success(), "record failed: {}", rec.dump());
    thread::sleep(Duration::from_secs(10));
    let (_, text) = agent.get("/metrics");
    let after = plugin_cpu(&text);
    let (want_plugins, want_phases) = expected(&calibrated_before, &calibrate(&nginx));

    let mut by_plugin: BTreeMap<String, f64> = BTreeMap::new();
    let mut by_phase: BTreeMap<String, f64> = BTreeMap::new();
    for (key, v) in &after {
        let d = v - before.get(key).copied().unwrap_or(0.0);
        *by_plugin.entry(key.0.clone()).or_insert(0.0) += d;
        if want_plugins.contains_key(key.0.as_str()) {
            *by_phase.entry(key.1.clone()).or_insert(0.0) += d;
        }
    }
    eprintln!("plugin CPU over the window (s): {by_plugin:?}");
    // The delta is about one core over ~15 s (samples × 1/499 s).
    let plugins_total: f64 = want_plugins
        .keys()
        .map(|k| by_plugin.get(*k).copied().unwrap_or(0.0))
        .sum();
    assert!(
        plugins_total > 3.0,
        "too little plugin CPU ({plugins_total:.2} s): {by_plugin:?}"
    );
    check("plugins", &by_plugin, &want_plugins);
    check("phases (plugin CPU by phase)", &by_phase, &want_phases);
    // The phase family says the same, plus the runner's own time.
    let phase = |p: &str| {
        common::daemon::series_f64(
            &text,
            "apisix_profiler_phase_cpu_seconds_total",
            &[&format!("phase=\"{p}\"")],
        )
        .unwrap_or(0.0)
    };
    assert!(phase("access") > phase("header_filter"), "{text}");
    assert!(phase("header_filter") > 0.0 && phase("log") > 0.0, "{text}");

    // record --plugin key-auth: every stack written runs key-auth's code.
    let total = rec.total();
    assert!(total >= 30, "too few key-auth samples: {}", rec.dump());
    let in_key_auth = rec.count(|f| {
        f.iter()
            .any(|fr| fr.contains("/lua/apisix/plugins/key-auth.lua:"))
    });
    assert_eq!(
        in_key_auth,
        total,
        "a stack without key-auth: {}",
        rec.dump()
    );
    let listed: u64 = rec.summary["plugins"]
        .as_array()
        .unwrap_or_else(|| panic!("no plugins in the summary: {}", rec.summary))
        .iter()
        .filter(|p| p["plugin"] == "key-auth")
        .filter_map(|p| p["samples"].as_u64())
        .sum();
    assert_eq!(listed, total, "{}", rec.dump());
    assert!(rec.stderr.contains("top plugins"), "{}", rec.stderr);
    assert!(rec.stderr.contains("bot-detection"), "{}", rec.stderr);

    // /flamegraph filters, on the recent window.
    let (status, body) = agent.get(&format!(
        "/flamegraph?pid={worker}&plugin=limit-count&format=collapsed"
    ));
    assert_eq!(status, 200, "{body}");
    let stacks = common::parse_folded(&body);
    assert!(!stacks.is_empty(), "no limit-count stacks");
    for s in stacks.keys() {
        assert!(s.contains("/lua/apisix/plugins/limit-count.lua:"), "{s}");
    }
    // The plugin map read this VM (GC64 or not): the module's `name` names the frames.
    let named: u64 = stacks
        .iter()
        .filter(|(s, _)| s.contains("[limit-count]"))
        .map(|(_, n)| n)
        .sum();
    let all: u64 = stacks.values().sum();
    assert!(
        named * 10 >= all * 9,
        "{named} of {all} limit-count samples named by the gateway: {stacks:?}"
    );
    let (status, body) = agent.get(&format!("/flamegraph?pid={worker}&phase=log&format=json"));
    assert_eq!(status, 200, "{body}");
    let json: serde_json::Value = serde_json::from_str(&body).expect("json");
    let listed = json["stacks"].as_array().expect("stacks");
    assert!(!listed.is_empty(), "{body}");
    for s in listed {
        assert_eq!(s["phase"], "log", "{s}");
    }
    assert!(
        listed
            .iter()
            .any(|s| s["plugin"] == "serverless-post-function"),
        "{body}"
    );
    // A capture, filtered by plugin and phase.
    let (status, body) = agent.get(&format!(
        "/flamegraph?pid={worker}&seconds=2&plugin=response-rewrite&phase=header_filter&format=collapsed"
    ));
    assert_eq!(status, 200, "{body}");
    let stacks = common::parse_folded(&body);
    assert!(
        !stacks.is_empty(),
        "no response-rewrite stacks in a capture"
    );
    for s in stacks.keys() {
        assert!(
            s.contains("/lua/apisix/plugins/response-rewrite.lua:"),
            "{s}"
        );
    }
    let (status, body) = agent.get(&format!("/flamegraph?pid={worker}&plugin=never-seen"));
    assert_eq!(status, 200, "{body}");
    assert!(
        body.contains("plugin=never-seen: no samples matched"),
        "{body}"
    );
    let (status, _) = agent.get(&format!("/flamegraph?pid={worker}&phase=lunch"));
    assert_eq!(status, 400);
}

/// A log-phase plugin that blocks the worker in a system call for 10 ms per request and adds
/// the time it measured to a shared-dict counter.
const HTTP_LOGGER: &str = r#"local ffi = require "ffi"
ffi.cdef [[
    int usleep(unsigned int usec);
    struct attrib_ts { long tv_sec; long tv_nsec; };
    int clock_gettime(int clk, struct attrib_ts *ts);
]]
local ts = ffi.new("struct attrib_ts")
local function now_us()
    ffi.C.clock_gettime(1, ts)
    return tonumber(ts.tv_sec) * 1e6 + tonumber(ts.tv_nsec) / 1e3
end

local _M = { name = "http-logger" }

function _M.log(conf, ctx)
    local t0 = now_us()
    ffi.C.usleep(10000)
    ngx.shared.stats:incr("blocked_us", now_us() - t0, 0)
end

return _M
"#;

/// With `sampling.offcpu.enabled`, time blocked in a plugin's log phase lands in
/// `apisix_profiler_plugin_offcpu_seconds_total{plugin, phase="log"}`, within 25 % of the
/// time measured in Lua.
#[test]
#[ignore = "needs root"]
fn offcpu_time_by_plugin_and_phase() {
    common::require_root!();
    let nginx = Nginx::start(
        Lj::Gc64,
        &[("apisix/plugins/http-logger", HTTP_LOGGER)],
        "lua_shared_dict stats 1m; init_by_lua_block { require('jit').off() }",
        r#"
    location /api {
        content_by_lua_block { ngx.print("ok") }
        log_by_lua_block { require("apisix.plugins.http-logger").log({}, {}) }
    }
    location /stats { content_by_lua_block { ngx.say(ngx.shared.stats:get("blocked_us") or 0) } }
"#,
    );
    let worker = nginx.worker().expect("worker");
    let agent = Agent::start(&format!(
        "  process_names: [no-such-process]\n  pids: [{worker}]\n  docker:\n    enabled: false\n\
         sampling:\n  offcpu:\n    enabled: true\n    min_block_us: 1000\n"
    ));
    let _load = Load::start(nginx.port, "/api", 1, Duration::from_secs(30));
    let offcpu = |m: &str| {
        common::daemon::series_f64(
            m,
            "apisix_profiler_plugin_offcpu_seconds_total",
            &["plugin=\"http-logger\"", "phase=\"log\""],
        )
    };
    let seen = wait_for(20, || offcpu(&agent.get("/metrics").1).filter(|s| *s > 0.2));
    assert!(
        seen.is_some(),
        "no off-CPU seconds for http-logger:\n{}\n{}",
        agent.get("/metrics").1,
        agent.log()
    );
    let measured = || -> f64 {
        let body = nginx.get("/stats");
        body.trim()
            .parse::<f64>()
            .unwrap_or_else(|_| panic!("/stats: {body:?}"))
            / 1e6
    };
    let (m0, b0) = (offcpu(&agent.get("/metrics").1).unwrap_or(0.0), measured());
    thread::sleep(Duration::from_secs(8));
    let text = agent.get("/metrics").1;
    let (m1, b1) = (offcpu(&text).unwrap_or(0.0), measured());
    let (got, want) = (m1 - m0, b1 - b0);
    eprintln!("http-logger blocked: {got:.2} s in the metric, {want:.2} s measured in Lua");
    assert!(
        want > 3.0 && (got / want - 1.0).abs() <= 0.25,
        "http-logger off-CPU {got:.2} s vs {want:.2} s measured:\n{text}"
    );
    let log_phase = common::daemon::series_f64(
        &text,
        "apisix_profiler_phase_offcpu_seconds_total",
        &["phase=\"log\""],
    )
    .unwrap_or(0.0);
    assert!(log_phase >= m1 * 0.99, "{text}");
}
