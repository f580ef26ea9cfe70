//! The CPU sampler: a `perf_event` program attached on every CPU at the sampling frequency.
//! For each sample of a process listed in `TARGETS` it writes one `Sample` into the
//! `SAMPLES` ring buffer ([`emit`], shared with the off-CPU exit and the allocator probe):
//! the user registers, a copy of the top of the user stack (user space unwinds it from
//! `.eh_frame`), the kernel stack and, for LuaJIT targets, the Lua frames walked by
//! [`crate::lua::walk`]. `sample_bounded` is the same program for kernels without
//! `bpf_loop` (before 5.17), its Lua walk a bounded loop of `BOUNDED_LUA_STEPS` steps;
//! `probe_bpf_loop` only tells the agent, by loading or not, which of the two to load.
//!
//! Each sample carries the age of its thread's current event-loop iteration
//! ([`crate::eventloop`]): a sample taken during a stall says so.
//!
//! Hooks: `perf_event` (software CPU clock). Metrics: `Samples`, `RingbufFull`,
//! `RegsUnavailable`, `StackCopyFailed`, the Lua walk outcomes, `LOST`.

use core::ffi::c_void;

use apisix_ebpf_common::{
    Counter, LAYOUT_NONE, LuaState, MAX_KERNEL_FRAMES, STACK_COPY_MAX, Sample, Target, UserRegs,
};
use aya_ebpf::{
    EbpfContext,
    bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_ktime_get_ns,
        generated::{
            bpf_get_stack, bpf_loop, bpf_probe_read_kernel as bpf_probe_read_kernel_raw,
            bpf_probe_read_user as read_raw,
        },
    },
    macros::perf_event,
    programs::PerfEventContext,
};

use crate::{
    lua::walk::walk_lua,
    maps::{LOOP_THREADS, OffStart, SAMPLES, TARGETS, count, count_lost, finish},
    regs::{Regs, user_regs},
};

/// Stack copy sizes tried in turn for a thread whose stack top is unknown: a read that
/// crosses the top of the stack mapping fails.
const STACK_SIZES: [u32; 6] = [STACK_COPY_MAX as u32, 8192, 4096, 2048, 1024, 512];

/// How far below `Target::stack_top` the stack pointer may be and still be on the main
/// thread's stack (the default stack limit).
const MAIN_STACK_WINDOW: u64 = 8 << 20;
/// Data waiting in the ring buffer from which a sample wakes the reader up. Below it the
/// reader is not woken (a wakeup is an interrupt, 5-7 µs per sample measured on a VM): it
/// drains the buffer on its own every 100-200 ms.
const WAKEUP_BYTES: u64 = 1 << 20;

/// Mask bounding a stack copy's size for the verifier: `size & STACK_COPY_MASK` is provably
/// below twice the buffer (and equals `size`, which is at most [`STACK_COPY_MAX`]).
const STACK_COPY_MASK: u32 = 2 * STACK_COPY_MAX as u32 - 1;

#[perf_event]
pub fn sample(ctx: PerfEventContext) -> u32 {
    finish(try_sample::<true>(&ctx))
}

/// [`sample`] for kernels without `bpf_loop`.
#[perf_event]
pub fn sample_bounded(ctx: PerfEventContext) -> u32 {
    finish(try_sample::<false>(&ctx))
}

/// Loads only where the kernel has `bpf_loop` (never attached).
#[perf_event]
pub fn probe_bpf_loop(_ctx: PerfEventContext) -> u32 {
    // SAFETY: the callback is a static BPF function; no context is passed.
    unsafe { bpf_loop(1, probe_step as *mut c_void, core::ptr::null_mut(), 0) };
    0
}

extern "C" fn probe_step(_index: u64, _ctx: *mut c_void) -> i64 {
    1
}

fn try_sample<const LOOP: bool>(ctx: &PerfEventContext) -> Result<(), Counter> {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    // SAFETY: read-only lookup of a plain value.
    let Some(target) = (unsafe { TARGETS.get(tgid) }) else {
        return Ok(());
    };
    let target = *target;
    let regs = user_regs(ctx).ok_or(Counter::RegsUnavailable)?;
    emit::<LOOP>(
        ctx.as_ptr(),
        pid_tgid,
        &target,
        &regs,
        1,
        KernelStack::Current,
    )
    .map(|_| ())
}

/// Which kernel stack a sample carries.
#[derive(Clone, Copy)]
pub(crate) enum KernelStack {
    /// The current one (`bpf_get_stack` on the program's context).
    Current,
    /// One taken earlier (off-CPU: where the thread blocked): the `OffStart` map value at
    /// the pointer, with its number of frames.
    Saved(*const u8, u64),
    /// None (a uprobe: the kernel stack is the trap's own).
    Empty,
}

