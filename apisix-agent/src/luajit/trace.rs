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
//! Hooks: `process_vm_readv` of the target (trace table, trace, prototypes). Metrics: the
//! fallback counts ([`TraceFallback`]), read by the stack builder's caller.

use std::{collections::HashMap, ops::Range, sync::Arc};

use apisix_ebpf_common::{LuaFrame, LuaFrameKind};

use super::{
    bytecode,
    layout::{
        Layout,
        gct::{FUNC as GCT_FUNC, PROTO as GCT_PROTO, TRACE as GCT_TRACE},
    },
};
use crate::target::memory::{MAX_READ, TargetMemory};

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
/// Bytes of decoded traces cached when no limit was set (`limits.trace_bytes`).
pub const DEFAULT_CACHE_BYTES: usize = 16 << 20;
/// Decoded traces kept at most (all processes together).
const MAX_CACHED_TRACES: usize = 4096;
/// Side-trace chains kept at most (all processes together).
const MAX_CACHED_CHAINS: usize = 512;
/// Side traces walked per chain.
const MAX_SIDE_WALK: usize = 256;
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

/// A trace's frames at one machine-code address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TraceFrames {
    /// The trace number.
    pub traceno: u16,
    /// Inlined frames and the base frame's PC.
    pub snap: SnapFrames,
}

/// One decoded trace.
#[derive(Debug)]
struct Trace {
    mcode: Range<u64>,
    /// (byte offset of the snapshot's code, its frames), ascending by offset.
    snaps: Vec<(u32, Result<SnapFrames, TraceFallback>)>,
}

/// Identity of a decoded trace: a number is reused, an address too, all of it together is
/// what makes stale frames impossible.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct TraceKey {
    pid: u32,
    traceno: u16,
    addr: u64,
    mcode: u64,
    szmcode: u32,
    nins: u32,
    nsnap: u16,
    nsnapmap: u32,
}

/// The header fields of a `GCtrace`, validated (its machine code lies in user space).
#[derive(Clone, Copy, Debug)]
struct Header {
    key: TraceKey,
    nk: u32,
    startpt: u64,
    /// `link`, `root` and `nextside`: trace numbers, 0 for none.
    link: u16,
    root: u16,
    nextside: u16,
    /// Bytes of the whole allocation, from the trace's address.
    size: usize,
    /// Offsets of the IR (constant `nk`), the snapshots and the map in the allocation.
    ir_off: usize,
    snap_off: usize,
    map_off: usize,
}

/// What the frames need of a prototype.
#[derive(Clone, Copy, Debug)]
struct ProtoHead {
    chunkname: u64,
    firstline: u32,
    /// Bytecode range `[bc, bc + 4 * sizebc)`.
    bc: u64,
    sizebc: u32,
}

impl ProtoHead {
    /// Whether `pc` is a return PC / next-instruction address inside this prototype.
    fn holds(&self, pc: u64) -> bool {
        pc >= self.bc + 4 && pc <= self.bc + 4 * u64::from(self.sizebc) && pc.is_multiple_of(4)
    }
}

fn le_u16(b: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(off..off + 2)?.try_into().ok()?))
}

fn le_u32(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(off..off + 4)?.try_into().ok()?))
}

fn le_u64(b: &[u8], off: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(off..off + 8)?.try_into().ok()?))
}

/// Reads the prototype header at `addr` and checks it is one.
fn read_proto(mem: &dyn TargetMemory, layout: &Layout, addr: u64) -> Option<ProtoHead> {
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
fn trace_address(
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
fn read_header(
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
    fn mcode(&self) -> Range<u64> {
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

/// Reads and decodes a whole trace.
fn decode(mem: &dyn TargetMemory, layout: &Layout, h: &Header) -> Result<Trace, TraceFallback> {
    let b = mem
        .read(h.key.addr, h.size)
        .map_err(|_| TraceFallback::ReadFailed)?;
    let blob = Blob {
        h,
        b,
        gc64: layout.bpf.gc64 != 0,
    };
    let mut protos: HashMap<u64, Option<ProtoHead>> = HashMap::new();
    let mut proto = |addr: u64| -> Option<ProtoHead> {
        *protos
            .entry(addr)
            .or_insert_with(|| read_proto(mem, layout, addr))
    };
    let mut func_protos: HashMap<u64, Option<u64>> = HashMap::new();
    let mut candidates: Option<Vec<u64>> = None;
    let mut snaps = Vec::with_capacity(usize::from(h.key.nsnap));
    for i in 0..h.key.nsnap {
        let Some((_, mcofs, _)) = blob.snap(i) else {
            return Err(TraceFallback::Invalid);
        };
        let frames = match snap_raw(&blob, i) {
            None => Err(TraceFallback::BadSnapshot),
            Some((pc, raw)) => {
                // A trace that stitches ends with the frame of the C or fast function it
                // leaves to the interpreter, entered through a continuation; the snapshot's
                // PC is that function's header. The function has not run yet: the trace's
                // code belongs to the Lua frame below, which resumes at the continuation's
                // PC. (Its slot may hold no constant; when it does, it must be a C or fast
                // function.)
                let stitched = raw.last().is_some_and(|f| {
                    f.cont
                        && is_cfunc_header(mem, pc)
                        && f.func.is_none_or(|func| func_is_native(mem, layout, func))
                });
                let keep = raw.len() - usize::from(stitched);
                // PCs: each frame runs at its callee's return PC (or at the continuation's
                // PC when the callee was entered through one); the innermost at the
                // snapshot's PC (+4: the namer takes the instruction before a PC).
                let mut out = Vec::with_capacity(keep);
                let mut result = Ok(());
                for (k, f) in raw[..keep].iter().enumerate() {
                    let fpc = match raw.get(k + 1) {
                        Some(next) if next.cont => next.cont_pc,
                        Some(next) if next.link & FRAME_TYPE == 0 => next.link,
                        Some(_) => 0,
                        None => pc + 4,
                    };
                    let by_func = f.func.and_then(|func| {
                        *func_protos
                            .entry(func)
                            .or_insert_with(|| func_proto(mem, layout, func))
                    });
                    let head = by_func.and_then(|p| proto(p).map(|hd| (p, hd)));
                    let head = match head {
                        Some((p, hd)) if fpc == 0 || hd.holds(fpc) => Some((p, hd)),
                        _ if fpc != 0 => candidates
                            .get_or_insert_with(|| blob.proto_candidates(mem, layout))
                            .iter()
                            .find_map(|p| proto(*p).filter(|hd| hd.holds(fpc)).map(|hd| (*p, hd))),
                        _ => None,
                    };
                    let Some((paddr, hd)) = head else {
                        result = Err(TraceFallback::FuncUnknown);
                        break;
                    };
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
                result.map(|()| {
                    out.reverse();
                    SnapFrames {
                        base_pc,
                        frames: out,
                    }
                })
            }
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
    fn index_at(&self, addr: u64) -> Result<usize, TraceFallback> {
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

impl Trace {
    /// Bytes a decoded trace holds.
    fn bytes(&self) -> usize {
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
