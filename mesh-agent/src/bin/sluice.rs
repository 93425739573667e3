//! `sluice`: inspect the Sluice mesh on this node.

use clap::Parser as _;

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::process::ExitCode {
    let cli = match mesh_agent::cli::Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            // `--help` and `--version` succeed; a usage error exits 64
            // (EX_USAGE), apart from 2, which says the agent could not be
            // asked.
            return std::process::ExitCode::from(if e.use_stderr() { 64 } else { 0 });
        }
    };
    mesh_agent::cli::run(cli).await
}
