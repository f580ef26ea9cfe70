//! The daemon's configuration: YAML (`config.example.yaml` documents every field), parsed with
//! `deny_unknown_fields` so a typo is an error, then validated. Every error names the field's
//! path (`sampling.frequency_hz`). Without a file the built-in defaults apply; they equal
//! `config.example.yaml` (a unit test keeps the two in step).
//!
//! Hooks: reads the config file. Metrics: none.

use std::{collections::BTreeMap, net::SocketAddr, path::Path, time::Duration};

use serde::{Deserialize, Serialize};

/// Errors of loading a configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("reading {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// The YAML does not fit the schema (unknown field, wrong type, bad syntax).
    #[error("{path}: {field}: {message}")]
    Parse {
        path: String,
        field: String,
        message: String,
    },
    /// A value is out of range or inconsistent.
    #[error("{path}: {field}: {message}")]
    Invalid {
        path: String,
        field: String,
        message: String,
    },
}

/// The whole configuration.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub http: Http,
    pub sampling: Sampling,
    pub metrics: Metrics,
    pub discovery: Discovery,
    pub attribution: Attribution,
    pub limits: Limits,
}

/// Caps in bytes of the agent's memory that targets can make grow: the caches fed by target
/// memory (Lua prototypes, frame labels, decoded JIT traces) and the retained window. A full
/// cache starts afresh; a full window drops its oldest samples. The defaults keep the agent
/// under 200 MiB resident against a workload that generates names (`bench/hostile_memory.py`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Each retained window (CPU, off-CPU): its samples, their stacks and their share of the
    /// labels' text, estimated.
    pub retained_window_bytes: usize,
    /// Lua prototypes read from targets (each up to 1 MiB).
    pub proto_cache_bytes: usize,
    /// Interned Lua frame labels (function, chunk name, line; each up to 512 bytes plus a
    /// marker).
    pub label_cache_bytes: usize,
    /// Decoded JIT traces.
    pub trace_cache_bytes: usize,
    /// Heap snapshots (`mode=heap`): target memory held at once while walking.
    pub heap_cache_bytes: usize,
    /// Heap snapshots: bytes read from the target by one snapshot in all.
    pub heap_read_bytes: usize,
    /// Heap snapshots: objects counted by one snapshot (the walk's queue and visited set
    /// grow with it: at most 16 bytes and 1/4 bit per object, see README).
    pub heap_objects: usize,
}

impl Default for Limits {
    fn default() -> Self {
        let caches = crate::stacks::CacheLimits::default();
        Self {
            retained_window_bytes: 48 << 20,
            proto_cache_bytes: caches.proto_bytes,
            label_cache_bytes: caches.label_bytes,
            trace_cache_bytes: caches.trace_bytes,
            heap_cache_bytes: 64 << 20,
            heap_read_bytes: 4 << 30,
            heap_objects: 8 << 20,
        }
    }
}

impl Limits {
    /// The caps of the stack builder's caches.
    pub fn caches(&self) -> crate::stacks::CacheLimits {
        crate::stacks::CacheLimits {
            proto_bytes: self.proto_cache_bytes,
            label_bytes: self.label_cache_bytes,
            trace_bytes: self.trace_cache_bytes,
        }
    }

    /// The bounds of a heap snapshot.
    pub fn heap(&self) -> crate::luajit::snapshot::Limits {
        crate::luajit::snapshot::Limits {
            cache_bytes: self.heap_cache_bytes as u64,
            read_bytes: self.heap_read_bytes as u64,
            objects: self.heap_objects as u64,
            ..Default::default()
        }
    }

    /// Checks each cap: 1 MiB to 16 GiB (objects: 1 Mi to 1 Gi); the error is (field,
    /// message).
    fn check(&self) -> Result<(), (String, String)> {
        for (field, value) in [
            ("retained_window_bytes", self.retained_window_bytes),
            ("proto_cache_bytes", self.proto_cache_bytes),
            ("label_cache_bytes", self.label_cache_bytes),
            ("trace_cache_bytes", self.trace_cache_bytes),
            ("heap_cache_bytes", self.heap_cache_bytes),
            ("heap_read_bytes", self.heap_read_bytes),
            ("heap_objects", self.heap_objects),
        ] {
            in_range(value, 1 << 20..=16 << 30).map_err(|e| (format!("limits.{field}"), e))?;
        }
        Ok(())
    }
}

