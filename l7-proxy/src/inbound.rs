//! The inbound tunnel listener (port 15008): terminates mutual TLS, reads the
//! caller's verified SPIFFE ID, checks that the target is a local workload and
//! that policy allows the caller, then delivers to the workload.
//!
//! Denials: HTTP requests get `403` with a `sluice-reason` header; TCP
//! (`CONNECT`) streams are reset with `REFUSED_STREAM`. Each is counted and
//! logged with both identities.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
};

use http::{HeaderValue, Method, Request, Response, StatusCode};
use hyper::{body::Incoming, service::service_fn};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::{net::TcpListener, net::TcpStream, time::Instant};

use crate::{
    accesslog::AccessRecord,
    batch::{BatchIo, FlushAtEnd},
    body::{Body, BoxError, boxed, empty, proxy_response, strip_hop_by_hop},
    config::{
        LocalWorkload, PROTOCOL, SOURCE_IDENTITY, SpiffeId, TARGET, TARGET_HEADER, UPGRADE_REQUEST,
        UPGRADE_REQUEST_HEADER,
    },
    conntable::{ConnKind, ConnMeta, TlsInfo},
    io::{Counted, Rewind, relay},
    metrics::{
        DenialLabels, Direction, Label, RequestMetricsCache, TcpLabels, TlsFailureLabels,
        status_class,
    },
    outbound::drain_on_shutdown,
    policy::{HttpFacts, Verdict, authorize},
    proxy::Shared,
    sniff::Protocol,
    state::State,
    target::parse_target,
};

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
    /// Requests being handled on this connection (see [`FlushAtEnd`]).
    in_flight: Arc<AtomicUsize>,
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
        tracing::warn!(%peer, reason, "inbound TLS handshake failed: {detail}");
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
        acceptor.accept(Counted::new(tcp, row.clone())),
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
        identity,
        sni,
        local_label: local_identity
            .as_ref()
            .map_or_else(Label::default, |id| Label::from(id.as_ref())),
        local_identity,
        tls: info,
    });
    let svc = {
        let (shared, tp) = (shared.clone(), tp.clone());
        // Boxed: the stream task hyper spawns per request then moves a
        // pointer, not the whole request future.
        service_fn(move |req| Box::pin(handle(shared.clone(), tp.clone(), req)))
    };
    let (io, batch) = BatchIo::new(tls);
    let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .max_header_list_size(shared.settings.max_header_bytes)
        .max_concurrent_streams(shared.settings.tunnel_max_streams)
        // A peer that stops answering pings is gone: its streams end.
        .keep_alive_interval(Some(std::time::Duration::from_secs(30)))
        .keep_alive_timeout(std::time::Duration::from_secs(10))
        .serve_connection(TokioIo::new(io), svc);
    let conn = FlushAtEnd::new(conn, batch, tp.in_flight.clone());
    if let Err(e) = drain_on_shutdown(&shared, conn, |c| c.inner_mut().graceful_shutdown()).await {
        tracing::debug!(%peer, "inbound tunnel connection ended: {e}");
    }
}

