//! Root tests on the real Apache APISIX gateway: `../shared/apisix/harness.tar.xz` beside the
//! repository (APISIX 3.18 unmodified, on Debian 12's nginx + ngx_lua, GC64 LuaJIT with the
//! JIT on, 2 workers, stripped binaries). Each test extracts the harness into a temporary
//! directory, replaces its `conf/config.yaml` and `conf/apisix.yaml` with a route of its own
//! running eight plugins (both serverless plugins, which one factory file builds), starts
//! it and drives loopback traffic.
//!
//! - On the untouched gateway, `record --summary` names every plugin of the route as APISIX
//!   names it (the plugin map, [`apisix_agent::plugin_map`]).
//! - With a ground truth: the harness's nginx.conf template gets, in `init_worker_by_lua`,
//!   a wrapper around each phase function of the route's plugin modules that adds the
//!   `os.clock` time of every call to a per-worker table (flushed to a shared dict). Each
//!   wrapper is loaded with the chunk name of the function it wraps, so the profiler sees
//!   it as that plugin's code (the wrapper's own two clock reads are the only CPU it adds).
//!   The daemon samples both workers; each plugin's share of plugin CPU in
//!   `apisix_profiler_plugin_cpu_seconds_total` must be within 5 points of its share of the
//!   measured time, per nginx phase too; `/flamegraph?plugin=`, `/flamegraph?format=json`
//!   and `/debug/pprof/profile` must agree with the metrics.
//!
//! Without the harness (a clone without `../shared/apisix`), each test says so in one line
//! on stderr and returns. Both are `#[ignore = "needs root"]`.
//! Only one copy of the gateway runs at a time (fixed ports 9080 and 1980): the tests hold a
//! lock.

mod common;

use std::{
    collections::BTreeMap,
    io::Write as _,
    path::{Path, PathBuf},
    process::Command,
    sync::Mutex,
    thread,
    time::Duration,
};

use apisix_agent::output::pprof::{Profile, decode};
use common::{
    Load,
    daemon::{Agent, wait_for},
    record,
};

/// One gateway at a time.
static GATEWAY: Mutex<()> = Mutex::new(());

/// APISIX's port in the harness.
const PORT: u16 = 9080;

/// The route's path; key-auth reads the key from the `apikey` query argument.
const PATH: &str = "/prof?apikey=secret-key";

/// The plugins of the route, as APISIX names them.
const PLUGINS: [&str; 8] = [
    "ip-restriction",
    "cors",
    "serverless-pre-function",
    "key-auth",
    "limit-count",
    "proxy-rewrite",
    "response-rewrite",
    "serverless-post-function",
];

const CONFIG_YAML: &str = r#"apisix:
  node_listen:
    - ip: 127.0.0.1
      port: 9080
  enable_admin: false
  enable_ipv6: false
  enable_http2: false
  enable_control: false
  enable_reuseport: true
  ssl:
    enable: false
deployment:
  role: data_plane
  role_data_plane:
    config_provider: yaml
plugins:
  - ip-restriction
  - cors
  - serverless-pre-function
  - key-auth
  - limit-count
  - proxy-rewrite
  - response-rewrite
  - serverless-post-function
nginx_config:
  worker_processes: 2
  error_log_level: warn
"#;

/// The route: every plugin does real work; the two serverless plugins run a loop of their
/// own (rewrite and log phases), response-rewrite rewrites headers and the body.
const APISIX_YAML: &str = r#"routes:
  - id: "prof"
    uri: /prof
    upstream_id: "web"
    plugins:
      ip-restriction:
        whitelist:
          - 127.0.0.0/8
      cors: {}
      serverless-pre-function:
        phase: rewrite
        functions:
          - "return function(conf, ctx) local x = 0 for i = 1, 12000 do x = (x + i * 7) % 65521 end ngx.ctx.pre_x = x end"
      key-auth: {}
      limit-count:
        count: 100000000
        time_window: 60
        rejected_code: 429
        key_type: var
        key: remote_addr
        policy: local
      proxy-rewrite:
        uri: /echo
        headers:
          set:
            X-Via-Apisix: "1"
      response-rewrite:
        headers:
          set:
            X-Resp-Rewritten: "yes"
        filters:
          - regex: "upstream"
            replace: "UPSTREAM"
            scope: "global"
      serverless-post-function:
        phase: log
        functions:
          - "return function(conf, ctx) local x = 0 for i = 1, 20000 do x = (x + i * 5) % 65521 end ngx.ctx.post_x = x end"
