//! The user-mode registers of the sampled thread: from the perf event's context when the
//! sample hit user mode, else from the registers the kernel saved at the top of the task's
//! kernel stack (found through `task_struct.stack`, whose offset the agent reads from the
//! kernel's BTF: no `bpf_task_pt_regs`, which needs 5.15), or from a uprobe's context
//! (always user mode), or from a `pt_regs` pointer a tracepoint passes (`sys_exit`). Shared by
//! the CPU sampler, the off-CPU exit hook, the allocator probe and the Lua walk.
//!
//! Hooks: none (helpers of the programs). Metrics: none (a failure is `RegsUnavailable`,
//! counted by the caller).

use aya_ebpf::{
    bindings::pt_regs,
    helpers::{bpf_probe_read_kernel, generated::bpf_get_current_task},
    programs::{PerfEventContext, ProbeContext},
};

use crate::maps::kernel_config;

/// `__USER_CS` and `__USER_DS` on x86-64: the segments of a 64-bit user context, which tell
/// saved user registers from whatever else a wrong offset would read.
const USER_CS: u64 = 0x33;
const USER_SS: u64 = 0x2b;
/// Padding some configurations leave above the saved registers at the top of the kernel
/// stack (`TOP_OF_KERNEL_STACK_PADDING`: 16 bytes with FRED, else 0): both are tried.
const STACK_TOP_PADDINGS: [u64; 2] = [0, 16];

/// The user-mode registers the sampler needs (a `pt_regs` is too big for the BPF stack twice).
#[derive(Clone, Copy)]
pub(crate) struct Regs {
    pub(crate) rip: u64,
    pub(crate) rsp: u64,
    pub(crate) rbp: u64,
    pub(crate) rbx: u64,
    pub(crate) rdx: u64,
    pub(crate) r14: u64,
}

/// The registers of the interrupted user context: from the perf context when the sample hit
/// user mode, else from the task's saved user registers.
#[inline(always)]
pub(crate) fn user_regs(ctx: &PerfEventContext) -> Option<Regs> {
    // SAFETY: direct context loads, rewritten by the verifier.
    let r: &pt_regs = unsafe { &(*ctx.ctx).regs };
    if r.cs & 3 == 3 {
        return Some(Regs {
            rip: r.rip,
            rsp: r.rsp,
            rbp: r.rbp,
            rbx: r.rbx,
            rdx: r.rdx,
            r14: r.r14,
        });
    }
    task_user_regs()
}

/// The user-mode registers at a uprobe (the probed function's entry).
#[inline(always)]
pub(crate) fn probe_regs(ctx: &ProbeContext) -> Regs {
    // SAFETY: direct context loads, rewritten by the verifier.
    let r: &pt_regs = unsafe { &*ctx.regs };
    Regs {
        rip: r.rip,
        rsp: r.rsp,
        rbp: r.rbp,
        rbx: r.rbx,
        rdx: r.rdx,
        r14: r.r14,
    }
}

/// The current task's saved user-mode registers, at the top of its kernel stack.
#[inline(always)]
pub(crate) fn task_user_regs() -> Option<Regs> {
    let cfg = kernel_config();
    if cfg.task_stack == 0 || cfg.regs_offset == 0 {
        return None;
    }
    // SAFETY: helper without preconditions; the pointer is only read through probe_read.
    let task = unsafe { bpf_get_current_task() };
    // SAFETY: a probe read of one field of the current task; it fails cleanly.
    let stack: u64 =
        unsafe { bpf_probe_read_kernel((task + u64::from(cfg.task_stack)) as *const u64) }.ok()?;
    if stack == 0 {
        return None;
    }
    for padding in STACK_TOP_PADDINGS {
        let p = (stack + u64::from(cfg.regs_offset) - padding) as *const pt_regs;
        if let Some(regs) = regs_at(p) {
            return Some(regs);
        }
    }
    None
}

/// The user-mode registers saved at `p` (kernel memory), if they are a 64-bit user context.
#[inline(always)]
pub(crate) fn regs_at(p: *const pt_regs) -> Option<Regs> {
    if p.is_null() {
        return None;
    }
    // SAFETY: probe reads of fields of saved registers; they fail cleanly.
    let field = |f: *const u64| unsafe { bpf_probe_read_kernel(f) }.ok();
    // SAFETY: address computations only; nothing is dereferenced directly.
    let (cs, ss) = unsafe {
        (
            field(core::ptr::addr_of!((*p).cs))?,
            field(core::ptr::addr_of!((*p).ss))?,
        )
    };
    if cs != USER_CS || ss != USER_SS {
        return None;
    }
    // SAFETY: as above.
    let regs = unsafe {
        Regs {
            rip: field(core::ptr::addr_of!((*p).rip))?,
            rsp: field(core::ptr::addr_of!((*p).rsp))?,
            rbp: field(core::ptr::addr_of!((*p).rbp))?,
            rbx: field(core::ptr::addr_of!((*p).rbx))?,
            rdx: field(core::ptr::addr_of!((*p).rdx))?,
            r14: field(core::ptr::addr_of!((*p).r14))?,
        }
    };
    if regs.rsp == 0 || regs.rip == 0 {
        None
    } else {
        Some(regs)
    }
}
