//! Root-free tests of trace decoding against the memory of real runs: the fixtures
//! `tests/data/trace-gc64.json` and `trace-gc32.json` ([`super::trace_fixture`]) hold
//! samples taken in JIT trace code of a real nginx + ngx_lua worker, what the decoder made
//! of them there, and every byte it read. Replayed here, the decoder must give the same
//! frames; with those bytes corrupted the way a hostile or changing target could, it must
//! fall back by reason, never panic and never invent a frame.
//!
//! Hooks: none. Metrics: none.

use apisix_ebpf_common::LuaFrame;

use super::{
    layout::Layout,
    trace::{TraceFallback, TraceFrames, Tracer},
    trace_fixture::{Outcome, Sample, TraceFixture},
};
use crate::proc::{memory::TargetMemory, recorded::RecordedMemory};

const GC64: &str = include_str!("../../tests/data/trace-gc64.json");
const GC32: &str = include_str!("../../tests/data/trace-gc32.json");

struct Fix {
    f: TraceFixture,
    layout: &'static Layout,
    mem: RecordedMemory,
}

fn load(json: &str) -> Fix {
    let f: TraceFixture = serde_json::from_str(json).expect("fixture parses");
    let layout = f.layout().expect("known layout");
    let mem = RecordedMemory::from_fixture(&f.memory).expect("fixture memory");
    Fix { f, layout, mem }
}

fn both() -> [Fix; 2] {
    [load(GC64), load(GC32)]
}

/// Decodes `s` with `tracer` against `mem`, looking up the sampled IP.
fn decode(
    tracer: &mut Tracer,
    mem: &dyn TargetMemory,
    fix: &Fix,
    s: &Sample,
) -> Result<TraceFrames, TraceFallback> {
    let base = LuaFrame::from(&s.base);
    let ip = s.ip;
    tracer.frames(mem, fix.f.pid, fix.layout, &s.trace_sample(&base), |m| {
        m.contains(&ip).then_some(ip)
    })
}

/// The live outcome without its labels (those are the namer's, tested in `stacks::names`).
fn bare(o: &Outcome) -> Outcome {
    match o {
        Outcome::Frames {
            traceno,
            base_pc,
            frames,
            ..
        } => Outcome::Frames {
            traceno: *traceno,
            base_pc: *base_pc,
            frames: frames.clone(),
            labels: Vec::new(),
        },
        other => other.clone(),
    }
}

#[test]
fn fixtures_are_small_real_and_have_inlined_frames() {
    for fix in both() {
        let n = fix.f.samples.len();
        let inlined = fix
            .f
            .samples
            .iter()
            .filter(|s| matches!(&s.outcome, Outcome::Frames { frames, .. } if !frames.is_empty()))
            .count();
        assert!(n >= 16 && inlined >= 8, "{}: {inlined}/{n}", fix.f.layout);
        assert!(
            fix.mem.bytes() < 64 << 10,
            "{}: {} bytes",
            fix.f.layout,
            fix.mem.bytes()
        );
        // Several traces, and the decoder saw more than one snapshot's frames.
        let traces: std::collections::HashSet<i32> =
            fix.f.samples.iter().map(|s| s.vmstate).collect();
        assert!(traces.len() >= 2, "{}: traces {traces:?}", fix.f.layout);
    }
}

#[test]
fn replay_gives_the_live_frames_with_a_fresh_decoder() {
    for fix in both() {
        for (i, s) in fix.f.samples.iter().enumerate() {
            let got = decode(&mut Tracer::new(), &fix.mem, &fix, s);
            assert_eq!(
                Outcome::of(&got),
                bare(&s.outcome),
                "{} sample {i}",
                fix.f.layout
            );
        }
    }
}

#[test]
fn a_shared_decoder_decodes_each_trace_once_and_agrees() {
    for fix in both() {
        let mut tracer = Tracer::new();
        let mut traces = std::collections::HashSet::new();
        for s in &fix.f.samples {
            let got = decode(&mut tracer, &fix.mem, &fix, s);
            assert_eq!(Outcome::of(&got), bare(&s.outcome));
            if let Ok(t) = got {
                traces.insert(t.traceno);
            }
        }
        assert!(
            tracer.decoded as usize <= traces.len() + 2,
            "{}",
            tracer.decoded
        );
        assert!(tracer.cached_bytes() > 0);
        tracer.forget(fix.f.pid);
        assert_eq!(tracer.cached_bytes(), 0);
    }
}

#[test]
fn a_tiny_cache_still_gives_the_same_frames() {
    for fix in both() {
        let mut tracer = Tracer::new();
        tracer.set_max_bytes(1);
        for s in &fix.f.samples {
            let got = decode(&mut tracer, &fix.mem, &fix, s);
            assert_eq!(Outcome::of(&got), bare(&s.outcome));
            assert!(tracer.cached_bytes() < 64 << 10);
        }
    }
}

#[test]
fn inlined_frames_are_real_prototypes_of_the_fixture() {
    for fix in both() {
        for s in &fix.f.samples {
            if let Outcome::Frames { frames, .. } = &s.outcome {
                for f in frames {
                    // Every frame's prototype was read from the target: its header is in the
                    // recorded memory, with the frame's first line.
                    let head = fix
                        .mem
                        .read(f.code, fix.layout.bpf.pt_size as usize)
                        .expect("prototype recorded");
                    let off = fix.layout.bpf.pt_firstline as usize;
                    let line = u32::from_le_bytes(head[off..off + 4].try_into().expect("4"));
                    assert_eq!(line, f.firstline);
                    assert!(f.pc > f.code, "pc inside the prototype's bytecode");
                }
            }
        }
    }
}

