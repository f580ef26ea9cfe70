//! Names for native code addresses: ELF symbols via blazesym (not separate debug files: their
//! lookup follows names and paths the target controls, and could open a FIFO it planted),
//! kernel symbols from `/proc/kallsyms`. An address without a symbol is named `module+0xOFFSET` (offset as the
//! binary states it), never an error. Results are cached per file and address.
//!
//! blazesym's own cache only grows: one open file and its parsed symbols per path and file
//! identity, and the paths here are `/proc/self/fd/N` of files opened per process. When
//! processes go, [`Symbolizer::retain_files`] starts the user-space symbolizer afresh (the
//! names of files still open stay cached); the kernel one lives on.
//!
//! Hooks: the target's files (read through the descriptors [`super::modules`] keeps open),
//! `/proc/kallsyms`. Metrics: none.

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
};

use blazesym::{
    MaybeDefault,
    symbolize::{
        Input, Symbolized, Symbolizer as Blaze,
        source::{Elf, Kernel, Source},
    },
};

use super::modules::Module;

/// Caching symbolizer for native and kernel addresses.
pub struct Symbolizer {
    /// For the targets' files; replaced by [`Symbolizer::retain_files`].
    blaze: Blaze,
    /// For `/proc/kallsyms`.
    kernel_blaze: Blaze,
    /// Names by (address of the [`super::modules::ElfFile`], address in the file).
    user: HashMap<(usize, u64), Arc<str>>,
    kernel: HashMap<u64, Arc<str>>,
}

impl std::fmt::Debug for Symbolizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Symbolizer")
            .field("user_cached", &self.user.len())
            .field("kernel_cached", &self.kernel.len())
            .finish()
    }
}

impl Default for Symbolizer {
    fn default() -> Self {
        Self::new()
    }
}

/// The label of an address that has no symbol.
pub fn offset_label(module: &str, offset: u64) -> String {
    format!("{module}+{offset:#x}")
}

impl Symbolizer {
    /// A symbolizer with empty caches.
    pub fn new() -> Self {
        Self {
            blaze: Blaze::new(),
            kernel_blaze: Blaze::new(),
            user: HashMap::new(),
            kernel: HashMap::new(),
        }
    }

    /// Keeps only what concerns the files in `live` (addresses of the open
    /// [`super::modules::ElfFile`]s): called when files were closed, before their memory can
    /// hold another file. blazesym's caches (an open file per path ever read) start afresh.
    pub fn retain_files(&mut self, live: &HashSet<usize>) {
        self.user.retain(|(elf, _), _| live.contains(elf));
        self.blaze = Blaze::new();
    }

    /// Names `addr` (an address inside `module` of the target).
    pub fn user(&mut self, module: &Module, addr: u64) -> Arc<str> {
        let svma = addr.wrapping_sub(module.bias);
        let key = (Arc::as_ptr(&module.elf) as usize, svma);
        if let Some(name) = self.user.get(&key) {
            return name.clone();
        }
        // No debug files: where they are looked up (beside the file as the agent's root
        // resolves its path, by a name the file states) is the target's to choose.
        let src = Source::Elf(Elf {
            debug_syms: false,
            ..Elf::new(module.elf.fd_path())
        });
        let name: Arc<str> = match self.blaze.symbolize_single(&src, Input::VirtOffset(svma)) {
            Ok(Symbolized::Sym(sym)) => Arc::from(&*sym.name),
            _ => Arc::from(offset_label(&module.elf.name, svma)),
        };
        self.user.insert(key, name.clone());
        name
    }

    /// Names a kernel address; the label carries the `_[k]` suffix.
    pub fn kernel(&mut self, addr: u64) -> Arc<str> {
        if let Some(name) = self.kernel.get(&addr) {
            return name.clone();
        }
        let src = Source::Kernel(Kernel {
            vmlinux: MaybeDefault::None,
            ..Default::default()
        });
        let name: Arc<str> = match self
            .kernel_blaze
            .symbolize_single(&src, Input::AbsAddr(addr))
        {
            Ok(Symbolized::Sym(sym)) => Arc::from(format!("{}_[k]", sym.name)),
            _ => Arc::from(format!("{addr:#x}_[k]")),
        };
        self.kernel.insert(addr, name.clone());
        name
    }
}
