//! The daemon's HTTP endpoint (axum):
//! - `GET /metrics`: OpenMetrics text when the client accepts it, else the Prometheus text
//!   format ([`super::metrics`]).
//! - `GET /flamegraph?pid=PID|container=NAME[&seconds=N][&format=svg|collapsed|json|pprof]
//!   [&frequency=HZ][&mode=cpu|off-cpu|alloc|live|stalls][&sample_bytes=N][&idle=exclude|include]
//!   [&trace_frames=1][&plugin=NAME][&phase=NAME]`: with `seconds`, an
//!   on-demand capture at the on-demand rate, of blocked time with `mode=off-cpu`, or of the
//!   Lua heap with `mode=alloc` (allocated bytes) / `mode=live` (sampled blocks still
//!   allocated at the end) ([`crate::sampling::capture`]); without, the continuously
//!   collected recent stacks at once.
//!   `plugin` and `phase` keep only the stacks of that plugin / phase
//!   ([`crate::attribution`]); the title says so, also when nothing matched. `format=pprof`
//!   is the encoding of the pprof endpoints (heap captures: `alloc_space` / `inuse_space`).
//! - `GET /debug/pprof/profile[?seconds=N][&pid=…|&container=…][&plugin=…][&phase=…]` and
//!   `GET /debug/pprof/offcpu?…` (with `sampling.offcpu.enabled`): a gzip-compressed pprof
//!   profile of the continuously sampled stacks (blocked time) of the last N seconds
//!   (default 30), at once, for Grafana Pyroscope and Parca ([`crate::output::pprof`]). N above
//!   `sampling.retention_seconds` is clamped, and the `X-Profile-Clamped` header says so;
//!   `X-Profile-Seconds` gives the seconds served. Every target unless narrowed.
//! - `GET /flamegraph?mode=stalls[&pid=…|&container=…][&format=…]` and
//!   `GET /debug/pprof/stalls?…`: the retained stall samples (taken while their worker's
//!   event-loop iteration was older than `sampling.stalls.threshold_ms`), weighted in
//!   microseconds of stall time; every target unless narrowed.
//! - `GET /targets`: the profiled processes with labels, LuaJIT flavour and Lua heap size, as
//!   JSON.
//! - `GET /healthz`: 200 while the BPF sampler is attached, else 503.
//!
//! Errors are JSON `{"error": "…"}`: 400 for bad parameters, 403 for a capture by
//! credentials not in `http.capture_users` (when credentials are configured), 404 for an
//! unknown target or path, or a PID whose process is not the one discovered any more (its
//! start time differs: reused), 422 for a target whose Lua allocator cannot be probed (the
//! reason says why), 429 with `Retry-After` when `sampling.max_concurrent_captures` captures
//! already run, when [`PPROF_AT_ONCE`] pprof profiles or [`RENDERS_AT_ONCE`] flame graphs of
//! the retained window are being made, or when a Lua memory capture started less than
//! `sampling.memory.min_interval_seconds` ago. Window flame graphs are folded and rendered
//! on blocking threads, from a snapshot of the window (its chunk pointers, copied under its
//! lock).
//! Handlers only read shared state or start a capture; nothing a client sends names a file.
//!
//! The profiling endpoints (`/flamegraph`, the pprof ones) form one group that
//! `http.profiling_endpoints: false` turns off (404 saying so). With credentials configured
//! every request but an open `/healthz` goes through [`super::auth::require`]; connections,
//! TLS and their limits are [`super::listener`]'s.
//!
//! Hooks: a TCP listener (through [`super::listener`]). Metrics: none of its own.

mod heap;

use std::{
    collections::HashMap,
    fmt::Write as _,
    sync::{Arc, atomic::Ordering},
    time::{Duration, SystemTime},
};

use axum::{
    Extension, Json, Router,
    extract::{Query, State},
    http::{StatusCode, header},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::get,
};

