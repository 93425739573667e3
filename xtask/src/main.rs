//! `cargo xtask`: the repository's commands.
//!
//! - `setup`: install what a fresh machine lacks (idempotent, quick when done).
//! - `test`:  setup, format check, lints (user and kernel crates), all tests.
//! - `demo`:  setup, build, run the standalone demo.
//! - `bench`: setup (with the measurement tools), run the benchmarks, write
//!   `benches/RESULTS.md`.

use std::{
    path::{Path, PathBuf},
    process::{Command, ExitCode},
};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "Sluice's development commands", long_about = None)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what this machine lacks to build and test Sluice: the nightly
    /// toolchain (when there is none) with rust-src and clippy, clippy and
    /// rustfmt on stable, bpf-linker 0.10.1, cargo-nextest 0.9.143,
    /// iproute2, iptables, and helm-sdkpy (Helm's linter, from PyPI, with
    /// python3-pip when pip is missing) for the chart test. `bench` also
    /// installs nginx and oha 1.16.0.
    Setup,
    /// Run setup, `cargo fmt --check`, clippy on the user crates and on the
    /// kernel crate (bpfel target), and the whole test suite. Privileged tests
    /// need root.
    Test {
        /// Extra arguments for `cargo nextest run` (a filter, for example).
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// Build and run the standalone demo: one node made of network
    /// namespaces, mesh-agent on examples/demo, real traffic, `sluice` output.
    /// Needs root.
    Demo,
    /// Run the benchmarks and write benches/RESULTS.md.
    Bench {
        /// Arguments for the bench runner (`--help` lists them).
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.cmd {
        Cmd::Setup => setup(),
        Cmd::Test { args } => test(&args),
        Cmd::Demo => demo(),
        Cmd::Bench { args } => bench(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .into()
}

fn run(cmd: &mut Command) -> Result<()> {
    eprintln!("+ {}", display(cmd));
    let status = cmd
        .status()
        .with_context(|| format!("starting {}", display(cmd)))?;
    if !status.success() {
        bail!("{} failed ({status})", display(cmd));
    }
    Ok(())
}

fn display(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Runs `cmd` quietly and returns its stdout, or None if it cannot run.
fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd.output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(root());
    c
}

fn is_root() -> bool {
    output(Command::new("id").arg("-u")).is_some_and(|s| s.trim() == "0")
}

const BPF_LINKER_VERSION: &str = "0.10.1";
/// A release known to build with the stable toolchain here (1.95).
const NEXTEST_VERSION: &str = "0.9.143";
/// The benchmarks' load generator: a release that builds with the stable
/// toolchain here (later ones may need a newer rustc).
const OHA_VERSION: &str = "1.16.0";

/// The nightly toolchain the kernel programs build with, as
/// `ebpf-lb/build.rs` picks it: `SLUICE_BPF_TOOLCHAIN` when set (a dated
/// one, as the Containerfile pins), else `nightly`.
fn bpf_toolchain() -> String {
    std::env::var("SLUICE_BPF_TOOLCHAIN")
        .ok()
        .filter(|t| !t.is_empty())
        .unwrap_or_else(|| "nightly".into())
}

/// Whether `rustup toolchain list` output lists `name` itself: `nightly`
/// is `nightly-<host>`, not a dated `nightly-2026-05-20-<host>`.
fn lists_toolchain(list: &str, name: &str) -> bool {
    list.lines()
        .filter_map(|l| l.split_whitespace().next())
        .any(|t| {
            t == name
                || t.strip_prefix(name).is_some_and(|rest| {
                    rest.strip_prefix('-')
                        .is_some_and(|host| !host.starts_with(|c: char| c.is_ascii_digit()))
                })
        })
}

fn setup() -> Result<()> {
    let nightly = bpf_toolchain();
    let toolchains = output(Command::new("rustup").args(["toolchain", "list"]))
        .context("rustup is needed to build the kernel programs (nightly toolchain)")?;
    if !lists_toolchain(&toolchains, &nightly) {
        run(Command::new("rustup").args([
            "toolchain",
            "install",
            &nightly,
            "--profile",
            "minimal",
        ]))
        .with_context(|| format!("installing the {nightly} toolchain"))?;
    }
    for (toolchain, component) in [
        (nightly.as_str(), "rust-src"),
        (nightly.as_str(), "clippy"),
        ("stable", "clippy"),
        ("stable", "rustfmt"),
    ] {
        let installed = output(Command::new("rustup").args([
            "component",
            "list",
            "--installed",
            "--toolchain",
            toolchain,
        ]))
        .unwrap_or_default();
        if !installed.lines().any(|l| l.starts_with(component)) {
            run(Command::new("rustup").args([
                "component",
                "add",
                component,
                "--toolchain",
                toolchain,
            ]))?;
        }
    }
    // 0.11+ needs a system LLVM 23; 0.10.1 uses the LLVM of the Rust toolchain.
    cargo_install_pinned("bpf-linker", BPF_LINKER_VERSION)?;
    if output(cargo().args(["nextest", "--version"])).is_none() {
        run(cargo().args([
            "install",
            &format!("cargo-nextest@{NEXTEST_VERSION}"),
            "--locked",
        ]))?;
    }
    // iptables: a kernel test rewrites packet marks as kube-proxy does.
    apt_install(&[("ip", "iproute2"), ("iptables", "iptables")])?;
    helm_linter()?;
    eprintln!("xtask setup: done");
    Ok(())
}

const HELM_SDKPY_VERSION: &str = "0.1.32";

/// Helm's linter (it renders the chart's templates) for the chart test in
/// mesh-agent/tests/chart.rs: no `helm` binary can be installed here, but the
/// PyPI package helm-sdkpy bundles Helm's Go library. It declares Python 3.12;
/// it works on 3.11, hence --ignore-requires-python.
fn helm_linter() -> Result<()> {
    let installed = output(Command::new("python3").args([
        "-c",
        "import importlib.metadata as m; print(m.version('helm-sdkpy'))",
    ]))
    .unwrap_or_default();
    if installed.trim() == HELM_SDKPY_VERSION {
        return Ok(());
    }
    apt_install(&[("python3", "python3"), ("pip3", "python3-pip")])?;
    run(Command::new("python3").args([
        "-m",
        "pip",
        "install",
        "--quiet",
        "--ignore-requires-python",
        "--break-system-packages",
        &format!("helm-sdkpy=={HELM_SDKPY_VERSION}"),
    ]))
    .context("installing helm-sdkpy (Helm's linter, for the chart test)")
}

/// Installs the Debian packages whose commands are missing.
fn apt_install(wanted: &[(&str, &str)]) -> Result<()> {
    let missing: Vec<&str> = wanted
        .iter()
        .filter(|(cmd, _)| {
            output(Command::new("sh").args(["-c", &format!("command -v {cmd}")])).is_none()
        })
        .map(|(_, pkg)| *pkg)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !is_root() {
        bail!(
            "missing Debian packages {missing:?}; install them as root (apt-get install {})",
            missing.join(" ")
        );
    }
    run(Command::new("apt-get").arg("update").arg("-q"))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

fn test(extra: &[String]) -> Result<()> {
    setup()?;
    warn_if_disk_short(TEST_BUILD_GB, "the test build");
    if !is_root() {
        eprintln!(
            "xtask test: not running as root; the privileged tests (cgroups, bpf, network \
             namespaces) will fail. Run it as root (with sudo: `sudo -E env \"PATH=$PATH:/usr/sbin:/sbin\" \
             cargo xtask test`, so that root finds cargo and the system tools)."
        );
    }
    run(cargo().args(["fmt", "--all", "--check"]))?;
    run(cargo().args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    lint_kernel()?;
    run(cargo()
        .args([
            "nextest",
            "run",
            "--workspace",
            "--all-targets",
            "--no-fail-fast",
        ])
        .args(extra))?;
    if extra.is_empty() {
        run(cargo().args(["test", "--workspace", "--doc"]))?;
    }
    Ok(())
}

/// What a build from scratch writes under target/, in GB: the test build
/// (every test binary, clippy's metadata, the kernel lint and incremental
/// state) measured at 5.1 GB with the dev profile's trimmed debug info (11 GB
/// with full debug info); the demo's and the benchmarks' builds are smaller.
const TEST_BUILD_GB: u64 = 6;
const DEMO_BUILD_GB: u64 = 3;
const BENCH_BUILD_GB: u64 = 3;

/// Says so before a build starts when the target directory's filesystem has
/// less room than `need_gb`: a full disk otherwise shows up as a linker
/// crash ("Bus error", "IO failure on output stream") deep in the build.
/// A warning, not a refusal: an incremental build needs far less.
fn warn_if_disk_short(need_gb: u64, what: &str) {
    // Cargo reads a relative CARGO_TARGET_DIR from the directory it runs in.
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .map(|t| root().join(t))
        .unwrap_or_else(|| root().join("target"));
    // The target directory may not exist yet: its nearest existing parent.
    let dir = target
        .ancestors()
        .find(|d| d.exists())
        .unwrap_or(Path::new("/"));
    let Some(free_kb) =
        output(Command::new("df").args(["-Pk"]).arg(dir)).and_then(|out| df_available_kb(&out))
    else {
        return;
    };
    let free_gb = free_kb / (1024 * 1024);
    if free_gb < need_gb {
        eprintln!(
            "xtask: warning: {free_gb} GB free on the filesystem of {}; {what} from scratch \
             writes about {need_gb} GB there. If it fails with \"No space left on device\" \
             or a linker crash, free space (`cargo clean`) or point CARGO_TARGET_DIR at a \
             larger disk.",
            dir.display()
        );
    }
}

/// The "Available" column (KB) of `df -Pk`'s one data line.
fn df_available_kb(out: &str) -> Option<u64> {
    out.lines().nth(1)?.split_whitespace().nth(3)?.parse().ok()
}

/// Lints the kernel crate for its real target (on the host it is empty).
fn lint_kernel() -> Result<()> {
    let mut cmd = Command::new("rustup");
    cmd.current_dir(root())
        .args([
            "run",
            &bpf_toolchain(),
            "cargo",
            "clippy",
            "--package",
            "ebpf-lb-programs",
        ])
        .args([
            "--release",
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
        ])
        .args(["--target-dir", "target/bpf-lint", "--", "-D", "warnings"])
        .env_remove("RUSTC")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .env_remove("CARGO");
    run(&mut cmd)
}

fn demo() -> Result<()> {
    setup()?;
    warn_if_disk_short(DEMO_BUILD_GB, "the demo's build");
    if !is_root() {
        bail!(
            "the demo needs root (network namespaces, cgroups, eBPF): run it as root (with \
             sudo: `sudo -E env \"PATH=$PATH:/usr/sbin:/sbin\" cargo xtask demo`, so that root finds cargo and the system tools)"
        );
    }
    run(cargo().args([
        "build",
        "--package",
        "mesh-agent",
        "--package",
        "integration",
        "--bins",
    ]))?;
    // Through cargo, which knows the target directory (CARGO_TARGET_DIR
    // included); the demo runs the mesh-agent and sluice built beside it.
    run(cargo()
        .args([
            "run",
            "--package",
            "integration",
            "--bin",
            "sluice-demo",
            "--",
        ])
        .arg(root().join("examples/demo")))
}

/// Installs crate `name` (a binary of the same name) at `version` unless
/// `name --version` says exactly that version ("oha 1.16.0": 0.10.10 would
/// contain 0.10.1).
fn cargo_install_pinned(name: &str, version: &str) -> Result<()> {
    let said = output(Command::new(name).arg("--version")).unwrap_or_default();
    if said.split_whitespace().nth(1) == Some(version) {
        return Ok(());
    }
    run(cargo().args([
        "install",
        &format!("{name}@{version}"),
        "--locked",
        "--force",
    ]))
}

fn bench(args: &[String]) -> Result<()> {
    setup()?;
    warn_if_disk_short(BENCH_BUILD_GB, "the benchmarks' build");
    // The peer and the load generator of the proxy benchmarks.
    apt_install(&[("nginx", "nginx")])?;
    cargo_install_pinned("oha", OHA_VERSION)?;
    run(cargo()
        .args([
            "run",
            "--profile",
            "dist",
            "--package",
            "benches",
            "--bin",
            "bench",
            "--",
        ])
        .args(args))
}

#[cfg(test)]
mod tests {
    use super::{df_available_kb, lists_toolchain};

    #[test]
    fn a_toolchain_is_found_by_its_own_name_only() {
        let list = "stable-x86_64-unknown-linux-gnu (default)\n\
                    nightly-2026-05-20-x86_64-unknown-linux-gnu\n";
        assert!(lists_toolchain(list, "stable"));
        assert!(lists_toolchain(list, "nightly-2026-05-20"));
        // A dated nightly is not the toolchain called `nightly`.
        assert!(!lists_toolchain(list, "nightly"));
        assert!(lists_toolchain(
            "nightly-aarch64-unknown-linux-gnu\n",
            "nightly"
        ));
        assert!(!lists_toolchain(list, "nightly-2026-05-19"));
    }

    #[test]
    fn reads_the_available_column_of_df() {
        let out = "Filesystem     1024-blocks     Used Available Capacity Mounted on\n\
                   /dev/vda         264101888 22020096  72351744      24% /\n";
        assert_eq!(df_available_kb(out), Some(72_351_744));
        assert_eq!(df_available_kb("Filesystem 1024-blocks\n"), None);
        assert_eq!(df_available_kb(""), None);
    }
}
