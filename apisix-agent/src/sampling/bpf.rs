//! Loading and driving the BPF sampler: loads the object embedded at build time, attaches the
//! `sample` perf_event program on every online CPU at a given frequency (or the off-CPU pair,
//! or the allocator probes of an allocation capture), and owns its maps (targets, LuaJIT
//! layouts, learned VMs, the sample ring buffer, per-reason counters, the live blocks).
//! Dropping the [`BpfSession`] detaches everything.
//!
//! The kernel is a variable: the object is loaded with the offsets the kernel's BTF gives
//! (`KERNEL_CONFIG`, see [`super::kernel`]), and a probe program tells whether `bpf_loop`
//! exists; without it the `*_bounded` variants load, whose Lua walk is shallower
//! ([`BpfSession::kernel`] says which). A refusal is one sentence naming what the kernel
//! lacks ([`super::verifier::explain`]).
//!
//! The event-loop pair ([`BpfSession::attach_event_loop`]) can join any session, on the
//! first of fentry/fexit, the per-call epoll tracepoints ([`super::tracepoints`]) or raw
//! tracepoints that attaches: its per-thread iteration counts are read with
//! [`BpfSession::loop_threads`].
//!
//! Hooks: `perf_event_open` (software CPU clock, one per CPU; uprobes; tracepoints), raw
//! tracepoints, fentry/fexit, `bpf()`. Metrics: the per-reason counters read by [`BpfSession::counters`].

use std::{io, os::fd::AsRawFd as _, time::Duration};

use apisix_ebpf_common::{
    ALLOC_MAX_THREADS, AllocConfig, COUNTER_SLOTS, Counter, KernelConfig, LIVE_MAX_TRACKED,
    LiveAlloc, LuaLayout, MAP_ALLOC_CONFIG, MAP_ALLOC_THREADS, MAP_COUNTERS, MAP_KERNEL_CONFIG,
    MAP_LIVE_ALLOCS, MAP_LOST, MAP_LUA_LAYOUTS, MAP_LUA_VMS, MAP_OFFCPU_MIN, MAP_SAMPLES,
    MAP_TARGETS, PROG_ALLOC, PROG_ALLOC_BOUNDED, PROG_ALLOC_RET, PROG_LEARN_VM, PROG_OFFCPU_EXIT,
    PROG_OFFCPU_EXIT_BOUNDED, PROG_OFFCPU_SWITCH, PROG_PROBE_LOOP, PROG_SAMPLE,
    PROG_SAMPLE_BOUNDED, Sample, Target,
};
use aya::{
    Ebpf, EbpfError,
    maps::{Array, HashMap, MapData, MapError, PerCpuArray, PerCpuHashMap, RingBuf},
    programs::{
        PerfEvent, ProgramError, RawTracePoint, TracePoint, UProbe,
        perf_event::{PerfEventConfig, PerfEventScope, SamplePolicy, SoftwareEvent},
        uprobe::{UProbeLinkId, UProbeScope},
    },
    util::online_cpus,
};

mod eventloop;

pub use eventloop::{LOOP_HOOKS_ENV, LoopHooks};

use super::{
    kernel::{KernelReport, WalkVariant},
    tracepoints,
    verifier::{self, ProgramStats, VerifierError},
};

/// The BPF object built by `build.rs`.
pub(crate) static OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/apisix-ebpf"));

