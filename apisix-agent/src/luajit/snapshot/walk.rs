//! The breadth-first walk of a snapshot: one visitor per GC type, each checking the
//! object's type byte, sizing it as LuaJIT does (`GCtab` plus its array and hash node parts,
//! `GCstr` plus its bytes and a NUL, `GCfuncL`/`GCfuncC` by upvalue count, a prototype's
//! `sizept`, `GCudata` plus its payload, `lua_State` plus its stack, `GCupval`) and queueing
//! what it references. An object is marked visited when first queued, so the queue and the
//! visited set never exceed [`Limits::objects`]; the visited set is a bitmap of 8-byte
//! slots per MiB of the target's address space touched (16 KiB each, at most
//! `objects / 64 + 64` regions).
//!
//! Hooks: reads through [`ChunkCache`]. Metrics: none (counts in [`Walk`]).

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    time::Instant,
};

use super::{
    Kind, Limits,
    cache::{CacheError, ChunkCache, MAX_GET},
    paths::{Paths, ROOT, escape_key},
};
use crate::{
    luajit::layout::{GCROOT_MAX, Layout, gct},
    proc::memory::TargetMemory,
};

/// LuaJIT's largest array part (`LJ_MAX_ASIZE`) and hash part (`2^LJ_MAX_HBITS` nodes),
/// string (`LJ_MAX_STR`) and stack (slots; `LJ_STACK_MAX` plus slack).
const MAX_ASIZE: u64 = (1 << 27) + 1;
const MAX_HNODES: u64 = 1 << 26;
const MAX_STR: u64 = 0x7fff_ff00;
const MAX_STACK: u64 = 1 << 20;
/// Most upvalues of a function (`LJ_MAX_UPVAL`).
const MAX_UPVAL: u64 = 60;
/// A prototype's GC constants read at most (`LJ_MAX_KGC`-ish bound).
const MAX_KGC: u64 = 1 << 16;
/// Upvalue name lists remembered per prototype.
const MAX_UVNAMES: usize = 1 << 16;
/// Bytes of one visited-set region, and its bitmap in words.
const REGION_SHIFT: u32 = 20;
const REGION_WORDS: usize = (1 << REGION_SHIFT) / 8 / 64;
/// How often the deadline is checked (visits).
const CHECK_EVERY: u64 = 4096;

/// How a queued object's path follows its holder's.
enum Edge<'a> {
    /// The same path (a prototype under its function, an upvalue's value under it).
    Same,
    Label(&'a str),
    /// A string key's name (read when the object is first queued).
    Key(u64),
}

/// Objects seen, one bit per 8-byte slot of each MiB region touched.
struct Visited {
    regions: HashMap<u64, Box<[u64]>>,
    max_regions: usize,
}

impl Visited {
    /// Marks `addr`; false if it was already marked, `None` if the set is full.
    fn insert(&mut self, addr: u64) -> Option<bool> {
        let region = addr >> REGION_SHIFT;
        let slot = ((addr & ((1 << REGION_SHIFT) - 1)) / 8) as usize;
        if !self.regions.contains_key(&region) && self.regions.len() >= self.max_regions {
            return None;
        }
        let bits = self
            .regions
            .entry(region)
            .or_insert_with(|| vec![0u64; REGION_WORDS].into_boxed_slice());
        let (w, b) = (slot / 64, slot % 64);
        let was = bits[w] & (1 << b) != 0;
        bits[w] |= 1 << b;
        Some(!was)
    }
}

fn le_u32(b: &[u8], off: u32) -> u64 {
    let off = off as usize;
    b.get(off..off + 4)
        .and_then(|s| s.try_into().ok())
        .map_or(0, |s| u64::from(u32::from_le_bytes(s)))
}

fn le_u64(b: &[u8], off: u32) -> u64 {
    let off = off as usize;
    b.get(off..off + 8)
        .and_then(|s| s.try_into().ok())
        .map_or(0, u64::from_le_bytes)
}

/// One walk's state.
pub(super) struct Walk<'m> {
    pub cache: ChunkCache<'m>,
    layout: &'static Layout,
    limits: Limits,
    g: u64,
    visited: Visited,
    queue: VecDeque<(u64, u32)>,
    pub paths: Paths,
    pub bytes: HashMap<(u32, Kind), u64>,
    pub by_kind: BTreeMap<Kind, (u64, u64)>,
    pub errors: BTreeMap<&'static str, u64>,
    pub objects: u64,
    pub reached: u64,
    pub truncated: Option<&'static str>,
    uvnames: HashMap<u64, Vec<Box<str>>>,
    /// Reused buffer of raw `TValue`s or references.
    words: Vec<u64>,
}

