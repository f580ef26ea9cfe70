//! The seam between the samplers and the BPF side: [`SampleSource`] is what
//! the daemon's continuous sampler thread needs (targets in and out, samples, counters, lost samples),
//! and [`CaptureSource`] what a bounded capture ([`super::capture`]) needs on top (starting
//! the mode's programs once the targets are set, the allocator probes, the live blocks).
//! [`BpfSession`] implements both for real; [`ReplaySource`] replays samples (and live
//! blocks) handed to it, so the sampler thread's bookkeeping, the aggregation, the HTTP router
//! and every capture mode get tests that run without root. Root tests always use the real
//! session.
//!
//! Hooks: those of [`BpfSession`] (none for [`ReplaySource`]). Metrics: none of its own.

use std::{
    collections::{HashMap, HashSet, VecDeque},
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use apisix_ebpf_common::{COUNTER_SLOTS, Counter, LiveAlloc, Sample};

use super::{
    alloc::{self, AllocError, AllocProbe},
    bpf::{BpfError, BpfSession},
    kernel::KernelReport,
};
use crate::luajit::LuaTarget;

/// Counter values indexed by [`Counter`].
pub type Counters = [u64; COUNTER_SLOTS as usize];

/// Where the continuous sampler gets its samples from.
pub trait SampleSource {
    /// Starts sampling process `pid`, walking its Lua stacks when `lua` is given.
    fn add_process(&mut self, pid: u32, lua: Option<&LuaTarget>) -> Result<(), BpfError>;
    /// Stops sampling process `pid`.
    fn remove_target(&mut self, pid: u32);
    /// Housekeeping once a second (detaching helpers no longer needed).
    fn retire_learners(&mut self);
    /// Cumulative outcome counters.
    fn counters(&self) -> Result<Counters, BpfError>;
    /// Cumulative samples lost per process.
    fn lost(&self) -> HashMap<u32, u64>;
    /// Waits up to `timeout` for samples, then hands each one to `f`. Returns how many.
    fn poll(&mut self, timeout: Duration, f: &mut dyn FnMut(&Sample)) -> usize;
    /// The `global_State` address learned for process `pid`, if any.
    fn lua_vm(&self, pid: u32) -> Option<u64>;
}

impl SampleSource for BpfSession {
    fn add_process(&mut self, pid: u32, lua: Option<&LuaTarget>) -> Result<(), BpfError> {
        BpfSession::add_process(self, pid, lua)
    }

    fn remove_target(&mut self, pid: u32) {
        BpfSession::remove_target(self, pid);
    }

    fn retire_learners(&mut self) {
        BpfSession::retire_learners(self);
    }

    fn counters(&self) -> Result<Counters, BpfError> {
        BpfSession::counters(self)
    }

    fn lost(&self) -> HashMap<u32, u64> {
        BpfSession::lost(self)
    }

    fn poll(&mut self, timeout: Duration, f: &mut dyn FnMut(&Sample)) -> usize {
        BpfSession::poll(self, timeout, f)
    }

    fn lua_vm(&self, pid: u32) -> Option<u64> {
        BpfSession::lua_vm(self, pid)
    }
}

/// What a bounded capture needs of the BPF side beyond [`SampleSource`]. A source is opened
/// for one mode, with its programs loaded and held; the capture adds its targets, then starts
/// the mode ([`Self::attach_cpu`], [`Self::set_offcpu_min`] or [`Self::release_alloc`]).
pub trait CaptureSource: SampleSource {
    /// Tells the BPF side the VM of process `pid` is at `g` (learned before).
    fn set_vm(&mut self, pid: u32, g: u64) -> Result<(), BpfError>;
    /// CPU mode: starts sampling every CPU.
    fn attach_cpu(&mut self) -> Result<(), BpfError>;
    /// Off-CPU mode: starts keeping blocks of at least `min_block_us`.
    fn set_offcpu_min(&mut self, min_block_us: u64) -> Result<(), BpfError>;
    /// Where to probe the allocator of `pid` (whose LuaJIT is `lua`, VM unknown after
    /// `waited_secs`: `None` for `g`).
    fn resolve_alloc(
        &self,
        pid: u32,
        lua: Option<&LuaTarget>,
        waited_secs: u64,
    ) -> Result<AllocProbe, AllocError>;
    /// Attaches the allocator probes where `probe` says.
    fn attach_alloc(&mut self, probe: &AllocProbe) -> Result<(), BpfError>;
    /// Alloc modes: starts counting and sampling allocations.
    fn release_alloc(&mut self) -> Result<(), BpfError>;
    /// Live mode: stops sampling, still follows frees.
    fn settle_alloc(&mut self) -> Result<(), BpfError>;
    /// Stops counting and tracking: the live blocks stay as they are.
    fn hold_alloc(&mut self) -> Result<(), BpfError>;
    /// Detaches the allocator probes.
    fn detach_alloc(&mut self);
    /// Live mode: the sampled blocks still allocated (address, sample identity, weight).
    fn live_allocs(&self) -> Result<Vec<(u64, LiveAlloc)>, BpfError>;
    /// What the kernel offered the programs.
    fn kernel(&self) -> KernelReport;
}

impl CaptureSource for BpfSession {
    fn set_vm(&mut self, pid: u32, g: u64) -> Result<(), BpfError> {
        BpfSession::set_vm(self, pid, g)
    }

    fn attach_cpu(&mut self) -> Result<(), BpfError> {
        BpfSession::attach_cpu(self)
    }

    fn set_offcpu_min(&mut self, min_block_us: u64) -> Result<(), BpfError> {
        BpfSession::set_offcpu_min(self, min_block_us)
    }

    fn resolve_alloc(
        &self,
        pid: u32,
        lua: Option<&LuaTarget>,
        waited_secs: u64,
    ) -> Result<AllocProbe, AllocError> {
        match (lua, self.lua_vm(pid)) {
            (None, _) => Err(AllocError::NoLuaJit { pid }),
            (Some(_), None) => Err(AllocError::NoVm { pid, waited_secs }),
            (Some(lua), Some(g)) => alloc::resolve(pid, lua, g),
        }
    }

    fn attach_alloc(&mut self, probe: &AllocProbe) -> Result<(), BpfError> {
        BpfSession::attach_alloc(self, probe.pid, &probe.file, probe.offset)
    }

    fn release_alloc(&mut self) -> Result<(), BpfError> {
        BpfSession::release_alloc(self)
    }

    fn settle_alloc(&mut self) -> Result<(), BpfError> {
        BpfSession::settle_alloc(self)
    }

    fn hold_alloc(&mut self) -> Result<(), BpfError> {
        BpfSession::hold_alloc(self)
    }

    fn detach_alloc(&mut self) {
        BpfSession::detach_alloc(self);
    }

    fn live_allocs(&self) -> Result<Vec<(u64, LiveAlloc)>, BpfError> {
        BpfSession::live_allocs(self)
    }

    fn kernel(&self) -> KernelReport {
        BpfSession::kernel(self).clone()
    }
}

#[derive(Default)]
struct Replay {
    queue: VecDeque<Box<Sample>>,
    targets: HashSet<u32>,
    counters: Counters,
    lost: HashMap<u32, u64>,
    vms: HashMap<u32, u64>,
    /// Live blocks by address, as the allocator probes would track them.
    live: HashMap<u64, LiveAlloc>,
    /// What the capture asked for so far, in order (`attach_cpu`, `release_alloc`, …).
    calls: Vec<String>,
}

/// Replays the samples pushed into it, as if the BPF side had written them: only samples of
/// added targets come out (the others count as nothing, like untargeted processes), each
/// counts in [`Counter::Samples`]. Clones share one queue, so a test keeps a handle while
/// the sampler thread owns another.
#[derive(Debug, Clone, Default)]
pub struct ReplaySource {
    inner: Arc<Mutex<Replay>>,
}

impl std::fmt::Debug for Replay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replay")
            .field("queued", &self.queue.len())
            .field("targets", &self.targets)
            .finish_non_exhaustive()
    }
}

