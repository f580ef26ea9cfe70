//! The daemon's continuous sampler: one thread owning the low-rate BPF sampler and a stack
//! builder.
//! It applies each discovery [`Snapshot`] to the BPF target map (new processes added with
//! their LuaJIT layout, gone ones removed), turns samples into stacks for the
//! [`Aggregator`], and once a second moves BPF counters into metrics.
//!
//! Hooks: the BPF sampler ([`crate::sampling::bpf`]) for the daemon's lifetime, plus the off-CPU
//! tracepoints when `sampling.offcpu.enabled`; dropping them at the end of [`run`] detaches
//! every program. Metrics: `apisix_profiler_unwind_errors_total`,
//! `apisix_profiler_lost_samples_total`, `apisix_profiler_targets`,
//! `apisix_profiler_lua_function_offcpu_seconds_total` (when enabled),
//! `apisix_profiler_lua_vm_state_samples_total`, `apisix_profiler_lua_memory_bytes` (each
//! second, the heap size of every VM the BPF side learned, read from the target's memory;
//! failures in `apisix_profiler_lua_memory_read_errors_total`) and, through the
//! aggregator, the per-function, per-plugin and per-phase ([`crate::attribution`]) and
//! per-target counters. The event-loop pair (the epoll tracepoints) runs in the CPU
//! sampler's session (and in the off-CPU one when enabled, whose blocks then carry their
//! iteration's age too): each second its per-thread counts go to [`super::eventloop`]
//! (`apisix_profiler_event_loop_iteration_seconds`, `…_stalls_total`, the stall log), and
//! samples taken while their iteration was older than `sampling.stalls.threshold_ms` are
//! also kept in the aggregator's stall window.

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, atomic::Ordering, mpsc},
    time::{Duration, Instant},
};

use apisix_ebpf_common::Counter;

use super::{
    aggregate::{Arrival, Group, Retention},
    eventloop::{LoopTracker, StallLog},
    metrics::{
        CacheLabels, FlavourLabels, LabelValue, ProgramLabels, ReasonLabels, TargetLabels,
        VmStateLabels,
    },
    state::{Shared, VmMemory},
};
use crate::{
    discovery::{Lua, Snapshot, TargetProcess},
    error::error_chain,
    label::FrameDetail,
    luajit::{LuaTarget, VmState, heap, trace::TraceFallback},
    proc::{memory::Memory, process},
    sampling::{
        bpf::{BpfError, BpfSession},
        source::SampleSource,
    },
    stacks::{StackBuilder, StackOptions},
};

/// Lua VMs remembered per process (nginx runs one per subsystem, http and stream).
const MAX_VMS_PER_PROCESS: usize = 4;
/// Consecutive failed heap reads (each counted) after which a VM is given up: the BPF side
/// learning it again does not bring it back.
const MAX_VM_FAILURES: u32 = 10;
/// VMs given up remembered per process.
const MAX_GIVEN_UP: usize = 16;

struct Tracked {
    start_time: u64,
    labels: TargetLabels,
    lua: Option<LuaTarget>,
    /// The VMs the BPF side learned in this process (the latest last), while they check out.
    vms: Vec<u64>,
    /// Consecutive failed heap reads of each VM in `vms`.
    failures: HashMap<u64, u32>,
    /// VMs given up after [`MAX_VM_FAILURES`] failed reads in a row.
    given_up: HashSet<u64>,
}

fn metric_labels(t: &TargetProcess) -> TargetLabels {
    TargetLabels {
        container: t.labels.container.clone().into(),
        image: t.labels.image.clone().into(),
        process: t.labels.process.clone().into(),
    }
}

/// A built stack: its process, frame labels and frame details.
type Built = (u32, Vec<Arc<str>>, Vec<FrameDetail>);