/// Writes one sample of the current thread: registers, kernel stack, user stack copy, Lua
/// frames. `ctx` is the program's context (for `bpf_get_stack`). Returns the sample's
/// `time_ns`, which with the thread id names it. `LOOP`: walk the Lua stack with `bpf_loop`
/// (else in a bounded loop).
#[inline(always)]
pub(crate) fn emit<const LOOP: bool>(
    ctx: *mut c_void,
    pid_tgid: u64,
    target: &Target,
    regs: &Regs,
    weight: u64,
    kstack: KernelStack,
) -> Result<u64, Counter> {
    let tgid = (pid_tgid >> 32) as u32;
    let Some(mut entry) = SAMPLES.reserve::<Sample>(0) else {
        count_lost(tgid);
        return Err(Counter::RingbufFull);
    };
    // SAFETY: the reservation is exclusively ours until submitted or discarded; every
    // field is written below before submission.
    let s: &mut Sample = unsafe { &mut *entry.as_mut_ptr() };
    s.pid = tgid;
    s.tid = pid_tgid as u32;
    // SAFETY: helper without preconditions.
    let time_ns = unsafe { bpf_ktime_get_ns() };
    s.time_ns = time_ns;
    s.weight = weight;
    s.iteration_ns = iteration_age(pid_tgid as u32, time_ns);
    s.regs = UserRegs {
        ip: regs.rip,
        sp: regs.rsp,
        bp: regs.rbp,
    };
    s.comm = bpf_get_current_comm().unwrap_or_default();

    s.kstack_len = match kstack {
        // A kernel stack taken earlier (off-CPU: where the thread blocked), in its `OffStart`.
        KernelStack::Saved(start, len) => {
            // SAFETY: copies the stack array of a live map value into our reservation.
            let ok = unsafe {
                bpf_probe_read_kernel_raw(
                    s.kstack.as_mut_ptr().cast(),
                    (MAX_KERNEL_FRAMES * 8) as u32,
                    start.add(core::mem::offset_of!(OffStart, kstack)).cast(),
                )
            } == 0;
            if ok {
                (len as u32).min(MAX_KERNEL_FRAMES as u32)
            } else {
                0
            }
        }
        KernelStack::Empty => 0,
        KernelStack::Current => {
            // SAFETY: the buffer is part of our reservation and its size is passed along.
            let klen = unsafe {
                bpf_get_stack(
                    ctx,
                    s.kstack.as_mut_ptr().cast(),
                    (MAX_KERNEL_FRAMES * 8) as u32,
                    0,
                )
            };
            if klen > 0 { (klen as u32) / 8 } else { 0 }
        }
    };

    s.stack_len = copy_stack(pid_tgid, target, regs.rsp, &mut s.stack);
    if s.stack_len == 0 {
        count(Counter::StackCopyFailed);
    }

    s.lua_l = 0;
    s.lua_cframe = 0;
    s.lua_len = 0;
    s.lua_state = LuaState::None as u32;
    s.lua_error = 0;
    s.vmstate = 0;
    s.trace = 0;
    s.trace_mcode = 0;
    if target.layout != LAYOUT_NONE {
        match walk_lua::<LOOP>(tgid, target, regs, s) {
            Ok(true) => count(Counter::LuaWalked),
            Ok(false) => count(Counter::LuaIdle),
            Err(reason) => {
                s.lua_error = reason as u32;
                count(reason);
            }
        }
    }
    let wake = if SAMPLES.query(u64::from(BPF_RB_AVAIL_DATA)) >= WAKEUP_BYTES {
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
    };
    entry.submit(u64::from(wake));
    count(Counter::Samples);
    Ok(time_ns)
}

/// How long thread `tid`'s current event-loop iteration has run at `now` (0: it waits, or no
/// return from `epoll_wait` was seen), from `LOOP_THREADS` (see [`crate::eventloop`]).
#[inline(always)]
fn iteration_age(tid: u32, now: u64) -> u64 {
    // SAFETY: read-only lookup of a plain value.
    match unsafe { LOOP_THREADS.get(tid) } {
        Some(t) if t.iter_start_ns != 0 => now.saturating_sub(t.iter_start_ns),
        _ => 0,
    }
}

/// Copies the top of the user stack, from `rsp` up, into `out`; returns the bytes copied.
///
/// On the main thread, whose stack top the agent supplies, exactly the live part is copied
/// (up to the buffer's size); other threads try decreasing sizes until a read stays inside
/// the stack mapping.
#[inline(always)]
fn copy_stack(pid_tgid: u64, target: &Target, rsp: u64, out: &mut [u8; STACK_COPY_MAX]) -> u32 {
    let top = target.stack_top;
    if pid_tgid as u32 == (pid_tgid >> 32) as u32 && top > rsp && top - rsp <= MAIN_STACK_WINDOW {
        let size = (top - rsp).min(STACK_COPY_MAX as u64) as u32 & STACK_COPY_MASK;
        // SAFETY: writes at most `size` <= STACK_COPY_MAX bytes into `out`.
        if size > 0 && unsafe { read_raw(out.as_mut_ptr().cast(), size, rsp as *const _) } == 0 {
            return size;
        }
    }
    for size in STACK_SIZES {
        // SAFETY: writes at most `size` <= STACK_COPY_MAX bytes into `out`.
        if unsafe { read_raw(out.as_mut_ptr().cast(), size, rsp as *const _) } == 0 {
            return size;
        }
    }
    0
}
