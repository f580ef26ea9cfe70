//! One capture request, whoever asks. `record` builds it from its command line
//! ([`RequestArgs`], which clap derives) and `/flamegraph` from its query string
//! ([`Request::from_query`]); both go through one validation ([`Request::new`]), which words
//! its errors in the asker's terms (`--duration` or `seconds=`, [`Origin`]) and checks each
//! setting against the one range [`crate::config::ranges`] holds for it. A request knows what
//! it measures ([`Mode`]), the capture that measures it ([`Request::capture_mode`]), its pprof
//! kind, its title and the warnings of its outcome ([`warnings`]); [`super::render`] is the
//! one renderer of its formats. A new mode is added here once.
//!
//! Hooks: none (the capture runs in [`super::capture`]). Metrics: none.

use std::{collections::HashMap, fmt::Write as _, time::Duration};

use super::capture::{self, Capture};
use crate::{
    attribution::{self, Filter, Phase},
    config::ranges,
    luajit::NameStyle,
    output::pprof,
    stacks::StackOptions,
};

/// What a request measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, clap::ValueEnum)]
pub enum Mode {
    /// Where the CPU time goes (sampled at --frequency).
    Cpu,
    /// Where threads block, weighted by blocked microseconds (the `sample-bt-off-cpu` port).
    OffCpu,
    /// Where the Lua VM allocates, weighted by allocated bytes (sampled every
    /// --sample-bytes).
    Alloc,
    /// Which stacks allocated the sampled Lua memory still allocated at the end (leaks).
    Live,
    /// What ran while a worker's event loop was stalled (an iteration of at least
    /// --stall-threshold-ms), weighted by stall microseconds.
    Stalls,
    /// Who holds the Lua heap now: a snapshot read from outside (no probes), weighted by
    /// bytes, each line a retaining path from a root (see `luajit/snapshot/`); with
    /// --diff-seconds, what grew between two snapshots.
    Heap,
}

impl Mode {
    /// Every mode, in the order help texts list them.
    pub const ALL: [Mode; 6] = [
        Mode::Cpu,
        Mode::OffCpu,
        Mode::Alloc,
        Mode::Live,
        Mode::Stalls,
        Mode::Heap,
    ];

    /// The name `--mode`, `mode=` and `record --summary` use.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Cpu => "cpu",
            Mode::OffCpu => "off-cpu",
            Mode::Alloc => "alloc",
            Mode::Live => "live",
            Mode::Stalls => "stalls",
            Mode::Heap => "heap",
        }
    }

    /// The mode named `name`.
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|m| m.name() == name)
    }

    /// Whether it probes the Lua allocator (bounded by `sampling.memory.min_interval_seconds`
    /// in the daemon).
    pub fn is_memory(self) -> bool {
        matches!(self, Mode::Alloc | Mode::Live)
    }

    /// Whether the daemon serves it from its continuously sampled window (without
    /// `seconds=`).
    pub fn has_window(self) -> bool {
        matches!(self, Mode::Cpu | Mode::Stalls)
    }

    /// Whether its stacks are CPU samples (at `frequency`).
    pub fn is_cpu(self) -> bool {
        matches!(self, Mode::Cpu | Mode::Stalls)
    }

    /// What one unit of weight is, for flame graph legends.
    pub fn unit(self) -> &'static str {
        match self {
            Mode::Cpu => "samples",
            Mode::OffCpu | Mode::Stalls => "us",
            Mode::Alloc | Mode::Live | Mode::Heap => "bytes",
        }
    }

    /// What a capture with nothing to show lacked, for messages ("gave no …").
    pub fn nothing(self) -> &'static str {
        match self {
            Mode::Cpu => "CPU samples",
            Mode::OffCpu => "blocked time",
            Mode::Alloc | Mode::Live => "allocations",
            Mode::Stalls => "stall samples",
            Mode::Heap => "Lua heap",
        }
    }
}

