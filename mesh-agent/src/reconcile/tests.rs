//! The reconciler against the in-memory dataplane: what reaches the kernel,
//! in which batches.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::Arc,
};

use ebpf_lb::{Backend, Change, Frontend, ProxyTarget, ServiceSpec};

use super::{dataplane::MemoryDataplane, *};
use crate::{
    cgroups::PodCgroups,
    config,
    state::{Kind, Object, Update},
    testing::*,
};

struct Fixture {
    r: Reconciler,
    dp: Arc<MemoryDataplane>,
    rx: OutputReceivers,
    cg: tempfile::TempDir,
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn fixture() -> Fixture {
    fixture_on(Arc::new(MemoryDataplane::new()))
}

/// A reconciler on `dp`, which may hold what an earlier one left.
fn fixture_on(dp: Arc<MemoryDataplane>) -> Fixture {
    let cg = tempfile::tempdir().unwrap();
    let (out, rx) = Outputs::channels();
    let settings = Settings {
        node: "n1".into(),
        node_addresses: vec!["192.0.2.1".parse().unwrap()],
        trust_domain: "cluster.local".into(),
        default_mode: MtlsMode::Permissive,
        proxy: Some(ProxyTarget {
            v4: Some("192.0.2.1".parse().unwrap()),
            v6: None,
            port: config::PROXY_CAPTURE_PORT,
            mark: config::PROXY_MARK,
        }),
        kernel_strict: true,
    };
    let resolver = PodCgroups {
        root: cg.path().into(),
        base: cg.path().into(),
    };
    let r = Reconciler::new(dp.clone(), Box::new(resolver), settings, out);
    Fixture { r, dp, rx, cg }
}

impl Fixture {
    fn upsert(&mut self, objs: Vec<Object>) {
        self.r.step(vec![Input::Updates(
            objs.into_iter().map(Update::Upsert).collect(),
        )]);
    }

    fn sync(&mut self) {
        self.r.step(vec![Input::Updates(vec![Update::Synced])]);
    }

