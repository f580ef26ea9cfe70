//! Helpers of the root tests: real processes (a C program, Debian's nginx + ngx_lua with
//! GC64 or non-GC64 LuaJIT), bounded loopback load, and the real agent binary.
//! Everything panics with context when its real part cannot run.
#![allow(dead_code, reason = "each test binary uses a different subset")]

pub mod container;
pub mod daemon;
pub mod prometheus;

use std::{
    collections::BTreeMap,
    io::{Read as _, Write as _},
    net::{TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("repository root")
        .to_path_buf()
}

/// A process's output as text.
pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The agent binary built by cargo for this test run.
pub fn agent() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_apisix-agent"))
}

/// Whether the tests run as root (effective uid 0).
pub fn is_root() -> bool {
    // SAFETY: no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Fails the current test, loudly, when it runs without root: a root test is marked
/// `#[ignore = "needs root"]`, so that a normal user's `cargo test` reports it ignored, and
/// runs only when asked for (`--include-ignored` or `--ignored`, as `scripts/test.sh` does as
/// root). Asked for without root, it fails here rather than half-way or, worse, passing.
pub fn assert_root() {
    let name = thread::current().name().unwrap_or("test").to_owned();
    assert!(
        is_root(),
        "{name}: needs root (loads BPF programs): run it as root (scripts/test.sh), or leave \
         out --include-ignored / --ignored to skip it"
    );
}

/// Waits until `cond` holds, checking every 10 ms, for at most `deadline`: whether it held.
/// The way to wait for something to happen; a fixed sleep is a guess at how long it takes.
pub fn wait_until(deadline: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    loop {
        if cond() {
            return true;
        }
        if start.elapsed() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// Waits until `load` has served `n` requests (so it runs, and the code it drives is warm),
/// for at most 20 s; panics saying so when it has not.
pub fn wait_for_requests(load: &Load, n: u64) {
    let served = wait_until(Duration::from_secs(20), || {
        load.requests.load(Ordering::Relaxed) >= n
    });
    assert!(
        served,
        "the load served {} of {n} requests in 20 s",
        load.requests.load(Ordering::Relaxed)
    );
}

/// First line of a root test (marked `#[ignore = "needs root"]`): [`assert_root`].
macro_rules! require_root {
    () => {
        $crate::common::assert_root();
    };
}
pub(crate) use require_root;

/// Output of one `record` run.
#[derive(Debug)]
pub struct Recorded {
    pub status: std::process::ExitStatus,
    pub stderr: String,
    /// The run's counts, as `record --summary` wrote them (`Null` when it wrote none).
    pub summary: serde_json::Value,
    /// Folded stacks: stack → count.
    pub stacks: BTreeMap<String, u64>,
}

impl Recorded {
    /// The summary's counter at `path` (e.g. `["lua", "walked"]`); panics when it is missing.
    pub fn counter(&self, path: &[&str]) -> u64 {
        let mut v = &self.summary;
        for key in path {
            v = &v[*key];
        }
        v.as_u64()
            .unwrap_or_else(|| panic!("no {path:?} in the summary: {}", self.summary))
    }

    pub fn total(&self) -> u64 {
        self.stacks.values().sum()
    }

    /// Sum of counts of stacks for which `f` holds.
    pub fn count(&self, f: impl Fn(&[&str]) -> bool) -> u64 {
        self.stacks
            .iter()
            .filter(|(s, _)| f(&s.split(';').collect::<Vec<_>>()))
            .map(|(_, n)| *n)
            .sum()
    }

    /// A readable excerpt for assertion messages.
    pub fn dump(&self) -> String {
        let mut v: Vec<_> = self.stacks.iter().collect();
        v.sort_by(|a, b| b.1.cmp(a.1));
        let top: Vec<String> = v
            .iter()
            .take(12)
            .map(|(s, n)| format!("{n:>6} {s}"))
            .collect();
        format!(
            "stderr:\n{}\nsummary: {}\ntop stacks:\n{}",
            self.stderr,
            self.summary,
            top.join("\n")
        )
    }
}

/// Whether `needles` occur in `frames` in this order (not necessarily adjacent).
pub fn in_order(frames: &[&str], needles: &[&str]) -> bool {
    let mut it = frames.iter();
    needles.iter().all(|n| it.any(|f| f == n))
}

/// Parses folded text.
pub fn parse_folded(text: &str) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let (stack, n) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("bad folded line: {line:?}"));
        let n: u64 = n
            .parse()
            .unwrap_or_else(|_| panic!("bad count in {line:?}"));
        *out.entry(stack.to_owned()).or_insert(0) += n;
    }
    out
}

