//! Types shared by the BPF programs (`apisix-ebpf`) and the agent (`apisix-agent`).
//!
//! Everything here is `#[repr(C)]`, `Copy` and free of implicit padding, so that the
//! kernel side and user space read the same bytes. Map and program names are shared
//! constants. With the `user` feature the types implement `aya::Pod`.
#![no_std]

/// Program name of the CPU sampler (a `perf_event` program attached on every CPU).
pub const PROG_SAMPLE: &str = "sample";

/// The CPU sampler for kernels without `bpf_loop` (before 5.17): the same program with the
/// Lua walk in a bounded loop of [`BOUNDED_LUA_STEPS`] steps.
pub const PROG_SAMPLE_BOUNDED: &str = "sample_bounded";

/// Program name of the off-CPU hook on `sched_switch` (raw tracepoint): notes when a target
/// thread blocks.
pub const PROG_OFFCPU_SWITCH: &str = "offcpu_switch";

/// Program name of the off-CPU hook on `sys_exit` (raw tracepoint): runs in the thread back
/// from a blocking system call and writes its stack weighted by the time it was blocked.
pub const PROG_OFFCPU_EXIT: &str = "offcpu_exit";
/// [`PROG_OFFCPU_EXIT`] with the bounded Lua walk (kernels without `bpf_loop`).
pub const PROG_OFFCPU_EXIT_BOUNDED: &str = "offcpu_exit_bounded";

/// A program that only calls `bpf_loop`: whether it loads tells whether the kernel has the
/// helper (5.17), i.e. which walk variant the agent loads.
pub const PROG_PROBE_LOOP: &str = "probe_bpf_loop";

/// The event-loop pair's fentry/fexit programs and the kernel function each pair hooks: at a
/// target thread's entry into the wait (fentry) the loop iteration that began at the previous
/// return ends and is counted in [`MAP_LOOP_THREADS`]; at its return (fexit) the next begins.
/// The cheapest attachment (a trampoline on the function alone); needs the kernel's BTF.
/// `__x64_sys_epoll_pwait2` is 5.11+.
pub const LOOP_FUNCTIONS: [(&str, &str, &str); 3] = [
    ("loop_in_wait", "loop_out_wait", "__x64_sys_epoll_wait"),
    ("loop_in_pwait", "loop_out_pwait", "__x64_sys_epoll_pwait"),
    (
        "loop_in_pwait2",
        "loop_out_pwait2",
        "__x64_sys_epoll_pwait2",
    ),
];

/// Program name of the event-loop hook on the tracepoints `syscalls:sys_enter_epoll_wait`
/// (and `_epoll_pwait`, `_epoll_pwait2`): at a target thread's entry into a wait, the loop
/// iteration that began at the previous return ends and is counted in [`MAP_LOOP_THREADS`].
pub const PROG_LOOP_WAIT_ENTER: &str = "loop_wait_enter";
/// Program name of the event-loop hook on the tracepoints `syscalls:sys_exit_epoll_wait`
/// (and `_epoll_pwait`, `_epoll_pwait2`): at a target thread's return from a wait, a loop
/// iteration begins.
pub const PROG_LOOP_WAIT_EXIT: &str = "loop_wait_exit";
/// [`PROG_LOOP_WAIT_ENTER`] as a raw tracepoint on `sys_enter`, which runs at every system
/// call: the last fallback, where neither [`LOOP_FUNCTIONS`] (no BTF) nor the per-call
/// tracepoints (no tracefs) can be attached.
pub const PROG_LOOP_ENTER: &str = "loop_enter";
/// [`PROG_LOOP_WAIT_EXIT`] as a raw tracepoint on `sys_exit` (the same fallback).
pub const PROG_LOOP_EXIT: &str = "loop_exit";

/// Program name of the uprobe on `lua_resume` that learns a process's `global_State` from its
/// first argument, for targets that run trace code before any interpreter sample.
pub const PROG_LEARN_VM: &str = "learn_vm";

