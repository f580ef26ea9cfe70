//! `apisix-agent run`: wires the daemon together and owns its lifecycle.
//!
//! Threads and tasks: the continuous sampler thread ([`crate::sampling::continuous`]), the
//! discovery thread ([`crate::discovery::watch`]: scans `/proc` every
//! `discovery.interval_seconds` or when nudged), the Docker follower task
//! ([`crate::discovery::docker`]) and the HTTP server ([`http`]) on a tokio runtime. SIGTERM/SIGINT stop everything; the sampler thread detaches every BPF
//! program before the process exits.
//!
//! Hooks: those of its parts. Metrics: those of its parts.

pub mod aggregate;
pub mod http;
pub mod metrics;
pub mod state;

use std::{
    path::Path,
    sync::{Arc, atomic::Ordering, mpsc},
    time::Duration,
};

use anyhow::Context as _;

pub use self::state::Shared;
use crate::{
    config::Config,
    discovery::{
        Snapshot,
        docker::{self, SharedContainers},
        procfs::Scanner,
        watch,
    },
    sampling::continuous,
};

/// Runs the daemon until SIGTERM/SIGINT.
pub fn run(config_path: Option<&Path>) -> anyhow::Result<()> {
    let config = Config::load(config_path)?;
    let listen = config
        .listen_addr()
        .map_err(|e| anyhow::anyhow!("http.listen: {e}"))?;
    let shared = Arc::new(Shared::new(config));

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
            .spawn(move || {
                watch::watch(
                    &watch::Watch {
                        interval: shared.config.scan_interval(),
                        stop: &shared.stop,
                        published: &shared.targets,
                    },
                    scanner,
                    &containers,
                    &nudge_rx,
                    &snap_tx,
                );
            })
            .context("starting the discovery thread")?
    };

    // With port 0 in `http.listen` the kernel picks one: the log says which.
    let bound = listener.local_addr().unwrap_or(listen);
    tracing::info!(listen = %bound, "serving /metrics, /flamegraph, /targets, /healthz");
    // The signal stops the loops and captures at once: graceful shutdown waits for the
    // requests in flight, and an on-demand capture ends (its probes detached) only then.
    let stopping = shared.clone();
    let served = runtime.block_on(http::serve(listener, shared.clone(), async move {
        shutdown_signal().await;
        stopping.stop.store(true, Ordering::SeqCst);
    }));
    tracing::info!("shutting down");
    shared.stop.store(true, Ordering::SeqCst);
    drop(nudge_tx);
    let _ = discovery_thread.join();
    let _ = sampler_thread.join();
    runtime.shutdown_timeout(Duration::from_secs(2));
    served.context("HTTP server")?;
    Ok(())
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
