//! `mesh-agent`: Sluice's node agent.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use mesh_agent::agent::{Agent, RunArgs};

// The node proxy runs in this process for as long as the node does, with
// buffers and requests coming and going on every worker thread: jemalloc
// keeps that from fragmenting, and it is what `cargo xtask bench` measures.
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser)]
#[command(name = "mesh-agent", version, about = "Sluice's node agent")]
struct Cli {
    /// Log format.
    #[arg(long, global = true, value_parser = ["text", "json"], default_value = "text")]
    log_format: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent: read the configuration, program the kernel, serve the
    /// admin API. Log level from RUST_LOG (default info).
    Run(Box<RunArgs>),
    /// Run the cluster's CA service: signs workload certificates for node
    /// agents (authenticated by their service account token), root in a
    /// Kubernetes Secret or a directory. `mesh-agent ca rotate` rotates that
    /// root.
    #[command(args_conflicts_with_subcommands = true)]
    Ca {
        #[command(subcommand)]
        action: Option<CaAction>,
        #[command(flatten)]
        args: Box<mesh_agent::ca::CaArgs>,
    },
    /// Print the CRD manifests of Sluice's resources (MeshPolicy, AccessPolicy).
    Crds,
    /// Check a files-source directory and print what would be refused.
    Validate {
        /// The directory (as in --source files:<dir>).
        dir: std::path::PathBuf,
    },
    /// Mount bpffs at --bpffs unless it is mounted there already (the
    /// chart's init container runs it, privileged, so that the mount is the
    /// host's and the agent itself needs no mount propagation back).
    MountBpffs {
        #[arg(long, default_value = ebpf_lb::DEFAULT_BPFFS)]
        bpffs: std::path::PathBuf,
    },
    /// Remove the pinned kernel state (programs, maps) an agent left.
    Uninstall {
        #[arg(long, default_value = ebpf_lb::DEFAULT_BPFFS)]
        bpffs: std::path::PathBuf,
        #[arg(long, default_value = mesh_agent::config::LB_INSTANCE)]
        lb_instance: String,
    },
}

#[derive(Subcommand)]
enum CaAction {
    /// One step of a root rotation (--prepare, then --activate, then
    /// --retire), written to the root's Secret or directory; the running CA
    /// serves and publishes the new trust bundle within 10 s.
    Rotate(Box<mesh_agent::ca::RotateArgs>),
}

fn init_tracing(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    if format == "json" {
        b.json().init();
    } else {
        b.init();
    }
}

/// Installs the SIGTERM and SIGINT handlers at once; the future resolves on
/// the first signal.
fn wait_for_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("installing a SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("installing a SIGINT handler");
    async move {
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Crds => {
            print!("{}", mesh_agent::crds::crd_manifests());
            ExitCode::SUCCESS
        }
        Command::Validate { dir } => {
            let mut src = mesh_agent::sources::files::FilesSource::new(&dir);
            if let Err(e) = src.reload() {
                eprintln!("mesh-agent: {e}");
                return ExitCode::from(2);
            }
            // The files' own problems and the agent's checks of what they
            // define (a Service's ports, a policy's sources, a route's
            // rules), as a running agent would report them.
            let mut errors = mesh_agent::reconcile::offline_problems(src.inputs(true));
            // Each named by the file that defines its object.
            for e in &mut errors {
                if e.source == "model"
                    && let Some(path) = e.object.as_deref().and_then(|o| src.origin_of(o))
                {
                    e.source = path.display().to_string();
                }
            }
            for e in &errors {
                println!("{e}");
            }
            // Documents of kinds the agent does not read are notes only.
            if errors.iter().all(|e| e.is_note()) {
                println!("{}: no problems", dir.display());
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Command::MountBpffs { bpffs } => match ebpf_lb::ensure_bpffs(&bpffs) {
            Ok(()) => {
                println!("bpffs is mounted at {}", bpffs.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("mesh-agent: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Uninstall { bpffs, lb_instance } => {
            let dir = bpffs.join(lb_instance);
            match ebpf_lb::uninstall_at(&dir) {
                Ok(()) => {
                    println!("removed {}", dir.display());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("mesh-agent: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Ca {
            action: Some(CaAction::Rotate(args)),
            ..
        } => match mesh_agent::ca::rotate_command(*args).await {
            Ok(r) => {
                println!("{}", r.summary);
                println!("Trust bundle ({}):", r.bundle.trust_domain);
                for root in &r.bundle.roots {
                    println!(
                        "  {} {}{}",
                        root.fingerprint,
                        root.subject,
                        if root.active { " (active)" } else { "" }
                    );
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("mesh-agent ca rotate: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Ca { action: None, args } => {
            init_tracing(&cli.log_format);
            let (stop, stop_rx) = tokio::sync::watch::channel(false);
            let ca = tokio::spawn(mesh_agent::ca::run(*args, stop_rx));
            tokio::select! {
                _ = wait_for_signal() => {
                    let _ = stop.send(true);
                }
                r = ca => return match r {
                    Ok(Err(e)) => {
                        tracing::error!("{e}");
                        eprintln!("mesh-agent ca: {e}");
                        ExitCode::FAILURE
                    }
                    _ => ExitCode::FAILURE,
                },
            }
            ExitCode::SUCCESS
        }
        Command::Run(args) => {
            init_tracing(&cli.log_format);
            // Handlers first: the agent runs as PID 1 in its pod, which ignores
            // SIGTERM without one, and the start can wait long (for the CA).
            let signal = wait_for_signal();
            tokio::pin!(signal);
            let started = tokio::select! {
                started = Agent::start(*args) => started,
                _ = &mut signal => {
                    // Dropping the start stops what it had started.
                    tracing::info!("stopped while starting");
                    return ExitCode::SUCCESS;
                }
            };
            let agent = match started {
                Ok(a) => a,
                Err(e) => {
                    tracing::error!("{e}");
                    eprintln!("mesh-agent: {e}");
                    return ExitCode::FAILURE;
                }
            };
            signal.await;
            tracing::info!("stopping; the kernel keeps balancing with the pinned state");
            agent.shutdown().await;
            ExitCode::SUCCESS
        }
    }
}
