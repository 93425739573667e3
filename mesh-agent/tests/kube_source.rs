//! The Kubernetes source against a fake API server (`tower_test::mock`) that
//! replays list and watch responses recorded from real API servers
//! (`tests/fixtures/kube`), driving a reconciler with the in-memory dataplane.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, mpsc},
    time::{Duration, Instant},
};

use ebpf_lb::{Backend, Change, Frontend};
use mesh_agent::{
    agent::spawn_reconciler,
    cgroups::PodCgroups,
    crds::MtlsMode,
    reconcile::{Outputs, Reconciler, Settings, dataplane::MemoryDataplane},
    sources::kube::{KubeSource, status},
};
use serde_json::{Value, json};

mod support;
use support::FakeApi;

/// Polls `f` until it returns Some, or fails after a deadline.
fn eventually<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until the source watches `path` on `fake`.
async fn watch_open(fake: &FakeApi, path: &'static str) {
    let fake = fake.clone();
    tokio::task::spawn_blocking(move || {
        eventually("the watch open", || fake.watching(path).then_some(()))
    })
    .await
    .unwrap();
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

struct Running {
    fake: FakeApi,
    dp: Arc<MemoryDataplane>,
    rx: mesh_agent::reconcile::OutputReceivers,
    _stop: tokio::sync::watch::Sender<bool>,
}

fn start(fake: FakeApi) -> Running {
    start_with(fake, mesh_agent::sources::kube::WATCH_RECOVERED_AFTER)
}

/// With failed watches taken as resumed after `recovered_after` quiet.
fn start_with(fake: FakeApi, recovered_after: std::time::Duration) -> Running {
    start_configured(fake, |s| s.recovered_after(recovered_after))
}

/// With the source as `configure` leaves it.
fn start_configured(fake: FakeApi, configure: impl FnOnce(KubeSource) -> KubeSource) -> Running {
    let client = fake.client();
    let dp = Arc::new(MemoryDataplane::new());
    let (mut out, rx) = Outputs::channels();
    let (status_tx, status_rx) = mesh_agent::reconcile::policies::status_queue();
    out.status = Some(status_tx);
    let settings = Settings {
        node: "node-a".into(),
        node_addresses: vec!["192.0.2.11".parse().unwrap()],
        trust_domain: "cluster.local".into(),
        default_mode: MtlsMode::Permissive,
        proxy: None,
        kernel_strict: false,
    };
    let cg = std::env::temp_dir();
    let r = Reconciler::new(
        dp.clone(),
        Box::new(PodCgroups {
            root: cg.clone(),
            base: cg,
        }),
        settings,
        out,
    );
    let (tx, inputs) = mpsc::channel();
    spawn_reconciler(r, inputs, None);
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    tokio::spawn(configure(KubeSource::new(client.clone())).run(tx, stop));
    // This agent holds the status writer Lease (tests/kube_lease.rs).
    let (_, write_until) = tokio::sync::watch::channel(Some(
        std::time::Instant::now() + std::time::Duration::from_secs(3600),
    ));
    tokio::spawn(status::run(
        client,
        status_rx,
        write_until,
        stop_tx.subscribe(),
        || {},
    ));
    Running {
        fake,
        dp,
        rx,
        _stop: stop_tx,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lists_are_programmed_and_a_missing_crd_does_not_block_the_sync() {
    let r = start(FakeApi::with_fixtures());
    let web = Frontend::tcp(addr("10.96.14.20:80"));
    let view_rx = r.rx.view.clone();
    let view = tokio::task::spawn_blocking(move || {
        eventually("the initial sync", || {
            let v = view_rx.borrow().clone();
            v.synced.then_some(v)
        })
    })
    .await
    .unwrap();
    let spec = r.dp.spec(&web).expect("web is programmed");
    assert_eq!(
        spec.backends,
        vec![
            Backend::ready(addr("10.244.1.7:8080")),
            Backend::ready(addr("10.244.2.9:8080"))
        ]
    );
    assert!(spec.meshed, "namespace shop is enrolled");
    assert_eq!(spec.affinity, Some(Duration::from_secs(600)));
    let kubernetes = r.dp.spec(&Frontend::tcp(addr("10.96.0.1:443"))).unwrap();
    assert!(!kubernetes.meshed);
    // web-canary has a slice with no endpoints: programmed, refusing connects.
    assert_eq!(
        r.dp.spec(&Frontend::tcp(addr("10.96.14.21:80")))
            .unwrap()
            .backends,
        vec![]
    );

    // Lists come from the API server's watch cache (resourceVersion=0),
    // as informers list, not every node's quorum read of every Pod.
    for path in ["/api/v1/pods", "/apis/discovery.k8s.io/v1/endpointslices"] {
        let queries = r.fake.list_queries(path);
        assert!(
            !queries.is_empty() && queries.iter().all(|q| q.contains("resourceVersion=0")),
            "{path}: {queries:?}"
        );
    }
    // GRPCRoute is not served: reported, and the rest went ahead.
    assert!(
        view.config_errors
            .iter()
            .any(|e| e.source == "kubernetes GRPCRoute"
                && e.message.contains("install its CRD")
                && e.message
                    .contains("/apis/gateway.networking.k8s.io/v1/grpcroutes")),
        "{:#?}",
        view.config_errors
    );
    // The invalid AccessPolicy is reported with its field.
    assert!(
        view.config_errors
            .iter()
            .any(|e| e.object.as_deref() == Some("AccessPolicy shop/typo")
                && e.field.as_deref() == Some("spec.rules[0].from[0].identity")),
        "{:#?}",
        view.config_errors
    );
    // The local pod is enrolled in intent; its cgroup is not there (no kubelet).
    let w = view
        .workloads
        .iter()
        .find(|w| w.name == "web-6c9b8f7d5-x2k4p")
        .unwrap();
    assert!(w.local);
    assert_eq!(w.identity, "spiffe://cluster.local/ns/shop/sa/web");
    assert!(
        w.reason
            .as_deref()
            .unwrap()
            .contains("1e2d3c4b-5a69-4788-97a6-b5c4d3e2f1a0"),
        "{w:?}"
    );
    // The proxy view has node addresses for remote endpoints.
    let mesh = r.rx.mesh.borrow().clone();
    let svc = mesh.services.iter().find(|s| s.key.name == "web").unwrap();
    let remote = svc.ports[0]
        .endpoints
        .iter()
        .find(|e| e.node.as_deref() == Some("node-b"))
        .unwrap();
    assert_eq!(remote.node_address, Some("192.0.2.12".parse().unwrap()));
    assert_eq!(
        remote.identity.as_deref(),
        Some("spiffe://cluster.local/ns/shop/sa/web")
    );
    // The experimental retry field of the listed HTTPRoute reaches the proxy.
    let split = mesh
        .http_routes
        .iter()
        .find(|r| r.metadata.name.as_deref() == Some("web-split"))
        .unwrap();
    let t = mesh_agent::proxy::routes::http_route(split, &mesh.refs);
    assert_eq!((t.dropped, t.refused), (vec![], vec![]));
    let rule = &t.route.expect("web-split is in force").rules[0];
    assert_eq!(
        rule.retry,
        Some(l7_proxy::config::Retry {
            codes: vec![503],
            attempts: 2,
            backoff_ms: 10
        })
    );
    assert_eq!(rule.timeouts.request_ms, Some(5000));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watched_endpointslice_change_reprograms_only_its_service() {
    let r = start(FakeApi::with_fixtures());
    let slices = "/apis/discovery.k8s.io/v1/endpointslices";
    let (view_rx, fake) = (r.rx.view.clone(), r.fake.clone());
    tokio::task::spawn_blocking(move || {
        eventually("sync and an open EndpointSlice watch", || {
            (view_rx.borrow().synced && fake.watching(slices)).then_some(())
        })
    })
    .await
    .unwrap();
    r.dp.clear_batches();
    // The second web pod turns not ready, then terminating.
    let mut slice: Value = serde_json::from_slice::<Value>(
        &std::fs::read(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/kube/endpointslices.json"
        ))
        .unwrap(),
    )
    .unwrap()["items"][1]
        .clone();
    slice["metadata"]["resourceVersion"] = json!("51300");
    slice["endpoints"][1]["conditions"] =
        json!({"ready": false, "serving": true, "terminating": true});
    slice["apiVersion"] = json!("discovery.k8s.io/v1");
    slice["kind"] = json!("EndpointSlice");
    r.fake.event(slices, "MODIFIED", slice);
    let dp = r.dp.clone();
    let batches = tokio::task::spawn_blocking(move || {
        eventually("a kernel update", || {
            let b = dp.batches();
            (!b.is_empty()).then_some(b)
        })
    })
    .await
    .unwrap();
    assert_eq!(batches.len(), 1, "{batches:?}");
    let [Change::Upsert(spec)] = &batches[0][..] else {
        panic!("{batches:?}")
    };
    assert_eq!(spec.frontend, Frontend::tcp(addr("10.96.14.20:80")));
    let ready: Vec<SocketAddr> = spec
        .backends
        .iter()
        .filter(|b| b.state == ebpf_lb::BackendState::Ready)
        .map(|b| b.addr)
        .collect();
    assert_eq!(ready, [addr("10.244.1.7:8080")]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_and_policy_status_is_written_back() {
    let r = start(FakeApi::with_fixtures());
    let fake = r.fake.clone();
    let patches = tokio::task::spawn_blocking(move || {
        eventually("status patches", || {
            let p = fake.patches();
            (p.len() >= 5).then_some(p)
        })
    })
    .await
    .unwrap();
    let by_path: HashMap<&str, &Value> = patches.iter().map(|(p, v)| (p.as_str(), v)).collect();

    let split =
        by_path["/apis/gateway.networking.k8s.io/v1/namespaces/shop/httproutes/web-split/status"];
    let parents = split["status"]["parents"].as_array().unwrap();
    assert_eq!(parents.len(), 1);
    assert_eq!(parents[0]["controllerName"], "sluice.dev/mesh-agent");
    assert_eq!(
        parents[0]["parentRef"],
        json!({"group": "", "kind": "Service", "name": "web", "port": 80})
    );
    let conds = parents[0]["conditions"].as_array().unwrap();
    assert_eq!(
        (conds[0]["type"].as_str(), conds[0]["status"].as_str()),
        (Some("Accepted"), Some("True"))
    );
    assert_eq!(
        (conds[1]["type"].as_str(), conds[1]["status"].as_str()),
        (Some("ResolvedRefs"), Some("True"))
    );
    assert_eq!(conds[1]["observedGeneration"], 2);

    let broken =
        by_path["/apis/gateway.networking.k8s.io/v1/namespaces/shop/httproutes/broken/status"];
    let parents = broken["status"]["parents"].as_array().unwrap();
    // The other mesh's entry is kept; ours says why the refs do not resolve.
    assert_eq!(parents[0]["controllerName"], "example.com/other-mesh");
    let ours = &parents[1]["conditions"][1];
    assert_eq!(ours["reason"], "BackendNotFound");
    assert!(
        ours["message"]
            .as_str()
            .unwrap()
            .contains("shop/does-not-exist")
    );

    // A cross-namespace backend outside the mesh is not permitted (the
    // proxy would reach it from the node); a rule the proxy cannot carry out
    // is in the conditions, with GAMMA's reason.
    let partial =
        by_path["/apis/gateway.networking.k8s.io/v1/namespaces/shop/httproutes/partial/status"];
    let conds = partial["status"]["parents"][0]["conditions"]
        .as_array()
        .unwrap();
    let by_type: HashMap<&str, &Value> = conds
        .iter()
        .map(|c| (c["type"].as_str().unwrap(), c))
        .collect();
    assert_eq!(by_type["Accepted"]["status"], "True");
    assert_eq!(by_type["ResolvedRefs"]["status"], "False", "{conds:?}");
    assert_eq!(by_type["ResolvedRefs"]["reason"], "RefNotPermitted");
    assert_eq!(by_type["PartiallyInvalid"]["status"], "True");
    assert_eq!(by_type["PartiallyInvalid"]["reason"], "UnsupportedValue");
    assert!(
        by_type["PartiallyInvalid"]["message"]
            .as_str()
            .unwrap()
            .starts_with("Dropped Rule 1: spec.rules[1].filters[0].type: \"CORS\""),
        "{conds:?}"
    );
    assert_eq!(by_type["PartiallyInvalid"]["observedGeneration"], 4);

    let typo = by_path["/apis/sluice.dev/v1alpha1/namespaces/shop/accesspolicies/typo/status"];
    let c = &typo["status"]["conditions"][0];
    assert_eq!(
        (c["status"].as_str(), c["reason"].as_str()),
        (Some("False"), Some("Invalid"))
    );
    assert!(
        c["message"]
            .as_str()
            .unwrap()
            .contains("spec.rules[0].from[0].identity")
    );
    assert_eq!(typo["status"]["observedGeneration"], 3);

    let good =
        by_path["/apis/sluice.dev/v1alpha1/namespaces/shop/accesspolicies/web-readers/status"];
    assert_eq!(good["status"]["conditions"][0]["status"], "True");
}

/// GEP-1294: a mesh route's backend in another namespace of the mesh needs
/// no ReferenceGrant (the agent watches none). The listed route's share to
/// default/kubernetes is not permitted while default is not in the mesh
/// (the proxy would reach it from the node, past its NetworkPolicies);
/// enrolled, it goes there; moved to a Service of default that does not
/// exist, it is BackendNotFound until the Service's watch brings one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cross_namespace_backend_resolves_without_a_reference_grant() {
    let r = start(FakeApi::with_fixtures());
    let routes = "/apis/gateway.networking.k8s.io/v1/httproutes";
    let services = "/api/v1/services";
    let partial = "/apis/gateway.networking.k8s.io/v1/namespaces/shop/httproutes/partial/status";
    let resolved_refs = |patch: &Value| {
        patch["status"]["parents"][0]["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["type"] == "ResolvedRefs")
            .cloned()
            .unwrap()
    };
    // The second backend of partial's first rule, as the proxy gets it.
    let second_backend = |r: &Running| {
        let mesh = r.rx.mesh.borrow().clone();
        let route = mesh
            .http_routes
            .iter()
            .find(|x| x.metadata.name.as_deref() == Some("partial"))
            .unwrap();
        let t = mesh_agent::proxy::routes::http_route(route, &mesh.refs);
        t.route.unwrap().rules[0].backends[1].clone()
    };
    let fake = r.fake.clone();
    let first = tokio::task::spawn_blocking(move || {
        eventually(
            "partial's status and open route and Service watches",
            || {
                let p = fake.patches().into_iter().find(|(p, _)| p == partial)?;
                (fake.watching(routes) && fake.watching(services)).then_some(p.1)
            },
        )
    })
    .await
    .unwrap();
    let cond = resolved_refs(&first);
    assert_eq!(
        (&cond["status"], &cond["reason"]),
        (&json!("False"), &json!("RefNotPermitted"))
    );
    assert!(
        cond["message"].as_str().unwrap().contains(
            "Service default/kubernetes is in namespace default, which is not in the mesh"
        ),
        "{cond:?}"
    );
    let b = second_backend(&r);
    assert!(
        b.invalid
            .as_deref()
            .is_some_and(|w| w.starts_with("RefNotPermitted")),
        "{b:?}"
    );
    r.fake.event(
        "/api/v1/namespaces",
        "MODIFIED",
        json!({
            "apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": "default", "resourceVersion": "51300",
                         "annotations": {"sluice.dev/mesh": "enabled"}}
        }),
    );
    let fake = r.fake.clone();
    let cond = tokio::task::spawn_blocking(move || {
        eventually("partial's status once default is in the mesh", || {
            let c = resolved_refs(&fake.patches().into_iter().rfind(|(p, _)| p == partial)?.1);
            (c["status"] == "True").then_some(c)
        })
    })
    .await
    .unwrap();
    assert_eq!(cond["reason"], "ResolvedRefs");
    let b = second_backend(&r);
    assert_eq!(
        (b.service, b.invalid),
        (
            l7_proxy::config::ObjectRef::new("default", "kubernetes"),
            None
        )
    );

    let mut route: Value = serde_json::from_slice::<Value>(
        &std::fs::read(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/kube/httproutes.json"
        ))
        .unwrap(),
    )
    .unwrap()["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["metadata"]["name"] == "partial")
        .unwrap()
        .clone();
    route["metadata"]["resourceVersion"] = json!("51301");
    route["metadata"]["generation"] = json!(5);
    route["spec"]["rules"][0]["backendRefs"][1] =
        json!({"name": "db", "namespace": "default", "port": 5432});
    r.fake.event(routes, "MODIFIED", route);
    let fake = r.fake.clone();
    let cond = tokio::task::spawn_blocking(move || {
        eventually("partial's status for the missing Service", || {
            let c = resolved_refs(&fake.patches().into_iter().rfind(|(p, _)| p == partial)?.1);
            (c["observedGeneration"] == 5).then_some(c)
        })
    })
    .await
    .unwrap();
    assert_eq!(
        (&cond["status"], &cond["reason"]),
        (&json!("False"), &json!("BackendNotFound"))
    );
    assert!(
        cond["message"]
            .as_str()
            .unwrap()
            .contains("spec.rules[0].backendRefs[1]: Service default/db does not exist"),
        "{cond:?}"
    );

    r.fake.event(
        services,
        "ADDED",
        json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "db", "namespace": "default", "resourceVersion": "51302"},
            "spec": {"clusterIP": "10.96.20.1", "clusterIPs": ["10.96.20.1"],
                     "ports": [{"name": "pg", "protocol": "TCP", "port": 5432}]}
        }),
    );
    let fake = r.fake.clone();
    let cond = tokio::task::spawn_blocking(move || {
        eventually("partial's status after the Service appears", || {
            let c = resolved_refs(&fake.patches().into_iter().rfind(|(p, _)| p == partial)?.1);
            (c["status"] == "True").then_some(c)
        })
    })
    .await
    .unwrap();
    assert_eq!(cond["reason"], "ResolvedRefs");
    // The proxy now sends that share to default/db.
    let b = second_backend(&r);
    assert_eq!(
        (b.service, b.invalid),
        (l7_proxy::config::ObjectRef::new("default", "db"), None)
    );
}

#[tokio::test]
#[ignore = "needs a cluster: KUBECONFIG"]
async fn lists_a_real_cluster() {
    let client = kube::Client::try_default()
        .await
        .expect("a cluster from KUBECONFIG");
    let (tx, rx) = mpsc::channel();
    let (_stop_tx, stop) = tokio::sync::watch::channel(false);
    tokio::spawn(KubeSource::new(client).run(tx, stop));
    let synced = tokio::task::spawn_blocking(move || {
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if let Ok(inputs) = rx.recv_timeout(Duration::from_secs(1)) {
                for i in inputs {
                    if let mesh_agent::reconcile::Input::Updates(u) = i
                        && u.iter()
                            .any(|u| matches!(u, mesh_agent::state::Update::Synced))
                    {
                        return true;
                    }
                }
            }
        }
        false
    })
    .await
    .unwrap();
    assert!(synced, "the source never finished its initial lists");
}

