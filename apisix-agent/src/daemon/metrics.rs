//! The daemon's Prometheus metrics (prometheus-client, OpenMetrics text on `/metrics`): the
//! metric families, their typed label sets, and the agent's own CPU time and resident memory
//! read from `/proc/self` at each scrape.
//!
//! Metrics produced (counters carry the `_total` suffix on the wire):
//! - `apisix_profiler_lua_function_self_samples_total`, `…_lua_function_samples_total`
//!   {function, file, line, container, image}
//! - `apisix_profiler_c_function_self_samples_total`, `…_c_function_samples_total`
//!   {function, module, container, image}
//! - `apisix_profiler_samples_total`, `apisix_profiler_lost_samples_total`
//!   {container, image, process}
//! - `apisix_profiler_unwind_errors_total` {reason} (BPF walk errors, user-side naming
//!   errors, and JIT trace samples that kept only their physical frames, `trace_*`)
//! - `apisix_profiler_lua_vm_state_samples_total` {state, container, image}: CPU samples per
//!   LuaJIT VM state (interpreted, compiled, c, gc, trace_exit, jit_compiler)
//! - `apisix_profiler_plugin_cpu_seconds_total` {plugin, phase, container, image} and
//!   `apisix_profiler_phase_cpu_seconds_total` {phase, container, image}: samples × sampling
//!   period, so `rate()` reads as cores ([`crate::attribution`]); with off-CPU profiling,
//!   `…_plugin_offcpu_seconds_total` and `…_phase_offcpu_seconds_total` (blocked time)
//! - `apisix_profiler_lua_memory_bytes` {container, image, process} (gauge): the Lua heap
//!   (`gc.total`) of the targets' VMs, summed over the processes of each label set;
//!   `apisix_profiler_lua_memory_read_errors_total` {reason}: reads of it that failed
//! - `apisix_profiler_event_loop_iteration_seconds` {container, image} (histogram, buckets
//!   counted in the kernel: [`LoopHistogram`]) and `apisix_profiler_event_loop_stalls_total`
//!   {container, image}: the targets' event-loop iterations (`super::eventloop`)
//! - `apisix_profiler_targets` {flavour} (gauge)
//! - `apisix_profiler_cache_bytes` {cache} (gauge): bytes of the caches fed by target memory
//!   and of the retained windows, against their `limits:` caps
//! - `apisix_profiler_target_file_refusals_total` {reason}: files a target mapped that were
//!   not opened ([`crate::proc::target_file::Refusal::name`])
//! - `apisix_profiler_agent_cpu_seconds_total`, `apisix_profiler_agent_resident_memory_bytes`,
//!   `apisix_profiler_sampling_frequency_hertz`
//! - the HTTP endpoint's own ([`HttpMetrics`]): `apisix_profiler_http_auth_failures_total`
//!   {reason}, `apisix_profiler_http_connection_errors_total` {reason},
//!   `apisix_profiler_http_open_connections`, `apisix_profiler_http_file_reloads_total`
//!   {file, result}
//!
//! Hooks: `/proc/self/stat`, `/proc/self/statm`.

use std::{
    borrow::Cow,
    sync::{Mutex, atomic::AtomicU64},
};

