//! What a frame label of the stack builder denotes: a Lua function (`NAME@FILE:LINE`), a
//! fast function or VM marker, a native or a kernel frame. Read by the daemon's per-function
//! counters and by the plugin and phase attribution. [`FrameDetail`] holds what a label does
//! not say (current line, native module, inlined by a trace), for the pprof encoding.
//!
//! Hooks: none. Metrics: none.

use std::sync::Arc;

/// What a frame's label does not say, kept beside it for the pprof encoding
/// ([`crate::output::pprof`]): flame graphs and metrics use the labels alone.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct FrameDetail {
    /// A Lua frame's current line (0: unknown, or not a Lua frame).
    pub line: u32,
    /// The file of a native frame (`nginx`, `libluajit-5.1.so.2.1.0`), when known.
    pub module: Option<Arc<str>>,
    /// A Lua frame that a JIT trace inlined into the frame below it (rebuilt from the
    /// trace's snapshot, see [`crate::luajit::trace`]).
    pub inlined: bool,
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

/// Classifies a frame label of [`super::StackBuilder`].
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
