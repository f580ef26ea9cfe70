//! The allocator probes: a uprobe and a uretprobe on a Lua VM's allocator
//! (`global_State.allocf`, `lj_alloc_f` in LuaJIT's own builds), attached by the agent to one
//! process at the function's file offset for the length of an allocation capture.
//!
//! Every call `allocf(ud, ptr, osize, nsize)` is an allocation (`ptr == NULL`), a resize or a
//! free (`nsize == 0`). Its *allocated bytes* are what it adds to the heap as LuaJIT counts
//! it (`g->gc.total`): `nsize` for an allocation, `nsize - osize` for a resize that grows,
//! nothing for a shrink or a free. Each thread walks the stream of its allocated bytes
//! towards its next sampling point; the gaps between points are drawn uniformly from
//! `1..=2N-1` bytes (mean `N`, `AllocConfig::sample_bytes`) with `bpf_get_prandom_u32`, so an
//! allocation pattern that repeats every `N` bytes cannot line up with them. A call that
//! holds `k` points writes the thread's stack ([`crate::sample::emit`], without a kernel
//! stack) weighted by `k * N`: the expected weight of every call is its allocated bytes.
//!
//! Live mode adds the uretprobe: a sampled block is remembered in `LIVE_ALLOCS` under the
//! address the allocator returned, with the sample's identity (thread, time) and weight, and
//! forgotten when it is freed. A resize moves a remembered block to its new address, keeping
//! the stack that first sampled it and adding the weight of the resize if that is sampled
//! too (the growth counted above belongs to the same block). A failed allocation changes
//! nothing. After the capture the agent lets the probes *settle*: `sample_bytes` 0 with live
//! mode on, nothing is counted or sampled but frees and resizes of tracked blocks still are,
//! until the VM has completed a collection; then it holds them (both 0).
//!
//! `alloc_entry_bounded` is the entry probe for kernels without `bpf_loop`.
//!
//! Hooks: uprobe and uretprobe on the allocator (per process). Metrics: `AllocCalls`,
//! `AllocBytes`, `AllocSampled`, `LiveMapFull`, `AllocNoReturn`, `LiveFreed`,
//! `MapInsertFailed` (a thread's state not stored), and those of [`crate::sample::emit`].

use apisix_ebpf_common::{AllocConfig, Counter, LiveAlloc};
use aya_ebpf::{
    EbpfContext,
    helpers::{bpf_get_current_pid_tgid, generated::bpf_get_prandom_u32},
    macros::{uprobe, uretprobe},
    programs::{ProbeContext, RetProbeContext},
};

use crate::{
    maps::{
        ALLOC_CONFIG, ALLOC_THREADS, AllocThread, LIVE_ALLOCS, TARGETS, count, count_n, finish,
    },
    regs::probe_regs,
    sample::{KernelStack, emit},
};

/// Gaps drawn for one call before the rest of a very large allocation is counted by its
/// expected number of points (`rest / N`): exact for calls up to about 16 gaps.
const MAX_DRAWS: u32 = 16;

/// `allocf(ud, ptr, osize, nsize)` entered: counts the call's allocated bytes and, at a
/// sampling point, writes the thread's stack. In live mode notes the call for the return.
#[uprobe]
pub fn alloc_entry(ctx: ProbeContext) -> u32 {
    finish(try_alloc_entry::<true>(&ctx))
}

/// [`alloc_entry`] for kernels without `bpf_loop`.
#[uprobe]
pub fn alloc_entry_bounded(ctx: ProbeContext) -> u32 {
    finish(try_alloc_entry::<false>(&ctx))
}

fn try_alloc_entry<const LOOP: bool>(ctx: &ProbeContext) -> Result<(), Counter> {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    let tid = pid_tgid as u32;
    // SAFETY: read-only lookup of a plain value.
    let Some(target) = (unsafe { TARGETS.get(tgid) }) else {
        return Ok(());
    };
    let cfg = config();
    if cfg.sample_bytes == 0 && cfg.live == 0 {
        return Ok(());
    }
    let ptr: u64 = ctx.arg(1).unwrap_or(0);
    let osize: u64 = ctx.arg(2).unwrap_or(0);
    let nsize: u64 = ctx.arg(3).unwrap_or(0);
    // Settling (live mode after the capture): no sampling, frees and resizes still tracked.
    let sampling = cfg.sample_bytes != 0;
    let bytes = if nsize == 0 {
        0
    } else if ptr == 0 {
        nsize
    } else {
        nsize.saturating_sub(osize)
    };
    if sampling {
        count(Counter::AllocCalls);
        count_n(Counter::AllocBytes, bytes);
    }

    let st = thread_state(tid, cfg.sample_bytes.max(1))?;
    // SAFETY: the thread's own map value: only this thread's probes touch it.
    let st = unsafe { &mut *st };
    if cfg.live != 0 && st.pending != 0 && sampling {
        // The previous call's return was not seen (uretprobe instances exhausted): its
        // block, if sampled, is not tracked.
        count(Counter::AllocNoReturn);
    }
    let points = if sampling {
        take_points(st, bytes, cfg.sample_bytes)
    } else {
        0
    };
    let mut time_ns = 0;
    let mut weight = 0;
    if points > 0 {
        count(Counter::AllocSampled);
        // At most about `bytes + 17 * N`: no overflow for LuaJIT's allocation limit (2^47)
        // and the agent's bound on N (2^30). (A checked multiply needs a 128-bit helper
        // BPF lacks.)
        weight = points.wrapping_mul(cfg.sample_bytes);
        match emit::<LOOP>(
            ctx.as_ptr(),
            pid_tgid,
            target,
            &probe_regs(ctx),
            weight,
            KernelStack::Empty,
        ) {
            Ok(t) => time_ns = t,
            // No sample to name the block by: it is not tracked (the loss is counted).
            Err(c) => count(c),
        }
    }
    if cfg.live != 0 {
        st.old = ptr;
        st.nsize = nsize;
        st.time_ns = time_ns;
        st.weight = if time_ns != 0 { weight } else { 0 };
        st.pending = 1;
    }
    Ok(())
}