/// Program name of the uprobe on a Lua VM's allocator (`global_State.allocf`, attached per
/// process at the function's file offset): counts the bytes each thread allocates and, at
/// sampling points every `AllocConfig::sample_bytes` on average, writes the thread's stack
/// weighted by the bytes it stands for.
pub const PROG_ALLOC: &str = "alloc_entry";
/// [`PROG_ALLOC`] with the bounded Lua walk (kernels without `bpf_loop`).
pub const PROG_ALLOC_BOUNDED: &str = "alloc_entry_bounded";

/// Program name of the uretprobe on the same allocator (live mode only): gets the address the
/// allocator returned and keeps [`MAP_LIVE_ALLOCS`] up to date (sampled blocks in, freed
/// blocks out).
pub const PROG_ALLOC_RET: &str = "alloc_return";

/// `HashMap<u32 tgid, Target>`: processes to sample.
pub const MAP_TARGETS: &str = "TARGETS";
/// `Array<LuaLayout>`: struct layouts of the LuaJIT builds in use, indexed by `Target::layout`.
pub const MAP_LUA_LAYOUTS: &str = "LUA_LAYOUTS";
/// `HashMap<u32 tgid, u64>`: the `global_State` address last seen in a process's interpreter.
pub const MAP_LUA_VMS: &str = "LUA_VMS";
/// `RingBuf`: one [`Sample`] per sampled event.
pub const MAP_SAMPLES: &str = "SAMPLES";
/// `PerCpuArray<u64>`: counters indexed by [`Counter`].
pub const MAP_COUNTERS: &str = "COUNTERS";
/// `PerCpuHashMap<u32 tgid, u64>`: samples of each process lost because the ring buffer was full.
pub const MAP_LOST: &str = "LOST";

/// `HashMap<u32 tid, u64 ns>`: when each blocked target thread went off CPU.
pub const MAP_OFF_START: &str = "OFF_START";
/// `Array<u64>` of one entry: blocks shorter than this many nanoseconds are dropped.
pub const MAP_OFFCPU_MIN: &str = "OFFCPU_MIN";

/// `Array<KernelConfig>` of one entry: offsets into the running kernel's structures, from
/// its BTF.
pub const MAP_KERNEL_CONFIG: &str = "KERNEL_CONFIG";
/// `Array<AllocConfig>` of one entry: how the allocator probes sample (zero: held).
pub const MAP_ALLOC_CONFIG: &str = "ALLOC_CONFIG";
/// `HashMap<u32 tid, _>`: each thread's distance to its next sampling point, and the call
/// in flight between the allocator's entry and return (BPF side only).
pub const MAP_ALLOC_THREADS: &str = "ALLOC_THREADS";
/// `HashMap<u64 address, LiveAlloc>`: live mode's sampled blocks still allocated.
pub const MAP_LIVE_ALLOCS: &str = "LIVE_ALLOCS";
/// `HashMap<u32 tid, LoopThread>`: each target thread's event loop (when its iteration began,
/// its iterations counted by duration).
pub const MAP_LOOP_THREADS: &str = "LOOP_THREADS";
/// `Array<LoopConfig>` of one entry: the stall threshold.
pub const MAP_LOOP_CONFIG: &str = "LOOP_CONFIG";
/// Entries of [`MAP_LOOP_THREADS`]: threads of targets that wait in `epoll_wait`.
pub const LOOP_MAX_THREADS: u32 = 16384;
/// Upper bounds (inclusive) of the event-loop iteration buckets, in nanoseconds: the
/// `apisix_profiler_event_loop_iteration_seconds` histogram's 0.001, 0.005, 0.01, 0.05, 0.1,
/// 0.25, 0.5, 1, 2.5, 5 and 10 s. [`LoopThread::buckets`] has one more, for longer ones.
pub const LOOP_BUCKETS_NS: [u64; 11] = [
    1_000_000,
    5_000_000,
    10_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
    2_500_000_000,
    5_000_000_000,
    10_000_000_000,
];
/// Entries of [`LoopThread::buckets`]: one per bound of [`LOOP_BUCKETS_NS`], and one above.
pub const LOOP_BUCKETS: usize = LOOP_BUCKETS_NS.len() + 1;