impl<'m> Walk<'m> {
    pub fn new(
        mem: &'m dyn TargetMemory,
        layout: &'static Layout,
        g: u64,
        limits: &Limits,
    ) -> Self {
        Self {
            cache: ChunkCache::new(mem, limits.cache_bytes, limits.read_bytes),
            layout,
            limits: *limits,
            g,
            visited: Visited {
                regions: HashMap::new(),
                max_regions: usize::try_from(limits.objects / 64 + 64).unwrap_or(usize::MAX),
            },
            queue: VecDeque::new(),
            paths: Paths::new(limits.paths, limits.depth),
            bytes: HashMap::new(),
            by_kind: BTreeMap::new(),
            errors: BTreeMap::new(),
            objects: 0,
            reached: 0,
            truncated: None,
            uvnames: HashMap::new(),
            words: Vec::new(),
        }
    }

    fn gc64(&self) -> bool {
        self.layout.bpf.gc64 != 0
    }

    fn refw(&self) -> u32 {
        if self.gc64() { 8 } else { 4 }
    }

    fn count(&mut self, reason: &'static str) {
        *self.errors.entry(reason).or_insert(0) += 1;
    }

    /// A GC or memory reference of the layout's width in `b` at `off`.
    fn gcref(&self, b: &[u8], off: u32) -> u64 {
        if self.gc64() {
            le_u64(b, off)
        } else {
            le_u32(b, off)
        }
    }

    /// The GC object a raw `TValue` refers to, if any (strings to userdata: tags `~4` to
    /// `~12`).
    fn tv_object(&self, raw: u64) -> Option<u64> {
        let (itype, r) = if self.gc64() {
            (((raw as i64) >> 47) as u32, raw & ((1 << 47) - 1))
        } else {
            ((raw >> 32) as u32, raw & 0xffff_ffff)
        };
        (4..=12).contains(&!itype).then_some(r)
    }

    /// Reads `len` bytes at `addr` into an owned buffer (object headers: small).
    fn head(&mut self, addr: u64, len: u32) -> Result<Vec<u8>, CacheError> {
        self.cache.read(addr, len as usize).map(<[u8]>::to_vec)
    }

