//! Root tier of issue 21: hostile targets and clients, each attack run for real against the
//! agent binary (real nginx + LuaJIT workers, a real FIFO, a real Prometheus, real sockets),
//! asserting the fixed behaviour. As a normal user each test says it is skipped.

mod common;

use std::{
    ffi::CString,
    io::{Read as _, Write as _},
    net::TcpStream,
    os::unix::process::CommandExt as _,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use common::{
    Lj, Load, Nginx,
    daemon::{Agent, series, wait_for},
    prometheus::Prometheus,
};

/// The attacker's chunk name of issue 21, attack 1.
const EVIL_CHUNK: &str = "@x\"} 9\nforged{a=\"b\"} 1\n#\\";

/// One HTTP/1.1 request with extra header lines; (status, headers + body), or `None` when the
/// agent did not answer within `timeout`.
fn request(port: u16, path: &str, headers: &str, timeout: Duration) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(timeout)).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n{headers}\r\n"
    )
    .ok()?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).ok()?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, text))
}

fn basic(user: &str, password: &str) -> String {
    use base64::Engine as _;
    let b = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    format!("Authorization: Basic {b}\r\n")
}

#[test]
#[ignore = "needs root"]
fn chunk_names_cannot_forge_metrics() {
    common::require_root!();
    let lua = format!(
        "local f = load([[return function() local x = 0 for i = 1, 2e5 do x = x + i end \
         return x end]], {EVIL_CHUNK:?})()\nreturn {{ run = f }}\n"
    );
    let nginx = Nginx::start(
        Lj::Gc64,
        &[("evil", &lua)],
        "",
        "location / { content_by_lua_block { ngx.say(require('evil').run()) } }",
    );
    let _load = Load::start(nginx.port, "/", 1, Duration::from_secs(60));
    let agent = Agent::start("  docker:\n    enabled: false\nsampling:\n  frequency_hz: 199\n");
    let prom = Prometheus::start(&format!(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n  - job_name: \
         agent\n    static_configs:\n      - targets: ['127.0.0.1:{}']\n",
        agent.port
    ));
    let escaped = "x\\\"} 9\\nforged{a=\\\"b\\\"} 1\\n#\\\\";
    let seen = wait_for(45, || {
        let metrics = agent.get("/metrics").1;
        metrics.contains(escaped).then_some(metrics)
    });
    let Some((metrics, _)) = seen else {
        panic!(
            "no escaped chunk name in /metrics within 45 s:\n{}\n{}",
            agent.get("/metrics").1,
            agent.log()
        );
    };
    assert!(
        !metrics.lines().any(|l| l.starts_with("forged")),
        "{metrics}"
    );
    // Prometheus parses every scrape (`up` 1), keeps the name whole, and has no forged series.
    let ok = wait_for(20, || {
        let up = prom.query("up{job=\"agent\"}");
        let named = prom
            .query("apisix_profiler_lua_function_self_samples_total{file=~\"(?s)x.*forged.*\"}");
        (up.first().and_then(|s| s["value"][1].as_str()) == Some("1") && !named.is_empty())
            .then_some(named)
    });
    let Some((named, _)) = ok else {
        panic!(
            "Prometheus did not ingest the escaped series: {}\n{}",
            prom.api("/api/v1/targets"),
            prom.log()
        );
    };
    assert_eq!(
        named[0]["metric"]["file"].as_str(),
        Some("x\"} 9\nforged{a=\"b\"} 1\n#\\"),
        "{named:?}"
    );
    assert!(prom.query("forged").is_empty());
}

/// A process named nginx (`comm`), cmdline `nginx: worker process`, running a copy of
/// `/bin/sleep` that is then unlinked and replaced by `replace`.
fn fake_worker(dir: &std::path::Path, name: &str, replace: impl Fn(&std::path::Path)) -> Child {
    let sub = dir.join(name);
    std::fs::create_dir_all(&sub).expect("mkdir");
    let exe = sub.join("nginx");
    std::fs::copy("/bin/sleep", &exe).expect("copy sleep");
    let child = Command::new(&exe)
        .arg0("nginx: worker process")
        .arg("300")
        .stdin(Stdio::null())
        .spawn()
        .expect("start the fake worker");
    // Until exec is done, the path is still the file.
    let pid = child.id();
    wait_for(5, || {
        std::fs::read_to_string(format!("/proc/{pid}/comm"))
            .ok()
            .filter(|c| c.trim() == "nginx")
    })
    .expect("fake worker exec'd");
    std::fs::remove_file(&exe).expect("unlink");
    replace(&exe);
    child
}