use super::{
    Shared,
    aggregate::Retention,
    auth::{self, Auth, Caller},
    encoder::{EncoderGone, on_encoder_thread},
    listener::{self, Limits},
    state::{PPROF_AT_ONCE, RENDERS_AT_ONCE},
    tls::Tls,
};
use crate::{
    attribution::Filter,
    discovery::{Lua, TargetProcess, procfs},
    output::{Folded, pprof},
    sampling::{
        capture::{self, CaptureTarget},
        render::{self, ProcessLabels, RenderError, Rendered},
        request::{self, Defaults, Format, Request, RequestError, Selector},
    },
};

/// Serves until `shutdown` resolves, over TLS when `tls` is set, asking for credentials
/// when `auth` is set, under the limits of `http`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    shared: Arc<Shared>,
    tls: Option<Arc<Tls>>,
    auth: Option<Arc<Auth>>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let limits = Limits::from(&shared.config.http);
    let metrics = shared.metrics.clone();
    listener::serve(
        listener,
        router(shared, auth),
        tls,
        limits,
        metrics,
        shutdown,
    )
    .await
}

/// The routes.
pub fn router(shared: Arc<Shared>, auth: Option<Arc<Auth>>) -> Router {
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/targets", get(targets))
        .route("/healthz", get(healthz))
        .merge(profiling_routes(shared.config.http.profiling_endpoints))
        .fallback(|| async { error(StatusCode::NOT_FOUND, "no such endpoint".to_owned()) })
        .with_state(shared);
    match auth {
        Some(auth) => app.layer(middleware::from_fn_with_state(auth, auth::require)),
        None => app,
    }
}

/// The endpoints that capture or show stacks (with the targets' Lua file names); without
/// `http.profiling_endpoints` each answers 404 saying so.
fn profiling_routes(enabled: bool) -> Router<Arc<Shared>> {
    let routes = Router::new()
        .route("/flamegraph", get(flamegraph))
        .merge(pprof_routes());
    if enabled {
        routes
    } else {
        routes.route_layer(middleware::from_fn(profiling_disabled))
    }
}

async fn profiling_disabled(_req: axum::extract::Request, _next: Next) -> Response {
    error(
        StatusCode::NOT_FOUND,
        "profiling endpoints are disabled (http.profiling_endpoints: false)".to_owned(),
    )
}

fn error(status: StatusCode, message: String) -> Response {
    (status, Json(serde_json::json!({ "error": message }))).into_response()
}

/// OpenMetrics for clients that accept it (Prometheus does), else the Prometheus text format.
async fn metrics(State(shared): State<Arc<Shared>>, headers: axum::http::HeaderMap) -> Response {
    let openmetrics = headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("application/openmetrics-text"));
    match shared.metrics.encode() {
        Ok(text) if openmetrics => (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Ok(text) => (
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            super::metrics::to_prometheus_text(&text),
        )
            .into_response(),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, format!("encoding: {e}")),
    }
}

async fn targets(State(shared): State<Arc<Shared>>) -> Response {
    let snap = shared.targets.read().map(|t| t.clone()).unwrap_or_default();
    let vms = shared.lua_vms.read().map(|v| v.clone()).unwrap_or_default();
    let kernel = shared
        .programs
        .read()
        .ok()
        .and_then(|p| p.kernel.clone())
        .filter(|_| shared.attached.load(Ordering::SeqCst));
    let views: Vec<_> = snap
        .iter()
        .map(|t| {
            let mut v = t.view();
            v.lua_memory_bytes = vms.get(&t.pid).and_then(|m| m.bytes);
            v.max_lua_frames = kernel.as_ref().map(|k| k.max_lua_frames);
            v.lua_walk = kernel.as_ref().map(|k| k.lua_walk.name());
            v
        })
        .collect();
    Json(views).into_response()
}

