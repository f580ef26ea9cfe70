//! Helpers of `tests/network.rs`: certificates made with `openssl`, `curl`, raw HTTP/1.1 over a
//! `TcpStream`, reading a metric out of the text format, and the library's server on an
//! ephemeral loopback port ([`Server`]).

#![allow(dead_code, reason = "each helper is used by some of the tests")]

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::TcpStream,
    path::Path,
    process::{Command, Stdio},
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use apisix_agent::{
    config::Config,
    daemon::{Shared, auth::Auth, http},
};

use super::common::{agent, daemon::wait_for, text};

/// Runs `openssl` with `args` in `dir`; panics with its output when it fails.
pub fn openssl(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("run openssl (apt-get install openssl): {e}"));
    assert!(
        out.status.success(),
        "openssl {args:?} failed:\n{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stdout)
}

/// A test CA, server certificates for `localhost` / 127.0.0.1 and a client certificate,
/// all EC P-256, in a temp dir.
pub struct Pki {
    pub dir: tempfile::TempDir,
}

impl Pki {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let me = Self { dir };
        openssl(
            me.path(),
            &[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-keyout",
                "ca.key",
                "-out",
                "ca.crt",
                "-days",
                "2",
                "-subj",
                "/CN=apisix-agent test CA",
            ],
        );
        me.issue("server", "localhost", "serverAuth");
        me.issue("client", "prometheus", "clientAuth");
        me
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn file(&self, name: &str) -> String {
        self.path().join(name).display().to_string()
    }

    /// `NAME.key` and `NAME.crt` signed by the CA, with subject CN and extended key usage
    /// `usage`; server certificates name localhost and 127.0.0.1.
    pub fn issue(&self, name: &str, cn: &str, usage: &str) {
        let ext = format!("{name}.ext");
        let mut lines = format!(
            "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage={usage}\n"
        );
        if usage == "serverAuth" {
            lines.push_str("subjectAltName=DNS:localhost,IP:127.0.0.1\n");
        }
        std::fs::write(self.path().join(&ext), lines).expect("write extensions");
        let (key, csr, crt) = (
            format!("{name}.key"),
            format!("{name}.csr"),
            format!("{name}.crt"),
        );
        openssl(
            self.path(),
            &[
                "req",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-keyout",
                &key,
                "-out",
                &csr,
                "-subj",
                &format!("/CN={cn}"),
            ],
        );
        openssl(
            self.path(),
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                &crt,
                "-days",
                "2",
                "-extfile",
                &ext,
            ],
        );
    }

    /// SHA-256 fingerprint of a certificate file.
    pub fn fingerprint(&self, crt: &str) -> String {
        openssl(
            self.path(),
            &["x509", "-in", crt, "-noout", "-fingerprint", "-sha256"],
        )
        .trim()
        .to_owned()
    }
}

/// The bcrypt hash of `password` by `apisix-agent hash-password` (cost 4: fast tests).
pub fn hash_password(password: &str) -> String {
    let mut child = Command::new(agent())
        .args(["hash-password", "--cost", "4"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("run apisix-agent hash-password");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(format!("{password}\n").as_bytes())
        .expect("write the password");
    let out = child.wait_with_output().expect("hash-password");
    assert!(out.status.success(), "hash-password failed");
    let hash = text(&out.stdout).trim().to_owned();
    assert!(hash.starts_with("$2b$04$") && hash.len() == 60, "{hash}");
    hash
}

/// One curl run: exit code, HTTP status (0 without an answer), headers, body.
#[derive(Debug)]
pub struct Curl {
    pub exit: i32,
    pub status: u16,
    pub headers: String,
    pub body: String,
    pub stderr: String,
}

pub fn curl(args: &[&str]) -> Curl {
    let dir = tempfile::tempdir().expect("tempdir");
    let headers = dir.path().join("headers");
    let body = dir.path().join("body");
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "10", "-w", "%{http_code}", "-D"])
        .arg(&headers)
        .arg("-o")
        .arg(&body)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("run curl (apt-get install curl): {e}"));
    Curl {
        exit: out.status.code().unwrap_or(-1),
        status: text(&out.stdout).trim().parse().unwrap_or(0),
        headers: std::fs::read_to_string(&headers).unwrap_or_default(),
        body: std::fs::read_to_string(&body).unwrap_or_default(),
        stderr: text(&out.stderr),
    }
}