upstreams:
  - id: "web"
    type: roundrobin
    nodes:
      "127.0.0.1:1980": 1
consumers:
  - username: jack
    plugins:
      key-auth:
        key: secret-key
#END
"#;

/// The ground truth, appended to the template's `init_worker_by_lua_block` after APISIX's
/// own worker init (which loads the plugin modules anew).
const TRUTH_INIT: &str = r#"
        local truth_acc, clock = {}, os.clock
        local wrapper = [=[
local orig, clock, acc, key = ...
return function(conf, ctx)
    local t0 = clock()
    local a, b = orig(conf, ctx)
    acc[key] = acc[key] + (clock() - t0)
    return a, b
end
]=]
        local phases = { "rewrite", "access", "before_proxy", "header_filter",
                         "body_filter", "delayed_body_filter", "log", "balancer" }
        for _, name in ipairs({ @PLUGINS@ }) do
            local mod = package.loaded["apisix.plugins." .. name]
            for _, phase in ipairs(phases) do
                local orig = mod and mod[phase]
                if type(orig) == "function" then
                    local key = name .. " " .. phase
                    truth_acc[key] = 0
                    local src = debug.getinfo(orig, "S").source
                    mod[phase] = assert(loadstring(wrapper, src))(orig, clock, truth_acc, key)
                end
            end
        end
        local truth = ngx.shared.truth
        ngx.timer.every(0.2, function()
            for k, v in pairs(truth_acc) do
                if v > 0 then
                    truth:incr(k, v, 0)
                    truth_acc[k] = 0
                end
            end
        end)
"#;

/// The location that reports the truth: `PLUGIN PHASE SECONDS` lines.
const TRUTH_LOCATION: &str = r#"
        location = /__truth {
            content_by_lua_block {
                local d = ngx.shared.truth
                for _, k in ipairs(d:get_keys(0)) do
                    ngx.say(k, " ", string.format("%.9f", d:get(k)))
                end
            }
        }
"#;

/// The harness, or `None` after saying why the test is skipped.
fn harness() -> Option<PathBuf> {
    let path = common::repo_root().join("../shared/apisix/harness.tar.xz");
    if path.is_file() {
        return Some(path);
    }
    let name = thread::current().name().unwrap_or("test").to_owned();
    let _ = writeln!(
        std::io::stderr(),
        "{name}: skipped: no real-APISIX harness at {} (the tier needs ../shared/apisix beside the repository)",
        path.display()
    );
    None
}

/// A copy of the harness with the test's route, stopped on drop.
struct Gateway {
    dir: tempfile::TempDir,
    template: String,
}

