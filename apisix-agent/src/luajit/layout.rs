//! Structure layouts of the known LuaJIT builds, one table per layout. Every number was
//! measured with `offsetof`/`sizeof` against the luajit2 2.1-20230119 sources, built as GC64
//! (Debian's `libluajit2-5.1-2`) and with `-DLUAJIT_DISABLE_GC64`, and is exercised by the
//! root tests that walk real nginx-lua workers of both builds.

use apisix_ebpf_common::LuaLayout;

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
}
