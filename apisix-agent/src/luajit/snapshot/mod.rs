//! Heap snapshots of a LuaJIT VM read from outside, while the target keeps running: who
//! holds the memory. A breadth-first walk from the roots (the registry, which holds
//! `_LOADED` and the globals; the main thread and its stack; `global_State.gcroot`, the base
//! metatables and metamethod names) follows every reference a live object holds: table
//! array and hash parts (keys and values) and metatables, closures' upvalues, prototypes
//! and their constants, environments, threads' stacks (so each coroutine's stack is walked
//! where the coroutine is reached), userdata metatables. Each object is counted once, under
//! the first path that reaches it, with its size as LuaJIT counts it in `gc.total`
//! ([`walk`]); the result is folded stacks of bytes, `registry;_LOADED;mod;cache;[hash];table
//! BYTES`, plus `[unreachable]`: `gc.total` minus what was reached (garbage not yet freed,
//! and the VM's own allocations: the string table, JIT structures, `GG_State`).
//!
//! Everything read is the target's and may change or lie: objects are checked by type byte
//! before use, every count is bounded by LuaJIT's own maxima, and the walk by [`Limits`]
//! (objects, bytes read, chunks held, paths, depth, time). Failures are counted by reason
//! in [`Snapshot::errors`], never fatal; a limit reached ends the walk early and says so
//! ([`Snapshot::truncated`]). Known approximations: a cdata object counts its header only
//! (its payload's size is its C type's, not read); weak tables count as holding.
//!
//! Hooks: `process_vm_readv`, in [`cache::CHUNK`]s ([`cache`]) plus the VM check of
//! [`super::heap::read`]. Metrics: none; the report ([`Snapshot`]) carries the counts.

pub mod cache;
pub mod paths;
mod walk;

use std::{
    collections::BTreeMap,
    sync::Arc,
    time::{Duration, Instant},
};

use super::{heap, layout::Layout};
use crate::{
    output::Folded,
    proc::memory::{Memory, TargetMemory},
};

/// Bounds of one snapshot (config: `limits.heap_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Chunks of target memory held at once.
    pub cache_bytes: u64,
    /// Bytes read from the target in all.
    pub read_bytes: u64,
    /// Objects counted (each also bounds the queue and the visited set).
    pub objects: u64,
    /// Distinct retaining paths.
    pub paths: usize,
    /// Labels in one path.
    pub depth: u16,
    /// A table's string keys name its children when its hash part has at most this many
    /// nodes; larger tables' children are all `[hash]` (a cache keyed by request ids is one
    /// path, not a million).
    pub named_keys: u32,
    /// Bytes of a key kept in a label.
    pub key_len: usize,
    /// Time the walk may take.
    pub time: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            cache_bytes: 64 << 20,
            read_bytes: 4 << 30,
            objects: 8 << 20,
            paths: 1 << 16,
            depth: 24,
            named_keys: 1024,
            key_len: 64,
            time: Duration::from_secs(60),
        }
    }
}

/// The type of a GC object, the leaf of its path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Table,
    String,
    Function,
    Proto,
    Userdata,
    Cdata,
    Thread,
    Upvalue,
}

impl Kind {
    /// The leaf label.
    pub const fn name(self) -> &'static str {
        match self {
            Kind::Table => "table",
            Kind::String => "string",
            Kind::Function => "function",
            Kind::Proto => "proto",
            Kind::Userdata => "userdata",
            Kind::Cdata => "cdata",
            Kind::Thread => "thread",
            Kind::Upvalue => "upvalue",
        }
    }
}

/// The label of what the collector holds and the walk did not reach.
pub const UNREACHABLE: &str = "[unreachable]";

/// One snapshot.
#[derive(Debug)]
pub struct Snapshot {
    /// Bytes by retaining path, leaf the type; plus [`UNREACHABLE`].
    pub folded: Folded,
    /// `gc.total` before and after the walk.
    pub gc_total_before: u64,
    pub gc_total_after: u64,
    /// Bytes and objects reached.
    pub reached_bytes: u64,
    pub objects: u64,
    /// Objects by type: (count, bytes).
    pub by_kind: BTreeMap<&'static str, (u64, u64)>,
    /// Objects or references that could not be read or made no sense, by reason.
    pub errors: BTreeMap<&'static str, u64>,
    /// The limit that ended the walk early, if any.
    pub truncated: Option<&'static str>,
    /// Target reads.
    pub cache: cache::CacheStats,
    /// Paths interned, and labels dropped by the path bounds (tree full, too deep).
    pub paths: usize,
    pub paths_full: u64,
    pub paths_deep: u64,
    pub elapsed: Duration,
}