/// Entries of [`MAP_LIVE_ALLOCS`] in a live capture: a sampled block that finds the map full
/// is not tracked and counted in [`Counter::LiveMapFull`].
pub const LIVE_MAX_TRACKED: u32 = 65536;
/// Entries of [`MAP_ALLOC_THREADS`] in an allocation capture (threads of the targets).
pub const ALLOC_MAX_THREADS: u32 = 4096;

/// Bytes of user stack copied from the stack pointer upwards (the largest size tried).
pub const STACK_COPY_MAX: usize = 16384;
/// Lua frames walked per sample.
pub const MAX_LUA_FRAMES: usize = 192;
/// Steps of the bounded Lua walk (kernels without `bpf_loop`): as many as the `bpf_loop`
/// walk takes (two per frame: a vararg pseudo-frame or a C frame may sit between two Lua
/// frames), so both walk [`MAX_LUA_FRAMES`] frames. Each step is a global BPF function,
/// checked once by the verifier, so the steps cost it little.
pub const BOUNDED_LUA_STEPS: usize = 2 * MAX_LUA_FRAMES;
/// Kernel frames kept per sample.
pub const MAX_KERNEL_FRAMES: usize = 64;
/// Number of slots in [`MAP_LUA_LAYOUTS`].
pub const MAX_LUA_LAYOUTS: u32 = 8;
/// `Target::layout` value of a process without a usable LuaJIT.
pub const LAYOUT_NONE: u32 = u32::MAX;

/// One process to sample.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct Target {
    /// Index into [`MAP_LUA_LAYOUTS`], or [`LAYOUT_NONE`] for native stacks only.
    pub layout: u32,
    /// Reserved, zero.
    pub flags: u32,
    /// Start of the LuaJIT interpreter's machine code in this process.
    pub vm_start: u64,
    /// End (exclusive) of the LuaJIT interpreter's machine code in this process.
    pub vm_end: u64,
    /// Top of the main thread's stack (`/proc/PID/stat` `startstack`), or 0 when unknown:
    /// the main thread's stack copy stops there instead of probing for the mapping's end.
    pub stack_top: u64,
}

/// Byte offsets and sizes of one LuaJIT build's structures, as the BPF walker needs them.
///
/// Filled from the agent's per-flavour tables; the BPF side never guesses an offset.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct LuaLayout {
    /// 1 for 64-bit GC references and two-slot frames (GC64, `LJ_FR2`), 0 for 32-bit refs.
    pub gc64: u32,
    /// `[rsp + save_l]` holds the running `lua_State *` while the interpreter executes.
    pub save_l: u32,
    /// `lua_State.glref`.
    pub l_glref: u32,
    /// `lua_State.base`.
    pub l_base: u32,
    /// `lua_State.stack`.
    pub l_stack: u32,
    /// `lua_State.cframe`.
    pub l_cframe: u32,
    /// `lua_State.stacksize` (in slots).
    pub l_stacksize: u32,
    /// `global_State.cur_L`.
    pub g_cur_l: u32,
    /// `global_State.vmstate`.
    pub g_vmstate: u32,
    /// `global_State.jit_base`.
    pub g_jit_base: u32,
    /// `GCfunc.gct` (the GC type byte).
    pub fn_gct: u32,
    /// `GCfunc.ffid`.
    pub fn_ffid: u32,
    /// `GCfunc.pc` (Lua functions: bytecode start, right behind the `GCproto`).
    pub fn_pc: u32,
    /// `GCfuncC.f` (C and fast functions).
    pub fn_cfunc: u32,
    /// `sizeof(GCproto)`.
    pub pt_size: u32,
    /// `GCproto.chunkname`.
    pub pt_chunkname: u32,
    /// `GCproto.firstline`.
    pub pt_firstline: u32,
    /// `GG_G2DISP`: the interpreter's DISPATCH register (r14) minus the `global_State`
    /// address. GC64 JIT code keeps DISPATCH in r14 too.
    pub g2disp: u32,
    /// `jit_State.trace` minus the `global_State` address: a native pointer to the array
    /// of trace references (8 bytes each with GC64, 4 without).
    pub g_trace: u32,
    /// `GCtrace.mcode`: the start of a trace's machine code.
    pub t_mcode: u32,
}

