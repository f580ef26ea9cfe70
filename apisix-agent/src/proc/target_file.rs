//! Opening a file a target mapped, as a target cannot turn against the agent: never by the
//! path the target shows (which it can replace by a FIFO, a device or a symlink out of its
//! root), but through `/proc/PID/map_files/START-END`, the kernel's link to the very file
//! behind that mapping, first with `O_PATH` (nothing is opened, so nothing can block), then
//! checked with `fstat`: a regular file, with the device and inode of the maps line, and at
//! most [`MAX_ELF_BYTES`]; only then reopened for reading, with `O_NONBLOCK`, through the
//! agent's own `/proc/self/fd/N` of the checked descriptor (the same open file, no path
//! lookup), and checked again.
//!
//! Each refusal is counted by reason ([`Refusal::name`]) and logged once per process
//! ([`note`]).
//!
//! Hooks: `/proc/PID/map_files/`, `/proc/self/fd/`. Metrics:
//! `apisix_profiler_target_file_refusals_total{reason}` (read through [`refusals`] by
//! `daemon::metrics`).

use std::{
    collections::HashSet,
    ffi::CString,
    fs::File,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use super::process::Mapping;

/// Largest ELF file of a target that is opened (the largest executables seen are around
/// 200 MiB with their debug information).
pub const MAX_ELF_BYTES: u64 = 512 << 20;

/// Why a target's file was not opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The mapping is gone, or the kernel refused the link (the process exited, or the
    /// agent lacks `CAP_SYS_ADMIN`).
    #[error("the mapped file cannot be reached through /proc/PID/map_files")]
    Unreachable,
    /// Not a regular file (a FIFO, a device, a socket).
    #[error("not a regular file")]
    NotRegular,
    /// Device and inode differ from the maps line: the mapping changed meanwhile.
    #[error("device and inode differ from the maps line")]
    Changed,
    /// Larger than [`MAX_ELF_BYTES`].
    #[error("larger than {MAX_ELF_BYTES} bytes")]
    TooLarge,
    /// Opening or mapping it for reading failed.
    #[error("opening it for reading failed")]
    Unreadable,
    /// Not an ELF file the parser accepts.
    #[error("not a valid ELF file")]
    NotElf,
}

impl Refusal {
    pub const ALL: [Self; 6] = [
        Self::Unreachable,
        Self::NotRegular,
        Self::Changed,
        Self::TooLarge,
        Self::Unreadable,
        Self::NotElf,
    ];

    /// The `reason` label.
    pub fn name(self) -> &'static str {
        match self {
            Self::Unreachable => "unreachable",
            Self::NotRegular => "not_regular",
            Self::Changed => "changed",
            Self::TooLarge => "too_large",
            Self::Unreadable => "unreadable",
            Self::NotElf => "not_elf",
        }
    }
}

static COUNTS: [AtomicU64; Refusal::ALL.len()] = [const { AtomicU64::new(0) }; Refusal::ALL.len()];
/// Processes whose refusals were logged already (bounded: cleared when full).
static LOGGED: Mutex<Option<HashSet<u32>>> = Mutex::new(None);
const MAX_LOGGED: usize = 4096;

