//! What a frame label of the stack builder denotes: a Lua function (`NAME@FILE:LINE`), a
//! fast function or VM marker, a native or a kernel frame. Read by the daemon's per-function
//! counters and by the plugin and phase attribution. [`FrameDetail`] holds what a label does
//! not say (current line, native module, inlined by a trace), for the pprof encoding; module
//! names are interned process-wide ([`ModuleId`]).
//!
//! Hooks: none. Metrics: none.

use std::{
    collections::HashMap,
    num::NonZeroU16,
    sync::{Arc, LazyLock, RwLock},
};

/// What a frame's label does not say, kept beside it for the pprof encoding
/// (`crate::output::pprof`): flame graphs and metrics use the labels alone. Eight bytes: the
/// daemon keeps one per frame of every distinct stack of its recent window.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct FrameDetail {
    /// A Lua frame's current line (0: unknown, or not a Lua frame).
    pub line: u32,
    /// The file of a native frame (`nginx`, `libluajit-5.1.so.2.1.0`), when known.
    pub module: Option<ModuleId>,
    /// A Lua frame that a JIT trace inlined into the frame below it (rebuilt from the
    /// trace's snapshot, see `crate::luajit::trace`).
    pub inlined: bool,
}

const _: () = assert!(std::mem::size_of::<FrameDetail>() == 8);

/// A native module's file name, interned for the whole process (module names are few: the
/// executables and libraries the targets map).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ModuleId(NonZeroU16);

#[derive(Debug, Default)]
struct Modules {
    names: Vec<Arc<str>>,
    ids: HashMap<Arc<str>, ModuleId>,
}

static MODULES: LazyLock<RwLock<Modules>> = LazyLock::new(RwLock::default);

impl ModuleId {
    /// The id of module `name` (`None` once 65 535 names are known).
    pub fn of(name: &str) -> Option<Self> {
        if let Ok(m) = MODULES.read()
            && let Some(id) = m.ids.get(name)
        {
            return Some(*id);
        }
        let mut m = MODULES.write().ok()?;
        if let Some(id) = m.ids.get(name) {
            return Some(*id);
        }
        let id = Self(NonZeroU16::new(u16::try_from(m.names.len() + 1).ok()?)?);
        let name: Arc<str> = Arc::from(name);
        m.names.push(name.clone());
        m.ids.insert(name, id);
        Some(id)
    }

    /// The module's name.
    pub fn name(self) -> Option<Arc<str>> {
        let m = MODULES.read().ok()?;
        m.names.get(usize::from(self.0.get()) - 1).cloned()
    }
}

/// What a frame label denotes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FrameClass<'a> {
    /// A Lua function (`NAME@FILE:LINE`), a fast function (`builtin:NAME`, file `[builtin]`)
    /// or a VM marker (`[lua:gc]`, file empty).
    Lua {
        function: &'a str,
        file: &'a str,
        line: &'a str,
    },
    /// A native user-space frame.
    C { function: &'a str },
    /// A kernel frame (`…_[k]`).
    Kernel,
}

/// What a string cut to a bound ends with (frame names, metric label values).
pub const TRUNCATED: &str = "…[truncated]";

/// Classifies a frame label of the stack builder (`crate::stacks::StackBuilder`).
pub fn classify(label: &str) -> FrameClass<'_> {
    if label.ends_with("_[k]") {
        return FrameClass::Kernel;
    }
    if label.starts_with("builtin:") {
        return FrameClass::Lua {
            function: label,
            file: "[builtin]",
            line: "0",
        };
    }
    if label.starts_with("[lua:") {
        return FrameClass::Lua {
            function: label,
            file: "",
            line: "",
        };
    }
    if let Some((name, place)) = label.split_once('@')
        && let Some((file, line)) = place.rsplit_once(':')
        && !name.is_empty()
        && !file.is_empty()
        && !line.is_empty()
        && line.bytes().all(|b| b.is_ascii_digit())
    {
        return FrameClass::Lua {
            function: name,
            file,
            line,
        };
    }
    FrameClass::C { function: label }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn module_ids_are_stable_and_name_their_module() {
        let a = ModuleId::of("libtest-a.so");
        let b = ModuleId::of("libtest-b.so");
        assert!(a.is_some() && b.is_some() && a != b);
        assert_eq!(ModuleId::of("libtest-a.so"), a);
        assert_eq!(a.and_then(ModuleId::name).as_deref(), Some("libtest-a.so"));
    }
}
