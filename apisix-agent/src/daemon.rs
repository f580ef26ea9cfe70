//! `apisix-agent run`: wires the daemon together and owns its lifecycle.
//!
//! Threads and tasks: the continuous sampler thread ([`crate::continuous`]), the discovery
//! thread (scans `/proc` every `discovery.interval_seconds` or when nudged), the Docker
//! follower task ([`crate::discovery::docker`]) and the HTTP server ([`crate::http`]) on a
//! tokio runtime. SIGTERM/SIGINT stop everything; the sampler thread detaches every BPF
//! program before the process exits.
//!
//! Hooks: those of its parts. Metrics: those of its parts.

use std::{
    path::Path,
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    time::Duration,
};

use anyhow::Context as _;

use crate::{
    aggregate::Aggregator,
    config::Config,
    continuous,
    discovery::{
        Snapshot,
        docker::{self, SharedContainers},
        procfs::Scanner,
    },
    http,
    metrics::Metrics,
};

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

/// Runs the daemon until SIGTERM/SIGINT.
pub fn run(config_path: Option<&Path>) -> anyhow::Result<()> {
    let config = Config::load(config_path)?;
    let listen = config
        .listen_addr()
        .map_err(|e| anyhow::anyhow!("http.listen: {e}"))?;
    let metrics = Arc::new(Metrics::new(config.sampling.offcpu.enabled));
    let shared = Arc::new(Shared {
        aggregator: Mutex::new(Aggregator::new(
            metrics.clone(),
            config.metrics.top_functions,
            Duration::from_secs(config.sampling.retention_seconds),
            config.sampling.max_retained_samples,
        )),
        metrics,
        targets: RwLock::new(Arc::new(Vec::new())),
        attached: AtomicBool::new(false),
        captures: tokio::sync::Semaphore::new(config.sampling.max_concurrent_captures),
        stop: AtomicBool::new(false),
        config,
    });

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("agent-rt")
        .build()
        .context("starting the async runtime")?;
    // Bind first: a taken port is an error before anything attaches.
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind(listen))
        .with_context(|| format!("listening on {listen} (http.listen)"))?;

    // The continuous sampler: a failure to attach is fatal and reported as such.
    let (snap_tx, snap_rx) = mpsc::channel::<Snapshot>();
    let (started_tx, started_rx) = mpsc::sync_channel(1);
    let sampler_thread = {
        let shared = shared.clone();
        std::thread::Builder::new()
            .name("sampler".into())
            .spawn(move || continuous::run(shared, snap_rx, started_tx))
            .context("starting the sampler thread")?
    };
    match started_rx.recv() {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            let _ = sampler_thread.join();
            return Err(anyhow::Error::new(e).context("starting the continuous sampler"));
        }
        Err(_) => anyhow::bail!("the sampler thread ended while starting"),
    }

    // Discovery: Docker follower (async) nudges the /proc scanner (thread).
    let containers: SharedContainers = Arc::default();
    let (nudge_tx, nudge_rx) = mpsc::channel::<()>();
    let docker_cfg = shared.config.discovery.docker.clone();
    if docker_cfg.enabled {
        let selector = docker::Selector::new(&docker_cfg)?;
        runtime.spawn(docker::follow(
            docker_cfg,
            selector,
            containers.clone(),
            nudge_tx.clone(),
        ));
    }
    let scanner = Scanner::new(&shared.config.discovery)?;
    let discovery_thread = {
        let shared = shared.clone();
        let containers = containers.clone();
        std::thread::Builder::new()
            .name("discovery".into())
            .spawn(move || discover(&shared, scanner, &containers, &nudge_rx, &snap_tx))
            .context("starting the discovery thread")?
    };

    tracing::info!(%listen, "serving /metrics, /flamegraph, /targets, /healthz");
    let served = runtime.block_on(http::serve(listener, shared.clone(), shutdown_signal()));
    tracing::info!("shutting down");
    shared.stop.store(true, Ordering::SeqCst);
    drop(nudge_tx);
    let _ = discovery_thread.join();
    let _ = sampler_thread.join();
    runtime.shutdown_timeout(Duration::from_secs(2));
    served.context("HTTP server")?;
    Ok(())
}

/// Scans `/proc` until shutdown, publishing each changed snapshot.
fn discover(
    shared: &Shared,
    mut scanner: Scanner,
    containers: &SharedContainers,
    nudges: &mpsc::Receiver<()>,
    out: &mpsc::Sender<Snapshot>,
) {
    let interval = shared.config.scan_interval();
    let mut last: Option<Snapshot> = None;
    while !shared.stop.load(Ordering::Relaxed) {
        let view = containers.read().map(|c| c.clone()).unwrap_or_default();
        let snap: Snapshot = Arc::new(scanner.scan(&view));
        if last.as_ref() != Some(&snap) {
            if let Ok(mut t) = shared.targets.write() {
                *t = snap.clone();
            }
            if out.send(snap.clone()).is_err() {
                break;
            }
            last = Some(snap);
        }
        // Wake up on the interval, a Docker event, or (in slices) shutdown.
        let mut waited = Duration::ZERO;
        while waited < interval && !shared.stop.load(Ordering::Relaxed) {
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

/// Resolves on SIGTERM or SIGINT.
async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = term => {}
    }
}
