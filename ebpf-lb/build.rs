use anyhow::{Context as _, anyhow};
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    let meta = std::env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR")?;
    let root = format!("{meta}/programs");
    // aya-build watches the programs' folder; the map layouts live next door.
    println!("cargo:rerun-if-changed={meta}/common");
    // The nightly toolchain by name (`nightly` unless SLUICE_BPF_TOOLCHAIN
    // pins one, as the Containerfile does).
    println!("cargo:rerun-if-env-changed=SLUICE_BPF_TOOLCHAIN");
    let pinned = std::env::var("SLUICE_BPF_TOOLCHAIN").ok();
    let toolchain = pinned
        .as_deref()
        .map_or(Toolchain::default(), Toolchain::Custom);
    aya_build::build_ebpf(
        [Package { name: "ebpf-lb-programs", root_dir: &root, ..Default::default() }],
        toolchain,
    )
    .map_err(|e| {
        anyhow!(
            "building the kernel programs failed: {e:#}\n\
             (they need the nightly toolchain with rust-src and bpf-linker 0.10.1: run `cargo xtask setup`)"
        )
    })
}
