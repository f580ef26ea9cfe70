//! A Lua VM's heap seen from outside: its allocator (`global_State.allocf` and its argument
//! `allocd`) and its size (`gc.total`, what `collectgarbage("count")` reports), read from the
//! target's memory at a `global_State` address the BPF side learned. Nothing read is trusted:
//! the address must still be a VM (its main thread, which opens the `GG_State` right below
//! it, points back to it both ways) and the size must be below LuaJIT's own limit.
//!
//! Hooks: `process_vm_readv` (two reads per [`read`] or [`check_vm`], one per [`gc_phase`]). Metrics: none; a failure has a
//! [`HeapError::reason`], counted by the caller.

use super::layout::Layout;
use crate::proc::memory::TargetMemory;

/// `gc.state` between two collection cycles (`GCSpause`).
const GCS_PAUSE: u8 = 0;

/// LuaJIT's largest heap: `LJ_MAX_MEM64` (2^47) with GC64, `LJ_MAX_MEM32` without.
const MAX_MEM64: u64 = 1 << 47;
const MAX_MEM32: u64 = 0x7fff_ff00;

/// What the heap fields of one VM held at one read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmHeap {
    /// The `global_State` address.
    pub g: u64,
    /// The allocator function.
    pub allocf: u64,
    /// Its first argument (LuaJIT's allocator: its arena).
    pub allocd: u64,
    /// Bytes allocated and not freed (`gc.total`).
    pub total: u64,
}

/// Where a VM's collector is: its current white (flipped at each cycle's atomic phase) and
/// whether it pauses between two cycles.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GcPhase {
    pub white: u8,
    pub paused: bool,
}

/// Watches a VM's collector until a whole cycle ran after the watch began: every object
/// allocated before then and unreachable at that cycle's atomic phase has been freed.
#[derive(Debug, Clone, Copy)]
pub struct CycleWatch {
    start_white: u8,
    flipped: bool,
}

impl CycleWatch {
    /// Starts watching from `now`.
    pub fn new(now: GcPhase) -> Self {
        Self {
            start_white: now.white,
            flipped: false,
        }
    }

    /// Takes one observation; true once a cycle whose atomic phase came after the start has
    /// also finished sweeping. (Two flips between observations look like none: the watch then
    /// waits for the next cycle, it never ends early.)
    pub fn observe(&mut self, now: GcPhase) -> bool {
        if now.white != self.start_white {
            self.flipped = true;
        }
        // A pause after a flip: the cycle that flipped has swept (or a later one began).
        self.flipped && now.paused
    }
}

/// Reads where the collector of the VM at `g` is (two bytes).
pub fn gc_phase(mem: &dyn TargetMemory, layout: &Layout, g: u64) -> Result<GcPhase, HeapError> {
    let mut b = [0u8; 2];
    // An address that wraps is no VM's.
    let at = g
        .checked_add(u64::from(layout.heap.g_gc_currentwhite))
        .ok_or(HeapError::NotAVm { g })?;
    mem.read_into(at, &mut b)
        .map_err(|source| HeapError::Read { g, source })?;
    Ok(GcPhase {
        white: b[0],
        paused: b[1] == GCS_PAUSE,
    })
}

/// Why a VM's heap could not be read.
#[derive(Debug, thiserror::Error)]
pub enum HeapError {
    /// The target's memory could not be read there (it exited, or the address is garbage).
    #[error("reading the Lua VM's global_State at {g:#x}")]
    Read {
        g: u64,
        #[source]
        source: std::io::Error,
    },
    /// The address no longer holds a VM (closed, or never was one).
    #[error("{g:#x} is not a Lua VM (its main thread does not point back to it)")]
    NotAVm { g: u64 },
    /// The heap size is beyond what LuaJIT can allocate.
    #[error("the Lua VM at {g:#x} reports an implausible heap of {total} bytes")]
    Implausible { g: u64, total: u64 },
    /// The VM has no allocator.
    #[error("the Lua VM at {g:#x} has no allocator (global_State.allocf is NULL)")]
    NoAllocator { g: u64 },
}

