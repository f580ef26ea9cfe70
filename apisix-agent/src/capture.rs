//! One bounded capture: loads a sampler of its own at a given rate, samples a set of
//! processes for a while and folds their stacks. Used by the one-shot `record` command and by
//! on-demand `/flamegraph?seconds=N` requests of the daemon (which keeps its continuous,
//! low-rate sampler running meanwhile).
//!
//! Hooks: the BPF sampler ([`crate::bpf`]) for the capture's duration. Metrics: none; the
//! outcome counters are returned in [`Capture`].

use std::{
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use apisix_ebpf_common::COUNTER_SLOTS;

use crate::{
    bpf::{BpfError, Sampler},
    fold::Folded,
    luajit::{LuaTarget, NameStyle},
    process,
    stacks::{StackBuilder, StackStats},
};

/// A process to capture.
#[derive(Debug, Clone)]
pub struct CaptureTarget {
    pub pid: u32,
    /// Its LuaJIT, when known: Lua frames are walked.
    pub lua: Option<LuaTarget>,
}

/// What a capture produced.
#[derive(Debug)]
pub struct Capture {
    pub folded: Folded,
    pub counters: [u64; COUNTER_SLOTS as usize],
    /// Every target exited before the end; the capture stopped early.
    pub all_exited: bool,
    pub elapsed: Duration,
    pub stats: StackStats,
}

/// Samples `targets` at `frequency` Hz for `duration` (or until every target exited, or
/// `stop` is set). `progress` is called about every 250 ms with the time so far and the
/// number of stacks.
pub fn capture(
    targets: &[CaptureTarget],
    duration: Duration,
    frequency: u64,
    style: NameStyle,
    stop: &AtomicBool,
    mut progress: impl FnMut(Duration, u64),
) -> Result<Capture, BpfError> {
    let mut builder = StackBuilder::new(style);
    let mut sampler = Sampler::start(frequency)?;
    for t in targets {
        if let Some(lua) = &t.lua {
            builder.set_lua_target(t.pid, lua.clone());
        }
        sampler.add_process(t.pid, t.lua.as_ref())?;
        builder.prepare(t.pid);
    }
    let started = Instant::now();
    let mut folded = Folded::new();
    let mut last_progress = Instant::now();
    let mut all_exited = false;
    while started.elapsed() < duration && !stop.load(Ordering::Relaxed) {
        sampler.poll(Duration::from_millis(100), |s| {
            if let Some(stack) = builder.build(s) {
                folded.add(stack, 1);
            }
        });
        if last_progress.elapsed() >= Duration::from_millis(250) {
            last_progress = Instant::now();
            progress(started.elapsed(), folded.total());
        }
        sampler.retire_learners();
        if targets.iter().all(|t| !process::exists(t.pid)) {
            all_exited = true;
            break;
        }
    }
    let elapsed = started.elapsed();
    // Samples still in the ring buffer belong to the capture.
    while sampler.poll(Duration::from_millis(0), |s| {
        if let Some(stack) = builder.build(s) {
            folded.add(stack, 1);
        }
    }) > 0
    {}
    let counters = sampler.counters()?;
    drop(sampler);
    Ok(Capture {
        folded,
        counters,
        all_exited,
        elapsed,
        stats: builder.stats(),
    })
}
