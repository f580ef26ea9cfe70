//! `record --mode heap`: learns the target's Lua VM, takes a heap snapshot (or two,
//! `--diff-seconds` apart) with [`crate::sampling::heap`], writes it in the request's format
//! and says on stderr what was reached against `gc.total`.
//!
//! Hooks: those of [`crate::sampling::heap`]; SIGINT/SIGTERM end the wait between two
//! snapshots; the process walks at nice 10. Metrics: none; `--summary FILE` gets each snapshot's counts as JSON.

use std::{io::Write as _, time::Duration};

use super::{RecordArgs, RecordError, STOP, detect, stop_on_signals};
use crate::{
    luajit::snapshot::Limits,
    sampling::{heap, request::Request},
};

/// Runs a heap request of `pid`.
pub fn run(req: &Request, args: &RecordArgs, pid: u32) -> Result<(), RecordError> {
    let lua = detect(pid)?.ok_or(RecordError::Heap(heap::HeapError::NoLuaJit { pid }))?;
    stop_on_signals();
    eprintln!("pid {pid}: learning its Lua VM (when it next enters Lua; up to 10s)");
    let vm = heap::learn_vm(pid, &lua, &STOP).map_err(RecordError::Heap)?;
    if let Some(d) = req.diff_seconds {
        eprintln!("pid {pid}: two snapshots {d}s apart");
    }
    // The walk yields the CPU to the target's workers (nice 10, as the daemon's renders).
    // SAFETY: a plain system call on this process; a failure leaves the priority as it was.
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, 10) } != 0 {
        tracing::debug!(error = %std::io::Error::last_os_error(), "setpriority");
    }
    let result = heap::take(
        pid,
        &lua,
        vm,
        req.diff_seconds.map(Duration::from_secs),
        &Limits::default(),
        &STOP,
    )
    .map_err(RecordError::Heap)?;
    for s in std::iter::once(&result.first).chain(&result.second) {
        eprintln!("pid {pid}: {}", heap::describe(s));
    }
    let title = format!(
        "{} — {}",
        heap::title(&format!("pid {pid}"), &result, req.diff_seconds),
        lua.flavour
    );
    let rendered = heap::render(&result, req.format, &title).map_err(RecordError::Render)?;
    let (written, path) = match &args.output {
        Some(p) => (std::fs::write(p, &rendered.body), p.display().to_string()),
        None => (
            std::io::stdout().lock().write_all(&rendered.body),
            "standard output".to_owned(),
        ),
    };
    written.map_err(|source| RecordError::Write {
        path: path.clone(),
        source,
    })?;
    if let Some(p) = &args.summary {
        let value = serde_json::json!({
            "pid": pid,
            "mode": "heap",
            "snapshots": std::iter::once(&result.first)
                .chain(&result.second)
                .map(|s| s.summary())
                .collect::<Vec<_>>(),
        });
        let text = serde_json::to_string_pretty(&value).unwrap_or_default();
        let w = if p.as_os_str() == "-" {
            std::io::stdout().lock().write_all(text.as_bytes())
        } else {
            std::fs::write(p, text)
        };
        w.map_err(|source| RecordError::Write {
            path: p.display().to_string(),
            source,
        })?;
    }
    Ok(())
}
