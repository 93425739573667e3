//! HTTP/1.1 towards a workload, without a task of its own.
//!
//! hyper's client runs every connection as a task and hands requests and
//! responses to it through channels: three task hand-offs per request on the
//! inbound side's critical path, and about a quarter of the proxy's
//! instructions per request. Here the request's own future writes the request
//! and reads the response head, and the response body reads the rest from the
//! socket as the caller polls it. A connection carries one exchange at a time
//! and is reusable once both the request and the response have been carried
//! to their ends ([`ResponseBody::take_idle`]).
//!
//! Framing follows RFC 9112: the request body goes with its known length or
//! chunked; the response body is delimited by `HEAD`/1xx/204/304, then
//! `Transfer-Encoding`, then `Content-Length`, else by the connection's end.
//! Everything read from the workload is bounded: the response head by
//! `max_head` bytes and 100 header lines, a chunk-size line by 4 KiB.

use std::{
    collections::VecDeque,
    io::{self, IoSlice},
    pin::Pin,
    task::{Context, Poll, ready},
    time::Duration,
};

use bytes::{Buf, Bytes, BytesMut};
use http::{
    HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, Version, header,
};
use http_body::{Body as _, Frame, SizeHint};
use tokio::{io::AsyncWrite, net::TcpStream};

use crate::body::{Body, BoxError};

/// Header lines in a response head or a trailer section (hyper's default).
pub(crate) const MAX_HEADERS: usize = 100;
/// A chunk-size line, extensions included.
const MAX_CHUNK_LINE: usize = 4096;
/// Request body bytes queued before the socket must take some.
const WRITE_QUEUE: usize = 64 * 1024;
/// How long the rest of an upload the workload has already answered may
/// take (neither the caller nor the workload may ever finish it).
const UPLOAD_AFTER_ANSWER: std::time::Duration = std::time::Duration::from_secs(300);
/// Read-buffer growth per read.
pub(crate) const READ_CHUNK: usize = 8 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("the workload closed the connection before answering")]
    ClosedBeforeResponse,
    #[error("the workload closed the connection in the middle of its response body")]
    ClosedInBody,
    #[error("the workload's response head is larger than {0} bytes")]
    HeadTooLarge(usize),
    #[error("the workload sent more than {MAX_INTERIM} interim (1xx) responses before a final one")]
    TooManyInterim,
    #[error("the workload's response is not valid HTTP/1.1: {0}")]
    Invalid(&'static str),
    #[error("the workload answered 101 Switching Protocols to a request that asked for no upgrade")]
    UnaskedUpgrade,
    #[error("the request body failed: {0}")]
    RequestBody(BoxError),
    #[error("the request body does not match its content-length ({0} bytes)")]
    RequestBodyLength(u64),
}

impl Error {
    /// Nothing of a response arrived because the connection was already
    /// gone: on a reused connection, the workload had closed it while idle.
    pub fn closed_before_response(&self) -> bool {
        match self {
            Error::ClosedBeforeResponse => true,
            Error::Io(e) => matches!(
                e.kind(),
                io::ErrorKind::ConnectionReset
                    | io::ErrorKind::BrokenPipe
                    | io::ErrorKind::ConnectionAborted
            ),
            _ => false,
        }
    }
}

/// An open connection to a workload, between exchanges.
#[derive(Debug)]
pub struct Conn {
    io: TcpStream,
    rbuf: BytesMut,
    /// Until when the workload keeps it open, less a margin, as its last
    /// response's `keep-alive: timeout=` said (`None`: not said).
    reuse_until: Option<tokio::time::Instant>,
}

impl Conn {
    pub fn new(io: TcpStream) -> Self {
        Self {
            io,
            rbuf: BytesMut::new(),
            reuse_until: None,
        }
    }

    /// Whether this connection, idle in a pool since `since`, may still
    /// take a request at `now`: within the pool's `idle` timeout, and
    /// before the workload closes it if it said when (Node.js servers close
    /// idle connections after 5 s and send `keep-alive: timeout=5`). A
    /// request sent as the workload closes one would fail, a `POST` with a
    /// `502`.
    pub fn fresh(
        &self,
        now: tokio::time::Instant,
        since: tokio::time::Instant,
        idle: Duration,
    ) -> bool {
        now.duration_since(since) < idle && self.reuse_until.is_none_or(|until| now < until)
    }

    /// Whether an idle connection can take a request: the workload has not
    /// closed it and sent nothing unasked. Does not wait.
    pub fn is_usable(&mut self) -> bool {
        // No syscall unless the socket was seen readable; unlike a poll,
        // not subject to the task's cooperative budget (which would answer
        // "not ready" for a socket that is).
        let mut probe = [0u8; 1];
        matches!(self.io.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
    }
}

/// How the request body is framed on the wire.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Framing {
    /// No body.
    None,
    /// `Content-Length`, with the bytes still to come.
    Length(u64),
    Chunked,
}

/// The request side of an exchange: bytes queued for the socket and the
/// body still to be read from the caller.
struct Outgoing {
    queue: VecDeque<Bytes>,
    queued: usize,
    body: Option<Body>,
    framing: Framing,
    /// The body was sent to its end and the queue written.
    done: bool,
    /// Writing failed; the response may still arrive (a workload that
    /// answers an upload early and closes).
    failed: Option<Error>,
}

impl std::fmt::Debug for Outgoing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outgoing")
            .field("queued", &self.queued)
            .field("framing", &self.framing)
            .field("done", &self.done)
            .finish_non_exhaustive()
    }
}

impl Outgoing {
    fn push(&mut self, b: Bytes) {
        self.queued += b.len();
        self.queue.push_back(b);
    }

    /// The request itself failed (its body broke off, or did not match its
    /// length): the exchange cannot go on. A failed write, by contrast, may
    /// still be followed by the workload's answer.
    fn take_fatal(&mut self) -> Option<Error> {
        match self.failed {
            Some(Error::Io(_)) | None => None,
            Some(_) => self.failed.take(),
        }
    }

    fn poll_flush(&mut self, io: &mut TcpStream, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.queue.is_empty() {
            let mut slices = [IoSlice::new(&[]); 16];
            let n = self
                .queue
                .iter()
                .zip(slices.iter_mut())
                .map(|(b, s)| *s = IoSlice::new(b))
                .count();
            let mut written = ready!(Pin::new(&mut *io).poll_write_vectored(cx, &slices[..n]))?;
            if written == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.queued -= written;
            while written > 0 {
                let front = self.queue.front_mut().expect("written bytes were queued");
                if written >= front.len() {
                    written -= front.len();
                    self.queue.pop_front();
                } else {
                    front.advance(written);
                    written = 0;
                }
            }
        }
        Poll::Ready(Ok(()))
    }

    /// Carries the request forward as far as the socket and the caller's
    /// body allow. `Ready(())` once it is done or has failed.
    fn poll_send(&mut self, io: &mut TcpStream, cx: &mut Context<'_>) -> Poll<()> {
        if self.done || self.failed.is_some() {
            return Poll::Ready(());
        }
        match self.poll_send_inner(io, cx) {
            Poll::Ready(Ok(())) => {
                self.done = true;
                Poll::Ready(())
            }
            Poll::Ready(Err(e)) => {
                self.body = None;
                self.queue.clear();
                self.failed = Some(e);
                Poll::Ready(())
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn poll_send_inner(
        &mut self,
        io: &mut TcpStream,
        cx: &mut Context<'_>,
    ) -> Poll<Result<(), Error>> {
        loop {
            let flushed = self.poll_flush(io, cx)?.is_ready();
            let Some(body) = self.body.as_mut() else {
                return if flushed {
                    Poll::Ready(Ok(()))
                } else {
                    Poll::Pending
                };
            };
            if self.queued >= WRITE_QUEUE {
                return Poll::Pending;
            }
            match Pin::new(body).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => self.push_data(data)?,
                    Err(frame) => {
                        // Trailers go only where the framing has room.
                        if let (Ok(mut trailers), Framing::Chunked) =
                            (frame.into_trailers(), self.framing)
                        {
                            self.body = None;
                            keep_trailer_fields(&mut trailers);
                            let mut end = b"0\r\n".to_vec();
                            encode_fields(&mut end, &trailers);
                            end.extend_from_slice(b"\r\n");
                            self.push(Bytes::from(end));
                        }
                    }
                },
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(Error::RequestBody(e))),
                Poll::Ready(None) => {
                    self.body = None;
                    match self.framing {
                        Framing::Chunked => self.push(Bytes::from_static(b"0\r\n\r\n")),
                        Framing::Length(0) | Framing::None => {}
                        Framing::Length(_) => {
                            return Poll::Ready(Err(self.length_mismatch()));
                        }
                    }
                }
                // Both wakers are set: the body's, and the socket's when the
                // queue is not written yet.
                Poll::Pending => return Poll::Pending,
            }
        }
    }

