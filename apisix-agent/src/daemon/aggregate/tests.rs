//! The aggregator's tests: counters and windows through [`Aggregator`], as the sampler
//! thread and the HTTP handlers use them.

use std::{
    collections::HashSet,
    sync::Arc,
    time::{Duration, Instant},
};

use super::{Aggregator, OTHER, Retention, Window, counters::GROUP_GRACE, counters::Group};
use crate::{
    attribution::{Filter, Rules},
    daemon::metrics::{LabelValue, Metrics, TargetLabels, VmStateLabels},
    label::{FrameClass, FrameDetail, classify},
    output::Folded,
};

/// The calls the tests make, over what the daemon uses.
impl Aggregator {
    fn add<'m>(
        &self,
        pid: u32,
        target: &TargetLabels,
        stack: Vec<Arc<str>>,
        module_of: impl Fn(&str) -> Option<&'m Arc<str>>,
    ) {
        self.add_detailed(pid, target, stack, Vec::new(), module_of);
    }

    fn window(
        &self,
        which: Retention,
        from: Instant,
        to: Instant,
        keep: impl Fn(u32, &str) -> bool,
        filter: &Filter,
    ) -> Window {
        self.snapshot(which).cut(from, to, keep, filter)
    }

    fn recent_filtered(
        &self,
        window: Duration,
        keep: impl Fn(u32, &str) -> bool,
        filter: &Filter,
    ) -> Folded {
        let mut folded = Folded::new();
        for stack in self
            .snapshot(Retention::Cpu)
            .recent_stacks(window, keep, filter)
        {
            folded.add(stack.to_vec(), 1);
        }
        folded
    }

    fn recent(&self, window: Duration, keep: impl Fn(u32, &str) -> bool) -> Folded {
        self.recent_filtered(window, keep, &Filter::default())
    }
}

fn stack(frames: &[&str]) -> Vec<Arc<str>> {
    frames.iter().map(|f| Arc::from(*f)).collect()
}

fn target() -> TargetLabels {
    TargetLabels {
        container: "gw".into(),
        image: "apache/apisix".into(),
        process: "nginx".into(),
    }
}

fn no_module(_: &str) -> Option<&'static Arc<str>> {
    None
}

#[test]
fn classifies_frame_labels() {
    assert_eq!(
        classify("router:match@/app/router.lua:40"),
        FrameClass::Lua {
            function: "router:match",
            file: "/app/router.lua",
            line: "40"
        }
    );
    assert_eq!(
        classify("[main]@access_by_lua(nginx.conf:17):0"),
        FrameClass::Lua {
            function: "[main]",
            file: "access_by_lua(nginx.conf:17)",
            line: "0"
        }
    );
    assert!(matches!(
        classify("builtin:string.rep"),
        FrameClass::Lua {
            file: "[builtin]",
            ..
        }
    ));
    assert!(matches!(classify("[lua:gc]"), FrameClass::Lua { .. }));
    assert_eq!(classify("do_syscall_64_[k]"), FrameClass::Kernel);
    assert_eq!(
        classify("ngx_http_lua_content_handler"),
        FrameClass::C {
            function: "ngx_http_lua_content_handler"
        }
    );
    assert_eq!(
        classify("libc.so.6+0x1234"),
        FrameClass::C {
            function: "libc.so.6+0x1234"
        }
    );
}

