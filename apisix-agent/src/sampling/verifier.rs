//! The verifier's own figures for each program, and budgets on them: how many instructions
//! it processed (against its limit of one million) and the stack depth of the program and of
//! each function it calls. aya discards the verifier's log when a load succeeds, so the
//! figures come from a second load of the same program: the object parsed again with aya-obj,
//! relocated against the maps the session already created, and handed to `BPF_PROG_LOAD`
//! with the statistics log level (4), whose last lines read `processed N insns (limit L) …`
//! and `stack depth A+B+C`. The program so loaded is closed at once.
//!
//! Also turns a verifier refusal into one sentence naming what is missing and which kernel
//! has it ([`explain`]).
//!
//! Hooks: `bpf(BPF_BTF_LOAD)`, `bpf(BPF_PROG_LOAD)`. Metrics: none.

use std::{
    collections::HashSet,
    ffi::CString,
    os::fd::{AsFd as _, AsRawFd as _, FromRawFd as _, OwnedFd, RawFd},
};

use aya::maps::{Map, MapData};
use aya_obj::{
    Object,
    generated::{bpf_attach_type, bpf_attr, bpf_cmd, bpf_prog_type},
};
use serde::Serialize;

/// The verifier's instruction limit for privileged programs (since 5.2).
pub const INSN_LIMIT: u64 = 1_000_000;
/// Budget: at most this share (in percent) of [`INSN_LIMIT`] processed.
pub const INSN_BUDGET_PERCENT: u64 = 50;
/// Budget: the combined stack of a program and the functions it calls, each frame rounded
/// up to [`STACK_ROUNDING`] as the strictest kernel (6.1) rounds it, is at most this (the
/// verifier's hard limit is 512).
pub const STACK_BUDGET: u64 = 448;
/// How 6.1 rounds each frame of a call chain.
pub const STACK_ROUNDING: u64 = 32;
/// `BPF_LOG_STATS`.
const LOG_STATS: u32 = 4;
/// Bytes of log kept (the statistics are a few lines).
const LOG_BYTES: usize = 64 << 10;

/// The verifier's figures for one program.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ProgramStats {
    /// The program's name in the object.
    pub program: String,
    /// Instructions the verifier processed.
    pub insns_processed: u64,
    /// The limit it reported.
    pub insn_limit: u64,
    /// Stack depth of the program and each function it calls, in bytes.
    pub stack_depths: Vec<u64>,
    /// Their sum, each rounded up to [`STACK_ROUNDING`].
    pub combined_stack: u64,
}

impl ProgramStats {
    /// The budgets this program exceeds, worded for a test failure or a report.
    pub fn over_budget(&self) -> Vec<String> {
        let mut over = Vec::new();
        let max_insns = INSN_LIMIT * INSN_BUDGET_PERCENT / 100;
        if self.insns_processed > max_insns {
            over.push(format!(
                "{}: {} instructions processed, budget {max_insns} ({INSN_BUDGET_PERCENT}% of {INSN_LIMIT})",
                self.program, self.insns_processed
            ));
        }
        if self.combined_stack > STACK_BUDGET {
            over.push(format!(
                "{}: combined stack {} bytes ({:?}), budget {STACK_BUDGET}",
                self.program, self.combined_stack, self.stack_depths
            ));
        }
        over
    }
}

