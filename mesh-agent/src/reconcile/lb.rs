//! Services and EndpointSlices -> ebpf-lb service entries, and the per-service
//! diff against what the kernel holds.
//!
//! Each Service yields one [`ServiceSpec`] per (ClusterIP, port). Only dirty
//! Services are derived again, and only entries that differ from what was
//! applied become [`Change`]s, so an EndpointSlice change touches only its
//! Service's frontends.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use ebpf_lb::{Backend, BackendState, Change, Frontend, Protocol, ServiceSpec};
use k8s_openapi::{
    api::discovery::v1::{EndpointConditions, EndpointPort},
    apimachinery::pkg::util::intstr::IntOrString,
};

use crate::{
    config,
    crds::FieldError,
    state::{Key, Store},
};

fn field(field: impl Into<String>, message: impl Into<String>) -> FieldError {
    FieldError {
        field: field.into(),
        message: message.into(),
    }
}

/// Maps EndpointSlice conditions to a backend state. Per the API, an unknown
/// `ready` counts as ready and an unknown `terminating` as not terminating.
pub fn backend_state(c: Option<&EndpointConditions>) -> BackendState {
    let ready = c.and_then(|c| c.ready).unwrap_or(true);
    let terminating = c.and_then(|c| c.terminating).unwrap_or(false);
    if terminating {
        BackendState::Terminating
    } else if ready {
        BackendState::Ready
    } else {
        BackendState::NotReady
    }
}

pub(crate) fn serving(c: Option<&EndpointConditions>) -> bool {
    c.and_then(|c| c.serving.or(c.ready)).unwrap_or(true)
}

/// The cluster IPs a Service's manifest gives, as written: `clusterIPs`
/// when listed (the API server's form), else `clusterIP` (hand-written
/// manifests often set only that one); `true` when from the list.
pub(crate) fn cluster_ips(spec: &k8s_openapi::api::core::v1::ServiceSpec) -> (Vec<&str>, bool) {
    match (&spec.cluster_ips, &spec.cluster_ip) {
        (Some(ips), _) if !ips.is_empty() => (ips.iter().map(String::as_str).collect(), true),
        (_, Some(ip)) => (vec![ip.as_str()], false),
        _ => (Vec::new(), true),
    }
}

