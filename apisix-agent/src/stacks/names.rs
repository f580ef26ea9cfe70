//! Names for the Lua frames the BPF walker reported: reads each function prototype from the
//! target's memory (once per process, prototype and identity), validates it, and renders
//! `NAME@FILE:LINE`, `builtin:NAME` or the native symbol of a C function. Frames are split
//! into segments at every entry from C, for the splice into the native stack.

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
};

use apisix_ebpf_common::{LuaFrame, LuaFrameKind};

use crate::{
    attribution,
    label::{FrameDetail, ModuleId, TRUNCATED},
    luajit::{
        LuaTarget, NameStyle,
        bytecode::{self, Ins, ProtoView},
        ffnames,
        layout::Layout,
    },
    plugin_map::{Lookup, PluginMaps, is_plugin_chunk},
    proc::{
        memory::{Memory, TargetMemory},
        modules::ProcessModules,
        symbolize::Symbolizer,
    },
};

/// Largest prototype (with its colocated debug data) read from a target.
const MAX_PROTO_BYTES: u32 = 1 << 20;
/// Longest chunk name or string constant read.
pub const MAX_STR: u32 = 512;
/// `GCproto.gct`: the GC type `~LJ_TPROTO`, i.e. 7.
const GCT_PROTO: u8 = 7;
/// `GCstr.gct`: the GC type `~LJ_TSTR`, i.e. 4.
const GCT_STR: u8 = 4;

/// Why a prototype could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ProtoError {
    #[error("reading target memory at {addr:#x}")]
    Read {
        addr: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("not a function prototype at {addr:#x}")]
    NotProto { addr: u64 },
    #[error("prototype at {addr:#x} changed (freed and reused)")]
    Changed { addr: u64 },
    #[error("bad string at {addr:#x}")]
    BadString { addr: u64 },
}

fn le_u32(b: &[u8], off: u32) -> Option<u32> {
    let off = off as usize;
    Some(u32::from_le_bytes(b.get(off..off + 4)?.try_into().ok()?))
}

fn le_u64(b: &[u8], off: u32) -> Option<u64> {
    let off = off as usize;
    Some(u64::from_le_bytes(b.get(off..off + 8)?.try_into().ok()?))
}

/// Reads a GC or memory reference of the layout's width from `b` at `off`.
fn le_ref(layout: &Layout, b: &[u8], off: u32) -> Option<u64> {
    if layout.bpf.gc64 != 0 {
        le_u64(b, off)
    } else {
        le_u32(b, off).map(u64::from)
    }
}

/// Reads a Lua string object.
pub fn read_str(mem: &dyn TargetMemory, layout: &Layout, addr: u64) -> Result<String, ProtoError> {
    let head = mem
        .read(addr, layout.str_size as usize)
        .map_err(|source| ProtoError::Read { addr, source })?;
    if head.get(layout.bpf.fn_gct as usize) != Some(&GCT_STR) {
        return Err(ProtoError::BadString { addr });
    }
    let len = le_u32(&head, layout.str_len).ok_or(ProtoError::BadString { addr })?;
    let take = len.min(MAX_STR);
    let data = mem
        .read(addr + u64::from(layout.str_size), take as usize)
        .map_err(|source| ProtoError::Read { addr, source })?;
    Ok(decode_str(&data, len))
}

/// What the agent shows of a Lua string of `len` bytes of which `data` were read (at most
/// [`MAX_STR`] are used): invalid UTF-8 replaced (U+FFFD), and when cut, ending in
/// [`TRUNCATED`]. At most `3 × MAX_STR` bytes plus the marker.
pub fn decode_str(data: &[u8], len: u32) -> String {
    let take = data.len().min(len.min(MAX_STR) as usize);
    let mut s = String::from_utf8_lossy(&data[..take]).into_owned();
    if (take as u64) < u64::from(len) {
        s.push_str(TRUNCATED);
    }
    s
}

/// One prototype read from a target.
#[derive(Debug)]
pub struct Proto {
    layout: &'static Layout,
    /// Where the constants named later (`call_name`) are read.
    mem: Arc<dyn TargetMemory + Send + Sync>,
    addr: u64,
    blob: Vec<u8>,
    /// Chunk name as shown: without a leading `@` or `=`.
    pub chunk: Arc<str>,
    pub firstline: u32,
    chunkname_ref: u64,
    sizebc: u32,
    numline: u32,
    k: u64,
    sizekgc: u32,
    sizeuv: u32,
    lineinfo: u64,
    uvinfo: u64,
    varinfo: u64,
    names: std::sync::Mutex<HashMap<usize, Option<String>>>,
}

