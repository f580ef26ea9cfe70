//! Structure layouts of the known LuaJIT builds, one table per layout. Every number was
//! measured with `offsetof`/`sizeof` against the luajit2 2.1-20230119 sources, built as GC64
//! (Debian's `libluajit2-5.1-2`) and with `-DLUAJIT_DISABLE_GC64`, and is exercised by the
//! root tests that walk real nginx-lua workers of both builds. The heap fields
//! ([`HeapLayout`]) were also checked against the two real libraries at run time:
//! `lua_getallocf` returns the pointers read at those offsets of `G(L)`, and
//! `lua_gc(L, LUA_GCCOUNT/COUNTB)` the size read there.

use apisix_ebpf_common::LuaLayout;

/// A GC object's `gct` byte: `~itype` of its type, the same in every layout.
pub mod gct {
    /// `GCstr`.
    pub const STR: u8 = 4;
    /// `GCproto`.
    pub const PROTO: u8 = 7;
    /// `GCfunc`.
    pub const FUNC: u8 = 8;
    /// `GCtrace`.
    pub const TRACE: u8 = 9;
    /// `GCupval`.
    pub const UPVAL: u8 = 5;
    /// `lua_State` (a coroutine or the main thread).
    pub const THREAD: u8 = 6;
    /// `GCcdata`.
    pub const CDATA: u8 = 10;
    /// `GCtab`.
    pub const TAB: u8 = 11;
    /// `GCudata`.
    pub const UDATA: u8 = 12;
}

/// One layout: what the BPF walker reads plus what user space needs to name frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// Offsets the BPF side uses.
    pub bpf: LuaLayout,
    /// `GCproto.sizebc`.
    pub pt_sizebc: u32,
    /// `GCproto.k`.
    pub pt_k: u32,
    /// `GCproto.sizekgc`.
    pub pt_sizekgc: u32,
    /// `GCproto.sizept`.
    pub pt_sizept: u32,
    /// `GCproto.sizeuv`.
    pub pt_sizeuv: u32,
    /// `GCproto.numline`.
    pub pt_numline: u32,
    /// `GCproto.lineinfo`.
    pub pt_lineinfo: u32,
    /// `GCproto.uvinfo`.
    pub pt_uvinfo: u32,
    /// `GCproto.varinfo`.
    pub pt_varinfo: u32,
    /// `GCstr.len`.
    pub str_len: u32,
    /// `sizeof(GCstr)`: the string's bytes follow the header.
    pub str_size: u32,
    /// CFA offset from the stack pointer in the interpreter (`CFRAME_SIZE`), as `.eh_frame`
    /// states it: checked against the binary at detection.
    pub cframe_size: u64,
    /// The JIT's structures: the trace table and a trace's header.
    pub trace: TraceLayout,
    /// The heap's fields of `global_State`: the allocator and the heap size.
    pub heap: HeapLayout,
    /// Tables, functions and upvalues, and the registry: what [`super::tables`] reads.
    pub values: ValueLayout,
    /// The rest of what a heap snapshot ([`super::snapshot`]) reads and sizes.
    pub objects: ObjectLayout,
}

/// What a heap snapshot needs beyond [`ValueLayout`]: the sizes of every GC object type as
/// LuaJIT counts them in `gc.total`, and the fields that lead from one object to others.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ObjectLayout {
    /// `lua_State.top` (a native pointer).
    pub l_top: u32,
    /// `lua_State.env` (a GC reference: the thread's globals).
    pub l_env: u32,
    /// `GCfunc.env` (a GC reference), the same for Lua and C functions.
    pub fn_env: u32,
    /// `GCfuncC.upvalue`: a C function's upvalues, `TValue`s inline.
    pub fn_c_upvalue: u32,
    /// `GCupval.closed` (u8).
    pub uv_closed: u32,
    /// `sizeof(GCupval)`.
    pub uv_size: u32,
    /// `GCudata.env`, `.len` (u32) and `.metatable`, and `sizeof(GCudata)`.
    pub ud_env: u32,
    pub ud_len: u32,
    pub ud_metatable: u32,
    pub ud_size: u32,
    /// `sizeof(GCcdata)`: the header of a cdata object (its payload's size is its C type's).
    pub cd_size: u32,
    /// `GCtab.colo` (i8): the array part is colocated with the header when positive.
    pub t_colo: u32,
    /// `global_State.nilnode`: the hash part of every table without one.
    pub g_nilnode: u32,
    /// `global_State.gcroot`: [`GCROOT_MAX`] GC references (metamethod names, base
    /// metatables).
    pub g_gcroot: u32,
}

