//! The one-shot `record` command: samples one process for a while and writes a flame graph
//! (SVG) or folded stacks — what `ngx-sample-lua-bt` + `fix-lua-bt` did, without a daemon —
//! of CPU time, blocked time, or the Lua heap (allocated bytes, or live bytes: the
//! `lj-gc`/`lj-gc-objs` questions, by stack).
//!
//! Hooks: a capture ([`crate::sampling::capture`]), `/proc/PID` (existence, LuaJIT detection),
//! SIGINT/SIGTERM (end the capture early and write what it gathered). Metrics: none; a
//! summary (samples taken, lost, unwinding and Lua outcomes, the Lua heap size at the start
//! and the end, allocation counts, then the top plugins and phases) goes to stderr, and with
//! `--summary FILE` the same counts as JSON ([`RecordSummary`]). `--plugin`/`--phase` keep
//! only the stacks of a plugin / phase ([`crate::attribution`]) in the output; the summary
//! counts every sample.

use std::{
    collections::BTreeMap,
    fs::File,
    io::{self, IsTerminal as _, Write as _},
    path::PathBuf,
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use anyhow::{Context as _, bail};
use apisix_ebpf_common::Counter;

use crate::{
    attribution::{self, Filter, Rules},
    luajit::{self, NameStyle, trace::TraceFallback},
    output::Folded,
    sampling::capture::{self, CaptureTarget, Progress, human_bytes},
    stacks::StackOptions,
    target::process,
};

/// Output formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum RecordFormat {
    /// An interactive SVG flame graph (inferno).
    Svg,
    /// Folded stacks, `root;…;leaf COUNT` per line.
    Collapsed,
}

/// What to record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum RecordMode {
    /// Where the CPU time goes (sampled at --frequency).
    Cpu,
    /// Where threads block, weighted by blocked microseconds (the `sample-bt-off-cpu` port).
    OffCpu,
    /// Where the Lua VM allocates, weighted by allocated bytes (sampled every
    /// --sample-bytes).
    Alloc,
    /// Which stacks allocated the sampled Lua memory still allocated at the end (leaks).
    Live,
}

/// Options of one recording.
#[derive(Debug, Clone)]
pub struct RecordOptions {
    pub pid: u32,
    pub duration: Duration,
    pub mode: RecordMode,
    pub frequency: u64,
    /// Off-CPU: blocks shorter than this are dropped in the kernel.
    pub min_block_us: u64,
    /// Off-CPU: keep idle `epoll_wait` blocks.
    pub include_idle: bool,
    /// Alloc / live: mean allocated bytes between two sampling points.
    pub sample_bytes: u64,
    pub format: RecordFormat,
    pub output: Option<PathBuf>,
    /// Where to write the run's counts as JSON (`-`: standard output).
    pub summary: Option<PathBuf>,
    pub style: NameStyle,
    /// A `[trace N]` pseudo-frame where a JIT trace runs.
    pub trace_frames: bool,
    /// Plugin rules.
    pub rules: Rules,
    /// Only the stacks of this plugin / phase are written.
    pub filter: Filter,
}

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

/// Set by SIGINT/SIGTERM: the recording ends early and writes what it gathered.
static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

/// Ends the recording at the first SIGINT or SIGTERM (a second one kills, as usual): the
/// probes are detached and the output written.
fn stop_on_signals() {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: a zeroed sigaction with a handler that only stores to an atomic, which is
        // async-signal-safe; SA_RESETHAND restores the default action after one delivery.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_signal as *const () as libc::sighandler_t;
            sa.sa_flags = libc::SA_RESETHAND;
            libc::sigemptyset(&mut sa.sa_mask);
            if libc::sigaction(sig, &sa, std::ptr::null_mut()) != 0 {
                tracing::debug!(sig, error = %io::Error::last_os_error(), "sigaction");
            }
        }
    }
}

