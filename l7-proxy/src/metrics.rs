//! Prometheus metrics (`prometheus-client`), registered in a [`Registry`] that
//! the agent serves on its admin port.

use prometheus_client::{
    encoding::{EncodeLabelSet, EncodeLabelValue},
    metrics::{counter::Counter, family::Family, histogram::Histogram},
    registry::Registry,
};

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum Direction {
    Outbound,
    Inbound,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub direction: Direction,
    pub source: String,
    pub destination: String,
    pub route: String,
    pub status_class: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LatencyLabels {
    pub direction: Direction,
    pub source: String,
    pub destination: String,
    pub route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TcpLabels {
    pub direction: Direction,
    pub source: String,
    pub destination: String,
    /// `true` when carried by the mTLS tunnel.
    pub secured: bool,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TlsFailureLabels {
    pub direction: Direction,
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DenialLabels {
    pub source: String,
    pub destination: String,
    pub protocol: String,
}

/// The proxy's metric families.
#[derive(Clone)]
pub struct Metrics {
    pub requests: Family<RequestLabels, Counter>,
    pub request_duration: Family<LatencyLabels, Histogram>,
    pub tcp_connections: Family<TcpLabels, Counter>,
    pub tcp_bytes_sent: Family<TcpLabels, Counter>,
    pub tcp_bytes_received: Family<TcpLabels, Counter>,
    pub tls_handshake_failures: Family<TlsFailureLabels, Counter>,
    pub policy_denials: Family<DenialLabels, Counter>,
}

fn latency_histogram() -> Histogram {
    Histogram::new([
        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    ])
}

impl Metrics {
    /// Creates the families and registers them under the `sluice` prefix.
    pub fn new(registry: &mut Registry) -> Self {
        let m = Metrics {
            requests: Family::default(),
            request_duration: Family::new_with_constructor(latency_histogram),
            tcp_connections: Family::default(),
            tcp_bytes_sent: Family::default(),
            tcp_bytes_received: Family::default(),
            tls_handshake_failures: Family::default(),
            policy_denials: Family::default(),
        };
        let r = registry.sub_registry_with_prefix("sluice");
        r.register(
            "requests",
            "HTTP requests by source and destination identity, route and status class",
            m.requests.clone(),
        );
        r.register(
            "request_duration_seconds",
            "HTTP request latency, first byte of the response",
            m.request_duration.clone(),
        );
        r.register(
            "tcp_connections",
            "Opaque TCP connections proxied",
            m.tcp_connections.clone(),
        );
        r.register(
            "tcp_sent_bytes",
            "Bytes sent towards the destination of opaque TCP connections",
            m.tcp_bytes_sent.clone(),
        );
        r.register(
            "tcp_received_bytes",
            "Bytes received from the destination of opaque TCP connections",
            m.tcp_bytes_received.clone(),
        );
        r.register(
            "tls_handshake_failures",
            "Failed TLS handshakes with peer proxies, by reason",
            m.tls_handshake_failures.clone(),
        );
        r.register(
            "policy_denials",
            "Connections and requests denied by MeshPolicy or AccessPolicy",
            m.policy_denials.clone(),
        );
        m
    }
}

/// `2xx`, `4xx`… for a status code.
pub fn status_class(status: u16) -> String {
    format!("{}xx", status / 100)
}
