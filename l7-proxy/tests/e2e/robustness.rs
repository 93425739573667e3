//! Slow and malformed peers are cut off without affecting anyone else.

use std::{
    net::SocketAddr,
    sync::{Arc, atomic::AtomicUsize},
    time::Duration,
};

use bytes::Bytes;
use l7_proxy::Snapshot;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::{support::*, traffic::servers};

async fn mesh_with_cart() -> (Mesh, Vec<EchoServer>) {
    let mesh = Mesh::standard().await;
    let srv = mesh.serve_cart().await;
    (mesh, srv)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_client_is_cut_off_while_others_are_served() {
    let (mesh, _srv) = mesh_with_cart().await;
    let mut slow = mesh.connect(web().ip, SocketAddr::new(vip(1), 80)).await;
    slow.write_all(b"GET / HTTP/1.1\r\nHost: cart\r\n")
        .await
        .unwrap();
    let (mut rd, mut wr) = slow.into_split();
    // One header byte every 200 ms: the head is never complete.
    let dribble = tokio::spawn(async move {
        for _ in 0..100 {
            if wr.write_all(b"x").await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    let mut c = mesh.http1(web().ip, SocketAddr::new(vip(1), 80)).await;
    assert_eq!(c.get("/").await.status, 200, "others are served meanwhile");
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), rd.read_to_end(&mut buf)).await;
    assert!(read.is_ok(), "the slow client was not cut off");
    assert!(
        buf.is_empty() || String::from_utf8_lossy(&buf).starts_with("HTTP/1.1 408"),
        "{}",
        String::from_utf8_lossy(&buf)
    );
    dribble.abort();
    // A new client is served too.
    let mut c = mesh.http1(web().ip, SocketAddr::new(vip(1), 80)).await;
    assert_eq!(c.get("/").await.status, 200);
    mesh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_tls_client_is_cut_off_at_the_handshake_timeout() {
    let (mesh, _srv) = mesh_with_cart().await;
    let mut idle = tokio::net::TcpStream::connect(mesh.node_b_proxy())
        .await
        .unwrap();
    assert!(closed_by_peer(&mut idle).await);
    assert_eq!(
        mesh.b.metric(
            "sluice_tls_handshake_failures_total",
            &["Inbound", "timeout"]
        ),
        1.0
    );
    mesh.shutdown().await;
}

/// One address holding many TLS handshakes open on the tunnel port (a pod
/// opening connections it never completes) gets its further connections
/// closed at once; node proxies elsewhere are served meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_holding_many_handshakes_open_gets_no_more() {
    let mesh = Mesh::with_settings(vec![web(), bot()], vec![cart(0)], &|s| {
        s.max_handshakes_per_peer = 3;
        // Longer than the test: only the limit closes a connection.
        s.tls_handshake_timeout_ms = 60_000;
    })
    .await;
    let (_srv, port) = servers(&[cart(0)]).await;
    let mut snapshot = Snapshot {
        services: vec![mesh.service("cart", 1, port, &[cart(0)])],
        ..Default::default()
    };
    mesh.publish(&snapshot).await;
    let flood = || async {
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.bind("127.0.0.77:0".parse().unwrap()).unwrap();
        sock.connect(mesh.node_b_proxy()).await
    };
    let waiting = |tcp: &tokio::net::TcpStream| {
        let mut b = [0u8; 1];
        matches!(tcp.try_read(&mut b), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
    };
    // Four from one address (accepted in any order): one is closed at
    // once (reset before its connect returned, or just after).
    let mut held = Vec::new();
    let mut refused = 0;
    for _ in 0..4 {
        match flood().await {
            Ok(tcp) => held.push(tcp),
            Err(_) => refused += 1,
        }
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while refused == 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let before = held.len();
        held.retain(|tcp| waiting(tcp));
        refused += before - held.len();
    }
    assert_eq!(refused, 1, "a fourth handshake was let in");
    assert_eq!(
        mesh.b.metric(
            "sluice_tls_handshake_failures_total",
            &["Inbound", "peer_handshake_limit"]
        ),
        1.0
    );
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(held.len(), 3);
    for tcp in &held {
        assert!(waiting(tcp), "the other three wait for their handshakes");
    }
    // Node A's proxy, from another address, opens its tunnel connection.
    let mut c = mesh.http1(web().ip, SocketAddr::new(vip(1), 80)).await;
    assert_eq!(c.get("/").await.status, 200);
    // Once those handshakes end, the address may try again.
    drop(held);
    let refusals = || {
        mesh.b.metric(
            "sluice_tls_handshake_failures_total",
            &["Inbound", "peer_handshake_limit"],
        )
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut again = loop {
        let before = refusals();
        if let Ok(tcp) = flood().await {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if refusals() == before && waiting(&tcp) {
                break tcp;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the address stays refused after its handshakes ended"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    // A node proxy's address is never refused (a pod sharing its node's
    // address must not cut that node off).
    snapshot.services[0].endpoints[0].node_proxy = Some("127.0.0.77:15008".parse().unwrap());
    mesh.publish(&snapshot).await;
    let before = refusals();
    let mut more = Vec::new();
    for _ in 0..4 {
        more.push(flood().await.expect("a node proxy's address is let in"));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(refusals(), before);
    assert!(more.iter().all(waiting));
    drop(more);
    drop(again.shutdown().await);
    mesh.shutdown().await;
}

/// A TLS connection to node B's tunnel port as node A's proxy makes one:
/// web's certificate, asking for cart's.
async fn peer_tls(mesh: &Mesh) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    peer_tls_as(mesh, &web(), "127.0.0.1").await
}

/// The same with `from`'s certificate (a pod of node A), from address `at`.
async fn peer_tls_as(
    mesh: &Mesh,
    from: &Pod,
    at: &str,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let config = mesh
        .a
        .identities
        .client_config(&from.identity(), &cart(0).identity())
        .unwrap();
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind(SocketAddr::new(at.parse().unwrap(), 0)).unwrap();
    let tcp = sock.connect(mesh.node_b_proxy()).await.unwrap();
    tokio_rustls::TlsConnector::from(config)
        .connect(certs::server_name(&cart(0).identity()), tcp)
        .await
        .unwrap()
}

/// A GET a peer proxy sends through the tunnel, for the workload at
/// `target`.
fn peer_get(uri: &str, target: SocketAddr) -> http::Request<()> {
    http::Request::get(uri)
        .header(l7_proxy::config::TARGET_HEADER, target.to_string())
        .body(())
        .unwrap()
}

/// An HTTP/2 client over [`peer_tls_as`], and what its connection task
/// ended with.
async fn peer_h2(mesh: &Mesh, from: &Pod, at: &str) -> (h2::client::SendRequest<Bytes>, Ended) {
    h2_watched_over(peer_tls_as(mesh, from, at).await).await
}

/// A CONNECT stream to `to` on `h2`, answered 200, and its two halves.
async fn tunnel_stream(
    h2: &h2::client::SendRequest<Bytes>,
    to: SocketAddr,
) -> Result<(h2::SendStream<Bytes>, h2::RecvStream), h2::Error> {
    let mut h2 = h2.clone().ready().await?;
    let req = http::Request::builder()
        .method(http::Method::CONNECT)
        .uri(to.to_string())
        .body(())
        .unwrap();
    let (resp, send) = h2.send_request(req, false)?;
    let resp = resp.await?;
    assert_eq!(resp.status(), 200);
    Ok((send, resp.into_body()))
}

/// Whether `h2`'s connection was refused with GOAWAY ENHANCE_YOUR_CALM.
async fn calmed(h2: h2::client::SendRequest<Bytes>, ended: Ended) -> bool {
    let ended = tokio::time::timeout(Duration::from_secs(10), ended).await;
    assert!(ended.is_ok(), "the connection was kept");
    let e = match h2.ready().await {
        Ok(_) => return false,
        Err(e) => e,
    };
    e.is_go_away() && e.reason() == Some(h2::Reason::ENHANCE_YOUR_CALM)
}

/// One peer identity holding many tunnel connections from one address to
/// one local identity (a leaking or hostile peer) gets no more: GOAWAY
/// ENHANCE_YOUR_CALM says why. Another identity from that address, node A's
/// proxy, and the same identity once one of its connections closed are
/// served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_peer_identity_holding_many_tunnel_connections_gets_no_more() {
    let mesh = Mesh::with_settings(vec![web(), bot()], vec![cart(0)], &|s| {
        s.max_tunnel_connections_per_peer = 2;
    })
    .await;
    let _srv = mesh.serve_cart().await;
    let echo = tcp_server(SocketAddr::new(cart(0).ip, 0), None).await;
    // Not node A's address: its proxy's own connections are counted apart.
    const HOST: &str = "127.0.0.78";
    let refusals = || {
        mesh.b.metric(
            "sluice_tls_handshake_failures_total",
            &["Inbound", "peer_connection_limit"],
        )
    };
    let mut held = Vec::new();
    for _ in 0..2 {
        let (h2, ended) = peer_h2(&mesh, &web(), HOST).await;
        held.push((tunnel_stream(&h2, echo).await.unwrap(), h2, ended));
    }
    let (h2, ended) = peer_h2(&mesh, &web(), HOST).await;
    assert!(
        calmed(h2, ended).await,
        "a third connection of web's to cart"
    );
    assert_eq!(refusals(), 1.0);
    let (other, _ended) = peer_h2(&mesh, &bot(), HOST).await;
    let bots = tunnel_stream(&other, echo)
        .await
        .expect("another identity from the same address");
    // Node A's proxy opens its own connection for web (another address).
    let mut c = mesh.http1(web().ip, SocketAddr::new(vip(1), 80)).await;
    assert_eq!(c.get("/").await.status, 200);
    assert_eq!(refusals(), 1.0);
    // One closed: room for one more.
    drop(held.pop());
    let mut served = false;
    for _ in 0..50 {
        let (h2, _ended) = peer_h2(&mesh, &web(), HOST).await;
        if tunnel_stream(&h2, echo).await.is_ok() {
            served = true;
            break;
        }
        // The close may not have been seen yet.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(served, "no room after a connection closed");
    drop((held, other, bots));
    mesh.shutdown().await;
}

/// A tunnel connection the peer refuses right after its handshake (here
/// the peer's cap, GOAWAY ENHANCE_YOUR_CALM and a close; in TLS 1.3 a
/// refused client certificate likewise comes after our side of the
/// handshake) fails its dial with what the connection met (the GOAWAY, the
/// alert, or a write into the closed connection, whichever h2 sees first),
/// counted under that, not as a peer that never answered a PING.
#[tokio::test]
async fn a_tunnel_connection_refused_after_its_handshake_says_why() {
    let (log, _default) = capture_access_log();
    let mesh = Mesh::with_settings(vec![web()], vec![cart(0)], &|s| {
        s.max_tunnel_connections_per_peer = 1;
    })
    .await;
    let echo = tcp_server(SocketAddr::new(cart(0).ip, 0), None).await;
    mesh.publish_tcp_service("raw", 1, echo.port(), &[cart(0)])
        .await;
    // Web's one connection from node A's proxy's address is taken.
    let (held, _ended) = peer_h2(&mesh, &web(), "127.0.0.1").await;
    let stream = tunnel_stream(&held, echo).await.unwrap();
    let mut c = mesh.connect(web().ip, SocketAddr::new(vip(1), 80)).await;
    let _ = c.write_all(b"two").await;
    assert!(closed_by_peer(&mut c).await, "it was served");
    let failed = |reason: &str| {
        mesh.a.metric(
            "sluice_tls_handshake_failures_total",
            &["Outbound", &format!("reason=\"{reason}\"")],
        )
    };
    assert_eq!(
        failed("goaway") + failed("io") + failed("eof"),
        1.0,
        "{}",
        mesh.a.metrics()
    );
    assert_eq!(failed("http2_settings"), 0.0, "{}", mesh.a.metrics());
    drop((stream, held));
    mesh.shutdown().await;
    let (text, records) = access_records(&log);
    let refused = records
        .iter()
        .find(|r| r["direction"] == "outbound" && !r["reason"].is_null())
        .unwrap_or_else(|| panic!("no failed outbound record in {text}"));
    let reason = refused["reason"].as_str().unwrap();
    let (_, why) = reason
        .split_once("the connection ended before the peer's HTTP/2 settings: ")
        .unwrap_or_else(|| panic!("{reason}"));
    assert!(!why.is_empty() && !why.contains("PING"), "{reason}");
}

/// A connection past its age (GOAWAY said) that still carries a long-lived
/// TCP stream no longer counts: the peer's next connection is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retired_tunnel_connection_does_not_count_towards_the_cap() {
    let mesh = Mesh::with_settings(vec![web()], vec![cart(0)], &|s| {
        s.max_tunnel_connections_per_peer = 1;
        s.tunnel_max_age_ms = 300;
    })
    .await;
    mesh.publish(&Snapshot::default()).await;
    let echo = tcp_server(SocketAddr::new(cart(0).ip, 0), None).await;
    let (old, _old_ended) = peer_h2(&mesh, &web(), "127.0.0.79").await;
    let (mut send, mut recv) = tunnel_stream(&old, echo).await.unwrap();
    // Past its age: GOAWAY, and the stream goes on.
    until_goaway(&old, echo).await;
    let (new, _new_ended) = peer_h2(&mesh, &web(), "127.0.0.79").await;
    let served = tunnel_stream(&new, echo)
        .await
        .expect("the retired connection still held the peer's only slot");
    send.send_data(Bytes::from_static(b"still"), false).unwrap();
    assert_eq!(recv.data().await.unwrap().unwrap(), "still");
    drop((send, recv, old, new, served));
    mesh.shutdown().await;
}

/// Waits until `h2`'s connection refuses new streams (its GOAWAY came).
async fn until_goaway(h2: &h2::client::SendRequest<Bytes>, to: SocketAddr) {
    let refused = tokio::time::timeout(Duration::from_secs(10), async {
        while tunnel_stream(h2, to).await.is_ok() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(refused.is_ok(), "no GOAWAY past the connection's age");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mesh_peer_silent_after_the_handshake_is_cut_off() {
    let (mesh, _srv) = mesh_with_cart().await;
    // A real mesh certificate and a finished TLS handshake, then nothing:
    // not even the HTTP/2 preface.
    let mut tls = peer_tls(&mesh).await;
    let mut buf = [0u8; 256];
    let closed = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match tls.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => continue,
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the silent tunnel connection was kept open");
    // Others are served meanwhile and after.
    let mut c = mesh.http1(web().ip, SocketAddr::new(vip(1), 80)).await;
    assert_eq!(c.get("/").await.status, 200);
    mesh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_and_oversized_requests_only_hurt_their_own_connection() {
    let (mesh, srv) = mesh_with_cart().await;
    let mut c = mesh.http1(web().ip, SocketAddr::new(vip(1), 80)).await;
    assert_eq!(c.get("/").await.status, 200);

    // HTTP-looking garbage on the capture port.
    let mut g = mesh.connect(web().ip, SocketAddr::new(vip(1), 80)).await;
    g.write_all(b"GET \x00\xff\xfe not a request\r\n\x01\x02\r\n\r\n")
        .await
        .unwrap();
    assert!(closed_by_peer(&mut g).await);

    // A header section far over the limit.
    let mut big = mesh.connect(web().ip, SocketAddr::new(vip(1), 80)).await;
    let huge = format!(
        "GET / HTTP/1.1\r\nHost: cart\r\nx-big: {}\r\n\r\n",
        "a".repeat(256 * 1024)
    );
    let _ = big.write_all(huge.as_bytes()).await;
    let mut head = vec![0u8; 12];
    let n = tokio::time::timeout(Duration::from_secs(10), big.read(&mut head))
        .await
        .expect("an answer or a close");
    if let Ok(n) = n
        && n > 0
    {
        assert_eq!(
            &head[..n.min(12)],
            &b"HTTP/1.1 431"[..n.min(12)],
            "oversized head answered 431"
        );
    }

    // Random bytes on the tunnel port.
    let mut t = tokio::net::TcpStream::connect(mesh.node_b_proxy())
        .await
        .unwrap();
    let junk: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let _ = t.write_all(&junk).await;
    assert!(closed_by_peer(&mut t).await);

    // The well-behaved connection is still fine, and only its requests
    // reached the server.
    assert_eq!(c.get("/").await.status, 200);
    assert_eq!(srv[0].hits(), 2);
    mesh.shutdown().await;
}

/// A head the proxy answers itself (malformed: by its own HTTP/1.1 server,
/// or by hyper's after a request only hyper serves) is a request the mesh
/// answered: counted for the Service under no route, and logged with the
/// caller's identity and why.
#[tokio::test]
async fn refused_heads_are_counted_and_logged() {
    let (log, _default) = capture_access_log();
    let (mesh, srv) = mesh_with_cart().await;
    let bad_heads: [&[u8]; 2] = [
        // The proxy's own server (a header line without a colon).
        b"GET / HTTP/1.1\r\nHost cart\r\n\r\n",
        // An `Expect` request goes to hyper's server, which then meets the
        // same line.
        b"POST /e HTTP/1.1\r\nHost: cart\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\nhi\
          GET / HTTP/1.1\r\nHost cart\r\n\r\n",
    ];
    for wire in bad_heads {
        let mut c = mesh.connect(web().ip, SocketAddr::new(vip(1), 80)).await;
        c.write_all(wire).await.unwrap();
        let mut got = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), c.read_to_end(&mut got)).await;
        let got = String::from_utf8_lossy(&got);
        assert!(got.contains("HTTP/1.1 400 "), "{got}");
    }
    // The `Expect` request itself reached cart.
    assert_eq!(srv[0].hits(), 1);
    let refused = |m: &Mesh| {
        m.a.metric(
            "sluice_requests_total",
            &[
                "direction=\"Outbound\"",
                "status_class=\"4xx\"",
                "destination=\"shop/cart\"",
                "route=\"\"",
            ],
        )
    };
    eventually("both refusals counted", || refused(&mesh) == 2.0).await;
    let (text, records) = access_records(&log);
    let lines: Vec<_> = records
        .iter()
        .filter(|r| r["direction"] == "outbound" && r["status"] == 400)
        .collect();
    assert_eq!(lines.len(), 2, "{text}");
    for r in lines {
        assert_eq!(r["reason"], "malformed request head", "{r}");
        assert_eq!(r["source_identity"], web().identity().to_string(), "{r}");
        assert_eq!(r["destination"], "shop/cart", "{r}");
    }
    mesh.shutdown().await;
}

/// A stream that stops reading when told: its peer's writes then pile up.
struct Deaf<S> {
    inner: S,
    deaf: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Deaf<S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if self.deaf.load(std::sync::atomic::Ordering::SeqCst) {
            return std::task::Poll::Pending;
        }
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Deaf<S> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Publishes Service `cart` (HTTP) with cart-0 serving on `addr`.
async fn publish_http_cart(mesh: &Mesh, addr: SocketAddr) {
    let mut svc = mesh.service("cart", 1, addr.port(), &[cart(0)]);
    svc.ports[0].app_protocol = Some("http".into());
    mesh.publish(&Snapshot {
        services: vec![svc],
        ..Default::default()
    })
    .await;
}

/// An HTTP/1.1 workload answering every request with an endless body.
async fn endless_server(ip: std::net::IpAddr) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind(SocketAddr::new(ip, 0))
        .await
        .unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut head = [0u8; 4096];
                let _ = tcp.read(&mut head).await;
                let _ = tcp
                    .write_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
                    .await;
                let mut chunk = b"10000\r\n".to_vec();
                chunk.extend_from_slice(&[b'x'; 0x10000]);
                chunk.extend_from_slice(b"\r\n");
                while tcp.write_all(&chunk).await.is_ok() {}
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tunnel_peer_that_stops_reading_is_cut_off() {
    let mesh = Mesh::with_settings(vec![web()], vec![cart(0)], &|s| {
        s.tunnel_write_stall_timeout_ms = 500;
    })
    .await;
    let addr = endless_server(cart(0).ip).await;
    publish_http_cart(&mesh, addr).await;
    // A peer proxy with web's certificate that grants any amount of window,
    // takes the first bytes of an endless response, then reads no more.
    let tls = peer_tls(&mesh).await;
    let deaf = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (send, conn) = h2::client::Builder::new()
        .initial_window_size(i32::MAX as u32)
        .initial_connection_window_size(i32::MAX as u32)
        .handshake::<_, bytes::Bytes>(Deaf {
            inner: tls,
            deaf: deaf.clone(),
        })
        .await
        .unwrap();
    tokio::spawn(conn);
    let mut send = send.ready().await.unwrap();
    let req = peer_get("http://cart.shop/endless", addr);
    let (resp, _) = send.send_request(req, true).unwrap();
    let resp = resp.await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let first = body.data().await.unwrap().unwrap();
    assert!(!first.is_empty());
    let tunnels_in = || {
        mesh.b
            .proxy()
            .connections()
            .iter()
            .filter(|r| r.kind == l7_proxy::conntable::ConnKind::TunnelIn)
            .count()
    };
    assert_eq!(tunnels_in(), 1);
    deaf.store(true, std::sync::atomic::Ordering::SeqCst);
    eventually(
        "node B closed the tunnel of the peer that stopped reading",
        || tunnels_in() == 0,
    )
    .await;
    mesh.shutdown().await;
}

/// A TCP server that counts the connections it accepts, and reads and
/// drops what they send.
async fn counting_tcp_server(ip: std::net::IpAddr) -> (SocketAddr, Arc<AtomicUsize>) {
    let l = tokio::net::TcpListener::bind(SocketAddr::new(ip, 0))
        .await
        .unwrap();
    let addr = l.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = l.accept().await {
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                while matches!(tcp.read(&mut buf).await, Ok(1..)) {}
            });
        }
    });
    (addr, accepted)
}

/// A pod port a Service declares `appProtocol: tcp` takes no HTTP request,
/// whatever an access policy allows by method and path: a `GET /public`
/// with a body of commands would have reached a server that reads its bytes
/// as commands. A caller's connection to the pod's address is opaque TCP
/// (which that policy does not allow), and a peer proxy's HTTP stream is
/// refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_port_declared_tcp_takes_no_http_request() {
    use l7_proxy::config::{
        AccessPolicy, AccessRule, AccessSource, HttpConditions, ObjectRef, PathCondition,
    };
    let mesh = Mesh::standard().await;
    let (server, accepted) = counting_tcp_server(cart(0).ip).await;
    let mut svc = mesh.service("cart", 1, server.port(), &[cart(0)]);
    svc.ports[0].app_protocol = Some("tcp".into());
    mesh.publish(&Snapshot {
        services: vec![svc],
        workloads: vec![l7_proxy::config::Workload {
            ip: cart(0).ip,
            // The pod the Service's endpoint names.
            id: ObjectRef::new("shop", cart(0).name),
            node_proxy: Some(mesh.node_b_proxy()),
            identity: Some(cart(0).identity()),
        }],
        access_policies: vec![AccessPolicy {
            id: ObjectRef::new("shop", "cart-access"),
            target: ObjectRef::new("shop", "cart"),
            rules: vec![AccessRule {
                from: vec![AccessSource::Identity(web().identity())],
                to: Some(HttpConditions {
                    methods: vec!["GET".into()],
                    paths: vec![PathCondition::Subtree("/public".into())],
                }),
            }],
        }],
        ..Default::default()
    })
    .await;
    let smuggled = b"GET /public HTTP/1.1\r\nhost: cart\r\ncontent-length: 10\r\n\r\nflush_all\n";
    // Through the capture, to the pod's address.
    let mut t = mesh.connect(web().ip, server).await;
    let _ = t.write_all(smuggled).await;
    assert!(closed_by_peer(&mut t).await, "not refused");
    // A peer proxy's HTTP stream to it.
    let (h2, _ended) = peer_h2(&mesh, &web(), "127.0.0.1").await;
    let mut h2 = h2.ready().await.unwrap();
    let req = peer_get("http://cart/public", server);
    let (resp, _) = h2.send_request(req, true).unwrap();
    let resp = resp.await.unwrap();
    assert_eq!(resp.status(), 403);
    let reason = resp.headers()["sluice-reason"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(reason.contains("declared TCP"), "{reason}");
    assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 0);
    mesh.shutdown().await;
}

/// A request whose Host disagrees with its `:authority`, or comes twice, is
/// malformed (RFC 9113 section 8.3.1): refused with `400`, not forwarded
/// with two opinions on its host.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tunnel_request_with_a_second_host_is_refused() {
    let mesh = Mesh::standard().await;
    let srv = mesh.serve_cart().await;
    let target = srv[0].addr;
    let (h2, _ended) = peer_h2(&mesh, &web(), "127.0.0.1").await;
    for hosts in [&["evil"][..], &["cart", "evil"], &["cart"]] {
        let mut h2 = h2.clone().ready().await.unwrap();
        let mut req = peer_get("http://cart/", target);
        for h in hosts {
            req.headers_mut()
                .append(http::header::HOST, h.parse().unwrap());
        }
        let (resp, _) = h2.send_request(req, true).unwrap();
        let status = resp.await.unwrap().status();
        let want = if hosts == ["cart"] { 200 } else { 400 };
        assert_eq!(status, want, "{hosts:?}");
    }
    assert_eq!(srv[0].hits(), 1, "only the agreeing one went");
    mesh.shutdown().await;
}

/// A peer proxy that reads its socket but never opens a stream's window:
/// the workload's node resets the stream after the exchange idle timeout
/// (its task and the workload's connection were held for ever).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tunnel_stream_given_no_window_is_reset() {
    let mesh = Mesh::with_settings(vec![web()], vec![cart(0)], &|s| {
        s.exchange_idle_timeout_ms = 300;
    })
    .await;
    let addr = endless_server(cart(0).ip).await;
    publish_http_cart(&mesh, addr).await;
    let tls = peer_tls(&mesh).await;
    let (send, conn) = h2::client::Builder::new()
        .initial_window_size(1)
        .handshake::<_, bytes::Bytes>(tls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let mut send = send.ready().await.unwrap();
    let req = peer_get("http://cart.shop/endless", addr);
    let (resp, _) = send.send_request(req, true).unwrap();
    let resp = resp.await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    // Read what comes, never giving the room back.
    let end = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match body.data().await {
                Some(Ok(_)) => continue,
                Some(Err(e)) => break Some(e),
                None => break None,
            }
        }
    })
    .await
    .expect("the stream is ended");
    let e = end.expect("a reset, not an end of stream");
    assert_eq!(e.reason(), Some(h2::Reason::CANCEL), "{e}");
    mesh.shutdown().await;
}

