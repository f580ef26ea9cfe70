//! Fast-function (builtin) names by id, as numbered in the known LuaJIT builds (OpenResty
//! luajit2 2.1, GC64 and non-GC64 alike). Id 0 is a Lua function, 1 a C function; fast
//! functions start at 2. Names are LuaJIT's internal ones with the library prefix turned into
//! a dot: `string_rep` → `string.rep`.

use super::Flavour;

/// Internal names of fast functions 2, 3, … of OpenResty luajit2 2.1.0-beta3.
const LUAJIT2_2_1: [&str; 228] = [
    "assert",
    "type",
    "next",
    "pairs",
    "ipairs_aux",
    "ipairs",
    "getmetatable",
    "setmetatable",
    "getfenv",
    "setfenv",
    "rawget",
    "rawset",
    "rawequal",
    "unpack",
    "select",
    "tonumber",
    "tostring",
    "error",
    "pcall",
    "xpcall",
    "loadfile",
    "load",
    "loadstring",
    "dofile",
    "gcinfo",
    "collectgarbage",
    "newproxy",
    "print",
    "coroutine_status",
    "coroutine_running",
    "coroutine_isyieldable",
    "coroutine_create",
    "coroutine_yield",
    "coroutine_resume",
    "coroutine_wrap_aux",
    "coroutine_wrap",
    "thread_exdata",
    "thread_exdata2",
    "math_abs",
    "math_floor",
    "math_ceil",
    "math_sqrt",
    "math_log10",
    "math_exp",
    "math_sin",
    "math_cos",
    "math_tan",
    "math_asin",
    "math_acos",
    "math_atan",
    "math_sinh",
    "math_cosh",
    "math_tanh",
    "math_frexp",
    "math_modf",
    "math_log",
    "math_atan2",
    "math_pow",
    "math_fmod",
    "math_ldexp",
    "math_min",
    "math_max",
    "math_random",
    "math_randomseed",
    "bit_tobit",
    "bit_bnot",
    "bit_bswap",
    "bit_lshift",
    "bit_rshift",
    "bit_arshift",
    "bit_rol",
    "bit_ror",
    "bit_band",
    "bit_bor",
    "bit_bxor",
    "bit_tohex",
    "string_byte",
    "string_char",
    "string_sub",
    "string_rep",
    "string_reverse",
    "string_lower",
    "string_upper",
    "string_dump",
    "string_find",
    "string_match",
    "string_gmatch_aux",
    "string_gmatch",
    "string_gsub",
    "string_format",
    "table_maxn",
    "table_insert",
    "table_concat",
    "table_clone",
    "table_isarray",
    "table_nkeys",
    "table_isempty",
    "table_sort",
    "table_new",
    "table_clear",
    "io_method_close",
    "io_method_read",
    "io_method_write",
    "io_method_flush",
    "io_method_seek",
    "io_method_setvbuf",
    "io_method_lines",
    "io_method___gc",
    "io_method___tostring",
    "io_open",
    "io_popen",
    "io_tmpfile",
    "io_close",
    "io_read",
    "io_write",
    "io_flush",
    "io_input",
    "io_output",
    "io_lines",
    "io_type",
    "os_execute",
    "os_remove",
    "os_rename",
    "os_tmpname",
    "os_getenv",
    "os_exit",
    "os_clock",
    "os_date",
    "os_time",
    "os_difftime",
    "os_setlocale",
    "debug_getregistry",
    "debug_getmetatable",
    "debug_setmetatable",
    "debug_getfenv",
    "debug_setfenv",
    "debug_getinfo",
    "debug_getlocal",
    "debug_setlocal",
    "debug_getupvalue",
    "debug_setupvalue",
    "debug_upvalueid",
    "debug_upvaluejoin",
    "debug_sethook",
    "debug_gethook",
    "debug_debug",
    "debug_traceback",
    "jit_on",
    "jit_off",
    "jit_flush",
    "jit_status",
    "jit_security",
    "jit_attach",
    "jit_prngstate",
    "jit_util_funcinfo",
    "jit_util_funcbc",
    "jit_util_funck",
    "jit_util_funcuvname",
    "jit_util_traceinfo",
    "jit_util_traceir",
    "jit_util_tracek",
    "jit_util_tracesnap",
    "jit_util_tracemc",
    "jit_util_traceexitstub",
    "jit_util_ircalladdr",
    "jit_opt_start",
    "jit_profile_start",
    "jit_profile_stop",
    "jit_profile_dumpstack",
    "ffi_meta___index",
    "ffi_meta___newindex",
    "ffi_meta___eq",
    "ffi_meta___len",
    "ffi_meta___lt",
    "ffi_meta___le",
    "ffi_meta___concat",
    "ffi_meta___call",
    "ffi_meta___add",
    "ffi_meta___sub",
    "ffi_meta___mul",
    "ffi_meta___div",
    "ffi_meta___mod",
    "ffi_meta___pow",
    "ffi_meta___unm",
    "ffi_meta___tostring",
    "ffi_meta___pairs",
    "ffi_meta___ipairs",
    "ffi_clib___index",
    "ffi_clib___newindex",
    "ffi_clib___gc",
    "ffi_callback_free",
    "ffi_callback_set",
    "ffi_cdef",
    "ffi_new",
    "ffi_cast",
    "ffi_typeof",
    "ffi_typeinfo",
    "ffi_istype",
    "ffi_sizeof",
    "ffi_alignof",
    "ffi_offsetof",
    "ffi_errno",
    "ffi_string",
    "ffi_copy",
    "ffi_fill",
    "ffi_abi",
    "ffi_metatype",
    "ffi_gc",
    "ffi_load",
    "buffer_method_free",
    "buffer_method_reset",
    "buffer_method_skip",
    "buffer_method_set",
    "buffer_method_put",
    "buffer_method_putf",
    "buffer_method_get",
    "buffer_method_putcdata",
    "buffer_method_reserve",
    "buffer_method_commit",
    "buffer_method_ref",
    "buffer_method_encode",
    "buffer_method_decode",
    "buffer_method___gc",
    "buffer_method___tostring",
    "buffer_method___len",
    "buffer_new",
    "buffer_encode",
    "buffer_decode",
];

