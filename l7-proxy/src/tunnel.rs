//! The client side of the tunnel between node proxies: HTTP/2 over mutual
//! TLS 1.3, one pool of connections per (source identity, peer node, peer
//! identity). The peer identity is part of the key because the peer chooses
//! its certificate by SNI.
//!
//! Connections are reused for many streams, capped per key, and closed after
//! an idle timeout. Opaque TCP rides in `CONNECT` streams whose authority is
//! the target `ip:port`; HTTP requests are ordinary streams carrying the
//! target in the `sluice-target` header. Streams are `h2` streams, driven by
//! the task of the request (see [`crate::h2stream`]); each connection's own
//! task reads and writes frames and pings the peer.

use std::{
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};
use tokio_util::task::AbortOnDropHandle;

use bytes::Bytes;
use h2::client::SendRequest;
use http::{Method, Request, Response, StatusCode};
use tokio::time::Instant;

use crate::{
    FastMap,
    batch::{BatchIo, FlushAtEnd},
    body::Body,
    config::{ProxySettings, SpiffeId},
    conntable::{ConnKind, ConnMeta, ConnTable, TlsInfo},
    h2stream::{RecvBody, StreamIo},
    identity::IdentityProvider,
    io::Counted,
    metrics::{Direction, Metrics, TlsFailureLabels},
};

#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    #[error("connecting to peer proxy {node}: {source}")]
    Connect {
        node: SocketAddr,
        source: std::io::Error,
    },
    #[error("connecting to peer proxy {node}: no answer within {timeout:?}")]
    ConnectTimeout { node: SocketAddr, timeout: Duration },
    #[error("TLS handshake with peer proxy {node} (expecting {peer}): {reason}")]
    Handshake {
        node: SocketAddr,
        peer: SpiffeId,
        reason: String,
    },
    #[error("no TLS configuration for {source_id} towards {peer}: {reason}")]
    Identity {
        source_id: SpiffeId,
        peer: SpiffeId,
        reason: String,
    },
    #[error("HTTP/2 with peer proxy {node}: {source}")]
    Http2 { node: SocketAddr, source: h2::Error },
    /// The connection could not take the stream: nothing was sent.
    #[error("HTTP/2 with peer proxy {node}, before the request was sent: {source}")]
    Unsent { node: SocketAddr, source: h2::Error },
    #[error("peer proxy {node} refused the stream to {target}: {status}")]
    Refused {
        node: SocketAddr,
        target: SocketAddr,
        status: String,
    },
    /// Every stream the peer allows on the connection stayed in use: nothing
    /// was sent.
    #[error("peer proxy {node} had no free stream within {waited:?}")]
    Busy { node: SocketAddr, waited: Duration },
    /// Another request's dial to the same peer, which this one waited for,
    /// failed just now: not dialled again at once.
    #[error("{reason} (a dial to peer proxy {node} just failed)")]
    DialFailed {
        node: SocketAddr,
        reason: String,
        unreachable: bool,
    },
    /// The peer proxy did not answer a CONNECT in time (it may have reached
    /// the workload meanwhile).
    #[error("peer proxy {node} did not answer the stream to {target} within {timeout:?}")]
    StreamTimeout {
        node: SocketAddr,
        target: SocketAddr,
        timeout: Duration,
    },
}

impl TunnelError {
    /// Nothing reached the destination workload, so a retry is safe.
    pub fn is_connect_failure(&self) -> bool {
        match self {
            TunnelError::Http2 { source, .. } => unprocessed(source),
            TunnelError::StreamTimeout { .. } => false,
            _ => true,
        }
    }

    /// The endpoint's node proxy could not be reached at all (refused, no
    /// answer, a failed handshake), as opposed to a local problem or a
    /// busy, refusing or closing connection to a proxy that is there.
    pub fn is_unreachable(&self) -> bool {
        match self {
            // Not when this proxy could not open a socket (descriptors,
            // `SO_MARK`).
            TunnelError::Connect { source, .. } => crate::connect::peer_unreachable(source),
            TunnelError::ConnectTimeout { .. } | TunnelError::Handshake { .. } => true,
            TunnelError::DialFailed { unreachable, .. } => *unreachable,
            _ => false,
        }
    }
}

fn is_refused_stream(e: &h2::Error) -> bool {
    e.reason() == Some(h2::Reason::REFUSED_STREAM)
}

/// Whether the peer proxy surely did nothing with the stream (RFC 9113
/// section 8.7): it refused it, or the stream was above the last one of its
/// graceful GOAWAY (a proxy draining for a restart). `h2` gives a remote
/// GOAWAY's error to a stream only when it is above that stream; a
/// GOAWAY with an error code is left out, as the connection's end may then
/// reach streams it had begun.
fn unprocessed(e: &h2::Error) -> bool {
    is_refused_stream(e)
        || (e.is_go_away() && e.is_remote() && e.reason() == Some(h2::Reason::NO_ERROR))
}

/// The identity of a pool of tunnel connections.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TunnelKey {
    pub source: SpiffeId,
    pub node: SocketAddr,
    pub peer: SpiffeId,
}

impl TunnelKey {
    /// The tunnel that carries `source`'s traffic to the peer proxy `to`.
    pub fn to(source: &SpiffeId, to: &crate::state::TunnelPeer) -> TunnelKey {
        TunnelKey {
            source: source.clone(),
            node: to.node,
            peer: to.identity.clone(),
        }
    }
}

impl std::hash::Hash for TunnelKey {
    /// The node alone: a node has few keys, and equality sorts those out
    /// without hashing two identities for every request.
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.node.hash(state);
    }
}

struct TunnelConn {
    sender: SendRequest<Bytes>,
    streams: Arc<AtomicUsize>,
    /// Streams ever opened (stream IDs run out at 2^31).
    opened: std::sync::atomic::AtomicU64,
    born: Instant,
    last_used: Mutex<Instant>,
    /// Shared with every stream's caller, cloned for none.
    tls: Arc<TlsInfo>,
    /// Cleared when the connection's task ends.
    open: Arc<std::sync::atomic::AtomicBool>,
    /// Its key's waiting room.
    room: Arc<Room>,
    /// Response streams read to their end, let go of at the next stream.
    finished: Finished,
}

