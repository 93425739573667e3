//! The node agent in standalone mode on the real kernel: `mesh-agent run`
//! (in-process) with the files source, programming ebpf-lb attached to a test
//! cgroup; clients (`netprobe`) started in pod cgroups below it. Needs root.

use std::{
    collections::BTreeSet,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::Result;
use integration::{
    cgroup::TestCgroup,
    lb::random_vip_addr,
    probe::{Probe, tally},
    require_root,
    servers::TcpBackend,
    unique_name,
};
use mesh_agent::{
    admin::api::{Status, Workloads},
    agent::{Agent, DataplaneKind, ProxyMode, RunArgs},
    cli::client::Client,
    crds::MtlsMode,
};

const NETPROBE: &str = env!("CARGO_BIN_EXE_netprobe");

/// Removes the agent's pinned kernel state, even when the test fails.
struct Pins(PathBuf);

impl Drop for Pins {
    fn drop(&mut self) {
        if let Err(e) = ebpf_lb::uninstall_at(&self.0) {
            eprintln!("warning: {e}");
        }
    }
}

fn args(dir: &Path, cg: &TestCgroup, instance: &str, state: &Path, capture: SocketAddr) -> RunArgs {
    RunArgs {
        source: format!("files:{}", dir.display()),
        node_name: "node-a".into(),
        node_addresses: vec!["127.0.0.1".parse().unwrap()],
        cgroup_root: Some(cg.path().into()),
        state_dir: state.into(),
        admin_addr: "127.0.0.1:0".parse().unwrap(),
        bpffs: ebpf_lb::DEFAULT_BPFFS.into(),
        lb_instance: instance.into(),
        lb_max_services: ebpf_lb::Options::default().max_services,
        lb_max_backends: ebpf_lb::Options::default().max_backends,
        strict_allows_node: true,
        dataplane: DataplaneKind::Kernel,
        daemonset: String::new(),
        proxy: ProxyMode::External,
        proxy_capture_addr: vec![capture],
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

fn manifests(
    vip: SocketAddr,
    enrolled: bool,
    b0: &TcpBackend,
    b1: &TcpBackend,
    b1_ready: bool,
) -> String {
    let annotation = if enrolled { "enabled" } else { "off" };
    format!(
        r#"apiVersion: v1
kind: Namespace
metadata:
  name: shop
  annotations:
    sluice.dev/mesh: {annotation}
---
apiVersion: v1
kind: Service
metadata: {{name: web, namespace: shop}}
spec:
  clusterIP: {ip}
  selector: {{app: web}}
  ports: [{{name: http, port: {port}, targetPort: http}}]
---
apiVersion: sluice.dev/v1alpha1
kind: SluiceWorkloads
nodes: [{{name: node-a, address: 127.0.0.1}}]
workloads:
  - {{name: web-0, namespace: shop, serviceAccount: web, ip: 127.0.0.1, node: node-b, labels: {{app: web}}, ports: {{http: {p0}}}}}
  - {{name: web-1, namespace: shop, serviceAccount: web, ip: 127.0.0.1, node: node-b, labels: {{app: web}}, ports: {{http: {p1}}}, ready: {b1_ready}}}
  - {{name: client-0, namespace: shop, serviceAccount: client, ip: 127.0.0.9, node: node-a, cgroup: client-0, labels: {{app: client}}}}
  - name: batch-0
    namespace: shop
    ip: 127.0.0.10
    node: node-a
    cgroup: batch-0
    annotations: {{sluice.dev/mesh: disabled}}
"#,
        ip = vip.ip(),
        port = vip.port(),
        p0 = b0.addr().port(),
        p1 = b1.addr().port(),
    )
}

/// Backends that answered `count` connections to `vip` from `cg`.
fn who_answers(cg: &TestCgroup, vip: SocketAddr, count: u32) -> Result<BTreeSet<String>> {
    let (to, n) = (vip.to_string(), count.to_string());
    let attempts = Probe::new(NETPROBE, &["tcp", "--to", &to, "--count", &n])
        .in_cgroup(cg)
        .run()?;
    for a in &attempts {
        assert!(a.errno.is_none(), "connect failed: {a:?}");
    }
    Ok(tally(&attempts).into_keys().collect())
}

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|s| s.to_string()).collect()
}

/// Polls `f` until it holds (the agent reloads files asynchronously).
fn eventually(what: &str, mut f: impl FnMut() -> Result<bool>) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if f()? {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    anyhow::bail!("timed out waiting until {what}")
}

#[test]
fn standalone_agent_balances_enrols_and_follows_file_changes() -> Result<()> {
    require_root();
    let cg = TestCgroup::new("agt")?;
    let client = cg.child("client-0")?;
    let batch = cg.child("batch-0")?;
    let b0 = TcpBackend::start("127.0.0.1:0".parse()?, "b0")?;
    let b1 = TcpBackend::start("127.0.0.1:0".parse()?, "b1")?;
    // Stands in for the node proxy: enrolled connections land here.
    let proxy = TcpBackend::start("127.0.0.1:0".parse()?, "proxy")?;
    let mut vip = random_vip_addr();
    vip.set_port(80);
    let dir = tempfile::tempdir()?;
    let state = tempfile::tempdir()?;
    let file = dir.path().join("shop.yaml");
    std::fs::write(&file, manifests(vip, true, &b0, &b1, true))?;
    let instance = format!("test-{}", unique_name("agt"));
    let _pins = Pins(Path::new(ebpf_lb::DEFAULT_BPFFS).join(&instance));

    let rt = tokio::runtime::Runtime::new()?;
    let agent = rt.block_on(Agent::start(args(
        dir.path(),
        &cg,
        &instance,
        state.path(),
        proxy.addr(),
    )))?;
    let admin = Client::new(&format!("http://{}", agent.admin_addr))?;
    eventually("the agent is synced", || {
        Ok(rt
            .block_on(admin.get::<Status>("/v1/status"))
            .is_ok_and(|s| s.synced))
    })?;

    // The enrolled pod's connections to the meshed Service go to the proxy;
    // the opted-out pod's are balanced over both backends.
    assert_eq!(who_answers(&client, vip, 20)?, set(&["proxy"]));
    assert_eq!(who_answers(&batch, vip, 60)?, set(&["b0", "b1"]));
    let w: Workloads = rt.block_on(admin.get("/v1/workloads"))?;
    let c = w.workloads.iter().find(|w| w.name == "client-0").unwrap();
    assert!(c.enrolled, "{c:?}");
    assert_eq!(c.cgroup_id, Some(client.id()));
    assert_eq!(c.identity, "spiffe://cluster.local/ns/shop/sa/client");
    let b = w.workloads.iter().find(|w| w.name == "batch-0").unwrap();
    assert!(!b.enrolled);
    // The in-process CA issued the enrolled pod's certificate.
    eventually("the client's certificate", || {
        let w: Workloads = rt.block_on(admin.get("/v1/workloads"))?;
        Ok(w.workloads
            .iter()
            .any(|w| w.name == "client-0" && w.cert_expiry.is_some()))
    })?;

    // The namespace leaves the mesh: new connections of the running pod are
    // balanced directly, without restarting it.
    std::fs::write(&file, manifests(vip, false, &b0, &b1, true))?;
    eventually("the client is balanced directly", || {
        Ok(!who_answers(&client, vip, 1)?.contains("proxy"))
    })?;
    assert_eq!(who_answers(&client, vip, 60)?, set(&["b0", "b1"]));

    // web-1 turns not ready: it gets no new connections.
    std::fs::write(&file, manifests(vip, false, &b0, &b1, false))?;
    eventually("b1 is out", || {
        Ok(who_answers(&batch, vip, 20)? == set(&["b0"]))
    })?;

    // A broken edit is refused, and the last good state stays in force.
    std::fs::write(
        &file,
        "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {ports: nope}\n",
    )?;
    eventually("the error is reported", || {
        Ok(rt
            .block_on(admin.get::<Status>("/v1/status"))?
            .counts
            .config_errors
            > 0)
    })?;
    assert_eq!(who_answers(&batch, vip, 20)?, set(&["b0"]));

    // The agent stops: the pinned programs and maps keep balancing.
    rt.block_on(agent.shutdown());
    assert_eq!(who_answers(&batch, vip, 20)?, set(&["b0"]));
    Ok(())
}

#[test]
fn a_restarted_agent_drops_what_the_files_no_longer_say() -> Result<()> {
    require_root();
    let cg = TestCgroup::new("agr")?;
    let batch = cg.child("batch-0")?;
    let b0 = TcpBackend::start("127.0.0.1:0".parse()?, "b0")?;
    let b1 = TcpBackend::start("127.0.0.1:0".parse()?, "b1")?;
    let decoy_proxy = TcpBackend::start("127.0.0.1:0".parse()?, "proxy")?;
    let mut vip = random_vip_addr();
    vip.set_port(80);
    let dir = tempfile::tempdir()?;
    let state = tempfile::tempdir()?;
    let file = dir.path().join("shop.yaml");
    std::fs::write(&file, manifests(vip, false, &b0, &b1, true))?;
    let instance = format!("test-{}", unique_name("agr"));
    let _pins = Pins(Path::new(ebpf_lb::DEFAULT_BPFFS).join(&instance));
    let rt = tokio::runtime::Runtime::new()?;
    let a = args(dir.path(), &cg, &instance, state.path(), decoy_proxy.addr());
    let agent = rt.block_on(Agent::start(a.clone()))?;
    let admin = Client::new(&format!("http://{}", agent.admin_addr))?;
    eventually("synced", || {
        Ok(rt
            .block_on(admin.get::<Status>("/v1/status"))
            .is_ok_and(|s| s.synced))
    })?;
    assert_eq!(who_answers(&batch, vip, 40)?, set(&["b0", "b1"]));
    rt.block_on(agent.shutdown());

    // While no agent runs, the Service is deleted from the files.
    let other = {
        let mut v = random_vip_addr();
        v.set_port(81);
        v
    };
    std::fs::write(&file, manifests(other, false, &b0, &b1, true))?;
    // The agent it replaces may still run (a rollout that starts the new pod
    // first): the new one waits for the instance, saying so on /readyz, and
    // starts once the old one lets go of it.
    let old = ebpf_lb::LoadBalancer::open(ebpf_lb::Options {
        instance: instance.clone(),
        ..ebpf_lb::Options::default()
    })?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let a = RunArgs {
        admin_addr: format!("127.0.0.1:{port}").parse()?,
        ..a
    };
    let starting = rt.spawn(Agent::start(a));
    let admin = Client::new(&format!("http://127.0.0.1:{port}"))?;
    let holder = format!("another loader (pid {}", std::process::id());
    let mut said = String::new();
    eventually("the new agent says what it waits for", || {
        if let Ok((503, body)) = rt.block_on(admin.get_raw("/readyz")) {
            said = String::from_utf8_lossy(&body).into_owned();
        }
        Ok(said.contains("waiting for the kernel programs") && said.contains(&holder))
    })
    .map_err(|e| anyhow::anyhow!("{e}; /readyz said {said:?}"))?;
    assert!(said.contains(&instance), "{said}");
    // Meanwhile the old state still balances.
    assert_eq!(who_answers(&batch, vip, 10)?, set(&["b0", "b1"]));
    drop(old);
    let agent = rt.block_on(starting)??;
    eventually("synced again", || {
        Ok(rt
            .block_on(admin.get::<Status>("/v1/status"))
            .is_ok_and(|s| s.synced))
    })?;
    // The old VIP is no longer a service (connect refused: nothing listens on it).
    let to = vip.to_string();
    let attempts = Probe::new(NETPROBE, &["tcp", "--to", &to, "--count", "1"])
        .in_cgroup(&batch)
        .run()?;
    assert!(
        attempts[0].backend.is_none(),
        "the removed service still answered: {attempts:?}"
    );
    assert_eq!(who_answers(&batch, other, 40)?, set(&["b0", "b1"]));
    rt.block_on(agent.shutdown());
    Ok(())
}
