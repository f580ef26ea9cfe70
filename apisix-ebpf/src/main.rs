//! The CPU sampler: a `perf_event` program attached on every CPU; and the off-CPU pair: a
//! `sched_switch` BTF tracepoint noting when a target thread blocks, and a `sys_exit` BTF
//! tracepoint that, back in the thread at the end of that system call, writes the same kind
//! of sample weighted by the microseconds it was blocked (blocks shorter than `OFFCPU_MIN`
//! are only counted).
//!
//! For each sample of a process listed in `TARGETS` it writes one `Sample` into the
//! `SAMPLES` ring buffer: the user registers, a copy of the top of the user stack (user
//! space unwinds it from `.eh_frame`), the kernel stack, and — for LuaJIT targets — the
//! Lua frames of the running coroutine, walked here at sample time because the Lua stack
//! lives in the heap and changes right after (from one copy of the stack's top 8 KiB, frames
//! below it read one by one). This side knows bytes and offsets only: the
//! offsets come from `LUA_LAYOUTS`, filled by the agent. Every read of target memory may
//! fail; every loop is bounded. Outcomes are counted per reason in `COUNTERS`.
#![no_std]
#![no_main]

use core::ffi::c_void;

use apisix_ebpf_common::{
    COUNTER_SLOTS, Counter, LAYOUT_NONE, LuaFrame, LuaFrameKind, LuaLayout, LuaState,
    MAX_KERNEL_FRAMES, MAX_LUA_FRAMES, MAX_LUA_LAYOUTS, STACK_COPY_MAX, Sample, Target, UserRegs,
};
use aya_ebpf::{
    EbpfContext,
    bindings::pt_regs,
    bindings::{BPF_NOEXIST, BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_kernel,
        bpf_probe_read_user,
        generated::{
            bpf_get_current_task_btf, bpf_get_stack, bpf_loop,
            bpf_probe_read_kernel as bpf_probe_read_kernel_raw, bpf_probe_read_user as read_raw,
            bpf_task_pt_regs,
        },
    },
    macros::{btf_tracepoint, map, perf_event, uprobe},
    maps::{Array, HashMap, PerCpuArray, PerCpuHashMap, RingBuf},
    programs::{BtfTracePointContext, PerfEventContext, ProbeContext},
};

#[map]
static TARGETS: HashMap<u32, Target> = HashMap::with_max_entries(4096, 0);

#[map]
static LUA_LAYOUTS: Array<LuaLayout> = Array::with_max_entries(MAX_LUA_LAYOUTS, 0);

#[map]
static LUA_VMS: HashMap<u32, u64> = HashMap::with_max_entries(4096, 0);

#[map]
static SAMPLES: RingBuf = RingBuf::with_byte_size(8 * 1024 * 1024, 0);

#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTER_SLOTS, 0);

/// A block in progress: when it began and the kernel stack at that point.
#[repr(C)]
struct OffStart {
    start_ns: u64,
    kstack_len: u64,
    kstack: [u64; MAX_KERNEL_FRAMES],
}

#[map]
static OFF_START: HashMap<u32, OffStart> = HashMap::with_max_entries(16384, 0);

#[map]
static OFF_SCRATCH: PerCpuArray<OffStart> = PerCpuArray::with_max_entries(1, 0);

#[map]
static OFFCPU_MIN: Array<u64> = Array::with_max_entries(1, 0);

