//! Outbound HTTP, one request at a time: route, apply filters, choose a
//! backend and an endpoint, send through the tunnel (or directly), retry,
//! mirror, time out.

use std::{convert::Infallible, net::SocketAddr, sync::Arc, time::Duration};

use http::{
    HeaderValue, Request, Response, StatusCode, Uri, Version,
    request::Parts,
    uri::{Authority, PathAndQuery, Scheme},
};
use http_body_util::BodyExt;
use hyper::upgrade::OnUpgrade;
use rand::Rng;
use tokio::time::Instant;

use crate::{
    accesslog::AccessRecord,
    body::{Body, boxed, proxy_response, remove_mesh_headers, strip_hop_by_hop},
    config::{
        BackendRef, HttpFilter, LocalWorkload, PROTOCOL, REASON, TARGET, TIMEOUT, UNREACHABLE,
    },
    conntable::{ConnKind, ConnMeta},
    filters,
    metrics::{Answer, Direction, Label, RequestKey, RequestMetricsCache, TcpLabels},
    proxy::Shared,
    replay::{BodyFailure, Recording, Replayable},
    router::{Decision, RequestView},
    sniff::Protocol,
    state::{Destination, ServiceDest, State, Upstream},
    tunnel::{TunnelError, TunnelKey},
};

/// A captured HTTP connection.
#[derive(Debug)]
pub struct HttpConn {
    pub source: Arc<LocalWorkload>,
    /// The source identity as a metric label.
    pub source_label: Label,
    pub client_addr: SocketAddr,
    pub original_dst: SocketAddr,
    pub protocol: Protocol,
    /// Metric handles of this connection's requests.
    pub metrics: RequestMetricsCache,
    /// Its row in the connection table (`None` in tests without one).
    pub row: Option<crate::conntable::RowRef>,
}

/// What happened to one request, for metrics and the access log.
struct Outcome {
    response: Response<Body>,
    route: Label,
    /// The service (or workload) the request was for.
    destination: Label,
    /// The endpoint that answered, if one did.
    upstream: Option<Arc<Upstream>>,
    /// When none answered, the endpoint the last attempt went to: the
    /// access log names the identity it was sent to, across the tunnel.
    tried: Option<Arc<Upstream>>,
    attempts: u32,
    reason: Option<String>,
}

impl Outcome {
    fn local(status: StatusCode, reason: String, route: Label, destination: Label) -> Outcome {
        Outcome {
            response: proxy_response(status, &reason),
            route,
            destination,
            upstream: None,
            tried: None,
            attempts: 0,
            reason: Some(reason),
        }
    }
}

/// The one host of an HTTP/1.x request (RFC 9112 section 3.2), or why it
/// has none: more than one Host field (routing and each next hop could each
/// take another), none in HTTP/1.1, or one that is no host. An
/// absolute-form target's authority is the host, whatever Host says
/// (section 3.2.2): it replaces it, so that routing and the workload read
/// the same one. HTTP/2's `:authority` is the target's already.
fn settle_host(parts: &mut Parts) -> Option<&'static str> {
    if parts.version > Version::HTTP_11 {
        return None;
    }
    if let Some(a) = parts.uri.authority() {
        // `host:port` alone is CONNECT's form (RFC 9112 section 3.2.3);
        // another method has no path to route or send.
        if parts.uri.scheme().is_none() && parts.method != http::Method::CONNECT {
            return Some("an authority-form request target (host:port) is for CONNECT only");
        }
        if a.as_str().contains('@') {
            return Some("the request target's authority has user information");
        }
        return match HeaderValue::from_str(a.as_str()) {
            Ok(v) => {
                parts.headers.insert(http::header::HOST, v);
                None
            }
            Err(_) => Some("the request target's authority is no host"),
        };
    }
    let mut hosts = parts.headers.get_all(http::header::HOST).iter();
    match (hosts.next(), hosts.next()) {
        (Some(_), Some(_)) => Some("more than one host header"),
        (None, _) if parts.version == Version::HTTP_11 => {
            Some("no host header (an HTTP/1.1 request needs one)")
        }
        (None, _) => None,
        (Some(h), None) => {
            let v = h.as_bytes();
            (v.is_empty() || v.contains(&b'@') || Authority::try_from(v).is_err())
                .then_some("the host header is no host")
        }
    }
}

