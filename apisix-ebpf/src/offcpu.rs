//! The off-CPU pair: a `sched_switch` BTF tracepoint noting when a target thread blocks
//! (time and kernel stack, in `OFF_START`), and a `sys_exit` BTF tracepoint that, back in the
//! thread at the end of that system call, writes the same kind of sample as the CPU sampler
//! ([`crate::sample::emit`]) weighted by the microseconds it was blocked. Blocks shorter than
//! `OFFCPU_MIN` are only counted.
//!
//! Hooks: `tp_btf/sched_switch`, `tp_btf/sys_exit`. Metrics: `OffcpuShort`,
//! `MapInsertFailed` (a block start not noted), and those of [`crate::sample::emit`].

use apisix_ebpf_common::{Counter, MAX_KERNEL_FRAMES};
use aya_ebpf::{
    EbpfContext,
    bindings::BPF_NOEXIST,
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns, generated::bpf_get_stack},
    macros::btf_tracepoint,
    programs::BtfTracePointContext,
};

use crate::{
    maps::{OFF_SCRATCH, OFF_START, OFFCPU_MIN, TARGETS, count},
    regs::task_user_regs,
    sample::{KernelStack, emit},
};

/// `sched_switch(preempt, prev, next, prev_state)`, in `prev`'s context: a target thread that
/// blocks (not preempted, state not running) has its switch-out time and kernel stack noted.
/// A block already noted (several inside one system call) keeps its start.
#[btf_tracepoint(function = "sched_switch")]
pub fn offcpu_switch(ctx: BtfTracePointContext) -> u32 {
    match try_offcpu_switch(&ctx) {
        Ok(()) => 0,
        Err(counter) => {
            count(counter);
            0
        }
    }
}

fn try_offcpu_switch(ctx: &BtfTracePointContext) -> Result<(), Counter> {
    let preempt: u64 = ctx.arg(0);
    let prev_state: u64 = ctx.arg(3);
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    let tid = pid_tgid as u32;
    // SAFETY: read-only lookup of a plain value.
    if unsafe { TARGETS.get(tgid) }.is_none() {
        return Ok(());
    }
    if preempt & 0xff != 0 || prev_state & 0xffff_ffff == 0 {
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
/// user registers are those of the system call, the kernel stack the one noted at the block.
#[btf_tracepoint(function = "sys_exit")]
pub fn offcpu_exit(ctx: BtfTracePointContext) -> u32 {
    match try_offcpu_exit(&ctx) {
        Ok(()) => 0,
        Err(counter) => {
            count(counter);
            0
        }
    }
}

fn try_offcpu_exit(ctx: &BtfTracePointContext) -> Result<(), Counter> {
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
    let result = match task_user_regs() {
        Some(regs) => emit(
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