/// Errors of the BPF layer.
#[derive(Debug, thiserror::Error)]
pub enum BpfError {
    /// The kernel refused for lack of privilege.
    #[error(
        "permission denied loading BPF programs: run as root or grant CAP_BPF, CAP_PERFMON and CAP_SYS_PTRACE"
    )]
    Permission {
        #[source]
        source: EbpfError,
    },
    /// The object could not be loaded.
    #[error("loading the BPF object")]
    Load {
        #[source]
        source: EbpfError,
    },
    /// The object was built without BPF programs (`AYA_BUILD_SKIP`).
    #[error("this agent was built without its BPF programs (AYA_BUILD_SKIP); rebuild it")]
    NotBuilt,
    /// A program or map of the object is missing.
    #[error("BPF object lacks {what}")]
    Missing { what: &'static str },
    /// Loading or attaching the program failed.
    #[error("{what}")]
    Program {
        what: String,
        #[source]
        source: ProgramError,
    },
    /// The verifier rejected a program.
    #[error("the kernel {release} refused {program}: {reason}")]
    Verifier {
        program: &'static str,
        release: String,
        reason: String,
    },
    /// A map operation failed.
    #[error("BPF map {map}")]
    Map {
        map: &'static str,
        #[source]
        source: MapError,
    },
    /// The kernel's BTF, for the event-loop pair's fentry/fexit programs.
    #[error("the kernel's BTF (/sys/kernel/btf/vmlinux): {reason}")]
    Btf { reason: String },
    /// The event-loop pair's per-call tracepoints could not be attached.
    #[error("the event-loop pair's epoll tracepoints")]
    Tracepoint {
        #[from]
        source: tracepoints::TracepointError,
    },
    /// Listing CPUs failed.
    #[error("listing online CPUs ({what})")]
    Cpus {
        what: &'static str,
        #[source]
        source: io::Error,
    },
}

fn is_permission(e: &EbpfError) -> bool {
    let text = format!("{e:?}");
    text.contains("PermissionDenied") || text.contains("EPERM") || text.contains("os error 1)")
}

/// One loaded BPF object with its maps and attachments: the CPU sampler
/// ([`Self::start`], [`Self::prepare`]), the off-CPU pair ([`Self::start_offcpu`]) or the
/// allocator probes ([`Self::prepare_alloc`]), plus the `lua_resume` learners of its targets.
pub struct BpfSession {
    ebpf: Ebpf,
    ring: RingBuf<MapData>,
    frequency: u64,
    learners: std::collections::HashMap<u32, UProbeLinkId>,
    /// Allocation captures: the mean distance between sampling points, live mode, and the
    /// probes attached per process (entry, and the return in live mode).
    alloc: AllocConfig,
    alloc_links: Vec<(&'static str, UProbeLinkId)>,
    /// The event-loop pair's per-call tracepoints, when it is attached there.
    loop_links: Vec<tracepoints::Attached>,
    /// What this kernel offers, and the walk variant loaded.
    kernel: KernelReport,
}

impl std::fmt::Debug for BpfSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BpfSession")
            .field("frequency", &self.frequency)
            .finish()
    }
}

impl BpfSession {
    /// Loads the programs and attaches the sampler on every online CPU at `frequency` Hz.
    pub fn start(frequency: u64) -> Result<Self, BpfError> {
        let mut sampler = Self::prepare(frequency)?;
        sampler.attach_cpu()?;
        Ok(sampler)
    }

    /// Loads the programs for CPU sampling at `frequency` Hz without sampling yet: targets
    /// can be added (and their VMs learned) before [`Self::attach_cpu`].
    pub fn prepare(frequency: u64) -> Result<Self, BpfError> {
        let mut sampler = Self::load(Sizes::default())?;
        sampler.frequency = frequency;
        let name = sampler.sample_program();
        let prog: &mut PerfEvent = program(&mut sampler.ebpf, name)?;
        prog.load().map_err(|e| refused(name, e))?;
        Ok(sampler)
    }

    /// The object with its maps, layouts and VM learner loaded, and no other program.
    pub fn loaded_only() -> Result<Self, BpfError> {
        Self::load(Sizes::default())
    }

    /// Loads program `name` as its type `T` (loaded already: nothing to do).
    pub fn load_program<T>(&mut self, name: &'static str) -> Result<(), BpfError>
    where
        for<'a> &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
        T: Loadable,
    {
        let prog: &mut T = program(&mut self.ebpf, name)?;
        match prog.load_it() {
            Ok(()) | Err(ProgramError::AlreadyLoaded) => Ok(()),
            Err(e) => Err(refused(name, e)),
        }
    }

    /// The CPU sampler variant for this kernel.
    fn sample_program(&self) -> &'static str {
        match self.kernel.lua_walk {
            WalkVariant::BpfLoop => PROG_SAMPLE,
            WalkVariant::Bounded => PROG_SAMPLE_BOUNDED,
        }
    }

