//! Root-free tests of every capture mode, through the same path `record` and
//! `/flamegraph?seconds=N` take: a [`Request`] validated from its arguments, the capture loop
//! ([`capture::capture_with`]) over a [`ReplaySource`] instead of the BPF programs, and the one
//! renderer ([`render::capture`]) in every format. The target is this test process, so
//! stacks are built for real; only the samples (and, for live captures, the tracked blocks)
//! are constructed. Without privilege the agent cannot open the target's mapped files
//! (`/proc/PID/map_files` needs `CAP_CHECKPOINT_RESTORE`): frames are then `[unknown]`, and
//! these tests check the weights, not the names; [`samples_are_symbolized_as_root`] checks
//! the names (root only). The
//! same modes over real BPF samples are the root tests (`tests/native.rs`, `tests/offcpu.rs`,
//! `tests/memory.rs`).

use std::{io::Read as _, sync::atomic::AtomicBool, time::Duration};

use apisix_agent::{
    attribution::Rules,
    sampling::{
        capture::{self, Capture, CaptureTarget},
        render,
        request::{Defaults, Format, Mode, Origin, Request, RequestArgs},
        source::{ReplaySource, blank_sample},
    },
};
use apisix_ebpf_common::{Counter, Sample};

/// A function of this binary the constructed samples are "in".
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn capture_replay_leaf(n: u64) -> u64 {
    // A body of its own: a one-instruction function may share its address with another.
    let mut x = std::hint::black_box(n);
    for i in 0..n {
        x = x
            .wrapping_mul(0x5851_f42d_4c95_7f2d)
            .wrapping_add(i ^ 0x5eed);
    }
    std::hint::black_box(x)
}

const LEAF: &str = "capture_replay_leaf";

fn me() -> u32 {
    std::process::id()
}

/// A sample of this process in [`capture_replay_leaf`], of weight `weight`, at `time_ns`.
fn sample(weight: u64, time_ns: u64) -> Box<Sample> {
    // Inside the function, past its first instruction.
    let ip = capture_replay_leaf as *const () as usize as u64 + 4;
    let mut s = blank_sample(me(), ip);
    s.weight = weight;
    s.time_ns = time_ns;
    s
}

/// The request `record --pid SELF --mode MODE` would make (1 s).
fn request(mode: Mode, format: Format) -> Request {
    let args = RequestArgs {
        pid: Some(me()),
        seconds: Some(1),
        mode: Some(mode),
        format: Some(format),
        ..RequestArgs::default()
    };
    Request::new(&args, Defaults::RECORD, Origin::Cli).unwrap_or_else(|e| panic!("{e}"))
}

/// Runs `req`'s capture of this process over `source` (for 300 ms: the samples are queued).
fn run(req: &Request, source: ReplaySource) -> Capture {
    let mode = req.capture_mode().expect("a capture");
    let stop = AtomicBool::new(false);
    capture::capture_with(
        source,
        &[CaptureTarget {
            pid: me(),
            lua: None,
            vm: None,
        }],
        Duration::from_millis(300),
        mode,
        req.stack_options(),
        &stop,
        |_| {},
    )
    .unwrap_or_else(|e| panic!("capture: {e}"))
}

/// The weight of the stacks: every constructed sample has the same one-frame stack.
fn leaf_weight(cap: &Capture) -> u64 {
    assert!(cap.folded.lines().len() <= 1, "{:?}", cap.folded.lines());
    cap.folded.total()
}

#[test]
#[ignore = "needs root"]
fn samples_are_symbolized_as_root() {
    apisix_agent_test_root();
    let source = ReplaySource::new();
    source.push(sample(1, 1));
    let cap = run(&request(Mode::Cpu, Format::Svg), source);
    let named: u64 = cap
        .folded
        .iter()
        .filter(|(stack, _)| stack.last().is_some_and(|f| f.contains(LEAF)))
        .map(|(_, n)| n)
        .sum();
    assert_eq!(named, 1, "{:?}", cap.folded.lines());
}

/// Panics unless root: an ignored test asked for without privilege fails loudly.
fn apisix_agent_test_root() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(unsafe { libc::geteuid() }, 0, "this test needs root");
}

#[test]
fn cpu_capture_folds_and_counts_its_samples() {
    let source = ReplaySource::new();
    for i in 0..40 {
        source.push(sample(1, i));
    }
    let cap = run(&request(Mode::Cpu, Format::Svg), source.clone());
    assert_eq!(leaf_weight(&cap), 40, "{:?}", cap.folded.lines());
    assert_eq!(cap.counters[Counter::Samples as usize], 40);
    // (Allocator probes are detached after every capture: none here.)
    assert_eq!(source.calls(), ["attach_cpu", "detach_alloc"]);
    assert_eq!(cap.kernel.release, "replay");
    assert!(cap.alloc.is_none());
}

