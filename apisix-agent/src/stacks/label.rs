//! What a frame label of the stack builder denotes: a Lua function (`NAME@FILE:LINE`), a
//! fast function or VM marker, a native or a kernel frame. Read by the daemon's per-function
//! counters and by the plugin and phase attribution.
//!
//! Hooks: none. Metrics: none.

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
