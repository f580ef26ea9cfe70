//! Retaining paths of a heap snapshot, interned as a tree: each path is its parent's id plus
//! one label (a table key, escaped and cut, or a bracketed kind of edge such as `[array]` or
//! `[upvalue NAME]`). Bounded in count (a full tree gives the parent's path, counted) and in
//! depth (a path at the depth limit stays there: a linked list a million links long is one
//! path, not a million).
//!
//! Hooks: none. Metrics: none; [`Paths::full`] and [`Paths::deep`] go into the report.

use std::{collections::HashMap, sync::Arc};

/// Id of the empty path (the roots' parent).
pub const ROOT: u32 = 0;

/// The interned paths of one snapshot.
#[derive(Debug)]
pub struct Paths {
    nodes: Vec<(u32, Arc<str>, u16)>,
    index: HashMap<(u32, Arc<str>), u32>,
    max: usize,
    max_depth: u16,
    /// Labels not added because the tree was full.
    pub full: u64,
    /// Labels not added because the path was at the depth limit.
    pub deep: u64,
}

impl Paths {
    /// An empty tree of at most `max` paths, each at most `max_depth` labels long.
    pub fn new(max: usize, max_depth: u16) -> Self {
        Self {
            nodes: vec![(ROOT, Arc::from(""), 0)],
            index: HashMap::new(),
            max: max.max(1),
            max_depth,
            full: 0,
            deep: 0,
        }
    }

    /// The path `parent` then `label`.
    pub fn child(&mut self, parent: u32, label: &str) -> u32 {
        let Some(&(_, _, depth)) = self.nodes.get(parent as usize) else {
            return ROOT;
        };
        if depth >= self.max_depth {
            self.deep += 1;
            return parent;
        }
        let label: Arc<str> = Arc::from(label);
        if let Some(&id) = self.index.get(&(parent, label.clone())) {
            return id;
        }
        if self.nodes.len() >= self.max {
            self.full += 1;
            return parent;
        }
        let id = self.nodes.len() as u32;
        self.nodes.push((parent, label.clone(), depth + 1));
        self.index.insert((parent, label), id);
        id
    }

    /// The labels of path `id`, root first.
    pub fn labels(&self, id: u32) -> Vec<Arc<str>> {
        let mut out = Vec::new();
        let mut at = id;
        while at != ROOT {
            let Some((parent, label, _)) = self.nodes.get(at as usize) else {
                break;
            };
            out.push(label.clone());
            at = *parent;
        }
        out.reverse();
        out
    }

    /// Paths held.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether only the empty path is held.
    pub fn is_empty(&self) -> bool {
        self.nodes.len() == 1
    }
}

/// A table key (or upvalue name) as a path label: printable ASCII kept, `;`, `\`, control
/// and non-ASCII bytes as `\xNN`, a leading `[` escaped (bracketed labels are the walker's
/// own), at most `max` bytes of the key then `…` when cut (`complete` false: the key was
/// already cut when read).
pub fn escape_key(bytes: &[u8], complete: bool, max: usize) -> String {
    if bytes.is_empty() && complete {
        return "\"\"".to_owned();
    }
    let mut out = String::with_capacity(bytes.len().min(max) + 4);
    for (i, &b) in bytes.iter().take(max).enumerate() {
        match b {
            b'[' if i == 0 => out.push_str("\\x5b"),
            b';' | b'\\' => out.push_str(&format!("\\x{b:02x}")),
            0x20..=0x7e => out.push(b as char),
            _ => out.push_str(&format!("\\x{b:02x}")),
        }
    }
    if !complete || bytes.len() > max {
        out.push('…');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_interned_and_bounded() {
        let mut p = Paths::new(4, 2);
        let a = p.child(ROOT, "registry");
        let b = p.child(a, "_LOADED");
        assert_eq!(p.child(ROOT, "registry"), a);
        assert_eq!(p.labels(b).join(";"), "registry;_LOADED");
        // Depth 2 reached: the path stays.
        assert_eq!(p.child(b, "deeper"), b);
        assert_eq!(p.deep, 1);
        let c = p.child(a, "x");
        // Full (4 with the root): the parent's path.
        assert_eq!(p.child(a, "y"), a);
        assert_eq!((p.full, p.len()), (1, 4));
        assert_eq!(p.labels(c).join(";"), "registry;x");
        assert_eq!(p.child(999, "z"), ROOT);
    }

    #[test]
    fn keys_are_escaped_and_cut() {
        assert_eq!(
            escape_key(b"apisix.plugins.limit-count", true, 64),
            "apisix.plugins.limit-count"
        );
        assert_eq!(
            escape_key(b"a;b\\c\n\xff", true, 64),
            "a\\x3bb\\x5cc\\x0a\\xff"
        );
        assert_eq!(escape_key(b"[hash]", true, 64), "\\x5bhash]");
        assert_eq!(escape_key(b"abcdef", true, 3), "abc…");
        assert_eq!(escape_key(b"abc", false, 64), "abc…");
        assert_eq!(escape_key(b"", true, 64), "\"\"");
    }
}