impl Proto {
    /// Bytes this prototype holds: its blob and chunk name (the call names found later are
    /// bounded by its bytecode, each by `MAX_STR`).
    pub fn bytes(&self) -> usize {
        self.blob.len() + self.chunk.len() + ENTRY_OVERHEAD
    }

    /// Reads and validates the prototype at `addr`.
    pub fn read(
        mem: Arc<dyn TargetMemory + Send + Sync>,
        layout: &'static Layout,
        addr: u64,
        expect_chunkname: u64,
        expect_firstline: u32,
    ) -> Result<Self, ProtoError> {
        let l = layout;
        let head = mem
            .read(addr, l.bpf.pt_size as usize)
            .map_err(|source| ProtoError::Read { addr, source })?;
        let bad = || ProtoError::NotProto { addr };
        if head.get(l.bpf.fn_gct as usize) != Some(&GCT_PROTO) {
            return Err(bad());
        }
        let sizept = le_u32(&head, l.pt_sizept).ok_or_else(bad)?;
        let sizebc = le_u32(&head, l.pt_sizebc).ok_or_else(bad)?;
        if sizept < l.bpf.pt_size
            || sizept > MAX_PROTO_BYTES
            || sizebc == 0
            || u64::from(sizebc) * 4 + u64::from(l.bpf.pt_size) > u64::from(sizept)
        {
            return Err(bad());
        }
        let chunkname_ref = le_ref(l, &head, l.bpf.pt_chunkname).ok_or_else(bad)?;
        let firstline = le_u32(&head, l.bpf.pt_firstline).ok_or_else(bad)?;
        if chunkname_ref != expect_chunkname || firstline != expect_firstline {
            return Err(ProtoError::Changed { addr });
        }
        let blob = mem
            .read(addr, sizept as usize)
            .map_err(|source| ProtoError::Read { addr, source })?;
        let chunk = read_str(&*mem, l, chunkname_ref)?;
        let chunk = chunk
            .strip_prefix('@')
            .or_else(|| chunk.strip_prefix('='))
            .map(str::to_owned)
            .unwrap_or_else(|| {
                let first = chunk.lines().next().unwrap_or("");
                let short: String = first.chars().take(40).collect();
                format!("[string \"{short}\"]")
            });
        Ok(Self {
            layout: l,
            mem,
            addr,
            chunk: Arc::from(chunk),
            firstline,
            chunkname_ref,
            sizebc,
            numline: le_u32(&blob, l.pt_numline).unwrap_or(0),
            k: le_ref(l, &blob, l.pt_k).unwrap_or(0),
            sizekgc: le_u32(&blob, l.pt_sizekgc).unwrap_or(0),
            sizeuv: u32::from(*blob.get(l.pt_sizeuv as usize).unwrap_or(&0)),
            lineinfo: le_ref(l, &blob, l.pt_lineinfo).unwrap_or(0),
            uvinfo: le_ref(l, &blob, l.pt_uvinfo).unwrap_or(0),
            varinfo: le_ref(l, &blob, l.pt_varinfo).unwrap_or(0),
            blob,
            names: std::sync::Mutex::new(HashMap::new()),
        })
    }

    /// Whether this prototype still is what the sample saw.
    pub fn matches(&self, frame: &LuaFrame) -> bool {
        self.chunkname_ref == frame.chunkname && self.firstline == frame.firstline
    }

    /// Address of the first bytecode instruction (the function header).
    pub fn bc_addr(&self) -> u64 {
        self.addr + u64::from(self.layout.bpf.pt_size)
    }

    /// Instruction index of a return PC / next-instruction address inside this prototype:
    /// the instruction being executed is the one before it.
    pub fn pc_index(&self, pc: u64) -> Option<usize> {
        let start = self.bc_addr();
        if pc < start + 4
            || pc > start + u64::from(self.sizebc) * 4
            || !(pc - start).is_multiple_of(4)
        {
            return None;
        }
        Some(((pc - start) / 4 - 1) as usize)
    }

