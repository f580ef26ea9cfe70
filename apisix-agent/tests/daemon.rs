//! Root tests of the daemon (`apisix-agent run`) against real processes: a host nginx-lua
//! worker and nginx-lua workers in real Docker containers (image built from Debian packages
//! by `scripts/test-image.sh`, daemon started by `scripts/docker-up.sh`, host network only),
//! all under bounded loopback load. Plus configuration errors, which need no root.

mod common;

use std::{
    path::Path,
    process::Command,
    thread,
    time::{Duration, Instant},
};

use common::{
    Lj, Load, Nginx, agent,
    container::{Container, IMAGE, require_docker},
    daemon::{Agent, http, series, wait_for},
};

fn burner(name: &str) -> String {
    format!(
        r#"
local _M = {{}}
function _M.{name}(n)
  local x = 0
  for i = 1, n do x = (x * 31 + i) % 1000003 end
  return x
end
function _M.run()
  local r = _M.{name}(200000)
  return r
end
return _M
"#
    )
}

/// An nginx on the host whose every request runs `burner(name)`.
fn host_nginx(name: &str) -> Nginx {
    Nginx::start(
        Lj::Gc64,
        &[("hostwork", &burner(name))],
        "",
        r#"location / { content_by_lua_block { ngx.say(require("hostwork").run()) } }"#,
    )
}

