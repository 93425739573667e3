//! The contract with the node agent: the proxy's settings (listeners, limits,
//! timeouts) and the configuration [`Snapshot`] it routes by.
//!
//! A snapshot is plain data, already resolved by the agent: Gateway API
//! `backendRefs` point at services in the same snapshot, `MeshPolicy` is folded
//! into each local workload's [`MtlsMode`], and Kubernetes object names are only
//! kept for logs and metrics. Snapshots are immutable; the agent publishes a new
//! one through a `tokio::sync::watch` channel and the proxy applies it to new
//! connections and requests at once.
//!
//! Durations are integers in milliseconds (`*_ms`) so that the JSON form is
//! obvious to write by hand.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    time::Duration,
};

use serde::{Deserialize, Serialize};

pub use crate::identity::SpiffeId;

/// Outbound capture listener (connections redirected by `cgroup/connect4`).
pub const OUTBOUND_PORT: u16 = 15001;
/// Inbound mTLS tunnel: HTTP/2 over TLS 1.3, ALPN `h2`.
pub const INBOUND_PORT: u16 = 15008;
/// Admin API, served by the agent (metrics, connection table).
pub const ADMIN_PORT: u16 = 15020;

/// Request header carrying the target workload `ip:port` of an HTTP request
/// inside the tunnel (CONNECT streams carry it as their authority instead).
pub const TARGET_HEADER: &str = "sluice-target";
/// Request header telling the inbound proxy that the caller spoke HTTP/2
/// (`h2`); without it (or with `http1`) the inbound proxy restores HTTP/1.1
/// towards the workload.
pub const PROTOCOL_HEADER: &str = "sluice-protocol";
/// Request header set by the inbound proxy for the workload: the verified
/// SPIFFE ID of the caller. Stripped from requests entering the mesh.
pub const SOURCE_IDENTITY_HEADER: &str = "sluice-source-identity";
/// Request header marking a tunnel `CONNECT` stream that carries one HTTP/1.1
/// upgrade request (WebSocket, say): the inbound proxy then reads that
/// request, polices it with its method and path, and forwards it with the
/// caller's identity. The value, the request's `METHOD path` (`GET /chat`),
/// is for logs only: the request itself is what is checked.
pub const UPGRADE_REQUEST_HEADER: &str = "sluice-upgrade-request";
/// Response header explaining why the proxy answered instead of the workload
/// (policy denial, no route, no ready endpoint, timeout).
pub const REASON_HEADER: &str = "sluice-reason";

/// Response header of the inbound proxy's own answer (`503`, and only on
/// that status) when it could not connect to the workload: nothing of the
/// request reached it. The
/// caller's proxy then treats the endpoint as unreachable (a retry goes
/// elsewhere, even for a non-idempotent method) and never passes the header
/// on.
pub const UNREACHABLE_HEADER: &str = "sluice-unreachable";

/// [`TARGET_HEADER`], [`PROTOCOL_HEADER`], [`SOURCE_IDENTITY_HEADER`],
/// [`REASON_HEADER`] and [`UNREACHABLE_HEADER`] as header names, made at
/// compile time.
pub const TARGET: http::HeaderName = http::HeaderName::from_static(TARGET_HEADER);
pub const PROTOCOL: http::HeaderName = http::HeaderName::from_static(PROTOCOL_HEADER);
pub const SOURCE_IDENTITY: http::HeaderName = http::HeaderName::from_static(SOURCE_IDENTITY_HEADER);
/// Milliseconds the caller's route gives a tunnelled request from when it
/// is sent (its request or backend-request timeout): the workload's node
/// waits that long for the answer even past its exchange idle timeout.
pub const TIMEOUT_HEADER: &str = "sluice-timeout-ms";
pub const TIMEOUT: http::HeaderName = http::HeaderName::from_static(TIMEOUT_HEADER);
pub const REASON: http::HeaderName = http::HeaderName::from_static(REASON_HEADER);
pub const UPGRADE_REQUEST: http::HeaderName = http::HeaderName::from_static(UPGRADE_REQUEST_HEADER);
pub const UNREACHABLE: http::HeaderName = http::HeaderName::from_static(UNREACHABLE_HEADER);

