//! The mesh view: everything the node proxy needs (services with their
//! endpoints and where those run, routes, access policies, local workload
//! identities), derived from the model as one immutable snapshot.
//!
//! This is the agent's side of the proxy contract; `proxy.rs` translates it
//! into the proxy's own snapshot type.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
};

use crate::gateway::{GrpcRoute, HttpRoute};
use serde::Serialize;

use super::{
    refs::RefIndex,
    routes::{RouteEval, RouteRefs, translate_all},
};
use crate::{
    admin::api::WorkloadInfo,
    crds::AccessPolicy,
    state::{Key, NodeInfo, Store},
};

#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct MeshView {
    /// Increases with every new view.
    pub generation: u64,
    pub node: String,
    pub trust_domain: String,
    pub services: Vec<MeshService>,
    /// Every known pod (local ones carry `local: true`).
    pub workloads: Vec<WorkloadInfo>,
    pub nodes: Vec<NodeInfo>,
    /// Routes with at least one Service parent that exists.
    pub http_routes: Vec<HttpRoute>,
    pub grpc_routes: Vec<GrpcRoute>,
    /// Valid access policies.
    pub access_policies: Vec<AccessPolicy>,
    /// Pods anywhere whose traffic is meshed (namespace enrolled, no opt-out):
    /// callers reach them through their node's proxy.
    pub meshed_pods: std::collections::BTreeSet<Key>,
    /// What route references may point at: the routes are resolved against
    /// it when translated for the proxy.
    pub refs: RefIndex,
    /// The routes in the proxy's form, translated once per view (route
    /// status is written from the same translation).
    #[serde(skip)]
    pub proxy_http_routes: Vec<l7_proxy::config::HttpRoute>,
    #[serde(skip)]
    pub proxy_grpc_routes: Vec<l7_proxy::config::GrpcRoute>,
}

impl MeshView {
    /// The addresses of the pods callers reach through their node's proxy
    /// and the tunnel: meshed, not DISABLED, on a node whose address is
    /// known (the proxy's own rule for a pod, `proxy::snapshot`).
    pub fn tunnelled_pod_ips(&self) -> std::collections::BTreeSet<std::net::IpAddr> {
        self.workloads
            .iter()
            .filter(|w| self.tunnelled(w) && self.node_address(&w.node).is_some())
            .flat_map(|w| w.ips.iter().filter_map(|ip| ip.parse().ok()))
            .collect()
    }

    /// Whether callers reach `w` through the tunnel (once its node's address
    /// is known): meshed, and not DISABLED.
    pub fn tunnelled(&self, w: &WorkloadInfo) -> bool {
        self.meshed_pods.contains(&Key::new(&w.namespace, &w.name))
            && w.mtls_mode != crate::crds::MtlsMode::Disabled
    }