#[test]
#[ignore = "needs root"]
fn host_and_docker_targets_are_profiled() {
    common::require_root!();
    require_docker();
    let host = host_nginx("host_burn");
    let _host_load = Load::start(host.port, "/", 1, Duration::from_secs(120));
    let before = Container::start(
        "apisix-profiler-before",
        "ctrwork",
        &burner("ctr_burn"),
        "run()",
    );
    let _before_load = Load::start(before.port, "/", 1, Duration::from_secs(120));

    let mut agent = Agent::start("sampling:\n  frequency_hz: 49\n  max_concurrent_captures: 1\n");
    let host_fn = ["function=\"_M.host_burn\"", "container=\"\"", "image=\"\""];
    let before_container = format!("container=\"{}\"", before.name);
    let ctr_fn = [
        "function=\"_M.ctr_burn\"",
        &before_container,
        "image=\"apisix-profiler-test/nginx-lua:bookworm\"",
        "file=\"/app/ctrwork.lua\"",
    ];
    let seen = wait_for(15, || {
        let (_, m) = agent.get("/metrics");
        (series(
            &m,
            "apisix_profiler_lua_function_self_samples_total",
            &host_fn,
        )
        .is_some()
            && series(
                &m,
                "apisix_profiler_lua_function_self_samples_total",
                &ctr_fn,
            )
            .is_some())
        .then_some(())
    });
    let (_, m) = agent.get("/metrics");
    let Some((_, took)) = seen else {
        panic!(
            "within 15 s, /metrics did not show both workloads' Lua functions:\n{m}\nagent log:\n{}",
            agent.log()
        );
    };
    eprintln!(
        "both workloads in /metrics {:.1}s after the agent started",
        took.as_secs_f64()
    );
    assert!(
        series(&m, "apisix_profiler_lua_function_samples_total", &host_fn).is_some(),
        "inclusive series missing:\n{m}"
    );
    assert!(
        m.contains("apisix_profiler_c_function_self_samples_total{"),
        "{m}"
    );
    // The VM-state split: the workload's Lua runs somewhere (its samples have a state).
    assert!(
        series(
            &m,
            "apisix_profiler_lua_vm_state_samples_total",
            &[&before_container]
        )
        .is_some_and(|n| n > 0),
        "no VM-state series for the container:\n{m}"
    );
    assert!(
        series(
            &m,
            "apisix_profiler_samples_total",
            &[&before_container, "process=\"nginx\""]
        )
        .is_some_and(|n| n > 0),
        "{m}"
    );
    assert!(
        series(
            &m,
            "apisix_profiler_lost_samples_total",
            &[&before_container]
        )
        .is_some(),
        "lost samples series missing:\n{m}"
    );
    assert!(
        m.contains("apisix_profiler_targets{flavour=\"gc64\"}"),
        "{m}"
    );
    assert!(
        m.contains("apisix_profiler_agent_resident_memory_bytes"),
        "{m}"
    );
    assert!(!m.contains("pid="), "PIDs must not be labels:\n{m}");

    // /targets lists both with their labels and flavour.
    let (status, targets) = agent.get("/targets");
    assert_eq!(status, 200);
    let targets: serde_json::Value = serde_json::from_str(&targets).expect("targets JSON");
    let list = targets.as_array().expect("array");
    let host_worker = host.worker().expect("host worker");
    let host_entry = list
        .iter()
        .find(|t| t["pid"] == host_worker)
        .unwrap_or_else(|| panic!("host worker {host_worker} not in {targets}"));
    assert_eq!(host_entry["container"], "");
    assert_eq!(host_entry["flavour"], "gc64");
    assert!(
        list.iter()
            .any(|t| t["container"] == before.name.as_str() && t["image"] == IMAGE),
        "{targets}"
    );

    // A container started after the agent is picked up, and dropped when it stops.
    let started = Instant::now();
    let after = Container::start(
        "apisix-profiler-after",
        "latework",
        &burner("late_burn"),
        "run()",
    );
    let _after_load = Load::start(after.port, "/", 1, Duration::from_secs(60));
    let after_container = format!("container=\"{}\"", after.name);
    let late = wait_for(15, || {
        let (_, m) = agent.get("/metrics");
        series(
            &m,
            "apisix_profiler_lua_function_self_samples_total",
            &["function=\"_M.late_burn\"", &after_container],
        )
    });
    assert!(
        late.is_some(),
        "container {} started after the agent never showed in /metrics:\n{}",
        after.name,
        agent.log()
    );
    eprintln!(
        "container started after the agent: first metric {:.1}s after `docker run`",
        started.elapsed().as_secs_f64()
    );
    let in_targets = |name: &str| {
        let (_, t) = agent.get("/targets");
        t.contains(&format!("\"container\":\"{name}\""))
    };
    assert!(in_targets(&after.name));
    after.stop();
    let gone = wait_for(10, || (!in_targets(&after.name)).then_some(()));
    assert!(gone.is_some(), "stopped container still in /targets");

    // On-demand flame graph of the host worker.
    let (status, svg) = agent.get(&format!("/flamegraph?pid={host_worker}&seconds=3"));
    assert_eq!(status, 200, "{svg}");
    assert!(
        svg.contains("<svg") && svg.trim_end().ends_with("</svg>"),
        "not an SVG"
    );
    assert!(svg.contains("_M.host_burn"), "SVG lacks the Lua function");
    let (status, folded) = agent.get(&format!(
        "/flamegraph?pid={host_worker}&seconds=2&format=collapsed&frequency=199"
    ));
    assert_eq!(status, 200, "{folded}");
    let lines: Vec<&str> = folded.lines().collect();
    assert!(!lines.is_empty());
    for l in &lines {
        let (_, n) = l.rsplit_once(' ').unwrap_or_else(|| panic!("bad line {l}"));
        assert!(n.parse::<u64>().is_ok(), "bad count in {l}");
    }
    assert!(
        lines
            .iter()
            .any(|l| l.contains("ngx_http_lua_run_thread") && l.contains("_M.host_burn@")),
        "{folded}"
    );
    // Recent stacks of a container, at once, and as JSON.
    let (status, recent) = agent.get(&format!(
        "/flamegraph?container={}&format=collapsed",
        before.name
    ));
    assert_eq!(status, 200);
    assert!(recent.contains("_M.ctr_burn@/app/ctrwork.lua"), "{recent}");
    let (status, json) = agent.get(&format!(
        "/flamegraph?container={}&format=json",
        before.name
    ));
    assert_eq!(status, 200);
    let json: serde_json::Value = serde_json::from_str(&json).expect("flame JSON");
    assert!(json["total"].as_u64().is_some_and(|n| n > 0), "{json}");

    // Errors.
    let (s, body) = agent.get("/flamegraph?pid=99999999999&seconds=1");
    assert_eq!(s, 400, "{body}");
    let (s, body) = agent.get("/flamegraph?pid=4000000");
    assert_eq!(s, 404, "{body}");
    assert!(body.contains("\"error\""), "{body}");
    let (s, _) = agent.get("/flamegraph?container=no-such-container");
    assert_eq!(s, 404);
    let (s, _) = agent.get(&format!("/flamegraph?pid={host_worker}&seconds=121"));
    assert_eq!(s, 400);
    let (s, _) = agent.get(&format!("/flamegraph?pid={host_worker}&format=png"));
    assert_eq!(s, 400);
    let (s, _) = agent.get("/flamegraph?pid=1&path=/etc/shadow");
    assert_eq!(s, 400);
    // One capture at a time is configured: a second concurrent one is refused.
    let started = |agent: &Agent| agent.log().matches("capture started").count();
    let before = started(&agent);
    let port = agent.port;
    let first = thread::spawn(move || {
        http(
            port,
            &format!("/flamegraph?pid={host_worker}&seconds=3&format=collapsed"),
        )
        .0
    });
    // The slot is taken before the capture says it started.
    wait_for(10, || (started(&agent) > before).then_some(()))
        .unwrap_or_else(|| panic!("the first capture did not start:\n{}", agent.log()));
    let (s, body) = agent.get(&format!("/flamegraph?pid={host_worker}&seconds=1"));
    assert_eq!(s, 429, "{body}");
    assert_eq!(first.join().expect("first capture"), 200);

    let status = agent.stop();
    let log = agent.log();
    assert!(status.success(), "agent exit {status:?}:\n{log}");
    assert!(log.contains("continuous sampler detached"), "{log}");
}