/// An HTTP/1.1 workload that answers `ok` as soon as a request head is in,
/// and goes on reading whatever body follows.
async fn early_answer_server(ip: std::net::IpAddr) -> SocketAddr {
    early_answer_server_recording(ip).await.0
}

/// [`early_answer_server`], and the request lines it was sent.
async fn early_answer_server_recording(
    ip: std::net::IpAddr,
) -> (SocketAddr, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    let listener = tokio::net::TcpListener::bind(SocketAddr::new(ip, 0))
        .await
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let record = lines.clone();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            let record = record.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65536];
                let mut seen = Vec::new();
                loop {
                    let Ok(n) = tcp.read(&mut buf).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    seen.extend_from_slice(&buf[..n]);
                    // Answer each head as it completes (keep-alive).
                    while let Some(end) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head = String::from_utf8_lossy(&seen[..end]).into_owned();
                        if let Some(line) = head.lines().next() {
                            record.lock().unwrap().push(line.to_string());
                        }
                        seen.drain(..end + 4);
                        let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                        if tcp.write_all(ok).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    (addr, lines)
}

/// A 1000-byte upload to the cart VIP that an early-answering workload
/// answers after its first 10 bytes: its body keeps its tunnel stream open.
async fn answered_upload(mesh: &Mesh) -> tokio::net::TcpStream {
    let mut upload = mesh.connect(web().ip, SocketAddr::new(vip(1), 80)).await;
    upload
        .write_all(b"POST /up HTTP/1.1\r\nhost: cart\r\ncontent-length: 1000\r\n\r\n0123456789")
        .await
        .unwrap();
    let answer = read_n(&mut upload, 40).await;
    assert!(answer.starts_with(b"HTTP/1.1 200"), "{answer:?}");
    upload
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_counts_until_its_request_body_is_sent_not_only_its_response() {
    // One stream per tunnel connection, on both sides.
    let mesh = Mesh::with_settings(vec![web()], vec![cart(0)], &|s| {
        s.tunnel_max_streams = 1;
    })
    .await;
    let addr = early_answer_server(cart(0).ip).await;
    publish_http_cart(&mesh, addr).await;
    // An upload the workload answers at once; its body keeps its stream
    // open on the tunnel after the answer.
    let upload = answered_upload(&mesh).await;
    // Another request needs another stream: the pool must not count the
    // upload's as free (its peer would not take a second one).
    let mut c = mesh.http1(web().ip, SocketAddr::new(vip(1), 80)).await;
    let r = tokio::time::timeout(Duration::from_secs(10), c.get("/next"))
        .await
        .expect("the second request waited for the upload's stream");
    assert_eq!(r.status, 200);
    assert_eq!(mesh.a.proxy().tunnel_connections(), 2);
    drop(upload);
    mesh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_waiting_for_a_dial_to_a_silent_peer_share_its_failure() {
    let mesh = Mesh::standard().await;
    // A "node proxy" that accepts connections and never says a word: each
    // dial waits out the TLS handshake timeout.
    let silent = tokio::net::TcpListener::bind((mesh.node_b_proxy().ip(), 0))
        .await
        .unwrap();
    let silent_addr = silent.local_addr().unwrap();
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = accepted.clone();
    let holder = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((tcp, _)) = silent.accept().await {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            held.push(tcp);
        }
    });
    let mut svc = mesh.service("db", 1, 5432, &[cart(0)]);
    svc.ports[0].app_protocol = Some("tcp".into());
    svc.endpoints[0].node_proxy = Some(silent_addr);
    mesh.publish(&Snapshot {
        services: vec![svc],
        ..Default::default()
    })
    .await;
    // Four connections at once: one dial, whose failure the other three,
    // queued behind it, get too (not four dials in a row).
    let mut clients = Vec::new();
    for _ in 0..4 {
        clients.push(mesh.connect(web().ip, SocketAddr::new(vip(1), 80)).await);
    }
    for mut c in clients {
        let mut buf = [0u8; 1];
        let closed = tokio::time::timeout(Duration::from_secs(30), c.read(&mut buf))
            .await
            .expect("the proxy gives up on the silent peer");
        assert!(matches!(closed, Ok(0) | Err(_)), "{closed:?}");
    }
    assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 1);
    holder.abort();
    mesh.shutdown().await;
}

