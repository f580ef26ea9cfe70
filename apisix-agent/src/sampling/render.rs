//! The one renderer of a request's result ([`super::request::Format`]): an SVG flame graph,
//! folded stacks, a JSON tree with each stack's plugin and phase, or a gzip-compressed pprof
//! profile. `record` writes its bytes to a file, `/flamegraph` answers with them; the
//! daemon's window of recent stacks is rendered by the same [`folded`].
//!
//! Hooks: none (CPU only: callers run it off their async workers). Metrics: none.

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, SystemTime},
};

use super::{
    capture::Capture,
    request::{Format, Request},
};
use crate::{
    attribution::{self, Filter, Rules},
    output::{
        Folded,
        pprof::{self, Detailed},
    },
};

/// A rendered result: its bytes and their media type.
#[derive(Debug, Clone)]
pub struct Rendered {
    pub content_type: &'static str,
    pub body: Vec<u8>,
}

/// Why nothing could be rendered.
#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    #[error("writing {format}: {source}")]
    Write {
        format: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("pprof profiles need the frame details of a capture (or of the daemon's window)")]
    PprofFromFolded,
}

/// The labels of a process in pprof samples: container, image and process name.
pub type ProcessLabels = HashMap<u32, [String; 3]>;

/// `title` with what `filter` kept, or that it kept nothing (of `total`).
pub fn filtered_title(title: &str, filter: &Filter, total: u64) -> String {
    if filter.is_empty() {
        title.to_owned()
    } else if total == 0 {
        format!("{title} — {}: no samples matched", filter.describe())
    } else {
        format!("{title} — {}", filter.describe())
    }
}

/// Renders `folded` (already filtered) as `format` under `title`, weights in `unit`.
pub fn folded(
    folded: &Folded,
    format: Format,
    title: &str,
    unit: &str,
    rules: &Rules,
) -> Result<Rendered, RenderError> {
    write_as(
        format,
        |body| folded.write_svg_unit(title, unit, body),
        |body| folded.write_folded(body),
        || {
            serde_json::json!({
                "title": title,
                "unit": unit,
                "total": folded.total(),
                "root": folded.to_json(),
                "stacks": stacks_json(folded, rules),
            })
        },
    )
}

/// The one mapping of a stack format to its content type and body, for every renderer of
/// stacks alone (folded stacks, heap diffs): `svg` and `collapsed` write their format, `json`
/// builds the document. pprof needs frame details, which stacks alone do not have.
pub fn write_as(
    format: Format,
    svg: impl FnOnce(&mut Vec<u8>) -> std::io::Result<()>,
    collapsed: impl FnOnce(&mut Vec<u8>) -> std::io::Result<()>,
    json: impl FnOnce() -> serde_json::Value,
) -> Result<Rendered, RenderError> {
    let write = |source| RenderError::Write {
        format: format.name(),
        source,
    };
    let mut body = Vec::new();
    let content_type = match format {
        Format::Svg => {
            svg(&mut body).map_err(write)?;
            "image/svg+xml"
        }
        Format::Collapsed => {
            collapsed(&mut body).map_err(write)?;
            "text/plain; charset=utf-8"
        }
        Format::Json => {
            serde_json::to_writer(&mut body, &json()).map_err(|e| write(e.into()))?;
            "application/json"
        }
        Format::Pprof => return Err(RenderError::PprofFromFolded),
    };
    Ok(Rendered { content_type, body })
}

/// A capture's stacks: folded, and per process with their frame details (for pprof).
#[derive(Debug, Clone, Copy)]
pub struct Stacks<'a> {
    pub folded: &'a Folded,
    pub detailed: &'a Detailed<u32>,
    /// How long they were sampled.
    pub elapsed: Duration,
}

impl<'a> From<&'a Capture> for Stacks<'a> {
    fn from(cap: &'a Capture) -> Self {
        Stacks {
            folded: &cap.folded,
            detailed: &cap.detailed,
            elapsed: cap.elapsed,
        }
    }
}

