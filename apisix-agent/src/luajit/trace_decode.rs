//! Reading and decoding one JIT trace of a target (for [`super::trace::Tracer`]): where the
//! VM's trace table says trace N lies, its `GCtrace` header validated against the layout
//! `trace_save` gives the allocation, and its snapshots turned into the [`LuaFrame`]s of the
//! functions the trace inlined, each frame's prototype identified and checked to hold its
//! PC. What is read is hostile: every size is capped, every address checked not to wrap,
//! and anything that does not check out is a [`TraceFallback`], never a frame.
//!
//! Hooks: `process_vm_readv` of the target through [`TargetMemory`] (trace table, trace,
//! prototypes, function objects). Metrics: none of its own (the fallbacks are counted by the
//! stack builder).

use std::{collections::HashMap, ops::Range};

use apisix_ebpf_common::{LuaFrame, LuaFrameKind};

use super::{
    bytecode,
    layout::{
        Layout,
        gct::{FUNC as GCT_FUNC, PROTO as GCT_PROTO, TRACE as GCT_TRACE},
    },
};
use crate::proc::memory::{MAX_READ, TargetMemory};

/// IR references below this are constants (`REF_BIAS`).
const REF_BIAS: u32 = 0x8000;
/// Largest IR size accepted (instructions and constants).
const MAX_IR: u32 = 1 << 16;
/// IR opcodes of the constants read here.
const IR_KGC: u8 = 24;
const IR_KNUM: u8 = 28;
/// IR types of GC constants.
const IRT_PROTO: u8 = 7;
const IRT_FUNC: u8 = 8;
/// `SnapShot` size and snapshot entry flags.
const SNAPSHOT_SIZE: usize = 12;
const SNAP_FRAME: u32 = 0x1_0000;
const SNAP_CONT: u32 = 0x2_0000;
/// Frame link type bits; `FRAME_LUA` links are return PCs.
const FRAME_TYPE: u64 = 3;
const FRAME_TYPEP: u64 = 7;
const FRAME_VARG: u64 = 3;
/// The end of x86-64 user space (47-bit addresses): machine code lies below it.
const USER_SPACE_END: u64 = 1 << 47;

/// Why a sample in trace code kept only its physical frames.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TraceFallback {
    /// The trace table or the trace could not be read.
    ReadFailed,
    /// The trace number names no trace any more, or another one (freed, flushed, reused).
    Gone,
    /// The trace's header or allocation did not check out.
    Invalid,
    /// No address of the sample lies in the trace's machine code.
    AddrOutside,
    /// The snapshot's entries or frame links did not check out.
    BadSnapshot,
    /// A frame's function could not be identified from the trace's constants.
    FuncUnknown,
    /// The innermost physical frame is not the trace's base frame.
    BaseMismatch,
}

impl TraceFallback {
    /// Every reason, in a fixed order (index = position).
    pub const ALL: [TraceFallback; 7] = [
        TraceFallback::ReadFailed,
        TraceFallback::Gone,
        TraceFallback::Invalid,
        TraceFallback::AddrOutside,
        TraceFallback::BadSnapshot,
        TraceFallback::FuncUnknown,
        TraceFallback::BaseMismatch,
    ];

    /// Stable snake_case name, used as a metric label and in reports.
    pub const fn name(self) -> &'static str {
        match self {
            TraceFallback::ReadFailed => "trace_read_failed",
            TraceFallback::Gone => "trace_gone",
            TraceFallback::Invalid => "trace_invalid",
            TraceFallback::AddrOutside => "trace_addr_outside",
            TraceFallback::BadSnapshot => "trace_bad_snapshot",
            TraceFallback::FuncUnknown => "trace_func_unknown",
            TraceFallback::BaseMismatch => "trace_base_mismatch",
        }
    }

    /// Position in [`TraceFallback::ALL`].
    pub const fn index(self) -> usize {
        self as usize
    }
}