impl ReplaySource {
    /// An empty source.
    pub fn new() -> Self {
        Self::default()
    }

    fn with<T>(&self, f: impl FnOnce(&mut Replay) -> T) -> T {
        f(&mut self.inner.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// Queues one sample for the next poll.
    pub fn push(&self, sample: Box<Sample>) {
        self.with(|r| r.queue.push_back(sample));
    }

    /// The processes currently added, sorted.
    pub fn targets(&self) -> Vec<u32> {
        let mut pids: Vec<u32> = self.with(|r| r.targets.iter().copied().collect());
        pids.sort_unstable();
        pids
    }

    /// Sets the cumulative lost samples of `pid`.
    pub fn set_lost(&self, pid: u32, lost: u64) {
        self.with(|r| r.lost.insert(pid, lost));
    }

    /// Says the VM of `pid` is at `g` (as the BPF side would have learned it).
    pub fn set_vm(&self, pid: u32, g: u64) {
        self.with(|r| r.vms.insert(pid, g));
    }

    /// Adds `n` to counter `c`.
    pub fn count(&self, c: Counter, n: u64) {
        self.with(|r| r.counters[c as usize] += n);
    }

    /// Samples still queued.
    pub fn pending(&self) -> usize {
        self.with(|r| r.queue.len())
    }

    /// Says the block at `addr` is still allocated, sampled by `sample` (its thread and
    /// time), standing for `weight` bytes.
    pub fn set_live(&self, addr: u64, sample: &Sample, weight: u64) {
        let block = LiveAlloc {
            time_ns: sample.time_ns,
            weight,
            tid: sample.tid,
            reserved: 0,
        };
        self.with(|r| r.live.insert(addr, block));
    }

    /// Says the block at `addr` was freed.
    pub fn free(&self, addr: u64) {
        self.with(|r| {
            if r.live.remove(&addr).is_some() {
                r.counters[Counter::LiveFreed as usize] += 1;
            }
        });
    }

    /// What a capture asked of this source so far, in order.
    pub fn calls(&self) -> Vec<String> {
        self.with(|r| r.calls.clone())
    }

    fn call(&self, what: String) {
        self.with(|r| r.calls.push(what));
    }
}

impl SampleSource for ReplaySource {
    fn add_process(&mut self, pid: u32, _lua: Option<&LuaTarget>) -> Result<(), BpfError> {
        self.with(|r| r.targets.insert(pid));
        Ok(())
    }

    fn remove_target(&mut self, pid: u32) {
        self.with(|r| {
            r.targets.remove(&pid);
            r.lost.remove(&pid);
            r.vms.remove(&pid);
        });
    }

    fn retire_learners(&mut self) {}

    fn counters(&self) -> Result<Counters, BpfError> {
        Ok(self.with(|r| r.counters))
    }

    fn lost(&self) -> HashMap<u32, u64> {
        self.with(|r| r.lost.clone())
    }

    fn poll(&mut self, timeout: Duration, f: &mut dyn FnMut(&Sample)) -> usize {
        let batch: Vec<Box<Sample>> = self.with(|r| {
            let targets = &r.targets;
            let taken: Vec<Box<Sample>> = r
                .queue
                .drain(..)
                .filter(|s| targets.contains(&s.pid))
                .collect();
            r.counters[Counter::Samples as usize] += taken.len() as u64;
            taken
        });
        if batch.is_empty() {
            std::thread::sleep(timeout.min(Duration::from_millis(20)));
        }
        for s in &batch {
            f(s);
        }
        batch.len()
    }

    fn lua_vm(&self, pid: u32) -> Option<u64> {
        self.with(|r| r.vms.get(&pid).copied())
    }
}

impl CaptureSource for ReplaySource {
    fn set_vm(&mut self, pid: u32, g: u64) -> Result<(), BpfError> {
        ReplaySource::set_vm(self, pid, g);
        Ok(())
    }

    fn attach_cpu(&mut self) -> Result<(), BpfError> {
        self.call("attach_cpu".into());
        Ok(())
    }

    fn set_offcpu_min(&mut self, min_block_us: u64) -> Result<(), BpfError> {
        self.call(format!("set_offcpu_min {min_block_us}"));
        Ok(())
    }

    /// Any process whose VM is known can be "probed": nothing is read from it.
    fn resolve_alloc(
        &self,
        pid: u32,
        _lua: Option<&LuaTarget>,
        waited_secs: u64,
    ) -> Result<AllocProbe, AllocError> {
        let g = self
            .lua_vm(pid)
            .ok_or(AllocError::NoVm { pid, waited_secs })?;
        Ok(AllocProbe {
            pid,
            g,
            allocf: 0,
            module: "[replay]".to_owned(),
            file: std::path::PathBuf::new(),
            offset: 0,
            heap_bytes: 0,
        })
    }

    fn attach_alloc(&mut self, probe: &AllocProbe) -> Result<(), BpfError> {
        self.call(format!("attach_alloc {}", probe.pid));
        Ok(())
    }

    fn release_alloc(&mut self) -> Result<(), BpfError> {
        self.call("release_alloc".into());
        Ok(())
    }

    fn settle_alloc(&mut self) -> Result<(), BpfError> {
        self.call("settle_alloc".into());
        Ok(())
    }

    fn hold_alloc(&mut self) -> Result<(), BpfError> {
        self.call("hold_alloc".into());
        Ok(())
    }

    fn detach_alloc(&mut self) {
        self.call("detach_alloc".into());
    }

    fn live_allocs(&self) -> Result<Vec<(u64, LiveAlloc)>, BpfError> {
        Ok(self.with(|r| r.live.iter().map(|(a, b)| (*a, *b)).collect()))
    }

    /// No kernel: the release says so.
    fn kernel(&self) -> KernelReport {
        let variant = super::kernel::WalkVariant::BpfLoop;
        KernelReport {
            release: "replay".to_owned(),
            lua_walk: variant,
            max_lua_frames: variant.max_lua_frames(),
            btf: false,
            kernel_mode_samples: false,
            task_state: false,
            btf_error: None,
        }
    }
}

/// A zeroed sample of thread `pid` at instruction `ip`, with no stack copy, no kernel stack
/// and no Lua frames: fill in what a test needs.
pub fn blank_sample(pid: u32, ip: u64) -> Box<Sample> {
    // SAFETY: `Sample` is plain `#[repr(C)]` data of integers; all zeros is a valid value.
    let mut s: Box<Sample> = unsafe { Box::<Sample>::new_zeroed().assume_init() };
    s.pid = pid;
    s.tid = pid;
    s.regs.ip = ip;
    s.weight = 1;
    s
}
