//! `cargo bench --bench window_lock`: how long the continuous sampler thread waits on the
//! aggregator while readers (`/flamegraph` without `seconds`, `/debug/pprof/*`) copy a full
//! window of 200 000 samples, before and after the window got its own lock and chunked
//! snapshots, measured in one run.
//!
//! "Before" is the reader as it was: it held the lock for its whole cut of the window (each
//! sample visited under the lock). "After" is the reader as it is: [`Aggregator::snapshot`]
//! copies chunk pointers under the lock, the cut runs with no lock held. The two modes
//! alternate, rounds of a few seconds each, on the same aggregator. The sampler adds a batch
//! of [`BATCH`] samples every millisecond (a busy host at 99 Hz hands over fewer) and records
//! how long each `add_batch` took (lock waits, and any time the scheduler gave its CPU to
//! another thread; the "none" rows, without readers, show that part); the readers record the
//! longest they held the window's lock, the bound on what the sampler can wait for it; two
//! readers (the daemon allows two renders and two pprof
//! encodings at once) cut the whole window again and again at nice 10, as the daemon's
//! renders run.
//!
//! Hooks: none (user space only, no root). Metrics: none; prints a table and the ratio.

#![expect(clippy::print_stdout, reason = "a bench prints its table")]

use std::{
    hint::black_box,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use apisix_agent::{
    attribution::Filter,
    daemon::{
        aggregate::{Aggregator, Arrival, Retention},
        metrics::{Metrics, TargetLabels},
    },
};

/// Samples in the window.
const WINDOW: usize = 200_000;
/// Distinct stacks among them.
const STACKS: usize = 3_000;
/// Samples per batch the sampler hands over.
const BATCH: usize = 20;
/// Readers at once.
const READERS: usize = 2;
/// Length of one round of one mode.
const ROUND: Duration = Duration::from_secs(3);
/// Rounds of each mode.
const ROUNDS: usize = 2;

/// Deterministic stacks shaped like an nginx-lua worker's.
fn stacks() -> Vec<Vec<Arc<str>>> {
    let root: Vec<Arc<str>> = [
        "main",
        "ngx_worker_process_cycle",
        "ngx_http_lua_run_thread",
    ]
    .into_iter()
    .map(Arc::from)
    .collect();
    let mut state: u64 = 0x2545_f491_4f6c_dd1d;
    let mut next = move || {
        state = state
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        state >> 33
    };
    (0..STACKS)
        .map(|_| {
            let depth = 10 + next() % 31;
            let mut s = root.clone();
            for d in 0..depth {
                let label = format!("handler_{}@/app/mod{}.lua:{}", next() % 40, d % 7, 10 + d);
                s.push(Arc::from(label));
            }
            s
        })
        .collect()
}

fn target() -> TargetLabels {
    TargetLabels {
        container: "gw".into(),
        image: "apache/apisix".into(),
        process: "nginx".into(),
    }
}

fn add(agg: &Aggregator, stacks: &[Vec<Arc<str>>], target: &TargetLabels, from: usize, n: usize) {
    let arrivals = (from..from + n).map(|i| Arrival {
        which: Retention::Cpu,
        pid: 1 + (i % 4) as u32,
        target,
        stack: stacks[i % stacks.len()].clone(),
        details: Vec::new(),
        us: 0,
    });
    agg.add_batch(arrivals, |_| None);
}

/// One reader's cut of the whole window: under the lock throughout (`before`), or from a
/// snapshot (the steps of [`Aggregator::snapshot`], timed). Returns the samples cut and how
/// long the window's lock was held.
fn read(agg: &Aggregator, before: bool) -> (u64, Duration) {
    let to = Instant::now();
    let from = to.checked_sub(Duration::from_secs(3600)).unwrap_or(to);
    let keep = |_: u32, _: &str| true;
    let filter = Filter::default();
    let (window, held) = if before {
        let windows = agg.windows();
        let locked = Instant::now();
        let window = windows
            .snapshot(Retention::Cpu)
            .cut(from, to, keep, &filter);
        let held = locked.elapsed();
        drop(windows);
        (window, held)
    } else {
        let windows = agg.windows();
        let locked = Instant::now();
        let snapshot = windows.snapshot(Retention::Cpu);
        drop(windows);
        let held = locked.elapsed();
        let caps = agg.counters().plugin_caps();
        (snapshot.with_caps(caps).cut(from, to, keep, &filter), held)
    };
    (window.stacks.iter().map(|s| s.count).sum(), held)
}

/// What the readers do during a round.
#[derive(Clone, Copy)]
enum Mode {
    /// No reader: the sampler's own cost.
    Alone,
    /// Cut under the lock, as readers did.
    Before,
    /// Snapshot under the lock, cut unlocked.
    After,
}

#[derive(Default)]
struct Round {
    /// Each `add_batch`'s duration, in microseconds.
    waits: Vec<u64>,
    reads: usize,
    read_ms: Vec<f64>,
    /// The longest a reader held the window's lock.
    held: Duration,
}

/// One round of one mode: the sampler's batch durations and the readers' cut times.
fn round(agg: &Arc<Aggregator>, stacks: &Arc<Vec<Vec<Arc<str>>>>, mode: Mode) -> Round {
    let stop = Arc::new(AtomicBool::new(false));
    let (readers, before) = match mode {
        Mode::Alone => (0, false),
        Mode::Before => (READERS, true),
        Mode::After => (READERS, false),
    };
    let readers: Vec<_> = (0..readers)
        .map(|_| {
            let (agg, stop) = (agg.clone(), stop.clone());
            std::thread::spawn(move || {
                // SAFETY: sets the nice value of this thread only.
                unsafe {
                    libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, 10);
                }
                let (mut times, mut longest) = (Vec::new(), Duration::ZERO);
                while !stop.load(Ordering::Relaxed) {
                    let started = Instant::now();
                    // Samples that arrive while it runs are not all in its cut.
                    let (n, held) = read(&agg, before);
                    times.push(started.elapsed().as_secs_f64() * 1e3);
                    longest = longest.max(held);
                    assert!(n as usize > WINDOW / 2, "the window holds {n}");
                }
                (times, longest)
            })
        })
        .collect();
    let target = target();
    let mut out = Round::default();
    let started = Instant::now();
    let mut i = 0;
    while started.elapsed() < ROUND {
        let t = Instant::now();
        add(agg, stacks, &target, i, BATCH);
        out.waits.push(t.elapsed().as_micros() as u64);
        i += BATCH;
        std::thread::sleep(Duration::from_millis(1));
    }
    stop.store(true, Ordering::Relaxed);
    for r in readers {
        let (times, held) = r.join().unwrap_or_default();
        out.reads += times.len();
        out.read_ms.extend(times);
        out.held = out.held.max(held);
    }
    out
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    let i = ((sorted.len().saturating_sub(1)) as f64 * p).round() as usize;
    sorted.get(i).copied().unwrap_or(0)
}