/// How a request's result is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// An interactive SVG flame graph (inferno).
    Svg,
    /// Folded stacks, `root;…;leaf COUNT` per line.
    Collapsed,
    /// A JSON tree, with each distinct stack's plugin and phase.
    Json,
    /// A gzip-compressed pprof profile (Pyroscope, Parca, `go tool pprof`).
    Pprof,
}

impl Format {
    /// Every format.
    pub const ALL: [Format; 4] = [Format::Svg, Format::Collapsed, Format::Json, Format::Pprof];

    /// The name `--format` and `format=` use.
    pub fn name(self) -> &'static str {
        match self {
            Format::Svg => "svg",
            Format::Collapsed => "collapsed",
            Format::Json => "json",
            Format::Pprof => "pprof",
        }
    }
}

/// Which processes a request is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selector {
    /// Every target (only `/flamegraph?mode=stalls`).
    All,
    Pid(u32),
    /// A container's name, or a prefix (4 characters or more) of its id.
    Container(String),
}

impl Selector {
    /// `pid N` or `container NAME`, for messages.
    pub fn describe(&self) -> String {
        match self {
            Selector::All => "every target".to_owned(),
            Selector::Pid(pid) => format!("pid {pid}"),
            Selector::Container(c) => format!("container {c}"),
        }
    }
}

/// Who asks: errors name the parameters as that front end spells them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// `record`'s command line: `--duration`, `--sample-bytes`.
    Cli,
    /// `/flamegraph`'s query string: `seconds=`, `sample_bytes=`.
    Http,
}

impl Origin {
    /// The parameter `field` (a [`RequestArgs`] field name) as this front end spells it.
    pub fn spell(self, field: &str) -> String {
        match (self, field) {
            (Origin::Cli, "seconds") => "--duration".to_owned(),
            (Origin::Cli, "include_idle") => "--include-idle".to_owned(),
            (Origin::Cli, f) => format!("--{}", f.replace('_', "-")),
            (Origin::Http, "include_idle") => "idle".to_owned(),
            (Origin::Http, f) => f.to_owned(),
        }
    }
}

/// What a request gets where it gives nothing, and its one bound that depends on where it
/// runs (the daemon's `sampling.max_capture_seconds`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Defaults {
    /// `None`: no capture unless asked (the daemon serves its window).
    pub seconds: Option<u64>,
    pub max_seconds: u64,
    pub frequency: u64,
    pub min_block_us: u64,
    pub sample_bytes: u64,
    pub stall_threshold_ms: u64,
}

impl Defaults {
    /// `record`'s: 10 s at 99 Hz, blocks of 100 µs.
    pub const RECORD: Defaults = Defaults {
        seconds: Some(10),
        max_seconds: *ranges::RECORD_SECONDS.end(),
        frequency: 99,
        min_block_us: 100,
        sample_bytes: capture::DEFAULT_SAMPLE_BYTES,
        stall_threshold_ms: 100,
    };

    /// The daemon's, from its configuration.
    pub fn daemon(cfg: &crate::config::Sampling) -> Self {
        Defaults {
            seconds: None,
            max_seconds: cfg.max_capture_seconds,
            frequency: cfg.on_demand_frequency_hz,
            min_block_us: cfg.offcpu.min_block_us,
            sample_bytes: cfg.memory.sample_bytes,
            stall_threshold_ms: cfg.stalls.threshold_ms,
        }
    }
}

