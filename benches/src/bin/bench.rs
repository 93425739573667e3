//! `cargo xtask bench`: runs Sluice's benchmarks and rewrites their sections of
//! benches/RESULTS.md.

use anyhow::{Result, bail};
use clap::Parser;

#[derive(Parser)]
#[command(about = "Run Sluice's benchmarks; each writes its section of benches/RESULTS.md")]
struct Cli {
    /// Run only these benchmarks (see --list).
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// List the benchmarks and exit.
    #[arg(long)]
    list: bool,
    /// Smaller sizes and shorter runs, to check that the benchmarks work.
    #[arg(long)]
    quick: bool,
}

// The proxies measured here run in this binary (`__proxy-node`), with the
// allocator the `mesh-agent` binary uses.
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

type Bench = fn(quick: bool) -> Result<()>;

const BENCHES: &[(&str, &str, Bench)] = &[
    (
        "lb-connect4",
        "kernel: connect4 cost per call at 100 / 10k / 100k services",
        benches::lb::connect4_cost,
    ),
    (
        "lb-connrate",
        "kernel: new connections/s via socket LB vs direct vs iptables DNAT",
        benches::lb::connection_rate,
    ),
    (
        "lb-reset",
        "kernel: time to reset the sockets pinned to removed backends, 10k open",
        benches::reset::reset_time,
    ),
    (
        "proxy-latency",
        "proxy: added p50/p99 at 1,000 rps and CPU, vs direct, TCP relay pair, nginx pair",
        benches::proxy::latency,
    ),
    (
        "proxy-throughput",
        "proxy: maximum requests/s and CPU, vs direct, TCP relay pair, nginx pair",
        benches::proxy::throughput,
    ),
    (
        "certs-issue",
        "workload certificates issued per second on one core",
        benches::certs_issue::run,
    ),
    (
        "certs-handshake",
        "mutual TLS 1.3 handshakes per second vs plain rustls",
        benches::certs_handshake::run,
    ),
];

fn main() -> Result<()> {
    // Child processes the benchmarks start inside test cgroups.
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("__drive") {
        return benches::lb::driver(&args[2..]);
    }
    if args.get(1).map(String::as_str) == Some("__proxy-node") {
        return benches::proxy::proxy_node(&args[2..]);
    }
    let cli = Cli::parse();
    if cli.list {
        for (name, what, _) in BENCHES {
            println!("{name:24} {what}");
        }
        return Ok(());
    }
    for name in &cli.only {
        if !BENCHES.iter().any(|(n, _, _)| n == name) {
            bail!("no benchmark called {name}; --list shows them");
        }
    }
    for (name, _, run) in BENCHES {
        if cli.only.is_empty() || cli.only.iter().any(|n| n == name) {
            eprintln!("== {name}");
            run(cli.quick)?;
        }
    }
    Ok(())
}
