//! Prometheus metrics (`prometheus-client`), registered in a [`Registry`] that
//! the agent serves on its admin port.

use std::{
    fmt::Write as _,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, ready},
    time::Duration,
};

use http::{HeaderName, HeaderValue, Response};
use prometheus_client::{
    encoding::{EncodeLabel, EncodeLabelSet, EncodeLabelValue, LabelSetEncoder, LabelValueEncoder},
    metrics::{counter::Counter, family::Family, histogram::Histogram},
    registry::Registry,
};

use crate::body::{Body, BoxError};

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
    #[prometheus(flatten)]
    pub grpc_status: GrpcStatus,
}

/// The `grpc_status` label of a gRPC call: its status code (`0` to `16`,
/// `unknown` for a call that ended without a valid one), and no label at
/// all for a request that is not a gRPC call.
#[derive(Clone, Copy, Debug, Default, Hash, PartialEq, Eq)]
pub struct GrpcStatus(Option<&'static str>);

const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");

impl GrpcStatus {
    /// Not a gRPC call: no label.
    pub const NONE: GrpcStatus = GrpcStatus(None);

    /// From a `grpc-status` field's value, or its absence.
    pub fn from_field(v: Option<&HeaderValue>) -> Self {
        const CODES: [&str; 17] = [
            "0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "11", "12", "13", "14", "15",
            "16",
        ];
        // As gRPC writes them: no sign, no leading zero.
        let code = match v.map(HeaderValue::as_bytes) {
            Some([d @ b'0'..=b'9']) => Some(usize::from(d - b'0')),
            Some([b'1', d @ b'0'..=b'6']) => Some(10 + usize::from(d - b'0')),
            _ => None,
        };
        GrpcStatus(Some(code.map_or("unknown", |c| CODES[c])))
    }

    /// The label's value, if the request is a gRPC call.
    pub fn as_str(&self) -> Option<&'static str> {
        self.0
    }
}

impl EncodeLabelSet for GrpcStatus {
    fn encode(&self, encoder: &mut LabelSetEncoder<'_>) -> Result<(), std::fmt::Error> {
        match self.0 {
            Some(code) => ("grpc_status", code).encode(encoder.encode_label()),
            None => Ok(()),
        }
    }
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
    // From 50 us: a request through a pair of node proxies takes a few
    // hundred microseconds (benches/RESULTS.md), all in one bucket below
    // 0.5 ms otherwise.
    Histogram::new([
        0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
        1.0, 2.5, 5.0, 10.0,
    ])
}

impl Metrics {
    /// Counts a request whose caller went away before its answer's head
    /// (reset its stream, closed its connection): status class
    /// [`CANCELLED`], and `grpc_status` `1` (`CANCELLED`) for a gRPC call,
    /// with no latency (so not through a [`RequestMetricsCache`], whose
    /// entries hold a latency histogram too).
    pub fn count_cancelled(&self, key: RequestKey<'_>, grpc: bool) {
        let grpc_status = if grpc {
            GrpcStatus(Some("1"))
        } else {
            GrpcStatus::NONE
        };
        self.requests
            .get_or_create(&key.labels(CANCELLED, grpc_status))
            .inc();
    }

    /// Counts a request whose head the proxy refused before it was a
    /// request (malformed, too large, too slow): by the class of the
    /// `status` it was answered with, with no latency (it has no start the
    /// caller would measure: a stalled head's is its first byte).
    pub fn count_refused_head(&self, key: RequestKey<'_>, status: u16) {
        self.requests
            .get_or_create(&key.labels(status_class(status), GrpcStatus::NONE))
            .inc();
    }

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
            "HTTP requests by source and destination identity, route, status class and, for \
             gRPC calls, grpc-status",
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
            "Connections and requests the inbound side refused: denied by MeshPolicy or \
             AccessPolicy, or for a target the caller may not reach there (not a workload of \
             this node, another identity than the one it asked for, opaque TCP to an HTTP port)",
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
    entries: std::sync::Mutex<Vec<CacheEntry>>,
}