/// A request as given, before validation: `record`'s options (clap derives them) and what
/// [`Request::from_query`] parses out of a query string.
#[derive(Debug, Clone, Default, PartialEq, Eq, clap::Args)]
pub struct RequestArgs {
    /// The process to profile.
    #[arg(long, required = true)]
    pub pid: Option<u32>,
    /// The processes of a container (the daemon only).
    #[arg(skip)]
    pub container: Option<String>,
    /// How long to capture, in seconds [default: 10].
    #[arg(long = "duration", value_name = "SECONDS")]
    pub seconds: Option<u64>,
    /// What to measure [default: cpu].
    #[arg(long, value_enum)]
    pub mode: Option<Mode>,
    /// CPU samples per second per CPU [default: 99].
    #[arg(long, value_name = "HZ")]
    pub frequency: Option<u64>,
    /// Off-CPU: blocks shorter than this are dropped in the kernel [default: 100].
    #[arg(long, value_name = "MICROSECONDS")]
    pub min_block_us: Option<u64>,
    /// Off-CPU: keep idle `epoll_wait` blocks.
    #[arg(long)]
    pub include_idle: bool,
    /// Alloc / live: mean allocated bytes between two sampled stacks [default: 524288].
    #[arg(long, value_name = "BYTES")]
    pub sample_bytes: Option<u64>,
    /// Stalls: the shortest event-loop iteration that is a stall [default: 100].
    #[arg(long, value_name = "MILLISECONDS")]
    pub stall_threshold_ms: Option<u64>,
    /// Output format [default: svg].
    #[arg(long, value_enum)]
    pub format: Option<Format>,
    /// Name Lua frames by their current line instead of the function's first line.
    #[arg(long)]
    pub lines: bool,
    /// A `[trace N]` pseudo-frame where a JIT trace runs.
    #[arg(long)]
    pub trace_frames: bool,
    /// Only the stacks of this plugin (`[core]`: Lua outside plugins).
    #[arg(long)]
    pub plugin: Option<String>,
    /// Only the stacks of this phase.
    #[arg(long, value_parser = parse_phase)]
    pub phase: Option<Phase>,
    /// Heap: the difference between a snapshot now and one this many seconds later (a
    /// differential graph, growth red).
    #[arg(long, value_name = "SECONDS")]
    pub diff_seconds: Option<u64>,
}

/// clap's parser of `--phase`.
fn parse_phase(s: &str) -> Result<Phase, String> {
    Phase::parse(s).ok_or_else(|| format!("one of {}", phase_names()))
}

fn phase_names() -> String {
    let names: Vec<&str> = Phase::ALL.iter().map(|p| p.name()).collect();
    names.join(", ")
}

/// A request that cannot be served as given: the message names the parameter as the asker
/// spelled it (a 400 over HTTP).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct RequestError {
    pub message: String,
}

fn bad(message: impl Into<String>) -> RequestError {
    RequestError {
        message: message.into(),
    }
}

/// A validated request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub selector: Selector,
    /// `None`: the daemon's retained window, at once (no capture).
    pub seconds: Option<u64>,
    pub mode: Mode,
    /// CPU captures: samples per second per CPU.
    pub frequency: u64,
    /// Off-CPU captures: shortest block kept.
    pub min_block_us: u64,
    /// Off-CPU: keep idle `epoll_wait` blocks.
    pub include_idle: bool,
    /// Alloc / live: mean allocated bytes between two sampled stacks.
    pub sample_bytes: u64,
    /// Stalls: the shortest event-loop iteration that is a stall (the daemon's window: its
    /// `sampling.stalls.threshold_ms`).
    pub stall_threshold_ms: u64,
    pub format: Format,
    pub style: NameStyle,
    /// Captures: a `[trace N]` pseudo-frame where a JIT trace runs.
    pub trace_frames: bool,
    /// Only the stacks of this plugin / phase.
    pub filter: Filter,
    /// Heap: seconds between the two snapshots of a difference.
    pub diff_seconds: Option<u64>,
}

/// The query parameters of `/flamegraph`.
pub const QUERY_PARAMETERS: [&str; 13] = [
    "pid",
    "container",
    "seconds",
    "format",
    "frequency",
    "mode",
    "min_block_us",
    "sample_bytes",
    "idle",
    "trace_frames",
    "plugin",
    "phase",
    "diff_seconds",
];