    /// The address of `node` where its proxy takes tunnels: its first one,
    /// where its agent's proxy listens by default (`--proxy-inbound-addr`
    /// otherwise binds the wildcard), whatever the pod's address family:
    /// the CONNECT inside names the pod's address, so a pod's IPv6 address
    /// on a node known by IPv4 first is still reached through the tunnel,
    /// never in plaintext past its STRICT mode.
    pub fn node_address(&self, node: &str) -> Option<std::net::IpAddr> {
        self.nodes
            .iter()
            .find(|n| n.name == node)
            .and_then(|n| n.addresses.first().copied())
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct MeshService {
    pub key: Key,
    pub vips: Vec<IpAddr>,
    /// The Service's namespace is enrolled: its traffic from enrolled
    /// workloads reaches the proxy.
    pub meshed: bool,
    pub ports: Vec<MeshPort>,
    /// `sessionAffinity: ClientIP`: its timeout in seconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub affinity_timeout_s: Option<u32>,
    /// Pods on this node its selector picks, listed in its EndpointSlices
    /// or not yet: its access policies govern them from the start.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub selects: Vec<SelectedPod>,
}

/// A pod a Service's selector picks, and the pod's ports the Service's TCP
/// ports lead to.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct SelectedPod {
    pub pod: Key,
    pub ports: Vec<u16>,
    /// Those the Service's ports declaring HTTP (`appProtocol`) lead to.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub http_ports: Vec<u16>,
    /// Those the Service's ports declaring `appProtocol: tcp` lead to.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tcp_ports: Vec<u16>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct MeshPort {
    pub name: String,
    pub port: u16,
    /// `TCP` or `UDP`.
    pub protocol: String,
    /// `appProtocol` (e.g. `http`, `kubernetes.io/h2c`), when set.
    pub app_protocol: Option<String>,
    pub endpoints: Vec<MeshEndpoint>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct MeshEndpoint {
    pub addr: SocketAddr,
    pub ready: bool,
    pub node: Option<String>,
    /// Where that node's proxy listens (its first address of the endpoint's family).
    pub node_address: Option<IpAddr>,
    /// The pod behind the endpoint, when known.
    pub workload: Option<Key>,
    /// Its SPIFFE ID, when the pod is known.
    pub identity: Option<String>,
    /// The pod is enrolled: reach it through its node proxy over mTLS.
    pub meshed: bool,
}

/// Builds the view. `workloads` comes from [`super::workloads::workload_infos`].
pub fn mesh_view(
    store: &Store,
    node: &str,
    trust_domain: &str,
    workloads: Vec<WorkloadInfo>,
    generation: u64,
) -> MeshView {
    mesh_view_and_routes(store, node, trust_domain, workloads, generation).0
}

/// [`mesh_view`], and the evaluation of every route of the store (for route
/// status) from the same translation.
pub fn mesh_view_and_routes(
    store: &Store,
    node: &str,
    trust_domain: &str,
    workloads: Vec<WorkloadInfo>,
    generation: u64,
) -> (MeshView, Vec<RouteEval>) {
    let by_ip: BTreeMap<IpAddr, &WorkloadInfo> = workloads
        .iter()
        .flat_map(|w| {
            w.ips
                .iter()
                .filter_map(|ip| ip.parse().ok())
                .map(move |ip| (ip, w))
        })
        .collect();
    // Enrolment of remote pods: the namespace and the opt-out decide, as for local ones.
    let meshed_pod = |w: &WorkloadInfo| {
        store.namespace_enrolled(&w.namespace)
            && store
                .pods
                .get(&Key::new(&w.namespace, &w.name))
                .is_some_and(|p| !p.opted_out())
    };
    let node_addr = |name: &str, v4: bool| {
        store
            .nodes
            .get(name)
            .and_then(|n| n.addresses.iter().find(|a| a.is_ipv4() == v4).copied())
    };
    let this_node = node;
    let local = local_pods(store, this_node);
    let mut services = Vec::new();
    for (key, svc) in &store.services {
        let Some(spec) = &svc.spec else { continue };
        // As the kernel reads them (a Service whose two fields disagree is
        // refused, its last good version published instead).
        let vips: Vec<IpAddr> = super::lb::cluster_ips(spec)
            .0
            .into_iter()
            .filter_map(|ip| ip.parse().ok())
            .fold(Vec::new(), |mut v, ip| {
                if !v.contains(&ip) {
                    v.push(ip);
                }
                v
            });
        let local_only = spec.internal_traffic_policy.as_deref() == Some("Local");
        let mut ports = Vec::new();
        for p in spec.ports.iter().flatten() {
            let Ok(number) = u16::try_from(p.port) else {
                continue;
            };
            let name = p.name.clone().unwrap_or_default();
            let protocol = p.protocol.clone().unwrap_or_else(|| "TCP".into());
            let mut endpoints = Vec::new();
            // Terminating endpoints that still serve, for when none is ready.
            let mut fallback = std::collections::BTreeSet::new();
            for slice in store.slices_of(key) {
                let Some(sp) = slice.ports.iter().flatten().find(|sp| {
                    sp.name.clone().unwrap_or_default() == name
                        && sp.protocol.as_deref().unwrap_or("TCP") == protocol
                }) else {
                    continue;
                };
                let Some(target) = sp.port.and_then(|p| u16::try_from(p).ok()) else {
                    continue;
                };
                for ep in &slice.endpoints {
                    let state = super::lb::backend_state(ep.conditions.as_ref());
                    let serving = super::lb::serving(ep.conditions.as_ref());
                    for a in &ep.addresses {
                        let Ok(ip) = a.parse::<IpAddr>() else {
                            continue;
                        };
                        if state == ebpf_lb::BackendState::Terminating && serving {
                            fallback.insert(SocketAddr::new(ip, target));
                        }
                        let w = by_ip.get(&ip).copied();
                        let node = ep.node_name.clone().or_else(|| w.map(|w| w.node.clone()));
                        // internalTrafficPolicy: Local: this node's endpoints only.
                        if local_only && node.as_deref() != Some(this_node) {
                            continue;
                        }
                        endpoints.push(MeshEndpoint {
                            addr: SocketAddr::new(ip, target),
                            ready: state == ebpf_lb::BackendState::Ready,
                            node_address: node.as_deref().and_then(|n| node_addr(n, ip.is_ipv4())),
                            node,
                            workload: w.map(|w| Key::new(&w.namespace, &w.name)),
                            identity: w.map(|w| w.identity.clone()),
                            meshed: w.is_some_and(meshed_pod),
                        });
                    }
                }
            }
            // Ready first, so that of an address listed twice the ready
            // entry stays.
            endpoints.sort_by_key(|e| (e.addr, !e.ready));
            endpoints.dedup_by_key(|e| e.addr);
            // As in the kernel (and kube-proxy): with no ready endpoint,
            // serving terminating ones still take requests.
            if !endpoints.iter().any(|e| e.ready) {
                for e in &mut endpoints {
                    e.ready = fallback.contains(&e.addr);
                }
            }
            ports.push(MeshPort {
                name,
                port: number,
                protocol,
                app_protocol: p.app_protocol.clone(),
                endpoints,
            });
        }
        // As the kernel has it (lb.rs): the default timeout when none is
        // given; one out of range refuses the Service there, and here
        // falls back to the default.
        let affinity_timeout_s =
            (spec.session_affinity.as_deref() == Some("ClientIP")).then(|| {
                spec.session_affinity_config
                    .as_ref()
                    .and_then(|c| c.client_ip.as_ref())
                    .and_then(|c| c.timeout_seconds)
                    .filter(|t| (1..=86_400).contains(t))
                    .map_or(
                        crate::config::DEFAULT_AFFINITY_TIMEOUT.as_secs() as u32,
                        |t| t as u32,
                    )
            });
        services.push(MeshService {
            key: key.clone(),
            vips,
            meshed: store.namespace_enrolled(&key.namespace),
            ports,
            affinity_timeout_s,
            selects: selected_pods(&local, key, spec),
        });
    }
    let refs = RefIndex::of(store);
    let routes = translate_all(store, &refs);
    let accepted = |r: &RouteRefs| {
        r.service_parents().any(|p| {
            refs.check_parent(
                &p.service_key(&r.key.namespace),
                p.port,
                p.section_name.as_deref(),
            )
            .is_ok()
        })
    };
    let view = MeshView {
        generation,
        node: node.into(),
        trust_domain: trust_domain.into(),
        services,
        workloads,
        nodes: store.nodes.values().cloned().collect(),
        http_routes: store
            .http_routes
            .values()
            .filter(|r| accepted(&RouteRefs::of_http(r)))
            .cloned()
            .collect(),
        grpc_routes: store
            .grpc_routes
            .values()
            .filter(|r| accepted(&RouteRefs::of_grpc(r)))
            .cloned()
            .collect(),
        access_policies: store.access_policies.values().cloned().collect(),
        meshed_pods: store
            .pods
            .values()
            .filter(|p| {
                store.namespace_enrolled(&p.namespace)
                    && !p.host_network
                    && !p.is_static()
                    && !p.opted_out()
            })
            .map(|p| p.key())
            .collect(),
        refs,
        proxy_http_routes: routes.http,
        proxy_grpc_routes: routes.grpc,
    };
    (view, routes.evals)
}

/// This node's pods a Service's selector may pick (not finished, not on
/// the host network), by namespace: gathered once per view.
type LocalPods<'a> = BTreeMap<&'a str, Vec<&'a crate::state::Workload>>;

fn local_pods<'a>(store: &'a Store, node: &str) -> LocalPods<'a> {
    let mut out = LocalPods::new();
    for w in store.pods.values() {
        if w.node == node && !w.finished && !w.host_network {
            out.entry(w.namespace.as_str()).or_default().push(w);
        }
    }
    out
}

