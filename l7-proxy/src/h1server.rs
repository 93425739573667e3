//! HTTP/1.1 from captured callers, served by the connection's own task.
//!
//! hyper's HTTP/1.1 server runs a dispatcher between the connection and the
//! service, with a body channel and a response slot per request (about
//! 4,500 instructions per request of its own on the capture side of the
//! benchmark's path; this server about 4,000, benches/RESULTS.md). Here the
//! connection's task reads a head, calls the handler, and writes the
//! response; a request body goes to the handler through a one-slot
//! channel, read from the socket only as the handler takes it, and goes on
//! being read while the response is written (an upload may outlive its
//! answer). Owning this layer is what lets a pipelined head have the head
//! timeout and a cut request body reach the workload as a failure.
//!
//! Requests that change what the connection is (`Upgrade`, `CONNECT`), wait
//! for a go-ahead (`Expect`) or speak HTTP/1.0 are left to hyper: [`serve`]
//! returns the bytes from their head on, and the caller serves the rest of
//! the connection with hyper's server.
//!
//! As hyper's server does: a head is bounded by `max_head` bytes and 100
//! lines (431 beyond), a malformed head is answered 400 and the connection
//! closed, a caller that ends its side while its request is in flight has
//! the request cancelled, and a response is framed by its `Content-Length`,
//! else by its body's known size, else chunked. Unlike it, a head's timeout
//! starts at its first byte (also for a head read along with the previous
//! request), a connection waits for a first byte for the keep-alive idle
//! timeout, and a head that stalls is answered 408.

use std::{
    cell::RefCell,
    collections::VecDeque,
    future::{Future, poll_fn},
    io::{self, IoSlice, Write as _},
    mem::MaybeUninit,
    pin::{Pin, pin},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll, ready},
    time::{Duration, SystemTime},
};

use bytes::{Buf, Bytes, BytesMut};
use http::{
    HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, Uri, Version, header,
};
use http_body::{Body as _, Frame, SizeHint};
use tokio::{
    io::{AsyncRead, AsyncWrite, AsyncWriteExt},
    sync::{mpsc, oneshot},
    time::Instant,
};
use tokio_util::sync::PollSender;

use crate::{
    body::{Body, BoxError},
    h1client::{
        Chunk, FramingFields, MAX_HEADERS, Mode, READ_CHUNK, Step, note_length, only_chunked,
    },
};

/// How a connection is bounded.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Limits {
    /// From a head's first byte to its end.
    pub head_timeout: Duration,
    /// For a head's first byte.
    pub idle_timeout: Duration,
    /// Bytes of a head (and of a trailer section).
    pub max_head: usize,
}

