//! Native (C) stack unwinding in user space, from the registers and the copy of the user
//! stack that the BPF sampler took, using each module's `.eh_frame` / `.debug_frame`
//! through `framehop`. Works for binaries built without frame pointers (Debian's nginx).
//!
//! Hooks: none (reads the files opened by [`crate::proc::modules`]). Metrics: none; the outcome
//! of each unwind is returned to the caller, which counts it.

use std::{ops::Deref, ops::Range, sync::Arc};

use framehop::{
    ExplicitModuleSectionInfo, FrameAddress, Module as FhModule, Unwinder as _,
    x86_64::{CacheX86_64, UnwindRegsX86_64, UnwinderX86_64},
};
use object::{Object as _, ObjectSection as _};

use crate::proc::modules::{ElfFile, ProcessModules};

/// Most native frames kept per sample.
pub const MAX_NATIVE_FRAMES: usize = 256;

/// A section of a mapped ELF file.
#[derive(Clone, Debug)]
pub struct SectionData {
    elf: Arc<ElfFile>,
    range: Range<usize>,
}

impl Deref for SectionData {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.elf.data.get(self.range.clone()).unwrap_or(&[])
    }
}

/// How an unwind ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UnwindEnd {
    /// Reached the outermost frame.
    Complete,
    /// Stopped early: no unwind information, unreadable stack or too many frames.
    Truncated,
}

/// A native unwinder for one process.
pub struct NativeUnwinder {
    unwinder: UnwinderX86_64<SectionData>,
    cache: CacheX86_64,
}

impl std::fmt::Debug for NativeUnwinder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NativeUnwinder")
    }
}

fn section(
    elf: &Arc<ElfFile>,
    obj: &object::File<'_>,
    name: &str,
) -> Option<(SectionData, Range<u64>)> {
    let s = obj.section_by_name(name)?;
    let (off, size) = s.file_range()?;
    let range = usize::try_from(off).ok()?..usize::try_from(off + size).ok()?;
    if range.end > elf.data.len() {
        return None;
    }
    Some((
        SectionData {
            elf: elf.clone(),
            range,
        },
        s.address()..s.address() + s.size(),
    ))
}

impl NativeUnwinder {
    /// Builds an unwinder over every module of the process.
    pub fn new(modules: &ProcessModules) -> Self {
        let mut unwinder = UnwinderX86_64::new();
        for m in &modules.modules {
            let Ok(obj) = object::File::parse(&*m.elf.data) else {
                continue;
            };
            let text = section(&m.elf, &obj, ".text");
            let eh_frame = section(&m.elf, &obj, ".eh_frame");
            let eh_frame_hdr = section(&m.elf, &obj, ".eh_frame_hdr");
            let debug_frame = section(&m.elf, &obj, ".debug_frame");
            let got = section(&m.elf, &obj, ".got");
            let info = ExplicitModuleSectionInfo {
                base_svma: 0,
                text_svma: text.as_ref().map(|t| t.1.clone()),
                text: text.map(|t| t.0),
                got_svma: got.map(|g| g.1),
                eh_frame_svma: eh_frame.as_ref().map(|e| e.1.clone()),
                eh_frame: eh_frame.map(|e| e.0),
                eh_frame_hdr_svma: eh_frame_hdr.as_ref().map(|e| e.1.clone()),
                eh_frame_hdr: eh_frame_hdr.map(|e| e.0),
                debug_frame: debug_frame.map(|d| d.0),
                stubs_svma: None,
                stub_helper_svma: None,
                unwind_info: None,
                text_segment_svma: None,
                text_segment: None,
            };
            unwinder.add_module(FhModule::new(
                m.elf.path.clone(),
                m.range.clone(),
                m.bias,
                info,
            ));
        }
        Self {
            unwinder,
            cache: CacheX86_64::new(),
        }
    }

    /// Unwinds from `ip`/`sp`/`bp` over `stack` (the bytes at `sp..`), appending code
    /// addresses to `out`, leaf first. Return addresses are stored minus one, so that every
    /// address lies inside the calling instruction and can be symbolized as it is.
    pub fn unwind(
        &mut self,
        ip: u64,
        sp: u64,
        bp: u64,
        stack: &[u8],
        out: &mut Vec<u64>,
    ) -> UnwindEnd {
        let stack_end = sp + stack.len() as u64;
        let mut read_stack = |addr: u64| -> Result<u64, ()> {
            if addr < sp || addr + 8 > stack_end {
                return Err(());
            }
            let i = (addr - sp) as usize;
            let bytes: [u8; 8] = stack.get(i..i + 8).ok_or(())?.try_into().map_err(|_| ())?;
            Ok(u64::from_le_bytes(bytes))
        };
        let mut it = self.unwinder.iter_frames(
            ip,
            UnwindRegsX86_64::new(ip, sp, bp),
            &mut self.cache,
            &mut read_stack,
        );
        loop {
            if out.len() >= MAX_NATIVE_FRAMES {
                return UnwindEnd::Truncated;
            }
            match it.next() {
                Ok(Some(FrameAddress::InstructionPointer(a))) => out.push(a),
                Ok(Some(FrameAddress::ReturnAddress(a))) => out.push(a.get() - 1),
                Ok(None) => return UnwindEnd::Complete,
                Err(_) => return UnwindEnd::Truncated,
            }
        }
    }
}
