//! The inbound tunnel listener (port 15008): terminates mutual TLS, reads the
//! caller's verified SPIFFE ID, checks that the target is a local workload and
//! that policy allows the caller, then delivers to the workload.
//!
//! Denials: HTTP requests get `403` with a `sluice-reason` header; TCP
//! (`CONNECT`) streams are reset with `REFUSED_STREAM`. Each is counted and
//! logged with both identities.

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
};

use bytes::Bytes;
use h2::{RecvStream, SendStream, server::SendResponse};
use http::{HeaderValue, Method, Request, Response, StatusCode};
use hyper::{body::Incoming, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{net::TcpListener, net::TcpStream, time::Instant};

use crate::{
    accesslog::AccessRecord,
    batch::{BatchIo, FlushAtEnd},
    body::{Body, boxed, proxy_response, remove_mesh_headers, strip_hop_by_hop},
    config::{
        LocalWorkload, PROTOCOL, SOURCE_IDENTITY, SpiffeId, TARGET, TARGET_HEADER, TIMEOUT,
        UNREACHABLE, UPGRADE_REQUEST,
    },
    conntable::{ConnKind, ConnMeta, TlsInfo},
    h2stream::{RecvBody, StreamIo},
    io::{Counted, count_relay, relay},
    metrics::{
        Answer, DenialLabels, Direction, Label, RequestKey, RequestMetricsCache, TcpLabels,
        TlsFailureLabels,
    },
    policy::{HttpFacts, Verdict, authorize},
    proxy::Shared,
    sniff::Protocol,
    state::State,
    target::parse_target,
    throttle::warn_throttled,
    tunnel::{SEND_BUFFER, STREAM_WINDOW, connection_window, keep_alive},
};

/// The longest a caller's route may have this side wait for an answer
/// (`sluice-timeout-ms`): a day.
const MAX_ROUTE_TIMEOUT_MS: u64 = 24 * 3600 * 1000;

/// A short, stable label for why a TLS handshake failed.
pub fn classify_tls_error(e: &std::io::Error) -> &'static str {
    if let Some(err) = e.get_ref().and_then(|r| r.downcast_ref::<rustls::Error>()) {
        return match err {
            rustls::Error::InvalidCertificate(_) => "bad_certificate",
            rustls::Error::NoCertificatesPresented => "no_client_certificate",
            rustls::Error::AlertReceived(_) => "alert_received",
            rustls::Error::InvalidMessage(_) => "not_tls",
            rustls::Error::PeerIncompatible(_) => "incompatible",
            rustls::Error::NoApplicationProtocol => "alpn",
            _ => "protocol",
        };
    }
    match e.kind() {
        std::io::ErrorKind::UnexpectedEof => "eof",
        _ => "io",
    }
}

pub(crate) async fn run(shared: Arc<Shared>, listener: TcpListener) {
    loop {
        let accepted = tokio::select! {
            _ = shared.shutdown.cancelled() => return,
            a = listener.accept() => a,
        };
        let (tcp, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!("inbound accept failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let shared2 = shared.clone();
        shared.spawn(async move { serve(shared2, tcp, peer).await });
    }
}

/// Things in progress by key, each bounded: TLS handshakes on the tunnel
/// port by peer address (`max_handshakes_per_peer`), open tunnel
/// connections by peer identity and address and the local identity asked
/// for (`max_tunnel_connections_per_peer`).
pub(crate) struct Counts<K>(std::sync::Mutex<std::collections::HashMap<K, u32>>);

impl<K> Default for Counts<K> {
    fn default() -> Self {
        Self(std::sync::Mutex::default())
    }
}

/// TLS handshakes in progress on the tunnel port, by peer address.
pub(crate) type Handshakes = Counts<std::net::IpAddr>;
/// Tunnel connections taking streams, by peer identity and address, and
/// the local identity they asked for.
pub(crate) type PeerConnections = Counts<PeerKey>;
type PeerKey = (SpiffeId, std::net::IpAddr, Option<SpiffeId>);
/// One of them.
type PeerSlot<'a> = Counted1<'a, PeerKey>;

impl<K: std::hash::Hash + Eq + Clone> Counts<K> {
    /// One more for `key`, unless `max` are counted for it already.
    fn begin(&self, key: &K, max: u32) -> Option<Counted1<'_, K>> {
        let mut m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let n = m.entry(key.clone()).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(Counted1 {
            all: self,
            key: key.clone(),
        })
    }
}

/// One counted thing: counted until dropped.
struct Counted1<'a, K: std::hash::Hash + Eq> {
    all: &'a Counts<K>,
    key: K,
}

impl<K: std::hash::Hash + Eq> Drop for Counted1<'_, K> {
    fn drop(&mut self) {
        let mut m = self.all.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = m.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.key);
            }
        }
    }
}

/// Who is on the other end of one tunnel connection.
struct TunnelPeer {
    addr: SocketAddr,
    identity: SpiffeId,
    /// The TLS server name the peer asked for: the local identity it
    /// expects to reach.
    sni: Option<String>,
    /// The local identity that SNI named when the connection opened.
    local_identity: Option<SpiffeId>,
    /// `identity` and `local_identity` as metric labels.
    label: Label,
    local_label: Label,
    /// `identity` as the value of the source identity header.
    identity_header: HeaderValue,
    tls: TlsInfo,
    /// Metric handles of this connection's requests.
    metrics: RequestMetricsCache,
    /// Streams being answered on this connection (see [`FlushAtEnd`]).
    in_flight: Arc<AtomicUsize>,
    /// Streams open on this connection, to their end (a TCP stream's relay,
    /// a response body's last byte): one that is open is not idle, however
    /// quiet.
    open_streams: AtomicUsize,
    /// Whether the peer has opened a stream yet.
    opened: AtomicBool,
}

