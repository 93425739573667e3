//! Protocol detection on captured outbound connections: HTTP/1.x, HTTP/2 with
//! prior knowledge (gRPC included), or opaque TCP.
//!
//! Detection looks at the first bytes only; a client that sends nothing within
//! the sniff timeout (a server-speaks-first protocol such as SMTP or MySQL) is
//! treated as opaque TCP, so it never waits for its own first byte.

use std::time::Duration;

use bytes::{BufMut, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

/// HTTP/2 connection preface (RFC 9113 §3.4).
pub const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Most bytes read before deciding: a request line of this length (a
/// WebDAV path, a long query) is still seen whole, to its `HTTP/1.x`.
pub const MAX_SNIFF_BYTES: usize = 2048;

const METHODS: &[&[u8]] = &[
    b"GET", b"POST", b"PUT", b"DELETE", b"HEAD", b"OPTIONS", b"PATCH", b"TRACE",
];

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Http1,
    Http2,
    Tcp,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Detection {
    Decided(Protocol),
    /// The bytes so far are a prefix of more than one protocol.
    NeedMore,
}

/// Classifies the first bytes of a connection (only the first
/// [`MAX_SNIFF_BYTES`] count). Monotone: once a prefix is decided, every
/// extension of it decides the same way.
pub fn detect(buf: &[u8]) -> Detection {
    let buf = &buf[..buf.len().min(MAX_SNIFF_BYTES)];
    if buf.is_empty() {
        return Detection::NeedMore;
    }
    let n = buf.len().min(H2_PREFACE.len());
    if buf[..n] == H2_PREFACE[..n] {
        return if n == H2_PREFACE.len() {
            Detection::Decided(Protocol::Http2)
        } else {
            Detection::NeedMore
        };
    }
    // A known method followed by a space, on a request line that ends in
    // `HTTP/1.x`: HTTP/1.x. Other protocols start lines with the same words
    // (Redis `GET key`, RTSP `OPTIONS rtsp://… RTSP/1.0`): a line that ends
    // otherwise is theirs. A request line longer than what is read is taken
    // as HTTP. `CONNECT` is left out on purpose: a captured client speaking
    // to a forward proxy is opaque to us.
    for m in METHODS {
        if buf.len() > m.len() && buf.starts_with(m) && buf[m.len()] == b' ' {
            return request_line(buf, true);
        }
    }
    // Any other method (WebDAV's `PROPFIND`, `PURGE`, `QUERY`...): an
    // upper-case token and a space, on a line that ends in `HTTP/1.x` within
    // what is read (a line longer than that stays opaque: these words
    // start other protocols' lines too). `CONNECT` and `PRI` (the HTTP/2
    // preface's) never.
    let token = buf.iter().take_while(|b| is_method_char(**b)).count();
    if token == buf.len() {
        return if token <= MAX_METHOD {
            Detection::NeedMore
        } else {
            Detection::Decided(Protocol::Tcp)
        };
    }
    if (1..=MAX_METHOD).contains(&token)
        && buf[token] == b' '
        && !matches!(&buf[..token], b"CONNECT" | b"PRI")
    {
        return request_line(buf, false);
    }
    Detection::Decided(Protocol::Tcp)
}

/// Longest method name taken for an HTTP method.
const MAX_METHOD: usize = 20;

fn is_method_char(b: u8) -> bool {
    b.is_ascii_uppercase() || b == b'-' || b == b'_'
}

/// After `METHOD `: HTTP/1.x when the line ends in ` HTTP/1.<digit>`, opaque
/// when it ends otherwise; a line that fills what is read without ending is
/// HTTP if `long_is_http` (a well-known method), else opaque.
fn request_line(buf: &[u8], long_is_http: bool) -> Detection {
    let Some(end) = buf.iter().position(|&b| b == b'\n') else {
        return if buf.len() >= MAX_SNIFF_BYTES {
            Detection::Decided(if long_is_http {
                Protocol::Http1
            } else {
                Protocol::Tcp
            })
        } else {
            Detection::NeedMore
        };
    };
    let line = buf[..end].strip_suffix(b"\r").unwrap_or(&buf[..end]);
    let http = line.len() >= 9
        && line[line.len() - 9..line.len() - 1] == *b" HTTP/1."
        && line[line.len() - 1].is_ascii_digit();
    Detection::Decided(if http { Protocol::Http1 } else { Protocol::Tcp })
}

/// Whether the bytes start like an HTTP/1.x request (a known method and a
/// space): what a client that stops half-way through its request line is
/// taken for.
fn starts_like_a_request(buf: &[u8]) -> bool {
    METHODS
        .iter()
        .any(|m| buf.len() > m.len() && buf.starts_with(m) && buf[m.len()] == b' ')
}

/// Reads from `io` until [`detect`] decides, the client stops sending for
/// `wait`, or the connection ends. Returns the protocol and the bytes read,
/// which the caller must replay; an error when the client reset (nothing
/// is to be passed on then, not even as a clean end).
pub async fn sniff<R: AsyncRead + Unpin>(
    io: &mut R,
    wait: Duration,
) -> std::io::Result<(Protocol, BytesMut)> {
    // Most first reads are short: grown only for a long first line.
    let mut buf = BytesMut::with_capacity(256);
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        match detect(&buf) {
            Detection::Decided(p) => return Ok((p, buf)),
            Detection::NeedMore if buf.len() >= MAX_SNIFF_BYTES => return Ok((Protocol::Tcp, buf)),
            Detection::NeedMore => {}
        }
        let room = MAX_SNIFF_BYTES - buf.len();
        match tokio::time::timeout_at(deadline, io.read_buf(&mut (&mut buf).limit(room))).await {
            Ok(Err(e)) => return Err(e),
            Ok(Ok(0)) | Err(_) => {
                let p = if starts_like_a_request(&buf) {
                    Protocol::Http1
                } else {
                    Protocol::Tcp
                };
                return Ok((p, buf));
            }
            Ok(Ok(_)) => {}
        }
    }
}

/// For a port declared HTTP: reads until the bytes are the HTTP/2 preface
/// or cannot become it (HTTP/1.x, which hyper then parses or refuses), the
/// client stops sending for `wait`, or the connection ends. Never opaque
/// TCP, however long the client waits. Returns the bytes read, to replay;
/// an error when the client reset.
pub async fn sniff_http<R: AsyncRead + Unpin>(
    io: &mut R,
    wait: Duration,
) -> std::io::Result<(Protocol, BytesMut)> {
    let mut buf = BytesMut::with_capacity(H2_PREFACE.len());
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let n = buf.len().min(H2_PREFACE.len());
        if buf[..n] != H2_PREFACE[..n] {
            return Ok((Protocol::Http1, buf));
        }
        if n == H2_PREFACE.len() {
            return Ok((Protocol::Http2, buf));
        }
        let room = H2_PREFACE.len() - buf.len();
        match tokio::time::timeout_at(deadline, io.read_buf(&mut (&mut buf).limit(room))).await {
            Ok(Err(e)) => return Err(e),
            Ok(Ok(0)) | Err(_) => return Ok((Protocol::Http1, buf)),
            Ok(Ok(_)) => {}
        }
    }
}