pub(crate) async fn handle(
    shared: Arc<Shared>,
    conn: Arc<HttpConn>,
    req: Request<Body>,
) -> Result<Response<Body>, Infallible> {
    let start = Instant::now();
    let state = shared.state();
    let (mut parts, body) = req.into_parts();
    // Before an HTTP/2 WebSocket becomes an HTTP/1.1 upgrade below.
    let caller_h1 = parts.version < Version::HTTP_2;
    // Nothing from the caller may pose as the mesh's own headers.
    remove_mesh_headers(&mut parts.headers);
    // Nor may its hop's headers undo a route's filters.
    crate::body::drop_connection_named(&mut parts.headers);
    // WebSocket over HTTP/2: from here on an HTTP/1.1 upgrade request.
    crate::upgrade::from_extended_connect(&mut parts);
    let host_problem = settle_host(&mut parts);
    // Routed, rewritten and sent as the workload will read it: a path that
    // spells a prefix (`/api/../admin`) must not be routed under it.
    if let Some(uri) = crate::router::normalized_path(parts.uri.path())
        .and_then(|path| filters::with_path(&parts.uri, &path))
    {
        parts.uri = uri;
    }
    let log = crate::accesslog::enabled();
    let grpc = crate::body::is_grpc(&parts.headers);
    // Counted by its grpc-status (gRPC-Web's is not in trailers).
    let grpc_counted = grpc && crate::body::has_grpc_trailers(&parts.headers);
    // A cut of its answer can end in trailers only for a caller that reads
    // them (an HTTP/1.1 one without `TE: trailers` would see a body that
    // looks whole).
    let grpc_trailers = grpc_counted
        && (parts.version == Version::HTTP_2 || crate::body::te_lists_trailers(&parts.headers));
    let method = parts.method.clone();
    let path = log.then(|| parts.uri.path().to_owned());
    // An exchange that moves in neither direction (request body, response
    // head, response body) for the idle timeout is ended: a workload that
    // never answers must not hold the caller, a tunnel stream and a pooled
    // connection for ever. A request body that sends nothing while its
    // response flows is not idle (a gRPC stream waiting for the server's
    // messages), nor is a response while its request's body flows.
    let idle = shared.settings.exchange_idle_timeout();
    let activity = crate::body::Activity::since(start);
    // A gRPC call's own deadline is waited for in full (a report that
    // takes 6 minutes to answer with `grpc-timeout: 10M`): GRPCRoute has
    // no timeouts of its own to say so. Its server enforces it.
    if grpc && let Some(t) = crate::body::grpc_timeout(&parts.headers, MAX_CALL_DEADLINE) {
        activity.hold_until(start + t);
    }
    let has_body = !http_body::Body::is_end_stream(&body);
    let body = if !has_body {
        body
    } else {
        boxed(crate::body::Timed::idle(
            body,
            idle,
            activity.clone(),
            ("the request body", "its response"),
        ))
    };
    let progress = Progress {
        start,
        labels: std::sync::OnceLock::new(),
        activity: activity.clone(),
    };
    // Dropped before the answer is counted: the caller went away.
    let mut cancelled = Cancelled {
        shared: &shared,
        conn: &conn,
        progress: &progress,
        method: &method,
        path: path.as_deref(),
        grpc: grpc_counted,
        armed: true,
    };
    // Boxed: the exchange is most of this future's size, and hyper moves
    // the request's future into place.
    let exchange = Box::pin(async {
        match state.destination(conn.original_dst) {
            // Which host would a next hop take?
            _ if host_problem.is_some() => Outcome::local(
                StatusCode::BAD_REQUEST,
                host_problem.unwrap_or_default().into(),
                Label::default(),
                Label::default(),
            ),
            // A dot segment some workloads resolve and others do not: no one
            // reading of it can be routed.
            _ if crate::router::dot_segment_read_loosely(parts.uri.path()) => Outcome::local(
                StatusCode::BAD_REQUEST,
                format!(
                    "path {:?} has a dot segment once `;` parameters are cut or encoded slashes \
                 or backslashes read as `/`; send it resolved",
                    parts.uri.path()
                ),
                Label::default(),
                Label::default(),
            ),
            // A CONNECT would cross the tunnel as an opaque stream to whatever
            // authority it names, past the route's choice of backend.
            _ if parts.method == http::Method::CONNECT => Outcome::local(
                StatusCode::METHOD_NOT_ALLOWED,
                "CONNECT is not proxied by the mesh; connect to the destination directly".into(),
                Label::default(),
                Label::default(),
            ),
            Destination::Service(d) => {
                route_request(&shared, &state, &conn, &d, parts, body, &progress).await
            }
            Destination::Workload(w) => {
                let up = Arc::new(State::workload_upstream(&w, conn.original_dst.port()));
                let dest = Label::from(w.id.to_string());
                let _ = progress.labels.set((Label::default(), dest.clone()));
                let (body, note) = crate::replay::noted(body);
                match send_once(&shared, &conn, &up, parts, body, Sent::ByCaller).await {
                    Ok(resp) => Outcome {
                        response: resp,
                        route: Label::default(),
                        destination: dest,
                        upstream: Some(up),
                        tried: None,
                        attempts: 1,
                        reason: None,
                    },
                    Err(e) => {
                        // The caller's body failed: that is the answer.
                        let (status, reason) = match note.as_ref().and_then(|n| n.get()) {
                            Some(f) => f.answer(),
                            None => (e.status, e.reason),
                        };
                        Outcome {
                            // Only when it may have crossed.
                            tried: e.crossed.then_some(up),
                            attempts: 1,
                            ..Outcome::local(status, reason, Label::default(), dest)
                        }
                    }
                }
            }
            Destination::External => Outcome::local(
                StatusCode::BAD_GATEWAY,
                format!("{} is not a meshed destination", conn.original_dst),
                Label::default(),
                Label::external(),
            ),
        }
    });
    // A stalled body's own timer runs out at the same moment: it says why
    // first (a 408 where the body is kept for retries), the watchdog a
    // little later only if that went nowhere.
    let watchdog = if has_body { idle + idle / 4 } else { idle };
    let mut outcome = match crate::body::until_idle(exchange, watchdog, &activity).await {
        Some(outcome) => outcome,
        None => {
            let (route, destination) = progress.labels.get().cloned().unwrap_or_default();
            Outcome::local(
                StatusCode::GATEWAY_TIMEOUT,
                format!("no answer for {watchdog:?}, while the request sent nothing either"),
                route,
                destination,
            )
        }
    };
    // The response head is activity too.
    activity.touch();
    if !http_body::Body::is_end_stream(outcome.response.body()) {
        outcome.response = outcome.response.map(|b| {
            boxed(crate::body::Timed::idle(
                b,
                idle,
                activity,
                ("the response", "its request"),
            ))
        });
        // A gRPC answer the proxy's timers cut ends as gRPC says.
        if grpc_trailers
            && outcome.upstream.is_some()
            && outcome.response.status() == StatusCode::OK
            && crate::body::has_grpc_trailers(outcome.response.headers())
        {
            outcome.response = outcome
                .response
                .map(|b| boxed(crate::body::GrpcDeadline::new(b)));
        }
    }
    let status = outcome.response.status().as_u16();
    // The proxy's own refusals, in the form a gRPC caller reads.
    if grpc
        && outcome.upstream.is_none()
        && let Some(reason) = &outcome.reason
    {
        outcome.response = crate::body::proxy_answer(outcome.response.status(), reason, true);
    }
    if outcome.upstream.is_none() {
        outcome.response = crate::body::answer_for(&method, outcome.response);
    }
    // The caller left the mesh (its namespace or pod opted out) while its
    // connection stayed captured: its identity goes, and with it any new
    // tunnel its requests would need. Its HTTP/1.1 connection ends after
    // this answer, so its next one goes straight, as the kernel now sends
    // it. (An HTTP/2 one goes on; its streams fail once a new tunnel is
    // needed.)
    if caller_h1
        && !outcome.response.status().is_informational()
        && state
            .local_workload(conn.source.ip)
            .is_none_or(|w| w.identity != conn.source.identity)
    {
        outcome.response.headers_mut().insert(
            http::header::CONNECTION,
            http::HeaderValue::from_static("close"),
        );
    }
    let dst = outcome
        .upstream
        .as_ref()
        .map_or(&outcome.destination, |u| &u.label);
    cancelled.armed = false;
    // Sent across the tunnel (or meant to be) even when no answer came.
    let tunnel = (outcome.upstream.as_ref())
        .or(outcome.tried.as_ref())
        .and_then(|u| u.tunnel.as_ref());
    let record = log.then(|| AccessRecord {
        direction: "outbound",
        protocol: "http",
        source_addr: Some(conn.client_addr.to_string()),
        source_identity: Some(&conn.source.identity),
        destination: Some(outcome.destination.to_string()),
        destination_addr: Some(conn.original_dst.to_string()),
        destination_identity: tunnel.map(|t| &t.identity),
        secured: tunnel.is_some(),
        method: Some(method.as_str()),
        path: path.as_deref(),
        route: Some(outcome.route.as_str()),
        status: Some(status),
        attempts: Some(outcome.attempts),
        duration_ms: start.elapsed().as_secs_f64() * 1e3,
        reason: outcome.reason.as_deref(),
        ..Default::default()
    });
    conn.metrics.count(
        &shared.metrics,
        RequestKey {
            direction: Direction::Outbound,
            source: &conn.source_label,
            destination: dst,
            route: &outcome.route,
        },
        Answer {
            status,
            response: &mut outcome.response,
            grpc: grpc_counted,
            elapsed: start.elapsed(),
            log: record,
        },
    );
    Ok(outcome.response)
}