/// Samples `opts.pid` for `opts.duration`; stops early (keeping the samples) if it exits.
pub fn record(opts: &RecordOptions) -> anyhow::Result<Recording> {
    let comm = process::comm(opts.pid)?;
    let mut flavour = None;
    let lua = match luajit::detect(opts.pid) {
        Ok(Some(found)) => {
            eprintln!(
                "pid {} ({comm}): {} in {}",
                opts.pid, found.flavour, found.library
            );
            flavour = Some(found.flavour.to_string());
            Some(found)
        }
        Ok(None) => {
            eprintln!(
                "pid {} ({comm}): no LuaJIT mapped, native stacks only",
                opts.pid
            );
            None
        }
        Err(e) => {
            eprintln!(
                "pid {} ({comm}): {e}; profiling native stacks only",
                opts.pid
            );
            None
        }
    };
    let show_progress = io::stderr().is_terminal();
    stop_on_signals();
    let mode = match opts.mode {
        RecordMode::Cpu => capture::Mode::Cpu {
            frequency: opts.frequency,
        },
        RecordMode::OffCpu => capture::Mode::OffCpu {
            min_block_us: opts.min_block_us,
            exclude_idle: !opts.include_idle,
        },
        RecordMode::Alloc | RecordMode::Live => capture::Mode::Alloc {
            sample_bytes: opts.sample_bytes,
            live: opts.mode == RecordMode::Live,
        },
    };
    let mut progressed = false;
    let mut waited = false;
    let mut settling = false;
    let cap = capture::capture(
        &[CaptureTarget {
            pid: opts.pid,
            lua,
            vm: None,
        }],
        opts.duration,
        mode,
        StackOptions {
            style: opts.style,
            trace_frames: opts.trace_frames,
        },
        &STOP,
        |p| match p {
            Progress::WaitingForVm { waited: w, .. } => {
                if !waited {
                    waited = true;
                    eprintln!(
                        "pid {}: waiting up to {}s for its Lua VM (learned when it next enters \
                         Lua: a request or a timer)",
                        opts.pid,
                        capture::VM_WAIT.as_secs()
                    );
                } else if show_progress {
                    eprint!("\rwaiting for the Lua VM: {:>4.1}s ", w.as_secs_f64());
                    progressed = true;
                }
            }
            Progress::Settling { pids, waited: w } => {
                if !settling {
                    settling = true;
                    if progressed {
                        eprintln!();
                        progressed = false;
                    }
                    eprintln!(
                        "pid {}: waiting up to {}s for the Lua collector to complete a cycle, \
                         so that only reachable blocks remain",
                        pids.first().copied().unwrap_or(opts.pid),
                        capture::SETTLE_WAIT.as_secs()
                    );
                } else if show_progress {
                    eprint!("\rsettling: {:>4.1}s ", w.as_secs_f64());
                    progressed = true;
                }
            }
            Progress::Started { heaps } => {
                if progressed {
                    eprintln!();
                    progressed = false;
                }
                for (pid, bytes) in heaps {
                    eprintln!(
                        "pid {pid}: Lua memory (gc.total) at start: {} ({bytes} bytes)",
                        human_bytes(*bytes)
                    );
                }
            }
            Progress::Sampling { elapsed, weight } => {
                if show_progress {
                    progressed = true;
                    eprint!(
                        "\rrecording pid {}: {:>5.1}s / {}s, {} {} ",
                        opts.pid,
                        elapsed.as_secs_f64(),
                        opts.duration.as_secs(),
                        weight,
                        mode.unit()
                    );
                }
            }
        },
    )?;
    if progressed {
        eprintln!();
    }
    let plugins = attribution::shares(&opts.rules, &cap.folded);
    Ok(Recording {
        heap: cap
            .heaps
            .iter()
            .find(|h| h.pid == opts.pid)
            .map(|h| (h.start, h.end)),
        alloc: cap.alloc,
        plugins,
        folded: cap.folded,
        counters: cap.counters,
        target_exited: cap.all_exited,
        elapsed: cap.elapsed,
        stats: cap.stats,
        flavour,
        mode,
        idle_excluded: cap.idle_excluded,
        traces_decoded: cap.traces_decoded,
        user_errors: cap.lua_errors,
        kernel: Some(cap.kernel),
    })
}

