//! The recent-sample windows of the continuous sampler, for `/flamegraph` without `seconds`
//! and for `/debug/pprof/*`: each sample with the instant it reached the aggregator, its
//! process, target, frame details and plugin, for `sampling.retention_seconds`, at most
//! `sampling.max_retained_samples` samples and `limits.retained_window_bytes` bytes (counted
//! by [`Recent::bytes`]); off-CPU blocks, when enabled, in a second window of the same bounds.
//! Stacks, details, targets and attributions are interned, so a repeated one costs a pointer.
//!
//! Storage: a window is a list of sealed chunks (`Arc<[Recent]>`, [`CHUNK`] samples each,
//! immutable) and one open chunk the sampler appends to. A reader takes [`Windows::snapshot`]
//! under the lock: a copy of the chunk pointers and of the open chunk's samples (at most
//! [`CHUNK`]), so the sampler never waits for more than that; the reader cuts and folds the
//! snapshot with no lock held. Eviction (oldest first, by age, count or bytes) moves a start
//! index in the oldest chunk and drops a chunk when its last sample goes; so a window's memory
//! exceeds its count by less than one chunk, and a chunk a reader still holds is freed when the
//! reader lets go of it.
//!
//! [`WindowSnapshot::cut`] cuts a snapshot by arrival time, `(from, to]`: windows that meet
//! hold each sample exactly once (a scrape's window ends when it is served, so consecutive
//! pprof scrapes meet only as far as their intervals match `seconds`).
//!
//! Hooks: none. Metrics: none of its own; `apisix_profiler_cache_bytes{cache="window_*"}`
//! comes from [`Windows::retained_bytes`].

use std::{
    collections::{HashMap, HashSet, VecDeque},
    sync::Arc,
    time::{Duration, Instant},
};

use super::{
    super::metrics::TargetLabels,
    counters::{OTHER, PluginCaps},
};
use crate::{
    attribution::{Attribution, Filter},
    label::FrameDetail,
};

/// Samples per sealed chunk: the most a snapshot copies one by one.
pub const CHUNK: usize = 512;

/// How often interned stacks no retained sample holds are dropped.
const PRUNE_INTERVAL: Duration = Duration::from_secs(10);

/// Which retained window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retention {
    /// CPU samples (weight: 1 each).
    Cpu,
    /// Off-CPU blocks (weight: microseconds blocked), with `sampling.offcpu.enabled`.
    OffCpu,
}

/// One retained stack.
#[derive(Debug, Clone)]
pub struct Recent {
    /// When it reached the aggregator.
    at: Instant,
    pid: u32,
    /// Off-CPU: microseconds blocked (saturated); CPU samples: 1.
    weight: u32,
    target: Arc<TargetLabels>,
    stack: Arc<[Arc<str>]>,
    details: Arc<[FrameDetail]>,
    /// Its plugin and phase (computed for the metrics when it arrived).
    attribution: Arc<Attribution>,
}

impl Recent {
    /// Bytes this sample holds: itself and its size entry, its stack and details, and its
    /// share of each label's text (a label shared by `n` holders counts `len / n`, as counted
    /// when it arrives: a label unique to this sample counts whole).
    fn bytes(&self) -> usize {
        let labels: usize = self
            .stack
            .iter()
            .map(|l| l.len() / Arc::strong_count(l).max(1))
            .sum();
        // Stacks and details are interned: shared by the samples that have them.
        std::mem::size_of::<Self>()
            + std::mem::size_of::<usize>()
            + std::mem::size_of_val(&*self.stack) / Arc::strong_count(&self.stack).max(1)
            + std::mem::size_of_val(&*self.details) / Arc::strong_count(&self.details).max(1)
            + labels
    }
}

/// A sealed chunk, of which the samples before `start` are evicted.
#[derive(Debug)]
struct Sealed {
    samples: Arc<[Recent]>,
    sizes: Box<[usize]>,
    start: usize,
}

/// A retained window: CPU samples, or off-CPU blocks.
#[derive(Debug)]
struct Retained {
    /// Oldest first.
    sealed: VecDeque<Sealed>,
    open: Vec<Recent>,
    open_sizes: Vec<usize>,
    /// Samples retained (not evicted) in `sealed` and `open`.
    len: usize,
    /// Bytes counted for them.
    bytes: usize,
    /// When the newest sample dropped for `max_retained_samples` or the byte cap had arrived.
    evicted: Option<Instant>,
}