/// A first list that fails for a reason other than a missing CRD (here the
/// API server answering 503) holds the sync back until a retry succeeds: the
/// agent never takes "could not list Services" for "there are no Services"
/// and sweeps the kernel's pinned state.
/// A watch that fails and then resumes where it left off (kube-runtime
/// says nothing then) has its error cleared once no new one has come for a
/// while, instead of being shown until the kind's next change (days, for a
/// quiet kind such as MeshPolicy).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_error_is_cleared_once_the_watch_is_back() {
    let fake = FakeApi::with_fixtures();
    let policies = "/apis/sluice.dev/v1alpha1/meshpolicies";
    fake.fail_next_watches(policies, 1);
    let r = start_with(fake, Duration::from_secs(2));
    let view_rx = r.rx.view.clone();
    let failing = |v: &mesh_agent::reconcile::AgentView| {
        v.config_errors
            .iter()
            .any(|e| e.message.contains("watching MeshPolicy"))
    };
    tokio::task::spawn_blocking(move || {
        eventually("the failed watch's error", || {
            failing(&view_rx.borrow()).then_some(())
        });
        eventually("the error cleared", || {
            (!failing(&view_rx.borrow())).then_some(())
        });
    })
    .await
    .unwrap();
    assert!(r.fake.watching(policies), "the watch is open again");
}