impl Gateway {
    fn extract(tarball: &Path) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let st = Command::new("tar")
            .arg("-C")
            .arg(dir.path())
            .arg("-xJf")
            .arg(tarball)
            .status()
            .expect("run tar");
        assert!(st.success(), "tar -xJf {} failed", tarball.display());
        let conf = dir.path().join("conf");
        std::fs::write(conf.join("config.yaml"), CONFIG_YAML).expect("write config.yaml");
        std::fs::write(conf.join("apisix.yaml"), APISIX_YAML).expect("write apisix.yaml");
        let template =
            std::fs::read_to_string(conf.join("nginx.conf.in")).expect("read nginx.conf.in");
        Self { dir, template }
    }

    fn top(&self) -> &Path {
        self.dir.path()
    }

    /// Writes the nginx.conf template, with the ground truth or untouched.
    fn template(&self, truth: bool) {
        let mut t = self.template.clone();
        if truth {
            let list: Vec<String> = PLUGINS.iter().map(|p| format!("{p:?}")).collect();
            let init = TRUTH_INIT.replace("@PLUGINS@", &list.join(", "));
            for (anchor, add) in [
                ("        apisix.http_init_worker()\n", init.as_str()),
                (
                    "    lua_shared_dict nacos 64m;\n",
                    "    lua_shared_dict truth 1m;\n",
                ),
                (
                    "        location = /apisix/nginx_status {\n",
                    TRUTH_LOCATION,
                ),
            ] {
                let at = t
                    .find(anchor)
                    .unwrap_or_else(|| panic!("the harness's nginx.conf.in has no {anchor:?}"));
                let at = if anchor.contains("location") {
                    at
                } else {
                    at + anchor.len()
                };
                t.insert_str(at, add);
            }
        }
        std::fs::write(self.top().join("conf/nginx.conf.in"), t).expect("write nginx.conf.in");
    }

    /// Starts it (building `home/` the first time); the worker pids.
    fn start(&self) -> Vec<u32> {
        let built = self.top().join("home/apisix").is_dir();
        let out = Command::new(self.top().join("start.sh"))
            .env("ACCESS_LOG", "off")
            .env("SKIP_BUILD", if built { "1" } else { "0" })
            .output()
            .expect("run start.sh");
        let log = format!("{}{}", common::text(&out.stdout), common::text(&out.stderr));
        assert!(out.status.success(), "start.sh failed:\n{log}");
        let master = std::fs::read_to_string(self.top().join("home/logs/nginx.pid"))
            .unwrap_or_else(|e| panic!("no APISIX master pid ({e}):\n{log}"));
        let workers = Command::new("pgrep")
            .args(["-P", master.trim()])
            .output()
            .expect("pgrep");
        let pids: Vec<u32> = common::text(&workers.stdout)
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect();
        assert_eq!(pids.len(), 2, "two workers expected:\n{log}");
        let body = common::get(PORT, PATH)
            .unwrap_or_else(|e| panic!("GET {PATH}: {e}\n{log}\n{}", self.error_log()));
        assert!(
            body.contains("UPSTREAM ok"),
            "the route did not run: {body:?}"
        );
        pids
    }

    fn stop(&self) {
        let _ = Command::new(self.top().join("stop.sh")).output();
    }

    fn error_log(&self) -> String {
        std::fs::read_to_string(self.top().join("home/logs/error.log")).unwrap_or_default()
    }

    /// The measured seconds per (plugin, module phase).
    fn truth(&self) -> BTreeMap<(String, String), f64> {
        let body = common::get(PORT, "/__truth").expect("GET /__truth");
        body.lines()
            .filter_map(|l| {
                let mut it = l.split_whitespace();
                let (p, ph, s) = (it.next()?, it.next()?, it.next()?);
                Some(((p.to_owned(), ph.to_owned()), s.parse().ok()?))
            })
            .collect()
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The nginx phase a plugin's module phase runs in: APISIX runs `rewrite` and
/// `before_proxy` plugins from its access handler.
fn nginx_phase(module_phase: &str) -> &str {
    match module_phase {
        "rewrite" | "access" | "before_proxy" => "access",
        "delayed_body_filter" => "body_filter",
        p => p,
    }
}

/// `apisix_profiler_plugin_cpu_seconds_total` as (plugin, phase) → seconds.
fn plugin_cpu(metrics: &str) -> BTreeMap<(String, String), f64> {
    let label = |l: &str, name: &str| -> Option<String> {
        let start = l.find(&format!("{name}=\""))? + name.len() + 2;
        let len = l[start..].find('"')?;
        Some(l[start..start + len].to_owned())
    };
    let mut out = BTreeMap::new();
    for l in metrics
        .lines()
        .filter(|l| l.starts_with("apisix_profiler_plugin_cpu_seconds_total{"))
    {
        let (Some(p), Some(ph), Some(v)) = (
            label(l, "plugin"),
            label(l, "phase"),
            l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()),
        ) else {
            continue;
        };
        *out.entry((p, ph)).or_insert(0.0) += v;
    }
    out
}