struct State<S> {
    sampler: S,
    /// The off-CPU sampler, when `sampling.offcpu.enabled`.
    offcpu: Option<S>,
    builder: StackBuilder,
    tracked: HashMap<u32, Tracked>,
    counters_seen: HashMap<&'static str, u64>,
    lost_seen: HashMap<u32, u64>,
    /// Label sets of the Lua memory gauge set at the last refresh.
    memory_series: HashSet<TargetLabels>,
    /// The event-loop counts at the last read, and the stall log.
    loops: LoopTracker,
    stall_log: StallLog,
}

impl<S: SampleSource> State<S> {
    /// Hands the samples (with their VM states) and off-CPU blocks built in one poll to the
    /// aggregator: counted under its counters' lock, then kept under its window's. Counts the
    /// VM state of each sample of a tracked process.
    fn hand_over(
        &self,
        shared: &Shared,
        batch: &mut Vec<(Built, Option<VmState>, Option<u64>)>,
        blocked: &mut Vec<(Built, u64, Option<u64>)>,
    ) {
        let tracked = &self.tracked;
        let cpu = batch
            .drain(..)
            .filter_map(|((pid, stack, details), vm_state, stall_ns)| {
                let tr = tracked.get(&pid)?;
                if let Some(v) = vm_state {
                    shared
                        .metrics
                        .vm_states
                        .get_or_create(&VmStateLabels {
                            state: LabelValue::fixed(v.name()),
                            container: tr.labels.container.clone(),
                            image: tr.labels.image.clone(),
                        })
                        .inc();
                }
                Some(Arrival {
                    which: Retention::Cpu,
                    pid,
                    target: &tr.labels,
                    stack,
                    details,
                    us: 0,
                    stall_ns,
                })
            });
        let off = blocked
            .drain(..)
            .filter_map(|((pid, stack, details), us, stall_ns)| {
                Some(Arrival {
                    which: Retention::OffCpu,
                    pid,
                    target: &tracked.get(&pid)?.labels,
                    stack,
                    details,
                    us,
                    stall_ns,
                })
            });
        shared
            .aggregator
            .add_batch(cpu.chain(off), |l| self.builder.module_of(l));
    }

    fn apply(&mut self, shared: &Shared, snapshot: &Snapshot) {
        let wanted: HashMap<u32, &TargetProcess> = snapshot.iter().map(|t| (t.pid, t)).collect();
        let gone: Vec<u32> = self
            .tracked
            .iter()
            .filter(|(pid, tr)| {
                wanted
                    .get(pid)
                    .is_none_or(|t| t.start_time != tr.start_time)
            })
            .map(|(pid, _)| *pid)
            .collect();
        for pid in gone {
            self.sampler.remove_target(pid);
            if let Some(off) = self.offcpu.as_mut() {
                off.remove_target(pid);
            }
            self.builder.forget(pid);
            self.lost_seen.remove(&pid);
            if let Some(tr) = self.tracked.remove(&pid) {
                tracing::info!(
                    pid,
                    process = tr.labels.process.as_str(),
                    container = tr.labels.container.as_str(),
                    "target gone"
                );
            }
        }
        for t in snapshot.iter() {
            if let Some(tr) = self.tracked.get_mut(&t.pid) {
                // Labels can come later than the process: Docker names a container the scan
                // first saw only by its cgroup.
                let labels = metric_labels(t);
                if tr.labels != labels {
                    tracing::info!(
                        pid = t.pid,
                        container = labels.container.as_str(),
                        image = labels.image.as_str(),
                        "target relabelled"
                    );
                    tr.labels = labels;
                }
                continue;
            }
            let lua = match &t.lua {
                Lua::Known(l) => Some(l),
                _ => None,
            };
            if let Some(l) = lua {
                self.builder.set_lua_target(t.pid, l.clone());
            }
            if let Err(e) = self.sampler.add_process(t.pid, lua) {
                tracing::warn!(pid = t.pid, error = %e, "cannot sample target");
                continue;
            }
            if let Some(off) = self.offcpu.as_mut()
                && let Err(e) = off.add_process(t.pid, lua)
            {
                tracing::warn!(pid = t.pid, error = %e, "cannot trace target off-CPU");
            }
            self.builder.prepare(t.pid);
            tracing::info!(
                pid = t.pid,
                process = t.labels.process,
                container = t.labels.container,
                image = t.labels.image,
                flavour = t.lua.flavour_label(),
                "target added"
            );
            self.tracked.insert(
                t.pid,
                Tracked {
                    start_time: t.start_time,
                    labels: metric_labels(t),
                    lua: lua.cloned(),
                    vms: Vec::new(),
                    failures: HashMap::new(),
                    given_up: HashSet::new(),
                },
            );
        }
        let mut by_flavour: HashMap<&'static str, i64> = ["gc64", "gc32", "unknown", "native"]
            .into_iter()
            .map(|f| (f, 0))
            .collect();
        for t in snapshot.iter() {
            *by_flavour.entry(t.lua.flavour_label()).or_insert(0) += 1;
        }
        for (flavour, n) in by_flavour {
            shared
                .metrics
                .targets
                .get_or_create(&FlavourLabels {
                    flavour: LabelValue::fixed(flavour),
                })
                .set(n);
        }
        let groups: HashSet<Group> = snapshot
            .iter()
            .map(|t| Group::of(&metric_labels(t)))
            .collect();
        shared.aggregator.retain_groups(&groups);
    }