async fn healthz(State(shared): State<Arc<Shared>>) -> Response {
    let targets = shared.targets.read().map(|t| t.len()).unwrap_or(0);
    let programs = shared
        .programs
        .read()
        .map(|p| p.clone())
        .unwrap_or_default();
    let failure = programs.failure();
    if shared.attached.load(Ordering::SeqCst) && failure.is_none() {
        Json(serde_json::json!({"status": "ok", "targets": targets, "bpf": programs}))
            .into_response()
    } else {
        let why = failure.unwrap_or_else(|| "the BPF sampler is not attached yet".to_owned());
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({"status": "degraded", "error": why, "targets": targets, "bpf": programs})),
        )
            .into_response()
    }
}

fn bad_request(e: RequestError) -> Response {
    error(StatusCode::BAD_REQUEST, e.message)
}

/// Whether `t`'s process still runs as the one discovered: its PID was not reused by another
/// process since (the start time, field 22 of `/proc/PID/stat`, is the same).
fn same_process(t: &TargetProcess) -> bool {
    procfs::start_time(t.pid) == Some(t.start_time)
}

/// The targets a selector names, leaving out those whose PID now belongs to another process
/// ([`same_process`]).
fn select(snapshot: &[TargetProcess], selector: &Selector) -> Vec<TargetProcess> {
    snapshot
        .iter()
        .filter(|t| same_process(t))
        .filter(|t| match selector {
            Selector::All => true,
            Selector::Pid(pid) => t.pid == *pid,
            Selector::Container(name) => {
                !t.labels.container_id.is_empty()
                    && (t.labels.container == *name
                        || (name.len() >= 4 && t.labels.container_id.starts_with(name.as_str())))
            }
        })
        .cloned()
        .collect()
}

/// Why `caller` may not start a capture of `mode` now (`None`: it may): with credentials configured only
/// the users of `http.capture_users` may (403), and Lua memory captures start at most once
/// per `sampling.memory.min_interval_seconds` (429 with `Retry-After`).
fn refuse_capture(
    shared: &Shared,
    caller: Option<&Caller>,
    mode: request::Mode,
) -> Option<Response> {
    let http = &shared.config.http;
    if http.auth_enabled() {
        let user = caller.and_then(|c| c.0.as_deref());
        if !user.is_some_and(|u| http.capture_users.iter().any(|c| c == u)) {
            return Some(error(
                StatusCode::FORBIDDEN,
                "captures need a user of http.capture_users; these credentials only read"
                    .to_owned(),
            ));
        }
    }
    let interval = Duration::from_secs(shared.config.sampling.memory.min_interval_seconds);
    if mode.is_memory() && !interval.is_zero() {
        let Ok(mut last) = shared.last_alloc_capture.lock() else {
            return Some(error(StatusCode::INTERNAL_SERVER_ERROR, "poisoned".into()));
        };
        let now = std::time::Instant::now();
        if let Some(wait) = last.and_then(|at| interval.checked_sub(now.duration_since(at))) {
            let secs = wait.as_secs() + 1;
            let mut response = error(
                StatusCode::TOO_MANY_REQUESTS,
                format!(
                    "a Lua memory capture started less than {}s ago \
                     (sampling.memory.min_interval_seconds); retry in {secs}s",
                    interval.as_secs()
                ),
            );
            if let Ok(v) = header::HeaderValue::from_str(&secs.to_string()) {
                response.headers_mut().insert(header::RETRY_AFTER, v);
            }
            return Some(response);
        }
        *last = Some(now);
    }
    None
}

