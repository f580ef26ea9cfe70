//! The CPU sampler: a `perf_event` program attached on every CPU; and the off-CPU pair: a
//! `sched_switch` raw tracepoint noting when a target thread blocks, and a `sys_exit` raw
//! tracepoint that, back in the thread at the end of that system call, writes the same kind
//! of sample weighted by the microseconds it was blocked (blocks shorter than `OFFCPU_MIN`
//! are only counted).
//!
//! For each sample of a process listed in `TARGETS` it writes one `Sample` into the
//! `SAMPLES` ring buffer: the user registers, a copy of the top of the user stack (user
//! space unwinds it from `.eh_frame`), the kernel stack, and — for LuaJIT targets — the
//! Lua frames of the running coroutine, walked here at sample time because the Lua stack
//! lives in the heap and changes right after (from one copy of the stack's top 8 KiB, frames
//! below it read one by one). This side knows bytes and offsets only: the
//! offsets come from `LUA_LAYOUTS`, filled by the agent. Every read of target memory may
//! fail; every loop is bounded. Outcomes are counted per reason in `COUNTERS`.
//!
//! The allocator probes, for on-demand allocation and live-heap captures: a uprobe on a Lua
//! VM's allocator writing the thread's stack every `N` allocated bytes on average, and (live
//! mode) a uretprobe tracking the sampled blocks until they are freed.
//!
//! The event-loop pair: tracepoint programs on `syscalls:sys_{enter,exit}_epoll_*` (or, as a
//! fallback, raw tracepoints on `sys_enter` and `sys_exit`) timing each target thread's loop
//! iterations, from a return of `epoll_wait` to its next entry.
//!
//! One module per program family: [`sample`] (perf_event), [`offcpu`] (the two raw
//! tracepoints), [`eventloop`] (two tracepoints, and two more raw ones), [`learn_vm`] (uprobe), [`alloc`] (the allocator's
//! uprobe and uretprobe);
//! [`lua`] the Lua walk they share, [`maps`] every map.
//!
//! Hooks: `perf_event` (CPU clock), `raw_tp/sched_switch`, `raw_tp/sys_enter`,
//! `raw_tp/sys_exit`, `tracepoint/syscalls/sys_{enter,exit}_epoll_*`, uprobe
//! `lua_resume`, uprobe and uretprobe on the allocator. Metrics: `COUNTERS` (one slot per
//! `Counter`) and `LOST`.
#![no_std]
#![no_main]

mod alloc;
mod eventloop;
mod learn_vm;
mod lua;
mod maps;
mod offcpu;
mod regs;
mod sample;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
