//! The counts of one recording ([`Recording`]): what `record --summary FILE` writes as JSON
//! ([`RecordSummary`], stable field names that tests and benchmarks read).
//!
//! Hooks: the summary file (or standard output). Metrics: none.

use std::{collections::BTreeMap, io::Write as _, path::Path, time::Duration};

use apisix_ebpf_common::Counter;

use crate::{
    attribution,
    luajit::{self, trace::TraceFallback},
    output::{Folded, pprof::Detailed},
    sampling::capture,
};

/// The counts of one recording, written by `--summary FILE` as JSON. Stable field names:
/// tests and benchmarks read them. To add a field, add it here (and to [`Self::of`]); readers
/// ignore fields they do not know.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct RecordSummary {
    /// `cpu`, `off-cpu`, `alloc` or `live`.
    pub mode: &'static str,
    pub pid: u32,
    /// How long was sampled (shorter than asked when the target exited).
    pub duration_seconds: f64,
    /// Samples (off-CPU: blocks) written by the BPF side.
    pub samples: u64,
    /// Samples lost because the ring buffer was full.
    pub lost: u64,
    /// Distinct stacks written.
    pub stacks: u64,
    pub native: NativeSummary,
    pub lua: LuaSummary,
    /// Deepest Lua stack seen, in frames.
    pub deepest_lua: u64,
    /// The target exited during the recording.
    pub exited: bool,
    /// Lua samples per VM state, by [`luajit::VmState::name`] (every state, zeros included).
    pub vm_states: BTreeMap<&'static str, u64>,
    /// Samples taken while a JIT trace ran, and their inlined frames.
    pub trace: TraceSummary,
    /// Samples (off-CPU: microseconds; alloc, live: bytes) per plugin and phase, most first.
    pub plugins: Vec<PluginSummary>,
    /// The Lua heap size (`gc.total`) at the start and the end, when the VM was known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lua_memory_bytes: Option<HeapSummary>,
    /// Alloc and live modes: what the allocator probes saw.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub alloc: Option<AllocSummary>,
    /// What the kernel offered: the Lua walk variant and the deepest stack it walks whole.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kernel: Option<crate::sampling::kernel::KernelReport>,
    /// Nothing was recorded: no output was written (and `record` failed).
    pub empty: bool,
}

/// The Lua heap size at the start and the end of a recording.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct HeapSummary {
    pub start: Option<u64>,
    pub end: Option<u64>,
}

/// The allocator probes' counts.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct AllocSummary {
    /// Mean allocated bytes between two sampling points.
    pub sample_bytes: u64,
    /// The file holding the allocator, as the target sees it, and the probe's offset.
    pub module: String,
    pub offset: u64,
    /// Allocator calls (allocations, resizes, frees).
    pub events: u64,
    /// Bytes allocated (a new block's size, a resize's growth), every call counted.
    pub bytes: u64,
    /// Calls that hit a sampling point.
    pub sampled: u64,
    /// Of those, stacks lost because the ring buffer was full.
    pub lost: u64,
    /// Live: sampled blocks not tracked because the tracking map was full.
    pub dropped: u64,
    /// Live: calls whose return was never seen (their block not tracked).
    pub no_return: u64,
    /// Live: tracked blocks freed during the recording.
    pub freed: u64,
    /// Live: sampled blocks still allocated at the end, and the bytes they stand for.
    pub live_blocks: u64,
    pub live_bytes: u64,
    /// Live: of those, blocks whose stack was lost or could not be named.
    pub live_unnamed: u64,
    /// Live: whether the Lua collector completed a cycle after the end (only reachable
    /// blocks remain), and how long that took.
    pub gc_settled: bool,
    pub settle_seconds: f64,
}

/// The weight of one plugin in one phase.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PluginSummary {
    /// Sanitised plugin name, `[core]` for Lua outside plugins, empty without Lua.
    pub plugin: String,
    /// [`attribution::Phase::name`].
    pub phase: &'static str,
    pub samples: u64,
}