/// The frames one snapshot adds above the physical base frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapFrames {
    /// The PC of the physical base frame (return-PC convention: the instruction before it
    /// runs), or 0 when unknown.
    pub base_pc: u64,
    /// The inlined frames, innermost first.
    pub frames: Vec<LuaFrame>,
}

/// One decoded trace.
#[derive(Debug)]
pub(super) struct Trace {
    pub(super) mcode: Range<u64>,
    /// (byte offset of the snapshot's code, its frames), ascending by offset.
    pub(super) snaps: Vec<(u32, Result<SnapFrames, TraceFallback>)>,
}

/// Identity of a decoded trace: a number is reused, an address too, all of it together is
/// what makes stale frames impossible.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(super) struct TraceKey {
    pub(super) pid: u32,
    pub(super) traceno: u16,
    pub(super) addr: u64,
    pub(super) mcode: u64,
    pub(super) szmcode: u32,
    pub(super) nins: u32,
    pub(super) nsnap: u16,
    pub(super) nsnapmap: u32,
}

/// The header fields of a `GCtrace`, validated (its machine code lies in user space).
#[derive(Clone, Copy, Debug)]
pub(super) struct Header {
    pub(super) key: TraceKey,
    pub(super) nk: u32,
    pub(super) startpt: u64,
    /// `link`, `root` and `nextside`: trace numbers, 0 for none.
    pub(super) link: u16,
    pub(super) root: u16,
    pub(super) nextside: u16,
    /// Bytes of the whole allocation, from the trace's address.
    pub(super) size: usize,
    /// Offsets of the IR (constant `nk`), the snapshots and the map in the allocation.
    pub(super) ir_off: usize,
    pub(super) snap_off: usize,
    pub(super) map_off: usize,
}

/// What the frames need of a prototype.
#[derive(Clone, Copy, Debug)]
pub(super) struct ProtoHead {
    pub(super) chunkname: u64,
    pub(super) firstline: u32,
    /// Bytecode range `[bc, bc + 4 * sizebc)`.
    pub(super) bc: u64,
    pub(super) sizebc: u32,
}

impl ProtoHead {
    /// Whether `pc` is a return PC / next-instruction address inside this prototype.
    pub(super) fn holds(&self, pc: u64) -> bool {
        pc >= self.bc + 4 && pc <= self.bc + 4 * u64::from(self.sizebc) && pc.is_multiple_of(4)
    }
}

pub(super) fn le_u16(b: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(off..off + 2)?.try_into().ok()?))
}

pub(super) fn le_u32(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(off..off + 4)?.try_into().ok()?))
}

pub(super) fn le_u64(b: &[u8], off: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(off..off + 8)?.try_into().ok()?))
}

/// Reads the prototype header at `addr` and checks it is one.
pub(super) fn read_proto(mem: &dyn TargetMemory, layout: &Layout, addr: u64) -> Option<ProtoHead> {
    let l = layout;
    let head = mem.read(addr, l.bpf.pt_size as usize).ok()?;
    if head.get(l.bpf.fn_gct as usize) != Some(&GCT_PROTO) {
        return None;
    }
    let sizebc = le_u32(&head, l.pt_sizebc as usize)?;
    let sizept = le_u32(&head, l.pt_sizept as usize)?;
    if sizebc == 0 || u64::from(sizebc) * 4 + u64::from(l.bpf.pt_size) > u64::from(sizept) {
        return None;
    }
    // The bytecode's end must be an address (what `holds` computes cannot wrap).
    let bc = addr.checked_add(u64::from(l.bpf.pt_size))?;
    bc.checked_add(4 * u64::from(sizebc))?;
    let chunkname = if l.bpf.gc64 != 0 {
        le_u64(&head, l.bpf.pt_chunkname as usize)?
    } else {
        u64::from(le_u32(&head, l.bpf.pt_chunkname as usize)?)
    };
    Some(ProtoHead {
        chunkname,
        firstline: le_u32(&head, l.bpf.pt_firstline as usize)?,
        bc,
        sizebc,
    })
}