/// A denial: counted, logged with both identities.
fn deny(
    shared: &Shared,
    tp: &TunnelPeer,
    target: Option<&LocalWorkload>,
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
    tracing::warn!(
        source = %tp.identity,
        destination = target.map(|t| t.identity.to_string()).unwrap_or_default(),
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
) -> Result<Arc<LocalWorkload>, String> {
    let Some(w) = state.local_workload(target.ip()).cloned() else {
        return Err(format!("{} is not a workload of this node", target.ip()));
    };
    // The identity SNI named is known from the handshake; hash again only
    // for a workload that arrived in a later snapshot.
    if let Some(sni) = &tp.sni
        && tp.local_identity.as_ref() != Some(&w.identity)
        && !asked_for(shared, &w.identity, sni)
    {
        return Err(format!(
            "{target} is {} but the caller asked for server name {sni}",
            w.identity
        ));
    }
    Ok(w)
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

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn handle(
    shared: Arc<Shared>,
    tp: Arc<TunnelPeer>,
    req: Request<Incoming>,
) -> Result<Response<Body>, BoxError> {
    tp.in_flight.fetch_add(1, Ordering::Relaxed);
    let _in_flight = InFlight(tp.in_flight.clone());
    if req.method() == Method::CONNECT {
        handle_connect(shared, tp, req).await
    } else {
        Ok(handle_http(shared, tp, req).await)
    }
}

fn refused() -> BoxError {
    Box::new(h2::Error::from(h2::Reason::REFUSED_STREAM))
}

async fn handle_connect(
    shared: Arc<Shared>,
    tp: Arc<TunnelPeer>,
    req: Request<Incoming>,
) -> Result<Response<Body>, BoxError> {
    let start = Instant::now();
    let target = match req.uri().authority().map(|a| parse_target(a.as_str())) {
        Some(Ok(t)) => t,
        Some(Err(e)) => {
            deny(&shared, &tp, None, "tcp", &e.to_string());
            return Err(refused());
        }
        None => {
            deny(&shared, &tp, None, "tcp", "CONNECT without an authority");
            return Err(refused());
        }
    };
    let state = shared.state();
    let workload = match check_target(&shared, &state, &tp, target) {
        Ok(w) => w,
        Err(reason) => {
            deny(&shared, &tp, None, "tcp", &reason);
            return Err(refused());
        }
    };
    // An HTTP/1.1 upgrade (WebSocket) rides a CONNECT stream; the client
    // side names its request so that HTTP conditions of policies apply.
    let upgrade = match req.headers().get(UPGRADE_REQUEST).map(parse_upgrade) {
        None => None,
        Some(Ok(u)) => Some(u),
        Some(Err(e)) => {
            deny(&shared, &tp, Some(&workload), "http", &e);
            return Err(refused());
        }
    };
    let (facts, protocol) = match &upgrade {
        Some((method, path)) => (Some(HttpFacts { method, path }), "http"),
        None => (None, "tcp"),
    };
    if let Verdict::Deny(reason) = authorize(&state, &tp.identity, &workload, facts) {
        deny(&shared, &tp, Some(&workload), protocol, &reason);
        return Err(refused());
    }
    let upstream = match tokio::time::timeout(
        shared.settings.connect_timeout(),
        crate::connect::connect(
            target,
            shared.settings.socket_mark,
            shared.settings.connect_timeout(),
        ),
    )
    .await
    {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            return Ok(proxy_response(
                StatusCode::BAD_GATEWAY,
                &format!("connecting to {target}: {e}"),
            ));
        }
        Err(_) => {
            return Ok(proxy_response(
                StatusCode::GATEWAY_TIMEOUT,
                &format!("connecting to {target}: timed out"),
            ));
        }
    };
    let _ = upstream.set_nodelay(true);
    let shared2 = shared.clone();
    shared.spawn(async move {
        let upgraded = match hyper::upgrade::on(req).await {
            Ok(u) => u,
            Err(e) => {
                tracing::debug!("CONNECT stream from {} not upgraded: {e}", tp.identity);
                return;
            }
        };
        let mut upgraded = TokioIo::new(upgraded);
        // The policy was checked against the request the stream names: the
        // stream must open with that request, or it goes no further.
        let prefix = match &upgrade {
            None => bytes::Bytes::new(),
            Some((method, path)) => {
                let limit = shared2.settings.max_header_bytes as usize;
                let read = read_request_line(&mut upgraded, limit);
                match tokio::time::timeout(shared2.settings.header_read_timeout(), read).await {
                    Ok(Ok(head)) if request_line_is(&head, method, path) => head,
                    Ok(Ok(head)) => {
                        let line = head.split(|b| *b == b'\n').next().unwrap_or_default();
                        deny(
                            &shared2,
                            &tp,
                            Some(&workload),
                            "http",
                            &format!(
                                "upgrade stream named `{method} {path}` but opened with {:?}",
                                String::from_utf8_lossy(line).trim_end()
                            ),
                        );
                        return;
                    }
                    Ok(Err(e)) => {
                        tracing::debug!(peer = %tp.addr, "upgrade stream ended before its request: {e}");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!(peer = %tp.addr, "upgrade stream sent no request line in time");
                        return;
                    }
                }
            }
        };
        let row = Arc::new(shared2.table.open(
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
        ));
        let labels = TcpLabels {
            direction: Direction::Inbound,
            source: tp.identity.to_string(),
            destination: workload.identity.to_string(),
            secured: true,
        };
        shared2.metrics.tcp_connections.get_or_create(&labels).inc();
        let sent = shared2
            .metrics
            .tcp_bytes_sent
            .get_or_create(&labels)
            .clone();
        let received = shared2
            .metrics
            .tcp_bytes_received
            .get_or_create(&labels)
            .clone();
        let (r1, r2) = (row.clone(), row.clone());
        let result = relay(
            Rewind::new(prefix, upgraded),
            upstream,
            shared2.settings.tcp_idle_timeout(),
            move |n| {
                r1.add_sent(n);
                sent.inc_by(n);
            },
            move |n| {
                r2.add_received(n);
                received.inc_by(n);
            },
        )
        .await;
        let reason = result.err().map(|e| e.to_string());
        AccessRecord {
            direction: "inbound",
            protocol: if upgrade.is_some() {
                "http-upgrade"
            } else {
                "tcp"
            },
            method: upgrade.as_ref().map(|(m, _)| m.as_str()),
            path: upgrade.as_ref().map(|(_, p)| p.as_str()),
            source_addr: Some(tp.addr.to_string()),
            source_identity: Some(&tp.identity),
            destination: Some(workload.id.to_string()),
            destination_addr: Some(target.to_string()),
            destination_identity: Some(&workload.identity),
            secured: true,
            bytes_sent: Some(row.sent()),
            bytes_received: Some(row.received()),
            duration_ms: start.elapsed().as_secs_f64() * 1e3,
            reason: reason.as_deref(),
            ..Default::default()
        }
        .emit();
    });
    Ok(Response::new(empty()))
}

/// Reads from `io` up to and including the first line feed (at most `limit`
/// bytes; a longer first line is an error). What was read is returned, to be
/// sent on before the rest.
async fn read_request_line<I: tokio::io::AsyncRead + Unpin>(
    io: &mut I,
    limit: usize,
) -> std::io::Result<bytes::Bytes> {
    use tokio::io::AsyncReadExt;
    let mut buf = bytes::BytesMut::with_capacity(1024);
    loop {
        if buf.contains(&b'\n') {
            return Ok(buf.freeze());
        }
        if buf.len() >= limit {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("no request line within {limit} bytes"),
            ));
        }
        if io.read_buf(&mut buf).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
    }
}