/// The value of the series of `name` whose labels contain `labels` (e.g.
/// `reason="wrong_password"`) in Prometheus text, 0 when absent.
pub fn value(metrics: &str, name: &str, labels: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(name) && l.contains(labels))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Open file descriptors of `pid`.
pub fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/fd: {e}"))
        .count()
}

/// Raises this process's open-file limit so it can hold the slow clients.
pub fn raise_own_fd_limit(want: u64) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls on a struct we own.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut lim);
        if lim.rlim_cur < want {
            lim.rlim_cur = want.min(lim.rlim_max.max(want));
            lim.rlim_max = lim.rlim_max.max(want);
            assert_eq!(
                libc::setrlimit(libc::RLIMIT_NOFILE, &raw const lim),
                0,
                "raise RLIMIT_NOFILE to {want}"
            );
        }
    }
}

/// One HTTP/1.1 response read from `s`: (status, head, body), by Content-Length.
pub fn read_response(s: &mut TcpStream) -> (u16, String, String) {
    let mut reader = BufReader::new(s);
    let mut head = String::new();
    loop {
        let mut line = String::new();
        let n = reader.read_line(&mut line).expect("read a response line");
        assert!(n > 0, "connection closed in the response head: {head:?}");
        head.push_str(&line);
        if line == "\r\n" {
            break;
        }
    }
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status line: {head:?}"));
    let len: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    reader.read_exact(&mut body).expect("read the body");
    (status, head, text(&body))
}

/// Whether the server closed `s` within `within` (a read returns end of file).
pub fn closed_by_server(s: &mut TcpStream, within: Duration) -> bool {
    s.set_read_timeout(Some(within)).expect("read timeout");
    let mut buf = [0u8; 256];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(_) => return false,
        }
    }
}

/// A request on a fresh connection, `Connection: close`: (status, head, body).
pub fn request(port: u16, path: &str, headers: &[(&str, &str)]) -> (u16, String, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut req = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).expect("send");
    read_response(&mut s)
}

/// The library's HTTP server (no BPF, no discovery) on an ephemeral loopback port.
pub struct Server {
    pub shared: Arc<Shared>,
    pub port: u16,
    pub runtime: Option<tokio::runtime::Runtime>,
}

impl Server {
    pub fn start(yaml: &str) -> Self {
        let config = Config::parse(yaml, "test.yaml").unwrap_or_else(|e| panic!("{e}"));
        let shared = Arc::new(Shared::new(config));
        // Healthy as the real daemon once its sampler is attached.
        shared.attached.store(true, Ordering::SeqCst);
        let auth = Auth::load(&shared.config.http, shared.metrics.clone())
            .unwrap_or_else(|e| panic!("{e}"));
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .expect("bind");
        let port = listener.local_addr().expect("address").port();
        let stop = shared.clone();
        runtime.spawn(http::serve(
            listener,
            shared.clone(),
            None,
            auth,
            async move {
                while !stop.stop.load(Ordering::Relaxed) {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            },
        ));
        Self {
            shared,
            port,
            runtime: Some(runtime),
        }
    }

    pub fn metrics(&self) -> String {
        apisix_agent::daemon::metrics::to_prometheus_text(
            &self.shared.metrics.encode().expect("encode metrics"),
        )
    }

    /// Whether `apisix_profiler_http_connection_errors_total{reason}` reaches `at_least`
    /// within 3 s (a connection is counted just after it closed).
    pub fn counted(&self, reason: &str, at_least: f64) -> bool {
        let labels = format!("reason=\"{reason}\"");
        wait_for(3, || {
            let v = value(
                &self.metrics(),
                "apisix_profiler_http_connection_errors_total",
                &labels,
            );
            (v >= at_least).then_some(())
        })
        .is_some()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_timeout(Duration::from_secs(2));
        }
    }
}
