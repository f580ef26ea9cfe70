//! JIT-compiled Lua: the frames a trace inlined, rebuilt from its snapshots.
//!
//! While a trace runs, only the frames below `G->jit_base` exist on the Lua stack; the
//! functions the trace inlined live in its snapshots. For a sample in trace code (or in C
//! code the trace called) this module reads the running trace from the target — its header,
//! IR, snapshots and snapshot map are one allocation, read at once — finds the snapshot whose
//! interval holds the machine-code address, and turns its frame entries into [`LuaFrame`]s
//! the namer handles like walked ones. Precision is one snapshot interval: code between two
//! snapshots is charged to the later one's frames (see [`Trace::index_at`]). LuaJIT takes a
//! snapshot after a store or a call with side effects, and merges two snapshots with no guard
//! between them, so an inlined function that writes nothing has no snapshot of its own and
//! its time goes to the frames around it.
//!
//! Nothing read is trusted: the trace must still be the one with that number, its allocation
//! must be laid out as `trace_save` lays it, every snapshot entry must fit, every frame's
//! function must be a real prototype whose bytecode holds the frame's PC, and the innermost
//! physical frame must hold the PC the snapshot gives it. Anything else is a
//! [`TraceFallback`], counted by reason: the sample keeps its physical frames and no frame is
//! invented. Decoded traces are cached by (pid, number, address, machine code, sizes), so a
//! reused number or a flushed cache never serves stale frames.
//!
//! This file holds the decoder's state ([`Tracer`]: caches, side-trace chains, the base-frame
//! check); reading and decoding one trace is [`super::trace_decode`]'s.
//!
//! Hooks: `process_vm_readv` of the target (trace table, trace, prototypes), through
//! [`TargetMemory`]. Metrics: the fallback counts ([`TraceFallback`]), read by the stack
//! builder's caller.

use std::{collections::HashMap, ops::Range, sync::Arc};

use apisix_ebpf_common::{LuaFrame, LuaFrameKind};

pub use super::trace_decode::{SnapFrames, TraceFallback};
use super::{
    layout::Layout,
    trace_decode::{
        Header, ProtoHead, Trace, TraceKey, decode, le_u32, le_u64, read_header, read_proto,
        trace_address,
    },
};
use crate::proc::memory::TargetMemory;

/// Bytes of decoded traces cached when no limit was set (`limits.trace_bytes`).
pub const DEFAULT_CACHE_BYTES: usize = 16 << 20;
/// Decoded traces kept at most (all processes together).
const MAX_CACHED_TRACES: usize = 4096;
/// Side-trace chains kept at most (all processes together).
const MAX_CACHED_CHAINS: usize = 512;
/// Side traces walked per chain.
const MAX_SIDE_WALK: usize = 256;

/// A trace's frames at one machine-code address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TraceFrames {
    /// The trace number.
    pub traceno: u16,
    /// Inlined frames and the base frame's PC.
    pub snap: SnapFrames,
}

/// What a sample taken in trace code says about that trace.
#[derive(Clone, Copy, Debug)]
pub struct TraceSample<'a> {
    /// The running `lua_State`.
    pub l: u64,
    /// `global_State.vmstate`: the trace number.
    pub vmstate: i32,
    /// The trace's `GCtrace` address and machine-code start as the BPF side read them at
    /// sample time (0 where it could not).
    pub at_sample: (u64, u64),
    /// The sampled IP when it lies in no mapped module (in JIT-compiled code), else `None`.
    pub jit_ip: Option<u64>,
    /// The innermost physical frame, walked from `G->jit_base`.
    pub base: Option<&'a LuaFrame>,
}

/// The side traces of a root trace, in chain order: each one's identity and machine code.
type SideChain = Arc<[(TraceKey, Range<u64>)]>;

/// Decoded traces of every target, and the counts of what happened.
#[derive(Debug, Default)]
pub struct Tracer {
    cache: HashMap<TraceKey, Arc<Trace>>,
    /// Side-trace chains by their root's identity and the head of the chain (`nextside`):
    /// LuaJIT adds a side trace at the head, a flushed or reused root has another identity.
    chains: HashMap<(TraceKey, u16), SideChain>,
    /// `global_State` of each (pid, `lua_State`) that led to a trace.
    g_of: HashMap<(u32, u64), u64>,
    /// Prototype headers of physical base frames, for the base check.
    base_protos: HashMap<(u32, u64), Option<ProtoHead>>,
    /// Traces read and decoded (cache misses).
    pub decoded: u64,
    /// Bytes of `cache` (estimated from the decoded frames).
    bytes: usize,
    /// Cap of `cache` in bytes (`limits.trace_cache_bytes`); 0 until set: the default.
    max_bytes: usize,
}

impl Tracer {
    /// Caps the decoded traces at `bytes`.
    pub fn set_max_bytes(&mut self, bytes: usize) {
        self.max_bytes = bytes;
    }

    /// Bytes held by the decoded traces.
    pub fn cached_bytes(&self) -> usize {
        self.bytes
    }