/// Attribution of samples to APISIX (or Kong) plugins and request phases
/// ([`crate::attribution`]).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Attribution {
    /// Extra rules, tried in order before the built-in ones.
    pub plugin_rules: Vec<PluginRule>,
    /// Also apply the built-in rules (APISIX `apisix/plugins/<name>[.lua|/]`, Kong
    /// `kong/plugins/<name>/`).
    pub default_rules: bool,
}

/// One plugin rule.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PluginRule {
    /// A regex on a Lua frame's source file with a named capture `plugin`.
    pub regex: String,
}

impl Default for Attribution {
    fn default() -> Self {
        Self {
            plugin_rules: Vec::new(),
            default_rules: true,
        }
    }
}

impl Attribution {
    /// The compiled rules; the error names the rule's field path.
    pub fn rules(&self) -> Result<crate::attribution::Rules, (String, String)> {
        for (i, r) in self.plugin_rules.iter().enumerate() {
            crate::attribution::Rules::compile(&r.regex).map_err(|e| {
                let detail = std::error::Error::source(&e)
                    .map(|s| format!(": {s}"))
                    .unwrap_or_default();
                (
                    format!("attribution.plugin_rules[{i}].regex"),
                    format!("{e}{detail}"),
                )
            })?;
        }
        let custom: Vec<&str> = self.plugin_rules.iter().map(|r| r.regex.as_str()).collect();
        crate::attribution::Rules::new(&custom, self.default_rules)
            .map_err(|e| ("attribution.plugin_rules".to_owned(), e.to_string()))
    }
}

/// The HTTP endpoint (`/metrics`, `/flamegraph`, `/targets`, `/healthz`): where it listens,
/// TLS and credentials (as Prometheus exporter-toolkit's web configuration), which endpoints
/// exist, and the limits on connections.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Http {
    /// Address to listen on, `IP:PORT`.
    pub listen: String,
    /// Serve `/flamegraph` and the pprof endpoints (captures, stacks with Lua file names).
    /// `/metrics`, `/targets` and `/healthz` stay.
    pub profiling_endpoints: bool,
    /// TLS; without `cert_file`, plain HTTP.
    pub tls: HttpTls,
    /// Basic authentication: user name → bcrypt hash of the password.
    pub basic_auth_users: BTreeMap<String, String>,
    /// A file holding a bearer token clients may send instead (empty: none).
    pub bearer_token_file: String,
    /// With credentials configured: the basic auth users who may start on-demand captures
    /// (`/flamegraph?seconds=`), which load BPF programs against targets (`mode=alloc|live`:
    /// probes on every Lua allocation). Other users and the bearer token only read (metrics,
    /// targets, the retained window). Without credentials everyone may, as for every
    /// endpoint.
    pub capture_users: Vec<String>,
    /// `/healthz` answers without credentials (liveness probes) when auth is set.
    pub healthz_without_auth: bool,
    /// Time a client has, from connecting (TLS handshake included), to send a request's
    /// headers, and from its first byte for each later request on the connection.
    pub header_timeout_seconds: u64,
    /// A keep-alive connection with no request for this long is closed.
    pub idle_timeout_seconds: u64,
    /// Connections open at once; past it, new ones are refused (503, then closed).
    pub max_connections: usize,
    /// Largest request line plus headers accepted; a larger request gets 431.
    pub max_header_bytes: usize,
}

/// TLS of the HTTP endpoint. Files are PEM; they are read at start (an unreadable or
/// invalid one stops the start) and again on SIGHUP or when they change.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpTls {
    /// The server's certificate chain (leaf first); empty: no TLS.
    pub cert_file: String,
    /// The private key of `cert_file` (PKCS#8, PKCS#1 or SEC1).
    pub key_file: String,
    /// CA certificates client certificates must chain to; set, every client must present
    /// one (mutual TLS). Empty: no client certificates.
    pub client_ca_file: String,
}

