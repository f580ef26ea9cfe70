//! Finds what to profile: OpenResty/nginx processes with LuaJIT mapped, on the host and in
//! Docker containers, plus PIDs named in the config. Produces [`Snapshot`]s of targets with
//! their labels (container name, short id, image) and LuaJIT flavour; it knows nothing about
//! BPF.
//!
//! - [`procfs`]: scans `/proc` (names, worker command lines, cgroups → container ids, LuaJIT
//!   detection cached per process start).
//! - [`watch`]: the loop that rescans and publishes snapshots.
//! - [`docker`]: follows the Docker API (bollard): lists containers, then its event stream,
//!   reconnecting with backoff; each event triggers a scan at once.
//!
//! Hooks: `/proc`, the Docker socket. Metrics: none (the daemon turns snapshots into the
//! `apisix_profiler_targets` gauge).

pub mod docker;
pub mod procfs;
pub mod watch;

use std::sync::Arc;

use serde::Serialize;

use crate::luajit::LuaTarget;

/// Labels of a target as they appear in metrics and `/targets`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize)]
pub struct Labels {
    /// Container name (without Docker's leading `/`); empty on the host.
    pub container: String,
    /// First 12 hex digits of the container id; empty on the host.
    pub container_id: String,
    /// Container image as Docker reports it; empty on the host.
    pub image: String,
    /// Process name (`/proc/PID/comm`).
    pub process: String,
}

/// The LuaJIT found in a target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lua {
    /// A known build: Lua frames are walked.
    Known(LuaTarget),
    /// LuaJIT is there but its build is not one whose layout is known: native stacks only.
    Unknown(String),
    /// No LuaJIT mapped (a PID given by hand): native stacks only.
    Absent,
}

impl Lua {
    /// Short flavour name used as a metric label: `gc64`, `gc32`, `unknown` or `native`.
    pub fn flavour_label(&self) -> &'static str {
        match self {
            Lua::Known(t) if t.flavour.gc64 => "gc64",
            Lua::Known(_) => "gc32",
            Lua::Unknown(_) => "unknown",
            Lua::Absent => "native",
        }
    }
}

/// One process to profile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetProcess {
    pub pid: u32,
    /// Process start time (clock ticks since boot): tells a reused PID from the old process.
    pub start_time: u64,
    pub labels: Labels,
    pub lua: Lua,
}

/// Every target found by one scan, sorted by PID.
pub type Snapshot = Arc<Vec<TargetProcess>>;

/// JSON view of a target for `/targets`.
#[derive(Debug, Serialize)]
pub struct TargetView<'a> {
    pub pid: u32,
    #[serde(flatten)]
    pub labels: &'a Labels,
    pub flavour: &'static str,
    pub luajit: Option<String>,
    pub luajit_library: Option<&'a str>,
    pub luajit_error: Option<&'a str>,
    /// The Lua VM's heap size (`gc.total`) at the daemon's last read; filled in by the
    /// daemon, which knows the VMs (`None`: not known yet, or no Lua).
    pub lua_memory_bytes: Option<u64>,
    /// The deepest Lua stack the loaded sampler walks whole on this kernel, and how it walks
    /// (`bpf_loop` or `bounded`); filled in by the daemon (`None`: no sampler loaded).
    pub max_lua_frames: Option<usize>,
    pub lua_walk: Option<&'static str>,
}

impl TargetProcess {
    /// The `/targets` view.
    pub fn view(&self) -> TargetView<'_> {
        TargetView {
            pid: self.pid,
            labels: &self.labels,
            flavour: self.lua.flavour_label(),
            luajit: match &self.lua {
                Lua::Known(t) => Some(t.flavour.to_string()),
                _ => None,
            },
            luajit_library: match &self.lua {
                Lua::Known(t) => Some(t.library.as_str()),
                _ => None,
            },
            max_lua_frames: None,
            lua_walk: None,
            luajit_error: match &self.lua {
                Lua::Unknown(e) => Some(e.as_str()),
                _ => None,
            },
            lua_memory_bytes: None,
        }
    }
}

/// Builds a set of globs (process names, container names and images).
pub fn globset(patterns: &[String]) -> Result<globset::GlobSet, globset::Error> {
    let mut b = globset::GlobSetBuilder::new();
    for p in patterns {
        b.add(globset::Glob::new(p)?);
    }
    b.build()
}
