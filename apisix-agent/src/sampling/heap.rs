//! Heap snapshot jobs, for `record --mode heap` and `/flamegraph?mode=heap` alike: learn the
//! target's Lua VM (the `lua_resume` uprobe, as a capture does, unless the caller knows it),
//! take one snapshot ([`crate::luajit::snapshot`]) or two `diff_seconds` apart, and render
//! them: the snapshot's folded bytes by retaining path (svg, collapsed, json), or the
//! difference ([`crate::output::diff`]; svg differential graph, `stack BEFORE AFTER` lines,
//! or json). No probe is attached to the target's allocator and the target is never stopped.
//!
//! Hooks: the `lua_resume` uprobe (until the VM is known), `process_vm_readv` (the
//! snapshots). Metrics: none; the snapshot's counts go to the caller ([`HeapResult`]).

use std::{
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use super::{
    bpf::{BpfError, BpfSession},
    capture::{VM_WAIT, human_bytes},
    render::{self, RenderError, Rendered},
    request::Format,
};
use crate::{
    attribution::Rules,
    luajit::{
        LuaTarget,
        snapshot::{self, Limits, Snapshot, SnapshotError},
    },
    output::diff::Diff,
    proc::process,
};

/// Why no snapshot was taken.
#[derive(Debug, thiserror::Error)]
pub enum HeapError {
    #[error("pid {pid} runs no known LuaJIT: no Lua heap to read")]
    NoLuaJit { pid: u32 },
    #[error(
        "pid {pid}: its Lua VM was not learned in {waited_secs}s (it is learned when the \
         process next enters Lua: send it a request)"
    )]
    NoVm { pid: u32, waited_secs: u64 },
    #[error("learning the Lua VM")]
    Bpf(#[source] BpfError),
    #[error("snapshot")]
    Snapshot(#[source] SnapshotError),
    #[error("stopped before the second snapshot")]
    Stopped,
}

/// One snapshot, or two for a difference.
#[derive(Debug)]
pub struct HeapResult {
    pub first: Snapshot,
    pub second: Option<Snapshot>,
}

/// Learns the `global_State` of `pid` through the `lua_resume` uprobe: waits up to
/// [`VM_WAIT`] for the process to enter Lua.
pub fn learn_vm(pid: u32, lua: &LuaTarget, stop: &AtomicBool) -> Result<u64, HeapError> {
    let mut session = BpfSession::loaded_only().map_err(HeapError::Bpf)?;
    // The learner reports only for a registered target (which nothing samples here).
    session
        .add_process(pid, Some(lua))
        .map_err(HeapError::Bpf)?;
    let start = Instant::now();
    while start.elapsed() < VM_WAIT && !stop.load(Ordering::Relaxed) && process::exists(pid) {
        if let Some(g) = session.lua_vm(pid) {
            return Ok(g);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Err(HeapError::NoVm {
        pid,
        waited_secs: start.elapsed().as_secs(),
    })
}

/// Takes a snapshot of the VM at `vm` in `pid`, and with `diff` another one that much later
/// (unless `stop` is set meanwhile).
pub fn take(
    pid: u32,
    lua: &LuaTarget,
    vm: u64,
    diff: Option<Duration>,
    limits: &Limits,
    stop: &AtomicBool,
) -> Result<HeapResult, HeapError> {
    let layout = lua.flavour.layout();
    let first = snapshot::snapshot_pid(pid, layout, vm, limits).map_err(HeapError::Snapshot)?;
    let Some(wait) = diff else {
        return Ok(HeapResult {
            first,
            second: None,
        });
    };
    let until = Instant::now() + wait;
    while Instant::now() < until {
        if stop.load(Ordering::Relaxed) {
            return Err(HeapError::Stopped);
        }
        std::thread::sleep(Duration::from_millis(50).min(until - Instant::now()));
    }
    let second = snapshot::snapshot_pid(pid, layout, vm, limits).map_err(HeapError::Snapshot)?;
    Ok(HeapResult {
        first,
        second: Some(second),
    })
}

/// One line about a snapshot: bytes reached against `gc.total`, objects, time, and what
/// went wrong.
pub fn describe(s: &Snapshot) -> String {
    let mut out = format!(
        "{} reached of gc.total {} ({} objects) in {:.2}s",
        human_bytes(s.reached_bytes),
        human_bytes(s.gc_total_before),
        s.objects,
        s.elapsed.as_secs_f64()
    );
    if let Some(t) = s.truncated {
        out.push_str(&format!(", cut short by limits.heap ({t})"));
    }
    let errors: u64 = s.errors.values().sum();
    if errors > 0 {
        out.push_str(&format!(", {errors} unreadable references"));
    }
    out
}

/// The title of a result about `what` (`pid 12`), `diff_seconds` apart for a difference.
pub fn title(what: &str, r: &HeapResult, diff_seconds: Option<u64>) -> String {
    match &r.second {
        None => format!("{what} — Lua heap snapshot: {}", describe(&r.first)),
        Some(b) => format!(
            "{what} — Lua heap growth over {}s (red): gc.total {} → {}",
            diff_seconds.unwrap_or(0),
            human_bytes(r.first.gc_total_before),
            human_bytes(b.gc_total_before)
        ),
    }
}

/// Renders a result as `format` under `title`.
pub fn render(r: &HeapResult, format: Format, title: &str) -> Result<Rendered, RenderError> {
    let Some(second) = &r.second else {
        return render::folded(&r.first.folded, format, title, "bytes", &Rules::default());
    };
    let d = Diff::new(&r.first.folded, &second.folded);
    render::write_as(
        format,
        |body| d.write_svg(title, "bytes", body),
        |body| d.write_collapsed(body),
        || {
            let stacks: Vec<serde_json::Value> = d
                .iter()
                .map(|(s, b, a)| serde_json::json!({"stack": s, "before": b, "after": a}))
                .collect();
            serde_json::json!({
                "title": title,
                "unit": "bytes",
                "grown": d.grown(),
                "stacks": stacks,
            })
        },
    )
}
