//! Plaintext HTTP towards workloads: local workloads on the inbound side, and
//! endpoints outside the mesh on the outbound side.
//!
//! A small pool of connections: HTTP/1.1 connections ([`crate::h1client`],
//! driven by the request itself) carry one request at a time and go back to
//! the pool when the exchange has ended cleanly; HTTP/2 (prior knowledge,
//! hyper) has one shared connection per workload.
//! Idle connections are closed after the settings' workload idle timeout, an
//! HTTP/1.1 one sooner when its workload said it closes idle connections
//! sooner (`keep-alive: timeout=N`, [`crate::h1client::Conn::fresh`]).

use std::{
    net::SocketAddr,
    pin::Pin,
    sync::{Arc, Mutex, Weak, atomic::AtomicUsize},
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http::{HeaderValue, Request, Response, Uri, Version, uri::PathAndQuery};
use hyper::{body::Incoming, client::conn::http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::time::Instant;

use crate::{
    FastMap,
    body::{Body, BoxError},
    config::ProxySettings,
    h1client::{self, Conn},
    sniff::Protocol,
};

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("connecting to {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("HTTP handshake with {addr}: {source}")]
    Handshake {
        addr: SocketAddr,
        source: hyper::Error,
    },
    #[error("{source}")]
    Http { source: hyper::Error },
    #[error("{source}")]
    Http1 { source: h1client::Error },
    /// The dial this request waited for (another request's, to the same
    /// address) failed just now: not dialled again at once.
    #[error("{reason} (a dial to {addr} just failed)")]
    DialFailed {
        addr: SocketAddr,
        reason: String,
        unreachable: bool,
    },
}

impl UpstreamError {
    /// Nothing reached the workload: a retry is safe.
    pub fn is_connect(&self) -> bool {
        matches!(
            self,
            UpstreamError::Connect { .. }
                | UpstreamError::Handshake { .. }
                | UpstreamError::DialFailed { .. }
        )
    }

    /// The workload could not be reached (refused, no answer), as opposed
    /// to this proxy failing to open a socket.
    pub fn is_unreachable(&self) -> bool {
        match self {
            UpstreamError::Connect { source, .. } => crate::connect::peer_unreachable(source),
            UpstreamError::Handshake { .. } => true,
            UpstreamError::DialFailed { unreachable, .. } => *unreachable,
            _ => false,
        }
    }
}

/// The pools; cheap to clone.
#[derive(Clone)]
pub struct WorkloadClients {
    inner: Arc<Pools>,
}

struct Pools {
    mark: Option<u32>,
    connect_timeout: Duration,
    max_header_bytes: u32,
    /// A pooled connection unused for this long is closed.
    idle: Duration,
    h1: Mutex<FastMap<SocketAddr, Vec<IdleConn>>>,
    /// The HTTP/2 connections to each workload address: one, and another
    /// whenever all carry [`MAX_STREAMS_PER_WORKLOAD_CONN`] streams.
    h2: Mutex<FastMap<SocketAddr, Vec<PooledH2>>>,
    h2_dials: std::sync::atomic::AtomicU64,
    /// One HTTP/2 dial at a time per workload address: a burst of first
    /// requests shares one connection instead of opening one each; and the
    /// last dial's failure, when it came.
    h2_dialing: crate::dial::DialLocks<SocketAddr>,
    /// Whether the task closing idle connections runs.
    reaper: Mutex<bool>,
    /// How often an HTTP/2 connection to a workload is pinged, and how long
    /// an answer may take before it is closed.
    ping: (Duration, Duration),
}

/// An HTTP/2 connection to a workload: when a request last took it, its
/// number (dials count up) and the streams open on it.
struct PooledH2 {
    sender: http2::SendRequest<Body>,
    last_used: Instant,
    id: u64,
    streams: Arc<AtomicUsize>,
}

/// Most streams this proxy opens on one HTTP/2 connection to a workload
/// before it dials another. hyper cannot say how many the workload allows
/// (`SETTINGS_MAX_CONCURRENT_STREAMS`), and a stream over that limit waits
/// in hyper's queue, with every request after it, until one ends: with
/// long gRPC streams, for ever. 100 is the lowest common server default
/// (ASP.NET Kestrel, Apache httpd, h2o; nginx and Jetty 128; gRPC-Go and
/// Node.js set none), and a tenth of the connection window's streams.
pub(crate) const MAX_STREAMS_PER_WORKLOAD_CONN: usize = 100;

/// An HTTP/2 connection to a workload that has read nothing for this long
/// while streams are open on it is pinged; one whose answer takes longer
/// than [`WORKLOAD_PING_TIMEOUT`] is closed. Longer than the 5 minutes gRPC
/// servers require between pings on a connection they send nothing on
/// (more often counts as abuse: GOAWAY `too_many_pings`, which ends every
/// stream, a quiet server stream's included); an idle connection is not
/// pinged at all, which gRPC servers count as abuse however seldom.
const WORKLOAD_PING_INTERVAL: Duration = Duration::from_secs(310);
const WORKLOAD_PING_TIMEOUT: Duration = Duration::from_secs(20);

/// A stream counted on its HTTP/2 connection until the response body that
/// holds it (or the request that failed) goes.
struct StreamSlot(Arc<AtomicUsize>);

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Most idle HTTP/1.1 connections kept to one workload address.
const MAX_IDLE_PER_WORKLOAD: usize = 128;

struct IdleConn {
    conn: Conn,
    since: Instant,
}

impl WorkloadClients {
    pub fn new(settings: &ProxySettings) -> Self {
        Self {
            inner: Arc::new(Pools {
                mark: settings.socket_mark,
                connect_timeout: settings.connect_timeout(),
                max_header_bytes: settings.max_header_bytes,
                idle: settings.workload_idle_timeout(),
                h1: Mutex::default(),
                h2: Mutex::default(),
                h2_dials: Default::default(),
                h2_dialing: Default::default(),
                reaper: Mutex::new(false),
                ping: (WORKLOAD_PING_INTERVAL, WORKLOAD_PING_TIMEOUT),
            }),
        }
    }

    #[cfg(test)]
    fn with_ping(settings: &ProxySettings, interval: Duration, timeout: Duration) -> Self {
        let mut c = Self::new(settings);
        Arc::get_mut(&mut c.inner).expect("not shared yet").ping = (interval, timeout);
        c
    }

    /// Sends `req` to the workload at `addr`, speaking `proto`. The request's
    /// authority (or Host header) stays what the workload sees as its host;
    /// the mesh's own (`sluice-`) headers are taken out of the answer.
    pub async fn send(
        &self,
        addr: SocketAddr,
        proto: Protocol,
        req: Request<Body>,
    ) -> Result<Response<UpstreamBody>, UpstreamError> {
        let mut resp = self.send_as(addr, proto, req).await?;
        // A workload's answer cannot speak for the mesh.
        crate::body::remove_mesh_headers(resp.headers_mut());
        Ok(resp)
    }

    async fn send_as(
        &self,
        addr: SocketAddr,
        proto: Protocol,
        mut req: Request<Body>,
    ) -> Result<Response<UpstreamBody>, UpstreamError> {
        match proto {
            Protocol::Http2 => {
                *req.version_mut() = Version::HTTP_2;
                // A Host header (an HTTP/1.1 caller's, or one a route set
                // or rewrote) is the authority the workload sees.
                let host = req
                    .headers_mut()
                    .remove(http::header::HOST)
                    .and_then(|h| h.to_str().ok()?.parse().ok());
                if host.is_some() || req.uri().scheme().is_none() || req.uri().authority().is_none()
                {
                    set_absolute(req.uri_mut(), host, addr);
                }
                // A request that is all head can go again whole if the
                // workload refuses it unprocessed: keep its head (a copy of
                // the head of every such request, a GET say).
                let again = (http_body::Body::is_end_stream(req.body())
                    && req.method() != http::Method::CONNECT)
                    .then(|| {
                        let mut r = Request::new(crate::body::empty());
                        *r.method_mut() = req.method().clone();
                        *r.uri_mut() = req.uri().clone();
                        *r.version_mut() = req.version();
                        *r.headers_mut() = req.headers().clone();
                        r
                    });
                let (mut sender, id, slot) = self.h2_sender(addr).await?;
                // Its place on the connection, given up when it goes again
                // elsewhere (the first connection may have room again).
                let mut slot = Some(slot);
                let resp = match sender.try_send_request(req).await {
                    Ok(resp) => resp,
                    // Handed back unsent: the connection takes no more
                    // streams (the workload said GOAWAY, a gRPC server past
                    // its MaxConnectionAge, while streams are still open on
                    // it). It leaves the pool and the request goes on a new
                    // one, body and all.
                    Err(mut e) => match e.take_message() {
                        Some(req) => {
                            tracing::debug!(%addr, "HTTP/2 connection to workload takes no more streams: {}", e.error());
                            self.forget_h2(addr, id);
                            drop(slot.take());
                            let (resp, again_slot) = self.h2_send_again(addr, req).await?;
                            slot = Some(again_slot);
                            resp
                        }
                        // Refused before the workload processed anything
                        // (RFC 9113 section 8.7): a request that was all
                        // head goes once more, on a connection that takes
                        // streams.
                        None => match (refused_unprocessed(e.error()), again) {
                            (Some(goaway), Some(req))
                                if !goaway || crate::forward::idempotent(req.method()) =>
                            {
                                tracing::debug!(%addr, "HTTP/2 workload refused a request unprocessed; sending it again: {}", e.error());
                                if goaway {
                                    self.forget_h2(addr, id);
                                }
                                drop(slot.take());
                                let (resp, again_slot) = self.h2_send_again(addr, req).await?;
                                slot = Some(again_slot);
                                resp
                            }
                            _ => {
                                return Err(UpstreamError::Http {
                                    source: e.into_error(),
                                });
                            }
                        },
                    },
                };
                Ok(resp.map(|b| UpstreamBody {
                    inner: Inner::H2(b),
                    back: None,
                    _slot: slot,
                }))
            }
            _ => {
                *req.version_mut() = Version::HTTP_11;
                if req.headers().get(http::header::HOST).is_none()
                    && let Some(a) = req.uri().authority()
                    && let Ok(v) = HeaderValue::from_str(a.as_str())
                {
                    req.headers_mut().insert(http::header::HOST, v);
                }
                // HTTP/1.1 to an origin server: the request target is the
                // path.
                let pq = req
                    .uri()
                    .path_and_query()
                    .cloned()
                    .unwrap_or_else(|| PathAndQuery::from_static("/"));
                *req.uri_mut() = Uri::from(pq);
                self.send_h1(addr, req).await
            }
        }
    }

    /// Sends `req` once more, on the pool's connection to `addr` (a
    /// connection another request dialled since will do) or a new one.
    async fn h2_send_again(
        &self,
        addr: SocketAddr,
        req: Request<Body>,
    ) -> Result<(Response<Incoming>, StreamSlot), UpstreamError> {
        let (mut sender, _, slot) = self.h2_sender(addr).await?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|source| UpstreamError::Http { source })?;
        Ok((resp, slot))
    }

    async fn send_h1(
        &self,
        addr: SocketAddr,
        req: Request<Body>,
    ) -> Result<Response<UpstreamBody>, UpstreamError> {
        let max_head = (self.inner.max_header_bytes as usize).max(8192);
        let mut req = h1client::Prepared::new(req);
        if let Some(conn) = self.idle_h1(addr) {
            let replay = req.replay();
            match h1client::send(conn, req, max_head).await {
                Ok(resp) => return Ok(self.pooled(addr, resp)),
                // The workload closed the idle connection as the request
                // went out: a request that is all head goes again on a new
                // connection.
                Err(e) if e.closed_before_response() && replay.is_some() => {
                    req = replay.expect("checked");
                }
                Err(source) => return Err(UpstreamError::Http1 { source }),
            }
        }
        // Boxed: dialling is rare, and its state would otherwise sit in
        // every request's future.
        let conn = Box::pin(self.dial_h1(addr)).await?;
        let resp = h1client::send(conn, req, max_head)
            .await
            .map_err(|source| UpstreamError::Http1 { source })?;
        Ok(self.pooled(addr, resp))
    }

    fn pooled(
        &self,
        addr: SocketAddr,
        resp: Response<h1client::ResponseBody>,
    ) -> Response<UpstreamBody> {
        let back = Some(ReturnTo {
            pools: Arc::downgrade(&self.inner),
            addr,
        });
        let mut resp = resp.map(|b| UpstreamBody {
            inner: Inner::H1(b),
            back,
            _slot: None,
        });
        // A response without a body (`204`, `304`, a `HEAD`) is done at once.
        if http_body::Body::is_end_stream(resp.body()) {
            resp.body_mut().give_back();
        }
        resp
    }

    /// A pooled connection to `addr` that can take a request now, the most
    /// recently used first. A connection goes back to the pool only when its
    /// exchange ended cleanly: request sent, response read to its end.
    fn idle_h1(&self, addr: SocketAddr) -> Option<Conn> {
        let mut pools = self.inner.h1.lock().unwrap_or_else(|e| e.into_inner());
        let list = pools.get_mut(&addr)?;
        let (idle, now) = (self.inner.idle, Instant::now());
        let mut found = None;
        while let Some(mut c) = list.pop() {
            if c.conn.fresh(now, c.since, idle) && c.conn.is_usable() {
                found = Some(c.conn);
                break;
            }
        }
        if list.is_empty() {
            pools.remove(&addr);
        }
        found
    }

    async fn dial_h1(&self, addr: SocketAddr) -> Result<Conn, UpstreamError> {
        let tcp = crate::connect::connect(addr, self.inner.mark, self.inner.connect_timeout)
            .await
            .map_err(|source| UpstreamError::Connect { addr, source })?;
        self.start_reaper();
        Ok(Conn::new(tcp))
    }

    /// A pooled HTTP/2 connection to `addr` with room for a stream, or a
    /// new one; its number, and the stream's place on it.
    async fn h2_sender(
        &self,
        addr: SocketAddr,
    ) -> Result<(http2::SendRequest<Body>, u64, StreamSlot), UpstreamError> {
        if let Some(s) = self.open_h2(addr) {
            return Ok(s);
        }
        let mut turn = self.inner.h2_dialing.turn(&addr).await;
        // Dialled by the request this one waited for.
        if let Some(s) = self.open_h2(addr) {
            return Ok(s);
        }
        // Or failed: the requests queued behind a dial to a workload that
        // is not there get its failure at once, rather than each dialling
        // in turn (each waiting out the connect timeout).
        if let Some(f) = turn.failed_meanwhile() {
            return Err(UpstreamError::DialFailed {
                addr,
                reason: f.reason.clone(),
                unreachable: f.unreachable,
            });
        }
        let dialled = Box::pin(self.dial_h2(addr)).await;
        turn.ended(
            dialled
                .as_ref()
                .err()
                .map(|e| (e.to_string(), e.is_unreachable())),
        );
        dialled
    }

    fn open_h2(&self, addr: SocketAddr) -> Option<(http2::SendRequest<Body>, u64, StreamSlot)> {
        let mut h2 = self.inner.h2.lock().unwrap_or_else(|e| e.into_inner());
        let c = h2.get_mut(&addr)?.iter_mut().find(|c| {
            !c.sender.is_closed()
                && c.streams.load(std::sync::atomic::Ordering::Relaxed)
                    < MAX_STREAMS_PER_WORKLOAD_CONN
        })?;
        c.last_used = Instant::now();
        c.streams.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Some((c.sender.clone(), c.id, StreamSlot(c.streams.clone())))
    }

    /// Takes HTTP/2 connection `id` to `addr` out of the pool, if it is
    /// still the pooled one (not a newer one another request dialled).
    fn forget_h2(&self, addr: SocketAddr, id: u64) {
        let mut h2 = self.inner.h2.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(list) = h2.get_mut(&addr) {
            list.retain(|c| c.id != id);
            if list.is_empty() {
                h2.remove(&addr);
            }
        }
    }

    async fn dial_h2(
        &self,
        addr: SocketAddr,
    ) -> Result<(http2::SendRequest<Body>, u64, StreamSlot), UpstreamError> {
        let tcp = crate::connect::connect(addr, self.inner.mark, self.inner.connect_timeout)
            .await
            .map_err(|source| UpstreamError::Connect { addr, source })?;
        // A connection carries many callers' requests: a caller that stops
        // reading its answer (a download, a gRPC server stream) holds its
        // stream's window only, as in the tunnel. Pinged while streams wait on
        // it: a workload gone without a word (its veth removed before its FIN
        // went) would otherwise keep the connection in the pool for as long
        // as requests keep it busy, every one of them waiting out its idle
        // timeout.
        let (sender, conn) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .keep_alive_interval(self.inner.ping.0)
            .keep_alive_timeout(self.inner.ping.1)
            .keep_alive_while_idle(false)
            .max_header_list_size(self.inner.max_header_bytes)
            .initial_stream_window_size(crate::tunnel::STREAM_WINDOW)
            .initial_connection_window_size(crate::tunnel::WORKLOAD_CONNECTION_WINDOW)
            .handshake::<_, Body>(TokioIo::new(tcp))
            .await
            .map_err(|source| UpstreamError::Handshake { addr, source })?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(%addr, "HTTP/2 connection to workload ended: {e}");
            }
        });
        // Closed HTTP/2 connections leave the pool with the reaper's rounds
        // too, even when no HTTP/1.1 connection ever started it.
        self.start_reaper();
        let id = self
            .inner
            .h2_dials
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // Its first stream is the dialler's.
        let streams = Arc::new(AtomicUsize::new(1));
        self.inner
            .h2
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(addr)
            .or_default()
            .push(PooledH2 {
                sender: sender.clone(),
                last_used: Instant::now(),
                id,
                streams: streams.clone(),
            });
        Ok((sender, id, StreamSlot(streams)))
    }

    /// Every half idle timeout, while the pools exist, closes the HTTP/1.1
    /// connections idle that long (or past their workload's keep-alive
    /// window) and lets go of the HTTP/2 connections no
    /// request has taken for that long: hyper closes such a connection once
    /// the streams still open on it (a long gRPC stream) end.
    fn start_reaper(&self) {
        {
            let mut running = self.inner.reaper.lock().unwrap_or_else(|e| e.into_inner());
            if *running {
                return;
            }
            *running = true;
        }
        let pools = Arc::downgrade(&self.inner);
        tokio::spawn(async move {
            loop {
                let Some(idle) = pools.upgrade().map(|p| p.idle) else {
                    return;
                };
                // Closed connections go within 30 s whatever the timeout
                // (`0`: none); a tiny one does not make this a busy loop.
                let round = (idle / 2).clamp(Duration::from_millis(50), Duration::from_secs(30));
                tokio::time::sleep(round).await;
                let Some(p) = pools.upgrade() else { return };
                let mut h1 = p.h1.lock().unwrap_or_else(|e| e.into_inner());
                h1.retain(|_, list| {
                    let now = Instant::now();
                    list.retain_mut(|c| c.conn.fresh(now, c.since, idle) && c.conn.is_usable());
                    !list.is_empty()
                });
                drop(h1);
                p.h2.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .retain(|_, list| {
                        list.retain(|c| !c.sender.is_closed() && c.last_used.elapsed() < idle);
                        !list.is_empty()
                    });
            }
        });
    }
}