use apisix_ebpf_common::{LOOP_BUCKETS, LOOP_BUCKETS_NS};
use prometheus_client::{
    encoding::{EncodeLabelSet, EncodeLabelValue, EncodeMetric, LabelValueEncoder, MetricEncoder},
    metrics::{MetricType, TypedMetric, counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

/// Longest label value kept, in bytes; a longer one is cut (at a character boundary) and
/// ends in [`TRUNCATED`]. Values come from the targets (chunk names, file names, symbols,
/// container names), which any tenant controls.
pub const MAX_LABEL_VALUE_BYTES: usize = 512;
pub use crate::label::TRUNCATED;

/// One label value. Every label of every family is one of these, so that its
/// [`EncodeLabelValue`] is the one place where values are escaped for the exposition formats
/// (`\\`, `\"`, `\n`, the same in the Prometheus text format and OpenMetrics), whatever a
/// target put in them. Built from a `String` or bytes, a value is capped at
/// [`MAX_LABEL_VALUE_BYTES`] and invalid UTF-8 is replaced (U+FFFD).
#[derive(Clone, Debug, Default, Hash, PartialEq, Eq, PartialOrd, Ord)]
pub struct LabelValue(Cow<'static, str>);

impl LabelValue {
    /// A value fixed in the agent (a reason, a phase): not capped.
    pub const fn fixed(s: &'static str) -> Self {
        Self(Cow::Borrowed(s))
    }

    /// A value from bytes a target controls: invalid UTF-8 replaced, then capped.
    pub fn from_bytes(b: &[u8]) -> Self {
        Self::from(String::from_utf8_lossy(b).into_owned())
    }

    /// The value, unescaped.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// `s` cut to at most `max` bytes (at a character boundary) with [`TRUNCATED`] appended
/// when it was longer; the result is at most `max` + `TRUNCATED.len()` bytes.
pub fn cap_str(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push_str(TRUNCATED);
    }
    s
}

impl From<String> for LabelValue {
    fn from(s: String) -> Self {
        Self(Cow::Owned(cap_str(s, MAX_LABEL_VALUE_BYTES)))
    }
}

impl From<&str> for LabelValue {
    fn from(s: &str) -> Self {
        Self::from(s.to_owned())
    }
}

impl std::fmt::Display for LabelValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl EncodeLabelValue for LabelValue {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> std::fmt::Result {
        escape_label_value(&self.0, encoder)
    }
}

/// Writes `value` escaped as a label value of the Prometheus text format and OpenMetrics:
/// backslash, double quote and line feed become `\\`, `\"` and `\n`; nothing else needs it.
pub fn escape_label_value(value: &str, out: &mut impl std::fmt::Write) -> std::fmt::Result {
    let mut rest = value;
    while let Some(i) = rest.find(['\\', '"', '\n']) {
        out.write_str(&rest[..i])?;
        out.write_str(match rest.as_bytes()[i] {
            b'\\' => "\\\\",
            b'"' => "\\\"",
            _ => "\\n",
        })?;
        rest = &rest[i + 1..];
    }
    out.write_str(rest)
}

/// Labels of a Lua function series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LuaFunctionLabels {
    pub function: LabelValue,
    pub file: LabelValue,
    pub line: LabelValue,
    pub container: LabelValue,
    pub image: LabelValue,
}

/// Labels of a C function series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CFunctionLabels {
    pub function: LabelValue,
    pub module: LabelValue,
    pub container: LabelValue,
    pub image: LabelValue,
}

/// Labels of per-target series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TargetLabels {
    pub container: LabelValue,
    pub image: LabelValue,
    pub process: LabelValue,
}

/// Labels of the VM-state series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VmStateLabels {
    /// One of [`crate::luajit::VmState::name`].
    pub state: LabelValue,
    pub container: LabelValue,
    pub image: LabelValue,
}

/// Labels of the per-plugin series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PluginLabels {
    /// A sanitised plugin name, `[core]`, `[other]` (beyond the cap) or empty (no Lua).
    pub plugin: LabelValue,
    /// One of [`crate::attribution::Phase::name`].
    pub phase: LabelValue,
    pub container: LabelValue,
    pub image: LabelValue,
}

/// Labels of the per-phase series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabels {
    /// One of [`crate::attribution::Phase::name`].
    pub phase: LabelValue,
    pub container: LabelValue,
    pub image: LabelValue,
}

/// Labels of per-group series (container and image).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GroupLabels {
    pub container: LabelValue,
    pub image: LabelValue,
}

/// A histogram whose observations arrive counted per bucket (the kernel buckets the
/// event-loop iterations, [`LOOP_BUCKETS_NS`]): [`Self::add`] takes the counts of each bucket
/// and their summed seconds.
#[derive(Debug, Default)]
pub struct LoopHistogram {
    inner: Mutex<LoopCounts>,
}

#[derive(Debug, Default, Clone, Copy)]
struct LoopCounts {
    sum: f64,
    /// Per bucket, not cumulative; the last one above the largest bound.
    buckets: [u64; LOOP_BUCKETS],
}

impl LoopHistogram {
    /// Adds `buckets[i]` observations to bucket `i`, `sum_seconds` to the sum.
    pub fn add(&self, buckets: &[u64; LOOP_BUCKETS], sum_seconds: f64) {
        let mut c = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        c.sum += sum_seconds;
        for (total, n) in c.buckets.iter_mut().zip(buckets) {
            *total += n;
        }
    }
}