/// Destination, route, status class and gRPC status: the labels that vary
/// within one connection.
type CacheEntry = (Label, Label, &'static str, GrpcStatus, RequestMetrics);

/// A request's answer, as [`RequestMetricsCache::count`] takes it.
pub struct Answer<'a> {
    /// The HTTP status the proxy chose (a gRPC caller gets the proxy's
    /// refusals as `200` with a `grpc-status`).
    pub status: u16,
    pub response: &'a mut Response<Body>,
    /// A gRPC call whose status comes in HTTP trailers
    /// ([`crate::body::has_grpc_trailers`]).
    pub grpc: bool,
    /// The time to the answer's head.
    pub elapsed: Duration,
    /// The request's access record, if one is written: emitted by `count`
    /// with the request's `grpc_status`, at once or (a call counted once
    /// its status passes) then.
    pub log: Option<crate::accesslog::AccessRecord<'a>>,
}

/// The labels of a request that are known before its answer.
pub struct RequestKey<'a> {
    pub direction: Direction,
    pub source: &'a Label,
    pub destination: &'a Label,
    pub route: &'a Label,
}

impl RequestKey<'_> {
    fn labels(&self, status_class: &'static str, grpc_status: GrpcStatus) -> RequestLabels {
        RequestLabels {
            direction: self.direction,
            source: self.source.clone(),
            destination: self.destination.clone(),
            route: self.route.clone(),
            status_class,
            grpc_status,
        }
    }

    fn latency(&self) -> LatencyLabels {
        LatencyLabels {
            direction: self.direction,
            source: self.source.clone(),
            destination: self.destination.clone(),
            route: self.route.clone(),
        }
    }
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
    /// Counts a request answered with `resp` after `elapsed`: the time to
    /// the answer's head in `request_duration`, and the request in
    /// `requests` by the class of `status` (the HTTP status the proxy
    /// chose: a gRPC caller gets its refusals as `200` with a `grpc-status`)
    /// and, for a gRPC call (`grpc`: one whose status comes in HTTP
    /// trailers, see [`crate::body::has_grpc_trailers`]), its
    /// `grpc-status`. A gRPC answer whose head does not carry the status
    /// (that is, not a trailers-only answer) is counted once its trailers
    /// pass, which for a long stream is when it ends (see
    /// [`CountOnStatus`]).
    ///
    /// Returns the call's gRPC status when it is known now ([`GrpcStatus::NONE`]
    /// for a request that is not a gRPC call), `None` when it is counted
    /// later. The answer's `log`, if any, is emitted with that status, now
    /// or then.
    pub fn count(
        &self,
        metrics: &Metrics,
        key: RequestKey<'_>,
        answer: Answer<'_>,
    ) -> Option<GrpcStatus> {
        let Answer {
            status,
            response: resp,
            grpc,
            elapsed,
            log,
        } = answer;
        let status_class = status_class(status);
        // A request that is not a gRPC call looks up no field.
        let field = if grpc {
            resp.headers().get(GRPC_STATUS)
        } else {
            None
        };
        let grpc_status = match field {
            _ if !grpc => GrpcStatus::NONE,
            Some(v) => GrpcStatus::from_field(Some(v)),
            None if http_body::Body::is_end_stream(resp.body()) => GrpcStatus::from_field(None),
            None => {
                let labels = key.labels(status_class, GrpcStatus::NONE);
                metrics
                    .request_duration
                    .get_or_create(&key.latency())
                    .observe(elapsed.as_secs_f64());
                let inner = std::mem::replace(resp.body_mut(), crate::body::empty());
                *resp.body_mut() = crate::body::boxed(CountOnStatus {
                    inner,
                    pending: Some((
                        metrics.requests.clone(),
                        labels,
                        log.as_ref().and_then(crate::accesslog::AccessRecord::defer),
                    )),
                });
                return None;
            }
        };
        let m = self.get(metrics, key, status_class, grpc_status);
        m.requests.inc();
        m.duration.observe(elapsed.as_secs_f64());
        if let Some(mut record) = log {
            record.grpc_status = grpc_status.as_str();
            record.emit();
        }
        Some(grpc_status)
    }

    fn get(
        &self,
        metrics: &Metrics,
        key: RequestKey<'_>,
        status_class: &'static str,
        grpc_status: GrpcStatus,
    ) -> RequestMetrics {
        let (destination, route) = (key.destination, key.route);
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, _, _, _, m)) = entries.iter().find(|(d, r, s, g, _)| {
            d.same(destination)
                && r.same(route)
                && std::ptr::eq(*s, status_class)
                && *g == grpc_status
        }) {
            return m.clone();
        }
        let m = RequestMetrics {
            requests: metrics
                .requests
                .get_or_create(&key.labels(status_class, grpc_status))
                .clone(),
            duration: metrics
                .request_duration
                .get_or_create(&key.latency())
                .clone(),
        };
        if entries.len() >= CACHE_ENTRIES {
            entries.clear();
        }
        entries.push((
            destination.clone(),
            route.clone(),
            status_class,
            grpc_status,
            m.clone(),
        ));
        m
    }
}

