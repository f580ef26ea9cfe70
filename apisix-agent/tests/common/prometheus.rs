//! Debian's Prometheus for tests: started on a free loopback port with a given configuration
//! and its storage in a temporary directory, queried through its HTTP API, stopped on drop.
//! A port taken by another process between the pick and the bind is retried on a new one.

use std::{
    net::TcpStream,
    process::{Child, Command, Stdio},
    time::Duration,
};

use super::{daemon::http, daemon::wait_for, free_port, terminate};

/// A running Prometheus.
pub struct Prometheus {
    child: Child,
    pub port: u16,
    dir: tempfile::TempDir,
}

impl Prometheus {
    /// Starts `prometheus` with `config` (a `prometheus.yml`) and waits until it is ready.
    pub fn start(config: &str) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("prometheus.yml");
        std::fs::write(&path, config).expect("write prometheus.yml");
        let log_path = dir.path().join("prometheus.log");
        for _attempt in 0..3 {
            let port = free_port();
            let log = std::fs::File::create(&log_path).expect("log file");
            let child = Command::new("prometheus")
                .arg(format!("--config.file={}", path.display()))
                .arg(format!(
                    "--storage.tsdb.path={}",
                    dir.path().join("data").display()
                ))
                .arg(format!("--web.listen-address=127.0.0.1:{port}"))
                .arg("--log.level=warn")
                .stdin(Stdio::null())
                .stdout(log.try_clone().expect("log file"))
                .stderr(log)
                .spawn()
                .unwrap_or_else(|e| {
                    panic!("start prometheus (Debian's prometheus, scripts/setup-test.sh): {e}")
                });
            let mut child = Some(child);
            let ready = wait_for(20, || {
                if let Some(Ok(Some(status))) = child.as_mut().map(Child::try_wait) {
                    return Some(Err(status));
                }
                (TcpStream::connect(("127.0.0.1", port)).is_ok() && http(port, "/-/ready").0 == 200)
                    .then_some(Ok(()))
            });
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            match ready {
                Some((Ok(()), _)) => {
                    return Self {
                        child: child.take().expect("child"),
                        port,
                        dir,
                    };
                }
                Some((Err(_), _)) if log.contains("address already in use") => continue,
                Some((Err(status), _)) => panic!("prometheus exited ({status}):\n{log}"),
                None => {
                    if let Some(mut c) = child.take() {
                        terminate(&mut c, Duration::from_secs(5));
                    }
                    panic!("prometheus did not become ready within 20 s:\n{log}");
                }
            }
        }
        panic!("prometheus found no free port in 3 attempts");
    }

    /// What it logged.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default()
    }

    /// Its base URL.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// GET an API path; the `data` member of a successful answer.
    pub fn api(&self, path: &str) -> serde_json::Value {
        let (status, body) = http(self.port, path);
        let v: serde_json::Value = serde_json::from_str(&body)
            .unwrap_or_else(|e| panic!("GET {path}: {status}, not JSON ({e}): {body}"));
        assert!(
            status == 200 && v["status"] == "success",
            "GET {path}: {status} {body}"
        );
        v["data"].clone()
    }

    /// Instant query; the result vector.
    pub fn query(&self, expr: &str) -> Vec<serde_json::Value> {
        let data = self.api(&format!("/api/v1/query?query={}", urlencode(expr)));
        data["result"].as_array().cloned().unwrap_or_default()
    }

    /// (job, health, lastError) of each active target.
    pub fn targets(&self) -> Vec<(String, String, String)> {
        let data = self.api("/api/v1/targets");
        data["activeTargets"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .map(|t| {
                (
                    t["labels"]["job"].as_str().unwrap_or("").to_owned(),
                    t["health"].as_str().unwrap_or("").to_owned(),
                    t["lastError"].as_str().unwrap_or("").to_owned(),
                )
            })
            .collect()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        terminate(&mut self.child, Duration::from_secs(10));
    }
}

/// Minimal percent-encoding of a URL query value.
pub fn urlencode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}
