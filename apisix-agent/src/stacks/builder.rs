//! Turns raw samples into named stacks, root first: native unwinding ([`super::unwind`]),
//! symbolization ([`crate::proc::symbolize`]), Lua frame naming ([`crate::luajit`]) and the
//! splice of Lua frames into the native stack at the VM boundary.
//!
//! Per-process state (open files, unwinder, LuaJIT target) is kept here and created on the
//! first sample of a process. Hooks: `/proc/PID/*` through [`crate::proc`]. Metrics: the
//! [`StackStats`] counters, read by the caller.

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
    time::{Duration, Instant},
};

use apisix_ebpf_common::{LuaFrame, LuaState, MAX_LUA_FRAMES, STACK_COPY_MAX, Sample};

use super::{
    names::LuaNamer,
    unwind::{NativeUnwinder, UnwindEnd},
};
use crate::{
    label::{FrameDetail, ModuleId},
    luajit::{
        LuaTarget, NameStyle, VmState,
        trace::{TraceFallback, TraceFrames, TraceSample, Tracer},
    },
    proc::{
        memory::Memory,
        modules::{ElfFile, ProcessModules},
        symbolize::Symbolizer,
    },
};

/// How stacks are labelled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StackOptions {
    /// First or current line of Lua frames.
    pub style: NameStyle,
    /// A `[trace N]` pseudo-frame where a JIT trace runs, above its physical base frame
    /// (for JIT tuning).
    pub trace_frames: bool,
}

/// Caps in bytes of the caches fed by target memory (`limits:` in the configuration).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheLimits {
    /// Lua prototypes read from targets (each up to 1 MiB).
    pub proto_bytes: usize,
    /// Interned Lua frame labels (function, chunk name, line).
    pub label_bytes: usize,
    /// Decoded JIT traces.
    pub trace_bytes: usize,
}

impl Default for CacheLimits {
    fn default() -> Self {
        Self {
            proto_bytes: 16 << 20,
            label_bytes: 8 << 20,
            trace_bytes: crate::luajit::trace::DEFAULT_CACHE_BYTES,
        }
    }
}

impl Default for StackOptions {
    fn default() -> Self {
        Self {
            style: NameStyle::FirstLine,
            trace_frames: false,
        }
    }
}

/// Outcome counters of stack building.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct StackStats {
    /// Samples turned into stacks.
    pub samples: u64,
    /// Native unwinds that reached the outermost frame.
    pub native_complete: u64,
    /// Native unwinds that stopped early.
    pub native_truncated: u64,
    /// Samples with Lua frames spliced in.
    pub lua_spliced: u64,
    /// Samples whose process could not be read.
    pub unreadable: u64,
    /// Deepest Lua stack seen.
    pub max_lua_depth: u64,
    /// Samples per LuaJIT VM state, indexed by [`VmState::index`].
    pub vm_states: [u64; VmState::ALL.len()],
    /// Samples taken while a trace ran (in its code or in C code it called).
    pub trace_samples: u64,
    /// Trace samples given at least one frame the trace inlined.
    pub trace_inlined: u64,
    /// Trace samples that kept only their physical frames, by [`TraceFallback::index`].
    pub trace_fallbacks: [u64; TraceFallback::ALL.len()],
}

struct ProcState {
    modules: ProcessModules,
    unwinder: NativeUnwinder,
    lua: Option<LuaTarget>,
    loaded: Instant,
}

/// Builds named stacks from samples.
pub struct StackBuilder {
    procs: HashMap<u32, ProcState>,
    files: HashMap<String, Arc<ElfFile>>,
    symbolizer: Symbolizer,
    namer: LuaNamer,
    tracer: Tracer,
    last_vm_state: Option<VmState>,
    /// The details of the frames of the stack last built, in the same order.
    last_details: Vec<FrameDetail>,
    /// Whether a `[trace N]` pseudo-frame marks where a trace runs.
    trace_marker: bool,
    style: NameStyle,
    stats: StackStats,
    /// LuaJIT targets registered by the caller (detected when the target was added).
    lua_targets: HashMap<u32, LuaTarget>,
    /// Module (file name) of each native frame label produced.
    module_of: HashMap<Arc<str>, Arc<str>>,
    /// The interned id of each module, by the address of its open file (in `files`, which
    /// keeps it from being reused while the entry lives), for frame details.
    module_ids: HashMap<usize, Option<ModuleId>>,
}