/// How the proxy runs: where it listens and how long it waits for peers.
/// Logged at start-up; every field has a production default.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProxySettings {
    /// Outbound capture listener address (port 15001 on the node).
    pub outbound_addr: SocketAddr,
    /// A second capture listener, of the other address family, on a
    /// dual-stack node: the kernel sends each family's connections to a
    /// capture address of that family, on one port (port 0 here: the first
    /// listener's).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub second_outbound_addr: Option<SocketAddr>,
    /// Inbound mTLS tunnel listener address (port 15008 on the node).
    pub inbound_addr: SocketAddr,
    /// Time a client has to send its first bytes before the connection is
    /// treated as opaque TCP (server-speaks-first protocols send nothing).
    pub sniff_timeout_ms: u64,
    /// Time to read a complete HTTP/1.1 request head (slow or stalled heads
    /// are cut); on the capture listener, from the head's first bytes.
    pub header_read_timeout_ms: u64,
    /// A workload's HTTP/1.1 keep-alive connection to the capture listener
    /// that carries no request for this long is closed (cleanly, nothing
    /// written); an HTTP/2 one with no stream in flight (a WebSocket counts
    /// until it ends) for this long is shut down gracefully (GOAWAY).
    /// Longer than common client pool defaults (Go's `DefaultTransport`
    /// 90 s, OkHttp 5 minutes), so that the client, not the proxy, closes
    /// them: a request sent just as the proxy closes one would fail. It
    /// also bounds a next HTTP/1.1 head whose first bytes came in with the
    /// previous request (pipelined, then stalled): hyper holds them unseen.
    /// And how long a connection to a port declared HTTP may wait for its
    /// first bytes (it is never taken for opaque TCP). `0`: no limit (the
    /// client closes them).
    pub keepalive_idle_timeout_ms: u64,
    /// Largest request or response head accepted, in bytes.
    pub max_header_bytes: u32,
    /// Time to establish a TCP connection to a peer proxy or a workload.
    pub connect_timeout_ms: u64,
    /// Time to finish a TLS handshake with a peer proxy.
    pub tls_handshake_timeout_ms: u64,
    /// A tunnel connection without streams is closed after this long (the
    /// server side says GOAWAY after twice this). `0`: kept however long it
    /// idles.
    pub tunnel_idle_timeout_ms: u64,
    /// A tunnel connection takes new streams for this long at most (and
    /// never past its peer certificate's expiry): the client opens a new one
    /// (with its current certificate), the server says GOAWAY. Streams open
    /// on it go on. `0`: no limit but the certificates'.
    pub tunnel_max_age_ms: u64,
    /// A tunnel connection whose peer has taken none of the bytes waiting
    /// for it for this long (it stopped reading) is closed, with its streams.
    pub tunnel_write_stall_timeout_ms: u64,
    /// Most streams one tunnel connection carries at once; a further stream
    /// opens another connection to the same peer.
    pub tunnel_max_streams: u32,
    /// Most tunnel connections to one (source identity, peer node, peer
    /// identity) key.
    pub tunnel_max_connections: usize,
    /// Most TLS handshakes in progress at once on the tunnel port from one
    /// address that is not a node proxy of the mesh (as endpoints and
    /// workloads name them): a further connection from it is closed at once
    /// (counted in `sluice_tls_handshake_failures_total` as
    /// `peer_handshake_limit`), so that one pod opening connections it
    /// never completes holds at most this many descriptors until the
    /// handshake timeout. `0` turns the limit off.
    pub max_handshakes_per_peer: u32,
    /// Most tunnel connections taking streams at once on the tunnel port
    /// from one peer identity at one address to one local identity (the
    /// TLS server name it asks for): a further one is answered GOAWAY
    /// `ENHANCE_YOUR_CALM` after its handshake (counted in
    /// `sluice_tls_handshake_failures_total` as `peer_connection_limit`).
    /// One past its age, idle or draining (GOAWAY said) no longer counts.
    /// A peer proxy keeps at most `tunnel_max_connections` per (source
    /// identity, node, destination identity); one holding many more is
    /// leaking them (each costs TLS state and a task here). `0` turns the
    /// limit off.
    pub max_tunnel_connections_per_peer: u32,
    /// An opaque TCP relay with no bytes in either direction for this long is
    /// closed. `0`: no limit.
    pub tcp_idle_timeout_ms: u64,
    /// A pooled connection to a workload (HTTP/1.1, or HTTP/2 that no request
    /// has used) is closed after this long idle; an HTTP/1.1 one sooner if
    /// its workload said it closes idle connections sooner
    /// (`keep-alive: timeout=N`).
    pub workload_idle_timeout_ms: u64,
    /// An HTTP exchange that moves in neither direction (request body,
    /// response head, response body) for this long is ended: a stalled
    /// upload is cut (the request fails, `408` where it is kept for retries),
    /// a request without an answer is answered `504`, a stalled answer is
    /// cut. Neither side may hold a tunnel stream, a pooled connection or
    /// the buffer budget for ever; a streaming call that only listens while
    /// the other side's messages flow is not idle. `0` turns it off (long
    /// polls or silent streams longer than the default 5 minutes).
    #[serde(alias = "request_body_idle_timeout_ms")]
    pub exchange_idle_timeout_ms: u64,
    /// Request bodies up to this size are buffered so that they can be retried
    /// or mirrored; larger bodies are streamed once and not retried.
    pub max_buffered_body_bytes: usize,
    /// All request bodies buffered at once for retries and mirrors, across
    /// requests; a body that would go over it is streamed once instead, so a
    /// burst of large uploads cannot exhaust the node proxy's memory.
    pub max_buffered_total_bytes: usize,
    /// Mirrored requests (`RequestMirror`) in flight at once; a mirror
    /// beyond it is not sent (counted in `sluice_mirrors_dropped_total`), so
    /// that a mirror target that hangs cannot take the tunnel streams, the
    /// connections and the memory the primary traffic needs.
    pub max_mirrors_in_flight: usize,
    /// On shutdown, connections still open after this long are cut.
    pub drain_timeout_ms: u64,
    /// `SO_MARK` set on every socket the proxy opens (to peer proxies and to
    /// workloads). It must be the mark given to `ebpf-lb` so that the kernel
    /// neither redirects the proxy's own connections back to it nor refuses
    /// them at STRICT workloads. Setting it needs `CAP_NET_ADMIN`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub socket_mark: Option<u32>,
}