#[map]
static LOST: PerCpuHashMap<u32, u64> = PerCpuHashMap::with_max_entries(4096, 0);

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
/// `GCfunc.gct` of a function: the GC type `~LJ_TFUNC`, i.e. 8.
const GCT_FUNC: u8 = 8;
/// Mask of the address bits of a tagged 64-bit TValue (`LJ_GCVMASK`).
const GCV_MASK: u64 = (1 << 47) - 1;
/// Frame link type bits.
const FRAME_TYPE: u64 = 3;
const FRAME_TYPEP: u64 = 7;
const FRAME_LUA: u64 = 0;
const FRAME_VARG: u64 = 3;
/// Low bits of `lua_State.cframe` used as flags.
const CFRAME_RAWMASK: u64 = !3;
/// How far above the stack pointer the VM's C frame may sit and still count as this thread's.
const CFRAME_WINDOW: u64 = 8 << 20;
/// `g->vmstate` values are `~LJ_VMST_*` when no trace runs.
const VMST_INTERP: i32 = !0;
const VMST_C: i32 = !1;
const VMST_GC: i32 = !2;
const VMST_EXIT: i32 = !3;

#[perf_event]
pub fn sample(ctx: PerfEventContext) -> u32 {
    match try_sample(&ctx) {
        Ok(()) => 0,
        Err(counter) => {
            count(counter);
            0
        }
    }
}

/// `sched_switch(preempt, prev, next, prev_state)`, in `prev`'s context: a target thread that
/// blocks (not preempted, state not running) has its switch-out time and kernel stack noted.
/// A block already noted (several inside one system call) keeps its start.
#[btf_tracepoint(function = "sched_switch")]
pub fn offcpu_switch(ctx: BtfTracePointContext) -> u32 {
    let preempt: u64 = ctx.arg(0);
    let prev_state: u64 = ctx.arg(3);
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    let tid = pid_tgid as u32;
    // SAFETY: read-only lookup of a plain value.
    if unsafe { TARGETS.get(&tgid) }.is_none() {
        return 0;
    }
    if preempt & 0xff != 0 || prev_state & 0xffff_ffff == 0 {
        // Preempted while runnable: waiting for a CPU, not blocked.
        return 0;
    }
    if OFF_START.get_ptr(&tid).is_some() {
        // Already blocked once in this system call: its start and stack stand.
        return 0;
    }
    let Some(scratch) = OFF_SCRATCH.get_ptr_mut(0) else {
        return 0;
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
    let _ = OFF_START.insert(&tid, scratch, u64::from(BPF_NOEXIST));
    0
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
    let Some(start) = OFF_START.get_ptr(&tid) else {
        return Ok(());
    };
    // SAFETY: a map value; copied out before the entry is removed.
    let (start_ns, kstack_len) = unsafe { ((*start).start_ns, (*start).kstack_len) };
    // SAFETY: helper without preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    let blocked = now.saturating_sub(start_ns);
    let min = OFFCPU_MIN.get(0).copied().unwrap_or(0);
    if blocked < min {
        let _ = OFF_START.remove(&tid);
        return Err(Counter::OffcpuShort);
    }
    let tgid = (pid_tgid >> 32) as u32;
    // SAFETY: read-only lookup of a plain value.
    let Some(target) = (unsafe { TARGETS.get(&tgid) }) else {
        let _ = OFF_START.remove(&tid);
        return Ok(());
    };
    let result = match task_user_regs() {
        Some(regs) => emit(
            ctx.as_ptr(),
            pid_tgid,
            target,
            &regs,
            (blocked / 1000).max(1),
            Some((start.cast::<u8>(), kstack_len)),
        ),
        None => Err(Counter::RegsUnavailable),
    };
    let _ = OFF_START.remove(&tid);
    result
}

/// Uprobe on `lua_resume(L, nargs)`: remembers `G(L)` of a target process. Attached per
/// process by the agent only until the process's VM is known.
#[uprobe]
pub fn learn_vm(ctx: ProbeContext) -> u32 {
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    // SAFETY: read-only lookups of plain values.
    let Some(target) = (unsafe { TARGETS.get(&tgid) }) else {
        return 0;
    };
    let Some(layout) = LUA_LAYOUTS.get(target.layout) else {
        return 0;
    };
    let layout = *layout;
    let Some(l) = ctx.arg::<u64>(0) else {
        return 0;
    };
    if let Ok(g) = read_ref(&layout, l + u64::from(layout.l_glref))
        && g != 0
        && let Ok(cur) = read_ref(&layout, g + u64::from(layout.g_cur_l))
        && cur != 0
        && read_ref(&layout, cur + u64::from(layout.l_glref)) == Ok(g)
    {
        let _ = LUA_VMS.insert(&tgid, &g, 0);
    }
    0
}

#[inline(always)]
fn count(counter: Counter) {
    if let Some(slot) = COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe { *slot += 1 };
    }
}

