//! The discovery loop: scans `/proc` until shutdown, every `discovery.interval_seconds` or
//! at once when the Docker follower nudges it, and publishes each snapshot that differs
//! from the last one (to the shared view read by `/targets`, and to the sampler thread).
//!
//! Hooks: `/proc` through [`Scanner`]. Metrics: none.

use std::{
    sync::{
        Arc, RwLock,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    time::Duration,
};

use super::{Snapshot, docker::SharedContainers, procfs::Scanner};

/// Where the loop publishes and when it stops.
#[derive(Debug)]
pub struct Watch<'a> {
    /// Time between two scans without a nudge.
    pub interval: Duration,
    /// Set on shutdown.
    pub stop: &'a AtomicBool,
    /// The latest snapshot, for readers that poll (`/targets`).
    pub published: &'a RwLock<Snapshot>,
}

/// Scans `/proc` until `watch.stop`, publishing each changed snapshot.
pub fn watch(
    watch: &Watch<'_>,
    mut scanner: Scanner,
    containers: &SharedContainers,
    nudges: &mpsc::Receiver<()>,
    out: &mpsc::Sender<Snapshot>,
) {
    let interval = watch.interval;
    let mut last: Option<Snapshot> = None;
    while !watch.stop.load(Ordering::Relaxed) {
        let view = containers.read().map(|c| c.clone()).unwrap_or_default();
        let snap: Snapshot = Arc::new(scanner.scan(&view));
        if last.as_ref() != Some(&snap) {
            if let Ok(mut t) = watch.published.write() {
                *t = snap.clone();
            }
            if out.send(snap.clone()).is_err() {
                break;
            }
            last = Some(snap);
        }
        // Wake up on the interval, a Docker event, or (in slices) shutdown.
        let mut waited = Duration::ZERO;
        while waited < interval && !watch.stop.load(Ordering::Relaxed) {
            let slice = Duration::from_millis(250);
            match nudges.recv_timeout(slice) {
                Ok(()) => {
                    while nudges.try_recv().is_ok() {}
                    break;
                }
                Err(mpsc::RecvTimeoutError::Timeout) => waited += slice,
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    std::thread::sleep(slice);
                    waited += slice;
                }
            }
        }
    }
}