impl Default for ProxySettings {
    fn default() -> Self {
        Self {
            outbound_addr: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), OUTBOUND_PORT),
            second_outbound_addr: None,
            inbound_addr: SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), INBOUND_PORT),
            sniff_timeout_ms: 300,
            header_read_timeout_ms: 10_000,
            keepalive_idle_timeout_ms: 3_600_000,
            max_header_bytes: 64 * 1024,
            connect_timeout_ms: 5_000,
            tls_handshake_timeout_ms: 5_000,
            tunnel_idle_timeout_ms: 60_000,
            tunnel_max_age_ms: 3_600_000,
            tunnel_write_stall_timeout_ms: 30_000,
            tunnel_max_streams: 1_000,
            tunnel_max_connections: 4,
            max_handshakes_per_peer: 256,
            max_tunnel_connections_per_peer: 64,
            tcp_idle_timeout_ms: 3_600_000,
            workload_idle_timeout_ms: 90_000,
            exchange_idle_timeout_ms: 300_000,
            max_buffered_body_bytes: 1024 * 1024,
            max_buffered_total_bytes: 64 * 1024 * 1024,
            max_mirrors_in_flight: 256,
            drain_timeout_ms: 10_000,
            socket_mark: None,
        }
    }
}

/// A timeout in milliseconds where `0` means no limit, as a timer: 30
/// years away for `0`.
fn zero_is_never(ms: u64) -> Duration {
    match ms {
        0 => Duration::from_secs(30 * 365 * 86_400),
        ms => Duration::from_millis(ms),
    }
}

impl ProxySettings {
    /// Refuses settings at `0` where `0` cannot work (every connect or
    /// handshake would fail at once, no stream or header could pass),
    /// naming the first. The timeouts where `0` means "no limit" say so in
    /// their own documentation.
    pub fn check(&self) -> Result<(), String> {
        let must_not_be_zero = [
            ("sniff_timeout_ms", self.sniff_timeout_ms),
            ("header_read_timeout_ms", self.header_read_timeout_ms),
            ("max_header_bytes", self.max_header_bytes.into()),
            ("connect_timeout_ms", self.connect_timeout_ms),
            ("tls_handshake_timeout_ms", self.tls_handshake_timeout_ms),
            (
                "tunnel_write_stall_timeout_ms",
                self.tunnel_write_stall_timeout_ms,
            ),
            ("tunnel_max_streams", self.tunnel_max_streams.into()),
            ("tunnel_max_connections", self.tunnel_max_connections as u64),
        ];
        match must_not_be_zero.iter().find(|(_, v)| *v == 0) {
            Some((name, _)) => Err(format!(
                "{name} cannot be 0 (nothing would pass); leave it out for the default"
            )),
            None => Ok(()),
        }
    }

