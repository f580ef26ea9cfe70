//! Builds the BPF programs of `apisix-ebpf` for `bpfel-unknown-none`, so that a plain
//! `cargo build` produces an agent with its BPF object embedded (`OUT_DIR/apisix-ebpf`).
//!
//! The build is pinned and path-independent: the nightly named in
//! `apisix-ebpf/rust-toolchain.toml` (run through rustup), `bpf-linker` of the version
//! `scripts/setup.sh` installs, and every absolute path that would land in the object's
//! debug info and BTF (the checkout, the cargo registry, the toolchain's sources) remapped to
//! a fixed prefix, so the same commit gives the same object bytes on any machine
//! (`scripts/bpf-reproducible.sh` checks it). `AYA_BUILD_SKIP=1` skips the BPF build (the
//! agent then fails to load its programs at run time).

use std::{
    env,
    ffi::OsString,
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, anyhow, bail};

/// The `bpf-linker` release the object is linked with (and the LLVM it is built against).
const BPF_LINKER_VERSION: &str = "0.13.0";

fn main() -> anyhow::Result<()> {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR")?);
    let workspace = manifest
        .parent()
        .ok_or_else(|| anyhow!("apisix-agent has no parent directory"))?
        .to_path_buf();
    let ebpf = workspace.join("apisix-ebpf");
    let out_dir = PathBuf::from(env::var("OUT_DIR").context("OUT_DIR")?);
    let object = out_dir.join("apisix-ebpf");
    for dir in ["apisix-ebpf/src", "apisix-ebpf-common/src"] {
        println!("cargo:rerun-if-changed={}", workspace.join(dir).display());
    }
    for file in [
        "apisix-ebpf/Cargo.toml",
        "apisix-ebpf/build.rs",
        "apisix-ebpf/rust-toolchain.toml",
        "apisix-ebpf-common/Cargo.toml",
        "Cargo.lock",
    ] {
        println!("cargo:rerun-if-changed={}", workspace.join(file).display());
    }
    println!("cargo:rerun-if-env-changed=AYA_BUILD_SKIP");
    if env::var_os("AYA_BUILD_SKIP").is_some_and(|v| v == "1" || v == "true") {
        fs::write(&object, []).context("writing the empty BPF object")?;
        return Ok(());
    }
    let toolchain = pinned_toolchain(&ebpf.join("rust-toolchain.toml"))?;
    check_linker()?;
    let sysroot = rustup_output(&toolchain, &["rustc", "--print", "sysroot"])?;
    let cargo_home = env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|h| Path::new(&h).join(".cargo")))
        .ok_or_else(|| anyhow!("neither CARGO_HOME nor HOME is set"))?;
    let target_dir = out_dir.join("bpf-target");
    let flags = [
        "--cfg=bpf_target_arch=\"x86_64\"".to_owned(),
        "-Cdebuginfo=2".to_owned(),
        "-Clink-arg=--btf".to_owned(),
        remap(&workspace, "/apisix-agent"),
        remap(&cargo_home, "/cargo"),
        remap(Path::new(sysroot.trim()), "/rust"),
        remap(&target_dir, "/target"),
    ];
    let mut cmd = Command::new("rustup");
    cmd.current_dir(&ebpf)
        .args([
            "run",
            &toolchain,
            "cargo",
            "build",
            "--package",
            "apisix-ebpf",
        ])
        .args(["--bin", "apisix-ebpf", "--release", "--locked"])
        .args(["--target", "bpfel-unknown-none", "-Z", "build-std=core"])
        .arg("--target-dir")
        .arg(&target_dir)
        .env("CARGO_ENCODED_RUSTFLAGS", flags.join("\x1f"))
        .env_remove("RUSTC")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_BUILD_RUSTFLAGS");
    // The outer build's cargo settings belong to the host build, not to this one.
    for (key, _) in env::vars_os() {
        if key.to_string_lossy().starts_with("CARGO_PROFILE_") {
            cmd.env_remove(key);
        }
    }
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("building the BPF programs failed ({status}); run scripts/setup.sh");
    }
    let built = target_dir.join("bpfel-unknown-none/release/apisix-ebpf");
    fs::copy(&built, &object)
        .with_context(|| format!("copying {} to {}", built.display(), object.display()))?;
    Ok(())
}

/// The channel named in `rust-toolchain.toml` (`channel = "nightly-YYYY-MM-DD"`).
fn pinned_toolchain(file: &Path) -> anyhow::Result<String> {
    let text = fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("channel"))
        .filter_map(|rest| rest.trim().strip_prefix('='))
        .map(|v| v.trim().trim_matches('"').to_owned())
        .find(|v| !v.is_empty())
        .ok_or_else(|| anyhow!("no channel in {}", file.display()))
}

/// `bpf-linker` must be the pinned release: another links other bytes.
fn check_linker() -> anyhow::Result<()> {
    let out = Command::new("bpf-linker")
        .arg("--version")
        .output()
        .context("bpf-linker not found: run scripts/setup.sh")?;
    let version = String::from_utf8_lossy(&out.stdout);
    if !version.contains(BPF_LINKER_VERSION) {
        bail!(
            "bpf-linker {BPF_LINKER_VERSION} is needed, found {}: run scripts/setup.sh",
            version.trim()
        );
    }
    if let Ok(path) = which_linker() {
        println!("cargo:rerun-if-changed={}", path.display());
    }
    Ok(())
}

fn which_linker() -> anyhow::Result<PathBuf> {
    let paths = env::var_os("PATH").ok_or_else(|| anyhow!("no PATH"))?;
    env::split_paths(&paths)
        .map(|d| d.join("bpf-linker"))
        .find(|p| p.is_file())
        .ok_or_else(|| anyhow!("bpf-linker not on PATH"))
}

fn rustup_output(toolchain: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("rustup")
        .args(["run", toolchain])
        .args(args)
        .output()
        .with_context(|| format!("rustup run {toolchain}: run scripts/setup.sh"))?;
    if !out.status.success() {
        bail!(
            "rustup run {toolchain} {}: {}; run scripts/setup.sh",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn remap(from: &Path, to: &str) -> String {
    let mut s = OsString::from("--remap-path-prefix=");
    s.push(from.as_os_str());
    s.push("=");
    s.push(to);
    s.to_string_lossy().into_owned()
}