impl Request {
    /// Validates `args` from `origin` with `defaults` for what it leaves out.
    pub fn new(
        args: &RequestArgs,
        defaults: Defaults,
        origin: Origin,
    ) -> Result<Self, RequestError> {
        let key = |f: &str| origin.spell(f);
        let selector = selector(args, origin)?;
        let seconds = args.seconds.or(defaults.seconds);
        if let Some(s) = seconds {
            let range = 1..=defaults.max_seconds;
            if !range.contains(&s) {
                return Err(bad(format!("{}={s} must be in {range:?}", key("seconds"))));
            }
        }
        let mode = args.mode.unwrap_or(Mode::Cpu);
        if mode == Mode::Heap {
            return heap(args, defaults, origin);
        }
        if args.diff_seconds.is_some() {
            return Err(bad(format!(
                "{} applies to mode=heap only",
                key("diff_seconds")
            )));
        }
        if seconds.is_none() {
            window_only(args, mode, origin)?;
        }
        let given = |present: bool, field: &str, applies: bool, to: &str| {
            if present && !applies {
                Err(bad(format!("{} applies to {to} only", key(field))))
            } else {
                Ok(())
            }
        };
        given(
            args.frequency.is_some(),
            "frequency",
            mode.is_cpu(),
            "mode=cpu and mode=stalls",
        )?;
        given(
            args.stall_threshold_ms.is_some(),
            "stall_threshold_ms",
            mode == Mode::Stalls,
            "mode=stalls",
        )?;
        given(
            args.min_block_us.is_some(),
            "min_block_us",
            mode == Mode::OffCpu,
            "mode=off-cpu",
        )?;
        given(
            args.sample_bytes.is_some(),
            "sample_bytes",
            mode.is_memory(),
            "mode=alloc and mode=live",
        )?;
        let frequency = checked(
            args.frequency,
            defaults.frequency,
            ranges::FREQUENCY_HZ,
            &key("frequency"),
        )?;
        let min_block_us = checked(
            args.min_block_us,
            defaults.min_block_us,
            ranges::MIN_BLOCK_US,
            &key("min_block_us"),
        )?;
        let sample_bytes = checked(
            args.sample_bytes,
            defaults.sample_bytes,
            ranges::SAMPLE_BYTES,
            &key("sample_bytes"),
        )?;
        let stall_threshold_ms = checked(
            args.stall_threshold_ms,
            defaults.stall_threshold_ms,
            ranges::STALL_THRESHOLD_MS,
            &key("stall_threshold_ms"),
        )?;
        Ok(Request {
            selector,
            seconds,
            mode,
            frequency,
            min_block_us,
            include_idle: args.include_idle,
            sample_bytes,
            stall_threshold_ms,
            format: args.format.unwrap_or(Format::Svg),
            style: if args.lines {
                NameStyle::CurrentLine
            } else {
                NameStyle::FirstLine
            },
            trace_frames: args.trace_frames,
            filter: filter(args, origin)?,
            diff_seconds: None,
        })
    }

    /// Parses and validates `/flamegraph`'s query string.
    pub fn from_query(
        q: &HashMap<String, String>,
        defaults: Defaults,
    ) -> Result<Self, RequestError> {
        check_known(q, &QUERY_PARAMETERS)?;
        let number = |name: &str| -> Result<Option<u64>, RequestError> {
            q.get(name)
                .map(|v| {
                    v.parse::<u64>()
                        .map_err(|_| bad(format!("{name}={v:?} is not a whole number")))
                })
                .transpose()
        };
        let flag = |name: &str, off: &str, on: &str| -> Result<bool, RequestError> {
            match q.get(name).map(String::as_str) {
                None => Ok(false),
                Some(v) if v == off => Ok(false),
                Some(v) if v == on => Ok(true),
                Some(v) => Err(bad(format!("{name}={v:?} must be {off} or {on}"))),
            }
        };
        let (pid, container) = parse_selector_fields(q)?;
        let args = RequestArgs {
            pid,
            container,
            seconds: number("seconds")?,
            mode: q
                .get("mode")
                .map(|m| {
                    Mode::parse(m).ok_or_else(|| {
                        let names: Vec<&str> = Mode::ALL.iter().map(|m| m.name()).collect();
                        bad(format!("mode={m:?} must be one of {}", names.join(", ")))
                    })
                })
                .transpose()?,
            frequency: number("frequency")?,
            min_block_us: number("min_block_us")?,
            include_idle: flag("idle", "exclude", "include")?,
            sample_bytes: number("sample_bytes")?,
            // The daemon's stalls are those of `sampling.stalls.threshold_ms`.
            stall_threshold_ms: None,
            diff_seconds: number("diff_seconds")?,
            format: q
                .get("format")
                .map(|f| {
                    Format::ALL
                        .into_iter()
                        .find(|x| x.name() == f)
                        .ok_or_else(|| {
                            bad(format!(
                                "format={f:?} must be svg, collapsed, json or pprof"
                            ))
                        })
                })
                .transpose()?,
            lines: false,
            trace_frames: flag("trace_frames", "0", "1")?,
            plugin: q.get("plugin").cloned(),
            phase: query_phase(q)?,
        };
        Self::new(&args, defaults, Origin::Http)
    }