/// Renders a capture as `req` asks: its stacks that pass `req.filter`, titled `title` (the
/// filter is added to it), pprof samples labelled from `labels`.
pub fn capture(
    cap: Stacks<'_>,
    req: &Request,
    title: &str,
    rules: &Rules,
    labels: &ProcessLabels,
) -> Result<Rendered, RenderError> {
    if req.format != Format::Pprof {
        let kept = req.filter.apply(rules, cap.folded);
        let title = filtered_title(title, &req.filter, kept.total());
        return folded(&kept, req.format, &title, req.mode.unit(), rules);
    }
    let mut b = pprof::ProfileBuilder::new(req.pprof_kind(req.frequency));
    b.comment(&filtered_title(title, &req.filter, cap.folded.total()));
    let mut verdicts: HashMap<&[Arc<str>], Option<attribution::Attribution>> = HashMap::new();
    let none = [String::new(), String::new(), String::new()];
    for (pid, stack, details, count, weight) in cap.detailed.iter() {
        let Some(a) = verdicts
            .entry(stack)
            .or_insert_with(|| {
                let a = rules.classify(stack);
                req.filter.keeps(&a).then_some(a)
            })
            .as_ref()
        else {
            continue;
        };
        let [container, image, process] = labels.get(pid).unwrap_or(&none);
        let labels = sample_labels([container, image, process], a);
        b.add(stack, details, &labels, count, weight);
    }
    let now = SystemTime::now();
    let start = now.checked_sub(cap.elapsed).unwrap_or(now);
    let body = pprof::gzip(&b.build(start, cap.elapsed)).map_err(|source| RenderError::Write {
        format: "pprof",
        source,
    })?;
    Ok(Rendered {
        content_type: "application/octet-stream",
        body,
    })
}

/// The labels of a pprof sample: its process's container, image and name, and its plugin
/// and phase.
pub fn sample_labels<'a>(
    [container, image, process]: [&'a str; 3],
    a: &'a attribution::Attribution,
) -> [(&'static str, &'a str); 5] {
    [
        ("container", container),
        ("image", image),
        ("process", process),
        ("plugin", a.plugin.as_str()),
        ("phase", a.phase.name()),
    ]
}

/// Each distinct stack with its weight, plugin and phase, heaviest first.
fn stacks_json(folded: &Folded, rules: &Rules) -> serde_json::Value {
    let mut v: Vec<(&[Arc<str>], u64)> = folded.iter().collect();
    v.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(b.0)));
    v.into_iter()
        .map(|(stack, n)| {
            let a = rules.classify(stack);
            let frames: Vec<&str> = stack.iter().map(|f| &**f).collect();
            serde_json::json!({
                "frames": frames,
                "value": n,
                "plugin": a.plugin,
                "phase": a.phase.name(),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Folded {
        let mut f = Folded::new();
        f.add(vec!["main".into(), "work".into()], 3);
        f.add(vec!["main".into(), "idle".into()], 1);
        f
    }

    #[test]
    fn every_folded_format() {
        let rules = Rules::default();
        let svg = folded(&sample(), Format::Svg, "t", "samples", &rules)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(svg.content_type, "image/svg+xml");
        assert!(String::from_utf8_lossy(&svg.body).contains("<svg"));
        let text = folded(&sample(), Format::Collapsed, "t", "samples", &rules)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            String::from_utf8_lossy(&text.body),
            "main;idle 1\nmain;work 3\n"
        );
        let json = folded(&sample(), Format::Json, "t", "samples", &rules)
            .unwrap_or_else(|e| panic!("{e}"));
        let v: serde_json::Value =
            serde_json::from_slice(&json.body).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(v["total"], 4);
        assert_eq!(v["stacks"][0]["value"], 3);
        assert!(matches!(
            folded(&sample(), Format::Pprof, "t", "samples", &rules),
            Err(RenderError::PprofFromFolded)
        ));
    }

    #[test]
    fn titles_say_what_the_filter_kept() {
        let f = Filter {
            plugin: Some("cors".into()),
            phase: None,
        };
        assert_eq!(filtered_title("t", &Filter::default(), 0), "t");
        assert!(filtered_title("t", &f, 0).ends_with("no samples matched"));
        assert!(!filtered_title("t", &f, 3).ends_with("no samples matched"));
    }
}
