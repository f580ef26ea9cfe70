//! Re-records the trace fixtures `tests/data/trace-gc64.json` and `tests/data/trace-gc32.json`
//! (format: `tests/data/README.md`): a real nginx + ngx_lua worker with the JIT on, on each
//! LuaJIT layout, runs functions that LuaJIT inlines into traces (three levels deep, a branch
//! that spawns side traces, a stitch to a C function); the real BPF sampler samples it, and
//! for each sample whose IP lies in trace code the agent's trace decoder and prototype
//! reader run against the live memory through a recorder. The samples, their outcomes and
//! every byte range read are written out. Only samples whose replay against the recorded
//! bytes gives the live outcome are kept (a trace freed between two samples reads
//! differently later).
//!
//! Root only, and ignored. The suite (`--include-ignored`) records to a scratch file;
//! `sudo APISIX_AGENT_RERECORD=1 cargo test --release --test trace_fixtures -- --ignored`
//! writes over the checked-in fixtures.

mod common;

use std::{
    collections::HashSet,
    sync::Arc,
    time::{Duration, Instant},
};

use apisix_agent::{
    luajit::{
        self,
        trace::Tracer,
        trace_fixture::{Frame, Outcome, Sample, TraceFixture},
    },
    proc::{
        memory::{Memory, TargetMemory},
        process::read_maps,
        recorded::{RecordedMemory, Recording},
    },
    sampling::bpf::BpfSession,
    stacks::names::plain_labels,
};
use apisix_ebpf_common::{LuaFrame, LuaState};
use common::{Lj, Load, Nginx};

/// Set to write the recordings over `tests/data/trace-*.json`.
const RERECORD: &str = "APISIX_AGENT_RERECORD";

/// Samples kept per fixture.
const MAX_SAMPLES: usize = 48;
/// Bytes of target memory kept per fixture.
const MAX_MEMORY: usize = 96 << 10;

const MODULE: &str = r#"local _M = {}
local bit = require "bit"
local band, bxor = bit.band, bit.bxor
local T = {}
for i = 1, 256 do T[i] = (i * 40503) % 65521 end
local ctx = { 0, 0, 0, 0 }
local function pe(h, i)
    h = band(bxor(h, T[band(h + i, 255) + 1]) * 33 + 1, 0xfffff)
    ctx[1] = h
    h = band(bxor(h, T[band(h + i + 1, 255) + 1]) * 33 + 2, 0xfffff)
    ctx[2] = h
    return h
end
local function pd(h, i)
    h = band(bxor(h, T[band(h + i + 2, 255) + 1]) * 33 + 3, 0xfffff)
    ctx[3] = h
    return pe(h, i)
end
local function pc(h, i)
    h = band(bxor(h, T[band(h + i + 3, 255) + 1]) * 33 + 4, 0xfffff)
    ctx[4] = h
    return pd(h, i)
end
local function pbr(h, i)
    if i % 3 == 0 then
        h = band(bxor(h, T[band(h + 7, 255) + 1]) * 33, 0xfffff)
        ctx[1] = h
    else
        h = band(bxor(h, T[band(h + 9, 255) + 1]) * 31, 0xfffff)
        ctx[2] = h
    end
    return h
end
local function pst(h, i)
    h = band(bxor(h, T[band(h + i, 255) + 1]) * 33, 0xfffff)
    ctx[3] = h
    return band(h + os.time(), 0xfffff)
end
function _M.run(n)
    local h = 0
    for i = 1, n do
        h = pc(h, i)
        h = pbr(h, i)
    end
    return h
end
function _M.stitch(n)
    local h = 0
    for i = 1, n do h = pst(h, i) end
    return h
end
return _M
"#;

const SERVER: &str = r#"
    location /run { content_by_lua_block { ngx.say(require("fix").run(tonumber(ngx.var.arg_n))) } }
    location /stitch { content_by_lua_block { ngx.say(require("fix").stitch(tonumber(ngx.var.arg_n))) } }
"#;

/// Decodes one sample against `mem`, with a fresh decoder (nothing cached).
fn decode(
    mem: &Arc<dyn TargetMemory + Send + Sync>,
    pid: u32,
    layout: &'static luajit::layout::Layout,
    s: &Sample,
) -> Outcome {
    let base = LuaFrame::from(&s.base);
    let ip = s.ip;
    let r = Tracer::new().frames(&**mem, pid, layout, &s.trace_sample(&base), |m| {
        m.contains(&ip).then_some(ip)
    });
    let mut out = Outcome::of(&r);
    if let (Ok(t), Outcome::Frames { labels, .. }) = (&r, &mut out) {
        let mut frames = t.snap.frames.clone();
        let mut base = base;
        if t.snap.base_pc != 0 {
            base.pc = t.snap.base_pc;
        }
        frames.push(base);
        *labels = plain_labels(mem, layout, &frames);
    }
    out
}

