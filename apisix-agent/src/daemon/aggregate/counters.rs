//! The capped Prometheus counters of the continuous sampler: per-function self and inclusive
//! samples, per-plugin and per-phase seconds, samples and losses per target, by target group
//! (container + image, or the host), with bounded cardinality.
//!
//! Cardinality: per group, the first `top_functions` Lua functions and as many C functions
//! (admitted once per flush, most samples first) get their own series for good; samples of
//! any other function go to `function="[other]"`. The same holds for plugins
//! (`plugin="[other]"`). Series of groups gone for a minute are removed. Counts wait in
//! pending maps until [`Counters::flush`] (once a second) moves them into the metrics.
//!
//! The admitted plugins are published as an immutable [`PluginCaps`] after each flush, so that
//! a reader of the window ([`super::window`]) names plugins as the metrics do without holding
//! this type's lock.
//!
//! Hooks: none. Metrics: the per-function, per-plugin, per-phase and per-target families of
//! [`super::super::metrics`].

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
    time::{Duration, Instant},
};

use super::super::metrics::{
    CFunctionLabels, LabelValue, LuaFunctionLabels, Metrics, PhaseLabels, PluginLabels,
    TargetLabels, VmStateLabels,
};
use crate::{
    attribution::{Attribution, Phase, Rules},
    label::{FrameClass, classify},
};

/// The label given to functions beyond the cardinality cap.
pub const OTHER: &str = "[other]";

/// A group of targets sharing metric labels.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Group {
    pub container: String,
    pub image: String,
}