    fn length_mismatch(&self) -> Error {
        Error::RequestBodyLength(match self.framing {
            Framing::Length(n) => n,
            _ => 0,
        })
    }

    fn push_data(&mut self, data: Bytes) -> Result<(), Error> {
        if data.is_empty() {
            return Ok(());
        }
        match &mut self.framing {
            Framing::None => return Err(Error::RequestBodyLength(0)),
            Framing::Length(left) => {
                if data.len() as u64 > *left {
                    return Err(Error::RequestBodyLength(*left));
                }
                *left -= data.len() as u64;
                self.push(data);
            }
            Framing::Chunked => {
                self.push(Bytes::from(format!("{:x}\r\n", data.len())));
                self.push(data);
                self.push(Bytes::from_static(b"\r\n"));
            }
        }
        Ok(())
    }
}

/// `name: value\r\n` lines. HTTP/2 clients send each cookie as a field of
/// its own; towards HTTP/1.1 they become one line joined by `; ` (RFC 9113
/// 8.2.3), which is what HTTP/1.1 servers read.
fn encode_fields(out: &mut Vec<u8>, h: &HeaderMap) {
    let mut cookies_done = false;
    for (k, v) in h {
        if k == header::COOKIE {
            if cookies_done {
                continue;
            }
            cookies_done = true;
            out.extend_from_slice(b"cookie: ");
            for (i, c) in h.get_all(header::COOKIE).iter().enumerate() {
                if i > 0 {
                    out.extend_from_slice(b"; ");
                }
                out.extend_from_slice(c.as_bytes());
            }
            out.extend_from_slice(b"\r\n");
            continue;
        }
        out.extend_from_slice(k.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(v.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
}

/// Takes out the fields a trailer section must not carry (they would frame,
/// route, authenticate or describe the message if merged into its header,
/// as some servers do), and the mesh's own.
pub(crate) fn keep_trailer_fields(h: &mut HeaderMap) {
    const FORBIDDEN: &[&str] = &[
        "authorization",
        "cache-control",
        "connection",
        "content-encoding",
        "content-length",
        "content-range",
        "content-type",
        "cookie",
        "expect",
        "host",
        "keep-alive",
        "max-forwards",
        "pragma",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "range",
        "set-cookie",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "www-authenticate",
    ];
    for name in FORBIDDEN {
        h.remove(*name);
    }
    crate::body::remove_mesh_headers(h);
}

/// Which framing fields a head carries, noted in one pass over its lines:
/// most heads have none but `content-length`, and looking each one up by
/// name costs a hash and a probe per name.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct FramingFields {
    connection: bool,
    pub(crate) transfer_encoding: bool,
    /// `content-length` lines, counted up to two.
    pub(crate) content_lengths: u8,
    /// A `content-length` value that is a list (`5, 5`).
    length_list: bool,
    /// A `keep-alive` line (not framing, but read from responses).
    keep_alive: bool,
    /// An `expect` line (a request's `100-continue`).
    expect: bool,
}

impl FramingFields {
    pub(crate) fn note(&mut self, name: &HeaderName, value: &[u8]) {
        if *name == header::CONNECTION {
            self.connection = true;
        } else if *name == header::TRANSFER_ENCODING {
            self.transfer_encoding = true;
        } else if *name == header::CONTENT_LENGTH {
            self.content_lengths = self.content_lengths.saturating_add(1).min(2);
            self.length_list |= value.contains(&b',');
        } else if *name == crate::body::KEEP_ALIVE {
            self.keep_alive = true;
        } else if *name == header::EXPECT {
            self.expect = true;
        }
    }

    fn of(h: &HeaderMap) -> FramingFields {
        let mut seen = FramingFields::default();
        for (name, value) in h {
            seen.note(name, value.as_bytes());
        }
        seen
    }
}

/// The length every `Content-Length` value of `h` gives (`5, 5` and
/// repeated fields are valid), `None` without one; the error names what is
/// wrong.
fn content_length(h: &HeaderMap) -> Result<Option<u64>, &'static str> {
    let mut length = None;
    for v in h.get_all(header::CONTENT_LENGTH) {
        note_length(v.as_bytes(), &mut length)?;
    }
    Ok(length)
}

/// Whether the transfer codings of `h` are `chunked` alone, once: a body
/// crosses the mesh decoded, and another coding (`gzip, chunked`) would
/// reach the other side still applied with nothing left to say so.
pub(crate) fn only_chunked(h: &HeaderMap) -> bool {
    let mut codings = h
        .get_all(header::TRANSFER_ENCODING)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .map(<[u8]>::trim_ascii)
        .filter(|c| !c.is_empty());
    codings
        .next()
        .is_some_and(|c| c.eq_ignore_ascii_case(b"chunked"))
        && codings.next().is_none()
}

/// Adds one `Content-Length` value (`5` or a list `5, 5`) to the `length`
/// of the values before it, which it must agree with.
pub(crate) fn note_length(value: &[u8], length: &mut Option<u64>) -> Result<(), &'static str> {
    for part in value.split(|&b| b == b',') {
        let part = part.trim_ascii();
        if part.is_empty() || !part.iter().all(u8::is_ascii_digit) {
            return Err("content-length");
        }
        let n: u64 = std::str::from_utf8(part)
            .ok()
            .and_then(|p| p.parse().ok())
            .ok_or("content-length")?;
        if length.is_some_and(|l| l != n) {
            return Err("conflicting content-length values");
        }
        *length = Some(n);
    }
    Ok(())
}

/// How long a connection may be reused for after a response head, from
/// its `keep-alive: timeout=N` (seconds the server keeps it open idle; a
/// convention of HTTP/1.0 that servers still send; the smallest if more
/// than one): a margin short of it. Counted from the head, which the
/// server sent before it finished the response and started its clock, so
/// a slowly read body cannot push the reuse past the server's close.
/// `None` without a (valid) timeout.
fn reuse_within(h: &HeaderMap) -> Option<Duration> {
    let secs = h
        .get_all(crate::body::KEEP_ALIVE)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .filter_map(|param| {
            let (k, v) = std::str::from_utf8(param).ok()?.split_once('=')?;
            k.trim()
                .eq_ignore_ascii_case("timeout")
                .then(|| v.trim().trim_matches('"').parse::<u64>().ok())?
        })
        .min()?;
    let timeout = Duration::from_secs(secs);
    Some(timeout - (timeout / 2).min(Duration::from_secs(1)))
}

/// Byte by byte: a value with other bytes than visible ASCII in it (which
/// `to_str` refuses) still says `close`.
fn has_token(h: &HeaderMap, name: HeaderName, token: &str) -> bool {
    h.get_all(name).iter().any(|v| {
        v.as_bytes()
            .split(|&b| b == b',')
            .any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
    })
}

/// Whether a body that has not ended yet turns out, from what has already
/// arrived, to end with nothing in it (some HTTP/2 clients end a `GET` with
/// an empty DATA frame after its head). Does not wait: anything else, data or
/// nothing yet, is a body to send (chunked), and a frame read here goes back
/// in front of it.
fn ends_empty(body: &mut Body) -> bool {
    let mut cx = Context::from_waker(std::task::Waker::noop());
    loop {
        match Pin::new(&mut *body).poll_frame(&mut cx) {
            Poll::Ready(None) => return true,
            Poll::Ready(Some(Ok(f))) if f.data_ref().is_some_and(|d| d.is_empty()) => {
                if body.is_end_stream() {
                    return true;
                }
            }
            Poll::Ready(Some(first)) => {
                use futures_util::StreamExt as _;
                let rest = std::mem::replace(body, crate::body::empty());
                *body = crate::body::boxed(http_body_util::StreamBody::new(
                    futures_util::stream::once(std::future::ready(first))
                        .chain(http_body_util::BodyStream::new(rest)),
                ));
                return false;
            }
            Poll::Pending => return false,
        }
    }
}

/// Methods whose request defines a meaning for enclosed content: an empty
/// body still says `content-length: 0`.
fn expects_body(m: &Method) -> bool {
    !matches!(
        *m,
        Method::GET
            | Method::HEAD
            | Method::DELETE
            | Method::OPTIONS
            | Method::CONNECT
            | Method::TRACE
    )
}

/// A request ready for the wire: its head encoded, its body to follow.
pub struct Prepared {
    head: Bytes,
    body: Option<Body>,
    framing: Framing,
    head_request: bool,
    /// The request said `connection: close`.
    close: bool,
    idempotent: bool,
}