/// Response streams read to their end, whose handles are let go of when
/// the connection's next stream opens (or once the connection and its last
/// response body are gone). `h2` wakes a connection's task when the last
/// handle of a closed stream drops, a poll with nothing to send or read
/// (about 1,900 instructions a request, benches/RESULTS.md); opening a
/// stream wakes it anyway, and the two wakes make one poll.
type Finished = Arc<Mutex<Vec<RecvBody>>>;

impl TunnelConn {
    fn is_closed(&self) -> bool {
        !self.open.load(Ordering::Relaxed)
    }
}

/// Counts a stream as open on its connection while alive; its end wakes
/// the requests waiting for room on a full key.
pub struct StreamGuard {
    streams: Arc<AtomicUsize>,
    room: Arc<Room>,
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.streams.fetch_sub(1, Ordering::SeqCst);
        // Only when someone waits: the notification takes a lock.
        if self.room.waiting.load(Ordering::SeqCst) > 0 {
            self.room.freed.notify_waiters();
        }
    }
}

/// Requests waiting for a stream slot when every connection of their key is
/// full and no more may open. They wait here, not in `h2`'s queue of streams
/// over the peer's limit: a stream queued there and given up on is still
/// sent once a slot frees (and then reset), so a request answered "no free
/// stream" could reach the workload after all, and a retry a second time.
#[derive(Default)]
struct Room {
    freed: tokio::sync::Notify,
    waiting: AtomicUsize,
}

/// How often a request waiting for a stream slot looks at its key's
/// connections again without being woken.
const RECHECK_FULL: Duration = Duration::from_millis(250);

/// How often a dial waiting for its source's certificate looks again.
const CERTIFICATE_POLL: Duration = Duration::from_millis(20);

/// One request waiting for [`Room`], for as long as it lives.
struct Waiting<'a>(&'a Room);

