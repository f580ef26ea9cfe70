//! Lua values read from outside the VM: `TValue`s, strings, tables (array part and hash
//! part), Lua functions with their upvalues, the registry and its `_LOADED` table
//! (`package.loaded`), for both layouts ([`super::layout::ValueLayout`]). The plugin map
//! ([`crate::plugin_map`]) reads APISIX's plugin modules with it; heap snapshots will walk
//! tables with it too.
//!
//! Everything read is the target's and may be garbage or hostile: every object's GC type is
//! checked before it is trusted, every read and every count is bounded ([`Limits`]), a
//! string is cut at [`Limits::max_str`] bytes, and nothing here recurses (callers walk
//! tables and functions with depth and entry bounds of their own).
//!
//! Hooks: `process_vm_readv` through [`TargetMemory`]. Metrics: none; every failure is a
//! [`TableError`] with a [`TableError::reason`], counted by the caller.

use super::layout::{
    Layout,
    gct::{FUNC as GCT_FUNC, PROTO as GCT_PROTO, STR as GCT_STR, TAB as GCT_TAB},
};
use crate::proc::memory::{MAX_READ, TargetMemory};

/// Type tags (`itype`) of a `TValue`, as LuaJIT defines them (`~n`).
const LJ_TNIL: u32 = !0;
const LJ_TFALSE: u32 = !1;
const LJ_TTRUE: u32 = !2;
const LJ_TSTR: u32 = !4;
const LJ_TFUNC: u32 = !8;
const LJ_TTAB: u32 = !11;
/// The largest tag of a number: tags above it are other types.
const LJ_TISNUM: u32 = !13;
/// Most upvalues a Lua function can have (`LJ_MAX_UPVAL`).
const MAX_UPVAL: u8 = 60;
/// GC64: a GC reference in a `TValue` is the low 47 bits.
const GCPTR_MASK: u64 = (1 << 47) - 1;

/// Bounds of the reads of one caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Most hash nodes of one table read (`hmask + 1` above it: [`TableError::TooLarge`]).
    pub max_nodes: u32,
    /// Most array slots of one table read.
    pub max_array: u32,
    /// Longest string read (longer ones are cut, see [`LuaStr::complete`]).
    pub max_str: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_nodes: 1 << 15,
            max_array: 1 << 16,
            max_str: 256,
        }
    }
}

/// Why a value could not be read.
#[derive(Debug, thiserror::Error)]
pub enum TableError {
    /// The target's memory could not be read there.
    #[error("reading target memory at {addr:#x} ({len} bytes)")]
    Read {
        addr: u64,
        len: usize,
        #[source]
        source: std::io::Error,
    },
    /// The object there is not of the expected GC type (freed, reused, or garbage).
    #[error("{addr:#x} is not a {expected}")]
    WrongType { addr: u64, expected: &'static str },
    /// The object is larger than the caller's bounds allow.
    #[error("{what} of {count} at {addr:#x} exceeds the bound of {max}")]
    TooLarge {
        addr: u64,
        what: &'static str,
        count: u64,
        max: u64,
    },
    /// The registry holds no `_LOADED` table.
    #[error("no _LOADED table in the registry at {registry:#x}")]
    NoLoaded { registry: u64 },
}

impl TableError {
    /// A short label for counters.
    pub fn reason(&self) -> &'static str {
        match self {
            TableError::Read { .. } => "read_failed",
            TableError::WrongType { .. } => "wrong_type",
            TableError::TooLarge { .. } => "too_large",
            TableError::NoLoaded { .. } => "no_loaded",
        }
    }
}

/// One `TValue`, decoded. GC objects are their addresses (not yet read or checked).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Value {
    Nil,
    Bool(bool),
    Number(f64),
    Str(u64),
    Table(u64),
    Func(u64),
    /// Any other type (light userdata, thread, cdata, userdata…), by its tag.
    Other(u32),
}

impl Value {
    /// Decodes the 8 bytes of a `TValue`.
    pub fn decode(layout: &Layout, raw: u64) -> Self {
        let (itype, gcref) = if layout.bpf.gc64 != 0 {
            (((raw as i64) >> 47) as u32, raw & GCPTR_MASK)
        } else {
            ((raw >> 32) as u32, raw & 0xffff_ffff)
        };
        match itype {
            LJ_TNIL => Value::Nil,
            LJ_TFALSE => Value::Bool(false),
            LJ_TTRUE => Value::Bool(true),
            LJ_TSTR => Value::Str(gcref),
            LJ_TTAB => Value::Table(gcref),
            LJ_TFUNC => Value::Func(gcref),
            t if t <= LJ_TISNUM => Value::Number(f64::from_bits(raw)),
            t => Value::Other(t),
        }
    }
}