/// Where an HTTP/1.1 connection goes back to once its exchange has ended.
struct ReturnTo {
    pools: Weak<Pools>,
    addr: SocketAddr,
}

/// A workload's response body. An HTTP/1.1 connection returns to the pool
/// when the exchange has ended cleanly (a body dropped before that takes its
/// connection with it).
pub struct UpstreamBody {
    inner: Inner,
    back: Option<ReturnTo>,
    /// An HTTP/2 stream's place on its connection, held until the body goes.
    _slot: Option<StreamSlot>,
}

enum Inner {
    H1(h1client::ResponseBody),
    H2(Incoming),
}

impl UpstreamBody {
    fn give_back(&mut self) {
        let (Some(r), Inner::H1(body)) = (self.back.take(), &mut self.inner) else {
            return;
        };
        if let Some(pools) = r.pools.upgrade()
            && let Some(conn) = body.take_idle()
        {
            let mut h1 = pools.h1.lock().unwrap_or_else(|e| e.into_inner());
            let list = h1.entry(r.addr).or_default();
            // After a burst, the least recently used beyond the cap close
            // (each held a descriptor for up to the idle timeout).
            if list.len() >= MAX_IDLE_PER_WORKLOAD {
                list.remove(0);
            }
            list.push(IdleConn {
                conn,
                since: Instant::now(),
            });
        }
    }
}

