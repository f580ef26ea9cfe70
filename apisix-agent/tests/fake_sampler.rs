//! Root-free tests of the daemon's sampler thread, aggregation and HTTP router, fed by a
//! [`ReplaySource`] instead of the BPF programs. The target is this test process itself:
//! its `/proc/self` files are readable without privilege, so stacks are built, symbolized
//! and aggregated for real; only the samples are constructed. The same paths with real BPF
//! samples are covered by the root tests (`tests/daemon.rs`).

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    sync::{Arc, atomic::Ordering, mpsc},
    thread,
    time::{Duration, Instant},
};

use apisix_agent::{
    config::Config,
    daemon::{Shared, continuous, http},
    discovery::{Labels, Lua, Snapshot, TargetProcess},
    luajit::{Flavour, LuaTarget, ffnames},
    sampling::source::{ReplaySource, blank_sample},
};
use apisix_ebpf_common::{LuaFrame, LuaFrameKind};

/// A function of this binary a constructed sample is "in".
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn fake_sampler_leaf() -> u64 {
    std::hint::black_box(7)
}

fn flavour() -> Flavour {
    Flavour {
        gc64: true,
        openresty: true,
        version: Flavour::KNOWN_VERSIONS[0].to_owned(),
    }
}

/// The fast-function id LuaJIT gives `string.rep` in this flavour.
fn string_rep_ffid() -> u8 {
    (0..=u8::MAX)
        .find(|id| ffnames::name(&flavour(), *id).as_deref() == Some("string.rep"))
        .expect("string.rep has a fast-function id")
}

/// This process as a profiled target with a (made-up) LuaJIT.
fn me() -> TargetProcess {
    TargetProcess {
        pid: std::process::id(),
        // As discovery saw it: requests check it against the process's start time.
        start_time: apisix_agent::discovery::procfs::start_time(std::process::id())
            .expect("own start time"),
        labels: Labels {
            process: "fake-worker".to_owned(),
            ..Labels::default()
        },
        lua: Lua::Known(LuaTarget {
            flavour: flavour(),
            library: "/usr/lib/libluajit-5.1.so.2".to_owned(),
            vm_range: 0..0,
        }),
    }
}

/// A daemon without BPF: the sampler thread over a replay source and the HTTP server on an
/// ephemeral loopback port.
struct FakeDaemon {
    shared: Arc<Shared>,
    source: ReplaySource,
    snapshots: mpsc::Sender<Snapshot>,
    addr: SocketAddr,
    sampler: Option<thread::JoinHandle<()>>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl FakeDaemon {
    fn start() -> Self {
        let config = Config::load(None).expect("default configuration");
        let shared = Arc::new(Shared::new(config));
        let source = ReplaySource::new();
        let (snapshots, rx) = mpsc::channel::<Snapshot>();
        let sampler = {
            let shared = shared.clone();
            let source = source.clone();
            thread::spawn(move || continuous::run_with(&shared, &rx, source, None))
        };
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .expect("bind an ephemeral loopback port");
        let addr = listener.local_addr().expect("bound address");
        let stop = shared.clone();
        runtime.spawn(http::serve(
            listener,
            shared.clone(),
            None,
            None,
            async move {
                while !stop.stop.load(Ordering::Relaxed) {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        ));
        Self {
            shared,
            source,
            snapshots,
            addr,
            sampler: Some(sampler),
            runtime: Some(runtime),
        }
    }

    /// Publishes `targets` as discovery would, and waits until the sampler applied them.
    fn discover(&self, targets: Vec<TargetProcess>) {
        let snap: Snapshot = Arc::new(targets);
        *self.shared.targets.write().expect("targets lock") = snap.clone();
        let want: Vec<u32> = snap.iter().map(|t| t.pid).collect();
        self.snapshots.send(snap).expect("sampler thread alive");
        wait_for("the sampler to add the targets", || {
            self.source.targets() == want
        });
    }

    fn get(&self, path: &str) -> (u16, String) {
        let mut s = TcpStream::connect(self.addr).expect("connect to the fake daemon");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("read timeout");
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
        )
        .expect("send request");
        let mut text = String::new();
        s.read_to_string(&mut text).expect("read response");
        let status = text
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or_else(|| panic!("no status line: {text}"));
        let body = text
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default();
        (status, body)
    }
}

impl Drop for FakeDaemon {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.sampler.take() {
            let _ = t.join();
        }
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_timeout(Duration::from_secs(2));
        }
    }
}

fn wait_for(what: &str, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(20));
    }
}

/// A sample of this process in `fake_sampler_leaf`, inside `string.rep` called from Lua.
fn lua_sample() -> Box<apisix_ebpf_common::Sample> {
    let mut s = blank_sample(
        std::process::id(),
        fake_sampler_leaf as *const () as usize as u64,
    );
    s.lua[0] = LuaFrame {
        kind: LuaFrameKind::Fast as u8,
        ffid: string_rep_ffid(),
        ..LuaFrame::default()
    };
    s.lua_len = 1;
    s
}

#[test]
fn targets_lists_the_discovered_process() {
    let d = FakeDaemon::start();
    d.discover(vec![me()]);
    let (status, body) = d.get("/targets");
    assert_eq!(status, 200, "{body}");
    let json: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(json[0]["pid"], std::process::id(), "{body}");
    assert_eq!(json[0]["process"], "fake-worker", "{body}");
    assert_eq!(json[0]["flavour"], "gc64", "{body}");
    let (status, _) = d.get("/healthz");
    assert_eq!(status, 200, "the sampler thread marks itself attached");
}

