//! One bounded capture: loads a sampler of its own, samples a set of processes for a while and
//! folds their stacks (CPU and off-CPU also per process with their frame details, for
//! pprof). Used by the one-shot `record` command and by on-demand
//! `/flamegraph?seconds=N` requests of the daemon (which keeps its continuous, low-rate
//! sampler running meanwhile). Modes: CPU samples, blocked time (off-CPU), and the Lua heap:
//! allocated bytes (`alloc`) or sampled blocks still allocated at the end (`live`), from
//! probes on each target's Lua allocator ([`super::alloc`]) that exist only for the capture.
//!
//! Hooks: the BPF programs of the mode ([`super::bpf`]) for the capture's duration; the
//! allocator probes are held, read and detached before it returns, also when it is stopped
//! early (shutdown) or every target exited. Metrics: none; the outcome counters are returned
//! in [`Capture`].

use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use apisix_ebpf_common::{COUNTER_SLOTS, LIVE_MAX_TRACKED, Sample};

use super::{
    alloc::{self, AllocError, AllocProbe},
    bpf::{BpfError, BpfSession},
    kernel::KernelReport,
    source::CaptureSource,
};
use crate::{
    label::FrameDetail,
    luajit::{LuaTarget, heap},
    output::{Folded, pprof::Detailed},
    proc::{memory::Memory, process},
    stacks::{StackBuilder, StackOptions, StackStats},
};

/// Longest wait for the Lua VMs of the targets to be learned before CPU sampling starts.
const LEARN_WAIT: Duration = Duration::from_secs(1);
/// Longest wait for the Lua VMs of the targets of an allocation capture, which cannot start
/// without them (the allocator is read from the VM).
pub const VM_WAIT: Duration = Duration::from_secs(10);

/// Longest wait, after a live capture, for each target's VM to complete a collection cycle
/// (frees are still followed meanwhile): what remains then was reachable.
pub const SETTLE_WAIT: Duration = Duration::from_secs(20);

/// Default mean distance between two allocation sampling points.
pub const DEFAULT_SAMPLE_BYTES: u64 = crate::config::ranges::DEFAULT_SAMPLE_BYTES;

/// A process to capture.
#[derive(Debug, Clone)]
pub struct CaptureTarget {
    pub pid: u32,
    /// Its LuaJIT, when known: Lua frames are walked.
    pub lua: Option<LuaTarget>,
    /// Its Lua VM's `global_State`, when already known (the daemon's continuous sampler
    /// learned it): no wait for it.
    pub vm: Option<u64>,
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
    /// The Lua heap: a stack's weight is the bytes allocated under it (sampled every
    /// `sample_bytes` on average); with `live`, only the sampled blocks still allocated when
    /// the capture ends.
    Alloc { sample_bytes: u64, live: bool },
    /// CPU samples at `frequency` Hz taken while their thread's event-loop iteration was at
    /// least `stall_ns` old (the event-loop pair runs for the capture); a sample weighs the
    /// sampling period in microseconds.
    Stalls { frequency: u64, stall_ns: u64 },
}

impl Mode {
    /// What one unit of weight is, for flame graph legends.
    pub fn unit(self) -> &'static str {
        match self {
            Mode::Cpu { .. } => "samples",
            Mode::OffCpu { .. } | Mode::Stalls { .. } => "us",
            Mode::Alloc { .. } => "bytes",
        }
    }

    /// A short description for titles.
    pub fn describe(self) -> String {
        match self {
            Mode::Cpu { frequency } => format!("on-CPU at {frequency} Hz"),
            Mode::Stalls {
                frequency,
                stall_ns,
            } => format!(
                "event-loop stalls (iterations ≥ {} ms), on-CPU at {frequency} Hz",
                stall_ns / 1_000_000
            ),
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
            Mode::Alloc {
                sample_bytes,
                live: false,
            } => format!(
                "Lua allocated bytes, sampled every {} on average",
                human_bytes(sample_bytes)
            ),
            Mode::Alloc {
                sample_bytes,
                live: true,
            } => format!(
                "Lua live bytes (sampled blocks still allocated at the end), sampled every {} \
                 on average",
                human_bytes(sample_bytes)
            ),
        }
    }

    /// The name `record --summary` and `/flamegraph?mode=` use.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Cpu { .. } => "cpu",
            Mode::OffCpu { .. } => "off-cpu",
            Mode::Alloc { live: false, .. } => "alloc",
            Mode::Alloc { live: true, .. } => "live",
            Mode::Stalls { .. } => "stalls",
        }
    }
}

