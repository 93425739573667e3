//! The node proxy (`l7-proxy`) inside the agent: the agent's mesh view
//! translated into the proxy's [`Snapshot`] and published on a watch channel,
//! the original-destination lookup from ebpf-lb, and what the admin API shows
//! (connections, request counts, metrics).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
};

pub mod routes;

use l7_proxy::config::{
    AccessPolicy, AccessRule, AccessSource, Endpoint, HttpConditions, LocalWorkload, MtlsMode,
    ObjectRef, PathCondition, SelectedBy, Service, ServicePort, Snapshot, SpiffeId, Workload,
};
use prometheus_client::registry::Registry;
use tokio::sync::watch;

use crate::{
    admin::{ProxyHandle, api},
    crds::{self, PathMatchType},
    reconcile::{dataplane::Dataplane, mesh::MeshView},
    state::Key,
};

fn oref(k: &Key) -> ObjectRef {
    ObjectRef::new(&k.namespace, &k.name)
}

fn mode(m: crds::MtlsMode) -> MtlsMode {
    match m {
        crds::MtlsMode::Strict => MtlsMode::Strict,
        crds::MtlsMode::Permissive => MtlsMode::Permissive,
        crds::MtlsMode::Disabled => MtlsMode::Disabled,
    }
}

/// Where a pod's node proxy takes tunnels, if the pod is reached through it.
struct PodInfo {
    key: Key,
    identity: Option<SpiffeId>,
    node_proxy: Option<SocketAddr>,
}

/// The proxy's snapshot of the mesh view, and what could not be translated
/// (an access policy with a bad identity, a pod with a bad SPIFFE ID). What
/// routes leave out is in their status ([`routes`]).
pub fn snapshot(view: &MeshView, inbound_port: u16) -> (Snapshot, Vec<String>) {
    let mut errors = Vec::new();
    // Pods by IP: identity, and the tunnel address when they are meshed and
    // not DISABLED.
    let mut pods: BTreeMap<IpAddr, PodInfo> = BTreeMap::new();
    // Meshed pods on nodes of no known address, by node.
    let mut unplaced: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for w in &view.workloads {
        let key = Key::new(&w.namespace, &w.name);
        let meshed = view.tunnelled(w);
        // Not a pending pod (no node, no address yet): nothing reaches it.
        if meshed && !w.node.is_empty() && !w.ips.is_empty() && view.node_address(&w.node).is_none()
        {
            unplaced.entry(&w.node).or_default().push(key.to_string());
        }
        for ip in w.ips.iter().filter_map(|ip| ip.parse::<IpAddr>().ok()) {
            let node_proxy = meshed
                .then(|| view.node_address(&w.node))
                .flatten()
                .map(|a| SocketAddr::new(a, inbound_port));
            pods.insert(
                ip,
                PodInfo {
                    key: key.clone(),
                    identity: node_proxy.and(w.identity.parse().ok()),
                    node_proxy,
                },
            );
        }
    }
    for (node, pods) in unplaced {
        errors.push(format!(
            "node {node:?} has no known address, so its meshed pods ({}) are reached in \
             plaintext, without mTLS or their AccessPolicies: list it with its address under \
             `nodes:` of a SluiceWorkloads document (files source), or give the Node an address \
             (a cluster)",
            pods.join(", ")
        ));
    }
    let mut snap = Snapshot::default();
    for s in &view.services {
        let mut ports = Vec::new();
        let mut endpoints: BTreeMap<IpAddr, Endpoint> = BTreeMap::new();
        for p in s.ports.iter().filter(|p| p.protocol == "TCP") {
            ports.push(ServicePort {
                port: p.port,
                target_port: p.endpoints.first().map_or(p.port, |e| e.addr.port()),
                app_protocol: p.app_protocol.clone(),
            });
            for e in &p.endpoints {
                let ip = e.addr.ip();
                let pod = pods.get(&ip);
                let ep = endpoints.entry(ip).or_insert_with(|| Endpoint {
                    ip,
                    ready: e.ready,
                    workload: pod.map(|p| oref(&p.key)),
                    node_proxy: pod.and_then(|p| p.node_proxy),
                    identity: pod.and_then(|p| p.identity.clone()),
                    ports: BTreeMap::new(),
                    unready_ports: Vec::new(),
                });
                ep.ready |= e.ready;
                if !e.ready {
                    ep.unready_ports.push(p.port);
                }
                // This pod's own port for this service port: a named target
                // port may resolve differently on each pod.
                ep.ports.insert(p.port, e.addr.port());
            }
        }
        if ports.is_empty() {
            continue;
        }
        // Not ready anywhere: `ready` says it all.
        for ep in endpoints.values_mut().filter(|e| !e.ready) {
            ep.unready_ports.clear();
        }
        snap.services.push(Service {
            id: oref(&s.key),
            vips: s.vips.clone(),
            ports,
            endpoints: endpoints.into_values().collect(),
            affinity_timeout_s: s.affinity_timeout_s,
        });
    }
    for (ip, p) in &pods {
        if p.node_proxy.is_some() {
            snap.workloads.push(Workload {
                ip: *ip,
                id: oref(&p.key),
                node_proxy: p.node_proxy,
                identity: p.identity.clone(),
            });
        }
    }
    // The Services whose selector picks each local pod.
    let mut selected: BTreeMap<Key, Vec<SelectedBy>> = BTreeMap::new();
    for s in &view.services {
        for sel in &s.selects {
            selected
                .entry(sel.pod.clone())
                .or_default()
                .push(SelectedBy {
                    service: oref(&s.key),
                    ports: sel.ports.clone(),
                    http_ports: sel.http_ports.clone(),
                    tcp_ports: sel.tcp_ports.clone(),
                });
        }
    }
    for w in view.workloads.iter().filter(|w| w.local && w.enrolled) {
        let Ok(identity) = w.identity.parse::<SpiffeId>() else {
            errors.push(format!(
                "pod {}/{}: {:?} is not a SPIFFE ID",
                w.namespace, w.name, w.identity
            ));
            continue;
        };
        for ip in w.ips.iter().filter_map(|ip| ip.parse().ok()) {
            snap.local_workloads.push(LocalWorkload {
                ip,
                id: ObjectRef::new(&w.namespace, &w.name),
                service_account: w.service_account.clone(),
                identity: identity.clone(),
                mtls_mode: mode(w.mtls_mode),
                selected_by: selected
                    .get(&Key::new(&w.namespace, &w.name))
                    .cloned()
                    .unwrap_or_default(),
            });
        }
    }
    snap.http_routes = view.proxy_http_routes.clone();
    snap.grpc_routes = view.proxy_grpc_routes.clone();
    for p in &view.access_policies {
        snap.access_policies.extend(access_policies(p, &mut errors));
    }
    (snap, errors)
}

