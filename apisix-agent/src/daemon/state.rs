//! The daemon's shared state: configuration, metrics, the aggregator, the latest discovery
//! snapshot and the flags the threads and HTTP handlers coordinate through. It imports no
//! part of the daemon that uses it (sampler thread, HTTP server), so they depend on it and
//! not on each other.
//!
//! Hooks: none. Metrics: owns the [`Metrics`] registry the others update.

use std::sync::{Arc, Mutex, RwLock, atomic::AtomicBool};

use super::{aggregate::Aggregator, metrics::Metrics};
use crate::{config::Config, discovery::Snapshot};

/// State shared by the HTTP handlers, the sampler thread and discovery.
#[derive(Debug)]
pub struct Shared {
    pub config: Config,
    pub metrics: Arc<Metrics>,
    pub aggregator: Mutex<Aggregator>,
    /// The latest discovery snapshot.
    pub targets: RwLock<Snapshot>,
    /// The continuous sampler is attached.
    pub attached: AtomicBool,
    /// On-demand captures allowed at once.
    pub captures: tokio::sync::Semaphore,
    /// Set on shutdown: every loop and capture ends.
    pub stop: AtomicBool,
}
