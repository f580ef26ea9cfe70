//! The one-shot `record` command: samples one process for a while and writes a flame graph
//! (SVG), folded stacks, JSON or pprof — what `ngx-sample-lua-bt` + `fix-lua-bt` did, without
//! a daemon — of CPU time, blocked time, or the Lua heap (allocated bytes, or live bytes: the
//! `lj-gc`/`lj-gc-objs` questions, by stack). Its options ([`RecordArgs`]) are a
//! [`RequestArgs`] (validated into the same [`Request`] as `/flamegraph`'s) and where to
//! write; the output is [`crate::sampling::render`]'s.
//!
//! Hooks: a capture ([`crate::sampling::capture`]), `/proc/PID` (existence, LuaJIT detection),
//! SIGINT/SIGTERM (end the capture early and write what it gathered). Metrics: none; a
//! report goes to stderr ([`report`]), and with `--summary FILE` the counts as JSON
//! ([`summary::RecordSummary`]). `--plugin`/`--phase` keep only the stacks of a plugin /
//! phase ([`crate::attribution`]) in the output; the summary counts every sample.

mod heap;
pub mod report;
pub mod summary;

use std::{
    io::{self, IsTerminal as _, Write as _},
    path::PathBuf,
    sync::atomic::{AtomicBool, Ordering},
};

use crate::{
    attribution::{self, AttributionError, Rules},
    luajit,
    proc::process::{self, ProcessError},
    sampling::{
        capture::{self, CaptureError, CaptureTarget, Progress, human_bytes},
        render::{self, RenderError},
        request::{Defaults, Origin, Request, RequestArgs, RequestError, Selector},
    },
};
pub use summary::{RecordSummary, Recording};

/// `record`'s command line: what to capture, and where to write it.
#[derive(Debug, Clone, clap::Args)]
pub struct RecordArgs {
    #[command(flatten)]
    pub request: RequestArgs,
    /// Where to write the flame graph (default: standard output).
    #[arg(long, short)]
    pub output: Option<PathBuf>,
    /// Where to write the run's counts as JSON (`-`: standard output).
    #[arg(long)]
    pub summary: Option<PathBuf>,
    /// A plugin rule `NAME=REGEX` on frame names, before the built-in ones (repeatable).
    #[arg(long)]
    pub plugin_rule: Vec<String>,
}

