//! Rebuild the BPF object when `bpf-linker` changes, and tell rustc which BPF
//! target architecture the programs are compiled for.

fn main() -> aya_build::Result<()> {
    if let Ok(bpf_linker) = which::which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", bpf_linker.display());
    }
    aya_build::emit_bpf_target_arch_cfg()
}
