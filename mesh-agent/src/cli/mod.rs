//! `sluice`: the command line for people and scripts. It reads the agent's
//! admin API and prints aligned tables, or `-o json`.

pub mod client;
pub mod table;

use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

use self::{
    client::Client,
    table::{Table, one_line, or_dash},
};
use crate::{
    admin::api::{
        Check, CheckResult, ConnectionInfo, Connections, Outcome, Routes, Status, WorkloadInfo,
        Workloads,
    },
    config,
};

#[derive(Debug, Parser)]
#[command(
    name = "sluice",
    version,
    about = "Inspect the Sluice mesh on this node",
    long_about = "Inspect the Sluice mesh on this node. Every command except `check` asks the \
                  node agent's admin API; `check` also runs local checks that work while the \
                  agent is down."
)]
pub struct Cli {
    /// The agent's admin API URL.
    #[arg(long, global = true, env = "SLUICE_ADMIN", default_value = config::DEFAULT_ADMIN_URL)]
    pub admin: String,
    /// Output format: aligned tables for people, or JSON for scripts.
    #[arg(short = 'o', long, global = true, value_enum, default_value_t = Output::Table)]
    pub output: Output,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Table,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Check the node (kernel, cgroup v2, bpffs, BTF, capabilities) and the
    /// agent (health, configuration errors, certificates). Exits 2 when the
    /// agent cannot be asked (as every command), 1 if a check fails (FAIL:
    /// an expired certificate, say); warnings
    /// (configuration problems, an agent still starting or not yet synced, a
    /// failing renewal) leave it at 0: gate manifests with `mesh-agent
    /// validate DIR`, which exits 1 on any problem.
    Check {
        /// Where the local bpffs check looks (the agent's --bpffs).
        #[arg(long, default_value = ebpf_lb::DEFAULT_BPFFS)]
        bpffs: std::path::PathBuf,
    },
    /// Node, enrolled namespaces, counts, CA and trust bundle.
    Status,
    /// Pods with identity, enrolment, mTLS mode and certificate expiry.
    Workloads {
        /// Also list pods of other nodes.
        #[arg(short = 'A', long)]
        all: bool,
        /// Only pods of this namespace.
        #[arg(short, long)]
        namespace: Option<String>,
    },
    /// Live connections through the node proxy: source and destination
    /// workload and identity, mTLS, TLS version, cipher, peer certificate expiry.
    #[command(visible_alias = "edges")]
    Tls,
    /// Routes per Service, with request and connection counts.
    Routes,
}

/// Runs the CLI; returns the process exit code.
pub async fn run(cli: Cli) -> ExitCode {
    match run_inner(&cli).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("sluice: {e}");
            ExitCode::from(2)
        }
    }
}

/// Writes to stdout; a closed pipe (`sluice ... | head`) ends the output
/// quietly rather than with a panic.
fn emit(text: &str) {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(text.as_bytes()).and_then(|()| out.flush());
}

fn print_json<T: serde::Serialize>(v: &T) {
    emit(&format!(
        "{}\n",
        serde_json::to_string_pretty(v).expect("JSON serialises")
    ));
}