impl Prepared {
    /// The request's URI goes out as it is (the caller makes it origin
    /// form), its headers as they are but for the framing ones, which follow
    /// the body: its exact length, else chunked.
    pub fn new(req: Request<Body>) -> Self {
        let (mut parts, mut body) = req.into_parts();
        let seen = FramingFields::of(&parts.headers);
        if seen.transfer_encoding {
            parts.headers.remove(header::TRANSFER_ENCODING);
        }
        // The body goes at once (the caller's node answered `100 Continue`
        // already): a workload told to expect it might answer early without
        // reading it, then take the body for its next request.
        if seen.expect {
            parts.headers.remove(header::EXPECT);
        }
        let declared = |h: &HeaderMap| {
            if seen.content_lengths == 0 {
                return None;
            }
            h.get(header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
        };
        let framing = if http_body::Body::is_end_stream(&body) {
            if seen.content_lengths > 0 {
                parts.headers.remove(header::CONTENT_LENGTH);
            }
            if expects_body(&parts.method) {
                parts
                    .headers
                    .insert(header::CONTENT_LENGTH, HeaderValue::from_static("0"));
                Framing::Length(0)
            } else {
                Framing::None
            }
        } else if let Some(n) = http_body::Body::size_hint(&body)
            .exact()
            .or_else(|| declared(&parts.headers))
        {
            parts
                .headers
                .insert(header::CONTENT_LENGTH, HeaderValue::from(n));
            Framing::Length(n)
        } else if !expects_body(&parts.method) && ends_empty(&mut body) {
            // A GET or HEAD whose stream merely did not end with its head
            // (an empty DATA frame with END_STREAM came after it): no body,
            // rather than a chunked one such servers would not expect.
            Framing::None
        } else {
            parts.headers.remove(header::CONTENT_LENGTH);
            parts.headers.insert(
                header::TRANSFER_ENCODING,
                HeaderValue::from_static("chunked"),
            );
            Framing::Chunked
        };
        let target = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
        let mut head = Vec::with_capacity(128 + 48 * parts.headers.len());
        head.extend_from_slice(parts.method.as_str().as_bytes());
        head.push(b' ');
        head.extend_from_slice(target.as_bytes());
        head.extend_from_slice(b" HTTP/1.1\r\n");
        encode_fields(&mut head, &parts.headers);
        head.extend_from_slice(b"\r\n");
        Prepared {
            head: Bytes::from(head),
            body: (framing != Framing::None).then_some(body),
            framing,
            head_request: parts.method == Method::HEAD,
            close: seen.connection && has_token(&parts.headers, header::CONNECTION, "close"),
            idempotent: parts.method.is_idempotent(),
        }
    }

    /// The same request again, for a new connection after a reused one
    /// turned out closed: only for an idempotent request without a body,
    /// which is all in its head.
    pub fn replay(&self) -> Option<Prepared> {
        (self.idempotent && self.body.is_none()).then(|| Prepared {
            head: self.head.clone(),
            body: None,
            framing: self.framing,
            head_request: self.head_request,
            close: self.close,
            idempotent: self.idempotent,
        })
    }
}

/// One request on `conn`, up to its response head; the response body reads
/// the rest.
pub async fn send(
    conn: Conn,
    req: Prepared,
    max_head: usize,
) -> Result<Response<ResponseBody>, Error> {
    let mut ex = Exchange {
        conn,
        out: Outgoing {
            queue: VecDeque::with_capacity(4),
            queued: 0,
            body: req.body,
            framing: req.framing,
            done: false,
            failed: None,
        },
        dec: Decoder {
            max_head,
            head_request: req.head_request,
            close: req.close,
            interim: 0,
            reuse_until: None,
        },
        answered: false,
    };
    ex.out.push(req.head);
    let (resp, mode) = std::future::poll_fn(|cx| ex.poll_head(cx)).await?;
    Ok(resp.map(|()| ResponseBody {
        ex: Some(Box::new(ex)),
        mode,
    }))
}

#[derive(Debug)]
struct Exchange {
    conn: Conn,
    out: Outgoing,
    dec: Decoder,
    /// Some of a response (an interim one counts) has arrived: the workload
    /// has seen the request.
    answered: bool,
}

/// What reading a response needs to know of its request; reads only from
/// a buffer, so that it can be fuzzed without a socket.
#[derive(Debug, Clone, Copy)]
struct Decoder {
    max_head: usize,
    /// A `HEAD` request: the response has no body.
    head_request: bool,
    /// The request said `connection: close`.
    close: bool,
    /// Interim (1xx) responses passed over so far.
    interim: u32,
    /// From the final response's `keep-alive` field: until when the
    /// connection may be reused (see [`reuse_within`]).
    reuse_until: Option<tokio::time::Instant>,
}

/// Interim (1xx) responses passed over before a final one at the most: a
/// workload that sends nothing else must not hold the exchange until the
/// idle timeout (real servers send one or two: `100 Continue`, `103 Early
/// Hints`).
const MAX_INTERIM: u32 = 16;

impl Exchange {
    /// Sends what can be sent, then reads until a final response head.
    fn poll_head(&mut self, cx: &mut Context<'_>) -> Poll<Result<(Response<()>, Mode), Error>> {
        loop {
            let _ = self.out.poll_send(&mut self.conn.io, cx);
            // The workload waits for the rest of a request that will not
            // come: dropping the exchange closes the connection.
            if let Some(e) = self.out.take_fatal() {
                return Poll::Ready(Err(e));
            }
            if !self.conn.rbuf.is_empty()
                && let Some(head) = self.dec.parse_head(&mut self.conn.rbuf)?
            {
                return Poll::Ready(Ok(head));
            }
            match ready!(self.poll_read(cx)) {
                Ok(0) if self.answered => {
                    return Poll::Ready(Err(Error::Invalid(
                        "the connection ended inside the response head",
                    )));
                }
                // Nothing came back: the request may have failed to go out
                // for the same reason, so say that.
                Ok(0) => {
                    return Poll::Ready(Err(match self.out.failed.take() {
                        Some(e) => e,
                        None => Error::ClosedBeforeResponse,
                    }));
                }
                Ok(_) => self.answered = true,
                Err(_) if self.answered => {
                    return Poll::Ready(Err(Error::Invalid(
                        "the connection failed inside the response head",
                    )));
                }
                Err(e) => return Poll::Ready(Err(self.out.failed.take().unwrap_or(Error::Io(e)))),
            }
        }
    }