impl<'a> Waiting<'a> {
    fn new(room: &'a Room) -> Self {
        room.waiting.fetch_add(1, Ordering::SeqCst);
        Waiting(room)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The pool; cheap to clone.
#[derive(Clone)]
pub struct TunnelPool {
    inner: Arc<PoolInner>,
}

struct PoolInner {
    settings: ProxySettings,
    identity: Arc<dyn IdentityProvider>,
    metrics: Metrics,
    table: ConnTable,
    conns: Mutex<FastMap<TunnelKey, Vec<Arc<TunnelConn>>>>,
    /// One dial at a time per key; the last failure, when it came.
    dialing: crate::dial::DialLocks<TunnelKey>,
    /// Where the requests of each key wait for a stream slot.
    rooms: Mutex<FastMap<TunnelKey, Arc<Room>>>,
}

impl TunnelPool {
    pub fn new(
        settings: ProxySettings,
        identity: Arc<dyn IdentityProvider>,
        metrics: Metrics,
        table: ConnTable,
    ) -> Self {
        Self {
            inner: Arc::new(PoolInner {
                settings,
                identity,
                metrics,
                table,
                conns: Mutex::default(),
                dialing: Default::default(),
                rooms: Mutex::default(),
            }),
        }
    }

    /// Sends an HTTP request through the tunnel. The request must already
    /// carry the target header and an absolute URI.
    pub async fn send(
        &self,
        key: &TunnelKey,
        req: Request<Body>,
    ) -> Result<(Response<TunnelBody>, Arc<TlsInfo>), TunnelError> {
        let (parts, body) = req.into_parts();
        let eos = http_body::Body::is_end_stream(&body);
        let (conn, guard, resp, send) = self.open_on(key, parts, eos).await?;
        // The stream counts as open until both its response body and its
        // request body (which may go on after the response) are done.
        let guard = Arc::new(guard);
        // The body goes on while the response comes back (streaming), as
        // long as someone waits for the response or reads it: dropped
        // before (the caller's idle timeout, a route's timeout), the upload
        // stops and the stream is reset, or a body the peer does not read
        // would hold the stream, and the workload's request, for ever.
        // Once the whole response is in, the upload goes on by itself (a
        // caller that sends the rest of its body after an early answer).
        let mut piping = (!eos).then(|| {
            let held = guard.clone();
            AbortOnDropHandle::new(tokio::spawn(async move {
                crate::h2stream::pipe(body, send, h2::Reason::CANCEL, None).await;
                drop(held);
            }))
        });
        let resp = match resp.await {
            Ok(resp) => resp,
            Err(source) => {
                // No answer (the peer refused or reset the stream): the body
                // is let go of before the error returns, so that a retry
                // finds a body nothing read from where it was left.
                if let Some(task) = piping.take() {
                    task.abort();
                    let _ = task.await;
                }
                return Err(TunnelError::Http2 {
                    node: key.node,
                    source,
                });
            }
        };
        // A response of known length is whole once that much came, though
        // its end of stream may come in a frame of its own that an
        // HTTP/1.1 caller's server never polls for.
        let length = resp
            .headers()
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        let resp = resp.map(|recv| {
            let mut upload = piping;
            if (recv.is_end_stream() || length == Some(0))
                && let Some(u) = upload.take()
            {
                u.detach();
            }
            TunnelBody {
                inner: Some(RecvBody::new(recv)),
                _guard: guard,
                upload,
                remaining: length,
                finished: conn.finished.clone(),
            }
        });
        Ok((resp, conn.tls.clone()))
    }

    /// Opens a CONNECT stream to `target` on the peer and returns it as a byte
    /// stream.
    pub async fn connect(
        &self,
        key: &TunnelKey,
        target: SocketAddr,
    ) -> Result<(TunnelStream, Arc<TlsInfo>), TunnelError> {
        self.connect_with(key, target, None).await
    }

    /// [`connect`](Self::connect) for an HTTP/1.1 upgrade: the stream is
    /// marked with the
    /// [`UPGRADE_REQUEST_HEADER`](crate::config::UPGRADE_REQUEST_HEADER)
    /// (`upgrade`, the request's `METHOD path`), so that the peer reads and
    /// polices the request the stream carries (see [`crate::upgrade`]).
    pub async fn connect_with(
        &self,
        key: &TunnelKey,
        target: SocketAddr,
        upgrade: Option<http::HeaderValue>,
    ) -> Result<(TunnelStream, Arc<TlsInfo>), TunnelError> {
        let mut req = Request::builder()
            .method(Method::CONNECT)
            .uri(target.to_string())
            .body(())
            .expect("a socket address is a valid authority");
        if let Some(u) = upgrade {
            req.headers_mut().insert(crate::config::UPGRADE_REQUEST, u);
        }
        // This side reads the reset trailer (see `StreamIo::abort`).
        crate::h2stream::mark_reset(req.headers_mut());
        let (parts, ()) = req.into_parts();
        // The far side answers once its own connect (bounded by the same
        // setting) is done; waiting for a stream slot counts too.
        let timeout = self.inner.settings.connect_timeout() * 2;
        // Finding or dialling a connection has timeouts of its own (a failed
        // dial is a connect failure, retryable); the answer has this one.
        let (conn, guard, resp, send) = self.open_on(key, parts, false).await?;
        let answer = async {
            let resp = resp.await.map_err(|source| {
                if is_refused_stream(&source) {
                    TunnelError::Refused {
                        node: key.node,
                        target,
                        status: "stream refused".into(),
                    }
                } else {
                    TunnelError::Http2 {
                        node: key.node,
                        source,
                    }
                }
            })?;
            Ok::<_, TunnelError>(resp)
        };
        let resp = tokio::time::timeout(timeout, answer).await.map_err(|_| {
            TunnelError::StreamTimeout {
                node: key.node,
                target,
                timeout,
            }
        })??;
        if resp.status() != StatusCode::OK {
            let reason = resp
                .headers()
                .get(crate::config::REASON)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string();
            return Err(TunnelError::Refused {
                node: key.node,
                target,
                status: format!("{} {reason}", resp.status()),
            });
        }
        let peer_reads_reset = resp.headers().contains_key(crate::h2stream::RESET_TRAILER);
        Ok((
            TunnelStream {
                inner: StreamIo::new(send, resp.into_body())
                    .peer_reads_reset_trailer(peer_reads_reset),
                _guard: guard,
            },
            conn.tls.clone(),
        ))
    }

    /// A connection for `key` and a stream opened on it for the request
    /// `parts`. A connection that turns out unable to open streams (the
    /// peer sent GOAWAY as it drains, or the connection failed) leaves the
    /// pool, and the stream is opened once more on another one or a new one:
    /// nothing was sent on the first.
    async fn open_on(
        &self,
        key: &TunnelKey,
        parts: http::request::Parts,
        eos: bool,
    ) -> Result<
        (
            Arc<TunnelConn>,
            StreamGuard,
            h2::client::ResponseFuture,
            h2::SendStream<Bytes>,
        ),
        TunnelError,
    > {
        let mut req = Request::from_parts(parts, ());
        let mut again = true;
        loop {
            let (conn, guard) = self.checkout(key).await?;
            let opened = self.open_stream(&conn, key, req, eos).await;
            // After the stream's wake of the connection task (Finished).
            conn.finished
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clear();
            match opened {
                Ok((resp, send)) => return Ok((conn, guard, resp, send)),
                Err((e, Some(unsent))) if again && conn.is_closed() => {
                    tracing::debug!(node = %key.node, "opening the stream again on another tunnel connection: {e}");
                    req = unsent;
                    again = false;
                }
                Err((e, _)) => return Err(e),
            }
        }
    }

    /// Opens a stream on `conn`, which the pool gave a free slot. A
    /// connection-level failure takes the connection out of the pool; the
    /// request comes back when the connection failed before taking it.
    #[allow(clippy::type_complexity)]
    async fn open_stream(
        &self,
        conn: &TunnelConn,
        key: &TunnelKey,
        req: Request<()>,
        eos: bool,
    ) -> Result<
        (h2::client::ResponseFuture, h2::SendStream<Bytes>),
        (TunnelError, Option<Request<()>>),
    > {
        let unsent = |source: h2::Error| {
            // GOAWAY, or the connection broke: no stream opens on it again
            // (one that is still busy serves its streams to their end).
            if source.is_go_away() || source.is_io() || source.is_remote() {
                conn.open.store(false, Ordering::Relaxed);
                // Room to dial another: the waiters look again.
                conn.room.freed.notify_waiters();
            }
            TunnelError::Unsent {
                node: key.node,
                source,
            }
        };
        // A fresh handle is ready at once (or says the connection failed).
        let mut sender = match conn.sender.clone().ready().await {
            Err(e) => return Err((unsent(e), Some(req))),
            Ok(sender) => sender,
        };
        // The pool took a slot below the peer's limit (`pick`), so the
        // stream opens now; at most it waits in `h2` for a moment while a
        // stream that ended here is still counted there.
        sender.send_request(req, eos).map_err(|e| (unsent(e), None))
    }

    /// Open tunnel connections (for tests and the admin API).
    pub fn connections(&self) -> usize {
        self.inner
            .conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .map(Vec::len)
            .sum()
    }

    /// A connection of `key` with a free stream slot, dialling one if the key
    /// may have more; when it may not, waits for a slot to free up to the
    /// connect timeout (then `Busy`: nothing was sent).
    async fn checkout(
        &self,
        key: &TunnelKey,
    ) -> Result<(Arc<TunnelConn>, StreamGuard), TunnelError> {
        if let Some(c) = self.pick(key) {
            return Ok(c);
        }
        let wait = self.inner.settings.connect_timeout();
        let deadline = Instant::now() + wait;
        let room = self.room_of(key);
        // Counted while this request waits, also when it is dropped (its
        // caller went away) while waiting.
        let _waiting = Waiting::new(&room);
        let mut first = true;
        loop {
            // Registered before looking, so that a slot freed in between
            // is not missed.
            let freed = room.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            // Woken while the key is still full, a slot is all there is to
            // look for: no dial lock, no dial.
            let found = if first || !self.full(key) {
                first = false;
                self.checkout_or_dial(key).await?
            } else {
                self.pick(key)
            };
            if let Some(c) = found {
                return Ok(c);
            }
            // Woken by a stream's or a connection's end, or a new
            // connection; and looking again now and then regardless: a
            // peer's GOAWAY on a full key's connections wakes nobody.
            let look_again = (Instant::now() + RECHECK_FULL).min(deadline);
            if tokio::time::timeout_at(look_again, freed).await.is_err() && look_again >= deadline {
                return Err(TunnelError::Busy {
                    node: key.node,
                    waited: wait,
                });
            }
        }
    }

    /// The waiting room of `key`'s requests.
    fn room_of(&self, key: &TunnelKey) -> Arc<Room> {
        let mut rooms = self.inner.rooms.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(r) = rooms.get(key) {
            return r.clone();
        }
        // Keys with neither connections nor waiters go (peers and
        // identities come and go; a new key is rare enough to sweep here).
        rooms.retain(|_, r| Arc::strong_count(r) > 1);
        rooms.entry(key.clone()).or_default().clone()
    }

    /// Whether every connection of `key` that can still open streams is in
    /// the pool and no more may open. A connection whose peer said GOAWAY
    /// (or that failed) is found out here and leaves the pool: its streams
    /// may last an hour, and it must not keep the key full meanwhile.
    fn full(&self, key: &TunnelKey) -> bool {
        let mut conns = self.inner.conns.lock().unwrap_or_else(|e| e.into_inner());
        let Some(list) = conns.get_mut(key) else {
            return false;
        };
        let mut cx = Context::from_waker(std::task::Waker::noop());
        for c in list.iter() {
            // A fresh handle is ready at once, or fails on a connection
            // that can open no more streams.
            if let Poll::Ready(Err(_)) = c.sender.clone().poll_ready(&mut cx) {
                c.open.store(false, Ordering::Relaxed);
            }
        }
        list.retain(|c| !c.is_closed());
        list.len() >= self.inner.settings.tunnel_max_connections
    }

    /// A connection with a free slot, or a new one; `None` when every
    /// connection of the key is full and no more may open, or a dial failed
    /// while the key still has connections (their slots will free).
    async fn checkout_or_dial(
        &self,
        key: &TunnelKey,
    ) -> Result<Option<(Arc<TunnelConn>, StreamGuard)>, TunnelError> {
        if let Some(c) = self.pick(key) {
            return Ok(Some(c));
        }
        let turn = self.inner.dialing.turn(key).await;
        // Someone else may have dialled while we waited.
        if let Some(c) = self.pick(key) {
            return Ok(Some(c));
        }
        if self.full(key) {
            return Ok(None);
        }
        // A peer with working connections is there: a failed dial to it
        // (its accept queue full, say) is no reason to fail a request that
        // can wait for one of their slots.
        let has_conns = || {
            let conns = self.inner.conns.lock().unwrap_or_else(|e| e.into_inner());
            conns.get(key).is_some_and(|l| !l.is_empty())
        };
        // Or failed: the requests queued behind a dial to a peer that is
        // gone get its failure at once rather than dialling again one after
        // another (each waiting out the connect timeout).
        if let Some(f) = turn.failed_meanwhile() {
            if has_conns() {
                return Ok(None);
            }
            return Err(TunnelError::DialFailed {
                node: key.node,
                reason: f.reason.clone(),
                unreachable: f.unreachable,
            });
        }
        // A task of its own, which this request waits for: a request given
        // up on meanwhile (its route's per-try timeout, its caller gone)
        // must not cut the dial short, or no dial to a slow peer would ever
        // end, and a failed one would never be noted for the requests after
        // it. The dial's own timeouts bound it.
        let dial = tokio::spawn(self.clone().dial_and_pool(key.clone(), turn));
        let (conn, guard) = match dial.await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                if has_conns() {
                    tracing::debug!(node = %key.node, "waiting for a slot on the open tunnel connections: {e}");
                    return Ok(None);
                }
                return Err(e);
            }
            Err(e) => {
                return Err(TunnelError::DialFailed {
                    node: key.node,
                    reason: format!("the dial's task failed: {e}"),
                    unreachable: false,
                });
            }
        };
        Ok(Some((conn, guard)))
    }

