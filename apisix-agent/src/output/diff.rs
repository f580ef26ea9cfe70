//! The per-path difference of two profiles given as folded stacks (two heap snapshots, or
//! any two folded files): collapsed as `stack BEFORE AFTER` lines (the two-column format
//! of `difffolded.pl`, which inferno and flamegraph.pl render), or an SVG differential flame
//! graph whose widths are the second profile and whose colours are the change: growth red,
//! shrinkage blue. The `diff` command reads two files with it.
//!
//! Inputs are bounded ([`MAX_INPUT`] bytes each); lines that are not folded stacks are
//! counted ([`Diff::bad_lines`]), not fatal.
//!
//! Hooks: none (file reads for the `diff` command). Metrics: none.

use std::{
    collections::BTreeMap,
    io::{self, Read},
    path::{Path, PathBuf},
};

use super::fold::Folded;

/// Largest input read.
pub const MAX_INPUT: u64 = 512 << 20;

/// Output format of a diff.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DiffFormat {
    Svg,
    Collapsed,
}

/// Why a diff failed.
#[derive(Debug, thiserror::Error)]
pub enum DiffError {
    #[error("reading {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} is larger than {MAX_INPUT} bytes")]
    TooLarge { path: PathBuf },
    #[error("writing the diff")]
    Write {
        #[source]
        source: io::Error,
    },
}

/// Two profiles by stack: (before, after).
#[derive(Debug, Default, Clone)]
pub struct Diff {
    stacks: BTreeMap<String, (u64, u64)>,
    /// Lines of either input that were not folded stacks.
    pub bad_lines: usize,
}

impl Diff {
    /// The difference from `before` to `after`.
    pub fn new(before: &Folded, after: &Folded) -> Self {
        let mut stacks: BTreeMap<String, (u64, u64)> = BTreeMap::new();
        for (side, f) in [(0, before), (1, after)] {
            for line in f.lines() {
                let Some((stack, n)) = line.rsplit_once(' ') else {
                    continue;
                };
                let n: u64 = n.parse().unwrap_or(0);
                let e = stacks.entry(stack.to_owned()).or_default();
                if side == 0 {
                    e.0 += n;
                } else {
                    e.1 += n;
                }
            }
        }
        Self {
            stacks,
            bad_lines: 0,
        }
    }

    /// The difference between two folded texts.
    pub fn parse(before: &str, after: &str) -> Self {
        let (b, bad_b) = Folded::parse(before);
        let (a, bad_a) = Folded::parse(after);
        let mut d = Self::new(&b, &a);
        d.bad_lines = bad_b + bad_a;
        d
    }

    /// Every stack with its (before, after) weights, sorted by stack.
    pub fn iter(&self) -> impl Iterator<Item = (&str, u64, u64)> {
        self.stacks.iter().map(|(s, (b, a))| (s.as_str(), *b, *a))
    }

    /// Sum of the growths of the stacks that grew.
    pub fn grown(&self) -> u64 {
        self.iter().map(|(_, b, a)| a.saturating_sub(b)).sum()
    }

    /// The `stack BEFORE AFTER` lines, sorted.
    pub fn lines(&self) -> Vec<String> {
        self.iter()
            .map(|(s, b, a)| format!("{s} {b} {a}"))
            .collect()
    }

    /// Writes [`Diff::lines`].
    pub fn write_collapsed(&self, mut w: impl io::Write) -> io::Result<()> {
        for l in self.lines() {
            writeln!(w, "{l}")?;
        }
        Ok(())
    }

    /// Renders the differential flame graph: widths of the second profile, growth red.
    pub fn write_svg(&self, title: &str, unit: &str, w: impl io::Write) -> io::Result<()> {
        let mut opts = inferno::flamegraph::Options::default();
        opts.title = title.to_owned();
        opts.count_name = unit.to_owned();
        opts.deterministic = true;
        let mut lines = self.lines();
        // Stacks only in the first profile have no width: drawn as nothing, and inferno
        // refuses an input where everything is so.
        lines.retain(|l| !l.ends_with(" 0"));
        if lines.is_empty() {
            lines.push("[no difference] 0 1".to_owned());
        }
        inferno::flamegraph::from_lines(&mut opts, lines.iter().map(String::as_str), w)
            .map_err(io::Error::other)
    }
}

fn read_bounded(path: &Path) -> Result<String, DiffError> {
    let read = |source| DiffError::Read {
        path: path.to_owned(),
        source,
    };
    let f = std::fs::File::open(path).map_err(read)?;
    let mut text = String::new();
    f.take(MAX_INPUT + 1)
        .read_to_string(&mut text)
        .map_err(read)?;
    if text.len() as u64 > MAX_INPUT {
        return Err(DiffError::TooLarge {
            path: path.to_owned(),
        });
    }
    Ok(text)
}

/// The `diff` command: reads two folded files, writes their difference in `format` to
/// `output` (standard output without one). Returns the diff (for its counts).
pub fn diff_files(
    before: &Path,
    after: &Path,
    format: DiffFormat,
    output: Option<&Path>,
) -> Result<Diff, DiffError> {
    let d = Diff::parse(&read_bounded(before)?, &read_bounded(after)?);
    let write = |w: &mut dyn io::Write| match format {
        DiffFormat::Collapsed => d.write_collapsed(w),
        DiffFormat::Svg => {
            let title = format!("{} → {}", before.display(), after.display());
            d.write_svg(&title, "bytes", w)
        }
    };
    let result = match output {
        Some(p) => std::fs::File::create(p)
            .map(io::BufWriter::new)
            .and_then(|mut f| write(&mut f).and_then(|()| io::Write::flush(&mut f))),
        None => write(&mut io::stdout().lock()),
    };
    result.map_err(|source| DiffError::Write { source })?;
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn diff_pairs_stacks_and_renders_growth() {
        let before = "registry;_LOADED;m;cache;table 100\nregistry;x;string 50\ngone;table 7\n";
        let after =
            "registry;_LOADED;m;cache;table 900\nregistry;x;string 40\nnew;string 5\nnot a line\n";
        let d = Diff::parse(before, after);
        assert_eq!(d.bad_lines, 1);
        assert_eq!(
            d.lines(),
            vec![
                "gone;table 7 0",
                "new;string 0 5",
                "registry;_LOADED;m;cache;table 100 900",
                "registry;x;string 50 40",
            ]
        );
        assert_eq!(d.grown(), 805);
        let mut svg = Vec::new();
        d.write_svg("t", "bytes", &mut svg).expect("svg");
        let svg = String::from_utf8(svg).expect("utf8");
        assert!(svg.contains("cache") && svg.contains("<svg"), "{svg}");
        // Nothing in common, nothing at all: still a graph.
        let mut svg = Vec::new();
        Diff::parse("", "")
            .write_svg("t", "bytes", &mut svg)
            .expect("empty");
        assert!(!svg.is_empty());
    }

    #[test]
    fn files_are_read_and_written() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (a, b, out) = (
            dir.path().join("a"),
            dir.path().join("b"),
            dir.path().join("out"),
        );
        std::fs::write(&a, "x;table 1\n").expect("write");
        std::fs::write(&b, "x;table 3\n").expect("write");
        let d = diff_files(&a, &b, DiffFormat::Collapsed, Some(&out)).expect("diff");
        assert_eq!(d.grown(), 2);
        assert_eq!(
            std::fs::read_to_string(&out).expect("read"),
            "x;table 1 3\n"
        );
        assert!(matches!(
            diff_files(&dir.path().join("missing"), &b, DiffFormat::Svg, Some(&out)),
            Err(DiffError::Read { .. })
        ));
    }
}
