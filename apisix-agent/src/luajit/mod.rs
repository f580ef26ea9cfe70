//! Everything the agent knows about LuaJIT: which builds exist and how their structures are
//! laid out (one table per layout, [`layout`]), how to recognise a build in a process
//! ([`detect`]), the bytecode facts used for naming ([`bytecode`]), the fast-function names
//! ([`ffnames`]), the frames a JIT trace inlined ([`trace`]), a VM's heap: its allocator and
//! size ([`heap`]), Lua values (tables, strings, functions, the registry) read from
//! outside ([`tables`]), and heap snapshots: who holds the memory ([`snapshot`]). The target
//! is read through [`crate::proc`]; turning walked frames into `NAME@FILE:LINE` labels is
//! the stack builder's (`crate::stacks::names`).
//!
//! Hooks: `/proc/PID/maps` and the mapped files (detection), `process_vm_readv` (traces,
//! heap fields, tables). Metrics: trace fallbacks by reason ([`trace::TraceFallback`]).

pub mod bytecode;
pub mod detect;
pub mod ffnames;
pub mod heap;
pub mod layout;
pub mod snapshot;
pub mod tables;
pub mod trace;
pub mod trace_decode;
pub mod trace_fixture;
#[cfg(test)]
mod trace_tests;

use std::{fmt, ops::Range};

pub use detect::detect;

use self::layout::Layout;

/// How Lua frames are labelled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NameStyle {
    /// `NAME@FILE:FIRSTLINE`: one frame per function.
    FirstLine,
    /// `NAME@FILE:CURRENTLINE`; `NAME@FILE:FIRSTLINE` when the current line is unknown
    /// (counted as `proto_line_unknown`; the frame's [`crate::label::FrameDetail`]
    /// line is 0 then).
    CurrentLine,
}

/// What the LuaJIT VM was doing at a sample (the port of stapxx's `lj-vm-states`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum VmState {
    /// Running bytecode in the interpreter.
    Interpreted,
    /// Running a trace's machine code.
    Compiled,
    /// In C code called from Lua: C functions, FFI callees, fast functions, VM helpers, also
    /// when called from a trace.
    C,
    /// In the garbage collector.
    Gc,
    /// Leaving a trace for the interpreter (restoring a snapshot).
    TraceExit,
    /// Recording, optimizing or assembling a trace.
    JitCompiler,
}

impl VmState {
    /// Every state, in a fixed order (index = position).
    pub const ALL: [VmState; 6] = [
        VmState::Interpreted,
        VmState::Compiled,
        VmState::C,
        VmState::Gc,
        VmState::TraceExit,
        VmState::JitCompiler,
    ];

    /// Stable snake_case name, used as a metric label and in reports.
    pub const fn name(self) -> &'static str {
        match self {
            VmState::Interpreted => "interpreted",
            VmState::Compiled => "compiled",
            VmState::C => "c",
            VmState::Gc => "gc",
            VmState::TraceExit => "trace_exit",
            VmState::JitCompiler => "jit_compiler",
        }
    }

    /// Position in [`VmState::ALL`].
    pub const fn index(self) -> usize {
        self as usize
    }

    /// The state of a sample the BPF walker classified as `state`; `in_jit_code` tells
    /// whether the sampled IP lies outside every mapped file (machine code of a trace).
    /// `None` for a thread running no Lua.
    pub fn of(state: apisix_ebpf_common::LuaState, in_jit_code: bool) -> Option<Self> {
        use apisix_ebpf_common::LuaState as S;
        match state {
            S::None => None,
            S::Interpreter => Some(Self::Interpreted),
            S::C => Some(Self::C),
            S::Gc => Some(Self::Gc),
            S::JitCompile => Some(Self::JitCompiler),
            S::TraceExit => Some(Self::TraceExit),
            S::Trace if in_jit_code => Some(Self::Compiled),
            S::Trace => Some(Self::C),
        }
    }
}

/// A LuaJIT build the agent knows how to walk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Flavour {
    /// 64-bit GC references (GC64) or 32-bit.
    pub gc64: bool,
    /// OpenResty's luajit2 branch (vs upstream LuaJIT).
    pub openresty: bool,
    /// Version string, e.g. `LuaJIT 2.1.0-beta3`.
    pub version: String,
}

impl fmt::Display for Flavour {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} ({}, {})",
            self.version,
            if self.openresty {
                "OpenResty luajit2"
            } else {
                "upstream"
            },
            if self.gc64 { "GC64" } else { "non-GC64" }
        )
    }
}

impl Flavour {
    /// Versions whose layouts are in [`layout`] and tested against real builds.
    pub const KNOWN_VERSIONS: &'static [&'static str] = &["LuaJIT 2.1.0-beta3"];

    /// Accepts a build only if its layout is known; the error says what was found.
    pub fn from_build(info: &detect::BuildInfo) -> Result<Self, String> {
        let Some(gc64) = info.gc64 else {
            return Err(format!(
                "{}: no FFI ABI string, cannot tell GC64 from non-GC64",
                info.version
            ));
        };
        if !Self::KNOWN_VERSIONS.contains(&info.version.as_str()) || !info.openresty {
            return Err(format!(
                "{} ({}, {}); known: {} from OpenResty's luajit2",
                info.version,
                if info.openresty {
                    "OpenResty luajit2"
                } else {
                    "upstream"
                },
                if gc64 { "GC64" } else { "non-GC64" },
                Self::KNOWN_VERSIONS.join(", ")
            ));
        }
        Ok(Self {
            gc64,
            openresty: info.openresty,
            version: info.version.clone(),
        })
    }

    /// Slot of this build's layout in the BPF layouts map (see [`LAYOUT_SLOTS`]).
    pub fn slot(&self) -> u32 {
        if self.gc64 { 0 } else { 1 }
    }

    /// The structure layout of this build.
    pub fn layout(&self) -> &'static Layout {
        if self.gc64 {
            &layout::GC64
        } else {
            &layout::GC32
        }
    }
}

/// Every layout by its slot in the BPF layouts map, installed when the sampler starts.
pub const LAYOUT_SLOTS: [(u32, &Layout); 2] = [(0, &layout::GC64), (1, &layout::GC32)];

impl LuaTarget {
    /// The BPF map entry of a process running this LuaJIT.
    pub fn bpf_target(&self) -> apisix_ebpf_common::Target {
        apisix_ebpf_common::Target {
            layout: self.flavour.slot(),
            flags: 0,
            vm_start: self.vm_range.start,
            vm_end: self.vm_range.end,
            stack_top: 0,
        }
    }
}

/// The LuaJIT runtime found in one process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LuaTarget {
    pub flavour: Flavour,
    /// File that contains LuaJIT (library or executable), as the process sees it.
    pub library: String,
    /// Interpreter code in the process's address space.
    pub vm_range: Range<u64>,
}