impl std::fmt::Debug for StackBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StackBuilder")
            .field("procs", &self.procs.len())
            .field("stats", &self.stats)
            .finish()
    }
}

/// Minimum time between two reloads of a process's modules (new code mapped by dlopen).
const RELOAD_INTERVAL: Duration = Duration::from_secs(2);

impl StackBuilder {
    /// A builder naming Lua frames in `style`.
    pub fn new(opts: StackOptions) -> Self {
        let StackOptions {
            style,
            trace_frames,
        } = opts;
        Self {
            procs: HashMap::new(),
            files: HashMap::new(),
            symbolizer: Symbolizer::new(),
            namer: LuaNamer::new(),
            tracer: Tracer::new(),
            last_vm_state: None,
            last_details: Vec::new(),
            trace_marker: trace_frames,
            style,
            stats: StackStats::default(),
            lua_targets: HashMap::new(),
            module_of: HashMap::new(),
            module_ids: HashMap::new(),
        }
    }

    /// Forgets everything about process `pid` (it exited or is no longer a target).
    pub fn forget(&mut self, pid: u32) {
        self.procs.remove(&pid);
        self.lua_targets.remove(&pid);
        self.namer.forget(pid);
        self.tracer.forget(pid);
        // Files no process maps any more are closed, and what the symbolizer read from them
        // is dropped.
        let open = self.files.len();
        self.files.retain(|_, f| Arc::strong_count(f) > 1);
        if self.files.len() < open {
            self.files_closed();
        }
    }

    /// Drops what is keyed by the address of a file no longer open, before a file opened
    /// later can take that address (and inherit its symbols or module id).
    fn files_closed(&mut self) {
        let live: HashSet<usize> = self
            .files
            .values()
            .map(|f| Arc::as_ptr(f) as usize)
            .collect();
        self.module_ids.retain(|elf, _| live.contains(elf));
        self.symbolizer.retain_files(&live);
    }

