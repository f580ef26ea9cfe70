//! What a profile is written as: folded stacks, SVG flame graphs and JSON trees
//! ([`fold::Folded`]), pprof profiles ([`pprof`]), and differences of two folded profiles
//! ([`diff`]).
//!
//! Hooks: none. Metrics: none.

pub mod diff;
pub mod fold;
pub mod pprof;

pub use fold::Folded;