/// Whether `head` opens with the request line `METHOD path[?query] HTTP/1.x`.
fn request_line_is(head: &[u8], method: &Method, path: &str) -> bool {
    let line = head.split(|b| *b == b'\n').next().unwrap_or_default();
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let mut parts = line.split(|b| *b == b' ');
    let (Some(m), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return false;
    };
    let target_path = target.split(|b| *b == b'?').next().unwrap_or_default();
    m == method.as_str().as_bytes()
        && target_path == path.as_bytes()
        && version.starts_with(b"HTTP/1.")
}

/// `METHOD path` of an upgrade request carried on a CONNECT stream.
fn parse_upgrade(v: &http::HeaderValue) -> Result<(Method, String), String> {
    let bad = || {
        format!(
            "{UPGRADE_REQUEST_HEADER} header {:?} is not `METHOD /path`",
            String::from_utf8_lossy(v.as_bytes())
        )
    };
    let s = v.to_str().map_err(|_| bad())?;
    let (m, p) = s.split_once(' ').ok_or_else(bad)?;
    if !p.starts_with('/') {
        return Err(bad());
    }
    let method = Method::from_bytes(m.as_bytes()).map_err(|_| bad())?;
    Ok((method, p.to_owned()))
}

async fn handle_http(
    shared: Arc<Shared>,
    tp: Arc<TunnelPeer>,
    req: Request<Incoming>,
) -> Response<Body> {
    let start = Instant::now();
    let (mut parts, body) = req.into_parts();
    let log = crate::accesslog::enabled();
    let method = parts.method.clone();
    let path = log.then(|| parts.uri.path().to_owned());
    let mut workload = None;
    let result: Result<Response<Body>, (StatusCode, String)> = async {
        let raw = parts
            .headers
            .get(TARGET)
            .and_then(|v| v.to_str().ok())
            .ok_or((
                StatusCode::BAD_REQUEST,
                format!("request without a {TARGET_HEADER} header"),
            ))?;
        let target = parse_target(raw).map_err(|e| (StatusCode::BAD_REQUEST, e.to_string()))?;
        let state = shared.state();
        let w =
            check_target(&shared, &state, &tp, target).map_err(|r| (StatusCode::FORBIDDEN, r))?;
        workload = Some(w.clone());
        let facts = HttpFacts {
            method: &parts.method,
            path: parts.uri.path(),
        };
        if let Verdict::Deny(reason) = authorize(&state, &tp.identity, &w, Some(facts)) {
            return Err((StatusCode::FORBIDDEN, reason));
        }
        drop(state);
        let proto = match parts.headers.remove(PROTOCOL) {
            Some(v) if v.as_bytes() == b"h2" => Protocol::Http2,
            _ => Protocol::Http1,
        };
        parts.headers.remove(TARGET);
        parts
            .headers
            .insert(SOURCE_IDENTITY, tp.identity_header.clone());
        let resp = shared
            .clients
            .send(target, proto, Request::from_parts(parts, boxed(body)))
            .await
            .map_err(|e| (StatusCode::BAD_GATEWAY, format!("sending to {target}: {e}")))?;
        let (mut rp, rb) = resp.into_parts();
        strip_hop_by_hop(&mut rp.headers);
        Ok(Response::from_parts(rp, boxed(rb)))
    }
    .await;
    let (resp, reason) = match result {
        Ok(r) => (r, None),
        Err((status, reason)) => {
            if status == StatusCode::FORBIDDEN {
                deny(&shared, &tp, workload.as_deref(), "http", &reason);
            }
            (proxy_response(status, &reason), Some(reason))
        }
    };
    let status = resp.status().as_u16();
    let dst = match &workload {
        Some(w) if tp.local_identity.as_ref() == Some(&w.identity) => tp.local_label.clone(),
        Some(w) => Label::from(w.identity.as_ref()),
        None => Label::default(),
    };
    let m = tp.metrics.get(
        &shared.metrics,
        Direction::Inbound,
        &tp.label,
        &dst,
        &Label::default(),
        status_class(status),
    );
    m.requests.inc();
    m.duration.observe(start.elapsed().as_secs_f64());
    if !log {
        return resp;
    }
    AccessRecord {
        direction: "inbound",
        protocol: "http",
        source_addr: Some(tp.addr.to_string()),
        source_identity: Some(&tp.identity),
        destination: workload.as_ref().map(|w| w.id.to_string()),
        destination_identity: workload.as_ref().map(|w| &w.identity),
        secured: true,
        method: Some(method.as_str()),
        path: path.as_deref(),
        status: Some(status),
        duration_ms: start.elapsed().as_secs_f64() * 1e3,
        reason: reason.as_deref(),
        ..Default::default()
    }
    .emit();
    resp
}