async fn serve(shared: Arc<Shared>, tcp: TcpStream, peer: SocketAddr) {
    let _ = tcp.set_nodelay(true);
    let fail = |reason: &'static str, detail: String| {
        shared
            .metrics
            .tls_handshake_failures
            .get_or_create(&TlsFailureLabels {
                direction: Direction::Inbound,
                reason: reason.into(),
            })
            .inc();
        warn_throttled!(%peer, reason, "inbound TLS handshake failed: {detail}");
    };
    // Node proxies of the mesh are not limited (a pod sharing a node's
    // address must not cut that node off); nor is anyone with the limit 0.
    let max = shared.settings.max_handshakes_per_peer;
    let handshake = if max == 0 || shared.state().is_node_proxy(peer.ip()) {
        None
    } else {
        let Some(h) = shared.handshakes.begin(&peer.ip(), max) else {
            shared
                .metrics
                .tls_handshake_failures
                .get_or_create(&TlsFailureLabels {
                    direction: Direction::Inbound,
                    reason: "peer_handshake_limit".into(),
                })
                .inc();
            warn_throttled!(%peer, "closing a tunnel connection: {max} TLS handshakes from {} in progress already (max_handshakes_per_peer)", peer.ip());
            let _ = tcp.set_zero_linger();
            return;
        };
        Some(h)
    };
    let config = match shared.identity.server_config() {
        Ok(c) => c,
        Err(e) => {
            fail("no_server_config", e.to_string());
            return;
        }
    };
    let row = Arc::new(shared.table.open(
        ConnKind::TunnelIn,
        ConnMeta {
            source_addr: Some(peer),
            ..Default::default()
        },
    ));
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let tls = match tokio::time::timeout(
        shared.settings.tls_handshake_timeout(),
        acceptor.accept(Counted::from_caller(tcp, row.clone())),
    )
    .await
    {
        Ok(Ok(t)) => t,
        Ok(Err(e)) => return fail(classify_tls_error(&e), e.to_string()),
        Err(_) => {
            return fail(
                "timeout",
                format!(
                    "no handshake within {:?}",
                    shared.settings.tls_handshake_timeout()
                ),
            );
        }
    };
    drop(handshake);
    let (_, session) = tls.get_ref();
    if session.alpn_protocol() != Some(b"h2") {
        return fail("alpn", "the client did not negotiate ALPN h2".into());
    }
    let (identity, info) = match shared.identity.peer(session) {
        Ok(p) => p,
        Err(e) => return fail("peer_identity", e.to_string()),
    };
    let sni = session.server_name().map(str::to_owned);
    let local_identity = sni.as_deref().and_then(|sni| {
        let state = shared.state();
        state
            .snapshot
            .local_workloads
            .iter()
            .map(|w| &w.identity)
            .find(|id| asked_for(&shared, id, sni))
            .cloned()
    });
    // An honest peer proxy keeps a few connections per (source identity,
    // node, local identity asked for): one with more is leaking them or
    // worse, and each holds TLS state and a task here. Draining connections
    // (GOAWAY said: retired, idle, shutting down) no longer count.
    let max = shared.settings.max_tunnel_connections_per_peer;
    let open = if max == 0 {
        Ok(None)
    } else {
        let key = (identity.clone(), peer.ip(), local_identity.clone());
        shared
            .peer_connections
            .begin(&key, max)
            .map(Some)
            .ok_or_else(|| {
                shared
                    .metrics
                    .tls_handshake_failures
                    .get_or_create(&TlsFailureLabels {
                        direction: Direction::Inbound,
                        reason: "peer_connection_limit".into(),
                    })
                    .inc();
                let why = format!(
                    "{max} tunnel connections from {identity} at {} to {} take streams already \
                     (max_tunnel_connections_per_peer)",
                    peer.ip(),
                    local_identity
                        .as_ref()
                        .map_or("this node".to_string(), |id| id.to_string())
                );
                warn_throttled!(%peer, "refusing a tunnel connection with GOAWAY: {why}");
                why
            })
    };
    row.update(|m| {
        m.source_identity = Some(identity.clone());
        m.destination_identity = local_identity.clone();
        m.tls = Some(info.clone());
    });
    let tp = Arc::new(TunnelPeer {
        addr: peer,
        label: Label::from(identity.as_ref()),
        identity_header: HeaderValue::from_str(identity.as_ref())
            .expect("a SPIFFE ID is a valid header value"),
        metrics: RequestMetricsCache::default(),
        in_flight: Arc::default(),
        open_streams: AtomicUsize::new(0),
        opened: AtomicBool::new(false),
        identity,
        sni,
        local_label: local_identity
            .as_ref()
            .map_or_else(Label::default, |id| Label::from(id.as_ref())),
        local_identity,
        tls: info,
    });
    let (io, batch) = BatchIo::new(tls);
    let stall = batch.stall();
    let stall_limit = shared.settings.tunnel_write_stall_timeout();
    let (drain, _reg) = shared.drain.watch();
    let conn = FlushAtEnd::new(
        accept_streams(&shared, &tp, io, drain, open),
        batch,
        tp.in_flight.clone(),
    );
    // A proxy opens a tunnel connection to send a stream at once; keep-alive
    // pings only start after the HTTP/2 preface, so a peer that sends nothing
    // after the handshake is cut here.
    let first_stream = shared.settings.tls_handshake_timeout();
    let silent = async {
        tokio::time::sleep(first_stream).await;
        if tp.opened.load(Ordering::Relaxed) {
            std::future::pending::<()>().await;
        }
    };
    tokio::select! {
        r = conn => {
            if let Err(e) = r {
                tracing::debug!(%peer, "inbound tunnel connection ended: {e}");
            }
        }
        () = silent => {
            tracing::warn!(
                %peer,
                source = %tp.identity,
                "closing an inbound tunnel connection that opened no stream within {first_stream:?}"
            );
        }
        () = stall.exceeded(stall_limit) => {
            tracing::warn!(
                %peer,
                source = %tp.identity,
                "closing an inbound tunnel connection whose peer has read nothing for {stall_limit:?}"
            );
        }
    }
}

