//! The daemon's HTTP endpoint (axum):
//! - `GET /metrics`: OpenMetrics text when the client accepts it, else the Prometheus text
//!   format ([`super::metrics`]).
//! - `GET /flamegraph?pid=PID|container=NAME[&seconds=N][&format=svg|collapsed|json]
//!   [&frequency=HZ][&mode=cpu|off-cpu][&idle=exclude|include][&trace_frames=1]
//!   [&plugin=NAME][&phase=NAME]`: with `seconds`, an
//!   on-demand capture at the on-demand rate, or of blocked time with `mode=off-cpu`
//!   ([`crate::sampling::capture`]); without, the continuously collected recent stacks at once.
//!   `plugin` and `phase` keep only the stacks of that plugin / phase
//!   ([`crate::attribution`]); the title says so, also when nothing matched.
//! - `GET /targets`: the profiled processes with labels and LuaJIT flavour, as JSON.
//! - `GET /healthz`: 200 while the BPF sampler is attached, else 503.
//!
//! Errors are JSON `{"error": "…"}`: 400 for bad parameters, 404 for an unknown target or
//! path, 429 when `sampling.max_concurrent_captures` captures already run. Handlers only read
//! shared state or start a capture; nothing a client sends names a file.
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
    Json, Router,
    extract::{Query, Request, State},
    http::{StatusCode, header},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::get,
};

use super::{
    Shared,
    auth::{self, Auth},
    listener::{self, Limits},
    tls::Tls,
};
use crate::{
    attribution::{self, Filter, Phase, Rules},
    discovery::{Lua, TargetProcess},
    luajit::NameStyle,
    output::Folded,
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
    let routes = Router::new().route("/flamegraph", get(flamegraph));
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
    let views: Vec<_> = snap.iter().map(TargetProcess::view).collect();
    Json(views).into_response()
}

