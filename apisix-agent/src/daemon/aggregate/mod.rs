//! Aggregation of continuously sampled stacks, in two parts behind their own locks:
//! - [`counters`]: the capped Prometheus counters (per function, plugin, phase and target);
//! - [`window`]: the recent-sample windows for `/flamegraph` without `seconds` and for
//!   `/debug/pprof/*`.
//!
//! [`Aggregator`] holds both. The sampler thread counts a batch under the counters' lock, then
//! appends it to the window under the window's; a reader ([`Aggregator::snapshot`]) holds the
//! window's lock only to copy chunk pointers (and the counters' to copy one pointer, the
//! published plugin caps), then cuts and folds with no lock held. The two locks are never held
//! together.
//!
//! Each sample is also attributed to an APISIX plugin and request phase
//! ([`crate::attribution`]) once, when it arrives: the counters use it and the window keeps it.
//!
//! Hooks: none. Metrics: those of [`counters`].

pub mod counters;
pub mod window;

use std::{
    collections::HashSet,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    time::{Duration, Instant},
};

pub use self::{
    counters::{Counters, Group, OTHER},
    window::{Retention, Window, WindowSnapshot, WindowStack, Windows},
};
use super::metrics::{Metrics, TargetLabels};
use crate::{attribution::Rules, label::FrameDetail};

/// One sample or off-CPU block as the sampler thread hands it over.
#[derive(Debug)]
pub struct Arrival<'t> {
    pub which: Retention,
    pub pid: u32,
    pub target: &'t TargetLabels,
    /// Root first.
    pub stack: Vec<Arc<str>>,
    /// One per frame, or none.
    pub details: Vec<FrameDetail>,
    /// Off-CPU: microseconds blocked; CPU samples: ignored (1).
    pub us: u64,
}

/// The aggregator of the continuous sampler: the counters and the windows, each behind its
/// own lock. A panic while one was held leaves its state as it was (poisoning is ignored): a
/// counter or a window can be off by the sample in hand, not lost.
#[derive(Debug)]
pub struct Aggregator {
    counters: Mutex<Counters>,
    windows: Mutex<Windows>,
}

impl Aggregator {
    /// An aggregator updating `metrics`, with `top` series per group and family, windows of
    /// `retention` holding at most `max_recent` samples each.
    pub fn new(metrics: Arc<Metrics>, top: usize, retention: Duration, max_recent: usize) -> Self {
        Self {
            counters: Mutex::new(Counters::new(metrics, top)),
            windows: Mutex::new(Windows::new(retention, max_recent)),
        }
    }

    /// The counters, locked.
    pub fn counters(&self) -> MutexGuard<'_, Counters> {
        self.counters.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The windows, locked.
    pub fn windows(&self) -> MutexGuard<'_, Windows> {
        self.windows.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Caps each window at `bytes` (`limits.retained_window_bytes`).
    pub fn set_retained_bytes(&self, bytes: usize) {
        self.windows().set_retained_bytes(bytes);
    }

    /// Bytes of the windows (CPU, off-CPU) as counted for their cap.
    pub fn retained_bytes(&self) -> (usize, usize) {
        self.windows().retained_bytes()
    }

    /// Sets the plugin rules and the sampling rate ([`Counters::set_attribution`]).
    pub fn set_attribution(&self, rules: Arc<Rules>, frequency_hz: u64) {
        self.counters().set_attribution(rules, frequency_hz);
    }

    /// Counts and keeps a batch: counted under the counters' lock, then kept under the
    /// window's. Idle off-CPU waits (`epoll_wait`) are dropped. `module_of` names the module
    /// of a native frame label.
    pub fn add_batch<'t, 'm>(
        &self,
        arrivals: impl IntoIterator<Item = Arrival<'t>>,
        module_of: impl Fn(&str) -> Option<&'m Arc<str>>,
    ) {
        let counted: Vec<_> = {
            let mut counters = self.counters();
            arrivals
                .into_iter()
                .filter_map(|a| {
                    let attribution = match a.which {
                        Retention::Cpu => counters.count_cpu(a.target, &a.stack, &module_of),
                        Retention::OffCpu if crate::sampling::capture::is_idle(&a.stack) => {
                            return None;
                        }
                        Retention::OffCpu => counters.count_offcpu(a.target, &a.stack, a.us),
                    };
                    Some((a, attribution))
                })
                .collect()
        };
        let mut windows = self.windows();
        for (a, attribution) in counted {
            let weight = match a.which {
                Retention::Cpu => 1,
                Retention::OffCpu => u32::try_from(a.us).unwrap_or(u32::MAX),
            };
            windows.push(
                a.which,
                a.pid,
                a.target,
                a.stack,
                a.details,
                attribution,
                weight,
            );
        }
    }

    /// Adds one sampled stack (root first) of process `pid`, with the details of its frames
    /// (one per frame, or none).
    pub fn add_detailed<'m>(
        &self,
        pid: u32,
        target: &TargetLabels,
        stack: Vec<Arc<str>>,
        details: Vec<FrameDetail>,
        module_of: impl Fn(&str) -> Option<&'m Arc<str>>,
    ) {
        let arrival = Arrival {
            which: Retention::Cpu,
            pid,
            target,
            stack,
            details,
            us: 0,
        };
        self.add_batch([arrival], module_of);
    }

    /// Adds one off-CPU block of `us` microseconds of process `pid`
    /// ([`Counters::count_offcpu`]); idle waits are dropped, blocks outside Lua are kept in
    /// the off-CPU window only.
    pub fn add_offcpu(
        &self,
        pid: u32,
        target: &TargetLabels,
        stack: Vec<Arc<str>>,
        details: Vec<FrameDetail>,
        us: u64,
    ) {
        let arrival = Arrival {
            which: Retention::OffCpu,
            pid,
            target,
            stack,
            details,
            us,
        };
        self.add_batch([arrival], |_| None);
    }

    /// Adds samples lost for a target.
    pub fn add_lost(&self, target: &TargetLabels, n: u64) {
        self.counters().add_lost(target, n);
    }

    /// Moves pending counts into the metrics; drops samples older than the retention.
    pub fn flush(&self) {
        self.counters().flush();
        self.windows().expire(Instant::now());
    }

    /// Tells which groups still have targets ([`Counters::retain_groups`]); interned target
    /// labels no retained sample refers to any more are dropped.
    pub fn retain_groups(&self, live: &HashSet<Group>) {
        self.counters().retain_groups(live);
        self.windows().prune_targets();
    }

    /// The samples of window `which` as they are now, naming plugins as the metrics do: the
    /// window's lock is held to copy chunk pointers, the counters' to copy one pointer.
    pub fn snapshot(&self, which: Retention) -> WindowSnapshot {
        let snapshot = self.windows().snapshot(which);
        let caps = self.counters().plugin_caps();
        snapshot.with_caps(caps)
    }
}

#[cfg(test)]
mod tests;