/// The bcrypt costs bcrypt accepts (each step doubles the time a check takes).
pub const BCRYPT_COSTS: std::ops::RangeInclusive<u32> = 4..=31;

impl HttpTls {
    /// TLS is configured.
    pub fn enabled(&self) -> bool {
        !self.cert_file.is_empty()
    }
}

impl Http {
    /// Credentials are required (basic auth users or a bearer token).
    pub fn auth_enabled(&self) -> bool {
        !self.basic_auth_users.is_empty() || !self.bearer_token_file.is_empty()
    }

    /// Checks what can be checked without reading files; the error is (field, message).
    fn check(&self) -> Result<(), (String, String)> {
        let bad = |field: &str, message: String| (format!("http.{field}"), message);
        let t = &self.tls;
        if t.cert_file.is_empty() != t.key_file.is_empty() {
            let missing = if t.cert_file.is_empty() {
                "tls.cert_file"
            } else {
                "tls.key_file"
            };
            return Err(bad(
                missing,
                "tls.cert_file and tls.key_file go together".to_owned(),
            ));
        }
        if !t.client_ca_file.is_empty() && t.cert_file.is_empty() {
            return Err(bad(
                "tls.client_ca_file",
                "client certificates need TLS (tls.cert_file and tls.key_file)".to_owned(),
            ));
        }
        for (user, hash) in &self.basic_auth_users {
            if user.is_empty() || user.contains(':') || user.chars().any(char::is_control) {
                return Err(bad(
                    "basic_auth_users",
                    format!(
                        "{user:?} is not a user name (not empty, no ':' or control characters)"
                    ),
                ));
            }
            let parts = hash.parse::<bcrypt::HashParts>().map_err(|e| {
                bad(
                    &format!("basic_auth_users.{user}"),
                    format!("not a bcrypt hash ({e}); make one with `apisix-agent hash-password`"),
                )
            })?;
            // bcrypt refuses to check a password against any other cost: the user could
            // never log in.
            in_range(parts.get_cost(), BCRYPT_COSTS).map_err(|e| {
                bad(
                    &format!("basic_auth_users.{user}"),
                    format!(
                        "bcrypt cost {e}; make a hash with `apisix-agent hash-password --cost N`"
                    ),
                )
            })?;
        }
        if let Some(user) = self
            .capture_users
            .iter()
            .find(|u| !self.basic_auth_users.contains_key(*u))
        {
            return Err(bad(
                "capture_users",
                format!("{user:?} is not one of http.basic_auth_users"),
            ));
        }
        in_range(self.header_timeout_seconds, 1..=300)
            .map_err(|e| bad("header_timeout_seconds", e))?;
        in_range(self.idle_timeout_seconds, 1..=3600)
            .map_err(|e| bad("idle_timeout_seconds", e))?;
        in_range(self.max_connections, 1..=65_536).map_err(|e| bad("max_connections", e))?;
        in_range(self.max_header_bytes, 1024..=1_048_576)
            .map_err(|e| bad("max_header_bytes", e))?;
        Ok(())
    }
}

/// Sampling rates and limits.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Sampling {
    /// Continuous sampling rate, per CPU.
    pub frequency_hz: u64,
    /// Rate of on-demand captures (`/flamegraph?seconds=N`).
    pub on_demand_frequency_hz: u64,
    /// Longest on-demand capture accepted.
    pub max_capture_seconds: u64,
    /// On-demand captures running at once; more are refused with 429.
    pub max_concurrent_captures: usize,
    /// How long continuously collected stacks are kept for `/flamegraph` without `seconds`.
    pub retention_seconds: u64,
    /// Upper bound on retained stacks (oldest dropped first).
    pub max_retained_samples: usize,
    /// Continuous off-CPU (blocked time) profiling.
    pub offcpu: OffCpu,
    /// On-demand Lua memory captures (`/flamegraph?mode=alloc|live`).
    pub memory: LuaMemory,
    /// Event-loop stalls (`apisix_profiler_event_loop_*`, `/flamegraph?mode=stalls`).
    pub stalls: Stalls,
}

