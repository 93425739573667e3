//! The outbound capture listener (port 15001): connections of enrolled
//! workloads, redirected by the kernel, are classified and sent on through the
//! tunnel to the destination's node, or directly when the destination is not
//! meshed.

use std::{
    collections::HashMap,
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, Mutex, atomic::AtomicU64},
};

use bytes::Bytes;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::{
    net::{TcpListener, TcpStream},
    time::Instant,
};

use crate::{
    accesslog::AccessRecord,
    conntable::{ConnKind, ConnMeta},
    forward::{self, HttpConn},
    io::{Rewind, count_relay, relay},
    metrics::{Direction, TcpLabels},
    proxy::Shared,
    sniff::{Protocol, sniff},
    state::{Destination, State, Upstream},
    throttle::warn_throttled,
    tunnel::TunnelKey,
};

/// Where a redirected connection was going. The agent implements it with the
/// kernel's `sock_ops` map (`ebpf_lb::LoadBalancer::original_destination`).
pub trait OriginalDst: Send + Sync + 'static {
    /// `peer` is the client's address, `local` the capture listener address
    /// the connection arrived on.
    fn lookup(&self, peer: SocketAddr, local: SocketAddr) -> Option<SocketAddr>;
}

/// An in-memory [`OriginalDst`], keyed by the client's address: for tests and
/// for running the proxy without the kernel part.
#[derive(Debug, Default)]
pub struct MapOriginalDst {
    map: Mutex<HashMap<SocketAddr, SocketAddr>>,
}

impl MapOriginalDst {
    pub fn insert(&self, peer: SocketAddr, original: SocketAddr) {
        self.map
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(peer, original);
    }
    pub fn remove(&self, peer: &SocketAddr) {
        self.map
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(peer);
    }
}

impl OriginalDst for MapOriginalDst {
    fn lookup(&self, peer: SocketAddr, _local: SocketAddr) -> Option<SocketAddr> {
        self.map
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&peer)
            .copied()
    }
}

/// How long a captured connection from an address the configuration does
/// not know as a local workload waits for one that does (a pod's first
/// connections, an agent restarting) before it is reset.
const SOURCE_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

