//! The BPF programs seen from user space: [`bpf`] loads and attaches them and owns their
//! maps, [`capture`] a bounded capture with a sampler of its own (`record`,
//! `/flamegraph?seconds=N`), [`alloc`] finds where to probe a Lua VM's allocator for
//! allocation captures, [`heap`] heap snapshot jobs (no probes but the VM learner), [`source`] the seam between the daemon's sampler thread
//! (the daemon's continuous sampler thread) and BPF (and a replaying fake for root-free tests).
//!
//! [`tracepoints`] attaches the event-loop pair to the per-call tracepoints of the epoll waits.
//!
//! Hooks: `perf_event_open`, tracepoints, raw tracepoints, the `lua_resume` uprobe, the allocator probes,
//! `bpf()`. Metrics: the BPF counters (read by [`bpf::BpfSession::counters`]) and, in the
//! daemon, the unwind error, lost sample, target and Lua memory gauges updated by
//! the daemon's continuous sampler thread. [`kernel`] finds what the running kernel offers (BTF
//! offsets, `bpf_loop`), [`verifier`] reads the verifier's figures for each program and
//! holds their budgets.

pub mod alloc;
pub mod bpf;
pub mod capture;
pub mod check;
pub mod heap;
pub mod kernel;
pub mod render;
pub mod request;
pub mod source;
pub mod tracepoints;
pub mod verifier;