/// Sampling rate of the tests' recordings (`record`'s default is 99 Hz): five times the
/// samples keep the statistical error of a share under a point in an 8 s recording, and
/// leave enough samples when other work on the machine takes the target's CPU.
pub const TEST_HZ: &str = "499";

/// Runs `apisix-agent record --pid PID --format collapsed` at [`TEST_HZ`] (unless `extra`
/// sets `--frequency`, or a mode other than CPU, where a frequency is refused) with extra
/// arguments.
pub fn record(pid: u32, secs: u64, extra: &[&str]) -> Recorded {
    record_env(pid, secs, extra, &[])
}

/// [`record`] with extra environment variables for the agent.
pub fn record_env(pid: u32, secs: u64, extra: &[&str], env: &[(&str, &str)]) -> Recorded {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("out.folded");
    let summary = dir.path().join("summary.json");
    let cpu = extra.windows(2).all(|w| w[0] != "--mode" || w[1] == "cpu");
    let frequency: &[&str] = if extra.contains(&"--frequency") || !cpu {
        &[]
    } else {
        &["--frequency", TEST_HZ]
    };
    let output = Command::new(agent())
        .args(["record", "--pid", &pid.to_string()])
        .args(["--duration", &secs.to_string(), "--format", "collapsed"])
        .args(frequency)
        .arg("--output")
        .arg(&out)
        .arg("--summary")
        .arg(&summary)
        .args(extra)
        .envs(env.iter().copied())
        .output()
        .expect("run apisix-agent");
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    let stacks = std::fs::read_to_string(&out)
        .map(|t| parse_folded(&t))
        .unwrap_or_default();
    let summary = match std::fs::read_to_string(&summary) {
        Ok(text) => serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("record --summary wrote bad JSON ({e}): {text}")),
        Err(_) => serde_json::Value::Null,
    };
    Recorded {
        status: output.status,
        stderr,
        summary,
        stacks,
    }
}

/// A free loopback port.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind a loopback port")
        .port()
}

/// Directory of the non-GC64 LuaJIT build (scripts/build-luajit-nogc64.sh).
pub fn nogc64_dir() -> PathBuf {
    let dir = PathBuf::from(
        std::env::var("LUAJIT_NOGC64_DIR")
            .unwrap_or_else(|_| "/var/cache/apisix-profiler/luajit-nogc64".into()),
    );
    assert!(
        dir.join("lib/libluajit-5.1.so.2").exists(),
        "non-GC64 LuaJIT missing in {}: run scripts/build-luajit-nogc64.sh",
        dir.display()
    );
    dir
}

/// Which LuaJIT an nginx instance runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lj {
    /// Debian's libluajit2 (GC64).
    Gc64,
    /// The non-GC64 build, through LD_LIBRARY_PATH.
    Gc32,
}

/// A private nginx + ngx_lua instance on a loopback port with one worker.
pub struct Nginx {
    pub port: u16,
    pub prefix: tempfile::TempDir,
    master: Child,
}

impl Nginx {
    /// Starts nginx with Lua modules `lua` (name → source; a name may contain `/`) and the
    /// `server` block body.
    /// `http_extra` goes into the http block (e.g. `init_by_lua_block`).
    pub fn start(lj: Lj, lua: &[(&str, &str)], http_extra: &str, server: &str) -> Self {
        Self::start_as(lj, "nginx", lua, http_extra, server)
    }

