//! `apisix_agent`: the library behind the `apisix-agent` binary, one folder per concern,
//! in the order data flows (see ARCHITECTURE.md):
//!
//! - [`discovery`]: which processes to profile (`/proc`, Docker), as snapshots of targets.
//! - [`sampling`]: the BPF side seen from user space — loading and attaching the programs,
//!   the sample source the daemon's continuous sampler reads, bounded captures.
//! - [`stacks`]: one raw sample → a named stack (native unwinding, symbols, target memory,
//!   Lua frames spliced in at the VM boundary).
//! - [`luajit`]: everything LuaJIT (layouts, build detection, bytecode, frame naming).
//! - [`daemon`]: `apisix-agent run` — the continuous sampler thread, shared state,
//!   aggregation, metrics, the HTTP server (listener, TLS, authentication).
//! - [`output`]: folded text, SVG and JSON flame graphs, pprof profiles.
//! - [`attribution`]: which APISIX plugin and request phase a stack belongs to;
//!   [`plugin_map`]: the plugins as the gateway names them, read from its VMs.
//! - [`record`]: the one-shot `record` command; [`config`]: the daemon's YAML; [`error`]:
//!   an error and its sources as one line.
//!
//! Hooks and metrics: those of the modules; each file's header lists its own.

pub mod attribution;
pub mod config;
pub mod daemon;
pub mod discovery;
pub mod error;
pub mod label;
pub mod luajit;
pub mod output;
pub mod plugin_map;
pub mod proc;
pub mod record;
pub mod sampling;
pub mod stacks;
