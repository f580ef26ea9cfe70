//! Unit tests of [`super`] (`http.rs`), kept apart so that the module stays short.

use super::*;

fn q(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

fn pprof_status(pairs: &[(&str, &str)]) -> Option<StatusCode> {
    parse_pprof(&q(pairs))
        .err()
        .map(|_| StatusCode::BAD_REQUEST)
}

#[test]
fn pprof_requests() {
    let r = match parse_pprof(&q(&[])) {
        Ok(r) => r,
        Err(e) => panic!("{e:?}"),
    };
    assert_eq!(r.seconds, DEFAULT_PPROF_SECONDS);
    assert!(r.selector.is_none());
    let r = match parse_pprof(&q(&[
        ("seconds", "14"),
        ("container", "gw"),
        ("plugin", "key-auth"),
        ("phase", "access"),
    ])) {
        Ok(r) => r,
        Err(e) => panic!("{e:?}"),
    };
    assert_eq!(r.seconds, 14);
    assert!(matches!(r.selector, Some(Selector::Container(ref c)) if c == "gw"));
    assert_eq!(r.filter.plugin.as_deref(), Some("key-auth"));
    // Above the retention window is clamped later, not refused.
    assert!(parse_pprof(&q(&[("seconds", "86400")])).is_ok());
    let b = Some(StatusCode::BAD_REQUEST);
    for seconds in ["0", "-5", "86401", "99999999999999999999", "abc", "1.5", ""] {
        assert_eq!(
            pprof_status(&[("seconds", seconds)]),
            b,
            "seconds={seconds}"
        );
    }
    assert_eq!(pprof_status(&[("debug", "1")]), b, "unknown parameter");
    assert_eq!(pprof_status(&[("pid", "x")]), b);
    assert_eq!(pprof_status(&[("pid", "1"), ("container", "gw")]), b);
    assert_eq!(pprof_status(&[("phase", "lunch")]), b);
    assert_eq!(pprof_status(&[("plugin", "a b")]), b);
}

#[test]
fn utc_format() {
    let s = match time::OffsetDateTime::now_utc().format(UTC_DATE) {
        Ok(s) => s,
        Err(e) => panic!("{e}"),
    };
    assert_eq!(s.len(), 23, "{s}");
    assert!(s.starts_with("20"), "{s}");
}
