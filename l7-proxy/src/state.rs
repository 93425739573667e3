//! A [`Snapshot`] compiled into the lookups the data path needs. Built once
//! per snapshot; requests and connections hold an `Arc` of the state that was
//! current when they started.

use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use crate::{
    FastMap, FastSet,
    balance::{Balancer, EndpointLoad},
    config::{
        Endpoint, LocalWorkload, ObjectRef, Service, ServicePort, Snapshot, SpiffeId, Workload,
    },
    metrics::Label,
    router::{RouteError, RouteTable, Rule},
};

/// Where a request or connection goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Upstream {
    /// Workload `ip:port`.
    pub addr: SocketAddr,
    /// `addr` as a header value (the tunnel's target header), made once.
    pub target: http::HeaderValue,
    /// Its identity (or address, when not meshed) as a metric label.
    pub label: Label,
    /// The tunnel to use, or plaintext directly when `None`.
    pub tunnel: Option<TunnelPeer>,
    pub workload: Option<ObjectRef>,
}

/// A peer proxy and the identity it must present for the destination.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct TunnelPeer {
    pub node: SocketAddr,
    pub identity: SpiffeId,
}

/// What a captured connection was addressed to.
#[derive(Clone, Debug)]
pub enum Destination {
    /// A service VIP and port.
    Service(Arc<ServiceDest>),
    /// A meshed pod IP.
    Workload(Workload),
    /// Anything else: relayed as is.
    External,
}

/// A service port as the forwarding path needs it, resolved once per
/// snapshot.
#[derive(Debug)]
pub struct ServiceDest {
    pub service: Arc<Service>,
    pub port: ServicePort,
    /// Whether any route is attached to the service.
    pub routed: bool,
    /// The rule of a request when the service has no routes.
    pub default_rule: Arc<Rule>,
    /// Its ready endpoints on this port.
    pub ready: ReadySet,
    /// HTTP only: the port declares HTTP, or leads to a pod port that a
    /// Service of the pod's namespace declares HTTP
    /// ([`State::declared_http`]).
    pub http_only: bool,
}

#[derive(Debug, Default)]
pub struct State {
    pub snapshot: Arc<Snapshot>,
    pub routes: RouteTable,
    services: FastMap<ObjectRef, Arc<Service>>,
    vips: FastMap<SocketAddr, Arc<ServiceDest>>,
    workloads: FastMap<IpAddr, Workload>,
    local: FastMap<IpAddr, Arc<LocalWorkload>>,
    /// Services each endpoint IP belongs to, with the ports they reach on
    /// it (for access policies).
    member_of: FastMap<IpAddr, Vec<(ObjectRef, Vec<u16>)>>,
    /// Ready endpoints per (service, service port), computed once.
    ready: FastMap<ObjectRef, FastMap<u16, ReadySet>>,
    /// The implicit rule of each (service, port) without routes.
    default_rules: FastMap<ObjectRef, FastMap<u16, Arc<Rule>>>,
    /// Addresses of the node proxies endpoints and workloads sit behind.
    node_proxies: FastSet<IpAddr>,
    /// Pod ports (by pod, so every address of a dual-stack pod) that a
    /// Service of the pod's namespace declares HTTP (`appProtocol`):
    /// traffic to them is HTTP only.
    http_ports: FastMap<ObjectRef, Vec<u16>>,
    /// Pod ports that Services of the pod's namespace declare `tcp`, every
    /// one leading to them: traffic to them is opaque TCP only.
    tcp_only_ports: FastMap<ObjectRef, Vec<u16>>,
}

/// Pod ports that a Service of the pod's own namespace declares HTTP. Only
/// the pod's namespace says what its ports speak: a Service elsewhere
/// listing it must not close its TCP. An endpoint without its pod named
/// declares nothing. A local pod's selecting Services declare its ports
/// too (`selected_by`), before an EndpointSlice lists it.
fn declared_http_ports(snapshot: &Snapshot) -> FastMap<ObjectRef, Vec<u16>> {
    pod_ports(
        snapshot,
        |sel, p| sel.http_ports.contains(&p),
        ServicePort::declares_http,
        |_| true,
    )
}

