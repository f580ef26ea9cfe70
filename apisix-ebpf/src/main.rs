//! The CPU sampler: a `perf_event` program attached on every CPU.
//!
//! For each sample of a process listed in `TARGETS` it writes one `Sample` into the
//! `SAMPLES` ring buffer: the user registers, a copy of the top of the user stack (user
//! space unwinds it from `.eh_frame`), the kernel stack, and — for LuaJIT targets — the
//! Lua frames of the running coroutine, walked here at sample time because the Lua stack
//! lives in the heap and changes right after. This side knows bytes and offsets only: the
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
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_kernel,
        bpf_probe_read_user,
        generated::{
            bpf_get_current_task_btf, bpf_get_stack, bpf_loop,
            bpf_probe_read_kernel as bpf_probe_read_kernel_raw, bpf_probe_read_user as read_raw,
            bpf_task_pt_regs,
        },
    },
    macros::{map, perf_event, uprobe},
    maps::{Array, HashMap, PerCpuArray, PerCpuHashMap, RingBuf},
    programs::{PerfEventContext, ProbeContext},
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

#[map]
static LOST: PerCpuHashMap<u32, u64> = PerCpuHashMap::with_max_entries(4096, 0);

/// Stack copy sizes tried in turn: a read that crosses the top of the stack mapping fails.
const STACK_SIZES: [u32; 6] = [STACK_COPY_MAX as u32, 8192, 4096, 2048, 1024, 512];

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
    s.regs = UserRegs {
        ip: regs.rip,
        sp: regs.rsp,
        bp: regs.rbp,
    };
    s.comm = bpf_get_current_comm().unwrap_or_default();

    // SAFETY: the buffer is part of our reservation and its size is passed along.
    let klen = unsafe {
        bpf_get_stack(
            ctx.as_ptr(),
            s.kstack.as_mut_ptr().cast(),
            (MAX_KERNEL_FRAMES * 8) as u32,
            0,
        )
    };
    s.kstack_len = if klen > 0 { (klen as u32) / 8 } else { 0 };

    s.stack_len = 0;
    for size in STACK_SIZES {
        // SAFETY: writes at most `size` <= STACK_COPY_MAX bytes into our reservation.
        let ret = unsafe { read_raw(s.stack.as_mut_ptr().cast(), size, regs.rsp as *const _) };
        if ret == 0 {
            s.stack_len = size;
            break;
        }
    }
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
        match walk_lua(tgid, &target, &regs, s) {
            Ok(true) => count(Counter::LuaWalked),
            Ok(false) => count(Counter::LuaIdle),
            Err(reason) => {
                s.lua_error = reason as u32;
                count(reason);
            }
        }
    }
    entry.submit(0);
    count(Counter::Samples);
    Ok(())
}

/// The registers of the interrupted user context: from the perf context when the sample hit
/// user mode, else from the task's saved user registers.
fn user_regs(ctx: &PerfEventContext) -> Option<pt_regs> {
    // SAFETY: direct context loads, rewritten by the verifier.
    let ctx_regs = unsafe { (*ctx.ctx).regs };
    if ctx_regs.cs & 3 == 3 {
        return Some(ctx_regs);
    }
    // SAFETY: helpers without preconditions; the pointer is only read through probe_read.
    let regs = unsafe { bpf_task_pt_regs(bpf_get_current_task_btf()) } as *const pt_regs;
    if regs.is_null() {
        return None;
    }
    // SAFETY: probe read, fails cleanly on a bad pointer.
    let regs = unsafe { bpf_probe_read_kernel(regs) }.ok()?;
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
    regs: &pt_regs,
    in_vm: bool,
) -> Result<(u64, u64), Counter> {
    if in_vm {
        // The VM saves L as a full pointer with GC64, as 32 bits without.
        let l = read_ref(layout, regs.rsp + u64::from(layout.save_l))?;
        if l != 0 {
            let g = read_ref(layout, l + u64::from(layout.l_glref))?;
            if g != 0 && read_ref(layout, g + u64::from(layout.g_cur_l))? == l {
                let _ = LUA_VMS.insert(&tgid, &g, 0);
                return Ok((l, g));
            }
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
fn walk_lua(tgid: u32, target: &Target, regs: &pt_regs, s: &mut Sample) -> Result<bool, Counter> {
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

    let fr2 = u64::from(layout.gc64 != 0);
    let Some(w) = LUA_WALK.get_ptr_mut(0) else {
        return Err(Counter::LuaReadFailed);
    };
    // SAFETY: per-CPU scratch, used by this program invocation only.
    let w = unsafe { &mut *w };
    w.layout = layout;
    w.l = l;
    w.frame = base - 8;
    w.pc = leaf_pc;
    w.bottom = stack + 8 * fr2;
    w.stack_end = stack_end;
    w.n = 0;
    w.error = 0;
    w.done = 0;
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
    Ok(true)
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
    frames: [LuaFrame; MAX_LUA_FRAMES],
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
        let link: u64 = read(frame)?;
        let func: u64 = read(frame - 8)?;
        (func & GCV_MASK, link)
    } else {
        let slot: u64 = read(frame)?;
        (slot & 0xffff_ffff, slot >> 32)
    };
    let typep = link & FRAME_TYPEP;
    // Vararg pseudo-frames and dummy frames (func == L) are not functions of their own.
    if typep != FRAME_VARG && func != w.l {
        let n = w.n as usize;
        let Some(out) = w.frames.get_mut(n) else {
            return Err(Counter::LuaTooDeep);
        };
        read_frame(&layout, func, w.pc, typep, out)?;
        w.n += 1;
    }
    if link & FRAME_TYPE == FRAME_LUA {
        // The link is the return PC; the caller's CALL instruction encodes the frame size.
        let ins: u32 = read(link - 4)?;
        let a = u64::from((ins >> 8) & 0xff);
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
    let gct: u8 = read(func + u64::from(layout.fn_gct))?;
    if gct != GCT_FUNC {
        return Err(Counter::LuaBadFrame);
    }
    let ffid: u8 = read(func + u64::from(layout.fn_ffid))?;
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
        out.chunkname = read_ref(layout, proto + u64::from(layout.pt_chunkname))?;
        out.firstline = read(proto + u64::from(layout.pt_firstline))?;
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