/// The load-balancer entries a Service should have now: empty for a Service
/// that is gone, headless or ExternalName.
/// The kernel entries of Service `key` on node `node` (whose endpoints a
/// Service with `internalTrafficPolicy: Local` keeps to).
pub fn desired_specs(
    store: &Store,
    key: &Key,
    node: &str,
) -> Result<Vec<ServiceSpec>, Vec<FieldError>> {
    let Some(svc) = store.services.get(key) else {
        return Ok(Vec::new());
    };
    let Some(spec) = &svc.spec else {
        return Ok(Vec::new());
    };
    if spec.type_.as_deref() == Some("ExternalName") {
        return Ok(Vec::new());
    }
    let mut errors = Vec::new();
    let (ips, list) = cluster_ips(spec);
    // The API server keeps the two fields equal; a manifest edited by hand
    // may not, and the kernel and the proxy must not read different ones.
    if let (Some(primary), Some(ip)) = (
        spec.cluster_ips.as_ref().and_then(|ips| ips.first()),
        &spec.cluster_ip,
    ) && primary != ip
    {
        errors.push(field(
            "spec.clusterIP",
            format!(
                "{ip:?} differs from spec.clusterIPs[0] {primary:?}; the first of \
                 clusterIPs is the Service's clusterIP: change both, or give only one"
            ),
        ));
    }
    let mut vips: Vec<IpAddr> = Vec::new();
    for (i, ip) in ips.iter().enumerate() {
        if ip.is_empty() || *ip == "None" {
            continue; // headless
        }
        let at = if list {
            format!("spec.clusterIPs[{i}]")
        } else {
            "spec.clusterIP".to_string()
        };
        match ip.parse::<IpAddr>() {
            Ok(ip) if vips.contains(&ip) => {
                errors.push(field(at, format!("{ip} is listed twice")));
            }
            // The kernel keys it as the IPv4 address: two spellings of one
            // VIP would be two Services here and one there.
            Ok(IpAddr::V6(v6)) if v6.to_ipv4_mapped().is_some() => errors.push(field(
                at,
                format!(
                    "{v6} is an IPv4-mapped IPv6 address; write it as {}",
                    v6.to_ipv4_mapped()
                        .map_or_else(String::new, |v4| v4.to_string())
                ),
            )),
            Ok(ip) if !ip.is_unspecified() => vips.push(ip),
            _ => errors.push(field(at, format!("{ip:?} is not an IP address"))),
        }
    }
    // Only this node's endpoints (a node-local agent, say); with none here,
    // connections are refused rather than sent to another node.
    let local_only = (spec.internal_traffic_policy.as_deref() == Some("Local")).then_some(node);
    let affinity = match spec.session_affinity.as_deref() {
        Some("ClientIP") => {
            let t = spec
                .session_affinity_config
                .as_ref()
                .and_then(|c| c.client_ip.as_ref())
                .and_then(|c| c.timeout_seconds);
            match t {
                None => Some(config::DEFAULT_AFFINITY_TIMEOUT),
                Some(t) if (1..=86_400).contains(&t) => Some(Duration::from_secs(t as u64)),
                Some(t) => {
                    errors.push(field(
                        "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
                        format!("{t} is out of range (1 to 86400)"),
                    ));
                    None
                }
            }
        }
        None | Some("None") => None,
        Some(other) => {
            errors.push(field(
                "spec.sessionAffinity",
                format!("unknown session affinity {other:?}: use None or ClientIP"),
            ));
            None
        }
    };
    let meshed = store.namespace_enrolled(&key.namespace);
    let ports = spec.ports.as_deref().unwrap_or_default();
    // As Kubernetes requires: endpoints are matched to a Service's ports by
    // name, so a manifest from files with unnamed or repeated names would
    // send one port's connections to another's target.
    if !vips.is_empty() && ports.is_empty() {
        errors.push(field(
            "spec.ports",
            "a Service with a ClusterIP needs at least one port",
        ));
    }
    for (p, port) in ports.iter().enumerate() {
        let name = port.name.as_deref().unwrap_or("");
        if ports.len() > 1 && name.is_empty() {
            errors.push(field(
                format!("spec.ports[{p}].name"),
                "required when a Service has more than one port (endpoints name the port they \
                 serve)",
            ));
        } else if let Some(first) = ports[..p]
            .iter()
            .position(|q| !name.is_empty() && q.name.as_deref() == Some(name))
        {
            errors.push(field(
                format!("spec.ports[{p}].name"),
                format!("{name:?} is already spec.ports[{first}]'s name; names must be unique"),
            ));
        }
    }
    // Port names as the Service has them (its EndpointSlices may still
    // have others: they are rewritten after the Service, a moment later).
    let names: BTreeSet<&str> = ports
        .iter()
        .map(|p| p.name.as_deref().unwrap_or(""))
        .collect();
    let mut out = Vec::new();
    for (p, port) in spec.ports.iter().flatten().enumerate() {
        let protocol = match port.protocol.as_deref().unwrap_or("TCP") {
            "TCP" => Protocol::Tcp,
            "UDP" => Protocol::Udp,
            "SCTP" => continue, // not balanced by the socket programs
            other => {
                errors.push(field(
                    format!("spec.ports[{p}].protocol"),
                    format!("unknown protocol {other:?}"),
                ));
                continue;
            }
        };
        let Ok(number) = u16::try_from(port.port) else {
            errors.push(field(
                format!("spec.ports[{p}].port"),
                format!("{} is not a port number", port.port),
            ));
            continue;
        };
        if number == 0 {
            errors.push(field(format!("spec.ports[{p}].port"), "port 0"));
            continue;
        }
        // Kubernetes refuses two ports with one number and protocol; a
        // manifest read from files gets the same answer instead of one
        // silently winning.
        if let Some(first) = spec.ports.iter().flatten().take(p).position(|q| {
            q.port == port.port
                && q.protocol.as_deref().unwrap_or("TCP")
                    == port.protocol.as_deref().unwrap_or("TCP")
        }) {
            errors.push(field(
                format!("spec.ports[{p}].port"),
                format!(
                    "port {number}/{} is already spec.ports[{first}]; each port and protocol \
                     may appear once",
                    port.protocol.as_deref().unwrap_or("TCP")
                ),
            ));
            continue;
        }
        let name = port.name.as_deref().unwrap_or("");
        // A port renamed (or named, as a second port requires) finds none
        // of its endpoints in a slice not rewritten yet: the endpoints of
        // the name it had there are kept for the connections they carry.
        let renamed = Renamed {
            names: &names,
            target: match &port.target_port {
                None => Some(number),
                Some(IntOrString::Int(0)) => Some(number),
                Some(IntOrString::String(s)) if s.is_empty() => Some(number),
                Some(IntOrString::Int(t)) => u16::try_from(*t).ok(),
                Some(IntOrString::String(_)) => None,
            },
        };
        for vip in &vips {
            let backends = backends_for(store, key, *vip, name, protocol, local_only, &renamed);
            out.push(ServiceSpec {
                frontend: Frontend {
                    vip: SocketAddr::new(*vip, number),
                    protocol,
                },
                backends,
                // The kernel only redirects TCP to the proxy.
                meshed: meshed && protocol == Protocol::Tcp,
                affinity,
            });
        }
    }
    if errors.is_empty() {
        out.sort_by_key(|s| s.frontend);
        Ok(out)
    } else {
        Err(errors)
    }
}