    /// Dials `key` and pools the connection with a stream taken for the
    /// request that dialled it (before the waiters woken here could fill
    /// it; given back with the task's output if that request is gone), or
    /// notes the failure, holding the key's turn to dial throughout.
    async fn dial_and_pool(
        self,
        key: TunnelKey,
        mut turn: crate::dial::DialTurn,
    ) -> Result<(Arc<TunnelConn>, StreamGuard), TunnelError> {
        let dialled = self.dial(&key).await;
        turn.ended(
            dialled
                .as_ref()
                .err()
                .map(|e| (e.to_string(), e.is_unreachable())),
        );
        let conn = dialled?;
        let guard = take_stream(&conn);
        self.inner
            .conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(key)
            .or_default()
            .push(conn.clone());
        // Slots for the requests waiting on this key.
        if conn.room.waiting.load(Ordering::SeqCst) > 0 {
            conn.room.freed.notify_waiters();
        }
        Ok((conn, guard))
    }

    /// The least busy open connection with a free stream slot: below our
    /// limit and the peer's (its SETTINGS, when it allows fewer: another
    /// connection rather than a queue inside this one).
    fn pick(&self, key: &TunnelKey) -> Option<(Arc<TunnelConn>, StreamGuard)> {
        let mut conns = self.inner.conns.lock().unwrap_or_else(|e| e.into_inner());
        let list = conns.get_mut(key)?;
        list.retain(|c| !c.is_closed());
        let max = self.inner.settings.tunnel_max_streams as usize;
        // An idle connection has room whatever the peer allows (above 0);
        // asking h2 takes its lock, so only for one carrying streams.
        let room = |c: &TunnelConn| {
            let n = c.streams.load(Ordering::SeqCst);
            n < max && (n == 0 || n < c.sender.current_max_send_streams())
        };
        let best = list
            .iter()
            .filter(|c| room(c))
            .min_by_key(|c| c.streams.load(Ordering::Relaxed))?
            .clone();
        let guard = take_stream(&best);
        Some((best, guard))
    }

