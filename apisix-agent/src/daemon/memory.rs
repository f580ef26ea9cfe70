//! The agent's own heap after a capture. A capture builds a whole sampling session on a
//! blocking thread (its symbolizer, unwinders, Lua naming, the stacks) and frees it at the
//! end; glibc keeps what a thread freed in that thread's arena, so each capture thread left
//! tens of MiB resident (measured by `bench/soak.sh`). [`release_freed`] hands the free
//! memory of every arena back to the kernel.
//!
//! Hooks: `malloc_trim(3)`. Metrics: none (the effect shows in
//! `apisix_profiler_agent_resident_memory_bytes`).

/// Returns the free memory of every malloc arena to the kernel (glibc's `malloc_trim(0)`).
pub fn release_freed() {
    // SAFETY: malloc_trim only walks glibc's own arenas; it has no preconditions.
    unsafe {
        libc::malloc_trim(0);
    }
}
