//! The one-shot `record` command: samples one process for a while and writes a flame graph
//! (SVG) or folded stacks — what `ngx-sample-lua-bt` + `fix-lua-bt` did, without a daemon.
//!
//! Hooks: a capture ([`crate::sampling::capture`]), `/proc/PID` (existence, LuaJIT detection).
//! Metrics: none; a summary (samples taken, lost, unwinding and Lua outcomes) goes to stderr.

use std::{
    fs::File,
    io::{self, IsTerminal as _, Write as _},
    path::PathBuf,
    sync::atomic::AtomicBool,
    time::Duration,
};

use anyhow::{Context as _, bail};
use apisix_ebpf_common::Counter;

use crate::{
    luajit::{self, NameStyle},
    output::Folded,
    sampling::capture::{self, CaptureTarget},
    stacks::process,
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
    pub format: RecordFormat,
    pub output: Option<PathBuf>,
    pub style: NameStyle,
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
    let stop = AtomicBool::new(false);
    let mode = match opts.mode {
        RecordMode::Cpu => capture::Mode::Cpu {
            frequency: opts.frequency,
        },
        RecordMode::OffCpu => capture::Mode::OffCpu {
            min_block_us: opts.min_block_us,
            exclude_idle: !opts.include_idle,
        },
    };
    let cap = capture::capture(
        &[CaptureTarget { pid: opts.pid, lua }],
        opts.duration,
        mode,
        opts.style,
        &stop,
        |elapsed, weight| {
            if show_progress {
                eprint!(
                    "\rrecording pid {}: {:>5.1}s / {}s, {} {} ",
                    opts.pid,
                    elapsed.as_secs_f64(),
                    opts.duration.as_secs(),
                    weight,
                    mode.unit()
                );
            }
        },
    )?;
    if show_progress {
        eprintln!();
    }
    Ok(Recording {
        folded: cap.folded,
        counters: cap.counters,
        target_exited: cap.all_exited,
        elapsed: cap.elapsed,
        stats: cap.stats,
        flavour,
        mode,
        idle_excluded: cap.idle_excluded,
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
    let rec = record(opts)?;
    let title = format!(
        "pid {} — {:.0}s {}{}",
        opts.pid,
        rec.elapsed.as_secs_f64(),
        rec.mode.describe(),
        rec.flavour
            .as_deref()
            .map(|f| format!(" — {f}"))
            .unwrap_or_default()
    );
    let write = |w: &mut dyn io::Write| -> io::Result<()> {
        match opts.format {
            RecordFormat::Svg => rec.folded.write_svg_unit(&title, rec.mode.unit(), &mut *w),
            RecordFormat::Collapsed => rec.folded.write_folded(&mut *w),
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
    }
    Ok(())
}