/// `/flamegraph`: a [`Request`] from the query, then the window at once or a capture.
async fn flamegraph(
    State(shared): State<Arc<Shared>>,
    caller: Option<Extension<Caller>>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let cfg = &shared.config.sampling;
    let req = match Request::from_query(&q, Defaults::daemon(cfg)) {
        Ok(r) => r,
        Err(e) => return bad_request(e),
    };
    let chosen = match chosen(&shared, &req.selector) {
        Ok(c) => c,
        Err(response) => return response,
    };
    let describe = describe(&chosen, &req.selector.describe());
    if req.mode == request::Mode::Heap {
        return heap::flamegraph(shared, req, chosen, describe).await;
    }
    let pids: Vec<u32> = chosen.iter().map(|t| t.pid).collect();
    if req.seconds.is_none() {
        if req.format == Format::Pprof {
            let title = format!(
                "{describe}: {}last {}s of continuous sampling at {} Hz",
                stalls_title(&shared, req.mode),
                cfg.retention_seconds,
                cfg.frequency_hz
            );
            let keep = move |pid, _: &str| pids.contains(&pid);
            let (seconds, filter) = (cfg.retention_seconds, req.filter);
            return window_profile(
                &shared,
                retention(req.mode),
                seconds,
                keep,
                filter,
                title,
                Vec::new(),
            )
            .await;
        }
        return window_flamegraph(&shared, pids, &describe, req).await;
    }
    if let Some(refused) = refuse_capture(&shared, caller.as_ref().map(|c| &c.0), req.mode) {
        return refused;
    }
    run_capture(shared, req, chosen, describe).await
}

/// The retained window a window request of `mode` reads.
fn retention(mode: request::Mode) -> Retention {
    match mode {
        request::Mode::Stalls => Retention::Stalls,
        _ => Retention::Cpu,
    }
}

/// What a window title says first about `mode`: which stalls (nothing for CPU).
fn stalls_title(shared: &Shared, mode: request::Mode) -> String {
    match mode {
        request::Mode::Stalls => format!(
            "event-loop stalls (iterations ≥ {} ms), ",
            shared.config.sampling.stalls.threshold_ms
        ),
        _ => String::new(),
    }
}

/// The live targets `selector` names, or a 404.
#[expect(clippy::result_large_err, reason = "the error is the response itself")]
fn chosen(shared: &Shared, selector: &Selector) -> Result<Vec<TargetProcess>, Response> {
    let snapshot = shared.targets.read().map(|t| t.clone()).unwrap_or_default();
    let chosen = select(&snapshot, selector);
    if chosen.is_empty() {
        return Err(error(
            StatusCode::NOT_FOUND,
            format!(
                "{} is not a profiled target (see /targets)",
                selector.describe()
            ),
        ));
    }
    Ok(chosen)
}