/// Pod ports that Services of the pod's own namespace declare `tcp` and
/// that none of its Services leads to otherwise (one that says nothing,
/// or HTTP, carries HTTP there).
fn tcp_only_ports(snapshot: &Snapshot) -> FastMap<ObjectRef, Vec<u16>> {
    let mut tcp = pod_ports(
        snapshot,
        |sel, p| sel.tcp_ports.contains(&p),
        ServicePort::declares_tcp,
        |_| true,
    );
    // Nothing more to build in a mesh that declares none.
    if tcp.is_empty() {
        return tcp;
    }
    let open = pod_ports(
        snapshot,
        |sel, p| !sel.tcp_ports.contains(&p),
        |p| !p.declares_tcp(),
        |w| tcp.contains_key(w),
    );
    tcp.retain(|w, ports| {
        if let Some(open) = open.get(w) {
            ports.retain(|p| !open.contains(p));
        }
        !ports.is_empty()
    });
    tcp
}

/// Pod ports, by pod, that Services of the pod's own namespace lead to:
/// through the Service ports `declares` picks (to the pods their
/// endpoints name), and for local pods, through the ports of their
/// selecting Services that `selected` picks (before an EndpointSlice lists
/// them); only for the pods `keep` wants.
fn pod_ports(
    snapshot: &Snapshot,
    selected: impl Fn(&crate::config::SelectedBy, u16) -> bool,
    declares: impl Fn(&ServicePort) -> bool,
    keep: impl Fn(&ObjectRef) -> bool,
) -> FastMap<ObjectRef, Vec<u16>> {
    let mut ports: FastMap<ObjectRef, Vec<u16>> = FastMap::default();
    for w in snapshot.local_workloads.iter().filter(|w| keep(&w.id)) {
        for sel in &w.selected_by {
            if sel.service.namespace == w.id.namespace {
                for p in sel.ports.iter().filter(|p| selected(sel, **p)) {
                    add_port(ports.entry(w.id.clone()).or_default(), *p);
                }
            }
        }
    }
    for svc in &snapshot.services {
        for p in svc.ports.iter().filter(|p| declares(p)) {
            for ep in &svc.endpoints {
                if let (Some(w), Some(port)) = (&ep.workload, ep.target_for(p))
                    && w.namespace == svc.id.namespace
                    && keep(w)
                {
                    add_port(ports.entry(w.clone()).or_default(), port);
                }
            }
        }
    }
    ports
}

fn add_port(list: &mut Vec<u16>, port: u16) {
    if !list.contains(&port) {
        list.push(port);
    }
}

/// Ready endpoints of one service port, and the balancer's load record of
/// each (same order), shared by every request: a pick takes no lock.
#[derive(Clone, Debug, Default)]
pub struct ReadySet {
    pub upstreams: Arc<[Arc<Upstream>]>,
    pub loads: Arc<[Arc<EndpointLoad>]>,
    /// `namespace/name` of the service, as a label.
    pub service: Label,
    /// The service port.
    pub port: u16,
    /// ClientIP session affinity's timeout, if the service has it.
    pub affinity: Option<std::time::Duration>,
}

impl State {
    /// Compiles a snapshot; routes that do not compile are left out and
    /// returned, everything else is in force. Endpoints get load records of
    /// their own, with no history (see [`State::build_with`]).
    pub fn build(snapshot: Arc<Snapshot>) -> (State, Vec<RouteError>) {
        State::build_with(snapshot, &Balancer::default())
    }

