//! Scans `/proc` for targets: processes whose name matches `discovery.process_names`, that
//! are nginx workers (when `workers_only`), and that have LuaJIT mapped; plus the PIDs of
//! `discovery.pids`. A process inside a Docker container (its cgroup names a container id) is
//! kept when the container is selected; LuaJIT detection runs once per process start.
//!
//! Detection reads the files the process mapped ([`crate::proc::target_file`]: never a
//! FIFO or a file outside the target's root) on a thread of its own, for at most
//! [`DETECT_DEADLINE`], so no target stalls the scan of the others.
//!
//! Hooks: `/proc` (`comm`, `cmdline`, `stat`, `cgroup`, `maps`, `map_files`). Metrics: none.

use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
        mpsc,
    },
    time::Duration,
};

use globset::GlobSet;

use super::{Labels, Lua, TargetProcess, docker::Containers, globset};
use crate::{config, luajit};

/// Errors of building a scanner.
#[derive(Debug, thiserror::Error)]
pub enum ScanError {
    #[error("bad process name pattern")]
    Glob {
        #[source]
        source: globset::Error,
    },
}

/// Scanner of `/proc` with a cache of LuaJIT detection results.
#[derive(Debug)]
pub struct Scanner {
    names: GlobSet,
    workers_only: bool,
    host: bool,
    pids: Vec<u32>,
    /// pid → (start time, detection result).
    cache: HashMap<u32, (u64, Lua)>,
    /// Detections past their deadline that still run (their threads are left to finish).
    stuck: Arc<AtomicUsize>,
}

/// Longest one LuaJIT detection may take; past it the target is listed without Lua frames.
/// Detection reads the target's mapped files, which the target chooses (e.g. on a FUSE
/// file system that never answers): it runs on a thread of its own.
pub const DETECT_DEADLINE: Duration = Duration::from_secs(5);
/// Detections past their deadline beyond which no new one starts (each holds a thread).
const MAX_STUCK: usize = 4;

/// [`luajit::detect`] of `pid` on a thread of its own, waited for at most `deadline`.
fn detect_bounded(
    pid: u32,
    deadline: Duration,
    stuck: &Arc<AtomicUsize>,
) -> Result<Option<luajit::LuaTarget>, String> {
    if stuck.load(Ordering::Relaxed) >= MAX_STUCK {
        return Err(format!(
            "{MAX_STUCK} LuaJIT detections are still stuck in other targets' files; not tried"
        ));
    }
    let (tx, rx) = mpsc::sync_channel(1);
    let counter = stuck.clone();
    let spawned = std::thread::Builder::new()
        .name("detect".into())
        .spawn(move || {
            let result = luajit::detect(pid).map_err(|e| e.to_string());
            if tx.send(result).is_err() {
                // Nobody waits any more: this detection was counted as stuck.
                counter.fetch_sub(1, Ordering::Relaxed);
            }
        });
    if let Err(e) = spawned {
        return Err(format!("cannot start the detection thread: {e}"));
    }
    match rx.recv_timeout(deadline) {
        Ok(result) => result,
        Err(_) => {
            stuck.fetch_add(1, Ordering::Relaxed);
            // Dropping `rx` tells the thread, when it ends, that it was given up.
            Err(format!(
                "LuaJIT detection took longer than {deadline:?} (a mapped file does not answer)"
            ))
        }
    }
}

/// The start time of a running process (field 22 of `/proc/PID/stat`); `None` when it is
/// gone or a zombie.
pub fn start_time(pid: u32) -> Option<u64> {
    let fields = crate::proc::process::stat_fields(&pid.to_string())?;
    if matches!(fields.first().map(String::as_str), Some("Z" | "X")) {
        return None;
    }
    fields.get(22 - 3)?.parse().ok()
}

/// The Docker container id in a `/proc/PID/cgroup` text, if any: 64 hex digits in a path
/// that mentions docker (`/system.slice/docker-ID.scope`, `/docker/ID`, `…/docker/ID/…`).
pub fn container_id(cgroup: &str) -> Option<String> {
    for line in cgroup.lines() {
        let path = line.splitn(3, ':').nth(2).unwrap_or(line);
        let Some(at) = path.find("docker") else {
            continue;
        };
        let tail = &path[at..];
        for token in tail.split(|c: char| !c.is_ascii_hexdigit()) {
            if token.len() == 64 {
                return Some(token.to_ascii_lowercase());
            }
        }
    }
    None
}

/// Whether an nginx command line is a worker's (or not nginx's at all, then it counts).
pub fn is_worker(cmdline: &str) -> bool {
    match cmdline.strip_prefix("nginx: ") {
        Some(role) => role.starts_with("worker process"),
        None => true,
    }
}

fn cmdline(pid: u32) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| {
            String::from_utf8_lossy(&b)
                .trim_end_matches('\0')
                .replace('\0', " ")
        })
        .unwrap_or_default()
}