pub(crate) async fn run(shared: Arc<Shared>, listener: TcpListener) {
    loop {
        let accepted = tokio::select! {
            _ = shared.shutdown.cancelled() => return,
            a = listener.accept() => a,
        };
        let (tcp, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of descriptors, say: keep serving the others.
                tracing::warn!("outbound accept failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let shared2 = shared.clone();
        shared.spawn(async move {
            serve(shared2, tcp, peer).await;
        });
    }
}

async fn serve(shared: Arc<Shared>, mut tcp: TcpStream, peer: SocketAddr) {
    let _ = tcp.set_nodelay(true);
    let Ok(local) = tcp.local_addr() else {
        return;
    };
    let Some(dst) = shared.original_dst.lookup(peer, local) else {
        warn_throttled!(%peer, "captured connection without an original destination; resetting it");
        // A reset, not a FIN: the caller must not take the end of a
        // connection that went nowhere for a server's clean close.
        let _ = tcp.set_zero_linger();
        return;
    };
    let Some((state, source)) = shared.state_knowing(peer.ip(), SOURCE_WAIT).await else {
        warn_throttled!(%peer, %dst, "captured connection from {} which is not an enrolled workload of this node (none for {SOURCE_WAIT:?}); resetting it", peer.ip());
        let _ = tcp.set_zero_linger();
        return;
    };
    // A pod reaching its own address (a StatefulSet member by its own
    // headless name) stays a pod talking to itself: straight there, not
    // through the tunnel and its own policies as a caller of itself.
    let dest = if dst.ip() == source.ip {
        Destination::External
    } else {
        state.destination(dst)
    };
    // A port declared HTTP is HTTP whenever the first bytes come: a caller
    // that waits past the sniff timeout must not get an opaque stream, whose
    // bytes (headers posing as the mesh's own) no proxy would look at.
    let (hint, http_only) = match &dest {
        Destination::External => (Some(Protocol::Tcp), false),
        Destination::Service(d) => match d.port.app_protocol.as_deref() {
            Some(p) if p.eq_ignore_ascii_case("tcp") => (Some(Protocol::Tcp), false),
            _ => (None, d.http_only),
        },
        // A pod port a Service declares `tcp` is opaque, as the Service's
        // own port is (its node proxy refuses HTTP to it).
        Destination::Workload(w) if state.declared_tcp(&w.id, dst.port()) => {
            (Some(Protocol::Tcp), false)
        }
        Destination::Workload(w) => (None, state.declared_http(&w.id, dst.port())),
    };
    // Not held for the connection's life (a sniff can wait an idle timeout,
    // a relay hours): each request takes the configuration of its time,
    // and a long-lived connection must not keep an old one in memory.
    drop(state);
    let (protocol, prefix) = match hint {
        Some(p) => (p, Bytes::new()),
        None if http_only => {
            let wait = shared.settings.keepalive_idle_timeout();
            // A client that has sent nothing when shutdown begins is let
            // go at once (it holds no request), not at the drain timeout.
            let (drain, _reg) = shared.drain.watch();
            let first = tokio::select! {
                r = crate::sniff::sniff_http(&mut tcp, wait) => r,
                _ = drain => return,
            };
            match first {
                // Nothing for the whole idle timeout, or closed at once.
                Ok((_, b)) if b.is_empty() => return,
                Ok((p, b)) => (p, b.freeze()),
                // The client reset: nothing to pass on.
                Err(e) => return sniff_failed(peer, dst, &e),
            }
        }
        None => match sniff(&mut tcp, shared.settings.sniff_timeout()).await {
            Ok((p, b)) => (p, b.freeze()),
            // The client reset before its protocol was known: nothing to
            // pass on, not even as a clean end (a connection opened for
            // its first bytes would get them and a FIN).
            Err(e) => return sniff_failed(peer, dst, &e),
        },
    };
    // An HTTP/1.1 connection's reads start its head timeout (head_timer).
    let reads = (protocol == Protocol::Http1).then(Arc::<AtomicU64>::default);
    let io = match &reads {
        Some(r) => Rewind::new(prefix, tcp).count_reads(r.clone()),
        None => Rewind::new(prefix, tcp),
    };
    match protocol {
        Protocol::Http1 | Protocol::Http2 => {
            let row = Arc::new(shared.table.open(
                ConnKind::OutboundHttp,
                ConnMeta {
                    source_addr: Some(peer),
                    source_workload: Some(source.id.clone()),
                    source_identity: Some(source.identity.clone()),
                    destination_addr: Some(dst),
                    destination: match &dest {
                        Destination::Service(d) => Some(d.service.id.clone()),
                        Destination::Workload(w) => Some(w.id.clone()),
                        Destination::External => None,
                    },
                    destination_identity: tunnelled_identity(&dest),
                    ..Default::default()
                },
            ));
            let conn = Arc::new(HttpConn {
                source_label: crate::metrics::Label::from(source.identity.as_ref()),
                source,
                client_addr: peer,
                original_dst: dst,
                protocol,
                metrics: Default::default(),
                row: Some(row.reference()),
            });
            // The row counts the caller's bytes, HTTP framing and any
            // upgraded (WebSocket) exchange included.
            let io: CallerIo = crate::io::Counted::from_caller(io, row.clone());
            serve_http(shared, io, conn, reads).await;
            // The row goes with the connection (held by an HTTP/1.1
            // WebSocket's splice until it ends).
            drop(row);
        }
        Protocol::Tcp => serve_tcp(shared, io, source, peer, dst, dest).await,
    }
}

/// A caller whose connection failed before its protocol was known (a
/// reset): nothing went anywhere.
fn sniff_failed(peer: SocketAddr, dst: SocketAddr, e: &std::io::Error) {
    tracing::debug!(%peer, to = %dst, "captured connection ended before its first bytes: {e}");
}

/// A captured HTTP connection as served (what `abort` finds again in an
/// upgraded one).
pub(crate) type CallerIo = crate::io::Counted<Rewind<TcpStream>>;

/// A captured HTTP/1.1 connection as hyper's server serves it, from the
/// request [`crate::h1server`] left to it (what `abort` finds again in an
/// upgraded one).
pub(crate) type HyperH1Io = Rewind<CallerIo>;

/// The identity the requests of a captured HTTP connection are expected to
/// reach through the tunnel, shown until its first request says (a route may
/// send them elsewhere): all ready endpoints of the service share it and all
/// sit behind a node proxy.
fn tunnelled_identity(dest: &Destination) -> Option<crate::config::SpiffeId> {
    let Destination::Service(d) = dest else {
        return match dest {
            Destination::Workload(w) => w.identity.clone().filter(|_| w.node_proxy.is_some()),
            _ => None,
        };
    };
    let mut ready = d.service.endpoints.iter().filter(|e| e.ready);
    let first = ready.next()?;
    let id = first
        .identity
        .clone()
        .filter(|_| first.node_proxy.is_some())?;
    ready
        .all(|e| e.node_proxy.is_some() && e.identity.as_ref() == Some(&id))
        .then_some(id)
}

/// `reads`: the connection's reads that returned bytes (counted for
/// HTTP/1.1).
async fn serve_http(
    shared: Arc<Shared>,
    io: CallerIo,
    conn: Arc<HttpConn>,
    reads: Option<Arc<AtomicU64>>,
) {
    let s = shared.settings.clone();
    let result = match conn.protocol {
        Protocol::Http2 => {
            // Streams in flight, for the keep-alive idle timeout.
            let streams = crate::h2idle::StreamActivity::new();
            let svc = {
                let (shared, conn, streams) = (shared.clone(), conn.clone(), streams.clone());
                // Boxed: hyper spawns a task per stream, and spawning moves
                // the future several times; a pointer is cheaper to move.
                service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
                    let active = streams.begin();
                    // A WebSocket (extended CONNECT) goes on after its
                    // response, in upgrade::exchange's splice.
                    if req.method() == hyper::Method::CONNECT {
                        req.extensions_mut().insert(active.clone());
                    }
                    let exchange =
                        forward::handle(shared.clone(), conn.clone(), req.map(crate::body::boxed));
                    Box::pin(async move {
                        let resp = exchange.await?;
                        Ok::<_, Infallible>(resp.map(|body| crate::h2idle::Held::new(body, active)))
                    })
                })
            };
            let c = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .max_header_list_size(s.max_header_bytes)
                // WebSocket over HTTP/2 (RFC 8441): extended CONNECT.
                .enable_connect_protocol()
                // As in the tunnel: an upload whose destination stopped
                // reading (a WebSocket, a gRPC stream) holds its stream's
                // window, not the whole connection's.
                .initial_stream_window_size(crate::tunnel::STREAM_WINDOW)
                .max_concurrent_streams(crate::tunnel::CAPTURED_MAX_STREAMS)
                .initial_connection_window_size(crate::tunnel::connection_window(
                    crate::tunnel::CAPTURED_MAX_STREAMS,
                ))
                // A peer that stops answering pings is gone: its streams end.
                .keep_alive_interval(Some(std::time::Duration::from_secs(30)))
                .keep_alive_timeout(std::time::Duration::from_secs(10))
                .serve_connection(TokioIo::new(io), svc);
            // No stream for the idle timeout: GOAWAY, as on shutdown.
            let idle = streams.idle_for(s.keepalive_idle_timeout());
            drain_on(&shared, c, idle, |c| c.graceful_shutdown()).await
        }
        _ => {
            // Requests are served here until one asks for what only
            // hyper's server does (an upgrade, `Expect`, HTTP/1.0).
            let (signal, _reg) = shared.drain.watch();
            let mut io = io;
            let handler = |req| {
                let exchange = forward::handle(shared.clone(), conn.clone(), req);
                async move {
                    match exchange.await {
                        Ok(resp) => resp,
                        Err(never) => match never {},
                    }
                }
            };
            let limits = crate::h1server::Limits {
                head_timeout: s.header_read_timeout(),
                idle_timeout: s.keepalive_idle_timeout(),
                max_head: (s.max_header_bytes as usize).max(8192),
            };
            let rest = match crate::h1server::serve(&mut io, limits, signal, handler).await {
                crate::h1server::Ended::Closed => return,
                crate::h1server::Ended::Refused(status, why) => {
                    return forward::refused_head(&shared, &conn, status, why);
                }
                crate::h1server::Ended::Hyper(rest) => rest,
            };
            let io: HyperH1Io = Rewind::new(rest, io);
            let svc = {
                let (shared, conn) = (shared.clone(), conn.clone());
                // Not boxed: hyper keeps one slot per connection for the
                // request in flight, where a box would cost an allocation
                // per request.
                service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    // hyper takes `gzip, chunked` as chunked; the body would
                    // cross decoded of its chunks only, with nothing left to
                    // say it is gzip (the proxy's own server refuses it too).
                    let refused = req.headers().contains_key(http::header::TRANSFER_ENCODING)
                        && !crate::h1client::only_chunked(req.headers());
                    let exchange =
                        forward::handle(shared.clone(), conn.clone(), req.map(crate::body::boxed));
                    async move {
                        if refused {
                            return Ok(crate::body::proxy_response(
                                http::StatusCode::BAD_REQUEST,
                                "a transfer coding other than chunked (not supported by the mesh)",
                            ));
                        }
                        exchange.await
                    }
                })
            };
            let c = hyper::server::conn::http1::Builder::new()
                // The head timeout from a head's first bytes; before them,
                // the keep-alive idle timeout.
                .timer(crate::head_timer::HeadTimer::new(
                    reads.expect("an HTTP/1.1 connection counts its reads"),
                    s.header_read_timeout(),
                    s.keepalive_idle_timeout(),
                ))
                .header_read_timeout(s.header_read_timeout())
                .max_buf_size((s.max_header_bytes as usize).max(8192))
                .serve_connection(TokioIo::new(io), svc)
                // WebSocket and other HTTP/1.1 upgrades (forward::send_upgrade).
                .with_upgrades();
            // (The idle timeout is the head timer's.)
            let result = drain_on(&shared, c, std::future::pending(), |c| {
                c.graceful_shutdown()
            })
            .await;
            // A later head hyper could not parse, answered by hyper itself.
            if let Some((status, why)) = result.as_ref().err().and_then(hyper_refusal) {
                forward::refused_head(&shared, &conn, status, why);
            }
            result
        }
    };
    if let Err(e) = result {
        tracing::debug!(client = %conn.client_addr, "outbound HTTP connection ended: {e}");
    }
}