    /// [`State::build`], with each endpoint's load record taken from
    /// `balancer`, so that an endpoint keeps its latency history across
    /// snapshots.
    pub fn build_with(snapshot: Arc<Snapshot>, balancer: &Balancer) -> (State, Vec<RouteError>) {
        let (routes, errors) = RouteTable::build(&snapshot.http_routes, &snapshot.grpc_routes);
        let mut s = State {
            routes,
            http_ports: declared_http_ports(&snapshot),
            tcp_only_ports: tcp_only_ports(&snapshot),
            ..Default::default()
        };
        for svc in &snapshot.services {
            let svc = Arc::new(svc.clone());
            for p in &svc.ports {
                let ups: Vec<Arc<Upstream>> = svc
                    .endpoints
                    .iter()
                    .filter(|e| e.ready && !e.unready_ports.contains(&p.port))
                    .filter_map(|e| Some(Arc::new(upstream_of(e, e.target_for(p)?))))
                    .collect();
                let loads: Vec<Arc<EndpointLoad>> =
                    ups.iter().map(|u| balancer.load(u.addr)).collect();
                s.ready.entry(svc.id.clone()).or_default().insert(
                    p.port,
                    ReadySet {
                        upstreams: ups.into(),
                        loads: loads.into(),
                        service: Label::from(svc.id.to_string()),
                        port: p.port,
                        affinity: svc
                            .affinity_timeout_s
                            .map(|s| std::time::Duration::from_secs(u64::from(s))),
                    },
                );
                s.default_rules
                    .entry(svc.id.clone())
                    .or_default()
                    .insert(p.port, Rule::default_for(&svc.id, p.port));
            }
            let routed = s.routes.has_routes(&svc.id);
            for p in &svc.ports {
                let http_only = p.declares_http()
                    || svc.endpoints.iter().any(|e| {
                        e.workload
                            .as_ref()
                            .zip(e.target_for(p))
                            .is_some_and(|(w, port)| s.declared_http(w, port))
                    });
                let dest = Arc::new(ServiceDest {
                    service: svc.clone(),
                    port: p.clone(),
                    routed,
                    default_rule: s.default_rule(&svc.id, p.port),
                    ready: s.ready_upstreams(&svc, p.port),
                    http_only,
                });
                for vip in &svc.vips {
                    s.vips.insert(SocketAddr::new(*vip, p.port), dest.clone());
                }
            }
            for ep in &svc.endpoints {
                let ports = svc.ports.iter().filter_map(|p| ep.target_for(p));
                s.add_member(ep.ip, &svc.id, ports);
                s.node_proxies.extend(ep.node_proxy.map(|a| a.ip()));
            }
            s.services.insert(svc.id.clone(), svc);
        }
        for w in &snapshot.workloads {
            s.workloads.insert(w.ip, w.clone());
            s.node_proxies.extend(w.node_proxy.map(|a| a.ip()));
        }
        for w in &snapshot.local_workloads {
            // Policies follow a Service's selector too: a pod the
            // EndpointSlice controller has not listed yet is governed all
            // the same. Other namespaces' Services never govern it
            // (`services_for`), whoever names them here.
            // One that leads to none of its ports governs none of them (an
            // EndpointSlice would not list it either).
            for sel in w.selected_by.iter().filter(|sel| !sel.ports.is_empty()) {
                s.add_member(w.ip, &sel.service, sel.ports.iter().copied());
            }
            s.local.insert(w.ip, Arc::new(w.clone()));
        }
        s.share_membership(&snapshot.local_workloads);
        s.snapshot = snapshot;
        (s, errors)
    }

    /// A local pod's addresses are one workload: a Service that leads to
    /// one of them (a hand-made EndpointSlice may list one address of a
    /// dual-stack pod) governs the others too.
    fn share_membership(&mut self, local: &[LocalWorkload]) {
        let mut by_pod: FastMap<&ObjectRef, Vec<IpAddr>> = FastMap::default();
        for w in local {
            by_pod.entry(&w.id).or_default().push(w.ip);
        }
        for ips in by_pod.values().filter(|ips| ips.len() > 1) {
            let merged: Vec<(ObjectRef, Vec<u16>)> = ips
                .iter()
                .filter_map(|ip| self.member_of.get(ip))
                .flatten()
                .cloned()
                .collect();
            for ip in ips {
                for (service, ports) in &merged {
                    self.add_member(*ip, service, ports.iter().copied());
                }
            }
        }
    }

