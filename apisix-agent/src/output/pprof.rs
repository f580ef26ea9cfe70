//! The pprof encoding of named stacks: a gzip-compressed `perftools.profiles.Profile`, what
//! Grafana Pyroscope (through Alloy's `pyroscope.scrape`), Parca and `go tool pprof` read.
//! The messages are the prost types of `lightswitch-proto` (generated from the upstream
//! `profile.proto`); this module only fills them.
//!
//! Frames map to `Function`s and `Location`s from their labels ([`classify`]) and their
//! [`FrameDetail`]s:
//! - Lua `NAME@FILE:LINE`: name = the whole label (it stays unique per function, as in the
//!   flame graphs: every APISIX plugin has an `_M.access`), system name = `NAME`, filename =
//!   the chunk, start line = `LINE`; the location's line is the frame's current line (0: unknown).
//! - A frame a JIT trace inlined becomes a `Line` of the location of the frame it was inlined
//!   into (innermost first, the physical frame last): pprof's convention for inlining.
//! - Native frames: the symbol (or `module+0x…`), filename = the module.
//! - Kernel frames keep their `_[k]` suffix and have filename `[kernel]`.
//! - Fast functions (`builtin:…`) have filename `[builtin]`; VM markers (`[lua:gc]`) none.
//!
//! Addresses are not exported: every location is already symbolized (address 0). Native and
//! kernel locations belong to a `Mapping` per module (`[kernel.kallsyms]` for the kernel),
//! marked as having functions, so no reader tries to symbolize them; Lua locations have none.
//! Identical (stack, labels) samples are merged. String 0 is "", ids are 1, 2, 3… in table
//! order (Parca checks that).
//!
//! Hooks: none. Metrics: none.

use std::{
    collections::HashMap,
    hash::Hash,
    io::{self, Write as _},
    sync::Arc,
    time::{Duration, SystemTime},
};

pub use lightswitch_proto::profile::pprof::Profile;
use lightswitch_proto::profile::pprof::{
    Function, Label, Line, Location, Mapping, Sample, ValueType,
};
use prost::Message as _;

use super::Folded;
use crate::label::{FrameClass, FrameDetail, ModuleId, classify};

/// The mapping of kernel frames (the name `perf` and Parca give the kernel).
const KERNEL_MAPPING: &str = "[kernel.kallsyms]";

/// What the samples of a profile measure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// CPU samples taken every `period_nanos` of CPU time (1e9 / Hz): sample types
    /// `samples/count` and `cpu/nanoseconds`. A stack's weight is its sample count.
    Cpu { period_nanos: u64 },
    /// Blocked time: sample types `blocks/count` and `offcpu/nanoseconds`. A stack's weight
    /// is microseconds blocked.
    OffCpu,
    /// Lua heap allocations sampled every `sample_bytes` on average: sample types
    /// `alloc_samples/count` (sampled allocator calls, not objects) and `alloc_space/bytes`,
    /// period `space/bytes` = `sample_bytes`. A stack's weight is allocated bytes.
    Alloc { sample_bytes: u64 },
    /// The sampled Lua heap blocks still allocated at the end of a capture: sample types
    /// `inuse_samples/count` and `inuse_space/bytes`, period as [`Kind::Alloc`]. A stack's
    /// weight is live bytes.
    Live { sample_bytes: u64 },
}

impl Kind {
    /// CPU samples at `hz` per CPU.
    pub fn cpu(hz: u64) -> Self {
        Kind::Cpu {
            period_nanos: 1_000_000_000 / hz.max(1),
        }
    }
}

/// Distinct stacks (root first) with their frame details and an owner `K` (a process, a
/// target's labels), each with an event count and a weight: what a profile is built from,
/// like [`Folded`] but keeping what pprof shows besides the labels.
#[derive(Debug, Clone)]
pub struct Detailed<K> {
    counts: HashMap<DetailedKey<K>, (u64, u64)>,
    total: u64,
}