/// What a Service port may have been called in a slice not rewritten yet.
struct Renamed<'a> {
    /// The Service's port names.
    names: &'a BTreeSet<&'a str>,
    /// Its target port, when a number.
    target: Option<u16>,
}

impl Renamed<'_> {
    /// In a slice whose ports (`all`; `same`: those of the port's protocol)
    /// do not name the port: the one it had there, named by no port of the
    /// Service: the one numbered as its target, or, for a target by name,
    /// the one name left over when the port is the one without a match.
    fn former<'p>(
        &self,
        all: &[&'p EndpointPort],
        same: &[&'p EndpointPort],
    ) -> Option<&'p EndpointPort> {
        let stale: Vec<&EndpointPort> = same
            .iter()
            .copied()
            .filter(|p| !self.names.contains(port_name(p)))
            .collect();
        match self.target {
            Some(t) => stale
                .into_iter()
                .find(|p| p.port.and_then(|n| u16::try_from(n).ok()) == Some(t)),
            None => {
                let unmatched = self
                    .names
                    .iter()
                    .filter(|n| !all.iter().any(|p| port_name(p) == **n))
                    .count();
                (stale.len() == 1 && unmatched == 1).then(|| stale[0])
            }
        }
    }
}

/// A slice port's name (`""` for an unnamed one).
fn port_name(p: &EndpointPort) -> &str {
    p.name.as_deref().unwrap_or("")
}

/// Backends of one service port from all its EndpointSlices of the VIP's
/// family, sorted and deduplicated (an address keeps its best state).
///
/// In a slice that does not name the port yet (see [`Renamed::former`])
/// the endpoints of its former name are kept as terminating: the
/// connections they carry stay (removed backends' sockets are reset) and
/// new ones are refused until the slices follow, as kube-proxy's conntrack
/// entries keep established flows while the renamed port has no endpoints.
fn backends_for(
    store: &Store,
    key: &Key,
    vip: IpAddr,
    name: &str,
    protocol: Protocol,
    local_only: Option<&str>,
    renamed: &Renamed<'_>,
) -> Vec<Backend> {
    let family = if vip.is_ipv4() { "IPv4" } else { "IPv6" };
    let proto = protocol.to_string();
    let mut found: BTreeMap<SocketAddr, (BackendState, bool)> = BTreeMap::new();
    for slice in store.slices_of(key) {
        if slice.address_type != family {
            continue;
        }
        let all: Vec<&EndpointPort> = slice.ports.iter().flatten().collect();
        let same: Vec<&EndpointPort> = all
            .iter()
            .copied()
            .filter(|p| p.protocol.as_deref().unwrap_or("TCP") == proto)
            .collect();
        let (port, kept) = match same.iter().find(|p| port_name(p) == name) {
            Some(p) => (*p, false),
            None => match renamed.former(&all, &same) {
                Some(p) => (p, true),
                None => continue,
            },
        };
        let Some(number) = port
            .port
            .and_then(|p| u16::try_from(p).ok())
            .filter(|p| *p != 0)
        else {
            continue;
        };
        for ep in &slice.endpoints {
            if local_only.is_some_and(|n| ep.node_name.as_deref() != Some(n)) {
                continue;
            }
            let (state, serving) = if kept {
                (BackendState::Terminating, false)
            } else {
                (
                    backend_state(ep.conditions.as_ref()),
                    serving(ep.conditions.as_ref()),
                )
            };
            for a in &ep.addresses {
                let Ok(ip) = a.parse::<IpAddr>() else {
                    continue;
                };
                if ip.is_ipv4() != vip.is_ipv4() {
                    continue;
                }
                let addr = SocketAddr::new(ip, number);
                let e = found.entry(addr).or_insert((state, serving));
                if state == BackendState::Ready {
                    *e = (state, serving);
                }
            }
        }
    }
    // As kube-proxy does: with no ready endpoint, serving terminating ones
    // still take connections rather than refusing them all.
    let any_ready = found.values().any(|(s, _)| *s == BackendState::Ready);
    found
        .into_iter()
        .map(|(addr, (state, serving))| {
            let state = if !any_ready && state == BackendState::Terminating && serving {
                BackendState::Ready
            } else {
                state
            };
            Backend { addr, state }
        })
        .collect()
}

fn ready_addrs(spec: &ServiceSpec) -> BTreeSet<SocketAddr> {
    spec.backends
        .iter()
        .filter(|b| b.state == BackendState::Ready)
        .map(|b| b.addr)
        .collect()
}

/// What to do for one Service.
#[derive(Clone, Debug, PartialEq)]
pub struct ServicePlan {
    pub service: Key,
    /// Removals first, then upserts.
    pub changes: Vec<Change>,
    /// The entries the Service has once `changes` are applied.
    pub next: Vec<ServiceSpec>,
    /// Ready backends that left a frontend (existing connections to them may
    /// be reset by the caller).
    pub removed_backends: Vec<(Frontend, SocketAddr)>,
}

