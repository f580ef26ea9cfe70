//! One bounded capture: loads a sampler of its own at a given rate, samples a set of
//! processes for a while and folds their stacks (also per process with their frame details,
//! for pprof). Used by the one-shot `record` command and by
//! on-demand `/flamegraph?seconds=N` requests of the daemon (which keeps its continuous,
//! low-rate sampler running meanwhile).
//!
//! Hooks: the BPF sampler ([`super::bpf`]) for the capture's duration. Metrics: none; the
//! outcome counters are returned in [`Capture`].

use std::{
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use apisix_ebpf_common::COUNTER_SLOTS;

use super::bpf::{BpfError, BpfSession};
use crate::{
    luajit::LuaTarget,
    output::{Folded, pprof::Detailed},
    stacks::{StackBuilder, StackOptions, StackStats, process},
};

/// Longest wait for the Lua VMs of the targets to be learned before CPU sampling starts.
const LEARN_WAIT: Duration = Duration::from_secs(1);

/// A process to capture.
#[derive(Debug, Clone)]
pub struct CaptureTarget {
    pub pid: u32,
    /// Its LuaJIT, when known: Lua frames are walked.
    pub lua: Option<LuaTarget>,
}

/// What a capture measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// CPU samples at `frequency` Hz per CPU; a stack's weight is its sample count.
    Cpu { frequency: u64 },
    /// Blocked time: each block of at least `min_block_us` weighs its microseconds. With
    /// `exclude_idle`, blocks in `epoll_wait` (an idle nginx worker) are left out.
    OffCpu {
        min_block_us: u64,
        exclude_idle: bool,
    },
}

impl Mode {
    /// What one unit of weight is, for flame graph legends.
    pub fn unit(self) -> &'static str {
        match self {
            Mode::Cpu { .. } => "samples",
            Mode::OffCpu { .. } => "us",
        }
    }

    /// A short description for titles.
    pub fn describe(self) -> String {
        match self {
            Mode::Cpu { frequency } => format!("on-CPU at {frequency} Hz"),
            Mode::OffCpu {
                min_block_us,
                exclude_idle,
            } => format!(
                "off-CPU, blocks ≥ {min_block_us} µs{}",
                if exclude_idle {
                    ", idle epoll waits excluded"
                } else {
                    ""
                }
            ),
        }
    }
}

/// Whether a stack is an nginx worker waiting for events (the normal idle state).
pub fn is_idle(stack: &[std::sync::Arc<str>]) -> bool {
    stack.iter().any(|f| {
        matches!(
            &**f,
            "ep_poll_[k]" | "do_epoll_wait_[k]" | "epoll_wait" | "epoll_pwait" | "epoll_pwait2"
        )
    })
}

/// What a capture produced.
#[derive(Debug)]
pub struct Capture {
    pub folded: Folded,
    /// The same stacks per process, with their frame details (for pprof).
    pub detailed: Detailed<u32>,
    pub counters: [u64; COUNTER_SLOTS as usize],
    /// Off-CPU stacks left out as idle, and their microseconds.
    pub idle_excluded: u64,
    /// Every target exited before the end; the capture stopped early.
    pub all_exited: bool,
    pub elapsed: Duration,
    pub stats: StackStats,
    /// Traces read and decoded from the targets.
    pub traces_decoded: u64,
    /// Errors of naming Lua frames in user space, by reason.
    pub lua_errors: std::collections::BTreeMap<&'static str, u64>,
}

/// Samples `targets` in `mode` for `duration` (or until every target exited, or `stop` is
/// set). `progress` is called about every 250 ms with the time so far and the total weight.
pub fn capture(
    targets: &[CaptureTarget],
    duration: Duration,
    mode: Mode,
    labels: StackOptions,
    stop: &AtomicBool,
    mut progress: impl FnMut(Duration, u64),
) -> Result<Capture, BpfError> {
    let mut builder = StackBuilder::new(labels);
    let (mut sampler, exclude_idle) = match mode {
        Mode::Cpu { frequency } => (BpfSession::prepare(frequency)?, false),
        // Held (every block counts as short) until the Lua VMs are learned.
        Mode::OffCpu { exclude_idle, .. } => (BpfSession::start_offcpu(u64::MAX)?, exclude_idle),
    };
    let mut idle_excluded = 0;
    for t in targets {
        if let Some(lua) = &t.lua {
            builder.set_lua_target(t.pid, lua.clone());
        }
        sampler.add_process(t.pid, t.lua.as_ref())?;
        builder.prepare(t.pid);
    }
    // Learn the Lua VMs first (the `lua_resume` uprobe fires at the next request), so that
    // stacks in JIT-compiled code of builds that do not keep the VM in a register are walked
    // from the start; an idle process is not waited for long.
    let deadline = Instant::now() + LEARN_WAIT;
    while Instant::now() < deadline
        && !stop.load(Ordering::Relaxed)
        && targets
            .iter()
            .any(|t| t.lua.is_some() && process::exists(t.pid) && !sampler.vm_known(t.pid))
    {
        std::thread::sleep(Duration::from_millis(20));
    }
    match mode {
        Mode::Cpu { .. } => sampler.attach_cpu()?,
        Mode::OffCpu { min_block_us, .. } => sampler.set_offcpu_min(min_block_us)?,
    }
    // Counters from here on: blocks held while learning are not the capture's.
    let baseline = sampler.counters()?;
    let started = Instant::now();
    let mut detailed = Detailed::new();
    let mut last_progress = Instant::now();
    let mut all_exited = false;
    let mut take = |builder: &mut StackBuilder,
                    detailed: &mut Detailed<u32>,
                    s: &apisix_ebpf_common::Sample| {
        if let Some(stack) = builder.build(s) {
            if exclude_idle && is_idle(&stack) {
                idle_excluded += s.weight;
            } else {
                let details = builder.last_details().to_vec();
                detailed.add(s.pid, stack, details, s.weight.max(1));
            }
        }
    };
    while started.elapsed() < duration && !stop.load(Ordering::Relaxed) {
        sampler.poll(Duration::from_millis(100), |s| {
            take(&mut builder, &mut detailed, s)
        });
        if last_progress.elapsed() >= Duration::from_millis(250) {
            last_progress = Instant::now();
            progress(started.elapsed(), detailed.total());
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
        take(&mut builder, &mut detailed, s);
    }) > 0
    {}
    let mut counters = sampler.counters()?;
    for (c, b) in counters.iter_mut().zip(baseline) {
        *c = c.saturating_sub(b);
    }
    drop(sampler);
    Ok(Capture {
        folded: detailed.folded(),
        detailed,
        counters,
        idle_excluded,
        all_exited,
        elapsed,
        stats: builder.stats(),
        traces_decoded: builder.traces_decoded(),
        lua_errors: builder.lua_errors().iter().map(|(k, v)| (*k, *v)).collect(),
    })
}