    pub fn sniff_timeout(&self) -> Duration {
        Duration::from_millis(self.sniff_timeout_ms)
    }
    pub fn header_read_timeout(&self) -> Duration {
        Duration::from_millis(self.header_read_timeout_ms)
    }
    /// `0` turns it off (a timer 30 years away).
    pub fn keepalive_idle_timeout(&self) -> Duration {
        zero_is_never(self.keepalive_idle_timeout_ms)
    }
    pub fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.connect_timeout_ms)
    }
    pub fn tls_handshake_timeout(&self) -> Duration {
        Duration::from_millis(self.tls_handshake_timeout_ms)
    }
    pub fn tunnel_write_stall_timeout(&self) -> Duration {
        Duration::from_millis(self.tunnel_write_stall_timeout_ms)
    }
    /// `0` turns it off (a timer 30 years away).
    pub fn tunnel_idle_timeout(&self) -> Duration {
        zero_is_never(self.tunnel_idle_timeout_ms)
    }
    /// `0` turns it off (a timer 30 years away).
    pub fn tunnel_max_age(&self) -> Duration {
        zero_is_never(self.tunnel_max_age_ms)
    }
    /// `0` turns it off (a timer 30 years away).
    pub fn exchange_idle_timeout(&self) -> Duration {
        zero_is_never(self.exchange_idle_timeout_ms)
    }
    /// The exchange idle timeout as the workload's node applies it to a
    /// request that crossed the tunnel: a quarter later than the caller's
    /// node, so that an honest peer's own timer ends the exchange first and
    /// says why to its caller.
    pub fn workload_side_idle_timeout(&self) -> Duration {
        let idle = self.exchange_idle_timeout();
        idle.saturating_add(idle / 4)
    }
    /// `0` keeps idle connections until the workload closes them.
    pub fn workload_idle_timeout(&self) -> Duration {
        zero_is_never(self.workload_idle_timeout_ms)
    }
    pub fn tcp_idle_timeout(&self) -> Duration {
        zero_is_never(self.tcp_idle_timeout_ms)
    }
    pub fn drain_timeout(&self) -> Duration {
        Duration::from_millis(self.drain_timeout_ms)
    }
}

/// Everything the proxy routes by, at one instant.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Snapshot {
    /// Services reachable through the mesh, with their endpoints.
    pub services: Vec<Service>,
    /// Meshed workloads anywhere in the cluster (this node included), for
    /// connections addressed to a pod IP rather than a service VIP.
    pub workloads: Vec<Workload>,
    /// Enrolled workloads on this node: the sources of outbound traffic (found
    /// by their IP) and the only allowed targets of inbound traffic.
    pub local_workloads: Vec<LocalWorkload>,
    /// `HTTPRoute`s whose parent is a Service (GAMMA).
    pub http_routes: Vec<HttpRoute>,
    /// `GRPCRoute`s whose parent is a Service (GAMMA).
    pub grpc_routes: Vec<GrpcRoute>,
    /// `AccessPolicy` objects.
    pub access_policies: Vec<AccessPolicy>,
}

/// `namespace/name` of a Kubernetes object.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ObjectRef {
    pub namespace: String,
    pub name: String,
}

impl ObjectRef {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl std::fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// A Kubernetes Service.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Service {
    #[serde(flatten)]
    pub id: ObjectRef,
    /// Cluster IPs (IPv4 and/or IPv6).
    pub vips: Vec<IpAddr>,
    pub ports: Vec<ServicePort>,
    #[serde(default)]
    pub endpoints: Vec<Endpoint>,
    /// `sessionAffinity: ClientIP`: each client keeps its endpoint (per
    /// service port, for its connections and requests) until it has not used
    /// it for this many seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity_timeout_s: Option<u32>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServicePort {
    /// The port on the VIP.
    pub port: u16,
    /// The port on each endpoint (named target ports already resolved).
    pub target_port: u16,
    /// `appProtocol`, when set: `tcp` forces opaque TCP (use it for
    /// server-speaks-first protocols so that the first byte is not waited
    /// for); an HTTP one ([`ServicePort::declares_http`]) makes the port HTTP
    /// only: callers' connections to it are never taken for opaque TCP
    /// however long they wait before their first bytes, and the node proxy
    /// of its endpoints refuses opaque TCP streams to it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app_protocol: Option<String>,
}

