//! Aggregation of named stacks into folded text (`root;…;leaf COUNT`, one line per distinct
//! stack, sorted), the exchange format of every output, and SVG rendering of folded text with
//! inferno.
//!
//! Hooks: none. Metrics: none.

use std::{collections::HashMap, io, sync::Arc};

/// Frame labels must not contain the separators of the folded format.
pub fn clean_label(label: &str) -> String {
    label
        .chars()
        .map(|c| match c {
            ';' => ':',
            '\n' | '\r' | '\t' => ' ',
            c => c,
        })
        .collect()
}

/// Counts of distinct stacks, each root first.
#[derive(Debug, Default, Clone)]
pub struct Folded {
    counts: HashMap<Vec<Arc<str>>, u64>,
    total: u64,
}

impl Folded {
    /// An empty aggregate.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `weight` to a stack given root first.
    pub fn add(&mut self, stack: Vec<Arc<str>>, weight: u64) {
        if stack.is_empty() || weight == 0 {
            return;
        }
        *self.counts.entry(stack).or_insert(0) += weight;
        self.total += weight;
    }

    /// Parses folded text (`root;…;leaf COUNT` per line); returns the lines it could not
    /// read along with the aggregate.
    pub fn parse(text: &str) -> (Self, usize) {
        let mut f = Self::new();
        let mut bad = 0;
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            match line
                .rsplit_once(' ')
                .map(|(s, n)| (s, n.trim().parse::<u64>()))
            {
                Some((stack, Ok(n))) if !stack.is_empty() => {
                    f.add(stack.split(';').map(Arc::from).collect(), n);
                }
                _ => bad += 1,
            }
        }
        (f, bad)
    }

    /// The distinct stacks (root first) and their weights, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (&[Arc<str>], u64)> {
        self.counts.iter().map(|(s, n)| (s.as_slice(), *n))
    }

    /// Sum of all weights.
    pub fn total(&self) -> u64 {
        self.total
    }

    /// The folded lines, sorted.
    pub fn lines(&self) -> Vec<String> {
        let mut lines: Vec<String> = self
            .counts
            .iter()
            .map(|(stack, n)| {
                let frames: Vec<String> = stack.iter().map(|f| clean_label(f)).collect();
                format!("{} {n}", frames.join(";"))
            })
            .collect();
        lines.sort_unstable();
        lines
    }

    /// Writes the folded text.
    pub fn write_folded(&self, mut w: impl io::Write) -> io::Result<()> {
        for line in self.lines() {
            writeln!(w, "{line}")?;
        }
        Ok(())
    }

    /// Renders an SVG flame graph titled `title`, weights counted as samples.
    pub fn write_svg(&self, title: &str, w: impl io::Write) -> io::Result<()> {
        self.write_svg_unit(title, "samples", w)
    }

    /// Renders an SVG flame graph titled `title` whose weights are in `unit`.
    pub fn write_svg_unit(&self, title: &str, unit: &str, w: impl io::Write) -> io::Result<()> {
        let lines = self.lines();
        let mut opts = inferno::flamegraph::Options::default();
        opts.title = title.to_owned();
        opts.count_name = unit.to_owned();
        // Colours from a hash of the name: the same function keeps its colour across graphs.
        opts.hash = true;
        opts.deterministic = true;
        if lines.is_empty() {
            // inferno refuses empty input; show an explicit empty graph instead.
            let empty = ["[no samples] 1".to_owned()];
            return inferno::flamegraph::from_lines(&mut opts, empty.iter().map(String::as_str), w)
                .map_err(io::Error::other);
        }
        inferno::flamegraph::from_lines(&mut opts, lines.iter().map(String::as_str), w)
            .map_err(io::Error::other)
    }

    /// The stacks as a tree, `{"name","value","children":[…]}` from a `root` node, children
    /// sorted by name (the d3-flame-graph format).
    pub fn to_json(&self) -> serde_json::Value {
        #[derive(Default)]
        struct Node {
            value: u64,
            children: std::collections::BTreeMap<String, Node>,
        }
        fn emit(name: &str, node: &Node) -> serde_json::Value {
            let children: Vec<serde_json::Value> =
                node.children.iter().map(|(n, c)| emit(n, c)).collect();
            serde_json::json!({"name": name, "value": node.value, "children": children})
        }
        let mut root = Node::default();
        for (stack, n) in &self.counts {
            root.value += n;
            let mut node = &mut root;
            for frame in stack {
                node = node.children.entry(frame.to_string()).or_default();
                node.value += n;
            }
        }
        emit("root", &root)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn st(frames: &[&str]) -> Vec<Arc<str>> {
        frames.iter().map(|f| Arc::from(*f)).collect()
    }

    #[test]
    fn folds_and_sorts() {
        let mut f = Folded::new();
        f.add(st(&["main", "b"]), 2);
        f.add(st(&["main", "a"]), 1);
        f.add(st(&["main", "b"]), 3);
        f.add(st(&[]), 7);
        assert_eq!(f.lines(), vec!["main;a 1", "main;b 5"]);
        assert_eq!(f.total(), 6);
    }

    #[test]
    fn separators_in_labels_are_replaced() {
        let mut f = Folded::new();
        f.add(st(&["main", "a;b c\nd"]), 1);
        assert_eq!(f.lines(), vec!["main;a:b c d 1"]);
    }

    #[test]
    fn svg_golden() {
        let mut f = Folded::new();
        f.add(st(&["main", "outer", "middle", "leaf"]), 9);
        f.add(st(&["main", "outer", "other"]), 1);
        let mut svg = Vec::new();
        f.write_svg("golden", &mut svg).expect("render");
        let svg = String::from_utf8(svg).expect("utf8");
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/golden.svg");
        if std::env::var_os("UPDATE_GOLDEN").is_some() {
            std::fs::write(path, &svg).expect("write golden");
        }
        let golden = std::fs::read_to_string(path).expect("read golden");
        assert_eq!(
            svg, golden,
            "SVG differs from {path} (UPDATE_GOLDEN=1 rewrites it)"
        );
    }

    #[test]
    fn parse_round_trips() {
        let (f, bad) = Folded::parse("main;a 2\nmain;b 3\n\nbroken line\nmain;a 1\n");
        assert_eq!(bad, 1);
        assert_eq!(f.lines(), vec!["main;a 3", "main;b 3"]);
    }

    #[test]
    fn json_tree_sums_children() {
        let mut f = Folded::new();
        f.add(st(&["main", "a"]), 2);
        f.add(st(&["main", "b"]), 3);
        let j = f.to_json();
        assert_eq!(j["value"], 5);
        assert_eq!(j["children"][0]["name"], "main");
        assert_eq!(j["children"][0]["value"], 5);
        assert_eq!(j["children"][0]["children"][1]["name"], "b");
        assert_eq!(j["children"][0]["children"][1]["value"], 3);
    }

    #[test]
    fn empty_svg_is_valid() {
        let mut svg = Vec::new();
        Folded::new().write_svg("empty", &mut svg).expect("render");
        assert!(String::from_utf8_lossy(&svg).contains("[no samples]"));
    }
}
