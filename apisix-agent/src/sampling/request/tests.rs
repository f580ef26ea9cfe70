//! Unit tests of [`super`] (`request.rs`), kept apart so that the module stays short.

use super::*;

fn q(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

const DEFAULTS: Defaults = Defaults {
    seconds: None,
    max_seconds: 120,
    frequency: 99,
    min_block_us: 1000,
    sample_bytes: 524_288,
    stall_threshold_ms: 100,
};

fn parsed(pairs: &[(&str, &str)]) -> Request {
    match Request::from_query(&q(pairs), DEFAULTS) {
        Ok(r) => r,
        Err(e) => panic!("{pairs:?}: {e}"),
    }
}

fn refused(pairs: &[(&str, &str)]) -> String {
    match Request::from_query(&q(pairs), DEFAULTS) {
        Ok(r) => panic!("{pairs:?} accepted: {r:?}"),
        Err(e) => e.message,
    }
}

#[test]
fn valid_queries() {
    let r = parsed(&[("pid", "12"), ("seconds", "3")]);
    assert_eq!(r.selector, Selector::Pid(12));
    assert_eq!(r.seconds, Some(3));
    assert_eq!(r.frequency, 99);
    assert_eq!(r.format, Format::Svg);
    assert_eq!(r.capture_mode(), Some(capture::Mode::Cpu { frequency: 99 }));
    assert_eq!(
        parsed(&[("container", "gw"), ("format", "json")]).capture_mode(),
        None
    );
    let r = parsed(&[("pid", "1"), ("plugin", "key-auth"), ("phase", "access")]);
    assert_eq!(r.filter.plugin.as_deref(), Some("key-auth"));
    assert_eq!(r.filter.phase, Some(Phase::Access));
    parsed(&[("pid", "1"), ("plugin", "[core]")]);
    let r = parsed(&[("pid", "1"), ("seconds", "5"), ("mode", "live")]);
    assert_eq!(r.mode, Mode::Live);
    assert_eq!(r.sample_bytes, 524_288);
    let r = parsed(&[
        ("pid", "1"),
        ("seconds", "5"),
        ("mode", "alloc"),
        ("sample_bytes", "65536"),
    ]);
    assert_eq!(
        r.capture_mode(),
        Some(capture::Mode::Alloc {
            sample_bytes: 65536,
            live: false
        })
    );
    let r = parsed(&[
        ("pid", "1"),
        ("seconds", "2"),
        ("mode", "off-cpu"),
        ("min_block_us", "50"),
    ]);
    assert_eq!(
        r.capture_mode(),
        Some(capture::Mode::OffCpu {
            min_block_us: 50,
            exclude_idle: true
        })
    );
    assert_eq!(r.pprof_kind(49), pprof::Kind::OffCpu);
    assert_eq!(parsed(&[("pid", "1")]).pprof_kind(49), pprof::Kind::cpu(49));
}

#[test]
fn bad_queries_say_why() {
    assert!(refused(&[]).contains("exactly one"));
    assert!(refused(&[("pid", "1"), ("container", "x")]).contains("only one"));
    assert!(refused(&[("pid", "abc")]).contains("not a process id"));
    assert!(refused(&[("pid", "0")]).contains("not a process id"));
    assert!(refused(&[("pid", "1"), ("trace_frames", "1")]).contains("captures"));
    refused(&[("pid", "1"), ("seconds", "2"), ("trace_frames", "2")]);
    assert!(refused(&[("pid", "1"), ("seconds", "121")]).contains("1..=120"));
    refused(&[("pid", "1"), ("seconds", "0")]);
    refused(&[("pid", "1"), ("seconds", "-1")]);
    refused(&[("pid", "1"), ("format", "png")]);
    refused(&[("pid", "1"), ("frequency", "50")]);
    assert!(refused(&[("pid", "1"), ("seconds", "2"), ("frequency", "5000")]).contains("1..=1000"));
    assert!(refused(&[("pid", "1"), ("file", "/etc/passwd")]).contains("unknown parameter"));
    assert!(refused(&[("pid", "1"), ("mode", "off-cpu")]).contains("needs seconds=N"));
    refused(&[("pid", "1"), ("mode", "wall")]);
    refused(&[("pid", "1"), ("plugin", "a b")]);
    refused(&[("pid", "1"), ("plugin", "")]);
    refused(&[("pid", "1"), ("plugin", &"x".repeat(65))]);
    refused(&[("pid", "1"), ("phase", "lunch")]);
    refused(&[("pid", "1"), ("mode", "alloc")]);
    refused(&[("pid", "1"), ("mode", "live")]);
    refused(&[
        ("pid", "1"),
        ("seconds", "2"),
        ("mode", "alloc"),
        ("frequency", "9"),
    ]);
    assert!(
        refused(&[("pid", "1"), ("seconds", "2"), ("sample_bytes", "65536")])
            .contains("applies to mode=alloc and mode=live")
    );
    refused(&[
        ("pid", "1"),
        ("seconds", "2"),
        ("mode", "live"),
        ("sample_bytes", "10"),
    ]);
    refused(&[("pid", "1"), ("seconds", "121"), ("mode", "alloc")]);
    refused(&[("pid", "1"), ("seconds", "2"), ("min_block_us", "10")]);
}

#[test]
fn every_format_and_mode_parses() {
    for f in Format::ALL {
        assert_eq!(parsed(&[("pid", "1"), ("format", f.name())]).format, f);
    }
    for m in Mode::ALL.into_iter().filter(|m| *m != Mode::Heap) {
        let r = parsed(&[
            ("pid", "1"),
            ("seconds", "2"),
            ("mode", m.name()),
            ("format", "pprof"),
        ]);
        assert_eq!(r.mode, m);
        assert!(r.capture_mode().is_some());
    }
}

#[test]
fn the_command_line_is_checked_the_same_way() {
    let cli = |args: RequestArgs| Request::new(&args, Defaults::RECORD, Origin::Cli);
    let r = match cli(RequestArgs {
        pid: Some(7),
        ..RequestArgs::default()
    }) {
        Ok(r) => r,
        Err(e) => panic!("{e}"),
    };
    assert_eq!(r.seconds, Some(10));
    assert_eq!(r.capture_mode(), Some(capture::Mode::Cpu { frequency: 99 }));
    let e = |args: RequestArgs| match cli(args) {
        Ok(r) => panic!("accepted {r:?}"),
        Err(e) => e.message,
    };
    assert!(
        e(RequestArgs {
            pid: Some(7),
            frequency: Some(5000),
            ..RequestArgs::default()
        })
        .starts_with("--frequency=5000 must be in 1..=1000")
    );
    assert!(
        e(RequestArgs {
            pid: Some(7),
            seconds: Some(0),
            ..RequestArgs::default()
        })
        .starts_with("--duration=0")
    );
    assert!(
        e(RequestArgs {
            pid: Some(7),
            mode: Some(Mode::Live),
            sample_bytes: Some(1),
            ..RequestArgs::default()
        })
        .starts_with("--sample-bytes=1")
    );
    assert_eq!(e(RequestArgs::default()), "--pid is required");
}

#[test]
fn heap_requests_are_checked() {
    let r = parsed(&[("pid", "1"), ("mode", "heap"), ("diff_seconds", "5")]);
    assert_eq!(
        (r.mode, r.diff_seconds, r.seconds),
        (Mode::Heap, Some(5), None)
    );
    assert_eq!(r.capture_mode(), None);
    refused(&[("pid", "1"), ("mode", "heap"), ("format", "pprof")]);
    refused(&[("pid", "1"), ("mode", "heap"), ("frequency", "9")]);
    refused(&[("pid", "1"), ("mode", "heap"), ("diff_seconds", "0")]);
    refused(&[("container", "gw"), ("mode", "heap")]);
    refused(&[("pid", "1"), ("seconds", "2"), ("diff_seconds", "5")]);
}

#[test]
fn pprof_selector_and_filter() {
    assert_eq!(parse_selector(&q(&[])), Ok(None));
    assert_eq!(
        parse_selector(&q(&[("container", "gw")])),
        Ok(Some(Selector::Container("gw".into())))
    );
    assert!(parse_selector(&q(&[("pid", "x")])).is_err());
    assert!(parse_selector(&q(&[("pid", "1"), ("container", "gw")])).is_err());
    assert!(parse_filter(&q(&[("phase", "lunch")])).is_err());
    assert!(parse_filter(&q(&[("plugin", "a b")])).is_err());
}