/// A Gateway API CRD deleted while the agent's watch was away (switching
/// release channels, say): the list it makes again gets 404, and its routes
/// are no longer in force, as for a CRD never installed; the error names
/// the fix.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_of_a_crd_deleted_since_are_no_longer_in_force() {
    let routes = "/apis/gateway.networking.k8s.io/v1/httproutes";
    // Not served for longer than the source waits before taking it as gone.
    let r = start_configured(FakeApi::with_fixtures(), |s| {
        s.absent_after(Duration::from_millis(500))
    });
    let view_rx = r.rx.view.clone();
    let http_routes = |v: &mesh_agent::reconcile::AgentView| {
        v.routes.iter().filter(|r| r.kind == "HTTPRoute").count()
    };
    let v = view_rx.clone();
    tokio::task::spawn_blocking(move || {
        eventually("the routes", || {
            let v = v.borrow();
            (v.synced && http_routes(&v) > 0).then_some(())
        })
    })
    .await
    .unwrap();
    watch_open(&r.fake, routes).await;
    r.fake.remove_kind(routes);
    let v = view_rx.clone();
    let view = tokio::task::spawn_blocking(move || {
        eventually("the routes gone", || {
            let v = v.borrow().clone();
            (http_routes(&v) == 0).then_some(v)
        })
    })
    .await
    .unwrap();
    assert!(
        view.config_errors
            .iter()
            .any(|e| e.source == "kubernetes HTTPRoute" && e.message.contains("install its CRD")),
        "{:#?}",
        view.config_errors
    );
}