impl TypedMetric for LoopHistogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for LoopHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let c = *self.inner.lock().unwrap_or_else(|e| e.into_inner());
        // The encoder sums the counts into cumulative ones; f64::MAX is written `+Inf`.
        let bounds = LOOP_BUCKETS_NS
            .iter()
            .map(|ns| *ns as f64 / 1e9)
            .chain([f64::MAX]);
        let buckets: Vec<(f64, u64)> = bounds.zip(c.buckets).collect();
        let count = c.buckets.iter().sum();
        encoder.encode_histogram::<prometheus_client::encoding::NoLabelSet>(
            c.sum, count, &buckets, None,
        )
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

/// Labels of unwind error series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: LabelValue,
}

/// Labels of the cache size gauge.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CacheLabels {
    /// `protos`, `labels`, `traces`, `window_cpu` or `window_offcpu`.
    pub cache: LabelValue,
}

/// Labels of the BPF program gauge.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProgramLabels {
    /// `cpu_sampler`, `offcpu` (the off-CPU pair) or `event_loop` (the event-loop pair).
    pub program: LabelValue,
}

/// Labels of the targets gauge.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FlavourLabels {
    pub flavour: LabelValue,
}

/// Labels of the HTTP auth failure and connection error series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpReasonLabels {
    /// One of `daemon::auth::Failure::name` or `daemon::listener::ConnectionError::name`.
    pub reason: LabelValue,
}

/// Labels of the credential file reload series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReloadLabels {
    /// `tls` (certificate, key and client CAs together) or `bearer_token`.
    pub file: LabelValue,
    /// `ok` or `failed` (the previous files stay in use).
    pub result: LabelValue,
}

/// The HTTP endpoint's own metrics (`daemon::listener`, `daemon::auth`, `daemon::tls`).
#[derive(Debug, Default)]
pub struct HttpMetrics {
    /// Requests refused with 401, by reason.
    pub auth_failures: Family<HttpReasonLabels, Counter>,
    /// Connections refused or closed on an error, by reason.
    pub connection_errors: Family<HttpReasonLabels, Counter>,
    /// Connections open now.
    pub open_connections: Gauge,
    /// Reloads of the TLS files and the bearer token file.
    pub reloads: Family<ReloadLabels, Counter>,
}

/// Every metric of the daemon.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub lua_self: Family<LuaFunctionLabels, Counter>,
    pub lua_inclusive: Family<LuaFunctionLabels, Counter>,
    /// Registered only when continuous off-CPU profiling is enabled.
    pub lua_offcpu: Family<LuaFunctionLabels, Counter<f64, AtomicU64>>,
    pub c_self: Family<CFunctionLabels, Counter>,
    pub c_inclusive: Family<CFunctionLabels, Counter>,
    pub samples: Family<TargetLabels, Counter>,
    pub lost: Family<TargetLabels, Counter>,
    pub unwind_errors: Family<ReasonLabels, Counter>,
    pub vm_states: Family<VmStateLabels, Counter>,
    pub plugin_cpu: Family<PluginLabels, Counter<f64, AtomicU64>>,
    pub phase_cpu: Family<PhaseLabels, Counter<f64, AtomicU64>>,
    /// Registered only when continuous off-CPU profiling is enabled.
    pub plugin_offcpu: Family<PluginLabels, Counter<f64, AtomicU64>>,
    /// Registered only when continuous off-CPU profiling is enabled.
    pub phase_offcpu: Family<PhaseLabels, Counter<f64, AtomicU64>>,
    pub targets: Family<FlavourLabels, Gauge>,
    /// 1 for each part of the daemon's BPF programs the kernel accepted, 0 for one it
    /// refused.
    pub bpf_programs: Family<ProgramLabels, Gauge>,
    pub lua_memory: Family<TargetLabels, Gauge>,
    pub lua_memory_errors: Family<ReasonLabels, Counter>,
    /// Event-loop iterations of the targets, by duration.
    pub loop_iterations: Family<GroupLabels, LoopHistogram>,
    /// Event-loop iterations of at least `sampling.stalls.threshold_ms`.
    pub loop_stalls: Family<GroupLabels, Counter>,
    agent_cpu: Counter<f64, AtomicU64>,
    agent_rss: Gauge,
    pub frequency: Gauge,
    pub http: HttpMetrics,
    /// Bytes held by each cache fed by target memory and each retained window.
    pub cache_bytes: Family<CacheLabels, Gauge>,
    /// Target files not opened, by reason ([`crate::proc::target_file`]).
    target_file_refusals: Family<ReasonLabels, Counter>,
    /// Refusals already added to `target_file_refusals`, by reason.
    refusals_seen: Mutex<[u64; crate::proc::target_file::Refusal::ALL.len()]>,
    /// CPU time already added to `agent_cpu`, in clock ticks.
    cpu_ticks_seen: Mutex<u64>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new(false)
    }
}