/// Counts and logs a request head the capture side's HTTP/1.1 server
/// refused (`status`, `why`: malformed, too large, too slow, another HTTP
/// version) and answered itself: no route saw it, but the caller got an
/// answer from the mesh, which the metrics and the access log must show.
/// Counted for the Service (or workload) the connection was for, under no
/// route.
pub(crate) fn refused_head(shared: &Shared, conn: &HttpConn, status: StatusCode, why: &str) {
    let destination = match shared.state().destination(conn.original_dst) {
        Destination::Service(d) => Label::from(d.service.id.to_string()),
        Destination::Workload(w) => Label::from(w.id.to_string()),
        Destination::External => Label::external(),
    };
    let route = Label::default();
    shared.metrics.count_refused_head(
        RequestKey {
            direction: Direction::Outbound,
            source: &conn.source_label,
            destination: &destination,
            route: &route,
        },
        status.as_u16(),
    );
    if !crate::accesslog::enabled() {
        return;
    }
    AccessRecord {
        direction: "outbound",
        protocol: "http",
        source_addr: Some(conn.client_addr.to_string()),
        source_identity: Some(&conn.source.identity),
        destination: Some(destination.to_string()),
        destination_addr: Some(conn.original_dst.to_string()),
        route: Some(route.as_str()),
        status: Some(status.as_u16()),
        reason: Some(why),
        ..Default::default()
    }
    .emit();
}

/// Counts and logs a request whose handler is dropped before its answer is
/// counted: its caller went away (reset its stream, closed its
/// connection) before the answer's head, most often tired of waiting, so
/// the request must not vanish from the metrics and the access log. Counted
/// under the route and service chosen by then (not the endpoint that had
/// it), without latency. A request cut by the proxy's own shutdown, past
/// the drain timeout, is counted so too, and logged with that reason.
struct Cancelled<'a> {
    shared: &'a Shared,
    conn: &'a HttpConn,
    progress: &'a Progress,
    method: &'a http::Method,
    path: Option<&'a str>,
    grpc: bool,
    armed: bool,
}

impl Drop for Cancelled<'_> {
    fn drop(&mut self) {
        // A panic is not the caller's doing (and is logged as what it is).
        if !self.armed || std::thread::panicking() {
            return;
        }
        let (route, destination) = self.progress.labels.get().cloned().unwrap_or_default();
        self.shared.metrics.count_cancelled(
            RequestKey {
                direction: Direction::Outbound,
                source: &self.conn.source_label,
                destination: &destination,
                route: &route,
            },
            self.grpc,
        );
        if !crate::accesslog::enabled() {
            return;
        }
        AccessRecord {
            direction: "outbound",
            protocol: "http",
            source_addr: Some(self.conn.client_addr.to_string()),
            source_identity: Some(&self.conn.source.identity),
            destination: Some(destination.to_string()),
            destination_addr: Some(self.conn.original_dst.to_string()),
            method: Some(self.method.as_str()),
            path: self.path,
            route: Some(route.as_str()),
            duration_ms: self.progress.start.elapsed().as_secs_f64() * 1e3,
            reason: Some(cancel_reason(self.shared)),
            grpc_status: self.grpc.then_some("1"),
            ..Default::default()
        }
        .emit();
    }
}

/// The access log's reason for a request whose caller went away first.
const CALLER_WENT_AWAY: &str = "the caller went away before the answer";

/// ... and for one the proxy's shutdown cut (its task aborted once the drain
/// time was over): not the caller's doing.
pub(crate) const CUT_BY_SHUTDOWN: &str =
    "the proxy's shutdown cut it before the answer (drain timeout over)";

/// Why a request's handler was dropped before its answer.
pub(crate) fn cancel_reason(shared: &Shared) -> &'static str {
    if shared.drain.stopped() {
        CUT_BY_SHUTDOWN
    } else {
        CALLER_WENT_AWAY
    }
}

/// What an exchange shares with its request's handler while it runs: when
/// the request began, and its route and destination once known, so that
/// the watchdog's 504 (the exchange is dropped by then) is counted under
/// them too.
struct Progress {
    start: Instant,
    labels: std::sync::OnceLock<(Label, Label)>,
    /// The exchange's activity, which a route's longer timeouts hold.
    activity: crate::body::Activity,
}

/// The endpoints a request's attempts went to, in order; nothing allocated
/// for the first (most requests make one attempt).
#[derive(Default)]
struct Tried {
    first: Option<usize>,
    more: Vec<usize>,
}

impl Tried {
    fn push(&mut self, i: usize) {
        match self.first {
            None => self.first = Some(i),
            Some(_) => self.more.push(i),
        }
    }

    fn last(&self) -> Option<usize> {
        self.more.last().copied().or(self.first)
    }

    fn all(&self) -> Vec<usize> {
        self.first
            .into_iter()
            .chain(self.more.iter().copied())
            .collect()
    }
}

/// When an attempt's route timeout ends it (a request extension from the
/// retry loop to the send).
#[derive(Clone, Copy)]
struct AttemptEnd(Instant);

/// A request body, for one attempt or for several.
enum ReqBody {
    /// Whole: replayed to every attempt.
    Buffered(Replayable),
    /// Streams to the first attempt that reads it while it is recorded for
    /// the next ones (and for mirrors).
    Recorded(Arc<Recording>),
    /// Sent once, with where it notes the caller's failure.
    Once(Option<Body>, Option<crate::replay::FailureNote>),
}

impl ReqBody {
    fn take(&mut self) -> Option<Body> {
        match self {
            ReqBody::Buffered(b) => Some(b.body()),
            ReqBody::Recorded(rec) => rec.take(),
            ReqBody::Once(b, _) => b.take(),
        }
    }

    /// Whether an attempt after this one could get the body again.
    fn may_replay(&self) -> bool {
        match self {
            ReqBody::Buffered(_) => true,
            ReqBody::Recorded(rec) => rec.is_unread() || !rec.given_up(),
            ReqBody::Once(..) => false,
        }
    }

    /// After an attempt, once the request is to go again: whether the body
    /// can. One no attempt read from goes as it is; a recording read whole
    /// by now becomes the body of the next attempts; one still streaming
    /// (the attempt was answered before the body's end) is taken back from
    /// the attempt, to go to the next one after the copy of what was read.
    /// Never asked for a request that will not go again: taking its body
    /// back would cut its upload.
    fn settle(&mut self) -> bool {
        match self {
            ReqBody::Buffered(_) => true,
            ReqBody::Recorded(rec) if rec.is_unread() => true,
            ReqBody::Recorded(rec) => {
                // Taken back only while still coming (recall refuses a
                // body that has ended meanwhile: then it is whole).
                if rec.recall() {
                    return true;
                }
                match rec.whole() {
                    Some(whole) => {
                        *self = ReqBody::Buffered(whole);
                        true
                    }
                    None => false,
                }
            }
            ReqBody::Once(..) => false,
        }
    }