/// Offsets into the running kernel's structures, read by the agent from the kernel's BTF
/// (0 where unknown: the program then does without what needs it).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct KernelConfig {
    /// `task_struct.stack`: the task's kernel stack, whose top holds its saved user registers
    /// (what a sample that hit kernel mode unwinds from).
    pub task_stack: u32,
    /// `task_struct.__state` (5.14+) or `task_struct.state`: whether a thread switched out
    /// is blocked (non-zero) or only preempted.
    pub task_state: u32,
    /// `THREAD_SIZE` minus `sizeof(struct pt_regs)`: where the saved user registers sit
    /// from the kernel stack's base (without the top padding some configurations add, which
    /// the programs try next).
    pub regs_offset: u32,
    /// Reserved, zero.
    pub reserved: u32,
}

/// How the allocator probes sample, written by the agent before it attaches them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct AllocConfig {
    /// Mean distance between two sampling points, in allocated bytes; 0: nothing is
    /// counted or sampled (with `live` still 1, frees and resizes of tracked blocks are still
    /// followed: the agent lets a live capture settle; both 0 hold the probes).
    pub sample_bytes: u64,
    /// 1: live mode (track sampled blocks until freed, in [`MAP_LIVE_ALLOCS`]); 0: allocated
    /// bytes only.
    pub live: u32,
    /// Reserved, zero.
    pub reserved: u32,
}

/// A sampled block still allocated: which sample named its stack, and the bytes it stands
/// for. The sample is the one of thread `tid` written at `time_ns` (its [`Sample::tid`] and
/// [`Sample::time_ns`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct LiveAlloc {
    /// [`Sample::time_ns`] of the sample.
    pub time_ns: u64,
    /// Sampled bytes this block stands for.
    pub weight: u64,
    /// [`Sample::tid`] of the sample.
    pub tid: u32,
    /// Reserved, zero.
    pub reserved: u32,
}

/// One target thread's event loop, kept by the event-loop pair's hooks: an iteration runs
/// from a return of `epoll_wait` to the thread's next entry into it. Counts are cumulative
/// for the thread's life; the agent reads deltas.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct LoopThread {
    /// The thread's process (tgid).
    pub tgid: u32,
    /// Reserved, zero.
    pub reserved: u32,
    /// `bpf_ktime_get_ns()` at the last return from `epoll_wait`: when the current iteration
    /// began; 0 while the thread waits (or before its first return was seen).
    pub iter_start_ns: u64,
    /// Iterations counted.
    pub count: u64,
    /// Their summed duration, in nanoseconds.
    pub sum_ns: u64,
    /// Iterations of at least [`LoopConfig::stall_ns`].
    pub stalls: u64,
    /// Duration of the latest stall, in nanoseconds.
    pub last_stall_ns: u64,
    /// Iterations per bucket (not cumulative): `buckets[i]` counts durations up to
    /// `LOOP_BUCKETS_NS[i]` and above the bound before; the last one, longer ones.
    pub buckets: [u64; LOOP_BUCKETS],
}

/// The event-loop hooks' settings, written by the agent.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct LoopConfig {
    /// Iterations at least this long (nanoseconds) count as stalls; 0: none does.
    pub stall_ns: u64,
}

/// What the sampled thread's Lua VM was doing, from `global_State.vmstate` and the IP.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum LuaState {
    /// No Lua walk attempted (no LuaJIT in the target, or the thread runs no Lua now).
    None = 0,
    /// The IP was in the interpreter; BASE and PC came from registers.
    Interpreter = 1,
    /// In C code called from Lua (C function, FFI callee, VM helper); `L->base` used, or
    /// rbp in a helper the interpreter called without storing `L->base`.
    C = 2,
    /// In the garbage collector.
    Gc = 3,
    /// In the JIT compiler (recording, optimizing or assembling a trace).
    JitCompile = 4,
    /// In a compiled trace; `G->jit_base` used.
    Trace = 5,
    /// Exiting a trace back into the interpreter.
    TraceExit = 6,
}

