//! HTTP/2 streams of the tunnel client, used directly through `h2`: a
//! request body piped into a stream with flow control, a response as an
//! `http_body::Body`, and a `CONNECT` stream as a byte stream.
//!
//! Using `h2` without hyper's client saves a task and two channel hops per
//! request: the task serving the caller's connection waits on the stream
//! itself.

use std::{
    future::poll_fn,
    io,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll, ready},
    time::Duration,
};

use bytes::{Buf, Bytes};
use h2::{Reason, RecvStream, SendStream};
use http_body::{Body as _, Frame};

use crate::body::Body;

/// Sends `body` on `send`: data as the peer's window allows, then trailers
/// or the end of the stream. Stops when the peer resets the stream. A body
/// that fails resets the stream with the HTTP/2 reason its error carries (a
/// workload's own stream reset), else with `on_error`. A peer that gives
/// the stream no room for `idle`, when given, gets it reset (`CANCEL`): one
/// that never opens its window must not hold the task, and the body's
/// source (a workload's connection), for ever. (The caller's side needs no
/// such limit: its exchange's own timers answer the caller and drop the
/// pipe.)
pub async fn pipe(
    mut body: Body,
    mut send: SendStream<Bytes>,
    on_error: Reason,
    idle: Option<Duration>,
) {
    loop {
        let frame = tokio::select! {
            biased;
            reset = poll_fn(|cx| send.poll_reset(cx)) => {
                tracing::debug!("body not sent further: stream reset ({reset:?})");
                return;
            }
            f = poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)) => f,
        };
        let frame = match frame {
            None => {
                let _ = send.send_data(Bytes::new(), true);
                return;
            }
            Some(Err(e)) => {
                tracing::debug!("body failed: {e}");
                send.send_reset(reset_reason(&*e).unwrap_or(on_error));
                return;
            }
            Some(Ok(f)) => f,
        };
        match frame.into_data() {
            Ok(data) => {
                let eos = body.is_end_stream();
                match send_data(&mut send, data, eos, idle).await {
                    Err(SendFailed::NoRoom) => {
                        tracing::debug!("body not sent further: no room for {idle:?}");
                        send.send_reset(Reason::CANCEL);
                        return;
                    }
                    Err(SendFailed::Stream(e)) => {
                        tracing::debug!("body not sent further: {e}");
                        return;
                    }
                    Ok(()) if eos => return,
                    Ok(()) => {}
                }
            }
            Err(frame) => {
                if let Ok(mut trailers) = frame.into_trailers() {
                    // What a trailer section may not carry (hyper's HTTP/1.1
                    // server passes a caller's on as they came).
                    crate::h1client::keep_trailer_fields(&mut trailers);
                    // Refused all the same: the stream must still end, or
                    // the far side waits for it.
                    if let Err(e) = send.send_trailers(trailers) {
                        tracing::debug!("trailers not sent: {e}");
                        send.send_reset(Reason::INTERNAL_ERROR);
                    }
                    return;
                }
            }
        }
    }
}

/// The HTTP/2 reason in `e` or its sources, if one is a stream reset.
fn reset_reason(e: &(dyn std::error::Error + 'static)) -> Option<Reason> {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(r) = err.downcast_ref::<h2::Error>().and_then(h2::Error::reason) {
            return Some(r);
        }
        cur = err.source();
    }
    None
}

/// Why [`send_data`] stopped.
#[derive(Debug)]
enum SendFailed {
    Stream(h2::Error),
    /// The peer gave the stream no room for the idle timeout.
    NoRoom,
}

impl From<h2::Error> for SendFailed {
    fn from(e: h2::Error) -> Self {
        SendFailed::Stream(e)
    }
}

