//! The daemon's HTTP endpoint (axum):
//! - `GET /metrics`: OpenMetrics text when the client accepts it, else the Prometheus text
//!   format ([`super::metrics`]).
//! - `GET /flamegraph?pid=PID|container=NAME[&seconds=N][&format=svg|collapsed|json|pprof]
//!   [&frequency=HZ][&mode=cpu|off-cpu|alloc|live][&sample_bytes=N][&idle=exclude|include]
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
//! - `GET /flamegraph?mode=stalls[&pid=…|&container=…][&format=svg|collapsed|json|pprof]
//!   [&plugin=…][&phase=…]` and `GET /debug/pprof/stalls?…`: the retained stall samples
//!   (taken while their worker's event-loop iteration was older than
//!   `sampling.stalls.threshold_ms`), weighted in microseconds of stall time, every target
//!   unless narrowed ([`stalls_flamegraph`]).
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
//! on blocking threads, the aggregator's lock held only to copy references.
//! Handlers only read shared state or start a capture; nothing a client sends names a file.
//!
//! The profiling endpoints (`/flamegraph`, the pprof ones) form one group that
//! `http.profiling_endpoints: false` turns off (404 saying so). With credentials configured
//! every request but an open `/healthz` goes through [`super::auth::require`]; connections,
//! TLS and their limits are [`super::listener`]'s.
//!
//! Hooks: a TCP listener (through [`super::listener`]). Metrics: none of its own.

use std::{
    collections::HashMap,
    fmt::Write as _,
    sync::{Arc, atomic::Ordering},
    time::{Duration, SystemTime},
};

use axum::{
    Extension, Json, Router,
    extract::{Query, Request, State},
    http::{StatusCode, header},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::get,
};