    /// User-side Lua naming errors by reason (prototypes unreadable, freed, invalid).
    pub fn lua_errors(&self) -> &HashMap<&'static str, u64> {
        &self.namer.errors
    }

    /// The module (file name) of a native frame label this builder produced.
    pub fn module_of(&self, label: &str) -> Option<&Arc<str>> {
        self.module_of.get(label)
    }

    /// The LuaJIT VM state of the sample last built (`None`: no Lua running).
    pub fn last_vm_state(&self) -> Option<VmState> {
        self.last_vm_state
    }

    /// What the labels of the stack last built do not say (current lines, modules, frames a
    /// trace inlined), one entry per frame in the same order.
    pub fn last_details(&self) -> &[FrameDetail] {
        &self.last_details
    }

    /// Traces read and decoded so far (the rest were served from the cache).
    pub fn traces_decoded(&self) -> u64 {
        self.tracer.decoded
    }

    /// Caps the caches fed by target memory at `limits`.
    pub fn set_cache_limits(&mut self, limits: CacheLimits) {
        self.namer.set_limits(limits);
        self.tracer.set_max_bytes(limits.trace_bytes);
    }

    /// Bytes held by the caches fed by target memory: (prototypes, labels, traces).
    pub fn cached_bytes(&self) -> (usize, usize, usize) {
        let (protos, labels) = self.namer.cached_bytes();
        (protos, labels, self.tracer.cached_bytes())
    }

    /// Counters so far.
    pub fn stats(&self) -> StackStats {
        self.stats
    }

    /// Registers the LuaJIT runtime of process `pid`.
    pub fn set_lua_target(&mut self, pid: u32, target: LuaTarget) {
        if let Some(p) = self.procs.get_mut(&pid) {
            p.lua = Some(target.clone());
        }
        self.lua_targets.insert(pid, target);
    }

    /// Makes sure the state of `pid` is loaded (reloading it when `ip` is in no known module).
    /// Returns whether it is available.
    fn ensure_proc(&mut self, pid: u32, ip: u64) -> bool {
        let stale = match self.procs.get(&pid) {
            None => true,
            Some(p) => p.modules.find(ip).is_none() && p.loaded.elapsed() > RELOAD_INTERVAL,
        };
        if stale {
            match ProcessModules::load(pid, &mut self.files) {
                Ok(modules) => {
                    let unwinder = NativeUnwinder::new(&modules);
                    let lua = self.lua_targets.get(&pid).cloned();
                    self.procs.insert(
                        pid,
                        ProcState {
                            modules,
                            unwinder,
                            lua,
                            loaded: Instant::now(),
                        },
                    );
                }
                Err(e) => {
                    if !self.procs.contains_key(&pid) {
                        tracing::debug!(pid, error = %e, "process unreadable");
                        return false;
                    }
                }
            }
        }
        true
    }

    /// Loads the state of `pid` ahead of its first sample, while it surely is alive.
    pub fn prepare(&mut self, pid: u32) -> bool {
        self.ensure_proc(pid, 0)
    }

    /// Builds the stack of one sample, root first. `None` when the process is unknown and
    /// unreadable (it exited before its first sample was processed). Three steps: the
    /// native frames ([`Self::native_step`]), the frames a JIT trace inlined
    /// ([`Self::trace_step`]), and the Lua frames spliced in at the VM boundary
    /// ([`Self::lua_step`]); kernel frames go on top.
    pub fn build(&mut self, s: &Sample) -> Option<Vec<Arc<str>>> {
        let pid = s.pid;
        if !self.ensure_proc(pid, s.regs.ip) {
            self.stats.unreadable += 1;
            return None;
        }
        self.stats.samples += 1;
        tracing::trace!(
            pid,
            tid = s.tid,
            ip = format_args!("{:#x}", s.regs.ip),
            lua_state = s.lua_state,
            lua_error = s.lua_error,
            vmstate = s.vmstate,
            lua_len = s.lua_len,
            "sample"
        );
        let stack = &s.stack[..(s.stack_len as usize).min(STACK_COPY_MAX)];
        let walked = &s.lua[..(s.lua_len as usize).min(MAX_LUA_FRAMES)];
        let (native, end) = Self::native_step(self.procs.get_mut(&pid)?, s, stack, walked);
        match end {
            UnwindEnd::Complete => self.stats.native_complete += 1,
            UnwindEnd::Truncated => self.stats.native_truncated += 1,
        }
        let traced = self.trace_step(s, stack, walked, &native);
        let with_inlined: Vec<LuaFrame>;
        let lua_frames = match &traced {
            Some((_, Some(t))) => {
                let mut all = t.snap.frames.clone();
                let first = all.len();
                all.extend_from_slice(walked);
                if t.snap.base_pc != 0
                    && let Some(base) = all.get_mut(first)
                {
                    base.pc = t.snap.base_pc;
                }
                with_inlined = all;
                &with_inlined[..]
            }
            _ => walked,
        };
        let named = self.name_native(pid, &native)?;
        let mut out = self.lua_step(s, named, lua_frames, traced.as_ref())?;
        // Kernel frames come leaf first; they go on top of the user leaf.
        let kframes: Vec<Arc<str>> = s.kstack[..(s.kstack_len as usize).min(s.kstack.len())]
            .iter()
            .filter(|a| **a != 0)
            .map(|a| self.symbolizer.kernel(*a))
            .skip_while(|f| is_tracing_frame(f))
            .collect();
        out.extend(
            kframes
                .into_iter()
                .rev()
                .map(|k| (k, FrameDetail::default())),
        );
        if out.is_empty() {
            out.push((Arc::from("[unknown]"), FrameDetail::default()));
        }
        let (labels, details): (Vec<Arc<str>>, Vec<FrameDetail>) = out.into_iter().unzip();
        self.last_details = details;
        Some(labels)
    }

    /// Native frames of `s`, leaf first, unwound over `.eh_frame`; below JIT-compiled trace
    /// code (no unwind info) unwinding resumes under the VM's C frame.
    fn native_step(
        proc: &mut ProcState,
        s: &Sample,
        stack: &[u8],
        lua_frames: &[LuaFrame],
    ) -> (Vec<u64>, UnwindEnd) {
        let vm = proc.lua.as_ref().map(|t| t.vm_range.clone());
        let in_vm = |a: u64| vm.as_ref().is_some_and(|r| r.contains(&a));
        let mut native = Vec::with_capacity(64);
        let mut end = match vm_subroutine_return(s.regs.ip, stack, &in_vm) {
            // Inside a leaf subroutine the interpreter calls (`lj_vm_mod`, `lj_vm_floor`…):
            // its return address is on top of the stack, under the VM's own frame, which
            // the VM's unwind rule does not account for.
            Some(ret) => {
                native.push(s.regs.ip);
                proc.unwinder
                    .unwind(ret, s.regs.sp + 8, s.regs.bp, &stack[8..], &mut native)
            }
            None => proc
                .unwinder
                .unwind(s.regs.ip, s.regs.sp, s.regs.bp, stack, &mut native),
        };
        // Unwinding stops in JIT-compiled trace code (no unwind info): resume below the VM's
        // C frame, whose address the BPF side read from `L->cframe`.
        if end == UnwindEnd::Truncated
            && !lua_frames.is_empty()
            && !native.iter().any(|a| in_vm(*a))
            && let Some(vm) = vm.as_ref()
        {
            let cframe = s.lua_cframe & !3;
            if cframe >= s.regs.sp && cframe < s.regs.sp + stack.len() as u64 {
                native.retain(|a| proc.modules.find(*a).is_some());
                let body = vm.start + (vm.end - vm.start) / 2;
                let off = (cframe - s.regs.sp) as usize;
                let mut below = Vec::new();
                // The stack is as complete as the part below the VM's C frame.
                end = proc
                    .unwinder
                    .unwind(body, cframe, 0, &stack[off..], &mut below);
                native.extend(below);
            }
        }
        (native, end)
    }

    /// Trace code: the frames the trace inlined, from the snapshot in effect at the sampled
    /// IP, or at the return address into the trace of the C code it called. Also records
    /// the sample's VM state. `None` when the sample is not in a trace; else the trace
    /// number `vmstate` names and the frames, `None` when it fell back (counted by reason).
    fn trace_step(
        &mut self,
        s: &Sample,
        stack: &[u8],
        lua_frames: &[LuaFrame],
        native: &[u64],
    ) -> Option<(i32, Option<TraceFrames>)> {
        let pid = s.pid;
        let proc = self.procs.get(&pid)?;
        let state = LuaState::from_raw(s.lua_state);
        let in_jit_code = proc.modules.find(s.regs.ip).is_none();
        self.last_vm_state = VmState::of(state, in_jit_code);
        if let Some(v) = self.last_vm_state {
            self.stats.vm_states[v.index()] += 1;
        }
        if state != LuaState::Trace || s.vmstate < 0 || lua_frames.is_empty() {
            return None;
        }
        let lua = proc.lua.as_ref()?;
        self.stats.trace_samples += 1;
        let ip = s.regs.ip;
        let found = self.tracer.frames(
            &Memory::new(pid),
            pid,
            lua.flavour.layout(),
            &TraceSample {
                l: s.lua_l,
                vmstate: s.vmstate,
                at_sample: (s.trace, s.trace_mcode),
                jit_ip: in_jit_code.then_some(ip),
                base: lua_frames.first(),
            },
            |mcode| {
                if mcode.contains(&ip) {
                    Some(ip)
                } else {
                    native
                        .iter()
                        .copied()
                        .find(|a| mcode.contains(a))
                        .or_else(|| trace_return(stack, s.regs.sp, s.lua_cframe, mcode))
                }
            },
        );
        let frames = match found {
            Ok(t) => {
                if !t.snap.frames.is_empty() {
                    self.stats.trace_inlined += 1;
                }
                Some(t)
            }
            Err(e) => {
                self.stats.trace_fallbacks[e.index()] += 1;
                None
            }
        };
        Some((s.vmstate, frames))
    }

    /// Names the native frames (leaf first), root first, each marked when in the VM.
    fn name_native(&mut self, pid: u32, native: &[u64]) -> Option<Vec<(Named, bool)>> {
        let proc = self.procs.get(&pid)?;
        let vm = proc.lua.as_ref().map(|t| t.vm_range.clone());
        let mut named = Vec::with_capacity(native.len() + MAX_LUA_FRAMES);
        for &addr in native.iter().rev() {
            let (label, module) = match proc.modules.find(addr) {
                Some(m) => {
                    let label = self.symbolizer.user(m, addr);
                    if !self.module_of.contains_key(&label) {
                        self.module_of
                            .insert(label.clone(), Arc::from(m.elf.name.as_str()));
                    }
                    let module = *self
                        .module_ids
                        .entry(Arc::as_ptr(&m.elf) as usize)
                        .or_insert_with(|| ModuleId::of(&m.elf.name));
                    (label, module)
                }
                None => (Arc::from("[unknown]"), None),
            };
            let detail = FrameDetail {
                module,
                ..FrameDetail::default()
            };
            let in_vm = vm.as_ref().is_some_and(|r| r.contains(&addr));
            named.push(((label, detail), in_vm));
        }
        Some(named)
    }

    /// The user stack, root first: the named native frames with the Lua frames (innermost
    /// first, inlined ones included) spliced in at the VM frames, the `[trace N]` and VM
    /// state markers added.
    fn lua_step(
        &mut self,
        s: &Sample,
        named: Vec<(Named, bool)>,
        lua_frames: &[LuaFrame],
        traced: Option<&(i32, Option<TraceFrames>)>,
    ) -> Option<Vec<Named>> {
        let pid = s.pid;
        let mut out: Vec<Named> = Vec::with_capacity(named.len() + lua_frames.len() + 8);
        let proc = self.procs.get(&pid)?;
        let Some(lua) = proc.lua.as_ref().filter(|_| !lua_frames.is_empty()) else {
            out.extend(named.into_iter().map(|(l, _)| l));
            return Some(out);
        };
        let mut segments = self.namer.segments(
            pid,
            lua,
            s.lua_l,
            lua_frames,
            self.style,
            &mut self.symbolizer,
            &proc.modules,
        );
        let inlined = match traced {
            Some((_, Some(t))) => t.snap.frames.len(),
            _ => 0,
        };
        // The innermost frames came from the trace's snapshot: flattened, the segments
        // hold the frames outermost first.
        for (_, d) in segments.iter_mut().flatten().rev().take(inlined) {
            d.inlined = true;
        }
        if self.trace_marker
            && let Some((vmstate, decoded)) = traced
            && let Some(last) = segments.last_mut()
        {
            let at = last.len().saturating_sub(inlined);
            // The trace whose frames these are: `vmstate` still names the previous one
            // right after a jump to a linked or side trace.
            let n = decoded
                .as_ref()
                .map_or(i64::from(*vmstate), |t| i64::from(t.traceno));
            let marker = Arc::from(format!("[trace {n}]"));
            last.insert(at, (marker, FrameDetail::default()));
        }
        let marker = match LuaState::from_raw(s.lua_state) {
            LuaState::Gc => Some("[lua:gc]"),
            LuaState::JitCompile => Some("[lua:jit-compile]"),
            _ => None,
        }
        .map(|m| (Arc::from(m), FrameDetail::default()));
        splice(&named, segments, marker, &mut out);
        self.stats.lua_spliced += 1;
        // Depth as walked, without the inlined frames.
        let walked = (s.lua_len as usize).min(MAX_LUA_FRAMES) as u64;
        self.stats.max_lua_depth = self.stats.max_lua_depth.max(walked);
        Some(out)
    }
}