/// The answer hyper's HTTP/1.1 server wrote itself for a head it could not
/// parse (it answers those that fail as a method, target, version or header
/// field, or by their size, and closes), and why.
fn hyper_refusal(e: &hyper::Error) -> Option<crate::h1server::Refusal> {
    if !e.is_parse() || e.is_parse_version_h2() || e.is_parse_status() {
        return None;
    }
    // hyper names the kinds only in its message.
    let what = e.to_string();
    Some(if what.contains("URI too long") {
        (
            http::StatusCode::URI_TOO_LONG,
            "the request target is too long",
        )
    } else if e.is_parse_too_large() {
        crate::h1server::TOO_LARGE
    } else if what.starts_with("internal error") {
        return None;
    } else {
        crate::h1server::MALFORMED
    })
}

/// Runs a hyper connection; on shutdown, or once `also` resolves, asks it
/// to finish its requests in flight and close.
async fn drain_on<C, T, E>(
    shared: &Shared,
    conn: C,
    also: impl std::future::Future<Output = ()>,
    graceful: impl FnOnce(std::pin::Pin<&mut C>),
) -> Result<T, E>
where
    C: std::future::Future<Output = Result<T, E>>,
{
    let (signal, _reg) = shared.drain.watch();
    let mut conn = std::pin::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => return r,
        _ = signal => {}
        _ = also => {}
    }
    graceful(conn.as_mut());
    conn.await
}