/// The prototype of the Lua function object at `func`, or `None`.
fn func_proto(mem: &dyn TargetMemory, layout: &Layout, func: u64) -> Option<u64> {
    let l = layout;
    let head = mem.read(func, (l.bpf.fn_pc + 8) as usize).ok()?;
    if head.get(l.bpf.fn_gct as usize) != Some(&GCT_FUNC)
        || head.get(l.bpf.fn_ffid as usize) != Some(&0)
    {
        return None;
    }
    let pc = if l.bpf.gc64 != 0 {
        le_u64(&head, l.bpf.fn_pc as usize)?
    } else {
        u64::from(le_u32(&head, l.bpf.fn_pc as usize)?)
    };
    pc.checked_sub(u64::from(l.bpf.pt_size))
}

/// Whether the function object at `func` is a C or fast function (`ffid != 0`).
fn func_is_native(mem: &dyn TargetMemory, layout: &Layout, func: u64) -> bool {
    let l = layout;
    mem.read(func, l.bpf.fn_ffid as usize + 1)
        .is_ok_and(|head| {
            head.get(l.bpf.fn_gct as usize) == Some(&GCT_FUNC)
                && head
                    .get(l.bpf.fn_ffid as usize)
                    .is_some_and(|ffid| *ffid != 0)
        })
}

/// Whether `pc` is a C function's header (`FUNCC`/`FUNCCW`, which every C and fast
/// function's `pc` points to) rather than Lua bytecode.
fn is_cfunc_header(mem: &dyn TargetMemory, pc: u64) -> bool {
    mem.read(pc, 4)
        .is_ok_and(|ins| matches!(ins.first(), Some(&bytecode::FUNCC | &bytecode::FUNCCW)))
}

/// The address of trace `traceno` in the trace table of the VM whose `global_State` is `g`.
pub(super) fn trace_address(
    mem: &dyn TargetMemory,
    layout: &Layout,
    g: u64,
    traceno: u16,
) -> Result<u64, TraceFallback> {
    let t = &layout.trace;
    let gc64 = layout.bpf.gc64 != 0;
    // Addresses from the target's memory: one that wraps is garbage.
    let jt_addr = g
        .checked_add(u64::from(t.g_to_j))
        .and_then(|j| j.checked_add(u64::from(t.j_trace)))
        .ok_or(TraceFallback::Invalid)?;
    let jt = mem
        .read(jt_addr, 16)
        .map_err(|_| TraceFallback::ReadFailed)?;
    let table = le_u64(&jt, 0).ok_or(TraceFallback::Invalid)?;
    let sizetrace =
        le_u32(&jt, (t.j_sizetrace - t.j_trace) as usize).ok_or(TraceFallback::Invalid)?;
    if traceno == 0 || u32::from(traceno) >= sizetrace || table == 0 {
        return Err(TraceFallback::Gone);
    }
    let refw: u64 = if gc64 { 8 } else { 4 };
    let slot = table
        .checked_add(refw * u64::from(traceno))
        .ok_or(TraceFallback::Invalid)?;
    let raw = mem
        .read(slot, refw as usize)
        .map_err(|_| TraceFallback::ReadFailed)?;
    let addr = if gc64 {
        le_u64(&raw, 0)
    } else {
        le_u32(&raw, 0).map(u64::from)
    }
    .ok_or(TraceFallback::Invalid)?;
    if addr == 0 {
        return Err(TraceFallback::Gone);
    }
    Ok(addr)
}