/// An API server that answers 404 for a kind for a moment (while it
/// starts, kubernetes#115241) takes nothing out of force: the kind read
/// last stays until the 404s have lasted `absent_after` (policies emptied
/// on such a blip would open every target they close).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kind_not_served_for_a_moment_stays_in_force() {
    let routes = "/apis/gateway.networking.k8s.io/v1/httproutes";
    let r = start(FakeApi::with_fixtures());
    let view_rx = r.rx.view.clone();
    let http_routes = |v: &mesh_agent::reconcile::AgentView| {
        v.routes.iter().filter(|r| r.kind == "HTTPRoute").count()
    };
    let v = view_rx.clone();
    let before = tokio::task::spawn_blocking(move || {
        eventually("the routes", || {
            let v = v.borrow();
            (v.synced && http_routes(&v) > 0).then(|| http_routes(&v))
        })
    })
    .await
    .unwrap();
    watch_open(&r.fake, routes).await;
    r.fake.stop_serving_kind(routes);
    // The relist's 404 is seen (and said), and the routes stay.
    let v = view_rx.clone();
    let view = tokio::task::spawn_blocking(move || {
        eventually("the 404 reported", || {
            let v = v.borrow().clone();
            v.config_errors
                .iter()
                .find(|e| {
                    e.source == "kubernetes HTTPRoute"
                        && e.message.contains("is not served")
                        && e.message.contains("initial object list")
                })
                .map(|e| (e.message.clone(), v.clone()))
        })
    })
    .await
    .unwrap();
    let (message, view) = view;
    assert_eq!(http_routes(&view), before, "{:#?}", view.routes);
    assert!(message.contains("stay in force"), "{message}");
    r.fake.serve_kind_again(routes);
    let v = view_rx.clone();
    let view = tokio::task::spawn_blocking(move || {
        eventually("the kind listed again", || {
            let v = v.borrow().clone();
            (!v.config_errors
                .iter()
                .any(|e| e.source == "kubernetes HTTPRoute"))
            .then_some(v)
        })
    })
    .await
    .unwrap();
    assert_eq!(http_routes(&view), before);
}