/// Errors getting the figures.
#[derive(Debug, thiserror::Error)]
pub enum VerifierError {
    #[error("parsing the BPF object")]
    Parse(#[source] aya_obj::ParseError),
    #[error("relocating the BPF object")]
    Relocate(#[source] aya_obj::relocation::EbpfRelocationError),
    #[error("sanitizing the object's BTF")]
    Btf(#[source] aya_obj::btf::BtfError),
    #[error("loading the object's BTF")]
    BtfLoad(#[source] std::io::Error),
    #[error("the object has no program {0}")]
    NoProgram(String),
    #[error("{program} has a program type this check does not load")]
    Unsupported { program: String },
    #[error("the kernel refused {program}: {reason}")]
    Refused { program: String, reason: String },
    #[error("the verifier log of {program} has no statistics line")]
    NoStats { program: String },
}

/// The figures of `programs` (names in `object`), relocated against `maps` (name, map).
pub fn program_stats<'a>(
    object: &[u8],
    maps: impl Iterator<Item = (&'a str, RawFd)>,
    programs: &[&str],
) -> Result<Vec<ProgramStats>, VerifierError> {
    let mut obj = Object::parse(object).map_err(VerifierError::Parse)?;
    let btf_fd = match aya::features().btf() {
        Some(features) => match obj
            .fixup_and_sanitize_btf(features)
            .map_err(VerifierError::Btf)?
        {
            Some(btf) => Some(load_btf(&btf.to_bytes()).map_err(VerifierError::BtfLoad)?),
            None => None,
        },
        None => None,
    };
    let text: HashSet<usize> = obj.functions.keys().map(|(s, _)| *s).collect();
    // The object's own description of each map the session created, with the map's fd
    // (owned: relocation borrows the object mutably).
    let pairs: Vec<(String, RawFd, aya_obj::Map)> = maps
        .filter_map(|(n, fd)| obj.maps.get(n).map(|m| (n.to_owned(), fd, m.clone())))
        .collect();
    obj.relocate_maps(pairs.iter().map(|(n, fd, m)| (n.as_str(), *fd, m)), &text)
        .map_err(VerifierError::Relocate)?;
    obj.relocate_calls(&text).map_err(VerifierError::Relocate)?;
    obj.sanitize_functions(aya::features());
    programs
        .iter()
        .map(|name| load_for_stats(&obj, name, btf_fd.as_ref()))
        .collect()
}

/// The raw fd of an aya map, for relocation.
pub fn map_fd(map: &Map) -> Option<RawFd> {
    let data: &MapData = match map {
        Map::Array(d)
        | Map::HashMap(d)
        | Map::PerCpuArray(d)
        | Map::PerCpuHashMap(d)
        | Map::RingBuf(d)
        | Map::ProgramArray(d)
        | Map::LruHashMap(d)
        | Map::PerfEventArray(d)
        | Map::StackTraceMap(d) => d,
        _ => return None,
    };
    Some(data.fd().as_fd().as_raw_fd())
}

fn load_for_stats(
    obj: &Object,
    name: &str,
    btf_fd: Option<&OwnedFd>,
) -> Result<ProgramStats, VerifierError> {
    use aya_obj::ProgramSection as S;
    let prog = obj
        .programs
        .get(name)
        .ok_or_else(|| VerifierError::NoProgram(name.to_owned()))?;
    let mut attach = None;
    let prog_type = match prog.section {
        S::FEntry { .. } | S::FExit { .. } => {
            attach = Some(tracing_attach(
                name,
                matches!(prog.section, S::FExit { .. }),
            )?);
            bpf_prog_type::BPF_PROG_TYPE_TRACING
        }
        S::PerfEvent => bpf_prog_type::BPF_PROG_TYPE_PERF_EVENT,
        S::RawTracePoint => bpf_prog_type::BPF_PROG_TYPE_RAW_TRACEPOINT,
        S::TracePoint => bpf_prog_type::BPF_PROG_TYPE_TRACEPOINT,
        S::UProbe { .. } | S::URetProbe { .. } | S::KProbe | S::KRetProbe => {
            bpf_prog_type::BPF_PROG_TYPE_KPROBE
        }
        _ => {
            return Err(VerifierError::Unsupported {
                program: name.to_owned(),
            });
        }
    };
    let func = obj
        .functions
        .get(&prog.function_key())
        .ok_or_else(|| VerifierError::NoProgram(name.to_owned()))?;
    let mut log = vec![0u8; LOG_BYTES];
    let license = CString::new("GPL").expect("no NUL");
    let func_info = func.func_info.func_info_bytes();
    let line_info = func.line_info.line_info_bytes();
    // SAFETY: an all-zero bpf_attr is the documented starting point.
    let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
    // SAFETY: the prog-load member of the union, which this command reads.
    let u = unsafe { &mut attr.__bindgen_anon_3 };
    u.prog_type = prog_type as u32;
    if let Some((attach_type, btf_id)) = attach {
        u.expected_attach_type = attach_type as u32;
        u.attach_btf_id = btf_id;
    }
    u.insns = func.instructions.as_ptr() as u64;
    u.insn_cnt = func.instructions.len() as u32;
    u.license = license.as_ptr() as u64;
    u.log_level = LOG_STATS;
    u.log_buf = log.as_mut_ptr() as u64;
    u.log_size = log.len() as u32;
    if let Some(btf) = btf_fd {
        u.prog_btf_fd = btf.as_raw_fd() as u32;
        if func.func_info_rec_size > 0 {
            u.func_info = func_info.as_ptr() as u64;
            u.func_info_cnt = func.func_info.len() as u32;
            u.func_info_rec_size = func.func_info_rec_size as u32;
        }
        if func.line_info_rec_size > 0 {
            u.line_info = line_info.as_ptr() as u64;
            u.line_info_cnt = func.line_info.len() as u32;
            u.line_info_rec_size = func.line_info_rec_size as u32;
        }
    }
    let result = sys_bpf(bpf_cmd::BPF_PROG_LOAD, &mut attr);
    let text = log_text(&log);
    match result {
        Ok(fd) => drop(fd),
        Err(e) => {
            return Err(VerifierError::Refused {
                program: name.to_owned(),
                reason: explain(&format!("{e}\n{text}")),
            });
        }
    }
    parse_stats(name, &text).ok_or_else(|| VerifierError::NoStats {
        program: name.to_owned(),
    })
}

/// The attach type and kernel BTF id an fentry (`exit` false) or fexit program `name` of the
/// event-loop pair loads against ([`apisix_ebpf_common::LOOP_FUNCTIONS`]).
fn tracing_attach(name: &str, exit: bool) -> Result<(bpf_attach_type, u32), VerifierError> {
    let unsupported = || VerifierError::Unsupported {
        program: name.to_owned(),
    };
    let (_, _, function) = apisix_ebpf_common::LOOP_FUNCTIONS
        .iter()
        .find(|(enter, leave, _)| *enter == name || *leave == name)
        .ok_or_else(unsupported)?;
    let id = super::kernel::function_id(function).ok_or_else(|| VerifierError::Refused {
        program: name.to_owned(),
        reason: format!("the kernel's BTF has no function {function}"),
    })?;
    let kind = if exit {
        bpf_attach_type::BPF_TRACE_FEXIT
    } else {
        bpf_attach_type::BPF_TRACE_FENTRY
    };
    Ok((kind, id))
}

fn load_btf(raw: &[u8]) -> std::io::Result<OwnedFd> {
    // SAFETY: as above, for the BTF-load member.
    let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
    // SAFETY: the BTF-load member of the union, which this command reads.
    let u = unsafe { &mut attr.__bindgen_anon_7 };
    u.btf = raw.as_ptr() as u64;
    u.btf_size = raw.len() as u32;
    sys_bpf(bpf_cmd::BPF_BTF_LOAD, &mut attr)
}

/// `bpf(cmd, attr)` for commands that return a new file descriptor.
fn sys_bpf(cmd: bpf_cmd, attr: &mut bpf_attr) -> std::io::Result<OwnedFd> {
    // SAFETY: the attr outlives the call and is sized as the kernel expects.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd as libc::c_long,
            std::ptr::from_mut(attr),
            std::mem::size_of::<bpf_attr>(),
        )
    };
    if ret < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the command returned a new descriptor we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(ret as RawFd) })
}

