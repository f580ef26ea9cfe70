//! Finding LuaJIT in a process and telling which build it is, from the process's own mapped
//! files (a `libluajit-5.1.so*` or an executable with LuaJIT linked in, OpenResty style):
//!
//! * GC64 or not: `ffi.abi()`'s option list is compiled in as one string, which ends in
//!   `gc64` only in GC64 builds.
//! * OpenResty's luajit2 or upstream: luajit2 exports `lua_setexdata`.
//! * Version: the `LuaJIT 2.x…` string.
//! * The interpreter's machine code: the VM is one assembler blob with one large FDE in
//!   `.eh_frame` and a constant CFA rule (its C frame); no symbols needed.

use std::ops::Range;

use gimli::{BaseAddresses, CieOrFde, EhFrame, LittleEndian, UnwindSection as _};
use object::{Object as _, ObjectSection as _, ObjectSymbol as _};

use super::{Flavour, LuaTarget};
use crate::proc::{
    modules::{ElfFile, ProcessModules},
    process,
};

/// Why a LuaJIT build was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum DetectError {
    #[error(transparent)]
    Process(#[from] process::ProcessError),
    #[error(
        "unknown LuaJIT build in {path} ({details}); Lua frames are disabled, native stacks are still profiled"
    )]
    UnknownBuild { path: String, details: String },
}

/// Byte string of `ffi.abi()`'s options as compiled on x86-64 Linux, up to the endianness.
const ABI_PREFIX: &[u8] = b"\x06hardfp\x02le";

/// What one ELF file says about the LuaJIT inside it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildInfo {
    pub version: String,
    pub gc64: Option<bool>,
    pub openresty: bool,
    /// Defines the Lua C API (`lua_resume`): the file contains a Lua runtime.
    pub defines_api: bool,
    /// Interpreter code range as the file states it (SVMA).
    pub vm_svma: Option<Range<u64>>,
    /// CFA offset from the stack pointer inside the interpreter.
    pub vm_cfa_offset: Option<u64>,
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Reads the LuaJIT facts out of one ELF image; `None` if it holds no LuaJIT.
pub fn inspect(data: &[u8]) -> Option<BuildInfo> {
    let obj = object::File::parse(data).ok()?;
    let rodata = obj.section_by_name(".rodata")?.data().ok()?;
    let vpos = find(rodata, b"LuaJIT 2.")?;
    let version: String = rodata[vpos..]
        .iter()
        .take_while(|b| **b != 0 && b.is_ascii_graphic() || **b == b' ')
        .map(|b| char::from(*b))
        .collect();
    let gc64 = find(rodata, ABI_PREFIX).map(|p| {
        rodata
            .get(p + ABI_PREFIX.len()..p + ABI_PREFIX.len() + 5)
            .is_some_and(|s| s == b"\x04gc64")
    });
    let defines = |name: &str| {
        obj.dynamic_symbols()
            .chain(obj.symbols())
            .any(|s| s.is_definition() && s.name() == Ok(name))
    };
    let openresty = defines("lua_setexdata");
    let defines_api = defines("lua_resume");
    let (vm_svma, vm_cfa_offset) = match vm_fde(&obj) {
        Some((r, cfa)) => (Some(r), Some(cfa)),
        None => (None, None),
    };
    Some(BuildInfo {
        version,
        gc64,
        openresty,
        defines_api,
        vm_svma,
        vm_cfa_offset,
    })
}

/// The largest FDE of `.eh_frame` whose rule is constant over its whole range: LuaJIT's VM.
fn vm_fde(obj: &object::File<'_>) -> Option<(Range<u64>, u64)> {
    let section = obj.section_by_name(".eh_frame")?;
    let data = section.data().ok()?;
    let eh = EhFrame::new(data, LittleEndian);
    let mut bases = BaseAddresses::default().set_eh_frame(section.address());
    if let Some(text) = obj.section_by_name(".text") {
        bases = bases.set_text(text.address());
    }
    let mut best: Option<(Range<u64>, u64)> = None;
    let mut entries = eh.entries(&bases);
    let mut ctx = gimli::UnwindContext::new();
    // Bounded by the section: every entry consumes bytes.
    while let Ok(Some(entry)) = entries.next() {
        let CieOrFde::Fde(partial) = entry else {
            continue;
        };
        let Ok(fde) = partial.parse(|s, b, o| s.cie_from_offset(b, o)) else {
            continue;
        };
        let len = fde.len();
        if len < 8192 || best.as_ref().is_some_and(|(r, _)| r.end - r.start >= len) {
            continue;
        }
        let Ok(mut table) = fde.rows(&eh, &bases, &mut ctx) else {
            continue;
        };
        let mut rows = 0;
        let mut cfa = None;
        while let Ok(Some(row)) = table.next_row() {
            rows += 1;
            if let gimli::CfaRule::RegisterAndOffset { register, offset } = row.cfa() {
                // x86-64 DWARF register 7 is rsp.
                if register.0 == 7 && *offset > 0 {
                    cfa = Some(*offset as u64);
                }
            }
            if rows > 1 {
                break;
            }
        }
        if rows == 1
            && let Some(cfa) = cfa
        {
            let start = fde.initial_address();
            best = Some((start..start + len, cfa));
        }
    }
    best
}

/// Finds the LuaJIT runtime of process `pid`. `Ok(None)`: no LuaJIT mapped.
pub fn detect(pid: u32) -> Result<Option<LuaTarget>, DetectError> {
    let mut files = std::collections::HashMap::new();
    let modules = ProcessModules::load(pid, &mut files)?;
    let mut seen = std::collections::HashSet::new();
    for m in &modules.modules {
        let elf: &ElfFile = &m.elf;
        if !seen.insert(elf.path.clone()) {
            continue;
        }
        let Some(info) = inspect(&elf.data) else {
            continue;
        };
        if !info.defines_api && info.vm_svma.is_none() {
            // Mentions LuaJIT (e.g. the ngx_lua module) but does not contain it.
            continue;
        }
        let flavour = match Flavour::from_build(&info) {
            Ok(f) => f,
            Err(details) => {
                return Err(DetectError::UnknownBuild {
                    path: elf.path.clone(),
                    details,
                });
            }
        };
        if info.vm_cfa_offset != Some(flavour.layout().cframe_size) {
            return Err(DetectError::UnknownBuild {
                path: elf.path.clone(),
                details: format!(
                    "interpreter C frame of {:?} bytes, expected {}",
                    info.vm_cfa_offset,
                    flavour.layout().cframe_size
                ),
            });
        }
        let vm = info
            .vm_svma
            .clone()
            .ok_or_else(|| DetectError::UnknownBuild {
                path: elf.path.clone(),
                details: "interpreter code not found in .eh_frame".into(),
            })?;
        // The mapping that contains the interpreter gives the bias.
        let bias = modules
            .modules
            .iter()
            .filter(|mm| mm.elf.path == elf.path)
            .find(|mm| mm.range.contains(&vm.start.wrapping_add(mm.bias)))
            .map(|mm| mm.bias)
            .ok_or_else(|| DetectError::UnknownBuild {
                path: elf.path.clone(),
                details: "interpreter code is not mapped".into(),
            })?;
        return Ok(Some(LuaTarget {
            flavour,
            library: elf.path.clone(),
            vm_range: vm.start + bias..vm.end + bias,
        }));
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn non_elf_is_not_luajit() {
        assert_eq!(inspect(b"not an elf"), None);
    }

    #[test]
    fn plain_binary_has_no_luajit() {
        let data = std::fs::read("/bin/true").expect("read /bin/true");
        assert_eq!(inspect(&data), None);
    }
}