/// One proxy policy per target; one proxy rule per operation of a rule.
pub fn access_policies(p: &crds::AccessPolicy, errors: &mut Vec<String>) -> Vec<AccessPolicy> {
    let key = Key::of(p);
    let mut rules = Vec::new();
    'rules: for r in &p.spec.rules {
        let mut from = Vec::new();
        for s in &r.from {
            if let Some(id) = &s.identity {
                match id.parse::<SpiffeId>() {
                    Ok(id) => from.push(AccessSource::Identity(id)),
                    // The rule is left out, never kept without the caller it
                    // named: with no caller left it would allow every one.
                    Err(e) => {
                        errors.push(format!("AccessPolicy {key}: {e}; the rule is left out"));
                        continue 'rules;
                    }
                }
            }
            if let Some(ns) = &s.namespace {
                from.push(AccessSource::Namespace(ns.clone()));
            }
            if let Some(sa) = &s.service_account {
                from.push(AccessSource::ServiceAccount(ObjectRef::new(
                    sa.namespace.as_deref().unwrap_or(&key.namespace),
                    &sa.name,
                )));
            }
        }
        if r.to.is_empty() {
            rules.push(AccessRule { from, to: None });
            continue;
        }
        for op in &r.to {
            let mut paths = Vec::new();
            for m in &op.paths {
                match m.kind {
                    // A `*` in an exact path is literal (`/files/*` is not
                    // all of `/files`).
                    PathMatchType::Exact => paths.push(PathCondition::Exact(m.value.clone())),
                    // Gateway API prefixes match whole segments: `/a` covers
                    // `/a` and `/a/...`.
                    PathMatchType::PathPrefix => {
                        paths.push(PathCondition::Subtree(m.value.clone()))
                    }
                }
            }
            rules.push(AccessRule {
                from: from.clone(),
                to: Some(HttpConditions {
                    methods: op.methods.clone(),
                    paths,
                }),
            });
        }
    }
    p.spec
        .target_refs
        .iter()
        .map(|t| AccessPolicy {
            id: oref(&key),
            target: ObjectRef::new(&key.namespace, &t.name),
            rules: rules.clone(),
        })
        .collect()
}

/// Translates every new mesh view into a snapshot for the proxy, until the
/// view channel closes.
pub fn spawn_translator(
    mut views: watch::Receiver<Arc<MeshView>>,
    snapshots: watch::Sender<Arc<Snapshot>>,
    inbound_port: u16,
    problems: watch::Sender<Vec<String>>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut last_errors: BTreeSet<String> = BTreeSet::new();
        loop {
            let view = views.borrow_and_update().clone();
            let (snap, errors) = snapshot(&view, inbound_port);
            let errors: BTreeSet<String> = errors.into_iter().collect();
            for e in errors.difference(&last_errors) {
                tracing::warn!("proxy configuration: {e}");
            }
            problems.send_replace(errors.iter().cloned().collect());
            last_errors = errors;
            snapshots.send_if_modified(|cur| {
                if **cur == snap {
                    false
                } else {
                    *cur = Arc::new(snap);
                    true
                }
            });
            if views.changed().await.is_err() {
                return;
            }
        }
    })
}

