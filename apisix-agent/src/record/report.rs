//! What `record` tells on standard error after a recording: samples taken and lost, blocked
//! time, allocator counts, the Lua heap at the end, unwinding and Lua walk outcomes, JIT
//! trace fallbacks, what `--plugin`/`--phase` kept, and the top plugins.
//!
//! Hooks: standard error. Metrics: none.

use apisix_ebpf_common::Counter;

use super::summary::Recording;
use crate::{
    attribution,
    luajit::{self, trace::TraceFallback},
    sampling::{
        capture::{self, human_bytes},
        request::Request,
    },
};

/// Prints the report of `rec`, made for `req` (of `pid`); `shown` is the weight written
/// (after the filter), `written_to` where (` to PATH`, or empty for standard output).
pub fn print(rec: &Recording, req: &Request, pid: u32, shown: u64, written_to: &str) {
    if rec.target_exited {
        eprintln!(
            "pid {} exited after {:.1}s; keeping what was sampled",
            pid,
            rec.elapsed.as_secs_f64()
        );
    }
    outcome(rec, written_to);
    heap(rec, pid);
    let s = &rec.stats;
    let unwound = s.native_complete + s.native_truncated;
    if unwound > 0 {
        eprintln!(
            "native unwinding: {:.1}% complete, {} truncated",
            100.0 * s.native_complete as f64 / unwound as f64,
            s.native_truncated
        );
    }
    if rec.flavour.is_some() {
        lua(rec);
    }
    if !req.filter.is_empty() {
        eprintln!(
            "{}: {} of {} {} kept",
            req.filter.describe(),
            shown,
            rec.folded.total(),
            rec.mode.unit()
        );
    }
    print_plugins(&rec.plugins, rec.mode.unit());
}

/// The top plugins table on stderr: plugin, phase, share (of every sample of the run).
fn print_plugins(plugins: &[(attribution::Attribution, u64)], unit: &str) {
    let total: u64 = plugins.iter().map(|(_, n)| n).sum();
    if total == 0 || plugins.iter().all(|(a, _)| a.plugin.is_empty()) {
        return;
    }
    eprintln!("top plugins (share of {unit}):");
    eprintln!("  {:<32} {:<16} {:>7}", "plugin", "phase", "share");
    for (a, n) in plugins.iter().take(15) {
        let plugin = if a.plugin.is_empty() {
            "(no Lua)"
        } else {
            &a.plugin
        };
        eprintln!(
            "  {plugin:<32} {:<16} {:>6.1}%",
            a.phase.name(),
            100.0 * *n as f64 / total as f64
        );
    }
}

/// What was captured, by mode: samples, blocks or allocator calls.
fn outcome(rec: &Recording, written_to: &str) {
    let c = &rec.counters;
    match rec.mode {
        capture::Mode::Cpu { .. } => eprintln!(
            "{} samples taken, {} lost (ring buffer full), {} stacks written{written_to}",
            c[Counter::Samples as usize],
            c[Counter::RingbufFull as usize],
            rec.folded.total(),
        ),
        capture::Mode::OffCpu { min_block_us, .. } => eprintln!(
            "{} blocks of ≥ {min_block_us} µs captured, {} lost (ring buffer full), {} shorter \
             blocks dropped in the kernel; {:.1} ms blocked written{written_to}, {:.1} ms idle \
             (epoll_wait) excluded",
            c[Counter::Samples as usize],
            c[Counter::RingbufFull as usize],
            c[Counter::OffcpuShort as usize],
            rec.folded.total() as f64 / 1000.0,
            rec.idle_excluded as f64 / 1000.0,
        ),
        capture::Mode::Alloc { live, .. } => {
            eprintln!(
                "{} allocator calls, {} allocated; {} sampled, {} lost (ring buffer full)",
                c[Counter::AllocCalls as usize],
                human_bytes(c[Counter::AllocBytes as usize]),
                c[Counter::AllocSampled as usize],
                c[Counter::RingbufFull as usize],
            );
            if let Some(a) = &rec.alloc {
                for p in &a.probes {
                    eprintln!("allocator of pid {}: {}+{:#x}", p.pid, p.module, p.offset);
                }
                if live {
                    eprintln!(
                        "live: {} sampled blocks still allocated ({}), {} freed during the \
                         recording; {} not tracked (tracking map full), {} without a return, \
                         {} unnamed",
                        a.live_blocks,
                        human_bytes(a.live_bytes),
                        c[Counter::LiveFreed as usize],
                        c[Counter::LiveMapFull as usize],
                        c[Counter::AllocNoReturn as usize],
                        a.live_unnamed,
                    );
                    if a.unsettled.is_empty() {
                        eprintln!(
                            "live: as of a complete Lua collection {:.1}s after the end",
                            a.settle_time.as_secs_f64()
                        );
                    } else {
                        eprintln!(
                            "live: the Lua collector completed no cycle within {}s of the end: \
                             the live blocks include garbage not collected yet",
                            capture::SETTLE_WAIT.as_secs()
                        );
                    }
                }
            }
            eprintln!(
                "{} {} written{written_to}",
                human_bytes(rec.folded.total()),
                if live { "live" } else { "allocated" }
            );
        }
    }
}

/// The Lua heap size at the end (and its change), when known.
fn heap(rec: &Recording, pid: u32) {
    if let Some((start, end)) = rec.heap {
        let show = |b: Option<u64>| {
            b.map_or_else(
                || "unknown".to_owned(),
                |b| format!("{} ({b} bytes)", human_bytes(b)),
            )
        };
        let delta = match (start, end) {
            (Some(a), Some(b)) => format!(", {:+} bytes", i128::from(b) - i128::from(a)),
            _ => String::new(),
        };
        eprintln!(
            "pid {}: Lua memory (gc.total) at end: {}{delta}",
            pid,
            show(end)
        );
    }
}

/// The Lua walk outcomes, VM states and JIT trace fallbacks.
fn lua(rec: &Recording) {
    let c = &rec.counters;
    let s = &rec.stats;
    let errors: Vec<String> = Counter::ALL
        .iter()
        .filter(|c| c.is_error())
        .filter(|c| rec.counters[**c as usize] > 0)
        .map(|c| format!("{}={}", c.name(), rec.counters[*c as usize]))
        .collect();
    eprintln!(
        "lua: {} walked, {} outside Lua, deepest {} frames, errors: {}",
        c[Counter::LuaWalked as usize],
        c[Counter::LuaIdle as usize],
        s.max_lua_depth,
        if errors.is_empty() {
            "none".to_owned()
        } else {
            errors.join(" ")
        }
    );
    let in_lua: u64 = s.vm_states.iter().sum();
    if in_lua > 0 {
        let shares: Vec<String> = luajit::VmState::ALL
            .iter()
            .map(|v| {
                format!(
                    "{} {:.1}%",
                    v.name(),
                    100.0 * s.vm_states[v.index()] as f64 / in_lua as f64
                )
            })
            .collect();
        eprintln!("lua vm states: {}", shares.join(", "));
    }
    if s.trace_samples > 0 {
        let fallbacks: Vec<String> = TraceFallback::ALL
            .iter()
            .filter(|f| s.trace_fallbacks[f.index()] > 0)
            .map(|f| format!("{}={}", f.name(), s.trace_fallbacks[f.index()]))
            .collect();
        eprintln!(
            "traces: {} samples, {} with inlined frames, {} traces decoded, fallbacks: {}",
            s.trace_samples,
            s.trace_inlined,
            rec.traces_decoded,
            if fallbacks.is_empty() {
                "none".to_owned()
            } else {
                fallbacks.join(" ")
            }
        );
    }
}
