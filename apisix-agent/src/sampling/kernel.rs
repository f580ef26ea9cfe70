//! What the running kernel offers the BPF programs, found by looking rather than by its
//! version number: the offsets of `task_struct.stack` and of the task state in the kernel's
//! own BTF (`/sys/kernel/btf/vmlinux`, read with a small bounded parser), which the programs
//! use instead of `bpf_task_pt_regs` (5.15) and `sched_switch`'s `prev_state` argument
//! (5.18); and, filled by [`crate::sampling::bpf`] when it loads the object, whether
//! `bpf_loop` (5.17) exists, which picks the Lua walk variant. [`KernelReport`] is what
//! `/targets`, `/healthz`, `record --summary` and `check-kernel` show of it.
//!
//! [`vmlinux`] is the same BTF as aya parses it, once, for the fentry/fexit programs.
//!
//! Hooks: reads `/sys/kernel/btf/vmlinux` and `uname`. Metrics: none (the daemon exports
//! the report as `apisix_profiler_bpf_programs`).

use std::{fs::File, io::Read as _, path::Path};

use apisix_ebpf_common::{BOUNDED_LUA_STEPS, KernelConfig, MAX_LUA_FRAMES};
use serde::Serialize;

/// Where the kernel's BTF is.
pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";
/// The largest vmlinux BTF read (a distribution kernel's is 5–8 MiB).
const MAX_BTF_BYTES: u64 = 64 << 20;
/// `THREAD_SIZE` on x86-64 (without KASAN, which production kernels do not enable).
const THREAD_SIZE: u32 = 16384;
/// `sizeof(struct pt_regs)` on x86-64.
const PT_REGS_SIZE: u32 = 168;

/// How the Lua stack is walked, by what the kernel offers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum WalkVariant {
    /// `bpf_loop` (5.17+): up to `MAX_LUA_FRAMES` frames.
    BpfLoop,
    /// A bounded loop calling a global function per step (5.6+): as deep.
    Bounded,
}

impl WalkVariant {
    /// Its name in reports (`bpf_loop`, `bounded`).
    pub const fn name(self) -> &'static str {
        match self {
            Self::BpfLoop => "bpf_loop",
            Self::Bounded => "bounded",
        }
    }

    /// The deepest Lua stack walked whole.
    pub const fn max_lua_frames(self) -> usize {
        match self {
            Self::BpfLoop => MAX_LUA_FRAMES,
            Self::Bounded => BOUNDED_LUA_STEPS / 2,
        }
    }
}

/// What the loaded programs can do on this kernel.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct KernelReport {
    /// `uname -r`.
    pub release: String,
    /// The Lua walk variant loaded.
    pub lua_walk: WalkVariant,
    /// The deepest Lua stack walked whole (deeper ones count `lua_too_deep`).
    pub max_lua_frames: usize,
    /// Whether the kernel's BTF was found and gave the offsets below.
    pub btf: bool,
    /// Samples that hit kernel mode can be unwound from the task's saved user registers.
    pub kernel_mode_samples: bool,
    /// Off-CPU tells a blocked thread from a preempted one by its state (else: a switch that
    /// is not a preemption counts as blocked).
    pub task_state: bool,
    /// Why the BTF offsets are missing, if they are.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub btf_error: Option<String>,
}

impl KernelReport {
    /// The report for `variant` with the offsets found in `config` (and the reason they
    /// were not, if any).
    pub fn new(variant: WalkVariant, config: &KernelConfig, btf_error: Option<String>) -> Self {
        Self {
            release: release(),
            lua_walk: variant,
            max_lua_frames: variant.max_lua_frames(),
            btf: btf_error.is_none(),
            kernel_mode_samples: config.task_stack != 0,
            task_state: config.task_state != 0,
            btf_error,
        }
    }
}

/// Errors reading the kernel's BTF.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("reading {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not BTF this agent reads: {what}")]
    Format { path: String, what: &'static str },
    #[error("{path} has no struct task_struct with a `stack` member")]
    NoTaskStack { path: String },
}

