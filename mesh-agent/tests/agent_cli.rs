//! The agent standalone without kernel programs (`--dataplane none`), its
//! in-process CA, and the `sluice` CLI against its admin API. No root needed:
//! pod cgroups are plain directories under a temporary cgroup root.

use std::{
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use mesh_agent::{
    admin::api::{Check, Routes, Status, Workloads},
    agent::{Agent, DataplaneKind, ProxyMode, RunArgs},
    cli::client::Client,
    crds::MtlsMode,
};

const SLUICE: &str = env!("CARGO_BIN_EXE_sluice");

fn examples() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/standalone"))
}

async fn eventually<T>(what: &str, mut f: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn sluice(admin: &str, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(SLUICE)
        .arg("--admin")
        .arg(admin)
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The agent's flags for the example configuration, without kernel programs
/// or proxy, on a dual-stack node (without a proxy, nothing to capture).
fn run_args(cg: &Path, state: &Path) -> RunArgs {
    RunArgs {
        source: format!("files:{}", examples().display()),
        node_name: "node-a".into(),
        node_addresses: vec!["127.0.0.1".parse().unwrap(), "::1".parse().unwrap()],
        cgroup_root: Some(cg.into()),
        state_dir: state.into(),
        admin_addr: "127.0.0.1:0".parse().unwrap(),
        bpffs: "/sys/fs/bpf".into(),
        lb_instance: "unused".into(),
        lb_max_services: ebpf_lb::Options::default().max_services,
        lb_max_backends: ebpf_lb::Options::default().max_backends,
        strict_allows_node: true,
        dataplane: DataplaneKind::None,
        daemonset: String::new(),
        proxy: ProxyMode::Off,
        proxy_capture_addr: Vec::new(),
        proxy_inbound_addr: None,
        proxy_settings: Vec::new(),
        proxy_mark: mesh_agent::config::PROXY_MARK,
        trust_domain: "cluster.local".into(),
        default_mtls_mode: MtlsMode::Permissive,
        ca_dir: None,
        ca_url: None,
        ca_bundle: "/nonexistent".into(),
        ca_token: "/nonexistent".into(),
    }
}

struct Running {
    agent: Agent,
    url: String,
    state: tempfile::TempDir,
    _cg: tempfile::TempDir,
}

async fn start() -> Running {
    let cg = tempfile::tempdir().unwrap();
    for pod in ["web-0", "reviews-v1-0", "batch-0"] {
        std::fs::create_dir(cg.path().join(pod)).unwrap();
        std::fs::write(cg.path().join(pod).join("cgroup.procs"), "").unwrap();
    }
    let state = tempfile::tempdir().unwrap();
    let agent = Agent::start(run_args(cg.path(), state.path()))
        .await
        .unwrap();
    let url = format!("http://{}", agent.admin_addr);
    Running {
        agent,
        url,
        state,
        _cg: cg,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standalone_agent_issues_certificates_and_the_cli_shows_them() {
    let r = start().await;
    let admin = Client::new(&r.url).unwrap();
    let w: Workloads = eventually("certificates for the enrolled pods", async || {
        let w: Workloads = admin.get("/v1/workloads").await.ok()?;
        let enrolled: Vec<_> = w.workloads.iter().filter(|w| w.enrolled).collect();
        (enrolled.len() == 2 && enrolled.iter().all(|w| w.cert_expiry.is_some())).then_some(w)
    })
    .await;
    let by = |n: &str| w.workloads.iter().find(|w| w.name == n).unwrap().clone();
    assert_eq!(
        by("web-0").identity,
        "spiffe://cluster.local/ns/shop/sa/web"
    );
    assert_eq!(
        by("web-0").mtls_mode,
        MtlsMode::Strict,
        "MeshPolicy strict applies"
    );
    assert!(!by("batch-0").enrolled);
    assert_eq!(
        by("batch-0").cert_expiry,
        None,
        "no certificate for a pod that opted out"
    );

    // The root key stays in the state directory, readable by the owner only.
    use std::os::unix::fs::PermissionsExt as _;
    let key = r.state.path().join("ca/root-key.pem");
    let mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "{}", key.display());

    // sluice status: table and JSON.
    let (code, out, err) = sluice(&r.url, &["status"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("Enrolled namespaces:  shop"), "{out}");
    assert!(out.contains("in-process (root in"), "{out}");
    assert!(
        out.contains("(active)"),
        "the trust bundle lists the active root: {out}"
    );
    // ... and how many of the node's certificates it signs (both pods').
    assert!(out.contains("signs 2 certificates here"), "{out}");
    let (_, out, _) = sluice(&r.url, &["-o", "json", "status"]);
    let s: Status = serde_json::from_str(&out).unwrap();
    assert!(s.synced);
    assert_eq!(s.counts.enrolled_workloads, 2);
    assert_eq!(s.ca.identities, 2);
    assert_eq!(s.ca.roots.len(), 1);
    assert_eq!(s.ca.roots[0].certificates, Some(2));

    // sluice workloads: one row per local pod, expiry shown.
    let (_, out, _) = sluice(&r.url, &["workloads"]);
    let web_row = out.lines().find(|l| l.contains("web-0")).unwrap();
    assert!(
        web_row.contains("yes") && web_row.contains("STRICT"),
        "{out}"
    );
    let expiry = by("web-0").cert_expiry.unwrap();
    assert!(web_row.contains(&expiry), "{out}");
    let (_, out, _) = sluice(&r.url, &["workloads", "-o", "json", "-n", "nope"]);
    let w: Workloads = serde_json::from_str(&out).unwrap();
    assert!(w.workloads.is_empty());

    // sluice routes: the HTTPRoute split is listed against its Service.
    let (_, out, _) = sluice(&r.url, &["-o", "json", "routes"]);
    let routes: Routes = serde_json::from_str(&out).unwrap();
    let split = routes
        .routes
        .iter()
        .find(|x| x.route.as_deref() == Some("shop/reviews-split"))
        .unwrap();
    assert_eq!(split.service, "shop/reviews");
    assert_eq!(
        split.backends,
        ["reviews:80 (w=90)", "reviews-v2:80 (w=10)"]
    );

    // sluice tls (and its alias): no proxy runs in this agent.
    for cmd in ["tls", "edges"] {
        let (code, out, _) = sluice(&r.url, &[cmd]);
        assert_eq!(code, 0);
        assert!(out.contains("No node proxy runs"), "{out}");
    }

    // sluice check: the agent's checks are included and pass or warn.
    let (_, out, _) = sluice(&r.url, &["-o", "json", "check"]);
    let c: Check = serde_json::from_str(&out).unwrap();
    let agent = c.checks.iter().find(|c| c.name == "agent").unwrap();
    assert_eq!(agent.outcome, mesh_agent::admin::api::Outcome::Pass);
    assert!(c.checks.iter().any(|c| c.name == "agent: kernel programs"));
    assert!(c.config_errors.is_empty(), "{:?}", c.config_errors);

    r.agent.shutdown().await;
}

#[tokio::test]
async fn sluice_says_where_it_looked_when_the_agent_is_down() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://127.0.0.1:{port}");
    let (code, out, err) = sluice(&url, &["status"]);
    assert_eq!(code, 2, "{out}");
    assert!(
        err.contains(&url) && err.contains("Is mesh-agent running"),
        "{err}"
    );
    // check still runs the local checks, and fails on the agent line; its
    // exit code, as every command's, says the agent could not be asked.
    let (code, out, _) = sluice(&url, &["check"]);
    assert_eq!(code, 2, "{out}");
    assert!(out.lines().next().unwrap().starts_with("CHECK"), "{out}");
    assert!(out.contains("kernel") && out.contains("cgroup v2"), "{out}");
    let agent_line = out.lines().find(|l| l.starts_with("agent ")).unwrap();
    assert!(
        agent_line.contains("FAIL") && agent_line.contains(&url),
        "{out}"
    );
    // A malformed --admin too: the local checks run, the agent line says why.
    let (code, out, _) = sluice("127.0.0.1:15020", &["check"]);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("kernel") && out.contains("cgroup v2"), "{out}");
    let agent_line = out.lines().find(|l| l.starts_with("agent ")).unwrap();
    assert!(
        agent_line.contains("FAIL") && agent_line.contains("not an http://host:port URL"),
        "{out}"
    );
    // A usage error is not "the agent could not be asked": 64, with usage.
    let (code, _, err) = sluice(&url, &["workloads", "-n"]);
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("--namespace"), "{err}");
    let (code, out, _) = sluice(&url, &["--help"]);
    assert_eq!(code, 0, "{out}");
}

#[test]
fn help_explains_every_flag() {
    let out = Command::new(SLUICE).arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for want in [
        "--admin",
        "SLUICE_ADMIN",
        "--output",
        "check",
        "status",
        "workloads",
        "tls",
        "routes",
    ] {
        assert!(help.contains(want), "sluice --help lacks {want}:\n{help}");
    }
    let out = Command::new(env!("CARGO_BIN_EXE_mesh-agent"))
        .args(["run", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for want in [
        "--source",
        "--node-name",
        "--node-address",
        "--cgroup-root",
        "--state-dir",
        "--admin-addr",
        "--proxy",
        "--ca-url",
    ] {
        assert!(
            help.contains(want),
            "mesh-agent run --help lacks {want}:\n{help}"
        );
    }
}

/// `mesh-agent validate DIR`: its exit code and what it printed.
fn validate(dir: &std::path::Path) -> (Option<i32>, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_mesh-agent"))
        .arg("validate")
        .arg(dir)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[test]
fn mesh_agent_validate_reports_file_document_and_field() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("bad.yaml"),
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n---\napiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec: {ports: [{port: eighty}]}\n",
    )
    .unwrap();
    let (code, text) = validate(dir.path());
    assert_eq!(code, Some(1), "{text}");
    assert!(
        text.contains("bad.yaml: document 2 (Service s): spec.ports[0].port:"),
        "{text}"
    );
    let (code, text) = validate(examples());
    assert_eq!(code, Some(0), "{text}");
    // A Deployment beside the Services is a note, not a failure.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("app.yaml"),
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web}\n---\napiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n",
    )
    .unwrap();
    let (code, text) = validate(dir.path());
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("ignored: apps/v1 Deployment"), "{text}");
    // What parses but the agent refuses fails too, as the agent would say
    // it: two unnamed ports of one Service, and a policy source that is no
    // namespace name.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("model.yaml"),
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n---\n\
         apiVersion: v1\nkind: Service\nmetadata: {name: s, namespace: a}\n\
         spec: {clusterIP: 127.96.0.7, ports: [{port: 80}, {port: 81}]}\n---\n\
         apiVersion: sluice.dev/v1alpha1\nkind: AccessPolicy\n\
         metadata: {name: p, namespace: a}\n\
         spec: {targetRefs: [{kind: Service, name: s}], rules: [{from: [{namespace: Monitoring}]}]}\n",
    )
    .unwrap();
    let (code, text) = validate(dir.path());
    assert_eq!(code, Some(1), "{text}");
    // Named by the file that defines them.
    assert!(
        text.contains("model.yaml: Service a/s: spec.ports"),
        "{text}"
    );
    assert!(text.contains("model.yaml: AccessPolicy a/p"), "{text}");
    // A STRICT MeshPolicy where no pod is in the mesh refuses nothing: a
    // problem; a PERMISSIVE one there changes nothing: a note.
    let dir = tempfile::tempdir().unwrap();
    let policy = |mode: &str| {
        format!(
            "apiVersion: v1\nkind: Namespace\nmetadata: {{name: legacy}}\n---\n\
             apiVersion: sluice.dev/v1alpha1\nkind: MeshPolicy\n\
             metadata: {{name: m, namespace: legacy}}\nspec: {{mode: {mode}}}\n"
        )
    };
    std::fs::write(dir.path().join("m.yaml"), policy("STRICT")).unwrap();
    let (code, text) = validate(dir.path());
    assert_eq!(code, Some(1), "{text}");
    assert!(
        text.contains("MeshPolicy legacy/m")
            && text.contains("not in the mesh")
            && text.contains("plaintext is not refused"),
        "{text}"
    );
    std::fs::write(dir.path().join("m.yaml"), policy("PERMISSIVE")).unwrap();
    let (code, text) = validate(dir.path());
    assert_eq!(code, Some(0), "{text}");
    assert!(
        text.contains("note: namespace legacy is not in the mesh"),
        "{text}"
    );
    // The example's STRICT policy with a PERMISSIVE one beside it that
    // takes its pods (namespace-wide too, first by name): a problem, in the
    // file that defines it.
    let dir = tempfile::tempdir().unwrap();
    for f in std::fs::read_dir(examples()).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, dir.path().join(f.file_name().unwrap())).unwrap();
    }
    std::fs::write(
        dir.path().join("open.yaml"),
        "apiVersion: sluice.dev/v1alpha1\nkind: MeshPolicy\n\
         metadata: {name: a-open, namespace: shop}\nspec: {mode: PERMISSIVE}\n",
    )
    .unwrap();
    let (code, text) = validate(dir.path());
    assert_eq!(code, Some(1), "{text}");
    assert!(
        text.contains(
            "policies.yaml: MeshPolicy shop/strict: not in force: MeshPolicy a-open sets the mode \
             of every pod of the namespace"
        ) && text.contains("plaintext is not refused"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_answers_while_the_agent_waits_for_the_ca_bundle() {
    let cg = tempfile::tempdir().unwrap();
    let state = tempfile::tempdir().unwrap();
    // A port that was free a moment ago: the address must be known before
    // start returns, which it does not while it waits.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let bundle = state.path().join("not-yet/trust-bundle.pem");
    let args = RunArgs {
        admin_addr: format!("127.0.0.1:{port}").parse().unwrap(),
        ca_url: Some("https://127.0.0.1:1".into()),
        ca_bundle: bundle.clone(),
        ..run_args(cg.path(), state.path())
    };
    let starting = tokio::spawn(Agent::start(args));
    let url = format!("http://127.0.0.1:{port}");
    let admin = Client::new(&url).unwrap();
    let body = eventually("the admin API while the agent starts", async || {
        let (code, body) = admin.get_raw("/readyz").await.ok()?;
        (code == 503).then(|| String::from_utf8_lossy(&body).into_owned())
    })
    .await;
    assert!(
        body.contains(&format!(
            "waiting for the CA's trust bundle at {}",
            bundle.display()
        )),
        "{body}"
    );
    assert_eq!(admin.get_raw("/healthz").await.unwrap().0, 200);
    // The CLI says the same.
    let (code, _, err) = sluice(&url, &["status"]);
    assert_ne!(code, 0);
    assert!(
        err.contains(&format!(
            "the agent at {url} is still starting: waiting for the CA's trust bundle at"
        )),
        "{err}"
    );
    assert!(err.contains("/readyz"), "{err}");
    assert!(!err.contains("Is that the Sluice agent"), "{err}");
    // `sluice check`: starting is not synced yet, a warning with what it
    // waits for (its other lines decide the exit code).
    let (_, out, _) = sluice(&url, &["-o", "json", "check"]);
    let c: Check = serde_json::from_str(&out).unwrap();
    let agent = c.checks.iter().find(|c| c.name == "agent").unwrap();
    assert_eq!(
        agent.outcome,
        mesh_agent::admin::api::Outcome::Warn,
        "{agent:?}"
    );
    assert!(
        agent.detail.contains("waiting for the CA's trust bundle"),
        "{agent:?}"
    );
    assert!(!starting.is_finished(), "start returned without the bundle");

    // An abandoned start takes its admin API with it.
    starting.abort();
    eventually("the admin port to be free again", async || {
        std::net::TcpListener::bind(("127.0.0.1", port)).ok()
    })
    .await;
}

#[test]
fn sluice_check_looks_for_bpffs_where_it_is_told() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(SLUICE)
        .args([
            "check",
            "-o",
            "json",
            "--admin",
            "http://127.0.0.1:1",
            "--bpffs",
        ])
        .arg(dir.path())
        .output()
        .unwrap();
    // The agent cannot be reached: exit 2, after the local checks.
    assert_eq!(out.status.code(), Some(2));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let bpffs = v["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "bpffs")
        .expect("a bpffs check");
    assert!(
        bpffs["detail"]
            .as_str()
            .unwrap()
            .contains(&dir.path().display().to_string()),
        "{bpffs}"
    );
}

/// `--proxy-setting` is checked before anything starts: a name the proxy
/// does not have, or a setting without the embedded proxy, stops the agent
/// with an error that says so.
#[tokio::test]
async fn a_bad_proxy_setting_stops_the_agent_at_start() {
    let cg = tempfile::tempdir().unwrap();
    let state = tempfile::tempdir().unwrap();
    let start = |proxy, setting: &str| {
        let mut args = run_args(cg.path(), state.path());
        args.proxy = proxy;
        args.proxy_settings = vec![setting.into()];
        Agent::start(args)
    };
    let e = start(ProxyMode::Embedded, "exchange_idle_timeout=900000")
        .await
        .err()
        .expect("a setting the proxy does not have");
    assert!(
        e.to_string()
            .contains("exchange_idle_timeout: no such setting"),
        "{e}"
    );
    let e = start(ProxyMode::Off, "exchange_idle_timeout_ms=900000")
        .await
        .err()
        .expect("a setting without the embedded proxy");
    assert!(
        e.to_string()
            .contains("applies to the embedded proxy only (--proxy off)"),
        "{e}"
    );
}
