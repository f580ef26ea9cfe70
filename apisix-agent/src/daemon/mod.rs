//! `apisix-agent run`: wires the daemon together and owns its lifecycle.
//!
//! Threads and tasks: the continuous sampler thread ([`continuous`]), the
//! discovery thread ([`crate::discovery::watch`]: scans `/proc` every
//! `discovery.interval_seconds` or when nudged), the Docker follower task
//! ([`crate::discovery::docker`]) and the HTTP server ([`http`]) on a tokio runtime. SIGTERM/SIGINT stop everything; the sampler thread detaches every BPF
//! program before the process exits. The TLS files and the bearer token ([`tls`], [`auth`])
//! are read before anything attaches, and again on SIGHUP or when they change (checked
//! every [`RELOAD_CHECK`]).
//!
//! Hooks: SIGTERM, SIGINT, SIGHUP; those of its parts. Metrics: those of its parts.

pub mod aggregate;
pub mod auth;
pub mod continuous;
pub mod encoder;
pub mod http;
pub mod listener;
pub mod memory;
pub mod metrics;
pub mod state;
pub mod tls;

use std::{
    path::Path,
    sync::{Arc, atomic::Ordering, mpsc},
    time::Duration,
};

pub use self::state::Shared;
use self::{auth::Auth, tls::Tls};
use crate::{
    config::Config,
    discovery::{
        Snapshot,
        docker::{self, SharedContainers},
        procfs::Scanner,
        watch,
    },
};

/// Why the daemon did not start, or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error("http.listen: {0}")]
    Listen(String),
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error(transparent)]
    Auth(#[from] auth::AuthError),
    #[error(transparent)]
    Docker(#[from] docker::DockerError),
    #[error(transparent)]
    Scan(#[from] crate::discovery::procfs::ScanError),
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("starting the continuous sampler")]
    Sampler(#[source] crate::sampling::bpf::BpfError),
    #[error("the sampler thread ended while starting")]
    SamplerGone,
}

/// An I/O error while doing `what`.
fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> DaemonError {
    let what = what.into();
    move |source| DaemonError::Io { what, source }
}

/// How often the TLS files and the bearer token file are checked for changes.
pub const RELOAD_CHECK: Duration = Duration::from_secs(5);

/// Runs the daemon until SIGTERM/SIGINT.
pub fn run(config_path: Option<&Path>) -> Result<(), DaemonError> {
    let config = Config::load(config_path)?;
    let listen = config.listen_addr().map_err(DaemonError::Listen)?;
    let shared = Arc::new(Shared::new(config));
    // Credentials and certificates: a bad file stops the start before anything attaches.
    let http_cfg = &shared.config.http;
    let tls = Tls::load(&http_cfg.tls, shared.metrics.clone())?;
    let auth = Auth::load(http_cfg, shared.metrics.clone())?;
    let authenticated = auth.is_some() || tls.as_ref().is_some_and(|t| t.mutual());
    if let Some(warning) = listener::exposure_warning(listen, tls.is_some(), authenticated) {
        tracing::warn!(listen = %listen, "{warning}");
    }
    listener::raise_fd_limit(http_cfg.max_connections);

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("agent-rt")
        .build()
        .map_err(io("starting the async runtime"))?;
    // From here on SIGHUP reloads instead of ending the agent (its default action), also
    // while the BPF programs attach; the signals wait in the stream until the reload task
    // runs.
    let hangup = runtime.block_on(async { hangup_stream() });
    // Bind first: a taken port is an error before anything attaches.
    let listener = runtime
        .block_on(async { listener::bind(listen) })
        .map_err(io(format!("listening on {listen} (http.listen)")))?;

    // The continuous sampler: a program the kernel refuses is reported (in /healthz, /targets
    // and a metric), not fatal.
    let (snap_tx, snap_rx) = mpsc::channel::<Snapshot>();
    let (started_tx, started_rx) = mpsc::sync_channel(1);
    let sampler_thread = {
        let shared = shared.clone();
        std::thread::Builder::new()
            .name("sampler".into())
            .spawn(move || continuous::run(shared, snap_rx, started_tx))
            .map_err(io("starting the sampler thread"))?
    };
    match started_rx.recv() {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            let _ = sampler_thread.join();
            return Err(DaemonError::Sampler(e));
        }
        Err(_) => return Err(DaemonError::SamplerGone),
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
            .map_err(io("starting the discovery thread"))?
    };

    runtime.spawn(reload_on_change(hangup, tls.clone(), auth.clone()));
    // With port 0 in `http.listen` the kernel picks one: the log says which.
    let bound = listener.local_addr().unwrap_or(listen);
    tracing::info!(
        listen = %bound,
        tls = tls.is_some(),
        client_certificates = tls.as_ref().is_some_and(|t| t.mutual()),
        auth = auth.is_some(),
        profiling_endpoints = shared.config.http.profiling_endpoints,
        "serving /metrics, /flamegraph, /targets, /healthz"
    );
    // Captures and loops end as soon as the signal comes, so open requests finish quickly.
    let shutdown = {
        let shared = shared.clone();
        async move {
            shutdown_signal().await;
            shared.stop.store(true, Ordering::SeqCst);
        }
    };
    let served = runtime.block_on(http::serve(listener, shared.clone(), tls, auth, shutdown));
    tracing::info!("shutting down");
    shared.stop.store(true, Ordering::SeqCst);
    drop(nudge_tx);
    let _ = discovery_thread.join();
    let _ = sampler_thread.join();
    runtime.shutdown_timeout(Duration::from_secs(2));
    served.map_err(io("HTTP server"))?;
    Ok(())
}

/// SIGHUP as a stream (installing its handler: SIGHUP no longer ends the process); `None`,
/// with a warning, when it cannot be listened for. Called within the runtime.
fn hangup_stream() -> Option<tokio::signal::unix::Signal> {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGHUP: files reload when they change");
            None
        }
    }
}

/// Reloads the TLS files and the bearer token file: all of them on SIGHUP (from `hangup`),
/// otherwise those that changed (checked every [`RELOAD_CHECK`]).
async fn reload_on_change(
    mut hangup: Option<tokio::signal::unix::Signal>,
    tls: Option<Arc<Tls>>,
    auth: Option<Arc<Auth>>,
) {
    let mut tick = tokio::time::interval(RELOAD_CHECK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let forced = tokio::select! {
            Some(()) = async {
                match hangup.as_mut() {
                    Some(h) => h.recv().await,
                    None => std::future::pending().await,
                }
            } => true,
            _ = tick.tick() => false,
        };
        if forced && tls.is_none() && auth.is_none() {
            tracing::info!("SIGHUP: nothing to reload (no http.tls, no http.bearer_token_file)");
        } else if forced {
            tracing::info!("SIGHUP: reloading the TLS files and the bearer token file");
        }
        // File reads and key parsing are short; they run on the runtime's blocking pool.
        let (t, a) = (tls.clone(), auth.clone());
        let _ = tokio::task::spawn_blocking(move || {
            if let Some(t) = t {
                t.reload(forced);
            }
            if let Some(a) = a {
                a.reload(forced);
            }
        })
        .await;
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