/// A peer proxy (a real mesh identity) that opens a request stream and
/// never sends the body it announced: the workload's node does not hold
/// the stream and the workload connection for ever, but answers once the
/// exchange has been idle for its timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_stream_that_never_sends_its_body_is_ended_on_the_workload_node() {
    let mesh = Mesh::with_settings(vec![web()], vec![cart(0)], &|s| {
        s.exchange_idle_timeout_ms = 300;
    })
    .await;
    let srv = mesh.serve_cart().await;
    let (h2, conn) = h2::client::handshake(peer_tls(&mesh).await).await.unwrap();
    tokio::spawn(conn);
    let mut h2 = h2.ready().await.unwrap();
    let req = http::Request::post("http://cart/up")
        .header("sluice-target", srv[0].addr.to_string())
        .header("content-length", "10")
        .body(())
        .unwrap();
    let (resp, _send) = h2.send_request(req, false).unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(20), resp)
        .await
        .expect("an answer once the exchange went idle, not a stream held for ever")
        .unwrap();
    assert!(
        resp.status().is_client_error() || resp.status().is_server_error(),
        "{resp:?}"
    );
    assert_eq!(srv[0].hits(), 1, "the request did reach the workload");
    mesh.shutdown().await;
}

/// A peer that keeps a tunnel connection it no longer uses (an honest one
/// closes it after its own idle timeout): the server side says GOAWAY once
/// it has carried nothing for twice that, instead of holding it for its
/// whole age.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_side_closes_a_tunnel_connection_left_idle() {
    let mesh = Mesh::with_settings(vec![web()], vec![cart(0)], &|s| {
        s.tunnel_idle_timeout_ms = 200;
    })
    .await;
    mesh.publish(&Snapshot::default()).await;
    let echo = tcp_server(SocketAddr::new(cart(0).ip, 0), None).await;
    let (h2, ended) = h2_watched_over(peer_tls(&mesh).await).await;
    // One stream, used and ended: then nothing.
    let (mut send, mut recv) = tunnel_stream(&h2, echo).await.unwrap();
    send.send_data(bytes::Bytes::from_static(b"a"), true)
        .unwrap();
    assert_eq!(recv.data().await.unwrap().unwrap(), "a");
    drop((send, recv));
    // The handle is kept: the client side would end the connection itself
    // once it has none left.
    let ended = tokio::time::timeout(Duration::from_secs(10), ended)
        .await
        .expect("the server side ends an idle connection (GOAWAY)");
    assert!(ended.is_ok(), "{ended:?}");
    drop(h2);
    mesh.shutdown().await;
}

