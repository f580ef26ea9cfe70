//! Low-level access to a target process, below both [`crate::luajit`] and [`crate::stacks`]:
//! its memory ([`memory`]: the [`memory::TargetMemory`] trait, the live process, and
//! [`recorded`]: memory recorded from a real run for tests), its `/proc/PID` text files and executable mappings
//! ([`process`]), the mapped files opened safely through `/proc/PID/map_files`
//! ([`target_file`]) and kept as ELF files ([`modules`]), and the native symbols in them
//! ([`symbolize`]). Everything read here comes from the target and is
//! hostile: every read is bounded, every file checked against its maps line.
//!
//! Hooks: `/proc/PID/maps`, `/proc/PID/map_files/`, `/proc/PID/status`, `/proc/PID/stat`,
//! `process_vm_readv(2)`. Metrics: file refusals by reason ([`target_file::refusals`]).

pub mod memory;
pub mod modules;
pub mod process;
pub mod recorded;
pub mod symbolize;
pub mod target_file;