/// Event-loop stalls: a worker's loop iteration (from a return of `epoll_wait` to its next
/// entry) at least this long is a stall, counted in `apisix_profiler_event_loop_stalls_total`,
/// logged, and its CPU samples kept for `/flamegraph?mode=stalls`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Stalls {
    /// Whether the daemon times the event loops (it hooks the entry and exit of every system
    /// call of the host while it runs).
    pub enabled: bool,
    /// Shortest iteration that counts as a stall, in milliseconds.
    pub threshold_ms: u64,
}

impl Default for Stalls {
    fn default() -> Self {
        Self {
            enabled: true,
            threshold_ms: 100,
        }
    }
}

/// On-demand Lua memory captures: allocated bytes (`mode=alloc`) and sampled blocks still
/// allocated at the end (`mode=live`), from probes on each target's Lua allocator that exist
/// only for the capture. The heap size gauge (`apisix_profiler_lua_memory_bytes`) needs no
/// setting.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LuaMemory {
    /// Mean allocated bytes between two sampled stacks (`&sample_bytes=N` overrides it).
    pub sample_bytes: u64,
    /// Least time between the starts of two such captures (they slow the targets down while
    /// they run); one asked for sooner gets 429 with `Retry-After`. 0: no limit.
    pub min_interval_seconds: u64,
}

impl Default for LuaMemory {
    fn default() -> Self {
        Self {
            sample_bytes: ranges::DEFAULT_SAMPLE_BYTES,
            min_interval_seconds: 60,
        }
    }
}

/// Continuous off-CPU profiling: feeds `apisix_profiler_lua_function_offcpu_seconds_total`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct OffCpu {
    /// Off by default: it hooks every context switch and system call exit of the host.
    pub enabled: bool,
    /// Blocks shorter than this are dropped in the kernel (also the default of on-demand
    /// off-CPU captures).
    pub min_block_us: u64,
}

impl Default for OffCpu {
    fn default() -> Self {
        Self {
            enabled: false,
            min_block_us: 1000,
        }
    }
}

/// Prometheus metrics.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Metrics {
    /// Distinct Lua functions (and, separately, C functions) per target with their own
    /// series; the rest are counted under `function="[other]"`.
    pub top_functions: usize,
}

/// What to profile.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Discovery {
    /// Seconds between two scans of `/proc` (Docker events trigger a scan at once).
    pub interval_seconds: u64,
    /// Process names (globs over `/proc/PID/comm`) of OpenResty/nginx processes.
    pub process_names: Vec<String>,
    /// Profile only worker processes (not the master, cache manager or loader).
    pub workers_only: bool,
    /// Processes of the host (outside containers).
    pub host: bool,
    /// Processes always profiled, whatever their name.
    pub pids: Vec<u32>,
    pub docker: Docker,
}

/// Docker containers.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Docker {
    /// Follow containers through the Docker API.
    pub enabled: bool,
    /// The Docker API socket.
    pub socket: String,
    /// Container name globs; empty: any name.
    pub names: Vec<String>,
    /// Image globs; a container whose image matches is profiled.
    pub images: Vec<String>,
    /// Labels every selected container must carry (value globs).
    pub labels: BTreeMap<String, String>,
    /// Also profile containers whose image does not match but whose processes load LuaJIT.
    pub any_luajit: bool,
}

impl Default for Http {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:9464".to_owned(),
            profiling_endpoints: true,
            tls: HttpTls::default(),
            basic_auth_users: BTreeMap::new(),
            bearer_token_file: String::new(),
            capture_users: Vec::new(),
            healthz_without_auth: true,
            header_timeout_seconds: 5,
            idle_timeout_seconds: 120,
            max_connections: 1024,
            max_header_bytes: 16_384,
        }
    }
}

