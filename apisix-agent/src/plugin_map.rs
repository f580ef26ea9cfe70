//! The plugins of an APISIX gateway as the gateway names them: a map from Lua function
//! objects (`GCfunc` addresses) to plugin names, read in user space from each target VM's
//! `package.loaded` ([`crate::luajit::tables`]), so that a sampled frame running a plugin's
//! code is named by the plugin the runner runs, not by its file.
//!
//! APISIX loads a plugin as the module `apisix.plugins.<name>` (`apisix.stream.plugins.<name>`
//! for stream plugins) and sets the module table's `name` to `<name>`; its runner calls the
//! phase functions it finds in that table. The map holds, for each such module whose `name`
//! equals its key's last part:
//! - every Lua function among its fields whose prototype was loaded from a plugin file
//!   (a chunk under `apisix/plugins/` or `apisix/stream/plugins/`): the phase functions, and
//!   functions a module shares from a helper file (`ip-restriction`'s `access` is
//!   `apisix/plugins/ip-restriction/init.lua`'s `restrict`);
//! - the Lua closures those functions hold as upvalues, [`MAX_DEPTH`] levels deep, when they
//!   come from the same chunk as their holder: `serverless-pre-function` and
//!   `serverless-post-function` are built by one factory in `serverless/init.lua`, whose
//!   phase closures tail-call a per-plugin closure `call_funcs` (the tail call replaces the
//!   phase closure's frame on the Lua stack, and in compiled code the phase closures, more
//!   than two of one prototype, are specialised by prototype, not by identity, so only
//!   `call_funcs` identifies the plugin in a sample).
//!
//! A function reached from two plugins is ambiguous and names none. The map outlives
//! requests (no read races with a request in flight) and lives as long as the modules:
//! it is rebuilt every [`REFRESH`], and sooner (at most every [`MIN_REBUILD`]) when a
//! sample without a named frame runs an unknown function of a plugin file that a rebuild has
//! not yet settled (a plugin reload makes new closures; [`PluginMaps::ask_rebuild`]). An
//! entry is only used when the sampled frame's prototype is the one recorded (an address
//! reused by another function does not match). Limit: after a plugin reload, a closure
//! freed by the collector and a new closure of the same prototype for another plugin
//! allocated at its address before the next rebuild (at most [`REFRESH`]) would take the
//! old name; only factory-built plugins (serverless) share prototypes. A build of the
//! harness's gateway (one VM, eight plugins, 72 functions) takes about 3 ms.
//!
//! Hooks: `process_vm_readv` (through the table reader; a build reads `_LOADED`'s hash part,
//! its keys, and each plugin module and function: a few hundred reads). Metrics: failures by
//! reason in the namer's error counters (`apisix_profiler_unwind_errors_total{reason=
//! "plugin_map_*"}`), see [`PluginMaps::prepare`].

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
    time::{Duration, Instant},
};

use crate::{
    attribution::sanitise,
    luajit::{
        layout::Layout,
        tables::{Limits, Reader, TableError, Value},
    },
    proc::memory::{Memory, TargetMemory},
};

/// How old a map gets before it is rebuilt.
pub const REFRESH: Duration = Duration::from_secs(10);
/// Least time between two rebuilds asked for by samples.
pub const MIN_REBUILD: Duration = Duration::from_secs(1);
/// Least time between two attempts while no map could be built.
const RETRY: Duration = Duration::from_secs(5);
/// Upvalue levels followed from a module's functions.
pub const MAX_DEPTH: u32 = 2;
/// Most functions kept per plugin, and in one process's map.
const MAX_FUNCS_PER_PLUGIN: usize = 1024;
const MAX_FUNCS: usize = 1 << 16;
/// Most plugin modules read per VM.
const MAX_PLUGINS: usize = 1024;
/// Most VMs (`global_State`s) followed per process, and `lua_State`s remembered.
const MAX_VMS: usize = 8;
const MAX_STATES: usize = 4096;
/// Functions found unknown that a later rebuild did not add, remembered per process.
const MAX_SETTLED: usize = 4096;

