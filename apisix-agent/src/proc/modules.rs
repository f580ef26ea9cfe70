//! The ELF files behind a target process's executable mappings ([`ProcessModules`]),
//! opened through `/proc/PID/map_files/` ([`super::target_file`]: the very file mapped, a
//! regular file with the maps line's device and inode, never by the path the target shows),
//! so that processes in other mount namespaces (containers) are read from their own files
//! and no target can make the agent open a FIFO or a file outside its root.
//!
//! Files are opened once and memory-mapped; the mapping keeps the file readable after the
//! process exits, so samples taken before the exit can still be unwound and symbolized.
//! Hooks: `/proc/PID/map_files/`. Metrics: refusals, through [`super::target_file`].

use std::{collections::HashMap, fs::File, ops::Range, path::PathBuf, sync::Arc};

use memmap2::Mmap;
use object::{Object as _, ObjectSegment as _};

use super::{
    process::{Mapping, ProcessError, read_maps},
    target_file::{self, Refusal},
};

/// An ELF file mapped into the agent's memory.
#[derive(Debug)]
pub struct ElfFile {
    /// The path as the target sees it.
    pub path: String,
    /// Short name (file name) used in frame labels.
    pub name: String,
    /// The file's bytes.
    pub data: Mmap,
    /// The open file, kept so symbolizers can read it through `/proc/self/fd/N`.
    pub file: File,
    /// `(p_offset, p_vaddr, p_filesz)` of each loadable segment.
    pub segments: Vec<(u64, u64, u64)>,
}

impl ElfFile {
    /// Opens the file behind mapping `m` of process `pid` ([`target_file::open`]).
    pub fn open(pid: u32, m: &Mapping) -> Result<Self, Refusal> {
        let path = m.path.as_str();
        let file = target_file::open(pid, m, target_file::MAX_ELF_BYTES)?;
        // SAFETY: read-only private mapping; a file truncated underneath would fault, which
        // shared libraries and executables in use are not (the kernel refuses writes to them).
        let data = unsafe { Mmap::map(&file) }.map_err(|_| Refusal::Unreadable)?;
        let obj = object::File::parse(&*data).map_err(|_| Refusal::NotElf)?;
        let segments = obj
            .segments()
            .map(|s| {
                let (off, size) = s.file_range();
                (off, s.address(), size)
            })
            .collect();
        let name = path.rsplit('/').next().unwrap_or(path).to_owned();
        Ok(Self {
            path: path.to_owned(),
            name,
            data,
            file,
            segments,
        })
    }

    /// The stated virtual address (SVMA) of a mapping that starts at file offset `offset`,
    /// from the loadable segments. A segment is mapped from its offset rounded down to a page,
    /// so the mapping's offset can lie in the tail of the segment before (lld places segments
    /// at offsets that are not page-aligned): the last segment whose page holds `offset` is
    /// the one mapped.
    pub fn svma_of_offset(&self, offset: u64) -> Option<u64> {
        svma_of_offset(&self.segments, offset, super::process::page_size())
    }

    /// A path through which another reader can open the very same file.
    pub fn fd_path(&self) -> PathBuf {
        use std::os::fd::AsRawFd as _;
        PathBuf::from(format!("/proc/self/fd/{}", self.file.as_raw_fd()))
    }
}

/// See [`ElfFile::svma_of_offset`]; `segments` as [`ElfFile::segments`].
fn svma_of_offset(segments: &[(u64, u64, u64)], offset: u64, page: u64) -> Option<u64> {
    segments
        .iter()
        .filter(|(off, _, size)| {
            offset >= off & !(page - 1) && offset < off.saturating_add(*size.max(&1))
        })
        .max_by_key(|(off, _, _)| *off)
        .map(|(off, vaddr, _)| vaddr.wrapping_add(offset).wrapping_sub(*off))
}

/// One module of a process: an executable mapping and its ELF file.
#[derive(Debug, Clone)]
pub struct Module {
    /// Address range of the executable mapping.
    pub range: Range<u64>,
    /// Load bias: address in the process = SVMA + bias.
    pub bias: u64,
    /// The file.
    pub elf: Arc<ElfFile>,
}

/// The modules of one process, with their files opened.
#[derive(Debug, Default)]
pub struct ProcessModules {
    /// Modules sorted by address.
    pub modules: Vec<Module>,
    /// Paths that could not be opened or parsed, with the reason.
    pub unreadable: Vec<(String, String)>,
}

impl ProcessModules {
    /// Opens every executable mapping of `pid`, reusing files already open in `cache`.
    pub fn load(pid: u32, cache: &mut HashMap<String, Arc<ElfFile>>) -> Result<Self, ProcessError> {
        let mut out = Self::default();
        for m in read_maps(pid)? {
            let key = format!("{pid}:{}", m.path);
            let elf = match cache.get(&key) {
                Some(elf) => elf.clone(),
                None => match ElfFile::open(pid, &m) {
                    Ok(elf) => {
                        let elf = Arc::new(elf);
                        cache.insert(key, elf.clone());
                        elf
                    }
                    Err(refusal) => {
                        target_file::note(pid, &m.path, refusal);
                        out.unreadable.push((m.path.clone(), refusal.to_string()));
                        continue;
                    }
                },
            };
            let Some(svma) = elf.svma_of_offset(m.offset) else {
                out.unreadable
                    .push((m.path.clone(), "mapping outside every segment".into()));
                continue;
            };
            out.modules.push(Module {
                range: m.range.clone(),
                bias: m.range.start.wrapping_sub(svma),
                elf,
            });
        }
        out.modules.sort_by_key(|m| m.range.start);
        Ok(out)
    }

    /// The module whose executable mapping contains `addr`.
    pub fn find(&self, addr: u64) -> Option<&Module> {
        let i = self.modules.partition_point(|m| m.range.start <= addr);
        let m = self.modules.get(i.checked_sub(1)?)?;
        m.range.contains(&addr).then_some(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mapped_offsets_find_their_segment() {
        // GNU ld: segments at page-aligned offsets equal to their addresses.
        let ld = [
            (0, 0, 0x1000),
            (0x1000, 0x1000, 0x5000),
            (0x6000, 0x6000, 0x800),
        ];
        assert_eq!(svma_of_offset(&ld, 0x1000, 0x1000), Some(0x1000));
        // lld: the text segment starts in the page that ends the read-only one, one page
        // above in memory; the executable mapping's offset is that page.
        let lld = [
            (0, 0, 0x1889e4),
            (0x1889f0, 0x1899f0, 0x2b89a0),
            (0x441390, 0x443390, 0x4c1c0),
        ];
        assert_eq!(svma_of_offset(&lld, 0x188000, 0x1000), Some(0x189000));
        assert_eq!(svma_of_offset(&lld, 0, 0x1000), Some(0));
        assert_eq!(svma_of_offset(&lld, 0x441000, 0x1000), Some(0x443000));
        assert_eq!(svma_of_offset(&lld, 0x9000_0000, 0x1000), None);
    }
}