/// The outcome of planning a set of dirty Services.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Plan {
    /// Services with something to change.
    pub services: Vec<ServicePlan>,
    /// Services whose new version is invalid: they keep what they have.
    pub errors: BTreeMap<Key, Vec<FieldError>>,
    /// Services whose new version is valid and already applied (their errors
    /// are cleared).
    pub unchanged: Vec<Key>,
}

impl Plan {
    /// Every change of the plan, removals first (a frontend may move from one
    /// Service to another within one batch).
    pub fn changes(&self) -> Vec<Change> {
        let mut removes: Vec<Change> = Vec::new();
        let mut upserts: Vec<Change> = Vec::new();
        for p in &self.services {
            for c in &p.changes {
                match c {
                    Change::Remove(_) => removes.push(c.clone()),
                    Change::Upsert(_) => upserts.push(c.clone()),
                }
            }
        }
        removes.extend(upserts);
        removes
    }
}

/// What has been applied to the kernel, per Service.
#[derive(Clone, Debug, Default)]
pub struct LbState {
    applied: BTreeMap<Key, Vec<ServiceSpec>>,
    owner: BTreeMap<Frontend, Key>,
}

impl LbState {
    pub fn applied(&self) -> &BTreeMap<Key, Vec<ServiceSpec>> {
        &self.applied
    }

    /// Every frontend the agent has programmed.
    pub fn frontends(&self) -> impl Iterator<Item = (&Frontend, &Key)> {
        self.owner.iter()
    }

    /// Plans the changes for `dirty` Services.
    pub fn plan(&self, store: &Store, dirty: &BTreeSet<Key>, node: &str) -> Plan {
        let mut plan = Plan::default();
        let mut desired: BTreeMap<&Key, Vec<ServiceSpec>> = BTreeMap::new();
        for key in dirty {
            match desired_specs(store, key, node) {
                Ok(specs) => {
                    desired.insert(key, specs);
                }
                Err(e) => {
                    plan.errors.insert(key.clone(), e);
                }
            }
        }
        // Frontends dirty Services give up in this round may be claimed by
        // another dirty Service.
        let mut released: BTreeSet<Frontend> = BTreeSet::new();
        for (key, specs) in &desired {
            for old in self.applied.get(*key).into_iter().flatten() {
                if !specs.iter().any(|s| s.frontend == old.frontend) {
                    released.insert(old.frontend);
                }
            }
        }
        let mut claimed: BTreeMap<Frontend, &Key> = BTreeMap::new();
        for (key, specs) in desired {
            let conflict = specs.iter().find_map(|s| {
                let other = match self.owner.get(&s.frontend) {
                    Some(o) if o != key && !released.contains(&s.frontend) => Some(o),
                    _ => claimed.get(&s.frontend).copied().filter(|o| *o != key),
                };
                other.map(|o| (s.frontend, o.clone()))
            });
            if let Some((fe, other)) = conflict {
                plan.errors.insert(
                    key.clone(),
                    vec![field(
                        "spec.clusterIPs",
                        format!(
                            "{fe} already belongs to Service {other}; ClusterIPs must be unique"
                        ),
                    )],
                );
                continue;
            }
            for s in &specs {
                claimed.insert(s.frontend, key);
            }
            let old = self.applied.get(key).map(Vec::as_slice).unwrap_or_default();
            let mut sp = ServicePlan {
                service: key.clone(),
                changes: Vec::new(),
                next: specs.clone(),
                removed_backends: Vec::new(),
            };
            for o in old {
                match specs.iter().find(|s| s.frontend == o.frontend) {
                    // Another Service took the frontend since (this one's
                    // earlier removal failed and the other's upsert went in):
                    // its entry is not this Service's to remove.
                    None if self.owner.get(&o.frontend).is_some_and(|w| w != key) => {}
                    None => {
                        sp.changes.push(Change::Remove(o.frontend));
                        sp.removed_backends
                            .extend(ready_addrs(o).into_iter().map(|a| (o.frontend, a)));
                    }
                    Some(n) => {
                        let now = ready_addrs(n);
                        sp.removed_backends.extend(
                            ready_addrs(o)
                                .into_iter()
                                .filter(|a| !now.contains(a))
                                .map(|a| (o.frontend, a)),
                        );
                    }
                }
            }
            for s in specs {
                if !old.contains(&s) {
                    sp.changes.push(Change::Upsert(s));
                }
            }
            if sp.changes.is_empty() {
                plan.unchanged.push(key.clone());
            } else {
                plan.services.push(sp);
            }
        }
        plan
    }