/// Entries of `global_State.gcroot`.
pub const GCROOT_MAX: u32 = 38;

/// Where the registry, tables (`GCtab`, `Node`), Lua functions (`GCfuncL`) and upvalues
/// (`GCupval`) keep the fields the table reader ([`super::tables`]) uses. A `TValue` is 8
/// bytes in both layouts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ValueLayout {
    /// `global_State.registrytv`: the registry table, a `TValue`.
    pub g_registrytv: u32,
    /// `GCtab.array`: the array part (a memory reference to `asize` `TValue`s).
    pub t_array: u32,
    /// `GCtab.metatable` (a GC reference).
    pub t_metatable: u32,
    /// `GCtab.node`: the hash part (a memory reference to `hmask + 1` `Node`s).
    pub t_node: u32,
    /// `GCtab.asize` (u32).
    pub t_asize: u32,
    /// `GCtab.hmask` (u32).
    pub t_hmask: u32,
    /// `sizeof(GCtab)`.
    pub t_size: u32,
    /// `sizeof(Node)`; `Node.val` is at 0.
    pub node_size: u32,
    /// `Node.key`.
    pub node_key: u32,
    /// `GCfuncL.nupvalues` (u8).
    pub fn_nupvalues: u32,
    /// `GCfuncL.uvptr`: the upvalue objects (GC references).
    pub fn_uvptr: u32,
    /// `GCupval.v`: a memory reference to the upvalue's value (its own `tv` once closed, a
    /// stack slot while open).
    pub uv_v: u32,
}

/// The allocator and the heap size in `global_State` (user space reads them; the BPF side
/// only probes the allocator).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeapLayout {
    /// `global_State.allocf`: the allocator, `void *(*)(void *ud, void *ptr, size_t osize,
    /// size_t nsize)` (a native pointer).
    pub g_allocf: u32,
    /// `global_State.allocd`: the allocator's first argument (a native pointer).
    pub g_allocd: u32,
    /// `global_State.gc.total`: bytes allocated through the allocator and not yet freed,
    /// what `collectgarbage("count")` reports (in KiB).
    pub g_gc_total: u32,
    /// Width of `gc.total` (`GCSize`): 8 bytes with GC64, 4 without.
    pub gc_total_size: u32,
    /// `global_State.mainthref`: a GC reference to the main `lua_State`.
    pub g_mainthref: u32,
    /// `offsetof(GG_State, g)`: the main `lua_State` opens `GG_State`, right below the
    /// `global_State` (`sizeof(lua_State)`).
    pub gg_g: u32,
    /// `global_State.gc.currentwhite` (u8): flips at every cycle's atomic phase; directly
    /// followed by `gc.state` (u8, `GCSpause` = 0 between cycles).
    pub g_gc_currentwhite: u32,
}

