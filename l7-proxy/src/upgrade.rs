//! HTTP/1.1 upgrades (WebSocket and the like), on both sides of the tunnel,
//! and WebSocket over HTTP/2 (RFC 8441), which the caller's node turns into
//! one ([`from_extended_connect`]).
//!
//! An upgrade request leaves the client's node on a connection of its own: a
//! tunnel `CONNECT` stream marked with [`UPGRADE_REQUEST`], or a direct TCP
//! connection to a workload outside the mesh. The inbound proxy parses the
//! one request such a stream carries, applies `AccessPolicy` to it, sets the
//! caller's identity header and sends it to the workload, exactly as for any
//! other request. When the workload answers `101 Switching Protocols`, each
//! side's connection is spliced to the next, byte for byte, until either
//! closes; any other answer is an ordinary response and ends the stream.
//!
//! [`UPGRADE_REQUEST`]: crate::config::UPGRADE_REQUEST

use std::sync::Arc;

use http::{
    HeaderName, HeaderValue, Method, Request, Response, StatusCode, Uri, Version,
    header::{CONNECTION, CONTENT_LENGTH, HOST, TRANSFER_ENCODING, UPGRADE},
    request::Parts,
    uri::PathAndQuery,
};
use hyper::{body::Incoming, upgrade::OnUpgrade};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::{
    body::{Body, strip_hop_by_hop},
    conntable::ConnHandle,
    io::{count_relay, relay},
    metrics::TcpLabels,
    proxy::Shared,
};

/// Takes the client's side of an HTTP/1.1 upgrade out of a request: present
/// when the request says `Connection: upgrade` with `Upgrade` protocols none
/// of which is `h2c`, has no body (`Content-Length` 0 or absent, no
/// `Transfer-Encoding`: bytes before the switch would reach the workload as
/// whatever it makes of them), and came on an HTTP/1.1 server connection that
/// allows upgrades. Any other request is an ordinary one.
pub(crate) fn take(parts: &mut Parts) -> Option<OnUpgrade> {
    let h = &parts.headers;
    // Every HTTP/1.1 request passes here: one lookup rules most out.
    if !h.contains_key(UPGRADE) {
        return None;
    }
    let tokens = |name| {
        h.get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
    };
    let wants = tokens(CONNECTION).any(|t| t.eq_ignore_ascii_case("upgrade"));
    let mut protocols = tokens(UPGRADE).peekable();
    let some_protocol = protocols.peek().is_some();
    let h2c = protocols.any(|t| t.eq_ignore_ascii_case("h2c"));
    let body = h.contains_key(TRANSFER_ENCODING)
        || h.get(CONTENT_LENGTH).is_some_and(|v| v.as_bytes() != b"0");
    if !wants || !some_protocol || h2c || body {
        return None;
    }
    parts.extensions.remove::<OnUpgrade>()
}

/// Marks a request that came as an HTTP/2 extended `CONNECT` (RFC 8441): the
/// workload's `101` is answered `200` on the caller's stream.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ExtendedConnect;

const SEC_WEBSOCKET_KEY: HeaderName = HeaderName::from_static("sec-websocket-key");
const SEC_WEBSOCKET_ACCEPT: HeaderName = HeaderName::from_static("sec-websocket-accept");

/// Turns an HTTP/2 extended `CONNECT` for a WebSocket (RFC 8441: a
/// `:protocol` pseudo-header `websocket`) into the HTTP/1.1 upgrade request
/// workloads read: `GET` with `Upgrade: websocket`, `Connection: upgrade`
/// and a fresh `Sec-WebSocket-Key` (RFC 8441 drops the key and accept
/// handshake; an HTTP/1.1 server wants it). From here it is routed,
/// policed and sent as any upgrade request; [`answer_extended_connect`]
/// turns the switch into the caller's `200`. Any other request is left as
/// it is.
pub(crate) fn from_extended_connect(parts: &mut Parts) {
    if parts.method != Method::CONNECT {
        return;
    }
    // WebSocket only: other protocols (`connect-udp`, ...) have no
    // HTTP/1.1 upgrade to become.
    if !parts
        .extensions
        .get::<hyper::ext::Protocol>()
        .is_some_and(|p| p.as_str().eq_ignore_ascii_case("websocket"))
    {
        return;
    }
    parts.extensions.remove::<hyper::ext::Protocol>();
    parts.method = Method::GET;
    parts
        .headers
        .insert(UPGRADE, HeaderValue::from_static("websocket"));
    parts
        .headers
        .insert(CONNECTION, HeaderValue::from_static("upgrade"));
    // Over HTTP/2 a key means nothing (RFC 8441 section 5): a fresh one
    // replaces whatever the client sent, so the workload never refuses a
    // malformed one. hyper refused a CONNECT with a body; `0` (or `00`) is
    // no length to pass on.
    parts
        .headers
        .insert(SEC_WEBSOCKET_KEY, websocket_key(rand::random()));
    parts.headers.remove(CONTENT_LENGTH);
    parts.extensions.insert(ExtendedConnect);
}

/// The answer to an extended `CONNECT`: a switch (`101`) is a `200`, without
/// the HTTP/1.1 handshake's own headers; a refusal (`3xx` to `5xx`) stays as
/// it is. Any other `2xx` is an error (`Err` with the status): to an HTTP/2
/// client it would say the WebSocket is open, and nothing would carry it.
pub(crate) fn answer_extended_connect(head: &mut http::response::Parts) -> Result<(), StatusCode> {
    if head.status.is_success() || head.status.is_informational() {
        if head.status != StatusCode::SWITCHING_PROTOCOLS {
            return Err(head.status);
        }
        head.status = StatusCode::OK;
        for name in [CONNECTION, UPGRADE, SEC_WEBSOCKET_ACCEPT] {
            head.headers.remove(name);
        }
    }
    Ok(())
}

