//! Bulk reads of a target's memory for a heap snapshot: the target is read in aligned
//! [`CHUNK`]s (one `process_vm_readv` each) and every object read is served from the chunks
//! held, so a walk of millions of objects costs a few hundred system calls per 100 MiB of
//! heap, not one per object. A chunk that cannot be read whole (it crosses the end of a
//! mapping) is read page by page and only its readable pages serve reads.
//!
//! Bounded twice: the chunks held ([`ChunkCache::new`]'s `cache_bytes`, the oldest chunk is
//! dropped first) and the bytes read from the target over the cache's life (`read_bytes`:
//! past it every read fails with [`CacheError::Budget`]). The chunks are read at different
//! times while the target runs: objects that changed between two chunks' reads are the
//! walker's to detect (it checks each object's type byte) and count.
//!
//! Hooks: `process_vm_readv` through [`TargetMemory::read_into`] (the only target read of a
//! snapshot besides the VM check). Metrics: none; [`CacheStats`] goes into the snapshot's
//! report.

use std::collections::{HashMap, VecDeque};

use crate::proc::memory::TargetMemory;

/// Bytes of one chunk (64 pages: one `u64` says which are readable).
pub const CHUNK: u64 = 256 << 10;
const PAGE: u64 = 4096;
/// Longest single read served (a piece of a table's array or hash part).
pub const MAX_GET: usize = 64 << 10;

/// Why a read was not served.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CacheError {
    /// Part of the range is not mapped in the target (or the target exited).
    #[error("target memory at {addr:#x} is not readable")]
    Unreadable { addr: u64 },
    /// The snapshot's read budget is spent.
    #[error("the snapshot's read budget is spent")]
    Budget,
    /// The range is longer than [`MAX_GET`] or wraps.
    #[error("a read of {len} bytes at {addr:#x} is out of bounds")]
    Bounds { addr: u64, len: usize },
}

impl CacheError {
    /// A short label for counters.
    pub fn reason(&self) -> &'static str {
        match self {
            CacheError::Unreadable { .. } => "unreadable",
            CacheError::Budget => "read_budget",
            CacheError::Bounds { .. } => "out_of_bounds",
        }
    }
}

/// What the cache did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct CacheStats {
    /// `process_vm_readv` calls.
    pub reads: u64,
    /// Bytes read from the target.
    pub bytes_read: u64,
    /// Chunks dropped to stay under the cache's size.
    pub evictions: u64,
}

struct Chunk {
    bytes: Box<[u8]>,
    /// Bit `i`: page `i` of the chunk was read.
    valid: u64,
}

/// The chunks of one target held for one snapshot.
pub struct ChunkCache<'m> {
    mem: &'m dyn TargetMemory,
    chunks: HashMap<u64, Chunk>,
    order: VecDeque<u64>,
    max_chunks: usize,
    read_budget: u64,
    scratch: Vec<u8>,
    pub stats: CacheStats,
}

impl<'m> ChunkCache<'m> {
    /// A cache holding at most `cache_bytes` of chunks (at least two) and reading at most
    /// `read_bytes` from `mem` in all.
    pub fn new(mem: &'m dyn TargetMemory, cache_bytes: u64, read_bytes: u64) -> Self {
        Self {
            mem,
            chunks: HashMap::new(),
            order: VecDeque::new(),
            max_chunks: usize::try_from((cache_bytes / CHUNK).max(2)).unwrap_or(usize::MAX),
            read_budget: read_bytes,
            scratch: Vec::new(),
            stats: CacheStats::default(),
        }
    }

    /// Bytes of chunks held now.
    pub fn held_bytes(&self) -> u64 {
        self.chunks.len() as u64 * CHUNK
    }

    fn spend(&mut self, len: u64) -> Result<(), CacheError> {
        if self.stats.bytes_read.saturating_add(len) > self.read_budget {
            return Err(CacheError::Budget);
        }
        self.stats.reads += 1;
        self.stats.bytes_read += len;
        Ok(())
    }

    /// Reads the chunk at `base` (whole, or page by page when that fails).
    fn fill(&mut self, base: u64) -> Result<(), CacheError> {
        if self.chunks.contains_key(&base) {
            return Ok(());
        }
        self.spend(CHUNK)?;
        let mut bytes = vec![0u8; CHUNK as usize].into_boxed_slice();
        let valid = if self.mem.read_into(base, &mut bytes).is_ok() {
            u64::MAX
        } else {
            let mut valid = 0u64;
            for (i, page) in bytes.chunks_exact_mut(PAGE as usize).enumerate() {
                // The pages are counted against the budget once, with the chunk.
                self.stats.reads += 1;
                if self.mem.read_into(base + i as u64 * PAGE, page).is_ok() {
                    valid |= 1 << i;
                }
            }
            valid
        };
        while self.chunks.len() >= self.max_chunks {
            let Some(old) = self.order.pop_front() else {
                break;
            };
            self.chunks.remove(&old);
            self.stats.evictions += 1;
        }
        self.chunks.insert(base, Chunk { bytes, valid });
        self.order.push_back(base);
        Ok(())
    }