    /// How the caller's body failed during an attempt, if it did.
    fn failed(&self) -> Option<BodyFailure> {
        match self {
            ReqBody::Recorded(rec) => rec.body_error(),
            ReqBody::Once(_, Some(note)) => note.get().cloned(),
            _ => None,
        }
    }
}

async fn route_request(
    shared: &Arc<Shared>,
    state: &Arc<State>,
    conn: &Arc<HttpConn>,
    dest: &ServiceDest,
    mut parts: Parts,
    body: Body,
    progress: &Progress,
) -> Outcome {
    let (service, port) = (&dest.service.id, dest.port.port);
    let decision = if !dest.routed {
        Decision {
            rule: dest.default_rule.clone(),
            matched_prefix: None,
        }
    } else {
        let view = RequestView {
            method: &parts.method,
            path: parts.uri.path(),
            query: parts.uri.query(),
            headers: &parts.headers,
            authority: parts.uri.authority().map(|a| a.as_str()),
        };
        match state
            .routes
            .route(service, port, &conn.source.id.namespace, &view)
        {
            None => Decision {
                rule: dest.default_rule.clone(),
                matched_prefix: None,
            },
            Some(Some(d)) => d,
            Some(None) => {
                return Outcome::local(
                    StatusCode::NOT_FOUND,
                    format!(
                        "no route of service {service} matches {} {}",
                        parts.method,
                        parts.uri.path()
                    ),
                    Label::default(),
                    Label::from(service.to_string()),
                );
            }
        }
    };
    let rule = decision.rule.clone();
    let route_label = rule.label.clone();
    let prefix = decision.matched_prefix.as_deref();

    // A redirect answers at once; the rule's backends do not matter.
    if let Some(r) = rule.filters.iter().find_map(|f| match f {
        HttpFilter::RequestRedirect(r) => Some(r),
        _ => None,
    }) {
        return redirect_outcome(r, &parts, prefix, port, route_label, service);
    }
    // A rule that cannot send a request on: 500, or a GRPCRoute's
    // `UNAVAILABLE`.
    let unusable = if rule.grpc {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::INTERNAL_SERVER_ERROR
    };
    // Weighted choice of the backend, once per request (retries reuse it).
    let Some(backend) = choose_backend(&rule.backends) else {
        return Outcome::local(
            unusable,
            format!("route {route_label} has no backend with a weight above zero"),
            route_label,
            Label::from(service.to_string()),
        );
    };
    if let Some(why) = &backend.invalid {
        return Outcome::local(
            unusable,
            format!(
                "route {route_label}: backend {} cannot be used ({why})",
                backend.service
            ),
            route_label,
            Label::from(service.to_string()),
        );
    }
    let mut response_mods = Vec::new();
    let mut mirrors = Vec::new();
    for f in rule.filters.iter().chain(backend.filters.iter()) {
        match f {
            HttpFilter::RequestHeaderModifier(m) => filters::modify_headers(m, &mut parts.headers),
            HttpFilter::ResponseHeaderModifier(m) => response_mods.push(m.clone()),
            HttpFilter::RequestRedirect(r) => {
                return redirect_outcome(r, &parts, prefix, port, route_label, service);
            }
            HttpFilter::UrlRewrite(u) => filters::rewrite(u, &mut parts, prefix),
            // The mirror gets the request as the filters before it left it.
            HttpFilter::RequestMirror(m) => mirrors.push((m.clone(), parts.clone())),
        }
    }
    // The configuration cannot change under a request: one lookup serves
    // every attempt.
    let ready = if backend.service == *service && backend.port == port {
        dest.ready.clone()
    } else {
        match state.ready_set(&backend.service, backend.port) {
            Some(r) => r,
            None => {
                return Outcome::local(
                    unusable,
                    format!(
                        "route {route_label} points at service {} which does not exist",
                        backend.service
                    ),
                    route_label,
                    Label::from(service.to_string()),
                );
            }
        }
    };
    let destination = ready.service.clone();
    // As every outcome of the attempts below counts it: the backend's
    // service (a split's other service, not the one dialled).
    let _ = progress
        .labels
        .set((route_label.clone(), destination.clone()));

    let retries = rule.retry.as_ref().map_or(0, |r| r.attempts);
    let deadline = rule
        .timeouts
        .request_ms
        .map(|ms| progress.start + Duration::from_millis(ms));
    // The route's own deadline decides, not the exchange idle timeout, when
    // it is the longer.
    if let Some(d) = deadline {
        progress.activity.hold_until(d);
    }
    let mut body = if retries > 0 || !mirrors.is_empty() {
        if http_body::Body::is_end_stream(&body) {
            ReqBody::Buffered(Replayable::empty())
        } else {
            // Not read first: a streaming caller (a gRPC stream waiting for
            // an answer before it sends more) must reach its backend.
            ReqBody::Recorded(Recording::new(
                body,
                shared.settings.max_buffered_body_bytes,
                shared.buffer_budget.clone(),
            ))
        }
    } else {
        let (body, note) = crate::replay::noted(body);
        ReqBody::Once(Some(body), note)
    };
    // However this function returns, the recording hears that it is done.
    let _done = match &body {
        ReqBody::Recorded(rec) => Some(RecordingDone(rec.clone(), shared)),
        _ => None,
    };

    for (m, mparts) in &mirrors {
        if m.fraction.is_some_and(|f| !f.sample(&mut rand::rng())) {
            continue;
        }
        match &body {
            ReqBody::Buffered(b) => spawn_mirror(shared, state, conn, m, mparts, b.clone()),
            // The copy goes once the body has ended, whole; not at all when
            // it was too large to keep.
            ReqBody::Recorded(rec) => {
                let whole = rec.when_whole();
                let (s, state, conn) = (shared.clone(), state.clone(), conn.clone());
                let (m, mparts) = (m.clone(), mparts.clone());
                shared.spawn(async move {
                    if let Ok(b) = whole.await {
                        spawn_mirror(&s, &state, &conn, &m, &mparts, b);
                    }
                });
            }
            ReqBody::Once(..) => {}
        }
    }

    let per_try = rule.timeouts.backend_request_ms.map(Duration::from_millis);
    let codes: &[u16] = rule.retry.as_ref().map_or(&[], |r| r.codes.as_slice());
    let base_backoff = rule
        .retry
        .as_ref()
        .map_or(Duration::ZERO, |r| Duration::from_millis(r.backoff_ms));
    let mut backoff = base_backoff;
    let mut attempts = 0u32;
    // The endpoints earlier attempts went to, in order: a retry goes
    // elsewhere.
    let mut tried = Tried::default();
    loop {
        attempts += 1;
        let may_retry = attempts <= retries && body.may_replay();
        let (upstreams, loads) = (&ready.upstreams, &ready.loads);
        // The body is taken only for an endpoint to send it to.
        // A retry goes where the balancer says, ClientIP affinity or not.
        let pick = match tried.first {
            None => shared.balancer.pick_for(&ready, conn.client_addr.ip()),
            Some(_) => shared.balancer.pick_except(loads, &tried.all()),
        };
        if let Some(p) = &pick {
            tried.push(p.index);
        }
        let taken = if pick.is_some() { body.take() } else { None };
        // When a retry would go, read once the attempt is over: the answer
        // in hand is kept or dropped by the same reading as the backoff.
        let mut retry_at = None;
        // Whether this attempt may have crossed to the endpoint (not one
        // that found none, or could not reach it, which sent nothing).
        let mut crossed = false;
        let failure = match (pick, taken) {
            // Not retried: the request's endpoints are those of its
            // snapshot, and none will be ready on a later attempt either.
            (None, _) => SendError {
                status: StatusCode::SERVICE_UNAVAILABLE,
                reason: format!(
                    "service {} has no ready endpoint on port {}",
                    backend.service, backend.port
                ),
                retryable: false,
                unreachable: false,
                crossed: false,
            },
            (Some(_), None) => SendError {
                status: StatusCode::BAD_GATEWAY,
                reason: "request body already consumed by an earlier attempt".into(),
                retryable: false,
                unreachable: false,
                crossed: false,
            },
            (Some(pick), Some(b)) => {
                let up = &upstreams[pick.index];
                // The last attempt takes the request head, earlier ones copy it.
                let mut head = if may_retry {
                    parts.clone()
                } else {
                    std::mem::replace(&mut parts, Request::new(()).into_parts().0)
                };
                let tried_at = Instant::now();
                // The attempt's own end, when the route sets one: the
                // exchange is waited for until then here, and on the
                // workload's node (`sluice-timeout-ms`).
                if let Some(end) = [deadline, per_try.map(|d| tried_at + d)]
                    .into_iter()
                    .flatten()
                    .min()
                {
                    progress.activity.hold_until(end);
                    head.extensions.insert(AttemptEnd(end));
                }
                let attempt = async {
                    let send = send_once(shared, conn, up, head, b, Sent::ByCaller);
                    match per_try {
                        Some(d) => tokio::time::timeout(d, send).await.unwrap_or_else(|_| {
                            Err(SendError {
                                status: StatusCode::GATEWAY_TIMEOUT,
                                reason: format!(
                                    "backend request timeout of {d:?} to {} exceeded",
                                    up.addr
                                ),
                                // It may have reached the workload: see
                                // below for when it is tried again.
                                retryable: false,
                                unreachable: false,
                                crossed: up.tunnel.is_some(),
                            })
                        }),
                        None => send.await,
                    }
                };
                let result = match deadline {
                    Some(dl) => match tokio::time::timeout_at(dl, attempt).await {
                        Ok(r) => r,
                        Err(_) => {
                            return Outcome {
                                attempts,
                                tried: Some(up.clone()),
                                ..Outcome::local(
                                    StatusCode::GATEWAY_TIMEOUT,
                                    format!(
                                        "request timeout of {}ms exceeded",
                                        rule.timeouts.request_ms.unwrap_or(0)
                                    ),
                                    route_label,
                                    destination,
                                )
                            };
                        }
                    },
                    None => attempt.await,
                };
                // The caller's body failed under the attempt: that is the
                // answer, not what the attempt made of it.
                if result.is_err()
                    && let Some(f) = body.failed()
                {
                    // The caller's failure, not the endpoint's.
                    pick.connected();
                    let (status, reason) = f.answer();
                    return Outcome {
                        attempts,
                        tried: Some(up.clone()),
                        ..Outcome::local(status, reason, route_label, destination)
                    };
                }
                // A retry whose backoff would end past the request's
                // deadline cannot be made: the answer in hand is the one
                // the caller gets, not a 504 of the proxy's.
                // The clock is read only where a retry could be made.
                let too_late = may_retry
                    && !backoff.is_zero()
                    && deadline.is_some_and(|dl| dl <= *retry_at.insert(Instant::now() + backoff));
                match result {
                    Ok(mut resp)
                        if !(may_retry
                            && !too_late
                            && codes.contains(&resp.status().as_u16())
                            && body.settle()) =>
                    {
                        pick.answered(status_for_balancer(&resp));
                        for m in &response_mods {
                            filters::modify_headers(m, resp.headers_mut());
                        }
                        // Both timeouts run until the whole response is in
                        // (Gateway API), not only its head.
                        let until = [deadline, per_try.map(|d| tried_at + d)]
                            .into_iter()
                            .flatten()
                            .min();
                        let resp = match until {
                            Some(until) => resp.map(|b| {
                                crate::body::boxed(crate::body::Timed::deadline(
                                    b,
                                    until,
                                    format!(
                                        "route {route_label}: timeout reached while {} was \
                                         sending the response body",
                                        up.addr
                                    ),
                                ))
                            }),
                            None => resp,
                        };
                        return Outcome {
                            response: resp,
                            route: route_label,
                            destination,
                            upstream: Some(up.clone()),
                            tried: None,
                            attempts,
                            reason: None,
                        };
                    }
                    Ok(resp) => {
                        pick.answered(status_for_balancer(&resp));
                        crossed = true;
                        SendError {
                            status: resp.status(),
                            reason: format!("{} answered {}", up.addr, resp.status()),
                            retryable: true,
                            unreachable: false,
                            crossed: false,
                        }
                    }
                    // GEP-1731: with a retry stanza, connection errors
                    // (a reset, a disconnect, an attempt's timeout) are
                    // retried whatever the listed codes. Such a request may
                    // have reached the workload already, so only when its
                    // method is idempotent (RFC 9110 9.2.2), or when the
                    // route lists the status the caller would get (502,
                    // 504) as one to retry, as it would be had the workload
                    // answered it; one that surely did not reach the
                    // workload is retryable already.
                    Err(mut e) => {
                        if e.unreachable {
                            pick.unreachable();
                        }
                        crossed = e.crossed;
                        if matches!(
                            e.status,
                            StatusCode::BAD_GATEWAY | StatusCode::GATEWAY_TIMEOUT
                        ) && (idempotent(&parts.method) || codes.contains(&e.status.as_u16()))
                        {
                            e.retryable = true;
                        }
                        e
                    }
                }
            }
        };
        // (`crossed` is this attempt's: never set when it found no endpoint
        // to add to `tried`.)
        let last_tried = || {
            tried
                .last()
                .filter(|_| crossed)
                .map(|i| ready.upstreams[i].clone())
        };
        if !(failure.retryable && may_retry && body.settle()) {
            return Outcome {
                attempts,
                tried: last_tried(),
                ..Outcome::local(failure.status, failure.reason, route_label, destination)
            };
        }
        tracing::debug!(attempt = attempts, "retrying: {}", failure.reason);
        if !backoff.is_zero() {
            let wake = retry_at.unwrap_or_else(|| Instant::now() + backoff);
            if deadline.is_some_and(|dl| dl <= wake) {
                // No retry fits before the request timeout: the failure in
                // hand is the answer, now, with its own status.
                return Outcome {
                    attempts,
                    tried: last_tried(),
                    ..Outcome::local(
                        failure.status,
                        format!(
                            "{}; not retried: the backoff would end past the request timeout \
                             of {}ms",
                            failure.reason,
                            rule.timeouts.request_ms.unwrap_or(0)
                        ),
                        route_label,
                        destination,
                    )
                };
            }
            tokio::time::sleep_until(wake).await;
            backoff = next_backoff(backoff, base_backoff);
        }
    }
}