/// The module name prefixes of APISIX's http and stream plugins.
const PREFIXES: [&str; 2] = ["apisix.plugins.", "apisix.stream.plugins."];
/// Chunk names of plugin files contain one of these.
const PLUGIN_DIRS: [&str; 2] = ["apisix/plugins/", "apisix/stream/plugins/"];

/// Whether a chunk name is a plugin file's.
pub fn is_plugin_chunk(chunk: &str) -> bool {
    PLUGIN_DIRS.iter().any(|d| chunk.contains(d))
}

/// What the map says about one function.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Entry {
    Plugin { name: Arc<str>, proto: u64 },
    Ambiguous,
}

/// The answer for one sampled frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    /// The plugin that owns the function.
    Named(Arc<str>),
    /// Two plugins reach the function.
    Ambiguous,
    /// The address is in the map with another prototype: the function was freed and the
    /// address reused.
    Stale,
    /// Not in the map.
    Unknown,
    /// No map could be read for the process.
    NoMap,
}

/// The map of one process (all its VMs: a function address belongs to one VM).
#[derive(Debug)]
struct ProcMap {
    layout: &'static Layout,
    states: HashMap<u64, Option<u64>>,
    vms: Vec<u64>,
    funcs: HashMap<u64, Entry>,
    built: Option<Instant>,
    tried: Option<Instant>,
    /// A sample asked for a rebuild (an unknown function of a plugin file).
    dirty: bool,
    /// Unknown functions seen since the last build, and those a build did not add.
    pending: HashSet<u64>,
    settled: HashSet<u64>,
}

/// The plugin maps of every process sampled.
#[derive(Debug, Default)]
pub struct PluginMaps {
    procs: HashMap<u32, ProcMap>,
}

fn count(errors: &mut HashMap<&'static str, u64>, reason: &'static str) {
    *errors.entry(reason).or_insert(0) += 1;
}

impl PluginMaps {
    /// No maps yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Drops the map of process `pid`.
    pub fn forget(&mut self, pid: u32) {
        self.procs.remove(&pid);
    }

    /// Before the frames of a sample of `pid` running on `lua_State` `l` are named: learns
    /// the VM of `l` and (re)builds the process's map when due. Failures are counted in
    /// `errors`: `plugin_map_vm_unreadable` (the state's VM could not be read),
    /// and `plugin_map_<reason>` for a build that failed ([`TableError::reason`]).
    pub fn prepare(
        &mut self,
        pid: u32,
        layout: &'static Layout,
        l: u64,
        errors: &mut HashMap<&'static str, u64>,
    ) {
        let p = self.procs.entry(pid).or_insert_with(|| ProcMap {
            layout,
            states: HashMap::new(),
            vms: Vec::new(),
            funcs: HashMap::new(),
            built: None,
            tried: None,
            dirty: false,
            pending: HashSet::new(),
            settled: HashSet::new(),
        });
        let mem = Memory::new(pid);
        let new_vm = p.learn(&mem, l, errors);
        if p.due(new_vm) {
            p.rebuild(pid, &mem, errors);
        }
    }

    /// What the map of `pid` says about the frame running function `func` of prototype
    /// `proto`.
    pub fn lookup(&self, pid: u32, func: u64, proto: u64) -> Lookup {
        let Some(p) = self.procs.get(&pid) else {
            return Lookup::NoMap;
        };
        if p.built.is_none() {
            return Lookup::NoMap;
        }
        match p.funcs.get(&func) {
            Some(Entry::Plugin { name, proto: want }) if *want == proto => {
                Lookup::Named(name.clone())
            }
            Some(Entry::Ambiguous) => Lookup::Ambiguous,
            Some(Entry::Plugin { .. }) => Lookup::Stale,
            None => Lookup::Unknown,
        }
    }

    /// A sample fell back to the file rules at a plugin file's function `func` that the map
    /// does not know (or knows with another prototype): asks for a rebuild, unless one
    /// already ran since `func` was first seen and did not add it.
    pub fn ask_rebuild(&mut self, pid: u32, func: u64) {
        if let Some(p) = self.procs.get_mut(&pid)
            && !p.settled.contains(&func)
        {
            p.dirty = true;
            if p.pending.len() < MAX_SETTLED {
                p.pending.insert(func);
            }
        }
    }