/// The kernel's BTF as aya reads it (fentry/fexit programs load against it), parsed once per
/// process; the error, worded, when there is none.
pub fn vmlinux() -> Result<&'static aya::Btf, &'static str> {
    static BTF: std::sync::OnceLock<Result<aya::Btf, String>> = std::sync::OnceLock::new();
    BTF.get_or_init(|| aya::Btf::from_sys_fs().map_err(|e| e.to_string()))
        .as_ref()
        .map_err(String::as_str)
}

/// The BTF id of the kernel function `name`, when the kernel's BTF has it
/// (`__x64_sys_epoll_pwait2` is 5.11+).
pub fn function_id(name: &str) -> Option<u32> {
    vmlinux()
        .ok()?
        .id_by_type_name_kind(name, aya_obj::btf::BtfKind::Func)
        .ok()
}

/// `uname -r`, or `unknown`.
pub fn release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "unknown".into())
}

/// The offsets the programs need, from the kernel's BTF.
pub fn kernel_config() -> Result<KernelConfig, KernelError> {
    kernel_config_from(Path::new(VMLINUX_BTF))
}

/// [`kernel_config`] from the BTF file at `path`.
pub fn kernel_config_from(path: &Path) -> Result<KernelConfig, KernelError> {
    let read_err = |source| KernelError::Read {
        path: path.display().to_string(),
        source,
    };
    let mut data = Vec::new();
    File::open(path)
        .map_err(read_err)?
        .take(MAX_BTF_BYTES)
        .read_to_end(&mut data)
        .map_err(read_err)?;
    let btf = Btf::parse(&data).map_err(|what| KernelError::Format {
        path: path.display().to_string(),
        what,
    })?;
    let members = btf
        .struct_members("task_struct")
        .ok_or_else(|| KernelError::NoTaskStack {
            path: path.display().to_string(),
        })?;
    let find = |name: &str| members.iter().find(|(n, _)| n == name).map(|(_, o)| *o);
    let task_stack = find("stack").ok_or_else(|| KernelError::NoTaskStack {
        path: path.display().to_string(),
    })?;
    let task_state = find("__state").or_else(|| find("state")).unwrap_or(0);
    Ok(KernelConfig {
        task_stack,
        task_state,
        regs_offset: THREAD_SIZE - PT_REGS_SIZE,
        reserved: 0,
    })
}

/// The parts of a BTF blob this module reads: its type records and strings.
struct Btf<'a> {
    types: &'a [u8],
    strings: &'a [u8],
}

/// BTF kinds whose records this parser must step over (`BTF_KIND_*`).
const KIND_INT: u32 = 1;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_DECL_TAG: u32 = 17;
const KIND_ENUM64: u32 = 19;
/// The highest kind known; a higher one cannot be stepped over.
const KIND_MAX: u32 = 19;

fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    let bytes = b.get(off..off.checked_add(4)?)?;
    Some(u32::from_le_bytes(bytes.try_into().ok()?))
}

impl<'a> Btf<'a> {
    fn parse(data: &'a [u8]) -> Result<Self, &'static str> {
        let magic = data.get(0..2).ok_or("too short")?;
        if magic != [0x9f, 0xeb] {
            return Err("bad magic (or not little-endian)");
        }
        let hdr_len = u32_at(data, 4).ok_or("short header")? as usize;
        let field = |i: usize| u32_at(data, 8 + 4 * i).map(|v| v as usize);
        let (type_off, type_len, str_off, str_len) = (
            field(0).ok_or("short header")?,
            field(1).ok_or("short header")?,
            field(2).ok_or("short header")?,
            field(3).ok_or("short header")?,
        );
        let section = |off: usize, len: usize| {
            let start = hdr_len.checked_add(off)?;
            data.get(start..start.checked_add(len)?)
        };
        Ok(Self {
            types: section(type_off, type_len).ok_or("type section out of bounds")?,
            strings: section(str_off, str_len).ok_or("string section out of bounds")?,
        })
    }

    fn string(&self, off: u32) -> Option<&'a str> {
        let rest = self.strings.get(off as usize..)?;
        let end = rest.iter().position(|&b| b == 0)?;
        std::str::from_utf8(&rest[..end]).ok()
    }

