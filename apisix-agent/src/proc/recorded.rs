//! Target memory recorded from a real run, for tests that need no root: [`Recording`] wraps
//! a live [`TargetMemory`] and keeps every byte range a reader got from it;
//! [`RecordedMemory`] serves exactly those ranges again (a read that touches anything else
//! fails, like a read of an unmapped address). The ranges travel as [`MemoryFixture`], JSON
//! with addresses and bytes in hexadecimal (format in `apisix-agent/tests/data/README.md`).
//!
//! Hooks: none (reads go to the wrapped memory). Metrics: none.

use std::{collections::BTreeMap, io, sync::Mutex};

use serde::{Deserialize, Serialize};

use super::memory::{MAX_READ, TargetMemory, too_large};

/// Largest fixture accepted, in bytes of memory (fixtures are tens of KiB).
pub const MAX_FIXTURE_BYTES: usize = 16 << 20;

/// Errors loading a memory fixture.
#[derive(Debug, thiserror::Error)]
pub enum FixtureError {
    /// An address or a byte string is not hexadecimal.
    #[error("region {index}: {what} is not hexadecimal")]
    NotHex { index: usize, what: &'static str },
    /// The regions hold more than [`MAX_FIXTURE_BYTES`].
    #[error("fixture holds more than {MAX_FIXTURE_BYTES} bytes")]
    TooLarge,
    /// A region ends beyond the address space.
    #[error("region {index} wraps the address space")]
    Wraps { index: usize },
}

/// One recorded range of a target's memory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Region {
    /// Start address, `0x…`.
    pub addr: String,
    /// The bytes, two lowercase hex digits each.
    pub bytes: String,
}

/// The recorded memory of one target, as stored.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryFixture {
    /// Disjoint, ascending ranges.
    pub regions: Vec<Region>,
}