    /// Plugins and functions in the map of `pid` (for tests and logs).
    pub fn summary(&self, pid: u32) -> Option<(usize, usize)> {
        let p = self.procs.get(&pid)?;
        p.built?;
        let names: HashSet<&Arc<str>> = p
            .funcs
            .values()
            .filter_map(|e| match e {
                Entry::Plugin { name, .. } => Some(name),
                Entry::Ambiguous => None,
            })
            .collect();
        Some((names.len(), p.funcs.len()))
    }
}

impl ProcMap {
    /// Learns the VM of `lua_State` `l`; whether it is a VM not seen before.
    fn learn(
        &mut self,
        mem: &dyn TargetMemory,
        l: u64,
        errors: &mut HashMap<&'static str, u64>,
    ) -> bool {
        if l == 0 || self.states.contains_key(&l) {
            return false;
        }
        if self.states.len() >= MAX_STATES {
            self.states.clear();
        }
        let g = vm_of(mem, self.layout, l, &self.vms);
        if g.is_none() {
            count(errors, "plugin_map_vm_unreadable");
        }
        self.states.insert(l, g);
        match g {
            Some(g) if !self.vms.contains(&g) && self.vms.len() < MAX_VMS => {
                self.vms.push(g);
                true
            }
            _ => false,
        }
    }

    /// Whether the map is to be read now.
    fn due(&self, new_vm: bool) -> bool {
        if self.vms.is_empty() {
            return false;
        }
        let now = Instant::now();
        let since = |t: Option<Instant>| t.map_or(Duration::MAX, |t| now.duration_since(t));
        new_vm
            || match self.built {
                None => since(self.tried) >= RETRY,
                Some(_) => {
                    since(self.built) >= REFRESH || (self.dirty && since(self.built) >= MIN_REBUILD)
                }
            }
    }

    /// Reads the map of every VM of the process anew; keeps the old one when none could be
    /// read.
    fn rebuild(
        &mut self,
        pid: u32,
        mem: &dyn TargetMemory,
        errors: &mut HashMap<&'static str, u64>,
    ) {
        let now = Instant::now();
        self.tried = Some(now);
        self.dirty = false;
        let reader = Reader {
            mem,
            layout: self.layout,
            limits: Limits::default(),
        };
        let mut funcs = HashMap::new();
        let mut ok = false;
        for g in &self.vms {
            match build(&reader, *g, &mut funcs) {
                Ok(()) => ok = true,
                Err(e) => {
                    tracing::debug!(pid, g = format_args!("{g:#x}"), error = %e, "plugin map");
                    count(errors, map_reason(&e));
                }
            }
        }
        tracing::debug!(
            pid,
            vms = self.vms.len(),
            functions = funcs.len(),
            elapsed_us = now.elapsed().as_micros() as u64,
            "plugin map read"
        );
        if !ok {
            return;
        }
        if funcs != self.funcs {
            self.settled.clear();
        }
        self.funcs = funcs;
        self.built = Some(now);
        for f in self.pending.drain() {
            if !self.funcs.contains_key(&f) && self.settled.len() < MAX_SETTLED {
                self.settled.insert(f);
            }
        }
    }
}

fn map_reason(e: &TableError) -> &'static str {
    match e {
        TableError::Read { .. } => "plugin_map_read_failed",
        TableError::WrongType { .. } => "plugin_map_wrong_type",
        TableError::TooLarge { .. } => "plugin_map_too_large",
        TableError::NoLoaded { .. } => "plugin_map_no_loaded",
    }
}

/// The VM (`global_State`) of the `lua_State` at `l`: one of the `known` VMs, or an
/// address checked to be one (a request's coroutine is a new state of a known VM: one read).
fn vm_of(mem: &dyn TargetMemory, layout: &Layout, l: u64, known: &[u64]) -> Option<u64> {
    let w = if layout.bpf.gc64 != 0 { 8 } else { 4 };
    let b = mem
        .read(l.wrapping_add(u64::from(layout.bpf.l_glref)), w)
        .ok()?;
    let g = if w == 8 {
        u64::from_le_bytes(b.try_into().ok()?)
    } else {
        u64::from(u32::from_le_bytes(b.try_into().ok()?))
    };
    if !known.contains(&g) {
        crate::luajit::heap::check_vm(mem, layout, g).ok()?;
    }
    Some(g)
}