/// A tunnel connection whose one stream is open but quiet (a TCP
/// connection, a WebSocket, a gRPC server stream waiting for events) is
/// not idle: the server side does not say GOAWAY to it, which would make
/// its peer dial again for its next stream every two idle timeouts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_side_keeps_a_tunnel_connection_whose_stream_is_quiet() {
    let mesh = Mesh::with_settings(vec![web()], vec![cart(0)], &|s| {
        s.tunnel_idle_timeout_ms = 200;
    })
    .await;
    mesh.publish(&Snapshot::default()).await;
    let echo = tcp_server(SocketAddr::new(cart(0).ip, 0), None).await;
    let (h2, mut ended) = h2_watched_over(peer_tls(&mesh).await).await;
    let (mut send, mut recv) = tunnel_stream(&h2, echo).await.unwrap();
    send.send_data(bytes::Bytes::from_static(b"a"), false)
        .unwrap();
    assert_eq!(recv.data().await.unwrap().unwrap(), "a");
    // Five times the server side's idle limit with the stream open and
    // nothing on it.
    let early = tokio::time::timeout(Duration::from_secs(2), &mut ended).await;
    assert!(early.is_err(), "the connection ended: {early:?}");
    let (mut send2, mut recv2) = tunnel_stream(&h2, echo)
        .await
        .expect("a new stream on the connection");
    send2
        .send_data(bytes::Bytes::from_static(b"b"), true)
        .unwrap();
    assert_eq!(recv2.data().await.unwrap().unwrap(), "b");
    // The quiet stream still carries.
    send.send_data(bytes::Bytes::from_static(b"c"), true)
        .unwrap();
    assert_eq!(recv.data().await.unwrap().unwrap(), "c");
    drop((send, recv, send2, recv2, h2));
    mesh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_side_takes_no_new_streams_on_a_tunnel_past_its_age() {
    let mesh = Mesh::with_settings(vec![web()], vec![cart(0)], &|s| {
        s.tunnel_max_age_ms = 500;
    })
    .await;
    mesh.publish(&Snapshot::default()).await;
    let echo = tcp_server(SocketAddr::new(cart(0).ip, 0), None).await;
    // A peer that keeps its connection (and would keep it for ever): the
    // limit is the server's to enforce.
    let (h2, conn) = h2::client::handshake(peer_tls(&mesh).await).await.unwrap();
    tokio::spawn(conn);
    let (mut send, mut recv) = tunnel_stream(&h2, echo).await.unwrap();
    send.send_data(bytes::Bytes::from_static(b"a"), false)
        .unwrap();
    assert_eq!(recv.data().await.unwrap().unwrap(), "a");
    // Past the age, the server says GOAWAY: a new stream is refused.
    let refused = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match tunnel_stream(&h2, echo).await {
                Ok(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                Err(e) => return e,
            }
        }
    })
    .await
    .expect("new streams refused once the connection is past its age");
    assert!(refused.is_go_away() || refused.is_remote(), "{refused}");
    // The stream already open goes on.
    send.send_data(bytes::Bytes::from_static(b"b"), false)
        .unwrap();
    assert_eq!(recv.data().await.unwrap().unwrap(), "b");
    // Ended by the peer: nothing left for the shutdown to wait for.
    send.send_data(bytes::Bytes::new(), true).unwrap();
    drop((send, recv));
    mesh.shutdown().await;
}