/// Runs `req`'s capture of `chosen` on a blocking thread (one of
/// `sampling.max_concurrent_captures`, else 429) and renders it.
async fn run_capture(
    shared: Arc<Shared>,
    req: Request,
    chosen: Vec<TargetProcess>,
    describe: String,
) -> Response {
    let (Some(mode), Some(duration)) = (req.capture_mode(), req.duration()) else {
        return error(StatusCode::INTERNAL_SERVER_ERROR, "not a capture".into());
    };
    let Ok(permit) = shared.captures.clone().try_acquire_owned() else {
        return busy(format!(
            "{} captures already running (sampling.max_concurrent_captures)",
            shared.config.sampling.max_concurrent_captures
        ));
    };
    let vms = shared.lua_vms.read().map(|v| v.clone()).unwrap_or_default();
    let targets: Vec<CaptureTarget> = chosen
        .iter()
        .map(|t| CaptureTarget {
            pid: t.pid,
            lua: match &t.lua {
                Lua::Known(l) => Some(l.clone()),
                _ => None,
            },
            vm: vms.get(&t.pid).map(|m| m.g),
        })
        .collect();
    let what = req.selector.describe();
    tracing::info!(
        target = what,
        seconds = duration.as_secs(),
        mode = mode.describe(),
        "capture started"
    );
    let worker = shared.clone();
    let options = req.stack_options();
    let result = tokio::task::spawn_blocking(move || {
        let cap = capture::capture(&targets, duration, mode, options, &worker.stop, |_| {});
        super::memory::release_freed();
        // Freed when the capture ends, also when the client hung up before.
        drop(permit);
        cap
    })
    .await;
    let cap = match result {
        Ok(Ok(c)) => c,
        Ok(Err(e @ capture::CaptureError::Alloc { .. })) => {
            return error(StatusCode::UNPROCESSABLE_ENTITY, format!("capture: {e}"));
        }
        Ok(Err(e)) => return error(StatusCode::INTERNAL_SERVER_ERROR, format!("capture: {e}")),
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, format!("capture: {e}")),
    };
    if let Some(t) = chosen.iter().find(|t| !same_process(t)) {
        return error(
            StatusCode::NOT_FOUND,
            format!(
                "pid {} ended or was reused by another process during the capture",
                t.pid
            ),
        );
    }
    tracing::info!(target = what, stacks = cap.folded.total(), "capture done");
    let now = time::OffsetDateTime::now_utc().format(UTC_DATE);
    let title = format!(
        "{} from {}",
        req.title(&describe, &cap),
        now.unwrap_or_default()
    );
    let labels: ProcessLabels = chosen
        .iter()
        .map(|t| {
            let l = &t.labels;
            (
                t.pid,
                [l.container.clone(), l.image.clone(), l.process.clone()],
            )
        })
        .collect();
    let rules = shared.rules.clone();
    let pprof = req.format == Format::Pprof;
    let render = move || render::capture((&cap).into(), &req, &title, &rules, &labels);
    // pprof on the encoder thread (one arena), the rest on a blocking thread at low priority:
    // either way off the async workers. The capture's own permit bounds how many run.
    if pprof {
        respond(on_encoder_thread(render).await.map_err(|e| e.to_string()))
    } else {
        respond(
            tokio::task::spawn_blocking(move || {
                let _background = Background::enter();
                render()
            })
            .await
            .map_err(|e| format!("rendering: {e}")),
        )
    }
}

/// The response of a rendering (pprof profiles as downloads, as Go's `net/http/pprof`).
fn respond(rendered: Result<Result<Rendered, RenderError>, String>) -> Response {
    match rendered {
        Ok(Ok(r)) if r.content_type == "application/octet-stream" => (
            [
                (header::CONTENT_TYPE, r.content_type),
                (
                    header::CONTENT_DISPOSITION,
                    "attachment; filename=\"profile\"",
                ),
            ],
            r.body,
        )
            .into_response(),
        Ok(Ok(r)) => ([(header::CONTENT_TYPE, r.content_type)], r.body).into_response(),
        Ok(Err(e)) => error(StatusCode::INTERNAL_SERVER_ERROR, format!("rendering: {e}")),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e),
    }
}

/// The flame graph of the retained window of `pids`: the window's lock is held while
/// pointers to its chunks are copied; folding and rendering run on a blocking thread, off
/// the async workers (`/healthz`, handshakes), at most [`RENDERS_AT_ONCE`] at once (429).
async fn window_flamegraph(
    shared: &Arc<Shared>,
    pids: Vec<u32>,
    describe: &str,
    req: Request,
) -> Response {
    let cfg = &shared.config.sampling;
    let Ok(slot) = shared.renders.clone().try_acquire_owned() else {
        return busy(format!(
            "{RENDERS_AT_ONCE} flame graphs of the retained window are being rendered already; \
             retry in a moment"
        ));
    };
    let window = Duration::from_secs(cfg.retention_seconds);
    let title = format!(
        "{describe} — {}last {}s of continuous sampling at {} Hz",
        stalls_title(shared, req.mode),
        cfg.retention_seconds,
        cfg.frequency_hz
    );
    let worker = shared.clone();
    let rendered = tokio::task::spawn_blocking(move || {
        let _background = Background::enter();
        let filter = &req.filter;
        let keep = |pid, _: &str| pids.contains(&pid);
        let mut folded = Folded::new();
        if req.mode == request::Mode::Stalls {
            // Weighted in µs of stall time.
            let to = std::time::Instant::now();
            let from = to.checked_sub(window).unwrap_or(to);
            let stalls = worker
                .aggregator
                .snapshot(Retention::Stalls)
                .cut(from, to, keep, filter);
            for w in &stalls.stacks {
                folded.add(w.stack.to_vec(), w.weight);
            }
        } else {
            let snapshot = worker.aggregator.snapshot(Retention::Cpu);
            for stack in snapshot.recent_stacks(window, keep, filter) {
                folded.add(stack.to_vec(), 1);
            }
        }
        let title = render::filtered_title(&title, filter, folded.total());
        let rendered = render::folded(&folded, req.format, &title, req.mode.unit(), &worker.rules);
        drop(slot);
        rendered
    })
    .await;
    respond(rendered.map_err(|e| format!("rendering: {e}")))
}