async fn run_inner(cli: &Cli) -> Result<ExitCode, client::Error> {
    let json = cli.output == Output::Json;
    let c = match (&cli.command, Client::new(&cli.admin)) {
        // `check` runs its local checks whatever the admin address is.
        (Command::Check { bpffs }, c) => return Ok(check(c, bpffs, json).await),
        (_, c) => c?,
    };
    match &cli.command {
        Command::Check { .. } => {} // answered above
        Command::Status => {
            let s: Status = c.get("/v1/status").await?;
            if json {
                print_json(&s);
            } else {
                emit(&render_status(&s));
            }
        }
        Command::Workloads { all, namespace } => {
            let mut w: Workloads = c.get("/v1/workloads").await?;
            w.workloads.retain(|w| {
                (*all || w.local) && namespace.as_ref().is_none_or(|n| &w.namespace == n)
            });
            if json {
                print_json(&w);
            } else {
                emit(&render_workloads(&w, *all, namespace.as_deref()));
            }
        }
        Command::Tls => {
            let t: Connections = c.get("/v1/connections").await?;
            if json {
                print_json(&t);
            } else {
                emit(&render_connections(&t));
            }
        }
        Command::Routes => {
            let r: Routes = c.get("/v1/routes").await?;
            if json {
                print_json(&r);
            } else {
                emit(&render_routes(&r));
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The local checks, then the agent's. The agent's own capabilities are
/// what count once it answers: this process's (a user running `sluice`
/// without root) are then left out, rather than a warning to grant them.
fn with_agent_checks(local: Vec<CheckResult>, agent: Vec<CheckResult>) -> Vec<CheckResult> {
    let agent_caps = agent.iter().any(|c| c.name == "agent: capabilities");
    local
        .into_iter()
        .filter(|c| !(agent_caps && c.name == "capabilities"))
        .chain(agent)
        .collect()
}

/// Local checks, then the agent's; exit 2 when the agent cannot be asked,
/// 1 when something fails.
async fn check(c: Result<Client, client::Error>, bpffs: &std::path::Path, json: bool) -> ExitCode {
    let mut checks: Vec<CheckResult> = crate::check::local_checks(bpffs);
    let mut config_errors = Vec::new();
    let mut unreachable = false;
    let asked = match c {
        Ok(c) => c
            .get::<Check>("/v1/check")
            .await
            .map(|a| (a, c.url().to_string())),
        Err(e) => Err(e),
    };
    match asked {
        Ok((agent, url)) => {
            checks.push(CheckResult {
                name: "agent".into(),
                outcome: Outcome::Pass,
                // Reachable; its own health is the "agent: health" line.
                detail: format!("answering at {url}"),
            });
            checks = with_agent_checks(checks, agent.checks);
            config_errors = agent.config_errors;
        }
        // Still starting (waiting for the CA, say): not synced yet, which is
        // a warning, as `--help` says; the step it waits for is the detail.
        Err(e @ client::Error::Starting { .. }) => checks.push(CheckResult {
            name: "agent".into(),
            outcome: Outcome::Warn,
            detail: e.to_string().replace('\n', " "),
        }),
        Err(e) => {
            unreachable = true;
            checks.push(CheckResult {
                name: "agent".into(),
                outcome: Outcome::Fail,
                detail: e.to_string().replace('\n', " "),
            })
        }
    }
    let failed = checks.iter().any(|c| c.outcome == Outcome::Fail);
    if json {
        print_json(&Check {
            checks,
            config_errors,
        });
    } else {
        emit(&render_check(&checks, &config_errors));
    }
    // As every command: 2 when the agent cannot be asked, 1 when it (or
    // the node) fails a check.
    if unreachable {
        ExitCode::from(2)
    } else if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

pub fn render_check(checks: &[CheckResult], errors: &[crate::admin::api::ConfigError]) -> String {
    let mut t = Table::new(&["CHECK", "RESULT", "DETAIL"]);
    for c in checks {
        let r = match c.outcome {
            Outcome::Pass => "ok",
            Outcome::Warn => "warn",
            Outcome::Fail => "FAIL",
        };
        t.row(vec![c.name.clone(), r.into(), c.detail.clone()]);
    }
    let mut out = t.to_string();
    let (notes, problems): (Vec<_>, Vec<_>) = errors.iter().partition(|e| e.is_note());
    if !problems.is_empty() {
        out.push_str("\nConfiguration problems (the last good version of each stays in force):\n");
        for e in problems {
            out.push_str(&format!("  {}\n", one_line(&e.to_string())));
        }
    }
    if !notes.is_empty() {
        out.push_str("\nNotes (documents the agent does not read, and facts worth knowing):\n");
        for e in notes {
            out.push_str(&format!("  {}\n", one_line(&e.to_string())));
        }
    }
    out
}

pub fn render_status(s: &Status) -> String {
    let mut out = String::new();
    let kv = |out: &mut String, k: &str, v: String| out.push_str(&format!("{k:<22}{v}\n"));
    kv(
        &mut out,
        "Node:",
        if s.node_addresses.is_empty() {
            s.node.clone()
        } else {
            format!("{} ({})", s.node, s.node_addresses.join(", "))
        },
    );
    kv(
        &mut out,
        "Agent:",
        format!(
            "{} (source {}{})",
            s.version,
            s.source,
            if s.synced {
                ", synced"
            } else {
                ", NOT SYNCED yet"
            }
        ),
    );
    kv(
        &mut out,
        "Enrolled namespaces:",
        if s.enrolled_namespaces.is_empty() {
            format!(
                "none (annotate one: kubectl annotate ns NAME {}={})",
                config::MESH_ANNOTATION,
                config::MESH_ENABLED
            )
        } else {
            s.enrolled_namespaces.join(", ")
        },
    );
    let c = &s.counts;
    kv(
        &mut out,
        "Services:",
        format!(
            "{} ({} frontends, {} ready backends)",
            c.services, c.frontends, c.ready_backends
        ),
    );
    kv(
        &mut out,
        "Workloads:",
        format!(
            "{} on this node, {} enrolled",
            c.local_workloads, c.enrolled_workloads
        ),
    );
    kv(
        &mut out,
        "Routes / policies:",
        format!("{} / {}", c.routes, c.policies),
    );
    kv(
        &mut out,
        "Config problems:",
        if c.config_errors == 0 {
            "none".into()
        } else {
            format!("{} (see `sluice check`)", c.config_errors)
        },
    );
    kv(
        &mut out,
        "Proxy:",
        format!(
            "{}{}",
            s.proxy.mode,
            s.proxy
                .capture
                .as_ref()
                .map(|a| format!(", capture {a}"))
                .unwrap_or_default()
        ),
    );
    kv(
        &mut out,
        "CA:",
        format!(
            "{} (trust domain {}, {} identities on this node, {} with a valid certificate)",
            s.ca.mode, s.ca.trust_domain, s.ca.identities, s.ca.certified
        ),
    );
    if s.ca.roots.is_empty() {
        kv(&mut out, "Trust bundle:", "no roots".into());
    }
    for (i, r) in s.ca.roots.iter().enumerate() {
        kv(
            &mut out,
            if i == 0 { "Trust bundle:" } else { "" },
            match (&r.fingerprint, &r.not_before, &r.state) {
                (Some(fp), Some(from), Some(state)) => format!(
                    "{} sha256:{}… {state} ({from} to {}){}",
                    r.subject,
                    fp.chars().take(16).collect::<String>(),
                    r.not_after,
                    match r.certificates {
                        Some(1) => ", signs 1 certificate here".to_string(),
                        Some(n) => format!(", signs {n} certificates here"),
                        None => String::new(),
                    }
                ),
                _ => format!("{} (expires {})", r.subject, r.not_after),
            },
        );
    }
    out
}

/// `namespace`: the filter the rows passed, to say so when none is left.
pub fn render_workloads(w: &Workloads, all: bool, namespace: Option<&str>) -> String {
    let mut headers = vec![
        "NAMESPACE",
        "POD",
        "IDENTITY",
        "ENROLLED",
        "MTLS",
        "CERT EXPIRES",
    ];
    if all {
        headers.insert(2, "NODE");
    }
    let mut t = Table::new(&headers);
    for x in &w.workloads {
        let enrolled = match (x.enrolled, &x.reason) {
            (true, None) => "yes".to_string(),
            (true, Some(why)) => format!("yes, {why}"),
            (false, why) => format!("no: {}", why.clone().unwrap_or_default()),
        };
        let mut row = vec![
            x.namespace.clone(),
            x.name.clone(),
            x.identity.clone(),
            enrolled,
            // Not enrolled: its traffic bypasses the proxy, no mode applies.
            // STRICT that the kernel does not guard refuses nothing: only the
            // kernel sees plaintext sent to the pod.
            match (x.enrolled, kernel_unguarded(x)) {
                (false, _) => "-".into(),
                (true, Some(_)) => format!("{} (not enforced)", x.mtls_mode),
                (true, None) => x.mtls_mode.to_string(),
            },
            match (&x.cert_expiry, &x.cert_problem) {
                (_, Some(_)) => format!("{} (!)", x.cert_expiry.as_deref().unwrap_or("-")),
                (e, None) => or_dash(e.as_ref()),
            },
        ];
        if all {
            row.insert(2, x.node.clone());
        }
        t.row(row);
    }
    if t.is_empty() {
        return match (all, namespace) {
            (false, None) => "No pods on this node (use -A for every node).\n".into(),
            (true, None) => "No pods known to the agent.\n".into(),
            (false, Some(ns)) => {
                format!("No pods of namespace {ns} on this node (use -A for every node).\n")
            }
            (true, Some(ns)) => format!("No pods of namespace {ns} known to the agent.\n"),
        };
    }
    let mut out = t.to_string();
    let problems: Vec<String> = w
        .workloads
        .iter()
        .filter_map(|x| {
            let p = x.cert_problem.as_ref()?;
            Some(format!("  {}/{}: {}\n", x.namespace, x.name, one_line(p)))
        })
        .collect();
    if !problems.is_empty() {
        out.push_str("\nCertificate problems (!):\n");
        out.extend(problems);
    }
    let unguarded: Vec<String> = w
        .workloads
        .iter()
        .filter(|x| x.enrolled)
        .filter_map(|x| {
            Some(format!(
                "  {}/{}: {}\n",
                x.namespace,
                x.name,
                one_line(kernel_unguarded(x)?)
            ))
        })
        .collect();
    if !unguarded.is_empty() {
        out.push_str(
            "\nSTRICT pods the kernel does not guard (it does not refuse plaintext to them):\n",
        );
        out.extend(unguarded);
    }
    out
}

/// Why the kernel does not guard a pod's STRICT mode (`strict_guard` other
/// than `guarded on <interface>`).
fn kernel_unguarded(x: &WorkloadInfo) -> Option<&str> {
    x.strict_guard
        .as_deref()
        .filter(|g| x.mtls_mode == crate::crds::MtlsMode::Strict && !g.starts_with("guarded"))
}

pub fn render_connections(c: &Connections) -> String {
    if !c.proxy_running {
        return "No node proxy runs inside this agent (with --proxy external it runs apart, and \
                its connections are not visible here; `sluice status` says which), so there are \
                no proxied connections to show.\n"
            .into();
    }
    if c.connections.is_empty() {
        return "No live connections through the node proxy.\n".into();
    }
    let mut t = Table::new(&[
        "DIR",
        "KIND",
        "SOURCE",
        "SOURCE ID",
        "DESTINATION",
        "DESTINATION ID",
        "MTLS",
        "TLS",
        "CIPHER",
        "PEER CERT EXPIRES",
        "SENT",
        "RECEIVED",
    ]);
    for x in &c.connections {
        let mixed = |v: &Option<String>| match v {
            None if x.mixed_tls => "(mixed)".to_string(),
            v => or_dash(v.as_ref()),
        };
        t.row(vec![
            x.direction.clone(),
            connection_kind(x.protocol.as_deref()).into(),
            x.source_workload
                .clone()
                .unwrap_or_else(|| x.source_addr.clone()),
            or_dash(x.source_identity.as_ref()),
            x.destination_workload
                .clone()
                .unwrap_or_else(|| x.destination_addr.clone()),
            match &x.destination_identity {
                None if x.several_identities => "(several)".into(),
                v => or_dash(v.as_ref()),
            },
            mtls_cell(x),
            mixed(&x.tls_version),
            mixed(&x.cipher),
            or_dash(x.peer_cert_expiry.as_ref()),
            bytes(x.bytes_sent),
            bytes(x.bytes_received),
        ]);
    }
    t.to_string()
}

/// `tcp`, `http` or `tunnel` (the API's `protocol` without its direction).
fn connection_kind(protocol: Option<&str>) -> &str {
    match protocol {
        Some("tunnel-out" | "tunnel-in") => "tunnel",
        Some(p) => p
            .strip_prefix("outbound-")
            .or_else(|| p.strip_prefix("inbound-"))
            .unwrap_or(p),
        None => "-",
    }
}

/// `yes`; `pending` while a handshake or tunnel stream is being set up; `NO`,
/// saying how many of a captured HTTP connection's requests (and mirrored
/// copies) went in plaintext when others went through the tunnel.
fn mtls_cell(x: &ConnectionInfo) -> String {
    match (
        x.mtls,
        x.mtls_pending,
        x.requests_mtls,
        x.requests_plaintext,
    ) {
        (true, ..) => "yes".into(),
        (false, true, ..) => "pending".into(),
        (false, false, Some(m), Some(p)) if m > 0 && p > 0 => {
            format!("NO ({p} in plaintext, {m} over mTLS)")
        }
        _ => "NO".into(),
    }
}

/// `512 B`, `1.5 KiB`, `3.2 MiB`, `1.0 GiB`.
fn bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = 0;
    // Up a unit where one decimal would round to 1024 (`1024.0 KiB`).
    while v >= 1023.95 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

pub fn render_routes(r: &Routes) -> String {
    let mut t = Table::new(&[
        "SERVICE",
        "KIND",
        "ROUTE",
        "RULES",
        "BACKENDS",
        "STATUS",
        "REQUESTS",
        "ERRORS",
        "CONNECTIONS",
    ]);
    for x in &r.routes {
        let status = match (&x.reason, x.accepted && x.resolved_refs) {
            (None, true) => "ok".to_string(),
            // In force, with some rules left out.
            (Some(r), true) => format!("ok, {r}"),
            (Some(r), false) => r.clone(),
            (None, false) => "not accepted".into(),
        };
        t.row(vec![
            x.service.clone(),
            x.kind.clone(),
            or_dash(x.route.as_ref()),
            if x.route.is_some() {
                x.rules.to_string()
            } else {
                "-".into()
            },
            if x.backends.is_empty() {
                "-".into()
            } else {
                x.backends.join(", ")
            },
            status,
            or_dash(x.requests),
            or_dash(x.errors),
            x.connections.to_string(),
        ]);
    }
    if t.is_empty() {
        return "No Services.\n".into();
    }
    t.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admin::api::{ConfigError, ConnectionInfo, RouteInfo, WorkloadInfo};

    #[test]
    fn byte_counts_go_up_a_unit_rather_than_show_1024() {
        assert_eq!(bytes(1023), "1023 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(1024 * 1024 - 1), "1.0 MiB");
        assert_eq!(bytes(1024 * 1024 - 60), "1023.9 KiB");
        assert_eq!(bytes(3 * 1024 * 1024 * 1024), "3.0 GiB");
    }

    #[test]
    fn check_lists_problems_and_notes_apart() {
        let e = |message: &str| ConfigError {
            source: "/etc/sluice/app.yaml".into(),
            object: Some("document 1".into()),
            field: None,
            message: message.into(),
        };
        let out = render_check(
            &[],
            &[
                e("ignored: apps/v1 Deployment is not read by the files source"),
                e("did not find expected key"),
            ],
        );
        let (problems, notes) = out.split_once("Notes").expect("a notes section");
        assert!(problems.contains("did not find expected key"), "{out}");
        assert!(!problems.contains("Deployment"), "{out}");
        assert!(notes.contains("Deployment"), "{out}");
        // Notes alone: no problems section.
        let out = render_check(&[], &[e("ignored: apps/v1 Deployment")]);
        assert!(!out.contains("Configuration problems"), "{out}");
    }

    #[test]
    fn status_shows_each_roots_fingerprint_validity_and_state() {
        let mut s = Status::default();
        s.ca.roots = vec![
            crate::admin::api::CertSummary {
                subject: "CN=Sluice root CA 1 (active)".into(),
                not_after: "2036-11-23T00:00:00Z".into(),
                fingerprint: Some("ab".repeat(32)),
                not_before: Some("2026-11-25T00:00:00Z".into()),
                state: Some("valid".into()),
                certificates: Some(3),
            },
            crate::admin::api::CertSummary {
                subject: "CN=Sluice root CA 0".into(),
                not_after: "2026-11-20T00:00:00Z".into(),
                fingerprint: Some("cd".repeat(32)),
                not_before: Some("2016-11-20T00:00:00Z".into()),
                state: Some("expired".into()),
                certificates: Some(1),
            },
        ];
        let out = render_status(&s);
        assert!(
            out.contains("CN=Sluice root CA 1 (active) sha256:abababababababab… valid (2026-11-25T00:00:00Z to 2036-11-23T00:00:00Z), signs 3 certificates here"),
            "{out}"
        );
        assert!(
            out.contains("sha256:cdcdcdcdcdcdcdcd… expired (2016-11-20T00:00:00Z to 2026-11-20T00:00:00Z), signs 1 certificate here"),
            "{out}"
        );
    }

    #[test]
    fn tls_table_shows_identities_and_tls_details() {
        let c = Connections {
            proxy_running: true,
            connections: vec![ConnectionInfo {
                direction: "outbound".into(),
                source_addr: "10.0.0.1:40000".into(),
                source_workload: Some("shop/web-0".into()),
                source_identity: Some("spiffe://cluster.local/ns/shop/sa/web".into()),
                destination_addr: "10.0.0.2:8080".into(),
                destination_workload: Some("shop/db-0".into()),
                destination_identity: Some("spiffe://cluster.local/ns/shop/sa/db".into()),
                mtls: true,
                tls_version: Some("TLSv1.3".into()),
                cipher: Some("TLS13_AES_128_GCM_SHA256".into()),
                peer_cert_expiry: Some("2026-01-02T00:00:00Z".into()),
                protocol: Some("outbound-http".into()),
                bytes_sent: 512,
                bytes_received: 3 * 1024 * 1024 + 200 * 1024,
                ..Default::default()
            }],
        };
        let out = render_connections(&c);
        let lines: Vec<&str> = out.lines().collect();
        assert!(lines[0].starts_with("DIR"));
        for want in [
            "shop/web-0",
            "spiffe://cluster.local/ns/shop/sa/db",
            "yes",
            "TLSv1.3",
            "TLS13_AES_128_GCM_SHA256",
            "2026-01-02T00:00:00Z",
            "512 B",
            "3.2 MiB",
        ] {
            assert!(lines[1].contains(want), "{want} missing in {out}");
        }
        // Columns line up: every header starts where its column starts.
        let col = lines[0].find("MTLS").unwrap();
        assert_eq!(&lines[1][col..col + 3], "yes");
        let col = lines[0].find("KIND").unwrap();
        assert_eq!(&lines[1][col..col + 5], "http ");
    }

    /// `-` means "none": a handshake under way, requests that reached
    /// several identities and tunnels that differed say so instead.
    #[test]
    fn tls_table_tells_pending_several_and_mixed_from_none() {
        let row = |protocol: &str| ConnectionInfo {
            direction: "outbound".into(),
            source_addr: "10.0.0.1:40000".into(),
            destination_addr: "10.0.0.2:8080".into(),
            protocol: Some(protocol.into()),
            ..Default::default()
        };
        let c = Connections {
            proxy_running: true,
            connections: vec![
                ConnectionInfo {
                    mtls_pending: true,
                    destination_identity: Some("spiffe://cluster.local/ns/shop/sa/db".into()),
                    ..row("tunnel-out")
                },
                ConnectionInfo {
                    mtls: true,
                    several_identities: true,
                    mixed_tls: true,
                    requests_mtls: Some(4),
                    requests_plaintext: Some(0),
                    ..row("outbound-http")
                },
                ConnectionInfo {
                    requests_mtls: Some(3),
                    requests_plaintext: Some(1),
                    ..row("outbound-http")
                },
                row("outbound-tcp"),
            ],
        };
        let out = render_connections(&c);
        let lines: Vec<&str> = out.lines().collect();
        let cell = |line: usize, header: &str| {
            // The whole header: `TLS`, not the end of `MTLS`.
            let col = lines[0].find(&format!(" {header} ")).unwrap() + 1;
            lines[line][col..]
                .split("  ")
                .next()
                .unwrap()
                .trim()
                .to_string()
        };
        assert_eq!(cell(1, "KIND"), "tunnel", "{out}");
        assert_eq!(cell(1, "MTLS"), "pending", "{out}");
        assert_eq!(cell(1, "TLS"), "-", "{out}");
        assert_eq!(cell(2, "DESTINATION ID"), "(several)", "{out}");
        assert_eq!(cell(2, "MTLS"), "yes", "{out}");
        assert_eq!(cell(2, "TLS"), "(mixed)", "{out}");
        assert_eq!(cell(2, "CIPHER"), "(mixed)", "{out}");
        assert_eq!(cell(3, "MTLS"), "NO (1 in plaintext, 3 over mTLS)", "{out}");
        assert_eq!(cell(3, "DESTINATION ID"), "-", "{out}");
        assert_eq!(
            (cell(4, "KIND"), cell(4, "MTLS")),
            ("tcp".into(), "NO".into())
        );
    }

    #[test]
    fn the_agents_capabilities_replace_the_clis_own() {
        let c = |name: &str, outcome| CheckResult {
            name: name.into(),
            outcome,
            detail: String::new(),
        };
        let local = vec![c("kernel", Outcome::Pass), c("capabilities", Outcome::Warn)];
        let names = |v: &[CheckResult]| v.iter().map(|c| c.name.clone()).collect::<Vec<_>>();
        let merged =
            with_agent_checks(local.clone(), vec![c("agent: capabilities", Outcome::Pass)]);
        assert_eq!(names(&merged), ["kernel", "agent: capabilities"]);
        // An agent that does not report its own: the local line stays.
        let merged = with_agent_checks(local, vec![c("agent: sync", Outcome::Pass)]);
        assert_eq!(names(&merged), ["kernel", "capabilities", "agent: sync"]);
    }

    #[test]
    fn strict_the_kernel_does_not_guard_is_shown_as_the_proxys_alone() {
        let pod = |name: &str, guard: &str| WorkloadInfo {
            namespace: "shop".into(),
            name: name.into(),
            identity: "spiffe://cluster.local/ns/shop/sa/x".into(),
            local: true,
            enrolled: true,
            mtls_mode: crate::crds::MtlsMode::Strict,
            strict_guard: Some(guard.into()),
            ..Default::default()
        };
        let w = Workloads {
            workloads: vec![
                pod("db", "guarded on veth1"),
                pod("web", "not enforced in the kernel: the pod has no IP yet"),
                pod("cart", crate::reconcile::STRICT_WITHOUT_PROXY),
            ],
        };
        let out = render_workloads(&w, false, None);
        let row = |name: &str| out.lines().find(|l| l.contains(name)).unwrap().to_string();
        assert!(
            row("db").contains("STRICT") && !row("db").contains("(not enforced)"),
            "{out}"
        );
        assert!(row("web").contains("STRICT (not enforced)"), "{out}");
        assert!(row("cart").contains("STRICT (not enforced)"), "{out}");
        assert!(
            out.contains("shop/web: not enforced in the kernel: the pod has no IP yet"),
            "{out}"
        );
        assert!(!out.contains("shop/db:"), "{out}");
    }

    #[test]
    fn workloads_say_why_not_enrolled() {
        let w = Workloads {
            workloads: vec![WorkloadInfo {
                namespace: "plain".into(),
                name: "db".into(),
                identity: "spiffe://cluster.local/ns/plain/sa/default".into(),
                local: true,
                reason: Some("namespace plain is not enrolled".into()),
                mtls_mode: crate::crds::MtlsMode::Strict,
                ..Default::default()
            }],
        };
        let out = render_workloads(&w, false, None);
        assert!(out.contains("no: namespace plain is not enrolled"), "{out}");
        // No mTLS mode applies to traffic that bypasses the proxy.
        let lines: Vec<&str> = out.lines().collect();
        let col = lines[0].find("MTLS").unwrap();
        assert_eq!(
            lines[1][col..].split_whitespace().next(),
            Some("-"),
            "{out}"
        );
        // No rows left: the message names the filters that left none.
        let none = Workloads { workloads: vec![] };
        assert_eq!(
            render_workloads(&none, true, Some("nope")),
            "No pods of namespace nope known to the agent.\n"
        );
        assert_eq!(
            render_workloads(&none, false, None),
            "No pods on this node (use -A for every node).\n"
        );
    }

    #[test]
    fn routes_show_failures_reason() {
        let r = Routes {
            routes: vec![RouteInfo {
                service: "shop/web".into(),
                kind: "HTTPRoute".into(),
                route: Some("shop/split".into()),
                rules: 1,
                backends: vec!["web:80 (w=90)".into()],
                accepted: true,
                resolved_refs: false,
                reason: Some("BackendNotFound: Service shop/x does not exist".into()),
                ..Default::default()
            }],
        };
        let out = render_routes(&r);
        assert!(
            out.contains("BackendNotFound: Service shop/x does not exist"),
            "{out}"
        );
        assert!(out.contains("web:80 (w=90)"));
    }
}
