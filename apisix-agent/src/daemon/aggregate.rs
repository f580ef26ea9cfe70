//! Aggregation of continuously sampled stacks: per-function self and inclusive counters per
//! target group (container + image, or the host), with bounded cardinality, and a window of
//! recent stacks for `/flamegraph` without `seconds` and for `/debug/pprof/profile`.
//!
//! Cardinality: per group, the first `top_functions` Lua functions and as many C functions
//! (admitted once per flush, most samples first) get their own series for good; samples of
//! any other function go to `function="[other]"`. Series of groups gone for a minute are
//! removed. Stacks in the recent window are interned, so a repeated stack costs one pointer.
//!
//! The recent window keeps each sample with the instant it reached the aggregator, its target
//! and its frame details, for `sampling.retention_seconds` and at most
//! `sampling.max_retained_samples` samples (off-CPU blocks, when enabled, in a second window
//! of the same bounds). [`Aggregator::window`] cuts it by arrival time, `(from, to]`: windows
//! that meet hold each sample exactly once (a scrape's window ends when it is served, so
//! consecutive pprof scrapes meet only as far as their intervals match `seconds`).
//!
//! Stall samples — CPU samples (and, with off-CPU profiling, blocks) taken while their
//! worker's event-loop iteration was older than `sampling.stalls.threshold_ms` — are kept a
//! third time, in a stall window of the same bounds, each with the age of its iteration and
//! weighted in microseconds of stall time (a CPU sample: the sampling period; a block: the
//! time blocked), for `/flamegraph?mode=stalls`, `/debug/pprof/stalls` and the stall log
//! line ([`Aggregator::stall_summary`]).
//!
//! Each sample is also attributed to an APISIX plugin and request phase
//! ([`crate::attribution`]); per group, the first `top_functions` plugins get their own
//! series, the rest count as `plugin="[other]"`. Those counters are in seconds (samples ×
//! the sampling period; off-CPU: microseconds blocked).
//!
//! Hooks: none. Metrics: the per-function, per-plugin, per-phase and per-target families of
//! [`super::metrics`].

use std::{
    collections::{HashMap, HashSet, VecDeque},
    sync::Arc,
    time::{Duration, Instant},
};

use super::metrics::{
    CFunctionLabels, LabelValue, LuaFunctionLabels, Metrics, PhaseLabels, PluginLabels,
    TargetLabels, VmStateLabels,
};
use crate::{
    attribution::{Attribution, Filter, Phase, Rules},
    output::Folded,
    stacks::label::{FrameClass, FrameDetail, classify},
};

/// The label given to functions beyond the cardinality cap.
pub const OTHER: &str = "[other]";

/// A group of targets sharing metric labels.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Group {
    pub container: String,
    pub image: String,
}