/// The fuzz harness, also run over seed inputs by the unit tests: detection
/// never panics and is monotone over every prefix of the input.
pub fn fuzz_detect(data: &[u8]) {
    let full = detect(data);
    for i in 0..data.len() {
        if let Detection::Decided(p) = detect(&data[..i]) {
            assert_eq!(
                full,
                Detection::Decided(p),
                "prefix {i} of {data:?} decided differently"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_each_protocol() {
        assert_eq!(
            detect(b"GET / HTTP/1.1\r\n"),
            Detection::Decided(Protocol::Http1)
        );
        assert_eq!(detect(b"POST /x"), Detection::NeedMore);
        assert_eq!(
            detect(b"POST /x HTTP/1.0\n"),
            Detection::Decided(Protocol::Http1)
        );
        // A request line longer than what is read: HTTP.
        let mut long = b"GET /".to_vec();
        long.extend_from_slice(&[b'a'; MAX_SNIFF_BYTES]);
        assert_eq!(detect(&long), Detection::Decided(Protocol::Http1));
        // Seen to its end when it fits: a long one is HTTP as a short one,
        // and a long Redis key is not.
        let mut line = b"GET /".to_vec();
        line.extend_from_slice(&[b'a'; 300]);
        assert_eq!(detect(&line), Detection::NeedMore);
        line.extend_from_slice(b" HTTP/1.1\r\n");
        assert_eq!(detect(&line), Detection::Decided(Protocol::Http1));
        let mut key = b"GET ".to_vec();
        key.extend_from_slice(&[b'k'; 300]);
        key.extend_from_slice(b"\r\n");
        assert_eq!(detect(&key), Detection::Decided(Protocol::Tcp));
        // Other protocols' lines that start with a method.
        assert_eq!(detect(b"GET key\r\n"), Detection::Decided(Protocol::Tcp));
        assert_eq!(
            detect(b"OPTIONS rtsp://cam/1 RTSP/1.0\r\n"),
            Detection::Decided(Protocol::Tcp)
        );
        assert_eq!(detect(H2_PREFACE), Detection::Decided(Protocol::Http2));
        assert_eq!(
            detect(b"\x16\x03\x01\x02"),
            Detection::Decided(Protocol::Tcp)
        );
        assert_eq!(
            detect(b"SSH-2.0-OpenSSH"),
            Detection::Decided(Protocol::Tcp)
        );
        assert_eq!(detect(b"GETX"), Detection::NeedMore);
        assert_eq!(
            detect(b"get / HTTP/1.1\r\n"),
            Detection::Decided(Protocol::Tcp)
        );
        assert_eq!(detect(b"PRI * HTTP/1.1"), Detection::Decided(Protocol::Tcp));
    }

    #[test]
    fn other_methods_on_an_http_request_line_are_http() {
        for line in [
            &b"PROPFIND /dav/ HTTP/1.1\r\n"[..],
            b"PURGE /cache/x HTTP/1.1\r\n",
            b"QUERY /search HTTP/1.1\r\n",
            b"M-SEARCH * HTTP/1.1\r\n",
            b"GETX / HTTP/1.0\n",
        ] {
            assert_eq!(
                detect(line),
                Detection::Decided(Protocol::Http1),
                "{line:?}"
            );
            fuzz_detect(line);
        }
        assert_eq!(detect(b"PROPFIND /dav/"), Detection::NeedMore);
        // Lines of other protocols, and lines too long to tell: opaque.
        assert_eq!(
            detect(b"SET key value\r\n"),
            Detection::Decided(Protocol::Tcp)
        );
        assert_eq!(
            detect(b"CONNECT example.com:443 HTTP/1.1\r\n"),
            Detection::Decided(Protocol::Tcp)
        );
        let mut long = b"PROPFIND /".to_vec();
        long.extend_from_slice(&[b'a'; MAX_SNIFF_BYTES]);
        assert_eq!(detect(&long), Detection::Decided(Protocol::Tcp));
        fuzz_detect(&long);
        // A WebDAV path of a few hundred bytes is seen to its end.
        let mut dav = b"PROPFIND /remote.php/dav/files/".to_vec();
        dav.extend_from_slice(&[b'd'; 300]);
        dav.extend_from_slice(b"/ HTTP/1.1\r\n");
        assert_eq!(detect(&dav), Detection::Decided(Protocol::Http1));
        fuzz_detect(&dav);
        assert_eq!(detect(&[b'A'; 30]), Detection::Decided(Protocol::Tcp));
    }

    #[test]
    fn waits_on_ambiguous_prefixes() {
        assert_eq!(detect(b""), Detection::NeedMore);
        assert_eq!(detect(b"GE"), Detection::NeedMore);
        assert_eq!(detect(b"GET"), Detection::NeedMore);
        assert_eq!(detect(b"PRI * HTTP/2"), Detection::NeedMore);
        assert_eq!(detect(b"P"), Detection::NeedMore);
    }

    #[test]
    fn fuzz_harness_over_seeds() {
        for seed in [
            &b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"[..],
            H2_PREFACE,
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x12\x04",
            b"\x00\xff\xfePOST ",
            b"HEAD",
            b"OPTIONS * HTTP/1.1",
            b"",
        ] {
            fuzz_detect(seed);
        }
    }

    #[tokio::test]
    async fn a_client_that_stops_inside_its_request_line_is_taken_for_http() {
        let (mut a, mut b) = tokio::io::duplex(64);
        tokio::io::AsyncWriteExt::write_all(&mut b, b"GET /slow")
            .await
            .unwrap();
        let (p, buf) = sniff(&mut a, Duration::from_millis(20)).await.unwrap();
        assert_eq!(p, Protocol::Http1);
        assert_eq!(&buf[..], b"GET /slow");
    }

    #[tokio::test]
    async fn silent_client_is_tcp_after_the_timeout() {
        let (mut client, _server) = tokio::io::duplex(64);
        let (p, buf) = sniff(&mut client, Duration::from_millis(20)).await.unwrap();
        assert_eq!(p, Protocol::Tcp);
        assert!(buf.is_empty());
    }

    #[tokio::test]
    async fn bytes_read_while_sniffing_are_returned() {
        let (mut a, mut b) = tokio::io::duplex(64);
        tokio::io::AsyncWriteExt::write_all(&mut b, b"PUT /k HTTP/1.1\r\n")
            .await
            .unwrap();
        let (p, buf) = sniff(&mut a, Duration::from_secs(5)).await.unwrap();
        assert_eq!(p, Protocol::Http1);
        assert!(b"PUT /k HTTP/1.1\r\n".starts_with(&buf));
    }

    #[tokio::test]
    async fn a_client_that_resets_while_sniffed_is_an_error_not_an_end() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = tokio::net::TcpStream::connect(l.local_addr().unwrap())
            .await
            .unwrap();
        let (mut server, _) = l.accept().await.unwrap();
        // An upper-case word: maybe a method, so more is waited for.
        tokio::io::AsyncWriteExt::write_all(&mut client, b"PING")
            .await
            .unwrap();
        client.set_zero_linger().unwrap();
        drop(client);
        let sniffed = sniff(&mut server, Duration::from_secs(10)).await;
        assert!(
            matches!(&sniffed, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
            "{sniffed:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_port_declared_http_is_never_tcp() {
        // Silent for the whole wait: HTTP/1.1 all the same (hyper decides).
        let (mut a, _b) = tokio::io::duplex(64);
        let (p, buf) = sniff_http(&mut a, Duration::from_secs(3600)).await.unwrap();
        assert_eq!((p, buf.len()), (Protocol::Http1, 0));
        // The preface, in pieces, whenever they come: HTTP/2.
        let (mut a, mut b) = tokio::io::duplex(64);
        let send = async {
            for piece in H2_PREFACE.chunks(5) {
                tokio::time::sleep(Duration::from_secs(60)).await;
                tokio::io::AsyncWriteExt::write_all(&mut b, piece)
                    .await
                    .unwrap();
            }
        };
        let (sniffed, ()) = tokio::join!(sniff_http(&mut a, Duration::from_secs(3600)), send);
        let (p, buf) = sniffed.unwrap();
        assert_eq!((p, &buf[..]), (Protocol::Http2, H2_PREFACE));
        // Anything else, even what `sniff` would call TCP: HTTP/1.1.
        for first in [
            &b"\r\nGET / HTTP/1.1\r\n"[..],
            b"\x16\x03\x01",
            b"PRI * HTTP/1.1",
        ] {
            let (mut a, mut b) = tokio::io::duplex(64);
            tokio::io::AsyncWriteExt::write_all(&mut b, first)
                .await
                .unwrap();
            let (p, buf) = sniff_http(&mut a, Duration::from_secs(3600)).await.unwrap();
            assert_eq!(p, Protocol::Http1, "{first:?}");
            assert!(first.starts_with(&buf));
        }
    }

    #[test]
    fn http_app_protocols() {
        let port = |p: Option<&str>| crate::config::ServicePort {
            port: 80,
            target_port: 8080,
            app_protocol: p.map(Into::into),
        };
        for p in [
            "http",
            "HTTP",
            "h2c",
            "grpc",
            "kubernetes.io/h2c",
            "kubernetes.io/ws",
        ] {
            assert!(port(Some(p)).declares_http(), "{p}");
        }
        for p in [
            None,
            Some("tcp"),
            Some("https"),
            Some("http2"),
            Some("kubernetes.io/wss"),
            Some("mysql"),
        ] {
            assert!(!port(p).declares_http(), "{p:?}");
        }
    }

    #[test]
    fn fuzz_harness_over_the_seed_corpus() {
        for seed in crate::fuzz_seeds("sniff") {
            fuzz_detect(&seed);
        }
    }
}
