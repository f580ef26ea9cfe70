//! `/flamegraph?mode=heap[&diff_seconds=N]`: a heap snapshot of one target (or the
//! difference between a snapshot now and one N seconds later), taken on a blocking thread
//! at nice 10 under one of `sampling.max_concurrent_captures` (else 429), bounded by the
//! `limits.heap_*` settings. The VM is the one the continuous sampler learned, else it is
//! learned as `record` does.
//!
//! Hooks: those of [`crate::sampling::heap`]. Metrics: none; each snapshot is logged.

use std::{sync::Arc, time::Duration};

use axum::{http::StatusCode, response::Response};

use super::{Background, UTC_DATE, busy, error, respond};
use crate::{
    daemon::Shared,
    discovery::{Lua, TargetProcess},
    sampling::{heap, request::Request},
};

/// Takes and renders the snapshot (or the difference) `req` asks of `chosen`'s process.
pub(super) async fn flamegraph(
    shared: Arc<Shared>,
    req: Request,
    chosen: Vec<TargetProcess>,
    describe: String,
) -> Response {
    let Some(t) = chosen.into_iter().next() else {
        return error(StatusCode::NOT_FOUND, "no such target".into());
    };
    let Lua::Known(lua) = &t.lua else {
        return error(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("pid {} runs no known LuaJIT: no Lua heap to read", t.pid),
        );
    };
    let lua = lua.clone();
    let Ok(permit) = shared.captures.clone().try_acquire_owned() else {
        return busy(format!(
            "{} captures already running (sampling.max_concurrent_captures)",
            shared.config.sampling.max_concurrent_captures
        ));
    };
    let known = shared
        .lua_vms
        .read()
        .ok()
        .and_then(|v| v.get(&t.pid).map(|m| m.g));
    let limits = shared.config.limits.heap();
    let (pid, diff, format) = (t.pid, req.diff_seconds, req.format);
    let worker = shared.clone();
    let result = tokio::task::spawn_blocking(move || {
        let _background = Background::enter();
        let vm = match known {
            Some(g) => g,
            None => heap::learn_vm(pid, &lua, &worker.stop)?,
        };
        let r = heap::take(
            pid,
            &lua,
            vm,
            diff.map(Duration::from_secs),
            &limits,
            &worker.stop,
        );
        drop(permit);
        r
    })
    .await;
    let r = match result {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            let status = match e {
                heap::HeapError::NoVm { .. } | heap::HeapError::NoLuaJit { .. } => {
                    StatusCode::UNPROCESSABLE_ENTITY
                }
                _ => StatusCode::INTERNAL_SERVER_ERROR,
            };
            return error(status, crate::error::error_chain(&e));
        }
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, format!("snapshot: {e}")),
    };
    for s in std::iter::once(&r.first).chain(&r.second) {
        tracing::info!(pid, snapshot = heap::describe(s), "heap snapshot");
    }
    let now = time::OffsetDateTime::now_utc().format(UTC_DATE);
    let title = format!(
        "{} from {}",
        heap::title(&describe, &r, diff),
        now.unwrap_or_default()
    );
    respond(
        tokio::task::spawn_blocking(move || {
            let _background = Background::enter();
            heap::render(&r, format, &title)
        })
        .await
        .map_err(|e| format!("rendering: {e}")),
    )
}