    fn poll_read(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        let rbuf = &mut self.conn.rbuf;
        if rbuf.capacity() - rbuf.len() < 1024 {
            rbuf.reserve(READ_CHUNK);
        }
        tokio_util::io::poll_read_buf(Pin::new(&mut self.conn.io), cx, rbuf)
    }
}

impl Decoder {
    /// A final response head from the read buffer, if complete; 1xx
    /// interim responses are passed over.
    fn parse_head(&mut self, rbuf: &mut BytesMut) -> Result<Option<(Response<()>, Mode)>, Error> {
        loop {
            let mut lines = [httparse::EMPTY_HEADER; MAX_HEADERS];
            let mut parsed = httparse::Response::new(&mut lines);
            let n = match parsed.parse(rbuf) {
                Ok(httparse::Status::Complete(n)) if n > self.max_head => {
                    return Err(Error::HeadTooLarge(self.max_head));
                }
                Ok(httparse::Status::Complete(n)) => n,
                Ok(httparse::Status::Partial) if rbuf.len() > self.max_head => {
                    return Err(Error::HeadTooLarge(self.max_head));
                }
                Ok(httparse::Status::Partial) => return Ok(None),
                Err(httparse::Error::TooManyHeaders) => {
                    return Err(Error::Invalid("more than 100 header lines"));
                }
                Err(_) => return Err(Error::Invalid("malformed response head")),
            };
            let code = parsed.code.expect("a complete head has a status");
            let status = StatusCode::from_u16(code).map_err(|_| Error::Invalid("status code"))?;
            if status == StatusCode::SWITCHING_PROTOCOLS {
                return Err(Error::UnaskedUpgrade);
            }
            if status.is_informational() {
                self.interim += 1;
                if self.interim > MAX_INTERIM {
                    return Err(Error::TooManyInterim);
                }
                rbuf.advance(n);
                continue;
            }
            let version = if parsed.version == Some(0) {
                Version::HTTP_10
            } else {
                Version::HTTP_11
            };
            let mut headers = HeaderMap::with_capacity(parsed.headers.len());
            let mut seen = FramingFields::default();
            for h in parsed.headers.iter() {
                let name = HeaderName::from_bytes(h.name.as_bytes())
                    .map_err(|_| Error::Invalid("header name"))?;
                let value =
                    HeaderValue::from_bytes(h.value).map_err(|_| Error::Invalid("header value"))?;
                seen.note(&name, h.value);
                headers.append(name, value);
            }
            rbuf.advance(n);
            self.reuse_until = if seen.keep_alive {
                reuse_within(&headers).and_then(|d| tokio::time::Instant::now().checked_add(d))
            } else {
                None
            };
            let mode = self.body_mode(status, version, &headers, seen)?;
            match mode {
                // The chunked framing decides; a content-length beside it
                // must not travel on (RFC 9112 6.3): over HTTP/2 it would
                // contradict the data.
                Mode::Chunked { .. } if seen.content_lengths > 0 => {
                    headers.remove(header::CONTENT_LENGTH);
                }
                // One value (`5, 5` and repeated fields are valid here, not
                // over HTTP/2); the usual single plain value stays as it is.
                Mode::Length { left, .. } if seen.content_lengths > 1 || seen.length_list => {
                    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(left));
                }
                // No body follows; the length (of what a GET would get)
                // still crosses HTTP/2, which refuses a list, a bad value,
                // and one on a 204 (RFC 9110 8.6).
                Mode::Empty { .. } if seen.content_lengths > 0 => {
                    let one = content_length(&headers)
                        .ok()
                        .flatten()
                        .filter(|_| status != StatusCode::NO_CONTENT);
                    headers.remove(header::CONTENT_LENGTH);
                    if let Some(n) = one {
                        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(n));
                    }
                }
                _ => {}
            }
            let mut resp = Response::new(());
            *resp.status_mut() = status;
            *resp.version_mut() = version;
            *resp.headers_mut() = headers;
            return Ok(Some((resp, mode)));
        }
    }

    fn body_mode(
        &self,
        status: StatusCode,
        version: Version,
        h: &HeaderMap,
        seen: FramingFields,
    ) -> Result<Mode, Error> {
        let reuse = version == Version::HTTP_11
            && !self.close
            && !(seen.connection && has_token(h, header::CONNECTION, "close"));
        if self.head_request
            || status == StatusCode::NO_CONTENT
            || status == StatusCode::NOT_MODIFIED
        {
            return Ok(Mode::Empty { reuse });
        }
        if seen.transfer_encoding {
            if version == Version::HTTP_10 {
                return Err(Error::Invalid("transfer-encoding in an HTTP/1.0 response"));
            }
            if !only_chunked(h) {
                return Err(Error::Invalid(
                    "a transfer coding other than chunked (not supported by the mesh)",
                ));
            }
            // Both framings named: the connection is not trusted after.
            let reuse = reuse && seen.content_lengths == 0;
            return Ok(Mode::Chunked {
                state: Chunk::Size,
                reuse,
            });
        }
        if seen.content_lengths == 0 {
            return Ok(Mode::Eof);
        }
        Ok(match content_length(h).map_err(Error::Invalid)? {
            Some(n) => Mode::Length { left: n, reuse },
            None => Mode::Eof,
        })
    }
}

/// How the response body ends.
#[derive(Debug)]
pub(crate) enum Mode {
    Empty {
        reuse: bool,
    },
    Length {
        left: u64,
        reuse: bool,
    },
    Chunked {
        state: Chunk,
        reuse: bool,
    },
    /// Until the workload closes the connection.
    Eof,
    /// Read to its end.
    Done {
        reuse: bool,
    },
}

#[derive(Debug)]
pub(crate) enum Chunk {
    Size,
    Data(u64),
    /// The CRLF after a chunk's data.
    DataEnd,
    Trailers,
}

/// A workload's response body, read from the connection as it is polled.
#[derive(Debug)]
pub struct ResponseBody {
    ex: Option<Box<Exchange>>,
    mode: Mode,
}

pub(crate) enum Step {
    Frame(Frame<Bytes>),
    /// More bytes are needed.
    Read,
    End,
}

impl ResponseBody {
    /// The connection, once the exchange has ended cleanly on both sides and
    /// it may carry another.
    pub fn take_idle(&mut self) -> Option<Conn> {
        if let Mode::Empty { reuse } | Mode::Length { left: 0, reuse } = self.mode {
            self.mode = Mode::Done { reuse };
        }
        let reusable = matches!(self.mode, Mode::Done { reuse: true })
            && self
                .ex
                .as_ref()
                .is_some_and(|ex| ex.out.done && ex.conn.rbuf.is_empty());
        if reusable {
            self.ex.take().map(|ex| Conn {
                reuse_until: ex.dec.reuse_until,
                ..ex.conn
            })
        } else {
            None
        }
    }

    fn step(&mut self) -> Result<Step, Error> {
        let ex = self.ex.as_mut().expect("polled after its end");
        self.mode.step(&mut ex.conn.rbuf, ex.dec.max_head)
    }
}

impl Mode {
    /// The next piece of the body from `rbuf`.
    pub(crate) fn step(&mut self, rbuf: &mut BytesMut, max_head: usize) -> Result<Step, Error> {
        match self {
            Mode::Empty { reuse } | Mode::Length { left: 0, reuse } => {
                *self = Mode::Done { reuse: *reuse };
                Ok(Step::End)
            }
            Mode::Done { .. } => Ok(Step::End),
            Mode::Length { left, .. } => {
                if rbuf.is_empty() {
                    return Ok(Step::Read);
                }
                let take = (*left).min(rbuf.len() as u64) as usize;
                *left -= take as u64;
                Ok(Step::Frame(Frame::data(rbuf.split_to(take).freeze())))
            }
            Mode::Eof => {
                if rbuf.is_empty() {
                    return Ok(Step::Read);
                }
                Ok(Step::Frame(Frame::data(rbuf.split().freeze())))
            }
            Mode::Chunked { state, reuse } => loop {
                match state {
                    Chunk::Size => {
                        let Some(eol) = rbuf.iter().position(|&b| b == b'\n') else {
                            if rbuf.len() > MAX_CHUNK_LINE {
                                return Err(Error::Invalid("chunk-size line too long"));
                            }
                            return Ok(Step::Read);
                        };
                        if eol > MAX_CHUNK_LINE {
                            return Err(Error::Invalid("chunk-size line too long"));
                        }
                        let size = parse_chunk_size(&rbuf[..eol])?;
                        rbuf.advance(eol + 1);
                        *state = if size == 0 {
                            Chunk::Trailers
                        } else {
                            Chunk::Data(size)
                        };
                    }
                    Chunk::Data(left) => {
                        if rbuf.is_empty() {
                            return Ok(Step::Read);
                        }
                        let take = (*left).min(rbuf.len() as u64) as usize;
                        *left -= take as u64;
                        if *left == 0 {
                            *state = Chunk::DataEnd;
                        }
                        return Ok(Step::Frame(Frame::data(rbuf.split_to(take).freeze())));
                    }
                    Chunk::DataEnd => {
                        if rbuf.len() < 2 {
                            return Ok(Step::Read);
                        }
                        if &rbuf[..2] != b"\r\n" {
                            return Err(Error::Invalid("chunk data not followed by CRLF"));
                        }
                        rbuf.advance(2);
                        *state = Chunk::Size;
                    }
                    Chunk::Trailers => {
                        // The blank line that ends the section; a bare LF
                        // too, as httparse takes one in the lines before it
                        // (RFC 9112 section 2.2).
                        let blank = if rbuf.starts_with(b"\r\n") {
                            2
                        } else {
                            usize::from(rbuf.starts_with(b"\n"))
                        };
                        if blank > 0 {
                            rbuf.advance(blank);
                            *self = Mode::Done { reuse: *reuse };
                            return Ok(Step::End);
                        }
                        if rbuf.len() < 2 {
                            return Ok(Step::Read);
                        }
                        let mut lines = [httparse::EMPTY_HEADER; MAX_HEADERS];
                        let n = match httparse::parse_headers(rbuf, &mut lines) {
                            Ok(httparse::Status::Complete((n, _))) if n > max_head => {
                                return Err(Error::HeadTooLarge(max_head));
                            }
                            Ok(httparse::Status::Complete((n, _))) => n,
                            Ok(httparse::Status::Partial) if rbuf.len() > max_head => {
                                return Err(Error::HeadTooLarge(max_head));
                            }
                            Ok(httparse::Status::Partial) => return Ok(Step::Read),
                            Err(_) => return Err(Error::Invalid("malformed trailer section")),
                        };
                        let mut trailers = HeaderMap::new();
                        for h in lines.iter().take_while(|h| !h.name.is_empty()) {
                            if let (Ok(k), Ok(v)) = (
                                HeaderName::from_bytes(h.name.as_bytes()),
                                HeaderValue::from_bytes(h.value),
                            ) {
                                trailers.append(k, v);
                            }
                        }
                        rbuf.advance(n);
                        *self = Mode::Done { reuse: *reuse };
                        // Framing and connection fields cannot be trailers
                        // over HTTP/2, and the mesh's own are not the
                        // workload's to send.
                        keep_trailer_fields(&mut trailers);
                        return Ok(Step::Frame(Frame::trailers(trailers)));
                    }
                }
            },
        }
    }
}