impl Group {
    /// The group of a target.
    pub fn of(target: &TargetLabels) -> Self {
        Self {
            container: target.container.as_str().to_owned(),
            image: target.image.as_str().to_owned(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct LuaKey {
    function: String,
    file: String,
    line: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct CKey {
    function: String,
    module: String,
}

impl LuaKey {
    /// The series labels of this function in `group`.
    fn labels(self, group: &Group) -> LuaFunctionLabels {
        LuaFunctionLabels {
            function: self.function.into(),
            file: self.file.into(),
            line: self.line.into(),
            container: group.container.clone().into(),
            image: group.image.clone().into(),
        }
    }

    fn other() -> Self {
        Self {
            function: OTHER.to_owned(),
            file: String::new(),
            line: String::new(),
        }
    }
}

impl CKey {
    /// The series labels of this function in `group`.
    fn labels(self, group: &Group) -> CFunctionLabels {
        CFunctionLabels {
            function: self.function.into(),
            module: self.module.into(),
            container: group.container.clone().into(),
            image: group.image.clone().into(),
        }
    }

    fn other() -> Self {
        Self {
            function: OTHER.to_owned(),
            module: String::new(),
        }
    }
}

/// The key under which `key` is counted: itself if already admitted or if there is room
/// (then it is admitted for good), else the `[other]` key.
fn admit<K: Clone + Eq + std::hash::Hash>(
    admitted: &mut HashSet<K>,
    key: K,
    top: usize,
    other: fn() -> K,
) -> K {
    if admitted.contains(&key) || admitted.len() < top {
        admitted.insert(key.clone());
        key
    } else {
        other()
    }
}

#[derive(Debug, Default)]
struct Pending {
    lua: HashMap<LuaKey, (u64, u64)>,
    c: HashMap<CKey, (u64, u64)>,
}

#[derive(Debug, Default)]
struct Admitted {
    lua: HashSet<LuaKey>,
    c: HashSet<CKey>,
    processes: HashSet<String>,
    plugins: HashSet<String>,
}

/// The plugins that have their own series, per group, as of the last flush: what a window
/// reader needs to name a plugin as the metrics do. Immutable once published.
#[derive(Debug, Default)]
pub struct PluginCaps {
    top: usize,
    /// Groups with at least one admitted plugin.
    admitted: HashMap<Group, HashSet<String>>,
}

impl PluginCaps {
    /// `a` with the plugin name the plugin metrics of its group use: `[other]` once
    /// `top_functions` other plugins have series. With no caps (the default) `a` as it is.
    pub fn capped(&self, target: &TargetLabels, mut a: Attribution) -> Attribution {
        if a.plugin.is_empty() || a.plugin == crate::attribution::CORE {
            return a;
        }
        let admitted = self.admitted.get(&Group::of(target));
        let room = admitted.is_none_or(|ad| ad.contains(&a.plugin) || ad.len() < self.top);
        if !room {
            a.plugin = OTHER.to_owned();
        }
        a
    }
}

/// The capped counters of the continuous sampler (see the module header).
#[derive(Debug)]
pub struct Counters {
    metrics: Arc<Metrics>,
    top: usize,
    pending: HashMap<Group, Pending>,
    pending_samples: HashMap<TargetLabels, u64>,
    pending_offcpu: HashMap<(Group, LuaKey), u64>,
    /// Samples per plugin and phase.
    pending_plugins: HashMap<(Group, Attribution), u64>,
    /// Microseconds blocked per plugin and phase.
    pending_plugins_offcpu: HashMap<(Group, Attribution), u64>,
    rules: Arc<Rules>,
    /// Seconds one CPU sample stands for.
    period: f64,
    admitted: HashMap<Group, Admitted>,
    gone_since: HashMap<Group, Instant>,
    /// The admitted plugins as last published, and whether they changed since.
    caps: Arc<PluginCaps>,
    caps_stale: bool,
}

/// How long the series of a group outlive its last target.
pub(super) const GROUP_GRACE: Duration = Duration::from_secs(60);

impl Counters {
    /// Counters updating `metrics`, `top` series per group and family.
    pub fn new(metrics: Arc<Metrics>, top: usize) -> Self {
        Self {
            metrics,
            top,
            pending: HashMap::new(),
            pending_samples: HashMap::new(),
            pending_offcpu: HashMap::new(),
            pending_plugins: HashMap::new(),
            pending_plugins_offcpu: HashMap::new(),
            rules: Arc::new(Rules::default()),
            period: 1.0 / 19.0,
            admitted: HashMap::new(),
            gone_since: HashMap::new(),
            caps: Arc::new(PluginCaps {
                top,
                admitted: HashMap::new(),
            }),
            caps_stale: false,
        }
    }

    /// Sets the plugin rules and the sampling rate (a sample counts 1 / `frequency_hz`
    /// seconds); by default the built-in rules at 19 Hz.
    pub fn set_attribution(&mut self, rules: Arc<Rules>, frequency_hz: u64) {
        self.rules = rules;
        self.period = 1.0 / frequency_hz.max(1) as f64;
    }

    /// The plugin rules in use.
    pub fn rules(&self) -> &Arc<Rules> {
        &self.rules
    }

    /// The admitted plugins as of the last flush (a pointer copy).
    pub fn plugin_caps(&self) -> Arc<PluginCaps> {
        self.caps.clone()
    }

    /// Counts one sampled stack (root first) of `target`: its functions (the innermost Lua
    /// frame and the leaf C frame take self), its plugin and phase. `module_of` names the
    /// module of a native frame label. Returns the stack's plugin and phase.
    pub fn count_cpu<'m>(
        &mut self,
        target: &TargetLabels,
        stack: &[Arc<str>],
        module_of: impl Fn(&str) -> Option<&'m Arc<str>>,
    ) -> Attribution {
        *self.pending_samples.entry(target.clone()).or_insert(0) += 1;
        let group = Group::of(target);
        let attribution = self.rules.classify(stack);
        *self
            .pending_plugins
            .entry((group.clone(), attribution.clone()))
            .or_insert(0) += 1;
        let pending = self.pending.entry(group).or_default();
        let mut lua_seen: HashSet<LuaKey> = HashSet::new();
        let mut c_seen: HashSet<CKey> = HashSet::new();
        let mut innermost_lua = None;
        let mut leaf_c = None;
        for label in stack {
            match classify(label) {
                FrameClass::Lua {
                    function,
                    file,
                    line,
                } => {
                    let key = LuaKey {
                        function: function.to_owned(),
                        file: file.to_owned(),
                        line: line.to_owned(),
                    };
                    innermost_lua = Some(key.clone());
                    leaf_c = None;
                    lua_seen.insert(key);
                }
                FrameClass::C { function } => {
                    let key = CKey {
                        function: function.to_owned(),
                        module: module_of(label).map(|m| m.to_string()).unwrap_or_default(),
                    };
                    leaf_c = Some(key.clone());
                    c_seen.insert(key);
                }
                FrameClass::Kernel => {}
            }
        }
        if let Some(k) = innermost_lua {
            pending.lua.entry(k).or_default().0 += 1;
        }
        if let Some(k) = leaf_c {
            pending.c.entry(k).or_default().0 += 1;
        }
        for k in lua_seen {
            pending.lua.entry(k).or_default().1 += 1;
        }
        for k in c_seen {
            pending.c.entry(k).or_default().1 += 1;
        }
        attribution
    }

    /// Counts one off-CPU block of `us` microseconds to the innermost Lua source function of
    /// `stack`: fast functions (`builtin:ffi.meta___call`, `builtin:io.read`) and markers are
    /// skipped, so the block lands on the Lua code that made the call. Blocks outside Lua are
    /// not counted. Returns the stack's plugin and phase.
    pub fn count_offcpu(
        &mut self,
        target: &TargetLabels,
        stack: &[Arc<str>],
        us: u64,
    ) -> Attribution {
        let attribution = self.rules.classify(stack);
        let innermost = stack.iter().rev().find_map(|l| match classify(l) {
            FrameClass::Lua {
                function,
                file,
                line,
            } if !file.is_empty() && file != "[builtin]" => Some(LuaKey {
                function: function.to_owned(),
                file: file.to_owned(),
                line: line.to_owned(),
            }),
            _ => None,
        });
        if let Some(key) = innermost {
            let group = Group::of(target);
            *self
                .pending_plugins_offcpu
                .entry((group.clone(), attribution.clone()))
                .or_insert(0) += us;
            *self.pending_offcpu.entry((group, key)).or_insert(0) += us;
        }
        attribution
    }

    /// Adds samples lost for a target.
    pub fn add_lost(&mut self, target: &TargetLabels, n: u64) {
        if n > 0 {
            self.metrics.lost.get_or_create(target).inc_by(n);
        }
    }

    /// Moves pending counts into the metrics, admitting new functions while there is room.
    pub fn flush(&mut self) {
        for (target, n) in self.pending_samples.drain() {
            self.metrics.samples.get_or_create(&target).inc_by(n);
            // The lost series exists from the first sample on, so rates over it are 0, not
            // absent, until a loss happens.
            drop(self.metrics.lost.get_or_create(&target));
            let group = Group::of(&target);
            self.admitted
                .entry(group)
                .or_default()
                .processes
                .insert(target.process.as_str().to_owned());
        }
        for (group, pending) in self.pending.drain() {
            let admitted = self.admitted.entry(group.clone()).or_default();
            let mut lua: Vec<(LuaKey, (u64, u64))> = pending.lua.into_iter().collect();
            lua.sort_by(|a, b| b.1.1.cmp(&a.1.1).then(b.1.0.cmp(&a.1.0)));
            for (key, (self_n, incl_n)) in lua {
                let key = admit(&mut admitted.lua, key, self.top, LuaKey::other);
                let labels = key.labels(&group);
                // Both series exist for every admitted function, so ratios never miss one.
                self.metrics.lua_self.get_or_create(&labels).inc_by(self_n);
                self.metrics
                    .lua_inclusive
                    .get_or_create(&labels)
                    .inc_by(incl_n);
            }
            let mut c: Vec<(CKey, (u64, u64))> = pending.c.into_iter().collect();
            c.sort_by(|a, b| b.1.0.cmp(&a.1.0).then(b.1.1.cmp(&a.1.1)));
            for (key, (self_n, incl_n)) in c {
                let key = admit(&mut admitted.c, key, self.top, CKey::other);
                let labels = key.labels(&group);
                self.metrics.c_self.get_or_create(&labels).inc_by(self_n);
                self.metrics
                    .c_inclusive
                    .get_or_create(&labels)
                    .inc_by(incl_n);
            }
        }
        for ((group, key), us) in self.pending_offcpu.drain() {
            let admitted = self.admitted.entry(group.clone()).or_default();
            let key = admit(&mut admitted.lua, key, self.top, LuaKey::other);
            let labels = key.labels(&group);
            self.metrics
                .lua_offcpu
                .get_or_create(&labels)
                .inc_by(us as f64 / 1e6);
        }
        self.flush_plugins();
        self.publish_caps();
    }

    /// Moves the per-plugin and per-phase counts into the metrics.
    fn flush_plugins(&mut self) {
        let mut cpu: Vec<((Group, Attribution), u64)> = self.pending_plugins.drain().collect();
        cpu.sort_by_key(|c| std::cmp::Reverse(c.1));
        for ((group, a), n) in cpu {
            let seconds = n as f64 * self.period;
            let (plugin, phase) = self.plugin_labels(&group, a);
            self.metrics
                .plugin_cpu
                .get_or_create(&plugin)
                .inc_by(seconds);
            self.metrics.phase_cpu.get_or_create(&phase).inc_by(seconds);
        }
        let off: Vec<((Group, Attribution), u64)> = self.pending_plugins_offcpu.drain().collect();
        for ((group, a), us) in off {
            let seconds = us as f64 / 1e6;
            let (plugin, phase) = self.plugin_labels(&group, a);
            self.metrics
                .plugin_offcpu
                .get_or_create(&plugin)
                .inc_by(seconds);
            self.metrics
                .phase_offcpu
                .get_or_create(&phase)
                .inc_by(seconds);
        }
    }

    /// The series labels of an attribution in `group`, admitting the plugin while there is
    /// room.
    fn plugin_labels(&mut self, group: &Group, a: Attribution) -> (PluginLabels, PhaseLabels) {
        let admitted = self.admitted.entry(group.clone()).or_default();
        // `[core]` and "" (no Lua) always have their series; only plugin names count
        // against the cap.
        let plugin = if a.plugin.is_empty() || a.plugin == crate::attribution::CORE {
            a.plugin
        } else {
            let before = admitted.plugins.len();
            let plugin = admit(&mut admitted.plugins, a.plugin, self.top, || {
                OTHER.to_owned()
            });
            self.caps_stale |= admitted.plugins.len() != before;
            plugin
        };
        (
            PluginLabels {
                plugin: plugin.into(),
                phase: LabelValue::fixed(a.phase.name()),
                container: group.container.clone().into(),
                image: group.image.clone().into(),
            },
            PhaseLabels {
                phase: LabelValue::fixed(a.phase.name()),
                container: group.container.clone().into(),
                image: group.image.clone().into(),
            },
        )
    }

    /// Tells which groups still have targets; series of groups gone for longer than a
    /// minute are removed.
    pub fn retain_groups(&mut self, live: &HashSet<Group>) {
        let now = Instant::now();
        for g in self.admitted.keys() {
            if live.contains(g) {
                self.gone_since.remove(g);
            } else {
                self.gone_since.entry(g.clone()).or_insert(now);
            }
        }
        let expired: Vec<Group> = self
            .gone_since
            .iter()
            .filter(|(_, since)| now.duration_since(**since) > GROUP_GRACE)
            .map(|(g, _)| g.clone())
            .collect();
        for g in expired {
            self.gone_since.remove(&g);
            let Some(admitted) = self.admitted.remove(&g) else {
                continue;
            };
            self.caps_stale |= !admitted.plugins.is_empty();
            for key in admitted.lua.into_iter().chain([LuaKey::other()]) {
                let labels = key.labels(&g);
                self.metrics.lua_self.remove(&labels);
                self.metrics.lua_inclusive.remove(&labels);
                self.metrics.lua_offcpu.remove(&labels);
            }
            for key in admitted.c.into_iter().chain([CKey::other()]) {
                let labels = key.labels(&g);
                self.metrics.c_self.remove(&labels);
                self.metrics.c_inclusive.remove(&labels);
            }
            let specials = [OTHER, crate::attribution::CORE, ""].map(str::to_owned);
            for plugin in admitted.plugins.into_iter().chain(specials) {
                for phase in Phase::ALL {
                    let labels = PluginLabels {
                        plugin: plugin.clone().into(),
                        phase: LabelValue::fixed(phase.name()),
                        container: g.container.clone().into(),
                        image: g.image.clone().into(),
                    };
                    self.metrics.plugin_cpu.remove(&labels);
                    self.metrics.plugin_offcpu.remove(&labels);
                }
            }
            for phase in Phase::ALL {
                let labels = PhaseLabels {
                    phase: LabelValue::fixed(phase.name()),
                    container: g.container.clone().into(),
                    image: g.image.clone().into(),
                };
                self.metrics.phase_cpu.remove(&labels);
                self.metrics.phase_offcpu.remove(&labels);
            }
            for process in admitted.processes {
                let labels = TargetLabels {
                    container: g.container.clone().into(),
                    image: g.image.clone().into(),
                    process: process.into(),
                };
                self.metrics.samples.remove(&labels);
                self.metrics.lost.remove(&labels);
            }
            // The sampler thread counts VM states; their series go with the group too.
            for state in crate::luajit::VmState::ALL {
                self.metrics.vm_states.remove(&VmStateLabels {
                    state: LabelValue::fixed(state.name()),
                    container: g.container.clone().into(),
                    image: g.image.clone().into(),
                });
            }
        }
        self.publish_caps();
    }

    /// Publishes the admitted plugins when they changed.
    fn publish_caps(&mut self) {
        if !std::mem::take(&mut self.caps_stale) {
            return;
        }
        let admitted = self
            .admitted
            .iter()
            .filter(|(_, a)| !a.plugins.is_empty())
            .map(|(g, a)| (g.clone(), a.plugins.clone()))
            .collect();
        self.caps = Arc::new(PluginCaps {
            top: self.top,
            admitted,
        });
    }

    /// When each gone group went (tests age them).
    #[cfg(test)]
    pub(super) fn gone_since_mut(&mut self) -> &mut HashMap<Group, Instant> {
        &mut self.gone_since
    }
}