    async fn dial(&self, key: &TunnelKey) -> Result<Arc<TunnelConn>, TunnelError> {
        let s = &self.inner.settings;
        let fail = |reason: &str| {
            self.inner
                .metrics
                .tls_handshake_failures
                .get_or_create(&TlsFailureLabels {
                    direction: Direction::Outbound,
                    reason: reason.into(),
                })
                .inc();
        };
        // A certificate on its way (a new pod's first connections, an
        // agent that just started) is waited for, up to the connect
        // timeout, rather than failing the request at once.
        let deadline = tokio::time::Instant::now() + s.connect_timeout();
        let config = loop {
            match self.inner.identity.client_config(&key.source, &key.peer) {
                Ok(c) => break c,
                Err(_)
                    if self.inner.identity.awaiting(&key.source)
                        && tokio::time::Instant::now() < deadline =>
                {
                    tokio::time::sleep(CERTIFICATE_POLL).await;
                }
                Err(e) => {
                    return Err(TunnelError::Identity {
                        source_id: key.source.clone(),
                        peer: key.peer.clone(),
                        reason: e.to_string(),
                    });
                }
            }
        };
        let name =
            self.inner
                .identity
                .server_name(&key.peer)
                .map_err(|e| TunnelError::Identity {
                    source_id: key.source.clone(),
                    peer: key.peer.clone(),
                    reason: e.to_string(),
                })?;
        // The wait for the certificate counts against the connect timeout.
        let left = deadline
            .saturating_duration_since(tokio::time::Instant::now())
            .max(Duration::from_millis(1));
        let tcp = match tokio::time::timeout(
            left,
            crate::connect::connect(key.node, s.socket_mark, left),
        )
        .await
        {
            Ok(Ok(t)) => t,
            Ok(Err(source)) => {
                return Err(TunnelError::Connect {
                    node: key.node,
                    source,
                });
            }
            Err(_) => {
                return Err(TunnelError::ConnectTimeout {
                    node: key.node,
                    timeout: s.connect_timeout(),
                });
            }
        };
        let _ = tcp.set_nodelay(true);
        let handle = Arc::new(self.inner.table.open(
            ConnKind::TunnelOut,
            ConnMeta {
                source_identity: Some(key.source.clone()),
                destination_addr: Some(key.node),
                destination_identity: Some(key.peer.clone()),
                ..Default::default()
            },
        ));
        let connector = tokio_rustls::TlsConnector::from(config);
        let tls = match tokio::time::timeout(
            s.tls_handshake_timeout(),
            connector.connect(name, Counted::new(tcp, handle.clone())),
        )
        .await
        {
            Ok(Ok(t)) => t,
            Ok(Err(e)) => {
                let reason = crate::inbound::classify_tls_error(&e);
                fail(reason);
                return Err(TunnelError::Handshake {
                    node: key.node,
                    peer: key.peer.clone(),
                    reason: e.to_string(),
                });
            }
            Err(_) => {
                fail("timeout");
                return Err(TunnelError::Handshake {
                    node: key.node,
                    peer: key.peer.clone(),
                    reason: format!("no handshake within {:?}", s.tls_handshake_timeout()),
                });
            }
        };
        let (_, session) = tls.get_ref();
        if session.alpn_protocol() != Some(b"h2") {
            fail("alpn");
            return Err(TunnelError::Handshake {
                node: key.node,
                peer: key.peer.clone(),
                reason: "the peer did not agree to ALPN h2".into(),
            });
        }
        // The verifier in the client configuration already checked the peer
        // identity; read it back for the connection table.
        let (peer_id, info) = self.inner.identity.peer(session).map_err(|e| {
            fail("peer_identity");
            TunnelError::Handshake {
                node: key.node,
                peer: key.peer.clone(),
                reason: e.to_string(),
            }
        })?;
        if peer_id != key.peer {
            fail("peer_identity");
            return Err(TunnelError::Handshake {
                node: key.node,
                peer: key.peer.clone(),
                reason: format!("peer presented {peer_id}"),
            });
        }
        handle.update(|m| m.tls = Some(info.clone()));
        let (io, batch) = BatchIo::new(tls);
        let (sender, mut connection) = h2::client::Builder::new()
            // Nothing in the tunnel is pushed; a peer that tries would only
            // pile up promised streams.
            .enable_push(false)
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(connection_window(s.tunnel_max_streams))
            .max_header_list_size(s.max_header_bytes)
            .max_send_buffer_size(SEND_BUFFER)
            .handshake::<_, Bytes>(io)
            .await
            // Before any stream: nothing was sent, and the peer is not
            // there for it (it went away in the middle of the dial).
            .map_err(|source| {
                fail("http2");
                TunnelError::Handshake {
                    node: key.node,
                    peer: key.peer.clone(),
                    reason: format!("HTTP/2 preface: {source}"),
                }
            })?;
        let pings = connection
            .ping_pong()
            .expect("the first call has the ping handle");
        let node = key.node;
        let open = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let streams = Arc::new(AtomicUsize::new(0));
        let stall = batch.stall();
        let stall_limit = s.tunnel_write_stall_timeout();
        let driver = FlushAtEnd::new(connection, batch, streams.clone());
        let still_open = open.clone();
        let room = self.room_of(key);
        let room_at_end = room.clone();
        let (settled_tx, settled) = tokio::sync::oneshot::channel();
        // Why the connection ended, and its label for the handshake failure
        // metric: a dial waiting for the peer's SETTINGS learns it (in TLS
        // 1.3 a server's refusal of our certificate comes after our side
        // of the handshake is done, on the connection's first read).
        let (ended_tx, ended) = tokio::sync::oneshot::channel::<(String, &'static str)>();
        tokio::spawn(async move {
            let why = tokio::select! {
                biased;
                r = driver => r.err().map(|e| {
                    tracing::debug!(%node, "tunnel connection ended: {e}");
                    let label = match e.get_io() {
                        Some(io) => crate::inbound::classify_tls_error(io),
                        None if e.is_go_away() => "goaway",
                        None => "http2",
                    };
                    (e.to_string(), label)
                }),
                why = keep_alive(pings, Some(settled_tx)) => {
                    tracing::debug!(%node, "closing the tunnel connection: {why}");
                    Some((why, "http2_settings"))
                }
                () = stall.exceeded(stall_limit) => {
                    let why = format!("the peer has read nothing for {stall_limit:?}");
                    tracing::warn!(%node, "closing a tunnel connection: {why}");
                    Some((why, "stall"))
                }
            };
            let _ = ended_tx
                .send(why.unwrap_or_else(|| ("the peer closed the connection".into(), "eof")));
            still_open.store(false, Ordering::Relaxed);
            // Room to dial another: the waiters look again.
            room_at_end.freed.notify_waiters();
            drop(handle);
        });
        // The peer's SETTINGS (its stream limit among them) come before its
        // answer to a first PING: the connection takes streams only once it
        // is known how many (until then h2 assumes no limit, and streams
        // over the peer's would wait in h2's own queue).
        match tokio::time::timeout(s.tls_handshake_timeout(), settled).await {
            Ok(Ok(())) => {}
            // The connection ended first: its task says why at once.
            Ok(Err(_)) => {
                let (why, label) = ended
                    .await
                    .unwrap_or_else(|_| ("the connection's task ended".into(), "http2_settings"));
                fail(label);
                return Err(TunnelError::Handshake {
                    node: key.node,
                    peer: key.peer.clone(),
                    reason: format!(
                        "the connection ended before the peer's HTTP/2 settings: {why}"
                    ),
                });
            }
            Err(_) => {
                fail("http2_settings");
                return Err(TunnelError::Handshake {
                    node: key.node,
                    peer: key.peer.clone(),
                    reason: "the peer did not answer a first HTTP/2 PING within the handshake \
                             timeout"
                        .into(),
                });
            }
        }
        let conn = Arc::new(TunnelConn {
            sender,
            streams,
            opened: Default::default(),
            born: Instant::now(),
            last_used: Mutex::new(Instant::now()),
            tls: Arc::new(info),
            open,
            room,
            finished: Finished::default(),
        });
        self.spawn_reaper(key.clone(), Arc::downgrade(&conn));
        tracing::debug!(source = %key.source, peer = %key.peer, %node, "tunnel connection open");
        Ok(conn)
    }

    /// Drops the connection from the pool once it has had no stream for the
    /// idle timeout; with its last sender gone, `h2` closes it. A connection
    /// older than the settings' `tunnel_max_age_ms` (new ones present the current
    /// certificate and meet the current trust bundle), past its peer
    /// certificate's expiry or near the end of its stream IDs leaves the
    /// pool too, and closes once its streams end.
    fn spawn_reaper(&self, key: TunnelKey, conn: std::sync::Weak<TunnelConn>) {
        let pool = Arc::downgrade(&self.inner);
        let idle = self.inner.settings.tunnel_idle_timeout();
        // Looked at every half idle timeout, and at least every 30 s for
        // the age and the certificate (the idle timeout may be off).
        let every = (idle / 2).clamp(Duration::from_millis(50), Duration::from_secs(30));
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let (Some(c), Some(pool)) = (conn.upgrade(), pool.upgrade()) else {
                    return;
                };
                let quiet = c.streams.load(Ordering::Relaxed) == 0
                    && c.last_used
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .elapsed()
                        >= idle;
                let retired = retired(
                    c.born.elapsed(),
                    pool.settings.tunnel_max_age(),
                    c.opened.load(Ordering::Relaxed),
                    c.tls.peer_cert_not_after,
                    unix_now(),
                );
                if quiet || retired || c.is_closed() {
                    {
                        let mut conns = pool.conns.lock().unwrap_or_else(|e| e.into_inner());
                        if let Some(list) = conns.get_mut(&key) {
                            list.retain(|x| !Arc::ptr_eq(x, &c));
                            if list.is_empty() {
                                conns.remove(&key);
                            }
                        }
                    }
                    // Room to dial another: the waiters look again.
                    c.room.freed.notify_waiters();
                    return;
                }
            }
        });
    }
}