/// Ranges merged where they overlap or touch, ascending.
fn merge(ranges: impl IntoIterator<Item = (u64, Vec<u8>)>) -> BTreeMap<u64, Vec<u8>> {
    let mut sorted: Vec<(u64, Vec<u8>)> = ranges.into_iter().collect();
    sorted.sort_by_key(|(a, _)| *a);
    let mut out: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
    let mut last: Option<(u64, Vec<u8>)> = None;
    for (addr, bytes) in sorted {
        match &mut last {
            Some((start, cur)) if addr <= *start + cur.len() as u64 => {
                let skip = (*start + cur.len() as u64 - addr) as usize;
                if skip < bytes.len() {
                    cur.extend_from_slice(&bytes[skip..]);
                }
            }
            _ => {
                if let Some((a, b)) = last.take() {
                    out.insert(a, b);
                }
                last = Some((addr, bytes));
            }
        }
    }
    if let Some((a, b)) = last {
        out.insert(a, b);
    }
    out
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Serves the reads a [`Recording`] kept, and nothing else.
#[derive(Debug, Clone, Default)]
pub struct RecordedMemory {
    regions: BTreeMap<u64, Vec<u8>>,
}

impl RecordedMemory {
    /// Memory made of `regions` (address, bytes); overlapping ones are merged.
    pub fn new(regions: impl IntoIterator<Item = (u64, Vec<u8>)>) -> Self {
        Self {
            regions: merge(regions),
        }
    }

    /// The memory a fixture describes.
    pub fn from_fixture(f: &MemoryFixture) -> Result<Self, FixtureError> {
        let mut total = 0usize;
        let mut regions = Vec::with_capacity(f.regions.len());
        for (index, r) in f.regions.iter().enumerate() {
            let addr = r
                .addr
                .strip_prefix("0x")
                .and_then(|a| u64::from_str_radix(a, 16).ok())
                .ok_or(FixtureError::NotHex {
                    index,
                    what: "addr",
                })?;
            let bytes = unhex(&r.bytes).ok_or(FixtureError::NotHex {
                index,
                what: "bytes",
            })?;
            total = total.saturating_add(bytes.len());
            if total > MAX_FIXTURE_BYTES {
                return Err(FixtureError::TooLarge);
            }
            addr.checked_add(bytes.len() as u64)
                .ok_or(FixtureError::Wraps { index })?;
            regions.push((addr, bytes));
        }
        Ok(Self::new(regions))
    }

    /// The fixture form of this memory.
    pub fn to_fixture(&self) -> MemoryFixture {
        MemoryFixture {
            regions: self
                .regions
                .iter()
                .map(|(a, b)| Region {
                    addr: format!("{a:#x}"),
                    bytes: hex(b),
                })
                .collect(),
        }
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.regions.values().map(Vec::len).sum()
    }

    /// The recorded bytes at `addr`, for tests that corrupt them (`None` outside).
    pub fn bytes_mut(&mut self, addr: u64, len: usize) -> Option<&mut [u8]> {
        let (start, b) = self.regions.range_mut(..=addr).next_back()?;
        let off = usize::try_from(addr - *start).ok()?;
        b.get_mut(off..off.checked_add(len)?)
    }
}

impl TargetMemory for RecordedMemory {
    fn read_into(&self, addr: u64, buf: &mut [u8]) -> io::Result<()> {
        if buf.len() > MAX_READ {
            return Err(too_large());
        }
        let unmapped = || io::Error::new(io::ErrorKind::NotFound, "address not recorded");
        if buf.is_empty() {
            return Ok(());
        }
        let (start, b) = self
            .regions
            .range(..=addr)
            .next_back()
            .ok_or_else(unmapped)?;
        let off = usize::try_from(addr - *start).map_err(|_| unmapped())?;
        let src = off
            .checked_add(buf.len())
            .and_then(|end| b.get(off..end))
            .ok_or_else(unmapped)?;
        buf.copy_from_slice(src);
        Ok(())
    }
}

/// A live memory whose successful reads are kept, to be written as a fixture.
#[derive(Debug)]
pub struct Recording<M> {
    inner: M,
    kept: Mutex<Vec<(u64, Vec<u8>)>>,
    /// Bytes kept at most; reads beyond it still succeed but are not kept.
    max_bytes: usize,
}

impl<M: TargetMemory> Recording<M> {
    /// Records the reads of `inner`, keeping at most `max_bytes` bytes.
    pub fn new(inner: M, max_bytes: usize) -> Self {
        Self {
            inner,
            kept: Mutex::new(Vec::new()),
            max_bytes,
        }
    }

    /// What was read so far.
    pub fn recorded(&self) -> RecordedMemory {
        let kept = self
            .kept
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        RecordedMemory::new(kept.iter().cloned())
    }
}

impl<M: TargetMemory> TargetMemory for Recording<M> {
    fn read_into(&self, addr: u64, buf: &mut [u8]) -> io::Result<()> {
        self.inner.read_into(addr, buf)?;
        let mut kept = self
            .kept
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let held: usize = kept.iter().map(|(_, b)| b.len()).sum();
        if held + buf.len() <= self.max_bytes {
            kept.push((addr, buf.to_vec()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serves_recorded_ranges_only() {
        let m = RecordedMemory::new([(0x1000, vec![1, 2, 3, 4]), (0x1004, vec![5, 6])]);
        assert_eq!(
            m.read(0x1002, 4).expect("spans merged regions"),
            [3, 4, 5, 6]
        );
        assert!(m.read(0x0fff, 2).is_err());
        assert!(m.read(0x1005, 2).is_err());
        assert!(m.read(0x2000, 1).is_err());
        assert!(m.read(0x1000, MAX_READ + 1).is_err());
        assert_eq!(m.read(0x5000, 0).expect("empty read"), Vec::<u8>::new());
    }

    #[test]
    fn overlapping_reads_merge_and_round_trip_through_json() {
        let m = RecordedMemory::new([
            (0x10, vec![0xaa; 8]),
            (0x14, vec![0xbb; 8]),
            (0x40, vec![0, 1]),
        ]);
        assert_eq!(m.bytes(), 12 + 2);
        let json = serde_json::to_string(&m.to_fixture()).expect("json");
        let back: MemoryFixture = serde_json::from_str(&json).expect("parse");
        let again = RecordedMemory::from_fixture(&back).expect("fixture");
        assert_eq!(
            again.read(0x10, 12).expect("read"),
            m.read(0x10, 12).expect("read")
        );
        assert_eq!(again.read(0x40, 2).expect("read"), [0, 1]);
    }

    #[test]
    fn bad_fixtures_are_refused() {
        let f = |addr: &str, bytes: &str| MemoryFixture {
            regions: vec![Region {
                addr: addr.into(),
                bytes: bytes.into(),
            }],
        };
        assert!(RecordedMemory::from_fixture(&f("10", "00")).is_err());
        assert!(RecordedMemory::from_fixture(&f("0x10", "0")).is_err());
        assert!(RecordedMemory::from_fixture(&f("0x10", "zz")).is_err());
        assert!(RecordedMemory::from_fixture(&f("0xffffffffffffffff", "0000")).is_err());
        assert!(RecordedMemory::from_fixture(&f("0x10", "00ff")).is_ok());
    }

    #[test]
    fn a_recording_keeps_what_was_read() {
        let live = RecordedMemory::new([(0x100, (0u8..64).collect())]);
        let rec = Recording::new(live, 16);
        assert_eq!(rec.read(0x104, 4).expect("read"), [4, 5, 6, 7]);
        assert!(rec.read(0x200, 4).is_err());
        rec.read(0x110, 32)
            .expect("read beyond the cap still succeeds");
        let kept = rec.recorded();
        assert_eq!(kept.bytes(), 4);
        assert_eq!(kept.read(0x104, 4).expect("kept"), [4, 5, 6, 7]);
        assert!(kept.read(0x110, 1).is_err());
    }
}