impl ServicePort {
    /// `appProtocol` names cleartext HTTP: `http`, `h2c`, `grpc`, or
    /// Kubernetes' `kubernetes.io/h2c` and `kubernetes.io/ws` (any case;
    /// not `http2`, which some platforms use for HTTP/2 over TLS).
    pub fn declares_http(&self) -> bool {
        self.app_protocol
            .as_deref()
            .is_some_and(app_protocol_is_http)
    }

    /// `appProtocol: tcp` (any case): opaque TCP only. Callers' connections
    /// to it are never taken for HTTP, and the node proxy of its endpoints
    /// refuses HTTP streams to the pod port it leads to: an HTTP request
    /// an access policy allows by method and path must not deliver its
    /// bytes (a body of commands) to a server that reads them otherwise.
    pub fn declares_tcp(&self) -> bool {
        self.app_protocol
            .as_deref()
            .is_some_and(|p| p.eq_ignore_ascii_case("tcp"))
    }
}

/// Whether an `appProtocol` names cleartext HTTP (see
/// [`ServicePort::declares_http`]).
pub fn app_protocol_is_http(p: &str) -> bool {
    [
        "http",
        "h2c",
        "grpc",
        "kubernetes.io/h2c",
        "kubernetes.io/ws",
    ]
    .iter()
    .any(|h| p.eq_ignore_ascii_case(h))
}

/// One backend of a service.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Endpoint {
    /// Pod IP.
    pub ip: IpAddr,
    /// Not-ready and terminating endpoints get no new connections or requests.
    pub ready: bool,
    /// Pod `namespace/name`, for logs and the connection table.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload: Option<ObjectRef>,
    /// Tunnel listener of the proxy on the endpoint's node (`node-ip:15008`).
    /// `None` (with `identity` `None`) means: send plaintext directly, because
    /// the pod is not enrolled or its `MeshPolicy` is `DISABLED`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_proxy: Option<SocketAddr>,
    /// The pod's SPIFFE identity, checked against the peer proxy's certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<SpiffeId>,
    /// The service ports this endpoint serves, each with its own port on the
    /// pod (a named target port may resolve differently on each pod, or not
    /// at all on some). Empty: every service port, at its `target_port`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub ports: BTreeMap<u16, u16>,
    /// Service ports the endpoint takes no new requests on while `ready`
    /// holds for others (readiness is per port: a terminating pod may stand
    /// in on a port that has no ready endpoint, and only there).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unready_ports: Vec<u16>,
}

impl Endpoint {
    /// The endpoint's port for service port `p`, if it serves it.
    pub fn target_for(&self, p: &ServicePort) -> Option<u16> {
        if self.ports.is_empty() {
            Some(p.target_port)
        } else {
            self.ports.get(&p.port).copied()
        }
    }
}

/// A meshed workload, for traffic addressed to its pod IP.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Workload {
    pub ip: IpAddr,
    #[serde(flatten)]
    pub id: ObjectRef,
    /// As for [`Endpoint::node_proxy`]: `None` means plaintext, directly.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_proxy: Option<SocketAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<SpiffeId>,
}

/// An enrolled workload on this node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalWorkload {
    pub ip: IpAddr,
    /// Pod `namespace/name`.
    #[serde(flatten)]
    pub id: ObjectRef,
    pub service_account: String,
    /// `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`; the
    /// identity manager must hold a certificate for it.
    pub identity: SpiffeId,
    /// The `MeshPolicy` mode in force for this workload.
    #[serde(default)]
    pub mtls_mode: MtlsMode,
    /// Services of its namespace whose selector picks it. They govern its
    /// access policies as the Services whose endpoints list it do, also
    /// before an EndpointSlice lists it (until then, a new pod would take
    /// every caller).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub selected_by: Vec<SelectedBy>,
}

