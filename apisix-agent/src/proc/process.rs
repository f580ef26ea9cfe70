//! What the agent reads of a target process's `/proc/PID` text files: its executable,
//! file-backed mappings ([`Mapping`], from `maps`), its command name, its `stat` fields (the
//! main thread's stack top, whether it still runs). The files behind the mappings are
//! opened by [`super::modules`].
//!
//! Hooks: `/proc/PID/maps`, `/proc/PID/comm`, `/proc/PID/stat`. Metrics: none.

use std::{io, ops::Range, path::PathBuf};

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

/// The system's page size (4 KiB where it cannot be read).
pub fn page_size() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(size)
        .ok()
        .filter(|s| s.is_power_of_two())
        .unwrap_or(4096)
}

#[cfg(test)]
mod tests {
    use super::*;

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