/// Whether the request side is over: sent, or failed.
fn ex_upload_done(ex: &Exchange) -> bool {
    ex.out.done || ex.out.failed.is_some()
}

/// The hexadecimal size at the start of a chunk-size line, which ends in
/// CRLF; extensions after `;` (whitespace allowed before it) are ignored.
fn parse_chunk_size(line: &[u8]) -> Result<u64, Error> {
    let line = line
        .strip_suffix(b"\r")
        .ok_or(Error::Invalid("chunk-size line without CRLF"))?;
    if line.contains(&b'\r') {
        return Err(Error::Invalid("CR inside a chunk-size line"));
    }
    let digits = line
        .split(|&b| b == b';')
        .next()
        .unwrap_or_default()
        .trim_ascii_end();
    // Leading zeros are allowed (`1*HEXDIG`) and say nothing.
    let significant = digits
        .iter()
        .position(|&d| d != b'0')
        .map_or(&digits[digits.len().saturating_sub(1)..], |i| &digits[i..]);
    if digits.is_empty() || significant.len() > 15 {
        return Err(Error::Invalid("chunk size"));
    }
    let digits = significant;
    let mut n: u64 = 0;
    for &d in digits {
        let v = (d as char)
            .to_digit(16)
            .ok_or(Error::Invalid("chunk size"))?;
        n = n * 16 + u64::from(v);
    }
    Ok(n)
}

/// What a response decodes to, for the fuzz harness.
#[derive(Debug, PartialEq)]
struct Decoded {
    status: u16,
    headers: Vec<(String, Vec<u8>)>,
    body: Vec<u8>,
    trailers: Vec<(String, Vec<u8>)>,
    /// Reusable, and the bytes left after the response.
    end: Option<(bool, usize)>,
}

/// Decodes `wire` fed `piece` bytes at a time, then the end of the stream.
fn decode_all(mut dec: Decoder, wire: &[u8], piece: usize) -> Result<Decoded, String> {
    let fields = |h: &HeaderMap| -> Vec<(String, Vec<u8>)> {
        h.iter()
            .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
            .collect()
    };
    let mut rbuf = BytesMut::new();
    let mut pieces = wire.chunks(piece.max(1));
    let mut eof = false;
    let (resp, mut mode) = loop {
        if let Some(head) = dec.parse_head(&mut rbuf).map_err(|e| e.to_string())? {
            break head;
        }
        match pieces.next() {
            Some(p) => rbuf.extend_from_slice(p),
            None => return Err("ended inside the head".into()),
        }
    };
    let mut out = Decoded {
        status: resp.status().as_u16(),
        headers: fields(resp.headers()),
        body: Vec::new(),
        trailers: Vec::new(),
        end: None,
    };
    loop {
        match mode
            .step(&mut rbuf, dec.max_head)
            .map_err(|e| e.to_string())?
        {
            Step::Frame(f) => match f.into_data() {
                Ok(d) => out.body.extend_from_slice(&d),
                Err(f) => out.trailers = fields(f.trailers_ref().expect("data or trailers")),
            },
            Step::End => {
                let Mode::Done { reuse } = mode else {
                    panic!("ended in {mode:?}")
                };
                // Bytes after the response count whether they came in one
                // piece with it or not.
                let rest = rbuf.len() + pieces.map(<[u8]>::len).sum::<usize>();
                out.end = Some((reuse, rest));
                return Ok(out);
            }
            Step::Read if eof => {
                return if matches!(mode, Mode::Eof) {
                    Ok(out)
                } else {
                    Err("ended inside the body".into())
                };
            }
            Step::Read => match pieces.next() {
                Some(p) => rbuf.extend_from_slice(p),
                None => eof = true,
            },
        }
    }
}

/// The fuzz harness, also run over seed inputs by the unit tests: the first
/// byte chooses the request (bit 0 `HEAD`, bit 1 `connection: close`), the
/// second how many bytes arrive at a time; the rest is what the workload
/// sends. Decoding never panics, keeps within its bounds, and comes out the
/// same whether the bytes arrive at once or piece by piece (or fails both
/// ways).
pub fn fuzz_response(data: &[u8]) {
    let [flags, piece, wire @ ..] = data else {
        return;
    };
    let dec = Decoder {
        max_head: 512,
        head_request: flags & 1 != 0,
        close: flags & 2 != 0,
        interim: 0,
        reuse_until: None,
    };
    let whole = decode_all(dec, wire, wire.len());
    let pieces = decode_all(dec, wire, usize::from(*piece));
    match (&whole, &pieces) {
        // Which fault shows first can depend on where the bytes broke off
        // (a head both malformed and too long): both must fail.
        (Err(_), Err(_)) => {}
        _ => assert_eq!(whole, pieces, "{wire:?} in pieces of {piece}"),
    }
    if let Ok(d) = &whole {
        assert!(d.headers.len() <= MAX_HEADERS && d.trailers.len() <= MAX_HEADERS);
    }
}

impl Drop for ResponseBody {
    fn drop(&mut self) {
        let complete = matches!(
            self.mode,
            Mode::Empty { .. } | Mode::Length { left: 0, .. } | Mode::Done { .. }
        );
        if let Some(mut ex) = self.ex.take()
            && complete
            && !ex_upload_done(&ex)
            && let Ok(rt) = tokio::runtime::Handle::try_current()
        {
            // A workload that answered an upload before taking all of it
            // still gets the rest, as from a client of its own, within
            // UPLOAD_AFTER_ANSWER; the connection then closes.
            rt.spawn(tokio::time::timeout(
                UPLOAD_AFTER_ANSWER,
                std::future::poll_fn(move |cx| ex.out.poll_send(&mut ex.conn.io, cx)),
            ));
        }
    }
}