    /// Records that `service` leads to `ports` of the workload at `ip`.
    fn add_member(&mut self, ip: IpAddr, service: &ObjectRef, ports: impl Iterator<Item = u16>) {
        let list = self.member_of.entry(ip).or_default();
        match list.iter_mut().find(|(id, _)| id == service) {
            Some((_, have)) => ports.for_each(|p| add_port(have, p)),
            None => list.push((service.clone(), ports.collect())),
        }
    }

    /// Whether a Service of its namespace declares `port` of the pod
    /// `workload` HTTP (`appProtocol`): it is then only ever sent HTTP,
    /// never opaque TCP, whose bytes could carry headers posing as the
    /// mesh's own.
    pub fn declared_http(&self, workload: &ObjectRef, port: u16) -> bool {
        self.http_ports
            .get(workload)
            .is_some_and(|ports| ports.contains(&port))
    }

    /// Whether a Service of its namespace declares `port` of the pod
    /// `workload` `appProtocol: tcp`, and every Service of its namespace
    /// leading to it does: it is then only ever sent opaque TCP (HTTP may
    /// come through one that says nothing, or HTTP).
    pub fn declared_tcp(&self, workload: &ObjectRef, port: u16) -> bool {
        !self.tcp_only_ports.is_empty()
            && self
                .tcp_only_ports
                .get(workload)
                .is_some_and(|ports| ports.contains(&port))
    }

    /// Whether `ip` is the address of a node proxy of the mesh (as
    /// endpoints and workloads name them).
    pub fn is_node_proxy(&self, ip: IpAddr) -> bool {
        self.node_proxies.contains(&ip)
    }

    pub fn local_workload(&self, ip: IpAddr) -> Option<&Arc<LocalWorkload>> {
        self.local.get(&ip)
    }

    pub fn service(&self, id: &ObjectRef) -> Option<&Arc<Service>> {
        self.services.get(id)
    }

    /// The Services of `namespace` that govern traffic to `port` on the
    /// endpoint `ip`: those whose ports lead there. A port none of them
    /// leads to is governed by all of them. Services of other namespaces
    /// never count (not even to decide which ports are covered: a Service
    /// elsewhere listing the pod on a port must not take that port out of
    /// its own Services' policies).
    pub fn services_for(&self, ip: IpAddr, port: u16, namespace: &str) -> Vec<&ObjectRef> {
        let all = self.member_of.get(&ip).map_or(&[][..], |v| v.as_slice());
        let own = || all.iter().filter(|(id, _)| id.namespace == namespace);
        let on_port: Vec<&ObjectRef> = own()
            .filter(|(_, ports)| ports.contains(&port))
            .map(|(id, _)| id)
            .collect();
        if on_port.is_empty() {
            own().map(|(id, _)| id).collect()
        } else {
            on_port
        }
    }

    pub fn destination(&self, dst: SocketAddr) -> Destination {
        if let Some(d) = self.vips.get(&dst) {
            return Destination::Service(d.clone());
        }
        match self.workloads.get(&dst.ip()) {
            Some(w) => Destination::Workload(w.clone()),
            None => Destination::External,
        }
    }

    /// Ready endpoints of a service port.
    pub fn ready_upstreams(&self, service: &Service, port: u16) -> ReadySet {
        self.ready
            .get(&service.id)
            .and_then(|ports| ports.get(&port))
            .cloned()
            .unwrap_or_else(|| ReadySet {
                service: Label::from(service.id.to_string()),
                ..ReadySet::default()
            })
    }

    /// Ready endpoints of a service port, or `None` when there is no such
    /// service.
    pub fn ready_set(&self, service: &ObjectRef, port: u16) -> Option<ReadySet> {
        let ports = self.ready.get(service)?;
        Some(ports.get(&port).cloned().unwrap_or_else(|| ReadySet {
            service: Label::from(service.to_string()),
            ..ReadySet::default()
        }))
    }

    /// The rule of a request to a service without routes: the service
    /// itself, on the port the client connected to.
    pub fn default_rule(&self, service: &ObjectRef, port: u16) -> Arc<Rule> {
        self.default_rules
            .get(service)
            .and_then(|ports| ports.get(&port))
            .cloned()
            .unwrap_or_else(|| Rule::default_for(service, port))
    }