/// Sends `data` in pieces the peer has room for, waiting at most `idle`
/// (when given) for each.
async fn send_data(
    send: &mut SendStream<Bytes>,
    mut data: Bytes,
    eos: bool,
    idle: Option<Duration>,
) -> Result<(), SendFailed> {
    if data.is_empty() {
        if eos {
            send.send_data(data, true)?;
        }
        return Ok(());
    }
    while !data.is_empty() {
        send.reserve_capacity(data.len());
        // The timer only when the room is not there at once (the usual
        // case on a stream whose window is open).
        let mut timer: Option<Pin<Box<tokio::time::Sleep>>> = None;
        let room = poll_fn(|cx| {
            if let Poll::Ready(r) = send.poll_capacity(cx) {
                return Poll::Ready(Ok(r));
            }
            let Some(idle) = idle else {
                return Poll::Pending;
            };
            let t = timer.get_or_insert_with(|| Box::pin(tokio::time::sleep(idle)));
            ready!(t.as_mut().poll(cx));
            Poll::Ready(Err(SendFailed::NoRoom))
        })
        .await?;
        let room = match room {
            Some(r) => r?,
            None => return Err(h2::Error::from(Reason::STREAM_CLOSED).into()),
        };
        if room == 0 {
            continue;
        }
        let chunk = data.split_to(room.min(data.len()));
        send.send_data(chunk, eos && data.is_empty())?;
    }
    Ok(())
}

/// Reads the next DATA frame of `recv`, giving its room back to the peer.
fn poll_data(
    recv: &mut RecvStream,
    cx: &mut Context<'_>,
) -> Poll<Option<Result<Bytes, h2::Error>>> {
    let r = ready!(recv.poll_data(cx));
    if let Some(Ok(b)) = &r {
        let _ = recv.flow_control().release_capacity(b.len());
    }
    Poll::Ready(r)
}

/// A stream's body (a response's on the client side, a request's on the
/// server side).
pub struct RecvBody {
    recv: RecvStream,
    trailers_done: bool,
}

impl RecvBody {
    pub fn new(recv: RecvStream) -> Self {
        Self {
            recv,
            trailers_done: false,
        }
    }
}

impl http_body::Body for RecvBody {
    type Data = Bytes;
    type Error = h2::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        if self.trailers_done {
            return Poll::Ready(None);
        }
        match ready!(poll_data(&mut self.recv, cx)) {
            Some(Ok(b)) => return Poll::Ready(Some(Ok(Frame::data(b)))),
            Some(Err(e)) => return Poll::Ready(Some(Err(e))),
            None => {}
        }
        let t = ready!(self.recv.poll_trailers(cx));
        self.trailers_done = true;
        Poll::Ready(match t {
            // No `sluice-` field crosses in a trailer section either: the
            // far side's workload must not read a caller's forged identity
            // there (HTTP/2 workloads get trailers as they come).
            Ok(Some(mut t)) => {
                crate::body::remove_mesh_headers(&mut t);
                Some(Ok(Frame::trailers(t)))
            }
            Ok(None) => None,
            Err(e) => Some(Err(e)),
        })
    }

    fn is_end_stream(&self) -> bool {
        self.trailers_done || self.recv.is_end_stream()
    }
}

/// Both halves of a `CONNECT` stream as one byte stream.
pub struct StreamIo {
    send: SendStream<Bytes>,
    recv: RecvStream,
    /// What was read from a DATA frame and not yet returned.
    pending: Bytes,
    /// Dropped before its end of stream was sent: end it cleanly (true), or
    /// let `h2` cancel it, which discards what is still queued (false).
    end_on_drop: bool,
    /// The peer's `RST_STREAM(CANCEL)` reads as the end of what comes (for
    /// the HTTP/1.1 server of an upgrade stream, until the switch: see
    /// [`Switched`]) rather than as a reset.
    cancel_reads_as_end: Arc<AtomicBool>,
    /// The far side said (the [`RESET_TRAILER`] header on the `CONNECT` or
    /// its answer) that it reads the reset trailer; otherwise an abort is a
    /// `RST_STREAM`.
    peer_reads_reset: bool,
    ended: bool,
}

impl StreamIo {
    /// A stream that a drop cancels (the tunnel client's: whoever drops it
    /// early gave up on it).
    pub fn new(send: SendStream<Bytes>, recv: RecvStream) -> Self {
        Self {
            send,
            recv,
            pending: Bytes::new(),
            end_on_drop: false,
            cancel_reads_as_end: Arc::new(AtomicBool::new(false)),
            peer_reads_reset: false,
            ended: false,
        }
    }