#[cfg(test)]
mod upgrade_tests {
    use super::*;

    #[test]
    fn a_request_line_matches_its_name_only() {
        let get = Method::GET;
        assert!(request_line_is(
            b"GET /chat HTTP/1.1\r\nhost: x\r\n",
            &get,
            "/chat"
        ));
        assert!(request_line_is(
            b"GET /chat?room=1 HTTP/1.1\r\n",
            &get,
            "/chat"
        ));
        assert!(!request_line_is(b"GET /chat2 HTTP/1.1\r\n", &get, "/chat"));
        assert!(!request_line_is(b"POST /chat HTTP/1.1\r\n", &get, "/chat"));
        assert!(!request_line_is(b"GET /chat HTTP/2.0\r\n", &get, "/chat"));
        assert!(!request_line_is(
            b"GET /chat HTTP/1.1 extra\r\n",
            &get,
            "/chat"
        ));
        assert!(!request_line_is(b"GET  /chat HTTP/1.1\r\n", &get, "/chat"));
        assert!(!request_line_is(b"", &get, "/chat"));
    }

    #[test]
    fn the_upgrade_name_is_method_and_absolute_path() {
        let v = |s: &'static str| HeaderValue::from_static(s);
        assert_eq!(
            parse_upgrade(&v("GET /ws")).unwrap(),
            (Method::GET, "/ws".to_string())
        );
        for bad in ["GET", "GET ws", "G\u{7f}T /ws", " /ws"] {
            let Ok(h) = HeaderValue::from_str(bad) else {
                continue;
            };
            let e = parse_upgrade(&h).unwrap_err();
            assert!(e.contains(UPGRADE_REQUEST_HEADER), "{e}");
        }
    }

    #[tokio::test]
    async fn the_request_line_is_read_whole_and_bounded() {
        let mut io: &[u8] = b"GET / HTTP/1.1\r\nrest";
        let head = read_request_line(&mut io, 1024).await.unwrap();
        assert!(head.starts_with(b"GET / HTTP/1.1\r\n"));
        let mut long: &[u8] = &[b'a'; 5000];
        assert!(read_request_line(&mut long, 1024).await.is_err());
        let mut short: &[u8] = b"GET /";
        assert!(read_request_line(&mut short, 1024).await.is_err());
    }
}