/// A frame's label and what it does not say.
type Named = (Arc<str>, FrameDetail);

/// The return address into the interpreter when `ip` is in a VM subroutine called from the
/// interpreter: both `ip` and the word on top of the stack lie in the VM's code.
fn vm_subroutine_return(ip: u64, stack: &[u8], in_vm: &impl Fn(u64) -> bool) -> Option<u64> {
    if !in_vm(ip) {
        return None;
    }
    let top: [u8; 8] = stack.get(..8)?.try_into().ok()?;
    let ret = u64::from_le_bytes(top);
    in_vm(ret).then_some(ret)
}

/// The return address into a trace's machine code `mcode` of the C code a trace called,
/// when native unwinding did not reach it (a C function without unwind information for its
/// current instruction): the first stack word between the stack pointer and the VM's C
/// frame that points into the trace, minus one (the call instruction). Only a return
/// address holds such a value: machine code is never data.
fn trace_return(stack: &[u8], sp: u64, cframe: u64, mcode: &std::ops::Range<u64>) -> Option<u64> {
    let cframe = cframe & !3;
    let limit = if cframe > sp {
        usize::try_from(cframe - sp)
            .unwrap_or(usize::MAX)
            .min(stack.len())
    } else {
        stack.len()
    };
    stack[..limit]
        .chunks_exact(8)
        .filter_map(|w| w.try_into().ok().map(u64::from_le_bytes))
        .find(|a| mcode.contains(a))
        .map(|a| a - 1)
}