impl HeapError {
    /// Stable snake_case reason, for counters and reports.
    pub fn reason(&self) -> &'static str {
        match self {
            HeapError::Read { .. } => "heap_read_failed",
            HeapError::NotAVm { .. } => "heap_not_a_vm",
            HeapError::Implausible { .. } => "heap_implausible",
            HeapError::NoAllocator { .. } => "heap_no_allocator",
        }
    }
}

/// Checks that `g` is still a VM (its main thread points back to it both ways), as
/// [`read`] does: for watches that read nothing else of it for long ([`gc_phase`]).
pub fn check_vm(mem: &dyn TargetMemory, layout: &Layout, g: u64) -> Result<(), HeapError> {
    vm_head(mem, layout, g).map(|_| ())
}

/// Reads the heap fields of the VM whose `global_State` is at `g` in the process of `mem`.
pub fn read(mem: &dyn TargetMemory, layout: &Layout, g: u64) -> Result<VmHeap, HeapError> {
    let h = &layout.heap;
    let gc64 = layout.bpf.gc64 != 0;
    let head = vm_head(mem, layout, g)?;
    let word = |off: u32, width: u32| -> Option<u64> {
        let b = head.get(off as usize..(off + width) as usize)?;
        Some(match width {
            8 => u64::from_le_bytes(b.try_into().ok()?),
            _ => u64::from(u32::from_le_bytes(b.try_into().ok()?)),
        })
    };
    let allocf = word(h.g_allocf, 8).ok_or(HeapError::NotAVm { g })?;
    let allocd = word(h.g_allocd, 8).ok_or(HeapError::NotAVm { g })?;
    let total = word(h.g_gc_total, h.gc_total_size).ok_or(HeapError::NotAVm { g })?;
    if allocf == 0 {
        return Err(HeapError::NoAllocator { g });
    }
    let max = if gc64 { MAX_MEM64 } else { MAX_MEM32 };
    if total == 0 || total > max {
        return Err(HeapError::Implausible { g, total });
    }
    Ok(VmHeap {
        g,
        allocf,
        allocd,
        total,
    })
}

