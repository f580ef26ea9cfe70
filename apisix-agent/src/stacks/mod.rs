//! From a raw [`apisix_ebpf_common::Sample`] to a named stack, root first:
//! [`builder`] drives it, [`unwind`] walks native frames over `.eh_frame`, [`names`] names
//! the Lua frames (prototypes read through [`crate::luajit`], plugins through
//! [`crate::plugin_map`]). The target itself (its memory, files and symbols) is read
//! through [`crate::proc`].
//!
//! Hooks: `/proc/PID/*` (through [`crate::proc`]). Metrics: the [`StackStats`] counters,
//! read by the caller, and the Lua naming errors ([`LuaNamer::errors`]).

pub mod builder;
pub mod names;
pub mod unwind;

pub use builder::{CacheLimits, StackBuilder, StackOptions, StackStats};
pub use names::LuaNamer;