/// The calling thread at nice [`Background::NICE`] while this lives, so that a render yields
/// the CPU to the async workers (`/healthz`, handshakes) and the sampler thread; back to its
/// previous nice value on drop.
struct Background {
    previous: Option<libc::c_int>,
}

impl Background {
    const NICE: libc::c_int = 10;

    fn enter() -> Self {
        // SAFETY: plain system calls on the calling thread.
        let tid = unsafe { libc::gettid() } as libc::id_t;
        // SAFETY: as above; -1 is also a valid nice value, so errno is not checked: a
        // failure leaves the priority as it was.
        let previous = unsafe { libc::getpriority(libc::PRIO_PROCESS, tid) };
        // SAFETY: as above.
        let set = unsafe { libc::setpriority(libc::PRIO_PROCESS, tid, Self::NICE) } == 0;
        Self {
            previous: set.then_some(previous),
        }
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        if let Some(previous) = self.previous {
            // SAFETY: plain system calls on the calling thread (the same one: the guard
            // lives on the blocking thread's stack).
            unsafe {
                libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, previous);
            }
        }
    }
}

/// 429 with `Retry-After: 1`.
fn busy(message: String) -> Response {
    let mut response = error(StatusCode::TOO_MANY_REQUESTS, message);
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
    response
}

fn describe(chosen: &[TargetProcess], what: &str) -> String {
    let mut s = what.to_owned();
    if let Some(t) = chosen.first() {
        if !t.labels.container.is_empty() {
            let _ = write!(s, " ({} {})", t.labels.container, t.labels.image);
        }
        let _ = write!(s, " — {} process(es) of {}", chosen.len(), t.labels.process);
    }
    s
}

// ─── pprof endpoints (Grafana Pyroscope's `pyroscope.scrape`, Parca) ────────────────────────
// `/debug/pprof/profile` and `/debug/pprof/offcpu` serve the continuous sampler's recent
// window at once (no sleeping: scrapes never time out); `/flamegraph?format=pprof` uses the
// same encoding ([`crate::output::pprof`]).

/// The pprof routes, registered next to `/flamegraph`.
fn pprof_routes() -> Router<Arc<Shared>> {
    Router::new()
        .route("/debug/pprof/profile", get(pprof_profile))
        .route("/debug/pprof/offcpu", get(pprof_offcpu))
        .route("/debug/pprof/stalls", get(pprof_stalls))
}

/// Largest `seconds` accepted; above `sampling.retention_seconds` it is clamped to it.
const MAX_PPROF_SECONDS: u64 = 86_400;
/// `seconds` when absent, as Go's `net/http/pprof`.
const DEFAULT_PPROF_SECONDS: u64 = 30;

/// A validated pprof endpoint request.
#[derive(Debug)]
struct PprofRequest {
    seconds: u64,
    selector: Option<Selector>,
    filter: Filter,
}

