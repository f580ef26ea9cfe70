//! The HTTP endpoint on a network, against real things: certificates made here with
//! `openssl`, `curl` and `openssl s_client` as clients, Debian's Prometheus scraping the real
//! agent over mutual TLS with basic auth (deploy/prometheus/prometheus-tls.yml), a real
//! nginx + ngx_lua worker under loopback load, 1,000 slow clients, certificate rotation.
//!
//! Root-free tests run the library's server (`daemon::http::serve`, no BPF) for the
//! connection limit, the timeouts, the header size limit and credentials, and the binary for
//! the start-time file checks (they fail before anything needs root). Root tests
//! (`#[ignore = "needs root"]`, `require_root!`) run the whole agent.

mod common;

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::TcpStream,
    path::Path,
    process::{Child, Command, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use common::{
    Lj, Load, Nginx, agent,
    daemon::{Agent, wait_for},
    prometheus::Prometheus,
    repo_root, text,
};

#[path = "network/support.rs"]
mod support;

use support::*;

// ---------------------------------------------------------------------------------------
// Root-free: the library's server

#[test]
fn connection_limit_header_and_idle_timeouts_and_header_size() {
    let server = Server::start(
        "http:\n  max_connections: 8\n  header_timeout_seconds: 1\n  idle_timeout_seconds: 3\n  \
         max_header_bytes: 2048\n",
    );
    let port = server.port;

    // Past the limit: 503 with a JSON reason, then closed; counted.
    let mut held: Vec<TcpStream> = (0..8)
        .map(|_| TcpStream::connect(("127.0.0.1", port)).expect("connect"))
        .collect();
    let open = || server.shared.metrics.http.open_connections.get();
    assert!(
        common::wait_until(Duration::from_secs(5), || open() >= 8),
        "the server took {} of 8 connections",
        open()
    );
    let mut ninth = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    ninth
        .write_all(b"GET /targets HTTP/1.1\r\nHost: x\r\n\r\n")
        .expect("send");
    ninth
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let (status, head, body) = read_response(&mut ninth);
    assert_eq!(status, 503, "{head}{body}");
    assert!(
        head.to_ascii_lowercase().contains("connection: close"),
        "{head}"
    );
    assert!(body.contains("http.max_connections"), "{body}");
    assert!(closed_by_server(&mut ninth, Duration::from_secs(3)));
    assert!(server.counted("max_connections", 1.0));

    // The 8 silent connections are closed after the header timeout, and slots come back.
    let started = Instant::now();
    for s in &mut held {
        assert!(
            closed_by_server(s, Duration::from_secs(4)),
            "a silent connection stayed open {:?} (header timeout 1 s)",
            started.elapsed()
        );
    }
    let took = started.elapsed();
    assert!(took < Duration::from_secs(3), "closed after {took:?}");
    assert!(server.counted("header_timeout", 8.0));
    assert_eq!(request(port, "/targets", &[]).0, 200);

    // Half a request header: closed after the header timeout, no answer.
    let mut slow = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    slow.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
        .expect("send");
    let t = Instant::now();
    assert!(closed_by_server(&mut slow, Duration::from_secs(4)));
    assert!(
        t.elapsed() >= Duration::from_millis(800),
        "{:?}",
        t.elapsed()
    );

    // Keep-alive: idle longer than the header timeout is fine; the idle timeout closes it.
    let mut ka = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    ka.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    ka.write_all(b"GET /targets HTTP/1.1\r\nHost: x\r\n\r\n")
        .expect("send");
    assert_eq!(read_response(&mut ka).0, 200);
    thread::sleep(Duration::from_millis(1800));
    ka.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .expect("send a second request after 1.8 s idle");
    assert_eq!(
        read_response(&mut ka).0,
        200,
        "an idle keep-alive connection was cut by the header timeout"
    );
    let idle_from = Instant::now();
    assert!(closed_by_server(&mut ka, Duration::from_secs(6)));
    let idle = idle_from.elapsed();
    assert!(
        (Duration::from_millis(2500)..Duration::from_millis(4500)).contains(&idle),
        "idle keep-alive connection closed after {idle:?} (idle timeout 3 s)"
    );

    // Request line plus headers above max_header_bytes: 431.
    let big = "a".repeat(4000);
    let (status, _, _) = request(port, "/targets", &[("X-Big", &big)]);
    assert_eq!(status, 431);
    assert!(server.counted("header_too_large", 1.0));
    let (status, _, _) = request(port, "/targets", &[("X-Small", &big[..1000])]);
    assert_eq!(status, 200, "1 KiB of headers is below the limit");
    eprintln!(
        "the last of 8 silent connections closed {:.2}s after the 9th was refused (header \
         timeout 1 s from accept); an idle keep-alive connection after {:.2}s (idle timeout 3 s)",
        took.as_secs_f64(),
        idle.as_secs_f64()
    );
}

#[test]
fn credentials_basic_and_bearer_and_the_profiling_switch() {
    let dir = tempfile::tempdir().expect("tempdir");
    let token = dir.path().join("token");
    std::fs::write(&token, "t0ken-for-prometheus\n").expect("write token");
    let hash = hash_password("correct horse");
    let yaml = format!(
        "http:\n  profiling_endpoints: false\n  basic_auth_users:\n    prometheus: '{hash}'\n  \
         bearer_token_file: {}\n",
        token.display()
    );
    let server = Server::start(&yaml);
    let port = server.port;
    let basic = |user: &str, password: &str| {
        use base64::Engine as _;
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
        )
    };

    let (status, head, body) = request(port, "/metrics", &[]);
    assert_eq!(status, 401, "{head}{body}");
    let challenges: Vec<&str> = head
        .lines()
        .filter_map(|l| l.strip_prefix("www-authenticate: "))
        .collect();
    assert!(
        challenges
            .iter()
            .any(|c| c.starts_with("Basic realm=\"apisix-agent\""))
            && challenges
                .iter()
                .any(|c| c.starts_with("Bearer realm=\"apisix-agent\"")),
        "{head}"
    );
    let good = basic("prometheus", "correct horse");
    let (status, _, body) = request(port, "/metrics", &[("Authorization", &good)]);
    assert_eq!(status, 200);
    assert!(
        body.contains("apisix_profiler_http_auth_failures_total"),
        "{body}"
    );
    let bearer = "Bearer t0ken-for-prometheus";
    assert_eq!(
        request(port, "/targets", &[("Authorization", bearer)]).0,
        200
    );
    for (authorization, reason) in [
        (basic("prometheus", "wrong").as_str(), "wrong_password"),
        (basic("nobody", "correct horse").as_str(), "unknown_user"),
        ("Bearer nope", "wrong_token"),
        ("Digest x", "unsupported_scheme"),
        ("Basic %%%", "malformed"),
    ] {
        let (status, _, _) = request(port, "/metrics", &[("Authorization", authorization)]);
        assert_eq!(status, 401, "{authorization}");
        let counted = value(
            &server.metrics(),
            "apisix_profiler_http_auth_failures_total",
            &format!("reason=\"{reason}\""),
        );
        assert_eq!(counted, 1.0, "{reason}");
    }
    assert_eq!(
        value(
            &server.metrics(),
            "apisix_profiler_http_auth_failures_total",
            "reason=\"missing\""
        ),
        1.0
    );
    // Unknown paths need credentials too.
    assert_eq!(request(port, "/nope", &[]).0, 401);
    // /healthz is open by default.
    assert_eq!(request(port, "/healthz", &[]).0, 200);
    // Profiling endpoints are off, with a reason; metrics stay.
    for path in [
        "/flamegraph?pid=1",
        "/debug/pprof/profile?seconds=5",
        "/debug/pprof/offcpu?seconds=5",
    ] {
        let (status, _, body) = request(port, path, &[("Authorization", good.as_str())]);
        assert_eq!(status, 404, "{path}: {body}");
        assert!(body.contains("http.profiling_endpoints"), "{path}: {body}");
    }
    drop(server);

    let closed = Server::start(&format!(
        "http:\n  healthz_without_auth: false\n  basic_auth_users:\n    prometheus: '{hash}'\n"
    ));
    assert_eq!(request(closed.port, "/healthz", &[]).0, 401);
    assert_eq!(
        request(closed.port, "/healthz", &[("Authorization", &good)]).0,
        200
    );
    assert_eq!(
        request(
            closed.port,
            "/flamegraph?pid=1",
            &[("Authorization", good.as_str())]
        )
        .0,
        404,
        "profiling endpoints on: an unknown pid is a 404 of the endpoint itself"
    );
}

