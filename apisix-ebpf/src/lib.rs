//! Host-side stub of the BPF crate: the programs live in `main.rs` and are only
//! built for `bpfel-unknown-none` (see `apisix-agent/build.rs`).
#![no_std]
