//! The targets' event loops, user side. Once a second the sampler thread hands
//! [`LoopTracker::update`] the cumulative per-thread counts the BPF side keeps (`LOOP_THREADS`,
//! filled by `apisix-ebpf/src/eventloop.rs`: each iteration from a return of `epoll_wait` to
//! the next entry, bucketed in the kernel); it adds what each thread gained since the last
//! read to its group's histogram and stall counter, names the threads of processes that are
//! no longer targets (for the caller to forget in the kernel too), and returns each worker's
//! new stalls, which [`StallLog`] turns into log lines.
//!
//! The log: one line per worker and second with new stalls (its pid, thread, container,
//! image, how many, the latest one's duration, the innermost Lua frame and the plugin most of
//! its stall samples ran), at most [`LOG_BURST`] lines at once and [`LOG_PER_SECOND`] a second
//! on average; lines held back are counted in the next one (`suppressed`).
//!
//! Hooks: none. Metrics: `apisix_profiler_event_loop_iteration_seconds` and
//! `apisix_profiler_event_loop_stalls_total` {container, image}.

use std::{
    collections::{HashMap, HashSet},
    time::Instant,
};

use apisix_ebpf_common::{LOOP_BUCKETS, LoopThread};

use super::{
    aggregate::StallSummary,
    metrics::{GroupLabels, Metrics, TargetLabels},
};

/// Stall log lines allowed at once.
pub const LOG_BURST: f64 = 20.0;
/// Stall log lines allowed per second, on average.
pub const LOG_PER_SECOND: f64 = 2.0;

/// One worker thread's stalls since the last read.
#[derive(Debug, Clone)]
pub struct NewStalls {
    pub pid: u32,
    pub tid: u32,
    pub labels: TargetLabels,
    /// Stalls that ended since the last read.
    pub count: u64,
    /// Duration of the latest of them, in nanoseconds.
    pub last_ns: u64,
}

/// The counts of each followed thread at the last read.
#[derive(Debug, Default)]
pub struct LoopTracker {
    seen: HashMap<u32, LoopThread>,
}

impl LoopTracker {
    /// Adds what each thread of `threads` (thread id, cumulative counts) gained since the last
    /// read to the metrics of its process's labels (`labels_of` its tgid: `None`, not a
    /// target). Returns the threads of processes that are not targets, and the new stalls.
    pub fn update(
        &mut self,
        threads: &[(u32, LoopThread)],
        labels_of: impl Fn(u32) -> Option<TargetLabels>,
        metrics: &Metrics,
    ) -> (Vec<u32>, Vec<NewStalls>) {
        let mut gone = Vec::new();
        let mut stalls = Vec::new();
        let mut live = HashSet::new();
        for (tid, now) in threads {
            let Some(labels) = labels_of(now.tgid) else {
                gone.push(*tid);
                continue;
            };
            live.insert(*tid);
            // A thread id reused by another thread starts from zero.
            let before = self
                .seen
                .get(tid)
                .filter(|b| b.tgid == now.tgid && b.count <= now.count)
                .copied()
                .unwrap_or_default();
            self.seen.insert(*tid, *now);
            let group = GroupLabels {
                container: labels.container.clone(),
                image: labels.image.clone(),
            };
            // Both series exist from a group's first iteration: a rate over them reads 0,
            // not nothing, while nothing stalls.
            let stall_counter = metrics.loop_stalls.get_or_create(&group);
            if now.count > before.count {
                let mut buckets = [0u64; LOOP_BUCKETS];
                for (d, (n, b)) in buckets
                    .iter_mut()
                    .zip(now.buckets.iter().zip(before.buckets))
                {
                    *d = n.saturating_sub(b);
                }
                let sum = now.sum_ns.saturating_sub(before.sum_ns) as f64 / 1e9;
                metrics
                    .loop_iterations
                    .get_or_create(&group)
                    .add(&buckets, sum);
            }
            let new = now.stalls.saturating_sub(before.stalls);
            stall_counter.inc_by(new);
            if new > 0 {
                stalls.push(NewStalls {
                    pid: now.tgid,
                    tid: *tid,
                    labels,
                    count: new,
                    last_ns: now.last_stall_ns,
                });
            }
        }
        self.seen.retain(|t, _| live.contains(t));
        (gone, stalls)
    }
}

/// The stall log's rate limit (a token bucket) and the lines it held back.
#[derive(Debug)]
pub struct StallLog {
    tokens: f64,
    refilled: Instant,
    suppressed: u64,
}