    /// Offset into the blob of an address inside the prototype's allocation.
    fn blob_off(&self, addr: u64) -> Option<usize> {
        let off = usize::try_from(addr.checked_sub(self.addr)?).ok()?;
        (off < self.blob.len()).then_some(off)
    }

    /// Source line of instruction `pc` (0 is the function header), as LuaJIT's
    /// `lj_debug_line` reads it: the line table has no entry for the header.
    pub fn line(&self, pc: usize) -> Option<u32> {
        if self.lineinfo == 0 || pc >= self.sizebc as usize {
            return None;
        }
        let Some(i) = pc.checked_sub(1) else {
            return Some(self.firstline);
        };
        let off = self.blob_off(self.lineinfo)?;
        let delta = if self.numline < 256 {
            u32::from(*self.blob.get(off + i)?)
        } else if self.numline < 65536 {
            let o = off + i * 2;
            u32::from(u16::from_le_bytes(
                self.blob.get(o..o + 2)?.try_into().ok()?,
            ))
        } else {
            let o = off + i * 4;
            u32::from_le_bytes(self.blob.get(o..o + 4)?.try_into().ok()?)
        };
        // A line outside the function is not one of its lines: the read went wrong.
        (delta <= self.numline).then_some(self.firstline + delta)
    }

    /// The cached call-site name of the call at instruction `pc`.
    pub fn call_name(&self, pc: usize) -> Option<String> {
        if let Ok(names) = self.names.lock()
            && let Some(n) = names.get(&pc)
        {
            return n.clone();
        }
        let name = bytecode::call_name(self, pc);
        if let Ok(mut names) = self.names.lock() {
            names.insert(pc, name.clone());
        }
        name
    }

    fn cstr_at(&self, off: usize) -> Option<(&[u8], usize)> {
        let rest = self.blob.get(off..)?;
        let end = rest.iter().position(|b| *b == 0)?;
        Some((&rest[..end], off + end + 1))
    }
}

/// Reads an unsigned LEB128 value from `b` at `*off`.
fn uleb128(b: &[u8], off: &mut usize) -> Option<u32> {
    let mut v: u32 = 0;
    let mut shift = 0;
    loop {
        let byte = *b.get(*off)?;
        *off += 1;
        v |= u32::from(byte & 0x7f).checked_shl(shift)?;
        if byte & 0x80 == 0 {
            return Some(v);
        }
        shift += 7;
        if shift > 28 {
            return None;
        }
    }
}

/// Names of LuaJIT's internal loop variables, in their numbering order (1 upwards).
const INTERNAL_VARNAMES: [&str; 6] = [
    "(for index)",
    "(for limit)",
    "(for step)",
    "(for generator)",
    "(for state)",
    "(for control)",
];

impl ProtoView for Proto {
    fn ins(&self, pc: usize) -> Option<Ins> {
        if pc >= self.sizebc as usize {
            return None;
        }
        le_u32(&self.blob, self.layout.bpf.pt_size + (pc as u32) * 4).map(Ins)
    }

    fn kstr(&self, idx: u32) -> Option<String> {
        if idx >= self.sizekgc {
            return None;
        }
        let width = if self.layout.bpf.gc64 != 0 { 8 } else { 4 };
        let at = self.k.checked_sub(u64::from(idx + 1) * width)?;
        let off = self.blob_off(at)? as u32;
        let sref = le_ref(self.layout, &self.blob, off)?;
        read_str(&*self.mem, self.layout, sref).ok()
    }

    fn uvname(&self, idx: u32) -> Option<String> {
        if idx >= self.sizeuv || self.uvinfo == 0 {
            return None;
        }
        let mut off = self.blob_off(self.uvinfo)?;
        for _ in 0..idx {
            off = self.cstr_at(off)?.1;
        }
        let (name, _) = self.cstr_at(off)?;
        Some(String::from_utf8_lossy(name).into_owned())
    }