fn same(phase: &str) -> &str {
    phase
}

/// The growth of (plugin, phase) counters from `before` to `after`, by plugin and by phase
/// (`phase` maps a key's phase; only the plugins `counts` accepts count for the phases).
fn window(
    before: &BTreeMap<(String, String), f64>,
    after: &BTreeMap<(String, String), f64>,
    counts: impl Fn(&str) -> bool,
    phase: fn(&str) -> &str,
) -> (BTreeMap<String, f64>, BTreeMap<String, f64>) {
    let (mut by_plugin, mut by_phase) = (BTreeMap::new(), BTreeMap::new());
    for (k, v) in after {
        let d = v - before.get(k).copied().unwrap_or(0.0);
        *by_plugin.entry(k.0.clone()).or_insert(0.0) += d;
        if counts(&k.0) {
            *by_phase.entry(phase(&k.1).to_owned()).or_insert(0.0) += d;
        }
    }
    (by_plugin, by_phase)
}

/// Shares of `values` over the keys of `of`.
fn shares(values: &BTreeMap<String, f64>, of: &[&str]) -> BTreeMap<String, f64> {
    let total: f64 = of
        .iter()
        .map(|k| values.get(*k).copied().unwrap_or(0.0))
        .sum();
    of.iter()
        .map(|k| {
            (
                (*k).to_owned(),
                values.get(*k).copied().unwrap_or(0.0) / total.max(1e-12),
            )
        })
        .collect()
}

/// A table of measured and expected shares; the largest difference.
fn compare(what: &str, got: &BTreeMap<String, f64>, want: &BTreeMap<String, f64>) -> f64 {
    let (report, worst) = common::share_report(want.iter().map(|(k, v)| (k.as_str(), *v)), |k| {
        got.get(k).copied().unwrap_or(0.0)
    });
    eprintln!(
        "{what}:\n{report}largest difference: {:.1} points",
        worst * 100.0
    );
    worst
}

/// On the untouched gateway, `record` names every plugin of the route as APISIX does.
#[test]
#[ignore = "needs root"]
fn record_names_plugins_as_the_gateway_does() {
    common::require_root!();
    let Some(tarball) = harness() else { return };
    let _one = GATEWAY.lock().unwrap_or_else(|e| e.into_inner());
    let gw = Gateway::extract(&tarball);
    gw.template(false);
    let workers = gw.start();
    let _load = Load::start(PORT, PATH, 6, Duration::from_secs(40));
    thread::sleep(Duration::from_secs(3));
    // Both workers for 15 s: the lightest plugin (ip-restriction) takes under 1 % of
    // plugin CPU.
    let recs: Vec<common::Recorded> = thread::scope(|s| {
        let runs: Vec<_> = workers
            .iter()
            .map(|w| s.spawn(move || record(*w, 15, &[])))
            .collect();
        runs.into_iter()
            .map(|r| r.join().expect("record thread"))
            .collect()
    });
    let mut by_plugin: BTreeMap<String, u64> = BTreeMap::new();
    for rec in &recs {
        assert!(rec.status.success(), "record failed: {}", rec.dump());
        for p in rec.summary["plugins"].as_array().expect("plugins") {
            let name = p["plugin"].as_str().expect("plugin").to_owned();
            *by_plugin.entry(name).or_insert(0) += p["samples"].as_u64().unwrap_or(0);
        }
        eprintln!("user-side errors: {}", rec.summary["lua"]["user_errors"]);
    }
    eprintln!("samples by plugin: {by_plugin:?}");
    let rec = &recs[0];
    for p in PLUGINS {
        assert!(
            by_plugin.get(p).copied().unwrap_or(0) > 0,
            "{p} missing: {by_plugin:?}\n{}",
            rec.dump()
        );
    }
    // The file rule's merged name is at most a fallback for a few samples.
    let pre = by_plugin["serverless-pre-function"];
    let post = by_plugin["serverless-post-function"];
    let merged = by_plugin.get("serverless").copied().unwrap_or(0);
    assert!(
        merged * 20 <= pre + post,
        "{merged} samples named `serverless` against {pre} + {post}: {by_plugin:?}"
    );
    // The serverless frames carry the gateway's name.
    for p in ["serverless-pre-function", "serverless-post-function"] {
        let label = format!("[{p}]");
        let named: u64 = recs
            .iter()
            .map(|r| r.count(|f| f.iter().any(|fr| fr.starts_with(&label))))
            .sum();
        assert!(named > 0, "no {label} frame: {}", rec.dump());
    }
}