    /// The off-CPU exit hook variant for this kernel.
    fn offcpu_exit_program(&self) -> &'static str {
        match self.kernel.lua_walk {
            WalkVariant::BpfLoop => PROG_OFFCPU_EXIT,
            WalkVariant::Bounded => PROG_OFFCPU_EXIT_BOUNDED,
        }
    }

    /// The allocator entry probe variant for this kernel.
    fn alloc_program(&self) -> &'static str {
        match self.kernel.lua_walk {
            WalkVariant::BpfLoop => PROG_ALLOC,
            WalkVariant::Bounded => PROG_ALLOC_BOUNDED,
        }
    }

    /// What this kernel offers the programs, and the variant loaded.
    pub fn kernel(&self) -> &KernelReport {
        &self.kernel
    }

    /// Attaches the prepared sampler on every online CPU.
    pub fn attach_cpu(&mut self) -> Result<(), BpfError> {
        let frequency = self.frequency;
        let name = self.sample_program();
        let prog: &mut PerfEvent = program(&mut self.ebpf, name)?;
        let cpus = online_cpus().map_err(|(what, source)| BpfError::Cpus { what, source })?;
        for cpu in cpus {
            prog.attach(
                PerfEventConfig::Software(SoftwareEvent::CpuClock),
                PerfEventScope::AllProcessesOneCpu { cpu },
                SamplePolicy::Frequency(frequency),
                true,
            )
            .map_err(|source| BpfError::Program {
                what: format!("attaching the sampler on CPU {cpu}"),
                source,
            })?;
        }
        Ok(())
    }

    /// Loads the programs and attaches the off-CPU pair (raw tracepoints on `sched_switch`
    /// and `sys_exit`): each block of a target thread inside a system call of at least
    /// `min_block_us` comes out as a sample weighted by its microseconds. Needs no tracefs,
    /// no kprobes; without the kernel's BTF a switch that is not a preemption counts as a
    /// block.
    pub fn start_offcpu(min_block_us: u64) -> Result<Self, BpfError> {
        let mut sampler = Self::load(Sizes::default())?;
        let exit = sampler.offcpu_exit_program();
        for (name, tracepoint) in [(PROG_OFFCPU_SWITCH, "sched_switch"), (exit, "sys_exit")] {
            let prog: &mut RawTracePoint = program(&mut sampler.ebpf, name)?;
            prog.load().map_err(|e| refused(name, e))?;
            prog.attach(tracepoint)
                .map_err(|source| BpfError::Program {
                    what: format!("attaching to {tracepoint}"),
                    source,
                })?;
        }
        sampler.set_offcpu_min(min_block_us)?;
        Ok(sampler)
    }

    /// Sets the shortest block the off-CPU programs write; `u64::MAX` holds them (every
    /// block counts as short).
    pub fn set_offcpu_min(&mut self, min_block_us: u64) -> Result<(), BpfError> {
        self.set_slot(MAP_OFFCPU_MIN, 0, min_block_us.saturating_mul(1000))
    }

    /// Loads the programs of an allocation capture: the allocator's uprobe and, with `live`,
    /// its uretprobe; attaches nothing yet ([`Self::attach_alloc`] per process) and holds
    /// them until [`Self::release_alloc`]. `sample_bytes` is the mean distance between two
    /// sampling points.
    pub fn prepare_alloc(sample_bytes: u64, live: bool) -> Result<Self, BpfError> {
        let mut sampler = Self::load(Sizes {
            live: if live { LIVE_MAX_TRACKED } else { 1 },
            threads: ALLOC_MAX_THREADS,
        })?;
        sampler.alloc = AllocConfig {
            sample_bytes,
            live: u32::from(live),
            reserved: 0,
        };
        let mut names = vec![sampler.alloc_program()];
        if live {
            names.push(PROG_ALLOC_RET);
        }
        for name in names {
            let prog: &mut UProbe = program(&mut sampler.ebpf, name)?;
            prog.load().map_err(|e| refused(name, e))?;
        }
        sampler.hold_alloc()?;
        Ok(sampler)
    }

    /// Attaches the allocator probes to process `pid` at `offset` in `file` (a path the
    /// agent can open, e.g. `/proc/PID/map_files/…`): the return probe first (live mode), so
    /// that no call is seen entering without its return.
    pub fn attach_alloc(
        &mut self,
        pid: u32,
        file: &std::path::Path,
        offset: u64,
    ) -> Result<(), BpfError> {
        let Some(nz) = std::num::NonZeroU32::new(pid) else {
            return Ok(());
        };
        let mut names = Vec::new();
        if self.alloc.live != 0 {
            names.push(PROG_ALLOC_RET);
        }
        let entry = self.alloc_program();
        names.push(entry);
        for name in names {
            let prog: &mut UProbe = program(&mut self.ebpf, name)?;
            let link = prog
                .attach(offset, file, UProbeScope::OneProcess(nz))
                .map_err(|source| BpfError::Program {
                    what: format!(
                        "attaching the allocator {} to {}+{offset:#x} (pid {pid})",
                        if name == entry { "uprobe" } else { "uretprobe" },
                        file.display()
                    ),
                    source,
                })?;
            self.alloc_links.push((name, link));
        }
        Ok(())
    }

    /// Lets the allocator probes count and sample.
    pub fn release_alloc(&mut self) -> Result<(), BpfError> {
        self.write_alloc_config(self.alloc.sample_bytes, self.alloc.live)
    }

    /// Live mode after the capture: nothing more is counted or sampled, but frees and
    /// resizes of the tracked blocks are still followed (see [`Self::hold_alloc`]).
    pub fn settle_alloc(&mut self) -> Result<(), BpfError> {
        self.write_alloc_config(0, self.alloc.live)
    }

    /// Holds the allocator probes: calls from now on change nothing, and the live blocks
    /// stay as they are.
    pub fn hold_alloc(&mut self) -> Result<(), BpfError> {
        self.write_alloc_config(0, 0)
    }

    fn write_alloc_config(&mut self, sample_bytes: u64, live: u32) -> Result<(), BpfError> {
        let config = AllocConfig {
            sample_bytes,
            live,
            reserved: 0,
        };
        self.set_slot(MAP_ALLOC_CONFIG, 0, config)
    }

    /// Detaches the allocator probes (unregistering a uprobe waits for RCU grace periods:
    /// call it once the ring buffer needs no more draining).
    pub fn detach_alloc(&mut self) {
        for (name, link) in std::mem::take(&mut self.alloc_links) {
            if let Some(prog) = self.ebpf.program_mut(name)
                && let Ok(prog) = <&mut UProbe>::try_from(prog)
                && let Err(e) = prog.detach(link)
            {
                tracing::debug!(program = name, error = %e, "detaching an allocator probe");
            }
        }
    }

    /// The blocks live mode still tracks: address and entry.
    pub fn live_allocs(&self) -> Result<Vec<(u64, LiveAlloc)>, BpfError> {
        let map = self.ebpf.map(MAP_LIVE_ALLOCS).ok_or(BpfError::Missing {
            what: "the live allocations map",
        })?;
        let live: HashMap<_, u64, LiveAlloc> =
            HashMap::try_from(map).map_err(|source| BpfError::Map {
                map: MAP_LIVE_ALLOCS,
                source,
            })?;
        // An entry removed between listing its key and reading it is skipped.
        Ok(live.iter().filter_map(Result::ok).collect())
    }

    /// The `global_State` address the BPF side learned for process `pid`.
    pub fn lua_vm(&self, pid: u32) -> Option<u64> {
        self.ebpf
            .map(MAP_LUA_VMS)
            .and_then(|m| HashMap::<_, u32, u64>::try_from(m).ok())
            .and_then(|m| m.get(&pid, 0).ok())
    }

    /// Tells the BPF side the `global_State` of process `pid` (learned by another session).
    pub fn set_vm(&mut self, pid: u32, g: u64) -> Result<(), BpfError> {
        let map = self.ebpf.map_mut(MAP_LUA_VMS).ok_or(BpfError::Missing {
            what: "the Lua VMs map",
        })?;
        let mut vms: HashMap<_, u32, u64> =
            HashMap::try_from(map).map_err(|source| BpfError::Map {
                map: MAP_LUA_VMS,
                source,
            })?;
        vms.insert(pid, g, 0).map_err(|source| BpfError::Map {
            map: MAP_LUA_VMS,
            source,
        })
    }

    /// Loads the object, the ring buffer, the `lua_resume` uprobe and the layouts; attaches
    /// nothing that samples.
    fn load(sizes: Sizes) -> Result<Self, BpfError> {
        if OBJECT.is_empty() {
            return Err(BpfError::NotBuilt);
        }
        raise_memlock();
        let mut ebpf = aya::EbpfLoader::new()
            .map_max_entries(MAP_LIVE_ALLOCS, sizes.live)
            .map_max_entries(MAP_ALLOC_THREADS, sizes.threads)
            .load(OBJECT)
            .map_err(|source| {
                if is_permission(&source) {
                    BpfError::Permission { source }
                } else {
                    BpfError::Load { source }
                }
            })?;
        let ring = RingBuf::try_from(ebpf.take_map(MAP_SAMPLES).ok_or(BpfError::Missing {
            what: "the samples ring buffer",
        })?)
        .map_err(|source| BpfError::Map {
            map: MAP_SAMPLES,
            source,
        })?;
        let learn: &mut UProbe = program(&mut ebpf, PROG_LEARN_VM)?;
        learn.load().map_err(|e| refused(PROG_LEARN_VM, e))?;
        let (config, btf_error) = match super::kernel::kernel_config() {
            Ok(c) => (c, None),
            Err(e) => {
                let why = crate::error::error_chain(&e);
                tracing::warn!(error = %why, "no kernel BTF offsets: samples in kernel mode are dropped, off-CPU counts every non-preempted switch as a block");
                (KernelConfig::default(), Some(why))
            }
        };
        let variant = probe_walk(&mut ebpf);
        let mut sampler = Self {
            ebpf,
            ring,
            frequency: 0,
            learners: std::collections::HashMap::new(),
            alloc: AllocConfig::default(),
            alloc_links: Vec::new(),
            loop_links: Vec::new(),
            kernel: KernelReport::new(variant, &config, btf_error),
        };
        sampler.set_kernel_config(config)?;
        for (slot, layout) in crate::luajit::LAYOUT_SLOTS {
            sampler.set_layout(slot, layout.bpf)?;
        }
        Ok(sampler)
    }

    /// Whether the `global_State` of process `pid` is known to the BPF side.
    pub fn vm_known(&self, pid: u32) -> bool {
        self.lua_vm(pid).is_some()
    }

    /// Attaches the `lua_resume` uprobe to process `pid` (whose LuaJIT is in `library`, a
    /// path as the process sees it) until its VM is learned; see [`Self::retire_learners`].
    pub fn learn_vm(&mut self, pid: u32, library: &str) -> Result<(), BpfError> {
        if self.learners.contains_key(&pid) || self.vm_known(pid) {
            return Ok(());
        }
        let Some(nz) = std::num::NonZeroU32::new(pid) else {
            return Ok(());
        };
        // Through the kernel's link to the file the process really mapped, never by the path
        // it shows (which it controls: a symlink there would resolve in the agent's root).
        let path = library_link(pid, library).ok_or_else(|| BpfError::Missing {
            what: "a regular, mapped LuaJIT library file of reasonable size",
        })?;
        let prog: &mut UProbe = program(&mut self.ebpf, PROG_LEARN_VM)?;
        let link = prog
            .attach("lua_resume", &path, UProbeScope::OneProcess(nz))
            .map_err(|source| BpfError::Program {
                what: format!("attaching the lua_resume uprobe to {path}"),
                source,
            })?;
        self.learners.insert(pid, link);
        Ok(())
    }

    /// Detaches the learning uprobes of processes whose VM is known or that are gone.
    pub fn retire_learners(&mut self) {
        let done: Vec<u32> = self
            .learners
            .keys()
            .copied()
            .filter(|pid| self.vm_known(*pid) || !crate::proc::process::exists(*pid))
            .collect();
        for pid in done {
            self.retire_learner(pid);
        }
    }

    /// Starts sampling process `pid`, walking its Lua stacks when `lua` is given, and
    /// attaches the VM-learning uprobe for it.
    pub fn add_process(
        &mut self,
        pid: u32,
        lua: Option<&crate::luajit::LuaTarget>,
    ) -> Result<(), BpfError> {
        let mut target = lua.map_or(
            Target {
                layout: apisix_ebpf_common::LAYOUT_NONE,
                ..Default::default()
            },
            crate::luajit::LuaTarget::bpf_target,
        );
        // Without it the main thread's stack copy probes for the end of the mapping.
        target.stack_top = crate::proc::process::main_stack_top(pid).unwrap_or(0);
        self.add_target(pid, target)?;
        if let Some(lua) = lua
            && let Err(e) = self.learn_vm(pid, &lua.library)
        {
            tracing::warn!(pid, error = %e, "no lua_resume uprobe; the Lua VM is learned from samples only");
        }
        Ok(())
    }

    /// Starts sampling process `pid`.
    pub fn add_target(&mut self, pid: u32, target: Target) -> Result<(), BpfError> {
        let map = self.ebpf.map_mut(MAP_TARGETS).ok_or(BpfError::Missing {
            what: "the targets map",
        })?;
        let mut targets: HashMap<_, u32, Target> =
            HashMap::try_from(map).map_err(|source| BpfError::Map {
                map: MAP_TARGETS,
                source,
            })?;
        targets
            .insert(pid, target, 0)
            .map_err(|source| BpfError::Map {
                map: MAP_TARGETS,
                source,
            })
    }

    /// Stops sampling process `pid` and forgets what the BPF side knew about it.
    pub fn remove_target(&mut self, pid: u32) {
        for name in [MAP_TARGETS, MAP_LUA_VMS, MAP_LOST] {
            if let Some(map) = self.ebpf.map_mut(name) {
                // Value types differ per map; removal only needs the key type.
                let removed = match name {
                    MAP_TARGETS => {
                        HashMap::<_, u32, Target>::try_from(map).map(|mut m| m.remove(&pid).is_ok())
                    }
                    MAP_LOST => PerCpuHashMap::<_, u32, u64>::try_from(map)
                        .map(|mut m| m.remove(&pid).is_ok()),
                    _ => HashMap::<_, u32, u64>::try_from(map).map(|mut m| m.remove(&pid).is_ok()),
                };
                if let Err(e) = removed {
                    tracing::debug!(pid, map = name, error = %e, "removing a target");
                }
            }
        }
        self.retire_learner(pid);
    }

    /// Detaches the learning uprobe of `pid` on a thread of its own: unregistering a uprobe
    /// waits for RCU grace periods (seconds on a loaded machine), during which the ring
    /// buffer must keep being drained.
    fn retire_learner(&mut self, pid: u32) {
        if let Some(link) = self.learners.remove(&pid)
            && let Some(prog) = self.ebpf.program_mut(PROG_LEARN_VM)
            && let Ok(prog) = <&mut UProbe>::try_from(prog)
            && let Ok(link) = prog.take_link(link)
        {
            let spawned = std::thread::Builder::new()
                .name("uprobe-detach".into())
                .spawn(move || drop(link));
            if let Err(e) = spawned {
                tracing::debug!(pid, error = %e, "detaching a uprobe inline");
            }
        }
    }

    /// Samples lost per process because the ring buffer was full (cumulative).
    pub fn lost(&self) -> std::collections::HashMap<u32, u64> {
        self.ebpf
            .map(MAP_LOST)
            .and_then(|m| PerCpuHashMap::<_, u32, u64>::try_from(m).ok())
            .map(|m| {
                m.iter()
                    .filter_map(Result::ok)
                    .map(|(pid, per_cpu)| (pid, per_cpu.iter().sum()))
                    .collect()
            })
            .unwrap_or_default()
    }

    fn set_kernel_config(&mut self, config: KernelConfig) -> Result<(), BpfError> {
        self.set_slot(MAP_KERNEL_CONFIG, 0, config)
    }

    /// Writes `value` into slot `index` of the array map `name`.
    fn set_slot<T: aya::Pod>(
        &mut self,
        name: &'static str,
        index: u32,
        value: T,
    ) -> Result<(), BpfError> {
        let map_err = |source| BpfError::Map { map: name, source };
        let map = self
            .ebpf
            .map_mut(name)
            .ok_or(BpfError::Missing { what: name })?;
        let mut array: Array<_, T> = Array::try_from(map).map_err(map_err)?;
        array.set(index, value, 0).map_err(map_err)
    }

    /// The programs this kernel runs, in the variant it loads: the CPU sampler, the off-CPU
    /// pair, the event-loop pair, the allocator probes and the VM learner.
    pub fn kernel_programs(&self) -> Vec<&'static str> {
        let mut programs = vec![
            self.sample_program(),
            PROG_OFFCPU_SWITCH,
            self.offcpu_exit_program(),
        ];
        programs.extend(eventloop::programs());
        programs.extend([self.alloc_program(), PROG_ALLOC_RET, PROG_LEARN_VM]);
        programs
    }

    /// The verifier's figures for `programs`, from a second load of each (see
    /// [`super::verifier`]).
    pub fn verifier_stats(&self, programs: &[&str]) -> Result<Vec<ProgramStats>, VerifierError> {
        let maps = self
            .ebpf
            .maps()
            .filter_map(|(name, map)| verifier::map_fd(map).map(|fd| (name, fd)))
            .chain(std::iter::once((MAP_SAMPLES, self.ring.as_raw_fd())));
        verifier::program_stats(OBJECT, maps, programs)
    }

    /// Installs a LuaJIT layout in slot `index`.
    fn set_layout(&mut self, index: u32, layout: LuaLayout) -> Result<(), BpfError> {
        self.set_slot(MAP_LUA_LAYOUTS, index, layout)
    }

    /// Sums of the per-CPU counters, indexed by [`Counter`].
    pub fn counters(&self) -> Result<[u64; COUNTER_SLOTS as usize], BpfError> {
        let map = self.ebpf.map(MAP_COUNTERS).ok_or(BpfError::Missing {
            what: "the counters map",
        })?;
        let counters: PerCpuArray<_, u64> =
            PerCpuArray::try_from(map).map_err(|source| BpfError::Map {
                map: MAP_COUNTERS,
                source,
            })?;
        let mut out = [0u64; COUNTER_SLOTS as usize];
        for c in Counter::ALL {
            let values = counters
                .get(&(c as u32), 0)
                .map_err(|source| BpfError::Map {
                    map: MAP_COUNTERS,
                    source,
                })?;
            out[c as usize] = values.iter().sum();
        }
        Ok(out)
    }

    /// Waits up to `timeout` for samples, then hands each one to `f`. Returns how many.
    pub fn poll(&mut self, timeout: Duration, mut f: impl FnMut(&Sample)) -> usize {
        let mut n = self.drain(&mut f);
        if n > 0 {
            return n;
        }
        let mut pfd = libc::pollfd {
            fd: self.ring.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
        // SAFETY: one valid pollfd for the duration of the call.
        unsafe { libc::poll(&mut pfd, 1, ms) };
        n += self.drain(&mut f);
        n
    }

    fn drain(&mut self, f: &mut impl FnMut(&Sample)) -> usize {
        let mut n = 0;
        while let Some(item) = self.ring.next() {
            if item.len() >= std::mem::size_of::<Sample>() {
                // SAFETY: the BPF side writes whole `Sample`s; read unaligned into a box so
                // the (large) value does not live on the stack.
                let mut boxed: Box<std::mem::MaybeUninit<Sample>> = Box::new_uninit();
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        item.as_ptr(),
                        boxed.as_mut_ptr().cast::<u8>(),
                        std::mem::size_of::<Sample>(),
                    );
                }
                // SAFETY: fully initialized by the copy above; every bit pattern is valid.
                let sample = unsafe { boxed.assume_init() };
                f(&sample);
                n += 1;
            }
        }
        n
    }
}