/// A mesh whose node B allows `b_streams` streams per tunnel connection,
/// `tweak_a` adjusting node A, with a TCP echo service on cart 0.
async fn mesh_with_echo(b_streams: u32, tweak_a: &dyn Fn(&mut l7_proxy::ProxySettings)) -> Mesh {
    let mesh = Mesh::with_settings(vec![web()], vec![cart(0)], &|s| {
        if s.inbound_addr.ip() == node_b_ip() {
            s.tunnel_max_streams = b_streams;
        } else {
            tweak_a(s);
        }
    })
    .await;
    let echo = tcp_server(SocketAddr::new(cart(0).ip, 0), None).await;
    mesh.publish_tcp_service("echo", 1, echo.port(), &[cart(0)])
        .await;
    mesh
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_allowing_fewer_streams_gets_more_connections_not_a_queue() {
    // Node A would put 1,000 streams on a connection; node B takes two.
    let mesh = mesh_with_echo(2, &|_| {}).await;
    let mut open = Vec::new();
    for i in 0..5u8 {
        let mut t = mesh.connect(web().ip, SocketAddr::new(vip(1), 80)).await;
        t.write_all(&[i]).await.unwrap();
        // Each is echoed while the others stay open: none waits in a queue
        // behind the peer's limit.
        assert_eq!(read_n(&mut t, 1).await, [i]);
        open.push(t);
    }
    assert_eq!(
        mesh.a.proxy().tunnel_connections(),
        3,
        "two streams each, as the peer's SETTINGS say"
    );
    drop(open);
    mesh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_with_no_stream_free_anywhere_is_answered_after_the_connect_timeout() {
    // One connection per key on A, one stream per connection on B (test
    // settings: 2 s connect timeout).
    let mesh = Mesh::with_settings(vec![web()], vec![cart(0)], &|s| {
        if s.inbound_addr.ip() == node_b_ip() {
            s.tunnel_max_streams = 1;
        } else {
            s.tunnel_max_connections = 1;
        }
    })
    .await;
    let (addr, lines) = early_answer_server_recording(cart(0).ip).await;
    publish_http_cart(&mesh, addr).await;
    // An upload answered at once holds the only stream with its body.
    let mut upload = answered_upload(&mesh).await;
    // A request with no room anywhere is not queued for ever: it is
    // answered, naming why.
    let mut c = mesh.http1(web().ip, SocketAddr::new(vip(1), 80)).await;
    let r = tokio::time::timeout(Duration::from_secs(10), c.get("/next"))
        .await
        .expect("the request waited on past the connect timeout");
    assert_eq!(r.status, 503);
    let why = r.headers["sluice-reason"].to_str().unwrap();
    assert!(why.contains("had no free stream within"), "{why}");
    // The upload goes on, and once it ends its stream serves again.
    upload.write_all(&[b'x'; 990]).await.unwrap();
    drop(upload);
    let r = tokio::time::timeout(Duration::from_secs(10), c.get("/again"))
        .await
        .expect("answered");
    assert_eq!(r.status, 200);
    assert_eq!(mesh.a.proxy().tunnel_connections(), 1);
    // The request answered "no free stream" never reached the workload
    // (it was not left queued in h2, to be sent once a slot freed).
    let seen = lines.lock().unwrap().clone();
    assert_eq!(seen, ["POST /up HTTP/1.1", "GET /again HTTP/1.1"]);
    mesh.shutdown().await;
}

/// A TCP connection with no stream slot anywhere is given up on after the
/// connect timeout, and its stream is never opened later on: the workload
/// sees only the connections that were carried.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_given_up_for_want_of_a_stream_never_reaches_the_workload() {
    let mesh = Mesh::with_settings(vec![web()], vec![cart(0)], &|s| {
        if s.inbound_addr.ip() == node_b_ip() {
            s.tunnel_max_streams = 1;
        } else {
            s.tunnel_max_connections = 1;
        }
    })
    .await;
    // An echo server that counts the connections it accepts.
    let listener = tokio::net::TcpListener::bind(SocketAddr::new(cart(0).ip, 0))
        .await
        .unwrap();
    let port = listener.local_addr().unwrap().port();
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = accepted.clone();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            tokio::spawn(async move { echo_bytes(&mut tcp).await });
        }
    });
    mesh.publish_tcp_service("echo", 1, port, &[cart(0)]).await;
    let mut first = mesh.connect(web().ip, SocketAddr::new(vip(1), 80)).await;
    first.write_all(b"1").await.unwrap();
    assert_eq!(read_n(&mut first, 1).await, b"1");
    let mut second = mesh.connect(web().ip, SocketAddr::new(vip(1), 80)).await;
    second.write_all(b"2").await.unwrap();
    assert!(closed_by_peer(&mut second).await, "the second waited on");
    // The first ends: its slot frees. A given-up stream left queued would
    // open now and reach the workload.
    drop(first);
    let mut third = mesh.connect(web().ip, SocketAddr::new(vip(1), 80)).await;
    third.write_all(b"3").await.unwrap();
    assert_eq!(read_n(&mut third, 1).await, b"3");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        accepted.load(std::sync::atomic::Ordering::SeqCst),
        2,
        "a connection given up on reached the workload later"
    );
    mesh.shutdown().await;
}

