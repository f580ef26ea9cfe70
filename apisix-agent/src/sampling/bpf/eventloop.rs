//! The event-loop pair of a [`BpfSession`]: where it attaches (fentry/fexit on the kernel's
//! epoll wait functions, else the per-call epoll tracepoints, else the `sys_enter`/`sys_exit`
//! raw tracepoints; each fallback logged with its reason) and the per-thread iteration counts
//! it keeps in `LOOP_THREADS`.
//!
//! Hooks: fentry/fexit on `__x64_sys_epoll_*`, `syscalls:sys_{enter,exit}_epoll_*` (through
//! [`super::super::tracepoints`]), `raw_tp/sys_enter`, `raw_tp/sys_exit`. Metrics: none (the
//! daemon turns the counts into `apisix_profiler_event_loop_*`).

use std::os::fd::AsFd as _;

use apisix_ebpf_common::{
    LOOP_FUNCTIONS, LoopConfig, LoopThread, MAP_LOOP_CONFIG, MAP_LOOP_THREADS, PROG_LOOP_ENTER,
    PROG_LOOP_EXIT, PROG_LOOP_WAIT_ENTER, PROG_LOOP_WAIT_EXIT,
};
use aya::{
    maps::HashMap,
    programs::{FEntry, FExit, ProgramError, RawTracePoint, TracePoint},
};

use super::{BpfError, BpfSession, program, refused};
use crate::sampling::{
    kernel,
    tracepoints::{self, EPOLL_WAITS},
};

/// Where [`BpfSession::attach_event_loop`] attached the event-loop pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoopHooks {
    /// fentry/fexit on the kernel's epoll wait functions: they run only at epoll waits, on a
    /// trampoline of their own.
    Functions,
    /// The per-call tracepoints of the epoll waits: they run only at epoll waits.
    Tracepoints,
    /// The `sys_enter`/`sys_exit` raw tracepoints: they run at every system call.
    RawTracepoints,
}

/// Environment variable that skips the event-loop pair's first attachments, for tests and
/// benchmarks of the fallbacks: `tracepoints` starts at the per-call tracepoints, `raw` at
/// the raw ones.
pub const LOOP_HOOKS_ENV: &str = "APISIX_AGENT_LOOP_HOOKS";

impl BpfSession {
    /// Loads and attaches the event-loop pair: from now on each target thread's loop
    /// iterations are counted in `LOOP_THREADS` ([`Self::loop_threads`]), iterations of at
    /// least `stall_ns` as stalls, and every sample of this session carries the age of its
    /// thread's current iteration ([`Sample::iteration_ns`]).
    ///
    /// The first that attaches of: fentry/fexit on the kernel's epoll wait functions (needs
    /// BTF); the per-call tracepoints of the epoll waits (needs tracefs); the
    /// `sys_enter`/`sys_exit` raw tracepoints, which run at every system call of the host.
    /// Each fallback is logged as a warning with its reason; [`LOOP_HOOKS_ENV`] skips ahead.
    pub fn attach_event_loop(&mut self, stall_ns: u64) -> Result<LoopHooks, BpfError> {
        self.set_slot(MAP_LOOP_CONFIG, 0, LoopConfig { stall_ns })?;
        let start = std::env::var(LOOP_HOOKS_ENV).unwrap_or_default();
        if start != "tracepoints" && start != "raw" {
            match self.attach_loop_functions() {
                Ok(functions) => {
                    tracing::info!(
                        ?functions,
                        "event-loop pair attached to the epoll functions (fentry/fexit)"
                    );
                    return Ok(LoopHooks::Functions);
                }
                Err(e) => tracing::warn!(
                    error = %crate::error::error_chain(&e),
                    "the event-loop pair is not on the epoll functions (a kernel without BTF, or in lockdown, refuses fentry/fexit); trying the epoll tracepoints"
                ),
            }
        }
        if start != "raw" {
            match self.attach_loop_tracepoints() {
                Ok(()) => {
                    let names: Vec<&str> = self.loop_links.iter().map(|l| &*l.name).collect();
                    tracing::info!(tracepoints = ?names, "event-loop pair attached to the epoll tracepoints");
                    return Ok(LoopHooks::Tracepoints);
                }
                Err(e) => tracing::warn!(
                    error = %crate::error::error_chain(&e),
                    "the event-loop pair falls back to raw tracepoints, which run at every system call of the host (BENCHMARKS.md §11); mount tracefs at /sys/kernel/tracing to avoid it"
                ),
            }
        }
        for (name, tracepoint) in [(PROG_LOOP_ENTER, "sys_enter"), (PROG_LOOP_EXIT, "sys_exit")] {
            self.load_program::<RawTracePoint>(name)?;
            let prog: &mut RawTracePoint = program(&mut self.ebpf, name)?;
            prog.attach(tracepoint)
                .map_err(|source| BpfError::Program {
                    what: format!("attaching {name} to {tracepoint}"),
                    source,
                })?;
        }
        tracing::info!("event-loop pair attached to the raw tracepoints sys_enter and sys_exit");
        Ok(LoopHooks::RawTracepoints)
    }