    /// The `len` bytes at `addr`, served from the chunks (read first when missing).
    pub fn read(&mut self, addr: u64, len: usize) -> Result<&[u8], CacheError> {
        let end = addr
            .checked_add(len as u64)
            .filter(|_| len <= MAX_GET)
            .ok_or(CacheError::Bounds { addr, len })?;
        if len == 0 {
            return Ok(&[]);
        }
        let first = addr & !(CHUNK - 1);
        let last = (end - 1) & !(CHUNK - 1);
        if first == last {
            self.fill(first)?;
            let chunk = &self.chunks[&first];
            let off = addr - first;
            if !pages_valid(chunk.valid, off, len as u64) {
                return Err(CacheError::Unreadable { addr });
            }
            return Ok(&chunk.bytes[off as usize..off as usize + len]);
        }
        // Across chunks (at most two: MAX_GET < CHUNK): copied together, each part right
        // after its chunk is read (reading the second may drop the first).
        let mut scratch = std::mem::take(&mut self.scratch);
        scratch.clear();
        let mut result = Ok(());
        for (base, from, to) in [(first, addr, last), (last, last, end)] {
            result = self.fill(base).and_then(|()| {
                let chunk = &self.chunks[&base];
                if !pages_valid(chunk.valid, from - base, to - from) {
                    return Err(CacheError::Unreadable { addr: from });
                }
                scratch
                    .extend_from_slice(&chunk.bytes[(from - base) as usize..(to - base) as usize]);
                Ok(())
            });
            if result.is_err() {
                break;
            }
        }
        self.scratch = scratch;
        result.map(|()| self.scratch.as_slice())
    }
}

/// Whether every page of `len` bytes at `off` in a chunk was read.
fn pages_valid(valid: u64, off: u64, len: u64) -> bool {
    if valid == u64::MAX {
        return true;
    }
    let first = off / PAGE;
    let last = (off + len.max(1) - 1) / PAGE;
    (first..=last).all(|p| valid & (1 << p) != 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proc::memory::Memory;

    #[test]
    fn serves_reads_from_few_chunks_and_stays_bounded() {
        let me = Memory::new(std::process::id());
        let data: Vec<u8> = (0..3 * CHUNK as usize).map(|i| (i % 251) as u8).collect();
        let base = data.as_ptr() as u64;
        let mut c = ChunkCache::new(&me, 2 * CHUNK, 16 * CHUNK);
        for off in [
            0usize,
            100,
            4000,
            CHUNK as usize - 3,
            2 * CHUNK as usize + 7,
        ] {
            let got = c.read(base + off as u64, 16).expect("read").to_vec();
            assert_eq!(got, data[off..off + 16]);
        }
        // At most two chunks held; the data spans four chunks at most, each filled once
        // (a chunk reaching outside the mapping is read page by page, still once).
        assert!(c.held_bytes() <= 2 * CHUNK);
        assert!(c.stats.bytes_read <= 4 * CHUNK, "{:?}", c.stats);
        // The budget ends reads; bounds are refused.
        let mut small = ChunkCache::new(&me, 2 * CHUNK, CHUNK);
        assert!(small.read(base, 8).is_ok());
        let far = base + 2 * CHUNK + 8;
        assert_eq!(small.read(far, 8).err(), Some(CacheError::Budget));
        assert!(matches!(
            small.read(u64::MAX - 4, 8),
            Err(CacheError::Bounds { .. })
        ));
        assert!(matches!(
            small.read(base, MAX_GET + 1),
            Err(CacheError::Bounds { .. })
        ));
    }

    #[test]
    fn unmapped_pages_fail_and_mapped_neighbours_serve() {
        let me = Memory::new(std::process::id());
        // Two pages mapped, the second made unreadable.
        // SAFETY: an anonymous mapping of two pages, unmapped below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                2 * PAGE as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        let a = p as u64;
        // SAFETY: the second page of the mapping above.
        unsafe { libc::munmap((a + PAGE) as *mut libc::c_void, PAGE as usize) };
        let mut c = ChunkCache::new(&me, 4 * CHUNK, 64 * CHUNK);
        assert!(c.read(a + 8, 8).is_ok());
        assert!(matches!(
            c.read(a + PAGE + 8, 8),
            Err(CacheError::Unreadable { .. })
        ));
        assert!(matches!(
            c.read(a + PAGE - 4, 8),
            Err(CacheError::Unreadable { .. })
        ));
        // SAFETY: the first page, still mapped.
        unsafe { libc::munmap(p, PAGE as usize) };
    }
}