/// The largest library file the `lua_resume` uprobe's symbol lookup reads (aya reads it whole).
const MAX_LIBRARY_BYTES: u64 = 256 << 20;

/// `/proc/PID/map_files/START-END` of a mapping of `library` in process `pid`, if it is a
/// regular file of at most [`MAX_LIBRARY_BYTES`].
fn library_link(pid: u32, library: &str) -> Option<String> {
    let maps = crate::proc::process::read_maps(pid).ok()?;
    let m = maps.iter().find(|m| m.path == library)?;
    let link = format!(
        "/proc/{pid}/map_files/{:x}-{:x}",
        m.range.start, m.range.end
    );
    let meta = std::fs::metadata(&link).ok()?;
    (meta.is_file() && meta.len() <= MAX_LIBRARY_BYTES).then_some(link)
}

/// A program type whose `load` takes no arguments.
pub trait Loadable {
    /// `load()`.
    fn load_it(&mut self) -> Result<(), ProgramError>;
}

impl Loadable for PerfEvent {
    fn load_it(&mut self) -> Result<(), ProgramError> {
        self.load()
    }
}

impl Loadable for RawTracePoint {
    fn load_it(&mut self) -> Result<(), ProgramError> {
        self.load()
    }
}

impl Loadable for TracePoint {
    fn load_it(&mut self) -> Result<(), ProgramError> {
        self.load()
    }
}