    pub fn workload_upstream(w: &Workload, port: u16) -> Upstream {
        let addr = SocketAddr::new(w.ip, port);
        Upstream {
            addr,
            target: target_value(addr),
            // The port is the caller's choice: without an identity the
            // label names the workload, not `ip:port` (one series per port
            // a caller tries would be unbounded).
            label: match w
                .node_proxy
                .is_some()
                .then_some(())
                .and(w.identity.as_ref())
            {
                Some(id) => Label::from(id.as_ref()),
                None => Label::from(w.id.to_string()),
            },
            tunnel: match (&w.node_proxy, &w.identity) {
                (Some(node), Some(identity)) => Some(TunnelPeer {
                    node: *node,
                    identity: identity.clone(),
                }),
                _ => None,
            },
            workload: Some(w.id.clone()),
        }
    }

    /// Every endpoint address in the snapshot (for pruning balancer state).
    pub fn endpoint_addrs(&self) -> impl Iterator<Item = SocketAddr> + '_ {
        self.services.values().flat_map(|s| {
            s.endpoints.iter().flat_map(move |e| {
                s.ports
                    .iter()
                    .filter_map(move |p| Some(SocketAddr::new(e.ip, e.target_for(p)?)))
            })
        })
    }
}

fn label_of(addr: SocketAddr, identity: Option<&SpiffeId>) -> Label {
    match identity {
        Some(id) => Label::from(id.as_ref()),
        None => Label::from(addr.to_string()),
    }
}

/// `ip:port` as a header value.
pub fn target_value(addr: SocketAddr) -> http::HeaderValue {
    http::HeaderValue::try_from(addr.to_string()).expect("a socket address is a header value")
}