/// `allocf` returned (live mode): the block passed in is forgotten (or moved, when resized),
/// a sampled new block remembered.
#[uretprobe]
pub fn alloc_return(ctx: RetProbeContext) -> u32 {
    finish(try_alloc_return(&ctx))
}

fn try_alloc_return(ctx: &RetProbeContext) -> Result<(), Counter> {
    let tid = bpf_get_current_pid_tgid() as u32;
    if config().live == 0 {
        return Ok(());
    }
    let Some(st) = ALLOC_THREADS.get_ptr_mut(tid) else {
        return Ok(());
    };
    // SAFETY: the thread's own map value: only this thread's probes touch it.
    let st = unsafe { &mut *st };
    if st.pending == 0 {
        // Entered before the probes were attached (or while they were held).
        return Ok(());
    }
    st.pending = 0;
    let new: u64 = ctx.ret();
    let (old, nsize) = (st.old, st.nsize);
    if nsize != 0 && new == 0 {
        // A failed allocation or resize: the old block is still there, unchanged.
        return Ok(());
    }
    let mut moved: Option<LiveAlloc> = None;
    if old != 0 {
        // SAFETY: read-only lookup of a plain value, copied out before the removal.
        if let Some(e) = unsafe { LIVE_ALLOCS.get(old) } {
            moved = Some(*e);
            let _ = LIVE_ALLOCS.remove(old);
            if nsize == 0 {
                count(Counter::LiveFreed);
            }
        }
    }
    if nsize == 0 {
        return Ok(());
    }
    let entry = match (moved, st.time_ns != 0) {
        (Some(mut e), true) => {
            e.weight = e.weight.saturating_add(st.weight);
            e
        }
        (Some(e), false) => e,
        (None, true) => LiveAlloc {
            time_ns: st.time_ns,
            weight: st.weight,
            tid,
            reserved: 0,
        },
        (None, false) => return Ok(()),
    };
    LIVE_ALLOCS
        .insert(new, entry, 0)
        .map_err(|_| Counter::LiveMapFull)
}

/// The capture's configuration (held when unset).
#[inline(always)]
fn config() -> AllocConfig {
    ALLOC_CONFIG.get(0).copied().unwrap_or_default()
}

/// The thread's sampling state, created with a first gap drawn on its first call.
#[inline(always)]
fn thread_state(tid: u32, mean: u64) -> Result<*mut AllocThread, Counter> {
    if let Some(st) = ALLOC_THREADS.get_ptr_mut(tid) {
        return Ok(st);
    }
    let fresh = AllocThread {
        next: gap(mean),
        old: 0,
        nsize: 0,
        time_ns: 0,
        weight: 0,
        pending: 0,
        reserved: 0,
    };
    ALLOC_THREADS
        .insert(tid, fresh, 0)
        .map_err(|_| Counter::MapInsertFailed)?;
    ALLOC_THREADS
        .get_ptr_mut(tid)
        .ok_or(Counter::MapInsertFailed)
}

/// Moves the thread `bytes` along its byte stream; returns how many sampling points they
/// held.
#[inline(always)]
fn take_points(st: &mut AllocThread, bytes: u64, mean: u64) -> u64 {
    if bytes < st.next {
        st.next -= bytes;
        return 0;
    }
    let mut rest = bytes - st.next;
    let mut points = 1;
    for _ in 0..MAX_DRAWS {
        let g = gap(mean);
        if rest < g {
            st.next = g - rest;
            return points;
        }
        rest -= g;
        points += 1;
    }
    // A very large allocation: the rest holds `rest / mean` points in expectation.
    st.next = gap(mean);
    points + rest / mean
}

/// A gap between two sampling points: uniform in `1..=2 * mean - 1` (mean `mean`).
#[inline(always)]
fn gap(mean: u64) -> u64 {
    // SAFETY: helper without preconditions.
    let r = unsafe { (u64::from(bpf_get_prandom_u32()) << 32) | u64::from(bpf_get_prandom_u32()) };
    1 + r % (2 * mean - 1)
}
