//! What a profile is written as: folded stacks, SVG flame graphs and JSON trees
//! ([`fold::Folded`]), and pprof profiles ([`pprof`]).
//!
//! Hooks: none. Metrics: none.

pub mod fold;
pub mod pprof;

pub use fold::Folded;