    /// The capture that measures it (`None`: served from the daemon's window).
    pub fn capture_mode(&self) -> Option<capture::Mode> {
        self.seconds?;
        Some(match self.mode {
            Mode::Heap => return None,
            Mode::Cpu => capture::Mode::Cpu {
                frequency: self.frequency,
            },
            Mode::OffCpu => capture::Mode::OffCpu {
                min_block_us: self.min_block_us,
                exclude_idle: !self.include_idle,
            },
            Mode::Alloc | Mode::Live => capture::Mode::Alloc {
                sample_bytes: self.sample_bytes,
                live: self.mode == Mode::Live,
            },
            Mode::Stalls => capture::Mode::Stalls {
                frequency: self.frequency,
                stall_ns: self.stall_threshold_ms * 1_000_000,
            },
        })
    }

    /// How long its capture runs.
    pub fn duration(&self) -> Option<Duration> {
        self.seconds.map(Duration::from_secs)
    }

    /// How its stacks are named.
    pub fn stack_options(&self) -> StackOptions {
        StackOptions {
            style: self.style,
            trace_frames: self.trace_frames,
        }
    }

    /// Its pprof sample types (a capture's; the window's CPU samples are at `window_hz`).
    pub fn pprof_kind(&self, window_hz: u64) -> pprof::Kind {
        match self.mode {
            Mode::Cpu if self.seconds.is_none() => pprof::Kind::cpu(window_hz),
            Mode::Cpu => pprof::Kind::cpu(self.frequency),
            Mode::OffCpu => pprof::Kind::OffCpu,
            Mode::Alloc => pprof::Kind::Alloc {
                sample_bytes: self.sample_bytes,
            },
            // Refused by `Request::new` (a snapshot has no samples): the nearest kind.
            Mode::Live | Mode::Heap => pprof::Kind::Live {
                sample_bytes: self.sample_bytes,
            },
            Mode::Stalls => pprof::Kind::Stalls,
        }
    }

    /// The title of a capture of `what` (`pid 12`, or a container and its processes):
    /// what was measured, for how long, then what went wrong ([`warnings`]).
    pub fn title(&self, what: &str, cap: &Capture) -> String {
        let described = self
            .capture_mode()
            .map_or_else(|| self.mode.name().to_owned(), capture::Mode::describe);
        let mut title = format!("{what} — {:.0}s {described}", cap.elapsed.as_secs_f64());
        for w in warnings(cap) {
            let _ = write!(title, " — {w}");
        }
        title
    }
}

