//! The off-CPU pair: a `sched_switch` raw tracepoint noting when a target thread blocks
//! (time and kernel stack, in `OFF_START`), and a `sys_exit` raw tracepoint that, back in the
//! thread at the end of that system call, writes the same kind of sample as the CPU sampler
//! ([`crate::sample::emit`]) weighted by the microseconds it was blocked. Blocks shorter than
//! `OFFCPU_MIN` are only counted.
//!
//! Raw tracepoints (4.17) rather than BTF ones: their arguments are the same raw values on
//! every kernel, and only the first three of `sched_switch` are read (its fourth,
//! `prev_state`, exists from 5.18; the state is read from the task instead, at the offset
//! the agent found in the kernel's BTF). `offcpu_exit_bounded` is the exit hook for kernels
//! without `bpf_loop`.
//!
//! Hooks: `raw_tp/sched_switch`, `raw_tp/sys_exit`. Metrics: `OffcpuShort`,
//! `MapInsertFailed` (a block start not noted), and those of [`crate::sample::emit`].

use apisix_ebpf_common::{Counter, MAX_KERNEL_FRAMES};
use aya_ebpf::{
    EbpfContext,
    bindings::{BPF_NOEXIST, pt_regs},
    helpers::{
        bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_kernel, generated::bpf_get_stack,
    },
    macros::raw_tracepoint,
    programs::RawTracePointContext,
};

use crate::{
    maps::{OFF_SCRATCH, OFF_START, OFFCPU_MIN, TARGETS, finish, kernel_config},
    regs::regs_at,
    sample::{KernelStack, emit},
};

/// `sched_switch(preempt, prev, next, …)`, in `prev`'s context: a target thread that blocks
/// (not preempted, state not running) has its switch-out time and kernel stack noted. A
/// block already noted (several inside one system call) keeps its start.
#[raw_tracepoint(tracepoint = "sched_switch")]
pub fn offcpu_switch(ctx: RawTracePointContext) -> u32 {
    finish(try_offcpu_switch(&ctx))
}

/// Whether task `prev`, switching out without being preempted, is blocked: its state is not
/// `TASK_RUNNING` (0). Without the state's offset, a switch that is not a preemption counts
/// as a block (`sched_yield` is the exception, which nginx workers do not make).
#[inline(always)]
fn blocked(prev: u64) -> bool {
    let off = kernel_config().task_state;
    if off == 0 || prev == 0 {
        return true;
    }
    // SAFETY: a probe read of the task's state; it fails cleanly. The low 32 bits hold the
    // state in both layouts (`unsigned int __state`, `long state`, little-endian).
    match unsafe { bpf_probe_read_kernel((prev + u64::from(off)) as *const u32) } {
        Ok(state) => state != 0,
        Err(_) => true,
    }
}

fn try_offcpu_switch(ctx: &RawTracePointContext) -> Result<(), Counter> {
    let preempt: u64 = ctx.arg(0);
    let prev: u64 = ctx.arg(1);
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    let tid = pid_tgid as u32;
    // SAFETY: read-only lookup of a plain value.
    if unsafe { TARGETS.get(tgid) }.is_none() {
        return Ok(());
    }
    if preempt & 0xff != 0 || !blocked(prev) {
        // Preempted while runnable: waiting for a CPU, not blocked.
        return Ok(());
    }
    if OFF_START.get_ptr(tid).is_some() {
        // Already blocked once in this system call: its start and stack stand.
        return Ok(());
    }
    let Some(scratch) = OFF_SCRATCH.get_ptr_mut(0) else {
        return Ok(());
    };
    // SAFETY: per-CPU scratch, exclusively ours for this program run.
    let scratch = unsafe { &mut *scratch };
    // SAFETY: helper without preconditions.
    scratch.start_ns = unsafe { bpf_ktime_get_ns() };
    // SAFETY: the buffer is the scratch's array and its size is passed along.
    let klen = unsafe {
        bpf_get_stack(
            ctx.as_ptr(),
            scratch.kstack.as_mut_ptr().cast(),
            (MAX_KERNEL_FRAMES * 8) as u32,
            0,
        )
    };
    scratch.kstack_len = if klen > 0 { (klen as u64) / 8 } else { 0 };
    OFF_START
        .insert(tid, scratch, u64::from(BPF_NOEXIST))
        .map_err(|_| Counter::MapInsertFailed)
}

/// `sys_exit(regs, ret)`, in the thread's own context: a target thread back from a block
/// inside this system call has its stack written, weighted by the blocked microseconds. The
/// user registers are those of the system call (`regs`), the kernel stack the one noted at
/// the block.
#[raw_tracepoint(tracepoint = "sys_exit")]
pub fn offcpu_exit(ctx: RawTracePointContext) -> u32 {
    finish(try_offcpu_exit::<true>(&ctx))
}

/// [`offcpu_exit`] for kernels without `bpf_loop`.
#[raw_tracepoint(tracepoint = "sys_exit")]
pub fn offcpu_exit_bounded(ctx: RawTracePointContext) -> u32 {
    finish(try_offcpu_exit::<false>(&ctx))
}

fn try_offcpu_exit<const LOOP: bool>(ctx: &RawTracePointContext) -> Result<(), Counter> {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tid = pid_tgid as u32;
    let Some(start) = OFF_START.get_ptr(tid) else {
        return Ok(());
    };
    // SAFETY: a map value; copied out before the entry is removed.
    let (start_ns, kstack_len) = unsafe { ((*start).start_ns, (*start).kstack_len) };
    // SAFETY: helper without preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    let blocked = now.saturating_sub(start_ns);
    let min = OFFCPU_MIN.get(0).copied().unwrap_or(0);
    if blocked < min {
        let _ = OFF_START.remove(tid);
        return Err(Counter::OffcpuShort);
    }
    let tgid = (pid_tgid >> 32) as u32;
    // SAFETY: read-only lookup of a plain value.
    let Some(target) = (unsafe { TARGETS.get(tgid) }) else {
        let _ = OFF_START.remove(tid);
        return Ok(());
    };
    let regs: u64 = ctx.arg(0);
    let result = match regs_at(regs as *const pt_regs) {
        Some(regs) => emit::<LOOP>(
            ctx.as_ptr(),
            pid_tgid,
            target,
            &regs,
            (blocked / 1000).max(1),
            KernelStack::Saved(start.cast::<u8>(), kstack_len),
        )
        .map(|_| ()),
        None => Err(Counter::RegsUnavailable),
    };
    let _ = OFF_START.remove(tid);
    result
}