impl LuaState {
    /// Decodes the raw value sent by the BPF side.
    pub const fn from_raw(raw: u32) -> Self {
        match raw {
            1 => Self::Interpreter,
            2 => Self::C,
            3 => Self::Gc,
            4 => Self::JitCompile,
            5 => Self::Trace,
            6 => Self::TraceExit,
            _ => Self::None,
        }
    }
}

/// Kind of one walked Lua frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum LuaFrameKind {
    /// A Lua function: `code` is its `GCproto`.
    Lua = 0,
    /// A C function (`lua_CFunction`): `code` is its address.
    C = 1,
    /// A fast function (builtin): `ffid` names it, `code` is its handler.
    Fast = 2,
}

/// One Lua frame as the BPF walker saw it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct LuaFrame {
    /// Address of the `GCfunc`.
    pub func: u64,
    /// Lua: address of the `GCproto`; C/fast: the C function's address.
    pub code: u64,
    /// Address of the next bytecode to run in this frame (return PC), or 0 if unknown.
    pub pc: u64,
    /// Lua: `GCproto.chunkname` at sample time (checked by user space against a freed proto).
    pub chunkname: u64,
    /// Lua: `GCproto.firstline` at sample time.
    pub firstline: u32,
    /// [`LuaFrameKind`] as a byte.
    pub kind: u8,
    /// `GCfunc.ffid` (0 Lua, 1 C, >1 fast function id).
    pub ffid: u8,
    /// Low three bits of the frame link: how this frame was entered (0 from Lua, 1 or 5 from C).
    pub link: u8,
    /// Reserved, zero.
    pub reserved: u8,
}

/// The user-mode registers the unwinders need.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct UserRegs {
    pub ip: u64,
    pub sp: u64,
    pub bp: u64,
}

/// One CPU sample, written by the BPF side into [`MAP_SAMPLES`].
#[derive(Clone, Copy)]
#[repr(C)]
pub struct Sample {
    /// Process id (tgid).
    pub pid: u32,
    /// Thread id.
    pub tid: u32,
    /// `bpf_ktime_get_ns()` at the sample.
    pub time_ns: u64,
    /// Weight of the sample: 1 for a CPU sample, microseconds blocked for an off-CPU one,
    /// allocated bytes it stands for for an allocation sample.
    pub weight: u64,
    /// User-mode registers at the sample.
    pub regs: UserRegs,
    /// The walked `lua_State`, or 0.
    pub lua_l: u64,
    /// `lua_State.cframe` of the walked state (the VM's C frame on the native stack), or 0.
    pub lua_cframe: u64,
    /// Bytes of [`Sample::stack`] that hold the user stack from `regs.sp` upwards.
    pub stack_len: u32,
    /// Entries of [`Sample::kstack`] in use (leaf first).
    pub kstack_len: u32,
    /// Entries of [`Sample::lua`] in use (innermost frame first).
    pub lua_len: u32,
    /// [`LuaState`] as a raw value.
    pub lua_state: u32,
    /// [`Counter`] of the reason the Lua walk stopped early, or 0 if it did not.
    pub lua_error: u32,
    /// `global_State.vmstate` (a trace number when >= 0).
    pub vmstate: i32,
    /// While a trace runs: the address of its `GCtrace` at sample time, or 0 if unread.
    pub trace: u64,
    /// While a trace runs: the start of its machine code at sample time, or 0 if unread.
    pub trace_mcode: u64,
    /// Age of the thread's current event-loop iteration at the sample (nanoseconds since its
    /// last return from `epoll_wait`), or 0 when it waits or none was seen.
    pub iteration_ns: u64,
    /// Thread name.
    pub comm: [u8; 16],
    /// Kernel stack, leaf first.
    pub kstack: [u64; MAX_KERNEL_FRAMES],
    /// Lua frames, innermost first.
    pub lua: [LuaFrame; MAX_LUA_FRAMES],
    /// Copy of the user stack from `regs.sp`.
    pub stack: [u8; STACK_COPY_MAX],
}