type DetailedKey<K> = (K, Vec<Arc<str>>, Vec<FrameDetail>);

impl<K> Default for Detailed<K> {
    fn default() -> Self {
        Self {
            counts: HashMap::new(),
            total: 0,
        }
    }
}

impl<K: Hash + Eq + Clone> Detailed<K> {
    /// An empty aggregate.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds one event of `weight` for a stack of `owner`. `details` has one entry per frame
    /// (or none).
    pub fn add(&mut self, owner: K, stack: Vec<Arc<str>>, details: Vec<FrameDetail>, weight: u64) {
        if stack.is_empty() || weight == 0 {
            return;
        }
        let e = self.counts.entry((owner, stack, details)).or_insert((0, 0));
        e.0 += 1;
        e.1 += weight;
        self.total += weight;
    }

    /// Sum of all weights.
    pub fn total(&self) -> u64 {
        self.total
    }

    /// Each distinct (owner, stack, details) with its event count and weight.
    pub fn iter(&self) -> impl Iterator<Item = (&K, &[Arc<str>], &[FrameDetail], u64, u64)> {
        self.counts
            .iter()
            .map(|((k, s, d), (n, w))| (k, s.as_slice(), d.as_slice(), *n, *w))
    }

    /// The stacks by labels alone, weights summed.
    pub fn folded(&self) -> Folded {
        let mut f = Folded::new();
        for ((_, stack, _), (_, w)) in &self.counts {
            f.add(stack.clone(), *w);
        }
        f
    }
}

type SampleKey = (Vec<u64>, Vec<(i64, i64)>);

/// Maps hashed with foldhash (already a dependency through hashbrown): SipHash made interning
/// the frames of a 60 s window several times slower.
type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct FunctionKey {
    name: i64,
    system_name: i64,
    filename: i64,
    start_line: i64,
}

/// A frame label and its native module.
type FrameKey = (Arc<str>, Option<ModuleId>);

/// What a frame label (with its module) maps to: its function, mapping (0: none), and
/// whether its location line is the frame's current line (Lua functions) or `line`.
#[derive(Debug, Clone, Copy)]
struct FrameIds {
    function: u64,
    mapping: u64,
    line: u32,
    lua: bool,
}

/// Builds one profile: interns strings, functions and locations, merges samples.
#[derive(Debug)]
pub struct ProfileBuilder {
    kind: Kind,
    strings: FastMap<String, i64>,
    string_table: Vec<String>,
    /// (label, module) → ids: each distinct frame is classified once.
    frames: FastMap<FrameKey, FrameIds>,
    /// The same by the addresses of the (shared) strings, which the entry keeps alive so that
    /// no other string can take the address.
    by_address: FastMap<(usize, Option<ModuleId>), (FrameKey, FrameIds)>,
    functions: FastMap<FunctionKey, u64>,
    function: Vec<Function>,
    /// A location's (function id, line) pairs, innermost first → its id.
    locations: FastMap<Vec<(u64, i64)>, u64>,
    location: Vec<Location>,
    mappings: FastMap<String, u64>,
    mapping: Vec<Mapping>,
    /// (location ids, label (key, value) string ids) → index in `sample`.
    samples: FastMap<SampleKey, usize>,
    sample: Vec<Sample>,
    comments: Vec<i64>,
    /// Reused buffers of [`Self::add`].
    lines: Vec<(u64, i64)>,
    groups: Vec<(usize, u64)>,
    scratch: Vec<(u64, i64)>,
}

impl ProfileBuilder {
    /// An empty profile of `kind`.
    pub fn new(kind: Kind) -> Self {
        let mut me = Self {
            kind,
            strings: FastMap::default(),
            string_table: Vec::new(),
            frames: FastMap::default(),
            by_address: FastMap::default(),
            functions: FastMap::default(),
            function: Vec::new(),
            locations: FastMap::default(),
            location: Vec::new(),
            mappings: FastMap::default(),
            mapping: Vec::new(),
            samples: FastMap::default(),
            sample: Vec::new(),
            comments: Vec::new(),
            lines: Vec::new(),
            groups: Vec::new(),
            scratch: Vec::new(),
        };
        // pprof: string_table[0] must be "".
        me.string("");
        me
    }