/// Reads and validates the header of the trace at `addr`, which must be trace `traceno`.
pub(super) fn read_header(
    mem: &dyn TargetMemory,
    layout: &Layout,
    pid: u32,
    addr: u64,
    traceno: u16,
) -> Result<Header, TraceFallback> {
    let t = &layout.trace;
    let gc64 = layout.bpf.gc64 != 0;
    let h = mem
        .read(addr, t.t_size as usize)
        .map_err(|_| TraceFallback::ReadFailed)?;
    let u16_at = |off: u32| le_u16(&h, off as usize).ok_or(TraceFallback::Invalid);
    let u32_at = |off: u32| le_u32(&h, off as usize).ok_or(TraceFallback::Invalid);
    let ptr_at = |off: u32| le_u64(&h, off as usize).ok_or(TraceFallback::Invalid);
    if h.get(layout.bpf.fn_gct as usize) != Some(&GCT_TRACE) || u16_at(t.t_traceno)? != traceno {
        return Err(TraceFallback::Gone);
    }
    let nsnap = u16_at(t.t_nsnap)?;
    let nins = u32_at(t.t_nins)?;
    let nk = u32_at(t.t_nk)?;
    let nsnapmap = u32_at(t.t_nsnapmap)?;
    let ir = ptr_at(t.t_ir)?;
    let snap = ptr_at(t.t_snap)?;
    let snapmap = ptr_at(t.t_snapmap)?;
    let mcode = ptr_at(t.t_mcode)?;
    let szmcode = u32_at(t.t_szmcode)?;
    let startpt = if gc64 {
        ptr_at(t.t_startpt)?
    } else {
        u64::from(u32_at(t.t_startpt)?)
    };
    // `trace_save` lays out header, IR (constants first), snapshots and map back to back.
    let sztr = (u64::from(t.t_size) + 7) & !7;
    if nk >= REF_BIAS || nins <= REF_BIAS || nins - nk > MAX_IR || nsnap == 0 {
        return Err(TraceFallback::Invalid);
    }
    let szins = 8 * u64::from(nins - nk);
    // Every address here comes from the target: one that wraps, or machine code that ends
    // beyond user space, is not a trace (and would make range checks accept anything).
    let ir_start = addr.checked_add(sztr).ok_or(TraceFallback::Invalid)?;
    let snap_start = ir_start.checked_add(szins).ok_or(TraceFallback::Invalid)?;
    let map_start = snap_start
        .checked_add(SNAPSHOT_SIZE as u64 * u64::from(nsnap))
        .ok_or(TraceFallback::Invalid)?;
    let size = map_start - addr + 4 * u64::from(nsnapmap);
    let mcode_end = mcode.checked_add(u64::from(szmcode));
    if ir.checked_add(8 * u64::from(nk)) != Some(ir_start)
        || snap != snap_start
        || snapmap != map_start
        || mcode == 0
        || szmcode == 0
        || szmcode > 1 << 24
        || mcode_end.is_none_or(|end| end > USER_SPACE_END)
        || size > MAX_READ as u64
    {
        return Err(TraceFallback::Invalid);
    }
    Ok(Header {
        link: u16_at(t.t_link)?,
        root: u16_at(t.t_root)?,
        nextside: u16_at(t.t_nextside)?,
        key: TraceKey {
            pid,
            traceno,
            addr,
            mcode,
            szmcode,
            nins,
            nsnap,
            nsnapmap,
        },
        nk,
        startpt,
        size: size as usize,
        ir_off: sztr as usize,
        snap_off: (snap_start - addr) as usize,
        map_off: (map_start - addr) as usize,
    })
}

impl Header {
    /// The trace's machine code (validated by [`read_header`]: it cannot wrap).
    pub(super) fn mcode(&self) -> Range<u64> {
        self.key.mcode..self.key.mcode + u64::from(self.key.szmcode)
    }
}

/// A trace's allocation, read whole, with the accessors snapshot decoding needs.
struct Blob<'a> {
    h: &'a Header,
    b: Vec<u8>,
    gc64: bool,
}