/// Drives one tunnel connection with `h2` directly: each stream the peer
/// opens gets a task of its own. On shutdown the connection says GOAWAY and
/// ends once the streams already open have.
async fn accept_streams<T>(
    shared: &Arc<Shared>,
    tp: &Arc<TunnelPeer>,
    io: T,
    drain: tokio::sync::oneshot::Receiver<()>,
    open: Result<Option<PeerSlot<'_>>, String>,
) -> Result<(), String>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut conn = h2::server::Builder::new()
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(connection_window(shared.settings.tunnel_max_streams))
        .max_header_list_size(shared.settings.max_header_bytes)
        .max_concurrent_streams(shared.settings.tunnel_max_streams)
        .max_send_buffer_size(SEND_BUFFER)
        // A peer making the proxy reset streams over and over is cut off
        // (the "rapid reset" attack), as hyper's server did.
        .max_local_error_reset_streams(Some(1024))
        .handshake::<_, Bytes>(io)
        .await
        .map_err(|e| format!("HTTP/2 handshake: {e}"))?;
    // Over its cap (see `serve`): GOAWAY ENHANCE_YOUR_CALM tells the peer
    // why its connection takes no stream (RFC 9113 section 7).
    let mut open = match open {
        Ok(open) => open,
        Err(why) => {
            conn.abrupt_shutdown(h2::Reason::ENHANCE_YOUR_CALM);
            let closed = std::future::poll_fn(|cx| conn.poll_closed(cx));
            let _ = tokio::time::timeout(std::time::Duration::from_secs(1), closed).await;
            return Err(why);
        }
    };
    let pings = conn
        .ping_pong()
        .expect("the first call has the ping handle");
    let mut alive = std::pin::pin!(keep_alive(pings, None));
    let mut drain = std::pin::pin!(drain);
    let mut draining = false;
    // No new streams past the connection's age or its peer certificate's
    // expiry: certificates are short-lived instead of revoked, so a peer
    // must not keep using one it could no longer present.
    let mut retire = std::pin::pin!(tokio::time::sleep_until(retire_at(
        shared.settings.tunnel_max_age(),
        tp.tls.peer_cert_not_after,
    )));
    // A connection that carries nothing for twice the peers' own idle
    // timeout (after which an honest peer has closed it) gets GOAWAY: a
    // peer cannot keep idle connections open for their whole age. Streams
    // are counted here, not timed, so a busy connection pays nothing.
    let server_idle = shared.settings.tunnel_idle_timeout().saturating_mul(2);
    let mut idle = std::pin::pin!(tokio::time::sleep(server_idle));
    let (mut accepted, mut accepted_at_last_look) = (0u64, 0u64);
    loop {
        // Whether to say GOAWAY now (shutdown, age, idle): after it the
        // connection takes no stream and no longer counts towards its
        // peer's cap.
        let go_away = tokio::select! {
            biased;
            r = conn.accept() => match r {
                Some(Ok((req, respond))) => {
                    accepted += 1;
                    let connect = req.method() == Method::CONNECT;
                    // Boxed: spawning then moves a pointer, not the whole
                    // request future, several times.
                    let stream = Box::pin(serve_stream(shared.clone(), tp.clone(), req, respond));
                    if connect {
                        // A TCP stream can outlive its connection's drain:
                        // the proxy's shutdown waits for it, then ends it.
                        shared.spawn(stream);
                    } else {
                        // A request ends with its stream, which the
                        // connection's drain waits for.
                        tokio::spawn(stream);
                    }
                    false
                }
                Some(Err(e)) => return Err(e.to_string()),
                None => return Ok(()),
            },
            _ = &mut drain, if !draining => true,
            _ = &mut retire, if !draining => {
                tracing::debug!(
                    peer = %tp.identity,
                    "tunnel connection at its age limit or its peer certificate's expiry: GOAWAY"
                );
                true
            }
            () = &mut idle, if !draining => {
                if accepted == accepted_at_last_look && tp.open_streams.load(Ordering::Relaxed) == 0 {
                    tracing::debug!(
                        peer = %tp.identity,
                        "tunnel connection idle for {server_idle:?}: GOAWAY"
                    );
                    true
                } else {
                    accepted_at_last_look = accepted;
                    idle.as_mut().reset(tokio::time::Instant::now() + server_idle);
                    false
                }
            }
            why = &mut alive => {
                // Say GOAWAY, in case the peer still reads.
                conn.abrupt_shutdown(h2::Reason::NO_ERROR);
                let closed = std::future::poll_fn(|cx| conn.poll_closed(cx));
                let _ = tokio::time::timeout(std::time::Duration::from_secs(1), closed).await;
                return Err(why);
            }
        };
        if go_away {
            draining = true;
            drop(open.take());
            conn.graceful_shutdown();
        }
    }
}

/// When a connection accepted now stops taking streams: after `max_age`, or
/// when the peer's certificate expires (`not_after`, Unix seconds), if
/// sooner.
fn retire_at(max_age: std::time::Duration, not_after: Option<u64>) -> tokio::time::Instant {
    let now = tokio::time::Instant::now();
    let by_age = now + max_age;
    let Some(not_after) = not_after else {
        return by_age;
    };
    let unix_now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    by_age.min(now + std::time::Duration::from_secs(not_after.saturating_sub(unix_now)))
}

/// One stream: a `CONNECT` (a TCP stream, or an HTTP/1.1 upgrade) or an HTTP
/// request.
async fn serve_stream(
    shared: Arc<Shared>,
    tp: Arc<TunnelPeer>,
    req: Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
) {
    tp.in_flight.fetch_add(1, Ordering::Relaxed);
    // Until the stream's answer is on its way.
    let in_flight = InFlight(tp.in_flight.clone());
    // Until the stream ends: its task is the stream's to the end (an
    // upgrade's splice holds one of its own).
    let _open = OpenStream::new(&tp);
    if !tp.opened.load(Ordering::Relaxed) {
        tp.opened.store(true, Ordering::Relaxed);
    }
    let (parts, recv) = req.into_parts();
    if parts.method == Method::CONNECT {
        // Boxed: a request's task then carries only what a request needs.
        return Box::pin(handle_connect(shared, tp, parts, recv, respond, in_flight)).await;
    }
    // The workload clients frame the body by its declared content-length
    // (which `h2` holds the stream to): no size hint needed.
    let req = Request::from_parts(parts, RecvBody::new(recv));
    let idle = shared.settings.workload_side_idle_timeout();
    // A peer that resets the stream (its caller gave up) ends the request.
    let resp = tokio::select! {
        biased;
        resp = handle_http(shared, tp, req) => resp,
        reset = std::future::poll_fn(|cx| respond.poll_reset(cx)) => {
            tracing::debug!("inbound stream reset before its answer: {reset:?}");
            return;
        }
    };
    drop(in_flight);
    reply(respond, resp, idle).await;
}

