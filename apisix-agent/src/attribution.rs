//! APISIX-aware attribution: which plugin and which request phase a sampled stack belongs to.
//!
//! - **Phase**, from the native frames: the ngx_lua handler the sample runs under
//!   (`ngx_http_lua_access_handler` → `access`, `ngx_http_lua_header_filter_by_chunk` →
//!   `header_filter`, …; the innermost one wins, so a header filter run from inside a content
//!   handler's `ngx.say` is `header_filter`; the stream subsystem's `ngx_stream_lua_*`
//!   handlers likewise, with `preread`). Handlers that are static functions show as
//!   `ngx_http_lua_module.so+0x…` (on Debian's module: the rewrite, balancer and timer
//!   handlers); then the outermost Lua frame, when it is an inline block's main chunk
//!   (`[main]@rewrite_by_lua(nginx.conf:17):0`), names the phase, and a Lua thread run from
//!   nginx's timer expiry (`ngx_event_expire_timers`) with neither is a `timer` (a timer
//!   callback defined in `init_worker_by_lua` is a function of that chunk, not its main
//!   chunk). `none` when the sample is in no ngx_lua handler and no Lua runs, `unknown` when
//!   Lua runs but nothing names the phase. Limit: a `*_by_lua_file` handler resumed from a
//!   timer (after `ngx.sleep` in the content phase) counts as `timer`.
//! - **Plugin**, from the Lua frames (`NAME@FILE:LINE`). First the gateway's own name: a
//!   frame whose function the plugin map ([`crate::plugin_map`]) found in a loaded APISIX
//!   plugin module is labelled `[PLUGIN]NAME@FILE:LINE` ([`gateway_function`]), PLUGIN being
//!   the module's `name` as APISIX's runner uses it; the innermost such frame names the
//!   plugin, and plugin files' frames inside it do not override it (so
//!   `serverless-pre-function` and `serverless-post-function`, one factory file, are two
//!   plugins). Without one, the fallback: [`Rules`], regexes on FILE with a named capture
//!   `plugin` (defaults: APISIX `apisix/plugins/<name>.lua` and `apisix/plugins/<name>/…`,
//!   Kong `kong/plugins/<name>/…`), the innermost matching frame winning. Either way core
//!   libraries a plugin calls (`apisix/core/*`, `resty.*`, `cjson`) are charged to it.
//!   Without a plugin frame: [`CORE`] when Lua runs, else the empty string. Names are
//!   sanitised ([`sanitise`]: `[A-Za-z0-9_.-]`, at most [`MAX_PLUGIN_LEN`] characters).
//!
//! Hooks: none. Metrics: none of its own; the daemon's aggregator exports
//! `apisix_profiler_plugin_cpu_seconds_total`, `apisix_profiler_phase_cpu_seconds_total` (and
//! their `_offcpu_` twins) from [`Rules::classify`].

use std::sync::Arc;

use regex::Regex;

use crate::label::{FrameClass, classify as classify_frame};

/// The plugin of Lua samples that run in no plugin.
pub const CORE: &str = "[core]";

/// Longest plugin name kept (longer names are cut).
pub const MAX_PLUGIN_LEN: usize = 64;

/// The built-in rule for APISIX plugins: `apisix/plugins/<name>.lua` and files under
/// `apisix/plugins/<name>/`.
pub const APISIX_RULE: &str = r"(?:^|/)apisix/plugins/(?P<plugin>[^/]+?)(?:\.lua)?(?:/|$)";

/// The built-in rule for Kong plugins: files under `kong/plugins/<name>/`.
pub const KONG_RULE: &str = r"(?:^|/)kong/plugins/(?P<plugin>[^/]+)/";

/// The function part of the label of a frame the gateway names: `[PLUGIN]NAME`.
pub fn gateway_function(plugin: &str, name: &str) -> String {
    format!("[{}]{name}", sanitise(plugin))
}

/// The plugin of a frame's function part made by [`gateway_function`]: a sanitised
/// non-empty name in brackets followed by a non-empty function name. (The namer never lets a
/// name from the bytecode open with `[`; `[main]` has no name after it.)
pub fn gateway_plugin(function: &str) -> Option<&str> {
    let (plugin, name) = function.strip_prefix('[')?.split_once(']')?;
    (!plugin.is_empty() && !name.is_empty() && sanitise(plugin) == plugin).then_some(plugin)
}