/// A string read from the target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LuaStr {
    /// Its bytes, at most [`Limits::max_str`].
    pub bytes: Vec<u8>,
    /// Whether `bytes` is the whole string.
    pub complete: bool,
}

impl LuaStr {
    /// The whole string as UTF-8, if it is both.
    pub fn as_str(&self) -> Option<&str> {
        self.complete
            .then(|| std::str::from_utf8(&self.bytes).ok())
            .flatten()
    }
}

/// A table's header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Table {
    pub addr: u64,
    /// The array part and its size.
    pub array: u64,
    pub asize: u32,
    /// The hash part and its mask (`hmask + 1` nodes).
    pub node: u64,
    pub hmask: u32,
    /// The metatable, or 0.
    pub metatable: u64,
}

/// A Lua function (or a C or fast one: `proto` is `None` then).
#[derive(Debug, Clone, PartialEq)]
pub struct Func {
    pub addr: u64,
    /// The prototype of a Lua function.
    pub proto: Option<u64>,
    /// The values of its upvalues (Lua functions only, when asked for).
    pub upvalues: Vec<Value>,
}

/// Reads of one target's Lua values.
#[derive(Debug, Clone, Copy)]
pub struct Reader<'a> {
    pub mem: &'a dyn TargetMemory,
    pub layout: &'static Layout,
    pub limits: Limits,
}

fn le_u32(b: &[u8], off: u32) -> u32 {
    let off = off as usize;
    b.get(off..off + 4)
        .and_then(|s| s.try_into().ok())
        .map_or(0, u32::from_le_bytes)
}

fn le_u64(b: &[u8], off: u32) -> u64 {
    let off = off as usize;
    b.get(off..off + 8)
        .and_then(|s| s.try_into().ok())
        .map_or(0, u64::from_le_bytes)
}