    fn varname(&self, pc: usize, mut slot: u32) -> Option<String> {
        if self.varinfo == 0 {
            return None;
        }
        let mut off = self.blob_off(self.varinfo)?;
        let mut lastpc: u32 = 0;
        // Every entry consumes at least two bytes of the bounded blob.
        for _ in 0..self.blob.len() {
            let vn = *self.blob.get(off)?;
            let name: Option<String> = if vn == 0 {
                return None;
            } else if (vn as usize) <= INTERNAL_VARNAMES.len() {
                off += 1;
                Some(INTERNAL_VARNAMES[vn as usize - 1].to_owned())
            } else {
                let (s, next) = self.cstr_at(off)?;
                off = next;
                Some(String::from_utf8_lossy(s).into_owned())
            };
            let startpc = lastpc.checked_add(uleb128(&self.blob, &mut off)?)?;
            lastpc = startpc;
            if startpc as usize > pc {
                return None;
            }
            let endpc = startpc.checked_add(uleb128(&self.blob, &mut off)?)?;
            if pc < endpc as usize {
                if slot == 0 {
                    return name;
                }
                slot -= 1;
            }
        }
        None
    }

    fn fr2(&self) -> bool {
        self.layout.bpf.gc64 != 0
    }
}

/// Bytes counted for each cached prototype or label besides its own bytes (map entry,
/// allocation headers).
const ENTRY_OVERHEAD: usize = 64;

/// Frame names for one process at a time, with a prototype cache per process. Both caches
/// are fed by target memory, so each is capped in bytes (`limits.proto_cache_bytes`,
/// `limits.label_cache_bytes`) and starts afresh when full.
#[derive(Debug, Default)]
pub struct LuaNamer {
    protos: HashMap<(u32, u64), Arc<Proto>>,
    /// Bytes of `protos` (blobs, chunk names, overhead).
    proto_bytes: usize,
    /// Bytes of `labels`.
    label_bytes: usize,
    /// The caps (`None` until [`LuaNamer::set_limits`]: the defaults of
    /// [`crate::stacks::CacheLimits`]).
    limits: Option<crate::stacks::CacheLimits>,
    /// Every label made so far, shared by the stacks that hold it (the daemon keeps minutes
    /// of stacks; the pprof encoder knows a frame by its label's address).
    labels: HashSet<Arc<str>>,
    /// The plugins each process's gateway names ([`crate::plugin_map`]).
    plugins: PluginMaps,
    /// Prototypes that failed validation, frames whose current line could not be found
    /// (`proto_line_unknown`: the PC is outside the bytecode, or no line info), the plugin
    /// maps' failures (`plugin_map_*`) and samples in a plugin file's code that no plugin
    /// map names (`plugin_name_*`, see [`LuaNamer::gateway_names`]), by reason.
    pub errors: HashMap<&'static str, u64>,
}

impl LuaNamer {
    /// An empty namer.
    pub fn new() -> Self {
        Self::default()
    }

    /// Caps the caches at `limits`.
    pub fn set_limits(&mut self, limits: crate::stacks::CacheLimits) {
        self.limits = Some(limits);
    }

    fn limits(&self) -> crate::stacks::CacheLimits {
        self.limits.unwrap_or_default()
    }

    /// Bytes held by the prototype and label caches.
    pub fn cached_bytes(&self) -> (usize, usize) {
        (self.proto_bytes, self.label_bytes)
    }

    /// The shared copy of `label`.
    fn label(&mut self, label: String) -> Arc<str> {
        if let Some(l) = self.labels.get(label.as_str()) {
            return l.clone();
        }
        let size = label.len() + ENTRY_OVERHEAD;
        if self.labels.len() > 100_000 || self.label_bytes + size > self.limits().label_bytes {
            self.labels.clear();
            self.label_bytes = 0;
        }
        self.label_bytes += size;
        let l: Arc<str> = Arc::from(label);
        self.labels.insert(l.clone());
        l
    }

    /// Drops the prototypes and the plugin map cached for process `pid`.
    pub fn forget(&mut self, pid: u32) {
        self.protos.retain(|(p, _), _| *p != pid);
        self.proto_bytes = self.protos.values().map(|p| p.bytes()).sum();
        self.plugins.forget(pid);
    }

    /// Plugins and functions in the plugin map of `pid`, once one was read.
    pub fn plugin_map_summary(&self, pid: u32) -> Option<(usize, usize)> {
        self.plugins.summary(pid)
    }