use super::{
    Shared,
    aggregate::Retention,
    auth::{self, Auth, Caller},
    listener::{self, Limits},
    state::{PPROF_AT_ONCE, RENDERS_AT_ONCE},
    tls::Tls,
};
use crate::{
    attribution::{self, Filter, Phase, Rules},
    discovery::{Lua, TargetProcess, procfs},
    luajit::NameStyle,
    output::{Folded, pprof},
    sampling::capture::{self, CaptureTarget},
    stacks::StackOptions,
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

async fn profiling_disabled(_req: Request, _next: Next) -> Response {
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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ResponseFormat {
    Svg,
    Collapsed,
    Json,
    Pprof,
}

/// What a `/flamegraph` capture measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RequestMode {
    Cpu,
    OffCpu,
    Alloc,
    Live,
}

/// A validated `/flamegraph` request.
#[derive(Debug)]
struct FlameRequest {
    selector: Selector,
    seconds: Option<u64>,
    frequency: u64,
    format: ResponseFormat,
    mode: RequestMode,
    /// Alloc / live: mean allocated bytes between two sampled stacks.
    sample_bytes: u64,
    /// Off-CPU: keep idle `epoll_wait` blocks.
    include_idle: bool,
    /// Captures: a `[trace N]` pseudo-frame where a JIT trace runs.
    trace_frames: bool,
    /// Only the stacks of this plugin / phase.
    filter: Filter,
}

#[derive(Debug, Clone)]
enum Selector {
    Pid(u32),
    Container(String),
}

type BadRequest = (StatusCode, String);

fn bad(message: impl Into<String>) -> BadRequest {
    (StatusCode::BAD_REQUEST, message.into())
}

/// Defaults of a `/flamegraph` request from the configuration.
#[derive(Debug, Clone, Copy)]
struct Defaults {
    max_seconds: u64,
    frequency: u64,
    sample_bytes: u64,
}

fn parse_request(
    q: &HashMap<String, String>,
    defaults: Defaults,
) -> Result<FlameRequest, BadRequest> {
    let Defaults {
        max_seconds,
        frequency: default_frequency,
        sample_bytes: default_sample_bytes,
    } = defaults;
    const KNOWN: [&str; 11] = [
        "pid",
        "container",
        "seconds",
        "format",
        "frequency",
        "mode",
        "sample_bytes",
        "idle",
        "trace_frames",
        "plugin",
        "phase",
    ];
    check_known(q, &KNOWN)?;
    let selector =
        parse_selector(q)?.ok_or_else(|| bad("give exactly one of pid=PID or container=NAME"))?;
    let seconds = match q.get("seconds") {
        None => None,
        Some(s) => Some(
            s.parse::<u64>()
                .ok()
                .filter(|s| (1..=max_seconds).contains(s))
                .ok_or_else(|| bad(format!("seconds={s:?} must be 1..={max_seconds}")))?,
        ),
    };
    let frequency = match q.get("frequency") {
        None => default_frequency,
        Some(_) if seconds.is_none() => {
            return Err(bad(
                "frequency applies to captures (with seconds=N); recent stacks were sampled continuously",
            ));
        }
        Some(f) => f
            .parse::<u64>()
            .ok()
            .filter(|f| (1..=1000).contains(f))
            .ok_or_else(|| bad(format!("frequency={f:?} must be 1..=1000")))?,
    };
    let format = match q.get("format").map(String::as_str) {
        None | Some("svg") => ResponseFormat::Svg,
        Some("collapsed") => ResponseFormat::Collapsed,
        Some("json") => ResponseFormat::Json,
        Some("pprof") => ResponseFormat::Pprof,
        Some(f) => {
            return Err(bad(format!(
                "format={f:?} must be svg, collapsed, json or pprof"
            )));
        }
    };
    let mode = match q.get("mode").map(String::as_str) {
        None | Some("cpu") => RequestMode::Cpu,
        Some("off-cpu") => RequestMode::OffCpu,
        Some("alloc") => RequestMode::Alloc,
        Some("live") => RequestMode::Live,
        Some(m) => {
            return Err(bad(format!(
                "mode={m:?} must be cpu, off-cpu, alloc, live or stalls"
            )));
        }
    };
    let name = q.get("mode").map_or("cpu", String::as_str);
    if mode != RequestMode::Cpu && seconds.is_none() {
        return Err(bad(format!(
            "mode={name} needs seconds=N (it is captured on demand)"
        )));
    }
    if mode != RequestMode::Cpu && q.contains_key("frequency") {
        return Err(bad(format!("frequency does not apply to mode={name}")));
    }
    let sample_bytes = match q.get("sample_bytes") {
        None => default_sample_bytes,
        Some(_) if !matches!(mode, RequestMode::Alloc | RequestMode::Live) => {
            return Err(bad("sample_bytes applies to mode=alloc and mode=live"));
        }
        Some(b) => b
            .parse::<u64>()
            .ok()
            .filter(|b| capture::SAMPLE_BYTES_RANGE.contains(b))
            .ok_or_else(|| {
                bad(format!(
                    "sample_bytes={b:?} must be {}..={}",
                    capture::SAMPLE_BYTES_RANGE.start(),
                    capture::SAMPLE_BYTES_RANGE.end()
                ))
            })?,
    };
    let include_idle = match q.get("idle").map(String::as_str) {
        None | Some("exclude") => false,
        Some("include") => true,
        Some(i) => return Err(bad(format!("idle={i:?} must be exclude or include"))),
    };
    let trace_frames = match q.get("trace_frames").map(String::as_str) {
        None | Some("0") => false,
        Some("1") if seconds.is_some() => true,
        Some("1") => {
            return Err(bad(
                "trace_frames=1 applies to captures (with seconds=N); recent stacks were sampled without it",
            ));
        }
        Some(t) => return Err(bad(format!("trace_frames={t:?} must be 0 or 1"))),
    };
    Ok(FlameRequest {
        filter: parse_filter(q)?,
        selector,
        seconds,
        frequency,
        format,
        mode,
        sample_bytes,
        include_idle,
        trace_frames,
    })
}

/// A 400 for the first parameter of `q` not in `known`.
fn check_known(q: &HashMap<String, String>, known: &[&str]) -> Result<(), BadRequest> {
    match q.keys().find(|k| !known.contains(&k.as_str())) {
        Some(k) => Err(bad(format!(
            "unknown parameter {k:?}; known: {}",
            known.join(", ")
        ))),
        None => Ok(()),
    }
}

/// `pid=PID` or `container=NAME` (`None`: neither).
fn parse_selector(q: &HashMap<String, String>) -> Result<Option<Selector>, BadRequest> {
    match (q.get("pid"), q.get("container")) {
        (Some(p), None) => Ok(Some(Selector::Pid(
            p.parse::<u32>()
                .ok()
                .filter(|p| *p > 0)
                .ok_or_else(|| bad(format!("pid={p:?} is not a process id")))?,
        ))),
        (None, Some(c)) if !c.is_empty() && c.len() <= 128 => {
            Ok(Some(Selector::Container(c.clone())))
        }
        (None, Some(_)) => Err(bad("container must be 1 to 128 characters")),
        (Some(_), Some(_)) => Err(bad("give only one of pid=PID or container=NAME")),
        (None, None) => Ok(None),
    }
}

/// `plugin=NAME` and `phase=NAME`.
fn parse_filter(q: &HashMap<String, String>) -> Result<Filter, BadRequest> {
    let plugin = match q.get("plugin") {
        None => None,
        Some(p)
            if p == attribution::CORE
                || (!p.is_empty()
                    && p.len() <= attribution::MAX_PLUGIN_LEN
                    && attribution::sanitise(p) == *p) =>
        {
            Some(p.clone())
        }
        Some(p) => {
            return Err(bad(format!(
                "plugin={p:?} must be 1 to {} characters of [A-Za-z0-9_.-], or {}",
                attribution::MAX_PLUGIN_LEN,
                attribution::CORE
            )));
        }
    };
    let phase = match q.get("phase") {
        None => None,
        Some(p) => Some(Phase::parse(p).ok_or_else(|| {
            let names: Vec<&str> = Phase::ALL.iter().map(|p| p.name()).collect();
            bad(format!("phase={p:?} must be one of {}", names.join(", ")))
        })?),
    };
    Ok(Filter { plugin, phase })
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
fn refuse_capture(shared: &Shared, caller: Option<&Caller>, mode: RequestMode) -> Option<Response> {
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
    if matches!(mode, RequestMode::Alloc | RequestMode::Live) && !interval.is_zero() {
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

async fn flamegraph(
    State(shared): State<Arc<Shared>>,
    caller: Option<Extension<Caller>>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    if q.get("mode").is_some_and(|m| m == "stalls") {
        return stalls_flamegraph(&shared, &q).await;
    }
    let cfg = &shared.config.sampling;
    let defaults = Defaults {
        max_seconds: cfg.max_capture_seconds,
        frequency: cfg.on_demand_frequency_hz,
        sample_bytes: cfg.memory.sample_bytes,
    };
    let req = match parse_request(&q, defaults) {
        Ok(r) => r,
        Err((status, message)) => return error(status, message),
    };
    let snapshot = shared.targets.read().map(|t| t.clone()).unwrap_or_default();
    let chosen = select(&snapshot, &req.selector);
    let what = match &req.selector {
        Selector::Pid(pid) => format!("pid {pid}"),
        Selector::Container(c) => format!("container {c}"),
    };
    if chosen.is_empty() {
        return error(
            StatusCode::NOT_FOUND,
            format!("{what} is not a profiled target (see /targets)"),
        );
    }
    let describe = describe(&chosen, &what);
    let (folded, title, unit) = match req.seconds {
        None if req.format == ResponseFormat::Pprof => {
            let pids: Vec<u32> = chosen.iter().map(|t| t.pid).collect();
            let title = format!(
                "{describe}: last {}s of continuous sampling at {} Hz",
                cfg.retention_seconds, cfg.frequency_hz
            );
            return window_profile(
                &shared,
                Retention::Cpu,
                cfg.retention_seconds,
                move |pid, _| pids.contains(&pid),
                req.filter,
                title,
                Vec::new(),
            )
            .await;
        }
        None => {
            let pids: Vec<u32> = chosen.iter().map(|t| t.pid).collect();
            return window_flamegraph(&shared, pids, &describe, req.filter, req.format).await;
        }
        Some(seconds) => {
            if let Some(refused) = refuse_capture(&shared, caller.as_ref().map(|c| &c.0), req.mode)
            {
                return refused;
            }
            let Ok(permit) = shared.captures.clone().try_acquire_owned() else {
                return busy(format!(
                    "{} captures already running (sampling.max_concurrent_captures)",
                    cfg.max_concurrent_captures
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
            let mode = match req.mode {
                RequestMode::OffCpu => capture::Mode::OffCpu {
                    min_block_us: cfg.offcpu.min_block_us,
                    exclude_idle: !req.include_idle,
                },
                RequestMode::Cpu => capture::Mode::Cpu {
                    frequency: req.frequency,
                },
                RequestMode::Alloc | RequestMode::Live => capture::Mode::Alloc {
                    sample_bytes: req.sample_bytes,
                    live: req.mode == RequestMode::Live,
                },
            };
            let worker = shared.clone();
            let trace_frames = req.trace_frames;
            tracing::info!(
                target = what,
                seconds,
                mode = mode.describe(),
                "capture started"
            );
            let result = tokio::task::spawn_blocking(move || {
                let cap = capture::capture(
                    &targets,
                    Duration::from_secs(seconds),
                    mode,
                    StackOptions {
                        style: NameStyle::FirstLine,
                        trace_frames,
                    },
                    &worker.stop,
                    |_| {},
                );
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
                Ok(Err(e)) => {
                    return error(StatusCode::INTERNAL_SERVER_ERROR, format!("capture: {e}"));
                }
                Err(e) => {
                    return error(StatusCode::INTERNAL_SERVER_ERROR, format!("capture: {e}"));
                }
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
            let mut title = format!(
                "{describe} — {:.0}s {} from {}",
                cap.elapsed.as_secs_f64(),
                mode.describe(),
                utc_now()
            );
            if let Some(a) = &cap.alloc {
                let c = &cap.counters;
                let lost = c[apisix_ebpf_common::Counter::RingbufFull as usize];
                let dropped = c[apisix_ebpf_common::Counter::LiveMapFull as usize];
                let no_return = c[apisix_ebpf_common::Counter::AllocNoReturn as usize];
                if lost > 0 {
                    let _ = write!(title, " — {lost} sampled stacks lost (ring buffer full)");
                }
                if dropped > 0 {
                    let _ = write!(
                        title,
                        " — {dropped} sampled blocks not tracked (tracking map full)"
                    );
                }
                if no_return > 0 {
                    let _ = write!(
                        title,
                        " — {no_return} allocator calls without a return seen (their blocks, \
                         if sampled, not tracked)"
                    );
                }
                if !a.unsettled.is_empty() {
                    let _ = write!(
                        title,
                        " — the Lua collector completed no cycle within {}s of the end: \
                         garbage not collected yet included",
                        capture::SETTLE_WAIT.as_secs()
                    );
                }
                if !a.skipped.is_empty() {
                    let _ = write!(title, " — skipped: {}", a.skipped.join("; "));
                }
            }
            if req.format == ResponseFormat::Pprof {
                let kind = match mode {
                    capture::Mode::Cpu { frequency } => pprof::Kind::cpu(frequency),
                    capture::Mode::OffCpu { .. } => pprof::Kind::OffCpu,
                    capture::Mode::Alloc {
                        sample_bytes,
                        live: false,
                    } => pprof::Kind::Alloc { sample_bytes },
                    capture::Mode::Alloc {
                        sample_bytes,
                        live: true,
                    } => pprof::Kind::Live { sample_bytes },
                };
                return capture_profile(&shared, &chosen, cap, kind, &req.filter, &title).await;
            }
            (
                req.filter.apply(&shared.rules, &cap.folded),
                title,
                mode.unit(),
            )
        }
    };
    // Rendered on a blocking thread, off the async workers; the capture's own permit bounds
    // how many run at once.
    let worker = shared.clone();
    tokio::task::spawn_blocking(move || {
        let _background = Background::enter();
        let title = filtered_title(title, &req.filter, &folded);
        render(&folded, req.format, &title, unit, &worker.rules)
    })
    .await
    .unwrap_or_else(|e| error(StatusCode::INTERNAL_SERVER_ERROR, format!("rendering: {e}")))
}

/// The flame graph of the retained window of `pids`: the aggregator's lock is held while
/// references to the stacks are copied; folding and rendering run on a blocking thread, off
/// the async workers (`/healthz`, handshakes), at most [`RENDERS_AT_ONCE`] at once (429).
async fn window_flamegraph(
    shared: &Arc<Shared>,
    pids: Vec<u32>,
    describe: &str,
    filter: Filter,
    format: ResponseFormat,
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
        "{describe} — last {}s of continuous sampling at {} Hz",
        cfg.retention_seconds, cfg.frequency_hz
    );
    let worker = shared.clone();
    let rendered = tokio::task::spawn_blocking(move || {
        let _background = Background::enter();
        let stacks = match worker.aggregator.lock() {
            Ok(agg) => agg.recent_stacks(window, |pid, _| pids.contains(&pid), &filter),
            Err(_) => {
                return error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "aggregator poisoned".into(),
                );
            }
        };
        let mut folded = Folded::new();
        for stack in stacks {
            folded.add(stack.to_vec(), 1);
        }
        let title = filtered_title(title, &filter, &folded);
        let response = render(&folded, format, &title, "samples", &worker.rules);
        drop(slot);
        response
    })
    .await;
    rendered.unwrap_or_else(|e| error(StatusCode::INTERNAL_SERVER_ERROR, format!("rendering: {e}")))
}

/// `/flamegraph?mode=stalls`: the flame graph (or pprof profile) of the retained stall
/// samples of the selected targets, or of every target, weighted in microseconds of stall
/// time; folded and rendered like [`window_flamegraph`].
async fn stalls_flamegraph(shared: &Arc<Shared>, q: &HashMap<String, String>) -> Response {
    let parsed = check_known(
        q,
        &["mode", "pid", "container", "format", "plugin", "phase"],
    )
    .and_then(|()| Ok((parse_selector(q)?, parse_filter(q)?)));
    let (selector, filter) = match parsed {
        Ok(p) => p,
        Err((status, message)) => return error(status, message),
    };
    let format = match q.get("format").map(String::as_str) {
        None | Some("svg") => ResponseFormat::Svg,
        Some("collapsed") => ResponseFormat::Collapsed,
        Some("json") => ResponseFormat::Json,
        Some("pprof") => ResponseFormat::Pprof,
        Some(f) => {
            let message = format!("format={f:?} must be svg, collapsed, json or pprof");
            return error(StatusCode::BAD_REQUEST, message);
        }
    };
    let cfg = &shared.config.sampling;
    let (pids, what) = match &selector {
        None => (None, "every target".to_owned()),
        Some(selector) => {
            let snapshot = shared.targets.read().map(|t| t.clone()).unwrap_or_default();
            let chosen = select(&snapshot, selector);
            let what = match selector {
                Selector::Pid(pid) => format!("pid {pid}"),
                Selector::Container(c) => format!("container {c}"),
            };
            if chosen.is_empty() {
                let message = format!("{what} is not a profiled target (see /targets)");
                return error(StatusCode::NOT_FOUND, message);
            }
            let pids: Vec<u32> = chosen.iter().map(|t| t.pid).collect();
            (Some(pids), describe(&chosen, &what))
        }
    };
    let keep = move |pid: u32, _: &str| pids.as_ref().is_none_or(|p| p.contains(&pid));
    let title = format!(
        "{what} — event-loop stalls (iterations ≥ {} ms), last {}s of continuous sampling at {} Hz",
        cfg.stalls.threshold_ms, cfg.retention_seconds, cfg.frequency_hz
    );
    if format == ResponseFormat::Pprof {
        let seconds = cfg.retention_seconds;
        return window_profile(
            shared,
            Retention::Stalls,
            seconds,
            keep,
            filter,
            title,
            vec![],
        )
        .await;
    }
    let Ok(slot) = shared.renders.clone().try_acquire_owned() else {
        return busy(format!(
            "{RENDERS_AT_ONCE} flame graphs of the retained window are being rendered already; \
             retry in a moment"
        ));
    };
    let to = std::time::Instant::now();
    let from = to
        .checked_sub(Duration::from_secs(cfg.retention_seconds))
        .unwrap_or(to);
    let window = match shared.aggregator.lock() {
        Ok(agg) => agg.window(Retention::Stalls, from, to, keep, &filter),
        Err(_) => {
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "aggregator poisoned".into(),
            );
        }
    };
    let rules = shared.rules.clone();
    let rendered = tokio::task::spawn_blocking(move || {
        let _background = Background::enter();
        let mut folded = Folded::new();
        let mut longest = 0;
        for w in &window.stacks {
            folded.add(w.stack.to_vec(), w.weight);
            longest = longest.max(w.iteration_ms);
        }
        let title = if longest > 0 {
            format!("{title}; longest iteration seen ≥ {longest} ms")
        } else {
            title
        };
        let title = filtered_title(title, &filter, &folded);
        let response = render(&folded, format, &title, "µs", &rules);
        drop(slot);
        response
    })
    .await;
    rendered.unwrap_or_else(|e| error(StatusCode::INTERNAL_SERVER_ERROR, format!("rendering: {e}")))
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

/// `title` with what `filter` kept, or that it kept nothing.
fn filtered_title(title: String, filter: &Filter, folded: &Folded) -> String {
    if filter.is_empty() {
        title
    } else if folded.total() == 0 {
        format!("{title} — {}: no samples matched", filter.describe())
    } else {
        format!("{title} — {}", filter.describe())
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

fn render(
    folded: &Folded,
    format: ResponseFormat,
    title: &str,
    unit: &str,
    rules: &Rules,
) -> Response {
    match format {
        ResponseFormat::Svg => {
            let mut out = Vec::new();
            match folded.write_svg_unit(title, unit, &mut out) {
                Ok(()) => ([(header::CONTENT_TYPE, "image/svg+xml")], out).into_response(),
                Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, format!("rendering: {e}")),
            }
        }
        ResponseFormat::Collapsed => {
            let mut out = Vec::new();
            match folded.write_folded(&mut out) {
                Ok(()) => {
                    ([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], out).into_response()
                }
                Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, format!("rendering: {e}")),
            }
        }
        // `flamegraph` answers pprof requests itself (from stacks with their frame details).
        ResponseFormat::Pprof => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "pprof is not rendered from folded stacks".to_owned(),
        ),
        ResponseFormat::Json => Json(serde_json::json!({
            "title": title,
            "unit": unit,
            "total": folded.total(),
            "root": folded.to_json(),
            "stacks": stacks_json(folded, rules),
        }))
        .into_response(),
    }
}

/// Each distinct stack with its weight, plugin and phase, heaviest first.
fn stacks_json(folded: &Folded, rules: &Rules) -> serde_json::Value {
    let mut v: Vec<(&[Arc<str>], u64)> = folded.iter().collect();
    v.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(b.0)));
    v.into_iter()
        .map(|(stack, n)| {
            let a = rules.classify(stack);
            let frames: Vec<&str> = stack.iter().map(|f| &**f).collect();
            serde_json::json!({
                "frames": frames,
                "value": n,
                "plugin": a.plugin,
                "phase": a.phase.name(),
            })
        })
        .collect()
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

fn parse_pprof(q: &HashMap<String, String>) -> Result<PprofRequest, BadRequest> {
    check_known(q, &["seconds", "pid", "container", "plugin", "phase"])?;
    let seconds = match q.get("seconds") {
        None => DEFAULT_PPROF_SECONDS,
        Some(s) => s
            .parse::<u64>()
            .ok()
            .filter(|s| (1..=MAX_PPROF_SECONDS).contains(s))
            .ok_or_else(|| {
                bad(format!(
                    "seconds={s:?} must be a whole number of seconds, 1..={MAX_PPROF_SECONDS} \
                     (above sampling.retention_seconds it is clamped to it)"
                ))
            })?,
    };
    Ok(PprofRequest {
        seconds,
        selector: parse_selector(q)?,
        filter: parse_filter(q)?,
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
        Err((status, message)) => return error(status, message),
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
            let snapshot = shared.targets.read().map(|t| t.clone()).unwrap_or_default();
            let chosen = select(&snapshot, selector);
            let what = match selector {
                Selector::Pid(pid) => format!("pid {pid}"),
                Selector::Container(c) => format!("container {c}"),
            };
            if chosen.is_empty() {
                return error(
                    StatusCode::NOT_FOUND,
                    format!("{what} is not a profiled target (see /targets)"),
                );
            }
            let pids: Vec<u32> = chosen.iter().map(|t| t.pid).collect();
            (Some(pids), describe(&chosen, &what))
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
    let window = match shared.aggregator.lock() {
        Ok(agg) => agg.window(which, from, to, keep, &filter),
        Err(_) => {
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "aggregator poisoned".into(),
            );
        }
    };
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
            let labels = [
                ("container", t.container.as_str()),
                ("image", t.image.as_str()),
                ("process", t.process.as_str()),
                ("plugin", w.attribution.plugin.as_str()),
                ("phase", w.attribution.phase.name()),
            ];
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

/// The pprof response of an on-demand capture of the `chosen` targets.
async fn capture_profile(
    shared: &Arc<Shared>,
    chosen: &[TargetProcess],
    cap: capture::Capture,
    kind: pprof::Kind,
    filter: &Filter,
    title: &str,
) -> Response {
    let labels: HashMap<u32, crate::discovery::Labels> =
        chosen.iter().map(|t| (t.pid, t.labels.clone())).collect();
    let rules = shared.rules.clone();
    let filter = filter.clone();
    let title = title.to_owned();
    let encoded = on_encoder_thread(move || {
        let mut b = pprof::ProfileBuilder::new(kind);
        b.comment(&title);
        let mut verdicts: HashMap<&[Arc<str>], Option<attribution::Attribution>> = HashMap::new();
        for (pid, stack, details, count, weight) in cap.detailed.iter() {
            let Some(a) = verdicts
                .entry(stack)
                .or_insert_with(|| {
                    let a = rules.classify(stack);
                    filter.keeps(&a).then_some(a)
                })
                .as_ref()
            else {
                continue;
            };
            let t = labels.get(pid);
            let field = |f: fn(&crate::discovery::Labels) -> &str| t.map_or("", f);
            let labels = [
                ("container", field(|l| &l.container)),
                ("image", field(|l| &l.image)),
                ("process", field(|l| &l.process)),
                ("plugin", a.plugin.as_str()),
                ("phase", a.phase.name()),
            ];
            b.add(stack, details, &labels, count, weight);
        }
        let now = SystemTime::now();
        let start = now.checked_sub(cap.elapsed).unwrap_or(now);
        pprof::gzip(&b.build(start, cap.elapsed))
    })
    .await;
    pprof_response(encoded, Vec::new())
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

/// The encoding thread is gone, or the encoding panicked.
#[derive(Debug, thiserror::Error)]
#[error("the pprof encoder thread is gone")]
struct EncoderGone;

type EncodeJob = Box<dyn FnOnce() + Send>;

/// Runs `job` on the one thread that encodes pprof profiles, one at a time. One thread because
/// glibc keeps the memory a thread freed in that thread's arena: encodings spread over the
/// blocking pool's threads would each keep an encoding's working set (about 10 MiB for a
/// busy 60 s window), a single thread keeps one, however many scrapes and scrapers.
async fn on_encoder_thread<T: Send + 'static>(
    job: impl FnOnce() -> T + Send + 'static,
) -> Result<T, EncoderGone> {
    static ENCODER: std::sync::OnceLock<Option<std::sync::mpsc::Sender<EncodeJob>>> =
        std::sync::OnceLock::new();
    let sender = ENCODER.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel::<EncodeJob>();
        std::thread::Builder::new()
            .name("pprof-encoder".to_owned())
            .spawn(move || {
                for job in rx {
                    // A job that panics fails its own request only.
                    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
                }
            })
            .map_err(|e| tracing::warn!(error = %e, "cannot start the pprof encoder thread"))
            .ok()
            .map(|_| tx)
    });
    let (tx, rx) = tokio::sync::oneshot::channel();
    let job: EncodeJob = Box::new(move || {
        let _ = tx.send(job());
    });
    match sender {
        Some(s) => s.send(job).map_err(|_| EncoderGone)?,
        // No thread could be started: encode on the blocking pool.
        None => drop(tokio::task::spawn_blocking(job)),
    }
    rx.await.map_err(|_| EncoderGone)
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

/// The current UTC time as `YYYY-MM-DD HH:MM:SS UTC`.
fn utc_now() -> String {
    let secs = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    const DEFAULTS: Defaults = Defaults {
        max_seconds: 120,
        frequency: 99,
        sample_bytes: 524_288,
    };

    fn status(pairs: &[(&str, &str)]) -> Option<StatusCode> {
        parse_request(&q(pairs), DEFAULTS).err().map(|(s, _)| s)
    }

    #[test]
    fn valid_requests() {
        let r = match parse_request(&q(&[("pid", "12"), ("seconds", "3")]), DEFAULTS) {
            Ok(r) => r,
            Err(e) => panic!("{e:?}"),
        };
        assert!(matches!(r.selector, Selector::Pid(12)));
        assert_eq!(r.seconds, Some(3));
        assert_eq!(r.frequency, 99);
        assert_eq!(r.format, ResponseFormat::Svg);
        assert!(parse_request(&q(&[("container", "gw"), ("format", "json")]), DEFAULTS).is_ok());
        let r = match parse_request(
            &q(&[("pid", "1"), ("plugin", "key-auth"), ("phase", "access")]),
            DEFAULTS,
        ) {
            Ok(r) => r,
            Err(e) => panic!("{e:?}"),
        };
        assert_eq!(r.filter.plugin.as_deref(), Some("key-auth"));
        assert_eq!(r.filter.phase, Some(Phase::Access));
        assert!(parse_request(&q(&[("pid", "1"), ("plugin", "[core]")]), DEFAULTS).is_ok());
        let r = match parse_request(
            &q(&[("pid", "1"), ("seconds", "5"), ("mode", "live")]),
            DEFAULTS,
        ) {
            Ok(r) => r,
            Err(e) => panic!("{e:?}"),
        };
        assert_eq!(r.mode, RequestMode::Live);
        assert_eq!(r.sample_bytes, 524_288);
        let r = match parse_request(
            &q(&[
                ("pid", "1"),
                ("seconds", "5"),
                ("mode", "alloc"),
                ("sample_bytes", "65536"),
            ]),
            DEFAULTS,
        ) {
            Ok(r) => r,
            Err(e) => panic!("{e:?}"),
        };
        assert_eq!(r.mode, RequestMode::Alloc);
        assert_eq!(r.sample_bytes, 65536);
    }

    #[test]
    fn bad_requests_are_400() {
        let b = Some(StatusCode::BAD_REQUEST);
        assert_eq!(status(&[]), b);
        assert_eq!(status(&[("pid", "1"), ("container", "x")]), b);
        assert_eq!(status(&[("pid", "abc")]), b);
        assert_eq!(status(&[("pid", "0")]), b);
        assert_eq!(
            status(&[("pid", "1"), ("trace_frames", "1")]),
            b,
            "trace_frames without a capture"
        );
        assert_eq!(
            status(&[("pid", "1"), ("seconds", "2"), ("trace_frames", "2")]),
            b
        );
        assert_eq!(status(&[("pid", "1"), ("seconds", "121")]), b);
        assert_eq!(status(&[("pid", "1"), ("seconds", "0")]), b);
        assert_eq!(status(&[("pid", "1"), ("format", "png")]), b);
        assert_eq!(status(&[("pid", "1"), ("frequency", "50")]), b);
        assert_eq!(
            status(&[("pid", "1"), ("seconds", "2"), ("frequency", "5000")]),
            b
        );
        assert_eq!(status(&[("pid", "1"), ("file", "/etc/passwd")]), b);
        assert_eq!(status(&[("pid", "1"), ("mode", "off-cpu")]), b);
        assert_eq!(status(&[("pid", "1"), ("mode", "wall")]), b);
        assert_eq!(status(&[("pid", "1"), ("plugin", "a b")]), b);
        assert_eq!(status(&[("pid", "1"), ("plugin", "")]), b);
        assert_eq!(status(&[("pid", "1"), ("plugin", &"x".repeat(65))]), b);
        assert_eq!(status(&[("pid", "1"), ("phase", "lunch")]), b);
        assert_eq!(
            status(&[("pid", "1"), ("mode", "alloc")]),
            b,
            "alloc without seconds"
        );
        assert_eq!(
            status(&[("pid", "1"), ("mode", "live")]),
            b,
            "live without seconds"
        );
        assert_eq!(
            status(&[
                ("pid", "1"),
                ("seconds", "2"),
                ("mode", "alloc"),
                ("frequency", "9")
            ]),
            b
        );
        assert_eq!(
            status(&[("pid", "1"), ("seconds", "2"), ("sample_bytes", "65536")]),
            b,
            "sample_bytes with mode=cpu"
        );
        assert_eq!(
            status(&[
                ("pid", "1"),
                ("seconds", "2"),
                ("mode", "live"),
                ("sample_bytes", "10")
            ]),
            b
        );
        assert_eq!(
            status(&[("pid", "1"), ("seconds", "121"), ("mode", "alloc")]),
            b,
            "alloc captures are bounded by max_capture_seconds"
        );
        assert!(
            parse_request(
                &q(&[("pid", "1"), ("mode", "off-cpu"), ("seconds", "2")]),
                DEFAULTS
            )
            .is_ok()
        );
    }

    fn pprof_status(pairs: &[(&str, &str)]) -> Option<StatusCode> {
        parse_pprof(&q(pairs)).err().map(|(s, _)| s)
    }

    #[test]
    fn pprof_requests() {
        let r = match parse_pprof(&q(&[])) {
            Ok(r) => r,
            Err(e) => panic!("{e:?}"),
        };
        assert_eq!(r.seconds, DEFAULT_PPROF_SECONDS);
        assert!(r.selector.is_none());
        let r = match parse_pprof(&q(&[
            ("seconds", "14"),
            ("container", "gw"),
            ("plugin", "key-auth"),
            ("phase", "access"),
        ])) {
            Ok(r) => r,
            Err(e) => panic!("{e:?}"),
        };
        assert_eq!(r.seconds, 14);
        assert!(matches!(r.selector, Some(Selector::Container(ref c)) if c == "gw"));
        assert_eq!(r.filter.plugin.as_deref(), Some("key-auth"));
        // Above the retention window is clamped later, not refused.
        assert!(parse_pprof(&q(&[("seconds", "86400")])).is_ok());
        let b = Some(StatusCode::BAD_REQUEST);
        for seconds in ["0", "-5", "86401", "99999999999999999999", "abc", "1.5", ""] {
            assert_eq!(
                pprof_status(&[("seconds", seconds)]),
                b,
                "seconds={seconds}"
            );
        }
        assert_eq!(pprof_status(&[("debug", "1")]), b, "unknown parameter");
        assert_eq!(pprof_status(&[("pid", "x")]), b);
        assert_eq!(pprof_status(&[("pid", "1"), ("container", "gw")]), b);
        assert_eq!(pprof_status(&[("phase", "lunch")]), b);
        assert_eq!(pprof_status(&[("plugin", "a b")]), b);
    }

    #[test]
    fn flamegraph_accepts_format_pprof() {
        let r = match parse_request(&q(&[("pid", "1"), ("format", "pprof")]), DEFAULTS) {
            Ok(r) => r,
            Err(e) => panic!("{e:?}"),
        };
        assert_eq!(r.format, ResponseFormat::Pprof);
        let ok = |pairs: &[(&str, &str)]| parse_request(&q(pairs), DEFAULTS).is_ok();
        assert!(ok(&[
            ("pid", "1"),
            ("seconds", "2"),
            ("mode", "off-cpu"),
            ("format", "pprof")
        ]));
        // Heap captures too (as alloc_space / inuse_space).
        for mode in ["alloc", "live"] {
            assert!(ok(&[
                ("pid", "1"),
                ("seconds", "2"),
                ("mode", mode),
                ("format", "pprof")
            ]));
        }
    }

    #[test]
    fn utc_format() {
        let s = utc_now();
        assert_eq!(s.len(), 23, "{s}");
        assert!(s.starts_with("20"), "{s}");
    }
}
