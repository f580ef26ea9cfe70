//! Learning a process's Lua VM: a uprobe on `lua_resume(L, nargs)` remembers `G(L)` of a
//! target process in `LUA_VMS`, for builds whose JIT code does not keep DISPATCH in a
//! register (non-GC64). Attached per process by the agent only until that VM is known.
//!
//! Hooks: uprobe `lua_resume` (per process). Metrics: `MapInsertFailed`.

use apisix_ebpf_common::Counter;
use aya_ebpf::{helpers::bpf_get_current_pid_tgid, macros::uprobe, programs::ProbeContext};

use crate::{
    lua::read_ref,
    maps::{LUA_LAYOUTS, LUA_VMS, TARGETS, finish},
};

/// Uprobe on `lua_resume(L, nargs)`: remembers `G(L)` of a target process. Attached per
/// process by the agent only until the process's VM is known.
#[uprobe]
pub fn learn_vm(ctx: ProbeContext) -> u32 {
    finish(try_learn_vm(&ctx))
}

fn try_learn_vm(ctx: &ProbeContext) -> Result<(), Counter> {
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    // SAFETY: read-only lookups of plain values.
    let Some(target) = (unsafe { TARGETS.get(tgid) }) else {
        return Ok(());
    };
    let Some(layout) = LUA_LAYOUTS.get(target.layout) else {
        return Ok(());
    };
    let layout = *layout;
    let Some(l) = ctx.arg::<u64>(0) else {
        return Ok(());
    };
    if let Ok(g) = read_ref(&layout, l + u64::from(layout.l_glref))
        && g != 0
        && let Ok(cur) = read_ref(&layout, g + u64::from(layout.g_cur_l))
        && cur != 0
        && read_ref(&layout, cur + u64::from(layout.l_glref)) == Ok(g)
    {
        LUA_VMS
            .insert(tgid, g, 0)
            .map_err(|_| Counter::MapInsertFailed)?;
    }
    Ok(())
}