/// `bytes` with a binary unit: `512 KiB`, `1.5 MiB`.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 || v.fract() == 0.0 {
        format!("{v:.0} {}", UNITS[unit])
    } else {
        format!("{v:.1} {}", UNITS[unit])
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

/// What a capture reports while it runs.
#[derive(Debug, Clone, Copy)]
pub enum Progress<'a> {
    /// An allocation capture waits for these processes' Lua VMs to be learned.
    WaitingForVm { pids: &'a [u32], waited: Duration },
    /// Sampling starts; the Lua heap size of each target whose VM is known.
    Started { heaps: &'a [(u32, u64)] },
    /// A live capture ended and waits for these processes' collectors to complete a cycle.
    Settling { pids: &'a [u32], waited: Duration },
    /// About every 250 ms: the time sampled so far and the total weight.
    Sampling { elapsed: Duration, weight: u64 },
}

/// Why a capture could not run.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    /// Loading or driving the BPF programs failed.
    #[error(transparent)]
    Bpf(#[from] BpfError),
    /// No target's allocator could be probed (allocation captures); one reason per target.
    #[error("{}", join(.failures))]
    Alloc { failures: Vec<AllocError> },
}

fn join(failures: &[AllocError]) -> String {
    let text: Vec<String> = failures
        .iter()
        .map(|e| {
            let mut s = e.to_string();
            let mut source = std::error::Error::source(e);
            while let Some(cause) = source {
                s.push_str(": ");
                s.push_str(&cause.to_string());
                source = cause.source();
            }
            s
        })
        .collect();
    text.join("; ")
}

/// The Lua heap size (`gc.total`) of one target at the start and the end of a capture, when
/// its VM was known and readable then.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeapReading {
    pub pid: u32,
    pub start: Option<u64>,
    pub end: Option<u64>,
}

/// What an allocation capture found besides its stacks.
#[derive(Debug, Clone, Default)]
pub struct AllocOutcome {
    /// The probes attached, one per target.
    pub probes: Vec<AllocProbe>,
    /// Targets left out, with the reason (the capture ran on the others).
    pub skipped: Vec<String>,
    /// Live mode: sampled blocks still allocated at the end, and the bytes they stand for.
    pub live_blocks: u64,
    pub live_bytes: u64,
    /// Live mode: blocks still allocated whose sample was lost or could not be named.
    pub live_unnamed: u64,
    /// Live mode: how long the capture waited for a collection after it ended, and the
    /// targets whose collector completed no cycle by then or could not be read (their live
    /// blocks may include garbage not yet collected).
    pub settle_time: Duration,
    pub unsettled: Vec<u32>,
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
    /// Errors of reading Lua memory in user space, by reason: naming frames, and the heap
    /// sizes of [`Capture::heaps`] (`heap_*`, [`heap::HeapError::reason`]).
    pub lua_errors: std::collections::BTreeMap<&'static str, u64>,
    /// The Lua heap size of each target with a known VM, at the start and the end.
    pub heaps: Vec<HeapReading>,
    /// Allocation captures: probes, skipped targets, live totals.
    pub alloc: Option<AllocOutcome>,
    /// What the kernel offered the capture's programs (the Lua walk variant, its depth).
    pub kernel: KernelReport,
}

/// Samples `targets` in `mode` for `duration` (or until every target exited, or `stop` is
/// set). `progress` hears about waits, the start and, about every 250 ms, the time so far and
/// the total weight.
pub fn capture(
    targets: &[CaptureTarget],
    duration: Duration,
    mode: Mode,
    labels: StackOptions,
    stop: &AtomicBool,
    progress: impl FnMut(Progress<'_>),
) -> Result<Capture, CaptureError> {
    let sampler = open(mode)?;
    capture_with(sampler, targets, duration, mode, labels, stop, progress)
}

/// The BPF programs of `mode`, loaded and held: nothing is measured until the capture
/// starts them, once its targets are set.
pub fn open(mode: Mode) -> Result<BpfSession, BpfError> {
    match mode {
        Mode::Cpu { frequency } => BpfSession::prepare(frequency),
        Mode::Stalls {
            frequency,
            stall_ns,
        } => {
            let mut s = BpfSession::prepare(frequency)?;
            s.attach_event_loop(stall_ns)?;
            Ok(s)
        }
        // Held (every block counts as short) until the Lua VMs are learned.
        Mode::OffCpu { .. } => BpfSession::start_offcpu(u64::MAX),
        Mode::Alloc { sample_bytes, live } => BpfSession::prepare_alloc(sample_bytes, live),
    }
}

/// [`capture`] over `sampler`, a source opened for `mode` (the BPF session of [`open`], or
/// a replay in root-free tests).
pub fn capture_with<S: CaptureSource>(
    mut sampler: S,
    targets: &[CaptureTarget],
    duration: Duration,
    mode: Mode,
    labels: StackOptions,
    stop: &AtomicBool,
    mut progress: impl FnMut(Progress<'_>),
) -> Result<Capture, CaptureError> {
    let mut collector = Collector::new(mode, labels);
    for t in targets {
        if let Some(lua) = &t.lua {
            collector.builder.set_lua_target(t.pid, lua.clone());
        }
        if let (Some(g), Some(_)) = (t.vm, &t.lua) {
            sampler.set_vm(t.pid, g)?;
        }
        sampler.add_process(t.pid, t.lua.as_ref())?;
        collector.builder.prepare(t.pid);
    }
    let mut outcome = match mode {
        Mode::Alloc { .. } => Some(attach_allocators(
            &mut sampler,
            targets,
            stop,
            &mut progress,
        )?),
        _ => {
            // Learn the Lua VMs first (the `lua_resume` uprobe fires at the next request),
            // so that stacks in JIT-compiled code of builds that do not keep the VM in a
            // register are walked from the start; an idle process is not waited for long.
            wait_for_vms(&sampler, targets, LEARN_WAIT, stop, |_, _| {});
            None
        }
    };
    let mut heap_errors = std::collections::BTreeMap::new();
    let heaps_at_start = heaps(&sampler, targets, &mut heap_errors);
    let started_heaps: Vec<(u32, u64)> = heaps_at_start
        .iter()
        .filter_map(|(pid, b)| Some((*pid, (*b)?)))
        .collect();
    progress(Progress::Started {
        heaps: &started_heaps,
    });
    match mode {
        Mode::Cpu { .. } | Mode::Stalls { .. } => sampler.attach_cpu()?,
        Mode::OffCpu { min_block_us, .. } => sampler.set_offcpu_min(min_block_us)?,
        Mode::Alloc { .. } => sampler.release_alloc()?,
    }
    // Counters from here on: blocks held while learning are not the capture's.
    let baseline = sampler.counters()?;
    let (elapsed, all_exited) =
        collector.sample(&mut sampler, targets, duration, stop, &mut progress);
    if let Some(out) = outcome.as_mut() {
        if collector.live {
            // What is still allocated now includes garbage the collector has not reached
            // yet: frees are followed until each VM completes a cycle.
            sampler.settle_alloc()?;
            let began = Instant::now();
            out.unsettled = settle(targets, &out.probes, stop, &mut progress);
            out.settle_time = began.elapsed();
        }
        // Nothing more is counted or tracked: the live blocks stay as they are now.
        sampler.hold_alloc()?;
    }
    // Samples still in the ring buffer belong to the capture.
    while sampler.poll(Duration::from_millis(0), &mut |s| collector.take(s)) > 0 {}
    let mut counters = sampler.counters()?;
    for (c, b) in counters.iter_mut().zip(baseline) {
        *c = c.saturating_sub(b);
    }
    if let Some(out) = outcome.as_mut()
        && collector.live
    {
        collector.name_live_blocks(&sampler, out)?;
    }
    let heaps_at_end = heaps(&sampler, targets, &mut heap_errors);
    let Collector {
        builder,
        detailed,
        idle_excluded,
        ..
    } = collector;
    let mut lua_errors: std::collections::BTreeMap<&'static str, u64> =
        builder.lua_errors().iter().map(|(k, v)| (*k, *v)).collect();
    lua_errors.extend(heap_errors);
    sampler.detach_alloc();
    let kernel = sampler.kernel();
    drop(sampler);
    Ok(Capture {
        kernel,
        folded: detailed.folded(),
        detailed,
        counters,
        idle_excluded,
        all_exited,
        elapsed,
        stats: builder.stats(),
        traces_decoded: builder.traces_decoded(),
        lua_errors,
        heaps: heaps_at_start
            .into_iter()
            .zip(heaps_at_end)
            .filter(|((_, a), (_, b))| a.is_some() || b.is_some())
            .map(|((pid, start), (_, end))| HeapReading { pid, start, end })
            .collect(),
        alloc: outcome,
    })
}

/// What a capture makes of its samples: named stacks with their frame details, or (live
/// mode) each sample's stack kept by its identity until the blocks still allocated at the
/// end name theirs; idle blocks left out when asked.
struct Collector {
    builder: StackBuilder,
    detailed: Detailed<u32>,
    named: LiveNames,
    exclude_idle: bool,
    live: bool,
    /// Stalls: the shortest iteration kept, and a sample's weight in microseconds.
    stall: Option<(u64, u64)>,
    idle_excluded: u64,
    /// Weight of every sample taken (live mode's progress: its stacks fold at the end).
    sampled: u64,
}

impl Collector {
    fn new(mode: Mode, labels: StackOptions) -> Self {
        Collector {
            builder: StackBuilder::new(labels),
            detailed: Detailed::new(),
            named: LiveNames::default(),
            exclude_idle: matches!(
                mode,
                Mode::OffCpu {
                    exclude_idle: true,
                    ..
                }
            ),
            live: matches!(mode, Mode::Alloc { live: true, .. }),
            stall: match mode {
                Mode::Stalls {
                    frequency,
                    stall_ns,
                } => Some((stall_ns, (1_000_000 / frequency.max(1)).max(1))),
                _ => None,
            },
            idle_excluded: 0,
            sampled: 0,
        }
    }

    fn take(&mut self, s: &Sample) {
        if let Some((stall_ns, _)) = self.stall
            && s.iteration_ns < stall_ns
        {
            return;
        }
        self.sampled += s.weight;
        let weight = self.stall.map_or(s.weight.max(1), |(_, us)| us);
        let Some(stack) = self.builder.build(s) else {
            return;
        };
        if self.exclude_idle && is_idle(&stack) {
            self.idle_excluded += s.weight;
            return;
        }
        let details = self.builder.last_details().to_vec();
        if self.live {
            self.named.insert(s.tid, s.time_ns, (s.pid, stack, details));
        } else {
            self.detailed.add(s.pid, stack, details, weight);
        }
    }

    /// Polls `sampler` for `duration` (or until `stop`, or every target exited: the second
    /// value); returns how long it sampled.
    fn sample(
        &mut self,
        sampler: &mut impl CaptureSource,
        targets: &[CaptureTarget],
        duration: Duration,
        stop: &AtomicBool,
        progress: &mut impl FnMut(Progress<'_>),
    ) -> (Duration, bool) {
        let started = Instant::now();
        let mut last_progress = Instant::now();
        while started.elapsed() < duration && !stop.load(Ordering::Relaxed) {
            sampler.poll(Duration::from_millis(100), &mut |s| self.take(s));
            if self.live && self.named.ids.len() > self.named.prune_at {
                self.prune(sampler);
            }
            if last_progress.elapsed() >= Duration::from_millis(250) {
                last_progress = Instant::now();
                progress(Progress::Sampling {
                    elapsed: started.elapsed(),
                    weight: if self.live {
                        self.sampled
                    } else {
                        self.detailed.total()
                    },
                });
            }
            sampler.retire_learners();
            if targets.iter().all(|t| !process::exists(t.pid)) {
                return (started.elapsed(), true);
            }
        }
        (started.elapsed(), false)
    }

    /// Most sampled blocks are freed long before the end: only those the BPF side still
    /// tracks (at most LIVE_MAX_TRACKED) can name a live block. (Unreadable now: tried
    /// again after the next poll.)
    fn prune(&mut self, sampler: &impl CaptureSource) {
        match sampler.live_allocs() {
            Ok(allocs) => {
                let tracked: std::collections::HashSet<(u32, u64)> = allocs
                    .into_iter()
                    .map(|(_, b)| (b.tid, b.time_ns))
                    .collect();
                self.named.retain(&tracked);
            }
            Err(e) => tracing::debug!(error = %e, "reading the live allocations"),
        }
    }

    /// Live mode: each block still allocated weighs under its sample's stack (or counts
    /// as unnamed).
    fn name_live_blocks(
        &mut self,
        sampler: &impl CaptureSource,
        out: &mut AllocOutcome,
    ) -> Result<(), BpfError> {
        for (_, block) in sampler.live_allocs()? {
            out.live_blocks += 1;
            out.live_bytes += block.weight;
            match self.named.get(block.tid, block.time_ns) {
                Some((pid, stack, details)) => {
                    self.detailed
                        .add(*pid, stack.clone(), details.clone(), block.weight);
                }
                None => out.live_unnamed += 1,
            }
        }
        Ok(())
    }
}

/// Waits up to `limit` until every target with Lua that still runs has its VM known;
/// `waiting` hears which pids are waited for, about every 250 ms.
fn wait_for_vms(
    sampler: &impl CaptureSource,
    targets: &[CaptureTarget],
    limit: Duration,
    stop: &AtomicBool,
    mut waiting: impl FnMut(&[u32], Duration),
) {
    let start = Instant::now();
    let mut last = None::<Instant>;
    while start.elapsed() < limit && !stop.load(Ordering::Relaxed) {
        let missing: Vec<u32> = targets
            .iter()
            .filter(|t| {
                t.lua.is_some() && process::exists(t.pid) && sampler.lua_vm(t.pid).is_none()
            })
            .map(|t| t.pid)
            .collect();
        if missing.is_empty() {
            return;
        }
        if last.is_none_or(|l| l.elapsed() >= Duration::from_millis(250)) {
            last = Some(Instant::now());
            waiting(&missing, start.elapsed());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Resolves and attaches the allocator probes of every target; a target that cannot be
/// probed is left out (and said so) unless none can.
fn attach_allocators(
    sampler: &mut impl CaptureSource,
    targets: &[CaptureTarget],
    stop: &AtomicBool,
    progress: &mut impl FnMut(Progress<'_>),
) -> Result<AllocOutcome, CaptureError> {
    let start = Instant::now();
    wait_for_vms(sampler, targets, VM_WAIT, stop, |pids, waited| {
        progress(Progress::WaitingForVm { pids, waited });
    });
    let waited_secs = start.elapsed().as_secs_f64().round() as u64;
    let mut out = AllocOutcome::default();
    let mut failures = Vec::new();
    for t in targets {
        match sampler.resolve_alloc(t.pid, t.lua.as_ref(), waited_secs) {
            Ok(probe) => {
                sampler.attach_alloc(&probe)?;
                tracing::info!(
                    pid = t.pid,
                    module = probe.module,
                    offset = format!("{:#x}", probe.offset),
                    "allocator probes attached"
                );
                out.probes.push(probe);
            }
            Err(e) => failures.push(e),
        }
    }
    if out.probes.is_empty() {
        sampler.detach_alloc();
        return Err(CaptureError::Alloc { failures });
    }
    out.skipped = failures
        .iter()
        .map(|e| join(std::slice::from_ref(e)))
        .collect();
    Ok(out)
}

/// How often a settling VM is checked to still be one (its collector state alone says
/// nothing of that).
const SETTLE_VM_CHECK: Duration = Duration::from_millis(100);

/// Waits (up to [`SETTLE_WAIT`], or until `stop`) until the collector of each probed VM has
/// run a whole cycle whose atomic phase came after now; returns the pids whose VM did not,
/// or could not be read while the process still ran. An exited process counts as done (its
/// blocks stay as they were at its exit), and so does a VM that is no longer one (closed:
/// `lua_close` freed its blocks through the probed allocator).
fn settle(
    targets: &[CaptureTarget],
    probes: &[AllocProbe],
    stop: &AtomicBool,
    progress: &mut impl FnMut(Progress<'_>),
) -> Vec<u32> {
    let mut watches: Vec<(u32, u64, &LuaTarget, Option<heap::CycleWatch>)> = probes
        .iter()
        .filter_map(|p| {
            let lua = targets.iter().find(|t| t.pid == p.pid)?.lua.as_ref()?;
            Some((p.pid, p.g, lua, None))
        })
        .collect();
    let start = Instant::now();
    let mut last = None::<Instant>;
    let mut last_check = None::<Instant>;
    let mut unreadable = Vec::new();
    loop {
        let check = last_check.is_none_or(|c| c.elapsed() >= SETTLE_VM_CHECK);
        if check {
            last_check = Some(Instant::now());
        }
        watches.retain_mut(|(pid, g, lua, watch)| {
            let mem = Memory::new(*pid);
            let layout = lua.flavour.layout();
            let read = if check {
                heap::check_vm(&mem, layout, *g).and_then(|()| heap::gc_phase(&mem, layout, *g))
            } else {
                heap::gc_phase(&mem, layout, *g)
            };
            let now = match read {
                Ok(now) => now,
                // Closed: nothing of it is left to free.
                Err(heap::HeapError::NotAVm { .. }) => return false,
                // Exited: nothing more will be freed.
                Err(_) if !process::exists(*pid) => return false,
                Err(e) => {
                    tracing::debug!(pid = *pid, error = %e, "settling VM unreadable");
                    unreadable.push(*pid);
                    return false;
                }
            };
            match watch {
                None => {
                    *watch = Some(heap::CycleWatch::new(now));
                    true
                }
                Some(w) => !w.observe(now),
            }
        });
        if watches.is_empty() || stop.load(Ordering::Relaxed) || start.elapsed() >= SETTLE_WAIT {
            break;
        }
        if last.is_none_or(|l| l.elapsed() >= Duration::from_millis(250)) {
            last = Some(Instant::now());
            let pids: Vec<u32> = watches.iter().map(|w| w.0).collect();
            progress(Progress::Settling {
                pids: &pids,
                waited: start.elapsed(),
            });
        }
        // Short: a full collection of a small heap takes about a millisecond, and two of
        // them between reads look like none.
        std::thread::sleep(Duration::from_micros(500));
    }
    unreadable.extend(watches.into_iter().map(|w| w.0));
    unreadable
}

/// The heap size of each target's VM now (`None`: VM unknown or unreadable). A failed read
/// of a process that still runs is counted in `errors` by reason.
fn heaps(
    sampler: &impl CaptureSource,
    targets: &[CaptureTarget],
    errors: &mut std::collections::BTreeMap<&'static str, u64>,
) -> Vec<(u32, Option<u64>)> {
    targets
        .iter()
        .map(|t| {
            let bytes = match (&t.lua, sampler.lua_vm(t.pid)) {
                (Some(lua), Some(g)) => match alloc::heap_bytes(t.pid, lua, g) {
                    Ok(b) => Some(b),
                    Err(e) => {
                        // A process that just exited is not a failed read.
                        if process::exists(t.pid) {
                            *errors.entry(e.reason()).or_insert(0) += 1;
                        }
                        None
                    }
                },
                _ => None,
            };
            (t.pid, bytes)
        })
        .collect()
}

/// A live capture's sampled stack: its process, its frames and their details.
type LiveStack = (u32, Vec<Arc<str>>, Vec<FrameDetail>);

/// The stacks of a live capture's samples by their identity (thread, time), interned: the
/// blocks still allocated at the end name their sample. Pruned ([`LiveNames::retain`]) to
/// the samples whose block is still tracked once it holds [`LiveNames::prune_at`].
struct LiveNames {
    ids: HashMap<(u32, u64), usize>,
    stacks: Vec<Arc<LiveStack>>,
    index: HashMap<Arc<LiveStack>, usize>,
    /// The newest sample time seen.
    newest_ns: u64,
    /// Samples held above which the caller prunes.
    prune_at: usize,
}

/// Samples a live capture holds at least before pruning: twice what the BPF side tracks.
const LIVE_PRUNE_AT: usize = 2 * LIVE_MAX_TRACKED as usize;
/// Samples this recent are kept by a prune: the BPF side tracks a block once the allocator
/// returned, after its sample was emitted.
const LIVE_RECENT_NS: u64 = 1_000_000_000;

impl Default for LiveNames {
    fn default() -> Self {
        Self {
            ids: HashMap::new(),
            stacks: Vec::new(),
            index: HashMap::new(),
            newest_ns: 0,
            prune_at: LIVE_PRUNE_AT,
        }
    }
}

impl LiveNames {
    /// Keeps the samples in `tracked` (whose block is still allocated) and the recent ones,
    /// and the stacks they use.
    fn retain(&mut self, tracked: &std::collections::HashSet<(u32, u64)>) {
        let recent = self.newest_ns.saturating_sub(LIVE_RECENT_NS);
        let old_stacks = std::mem::take(&mut self.stacks);
        self.index.clear();
        let mut renumbered: HashMap<usize, usize> = HashMap::new();
        self.ids.retain(|id, i| {
            if id.1 < recent && !tracked.contains(id) {
                return false;
            }
            *i = *renumbered.entry(*i).or_insert_with(|| {
                let stack = old_stacks[*i].clone();
                self.stacks.push(stack.clone());
                self.index.insert(stack, self.stacks.len() - 1);
                self.stacks.len() - 1
            });
            true
        });
        // A capture whose tracked and recent samples alone pass the mark prunes again only
        // once they doubled.
        self.prune_at = LIVE_PRUNE_AT.max(2 * self.ids.len());
    }

    fn insert(&mut self, tid: u32, time_ns: u64, stack: LiveStack) {
        let stack = Arc::new(stack);
        let i = match self.index.get(&stack) {
            Some(i) => *i,
            None => {
                self.stacks.push(stack.clone());
                self.index.insert(stack, self.stacks.len() - 1);
                self.stacks.len() - 1
            }
        };
        self.ids.insert((tid, time_ns), i);
        self.newest_ns = self.newest_ns.max(time_ns);
    }

    fn get(&self, tid: u32, time_ns: u64) -> Option<&LiveStack> {
        let i = self.ids.get(&(tid, time_ns))?;
        self.stacks.get(*i).map(|s| &**s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_describe_their_weights() {
        let alloc = Mode::Alloc {
            sample_bytes: 512 * 1024,
            live: false,
        };
        assert_eq!(alloc.name(), "alloc");
        assert_eq!(alloc.unit(), "bytes");
        assert!(
            alloc.describe().contains("allocated bytes"),
            "{}",
            alloc.describe()
        );
        assert!(alloc.describe().contains("512 KiB"), "{}", alloc.describe());
        let live = Mode::Alloc {
            sample_bytes: 1536 * 1024,
            live: true,
        };
        assert_eq!(live.name(), "live");
        assert!(
            live.describe().contains("live bytes"),
            "{}",
            live.describe()
        );
        assert!(live.describe().contains("1.5 MiB"), "{}", live.describe());
        assert_eq!(Mode::Cpu { frequency: 99 }.name(), "cpu");
    }

    #[test]
    fn human_bytes_picks_a_unit() {
        assert_eq!(human_bytes(100), "100 B");
        assert_eq!(human_bytes(1024), "1 KiB");
        assert_eq!(human_bytes(3 << 20), "3 MiB");
        assert_eq!(human_bytes((5 << 30) / 2), "2.5 GiB");
    }

    #[test]
    fn live_names_intern_stacks() {
        let mut n = LiveNames::default();
        let s: Vec<Arc<str>> = vec!["main".into(), "f".into()];
        n.insert(1, 10, (7, s.clone(), Vec::new()));
        n.insert(1, 20, (7, s.clone(), Vec::new()));
        n.insert(2, 10, (7, vec!["main".into()], Vec::new()));
        assert_eq!(n.stacks.len(), 2);
        assert_eq!(
            n.get(1, 20).map(|(pid, s, _)| (*pid, s.len())),
            Some((7, 2))
        );
        assert_eq!(n.get(2, 10).map(|(_, s, _)| s.len()), Some(1));
        assert!(n.get(3, 10).is_none());
    }

    #[test]
    fn live_names_keep_tracked_and_recent_samples() {
        let mut n = LiveNames::default();
        let a: Vec<Arc<str>> = vec!["main".into(), "a".into()];
        let b: Vec<Arc<str>> = vec!["main".into(), "b".into()];
        let c: Vec<Arc<str>> = vec!["main".into(), "c".into()];
        let s = 1_000_000_000;
        n.insert(1, 10, (7, a.clone(), Vec::new()));
        n.insert(1, 20, (7, b.clone(), Vec::new()));
        n.insert(2, 30, (7, a.clone(), Vec::new()));
        n.insert(2, 5 * s, (7, c.clone(), Vec::new()));
        n.retain(&[(1, 20)].into_iter().collect());
        // The tracked sample and the recent one stay, with their stacks; the rest go.
        assert_eq!(n.ids.len(), 2);
        assert_eq!(n.stacks.len(), 2);
        assert_eq!(
            n.get(1, 20).map(|(_, s, _)| s[1].to_string()).as_deref(),
            Some("b")
        );
        assert_eq!(
            n.get(2, 5 * s).map(|(_, s, _)| s[1].to_string()).as_deref(),
            Some("c")
        );
        assert!(n.get(1, 10).is_none() && n.get(2, 30).is_none());
        // Stacks are still interned after the renumbering.
        n.insert(3, 6 * s, (7, b, Vec::new()));
        assert_eq!(n.stacks.len(), 2);
    }
}