    /// A stream that a drop ends after what was written to it (the inbound
    /// side's: an HTTP/1.1 server done with its one exchange drops its
    /// connection without shutting it down, and its answer must still
    /// arrive).
    pub fn ending_on_drop(send: SendStream<Bytes>, recv: RecvStream) -> Self {
        let mut io = Self::new(send, recv);
        io.end_on_drop = true;
        io.cancel_reads_as_end = Arc::new(AtomicBool::new(true));
        io
    }

    /// The inbound side of an opaque TCP stream: a drop ends it after what
    /// was written, and the caller's side giving it up
    /// (`RST_STREAM(CANCEL)`: its client reset, its relay broke) reads as a
    /// reset, so that the workload is not told the upload ended cleanly.
    pub fn relaying(send: SendStream<Bytes>, recv: RecvStream) -> Self {
        let mut io = Self::new(send, recv);
        io.end_on_drop = true;
        io
    }

    /// Whether the far side reads the reset trailer (see [`Self::abort`]).
    pub fn peer_reads_reset_trailer(mut self, yes: bool) -> Self {
        self.peer_reads_reset = yes;
        self
    }

    /// What tells this stream that its upgrade switched protocols.
    pub fn switched(&self) -> Switched {
        Switched(self.cancel_reads_as_end.clone())
    }

    /// Ends the stream as a reset, after what was written to it: trailers
    /// with [`RESET_TRAILER`], which h2 sends behind the queued data and the
    /// far side's `StreamIo` reads as `ConnectionReset` once the data is
    /// read. A `RST_STREAM` would discard what is still queued: it is the
    /// way only to a far side that does not read the trailer. A stream
    /// whose sending half is over already gets nothing more here; dropping
    /// it tells the far side (on the server side after what is queued, on
    /// the client side as a cancel, which discards what h2 still holds of
    /// the ended half: the far side then sees a reset, never a clean end).
    ///
    /// On the client side of the tunnel, dropping a stream the far side has
    /// not ended cancels it, which discards the queue too: see
    /// [`Self::linger`]. Returns whether the trailer was sent (whether there
    /// is anything to linger for).
    pub fn abort(&mut self) -> bool {
        if self.ended {
            return false;
        }
        self.ended = true;
        if !self.peer_reads_reset {
            self.send.send_reset(Reason::CANCEL);
            return false;
        }
        let mut marker = http::HeaderMap::new();
        mark_reset(&mut marker);
        if self.send.send_trailers(marker).is_err() {
            self.send.send_reset(Reason::CANCEL);
            return false;
        }
        true
    }

    /// Keeps the stream until the far side ends it too (reading and
    /// dropping what still comes), at most `limit`: a client-side stream
    /// dropped first would cancel what it still has queued, the abort's
    /// trailer included.
    pub async fn linger(&mut self, limit: std::time::Duration) {
        use tokio::io::AsyncReadExt as _;
        let mut sink = [0u8; 4096];
        let _ = tokio::time::timeout(limit, async {
            while matches!(self.read(&mut sink).await, Ok(n) if n > 0) {}
        })
        .await;
    }
}

/// The trailer field that ends a tunnel `CONNECT` stream as a reset, in
/// order after its data (see [`StreamIo::abort`]).
pub const RESET_TRAILER: http::HeaderName = http::HeaderName::from_static("sluice-reset");

/// Adds [`RESET_TRAILER`]: the reset itself in a trailer section, the
/// announcement that this side reads it on a `CONNECT` or its answer.
pub fn mark_reset(h: &mut http::HeaderMap) {
    h.insert(RESET_TRAILER, http::HeaderValue::from_static("1"));
}

/// Marks an upgrade stream switched: from then on the caller's side giving
/// it up (`RST_STREAM(CANCEL)`) reads as a reset, which the relay passes on
/// to the workload, rather than as the end its HTTP/1.1 server expected
/// before.
#[derive(Clone)]
pub struct Switched(Arc<AtomicBool>);

impl Switched {
    pub fn now(&self) {
        self.0.store(false, Ordering::Relaxed);
    }
}