#[test]
#[ignore = "needs root"]
fn a_fifo_or_symlink_in_place_of_a_mapped_file_stalls_nothing() {
    common::require_root!();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut fifo_worker = fake_worker(dir.path(), "fifo", |p| {
        let c = CString::new(p.as_os_str().as_encoded_bytes()).expect("path");
        // SAFETY: a valid path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo");
    });
    let mut link_worker = fake_worker(dir.path(), "link", |p| {
        std::os::unix::fs::symlink("/etc/shadow", p).expect("symlink");
    });
    let mut agent = Agent::start("  docker:\n    enabled: false\n");
    // A real worker started after them is listed within a few scans.
    let nginx = Nginx::start(Lj::Gc64, &[], "", "location / { return 200; }");
    let worker = nginx.worker().expect("worker");
    let listed = wait_for(15, || {
        let (_, body) = agent.get("/targets");
        body.contains(&format!("\"pid\":{worker}")).then_some(())
    });
    assert!(
        listed.is_some(),
        "real worker {worker} not listed: {}\n{}",
        agent.get("/targets").1,
        agent.log()
    );
    let started = Instant::now();
    assert_eq!(agent.get("/healthz").0, 200);
    assert!(started.elapsed() < Duration::from_secs(1));
    // Nothing was refused: the files were opened through map_files, never by their path.
    let metrics = agent.get("/metrics").1;
    assert!(
        metrics.contains("apisix_profiler_target_file_refusals_total{reason=\"not_regular\"} 0"),
        "{metrics}"
    );
    // The FIFO was never opened: nobody wrote to it, and the agent still stops in time.
    let stopped = Instant::now();
    assert!(agent.stop().success());
    assert!(stopped.elapsed() < Duration::from_secs(10));
    for c in [&mut fifo_worker, &mut link_worker] {
        let _ = c.kill();
        let _ = c.wait();
    }
}

/// `clone3` with `set_tid`: a child with exactly `pid` that execs `sleep 30`; `None` while
/// the pid is taken.
fn spawn_with_pid(pid: u32) -> Option<u32> {
    #[repr(C)]
    struct CloneArgs {
        flags: u64,
        pidfd: u64,
        child_tid: u64,
        parent_tid: u64,
        exit_signal: u64,
        stack: u64,
        stack_size: u64,
        tls: u64,
        set_tid: u64,
        set_tid_size: u64,
        cgroup: u64,
    }
    let tids = [pid as libc::pid_t];
    let args = CloneArgs {
        flags: 0,
        pidfd: 0,
        child_tid: 0,
        parent_tid: 0,
        exit_signal: libc::SIGCHLD as u64,
        stack: 0,
        stack_size: 0,
        tls: 0,
        set_tid: tids.as_ptr() as u64,
        set_tid_size: 1,
        cgroup: 0,
    };
    let prog = CString::new("/bin/sleep").expect("cstr");
    let a0 = CString::new("sleep").expect("cstr");
    let a1 = CString::new("30").expect("cstr");
    let argv = [a0.as_ptr(), a1.as_ptr(), std::ptr::null()];
    // SAFETY: clone3 without CLONE_VM: the child has its own copy of memory and only calls
    // execv (async-signal-safe) on strings prepared before, then _exit.
    let r = unsafe {
        libc::syscall(
            libc::SYS_clone3,
            &raw const args,
            std::mem::size_of::<CloneArgs>(),
        )
    };
    if r == 0 {
        // SAFETY: see above.
        unsafe {
            libc::execv(prog.as_ptr(), argv.as_ptr());
            libc::_exit(127);
        }
    }
    (r > 0).then_some(r as u32)
}