/// A watch that expires (410 Gone, after an API server restart) is listed
/// again quietly: no error in `sluice check`, the routes as they were.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_watch_is_listed_again_without_an_error() {
    let routes = "/apis/gateway.networking.k8s.io/v1/httproutes";
    let r = start(FakeApi::with_fixtures());
    let view_rx = r.rx.view.clone();
    let v = view_rx.clone();
    let before = tokio::task::spawn_blocking(move || {
        eventually("the routes", || {
            let v = v.borrow();
            v.synced.then(|| v.routes.clone())
        })
    })
    .await
    .unwrap();
    watch_open(&r.fake, routes).await;
    // The relist waits: meanwhile nothing says the watch failed.
    r.fake.hold_lists(routes);
    r.fake.expire_watches(routes);
    let fake = r.fake.clone();
    tokio::task::spawn_blocking(move || {
        eventually("the relist", || {
            (fake.lists_waiting(routes) > 0).then_some(())
        })
    })
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let route_errors = |v: &mesh_agent::reconcile::AgentView| {
        v.config_errors
            .iter()
            .filter(|e| e.source == "kubernetes HTTPRoute")
            .cloned()
            .collect::<Vec<_>>()
    };
    let view = view_rx.borrow().clone();
    assert_eq!(route_errors(&view), vec![]);
    let lists = r.fake.lists_served(routes);
    r.fake.release_lists(routes);
    let fake = r.fake.clone();
    tokio::task::spawn_blocking(move || {
        eventually("listed and watching again", || {
            (fake.lists_served(routes) > lists && fake.watching(routes)).then_some(())
        })
    })
    .await
    .unwrap();
    let view = view_rx.borrow().clone();
    assert_eq!(route_errors(&view), vec![]);
    assert_eq!(view.routes, before);
}