    /// [`Self::attach_event_loop`] on fentry/fexit of [`LOOP_FUNCTIONS`] (those the kernel
    /// has; `epoll_wait`'s at least); all or nothing. The functions attached.
    fn attach_loop_functions(&mut self) -> Result<Vec<&'static str>, BpfError> {
        let mut attached = Vec::new();
        let mut links = Vec::new();
        let result = (|| {
            for (enter, exit, function) in LOOP_FUNCTIONS {
                if kernel::function_id(function).is_none() {
                    continue;
                }
                self.load_loop_function(enter)?;
                let prog: &mut FEntry = program(&mut self.ebpf, enter)?;
                links.push((enter, None, Some(prog.attach().map_err(attaching(enter))?)));
                self.load_loop_function(exit)?;
                let prog: &mut FExit = program(&mut self.ebpf, exit)?;
                links.push((exit, Some(prog.attach().map_err(attaching(exit))?), None));
                attached.push(function);
            }
            if attached.is_empty() {
                return Err(BpfError::Missing {
                    what: "__x64_sys_epoll_wait in the kernel's BTF",
                });
            }
            Ok(())
        })();
        if result.is_err() {
            for (name, exit, entry) in links {
                let detached = match (exit, entry) {
                    (Some(id), _) => program::<FExit>(&mut self.ebpf, name).map(|p| p.detach(id)),
                    (_, Some(id)) => program::<FEntry>(&mut self.ebpf, name).map(|p| p.detach(id)),
                    _ => continue,
                };
                if let Ok(Err(e)) = detached {
                    tracing::debug!(program = name, error = %e, "detaching");
                }
            }
        }
        result.map(|()| attached)
    }

    /// Loads the fentry or fexit program `name` of [`LOOP_FUNCTIONS`] against its kernel
    /// function in the kernel's BTF (a program loaded already is fine).
    pub fn load_loop_function(&mut self, name: &'static str) -> Result<(), BpfError> {
        let btf = kernel::vmlinux().map_err(|reason| BpfError::Btf {
            reason: reason.to_owned(),
        })?;
        let Some((enter, _, function)) = LOOP_FUNCTIONS
            .iter()
            .find(|(enter, exit, _)| *enter == name || *exit == name)
        else {
            return Err(BpfError::Missing { what: name });
        };
        let loaded = if *enter == name {
            program::<FEntry>(&mut self.ebpf, name)?.load(function, btf)
        } else {
            program::<FExit>(&mut self.ebpf, name)?.load(function, btf)
        };
        match loaded {
            Ok(()) | Err(ProgramError::AlreadyLoaded) => Ok(()),
            Err(e) => Err(refused(name, e)),
        }
    }

    /// [`Self::attach_event_loop`] on `syscalls:sys_{enter,exit}_epoll_*`; all or nothing.
    fn attach_loop_tracepoints(&mut self) -> Result<(), BpfError> {
        let names: Vec<String> = ["enter", "exit"]
            .iter()
            .flat_map(|dir| {
                EPOLL_WAITS
                    .iter()
                    .map(move |call| format!("sys_{dir}_{call}"))
            })
            .collect();
        let ids = tracepoints::syscall_ids(&names)?;
        let mut links = Vec::with_capacity(ids.len());
        for (name, id) in ids {
            let prog_name = if name.starts_with("sys_enter") {
                PROG_LOOP_WAIT_ENTER
            } else {
                PROG_LOOP_WAIT_EXIT
            };
            self.load_program::<TracePoint>(prog_name)?;
            let prog: &mut TracePoint = program(&mut self.ebpf, prog_name)?;
            let fd = prog.fd().map_err(|source| BpfError::Program {
                what: format!("the descriptor of {prog_name}"),
                source,
            })?;
            links.push(tracepoints::attach(fd.as_fd(), &name, id)?);
        }
        if !links.iter().any(|l| l.name.starts_with("sys_exit")) {
            return Err(tracepoints::TracepointError::Missing {
                first: "sys_exit_epoll_wait".into(),
            }
            .into());
        }
        self.loop_links = links;
        Ok(())
    }

    /// Each followed thread's event loop, by thread id (an entry removed while listed is
    /// skipped).
    pub fn loop_threads(&self) -> Vec<(u32, LoopThread)> {
        self.ebpf
            .map(MAP_LOOP_THREADS)
            .and_then(|m| HashMap::<_, u32, LoopThread>::try_from(m).ok())
            .map(|m| m.iter().filter_map(Result::ok).collect())
            .unwrap_or_default()
    }

    /// Forgets the event loops of threads `tids` (threads of processes no longer targets).
    pub fn forget_loop_threads(&mut self, tids: &[u32]) {
        let Some(mut map) = self
            .ebpf
            .map_mut(MAP_LOOP_THREADS)
            .and_then(|m| HashMap::<_, u32, LoopThread>::try_from(m).ok())
        else {
            return;
        };
        for tid in tids {
            if let Err(e) = map.remove(tid) {
                tracing::debug!(tid, error = %e, "forgetting an event loop");
            }
        }
    }
}

/// The event-loop pair's programs this kernel can run, for `check-kernel`: the fentry/fexit
/// pairs of the functions its BTF has, the per-call tracepoint pair and the raw pair.
pub(super) fn programs() -> Vec<&'static str> {
    let mut programs: Vec<&'static str> = LOOP_FUNCTIONS
        .iter()
        .filter(|(_, _, f)| kernel::function_id(f).is_some())
        .flat_map(|(enter, exit, _)| [*enter, *exit])
        .collect();
    programs.extend([
        PROG_LOOP_WAIT_ENTER,
        PROG_LOOP_WAIT_EXIT,
        PROG_LOOP_ENTER,
        PROG_LOOP_EXIT,
    ]);
    programs
}

/// The error of attaching program `name`.
fn attaching(name: &'static str) -> impl FnOnce(ProgramError) -> BpfError {
    move |source| BpfError::Program {
        what: format!("attaching {name}"),
        source,
    }
}
