//! The seam between the daemon's sampler thread and the BPF side: [`SampleSource`] is what
//! [`crate::daemon::continuous`] needs (targets in and out, samples, counters, lost samples).
//! [`BpfSession`] implements it for real; [`ReplaySource`] replays samples handed to it, so
//! the sampler thread's bookkeeping, the aggregation and the HTTP router get tests that run
//! without root. Root tests always use the real session.
//!
//! Hooks: those of [`BpfSession`] (none for [`ReplaySource`]). Metrics: none of its own.

use std::{
    collections::{HashMap, HashSet, VecDeque},
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use apisix_ebpf_common::{COUNTER_SLOTS, Counter, LoopThread, Sample};

use super::bpf::{BpfError, BpfSession};
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
    /// Each followed thread's event loop (cumulative counts), by thread id.
    fn loop_threads(&self) -> Vec<(u32, LoopThread)>;
    /// Forgets the event loops of threads `tids`.
    fn forget_loop_threads(&mut self, tids: &[u32]);
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

    fn loop_threads(&self) -> Vec<(u32, LoopThread)> {
        BpfSession::loop_threads(self)
    }

    fn forget_loop_threads(&mut self, tids: &[u32]) {
        BpfSession::forget_loop_threads(self, tids);
    }
}

#[derive(Default)]
struct Replay {
    queue: VecDeque<Box<Sample>>,
    targets: HashSet<u32>,
    counters: Counters,
    lost: HashMap<u32, u64>,
    vms: HashMap<u32, u64>,
    loops: HashMap<u32, LoopThread>,
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

    /// Sets the event loop of thread `tid` (cumulative, as the BPF side keeps it).
    pub fn set_loop_thread(&self, tid: u32, thread: LoopThread) {
        self.with(|r| r.loops.insert(tid, thread));
    }

    /// The threads whose event loop is still followed, sorted.
    pub fn loop_tids(&self) -> Vec<u32> {
        let mut tids: Vec<u32> = self.with(|r| r.loops.keys().copied().collect());
        tids.sort_unstable();
        tids
    }

    /// Adds `n` to counter `c`.
    pub fn count(&self, c: Counter, n: u64) {
        self.with(|r| r.counters[c as usize] += n);
    }

    /// Samples still queued.
    pub fn pending(&self) -> usize {
        self.with(|r| r.queue.len())
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

    fn loop_threads(&self) -> Vec<(u32, LoopThread)> {
        self.with(|r| r.loops.iter().map(|(t, l)| (*t, *l)).collect())
    }

    fn forget_loop_threads(&mut self, tids: &[u32]) {
        self.with(|r| {
            for tid in tids {
                r.loops.remove(tid);
            }
        });
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