    /// The members (name, byte offset) of the first struct named `name`.
    fn struct_members(&self, name: &str) -> Option<Vec<(String, u32)>> {
        let mut off = 0usize;
        // Every record is at least 12 bytes: the walk ends within len / 12 steps.
        while off + 12 <= self.types.len() {
            let name_off = u32_at(self.types, off)?;
            let info = u32_at(self.types, off + 4)?;
            let kind = (info >> 24) & 0x1f;
            let vlen = (info & 0xffff) as usize;
            let body = off + 12;
            if kind == KIND_STRUCT && self.string(name_off) == Some(name) {
                let bitfields = info >> 31 != 0;
                let mut members = Vec::with_capacity(vlen);
                for i in 0..vlen {
                    let m = body + 12 * i;
                    let bits = u32_at(self.types, m + 8)?;
                    let bits = if bitfields { bits & 0xff_ffff } else { bits };
                    let member = self.string(u32_at(self.types, m)?).unwrap_or("");
                    members.push((member.to_owned(), bits / 8));
                }
                return Some(members);
            }
            off = body + trailing(kind, vlen)?;
        }
        None
    }
}

/// Bytes that follow a type record of `kind` with `vlen` entries.
fn trailing(kind: u32, vlen: usize) -> Option<usize> {
    Some(match kind {
        KIND_INT | KIND_VAR | KIND_DECL_TAG => 4,
        KIND_ARRAY => 12,
        KIND_STRUCT | KIND_UNION | KIND_DATASEC | KIND_ENUM64 => 12 * vlen,
        KIND_ENUM | KIND_FUNC_PROTO => 8 * vlen,
        k if k <= KIND_MAX => 0,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_kernels_btf_gives_the_task_offsets() {
        if !Path::new(VMLINUX_BTF).exists() {
            eprintln!("skipped: no {VMLINUX_BTF}");
            return;
        }
        let cfg = kernel_config().expect("vmlinux BTF parses");
        assert!(cfg.task_stack > 0 && cfg.task_stack < 8192, "{cfg:?}");
        assert!(cfg.task_state > 0 && cfg.task_state < 8192, "{cfg:?}");
        assert_eq!(cfg.regs_offset, 16384 - 168);
    }

    #[test]
    fn truncated_or_foreign_blobs_are_refused_not_read_past() {
        assert!(Btf::parse(&[]).is_err());
        assert!(Btf::parse(&[0x9f, 0xeb, 1, 0, 24, 0, 0, 0]).is_err());
        let mut hdr = vec![0x9f, 0xeb, 1, 0];
        for v in [24u32, 0, 1000, 0, 10] {
            hdr.extend_from_slice(&v.to_le_bytes());
        }
        assert!(Btf::parse(&hdr).is_err(), "sections past the end");
    }

    #[test]
    fn a_struct_member_offset_is_read_in_bytes() {
        // One STRUCT "t" with members "a" at bit 0 and "stack" at bit 256.
        let strings = b"\0t\0a\0stack\0";
        let mut types = Vec::new();
        for v in [1u32, (KIND_STRUCT << 24) | 2, 40, 3, 0, 0, 5, 0, 256] {
            types.extend_from_slice(&v.to_le_bytes());
        }
        let mut blob = vec![0x9f, 0xeb, 1, 0];
        let str_off = types.len() as u32;
        for v in [24u32, 0, types.len() as u32, str_off, strings.len() as u32] {
            blob.extend_from_slice(&v.to_le_bytes());
        }
        blob.extend_from_slice(&types);
        blob.extend_from_slice(strings);
        let btf = Btf::parse(&blob).unwrap();
        let members = btf.struct_members("t").unwrap();
        assert_eq!(members, vec![("a".into(), 0), ("stack".into(), 32)]);
        assert!(btf.struct_members("u").is_none());
    }
}