/// The wait before the retry after one that waited `current`: twice as
/// long, up to ten times the route's `backoff` (Envoy's default cap; the
/// Gateway API lets implementations cap it), so that many attempts do not
/// wait for hours.
fn next_backoff(current: Duration, base: Duration) -> Duration {
    current.saturating_mul(2).min(base.saturating_mul(10))
}

/// Tells a request's recording that its handler is done
/// ([`Recording::done`]).
struct RecordingDone<'a>(Arc<Recording>, &'a Arc<Shared>);

impl Drop for RecordingDone<'_> {
    fn drop(&mut self) {
        self.0.done(|read| self.1.spawn(read));
    }
}

/// Methods a repeat of which has the effect of one (RFC 9110 9.2.2).
pub(crate) fn idempotent(m: &http::Method) -> bool {
    use http::Method;
    [
        Method::GET,
        Method::HEAD,
        Method::OPTIONS,
        Method::TRACE,
        Method::PUT,
        Method::DELETE,
    ]
    .contains(m)
}

/// Why an attempt produced no usable response.
#[derive(Debug)]
struct SendError {
    status: StatusCode,
    reason: String,
    /// Nothing reached the workload (or the status is retryable): safe to
    /// try again.
    retryable: bool,
    /// The endpoint could not be reached at all (connection refused or
    /// timed out, its node proxy's handshake failed): the balancer keeps
    /// other requests away from it for a while.
    unreachable: bool,
    /// It went (or may have gone) across the tunnel to the endpoint's node
    /// proxy: the access log shows it secured, with the identity it went
    /// to. Not for one that found no endpoint or node proxy, or no stream.
    crossed: bool,
}