/// Counters kept by the BPF side in [`MAP_COUNTERS`], one slot each.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum Counter {
    /// Samples written to the ring buffer.
    Samples = 0,
    /// Samples lost because the ring buffer was full.
    RingbufFull = 1,
    /// User registers could not be read.
    RegsUnavailable = 2,
    /// No part of the user stack could be copied.
    StackCopyFailed = 3,
    /// Lua: no `global_State` known yet for the process.
    LuaNoVm = 4,
    /// Lua: the `lua_State` / `global_State` pair did not check out.
    LuaBadState = 5,
    /// Lua: a read of VM memory failed.
    LuaReadFailed = 6,
    /// Lua: a frame slot did not hold a function.
    LuaBadFrame = 7,
    /// Lua: more frames than [`MAX_LUA_FRAMES`].
    LuaTooDeep = 8,
    /// Lua: BASE was outside the Lua stack.
    LuaBadBase = 9,
    /// Lua: the layout slot of the target was empty.
    LuaNoLayout = 10,
    /// Samples of threads running no Lua at the time (not an error).
    LuaIdle = 11,
    /// Samples with a complete Lua walk.
    LuaWalked = 12,
    /// Off-CPU: blocks shorter than the minimum, dropped in the kernel (not an error).
    OffcpuShort = 13,
    /// A BPF map insert failed (map full, or out of memory): what it would have recorded —
    /// a learned Lua VM, a block's start, a per-process lost count — is missing.
    MapInsertFailed = 14,
    /// Lua: the thread runs Lua (its VM frame is on the stack) but the walk found no frame.
    LuaNoFrames = 15,
    /// Allocator calls seen (allocations, resizes and frees; not an error).
    AllocCalls = 16,
    /// Bytes allocated: a new block's size, a resize's growth (not a count of events).
    AllocBytes = 17,
    /// Allocator calls that hit a sampling point (a stack was written, or lost).
    AllocSampled = 18,
    /// Live mode: a sampled block not tracked because [`MAP_LIVE_ALLOCS`] was full.
    LiveMapFull = 19,
    /// Live mode: an allocator call whose return was never seen (its block, if sampled, is
    /// not tracked).
    AllocNoReturn = 20,
    /// Live mode: tracked blocks freed (or resized away) during the capture (not an error).
    LiveFreed = 21,
}

/// Number of slots in [`MAP_COUNTERS`].
pub const COUNTER_SLOTS: u32 = 24;

impl Counter {
    /// All counters, in slot order.
    pub const ALL: [Counter; 22] = [
        Counter::Samples,
        Counter::RingbufFull,
        Counter::RegsUnavailable,
        Counter::StackCopyFailed,
        Counter::LuaNoVm,
        Counter::LuaBadState,
        Counter::LuaReadFailed,
        Counter::LuaBadFrame,
        Counter::LuaTooDeep,
        Counter::LuaBadBase,
        Counter::LuaNoLayout,
        Counter::LuaIdle,
        Counter::LuaWalked,
        Counter::OffcpuShort,
        Counter::MapInsertFailed,
        Counter::LuaNoFrames,
        Counter::AllocCalls,
        Counter::AllocBytes,
        Counter::AllocSampled,
        Counter::LiveMapFull,
        Counter::AllocNoReturn,
        Counter::LiveFreed,
    ];