fn value(text: &str, prefix: &str) -> Option<u64> {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[test]
fn gone_groups_lose_every_series_and_their_interned_name() {
    let metrics = Arc::new(Metrics::new(false));
    let agg = Aggregator::new(metrics.clone(), 10, Duration::from_secs(60), 1000);
    let t = target();
    agg.add(
        1,
        &t,
        stack(&["main", "lua_resume", "f@/a.lua:1"]),
        no_module,
    );
    agg.flush();
    // As the sampler thread counts them.
    metrics
        .vm_states
        .get_or_create(&VmStateLabels {
            state: LabelValue::fixed(crate::luajit::VmState::ALL[0].name()),
            container: t.container.clone(),
            image: t.image.clone(),
        })
        .inc();
    let group = Group::of(&t);
    agg.retain_groups(&HashSet::from([group.clone()]));
    let text = metrics.encode().unwrap_or_default();
    assert!(text.contains("container=\"gw\""), "{text}");
    // Gone for longer than the grace period, and its stacks aged out of the window.
    agg.retain_groups(&HashSet::new());
    let long_ago = Instant::now().checked_sub(GROUP_GRACE + Duration::from_secs(1));
    if let (Some(since), Some(gone)) = (long_ago, agg.counters().gone_since_mut().get_mut(&group)) {
        *gone = since;
    }
    agg.windows()
        .expire(Instant::now() + Duration::from_secs(3600));
    agg.retain_groups(&HashSet::new());
    let text = metrics.encode().unwrap_or_default();
    assert!(!text.contains("container=\"gw\""), "{text}");
    assert_eq!(
        agg.windows().interned_targets(),
        0,
        "interned container names kept"
    );
}

#[test]
fn the_window_is_capped_in_bytes() {
    let metrics = Arc::new(Metrics::new(false));
    let agg = Aggregator::new(metrics, 10, Duration::from_secs(600), 1_000_000);
    agg.set_retained_bytes(1 << 20);
    let t = target();
    // Names a target generates: each sample a new 500-byte label.
    for i in 0..20_000 {
        let name = format!("{i}{}", "x".repeat(500));
        agg.add(1, &t, stack(&["main", &name]), |_: &str| None);
    }
    let (bytes, _) = agg.retained_bytes();
    assert!(bytes <= 1 << 20, "{bytes}");
    let kept = agg.windows().len().0;
    assert!(kept > 100 && kept < 20_000, "{kept}");
    // A shared stack costs little per sample: many more fit.
    for _ in 0..20_000 {
        agg.add(1, &t, stack(&["main", "f@/a.lua:1"]), |_: &str| None);
    }
    let kept = agg.windows().len().0;
    assert!(kept > 5_000, "{kept}");
}

#[test]
fn self_and_inclusive_counts() {
    let metrics = Arc::new(Metrics::new(false));
    let agg = Aggregator::new(metrics.clone(), 10, Duration::from_secs(60), 1000);
    let t = target();
    // Recursion counts once inclusively; the innermost Lua frame takes self even with a
    // C function above it.
    agg.add(
        1,
        &t,
        stack(&[
            "main",
            "lua_resume",
            "f@/a.lua:1",
            "f@/a.lua:1",
            "g@/a.lua:9",
            "ngx_say",
            "write_[k]",
        ]),
        no_module,
    );
    agg.add(
        1,
        &t,
        stack(&["main", "lua_resume", "f@/a.lua:1"]),
        no_module,
    );
    agg.flush();
    let text = match metrics.encode() {
        Ok(t) => t,
        Err(e) => panic!("{e}"),
    };
    let f = "{function=\"f\",file=\"/a.lua\",line=\"1\",container=\"gw\",image=\"apache/apisix\"}";
    let g = "{function=\"g\",file=\"/a.lua\",line=\"9\",container=\"gw\",image=\"apache/apisix\"}";
    assert_eq!(
        value(
            &text,
            &format!("apisix_profiler_lua_function_samples_total{f}")
        ),
        Some(2)
    );
    assert_eq!(
        value(
            &text,
            &format!("apisix_profiler_lua_function_self_samples_total{f}")
        ),
        Some(1)
    );
    assert_eq!(
        value(
            &text,
            &format!("apisix_profiler_lua_function_self_samples_total{g}")
        ),
        Some(1)
    );
    assert!(text.contains("apisix_profiler_c_function_self_samples_total{function=\"ngx_say\""));
    assert_eq!(
        value(
            &text,
            "apisix_profiler_samples_total{container=\"gw\",image=\"apache/apisix\",process=\"nginx\"}"
        ),
        Some(2)
    );
}

#[test]
fn functions_beyond_the_cap_go_to_other() {
    let metrics = Arc::new(Metrics::new(false));
    let agg = Aggregator::new(metrics.clone(), 2, Duration::from_secs(60), 1000);
    let t = target();
    for (name, n) in [("a", 5), ("b", 4), ("c", 3), ("d", 1)] {
        for _ in 0..n {
            agg.add(
                1,
                &t,
                stack(&["main", &format!("{name}@/x.lua:1")]),
                no_module,
            );
        }
    }
    agg.flush();
    let text = match metrics.encode() {
        Ok(t) => t,
        Err(e) => panic!("{e}"),
    };
    let series = text
        .lines()
        .filter(|l| l.starts_with("apisix_profiler_lua_function_self_samples_total{"))
        .count();
    assert_eq!(series, 3, "{text}");
    assert!(text.contains("function=\"a\""));
    assert!(text.contains("function=\"b\""));
    assert!(!text.contains("function=\"c\""));
    assert_eq!(
        value(
            &text,
            "apisix_profiler_lua_function_self_samples_total{function=\"[other]\",file=\"\",line=\"\",container=\"gw\",image=\"apache/apisix\"}"
        ),
        Some(4)
    );
    // A later flush keeps the admitted set.
    agg.add(1, &t, stack(&["main", "c@/x.lua:1"]), no_module);
    agg.flush();
    let text = match metrics.encode() {
        Ok(t) => t,
        Err(e) => panic!("{e}"),
    };
    assert!(!text.contains("function=\"c\""));
}

#[test]
fn plugin_and_phase_seconds() {
    let metrics = Arc::new(Metrics::new(false));
    let agg = Aggregator::new(metrics.clone(), 2, Duration::from_secs(60), 1000);
    agg.set_attribution(Arc::new(Rules::default()), 10);
    let t = target();
    let access = ["main", "ngx_http_lua_access_handler", "lj_vm_call"];
    for (plugin, n) in [
        ("key-auth", 4),
        ("limit-count", 3),
        ("cors", 2),
        ("ip-restriction", 1),
    ] {
        let file = format!("_M.access@/a/apisix/plugins/{plugin}.lua:10");
        for _ in 0..n {
            agg.add(
                1,
                &t,
                stack(&[&access[..], &[file.as_str()]].concat()),
                no_module,
            );
        }
    }
    agg.add(1, &t, stack(&["main", "epoll_wait"]), no_module);
    agg.flush();
    let text = match metrics.encode() {
        Ok(t) => t,
        Err(e) => panic!("{e}"),
    };
    // Milliseconds, rounded: the counters are floats.
    let value = |series: &str| -> Option<i64> {
        text.lines()
            .find(|l| l.starts_with(series))
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .map(|v| (v * 1000.0).round() as i64)
    };
    let labels = "container=\"gw\",image=\"apache/apisix\"}";
    let plugin = |p: &str, phase: &str| {
        value(&format!(
            "apisix_profiler_plugin_cpu_seconds_total{{plugin=\"{p}\",phase=\"{phase}\",{labels}"
        ))
    };
    // 4 samples at 10 Hz are 0.4 s; the cap of 2 admits the two largest.
    assert_eq!(plugin("key-auth", "access"), Some(400), "{text}");
    assert_eq!(plugin("limit-count", "access"), Some(300), "{text}");
    assert_eq!(plugin("[other]", "access"), Some(300), "{text}");
    assert!(!text.contains("plugin=\"cors\""), "{text}");
    assert_eq!(plugin("", "none"), Some(100), "{text}");
    assert_eq!(
        value(&format!(
            "apisix_profiler_phase_cpu_seconds_total{{phase=\"access\",{labels}"
        )),
        Some(1000),
        "{text}"
    );
}

#[test]
fn offcpu_time_by_plugin_and_phase() {
    let metrics = Arc::new(Metrics::new(true));
    let agg = Aggregator::new(metrics.clone(), 10, Duration::from_secs(60), 1000);
    let t = target();
    let s = stack(&[
        "main",
        "ngx_http_lua_log_handler",
        "lj_vm_call",
        "_M.log@/a/apisix/plugins/http-logger.lua:40",
        "builtin:io.write",
        "write",
    ]);
    agg.add_offcpu(1, &t, s, Vec::new(), 250_000);
    agg.flush();
    let text = match metrics.encode() {
        Ok(t) => t,
        Err(e) => panic!("{e}"),
    };
    assert!(
        text.contains(
            "apisix_profiler_plugin_offcpu_seconds_total{plugin=\"http-logger\",phase=\"log\",\
             container=\"gw\",image=\"apache/apisix\"} 0.25"
        ),
        "{text}"
    );
    assert!(
        text.contains(
            "apisix_profiler_phase_offcpu_seconds_total{phase=\"log\",container=\"gw\",\
             image=\"apache/apisix\"} 0.25"
        ),
        "{text}"
    );
    // Blocked time is not CPU time.
    assert!(
        !text.contains("apisix_profiler_plugin_cpu_seconds_total{"),
        "{text}"
    );
}

#[test]
fn recent_filter_by_plugin() {
    let metrics = Arc::new(Metrics::new(false));
    let agg = Aggregator::new(metrics, 10, Duration::from_secs(60), 1000);
    let t = target();
    for (plugin, n) in [("key-auth", 3), ("cors", 2)] {
        let file = format!("_M.access@/a/apisix/plugins/{plugin}.lua:10");
        for _ in 0..n {
            agg.add(
                1,
                &t,
                stack(&["main", "ngx_http_lua_access_handler", &file]),
                no_module,
            );
        }
    }
    let only = |plugin: &str| Filter {
        plugin: Some(plugin.to_owned()),
        phase: None,
    };
    let window = Duration::from_secs(60);
    assert_eq!(
        agg.recent_filtered(window, |_, _| true, &only("cors"))
            .total(),
        2
    );
    assert_eq!(
        agg.recent_filtered(window, |_, _| true, &only("x")).total(),
        0
    );
    assert_eq!(agg.recent(window, |_, _| true).total(), 5);
}

fn total(w: &Window) -> u64 {
    w.stacks.iter().map(|s| s.count).sum()
}

#[test]
fn windows_that_meet_hold_each_sample_once() {
    let metrics = Arc::new(Metrics::new(false));
    let agg = Aggregator::new(metrics, 10, Duration::from_secs(60), 1000);
    let t = target();
    let start = Instant::now();
    for _ in 0..3 {
        agg.add(1, &t, stack(&["main", "f@/a.lua:1"]), no_module);
    }
    std::thread::sleep(Duration::from_millis(2));
    let mid = Instant::now();
    std::thread::sleep(Duration::from_millis(2));
    let details = vec![
        FrameDetail::default(),
        FrameDetail {
            line: 4,
            ..FrameDetail::default()
        },
    ];
    for _ in 0..2 {
        agg.add_detailed(
            1,
            &t,
            stack(&["main", "f@/a.lua:1"]),
            details.clone(),
            no_module,
        );
    }
    let end = Instant::now();
    let keep = |_: u32, _: &str| true;
    let none = Filter::default();
    let first = agg.window(Retention::Cpu, start, mid, keep, &none);
    let second = agg.window(Retention::Cpu, mid, end, keep, &none);
    assert_eq!((total(&first), total(&second)), (3, 2));
    assert!(!first.truncated);
    // Same labels, other details: a stack of its own, interned once.
    assert_eq!(second.stacks.len(), 1);
    assert_eq!(second.stacks[0].details[1].line, 4);
    assert_eq!(
        second.stacks[0].attribution.plugin,
        crate::attribution::CORE
    );
    assert_eq!(*second.stacks[0].target, t);
    // Nothing arrived after `end`.
    assert_eq!(
        total(&agg.window(Retention::Cpu, end, Instant::now(), keep, &none)),
        0
    );
    let only_2 = |pid: u32, _: &str| pid == 2;
    assert_eq!(
        total(&agg.window(Retention::Cpu, start, end, only_2, &none)),
        0
    );
}

#[test]
fn a_window_the_cap_cut_says_so_and_starts_later() {
    let metrics = Arc::new(Metrics::new(false));
    let agg = Aggregator::new(metrics, 10, Duration::from_secs(60), 3);
    let t = target();
    let start = Instant::now();
    for _ in 0..5 {
        agg.add(1, &t, stack(&["main", "f@/a.lua:1"]), no_module);
    }
    let w = agg.window(
        Retention::Cpu,
        start,
        Instant::now(),
        |_, _| true,
        &Filter::default(),
    );
    assert_eq!(total(&w), 3);
    assert!(w.truncated);
    assert!(w.from > start);
}

#[test]
fn offcpu_window_keeps_blocks_outside_lua_but_not_idle_waits() {
    let metrics = Arc::new(Metrics::new(true));
    let agg = Aggregator::new(metrics, 10, Duration::from_secs(60), 1000);
    let t = target();
    let start = Instant::now();
    agg.add_offcpu(
        1,
        &t,
        stack(&["main", "f@/a.lua:1", "read"]),
        Vec::new(),
        1500,
    );
    agg.add_offcpu(
        1,
        &t,
        stack(&["main", "ngx_process_events", "epoll_wait"]),
        Vec::new(),
        9,
    );
    agg.add_offcpu(1, &t, stack(&["main", "fsync"]), Vec::new(), 2500);
    let w = agg.window(
        Retention::OffCpu,
        start,
        Instant::now(),
        |_, _| true,
        &Filter::default(),
    );
    assert_eq!(total(&w), 2);
    assert_eq!(w.stacks.iter().map(|s| s.weight).sum::<u64>(), 4000);
    let cpu = agg.window(
        Retention::Cpu,
        start,
        Instant::now(),
        |_, _| true,
        &Filter::default(),
    );
    assert_eq!(total(&cpu), 0);
}

#[test]
fn window_plugins_beyond_the_cap_are_other() {
    let metrics = Arc::new(Metrics::new(false));
    let agg = Aggregator::new(metrics, 1, Duration::from_secs(60), 1000);
    let t = target();
    let start = Instant::now();
    for plugin in ["key-auth", "key-auth", "cors"] {
        let file = format!("_M.access@/a/apisix/plugins/{plugin}.lua:10");
        agg.add(
            1,
            &t,
            stack(&["main", "ngx_http_lua_access_handler", &file]),
            no_module,
        );
    }
    agg.flush();
    let w = agg.window(
        Retention::Cpu,
        start,
        Instant::now(),
        |_, _| true,
        &Filter::default(),
    );
    let mut plugins: Vec<&str> = w
        .stacks
        .iter()
        .map(|s| s.attribution.plugin.as_str())
        .collect();
    plugins.sort_unstable();
    assert_eq!(plugins, ["[other]", "key-auth"]);
    let only = Filter {
        plugin: Some("cors".to_owned()),
        phase: None,
    };
    let w = agg.window(Retention::Cpu, start, Instant::now(), |_, _| true, &only);
    assert_eq!(total(&w), 1);
    // The label the metrics and pprof show for it filters too.
    let other = Filter {
        plugin: Some(OTHER.to_owned()),
        phase: None,
    };
    let w = agg.window(Retention::Cpu, start, Instant::now(), |_, _| true, &other);
    assert_eq!(total(&w), 1);
    assert_eq!(
        agg.recent_filtered(Duration::from_secs(60), |_, _| true, &other)
            .total(),
        1
    );
}

#[test]
fn recent_window_filters_by_pid_and_container() {
    let metrics = Arc::new(Metrics::new(false));
    let agg = Aggregator::new(metrics, 10, Duration::from_secs(60), 3);
    let t = target();
    for i in 0..5 {
        agg.add(i, &t, stack(&["main", "f@/a.lua:1"]), no_module);
    }
    // Only the last three are kept.
    assert_eq!(agg.recent(Duration::from_secs(60), |_, _| true).total(), 3);
    assert_eq!(
        agg.recent(Duration::from_secs(60), |pid, _| pid == 4)
            .total(),
        1
    );
    assert_eq!(
        agg.recent(Duration::from_secs(60), |_, c| c == "gw")
            .total(),
        3
    );
    assert_eq!(
        agg.recent(Duration::from_secs(60), |_, c| c == "other")
            .total(),
        0
    );
}

#[test]
fn a_snapshot_spans_chunks_and_stays_as_taken() {
    use super::window::CHUNK;
    let metrics = Arc::new(Metrics::new(false));
    let kept = 3 * CHUNK + 7;
    let agg = Aggregator::new(metrics, 10, Duration::from_secs(60), kept);
    let t = target();
    let start = Instant::now();
    let sent = 5 * CHUNK;
    for pid in 0..sent {
        let pid = u32::try_from(pid).unwrap_or(u32::MAX);
        agg.add(pid, &t, stack(&["main", "f@/a.lua:1"]), no_module);
    }
    let snap = agg.snapshot(Retention::Cpu);
    assert_eq!(snap.len(), kept);
    assert_eq!(agg.windows().len().0, kept);
    // The newest are kept, each once, across the chunks and the open one.
    let newest = u32::try_from(sent - kept).unwrap_or(0);
    let cut = |s: &super::WindowSnapshot, keep: &dyn Fn(u32) -> bool| {
        total(&s.cut(
            start,
            Instant::now(),
            |pid, _| keep(pid),
            &Filter::default(),
        ))
    };
    assert_eq!(cut(&snap, &|pid| pid >= newest), kept as u64);
    assert_eq!(cut(&snap, &|pid| pid < newest), 0);
    // Samples arriving after it do not change a snapshot.
    for _ in 0..CHUNK {
        agg.add(1, &t, stack(&["main", "g@/a.lua:2"]), no_module);
    }
    assert_eq!(snap.len(), kept);
    assert_eq!(cut(&snap, &|_| true), kept as u64);
    assert_eq!(agg.snapshot(Retention::Cpu).len(), kept);
}

#[test]
fn expiry_by_age_empties_the_window_and_its_byte_count() {
    use super::window::CHUNK;
    let metrics = Arc::new(Metrics::new(false));
    let agg = Aggregator::new(metrics, 10, Duration::from_secs(60), 1_000_000);
    let t = target();
    for i in 0..(CHUNK + 10) {
        agg.add(
            1,
            &t,
            stack(&["main", &format!("f{i}@/a.lua:1")]),
            no_module,
        );
    }
    assert!(agg.retained_bytes().0 > 0);
    // Nothing is old yet.
    agg.windows().expire(Instant::now());
    assert_eq!(agg.windows().len().0, CHUNK + 10);
    agg.windows()
        .expire(Instant::now() + Duration::from_secs(61));
    assert_eq!(agg.windows().len().0, 0);
    assert_eq!(agg.retained_bytes().0, 0);
    assert!(agg.snapshot(Retention::Cpu).is_empty());
}