/// What became of the samples taken while a trace ran.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct TraceSummary {
    /// Samples in a trace's code or in C code it called.
    pub samples: u64,
    /// Of those, samples given at least one frame the trace inlined.
    pub inlined: u64,
    /// Traces read and decoded from the target (the rest came from the cache).
    pub decoded: u64,
    /// Samples that kept only their physical frames, by [`TraceFallback::name`] (every
    /// reason, zeros included).
    pub fallbacks: BTreeMap<&'static str, u64>,
}

/// Native unwinding outcomes.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct NativeSummary {
    /// Unwinds that reached the outermost frame.
    pub complete: u64,
    /// Unwinds that stopped early.
    pub truncated: u64,
}

/// Lua walk outcomes.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct LuaSummary {
    /// Samples with a complete Lua walk.
    pub walked: u64,
    /// Samples of threads running no Lua at the time.
    pub idle: u64,
    /// The BPF side's error counters, by [`Counter::name`] (every one, zeros included).
    pub errors: BTreeMap<&'static str, u64>,
    /// Errors of reading Lua memory in user space (naming frames, heap sizes), by reason.
    pub user_errors: BTreeMap<&'static str, u64>,
}

impl RecordSummary {
    /// The summary of recording `pid`.
    pub fn of(pid: u32, rec: &Recording) -> Self {
        let c = &rec.counters;
        Self {
            mode: rec.mode.name(),
            pid,
            duration_seconds: rec.elapsed.as_secs_f64(),
            samples: c[Counter::Samples as usize],
            lost: c[Counter::RingbufFull as usize],
            stacks: rec.folded.lines().len() as u64,
            native: NativeSummary {
                complete: rec.stats.native_complete,
                truncated: rec.stats.native_truncated,
            },
            lua: LuaSummary {
                walked: c[Counter::LuaWalked as usize],
                idle: c[Counter::LuaIdle as usize],
                errors: Counter::ALL
                    .into_iter()
                    .filter(|c| c.is_error())
                    .map(|counter| (counter.name(), c[counter as usize]))
                    .collect(),
                user_errors: rec.user_errors.iter().map(|(k, v)| (*k, *v)).collect(),
            },
            deepest_lua: rec.stats.max_lua_depth,
            exited: rec.target_exited,
            vm_states: luajit::VmState::ALL
                .iter()
                .map(|v| (v.name(), rec.stats.vm_states[v.index()]))
                .collect(),
            trace: TraceSummary {
                samples: rec.stats.trace_samples,
                inlined: rec.stats.trace_inlined,
                decoded: rec.traces_decoded,
                fallbacks: TraceFallback::ALL
                    .iter()
                    .map(|f| (f.name(), rec.stats.trace_fallbacks[f.index()]))
                    .collect(),
            },
            plugins: rec
                .plugins
                .iter()
                .map(|(a, n)| PluginSummary {
                    plugin: a.plugin.clone(),
                    phase: a.phase.name(),
                    samples: *n,
                })
                .collect(),
            lua_memory_bytes: rec.heap.map(|(start, end)| HeapSummary { start, end }),
            kernel: rec.kernel.clone(),
            empty: rec.folded.total() == 0,
            alloc: rec.alloc.as_ref().map(|a| {
                let probe = a.probes.first();
                AllocSummary {
                    sample_bytes: match rec.mode {
                        capture::Mode::Alloc { sample_bytes, .. } => sample_bytes,
                        _ => 0,
                    },
                    module: probe.map(|p| p.module.clone()).unwrap_or_default(),
                    offset: probe.map_or(0, |p| p.offset),
                    events: c[Counter::AllocCalls as usize],
                    bytes: c[Counter::AllocBytes as usize],
                    sampled: c[Counter::AllocSampled as usize],
                    lost: c[Counter::RingbufFull as usize],
                    dropped: c[Counter::LiveMapFull as usize],
                    no_return: c[Counter::AllocNoReturn as usize],
                    freed: c[Counter::LiveFreed as usize],
                    live_blocks: a.live_blocks,
                    live_bytes: a.live_bytes,
                    live_unnamed: a.live_unnamed,
                    gc_settled: a.unsettled.is_empty(),
                    settle_seconds: a.settle_time.as_secs_f64(),
                }
            }),
        }
    }
}