    fn tick(&mut self, shared: &Shared) {
        self.cache_gauges(shared);
        self.sampler.retire_learners();
        if let Some(off) = self.offcpu.as_mut() {
            off.retire_learners();
        }
        match self.sampler.counters() {
            Ok(counters) => {
                for c in Counter::ALL.into_iter().filter(|c| c.is_error()) {
                    self.bump(shared, c.name(), counters[c as usize]);
                }
            }
            Err(e) => tracing::debug!(error = %e, "reading BPF counters"),
        }
        let lua_errors: Vec<(&'static str, u64)> = self
            .builder
            .lua_errors()
            .iter()
            .map(|(k, v)| (*k, *v))
            .collect();
        for (reason, total) in lua_errors {
            self.bump(shared, reason, total);
        }
        let stats = self.builder.stats();
        for f in TraceFallback::ALL {
            self.bump(shared, f.name(), stats.trace_fallbacks[f.index()]);
        }
        self.refresh_heaps(shared);
        self.event_loops(shared);
        let lost = self.sampler.lost();
        let agg = &shared.aggregator;
        for (pid, total) in lost {
            let seen = self.lost_seen.entry(pid).or_insert(0);
            let delta = total.saturating_sub(*seen);
            *seen = total;
            if let Some(tr) = self.tracked.get(&pid) {
                agg.add_lost(&tr.labels, delta);
            }
        }
        agg.flush();
    }

    /// Moves the event-loop counts into the metrics, logs the new stalls, and forgets the
    /// loops of threads of processes no longer targets (in both sessions).
    fn event_loops(&mut self, shared: &Shared) {
        let threads = self.sampler.loop_threads();
        let tracked = &self.tracked;
        let (gone, stalls) = self.loops.update(
            &threads,
            |tgid| tracked.get(&tgid).map(|t| t.labels.clone()),
            &shared.metrics,
        );
        if !gone.is_empty() {
            self.sampler.forget_loop_threads(&gone);
        }
        if let Some(off) = self.offcpu.as_mut() {
            let gone: Vec<u32> = off
                .loop_threads()
                .into_iter()
                .filter(|(_, t)| !tracked.contains_key(&t.tgid))
                .map(|(tid, _)| tid)
                .collect();
            if !gone.is_empty() {
                off.forget_loop_threads(&gone);
            }
        }
        for s in &stalls {
            // Its samples arrived within its duration and a tick (the counts are read once a
            // second) before now; and up to a ring-buffer drain later, which the next stall
            // line of the worker may pick up.
            let since = Instant::now()
                .checked_sub(Duration::from_nanos(s.last_ns) + Duration::from_secs(1))
                .unwrap_or_else(Instant::now);
            let summary = shared.aggregator.stall_summary(s.pid, since);
            self.stall_log.log(s, summary.as_ref());
        }
    }

    /// Reads the heap size of every known VM of every target: sets the Lua memory gauge (the
    /// sum per label set) and the per-process view of `/targets` and captures.
    fn refresh_heaps(&mut self, shared: &Shared) {
        let mut view = HashMap::new();
        let mut sums: HashMap<TargetLabels, u64> = HashMap::new();
        for (pid, tr) in &mut self.tracked {
            let Some(lua) = &tr.lua else {
                continue;
            };
            if let Some(g) = self.sampler.lua_vm(*pid)
                && !tr.given_up.contains(&g)
            {
                tr.vms.retain(|v| *v != g);
                tr.vms.push(g);
                if tr.vms.len() > MAX_VMS_PER_PROCESS {
                    tr.vms.remove(0);
                }
            }
            if tr.vms.is_empty() {
                continue;
            }
            let mem = Memory::new(*pid);
            let mut total = None::<u64>;
            let mut failed = Vec::new();
            for g in &tr.vms {
                match heap::read(&mem, lua.flavour.layout(), *g) {
                    Ok(h) => {
                        *total.get_or_insert(0) += h.total;
                        tr.failures.remove(g);
                    }
                    Err(e) => {
                        // A process that just exited is not a failed read.
                        if process::exists(*pid) {
                            shared
                                .metrics
                                .lua_memory_errors
                                .get_or_create(&ReasonLabels {
                                    reason: LabelValue::fixed(e.reason()),
                                })
                                .inc();
                        }
                        let n = tr.failures.entry(*g).or_insert(0);
                        *n += 1;
                        if matches!(e, heap::HeapError::NotAVm { .. }) {
                            failed.push(*g);
                        } else if *n >= MAX_VM_FAILURES {
                            tracing::info!(
                                pid = *pid,
                                g = format_args!("{g:#x}"),
                                error = %e,
                                "Lua VM given up after {MAX_VM_FAILURES} failed reads in a row"
                            );
                            failed.push(*g);
                            if tr.given_up.len() >= MAX_GIVEN_UP {
                                tr.given_up.clear();
                            }
                            tr.given_up.insert(*g);
                        }
                    }
                }
            }
            // A VM that no longer checks out (closed), or keeps failing, is forgotten; only
            // one still kept is published (captures take it as the process's VM).
            tr.vms.retain(|g| !failed.contains(g));
            tr.failures.retain(|g, _| tr.vms.contains(g));
            let Some(&latest) = tr.vms.last() else {
                continue;
            };
            view.insert(
                *pid,
                VmMemory {
                    g: latest,
                    bytes: total,
                },
            );
            if let Some(t) = total {
                *sums.entry(tr.labels.clone()).or_insert(0) += t;
            }
        }
        let family = &shared.metrics.lua_memory;
        for gone in self.memory_series.iter().filter(|l| !sums.contains_key(*l)) {
            family.remove(gone);
        }
        for (labels, total) in &sums {
            family
                .get_or_create(labels)
                .set(i64::try_from(*total).unwrap_or(i64::MAX));
        }
        self.memory_series = sums.into_keys().collect();
        if let Ok(mut vms) = shared.lua_vms.write() {
            *vms = view;
        }
    }

    /// Adds the growth of a cumulative error counter to the metric.
    /// `apisix_profiler_cache_bytes`: what the caches fed by target memory and the retained
    /// windows hold, as counted for their `limits:` caps.
    fn cache_gauges(&self, shared: &Shared) {
        let (protos, labels, traces) = self.builder.cached_bytes();
        let (cpu, offcpu, stalls) = shared.aggregator.retained_bytes();
        for (cache, bytes) in [
            ("protos", protos),
            ("labels", labels),
            ("traces", traces),
            ("window_cpu", cpu),
            ("window_offcpu", offcpu),
            ("window_stalls", stalls),
        ] {
            shared
                .metrics
                .cache_bytes
                .get_or_create(&CacheLabels {
                    cache: LabelValue::fixed(cache),
                })
                .set(i64::try_from(bytes).unwrap_or(i64::MAX));
        }
    }

    fn bump(&mut self, shared: &Shared, reason: &'static str, total: u64) {
        let seen = self.counters_seen.entry(reason).or_insert(0);
        let delta = total.saturating_sub(*seen);
        *seen = total;
        let family = &shared.metrics.unwind_errors;
        let series = family.get_or_create(&ReasonLabels {
            reason: LabelValue::fixed(reason),
        });
        series.inc_by(delta);
    }
}

/// Starts the sampler (reporting on `started` that the thread runs) and runs until
/// `shared.stop`. A program the kernel refuses is not fatal: it is reported in
/// `shared.programs` (so in `/healthz`, `/targets` and the `bpf_program_loaded` gauge) and
/// the daemon keeps serving what did load: without the CPU sampler, only its HTTP endpoints
/// and on-demand captures of the modes that load.
pub fn run(
    shared: Arc<Shared>,
    snapshots: mpsc::Receiver<Snapshot>,
    started: std::sync::mpsc::SyncSender<Result<(), BpfError>>,
) {
    let frequency = shared.config.sampling.frequency_hz;
    let mut sampler = BpfSession::start(frequency);
    let offcpu_cfg = &shared.config.sampling.offcpu;
    let mut offcpu = offcpu_cfg
        .enabled
        .then(|| BpfSession::start_offcpu(offcpu_cfg.min_block_us));
    let stalls = &shared.config.sampling.stalls;
    let stall_ns = stalls.threshold_ms * 1_000_000;
    // Each session keeps its own loop map: its samples' ages come from it.
    let event_loop = stalls.enabled.then(|| {
        match sampler.as_mut() {
            Ok(s) => s.attach_event_loop(stall_ns).map(drop),
            Err(_) => Err(BpfError::Missing {
                what: "the CPU sampler, whose session follows the event loops",
            }),
        }
        .and_then(|()| match offcpu.as_mut() {
            Some(Ok(o)) => o.attach_event_loop(stall_ns).map(drop),
            _ => Ok(()),
        })
    });
    if let Some(Err(e)) = &event_loop {
        tracing::warn!(error = %error_chain(e), "no event-loop iterations or stalls");
    }
    let report =
        |r: &Result<BpfSession, BpfError>| r.as_ref().map(|_| ()).map_err(|e| error_chain(e));
    {
        let mut status = shared.programs.write().unwrap_or_else(|e| e.into_inner());
        status.kernel = sampler
            .as_ref()
            .ok()
            .or_else(|| offcpu.as_ref().and_then(|o| o.as_ref().ok()))
            .map(|s| s.kernel().clone());
        status.cpu = Some(report(&sampler));
        status.offcpu = offcpu.as_ref().map(report);
        status.event_loop = event_loop.map(|r| r.map_err(|e| error_chain(&e)));
        for (program, outcome) in [
            ("cpu_sampler", &status.cpu),
            ("offcpu", &status.offcpu),
            ("event_loop", &status.event_loop),
        ] {
            if let Some(outcome) = outcome {
                shared
                    .metrics
                    .bpf_programs
                    .get_or_create(&ProgramLabels {
                        program: LabelValue::fixed(program),
                    })
                    .set(i64::from(outcome.is_ok()));
            }
        }
        if let Some(why) = status.failure() {
            tracing::error!(error = %why, "the daemon runs without what the kernel refused (see /healthz)");
        }
    }
    let _ = started.send(Ok(()));
    let offcpu = match offcpu {
        Some(Ok(s)) => {
            tracing::info!(
                min_block_us = offcpu_cfg.min_block_us,
                "off-CPU tracing attached"
            );
            Some(s)
        }
        _ => None,
    };
    match sampler {
        Ok(sampler) => run_with(&shared, &snapshots, sampler, offcpu),
        // Nothing to sample: drain the snapshots until shutdown.
        Err(_) => {
            while !shared.stop.load(Ordering::Relaxed) {
                while snapshots.try_recv().is_ok() {}
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }
}

/// Runs the sampler thread's loop over `sampler` (and `offcpu`, when given) until
/// `shared.stop`: applies snapshots, builds and aggregates stacks, moves counters into
/// metrics once a second. [`run`] calls it with the BPF sessions; root-free tests with a
/// [`crate::sampling::source::ReplaySource`].
pub fn run_with<S: SampleSource>(
    shared: &Shared,
    snapshots: &mpsc::Receiver<Snapshot>,
    sampler: S,
    offcpu: Option<S>,
) {
    let frequency = shared.config.sampling.frequency_hz;
    shared
        .metrics
        .frequency
        .set(i64::try_from(frequency).unwrap_or(i64::MAX));
    shared.attached.store(true, Ordering::SeqCst);
    tracing::info!(frequency_hz = frequency, "continuous sampler attached");
    let mut state = State {
        sampler,
        offcpu,
        builder: {
            let mut b = StackBuilder::new(StackOptions::default());
            b.set_cache_limits(shared.config.limits.caches());
            b
        },
        tracked: HashMap::new(),
        counters_seen: HashMap::new(),
        lost_seen: HashMap::new(),
        memory_series: HashSet::new(),
        loops: LoopTracker::default(),
        stall_log: StallLog::default(),
    };
    let mut last_tick = Instant::now();
    // With each sample: its VM state (CPU) or blocked time (off-CPU), and the age of its
    // event-loop iteration when that makes it a stall sample.
    let mut batch: Vec<(Built, Option<VmState>, Option<u64>)> = Vec::new();
    let mut blocked: Vec<(Built, u64, Option<u64>)> = Vec::new();
    let stall_ns = shared.config.sampling.stalls.threshold_ms * 1_000_000;
    let stall = move |s: &apisix_ebpf_common::Sample| {
        (s.iteration_ns >= stall_ns).then_some(s.iteration_ns)
    };
    while !shared.stop.load(Ordering::Relaxed) {
        let mut latest = None;
        while let Ok(s) = snapshots.try_recv() {
            latest = Some(s);
        }
        if let Some(s) = latest {
            state.apply(shared, &s);
        }
        let State {
            sampler,
            offcpu,
            builder,
            tracked,
            ..
        } = &mut state;
        // Samples of a target just removed can still be in the ring buffer: building them
        // would load the process again (an old nginx worker lives on for a moment), and
        // nothing would forget it: its files and caches would stay for good.
        sampler.poll(Duration::from_millis(200), &mut |s| {
            if !tracked.contains_key(&s.pid) {
                return;
            }
            if let Some(stack) = builder.build(s) {
                let details = builder.last_details().to_vec();
                batch.push(((s.pid, stack, details), builder.last_vm_state(), stall(s)));
            }
        });
        if let Some(off) = offcpu.as_mut() {
            off.poll(Duration::ZERO, &mut |s| {
                if !tracked.contains_key(&s.pid) {
                    return;
                }
                if let Some(stack) = builder.build(s) {
                    let details = builder.last_details().to_vec();
                    blocked.push(((s.pid, stack, details), s.weight, stall(s)));
                }
            });
        }
        state.hand_over(shared, &mut batch, &mut blocked);
        batch.clear();
        blocked.clear();
        if last_tick.elapsed() >= Duration::from_secs(1) {
            last_tick = Instant::now();
            state.tick(shared);
        }
    }
    shared.attached.store(false, Ordering::SeqCst);
    drop(state);
    tracing::info!("continuous sampler detached");
}