impl Group {
    /// The group of a target.
    pub fn of(target: &TargetLabels) -> Self {
        Self {
            container: target.container.as_str().to_owned(),
            image: target.image.as_str().to_owned(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct LuaKey {
    function: String,
    file: String,
    line: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct CKey {
    function: String,
    module: String,
}

impl LuaKey {
    /// The series labels of this function in `group`.
    fn labels(self, group: &Group) -> LuaFunctionLabels {
        LuaFunctionLabels {
            function: self.function.into(),
            file: self.file.into(),
            line: self.line.into(),
            container: group.container.clone().into(),
            image: group.image.clone().into(),
        }
    }

    fn other() -> Self {
        Self {
            function: OTHER.to_owned(),
            file: String::new(),
            line: String::new(),
        }
    }
}

impl CKey {
    /// The series labels of this function in `group`.
    fn labels(self, group: &Group) -> CFunctionLabels {
        CFunctionLabels {
            function: self.function.into(),
            module: self.module.into(),
            container: group.container.clone().into(),
            image: group.image.clone().into(),
        }
    }

    fn other() -> Self {
        Self {
            function: OTHER.to_owned(),
            module: String::new(),
        }
    }
}

/// The key under which `key` is counted: itself if already admitted or if there is room
/// (then it is admitted for good), else the `[other]` key.
fn admit<K: Clone + Eq + std::hash::Hash>(
    admitted: &mut HashSet<K>,
    key: K,
    top: usize,
    other: fn() -> K,
) -> K {
    if admitted.contains(&key) || admitted.len() < top {
        admitted.insert(key.clone());
        key
    } else {
        other()
    }
}

#[derive(Debug, Default)]
struct Pending {
    lua: HashMap<LuaKey, (u64, u64)>,
    c: HashMap<CKey, (u64, u64)>,
}

#[derive(Debug, Default)]
struct Admitted {
    lua: HashSet<LuaKey>,
    c: HashSet<CKey>,
    processes: HashSet<String>,
    plugins: HashSet<String>,
}

/// One retained stack.
#[derive(Debug, Clone)]
struct Recent {
    /// When it reached the aggregator.
    at: Instant,
    pid: u32,
    /// Off-CPU: microseconds blocked (saturated); CPU samples: 1; stall samples:
    /// microseconds of stall time.
    weight: u32,
    /// Stall samples: the age of their event-loop iteration, in milliseconds (saturated);
    /// else 0.
    iteration_ms: u32,
    target: Arc<TargetLabels>,
    stack: Arc<[Arc<str>]>,
    details: Arc<[FrameDetail]>,
    /// Its plugin and phase (computed for the metrics when it arrived).
    attribution: Arc<Attribution>,
}

impl Recent {
    /// Bytes this sample holds: itself, its stack and details, and its share of each label's
    /// text (a label shared by `n` holders counts `len / n`, as counted when it arrives: a
    /// label unique to this sample counts whole).
    fn bytes(&self) -> usize {
        let labels: usize = self
            .stack
            .iter()
            .map(|l| l.len() / Arc::strong_count(l).max(1))
            .sum();
        // Stacks and details are interned: shared by the samples that have them.
        std::mem::size_of::<Self>()
            + std::mem::size_of_val(&*self.stack) / Arc::strong_count(&self.stack).max(1)
            + std::mem::size_of_val(&*self.details) / Arc::strong_count(&self.details).max(1)
            + labels
    }
}

/// A retained window: CPU samples, or off-CPU blocks.
#[derive(Debug)]
struct Retained {
    /// Each sample with the bytes counted for it.
    samples: VecDeque<Recent>,
    sizes: VecDeque<usize>,
    /// Sum of `sizes`.
    bytes: usize,
    /// When the newest sample dropped for `max_retained_samples` had arrived.
    evicted: Option<Instant>,
}

impl Retained {
    fn new() -> Self {
        Self {
            samples: VecDeque::new(),
            sizes: VecDeque::new(),
            bytes: 0,
            evicted: None,
        }
    }

    /// Keeps `r`, dropping the oldest samples past `max` samples or `max_bytes` bytes.
    fn push(&mut self, r: Recent, max: usize, max_bytes: usize) {
        let size = r.bytes();
        self.samples.push_back(r);
        self.sizes.push_back(size);
        self.bytes += size;
        while self.samples.len() > max || (self.bytes > max_bytes && self.samples.len() > 1) {
            if let Some(old) = self.pop() {
                self.evicted = Some(old.at);
            }
        }
    }

    fn pop(&mut self) -> Option<Recent> {
        let size = self.sizes.pop_front().unwrap_or(0);
        self.bytes = self.bytes.saturating_sub(size);
        self.samples.pop_front()
    }

    fn expire(&mut self, now: Instant, retention: Duration) {
        while self
            .samples
            .front()
            .is_some_and(|r| now.duration_since(r.at) > retention)
        {
            self.pop();
        }
    }
}

/// Which retained window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retention {
    /// CPU samples (weight: 1 each).
    Cpu,
    /// Off-CPU blocks (weight: microseconds blocked), with `sampling.offcpu.enabled`.
    OffCpu,
    /// Stall samples (weight: microseconds of stall time).
    Stalls,
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
    /// Samples, or microseconds blocked (or of stall time).
    pub weight: u64,
    /// Stall samples: the oldest event-loop iteration among them, in milliseconds.
    pub iteration_ms: u32,
}

/// What the stall samples of one worker since some instant mostly ran: for its log line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StallSummary {
    /// The innermost Lua source function most of them ran (a frame label; fast functions
    /// skipped), or empty when none ran one.
    pub top_frame: String,
    /// The plugin most of them were attributed to (empty: none).
    pub plugin: String,
    /// Their stall time, in microseconds.
    pub weight_us: u64,
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

/// The aggregator of the continuous sampler.
#[derive(Debug)]
pub struct Aggregator {
    metrics: Arc<Metrics>,
    top: usize,
    retention: Duration,
    max_recent: usize,
    /// Bytes the retained window may hold (`limits.retained_window_bytes`), per window.
    max_recent_bytes: usize,
    pending: HashMap<Group, Pending>,
    pending_samples: HashMap<TargetLabels, u64>,
    pending_offcpu: HashMap<(Group, LuaKey), u64>,
    /// Samples per plugin and phase.
    pending_plugins: HashMap<(Group, Attribution), u64>,
    /// Microseconds blocked per plugin and phase.
    pending_plugins_offcpu: HashMap<(Group, Attribution), u64>,
    rules: Arc<Rules>,
    /// Seconds one CPU sample stands for.
    period: f64,
    admitted: HashMap<Group, Admitted>,
    gone_since: HashMap<Group, Instant>,
    recent: Retained,
    recent_offcpu: Retained,
    recent_stalls: Retained,
    interned: HashSet<Arc<[Arc<str>]>>,
    interned_details: HashSet<Arc<[FrameDetail]>>,
    targets: HashSet<Arc<TargetLabels>>,
    attributions: HashSet<Arc<Attribution>>,
    /// When the aggregator was made: nothing was sampled before.
    started: Instant,
    /// When interned values were last pruned.
    pruned: Instant,
}

/// How long the series of a group outlive its last target.
const GROUP_GRACE: Duration = Duration::from_secs(60);

/// How often interned stacks no retained sample holds are dropped.
const PRUNE_INTERVAL: Duration = Duration::from_secs(10);

impl Aggregator {
    /// An aggregator updating `metrics`.
    pub fn new(metrics: Arc<Metrics>, top: usize, retention: Duration, max_recent: usize) -> Self {
        Self {
            metrics,
            top,
            retention,
            max_recent,
            max_recent_bytes: usize::MAX,
            pending: HashMap::new(),
            pending_samples: HashMap::new(),
            pending_offcpu: HashMap::new(),
            pending_plugins: HashMap::new(),
            pending_plugins_offcpu: HashMap::new(),
            rules: Arc::new(Rules::default()),
            period: 1.0 / 19.0,
            admitted: HashMap::new(),
            gone_since: HashMap::new(),
            recent: Retained::new(),
            recent_offcpu: Retained::new(),
            recent_stalls: Retained::new(),
            interned: HashSet::new(),
            interned_details: HashSet::new(),
            targets: HashSet::new(),
            attributions: HashSet::new(),
            started: Instant::now(),
            pruned: Instant::now(),
        }
    }

    /// Caps each retained window at `bytes` (estimated: [`Recent::bytes`]); the oldest
    /// samples go first, as for `sampling.max_retained_samples`.
    pub fn set_retained_bytes(&mut self, bytes: usize) {
        self.max_recent_bytes = bytes;
    }

    /// Bytes of the retained windows (CPU, off-CPU, stalls) as counted for their cap.
    pub fn retained_bytes(&self) -> (usize, usize, usize) {
        (
            self.recent.bytes,
            self.recent_offcpu.bytes,
            self.recent_stalls.bytes,
        )
    }

    /// Sets the plugin rules and the sampling rate (a sample counts 1 / `frequency_hz`
    /// seconds); by default the built-in rules at 19 Hz.
    pub fn set_attribution(&mut self, rules: Arc<Rules>, frequency_hz: u64) {
        self.rules = rules;
        self.period = 1.0 / frequency_hz.max(1) as f64;
    }

    /// The plugin rules in use.
    pub fn rules(&self) -> &Arc<Rules> {
        &self.rules
    }

    /// Adds one sampled stack (root first) of process `pid`. `module_of` names the module of
    /// a native frame label.
    pub fn add<'m>(
        &mut self,
        pid: u32,
        target: &TargetLabels,
        stack: Vec<Arc<str>>,
        module_of: impl Fn(&str) -> Option<&'m Arc<str>>,
    ) {
        self.add_detailed(pid, target, stack, Vec::new(), module_of);
    }

    /// [`Self::add`] with the details of the stack's frames (one per frame), kept in the
    /// recent window for pprof.
    pub fn add_detailed<'m>(
        &mut self,
        pid: u32,
        target: &TargetLabels,
        stack: Vec<Arc<str>>,
        details: Vec<FrameDetail>,
        module_of: impl Fn(&str) -> Option<&'m Arc<str>>,
    ) {
        *self.pending_samples.entry(target.clone()).or_insert(0) += 1;
        let group = Group::of(target);
        let attribution = self.rules.classify(&stack);
        *self
            .pending_plugins
            .entry((group.clone(), attribution.clone()))
            .or_insert(0) += 1;
        let pending = self.pending.entry(group).or_default();
        let mut lua_seen: HashSet<LuaKey> = HashSet::new();
        let mut c_seen: HashSet<CKey> = HashSet::new();
        let mut innermost_lua = None;
        let mut leaf_c = None;
        for label in stack.iter() {
            match classify(label) {
                FrameClass::Lua {
                    function,
                    file,
                    line,
                } => {
                    let key = LuaKey {
                        function: function.to_owned(),
                        file: file.to_owned(),
                        line: line.to_owned(),
                    };
                    innermost_lua = Some(key.clone());
                    leaf_c = None;
                    lua_seen.insert(key);
                }
                FrameClass::C { function } => {
                    let key = CKey {
                        function: function.to_owned(),
                        module: module_of(label).map(|m| m.to_string()).unwrap_or_default(),
                    };
                    leaf_c = Some(key.clone());
                    c_seen.insert(key);
                }
                FrameClass::Kernel => {}
            }
        }
        if let Some(k) = innermost_lua {
            pending.lua.entry(k).or_default().0 += 1;
        }
        if let Some(k) = leaf_c {
            pending.c.entry(k).or_default().0 += 1;
        }
        for k in lua_seen {
            pending.lua.entry(k).or_default().1 += 1;
        }
        for k in c_seen {
            pending.c.entry(k).or_default().1 += 1;
        }
        let sample = Remembered {
            pid,
            weight: 1,
            iteration_ms: 0,
        };
        self.remember(Retention::Cpu, sample, target, stack, details, attribution);
    }

    /// Keeps one stall sample of process `pid` in the stall window: a CPU sample weighing the
    /// sampling period, or a block of `blocked_us`, taken when its worker's event-loop
    /// iteration was `iteration_ns` old. Counted in no metric (its CPU sample or block is,
    /// on its own).
    pub fn add_stall(
        &mut self,
        pid: u32,
        target: &TargetLabels,
        stack: Vec<Arc<str>>,
        details: Vec<FrameDetail>,
        blocked_us: Option<u64>,
        iteration_ns: u64,
    ) {
        let attribution = self.rules.classify(&stack);
        let us = blocked_us.unwrap_or((self.period * 1e6).round() as u64);
        let sample = Remembered {
            pid,
            weight: u32::try_from(us.max(1)).unwrap_or(u32::MAX),
            iteration_ms: u32::try_from(iteration_ns / 1_000_000).unwrap_or(u32::MAX),
        };
        self.remember(
            Retention::Stalls,
            sample,
            target,
            stack,
            details,
            attribution,
        );
    }

    /// What the stall samples of process `pid` that arrived after `since` mostly ran: the
    /// innermost Lua frame and the plugin with the most stall time (`None`: no such sample).
    pub fn stall_summary(&self, pid: u32, since: Instant) -> Option<StallSummary> {
        let mut frames: HashMap<&str, u64> = HashMap::new();
        let mut plugins: HashMap<&str, u64> = HashMap::new();
        let mut total = 0;
        for r in self.recent_stalls.samples.iter().rev() {
            if r.at <= since {
                break;
            }
            if r.pid != pid {
                continue;
            }
            let w = u64::from(r.weight);
            total += w;
            // The innermost Lua function with a source (not `builtin:os.clock`): the code
            // that made the call.
            let innermost = r.stack.iter().rev().find(|l| {
                matches!(classify(l), FrameClass::Lua { file, .. }
                    if !file.is_empty() && file != "[builtin]")
            });
            *frames.entry(innermost.map_or("", |l| &**l)).or_insert(0) += w;
            *plugins.entry(r.attribution.plugin.as_str()).or_insert(0) += w;
        }
        let top = |m: HashMap<&str, u64>| {
            m.into_iter()
                .max_by(|a, b| a.1.cmp(&b.1).then(b.0.cmp(a.0)))
                .map(|(k, _)| k.to_owned())
                .unwrap_or_default()
        };
        (total > 0).then(|| StallSummary {
            top_frame: top(frames),
            plugin: top(plugins),
            weight_us: total,
        })
    }

    /// Adds one off-CPU block of `us` microseconds of process `pid` to the innermost Lua
    /// source function of `stack`: fast functions (`builtin:ffi.meta___call`,
    /// `builtin:io.read`) and markers are skipped, so the block lands on the Lua code that
    /// made the call. Idle `epoll_wait` blocks are dropped; blocks outside Lua are not
    /// counted in the metrics but kept in the off-CPU window (with `details`, one per frame).
    pub fn add_offcpu(
        &mut self,
        pid: u32,
        target: &TargetLabels,
        stack: Vec<Arc<str>>,
        details: Vec<FrameDetail>,
        us: u64,
    ) {
        if crate::sampling::capture::is_idle(&stack) {
            return;
        }
        let attribution = self.rules.classify(&stack);
        let innermost = stack.iter().rev().find_map(|l| match classify(l) {
            FrameClass::Lua {
                function,
                file,
                line,
            } if !file.is_empty() && file != "[builtin]" => Some(LuaKey {
                function: function.to_owned(),
                file: file.to_owned(),
                line: line.to_owned(),
            }),
            _ => None,
        });
        if let Some(key) = innermost {
            let group = Group::of(target);
            *self
                .pending_plugins_offcpu
                .entry((group.clone(), attribution.clone()))
                .or_insert(0) += us;
            *self.pending_offcpu.entry((group, key)).or_insert(0) += us;
        }
        let sample = Remembered {
            pid,
            weight: u32::try_from(us).unwrap_or(u32::MAX),
            iteration_ms: 0,
        };
        self.remember(
            Retention::OffCpu,
            sample,
            target,
            stack,
            details,
            attribution,
        );
    }

    fn remember(
        &mut self,
        which: Retention,
        sample: Remembered,
        target: &TargetLabels,
        stack: Vec<Arc<str>>,
        details: Vec<FrameDetail>,
        attribution: Attribution,
    ) {
        let stack = intern(&mut self.interned, stack);
        let details = intern(&mut self.interned_details, details);
        let attribution = match self.attributions.get(&attribution) {
            Some(a) => a.clone(),
            None => {
                let a = Arc::new(attribution);
                self.attributions.insert(a.clone());
                a
            }
        };
        let target = match self.targets.get(target) {
            Some(t) => t.clone(),
            None => {
                let t = Arc::new(target.clone());
                self.targets.insert(t.clone());
                t
            }
        };
        let r = Recent {
            at: Instant::now(),
            pid: sample.pid,
            weight: sample.weight,
            iteration_ms: sample.iteration_ms,
            target,
            stack,
            details,
            attribution,
        };
        match which {
            Retention::Cpu => self.recent.push(r, self.max_recent, self.max_recent_bytes),
            Retention::OffCpu => {
                self.recent_offcpu
                    .push(r, self.max_recent, self.max_recent_bytes);
            }
            Retention::Stalls => {
                self.recent_stalls
                    .push(r, self.max_recent, self.max_recent_bytes);
            }
        }
    }

    /// Adds samples lost for a target.
    pub fn add_lost(&mut self, target: &TargetLabels, n: u64) {
        if n > 0 {
            self.metrics.lost.get_or_create(target).inc_by(n);
        }
    }

    /// Moves pending counts into the metrics, admitting new functions while there is room.
    pub fn flush(&mut self) {
        for (target, n) in self.pending_samples.drain() {
            self.metrics.samples.get_or_create(&target).inc_by(n);
            // The lost series exists from the first sample on, so rates over it are 0, not
            // absent, until a loss happens.
            drop(self.metrics.lost.get_or_create(&target));
            let group = Group::of(&target);
            self.admitted
                .entry(group)
                .or_default()
                .processes
                .insert(target.process.as_str().to_owned());
        }
        for (group, pending) in self.pending.drain() {
            let admitted = self.admitted.entry(group.clone()).or_default();
            let mut lua: Vec<(LuaKey, (u64, u64))> = pending.lua.into_iter().collect();
            lua.sort_by(|a, b| b.1.1.cmp(&a.1.1).then(b.1.0.cmp(&a.1.0)));
            for (key, (self_n, incl_n)) in lua {
                let key = admit(&mut admitted.lua, key, self.top, LuaKey::other);
                let labels = key.labels(&group);
                // Both series exist for every admitted function, so ratios never miss one.
                self.metrics.lua_self.get_or_create(&labels).inc_by(self_n);
                self.metrics
                    .lua_inclusive
                    .get_or_create(&labels)
                    .inc_by(incl_n);
            }
            let mut c: Vec<(CKey, (u64, u64))> = pending.c.into_iter().collect();
            c.sort_by(|a, b| b.1.0.cmp(&a.1.0).then(b.1.1.cmp(&a.1.1)));
            for (key, (self_n, incl_n)) in c {
                let key = admit(&mut admitted.c, key, self.top, CKey::other);
                let labels = key.labels(&group);
                self.metrics.c_self.get_or_create(&labels).inc_by(self_n);
                self.metrics
                    .c_inclusive
                    .get_or_create(&labels)
                    .inc_by(incl_n);
            }
        }
        for ((group, key), us) in self.pending_offcpu.drain() {
            let admitted = self.admitted.entry(group.clone()).or_default();
            let key = admit(&mut admitted.lua, key, self.top, LuaKey::other);
            let labels = key.labels(&group);
            self.metrics
                .lua_offcpu
                .get_or_create(&labels)
                .inc_by(us as f64 / 1e6);
        }
        self.flush_plugins();
        self.expire_recent();
    }

    /// Moves the per-plugin and per-phase counts into the metrics.
    fn flush_plugins(&mut self) {
        let mut cpu: Vec<((Group, Attribution), u64)> = self.pending_plugins.drain().collect();
        cpu.sort_by_key(|c| std::cmp::Reverse(c.1));
        for ((group, a), n) in cpu {
            let seconds = n as f64 * self.period;
            let (plugin, phase) = self.plugin_labels(&group, a);
            self.metrics
                .plugin_cpu
                .get_or_create(&plugin)
                .inc_by(seconds);
            self.metrics.phase_cpu.get_or_create(&phase).inc_by(seconds);
        }
        let off: Vec<((Group, Attribution), u64)> = self.pending_plugins_offcpu.drain().collect();
        for ((group, a), us) in off {
            let seconds = us as f64 / 1e6;
            let (plugin, phase) = self.plugin_labels(&group, a);
            self.metrics
                .plugin_offcpu
                .get_or_create(&plugin)
                .inc_by(seconds);
            self.metrics
                .phase_offcpu
                .get_or_create(&phase)
                .inc_by(seconds);
        }
    }

    /// The series labels of an attribution in `group`, admitting the plugin while there is
    /// room.
    fn plugin_labels(&mut self, group: &Group, a: Attribution) -> (PluginLabels, PhaseLabels) {
        let admitted = self.admitted.entry(group.clone()).or_default();
        // `[core]` and "" (no Lua) always have their series; only plugin names count
        // against the cap.
        let plugin = if a.plugin.is_empty() || a.plugin == crate::attribution::CORE {
            a.plugin
        } else {
            admit(&mut admitted.plugins, a.plugin, self.top, || {
                OTHER.to_owned()
            })
        };
        (
            PluginLabels {
                plugin: plugin.into(),
                phase: LabelValue::fixed(a.phase.name()),
                container: group.container.clone().into(),
                image: group.image.clone().into(),
            },
            PhaseLabels {
                phase: LabelValue::fixed(a.phase.name()),
                container: group.container.clone().into(),
                image: group.image.clone().into(),
            },
        )
    }

    fn expire_recent(&mut self) {
        let now = Instant::now();
        self.recent.expire(now, self.retention);
        self.recent_offcpu.expire(now, self.retention);
        self.recent_stalls.expire(now, self.retention);
        // Stacks, details and targets no retained sample points at any more: every
        // PRUNE_INTERVAL (a pass costs microseconds per thousand entries), so that the
        // interned sets hold little more than the window's distinct stacks.
        if now.duration_since(self.pruned) < PRUNE_INTERVAL {
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
            self.targets.retain(|t| Arc::strong_count(t) > 1);
        }
        if self.attributions.len() > 256 {
            self.attributions.retain(|a| Arc::strong_count(a) > 1);
        }
    }

    /// Tells which groups still have targets; series of groups gone for longer than a
    /// minute are removed.
    pub fn retain_groups(&mut self, live: &HashSet<Group>) {
        let now = Instant::now();
        for g in self.admitted.keys() {
            if live.contains(g) {
                self.gone_since.remove(g);
            } else {
                self.gone_since.entry(g.clone()).or_insert(now);
            }
        }
        let expired: Vec<Group> = self
            .gone_since
            .iter()
            .filter(|(_, since)| now.duration_since(**since) > GROUP_GRACE)
            .map(|(g, _)| g.clone())
            .collect();
        for g in expired {
            self.gone_since.remove(&g);
            let Some(admitted) = self.admitted.remove(&g) else {
                continue;
            };
            for key in admitted.lua.into_iter().chain([LuaKey::other()]) {
                let labels = key.labels(&g);
                self.metrics.lua_self.remove(&labels);
                self.metrics.lua_inclusive.remove(&labels);
                self.metrics.lua_offcpu.remove(&labels);
            }
            for key in admitted.c.into_iter().chain([CKey::other()]) {
                let labels = key.labels(&g);
                self.metrics.c_self.remove(&labels);
                self.metrics.c_inclusive.remove(&labels);
            }
            let specials = [OTHER, crate::attribution::CORE, ""].map(str::to_owned);
            for plugin in admitted.plugins.into_iter().chain(specials) {
                for phase in Phase::ALL {
                    let labels = PluginLabels {
                        plugin: plugin.clone().into(),
                        phase: LabelValue::fixed(phase.name()),
                        container: g.container.clone().into(),
                        image: g.image.clone().into(),
                    };
                    self.metrics.plugin_cpu.remove(&labels);
                    self.metrics.plugin_offcpu.remove(&labels);
                }
            }
            for phase in Phase::ALL {
                let labels = PhaseLabels {
                    phase: LabelValue::fixed(phase.name()),
                    container: g.container.clone().into(),
                    image: g.image.clone().into(),
                };
                self.metrics.phase_cpu.remove(&labels);
                self.metrics.phase_offcpu.remove(&labels);
            }
            for process in admitted.processes {
                let labels = TargetLabels {
                    container: g.container.clone().into(),
                    image: g.image.clone().into(),
                    process: process.into(),
                };
                self.metrics.samples.remove(&labels);
                self.metrics.lost.remove(&labels);
            }
            // The sampler thread's event-loop series go with the group too.
            let group = super::metrics::GroupLabels {
                container: g.container.clone().into(),
                image: g.image.clone().into(),
            };
            self.metrics.loop_iterations.remove(&group);
            self.metrics.loop_stalls.remove(&group);
            // The sampler thread counts VM states; their series go with the group too.
            for state in crate::luajit::VmState::ALL {
                self.metrics.vm_states.remove(&VmStateLabels {
                    state: LabelValue::fixed(state.name()),
                    container: g.container.clone().into(),
                    image: g.image.clone().into(),
                });
            }
        }
        // Target labels (container names) no retained sample refers to any more.
        self.targets.retain(|t| Arc::strong_count(t) > 1);
    }

    /// Folds the retained stacks of the last `window` that `keep` selects by (pid, container).
    pub fn recent(&self, window: Duration, keep: impl Fn(u32, &str) -> bool) -> Folded {
        self.recent_filtered(window, keep, &Filter::default())
    }

    /// [`Self::recent`], keeping only the stacks `filter` passes.
    pub fn recent_filtered(
        &self,
        window: Duration,
        keep: impl Fn(u32, &str) -> bool,
        filter: &Filter,
    ) -> Folded {
        let now = Instant::now();
        let mut folded = Folded::new();
        for r in self.recent.samples.iter().rev() {
            if now.duration_since(r.at) > window {
                break;
            }
            if keep(r.pid, r.target.container.as_str())
                && self.passes(filter, &r.target, &r.attribution)
            {
                folded.add(r.stack.to_vec(), 1);
            }
        }
        folded
    }

    /// The stacks of [`Self::recent_filtered`], one per sample, unfolded: copying references
    /// is all that happens under the aggregator's lock; the caller folds them after.
    pub fn recent_stacks(
        &self,
        window: Duration,
        keep: impl Fn(u32, &str) -> bool,
        filter: &Filter,
    ) -> Vec<Arc<[Arc<str>]>> {
        let now = Instant::now();
        let mut out = Vec::new();
        for r in self.recent.samples.iter().rev() {
            if now.duration_since(r.at) > window {
                break;
            }
            if keep(r.pid, r.target.container.as_str())
                && self.passes(filter, &r.target, &r.attribution)
            {
                out.push(r.stack.clone());
            }
        }
        out
    }

    /// The distinct stacks of the samples of `which` that arrived in `(from, to]`, of the
    /// processes `keep` selects by (pid, container), that `filter` passes.
    pub fn window(
        &self,
        which: Retention,
        from: Instant,
        to: Instant,
        keep: impl Fn(u32, &str) -> bool,
        filter: &Filter,
    ) -> Window {
        let retained = match which {
            Retention::Cpu => &self.recent,
            Retention::OffCpu => &self.recent_offcpu,
            Retention::Stalls => &self.recent_stalls,
        };
        type Key = (*const TargetLabels, *const [Arc<str>], *const [FrameDetail]);
        let mut index: HashMap<Key, usize> = HashMap::new();
        let mut stacks: Vec<WindowStack> = Vec::new();
        for r in retained.samples.iter().rev() {
            if r.at > to {
                continue;
            }
            if r.at <= from {
                break;
            }
            if !keep(r.pid, r.target.container.as_str())
                || !self.passes(filter, &r.target, &r.attribution)
            {
                continue;
            }
            let key = (
                Arc::as_ptr(&r.target),
                Arc::as_ptr(&r.stack),
                Arc::as_ptr(&r.details),
            );
            let i = *index.entry(key).or_insert_with(|| {
                let attribution = self.capped_plugin(&r.target, (*r.attribution).clone());
                stacks.push(WindowStack {
                    target: r.target.clone(),
                    stack: r.stack.clone(),
                    details: r.details.clone(),
                    attribution,
                    count: 0,
                    weight: 0,
                    iteration_ms: 0,
                });
                stacks.len() - 1
            });
            stacks[i].count += 1;
            stacks[i].weight += u64::from(r.weight);
            stacks[i].iteration_ms = stacks[i].iteration_ms.max(r.iteration_ms);
        }
        let truncated = retained.evicted.is_some_and(|e| e > from);
        let from = [Some(from), Some(self.started), retained.evicted]
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

    /// Whether `filter` passes a sample attributed `a`: by its plugin's own name, or by
    /// `[other]` when its group's plugin series are capped and it is counted there.
    fn passes(&self, filter: &Filter, target: &TargetLabels, a: &Attribution) -> bool {
        filter.keeps(a)
            || (filter.plugin.as_deref() == Some(OTHER)
                && filter.keeps(&self.capped_plugin(target, a.clone())))
    }

    /// `a` with the plugin name the plugin metrics of its group use: `[other]` once
    /// `top_functions` other plugins have series.
    fn capped_plugin(&self, target: &TargetLabels, mut a: Attribution) -> Attribution {
        if a.plugin.is_empty() || a.plugin == crate::attribution::CORE {
            return a;
        }
        let admitted = self.admitted.get(&Group::of(target));
        let room =
            admitted.is_none_or(|ad| ad.plugins.contains(&a.plugin) || ad.plugins.len() < self.top);
        if !room {
            a.plugin = OTHER.to_owned();
        }
        a
    }
}

/// What a retained sample is besides its stack: its process, weight and iteration age.
struct Remembered {
    pid: u32,
    weight: u32,
    iteration_ms: u32,
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

#[cfg(test)]
mod tests {
    use super::*;

    fn stack(frames: &[&str]) -> Vec<Arc<str>> {
        frames.iter().map(|f| Arc::from(*f)).collect()
    }

    fn target() -> TargetLabels {
        TargetLabels {
            container: "gw".into(),
            image: "apache/apisix".into(),
            process: "nginx".into(),
        }
    }

    fn no_module(_: &str) -> Option<&'static Arc<str>> {
        None
    }

    #[test]
    fn classifies_frame_labels() {
        assert_eq!(
            classify("router:match@/app/router.lua:40"),
            FrameClass::Lua {
                function: "router:match",
                file: "/app/router.lua",
                line: "40"
            }
        );
        assert_eq!(
            classify("[main]@access_by_lua(nginx.conf:17):0"),
            FrameClass::Lua {
                function: "[main]",
                file: "access_by_lua(nginx.conf:17)",
                line: "0"
            }
        );
        assert!(matches!(
            classify("builtin:string.rep"),
            FrameClass::Lua {
                file: "[builtin]",
                ..
            }
        ));
        assert!(matches!(classify("[lua:gc]"), FrameClass::Lua { .. }));
        assert_eq!(classify("do_syscall_64_[k]"), FrameClass::Kernel);
        assert_eq!(
            classify("ngx_http_lua_content_handler"),
            FrameClass::C {
                function: "ngx_http_lua_content_handler"
            }
        );
        assert_eq!(
            classify("libc.so.6+0x1234"),
            FrameClass::C {
                function: "libc.so.6+0x1234"
            }
        );
    }

    fn value(text: &str, prefix: &str) -> Option<u64> {
        text.lines()
            .find(|l| l.starts_with(prefix))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
    }

    #[test]
    fn gone_groups_lose_every_series_and_their_interned_name() {
        let metrics = Arc::new(Metrics::new(false));
        let mut agg = Aggregator::new(metrics.clone(), 10, Duration::from_secs(60), 1000);
        let t = target();
        agg.add(
            1,
            &t,
            stack(&["main", "lua_resume", "f@/a.lua:1"]),
            no_module,
        );
        agg.flush();
        // As the sampler thread counts them.
        metrics
            .vm_states
            .get_or_create(&VmStateLabels {
                state: LabelValue::fixed(crate::luajit::VmState::ALL[0].name()),
                container: t.container.clone(),
                image: t.image.clone(),
            })
            .inc();
        let group = Group::of(&t);
        agg.retain_groups(&HashSet::from([group.clone()]));
        let text = metrics.encode().unwrap_or_default();
        assert!(text.contains("container=\"gw\""), "{text}");
        // Gone for longer than the grace period, and its stacks aged out of the window.
        agg.retain_groups(&HashSet::new());
        let long_ago = Instant::now().checked_sub(GROUP_GRACE + Duration::from_secs(1));
        if let (Some(since), Some(gone)) = (long_ago, agg.gone_since.get_mut(&group)) {
            *gone = since;
        }
        while agg.recent.pop().is_some() {}
        agg.retain_groups(&HashSet::new());
        let text = metrics.encode().unwrap_or_default();
        assert!(!text.contains("container=\"gw\""), "{text}");
        assert!(agg.targets.is_empty(), "interned container names kept");
    }

    #[test]
    fn the_window_is_capped_in_bytes() {
        let metrics = Arc::new(Metrics::new(false));
        let mut agg = Aggregator::new(metrics, 10, Duration::from_secs(600), 1_000_000);
        agg.set_retained_bytes(1 << 20);
        let t = target();
        // Names a target generates: each sample a new 500-byte label.
        for i in 0..20_000 {
            let name = format!("{i}{}", "x".repeat(500));
            agg.add(1, &t, stack(&["main", &name]), |_: &str| None);
        }
        let (bytes, _, _) = agg.retained_bytes();
        assert!(bytes <= 1 << 20, "{bytes}");
        let kept = agg.recent.samples.len();
        assert!(kept > 100 && kept < 20_000, "{kept}");
        // A shared stack costs little per sample: many more fit.
        for _ in 0..20_000 {
            agg.add(1, &t, stack(&["main", "f@/a.lua:1"]), |_: &str| None);
        }
        assert!(
            agg.recent.samples.len() > 5_000,
            "{}",
            agg.recent.samples.len()
        );
    }

    #[test]
    fn self_and_inclusive_counts() {
        let metrics = Arc::new(Metrics::new(false));
        let mut agg = Aggregator::new(metrics.clone(), 10, Duration::from_secs(60), 1000);
        let t = target();
        // Recursion counts once inclusively; the innermost Lua frame takes self even with a
        // C function above it.
        agg.add(
            1,
            &t,
            stack(&[
                "main",
                "lua_resume",
                "f@/a.lua:1",
                "f@/a.lua:1",
                "g@/a.lua:9",
                "ngx_say",
                "write_[k]",
            ]),
            no_module,
        );
        agg.add(
            1,
            &t,
            stack(&["main", "lua_resume", "f@/a.lua:1"]),
            no_module,
        );
        agg.flush();
        let text = match metrics.encode() {
            Ok(t) => t,
            Err(e) => panic!("{e}"),
        };
        let f =
            "{function=\"f\",file=\"/a.lua\",line=\"1\",container=\"gw\",image=\"apache/apisix\"}";
        let g =
            "{function=\"g\",file=\"/a.lua\",line=\"9\",container=\"gw\",image=\"apache/apisix\"}";
        assert_eq!(
            value(
                &text,
                &format!("apisix_profiler_lua_function_samples_total{f}")
            ),
            Some(2)
        );
        assert_eq!(
            value(
                &text,
                &format!("apisix_profiler_lua_function_self_samples_total{f}")
            ),
            Some(1)
        );
        assert_eq!(
            value(
                &text,
                &format!("apisix_profiler_lua_function_self_samples_total{g}")
            ),
            Some(1)
        );
        assert!(
            text.contains("apisix_profiler_c_function_self_samples_total{function=\"ngx_say\"")
        );
        assert_eq!(
            value(
                &text,
                "apisix_profiler_samples_total{container=\"gw\",image=\"apache/apisix\",process=\"nginx\"}"
            ),
            Some(2)
        );
    }

    #[test]
    fn functions_beyond_the_cap_go_to_other() {
        let metrics = Arc::new(Metrics::new(false));
        let mut agg = Aggregator::new(metrics.clone(), 2, Duration::from_secs(60), 1000);
        let t = target();
        for (name, n) in [("a", 5), ("b", 4), ("c", 3), ("d", 1)] {
            for _ in 0..n {
                agg.add(
                    1,
                    &t,
                    stack(&["main", &format!("{name}@/x.lua:1")]),
                    no_module,
                );
            }
        }
        agg.flush();
        let text = match metrics.encode() {
            Ok(t) => t,
            Err(e) => panic!("{e}"),
        };
        let series = text
            .lines()
            .filter(|l| l.starts_with("apisix_profiler_lua_function_self_samples_total{"))
            .count();
        assert_eq!(series, 3, "{text}");
        assert!(text.contains("function=\"a\""));
        assert!(text.contains("function=\"b\""));
        assert!(!text.contains("function=\"c\""));
        assert_eq!(
            value(
                &text,
                "apisix_profiler_lua_function_self_samples_total{function=\"[other]\",file=\"\",line=\"\",container=\"gw\",image=\"apache/apisix\"}"
            ),
            Some(4)
        );
        // A later flush keeps the admitted set.
        agg.add(1, &t, stack(&["main", "c@/x.lua:1"]), no_module);
        agg.flush();
        let text = match metrics.encode() {
            Ok(t) => t,
            Err(e) => panic!("{e}"),
        };
        assert!(!text.contains("function=\"c\""));
    }

    #[test]
    fn plugin_and_phase_seconds() {
        let metrics = Arc::new(Metrics::new(false));
        let mut agg = Aggregator::new(metrics.clone(), 2, Duration::from_secs(60), 1000);
        agg.set_attribution(Arc::new(Rules::default()), 10);
        let t = target();
        let access = ["main", "ngx_http_lua_access_handler", "lj_vm_call"];
        for (plugin, n) in [
            ("key-auth", 4),
            ("limit-count", 3),
            ("cors", 2),
            ("ip-restriction", 1),
        ] {
            let file = format!("_M.access@/a/apisix/plugins/{plugin}.lua:10");
            for _ in 0..n {
                agg.add(
                    1,
                    &t,
                    stack(&[&access[..], &[file.as_str()]].concat()),
                    no_module,
                );
            }
        }
        agg.add(1, &t, stack(&["main", "epoll_wait"]), no_module);
        agg.flush();
        let text = match metrics.encode() {
            Ok(t) => t,
            Err(e) => panic!("{e}"),
        };
        // Milliseconds, rounded: the counters are floats.
        let value = |series: &str| -> Option<i64> {
            text.lines()
                .find(|l| l.starts_with(series))
                .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .map(|v| (v * 1000.0).round() as i64)
        };
        let labels = "container=\"gw\",image=\"apache/apisix\"}";
        let plugin = |p: &str, phase: &str| {
            value(&format!(
                "apisix_profiler_plugin_cpu_seconds_total{{plugin=\"{p}\",phase=\"{phase}\",{labels}"
            ))
        };
        // 4 samples at 10 Hz are 0.4 s; the cap of 2 admits the two largest.
        assert_eq!(plugin("key-auth", "access"), Some(400), "{text}");
        assert_eq!(plugin("limit-count", "access"), Some(300), "{text}");
        assert_eq!(plugin("[other]", "access"), Some(300), "{text}");
        assert!(!text.contains("plugin=\"cors\""), "{text}");
        assert_eq!(plugin("", "none"), Some(100), "{text}");
        assert_eq!(
            value(&format!(
                "apisix_profiler_phase_cpu_seconds_total{{phase=\"access\",{labels}"
            )),
            Some(1000),
            "{text}"
        );
    }

    #[test]
    fn offcpu_time_by_plugin_and_phase() {
        let metrics = Arc::new(Metrics::new(true));
        let mut agg = Aggregator::new(metrics.clone(), 10, Duration::from_secs(60), 1000);
        let t = target();
        let s = stack(&[
            "main",
            "ngx_http_lua_log_handler",
            "lj_vm_call",
            "_M.log@/a/apisix/plugins/http-logger.lua:40",
            "builtin:io.write",
            "write",
        ]);
        agg.add_offcpu(1, &t, s, Vec::new(), 250_000);
        agg.flush();
        let text = match metrics.encode() {
            Ok(t) => t,
            Err(e) => panic!("{e}"),
        };
        assert!(
            text.contains(
                "apisix_profiler_plugin_offcpu_seconds_total{plugin=\"http-logger\",phase=\"log\",\
                 container=\"gw\",image=\"apache/apisix\"} 0.25"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "apisix_profiler_phase_offcpu_seconds_total{phase=\"log\",container=\"gw\",\
                 image=\"apache/apisix\"} 0.25"
            ),
            "{text}"
        );
        // Blocked time is not CPU time.
        assert!(
            !text.contains("apisix_profiler_plugin_cpu_seconds_total{"),
            "{text}"
        );
    }

    #[test]
    fn recent_filter_by_plugin() {
        let metrics = Arc::new(Metrics::new(false));
        let mut agg = Aggregator::new(metrics, 10, Duration::from_secs(60), 1000);
        let t = target();
        for (plugin, n) in [("key-auth", 3), ("cors", 2)] {
            let file = format!("_M.access@/a/apisix/plugins/{plugin}.lua:10");
            for _ in 0..n {
                agg.add(
                    1,
                    &t,
                    stack(&["main", "ngx_http_lua_access_handler", &file]),
                    no_module,
                );
            }
        }
        let only = |plugin: &str| Filter {
            plugin: Some(plugin.to_owned()),
            phase: None,
        };
        let window = Duration::from_secs(60);
        assert_eq!(
            agg.recent_filtered(window, |_, _| true, &only("cors"))
                .total(),
            2
        );
        assert_eq!(
            agg.recent_filtered(window, |_, _| true, &only("x")).total(),
            0
        );
        assert_eq!(agg.recent(window, |_, _| true).total(), 5);
    }

    fn total(w: &Window) -> u64 {
        w.stacks.iter().map(|s| s.count).sum()
    }

    #[test]
    fn windows_that_meet_hold_each_sample_once() {
        let metrics = Arc::new(Metrics::new(false));
        let mut agg = Aggregator::new(metrics, 10, Duration::from_secs(60), 1000);
        let t = target();
        let start = Instant::now();
        for _ in 0..3 {
            agg.add(1, &t, stack(&["main", "f@/a.lua:1"]), no_module);
        }
        std::thread::sleep(Duration::from_millis(2));
        let mid = Instant::now();
        std::thread::sleep(Duration::from_millis(2));
        let details = vec![
            FrameDetail::default(),
            FrameDetail {
                line: 4,
                ..FrameDetail::default()
            },
        ];
        for _ in 0..2 {
            agg.add_detailed(
                1,
                &t,
                stack(&["main", "f@/a.lua:1"]),
                details.clone(),
                no_module,
            );
        }
        let end = Instant::now();
        let keep = |_: u32, _: &str| true;
        let none = Filter::default();
        let first = agg.window(Retention::Cpu, start, mid, keep, &none);
        let second = agg.window(Retention::Cpu, mid, end, keep, &none);
        assert_eq!((total(&first), total(&second)), (3, 2));
        assert!(!first.truncated);
        // Same labels, other details: a stack of its own, interned once.
        assert_eq!(second.stacks.len(), 1);
        assert_eq!(second.stacks[0].details[1].line, 4);
        assert_eq!(
            second.stacks[0].attribution.plugin,
            crate::attribution::CORE
        );
        assert_eq!(*second.stacks[0].target, t);
        // Nothing arrived after `end`.
        assert_eq!(
            total(&agg.window(Retention::Cpu, end, Instant::now(), keep, &none)),
            0
        );
        let only_2 = |pid: u32, _: &str| pid == 2;
        assert_eq!(
            total(&agg.window(Retention::Cpu, start, end, only_2, &none)),
            0
        );
    }

    #[test]
    fn a_window_the_cap_cut_says_so_and_starts_later() {
        let metrics = Arc::new(Metrics::new(false));
        let mut agg = Aggregator::new(metrics, 10, Duration::from_secs(60), 3);
        let t = target();
        let start = Instant::now();
        for _ in 0..5 {
            agg.add(1, &t, stack(&["main", "f@/a.lua:1"]), no_module);
        }
        let w = agg.window(
            Retention::Cpu,
            start,
            Instant::now(),
            |_, _| true,
            &Filter::default(),
        );
        assert_eq!(total(&w), 3);
        assert!(w.truncated);
        assert!(w.from > start);
    }

    #[test]
    fn offcpu_window_keeps_blocks_outside_lua_but_not_idle_waits() {
        let metrics = Arc::new(Metrics::new(true));
        let mut agg = Aggregator::new(metrics, 10, Duration::from_secs(60), 1000);
        let t = target();
        let start = Instant::now();
        agg.add_offcpu(
            1,
            &t,
            stack(&["main", "f@/a.lua:1", "read"]),
            Vec::new(),
            1500,
        );
        agg.add_offcpu(
            1,
            &t,
            stack(&["main", "ngx_process_events", "epoll_wait"]),
            Vec::new(),
            9,
        );
        agg.add_offcpu(1, &t, stack(&["main", "fsync"]), Vec::new(), 2500);
        let w = agg.window(
            Retention::OffCpu,
            start,
            Instant::now(),
            |_, _| true,
            &Filter::default(),
        );
        assert_eq!(total(&w), 2);
        assert_eq!(w.stacks.iter().map(|s| s.weight).sum::<u64>(), 4000);
        let cpu = agg.window(
            Retention::Cpu,
            start,
            Instant::now(),
            |_, _| true,
            &Filter::default(),
        );
        assert_eq!(total(&cpu), 0);
    }

    #[test]
    fn window_plugins_beyond_the_cap_are_other() {
        let metrics = Arc::new(Metrics::new(false));
        let mut agg = Aggregator::new(metrics, 1, Duration::from_secs(60), 1000);
        let t = target();
        let start = Instant::now();
        for plugin in ["key-auth", "key-auth", "cors"] {
            let file = format!("_M.access@/a/apisix/plugins/{plugin}.lua:10");
            agg.add(
                1,
                &t,
                stack(&["main", "ngx_http_lua_access_handler", &file]),
                no_module,
            );
        }
        agg.flush();
        let w = agg.window(
            Retention::Cpu,
            start,
            Instant::now(),
            |_, _| true,
            &Filter::default(),
        );
        let mut plugins: Vec<&str> = w
            .stacks
            .iter()
            .map(|s| s.attribution.plugin.as_str())
            .collect();
        plugins.sort_unstable();
        assert_eq!(plugins, ["[other]", "key-auth"]);
        let only = Filter {
            plugin: Some("cors".to_owned()),
            phase: None,
        };
        let w = agg.window(Retention::Cpu, start, Instant::now(), |_, _| true, &only);
        assert_eq!(total(&w), 1);
        // The label the metrics and pprof show for it filters too.
        let other = Filter {
            plugin: Some(OTHER.to_owned()),
            phase: None,
        };
        let w = agg.window(Retention::Cpu, start, Instant::now(), |_, _| true, &other);
        assert_eq!(total(&w), 1);
        assert_eq!(
            agg.recent_filtered(Duration::from_secs(60), |_, _| true, &other)
                .total(),
            1
        );
    }

    #[test]
    fn recent_window_filters_by_pid_and_container() {
        let metrics = Arc::new(Metrics::new(false));
        let mut agg = Aggregator::new(metrics, 10, Duration::from_secs(60), 3);
        let t = target();
        for i in 0..5 {
            agg.add(i, &t, stack(&["main", "f@/a.lua:1"]), no_module);
        }
        // Only the last three are kept.
        assert_eq!(agg.recent(Duration::from_secs(60), |_, _| true).total(), 3);
        assert_eq!(
            agg.recent(Duration::from_secs(60), |pid, _| pid == 4)
                .total(),
            1
        );
        assert_eq!(
            agg.recent(Duration::from_secs(60), |_, c| c == "gw")
                .total(),
            3
        );
        assert_eq!(
            agg.recent(Duration::from_secs(60), |_, c| c == "other")
                .total(),
            0
        );
    }
}