fn log_text(log: &[u8]) -> String {
    let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
    String::from_utf8_lossy(&log[..end]).into_owned()
}

/// Reads `processed N insns (limit L)` and `stack depth A+B+C` from a verifier log.
pub fn parse_stats(program: &str, log: &str) -> Option<ProgramStats> {
    let mut insns = None;
    let mut limit = INSN_LIMIT;
    let mut depths = None;
    for line in log.lines() {
        if let Some(rest) = line.trim().strip_prefix("processed ") {
            let mut words = rest.split_whitespace();
            insns = words.next().and_then(|n| n.parse::<u64>().ok());
            if let Some(l) = rest
                .split("(limit ")
                .nth(1)
                .and_then(|r| r.split(')').next())
                .and_then(|n| n.trim().parse().ok())
            {
                limit = l;
            }
        } else if let Some(rest) = line.trim().strip_prefix("stack depth ") {
            let parsed: Option<Vec<u64>> = rest
                .split('+')
                .map(|d| d.trim().parse::<u64>().ok())
                .collect();
            depths = parsed;
        }
    }
    let depths = depths?;
    let combined = depths
        .iter()
        .map(|d| d.div_ceil(STACK_ROUNDING) * STACK_ROUNDING)
        .sum();
    Some(ProgramStats {
        program: program.to_owned(),
        insns_processed: insns?,
        insn_limit: limit,
        stack_depths: depths,
        combined_stack: combined,
    })
}

