//! The daemon's shared state: configuration, metrics, the aggregator, the latest discovery
//! snapshot and the flags the threads and HTTP handlers coordinate through. It imports no
//! part of the daemon that uses it (sampler thread, HTTP server), so they depend on it and
//! not on each other.
//!
//! Hooks: none. Metrics: owns the [`Metrics`] registry the others update.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, RwLock, atomic::AtomicBool},
    time::Duration,
};

use serde::Serialize;

use super::{aggregate::Aggregator, metrics::Metrics};
use crate::{
    attribution::Rules, config::Config, discovery::Snapshot, sampling::kernel::KernelReport,
};

/// Window profiles (pprof endpoints, `/flamegraph?format=pprof` without `seconds`) copied
/// and encoded at once; more are answered 429. Each holds a copy of its window (about
/// 10 MiB for a busy 60 s one) until encoded, so clients that hang up or scrape too often
/// cannot pile copies up in the encoder's queue.
pub const PPROF_AT_ONCE: usize = 2;

/// Flame graph renders of the retained window (`/flamegraph` without `seconds`) at once; more
/// are answered 429. Each folds up to `sampling.max_retained_samples` stacks on a blocking
/// thread, from a snapshot of the window taken by copying pointers to its chunks.
pub const RENDERS_AT_ONCE: usize = 2;

/// State shared by the HTTP handlers, the sampler thread and discovery.
#[derive(Debug)]
pub struct Shared {
    pub config: Config,
    pub metrics: Arc<Metrics>,
    /// The counters and the recent-sample windows, each behind its own lock.
    pub aggregator: Aggregator,
    /// The plugin rules of `config.attribution`.
    pub rules: Arc<Rules>,
    /// The latest discovery snapshot.
    pub targets: RwLock<Snapshot>,
    /// The continuous sampler is attached.
    pub attached: AtomicBool,
    /// What loaded on this kernel and what did not (set once the sampler thread started).
    pub programs: RwLock<ProgramsStatus>,
    /// On-demand captures allowed at once; a capture's permit is owned by its blocking task,
    /// so the limit holds also after its client hung up.
    pub captures: Arc<tokio::sync::Semaphore>,
    /// Window profiles copied and encoded at once ([`PPROF_AT_ONCE`]); a
    /// permit moves into its encoding job.
    pub pprof_encodes: Arc<tokio::sync::Semaphore>,
    /// Window flame graph renders at once ([`RENDERS_AT_ONCE`]); a permit moves into its
    /// blocking job.
    pub renders: Arc<tokio::sync::Semaphore>,
    /// When the last Lua memory capture (`mode=alloc|live`) started, for
    /// `sampling.memory.min_interval_seconds`.
    pub last_alloc_capture: Mutex<Option<std::time::Instant>>,
    /// Set on shutdown: every loop and capture ends.
    pub stop: AtomicBool,
    /// The Lua VM of each target whose VM the continuous sampler learned, with its heap size
    /// at the last read (refreshed every second).
    pub lua_vms: RwLock<HashMap<u32, VmMemory>>,
}

/// The daemon's BPF programs on this kernel: shown by `/targets` and `/healthz`, and as the
/// `apisix_profiler_bpf_program_loaded` gauge.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ProgramsStatus {
    /// What the kernel offers and the variant loaded (absent: nothing loaded).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kernel: Option<KernelReport>,
    /// The continuous CPU sampler: `None` while starting, else whether it runs or why not.
    pub cpu: Option<Result<(), String>>,
    /// The off-CPU pair: `None` when disabled (or starting).
    pub offcpu: Option<Result<(), String>>,
}

impl ProgramsStatus {
    /// Why a part that should run does not, if one does not.
    pub fn failure(&self) -> Option<String> {
        [("CPU sampler", &self.cpu), ("off-CPU pair", &self.offcpu)]
            .into_iter()
            .find_map(|(what, s)| match s {
                Some(Err(e)) => Some(format!("{what}: {e}")),
                _ => None,
            })
    }
}

/// One target's Lua VM as the continuous sampler knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmMemory {
    /// The `global_State` address.
    pub g: u64,
    /// `gc.total` at the last read, or `None` when that read failed.
    pub bytes: Option<u64>,
}

impl Shared {
    /// The state of a daemon with `config`, before anything runs: no targets, not attached.
    pub fn new(config: Config) -> Self {
        let metrics = Arc::new(Metrics::new(config.sampling.offcpu.enabled));
        // `Config::load` already refused rules that do not compile.
        let rules = Arc::new(config.attribution.rules().unwrap_or_default());
        let aggregator = Aggregator::new(
            metrics.clone(),
            config.metrics.top_functions,
            Duration::from_secs(config.sampling.retention_seconds),
            config.sampling.max_retained_samples,
        );
        aggregator.set_attribution(rules.clone(), config.sampling.frequency_hz);
        aggregator.set_retained_bytes(config.limits.retained_window_bytes);
        Self {
            aggregator,
            rules,
            metrics,
            targets: RwLock::new(Arc::new(Vec::new())),
            attached: AtomicBool::new(false),
            programs: RwLock::new(ProgramsStatus::default()),
            captures: Arc::new(tokio::sync::Semaphore::new(
                config.sampling.max_concurrent_captures,
            )),
            pprof_encodes: Arc::new(tokio::sync::Semaphore::new(PPROF_AT_ONCE)),
            renders: Arc::new(tokio::sync::Semaphore::new(RENDERS_AT_ONCE)),
            last_alloc_capture: Mutex::new(None),
            stop: AtomicBool::new(false),
            lua_vms: RwLock::new(HashMap::new()),
            config,
        }
    }
}