/// Streams after which a tunnel connection takes no new ones: a client's
/// stream IDs (odd, 31 bits) allow about 2^30.
const RETIRE_AFTER_STREAMS: u64 = 1 << 29;

/// Whether a tunnel connection of `age` that opened `opened` streams takes
/// no new ones: past the settings' `max_age`, its stream IDs nearly spent,
/// or its peer's certificate expired by `unix_now` (certificates are
/// short-lived instead of revoked: a connection must not outlive the one
/// the peer proved itself with).
fn retired(
    age: Duration,
    max_age: Duration,
    opened: u64,
    peer_not_after: Option<u64>,
    unix_now: u64,
) -> bool {
    age >= max_age
        || opened >= RETIRE_AFTER_STREAMS
        || peer_not_after.is_some_and(|t| unix_now >= t)
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

fn take_stream(c: &Arc<TunnelConn>) -> StreamGuard {
    c.streams.fetch_add(1, Ordering::SeqCst);
    c.opened.fetch_add(1, Ordering::Relaxed);
    *c.last_used.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
    StreamGuard {
        streams: c.streams.clone(),
        room: c.room.clone(),
    }
}

/// Initial HTTP/2 flow-control window of tunnel streams, on the side that
/// receives (responses here, requests on the inbound side): what a peer can
/// make the proxy hold for one stream that nobody has read yet. A stream's
/// window still lets one stream move about 1.5 GB/s at a 0.3 ms round trip.
pub const STREAM_WINDOW: u32 = 512 * 1024;
/// Initial HTTP/2 flow-control window of a whole connection carrying at
/// most `streams` streams at once: their windows' worth (up to the largest
/// HTTP/2 allows), so that it never runs out before theirs. A stream whose
/// reader stopped (a WebSocket or a TCP connection whose destination reads
/// nothing, a download its client does not read) holds its own window until
/// it ends, however many do: with a connection window of a few streams'
/// worth, that many stalled streams stalled every other stream between the
/// same workload and node. What the proxy holds unread on a connection is
/// bounded all the same: [`STREAM_WINDOW`] per stream, `streams` streams
/// (and [`SEND_BUFFER`] per stream queued to send).
pub const fn connection_window(streams: u32) -> u32 {
    let w = streams as u64 * STREAM_WINDOW as u64;
    if w > i32::MAX as u64 {
        i32::MAX as u32
    } else {
        w as u32
    }
}
/// The most streams a captured HTTP/2 client's connection carries at once
/// (hyper's own default, set here so that the connection's window follows
/// it).
pub const CAPTURED_MAX_STREAMS: u32 = 200;
/// The connection window of a workload's HTTP/2 connection, whose streams
/// the workload bounds: 1,000 streams' worth, as a tunnel connection's.
pub const WORKLOAD_CONNECTION_WINDOW: u32 = connection_window(1_000);
/// Most bytes queued per stream before its writer waits.
pub const SEND_BUFFER: usize = 1024 * 1024;
/// A connection whose peer answers no ping within this time is closed.
const PING_INTERVAL: Duration = Duration::from_secs(30);
const PING_TIMEOUT: Duration = Duration::from_secs(10);

/// Pings the peer every [`PING_INTERVAL`]; ends (saying why) when it stops
/// answering. With `settled`, the first ping goes at once and its answer is
/// reported there.
pub(crate) async fn keep_alive(
    mut pings: h2::PingPong,
    mut settled: Option<tokio::sync::oneshot::Sender<()>>,
) -> String {
    loop {
        if settled.is_none() {
            tokio::time::sleep(PING_INTERVAL).await;
        }
        // A failed ping means the connection is going away: its own future
        // ends and says why.
        if pings.send_ping(h2::Ping::opaque()).is_err() {
            return std::future::pending::<String>().await;
        }
        match tokio::time::timeout(PING_TIMEOUT, std::future::poll_fn(|cx| pings.poll_pong(cx)))
            .await
        {
            Ok(Ok(_)) => {
                if let Some(tx) = settled.take() {
                    let _ = tx.send(());
                }
            }
            Ok(Err(_)) => return std::future::pending::<String>().await,
            Err(_) => return format!("the peer answered no ping within {PING_TIMEOUT:?}"),
        }
    }
}

/// A response body from the tunnel; its stream counts as open until the
/// body is dropped (and the request body is sent).
pub struct TunnelBody {
    /// `None` once dropped.
    inner: Option<RecvBody>,
    _guard: Arc<StreamGuard>,
    // The request body's upload: it stops if the response is dropped
    // before its end, and goes on by itself once the response is whole.
    upload: Option<AbortOnDropHandle<()>>,
    // Of a response of known length, the bytes still to come.
    remaining: Option<u64>,
    finished: Finished,
}

impl http_body::Body for TunnelBody {
    type Data = Bytes;
    type Error = h2::Error;
    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, h2::Error>>> {
        let this = self.get_mut();
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(None);
        };
        let r = Pin::new(&mut *inner).poll_frame(cx);
        let whole = match &r {
            Poll::Ready(None) => true,
            Poll::Ready(Some(Ok(frame))) => {
                if let (Some(left), Some(data)) = (this.remaining.as_mut(), frame.data_ref()) {
                    *left = left.saturating_sub(data.len() as u64);
                }
                this.remaining == Some(0) || inner.is_end_stream()
            }
            _ => false,
        };
        if whole && let Some(u) = this.upload.take() {
            u.detach();
        }
        r
    }
    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(RecvBody::is_end_stream)
    }
}