impl Loadable for UProbe {
    fn load_it(&mut self) -> Result<(), ProgramError> {
        self.load()
    }
}

/// Entries of the maps sized at load: only allocation captures need their full size.
struct Sizes {
    live: u32,
    threads: u32,
}

impl Default for Sizes {
    fn default() -> Self {
        Self {
            live: 1,
            threads: 1,
        }
    }
}

/// The program `name` of the object, as its type `T` (`PerfEvent`, `UProbe`, …).
fn program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, BpfError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or(BpfError::Missing { what: name })?
        .try_into()
        .map_err(|source| BpfError::Program {
            what: format!("{name} has an unexpected program type"),
            source,
        })
}

/// A program the kernel refused, in one sentence naming what it lacks (the whole log can be
/// megabytes; its last lines go to the debug log).
fn refused(program: &'static str, source: ProgramError) -> BpfError {
    let text = match &source {
        ProgramError::LoadError {
            io_error,
            verifier_log,
        } => format!("{io_error}\n{verifier_log}"),
        other => other.to_string(),
    };
    let tail: Vec<&str> = text.lines().rev().take(20).collect();
    tracing::debug!(program, log_tail = %tail.into_iter().rev().collect::<Vec<_>>().join("\n"), "verifier log");
    BpfError::Verifier {
        program,
        release: super::kernel::release(),
        reason: verifier::explain(&text),
    }
}

