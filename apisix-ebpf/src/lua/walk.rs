//! The Lua stack walk, at sample time because the Lua stack lives in the heap and changes
//! right after: [`find_state`] finds the running `lua_State` and `global_State`,
//! [`walk_lua`] picks BASE and PC by where the sample hit (interpreter, trace, C helper),
//! and [`walk_frames`] runs [`step`] in a `bpf_loop` (or, on kernels without it, a bounded
//! loop of `BOUNDED_LUA_STEPS` steps) over one copy of the stack's top 8 KiB (frames below
//! it read one by one), [`read_frame`] reading what names each function. Only bytes and
//! offsets are known here, from the target's `LUA_LAYOUTS` slot, read in place: the layout
//! is never copied onto the stack, which the verifier caps at 512 bytes for a program and
//! the functions it calls together (the `bpf_loop` callback included).
//!
//! Hooks: none (called by [`crate::sample::emit`]). Metrics: the `Lua*` counters, by reason,
//! and `MapInsertFailed` (a VM found but not remembered).

use core::ffi::c_void;

use apisix_ebpf_common::{
    BOUNDED_LUA_STEPS, Counter, LuaFrame, LuaFrameKind, LuaLayout, LuaState, MAX_LUA_FRAMES,
    Sample, Target,
};
use aya_ebpf::{
    helpers::generated::{
        bpf_loop, bpf_probe_read_kernel as bpf_probe_read_kernel_raw,
        bpf_probe_read_user as read_raw,
    },
    macros::map,
    maps::PerCpuArray,
};

use super::{read, read_ref};
use crate::{
    maps::{LUA_LAYOUTS, LUA_VMS, inserted},
    regs::Regs,
};

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
/// Trace numbers are 16 bits (`TraceNo1`): bounds the trace table index for the verifier.
const TRACENO_MASK: u64 = 0xffff;