/// A Service whose selector picks a local workload, and the workload ports
/// its ports lead to (a named target port the pod does not declare leads
/// nowhere; leading to none, it governs nothing).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SelectedBy {
    #[serde(flatten)]
    pub service: ObjectRef,
    #[serde(default)]
    pub ports: Vec<u16>,
    /// Those of `ports` that a port declaring HTTP (`appProtocol`) leads
    /// to: only ever sent HTTP, also before an EndpointSlice lists the pod.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub http_ports: Vec<u16>,
    /// Those of `ports` that a port declaring `appProtocol: tcp` leads to:
    /// never sent HTTP (see [`ServicePort::declares_tcp`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tcp_ports: Vec<u16>,
}

/// `MeshPolicy` modes, as seen by the proxy.
///
/// The inbound tunnel port only ever speaks mTLS, so a plaintext or wrongly
/// signed client is refused there in every mode. The mode decides the rest:
/// - `Strict`: traffic to the workload must come through the tunnel (the
///   kernel side blocks direct plaintext);
/// - `Permissive`: tunnel traffic is verified and policed as for `Strict`;
///   direct plaintext to the workload is allowed by the kernel side, and the
///   proxy does not see it;
/// - `Disabled`: callers' proxies send plaintext directly (the agent publishes
///   the workload without `node_proxy`); a tunnel stream that still arrives is
///   accepted and policed like the others.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum MtlsMode {
    Strict,
    #[default]
    Permissive,
    Disabled,
}

/// The Service a route is attached to (`parentRefs` of kind Service), and
/// optionally the one port it applies to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ParentRef {
    #[serde(flatten)]
    pub service: ObjectRef,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
}

/// A Gateway API `HTTPRoute` attached to a Service.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpRoute {
    #[serde(flatten)]
    pub id: ObjectRef,
    /// `metadata.creationTimestamp` in Unix seconds: among routes with equally
    /// specific matches the oldest wins (then `namespace/name` order).
    #[serde(default)]
    pub created_unix: i64,
    pub parents: Vec<ParentRef>,
    pub rules: Vec<HttpRouteRule>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpRouteRule {
    /// Rule name (`rules[].name`), for metrics; defaults to the rule index.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Any one of them must match; none means every request (`PathPrefix /`).
    pub matches: Vec<HttpRouteMatch>,
    pub filters: Vec<HttpFilter>,
    /// Weighted backends. Empty (or all weights zero): answered with 500.
    pub backends: Vec<BackendRef>,
    pub timeouts: Timeouts,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry: Option<Retry>,
}

/// One element of `rules[].matches`: all present conditions must hold.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpRouteMatch {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<PathMatch>,
    pub headers: Vec<ValueMatch>,
    pub query_params: Vec<ValueMatch>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", content = "value")]
pub enum PathMatch {
    Exact(String),
    PathPrefix(String),
    RegularExpression(String),
}

/// A header or query parameter condition. Header names are case-insensitive,
/// query parameter names are exact.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ValueMatch {
    #[serde(default, rename = "type")]
    pub kind: ValueMatchKind,
    pub name: String,
    pub value: String,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum ValueMatchKind {
    #[default]
    Exact,
    RegularExpression,
}

/// A backend: a Service port, with its weight among the rule's backends.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendRef {
    #[serde(flatten)]
    pub service: ObjectRef,
    pub port: u16,
    #[serde(default = "default_weight")]
    pub weight: u32,
    /// Filters applied only when this backend is chosen.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub filters: Vec<HttpFilter>,
    /// Why this reference cannot be followed (not permitted, not found):
    /// it keeps its share of requests, which the proxy answers with 500 and
    /// this reason, as the Gateway API asks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub invalid: Option<String>,
}

fn default_weight() -> u32 {
    1
}