    /// Like [`Self::start`], with nginx run through a symlink called `name`: its processes'
    /// command name (`/proc/PID/comm`, the agent's `process` label) is `name`.
    pub fn start_as(
        lj: Lj,
        name: &str,
        lua: &[(&str, &str)],
        http_extra: &str,
        server: &str,
    ) -> Self {
        // nginx cannot listen on port 0 and say which port it got: a free port is picked
        // and, when another process took it meanwhile, the start is retried on a new one.
        let mut attempt = 1;
        loop {
            match Self::try_start(lj, name, lua, http_extra, server) {
                Ok(nginx) => return nginx,
                Err(log) if attempt < 3 && log.contains("Address already in use") => {
                    attempt += 1;
                }
                Err(log) => panic!("nginx did not come up:\n{log}"),
            }
        }
    }

    /// One start on a free port; the error log when nginx does not come up.
    fn try_start(
        lj: Lj,
        name: &str,
        lua: &[(&str, &str)],
        http_extra: &str,
        server: &str,
    ) -> Result<Self, String> {
        let prefix = tempfile::tempdir().expect("nginx prefix");
        let p = prefix.path().to_path_buf();
        let p = p.as_path();
        for d in ["logs", "tmp", "lua", "conf"] {
            std::fs::create_dir_all(p.join(d)).expect("mkdir");
        }
        // The workers run unprivileged and read the Lua files.
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        for (name, src) in lua {
            // `apisix/plugins/key-auth` goes to lua/apisix/plugins/key-auth.lua.
            let file = p.join("lua").join(format!("{name}.lua"));
            if let Some(dir) = file.parent() {
                std::fs::create_dir_all(dir).expect("mkdir lua subdirectory");
            }
            std::fs::write(file, src).expect("write lua");
        }
        let port = free_port();
        let pd = p.display();
        let conf = format!(
            r#"
load_module /usr/lib/nginx/modules/ndk_http_module.so;
load_module /usr/lib/nginx/modules/ngx_http_lua_module.so;
worker_processes 1;
master_process on;
daemon off;
error_log {pd}/logs/error.log warn;
pid {pd}/logs/nginx.pid;
events {{ worker_connections 512; }}
http {{
  access_log off;
  lua_package_path "{pd}/lua/?.lua;;";
  client_body_temp_path {pd}/tmp; proxy_temp_path {pd}/tmp; fastcgi_temp_path {pd}/tmp;
  uwsgi_temp_path {pd}/tmp; scgi_temp_path {pd}/tmp;
  {http_extra}
  server {{
    listen 127.0.0.1:{port};
    {server}
  }}
}}
"#
        );
        std::fs::write(p.join("conf/nginx.conf"), conf).expect("write nginx.conf");
        let program = if name == "nginx" {
            PathBuf::from("nginx")
        } else {
            let link = p.join(name);
            std::os::unix::fs::symlink("/usr/sbin/nginx", &link).expect("symlink nginx");
            link
        };
        let mut cmd = Command::new(program);
        cmd.arg("-p")
            .arg(p)
            .args(["-c", "conf/nginx.conf"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if lj == Lj::Gc32 {
            cmd.env("LD_LIBRARY_PATH", nogc64_dir().join("lib"));
        }
        let master = cmd
            .spawn()
            .expect("start nginx (apt-get install nginx libnginx-mod-http-lua)");
        let mut me = Self {
            port,
            prefix,
            master,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if TcpStream::connect(("127.0.0.1", port)).is_ok() && me.worker().is_some() {
                return Ok(me);
            }
            if me.master.try_wait().is_ok_and(|s| s.is_some()) {
                break;
            }
            thread::sleep(Duration::from_millis(50));
        }
        let log = std::fs::read_to_string(p.join("logs/error.log")).unwrap_or_default();
        Err(format!("port {port}:\n{log}"))
    }

    pub fn master_pid(&self) -> u32 {
        self.master.id()
    }

    /// The worker's pid.
    pub fn worker(&self) -> Option<u32> {
        let pid = self.master.id();
        let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).ok()?;
        children.split_whitespace().next()?.parse().ok()
    }

    /// Which libluajit the worker mapped.
    pub fn luajit_path(&self) -> String {
        let w = self.worker().expect("worker");
        let maps = std::fs::read_to_string(format!("/proc/{w}/maps")).expect("maps");
        maps.lines()
            .find(|l| l.contains("libluajit"))
            .and_then(|l| l.split_whitespace().last())
            .unwrap_or("")
            .to_owned()
    }

    /// One GET request; returns the body.
    pub fn get(&self, path: &str) -> String {
        get(self.port, path).unwrap_or_else(|e| panic!("GET {path}: {e}"))
    }

    pub fn error_log(&self) -> String {
        std::fs::read_to_string(self.prefix.path().join("logs/error.log")).unwrap_or_default()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.master.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.master.try_wait() {
                return;
            }
            thread::sleep(Duration::from_millis(20));
        }
        let _ = self.master.kill();
        let _ = self.master.wait();
    }
}