impl Drop for StreamIo {
    fn drop(&mut self) {
        if self.end_on_drop && !self.ended {
            let _ = self.send.send_data(Bytes::new(), true);
        }
    }
}

fn to_io(e: h2::Error) -> io::Error {
    if e.is_io() {
        return e
            .into_io()
            .unwrap_or_else(|| io::Error::other("HTTP/2 I/O error"));
    }
    match e.reason() {
        Some(Reason::NO_ERROR) | Some(Reason::CANCEL) => {
            io::Error::new(io::ErrorKind::BrokenPipe, e)
        }
        _ => io::Error::new(io::ErrorKind::ConnectionReset, e),
    }
}

impl tokio::io::AsyncRead for StreamIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        while self.pending.is_empty() {
            match ready!(poll_data(&mut self.recv, cx)) {
                Some(Ok(b)) => self.pending = b,
                Some(Err(e)) if e.reason() == Some(Reason::NO_ERROR) => {
                    return Poll::Ready(Ok(()));
                }
                // The caller's side gave the stream up: for the workload's
                // side, the end of what comes (as hyper's upgraded streams
                // read it).
                Some(Err(e))
                    if e.reason() == Some(Reason::CANCEL)
                        && self.cancel_reads_as_end.load(Ordering::Relaxed) =>
                {
                    return Poll::Ready(Ok(()));
                }
                Some(Err(e)) => return Poll::Ready(Err(to_io(e))),
                // The peer's end of stream: EOF, unless it ended with the
                // reset marker (see `abort`).
                None => {
                    let aborted = match ready!(self.recv.poll_trailers(cx)) {
                        Ok(Some(t)) => t.contains_key(RESET_TRAILER),
                        _ => false,
                    };
                    if aborted && !self.cancel_reads_as_end.load(Ordering::Relaxed) {
                        return Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::ConnectionReset,
                            "the other side of the tunnel stream was reset",
                        )));
                    }
                    return Poll::Ready(Ok(()));
                }
            }
        }
        let n = self.pending.len().min(buf.remaining());
        buf.put_slice(&self.pending[..n]);
        self.pending.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl tokio::io::AsyncWrite for StreamIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        self.send.reserve_capacity(buf.len());
        loop {
            match ready!(self.send.poll_capacity(cx)) {
                Some(Ok(0)) => continue,
                Some(Ok(room)) => {
                    let n = room.min(buf.len());
                    self.send
                        .send_data(Bytes::copy_from_slice(&buf[..n]), false)
                        .map_err(to_io)?;
                    return Poll::Ready(Ok(n));
                }
                Some(Err(e)) => return Poll::Ready(Err(to_io(e))),
                None => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::BrokenPipe,
                        "the tunnel stream is closed",
                    )));
                }
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // The connection's task writes what the stream queued.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Half-close: our end of stream; reading goes on.
        // An error means the stream is already over: nothing to close.
        self.ended = true;
        match self.send.send_data(Bytes::new(), true) {
            Err(e) if e.is_io() => Poll::Ready(Err(to_io(e))),
            _ => Poll::Ready(Ok(())),
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// Both ends of one CONNECT stream over an in-memory HTTP/2 connection:
    /// the client's `StreamIo` and the server's, made by `server_io`.
    async fn pair(
        server_io: fn(SendStream<Bytes>, RecvStream) -> StreamIo,
    ) -> (StreamIo, StreamIo) {
        let (c, s) = tokio::io::duplex(1 << 20);
        let server = tokio::spawn(async move {
            let mut conn = h2::server::handshake(s).await.unwrap();
            let (req, mut respond) = conn.accept().await.unwrap().unwrap();
            let send = respond
                .send_response(http::Response::new(()), false)
                .unwrap();
            tokio::spawn(async move { while conn.accept().await.is_some() {} });
            server_io(send, req.into_body()).peer_reads_reset_trailer(true)
        });
        let (mut client, conn) = h2::client::handshake(c).await.unwrap();
        tokio::spawn(conn);
        let req = http::Request::connect("10.0.0.1:80").body(()).unwrap();
        let (resp, send) = client.send_request(req, false).unwrap();
        let server = server.await.unwrap();
        let recv = resp.await.unwrap().into_body();
        (
            StreamIo::new(send, recv).peer_reads_reset_trailer(true),
            server,
        )
    }

    async fn read_to_end(io: &mut StreamIo) -> (Vec<u8>, io::Result<()>) {
        let mut got = Vec::new();
        let mut buf = [0u8; 8192];
        loop {
            match io.read(&mut buf).await {
                Ok(0) => return (got, Ok(())),
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) => return (got, Err(e)),
            }
        }
    }

    /// An abort right behind a write, before the connection has sent
    /// anything: the far side reads every byte, then a reset (a
    /// `RST_STREAM` would have discarded the queued data).
    #[tokio::test]
    async fn an_abort_arrives_after_what_was_written_before_it() {
        let (mut client, mut server) = pair(StreamIo::relaying).await;
        let data: Vec<u8> = (0..60_000u32).map(|i| i as u8).collect();
        server.write_all(&data).await.unwrap();
        server.abort();
        let (got, end) = read_to_end(&mut client).await;
        assert_eq!(got.len(), data.len());
        assert!(got == data);
        let e = end.expect_err("an abort is not a clean end");
        assert_eq!(e.kind(), io::ErrorKind::ConnectionReset, "{e}");
    }

    /// The client side aborts and lets go of the stream at once, before the
    /// connection sent anything: lingering until the far side ends it keeps
    /// h2 from cancelling it, which would discard the data and the trailer.
    #[tokio::test]
    async fn a_client_side_abort_lingers_until_the_far_side_has_it() {
        let (mut client, mut server) = pair(StreamIo::relaying).await;
        let data = vec![9u8; 60_000];
        let sent = data.clone();
        let caller = tokio::spawn(async move {
            client.write_all(&sent).await.unwrap();
            assert!(client.abort(), "the trailer goes out");
            client.linger(std::time::Duration::from_secs(30)).await;
        });
        let (got, end) = read_to_end(&mut server).await;
        assert_eq!(got.len(), data.len());
        assert_eq!(end.unwrap_err().kind(), io::ErrorKind::ConnectionReset);
        // The far side ends the stream: the linger is over then, not at its
        // limit.
        drop(server);
        tokio::time::timeout(std::time::Duration::from_secs(5), caller)
            .await
            .expect("the linger ends with the stream")
            .unwrap();
    }

    /// A far side that did not say it reads the trailer (an older proxy)
    /// gets a `RST_STREAM`, which it reads as the stream breaking off.
    #[tokio::test]
    async fn an_abort_to_a_peer_without_the_trailer_is_a_stream_reset() {
        let (mut client, server) = pair(StreamIo::relaying).await;
        let mut server = server.peer_reads_reset_trailer(false);
        server.abort();
        let (_, end) = read_to_end(&mut client).await;
        assert_eq!(end.unwrap_err().kind(), io::ErrorKind::BrokenPipe);
    }

    /// A clean end reads as one; and before an upgrade switched, an abort
    /// from the caller's side is the end its HTTP/1.1 server expects.
    #[tokio::test]
    async fn a_shutdown_is_a_clean_end_and_an_abort_before_the_switch_too() {
        let (mut client, mut server) = pair(StreamIo::relaying).await;
        server.write_all(b"answer").await.unwrap();
        server.shutdown().await.unwrap();
        assert_eq!(read_to_end(&mut client).await.0, b"answer");

        let (mut client, mut server) = pair(StreamIo::ending_on_drop).await;
        client.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        client.abort();
        let (got, end) = read_to_end(&mut server).await;
        assert_eq!(got, b"GET / HTTP/1.1\r\n");
        end.expect("before the switch: an end");
        // After it, a reset.
        let (mut client, mut server) = pair(StreamIo::ending_on_drop).await;
        server.switched().now();
        client.write_all(b"frame").await.unwrap();
        client.abort();
        let (got, end) = read_to_end(&mut server).await;
        assert_eq!(got, b"frame");
        assert_eq!(end.unwrap_err().kind(), io::ErrorKind::ConnectionReset);
    }
}
