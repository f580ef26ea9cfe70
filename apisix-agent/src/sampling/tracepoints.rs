//! The per-call system-call tracepoints of the event-loop pair
//! (`syscalls:sys_{enter,exit}_epoll_{wait,pwait,pwait2}`): their ids, read from tracefs, and
//! a tracepoint program attached to each through a tracepoint perf event, attached for as
//! long as the event's descriptor ([`Attached`]) is open.
//!
//! tracefs is read where it is mounted (`/sys/kernel/tracing`, `/sys/kernel/debug/tracing`).
//! Where it is not (a container's fresh `/sys`, a host without systemd), a short-lived thread
//! moves into a mount namespace of its own, mounts tracefs there, reads the ids and ends:
//! nothing is mounted anywhere another process or thread sees. That needs `CAP_SYS_ADMIN`
//! and no seccomp filter against `unshare`/`mount` (the systemd unit has one, and hosts
//! with systemd have tracefs mounted); without them the caller falls back to raw
//! tracepoints. The files read are the kernel's, not a target's; each read is bounded.
//!
//! Hooks: `perf_event_open` (`PERF_TYPE_TRACEPOINT`), `PERF_EVENT_IOC_SET_BPF`,
//! `unshare(CLONE_NEWNS)`, `mount("tracefs")`. Metrics: none (the caller logs which
//! attachment it got).