fn parse_pprof(q: &HashMap<String, String>) -> Result<PprofRequest, RequestError> {
    request::check_known(q, &["seconds", "pid", "container", "plugin", "phase"])?;
    let seconds = match q.get("seconds") {
        None => DEFAULT_PPROF_SECONDS,
        Some(s) => s
            .parse::<u64>()
            .ok()
            .filter(|s| (1..=MAX_PPROF_SECONDS).contains(s))
            .ok_or_else(|| RequestError {
                message: format!(
                    "seconds={s:?} must be a whole number of seconds, 1..={MAX_PPROF_SECONDS} \
                     (above sampling.retention_seconds it is clamped to it)"
                ),
            })?,
    };
    Ok(PprofRequest {
        seconds,
        selector: request::parse_selector(q)?,
        filter: request::parse_filter(q)?,
    })
}

async fn pprof_profile(
    State(shared): State<Arc<Shared>>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    pprof_endpoint(shared, &q, Retention::Cpu).await
}

async fn pprof_offcpu(
    State(shared): State<Arc<Shared>>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    pprof_endpoint(shared, &q, Retention::OffCpu).await
}

async fn pprof_stalls(
    State(shared): State<Arc<Shared>>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    pprof_endpoint(shared, &q, Retention::Stalls).await
}

async fn pprof_endpoint(
    shared: Arc<Shared>,
    q: &HashMap<String, String>,
    which: Retention,
) -> Response {
    let req = match parse_pprof(q) {
        Ok(r) => r,
        Err(e) => return bad_request(e),
    };
    let cfg = &shared.config.sampling;
    if which == Retention::OffCpu && !cfg.offcpu.enabled {
        return error(
            StatusCode::NOT_FOUND,
            "off-CPU profiling is off: set sampling.offcpu.enabled to serve /debug/pprof/offcpu"
                .to_owned(),
        );
    }
    let served = req.seconds.min(cfg.retention_seconds);
    let mut headers = vec![("x-profile-seconds", served.to_string())];
    if served < req.seconds {
        headers.push((
            "x-profile-clamped",
            format!(
                "seconds={} exceeds sampling.retention_seconds={}; served {served}",
                req.seconds, cfg.retention_seconds
            ),
        ));
    }
    let (pids, what) = match &req.selector {
        None => (None, "every target".to_owned()),
        Some(selector) => {
            let chosen = match chosen(&shared, selector) {
                Ok(c) => c,
                Err(response) => return response,
            };
            let pids: Vec<u32> = chosen.iter().map(|t| t.pid).collect();
            (Some(pids), describe(&chosen, &selector.describe()))
        }
    };
    let what = match which {
        Retention::Cpu => format!(
            "{what}: on-CPU, continuous sampling at {} Hz",
            cfg.frequency_hz
        ),
        Retention::OffCpu => format!(
            "{what}: off-CPU, blocks ≥ {} µs, idle epoll waits excluded",
            cfg.offcpu.min_block_us
        ),
        Retention::Stalls => format!(
            "{what}: event-loop stalls (iterations ≥ {} ms), stall time",
            cfg.stalls.threshold_ms
        ),
    };
    let title = if req.filter.is_empty() {
        what
    } else {
        format!("{what} — {}", req.filter.describe())
    };
    window_profile(
        &shared,
        which,
        served,
        move |pid, _| pids.as_ref().is_none_or(|p| p.contains(&pid)),
        req.filter,
        title,
        headers,
    )
    .await
}

