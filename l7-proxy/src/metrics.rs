//! Prometheus metrics (`prometheus-client`), registered in a [`Registry`] that
//! the agent serves on its admin port.

use std::{fmt::Write as _, sync::Arc};

use prometheus_client::{
    encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder},
    metrics::{counter::Counter, family::Family, histogram::Histogram},
    registry::Registry,
};

/// A label value shared rather than copied: identities and route names are
/// made once per snapshot or connection, not once per request.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct Label(Arc<str>);

impl Default for Label {
    /// The empty label, one shared string for the whole process.
    fn default() -> Self {
        static EMPTY: std::sync::LazyLock<Label> = std::sync::LazyLock::new(|| Label("".into()));
        EMPTY.clone()
    }
}

/// The destination label of traffic to an address the configuration does
/// not know (neither a service nor a workload): one series for all of them,
/// so that a workload reaching many outside addresses cannot grow the
/// metrics without bound. The connection table and access log keep the
/// address.
pub const EXTERNAL: &str = "external";

impl Label {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// [`EXTERNAL`], one shared string for the whole process.
    pub fn external() -> Self {
        static EXT: std::sync::LazyLock<Label> =
            std::sync::LazyLock::new(|| Label(EXTERNAL.into()));
        EXT.clone()
    }

    /// The same shared string (not merely an equal one).
    pub fn same(&self, other: &Label) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl From<&str> for Label {
    fn from(s: &str) -> Self {
        Label(s.into())
    }
}

impl From<String> for Label {
    fn from(s: String) -> Self {
        Label(s.into())
    }
}

impl std::fmt::Display for Label {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl EncodeLabelValue for Label {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), std::fmt::Error> {
        encoder.write_str(&self.0)
    }
}

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum Direction {
    Outbound,
    Inbound,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub direction: Direction,
    pub source: Label,
    pub destination: Label,
    pub route: Label,
    pub status_class: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LatencyLabels {
    pub direction: Direction,
    pub source: Label,
    pub destination: Label,
    pub route: Label,
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
    /// Mirrored requests not sent: too many mirrors in flight.
    pub mirrors_dropped: Counter,
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
            mirrors_dropped: Counter::default(),
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
        r.register(
            "mirrors_dropped",
            "Mirrored requests not sent because max_mirrors_in_flight were in flight",
            m.mirrors_dropped.clone(),
        );
        m
    }
}

/// The request counter and latency histogram of one label set.
#[derive(Clone)]
pub struct RequestMetrics {
    pub requests: Counter,
    pub duration: Histogram,
}

/// Request metric handles of one connection, found by the identity of their
/// destination and route labels (shared per snapshot) instead of by hashing
/// every label string of every request into the families.
#[derive(Default)]
pub struct RequestMetricsCache {
    entries: std::sync::Mutex<Vec<(Label, Label, &'static str, RequestMetrics)>>,
}

impl std::fmt::Debug for RequestMetricsCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RequestMetricsCache")
    }
}

/// Entries kept per connection; a connection that meets more label sets
/// starts over (a new snapshot's labels, say).
const CACHE_ENTRIES: usize = 16;

impl RequestMetricsCache {
    pub fn get(
        &self,
        metrics: &Metrics,
        direction: Direction,
        source: &Label,
        destination: &Label,
        route: &Label,
        status_class: &'static str,
    ) -> RequestMetrics {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, _, _, m)) = entries.iter().find(|(d, r, s, _)| {
            d.same(destination) && r.same(route) && std::ptr::eq(*s, status_class)
        }) {
            return m.clone();
        }
        let m = RequestMetrics {
            requests: metrics
                .requests
                .get_or_create(&RequestLabels {
                    direction,
                    source: source.clone(),
                    destination: destination.clone(),
                    route: route.clone(),
                    status_class,
                })
                .clone(),
            duration: metrics
                .request_duration
                .get_or_create(&LatencyLabels {
                    direction,
                    source: source.clone(),
                    destination: destination.clone(),
                    route: route.clone(),
                })
                .clone(),
        };
        if entries.len() >= CACHE_ENTRIES {
            entries.clear();
        }
        entries.push((destination.clone(), route.clone(), status_class, m.clone()));
        m
    }
}

/// `2xx`, `4xx`… for a status code.
pub fn status_class(status: u16) -> &'static str {
    match status / 100 {
        1 => "1xx",
        2 => "2xx",
        3 => "3xx",
        4 => "4xx",
        _ => "5xx",
    }
}