/// A heap snapshot request: no capture (so no seconds, frequency or sample size), one
/// process, a format that can show bytes by path, and the seconds of a difference.
fn heap(args: &RequestArgs, defaults: Defaults, origin: Origin) -> Result<Request, RequestError> {
    let key = |f: &str| origin.spell(f);
    for (given, field) in [
        (args.frequency.is_some(), "frequency"),
        (args.min_block_us.is_some(), "min_block_us"),
        (args.sample_bytes.is_some(), "sample_bytes"),
        (args.trace_frames, "trace_frames"),
        (args.plugin.is_some(), "plugin"),
        (args.phase.is_some(), "phase"),
        (args.stall_threshold_ms.is_some(), "stall_threshold_ms"),
    ] {
        if given {
            return Err(bad(format!("{} does not apply to mode=heap", key(field))));
        }
    }
    let format = args.format.unwrap_or(Format::Svg);
    if format == Format::Pprof {
        return Err(bad(format!(
            "{}=pprof does not apply to mode=heap (svg, collapsed or json)",
            key("format")
        )));
    }
    let selector = selector(args, origin)?;
    if !matches!(selector, Selector::Pid(_)) {
        return Err(bad(format!("mode=heap reads one process: {}", key("pid"))));
    }
    if let Some(d) = args.diff_seconds {
        let range = 1..=defaults.max_seconds;
        if !range.contains(&d) {
            return Err(bad(format!(
                "{}={d} must be in {range:?}",
                key("diff_seconds")
            )));
        }
    }
    Ok(Request {
        selector,
        seconds: None,
        mode: Mode::Heap,
        frequency: defaults.frequency,
        min_block_us: defaults.min_block_us,
        include_idle: false,
        sample_bytes: defaults.sample_bytes,
        format,
        style: NameStyle::FirstLine,
        trace_frames: false,
        filter: Filter::default(),
        stall_threshold_ms: defaults.stall_threshold_ms,
        diff_seconds: args.diff_seconds,
    })
}

/// `pid`/`container`: exactly one over HTTP; `--pid` on the command line.
fn selector(args: &RequestArgs, origin: Origin) -> Result<Selector, RequestError> {
    match (args.pid, &args.container, origin) {
        (Some(0), _, _) => Err(bad(format!(
            "{}=0 is not a process id",
            origin.spell("pid")
        ))),
        (Some(pid), None, _) => Ok(Selector::Pid(pid)),
        (None, Some(c), Origin::Http) if !c.is_empty() && c.len() <= 128 => {
            Ok(Selector::Container(c.clone()))
        }
        (None, Some(_), Origin::Http) => Err(bad("container must be 1 to 128 characters")),
        (None, None, Origin::Http) if args.mode == Some(Mode::Stalls) => Ok(Selector::All),
        (Some(_), Some(_), _) => Err(bad("give only one of pid=PID or container=NAME")),
        (None, _, Origin::Http) => Err(bad("give exactly one of pid=PID or container=NAME")),
        (None, _, Origin::Cli) => Err(bad("--pid is required")),
    }
}

/// What a request served from the daemon's window (no `seconds`) may not ask for.
fn window_only(args: &RequestArgs, mode: Mode, origin: Origin) -> Result<(), RequestError> {
    let seconds = origin.spell("seconds");
    if !mode.has_window() {
        return Err(bad(format!(
            "mode={} needs {seconds}=N (it is captured on demand)",
            mode.name()
        )));
    }
    for (given, field, what) in [
        (
            args.frequency.is_some(),
            "frequency",
            "the recent stacks were sampled continuously",
        ),
        (
            args.trace_frames,
            "trace_frames",
            "the recent stacks were sampled without it",
        ),
    ] {
        if given {
            return Err(bad(format!(
                "{} applies to captures (with {seconds}=N); {what}",
                origin.spell(field)
            )));
        }
    }
    Ok(())
}

/// `given` or else `default`, in `range`.
fn checked(
    given: Option<u64>,
    default: u64,
    range: std::ops::RangeInclusive<u64>,
    name: &str,
) -> Result<u64, RequestError> {
    let value = given.unwrap_or(default);
    if range.contains(&value) {
        Ok(value)
    } else {
        Err(bad(format!("{name}={value} must be in {range:?}")))
    }
}