/// The pods on this node a Service's selector picks, as the EndpointSlice
/// controller would list them, with the pod ports its TCP ports lead to;
/// a pod its TCP ports lead nowhere on is left out (as a Service without
/// TCP ports, or an `ExternalName` one, is: neither governs it). The proxy
/// polices them by these before the controller has listed a new pod: a
/// policy's target must not take every caller while its EndpointSlice lags.
fn selected_pods(
    pods: &LocalPods<'_>,
    key: &Key,
    spec: &k8s_openapi::api::core::v1::ServiceSpec,
) -> Vec<SelectedPod> {
    let Some(selector) = pod_selector(spec) else {
        return Vec::new();
    };
    let tcp = tcp_ports(spec);
    let http: Vec<_> = tcp
        .iter()
        .copied()
        .filter(|p| {
            p.app_protocol
                .as_deref()
                .is_some_and(l7_proxy::config::app_protocol_is_http)
        })
        .collect();
    let opaque: Vec<_> = tcp
        .iter()
        .copied()
        .filter(|p| {
            p.app_protocol
                .as_deref()
                .is_some_and(|a| a.eq_ignore_ascii_case("tcp"))
        })
        .collect();
    let Some(candidates) = pods.get(key.namespace.as_str()) else {
        return Vec::new();
    };
    candidates
        .iter()
        .filter(|w| selects(selector, w))
        .filter_map(|w| {
            let ports = pod_ports(&tcp, w);
            (!ports.is_empty()).then(|| SelectedPod {
                pod: w.key(),
                ports,
                http_ports: pod_ports(&http, w),
                tcp_ports: pod_ports(&opaque, w),
            })
        })
        .collect()
}