impl Metrics {
    /// Registers every family (the off-CPU one only with `offcpu`).
    pub fn new(offcpu: bool) -> Self {
        let mut m = Self {
            registry: Registry::with_prefix("apisix_profiler"),
            lua_self: Family::default(),
            lua_inclusive: Family::default(),
            lua_offcpu: Family::default(),
            c_self: Family::default(),
            c_inclusive: Family::default(),
            samples: Family::default(),
            lost: Family::default(),
            unwind_errors: Family::default(),
            vm_states: Family::default(),
            plugin_cpu: Family::default(),
            phase_cpu: Family::default(),
            plugin_offcpu: Family::default(),
            phase_offcpu: Family::default(),
            targets: Family::default(),
            bpf_programs: Family::default(),
            lua_memory: Family::default(),
            lua_memory_errors: Family::default(),
            loop_iterations: Family::default(),
            loop_stalls: Family::default(),
            agent_cpu: Counter::default(),
            agent_rss: Gauge::default(),
            frequency: Gauge::default(),
            http: HttpMetrics::default(),
            target_file_refusals: Family::default(),
            cache_bytes: Family::default(),
            refusals_seen: Mutex::new([0; crate::proc::target_file::Refusal::ALL.len()]),
            cpu_ticks_seen: Mutex::new(0),
        };
        m.register_profiles(offcpu);
        m.register_targets();
        m.register_agent();
        m
    }

    /// The profile families: functions, samples, VM states, plugins and phases.
    fn register_profiles(&mut self, offcpu: bool) {
        let m = self;
        m.registry.register(
            "lua_function_self_samples",
            "CPU samples whose innermost Lua frame is this function (incl. C it calls directly)",
            m.lua_self.clone(),
        );
        m.registry.register(
            "lua_function_samples",
            "CPU samples with this Lua function anywhere on the stack",
            m.lua_inclusive.clone(),
        );
        if offcpu {
            m.registry.register(
                "lua_function_offcpu_seconds",
                "Time threads spent blocked in system calls with this Lua function innermost",
                m.lua_offcpu.clone(),
            );
        }
        m.registry.register(
            "c_function_self_samples",
            "CPU samples whose innermost user-space frame is this C function",
            m.c_self.clone(),
        );
        m.registry.register(
            "c_function_samples",
            "CPU samples with this C function anywhere on the stack",
            m.c_inclusive.clone(),
        );
        m.registry
            .register("samples", "CPU samples taken per target", m.samples.clone());
        m.registry.register(
            "lost_samples",
            "CPU samples lost per target (ring buffer full)",
            m.lost.clone(),
        );
        m.registry.register(
            "unwind_errors",
            "Stack walks that ended early, by reason",
            m.unwind_errors.clone(),
        );
        m.registry.register(
            "lua_vm_state_samples",
            "CPU samples in Lua by LuaJIT VM state (interpreted, compiled trace, C, GC, trace \
             exit, JIT compiler)",
            m.vm_states.clone(),
        );
        m.registry.register(
            "plugin_cpu_seconds",
            "CPU time (samples x sampling period) by APISIX plugin (innermost plugin frame) and \
             request phase",
            m.plugin_cpu.clone(),
        );
        m.registry.register(
            "phase_cpu_seconds",
            "CPU time (samples x sampling period) by request phase (the ngx_lua handler)",
            m.phase_cpu.clone(),
        );
        if offcpu {
            m.registry.register(
                "plugin_offcpu_seconds",
                "Time blocked in system calls by APISIX plugin and request phase",
                m.plugin_offcpu.clone(),
            );
            m.registry.register(
                "phase_offcpu_seconds",
                "Time blocked in system calls by request phase",
                m.phase_offcpu.clone(),
            );
        }
    }