impl http_body::Body for UpstreamBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        match &mut this.inner {
            Inner::H2(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
            Inner::H1(b) => {
                let r = Pin::new(&mut *b).poll_frame(cx);
                match &r {
                    Poll::Ready(None) => this.give_back(),
                    Poll::Ready(Some(Ok(_))) if b.is_end_stream() => this.give_back(),
                    Poll::Ready(Some(Err(_))) => this.back = None,
                    _ => {}
                }
                r.map_err(Into::into)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            Inner::H1(b) => b.is_end_stream(),
            Inner::H2(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> http_body::SizeHint {
        match &self.inner {
            Inner::H1(b) => b.size_hint(),
            Inner::H2(b) => b.size_hint(),
        }
    }
}

/// Whether the workload refused a stream before processing any of it
/// (RFC 9113 section 8.7): reset with `REFUSED_STREAM`, or above the last
/// stream of a graceful GOAWAY (`NO_ERROR`; one with an error code may have
/// cut streams it processed). `Some(true)`: by GOAWAY, so the connection
/// takes no more. h2 gives a GOAWAY's error to a stream below its last
/// stream too when the GOAWAY lands between the stream's send and hyper's
/// next readiness check: that stream may have been processed, so a caller
/// sends again after a GOAWAY only what may be done twice.
fn refused_unprocessed(e: &hyper::Error) -> Option<bool> {
    let h2e = std::error::Error::source(e)?.downcast_ref::<h2::Error>()?;
    if !h2e.is_remote() {
        return None;
    }
    match h2e.reason()? {
        h2::Reason::REFUSED_STREAM if h2e.is_reset() => Some(false),
        h2::Reason::NO_ERROR if h2e.is_go_away() => Some(true),
        _ => None,
    }
}

/// Makes `uri` absolute: `http://<authority>/<path>`: `authority` when
/// given, else the URI's own, else the workload's address.
fn set_absolute(uri: &mut Uri, authority: Option<http::uri::Authority>, addr: SocketAddr) {
    let mut parts = std::mem::take(uri).into_parts();
    parts.scheme = Some(http::uri::Scheme::HTTP);
    if authority.is_some() || parts.authority.is_none() {
        parts.authority = Some(authority.unwrap_or_else(|| {
            addr.to_string()
                .parse()
                .expect("a socket address is an authority")
        }));
    }
    if parts.path_and_query.is_none() {
        parts.path_and_query = Some(PathAndQuery::from_static("/"));
    }
    *uri = Uri::from_parts(parts).expect("scheme, authority and path make a URI");
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use http_body_util::{BodyExt, Full};

    use super::*;

    /// An HTTP/1.1 server on loopback that answers with the number of the
    /// connection the request came on, before it reads the request body;
    /// `close_after_first` makes it close every connection after its first
    /// response.
    async fn server(close_after_first: bool) -> (SocketAddr, Arc<AtomicUsize>) {
        server_with(close_after_first, None).await
    }

    /// As [`server`], with a `keep-alive` field on every response.
    async fn server_with(
        close_after_first: bool,
        keep_alive: Option<&'static str>,
    ) -> (SocketAddr, Arc<AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            loop {
                let (tcp, _) = listener.accept().await.unwrap();
                let n = count.fetch_add(1, Ordering::SeqCst) + 1;
                tokio::spawn(async move {
                    let svc =
                        hyper::service::service_fn(move |req: Request<Incoming>| async move {
                            let mut resp = Response::new(Full::new(Bytes::from(format!(
                                "conn {n} {}",
                                req.uri()
                            ))));
                            // Answer at once, and go on reading the body
                            // (so the connection stays open for it).
                            tokio::spawn(req.into_body().collect());
                            if close_after_first {
                                resp.headers_mut().insert(
                                    http::header::CONNECTION,
                                    HeaderValue::from_static("close"),
                                );
                            }
                            if let Some(v) = keep_alive {
                                resp.headers_mut()
                                    .insert("keep-alive", HeaderValue::from_static(v));
                            }
                            Ok::<_, std::convert::Infallible>(resp)
                        });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tcp), svc)
                        .await;
                });
            }
        });
        (addr, accepted)
    }

    async fn get(c: &WorkloadClients, addr: SocketAddr, path: &str) -> String {
        let req = Request::builder()
            .uri(format!("http://cart.shop{path}"))
            .body(crate::body::empty())
            .unwrap();
        let resp = c.send(addr, Protocol::Http1, req).await.unwrap();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8(body.to_vec()).unwrap()
    }

    /// A burst leaves at most MAX_IDLE_PER_WORKLOAD idle connections to one
    /// workload; the least recently used beyond go.
    #[tokio::test]
    async fn idle_connections_to_one_workload_are_capped() {
        let (addr, accepted) = server(false).await;
        let c = WorkloadClients::new(&ProxySettings::default());
        let n = MAX_IDLE_PER_WORKLOAD + 10;
        let mut held = Vec::new();
        for i in 0..n {
            let req = Request::builder()
                .uri(format!("http://cart.shop/{i}"))
                .body(crate::body::empty())
                .unwrap();
            // Answers unread: each takes a connection of its own.
            held.push(c.send(addr, Protocol::Http1, req).await.unwrap());
        }
        assert_eq!(accepted.load(Ordering::SeqCst), n);
        for resp in held {
            resp.into_body().collect().await.unwrap();
        }
        let idle = |c: &WorkloadClients| c.inner.h1.lock().unwrap().get(&addr).map_or(0, Vec::len);
        assert_eq!(idle(&c), MAX_IDLE_PER_WORKLOAD);
        // Still reused.
        assert!(get(&c, addr, "/again").await.starts_with("conn "));
        assert_eq!(accepted.load(Ordering::SeqCst), n);
    }

    #[tokio::test]
    async fn a_connection_is_reused_once_its_response_is_read() {
        let (addr, accepted) = server(false).await;
        let c = WorkloadClients::new(&ProxySettings::default());
        assert_eq!(get(&c, addr, "/a?x=1").await, "conn 1 /a?x=1");
        assert_eq!(get(&c, addr, "/b").await, "conn 1 /b");
        // Two at once need two connections; both go back to the pool.
        let (x, y) = tokio::join!(get(&c, addr, "/c"), get(&c, addr, "/d"));
        let mut conns = [x, y].map(|s| s.split(' ').nth(1).unwrap().to_string());
        conns.sort();
        assert_eq!(conns, ["1", "2"]);
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    /// A workload that says how long it keeps idle connections
    /// (`keep-alive: timeout=4`, as Node.js servers do with 5) gets no
    /// request on one idle for nearly that long: it may be closing it.
    #[tokio::test]
    async fn a_connection_idle_near_the_workloads_keep_alive_timeout_is_not_reused() {
        let (addr, accepted) = server_with(false, Some("timeout=4, max=100")).await;
        let c = WorkloadClients::new(&ProxySettings::default());
        assert_eq!(get(&c, addr, "/a").await, "conn 1 /a");
        // Well within the timeout less its margin (1 s): reused.
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(get(&c, addr, "/b").await, "conn 1 /b");
        // Past it: a new connection.
        tokio::time::sleep(Duration::from_millis(3_100)).await;
        assert_eq!(get(&c, addr, "/c").await, "conn 2 /c");
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
        // Without the field, the pool's own idle timeout (90 s) holds.
        let (addr, accepted) = server(false).await;
        assert_eq!(get(&c, addr, "/a").await, "conn 1 /a");
        tokio::time::sleep(Duration::from_millis(3_100)).await;
        assert_eq!(get(&c, addr, "/b").await, "conn 1 /b");
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_callers_reuse_connections_up_to_their_concurrency() {
        let (addr, accepted) = server(false).await;
        let c = WorkloadClients::new(&ProxySettings::default());
        let callers: Vec<_> = (0..8)
            .map(|i| {
                let c = c.clone();
                tokio::spawn(async move {
                    for n in 0..50 {
                        let body = get(&c, addr, &format!("/{i}/{n}")).await;
                        assert!(body.ends_with(&format!("/{i}/{n}")), "{body}");
                    }
                })
            })
            .collect();
        for t in callers {
            t.await.unwrap();
        }
        let opened = accepted.load(Ordering::SeqCst);
        assert!(opened <= 8, "{opened} connections for 8 callers");
    }

    #[tokio::test]
    async fn a_connection_still_sending_an_upload_is_not_given_to_the_next_request() {
        let (addr, accepted) = server(false).await;
        let c = WorkloadClients::new(&ProxySettings::default());
        // An upload whose sender sends 10 of 1,000,000 bytes and stalls; the
        // workload answers before reading it.
        let (tx, rx) =
            tokio::sync::mpsc::channel::<Result<http_body::Frame<Bytes>, crate::body::BoxError>>(1);
        tx.send(Ok(http_body::Frame::data(Bytes::from_static(
            b"0123456789",
        ))))
        .await
        .unwrap();
        let body = crate::body::boxed(http_body_util::StreamBody::new(
            futures_util::stream::unfold(
                rx,
                |mut rx| async move { rx.recv().await.map(|v| (v, rx)) },
            ),
        ));
        let req = Request::builder()
            .method("POST")
            .uri("http://cart.shop/upload")
            .header(http::header::CONTENT_LENGTH, "1000000")
            .body(body)
            .unwrap();
        let resp = c.send(addr, Protocol::Http1, req).await.unwrap();
        let early = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&early[..], b"conn 1 /upload");
        // The next request must not wait for that upload (a guard, not a
        // measurement: it would wait forever).
        let next = tokio::time::timeout(Duration::from_secs(10), get(&c, addr, "/next"))
            .await
            .expect("the next request waited for another caller's stalled upload");
        assert_eq!(next, "conn 2 /next");
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
        drop(tx);
    }

    #[tokio::test]
    async fn a_connection_the_workload_closed_is_replaced() {
        let (addr, accepted) = server(true).await;
        let c = WorkloadClients::new(&ProxySettings::default());
        assert_eq!(get(&c, addr, "/a").await, "conn 1 /a");
        assert_eq!(get(&c, addr, "/b").await, "conn 2 /b");
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    /// A workload that answers the first request on each connection and
    /// then, as if its idle timeout struck just as the next request came,
    /// closes the connection without answering it. Counts connections.
    async fn closes_on_second_request() -> (SocketAddr, Arc<AtomicUsize>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((mut tcp, _)) = listener.accept().await {
                let n = count.fetch_add(1, Ordering::SeqCst) + 1;
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    // One read holds a whole small request.
                    if tcp.read(&mut buf).await.unwrap_or(0) == 0 {
                        return;
                    }
                    let body = format!("conn {n}");
                    let head = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", body.len());
                    tcp.write_all(format!("{head}{body}").as_bytes())
                        .await
                        .unwrap();
                    let _ = tcp.read(&mut buf).await;
                });
            }
        });
        (addr, accepted)
    }

    #[tokio::test]
    async fn a_get_the_workload_dropped_on_a_reused_connection_goes_again_but_a_post_does_not() {
        let (addr, accepted) = closes_on_second_request().await;
        let c = WorkloadClients::new(&ProxySettings::default());
        assert_eq!(get(&c, addr, "/a").await, "conn 1");
        // Conn 1 is pooled and looks open; the workload drops the request.
        assert_eq!(get(&c, addr, "/b").await, "conn 2");
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
        // A POST may have been acted on: its error is the caller's to see.
        let post = Request::builder()
            .method(http::Method::POST)
            .uri("http://cart.shop/order")
            .body(crate::body::full("item=1"))
            .unwrap();
        let Err(err) = c.send(addr, Protocol::Http1, post).await else {
            panic!("a POST on a connection the workload dropped was answered");
        };
        assert!(!err.is_connect(), "{err}");
        assert!(
            err.to_string()
                .contains("closed the connection before answering"),
            "{err}"
        );
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    /// An HTTP/2 server on loopback: `/slow` streams "a", waits for `go`,
    /// then "b"; anything else answers "ok". `closed` counts the connections
    /// that have ended.
    async fn h2_server(
        go: Arc<tokio::sync::Notify>,
    ) -> (SocketAddr, Arc<AtomicUsize>, Arc<AtomicUsize>) {
        h2_server_with(go, None).await
    }

    /// [`h2_server`] allowing `max_streams` streams per connection.
    async fn h2_server_with(
        go: Arc<tokio::sync::Notify>,
        max_streams: Option<u32>,
    ) -> (SocketAddr, Arc<AtomicUsize>, Arc<AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (accepted, closed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let (a, c) = (accepted.clone(), closed.clone());
        tokio::spawn(async move {
            loop {
                let (tcp, _) = listener.accept().await.unwrap();
                // As workloads' servers do: no 40 ms Nagle wait for an ack.
                tcp.set_nodelay(true).unwrap();
                a.fetch_add(1, Ordering::SeqCst);
                let (c, go) = (c.clone(), go.clone());
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let go = go.clone();
                        async move {
                            let body = if req.uri().path() == "/authority" {
                                let a = req.uri().authority().map(|a| a.to_string());
                                Full::new(Bytes::from(a.unwrap_or_default())).boxed()
                            } else if req.uri().path() == "/slow" {
                                let (tx, rx) = tokio::sync::mpsc::channel::<
                                    Result<http_body::Frame<Bytes>, std::convert::Infallible>,
                                >(2);
                                tokio::spawn(async move {
                                    let _ = tx.send(Ok(http_body::Frame::data("a".into()))).await;
                                    go.notified().await;
                                    let _ = tx.send(Ok(http_body::Frame::data("b".into()))).await;
                                });
                                http_body_util::StreamBody::new(tokio_stream_from(rx)).boxed()
                            } else {
                                Full::new(Bytes::from("ok")).boxed()
                            };
                            Ok::<_, std::convert::Infallible>(Response::new(body))
                        }
                    });
                    let mut b = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
                    if let Some(n) = max_streams {
                        b.max_concurrent_streams(n);
                    }
                    let _ = b.serve_connection(TokioIo::new(tcp), svc).await;
                    c.fetch_add(1, Ordering::SeqCst);
                });
            }
        });
        (addr, accepted, closed)
    }

    /// The frames of an mpsc receiver as a stream.
    fn tokio_stream_from<T: Send + 'static>(
        rx: tokio::sync::mpsc::Receiver<T>,
    ) -> impl futures_util::Stream<Item = T> + Send + 'static {
        futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|v| (v, rx)) })
    }

    /// Waits, at most 10 s (a guard against a hang, not a measurement), for
    /// `n` to reach `want`.
    async fn until(n: &AtomicUsize, want: usize) -> bool {
        for _ in 0..1000 {
            if n.load(Ordering::SeqCst) >= want {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        false
    }

    fn h2_get(path: &str) -> Request<Body> {
        Request::builder()
            .uri(format!("http://cart.shop{path}"))
            .body(crate::body::empty())
            .unwrap()
    }

    /// A workload that allows 100 streams per connection (ASP.NET Kestrel's
    /// default) with 100 long streams open gets the next request on a
    /// second connection: on the one connection it waited in hyper's queue
    /// until a stream ended, and so did every request after it. Once the
    /// long streams end, the first connection takes streams again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_workload_at_its_stream_limit_gets_another_connection() {
        let go = Arc::new(tokio::sync::Notify::new());
        let limit = MAX_STREAMS_PER_WORKLOAD_CONN;
        let (addr, accepted, _) = h2_server_with(go.clone(), Some(limit as u32)).await;
        let c = WorkloadClients::new(&ProxySettings::default());
        let mut held = Vec::new();
        for i in 0..limit {
            let resp = c.send(addr, Protocol::Http2, h2_get("/slow")).await;
            held.push(resp.unwrap_or_else(|e| panic!("stream {i}: {e}")));
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
        let resp = tokio::time::timeout(
            Duration::from_secs(5),
            c.send(addr, Protocol::Http2, h2_get("/")),
        )
        .await
        .expect("an answer while 100 streams are open")
        .unwrap();
        assert_eq!(
            &resp.into_body().collect().await.unwrap().to_bytes()[..],
            b"ok"
        );
        assert_eq!(accepted.load(Ordering::SeqCst), 2, "a second connection");
        // The long streams end (their callers go): 101 requests now fit on
        // the two.
        drop(held);
        let mut again = Vec::new();
        for _ in 0..limit + 1 {
            again.push(
                c.send(addr, Protocol::Http2, h2_get("/slow"))
                    .await
                    .unwrap(),
            );
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 2, "no third connection");
        go.notify_waiters();
        drop(again);
    }

    #[tokio::test]
    async fn an_idle_http2_connection_is_closed_but_not_under_an_open_stream() {
        let go = Arc::new(tokio::sync::Notify::new());
        let (addr, accepted, closed) = h2_server(go.clone()).await;
        let c = WorkloadClients::new(&ProxySettings {
            workload_idle_timeout_ms: 100,
            ..ProxySettings::default()
        });
        let resp = c.send(addr, Protocol::Http2, h2_get("/")).await.unwrap();
        assert_eq!(
            &resp.into_body().collect().await.unwrap().to_bytes()[..],
            b"ok"
        );
        assert!(
            until(&closed, 1).await,
            "the idle HTTP/2 connection was kept"
        );
        assert_eq!(accepted.load(Ordering::SeqCst), 1);

        // A stream open longer than the idle timeout keeps its connection
        // until it ends, though the pool lets go of it.
        let resp = c
            .send(addr, Protocol::Http2, h2_get("/slow"))
            .await
            .unwrap();
        let mut body = resp.into_body();
        let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(&first[..], b"a");
        // Long enough for several reaper rounds; the connection must stay.
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert_eq!(closed.load(Ordering::SeqCst), 1, "an open stream was cut");
        go.notify_one();
        let rest = body.collect().await.unwrap().to_bytes();
        assert_eq!(&rest[..], b"b");
        assert!(
            until(&closed, 2).await,
            "the connection outlived its last stream"
        );
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    /// A burst of first requests to an HTTP/2 workload shares one new
    /// connection (each opened its own, and all but the last were closed
    /// when their request ended).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_burst_of_first_http2_requests_dials_one_connection() {
        let (addr, accepted, _) = h2_server(Arc::new(tokio::sync::Notify::new())).await;
        let c = WorkloadClients::new(&ProxySettings::default());
        let sends = (0..50).map(|_| {
            let c = c.clone();
            tokio::spawn(async move {
                let resp = c.send(addr, Protocol::Http2, h2_get("/")).await.unwrap();
                resp.into_body().collect().await.unwrap().to_bytes()
            })
        });
        for body in futures_util::future::join_all(sends).await {
            assert_eq!(&body.unwrap()[..], b"ok");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    /// The requests queued behind a first HTTP/2 dial that fails get its
    /// failure, not a dial each in turn (one connect timeout after another).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn requests_queued_behind_a_failed_http2_dial_share_its_failure() {
        // A listener whose accept queue is full: further connects hang.
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let listener = sock.listen(1).unwrap();
        let addr = listener.local_addr().unwrap();
        let mut fill = Vec::new();
        for _ in 0..2 {
            fill.push(tokio::net::TcpStream::connect(addr).await.unwrap());
        }
        let c = WorkloadClients::new(&ProxySettings {
            connect_timeout_ms: 300,
            ..ProxySettings::default()
        });
        let sends = (0..5).map(|_| {
            let c = c.clone();
            tokio::spawn(async move { c.send(addr, Protocol::Http2, h2_get("/")).await.err() })
        });
        let errors: Vec<UpstreamError> = futures_util::future::join_all(sends)
            .await
            .into_iter()
            .map(|r| r.unwrap().expect("no answer through a full queue"))
            .collect();
        assert!(errors.iter().all(UpstreamError::is_connect), "{errors:?}");
        let shared = errors
            .iter()
            .filter(|e| matches!(e, UpstreamError::DialFailed { .. }))
            .count();
        assert_eq!(shared, 4, "one dial, its failure shared: {errors:?}");
        drop((listener, fill));
    }

    /// An HTTP/2 workload that says GOAWAY (a gRPC server past its
    /// `MaxConnectionAge`) while a stream is still open on the connection:
    /// the next requests go on a new connection, not to the old one that
    /// refuses them until its last stream ends.
    #[tokio::test]
    async fn an_http2_workloads_goaway_sends_the_next_requests_to_a_new_connection() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let shut = Arc::new(tokio::sync::Notify::new());
        let release = Arc::new(tokio::sync::Notify::new());
        {
            let (accepted, shut, release) = (accepted.clone(), shut.clone(), release.clone());
            tokio::spawn(async move {
                loop {
                    let (tcp, _) = listener.accept().await.unwrap();
                    accepted.fetch_add(1, Ordering::SeqCst);
                    let (shut, release) = (shut.clone(), release.clone());
                    tokio::spawn(async move {
                        let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                            let release = release.clone();
                            async move {
                                let body = if req.uri().path() == "/slow" {
                                    let (tx, rx) = tokio::sync::mpsc::channel::<
                                        Result<http_body::Frame<Bytes>, std::convert::Infallible>,
                                    >(2);
                                    tokio::spawn(async move {
                                        let _ =
                                            tx.send(Ok(http_body::Frame::data("a".into()))).await;
                                        release.notified().await;
                                        let _ =
                                            tx.send(Ok(http_body::Frame::data("b".into()))).await;
                                    });
                                    http_body_util::StreamBody::new(tokio_stream_from(rx)).boxed()
                                } else {
                                    Full::new(Bytes::from("ok")).boxed()
                                };
                                Ok::<_, std::convert::Infallible>(Response::new(body))
                            }
                        });
                        let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                            .serve_connection(TokioIo::new(tcp), svc);
                        tokio::pin!(conn);
                        tokio::select! {
                            _ = conn.as_mut() => {}
                            () = shut.notified() => {
                                conn.as_mut().graceful_shutdown();
                                let _ = conn.await;
                            }
                        }
                    });
                }
            });
        }
        let c = WorkloadClients::new(&ProxySettings::default());
        let resp = c
            .send(addr, Protocol::Http2, h2_get("/slow"))
            .await
            .unwrap();
        let mut slow = resp.into_body();
        let first = slow.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(&first[..], b"a");
        shut.notify_one();
        // The GOAWAY is in.
        tokio::time::sleep(Duration::from_millis(200)).await;
        for i in 0..3 {
            let resp = c.send(addr, Protocol::Http2, h2_get("/")).await;
            let resp = resp.unwrap_or_else(|e| panic!("request {i}: {e}"));
            assert_eq!(
                &resp.into_body().collect().await.unwrap().to_bytes()[..],
                b"ok"
            );
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 2, "one new connection");
        // The old connection's stream goes on to its end.
        release.notify_one();
        let rest = slow.collect().await.unwrap().to_bytes();
        assert_eq!(&rest[..], b"b");
    }

    /// An HTTP/2 server that resets its first stream with REFUSED_STREAM
    /// (as one at its stream limit does) and answers "ok" to the others;
    /// counts the streams it saw.
    async fn refusing_h2_server() -> (SocketAddr, Arc<AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(AtomicUsize::new(0));
        let counted = seen.clone();
        tokio::spawn(async move {
            loop {
                let (tcp, _) = listener.accept().await.unwrap();
                let seen = counted.clone();
                tokio::spawn(async move {
                    let mut conn = h2::server::handshake(tcp).await.unwrap();
                    while let Some(Ok((_req, mut respond))) = conn.accept().await {
                        if seen.fetch_add(1, Ordering::SeqCst) == 0 {
                            respond.send_reset(h2::Reason::REFUSED_STREAM);
                            continue;
                        }
                        let mut send = respond.send_response(Response::new(()), false).unwrap();
                        send.send_data(Bytes::from("ok"), true).unwrap();
                    }
                });
            }
        });
        (addr, seen)
    }

    /// An HTTP/2 workload whose first connection answers one request and
    /// then nothing at all, pings included (a pod whose node vanished);
    /// later connections answer "ok". Counts connections.
    async fn h2_server_that_goes_silent() -> (SocketAddr, Arc<AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let counted = accepted.clone();
        tokio::spawn(async move {
            loop {
                let (tcp, _) = listener.accept().await.unwrap();
                let first = counted.fetch_add(1, Ordering::SeqCst) == 0;
                tokio::spawn(async move {
                    let mut conn = h2::server::handshake(tcp).await.unwrap();
                    while let Some(Ok((_req, mut respond))) = conn.accept().await {
                        let mut send = respond.send_response(Response::new(()), false).unwrap();
                        send.send_data(Bytes::from("ok"), true).unwrap();
                        if first {
                            // Flushed by one more poll, then never read or
                            // written again, the socket left open.
                            let _ = tokio::time::timeout(Duration::from_millis(50), conn.accept())
                                .await;
                            std::future::pending::<()>().await;
                        }
                    }
                });
            }
        });
        (addr, accepted)
    }

    /// A pooled HTTP/2 connection to a workload that stopped answering
    /// (pings included) is closed by its pings once a request waits on it,
    /// and the next request dials a new one instead of waiting in turn.
    #[tokio::test]
    async fn a_silent_http2_workload_connection_is_closed_by_its_pings() {
        let ping = Duration::from_millis(100);
        let c = WorkloadClients::with_ping(&ProxySettings::default(), ping, ping);
        let (addr, accepted) = h2_server_that_goes_silent().await;
        let get = async || {
            let resp = c.send(addr, Protocol::Http2, h2_get("/")).await?;
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(
                resp.into_body().collect().await?.to_bytes(),
            )
        };
        assert_eq!(&get().await.unwrap()[..], b"ok");
        // Not pinged while idle (a gRPC server would take it for abuse).
        tokio::time::sleep(ping * 4).await;
        let stuck = tokio::time::timeout(Duration::from_secs(5), get())
            .await
            .expect("the request waited on the silent connection");
        assert!(stuck.is_err(), "the silent connection answered: {stuck:?}");
        let third = tokio::time::timeout(Duration::from_secs(5), get())
            .await
            .expect("the request waited on the silent connection");
        assert_eq!(&third.unwrap()[..], b"ok");
        assert_eq!(accepted.load(Ordering::SeqCst), 2, "a new connection");
    }

    /// A request an HTTP/2 workload refused before processing it goes again
    /// when it was all head (a GET); one whose body went is not sent twice.
    #[tokio::test]
    async fn a_request_an_http2_workload_refused_unprocessed_goes_again_if_all_head() {
        let c = WorkloadClients::new(&ProxySettings::default());
        let (addr, seen) = refusing_h2_server().await;
        let resp = c.send(addr, Protocol::Http2, h2_get("/")).await.unwrap();
        assert_eq!(
            &resp.into_body().collect().await.unwrap().to_bytes()[..],
            b"ok"
        );
        assert_eq!(seen.load(Ordering::SeqCst), 2, "refused, then answered");

        let (addr, seen) = refusing_h2_server().await;
        let post = Request::post("http://cart.shop/items")
            .body(crate::body::full("an upload"))
            .unwrap();
        let Err(err) = c.send(addr, Protocol::Http2, post).await else {
            panic!("a refused upload was answered");
        };
        assert!(format!("{err:?}").contains("REFUSED_STREAM"), "{err:?}");
        assert_eq!(seen.load(Ordering::SeqCst), 1, "not sent again");
    }

    /// `workload_idle_timeout_ms: 0` keeps an idle connection (it closed
    /// at once: nothing was fresh before a timeout of zero) and the next
    /// request reuses it.
    #[tokio::test]
    async fn a_zero_idle_timeout_keeps_idle_connections() {
        let (addr, accepted, closed) = h2_server(Arc::new(tokio::sync::Notify::new())).await;
        let c = WorkloadClients::new(&ProxySettings {
            workload_idle_timeout_ms: 0,
            ..ProxySettings::default()
        });
        for _ in 0..2 {
            let resp = c.send(addr, Protocol::Http2, h2_get("/")).await.unwrap();
            resp.into_body().collect().await.unwrap();
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1, "reused");
        assert_eq!(closed.load(Ordering::SeqCst), 0, "kept");
    }

    /// A Host header (a route's `RequestHeaderModifier` or `URLRewrite`
    /// hostname) is the authority an HTTP/2 workload sees, over the caller's
    /// `:authority`.
    #[tokio::test]
    async fn a_host_header_is_an_http2_workloads_authority() {
        let (addr, _, _) = h2_server(Arc::new(tokio::sync::Notify::new())).await;
        let c = WorkloadClients::new(&ProxySettings::default());
        let authority = |req| async {
            let resp = c.send(addr, Protocol::Http2, req).await.unwrap();
            resp.into_body().collect().await.unwrap().to_bytes()
        };
        assert_eq!(authority(h2_get("/authority")).await, "cart.shop");
        let mut req = h2_get("/authority");
        req.headers_mut()
            .insert(http::header::HOST, HeaderValue::from_static("api.internal"));
        assert_eq!(authority(req).await, "api.internal");
    }

    #[test]
    fn only_a_workload_out_of_reach_is_unreachable() {
        let addr: SocketAddr = "127.0.0.1:8080".parse().unwrap();
        let connect = |source| UpstreamError::Connect { addr, source };
        assert!(connect(std::io::ErrorKind::ConnectionRefused.into()).is_unreachable());
        // Out of descriptors here: retryable, the workload is not to blame.
        let local = connect(std::io::Error::from_raw_os_error(libc::EMFILE));
        assert!(local.is_connect() && !local.is_unreachable());
    }

    #[tokio::test]
    async fn nothing_listening_is_a_connect_error() {
        let free = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let c = WorkloadClients::new(&ProxySettings::default());
        let req = Request::builder()
            .uri("/")
            .body(crate::body::empty())
            .unwrap();
        let Err(err) = c.send(free, Protocol::Http1, req).await else {
            panic!("a request to {free}, where nothing listens, was answered");
        };
        assert!(err.is_connect(), "{err}");
    }
}