#[test]
fn start_fails_on_unreadable_or_bad_files_naming_the_field() {
    let pki = Pki::new();
    pki.issue("other", "localhost", "serverAuth");
    std::fs::write(pki.path().join("junk.pem"), "hello\n").expect("write");
    std::fs::write(pki.path().join("empty-token"), "\n").expect("write");
    let tls = |cert: &str, key: &str, ca: &str| {
        let mut y = format!(
            "http:\n  listen: 127.0.0.1:0\n  tls:\n    cert_file: {}\n    key_file: {}\n",
            pki.file(cert),
            pki.file(key)
        );
        if !ca.is_empty() {
            y.push_str(&format!("    client_ca_file: {}\n", pki.file(ca)));
        }
        y
    };
    let cases = [
        (
            tls("absent.crt", "server.key", ""),
            "http.tls.cert_file: reading",
        ),
        (tls("junk.pem", "server.key", ""), "http.tls.cert_file:"),
        (
            tls("server.crt", "absent.key", ""),
            "http.tls.key_file: reading",
        ),
        (tls("server.crt", "junk.pem", ""), "http.tls.key_file:"),
        (
            tls("server.crt", "other.key", ""),
            "does not match http.tls.cert_file",
        ),
        (
            tls("server.crt", "server.key", "absent.crt"),
            "http.tls.client_ca_file: reading",
        ),
        (
            format!(
                "http:\n  listen: 127.0.0.1:0\n  bearer_token_file: {}\n",
                pki.file("absent-token")
            ),
            "http.bearer_token_file: reading",
        ),
        (
            format!(
                "http:\n  listen: 127.0.0.1:0\n  bearer_token_file: {}\n",
                pki.file("empty-token")
            ),
            "http.bearer_token_file:",
        ),
    ];
    for (yaml, want) in cases {
        let path = pki.path().join("config.yaml");
        std::fs::write(&path, &yaml).expect("write config");
        let out = Command::new(agent())
            .args(["run", "--config"])
            .arg(&path)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .output()
            .expect("run the agent");
        let stderr = text(&out.stderr);
        assert!(!out.status.success(), "started with\n{yaml}\n{stderr}");
        assert!(
            stderr.contains(want),
            "with\n{yaml}\nexpected {want:?} in:\n{stderr}"
        );
    }
}

