//! The agent with its embedded node proxy on the real kernel: an enrolled
//! pod's connections to meshed Services are captured, carried over the mutual
//! TLS tunnel with SPIFFE identities issued by the in-process CA, and HTTP is
//! routed by an HTTPRoute from the files source. Needs root.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::{SocketAddr, TcpListener},
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::Result;
use integration::{
    cgroup::TestCgroup,
    lb::random_vip,
    probe::{Probe, tally},
    require_root,
    servers::TcpBackend,
    unique_name,
};
use mesh_agent::{
    admin::api::{Connections, Routes, Workloads},
    agent::{Agent, DataplaneKind, ProxyMode, RunArgs},
    cli::client::Client,
    crds::MtlsMode,
};

const NETPROBE: &str = env!("CARGO_BIN_EXE_netprobe");

struct Pins(PathBuf);

impl Drop for Pins {
    fn drop(&mut self) {
        if let Err(e) = ebpf_lb::uninstall_at(&self.0) {
            eprintln!("warning: {e}");
        }
    }
}

/// An HTTP/1.1 server answering every request with its name, keep-alive;
/// a flaky one answers every other request with 503.
struct HttpBackend {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
}

impl HttpBackend {
    fn start(bind: &str, name: &str) -> Result<Self> {
        Self::serve(bind, name, false)
    }

    fn flaky(bind: &str, name: &str) -> Result<Self> {
        Self::serve(bind, name, true)
    }

    fn serve(bind: &str, name: &str, flaky: bool) -> Result<Self> {
        let served = Arc::new(AtomicU64::new(0));
        let l = TcpListener::bind(bind)?;
        l.set_nonblocking(true)?;
        let addr = l.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let (s, name) = (stop.clone(), name.to_string());
        thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                match l.accept() {
                    Ok((c, _)) => {
                        let name = name.clone();
                        let served = served.clone();
                        thread::spawn(move || {
                            let _ = c.set_nonblocking(false);
                            let _ = c.set_read_timeout(Some(Duration::from_secs(10)));
                            let mut r = BufReader::new(c.try_clone().unwrap());
                            let mut w = c;
                            loop {
                                let mut line = String::new();
                                // Request line and headers, up to the blank line.
                                let mut saw_request = false;
                                loop {
                                    line.clear();
                                    match r.read_line(&mut line) {
                                        Ok(0) | Err(_) => return,
                                        Ok(_) if line == "\r\n" && saw_request => break,
                                        Ok(_) => saw_request = true,
                                    }
                                }
                                let n = served.fetch_add(1, Ordering::SeqCst);
                                let status = if flaky && n.is_multiple_of(2) {
                                    "503 Service Unavailable"
                                } else {
                                    "200 OK"
                                };
                                let resp = format!(
                                    "HTTP/1.1 {status}\r\ncontent-length: {}\r\ncontent-type: text/plain\r\n\r\n{name}",
                                    name.len()
                                );
                                if w.write_all(resp.as_bytes()).is_err() {
                                    return;
                                }
                            }
                        });
                    }
                    Err(_) => thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Ok(Self { addr, stop })
    }
}

impl Drop for HttpBackend {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn eventually<T>(what: &str, mut f: impl FnMut() -> Result<Option<T>>) -> Result<T> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if let Some(v) = f()? {
            return Ok(v);
        }
        thread::sleep(Duration::from_millis(50));
    }
    anyhow::bail!("timed out waiting until {what}")
}

