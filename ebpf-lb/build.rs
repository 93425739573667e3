use anyhow::{Context as _, anyhow};
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    let meta = std::env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR")?;
    let root = format!("{meta}/programs");
    // aya-build watches the programs' folder; the map layouts live next door.
    println!("cargo:rerun-if-changed={meta}/common");
    aya_build::build_ebpf(
        [Package { name: "ebpf-lb-programs", root_dir: &root, ..Default::default() }],
        Toolchain::default(),
    )
    .map_err(|e| {
        anyhow!(
            "building the kernel programs failed: {e:#}\n\
             (they need the nightly toolchain with rust-src and bpf-linker 0.10.1: run `cargo xtask setup`)"
        )
    })
}
