//! Slow and malformed peers are cut off without affecting anyone else.

use std::{net::SocketAddr, time::Duration};

use l7_proxy::Snapshot;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::{support::*, traffic::servers};

async fn mesh_with_cart() -> (Mesh, Vec<EchoServer>) {
    let mesh = Mesh::standard().await;
    let (srv, port) = servers(&[cart(0)]).await;
    mesh.publish(&Snapshot {
        services: vec![mesh.service("cart", 1, port, &[cart(0)])],
        ..Default::default()
    })
    .await;
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
    // A new client is served too. (The first one's keep-alive connection
    // may have been idle as long as the head timeout by now, and closed.)
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mesh_peer_silent_after_the_handshake_is_cut_off() {
    let (mesh, _srv) = mesh_with_cart().await;
    // A real mesh certificate and a finished TLS handshake, then nothing:
    // not even the HTTP/2 preface.
    let config = mesh
        .a
        .identities
        .client_config(&web().identity(), &cart(0).identity())
        .unwrap();
    let tcp = tokio::net::TcpStream::connect(mesh.node_b_proxy())
        .await
        .unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(config)
        .connect(certs::server_name(&cart(0).identity()), tcp)
        .await
        .unwrap();
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