impl Retained {
    fn new() -> Self {
        Self {
            sealed: VecDeque::new(),
            open: Vec::with_capacity(CHUNK),
            open_sizes: Vec::with_capacity(CHUNK),
            len: 0,
            bytes: 0,
            evicted: None,
        }
    }

    /// Keeps `r`, dropping the oldest samples past `max` samples or `max_bytes` bytes.
    fn push(&mut self, r: Recent, max: usize, max_bytes: usize) {
        let size = r.bytes();
        self.open.push(r);
        self.open_sizes.push(size);
        self.len += 1;
        self.bytes += size;
        if self.open.len() >= CHUNK {
            self.seal();
        }
        while self.len > max || (self.bytes > max_bytes && self.len > 1) {
            match self.pop() {
                Some(at) => self.evicted = Some(at),
                None => break,
            }
        }
    }

    /// Moves the open chunk's samples into a sealed chunk.
    fn seal(&mut self) {
        if self.open.is_empty() {
            return;
        }
        let samples: Arc<[Recent]> = Arc::from(std::mem::take(&mut self.open));
        let sizes = std::mem::take(&mut self.open_sizes).into_boxed_slice();
        self.sealed.push_back(Sealed {
            samples,
            sizes,
            start: 0,
        });
        self.open.reserve(CHUNK);
        self.open_sizes.reserve(CHUNK);
    }

    /// When the oldest sample arrived.
    fn oldest(&self) -> Option<Instant> {
        match self.sealed.front() {
            Some(s) => s.samples.get(s.start).map(|r| r.at),
            None => self.open.first().map(|r| r.at),
        }
    }

    /// Evicts the oldest sample; when it arrived.
    fn pop(&mut self) -> Option<Instant> {
        if self.sealed.is_empty() {
            self.seal();
        }
        let front = self.sealed.front_mut()?;
        let at = front.samples.get(front.start)?.at;
        self.bytes = self
            .bytes
            .saturating_sub(front.sizes.get(front.start).copied().unwrap_or(0));
        self.len = self.len.saturating_sub(1);
        front.start += 1;
        if front.start >= front.samples.len() {
            self.sealed.pop_front();
        }
        Some(at)
    }

    fn expire(&mut self, now: Instant, retention: Duration) {
        while self
            .oldest()
            .is_some_and(|at| now.saturating_duration_since(at) > retention)
        {
            self.pop();
        }
    }
}

/// The retained windows (CPU, off-CPU) and the interned values their samples share.
#[derive(Debug)]
pub struct Windows {
    retention: Duration,
    max: usize,
    /// Bytes each window may hold (`limits.retained_window_bytes`).
    max_bytes: usize,
    cpu: Retained,
    offcpu: Retained,
    interned: HashSet<Arc<[Arc<str>]>>,
    interned_details: HashSet<Arc<[FrameDetail]>>,
    targets: HashSet<Arc<TargetLabels>>,
    attributions: HashSet<Arc<Attribution>>,
    /// When the windows were made: nothing was sampled before.
    started: Instant,
    /// When interned values were last pruned.
    pruned: Instant,
}

impl Windows {
    /// Windows of `retention`, at most `max` samples each.
    pub fn new(retention: Duration, max: usize) -> Self {
        Self {
            retention,
            max,
            max_bytes: usize::MAX,
            cpu: Retained::new(),
            offcpu: Retained::new(),
            interned: HashSet::new(),
            interned_details: HashSet::new(),
            targets: HashSet::new(),
            attributions: HashSet::new(),
            started: Instant::now(),
            pruned: Instant::now(),
        }
    }

    /// Caps each window at `bytes` (estimated: [`Recent::bytes`]); the oldest samples go
    /// first, as for `sampling.max_retained_samples`.
    pub fn set_retained_bytes(&mut self, bytes: usize) {
        self.max_bytes = bytes;
    }

    /// Bytes of the windows (CPU, off-CPU) as counted for their cap.
    pub fn retained_bytes(&self) -> (usize, usize) {
        (self.cpu.bytes, self.offcpu.bytes)
    }

    /// Samples the windows (CPU, off-CPU) hold.
    pub fn len(&self) -> (usize, usize) {
        (self.cpu.len, self.offcpu.len)
    }

