//! The body type used across the proxy, and small response helpers.

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full, combinators::UnsyncBoxBody};

use crate::config::REASON;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type Body = UnsyncBoxBody<Bytes, BoxError>;

pub fn empty() -> Body {
    Empty::<Bytes>::new().map_err(|e| match e {}).boxed_unsync()
}

pub fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).map_err(|e| match e {}).boxed_unsync()
}

pub fn boxed<B>(b: B) -> Body
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    b.map_err(Into::into).boxed_unsync()
}

/// A response made by the proxy itself, with the reason in a header and the
/// body.
pub fn proxy_response(status: StatusCode, reason: &str) -> Response<Body> {
    let mut r = Response::new(full(format!("{reason}\n")));
    *r.status_mut() = status;
    if let Ok(v) = HeaderValue::from_str(&sanitize(reason)) {
        r.headers_mut().insert(REASON, v);
    }
    r
}

/// The proxy's own answer to a request of `method`: for `HEAD`, the head
/// alone (an HTTP/2 peer resets a `HEAD` stream that gets DATA).
pub fn answer_for(method: &http::Method, resp: Response<Body>) -> Response<Body> {
    if method == http::Method::HEAD {
        resp.map(|_| empty())
    } else {
        resp
    }
}

/// Whether a request is a gRPC call (`content-type: application/grpc...`).
pub fn is_grpc(h: &HeaderMap) -> bool {
    h.get(http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// A gRPC call's own deadline (`grpc-timeout`: up to 8 digits and a unit,
/// `H`, `M`, `S`, `m`, `u` or `n`), at most `cap`; `None` when there is
/// none or it is malformed.
pub fn grpc_timeout(h: &HeaderMap, cap: std::time::Duration) -> Option<std::time::Duration> {
    let v = h.get("grpc-timeout")?.as_bytes();
    let (digits, unit) = v.split_at(v.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n: u64 = std::str::from_utf8(digits).ok()?.parse().ok()?;
    let d = match unit {
        b"H" => std::time::Duration::from_secs(n.checked_mul(3600)?),
        b"M" => std::time::Duration::from_secs(n.checked_mul(60)?),
        b"S" => std::time::Duration::from_secs(n),
        b"m" => std::time::Duration::from_millis(n),
        b"u" => std::time::Duration::from_micros(n),
        b"n" => std::time::Duration::from_nanos(n),
        _ => return None,
    };
    Some(d.min(cap))
}

/// Whether a request is a gRPC call whose answer ends with its status in
/// HTTP trailers: `application/grpc`, `application/grpc+proto`, ..., not
/// gRPC-Web (`application/grpc-web...`), which carries it in a frame of the
/// body.
pub fn has_grpc_trailers(h: &HeaderMap) -> bool {
    h.get(http::header::CONTENT_TYPE).is_some_and(|v| {
        v.as_bytes()
            .strip_prefix(b"application/grpc")
            .is_some_and(|rest| matches!(rest.first(), None | Some(b'+' | b';')))
    })
}

/// [`proxy_response`] in the form its caller reads. A gRPC client takes a
/// call's outcome from `grpc-status`, not from the HTTP status (a `504`
/// would read as `UNAVAILABLE`, which clients retry, rather than
/// `DEADLINE_EXCEEDED`): a gRPC call gets a trailers-only answer, HTTP
/// `200` with `grpc-status` and `grpc-message` (and `sluice-reason`).
pub fn proxy_answer(status: StatusCode, reason: &str, grpc: bool) -> Response<Body> {
    if !grpc || !(status.is_client_error() || status.is_server_error()) {
        return proxy_response(status, reason);
    }
    let mut r = Response::new(empty());
    let h = r.headers_mut();
    h.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    h.insert(
        "grpc-status",
        HeaderValue::from(u16::from(grpc_code(status))),
    );
    if let Ok(v) = HeaderValue::from_str(&grpc_message(reason)) {
        h.insert("grpc-message", v);
    }
    if let Ok(v) = HeaderValue::from_str(&sanitize(reason)) {
        h.insert(REASON, v);
    }
    r
}

/// The gRPC status code for an HTTP status the proxy answers with.
fn grpc_code(status: StatusCode) -> u8 {
    match status.as_u16() {
        // A deadline: the route's timeouts, a body that stopped coming.
        408 | 504 => 4,        // DEADLINE_EXCEEDED
        401 => 16,             // UNAUTHENTICATED
        403 => 7,              // PERMISSION_DENIED
        404 | 405 | 501 => 12, // UNIMPLEMENTED
        429 | 502 | 503 => 14, // UNAVAILABLE
        400 | 500 => 13,       // INTERNAL
        _ => 2,                // UNKNOWN
    }
}

/// `grpc-message` is percent-encoded UTF-8: everything outside printable
/// ASCII, and `%`, as `%XX`.
fn grpc_message(reason: &str) -> String {
    let mut out = String::with_capacity(reason.len());
    for b in reason.bytes().take(1024) {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_graphic() || c == ' ' {
                c
            } else {
                '?'
            }
        })
        .take(512)
        .collect()
}

/// Removes the headers only the mesh may set (every `sluice-` header:
/// `sluice-target`, `sluice-source-identity`, `sluice-reason`, ...) from a
/// message entering it: a caller's request, a peer's request before the
/// workload sees it, a workload's response.
pub fn remove_mesh_headers(h: &mut HeaderMap) {
    // Most messages carry none: look before removing.
    // `sluice_…` too: servers that turn header names into variables
    // (CGI, WSGI, Rack) read both spellings as the same one.
    let is_mesh = |k: &HeaderName| {
        let k = k.as_str();
        k.starts_with("sluice-") || k.starts_with("sluice_")
    };
    if h.keys().any(is_mesh) {
        let names: Vec<HeaderName> = h.keys().filter(|k| is_mesh(k)).cloned().collect();
        for name in names {
            h.remove(name);
        }
    }
}

pub(crate) const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

fn is_hop_by_hop(name: &HeaderName) -> bool {
    use http::header::{
        CONNECTION, PROXY_AUTHENTICATE, PROXY_AUTHORIZATION, TE, TRANSFER_ENCODING, UPGRADE,
    };
    [
        CONNECTION,
        TRANSFER_ENCODING,
        UPGRADE,
        PROXY_AUTHENTICATE,
        PROXY_AUTHORIZATION,
        TE,
        KEEP_ALIVE,
        PROXY_CONNECTION,
    ]
    .contains(name)
}

/// Removes the headers a request's `Connection` names (they belong to the
/// caller's hop, RFC 9110 §7.6.1), but for an upgrade's `Upgrade`, and
/// leaves `Connection` saying `upgrade` only, if it did. Done as the
/// request arrives, before routing and a route's filters: what a route
/// matches on, sets or rewrites (a `Host`) is then what the workload gets,
/// where [`strip_hop_by_hop`] on the way out would remove a header the
/// route set because the caller named it.
pub(crate) fn drop_connection_named(h: &mut HeaderMap) {
    use http::header::CONNECTION;
    if !h.contains_key(CONNECTION) {
        return;
    }
    // The common `keep-alive` or `close` (which name no header that would
    // reach the workload: `keep-alive` goes on the way out) allocates
    // nothing: `named` stays empty.
    let mut upgrade = false;
    let mut named = Vec::new();
    for t in connection_tokens(h) {
        if t.eq_ignore_ascii_case("upgrade") {
            upgrade = true;
        } else if !(t.eq_ignore_ascii_case("keep-alive") || t.eq_ignore_ascii_case("close")) {
            named.push(t.to_owned());
        }
    }
    for name in named {
        h.remove(name.as_str());
    }
    h.remove(CONNECTION);
    if upgrade {
        h.insert(CONNECTION, HeaderValue::from_static("upgrade"));
    }
}

/// The tokens of every `Connection` line, trimmed, empty ones left out.
/// Split on the bytes: a line with a byte outside visible ASCII elsewhere
/// (obs-text, which HTTP allows) still names its other tokens, which must
/// not pass the hop. A token is a header name, so ASCII; one that is not
/// names no header and is left out.
fn connection_tokens(h: &HeaderMap) -> impl Iterator<Item = &str> {
    h.get_all(http::header::CONNECTION)
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b','))
        .filter_map(|t| std::str::from_utf8(t).ok())
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

/// Headers that belong to one hop (RFC 9110 §7.6.1) and may not cross HTTP/2.
pub fn strip_hop_by_hop(h: &mut HeaderMap) {
    // Most messages carry none of them: look before removing.
    if !h.keys().any(is_hop_by_hop) {
        return;
    }
    // Every `Connection` line counts, not only the first.
    let named: Vec<String> = connection_tokens(h).map(str::to_owned).collect();
    for name in named {
        h.remove(name.as_str());
    }
    for name in [
        http::header::CONNECTION,
        KEEP_ALIVE,
        PROXY_CONNECTION,
        http::header::TRANSFER_ENCODING,
        http::header::UPGRADE,
        http::header::PROXY_AUTHENTICATE,
        http::header::PROXY_AUTHORIZATION,
    ] {
        h.remove(name);
    }
    // HTTP/2 carries `te` only as `trailers` (RFC 9113 section 8.2.2): one
    // field when any line lists it (a gRPC client's), else none. Two lines,
    // or `trailers` in a list, crossed as they were and the far side reset
    // the stream as malformed.
    if h.contains_key(http::header::TE) {
        let trailers = te_lists_trailers(h);
        h.remove(http::header::TE);
        if trailers {
            h.insert(http::header::TE, HeaderValue::from_static("trailers"));
        }
    }
}

/// Whether a `te` line of `h` lists `trailers`: the sender reads trailers.
pub fn te_lists_trailers(h: &HeaderMap) -> bool {
    h.get_all(http::header::TE).iter().any(|v| {
        v.to_str().is_ok_and(|v| {
            v.split(',').any(|t| {
                t.split(';')
                    .next()
                    .is_some_and(|t| t.trim().eq_ignore_ascii_case("trailers"))
            })
        })
    })
}

/// When an exchange last moved, in either direction: a request body that
/// sends nothing is not idle while the response flows (a gRPC stream whose
/// client waits for the server's messages).
#[derive(Clone, Debug)]
pub struct Activity(
    std::sync::Arc<std::sync::atomic::AtomicU64>,
    tokio::time::Instant,
);

impl Default for Activity {
    fn default() -> Self {
        Self(std::sync::Arc::default(), tokio::time::Instant::now())
    }
}

impl Activity {
    /// An exchange that began at `start` (the caller's clock reading, so
    /// that a request reads the clock once less).
    pub fn since(start: tokio::time::Instant) -> Self {
        Self(std::sync::Arc::default(), start)
    }

    pub fn touch(&self) {
        let ms = self.1.elapsed().as_millis() as u64;
        // Both directions record, from their own tasks: never back.
        self.0.fetch_max(ms, std::sync::atomic::Ordering::Relaxed);
    }

    /// Counts the exchange as moving until `at`: a route that gives a
    /// request longer than the exchange idle timeout (`timeouts.request:
    /// 10m` for a report that takes 6 minutes to start) is waited for.
    pub fn hold_until(&self, at: tokio::time::Instant) {
        let ms = at.saturating_duration_since(self.1).as_millis() as u64;
        self.0.fetch_max(ms, std::sync::atomic::Ordering::Relaxed);
    }

    pub(crate) fn last(&self) -> tokio::time::Instant {
        self.1 + std::time::Duration::from_millis(self.0.load(std::sync::atomic::Ordering::Relaxed))
    }
}

/// `fut`'s output, or `None` once `activity` has recorded nothing for
/// `idle` (a request waiting for its answer while its body, if any, sends
/// nothing either).
pub async fn until_idle<F: std::future::Future>(
    fut: F,
    idle: std::time::Duration,
    activity: &Activity,
) -> Option<F::Output> {
    let mut fut = std::pin::pin!(fut);
    let mut sleep = std::pin::pin!(tokio::time::sleep_until(activity.last() + idle));
    loop {
        tokio::select! {
            biased;
            out = &mut fut => return Some(out),
            () = sleep.as_mut() => {
                // Moved only when it fires: the body's frames just record.
                let next = activity.last() + idle;
                if next <= tokio::time::Instant::now() {
                    return None;
                }
                sleep.as_mut().reset(next);
            }
        }
    }
}

pin_project_lite::pin_project! {
    /// A body that fails with [`TimedOut`] when its time is up: at a
    /// deadline (a route's timeouts cover the whole response), or when
    /// nothing has moved either way for a while (a stalled upload, a
    /// stalled answer).
    pub struct Timed {
        #[pin]
        inner: Body,
        #[pin]
        sleep: tokio::time::Sleep,
        limit: Limit,
    }
}

/// When a [`Timed`] body's time is up, and what it then says.
enum Limit {
    /// A fixed deadline, with its reason.
    Deadline(String),
    /// This long after the last activity, which this body's frames and the
    /// other direction's record; the reason (the body, the other side) is
    /// put into words only when it fires.
    Idle {
        idle: std::time::Duration,
        activity: Activity,
        subject: &'static str,
        other: &'static str,
    },
}

impl Timed {
    /// Fails if not over by `until`.
    pub fn deadline(inner: Body, until: tokio::time::Instant, what: String) -> Self {
        Self {
            inner,
            sleep: tokio::time::sleep_until(until),
            limit: Limit::Deadline(what),
        }
    }

    /// Fails if for `idle` no frame comes and `activity` records nothing.
    /// `what`: the body and the other direction (`"the request body"`, `"its
    /// response"`), for the error.
    pub fn idle(
        inner: Body,
        idle: std::time::Duration,
        activity: Activity,
        what: (&'static str, &'static str),
    ) -> Self {
        Self {
            inner,
            sleep: tokio::time::sleep_until(activity.last() + idle),
            limit: Limit::Idle {
                idle,
                activity,
                subject: what.0,
                other: what.1,
            },
        }
    }
}

impl http_body::Body for Timed {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
        let mut this = self.project();
        if let std::task::Poll::Ready(frame) = this.inner.poll_frame(cx) {
            // Recorded, not re-armed: the timer moves only when it fires.
            if let Limit::Idle { activity, .. } = this.limit {
                activity.touch();
            }
            return std::task::Poll::Ready(frame);
        }
        loop {
            if std::future::Future::poll(this.sleep.as_mut(), cx).is_pending() {
                return std::task::Poll::Pending;
            }
            let why = match &*this.limit {
                Limit::Deadline(why) => why.clone(),
                Limit::Idle {
                    idle,
                    activity,
                    subject,
                    other,
                } => {
                    // Something moved meanwhile: idle from then on.
                    let until = activity.last() + *idle;
                    if until > tokio::time::Instant::now() {
                        this.sleep.as_mut().reset(until);
                        continue;
                    }
                    format!("{subject} sent nothing for {idle:?}, nor did {other}")
                }
            };
            tracing::debug!("{why}");
            return std::task::Poll::Ready(Some(Err(Box::new(TimedOut(why)))));
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// The error of a [`Timed`] body whose time was up.
#[derive(Debug)]
pub struct TimedOut(pub String);

pin_project_lite::pin_project! {
    /// A gRPC call's answer, whose cut by one of the proxy's timers (a
    /// route's timeout, the exchange idle timeout: [`TimedOut`]) ends the
    /// call as gRPC says a deadline passed, trailers with `grpc-status: 4`
    /// and the reason, when the cut falls between two messages (a server
    /// stream gone quiet); within a message it stays a reset, as the
    /// message cannot be ended. A reset reads as INTERNAL to gRPC clients.
    pub struct GrpcDeadline {
        #[pin]
        inner: Body,
        // Bytes of the current message's 5-byte prefix seen, and of its
        // payload still to come.
        prefix: usize,
        len: u64,
        left: u64,
        done: bool,
    }
}

impl GrpcDeadline {
    pub fn new(inner: Body) -> Self {
        Self {
            inner,
            prefix: 0,
            len: 0,
            left: 0,
            done: false,
        }
    }
}

/// Follows gRPC's message framing (a flag byte, a 4-byte length, the
/// payload) over `data`.
fn follow_messages(data: &[u8], prefix: &mut usize, len: &mut u64, left: &mut u64) {
    let mut rest = data;
    while !rest.is_empty() {
        if *left > 0 {
            let n = (*left).min(rest.len() as u64);
            *left -= n;
            rest = &rest[n as usize..];
            continue;
        }
        // In a prefix: the flag byte, then the length, big-endian.
        if *prefix > 0 {
            *len = (*len << 8) | u64::from(rest[0]);
        } else {
            *len = 0;
        }
        *prefix += 1;
        rest = &rest[1..];
        if *prefix == 5 {
            *prefix = 0;
            *left = *len;
        }
    }
}

impl http_body::Body for GrpcDeadline {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
        let this = self.project();
        if *this.done {
            return std::task::Poll::Ready(None);
        }
        let frame = std::task::ready!(this.inner.poll_frame(cx));
        match &frame {
            Some(Ok(f)) => {
                if let Some(d) = f.data_ref() {
                    follow_messages(d, this.prefix, this.len, this.left);
                }
            }
            Some(Err(e)) if *this.prefix == 0 && *this.left == 0 => {
                if let Some(TimedOut(why)) = e.downcast_ref::<TimedOut>() {
                    *this.done = true;
                    let mut t = HeaderMap::new();
                    t.insert("grpc-status", HeaderValue::from_static("4"));
                    if let Ok(v) = HeaderValue::from_str(&grpc_message(why)) {
                        t.insert("grpc-message", v);
                    }
                    return std::task::Poll::Ready(Some(Ok(http_body::Frame::trailers(t))));
                }
            }
            _ => {}
        }
        std::task::Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.done || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

impl std::fmt::Display for TimedOut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for TimedOut {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_grpc_timeout_is_read_in_every_unit_and_capped() {
        let t = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert("grpc-timeout", HeaderValue::from_str(v).unwrap());
            grpc_timeout(&h, std::time::Duration::from_secs(86_400))
        };
        let s = std::time::Duration::from_secs;
        assert_eq!(t("2H"), Some(s(7200)));
        assert_eq!(t("10M"), Some(s(600)));
        assert_eq!(t("30S"), Some(s(30)));
        assert_eq!(t("1500m"), Some(std::time::Duration::from_millis(1500)));
        assert_eq!(t("7u"), Some(std::time::Duration::from_micros(7)));
        assert_eq!(t("9n"), Some(std::time::Duration::from_nanos(9)));
        assert_eq!(t("99999999H"), Some(s(86_400)), "capped");
        for bad in ["", "S", "5", "5s", "123456789S", "-1S", "1.5S", " 5S"] {
            assert_eq!(t(bad), None, "{bad:?}");
        }
        assert_eq!(grpc_timeout(&HeaderMap::new(), s(1)), None);
    }

    #[test]
    fn te_crosses_as_one_trailers_field_or_not_at_all() {
        let te = |lines: &[&str]| {
            let mut h = HeaderMap::new();
            for l in lines {
                h.append(http::header::TE, HeaderValue::from_str(l).unwrap());
            }
            strip_hop_by_hop(&mut h);
            h.get_all(http::header::TE)
                .iter()
                .map(|v| v.to_str().unwrap().to_string())
                .collect::<Vec<_>>()
        };
        assert_eq!(te(&["trailers"]), ["trailers"]);
        assert_eq!(te(&["trailers", "gzip"]), ["trailers"]);
        assert_eq!(te(&["gzip", "trailers"]), ["trailers"]);
        assert_eq!(te(&["Trailers, deflate;q=0.5"]), ["trailers"]);
        assert_eq!(te(&["gzip"]), Vec::<String>::new());
        assert_eq!(te(&[]), Vec::<String>::new());
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_whose_frames_keep_coming_is_not_idle() {
        use http_body_util::BodyExt as _;
        // A frame every 6 s, five of them, under a 10 s idle timeout.
        let trickle = futures_util::stream::unfold(0, |n| async move {
            if n == 5 {
                return None;
            }
            tokio::time::sleep(std::time::Duration::from_secs(6)).await;
            Some((
                Ok::<_, BoxError>(http_body::Frame::data(Bytes::from_static(b"x"))),
                n + 1,
            ))
        });
        let body = Timed::idle(
            boxed(http_body_util::StreamBody::new(trickle)),
            std::time::Duration::from_secs(10),
            Activity::default(),
            ("the body", "the other side"),
        );
        let got = body.collect().await.expect("not cut").to_bytes();
        assert_eq!(&got[..], b"xxxxx");
    }

    /// A gRPC answer cut between messages ends with DEADLINE_EXCEEDED in
    /// trailers; cut inside one (a message split over frames), it stays an
    /// error; other errors pass as they are.
    #[tokio::test]
    async fn a_grpc_answer_cut_between_messages_ends_with_deadline_exceeded() {
        use http_body_util::BodyExt as _;
        let cut = |frames: Vec<&'static [u8]>, end: BoxError| {
            let items: Vec<Result<http_body::Frame<Bytes>, BoxError>> = frames
                .into_iter()
                .map(|f| Ok(http_body::Frame::data(Bytes::from_static(f))))
                .chain(std::iter::once(Err(end)))
                .collect();
            GrpcDeadline::new(boxed(http_body_util::StreamBody::new(
                futures_util::stream::iter(items),
            )))
        };
        let timed_out = || -> BoxError { Box::new(TimedOut("the response sent nothing".into())) };
        // Two whole messages (3 bytes, then empty), the second's prefix
        // split over two frames.
        let whole: Vec<&'static [u8]> = vec![b"\0\0\0\0\x03ab", b"c\0\0", b"\0\0\0"];
        let got = cut(whole, timed_out())
            .collect()
            .await
            .expect("ended, not cut");
        let trailers = got.trailers().cloned().expect("trailers");
        assert_eq!(trailers["grpc-status"], "4");
        assert!(
            trailers["grpc-message"]
                .to_str()
                .unwrap()
                .contains("sent nothing"),
            "{trailers:?}"
        );
        assert_eq!(&got.to_bytes()[..], b"\0\0\0\0\x03abc\0\0\0\0\0");
        // A long message (300 bytes: its length's second byte counts)
        // whose prefix is split over frames, then a cut: between messages.
        let long: &'static [u8] = Box::leak(
            [&[0u8, 0, 0][..], &[1, 44], &[b'x'; 300][..]]
                .concat()
                .into_boxed_slice(),
        );
        let frames: Vec<&'static [u8]> = vec![&long[..3], &long[3..100], &long[100..]];
        let got = cut(frames, timed_out()).collect().await.expect("ended");
        assert_eq!(got.trailers().expect("trailers")["grpc-status"], "4");
        // One byte short of the whole message: inside it.
        let e = cut(vec![&long[..long.len() - 1]], timed_out())
            .collect()
            .await
            .expect_err("cut");
        assert!(e.downcast_ref::<TimedOut>().is_some(), "{e}");
        // Inside a message (2 of its 3 bytes in), or inside a prefix.
        for partial in [vec![&b"\0\0\0\0\x03ab"[..]], vec![&b"\0\0\0"[..]]] {
            let e = cut(partial, timed_out()).collect().await.expect_err("cut");
            assert!(e.downcast_ref::<TimedOut>().is_some(), "{e}");
        }
        // Another error between messages is not a deadline.
        let other: BoxError = "connection reset".into();
        let e = cut(vec![], other).collect().await.expect_err("an error");
        assert_eq!(e.to_string(), "connection reset");
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_body_is_not_idle_while_its_response_moves() {
        use http_body_util::BodyExt as _;
        let silent: Body = boxed(http_body_util::StreamBody::new(
            futures_util::stream::pending::<Result<http_body::Frame<Bytes>, BoxError>>(),
        ));
        let activity = Activity::default();
        let mut body = Box::pin(Timed::idle(
            silent,
            std::time::Duration::from_secs(10),
            activity.clone(),
            ("the body", "the other side"),
        ));
        tokio::time::advance(std::time::Duration::from_secs(8)).await;
        // The response moves at 8 s: the request is not idle before 18 s.
        activity.touch();
        tokio::time::advance(std::time::Duration::from_secs(3)).await;
        assert!(futures_util::poll!(body.frame()).is_pending(), "at 11 s");
        tokio::time::advance(std::time::Duration::from_secs(6)).await;
        assert!(futures_util::poll!(body.frame()).is_pending(), "at 17 s");
        tokio::time::advance(std::time::Duration::from_secs(2)).await;
        let cut = futures_util::poll!(body.frame());
        assert!(
            matches!(cut, std::task::Poll::Ready(Some(Err(_)))),
            "cut at 19 s: {cut:?}"
        );
    }

    /// A `Connection` line with a byte outside visible ASCII (obs-text,
    /// which parsers accept) still names its other headers, which go with
    /// it on the way in and on the way out.
    #[test]
    fn headers_a_connection_line_with_obs_text_names_still_go() {
        let with = || {
            let mut h = HeaderMap::new();
            h.insert(
                http::header::CONNECTION,
                HeaderValue::from_bytes(b"x-hop, \x80").unwrap(),
            );
            h.insert("x-hop", HeaderValue::from_static("v"));
            h.insert("x-kept", HeaderValue::from_static("k"));
            h
        };
        let mut h = with();
        drop_connection_named(&mut h);
        let left: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(left, ["x-kept"]);
        let mut h = with();
        strip_hop_by_hop(&mut h);
        let left: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(left, ["x-kept"]);
    }

    #[test]
    fn the_mesh_headers_go_in_either_spelling() {
        let mut h = HeaderMap::new();
        h.insert("sluice-source-identity", HeaderValue::from_static("a"));
        h.insert("sluice_source_identity", HeaderValue::from_static("b"));
        h.insert("x-sluice-note", HeaderValue::from_static("kept"));
        remove_mesh_headers(&mut h);
        let left: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(left, ["x-sluice-note"]);
    }

    #[test]
    fn a_grpc_refusal_is_trailers_only_with_an_encoded_message() {
        let r = proxy_answer(
            StatusCode::SERVICE_UNAVAILABLE,
            "100% gone: café\nnext",
            true,
        );
        assert_eq!(r.status(), StatusCode::OK);
        assert!(http_body::Body::is_end_stream(r.body()));
        assert_eq!(r.headers()["grpc-status"], "14");
        assert_eq!(r.headers()["grpc-message"], "100%25 gone: caf%C3%A9%0Anext");
        // Not a gRPC call, or not a refusal: the plain answer.
        assert_eq!(
            proxy_answer(StatusCode::SERVICE_UNAVAILABLE, "gone", false).status(),
            503
        );
        assert_eq!(
            proxy_answer(StatusCode::MOVED_PERMANENTLY, "moved", true).status(),
            301
        );
    }
}