/// Every connection of a key full, and the peer restarting (GOAWAY on them,
/// their streams draining for as long as they last): a new connection
/// opens to the new peer at once instead of waiting for a slot that the
/// old connections will never give.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_key_whose_connections_got_goaway_dials_anew() {
    let mut mesh = mesh_with_echo(1, &|s| {
        s.tunnel_max_streams = 1;
        s.tunnel_max_connections = 1;
    })
    .await;
    let mut held = mesh.connect(web().ip, SocketAddr::new(vip(1), 80)).await;
    held.write_all(b"1").await.unwrap();
    assert_eq!(read_n(&mut held, 1).await, b"1");
    // Node B's proxy restarts: its old self drains the held stream.
    let draining = mesh.restart_b().await;
    // (Waiting for a slot on the draining connection would end in "no free
    // stream", and this connection closed unanswered.)
    let mut fresh = mesh.connect(web().ip, SocketAddr::new(vip(1), 80)).await;
    fresh.write_all(b"2").await.unwrap();
    assert_eq!(read_n(&mut fresh, 1).await, b"2");
    // The held stream still works on the old connection.
    held.write_all(b"3").await.unwrap();
    assert_eq!(read_n(&mut held, 1).await, b"3");
    drop((held, fresh));
    let _ = draining.await;
    mesh.shutdown().await;
}