/// Each plugin's share of plugin CPU within 5 points of the time measured inside the
/// workers, per phase too; the endpoints agree.
#[test]
#[ignore = "needs root"]
fn plugin_cpu_matches_os_clock_truth() {
    common::require_root!();
    let Some(tarball) = harness() else { return };
    let _one = GATEWAY.lock().unwrap_or_else(|e| e.into_inner());
    let gw = Gateway::extract(&tarball);
    gw.template(true);
    let workers = gw.start();
    let pids: Vec<String> = workers.iter().map(u32::to_string).collect();
    let agent = Agent::start(&format!(
        "  process_names: [no-such-process]\n  pids: [{}]\n  docker:\n    enabled: false\n\
         sampling:\n  frequency_hz: 299\n",
        pids.join(", ")
    ));
    let load = Load::start(PORT, PATH, 4, Duration::from_secs(90));
    let seen = wait_for(30, || {
        let m = plugin_cpu(&agent.get("/metrics").1);
        PLUGINS
            .iter()
            .all(|p| m.keys().any(|(q, _)| q == p))
            .then_some(())
    });
    assert!(
        seen.is_some(),
        "not every plugin within 30 s:\n{:?}\n{}",
        plugin_cpu(&agent.get("/metrics").1),
        agent.log()
    );
    let (m0, t0) = (plugin_cpu(&agent.get("/metrics").1), gw.truth());
    thread::sleep(Duration::from_secs(25));
    let (m1, t1) = (plugin_cpu(&agent.get("/metrics").1), gw.truth());
    drop(load);
    thread::sleep(Duration::from_secs(2));

    let (measured, measured_phase) = window(&m0, &m1, |p| PLUGINS.contains(&p), same);
    let (truth, truth_phase) = window(&t0, &t1, |_| true, nginx_phase);
    eprintln!("plugin CPU over the window (s): {measured:?}");
    eprintln!("measured in the workers (s): {truth:?}");
    let total: f64 = PLUGINS
        .iter()
        .map(|p| measured.get(*p).copied().unwrap_or(0.0))
        .sum();
    assert!(
        total > 3.0,
        "too little plugin CPU ({total:.2} s): {measured:?}"
    );
    let worst = compare(
        "plugins",
        &shares(&measured, &PLUGINS),
        &shares(&truth, &PLUGINS),
    );
    let phases: Vec<&str> = truth_phase.keys().map(String::as_str).collect();
    let worst_phase = compare(
        "phases (plugin CPU by nginx phase)",
        &shares(&measured_phase, &phases),
        &shares(&truth_phase, &phases),
    );
    // Plugin CPU only in the phases APISIX runs plugins in (no balancer plugins on this
    // route: APISIX runs before_proxy from its access handler).
    for (phase, secs) in &measured_phase {
        assert!(
            phases.contains(&phase.as_str()) || *secs < total * 0.01,
            "plugin CPU in phase {phase}: {secs:.3} s of {total:.2} s"
        );
    }
    assert!(
        worst <= 0.05,
        "a plugin's share is off by more than 5 points"
    );
    assert!(
        worst_phase <= 0.05,
        "a phase's share is off by more than 5 points"
    );
    let text = agent.get("/metrics").1;
    let balancer = common::daemon::series_f64(
        &text,
        "apisix_profiler_phase_cpu_seconds_total",
        &["phase=\"balancer\""],
    )
    .unwrap_or(0.0);
    assert!(
        balancer > 0.0,
        "no balancer-phase CPU (APISIX's balancer Lua):\n{text}"
    );

    endpoints_agree(&agent, &workers, &plugin_cpu(&text));
}