impl Drop for TunnelBody {
    fn drop(&mut self) {
        // Unwinding: no lock of h2's (it may be poisoned) from here.
        if std::thread::panicking() {
            return;
        }
        // Read to its end: let go of at the connection's next stream
        // (Finished). Any other is dropped now (cancelled if still open).
        if let Some(inner) = self.inner.take()
            && http_body::Body::is_end_stream(&inner)
        {
            self.finished
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(inner);
        }
    }
}

pin_project_lite::pin_project! {
    /// A CONNECT stream as a byte stream.
    pub struct TunnelStream {
        #[pin]
        inner: StreamIo,
        _guard: StreamGuard,
    }
}

impl TunnelStream {
    /// Ends the stream as a reset, after what was written (see
    /// [`StreamIo::abort`]), and when that went as a trailer keeps the
    /// stream until the far side ends it too or `limit` passes (see
    /// [`StreamIo::linger`]). A stream whose sending half was over already
    /// is let go at once: the far side learns from its cancel, rather than
    /// go on sending for `limit` into a caller that is gone.
    pub async fn abort(&mut self, limit: Duration) {
        if self.inner.abort() {
            self.inner.linger(limit).await;
        }
    }

    /// Ends the stream cleanly (a relay that went idle): the end of stream,
    /// then the stream is kept until the far side ends it too, at most
    /// `limit`; dropped at once it would be cancelled, which the far side
    /// takes for a reset.
    pub async fn finish(&mut self, limit: Duration) {
        use tokio::io::AsyncWriteExt as _;
        let _ = self.inner.shutdown().await;
        self.inner.linger(limit).await;
    }
}

