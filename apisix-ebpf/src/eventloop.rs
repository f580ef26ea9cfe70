//! The event-loop pair: a target thread's entry into `epoll_wait` (or `epoll_pwait`,
//! `epoll_pwait2`) ends its loop iteration, and its return begins the next one. Each thread's
//! entry in `LOOP_THREADS` holds when its current iteration began (read by
//! [`crate::sample::emit`] to stamp a sample with the iteration's age) and its iterations
//! counted by duration into the buckets of `LOOP_BUCKETS_NS`, their sum, and the stalls
//! (iterations of at least `LOOP_CONFIG`'s threshold).
//!
//! Three attachments of the same bodies; the agent takes the first that attaches:
//! - `loop_in_*`/`loop_out_*`, fentry/fexit programs on the kernel's `__x64_sys_epoll_wait`
//!   (and `_pwait`, `_pwait2`): a trampoline on those functions only, the cheapest; needs
//!   the kernel's BTF (fentry/fexit: 5.5).
//! - `loop_wait_enter`/`loop_wait_exit`, tracepoint programs for the per-call tracepoints
//!   `syscalls:sys_{enter,exit}_epoll_{wait,pwait,pwait2}`: they run only at epoll waits, of
//!   any process. Attaching needs the tracepoints' ids from tracefs.
//! - `loop_enter`/`loop_exit`, raw tracepoints on `sys_enter`/`sys_exit`, the fallback without
//!   tracefs: they run at every system call of every process. `loop_enter` compares the call
//!   number (an argument) before anything else; `loop_exit` reads it from the saved registers
//!   (`orig_ax`, one probe read) before any map lookup.
//!
//! Only the threads of targets get an entry (checked against `TARGETS` at the entry into a
//! wait), so the return's lookup is enough there. Tracepoint programs (4.7) and raw
//! tracepoints (4.17) whose arguments are the same on every kernel, no field of the
//! tracepoints read: nothing here needs more than 5.10.
//!
//! Hooks: `fentry`/`fexit` on `__x64_sys_epoll_*`, `tracepoint/syscalls/sys_{enter,exit}_epoll_*`,
//! `raw_tp/sys_enter`, `raw_tp/sys_exit`.
//! Metrics: `MapInsertFailed` (a thread whose loop is not followed).

use apisix_ebpf_common::{Counter, LOOP_BUCKETS, LOOP_BUCKETS_NS, LoopThread};
use aya_ebpf::{
    bindings::pt_regs,
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_kernel},
    macros::{fentry, fexit, raw_tracepoint, tracepoint},
    programs::{FEntryContext, FExitContext, RawTracePointContext, TracePointContext},
};

use crate::maps::{LOOP_CONFIG, LOOP_THREADS, TARGETS, finish};

/// x86-64 system call numbers of the waits that end an event-loop iteration.
const NR_EPOLL_WAIT: u64 = 232;
const NR_EPOLL_PWAIT: u64 = 281;
const NR_EPOLL_PWAIT2: u64 = 441;

#[inline(always)]
fn is_epoll_wait(nr: u64) -> bool {
    nr == NR_EPOLL_WAIT || nr == NR_EPOLL_PWAIT || nr == NR_EPOLL_PWAIT2
}

/// fentry of `__x64_sys_epoll_wait`: a target thread entering a wait ends its iteration.
#[fentry(function = "__x64_sys_epoll_wait")]
pub fn loop_in_wait(_ctx: FEntryContext) -> u32 {
    finish(wait_entered())
}

/// fentry of `__x64_sys_epoll_pwait`, as [`loop_in_wait`].
#[fentry(function = "__x64_sys_epoll_pwait")]
pub fn loop_in_pwait(_ctx: FEntryContext) -> u32 {
    finish(wait_entered())
}

/// fentry of `__x64_sys_epoll_pwait2`, as [`loop_in_wait`].
#[fentry(function = "__x64_sys_epoll_pwait2")]
pub fn loop_in_pwait2(_ctx: FEntryContext) -> u32 {
    finish(wait_entered())
}

/// fexit of `__x64_sys_epoll_wait`: a target thread back from a wait begins an iteration.
#[fexit(function = "__x64_sys_epoll_wait")]
pub fn loop_out_wait(_ctx: FExitContext) -> u32 {
    wait_returned();
    0
}

