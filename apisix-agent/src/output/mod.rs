//! What a profile is written as: folded stacks, SVG flame graphs and JSON trees
//! ([`fold::Folded`]).
//!
//! Hooks: none. Metrics: none.

pub mod fold;

pub use fold::Folded;