fn upstream_of(e: &Endpoint, port: u16) -> Upstream {
    let addr = SocketAddr::new(e.ip, port);
    Upstream {
        addr,
        target: target_value(addr),
        label: label_of(
            addr,
            e.node_proxy
                .is_some()
                .then_some(())
                .and(e.identity.as_ref()),
        ),
        tunnel: match (&e.node_proxy, &e.identity) {
            (Some(node), Some(identity)) => Some(TunnelPeer {
                node: *node,
                identity: identity.clone(),
            }),
            _ => None,
        },
        workload: e.workload.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ObjectRef;

    #[test]
    fn a_workload_reached_by_address_is_labelled_by_identity_or_name_never_by_port() {
        let plain = Workload {
            ip: "10.0.0.9".parse().unwrap(),
            id: ObjectRef::new("legacy", "db-0"),
            node_proxy: None,
            identity: None,
        };
        // Callers choose the port: one series per port would be unbounded.
        let labels: Vec<Label> = [5432, 5433, 65000]
            .into_iter()
            .map(|p| State::workload_upstream(&plain, p).label)
            .collect();
        assert!(
            labels.iter().all(|l| *l == Label::from("legacy/db-0")),
            "{labels:?}"
        );
        let meshed = Workload {
            node_proxy: Some("10.1.0.1:15008".parse().unwrap()),
            identity: Some("spiffe://cluster.local/ns/legacy/sa/db".parse().unwrap()),
            ..plain
        };
        assert_eq!(
            State::workload_upstream(&meshed, 5432).label,
            Label::from("spiffe://cluster.local/ns/legacy/sa/db")
        );
    }

    /// A Service `ns/name` on port 80 to `target_port` of pod shop/cart-0
    /// (10.0.0.7), its port's `appProtocol` `app`.
    fn cart_service(
        ns: &str,
        name: &str,
        vips: Vec<IpAddr>,
        target_port: u16,
        app: Option<&str>,
    ) -> Service {
        Service {
            id: ObjectRef::new(ns, name),
            vips,
            ports: vec![crate::config::ServicePort {
                port: 80,
                target_port,
                app_protocol: app.map(Into::into),
            }],
            endpoints: vec![crate::config::Endpoint {
                ip: "10.0.0.7".parse().unwrap(),
                ready: true,
                workload: Some(ObjectRef::new("shop", "cart-0")),
                node_proxy: None,
                identity: None,
                ports: Default::default(),
                unready_ports: vec![],
            }],
            affinity_timeout_s: None,
        }
    }

    /// A pod port is TCP only when every Service of its namespace leading
    /// to it says `tcp`: one that says nothing (or HTTP) carries HTTP to it.
    #[test]
    fn a_pod_port_is_tcp_only_when_every_service_leading_to_it_says_tcp() {
        let snap = |apps: &[Option<&str>]| Snapshot {
            services: apps
                .iter()
                .enumerate()
                .map(|(i, app)| cart_service("shop", &format!("s{i}"), vec![], 9000, *app))
                .chain([cart_service("evil", "open", vec![], 9000, None)])
                .collect(),
            ..Default::default()
        };
        let cart = ObjectRef::new("shop", "cart-0");
        let tcp = |apps: &[Option<&str>]| {
            State::build(Arc::new(snap(apps)))
                .0
                .declared_tcp(&cart, 9000)
        };
        assert!(tcp(&[Some("tcp")]), "another namespace has no say");
        assert!(tcp(&[Some("tcp"), Some("TCP")]));
        assert!(!tcp(&[Some("tcp"), None]));
        assert!(!tcp(&[Some("tcp"), Some("http")]));
        assert!(!tcp(&[None]));
    }

    #[test]
    fn only_the_pods_own_namespace_declares_its_ports_http() {
        let service = |ns: &str, app: &str, target_port: u16| {
            cart_service(ns, "s", vec![], target_port, Some(app))
        };
        let snap = Snapshot {
            services: vec![
                service("shop", "http", 8080),
                service("shop", "tcp", 9000),
                // Another namespace cannot close the pod's TCP port.
                service("evil", "http", 9000),
            ],
            ..Default::default()
        };
        let st = State::build(Arc::new(snap)).0;
        let cart = ObjectRef::new("shop", "cart-0");
        // By pod, whichever of its addresses a caller uses.
        assert!(st.declared_http(&cart, 8080));
        assert!(!st.declared_http(&cart, 9000));
        assert!(!st.declared_http(&ObjectRef::new("shop", "cart-1"), 8080));
    }

    /// A local pod no EndpointSlice lists yet: the Services of its
    /// namespace whose selector picks it declare its HTTP ports all the
    /// same; another namespace's do not, nor a port it does not lead to.
    #[test]
    fn a_selecting_service_declares_a_local_pods_ports_http_before_it_is_listed() {
        use crate::config::{LocalWorkload, MtlsMode, SelectedBy};
        let sel = |ns: &str, ports: Vec<u16>, http_ports: Vec<u16>| SelectedBy {
            service: ObjectRef::new(ns, "s"),
            ports,
            http_ports,
            tcp_ports: Vec::new(),
        };
        let snap = Snapshot {
            local_workloads: vec![LocalWorkload {
                ip: "10.0.0.7".parse().unwrap(),
                id: ObjectRef::new("shop", "cart-0"),
                service_account: "cart".into(),
                identity: "spiffe://cluster.local/ns/shop/sa/cart".parse().unwrap(),
                mtls_mode: MtlsMode::Strict,
                selected_by: vec![
                    sel("shop", vec![8080, 9000], vec![8080, 7777]),
                    sel("evil", vec![9000], vec![9000]),
                ],
            }],
            // A Service that lists the pod and says nothing of 8080.
            services: vec![cart_service(
                "shop",
                "sibling",
                vec!["10.96.0.9".parse().unwrap()],
                8080,
                None,
            )],
            ..Default::default()
        };
        let st = State::build(Arc::new(snap)).0;
        let cart = ObjectRef::new("shop", "cart-0");
        assert!(st.declared_http(&cart, 8080));
        assert!(!st.declared_http(&cart, 9000), "another namespace's say");
        assert!(!st.declared_http(&cart, 7777), "not a port it leads to");
        // The sibling leads to the same pod port: HTTP only through it too.
        match st.destination("10.96.0.9:80".parse().unwrap()) {
            Destination::Service(d) => assert!(d.http_only),
            _ => panic!("the sibling's VIP is a Service destination"),
        }
    }
}