    fn retained(&self, which: Retention) -> &Retained {
        match which {
            Retention::Cpu => &self.cpu,
            Retention::OffCpu => &self.offcpu,
        }
    }

    /// Keeps one sample of `which`, arrived now.
    #[expect(
        clippy::too_many_arguments,
        reason = "one retained sample: its every part"
    )]
    pub fn push(
        &mut self,
        which: Retention,
        pid: u32,
        target: &TargetLabels,
        stack: Vec<Arc<str>>,
        details: Vec<FrameDetail>,
        attribution: Attribution,
        weight: u32,
    ) {
        let r = Recent {
            at: Instant::now(),
            pid,
            weight,
            target: intern_one(&mut self.targets, target),
            stack: intern(&mut self.interned, stack),
            details: intern(&mut self.interned_details, details),
            attribution: intern_one(&mut self.attributions, &attribution),
        };
        let (max, max_bytes) = (self.max, self.max_bytes);
        match which {
            Retention::Cpu => self.cpu.push(r, max, max_bytes),
            Retention::OffCpu => self.offcpu.push(r, max, max_bytes),
        }
    }

    /// Drops the samples older than the retention at `now`; every [`PRUNE_INTERVAL`], the
    /// interned values no retained sample points at any more (a pass costs microseconds per
    /// thousand entries), so that the interned sets hold little more than the windows'
    /// distinct values.
    pub fn expire(&mut self, now: Instant) {
        self.cpu.expire(now, self.retention);
        self.offcpu.expire(now, self.retention);
        if now.saturating_duration_since(self.pruned) < PRUNE_INTERVAL {
            return;
        }
        self.pruned = now;
        if self.interned.len() > 1024 {
            self.interned.retain(|s| Arc::strong_count(s) > 1);
        }
        if self.interned_details.len() > 1024 {
            self.interned_details.retain(|s| Arc::strong_count(s) > 1);
        }
        if self.targets.len() > 64 {
            self.prune_targets();
        }
        if self.attributions.len() > 256 {
            self.attributions.retain(|a| Arc::strong_count(a) > 1);
        }
    }

    /// Drops the target labels (container names) no retained sample refers to any more.
    pub fn prune_targets(&mut self) {
        self.targets.retain(|t| Arc::strong_count(t) > 1);
    }

    /// Interned target labels (tests check that gone ones are dropped).
    pub fn interned_targets(&self) -> usize {
        self.targets.len()
    }

    /// The samples of `which` as they are now: pointers to the sealed chunks and a copy of the
    /// open one's samples. Plugins are not capped until [`WindowSnapshot::with_caps`].
    pub fn snapshot(&self, which: Retention) -> WindowSnapshot {
        let r = self.retained(which);
        WindowSnapshot {
            sealed: r
                .sealed
                .iter()
                .map(|s| (s.samples.clone(), s.start))
                .collect(),
            open: r.open.clone(),
            evicted: r.evicted,
            started: self.started,
            caps: Arc::new(PluginCaps::default()),
        }
    }
}

/// The interned copy of `v`.
fn intern<T: Eq + std::hash::Hash>(set: &mut HashSet<Arc<[T]>>, v: Vec<T>) -> Arc<[T]> {
    match set.get(v.as_slice()) {
        Some(s) => s.clone(),
        None => {
            let s: Arc<[T]> = Arc::from(v);
            set.insert(s.clone());
            s
        }
    }
}

/// The interned copy of `v`.
fn intern_one<T: Eq + Clone + std::hash::Hash>(set: &mut HashSet<Arc<T>>, v: &T) -> Arc<T> {
    match set.get(v) {
        Some(s) => s.clone(),
        None => {
            let s = Arc::new(v.clone());
            set.insert(s.clone());
            s
        }
    }
}

/// One distinct stack of a [`Window`].
#[derive(Debug, Clone)]
pub struct WindowStack {
    pub target: Arc<TargetLabels>,
    pub stack: Arc<[Arc<str>]>,
    pub details: Arc<[FrameDetail]>,
    /// Its plugin (capped like the plugin metrics: `[other]` beyond `top_functions`) and
    /// phase.
    pub attribution: Attribution,
    /// Samples or blocks.
    pub count: u64,
    /// Samples, or microseconds blocked.
    pub weight: u64,
}