    fn string(&mut self, s: &str) -> i64 {
        if let Some(&i) = self.strings.get(s) {
            return i;
        }
        let i = self.string_table.len() as i64;
        self.string_table.push(s.to_owned());
        self.strings.insert(s.to_owned(), i);
        i
    }

    /// Adds a comment line to the profile (`go tool pprof -comments`).
    pub fn comment(&mut self, text: &str) {
        let i = self.string(text);
        self.comments.push(i);
    }

    /// The mapping of module `file`.
    fn mapping(&mut self, file: &str) -> u64 {
        if let Some(&id) = self.mappings.get(file) {
            return id;
        }
        let id = self.mapping.len() as u64 + 1;
        let filename = self.string(file);
        self.mapping.push(Mapping {
            id,
            filename,
            has_functions: true,
            has_filenames: true,
            ..Mapping::default()
        });
        self.mappings.insert(file.to_owned(), id);
        id
    }

    /// The function and mapping of a frame label of native `module`. The stack builder
    /// shares each label among the stacks that hold it, so frames are mostly found by the
    /// label's address, else by its text.
    fn frame(&mut self, label: &Arc<str>, module: Option<ModuleId>) -> FrameIds {
        let address = (Arc::as_ptr(label).cast::<u8>() as usize, module);
        if let Some((_, ids)) = self.by_address.get(&address) {
            return *ids;
        }
        let ids = self.frame_by_content(label, module);
        self.by_address
            .insert(address, ((label.clone(), module), ids));
        ids
    }

    /// [`Self::frame`] by the label's and module's text, made on first sight.
    fn frame_by_content(&mut self, label: &Arc<str>, module: Option<ModuleId>) -> FrameIds {
        let key = (label.clone(), module);
        if let Some(ids) = self.frames.get(&key) {
            return *ids;
        }
        let module_name = module.and_then(ModuleId::name);
        let (name, system_name, filename, start_line, lua): (&str, &str, &str, u32, bool) =
            match classify(label) {
                FrameClass::Lua {
                    function,
                    file,
                    line,
                } if !file.is_empty() && file != "[builtin]" => {
                    let first = line.parse::<u32>().unwrap_or(0);
                    (label, function, file, first, true)
                }
                FrameClass::Lua { file, .. } => (label, label, file, 0, false),
                FrameClass::Kernel => (
                    label,
                    label.strip_suffix("_[k]").unwrap_or(label),
                    "[kernel]",
                    0,
                    false,
                ),
                FrameClass::C { .. } => {
                    (label, label, module_name.as_deref().unwrap_or(""), 0, false)
                }
            };
        let mapping = match classify(label) {
            FrameClass::Kernel => self.mapping(KERNEL_MAPPING),
            FrameClass::C { .. } if !filename.is_empty() => self.mapping(filename),
            _ => 0,
        };
        let fkey = FunctionKey {
            name: self.string(name),
            system_name: self.string(system_name),
            filename: self.string(filename),
            start_line: i64::from(start_line),
        };
        let next = self.function.len() as u64 + 1;
        let function = *self.functions.entry(fkey.clone()).or_insert(next);
        if function == next {
            self.function.push(Function {
                id: function,
                name: fkey.name,
                system_name: fkey.system_name,
                filename: fkey.filename,
                start_line: fkey.start_line,
            });
        }
        let ids = FrameIds {
            function,
            mapping,
            line: start_line,
            lua,
        };
        self.frames.insert(key, ids);
        ids
    }