impl SendError {
    /// A tunnel failure: nothing reached the workload when the tunnel could
    /// not be reached (503, retryable), else 502.
    fn tunnel(e: TunnelError) -> SendError {
        let unreached = e.is_connect_failure();
        SendError {
            status: if unreached {
                StatusCode::SERVICE_UNAVAILABLE
            } else {
                StatusCode::BAD_GATEWAY
            },
            retryable: unreached,
            reason: e.to_string(),
            unreachable: e.is_unreachable(),
            // The stream opened (a failure after it, a refusal by the far
            // proxy): across the tunnel.
            crossed: !unreached,
        }
    }

    /// The peer proxy's answer when it could not connect to the workload
    /// ([`UNREACHABLE`]): nothing reached it, as when the workload is
    /// reached directly and refuses the connection.
    fn workload_unreachable<B: http_body::Body>(
        resp: &Response<B>,
        addr: SocketAddr,
    ) -> Option<SendError> {
        // Only ever on the far side's own 503, or its gRPC form (a `200`
        // with `grpc-status: 14` and no body): other answers skip the
        // lookup.
        let own = match resp.status() {
            StatusCode::SERVICE_UNAVAILABLE => true,
            StatusCode::OK => resp.body().is_end_stream(),
            _ => false,
        };
        let marked = own && resp.headers().contains_key(UNREACHABLE);
        marked.then(|| {
            let why = resp
                .headers()
                .get(REASON)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("no reason given");
            SendError {
                status: StatusCode::SERVICE_UNAVAILABLE,
                reason: format!("the node proxy of {addr} could not reach it: {why}"),
                retryable: true,
                unreachable: true,
                // Across the tunnel, to a node proxy that answered.
                crossed: true,
            }
        })
    }
}

/// The status an answer counts as for its endpoint's load estimate: its
/// own, or a `502` for a gRPC answer without a body (its status in the
/// head, "trailers-only") whose `grpc-status` says the server failed
/// (UNKNOWN, DEADLINE_EXCEEDED, INTERNAL, UNAVAILABLE, DATA_LOSS): a gRPC
/// server whose database is down answers every call at once with `200`
/// and `grpc-status: 14`, and would otherwise draw the traffic as the
/// fastest endpoint. Answers with a body skip the lookup.
fn status_for_balancer<B: http_body::Body>(resp: &Response<B>) -> StatusCode {
    let status = resp.status();
    let failed = status == StatusCode::OK
        && resp.body().is_end_stream()
        && resp
            .headers()
            .get("grpc-status")
            .is_some_and(|v| matches!(v.as_bytes(), b"2" | b"4" | b"13" | b"14" | b"15"));
    if failed {
        StatusCode::BAD_GATEWAY
    } else {
        status
    }
}

/// The longest `grpc-timeout` waited for beyond the exchange idle timeout:
/// a day, as a route's timeouts on the workload's node.
pub(crate) const MAX_CALL_DEADLINE: Duration = Duration::from_secs(24 * 3600);

/// The answer of a `RequestRedirect` to a request for service port `port`.
fn redirect_outcome(
    r: &crate::config::RequestRedirect,
    parts: &Parts,
    prefix: Option<&str>,
    port: u16,
    route: Label,
    service: &crate::config::ObjectRef,
) -> Outcome {
    // A request with no host to name, redirected to another scheme or
    // port: the Service's name stands in (a relative reference cannot
    // change either).
    let named;
    let r = if r.hostname.is_none()
        && (r.scheme.is_some() || r.port.is_some())
        && parts.headers.get(http::header::HOST).is_none()
        && parts.uri.authority().is_none()
    {
        named = crate::config::RequestRedirect {
            hostname: Some(format!("{}.{}", service.name, service.namespace)),
            ..r.clone()
        };
        &named
    } else {
        r
    };
    let (status, location) = filters::redirect(r, parts, prefix, Some(port));
    let mut resp = Response::new(crate::body::empty());
    *resp.status_mut() = status;
    if let Ok(v) = HeaderValue::from_str(&location) {
        resp.headers_mut().insert(http::header::LOCATION, v);
    }
    Outcome {
        response: resp,
        route,
        destination: Label::from(service.to_string()),
        upstream: None,
        tried: None,
        attempts: 0,
        reason: None,
    }
}

fn choose_backend(backends: &[BackendRef]) -> Option<&BackendRef> {
    let total: u64 = backends.iter().map(|b| b.weight as u64).sum();
    if total == 0 {
        return None;
    }
    let mut x = rand::rng().random_range(0..total);
    for b in backends {
        if x < b.weight as u64 {
            return Some(b);
        }
        x -= b.weight as u64;
    }
    None
}