/// A list that keeps failing is no watch resumed: its error stays however
/// quiet it gets between retries (only a failed watch's error is cleared
/// by quiet).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_list_that_keeps_failing_keeps_its_error() {
    let fake = FakeApi::with_fixtures();
    fake.fail_next_lists("/apis/sluice.dev/v1alpha1/meshpolicies", 1_000);
    let r = start_with(fake, Duration::from_millis(500));
    let view_rx = r.rx.view.clone();
    let failing = move || {
        view_rx
            .borrow()
            .config_errors
            .iter()
            .any(|e| e.message.contains("watching MeshPolicy"))
    };
    let f = failing.clone();
    tokio::task::spawn_blocking(move || eventually("the list's error", || f().then_some(())))
        .await
        .unwrap();
    // Several times the quiet that clears a failed watch's error, and a
    // retried list or two (backoff from 0.8 s).
    for _ in 0..30 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(failing(), "the failing list's error was cleared");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_first_list_of_a_core_kind_holds_the_sync_until_it_succeeds() {
    let fake = FakeApi::with_fixtures();
    fake.fail_next_lists("/api/v1/services", 2);
    let r = start(fake);
    let web = Frontend::tcp(addr("10.96.14.20:80"));
    let (view_rx, dp) = (r.rx.view.clone(), r.dp.clone());
    let programmed_at_sync = tokio::task::spawn_blocking(move || {
        eventually("the initial sync", || {
            view_rx.borrow().synced.then(|| dp.spec(&web).is_some())
        })
    })
    .await
    .unwrap();
    assert!(
        programmed_at_sync,
        "the sync came before the Services were listed"
    );
}