    /// The location of `self.scratch`: a physical frame (of `mapping`) and the frames inlined
    /// into it, as (function id, line), innermost first.
    fn location(&mut self, mapping: u64) -> u64 {
        if let Some(&id) = self.locations.get(self.scratch.as_slice()) {
            return id;
        }
        let id = self.location.len() as u64 + 1;
        self.location.push(Location {
            id,
            mapping_id: mapping,
            line: self
                .scratch
                .iter()
                .map(|&(function_id, line)| Line {
                    function_id,
                    line,
                    ..Line::default()
                })
                .collect(),
            ..Location::default()
        });
        self.locations.insert(self.scratch.clone(), id);
        id
    }

    /// Adds `count` events of total `weight` of a stack given root first: `weight` is
    /// microseconds blocked for [`Kind::OffCpu`], bytes for [`Kind::Alloc`] and
    /// [`Kind::Live`], and unused for [`Kind::Cpu`] (its time is `count` periods). `details` has one entry per frame, or
    /// none (then lines come from the labels and nothing is inlined). Labels with an empty
    /// value are left out.
    pub fn add(
        &mut self,
        stack: &[Arc<str>],
        details: &[FrameDetail],
        labels: &[(&str, &str)],
        count: u64,
        weight: u64,
    ) {
        if stack.is_empty() || count == 0 {
            return;
        }
        let details = (details.len() == stack.len()).then_some(details);
        // Frames root first, each location a run of them: a physical frame, then the frames
        // inlined into it (an inlined frame joins the location of the frame below it).
        let mut lines = std::mem::take(&mut self.lines);
        let mut groups = std::mem::take(&mut self.groups);
        lines.clear();
        groups.clear();
        for (i, label) in stack.iter().enumerate() {
            let detail = details.map(|d| &d[i]);
            let ids = self.frame(label, detail.and_then(|d| d.module));
            // A Lua frame's line is its current line (0 when the builder could not find
            // it: unknown in pprof too); without details, the line its label names.
            let line = match detail {
                Some(d) if ids.lua => d.line,
                _ => ids.line,
            };
            if groups.is_empty() || !detail.is_some_and(|d| d.inlined) {
                groups.push((lines.len(), ids.mapping));
            }
            lines.push((ids.function, i64::from(line)));
        }
        // Samples list locations leaf first; a location's lines go innermost first.
        let mut location_ids = Vec::with_capacity(groups.len());
        for (k, &(start, mapping)) in groups.iter().enumerate().rev() {
            let end = groups.get(k + 1).map_or(lines.len(), |g| g.0);
            self.scratch.clear();
            self.scratch.extend(lines[start..end].iter().rev());
            location_ids.push(self.location(mapping));
        }
        self.lines = lines;
        self.groups = groups;
        let label_ids: Vec<(i64, i64)> = labels
            .iter()
            .filter(|(_, v)| !v.is_empty())
            .map(|(k, v)| (self.string(k), self.string(v)))
            .collect();
        let value = match self.kind {
            Kind::Cpu { period_nanos } => [count, count.saturating_mul(period_nanos)],
            Kind::OffCpu => [count, weight.saturating_mul(1000)],
            Kind::Alloc { .. } | Kind::Live { .. } => [count, weight],
        }
        .map(|v| i64::try_from(v).unwrap_or(i64::MAX));
        let key = (location_ids, label_ids);
        if let Some(&i) = self.samples.get(&key) {
            let s = &mut self.sample[i];
            s.value[0] = s.value[0].saturating_add(value[0]);
            s.value[1] = s.value[1].saturating_add(value[1]);
            return;
        }
        self.sample.push(Sample {
            location_id: key.0.clone(),
            value: value.to_vec(),
            label: key
                .1
                .iter()
                .map(|&(key, str)| Label {
                    key,
                    str,
                    ..Label::default()
                })
                .collect(),
        });
        self.samples.insert(key, self.sample.len() - 1);
    }