impl Default for Sampling {
    fn default() -> Self {
        Self {
            frequency_hz: 19,
            on_demand_frequency_hz: 99,
            max_capture_seconds: 120,
            max_concurrent_captures: 2,
            retention_seconds: 300,
            max_retained_samples: 200_000,
            offcpu: OffCpu::default(),
            memory: LuaMemory::default(),
            stalls: Stalls::default(),
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self { top_functions: 50 }
    }
}

impl Default for Discovery {
    fn default() -> Self {
        Self {
            interval_seconds: 2,
            process_names: vec!["nginx".to_owned(), "openresty".to_owned()],
            workers_only: true,
            host: true,
            pids: Vec::new(),
            docker: Docker::default(),
        }
    }
}

impl Default for Docker {
    fn default() -> Self {
        Self {
            enabled: true,
            socket: "/var/run/docker.sock".to_owned(),
            names: Vec::new(),
            images: vec!["apache/apisix*".to_owned()],
            labels: BTreeMap::new(),
            any_luajit: true,
        }
    }
}

impl Config {
    /// Loads and validates `path`, or the defaults without one.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        let Some(path) = path else {
            let config = Self::default();
            config.validate("defaults")?;
            return Ok(config);
        };
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: shown.clone(),
            source,
        })?;
        Self::parse(&text, &shown)
    }

    /// Parses and validates YAML text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Self, ConfigError> {
        // An empty file is an empty mapping: all defaults.
        let config: Self = if text.trim().is_empty() {
            Self::default()
        } else {
            let de = serde_yaml::Deserializer::from_str(text);
            serde_path_to_error::deserialize(de).map_err(|e| {
                let field = e.path().to_string();
                let inner = e.into_inner();
                let location = inner
                    .location()
                    .map(|l| format!(" (line {}, column {})", l.line(), l.column()))
                    .unwrap_or_default();
                ConfigError::Parse {
                    path: origin.to_owned(),
                    field: if field == "." {
                        "(top level)".to_owned()
                    } else {
                        field
                    },
                    message: format!("{inner}{location}"),
                }
            })?
        };
        config.validate(origin)?;
        Ok(config)
    }

    /// Checks ranges and consistency; the first problem is returned.
    pub fn validate(&self, origin: &str) -> Result<(), ConfigError> {
        let bad = |field: &str, message: String| ConfigError::Invalid {
            path: origin.to_owned(),
            field: field.to_owned(),
            message,
        };
        self.listen_addr().map_err(|e| bad("http.listen", e))?;
        self.http
            .check()
            .map_err(|(field, message)| bad(&field, message))?;
        self.limits
            .check()
            .map_err(|(field, message)| bad(&field, message))?;
        let s = &self.sampling;
        in_range(s.frequency_hz, ranges::FREQUENCY_HZ)
            .map_err(|e| bad("sampling.frequency_hz", e))?;
        in_range(s.on_demand_frequency_hz, ranges::FREQUENCY_HZ)
            .map_err(|e| bad("sampling.on_demand_frequency_hz", e))?;
        in_range(s.max_capture_seconds, ranges::MAX_CAPTURE_SECONDS)
            .map_err(|e| bad("sampling.max_capture_seconds", e))?;
        in_range(s.max_concurrent_captures, 1..=16)
            .map_err(|e| bad("sampling.max_concurrent_captures", e))?;
        in_range(s.retention_seconds, 1..=86_400)
            .map_err(|e| bad("sampling.retention_seconds", e))?;
        in_range(s.max_retained_samples, 1000..=10_000_000)
            .map_err(|e| bad("sampling.max_retained_samples", e))?;
        in_range(s.offcpu.min_block_us, ranges::MIN_BLOCK_US)
            .map_err(|e| bad("sampling.offcpu.min_block_us", e))?;
        in_range(s.stalls.threshold_ms, ranges::STALL_THRESHOLD_MS)
            .map_err(|e| bad("sampling.stalls.threshold_ms", e))?;
        in_range(s.memory.sample_bytes, ranges::SAMPLE_BYTES)
            .map_err(|e| bad("sampling.memory.sample_bytes", e))?;
        in_range(s.memory.min_interval_seconds, 0..=86_400)
            .map_err(|e| bad("sampling.memory.min_interval_seconds", e))?;
        in_range(self.metrics.top_functions, 1..=10_000)
            .map_err(|e| bad("metrics.top_functions", e))?;
        let d = &self.discovery;
        in_range(d.interval_seconds, 1..=300).map_err(|e| bad("discovery.interval_seconds", e))?;
        check_globs(&d.process_names).map_err(|e| bad("discovery.process_names", e))?;
        check_globs(&d.docker.names).map_err(|e| bad("discovery.docker.names", e))?;
        check_globs(&d.docker.images).map_err(|e| bad("discovery.docker.images", e))?;
        let label_values: Vec<String> = d.docker.labels.values().cloned().collect();
        check_globs(&label_values).map_err(|e| bad("discovery.docker.labels", e))?;
        if d.pids.contains(&0) {
            return Err(bad("discovery.pids", "0 is not a process id".to_owned()));
        }
        if d.docker.enabled && !d.docker.socket.starts_with('/') {
            return Err(bad(
                "discovery.docker.socket",
                format!("{:?} is not an absolute path", d.docker.socket),
            ));
        }
        self.attribution
            .rules()
            .map_err(|(field, message)| bad(&field, message))?;
        Ok(())
    }

    /// The HTTP listen address.
    pub fn listen_addr(&self) -> Result<SocketAddr, String> {
        self.http
            .listen
            .parse()
            .map_err(|e| format!("{:?} is not an IP:PORT address ({e})", self.http.listen))
    }

    /// Time between two discovery scans.
    pub fn scan_interval(&self) -> Duration {
        Duration::from_secs(self.discovery.interval_seconds)
    }
}