// ---------------------------------------------------------------------------------------
// Root: the whole agent

/// The workload's Lua: one function that burns CPU.
const WORKLOAD_LUA: &str = r#"
local _M = {}
function _M.burn(n)
  local x = 0
  for i = 1, n do x = (x * 31 + i) % 1000003 end
  return x
end
return _M
"#;

/// deploy/prometheus/prometheus-tls.yml pointed at the agent on `port`: 1 s scrapes, the
/// rule files by absolute path, the CA and password files of the test, Prometheus's client
/// certificate (the agent asks for one), and two more jobs: a wrong password, and no client
/// certificate.
fn prometheus_tls_config(port: u16, pki: &Pki, password: &Path, wrong: &Path) -> String {
    use serde_yaml::Value;
    let dir = repo_root().join("deploy/prometheus");
    let path = dir.join("prometheus-tls.yml");
    let src = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
    let mut v: Value = serde_yaml::from_str(&src).unwrap_or_else(|e| panic!("{path:?}: {e}"));
    for key in ["scrape_interval", "scrape_timeout", "evaluation_interval"] {
        v["global"][key] = Value::from("1s");
    }
    if let Some(rules) = v["rule_files"].as_sequence_mut() {
        for r in rules.iter_mut() {
            let abs = dir.join(r.as_str().expect("rule file"));
            *r = Value::from(abs.display().to_string());
        }
    }
    let jobs = v["scrape_configs"]
        .as_sequence_mut()
        .unwrap_or_else(|| panic!("{path:?}: no scrape_configs"));
    assert_eq!(jobs.len(), 1, "{path:?}: one job expected");
    let job = &mut jobs[0];
    assert_eq!(job["job_name"], "apisix-agent", "{path:?}");
    assert_eq!(job["scheme"], "https", "{path:?}");
    assert!(
        job["basic_auth"]["username"].is_string(),
        "{path:?}: basic_auth"
    );
    assert!(
        job["tls_config"]["ca_file"].is_string(),
        "{path:?}: tls_config.ca_file"
    );
    job["scrape_interval"] = Value::from("1s");
    job["basic_auth"]["password_file"] = Value::from(password.display().to_string());
    job["tls_config"]["ca_file"] = Value::from(pki.file("ca.crt"));
    job["tls_config"]["cert_file"] = Value::from(pki.file("client.crt"));
    job["tls_config"]["key_file"] = Value::from(pki.file("client.key"));
    job["static_configs"][0]["targets"] =
        Value::Sequence(vec![Value::from(format!("127.0.0.1:{port}"))]);
    let mut wrong_password = job.clone();
    wrong_password["job_name"] = Value::from("wrong-password");
    wrong_password["basic_auth"]["password_file"] = Value::from(wrong.display().to_string());
    let mut no_cert = job.clone();
    no_cert["job_name"] = Value::from("no-client-certificate");
    if let Some(t) = no_cert["tls_config"].as_mapping_mut() {
        t.remove("cert_file");
        t.remove("key_file");
    }
    jobs.push(wrong_password);
    jobs.push(no_cert);
    serde_yaml::to_string(&v).expect("serialize")
}