/// Original destinations of captured connections, from ebpf-lb's sockops map.
pub struct LbOriginalDst(pub Arc<dyn Dataplane>);

impl l7_proxy::OriginalDst for LbOriginalDst {
    fn lookup(&self, peer: SocketAddr, local: SocketAddr) -> Option<SocketAddr> {
        self.0.original_destination(peer, local)
    }
}

/// The embedded proxy, as the admin API sees it.
pub struct EmbeddedProxy {
    pub proxy: l7_proxy::Proxy,
    pub registry: Mutex<Registry>,
    /// What the last snapshot left out, and why.
    pub problems: watch::Receiver<Vec<String>>,
}

fn rfc3339_unix(secs: u64) -> Option<String> {
    let t = time::OffsetDateTime::from_unix_timestamp(i64::try_from(secs).ok()?).ok()?;
    t.format(&time::format_description::well_known::Rfc3339)
        .ok()
}

/// Sums `sluice_requests_total`, and the failed ones (a 5xx status class, or
/// a gRPC call whose `grpc_status` is neither `0`, OK, nor `1`, CANCELLED:
/// a caller that went away, as the `cancelled` status class is for other
/// requests), by route
/// (`namespace/name` of the HTTPRoute or GRPCRoute), or by
/// `namespace/name#default` for a Service's default route (so that a route
/// named as its Service is counted apart), from the proxy's metrics text.
/// The proxy labels a route's rules `<route>#<rule>` and a Service's default
/// route `<service>`.
pub fn request_stats(text: &str) -> BTreeMap<String, (u64, u64)> {
    let mut out: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    for line in text
        .lines()
        .filter(|l| l.starts_with("sluice_requests_total{"))
    {
        let Some((labels, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(v) = value.parse::<f64>() else {
            continue;
        };
        let label = |name: &str| {
            let pat = format!("{name}=\"");
            labels.find(&pat).map(|i| {
                let rest = &labels[i + pat.len()..];
                rest[..rest.find('"').unwrap_or(rest.len())].to_string()
            })
        };
        let Some(route) = label("route") else {
            continue;
        };
        let key = match route.split_once('#') {
            Some((owner, _rule)) => owner.to_string(),
            // Inbound requests have no route.
            None if route.is_empty() => continue,
            None => format!("{route}#default"),
        };
        let e = out.entry(key).or_default();
        e.0 += v as u64;
        if label("status_class").is_some_and(|c| c.starts_with('5'))
            || label("grpc_status").is_some_and(|c| c != "0" && c != "1")
        {
            e.1 += v as u64;
        }
    }
    out
}

impl EmbeddedProxy {
    fn metrics_text(&self) -> String {
        let registry = self.registry.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode_registry(&mut out, &registry);
        out
    }
}

impl ProxyHandle for EmbeddedProxy {
    fn connections(&self) -> Vec<api::ConnectionInfo> {
        self.proxy
            .connections()
            .into_iter()
            .map(|c| {
                let v = serde_json::to_value(c.kind).unwrap_or_default();
                let kind = v.as_str().unwrap_or("");
                let m = &c.meta;
                api::ConnectionInfo {
                    direction: if kind.starts_with("outbound") || kind == "tunnel-out" {
                        "outbound".into()
                    } else {
                        "inbound".into()
                    },
                    source_addr: m.source_addr.map_or_else(|| "-".into(), |a| a.to_string()),
                    source_workload: m.source_workload.as_ref().map(ToString::to_string),
                    source_identity: m.source_identity.as_ref().map(ToString::to_string),
                    destination_addr: m
                        .destination_addr
                        .map_or_else(|| "-".into(), |a| a.to_string()),
                    destination_workload: m.destination.as_ref().map(ToString::to_string),
                    destination_identity: m.destination_identity.as_ref().map(ToString::to_string),
                    mtls: c.secured,
                    mtls_pending: c.pending,
                    requests_mtls: c.requests.map(|r| r.mtls),
                    requests_plaintext: c.requests.map(|r| r.plaintext),
                    several_identities: c.several_identities,
                    mixed_tls: c.mixed_tls,
                    tls_version: m.tls.as_ref().map(|t| t.version.clone()),
                    cipher: m.tls.as_ref().map(|t| t.cipher_suite.clone()),
                    peer_cert_expiry: m
                        .tls
                        .as_ref()
                        .and_then(|t| t.peer_cert_not_after)
                        .and_then(rfc3339_unix),
                    protocol: Some(kind.to_string()),
                    bytes_sent: c.bytes_sent,
                    bytes_received: c.bytes_received,
                }
            })
            .collect()
    }

    fn route_stats(&self) -> BTreeMap<String, (u64, u64)> {
        request_stats(&self.metrics_text())
    }

    fn encode_metrics(&self, out: &mut String) {
        out.push_str(&self.metrics_text());
    }

    fn config_problems(&self) -> Vec<String> {
        self.problems.borrow().clone()
    }
}

#[cfg(test)]
mod tests;