    /// Stable snake_case name, used as a metric label and in reports.
    pub const fn name(self) -> &'static str {
        match self {
            Counter::Samples => "samples",
            Counter::RingbufFull => "ringbuf_full",
            Counter::RegsUnavailable => "regs_unavailable",
            Counter::StackCopyFailed => "stack_copy_failed",
            Counter::LuaNoVm => "lua_no_vm",
            Counter::LuaBadState => "lua_bad_state",
            Counter::LuaReadFailed => "lua_read_failed",
            Counter::LuaBadFrame => "lua_bad_frame",
            Counter::LuaTooDeep => "lua_too_deep",
            Counter::LuaBadBase => "lua_bad_base",
            Counter::LuaNoLayout => "lua_no_layout",
            Counter::LuaIdle => "lua_idle",
            Counter::LuaWalked => "lua_walked",
            Counter::OffcpuShort => "offcpu_short",
            Counter::MapInsertFailed => "map_insert_failed",
            Counter::LuaNoFrames => "lua_no_frames",
            Counter::AllocCalls => "alloc_calls",
            Counter::AllocBytes => "alloc_bytes",
            Counter::AllocSampled => "alloc_sampled",
            Counter::LiveMapFull => "live_map_full",
            Counter::AllocNoReturn => "alloc_no_return",
            Counter::LiveFreed => "live_freed",
        }
    }

    /// Whether the counter counts something that went wrong in a stack walk: walks that ended
    /// early, a failed map insert (the rest count successes, idle samples, dropped short
    /// blocks, and the allocation captures' own outcomes, reported with those captures).
    pub const fn is_error(self) -> bool {
        !matches!(
            self,
            Counter::Samples
                | Counter::RingbufFull
                | Counter::LuaWalked
                | Counter::LuaIdle
                | Counter::OffcpuShort
                | Counter::AllocCalls
                | Counter::AllocBytes
                | Counter::AllocSampled
                | Counter::LiveMapFull
                | Counter::AllocNoReturn
                | Counter::LiveFreed
        )
    }

    /// Decodes a slot index.
    pub fn from_raw(raw: u32) -> Option<Self> {
        Self::ALL.get(raw as usize).copied()
    }
}

// No implicit padding: every size is the sum of its fields.
const _: () = {
    assert!(core::mem::size_of::<Target>() == 32);
    assert!(core::mem::size_of::<LuaLayout>() == 20 * 4);
    assert!(core::mem::size_of::<LuaFrame>() == 40);
    assert!(core::mem::size_of::<UserRegs>() == 24);
    assert!(
        core::mem::size_of::<Sample>()
            == 4 + 4
                + 8
                + 8
                + 24
                + 8
                + 8
                + 6 * 4
                + 3 * 8
                + 16
                + 8 * MAX_KERNEL_FRAMES
                + 40 * MAX_LUA_FRAMES
                + STACK_COPY_MAX
    );
    assert!(core::mem::size_of::<AllocConfig>() == 16);
    assert!(core::mem::size_of::<KernelConfig>() == 16);
    assert!(core::mem::size_of::<LiveAlloc>() == 24);
    assert!(Counter::ALL.len() as u32 <= COUNTER_SLOTS);
    assert!(core::mem::size_of::<LoopThread>() == 8 + 5 * 8 + 8 * LOOP_BUCKETS);
    assert!(core::mem::size_of::<LoopConfig>() == 8);
};

#[cfg(feature = "user")]
mod user {
    use super::{
        AllocConfig, KernelConfig, LiveAlloc, LoopConfig, LoopThread, LuaLayout, Sample, Target,
    };

    // SAFETY: plain `#[repr(C)]` data without padding (checked above).
    unsafe impl aya::Pod for Target {}
    // SAFETY: as above.
    unsafe impl aya::Pod for LuaLayout {}
    // SAFETY: as above.
    unsafe impl aya::Pod for Sample {}
    // SAFETY: as above.
    unsafe impl aya::Pod for AllocConfig {}
    // SAFETY: as above.
    unsafe impl aya::Pod for LiveAlloc {}
    // SAFETY: as above.
    unsafe impl aya::Pod for KernelConfig {}
    // SAFETY: as above.
    unsafe impl aya::Pod for LoopThread {}
    // SAFETY: as above.
    unsafe impl aya::Pod for LoopConfig {}
}