/// Sends `resp` on the stream: its head, then its body as the peer's window
/// allows.
async fn reply(mut respond: SendResponse<Bytes>, resp: Response<Body>, idle: std::time::Duration) {
    let (mut head, body) = resp.into_parts();
    let eos = http_body::Body::is_end_stream(&body);
    if !eos
        && !head.headers.contains_key(http::header::CONTENT_LENGTH)
        && let Some(n) = http_body::Body::size_hint(&body).exact()
    {
        head.headers
            .insert(http::header::CONTENT_LENGTH, HeaderValue::from(n));
    }
    match respond.send_response(Response::from_parts(head, ()), eos) {
        // A workload's body that breaks off is the server's failure, not a
        // cancel by the caller.
        Ok(send) if !eos => {
            crate::h2stream::pipe(body, send, h2::Reason::INTERNAL_ERROR, Some(idle)).await
        }
        Ok(_) => {}
        Err(e) => {
            tracing::debug!("inbound response not sent: {e}");
            respond.send_reset(h2::Reason::INTERNAL_ERROR);
        }
    }
}

/// Why an HTTP request to a pod port declared `appProtocol: tcp` is refused.
fn declared_tcp_refusal(target: SocketAddr) -> String {
    format!("{target} is declared TCP (appProtocol: tcp) and takes no HTTP request")
}

/// A denial: counted, and logged with both identities (one line a second
/// at most: a peer looping on a denied target must not flood the log; the
/// access log has every one).
fn deny(
    shared: &Shared,
    tp: &TunnelPeer,
    (target, addr): (Option<&LocalWorkload>, Option<SocketAddr>),
    protocol: &str,
    reason: &str,
) {
    shared
        .metrics
        .policy_denials
        .get_or_create(&DenialLabels {
            source: tp.identity.to_string(),
            destination: target.map_or_else(String::new, |t| t.identity.to_string()),
            protocol: protocol.into(),
        })
        .inc();
    warn_throttled!(
        source = %tp.identity,
        destination = target.map(|t| t.identity.to_string()).unwrap_or_default(),
        destination_addr = addr.map(|a| a.to_string()).unwrap_or_default(),
        peer = %tp.addr,
        protocol,
        "denied: {reason}"
    );
}

/// Checks everything but the request itself: the target is a local workload,
/// and the identity the caller asked for (SNI) is that workload's.
fn check_target(
    shared: &Shared,
    state: &State,
    tp: &TunnelPeer,
    target: SocketAddr,
) -> Result<Arc<LocalWorkload>, Refusal> {
    let Some(w) = state.local_workload(target.ip()).cloned() else {
        return Err(Refusal {
            workload: None,
            reason: format!("{} is not a workload of this node", target.ip()),
        });
    };
    // The identity SNI named is known from the handshake; hash again only
    // for a workload that arrived in a later snapshot.
    if let Some(sni) = &tp.sni
        && tp.local_identity.as_ref() != Some(&w.identity)
        && !asked_for(shared, &w.identity, sni)
    {
        return Err(Refusal {
            reason: format!(
                "{target} is {} but the caller asked for server name {sni}",
                w.identity
            ),
            workload: Some(w),
        });
    }
    Ok(w)
}

/// Why [`check_target`] refused, and the workload when the target is one
/// (the denial is then counted and logged with its identity).
struct Refusal {
    workload: Option<Arc<LocalWorkload>>,
    reason: String,
}

/// Whether `sni` names `identity`.
fn asked_for(shared: &Shared, identity: &SpiffeId, sni: &str) -> bool {
    match shared.identity.server_name(identity) {
        Ok(rustls::pki_types::ServerName::DnsName(d)) => d.as_ref().eq_ignore_ascii_case(sni),
        _ => false,
    }
}

/// Counts a request as in flight on its connection while alive.
struct InFlight(Arc<AtomicUsize>);

struct OpenStream(Arc<TunnelPeer>);