/// The same, with the request already waiting for a slot when the peer
/// restarts: a GOAWAY wakes nobody, so the waiter looks again on its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_waiting_on_a_full_key_dials_anew_after_a_goaway() {
    let mut mesh = mesh_with_echo(1, &|s| {
        s.tunnel_max_streams = 1;
        s.tunnel_max_connections = 1;
    })
    .await;
    let mut held = mesh.connect(web().ip, SocketAddr::new(vip(1), 80)).await;
    held.write_all(b"1").await.unwrap();
    assert_eq!(read_n(&mut held, 1).await, b"1");
    // Waits for the held stream's slot (the connect timeout is 2 s)...
    let mut waiting = mesh.connect(web().ip, SocketAddr::new(vip(1), 80)).await;
    waiting.write_all(b"2").await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    // ... when node B's proxy restarts and its old self says GOAWAY.
    let draining = mesh.restart_b().await;
    assert_eq!(read_n(&mut waiting, 1).await, b"2");
    held.write_all(b"3").await.unwrap();
    assert_eq!(read_n(&mut held, 1).await, b"3");
    drop((held, waiting));
    let _ = draining.await;
    mesh.shutdown().await;
}

/// A workload's keep-alive connection that carries no request is not closed
/// at the head timeout (hyper's server starts that one as soon as a
/// response is out): it stays for the keep-alive idle timeout, then closes
/// cleanly with nothing written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_keep_alive_connection_stays_until_the_idle_timeout() {
    let mesh = Mesh::with_settings(vec![web()], vec![cart(0)], &|s| {
        // The head timeout is 1 s in these tests.
        s.keepalive_idle_timeout_ms = 4_000;
    })
    .await;
    let _srv = mesh.serve_cart().await;
    let mut tcp = mesh.connect(web().ip, SocketAddr::new(vip(1), 80)).await;
    get_on(&mut tcp).await;
    // Idle for twice the head timeout: still open, and it carries the
    // next request.
    let mut buf = [0u8; 1024];
    let read = tokio::time::timeout(Duration::from_secs(2), tcp.read(&mut buf)).await;
    assert!(
        read.is_err(),
        "closed (or written to) while idle for less than the idle timeout: {read:?}"
    );
    // Before the request: the proxy's idle spell starts after it.
    let idle_from = tokio::time::Instant::now();
    get_on(&mut tcp).await;
    let n = tokio::time::timeout(Duration::from_secs(10), tcp.read(&mut buf))
        .await
        .expect("the idle connection was not closed")
        .expect("a clean close, not a reset");
    assert_eq!(n, 0, "{}", String::from_utf8_lossy(&buf[..n]));
    assert!(idle_from.elapsed() >= Duration::from_millis(3_950));
    mesh.shutdown().await;
}

/// On a kept-alive connection idle for longer than the head timeout, a head
/// that begins and then stalls is cut at the head timeout from its first
/// bytes, not left for the keep-alive idle timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_head_begun_after_an_idle_spell_has_the_head_timeout() {
    let mesh = Mesh::with_settings(vec![web()], vec![cart(0)], &|s| {
        s.keepalive_idle_timeout_ms = 60_000;
    })
    .await;
    let _srv = mesh.serve_cart().await;
    let mut tcp = mesh.connect(web().ip, SocketAddr::new(vip(1), 80)).await;
    get_on(&mut tcp).await;
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    // Before the bytes: the proxy's head timeout starts after them.
    let begun = tokio::time::Instant::now();
    tcp.write_all(b"GET / HTTP/1.1\r\nHost: cart\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 1024];
    // Well before the idle timeout: only the head timeout can close it.
    let n = tokio::time::timeout(Duration::from_secs(10), tcp.read(&mut buf))
        .await
        .expect("the stalled head was not cut")
        .unwrap_or(0);
    assert!(
        n == 0 || String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 408"),
        "{}",
        String::from_utf8_lossy(&buf[..n])
    );
    assert!(begun.elapsed() >= Duration::from_millis(950));
    mesh.shutdown().await;
}

/// A workload's HTTP/2 connection is shut down cleanly (GOAWAY) once no
/// stream has been in flight for the keep-alive idle timeout; a stream in
/// flight for longer holds it, and it takes new streams meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_http2_connection_closes_at_the_idle_timeout_and_a_stream_holds_it() {
    let mesh = Mesh::with_settings(vec![web()], vec![cart(0)], &|s| {
        s.keepalive_idle_timeout_ms = 1_500;
    })
    .await;
    let _srv = mesh.serve_cart().await;
    let (mut h2, ended) = watched_h2(&mesh, SocketAddr::new(vip(1), 80)).await;
    let post = http::Request::post("http://cart/").body(()).unwrap();
    let (answer, mut upload) = h2.send_request(post, false).unwrap();
    upload
        .send_data(bytes::Bytes::from_static(b"first "), false)
        .unwrap();
    // The upload in flight for twice the idle timeout.
    tokio::time::sleep(Duration::from_millis(3_000)).await;
    let get = http::Request::get("http://cart/").body(()).unwrap();
    let mut h2 = h2
        .ready()
        .await
        .expect("the connection still takes streams (no GOAWAY)");
    let (other, _) = h2.send_request(get, true).unwrap();
    let other = tokio::time::timeout(Duration::from_secs(10), other)
        .await
        .expect("an answer within 10 s")
        .expect("a new stream on a connection with one in flight is served");
    assert_eq!(other.status(), 200);
    drain_h2(other.into_body()).await;
    // Before the upload's end: the stream, and the proxy's idle spell,
    // end after it.
    let idle_from = tokio::time::Instant::now();
    upload
        .send_data(bytes::Bytes::from_static(b"rest"), true)
        .unwrap();
    let answer = tokio::time::timeout(Duration::from_secs(10), answer)
        .await
        .expect("an answer within 10 s")
        .unwrap();
    assert_eq!(answer.status(), 200);
    let echoed: serde_json::Value =
        serde_json::from_slice(&drain_h2(answer.into_body()).await).unwrap();
    assert_eq!(echoed["body"], "first rest");
    // Kept until then (a client drops its connection when its last
    // handle goes).
    let at = closed_with_goaway(h2, ended).await;
    assert!(at - idle_from >= Duration::from_millis(1_500));
    mesh.shutdown().await;
}