/// Library prefixes that become `lib.`.
const LIBS: [&str; 11] = [
    "coroutine",
    "thread",
    "math",
    "bit",
    "string",
    "table",
    "io",
    "os",
    "debug",
    "jit",
    "ffi",
];

/// `builtin` name of fast function `ffid` in `flavour`, or `None` if unknown.
pub fn name(flavour: &Flavour, ffid: u8) -> Option<String> {
    if !Flavour::KNOWN_VERSIONS.contains(&flavour.version.as_str()) {
        return None;
    }
    let raw = LUAJIT2_2_1.get(usize::from(ffid).checked_sub(2)?)?;
    if let Some(rest) = raw.strip_prefix("jit_util_") {
        return Some(format!("jit.util.{rest}"));
    }
    if let Some(rest) = raw.strip_prefix("buffer_") {
        return Some(format!("string.buffer.{rest}"));
    }
    for lib in LIBS {
        if let Some(rest) = raw.strip_prefix(lib).and_then(|r| r.strip_prefix('_')) {
            return Some(format!("{lib}.{rest}"));
        }
    }
    Some((*raw).to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flavour() -> Flavour {
        Flavour {
            gc64: true,
            openresty: true,
            version: "LuaJIT 2.1.0-beta3".into(),
        }
    }

    #[test]
    fn names_by_id() {
        let f = flavour();
        assert_eq!(name(&f, 0), None);
        assert_eq!(name(&f, 1), None);
        assert_eq!(name(&f, 2).as_deref(), Some("assert"));
        assert_eq!(name(&f, 6).as_deref(), Some("ipairs_aux"));
        let rep = LUAJIT2_2_1
            .iter()
            .position(|n| *n == "string_rep")
            .expect("string_rep")
            + 2;
        assert_eq!(name(&f, rep as u8).as_deref(), Some("string.rep"));
        let tr = LUAJIT2_2_1
            .iter()
            .position(|n| *n == "jit_util_traceinfo")
            .expect("x")
            + 2;
        assert_eq!(name(&f, tr as u8).as_deref(), Some("jit.util.traceinfo"));
        assert_eq!(name(&f, 255), None);
    }
}