/// Errors of compiling plugin rules.
#[derive(Debug, thiserror::Error)]
pub enum AttributionError {
    /// The regex does not compile.
    #[error("{regex:?} is not a valid regex")]
    BadRegex {
        /// The rule as written.
        regex: String,
        #[source]
        source: regex::Error,
    },
    /// The regex has no named capture `plugin`.
    #[error("{regex:?} has no named capture `plugin` (write `(?P<plugin>…)`)")]
    NoPluginCapture {
        /// The rule as written.
        regex: String,
    },
}

/// The request phase a sample runs in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Phase {
    /// In no ngx_lua handler, no Lua running.
    None,
    Rewrite,
    Access,
    /// The stream subsystem's `preread_by_lua`.
    Preread,
    Content,
    HeaderFilter,
    BodyFilter,
    Log,
    Balancer,
    SslCertificate,
    SslClientHello,
    Timer,
    InitWorker,
    /// Lua runs, but no frame names the phase.
    Unknown,
}

impl Phase {
    /// Every phase, in the order above.
    pub const ALL: [Phase; 14] = [
        Phase::None,
        Phase::Rewrite,
        Phase::Access,
        Phase::Preread,
        Phase::Content,
        Phase::HeaderFilter,
        Phase::BodyFilter,
        Phase::Log,
        Phase::Balancer,
        Phase::SslCertificate,
        Phase::SslClientHello,
        Phase::Timer,
        Phase::InitWorker,
        Phase::Unknown,
    ];

    /// The label value.
    pub fn name(self) -> &'static str {
        match self {
            Phase::None => "none",
            Phase::Rewrite => "rewrite",
            Phase::Access => "access",
            Phase::Preread => "preread",
            Phase::Content => "content",
            Phase::HeaderFilter => "header_filter",
            Phase::BodyFilter => "body_filter",
            Phase::Log => "log",
            Phase::Balancer => "balancer",
            Phase::SslCertificate => "ssl_certificate",
            Phase::SslClientHello => "ssl_client_hello",
            Phase::Timer => "timer",
            Phase::InitWorker => "init_worker",
            Phase::Unknown => "unknown",
        }
    }

    /// The phase named `name` (as [`Self::name`] writes it).
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.name() == name)
    }

    /// The phase of a native ngx_lua frame (http or stream subsystem), if it is a phase
    /// handler.
    fn of_native(function: &str) -> Option<Self> {
        let f = function
            .strip_prefix("ngx_http_lua_")
            .or_else(|| function.strip_prefix("ngx_stream_lua_"))?;
        // Longest prefixes first where one is the prefix of another.
        const TABLE: [(&str, Phase); 15] = [
            ("server_rewrite_", Phase::Rewrite),
            ("rewrite_handler", Phase::Rewrite),
            ("rewrite_by_chunk", Phase::Rewrite),
            ("access_handler", Phase::Access),
            ("access_by_chunk", Phase::Access),
            ("preread_", Phase::Preread),
            ("content_", Phase::Content),
            ("header_filter", Phase::HeaderFilter),
            ("body_filter", Phase::BodyFilter),
            ("log_handler", Phase::Log),
            ("log_by_chunk", Phase::Log),
            ("balancer_", Phase::Balancer),
            ("ssl_cert_", Phase::SslCertificate),
            ("ssl_client_hello_", Phase::SslClientHello),
            ("init_worker", Phase::InitWorker),
        ];
        if f.starts_with("timer_handler") {
            return Some(Phase::Timer);
        }
        TABLE
            .iter()
            .find(|(prefix, _)| f.starts_with(prefix))
            .map(|(_, p)| *p)
    }

    /// The phase of an inline chunk's file name (`access_by_lua(nginx.conf:17)`).
    fn of_chunk(file: &str) -> Option<Self> {
        let (directive, rest) = file.split_once("_by_lua")?;
        if !(rest.starts_with('(') || rest.is_empty()) {
            return None;
        }
        Some(match directive {
            "rewrite" | "server_rewrite" => Phase::Rewrite,
            "access" => Phase::Access,
            "preread" => Phase::Preread,
            "content" => Phase::Content,
            "header_filter" => Phase::HeaderFilter,
            "body_filter" => Phase::BodyFilter,
            "log" => Phase::Log,
            "balancer" => Phase::Balancer,
            "ssl_certificate" => Phase::SslCertificate,
            "ssl_client_hello" => Phase::SslClientHello,
            "init_worker" => Phase::InitWorker,
            _ => return None,
        })
    }
}