/// Adds `func` → `name` (ambiguous when another plugin has it).
fn insert(funcs: &mut HashMap<u64, Entry>, func: u64, name: &Arc<str>, proto: u64) {
    if funcs.len() >= MAX_FUNCS && !funcs.contains_key(&func) {
        return;
    }
    let e = funcs.entry(func).or_insert_with(|| Entry::Plugin {
        name: name.clone(),
        proto,
    });
    if let Entry::Plugin { name: have, .. } = e
        && have != name
    {
        *e = Entry::Ambiguous;
    }
}

/// Adds the plugins of the VM at `g` to `funcs`.
fn build(r: &Reader<'_>, g: u64, funcs: &mut HashMap<u64, Entry>) -> Result<(), TableError> {
    let loaded = r.loaded(g)?;
    let mut chunks: HashMap<u64, bool> = HashMap::new();
    let mut plugins = 0;
    for (key, val) in r.entries(&loaded)? {
        let (Value::Str(key), Value::Table(module)) = (key, val) else {
            continue;
        };
        let Ok(key) = r.string(key) else { continue };
        let Some(key) = key.as_str() else { continue };
        let Some(suffix) = PREFIXES.iter().find_map(|p| key.strip_prefix(p)) else {
            continue;
        };
        if suffix.is_empty() || suffix.contains('.') || plugins >= MAX_PLUGINS {
            continue;
        }
        plugins += 1;
        // A module that cannot be read is skipped: the others still name their plugins.
        let _ = add_module(r, module, suffix, &mut chunks, funcs);
    }
    Ok(())
}