/// Gateway API HTTP filters.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum HttpFilter {
    RequestHeaderModifier(HeaderModifier),
    ResponseHeaderModifier(HeaderModifier),
    RequestRedirect(RequestRedirect),
    #[serde(rename = "URLRewrite")]
    UrlRewrite(UrlRewrite),
    RequestMirror(RequestMirror),
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HeaderModifier {
    pub set: Vec<HeaderPair>,
    pub add: Vec<HeaderPair>,
    pub remove: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeaderPair {
    pub name: String,
    pub value: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RequestRedirect {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scheme: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<PathModifier>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// 301 or 302 (the default).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status_code: Option<u16>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UrlRewrite {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<PathModifier>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", content = "value")]
pub enum PathModifier {
    ReplaceFullPath(String),
    /// Replaces the part matched by the rule's `PathPrefix` match.
    ReplacePrefixMatch(String),
}

/// Sends a copy of the request to another backend, ignoring its answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RequestMirror {
    #[serde(flatten)]
    pub service: ObjectRef,
    pub port: u16,
    /// Share of requests mirrored; all when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fraction: Option<Fraction>,
}

/// `numerator / denominator` of requests (Gateway API `fraction`; a
/// `percent` of P is P/100). The denominator is at least 1 and the
/// numerator at most the denominator.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fraction {
    pub numerator: u32,
    pub denominator: u32,
}

impl Fraction {
    /// A percentage, 0–100.
    pub fn percent(p: u32) -> Fraction {
        Fraction {
            numerator: p.min(100),
            denominator: 100,
        }
    }

    /// Whether this request is among the share: true with probability
    /// `numerator / denominator`.
    pub fn sample(&self, rng: &mut impl rand::Rng) -> bool {
        self.denominator > 0 && rng.random_range(0..self.denominator) < self.numerator
    }
}

/// `rules[].timeouts` (GEP-1742).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Timeouts {
    /// Whole request, retries included; 504 when exceeded.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_ms: Option<u64>,
    /// Each attempt to a backend; 504 when exceeded (retried when the rule
    /// has retries and the method is idempotent or 504 is in the retry
    /// codes).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backend_request_ms: Option<u64>,
}

/// `rules[].retry` (GEP-1731).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Retry {
    /// Retryable response status codes (5xx). Failing to reach a backend at
    /// all is always retryable.
    #[serde(default)]
    pub codes: Vec<u16>,
    /// Retries after the first attempt.
    pub attempts: u32,
    /// Wait before the first retry; doubles for each further retry.
    #[serde(default)]
    pub backoff_ms: u64,
}

/// A Gateway API `GRPCRoute` attached to a Service.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrpcRoute {
    #[serde(flatten)]
    pub id: ObjectRef,
    #[serde(default)]
    pub created_unix: i64,
    pub parents: Vec<ParentRef>,
    pub rules: Vec<GrpcRouteRule>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GrpcRouteRule {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub matches: Vec<GrpcRouteMatch>,
    /// Header modifiers and mirrors (redirects and rewrites are not defined
    /// for gRPC).
    pub filters: Vec<HttpFilter>,
    pub backends: Vec<BackendRef>,
    pub timeouts: Timeouts,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry: Option<Retry>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GrpcRouteMatch {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub method: Option<GrpcMethodMatch>,
    pub headers: Vec<ValueMatch>,
}

/// Matches `/<service>/<method>`; an absent part matches any.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GrpcMethodMatch {
    #[serde(rename = "type")]
    pub kind: ValueMatchKind,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
}

/// A Sluice `AccessPolicy`: who may reach a Service. Once any policy targets
/// a service, connections and requests to its endpoints are denied unless one
/// rule of one such policy allows them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccessPolicy {
    #[serde(flatten)]
    pub id: ObjectRef,
    /// The Service whose endpoints the policy protects.
    pub target: ObjectRef,
    pub rules: Vec<AccessRule>,
}

/// Allows callers matching any `from` entry (all callers when empty), for
/// requests matching `to` (every connection or request when absent).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AccessRule {
    pub from: Vec<AccessSource>,
    /// HTTP conditions. A rule with conditions never allows opaque TCP,
    /// whose method and path the proxy cannot see.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub to: Option<HttpConditions>,
}

/// One kind of caller.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum AccessSource {
    /// An exact SPIFFE ID.
    Identity(SpiffeId),
    /// Any workload in this namespace.
    Namespace(String),
    /// One service account.
    ServiceAccount(ObjectRef),
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpConditions {
    /// Allowed methods; any when empty.
    pub methods: Vec<String>,
    /// Allowed paths; any when empty.
    pub paths: Vec<PathCondition>,
}