#[test]
fn replayed_samples_become_lua_function_series() {
    let d = FakeDaemon::start();
    d.discover(vec![me()]);
    for _ in 0..25 {
        d.source.push(lua_sample());
    }
    // Counters reach the metrics at the sampler's next one-second tick.
    let mut last = String::new();
    wait_for("the Lua function series", || {
        last = d.get("/metrics").1;
        last.lines().any(|l| {
            l.starts_with("apisix_profiler_lua_function_self_samples_total{")
                && l.contains(r#"function="builtin:string.rep""#)
                && l.ends_with(" 25")
        })
    });
    assert!(
        last.lines()
            .any(|l| l.starts_with("apisix_profiler_samples_total{")
                && l.contains(r#"process="fake-worker""#)
                && l.ends_with(" 25")),
        "{last}"
    );
    // The recent stacks are served at once, without a capture.
    let pid = std::process::id();
    let (status, folded) = d.get(&format!("/flamegraph?pid={pid}&format=collapsed"));
    assert_eq!(status, 200, "{folded}");
    assert!(
        folded
            .lines()
            .any(|l| l.contains("builtin:string.rep") && l.ends_with(" 25")),
        "{folded}"
    );
}

#[test]
fn samples_of_processes_not_targeted_are_dropped() {
    let d = FakeDaemon::start();
    d.discover(vec![me()]);
    let mut stray = lua_sample();
    stray.pid = u32::MAX - 1;
    d.source.push(stray);
    wait_for("the stray sample to be polled", || d.source.pending() == 0);
    d.discover(Vec::new());
    assert!(d.source.targets().is_empty(), "a gone target is removed");
}

#[test]
fn unknown_pid_is_404_and_busy_captures_are_429() {
    let d = FakeDaemon::start();
    d.discover(vec![me()]);
    let (status, body) = d.get("/flamegraph?pid=999999999&seconds=1");
    assert_eq!(status, 404, "{body}");
    assert!(body.contains("not a profiled target"), "{body}");
    // Every capture slot taken: the next capture is refused before it loads anything.
    let slots = d.shared.config.sampling.max_concurrent_captures;
    let held = d
        .shared
        .captures
        .try_acquire_many(u32::try_from(slots).expect("few slots"))
        .expect("free capture slots");
    let pid = std::process::id();
    let (status, body) = d.get(&format!("/flamegraph?pid={pid}&seconds=1"));
    assert_eq!(status, 429, "{body}");
    drop(held);
    let (status, body) = d.get("/nowhere");
    assert_eq!(status, 404, "{body}");
}

#[test]
fn stall_samples_and_loop_counts_reach_the_stall_window_and_metrics() {
    let d = FakeDaemon::start();
    d.discover(vec![me()]);
    let pid = std::process::id();
    // Two samples during a 300 ms iteration (a stall at the default 100 ms), one at 20 ms.
    for age_ms in [150, 250, 20] {
        let mut s = lua_sample();
        s.iteration_ns = age_ms * 1_000_000;
        d.source.push(s);
    }
    let mut buckets = [0; apisix_ebpf_common::LOOP_BUCKETS];
    buckets[0] = 40;
    buckets[6] = 1;
    d.source.set_loop_thread(
        pid,
        apisix_ebpf_common::LoopThread {
            tgid: pid,
            count: 41,
            sum_ns: 40 * 400_000 + 300_000_000,
            stalls: 1,
            last_stall_ns: 300_000_000,
            buckets,
            ..Default::default()
        },
    );
    let mut last = String::new();
    wait_for("the event-loop series", || {
        last = d.get("/metrics").1;
        last.contains(r#"apisix_profiler_event_loop_stalls_total{container="",image=""} 1"#)
    });
    assert!(
        last.contains(
            r#"apisix_profiler_event_loop_iteration_seconds_bucket{le="0.5",container="",image=""} 41"#
        ),
        "{last}"
    );
    // The stall window holds the two stall samples only, each the 19 Hz period in µs.
    let (status, folded) = d.get(&format!(
        "/flamegraph?mode=stalls&pid={pid}&format=collapsed"
    ));
    assert_eq!(status, 200, "{folded}");
    let total: u64 = folded
        .lines()
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<u64>().ok())
        .sum();
    assert_eq!(total, 2 * 52_632, "{folded}");
    // Every target without a selector; other modes still need one.
    let (status, body) = d.get("/flamegraph?mode=stalls&format=json");
    assert_eq!(status, 200, "{body}");
    let (status, body) = d.get("/flamegraph?format=json");
    assert_eq!(status, 400, "{body}");
    // The pprof profile is gzip: only its status line is text.
    let mut c = TcpStream::connect(d.addr).expect("connect");
    write!(
        c,
        "GET /debug/pprof/stalls?seconds=60 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .expect("send");
    let mut raw = Vec::new();
    c.read_to_end(&mut raw).expect("read");
    assert!(
        raw.starts_with(b"HTTP/1.1 200"),
        "{:?}",
        &raw[..raw.len().min(200)]
    );
    // A thread of a process no longer targeted is forgotten.
    d.discover(Vec::new());
    wait_for("the loop to be forgotten", || {
        d.source.loop_tids().is_empty()
    });
}