/// Iterations of the walk's `bpf_loop`: two per frame (a vararg pseudo-frame or a C frame
/// may sit between two Lua frames).
const WALK_MAX_STEPS: u32 = (2 * MAX_LUA_FRAMES) as u32;

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
            inserted(LUA_VMS.insert(tgid, g, 0));
            return Ok((l, g));
        }
    }
    // SAFETY: read-only lookup of a plain value.
    let g = match unsafe { LUA_VMS.get(tgid) } {
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
            inserted(LUA_VMS.insert(tgid, g, 0));
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
/// Returns `Ok(false)` when the thread runs no Lua right now. `LOOP`: walk with `bpf_loop`.
#[inline(always)]
pub(crate) fn walk_lua<const LOOP: bool>(
    tgid: u32,
    target: &Target,
    regs: &Regs,
    s: &mut Sample,
) -> Result<bool, Counter> {
    let Some(layout) = LUA_LAYOUTS.get(target.layout) else {
        return Err(Counter::LuaNoLayout);
    };
    if layout.pt_size == 0 {
        return Err(Counter::LuaNoLayout);
    }
    let in_vm = regs.rip >= target.vm_start && regs.rip < target.vm_end;
    let (l, g) = find_state(tgid, layout, regs, in_vm)?;

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

    let stack = read_ref(layout, l + u64::from(layout.l_stack))?;
    let stacksize: u32 = read(l + u64::from(layout.l_stacksize))?;
    let stack_end = stack + u64::from(stacksize) * 8;
    // `base` is a native pointer in both layouts.
    let l_base: u64 = read(l + u64::from(layout.l_base))?;

    let (state, mut base, leaf_pc) =
        start_point(layout, regs, g, vmstate, in_vm, l_base, stack, stack_end, s)?;
    s.lua_state = state as u32;
    if base <= stack || base > stack_end {
        if in_vm && l_base > stack && l_base <= stack_end {
            base = l_base;
        } else {
            return Err(Counter::LuaBadBase);
        }
    }

    let Some(wp) = LUA_WALK.get_ptr_mut(0) else {
        return Err(Counter::LuaReadFailed);
    };
    {
        // SAFETY: per-CPU scratch, used by this program invocation only; the borrow ends
        // before the walk's steps (which reach the scratch through their own lookup).
        let w = unsafe { &mut *wp };
        w.layout = *layout;
        w.l = l;
        w.bottom = stack + 8 * u64::from(layout.gc64 != 0);
        w.stack_end = stack_end;
    }
    walk_frames::<LOOP>(wp, stack, base, leaf_pc, in_vm);
    // In the interpreter around a call into C (BC_LEN calling lj_tab_len, …) rdx, which
    // holds BASE, is caller-saved and clobbered: the VM keeps BASE in rbp across the call
    // and restores it after. A walk from rdx that fails or finds no frame is redone from rbp
    // (the leaf PC, in rbx, is unknown then too).
    if failed(wp)
        && in_vm
        && base != regs.rbp
        && regs.rbp > stack
        && regs.rbp <= stack_end
        && (regs.rbp - stack).is_multiple_of(8)
    {
        walk_frames::<LOOP>(wp, stack, regs.rbp, 0, false);
    }
    // rbp is BASE only in helpers the interpreter calls without storing `L->base`; in other
    // C code it is any callee-saved value (lj_meta_cat keeps its `top`, a Lua stack slot,
    // there). A walk from it that fails or finds no frame is redone from `L->base`.
    if failed(wp)
        && base == regs.rbp
        && !in_vm
        && base != l_base
        && l_base > stack
        && l_base <= stack_end
    {
        walk_frames::<LOOP>(wp, stack, l_base, 0, false);
    }
    copy_frames(wp, s)
}

/// Where the walk starts: the VM state of the sample, the Lua frame base and the leaf PC
/// (0: unknown), from the registers (in the interpreter), `G->jit_base` (in a trace), rbp
/// (in a C helper the interpreter called without storing `L->base`) or `L->base`.
#[expect(clippy::too_many_arguments, reason = "inlined: the walk's own locals")]
#[inline(always)]
fn start_point(
    layout: &LuaLayout,
    regs: &Regs,
    g: u64,
    vmstate: i32,
    in_vm: bool,
    l_base: u64,
    stack: u64,
    stack_end: u64,
    s: &mut Sample,
) -> Result<(LuaState, u64, u64), Counter> {
    let start = if in_vm {
        (LuaState::Interpreter, regs.rdx, regs.rbx)
    } else if vmstate >= 0 {
        let jit_base = read_ref(layout, g + u64::from(layout.g_jit_base))?;
        let base = if jit_base != 0 { jit_base } else { l_base };
        // The running trace's identity at sample time, so that user space never decodes a
        // trace that was freed and its number reused by the time it reads it. Optional:
        // without it user space still validates what it reads.
        if let Ok((trace, mcode)) = trace_identity(layout, g, vmstate) {
            s.trace = trace;
            s.trace_mcode = mcode;
        }
        (LuaState::Trace, base, 0)
    } else if vmstate == VMST_INTERP
        && regs.rbp > stack
        && regs.rbp <= stack_end
        && (regs.rbp - stack).is_multiple_of(8)
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
    Ok(start)
}

/// Copies the walk's frames from the per-CPU scratch `wp` into the sample, and says how
/// the walk ended: `Ok(true)` with at least one frame, else the reason.
#[inline(always)]
fn copy_frames(wp: *mut Walk, s: &mut Sample) -> Result<bool, Counter> {
    // SAFETY: the per-CPU scratch of this invocation; no step runs any more.
    let w = unsafe { &*wp };
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

/// The `GCtrace` address and machine-code start of trace `traceno`: `J->trace[traceno]`,
/// then its `mcode` (three reads).
#[inline(always)]
fn trace_identity(layout: &LuaLayout, g: u64, traceno: i32) -> Result<(u64, u64), Counter> {
    let table: u64 = read(g + u64::from(layout.g_trace))?;
    let width = if layout.gc64 != 0 { 8 } else { 4 };
    let trace = read_ref(layout, table + width * (traceno as u64 & TRACENO_MASK))?;
    if trace == 0 {
        return Err(Counter::LuaReadFailed);
    }
    let mcode: u64 = read(trace + u64::from(layout.t_mcode))?;
    Ok((trace, mcode))
}

/// Whether the last walk failed or found no frame.
#[inline(always)]
fn failed(wp: *mut Walk) -> bool {
    // SAFETY: per-CPU scratch, read between walks.
    let w = unsafe { &*wp };
    w.error != 0 || w.n == 0
}

/// Walks the frames below `base` into the scratch's `frames` (`n`, `error`, `done` tell the
/// outcome); `pc` is the innermost frame's PC, or 0.
#[inline(always)]
fn walk_frames<const LOOP: bool>(wp: *mut Walk, stack: u64, base: u64, pc: u64, in_vm: bool) {
    {
        // SAFETY: per-CPU scratch; the borrow ends before the steps run.
        let w = unsafe { &mut *wp };
        start_walk(w, stack, base, pc, in_vm);
    }
    if LOOP {
        // The walk runs in a bpf_loop callback: verified once, whatever the depth.
        // SAFETY: the callback is a static BPF function; no context is passed.
        unsafe {
            bpf_loop(
                WALK_MAX_STEPS,
                walk_step as *mut c_void,
                core::ptr::null_mut(),
                0,
            )
        };
    } else {
        // Without bpf_loop each step is a global function, which the verifier checks once
        // on its own (5.6+) rather than at every iteration of the loop.
        for i in 0..BOUNDED_LUA_STEPS {
            if lua_walk_step(i as u64) != 0 {
                break;
            }
        }
    }
}

/// Resets the walk to start at `base`, and copies the stack's top window.
#[inline(always)]
fn start_walk(w: &mut Walk, stack: u64, base: u64, pc: u64, in_vm: bool) {
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
    let size = (base - stack).min(LUA_WINDOW_BYTES as u64) as u32 & LUA_WINDOW_MASK;
    let lo = base - u64::from(size);
    // SAFETY: writes at most `size` <= LUA_WINDOW_BYTES bytes into the window buffer.
    let ok =
        size > 0 && unsafe { read_raw(w.window.as_mut_ptr().cast(), size, lo as *const _) } == 0;
    (w.win_lo, w.win_hi) = if ok { (lo, base) } else { (0, 0) };
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

/// Mask bounding the window copy's size for the verifier (see [`LUA_WINDOW_BYTES`]).
const LUA_WINDOW_MASK: u32 = 2 * LUA_WINDOW_BYTES as u32 - 1;

/// The Lua stack slot at `addr`, from the walk's window or else from the target.
#[inline(always)]
fn read_slot(w: &Walk, addr: u64) -> Result<u64, Counter> {
    if addr >= w.win_lo
        && addr + 8 <= w.win_hi
        && let Some(v) = w.window.get(((addr - w.win_lo) / 8) as usize)
    {
        return Ok(*v);
    }
    read(addr)
}

#[map]
static LUA_WALK: PerCpuArray<Walk> = PerCpuArray::with_max_entries(1, 0);

/// One iteration of the Lua walk in a `bpf_loop`: returns 0 to go on, 1 to stop.
extern "C" fn walk_step(_index: u64, _ctx: *mut c_void) -> i64 {
    let Some(w) = LUA_WALK.get_ptr_mut(0) else {
        return 1;
    };
    // SAFETY: per-CPU scratch, used by this program invocation only.
    let w = unsafe { &mut *w };
    step_outcome(w)
}

/// Step `index` of the bounded Lua walk: returns 0 to go on, 1 to stop. A global function
/// (exported by the linker, see `build.rs`): the verifier checks it once with its argument
/// unknown, and each call in the loop costs only the call. (The argument is used, so that
/// the compiler cannot leave its register unset at the call, which the verifier refuses.)
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn lua_walk_step(index: u64) -> i64 {
    if index >= BOUNDED_LUA_STEPS as u64 {
        return 1;
    }
    let Some(w) = LUA_WALK.get_ptr_mut(0) else {
        return 1;
    };
    // SAFETY: per-CPU scratch, used by this program invocation only.
    let w = unsafe { &mut *w };
    step_outcome(w)
}

/// One iteration of the Lua walk, its outcome noted in `w`: returns 0 to go on, 1 to stop.
#[inline(always)]
fn step_outcome(w: &mut Walk) -> i64 {
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
    let fr2 = u64::from(w.layout.gc64 != 0);
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
            match read_frame(&w.layout, func, w.pc, typep, out) {
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