    /// The plugin the gateway names for each frame (innermost first). A sample with a frame
    /// in a plugin file's code and no named frame is counted once, by what its outermost
    /// such frame got: `plugin_name_func_unknown` (a compiled trace's snapshot did not hold
    /// the function), `plugin_name_not_in_map`, `plugin_name_stale` (the address now holds
    /// another prototype), `plugin_name_ambiguous` (two plugins reach the function),
    /// `plugin_name_no_map` (no map could be read). Such samples fall back to the file
    /// rules.
    fn gateway_names(
        &mut self,
        pid: u32,
        frames: &[LuaFrame],
        protos: &[Option<Arc<Proto>>],
    ) -> Vec<Option<Arc<str>>> {
        let mut out = vec![None; frames.len()];
        let mut fallback = None;
        for (i, (f, p)) in frames.iter().zip(protos).enumerate() {
            let Some(p) = p else { continue };
            let found = (f.func != 0).then(|| self.plugins.lookup(pid, f.func, f.code));
            let reason = match found {
                Some(Lookup::Named(n)) => {
                    out[i] = Some(n);
                    continue;
                }
                None => "plugin_name_func_unknown",
                Some(Lookup::Unknown) => "plugin_name_not_in_map",
                Some(Lookup::Stale) => "plugin_name_stale",
                Some(Lookup::Ambiguous) => "plugin_name_ambiguous",
                Some(Lookup::NoMap) => "plugin_name_no_map",
            };
            if is_plugin_chunk(&p.chunk) {
                // Frames are innermost first: the last one kept is the outermost.
                fallback = Some((reason, f.func));
            }
        }
        if let Some((reason, func)) = fallback
            && out.iter().all(Option::is_none)
        {
            *self.errors.entry(reason).or_insert(0) += 1;
            // A function the map may not know yet (a plugin reloaded): read it again soon.
            if matches!(reason, "plugin_name_not_in_map" | "plugin_name_stale") {
                self.plugins.ask_rebuild(pid, func);
            }
        }
        out
    }

    fn proto(&mut self, pid: u32, layout: &'static Layout, f: &LuaFrame) -> Option<Arc<Proto>> {
        if let Some(p) = self.protos.get(&(pid, f.code))
            && p.matches(f)
        {
            return Some(p.clone());
        }
        match Proto::read(
            Arc::new(Memory::new(pid)),
            layout,
            f.code,
            f.chunkname,
            f.firstline,
        ) {
            Ok(p) => {
                let p = Arc::new(p);
                let size = p.bytes();
                if self.protos.len() > 100_000
                    || self.proto_bytes + size > self.limits().proto_bytes
                {
                    self.protos.clear();
                    self.proto_bytes = 0;
                }
                self.proto_bytes += size;
                if let Some(old) = self.protos.insert((pid, f.code), p.clone()) {
                    self.proto_bytes = self.proto_bytes.saturating_sub(old.bytes());
                }
                Some(p)
            }
            Err(e) => {
                let reason = match e {
                    ProtoError::Read { .. } => "proto_read_failed",
                    ProtoError::NotProto { .. } => "proto_invalid",
                    ProtoError::Changed { .. } => "proto_freed",
                    ProtoError::BadString { .. } => "proto_bad_chunkname",
                };
                *self.errors.entry(reason).or_insert(0) += 1;
                None
            }
        }
    }

