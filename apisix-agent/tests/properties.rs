//! Property tests over what a profiled process controls (issue 21): label values in
//! `/metrics` (both exposition formats), the decoding of Lua strings read from a target
//! (chunk names), `/proc/PID/maps` lines and ELF images. Root-free; case counts are bounded
//! so the whole file runs in seconds (`PROPTEST_CASES` raises them for a longer run).

use apisix_agent::{
    daemon::metrics::{
        LabelValue, LuaFunctionLabels, MAX_LABEL_VALUE_BYTES, Metrics, TRUNCATED,
        to_prometheus_text,
    },
    luajit::detect::inspect,
    proc::process::parse_maps,
    stacks::names::{MAX_STR, decode_str},
};
use proptest::prelude::*;

/// The value of label `name` in a sample line, unescaped as the exposition formats say;
/// `None` when the line is not well formed (an unknown escape, no closing quote).
fn label_value(line: &str, name: &str) -> Option<String> {
    let start = line.find(&format!("{name}=\""))? + name.len() + 2;
    let mut out = String::new();
    let mut chars = line[start..].chars();
    loop {
        match chars.next()? {
            '"' => return Some(out),
            '\\' => match chars.next()? {
                '\\' => out.push('\\'),
                '"' => out.push('"'),
                'n' => out.push('\n'),
                _ => return None,
            },
            '\n' => return None,
            c => out.push(c),
        }
    }
}

/// Any string, weighted towards what breaks the formats.
fn hostile_string() -> impl Strategy<Value = String> {
    prop_oneof![
        ".{0,64}",
        "[\"\\\\\n{}=,# a]{0,64}",
        proptest::collection::vec(any::<char>(), 0..700).prop_map(|v| v.into_iter().collect()),
    ]
}

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|c| c.parse().ok())
            .unwrap_or(256),
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config())]

    /// Whatever a label value holds, `/metrics` has one line per sample (nothing forged),
    /// and the value read back is the value capped.
    #[test]
    fn label_values_round_trip(function in hostile_string(), file in hostile_string()) {
        let m = Metrics::new(false);
        m.lua_self
            .get_or_create(&LuaFunctionLabels {
                function: LabelValue::from(function.clone()),
                file: LabelValue::from(file.clone()),
                line: LabelValue::fixed("1"),
                container: LabelValue::fixed(""),
                image: LabelValue::fixed(""),
            })
            .inc();
        let openmetrics = m.encode().expect("encode");
        for text in [openmetrics.clone(), to_prometheus_text(&openmetrics)] {
            let samples: Vec<&str> = text
                .lines()
                .filter(|l| l.starts_with("apisix_profiler_lua_function_self_samples"))
                .collect();
            prop_assert_eq!(samples.len(), 1, "{}", text);
            for line in text.lines() {
                prop_assert!(
                    line.starts_with('#') || line.starts_with("apisix_profiler_"),
                    "forged line {:?}", line
                );
            }
            let want = LabelValue::from(function.clone());
            prop_assert_eq!(label_value(samples[0], "function"), Some(want.as_str().to_owned()));
            let want = LabelValue::from(file.clone());
            prop_assert_eq!(label_value(samples[0], "file"), Some(want.as_str().to_owned()));
        }
    }

    /// A capped value is a prefix of the original plus the marker, within the cap.
    #[test]
    fn label_values_are_capped(s in hostile_string()) {
        let v = LabelValue::from(s.clone());
        let v = v.as_str();
        if s.len() <= MAX_LABEL_VALUE_BYTES {
            prop_assert_eq!(v, s.as_str());
        } else {
            let kept = v.strip_suffix(TRUNCATED).expect("marker");
            prop_assert!(s.starts_with(kept));
            prop_assert!(kept.len() <= MAX_LABEL_VALUE_BYTES);
            prop_assert!(kept.len() + 4 > MAX_LABEL_VALUE_BYTES);
        }
    }

    /// Invalid UTF-8 from a target is replaced, never passed on.
    #[test]
    fn label_values_from_bytes(b in proptest::collection::vec(any::<u8>(), 0..700)) {
        let v = LabelValue::from_bytes(&b);
        prop_assert!(v.as_str().len() <= MAX_LABEL_VALUE_BYTES + TRUNCATED.len());
        if let Ok(s) = std::str::from_utf8(&b) && s.len() <= MAX_LABEL_VALUE_BYTES {
            prop_assert_eq!(v.as_str(), s);
        }
    }

    /// A Lua string of any length and bytes decodes to bounded text, marked when cut.
    #[test]
    fn lua_strings_decode_bounded(
        data in proptest::collection::vec(any::<u8>(), 0..(MAX_STR as usize + 64)),
        extra in 0u32..10_000,
    ) {
        let len = u32::try_from(data.len()).expect("small") + extra;
        let s = decode_str(&data, len);
        prop_assert!(s.len() <= 3 * MAX_STR as usize + TRUNCATED.len());
        prop_assert_eq!(s.ends_with(TRUNCATED), len > MAX_STR || (data.len() as u64) < u64::from(len));
        if extra == 0 && data.len() <= MAX_STR as usize && let Ok(text) = std::str::from_utf8(&data) {
            prop_assert_eq!(s.as_str(), text);
        }
    }

    /// Any maps text parses without panicking, into executable file mappings only.
    #[test]
    fn maps_text_never_panics(text in "([0-9a-f\\- :rwxps/()a-z]{0,80}\n){0,20}") {
        for m in parse_maps(&text) {
            prop_assert!(m.range.start < m.range.end);
            prop_assert!(m.path.starts_with('/'));
            prop_assert!(m.inode != 0);
        }
    }

    /// Well-formed maps lines come back field for field, the path whole (spaces, quotes,
    /// newlines cannot be in it: the kernel escapes a newline as `\012`).
    #[test]
    fn maps_lines_round_trip(
        start in 0u64..(1 << 46),
        len in 1u64..(1 << 30),
        offset in 0u64..(1 << 40),
        major in 0u32..4096,
        minor in 0u32..256,
        inode in 1u64..u64::MAX,
        path in "/[a-zA-Z0-9 ._\"\\\\-]{0,40}[a-z]",
    ) {
        let line = format!(
            "{start:x}-{:x} r-xp {offset:08x} {major:02x}:{minor:02x} {inode} {path}\n",
            start + len
        );
        let maps = parse_maps(&line);
        prop_assert_eq!(maps.len(), 1);
        let m = &maps[0];
        prop_assert_eq!(m.range.clone(), start..start + len);
        prop_assert_eq!(m.offset, offset);
        prop_assert_eq!(m.dev, (major, minor));
        prop_assert_eq!(m.inode, inode);
        let want = path.split_ascii_whitespace().collect::<Vec<_>>().join(" ");
        prop_assert_eq!(&m.path, &want);
    }

    /// Any bytes, and a real ELF file with bytes flipped, are inspected without panicking.
    #[test]
    fn elf_inspection_never_panics(
        junk in proptest::collection::vec(any::<u8>(), 0..4096),
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..32),
    ) {
        let _ = inspect(&junk);
        let mut elf = std::fs::read("/bin/true").expect("read /bin/true");
        for (at, byte) in flips {
            let i = at.index(elf.len());
            elf[i] = byte;
        }
        let _ = inspect(&elf);
    }
}
