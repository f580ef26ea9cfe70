//! `check-kernel`: loads every program this kernel runs, in the variant it needs, as the
//! daemon and `record` load them, then reads the verifier's figures for each and holds them
//! against the budgets of [`super::verifier`]. What the kernel matrix runs in each guest,
//! and what a user runs first on a new node.
//!
//! Hooks: `bpf()` (loads, never attaches). Metrics: none.

use apisix_ebpf_common::{PROG_LEARN_VM, PROG_OFFCPU_SWITCH};
use aya::programs::{PerfEvent, RawTracePoint, TracePoint, UProbe};
use serde::Serialize;

use crate::error::error_chain;

use super::{bpf::BpfSession, kernel::KernelReport, verifier::ProgramStats};

/// One program's outcome.
#[derive(Debug, Serialize)]
pub struct ProgramCheck {
    /// Its name in the object.
    pub program: &'static str,
    /// Whether the kernel accepted it.
    pub loaded: bool,
    /// Whether the agent does without it when refused (the event-loop pair's fentry/fexit
    /// programs: a kernel in lockdown refuses them, and the pair falls back to tracepoints).
    pub optional: bool,
    /// Why not, in one sentence.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The verifier's figures, when it loaded.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub verifier: Option<ProgramStats>,
    /// The budgets it exceeds.
    pub over_budget: Vec<String>,
}

/// The whole check.
#[derive(Debug, Serialize)]
pub struct KernelCheck {
    /// `uname -r`.
    pub release: String,
    /// What the kernel offers (absent when the object did not load at all).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kernel: Option<KernelReport>,
    /// Why the object did not load, if it did not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Each program the kernel runs.
    pub programs: Vec<ProgramCheck>,
    /// Every program loaded within its budgets.
    pub ok: bool,
}

/// Runs the check.
pub fn check_kernel() -> KernelCheck {
    let release = super::kernel::release();
    let mut session = match BpfSession::prepare_alloc(1 << 20, true) {
        Ok(s) => s,
        // prepare_alloc also loads the allocator programs; if the kernel refuses one, load the
        // object alone: each program's refusal is then recorded below.
        Err(_) => match BpfSession::loaded_only() {
            Ok(s) => s,
            Err(e) => {
                return KernelCheck {
                    release,
                    kernel: None,
                    error: Some(error_chain(&e)),
                    programs: Vec::new(),
                    ok: false,
                };
            }
        },
    };
    let programs = session.kernel_programs();
    let mut checks = Vec::new();
    for name in programs {
        let loaded = load_one(&mut session, name);
        checks.push(ProgramCheck {
            program: name,
            loaded: loaded.is_ok(),
            optional: name.starts_with("loop_in_") || name.starts_with("loop_out_"),
            error: loaded.err(),
            verifier: None,
            over_budget: Vec::new(),
        });
    }
    for check in checks.iter_mut().filter(|c| c.loaded) {
        match session.verifier_stats(&[check.program]) {
            Ok(mut stats) => {
                let stats = stats.pop();
                check.over_budget = stats
                    .as_ref()
                    .map(ProgramStats::over_budget)
                    .unwrap_or_default();
                check.verifier = stats;
            }
            Err(e) => check.over_budget.push(format!(
                "{}: no verifier figures: {}",
                check.program,
                error_chain(&e)
            )),
        }
    }
    let ok = checks
        .iter()
        .all(|c| (c.loaded || c.optional) && c.over_budget.is_empty());
    KernelCheck {
        release,
        kernel: Some(session.kernel().clone()),
        error: None,
        programs: checks,
        ok,
    }
}

/// Loads program `name` of the session as its type (a program loaded already is fine).
fn load_one(session: &mut BpfSession, name: &'static str) -> Result<(), String> {
    let result = match name {
        PROG_LEARN_VM => Ok(()),
        PROG_OFFCPU_SWITCH => session.load_program::<RawTracePoint>(name),
        n if n.starts_with("loop_wait_") => session.load_program::<TracePoint>(name),
        n if n.starts_with("loop_in_") || n.starts_with("loop_out_") => {
            session.load_loop_function(name)
        }
        n if n.starts_with("offcpu_exit") || n.starts_with("loop_") => {
            session.load_program::<RawTracePoint>(name)
        }
        n if n.starts_with("sample") => session.load_program::<PerfEvent>(name),
        _ => session.load_program::<UProbe>(name),
    };
    result.map_err(|e| error_chain(&e))
}

impl KernelCheck {
    /// A table for a terminal.
    pub fn text(&self) -> String {
        let mut out = format!("kernel {}\n", self.release);
        if let Some(k) = &self.kernel {
            out += &format!(
                "lua walk: {:?} (up to {} frames); kernel BTF offsets: {}; kernel-mode samples: {}; task state: {}\n",
                k.lua_walk, k.max_lua_frames, k.btf, k.kernel_mode_samples, k.task_state
            );
        }
        if let Some(e) = &self.error {
            out += &format!("the BPF object did not load: {e}\n");
        }
        out += &format!(
            "{:<22} {:>7} {:>12} {:>9}  stack depths\n",
            "program", "loaded", "insns", "stack"
        );
        for c in &self.programs {
            let (insns, stack, depths) =
                c.verifier
                    .as_ref()
                    .map_or(("-".to_owned(), "-".to_owned(), String::new()), |v| {
                        (
                            v.insns_processed.to_string(),
                            v.combined_stack.to_string(),
                            format!("{:?}", v.stack_depths),
                        )
                    });
            out += &format!(
                "{:<22} {:>7} {:>12} {:>9}  {}\n",
                c.program,
                match (c.loaded, c.optional) {
                    (true, _) => "yes",
                    (false, true) => "no",
                    (false, false) => "NO",
                },
                insns,
                stack,
                depths
            );
            match (&c.error, c.optional) {
                (Some(e), true) => out += &format!("  refused (optional, falls back): {e}\n"),
                (Some(e), false) => out += &format!("  refused: {e}\n"),
                (None, _) => {}
            }
            for o in &c.over_budget {
                out += &format!("  over budget: {o}\n");
            }
        }
        out += if self.ok {
            "ok: every program loads within its budgets\n"
        } else {
            "FAILED\n"
        };
        out
    }
}