/// The retained samples of a time range.
#[derive(Debug, Clone)]
pub struct Window {
    pub stacks: Vec<WindowStack>,
    /// Where the range's samples are complete: its start, or later when the agent started
    /// later or `sampling.max_retained_samples` dropped samples of the range.
    pub from: Instant,
    /// `sampling.max_retained_samples` dropped samples of the range.
    pub truncated: bool,
}

/// A window's samples at one instant, held by a reader with no lock: cut and fold it at
/// leisure. It keeps its chunks alive until dropped.
#[derive(Debug, Clone)]
pub struct WindowSnapshot {
    /// Sealed chunks, oldest first, each with its first retained sample.
    sealed: Vec<(Arc<[Recent]>, usize)>,
    open: Vec<Recent>,
    evicted: Option<Instant>,
    started: Instant,
    caps: Arc<PluginCaps>,
}

impl WindowSnapshot {
    /// This snapshot naming plugins as the metrics do under `caps`.
    pub fn with_caps(mut self, caps: Arc<PluginCaps>) -> Self {
        self.caps = caps;
        self
    }

    /// Samples in the snapshot.
    pub fn len(&self) -> usize {
        self.open.len()
            + self
                .sealed
                .iter()
                .map(|(c, start)| c.len().saturating_sub(*start))
                .sum::<usize>()
    }

    /// Whether the snapshot holds no sample.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The samples, newest first.
    fn newest_first(&self) -> impl Iterator<Item = &Recent> {
        self.open.iter().rev().chain(
            self.sealed
                .iter()
                .rev()
                .flat_map(|(c, start)| c.get(*start..).unwrap_or_default().iter().rev()),
        )
    }

    /// The stacks of the samples of the last `window` (before now) of the processes `keep`
    /// selects by (pid, container), that `filter` passes, one per sample, unfolded.
    pub fn recent_stacks(
        &self,
        window: Duration,
        keep: impl Fn(u32, &str) -> bool,
        filter: &Filter,
    ) -> Vec<Arc<[Arc<str>]>> {
        let now = Instant::now();
        let mut out = Vec::new();
        for r in self.newest_first() {
            if now.saturating_duration_since(r.at) > window {
                break;
            }
            if keep(r.pid, r.target.container.as_str()) && self.passes(filter, r) {
                out.push(r.stack.clone());
            }
        }
        out
    }

    /// The distinct stacks of the samples that arrived in `(from, to]`, of the processes
    /// `keep` selects by (pid, container), that `filter` passes.
    pub fn cut(
        &self,
        from: Instant,
        to: Instant,
        keep: impl Fn(u32, &str) -> bool,
        filter: &Filter,
    ) -> Window {
        type Key = (*const TargetLabels, *const [Arc<str>], *const [FrameDetail]);
        let mut index: HashMap<Key, usize> = HashMap::new();
        let mut stacks: Vec<WindowStack> = Vec::new();
        for r in self.newest_first() {
            if r.at > to {
                continue;
            }
            if r.at <= from {
                break;
            }
            if !keep(r.pid, r.target.container.as_str()) || !self.passes(filter, r) {
                continue;
            }
            let key = (
                Arc::as_ptr(&r.target),
                Arc::as_ptr(&r.stack),
                Arc::as_ptr(&r.details),
            );
            let i = *index.entry(key).or_insert_with(|| {
                stacks.push(WindowStack {
                    target: r.target.clone(),
                    stack: r.stack.clone(),
                    details: r.details.clone(),
                    attribution: self.caps.capped(&r.target, (*r.attribution).clone()),
                    count: 0,
                    weight: 0,
                });
                stacks.len() - 1
            });
            if let Some(s) = stacks.get_mut(i) {
                s.count += 1;
                s.weight += u64::from(r.weight);
            }
        }
        let truncated = self.evicted.is_some_and(|e| e > from);
        let from = [Some(from), Some(self.started), self.evicted]
            .into_iter()
            .flatten()
            .max()
            .unwrap_or(from)
            .min(to);
        Window {
            stacks,
            from,
            truncated,
        }
    }

    /// Whether `filter` passes a sample: by its plugin's own name, or by `[other]` when its
    /// group's plugin series are capped and it is counted there.
    fn passes(&self, filter: &Filter, r: &Recent) -> bool {
        filter.keeps(&r.attribution)
            || (filter.plugin.as_deref() == Some(OTHER)
                && filter.keeps(&self.caps.capped(&r.target, (*r.attribution).clone())))
    }
}