#[test]
#[ignore = "needs root"]
fn docker_socket_absent_keeps_host_profiling() {
    common::require_root!();
    let host = host_nginx("lonely_burn");
    let _load = Load::start(host.port, "/", 1, Duration::from_secs(60));
    let agent = Agent::start(
        "  docker:\n    socket: /nonexistent/docker.sock\nsampling:\n  frequency_hz: 49\n",
    );
    let seen = wait_for(15, || {
        let (_, m) = agent.get("/metrics");
        series(
            &m,
            "apisix_profiler_lua_function_self_samples_total",
            &["function=\"_M.lonely_burn\""],
        )
    });
    assert!(
        seen.is_some(),
        "host process not profiled without Docker:\n{}",
        agent.log()
    );
    let log = agent.log();
    assert_eq!(
        log.matches("Docker API unavailable").count(),
        1,
        "the missing Docker socket must be logged once:\n{log}"
    );
}

fn config_error(yaml: &str) -> String {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("bad.yaml");
    std::fs::write(&path, yaml).expect("write");
    let out = Command::new(agent())
        .args(["run", "--config"])
        .arg(&path)
        .output()
        .expect("run agent");
    assert!(!out.status.success(), "accepted bad config {yaml:?}");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        err.contains("bad.yaml"),
        "error does not name the file: {err}"
    );
    err
}

#[test]
fn bad_config_files_name_the_field() {
    let e = config_error("sampling:\n  frequency_hz: 19\n  bogus: 1\n");
    assert!(e.contains("sampling") && e.contains("bogus"), "{e}");
    let e = config_error("sampling:\n  frequency_hz: often\n");
    assert!(e.contains("sampling.frequency_hz"), "{e}");
    let e = config_error("http:\n  listen: \"not an address\"\n");
    assert!(e.contains("http.listen"), "{e}");
    let e = config_error("discovery:\n  docker:\n    enabled: maybe\n");
    assert!(e.contains("discovery.docker.enabled"), "{e}");
    let missing = Command::new(agent())
        .args(["run", "--config", "/nonexistent/agent.yaml"])
        .output()
        .expect("run agent");
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("/nonexistent/agent.yaml"));
    // The example file is valid.
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config.example.yaml");
    let ok = Command::new(agent())
        .arg("check-config")
        .arg(&example)
        .output()
        .expect("check-config");
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
}

/// A kernel that refuses the BPF programs (here: no privilege to load them, as user
/// `nobody`) leaves the daemon serving and saying why: `/healthz` 503 with the reason,
/// `apisix_profiler_bpf_program_loaded{program="cpu_sampler"}` 0, `/targets` still answered.
#[test]
#[ignore = "needs root"]
fn a_refused_sampler_leaves_the_daemon_serving_and_saying_why() {
    common::require_root!();
    let config = "http:\n  listen: 127.0.0.1:0\ndiscovery:\n  interval_seconds: 1\n  docker:\n    enabled: false\n";
    let mut agent = Agent::start_as(config, Some(65534), |a| a.get("/healthz").0 == 503);
    let (status, body) = agent.get("/healthz");
    assert_eq!(status, 503, "{body}");
    let health: serde_json::Value = serde_json::from_str(&body).expect("healthz JSON");
    let error = health["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("CPU sampler") && error.contains("permission"),
        "{body}\n{}",
        agent.log()
    );
    let (status, metrics) = agent.get("/metrics");
    assert_eq!(status, 200);
    assert!(
        metrics.contains("apisix_profiler_bpf_program_loaded{program=\"cpu_sampler\"} 0"),
        "{metrics}"
    );
    assert_eq!(agent.get("/targets").0, 200);
    assert!(agent.stop().success(), "{}", agent.log());
}