/// How [`serve`] left the connection.
#[derive(Debug)]
pub(crate) enum Ended {
    /// Done with: closed by either side, timed out, or failed.
    Closed,
    /// A head that could not be served was answered with this status (and
    /// why, in the answer's reason header), and the connection closed: the
    /// caller counts and logs it, as a request the proxy answered.
    Refused(StatusCode, &'static str),
    /// A request for hyper's server came: its head and whatever was read
    /// after it, to be served before the rest of the connection.
    Hyper(Bytes),
}

/// Serves HTTP/1.1 requests on `io` until the connection ends or a request
/// for hyper comes. `drain` fires when the proxy shuts down: a connection
/// waiting for a head closes then, one with a request in flight finishes it
/// (`connection: close`) and closes.
pub(crate) async fn serve<I, H, F>(
    io: &mut I,
    limits: Limits,
    mut drain: oneshot::Receiver<()>,
    mut handle: H,
) -> Ended
where
    I: AsyncRead + AsyncWrite + Unpin,
    H: FnMut(Request<Body>) -> F,
    F: Future<Output = Response<Body>>,
{
    let mut rbuf = BytesMut::new();
    let mut out = Out::default();
    let mut draining = false;
    loop {
        let head = match read_head(io, &mut rbuf, limits, &mut drain, &mut draining).await {
            Ok(Some(Parsed::Request(head))) => head,
            Ok(Some(Parsed::Hyper)) => return Ended::Hyper(rbuf.freeze()),
            Ok(None) => return Ended::Closed,
            Err((status, why)) => {
                refuse(io, status, why).await;
                return Ended::Refused(status, why);
            }
        };
        let Head {
            req,
            mode,
            close,
            te_trailers,
        } = head;
        let method_head = req.method() == Method::HEAD;
        let (body, mut pump) = request_body(mode);
        let mut exchange = pin!(handle(req.map(|()| body)));
        // The handler runs while its body is read; the caller leaving ends it.
        let resp = poll_fn(|cx| {
            if let Poll::Ready(r) = exchange.as_mut().poll(cx) {
                return Poll::Ready(Some(r));
            }
            match pump.poll(io, &mut rbuf, limits.max_head, cx) {
                Poll::Ready(Gone) => Poll::Ready(None),
                Poll::Pending => Poll::Pending,
            }
        })
        .await;
        let Some(mut resp) = resp else {
            return Ended::Closed;
        };
        if resp.status().is_informational() {
            // Only an upgrade (hyper's) has a 1xx for its answer.
            resp = crate::body::proxy_response(
                StatusCode::INTERNAL_SERVER_ERROR,
                "the proxy had an interim (1xx) status for its final answer",
            );
        }
        // A body the handler left unread is passed over as far as it is
        // here; one still to come means this answer must say `close`.
        if pump.reading() {
            let gone =
                poll_fn(|cx| Poll::Ready(pump.poll(io, &mut rbuf, limits.max_head, cx).is_ready()))
                    .await;
            if gone {
                return Ended::Closed;
            }
        }
        draining = draining || matches!(drain.try_recv(), Ok(()));
        let mut writer = Writer::start(
            &mut out,
            resp,
            method_head,
            te_trailers,
            close || draining || pump.abandoned(),
        );
        // The response goes out while the request's body goes on coming.
        let written = poll_fn(|cx| {
            if let Poll::Ready(Gone) = pump.poll(io, &mut rbuf, limits.max_head, cx) {
                return Poll::Ready(Err(()));
            }
            writer
                .poll(&mut out, io, cx)
                .map(|r| r.map_err(|e| tracing::debug!("captured HTTP/1.1 response cut off: {e}")))
        })
        .await;
        if written.is_err() {
            return Ended::Closed;
        }
        // An upload answered before its end is read to its end.
        let whole = poll_fn(|cx| {
            if !pump.reading() {
                return Poll::Ready(true);
            }
            match pump.poll(io, &mut rbuf, limits.max_head, cx) {
                Poll::Ready(Gone) => Poll::Ready(false),
                Poll::Pending if pump.reading() => Poll::Pending,
                Poll::Pending => Poll::Ready(true),
            }
        })
        .await;
        if !whole || !pump.done() || writer.close {
            let _ = io.shutdown().await;
            return Ended::Closed;
        }
    }
}

/// A request head, and how its body and connection go on.
struct Head {
    req: Request<()>,
    mode: Mode,
    /// The caller asked for the connection to close after this exchange.
    close: bool,
    /// The caller takes trailer fields (`TE: trailers`).
    te_trailers: bool,
}

// Unboxed: made once per request and moved once; a box would be an
// allocation per request.
#[allow(clippy::large_enum_variant)]
enum Parsed {
    Request(Head),
    /// A request [`serve`] leaves to hyper; its head is still in the buffer.
    Hyper,
}

/// A refusal of a head: the status and why.
pub(crate) type Refusal = (StatusCode, &'static str);

/// A head too large (bytes or lines).
pub(crate) const TOO_LARGE: Refusal = (
    StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
    "the request head is too large",
);

/// A head that does not parse.
pub(crate) const MALFORMED: Refusal = (StatusCode::BAD_REQUEST, "malformed request head");

/// Waits for a whole head in `rbuf`: for its first byte the idle timeout
/// (`None` then, as at the caller's close or, before a first byte, at
/// drain), from it the head timeout.
async fn read_head<I: AsyncRead + Unpin>(
    io: &mut I,
    rbuf: &mut BytesMut,
    limits: Limits,
    drain: &mut oneshot::Receiver<()>,
    draining: &mut bool,
) -> Result<Option<Parsed>, Refusal> {
    // The connection's idle time counts from here, whatever empty lines
    // come meanwhile.
    let idle_until = Instant::now() + limits.idle_timeout;
    let mut deadline = None;
    loop {
        skip_empty_lines(rbuf);
        // A lone CR may be the first half of an empty line.
        if !rbuf.is_empty() && &rbuf[..] != b"\r" {
            if let Some(p) = parse(rbuf, limits.max_head)? {
                return Ok(Some(p));
            }
            deadline.get_or_insert_with(|| Instant::now() + limits.head_timeout);
        }
        if *draining && rbuf.is_empty() {
            return Ok(None);
        }
        let until = deadline.unwrap_or(idle_until);
        rbuf.reserve(READ_CHUNK);
        let read = tokio::select! {
            r = poll_fn(|cx| tokio_util::io::poll_read_buf(Pin::new(&mut *io), cx, rbuf)) => r,
            _ = tokio::time::sleep_until(until) => {
                return match deadline {
                    Some(_) => Err((StatusCode::REQUEST_TIMEOUT, "the request head took too long")),
                    None => Ok(None),
                };
            }
            _ = &mut *drain, if !*draining => {
                *draining = true;
                continue;
            }
        };
        match read {
            Ok(0) | Err(_) => return Ok(None),
            Ok(_) => {}
        }
    }
}

/// Takes out empty lines at the start of `rbuf`: before a head (RFC 9112
/// 2.2; some clients send a CRLF after a body) they are not its beginning.
fn skip_empty_lines(rbuf: &mut BytesMut) {
    loop {
        let n = if rbuf.starts_with(b"\r\n") {
            2
        } else if rbuf.starts_with(b"\n") {
            1
        } else {
            return;
        };
        rbuf.advance(n);
    }
}

/// A head from the start of `rbuf` if it is whole (taken out of the buffer
/// unless it is for hyper).
fn parse(rbuf: &mut BytesMut, max_head: usize) -> Result<Option<Parsed>, Refusal> {
    let mut lines = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut []);
    let n = match parsed.parse_with_uninit_headers(rbuf, &mut lines) {
        Ok(httparse::Status::Complete(n)) if n > max_head => return Err(TOO_LARGE),
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if rbuf.len() > max_head => return Err(TOO_LARGE),
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(TOO_LARGE),
        Err(httparse::Error::Version) => {
            return Err((
                StatusCode::HTTP_VERSION_NOT_SUPPORTED,
                "only HTTP/1.x is served here",
            ));
        }
        Err(_) => return Err(MALFORMED),
    };
    let (Some(method), Some(path)) = (parsed.method, parsed.path) else {
        return Err(MALFORMED);
    };
    let hyper_serves = parsed.version != Some(1)
        || method == "CONNECT"
        || parsed.headers.iter().any(|h| {
            h.name.eq_ignore_ascii_case("upgrade") || h.name.eq_ignore_ascii_case("expect")
        });
    if hyper_serves {
        return Ok(Some(Parsed::Hyper));
    }
    // Where each part sits in the head, to be sliced from it once frozen
    // (values are not copied).
    let base = rbuf.as_ptr() as usize;
    let at = |s: &[u8]| {
        let start = s.as_ptr() as usize - base;
        start..start + s.len()
    };
    let method = Method::from_bytes(method.as_bytes())
        .map_err(|_| (StatusCode::BAD_REQUEST, "malformed method"))?;
    let path = at(path.as_bytes());
    let mut fields = [(0u32, 0u32, 0u32, 0u32); MAX_HEADERS];
    let count = parsed.headers.len();
    for (slot, h) in fields.iter_mut().zip(parsed.headers.iter()) {
        let (name, value) = (at(h.name.as_bytes()), at(h.value));
        *slot = (
            name.start as u32,
            name.end as u32,
            value.start as u32,
            value.end as u32,
        );
    }
    let head = rbuf.split_to(n).freeze();
    let uri = Uri::from_maybe_shared(head.slice(path))
        .map_err(|_| (StatusCode::BAD_REQUEST, "malformed request target"))?;
    let mut headers = HeaderMap::with_capacity(count);
    let mut seen = FramingFields::default();
    let mut te_trailers = false;
    let mut close = false;
    let mut length = Ok(None);
    // Each content-length line the one number as HTTP/2 writes it.
    let mut plain_length = true;
    let mut hosts = 0u8;
    for &(ns, ne, vs, ve) in &fields[..count] {
        let name = HeaderName::from_bytes(&head[ns as usize..ne as usize])
            .map_err(|_| (StatusCode::BAD_REQUEST, "malformed header name"))?;
        let value = HeaderValue::from_maybe_shared(head.slice(vs as usize..ve as usize))
            .map_err(|_| (StatusCode::BAD_REQUEST, "malformed header value"))?;
        seen.note(&name, value.as_bytes());
        if name == header::CONTENT_LENGTH
            && let Ok(l) = &mut length
        {
            length = note_length(value.as_bytes(), l).map(|()| *l);
            let v = value.as_bytes();
            let leading_zero = v.len() > 1 && v[0] == b'0';
            plain_length &= !(v.contains(&b',') || leading_zero);
        }
        hosts = hosts.saturating_add(u8::from(name == header::HOST));
        te_trailers |= name == header::TE && token_in(value.as_bytes(), b"trailers");
        close |= name == header::CONNECTION && token_in(value.as_bytes(), b"close");
        headers.append(name, value);
    }
    // Which one would a next hop take? (RFC 9112 section 3.2)
    if hosts > 1 {
        return Err((StatusCode::BAD_REQUEST, "more than one host header"));
    }
    let mode = if seen.transfer_encoding {
        // Two framings: whichever a next hop believes, it is not this one
        // (request smuggling).
        if seen.content_lengths > 0 {
            return Err((
                StatusCode::BAD_REQUEST,
                "a request with both content-length and transfer-encoding",
            ));
        }
        if !only_chunked(&headers) {
            return Err((
                StatusCode::BAD_REQUEST,
                "a transfer coding other than chunked (not supported by the mesh)",
            ));
        }
        Mode::Chunked {
            state: Chunk::Size,
            reuse: true,
        }
    } else {
        // A list of one value, leading zeros, a line repeated: valid
        // HTTP/1.1, but the tunnel's HTTP/2 takes one plain number only.
        if let Ok(Some(n)) = length
            && (!plain_length || seen.content_lengths > 1)
        {
            headers.insert(header::CONTENT_LENGTH, HeaderValue::from(n));
        }
        match length {
            Err(_) => return Err((StatusCode::BAD_REQUEST, "malformed content-length")),
            Ok(Some(0) | None) => Mode::Empty { reuse: true },
            Ok(Some(n)) => Mode::Length {
                left: n,
                reuse: true,
            },
        }
    };
    let mut req = Request::new(());
    *req.method_mut() = method;
    *req.uri_mut() = uri;
    *req.version_mut() = Version::HTTP_11;
    *req.headers_mut() = headers;
    Ok(Some(Parsed::Request(Head {
        req,
        mode,
        close,
        te_trailers,
    })))
}

/// Whether a comma-separated list holds `token` (parameters after `;`
/// aside).
fn token_in(list: &[u8], token: &[u8]) -> bool {
    list.split(|&b| b == b',').any(|t| {
        t.split(|&b| b == b';')
            .next()
            .unwrap_or_default()
            .trim_ascii()
            .eq_ignore_ascii_case(token)
    })
}

/// Answers a head that cannot be served, and closes.
async fn refuse<I: AsyncWrite + Unpin>(io: &mut I, status: StatusCode, why: &str) {
    tracing::debug!("captured HTTP/1.1 request refused: {why}");
    let answer = format!(
        "HTTP/1.1 {} {}\r\ncontent-length: 0\r\nconnection: close\r\n{}: {why}\r\n\r\n",
        status.as_str(),
        status.canonical_reason().unwrap_or(""),
        crate::config::REASON_HEADER,
    );
    let _ = io.write_all(answer.as_bytes()).await;
    let _ = io.shutdown().await;
}

type Item = Result<Frame<Bytes>, BoxError>;

/// The body of a request as the handler reads it, and the connection's end
/// of it.
fn request_body(mode: Mode) -> (Body, Pump) {
    let left = match mode {
        Mode::Empty { .. } => return (crate::body::empty(), Pump::Done),
        Mode::Length { left, .. } => Some(left),
        _ => None,
    };
    let (tx, rx) = mpsc::channel(1);
    let finished = Arc::new(AtomicBool::new(false));
    let body = Incoming {
        rx,
        left,
        ended: false,
        finished: finished.clone(),
    };
    (
        crate::body::boxed(body),
        Pump::Body {
            tx: PollSender::new(tx),
            mode,
            finished,
        },
    )
}

/// A request body, from the connection's task.
struct Incoming {
    rx: mpsc::Receiver<Item>,
    /// Bytes still to come, for a body of known length.
    left: Option<u64>,
    ended: bool,
    /// Set by the connection's task once the body's end was read: the
    /// channel closing without it means the caller's connection went first.
    finished: Arc<AtomicBool>,
}

impl http_body::Body for Incoming {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if self.ended {
            return Poll::Ready(None);
        }
        let item = ready!(self.rx.poll_recv(cx));
        match &item {
            Some(Ok(frame)) => {
                if let (Some(data), Some(left)) = (frame.data_ref(), self.left.as_mut()) {
                    *left = left.saturating_sub(data.len() as u64);
                    self.ended = *left == 0;
                }
            }
            Some(Err(_)) => self.ended = true,
            None => {
                self.ended = true;
                if !self.finished.load(Ordering::Acquire) {
                    return Poll::Ready(Some(Err(
                        "the caller's connection ended before the request body did".into(),
                    )));
                }
            }
        }
        Poll::Ready(item)
    }