/// The recent window (`/flamegraph`, JSON and filtered by plugin) and `/debug/pprof/profile`
/// hold the same samples per plugin, and their shares are the metrics' (all three cover the
/// daemon's whole run: the load has stopped and retention is longer).
fn endpoints_agree(agent: &Agent, workers: &[u32], metrics: &BTreeMap<(String, String), f64>) {
    let mut json_samples: BTreeMap<String, f64> = BTreeMap::new();
    let mut filtered: BTreeMap<String, f64> = BTreeMap::new();
    for w in workers {
        let (status, body) = agent.get(&format!("/flamegraph?pid={w}&format=json"));
        assert_eq!(status, 200, "{body}");
        let json: serde_json::Value = serde_json::from_str(&body).expect("json");
        for s in json["stacks"].as_array().expect("stacks") {
            let p = s["plugin"].as_str().unwrap_or("").to_owned();
            *json_samples.entry(p).or_insert(0.0) += s["value"].as_f64().unwrap_or(0.0);
        }
        for p in PLUGINS {
            let (status, body) =
                agent.get(&format!("/flamegraph?pid={w}&plugin={p}&format=collapsed"));
            assert_eq!(status, 200, "{body}");
            for (stack, n) in common::parse_folded(&body) {
                // The gateway's name, or the file rule's fallback (a tail call from the
                // phase function into a helper file: limit-count).
                assert!(
                    stack.contains(&format!("[{p}]"))
                        || stack.contains(&format!("/apisix/plugins/{p}")),
                    "{p}: {stack}"
                );
                *filtered.entry(p.to_owned()).or_insert(0.0) += n as f64;
            }
        }
    }
    let r = common::daemon::http_raw(agent.port, "/debug/pprof/profile?seconds=300");
    assert_eq!(r.status, 200);
    let prof: Profile = decode(&r.body).expect("pprof");
    let s = |i: i64| prof.string_table[usize::try_from(i).expect("index")].as_str();
    let mut pprof_samples: BTreeMap<String, f64> = BTreeMap::new();
    for x in &prof.sample {
        let plugin = x
            .label
            .iter()
            .find(|l| s(l.key) == "plugin")
            .map_or("", |l| s(l.str));
        *pprof_samples.entry(plugin.to_owned()).or_insert(0.0) += x.value[0] as f64;
    }
    let mut from_metrics: BTreeMap<String, f64> = BTreeMap::new();
    for ((p, _), v) in metrics {
        *from_metrics.entry(p.clone()).or_insert(0.0) += v;
    }
    for p in PLUGINS {
        let (j, f, q) = (json_samples.get(p), filtered.get(p), pprof_samples.get(p));
        assert!(
            j.is_some() && j == f,
            "{p}: /flamegraph JSON {j:?} vs filtered {f:?}"
        );
        let (j, q) = (j.copied().unwrap_or(0.0), q.copied().unwrap_or(0.0));
        assert!(
            (j - q).abs() <= j.max(q) * 0.01 + 2.0,
            "{p}: /flamegraph {j} samples vs pprof {q}"
        );
    }
    let m = shares(&from_metrics, &PLUGINS);
    let worst = compare(
        "/debug/pprof/profile vs metrics",
        &shares(&pprof_samples, &PLUGINS),
        &m,
    )
    .max(compare(
        "/flamegraph vs metrics",
        &shares(&json_samples, &PLUGINS),
        &m,
    ));
    assert!(worst <= 0.02, "the endpoints disagree with the metrics");
}