    /// Names `frames` (innermost first, as walked) and splits them into segments, root
    /// first, each starting at a function entered from C. Each label comes with its frame's
    /// current line (Lua) or module (C).
    ///
    /// `l` is the sampled `lua_State` (its VM's plugin map names the frames of plugins,
    /// see [`attribution::gateway_function`]).
    #[expect(
        clippy::too_many_arguments,
        reason = "one sample's context, passed through"
    )]
    pub fn segments(
        &mut self,
        pid: u32,
        target: &LuaTarget,
        l: u64,
        frames: &[LuaFrame],
        style: NameStyle,
        symbolizer: &mut Symbolizer,
        modules: &ProcessModules,
    ) -> Vec<Vec<(Arc<str>, FrameDetail)>> {
        let layout = target.flavour.layout();
        let protos: Vec<Option<Arc<Proto>>> = frames
            .iter()
            .map(|f| {
                (f.kind == LuaFrameKind::Lua as u8)
                    .then(|| self.proto(pid, layout, f))
                    .flatten()
            })
            .collect();
        let errors = &mut self.errors;
        self.plugins.prepare(pid, layout, l, errors);
        let gateway = self.gateway_names(pid, frames, &protos);
        let mut segments: Vec<Vec<(Arc<str>, FrameDetail)>> = vec![Vec::new()];
        for i in (0..frames.len()).rev() {
            let f = &frames[i];
            let mut detail = FrameDetail::default();
            let label: Arc<str> = if f.kind == LuaFrameKind::Lua as u8 {
                match &protos[i] {
                    Some(p) => {
                        let name = function_name(frames, &protos, i, p);
                        let name = match &gateway[i] {
                            Some(plugin) => attribution::gateway_function(plugin, &name),
                            None => name,
                        };
                        // An unknown current line stays unknown (0) in the details; the
                        // current-line label falls back to the first line (see
                        // [`NameStyle::CurrentLine`]).
                        let current = p.pc_index(f.pc).and_then(|pc| p.line(pc));
                        if current.is_none() {
                            *self.errors.entry("proto_line_unknown").or_insert(0) += 1;
                        }
                        detail.line = current.unwrap_or(0);
                        let line = match style {
                            NameStyle::FirstLine => p.firstline,
                            NameStyle::CurrentLine => current.unwrap_or(p.firstline),
                        };
                        self.label(format!("{name}@{}:{line}", p.chunk))
                    }
                    None => Arc::from("[lua:unknown]"),
                }
            } else if f.kind == LuaFrameKind::Fast as u8 {
                match ffnames::name(&target.flavour, f.ffid) {
                    Some(n) => self.label(format!("builtin:{n}")),
                    None => self.label(format!("builtin#{}", f.ffid)),
                }
            } else {
                match modules.find(f.code) {
                    Some(m) => {
                        detail.module = ModuleId::of(&m.elf.name);
                        symbolizer.user(m, f.code)
                    }
                    None => Arc::from(format!("cfunc:{:#x}", f.code)),
                }
            };
            if f.link & 3 == 1 && segments.last().is_some_and(|s| !s.is_empty()) {
                segments.push(Vec::new());
            }
            if let Some(seg) = segments.last_mut() {
                seg.push((label, detail));
            }
        }
        segments.retain(|s| !s.is_empty());
        segments
    }
}

/// The labels of Lua `frames` (innermost first), prototypes read from `mem`, as
/// [`LuaNamer::segments`] gives them outside plugins (no plugin map):
/// `NAME@FILE:CURRENTLINE`, or `NAME@FILE:FIRSTLINE` when the current line is unknown.
/// `None` for a frame that is not Lua or whose prototype does not read. Nothing is cached:
/// for tests against recorded memory and for recording them.
pub fn plain_labels(
    mem: &Arc<dyn TargetMemory + Send + Sync>,
    layout: &'static Layout,
    frames: &[LuaFrame],
) -> Vec<Option<String>> {
    let protos: Vec<Option<Arc<Proto>>> = frames
        .iter()
        .map(|f| {
            (f.kind == LuaFrameKind::Lua as u8)
                .then(|| Proto::read(mem.clone(), layout, f.code, f.chunkname, f.firstline).ok())
                .flatten()
                .map(Arc::new)
        })
        .collect();
    (0..frames.len())
        .map(|i| {
            let p = protos[i].as_ref()?;
            let name = function_name(frames, &protos, i, p);
            let line = p
                .pc_index(frames[i].pc)
                .and_then(|pc| p.line(pc))
                .unwrap_or(p.firstline);
            Some(format!("{name}@{}:{line}", p.chunk))
        })
        .collect()
}