impl Default for StallLog {
    fn default() -> Self {
        Self {
            tokens: LOG_BURST,
            refilled: Instant::now(),
            suppressed: 0,
        }
    }
}

impl StallLog {
    /// Whether a line may be written now (else it is counted as suppressed).
    pub fn allow(&mut self) -> bool {
        let now = Instant::now();
        let elapsed = now.duration_since(self.refilled).as_secs_f64();
        self.refilled = now;
        self.tokens = (self.tokens + elapsed * LOG_PER_SECOND).min(LOG_BURST);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            self.suppressed += 1;
            false
        }
    }

    /// Writes the line of `stalls` (with what its stall samples ran, when known), if the rate
    /// allows.
    pub fn log(&mut self, stalls: &NewStalls, summary: Option<&StallSummary>) {
        if !self.allow() {
            return;
        }
        let suppressed = std::mem::take(&mut self.suppressed);
        let (frame, plugin) = summary.map_or(("", ""), |s| (&*s.top_frame, &*s.plugin));
        // Target-controlled text (container, image, frame, plugin) goes in as fields, which the
        // log formats escape.
        tracing::warn!(
            pid = stalls.pid,
            tid = stalls.tid,
            container = stalls.labels.container.as_str(),
            image = stalls.labels.image.as_str(),
            stalls = stalls.count,
            duration_ms = format_args!("{:.1}", stalls.last_ns as f64 / 1e6),
            top_lua_frame = frame,
            plugin,
            suppressed,
            "event-loop stall"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::daemon::metrics::LabelValue;

    fn labels(container: &str) -> TargetLabels {
        TargetLabels {
            container: container.into(),
            image: LabelValue::fixed("img"),
            process: LabelValue::fixed("nginx"),
        }
    }

    fn thread(tgid: u32, buckets: [u64; LOOP_BUCKETS], stalls: u64) -> LoopThread {
        LoopThread {
            tgid,
            count: buckets.iter().sum(),
            sum_ns: buckets[0] * 500_000 + buckets[6] * 300_000_000,
            stalls,
            last_stall_ns: 300_000_000,
            buckets,
            ..LoopThread::default()
        }
    }

    #[test]
    fn deltas_go_to_the_group_and_gone_threads_are_named() {
        let metrics = Metrics::default();
        let mut t = LoopTracker::default();
        let mut b = [0; LOOP_BUCKETS];
        b[0] = 19;
        b[6] = 1;
        let of = |tgid: u32| (tgid == 10).then(|| labels("web"));
        let (gone, stalls) = t.update(
            &[(11, thread(10, b, 1)), (21, thread(20, b, 0))],
            of,
            &metrics,
        );
        assert_eq!(gone, vec![21]);
        assert_eq!(stalls.len(), 1);
        assert_eq!((stalls[0].pid, stalls[0].tid, stalls[0].count), (10, 11, 1));
        b[0] = 38;
        b[6] = 2;
        let (_, stalls) = t.update(&[(11, thread(10, b, 2))], of, &metrics);
        assert_eq!(stalls[0].count, 1);
        let text = metrics.encode().expect("encode");
        assert!(
            text.contains(
                r#"apisix_profiler_event_loop_iteration_seconds_bucket{le="0.001",container="web",image="img"} 38"#
            ),
            "{text}"
        );
        assert!(
            text.contains(
                r#"apisix_profiler_event_loop_iteration_seconds_bucket{le="0.5",container="web",image="img"} 40"#
            ),
            "{text}"
        );
        assert!(
            text.contains(
                r#"apisix_profiler_event_loop_stalls_total{container="web",image="img"} 2"#
            ),
            "{text}"
        );
        assert!(
            text.contains(r#"apisix_profiler_event_loop_iteration_seconds_count{container="web",image="img"} 40"#),
            "{text}"
        );
    }

    #[test]
    fn a_reused_thread_id_starts_from_zero() {
        let metrics = Metrics::default();
        let mut t = LoopTracker::default();
        let mut b = [0; LOOP_BUCKETS];
        b[6] = 5;
        let of = |_| Some(labels("web"));
        t.update(&[(11, thread(10, b, 5))], of, &metrics);
        b[6] = 1;
        let (_, stalls) = t.update(&[(11, thread(12, b, 1))], of, &metrics);
        assert_eq!(stalls[0].count, 1);
    }

    #[test]
    fn the_log_is_rate_limited() {
        let mut log = StallLog::default();
        let allowed = (0..100).filter(|_| log.allow()).count();
        assert!((20..=21).contains(&allowed), "{allowed}");
        assert!(log.suppressed >= 79);
    }
}