/// curl arguments for the agent over TLS (trusting the test CA), with the client
/// certificate when `client_cert`.
fn tls_args(pki: &Pki, client_cert: bool) -> Vec<String> {
    let mut a = vec!["--cacert".to_owned(), pki.file("ca.crt")];
    if client_cert {
        a.extend([
            "--cert".to_owned(),
            pki.file("client.crt"),
            "--key".to_owned(),
            pki.file("client.key"),
        ]);
    }
    a
}

fn curl_agent(pki: &Pki, client_cert: bool, extra: &[&str], url: &str) -> Curl {
    let mut args = tls_args(pki, client_cert);
    args.extend(extra.iter().map(|s| (*s).to_owned()));
    args.push(url.to_owned());
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    curl(&refs)
}

#[test]
#[ignore = "needs root"]
fn prometheus_scrapes_over_mutual_tls_with_basic_auth() {
    common::require_root!();
    let pki = Pki::new();
    let password = pki.path().join("password");
    std::fs::write(&password, "scrape-pass-1\n").expect("write password");
    let wrong = pki.path().join("wrong-password");
    std::fs::write(&wrong, "not-it\n").expect("write password");
    let hash = hash_password("scrape-pass-1");

    let nginx = Nginx::start(
        Lj::Gc64,
        &[("network", WORKLOAD_LUA)],
        "",
        r#"location / { content_by_lua_block { ngx.say(require("network").burn(200000)) } }"#,
    );
    let _load = Load::start(nginx.port, "/", 1, Duration::from_secs(90));
    let config = format!(
        "http:\n  listen: 127.0.0.1:0\n  tls:\n    cert_file: {}\n    key_file: {}\n    \
         client_ca_file: {}\n  basic_auth_users:\n    prometheus: '{hash}'\ndiscovery:\n  \
         interval_seconds: 1\n  docker:\n    enabled: false\nsampling:\n  frequency_hz: 49\n",
        pki.file("server.crt"),
        pki.file("server.key"),
        pki.file("ca.crt")
    );
    let agent = Agent::start_with(&config, |a| {
        let url = format!("https://127.0.0.1:{}/healthz", a.port);
        curl_agent(&pki, true, &[], &url).status == 200
    });
    let base = format!("https://127.0.0.1:{}", agent.port);
    let log = agent.log();
    assert!(
        log.contains("tls=true")
            && log.contains("client_certificates=true")
            && log.contains("auth=true"),
        "{log}"
    );

    // curl: no client certificate → the handshake fails; with one but no credentials →
    // 401 with a Basic challenge; /healthz stays open; the right password → 200.
    let c = curl_agent(&pki, false, &[], &format!("{base}/healthz"));
    assert!(c.exit != 0 && c.status == 0, "no client certificate: {c:?}");
    assert!(c.stderr.contains("certificate required"), "{c:?}");
    let c = curl_agent(&pki, true, &[], &format!("{base}/metrics"));
    assert_eq!(c.status, 401, "{c:?}");
    assert!(
        c.headers
            .to_ascii_lowercase()
            .contains("www-authenticate: basic realm=\"apisix-agent\""),
        "{c:?}"
    );
    assert_eq!(
        curl_agent(&pki, true, &[], &format!("{base}/healthz")).status,
        200
    );
    let scrape = |pki: &Pki| {
        curl_agent(
            pki,
            true,
            &["-u", "prometheus:scrape-pass-1"],
            &format!("{base}/metrics"),
        )
    };
    assert_eq!(scrape(&pki).status, 200);

    let prom = Prometheus::start(&prometheus_tls_config(agent.port, &pki, &password, &wrong));
    let series = "apisix_profiler_lua_function_self_samples_total{job=\"apisix-agent\",\
                  file=~\".*/network.lua\"}";
    let arrived = wait_for(60, || {
        let up = prom.targets();
        let ok = up.iter().any(|(j, h, _)| j == "apisix-agent" && h == "up");
        let wrong_down = up
            .iter()
            .any(|(j, h, _)| j == "wrong-password" && h == "down");
        let cert_down = up
            .iter()
            .any(|(j, h, _)| j == "no-client-certificate" && h == "down");
        (ok && wrong_down && cert_down && !prom.query(series).is_empty()).then_some(up)
    });
    let Some((targets, took)) = arrived else {
        panic!(
            "within 60 s: targets {:?}, {series}: {:?}\nagent log:\n{}\nprometheus log:\n{}",
            prom.targets(),
            prom.query(series),
            agent.log(),
            prom.log()
        );
    };
    eprintln!("targets after {:.1}s: {targets:?}", took.as_secs_f64());
    let error_of = |job: &str| {
        targets
            .iter()
            .find(|(j, _, _)| j == job)
            .map(|(_, _, e)| e.clone())
            .unwrap_or_default()
    };
    assert!(error_of("wrong-password").contains("401"), "{targets:?}");
    assert!(
        error_of("no-client-certificate").contains("certificate"),
        "{targets:?}"
    );

    // The agent counted both kinds of refusal.
    let metrics = scrape(&pki).body;
    let wrong_password = value(
        &metrics,
        "apisix_profiler_http_auth_failures_total",
        "reason=\"wrong_password\"",
    );
    let handshakes = value(
        &metrics,
        "apisix_profiler_http_connection_errors_total",
        "reason=\"tls_handshake\"",
    );
    assert!(wrong_password >= 1.0, "{metrics}");
    assert!(handshakes >= 2.0, "curl's and Prometheus's: {metrics}");
    eprintln!(
        "agent counted wrong_password={wrong_password} tls_handshake={handshakes}; \
         no_client_certificate: {}",
        error_of("no-client-certificate")
    );
}

