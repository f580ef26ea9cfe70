//! Host-side stub of the BPF crate: the programs live in `main.rs` and its modules and are
//! only built for `bpfel-unknown-none` (see `apisix-agent/build.rs`).
//!
//! Hooks: none. Metrics: none.
#![no_std]