    /// An empty tracer.
    pub fn new() -> Self {
        Self::default()
    }

    /// Drops everything cached for process `pid`.
    pub fn forget(&mut self, pid: u32) {
        self.cache.retain(|k, _| k.pid != pid);
        self.bytes = self.cache.values().map(|t| t.bytes()).sum();
        self.chains.retain(|(k, _), _| k.pid != pid);
        self.g_of.retain(|(p, _), _| *p != pid);
        self.base_protos.retain(|(p, _), _| *p != pid);
    }

    /// The `global_State` of `lua_State` `l` in process `pid`. A coroutine may have been
    /// freed since the sample and its memory reused, so what `l` reads is only remembered
    /// once it led to a trace ([`Tracer::confirm_global`]).
    fn global(&self, mem: &dyn TargetMemory, layout: &Layout, pid: u32, l: u64) -> Option<u64> {
        if let Some(g) = self.g_of.get(&(pid, l)) {
            return Some(*g);
        }
        let raw = mem
            .read(l.checked_add(u64::from(layout.bpf.l_glref))?, 8)
            .ok()?;
        let g = if layout.bpf.gc64 != 0 {
            le_u64(&raw, 0)?
        } else {
            u64::from(le_u32(&raw, 0)?)
        };
        (g != 0).then_some(g)
    }

    /// Remembers that `g`, read from `l`, led to a valid trace.
    fn confirm_global(&mut self, pid: u32, l: u64, g: u64) {
        if self.g_of.len() > 65_536 {
            self.g_of.clear();
        }
        self.g_of.insert((pid, l), g);
    }

    /// Trace `traceno` of the VM `g`, its header validated.
    fn header_of(
        mem: &dyn TargetMemory,
        layout: &Layout,
        pid: u32,
        g: u64,
        traceno: u16,
    ) -> Result<Header, TraceFallback> {
        let addr = trace_address(mem, layout, g, traceno)?;
        read_header(mem, layout, pid, addr, traceno)
    }

    /// The decoded trace `h`, from the cache or read now.
    fn decoded(
        &mut self,
        mem: &dyn TargetMemory,
        layout: &Layout,
        h: &Header,
    ) -> Result<Arc<Trace>, TraceFallback> {
        if let Some(t) = self.cache.get(&h.key) {
            return Ok(t.clone());
        }
        let t = Arc::new(decode(mem, layout, h)?);
        self.decoded += 1;
        let size = t.bytes();
        let max = if self.max_bytes == 0 {
            DEFAULT_CACHE_BYTES
        } else {
            self.max_bytes
        };
        if self.cache.len() >= MAX_CACHED_TRACES || self.bytes + size > max {
            self.cache.clear();
            self.bytes = 0;
        }
        self.bytes += size;
        if let Some(old) = self.cache.insert(h.key, t.clone()) {
            self.bytes = self.bytes.saturating_sub(old.bytes());
        }
        Ok(t)
    }

    /// The side traces of `root` (a root trace of the VM `g`), walked once per state of its
    /// chain (at most [`MAX_SIDE_WALK`]). A walk cut short by a failed read is not kept.
    fn side_chain(
        &mut self,
        mem: &dyn TargetMemory,
        layout: &Layout,
        pid: u32,
        g: u64,
        root: &Header,
    ) -> SideChain {
        let key = (root.key, root.nextside);
        if let Some(chain) = self.chains.get(&key) {
            return chain.clone();
        }
        let mut chain = Vec::new();
        let mut next = root.nextside;
        let mut complete = true;
        while next != 0 && chain.len() < MAX_SIDE_WALK {
            match Self::header_of(mem, layout, pid, g, next) {
                Ok(side) => {
                    next = side.nextside;
                    chain.push((side.key, side.mcode()));
                }
                Err(e) => {
                    complete = e != TraceFallback::ReadFailed;
                    break;
                }
            }
        }
        let chain: SideChain = chain.into();
        if complete {
            if self.chains.len() >= MAX_CACHED_CHAINS {
                self.chains.clear();
            }
            self.chains.insert(key, chain.clone());
        }
        chain
    }