impl Blob<'_> {
    /// Opcode, type and byte offset of IR instruction `r` (biased reference).
    fn ins(&self, r: u32) -> Option<(u8, u8, usize)> {
        if r < self.h.nk || r >= self.h.key.nins {
            return None;
        }
        let off = self.h.ir_off + 8 * (r - self.h.nk) as usize;
        let t = *self.b.get(off + 4)? & 0x1f;
        let o = *self.b.get(off + 5)?;
        Some((o, t, off))
    }

    /// The object of a GC constant (`KGC`) of IR type `irt`, or `None`.
    fn kgc(&self, r: u32, irt: u8) -> Option<u64> {
        if r >= REF_BIAS {
            return None;
        }
        let (o, t, off) = self.ins(r)?;
        if o != IR_KGC || t != irt {
            return None;
        }
        if self.gc64 {
            // The 64-bit reference fills the next instruction slot.
            (r + 1 < REF_BIAS).then_some(())?;
            le_u64(&self.b, off + 8)
        } else {
            le_u32(&self.b, off).map(u64::from)
        }
    }

    /// The 64-bit payload of a `KNUM` constant (a frame link with two-slot frames).
    fn knum(&self, r: u32) -> Option<u64> {
        if r >= REF_BIAS {
            return None;
        }
        let (o, _, off) = self.ins(r)?;
        (o == IR_KNUM).then_some(())?;
        le_u64(&self.b, off + 8)
    }

    /// Every function and prototype constant: the candidates for frames whose slot holds no
    /// constant.
    fn proto_candidates(&self, mem: &dyn TargetMemory, layout: &Layout) -> Vec<u64> {
        let mut out = vec![self.h.startpt];
        let mut r = self.h.nk;
        while r < REF_BIAS && r < self.h.key.nins {
            if let Some(p) = self.kgc(r, IRT_PROTO) {
                out.push(p);
            } else if let Some(f) = self.kgc(r, IRT_FUNC)
                && let Some(p) = func_proto(mem, layout, f)
            {
                out.push(p);
            }
            r += 1;
        }
        out.sort_unstable();
        out.dedup();
        out
    }

    fn snap(&self, i: u16) -> Option<(u32, u16, u8)> {
        let off = self.h.snap_off + SNAPSHOT_SIZE * usize::from(i);
        Some((
            le_u32(&self.b, off)?,
            le_u16(&self.b, off + 6)?,
            *self.b.get(off + 10)?,
        ))
    }

    fn map(&self, i: u32) -> Option<u32> {
        if i >= self.h.key.nsnapmap {
            return None;
        }
        le_u32(&self.b, self.h.map_off + 4 * i as usize)
    }
}

/// Frames read from one snapshot, before their prototypes are identified.
struct RawFrame {
    /// The function object, when its slot holds a function constant.
    func: Option<u64>,
    /// The frame link (a return PC for frames called from Lua).
    link: u64,
    /// Entered through a continuation: an inlined metamethod, or the C or fast function a
    /// trace stitches to (`recff_stitch`).
    cont: bool,
    /// With `cont`: the continuation's PC, where the frame below resumes (the snapshot
    /// entry flagged `SNAP_CONT` holds it on both layouts); 0 otherwise.
    cont_pc: u64,
}

