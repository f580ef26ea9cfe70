//! The agent daemon for tests: started from a config listening on port 0 (the kernel picks
//! a free one, the agent logs it), queried over HTTP, stopped with SIGTERM.

use std::{
    io::{Read as _, Write as _},
    net::TcpStream,
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use super::agent;

/// One HTTP/1.0 request on loopback: (status, body).
pub fn http(port: u16, path: &str) -> (u16, String) {
    let r = http_raw(port, path);
    (r.status, String::from_utf8_lossy(&r.body).into_owned())
}

/// A response as bytes, with its headers (names in lower case).
pub struct RawResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl RawResponse {
    /// The value of header `name` (lower case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// One HTTP/1.0 request on loopback, the body kept as bytes (a gzip-compressed profile).
pub fn http_raw(port: u16, path: &str) -> RawResponse {
    let mut s = TcpStream::connect(("127.0.0.1", port))
        .unwrap_or_else(|e| panic!("connect to the agent on {port}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(60)))
        .expect("timeout");
    write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").expect("write request");
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).expect("read response");
    let split = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no header end in the response to {path}"));
    let head = String::from_utf8_lossy(&buf[..split]).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad response to {path}: {head}"));
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    RawResponse {
        status,
        headers,
        body: buf[split + 4..].to_vec(),
    }
}

/// The agent daemon, stopped with SIGTERM on drop.
pub struct Agent {
    child: Option<Child>,
    pub port: u16,
    log: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Agent {
    pub fn start(extra_config: &str) -> Self {
        let config = format!(
            "http:\n  listen: 127.0.0.1:0\ndiscovery:\n  interval_seconds: 1\n{extra_config}"
        );
        Self::start_with(&config, |agent| agent.get("/healthz").0 == 200)
    }

    /// Starts the agent with the whole configuration `config` (which should listen on
    /// 127.0.0.1:0) and waits until it logged its port and `ready` holds.
    pub fn start_with(config: &str, ready: impl Fn(&Self) -> bool) -> Self {
        Self::start_as(config, None, ready)
    }

    /// [`Self::start_with`] as user `uid` (`None`: as the test).
    pub fn start_as(config: &str, uid: Option<u32>, ready: impl Fn(&Self) -> bool) -> Self {
        Self::launch(config, uid, &[], ready)
    }

    /// [`Self::start_with`] with the environment variables `env` set for the agent.
    #[allow(
        dead_code,
        reason = "each test binary compiles its own copy of common/"
    )]
    pub fn start_with_env(
        config: &str,
        env: &[(&str, &str)],
        ready: impl Fn(&Self) -> bool,
    ) -> Self {
        Self::launch(config, None, env, ready)
    }

    fn launch(
        config: &str,
        uid: Option<u32>,
        env: &[(&str, &str)],
        ready: impl Fn(&Self) -> bool,
    ) -> Self {
        use std::os::unix::{fs::PermissionsExt as _, process::CommandExt as _};
        let dir = tempfile::tempdir().expect("tempdir");
        let config_path = dir.path().join("config.yaml");
        std::fs::write(&config_path, config).expect("write config");
        if uid.is_some() {
            for (path, mode) in [(dir.path(), 0o755), (config_path.as_path(), 0o644)] {
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
                    .expect("chmod");
            }
        }
        let log = dir.path().join("agent.log");
        let mut cmd = Command::new(agent());
        if let Some(uid) = uid {
            cmd.uid(uid).gid(uid);
        }
        let child = cmd
            .args(["run", "--config"])
            .arg(&config_path)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("start the agent");
        let mut me = Self {
            child: Some(child),
            port: 0,
            log,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if me.port == 0 {
                me.port = bound_port(&me.log()).unwrap_or(0);
            }
            if me.port != 0 && TcpStream::connect(("127.0.0.1", me.port)).is_ok() && ready(&me) {
                return me;
            }
            if let Some(Ok(Some(status))) = me.child.as_mut().map(Child::try_wait) {
                panic!("the agent exited ({status}):\n{}", me.log());
            }
            thread::sleep(Duration::from_millis(100));
        }
        panic!("the agent did not become healthy:\n{}", me.log());
    }

    /// The agent's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running agent").id()
    }

    pub fn get(&self, path: &str) -> (u16, String) {
        http(self.port, path)
    }

    /// [`http_raw`] to this agent.
    pub fn get_raw(&self, path: &str) -> RawResponse {
        http_raw(self.port, path)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM, then the exit status.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let child = self.child.as_mut().expect("running agent");
        // SAFETY: plain syscall.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                return status;
            }
            thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "the agent did not stop within 10 s of SIGTERM:\n{}",
            self.log()
        );
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Polls `f` until it returns `Some` or `secs` pass.
pub fn wait_for<T>(secs: u64, mut f: impl FnMut() -> Option<T>) -> Option<(T, Duration)> {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(secs) {
        if let Some(v) = f() {
            return Some((v, start.elapsed()));
        }
        thread::sleep(Duration::from_millis(250));
    }
    None
}

pub fn series(metrics: &str, name: &str, needles: &[&str]) -> Option<u64> {
    metrics
        .lines()
        .filter(|l| l.starts_with(name) && needles.iter().all(|n| l.contains(n)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .max()
}

/// The largest value of the series of `name` whose line contains every needle, as f64.
pub fn series_f64(metrics: &str, name: &str, needles: &[&str]) -> Option<f64> {
    metrics
        .lines()
        .filter(|l| l.starts_with(name) && needles.iter().all(|n| l.contains(n)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .reduce(f64::max)
}

/// The port of the agent's `serving … listen=127.0.0.1:PORT` log line.
fn bound_port(log: &str) -> Option<u16> {
    log.lines()
        .find(|l| l.contains("serving /metrics"))?
        .split_whitespace()
        .find_map(|w| w.strip_prefix("listen="))?
        .rsplit(':')
        .next()?
        .parse()
        .ok()
}