/// `plugin` and `phase`.
fn filter(args: &RequestArgs, origin: Origin) -> Result<Filter, RequestError> {
    if let Some(p) = &args.plugin {
        let ok = p == attribution::CORE
            || (!p.is_empty()
                && p.len() <= attribution::MAX_PLUGIN_LEN
                && attribution::sanitise(p) == *p);
        if !ok {
            return Err(bad(format!(
                "{}={p:?} must be 1 to {} characters of [A-Za-z0-9_.-], or {}",
                origin.spell("plugin"),
                attribution::MAX_PLUGIN_LEN,
                attribution::CORE
            )));
        }
    }
    Ok(Filter {
        plugin: args.plugin.clone(),
        phase: args.phase,
    })
}

/// A 400 for the first parameter of `q` not in `known`.
pub fn check_known(q: &HashMap<String, String>, known: &[&str]) -> Result<(), RequestError> {
    match q.keys().find(|k| !known.contains(&k.as_str())) {
        Some(k) => Err(bad(format!(
            "unknown parameter {k:?}; known: {}",
            known.join(", ")
        ))),
        None => Ok(()),
    }
}

/// `pid=` (a process id) and `container=` as given.
fn parse_selector_fields(
    q: &HashMap<String, String>,
) -> Result<(Option<u32>, Option<String>), RequestError> {
    let pid = q
        .get("pid")
        .map(|p| {
            p.parse::<u32>()
                .ok()
                .filter(|p| *p > 0)
                .ok_or_else(|| bad(format!("pid={p:?} is not a process id")))
        })
        .transpose()?;
    Ok((pid, q.get("container").cloned()))
}

/// `pid=PID` or `container=NAME`, or neither (`None`): the pprof endpoints' selector.
pub fn parse_selector(q: &HashMap<String, String>) -> Result<Option<Selector>, RequestError> {
    let (pid, container) = parse_selector_fields(q)?;
    if pid.is_none() && container.is_none() {
        return Ok(None);
    }
    let args = RequestArgs {
        pid,
        container,
        ..RequestArgs::default()
    };
    selector(&args, Origin::Http).map(Some)
}

/// `plugin=` and `phase=`: the pprof endpoints' filter.
pub fn parse_filter(q: &HashMap<String, String>) -> Result<Filter, RequestError> {
    let args = RequestArgs {
        plugin: q.get("plugin").cloned(),
        phase: query_phase(q)?,
        ..RequestArgs::default()
    };
    filter(&args, Origin::Http)
}

/// `phase=`, when given.
fn query_phase(q: &HashMap<String, String>) -> Result<Option<Phase>, RequestError> {
    q.get("phase")
        .map(|p| {
            Phase::parse(p)
                .ok_or_else(|| bad(format!("phase={p:?} must be one of {}", phase_names())))
        })
        .transpose()
}

/// What went wrong in a capture that still gave a result, one phrase each, for titles and
/// logs: lost stacks, untracked blocks, an unsettled collector, skipped targets.
pub fn warnings(cap: &Capture) -> Vec<String> {
    use apisix_ebpf_common::Counter;
    let Some(a) = &cap.alloc else {
        return Vec::new();
    };
    let c = &cap.counters;
    let mut out = Vec::new();
    let lost = c[Counter::RingbufFull as usize];
    let dropped = c[Counter::LiveMapFull as usize];
    let no_return = c[Counter::AllocNoReturn as usize];
    if lost > 0 {
        out.push(format!("{lost} sampled stacks lost (ring buffer full)"));
    }
    if dropped > 0 {
        out.push(format!(
            "{dropped} sampled blocks not tracked (tracking map full)"
        ));
    }
    if no_return > 0 {
        out.push(format!(
            "{no_return} allocator calls without a return seen (their blocks, if sampled, not \
             tracked)"
        ));
    }
    if !a.unsettled.is_empty() {
        out.push(format!(
            "the Lua collector completed no cycle within {}s of the end: garbage not \
             collected yet included",
            capture::SETTLE_WAIT.as_secs()
        ));
    }
    if !a.skipped.is_empty() {
        out.push(format!("skipped: {}", a.skipped.join("; ")));
    }
    out
}

#[cfg(test)]
mod tests;