/// Counts a sample of process `tgid` dropped because the ring buffer was full.
#[inline(always)]
fn count_lost(tgid: u32) {
    match LOST.get_ptr_mut(&tgid) {
        // SAFETY: per-CPU value, no concurrent writer on this CPU.
        Some(p) => unsafe { *p += 1 },
        None => {
            let _ = LOST.insert(&tgid, &1, 0);
        }
    }
}

fn try_sample(ctx: &PerfEventContext) -> Result<(), Counter> {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    // SAFETY: read-only lookup of a plain value.
    let Some(target) = (unsafe { TARGETS.get(&tgid) }) else {
        return Ok(());
    };
    let target = *target;
    let regs = user_regs(ctx).ok_or(Counter::RegsUnavailable)?;
    emit(ctx.as_ptr(), pid_tgid, &target, &regs, 1, None)
}

/// Writes one sample of the current thread: registers, kernel stack, user stack copy, Lua
/// frames. `ctx` is the program's context (for `bpf_get_stack`).
#[inline(always)]
fn emit(
    ctx: *mut c_void,
    pid_tgid: u64,
    target: &Target,
    regs: &Regs,
    weight: u64,
    kstack: Option<(*const u8, u64)>,
) -> Result<(), Counter> {
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
    s.time_ns = unsafe { bpf_ktime_get_ns() };
    s.weight = weight;
    s.regs = UserRegs {
        ip: regs.rip,
        sp: regs.rsp,
        bp: regs.rbp,
    };
    s.comm = bpf_get_current_comm().unwrap_or_default();

    s.kstack_len = match kstack {
        // A kernel stack taken earlier (off-CPU: where the thread blocked), in its `OffStart`.
        Some((start, len)) => {
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
        None => {
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
    if target.layout != LAYOUT_NONE {
        match walk_lua(tgid, target, regs, s) {
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
    Ok(())
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
        let size = (top - rsp).min(STACK_COPY_MAX as u64) as u32 & (2 * STACK_COPY_MAX as u32 - 1);
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

/// The user-mode registers the sampler needs (a `pt_regs` is too big for the BPF stack twice).
#[derive(Clone, Copy)]
struct Regs {
    rip: u64,
    rsp: u64,
    rbp: u64,
    rbx: u64,
    rdx: u64,
    r14: u64,
}

/// The registers of the interrupted user context: from the perf context when the sample hit
/// user mode, else from the task's saved user registers.
#[inline(always)]
fn user_regs(ctx: &PerfEventContext) -> Option<Regs> {
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

/// The current task's saved user-mode registers.
#[inline(always)]
fn task_user_regs() -> Option<Regs> {
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

/// Reads a value of target memory.
#[inline(always)]
fn read<T>(addr: u64) -> Result<T, Counter> {
    // SAFETY: probe read, fails cleanly on a bad address.
    unsafe { bpf_probe_read_user(addr as *const T) }.map_err(|_| Counter::LuaReadFailed)
}

/// Reads a GC reference or memory reference: 64 bits with GC64, else 32 bits.
#[inline(always)]
fn read_ref(layout: &LuaLayout, addr: u64) -> Result<u64, Counter> {
    if layout.gc64 != 0 {
        read::<u64>(addr)
    } else {
        read::<u32>(addr).map(u64::from)
    }
}

/// Finds the running `lua_State` and its `global_State`.
///
/// In the interpreter the VM's C frame holds L at a fixed offset from the stack pointer;
/// its `global_State` is remembered per process for samples outside the interpreter, which
/// take `G->cur_L`.
#[inline(always)]
fn find_state(
    tgid: u32,
    layout: &LuaLayout,
    regs: &Regs,
    in_vm: bool,
) -> Result<(u64, u64), Counter> {
    if in_vm {
        // The VM saves L as a full pointer with GC64, as 32 bits without. In a subroutine of
        // the VM (a return address pushed) the slot is elsewhere: any failure here falls
        // through to the remembered G.
        if let Ok(l) = read_ref(layout, regs.rsp + u64::from(layout.save_l))
            && l != 0
            && let Ok(g) = read_ref(layout, l + u64::from(layout.l_glref))
            && g != 0
            && read_ref(layout, g + u64::from(layout.g_cur_l)) == Ok(l)
        {
            let _ = LUA_VMS.insert(&tgid, &g, 0);
            return Ok((l, g));
        }
    }
    // SAFETY: read-only lookup of a plain value.
    let g = match unsafe { LUA_VMS.get(&tgid) } {
        Some(g) => *g,
        None if layout.gc64 != 0 => {
            // GC64 JIT code keeps DISPATCH in r14 like the interpreter: try it once.
            let g = regs.r14.wrapping_sub(u64::from(layout.g2disp));
            let l =
                read_ref(layout, g + u64::from(layout.g_cur_l)).map_err(|_| Counter::LuaNoVm)?;
            if l == 0
                || read_ref(layout, l + u64::from(layout.l_glref)).map_err(|_| Counter::LuaNoVm)?
                    != g
            {
                return Err(Counter::LuaNoVm);
            }
            let _ = LUA_VMS.insert(&tgid, &g, 0);
            g
        }
        None => return Err(Counter::LuaNoVm),
    };
    let l = read_ref(layout, g + u64::from(layout.g_cur_l))?;
    if l == 0 || read_ref(layout, l + u64::from(layout.l_glref))? != g {
        return Err(Counter::LuaBadState);
    }
    Ok((l, g))
}

/// Walks the Lua frames of the running coroutine into `s.lua`.
///
/// Returns `Ok(false)` when the thread runs no Lua right now.
fn walk_lua(tgid: u32, target: &Target, regs: &Regs, s: &mut Sample) -> Result<bool, Counter> {
    let Some(layout) = LUA_LAYOUTS.get(target.layout) else {
        return Err(Counter::LuaNoLayout);
    };
    let layout = *layout;
    if layout.pt_size == 0 {
        return Err(Counter::LuaNoLayout);
    }
    let in_vm = regs.rip >= target.vm_start && regs.rip < target.vm_end;
    let (l, g) = find_state(tgid, &layout, regs, in_vm)?;

    // The state must be running on this thread: its VM C frame lies above our stack pointer.
    let cframe: u64 = read(l + u64::from(layout.l_cframe))?;
    let raw = cframe & CFRAME_RAWMASK;
    if raw == 0 || raw < regs.rsp || raw - regs.rsp > CFRAME_WINDOW {
        return Ok(false);
    }
    let vmstate: i32 = read(g + u64::from(layout.g_vmstate))?;
    s.lua_l = l;
    s.lua_cframe = cframe;
    s.vmstate = vmstate;

    let stack = read_ref(&layout, l + u64::from(layout.l_stack))?;
    let stacksize: u32 = read(l + u64::from(layout.l_stacksize))?;
    let stack_end = stack + u64::from(stacksize) * 8;
    // `base` is a native pointer in both layouts.
    let l_base: u64 = read(l + u64::from(layout.l_base))?;

    let (state, mut base, leaf_pc) = if in_vm {
        (LuaState::Interpreter, regs.rdx, regs.rbx)
    } else if vmstate >= 0 {
        let jit_base = read_ref(&layout, g + u64::from(layout.g_jit_base))?;
        let base = if jit_base != 0 { jit_base } else { l_base };
        (LuaState::Trace, base, 0)
    } else if vmstate == VMST_INTERP
        && regs.rbp > stack
        && regs.rbp <= stack_end
        && (regs.rbp - stack) % 8 == 0
    {
        // In a C helper the interpreter called without storing `L->base` (`lj_tab_len`,
        // `lj_tab_next`, `lj_tab_getinth`, libm's `pow`…): it keeps BASE in rbp, callee-saved,
        // across such calls. Walked from there, and from `L->base` if that walk fails.
        (LuaState::C, regs.rbp, 0)
    } else {
        let state = match vmstate {
            VMST_INTERP | VMST_C => LuaState::C,
            VMST_GC => LuaState::Gc,
            VMST_EXIT => LuaState::TraceExit,
            _ => LuaState::JitCompile,
        };
        (state, l_base, 0)
    };
    s.lua_state = state as u32;
    if base <= stack || base > stack_end {
        if in_vm && l_base > stack && l_base <= stack_end {
            base = l_base;
        } else {
            return Err(Counter::LuaBadBase);
        }
    }

    let Some(w) = LUA_WALK.get_ptr_mut(0) else {
        return Err(Counter::LuaReadFailed);
    };
    // SAFETY: per-CPU scratch, used by this program invocation only.
    let w = unsafe { &mut *w };
    w.layout = layout;
    w.l = l;
    w.bottom = stack + 8 * u64::from(layout.gc64 != 0);
    w.stack_end = stack_end;
    walk_frames(w, stack, base, leaf_pc, in_vm);
    // rbp is BASE only in helpers the interpreter calls without storing `L->base`; in other
    // C code it is any callee-saved value (lj_meta_cat keeps its `top`, a Lua stack slot,
    // there). A walk from it that fails or finds no frame is redone from `L->base`.
    if (w.error != 0 || w.n == 0)
        && base == regs.rbp
        && !in_vm
        && base != l_base
        && l_base > stack
        && l_base <= stack_end
    {
        walk_frames(w, stack, l_base, 0, false);
    }
    let mut n = w.n as usize;
    if n > MAX_LUA_FRAMES {
        n = MAX_LUA_FRAMES;
    }
    s.lua_len = n as u32;
    if n > 0 {
        // SAFETY: copies n <= MAX_LUA_FRAMES frames between buffers of that capacity.
        let ret = unsafe {
            bpf_probe_read_kernel_raw(
                s.lua.as_mut_ptr().cast(),
                (n * size_of::<LuaFrame>()) as u32,
                w.frames.as_ptr().cast(),
            )
        };
        if ret != 0 {
            s.lua_len = 0;
            return Err(Counter::LuaReadFailed);
        }
    }
    if w.error != 0 {
        return Err(Counter::from_raw(w.error).unwrap_or(Counter::LuaReadFailed));
    }
    if w.done == 0 {
        return Err(Counter::LuaTooDeep);
    }
    if n == 0 {
        // The thread runs Lua (its VM frame is on this stack) but no frame was found.
        return Err(Counter::LuaNoFrames);
    }
    Ok(true)
}

/// Walks the frames below `base` into `w.frames` (`w.n`, `w.error`, `w.done` tell the
/// outcome); `pc` is the innermost frame's PC, or 0.
#[inline(always)]
fn walk_frames(w: &mut Walk, stack: u64, base: u64, pc: u64, in_vm: bool) {
    w.top_may_be_gone = u32::from(in_vm && w.layout.gc64 != 0);
    w.frame = base - 8;
    w.pc = pc;
    w.n = 0;
    w.error = 0;
    w.done = 0;
    w.last_func = 0;
    w.last_link = 0;
    // One read of the Lua stack below BASE (up to the window's size) serves the frame links
    // of the walk; frames below the window are read one by one.
    let size =
        (base - stack).min(LUA_WINDOW_BYTES as u64) as u32 & (2 * LUA_WINDOW_BYTES as u32 - 1);
    let lo = base - u64::from(size);
    // SAFETY: writes at most `size` <= LUA_WINDOW_BYTES bytes into the window buffer.
    let ok =
        size > 0 && unsafe { read_raw(w.window.as_mut_ptr().cast(), size, lo as *const _) } == 0;
    (w.win_lo, w.win_hi) = if ok { (lo, base) } else { (0, 0) };
    // The walk runs in a bpf_loop callback: verified once, whatever the depth.
    // SAFETY: the callback is a static BPF function; no context is passed.
    unsafe {
        bpf_loop(
            (2 * MAX_LUA_FRAMES) as u32,
            walk_step as *mut c_void,
            core::ptr::null_mut(),
            0,
        )
    };
}

/// Scratch state of one Lua walk (per CPU).
#[repr(C)]
pub struct Walk {
    layout: LuaLayout,
    l: u64,
    frame: u64,
    pc: u64,
    bottom: u64,
    stack_end: u64,
    n: u32,
    error: u32,
    done: u32,
    reserved: u32,
    /// The last function read and what was read of it (recursion repeats it frame after
    /// frame; it cannot change during one walk), or 0.
    last_func: u64,
    last_frame: LuaFrame,
    /// The last return PC whose CALL instruction was read, and that instruction's A operand.
    last_link: u64,
    last_a: u64,
    /// Nonzero while the innermost frame of an interpreter sample with two-slot frames is
    /// walked: its function slot may already hold a fast function's result.
    top_may_be_gone: u32,
    reserved2: u32,
    /// The Lua stack `[win_lo, win_hi)`, copied at the start of the walk (empty: 0, 0).
    win_lo: u64,
    win_hi: u64,
    window: [u64; LUA_WINDOW_BYTES / 8],
    frames: [LuaFrame; MAX_LUA_FRAMES],
}

/// Bytes of the Lua stack copied in one read per walk (about 200 frames of a recursion).
const LUA_WINDOW_BYTES: usize = 8192;

/// The Lua stack slot at `addr`, from the walk's window or else from the target.
#[inline(always)]
fn read_slot(w: &Walk, addr: u64) -> Result<u64, Counter> {
    if addr >= w.win_lo && addr + 8 <= w.win_hi {
        if let Some(v) = w.window.get(((addr - w.win_lo) / 8) as usize) {
            return Ok(*v);
        }
    }
    read(addr)
}

#[map]
static LUA_WALK: PerCpuArray<Walk> = PerCpuArray::with_max_entries(1, 0);

/// One iteration of the Lua walk: returns 0 to go on, 1 to stop.
extern "C" fn walk_step(_index: u64, _ctx: *mut c_void) -> i64 {
    let Some(w) = LUA_WALK.get_ptr_mut(0) else {
        return 1;
    };
    // SAFETY: per-CPU scratch, used by this program invocation only.
    let w = unsafe { &mut *w };
    match step(w) {
        Ok(true) => 0,
        Ok(false) => {
            w.done = 1;
            1
        }
        Err(c) => {
            w.error = c as u32;
            1
        }
    }
}

/// Records the frame at `w.frame` (unless it is a pseudo-frame) and moves to its caller.
/// Returns `Ok(false)` at the bottom of the stack.
#[inline(always)]
fn step(w: &mut Walk) -> Result<bool, Counter> {
    let layout = w.layout;
    let fr2 = u64::from(layout.gc64 != 0);
    let frame = w.frame;
    if frame <= w.bottom || frame >= w.stack_end {
        return Ok(false);
    }
    let (func, link) = if fr2 != 0 {
        // Two-slot frame: the function below the link.
        (read_slot(w, frame - 8)? & GCV_MASK, read_slot(w, frame)?)
    } else {
        let slot = read_slot(w, frame)?;
        (slot & 0xffff_ffff, slot >> 32)
    };
    let typep = link & FRAME_TYPEP;
    // Vararg pseudo-frames and dummy frames (func == L) are not functions of their own.
    if typep != FRAME_VARG && func != w.l {
        let n = w.n as usize;
        let Some(out) = w.frames.get_mut(n) else {
            return Err(Counter::LuaTooDeep);
        };
        if func == w.last_func {
            // Same function as the frame above (recursion): only the PC differs.
            *out = w.last_frame;
            out.pc = w.pc;
            out.link = typep as u8;
            w.n += 1;
        } else {
            match read_frame(&layout, func, w.pc, typep, out) {
                Ok(()) => {
                    w.last_func = func;
                    w.last_frame = *out;
                    w.n += 1;
                }
                // A fast function returning writes its result over its own function slot
                // before the interpreter moves BASE to the caller: that innermost frame is
                // left out and the walk goes on from its link, which is still intact.
                Err(_) if w.top_may_be_gone != 0 && link & FRAME_TYPE == FRAME_LUA => {}
                Err(e) => return Err(e),
            }
        }
    }
    w.top_may_be_gone = 0;
    if link & FRAME_TYPE == FRAME_LUA {
        // The link is the return PC; the caller's CALL instruction encodes the frame size
        // (the same for every frame a recursion returns to).
        let a = if link == w.last_link {
            w.last_a
        } else {
            let ins: u32 = read(link - 4)?;
            let a = u64::from((ins >> 8) & 0xff);
            w.last_link = link;
            w.last_a = a;
            a
        };
        w.pc = link;
        w.frame = frame - 8 * (1 + fr2 + a);
    } else {
        let delta = link & !FRAME_TYPEP;
        if delta == 0 {
            return Err(Counter::LuaBadFrame);
        }
        // Below a vararg pseudo-frame lies the same function's real frame: keep its PC.
        if typep != FRAME_VARG {
            w.pc = 0;
        }
        w.frame = frame.wrapping_sub(delta);
    }
    Ok(true)
}

/// Reads what user space needs to name one frame's function.
#[inline(always)]
fn read_frame(
    layout: &LuaLayout,
    func: u64,
    pc: u64,
    link: u64,
    out: &mut LuaFrame,
) -> Result<(), Counter> {
    // `gct` and `ffid` are adjacent in every layout (checked by the agent's layout tests).
    let [gct, ffid]: [u8; 2] = read(func + u64::from(layout.fn_gct))?;
    if gct != GCT_FUNC {
        return Err(Counter::LuaBadFrame);
    }
    out.func = func;
    out.pc = pc;
    out.ffid = ffid;
    out.link = link as u8;
    out.reserved = 0;
    if ffid == 0 {
        let bc = read_ref(layout, func + u64::from(layout.fn_pc))?;
        let proto = bc.wrapping_sub(u64::from(layout.pt_size));
        out.kind = LuaFrameKind::Lua as u8;
        out.code = proto;
        // `firstline` directly follows the `chunkname` reference in every layout (checked by
        // the agent's layout tests): one read for both.
        let pair: [u32; 4] = read(proto + u64::from(layout.pt_chunkname))?;
        if layout.gc64 != 0 {
            out.chunkname = u64::from(pair[0]) | (u64::from(pair[1]) << 32);
            out.firstline = pair[2];
        } else {
            out.chunkname = u64::from(pair[0]);
            out.firstline = pair[1];
        }
    } else {
        out.kind = if ffid == 1 {
            LuaFrameKind::C
        } else {
            LuaFrameKind::Fast
        } as u8;
        out.code = read(func + u64::from(layout.fn_cfunc))?;
        out.chunkname = 0;
        out.firstline = 0;
    }
    Ok(())
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