/// `value` within `range`, or the message saying it is not.
/// The one range of each setting that a capture request can also give: configuration
/// validation and the capture requests of `record` and `/flamegraph` both check against
/// these.
pub mod ranges {
    use std::ops::RangeInclusive;

    /// CPU samples per second per CPU (continuous sampling, captures, `frequency=`,
    /// `--frequency`).
    pub const FREQUENCY_HZ: RangeInclusive<u64> = 1..=1000;
    /// Off-CPU: the shortest block kept, in microseconds.
    pub const MIN_BLOCK_US: RangeInclusive<u64> = 1..=10_000_000;
    /// Alloc / live: mean allocated bytes between two sampled stacks.
    pub const SAMPLE_BYTES: RangeInclusive<u64> = 1024..=(1 << 30);
    /// Alloc / live: the default of that mean.
    pub const DEFAULT_SAMPLE_BYTES: u64 = 512 * 1024;
    /// `sampling.max_capture_seconds`: the longest capture the daemon runs.
    pub const MAX_CAPTURE_SECONDS: RangeInclusive<u64> = 1..=3600;
    /// `record --duration`.
    pub const RECORD_SECONDS: RangeInclusive<u64> = 1..=86_400;
    /// Stalls: the shortest event-loop iteration that is one, in milliseconds
    /// (`sampling.stalls.threshold_ms`, `record --stall-threshold-ms`).
    pub const STALL_THRESHOLD_MS: RangeInclusive<u64> = 1..=60_000;
}

fn in_range<T: PartialOrd + std::fmt::Display + std::fmt::Debug>(
    value: T,
    range: std::ops::RangeInclusive<T>,
) -> Result<(), String> {
    if range.contains(&value) {
        Ok(())
    } else {
        Err(format!("{value} is outside {range:?}"))
    }
}