fn record_fixture(lj: Lj, name: &str) {
    common::require_root!();
    let nginx = Nginx::start(
        lj,
        &[("fix", MODULE)],
        "init_by_lua_block { require('jit').on() }",
        SERVER,
    );
    let pid = nginx.worker().expect("worker");
    let lua = luajit::detect(pid)
        .expect("detect")
        .expect("LuaJIT in the worker");
    let layout = lua.flavour.layout();
    let _run = Load::start(nginx.port, "/run?n=200000", 1, Duration::from_secs(30));
    let _stitch = Load::start(nginx.port, "/stitch?n=100000", 1, Duration::from_secs(30));
    let files: Vec<_> = read_maps(pid)
        .expect("maps")
        .into_iter()
        .map(|m| m.range)
        .collect();
    let mut session = BpfSession::start(997).expect("BPF session");
    session
        .add_process(pid, Some(&lua))
        .expect("add the worker");

    let live: Arc<Recording<Memory>> = Arc::new(Recording::new(Memory::new(pid), MAX_MEMORY));
    let live_dyn: Arc<dyn TargetMemory + Send + Sync> = live.clone();
    let mut samples = Vec::new();
    let mut seen = HashSet::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while samples.len() < MAX_SAMPLES && Instant::now() < deadline {
        let mut batch = Vec::new();
        session.poll(Duration::from_millis(200), |s| {
            let ip = s.regs.ip;
            if s.pid == pid
                && LuaState::from_raw(s.lua_state) == LuaState::Trace
                && s.vmstate > 0
                && s.lua_len > 0
                && !files.iter().any(|r| r.contains(&ip))
                && seen.insert((s.vmstate, ip))
            {
                batch.push(Sample {
                    l: s.lua_l,
                    vmstate: s.vmstate,
                    at_sample: (s.trace, s.trace_mcode),
                    ip,
                    base: Frame::from(&s.lua[0]),
                    outcome: Outcome::Fallback(String::new()),
                });
            }
        });
        for mut s in batch.into_iter().take(MAX_SAMPLES - samples.len()) {
            s.outcome = decode(&live_dyn, pid, layout, &s);
            samples.push(s);
        }
    }
    let recorded: Arc<dyn TargetMemory + Send + Sync> = Arc::new(live.recorded());
    let total = samples.len();
    samples.retain(|s| decode(&recorded, pid, layout, s) == s.outcome);
    let with_frames = samples
        .iter()
        .filter(|s| matches!(&s.outcome, Outcome::Frames { frames, .. } if !frames.is_empty()))
        .count();
    assert!(
        with_frames >= 8,
        "{name}: {with_frames} of {} replayable samples ({total} taken) have inlined frames",
        samples.len()
    );
    // Only what the kept samples read.
    let keep = Arc::new(Recording::new(live.recorded(), MAX_MEMORY));
    let keep_dyn: Arc<dyn TargetMemory + Send + Sync> = keep.clone();
    for s in &samples {
        assert_eq!(decode(&keep_dyn, pid, layout, s), s.outcome);
    }
    let memory: RecordedMemory = keep.recorded();
    let fixture = TraceFixture {
        layout: name.into(),
        pid,
        samples,
        memory: memory.to_fixture(),
    };
    // The checked-in fixtures change only when asked: a run of the whole suite records to a
    // scratch file (the recording and its replay are checked all the same).
    let path = if std::env::var_os(RERECORD).is_some() {
        format!(
            "{}/tests/data/trace-{name}.json",
            env!("CARGO_MANIFEST_DIR")
        )
    } else {
        std::env::temp_dir()
            .join(format!(
                "apisix-agent-trace-{name}-{}.json",
                std::process::id()
            ))
            .display()
            .to_string()
    };
    let json = serde_json::to_string_pretty(&fixture).expect("json");
    std::fs::write(&path, json.as_bytes()).expect("write the fixture");
    eprintln!(
        "{path}: {} samples ({with_frames} with inlined frames), {} bytes of memory, {} bytes",
        fixture.samples.len(),
        memory.bytes(),
        json.len()
    );
    if std::env::var_os(RERECORD).is_none() {
        let _ = std::fs::remove_file(&path);
    }
}

#[test]
#[ignore = "needs root; records the GC64 trace fixture"]
fn record_gc64() {
    record_fixture(Lj::Gc64, "gc64");
}

#[test]
#[ignore = "needs root; records the GC32 trace fixture"]
fn record_gc32() {
    record_fixture(Lj::Gc32, "gc32");
}