impl OpenStream {
    fn new(tp: &Arc<TunnelPeer>) -> Self {
        tp.open_streams.fetch_add(1, Ordering::Relaxed);
        Self(tp.clone())
    }
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.0.open_streams.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn handle_connect(
    shared: Arc<Shared>,
    tp: Arc<TunnelPeer>,
    parts: http::request::Parts,
    recv: RecvStream,
    mut respond: SendResponse<Bytes>,
    in_flight: InFlight,
) {
    let start = Instant::now();
    // A CONNECT carries no body (as hyper's server held it to).
    let length = parts.headers.get(http::header::CONTENT_LENGTH);
    if length.is_some_and(|v| v.as_bytes() != b"0") {
        tracing::debug!(source = %tp.identity, "CONNECT with a body: stream reset");
        respond.send_reset(h2::Reason::PROTOCOL_ERROR);
        return;
    }
    let peer_reads_reset = parts.headers.contains_key(crate::h2stream::RESET_TRAILER);
    let mut refuse = |to: (Option<&LocalWorkload>, Option<SocketAddr>), reason: &str| {
        deny(&shared, &tp, to, "tcp", reason);
        AccessRecord {
            direction: "inbound",
            protocol: "tcp",
            source_addr: Some(tp.addr.to_string()),
            source_identity: Some(&tp.identity),
            destination: to.0.map(|w| w.id.to_string()),
            destination_addr: to.1.map(|a| a.to_string()),
            destination_identity: to.0.map(|w| &w.identity),
            secured: true,
            duration_ms: start.elapsed().as_secs_f64() * 1e3,
            reason: Some(reason),
            ..Default::default()
        }
        .emit();
        respond.send_reset(h2::Reason::REFUSED_STREAM);
    };
    let target = match parts.uri.authority().map(|a| parse_target(a.as_str())) {
        Some(Ok(t)) => t,
        Some(Err(e)) => return refuse((None, None), &e.to_string()),
        None => return refuse((None, None), "CONNECT without an authority"),
    };
    let state = shared.state();
    let workload = match check_target(&shared, &state, &tp, target) {
        Ok(w) => w,
        Err(r) => return refuse((r.workload.as_deref(), Some(target)), &r.reason),
    };
    // An HTTP/1.1 upgrade (WebSocket) rides a CONNECT stream of its own:
    // its one request is parsed and policed like any other.
    let upgrade = parts.headers.contains_key(UPGRADE_REQUEST);
    // Opaque bytes to a port declared HTTP could carry a forged
    // `sluice-source-identity`: such a port takes HTTP only (a caller's
    // node proxy never sends it opaque TCP).
    if !upgrade && state.declared_http(&workload.id, target.port()) {
        return refuse(
            (Some(&workload), Some(target)),
            &format!("{target} is declared HTTP (appProtocol) and takes no opaque TCP stream"),
        );
    }
    if !upgrade
        && let Verdict::Deny(denial) =
            authorize(&state, &tp.identity, &workload, target.port(), None)
    {
        // A reset tells the caller nothing: the log has it all.
        return refuse((Some(&workload), Some(target)), &denial.logged());
    }
    drop(state);
    if upgrade {
        let Some((stream, row)) = open_stream(
            &shared,
            &tp,
            (respond, recv),
            target,
            &workload,
            StreamIo::ending_on_drop,
            peer_reads_reset,
        ) else {
            return;
        };
        drop(in_flight);
        return upgrade_stream(shared, tp, stream, row, target, workload).await;
    }
    let connect = tokio::time::timeout(
        shared.settings.connect_timeout(),
        crate::connect::connect(
            target,
            shared.settings.socket_mark,
            shared.settings.connect_timeout(),
        ),
    );
    // A caller that resets the stream meanwhile takes the connect with it.
    let connected = tokio::select! {
        biased;
        c = connect => c,
        reset = std::future::poll_fn(|cx| respond.poll_reset(cx)) => {
            tracing::debug!("CONNECT stream reset before its answer: {reset:?}");
            return;
        }
    };
    let mut upstream = match connected {
        Ok(Ok(s)) => s,
        Err(_) | Ok(Err(_)) => {
            let (status, reason) = match connected {
                Ok(Err(e)) => (
                    StatusCode::BAD_GATEWAY,
                    format!("connecting to {target}: {e}"),
                ),
                _ => (
                    StatusCode::GATEWAY_TIMEOUT,
                    format!("connecting to {target}: timed out"),
                ),
            };
            // This node's line, with both identities, as the caller's
            // node has its own.
            AccessRecord {
                duration_ms: start.elapsed().as_secs_f64() * 1e3,
                reason: Some(&reason),
                ..stream_record(&tp, target, &workload, "tcp")
            }
            .emit();
            return reply(
                respond,
                proxy_response(status, &reason),
                shared.settings.workload_side_idle_timeout(),
            )
            .await;
        }
    };
    let _ = upstream.set_nodelay(true);
    // Cut by the proxy's shutdown: a reset for the workload (disarmed
    // below).
    crate::abort::arm_reset(&upstream);
    let Some((mut stream, row)) = open_stream(
        &shared,
        &tp,
        (respond, recv),
        target,
        &workload,
        StreamIo::relaying,
        peer_reads_reset,
    ) else {
        return;
    };
    drop(in_flight);
    let labels = TcpLabels {
        direction: Direction::Inbound,
        source: tp.identity.to_string(),
        destination: workload.identity.to_string(),
        secured: true,
    };
    let (sent, received) = count_relay(&shared.metrics, &labels, Some(row.clone()));
    let on_end = crate::accesslog::OnEnd::new(|reason: Option<&str>| {
        AccessRecord {
            bytes_sent: Some(row.sent()),
            bytes_received: Some(row.received()),
            duration_ms: start.elapsed().as_secs_f64() * 1e3,
            reason,
            ..stream_record(&tp, target, &workload, "tcp")
        }
        .emit()
    });
    let result = relay(
        &mut stream,
        &mut upstream,
        shared.settings.tcp_idle_timeout(),
        sent,
        received,
    )
    .await;
    if result.as_ref().is_err_and(crate::abort::broke_off) {
        // Not a clean end: neither side may take it for one (a reset
        // rather than a FIN: an upload or an answer was cut), each after
        // what came before it (this is the stream's server side, whose drop
        // never discards what is queued: no linger).
        stream.abort();
        crate::abort::reset_once_sent(&upstream, crate::abort::DRAIN_LIMIT).await;
    } else {
        crate::abort::disarm_reset(&upstream);
    }
    drop(upstream);
    let reason = result.err().map(|e| e.to_string());
    on_end.log(reason.as_deref());
}

/// Answers a CONNECT stream with `200` and returns it as a byte stream
/// (made by `io`), with its row in the connection table; `None` when the
/// stream ended first.
fn open_stream(
    shared: &Shared,
    tp: &TunnelPeer,
    (mut respond, recv): (SendResponse<Bytes>, RecvStream),
    target: SocketAddr,
    workload: &LocalWorkload,
    io: fn(SendStream<Bytes>, RecvStream) -> StreamIo,
    peer_reads_reset: bool,
) -> Option<(StreamIo, Arc<crate::conntable::ConnHandle>)> {
    // This side reads the reset trailer (see `StreamIo::abort`).
    let mut ok = Response::new(());
    crate::h2stream::mark_reset(ok.headers_mut());
    let send = match respond.send_response(ok, false) {
        Ok(s) => s,
        Err(e) => {
            tracing::debug!("CONNECT stream from {} not answered: {e}", tp.identity);
            return None;
        }
    };
    let row = shared.table.open(
        ConnKind::InboundTcp,
        ConnMeta {
            source_addr: Some(tp.addr),
            source_identity: Some(tp.identity.clone()),
            destination_addr: Some(target),
            destination: Some(workload.id.clone()),
            destination_identity: Some(workload.identity.clone()),
            source_workload: None,
            tls: Some(tp.tls.clone()),
        },
    );
    Some((
        io(send, recv).peer_reads_reset_trailer(peer_reads_reset),
        Arc::new(row),
    ))
}

/// A CONNECT stream marked as carrying one HTTP/1.1 upgrade request (see
/// [`crate::upgrade`]), answered already: its request is read as HTTP/1.1
/// (one request, no keep-alive, bounded and timed like any other), policed
/// with its method and path, given the caller's identity header and sent to
/// the workload. Bytes after it reach the workload only if the workload
/// switches protocols.
async fn upgrade_stream(
    shared: Arc<Shared>,
    tp: Arc<TunnelPeer>,
    stream: StreamIo,
    row: Arc<crate::conntable::ConnHandle>,
    target: SocketAddr,
    workload: Arc<LocalWorkload>,
) {
    let s = shared.settings.clone();
    let switched = stream.switched();
    let svc = service_fn(move |req| {
        let (shared, tp, workload, row, switched) = (
            shared.clone(),
            tp.clone(),
            workload.clone(),
            row.clone(),
            switched.clone(),
        );
        async move {
            let resp = upgrade_request(&shared, &tp, &workload, target, row, req).await;
            // From here on the stream is relayed: the caller's side giving
            // it up is a reset for the workload, not an end.
            if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
                switched.now();
            }
            Ok::<_, Infallible>(resp)
        }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(s.header_read_timeout())
        .max_buf_size((s.max_header_bytes as usize).max(8192))
        .keep_alive(false)
        .serve_connection(TokioIo::new(stream), svc)
        .with_upgrades();
    if let Err(e) = conn.await {
        tracing::debug!("upgrade stream ended: {e}");
    }
}

/// The one request of an upgrade stream.
async fn upgrade_request(
    shared: &Arc<Shared>,
    tp: &Arc<TunnelPeer>,
    workload: &Arc<LocalWorkload>,
    target: SocketAddr,
    row: Arc<crate::conntable::ConnHandle>,
    req: Request<Incoming>,
) -> Response<Body> {
    let start = Instant::now();
    let (mut parts, body) = req.into_parts();
    let (method, path) = (parts.method.clone(), parts.uri.path().to_owned());
    let known = std::sync::OnceLock::from(workload.clone());
    // Dropped before the answer is counted: the caller went away.
    let mut cancelled = Cancelled {
        shared,
        tp,
        workload: &known,
        method: &method,
        path: Some(&path),
        grpc: false,
        start,
        armed: true,
    };
    // Nothing reached the workload (see `UNREACHABLE`).
    let mut unreachable = false;
    // A denial's reason as this node logs it, with the policies.
    let mut logged_reason: Option<String> = None;
    let result: Result<Response<Body>, (StatusCode, String)> = async {
        let Some(client) = crate::upgrade::take(&mut parts) else {
            return Err((
                StatusCode::BAD_REQUEST,
                "a stream marked as an upgrade must carry one HTTP/1.1 upgrade request, \
                 without a body"
                    .into(),
            ));
        };
        // An HTTP request to a port declared TCP would deliver bytes a
        // policy allowed by method and path to a server that reads them
        // otherwise: refused as the plain requests are (`handle_http`).
        if shared.state().declared_tcp(&workload.id, target.port()) {
            let reason = declared_tcp_refusal(target);
            deny(shared, tp, (Some(workload), Some(target)), "http", &reason);
            return Err((StatusCode::FORBIDDEN, reason));
        }
        let facts = HttpFacts {
            method: &method,
            path: &path,
        };
        if let Verdict::Deny(denial) = authorize(
            &shared.state(),
            &tp.identity,
            workload,
            target.port(),
            Some(facts),
        ) {
            let logged = denial.logged();
            deny(shared, tp, (Some(workload), Some(target)), "http", &logged);
            logged_reason = Some(logged);
            return Err((StatusCode::FORBIDDEN, denial.reason));
        }
        let host = HeaderValue::from_str(&target.to_string()).expect("an address is a valid host");
        crate::upgrade::prepare(&mut parts, &host);
        // After `prepare`, whose hop-by-hop clean-up removes what the
        // request's `Connection` names.
        remove_mesh_headers(&mut parts.headers);
        parts
            .headers
            .insert(SOURCE_IDENTITY, tp.identity_header.clone());
        let s = &shared.settings;
        let tcp = crate::connect::connect(target, s.socket_mark, s.connect_timeout())
            .await
            .map_err(|e| {
                unreachable = true;
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("connecting to {target}: {e}"),
                )
            })?;
        // A workload that takes the request and never answers must not
        // hold the stream and its connection for ever: the exchange idle
        // timeout, a quarter later than the caller's node applies it (as
        // for other requests here).
        let wait = s.workload_side_idle_timeout();
        let exchange = crate::upgrade::exchange(
            shared,
            tcp,
            Request::from_parts(parts, boxed(body)),
            client,
            crate::upgrade::Splice {
                labels: TcpLabels {
                    direction: Direction::Inbound,
                    source: tp.identity.to_string(),
                    destination: workload.identity.to_string(),
                    secured: true,
                },
                row: Some(row),
                // The tunnel stream's task ends once the upgrade's answer
                // is out; the stream is open until the splice ends.
                hold: Some(Box::new(OpenStream::new(tp))),
            },
        );
        let resp = tokio::time::timeout(wait, exchange)
            .await
            .map_err(|_| {
                (
                    StatusCode::GATEWAY_TIMEOUT,
                    format!("no answer to the upgrade request from {target} for {wait:?}"),
                )
            })?
            .map_err(|e| {
                (
                    StatusCode::BAD_GATEWAY,
                    format!("upgrade request to {target}: {e}"),
                )
            })?;
        let (mut rp, rb) = resp.into_parts();
        remove_mesh_headers(&mut rp.headers);
        Ok(Response::from_parts(rp, boxed(rb)))
    }
    .await;
    let (mut resp, reason) = match result {
        Ok(r) => (r, None),
        Err((status, reason)) => {
            let resp = marked_unreachable(proxy_response(status, &reason), unreachable);
            (resp, Some(reason))
        }
    };
    let status = resp.status().as_u16();
    cancelled.armed = false;
    count_request(
        shared,
        tp,
        Some(workload),
        Answer {
            status,
            response: &mut resp,
            grpc: false,
            elapsed: start.elapsed(),
            log: None,
        },
    );
    AccessRecord {
        method: Some(method.as_str()),
        path: Some(&path),
        status: Some(resp.status().as_u16()),
        duration_ms: start.elapsed().as_secs_f64() * 1e3,
        reason: logged_reason.as_deref().or(reason.as_deref()),
        ..stream_record(tp, target, workload, "http-upgrade")
    }
    .emit();
    resp
}

/// The proxy's own answer, marked [`UNREACHABLE`] when nothing of the
/// request reached the workload (the caller's proxy may then retry it
/// elsewhere).
fn marked_unreachable(mut resp: Response<Body>, unreachable: bool) -> Response<Body> {
    if unreachable {
        resp.headers_mut()
            .insert(UNREACHABLE, HeaderValue::from_static("1"));
    }
    resp
}

/// The access-log fields every record of a CONNECT stream to `workload`
/// shares.
fn stream_record<'a>(
    tp: &'a TunnelPeer,
    target: SocketAddr,
    workload: &'a LocalWorkload,
    protocol: &'static str,
) -> AccessRecord<'a> {
    AccessRecord {
        direction: "inbound",
        protocol,
        source_addr: Some(tp.addr.to_string()),
        source_identity: Some(&tp.identity),
        destination: Some(workload.id.to_string()),
        destination_addr: Some(target.to_string()),
        destination_identity: Some(&workload.identity),
        secured: true,
        ..Default::default()
    }
}