/// A gRPC answer's body that counts its call in `requests` once the
/// call's `grpc-status` has passed in the trailers; `unknown` when the
/// body ends or fails without one, `1` (`CANCELLED`) when it is dropped
/// before its end (the caller went away).
/// Its access record, if any, is emitted then too.
struct CountOnStatus {
    inner: Body,
    pending: Option<(
        Family<RequestLabels, Counter>,
        RequestLabels,
        Option<crate::accesslog::Deferred>,
    )>,
}

impl CountOnStatus {
    fn count(&mut self, status: GrpcStatus) {
        if let Some((family, mut labels, log)) = self.pending.take() {
            labels.grpc_status = status;
            family.get_or_create(&labels).inc();
            if let (Some(log), Some(code)) = (log, status.as_str()) {
                log.emit(code);
            }
        }
    }
}

impl http_body::Body for CountOnStatus {
    type Data = bytes::Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let frame = ready!(Pin::new(&mut self.inner).poll_frame(cx));
        match &frame {
            Some(Ok(f)) => {
                if let Some(t) = f.trailers_ref() {
                    self.count(GrpcStatus::from_field(t.get(GRPC_STATUS)));
                }
            }
            Some(Err(_)) | None => self.count(GrpcStatus::from_field(None)),
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for CountOnStatus {
    fn drop(&mut self) {
        // A body that said it had ended (its reader need not poll again)
        // ended without a status.
        let status = if http_body::Body::is_end_stream(&self.inner) {
            GrpcStatus::from_field(None)
        } else {
            GrpcStatus(Some("1"))
        };
        self.count(status);
    }
}

/// The status class of a request whose caller went away before its answer.
pub const CANCELLED: &str = "cancelled";

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

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use http::HeaderMap;
    use http_body_util::BodyExt;

    use super::*;

    fn registry() -> (Registry, Metrics) {
        let mut r = Registry::default();
        let m = Metrics::new(&mut r);
        (r, m)
    }

    fn text(r: &Registry) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, r).unwrap();
        out
    }

    /// The `sluice_requests_total` lines, without the labels every test
    /// shares.
    fn requests(r: &Registry) -> Vec<String> {
        let mut v: Vec<String> = text(r)
            .lines()
            .filter(|l| l.starts_with("sluice_requests_total{"))
            .map(|l| {
                l.replace(
                    "direction=\"Outbound\",source=\"a\",destination=\"b\",route=\"r\",",
                    "",
                )
            })
            .collect();
        v.sort();
        v
    }

    fn count(cache: &RequestMetricsCache, m: &Metrics, resp: &mut Response<Body>, grpc: bool) {
        let (a, b, r) = (Label::from("a"), Label::from("b"), Label::from("r"));
        let key = RequestKey {
            direction: Direction::Outbound,
            source: &a,
            destination: &b,
            route: &r,
        };
        let status = resp.status().as_u16();
        let answer = Answer {
            status,
            response: resp,
            grpc,
            elapsed: Duration::from_millis(1),
            log: None,
        };
        cache.count(m, key, answer);
    }

    /// A gRPC answer: a message, then trailers with `status` (none when
    /// `None`).
    fn grpc_answer(status: Option<&'static str>) -> Response<Body> {
        let frames = [Ok::<_, BoxError>(http_body::Frame::data(
            Bytes::from_static(b"\0\0\0\0\0"),
        ))]
        .into_iter()
        .chain(status.map(|s| {
            let mut t = HeaderMap::new();
            t.insert("grpc-status", HeaderValue::from_static(s));
            Ok(http_body::Frame::trailers(t))
        }));
        Response::new(
            http_body_util::StreamBody::new(futures_util::stream::iter(frames)).boxed_unsync(),
        )
    }

    #[test]
    fn grpc_status_values_are_codes_or_unknown() {
        let f =
            |v: &'static str| GrpcStatus::from_field(Some(&HeaderValue::from_static(v))).as_str();
        assert_eq!(f("0"), Some("0"));
        assert_eq!(f("14"), Some("14"));
        assert_eq!(f("16"), Some("16"));
        for bad in ["17", "99", "014", "01", "+1", "-1", "", "x", "1 "] {
            assert_eq!(f(bad), Some("unknown"), "{bad:?}");
        }
        assert_eq!(GrpcStatus::from_field(None).as_str(), Some("unknown"));
        assert_eq!(GrpcStatus::NONE.as_str(), None);
    }

    #[tokio::test]
    async fn a_grpc_call_is_counted_by_the_status_in_its_trailers_once_they_pass() {
        let (r, m) = registry();
        let cache = RequestMetricsCache::default();
        let mut resp = grpc_answer(Some("14"));
        count(&cache, &m, &mut resp, true);
        assert_eq!(
            requests(&r),
            Vec::<String>::new(),
            "not before the status is known"
        );
        assert!(text(&r).contains("sluice_request_duration_seconds_count{direction=\"Outbound\",source=\"a\",destination=\"b\",route=\"r\"} 1"), "{}", text(&r));
        let body = resp.into_body().collect().await.unwrap();
        assert_eq!(
            body.trailers().unwrap()["grpc-status"],
            "14",
            "the trailers pass on"
        );
        assert_eq!(
            requests(&r),
            ["sluice_requests_total{status_class=\"2xx\",grpc_status=\"14\"} 1"]
        );

        let mut ok = grpc_answer(Some("0"));
        count(&cache, &m, &mut ok, true);
        ok.into_body().collect().await.unwrap();
        assert_eq!(
            requests(&r),
            [
                "sluice_requests_total{status_class=\"2xx\",grpc_status=\"0\"} 1",
                "sluice_requests_total{status_class=\"2xx\",grpc_status=\"14\"} 1"
            ]
        );
    }

    #[tokio::test]
    async fn a_grpc_call_without_a_status_or_cut_short_is_counted_once_as_such() {
        let (r, m) = registry();
        let cache = RequestMetricsCache::default();
        // Ends without trailers.
        let mut resp = grpc_answer(None);
        count(&cache, &m, &mut resp, true);
        resp.into_body().collect().await.unwrap();
        // Dropped after its message, before its trailers: the caller went.
        let mut resp = grpc_answer(Some("0"));
        count(&cache, &m, &mut resp, true);
        let mut body = resp.into_body();
        assert!(body.frame().await.unwrap().unwrap().is_data());
        drop(body);
        // Dropped once it has said it ended (its reader need not poll for
        // the end): ended without a status.
        let mut resp = Response::new(crate::body::full("\0\0\0\0\0"));
        count(&cache, &m, &mut resp, true);
        let mut body = resp.into_body();
        assert!(body.frame().await.unwrap().unwrap().is_data());
        assert!(http_body::Body::is_end_stream(&body));
        drop(body);
        // Fails.
        let mut resp = Response::new(
            http_body_util::StreamBody::new(futures_util::stream::iter([Err::<
                http_body::Frame<Bytes>,
                BoxError,
            >(
                "reset".into()
            )]))
            .boxed_unsync(),
        );
        count(&cache, &m, &mut resp, true);
        assert!(resp.into_body().collect().await.is_err());
        assert_eq!(
            requests(&r),
            [
                "sluice_requests_total{status_class=\"2xx\",grpc_status=\"1\"} 1",
                "sluice_requests_total{status_class=\"2xx\",grpc_status=\"unknown\"} 3"
            ]
        );
    }

    /// The latency histogram tells a 0.2 ms request from a 0.4 ms one: the
    /// proxy pair's own latencies (benches/RESULTS.md) sit below 0.5 ms.
    #[test]
    fn the_latency_histogram_resolves_sub_millisecond_requests() {
        let h = latency_histogram();
        for secs in [0.00004, 0.0002, 0.0004] {
            h.observe(secs);
        }
        let mut r = Registry::default();
        r.register("h", "test", h);
        let out = text(&r);
        for (le, n) in [("0.00005", 1), ("0.0001", 1), ("0.00025", 2), ("0.0005", 3)] {
            assert!(
                out.contains(&format!("h_bucket{{le=\"{le}\"}} {n}")),
                "le={le}: {out}"
            );
        }
    }

    #[test]
    fn a_request_whose_caller_went_away_is_counted_cancelled() {
        let (r, m) = registry();
        let (a, b, rt) = (Label::from("a"), Label::from("b"), Label::from("r"));
        for grpc in [false, true, true] {
            let key = RequestKey {
                direction: Direction::Outbound,
                source: &a,
                destination: &b,
                route: &rt,
            };
            m.count_cancelled(key, grpc);
        }
        assert_eq!(
            requests(&r),
            [
                "sluice_requests_total{status_class=\"cancelled\",grpc_status=\"1\"} 2",
                "sluice_requests_total{status_class=\"cancelled\"} 1"
            ]
        );
        assert!(
            !text(&r).contains("sluice_request_duration_seconds_count"),
            "no latency without an answer"
        );
    }

    #[test]
    fn grpc_web_has_its_status_in_the_body_not_in_trailers() {
        let with = |ct: &'static str| {
            let mut h = HeaderMap::new();
            h.insert(http::header::CONTENT_TYPE, HeaderValue::from_static(ct));
            crate::body::has_grpc_trailers(&h)
        };
        for ct in [
            "application/grpc",
            "application/grpc+proto",
            "application/grpc;charset=utf-8",
        ] {
            assert!(with(ct), "{ct}");
        }
        for ct in [
            "application/grpc-web",
            "application/grpc-web+proto",
            "application/grpc-web-text",
            "application/json",
        ] {
            assert!(!with(ct), "{ct}");
        }
        assert!(!crate::body::has_grpc_trailers(&HeaderMap::new()));
    }

    #[test]
    fn trailers_only_answers_and_other_requests_are_counted_at_once() {
        let (r, m) = registry();
        let cache = RequestMetricsCache::default();
        // Trailers-only: the status is in the head.
        let mut resp =
            crate::body::proxy_answer(http::StatusCode::GATEWAY_TIMEOUT, "too slow", true);
        assert!(resp.headers().contains_key("grpc-status"));
        count(&cache, &m, &mut resp, true);
        // Counted with the status the proxy chose, not the 200 it sends.
        let mut resp =
            crate::body::proxy_answer(http::StatusCode::GATEWAY_TIMEOUT, "too slow", true);
        let (a, b, rt) = (Label::from("a"), Label::from("b"), Label::from("r"));
        let key = RequestKey {
            direction: Direction::Outbound,
            source: &a,
            destination: &b,
            route: &rt,
        };
        let answer = Answer {
            status: 504,
            response: &mut resp,
            grpc: true,
            elapsed: Duration::ZERO,
            log: None,
        };
        assert_eq!(
            cache.count(&m, key, answer).and_then(|s| s.as_str()),
            Some("4")
        );
        // A gRPC call answered with no body and no status.
        let mut resp = Response::new(crate::body::empty());
        count(&cache, &m, &mut resp, true);
        // Not gRPC: no grpc_status label, whatever the answer carries.
        let mut resp = grpc_answer(Some("3"));
        *resp.status_mut() = http::StatusCode::NOT_FOUND;
        count(&cache, &m, &mut resp, false);
        assert_eq!(
            requests(&r),
            [
                "sluice_requests_total{status_class=\"2xx\",grpc_status=\"4\"} 1",
                "sluice_requests_total{status_class=\"2xx\",grpc_status=\"unknown\"} 1",
                "sluice_requests_total{status_class=\"4xx\"} 1",
                "sluice_requests_total{status_class=\"5xx\",grpc_status=\"4\"} 1"
            ]
        );
    }
}