/// The head of the `global_State` at `g` (up to its main thread reference), once the
/// main thread is found to point back to it both ways.
fn vm_head(mem: &dyn TargetMemory, layout: &Layout, g: u64) -> Result<Vec<u8>, HeapError> {
    let h = &layout.heap;
    let gc64 = layout.bpf.gc64 != 0;
    let refw = if gc64 { 8 } else { 4 };
    let main = g
        .checked_sub(u64::from(h.gg_g))
        .ok_or(HeapError::NotAVm { g })?;
    let head = mem
        .read(g, (h.g_mainthref + refw) as usize)
        .map_err(|source| HeapError::Read { g, source })?;
    let word = |off: u32, width: u32| -> Option<u64> {
        let b = head.get(off as usize..(off + width) as usize)?;
        Some(match width {
            8 => u64::from_le_bytes(b.try_into().ok()?),
            _ => u64::from(u32::from_le_bytes(b.try_into().ok()?)),
        })
    };
    let not_vm = HeapError::NotAVm { g };
    let mainthref = word(h.g_mainthref, refw).ok_or(HeapError::NotAVm { g })?;
    let glref = {
        let at = main
            .checked_add(u64::from(layout.bpf.l_glref))
            .ok_or(HeapError::NotAVm { g })?;
        let b = mem
            .read(at, refw as usize)
            .map_err(|source| HeapError::Read { g, source })?;
        if gc64 {
            u64::from_le_bytes(
                b.as_slice()
                    .try_into()
                    .map_err(|_| HeapError::NotAVm { g })?,
            )
        } else {
            u64::from(u32::from_le_bytes(
                b.as_slice()
                    .try_into()
                    .map_err(|_| HeapError::NotAVm { g })?,
            ))
        }
    };
    if mainthref != main || glref != g {
        return Err(not_vm);
    }
    Ok(head)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        luajit::layout::{GC32, GC64},
        proc::memory::Memory,
    };

    /// A fake `GG_State` in this process, in the low 2 GiB as LuaJIT keeps its GC objects
    /// with 32-bit references: the main thread's glref, then the global_State.
    struct Fake {
        base: *mut u8,
        len: usize,
    }

    impl Fake {
        fn new(layout: &Layout, total: u64, point_back: bool) -> (Self, u64) {
            let len = 4096;
            // SAFETY: an anonymous private mapping, unmapped on drop.
            let base = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_32BIT,
                    -1,
                    0,
                )
            };
            assert_ne!(base, libc::MAP_FAILED, "mmap");
            let fake = Self {
                base: base.cast(),
                len,
            };
            let b = fake.base as u64;
            let g = b + u64::from(layout.heap.gg_g);
            let refw = if layout.bpf.gc64 != 0 { 8 } else { 4 };
            let glref = if point_back { g } else { g + 8 };
            fake.put(b + u64::from(layout.bpf.l_glref), glref, refw);
            fake.put(g + u64::from(layout.heap.g_mainthref), b, refw);
            fake.put(g + u64::from(layout.heap.g_allocf), 0x1234, 8);
            fake.put(g + u64::from(layout.heap.g_allocd), 0x5678, 8);
            fake.put(
                g + u64::from(layout.heap.g_gc_total),
                total,
                layout.heap.gc_total_size,
            );
            (fake, g)
        }

        fn put(&self, addr: u64, value: u64, width: u32) {
            let off = usize::try_from(addr - self.base as u64).expect("offset");
            assert!(off + width as usize <= self.len);
            // SAFETY: inside the mapping (checked above).
            let bytes = unsafe { std::slice::from_raw_parts_mut(self.base, self.len) };
            bytes[off..off + width as usize]
                .copy_from_slice(&value.to_le_bytes()[..width as usize]);
        }
    }

    impl Drop for Fake {
        fn drop(&mut self) {
            // SAFETY: the mapping made in `new`.
            unsafe { libc::munmap(self.base.cast(), self.len) };
        }
    }

    fn fake(layout: &Layout, total: u64, point_back: bool) -> (Fake, u64) {
        Fake::new(layout, total, point_back)
    }

    #[test]
    fn reads_a_vm_of_either_layout() {
        let me = Memory::new(std::process::id());
        for layout in [&GC64, &GC32] {
            let (_gg, g) = fake(layout, 123_456, true);
            let h = match read(&me, layout, g) {
                Ok(h) => h,
                Err(e) => panic!("{e}"),
            };
            assert_eq!((h.allocf, h.allocd, h.total), (0x1234, 0x5678, 123_456));
        }
    }

    #[test]
    fn a_cycle_counts_once_it_flipped_and_paused() {
        let at = |white, paused| GcPhase { white, paused };
        // Mid-cycle at the start: that cycle's flip is still to come.
        let mut w = CycleWatch::new(at(1, false));
        assert!(!w.observe(at(1, false)));
        assert!(!w.observe(at(2, false)), "flipped, still sweeping");
        assert!(w.observe(at(2, true)));
        // Paused at the start: a pause without a flip is not a cycle.
        let mut w = CycleWatch::new(at(1, true));
        assert!(!w.observe(at(1, true)));
        assert!(!w.observe(at(1, false)));
        assert!(
            w.observe(at(2, true)),
            "a full collection between two reads"
        );
        // Two flips between reads look like none: keep waiting.
        let mut w = CycleWatch::new(at(1, true));
        assert!(!w.observe(at(1, true)));
        // A flip seen, then the white flips back in the next cycle: the first one is done.
        let mut w = CycleWatch::new(at(1, false));
        assert!(!w.observe(at(2, false)));
        assert!(w.observe(at(1, true)));
    }

    #[test]
    fn refuses_what_is_not_a_vm() {
        let me = Memory::new(std::process::id());
        let (_gg, g) = fake(&GC64, 1000, false);
        assert_eq!(
            read(&me, &GC64, g).map_err(|e| e.reason()),
            Err("heap_not_a_vm")
        );
        let (_gg, g) = fake(&GC64, 1 << 50, true);
        assert_eq!(
            read(&me, &GC64, g).map_err(|e| e.reason()),
            Err("heap_implausible")
        );
        assert_eq!(
            read(&me, &GC64, 0x10).map_err(|e| e.reason()),
            Err("heap_not_a_vm")
        );
        assert_eq!(
            read(&me, &GC64, 0x1000).map_err(|e| e.reason()),
            Err("heap_read_failed")
        );
    }
}