/// What a verifier refusal means, in one sentence: the feature missing and the kernel that
/// has it where the log names one, else the log's last meaningful line.
pub fn explain(log: &str) -> String {
    const KNOWN: [(&str, &str); 8] = [
        (
            "func_info doesn't match number of subprogs",
            "needs callback references (Linux 5.13)",
        ),
        ("unknown func bpf_loop", "needs bpf_loop (Linux 5.17)"),
        (
            "combined stack size",
            "needs more than the 512 bytes of stack this kernel gives a program and its calls",
        ),
        (
            "BPF program is too large",
            "is larger than this kernel's verifier accepts (1 million instructions processed)",
        ),
        ("unknown func", "calls a helper this kernel lacks"),
        ("invalid func", "calls a helper this kernel lacks"),
        ("back-edge", "needs bounded loops (Linux 5.3)"),
        (
            "Permission denied",
            "needs root, or CAP_BPF and CAP_PERFMON",
        ),
    ];
    let last = log
        .lines()
        .map(str::trim)
        .rfind(|l| {
            !l.is_empty()
                && !l.starts_with("processed ")
                && !l.starts_with("verification time")
                && !l.starts_with("stack depth")
        })
        .unwrap_or("no verifier log");
    for (needle, meaning) in KNOWN {
        if log.contains(needle) {
            return format!("it {meaning} (verifier: {last})");
        }
    }
    format!("verifier: {last}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statistics_lines_are_read() {
        let log = "func#0 @0\nverification time 1234 usec\nstack depth 184+232+88\n\
                   processed 81234 insns (limit 1000000) max_states_per_insn 4 total_states 900 peak_states 800 mark_read 40\n";
        let s = parse_stats("sample", log).unwrap();
        assert_eq!(s.insns_processed, 81234);
        assert_eq!(s.insn_limit, 1_000_000);
        assert_eq!(s.stack_depths, vec![184, 232, 88]);
        assert_eq!(s.combined_stack, 192 + 256 + 96);
        let over = s.over_budget();
        assert_eq!(over.len(), 1, "{over:?}");
        assert!(
            over[0].starts_with("sample: combined stack 544"),
            "{over:?}"
        );
    }

    #[test]
    fn a_log_without_statistics_gives_none() {
        assert!(parse_stats("x", "").is_none());
        assert!(parse_stats("x", "processed 10 insns (limit 1000000)").is_none());
        assert!(parse_stats("x", "stack depth 8+x\nprocessed 1 insns").is_none());
    }

    #[test]
    fn refusals_name_the_feature_and_the_kernel() {
        let e = explain("number of funcs in func_info doesn't match number of subprogs\n");
        assert!(e.contains("5.13"), "{e}");
        let e = explain("...\ncombined stack size of 3 calls is 544. Too large\nprocessed 5 insns");
        assert!(e.contains("512 bytes") && e.contains("544"), "{e}");
        assert_eq!(
            explain("R1 invalid mem access"),
            "verifier: R1 invalid mem access"
        );
    }
}