#[test]
fn offcpu_capture_weighs_blocked_microseconds() {
    let source = ReplaySource::new();
    for i in 0..5 {
        source.push(sample(2500, i));
    }
    let req = request(Mode::OffCpu, Format::Collapsed);
    let cap = run(&req, source.clone());
    assert_eq!(leaf_weight(&cap), 5 * 2500);
    assert_eq!(source.calls(), ["set_offcpu_min 100", "detach_alloc"]);
    assert_eq!(req.mode.unit(), "us");
}

#[test]
fn alloc_capture_probes_weighs_and_detaches() {
    let source = ReplaySource::new();
    source.set_vm(me(), 0x4000);
    for i in 0..3 {
        source.push(sample(512 * 1024, i));
    }
    let cap = run(&request(Mode::Alloc, Format::Svg), source.clone());
    assert_eq!(leaf_weight(&cap), 3 * 512 * 1024);
    let alloc = cap.alloc.as_ref().expect("alloc outcome");
    assert_eq!(alloc.probes.len(), 1);
    assert_eq!(alloc.probes[0].g, 0x4000);
    assert_eq!(
        source.calls(),
        [
            format!("attach_alloc {}", me()),
            "release_alloc".to_owned(),
            "hold_alloc".to_owned(),
            "detach_alloc".to_owned(),
        ]
    );
}

#[test]
fn alloc_capture_without_a_vm_fails_with_the_reason() {
    let source = ReplaySource::new();
    let mode = request(Mode::Alloc, Format::Svg)
        .capture_mode()
        .expect("a capture");
    let stop = AtomicBool::new(false);
    let e = capture::capture_with(
        source,
        &[CaptureTarget {
            pid: me(),
            lua: None,
            vm: None,
        }],
        Duration::from_millis(100),
        mode,
        request(Mode::Alloc, Format::Svg).stack_options(),
        &stop,
        |_| {},
    )
    .expect_err("no VM: no allocator to probe");
    assert!(matches!(e, capture::CaptureError::Alloc { .. }), "{e}");
    assert!(e.to_string().contains(&me().to_string()), "{e}");
}

#[test]
fn live_capture_keeps_only_blocks_still_allocated() {
    let source = ReplaySource::new();
    source.set_vm(me(), 0x4000);
    let samples: Vec<Box<Sample>> = (0..4).map(|i| sample(1000, 100 + i)).collect();
    for s in &samples {
        source.push(s.clone());
    }
    // Blocks of samples 0 and 2 are still allocated, 1 was freed, 3 never tracked; one
    // block's sample was never seen (unnamed).
    source.set_live(0xa000, &samples[0], 4096);
    source.set_live(0xb000, &samples[1], 4096);
    source.set_live(0xc000, &samples[2], 8192);
    source.free(0xb000);
    let mut orphan = sample(1, 999);
    orphan.tid = 1;
    source.set_live(0xd000, &orphan, 1024);
    let cap = run(&request(Mode::Live, Format::Svg), source.clone());
    assert_eq!(leaf_weight(&cap), 4096 + 8192, "{:?}", cap.folded.lines());
    let alloc = cap.alloc.as_ref().expect("alloc outcome");
    assert_eq!((alloc.live_blocks, alloc.live_unnamed), (3, 1));
    assert_eq!(alloc.live_bytes, 4096 + 8192 + 1024);
    assert!(alloc.unsettled.is_empty());
    assert!(source.calls().contains(&"settle_alloc".to_owned()));
}

#[test]
fn one_renderer_writes_every_format() {
    let rules = Rules::default();
    for format in Format::ALL {
        let source = ReplaySource::new();
        for i in 0..10 {
            source.push(sample(1, i));
        }
        let req = request(Mode::Cpu, format);
        let cap = run(&req, source);
        let title = req.title("pid test", &cap);
        assert!(
            title.starts_with("pid test — 0s on-CPU at 99 Hz"),
            "{title}"
        );
        let out = render::capture((&cap).into(), &req, &title, &rules, &Default::default())
            .unwrap_or_else(|e| panic!("{format:?}: {e}"));
        let text = String::from_utf8_lossy(&out.body);
        match format {
            Format::Svg => assert!(text.contains("<svg") && text.contains("on-CPU at 99 Hz")),
            Format::Collapsed => assert!(text.trim_end().ends_with(" 10"), "{text}"),
            Format::Json => {
                let v: serde_json::Value =
                    serde_json::from_slice(&out.body).unwrap_or_else(|e| panic!("{e}"));
                assert_eq!(v["total"], 10);
            }
            Format::Pprof => {
                let mut raw = Vec::new();
                flate2::read::GzDecoder::new(&out.body[..])
                    .read_to_end(&mut raw)
                    .unwrap_or_else(|e| panic!("not gzip: {e}"));
                assert!(
                    raw.windows(7).any(|w| w == b"samples"),
                    "a profile of CPU samples"
                );
            }
        }
    }
}