/// A `Sec-WebSocket-Key`: 16 bytes in base64 (RFC 6455 section 4.1).
fn websocket_key(bytes: [u8; 16]) -> HeaderValue {
    use base64::Engine as _;
    let key = base64::engine::general_purpose::STANDARD.encode(bytes);
    HeaderValue::from_str(&key).expect("base64 is a valid header value")
}

/// Readies an upgrade request for the workload: hop-by-hop headers go except
/// the upgrade pair, the target is in origin form, the version HTTP/1.1, and
/// a `Host` is set (from the request's authority, else `default_host`).
pub(crate) fn prepare(parts: &mut Parts, default_host: &HeaderValue) {
    let protocol = parts.headers.get(UPGRADE).cloned();
    strip_hop_by_hop(&mut parts.headers);
    parts
        .headers
        .insert(CONNECTION, HeaderValue::from_static("upgrade"));
    if let Some(p) = protocol {
        parts.headers.insert(UPGRADE, p);
    }
    if !parts.headers.contains_key(HOST) {
        let host = parts
            .uri
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
            .unwrap_or_else(|| default_host.clone());
        parts.headers.insert(HOST, host);
    }
    let pq = parts
        .uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    parts.uri = Uri::from(pq);
    parts.version = Version::HTTP_11;
}

/// Where the bytes of a spliced connection are counted: the
/// `sluice_tcp_*` metrics under `labels`, and a connection-table row.
pub(crate) struct Splice {
    pub labels: TcpLabels,
    pub row: Option<Arc<ConnHandle>>,
    /// Kept until the splice ends (the tunnel stream's count of open
    /// streams on the workload's node).
    pub hold: Option<Box<dyn Send>>,
}

/// Sends the upgrade request `req` on `io`, a connection of its own to the
/// next hop. On `101` the caller's connection (`client`) and `io` are
/// spliced in a task of the proxy until either side closes, counted as
/// `count` says. Any other
/// answer is returned with its hop-by-hop headers removed, and the
/// connection closes after it.
pub(crate) async fn exchange<I>(
    shared: &Arc<Shared>,
    io: I,
    mut req: Request<Body>,
    client: OnUpgrade,
    count: Splice,
) -> Result<Response<Incoming>, hyper::Error>
where
    I: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let (mut sender, connection) = hyper::client::conn::http1::Builder::new()
        .max_buf_size((shared.settings.max_header_bytes as usize).max(8192))
        .handshake::<_, Body>(TokioIo::new(io))
        .await?;
    shared.spawn(async move {
        if let Err(e) = connection.with_upgrades().await {
            tracing::debug!("upgrade connection to the next hop ended: {e}");
        }
    });
    // An HTTP/2 caller's stream is in flight as long as the splice runs
    // (h2idle).
    let in_flight = req.extensions_mut().remove::<crate::h2idle::ActiveStream>();
    let mut resp = sender.send_request(req).await?;
    let protocol = resp.headers().get(UPGRADE).cloned();
    strip_hop_by_hop(resp.headers_mut());
    if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
        return Ok(resp);
    }
    // Of the hop-by-hop headers, a switch keeps the upgrade pair only (the
    // hop before may have said `close`: the inbound proxy serves one request
    // per stream).
    resp.headers_mut()
        .insert(CONNECTION, HeaderValue::from_static("upgrade"));
    if let Some(p) = protocol {
        resp.headers_mut().insert(UPGRADE, p);
    }
    let server = hyper::upgrade::on(&mut resp);
    let idle = shared.settings.tcp_idle_timeout();
    let shared2 = shared.clone();
    shared.spawn(async move {
        let _in_flight = in_flight;
        let _held = count.hold;
        match tokio::try_join!(client, server) {
            Ok((c, s)) => {
                // Counted once both sides have switched.
                let (sent, received) = count_relay(&shared2.metrics, &count.labels, count.row);
                let (mut c, mut s) = (TokioIo::new(c), TokioIo::new(s));
                if let Err(e) = relay(&mut c, &mut s, idle, sent, received).await {
                    tracing::debug!("upgraded connection ended: {e}");
                    // A side that broke off: the other learns it as a reset,
                    // not as an end that would pass a cut exchange for a
                    // whole one.
                    if crate::abort::broke_off(&e) {
                        tokio::join!(
                            crate::abort::abort_upgraded(c.into_inner()),
                            crate::abort::abort_upgraded(s.into_inner()),
                        );
                    } else {
                        // The caller's side closes at once; the next hop's
                        // stream ends once the far side has ended it.
                        drop(c);
                        crate::abort::finish_upgraded(s.into_inner()).await;
                    }
                }
            }
            Err(e) => tracing::debug!("upgrade not completed: {e}"),
        }
    });
    Ok(resp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_websocket_key_is_its_bytes_in_base64() {
        // RFC 6455 section 1.3's sample nonce.
        assert_eq!(
            websocket_key(*b"the sample nonce"),
            "dGhlIHNhbXBsZSBub25jZQ=="
        );
        let bytes: [u8; 16] = std::array::from_fn(|i| i as u8 * 17);
        assert_eq!(websocket_key(bytes), "ABEiM0RVZneImaq7zN3u/w==");
    }
}