/// What a recording produced.
#[derive(Debug)]
pub struct Recording {
    pub folded: Folded,
    /// The same stacks per process with their frame details (pprof).
    pub detailed: Detailed<u32>,
    /// The output's title: what was measured, for how long, what went wrong.
    pub title: String,
    pub counters: [u64; apisix_ebpf_common::COUNTER_SLOTS as usize],
    pub target_exited: bool,
    pub elapsed: Duration,
    pub stats: crate::stacks::StackStats,
    pub flavour: Option<String>,
    pub mode: capture::Mode,
    pub idle_excluded: u64,
    /// Traces read and decoded from the target.
    pub traces_decoded: u64,
    /// Errors of reading Lua memory in user space (naming frames, heap sizes), by reason.
    pub user_errors: BTreeMap<&'static str, u64>,
    /// Weight per plugin and phase, most first (every stack, before `--plugin`/`--phase`).
    pub plugins: Vec<(attribution::Attribution, u64)>,
    /// The Lua heap size at the start and the end, when the VM was known.
    pub heap: Option<(Option<u64>, Option<u64>)>,
    /// Alloc and live modes: probes and live totals.
    pub alloc: Option<capture::AllocOutcome>,
    /// What the kernel offered the programs.
    pub kernel: Option<crate::sampling::kernel::KernelReport>,
}