/// `n` connections that each sent `bytes` (e.g. half a request header), held until
/// dropped; opened from 8 threads.
fn slow_clients(port: u16, n: usize, bytes: &'static [u8]) -> Vec<TcpStream> {
    const THREADS: usize = 8;
    let handles: Vec<_> = (0..THREADS)
        .map(|t| {
            thread::spawn(move || {
                (t..n)
                    .step_by(THREADS)
                    .map(|i| {
                        let mut s = TcpStream::connect(("127.0.0.1", port))
                            .unwrap_or_else(|e| panic!("slow client {i}: {e}"));
                        if !bytes.is_empty() {
                            s.write_all(bytes).expect("send half a header");
                        }
                        s
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    handles
        .into_iter()
        .flat_map(|h| h.join().expect("slow client thread"))
        .collect()
}

/// Time of one whole HTTP/1.0 GET on a new connection, and its status.
fn timed_get(port: u16, path: &str) -> (Duration, u16) {
    let t = Instant::now();
    let (status, _) = common::daemon::http(port, path);
    (t.elapsed(), status)
}

#[test]
#[ignore = "needs root"]
fn slow_clients_do_not_starve_metrics_and_their_fds_are_released() {
    common::require_root!();
    const SLOW: usize = 1000;
    raise_own_fd_limit(4 * SLOW as u64);
    // The default header timeout (5 s) and connection limit (1024).
    let config = "http:\n  listen: 127.0.0.1:0\ndiscovery:\n  interval_seconds: 1\n  \
                  process_names: [no-such-process]\n  docker:\n    enabled: false\n";
    let agent = Agent::start_with(config, |a| a.get("/healthz").0 == 200);
    let pid = agent.pid();
    // Once its start-up is over, its fds stay put.
    let mut last = fd_count(pid);
    common::wait_until(Duration::from_secs(5), || {
        thread::sleep(Duration::from_millis(100));
        let now = fd_count(pid);
        std::mem::replace(&mut last, now) == now
    });
    let baseline = fd_count(pid);

    let opened = Instant::now();
    let slow = slow_clients(
        agent.port,
        SLOW,
        b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n",
    );
    let open_took = opened.elapsed();
    // Accepted: the agent holds an fd for each (most of them at least; checked below).
    common::wait_until(Duration::from_secs(5), || {
        fd_count(pid) >= baseline + SLOW * 9 / 10
    });
    let held = fd_count(pid);
    let mut worst = Duration::ZERO;
    for path in ["/healthz", "/metrics", "/healthz", "/metrics"] {
        let (took, status) = timed_get(agent.port, path);
        assert_eq!(status, 200, "{path} with {SLOW} slow clients");
        worst = worst.max(took);
        assert!(
            took < Duration::from_secs(1),
            "{path} took {took:?} with {SLOW} slow clients"
        );
    }
    // The probes ran while the slow clients were held.
    let still = fd_count(pid);
    assert!(
        still >= baseline + SLOW * 9 / 10,
        "only {still} agent fds (baseline {baseline}) after the probes: the slow clients \
         were no longer held"
    );
    assert!(
        held >= baseline + SLOW * 9 / 10,
        "the agent held {held} fds (baseline {baseline}) with {SLOW} slow clients"
    );

    // After the header timeout the agent closes them: its fds fall back.
    let released = wait_for(12, || {
        (fd_count(pid) <= baseline + 5).then(|| opened.elapsed())
    });
    let Some((after, _)) = released else {
        panic!(
            "the agent still has {} fds (baseline {baseline}) 12 s later",
            fd_count(pid)
        );
    };
    let counted = wait_for(3, || {
        let timeouts = value(
            &agent.get("/metrics").1,
            "apisix_profiler_http_connection_errors_total",
            "reason=\"header_timeout\"",
        );
        (timeouts >= SLOW as f64).then_some(())
    });
    assert!(
        counted.is_some(),
        "fewer than {SLOW} header timeouts counted"
    );
    eprintln!(
        "{SLOW} slow clients opened in {:.2}s; agent fds {baseline} -> {held} -> {} ({:.1}s \
         after the first was opened, header timeout 5 s); slowest /healthz or /metrics meanwhile: \
         {:.1} ms",
        open_took.as_secs_f64(),
        fd_count(pid),
        after.as_secs_f64(),
        worst.as_secs_f64() * 1000.0
    );
    drop(slow);
}

/// The SHA-256 fingerprint of the certificate the agent on `port` serves now.
fn served_fingerprint(pki: &Pki, port: u16) -> String {
    let out = Command::new("openssl")
        .args(["s_client", "-connect", &format!("127.0.0.1:{port}")])
        .args(["-servername", "localhost", "-CAfile", &pki.file("ca.crt")])
        .stdin(Stdio::null())
        .output()
        .expect("run openssl s_client");
    let pem = text(&out.stdout);
    let begin = pem.find("-----BEGIN CERTIFICATE-----");
    let end = pem.find("-----END CERTIFICATE-----");
    let (Some(b), Some(e)) = (begin, end) else {
        panic!(
            "no server certificate from s_client:\n{pem}\n{}",
            text(&out.stderr)
        );
    };
    let cert = &pem[b..e + "-----END CERTIFICATE-----".len()];
    let path = pki.path().join("served.pem");
    std::fs::write(&path, format!("{cert}\n")).expect("write");
    pki.fingerprint("served.pem")
}

/// Replaces `server.crt`/`server.key` with `NAME.crt`/`NAME.key` by renames (as a
/// Kubernetes Secret update swaps files), key first.
fn rotate(pki: &Pki, name: &str) {
    for ext in ["key", "crt"] {
        let tmp = pki.path().join(format!("incoming.{ext}"));
        std::fs::copy(pki.path().join(format!("{name}.{ext}")), &tmp).expect("copy");
        std::fs::rename(&tmp, pki.path().join(format!("server.{ext}"))).expect("rename");
    }
}

/// A kept-alive TLS connection (openssl s_client) sending requests on demand.
struct KeptAlive {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl KeptAlive {
    fn open(pki: &Pki, port: u16) -> Self {
        let mut child = Command::new("openssl")
            .args([
                "s_client",
                "-quiet",
                "-connect",
                &format!("127.0.0.1:{port}"),
            ])
            .args(["-servername", "localhost", "-CAfile", &pki.file("ca.crt")])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("run openssl s_client");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, lines) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Self { child, lines }
    }

    /// Sends GET /healthz; the status of the answer on this same connection.
    fn healthz(&mut self) -> Option<u16> {
        let stdin = self.child.stdin.as_mut()?;
        stdin
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
            .ok()?;
        stdin.flush().ok()?;
        let deadline = Instant::now() + Duration::from_secs(5);
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            let line = self.lines.recv_timeout(left).ok()?;
            // A body has no line end: the next status line follows it on the same line.
            if let Some(at) = line.find("HTTP/1.1 ") {
                return line[at + 9..].split_whitespace().next()?.parse().ok();
            }
        }
        None
    }
}

impl Drop for KeptAlive {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
#[ignore = "needs root"]
fn certificates_reload_on_sighup_and_on_change_without_dropping_the_listener() {
    common::require_root!();
    let pki = Pki::new();
    pki.issue("second", "localhost", "serverAuth");
    pki.issue("third", "localhost", "serverAuth");
    let first = pki.fingerprint("server.crt");
    std::fs::copy(pki.path().join("server.crt"), pki.path().join("first.crt")).expect("copy");
    let config = format!(
        "http:\n  listen: 127.0.0.1:0\n  header_timeout_seconds: 2\n  tls:\n    cert_file: {}\n    \
         key_file: {}\ndiscovery:\n  interval_seconds: 1\n  process_names: [no-such-process]\n  \
         docker:\n    enabled: false\n",
        pki.file("server.crt"),
        pki.file("server.key")
    );
    let agent = Agent::start_with(&config, |a| {
        let url = format!("https://127.0.0.1:{}/healthz", a.port);
        curl_agent(&pki, false, &[], &url).status == 200
    });
    let port = agent.port;
    assert_eq!(served_fingerprint(&pki, port), first);
    let mut kept = KeptAlive::open(&pki, port);
    assert_eq!(kept.healthz(), Some(200), "kept-alive connection");

    // SIGHUP: the new certificate at once, the old connection still served.
    rotate(&pki, "second");
    // SAFETY: plain syscall on our own child.
    unsafe { libc::kill(agent.pid() as i32, libc::SIGHUP) };
    let second = pki.fingerprint("second.crt");
    let hup = wait_for(5, || {
        (served_fingerprint(&pki, port) == second).then_some(())
    });
    assert!(hup.is_some(), "not reloaded on SIGHUP:\n{}", agent.log());
    assert_eq!(
        kept.healthz(),
        Some(200),
        "the connection opened before the reload was dropped"
    );

    // A change without a signal: picked up by the periodic check (every 5 s).
    rotate(&pki, "third");
    let third = pki.fingerprint("third.crt");
    let changed = wait_for(15, || {
        (served_fingerprint(&pki, port) == third).then_some(())
    });
    let Some((_, took)) = changed else {
        panic!("not reloaded within 15 s of a change:\n{}", agent.log());
    };

    // A broken file: the reload fails, is counted and logged, the last good one stays.
    std::fs::write(pki.path().join("server.crt"), "garbage\n").expect("write");
    // SAFETY: plain syscall on our own child.
    unsafe { libc::kill(agent.pid() as i32, libc::SIGHUP) };
    let failed = wait_for(5, || {
        let m = curl_agent(
            &pki,
            false,
            &[],
            &format!("https://127.0.0.1:{port}/metrics"),
        )
        .body;
        (value(
            &m,
            "apisix_profiler_http_file_reloads_total",
            "file=\"tls\",result=\"failed\"",
        ) >= 1.0)
            .then_some(m)
    });
    let Some((metrics, _)) = failed else {
        panic!("no failed reload counted:\n{}", agent.log());
    };
    assert_eq!(served_fingerprint(&pki, port), third);
    assert!(
        value(
            &metrics,
            "apisix_profiler_http_file_reloads_total",
            "file=\"tls\",result=\"ok\""
        ) >= 2.0,
        "{metrics}"
    );
    let log = agent.log();
    assert!(log.contains("TLS reload failed"), "{log}");
    assert!(log.contains("http.tls.cert_file"), "{log}");
    assert_eq!(kept.healthz(), Some(200));

    // A TLS client that never sends its hello is closed after the header timeout.
    let pid = agent.pid();
    let baseline = fd_count(pid);
    let silent = slow_clients(port, 200, b"");
    assert!(
        common::wait_until(Duration::from_secs(3), || fd_count(pid) >= baseline + 180),
        "the agent took {} of 200 silent TLS connections",
        fd_count(pid).saturating_sub(baseline)
    );
    let released = wait_for(8, || (fd_count(pid) <= baseline + 5).then_some(()));
    assert!(
        released.is_some(),
        "silent TLS connections still held: {} fds, baseline {baseline}",
        fd_count(pid)
    );
    drop(silent);
    eprintln!(
        "reloaded on SIGHUP within {:.1}s, on a file change within {:.1}s; the kept-alive \
         connection answered across three reloads",
        hup.map(|(_, d)| d.as_secs_f64()).unwrap_or(0.0),
        took.as_secs_f64()
    );
}