/// Environment variable that forces the bounded Lua walk (`bounded`) where `bpf_loop`
/// exists: for tests of that variant on new kernels, or to work around a kernel's bug.
pub const LUA_WALK_ENV: &str = "APISIX_AGENT_LUA_WALK";

/// Which Lua walk this kernel can load: `bpf_loop` if the probe program loads.
fn probe_walk(ebpf: &mut Ebpf) -> WalkVariant {
    if std::env::var(LUA_WALK_ENV).is_ok_and(|v| v == "bounded") {
        return WalkVariant::Bounded;
    }
    let Ok(prog) = program::<PerfEvent>(ebpf, PROG_PROBE_LOOP) else {
        return WalkVariant::Bounded;
    };
    match prog.load() {
        Ok(()) => WalkVariant::BpfLoop,
        Err(e) => {
            tracing::info!(reason = %verifier::explain(&e.to_string()), "no bpf_loop on this kernel: the Lua walk is bounded to {} frames", WalkVariant::Bounded.max_lua_frames());
            WalkVariant::Bounded
        }
    }
}

/// Raises RLIMIT_MEMLOCK for kernels that still charge BPF maps to it.
fn raise_memlock() {
    let rlim = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: plain syscall with a valid pointer.
    let ret = unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &rlim) };
    if ret != 0 {
        tracing::debug!(error = %io::Error::last_os_error(), "could not raise RLIMIT_MEMLOCK");
    }
}