/// Runs `record` and writes its output and summary.
pub fn run(opts: &RecordOptions) -> anyhow::Result<()> {
    if opts.frequency == 0 || opts.frequency > 10_000 {
        bail!("--frequency must be between 1 and 10000 Hz");
    }
    if opts.duration.is_zero() {
        bail!("--duration must be at least 1 second");
    }
    if matches!(opts.mode, RecordMode::Alloc | RecordMode::Live)
        && !capture::SAMPLE_BYTES_RANGE.contains(&opts.sample_bytes)
    {
        bail!(
            "--sample-bytes must be between {} and {}",
            capture::SAMPLE_BYTES_RANGE.start(),
            capture::SAMPLE_BYTES_RANGE.end()
        );
    }
    let rec = record(opts)?;
    if rec.folded.total() == 0 {
        // An empty graph under a message of success would say "nothing to see here".
        if let Some(path) = &opts.summary {
            write_summary(path, &RecordSummary::of(opts.pid, &rec))?;
        }
        let comm = process::comm(opts.pid).unwrap_or_else(|_| "exited".into());
        bail!(
            "pid {} ({}) gave no {} in {:.0}s: nothing written. It is probably idle (an nginx \
             worker with no requests); send it load, or pick a busy worker (`ps -o \
             pid,pcpu,args -C nginx`, the highest %CPU)",
            opts.pid,
            comm.escape_debug(),
            match rec.mode {
                capture::Mode::Cpu { .. } => "CPU samples",
                capture::Mode::OffCpu { .. } => "blocked time",
                capture::Mode::Alloc { .. } => "allocations",
            },
            rec.elapsed.as_secs_f64()
        );
    }
    let mut title = format!(
        "pid {} — {:.0}s {}{}",
        opts.pid,
        rec.elapsed.as_secs_f64(),
        rec.mode.describe(),
        rec.flavour
            .as_deref()
            .map(|f| format!(" — {f}"))
            .unwrap_or_default()
    );
    let shown = opts.filter.apply(&opts.rules, &rec.folded);
    if !opts.filter.is_empty() {
        title.push_str(" — ");
        title.push_str(&opts.filter.describe());
        if shown.total() == 0 {
            title.push_str(": no samples matched");
        }
    }
    let write = |w: &mut dyn io::Write| -> io::Result<()> {
        match opts.format {
            RecordFormat::Svg => shown.write_svg_unit(&title, rec.mode.unit(), &mut *w),
            RecordFormat::Collapsed => shown.write_folded(&mut *w),
        }
    };
    match &opts.output {
        Some(path) => {
            let mut f = io::BufWriter::new(
                File::create(path).with_context(|| format!("creating {}", path.display()))?,
            );
            write(&mut f).with_context(|| format!("writing {}", path.display()))?;
            f.flush()
                .with_context(|| format!("writing {}", path.display()))?;
        }
        None => {
            let stdout = io::stdout();
            let mut lock = stdout.lock();
            write(&mut lock).context("writing to stdout")?;
        }
    }
    if let Some(path) = &opts.summary {
        write_summary(path, &RecordSummary::of(opts.pid, &rec))?;
    }
    if rec.target_exited {
        eprintln!(
            "pid {} exited after {:.1}s; keeping what was sampled",
            opts.pid,
            rec.elapsed.as_secs_f64()
        );
    }
    let c = &rec.counters;
    let s = &rec.stats;
    let unwound = s.native_complete + s.native_truncated;
    let written_to = opts
        .output
        .as_ref()
        .map(|p| format!(" to {}", p.display()))
        .unwrap_or_default();
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
            opts.pid,
            show(end)
        );
    }
    if unwound > 0 {
        eprintln!(
            "native unwinding: {:.1}% complete, {} truncated",
            100.0 * s.native_complete as f64 / unwound as f64,
            s.native_truncated
        );
    }
    if rec.flavour.is_some() {
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
    if !opts.filter.is_empty() {
        eprintln!(
            "{}: {} of {} {} kept",
            opts.filter.describe(),
            shown.total(),
            rec.folded.total(),
            rec.mode.unit()
        );
    }
    print_plugins(&rec.plugins, rec.mode.unit());
    Ok(())
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

/// Writes `summary` as JSON to `path` (`-`: standard output).
fn write_summary(path: &std::path::Path, summary: &RecordSummary) -> anyhow::Result<()> {
    let mut text = serde_json::to_string(summary).context("encoding the summary")?;
    text.push('\n');
    if path.as_os_str() == "-" {
        io::stdout()
            .write_all(text.as_bytes())
            .context("writing the summary to stdout")
    } else {
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
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
