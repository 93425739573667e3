//! `sluice`: inspect the Sluice mesh on this node.

use clap::Parser as _;

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::process::ExitCode {
    mesh_agent::cli::run(mesh_agent::cli::Cli::parse()).await
}