#[test]
#[ignore = "needs root"]
fn a_reused_pid_is_not_profiled() {
    common::require_root!();
    let nginx = Nginx::start(Lj::Gc64, &[], "", "location / { return 200; }");
    let worker = nginx.worker().expect("worker");
    // Discovery every 60 s: the snapshot still names the old process when the pid is reused.
    let agent = Agent::start_with(
        "http:\n  listen: 127.0.0.1:0\ndiscovery:\n  interval_seconds: 60\n  docker:\n    \
         enabled: false\n",
        |a| a.get("/targets").1.contains(&format!("\"pid\":{worker}")),
    );
    assert_eq!(
        agent
            .get(&format!("/flamegraph?pid={worker}&format=collapsed"))
            .0,
        200
    );
    drop(nginx);
    let reused = wait_for(5, || spawn_with_pid(worker)).map(|(p, _)| p);
    assert_eq!(reused, Some(worker), "pid {worker} not reused");
    assert!(
        agent
            .get("/targets")
            .1
            .contains(&format!("\"pid\":{worker}")),
        "the snapshot should still name the old process"
    );
    for path in [
        format!("/flamegraph?pid={worker}&format=collapsed"),
        format!("/flamegraph?pid={worker}&seconds=1&format=collapsed"),
        format!("/debug/pprof/profile?pid={worker}&seconds=5"),
    ] {
        let (status, body) = agent.get(&path);
        assert_eq!(status, 404, "{path}: {body}");
    }
    // SAFETY: plain syscalls on our own child.
    unsafe {
        libc::kill(worker as i32, libc::SIGKILL);
        libc::waitpid(worker as i32, std::ptr::null_mut(), 0);
    }
}

#[test]
#[ignore = "needs root"]
fn a_removed_or_emptied_token_file_revokes_the_token() {
    common::require_root!();
    let dir = tempfile::tempdir().expect("tempdir");
    let token = dir.path().join("token");
    std::fs::write(&token, "s3cret\n").expect("write");
    let config = format!(
        "http:\n  listen: 127.0.0.1:0\n  bearer_token_file: {}\n  healthz_without_auth: true\n\
         discovery:\n  docker:\n    enabled: false\n",
        token.display()
    );
    let agent = Agent::start_with(&config, |a| a.get("/healthz").0 == 200);
    let auth = "Authorization: Bearer s3cret\r\n";
    let get = || request(agent.port, "/targets", auth, Duration::from_secs(5)).map(|r| r.0);
    assert_eq!(get(), Some(200));
    std::fs::remove_file(&token).expect("remove");
    let revoked = wait_for(12, || (get() == Some(401)).then_some(()));
    assert!(
        revoked.is_some(),
        "deleted token still valid:\n{}",
        agent.log()
    );
    std::fs::write(&token, "s3cret\n").expect("write");
    assert!(wait_for(12, || (get() == Some(200)).then_some(())).is_some());
    std::fs::write(&token, "  \n").expect("empty");
    assert!(
        wait_for(12, || (get() == Some(401)).then_some(())).is_some(),
        "emptied token file still valid"
    );
}

#[test]
#[ignore = "needs root"]
fn wrong_password_floods_are_refused_fast() {
    common::require_root!();
    let hash = hash_password("right");
    let config = format!(
        "http:\n  listen: 127.0.0.1:0\n  max_connections: 2048\n  healthz_without_auth: true\n  \
         basic_auth_users:\n    prom: '{hash}'\ndiscovery:\n  docker:\n    enabled: false\n"
    );
    let agent = Agent::start_with(&config, |a| a.get("/healthz").0 == 200);
    let wrong = basic("prom", "wrong");
    let started = Instant::now();
    let mut conns: Vec<TcpStream> = (0..1024)
        .filter_map(|_| TcpStream::connect(("127.0.0.1", agent.port)).ok())
        .collect();
    assert!(conns.len() >= 1000, "only {} connections", conns.len());
    for c in &mut conns {
        let _ = write!(
            c,
            "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{wrong}\r\n"
        );
    }
    // /healthz still answers at once during the flood.
    let h = Instant::now();
    assert_eq!(
        request(agent.port, "/healthz", "", Duration::from_secs(2)).map(|r| r.0),
        Some(200)
    );
    assert!(
        h.elapsed() < Duration::from_millis(500),
        "{:?}",
        h.elapsed()
    );
    let (mut refused, mut busy) = (0, 0);
    for c in &mut conns {
        c.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let mut buf = Vec::new();
        let _ = c.read_to_end(&mut buf);
        match String::from_utf8_lossy(&buf).split_whitespace().nth(1) {
            Some("401") => refused += 1,
            Some("503") => busy += 1,
            other => panic!("unexpected answer {other:?}"),
        }
    }
    let took = started.elapsed();
    let _ = writeln!(
        std::io::stderr(),
        "1024 wrong passwords: {refused} × 401, {busy} × 503 in {took:?}"
    );
    assert!(busy > 0, "the bcrypt queue is not bounded");
    assert!(took < Duration::from_secs(15), "{took:?}");
    assert_eq!(
        request(
            agent.port,
            "/targets",
            &basic("prom", "right"),
            Duration::from_secs(5)
        )
        .map(|r| r.0),
        Some(200)
    );
    let metrics = request(
        agent.port,
        "/metrics",
        &basic("prom", "right"),
        Duration::from_secs(5),
    )
    .expect("metrics")
    .1;
    assert!(
        series(
            &metrics,
            "apisix_profiler_http_auth_failures_total",
            &["bcrypt_busy"]
        )
        .is_some_and(|n| n > 0),
        "{metrics}"
    );
}