/// Offsets of `jit_State` and `GCtrace` fields, for rebuilding the frames a trace inlined
/// (measured with `offsetof` like the rest; a `GCtrace` without `LUAJIT_USE_GDBJIT`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceLayout {
    /// `jit_State` minus `global_State` inside `GG_State` (`G2J`).
    pub g_to_j: u32,
    /// `jit_State.trace`: a native pointer to the array of trace GC references.
    pub j_trace: u32,
    /// `jit_State.sizetrace`: bounds a trace number.
    pub j_sizetrace: u32,
    /// `GCtrace.nsnap` (u16).
    pub t_nsnap: u32,
    /// `GCtrace.nins` (u32, biased IR reference).
    pub t_nins: u32,
    /// `GCtrace.ir` (native pointer, biased so that `ir + 8 * ref` is instruction `ref`).
    pub t_ir: u32,
    /// `GCtrace.nk` (u32, lowest constant's biased reference).
    pub t_nk: u32,
    /// `GCtrace.nsnapmap` (u32).
    pub t_nsnapmap: u32,
    /// `GCtrace.snap` (native pointer).
    pub t_snap: u32,
    /// `GCtrace.snapmap` (native pointer).
    pub t_snapmap: u32,
    /// `GCtrace.startpt` (GC reference to the starting prototype).
    pub t_startpt: u32,
    /// `GCtrace.szmcode` (u32).
    pub t_szmcode: u32,
    /// `GCtrace.mcode` (native pointer).
    pub t_mcode: u32,
    /// `GCtrace.traceno` (u16).
    pub t_traceno: u32,
    /// `GCtrace.link` (u16): the trace this one jumps to at its end (itself for a loop).
    pub t_link: u32,
    /// `GCtrace.root` (u16; 0 for a root trace).
    pub t_root: u32,
    /// `GCtrace.nextside` (u16): the next side trace of the same root; a root trace's own
    /// `nextside` starts the chain of its side traces.
    pub t_nextside: u32,
    /// `sizeof(GCtrace)`.
    pub t_size: u32,
}

/// GC64 (64-bit GC references, two-slot frames): OpenResty's default.
pub const GC64: Layout = Layout {
    bpf: LuaLayout {
        gc64: 1,
        save_l: 16,
        l_glref: 16,
        l_base: 32,
        l_stack: 56,
        l_cframe: 80,
        l_stacksize: 88,
        g_cur_l: 368,
        g_vmstate: 184,
        g_jit_base: 376,
        fn_gct: 9,
        fn_ffid: 10,
        fn_pc: 32,
        fn_cfunc: 40,
        pt_size: 104,
        pt_chunkname: 64,
        pt_firstline: 72,
        g2disp: 4008,
        g_trace: 736 + 384,
        t_mcode: 88,
    },
    pt_sizebc: 12,
    pt_k: 32,
    pt_sizekgc: 48,
    pt_sizept: 56,
    pt_sizeuv: 60,
    pt_numline: 76,
    pt_lineinfo: 80,
    pt_uvinfo: 88,
    pt_varinfo: 96,
    str_len: 20,
    str_size: 24,
    cframe_size: 80,
    trace: TraceLayout {
        g_to_j: 736,
        j_trace: 384,
        j_sizetrace: 396,
        t_nsnap: 10,
        t_nins: 12,
        t_ir: 32,
        t_nk: 40,
        t_nsnapmap: 44,
        t_snap: 48,
        t_snapmap: 56,
        t_startpt: 64,
        t_szmcode: 84,
        t_mcode: 88,
        t_traceno: 104,
        t_link: 106,
        t_root: 108,
        t_nextside: 112,
        t_size: 120,
    },
    heap: HeapLayout {
        g_allocf: 0,
        g_allocd: 8,
        g_gc_total: 16,
        gc_total_size: 8,
        g_mainthref: 192,
        gg_g: 112,
        g_gc_currentwhite: 32,
    },
    values: ValueLayout {
        g_registrytv: 272,
        t_array: 16,
        t_metatable: 32,
        t_node: 40,
        t_asize: 48,
        t_hmask: 52,
        t_size: 64,
        node_size: 24,
        node_key: 8,
        fn_nupvalues: 11,
        fn_uvptr: 40,
        uv_v: 32,
    },
    objects: ObjectLayout {
        l_top: 40,
        l_env: 72,
        fn_env: 16,
        fn_c_upvalue: 48,
        uv_closed: 10,
        uv_size: 48,
        ud_env: 16,
        ud_len: 24,
        ud_metatable: 32,
        ud_size: 48,
        cd_size: 16,
        t_colo: 11,
        g_nilnode: 248,
        g_gcroot: 424,
    },
};

