//! Where to probe a Lua VM's allocator: from the `global_State` the BPF side learned, the
//! allocator pointer (`allocf`, validated with the rest of the VM's heap fields by
//! [`crate::luajit::heap`]) must lie in an executable file mapping of the process (LuaJIT's
//! own `lj_alloc_f` in its library, or whatever module holds an allocator installed with
//! `lua_setallocf`); its file offset there is the uprobe's attach point, on the very file
//! the process mapped (`/proc/PID/map_files/…`, which also reaches files of containers and
//! files replaced on disk since).
//!
//! The probe goes on the allocator's first instruction, or right after it when that is a
//! register-only `test` followed by a conditional or plain jump ([`probe_skip`]): `test`
//! only sets flags, so the arguments, the stack and the return address are exactly those of
//! the entry, and the kernel emulates a jump where it must single-step a `test` (measured
//! here: 15.5 µs per hit single-stepped against 1 µs emulated). LuaJIT's `lj_alloc_f` opens
//! with `test %rcx,%rcx; je …` in both builds tested.
//!
//! Hooks: `/proc/PID/maps`, `process_vm_readv`. Metrics: none (errors name their reason).

use std::path::PathBuf;

use crate::{
    luajit::{
        LuaTarget,
        heap::{self, HeapError},
    },
    proc::{
        memory::{Memory, TargetMemory as _},
        process::{self, ProcessError},
    },
};

/// The allocator of one process's Lua VM, ready to be probed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllocProbe {
    pub pid: u32,
    /// The VM's `global_State`.
    pub g: u64,
    /// The allocator's address in the process.
    pub allocf: u64,
    /// The file holding it, as the process sees it.
    pub module: String,
    /// A path to that very file the agent can open.
    pub file: PathBuf,
    /// The probe's offset in that file: the allocator's, plus [`probe_skip`].
    pub offset: u64,
    /// The VM's heap size when resolved (`gc.total`).
    pub heap_bytes: u64,
}

/// Why a process's allocator cannot be probed.
#[derive(Debug, thiserror::Error)]
pub enum AllocError {
    /// No LuaJIT build the agent knows is mapped.
    #[error(
        "pid {pid} runs no known LuaJIT build: allocation captures probe its Lua VM's allocator"
    )]
    NoLuaJit { pid: u32 },
    /// The VM's address was not learned in time.
    #[error(
        "pid {pid}: its Lua VM is not known after {waited_secs} s: the agent learns it when the \
         process enters Lua (lua_resume, on a request or a timer) or from a CPU sample in the \
         interpreter; send it traffic and try again"
    )]
    NoVm { pid: u32, waited_secs: u64 },
    /// The VM's heap fields do not check out.
    #[error("pid {pid}: the Lua VM's allocator cannot be read")]
    Heap {
        pid: u32,
        #[source]
        source: HeapError,
    },
    /// The allocator is not in an executable file mapping (anonymous or generated code).
    #[error(
        "pid {pid}: the Lua VM's allocator {allocf:#x} lies in no executable file mapping of the \
         process, so it cannot be probed"
    )]
    NotInFile { pid: u32, allocf: u64 },
    /// The process's mappings could not be read (it exited).
    #[error("pid {pid}: reading its mappings")]
    Maps {
        pid: u32,
        #[source]
        source: ProcessError,
    },
}

/// Resolves the allocator of the VM at `g` in process `pid` running `lua`.
pub fn resolve(pid: u32, lua: &LuaTarget, g: u64) -> Result<AllocProbe, AllocError> {
    let vm = heap::read(&Memory::new(pid), lua.flavour.layout(), g)
        .map_err(|source| AllocError::Heap { pid, source })?;
    let maps = process::read_maps(pid).map_err(|source| AllocError::Maps { pid, source })?;
    let mut code = [0u8; 16];
    let skip = match Memory::new(pid).read_into(vm.allocf, &mut code) {
        Ok(()) => probe_skip(&code),
        Err(_) => 0,
    };
    let m = maps
        .iter()
        .find(|m| m.range.contains(&vm.allocf))
        .ok_or(AllocError::NotInFile {
            pid,
            allocf: vm.allocf,
        })?;
    Ok(AllocProbe {
        pid,
        g,
        allocf: vm.allocf,
        module: m.path.clone(),
        file: PathBuf::from(format!(
            "/proc/{pid}/map_files/{:x}-{:x}",
            m.range.start, m.range.end
        )),
        offset: vm.allocf - m.range.start + m.offset + skip,
        heap_bytes: vm.total,
    })
}

/// Bytes to skip at the start of `code` (a function's first bytes) so that the probe lands
/// on an instruction the kernel emulates: the length of a leading register-only `test`
/// (`85 /r`, `mod` = 3, with or without a REX prefix) when a jump follows it (`jcc` rel8 or
/// rel32, `jmp` rel8 or rel32); 0 otherwise.
pub fn probe_skip(code: &[u8]) -> u64 {
    let rex = usize::from(code.first().is_some_and(|b| b & 0xf0 == 0x40));
    let (Some(&op), Some(&modrm)) = (code.get(rex), code.get(rex + 1)) else {
        return 0;
    };
    if op != 0x85 || modrm >> 6 != 3 {
        return 0;
    }
    let len = rex + 2;
    let jump = matches!(
        (code.get(len), code.get(len + 1)),
        (Some(0x70..=0x7f | 0xeb | 0xe9), _) | (Some(0x0f), Some(0x80..=0x8f))
    );
    if jump { len as u64 } else { 0 }
}

/// The heap size of the VM at `g` in process `pid`; the error's reason is for the caller
/// to count.
pub fn heap_bytes(pid: u32, lua: &LuaTarget, g: u64) -> Result<u64, heap::HeapError> {
    heap::read(&Memory::new(pid), lua.flavour.layout(), g).map(|h| h.total)
}

#[cfg(test)]
mod tests {
    use super::probe_skip;

    #[test]
    fn a_leading_register_test_before_a_jump_is_skipped() {
        // lj_alloc_f of Debian's GC64 build and of the non-GC64 one: test %rcx,%rcx; je.
        assert_eq!(probe_skip(&[0x48, 0x85, 0xc9, 0x74, 0x1b, 0x48]), 3);
        // test %eax,%eax; jne rel32.
        assert_eq!(probe_skip(&[0x85, 0xc0, 0x0f, 0x85, 0, 0, 0, 0]), 2);
        // test %rcx,%rcx; mov: the next one would be single-stepped too, nothing gained.
        assert_eq!(probe_skip(&[0x48, 0x85, 0xc9, 0x48, 0x89, 0xca]), 0);
        // test with a memory operand reads memory: stays.
        assert_eq!(probe_skip(&[0x48, 0x85, 0x07, 0x74, 0x1b]), 0);
        // push %rbp, endbr64, short input: the function's start.
        assert_eq!(probe_skip(&[0x55, 0x48, 0x89, 0xe5]), 0);
        assert_eq!(probe_skip(&[0xf3, 0x0f, 0x1e, 0xfa]), 0);
        assert_eq!(probe_skip(&[0x48]), 0);
    }
}
