//! Reading LuaJIT's memory: [`read`] and [`read_ref`] (a GC or memory reference, 64 or
//! 32 bits by layout), and the walk of the running coroutine's frames ([`walk`]).
//!
//! Hooks: none (called by the programs). Metrics: `LuaReadFailed` for failed reads.

pub(crate) mod walk;

use apisix_ebpf_common::{Counter, LuaLayout};
use aya_ebpf::helpers::bpf_probe_read_user;

/// Reads a value of target memory.
#[inline(always)]
pub(crate) fn read<T>(addr: u64) -> Result<T, Counter> {
    // SAFETY: probe read, fails cleanly on a bad address.
    unsafe { bpf_probe_read_user(addr as *const T) }.map_err(|_| Counter::LuaReadFailed)
}

/// Reads a GC reference or memory reference: 64 bits with GC64, else 32 bits.
#[inline(always)]
pub(crate) fn read_ref(layout: &LuaLayout, addr: u64) -> Result<u64, Counter> {
    if layout.gc64 != 0 {
        read::<u64>(addr)
    } else {
        read::<u32>(addr).map(u64::from)
    }
}