impl tokio::io::AsyncRead for TunnelStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        self.project().inner.poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for TunnelStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.project().inner.poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.project().inner.poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.project().inner.poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connection_retires_by_age_stream_ids_or_its_peers_expired_certificate() {
        let (hour, now) = (Duration::from_secs(3600), 1_000_000);
        assert!(!retired(Duration::ZERO, hour, 0, Some(now + 1), now));
        assert!(!retired(Duration::ZERO, hour, 0, None, now));
        assert!(retired(hour, hour, 0, None, now), "age");
        assert!(retired(
            Duration::ZERO,
            hour,
            RETIRE_AFTER_STREAMS,
            None,
            now
        ));
        assert!(retired(Duration::ZERO, hour, 0, Some(now), now), "expired");
    }

    #[test]
    fn only_a_node_proxy_out_of_reach_counts_as_an_unreachable_endpoint() {
        let node: SocketAddr = "127.0.0.1:15008".parse().unwrap();
        let peer = SpiffeId::new("cluster.local", "shop", "cart").unwrap();
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        let down = [
            TunnelError::Connect {
                node,
                source: refused,
            },
            TunnelError::ConnectTimeout {
                node,
                timeout: Duration::from_secs(1),
            },
            TunnelError::Handshake {
                node,
                peer: peer.clone(),
                reason: "bad certificate".into(),
            },
        ];
        for e in &down {
            assert!(e.is_unreachable() && e.is_connect_failure(), "{e}");
        }
        // There, but busy, closing or refusing this stream; or a local
        // problem: retryable, yet no reason to keep requests away from it.
        let there = [
            TunnelError::Busy {
                node,
                waited: Duration::from_secs(1),
            },
            TunnelError::Unsent {
                node,
                source: h2::Error::from(h2::Reason::REFUSED_STREAM),
            },
            TunnelError::Http2 {
                node,
                source: h2::Error::from(h2::Reason::REFUSED_STREAM),
            },
            TunnelError::Identity {
                source_id: peer.clone(),
                peer: peer.clone(),
                reason: "no certificate yet".into(),
            },
            TunnelError::Connect {
                node,
                source: std::io::Error::from_raw_os_error(libc::EMFILE),
            },
        ];
        for e in &there {
            assert!(!e.is_unreachable() && e.is_connect_failure(), "{e}");
        }
    }

    /// The error a stream gets from a peer that answers its HEADERS with
    /// `frame` (raw HTTP/2 over loopback: no HTTP/2 server sends a GOAWAY
    /// below a stream it has read on demand).
    async fn stream_error_after(frame: &'static [u8]) -> h2::Error {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (mut tcp, _) = listener.accept().await.unwrap();
            // Our SETTINGS (none), then read until the client's HEADERS.
            tcp.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0]).await.unwrap();
            let mut buf = vec![0; 24];
            tcp.read_exact(&mut buf).await.unwrap();
            assert_eq!(&buf[..], b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
            loop {
                let mut head = [0u8; 9];
                tcp.read_exact(&mut head).await.unwrap();
                let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
                let mut payload = vec![0; len];
                tcp.read_exact(&mut payload).await.unwrap();
                if head[3] == 1 {
                    break;
                }
            }
            tcp.write_all(frame).await.unwrap();
            // Held open: the answer is the frame, not a closed socket.
            tokio::time::sleep(Duration::from_secs(5)).await;
        });
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (mut send, conn) = h2::client::handshake(tcp).await.unwrap();
        tokio::spawn(conn);
        let req = Request::builder()
            .method(Method::POST)
            .uri("http://10.0.0.1:8080/orders")
            .body(())
            .unwrap();
        let (resp, _body) = send.send_request(req, false).unwrap();
        let e = tokio::time::timeout(Duration::from_secs(5), resp)
            .await
            .expect("the peer's frame ends the stream")
            .expect_err("no answer");
        server.abort();
        e
    }

    /// A peer proxy draining (graceful GOAWAY) did nothing with a stream
    /// above its last stream: safe to send again, as a refused stream is; a
    /// reset with another code, or a GOAWAY with an error, may have cut a
    /// request the workload had begun.
    #[tokio::test]
    async fn a_stream_above_a_graceful_goaways_last_stream_is_retryable() {
        let node: SocketAddr = "127.0.0.1:15008".parse().unwrap();
        // GOAWAY, last stream 0, then the error code.
        const GOAWAY_NO_ERROR: &[u8] = &[0, 0, 8, 7, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        const GOAWAY_INTERNAL: &[u8] = &[0, 0, 8, 7, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
        let retryable = async |frame| {
            let source = stream_error_after(frame).await;
            let e = TunnelError::Http2 { node, source };
            (e.is_connect_failure(), e.to_string())
        };
        let (yes, why) = retryable(GOAWAY_NO_ERROR).await;
        assert!(yes, "graceful GOAWAY: {why}");
        // RST_STREAM on stream 1.
        let (yes, why) = retryable(&[0, 0, 4, 3, 0, 0, 0, 0, 1, 0, 0, 0, 7]).await;
        assert!(yes, "REFUSED_STREAM: {why}");
        let (yes, why) = retryable(&[0, 0, 4, 3, 0, 0, 0, 0, 1, 0, 0, 0, 2]).await;
        assert!(!yes, "INTERNAL_ERROR reset: {why}");
        let (yes, why) = retryable(GOAWAY_INTERNAL).await;
        assert!(!yes, "GOAWAY with INTERNAL_ERROR: {why}");
    }
}