/// Decodes the frames of snapshot `i`: (current PC, frames outermost first).
fn snap_raw(blob: &Blob<'_>, i: u16) -> Option<(u64, Vec<RawFrame>)> {
    let (mapofs, _mcofs, nent) = blob.snap(i)?;
    let next = if i + 1 < blob.h.key.nsnap {
        blob.snap(i + 1)?.0
    } else {
        blob.h.key.nsnapmap
    };
    let links_at = mapofs.checked_add(u32::from(nent))?;
    if links_at > next || next > blob.h.key.nsnapmap {
        return None;
    }
    let mut entries = Vec::with_capacity(usize::from(nent));
    for e in mapofs..links_at {
        entries.push(blob.map(e)?);
    }
    let slot = |e: u32| e >> 24;
    let flags = |e: u32| e & (SNAP_FRAME | SNAP_CONT);
    let refr = |e: u32| e & 0xffff;
    let mut frames = Vec::new();
    if blob.gc64 {
        // Two-slot frames: after the entries, one 64-bit `(pc << 8) | (baseslot - 2)`; each
        // frame's link is a numeric constant in its link slot, the function in the slot
        // below it.
        if next - links_at < 2 {
            return None;
        }
        let lo = u64::from(blob.map(links_at)?);
        let hi = u64::from(blob.map(links_at + 1)?);
        let pc = ((hi << 32) | lo) >> 8;
        let mut cont = None;
        for e in &entries {
            let s = slot(*e);
            if s < 2 || flags(*e) == 0 {
                continue;
            }
            let link = blob.knum(refr(*e))?;
            if flags(*e) & SNAP_CONT != 0 {
                // A continuation's PC: the frame above was entered from a metamethod
                // call or a stitch, and the frame below resumes there.
                cont = Some(link);
                continue;
            }
            let func = entries
                .iter()
                .find(|f| slot(**f) == s - 1)
                .and_then(|f| blob.kgc(refr(*f), IRT_FUNC));
            frames.push(RawFrame {
                func,
                link,
                cont: cont.is_some(),
                cont_pc: cont.take().unwrap_or(0),
            });
        }
        Some((pc, without_varg(frames)))
    } else {
        // One-slot frames: after the entries, the current PC, then one link word per frame
        // slot (two for a continuation), innermost first; the slots take them outermost
        // first, from the end.
        let links: Vec<u32> = (links_at..next)
            .map(|e| blob.map(e))
            .collect::<Option<_>>()?;
        let (&pc, rest) = links.split_first()?;
        let linked: Vec<&u32> = entries
            .iter()
            .filter(|e| slot(**e) != 0 && flags(**e) != 0)
            .collect();
        if linked.len() != rest.len() {
            return None;
        }
        let mut cont = None;
        for (k, e) in linked.iter().enumerate() {
            let link = u64::from(rest[rest.len() - 1 - k]);
            if flags(**e) & SNAP_FRAME == 0 {
                // A continuation: its word is the PC where the frame below resumes.
                cont = Some(link);
                continue;
            }
            let func = blob.kgc(refr(**e), IRT_FUNC);
            frames.push(RawFrame {
                func,
                link,
                cont: cont.is_some(),
                cont_pc: cont.take().unwrap_or(0),
            });
        }
        Some((u64::from(pc), without_varg(frames)))
    }
}

/// Drops vararg pseudo-frames: a vararg function's frame relocated above its arguments is
/// the same function as the frame below it (the BPF walk skips them too).
fn without_varg(mut frames: Vec<RawFrame>) -> Vec<RawFrame> {
    frames.retain(|f| f.cont || f.link & FRAME_TYPEP != FRAME_VARG);
    frames
}

/// Identifies the prototypes of a trace's snapshot frames, each read once per decode.
struct Resolver<'a> {
    mem: &'a dyn TargetMemory,
    layout: &'a Layout,
    blob: &'a Blob<'a>,
    protos: HashMap<u64, Option<ProtoHead>>,
    func_protos: HashMap<u64, Option<u64>>,
    /// Every prototype the trace's constants name, read when first needed.
    candidates: Option<Vec<u64>>,
}