/// Adds the functions of one plugin module (the table at `module`, loaded as
/// `<prefix><suffix>`) when its `name` is `suffix`.
fn add_module(
    r: &Reader<'_>,
    module: u64,
    suffix: &str,
    chunks: &mut HashMap<u64, bool>,
    funcs: &mut HashMap<u64, Entry>,
) -> Result<(), TableError> {
    let t = r.table(module)?;
    let entries = r.entries(&t)?;
    let mut name = None;
    for (k, v) in &entries {
        if let (Value::Str(k), Value::Str(v)) = (k, v)
            && r.string(*k)?.as_str() == Some("name")
        {
            name = r.string(*v)?.as_str().map(str::to_owned);
            break;
        }
    }
    if name.as_deref() != Some(suffix) || sanitise(suffix) != suffix {
        return Ok(());
    }
    let name: Arc<str> = Arc::from(suffix);
    let mut is_plugin_file = |chunk: u64| -> bool {
        *chunks.entry(chunk).or_insert_with(|| {
            r.string(chunk)
                .ok()
                .and_then(|s| s.as_str().map(is_plugin_chunk))
                .unwrap_or(false)
        })
    };
    // (function, its chunk, depth), walked without recursion.
    let mut todo: Vec<(u64, u64, u32)> = Vec::new();
    for (_, v) in &entries {
        let Value::Func(f) = v else { continue };
        let Ok(func) = r.func(*f, false) else {
            continue;
        };
        let Some(proto) = func.proto else { continue };
        let Ok(chunk) = r.proto_chunkname(proto) else {
            continue;
        };
        if is_plugin_file(chunk) {
            todo.push((*f, chunk, 0));
        }
    }
    let mut seen: HashSet<u64> = HashSet::new();
    while let Some((f, chunk, depth)) = todo.pop() {
        if seen.len() >= MAX_FUNCS_PER_PLUGIN || !seen.insert(f) {
            continue;
        }
        let Ok(func) = r.func(f, depth < MAX_DEPTH) else {
            continue;
        };
        let Some(proto) = func.proto else { continue };
        insert(funcs, f, &name, proto);
        for uv in func.upvalues {
            let Value::Func(u) = uv else { continue };
            let Ok(inner) = r.func(u, false) else {
                continue;
            };
            // Only closures of the holder's own chunk: a library function held as an
            // upvalue is not the plugin's.
            if let Some(p) = inner.proto
                && r.proto_chunkname(p).ok() == Some(chunk)
            {
                todo.push((u, chunk, depth + 1));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::luajit::{
        layout::{GC32, GC64},
        tables::tests::{Heap, ME},
    };

    const TSTR: u32 = !4;
    const TFUNC: u32 = !8;
    const TTAB: u32 = !11;

    /// A fake VM with two serverless-style plugins built by one factory (a phase closure
    /// holding a per-plugin `call_funcs`, which holds a library function), one plain plugin,
    /// a module whose `name` differs from its key, and a helper module.
    struct Fake {
        heap: Heap,
        g: u64,
        pre_call: u64,
        post_call: u64,
        pre_phase: u64,
        key_auth: u64,
        shared: u64,
        lib: u64,
        liar: u64,
        helper: u64,
        protos: HashMap<u64, u64>,
    }

    fn module(h: &mut Heap, name: &str, fields: &[(&str, u64)]) -> u64 {
        let k_name = h.string("name");
        let v_name = h.string(name);
        let mut entries = vec![(h.tv(TSTR, k_name), h.tv(TSTR, v_name))];
        for (k, f) in fields {
            let k = h.string(k);
            entries.push((h.tv(TSTR, k), h.tv(TFUNC, *f)));
        }
        h.table(8, &entries)
    }

    fn fake(layout: &'static Layout) -> Fake {
        let mut h = Heap::new(layout);
        let mut protos = HashMap::new();
        let factory = h.string("@/h/apisix/plugins/serverless/init.lua");
        let ka_file = h.string("@/h/apisix/plugins/key-auth.lua");
        let core_file = h.string("@/h/apisix/core/table.lua");
        let p_phase = h.proto(factory);
        let p_call = h.proto(factory);
        let p_lib = h.proto(core_file);
        let p_ka = h.proto(ka_file);
        let lib = h.lua_func(p_lib, &[]);
        let mut func = |h: &mut Heap, p: u64, uv: &[u64]| {
            let f = h.lua_func(p, uv);
            protos.insert(f, p);
            f
        };
        let lib_tv = h.tv(TFUNC, lib);
        let pre_call = func(&mut h, p_call, &[lib_tv]);
        let post_call = func(&mut h, p_call, &[lib_tv]);
        let tv = h.tv(TFUNC, pre_call);
        let pre_phase = func(&mut h, p_phase, &[tv]);
        let tv = h.tv(TFUNC, post_call);
        let post_phase = func(&mut h, p_phase, &[tv]);
        let key_auth = func(&mut h, p_ka, &[]);
        // A plugin-file function two plugins share.
        let shared = func(&mut h, p_ka, &[]);
        let liar = func(&mut h, p_ka, &[]);
        let helper = func(&mut h, p_ka, &[]);
        let m_pre = module(
            &mut h,
            "serverless-pre-function",
            &[("rewrite", pre_phase), ("x", shared)],
        );
        let m_post = module(
            &mut h,
            "serverless-post-function",
            &[("log", post_phase), ("x", shared)],
        );
        let m_ka = module(&mut h, "key-auth", &[("rewrite", key_auth), ("check", lib)]);
        let m_liar = module(&mut h, "other-name", &[("access", liar)]);
        let m_helper = module(&mut h, "key-auth", &[("helper", helper)]);
        let mut loaded = Vec::new();
        for (k, m) in [
            ("apisix.plugins.serverless-pre-function", m_pre),
            ("apisix.plugins.serverless-post-function", m_post),
            ("apisix.plugins.key-auth", m_ka),
            ("apisix.plugins.liar", m_liar),
            ("apisix.plugins.key-auth.helper", m_helper),
        ] {
            let k = h.string(k);
            loaded.push((h.tv(TSTR, k), h.tv(TTAB, m)));
        }
        let loaded = h.table(8, &loaded);
        let k_loaded = h.string("_LOADED");
        let registry = h.table(2, &[(h.tv(TSTR, k_loaded), h.tv(TTAB, loaded))]);
        let g = h.alloc(layout.values.g_registrytv as usize + 8);
        let tv = h.tv(TTAB, registry);
        h.put(g + u64::from(layout.values.g_registrytv), &tv.to_le_bytes());
        Fake {
            heap: h,
            g,
            pre_call,
            post_call,
            pre_phase,
            key_auth,
            shared,
            lib,
            liar,
            helper,
            protos,
        }
    }

    #[test]
    fn plugins_are_named_by_the_gateway() {
        for layout in [&GC64, &GC32] {
            let f = fake(layout);
            let r = Reader {
                mem: &*ME,
                layout,
                limits: Limits::default(),
            };
            let mut funcs = HashMap::new();
            build(&r, f.g, &mut funcs).expect("build");
            let named = |func: u64| match funcs.get(&func) {
                Some(Entry::Plugin { name, proto }) => {
                    assert_eq!(Some(proto), f.protos.get(&func));
                    Some(name.to_string())
                }
                _ => None,
            };
            // The factory's closures: same prototypes, told apart by identity.
            assert_eq!(
                named(f.pre_call).as_deref(),
                Some("serverless-pre-function")
            );
            assert_eq!(
                named(f.post_call).as_deref(),
                Some("serverless-post-function")
            );
            assert_eq!(
                named(f.pre_phase).as_deref(),
                Some("serverless-pre-function")
            );
            assert_eq!(named(f.key_auth).as_deref(), Some("key-auth"));
            // Shared by two plugins: ambiguous. A library function (held as an upvalue
            // or as a field): not a plugin's. A module whose name is not its key's, and a
            // helper module below a plugin: not plugins.
            assert_eq!(funcs.get(&f.shared), Some(&Entry::Ambiguous));
            assert_eq!(funcs.get(&f.lib), None);
            assert_eq!(funcs.get(&f.liar), None);
            assert_eq!(funcs.get(&f.helper), None);
            drop(f.heap);
        }
    }

    #[test]
    fn lookups_check_the_prototype_and_ask_for_rebuilds() {
        let mut maps = PluginMaps::new();
        let pid = std::process::id();
        assert_eq!(maps.lookup(pid, 1, 2), Lookup::NoMap);
        let mut p = ProcMap {
            layout: &GC64,
            states: HashMap::new(),
            vms: vec![1],
            funcs: HashMap::new(),
            built: Some(Instant::now()),
            tried: None,
            dirty: false,
            pending: HashSet::new(),
            settled: HashSet::new(),
        };
        p.funcs.insert(
            10,
            Entry::Plugin {
                name: Arc::from("key-auth"),
                proto: 20,
            },
        );
        p.settled.insert(30);
        maps.procs.insert(pid, p);
        assert_eq!(
            maps.lookup(pid, 10, 20),
            Lookup::Named(Arc::from("key-auth"))
        );
        // A reused address: stale.
        assert_eq!(maps.lookup(pid, 10, 21), Lookup::Stale);
        assert_eq!(maps.lookup(pid, 11, 20), Lookup::Unknown);
        assert!(!maps.procs[&pid].dirty, "lookups alone ask for nothing");
        // Settled by an earlier rebuild: no rebuild; a new function: one, after which the
        // function is settled unless the rebuild added it.
        maps.ask_rebuild(pid, 30);
        assert!(!maps.procs[&pid].dirty);
        maps.ask_rebuild(pid, 12);
        assert!(maps.procs[&pid].dirty);
        assert!(maps.procs[&pid].pending.contains(&12));
        maps.forget(pid);
        assert_eq!(maps.lookup(pid, 10, 20), Lookup::NoMap);
    }

    #[test]
    fn plugin_chunks() {
        assert!(is_plugin_chunk(
            "/usr/local/apisix/apisix/plugins/key-auth.lua"
        ));
        assert!(is_plugin_chunk(
            "/a/apisix/stream/plugins/ip-restriction.lua"
        ));
        assert!(!is_plugin_chunk("/a/apisix/plugin.lua"));
    }
}