async fn serve_tcp(
    shared: Arc<Shared>,
    mut io: Rewind<tokio::net::TcpStream>,
    source: Arc<crate::config::LocalWorkload>,
    peer: SocketAddr,
    dst: SocketAddr,
    dest: Destination,
) {
    let start = Instant::now();
    let (upstream, destination, pick) = match &dest {
        Destination::Service(d) => {
            let (service, ready) = (&d.service, &d.ready);
            let ups = &ready.upstreams;
            let Some(pick) = shared.balancer.pick_for(ready, peer.ip()) else {
                warn_throttled!(%peer, service = %service.id, "no ready endpoint for a TCP connection; resetting it");
                // As a connection refused, not one answered and closed.
                let _ = io.inner().set_zero_linger();
                log_tcp(
                    &source,
                    peer,
                    dst,
                    Some(service.id.to_string()),
                    None,
                    false,
                    start,
                    0,
                    0,
                    Some("no ready endpoint"),
                );
                return;
            };
            (
                ups[pick.index].clone(),
                Some(service.id.clone()),
                Some(pick),
            )
        }
        Destination::Workload(w) => (
            Arc::new(State::workload_upstream(w, dst.port())),
            Some(w.id.clone()),
            None,
        ),
        Destination::External => (
            Arc::new(Upstream {
                addr: dst,
                target: crate::state::target_value(dst),
                label: crate::metrics::Label::external(),
                tunnel: None,
                workload: None,
            }),
            None,
            None,
        ),
    };
    let row = Arc::new(shared.table.open(
        ConnKind::OutboundTcp,
        ConnMeta {
            source_addr: Some(peer),
            source_workload: Some(source.id.clone()),
            source_identity: Some(source.identity.clone()),
            destination_addr: Some(upstream.addr),
            destination: upstream.workload.clone().or(destination.clone()),
            destination_identity: upstream.tunnel.as_ref().map(|t| t.identity.clone()),
            tls: None,
        },
    ));
    let labels = TcpLabels {
        direction: Direction::Outbound,
        source: source.identity.to_string(),
        destination: match (&upstream.tunnel, &dest) {
            (Some(t), _) => t.identity.to_string(),
            (None, Destination::External) => crate::metrics::EXTERNAL.into(),
            // A workload's name, or an endpoint's address (State's label).
            (None, _) => upstream.label.to_string(),
        },
        secured: upstream.tunnel.is_some(),
    };
    // Counted once open: a connection whose connect failed is in the access
    // log with its reason, not in `sluice_tcp_connections_total`.
    let counted = || count_relay(&shared.metrics, &labels, Some(row.clone()));
    let idle = shared.settings.tcp_idle_timeout();
    // Cut by the proxy's shutdown from here on: a reset (disarmed below).
    crate::abort::arm_reset(io.inner());
    let dest_name = destination.as_ref().map(|d| d.to_string());
    let on_end = crate::accesslog::OnEnd::new({
        let (source, upstream, dest_name, row) = (
            source.clone(),
            upstream.clone(),
            dest_name.clone(),
            row.clone(),
        );
        move |reason: Option<&str>| {
            log_tcp(
                &source,
                peer,
                upstream.addr,
                dest_name,
                upstream.tunnel.as_ref().map(|t| &t.identity),
                upstream.tunnel.is_some(),
                start,
                row.sent(),
                row.received(),
                reason,
            )
        }
    });
    let result = match &upstream.tunnel {
        Some(t) => {
            let key = TunnelKey::to(&source.identity, t);
            match shared.pool.connect(&key, upstream.addr).await {
                Ok((mut stream, tls)) => {
                    if let Some(p) = &pick {
                        p.connected();
                    }
                    row.update(|m| m.tls = Some(crate::conntable::TlsInfo::clone(&tls)));
                    let (on_sent, on_received) = counted();
                    let r = relay(&mut io, &mut stream, idle, on_sent, on_received)
                        .await
                        .map(|_| ());
                    // The caller's reset reaches the workload as one, after
                    // what it sent before (a drop would cancel the stream and
                    // discard what is still queued).
                    match &r {
                        Err(e) if crate::abort::broke_off(e) => {
                            stream.abort(crate::abort::DRAIN_LIMIT).await;
                        }
                        // Idle: a plain end for the caller at once, and for
                        // the workload too.
                        Err(_) => {
                            use tokio::io::AsyncWriteExt as _;
                            let _ = io.shutdown().await;
                            stream.finish(crate::abort::DRAIN_LIMIT).await;
                        }
                        Ok(()) => {}
                    }
                    r
                }
                Err(e) => {
                    // A node proxy out of reach: the next connections go to
                    // other endpoints for a while.
                    if let (true, Some(p)) = (e.is_unreachable(), &pick) {
                        p.unreachable();
                    }
                    Err(std::io::Error::other(e.to_string()))
                }
            }
        }
        None => match tokio::time::timeout(
            shared.settings.connect_timeout(),
            crate::connect::connect(
                upstream.addr,
                shared.settings.socket_mark,
                shared.settings.connect_timeout(),
            ),
        )
        .await
        {
            Ok(Ok(mut up)) => {
                if let Some(p) = &pick {
                    p.connected();
                }
                let _ = up.set_nodelay(true);
                crate::abort::arm_reset(&up);
                let (on_sent, on_received) = counted();
                let r = relay(&mut io, &mut up, idle, on_sent, on_received)
                    .await
                    .map(|_| ());
                if r.as_ref().is_err_and(crate::abort::broke_off) {
                    // The caller's reset reaches the destination as one.
                    crate::abort::reset_once_sent(&up, crate::abort::DRAIN_LIMIT).await;
                } else {
                    crate::abort::disarm_reset(&up);
                }
                r
            }
            Ok(Err(e)) => {
                if let (true, Some(p)) = (crate::connect::peer_unreachable(&e), &pick) {
                    p.unreachable();
                }
                Err(e)
            }
            Err(_) => {
                if let Some(p) = &pick {
                    p.unreachable();
                }
                // Not `TimedOut`: that is the relay going idle, a plain
                // close; a connection that never opened is reset.
                Err(std::io::Error::other("connect timed out"))
            }
        },
    };
    // A relay that broke off (the workload reset, its node proxy cancelled
    // the stream) ends the caller's connection with a reset too, once the
    // caller has what came before it: a FIN would pass a cut answer for a
    // whole one.
    if result.as_ref().is_err_and(crate::abort::broke_off) {
        crate::abort::reset_once_sent(io.inner(), crate::abort::DRAIN_LIMIT).await;
    } else {
        crate::abort::disarm_reset(io.inner());
    }
    let reason = result.as_ref().err().map(|e| e.to_string());
    if let Some(r) = &reason {
        tracing::debug!(%peer, to = %upstream.addr, "outbound TCP connection ended: {r}");
    }
    on_end.log(reason.as_deref());
}

#[allow(clippy::too_many_arguments)]
fn log_tcp(
    source: &crate::config::LocalWorkload,
    peer: SocketAddr,
    to: SocketAddr,
    destination: Option<String>,
    destination_identity: Option<&crate::config::SpiffeId>,
    secured: bool,
    start: Instant,
    sent: u64,
    received: u64,
    reason: Option<&str>,
) {
    AccessRecord {
        direction: "outbound",
        protocol: "tcp",
        source_addr: Some(peer.to_string()),
        source_identity: Some(&source.identity),
        destination,
        destination_addr: Some(to.to_string()),
        destination_identity,
        secured,
        bytes_sent: Some(sent),
        bytes_received: Some(received),
        duration_ms: start.elapsed().as_secs_f64() * 1e3,
        reason,
        ..Default::default()
    }
    .emit();
}