impl Resolver<'_> {
    fn proto(&mut self, addr: u64) -> Option<ProtoHead> {
        let (mem, layout) = (self.mem, self.layout);
        *self
            .protos
            .entry(addr)
            .or_insert_with(|| read_proto(mem, layout, addr))
    }

    /// The prototype of frame `f` running at `fpc` (0: unknown): its function constant's,
    /// else the one of the trace's constants whose bytecode holds `fpc`.
    fn frame_proto(&mut self, f: &RawFrame, fpc: u64) -> Option<(u64, ProtoHead)> {
        let (mem, layout) = (self.mem, self.layout);
        let by_func = f.func.and_then(|func| {
            *self
                .func_protos
                .entry(func)
                .or_insert_with(|| func_proto(mem, layout, func))
        });
        match by_func.and_then(|p| self.proto(p).map(|hd| (p, hd))) {
            Some((p, hd)) if fpc == 0 || hd.holds(fpc) => Some((p, hd)),
            _ if fpc != 0 => {
                let candidates = self
                    .candidates
                    .take()
                    .unwrap_or_else(|| self.blob.proto_candidates(mem, layout));
                let found = candidates
                    .iter()
                    .find_map(|p| self.proto(*p).filter(|hd| hd.holds(fpc)).map(|hd| (*p, hd)));
                self.candidates = Some(candidates);
                found
            }
            _ => None,
        }
    }

    /// The frames of a snapshot whose PC is `pc` and raw frames `raw` (outermost first).
    fn frames(&mut self, pc: u64, raw: &[RawFrame]) -> Result<SnapFrames, TraceFallback> {
        // A trace that stitches ends with the frame of the C or fast function it leaves to
        // the interpreter, entered through a continuation; the snapshot's PC is that
        // function's header. The function has not run yet: the trace's code belongs to the
        // Lua frame below, which resumes at the continuation's PC. (Its slot may hold no
        // constant; when it does, it must be a C or fast function.)
        let stitched = raw.last().is_some_and(|f| {
            f.cont
                && is_cfunc_header(self.mem, pc)
                && f.func
                    .is_none_or(|func| func_is_native(self.mem, self.layout, func))
        });
        let keep = raw.len() - usize::from(stitched);
        // PCs: each frame runs at its callee's return PC (or at the continuation's PC when
        // the callee was entered through one); the innermost at the snapshot's PC (+4: the
        // namer takes the instruction before a PC).
        let mut out = Vec::with_capacity(keep);
        for (k, f) in raw[..keep].iter().enumerate() {
            let fpc = match raw.get(k + 1) {
                Some(next) if next.cont => next.cont_pc,
                Some(next) if next.link & FRAME_TYPE == 0 => next.link,
                Some(_) => 0,
                None => pc + 4,
            };
            let (paddr, hd) = self.frame_proto(f, fpc).ok_or(TraceFallback::FuncUnknown)?;
            let link = if f.cont {
                2
            } else if f.link & FRAME_TYPE == 0 {
                0
            } else {
                (f.link & FRAME_TYPEP) as u8
            };
            out.push(LuaFrame {
                func: f.func.unwrap_or(0),
                code: paddr,
                pc: fpc,
                chunkname: hd.chunkname,
                firstline: hd.firstline,
                kind: LuaFrameKind::Lua as u8,
                ffid: 0,
                link,
                reserved: 0,
            });
        }
        let base_pc = match raw.first() {
            Some(f) if f.cont => f.cont_pc,
            Some(f) if f.link & FRAME_TYPE == 0 => f.link,
            Some(_) => 0,
            None => pc + 4,
        };
        out.reverse();
        Ok(SnapFrames {
            base_pc,
            frames: out,
        })
    }
}

/// Reads and decodes a whole trace.
pub(super) fn decode(
    mem: &dyn TargetMemory,
    layout: &Layout,
    h: &Header,
) -> Result<Trace, TraceFallback> {
    let b = mem
        .read(h.key.addr, h.size)
        .map_err(|_| TraceFallback::ReadFailed)?;
    let blob = Blob {
        h,
        b,
        gc64: layout.bpf.gc64 != 0,
    };
    let mut resolver = Resolver {
        mem,
        layout,
        blob: &blob,
        protos: HashMap::new(),
        func_protos: HashMap::new(),
        candidates: None,
    };
    let mut snaps = Vec::with_capacity(usize::from(h.key.nsnap));
    for i in 0..h.key.nsnap {
        let Some((_, mcofs, _)) = blob.snap(i) else {
            return Err(TraceFallback::Invalid);
        };
        let frames = match snap_raw(&blob, i) {
            None => Err(TraceFallback::BadSnapshot),
            Some((pc, raw)) => resolver.frames(pc, &raw),
        };
        snaps.push((u32::from(mcofs), frames));
    }
    // Offsets ascend with the snapshots; anything else is not a trace LuaJIT assembled.
    if snaps.windows(2).any(|w| w[0].0 > w[1].0) {
        return Err(TraceFallback::Invalid);
    }
    Ok(Trace {
        mcode: h.mcode(),
        snaps,
    })
}

