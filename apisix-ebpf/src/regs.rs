//! The user-mode registers of the sampled thread: from the perf event's context when the
//! sample hit user mode, else from the task's saved user registers, or from a uprobe's
//! context (always user mode). Shared by the CPU sampler, the off-CPU exit hook, the
//! allocator probe and the Lua walk.
//!
//! Hooks: none (helpers of the programs). Metrics: none (a failure is `RegsUnavailable`,
//! counted by the caller).

use aya_ebpf::{
    bindings::pt_regs,
    helpers::{
        bpf_probe_read_kernel,
        generated::{bpf_get_current_task_btf, bpf_task_pt_regs},
    },
    programs::{PerfEventContext, ProbeContext},
};

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

/// The current task's saved user-mode registers.
#[inline(always)]
pub(crate) fn task_user_regs() -> Option<Regs> {
    // SAFETY: helpers without preconditions; the pointer is only read through probe_read.
    let p = unsafe { bpf_task_pt_regs(bpf_get_current_task_btf()) } as *const pt_regs;
    if p.is_null() {
        return None;
    }
    // SAFETY: probe reads of fields of the task's saved registers; they fail cleanly.
    let field = |f: *const u64| unsafe { bpf_probe_read_kernel(f) }.ok();
    // SAFETY: address computations only; nothing is dereferenced directly.
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