    /// A fake cgroup directory (with `cgroup.procs`) relative to the base.
    fn cgroup(&self, rel: &str) -> PathBuf {
        let p = self.cg.path().join(rel);
        std::fs::create_dir_all(&p).unwrap();
        std::fs::write(p.join("cgroup.procs"), "").unwrap();
        p
    }
}

fn shop() -> Vec<Object> {
    vec![
        Object::Namespace(namespace("shop", true)),
        Object::Service(service("shop", "a", "127.96.0.1", &[80])),
        Object::Service(service("shop", "b", "127.96.0.2", &[80])),
        Object::EndpointSlice(slice("shop", "a-1", "a", &[8080], &[ep_ready("10.0.0.1")])),
        Object::EndpointSlice(slice("shop", "b-1", "b", &[8080], &[ep_ready("10.0.0.2")])),
    ]
}

#[test]
fn nothing_reaches_the_kernel_before_the_source_is_synced() {
    let mut f = fixture();
    f.dp.preload(ServiceSpec::new(Frontend::tcp(addr("127.96.9.9:80")), []));
    f.upsert(shop());
    assert!(f.dp.batches().is_empty());
    assert!(!f.rx.view.borrow().synced);
    f.sync();
    let a =
        f.dp.spec(&Frontend::tcp(addr("127.96.0.1:80")))
            .expect("a programmed");
    assert_eq!(a.backends, vec![Backend::ready(addr("10.0.0.1:8080"))]);
    assert!(a.meshed);
    // What an earlier run left and nobody wants any more is gone.
    assert_eq!(f.dp.spec(&Frontend::tcp(addr("127.96.9.9:80"))), None);
    assert_eq!(f.dp.proxy().unwrap().port, config::PROXY_CAPTURE_PORT);
    assert!(f.rx.view.borrow().synced);
}

#[test]
fn an_endpointslice_change_applies_only_its_service() {
    let mut f = fixture();
    f.upsert(shop());
    f.sync();
    f.dp.clear_batches();
    f.upsert(vec![Object::EndpointSlice(slice(
        "shop",
        "b-1",
        "b",
        &[8080],
        &[ep_ready("10.0.0.2"), ep_ready("10.0.0.3")],
    ))]);
    let batches = f.dp.batches();
    assert_eq!(batches.len(), 1, "{batches:?}");
    assert_eq!(batches[0].len(), 1);
    let Change::Upsert(spec) = &batches[0][0] else {
        panic!("{batches:?}")
    };
    assert_eq!(spec.frontend, Frontend::tcp(addr("127.96.0.2:80")));
    assert_eq!(spec.backends.len(), 2);
    // An update that changes nothing applies nothing.
    f.dp.clear_batches();
    f.upsert(vec![Object::EndpointSlice(slice(
        "shop",
        "b-1",
        "b",
        &[8080],
        &[ep_ready("10.0.0.2"), ep_ready("10.0.0.3")],
    ))]);
    assert!(f.dp.batches().is_empty());
    assert_eq!(f.r.stats.removed_backends, 0);
}

#[test]
fn unenrolling_a_namespace_clears_the_meshed_flag_of_its_services() {
    let mut f = fixture();
    f.upsert(shop());
    f.sync();
    f.dp.clear_batches();
    f.upsert(vec![Object::Namespace(namespace("shop", false))]);
    let batches = f.dp.batches();
    assert_eq!(batches.len(), 1);
    assert_eq!(batches[0].len(), 2);
    assert!(f.dp.services().iter().all(|s| !s.meshed));
}

#[test]
fn a_failing_service_does_not_hold_back_the_others_and_is_retried() {
    let mut f = fixture();
    f.upsert(shop());
    f.sync();
    let fa = Frontend::tcp(addr("127.96.0.1:80"));
    f.dp.fail_changes_of(fa);
    f.upsert(vec![
        Object::EndpointSlice(slice("shop", "a-1", "a", &[8080], &[ep_ready("10.0.0.5")])),
        Object::EndpointSlice(slice("shop", "b-1", "b", &[8080], &[ep_ready("10.0.0.6")])),
    ]);
    // b went through on its own; a kept its old backends.
    let b = f.dp.spec(&Frontend::tcp(addr("127.96.0.2:80"))).unwrap();
    assert_eq!(b.backends, vec![Backend::ready(addr("10.0.0.6:8080"))]);
    let a = f.dp.spec(&fa).unwrap();
    assert_eq!(a.backends, vec![Backend::ready(addr("10.0.0.1:8080"))]);
    let view = f.rx.view.borrow().clone();
    assert_eq!(view.dataplane_errors.len(), 1);
    assert!(
        view.dataplane_errors[0].contains("shop/a"),
        "{:?}",
        view.dataplane_errors
    );
    // A tick retries a, and only a.
    f.dp.clear_batches();
    f.dp.clear_failures();
    f.r.step(vec![Input::Tick]);
    let batches = f.dp.batches();
    assert_eq!(batches.len(), 1);
    assert!(matches!(&batches[0][..], [Change::Upsert(s)] if s.frontend == fa));
    let a = f.dp.spec(&fa).unwrap();
    assert_eq!(a.backends, vec![Backend::ready(addr("10.0.0.5:8080"))]);
    assert!(f.rx.view.borrow().dataplane_errors.is_empty());
}

/// A Service the kernel did not take (a full map, say) keeps its old
/// version in the proxy too: the kernel still sends enrolled callers of the
/// old ClusterIP to the proxy, which took them for external destinations
/// once it had the new one. Taken on a retry, both have the new one.
#[test]
fn a_service_the_kernel_did_not_take_is_shown_to_the_proxy_as_the_kernel_has_it() {
    let mut f = fixture();
    f.upsert(shop());
    f.sync();
    let vips = |f: &Fixture| {
        let mesh = f.rx.mesh.borrow().clone();
        mesh.services
            .iter()
            .find(|s| s.key.name == "a")
            .map(|s| s.vips.clone())
    };
    let ip = |s: &str| s.parse::<std::net::IpAddr>().unwrap();
    assert_eq!(vips(&f), Some(vec![ip("127.96.0.1")]));
    let moved = Frontend::tcp(addr("127.96.0.31:80"));
    f.dp.fail_changes_of(moved);
    f.upsert(vec![Object::Service(service(
        "shop",
        "a",
        "127.96.0.31",
        &[80],
    ))]);
    assert!(f.dp.spec(&Frontend::tcp(addr("127.96.0.1:80"))).is_some());
    assert!(f.dp.spec(&moved).is_none());
    assert_eq!(
        vips(&f),
        Some(vec![ip("127.96.0.1")]),
        "as the kernel has it"
    );
    f.dp.clear_failures();
    f.r.step(vec![Input::Tick]);
    assert!(f.dp.spec(&moved).is_some());
    assert_eq!(vips(&f), Some(vec![ip("127.96.0.31")]));
    // A new Service the kernel does not take: no ClusterIP for the proxy
    // either, but the Service stays in its view, so that a policy naming
    // it still governs its pods.
    let new = Frontend::tcp(addr("127.96.0.40:80"));
    f.dp.fail_changes_of(new);
    f.upsert(vec![Object::Service(service(
        "shop",
        "c",
        "127.96.0.40",
        &[80],
    ))]);
    assert!(f.dp.spec(&new).is_none());
    let mesh = f.rx.mesh.borrow().clone();
    let c = mesh.services.iter().find(|s| s.key.name == "c");
    assert_eq!(c.map(|c| c.vips.clone()), Some(vec![]), "{c:?}");
}

#[test]
fn an_invalid_service_keeps_its_last_good_entry_and_is_reported() {
    let mut f = fixture();
    f.upsert(shop());
    f.sync();
    let mut bad = service("shop", "a", "127.96.0.1", &[80]);
    bad.spec.as_mut().unwrap().session_affinity = Some("Sticky".into());
    f.upsert(vec![Object::Service(bad)]);
    assert!(f.dp.spec(&Frontend::tcp(addr("127.96.0.1:80"))).is_some());
    let errors = f.rx.view.borrow().config_errors.clone();
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!(errors[0].object.as_deref(), Some("Service shop/a"));
    assert_eq!(errors[0].field.as_deref(), Some("spec.sessionAffinity"));
    // Fixed: the error goes.
    f.upsert(vec![Object::Service(service(
        "shop",
        "a",
        "127.96.0.1",
        &[80],
    ))]);
    assert!(f.rx.view.borrow().config_errors.is_empty());
}

#[test]
fn local_enrolled_pods_get_their_cgroup_enrolled_and_identity_published() {
    let mut f = fixture();
    let web_cg = f.cgroup("pods/web");
    let mut web = workload("shop", "web", "web-sa", "10.0.0.1", "n1");
    web.cgroup = Some("pods/web".into());
    let mut opted_out = workload("shop", "batch", "batch", "10.0.0.4", "n1");
    opted_out.cgroup = Some(f.cgroup("pods/batch"));
    opted_out
        .annotations
        .insert(config::MESH_ANNOTATION.into(), config::MESH_DISABLED.into());
    let mut remote = workload("shop", "far", "far", "10.0.9.1", "n2");
    remote.cgroup = Some(f.cgroup("pods/far"));
    let mut objs = shop();
    objs.extend([
        Object::Pod(web),
        Object::Pod(opted_out),
        Object::Pod(remote),
    ]);
    f.upsert(objs);
    f.sync();
    assert_eq!(f.dp.enrolled_paths(), vec![web_cg.clone()]);
    assert_eq!(
        *f.rx.identities.borrow(),
        BTreeSet::from(["spiffe://cluster.local/ns/shop/sa/web-sa".to_string()])
    );
    let view = f.rx.view.borrow().clone();
    let w = view.workloads.iter().find(|w| w.name == "web").unwrap();
    assert!(w.enrolled);
    assert_eq!(w.cgroup.as_deref(), Some(web_cg.to_str().unwrap()));
    assert!(w.captured(), "{w:?}");
    // A mesh pod whose cgroup is not there is in the mesh, but its
    // connections are not captured: not counted as enrolled in status.
    let mut lost = workload("shop", "lost", "lost", "10.0.0.7", "n1");
    lost.cgroup = Some("pods/not-there".into());
    f.upsert(vec![Object::Pod(lost)]);
    let view = f.rx.view.borrow().clone();
    let w = view.workloads.iter().find(|w| w.name == "lost").unwrap();
    assert!(w.local && w.enrolled && !w.captured(), "{w:?}");
    f.r.step(vec![Input::Updates(vec![Update::Delete(
        crate::state::Kind::Pod,
        Key::new("shop", "lost"),
    )])]);

    // Leaving the mesh: the namespace annotation goes, the cgroup is unenrolled.
    f.upsert(vec![Object::Namespace(namespace("shop", false))]);
    assert!(f.dp.enrolled_paths().is_empty());
    assert!(f.rx.identities.borrow().is_empty());
}

#[test]
fn a_pod_whose_cgroup_appears_later_is_enrolled_on_a_tick() {
    let mut f = fixture();
    let mut web = workload("shop", "web", "web", "10.0.0.1", "n1");
    web.cgroup = Some("pods/late".into());
    let mut objs = shop();
    objs.push(Object::Pod(web));
    f.upsert(objs);
    f.sync();
    assert!(f.dp.enrolled_paths().is_empty());
    // Only its outbound side waits for the cgroup: its identity, its mode
    // and the proxy's inbound side do not (peers' agents count it meshed).
    let view = f.rx.view.borrow().clone();
    let w = &view.workloads[0];
    assert!(w.enrolled && w.cgroup_id.is_none(), "{w:?}");
    let reason = w.reason.as_deref().unwrap();
    assert!(
        reason.starts_with("outbound not captured: ") && reason.contains("pods/late"),
        "{w:?}"
    );
    assert_eq!(
        *f.rx.identities.borrow(),
        BTreeSet::from(["spiffe://cluster.local/ns/shop/sa/web".to_string()])
    );
    assert!(f.dp.modes().contains_key(&"10.0.0.1".parse().unwrap()));
    assert!(
        f.rx.view.borrow().dataplane_errors.is_empty(),
        "a pod starting is no kernel-update problem yet"
    );
    let p = f.cgroup("pods/late");
    f.r.step(vec![Input::Tick]);
    assert_eq!(f.dp.enrolled_paths(), vec![p]);
    let w = f.rx.view.borrow().workloads[0].clone();
    assert!(
        w.enrolled && w.cgroup_id.is_some() && w.reason.is_none(),
        "{w:?}"
    );
}

#[test]
fn the_mesh_view_is_published_with_a_new_generation_on_route_changes() {
    let mut f = fixture();
    f.upsert(shop());
    f.sync();
    let g0 = f.rx.mesh.borrow().generation;
    assert_eq!(f.rx.mesh.borrow().services.len(), 2);
    let route: crate::gateway::HttpRoute = serde_json::from_value(serde_json::json!({
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "HTTPRoute",
        "metadata": {"name": "a", "namespace": "shop"},
        "spec": {
            "parentRefs": [{"group": "", "kind": "Service", "name": "a"}],
            "rules": [{"backendRefs": [{"name": "b", "port": 80}]}]
        }
    }))
    .unwrap();
    f.upsert(vec![Object::HTTPRoute(route)]);
    let mesh = f.rx.mesh.borrow().clone();
    assert!(mesh.generation > g0);
    assert_eq!(mesh.http_routes.len(), 1);
    let routes = f.rx.view.borrow().routes.clone();
    let a = routes.iter().find(|r| r.service == "shop/a").unwrap();
    assert_eq!(a.kind, "HTTPRoute");
    assert!(a.accepted && a.resolved_refs);
    assert_eq!(a.backends, ["b:80"]);

    // A route naming the Service twice (two ports, one it does not have):
    // one row, in force as far as both parents say.
    let twice: crate::gateway::HttpRoute = serde_json::from_value(serde_json::json!({
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "HTTPRoute",
        "metadata": {"name": "twice", "namespace": "shop"},
        "spec": {
            "parentRefs": [
                {"group": "", "kind": "Service", "name": "b", "port": 80},
                {"group": "", "kind": "Service", "name": "b", "port": 9999}
            ],
            "rules": [{"backendRefs": [{"name": "a", "port": 80}]}]
        }
    }))
    .unwrap();
    f.upsert(vec![Object::HTTPRoute(twice)]);
    let routes = f.rx.view.borrow().routes.clone();
    let rows: Vec<_> = routes
        .iter()
        .filter(|r| r.route.as_deref() == Some("shop/twice"))
        .collect();
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert!(!rows[0].accepted, "{rows:?}");
    assert!(
        rows[0].reason.as_deref().unwrap().contains("9999"),
        "{rows:?}"
    );
}

#[test]
fn status_writes_go_to_the_status_channel() {
    let mut f = fixture();
    let (tx, mut rx) = policies::status_queue();
    f.r.out.status = Some(tx);
    let bad: crate::crds::MeshPolicySpec = serde_json::from_value(serde_json::json!({
        "mode": "STRICT",
        "selector": {"matchExpressions": [{"key": "app", "operator": "Near"}]}
    }))
    .unwrap();
    let mut p = crate::crds::MeshPolicy::new("strict", bad);
    p.metadata.namespace = Some("shop".into());
    let mut objs = shop();
    objs.push(Object::MeshPolicy(p));
    f.upsert(objs);
    f.sync();
    let w = rx.try_recv().expect("a status write");
    assert_eq!(w.kind, Kind::MeshPolicy);
    assert_eq!(w.status["conditions"][0]["reason"], "Invalid");
    assert!(
        w.status["conditions"][0]["message"]
            .as_str()
            .unwrap()
            .contains("spec.selector.matchExpressions[0].operator")
    );
    // Nothing changed: nothing more is sent...
    f.r.step(vec![Input::Tick]);
    assert!(rx.try_recv().is_err());
    // ...until this agent becomes the status writer: the status nobody
    // wrote meanwhile is sent again.
    f.r.step(vec![Input::ResendStatus]);
    let again = rx.try_recv().expect("the status write, again");
    assert_eq!(again, w);
    assert!(rx.try_recv().is_err());
}

/// MeshPolicy shop/web-strict: STRICT for the pods labelled app=web.
fn web_strict() -> crate::crds::MeshPolicy {
    let strict: crate::crds::MeshPolicySpec = serde_json::from_value(
        serde_json::json!({"mode": "STRICT", "selector": {"matchLabels": {"app": "web"}}}),
    )
    .unwrap();
    let mut p = crate::crds::MeshPolicy::new("web-strict", strict);
    p.metadata.namespace = Some("shop".into());
    p
}

/// The modes and guards are pinned, so they outlive the agent: a pod that
/// left the mesh while no agent ran must not stay STRICT.
#[test]
fn a_new_agent_clears_strict_state_an_earlier_one_left_for_pods_that_left_the_mesh() {
    let mut f = fixture();
    let mut web = workload("shop", "web", "web", "10.0.0.1", "n1");
    web.cgroup = Some(f.cgroup("pods/web"));
    web.interface = Some("veth-web".into());
    let mut objs = shop();
    objs.extend([Object::Pod(web.clone()), Object::MeshPolicy(web_strict())]);
    f.upsert(objs.clone());
    f.sync();
    assert_eq!(f.dp.guarded(), BTreeSet::from(["veth-web".to_string()]));
    assert_eq!(f.dp.modes().len(), 1);

    // The agent stops; meanwhile the namespace leaves the mesh.
    let dp = f.dp.clone();
    drop(f);
    let mut f = fixture_on(dp);
    web.cgroup = Some(f.cgroup("pods/web"));
    let mut objs = shop();
    objs[0] = Object::Namespace(namespace("shop", false));
    objs.extend([Object::Pod(web), Object::MeshPolicy(web_strict())]);
    f.upsert(objs);
    f.sync();
    assert!(f.dp.modes().is_empty(), "{:?}", f.dp.modes());
    assert!(f.dp.guarded().is_empty(), "{:?}", f.dp.guarded());
}

/// A STRICT pod recreated with the same veth name (a StatefulSet pod, say)
/// has a new interface, which the guard on the old one did not cover.
#[test]
fn a_strict_pod_whose_veth_was_recreated_under_its_name_is_guarded_again() {
    let mut f = fixture();
    let mut web = workload("shop", "web", "web", "10.0.0.1", "n1");
    web.cgroup = Some(f.cgroup("pods/web"));
    web.interface = Some("veth-web".into());
    let mut objs = shop();
    objs.extend([Object::Pod(web.clone()), Object::MeshPolicy(web_strict())]);
    f.upsert(objs);
    f.sync();
    assert_eq!(f.dp.guarded(), BTreeSet::from(["veth-web".to_string()]));
    // The pod is recreated (a new UID) with a veth of the same name.
    f.dp.recreate_interface("veth-web", 7);
    web.uid = "uid-shop-web-2".into();
    f.upsert(vec![Object::Pod(web)]);
    assert_eq!(f.dp.guarded(), BTreeSet::from(["veth-web".to_string()]));
}

/// Routes that give a pod no interface of its own (a prefix route, as
/// Cilium's cilium_host without endpoint routes, or a bridge).
struct Routes(BTreeMap<IpAddr, crate::netdev::NoInterface>);

impl crate::netdev::InterfaceResolver for Routes {
    fn interface(&self, ip: IpAddr) -> Result<String, crate::netdev::NoInterface> {
        Err(self.0.get(&ip).cloned().unwrap_or_else(|| {
            crate::netdev::NoInterface::NoRoute(format!("no route to pod IP {ip}"))
        }))
    }
}

/// A STRICT pod whose route is not its own (found from the node's routes,
/// as in a cluster) is a limit of the network: `sluice check` warns, it does
/// not fail; one with no route yet is a kernel problem until it has one.
#[test]
fn a_strict_pod_behind_a_prefix_route_is_a_limit_not_a_failure() {
    use crate::netdev::NoInterface;
    let routes = Routes(BTreeMap::from([(
        "10.0.0.1".parse().unwrap(),
        NoInterface::NotItsOwn("pod IP 10.0.0.1 is reached through cilium_host".into()),
    )]));
    let Fixture { r, dp, rx, cg } = fixture();
    let mut f = Fixture {
        r: r.with_interfaces(Box::new(routes)),
        dp,
        rx,
        cg,
    };
    let pod = |name: &str, ip: &str, f: &Fixture| {
        let mut w = workload("shop", name, "web", ip, "n1");
        w.cgroup = Some(f.cgroup(&format!("pods/{name}")));
        w.labels.insert("app".into(), "web".into());
        w
    };
    let mut objs = shop();
    objs.extend([
        Object::Pod(pod("web-a", "10.0.0.1", &f)),
        Object::MeshPolicy(web_strict()),
    ]);
    f.upsert(objs);
    f.sync();
    let view = f.rx.view.borrow().clone();
    assert!(
        view.dataplane_errors.is_empty(),
        "{:?}",
        view.dataplane_errors
    );
    assert!(
        view.dataplane_limits.len() == 1 && view.dataplane_limits[0].contains("cilium_host"),
        "{:?}",
        view.dataplane_limits
    );
    // A pod with no route at all: a problem, not a limit.
    f.upsert(vec![Object::Pod(pod("web-b", "10.0.0.2", &f))]);
    let view = f.rx.view.borrow().clone();
    assert!(
        view.dataplane_errors.len() == 1 && view.dataplane_errors[0].contains("shop/web-b"),
        "{:?}",
        view.dataplane_errors
    );
    assert_eq!(
        view.dataplane_limits.len(),
        1,
        "{:?}",
        view.dataplane_limits
    );
}

/// Two STRICT pods reached through one interface (a route for a whole
/// prefix, as Cilium's cilium_host): it is no pod's own, so it is not
/// guarded and both say so; each with a veth of its own again is guarded.
#[test]
fn strict_pods_sharing_an_interface_are_not_reported_guarded() {
    let mut f = fixture();
    let pod = |name: &str, ip: &str, f: &Fixture| {
        let mut w = workload("shop", name, "web", ip, "n1");
        w.cgroup = Some(f.cgroup(&format!("pods/{name}")));
        w.labels.insert("app".into(), "web".into());
        w.interface = Some("cilium_host".into());
        w
    };
    let (mut a, mut b) = (pod("web-a", "10.0.0.1", &f), pod("web-b", "10.0.0.2", &f));
    let mut objs = shop();
    objs.extend([
        Object::Pod(a.clone()),
        Object::Pod(b.clone()),
        Object::MeshPolicy(web_strict()),
    ]);
    f.upsert(objs);
    f.sync();
    assert!(f.dp.guarded().is_empty(), "{:?}", f.dp.guarded());
    assert_eq!(f.dp.modes().len(), 2, "the modes are set all the same");
    let view = f.rx.view.borrow().clone();
    for name in ["web-a", "web-b"] {
        let w = view.workloads.iter().find(|w| w.name == name).unwrap();
        let g = w.strict_guard.as_deref().unwrap();
        assert!(
            g.starts_with("not enforced in the kernel") && g.contains("cilium_host is shared"),
            "{g}"
        );
    }
    // A limit of the network, not a failure (`sluice check` warns).
    assert!(
        view.dataplane_limits
            .iter()
            .any(|e| e.contains("cilium_host is shared")),
        "{:?}",
        view.dataplane_limits
    );
    assert!(
        view.dataplane_errors.is_empty(),
        "{:?}",
        view.dataplane_errors
    );
    a.interface = Some("veth-a".into());
    b.interface = Some("veth-b".into());
    f.upsert(vec![Object::Pod(a), Object::Pod(b)]);
    assert_eq!(
        f.dp.guarded(),
        BTreeSet::from(["veth-a".to_string(), "veth-b".to_string()])
    );
    assert!(f.rx.view.borrow().dataplane_errors.is_empty());
    assert!(f.rx.view.borrow().dataplane_limits.is_empty());
}

#[test]
fn strict_workloads_get_their_mode_and_interface_guard_in_the_kernel() {
    let mut f = fixture();
    let mut web = workload("shop", "web", "web", "10.0.0.1", "n1");
    web.cgroup = Some(f.cgroup("pods/web"));
    web.interface = Some("veth-web".into());
    let mut db = workload("shop", "db", "db", "10.0.0.2", "n1");
    db.cgroup = Some(f.cgroup("pods/db"));
    let p = web_strict();
    let mut objs = shop();
    objs.extend([Object::Pod(web), Object::Pod(db), Object::MeshPolicy(p)]);
    f.upsert(objs);
    f.sync();
    let ip = |s: &str| s.parse::<std::net::IpAddr>().unwrap();
    assert_eq!(
        f.dp.modes(),
        BTreeMap::from([
            (ip("10.0.0.1"), ebpf_lb::MtlsMode::Strict),
            (ip("10.0.0.2"), ebpf_lb::MtlsMode::Permissive)
        ])
    );
    assert_eq!(f.dp.guarded(), BTreeSet::from(["veth-web".to_string()]));
    let view = f.rx.view.borrow().clone();
    let w = view.workloads.iter().find(|w| w.name == "web").unwrap();
    assert_eq!(w.strict_guard.as_deref(), Some("guarded on veth-web"));

    // The policy goes: PERMISSIVE, and the guard comes off.
    f.r.step(vec![Input::Updates(vec![Update::Delete(
        Kind::MeshPolicy,
        Key::new("shop", "web-strict"),
    )])]);
    assert_eq!(f.dp.modes()[&ip("10.0.0.1")], ebpf_lb::MtlsMode::Permissive);
    assert!(f.dp.guarded().is_empty());
    // The namespace leaves the mesh: no modes at all.
    f.upsert(vec![Object::Namespace(namespace("shop", false))]);
    assert!(f.dp.modes().is_empty());
}

/// The kernel learns which pod addresses enrolled workloads' connections
/// go to the proxy for: meshed pods, not DISABLED, on a node of known
/// address (the proxy tunnels to those), here or on another node.
#[test]
fn meshed_pods_addresses_reach_the_kernel() {
    let mut f = fixture();
    let node = |name: &str, addr: Option<&str>| {
        Object::Node(crate::state::NodeInfo {
            name: name.into(),
            addresses: addr.into_iter().map(|a| a.parse().unwrap()).collect(),
        })
    };
    let mut opted_out = workload("shop", "batch", "batch", "10.0.0.5", "n2");
    opted_out
        .annotations
        .insert(config::MESH_ANNOTATION.into(), config::MESH_DISABLED.into());
    let disabled: crate::crds::MeshPolicySpec = serde_json::from_value(serde_json::json!({
        "mode": "DISABLED", "selector": {"matchLabels": {"app": "legacy"}}
    }))
    .unwrap();
    let mut disabled = crate::crds::MeshPolicy::new("legacy", disabled);
    disabled.metadata.namespace = Some("shop".into());
    let mut objs = shop();
    objs.extend([
        node("n1", Some("192.0.2.1")),
        node("n2", Some("192.0.2.2")),
        node("n3", None),
        Object::Pod(workload("shop", "web", "web", "10.0.0.1", "n1")),
        Object::Pod(workload("shop", "db", "db", "10.0.0.2", "n2")),
        Object::Pod(workload("shop", "far", "far", "10.0.0.3", "n3")),
        Object::Pod(workload("shop", "legacy", "legacy", "10.0.0.4", "n2")),
        Object::Pod(opted_out),
        Object::Namespace(namespace("other", false)),
        Object::Pod(workload("other", "x", "x", "10.0.1.1", "n2")),
        Object::MeshPolicy(disabled),
    ]);
    f.upsert(objs);
    f.sync();
    let ip = |s: &str| s.parse::<std::net::IpAddr>().unwrap();
    assert_eq!(
        f.dp.meshed_pods(),
        BTreeSet::from([ip("10.0.0.1"), ip("10.0.0.2")])
    );
    // The namespace leaves the mesh: none.
    f.upsert(vec![Object::Namespace(namespace("shop", false))]);
    assert!(f.dp.meshed_pods().is_empty());
}

#[test]
fn without_a_proxy_no_mode_is_pushed() {
    let mut f = fixture();
    f.r.settings.proxy = None;
    let mut web = workload("shop", "web", "web", "10.0.0.1", "n1");
    web.cgroup = Some(f.cgroup("pods/web"));
    let mut objs = shop();
    objs.extend([Object::Pod(web), Object::MeshPolicy(web_strict())]);
    f.upsert(objs);
    f.sync();
    assert!(
        f.dp.modes().is_empty(),
        "STRICT without a proxy would refuse every connection"
    );
    // Asked for all the same: shown as not enforced.
    let view = f.rx.view.borrow().clone();
    let w = view.workloads.iter().find(|w| w.name == "web").unwrap();
    assert_eq!(w.mtls_mode, MtlsMode::Strict);
    assert_eq!(w.strict_guard.as_deref(), Some(super::STRICT_WITHOUT_PROXY));
}

#[test]
fn route_problems_are_config_errors_and_route_infos_without_a_status_writer() {
    let mut f = fixture();
    let route: crate::gateway::HttpRoute = serde_json::from_value(serde_json::json!({
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "HTTPRoute",
        "metadata": {"name": "a", "namespace": "shop"},
        "spec": {
            "parentRefs": [{"kind": "Service", "name": "a", "port": 80}],
            "rules": [
                {"backendRefs": [{"name": "b", "port": 80}, {"name": "b", "port": 81}]},
                {"filters": [{"type": "ExternalAuth", "externalAuth": {"protocol": "HTTP",
                    "backendRef": {"name": "b", "port": 80}}}]}
            ]
        }
    }))
    .unwrap();
    let mut objs = shop();
    objs.push(Object::HTTPRoute(route));
    f.upsert(objs);
    f.sync();
    let view = f.rx.view.borrow().clone();
    let msgs: Vec<String> = view
        .config_errors
        .iter()
        .filter(|e| e.object.as_deref() == Some("HTTPRoute shop/a"))
        .map(|e| e.message.clone())
        .collect();
    assert_eq!(msgs.len(), 2, "{msgs:?}");
    assert!(
        msgs.iter().any(|m| m.starts_with("PartiallyInvalid is True (UnsupportedValue): Dropped Rule 1: spec.rules[1].filters[0].type")),
        "{msgs:?}"
    );
    assert!(
        msgs.iter().any(|m| m.starts_with("ResolvedRefs is False (BackendNotFound): spec.rules[0].backendRefs[1]: Service shop/b has no port 81")),
        "{msgs:?}"
    );
    let a = view.routes.iter().find(|r| r.service == "shop/a").unwrap();
    assert!(a.accepted && !a.resolved_refs, "{a:?}");
    assert!(
        a.reason.as_deref().unwrap().starts_with("BackendNotFound"),
        "{a:?}"
    );
    assert!(
        msgs.iter()
            .any(|m| m.contains("ExternalAuth") && m.contains("answered with 500")),
        "{msgs:?}"
    );
    // The proxy still gets the rule that translates, with the bad backend's
    // share pointing nowhere, and the ExternalAuth rule answering its
    // requests with 500 (skipped, they would reach `b` unauthenticated).
    let mesh = f.rx.mesh.borrow().clone();
    let t = crate::proxy::routes::http_route(&mesh.http_routes[0], &mesh.refs);
    let rules = t.route.unwrap().rules;
    assert_eq!(rules.len(), 2);
    assert_eq!(rules[0].backends.len(), 2);
    assert!(rules[1].backends[0].invalid.is_some(), "{:?}", rules[1]);
}

/// A route on a Service whose namespace is not in the mesh applies to no
/// connection (the kernel balances them itself): its status says so, and
/// `sluice check` lists it, until the namespace is enrolled.
#[test]
fn a_route_on_a_service_outside_the_mesh_says_it_applies_to_nothing() {
    let mut f = fixture();
    let route: crate::gateway::HttpRoute = serde_json::from_value(serde_json::json!({
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "HTTPRoute",
        "metadata": {"name": "r", "namespace": "legacy"},
        "spec": {
            "parentRefs": [{"kind": "Service", "name": "old", "port": 80}],
            "rules": [{"backendRefs": [{"name": "old", "port": 80}]}]
        }
    }))
    .unwrap();
    let mut objs = shop();
    objs.extend([
        Object::Namespace(namespace("legacy", false)),
        Object::Service(service("legacy", "old", "127.96.0.9", &[80])),
        Object::HTTPRoute(route),
    ]);
    f.upsert(objs);
    f.sync();
    let problems = |f: &Fixture| -> Vec<String> {
        f.rx.view
            .borrow()
            .config_errors
            .iter()
            .filter(|e| e.object.as_deref() == Some("HTTPRoute legacy/r"))
            .map(|e| e.message.clone())
            .collect()
    };
    let p = problems(&f);
    assert!(
        p.len() == 1
            && p[0].starts_with("Accepted is True (Accepted): attached to Service legacy/old, but")
            && p[0].contains("namespace legacy is not in the mesh"),
        "{p:?}"
    );
    let row = |f: &Fixture| {
        let v = f.rx.view.borrow().clone();
        v.routes
            .iter()
            .find(|r| r.service == "legacy/old")
            .cloned()
            .unwrap()
    };
    assert!(
        row(&f)
            .reason
            .is_some_and(|r| r.contains("not in the mesh")),
        "sluice routes says so too: {:?}",
        row(&f)
    );
    f.upsert(vec![Object::Namespace(namespace("legacy", true))]);
    assert_eq!(problems(&f), Vec::<String>::new());
    assert_eq!(row(&f).reason, None);
}

/// A route whose parent names no Service (a typo) has its row in `sluice
/// routes`, saying why it is not in force: it had none, and only `sluice
/// check` mentioned it.
#[test]
fn a_route_whose_parent_is_missing_has_a_row_saying_so() {
    let mut f = fixture();
    let route: crate::gateway::HttpRoute = serde_json::from_value(serde_json::json!({
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "HTTPRoute",
        "metadata": {"name": "r", "namespace": "shop"},
        "spec": {
            "parentRefs": [{"kind": "Service", "name": "reviewz", "port": 80}],
            "rules": [{"backendRefs": [{"name": "a", "port": 80}]}]
        }
    }))
    .unwrap();
    let mut objs = shop();
    objs.push(Object::HTTPRoute(route));
    f.upsert(objs);
    f.sync();
    let view = f.rx.view.borrow().clone();
    let row = view
        .routes
        .iter()
        .find(|r| r.service == "shop/reviewz")
        .unwrap_or_else(|| panic!("{:?}", view.routes));
    assert_eq!(row.route.as_deref(), Some("shop/r"));
    assert!(!row.accepted, "{row:?}");
    assert!(
        row.reason
            .as_deref()
            .is_some_and(|r| r.starts_with("NoMatchingParent") && r.contains("does not exist")),
        "{row:?}"
    );
}

/// The SPIFFE ID the mesh view gives the first endpoint of Service `a`.
fn endpoint_identity_of_a(f: &Fixture) -> Option<String> {
    let mesh = f.rx.mesh.borrow().clone();
    let a = mesh.services.iter().find(|s| s.key.name == "a").unwrap();
    a.ports[0].endpoints[0].identity.clone()
}

#[test]
fn a_terminating_pod_stays_in_the_mesh_and_a_finished_one_gives_up_its_ip() {
    let mut f = fixture();
    let web_cg = f.cgroup("pods/web");
    let mut web = workload("shop", "web", "web", "10.0.0.1", "n1");
    web.cgroup = Some("pods/web".into());
    // A finished Job pod that kept the IP the network has since given to
    // web, and whose name sorts after web's.
    let mut job = workload("shop", "zz-job", "batch", "10.0.0.1", "n2");
    job.finished = true;
    let mut objs = shop();
    objs.extend([Object::Pod(web.clone()), Object::Pod(job)]);
    f.upsert(objs);
    f.sync();
    assert_eq!(
        endpoint_identity_of_a(&f).as_deref(),
        Some("spiffe://cluster.local/ns/shop/sa/web"),
        "the running pod owns 10.0.0.1"
    );
    assert!(
        !f.rx
            .mesh
            .borrow()
            .workloads
            .iter()
            .any(|w| w.name == "zz-job"),
        "finished pods are not workloads"
    );

    // Deletion requested: web still serves for its grace period, enrolled
    // and with its identity.
    web.terminating = true;
    f.upsert(vec![Object::Pod(web)]);
    assert_eq!(f.dp.enrolled_paths(), vec![web_cg]);
    assert!(
        f.rx.identities
            .borrow()
            .contains("spiffe://cluster.local/ns/shop/sa/web")
    );
}

#[test]
fn an_address_two_pods_claim_goes_to_the_live_one_then_the_local_one() {
    let mut f = fixture();
    let web = workload("shop", "web", "web", "10.0.0.1", "n1");
    // A pod of another namespace, deleted but kept by a finalizer with its
    // phase still Running, whose address the network has given to web; its
    // name sorts after web's.
    let mut gone = workload("zz", "old", "intruder", "10.0.0.1", "n2");
    gone.terminating = true;
    let mut objs = shop();
    objs.extend([Object::Pod(web), Object::Pod(gone)]);
    f.upsert(objs);
    f.sync();
    let web_id = Some("spiffe://cluster.local/ns/shop/sa/web");
    assert_eq!(
        endpoint_identity_of_a(&f).as_deref(),
        web_id,
        "the live pod owns 10.0.0.1"
    );

    // A live pod left on another node (lost before eviction) claims it too:
    // this node's own pod keeps it, and with it its identity.
    let stale = workload("zz", "stale", "intruder", "10.0.0.1", "n2");
    f.upsert(vec![Object::Pod(stale)]);
    assert_eq!(endpoint_identity_of_a(&f).as_deref(), web_id);
    let view = f.rx.view.borrow().clone();
    let ips = |name: &str| {
        view.workloads
            .iter()
            .find(|w| w.name == name)
            .unwrap()
            .ips
            .clone()
    };
    assert_eq!(ips("web"), vec!["10.0.0.1".to_string()]);
    assert!(ips("stale").is_empty() && ips("old").is_empty());
}

#[test]
fn a_static_pod_is_not_enrolled_and_asks_for_no_identity() {
    let mut f = fixture();
    let mut etcd = workload("shop", "etcd-n1", "default", "10.0.0.9", "n1");
    etcd.annotations
        .insert("kubernetes.io/config.mirror".into(), "abc".into());
    let mut objs = shop();
    objs.push(Object::Pod(etcd));
    f.upsert(objs);
    f.sync();
    let view = f.rx.view.borrow().clone();
    let w = view.workloads.iter().find(|w| w.name == "etcd-n1").unwrap();
    assert!(!w.enrolled);
    assert!(
        w.reason
            .as_deref()
            .unwrap_or_default()
            .contains("static pod"),
        "{:?}",
        w.reason
    );
    assert!(
        !f.rx
            .identities
            .borrow()
            .contains("spiffe://cluster.local/ns/shop/sa/default"),
        "a certificate was asked for a static pod"
    );
}

#[test]
fn meshed_clients_fall_back_to_serving_terminating_endpoints_as_the_kernel_does() {
    let mut f = fixture();
    let draining = ep("10.0.0.1", Some(false), Some(true), Some(true));
    let mut objs = shop();
    objs.push(Object::EndpointSlice(slice(
        "shop",
        "a-1",
        "a",
        &[8080],
        std::slice::from_ref(&draining),
    )));
    f.upsert(objs);
    f.sync();
    let ready = |f: &Fixture| -> Vec<(SocketAddr, bool)> {
        let mesh = f.rx.mesh.borrow().clone();
        let a = mesh.services.iter().find(|s| s.key.name == "a").unwrap();
        a.ports[0]
            .endpoints
            .iter()
            .map(|e| (e.addr, e.ready))
            .collect()
    };
    assert_eq!(
        ready(&f),
        vec![(addr("10.0.0.1:8080"), true)],
        "the only endpoint drains: it still serves"
    );
    let kernel = f.dp.spec(&Frontend::tcp(addr("127.96.0.1:80"))).unwrap();
    assert_eq!(kernel.backends, vec![Backend::ready(addr("10.0.0.1:8080"))]);

    f.upsert(vec![Object::EndpointSlice(slice(
        "shop",
        "a-1",
        "a",
        &[8080],
        &[draining, ep_ready("10.0.0.3")],
    ))]);
    assert_eq!(
        ready(&f),
        vec![
            (addr("10.0.0.1:8080"), false),
            (addr("10.0.0.3:8080"), true)
        ]
    );
}

#[test]
fn a_service_refused_for_a_taken_cluster_ip_gets_it_once_the_other_moves() {
    let mut f = fixture();
    f.upsert(shop());
    f.sync();
    // b asks for a's ClusterIP: refused, a keeps it.
    f.upsert(vec![Object::Service(service(
        "shop",
        "b",
        "127.96.0.1",
        &[80],
    ))]);
    let errors = f.rx.view.borrow().config_errors.clone();
    assert!(
        errors
            .iter()
            .any(|e| e.object.as_deref() == Some("Service shop/b")
                && e.message.contains("already belongs to Service shop/a")),
        "{errors:?}"
    );
    // The proxy keeps b as last accepted (its own ClusterIP); a Service
    // refused from the start (c, also asking for a's) it does not get at
    // all: it would send a's callers to c's pods.
    let vips = |f: &Fixture, name: &str| {
        f.rx.mesh
            .borrow()
            .services
            .iter()
            .find(|s| s.key.name == name)
            .map(|s| s.vips.clone())
    };
    assert_eq!(
        vips(&f, "b"),
        Some(vec!["127.96.0.2".parse::<std::net::IpAddr>().unwrap()])
    );
    f.upsert(vec![Object::Service(service(
        "shop",
        "c",
        "127.96.0.1",
        &[80],
    ))]);
    assert_eq!(
        vips(&f, "a"),
        Some(vec!["127.96.0.1".parse::<std::net::IpAddr>().unwrap()])
    );
    // c is in the proxy's view (its pods' policies), without the address.
    assert_eq!(vips(&f, "c"), Some(vec![]));
    f.r.step(vec![Input::Updates(vec![Update::Delete(
        Kind::Service,
        Key::new("shop", "c"),
    )])]);
    // a moves to another address; b gets 127.96.0.1 on the next tick.
    f.upsert(vec![Object::Service(service(
        "shop",
        "a",
        "127.96.0.9",
        &[80],
    ))]);
    f.r.step(vec![Input::Tick]);
    assert!(
        f.rx.view.borrow().config_errors.is_empty(),
        "{:?}",
        f.rx.view.borrow().config_errors
    );
    let b = f.dp.spec(&Frontend::tcp(addr("127.96.0.1:80"))).unwrap();
    assert_eq!(b.backends, vec![Backend::ready(addr("10.0.0.2:8080"))]);
    assert!(f.dp.spec(&Frontend::tcp(addr("127.96.0.9:80"))).is_some());
    assert_eq!(
        vips(&f, "b"),
        Some(vec!["127.96.0.1".parse::<std::net::IpAddr>().unwrap()])
    );
}

#[test]
fn a_failed_kernel_operation_is_reported_once_and_retried_until_it_succeeds() {
    let mut f = fixture();
    let mut web = workload("shop", "web", "web", "10.0.0.1", "n1");
    web.cgroup = Some(f.cgroup("pods/web"));
    let mut objs = shop();
    objs.push(Object::Pod(web.clone()));
    f.dp.fail_mode_changes();
    f.upsert(objs);
    f.sync();
    let errors = |f: &Fixture| f.rx.view.borrow().dataplane_errors.clone();
    assert_eq!(errors(&f).len(), 1, "{:?}", errors(&f));
    assert!(errors(&f)[0].contains("setting the mTLS mode of 10.0.0.1"));
    // More changes and ticks: still one entry, not one per attempt.
    web.labels.insert("v".into(), "2".into());
    f.upsert(vec![Object::Pod(web)]);
    f.r.step(vec![Input::Tick]);
    assert_eq!(errors(&f).len(), 1, "{:?}", errors(&f));
    // The map has room again: the next tick sets the mode and the error goes.
    f.dp.clear_failures();
    f.r.step(vec![Input::Tick]);
    assert!(errors(&f).is_empty(), "{:?}", errors(&f));
    assert_eq!(
        f.dp.modes().get(&"10.0.0.1".parse().unwrap()),
        Some(&ebpf_lb::MtlsMode::Permissive)
    );
}

/// A source repeating the same errors (a watch retrying a list that keeps
/// failing) rebuilds no view; new errors, and their end, do.
#[test]
fn the_same_source_errors_again_rebuild_nothing() {
    let mut f = fixture();
    f.upsert(shop());
    f.sync();
    let failing = |message: &str| Input::SourceErrors {
        source: "kube:HTTPRoute".into(),
        errors: if message.is_empty() {
            vec![]
        } else {
            vec![crate::admin::api::ConfigError {
                source: "kube:HTTPRoute".into(),
                object: None,
                field: None,
                message: message.into(),
            }]
        },
        incomplete: false,
    };
    let generation = |f: &Fixture| f.rx.mesh.borrow().generation;
    f.r.step(vec![failing("HTTPRoute is not served")]);
    let g = generation(&f);
    for _ in 0..3 {
        f.r.step(vec![failing("HTTPRoute is not served")]);
    }
    assert_eq!(generation(&f), g, "the same errors rebuilt the mesh view");
    f.r.step(vec![failing("not allowed to list HTTPRoute")]);
    assert!(generation(&f) > g);
    let g = generation(&f);
    f.r.step(vec![failing("")]);
    assert!(generation(&f) > g);
    assert!(f.rx.view.borrow().config_errors.is_empty());
}

/// An earlier run programmed shop/a and something no Service claims: their
/// frontends.
fn earlier_run_programmed_a_and_an_orphan(f: &Fixture) -> (Frontend, Frontend) {
    let a = Frontend::tcp(addr("127.96.0.1:80"));
    let orphan = Frontend::tcp(addr("127.96.0.77:80"));
    f.dp.preload(ServiceSpec::new(a, [Backend::ready(addr("10.0.0.1:8080"))]));
    f.dp.preload(ServiceSpec::new(
        orphan,
        [Backend::ready(addr("10.0.0.9:80"))],
    ));
    (a, orphan)
}

#[test]
fn a_restart_keeps_the_pinned_entries_of_a_service_that_is_refused_now() {
    let mut f = fixture();
    let (a, orphan) = earlier_run_programmed_a_and_an_orphan(&f);
    // Now a's spec is invalid: refused, and its pinned entry stays.
    let mut bad = service("shop", "a", "127.96.0.1", &[80]);
    bad.spec.as_mut().unwrap().session_affinity = Some("Sticky".into());
    let mut objs = shop();
    objs[1] = Object::Service(bad);
    f.upsert(objs);
    f.sync();
    assert!(f.dp.spec(&a).is_some(), "a's last good entry is kept");
    assert!(f.dp.spec(&orphan).is_none(), "what no Service claims goes");
    assert!(
        f.rx.view
            .borrow()
            .config_errors
            .iter()
            .any(|e| e.object.as_deref() == Some("Service shop/a"))
    );
}

/// After a restart, a Service refused for an address that does not read
/// (`10.96.0.1O`) cannot say which pinned entries were its own: none is
/// removed until it is fixed, and then only what no Service claims.
#[test]
fn a_restart_with_a_service_whose_address_does_not_read_removes_nothing() {
    let mut f = fixture();
    let (a, orphan) = earlier_run_programmed_a_and_an_orphan(&f);
    let mut objs = shop();
    objs[1] = Object::Service(service("shop", "a", "127.96.0.1O", &[80]));
    f.upsert(objs.clone());
    f.sync();
    assert!(f.dp.spec(&a).is_some(), "a's earlier entry is kept");
    assert!(f.dp.spec(&orphan).is_some(), "whose it was is not known");
    let problems = f.rx.view.borrow().dataplane_errors.clone();
    assert!(
        problems
            .iter()
            .any(|e| e.contains("shop/a's cluster IP \"127.96.0.1O\" does not read")),
        "{problems:?}"
    );
    // Still so on the tick, which rebuilds no view for it.
    let generation = f.rx.mesh.borrow().generation;
    f.r.step(vec![Input::Tick]);
    assert!(f.dp.spec(&orphan).is_some());
    assert_eq!(f.rx.mesh.borrow().generation, generation);
    // Fixed: a is a's again, and on the next tick the orphan goes.
    objs[1] = Object::Service(service("shop", "a", "127.96.0.1", &[80]));
    f.upsert(objs);
    f.r.step(vec![Input::Tick]);
    assert!(f.dp.spec(&a).is_some());
    assert!(f.dp.spec(&orphan).is_none(), "what no Service claims goes");
}

#[test]
fn a_refused_service_update_leaves_the_proxy_with_the_last_good_version() {
    let mut f = fixture();
    f.upsert(shop());
    f.sync();
    let vips = |f: &Fixture| {
        let mesh = f.rx.mesh.borrow().clone();
        mesh.services
            .iter()
            .find(|s| s.key.name == "a")
            .map(|s| s.vips.clone())
    };
    assert_eq!(vips(&f), Some(vec!["127.96.0.1".parse().unwrap()]));
    // An update with a broken ClusterIP: refused; kernel and proxy keep
    // the last good version.
    f.upsert(vec![Object::Service(service(
        "shop",
        "a",
        "not-an-ip",
        &[80],
    ))]);
    assert!(
        f.rx.view
            .borrow()
            .config_errors
            .iter()
            .any(|e| e.object.as_deref() == Some("Service shop/a"))
    );
    assert!(f.dp.spec(&Frontend::tcp(addr("127.96.0.1:80"))).is_some());
    assert_eq!(vips(&f), Some(vec!["127.96.0.1".parse().unwrap()]));
}

/// A manifest edited by hand may set `clusterIP` and `clusterIPs` apart:
/// the kernel reads the list and the proxy read both, so callers of the
/// address only the proxy had were carried as another Service's. Such a
/// Service is refused, naming both fields, and both keep its last good
/// version.
#[test]
fn a_service_whose_cluster_ip_fields_disagree_is_refused() {
    let mut f = fixture();
    f.upsert(shop());
    f.sync();
    let with_list = |ip: &str, list: &str| {
        let mut svc = service("shop", "a", ip, &[80]);
        svc.spec.as_mut().unwrap().cluster_ips = Some(vec![list.to_string()]);
        vec![Object::Service(svc)]
    };
    f.upsert(with_list("127.96.0.1", "127.96.0.1"));
    assert!(f.rx.view.borrow().config_errors.is_empty());
    f.upsert(with_list("127.96.0.77", "127.96.0.1"));
    let errors = f.rx.view.borrow().config_errors.clone();
    let refusal = errors
        .iter()
        .find(|e| e.object.as_deref() == Some("Service shop/a"))
        .unwrap_or_else(|| panic!("{errors:?}"));
    assert!(
        refusal.message.contains("spec.clusterIP")
            && refusal.message.contains("spec.clusterIPs[0]")
            && refusal.message.contains("127.96.0.77"),
        "{refusal:?}"
    );
    assert!(f.dp.spec(&Frontend::tcp(addr("127.96.0.1:80"))).is_some());
    assert!(f.dp.spec(&Frontend::tcp(addr("127.96.0.77:80"))).is_none());
    let mesh = f.rx.mesh.borrow().clone();
    let a = mesh.services.iter().find(|s| s.key.name == "a").unwrap();
    assert_eq!(
        a.vips,
        vec!["127.96.0.1".parse::<std::net::IpAddr>().unwrap()]
    );
}

#[test]
fn mesh_annotation_values_the_agent_does_not_read_are_config_errors() {
    let mut store = Store::new();
    for (name, value) in [
        ("shop", "enabled"),
        ("typo", "Enabled"),
        ("off", "disabled"),
    ] {
        let mut ns = namespace(name, false);
        ns.metadata
            .annotations
            .get_or_insert_default()
            .insert(config::MESH_ANNOTATION.into(), value.into());
        store.namespaces.insert(name.into(), ns);
    }
    let mut opted_out = workload("shop", "web-0", "web", "10.0.0.5", "node-a");
    opted_out
        .annotations
        .insert(config::MESH_ANNOTATION.into(), "false".into());
    store.pods.insert(Key::new("shop", "web-0"), opted_out);
    let errors = annotation_problems(&store);
    let objects: Vec<_> = errors.iter().filter_map(|e| e.object.clone()).collect();
    assert_eq!(objects, ["Namespace typo", "Pod shop/web-0"], "{errors:?}");
    assert!(
        errors[0]
            .message
            .starts_with("\"Enabled\" is not a value Sluice reads")
            && errors[0]
                .message
                .contains("use \"enabled\" or \"disabled\""),
        "{errors:?}"
    );
    assert_eq!(
        errors[1].field.as_deref(),
        Some("metadata.annotations[sluice.dev/mesh]")
    );
}

#[test]
fn guard_and_mode_failures_are_reported_retried_and_forgotten_with_their_pod() {
    let mut f = fixture();
    let errors = |f: &Fixture| f.rx.view.borrow().dataplane_errors.clone();
    // A STRICT pod whose interface is not known yet.
    let mut web = workload("shop", "web", "web", "10.0.0.1", "n1");
    web.cgroup = Some(f.cgroup("pods/web"));
    let p = web_strict();
    let mut objs = shop();
    objs.extend([Object::Pod(web.clone()), Object::MeshPolicy(p)]);
    f.upsert(objs);
    f.sync();
    assert_eq!(errors(&f).len(), 1, "{:?}", errors(&f));
    assert!(
        errors(&f)[0].starts_with("STRICT pod shop/web: no interface to guard"),
        "{:?}",
        errors(&f)
    );
    // The interface appears: guarded, and the error goes.
    web.interface = Some("veth-web".into());
    f.upsert(vec![Object::Pod(web)]);
    assert!(errors(&f).is_empty(), "{:?}", errors(&f));
    assert_eq!(f.dp.guarded(), BTreeSet::from(["veth-web".to_string()]));

    // A mode the kernel refuses, for a pod that then goes away: the error
    // leaves with the pod instead of staying forever.
    f.dp.fail_mode_changes();
    let mut db = workload("shop", "db", "db", "10.0.0.2", "n1");
    db.cgroup = Some(f.cgroup("pods/db"));
    f.upsert(vec![Object::Pod(db)]);
    assert!(
        errors(&f)
            .iter()
            .any(|e| e.contains("the mTLS mode of 10.0.0.2")),
        "{:?}",
        errors(&f)
    );
    f.r.step(vec![Input::Updates(vec![Update::Delete(
        Kind::Pod,
        Key::new("shop", "db"),
    )])]);
    f.r.step(vec![Input::Tick]);
    assert!(errors(&f).is_empty(), "{:?}", errors(&f));
}

#[test]
fn a_failed_removal_of_stale_services_at_the_first_sync_is_retried_on_ticks() {
    let mut f = fixture();
    let orphan = Frontend::tcp(addr("127.96.0.77:80"));
    f.dp.preload(ServiceSpec::new(
        orphan,
        [Backend::ready(addr("10.0.0.9:80"))],
    ));
    f.dp.fail_changes_of(orphan);
    f.upsert(shop());
    f.sync();
    let errors = |f: &Fixture| f.rx.view.borrow().dataplane_errors.clone();
    assert!(f.dp.spec(&orphan).is_some());
    assert!(
        errors(&f)
            .iter()
            .any(|e| e.starts_with("removing stale services")),
        "{:?}",
        errors(&f)
    );
    // Still failing: still one error, not one per tick.
    f.r.step(vec![Input::Tick]);
    assert_eq!(errors(&f).len(), 1, "{:?}", errors(&f));
    // The map takes the removal now: the next tick finishes the first sync.
    f.dp.clear_failures();
    f.r.step(vec![Input::Tick]);
    assert!(f.dp.spec(&orphan).is_none(), "the stale service is gone");
    assert!(errors(&f).is_empty(), "{:?}", errors(&f));
}

#[test]
fn the_first_sync_keeps_what_an_earlier_run_programmed_while_the_source_has_unread_objects() {
    let mut f = fixture();
    // An earlier run programmed a Service and enrolled a pod that are in a
    // file now broken: the agent restarts with the file as it is.
    let orphan = Frontend::tcp(addr("127.96.0.77:80"));
    f.dp.preload(ServiceSpec::new(
        orphan,
        [Backend::ready(addr("10.0.0.9:80"))],
    ));
    let old_pod = f.cgroup("pods/old");
    dataplane::Dataplane::enroll(&*f.dp, &old_pod).unwrap();
    // ... and made it STRICT, guarding its interface.
    let old_ip: std::net::IpAddr = "10.0.0.9".parse().unwrap();
    dataplane::Dataplane::set_workload_mode(&*f.dp, old_ip, Some(ebpf_lb::MtlsMode::Strict))
        .unwrap();
    dataplane::Dataplane::guard_interface(&*f.dp, "veth-old").unwrap();
    // ... and had its address among the meshed pods.
    f.dp.preload_meshed_pods(&[old_ip]);
    f.upsert(shop());
    let broken = |incomplete: bool| Input::SourceErrors {
        source: "files:/etc/sluice".into(),
        errors: if incomplete {
            vec![crate::admin::api::ConfigError {
                source: "/etc/sluice/old.yaml".into(),
                object: Some("document 1".into()),
                field: None,
                message: "did not find expected key".into(),
            }]
        } else {
            vec![]
        },
        incomplete,
    };
    f.r.step(vec![broken(true), Input::Updates(vec![Update::Synced])]);
    let errors = |f: &Fixture| f.rx.view.borrow().dataplane_errors.clone();
    assert!(
        f.dp.spec(&orphan).is_some(),
        "balancing that worked goes on"
    );
    assert_eq!(f.dp.enrolled_paths(), vec![old_pod.clone()]);
    // Its STRICT mode and guard stay too: dropping them would let
    // plaintext in to a pod the broken file may still make STRICT.
    assert_eq!(
        f.dp.modes(),
        BTreeMap::from([(old_ip, ebpf_lb::MtlsMode::Strict)])
    );
    assert_eq!(f.dp.guarded(), BTreeSet::from(["veth-old".to_string()]));
    // Its address stays meshed: its enrolled callers keep going through the
    // proxy rather than reaching it in plaintext.
    let meshed = |f: &Fixture| dataplane::Dataplane::meshed_pods(&*f.dp);
    assert!(meshed(&f).contains(&old_ip), "{:?}", meshed(&f));
    // Not a kernel error (the file is reported already), and no work on
    // every tick meanwhile.
    assert!(errors(&f).is_empty(), "{:?}", errors(&f));
    // What holds it back is in the view (`sluice check` shows it).
    let waits = |f: &Fixture| f.rx.view.borrow().cleanup_waits_for.clone();
    assert_eq!(waits(&f), vec!["files:/etc/sluice".to_string()]);
    let generation = f.rx.mesh.borrow().generation;
    f.r.step(vec![Input::Tick]);
    assert!(f.dp.spec(&orphan).is_some());
    assert_eq!(f.rx.mesh.borrow().generation, generation);
    assert_eq!(waits(&f), vec!["files:/etc/sluice".to_string()]);
    assert!(f.rx.view.borrow().cleanup_pending);
    // The file is fixed and names neither any more: the clean-up finishes
    // at the next tick (the view says it is due until then).
    f.r.step(vec![broken(false)]);
    assert!(waits(&f).is_empty(), "{:?}", waits(&f));
    assert!(f.rx.view.borrow().cleanup_pending);
    f.r.step(vec![Input::Tick]);
    assert!(!f.rx.view.borrow().cleanup_pending, "the view says it ran");
    assert!(f.dp.spec(&orphan).is_none(), "the stale service is gone");
    assert!(
        f.dp.enrolled_paths().is_empty(),
        "the stale cgroup is unenrolled"
    );
    assert!(f.dp.modes().is_empty(), "{:?}", f.dp.modes());
    assert!(f.dp.guarded().is_empty(), "{:?}", f.dp.guarded());
    assert!(!meshed(&f).contains(&old_ip), "{:?}", meshed(&f));
    assert!(errors(&f).is_empty(), "{:?}", errors(&f));
}

#[test]
fn pods_an_access_policy_cannot_govern_are_config_errors() {
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
    let mut f = fixture();
    let mut objs = shop();
    let mut a = service("shop", "a", "127.96.0.1", &[80]);
    a.spec.as_mut().unwrap().ports.as_mut().unwrap()[0].target_port =
        Some(IntOrString::String("http".into()));
    objs[1] = Object::Service(a);
    let mut pod = workload("shop", "a-0", "a", "10.0.0.1", "n1");
    pod.labels = [("app".to_string(), "a".to_string())].into();
    objs.push(Object::Pod(pod.clone()));
    let spec: crate::crds::AccessPolicySpec = serde_json::from_value(serde_json::json!({
        "targetRefs": [{"kind": "Service", "name": "a"}],
        "rules": [{"from": [{"namespace": "shop"}]}]
    }))
    .unwrap();
    let mut p = crate::crds::AccessPolicy::new("only-shop", spec);
    p.metadata.namespace = Some("shop".into());
    objs.push(Object::AccessPolicy(p));
    f.upsert(objs);
    f.sync();
    let errors = f.rx.view.borrow().config_errors.clone();
    let of_policy = |errors: &[ConfigError], note: bool| {
        errors
            .iter()
            .filter(|e| {
                e.object.as_deref() == Some("AccessPolicy shop/only-shop") && e.is_note() == note
            })
            .map(|e| e.message.clone())
            .collect::<Vec<_>>()
    };
    let problems = of_policy(&errors, false);
    assert_eq!(problems.len(), 1, "{errors:?}");
    assert!(
        problems[0].contains("shop/a-0") && problems[0].contains("(http)"),
        "{problems:?}"
    );
    // The agent's default mode here is PERMISSIVE: a note says plaintext
    // callers pass the policy.
    let notes = of_policy(&errors, true);
    assert!(
        notes.len() == 1 && notes[0].contains("PERMISSIVE pods") && notes[0].contains("shop/a-0"),
        "{notes:?}"
    );
    // The pod declares the port: no problem.
    pod.ports.insert("http".into(), 8080);
    f.upsert(vec![Object::Pod(pod.clone())]);
    let errors = f.rx.view.borrow().config_errors.clone();
    assert_eq!(of_policy(&errors, false), Vec::<String>::new());
    // Opted out of the mesh: no proxy polices it, a problem.
    pod.annotations.insert(
        crate::config::MESH_ANNOTATION.into(),
        crate::config::MESH_DISABLED.into(),
    );
    f.upsert(vec![Object::Pod(pod)]);
    let errors = f.rx.view.borrow().config_errors.clone();
    let problems = of_policy(&errors, false);
    assert!(
        problems.len() == 1 && problems[0].contains("no node proxy polices"),
        "{errors:?}"
    );
}