/// Every refusal so far, by reason.
pub fn refusals() -> [(&'static str, u64); Refusal::ALL.len()] {
    Refusal::ALL.map(|r| (r.name(), COUNTS[r as usize].load(Ordering::Relaxed)))
}

/// Counts a refusal of `path` of `pid`, and warns about it if it is the first one of `pid`.
pub fn note(pid: u32, path: &str, refusal: Refusal) {
    COUNTS[refusal as usize].fetch_add(1, Ordering::Relaxed);
    let first = LOGGED.lock().is_ok_and(|mut logged| {
        let set = logged.get_or_insert_with(HashSet::new);
        if set.len() >= MAX_LOGGED {
            set.clear();
        }
        set.insert(pid)
    });
    let path = path.escape_debug().to_string();
    if first {
        tracing::warn!(
            pid,
            path,
            reason = refusal.name(),
            "a file the target mapped was not opened (further refusals for this process are \
             only counted: apisix_profiler_target_file_refusals_total)"
        );
    } else {
        tracing::debug!(pid, path, reason = refusal.name(), "target file refused");
    }
}

/// Forgets which processes were logged (for processes gone).
pub fn forget(pid: u32) {
    if let Ok(mut logged) = LOGGED.lock()
        && let Some(set) = logged.as_mut()
    {
        set.remove(&pid);
    }
}

/// `open(2)` of `path` with `flags` (`O_CLOEXEC` added).
fn open_raw(path: &str, flags: libc::c_int) -> Option<OwnedFd> {
    let path = CString::new(path).ok()?;
    // SAFETY: a valid NUL-terminated path; the returned descriptor is owned below.
    let fd = unsafe { libc::open(path.as_ptr(), flags | libc::O_CLOEXEC) };
    // SAFETY: `fd` is a descriptor just opened and owned by nobody else.
    (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd) })
}

fn fstat(fd: &OwnedFd) -> Option<libc::stat> {
    // SAFETY: plain struct of integers; fstat fills it.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: a valid descriptor and a valid out pointer.
    (unsafe { libc::fstat(fd.as_raw_fd(), &raw mut st) } == 0).then_some(st)
}

/// Whether `st` is a regular file with the identity of mapping `m`, of at most `max` bytes.
fn check(st: &libc::stat, m: &Mapping, max: u64) -> Result<(), Refusal> {
    if st.st_mode & libc::S_IFMT != libc::S_IFREG {
        return Err(Refusal::NotRegular);
    }
    if st.st_dev != libc::makedev(m.dev.0, m.dev.1) || st.st_ino != m.inode {
        return Err(Refusal::Changed);
    }
    if u64::try_from(st.st_size).unwrap_or(u64::MAX) > max {
        return Err(Refusal::TooLarge);
    }
    Ok(())
}

/// Opens the file behind mapping `m` of process `pid` for reading, as the module header
/// says; at most `max` bytes.
pub fn open(pid: u32, m: &Mapping, max: u64) -> Result<File, Refusal> {
    let link = format!(
        "/proc/{pid}/map_files/{:x}-{:x}",
        m.range.start, m.range.end
    );
    let path = open_raw(&link, libc::O_PATH).ok_or(Refusal::Unreachable)?;
    check(&fstat(&path).ok_or(Refusal::Unreachable)?, m, max)?;
    let again = format!("/proc/self/fd/{}", path.as_raw_fd());
    let fd = open_raw(&again, libc::O_RDONLY | libc::O_NONBLOCK | libc::O_NOCTTY)
        .ok_or(Refusal::Unreadable)?;
    check(&fstat(&fd).ok_or(Refusal::Unreadable)?, m, max)?;
    Ok(File::from(fd))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proc::process::read_maps;

    #[test]
    #[ignore = "needs root"]
    fn own_executable_opens_through_map_files() {
        // SAFETY: no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        assert!(
            root,
            "own_executable_opens_through_map_files: needs root (map_files): run as root, or without --include-ignored"
        );
        let me = std::process::id();
        let maps = read_maps(me).expect("own maps");
        let m = maps.first().expect("an executable mapping");
        let f = open(me, m, MAX_ELF_BYTES).expect("open own mapping");
        assert!(f.metadata().expect("metadata").is_file());
        assert_eq!(open(me, m, 1).err(), Some(Refusal::TooLarge));
        let mut wrong = m.clone();
        wrong.inode ^= 1;
        assert_eq!(
            open(me, &wrong, MAX_ELF_BYTES).err(),
            Some(Refusal::Changed)
        );
        let mut gone = m.clone();
        gone.range.end += 1;
        assert_eq!(
            open(me, &gone, MAX_ELF_BYTES).err(),
            Some(Refusal::Unreachable)
        );
    }
}