async fn healthz(State(shared): State<Arc<Shared>>) -> Response {
    let targets = shared.targets.read().map(|t| t.len()).unwrap_or(0);
    if shared.attached.load(Ordering::SeqCst) {
        Json(serde_json::json!({"status": "ok", "targets": targets})).into_response()
    } else {
        error(
            StatusCode::SERVICE_UNAVAILABLE,
            "the BPF sampler is not attached".to_owned(),
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ResponseFormat {
    Svg,
    Collapsed,
    Json,
}

/// A validated `/flamegraph` request.
#[derive(Debug)]
struct FlameRequest {
    selector: Selector,
    seconds: Option<u64>,
    frequency: u64,
    format: ResponseFormat,
    /// Off-CPU capture (blocked time) instead of CPU samples.
    offcpu: bool,
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

fn parse_request(
    q: &HashMap<String, String>,
    max_seconds: u64,
    default_frequency: u64,
) -> Result<FlameRequest, BadRequest> {
    const KNOWN: [&str; 10] = [
        "pid",
        "container",
        "seconds",
        "format",
        "frequency",
        "mode",
        "idle",
        "trace_frames",
        "plugin",
        "phase",
    ];
    if let Some(k) = q.keys().find(|k| !KNOWN.contains(&k.as_str())) {
        return Err(bad(format!(
            "unknown parameter {k:?}; known: {}",
            KNOWN.join(", ")
        )));
    }
    let selector = match (q.get("pid"), q.get("container")) {
        (Some(p), None) => Selector::Pid(
            p.parse::<u32>()
                .ok()
                .filter(|p| *p > 0)
                .ok_or_else(|| bad(format!("pid={p:?} is not a process id")))?,
        ),
        (None, Some(c)) if !c.is_empty() && c.len() <= 128 => Selector::Container(c.clone()),
        (None, Some(_)) => return Err(bad("container must be 1 to 128 characters")),
        _ => return Err(bad("give exactly one of pid=PID or container=NAME")),
    };
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
        Some(f) => return Err(bad(format!("format={f:?} must be svg, collapsed or json"))),
    };
    let offcpu = match q.get("mode").map(String::as_str) {
        None | Some("cpu") => false,
        Some("off-cpu") => true,
        Some(m) => return Err(bad(format!("mode={m:?} must be cpu or off-cpu"))),
    };
    if offcpu && seconds.is_none() {
        return Err(bad(
            "mode=off-cpu needs seconds=N (blocked time is captured on demand)",
        ));
    }
    if offcpu && q.contains_key("frequency") {
        return Err(bad("frequency does not apply to mode=off-cpu"));
    }
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
    Ok(FlameRequest {
        filter: Filter { plugin, phase },
        selector,
        seconds,
        frequency,
        format,
        offcpu,
        include_idle,
        trace_frames,
    })
}

/// The targets a selector names.
fn select(snapshot: &[TargetProcess], selector: &Selector) -> Vec<TargetProcess> {
    snapshot
        .iter()
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

async fn flamegraph(
    State(shared): State<Arc<Shared>>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let cfg = &shared.config.sampling;
    let req = match parse_request(&q, cfg.max_capture_seconds, cfg.on_demand_frequency_hz) {
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
        None => {
            let window = Duration::from_secs(cfg.retention_seconds);
            let pids: Vec<u32> = chosen.iter().map(|t| t.pid).collect();
            let folded = match shared.aggregator.lock() {
                Ok(agg) => agg.recent_filtered(window, |pid, _| pids.contains(&pid), &req.filter),
                Err(_) => {
                    return error(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "aggregator poisoned".into(),
                    );
                }
            };
            let title = format!(
                "{describe} — last {}s of continuous sampling at {} Hz",
                cfg.retention_seconds, cfg.frequency_hz
            );
            (folded, title, "samples")
        }
        Some(seconds) => {
            let Ok(permit) = shared.captures.try_acquire() else {
                return error(
                    StatusCode::TOO_MANY_REQUESTS,
                    format!(
                        "{} captures already running (sampling.max_concurrent_captures)",
                        cfg.max_concurrent_captures
                    ),
                );
            };
            let targets: Vec<CaptureTarget> = chosen
                .iter()
                .map(|t| CaptureTarget {
                    pid: t.pid,
                    lua: match &t.lua {
                        Lua::Known(l) => Some(l.clone()),
                        _ => None,
                    },
                })
                .collect();
            let mode = if req.offcpu {
                capture::Mode::OffCpu {
                    min_block_us: cfg.offcpu.min_block_us,
                    exclude_idle: !req.include_idle,
                }
            } else {
                capture::Mode::Cpu {
                    frequency: req.frequency,
                }
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
                    |_, _| {},
                );
                super::memory::release_freed();
                cap
            })
            .await;
            drop(permit);
            let cap = match result {
                Ok(Ok(c)) => c,
                Ok(Err(e)) => {
                    return error(StatusCode::INTERNAL_SERVER_ERROR, format!("capture: {e}"));
                }
                Err(e) => {
                    return error(StatusCode::INTERNAL_SERVER_ERROR, format!("capture: {e}"));
                }
            };
            tracing::info!(target = what, stacks = cap.folded.total(), "capture done");
            let title = format!(
                "{describe} — {:.0}s {} from {}",
                cap.elapsed.as_secs_f64(),
                mode.describe(),
                utc_now()
            );
            (
                req.filter.apply(&shared.rules, &cap.folded),
                title,
                mode.unit(),
            )
        }
    };
    let title = if req.filter.is_empty() {
        title
    } else if folded.total() == 0 {
        format!("{title} — {}: no samples matched", req.filter.describe())
    } else {
        format!("{title} — {}", req.filter.describe())
    };
    render(&folded, req.format, &title, unit, &shared.rules)
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

    fn status(pairs: &[(&str, &str)]) -> Option<StatusCode> {
        parse_request(&q(pairs), 120, 99).err().map(|(s, _)| s)
    }

    #[test]
    fn valid_requests() {
        let r = match parse_request(&q(&[("pid", "12"), ("seconds", "3")]), 120, 99) {
            Ok(r) => r,
            Err(e) => panic!("{e:?}"),
        };
        assert!(matches!(r.selector, Selector::Pid(12)));
        assert_eq!(r.seconds, Some(3));
        assert_eq!(r.frequency, 99);
        assert_eq!(r.format, ResponseFormat::Svg);
        assert!(parse_request(&q(&[("container", "gw"), ("format", "json")]), 120, 99).is_ok());
        let r = match parse_request(
            &q(&[("pid", "1"), ("plugin", "key-auth"), ("phase", "access")]),
            120,
            99,
        ) {
            Ok(r) => r,
            Err(e) => panic!("{e:?}"),
        };
        assert_eq!(r.filter.plugin.as_deref(), Some("key-auth"));
        assert_eq!(r.filter.phase, Some(Phase::Access));
        assert!(parse_request(&q(&[("pid", "1"), ("plugin", "[core]")]), 120, 99).is_ok());
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
        assert!(
            parse_request(
                &q(&[("pid", "1"), ("mode", "off-cpu"), ("seconds", "2")]),
                120,
                99
            )
            .is_ok()
        );
    }

    #[test]
    fn utc_format() {
        let s = utc_now();
        assert_eq!(s.len(), 23, "{s}");
        assert!(s.starts_with("20"), "{s}");
    }
}