/// Non-GC64 (32-bit GC references, one-slot frames): `-DLUAJIT_DISABLE_GC64`.
pub const GC32: Layout = Layout {
    bpf: LuaLayout {
        gc64: 0,
        save_l: 24,
        l_glref: 8,
        l_base: 16,
        l_stack: 36,
        l_cframe: 48,
        l_stacksize: 56,
        g_cur_l: 288,
        g_vmstate: 136,
        g_jit_base: 292,
        fn_gct: 5,
        fn_ffid: 6,
        fn_pc: 16,
        fn_cfunc: 24,
        pt_size: 64,
        pt_chunkname: 40,
        pt_firstline: 44,
        g2disp: 3216,
        g_trace: 496 + 360,
        t_mcode: 64,
    },
    pt_sizebc: 8,
    pt_k: 16,
    pt_sizekgc: 24,
    pt_sizept: 32,
    pt_sizeuv: 36,
    pt_numline: 48,
    pt_lineinfo: 52,
    pt_uvinfo: 56,
    pt_varinfo: 60,
    str_len: 16,
    str_size: 20,
    cframe_size: 80,
    trace: TraceLayout {
        g_to_j: 496,
        j_trace: 360,
        j_sizetrace: 372,
        t_nsnap: 6,
        t_nins: 8,
        t_ir: 16,
        t_nk: 24,
        t_nsnapmap: 28,
        t_snap: 32,
        t_snapmap: 40,
        t_startpt: 48,
        t_szmcode: 60,
        t_mcode: 64,
        t_traceno: 80,
        t_link: 82,
        t_root: 84,
        t_nextside: 88,
        t_size: 96,
    },
    heap: HeapLayout {
        g_allocf: 0,
        g_allocd: 8,
        g_gc_total: 16,
        gc_total_size: 4,
        g_mainthref: 140,
        gg_g: 80,
        g_gc_currentwhite: 24,
    },
    values: ValueLayout {
        g_registrytv: 216,
        t_array: 8,
        t_metatable: 16,
        t_node: 20,
        t_asize: 24,
        t_hmask: 28,
        t_size: 32,
        node_size: 24,
        node_key: 8,
        fn_nupvalues: 7,
        fn_uvptr: 20,
        uv_v: 16,
    },
    objects: ObjectLayout {
        l_top: 24,
        l_env: 44,
        fn_env: 8,
        fn_c_upvalue: 32,
        uv_closed: 6,
        uv_size: 24,
        ud_env: 8,
        ud_len: 12,
        ud_metatable: 16,
        ud_size: 24,
        cd_size: 8,
        t_colo: 7,
        g_nilnode: 192,
        g_gcroot: 336,
    },
};

#[cfg(test)]
mod tests {
    use super::*;

    /// The BPF walker reads `gct`+`ffid` and `chunkname`+`firstline` in one read each.
    #[test]
    fn fields_read_together_are_adjacent() {
        for l in [&GC64, &GC32] {
            assert_eq!(l.bpf.fn_ffid, l.bpf.fn_gct + 1);
            let refsize = if l.bpf.gc64 != 0 { 8 } else { 4 };
            assert_eq!(l.bpf.pt_firstline, l.bpf.pt_chunkname + refsize);
        }
    }

    #[test]
    fn layouts_are_self_consistent() {
        for l in [GC64, GC32] {
            let refw = if l.bpf.gc64 != 0 { 8 } else { 4 };
            // chunkname is a GC ref right before firstline.
            assert_eq!(l.bpf.pt_chunkname + refw, l.bpf.pt_firstline);
            // The three debug refs are consecutive and end the prototype header.
            assert_eq!(l.pt_lineinfo + refw, l.pt_uvinfo);
            assert_eq!(l.pt_uvinfo + refw, l.pt_varinfo);
            assert_eq!(l.pt_varinfo + refw, l.bpf.pt_size);
            // GC header: gct follows the next-GC ref and the mark byte.
            assert_eq!(l.bpf.fn_gct, refw + 1);
            assert_eq!(l.bpf.fn_ffid, l.bpf.fn_gct + 1);
            assert!(l.str_len + 4 <= l.str_size);
        }
    }