fn check_globs(globs: &[String]) -> Result<(), String> {
    for g in globs {
        globset::Glob::new(g).map_err(|e| format!("{g:?}: {e}"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> String {
        match Config::parse(text, "test.yaml") {
            Ok(c) => panic!("accepted {text:?}: {c:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn example_file_equals_the_defaults() {
        let text = include_str!("../../config.example.yaml");
        let parsed = match Config::parse(text, "config.example.yaml") {
            Ok(c) => c,
            Err(e) => panic!("config.example.yaml: {e}"),
        };
        assert_eq!(parsed, Config::default());
    }

    #[test]
    fn empty_file_is_the_defaults() {
        assert!(matches!(Config::parse("", "x"), Ok(c) if c == Config::default()));
        assert!(matches!(Config::parse("{}\n", "x"), Ok(c) if c == Config::default()));
    }

    #[test]
    fn partial_file_keeps_other_defaults() {
        let c = match Config::parse("sampling:\n  frequency_hz: 49\n", "x") {
            Ok(c) => c,
            Err(e) => panic!("{e}"),
        };
        assert_eq!(c.sampling.frequency_hz, 49);
        assert_eq!(c.sampling.on_demand_frequency_hz, 99);
        assert_eq!(c.http.listen, "127.0.0.1:9464");
    }

    #[test]
    fn unknown_field_names_its_path() {
        let e = err("sampling:\n  frequncy_hz: 10\n");
        assert!(e.contains("test.yaml"), "{e}");
        assert!(e.contains("sampling"), "{e}");
        assert!(e.contains("frequncy_hz"), "{e}");
        let e = err("discovery:\n  docker:\n    sockett: /x\n");
        assert!(e.contains("discovery.docker"), "{e}");
        assert!(e.contains("sockett"), "{e}");
    }

    #[test]
    fn wrong_type_names_the_field() {
        let e = err("sampling:\n  frequency_hz: fast\n");
        assert!(e.contains("sampling.frequency_hz"), "{e}");
        let e = err("discovery:\n  pids: [1, two]\n");
        assert!(e.contains("discovery.pids"), "{e}");
    }

    #[test]
    fn bad_values_name_the_field() {
        let e = err("http:\n  listen: localhost\n");
        assert!(e.contains("http.listen"), "{e}");
        let e = err("sampling:\n  frequency_hz: 0\n");
        assert!(e.contains("sampling.frequency_hz"), "{e}");
        assert!(e.contains("0 is outside 1..=1000"), "{e}");
        assert!(e.contains("test.yaml"), "the file is named: {e}");
        let e = err("discovery:\n  docker:\n    images: ['[']\n");
        assert!(e.contains("discovery.docker.images"), "{e}");
        let e = err("discovery:\n  docker:\n    socket: relative.sock\n");
        assert!(e.contains("discovery.docker.socket"), "{e}");
        let e = err("sampling:\n  memory:\n    sample_bytes: 10\n");
        assert!(e.contains("sampling.memory.sample_bytes"), "{e}");
        let e = err("limits:\n  proto_cache_bytes: 10\n");
        assert!(e.contains("limits.proto_cache_bytes"), "{e}");
        let e = err("limits:\n  trace_cache: 10\n");
        assert!(e.contains("trace_cache"), "{e}");
        let e = err("http:\n  capture_users: [nobody]\n");
        assert!(e.contains("http.capture_users"), "{e}");
    }

    #[test]
    fn http_security_fields() {
        // `echo hello | apisix-agent hash-password --cost 4`
        let hash = "$2b$04$ydjjwXrCnCPYUNLN0pF6BuFHU9jtlld1JS6dVX6XErZXqgnv65jKK";
        let c = match Config::parse(
            &format!(
                "http:\n  listen: 0.0.0.0:9464\n  profiling_endpoints: false\n  tls:\n    \
                 cert_file: /etc/a/tls.crt\n    key_file: /etc/a/tls.key\n    \
                 client_ca_file: /etc/a/ca.crt\n  basic_auth_users:\n    prometheus: '{hash}'\n  \
                 bearer_token_file: /etc/a/token\n  healthz_without_auth: false\n  \
                 header_timeout_seconds: 2\n  idle_timeout_seconds: 30\n  max_connections: 100\n  \
                 max_header_bytes: 4096\n"
            ),
            "x",
        ) {
            Ok(c) => c,
            Err(e) => panic!("{e}"),
        };
        assert!(c.http.tls.enabled());
        assert!(c.http.auth_enabled());
        assert!(!c.http.profiling_endpoints);
        assert_eq!(c.http.max_connections, 100);
        assert!(!Config::default().http.tls.enabled());
        assert!(!Config::default().http.auth_enabled());
    }

    #[test]
    fn http_security_errors_name_the_field() {
        let e = err("http:\n  tls:\n    cert_file: /a.crt\n");
        assert!(e.contains("http.tls.key_file"), "{e}");
        let e = err("http:\n  tls:\n    key_file: /a.key\n");
        assert!(e.contains("http.tls.cert_file"), "{e}");
        let e = err("http:\n  tls:\n    client_ca_file: /ca.crt\n");
        assert!(e.contains("http.tls.client_ca_file"), "{e}");
        let e = err("http:\n  basic_auth_users:\n    prometheus: plaintext\n");
        assert!(e.contains("http.basic_auth_users.prometheus"), "{e}");
        assert!(e.contains("not a bcrypt hash"), "{e}");
        let e = err(
            "http:\n  basic_auth_users:\n    'a:b': '$2b$04$ydjjwXrCnCPYUNLN0pF6BuFHU9jtlld1JS6dVX6XErZXqgnv65jKK'\n",
        );
        assert!(e.contains("http.basic_auth_users"), "{e}");
        assert!(e.contains("no ':'"), "{e}");
        // A well-formed hash with a cost bcrypt refuses (3, 32): nobody could log in.
        for cost in ["03", "32"] {
            let e = err(&format!(
                "http:\n  basic_auth_users:\n    prometheus: \
                 '$2b${cost}$ydjjwXrCnCPYUNLN0pF6BuFHU9jtlld1JS6dVX6XErZXqgnv65jKK'\n"
            ));
            assert!(e.contains("http.basic_auth_users.prometheus"), "{e}");
            let value = cost.trim_start_matches('0');
            assert!(
                e.contains(&format!("bcrypt cost {value} is outside 4..=31")),
                "{e}"
            );
        }
        for cost in ["04", "31"] {
            let yaml = format!(
                "http:\n  basic_auth_users:\n    prometheus: \
                 '$2b${cost}$ydjjwXrCnCPYUNLN0pF6BuFHU9jtlld1JS6dVX6XErZXqgnv65jKK'\n"
            );
            assert!(Config::parse(&yaml, "x").is_ok(), "cost {cost} is accepted");
        }
        let e = err("http:\n  header_timeout_seconds: 0\n");
        assert!(e.contains("http.header_timeout_seconds"), "{e}");
        let e = err("http:\n  idle_timeout_seconds: 0\n");
        assert!(e.contains("http.idle_timeout_seconds"), "{e}");
        let e = err("http:\n  max_connections: 0\n");
        assert!(e.contains("http.max_connections"), "{e}");
        let e = err("http:\n  max_header_bytes: 100\n");
        assert!(e.contains("http.max_header_bytes"), "{e}");
        let e = err("http:\n  tls:\n    certfile: /a\n");
        assert!(e.contains("http.tls"), "{e}");
        assert!(e.contains("certfile"), "{e}");
    }

    #[test]
    fn plugin_rules_are_checked() {
        let e = err(
            "attribution:\n  plugin_rules:\n    - regex: 'kong/plugins/(?P<plugin>[^/]+)/'\n    - regex: '(unclosed'\n",
        );
        assert!(e.contains("attribution.plugin_rules[1].regex"), "{e}");
        assert!(e.contains("not a valid regex"), "{e}");
        let e = err("attribution:\n  plugin_rules:\n    - regex: 'plugins/([^/]+)'\n");
        assert!(e.contains("attribution.plugin_rules[0].regex"), "{e}");
        assert!(e.contains("no named capture `plugin`"), "{e}");
        let e = err("attribution:\n  plugin_rules:\n    - regx: x\n");
        assert!(e.contains("attribution.plugin_rules"), "{e}");
        let c = match Config::parse(
            "attribution:\n  default_rules: false\n  plugin_rules:\n    - regex: '/gw/(?P<plugin>[a-z]+)\\.lua$'\n",
            "x",
        ) {
            Ok(c) => c,
            Err(e) => panic!("{e}"),
        };
        let rules = match c.attribution.rules() {
            Ok(r) => r,
            Err(e) => panic!("{e:?}"),
        };
        assert_eq!(
            rules.plugin_of_file("/gw/auth.lua").as_deref(),
            Some("auth")
        );
        assert_eq!(rules.plugin_of_file("/a/apisix/plugins/key-auth.lua"), None);
    }
}
