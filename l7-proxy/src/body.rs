//! The body type used across the proxy, and small response helpers.

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full, combinators::UnsyncBoxBody};

use crate::config::REASON_HEADER;

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
        r.headers_mut().insert(REASON_HEADER, v);
    }
    r
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

/// Headers that belong to one hop (RFC 9110 §7.6.1) and may not cross HTTP/2.
pub fn strip_hop_by_hop(h: &mut HeaderMap) {
    if let Some(conn) = h
        .get(http::header::CONNECTION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
    {
        for name in conn.split(',') {
            h.remove(name.trim());
        }
    }
    for name in [
        "connection",
        "keep-alive",
        "proxy-connection",
        "transfer-encoding",
        "upgrade",
        "proxy-authenticate",
        "proxy-authorization",
    ] {
        h.remove(name);
    }
    if h.get(http::header::TE).is_some_and(|v| v != "trailers") {
        h.remove(http::header::TE);
    }
}