    /// The heap fields as measured (`offsetof`/`sizeof` on both builds, and read back from
    /// the real libraries): `global_State` opens with `allocf`, `allocd`, then `GCState`
    /// whose first member is `total` (`GCSize`: 64 bits only with GC64).
    #[test]
    fn heap_fields_are_pinned() {
        assert_eq!(
            GC64.heap,
            HeapLayout {
                g_allocf: 0,
                g_allocd: 8,
                g_gc_total: 16,
                gc_total_size: 8,
                g_mainthref: 192,
                gg_g: 112,
                g_gc_currentwhite: 32,
            }
        );
        assert_eq!(
            GC32.heap,
            HeapLayout {
                g_allocf: 0,
                g_allocd: 8,
                g_gc_total: 16,
                gc_total_size: 4,
                g_mainthref: 140,
                gg_g: 80,
                g_gc_currentwhite: 24,
            }
        );
        for l in [GC64, GC32] {
            // allocf and allocd are native pointers in both layouts; gc.total follows them
            // and lies before vmstate and cur_L.
            assert_eq!(l.heap.g_allocd, l.heap.g_allocf + 8);
            assert_eq!(l.heap.g_gc_total, l.heap.g_allocd + 8);
            assert!(l.heap.g_gc_total + l.heap.gc_total_size <= l.bpf.g_vmstate);
            assert_eq!(l.heap.gc_total_size, if l.bpf.gc64 != 0 { 8 } else { 4 });
            // The main thread's glref lies inside the lua_State below G; mainthref lies
            // between vmstate and cur_L.
            assert!(l.bpf.l_glref < l.heap.gg_g);
            assert!(l.heap.g_mainthref > l.bpf.g_vmstate && l.heap.g_mainthref < l.bpf.g_cur_l);
            // GCState: total, threshold (GCSize each), then currentwhite and state.
            assert_eq!(
                l.heap.g_gc_currentwhite,
                l.heap.g_gc_total + 2 * l.heap.gc_total_size
            );
        }
    }

    /// The value fields as measured (`offsetof`/`sizeof` on both builds of luajit2
    /// 2.1-20230119), and how they follow the structs' declaration order.
    #[test]
    fn value_fields_follow_the_structs() {
        for l in [GC64, GC32] {
            let v = l.values;
            let refw = if l.bpf.gc64 != 0 { 8 } else { 4 };
            // GCtab: header, nomm, colo, then array, gclist, metatable, node (refs), asize,
            // hmask (u32), and with GC64 freetop.
            assert_eq!(v.t_array, (l.bpf.fn_gct + 3).div_ceil(refw) * refw);
            assert_eq!(v.t_metatable, v.t_array + 2 * refw);
            assert_eq!(v.t_node, v.t_metatable + refw);
            assert_eq!(v.t_asize, v.t_node + refw);
            assert_eq!(v.t_hmask, v.t_asize + 4);
            assert_eq!(v.t_size, v.t_hmask + 4 + if refw == 8 { 8 } else { 0 });
            // Node: val, key (TValues), next and (without GC64) freetop: 24 bytes both ways.
            assert_eq!((v.node_key, v.node_size), (8, 24));
            // GCfuncL: ffid then nupvalues after gct; uvptr right after pc.
            assert_eq!(v.fn_nupvalues, l.bpf.fn_ffid + 1);
            assert_eq!(v.fn_uvptr, l.bpf.fn_pc + refw);
            // The registry lies after mainthref, before cur_L.
            assert!(v.g_registrytv > l.heap.g_mainthref && v.g_registrytv < l.bpf.g_cur_l);
            assert_eq!(v.g_registrytv % 8, 0);
        }
        assert_eq!(
            (GC64.values.g_registrytv, GC32.values.g_registrytv),
            (272, 216)
        );
        assert_eq!((GC64.values.uv_v, GC32.values.uv_v), (32, 16));
    }