fn spawn_mirror(
    shared: &Arc<Shared>,
    state: &Arc<State>,
    conn: &Arc<HttpConn>,
    m: &crate::config::RequestMirror,
    parts: &Parts,
    body: Replayable,
) {
    let Some(svc) = state.service(&m.service).cloned() else {
        crate::throttle::warn_throttled!(mirror = %m.service, "mirror target service does not exist");
        return;
    };
    let ready = state.ready_upstreams(&svc, m.port);
    let upstreams = &ready.upstreams;
    let Ok(slot) = shared.mirror_slots.clone().try_acquire_owned() else {
        shared.metrics.mirrors_dropped.inc();
        tracing::debug!(mirror = %m.service, "mirror not sent: too many mirrors in flight");
        return;
    };
    let Some(pick) = shared.balancer.pick(&ready.loads) else {
        return;
    };
    let up = upstreams[pick.index].clone();
    let (shared, conn, mut parts) = (shared.clone(), conn.clone(), parts.clone());
    // A mirrored upgrade request stays a plain request: the client's
    // connection belongs to the primary.
    parts.extensions.remove::<OnUpgrade>();
    parts.extensions.remove::<crate::upgrade::ExtendedConnect>();
    parts.extensions.remove::<crate::h2idle::ActiveStream>();
    let shared2 = shared.clone();
    shared.spawn(async move {
        let _slot = slot;
        let mirror = async {
            match send_once(
                &shared2,
                &conn,
                &up,
                parts,
                body.into_body(),
                Sent::AsMirror,
            )
            .await
            {
                // The mirror's answer is read and dropped as it comes.
                Ok(resp) => {
                    pick.answered(status_for_balancer(&resp));
                    let mut body = resp.into_body();
                    while let Some(Ok(_)) = body.frame().await {}
                }
                Err(e) => tracing::debug!("mirrored request failed: {}", e.reason),
            }
        };
        // A mirror that never answers, or answers without end, must not
        // keep its task and its endpoint's in-flight count.
        if tokio::time::timeout(MIRROR_DEADLINE, mirror).await.is_err() {
            tracing::debug!(
                "mirrored request to {} cut after {MIRROR_DEADLINE:?}",
                up.addr
            );
        }
    });
}

/// How long a mirrored request may take, answer included.
const MIRROR_DEADLINE: Duration = Duration::from_secs(30);

/// Who sends a request: the caller (its connection's row counts it and
/// shows the tunnel's TLS) or the proxy, mirroring one (the caller never
/// sent it: only a copy in plaintext shows, turning the row insecure).
#[derive(Clone, Copy, PartialEq)]
enum Sent {
    ByCaller,
    AsMirror,
}

/// Sends one attempt to one upstream.
async fn send_once(
    shared: &Arc<Shared>,
    conn: &Arc<HttpConn>,
    up: &Upstream,
    mut parts: Parts,
    body: Body,
    sent: Sent,
) -> Result<Response<Body>, SendError> {
    let row = conn.row.as_ref().filter(|_| sent == Sent::ByCaller);
    if let Some(row) = row {
        row.request_sent(up.tunnel.as_ref().map(|t| &t.identity));
    } else if let Some(row) = &conn.row
        && up.tunnel.is_none()
    {
        // A copy of the caller's request leaves in plaintext: the row is
        // not secured any more (a copy through the tunnel changes nothing
        // the caller's own requests show).
        row.request_sent(None);
    }
    // An HTTP/1.1 upgrade, or an HTTP/2 extended CONNECT made one.
    let extended = parts
        .extensions
        .get::<crate::upgrade::ExtendedConnect>()
        .is_some();
    if conn.protocol == Protocol::Http1 || extended {
        match crate::upgrade::take(&mut parts) {
            Some(client) => {
                return send_upgrade(shared, conn, up, parts, body, client, extended).await;
            }
            // Never as a plain request: its client waits for a WebSocket.
            None if extended => {
                return Err(SendError {
                    status: StatusCode::BAD_REQUEST,
                    reason: "the WebSocket request lost its upgrade (a route's filter removed \
                             `connection` or `upgrade`, or added a body)"
                        .into(),
                    retryable: false,
                    unreachable: false,
                    crossed: false,
                });
            }
            None => {}
        }
    }
    strip_hop_by_hop(&mut parts.headers);
    let proto = conn.protocol;
    match &up.tunnel {
        Some(t) => {
            let authority = match parts.headers.remove(http::header::HOST) {
                Some(h) => Authority::try_from(h.as_bytes()),
                None => match parts.uri.authority() {
                    Some(a) => Ok(a.clone()),
                    None => Authority::try_from(up.target.as_bytes()),
                },
            }
            .map_err(|e| SendError {
                status: StatusCode::BAD_REQUEST,
                reason: format!("request authority is not valid: {e}"),
                retryable: false,
                unreachable: false,
                crossed: false,
            })?;
            let mut uri = std::mem::take(&mut parts.uri).into_parts();
            uri.scheme = Some(Scheme::HTTP);
            uri.authority = Some(authority);
            if uri.path_and_query.is_none() {
                uri.path_and_query = Some(PathAndQuery::from_static("/"));
            }
            parts.uri = Uri::from_parts(uri).map_err(|e| SendError {
                status: StatusCode::BAD_REQUEST,
                reason: format!("request target is not valid: {e}"),
                retryable: false,
                unreachable: false,
                crossed: false,
            })?;
            parts.version = Version::HTTP_2;
            parts.headers.insert(TARGET, up.target.clone());
            // Only the mesh says how long to wait: a route's header filter
            // may not (the caller's own was taken out on the way in).
            match parts.extensions.remove::<AttemptEnd>() {
                Some(AttemptEnd(end)) => {
                    let ms = end.saturating_duration_since(Instant::now()).as_millis();
                    parts.headers.insert(TIMEOUT, HeaderValue::from(ms as u64));
                }
                None => {
                    parts.headers.remove(TIMEOUT);
                }
            }
            // HTTP/1.1 is the default on the far side: only HTTP/2 is named,
            // which spares the common case a header to encode and decode.
            if proto == Protocol::Http2 {
                parts
                    .headers
                    .insert(PROTOCOL, HeaderValue::from_static("h2"));
            }
            let key = TunnelKey::to(&conn.source.identity, t);
            let (resp, tls) = shared
                .pool
                .send(&key, Request::from_parts(parts, body))
                .await
                .map_err(SendError::tunnel)?;
            if let Some(row) = row {
                row.tunnel_tls(&tls);
            }
            if let Some(e) = SendError::workload_unreachable(&resp, up.addr) {
                return Err(e);
            }
            Ok(resp.map(boxed))
        }
        None => {
            let resp = shared
                .clients
                .send(up.addr, proto, Request::from_parts(parts, body))
                .await
                .map_err(|e| SendError {
                    status: if e.is_connect() {
                        StatusCode::SERVICE_UNAVAILABLE
                    } else {
                        StatusCode::BAD_GATEWAY
                    },
                    retryable: e.is_connect(),
                    reason: format!("sending to {}: {e}", up.addr),
                    unreachable: e.is_unreachable(),
                    crossed: false,
                })?;
            let mut resp = resp.map(boxed);
            // A workload outside the mesh speaks HTTP/1.1 to this hop
            // only: its `connection: close` and the like are not the
            // caller's.
            strip_hop_by_hop(resp.headers_mut());
            Ok(resp)
        }
    }
}