    /// The trace whose machine code holds `ip` when trace `h`, the one `vmstate` names,
    /// does not. A trace writes its number into `vmstate` a few instructions after its
    /// entry (side traces first move the parent's registers), so right after the jump to
    /// the trace `h` links to, or through a patched exit of `h` into a side trace of the
    /// same root, `vmstate` still names `h`. Those candidates are tried, the side traces
    /// along their root's chain (cached per root, [`Tracer::side_chain`]); the one found is
    /// read again through the trace table, validated like any trace, and must still be the
    /// trace the chain recorded.
    fn entered(
        &mut self,
        mem: &dyn TargetMemory,
        layout: &Layout,
        sample: &TraceSample<'_>,
        pid: u32,
        h: &Header,
        ip: u64,
    ) -> Option<(u16, Arc<Trace>)> {
        let g = self.global(mem, layout, pid, sample.l)?;
        let holds = |c: &Header| c.mcode().contains(&ip);
        let own = h.key.traceno;
        let mut found = None;
        if h.link != 0 && h.link != own {
            found = Self::header_of(mem, layout, pid, g, h.link)
                .ok()
                .filter(holds);
        }
        if found.is_none() {
            let root_no = if h.root != 0 { h.root } else { own };
            let root = if root_no == own {
                Some(*h)
            } else {
                Self::header_of(mem, layout, pid, g, root_no).ok()
            };
            match root {
                Some(r) if r.key.traceno != own && holds(&r) => found = Some(r),
                Some(r) => {
                    let chain = self.side_chain(mem, layout, pid, g, &r);
                    if let Some((key, _)) = chain
                        .iter()
                        .find(|(k, mcode)| k.traceno != own && mcode.contains(&ip))
                    {
                        // Through the trace table again: a freed trace's memory may
                        // still look like it.
                        found = Self::header_of(mem, layout, pid, g, key.traceno)
                            .ok()
                            .filter(|c| c.key == *key);
                    }
                }
                None => {}
            }
        }
        let found = found?;
        self.confirm_global(pid, sample.l, g);
        let trace = self.decoded(mem, layout, &found).ok()?;
        Some((found.key.traceno, trace))
    }

    /// Whether the physical base frame is a Lua function whose bytecode holds the PC the
    /// snapshot gives it (none needed when the snapshot gives none).
    fn base_holds(
        &mut self,
        mem: &dyn TargetMemory,
        layout: &Layout,
        pid: u32,
        base: Option<&LuaFrame>,
        snap: &SnapFrames,
    ) -> bool {
        if snap.base_pc == 0 {
            return true;
        }
        let Some(base) = base.filter(|b| b.kind == LuaFrameKind::Lua as u8) else {
            return false;
        };
        if self.base_protos.len() > 65_536 {
            self.base_protos.clear();
        }
        let head = *self
            .base_protos
            .entry((pid, base.code))
            .or_insert_with(|| read_proto(mem, layout, base.code));
        head.is_some_and(|hd| hd.chunkname == base.chunkname && hd.holds(snap.base_pc))
    }

    /// The inlined frames of `sample`, taken in process `pid` whose memory is `mem`.
    /// `addr_in` picks, given the trace's machine-code range, the address to look up: the
    /// sampled IP if it is inside, else the return address into it that native unwinding
    /// found (already minus one).
    pub fn frames(
        &mut self,
        mem: &dyn TargetMemory,
        pid: u32,
        layout: &'static Layout,
        sample: &TraceSample<'_>,
        addr_in: impl Fn(&Range<u64>) -> Option<u64>,
    ) -> Result<TraceFrames, TraceFallback> {
        let TraceSample {
            l,
            vmstate,
            at_sample,
            jit_ip,
            base,
        } = *sample;
        let traceno = u16::try_from(vmstate).map_err(|_| TraceFallback::Gone)?;
        // The trace's address as the BPF side read it at sample time saves two reads of the
        // trace table; without it, the table says where trace `traceno` is now.
        let h = match at_sample.0 {
            0 => {
                let g = self
                    .global(mem, layout, pid, l)
                    .ok_or(TraceFallback::ReadFailed)?;
                let h = Self::header_of(mem, layout, pid, g, traceno)?;
                self.confirm_global(pid, l, g);
                h
            }
            addr => read_header(mem, layout, pid, addr, traceno)?,
        };
        // The BPF side read the trace's address and machine code at sample time: a trace
        // freed since (its number reused, the cache flushed) is not this one.
        let (trace_then, mcode_then) = at_sample;
        if (trace_then != 0 && trace_then != h.key.addr)
            || (mcode_then != 0 && mcode_then != h.key.mcode)
        {
            return Err(TraceFallback::Gone);
        }
        let trace = self.decoded(mem, layout, &h)?;
        let (traceno, trace, addr) = match addr_in(&trace.mcode) {
            Some(addr) => (traceno, trace, addr),
            None => {
                let ip = jit_ip.ok_or(TraceFallback::AddrOutside)?;
                let (n, t) = self
                    .entered(mem, layout, sample, pid, &h, ip)
                    .ok_or(TraceFallback::AddrOutside)?;
                (n, t, ip)
            }
        };
        let i = trace.index_at(addr)?;
        let snap = trace.snaps[i].1.as_ref().map_err(|e| *e)?;
        if self.base_holds(mem, layout, pid, base, snap) {
            return Ok(TraceFrames {
                traceno,
                snap: snap.clone(),
            });
        }
        // Code before a return to a lower frame (`RETF`, which moves `G->jit_base` down)
        // is charged to the snapshot after the return, whose base frame is the lower one,
        // while the physical walk still starts at the frame being left. The interval's
        // first state, the earlier snapshot, is the one that matches.
        if let Some(Ok(prev)) = i.checked_sub(1).map(|p| &trace.snaps[p].1)
            && self.base_holds(mem, layout, pid, base, prev)
        {
            return Ok(TraceFrames {
                traceno,
                snap: prev.clone(),
            });
        }
        Err(TraceFallback::BaseMismatch)
    }
}