    /// The trace header fields follow `GCtrace`'s declaration order and widths.
    #[test]
    fn trace_layouts_follow_the_struct() {
        for l in [GC64, GC32] {
            let t = l.trace;
            let refw = if l.bpf.gc64 != 0 { 8 } else { 4 };
            // GC header (next ref, marked, gct), then nsnap (u16) and nins (u32).
            assert_eq!(t.t_nsnap, l.bpf.fn_gct + 1);
            assert_eq!(t.t_nins, t.t_nsnap + 2);
            // ir is a native pointer, then nk and nsnapmap (u32 each), snap and snapmap.
            assert_eq!(t.t_nk, t.t_ir + 8);
            assert_eq!(t.t_nsnapmap, t.t_nk + 4);
            assert_eq!(t.t_snap, t.t_nsnapmap + 4);
            assert_eq!(t.t_snapmap, t.t_snap + 8);
            assert_eq!(t.t_startpt, t.t_snapmap + 8);
            // startpt, startpc (refs), startins (u32), szmcode (u32), mcode (pointer).
            assert_eq!(t.t_szmcode, t.t_startpt + 2 * refw + 4);
            assert_eq!(t.t_mcode % 8, 0);
            // mcode, mcloop (u32), nchild, spadjust, traceno, link, root (u16 each).
            assert_eq!(t.t_traceno, t.t_mcode + 8 + 4 + 2 + 2);
            // traceno, link, root, nextroot, nextside (u16 each).
            assert_eq!(t.t_link, t.t_traceno + 2);
            assert_eq!(t.t_root, t.t_traceno + 4);
            assert_eq!(t.t_nextside, t.t_traceno + 8);
            assert_eq!(t.j_sizetrace, t.j_trace + 8 + 4);
            // The trace table lies inside `GG_State` after `global_State`.
            assert!(t.g_to_j > l.bpf.g_jit_base);
            // The BPF side's copies of the same facts.
            assert_eq!(l.bpf.g_trace, t.g_to_j + t.j_trace);
            assert_eq!(l.bpf.t_mcode, t.t_mcode);
        }
    }

    /// The snapshot's fields as measured (`offsetof`/`sizeof` on both builds of luajit2
    /// 2.1-20230119), and how they follow the structs' declaration order.
    #[test]
    fn object_fields_follow_the_structs() {
        for l in [GC64, GC32] {
            let o = l.objects;
            let refw = if l.bpf.gc64 != 0 { 8 } else { 4 };
            // lua_State: base, top (native pointers), then env right before cframe.
            assert_eq!(o.l_top, l.bpf.l_base + 8);
            assert_eq!(o.l_env + refw, l.bpf.l_cframe);
            // GCfuncC: cfunc (a native pointer), then the upvalues.
            assert_eq!(o.fn_c_upvalue, l.bpf.fn_cfunc + 8);
            // GCfunc.env is the first reference after the header.
            assert_eq!(o.fn_env, refw * 2);
            // GCupval: closed follows gct; v and dhash end it.
            assert_eq!(o.uv_closed, l.bpf.fn_gct + 1);
            assert_eq!(o.uv_size, (l.values.uv_v + refw + 4).div_ceil(8) * 8);
            // GCudata: env, len, metatable, align1; GCtab.colo follows nomm.
            assert_eq!(o.ud_env, refw * 2);
            assert_eq!(o.ud_len, o.ud_env + refw);
            assert_eq!(o.ud_metatable, (o.ud_len + 4).div_ceil(refw) * refw);
            assert_eq!(o.t_colo, l.bpf.fn_gct + 2);
            // nilnode lies between the registry's neighbours; gcroot after cur_L.
            assert!(o.g_nilnode < l.values.g_registrytv);
            assert!(o.g_gcroot > l.bpf.g_cur_l);
        }
        assert_eq!((GC64.objects.ud_size, GC32.objects.ud_size), (48, 24));
        assert_eq!((GC64.objects.cd_size, GC32.objects.cd_size), (16, 8));
        assert_eq!((GC64.objects.g_gcroot, GC32.objects.g_gcroot), (424, 336));
    }
}