    fn is_end_stream(&self) -> bool {
        self.ended
    }

    fn size_hint(&self) -> SizeHint {
        match self.left {
            Some(n) => SizeHint::with_exact(n),
            None => SizeHint::default(),
        }
    }
}

/// The caller went: its connection closed or failed.
struct Gone;

/// The connection's side of a request body.
enum Pump {
    /// Being read as the handler takes it.
    Body {
        tx: PollSender<Item>,
        mode: Mode,
        /// Set when the body's end has been read.
        finished: Arc<AtomicBool>,
    },
    /// Read to its end (or there was none).
    Done,
    /// Left before its end: the handler dropped it, or it was malformed.
    /// The connection cannot carry another request.
    Abandoned,
}

impl Pump {
    fn reading(&self) -> bool {
        matches!(self, Pump::Body { .. })
    }

    fn done(&self) -> bool {
        matches!(self, Pump::Done)
    }

    fn abandoned(&self) -> bool {
        matches!(self, Pump::Abandoned)
    }

    /// Reads the body as far as the handler takes it; with none to read,
    /// watches for the caller's close (as long as nothing of a next
    /// request has come). `Ready` only when the caller went.
    fn poll<I: AsyncRead + Unpin>(
        &mut self,
        io: &mut I,
        rbuf: &mut BytesMut,
        max_head: usize,
        cx: &mut Context<'_>,
    ) -> Poll<Gone> {
        loop {
            match self {
                Pump::Body { tx, mode, finished } => {
                    // An end already read needs no room in the channel:
                    // the connection is free for its next request even
                    // while the handler has yet to take the last bytes.
                    let at_end = match mode {
                        Mode::Length { left: 0, .. } | Mode::Done { .. } => true,
                        Mode::Chunked { state, .. } => chunked_end_ahead(state, rbuf),
                        _ => false,
                    };
                    if at_end {
                        let _ = mode.step(rbuf, max_head);
                        finished.store(true, Ordering::Release);
                        *self = Pump::Done;
                        continue;
                    }
                    if ready!(tx.poll_reserve(cx)).is_err() {
                        // The handler is done with the body: what of it is
                        // already here is passed over; a body whose end is
                        // still to come leaves the connection unusable.
                        *self = loop {
                            match mode.step(rbuf, max_head) {
                                Ok(Step::Frame(_)) => {}
                                Ok(Step::End) => break Pump::Done,
                                Ok(Step::Read) | Err(_) => break Pump::Abandoned,
                            }
                        };
                        continue;
                    }
                    match mode.step(rbuf, max_head) {
                        Ok(Step::Frame(frame)) => {
                            let _ = tx.send_item(Ok(frame));
                        }
                        Ok(Step::End) => {
                            finished.store(true, Ordering::Release);
                            *self = Pump::Done;
                        }
                        Ok(Step::Read) => {
                            rbuf.reserve(READ_CHUNK);
                            match ready!(tokio_util::io::poll_read_buf(
                                Pin::new(&mut *io),
                                cx,
                                rbuf
                            )) {
                                Ok(0) | Err(_) => return Poll::Ready(Gone),
                                Ok(_) => {}
                            }
                        }
                        Err(e) => {
                            let why = format!("the request body is malformed: {}", body_error(&e));
                            let _ = tx.send_item(Err(why.into()));
                            *self = Pump::Abandoned;
                        }
                    }
                }
                Pump::Done => {
                    // A next request, read along, waits in the buffer (and
                    // the watch for the caller's close with it).
                    skip_empty_lines(rbuf);
                    if !rbuf.is_empty() {
                        return Poll::Pending;
                    }
                    rbuf.reserve(READ_CHUNK);
                    match ready!(tokio_util::io::poll_read_buf(Pin::new(&mut *io), cx, rbuf)) {
                        Ok(0) | Err(_) => return Poll::Ready(Gone),
                        Ok(_) => {}
                    }
                }
                Pump::Abandoned => return Poll::Pending,
            }
        }
    }
}

/// Whether what is left of a chunked body in `rbuf` is its plain end (no
/// data, no trailers): stepping to it then takes no room in the channel.
/// Anything else (an extension on the last chunk, trailers) goes the usual
/// way.
fn chunked_end_ahead(state: &Chunk, rbuf: &[u8]) -> bool {
    let end: &[u8] = match state {
        Chunk::DataEnd => b"\r\n0\r\n\r\n",
        Chunk::Size => b"0\r\n\r\n",
        Chunk::Trailers => b"\r\n",
        Chunk::Data(_) => return false,
    };
    rbuf.starts_with(end)
}