    /// The families of what the targets run: BPF programs, targets, their Lua heaps.
    fn register_targets(&mut self) {
        let m = self;
        m.registry.register(
            "bpf_program_loaded",
            "1 for each of the daemon's BPF programs (cpu_sampler, offcpu, event_loop) the kernel accepted, 0 for one it refused (see /healthz)",
            m.bpf_programs.clone(),
        );
        m.registry.register(
            "targets",
            "Processes being profiled, by LuaJIT flavour",
            m.targets.clone(),
        );
        m.registry.register_with_unit(
            "lua_memory",
            "Lua heap of the targets' LuaJIT VMs (gc.total: what collectgarbage(\"count\") \
             reports), summed over the processes with these labels; read every second",
            prometheus_client::registry::Unit::Bytes,
            m.lua_memory.clone(),
        );
        m.registry.register(
            "lua_memory_read_errors",
            "Reads of a target's Lua heap size that failed, by reason",
            m.lua_memory_errors.clone(),
        );
    }

    /// The agent's own families: CPU, memory, HTTP, caches, refused files, event loops.
    fn register_agent(&mut self) {
        let m = self;
        m.registry.register(
            "agent_cpu_seconds",
            "CPU time used by the agent itself",
            m.agent_cpu.clone(),
        );
        m.registry.register_with_unit(
            "agent_resident_memory",
            "Resident memory of the agent itself",
            prometheus_client::registry::Unit::Bytes,
            m.agent_rss.clone(),
        );
        m.registry.register_with_unit(
            "sampling_frequency",
            "Continuous sampling rate per CPU",
            prometheus_client::registry::Unit::Other("hertz".to_owned()),
            m.frequency.clone(),
        );
        m.registry.register(
            "http_auth_failures",
            "HTTP requests refused for missing or wrong credentials, by reason",
            m.http.auth_failures.clone(),
        );
        m.registry.register(
            "http_connection_errors",
            "HTTP connections refused (connection limit) or closed on an error, by reason",
            m.http.connection_errors.clone(),
        );
        m.registry.register(
            "http_open_connections",
            "HTTP connections open",
            m.http.open_connections.clone(),
        );
        m.registry.register_with_unit(
            "cache",
            "Bytes held by the caches fed by target memory (protos, labels, traces) and the \
             retained windows, as counted for their limits: caps",
            prometheus_client::registry::Unit::Bytes,
            m.cache_bytes.clone(),
        );
        m.registry.register(
            "target_file_refusals",
            "Files mapped by a target that were not opened (not a regular file, changed since \
             the maps line, too large, unreachable, not ELF), by reason",
            m.target_file_refusals.clone(),
        );
        m.registry.register_with_unit(
            "event_loop_iteration",
            "Event-loop iterations of the targets' workers (from a return of epoll_wait to the \
             next entry), by duration",
            prometheus_client::registry::Unit::Seconds,
            m.loop_iterations.clone(),
        );
        m.registry.register(
            "event_loop_stalls",
            "Event-loop iterations at least sampling.stalls.threshold_ms long",
            m.loop_stalls.clone(),
        );
        m.registry.register(
            "http_file_reloads",
            "Reloads of the TLS files and the bearer token file, by result",
            m.http.reloads.clone(),
        );
    }

    /// Refreshes the agent's own figures and encodes everything as OpenMetrics text.
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        self.refresh_self();
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }

    /// Adds the target file refusals counted since the last scrape.
    fn refresh_refusals(&self) {
        let Ok(mut seen) = self.refusals_seen.lock() else {
            return;
        };
        for (i, (reason, total)) in crate::proc::target_file::refusals().into_iter().enumerate() {
            let series = self.target_file_refusals.get_or_create(&ReasonLabels {
                reason: LabelValue::fixed(reason),
            });
            series.inc_by(total.saturating_sub(seen[i]));
            seen[i] = total;
        }
    }

    fn refresh_self(&self) {
        self.refresh_refusals();
        let usage = self_usage();
        if let Some((ticks, rss)) = usage {
            if let Ok(mut seen) = self.cpu_ticks_seen.lock()
                && ticks > *seen
            {
                let hz = clock_ticks();
                self.agent_cpu.inc_by((ticks - *seen) as f64 / hz);
                *seen = ticks;
            }
            self.agent_rss.set(i64::try_from(rss).unwrap_or(i64::MAX));
        }
    }
}