impl Reader<'_> {
    fn read(&self, addr: u64, len: usize) -> Result<Vec<u8>, TableError> {
        self.mem
            .read(addr, len)
            .map_err(|source| TableError::Read { addr, len, source })
    }

    /// A GC or memory reference of the layout's width in `b` at `off`.
    fn gcref(&self, b: &[u8], off: u32) -> u64 {
        if self.layout.bpf.gc64 != 0 {
            le_u64(b, off)
        } else {
            u64::from(le_u32(b, off))
        }
    }

    fn check_gct(
        &self,
        head: &[u8],
        addr: u64,
        gct: u8,
        expected: &'static str,
    ) -> Result<(), TableError> {
        if addr == 0 || head.get(self.layout.bpf.fn_gct as usize) != Some(&gct) {
            return Err(TableError::WrongType { addr, expected });
        }
        Ok(())
    }

    /// The `TValue` at `addr`.
    pub fn value(&self, addr: u64) -> Result<Value, TableError> {
        let b = self.read(addr, 8)?;
        Ok(Value::decode(self.layout, le_u64(&b, 0)))
    }

    /// The string object at `addr`, cut at [`Limits::max_str`] bytes. One read when the
    /// string is short (header and bytes together), two otherwise.
    pub fn string(&self, addr: u64) -> Result<LuaStr, TableError> {
        let l = self.layout;
        let head_len = l.str_size as usize;
        let max = self.limits.max_str as usize;
        // Header and up to 64 bytes at once; the pages past a short string's end may be
        // unmapped, so a failed read falls back to the header alone.
        let (head, mut tail) = match self.read(addr, head_len + max.min(64)) {
            Ok(mut b) => {
                let tail = b.split_off(head_len);
                (b, Some(tail))
            }
            Err(_) => (self.read(addr, head_len)?, None),
        };
        self.check_gct(&head, addr, GCT_STR, "string")?;
        let len = le_u32(&head, l.str_len) as usize;
        let take = len.min(max);
        let bytes = match tail.take() {
            Some(mut t) if t.len() >= take => {
                t.truncate(take);
                t
            }
            _ => self.read(addr.wrapping_add(u64::from(l.str_size)), take)?,
        };
        Ok(LuaStr {
            bytes,
            complete: take == len,
        })
    }

    /// The table header at `addr`.
    pub fn table(&self, addr: u64) -> Result<Table, TableError> {
        let v = &self.layout.values;
        let head = self.read(addr, v.t_size as usize)?;
        self.check_gct(&head, addr, GCT_TAB, "table")?;
        Ok(Table {
            addr,
            array: self.gcref(&head, v.t_array),
            asize: le_u32(&head, v.t_asize),
            node: self.gcref(&head, v.t_node),
            hmask: le_u32(&head, v.t_hmask),
            metatable: self.gcref(&head, v.t_metatable),
        })
    }

    /// The hash part's (key, value) pairs whose value is not nil, in node order.
    pub fn entries(&self, t: &Table) -> Result<Vec<(Value, Value)>, TableError> {
        let v = &self.layout.values;
        let count = u64::from(t.hmask) + 1;
        let bytes = count * u64::from(v.node_size);
        if count > u64::from(self.limits.max_nodes) || bytes > MAX_READ as u64 {
            return Err(TableError::TooLarge {
                addr: t.addr,
                what: "hash part",
                count,
                max: u64::from(self.limits.max_nodes),
            });
        }
        let nodes = self.read(t.node, bytes as usize)?;
        let mut out = Vec::new();
        for node in nodes.chunks_exact(v.node_size as usize) {
            let val = Value::decode(self.layout, le_u64(node, 0));
            if val == Value::Nil {
                continue;
            }
            out.push((Value::decode(self.layout, le_u64(node, v.node_key)), val));
        }
        Ok(out)
    }

    /// The array part's values (index 0 first; Lua's `t[1]` is index 1), at most
    /// [`Limits::max_array`].
    pub fn array(&self, t: &Table) -> Result<Vec<Value>, TableError> {
        let count = u64::from(t.asize);
        if count > u64::from(self.limits.max_array) || count * 8 > MAX_READ as u64 {
            return Err(TableError::TooLarge {
                addr: t.addr,
                what: "array part",
                count,
                max: u64::from(self.limits.max_array),
            });
        }
        let b = self.read(t.array, (count * 8) as usize)?;
        Ok(b.chunks_exact(8)
            .map(|c| Value::decode(self.layout, le_u64(c, 0)))
            .collect())
    }

    /// The value of the string key `key` in the hash part of `t`, if present. Keys are
    /// compared by length first: only strings of `key`'s length are read whole.
    pub fn get_str(&self, t: &Table, key: &str) -> Result<Option<Value>, TableError> {
        for (k, val) in self.entries(t)? {
            let Value::Str(s) = k else { continue };
            if self
                .string(s)
                .ok()
                .and_then(|s| s.as_str().map(|s| s == key))
                == Some(true)
            {
                return Ok(Some(val));
            }
        }
        Ok(None)
    }

    /// The function object at `addr`; with `upvalues`, the values of a Lua function's
    /// upvalues (an upvalue that cannot be read is `Nil`).
    pub fn func(&self, addr: u64, upvalues: bool) -> Result<Func, TableError> {
        let l = self.layout;
        let v = &l.values;
        let refw = if l.bpf.gc64 != 0 { 8 } else { 4 };
        let head_len = v.fn_uvptr + u32::from(MAX_UPVAL) * refw;
        let head = match self.read(addr, head_len as usize) {
            Ok(h) => h,
            // Near the end of a mapping: the fixed part alone.
            Err(_) => self.read(addr, (v.fn_uvptr + refw) as usize)?,
        };
        self.check_gct(&head, addr, GCT_FUNC, "function")?;
        if head.get(l.bpf.fn_ffid as usize) != Some(&0) {
            return Ok(Func {
                addr,
                proto: None,
                upvalues: Vec::new(),
            });
        }
        let pc = self.gcref(&head, l.bpf.fn_pc);
        let proto = pc
            .checked_sub(u64::from(l.bpf.pt_size))
            .ok_or(TableError::WrongType {
                addr,
                expected: "Lua function",
            })?;
        let mut out = Func {
            addr,
            proto: Some(proto),
            upvalues: Vec::new(),
        };
        if !upvalues {
            return Ok(out);
        }
        let n = head.get(v.fn_nupvalues as usize).copied().unwrap_or(0);
        if n > MAX_UPVAL {
            return Err(TableError::TooLarge {
                addr,
                what: "upvalues",
                count: u64::from(n),
                max: u64::from(MAX_UPVAL),
            });
        }
        for i in 0..u32::from(n) {
            let off = v.fn_uvptr + i * refw;
            if off as usize + refw as usize > head.len() {
                break;
            }
            let uv = self.gcref(&head, off);
            out.upvalues.push(self.upvalue(uv).unwrap_or(Value::Nil));
        }
        Ok(out)
    }

    /// The value an upvalue object holds.
    fn upvalue(&self, uv: u64) -> Result<Value, TableError> {
        let v = &self.layout.values;
        let refw = if self.layout.bpf.gc64 != 0 { 8 } else { 4 };
        let b = self.read(uv, (v.uv_v + refw) as usize)?;
        self.value(self.gcref(&b, v.uv_v))
    }

    /// The prototype's chunk name reference (a string's address), after checking the
    /// prototype's type.
    pub fn proto_chunkname(&self, proto: u64) -> Result<u64, TableError> {
        let l = self.layout;
        let b = self.read(proto, l.bpf.pt_size as usize)?;
        self.check_gct(&b, proto, GCT_PROTO, "prototype")?;
        Ok(self.gcref(&b, l.bpf.pt_chunkname))
    }

    /// The registry table of the VM whose `global_State` is at `g`.
    pub fn registry(&self, g: u64) -> Result<Table, TableError> {
        let at = g.wrapping_add(u64::from(self.layout.values.g_registrytv));
        match self.value(at)? {
            Value::Table(t) => self.table(t),
            _ => Err(TableError::WrongType {
                addr: at,
                expected: "registry table",
            }),
        }
    }

    /// `package.loaded`: the registry's `_LOADED` table.
    pub fn loaded(&self, g: u64) -> Result<Table, TableError> {
        let reg = self.registry(g)?;
        match self.get_str(&reg, "_LOADED")? {
            Some(Value::Table(t)) => self.table(t),
            _ => Err(TableError::NoLoaded { registry: reg.addr }),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    //! Tables laid out by hand in this process's own memory (GC64 and non-GC64), read back
    //! through `process_vm_readv` like a target's; the real VMs are read by the plugin map's
    //! tests and the root tests.
    use super::*;
    use crate::{
        luajit::layout::{GC32, GC64},
        proc::memory::Memory,
    };

    /// Size of a fake heap.
    const HEAP_LEN: usize = 1 << 16;

    /// A fake heap: objects at stable addresses inside one mapping below 4 GiB (32-bit GC
    /// references must reach it).
    pub(crate) struct Heap {
        pub layout: &'static Layout,
        base: *mut u8,
        next: usize,
    }

    impl Drop for Heap {
        fn drop(&mut self) {
            // SAFETY: `base` is the mapping of HEAP_LEN bytes made in `new`.
            unsafe { libc::munmap(self.base.cast(), HEAP_LEN) };
        }
    }

    impl Heap {
        pub fn new(layout: &'static Layout) -> Self {
            // SAFETY: an anonymous private mapping, checked below.
            let base = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    HEAP_LEN,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_32BIT,
                    -1,
                    0,
                )
            };
            assert!(base != libc::MAP_FAILED, "mmap below 4 GiB failed");
            Self {
                layout,
                base: base.cast(),
                next: 64,
            }
        }

        fn base(&self) -> u64 {
            self.base as u64
        }

        fn gc64(&self) -> bool {
            self.layout.bpf.gc64 != 0
        }

        /// Reserves `len` bytes, 8-aligned, and returns the address.
        pub fn alloc(&mut self, len: usize) -> u64 {
            let at = self.next;
            self.next = (at + len + 7) & !7;
            assert!(self.next <= HEAP_LEN, "fake heap full");
            self.base() + at as u64
        }

        pub fn put(&mut self, addr: u64, bytes: &[u8]) {
            let off = (addr - self.base()) as usize;
            assert!(off + bytes.len() <= HEAP_LEN);
            // SAFETY: the range lies inside the mapping (checked above).
            unsafe {
                std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.base.add(off), bytes.len());
            }
        }

        pub fn put_ref(&mut self, addr: u64, r: u64) {
            if self.gc64() {
                self.put(addr, &r.to_le_bytes());
            } else {
                self.put(addr, &(r as u32).to_le_bytes());
            }
        }

        /// The `TValue` bits of a GC object of tag `itype` at `addr`.
        pub fn tv(&self, itype: u32, addr: u64) -> u64 {
            if self.gc64() {
                (u64::from(itype) << 47) | addr
            } else {
                (u64::from(itype) << 32) | (addr & 0xffff_ffff)
            }
        }

        pub fn string(&mut self, s: &str) -> u64 {
            let l = self.layout;
            let a = self.alloc(l.str_size as usize + s.len() + 1);
            self.put(a + u64::from(l.bpf.fn_gct), &[GCT_STR]);
            self.put(a + u64::from(l.str_len), &(s.len() as u32).to_le_bytes());
            self.put(a + u64::from(l.str_size), s.as_bytes());
            a
        }

        /// A table with a hash part of `nodes` (a power of two) holding `entries`.
        pub fn table(&mut self, nodes: usize, entries: &[(u64, u64)]) -> u64 {
            let v = self.layout.values;
            let t = self.alloc(v.t_size as usize);
            let node = self.alloc(nodes * v.node_size as usize);
            self.put(t + u64::from(self.layout.bpf.fn_gct), &[GCT_TAB]);
            self.put_ref(t + u64::from(v.t_node), node);
            self.put(
                t + u64::from(v.t_hmask),
                &((nodes - 1) as u32).to_le_bytes(),
            );
            for i in 0..nodes {
                let n = node + (i * v.node_size as usize) as u64;
                let (key, val) = entries.get(i).copied().unwrap_or((!0, !0));
                self.put(n, &val.to_le_bytes());
                self.put(n + u64::from(v.node_key), &key.to_le_bytes());
            }
            t
        }

        /// A Lua function of prototype `proto` with closed upvalues holding `upvalues`.
        pub fn lua_func(&mut self, proto: u64, upvalues: &[u64]) -> u64 {
            let l = self.layout;
            let v = l.values;
            let refw = if self.gc64() { 8 } else { 4 };
            let f = self.alloc((v.fn_uvptr + refw * upvalues.len() as u32 + 8) as usize);
            self.put(
                f + u64::from(l.bpf.fn_gct),
                &[GCT_FUNC, 0, upvalues.len() as u8],
            );
            self.put_ref(f + u64::from(l.bpf.fn_pc), proto + u64::from(l.bpf.pt_size));
            for (i, val) in upvalues.iter().enumerate() {
                let uv = self.alloc((v.uv_v + 16) as usize);
                let slot = self.alloc(8);
                self.put(slot, &val.to_le_bytes());
                self.put_ref(uv + u64::from(v.uv_v), slot);
                self.put_ref(f + u64::from(v.fn_uvptr) + refw as u64 * i as u64, uv);
            }
            f
        }

        /// A prototype header with chunk name `chunk` (a string's address).
        pub fn proto(&mut self, chunk: u64) -> u64 {
            let l = self.layout;
            let p = self.alloc(l.bpf.pt_size as usize + 8);
            self.put(p + u64::from(l.bpf.fn_gct), &[GCT_PROTO]);
            self.put_ref(p + u64::from(l.bpf.pt_chunkname), chunk);
            p
        }

        pub fn reader(&self, mem: &'static Memory) -> Reader<'static> {
            Reader {
                mem,
                layout: self.layout,
                limits: Limits::default(),
            }
        }
    }

    pub(crate) static ME: std::sync::LazyLock<Memory> =
        std::sync::LazyLock::new(|| Memory::new(std::process::id()));

    fn both() -> [&'static Layout; 2] {
        [&GC64, &GC32]
    }

    #[test]
    fn values_decode_in_both_layouts() {
        for l in both() {
            let h = Heap::new(l);
            assert_eq!(Value::decode(l, !0), Value::Nil);
            assert_eq!(Value::decode(l, h.tv(LJ_TSTR, 0x1000)), Value::Str(0x1000));
            assert_eq!(
                Value::decode(l, h.tv(LJ_TTAB, 0x2000)),
                Value::Table(0x2000)
            );
            assert_eq!(
                Value::decode(l, h.tv(LJ_TFUNC, 0x3000)),
                Value::Func(0x3000)
            );
            assert_eq!(Value::decode(l, h.tv(LJ_TTRUE, 0)), Value::Bool(true));
            assert_eq!(Value::decode(l, 1.5f64.to_bits()), Value::Number(1.5));
        }
    }

    #[test]
    fn registry_loaded_and_fields_read_back() {
        for l in both() {
            let mut h = Heap::new(l);
            let name = h.string("key-auth");
            let k_name = h.string("name");
            let chunk = h.string("@/a/apisix/plugins/key-auth.lua");
            let proto = h.proto(chunk);
            let tv = h.tv(LJ_TSTR, name);
            let func = h.lua_func(proto, &[tv]);
            let k_access = h.string("access");
            let module = h.table(
                4,
                &[
                    (h.tv(LJ_TSTR, k_name), h.tv(LJ_TSTR, name)),
                    (h.tv(LJ_TSTR, k_access), h.tv(LJ_TFUNC, func)),
                ],
            );
            let k_mod = h.string("apisix.plugins.key-auth");
            let loaded = h.table(2, &[(h.tv(LJ_TSTR, k_mod), h.tv(LJ_TTAB, module))]);
            let k_loaded = h.string("_LOADED");
            let k_other = h.string("_PRELOAD");
            let registry = h.table(
                4,
                &[
                    (h.tv(LJ_TSTR, k_other), h.tv(LJ_TTAB, module)),
                    (h.tv(LJ_TSTR, k_loaded), h.tv(LJ_TTAB, loaded)),
                ],
            );
            // A global_State whose registrytv holds the registry.
            let g = h.alloc(l.values.g_registrytv as usize + 8);
            let tv = h.tv(LJ_TTAB, registry);
            h.put(g + u64::from(l.values.g_registrytv), &tv.to_le_bytes());

            let r = h.reader(&ME);
            let t = r.loaded(g).expect("_LOADED");
            assert_eq!(t.addr, loaded);
            let m = match r.get_str(&t, "apisix.plugins.key-auth").expect("lookup") {
                Some(Value::Table(m)) => r.table(m).expect("module"),
                other => panic!("{other:?}"),
            };
            let n = match r.get_str(&m, "name").expect("name") {
                Some(Value::Str(s)) => r.string(s).expect("string"),
                other => panic!("{other:?}"),
            };
            assert_eq!(n.as_str(), Some("key-auth"));
            let f = match r.get_str(&m, "access").expect("access") {
                Some(Value::Func(f)) => r.func(f, true).expect("func"),
                other => panic!("{other:?}"),
            };
            assert_eq!(f.proto, Some(proto));
            assert_eq!(f.upvalues, vec![Value::Str(name)]);
            assert_eq!(r.proto_chunkname(proto).expect("proto"), chunk);
            assert_eq!(r.get_str(&m, "missing").expect("lookup"), None);
        }
    }

    #[test]
    fn hostile_objects_are_refused() {
        for l in both() {
            let mut h = Heap::new(l);
            let s = h.string("x");
            let r = h.reader(&ME);
            // A string is not a table, a table's hash part is bounded, garbage is refused.
            assert!(matches!(r.table(s), Err(TableError::WrongType { .. })));
            assert!(matches!(r.func(s, true), Err(TableError::WrongType { .. })));
            assert!(matches!(r.table(8), Err(TableError::Read { .. })));
            // Addresses at the top of the address space wrap into failed reads.
            assert!(r.string(u64::MAX - 8).is_err());
            assert!(r.registry(u64::MAX - 8).is_err());
            assert!(r.func(u64::MAX - 8, true).is_err());
            let t = h.table(2, &[]);
            h.put(t + u64::from(l.values.t_hmask), &u32::MAX.to_le_bytes());
            let r = h.reader(&ME);
            let tab = r.table(t).expect("header");
            assert!(matches!(r.entries(&tab), Err(TableError::TooLarge { .. })));
            // A long string is cut at the bound and says so.
            let long = "y".repeat(1000);
            let mut h = Heap::new(l);
            let a = h.string(&long);
            let got = h.reader(&ME).string(a).expect("string");
            assert_eq!(got.bytes.len(), Limits::default().max_str as usize);
            assert!(!got.complete && got.as_str().is_none());
            // A lying length is bounded too.
            let a = h.string("short");
            h.put(a + u64::from(l.str_len), &u32::MAX.to_le_bytes());
            let got = h.reader(&ME).string(a).expect("string");
            assert!(!got.complete);
            // An upvalue count above LuaJIT's limit.
            let p = h.proto(a);
            let f = h.lua_func(p, &[]);
            h.put(f + u64::from(l.values.fn_nupvalues), &[200]);
            assert!(matches!(
                h.reader(&ME).func(f, true),
                Err(TableError::TooLarge { .. })
            ));
            // A registry that is no table.
            let g = h.alloc(l.values.g_registrytv as usize + 8);
            assert!(matches!(
                h.reader(&ME).registry(g),
                Err(TableError::WrongType { .. })
            ));
        }
    }
}