/// A Service's pod selector, when it picks pods (has a non-empty one and
/// is not `ExternalName`).
pub(crate) fn pod_selector(
    spec: &k8s_openapi::api::core::v1::ServiceSpec,
) -> Option<&BTreeMap<String, String>> {
    if spec.type_.as_deref() == Some("ExternalName") {
        return None;
    }
    spec.selector.as_ref().filter(|s| !s.is_empty())
}

/// Whether `selector` picks `w`.
pub(crate) fn selects(selector: &BTreeMap<String, String>, w: &crate::state::Workload) -> bool {
    selector.iter().all(|(k, v)| w.labels.get(k) == Some(v))
}

/// A Service's TCP ports (the ones the proxy polices).
pub(crate) fn tcp_ports(
    spec: &k8s_openapi::api::core::v1::ServiceSpec,
) -> Vec<&k8s_openapi::api::core::v1::ServicePort> {
    spec.ports
        .iter()
        .flatten()
        .filter(|p| p.protocol.as_deref().unwrap_or("TCP") == "TCP")
        .collect()
}

/// The pod ports `tcp` lead to on `w`, sorted: a named target port only
/// where the pod declares that name (the EndpointSlice controller leaves
/// the pod out of that port otherwise).
pub(crate) fn pod_ports(
    tcp: &[&k8s_openapi::api::core::v1::ServicePort],
    w: &crate::state::Workload,
) -> Vec<u16> {
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
    let mut ports: Vec<u16> = tcp
        .iter()
        .filter_map(|p| match &p.target_port {
            None => u16::try_from(p.port).ok(),
            Some(IntOrString::Int(i)) => u16::try_from(*i).ok(),
            Some(IntOrString::String(name)) => w.ports.get(name).copied(),
        })
        .collect();
    ports.sort_unstable();
    ports.dedup();
    ports
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        crds::MtlsMode,
        reconcile::workloads::workload_infos,
        state::{Object, Update},
        testing::*,
    };

    /// ClientIP session affinity reaches the proxy with its timeout.
    #[test]
    fn client_ip_affinity_reaches_the_proxy_view() {
        let timeout = |svc: k8s_openapi::api::core::v1::Service| {
            let mut s = Store::new();
            s.apply(Update::Upsert(Object::Service(svc)));
            mesh_view(&s, "n1", "cluster.local", Vec::new(), 1).services[0].affinity_timeout_s
        };
        let mut svc = service("shop", "web", "127.96.0.1", &[80]);
        assert_eq!(timeout(svc.clone()), None);
        let spec = svc.spec.as_mut().unwrap();
        spec.session_affinity = Some("ClientIP".into());
        assert_eq!(timeout(svc.clone()), Some(10_800));
        let spec = svc.spec.as_mut().unwrap();
        spec.session_affinity_config = Some(k8s_openapi::api::core::v1::SessionAffinityConfig {
            client_ip: Some(k8s_openapi::api::core::v1::ClientIPConfig {
                timeout_seconds: Some(60),
            }),
        });
        assert_eq!(timeout(svc), Some(60));
    }

    /// internalTrafficPolicy: Local: the proxy gets this node's endpoints.
    #[test]
    fn a_local_traffic_policy_gives_the_proxy_this_nodes_endpoints_only() {
        let mut s = Store::new();
        let mut svc = service("shop", "web", "127.96.0.1", &[80]);
        svc.spec.as_mut().unwrap().internal_traffic_policy = Some("Local".into());
        for o in [
            Object::Namespace(namespace("shop", true)),
            Object::Pod(workload("shop", "web-0", "web", "10.0.1.5", "n1")),
            Object::Pod(workload("shop", "web-1", "web", "10.0.2.5", "n2")),
            Object::Service(svc),
            Object::EndpointSlice(slice(
                "shop",
                "web-1",
                "web",
                &[8080],
                &[ep_ready("10.0.1.5"), ep_ready("10.0.2.5")],
            )),
        ] {
            s.apply(Update::Upsert(o));
        }
        let w = workload_infos(&s, "n1", "cluster.local", MtlsMode::Permissive);
        let v = mesh_view(&s, "n1", "cluster.local", w, 1);
        let addrs: Vec<SocketAddr> = v.services[0].ports[0]
            .endpoints
            .iter()
            .map(|e| e.addr)
            .collect();
        assert_eq!(addrs, ["10.0.1.5:8080".parse::<SocketAddr>().unwrap()]);
    }

    #[test]
    fn endpoints_carry_node_address_identity_and_enrolment() {
        let mut s = Store::new();
        for o in [
            Object::Namespace(namespace("shop", true)),
            Object::Node(NodeInfo {
                name: "n2".into(),
                addresses: vec!["192.0.2.2".parse().unwrap()],
            }),
            Object::Pod(workload("shop", "web-0", "web", "10.0.2.5", "n2")),
            Object::Service(service("shop", "web", "127.96.0.1", &[80])),
            Object::EndpointSlice(slice(
                "shop",
                "web-1",
                "web",
                &[8080],
                &[ep_ready("10.0.2.5"), ep_ready("10.0.9.9")],
            )),
        ] {
            s.apply(Update::Upsert(o));
        }
        let w = workload_infos(&s, "n1", "cluster.local", MtlsMode::Permissive);
        let v = mesh_view(&s, "n1", "cluster.local", w, 7);
        let svc = &v.services[0];
        assert!(svc.meshed);
        assert_eq!(svc.vips, ["127.96.0.1".parse::<IpAddr>().unwrap()]);
        let eps = &svc.ports[0].endpoints;
        assert_eq!(eps.len(), 2);
        assert_eq!(eps[0].addr, "10.0.2.5:8080".parse().unwrap());
        assert_eq!(eps[0].node.as_deref(), Some("n2"));
        assert_eq!(eps[0].node_address, Some("192.0.2.2".parse().unwrap()));
        assert_eq!(
            eps[0].identity.as_deref(),
            Some("spiffe://cluster.local/ns/shop/sa/web")
        );
        assert!(eps[0].meshed);
        // An address no pod has: not meshed, no identity.
        assert_eq!(eps[1].identity, None);
        assert!(!eps[1].meshed);
    }
}