/// An HTTP/1.1 upgrade (WebSocket and the like; see [`crate::upgrade`]): the
/// request goes on a connection of its own, a CONNECT stream through the
/// tunnel marked as carrying an upgrade request (the far side parses it,
/// polices it and sets the caller's identity), or a direct TCP connection to
/// a workload outside the mesh.
async fn send_upgrade(
    shared: &Arc<Shared>,
    conn: &Arc<HttpConn>,
    up: &Upstream,
    mut parts: Parts,
    body: Body,
    client: OnUpgrade,
    // An HTTP/2 extended CONNECT's: a switch is its `200`.
    extended: bool,
) -> Result<Response<Body>, SendError> {
    crate::upgrade::prepare(&mut parts, &up.target);
    let (io, tls): (Box<dyn crate::abort::UpgradeIo>, _) = match &up.tunnel {
        Some(t) => {
            let key = TunnelKey::to(&conn.source.identity, t);
            let named = HeaderValue::from_str(&format!("{} {}", parts.method, parts.uri.path()))
                .map_err(|e| SendError {
                    status: StatusCode::BAD_REQUEST,
                    reason: format!("upgrade request path is not valid: {e}"),
                    retryable: false,
                    unreachable: false,
                    crossed: false,
                })?;
            let (stream, tls) = shared
                .pool
                .connect_with(&key, up.addr, Some(named))
                .await
                .map_err(|e| match e {
                    // The peer proxy would not open the stream, or the
                    // workload did not answer it: nothing to retry.
                    TunnelError::Refused { .. } => SendError {
                        status: StatusCode::BAD_GATEWAY,
                        reason: e.to_string(),
                        retryable: false,
                        unreachable: false,
                        crossed: true,
                    },
                    e => SendError::tunnel(e),
                })?;
            // The caller's connection shows the tunnel's TLS, as for its
            // plain requests (an upgrade is never a mirror's).
            if let Some(row) = &conn.row {
                row.tunnel_tls(&tls);
            }
            (
                Box::new(stream),
                Some(crate::conntable::TlsInfo::clone(&tls)),
            )
        }
        None => {
            let s = &shared.settings;
            let tcp = crate::connect::connect(up.addr, s.socket_mark, s.connect_timeout())
                .await
                .map_err(|e| SendError {
                    status: StatusCode::SERVICE_UNAVAILABLE,
                    reason: format!("connecting to {}: {e}", up.addr),
                    retryable: true,
                    unreachable: crate::connect::peer_unreachable(&e),
                    crossed: false,
                })?;
            (Box::new(tcp), None)
        }
    };
    let tunnel = up.tunnel.as_ref();
    let row = shared.table.open(
        ConnKind::OutboundTcp,
        ConnMeta {
            source_addr: Some(conn.client_addr),
            source_workload: Some(conn.source.id.clone()),
            source_identity: Some(conn.source.identity.clone()),
            destination_addr: Some(up.addr),
            destination: up.workload.clone(),
            destination_identity: tunnel.map(|t| t.identity.clone()),
            tls,
        },
    );
    let count = crate::upgrade::Splice {
        labels: TcpLabels {
            direction: Direction::Outbound,
            source: conn.source.identity.to_string(),
            // As opaque TCP labels it: a workload out of the mesh by its
            // name, never by an address and a port the caller chose.
            destination: tunnel.map_or_else(|| up.label.to_string(), |t| t.identity.to_string()),
            secured: tunnel.is_some(),
        },
        row: Some(Arc::new(row)),
        hold: None,
    };
    let resp =
        crate::upgrade::exchange(shared, io, Request::from_parts(parts, body), client, count)
            .await
            .map_err(|e| SendError {
                status: StatusCode::BAD_GATEWAY,
                reason: format!("upgrade request to {}: {e}", up.addr),
                retryable: false,
                unreachable: false,
                crossed: tunnel.is_some(),
            })?;
    if tunnel.is_some()
        && let Some(e) = SendError::workload_unreachable(&resp, up.addr)
    {
        return Err(e);
    }
    let (mut rp, rb) = resp.into_parts();
    if tunnel.is_none() {
        // An endpoint outside the mesh answered: it may not speak for it.
        remove_mesh_headers(&mut rp.headers);
    }
    if extended && let Err(status) = crate::upgrade::answer_extended_connect(&mut rp) {
        return Err(SendError {
            status: StatusCode::BAD_GATEWAY,
            reason: format!(
                "{} answered the WebSocket request {status} without switching protocols",
                up.addr
            ),
            retryable: false,
            unreachable: false,
            crossed: false,
        });
    }
    Ok(Response::from_parts(rp, boxed(rb)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_ten_times_the_routes() {
        let base = Duration::from_millis(25);
        let mut waits = vec![base];
        for _ in 0..8 {
            waits.push(next_backoff(*waits.last().unwrap(), base));
        }
        let ms: Vec<u128> = waits.iter().map(Duration::as_millis).collect();
        assert_eq!(ms, [25, 50, 100, 200, 250, 250, 250, 250, 250]);
    }

    /// A gRPC server's failure in a trailers-only answer counts against
    /// its endpoint as a 5xx would; its clients' own errors, a success and
    /// answers with a body count as their HTTP status.
    #[test]
    fn a_trailers_only_grpc_failure_counts_as_a_server_error() {
        let answer = |grpc: Option<&'static str>, body: &'static str| {
            let mut r = Response::new(crate::body::full(body));
            if let Some(g) = grpc {
                r.headers_mut()
                    .insert("grpc-status", HeaderValue::from_static(g));
            }
            status_for_balancer(&r)
        };
        for failed in ["2", "4", "13", "14", "15"] {
            assert_eq!(
                answer(Some(failed), ""),
                StatusCode::BAD_GATEWAY,
                "{failed}"
            );
        }
        for fine in ["0", "3", "5", "7", "16"] {
            assert_eq!(answer(Some(fine), ""), StatusCode::OK, "{fine}");
        }
        assert_eq!(answer(None, ""), StatusCode::OK);
        // A status in the head of an answer with a body is not gRPC's.
        assert_eq!(answer(Some("14"), "data"), StatusCode::OK);
        let mut unavailable = Response::new(crate::body::empty());
        *unavailable.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
        assert_eq!(
            status_for_balancer(&unavailable),
            StatusCode::SERVICE_UNAVAILABLE
        );
    }
}