impl Scanner {
    /// A scanner for the given discovery settings.
    pub fn new(cfg: &config::Discovery) -> Result<Self, ScanError> {
        Ok(Self {
            names: globset(&cfg.process_names).map_err(|source| ScanError::Glob { source })?,
            workers_only: cfg.workers_only,
            host: cfg.host,
            pids: cfg.pids.clone(),
            cache: HashMap::new(),
            stuck: Arc::new(AtomicUsize::new(0)),
        })
    }

    /// LuaJIT of `pid` (started at `start`), detected once per process start.
    fn lua(&mut self, pid: u32, start: u64) -> Lua {
        if let Some((s, lua)) = self.cache.get(&pid)
            && *s == start
        {
            return lua.clone();
        }
        let lua = match detect_bounded(pid, DETECT_DEADLINE, &self.stuck) {
            Ok(Some(t)) => Lua::Known(t),
            Ok(None) => Lua::Absent,
            Err(e) => {
                tracing::warn!(pid, error = %e, "LuaJIT not detected; native stacks only");
                Lua::Unknown(e)
            }
        };
        self.cache.insert(pid, (start, lua.clone()));
        lua
    }

    /// One pass over `/proc`.
    pub fn scan(&mut self, containers: &Containers) -> Vec<TargetProcess> {
        let mut out = Vec::new();
        let Ok(dir) = std::fs::read_dir("/proc") else {
            return out;
        };
        let me = std::process::id();
        for entry in dir.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<u32>().ok())
            else {
                continue;
            };
            if pid == me {
                continue;
            }
            let forced = self.pids.contains(&pid);
            let Ok(comm) = crate::proc::process::comm(pid) else {
                continue;
            };
            if !forced && !self.names.is_match(&comm) {
                continue;
            }
            if !forced && self.workers_only && !is_worker(&cmdline(pid)) {
                continue;
            }
            let Some(start) = start_time(pid) else {
                continue;
            };
            let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
            let mut labels = Labels {
                process: comm,
                ..Labels::default()
            };
            match container_id(&cgroup) {
                Some(id) => match containers.get(&id) {
                    Some(c) => {
                        if !forced && !c.selected {
                            continue;
                        }
                        labels.container = c.name.clone();
                        labels.container_id = id[..12].to_owned();
                        labels.image = c.image.clone();
                    }
                    // Docker knows the container but has not told us yet: the event is on
                    // its way; the next scan takes it.
                    None if containers.connected && !forced => continue,
                    None => {
                        // No Docker API: profile it like a host process, named by its id.
                        if !forced && !self.host {
                            continue;
                        }
                        labels.container_id = id[..12].to_owned();
                    }
                },
                None => {
                    if !forced && !self.host {
                        continue;
                    }
                }
            }
            let lua = self.lua(pid, start);
            if !forced && lua == Lua::Absent {
                continue;
            }
            out.push(TargetProcess {
                pid,
                start_time: start,
                labels,
                lua,
            });
        }
        out.sort_by_key(|t| t.pid);
        let live: std::collections::HashSet<u32> = out.iter().map(|t| t.pid).collect();
        self.cache.retain(|pid, _| {
            let keep = live.contains(pid);
            if !keep {
                crate::proc::target_file::forget(*pid);
            }
            keep
        });
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "3f5c2a9e0b1d4c6e8f7a9b0c1d2e3f405162738495a6b7c8d9e0f1a2b3c4d5e6";

    #[test]
    fn container_ids_from_cgroup_v2_and_v1() {
        assert_eq!(
            container_id(&format!("0::/system.slice/docker-{ID}.scope\n")).as_deref(),
            Some(ID)
        );
        assert_eq!(
            container_id(&format!(
                "12:pids:/docker/{ID}\n1:name=systemd:/docker/{ID}\n"
            ))
            .as_deref(),
            Some(ID)
        );
        assert_eq!(
            container_id(&format!("0::/docker/{ID}/init\n")).as_deref(),
            Some(ID)
        );
    }

    #[test]
    fn host_cgroups_have_no_container() {
        assert_eq!(
            container_id("0::/user.slice/user-0.slice/session-1.scope\n"),
            None
        );
        assert_eq!(container_id("0::/\n"), None);
        assert_eq!(container_id(&format!("0::/kubepods/pod1/{ID}\n")), None);
    }

    #[test]
    fn workers_are_told_from_masters() {
        assert!(is_worker("nginx: worker process"));
        assert!(!is_worker("nginx: master process /usr/sbin/nginx -c /x"));
        assert!(!is_worker("nginx: cache manager process"));
        assert!(is_worker(
            "/usr/sbin/nginx -g daemon off; master_process off;"
        ));
    }

    #[test]
    fn own_start_time_is_read() {
        assert!(start_time(std::process::id()).is_some_and(|t| t > 0));
    }
}