/// What is wrong with a body, in the caller's terms.
fn body_error(e: &crate::h1client::Error) -> String {
    match e {
        crate::h1client::Error::Invalid(why) => (*why).to_owned(),
        crate::h1client::Error::HeadTooLarge(n) => {
            format!("its trailer section is larger than {n} bytes")
        }
        other => other.to_string(),
    }
}

/// Bytes on their way to the caller: a head, then body pieces.
#[derive(Default)]
struct Out {
    head: Vec<u8>,
    /// How much of `head` is written.
    at: usize,
    queue: VecDeque<Bytes>,
    queued: usize,
}

impl Out {
    fn push(&mut self, b: Bytes) {
        if !b.is_empty() {
            self.queued += b.len();
            self.queue.push_back(b);
        }
    }

    fn is_empty(&self) -> bool {
        self.at == self.head.len() && self.queue.is_empty()
    }

    fn poll_flush<I: AsyncWrite + Unpin>(
        &mut self,
        io: &mut I,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<()>> {
        while !self.is_empty() {
            let mut slices = [IoSlice::new(&[]); 8];
            let mut k = 0;
            if self.at < self.head.len() {
                slices[0] = IoSlice::new(&self.head[self.at..]);
                k = 1;
            }
            for b in self.queue.iter().take(slices.len() - k) {
                slices[k] = IoSlice::new(b);
                k += 1;
            }
            let n = ready!(Pin::new(&mut *io).poll_write_vectored(cx, &slices[..k]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.advance(n);
        }
        Poll::Ready(Ok(()))
    }

    fn advance(&mut self, mut n: usize) {
        let from_head = (self.head.len() - self.at).min(n);
        self.at += from_head;
        n -= from_head;
        self.queued -= n;
        while n > 0 {
            let front = self.queue.front_mut().expect("written bytes were queued");
            if front.len() <= n {
                n -= front.len();
                self.queue.pop_front();
            } else {
                front.advance(n);
                n = 0;
            }
        }
    }
}

/// How a response body is delimited.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Framing {
    /// No body (HEAD, 1xx, 204, 304).
    None,
    Length(u64),
    Chunked,
}

/// Bytes gathered before a write when the body has more at hand.
const GATHER: usize = 64 * 1024;

/// One response on its way out.
struct Writer {
    body: Option<Body>,
    framing: Framing,
    te_trailers: bool,
    /// The connection closes after this response.
    close: bool,
    /// Why the body failed, once what it gave before is written.
    failed: Option<io::Error>,
}

impl Writer {
    /// Writes the head into `out` and readies the body.
    fn start(
        out: &mut Out,
        resp: Response<Body>,
        head_request: bool,
        te_trailers: bool,
        mut close: bool,
    ) -> Writer {
        let (parts, body) = resp.into_parts();
        let status = parts.status;
        let no_body = head_request
            || status.is_informational()
            || status == StatusCode::NO_CONTENT
            || status == StatusCode::NOT_MODIFIED;
        out.head.clear();
        out.at = 0;
        out.head.extend_from_slice(b"HTTP/1.1 ");
        out.head.extend_from_slice(status.as_str().as_bytes());
        out.head.push(b' ');
        out.head
            .extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
        out.head.extend_from_slice(b"\r\n");
        // One pass: the framing fields are this hop's to write (below);
        // the rest go as they are.
        let mut length = Ok(None);
        let mut date = false;
        let mut connection = false;
        for (k, v) in &parts.headers {
            if *k == header::CONTENT_LENGTH {
                if let Ok(l) = &mut length {
                    length = note_length(v.as_bytes(), l).map(|()| *l);
                }
                continue;
            }
            if *k == header::TRANSFER_ENCODING {
                continue;
            }
            // Written below, once it is known whether any says `close`.
            if *k == header::CONNECTION {
                connection = true;
                close |= token_in(v.as_bytes(), b"close");
                continue;
            }
            date |= *k == header::DATE;
            out.head.extend_from_slice(k.as_str().as_bytes());
            out.head.extend_from_slice(b": ");
            out.head.extend_from_slice(v.as_bytes());
            out.head.extend_from_slice(b"\r\n");
        }
        // A length that does not parse is dropped (the body is then framed
        // by its own size, or chunked); none goes with a 204 or a 1xx.
        let length = length
            .ok()
            .flatten()
            .filter(|_| status != StatusCode::NO_CONTENT && !status.is_informational());
        if let (true, Some(n)) = (no_body, length) {
            let _ = write!(out.head, "content-length: {n}\r\n");
        }
        let framing = if no_body {
            Framing::None
        } else if let Some(n) = length.or_else(|| body.size_hint().exact()) {
            let _ = write!(out.head, "content-length: {n}\r\n");
            Framing::Length(n)
        } else {
            out.head
                .extend_from_slice(b"transfer-encoding: chunked\r\n");
            Framing::Chunked
        };
        // A closing connection says so once, whatever else was said.
        if close {
            out.head.extend_from_slice(b"connection: close\r\n");
        } else if connection {
            for v in &parts.headers.get_all(header::CONNECTION) {
                out.head.extend_from_slice(b"connection: ");
                out.head.extend_from_slice(v.as_bytes());
                out.head.extend_from_slice(b"\r\n");
            }
        }
        // As hyper's server did, and as RFC 9110 6.6.1 asks of a server
        // with a clock: the proxy's own answers and workloads' without one.
        if !date {
            out.head.extend_from_slice(b"date: ");
            out.head.extend_from_slice(&http_date());
            out.head.extend_from_slice(b"\r\n");
        }
        out.head.extend_from_slice(b"\r\n");
        Writer {
            body: (framing != Framing::None).then_some(body),
            framing,
            te_trailers,
            close,
            failed: None,
        }
    }

    /// Writes the response to its end.
    fn poll<I: AsyncWrite + Unpin>(
        &mut self,
        out: &mut Out,
        io: &mut I,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            if self.body.is_some() {
                match self.poll_body(out, cx) {
                    Poll::Ready(Ok(())) if out.queued < GATHER && self.body.is_some() => continue,
                    Poll::Ready(Ok(())) => {}
                    // What came before the failure goes out first: the
                    // caller sees a cut response, not none.
                    Poll::Ready(Err(e)) => self.failed = Some(e),
                    Poll::Pending => {
                        ready!(out.poll_flush(io, cx))?;
                        return Poll::Pending;
                    }
                }
            }
            ready!(out.poll_flush(io, cx))?;
            if let Some(e) = self.failed.take() {
                return Poll::Ready(Err(e));
            }
            if self.body.is_none() {
                return Poll::Ready(Ok(()));
            }
        }
    }

    /// Queues the body's next frame (or its end) in `out`.
    fn poll_body(&mut self, out: &mut Out, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let body = self.body.as_mut().expect("polled with a body");
        let frame = match ready!(Pin::new(body).poll_frame(cx)) {
            Some(Ok(frame)) => frame,
            Some(Err(e)) => {
                self.body = None;
                return Poll::Ready(Err(io::Error::other(e)));
            }
            None => {
                self.body = None;
                return Poll::Ready(match self.framing {
                    Framing::Chunked => {
                        out.push(Bytes::from_static(b"0\r\n\r\n"));
                        Ok(())
                    }
                    Framing::Length(0) | Framing::None => Ok(()),
                    Framing::Length(n) => Err(io::Error::other(format!(
                        "the response body ended {n} bytes short of its content-length"
                    ))),
                });
            }
        };
        match frame.into_data() {
            Ok(data) if data.is_empty() => {}
            Ok(data) => match &mut self.framing {
                Framing::Length(left) => {
                    if data.len() as u64 > *left {
                        self.body = None;
                        return Poll::Ready(Err(io::Error::other(
                            "the response body is longer than its content-length",
                        )));
                    }
                    *left -= data.len() as u64;
                    out.push(data);
                }
                Framing::Chunked => {
                    out.push(Bytes::from(format!("{:x}\r\n", data.len())));
                    out.push(data);
                    out.push(Bytes::from_static(b"\r\n"));
                }
                Framing::None => {}
            },
            Err(frame) => {
                if let (Ok(mut trailers), Framing::Chunked) = (frame.into_trailers(), self.framing)
                {
                    let mut end = b"0\r\n".to_vec();
                    if self.te_trailers {
                        crate::h1client::keep_trailer_fields(&mut trailers);
                        for (k, v) in &trailers {
                            end.extend_from_slice(k.as_str().as_bytes());
                            end.extend_from_slice(b": ");
                            end.extend_from_slice(v.as_bytes());
                            end.extend_from_slice(b"\r\n");
                        }
                    }
                    end.extend_from_slice(b"\r\n");
                    out.push(end.into());
                    // Nothing follows trailers.
                    self.body = None;
                }
            }
        }
        Poll::Ready(Ok(()))
    }
}

/// The fuzz harness (`fuzz/fuzz_targets/h1_request.rs`): a caller's bytes
/// (after a first byte giving the size of the pieces they arrive in),
/// served to their end by a handler that reads each body and answers with
/// it. Never panics, and everything written is a sequence of HTTP/1.1
/// answers.
pub fn fuzz_requests(data: &[u8]) {
    let [piece, wire @ ..] = data else {
        return;
    };
    let Ok(rt) = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
    else {
        return;
    };
    let mut io = Scripted {
        wire,
        piece: usize::from(*piece).max(1),
        written: Vec::new(),
    };
    let limits = Limits {
        head_timeout: Duration::from_secs(5),
        idle_timeout: Duration::from_secs(5),
        max_head: 512,
    };
    let (_drain_tx, drain) = oneshot::channel();
    let ended = rt.block_on(serve(
        &mut io,
        limits,
        drain,
        |req: Request<Body>| async move {
            use http_body_util::BodyExt as _;
            match req.into_body().collect().await {
                Ok(body) => Response::new(crate::body::full(body.to_bytes())),
                Err(e) => crate::body::proxy_response(StatusCode::BAD_REQUEST, &e.to_string()),
            }
        },
    ));
    if let Ended::Hyper(rest) = ended {
        let read = &wire[..wire.len() - io.wire.len()];
        assert!(read.ends_with(&rest), "hyper gets the end of what was read");
    }
    assert!(
        io.written.is_empty() || io.written.starts_with(b"HTTP/1.1 "),
        "{:?}",
        String::from_utf8_lossy(&io.written)
    );
}

/// The fuzz harness's connection: the wire in pieces, then its end.
struct Scripted<'a> {
    wire: &'a [u8],
    piece: usize,
    written: Vec<u8>,
}