/// Plugin and phase of one sample.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Attribution {
    /// The sanitised plugin name, [`CORE`] for Lua outside plugins, empty without Lua.
    pub plugin: String,
    pub phase: Phase,
}

/// Plugin rules, compiled.
#[derive(Debug, Clone)]
pub struct Rules {
    rules: Vec<Regex>,
}

impl Default for Rules {
    /// The built-in APISIX and Kong rules.
    fn default() -> Self {
        match Self::new(&[] as &[&str], true) {
            Ok(r) => r,
            // The built-in rules are constants checked by a unit test.
            Err(e) => unreachable!("built-in plugin rule: {e}"),
        }
    }
}

impl Rules {
    /// `custom` rules (tried first, in order), then the built-in ones when `defaults`.
    pub fn new(custom: &[impl AsRef<str>], defaults: bool) -> Result<Self, AttributionError> {
        let builtin: &[&str] = if defaults {
            &[APISIX_RULE, KONG_RULE]
        } else {
            &[]
        };
        let mut rules = Vec::new();
        for r in custom
            .iter()
            .map(AsRef::as_ref)
            .chain(builtin.iter().copied())
        {
            rules.push(Self::compile(r)?);
        }
        Ok(Self { rules })
    }

    /// Compiles one rule, checking it has a `plugin` capture.
    pub fn compile(regex: &str) -> Result<Regex, AttributionError> {
        let re = Regex::new(regex).map_err(|source| AttributionError::BadRegex {
            regex: regex.to_owned(),
            source,
        })?;
        if !re.capture_names().any(|n| n == Some("plugin")) {
            return Err(AttributionError::NoPluginCapture {
                regex: regex.to_owned(),
            });
        }
        Ok(re)
    }

    /// The plugin a Lua source file belongs to, if any rule matches with a non-empty name.
    pub fn plugin_of_file(&self, file: &str) -> Option<String> {
        self.rules.iter().find_map(|re| {
            let name = re.captures(file)?.name("plugin")?.as_str();
            let name = sanitise(name);
            (!name.is_empty()).then_some(name)
        })
    }

    /// The plugin and phase of a stack (root first, labels of
    /// [`crate::stacks::StackBuilder`]).
    pub fn classify(&self, stack: &[Arc<str>]) -> Attribution {
        let mut native_phase = None;
        // The phase named by the outermost Lua source frame, when it is an inline block's
        // main chunk (`[main]@access_by_lua(nginx.conf:17)`); a function defined in a block
        // and run later (a timer callback from init_worker_by_lua) does not count.
        let mut chunk_phase = None;
        let mut outermost_seen = false;
        let mut lua = false;
        let mut timers = false;
        let mut plugin = None;
        // Whether `plugin` is the gateway's name (file rules inside it do not override it).
        let mut gateway = false;
        for label in stack {
            match classify_frame(label) {
                FrameClass::Lua { function, file, .. } => {
                    lua = true;
                    if !outermost_seen && !file.is_empty() && file != "[builtin]" {
                        outermost_seen = true;
                        if function == "[main]" {
                            chunk_phase = Phase::of_chunk(file);
                        }
                    }
                    if let Some(p) = gateway_plugin(function) {
                        plugin = Some(p.to_owned());
                        gateway = true;
                    } else if !gateway
                        && !file.is_empty()
                        && file != "[builtin]"
                        && let Some(p) = self.plugin_of_file(file)
                    {
                        plugin = Some(p);
                    }
                }
                FrameClass::C { function } => {
                    if let Some(p) = Phase::of_native(function) {
                        native_phase = Some(p);
                    } else if function == "ngx_event_expire_timers" {
                        timers = true;
                    }
                }
                FrameClass::Kernel => {}
            }
        }
        let phase = native_phase.or(chunk_phase).unwrap_or(if !lua {
            Phase::None
        } else if timers {
            Phase::Timer
        } else {
            Phase::Unknown
        });
        let plugin = plugin.unwrap_or_else(|| if lua { CORE.to_owned() } else { String::new() });
        Attribution { plugin, phase }
    }
}