/// A plain HTTP/1.0 GET on loopback.
pub fn get(port: u16, path: &str) -> std::io::Result<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
    let mut buf = String::new();
    s.read_to_string(&mut buf)?;
    let body = buf.split_once("\r\n\r\n").map(|x| x.1).unwrap_or("");
    if !buf.starts_with("HTTP/1.1 200") {
        return Err(std::io::Error::other(format!("status: {buf}")));
    }
    Ok(body.to_owned())
}

/// Bounded loopback load: `clients` threads issue GETs of `path` until `duration` passes.
pub struct Load {
    stop: Arc<AtomicBool>,
    pub requests: Arc<AtomicU64>,
    threads: Vec<thread::JoinHandle<()>>,
}

impl Load {
    pub fn start(port: u16, path: &str, clients: usize, duration: Duration) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let requests = Arc::new(AtomicU64::new(0));
        let deadline = Instant::now() + duration;
        let threads = (0..clients)
            .map(|_| {
                let stop = stop.clone();
                let requests = requests.clone();
                let path = path.to_owned();
                thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                        if get(port, &path).is_ok() {
                            requests.fetch_add(1, Ordering::Relaxed);
                        } else {
                            thread::sleep(Duration::from_millis(10));
                        }
                    }
                })
            })
            .collect();
        Self {
            stop,
            requests,
            threads,
        }
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Compiles a C program with gcc.
pub fn compile_c(dir: &Path, name: &str, src: &str, flags: &[&str]) -> PathBuf {
    let c = dir.join(format!("{name}.c"));
    std::fs::write(&c, src).expect("write C source");
    let bin = dir.join(name);
    let st = Command::new("gcc")
        .args(flags)
        .arg("-o")
        .arg(&bin)
        .arg(&c)
        .status()
        .expect("run gcc (apt-get install build-essential)");
    assert!(st.success(), "gcc failed for {name}");
    bin
}

/// Compares measured shares with expected ones: `measured(name)` is a function's share of
/// the total. Returns one `NAME: measured X% expected Y%` line per function and the largest
/// difference.
pub fn share_report<'a>(
    expected: impl IntoIterator<Item = (&'a str, f64)>,
    measured: impl Fn(&str) -> f64,
) -> (String, f64) {
    let mut report = String::new();
    let mut worst = 0.0f64;
    for (name, want) in expected {
        let got = measured(name);
        worst = worst.max((got - want).abs());
        report.push_str(&format!(
            "{name}: measured {:.1}% expected {:.1}%\n",
            got * 100.0,
            want * 100.0
        ));
    }
    (report, worst)
}

/// SIGTERM, up to `grace` to exit, then SIGKILL.
pub fn terminate(child: &mut Child, grace: Duration) {
    if let Ok(Some(_)) = child.try_wait() {
        return;
    }
    // SAFETY: plain syscall on our own child's pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
}
