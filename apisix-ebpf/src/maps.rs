//! Every map of the BPF object, and the counting helpers all programs share. Map names are
//! the `MAP_*` constants of `apisix-ebpf-common`, which the agent opens by name.
//!
//! Hooks: none. Metrics: `COUNTERS` (per-CPU, one slot per [`Counter`]) and `LOST`
//! (per-process samples lost to a full ring buffer).
//!
//! The allocation maps are declared with their capture sizes; the agent shrinks them to one
//! entry when it loads the object for anything else.

use apisix_ebpf_common::{
    ALLOC_MAX_THREADS, AllocConfig, COUNTER_SLOTS, Counter, KernelConfig, LIVE_MAX_TRACKED,
    LOOP_MAX_THREADS, LiveAlloc, LoopConfig, LoopThread, LuaLayout, MAX_KERNEL_FRAMES,
    MAX_LUA_LAYOUTS, Target,
};
use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, PerCpuArray, PerCpuHashMap, RingBuf},
};

#[map]
pub(crate) static TARGETS: HashMap<u32, Target> = HashMap::with_max_entries(4096, 0);

#[map]
pub(crate) static LUA_LAYOUTS: Array<LuaLayout> = Array::with_max_entries(MAX_LUA_LAYOUTS, 0);

#[map]
pub(crate) static LUA_VMS: HashMap<u32, u64> = HashMap::with_max_entries(4096, 0);

#[map]
pub(crate) static SAMPLES: RingBuf = RingBuf::with_byte_size(8 * 1024 * 1024, 0);

#[map]
pub(crate) static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTER_SLOTS, 0);

/// A block in progress: when it began and the kernel stack at that point.
#[repr(C)]
pub(crate) struct OffStart {
    pub(crate) start_ns: u64,
    pub(crate) kstack_len: u64,
    pub(crate) kstack: [u64; MAX_KERNEL_FRAMES],
}

#[map]
pub(crate) static OFF_START: HashMap<u32, OffStart> = HashMap::with_max_entries(16384, 0);

#[map]
pub(crate) static OFF_SCRATCH: PerCpuArray<OffStart> = PerCpuArray::with_max_entries(1, 0);

#[map]
pub(crate) static OFFCPU_MIN: Array<u64> = Array::with_max_entries(1, 0);

#[map]
pub(crate) static LOST: PerCpuHashMap<u32, u64> = PerCpuHashMap::with_max_entries(4096, 0);

#[map]
pub(crate) static KERNEL_CONFIG: Array<KernelConfig> = Array::with_max_entries(1, 0);

/// The kernel offsets the agent wrote (all 0 when unset).
#[inline(always)]
pub(crate) fn kernel_config() -> KernelConfig {
    KERNEL_CONFIG.get(0).copied().unwrap_or_default()
}

#[map]
pub(crate) static LOOP_THREADS: HashMap<u32, LoopThread> =
    HashMap::with_max_entries(LOOP_MAX_THREADS, 0);

#[map]
pub(crate) static LOOP_CONFIG: Array<LoopConfig> = Array::with_max_entries(1, 0);

#[map]
pub(crate) static ALLOC_CONFIG: Array<AllocConfig> = Array::with_max_entries(1, 0);

/// One thread's allocation sampling state.
#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct AllocThread {
    /// Allocated bytes to go until the thread's next sampling point.
    pub(crate) next: u64,
    /// The call in flight (live mode), between the allocator's entry and its return: the
    /// block passed in (0: none), the size asked for (0: a free), and, when the call was
    /// sampled, the sample's time and the bytes it stands for.
    pub(crate) old: u64,
    pub(crate) nsize: u64,
    pub(crate) time_ns: u64,
    pub(crate) weight: u64,
    /// 1 while a call is in flight.
    pub(crate) pending: u32,
    pub(crate) reserved: u32,
}

#[map]
pub(crate) static ALLOC_THREADS: HashMap<u32, AllocThread> =
    HashMap::with_max_entries(ALLOC_MAX_THREADS, 0);

#[map]
pub(crate) static LIVE_ALLOCS: HashMap<u64, LiveAlloc> =
    HashMap::with_max_entries(LIVE_MAX_TRACKED, 0);

/// A program's return value (always 0), after counting the error `result` carries, if any:
/// every entry point is `finish(try_…(&ctx))`.
#[inline(always)]
pub(crate) fn finish(result: Result<(), Counter>) -> u32 {
    if let Err(counter) = result {
        count(counter);
    }
    0
}

#[inline(always)]
pub(crate) fn count(counter: Counter) {
    count_n(counter, 1);
}

/// Adds `n` to a counter (bytes, for [`Counter::AllocBytes`]).
#[inline(always)]
pub(crate) fn count_n(counter: Counter, n: u64) {
    if let Some(slot) = COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe { *slot += n };
    }
}

/// Counts a sample of process `tgid` dropped because the ring buffer was full.
#[inline(always)]
pub(crate) fn count_lost(tgid: u32) {
    match LOST.get_ptr_mut(tgid) {
        // SAFETY: per-CPU value, no concurrent writer on this CPU.
        Some(p) => unsafe { *p += 1 },
        None => {
            inserted(LOST.insert(tgid, 1, 0));
        }
    }
}

/// Counts a failed map insert ([`Counter::MapInsertFailed`]): what it would have stored (a
/// learned VM, a block's start, a lost count) is missing, and that shows in the counters.
#[inline(always)]
pub(crate) fn inserted<E>(result: Result<(), E>) {
    if result.is_err() {
        count(Counter::MapInsertFailed);
    }
}