impl http_body::Body for ResponseBody {
    type Data = Bytes;
    type Error = Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        let this = &mut *self;
        loop {
            let Some(ex) = this.ex.as_mut() else {
                return Poll::Ready(None);
            };
            // An upload the workload answered early goes on alongside.
            let _ = ex.out.poll_send(&mut ex.conn.io, cx);
            if let Some(e) = ex.out.take_fatal() {
                // A workload answering as it reads would wait for the rest.
                this.ex = None;
                this.mode = Mode::Done { reuse: false };
                return Poll::Ready(Some(Err(e)));
            }
            match this.step() {
                Ok(Step::Frame(f)) => return Poll::Ready(Some(Ok(f))),
                Ok(Step::End) => {
                    // The connection stays for take_idle if clean, and for
                    // the rest of an upload.
                    if !matches!(this.mode, Mode::Done { reuse: true })
                        && this.ex.as_deref().is_some_and(ex_upload_done)
                    {
                        this.ex = None;
                    }
                    return Poll::Ready(None);
                }
                Ok(Step::Read) => {}
                Err(e) => {
                    this.ex = None;
                    return Poll::Ready(Some(Err(e)));
                }
            }
            let ex = this.ex.as_mut().expect("still open");
            match ready!(ex.poll_read(cx)) {
                Ok(0) => {
                    let end = matches!(this.mode, Mode::Eof);
                    this.ex = None;
                    this.mode = Mode::Done { reuse: false };
                    return Poll::Ready((!end).then_some(Err(Error::ClosedInBody)));
                }
                Ok(_) => {}
                Err(e) => {
                    this.ex = None;
                    return Poll::Ready(Some(Err(Error::Io(e))));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(
            self.mode,
            Mode::Empty { .. } | Mode::Length { left: 0, .. } | Mode::Done { .. }
        )
    }

    fn size_hint(&self) -> SizeHint {
        match self.mode {
            Mode::Empty { .. } | Mode::Done { .. } => SizeHint::with_exact(0),
            Mode::Length { left, .. } => SizeHint::with_exact(left),
            _ => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use http_body_util::{BodyExt, Full, StreamBody};
    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::TcpListener,
    };

    use super::*;
    use crate::body::{boxed, empty};

    #[test]
    fn keep_alive_timeout_gives_the_reuse_window_less_a_margin() {
        let of = |values: &[&'static str]| {
            let mut h = HeaderMap::new();
            for v in values {
                h.append("keep-alive", HeaderValue::from_static(v));
            }
            reuse_within(&h)
        };
        assert_eq!(of(&["timeout=5, max=100"]), Some(Duration::from_secs(4)));
        assert_eq!(of(&["max=3, Timeout = 2"]), Some(Duration::from_secs(1)));
        assert_eq!(
            of(&["max=3", "timeout=1"]),
            Some(Duration::from_millis(500))
        );
        assert_eq!(of(&["timeout=0"]), Some(Duration::ZERO));
        assert_eq!(of(&["timeout=\"3\""]), Some(Duration::from_secs(2)));
        assert_eq!(
            of(&["timeout=10", "timeout=4"]),
            Some(Duration::from_secs(3))
        );
        assert_eq!(of(&["timeout=soon"]), None);
        assert_eq!(of(&["max=100"]), None);
        assert_eq!(of(&[]), None);
    }

    #[tokio::test]
    async fn a_keep_alive_timeout_past_the_clocks_end_is_no_limit() {
        let mut dec = Decoder {
            max_head: 4096,
            head_request: false,
            close: false,
            interim: 0,
            reuse_until: None,
        };
        let mut rbuf = BytesMut::from(
            &b"HTTP/1.1 200 OK\r\nkeep-alive: timeout=18446744073709551615\r\ncontent-length: 0\r\n\r\n"[..],
        );
        assert!(dec.parse_head(&mut rbuf).unwrap().is_some());
        assert_eq!(dec.reuse_until, None);
        let mut rbuf = BytesMut::from(
            &b"HTTP/1.1 200 OK\r\nKeep-Alive: timeout=5\r\ncontent-length: 0\r\n\r\n"[..],
        );
        let before = tokio::time::Instant::now();
        assert!(dec.parse_head(&mut rbuf).unwrap().is_some());
        let until = dec.reuse_until.expect("a reuse window");
        assert!(until >= before + Duration::from_secs(4));
    }

    /// A decoder for the answer to a GET on a connection kept open.
    fn plain_decoder() -> Decoder {
        Decoder {
            max_head: 512,
            head_request: false,
            close: false,
            interim: 0,
            reuse_until: None,
        }
    }

    /// A trailer section (none here) ended by a bare LF ends the body, as
    /// a CRLF does, whether it comes with the rest or on its own.
    #[test]
    fn a_bare_lf_ends_the_trailer_section() {
        let dec = plain_decoder();
        for wire in [
            &b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\n"[..],
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n0\r\nx-t: 1\n\n",
        ] {
            for piece in [wire.len(), 1] {
                let d = decode_all(dec, wire, piece).unwrap();
                assert_eq!(d.body, b"ok");
                assert_eq!(d.end, Some((true, 0)), "{piece}");
            }
        }
    }

    /// `close` among other tokens, one of them not visible ASCII: the
    /// connection is not reused.
    #[test]
    fn close_in_a_connection_header_with_other_bytes_is_heard() {
        let dec = plain_decoder();
        let wire = b"HTTP/1.1 200 OK\r\nconnection: close, \xe9\r\ncontent-length: 0\r\n\r\n";
        assert_eq!(
            decode_all(dec, wire, wire.len()).unwrap().end,
            Some((false, 0))
        );
        let wire = b"HTTP/1.1 200 OK\r\nconnection: keep-alive, \xe9\r\ncontent-length: 0\r\n\r\n";
        assert_eq!(
            decode_all(dec, wire, wire.len()).unwrap().end,
            Some((true, 0))
        );
    }

    #[test]
    fn chunk_sizes_may_carry_leading_zeros_but_not_overflow() {
        assert_eq!(parse_chunk_size(b"0000000000000010\r").unwrap(), 16);
        assert_eq!(parse_chunk_size(b"0000\r").unwrap(), 0);
        assert_eq!(parse_chunk_size(b"1a; ext=1\r").unwrap(), 26);
        assert!(parse_chunk_size(b"1000000000000000\r").is_err());
        assert!(parse_chunk_size(b"\r").is_err());
        assert!(parse_chunk_size(b"x\r").is_err());
    }

    const MAX_HEAD: usize = 8192;

    /// Reads one request (head and body, by its framing) off `tcp`.
    async fn read_request(tcp: &mut TcpStream) -> Vec<u8> {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                let rest = &buf[end + 4..];
                let done = if head.contains("transfer-encoding: chunked") {
                    rest.windows(5).any(|w| w == b"\r\n0\r\n") && rest.ends_with(b"\r\n\r\n")
                        || rest.starts_with(b"0\r\n") && rest.ends_with(b"\r\n\r\n")
                } else if let Some(l) = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length: "))
                {
                    rest.len() >= l.trim().parse::<usize>().unwrap()
                } else {
                    true
                };
                if done {
                    return buf;
                }
            }
            let n = tcp.read(&mut chunk).await.unwrap();
            if n == 0 {
                return buf;
            }
            buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// A workload that reads one request per connection, hands its bytes to
    /// the test and writes `answer`; `close` ends the connection after it.
    async fn scripted(
        answer: &'static [u8],
        close: bool,
    ) -> (SocketAddr, tokio::sync::mpsc::UnboundedReceiver<Vec<u8>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok((mut tcp, _)) = listener.accept().await {
                let tx = tx.clone();
                tokio::spawn(async move {
                    loop {
                        let req = read_request(&mut tcp).await;
                        if req.is_empty() {
                            return;
                        }
                        let _ = tx.send(req);
                        tcp.write_all(answer).await.unwrap();
                        if close {
                            return;
                        }
                    }
                });
            }
        });
        (addr, rx)
    }

    use std::net::SocketAddr;

    async fn conn(addr: SocketAddr) -> Conn {
        Conn::new(TcpStream::connect(addr).await.unwrap())
    }

    fn request(method: Method, body: Body) -> Request<Body> {
        let mut r = Request::new(body);
        *r.method_mut() = method;
        *r.uri_mut() = "/p?q=1".parse().unwrap();
        r.headers_mut()
            .insert(header::HOST, HeaderValue::from_static("cart"));
        r
    }

    async fn exchange(
        addr: SocketAddr,
        req: Request<Body>,
    ) -> Result<(Response<ResponseBody>, Vec<Frame<Bytes>>), Error> {
        let mut resp = send(conn(addr).await, Prepared::new(req), MAX_HEAD).await?;
        let mut frames = Vec::new();
        while let Some(f) = resp.body_mut().frame().await {
            frames.push(f?);
        }
        Ok((resp, frames))
    }

    fn data(frames: &[Frame<Bytes>]) -> Vec<u8> {
        frames
            .iter()
            .filter_map(|f| f.data_ref())
            .flat_map(|d| d.to_vec())
            .collect()
    }

    #[tokio::test]
    async fn the_request_body_is_framed_by_what_is_known_of_it() {
        let (addr, mut got) =
            scripted(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n", false).await;
        // A known length. `Expect: 100-continue` was answered on the
        // caller's node: the body goes at once, and the workload is not told
        // to wait for it (it could answer early and take the body for its
        // next request).
        let mut req = request(Method::POST, boxed(Full::new(Bytes::from_static(b"hello"))));
        req.headers_mut().insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        req.headers_mut()
            .insert(header::EXPECT, HeaderValue::from_static("100-continue"));
        exchange(addr, req).await.unwrap();
        assert_eq!(
            got.recv().await.unwrap(),
            b"POST /p?q=1 HTTP/1.1\r\nhost: cart\r\ncontent-length: 5\r\n\r\nhello"
        );
        // An unknown length, with trailers: chunked.
        let (tx, body) = channel_body(4);
        let sending = tokio::spawn(exchange(addr, request(Method::PUT, body)));
        tx.send(Ok(Frame::data(Bytes::from_static(b"abc"))))
            .await
            .unwrap();
        tx.send(Ok(Frame::data(Bytes::from(vec![b'x'; 17]))))
            .await
            .unwrap();
        let mut trailers = HeaderMap::new();
        trailers.insert("x-sum", HeaderValue::from_static("7"));
        // Fields that would frame or speak for the mesh stay out.
        trailers.insert("content-length", HeaderValue::from_static("0"));
        trailers.insert(
            "sluice-source-identity",
            HeaderValue::from_static("spiffe://x"),
        );
        tx.send(Ok(Frame::trailers(trailers))).await.unwrap();
        drop(tx);
        sending.await.unwrap().unwrap();
        let want = [
            &b"PUT /p?q=1 HTTP/1.1\r\nhost: cart\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n11\r\n"[..],
            &[b'x'; 17],
            b"\r\n0\r\nx-sum: 7\r\n\r\n",
        ]
        .concat();
        assert_eq!(got.recv().await.unwrap(), want);
        // A GET whose stream ends after its head, with nothing in it: no
        // body (not an empty chunked one).
        let (tx, body) = channel_body(1);
        drop(tx);
        exchange(addr, request(Method::GET, body)).await.unwrap();
        assert_eq!(
            got.recv().await.unwrap(),
            b"GET /p?q=1 HTTP/1.1\r\nhost: cart\r\n\r\n"
        );
        // An empty DATA frame already in after the head: no body either.
        let (tx, body) = channel_body(1);
        tx.send(Ok(Frame::data(Bytes::new()))).await.unwrap();
        drop(tx);
        exchange(addr, request(Method::GET, body)).await.unwrap();
        assert_eq!(
            got.recv().await.unwrap(),
            b"GET /p?q=1 HTTP/1.1\r\nhost: cart\r\n\r\n"
        );
        // A DELETE (or GET) with a body of unknown length: chunked, whether
        // its data is in already or comes later; none of it is lost.
        let (tx, body) = channel_body(2);
        tx.send(Ok(Frame::data(Bytes::from_static(b"{\"ids\":[1]}"))))
            .await
            .unwrap();
        drop(tx);
        exchange(addr, request(Method::DELETE, body)).await.unwrap();
        assert_eq!(
            got.recv().await.unwrap(),
            b"DELETE /p?q=1 HTTP/1.1\r\nhost: cart\r\ntransfer-encoding: chunked\r\n\r\nb\r\n{\"ids\":[1]}\r\n0\r\n\r\n"
        );
        let (tx, body) = channel_body(2);
        let sending = tokio::spawn(exchange(addr, request(Method::GET, body)));
        tokio::task::yield_now().await;
        tx.send(Ok(Frame::data(Bytes::from_static(b"late"))))
            .await
            .unwrap();
        drop(tx);
        sending.await.unwrap().unwrap();
        assert_eq!(
            got.recv().await.unwrap(),
            b"GET /p?q=1 HTTP/1.1\r\nhost: cart\r\ntransfer-encoding: chunked\r\n\r\n4\r\nlate\r\n0\r\n\r\n"
        );
        // Nothing: a GET says nothing of a body, a POST says it is empty.
        exchange(addr, request(Method::GET, empty())).await.unwrap();
        assert_eq!(
            got.recv().await.unwrap(),
            b"GET /p?q=1 HTTP/1.1\r\nhost: cart\r\n\r\n"
        );
        exchange(addr, request(Method::POST, empty()))
            .await
            .unwrap();
        assert_eq!(
            got.recv().await.unwrap(),
            b"POST /p?q=1 HTTP/1.1\r\nhost: cart\r\ncontent-length: 0\r\n\r\n"
        );
    }

    /// A request body the test feeds frame by frame.
    fn channel_body(
        capacity: usize,
    ) -> (
        tokio::sync::mpsc::Sender<Result<Frame<Bytes>, BoxError>>,
        Body,
    ) {
        let (tx, rx) = tokio::sync::mpsc::channel(capacity);
        (tx, boxed(StreamBody::new(tokio_stream(rx))))
    }

    fn tokio_stream<T: Send + 'static>(
        mut rx: tokio::sync::mpsc::Receiver<T>,
    ) -> impl futures_util::Stream<Item = T> {
        futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
    }

    #[tokio::test]
    async fn response_bodies_end_by_each_delimiter() {
        // Content-Length, after an interim 100 Continue.
        let (a, _g) = scripted(
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 4\r\nX-A: 1\r\n\r\nbody",
            false,
        )
        .await;
        let (resp, frames) = exchange(a, request(Method::GET, empty())).await.unwrap();
        assert_eq!(resp.status(), StatusCode::CREATED);
        assert_eq!(resp.headers()["x-a"], "1");
        assert_eq!(data(&frames), b"body");
        // Chunked, with an extension and trailers.
        let (a, _g) = scripted(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4;ext=1\r\nwiki\r\n5\r\npedia\r\n0\r\nGrpc-Status: 0\r\n\r\n",
            false,
        )
        .await;
        let (_, frames) = exchange(a, request(Method::GET, empty())).await.unwrap();
        assert_eq!(data(&frames), b"wikipedia");
        let trailers = frames
            .iter()
            .find_map(|f| f.trailers_ref())
            .expect("trailers");
        assert_eq!(trailers["grpc-status"], "0");
        // Until the connection ends.
        let (a, _g) = scripted(b"HTTP/1.1 200 OK\r\n\r\nall of it", true).await;
        let (_, frames) = exchange(a, request(Method::GET, empty())).await.unwrap();
        assert_eq!(data(&frames), b"all of it");
        // No body: HEAD and 204, whatever the length says.
        let (a, _g) = scripted(b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\n", false).await;
        let (resp, frames) = exchange(a, request(Method::HEAD, empty())).await.unwrap();
        assert!(resp.body().is_end_stream() && frames.is_empty());
        let (a, _g) = scripted(b"HTTP/1.1 204 No Content\r\n\r\n", false).await;
        let (resp, _) = exchange(a, request(Method::GET, empty())).await.unwrap();
        assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    }

    #[tokio::test]
    async fn framing_fields_leave_the_response_as_http2_can_carry_them() {
        // Both framings: chunked decides, the content-length is dropped.
        let (a, _g) = scripted(
            b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
            true,
        )
        .await;
        let (resp, frames) = exchange(a, request(Method::GET, empty())).await.unwrap();
        assert_eq!(data(&frames), b"hello");
        assert!(
            !resp.headers().contains_key(header::CONTENT_LENGTH),
            "{:?}",
            resp.headers()
        );
        // A repeated length becomes one value, as a list or as lines.
        for reply in [
            &b"HTTP/1.1 200 OK\r\nContent-Length: 5, 5\r\nContent-Length: 5\r\n\r\nhello"[..],
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello",
            b"HTTP/1.1 200 OK\r\nContent-Length: 5,5\r\n\r\nhello",
        ] {
            let (a, _g) = scripted(reply, false).await;
            let (resp, frames) = exchange(a, request(Method::GET, empty())).await.unwrap();
            assert_eq!(data(&frames), b"hello");
            let lengths: Vec<_> = resp
                .headers()
                .get_all(header::CONTENT_LENGTH)
                .iter()
                .collect();
            assert_eq!(lengths, ["5"], "{}", String::from_utf8_lossy(reply));
        }
        // Without a body (HEAD, 304, 204): a list becomes one value, a bad
        // one goes, and a 204 carries none.
        for (method, head, want) in [
            (
                Method::HEAD,
                "HTTP/1.1 200 OK\r\nContent-Length: 5, 5\r\nContent-Length: 5",
                Some("5"),
            ),
            (
                Method::HEAD,
                "HTTP/1.1 200 OK\r\nContent-Length: 5, 6",
                None,
            ),
            (Method::HEAD, "HTTP/1.1 200 OK\r\nContent-Length: abc", None),
            (
                Method::HEAD,
                "HTTP/1.1 200 OK\r\nContent-Length: 12",
                Some("12"),
            ),
            (
                Method::GET,
                "HTTP/1.1 304 Not Modified\r\nContent-Length: 7,7",
                Some("7"),
            ),
            (
                Method::GET,
                "HTTP/1.1 204 No Content\r\nContent-Length: 0",
                None,
            ),
        ] {
            let reply = format!("{head}\r\n\r\n").into_bytes().leak();
            let (a, _g) = scripted(reply, false).await;
            let (resp, frames) = exchange(a, request(method, empty())).await.unwrap();
            assert!(frames.is_empty(), "{head}");
            let lengths: Vec<_> = resp
                .headers()
                .get_all(header::CONTENT_LENGTH)
                .iter()
                .map(|v| v.to_str().unwrap())
                .collect();
            assert_eq!(lengths, want.into_iter().collect::<Vec<_>>(), "{head}");
        }
        // Trailers lose framing, connection and mesh fields.
        let (a, _g) = scripted(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\ngrpc-status: 0\r\nconnection: close\r\ntransfer-encoding: chunked\r\nsluice-source-identity: spiffe://x\r\n\r\n",
            false,
        )
        .await;
        let (_, frames) = exchange(a, request(Method::GET, empty())).await.unwrap();
        let trailers = frames
            .iter()
            .find_map(|f| f.trailers_ref())
            .expect("trailers");
        let names: Vec<_> = trailers.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["grpc-status"]);
    }

    #[tokio::test]
    async fn cookies_sent_as_separate_fields_reach_the_workload_on_one_line() {
        let (addr, mut got) =
            scripted(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n", false).await;
        let mut req = request(Method::GET, empty());
        req.headers_mut()
            .append(header::COOKIE, HeaderValue::from_static("a=1"));
        req.headers_mut()
            .append("x-other", HeaderValue::from_static("y"));
        req.headers_mut()
            .append(header::COOKIE, HeaderValue::from_static("b=2"));
        exchange(addr, req).await.unwrap();
        assert_eq!(
            got.recv().await.unwrap(),
            b"GET /p?q=1 HTTP/1.1\r\nhost: cart\r\ncookie: a=1; b=2\r\nx-other: y\r\n\r\n"
        );
    }

    #[tokio::test]
    async fn bad_responses_are_errors_that_say_what_is_wrong() {
        let big: &'static [u8] = Box::leak(
            [
                &b"HTTP/1.1 200 OK\r\nx-big: "[..],
                &[b'a'; 9000],
                b"\r\n\r\n",
            ]
            .concat()
            .into_boxed_slice(),
        );
        let cases: [(&'static [u8], &str); 14] = [
            // Another coding would reach the caller still applied.
            (
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
                "transfer coding other than chunked",
            ),
            (
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\n\r\nxx",
                "transfer coding other than chunked",
            ),
            (
                b"HTTP/1.1 200 OK\r\ncontent-length: +5\r\n\r\nhello",
                "content-length",
            ),
            (
                b"HTTP/1.0 200 OK\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n",
                "HTTP/1.0",
            ),
            (
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\nok\r\n0\r\n\r\n",
                "without CRLF",
            ),
            // An interim answer shows the request arrived: not "closed
            // before answering", which would let a GET go again.
            (
                b"HTTP/1.1 100 Continue\r\n\r\n",
                "ended inside the response head",
            ),
            (big, "larger than 8192 bytes"),
            (
                b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\ncontent-length: 4\r\n\r\nabcd",
                "conflicting content-length",
            ),
            (
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n",
                "chunk size",
            ),
            (
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nabX\r\n",
                "not followed by CRLF",
            ),
            (
                b"HTTP/1.1 101 Switching Protocols\r\nupgrade: x\r\n\r\n",
                "asked for no upgrade",
            ),
            (b"SSH-2.0-OpenSSH\r\n\r\n", "malformed response head"),
            (
                b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nshort",
                "middle of its response body",
            ),
            (b"", "closed the connection before answering"),
        ];
        for (answer, want) in cases {
            let (a, _g) = scripted(answer, true).await;
            let err = exchange(a, request(Method::GET, empty()))
                .await
                .expect_err(want)
                .to_string();
            assert!(err.contains(want), "{answer:?}: {err}");
        }
        // A chunk-size line that never ends is not buffered without bound.
        let long: &'static [u8] = Box::leak(
            [
                &b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n1"[..],
                &[b'0'; 5000],
            ]
            .concat()
            .into_boxed_slice(),
        );
        let (a, _g) = scripted(long, false).await;
        let err = exchange(a, request(Method::GET, empty()))
            .await
            .unwrap_err();
        assert!(
            err.to_string().contains("chunk-size line too long"),
            "{err}"
        );
        // Interim answers are passed over up to a bound, not for as long as
        // a workload sends them.
        let interim = |n: usize| -> &'static [u8] {
            let mut wire = b"HTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\n".repeat(n);
            wire.extend_from_slice(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok");
            Box::leak(wire.into_boxed_slice())
        };
        let bound = MAX_INTERIM as usize;
        let (a, _g) = scripted(interim(bound), false).await;
        let (resp, frames) = exchange(a, request(Method::GET, empty())).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(data(&frames), b"ok");
        let (a, _g) = scripted(interim(bound + 1), false).await;
        let err = exchange(a, request(Method::GET, empty()))
            .await
            .unwrap_err();
        assert!(
            err.to_string()
                .contains(&format!("more than {bound} interim (1xx) responses")),
            "{err}"
        );
    }

    #[tokio::test]
    async fn a_connection_is_reusable_only_after_a_clean_exchange() {
        async fn idle_after(answer: &'static [u8], method: Method) -> bool {
            let (a, _g) = scripted(answer, false).await;
            let mut resp = send(
                conn(a).await,
                Prepared::new(request(method, empty())),
                MAX_HEAD,
            )
            .await
            .unwrap();
            while let Some(f) = resp.body_mut().frame().await {
                f.unwrap();
            }
            resp.body_mut().take_idle().is_some()
        }
        assert!(
            idle_after(
                b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
                Method::GET
            )
            .await
        );
        assert!(
            idle_after(
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
                Method::GET
            )
            .await
        );
        assert!(
            idle_after(
                b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n",
                Method::HEAD
            )
            .await
        );
        // The workload closes, or may have: not reused.
        for answer in [
            &b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nok"[..],
            b"HTTP/1.0 200 OK\r\ncontent-length: 2\r\n\r\nok",
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nokEXTRA",
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
        ] {
            assert!(!idle_after(answer, Method::GET).await, "{answer:?}");
        }
        // The request asked to close.
        let (a, _g) = scripted(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n", false).await;
        let mut req = request(Method::GET, empty());
        req.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        let mut resp = send(conn(a).await, Prepared::new(req), MAX_HEAD)
            .await
            .unwrap();
        assert!(resp.body_mut().frame().await.is_none());
        assert!(resp.body_mut().take_idle().is_none());
    }

    /// A workload that answers only once it has the whole request.
    async fn waits_for_the_whole_request() -> SocketAddr {
        scripted(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n", false)
            .await
            .0
    }

    #[tokio::test]
    async fn a_request_body_that_breaks_off_fails_the_exchange_at_once() {
        let addr = waits_for_the_whole_request().await;
        let (tx, body) = channel_body(4);
        let mut req = request(Method::POST, body);
        req.headers_mut()
            .insert(header::CONTENT_LENGTH, HeaderValue::from_static("1000"));
        tx.send(Ok(Frame::data(Bytes::from_static(b"0123456789"))))
            .await
            .unwrap();
        tx.send(Err("the caller went away".into())).await.unwrap();
        let sent = send(conn(addr).await, Prepared::new(req), MAX_HEAD);
        let err = tokio::time::timeout(std::time::Duration::from_secs(10), sent)
            .await
            .expect("the exchange waited for a workload that waits for the body")
            .unwrap_err();
        assert!(err.to_string().contains("the caller went away"), "{err}");
        assert!(!err.closed_before_response());
        // A body that ends short of its length fails the same way.
        let (tx, body) = channel_body(4);
        let mut req = request(Method::POST, body);
        req.headers_mut()
            .insert(header::CONTENT_LENGTH, HeaderValue::from_static("1000"));
        tx.send(Ok(Frame::data(Bytes::from_static(b"short"))))
            .await
            .unwrap();
        drop(tx);
        let sent = send(conn(addr).await, Prepared::new(req), MAX_HEAD);
        let err = tokio::time::timeout(std::time::Duration::from_secs(10), sent)
            .await
            .expect("the exchange waited for a workload that waits for the body")
            .unwrap_err();
        assert!(err.to_string().contains("content-length"), "{err}");
    }

    #[tokio::test]
    async fn a_request_body_that_breaks_off_mid_answer_fails_the_response_body() {
        // The workload answers as soon as it has the head and streams its
        // answer while the upload goes on.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut tcp, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 1024];
            let _ = tcp.read(&mut buf).await;
            tcp.write_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n")
                .await
                .unwrap();
            // Waits for the rest of the upload, which never comes.
            while tcp.read(&mut buf).await.unwrap_or(0) > 0 {}
        });
        let (tx, body) = channel_body(4);
        let mut req = request(Method::POST, body);
        req.headers_mut()
            .insert(header::CONTENT_LENGTH, HeaderValue::from_static("1000"));
        tx.send(Ok(Frame::data(Bytes::from_static(b"abc"))))
            .await
            .unwrap();
        let mut resp = send(conn(addr).await, Prepared::new(req), MAX_HEAD)
            .await
            .unwrap();
        let first = resp.body_mut().frame().await.unwrap().unwrap();
        assert_eq!(first.data_ref().unwrap().as_ref(), b"ok");
        tx.send(Err("the caller went away".into())).await.unwrap();
        let next =
            tokio::time::timeout(std::time::Duration::from_secs(10), resp.body_mut().frame())
                .await
                .expect("the response body waited for an upload that had failed");
        let err = next.expect("an error, not the end").unwrap_err();
        assert!(err.to_string().contains("the caller went away"), "{err}");
        assert!(resp.body_mut().take_idle().is_none());
    }

    #[test]
    fn fuzz_harness_over_seeds_and_the_seed_corpus() {
        for seed in crate::fuzz_seeds("h1_response") {
            // Every piece size, and HEAD and close, over each seed.
            for flags in 0..4u8 {
                for piece in 1..=8u8 {
                    let mut input = vec![flags, piece];
                    input.extend_from_slice(&seed[2.min(seed.len())..]);
                    fuzz_response(&input);
                }
            }
        }
    }

    #[tokio::test]
    async fn an_idle_connection_the_workload_closed_is_not_usable() {
        let (a, _g) = scripted(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n", true).await;
        let mut resp = send(
            conn(a).await,
            Prepared::new(request(Method::GET, empty())),
            MAX_HEAD,
        )
        .await
        .unwrap();
        assert!(resp.body_mut().frame().await.is_none());
        let mut c = resp.body_mut().take_idle().expect("the exchange was clean");
        // The workload's FIN arrives after its answer.
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        while c.is_usable() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the close was never seen"
            );
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    }
}