/// Why `record` wrote nothing, or not everything.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error(transparent)]
    Request(#[from] RequestError),
    #[error("--plugin-rule")]
    Rules(#[source] AttributionError),
    #[error("the target")]
    Target(#[source] ProcessError),
    #[error("capture")]
    Capture(#[source] CaptureError),
    #[error("heap snapshot")]
    Heap(#[source] crate::sampling::heap::HeapError),
    #[error("rendering")]
    Render(#[source] RenderError),
    #[error("writing {path}")]
    Write {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error(
        "pid {pid} ({comm}) gave no {nothing} in {seconds:.0}s: nothing written. It is probably \
         idle (an nginx worker with no requests); send it load, or pick a busy worker (`ps -o \
         pid,pcpu,args -C nginx`, the highest %CPU)"
    )]
    Empty {
        pid: u32,
        comm: String,
        nothing: &'static str,
        seconds: f64,
    },
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

/// `record`'s progress lines on stderr: waits for the VM or the collector, the heap at the
/// start, and (on a terminal) the time and weight so far, on one rewritten line.
struct Progressor {
    pid: u32,
    seconds: u64,
    unit: &'static str,
    show: bool,
    progressed: bool,
    waited: bool,
    settling: bool,
}

impl Progressor {
    fn on(&mut self, p: Progress<'_>) {
        match p {
            Progress::WaitingForVm { waited: w, .. } => {
                if !self.waited {
                    self.waited = true;
                    eprintln!(
                        "pid {}: waiting up to {}s for its Lua VM (learned when it next enters \
                         Lua: a request or a timer)",
                        self.pid,
                        capture::VM_WAIT.as_secs()
                    );
                } else if self.show {
                    eprint!("\rwaiting for the Lua VM: {:>4.1}s ", w.as_secs_f64());
                    self.progressed = true;
                }
            }
            Progress::Settling { pids, waited: w } => {
                if !self.settling {
                    self.settling = true;
                    if self.progressed {
                        eprintln!();
                        self.progressed = false;
                    }
                    eprintln!(
                        "pid {}: waiting up to {}s for the Lua collector to complete a cycle, \
                         so that only reachable blocks remain",
                        pids.first().copied().unwrap_or(self.pid),
                        capture::SETTLE_WAIT.as_secs()
                    );
                } else if self.show {
                    eprint!("\rsettling: {:>4.1}s ", w.as_secs_f64());
                    self.progressed = true;
                }
            }
            Progress::Started { heaps } => {
                if self.progressed {
                    eprintln!();
                    self.progressed = false;
                }
                for (pid, bytes) in heaps {
                    eprintln!(
                        "pid {pid}: Lua memory (gc.total) at start: {} ({bytes} bytes)",
                        human_bytes(*bytes)
                    );
                }
            }
            Progress::Sampling { elapsed, weight } => {
                if self.show {
                    self.progressed = true;
                    eprint!(
                        "\rrecording pid {}: {:>5.1}s / {}s, {} {} ",
                        self.pid,
                        elapsed.as_secs_f64(),
                        self.seconds,
                        weight,
                        self.unit
                    );
                }
            }
        }
    }
}

/// What `pid` runs: its LuaJIT (`None`: native stacks only), said on stderr.
fn detect(pid: u32) -> Result<Option<luajit::LuaTarget>, RecordError> {
    let comm = process::comm(pid).map_err(RecordError::Target)?;
    Ok(match luajit::detect(pid) {
        Ok(Some(found)) => {
            eprintln!("pid {pid} ({comm}): {} in {}", found.flavour, found.library);
            Some(found)
        }
        Ok(None) => {
            eprintln!("pid {pid} ({comm}): no LuaJIT mapped, native stacks only");
            None
        }
        Err(e) => {
            eprintln!("pid {pid} ({comm}): {e}; profiling native stacks only");
            None
        }
    })
}

/// The process `req` names: `record` profiles one.
fn one_process(req: &Request) -> Result<u32, RecordError> {
    match req.selector {
        Selector::Pid(pid) => Ok(pid),
        _ => Err(RequestError {
            message: "record profiles one process: --pid".into(),
        }
        .into()),
    }
}

/// Captures `req` (of one process); stops early (keeping the samples) if it exits.
pub fn record(req: &Request, rules: &Rules) -> Result<Recording, RecordError> {
    let pid = one_process(req)?;
    let (Some(mode), Some(duration)) = (req.capture_mode(), req.duration()) else {
        return Err(RequestError {
            message: "--duration is required".into(),
        }
        .into());
    };
    let lua = detect(pid)?;
    let flavour = lua.as_ref().map(|l| l.flavour.to_string());
    stop_on_signals();
    let mut progress = Progressor {
        pid,
        seconds: duration.as_secs(),
        unit: mode.unit(),
        show: io::stderr().is_terminal(),
        progressed: false,
        waited: false,
        settling: false,
    };
    let cap = capture::capture(
        &[CaptureTarget { pid, lua, vm: None }],
        duration,
        mode,
        req.stack_options(),
        &STOP,
        |p| progress.on(p),
    )
    .map_err(RecordError::Capture)?;
    if progress.progressed {
        eprintln!();
    }
    let mut title = req.title(&format!("pid {pid}"), &cap);
    if let Some(f) = &flavour {
        title = format!("{title} — {f}");
    }
    Ok(Recording {
        plugins: attribution::shares(rules, &cap.folded),
        heap: cap
            .heaps
            .iter()
            .find(|h| h.pid == pid)
            .map(|h| (h.start, h.end)),
        alloc: cap.alloc,
        folded: cap.folded,
        detailed: cap.detailed,
        counters: cap.counters,
        target_exited: cap.all_exited,
        elapsed: cap.elapsed,
        stats: cap.stats,
        flavour,
        mode,
        title,
        idle_excluded: cap.idle_excluded,
        traces_decoded: cap.traces_decoded,
        user_errors: cap.lua_errors,
        kernel: Some(cap.kernel),
    })
}

/// Runs `record`: validates, captures, writes the output, the summary and the report.
pub fn run(args: &RecordArgs) -> Result<(), RecordError> {
    let req = Request::new(&args.request, Defaults::RECORD, Origin::Cli)?;
    let rules = Rules::new(&args.plugin_rule, true).map_err(RecordError::Rules)?;
    let pid = one_process(&req)?;
    if req.mode == crate::sampling::request::Mode::Heap {
        return heap::run(&req, args, pid);
    }
    let rec = record(&req, &rules)?;
    let write_summary = || match &args.summary {
        Some(path) => summary::write(path, &RecordSummary::of(pid, &rec)).map_err(|source| {
            RecordError::Write {
                path: path.display().to_string(),
                source,
            }
        }),
        None => Ok(()),
    };
    if rec.folded.total() == 0 {
        // An empty graph under a message of success would say "nothing to see here".
        write_summary()?;
        return Err(RecordError::Empty {
            pid,
            comm: process::comm(pid)
                .unwrap_or_else(|_| "exited".into())
                .escape_debug()
                .to_string(),
            nothing: req.mode.nothing(),
            seconds: rec.elapsed.as_secs_f64(),
        });
    }
    let stacks = render::Stacks {
        folded: &rec.folded,
        detailed: &rec.detailed,
        elapsed: rec.elapsed,
    };
    let rendered = render::capture(stacks, &req, &rec.title, &rules, &Default::default())
        .map_err(RecordError::Render)?;
    let shown = req.filter.apply(&rules, &rec.folded).total();
    let (written, written_to) = match &args.output {
        Some(path) => (
            std::fs::write(path, &rendered.body),
            format!(" to {}", path.display()),
        ),
        None => (io::stdout().lock().write_all(&rendered.body), String::new()),
    };
    written.map_err(|source| RecordError::Write {
        path: args
            .output
            .as_ref()
            .map_or_else(|| "standard output".to_owned(), |p| p.display().to_string()),
        source,
    })?;
    write_summary()?;
    report::print(&rec, &req, pid, shown, &written_to);
    Ok(())
}