/// An HTTPRoute this agent's types cannot decode (a filter type from a
/// later Gateway API release) is reported by name and left out: the list of
/// the other routes, and the whole sync, go ahead. A later unreadable
/// version of a route keeps the version read before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_route_is_reported_by_name_and_does_not_hold_the_others() {
    let routes = "/apis/gateway.networking.k8s.io/v1/httproutes";
    let fixture: Value = serde_json::from_slice(
        &std::fs::read(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/kube/httproutes.json"
        ))
        .unwrap(),
    )
    .unwrap();
    let mut future = fixture["items"][0].clone();
    future["metadata"]["name"] = json!("future");
    future["metadata"]["uid"] = json!("0f0f0f0f-0000-4000-8000-000000000001");
    future["spec"]["rules"][0]["filters"] = json!([{"type": "FutureFilter"}]);
    let fake = FakeApi::with_fixtures();
    fake.add_list_item(routes, future);
    let r = start(fake);
    let (view_rx, fake) = (r.rx.view.clone(), r.fake.clone());
    let view = tokio::task::spawn_blocking(move || {
        eventually("the initial sync and an open route watch", || {
            let v = view_rx.borrow().clone();
            (v.synced && fake.watching(routes)).then_some(v)
        })
    })
    .await
    .unwrap();
    assert!(r.dp.spec(&Frontend::tcp(addr("10.96.14.20:80"))).is_some());
    let e = view
        .config_errors
        .iter()
        .find(|e| e.object.as_deref() == Some("HTTPRoute shop/future"))
        .unwrap_or_else(|| panic!("{:#?}", view.config_errors));
    assert_eq!(e.field.as_deref(), Some("spec.rules[0].filters[0].type"));
    assert!(e.message.starts_with("this agent cannot read it"), "{e:?}");
    let names = |r: &Running| -> Vec<String> {
        r.rx.mesh
            .borrow()
            .http_routes
            .iter()
            .filter_map(|r| r.metadata.name.clone())
            .collect()
    };
    assert!(
        names(&r).contains(&"web-split".to_string()),
        "{:?}",
        names(&r)
    );
    assert!(!names(&r).contains(&"future".to_string()));

    // web-split turns unreadable: reported, and its last version stays.
    let mut split = fixture["items"][0].clone();
    split["metadata"]["resourceVersion"] = json!("51500");
    split["spec"]["rules"][0]["filters"] = json!([{"type": "FutureFilter"}]);
    r.fake.event(routes, "MODIFIED", split);
    let view_rx = r.rx.view.clone();
    tokio::task::spawn_blocking(move || {
        eventually("web-split reported", || {
            view_rx
                .borrow()
                .config_errors
                .iter()
                .any(|e| e.object.as_deref() == Some("HTTPRoute shop/web-split"))
                .then_some(())
        })
    })
    .await
    .unwrap();
    assert!(
        names(&r).contains(&"web-split".to_string()),
        "{:?}",
        names(&r)
    );
}

/// Told to stop, the source ends its watchers: every sender of the
/// reconciler's inputs goes, so the reconciler (and the agent) can stop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_the_source_closes_the_reconcilers_inputs() {
    let fake = FakeApi::with_fixtures();
    let (tx, inputs) = mpsc::channel();
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let source = tokio::spawn(KubeSource::new(fake.client()).run(tx, stop));
    // The first lists arrive.
    let inputs = tokio::task::spawn_blocking(move || {
        inputs
            .recv_timeout(Duration::from_secs(10))
            .expect("the source delivers");
        inputs
    })
    .await
    .unwrap();
    let _ = stop_tx.send(true);
    tokio::time::timeout(Duration::from_secs(10), source)
        .await
        .expect("the source returns when told to stop")
        .unwrap();
    // Within 10 s every sender is gone (a watcher left running would keep
    // sending, or keep the channel open).
    let closed = tokio::task::spawn_blocking(move || {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match inputs.recv_timeout(left) {
                Ok(_) if !left.is_zero() => continue,
                Ok(_) => return mpsc::RecvTimeoutError::Timeout,
                Err(e) => return e,
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(
        closed,
        mpsc::RecvTimeoutError::Disconnected,
        "a watcher still holds the reconciler's inputs"
    );
}