#[test]
fn the_embedded_proxy_carries_enrolled_traffic_over_mtls_and_routes_http() -> Result<()> {
    require_root();
    let cg = TestCgroup::new("apx")?;
    let client = cg.child("client-0")?;
    let _pods: Vec<TestCgroup> = ["raw-0", "web-0", "web-v2-0", "flaky-0"]
        .iter()
        .map(|p| cg.child(p))
        .collect::<Result<_>>()?;
    let raw = TcpBackend::start("127.0.0.2:0".parse()?, "raw-0")?;
    let v1 = HttpBackend::start("127.0.0.3:0", "v1")?;
    let v2 = HttpBackend::start("127.0.0.4:0", "v2")?;
    let flaky = HttpBackend::flaky("127.0.0.5:0", "flaky")?;
    let db = HttpBackend::start("127.0.0.6:0", "db")?;
    let (raw_vip, web_vip, web2_vip) = (random_vip(), random_vip(), random_vip());
    let (flaky_vip, db_vip) = (random_vip(), random_vip());
    let dir = tempfile::tempdir()?;
    std::fs::write(
        dir.path().join("mesh.yaml"),
        format!(
            r#"apiVersion: v1
kind: Namespace
metadata: {{name: shop, annotations: {{sluice.dev/mesh: enabled}}}}
---
apiVersion: v1
kind: Service
metadata: {{name: raw, namespace: shop}}
spec: {{clusterIP: {raw_vip}, selector: {{app: raw}}, ports: [{{name: tcp, port: 9000, targetPort: {raw_port}, appProtocol: tcp}}]}}
---
apiVersion: v1
kind: Service
metadata: {{name: web, namespace: shop}}
spec: {{clusterIP: {web_vip}, selector: {{app: web, version: v1}}, ports: [{{name: http, port: 80, targetPort: http, appProtocol: http}}]}}
---
apiVersion: v1
kind: Service
metadata: {{name: web-v2, namespace: shop}}
spec: {{clusterIP: {web2_vip}, selector: {{app: web, version: v2}}, ports: [{{name: http, port: 80, targetPort: http, appProtocol: http}}]}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: web-split, namespace: shop}}
spec:
  parentRefs: [{{group: "", kind: Service, name: web, port: 80}}]
  rules:
    - matches: [{{path: {{type: PathPrefix, value: /v2}}}}]
      backendRefs: [{{name: web-v2, port: 80}}]
    - backendRefs: [{{name: web, port: 80}}]
    - matches: [{{path: {{type: PathPrefix, value: /ext}}}}]
      filters: [{{type: ExtensionRef, extensionRef: {{group: example.com, kind: Filter, name: x}}}}]
      backendRefs: [{{name: web, port: 80}}]
    - matches: [{{path: {{type: PathPrefix, value: /cross}}}}]
      backendRefs: [{{name: db, namespace: other, port: 80}}]
---
apiVersion: v1
kind: Service
metadata: {{name: flaky, namespace: shop}}
spec: {{clusterIP: {flaky_vip}, selector: {{app: flaky}}, ports: [{{name: http, port: 80, targetPort: http, appProtocol: http}}]}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: flaky-retry, namespace: shop}}
spec:
  parentRefs: [{{group: "", kind: Service, name: flaky, port: 80}}]
  rules:
    - matches: [{{path: {{type: PathPrefix, value: /retried}}}}]
      backendRefs: [{{name: flaky, port: 80}}]
      retry: {{attempts: 2, backoff: 1ms, codes: [503]}}
    - backendRefs: [{{name: flaky, port: 80}}]
---
apiVersion: v1
kind: Namespace
metadata: {{name: other}}
---
apiVersion: v1
kind: Service
metadata: {{name: db, namespace: other}}
spec: {{clusterIP: {db_vip}, selector: {{app: db}}, ports: [{{name: http, port: 80, targetPort: http}}]}}
---
apiVersion: sluice.dev/v1alpha1
kind: SluiceWorkloads
nodes: [{{name: node-a, address: 127.0.0.1}}]
workloads:
  - {{name: client-0, namespace: shop, serviceAccount: client, ip: 127.0.0.1, node: node-a, cgroup: client-0}}
  - {{name: raw-0, namespace: shop, serviceAccount: raw, ip: 127.0.0.2, node: node-a, cgroup: raw-0, labels: {{app: raw}}}}
  - {{name: web-0, namespace: shop, serviceAccount: web, ip: 127.0.0.3, node: node-a, cgroup: web-0, labels: {{app: web, version: v1}}, ports: {{http: {p1}}}}}
  - {{name: web-v2-0, namespace: shop, serviceAccount: web, ip: 127.0.0.4, node: node-a, cgroup: web-v2-0, labels: {{app: web, version: v2}}, ports: {{http: {p2}}}}}
  - {{name: flaky-0, namespace: shop, serviceAccount: flaky, ip: 127.0.0.5, node: node-a, cgroup: flaky-0, labels: {{app: flaky}}, ports: {{http: {p3}}}}}
  - {{name: db-0, namespace: other, serviceAccount: db, ip: 127.0.0.6, node: node-a, labels: {{app: db}}, ports: {{http: {p4}}}}}
"#,
            raw_port = raw.addr().port(),
            p1 = v1.addr.port(),
            p2 = v2.addr.port(),
            p3 = flaky.addr.port(),
            p4 = db.addr.port(),
        ),
    )?;
    let state = tempfile::tempdir()?;
    let instance = format!("test-{}", unique_name("apx"));
    let _pins = Pins(Path::new(ebpf_lb::DEFAULT_BPFFS).join(&instance));
    let rt = tokio::runtime::Runtime::new()?;
    let agent = rt.block_on(Agent::start(RunArgs {
        source: format!("files:{}", dir.path().display()),
        node_name: "node-a".into(),
        node_addresses: vec!["127.0.0.1".parse()?],
        cgroup_root: Some(cg.path().into()),
        state_dir: state.path().into(),
        admin_addr: "127.0.0.1:0".parse()?,
        bpffs: ebpf_lb::DEFAULT_BPFFS.into(),
        lb_instance: instance.clone(),
        lb_max_services: ebpf_lb::Options::default().max_services,
        lb_max_backends: ebpf_lb::Options::default().max_backends,
        strict_allows_node: true,
        dataplane: DataplaneKind::Kernel,
        daemonset: String::new(),
        proxy: ProxyMode::Embedded,
        proxy_capture_addr: vec!["127.0.0.1:0".parse()?],
        proxy_inbound_addr: Some("127.0.0.1:0".parse()?),
        // Taken by the embedded proxy (a wrong one would stop the start).
        proxy_settings: vec!["tcp_idle_timeout_ms=600000".into()],
        // Not the default: the kernel and the embedded proxy take the same.
        proxy_mark: 0x5c1c_2000,
        trust_domain: "cluster.local".into(),
        default_mtls_mode: MtlsMode::Permissive,
        ca_dir: None,
        ca_url: None,
        ca_bundle: "/nonexistent".into(),
        ca_token: "/nonexistent".into(),
    }))?;
    let admin = Client::new(&format!("http://{}", agent.admin_addr))?;
    // Every pod enrolled, with its certificate.
    eventually("certificates for every pod", || {
        let w: Workloads = rt.block_on(admin.get("/v1/workloads"))?;
        let shop: Vec<_> = w
            .workloads
            .iter()
            .filter(|w| w.namespace == "shop")
            .collect();
        Ok(
            (shop.len() == 5 && shop.iter().all(|w| w.enrolled && w.cert_expiry.is_some()))
                .then_some(()),
        )
    })?;

    // Opaque TCP: captured, tunnelled with mTLS, delivered to raw-0.
    let to = SocketAddr::new(raw_vip.into(), 9000).to_string();
    let running = Probe::new(NETPROBE, &["tcp", "--to", &to, "--hold-ms", "3000"])
        .in_cgroup(&client)
        .spawn()?;
    let conns = eventually("the tunnelled connection in the table", || {
        let c: Connections = rt.block_on(admin.get("/v1/connections"))?;
        Ok(c.connections
            .iter()
            .any(|c| {
                c.mtls
                    && c.destination_identity.as_deref()
                        == Some("spiffe://cluster.local/ns/shop/sa/raw")
            })
            .then_some(c))
    })?;
    assert!(conns.proxy_running);
    let tunnel = conns
        .connections
        .iter()
        .find(|c| {
            c.mtls
                && c.destination_identity.as_deref()
                    == Some("spiffe://cluster.local/ns/shop/sa/raw")
        })
        .unwrap();
    assert_eq!(
        tunnel.source_identity.as_deref(),
        Some("spiffe://cluster.local/ns/shop/sa/client"),
        "{tunnel:?}"
    );
    assert!(
        tunnel
            .tls_version
            .as_deref()
            .is_some_and(|v| v.contains("1.3") || v.contains("1_3")),
        "{tunnel:?}"
    );
    assert!(
        tunnel.cipher.as_deref().is_some_and(|c| !c.is_empty()),
        "{tunnel:?}"
    );
    assert!(tunnel.peer_cert_expiry.is_some(), "{tunnel:?}");
    let attempts = running.finish()?;
    assert_eq!(attempts.len(), 1);
    assert_eq!(
        attempts[0].backend.as_deref(),
        Some("raw-0"),
        "{attempts:?}"
    );
    assert_eq!(
        attempts[0].peer.as_deref(),
        Some(to.as_str()),
        "the client still sees the VIP"
    );

    // HTTP: the HTTPRoute sends /v2 to web-v2 and the rest to web.
    let web = SocketAddr::new(web_vip.into(), 80).to_string();
    for (path, want) in [("/v2/items", "v2"), ("/items", "v1")] {
        let attempts = Probe::new(
            NETPROBE,
            &["http", "--to", &web, "--path", path, "--count", "5"],
        )
        .in_cgroup(&client)
        .run()?;
        let t = tally(&attempts);
        assert_eq!(
            t.keys().cloned().collect::<Vec<_>>(),
            [want],
            "{path}: {attempts:?}"
        );
        assert_eq!(t[want], 5);
    }
    let routes: Routes = rt.block_on(admin.get("/v1/routes"))?;
    let split = routes
        .routes
        .iter()
        .find(|r| r.route.as_deref() == Some("shop/web-split"))
        .unwrap();
    assert_eq!(split.requests, Some(10), "{split:?}");
    assert_eq!(split.errors, Some(0));

    // The rule the proxy cannot take is left out and reported, in the route's
    // conditions as `sluice check` shows them.
    let check: mesh_agent::admin::api::Check = rt.block_on(admin.get("/v1/check"))?;
    let split_problems: Vec<&str> = check
        .config_errors
        .iter()
        .filter(|e| e.object.as_deref() == Some("HTTPRoute shop/web-split"))
        .map(|e| e.message.as_str())
        .collect();
    assert!(
        split_problems.iter().any(|m| m.starts_with(
            "PartiallyInvalid is True (UnsupportedValue): Dropped Rule 2: spec.rules[2].filters[0].type"
        )),
        "{:?}",
        check.config_errors
    );
    // A backend in another namespace that is not in the mesh is refused
    // (the node proxy would reach it in plaintext, past its NetworkPolicies;
    // within the mesh no ReferenceGrant is needed, GEP-1294): its requests
    // are answered 500, and the reason is in `sluice check`.
    assert!(
        split_problems
            .iter()
            .any(|m| m.starts_with("ResolvedRefs is False (RefNotPermitted)")
                && m.contains("not in the mesh")),
        "{split_problems:?}"
    );
    let cross = || -> Result<Vec<Option<String>>> {
        let attempts = Probe::new(
            NETPROBE,
            &["http", "--to", &web, "--path", "/cross", "--count", "3"],
        )
        .in_cgroup(&client)
        .run()?;
        Ok(attempts.into_iter().map(|a| a.peer).collect())
    };
    let refused = vec![Some("500".to_string()); 3];
    assert_eq!(cross()?, refused);
    // A ReferenceGrant written for it is ignored with a note that says why,
    // and changes nothing.
    std::fs::write(
        dir.path().join("grant.yaml"),
        r#"apiVersion: gateway.networking.k8s.io/v1beta1
kind: ReferenceGrant
metadata: {name: shop-routes, namespace: other}
spec:
  from: [{group: gateway.networking.k8s.io, kind: HTTPRoute, namespace: shop}]
  to: [{group: "", kind: Service, name: db}]
"#,
    )?;
    eventually("the note on the ignored grant", || {
        let check: mesh_agent::admin::api::Check = rt.block_on(admin.get("/v1/check"))?;
        Ok(check
            .config_errors
            .iter()
            .any(|e| {
                e.source.ends_with("grant.yaml")
                    && e.message
                        .contains("mesh routes need no ReferenceGrant (GEP-1294)")
            })
            .then_some(()))
    })?;
    assert_eq!(cross()?, refused);

    // Retries from the route: the backend fails every other request, and the
    // retried rule hides it; the other rule of the same route does not.
    let to_flaky = SocketAddr::new(flaky_vip.into(), 80).to_string();
    let run = |path: &str| -> Result<Vec<String>> {
        Ok(Probe::new(
            NETPROBE,
            &["http", "--to", &to_flaky, "--path", path, "--count", "6"],
        )
        .in_cgroup(&client)
        .run()?
        .into_iter()
        .map(|a| a.peer.unwrap_or_else(|| format!("{:?}", a.error)))
        .collect())
    };
    assert_eq!(run("/retried")?, vec!["200"; 6]);
    let plain = run("/plain")?;
    assert_eq!(
        plain.iter().filter(|s| *s == "503").count(),
        3,
        "without retries every other request fails: {plain:?}"
    );

    rt.block_on(agent.shutdown());
    Ok(())
}