/// Rewrites OpenMetrics text into the Prometheus text format 0.0.4, for clients that do not
/// ask for OpenMetrics (curl, `promtool check metrics`): counter families are named with
/// their `_total` suffix in `# HELP`/`# TYPE`, and `# UNIT`/`# EOF` lines are dropped.
pub fn to_prometheus_text(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line.starts_with("# UNIT ") || line == "# EOF" {
            continue;
        }
        let meta = line
            .strip_prefix("# HELP ")
            .map(|rest| ("# HELP ", rest))
            .or_else(|| line.strip_prefix("# TYPE ").map(|rest| ("# TYPE ", rest)));
        if let Some((kind, rest)) = meta
            && let Some((name, tail)) = rest.split_once(' ')
            && counters.contains(name)
        {
            out.push_str(kind);
            out.push_str(name);
            out.push_str("_total ");
            out.push_str(tail);
        } else {
            out.push_str(line);
        }
        out.push('\n');
    }
    out
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if hz > 0 { hz as f64 } else { 100.0 }
}

/// The agent's CPU time (user + system, clock ticks) and resident memory (bytes).
pub fn self_usage() -> Option<(u64, u64)> {
    let f = crate::proc::process::stat_fields("self")?;
    // Fields 14 and 15 of stat: utime, stime.
    let ticks = f.get(14 - 3)?.parse::<u64>().ok()? + f.get(15 - 3)?.parse::<u64>().ok()?;
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some((ticks, pages * crate::proc::process::page_size()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostile_label_values_are_escaped_in_both_formats() {
        let m = Metrics::new(false);
        let evil = "x\"} 9\nforged{a=\"b\"} 1\n#\\";
        m.lua_self
            .get_or_create(&LuaFunctionLabels {
                function: evil.into(),
                file: evil.into(),
                line: LabelValue::fixed("1"),
                container: evil.into(),
                image: LabelValue::from_bytes(b"\xff\xfe"),
            })
            .inc();
        let text = m.encode().expect("encode");
        let escaped = r#"x\"} 9\nforged{a=\"b\"} 1\n#\\"#;
        for t in [text.clone(), to_prometheus_text(&text)] {
            assert!(!t.lines().any(|l| l.starts_with("forged")), "{t}");
            assert!(t.contains(&format!("function=\"{escaped}\"")), "{t}");
            assert!(t.contains("image=\"\u{fffd}\u{fffd}\""), "{t}");
        }
        let long = LabelValue::from("é".repeat(MAX_LABEL_VALUE_BYTES));
        assert!(long.as_str().ends_with(TRUNCATED));
        assert!(long.as_str().len() <= MAX_LABEL_VALUE_BYTES + TRUNCATED.len());
    }

    #[test]
    fn names_follow_the_convention() {
        let m = Metrics::new(false);
        m.samples
            .get_or_create(&TargetLabels {
                container: LabelValue::fixed("c"),
                image: LabelValue::fixed("i"),
                process: LabelValue::fixed("nginx"),
            })
            .inc();
        m.unwind_errors
            .get_or_create(&ReasonLabels {
                reason: LabelValue::fixed("lua_bad_frame"),
            })
            .inc();
        let text = match m.encode() {
            Ok(t) => t,
            Err(e) => panic!("{e}"),
        };
        assert!(
            text.contains(
                "apisix_profiler_samples_total{container=\"c\",image=\"i\",process=\"nginx\"} 1"
            ),
            "{text}"
        );
        assert!(text.contains("apisix_profiler_unwind_errors_total{reason=\"lua_bad_frame\"} 1"));
        m.lua_memory
            .get_or_create(&TargetLabels {
                container: LabelValue::fixed("c"),
                image: LabelValue::fixed("i"),
                process: LabelValue::fixed("nginx"),
            })
            .set(4096);
        let text = match m.encode() {
            Ok(t) => t,
            Err(e) => panic!("{e}"),
        };
        assert!(
            text.contains(
                "apisix_profiler_lua_memory_bytes{container=\"c\",image=\"i\",process=\"nginx\"} 4096"
            ),
            "{text}"
        );
        assert!(text.contains("apisix_profiler_agent_cpu_seconds_total"));
        assert!(text.contains("apisix_profiler_agent_resident_memory_bytes"));
        assert!(text.contains("apisix_profiler_sampling_frequency_hertz"));
        assert!(text.ends_with("# EOF\n"));
        let plain = to_prometheus_text(&text);
        assert!(
            plain.contains("# TYPE apisix_profiler_samples_total counter\n"),
            "{plain}"
        );
        assert!(
            plain.contains("# HELP apisix_profiler_samples_total CPU samples"),
            "{plain}"
        );
        assert!(plain.contains("# TYPE apisix_profiler_agent_resident_memory_bytes gauge\n"));
        assert!(
            !plain.contains("# EOF") && !plain.contains("# UNIT"),
            "{plain}"
        );
    }
}