/// A plugin name as a label value: characters outside `[A-Za-z0-9_.-]` become `_`, at most
/// [`MAX_PLUGIN_LEN`] characters.
pub fn sanitise(name: &str) -> String {
    name.chars()
        .take(MAX_PLUGIN_LEN)
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// Samples per (plugin, phase) of folded stacks, most first (ties by name).
pub fn shares(rules: &Rules, folded: &crate::output::Folded) -> Vec<(Attribution, u64)> {
    let mut by: std::collections::HashMap<Attribution, u64> = std::collections::HashMap::new();
    for (stack, n) in folded.iter() {
        *by.entry(rules.classify(stack)).or_insert(0) += n;
    }
    let mut v: Vec<(Attribution, u64)> = by.into_iter().collect();
    v.sort_by(|a, b| {
        b.1.cmp(&a.1)
            .then_with(|| a.0.plugin.cmp(&b.0.plugin))
            .then_with(|| a.0.phase.cmp(&b.0.phase))
    });
    v
}

/// A filter on stacks by plugin and phase (`/flamegraph?plugin=&phase=`, `record --plugin
/// --phase`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    pub plugin: Option<String>,
    pub phase: Option<Phase>,
}

impl Filter {
    /// Whether no filter applies.
    pub fn is_empty(&self) -> bool {
        self.plugin.is_none() && self.phase.is_none()
    }

    /// Whether `a` passes.
    pub fn keeps(&self, a: &Attribution) -> bool {
        self.plugin.as_ref().is_none_or(|p| *p == a.plugin)
            && self.phase.is_none_or(|p| p == a.phase)
    }

    /// The stacks of `folded` that pass.
    pub fn apply(&self, rules: &Rules, folded: &crate::output::Folded) -> crate::output::Folded {
        if self.is_empty() {
            return folded.clone();
        }
        let mut out = crate::output::Folded::new();
        for (stack, n) in folded.iter() {
            if self.keeps(&rules.classify(stack)) {
                out.add(stack.to_vec(), n);
            }
        }
        out
    }