    /// Reads `n` words of `width` bytes at `addr`, in pieces of at most [`MAX_GET`] bytes
    /// holding whole items of `unit` words, and hands each piece to `f`.
    fn pieces(
        &mut self,
        addr: u64,
        n: u64,
        width: u32,
        unit: u64,
        mut f: impl FnMut(&mut Self, &[u64]),
    ) -> Result<(), CacheError> {
        let per = (MAX_GET as u64 / u64::from(width) / unit).max(1) * unit;
        let mut words = std::mem::take(&mut self.words);
        let mut done = 0;
        let mut result = Ok(());
        while done < n {
            let take = per.min(n - done);
            let at = addr.wrapping_add(done * u64::from(width));
            words.clear();
            match self.cache.read(at, (take * u64::from(width)) as usize) {
                Ok(b) => words.extend(b.chunks_exact(width as usize).map(|c| {
                    if width == 8 {
                        u64::from_le_bytes(c.try_into().unwrap_or_default())
                    } else {
                        u64::from(u32::from_le_bytes(c.try_into().unwrap_or_default()))
                    }
                })),
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
            f(self, &words);
            done += take;
        }
        self.words = words;
        result
    }

    /// Queues `addr` under `path` then `edge`, unless seen.
    fn push(&mut self, addr: u64, path: u32, edge: Edge<'_>) {
        if addr == 0 || self.truncated.is_some() {
            return;
        }
        if !addr.is_multiple_of(4) {
            self.count("misaligned_ref");
            return;
        }
        match self.visited.insert(addr) {
            Some(false) => return,
            None => {
                self.truncated = Some("visited_regions");
                return;
            }
            Some(true) => {}
        }
        if self.queue.len() as u64 + self.objects >= self.limits.objects {
            self.truncated = Some("objects");
            return;
        }
        let path = match edge {
            Edge::Same => path,
            Edge::Label(l) => self.paths.child(path, l),
            Edge::Key(s) => {
                let label = self.key_label(s);
                self.paths.child(path, &label)
            }
        };
        self.queue.push_back((addr, path));
    }

    /// A string key as a label (`[key?]` when it cannot be read).
    fn key_label(&mut self, s: u64) -> String {
        let l = self.layout;
        let max = self.limits.key_len;
        let Ok(head) = self.head(s, l.str_size) else {
            return "[key?]".to_owned();
        };
        if head.get(l.bpf.fn_gct as usize) != Some(&gct::STR) {
            return "[key?]".to_owned();
        }
        let len = le_u32(&head, l.str_len) as usize;
        let take = len.min(max + 1);
        match self.cache.read(s + u64::from(l.str_size), take) {
            Ok(b) => escape_key(b, take == len, max),
            Err(_) => "[key?]".to_owned(),
        }
    }

    fn account(&mut self, path: u32, kind: Kind, size: u64) {
        *self.bytes.entry((path, kind)).or_insert(0) += size;
        let e = self.by_kind.entry(kind).or_insert((0, 0));
        e.0 += 1;
        e.1 += size;
        self.objects += 1;
        self.reached += size;
    }

    /// Queues the roots, then visits until the queue is empty or a limit is reached.
    pub fn run(&mut self, deadline: Instant) {
        let (l, g) = (self.layout, self.g);
        let refw = self.refw();
        match self.head(g, l.objects.g_gcroot + GCROOT_MAX * refw) {
            Ok(gs) => {
                if let Some(r) = self.tv_object(le_u64(&gs, l.values.g_registrytv)) {
                    self.push(r, ROOT, Edge::Label("registry"));
                }
                let main = self.gcref(&gs, l.heap.g_mainthref);
                self.push(main, ROOT, Edge::Label("[main thread]"));
                for i in 0..GCROOT_MAX {
                    let r = self.gcref(&gs, l.objects.g_gcroot + i * refw);
                    self.push(r, ROOT, Edge::Label("[gc roots]"));
                }
            }
            Err(e) => self.count(e.reason()),
        }
        let mut visits = 0u64;
        while let Some((addr, path)) = self.queue.pop_front() {
            visits += 1;
            if visits.is_multiple_of(CHECK_EVERY) && Instant::now() >= deadline {
                self.truncated = Some("time");
                break;
            }
            if let Err(e) = self.visit(addr, path) {
                if e == CacheError::Budget {
                    self.truncated = Some("read_bytes");
                    break;
                }
                self.count(e.reason());
            }
        }
        if self.truncated.is_some() {
            self.queue.clear();
        }
    }

    /// Visits one object by its type byte.
    fn visit(&mut self, addr: u64, path: u32) -> Result<(), CacheError> {
        let at = self.layout.bpf.fn_gct;
        let t = self.head(addr, at + 1)?[at as usize];
        match t {
            gct::TAB => self.table(addr, path),
            gct::STR => self.string(addr, path),
            gct::FUNC => self.function(addr, path),
            gct::PROTO => self.proto(addr, path),
            gct::THREAD => self.thread(addr, path),
            gct::UPVAL => self.upvalue(addr, path),
            gct::UDATA => self.udata(addr, path),
            gct::CDATA => {
                self.account(path, Kind::Cdata, u64::from(self.layout.objects.cd_size));
                Ok(())
            }
            _ => {
                self.count("unknown_type");
                Ok(())
            }
        }
    }

    fn string(&mut self, addr: u64, path: u32) -> Result<(), CacheError> {
        let l = self.layout;
        let h = self.head(addr, l.str_size)?;
        let len = le_u32(&h, l.str_len);
        if len > MAX_STR {
            self.count("implausible_string");
            return Ok(());
        }
        self.account(path, Kind::String, u64::from(l.str_size) + len + 1);
        Ok(())
    }

    fn table(&mut self, addr: u64, path: u32) -> Result<(), CacheError> {
        let l = self.layout;
        let (v, o) = (&l.values, &l.objects);
        let h = self.head(addr, v.t_size)?;
        let (asize, hmask) = (le_u32(&h, v.t_asize), le_u32(&h, v.t_hmask));
        let (array, node) = (self.gcref(&h, v.t_array), self.gcref(&h, v.t_node));
        let mt = self.gcref(&h, v.t_metatable);
        if asize > MAX_ASIZE || hmask >= MAX_HNODES {
            self.count("implausible_table");
            return Ok(());
        }
        let nilnode = self.g + u64::from(o.g_nilnode);
        let nodes = if node == nilnode { 0 } else { hmask + 1 };
        let size = u64::from(v.t_size) + asize * 8 + nodes * u64::from(v.node_size);
        self.account(path, Kind::Table, size);
        self.push(mt, path, Edge::Label("[metatable]"));
        if asize > 0 {
            let r = self.pieces(array, asize, 8, 1, |w, words| {
                for &raw in words {
                    if let Some(r) = w.tv_object(raw) {
                        w.push(r, path, Edge::Label("[array]"));
                    }
                }
            });
            if let Err(e) = r {
                self.count_part(e, "array_part")?;
            }
        }
        if nodes > 0 {
            let named = nodes <= u64::from(self.limits.named_keys);
            let unit = u64::from(v.node_size / 8);
            let r = self.pieces(node, nodes * unit, 8, unit, |w, words| {
                w.hash_part(words, path, named);
            });
            if let Err(e) = r {
                self.count_part(e, "hash_part")?;
            }
        }
        Ok(())
    }

    /// Counts a failed read of a table's part; the budget ends the walk.
    fn count_part(&mut self, e: CacheError, what: &'static str) -> Result<(), CacheError> {
        if e == CacheError::Budget {
            return Err(e);
        }
        self.count(what);
        Ok(())
    }

    /// Queues the keys and values of the hash nodes in `words`.
    fn hash_part(&mut self, words: &[u64], path: u32, named: bool) {
        let v = &self.layout.values;
        let (stride, key) = ((v.node_size / 8) as usize, (v.node_key / 8) as usize);
        for n in words.chunks_exact(stride) {
            let (val, k) = (n[0], n[key]);
            if val == u64::MAX {
                continue; // nil value: a free or dead node
            }
            let key_obj = self.tv_object(k);
            if let Some(r) = self.tv_object(val) {
                let edge = match key_obj {
                    Some(s) if named && self.is_str_tv(k) => Edge::Key(s),
                    Some(_) => Edge::Label("[hash]"),
                    None if k != u64::MAX && self.is_num_tv(k) => Edge::Label("[number]"),
                    None => Edge::Label("[hash]"),
                };
                self.push(r, path, edge);
            }
            if let Some(r) = key_obj {
                self.push(r, path, Edge::Label("[key]"));
            }
        }
    }

    fn itype(&self, raw: u64) -> u32 {
        if self.gc64() {
            ((raw as i64) >> 47) as u32
        } else {
            (raw >> 32) as u32
        }
    }

    fn is_str_tv(&self, raw: u64) -> bool {
        self.itype(raw) == !4
    }

    fn is_num_tv(&self, raw: u64) -> bool {
        self.itype(raw) <= !13
    }

    fn function(&mut self, addr: u64, path: u32) -> Result<(), CacheError> {
        let l = self.layout;
        let o = &l.objects;
        let refw = self.refw();
        let h = self.head(addr, o.fn_c_upvalue)?;
        let n = u64::from(h[l.values.fn_nupvalues as usize]);
        let env = self.gcref(&h, o.fn_env);
        if h[l.bpf.fn_ffid as usize] != 0 {
            // A C function: upvalues are TValues inline.
            let size = u64::from(o.fn_c_upvalue) + 8 * n;
            self.account(path, Kind::Function, size);
            self.push(env, path, Edge::Label("[env]"));
            self.pieces(addr + u64::from(o.fn_c_upvalue), n, 8, 1, |w, words| {
                for &raw in words {
                    if let Some(r) = w.tv_object(raw) {
                        w.push(r, path, Edge::Label("[upvalue]"));
                    }
                }
            })?;
            return Ok(());
        }
        if n > MAX_UPVAL {
            self.count("implausible_function");
            return Ok(());
        }
        let size = u64::from(l.values.fn_uvptr) + u64::from(refw) * n;
        self.account(path, Kind::Function, size);
        let proto = self
            .gcref(&h, l.bpf.fn_pc)
            .wrapping_sub(u64::from(l.bpf.pt_size));
        self.push(proto, path, Edge::Same);
        self.push(env, path, Edge::Label("[env]"));
        if n > 0 {
            let names = self.upvalue_names(proto);
            self.pieces(
                addr + u64::from(l.values.fn_uvptr),
                n,
                refw,
                1,
                |w, words| {
                    for (i, &uv) in words.iter().enumerate() {
                        let label = match names.get(i) {
                            Some(name) => format!("[upvalue {name}]"),
                            None => "[upvalue]".to_owned(),
                        };
                        w.push(uv, path, Edge::Label(&label));
                    }
                },
            )?;
        }
        Ok(())
    }

    /// The upvalue names of prototype `proto` from its debug info (none when stripped or
    /// unreadable), remembered per prototype.
    fn upvalue_names(&mut self, proto: u64) -> Vec<Box<str>> {
        if let Some(n) = self.uvnames.get(&proto) {
            return n.clone();
        }
        let l = self.layout;
        let names = (|| {
            let h = self.head(proto, l.bpf.pt_size).ok()?;
            if h[l.bpf.fn_gct as usize] != gct::PROTO {
                return None;
            }
            let count = le_u32(&h, l.pt_sizeuv) & 0xff;
            let uvinfo = self.gcref(&h, l.pt_uvinfo);
            if uvinfo == 0 || count == 0 {
                return None;
            }
            // Names are NUL-terminated, one after the other.
            let b = self.cache.read(uvinfo, (count as usize) * 32).ok()?;
            let out: Vec<Box<str>> = b
                .split(|&c| c == 0)
                .take(count as usize)
                .map(|s| escape_key(s, true, self.limits.key_len).into_boxed_str())
                .collect();
            Some(out)
        })()
        .unwrap_or_default();
        if self.uvnames.len() >= MAX_UVNAMES {
            self.uvnames.clear();
        }
        self.uvnames.insert(proto, names.clone());
        names
    }

    fn proto(&mut self, addr: u64, path: u32) -> Result<(), CacheError> {
        let l = self.layout;
        let refw = self.refw();
        let h = self.head(addr, l.bpf.pt_size)?;
        let sizept = le_u32(&h, l.pt_sizept);
        let sizekgc = le_u32(&h, l.pt_sizekgc);
        let k = self.gcref(&h, l.pt_k);
        if sizept < u64::from(l.bpf.pt_size) || sizept > MAX_STR || sizekgc > MAX_KGC {
            self.count("implausible_proto");
            return Ok(());
        }
        self.account(path, Kind::Proto, sizept);
        self.push(self.gcref(&h, l.bpf.pt_chunkname), path, Edge::Same);
        if sizekgc > 0 {
            // GC constants lie below `k`, the last one lowest.
            let low = k.wrapping_sub(sizekgc * u64::from(refw));
            self.pieces(low, sizekgc, refw, 1, |w, words| {
                for &r in words {
                    w.push(r, path, Edge::Label("[constant]"));
                }
            })?;
        }
        Ok(())
    }

    fn thread(&mut self, addr: u64, path: u32) -> Result<(), CacheError> {
        let l = self.layout;
        let o = &l.objects;
        let h = self.head(addr, l.heap.gg_g)?;
        let stack = self.gcref(&h, l.bpf.l_stack);
        let stacksize = le_u32(&h, l.bpf.l_stacksize);
        let top = le_u64(&h, o.l_top);
        if stacksize > MAX_STACK || top < stack || (top - stack) / 8 > stacksize {
            self.count("implausible_thread");
            return Ok(());
        }
        self.account(path, Kind::Thread, u64::from(l.heap.gg_g) + stacksize * 8);
        self.push(self.gcref(&h, o.l_env), path, Edge::Label("[env]"));
        let slots = (top - stack) / 8;
        self.pieces(stack, slots, 8, 1, |w, words| {
            for &raw in words {
                if let Some(r) = w.tv_object(raw) {
                    w.push(r, path, Edge::Label("[stack]"));
                }
            }
        })?;
        Ok(())
    }

    fn upvalue(&mut self, addr: u64, path: u32) -> Result<(), CacheError> {
        let l = self.layout;
        let o = &l.objects;
        let h = self.head(addr, o.uv_size)?;
        self.account(path, Kind::Upvalue, u64::from(o.uv_size));
        let v = self.gcref(&h, l.values.uv_v);
        let raw = le_u64(self.cache.read(v, 8)?, 0);
        if let Some(r) = self.tv_object(raw) {
            self.push(r, path, Edge::Same);
        }
        Ok(())
    }

    fn udata(&mut self, addr: u64, path: u32) -> Result<(), CacheError> {
        let l = self.layout;
        let o = &l.objects;
        let h = self.head(addr, o.ud_size)?;
        let len = le_u32(&h, o.ud_len);
        if len > MAX_STR {
            self.count("implausible_userdata");
            return Ok(());
        }
        self.account(path, Kind::Userdata, u64::from(o.ud_size) + len);
        self.push(
            self.gcref(&h, o.ud_metatable),
            path,
            Edge::Label("[metatable]"),
        );
        self.push(self.gcref(&h, o.ud_env), path, Edge::Label("[env]"));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    //! Heaps laid out by hand in this process (both layouts, through the table reader's fake
    //! heap), walked like a target's; real VMs are walked by the root tests.
    use super::*;
    use crate::luajit::{
        layout::{GC32, GC64},
        tables::tests::{Heap, ME},
    };

    const TSTR: u32 = !4;
    const TTAB: u32 = !11;

    fn folded(w: &Walk<'_>) -> BTreeMap<String, u64> {
        w.bytes
            .iter()
            .map(|((p, k), b)| {
                let mut s = w.paths.labels(*p).join(";");
                s.push(';');
                s.push_str(k.name());
                (s, *b)
            })
            .collect()
    }

    #[test]
    fn walks_paths_once_through_cycles_in_both_layouts() {
        for l in [&GC64, &GC32] {
            let mut h = Heap::new(l);
            let payload = h.string("payload-bytes");
            let k_payload = h.string("p");
            let k_cache = h.string("cache");
            let k_self = h.string("self");
            let record = h.table(2, &[(h.tv(TSTR, k_payload), h.tv(TSTR, payload))]);
            let cache = h.table(2, &[(1f64.to_bits(), h.tv(TTAB, record))]);
            let module = h.table(4, &[(h.tv(TSTR, k_cache), h.tv(TTAB, cache))]);
            let k_m = h.string("m;odd");
            let loaded = h.table(2, &[(h.tv(TSTR, k_m), h.tv(TTAB, module))]);
            let k_loaded = h.string("_LOADED");
            let registry = h.table(2, &[(h.tv(TSTR, k_loaded), h.tv(TTAB, loaded))]);
            let g = h.alloc((l.objects.g_gcroot + GCROOT_MAX * 8) as usize);
            h.put(
                g + u64::from(l.values.g_registrytv),
                &h.tv(TTAB, registry).to_le_bytes(),
            );
            // The module's second node points back to the registry (a cycle).
            let v = l.values;
            let node = {
                let head = ME.read(module + u64::from(v.t_node), 8).expect("node ref");
                let mut w = [0u8; 8];
                let n = if l.bpf.gc64 != 0 { 8 } else { 4 };
                w[..n].copy_from_slice(&head[..n]);
                u64::from_le_bytes(w)
            };
            let second = node + u64::from(v.node_size);
            h.put(second, &h.tv(TTAB, registry).to_le_bytes());
            h.put(
                second + u64::from(v.node_key),
                &h.tv(TSTR, k_self).to_le_bytes(),
            );
            // A hostile table: a hash part beyond LuaJIT's maximum, under the module.
            let bad = h.table(2, &[]);
            h.put(bad + u64::from(v.t_hmask), &u32::MAX.to_le_bytes());
            let k_bad = h.string("bad");
            let third = second + u64::from(v.node_size);
            h.put(third, &h.tv(TTAB, bad).to_le_bytes());
            h.put(
                third + u64::from(v.node_key),
                &h.tv(TSTR, k_bad).to_le_bytes(),
            );
            let mut w = Walk::new(&*ME, l, g, &Limits::default());
            w.run(Instant::now() + std::time::Duration::from_secs(10));
            let f = folded(&w);
            let m = "registry;_LOADED;m\\x3bodd";
            assert_eq!(
                f.get(&format!("{m};cache;[number];[hash];string")),
                None,
                "{f:?}"
            );
            assert_eq!(
                f.get(&format!("{m};cache;[number];p;string")),
                Some(&(u64::from(l.str_size) + 13 + 1)),
                "{f:?}"
            );
            let tab = u64::from(v.t_size) + 2 * u64::from(v.node_size);
            assert_eq!(f.get(&format!("{m};cache;[number];table")), Some(&tab));
            // The registry is counted once, under its root, despite the cycle.
            assert_eq!(f.get("registry;table"), Some(&tab));
            assert_eq!(w.by_kind[&Kind::Table].0, 5, "{f:?}");
            assert_eq!(w.errors.get("implausible_table"), Some(&1));
            assert!(w.truncated.is_none());
        }
    }
}