/// The destination label of an inbound request to `workload`.
fn destination_label(tp: &TunnelPeer, workload: Option<&LocalWorkload>) -> Label {
    match workload {
        Some(w) if tp.local_identity.as_ref() == Some(&w.identity) => tp.local_label.clone(),
        Some(w) => Label::from(w.identity.as_ref()),
        None => Label::default(),
    }
}

/// Counts and logs an inbound request whose handler is dropped before its
/// answer is counted: the caller's side reset its stream before the
/// answer's head (see `forward::Cancelled`, the outbound side's).
struct Cancelled<'a> {
    shared: &'a Shared,
    tp: &'a TunnelPeer,
    workload: &'a std::sync::OnceLock<Arc<LocalWorkload>>,
    method: &'a Method,
    path: Option<&'a str>,
    grpc: bool,
    start: Instant,
    armed: bool,
}

impl Drop for Cancelled<'_> {
    fn drop(&mut self) {
        // A panic is not the caller's doing (and is logged as what it is).
        if !self.armed || std::thread::panicking() {
            return;
        }
        let workload = self.workload.get().map(|w| &**w);
        self.shared.metrics.count_cancelled(
            RequestKey {
                direction: Direction::Inbound,
                source: &self.tp.label,
                destination: &destination_label(self.tp, workload),
                route: &Label::default(),
            },
            self.grpc,
        );
        if !crate::accesslog::enabled() {
            return;
        }
        AccessRecord {
            direction: "inbound",
            protocol: "http",
            source_addr: Some(self.tp.addr.to_string()),
            source_identity: Some(&self.tp.identity),
            destination: workload.map(|w| w.id.to_string()),
            destination_identity: workload.map(|w| &w.identity),
            secured: true,
            method: Some(self.method.as_str()),
            path: self.path,
            duration_ms: self.start.elapsed().as_secs_f64() * 1e3,
            reason: Some(crate::forward::cancel_reason(self.shared)),
            grpc_status: self.grpc.then_some("1"),
            ..Default::default()
        }
        .emit();
    }
}

