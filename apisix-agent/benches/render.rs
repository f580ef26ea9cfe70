//! `cargo bench --bench render`: how long rendering a flame graph takes, for the sizes the
//! daemon serves (`/flamegraph`): 100 000 samples over 3 000 distinct stacks of mixed C and
//! Lua frames, 20 to 60 deep, as SVG, as folded text and as a gzip-compressed pprof profile
//! (`/debug/pprof/profile`; `bench/pprof_cost.py` measures it on the real daemon).
//!
//! Hooks: none (user space only, no root). Metrics: criterion's timings.

use std::{hint::black_box, sync::Arc};

use apisix_agent::output::{Folded, pprof};
use criterion::{Criterion, criterion_group, criterion_main};

/// Samples in the synthetic profile.
const SAMPLES: u64 = 100_000;
/// Distinct stacks in it.
const STACKS: u64 = 3_000;

/// A deterministic profile shaped like an nginx-lua worker's: a common native root, Lua
/// frames below `ngx_http_lua_run_thread`, a native or builtin leaf.
fn profile() -> Folded {
    let root: Vec<Arc<str>> = [
        "main",
        "ngx_master_process_cycle",
        "ngx_spawn_process",
        "ngx_worker_process_cycle",
        "ngx_process_events_and_timers",
        "ngx_epoll_process_events",
        "ngx_http_lua_content_handler",
        "ngx_http_lua_run_thread",
        "lua_resume",
    ]
    .into_iter()
    .map(Arc::from)
    .collect();
    let mut folded = Folded::new();
    // A small linear congruential generator: the same profile on every run.
    let mut state: u64 = 0x2545_f491_4f6c_dd1d;
    let mut next = move || {
        state = state
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        state >> 33
    };
    for i in 0..STACKS {
        let depth = 20 + next() % 41;
        let mut stack = root.clone();
        for d in root.len() as u64..depth {
            let label = if d + 1 == depth && i % 3 == 0 {
                format!(
                    "builtin:string.{}",
                    ["rep", "find", "sub"][(next() % 3) as usize]
                )
            } else {
                format!("handler_{}@/app/mod{}.lua:{}", next() % 40, d % 7, 10 + d)
            };
            stack.push(Arc::from(label));
        }
        let weight = SAMPLES / STACKS + u64::from(i < SAMPLES % STACKS);
        folded.add(stack, weight);
    }
    folded
}

fn render(c: &mut Criterion) {
    let folded = profile();
    assert_eq!(folded.total(), SAMPLES);
    let mut group = c.benchmark_group("render_100k_samples");
    group.sample_size(10);
    group.bench_function("svg", |b| {
        b.iter(|| {
            let mut out = Vec::with_capacity(4 << 20);
            folded
                .write_svg("bench", &mut out)
                .expect("render to memory");
            black_box(out.len())
        });
    });
    group.bench_function("folded", |b| {
        b.iter(|| {
            let mut out = Vec::with_capacity(1 << 20);
            folded.write_folded(&mut out).expect("write to memory");
            black_box(out.len())
        });
    });
    group.bench_function("pprof", |b| {
        b.iter(|| {
            let mut p = pprof::ProfileBuilder::new(pprof::Kind::cpu(19));
            p.add_folded(&folded, &[("process", "nginx"), ("phase", "content")]);
            let profile = p.build(
                std::time::SystemTime::now(),
                std::time::Duration::from_secs(60),
            );
            black_box(pprof::gzip(&profile).expect("gzip").len())
        });
    });
    group.finish();
}

criterion_group!(benches, render);
criterion_main!(benches);