#[test]
fn unreadable_memory_is_read_failed() {
    for fix in both() {
        let empty = RecordedMemory::default();
        for s in &fix.f.samples {
            let got = decode(&mut Tracer::new(), &empty, &fix, s);
            assert_eq!(got, Err(TraceFallback::ReadFailed));
        }
    }
}

/// The first sample that decoded to inlined frames and names its trace's address.
fn framed(fix: &Fix) -> &Sample {
    fix.f
        .samples
        .iter()
        .find(|s| {
            s.at_sample.0 != 0
                && matches!(&s.outcome, Outcome::Frames { frames, .. } if !frames.is_empty())
        })
        .expect("a sample with frames")
}

#[test]
fn a_trace_that_changed_since_the_sample_is_gone() {
    for fix in both() {
        let s = framed(&fix);
        let t = &fix.layout.trace;
        // Another trace number in the header: the slot was reused.
        let mut mem = fix.mem.clone();
        let no = mem
            .bytes_mut(s.at_sample.0 + u64::from(t.t_traceno), 2)
            .expect("header recorded");
        no[0] ^= 0x40;
        assert_eq!(
            decode(&mut Tracer::new(), &mem, &fix, s),
            Err(TraceFallback::Gone)
        );
        // Not a trace object any more.
        let mut mem = fix.mem.clone();
        let gct = mem
            .bytes_mut(s.at_sample.0 + u64::from(fix.layout.bpf.fn_gct), 1)
            .expect("header recorded");
        gct[0] ^= 0xff;
        assert_eq!(
            decode(&mut Tracer::new(), &mem, &fix, s),
            Err(TraceFallback::Gone)
        );
        // The BPF side saw other machine code: the trace was replaced.
        let mut moved = s.clone();
        moved.at_sample.1 ^= 0x1000;
        assert_eq!(
            decode(&mut Tracer::new(), &fix.mem, &fix, &moved),
            Err(TraceFallback::Gone)
        );
        // A trace number that does not fit.
        for vmstate in [-1, 70_000] {
            let mut bad = s.clone();
            bad.vmstate = vmstate;
            assert_eq!(
                decode(&mut Tracer::new(), &fix.mem, &fix, &bad),
                Err(TraceFallback::Gone)
            );
        }
    }
}

#[test]
fn an_impossible_header_is_invalid() {
    for fix in both() {
        let s = framed(&fix);
        let t = &fix.layout.trace;
        for (field, width) in [(t.t_nins, 4), (t.t_nk, 4), (t.t_snap, 8), (t.t_mcode, 8)] {
            let mut mem = fix.mem.clone();
            let b = mem
                .bytes_mut(s.at_sample.0 + u64::from(field), width)
                .expect("header recorded");
            b[width - 1] ^= 0x80;
            let got = decode(&mut Tracer::new(), &mem, &fix, s);
            assert!(
                matches!(got, Err(TraceFallback::Invalid | TraceFallback::Gone)),
                "{} field at {field}: {got:?}",
                fix.f.layout
            );
        }
    }
}

#[test]
fn an_address_outside_the_trace_is_refused() {
    for fix in both() {
        let s = framed(&fix);
        let base = LuaFrame::from(&s.base);
        let mut sample = s.trace_sample(&base);
        sample.jit_ip = None;
        let got = Tracer::new().frames(&fix.mem, fix.f.pid, fix.layout, &sample, |_| None);
        assert_eq!(got, Err(TraceFallback::AddrOutside));
    }
}

#[test]
fn another_base_frame_is_a_mismatch() {
    for fix in both() {
        let s = framed(&fix);
        if !matches!(&s.outcome, Outcome::Frames { base_pc, .. } if *base_pc != 0) {
            continue;
        }
        let mut other = s.clone();
        other.base.chunkname ^= 0x10;
        assert_eq!(
            decode(&mut Tracer::new(), &fix.mem, &fix, &other),
            Err(TraceFallback::BaseMismatch)
        );
        let mut not_lua = s.clone();
        not_lua.base.kind = apisix_ebpf_common::LuaFrameKind::C as u8;
        assert_eq!(
            decode(&mut Tracer::new(), &fix.mem, &fix, &not_lua),
            Err(TraceFallback::BaseMismatch)
        );
    }
}

/// A small xorshift, so the corruption is the same at every run.
fn next(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

#[test]
fn corrupted_memory_never_panics_nor_invents_frames() {
    for fix in both() {
        let ranges: Vec<(u64, usize)> = fix
            .f
            .memory
            .regions
            .iter()
            .map(|r| {
                (
                    u64::from_str_radix(r.addr.trim_start_matches("0x"), 16).expect("hex"),
                    r.bytes.len() / 2,
                )
            })
            .collect();
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for round in 0..300 {
            let mut mem = fix.mem.clone();
            for _ in 0..1 + round % 4 {
                let (start, len) = ranges[next(&mut x) as usize % ranges.len()];
                let at = start + next(&mut x) % len as u64;
                if let Some(b) = mem.bytes_mut(at, 1) {
                    b[0] ^= 1 << (next(&mut x) % 8);
                }
            }
            for s in &fix.f.samples {
                if let Ok(t) = decode(&mut Tracer::new(), &mem, &fix, s) {
                    // Whatever decodes names prototypes that are really in memory, at PCs
                    // inside their bytecode.
                    for f in &t.snap.frames {
                        assert!(mem.read(f.code, fix.layout.bpf.pt_size as usize).is_ok());
                        assert!(f.pc > f.code);
                    }
                }
            }
        }
    }
}