/// Reads an HTTP/2 response body whole.
async fn drain_h2(mut body: h2::RecvStream) -> Vec<u8> {
    let mut got = Vec::new();
    while let Some(chunk) = tokio::time::timeout(Duration::from_secs(10), body.data())
        .await
        .expect("data within 10 s")
    {
        let chunk = chunk.unwrap();
        let _ = body.flow_control().release_capacity(chunk.len());
        got.extend_from_slice(&chunk);
    }
    got
}

/// Sends a GET on `tcp` and reads its whole `200` response.
async fn get_on(tcp: &mut tokio::net::TcpStream) {
    tcp.write_all(b"GET / HTTP/1.1\r\nHost: cart\r\n\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !response_complete(&got) {
        let n = tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut buf))
            .await
            .expect("a response")
            .unwrap();
        assert_ne!(n, 0, "closed before the response");
        got.extend_from_slice(&buf[..n]);
    }
    assert!(
        got.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&got)
    );
}

/// A head and a `content-length` body are in.
fn response_complete(got: &[u8]) -> bool {
    let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") else {
        return false;
    };
    let head = String::from_utf8_lossy(&got[..end]).to_ascii_lowercase();
    let len = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse::<usize>().ok())
        .expect("a content-length");
    got.len() >= end + 4 + len
}

/// Framing the mesh cannot carry is refused with 400 whichever server
/// parsed the request (`Expect` goes to hyper's): a transfer coding other
/// than chunked (the body would cross de-chunked but still gzip, with
/// nothing left to say so), and an authority-form target with a method
/// other than CONNECT.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn framing_the_mesh_cannot_carry_is_refused_by_either_server() {
    let (mesh, srv) = mesh_with_cart().await;
    let refused: [(&[u8], &str); 4] = [
        (
            b"POST / HTTP/1.1\r\nHost: cart.shop\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            "transfer coding other than chunked",
        ),
        (
            b"POST / HTTP/1.1\r\nHost: cart.shop\r\nExpect: 100-continue\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            "transfer coding other than chunked",
        ),
        (
            b"GET cart.shop:80 HTTP/1.1\r\nHost: cart.shop\r\n\r\n",
            "authority-form",
        ),
        (
            b"POST cart.shop:80 HTTP/1.1\r\nHost: cart.shop\r\nExpect: 100-continue\r\ncontent-length: 0\r\n\r\n",
            "authority-form",
        ),
    ];
    for (req, why) in refused {
        let mut t = mesh.connect(web().ip, SocketAddr::new(vip(1), 80)).await;
        t.write_all(req).await.unwrap();
        let head = read_head(&mut t).await;
        assert!(
            head.starts_with("HTTP/1.1 400") && head.to_ascii_lowercase().contains(why),
            "{}: {head}",
            String::from_utf8_lossy(req)
        );
    }
    assert_eq!(srv[0].hits(), 0, "a refused request reached the workload");
    mesh.shutdown().await;
}

/// A chunked upload's trailer section crosses the tunnel without the
/// fields a trailer may not carry, whichever server parsed it: hyper's
/// passed `connection` on, HTTP/2 refused to send it, and the stream never
/// ended (the caller waited for the exchange idle timeout).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trailer_section_with_fields_it_may_not_carry_still_ends_the_upload() {
    let (mesh, srv) = mesh_with_cart().await;
    for expect in ["", "Expect: 100-continue\r\n"] {
        let mut t = mesh.connect(web().ip, SocketAddr::new(vip(1), 80)).await;
        let req = format!(
            "POST /up HTTP/1.1\r\nHost: cart.shop\r\n{expect}Transfer-Encoding: chunked\r\n\
             connection: close\r\n\r\n5\r\nhello\r\n0\r\nconnection: x\r\nx-sum: 5\r\n\r\n"
        );
        t.write_all(req.as_bytes()).await.unwrap();
        let mut got = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(10), t.read_to_end(&mut got)).await;
        let got = String::from_utf8_lossy(&got);
        assert!(read.is_ok(), "{expect:?}: no answer in 10 s: {got}");
        let answer = got
            .strip_prefix("HTTP/1.1 100 Continue\r\n\r\n")
            .unwrap_or(&got);
        assert!(answer.starts_with("HTTP/1.1 200"), "{expect:?}: {got}");
    }
    assert_eq!(srv[0].hits(), 2);
    mesh.shutdown().await;
}

/// Every captured HTTP/1.x request has one host that routing and the
/// workload both read (RFC 9112 section 3.2), whichever server parsed it
/// (HTTP/1.0 and `Expect` go to hyper's): two Host fields, none in HTTP/1.1,
/// or one that is no host are answered 400 and reach no workload; an
/// absolute-form target's authority replaces the Host field.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_has_one_host_or_is_refused() {
    let (mesh, srv) = mesh_with_cart().await;
    let refused: [(&[u8], &str); 6] = [
        (
            b"GET / HTTP/1.1\r\nHost: cart.shop\r\nHost: evil.example\r\n\r\n",
            "more than one host",
        ),
        (
            b"GET / HTTP/1.0\r\nHost: cart.shop\r\nHost: evil.example\r\n\r\n",
            "more than one host",
        ),
        (
            b"POST / HTTP/1.1\r\nHost: cart.shop\r\nHost: evil.example\r\nExpect: 100-continue\r\ncontent-length: 2\r\n\r\n",
            "more than one host",
        ),
        (b"GET / HTTP/1.1\r\nx-a: b\r\n\r\n", "no host header"),
        (b"GET / HTTP/1.1\r\nHost: cart shop\r\n\r\n", "is no host"),
        (
            b"GET http://user:pass@cart.shop/ HTTP/1.1\r\nHost: cart.shop\r\n\r\n",
            "user information",
        ),
    ];
    for (req, why) in refused {
        let mut t = mesh.connect(web().ip, SocketAddr::new(vip(1), 80)).await;
        t.write_all(req).await.unwrap();
        let head = read_head(&mut t).await;
        assert!(
            head.starts_with("HTTP/1.1 400") || head.starts_with("HTTP/1.0 400"),
            "{}: {head}",
            String::from_utf8_lossy(req)
        );
        assert!(
            head.to_ascii_lowercase().contains(why),
            "{}: {head}",
            String::from_utf8_lossy(req)
        );
    }
    assert_eq!(srv[0].hits(), 0, "a refused request reached the workload");
    // HTTP/1.0 may leave Host out.
    let mut t = mesh.connect(web().ip, SocketAddr::new(vip(1), 80)).await;
    t.write_all(b"GET /old HTTP/1.0\r\n\r\n").await.unwrap();
    let head = read_head(&mut t).await;
    assert!(head.contains(" 200 "), "{head}");
    // The target's authority is the host.
    let mut t = mesh.connect(web().ip, SocketAddr::new(vip(1), 80)).await;
    t.write_all(
        b"GET http://cart.shop/abs HTTP/1.1\r\nHost: evil.example\r\nconnection: close\r\n\r\n",
    )
    .await
    .unwrap();
    let mut got = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), t.read_to_end(&mut got)).await;
    let got = String::from_utf8_lossy(&got);
    assert!(got.starts_with("HTTP/1.1 200"), "{got}");
    assert!(
        got.contains("\"host\":\"cart.shop\"") && !got.contains("evil.example"),
        "{got}"
    );
    mesh.shutdown().await;
}