    /// Records that `p`'s changes are in the kernel.
    pub fn commit(&mut self, p: &ServicePlan) {
        if let Some(old) = self.applied.remove(&p.service) {
            for s in old {
                if self.owner.get(&s.frontend) == Some(&p.service) {
                    self.owner.remove(&s.frontend);
                }
            }
        }
        for s in &p.next {
            self.owner.insert(s.frontend, p.service.clone());
        }
        if !p.next.is_empty() {
            self.applied.insert(p.service.clone(), p.next.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::{ClientIPConfig, SessionAffinityConfig};

    use super::*;
    use crate::{
        state::{Object, Update},
        testing::*,
    };

    fn store_with(objs: Vec<Object>) -> Store {
        let mut s = Store::new();
        for o in objs {
            s.apply(Update::Upsert(o));
        }
        s
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn conditions_map_to_backend_states() {
        let st = |r, s, t| {
            backend_state(Some(&EndpointConditions {
                ready: r,
                serving: s,
                terminating: t,
            }))
        };
        assert_eq!(st(Some(true), Some(true), Some(false)), BackendState::Ready);
        assert_eq!(st(None, None, None), BackendState::Ready);
        assert_eq!(st(Some(false), Some(false), None), BackendState::NotReady);
        assert_eq!(
            st(Some(false), Some(true), Some(true)),
            BackendState::Terminating
        );
        assert_eq!(backend_state(None), BackendState::Ready);
    }

    /// internalTrafficPolicy: Local keeps a Service to this node's
    /// endpoints (none here: refused, not sent to another node).
    #[test]
    fn a_local_traffic_policy_keeps_to_this_nodes_endpoints() {
        let mut svc = service("shop", "web", "127.96.0.10", &[80]);
        svc.spec.as_mut().unwrap().internal_traffic_policy = Some("Local".into());
        let on = |ip: &str, node: &str| k8s_openapi::api::discovery::v1::Endpoint {
            node_name: Some(node.into()),
            ..ep_ready(ip)
        };
        let s = store_with(vec![
            Object::Namespace(namespace("shop", false)),
            Object::Service(svc),
            Object::EndpointSlice(slice(
                "shop",
                "web-1",
                "web",
                &[8080],
                &[on("10.0.0.1", "n1"), on("10.0.0.9", "n2")],
            )),
        ]);
        let spec = &desired_specs(&s, &Key::new("shop", "web"), "n1").unwrap()[0];
        assert_eq!(spec.backends, vec![Backend::ready(addr("10.0.0.1:8080"))]);
        let spec = &desired_specs(&s, &Key::new("shop", "web"), "n3").unwrap()[0];
        assert_eq!(spec.backends, vec![]);
    }

    /// A port named or renamed in the Service before its slices are
    /// rewritten (a second port added makes the first need a name) keeps
    /// the endpoints of its former name as terminating, so its connections
    /// are not reset; the new port gets none it did not have.
    #[test]
    fn a_renamed_port_keeps_its_endpoints_connections_until_the_slices_follow() {
        let mut svc = service("shop", "web", "127.96.0.10", &[80, 9090]);
        // Both target ports given as numbers, and by name for a second case.
        for (i, t) in [(0, 8080), (1, 9090)] {
            svc.spec.as_mut().unwrap().ports.as_mut().unwrap()[i].target_port =
                Some(IntOrString::Int(t));
        }
        let stale = || {
            Object::EndpointSlice(slice(
                "shop",
                "web-1",
                "web",
                &[8080],
                &[ep_ready("10.0.0.2"), ep_ready("10.0.0.3")],
            ))
        };
        let s = store_with(vec![
            Object::Namespace(namespace("shop", false)),
            Object::Service(svc.clone()),
            stale(),
        ]);
        let specs = desired_specs(&s, &Key::new("shop", "web"), "n1").unwrap();
        let kept = |a: &str| Backend {
            addr: addr(a),
            state: BackendState::Terminating,
        };
        assert_eq!(
            specs[0].backends,
            vec![kept("10.0.0.2:8080"), kept("10.0.0.3:8080")]
        );
        assert_eq!(specs[1].backends, vec![], "9090 had none");

        // A target by name: the one port without a match takes the one name
        // left over.
        let mut one = service("shop", "web", "127.96.0.10", &[80]);
        let p = &mut one.spec.as_mut().unwrap().ports.as_mut().unwrap()[0];
        p.name = Some("http".into());
        p.target_port = Some(IntOrString::String("http".into()));
        let s = store_with(vec![
            Object::Namespace(namespace("shop", false)),
            Object::Service(one),
            stale(),
        ]);
        let specs = desired_specs(&s, &Key::new("shop", "web"), "n1").unwrap();
        assert_eq!(
            specs[0].backends,
            vec![kept("10.0.0.2:8080"), kept("10.0.0.3:8080")]
        );

        // Slices rewritten one by one (more than 100 endpoints, or one per
        // address family): the one not rewritten yet keeps its endpoints'
        // connections while the other's serve.
        let mut one_fresh = slice("shop", "web-2", "web", &[8080], &[ep_ready("10.0.0.4")]);
        one_fresh.ports.as_mut().unwrap()[0].name = Some("p80".into());
        let s = store_with(vec![
            Object::Namespace(namespace("shop", false)),
            Object::Service(svc.clone()),
            stale(),
            Object::EndpointSlice(one_fresh),
        ]);
        let specs = desired_specs(&s, &Key::new("shop", "web"), "n1").unwrap();
        assert_eq!(
            specs[0].backends,
            vec![
                kept("10.0.0.2:8080"),
                kept("10.0.0.3:8080"),
                Backend::ready(addr("10.0.0.4:8080"))
            ]
        );

        // Slices that name the port: as ever.
        let mut fresh = slice(
            "shop",
            "web-1",
            "web",
            &[8080, 9090],
            &[ep_ready("10.0.0.2")],
        );
        for (p, n) in fresh
            .ports
            .as_mut()
            .unwrap()
            .iter_mut()
            .zip(["p80", "p9090"])
        {
            p.name = Some(n.into());
        }
        let s = store_with(vec![
            Object::Namespace(namespace("shop", false)),
            Object::Service(svc),
            Object::EndpointSlice(fresh),
        ]);
        let specs = desired_specs(&s, &Key::new("shop", "web"), "n1").unwrap();
        assert_eq!(
            specs[0].backends,
            vec![Backend::ready(addr("10.0.0.2:8080"))]
        );
        assert_eq!(
            specs[1].backends,
            vec![Backend::ready(addr("10.0.0.2:9090"))]
        );
    }

    #[test]
    fn a_service_becomes_one_entry_per_port_with_its_slice_endpoints() {
        let s = store_with(vec![
            Object::Namespace(namespace("shop", true)),
            Object::Service(service("shop", "web", "127.96.0.10", &[80])),
            Object::EndpointSlice(slice(
                "shop",
                "web-1",
                "web",
                &[8080],
                &[
                    ep_ready("10.0.0.2"),
                    ep("10.0.0.3", Some(false), Some(false), Some(false)),
                    ep("10.0.0.4", Some(false), Some(true), Some(true)),
                ],
            )),
            Object::EndpointSlice(slice(
                "shop",
                "web-2",
                "web",
                &[8080],
                &[ep_ready("10.0.0.1")],
            )),
        ]);
        let specs = desired_specs(&s, &Key::new("shop", "web"), "n1").unwrap();
        assert_eq!(specs.len(), 1);
        let spec = &specs[0];
        assert_eq!(spec.frontend, Frontend::tcp(addr("127.96.0.10:80")));
        assert!(spec.meshed);
        assert_eq!(spec.affinity, None);
        assert_eq!(
            spec.backends,
            vec![
                Backend::ready(addr("10.0.0.1:8080")),
                Backend::ready(addr("10.0.0.2:8080")),
                Backend {
                    addr: addr("10.0.0.3:8080"),
                    state: BackendState::NotReady
                },
                Backend {
                    addr: addr("10.0.0.4:8080"),
                    state: BackendState::Terminating
                },
            ]
        );
    }

    #[test]
    fn serving_terminating_endpoints_are_used_when_nothing_is_ready() {
        let s = store_with(vec![
            Object::Service(service("shop", "web", "127.96.0.10", &[80])),
            Object::EndpointSlice(slice(
                "shop",
                "web-1",
                "web",
                &[8080],
                &[
                    ep("10.0.0.4", Some(false), Some(true), Some(true)),
                    ep("10.0.0.5", Some(false), Some(false), Some(true)),
                ],
            )),
        ]);
        let spec = &desired_specs(&s, &Key::new("shop", "web"), "n1").unwrap()[0];
        assert!(!spec.meshed, "namespace not enrolled");
        assert_eq!(spec.backends[0], Backend::ready(addr("10.0.0.4:8080")));
        assert_eq!(spec.backends[1].state, BackendState::Terminating);
    }

    #[test]
    fn named_ports_pick_the_matching_slice_port_and_affinity_is_mapped() {
        let mut svc = service("shop", "web", "127.96.0.10", &[80, 443]);
        let spec = svc.spec.as_mut().unwrap();
        spec.session_affinity = Some("ClientIP".into());
        spec.session_affinity_config = Some(SessionAffinityConfig {
            client_ip: Some(ClientIPConfig {
                timeout_seconds: Some(60),
            }),
        });
        let mut sl = slice(
            "shop",
            "web-1",
            "web",
            &[8080, 8443],
            &[ep_ready("10.0.0.2")],
        );
        for (p, n) in sl.ports.as_mut().unwrap().iter_mut().zip(["p80", "p443"]) {
            p.name = Some(n.into());
        }
        let s = store_with(vec![Object::Service(svc), Object::EndpointSlice(sl)]);
        let specs = desired_specs(&s, &Key::new("shop", "web"), "n1").unwrap();
        let by_port: BTreeMap<u16, SocketAddr> = specs
            .iter()
            .map(|s| (s.frontend.vip.port(), s.backends[0].addr))
            .collect();
        assert_eq!(by_port[&80], addr("10.0.0.2:8080"));
        assert_eq!(by_port[&443], addr("10.0.0.2:8443"));
        assert!(
            specs
                .iter()
                .all(|s| s.affinity == Some(Duration::from_secs(60)))
        );
    }

    #[test]
    fn headless_and_bad_services() {
        let mut headless = service("shop", "h", "None", &[80]);
        headless.spec.as_mut().unwrap().cluster_ips = Some(vec!["None".into()]);
        let bad = service("shop", "bad", "10.0.0.300", &[80]);
        let s = store_with(vec![Object::Service(headless), Object::Service(bad)]);
        assert_eq!(
            desired_specs(&s, &Key::new("shop", "h"), "n1").unwrap(),
            vec![]
        );
        let e = desired_specs(&s, &Key::new("shop", "bad"), "n1").unwrap_err();
        assert_eq!(e[0].field, "spec.clusterIPs[0]");
        assert!(e[0].message.contains("10.0.0.300"), "{}", e[0].message);

        // Only `clusterIP` written: the error names that field.
        let mut single = service("shop", "single", "10.0.0.301", &[80]);
        single.spec.as_mut().unwrap().cluster_ips = None;
        // The same IP twice, and the same port and protocol twice.
        let mut twice = service("shop", "twice", "127.96.0.9", &[80, 80]);
        twice.spec.as_mut().unwrap().cluster_ips =
            Some(vec!["127.96.0.9".into(), "127.96.0.9".into()]);
        let s = store_with(vec![Object::Service(single), Object::Service(twice)]);
        let e = desired_specs(&s, &Key::new("shop", "single"), "n1").unwrap_err();
        assert_eq!(e[0].field, "spec.clusterIP");
        let e = desired_specs(&s, &Key::new("shop", "twice"), "n1").unwrap_err();
        let fields: Vec<&str> = e.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "spec.clusterIPs[1]",
                "spec.ports[1].name",
                "spec.ports[1].port"
            ],
            "{e:?}"
        );
        assert!(
            e[2].message
                .contains("port 80/TCP is already spec.ports[0]"),
            "{}",
            e[2].message
        );

        // Two ports, one unnamed; no port at all; an IPv4-mapped ClusterIP
        // (the kernel would key it as 127.96.0.10, another Service's VIP,
        // say).
        let mut unnamed = service("shop", "unnamed", "127.96.0.11", &[80, 443]);
        unnamed.spec.as_mut().unwrap().ports.as_mut().unwrap()[1].name = None;
        let portless = service("shop", "portless", "127.96.0.12", &[]);
        let mut mapped = service("shop", "mapped", "::ffff:127.96.0.10", &[80]);
        mapped.spec.as_mut().unwrap().cluster_ips = None;
        let s = store_with(vec![
            Object::Service(unnamed),
            Object::Service(portless),
            Object::Service(mapped),
        ]);
        let e = desired_specs(&s, &Key::new("shop", "unnamed"), "n1").unwrap_err();
        assert_eq!(e[0].field, "spec.ports[1].name", "{e:?}");
        assert!(e[0].message.contains("more than one port"), "{e:?}");
        let e = desired_specs(&s, &Key::new("shop", "portless"), "n1").unwrap_err();
        assert_eq!(e[0].field, "spec.ports", "{e:?}");
        let e = desired_specs(&s, &Key::new("shop", "mapped"), "n1").unwrap_err();
        assert_eq!(e[0].field, "spec.clusterIP", "{e:?}");
        assert!(e[0].message.contains("write it as 127.96.0.10"), "{e:?}");
    }

    #[test]
    fn the_plan_touches_only_dirty_services_and_only_what_changed() {
        let mut s = store_with(vec![
            Object::Service(service("shop", "a", "127.96.0.1", &[80])),
            Object::Service(service("shop", "b", "127.96.0.2", &[80])),
            Object::EndpointSlice(slice("shop", "a-1", "a", &[80], &[ep_ready("10.0.0.1")])),
            Object::EndpointSlice(slice("shop", "b-1", "b", &[80], &[ep_ready("10.0.0.2")])),
        ]);
        let mut lb = LbState::default();
        let all: BTreeSet<Key> = s.services.keys().cloned().collect();
        let plan = lb.plan(&s, &all, "n1");
        assert_eq!(plan.changes().len(), 2);
        for p in &plan.services {
            lb.commit(p);
        }
        // One slice of `a` changes: only a's frontend is upserted.
        let dirty = s.apply(Update::Upsert(Object::EndpointSlice(slice(
            "shop",
            "a-1",
            "a",
            &[80],
            &[ep_ready("10.0.0.3")],
        ))));
        let plan = lb.plan(&s, &dirty.services, "n1");
        let changes = plan.changes();
        assert_eq!(changes.len(), 1);
        let Change::Upsert(spec) = &changes[0] else {
            panic!("{changes:?}")
        };
        assert_eq!(spec.frontend, Frontend::tcp(addr("127.96.0.1:80")));
        assert_eq!(spec.backends, vec![Backend::ready(addr("10.0.0.3:80"))]);
        assert_eq!(
            plan.services[0].removed_backends,
            vec![(Frontend::tcp(addr("127.96.0.1:80")), addr("10.0.0.1:80"))]
        );
        for p in &plan.services {
            lb.commit(p);
        }
        // Planning again finds nothing to do.
        let plan = lb.plan(&s, &all, "n1");
        assert!(plan.changes().is_empty());
        assert_eq!(plan.unchanged.len(), 2);
        // Deleting `b` removes its frontend.
        let d = s.apply(Update::Delete(
            crate::state::Kind::Service,
            Key::new("shop", "b"),
        ));
        let plan = lb.plan(&s, &d.services, "n1");
        assert_eq!(
            plan.changes(),
            vec![Change::Remove(Frontend::tcp(addr("127.96.0.2:80")))]
        );
        for p in &plan.services {
            lb.commit(p);
        }
        assert_eq!(lb.applied().len(), 1);
    }

    #[test]
    fn a_clusterip_taken_by_another_service_is_an_error_and_keeps_the_old_entry() {
        let s = store_with(vec![
            Object::Service(service("shop", "a", "127.96.0.1", &[80])),
            Object::Service(service("shop", "b", "127.96.0.1", &[80])),
        ]);
        let mut lb = LbState::default();
        let plan = lb.plan(&s, &BTreeSet::from([Key::new("shop", "a")]), "n1");
        lb.commit(&plan.services[0]);
        let plan = lb.plan(&s, &BTreeSet::from([Key::new("shop", "b")]), "n1");
        assert!(plan.services.is_empty());
        let e = &plan.errors[&Key::new("shop", "b")][0];
        assert!(
            e.message.contains("already belongs to Service shop/a"),
            "{e}"
        );
    }

    #[test]
    fn a_retried_service_does_not_remove_the_frontend_another_has_taken() {
        let mut s = store_with(vec![
            Object::Service(service("shop", "a", "127.96.0.1", &[80])),
            Object::Service(service("shop", "b", "127.96.0.2", &[80])),
        ]);
        let mut lb = LbState::default();
        let all: BTreeSet<Key> = s.services.keys().cloned().collect();
        for p in &lb.plan(&s, &all, "n1").services {
            lb.commit(p);
        }
        // `a` moves to .3 and `b` takes .1; only `b`'s change goes in (`a`'s
        // failed, say on a full map).
        s.apply(Update::Upsert(Object::Service(service(
            "shop",
            "a",
            "127.96.0.3",
            &[80],
        ))));
        s.apply(Update::Upsert(Object::Service(service(
            "shop",
            "b",
            "127.96.0.1",
            &[80],
        ))));
        let plan = lb.plan(&s, &all, "n1");
        let b = plan
            .services
            .iter()
            .find(|p| p.service == Key::new("shop", "b"))
            .unwrap();
        lb.commit(b);
        // Retrying `a` must leave .1, now `b`'s entry, alone.
        let plan = lb.plan(&s, &BTreeSet::from([Key::new("shop", "a")]), "n1");
        let changes = plan.changes();
        assert!(
            !changes.contains(&Change::Remove(Frontend::tcp(addr("127.96.0.1:80")))),
            "{changes:?}"
        );
        assert!(
            matches!(&changes[..], [Change::Upsert(s)] if s.frontend == Frontend::tcp(addr("127.96.0.3:80"))),
            "{changes:?}"
        );
    }

    #[test]
    fn a_clusterip_can_move_between_services_in_one_batch() {
        let mut s = store_with(vec![Object::Service(service(
            "shop",
            "a",
            "127.96.0.1",
            &[80],
        ))]);
        let mut lb = LbState::default();
        let plan = lb.plan(&s, &BTreeSet::from([Key::new("shop", "a")]), "n1");
        lb.commit(&plan.services[0]);
        let mut d = s.apply(Update::Delete(
            crate::state::Kind::Service,
            Key::new("shop", "a"),
        ));
        d.merge(s.apply(Update::Upsert(Object::Service(service(
            "shop",
            "b",
            "127.96.0.1",
            &[80],
        )))));
        let plan = lb.plan(&s, &d.services, "n1");
        assert!(plan.errors.is_empty(), "{:?}", plan.errors);
        let fe = Frontend::tcp(addr("127.96.0.1:80"));
        assert_eq!(plan.changes()[0], Change::Remove(fe));
        assert!(matches!(&plan.changes()[1], Change::Upsert(s) if s.frontend == fe));
        for p in &plan.services {
            lb.commit(p);
        }
        assert_eq!(
            lb.frontends().collect::<Vec<_>>(),
            [(&fe, &Key::new("shop", "b"))]
        );
    }
}