impl Trace {
    /// The snapshot charged with the code at `addr` (inside the machine code): the one that
    /// ends the interval holding it, i.e. the first snapshot whose code starts above `addr`.
    /// The code between two snapshots runs the bytecode that leads from the first state to
    /// the second, so the frames it enters (an inlined call, the state right after a call
    /// into C) are the later snapshot's. Past the last snapshot (the loop's tail and exits)
    /// it is the last one.
    pub(super) fn index_at(&self, addr: u64) -> Result<usize, TraceFallback> {
        let ofs = addr
            .checked_sub(self.mcode.start)
            .ok_or(TraceFallback::AddrOutside)?;
        if ofs >= self.mcode.end - self.mcode.start || self.snaps.is_empty() {
            return Err(TraceFallback::AddrOutside);
        }
        let i = self
            .snaps
            .partition_point(|(mcofs, _)| u64::from(*mcofs) <= ofs);
        Ok(i.min(self.snaps.len() - 1))
    }
}

impl Trace {
    /// Bytes a decoded trace holds.
    pub(super) fn bytes(&self) -> usize {
        std::mem::size_of::<Self>()
            + self
                .snaps
                .iter()
                .map(|(_, s)| {
                    std::mem::size_of::<(u32, Result<SnapFrames, TraceFallback>)>()
                        + s.as_ref()
                            .map_or(0, |f| f.frames.len() * std::mem::size_of::<LuaFrame>())
                })
                .sum::<usize>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vararg_pseudo_frames_are_dropped() {
        let f = |link, cont| RawFrame {
            func: None,
            link,
            cont,
            cont_pc: 0,
        };
        // A Lua frame (return PC), its vararg relocation, a continuation frame.
        let kept = without_varg(vec![f(0x1000, false), f(0x18 | 3, false), f(2, true)]);
        let links: Vec<u64> = kept.iter().map(|f| f.link).collect();
        assert_eq!(links, vec![0x1000, 2]);
    }

    #[test]
    fn fallback_names_are_unique_and_indexed() {
        for (i, f) in TraceFallback::ALL.iter().enumerate() {
            assert_eq!(f.index(), i);
            assert!(f.name().starts_with("trace_"));
        }
        let mut names: Vec<_> = TraceFallback::ALL.iter().map(|f| f.name()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), TraceFallback::ALL.len());
    }

    #[test]
    fn code_is_charged_to_the_snapshot_that_ends_its_interval() {
        let frames = |pc| {
            Ok(SnapFrames {
                base_pc: pc,
                frames: Vec::new(),
            })
        };
        let t = Trace {
            mcode: 0x1000..0x1100,
            snaps: vec![(0, frames(1)), (0x10, frames(2)), (0x40, frames(3))],
        };
        assert_eq!(t.index_at(0x1000), Ok(1));
        assert_eq!(t.index_at(0x100f), Ok(1));
        assert_eq!(t.index_at(0x1010), Ok(2));
        assert_eq!(t.index_at(0x103f), Ok(2));
        assert_eq!(t.index_at(0x1040), Ok(2));
        assert_eq!(t.index_at(0x10ff), Ok(2));
        assert_eq!(t.index_at(0xfff), Err(TraceFallback::AddrOutside));
        assert_eq!(t.index_at(0x1100), Err(TraceFallback::AddrOutside));
    }
}
