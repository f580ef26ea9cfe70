//! The recorded form of trace decoding, for root-free tests: samples taken in JIT trace
//! code of a real nginx + ngx_lua worker, what [`super::trace::Tracer::frames`] and the
//! prototype reader made of them there, and the target memory they read
//! ([`crate::proc::recorded`]). Written by the ignored root test
//! `apisix-agent/tests/trace_fixtures.rs`, stored as JSON under `apisix-agent/tests/data/`
//! (format and how to re-record: `tests/data/README.md`), replayed by the unit tests of
//! `luajit/trace_tests.rs` and `stacks/names.rs`.
//!
//! Hooks: none. Metrics: none.

use apisix_ebpf_common::LuaFrame;
use serde::{Deserialize, Serialize};

use super::{
    layout::{GC32, GC64, Layout},
    trace::{TraceFallback, TraceFrames, TraceSample},
};
use crate::proc::recorded::MemoryFixture;

/// One Lua frame, as the BPF side reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Frame {
    pub func: u64,
    pub code: u64,
    pub pc: u64,
    pub chunkname: u64,
    pub firstline: u32,
    pub kind: u8,
    pub ffid: u8,
    pub link: u8,
}

impl From<&LuaFrame> for Frame {
    fn from(f: &LuaFrame) -> Self {
        Self {
            func: f.func,
            code: f.code,
            pc: f.pc,
            chunkname: f.chunkname,
            firstline: f.firstline,
            kind: f.kind,
            ffid: f.ffid,
            link: f.link,
        }
    }
}

impl From<&Frame> for LuaFrame {
    fn from(f: &Frame) -> Self {
        LuaFrame {
            func: f.func,
            code: f.code,
            pc: f.pc,
            chunkname: f.chunkname,
            firstline: f.firstline,
            kind: f.kind,
            ffid: f.ffid,
            link: f.link,
            reserved: 0,
        }
    }
}

/// What decoding gave on the live target.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    /// The trace's frames: its number, the base frame's PC, the inlined frames innermost
    /// first, and their labels (`NAME@FILE:CURRENTLINE`, as the namer gives them outside a
    /// plugin), the physical base frame's last.
    Frames {
        traceno: u16,
        base_pc: u64,
        frames: Vec<Frame>,
        labels: Vec<Option<String>>,
    },
    /// The fallback, by its metric name ([`TraceFallback::name`]).
    Fallback(String),
}

impl Outcome {
    /// The outcome of a decode (labels filled in by the caller).
    pub fn of(r: &Result<TraceFrames, TraceFallback>) -> Self {
        match r {
            Ok(t) => Outcome::Frames {
                traceno: t.traceno,
                base_pc: t.snap.base_pc,
                frames: t.snap.frames.iter().map(Frame::from).collect(),
                labels: Vec::new(),
            },
            Err(e) => Outcome::Fallback(e.name().to_owned()),
        }
    }
}

/// One sample in trace code: the [`TraceSample`] fields, the sampled IP (inside the
/// trace's machine code) and the live outcome.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sample {
    pub l: u64,
    pub vmstate: i32,
    pub at_sample: (u64, u64),
    pub ip: u64,
    /// The innermost physical frame walked from `G->jit_base`.
    pub base: Frame,
    pub outcome: Outcome,
}

impl Sample {
    /// The sample as [`super::trace::Tracer::frames`] takes it, with its base frame.
    pub fn trace_sample<'a>(&self, base: &'a LuaFrame) -> TraceSample<'a> {
        TraceSample {
            l: self.l,
            vmstate: self.vmstate,
            at_sample: self.at_sample,
            jit_ip: Some(self.ip),
            base: Some(base),
        }
    }
}

/// A whole fixture: one process, one layout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TraceFixture {
    /// `gc64` or `gc32`.
    pub layout: String,
    /// The process recorded (part of the decoded traces' identity).
    pub pid: u32,
    pub samples: Vec<Sample>,
    pub memory: MemoryFixture,
}

impl TraceFixture {
    /// The layout named by the fixture.
    pub fn layout(&self) -> Option<&'static Layout> {
        match self.layout.as_str() {
            "gc64" => Some(&GC64),
            "gc32" => Some(&GC32),
            _ => None,
        }
    }
}
