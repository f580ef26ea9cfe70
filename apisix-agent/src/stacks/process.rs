//! What the agent knows of one target process: its executable mappings and the ELF files
//! behind them, opened through `/proc/PID/map_files/` ([`super::target_file`]: the very file
//! mapped, a regular file with the maps line's device and inode, never by the path the
//! target shows), so that processes in other mount namespaces (containers) are read from
//! their own files and no target can make the agent open a FIFO or a file outside its root.
//!
//! Files are opened once and memory-mapped; the mapping keeps the file readable after the
//! process exits, so samples taken before the exit can still be unwound and symbolized.
//! Hooks: `/proc/PID/maps`, `/proc/PID/map_files/`, `/proc/PID/status`, `/proc/PID/stat`.
//! Metrics: refusals, through [`super::target_file`].

use std::{collections::HashMap, fs::File, io, ops::Range, path::PathBuf, sync::Arc};

use memmap2::Mmap;
use object::{Object as _, ObjectSegment as _};

use super::target_file::{self, Refusal};

/// Errors reading a process.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    /// The process does not exist (or exited).
    #[error("no process with pid {pid}")]
    NoSuchProcess { pid: u32 },
    /// Reading one of its `/proc` files failed.
    #[error("reading {path}")]
    Proc {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// One executable, file-backed mapping of a process.
#[derive(Debug, Clone)]
pub struct Mapping {
    /// Address range in the process.
    pub range: Range<u64>,
    /// File offset of `range.start`.
    pub offset: u64,
    /// Path as the process sees it.
    pub path: String,
    /// Device (major, minor) of the file, from the maps line.
    pub dev: (u32, u32),
    /// Inode of the file, from the maps line.
    pub inode: u64,
}

/// `major:minor` of a maps line (hexadecimal).
fn parse_dev(dev: &str) -> Option<(u32, u32)> {
    let (major, minor) = dev.split_once(':')?;
    Some((
        u32::from_str_radix(major, 16).ok()?,
        u32::from_str_radix(minor, 16).ok()?,
    ))
}

/// Parses the executable file-backed mappings out of `/proc/PID/maps` text.
pub fn parse_maps(text: &str) -> Vec<Mapping> {
    let mut out = Vec::new();
    for line in text.lines() {
        let mut it = line.split_ascii_whitespace();
        let (Some(range), Some(perms), Some(offset), Some(dev), Some(inode)) =
            (it.next(), it.next(), it.next(), it.next(), it.next())
        else {
            continue;
        };
        let path = it.collect::<Vec<_>>().join(" ");
        if !perms.contains('x') || inode == "0" || !path.starts_with('/') {
            continue;
        }
        let Some((start, end)) = range.split_once('-') else {
            continue;
        };
        let (Ok(start), Ok(end), Ok(offset), Some(dev), Ok(inode)) = (
            u64::from_str_radix(start, 16),
            u64::from_str_radix(end, 16),
            u64::from_str_radix(offset, 16),
            parse_dev(dev),
            inode.parse::<u64>(),
        ) else {
            continue;
        };
        if start >= end {
            continue;
        }
        out.push(Mapping {
            range: start..end,
            offset,
            path: path.trim_end_matches(" (deleted)").to_owned(),
            dev,
            inode,
        });
    }
    out
}

/// Reads the executable mappings of a live process.
pub fn read_maps(pid: u32) -> Result<Vec<Mapping>, ProcessError> {
    let path = PathBuf::from(format!("/proc/{pid}/maps"));
    match std::fs::read_to_string(&path) {
        Ok(text) => Ok(parse_maps(&text)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Err(ProcessError::NoSuchProcess { pid }),
        Err(source) => Err(ProcessError::Proc { path, source }),
    }
}

/// Returns the process's command name, or an error if it does not exist.
pub fn comm(pid: u32) -> Result<String, ProcessError> {
    let path = PathBuf::from(format!("/proc/{pid}/comm"));
    match std::fs::read_to_string(&path) {
        Ok(s) => Ok(s.trim_end().to_owned()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Err(ProcessError::NoSuchProcess { pid }),
        Err(source) => Err(ProcessError::Proc { path, source }),
    }
}

/// The fields of a `/proc/…/stat` file (`who` is a pid or `self`) from field 3 (the state)
/// on: index `i` holds field `i + 3`. The command name before them is skipped whole (it is
/// parenthesised and may contain spaces).
pub fn stat_fields(who: &str) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{who}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(") ")?;
    Some(rest.split_whitespace().map(str::to_owned).collect())
}

/// The top of the main thread's stack (`startstack`, field 28 of `/proc/PID/stat`): the
/// address of `argc`, above every frame of the program. `None` when unreadable or zero.
pub fn main_stack_top(pid: u32) -> Option<u64> {
    let f = stat_fields(&pid.to_string())?;
    f.get(28 - 3)?.parse().ok().filter(|&top| top != 0)
}

/// Whether a process exists and runs right now (a zombie has exited).
pub fn exists(pid: u32) -> bool {
    stat_fields(&pid.to_string())
        .and_then(|f| f.into_iter().next())
        .is_some_and(|state| state != "Z" && state != "X")
}

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
        svma_of_offset(&self.segments, offset, page_size())
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

/// The system's page size (4 KiB where it cannot be read).
fn page_size() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(size)
        .ok()
        .filter(|s| s.is_power_of_two())
        .unwrap_or(4096)
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

    #[test]
    fn parses_executable_file_mappings_only() {
        let text = "\
55d0c0a00000-55d0c0a2c000 r--p 00000000 fe:01 1234 /usr/sbin/nginx
55d0c0a2c000-55d0c0b2c000 r-xp 0002c000 fe:01 1234 /usr/sbin/nginx
7f0000000000-7f0000021000 rw-p 00000000 00:00 0 
7f1000000000-7f1000100000 r-xp 00010000 fe:01 99 /usr/lib/x86_64-linux-gnu/libluajit-5.1.so.2.1.0
7f2000000000-7f2000001000 r-xp 00000000 00:00 0 
7ffd00000000-7ffd00002000 r-xp 00000000 00:00 0 [vdso]
7f3000000000-7f3000001000 r-xp 00000000 fe:01 77 /tmp/my lib.so (deleted)
";
        let maps = parse_maps(text);
        assert_eq!(maps.len(), 3);
        assert_eq!(maps[0].range, 0x55d0c0a2c000..0x55d0c0b2c000);
        assert_eq!(maps[0].offset, 0x2c000);
        assert_eq!(maps[0].path, "/usr/sbin/nginx");
        assert_eq!(
            maps[1].path,
            "/usr/lib/x86_64-linux-gnu/libluajit-5.1.so.2.1.0"
        );
        assert_eq!(maps[2].path, "/tmp/my lib.so");
        assert_eq!((maps[0].dev, maps[0].inode), ((0xfe, 1), 1234));
    }

    #[test]
    fn existence() {
        assert!(exists(std::process::id()));
        assert!(!exists(u32::MAX));
    }

    #[test]
    fn garbage_lines_are_skipped() {
        assert!(parse_maps("nonsense\n1-2 r-xp zz 00:00 1 /x\n").is_empty());
    }
}