/// Kernel frames of the tracing machinery itself (the off-CPU hook's own stack above the
/// scheduler): dropped from the leaf end of kernel stacks.
fn is_tracing_frame(label: &str) -> bool {
    [
        "bpf_prog_",
        "bpf_trace_run",
        "__bpf_trace_",
        "__traceiter_",
        "trace_call_bpf",
    ]
    .iter()
    .any(|p| label.starts_with(p))
}

/// Splices Lua segments (root first, each root first) into native frames (root first, with a
/// flag for frames inside the VM). The innermost segment replaces the innermost VM frame, and
/// so on outwards; segments left over at the root side join the outermost VM frame. Without
/// any VM frame the Lua frames go below the native frames (whose unwind stopped early).
/// Frames are labels, or labels with their details: splicing only moves them.
pub fn splice<F: Clone>(
    native: &[(F, bool)],
    mut segments: Vec<Vec<F>>,
    marker: Option<F>,
    out: &mut Vec<F>,
) {
    if let (Some(m), Some(last)) = (marker, segments.last_mut()) {
        last.push(m);
    }
    let vm_positions: Vec<usize> = native
        .iter()
        .enumerate()
        .filter(|(_, (_, vm))| *vm)
        .map(|(i, _)| i)
        .collect();
    if vm_positions.is_empty() {
        for seg in segments {
            out.extend(seg);
        }
        out.extend(native.iter().map(|(l, _)| l.clone()));
        return;
    }
    // Assign segments to VM frames from the leaf side.
    let mut assigned: HashMap<usize, Vec<F>> = HashMap::new();
    let mut vm_iter = vm_positions.iter().rev().peekable();
    while let Some(seg) = segments.pop() {
        match vm_iter.next() {
            Some(&pos) if vm_iter.peek().is_some() || segments.is_empty() => {
                assigned.insert(pos, seg);
            }
            Some(&pos) => {
                // Outermost VM frame: it takes every remaining segment.
                let mut all: Vec<F> = segments.drain(..).flatten().collect();
                all.extend(seg);
                assigned.insert(pos, all);
            }
            None => {
                let pos = vm_positions[0];
                let entry = assigned.entry(pos).or_default();
                let mut all = seg;
                all.append(entry);
                *entry = all;
            }
        }
    }
    for (i, (label, vm)) in native.iter().enumerate() {
        if *vm {
            if let Some(seg) = assigned.remove(&i) {
                out.extend(seg);
            }
        } else {
            out.push(label.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(frames: &[(&str, bool)]) -> Vec<(Arc<str>, bool)> {
        frames.iter().map(|(l, v)| (Arc::from(*l), *v)).collect()
    }
    fn seg(frames: &[&str]) -> Vec<Arc<str>> {
        frames.iter().map(|f| Arc::from(*f)).collect()
    }
    fn joined(v: &[Arc<str>]) -> String {
        v.iter().map(|s| &**s).collect::<Vec<_>>().join(";")
    }

    #[test]
    fn lua_replaces_the_vm_frame_at_the_leaf() {
        let native = n(&[("main", false), ("lua_resume", false), ("lj_vm", true)]);
        let mut out = Vec::new();
        splice(
            &native,
            vec![seg(&["handler@a.lua:1", "burn@a.lua:5"])],
            None,
            &mut out,
        );
        assert_eq!(joined(&out), "main;lua_resume;handler@a.lua:1;burn@a.lua:5");
    }

    #[test]
    fn c_function_called_from_lua_stays_above_lua_frames() {
        let native = n(&[
            ("main", false),
            ("lua_resume", false),
            ("lj_vm", true),
            ("ngx_http_lua_ngx_say", false),
        ]);
        let mut out = Vec::new();
        splice(
            &native,
            vec![seg(&["handler@a.lua:1"])],
            Some(Arc::from("[lua:gc]")),
            &mut out,
        );
        assert_eq!(
            joined(&out),
            "main;lua_resume;handler@a.lua:1;[lua:gc];ngx_http_lua_ngx_say"
        );
    }

    #[test]
    fn nested_vm_entries_each_get_their_segment() {
        let native = n(&[
            ("main", false),
            ("lua_pcall", false),
            ("lj_vm", true),
            ("c_fn", false),
            ("lua_call", false),
            ("lj_vm", true),
        ]);
        let mut out = Vec::new();
        splice(
            &native,
            vec![seg(&["outer@a.lua:1"]), seg(&["inner@b.lua:2"])],
            None,
            &mut out,
        );
        assert_eq!(
            joined(&out),
            "main;lua_pcall;outer@a.lua:1;c_fn;lua_call;inner@b.lua:2"
        );
    }

    #[test]
    fn more_segments_than_vm_frames_join_the_outermost() {
        let native = n(&[("main", false), ("lj_vm", true)]);
        let mut out = Vec::new();
        splice(
            &native,
            vec![seg(&["a@x:1"]), seg(&["b@x:2"])],
            None,
            &mut out,
        );
        assert_eq!(joined(&out), "main;a@x:1;b@x:2");
    }

    #[test]
    fn vm_subroutine_return_address_is_taken_from_the_stack_top() {
        let vm = |a: u64| (0x1000..0x2000).contains(&a);
        let mut stack = 0x1234u64.to_le_bytes().to_vec();
        stack.extend([0u8; 8]);
        assert_eq!(vm_subroutine_return(0x1800, &stack, &vm), Some(0x1234));
        // Outside the VM, or a stack top that is not VM code: the normal rule applies.
        assert_eq!(vm_subroutine_return(0x3000, &stack, &vm), None);
        let data = 0x7fff_0000u64.to_le_bytes();
        assert_eq!(vm_subroutine_return(0x1800, &data, &vm), None);
    }

    #[test]
    fn trace_return_address_is_found_below_the_vm_frame() {
        let mcode = 0x7000_0000..0x7000_1000;
        let mut stack = Vec::new();
        for w in [0x55u64, 0x7000_0800, 0x7000_0900] {
            stack.extend(w.to_le_bytes());
        }
        assert_eq!(trace_return(&stack, 0x1000, 0, &mcode), Some(0x7000_07ff));
        // Only the words below the VM's C frame count.
        assert_eq!(trace_return(&stack, 0x1000, 0x1008, &mcode), None);
        assert_eq!(
            trace_return(&stack, 0x1000, 0x1010, &mcode),
            Some(0x7000_07ff)
        );
    }

    #[test]
    fn tracing_frames_are_recognised() {
        assert!(is_tracing_frame(
            "bpf_prog_0d31a7097d574274_offcpu_switch_[k]"
        ));
        assert!(is_tracing_frame("__bpf_trace_sched_switch_[k]"));
        assert!(is_tracing_frame("bpf_trace_run4_[k]"));
        assert!(!is_tracing_frame("__schedule_[k]"));
    }

    #[test]
    #[ignore = "needs root"]
    fn module_ids_of_closed_files_are_dropped() {
        let mut b = StackBuilder::new(StackOptions::default());
        // SAFETY: no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        assert!(
            root,
            "module_ids_of_closed_files_are_dropped: needs root (map_files): run as root, or without --include-ignored"
        );
        let me = std::process::id();
        let maps = crate::proc::process::read_maps(me).expect("own maps");
        let elf = Arc::new(
            ElfFile::open(me, maps.first().expect("a mapping")).expect("open own executable"),
        );
        let key = Arc::as_ptr(&elf) as usize;
        b.files.insert("1:exe".into(), elf.clone());
        b.module_ids.insert(key, ModuleId::of(&elf.name));
        // Still mapped by a process: kept.
        b.forget(1);
        assert!(b.module_ids.contains_key(&key));
        // Mapped by none any more: the file is closed and its address forgotten.
        drop(elf);
        b.forget(1);
        assert!(b.files.is_empty());
        assert!(b.module_ids.is_empty());
    }

    #[test]
    fn no_vm_frame_puts_lua_below_native() {
        let native = n(&[("lj_gc_step", false)]);
        let mut out = Vec::new();
        splice(&native, vec![seg(&["a@x:1"])], None, &mut out);
        assert_eq!(joined(&out), "a@x:1;lj_gc_step");
    }
}
