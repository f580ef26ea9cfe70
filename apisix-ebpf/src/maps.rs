//! Every map of the BPF object, and the counting helpers all programs share. Map names are
//! the `MAP_*` constants of `apisix-ebpf-common`, which the agent opens by name.
//!
//! Hooks: none. Metrics: `COUNTERS` (per-CPU, one slot per [`Counter`]) and `LOST`
//! (per-process samples lost to a full ring buffer).

use apisix_ebpf_common::{
    COUNTER_SLOTS, Counter, LuaLayout, MAX_KERNEL_FRAMES, MAX_LUA_LAYOUTS, Target,
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

#[inline(always)]
pub(crate) fn count(counter: Counter) {
    if let Some(slot) = COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe { *slot += 1 };
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