fn main() {
    // `cargo bench` passes `--bench`; nothing to parse.
    let stacks = Arc::new(stacks());
    let metrics = Arc::new(Metrics::new(false));
    let agg = Arc::new(Aggregator::new(
        metrics,
        100,
        Duration::from_secs(3600),
        WINDOW,
    ));
    let target = target();
    for from in (0..WINDOW).step_by(1000) {
        add(&agg, &stacks, &target, from, 1000);
    }
    agg.flush();
    let (mut alone, mut before, mut after) = (Round::default(), Round::default(), Round::default());
    for _ in 0..ROUNDS {
        for (mode, into) in [
            (Mode::Alone, &mut alone),
            (Mode::Before, &mut before),
            (Mode::After, &mut after),
        ] {
            let r = round(&agg, &stacks, mode);
            into.waits.extend(r.waits);
            into.reads += r.reads;
            into.read_ms.extend(r.read_ms);
            into.held = into.held.max(r.held);
        }
    }
    println!(
        "window_lock: {WINDOW} samples ({STACKS} distinct stacks), {READERS} readers, \
         batches of {BATCH} every 1 ms, {ROUNDS} rounds of {}s per mode, alternating",
        ROUND.as_secs()
    );
    println!();
    println!(
        "| Reader | Sampler batches | add_batch p50 (µs) | p99 (µs) | p99.9 (µs) | max (µs) | \
         Reads | Read median (ms) | Longest lock hold by a reader (µs) |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    let mut max = [0u64; 3];
    let mut held = [Duration::ZERO; 3];
    for (k, (name, r)) in [
        ("none (the sampler alone)", &mut alone),
        ("before: cut under the lock", &mut before),
        ("after: snapshot, cut unlocked", &mut after),
    ]
    .into_iter()
    .enumerate()
    {
        r.waits.sort_unstable();
        r.read_ms.sort_by(f64::total_cmp);
        let median = r.read_ms.get(r.read_ms.len() / 2).copied().unwrap_or(0.0);
        max[k] = r.waits.last().copied().unwrap_or(0);
        held[k] = r.held;
        println!(
            "| {name} | {} | {} | {} | {} | {} | {} | {median:.1} | {} |",
            r.waits.len(),
            percentile(&r.waits, 0.5),
            percentile(&r.waits, 0.99),
            percentile(&r.waits, 0.999),
            max[k],
            r.reads,
            r.held.as_micros(),
        );
    }
    println!();
    println!(
        "Longest sampler add_batch, before / after: {:.1}× (p99: {:.1}×); longest window-lock \
         hold by a reader, before / after: {:.0}×",
        max[1] as f64 / max[2].max(1) as f64,
        percentile(&before.waits, 0.99) as f64 / percentile(&after.waits, 0.99).max(1) as f64,
        held[1].as_secs_f64() / held[2].as_secs_f64().max(1e-9)
    );
    black_box(agg);
}