    /// Adds every stack of a folded CPU aggregate (labels only: lines from the labels,
    /// nothing inlined), each weight counting as that many samples. For [`Kind::Cpu`]; the
    /// weights of the other kinds are not event counts.
    pub fn add_folded(&mut self, folded: &Folded, labels: &[(&str, &str)]) {
        for (stack, w) in folded.iter() {
            self.add(stack, &[], labels, w, w);
        }
    }

    /// The profile of a window starting at `start` and lasting `duration`.
    pub fn build(mut self, start: SystemTime, duration: Duration) -> Profile {
        let (types, period_type, period): ([(&str, &str); 2], (&str, &str), u64) = match self.kind {
            Kind::Cpu { period_nanos } => (
                [("samples", "count"), ("cpu", "nanoseconds")],
                ("cpu", "nanoseconds"),
                period_nanos,
            ),
            Kind::OffCpu => (
                [("blocks", "count"), ("offcpu", "nanoseconds")],
                ("blocks", "count"),
                1,
            ),
            Kind::Alloc { sample_bytes } => (
                [("alloc_samples", "count"), ("alloc_space", "bytes")],
                ("space", "bytes"),
                sample_bytes,
            ),
            Kind::Live { sample_bytes } => (
                [("inuse_samples", "count"), ("inuse_space", "bytes")],
                ("space", "bytes"),
                sample_bytes,
            ),
        };
        let sample_type = types
            .iter()
            .map(|(t, u)| ValueType {
                r#type: self.string(t),
                unit: self.string(u),
            })
            .collect();
        let period_type = Some(ValueType {
            r#type: self.string(period_type.0),
            unit: self.string(period_type.1),
        });
        let default_sample_type = self.string(types[1].0);
        let time_nanos = start
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX));
        Profile {
            sample_type,
            sample: self.sample,
            mapping: self.mapping,
            location: self.location,
            function: self.function,
            string_table: self.string_table,
            time_nanos,
            duration_nanos: i64::try_from(duration.as_nanos()).unwrap_or(i64::MAX),
            period_type,
            period: period as i64,
            comment: self.comments,
            default_sample_type,
            ..Profile::default()
        }
    }
}

/// The profile as protobuf, gzip-compressed (what pprof endpoints serve).
pub fn gzip(profile: &Profile) -> io::Result<Vec<u8>> {
    let raw = profile.encode_to_vec();
    let mut gz = flate2::write::GzEncoder::new(
        Vec::with_capacity(raw.len() / 4),
        flate2::Compression::fast(),
    );
    gz.write_all(&raw)?;
    gz.finish()
}