/// The name of Lua frame `i` (innermost first) of prototype `p`: called from Lua, the
/// caller's CALL instruction names it; else `[main]` for a main chunk, `anonymous`. A name
/// from the bytecode never opens with `[`, which marks names the agent gives (`[main]`, a
/// plugin's `[NAME]`): such a name gets a `_` in front.
fn function_name(
    frames: &[LuaFrame],
    protos: &[Option<Arc<Proto>>],
    i: usize,
    p: &Proto,
) -> String {
    let called = if frames[i].link & 3 == 0 {
        frames
            .get(i + 1)
            .zip(protos.get(i + 1).and_then(Option::as_ref))
            .and_then(|(cf, cp)| cp.pc_index(cf.pc).and_then(|pc| cp.call_name(pc)))
    } else {
        None
    };
    match called {
        Some(n) if n.starts_with('[') => format!("_{n}"),
        Some(n) => n,
        None if p.firstline == 0 => "[main]".to_owned(),
        None => "anonymous".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uleb128_decodes_and_bounds() {
        let b = [0x05, 0xe5, 0x8e, 0x26, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01];
        let mut off = 0;
        assert_eq!(uleb128(&b, &mut off), Some(5));
        assert_eq!(uleb128(&b, &mut off), Some(624_485));
        assert_eq!(uleb128(&b, &mut off), None, "too long");
        let mut off = 20;
        assert_eq!(uleb128(&b, &mut off), None, "out of range");
    }

    use crate::{
        luajit::trace_fixture::{Outcome, TraceFixture},
        proc::recorded::RecordedMemory,
    };

    /// The recorded runs (see `luajit/trace_fixture.rs`): each sample's inlined frames and
    /// base frame, the labels the live run gave them, the memory and the layout.
    /// Frames (inlined, then the base) and the labels the live run gave them.
    type Case = (Vec<LuaFrame>, Vec<Option<String>>);

    fn fixtures() -> Vec<(TraceFixture, RecordedMemory, Vec<Case>)> {
        [
            include_str!("../../tests/data/trace-gc64.json"),
            include_str!("../../tests/data/trace-gc32.json"),
        ]
        .iter()
        .map(|json| {
            let f: TraceFixture = serde_json::from_str(json).expect("fixture");
            let mem = RecordedMemory::from_fixture(&f.memory).expect("memory");
            let cases = f
                .samples
                .iter()
                .filter_map(|s| match &s.outcome {
                    Outcome::Frames {
                        base_pc,
                        frames,
                        labels,
                        ..
                    } => {
                        let mut all: Vec<LuaFrame> = frames.iter().map(LuaFrame::from).collect();
                        let mut base = LuaFrame::from(&s.base);
                        if *base_pc != 0 {
                            base.pc = *base_pc;
                        }
                        all.push(base);
                        Some((all, labels.clone()))
                    }
                    Outcome::Fallback(_) => None,
                })
                .collect();
            (f, mem, cases)
        })
        .collect()
    }

    #[test]
    fn recorded_prototypes_name_frames_as_the_live_run_did() {
        for (f, mem, cases) in fixtures() {
            let layout = f.layout().expect("layout");
            let mem: Arc<dyn TargetMemory + Send + Sync> = Arc::new(mem);
            assert!(cases.len() >= 8);
            for (frames, labels) in &cases {
                let got = plain_labels(&mem, layout, frames);
                assert_eq!(&got, labels, "{}", f.layout);
                assert!(
                    got.iter()
                        .all(|l| l.as_ref().is_some_and(|l| l.contains(".lua:")))
                );
            }
            // The inlined functions are named by their callers' call sites.
            let names: HashSet<String> = cases
                .iter()
                .flat_map(|(_, l)| l.iter().flatten())
                .filter_map(|l| l.split('@').next().map(str::to_owned))
                .collect();
            assert!(names.contains("pc") && names.contains("pbr"), "{names:?}");
        }
    }

    #[test]
    fn a_prototype_that_changed_or_is_garbage_names_nothing() {
        for (f, mem, cases) in fixtures() {
            let layout = f.layout().expect("layout");
            let (frames, _) = &cases[0];
            let p = frames[0];
            // The frame says another first line: the prototype was freed and reused.
            let mut moved = p;
            moved.firstline += 1;
            let shared: Arc<dyn TargetMemory + Send + Sync> = Arc::new(mem.clone());
            assert!(matches!(
                Proto::read(
                    shared.clone(),
                    layout,
                    moved.code,
                    moved.chunkname,
                    moved.firstline
                ),
                Err(ProtoError::Changed { .. })
            ));
            // Not a prototype object.
            let mut bad = mem.clone();
            bad.bytes_mut(p.code + u64::from(layout.bpf.fn_gct), 1)
                .expect("recorded")[0] ^= 0xff;
            let bad: Arc<dyn TargetMemory + Send + Sync> = Arc::new(bad);
            assert!(matches!(
                Proto::read(bad.clone(), layout, p.code, p.chunkname, p.firstline),
                Err(ProtoError::NotProto { .. })
            ));
            assert_eq!(plain_labels(&bad, layout, &frames[..1]), vec![None]);
            // Unreadable.
            let empty: Arc<dyn TargetMemory + Send + Sync> = Arc::new(RecordedMemory::default());
            assert!(matches!(
                Proto::read(empty, layout, p.code, p.chunkname, p.firstline),
                Err(ProtoError::Read { .. })
            ));
        }
    }
}