#[test]
#[ignore = "needs root"]
fn stalled_tls_handshakes_are_closed_by_the_header_timeout() {
    common::require_root!();
    let dir = tempfile::tempdir().expect("tempdir");
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    let ok = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
        ])
        .args(["-nodes", "-days", "1", "-subj", "/CN=localhost", "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stderr(Stdio::null())
        .status()
        .expect("openssl (apt-get install openssl)");
    assert!(ok.success());
    let config = format!(
        "http:\n  listen: 127.0.0.1:0\n  max_connections: 2048\n  header_timeout_seconds: 2\n  \
         tls:\n    cert_file: {}\n    key_file: {}\ndiscovery:\n  docker:\n    enabled: false\n",
        cert.display(),
        key.display()
    );
    let port_ready = |a: &Agent| TcpStream::connect(("127.0.0.1", a.port)).is_ok();
    let agent = Agent::start_with(&config, port_ready);
    let mut conns: Vec<TcpStream> = (0..1000)
        .filter_map(|_| TcpStream::connect(("127.0.0.1", agent.port)).ok())
        .collect();
    assert!(conns.len() >= 990, "only {} connections", conns.len());
    // The first 3 bytes of a TLS record holding a ClientHello, then nothing.
    for c in &mut conns {
        let _ = c.write_all(&[0x16, 0x03, 0x01]);
    }
    let started = Instant::now();
    let mut held = 0;
    for c in &mut conns {
        c.set_read_timeout(Some(Duration::from_secs(6)))
            .expect("timeout");
        let mut buf = [0u8; 64];
        // The agent closes the connection (EOF or reset); a timeout means it still holds it.
        if let Err(e) = c.read(&mut buf)
            && matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            )
        {
            held += 1;
        }
    }
    let took = started.elapsed();
    let _ = writeln!(
        std::io::stderr(),
        "1000 stalled TLS handshakes: {held} still held; all read within {took:?}"
    );
    assert_eq!(held, 0);
    assert!(took < Duration::from_secs(8), "{took:?}");
    assert!(!agent.log().contains("panicked"), "{}", agent.log());
}

/// A Lua workload with many distinct stacks: recursion of a varying depth.
const DEEP_LUA: &str = "local M = {}\nlocal function r(n) if n == 0 then local x = 0 for i = 1, \
                        2e4 do x = x + i end return x end return r(n - 1) + 1 end\nfunction \
                        M.run() return r(math.random(1, 60)) end\nreturn M\n";