/// Reads a gzip-compressed (or plain) profile back: for tests and benchmarks.
pub fn decode(bytes: &[u8]) -> Result<Profile, io::Error> {
    let raw = if bytes.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        io::Read::read_to_end(&mut flate2::read::GzDecoder::new(bytes), &mut out)?;
        out
    } else {
        bytes.to_vec()
    };
    Profile::decode(raw.as_slice()).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn st(frames: &[&str]) -> Vec<Arc<str>> {
        frames.iter().map(|f| Arc::from(*f)).collect()
    }

    fn d(line: u32, inlined: bool) -> FrameDetail {
        FrameDetail {
            line,
            module: None,
            inlined,
        }
    }

    fn module(m: &str) -> FrameDetail {
        FrameDetail {
            module: ModuleId::of(m),
            ..FrameDetail::default()
        }
    }

    fn s(p: &Profile, i: i64) -> &str {
        &p.string_table[usize::try_from(i).expect("index")]
    }

    fn function(p: &Profile, id: u64) -> &Function {
        p.function
            .iter()
            .find(|f| f.id == id)
            .unwrap_or_else(|| panic!("no function {id}"))
    }

    fn location(p: &Profile, id: u64) -> &Location {
        p.location
            .iter()
            .find(|l| l.id == id)
            .unwrap_or_else(|| panic!("no location {id}"))
    }

    /// Each location of a sample as its (function name, line) pairs, leaf first.
    fn frames(p: &Profile, sample: &Sample) -> Vec<Vec<(String, i64)>> {
        sample
            .location_id
            .iter()
            .map(|&id| {
                location(p, id)
                    .line
                    .iter()
                    .map(|l| (s(p, function(p, l.function_id).name).to_owned(), l.line))
                    .collect()
            })
            .collect()
    }

    #[test]
    fn cpu_profile_header() {
        let mut b = ProfileBuilder::new(Kind::cpu(19));
        b.add(&st(&["main", "f@/a.lua:3"]), &[], &[], 2, 2);
        let start = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let p = b.build(start, Duration::from_secs(14));
        assert_eq!(p.string_table[0], "");
        let types: Vec<(&str, &str)> = p
            .sample_type
            .iter()
            .map(|t| (s(&p, t.r#type), s(&p, t.unit)))
            .collect();
        assert_eq!(types, [("samples", "count"), ("cpu", "nanoseconds")]);
        let pt = p.period_type.as_ref().expect("period type");
        assert_eq!((s(&p, pt.r#type), s(&p, pt.unit)), ("cpu", "nanoseconds"));
        assert_eq!(p.period, 52_631_578);
        assert_eq!(s(&p, p.default_sample_type), "cpu");
        assert_eq!(p.time_nanos, 1_700_000_000_000_000_000);
        assert_eq!(p.duration_nanos, 14_000_000_000);
        assert_eq!(p.sample.len(), 1);
        assert_eq!(p.sample[0].value, [2, 2 * 52_631_578]);
    }

    #[test]
    fn offcpu_profile_values_are_nanoseconds_blocked() {
        let mut b = ProfileBuilder::new(Kind::OffCpu);
        b.add(&st(&["main", "read_[k]"]), &[], &[], 3, 4500);
        let p = b.build(SystemTime::now(), Duration::from_secs(5));
        let types: Vec<&str> = p.sample_type.iter().map(|t| s(&p, t.r#type)).collect();
        assert_eq!(types, ["blocks", "offcpu"]);
        assert_eq!(s(&p, p.default_sample_type), "offcpu");
        assert_eq!(p.sample[0].value, [3, 4_500_000]);
    }

    #[test]
    fn heap_profiles_are_bytes_of_space() {
        for (kind, types) in [
            (
                Kind::Alloc {
                    sample_bytes: 524_288,
                },
                ["alloc_samples", "alloc_space"],
            ),
            (
                Kind::Live {
                    sample_bytes: 524_288,
                },
                ["inuse_samples", "inuse_space"],
            ),
        ] {
            let mut b = ProfileBuilder::new(kind);
            b.add(&st(&["main", "lj_alloc_f"]), &[], &[], 2, 1_048_576);
            let p = b.build(SystemTime::now(), Duration::from_secs(5));
            let got: Vec<&str> = p.sample_type.iter().map(|t| s(&p, t.r#type)).collect();
            assert_eq!(got, types);
            let units: Vec<&str> = p.sample_type.iter().map(|t| s(&p, t.unit)).collect();
            assert_eq!(units, ["count", "bytes"]);
            assert_eq!(s(&p, p.default_sample_type), types[1]);
            let period_type = p
                .period_type
                .as_ref()
                .map(|t| (s(&p, t.r#type), s(&p, t.unit)));
            assert_eq!(period_type, Some(("space", "bytes")));
            assert_eq!(p.period, 524_288);
            assert_eq!(p.sample[0].value, [2, 1_048_576]);
        }
    }

    #[test]
    fn ids_count_from_one_and_functions_are_shared() {
        let mut b = ProfileBuilder::new(Kind::cpu(100));
        b.add(&st(&["main", "a", "b"]), &[], &[], 1, 1);
        b.add(&st(&["main", "a", "c"]), &[], &[], 1, 1);
        let p = b.build(SystemTime::now(), Duration::from_secs(1));
        // Ids are the table positions + 1 (Parca refuses anything else).
        let fids: Vec<u64> = p.function.iter().map(|f| f.id).collect();
        assert_eq!(fids, [1, 2, 3, 4], "main, a, b, c once each");
        let lids: Vec<u64> = p.location.iter().map(|l| l.id).collect();
        assert_eq!(lids, [1, 2, 3, 4]);
        for sample in &p.sample {
            assert!(sample.location_id.iter().all(|id| (1..=4).contains(id)));
        }
        // Leaf first.
        assert_eq!(
            frames(&p, &p.sample[0]),
            [
                vec![("b".to_owned(), 0)],
                vec![("a".to_owned(), 0)],
                vec![("main".to_owned(), 0)]
            ]
        );
    }

    #[test]
    fn lua_frames_have_file_start_line_and_current_line() {
        let mut b = ProfileBuilder::new(Kind::cpu(100));
        let stack = st(&["main", "_M.access@/a/apisix/plugins/key-auth.lua:40"]);
        b.add(&stack, &[module("nginx"), d(47, false)], &[], 1, 1);
        let p = b.build(SystemTime::now(), Duration::from_secs(1));
        let leaf = location(&p, p.sample[0].location_id[0]);
        assert_eq!(leaf.line.len(), 1);
        assert_eq!(leaf.line[0].line, 47);
        let f = function(&p, leaf.line[0].function_id);
        assert_eq!(s(&p, f.name), "_M.access@/a/apisix/plugins/key-auth.lua:40");
        assert_eq!(s(&p, f.system_name), "_M.access");
        assert_eq!(s(&p, f.filename), "/a/apisix/plugins/key-auth.lua");
        assert_eq!(f.start_line, 40);
        let root = location(&p, p.sample[0].location_id[1]);
        assert_eq!(
            s(&p, function(&p, root.line[0].function_id).filename),
            "nginx"
        );
        // Native frames belong to their module's mapping, Lua frames to none.
        assert_eq!(leaf.mapping_id, 0);
        assert_eq!(p.mapping.len(), 1);
        assert_eq!((root.mapping_id, p.mapping[0].id), (1, 1));
        assert_eq!(s(&p, p.mapping[0].filename), "nginx");
        assert!(p.mapping[0].has_functions);
        // An unknown current line is unknown (0), not the first line.
        let mut b = ProfileBuilder::new(Kind::cpu(100));
        b.add(&stack, &[module("nginx"), d(0, false)], &[], 1, 1);
        let p = b.build(SystemTime::now(), Duration::from_secs(1));
        let leaf = location(&p, p.sample[0].location_id[0]);
        assert_eq!(leaf.line[0].line, 0);
        assert_eq!(function(&p, leaf.line[0].function_id).start_line, 40);
        // Without details the line is the one the label names.
        let mut b = ProfileBuilder::new(Kind::cpu(100));
        b.add(&stack, &[], &[], 1, 1);
        let p = b.build(SystemTime::now(), Duration::from_secs(1));
        let leaf = location(&p, p.sample[0].location_id[0]);
        assert_eq!(leaf.line[0].line, 40);
    }

    #[test]
    fn same_function_at_other_lines_is_one_function_two_locations() {
        let mut b = ProfileBuilder::new(Kind::cpu(100));
        let stack = st(&["main", "f@/a.lua:3"]);
        b.add(&stack, &[d(0, false), d(5, false)], &[], 1, 1);
        b.add(&stack, &[d(0, false), d(6, false)], &[], 1, 1);
        let p = b.build(SystemTime::now(), Duration::from_secs(1));
        assert_eq!(p.function.len(), 2);
        assert_eq!(p.location.len(), 3);
        assert_eq!(p.sample.len(), 2);
    }

    #[test]
    fn inlined_frames_are_lines_of_one_location_innermost_first() {
        let mut b = ProfileBuilder::new(Kind::cpu(100));
        let stack = st(&[
            "main",
            "loop@/w.lua:10",
            "pa@/w.lua:1",
            "pb@/w.lua:5",
            "lj_str_new",
        ]);
        let details = [
            module("nginx"),
            d(12, false),
            d(2, true),
            d(6, true),
            module("libluajit-5.1.so.2"),
        ];
        b.add(&stack, &details, &[], 1, 1);
        let p = b.build(SystemTime::now(), Duration::from_secs(1));
        assert_eq!(
            frames(&p, &p.sample[0]),
            [
                vec![("lj_str_new".to_owned(), 0)],
                vec![
                    ("pb@/w.lua:5".to_owned(), 6),
                    ("pa@/w.lua:1".to_owned(), 2),
                    ("loop@/w.lua:10".to_owned(), 12)
                ],
                vec![("main".to_owned(), 0)],
            ]
        );
    }

    #[test]
    fn kernel_builtin_and_marker_frames() {
        let mut b = ProfileBuilder::new(Kind::cpu(100));
        b.add(
            &st(&[
                "main",
                "builtin:string.rep",
                "[lua:gc]",
                "do_syscall_64_[k]",
            ]),
            &[],
            &[],
            1,
            1,
        );
        let p = b.build(SystemTime::now(), Duration::from_secs(1));
        let by_name = |n: &str| {
            p.function
                .iter()
                .find(|f| s(&p, f.name) == n)
                .unwrap_or_else(|| panic!("no {n}"))
        };
        let k = by_name("do_syscall_64_[k]");
        assert_eq!(s(&p, k.filename), "[kernel]");
        assert_eq!(p.mapping.len(), 1);
        assert_eq!(s(&p, p.mapping[0].filename), "[kernel.kallsyms]");
        assert_eq!(s(&p, k.system_name), "do_syscall_64");
        assert_eq!(s(&p, by_name("builtin:string.rep").filename), "[builtin]");
        assert_eq!(s(&p, by_name("[lua:gc]").filename), "");
    }

    #[test]
    fn identical_samples_merge_and_labels_split() {
        let mut b = ProfileBuilder::new(Kind::cpu(10));
        let stack = st(&["main", "f@/a.lua:1"]);
        let gw = [("container", "gw"), ("process", "nginx"), ("plugin", "")];
        b.add(&stack, &[], &gw, 2, 2);
        b.add(&stack, &[], &gw, 3, 3);
        b.add(&stack, &[], &[("container", "other")], 1, 1);
        let p = b.build(SystemTime::now(), Duration::from_secs(1));
        assert_eq!(p.sample.len(), 2);
        let merged = p
            .sample
            .iter()
            .find(|x| x.value[0] == 5)
            .expect("merged sample");
        assert_eq!(merged.value[1], 500_000_000);
        let labels: Vec<(&str, &str)> = merged
            .label
            .iter()
            .map(|l| (s(&p, l.key), s(&p, l.str)))
            .collect();
        // Empty values are left out.
        assert_eq!(labels, [("container", "gw"), ("process", "nginx")]);
    }

    #[test]
    fn gzip_round_trips() {
        let mut b = ProfileBuilder::new(Kind::cpu(99));
        b.comment("apisix-agent test");
        b.add(&st(&["main", "f@/a.lua:1"]), &[], &[], 1, 1);
        let p = b.build(SystemTime::now(), Duration::from_secs(1));
        let gz = gzip(&p).expect("gzip");
        assert_eq!(&gz[..2], &[0x1f, 0x8b]);
        assert_eq!(decode(&gz).expect("decode"), p);
    }

    #[test]
    fn detailed_folds_to_labels() {
        let mut det: Detailed<u32> = Detailed::new();
        det.add(1, st(&["main", "f"]), vec![d(0, false), d(3, false)], 2);
        det.add(1, st(&["main", "f"]), vec![d(0, false), d(4, false)], 1);
        det.add(2, st(&["main", "f"]), vec![], 1);
        assert_eq!(det.total(), 4);
        assert_eq!(det.iter().count(), 3);
        assert_eq!(det.folded().lines(), ["main;f 4"]);
    }
}