/// fexit of `__x64_sys_epoll_pwait`, as [`loop_out_wait`].
#[fexit(function = "__x64_sys_epoll_pwait")]
pub fn loop_out_pwait(_ctx: FExitContext) -> u32 {
    wait_returned();
    0
}

/// fexit of `__x64_sys_epoll_pwait2`, as [`loop_out_wait`].
#[fexit(function = "__x64_sys_epoll_pwait2")]
pub fn loop_out_pwait2(_ctx: FExitContext) -> u32 {
    wait_returned();
    0
}

/// `syscalls:sys_enter_epoll_*`: a target thread entering a wait ends its iteration.
#[tracepoint]
pub fn loop_wait_enter(_ctx: TracePointContext) -> u32 {
    finish(wait_entered())
}

/// `syscalls:sys_exit_epoll_*`: a target thread back from a wait begins an iteration.
#[tracepoint]
pub fn loop_wait_exit(_ctx: TracePointContext) -> u32 {
    wait_returned();
    0
}

/// `sys_enter(regs, id)`: the raw-tracepoint variant of [`loop_wait_enter`].
#[raw_tracepoint(tracepoint = "sys_enter")]
pub fn loop_enter(ctx: RawTracePointContext) -> u32 {
    let id: u64 = ctx.arg(1);
    if !is_epoll_wait(id) {
        return 0;
    }
    finish(wait_entered())
}

/// The calling thread enters a wait: counts the iteration that began at its last return
/// (or, for a target's thread seen for the first time, starts following it).
#[inline(always)]
fn wait_entered() -> Result<(), Counter> {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tid = pid_tgid as u32;
    let Some(thread) = LOOP_THREADS.get_ptr_mut(tid) else {
        let tgid = (pid_tgid >> 32) as u32;
        // SAFETY: read-only lookup of a plain value.
        if unsafe { TARGETS.get(tgid) }.is_none() {
            return Ok(());
        }
        // Its first wait seen: the iteration begins at its return.
        let fresh = LoopThread {
            tgid,
            ..LoopThread::default()
        };
        return LOOP_THREADS
            .insert(tid, fresh, 0)
            .map_err(|_| Counter::MapInsertFailed);
    };
    // SAFETY: the thread's own entry; only this thread writes it, and it runs here.
    let thread = unsafe { &mut *thread };
    let start = thread.iter_start_ns;
    thread.iter_start_ns = 0;
    if start == 0 {
        return Ok(());
    }
    // SAFETY: helper without preconditions.
    let took = unsafe { bpf_ktime_get_ns() }.saturating_sub(start);
    thread.count += 1;
    thread.sum_ns += took;
    thread.buckets[bucket(took)] += 1;
    let stall_ns = LOOP_CONFIG.get(0).map_or(0, |c| c.stall_ns);
    if stall_ns != 0 && took >= stall_ns {
        thread.stalls += 1;
        thread.last_stall_ns = took;
    }
    Ok(())
}

/// The bucket of an iteration of `ns` nanoseconds: the first bound it does not exceed.
#[inline(always)]
fn bucket(ns: u64) -> usize {
    let mut i = 0;
    while i < LOOP_BUCKETS_NS.len() {
        if ns <= LOOP_BUCKETS_NS[i] {
            return i;
        }
        i += 1;
    }
    LOOP_BUCKETS - 1
}

/// `sys_exit(regs, ret)`: the raw-tracepoint variant of [`loop_wait_exit`].
#[raw_tracepoint(tracepoint = "sys_exit")]
pub fn loop_exit(ctx: RawTracePointContext) -> u32 {
    let regs: u64 = ctx.arg(0);
    let at = regs + core::mem::offset_of!(pt_regs, orig_rax) as u64;
    // SAFETY: a probe read of the saved registers; it fails cleanly.
    let Ok(nr) = (unsafe { bpf_probe_read_kernel(at as *const u64) }) else {
        return 0;
    };
    if is_epoll_wait(nr) {
        wait_returned();
    }
    0
}

/// The calling thread is back from a wait: if it is followed, its iteration begins now.
#[inline(always)]
fn wait_returned() {
    let tid = bpf_get_current_pid_tgid() as u32;
    if let Some(thread) = LOOP_THREADS.get_ptr_mut(tid) {
        // SAFETY: the thread's own entry, as in `wait_entered`; helper without
        // preconditions.
        unsafe { (*thread).iter_start_ns = bpf_ktime_get_ns() };
    }
}
