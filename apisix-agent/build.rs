//! Builds the BPF programs of `apisix-ebpf` for `bpfel-unknown-none` with aya-build, so that a
//! plain `cargo build` produces an agent with its BPF object embedded. `AYA_BUILD_SKIP=1` skips
//! the BPF build (the agent then fails to load its programs at run time).

use anyhow::{Context as _, anyhow};
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    let metadata = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("cargo metadata")?;
    let ebpf = metadata
        .packages
        .into_iter()
        .find(|p| p.name.as_str() == "apisix-ebpf")
        .ok_or_else(|| anyhow!("apisix-ebpf package not found"))?;
    let root_dir = ebpf
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("apisix-ebpf manifest has no parent"))?
        .as_str()
        .to_owned();
    aya_build::build_ebpf(
        [Package {
            name: "apisix-ebpf",
            root_dir: &root_dir,
            ..Default::default()
        }],
        Toolchain::default(),
    )
}