/// Counts an inbound request to `workload` in the request metrics (a gRPC
/// call's once its status passes: see [`RequestMetricsCache::count`]).
fn count_request(
    shared: &Shared,
    tp: &TunnelPeer,
    workload: Option<&LocalWorkload>,
    answer: Answer<'_>,
) -> Option<crate::metrics::GrpcStatus> {
    let dst = destination_label(tp, workload);
    tp.metrics.count(
        &shared.metrics,
        RequestKey {
            direction: Direction::Inbound,
            source: &tp.label,
            destination: &dst,
            route: &Label::default(),
        },
        answer,
    )
}

async fn handle_http(
    shared: Arc<Shared>,
    tp: Arc<TunnelPeer>,
    req: Request<RecvBody>,
) -> Response<Body> {
    let start = Instant::now();
    let (mut parts, body) = req.into_parts();
    let log = crate::accesslog::enabled();
    let grpc = crate::body::is_grpc(&parts.headers);
    // Counted by its grpc-status (gRPC-Web's is not in trailers).
    let grpc_counted = grpc && crate::body::has_grpc_trailers(&parts.headers);
    let method = parts.method.clone();
    let path = log.then(|| parts.uri.path().to_owned());
    // The workload the request is for, once known (set once), and its
    // address.
    let workload = std::sync::OnceLock::<Arc<LocalWorkload>>::new();
    let mut asked = None;
    // A denial's reason as this node logs it, when more than the caller's.
    let mut logged_reason: Option<String> = None;
    // Dropped before the answer is counted: the caller went away.
    let mut cancelled = Cancelled {
        shared: &shared,
        tp: &tp,
        workload: &workload,
        method: &method,
        path: path.as_deref(),
        grpc: grpc_counted,
        start,
        armed: true,
    };
    // Nothing reached the workload (see `UNREACHABLE`).
    let mut unreachable = false;
    // As on the caller's side (see `forward::handle`): an exchange that
    // moves in neither direction for the idle timeout ends, so a peer that
    // opens streams and never finishes their bodies cannot hold tasks and
    // workload connections for ever, a quarter later than there.
    let idle = shared.settings.workload_side_idle_timeout();
    let activity = crate::body::Activity::since(start);
    // The caller's route may give the request longer (`timeouts.request:
    // 10m`): waited for here too, up to a day.
    if let Some(ms) = parts
        .headers
        .get(TIMEOUT)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
        && let Some(end) = start.checked_add(std::time::Duration::from_millis(
            ms.min(MAX_ROUTE_TIMEOUT_MS),
        ))
    {
        activity.hold_until(end);
    }
    // A gRPC call's own deadline, as on the caller's side.
    if grpc
        && let Some(t) =
            crate::body::grpc_timeout(&parts.headers, crate::forward::MAX_CALL_DEADLINE)
    {
        activity.hold_until(start + t);
    }
    let has_body = !http_body::Body::is_end_stream(&body);
    let body = if has_body {
        boxed(crate::body::Timed::idle(
            boxed(body),
            idle,
            activity.clone(),
            ("the request body", "its response"),
        ))
    } else {
        boxed(body)
    };
    let exchange = async {
        // Taken out now: then the mesh's own headers are usually all gone
        // before the check for them below.
        let raw = parts.headers.remove(TARGET);
        let raw = raw.as_ref().and_then(|v| v.to_str().ok()).ok_or_else(|| {
            (
                StatusCode::BAD_REQUEST,
                format!("request without a {TARGET_HEADER} header"),
            )
        })?;
        let target = parse_target(raw).map_err(|e| (StatusCode::BAD_REQUEST, e.to_string()))?;
        asked = Some(target);
        // One host (RFC 9113 section 8.3.1): a caller's node proxy sends
        // `:authority` alone; a Host beside it that names another, or two,
        // would reach the workload as a second opinion on the host.
        let mut hosts = parts.headers.get_all(http::header::HOST).iter();
        if let Some(h) = hosts.next()
            && (hosts.next().is_some()
                || parts
                    .uri
                    .authority()
                    .is_some_and(|a| a.as_str().as_bytes() != h.as_bytes()))
        {
            return Err((
                StatusCode::BAD_REQUEST,
                "the request's Host does not agree with its :authority, or comes twice".into(),
            ));
        }
        let state = shared.state();
        let w = check_target(&shared, &state, &tp, target).map_err(|r| {
            if let Some(w) = r.workload {
                let _ = workload.set(w);
            }
            (StatusCode::FORBIDDEN, r.reason)
        })?;
        let _ = workload.set(w.clone());
        if state.declared_tcp(&w.id, target.port()) {
            return Err((StatusCode::FORBIDDEN, declared_tcp_refusal(target)));
        }
        let facts = HttpFacts {
            method: &parts.method,
            path: parts.uri.path(),
        };
        if let Verdict::Deny(denial) =
            authorize(&state, &tp.identity, &w, target.port(), Some(facts))
        {
            // The caller gets the reason; this node's log the policies too.
            logged_reason = Some(denial.logged());
            return Err((StatusCode::FORBIDDEN, denial.reason));
        }
        drop(state);
        let proto = match parts.headers.remove(PROTOCOL) {
            Some(v) if v.as_bytes() == b"h2" => Protocol::Http2,
            _ => Protocol::Http1,
        };
        remove_mesh_headers(&mut parts.headers);
        parts
            .headers
            .insert(SOURCE_IDENTITY, tp.identity_header.clone());
        let resp = shared
            .clients
            .send(target, proto, Request::from_parts(parts, body))
            .await
            .map_err(|e| {
                unreachable = e.is_connect();
                let status = if unreachable {
                    StatusCode::SERVICE_UNAVAILABLE
                } else {
                    StatusCode::BAD_GATEWAY
                };
                (status, format!("sending to {target}: {e}"))
            })?;
        let (mut rp, rb) = resp.into_parts();
        strip_hop_by_hop(&mut rp.headers);
        Ok(Response::from_parts(rp, boxed(rb)))
    };
    // A stalled body's own timer says why first (see `forward::handle`).
    let watchdog = if has_body { idle + idle / 4 } else { idle };
    let result: Result<Response<Body>, (StatusCode, String)> =
        match crate::body::until_idle(exchange, watchdog, &activity).await {
            Some(r) => r,
            None => Err((
                StatusCode::GATEWAY_TIMEOUT,
                format!("no answer for {watchdog:?}, while the request sent nothing either"),
            )),
        };
    activity.touch();
    let result = result.map(|r| {
        if http_body::Body::is_end_stream(r.body()) {
            r
        } else {
            r.map(|b| {
                boxed(crate::body::Timed::idle(
                    b,
                    idle,
                    activity,
                    ("the response", "its request"),
                ))
            })
        }
    });
    let (mut resp, reason, status) = match result {
        Ok(r) => {
            let status = r.status().as_u16();
            (r, None, status)
        }
        Err((status, reason)) => {
            if status == StatusCode::FORBIDDEN {
                deny(
                    &shared,
                    &tp,
                    (workload.get().map(|w| &**w), asked),
                    "http",
                    logged_reason.as_deref().unwrap_or(&reason),
                );
            }
            // Counted and logged as the HTTP status the proxy chose.
            let resp = marked_unreachable(
                crate::body::answer_for(&method, crate::body::proxy_answer(status, &reason, grpc)),
                unreachable,
            );
            (resp, Some(reason), status.as_u16())
        }
    };
    cancelled.armed = false;
    let record = log.then(|| AccessRecord {
        direction: "inbound",
        protocol: "http",
        source_addr: Some(tp.addr.to_string()),
        source_identity: Some(&tp.identity),
        destination: workload.get().map(|w| w.id.to_string()),
        destination_addr: asked.map(|a| a.to_string()),
        destination_identity: workload.get().map(|w| &w.identity),
        secured: true,
        method: Some(method.as_str()),
        path: path.as_deref(),
        status: Some(status),
        duration_ms: start.elapsed().as_secs_f64() * 1e3,
        reason: logged_reason.as_deref().or(reason.as_deref()),
        ..Default::default()
    });
    count_request(
        &shared,
        &tp,
        workload.get().map(|w| &**w),
        Answer {
            status,
            response: &mut resp,
            grpc: grpc_counted,
            elapsed: start.elapsed(),
            log: record,
        },
    );
    resp
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime, UNIX_EPOCH};

    use super::retire_at;

    #[tokio::test(start_paused = true)]
    async fn a_tunnel_retires_at_its_age_or_its_peer_certificate_expiry_if_sooner() {
        let hour = Duration::from_secs(3600);
        let unix_now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let now = tokio::time::Instant::now();
        assert_eq!(retire_at(hour, None), now + hour);
        assert_eq!(retire_at(hour, Some(unix_now + 7200)), now + hour);
        let soon = retire_at(hour, Some(unix_now + 60));
        assert!(soon <= now + Duration::from_secs(60) && soon >= now + Duration::from_secs(59));
        // Expired already: at once.
        assert_eq!(retire_at(hour, Some(unix_now - 10)), now);
    }
}
