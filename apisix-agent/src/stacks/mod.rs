//! From a raw [`apisix_ebpf_common::Sample`] to a named stack, root first:
//! [`builder`] drives it, [`unwind`] walks native frames over `.eh_frame`, [`symbolize`]
//! names them, [`process`] opens a target's `/proc/PID` files (its mapped files through
//! [`target_file`]) and [`memory`] reads its memory (Lua prototypes and strings).
//!
//! Hooks: `/proc/PID/*` (maps, files through `/proc/PID/map_files`, `mem`). Metrics: the
//! [`StackStats`] counters, read by the caller.

pub mod builder;
pub mod label;
pub mod memory;
pub mod process;
pub mod symbolize;
pub mod target_file;
pub mod unwind;

pub use builder::{CacheLimits, StackBuilder, StackOptions, StackStats};