/// A path an HTTP condition allows.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum PathCondition {
    /// This path and no other (a `*` in it is a character like the rest).
    Exact(String),
    /// This path and what is under it, by whole segments: `/a` (or `/a/`)
    /// allows `/a`, `/a/` and `/a/b`, never `/ab`; `/` allows every path.
    Subtree(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fraction_samples_its_share() {
        use rand::SeedableRng;
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let count = |f: Fraction, rng: &mut rand::rngs::StdRng| {
            (0..100_000).filter(|_| f.sample(rng)).count()
        };
        let f = |n, d| Fraction {
            numerator: n,
            denominator: d,
        };
        assert_eq!(count(f(0, 1), &mut rng), 0);
        assert_eq!(count(f(1, 1), &mut rng), 100_000);
        assert_eq!(count(f(5, 0), &mut rng), 0, "no denominator, no share");
        // Binomial(100000, 1/1000): mean 100, standard deviation 10.
        let n = count(f(1, 1000), &mut rng);
        assert!((50..=150).contains(&n), "{n}");
        let n = count(Fraction::percent(30), &mut rng);
        assert!((29_000..=31_000).contains(&n), "{n}");
        assert_eq!(Fraction::percent(250), f(100, 100));
    }

    #[test]
    fn snapshot_round_trips_through_json() {
        let json = r#"{
          "services": [{"namespace": "shop", "name": "cart", "vips": ["10.96.0.10"],
            "ports": [{"port": 80, "target_port": 8080}],
            "endpoints": [{"ip": "10.0.1.5", "ready": true, "node_proxy": "192.168.1.2:15008",
              "identity": "spiffe://cluster.local/ns/shop/sa/cart"}]}],
          "local_workloads": [{"ip": "10.0.0.9", "namespace": "shop", "name": "web-1",
            "service_account": "web", "identity": "spiffe://cluster.local/ns/shop/sa/web",
            "mtls_mode": "STRICT"}],
          "http_routes": [{"namespace": "shop", "name": "cart", "parents": [{"namespace": "shop", "name": "cart"}],
            "rules": [{"matches": [{"path": {"type": "PathPrefix", "value": "/v2"},
              "headers": [{"name": "x-canary", "value": "1"}]}],
              "filters": [{"type": "URLRewrite", "path": {"type": "ReplacePrefixMatch", "value": "/"}}],
              "backends": [{"namespace": "shop", "name": "cart", "port": 80, "weight": 3}],
              "timeouts": {"request_ms": 1000},
              "retry": {"codes": [503], "attempts": 2, "backoff_ms": 10}}]}],
          "access_policies": [{"namespace": "shop", "name": "only-web", "target": {"namespace": "shop", "name": "cart"},
            "rules": [{"from": [{"serviceAccount": {"namespace": "shop", "name": "web"}}],
              "to": {"methods": ["GET"]}}]}]
        }"#;
        let snap: Snapshot = serde_json::from_str(json).expect("valid snapshot");
        assert_eq!(
            snap.services[0].endpoints[0]
                .identity
                .as_ref()
                .unwrap()
                .to_string(),
            "spiffe://cluster.local/ns/shop/sa/cart"
        );
        assert_eq!(snap.local_workloads[0].mtls_mode, MtlsMode::Strict);
        let rule = &snap.http_routes[0].rules[0];
        assert_eq!(
            rule.matches[0].path,
            Some(PathMatch::PathPrefix("/v2".into()))
        );
        assert_eq!(rule.backends[0].weight, 3);
        assert_eq!(
            rule.filters[0],
            HttpFilter::UrlRewrite(UrlRewrite {
                hostname: None,
                path: Some(PathModifier::ReplacePrefixMatch("/".into()))
            })
        );
        let again: Snapshot = serde_json::from_str(&serde_json::to_string(&snap).unwrap()).unwrap();
        assert_eq!(again, snap);
    }

    #[test]
    fn unknown_fields_are_rejected_with_their_name() {
        let err = serde_json::from_str::<ProxySettings>(r#"{"outbound_adr": "127.0.0.1:1"}"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("outbound_adr"), "{err}");
    }

    #[test]
    fn the_idle_timeouts_former_name_still_reads() {
        let s: ProxySettings =
            serde_json::from_str(r#"{"request_body_idle_timeout_ms": 5}"#).unwrap();
        assert_eq!(s.exchange_idle_timeout_ms, 5);
    }

    #[test]
    fn an_exchange_idle_timeout_of_zero_is_none() {
        let mut s = ProxySettings::default();
        assert_eq!(s.exchange_idle_timeout(), Duration::from_secs(300));
        s.exchange_idle_timeout_ms = 0;
        assert!(s.exchange_idle_timeout() > Duration::from_secs(86_400 * 365));
        // As documented for the TCP idle timeout, not "close at once".
        s.tcp_idle_timeout_ms = 0;
        assert!(s.tcp_idle_timeout() > Duration::from_secs(86_400 * 365));
    }
}