impl AsyncRead for Scripted<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let n = self.piece.min(self.wire.len()).min(buf.remaining());
        let (now, rest) = self.wire.split_at(n);
        buf.put_slice(now);
        self.wire = rest;
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Scripted<'_> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.written.extend_from_slice(buf);
        Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// The current time as an HTTP date (`Sun, 06 Nov 1994 08:49:37 GMT`),
/// formatted once a second per thread.
fn http_date() -> [u8; 29] {
    thread_local! {
        static CACHE: RefCell<(u64, [u8; 29])> = const { RefCell::new((u64::MAX, [0; 29])) };
    }
    let secs = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    CACHE.with(|c| {
        let mut c = c.borrow_mut();
        if c.0 != secs {
            // (A clock before 1970 reads as 1970.)
            let text = httpdate::fmt_http_date(SystemTime::UNIX_EPOCH + Duration::from_secs(secs));
            if let Ok(bytes) = <[u8; 29]>::try_from(text.as_bytes()) {
                *c = (secs, bytes);
            }
        }
        c.1
    })
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use http_body_util::{BodyExt, StreamBody};
    use tokio::io::{AsyncReadExt, DuplexStream};

    use super::*;
    use crate::body::{boxed, full};

    const LIMITS: Limits = Limits {
        head_timeout: Duration::from_secs(5),
        idle_timeout: Duration::from_secs(60),
        max_head: 8192,
    };

    /// Answers `method path body` (the body read whole), with the request's
    /// `x-echo` header back.
    async fn echo(req: Request<Body>) -> Response<Body> {
        let (parts, body) = req.into_parts();
        let body = match body.collect().await {
            Ok(b) => b.to_bytes(),
            Err(e) => return crate::body::proxy_response(StatusCode::BAD_REQUEST, &e.to_string()),
        };
        let text = format!(
            "{} {} {}",
            parts.method,
            parts.uri,
            String::from_utf8_lossy(&body)
        );
        let mut resp = Response::new(full(text));
        if let Some(v) = parts.headers.get("x-echo") {
            resp.headers_mut().insert("x-echo", v.clone());
        }
        resp
    }

    /// A connection served by `handle` on one end of a pipe, the caller's
    /// end, and the drain switch.
    fn start<H, F>(
        handle: H,
    ) -> (
        DuplexStream,
        tokio::task::JoinHandle<Ended>,
        oneshot::Sender<()>,
    )
    where
        H: FnMut(Request<Body>) -> F + Send + 'static,
        F: Future<Output = Response<Body>> + Send,
    {
        let (client, mut server) = tokio::io::duplex(64 * 1024);
        let (drain_tx, drain) = oneshot::channel();
        let task = tokio::spawn(async move { serve(&mut server, LIMITS, drain, handle).await });
        (client, task, drain_tx)
    }

    /// Everything until the server closes, without its `date` lines.
    async fn read_all(client: &mut DuplexStream) -> String {
        undated(&read_raw(client).await)
    }

    async fn read_raw(client: &mut DuplexStream) -> String {
        let mut got = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), client.read_to_end(&mut got))
            .await
            .expect("the server closed")
            .unwrap();
        String::from_utf8_lossy(&got).into_owned()
    }

    fn undated(got: &str) -> String {
        regex::Regex::new(r"date: [^\r]*\r\n")
            .unwrap()
            .replace_all(got, "")
            .into_owned()
    }

    /// Reads until `got` holds `n` responses' worth of `needle`.
    async fn read_until(client: &mut DuplexStream, needle: &str) -> String {
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while !String::from_utf8_lossy(&got).contains(needle) {
            let n = tokio::time::timeout(Duration::from_secs(10), client.read(&mut buf))
                .await
                .expect("no answer")
                .unwrap();
            assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&got));
            got.extend_from_slice(&buf[..n]);
        }
        undated(&String::from_utf8_lossy(&got))
    }

    #[tokio::test]
    async fn a_closing_answer_says_close_and_an_interim_status_is_no_answer() {
        let (mut client, _task, _drain) = start(|req: Request<Body>| async move {
            let mut resp = Response::new(full("x"));
            if req.uri().path() == "/interim" {
                *resp.status_mut() = StatusCode::CONTINUE;
            }
            resp.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("keep-alive"));
            resp
        });
        client
            .write_all(b"GET /interim HTTP/1.1\r\n\r\nGET / HTTP/1.1\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let got = read_all(&mut client).await;
        let (first, second) = got.split_once("HTTP/1.1 200").expect(&got);
        assert!(first.starts_with("HTTP/1.1 500 "), "{got}");
        assert!(
            second.starts_with(" OK\r\ncontent-length: 1\r\nconnection: close\r\n\r\nx"),
            "{got}"
        );
        assert!(!second.contains("keep-alive"), "{got}");
    }

    #[tokio::test(start_paused = true)]
    async fn empty_lines_neither_start_a_head_nor_keep_a_connection_open() {
        let (mut client, task, _drain) = start(echo);
        client.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        read_until(&mut client, "GET / ").await;
        // An empty line split over two reads: no 408 for it.
        client.write_all(b"\r").await.unwrap();
        tokio::time::sleep(Duration::from_millis(10)).await;
        client.write_all(b"\n").await.unwrap();
        tokio::time::sleep(LIMITS.head_timeout * 2).await;
        // Empty lines now and then do not put off the idle timeout.
        let tick = LIMITS.idle_timeout / 3;
        for _ in 0..2 {
            client.write_all(b"\r\n").await.unwrap();
            tokio::time::sleep(tick).await;
        }
        assert_eq!(read_all(&mut client).await, "");
        assert!(matches!(task.await.unwrap(), Ended::Closed));
    }

    #[tokio::test]
    async fn a_chunked_body_read_to_its_end_frees_the_connection_before_the_handler_takes_it() {
        let held = Arc::new(Mutex::new(Vec::new()));
        let keep = held.clone();
        let (mut client, _task, _drain) = start(move |req: Request<Body>| {
            let path = req.uri().path().to_owned();
            // The body is kept, never read.
            keep.lock().unwrap().push(req.into_body());
            async move { Response::new(full(path)) }
        });
        client
            .write_all(
                b"POST /a HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n\
                  GET /b HTTP/1.1\r\n\r\n",
            )
            .await
            .unwrap();
        let got = read_until(&mut client, "/b").await;
        assert!(got.ends_with("\r\n\r\n/b"), "{got}");
        assert_eq!(held.lock().unwrap().len(), 2);
    }

    #[test]
    fn fuzz_harness_over_the_seed_corpus() {
        for seed in crate::fuzz_seeds("h1_request") {
            for piece in 1..=9u8 {
                let mut input = vec![piece];
                input.extend_from_slice(&seed[1.min(seed.len())..]);
                fuzz_requests(&input);
            }
        }
    }

    #[tokio::test]
    async fn an_answers_own_connection_fields_go_on_a_connection_that_stays() {
        let (mut client, _task, _drain) = start(|_req| async {
            let mut resp = Response::new(full("x"));
            resp.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("keep-alive"));
            resp
        });
        client.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        assert_eq!(
            read_until(&mut client, "\r\n\r\nx").await,
            "HTTP/1.1 200 OK\r\ncontent-length: 1\r\nconnection: keep-alive\r\n\r\nx"
        );
    }

    #[tokio::test]
    async fn answers_carry_a_date_unless_they_have_one() {
        let (mut client, _task, _drain) = start(|req: Request<Body>| async move {
            let mut resp = Response::new(full("x"));
            if req.uri().path() == "/dated" {
                resp.headers_mut().insert(
                    header::DATE,
                    HeaderValue::from_static("Sun, 06 Nov 1994 08:49:37 GMT"),
                );
            }
            resp
        });
        client
            .write_all(b"GET / HTTP/1.1\r\n\r\nGET /dated HTTP/1.1\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let got = read_raw(&mut client).await;
        let dates: Vec<&str> = got.lines().filter(|l| l.starts_with("date: ")).collect();
        assert_eq!(dates.len(), 2, "{got}");
        let first = dates[0].trim_start_matches("date: ");
        let at = httpdate::parse_http_date(first).expect("an HTTP date");
        let age = SystemTime::now().duration_since(at).unwrap_or_default();
        assert!(age < Duration::from_secs(60), "{first}");
        assert_eq!(dates[1], "date: Sun, 06 Nov 1994 08:49:37 GMT");
    }

    #[tokio::test]
    async fn pipelined_requests_are_answered_in_order_on_one_connection() {
        let (mut client, task, _drain) = start(echo);
        client
            .write_all(
                b"GET /a?x=1 HTTP/1.1\r\nHost: h\r\nX-Echo: one\r\n\r\n\
                  POST /b HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nhello\
                  GET /c HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n",
            )
            .await
            .unwrap();
        let got = read_all(&mut client).await;
        assert_eq!(
            got,
            "HTTP/1.1 200 OK\r\nx-echo: one\r\ncontent-length: 11\r\n\r\nGET /a?x=1 \
             HTTP/1.1 200 OK\r\ncontent-length: 13\r\n\r\nPOST /b hello\
             HTTP/1.1 200 OK\r\ncontent-length: 7\r\nconnection: close\r\n\r\nGET /c "
        );
        assert!(matches!(task.await.unwrap(), Ended::Closed));
    }

    #[tokio::test]
    async fn a_chunked_upload_streams_to_the_handler_and_a_stream_answer_goes_chunked() {
        let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, BoxError>>(4);
        let answer = Arc::new(Mutex::new(Some(rx)));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (answer2, seen2) = (answer.clone(), seen.clone());
        let (mut client, _task, _drain) = start(move |req: Request<Body>| {
            let (answer, seen) = (answer2.clone(), seen2.clone());
            async move {
                let mut body = req.into_body();
                while let Some(frame) = body.frame().await {
                    let frame = frame.unwrap();
                    let piece = match frame.into_data() {
                        Ok(d) => String::from_utf8_lossy(&d).into_owned(),
                        Err(f) => format!("{:?}", f.into_trailers().unwrap()),
                    };
                    seen.lock().unwrap().push(piece);
                }
                let rx = answer.lock().unwrap().take().unwrap();
                let stream = futures_util::stream::unfold(rx, |mut rx| async move {
                    rx.recv().await.map(|item| (item, rx))
                });
                Response::new(boxed(StreamBody::new(stream)))
            }
        });
        client
            .write_all(
                b"POST / HTTP/1.1\r\nHost: h\r\nTE: trailers\r\nTransfer-Encoding: chunked\r\n\r\n\
                  3\r\nabc\r\n02;ext=1\r\nde\r\n0\r\nx-sum: 5\r\n\r\n",
            )
            .await
            .unwrap();
        // The head goes out before the body has anything.
        let head = read_until(&mut client, "\r\n\r\n").await;
        assert_eq!(
            head,
            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
        );
        assert_eq!(*seen.lock().unwrap(), ["abc", "de", "{\"x-sum\": \"5\"}"]);
        tx.send(Ok(Frame::data(Bytes::from_static(b"hello"))))
            .await
            .unwrap();
        assert_eq!(read_until(&mut client, "hello\r\n").await, "5\r\nhello\r\n");
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", HeaderValue::from_static("0"));
        // Not a field a trailer section may carry, nor the mesh's own.
        trailers.insert(header::CONTENT_LENGTH, HeaderValue::from_static("5"));
        trailers.insert(crate::config::REASON, HeaderValue::from_static("x"));
        tx.send(Ok(Frame::trailers(trailers))).await.unwrap();
        assert_eq!(
            read_until(&mut client, "\r\n\r\n").await,
            "0\r\ngrpc-status: 0\r\n\r\n"
        );
    }

    #[tokio::test]
    async fn trailers_are_dropped_for_a_caller_that_did_not_ask_for_them() {
        let (mut client, _task, _drain) = start(|_req| async {
            let mut trailers = HeaderMap::new();
            trailers.insert("grpc-status", HeaderValue::from_static("0"));
            let frames: Vec<Result<Frame<Bytes>, BoxError>> = vec![
                Ok(Frame::data(Bytes::from_static(b"ab"))),
                Ok(Frame::trailers(trailers)),
            ];
            Response::new(boxed(StreamBody::new(futures_util::stream::iter(frames))))
        });
        client
            .write_all(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
            .await
            .unwrap();
        let got = read_until(&mut client, "0\r\n\r\n").await;
        assert_eq!(
            got,
            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nab\r\n0\r\n\r\n"
        );
    }

    #[tokio::test]
    async fn bad_heads_are_answered_and_the_connection_closed() {
        for (wire, status) in [
            (&b"GET / HTTP/1.1\r\nHost h\r\n\r\n"[..], "400"),
            (b"\x16\x03\x01garbage\r\n\r\n", "400"),
            (b"GET / HTTP/2.0\r\n\r\n", "505"),
            (
                b"POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
                "400",
            ),
            (
                b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
                "400",
            ),
            (b"POST / HTTP/1.1\r\nContent-Length: 3, 4\r\n\r\n", "400"),
            (b"GET / HTTP/1.1\r\nHost: a\r\nhost: a\r\n\r\n", "400"),
            (b"POST / HTTP/1.1\r\nContent-Length:\r\n\r\n", "400"),
        ] {
            let (mut client, task, _drain) = start(echo);
            client.write_all(wire).await.unwrap();
            let got = read_all(&mut client).await;
            assert!(
                got.starts_with(&format!("HTTP/1.1 {status} ")),
                "{:?}: {got}",
                String::from_utf8_lossy(wire)
            );
            assert!(got.contains("connection: close\r\n"), "{got}");
            // Reported, for the metrics and the access log.
            match task.await.unwrap() {
                Ended::Refused(s, why) => {
                    assert_eq!(s.as_str(), status);
                    assert!(got.contains(why), "{got}");
                }
                e => panic!("{e:?} for {:?}", String::from_utf8_lossy(wire)),
            }
        }
        // Larger than max_head, whole or not.
        let mut big = b"GET / HTTP/1.1\r\nx-big: ".to_vec();
        big.resize(LIMITS.max_head + 10, b'a');
        for end in [&b""[..], b"\r\n\r\n"] {
            let (mut client, task, _drain) = start(echo);
            client.write_all(&big).await.unwrap();
            client.write_all(end).await.unwrap();
            assert!(read_all(&mut client).await.starts_with("HTTP/1.1 431 "));
            assert!(matches!(
                task.await.unwrap(),
                Ended::Refused(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE, _)
            ));
        }
        // More than 100 lines.
        let mut many = b"GET / HTTP/1.1\r\n".to_vec();
        for i in 0..101 {
            many.extend_from_slice(format!("x-{i}: 1\r\n").as_bytes());
        }
        many.extend_from_slice(b"\r\n");
        let (mut client, _task, _drain) = start(echo);
        client.write_all(&many).await.unwrap();
        assert!(read_all(&mut client).await.starts_with("HTTP/1.1 431 "));
    }

    #[tokio::test(start_paused = true)]
    async fn a_stalled_head_gets_408_and_a_silent_connection_just_closes() {
        let (mut client, task, _drain) = start(echo);
        client.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        let got = read_all(&mut client).await;
        assert!(got.starts_with("HTTP/1.1 408 "), "{got}");
        assert!(matches!(
            task.await.unwrap(),
            Ended::Refused(StatusCode::REQUEST_TIMEOUT, _)
        ));

        // Idle past the head timeout is fine; past the idle timeout, closed
        // without a word.
        let (mut client, task, _drain) = start(echo);
        tokio::time::sleep(LIMITS.head_timeout * 2).await;
        client
            .write_all(b"GET /late HTTP/1.1\r\n\r\n")
            .await
            .unwrap();
        read_until(&mut client, "GET /late").await;
        // A stray empty line (some clients end a body with one) begins no
        // head: no 408 for it.
        client.write_all(b"\r\n").await.unwrap();
        tokio::time::sleep(LIMITS.head_timeout * 2).await;
        client
            .write_all(b"GET /later HTTP/1.1\r\n\r\n")
            .await
            .unwrap();
        assert!(
            read_until(&mut client, "GET /later")
                .await
                .starts_with("HTTP/1.1 200 ")
        );
        tokio::time::sleep(LIMITS.idle_timeout + Duration::from_secs(1)).await;
        assert_eq!(read_all(&mut client).await, "");
        assert!(matches!(task.await.unwrap(), Ended::Closed));
    }

    #[tokio::test]
    async fn requests_for_hyper_hand_over_their_head_and_what_followed() {
        for head in [
            &b"GET /ws HTTP/1.1\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n"[..],
            b"PUT / HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n",
            b"GET / HTTP/1.0\r\n\r\n",
            b"CONNECT h:443 HTTP/1.1\r\nHost: h:443\r\n\r\n",
        ] {
            let (mut client, task, _drain) = start(echo);
            // An ordinary request first: served here.
            client
                .write_all(b"GET /first HTTP/1.1\r\n\r\n")
                .await
                .unwrap();
            read_until(&mut client, "GET /first").await;
            let mut wire = head.to_vec();
            wire.extend_from_slice(b"after");
            client.write_all(&wire).await.unwrap();
            match tokio::time::timeout(Duration::from_secs(10), task)
                .await
                .unwrap()
                .unwrap()
            {
                Ended::Hyper(rest) => assert_eq!(rest, wire, "{}", String::from_utf8_lossy(head)),
                e => panic!("{e:?} at {}", String::from_utf8_lossy(head)),
            }
        }
    }

    #[tokio::test]
    async fn a_caller_leaving_mid_request_cancels_it() {
        let (dropped_tx, dropped) = oneshot::channel::<()>();
        let dropped_tx = Arc::new(Mutex::new(Some(dropped_tx)));
        let (mut client, task, _drain) = start(move |_req| {
            let guard = Guard(dropped_tx.lock().unwrap().take());
            async move {
                let _guard = guard;
                std::future::pending::<Response<Body>>().await
            }
        });
        client.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        tokio::task::yield_now().await;
        drop(client);
        tokio::time::timeout(Duration::from_secs(10), dropped)
            .await
            .expect("the request was not cancelled")
            .unwrap_err();
        assert!(matches!(task.await.unwrap(), Ended::Closed));
    }

    struct Guard(#[allow(dead_code)] Option<oneshot::Sender<()>>);

    #[tokio::test]
    async fn an_upload_answered_early_is_read_to_its_end_before_the_next_request() {
        let (body_tx, body_rx) = oneshot::channel::<Body>();
        let body_tx = Arc::new(Mutex::new(Some(body_tx)));
        let (mut client, _task, _drain) = start(move |req: Request<Body>| {
            let keep = body_tx.lock().unwrap().take();
            async move {
                match keep {
                    // The first request's body goes elsewhere, to be read
                    // after its answer.
                    Some(tx) => {
                        let _ = tx.send(req.into_body());
                        Response::new(full("early"))
                    }
                    None => echo(req).await,
                }
            }
        });
        client
            .write_all(b"POST /up HTTP/1.1\r\nContent-Length: 6\r\n\r\nabc")
            .await
            .unwrap();
        read_until(&mut client, "early").await;
        client.write_all(b"def").await.unwrap();
        let body = tokio::time::timeout(Duration::from_secs(10), async {
            body_rx.await.unwrap().collect().await.unwrap().to_bytes()
        })
        .await
        .expect("the upload was not read after its answer");
        assert_eq!(body, "abcdef");
        client
            .write_all(b"GET /next HTTP/1.1\r\n\r\n")
            .await
            .unwrap();
        read_until(&mut client, "GET /next ").await;
    }

    #[tokio::test]
    async fn a_body_left_unread_closes_the_connection_after_its_answer() {
        let (mut client, task, _drain) = start(|_req| async { Response::new(full("no")) });
        client
            .write_all(b"POST / HTTP/1.1\r\nContent-Length: 10\r\n\r\nabc")
            .await
            .unwrap();
        assert_eq!(
            read_all(&mut client).await,
            "HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nno"
        );
        assert!(matches!(task.await.unwrap(), Ended::Closed));
        // All of it here already: passed over, and the connection goes on.
        let (mut client, _task, _drain) = start(|req: Request<Body>| async move {
            Response::new(full(req.uri().path().to_owned()))
        });
        client
            .write_all(b"POST /a HTTP/1.1\r\nContent-Length: 5\r\n\r\nhelloGET /b HTTP/1.1\r\n\r\n")
            .await
            .unwrap();
        assert_eq!(
            read_until(&mut client, "/b").await,
            "HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n/aHTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n/b"
        );
    }

    #[tokio::test]
    async fn a_body_cut_by_the_callers_close_fails_rather_than_ends() {
        for wire in [
            &b"POST /up HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"[..],
            b"POST /up HTTP/1.1\r\nContent-Length: 9\r\n\r\nhello",
        ] {
            let (body_tx, body_rx) = oneshot::channel::<Body>();
            let body_tx = Mutex::new(Some(body_tx));
            let (mut client, task, _drain) = start(move |req: Request<Body>| {
                let _ = body_tx
                    .lock()
                    .unwrap()
                    .take()
                    .unwrap()
                    .send(req.into_body());
                async { Response::new(full("early")) }
            });
            client.write_all(wire).await.unwrap();
            read_until(&mut client, "early").await;
            drop(client);
            let read = tokio::time::timeout(Duration::from_secs(10), async {
                body_rx.await.unwrap().collect().await
            })
            .await
            .expect("the body never ended");
            let err = read.expect_err("a cut body read as whole");
            assert!(
                err.to_string()
                    .contains("ended before the request body did"),
                "{err}"
            );
            assert!(matches!(task.await.unwrap(), Ended::Closed));
        }
    }

    #[tokio::test]
    async fn head_204_and_304_answers_carry_no_body() {
        let (mut client, _task, _drain) = start(|req: Request<Body>| async move {
            let status = match req.uri().path() {
                "/204" => StatusCode::NO_CONTENT,
                "/304" => StatusCode::NOT_MODIFIED,
                _ => StatusCode::OK,
            };
            let mut resp = Response::new(full("body"));
            *resp.status_mut() = status;
            resp.headers_mut()
                .insert(header::CONTENT_LENGTH, HeaderValue::from_static("4"));
            resp
        });
        client
            .write_all(
                b"HEAD / HTTP/1.1\r\n\r\nGET /204 HTTP/1.1\r\n\r\nGET /304 HTTP/1.1\r\n\r\n\
                  GET / HTTP/1.1\r\nConnection: close\r\n\r\n",
            )
            .await
            .unwrap();
        assert_eq!(
            read_all(&mut client).await,
            "HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\n\
             HTTP/1.1 204 No Content\r\n\r\n\
             HTTP/1.1 304 Not Modified\r\ncontent-length: 4\r\n\r\n\
             HTTP/1.1 200 OK\r\ncontent-length: 4\r\nconnection: close\r\n\r\nbody"
        );
    }

    #[tokio::test]
    async fn a_response_body_that_fails_or_runs_over_its_length_cuts_the_connection() {
        for (framing, frames) in [
            ("chunked", vec![Ok(Bytes::from_static(b"ab")), Err("broke")]),
            ("3", vec![Ok(Bytes::from_static(b"abcd"))]),
            ("5", vec![Ok(Bytes::from_static(b"ab"))]),
        ] {
            let (mut client, task, _drain) = start(move |_req| {
                let frames: Vec<Result<Frame<Bytes>, BoxError>> = frames
                    .clone()
                    .into_iter()
                    .map(|f| f.map(Frame::data).map_err(BoxError::from))
                    .collect();
                async move {
                    let mut resp =
                        Response::new(boxed(StreamBody::new(futures_util::stream::iter(frames))));
                    if framing != "chunked" {
                        resp.headers_mut().insert(
                            header::CONTENT_LENGTH,
                            HeaderValue::from_str(framing).unwrap(),
                        );
                    }
                    resp
                }
            });
            client
                .write_all(b"GET / HTTP/1.1\r\n\r\nGET /again HTTP/1.1\r\n\r\n")
                .await
                .unwrap();
            let got = read_all(&mut client).await;
            assert!(got.starts_with("HTTP/1.1 200 OK\r\n"), "{framing}: {got}");
            assert!(!got.contains("0\r\n\r\n"), "{framing}: {got}");
            assert_eq!(got.matches("HTTP/1.1").count(), 1, "{framing}: {got}");
            assert!(matches!(task.await.unwrap(), Ended::Closed));
        }
    }

    #[tokio::test]
    async fn drain_closes_an_idle_connection_and_ends_one_in_flight_after_its_answer() {
        let (mut client, task, drain) = start(echo);
        drain.send(()).unwrap();
        assert_eq!(read_all(&mut client).await, "");
        assert!(matches!(task.await.unwrap(), Ended::Closed));

        let (go_tx, go) = oneshot::channel::<()>();
        let go = Arc::new(tokio::sync::Mutex::new(Some(go)));
        let (mut client, task, drain) = start(move |req| {
            let go = go.clone();
            async move {
                if let Some(go) = go.lock().await.take() {
                    let _ = go.await;
                }
                echo(req).await
            }
        });
        client
            .write_all(b"GET /slow HTTP/1.1\r\n\r\n")
            .await
            .unwrap();
        tokio::task::yield_now().await;
        drain.send(()).unwrap();
        go_tx.send(()).unwrap();
        assert_eq!(
            read_all(&mut client).await,
            "HTTP/1.1 200 OK\r\ncontent-length: 10\r\nconnection: close\r\n\r\nGET /slow "
        );
        assert!(matches!(task.await.unwrap(), Ended::Closed));
    }

    #[tokio::test]
    async fn a_malformed_chunked_body_fails_for_the_handler() {
        let (mut client, _task, _drain) = start(echo);
        client
            .write_all(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n")
            .await
            .unwrap();
        let got = read_all(&mut client).await;
        assert!(got.starts_with("HTTP/1.1 400 "), "{got}");
        assert!(
            got.contains("the request body is malformed: chunk size"),
            "{got}"
        );
    }
}
