//! Rebuild the BPF object when `bpf-linker` changes, tell rustc which BPF target
//! architecture the programs are compiled for, and have the linker keep the bounded Lua
//! walk's step function global.

fn main() -> aya_build::Result<()> {
    // The bounded Lua walk's step stays a global function, which the verifier checks once.
    println!("cargo:rustc-link-arg-bins=--export=lua_walk_step");
    if let Ok(bpf_linker) = which::which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", bpf_linker.display());
    }
    aya_build::emit_bpf_target_arch_cfg()
}