#[test]
#[ignore = "needs root"]
fn window_renders_leave_healthz_alone() {
    common::require_root!();
    let nginx = Nginx::start(
        Lj::Gc64,
        &[("deep", DEEP_LUA)],
        "",
        "location / { content_by_lua_block { ngx.say(require('deep').run()) } }",
    );
    let worker = nginx.worker().expect("worker");
    let _load = Load::start(nginx.port, "/", 2, Duration::from_secs(90));
    let agent = Agent::start(
        "  docker:\n    enabled: false\nsampling:\n  frequency_hz: 1000\n  \
         max_retained_samples: 20000\n",
    );
    // Fill the window to its cap.
    let full = wait_for(60, || {
        let m = agent.get("/metrics").1;
        series(&m, "apisix_profiler_samples_total", &[]).filter(|n| *n >= 20_000)
    });
    assert!(
        full.is_some(),
        "window not full:\n{}",
        agent.get("/metrics").1
    );
    // /healthz alone first, for the machine's own latency.
    let mut alone = Duration::ZERO;
    for _ in 0..20 {
        let t = Instant::now();
        let _ = request(agent.port, "/healthz", "", Duration::from_secs(5));
        alone = alone.max(t.elapsed());
    }
    let path = format!("/flamegraph?pid={worker}&format=json");
    let renders: Vec<_> = (0..8)
        .map(|_| {
            let (port, path) = (agent.port, path.clone());
            std::thread::spawn(move || request(port, &path, "", Duration::from_secs(60)))
        })
        .collect();
    let mut slowest = Duration::ZERO;
    let until = Instant::now() + Duration::from_secs(2);
    while Instant::now() < until {
        let t = Instant::now();
        let status = request(agent.port, "/healthz", "", Duration::from_secs(5)).map(|r| r.0);
        assert_eq!(status, Some(200));
        slowest = slowest.max(t.elapsed());
    }
    let (mut ok, mut busy) = (0, 0);
    for r in renders {
        let (status, text) = r.join().expect("render thread").expect("render answered");
        match status {
            200 => ok += 1,
            429 => {
                assert!(
                    text.to_ascii_lowercase().contains("retry-after: 1"),
                    "{text}"
                );
                busy += 1;
            }
            s => panic!("render answered {s}: {text}"),
        }
    }
    let _ = writeln!(
        std::io::stderr(),
        "8 window renders: {ok} × 200, {busy} × 429; slowest /healthz {slowest:?} \
         (alone: {alone:?})"
    );
    assert!(ok >= 1 && busy >= 1, "{ok} rendered, {busy} refused");
    assert!(slowest < Duration::from_millis(100), "{slowest:?}");
}

#[test]
#[ignore = "needs root"]
fn captures_need_the_capture_permission_and_memory_ones_are_rate_limited() {
    common::require_root!();
    let hash = hash_password("pw");
    let config = format!(
        "http:\n  listen: 127.0.0.1:0\n  basic_auth_users:\n    prom: '{hash}'\n    ops: \
         '{hash}'\n  capture_users: [ops]\ndiscovery:\n  interval_seconds: 1\n  docker:\n    \
         enabled: false\n"
    );
    let nginx = Nginx::start(Lj::Gc64, &[], "", "location / { return 200; }");
    let worker = nginx.worker().expect("worker");
    let listed = format!("\"pid\":{worker}");
    let agent = Agent::start_with(&config, |a| {
        request(
            a.port,
            "/targets",
            &basic("prom", "pw"),
            Duration::from_secs(5),
        )
        .is_some_and(|r| r.1.contains(&listed))
    });
    let get = |user: &str, path: &str| {
        request(
            agent.port,
            path,
            &basic(user, "pw"),
            Duration::from_secs(30),
        )
        .expect("answer")
    };
    let cpu = format!("/flamegraph?pid={worker}&seconds=1&format=collapsed");
    assert_eq!(
        get("prom", &cpu).0,
        403,
        "a scrape credential started a capture"
    );
    // The window (reading) stays open to the scrape credential.
    assert_eq!(
        get(
            "prom",
            &format!("/flamegraph?pid={worker}&format=collapsed")
        )
        .0,
        200
    );
    assert_eq!(get("ops", &cpu).0, 200);
    let alloc = format!("/flamegraph?pid={worker}&seconds=1&mode=alloc&format=collapsed");
    assert_eq!(get("prom", &alloc).0, 403);
    // The first one starts (whatever its outcome on this kernel); the next is refused.
    let _ = get("ops", &alloc);
    let (status, text) = get("ops", &alloc);
    assert_eq!(status, 429, "{text}");
    assert!(
        text.to_ascii_lowercase().contains("retry-after: "),
        "{text}"
    );
}

/// A bcrypt hash of `password` (cost 10) made by the agent binary.
fn hash_password(password: &str) -> String {
    let mut c = Command::new(common::agent())
        .args(["hash-password", "--cost", "10"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("hash-password");
    c.stdin
        .take()
        .expect("stdin")
        .write_all(format!("{password}\n").as_bytes())
        .expect("write");
    let out = c.wait_with_output().expect("hash-password");
    String::from_utf8(out.stdout)
        .expect("utf-8")
        .trim()
        .to_owned()
}