    /// How the filter reads in a title: `plugin=key-auth phase=access`.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if let Some(p) = &self.plugin {
            parts.push(format!("plugin={p}"));
        }
        if let Some(p) = self.phase {
            parts.push(format!("phase={}", p.name()));
        }
        parts.join(" ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stack(frames: &[&str]) -> Vec<Arc<str>> {
        frames.iter().map(|f| Arc::from(*f)).collect()
    }

    /// The native frames of a worker running an access_by_lua_block, as `record` shows them.
    const ACCESS: [&str; 9] = [
        "main",
        "ngx_master_process_cycle",
        "ngx_process_events_and_timers",
        "ngx_epoll_process_events",
        "ngx_http_core_run_phases",
        "ngx_http_core_access_phase",
        "ngx_http_lua_access_handler",
        "ngx_http_lua_module.so+0x2d7a1",
        "lj_vm_call",
    ];

    fn with(native: &[&str], lua: &[&str]) -> Vec<Arc<str>> {
        stack(&[native, lua].concat())
    }

    #[test]
    fn builtin_rules_compile() {
        assert!(Rules::compile(APISIX_RULE).is_ok());
        assert!(Rules::compile(KONG_RULE).is_ok());
        assert_eq!(Rules::default().rules.len(), 2);
    }

    #[test]
    fn innermost_plugin_frame_owns_the_sample() {
        let rules = Rules::default();
        let s = with(
            &ACCESS,
            &[
                "[main]@access_by_lua(nginx.conf:17):0",
                "http_access_phase@/usr/local/apisix/apisix/init.lua:400",
                "run_plugin@/usr/local/apisix/apisix/plugin.lua:1100",
                "_M.rewrite@/usr/local/apisix/apisix/plugins/key-auth.lua:90",
                "fetch@/usr/local/apisix/apisix/core/table.lua:12",
                "encode@/usr/local/share/lua/5.1/resty/sha.lua:3",
                "builtin:string.byte",
            ],
        );
        assert_eq!(
            rules.classify(&s),
            Attribution {
                plugin: "key-auth".into(),
                phase: Phase::Access
            }
        );
        // A directory plugin.
        let s = with(
            &ACCESS,
            &[
                "run_plugin@/usr/local/apisix/apisix/plugin.lua:1100",
                "_M.access@/usr/local/apisix/apisix/plugins/limit-count/init.lua:300",
                "incoming@/usr/local/apisix/apisix/plugins/limit-count/limit-count-local.lua:20",
            ],
        );
        assert_eq!(rules.classify(&s).plugin, "limit-count");
        // A plugin calling a plugin's helpers: the innermost wins.
        let s = with(
            &ACCESS,
            &[
                "_M.access@/a/apisix/plugins/openid-connect.lua:10",
                "check@/a/apisix/plugins/jwt-auth.lua:5",
            ],
        );
        assert_eq!(rules.classify(&s).plugin, "jwt-auth");
    }

    #[test]
    fn core_and_no_lua() {
        let rules = Rules::default();
        let s = with(
            &ACCESS,
            &[
                "http_access_phase@/a/apisix/init.lua:400",
                "match@/a/apisix/http/router/radixtree_uri.lua:30",
            ],
        );
        assert_eq!(
            rules.classify(&s),
            Attribution {
                plugin: CORE.into(),
                phase: Phase::Access
            }
        );
        // apisix/plugin.lua is the runner, not a plugin.
        let s = with(&ACCESS, &["run_plugin@/a/apisix/plugin.lua:1100"]);
        assert_eq!(rules.classify(&s).plugin, CORE);
        let s = stack(&[
            "main",
            "ngx_process_events_and_timers",
            "ngx_epoll_process_events",
            "epoll_wait",
            "do_syscall_64_[k]",
        ]);
        assert_eq!(
            rules.classify(&s),
            Attribution {
                plugin: String::new(),
                phase: Phase::None
            }
        );
    }

    #[test]
    fn phases_from_native_frames() {
        let rules = Rules::default();
        let cases = [
            ("ngx_http_lua_rewrite_handler", Phase::Rewrite),
            ("ngx_http_lua_server_rewrite_handler", Phase::Rewrite),
            ("ngx_http_lua_access_handler", Phase::Access),
            ("ngx_http_lua_content_handler", Phase::Content),
            ("ngx_http_lua_content_by_chunk", Phase::Content),
            ("ngx_http_lua_header_filter_by_chunk", Phase::HeaderFilter),
            ("ngx_http_lua_body_filter_by_chunk", Phase::BodyFilter),
            ("ngx_http_lua_log_handler", Phase::Log),
            ("ngx_http_lua_balancer_handler_inline", Phase::Balancer),
            ("ngx_http_lua_ssl_cert_handler", Phase::SslCertificate),
            (
                "ngx_http_lua_ssl_client_hello_handler",
                Phase::SslClientHello,
            ),
            ("ngx_http_lua_init_worker", Phase::InitWorker),
            ("ngx_http_lua_init_worker_by_inline", Phase::InitWorker),
        ];
        for (f, want) in cases {
            let s = stack(&["main", f, "lj_vm_call", "f@/x.lua:1"]);
            assert_eq!(rules.classify(&s).phase, want, "{f}");
        }
        // The stream subsystem (APISIX stream routes): same names under ngx_stream_lua_.
        for (f, want) in [
            ("ngx_stream_lua_preread_handler", Phase::Preread),
            ("ngx_stream_lua_content_handler", Phase::Content),
            ("ngx_stream_lua_log_handler", Phase::Log),
            ("ngx_stream_lua_balancer_handler_inline", Phase::Balancer),
        ] {
            let s = stack(&["main", f, "lj_vm_call", "f@/x.lua:1"]);
            assert_eq!(rules.classify(&s).phase, want, "{f}");
        }
        assert_eq!(
            Phase::of_chunk("preread_by_lua(nginx.conf:9)"),
            Some(Phase::Preread)
        );
        // An FFI call from Lua is not a phase handler.
        assert_eq!(
            Phase::of_native("ngx_http_lua_ffi_balancer_set_current_peer"),
            None
        );
        // The innermost handler wins: a header filter run by ngx.say in a content handler.
        let s = stack(&[
            "main",
            "ngx_http_lua_content_handler",
            "[main]@content_by_lua(nginx.conf:30):0",
            "builtin:ngx.say",
            "ngx_http_send_header",
            "ngx_http_lua_header_filter_by_chunk",
            "[main]@header_filter_by_lua(nginx.conf:31):0",
        ]);
        assert_eq!(rules.classify(&s).phase, Phase::HeaderFilter);
    }

    #[test]
    fn phases_from_chunks_and_timers() {
        let rules = Rules::default();
        // Static handlers show as module offsets; the chunk names the phase.
        for (chunk, want) in [
            (
                "[main]@header_filter_by_lua(nginx.conf:20):0",
                Phase::HeaderFilter,
            ),
            ("[main]@log_by_lua(nginx.conf:21):0", Phase::Log),
            (
                "[main]@body_filter_by_lua(nginx.conf:22):0",
                Phase::BodyFilter,
            ),
            ("[main]@balancer_by_lua(nginx.conf:23):0", Phase::Balancer),
            (
                "[main]@init_worker_by_lua(nginx.conf:3):0",
                Phase::InitWorker,
            ),
        ] {
            let s = stack(&[
                "main",
                "ngx_http_lua_module.so+0x40a0c",
                "lj_vm_call",
                chunk,
            ]);
            assert_eq!(rules.classify(&s).phase, want, "{chunk}");
        }
        let s = stack(&[
            "main",
            "ngx_process_events_and_timers",
            "ngx_event_expire_timers",
            "ngx_http_lua_module.so+0x47f10",
            "lua_resume",
            "sync@/a/apisix/core/config_etcd.lua:100",
        ]);
        assert_eq!(rules.classify(&s).phase, Phase::Timer);
        // A real timer stack (ngx.timer.every from init_worker_by_lua_block): the handler is
        // a static function and the callback was defined in the init_worker chunk.
        let s = stack(&[
            "main",
            "ngx_master_process_cycle",
            "ngx_spawn_process",
            "ngx_process_events_and_timers",
            "ngx_event_expire_timers",
            "ngx_http_lua_module.so+0x4733e",
            "ngx_http_lua_run_thread",
            "anonymous@init_worker_by_lua(nginx.conf:14):3",
            "burn@/tmp/lua/burn.lua:2",
        ]);
        assert_eq!(rules.classify(&s).phase, Phase::Timer);
        // content_by_lua resumed after ngx.sleep: through the timers too, but the chunk
        // says content.
        let s = stack(&[
            "main",
            "ngx_event_expire_timers",
            "ngx_http_lua_module.so+0x35e10",
            "ngx_http_lua_run_thread",
            "[main]@content_by_lua(nginx.conf:30):0",
        ]);
        assert_eq!(rules.classify(&s).phase, Phase::Content);
        let s = stack(&["main", "lua_pcall", "f@/a/x.lua:1"]);
        assert_eq!(rules.classify(&s).phase, Phase::Unknown);
        assert_eq!(Phase::of_chunk("/a/content_by_lua_helpers.lua"), None);
    }

    #[test]
    fn custom_rules_come_first() {
        let kong = stack(&[
            "main",
            "ngx_http_lua_access_handler",
            "execute@/usr/local/share/lua/5.1/kong/init.lua:900",
            "handler@/usr/local/share/lua/5.1/kong/plugins/rate-limiting/handler.lua:60",
            "get_usage@/usr/local/share/lua/5.1/kong/plugins/rate-limiting/policies/init.lua:5",
        ]);
        assert_eq!(Rules::default().classify(&kong).plugin, "rate-limiting");
        // Without the built-in rules, nothing is a plugin.
        let none = match Rules::new(&[] as &[&str], false) {
            Ok(r) => r,
            Err(e) => panic!("{e}"),
        };
        assert_eq!(none.classify(&kong).plugin, CORE);
        let custom = match Rules::new(&[r"/gw/ext/(?P<plugin>[a-z-]+)\.lua$"], true) {
            Ok(r) => r,
            Err(e) => panic!("{e}"),
        };
        let s = stack(&["main", "f@/gw/ext/my-auth.lua:1", "g@/gw/lib/util.lua:3"]);
        assert_eq!(custom.classify(&s).plugin, "my-auth");
        assert_eq!(custom.classify(&kong).plugin, "rate-limiting");
    }

    #[test]
    fn the_gateway_names_its_plugins() {
        let rules = Rules::default();
        let f = |p: &str, n: &str, file: &str| format!("{}@{file}:70", gateway_function(p, n));
        let factory = "/h/apisix/plugins/serverless/init.lua";
        let pre = f("serverless-pre-function", "phase_func", factory);
        let post = f("serverless-post-function", "phase_func", factory);
        assert_eq!(
            pre,
            format!("[serverless-pre-function]phase_func@{factory}:70")
        );
        for (label, want) in [
            (&pre, "serverless-pre-function"),
            (&post, "serverless-post-function"),
        ] {
            let s = with(
                &ACCESS,
                &[
                    "run_plugin@/h/apisix/plugin.lua:1100",
                    label,
                    "load_funcs@/h/apisix/plugins/serverless/init.lua:60",
                    "fetch@/h/apisix/core/lrucache.lua:12",
                    "anonymous@[string \"return function(conf, ctx) ...\"]:1",
                ],
            );
            assert_eq!(rules.classify(&s).plugin, want);
        }
        // Another plugin's file inside: still the plugin the runner runs; an inner named
        // frame wins over an outer one.
        let s = with(
            &ACCESS,
            &[
                &f(
                    "openid-connect",
                    "phase_func",
                    "/a/apisix/plugins/openid-connect.lua",
                ),
                "check@/a/apisix/plugins/jwt-auth.lua:5",
            ],
        );
        assert_eq!(rules.classify(&s).plugin, "openid-connect");
        let s = with(
            &ACCESS,
            &[
                &f(
                    "openid-connect",
                    "phase_func",
                    "/a/apisix/plugins/openid-connect.lua",
                ),
                &f("jwt-auth", "verify", "/a/apisix/plugins/jwt-auth.lua"),
            ],
        );
        assert_eq!(rules.classify(&s).plugin, "jwt-auth");
        // Not gateway names: `[main]`, a bracket without a function name, odd characters.
        assert_eq!(gateway_plugin("[main]"), None);
        assert_eq!(gateway_plugin("[key-auth]"), None);
        assert_eq!(gateway_plugin("[a b]f"), None);
        assert_eq!(gateway_plugin("key-auth"), None);
        assert_eq!(gateway_plugin("[key-auth]f"), Some("key-auth"));
        assert_eq!(gateway_function("we ird", "f"), "[we_ird]f");
    }

    #[test]
    fn bad_rules_are_refused() {
        assert!(matches!(
            Rules::compile("(unclosed"),
            Err(AttributionError::BadRegex { .. })
        ));
        assert!(matches!(
            Rules::compile("plugins/([^/]+)"),
            Err(AttributionError::NoPluginCapture { .. })
        ));
    }

    #[test]
    fn names_are_sanitised_and_bounded() {
        assert_eq!(sanitise("key-auth"), "key-auth");
        assert_eq!(sanitise("a b\"c{d}"), "a_b_c_d_");
        assert_eq!(sanitise(&"x".repeat(300)).len(), MAX_PLUGIN_LEN);
        let rules = Rules::default();
        let s = stack(&["main", "f@/a/apisix/plugins/we ird\"name.lua:1"]);
        assert_eq!(rules.classify(&s).plugin, "we_ird_name");
    }

    #[test]
    fn filter_keeps_matching_stacks() {
        let rules = Rules::default();
        let mut folded = crate::output::Folded::new();
        folded.add(with(&ACCESS, &["a@/x/apisix/plugins/key-auth.lua:1"]), 3);
        folded.add(with(&ACCESS, &["a@/x/apisix/plugins/limit-count.lua:1"]), 5);
        folded.add(stack(&["main", "epoll_wait"]), 7);
        let f = Filter {
            plugin: Some("key-auth".into()),
            phase: None,
        };
        assert_eq!(f.apply(&rules, &folded).total(), 3);
        let f = Filter {
            plugin: None,
            phase: Some(Phase::Access),
        };
        assert_eq!(f.apply(&rules, &folded).total(), 8);
        assert_eq!(f.describe(), "phase=access");
        let f = Filter {
            plugin: Some("never-seen".into()),
            phase: None,
        };
        assert_eq!(f.apply(&rules, &folded).total(), 0);
        let s = shares(&rules, &folded);
        assert_eq!(s[0].1, 7);
        assert_eq!(s[0].0.phase, Phase::None);
        assert_eq!(s[1].0.plugin, "limit-count");
    }
}