use std::{
    io::{self, Read as _},
    os::fd::{AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
    path::Path,
};

/// Where tracefs is mounted, newest convention first.
const TRACEFS_MOUNTS: [&str; 2] = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"];

/// Longest `id` file read (a decimal `u32` and a newline).
const MAX_ID_BYTES: u64 = 32;

/// The epoll waits whose entry ends an event-loop iteration (`epoll_pwait2` is 5.11+: its
/// tracepoints are missing on 5.10, and skipped).
pub const EPOLL_WAITS: [&str; 3] = ["epoll_wait", "epoll_pwait", "epoll_pwait2"];

/// Errors finding or attaching the tracepoints.
#[derive(Debug, thiserror::Error)]
pub enum TracepointError {
    /// No tracefs is mounted, and mounting one privately failed.
    #[error("no tracefs mounted at {mounts:?}, and mounting one privately failed", mounts = TRACEFS_MOUNTS)]
    NoTracefs {
        #[source]
        source: io::Error,
    },
    /// tracefs has none of the tracepoints asked for (a kernel without
    /// `CONFIG_FTRACE_SYSCALLS`).
    #[error("tracefs has no tracepoint syscalls:{first} (kernel without CONFIG_FTRACE_SYSCALLS?)")]
    Missing {
        /// The first tracepoint asked for.
        first: String,
    },
    /// `perf_event_open` or an `ioctl` on the event failed.
    #[error("attaching to tracepoint syscalls:{name}")]
    Attach {
        /// The tracepoint.
        name: String,
        #[source]
        source: io::Error,
    },
}

/// The ids of the tracepoints `syscalls:<name>` for `names`, those tracefs has (at least
/// one, or [`TracepointError::Missing`]).
pub fn syscall_ids(names: &[String]) -> Result<Vec<(String, u32)>, TracepointError> {
    let found = match TRACEFS_MOUNTS
        .iter()
        .find_map(|m| read_ids(Path::new(m), names))
    {
        Some(ids) => ids,
        None => privately_mounted_ids(names)?,
    };
    if found.is_empty() {
        return Err(TracepointError::Missing {
            first: names.first().cloned().unwrap_or_default(),
        });
    }
    Ok(found)
}

/// The ids under tracefs mounted at `root`, or `None` when nothing tracefs-like is there
/// (no `events/syscalls` directory).
fn read_ids(root: &Path, names: &[String]) -> Option<Vec<(String, u32)>> {
    let events = root.join("events/syscalls");
    if !events.is_dir() {
        return None;
    }
    let ids = names
        .iter()
        .filter_map(|name| {
            let mut text = String::new();
            std::fs::File::open(events.join(name).join("id"))
                .ok()?
                .take(MAX_ID_BYTES)
                .read_to_string(&mut text)
                .ok()?;
            Some((name.clone(), text.trim().parse().ok()?))
        })
        .collect();
    Some(ids)
}

/// [`read_ids`] from a tracefs mounted at `/sys/kernel/tracing` in a mount namespace of a
/// thread of its own, which ends with it.
fn privately_mounted_ids(names: &[String]) -> Result<Vec<(String, u32)>, TracepointError> {
    let names = names.to_vec();
    let run = move || -> io::Result<Vec<(String, u32)>> {
        let check = |rc: libc::c_int| {
            if rc == 0 {
                Ok(())
            } else {
                Err(io::Error::last_os_error())
            }
        };
        // SAFETY: plain system calls on this thread's own state (unshare of CLONE_NEWNS is
        // allowed in a multithreaded process: it also unshares CLONE_FS, never CLONE_VM);
        // every pointer is a NUL-terminated literal or null where the call allows it.
        unsafe {
            check(libc::unshare(libc::CLONE_NEWNS))?;
            // Nothing mounted from here on propagates back to the namespace left behind.
            check(libc::mount(
                std::ptr::null(),
                c"/".as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            ))?;
            check(libc::mount(
                c"tracefs".as_ptr(),
                c"/sys/kernel/tracing".as_ptr(),
                c"tracefs".as_ptr(),
                libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                std::ptr::null(),
            ))?;
        }
        read_ids(Path::new(TRACEFS_MOUNTS[0]), &names)
            .ok_or_else(|| io::Error::other("tracefs mounted but has no events/syscalls"))
    };
    let result = std::thread::Builder::new()
        .name("tracefs".into())
        .spawn(run)
        .and_then(|h| {
            h.join()
                .unwrap_or_else(|_| Err(io::Error::other("panicked")))
        });
    result.map_err(|source| TracepointError::NoTracefs { source })
}

/// A program attached to one tracepoint; dropping it detaches the program.
#[derive(Debug)]
pub struct Attached {
    /// The tracepoint, `sys_enter_epoll_wait` and the like.
    pub name: String,
    _event: OwnedFd,
}

/// The leading fields of the kernel's `struct perf_event_attr` (`PERF_ATTR_SIZE_VER0`, which
/// every kernel accepts): enough for a tracepoint event.
#[repr(C)]
#[derive(Default)]
struct PerfEventAttrV0 {
    kind: u32,
    size: u32,
    config: u64,
    sample_period: u64,
    sample_type: u64,
    read_format: u64,
    flags: u64,
    wakeup_events: u32,
    bp_type: u32,
    config1: u64,
}

const PERF_TYPE_TRACEPOINT: u32 = 2;
const PERF_SAMPLE_RAW: u64 = 1 << 10;
const PERF_FLAG_FD_CLOEXEC: libc::c_ulong = 1 << 3;
/// `_IO('$', 0)`.
const PERF_EVENT_IOC_ENABLE: libc::c_ulong = 0x2400;
/// `_IOW('$', 8, __u32)`.
const PERF_EVENT_IOC_SET_BPF: libc::c_ulong = 0x4004_2408;

/// Attaches the tracepoint program `prog` to the tracepoint `name` of id `id`, for every
/// process on every CPU (a tracepoint's BPF program runs wherever the tracepoint fires, the
/// event's CPU only names where it is counted).
pub fn attach(prog: BorrowedFd<'_>, name: &str, id: u32) -> Result<Attached, TracepointError> {
    let err = |source| TracepointError::Attach {
        name: name.to_owned(),
        source,
    };
    let attr = PerfEventAttrV0 {
        kind: PERF_TYPE_TRACEPOINT,
        size: size_of::<PerfEventAttrV0>() as u32,
        config: u64::from(id),
        sample_period: 1,
        sample_type: PERF_SAMPLE_RAW,
        wakeup_events: 1,
        ..PerfEventAttrV0::default()
    };
    // SAFETY: `attr` is a valid VER0 attribute that outlives the call; pid -1 with cpu 0 is
    // "every process, counted on CPU 0"; no group.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_perf_event_open,
            &raw const attr,
            -1 as libc::pid_t,
            0 as libc::c_int,
            -1 as libc::c_int,
            PERF_FLAG_FD_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(err(io::Error::last_os_error()));
    }
    // SAFETY: a descriptor the kernel just returned, owned by nothing else.
    let event = unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) };
    for (request, arg) in [
        (PERF_EVENT_IOC_SET_BPF, prog.as_raw_fd()),
        (PERF_EVENT_IOC_ENABLE, 0),
    ] {
        // SAFETY: ioctls on the event's own descriptor; SET_BPF takes a program fd by value.
        if unsafe { libc::ioctl(event.as_raw_fd(), request, arg) } != 0 {
            return Err(err(io::Error::last_os_error()));
        }
    }
    Ok(Attached {
        name: name.to_owned(),
        _event: event,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_attribute_is_the_kernels_first_published_size() {
        assert_eq!(size_of::<PerfEventAttrV0>(), 64);
    }

    #[test]
    fn a_directory_without_syscall_events_is_no_tracefs() {
        let dir = std::env::temp_dir();
        assert!(read_ids(&dir, &["sys_enter_epoll_wait".into()]).is_none());
    }

    #[test]
    fn ids_are_read_and_missing_tracepoints_skipped() {
        let root = std::env::temp_dir().join(format!("tracefs-test-{}", std::process::id()));
        let event = root.join("events/syscalls/sys_enter_epoll_wait");
        std::fs::create_dir_all(&event).unwrap();
        std::fs::write(event.join("id"), "812\n").unwrap();
        let names = [
            "sys_enter_epoll_wait".into(),
            "sys_enter_epoll_pwait2".into(),
        ];
        let ids = read_ids(&root, &names);
        std::fs::remove_dir_all(&root).unwrap();
        assert_eq!(ids, Some(vec![("sys_enter_epoll_wait".to_owned(), 812)]));
    }
}