/// Why no snapshot was taken.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// The address is not (or no longer) a Lua VM, or its heap fields could not be read.
    #[error("the Lua VM at {g:#x}")]
    Vm {
        g: u64,
        #[source]
        source: heap::HeapError,
    },
}

impl SnapshotError {
    /// A short label for counters.
    pub fn reason(&self) -> &'static str {
        match self {
            SnapshotError::Vm { source, .. } => source.reason(),
        }
    }
}

/// Takes a snapshot of the VM whose `global_State` is at `g` in process `pid`.
pub fn snapshot_pid(
    pid: u32,
    layout: &'static Layout,
    g: u64,
    limits: &Limits,
) -> Result<Snapshot, SnapshotError> {
    snapshot(&Memory::new(pid), layout, g, limits)
}

/// Takes a snapshot of the VM whose `global_State` is at `g` in the process of `mem`.
pub fn snapshot(
    mem: &dyn TargetMemory,
    layout: &'static Layout,
    g: u64,
    limits: &Limits,
) -> Result<Snapshot, SnapshotError> {
    let start = Instant::now();
    let before = heap::read(mem, layout, g).map_err(|source| SnapshotError::Vm { g, source })?;
    let mut w = walk::Walk::new(mem, layout, g, limits);
    w.run(start + limits.time);
    let after = heap::read(mem, layout, g).map(|h| h.total).unwrap_or(0);
    let mut folded = Folded::new();
    for ((path, kind), bytes) in &w.bytes {
        let mut stack = w.paths.labels(*path);
        stack.push(Arc::from(kind.name()));
        folded.add(stack, *bytes);
    }
    let unreachable = before.total.saturating_sub(w.reached);
    folded.add(vec![Arc::from(UNREACHABLE)], unreachable);
    Ok(Snapshot {
        folded,
        gc_total_before: before.total,
        gc_total_after: after,
        reached_bytes: w.reached,
        objects: w.objects,
        by_kind: w.by_kind.iter().map(|(k, v)| (k.name(), *v)).collect(),
        errors: w.errors.clone(),
        truncated: w.truncated,
        cache: w.cache.stats,
        paths: w.paths.len(),
        paths_full: w.paths.full,
        paths_deep: w.paths.deep,
        elapsed: start.elapsed(),
    })
}

/// The `global_State` of the thread (`lua_State`) at `l` in process `pid`: its `glref`,
/// checked to be a VM (for callers that know a thread, such as a coroutine's address
/// printed by Lua).
pub fn vm_of_thread(pid: u32, layout: &'static Layout, l: u64) -> Result<u64, SnapshotError> {
    let mem = Memory::new(pid);
    let at = l.wrapping_add(u64::from(layout.bpf.l_glref));
    let refw = if layout.bpf.gc64 != 0 { 8 } else { 4 };
    let b = mem.read(at, refw).map_err(|source| SnapshotError::Vm {
        g: 0,
        source: heap::HeapError::Read { g: 0, source },
    })?;
    let mut word = [0u8; 8];
    word[..refw].copy_from_slice(&b);
    let g = u64::from_le_bytes(word);
    heap::check_vm(&mem, layout, g).map_err(|source| SnapshotError::Vm { g, source })?;
    Ok(g)
}

impl Snapshot {
    /// The run's counts as JSON (for `--summary` and logs).
    pub fn summary(&self) -> serde_json::Value {
        serde_json::json!({
            "gc_total_before": self.gc_total_before,
            "gc_total_after": self.gc_total_after,
            "reached_bytes": self.reached_bytes,
            "objects": self.objects,
            "by_kind": self.by_kind.iter().map(|(k, (n, b))| (k.to_string(), serde_json::json!({"objects": n, "bytes": b}))).collect::<serde_json::Map<_, _>>(),
            "errors": self.errors,
            "truncated": self.truncated,
            "cache": self.cache,
            "paths": self.paths,
            "paths_full": self.paths_full,
            "paths_deep": self.paths_deep,
            "elapsed_ms": self.elapsed.as_millis() as u64,
        })
    }
}