/// Writes `summary` as JSON to `path` (`-`: standard output).
pub fn write(path: &Path, summary: &RecordSummary) -> Result<(), std::io::Error> {
    let mut text = serde_json::to_string(summary).map_err(std::io::Error::other)?;
    text.push('\n');
    if path.as_os_str() == "-" {
        std::io::stdout().write_all(text.as_bytes())
    } else {
        std::fs::write(path, text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_has_the_documented_shape() {
        let mut counters = [0; apisix_ebpf_common::COUNTER_SLOTS as usize];
        counters[Counter::Samples as usize] = 800;
        counters[Counter::LuaWalked as usize] = 700;
        counters[Counter::LuaIdle as usize] = 90;
        counters[Counter::LuaReadFailed as usize] = 3;
        let mut folded = Folded::new();
        folded.add(vec!["main".into(), "f".into()], 790);
        let rec = Recording {
            detailed: Detailed::new(),
            title: String::new(),
            kernel: None,
            folded,
            counters,
            target_exited: false,
            elapsed: Duration::from_secs(8),
            stats: crate::stacks::StackStats {
                native_complete: 790,
                native_truncated: 10,
                max_lua_depth: 123,
                vm_states: [5, 600, 80, 10, 3, 2],
                trace_samples: 610,
                trace_inlined: 590,
                trace_fallbacks: [0, 12, 0, 8, 0, 0, 0],
                ..Default::default()
            },
            flavour: None,
            mode: capture::Mode::Cpu { frequency: 99 },
            idle_excluded: 0,
            user_errors: BTreeMap::from([("proto_freed", 0)]),
            traces_decoded: 4,
            plugins: vec![(
                attribution::Attribution {
                    plugin: "key-auth".into(),
                    phase: attribution::Phase::Access,
                },
                42,
            )],
            heap: None,
            alloc: None,
        };
        let json = serde_json::to_value(RecordSummary::of(123, &rec)).expect("encode");
        assert_eq!(json["mode"], "cpu");
        assert_eq!(json["pid"], 123);
        assert_eq!(json["duration_seconds"], 8.0);
        assert_eq!(json["samples"], 800);
        assert_eq!(json["lost"], 0);
        assert_eq!(json["stacks"], 1);
        assert_eq!(json["native"]["complete"], 790);
        assert_eq!(json["native"]["truncated"], 10);
        assert_eq!(json["lua"]["walked"], 700);
        assert_eq!(json["lua"]["idle"], 90);
        assert_eq!(json["lua"]["errors"]["lua_read_failed"], 3);
        assert_eq!(json["lua"]["errors"]["map_insert_failed"], 0);
        assert!(json["lua"]["errors"].get("lua_walked").is_none());
        assert_eq!(json["lua"]["user_errors"]["proto_freed"], 0);
        assert_eq!(json["deepest_lua"], 123);
        assert_eq!(json["exited"], false);
        assert_eq!(json["vm_states"]["interpreted"], 5);
        assert_eq!(json["vm_states"]["compiled"], 600);
        assert_eq!(json["vm_states"]["jit_compiler"], 2);
        assert_eq!(json["trace"]["samples"], 610);
        assert_eq!(json["trace"]["inlined"], 590);
        assert_eq!(json["trace"]["decoded"], 4);
        assert_eq!(json["trace"]["fallbacks"]["trace_gone"], 12);
        assert_eq!(json["trace"]["fallbacks"]["trace_addr_outside"], 8);
        assert_eq!(json["trace"]["fallbacks"]["trace_invalid"], 0);
        assert_eq!(json["plugins"][0]["plugin"], "key-auth");
        assert_eq!(json["plugins"][0]["phase"], "access");
        assert_eq!(json["plugins"][0]["samples"], 42);
        assert!(json.get("alloc").is_none() && json.get("lua_memory_bytes").is_none());
    }

    #[test]
    fn alloc_summary_has_the_documented_shape() {
        let mut counters = [0; apisix_ebpf_common::COUNTER_SLOTS as usize];
        counters[Counter::Samples as usize] = 40;
        counters[Counter::AllocCalls as usize] = 100_000;
        counters[Counter::AllocBytes as usize] = 21 << 20;
        counters[Counter::AllocSampled as usize] = 42;
        counters[Counter::RingbufFull as usize] = 2;
        counters[Counter::LiveMapFull as usize] = 1;
        counters[Counter::LiveFreed as usize] = 30;
        let rec = Recording {
            detailed: Detailed::new(),
            title: String::new(),
            kernel: None,
            folded: Folded::new(),
            counters,
            target_exited: false,
            elapsed: Duration::from_secs(5),
            stats: crate::stacks::StackStats::default(),
            flavour: None,
            mode: capture::Mode::Alloc {
                sample_bytes: 524_288,
                live: true,
            },
            idle_excluded: 0,
            user_errors: BTreeMap::new(),
            traces_decoded: 0,
            plugins: Vec::new(),
            heap: Some((Some(1_000_000), Some(3_000_000))),
            alloc: Some(capture::AllocOutcome {
                probes: vec![crate::sampling::alloc::AllocProbe {
                    pid: 7,
                    g: 0x1000,
                    allocf: 0x7f00_0000_1e60,
                    module: "/usr/lib/x86_64-linux-gnu/libluajit-5.1.so.2.1.0".into(),
                    file: "/proc/7/map_files/7f0000000000-7f0000100000".into(),
                    offset: 0x1e60,
                    heap_bytes: 1_000_000,
                }],
                skipped: Vec::new(),
                live_blocks: 9,
                live_bytes: 9 * 524_288,
                live_unnamed: 1,
                settle_time: Duration::from_millis(40),
                unsettled: Vec::new(),
            }),
        };
        let json = serde_json::to_value(RecordSummary::of(7, &rec)).expect("encode");
        assert_eq!(json["mode"], "live");
        assert_eq!(json["lua_memory_bytes"]["start"], 1_000_000);
        assert_eq!(json["lua_memory_bytes"]["end"], 3_000_000);
        let a = &json["alloc"];
        assert_eq!(a["sample_bytes"], 524_288);
        assert_eq!(a["offset"], 0x1e60);
        assert_eq!(a["events"], 100_000);
        assert_eq!(a["bytes"], 21 << 20);
        assert_eq!(a["sampled"], 42);
        assert_eq!(a["lost"], 2);
        assert_eq!(a["dropped"], 1);
        assert_eq!(a["freed"], 30);
        assert_eq!(a["live_blocks"], 9);
        assert_eq!(a["live_bytes"], 9 * 524_288);
        assert_eq!(a["live_unnamed"], 1);
        assert_eq!(a["gc_settled"], true);
        assert_eq!(a["settle_seconds"], 0.04);
    }
}