/// The pprof response of the retained samples of `which` of the last `seconds`.
async fn window_profile(
    shared: &Arc<Shared>,
    which: Retention,
    seconds: u64,
    keep: impl Fn(u32, &str) -> bool,
    filter: Filter,
    title: String,
    mut headers: Vec<(&'static str, String)>,
) -> Response {
    // Before the copy: a refused request costs nothing.
    let Ok(slot) = shared.pprof_encodes.clone().try_acquire_owned() else {
        let mut response = error(
            StatusCode::TOO_MANY_REQUESTS,
            format!("{PPROF_AT_ONCE} pprof profiles are being encoded already; retry in a moment"),
        );
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
        return response;
    };
    let to = std::time::Instant::now();
    let wall_to = SystemTime::now();
    let cut_started = thread_cpu();
    let from = to.checked_sub(Duration::from_secs(seconds)).unwrap_or(to);
    let window = shared
        .aggregator
        .snapshot(which)
        .cut(from, to, keep, &filter);
    let cut_cpu = thread_cpu().saturating_sub(cut_started);
    if window.truncated {
        headers.push((
            "x-profile-truncated",
            "sampling.max_retained_samples dropped samples of this window: it starts later"
                .to_owned(),
        ));
    }
    let kind = match which {
        Retention::Cpu => pprof::Kind::cpu(shared.config.sampling.frequency_hz),
        Retention::OffCpu => pprof::Kind::OffCpu,
        Retention::Stalls => pprof::Kind::Stalls,
    };
    let covered = to.duration_since(window.from);
    let samples: u64 = window.stacks.iter().map(|w| w.count).sum();
    let stacks = window.stacks.len();
    let encoded = on_encoder_thread(move || {
        let started = thread_cpu();
        let mut b = pprof::ProfileBuilder::new(kind);
        b.comment(&title);
        for w in &window.stacks {
            let t = &w.target;
            let process = [t.container.as_str(), t.image.as_str(), t.process.as_str()];
            let labels = render::sample_labels(process, &w.attribution);
            b.add(&w.stack, &w.details, &labels, w.count, w.weight);
        }
        let start = wall_to.checked_sub(covered).unwrap_or(wall_to);
        let profile = b.build(start, covered);
        let built = thread_cpu().saturating_sub(started);
        let gz = pprof::gzip(&profile);
        let gzipped = thread_cpu().saturating_sub(started).saturating_sub(built);
        // Held until the window's copy is encoded, also when the client hung up.
        drop(slot);
        (gz, built, gzipped)
    })
    .await;
    let ms = |d: Duration| format!("{:.2}", d.as_secs_f64() * 1e3);
    let encoded = encoded.map(|(gz, built, gzipped)| {
        if let Ok(bytes) = &gz {
            // Costs for bench/pprof_cost.py: wall time, and CPU time of each step.
            tracing::debug!(
                seconds,
                samples,
                stacks,
                bytes = bytes.len(),
                millis = %ms(to.elapsed()),
                cut_cpu_ms = %ms(cut_cpu),
                build_cpu_ms = %ms(built),
                gzip_cpu_ms = %ms(gzipped),
                "pprof profile served"
            );
        }
        gz
    });
    pprof_response(encoded, headers)
}

/// A gzip-compressed profile as Go's `net/http/pprof` serves one, with extra `headers`.
fn pprof_response(
    encoded: Result<std::io::Result<Vec<u8>>, EncoderGone>,
    headers: Vec<(&'static str, String)>,
) -> Response {
    let bytes = match encoded {
        Ok(Ok(b)) => b,
        Ok(Err(e)) => return error(StatusCode::INTERNAL_SERVER_ERROR, format!("encoding: {e}")),
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    };
    let mut response = (
        [
            (header::CONTENT_TYPE, "application/octet-stream"),
            (
                header::CONTENT_DISPOSITION,
                "attachment; filename=\"profile\"",
            ),
        ],
        bytes,
    )
        .into_response();
    for (name, value) in headers {
        if let Ok(v) = header::HeaderValue::from_str(&value) {
            response
                .headers_mut()
                .insert(header::HeaderName::from_static(name), v);
        }
    }
    response
}

/// CPU time of the calling thread so far (zero where the clock cannot be read).
fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; the call has no other effect.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return Duration::ZERO;
    }
    Duration::new(
        u64::try_from(ts.tv_sec).unwrap_or(0),
        u32::try_from(ts.tv_nsec).unwrap_or(0),
    )
}

/// How capture titles give the time: `YYYY-MM-DD HH:MM:SS UTC`.
const UTC_DATE: &[time::format_description::BorrowedFormatItem<'_>] =
    time::macros::format_description!("[year]-[month]-[day] [hour]:[minute]:[second] UTC");

#[cfg(test)]
mod tests;
