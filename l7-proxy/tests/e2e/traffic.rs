//! Traffic of every kind flows through client proxy, tunnel and server proxy,
//! and the server side learns the caller's verified identity.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use l7_proxy::{
    Snapshot,
    config::{BackendRef, HttpRoute, HttpRouteRule, ObjectRef, ParentRef, Retry, Workload},
    conntable::ConnKind,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

use crate::support::*;

/// Starts echo servers on the given pods, all on one port; returns them and
/// the port.
pub async fn servers(pods: &[Pod]) -> (Vec<EchoServer>, u16) {
    let first = EchoServer::start(
        &format!("{}-0", pods[0].name),
        SocketAddr::new(pods[0].ip, 0),
    )
    .await;
    let port = first.addr.port();
    let mut all = vec![first];
    for (i, p) in pods.iter().enumerate().skip(1) {
        all.push(EchoServer::start(&format!("{}-{i}", p.name), SocketAddr::new(p.ip, port)).await);
    }
    (all, port)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_crosses_the_tunnel_and_the_server_sees_the_caller_identity() {
    let mesh = Mesh::standard().await;
    let srv = mesh.serve_cart().await;
    let mut c = mesh.http1(web().ip, SocketAddr::new(vip(1), 80)).await;
    let r = c
        .send(request("POST", "/items?id=7", &[("x-test", "1")], "hello"))
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{r:?}");
    let e = r.echo();
    assert_eq!(e["server"], "cart-0");
    assert_eq!(
        e["version"], "HTTP/1.1",
        "HTTP/1.1 restored on the far side"
    );
    assert_eq!(e["method"], "POST");
    assert_eq!(e["path"], "/items?id=7");
    assert_eq!(e["body"], "hello");
    // Framed by its length across both hops, not re-chunked.
    assert_eq!(e["headers"]["content-length"], "5");
    assert!(e["headers"].get("transfer-encoding").is_none(), "{e}");
    assert_eq!(e["headers"]["host"], "cart.shop");
    assert_eq!(e["headers"]["x-test"], "1");
    assert_eq!(
        e["headers"]["sluice-source-identity"],
        web().identity().to_string()
    );
    assert!(
        e["headers"].get("sluice-target").is_none(),
        "tunnel headers do not reach the workload"
    );
    assert_eq!(srv[0].hits(), 1);

    // The server-side proxy saw the caller's SPIFFE ID on a TLS 1.3 tunnel.
    let rows = mesh.b.proxy().connections();
    let tunnel = rows
        .iter()
        .find(|r| r.kind == ConnKind::TunnelIn)
        .expect("an inbound tunnel row");
    assert_eq!(
        tunnel.meta.source_identity.as_ref(),
        Some(&web().identity())
    );
    assert_eq!(
        tunnel.meta.destination_identity.as_ref(),
        Some(&cart(0).identity())
    );
    let tls = tunnel.meta.tls.as_ref().expect("secured");
    assert_eq!(tls.version, "TLSv1.3");
    assert!(tls.peer_cert_not_after.is_some());
    assert!(tunnel.bytes_received > 0);
    let web_id = web().identity().to_string();
    assert_eq!(
        mesh.b.metric(
            "sluice_requests_total",
            &["direction=\"Inbound\"", &web_id, "status_class=\"2xx\""]
        ),
        1.0
    );
    assert_eq!(
        mesh.a.metric(
            "sluice_requests_total",
            &["direction=\"Outbound\"", &web_id, "status_class=\"2xx\""]
        ),
        1.0
    );
    // The client side holds one pooled tunnel connection, reused.
    for _ in 0..5 {
        assert_eq!(c.get("/").await.status, 200);
    }
    assert_eq!(mesh.a.proxy().tunnel_connections(), 1);

    // What a workload answers cannot pose as the mesh's own headers.
    let r = c.get("/forge").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.server(), "cart-0");
    for h in ["sluice-reason", "sluice-source-identity"] {
        assert!(r.headers.get(h).is_none(), "{h} reached the caller");
    }
    mesh.shutdown().await;
}

/// Both ends of a tunnel connection count its bytes the same way: sent is
/// towards the destination (the workload's node), received from there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tunnels_rows_on_both_nodes_count_bytes_in_the_same_direction() {
    let mesh = Mesh::standard().await;
    let _srv = mesh.serve_cart().await;
    let mut c = mesh.http1(web().ip, SocketAddr::new(vip(1), 80)).await;
    // A small request, a 1 MiB answer.
    let r = c.get("/big/1").await;
    assert_eq!(r.status, 200);
    let row = |rows: Vec<l7_proxy::conntable::ConnectionInfo>, kind| {
        rows.into_iter()
            .find(|r| r.kind == kind)
            .expect("the tunnel's row")
    };
    let out = row(mesh.a.proxy().connections(), ConnKind::TunnelOut);
    let inb = row(mesh.b.proxy().connections(), ConnKind::TunnelIn);
    for r in [&out, &inb] {
        assert!(
            r.bytes_received > 1 << 20 && r.bytes_sent < 64 * 1024,
            "{r:?}"
        );
    }
    mesh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_and_grpc_cross_the_tunnel_with_trailers() {
    let mesh = Mesh::standard().await;
    let (_srv, mut c) = h2c_cart(&mesh).await;
    let r = c.get("/h2").await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.echo()["version"],
        "HTTP/2.0",
        "prior-knowledge HTTP/2 stays HTTP/2"
    );
    assert_eq!(
        r.echo()["headers"]["sluice-source-identity"],
        web().identity().to_string()
    );

    let mut msg = vec![0u8];
    msg.extend_from_slice(&4u32.to_be_bytes());
    msg.extend_from_slice(b"ping");
    let req = http::Request::builder()
        .method("POST")
        .uri("http://cart.shop/shop.Cart/Add")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(http_body_util::Full::new(bytes::Bytes::from(msg)))
        .unwrap();
    let r = c.send(req).await.unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.headers["content-type"], "application/grpc");
    assert_eq!(&r.body.as_bytes()[5..], b"cart-0:ping");
    let trailers = r.trailers.expect("gRPC trailers cross the tunnel");
    assert_eq!(trailers["grpc-status"], "0");
    assert_eq!(trailers["x-served-by"], "cart-0");

    // A call that fails with UNAVAILABLE in its trailers (HTTP 200): both
    // proxies count it by its grpc-status, once its trailers have passed.
    let req = grpc_call("/shop.Cart/Add", &[("x-grpc-status", "14")]);
    let r = c.send(req).await.unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.trailers.expect("trailers")["grpc-status"], "14");
    let web_id = web().identity().to_string();
    for (proxy, direction) in [(&mesh.a, "Outbound"), (&mesh.b, "Inbound")] {
        let count = |status: &str| {
            proxy.metric(
                "sluice_requests_total",
                &[
                    &format!("direction=\"{direction}\""),
                    &web_id,
                    "status_class=\"2xx\"",
                    &format!("grpc_status=\"{status}\""),
                ],
            )
        };
        // The calls are counted when their streams end, which may be a
        // moment after the caller has read them.
        eventually(&format!("{direction} counts by grpc-status"), || {
            (count("0"), count("14")) == (1.0, 1.0)
        })
        .await;
        // Each call once: no other grpc_status series.
        assert_eq!(
            proxy.metric(
                "sluice_requests_total",
                &[&format!("direction=\"{direction}\""), "grpc_status="]
            ),
            2.0,
            "{direction}: {}",
            proxy.metrics()
        );
        // The plain HTTP/2 request before has no grpc_status label.
        let plain = proxy
            .metrics()
            .lines()
            .filter(|l| {
                l.starts_with("sluice_requests_total{")
                    && l.contains(&format!("direction=\"{direction}\""))
                    && !l.contains("grpc_status")
            })
            .count();
        assert_eq!(plain, 1, "{direction}: {}", proxy.metrics());
    }
    mesh.shutdown().await;
}

/// A workload that resets its HTTP/2 answer part-way: the caller's stream is
/// reset with the workload's reason, across both proxies, rather than
/// looking as if the caller had cancelled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workload_stream_reset_reaches_the_caller_with_its_reason() {
    let mesh = Mesh::standard().await;
    let listener = std::sync::Arc::new(
        tokio::net::TcpListener::bind(SocketAddr::new(cart(0).ip, 0))
            .await
            .unwrap(),
    );
    let port = listener.local_addr().unwrap().port();
    let resetting = tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let svc = hyper::service::service_fn(|_req| async {
                // Some data, and once the head has surely arrived, the reset.
                let frames = futures_util::stream::unfold(0, |n| async move {
                    let frame = match n {
                        0 => Ok(http_body::Frame::data(bytes::Bytes::from_static(
                            b"partial",
                        ))),
                        1 => {
                            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                            Err(h2::Error::from(h2::Reason::ENHANCE_YOUR_CALM))
                        }
                        _ => return None,
                    };
                    Some((frame, n + 1))
                });
                let body = http_body_util::StreamBody::new(frames);
                Ok::<_, std::convert::Infallible>(http::Response::new(body))
            });
            tokio::spawn(
                hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                    .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc),
            );
        }
    });
    let mut svc = mesh.service("cart", 1, port, &[cart(0)]);
    svc.ports[0].app_protocol = Some("kubernetes.io/h2c".into());
    mesh.publish(&Snapshot {
        services: vec![svc],
        ..Default::default()
    })
    .await;
    let mut c = mesh.http2(web().ip, SocketAddr::new(vip(1), 80)).await;
    let err = c
        .send(request("GET", "/", &[], ""))
        .await
        .expect_err("a reset answer cannot arrive whole");
    let mut reason = None;
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(&err);
    while let Some(e) = cur {
        if let Some(h2) = e.downcast_ref::<h2::Error>() {
            reason = h2.reason();
        }
        cur = e.source();
    }
    assert_eq!(reason, Some(h2::Reason::ENHANCE_YOUR_CALM), "{err:?}");
    resetting.abort();
    mesh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opaque_tcp_and_server_speaks_first_cross_the_tunnel() {
    let mesh = Mesh::standard().await;
    let echo = tcp_server(SocketAddr::new(cart(0).ip, 0), None).await;
    let smtp = tcp_server(SocketAddr::new(cart(1).ip, 0), Some("220 cart ready\r\n")).await;
    let mut echo_svc = mesh.service("echo", 1, echo.port(), &[cart(0)]);
    echo_svc.ports[0].port = 7000;
    let mut smtp_svc = mesh.service("smtp", 2, smtp.port(), &[cart(1)]);
    smtp_svc.ports[0].port = 25;
    mesh.publish(&Snapshot {
        services: vec![echo_svc, smtp_svc],
        ..Default::default()
    })
    .await;

    let mut t = mesh.connect(web().ip, SocketAddr::new(vip(1), 7000)).await;
    t.write_all(b"\x00\x01binary, not HTTP").await.unwrap();
    assert_eq!(read_n(&mut t, 18).await, b"\x00\x01binary, not HTTP");

    // The client sends nothing: the proxy must not wait for it forever.
    let mut s = mesh.connect(web().ip, SocketAddr::new(vip(2), 25)).await;
    assert_eq!(read_n(&mut s, 16).await, b"220 cart ready\r\n");
    s.write_all(b"EHLO web\r\n").await.unwrap();
    assert_eq!(read_n(&mut s, 10).await, b"EHLO web\r\n");

    let rows = mesh.a.proxy().connections();
    let tcp_rows: Vec<_> = rows
        .iter()
        .filter(|r| r.kind == ConnKind::OutboundTcp)
        .collect();
    assert_eq!(tcp_rows.len(), 2, "{rows:?}");
    assert!(
        tcp_rows
            .iter()
            .all(|r| r.secured && r.meta.source_identity == Some(web().identity()))
    );
    let on_b = mesh.b.proxy().connections();
    assert_eq!(
        on_b.iter()
            .filter(|r| r.kind == ConnKind::InboundTcp)
            .count(),
        2
    );
    drop((t, s));
    mesh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pod_ip_destinations_use_the_tunnel_and_the_rest_goes_direct() {
    let mesh = Mesh::standard().await;
    let echo = tcp_server(SocketAddr::new(cart(0).ip, 0), None).await;
    // Not in the snapshot at all: an "outside" server.
    let outside = tcp_server(SocketAddr::new(pod_b(99), 0), Some("outside\n")).await;
    // A known pod outside the mesh, on two ports.
    let unmeshed = [
        tcp_server(SocketAddr::new(cart(1).ip, 0), Some("one\n")).await,
        tcp_server(SocketAddr::new(cart(1).ip, 0), Some("two\n")).await,
    ];
    mesh.publish(&Snapshot {
        workloads: vec![
            Workload {
                ip: cart(0).ip,
                id: ObjectRef::new("shop", "cart-0"),
                node_proxy: Some(mesh.node_b_proxy()),
                identity: Some(cart(0).identity()),
            },
            Workload {
                ip: cart(1).ip,
                id: ObjectRef::new("shop", "cart-1"),
                node_proxy: None,
                identity: None,
            },
        ],
        ..Default::default()
    })
    .await;
    let mut t = mesh.connect(web().ip, echo).await;
    t.write_all(b"to the pod").await.unwrap();
    assert_eq!(read_n(&mut t, 10).await, b"to the pod");
    let mut o = mesh.connect(web().ip, outside).await;
    assert_eq!(read_n(&mut o, 8).await, b"outside\n");
    let rows = mesh.a.proxy().connections();
    let secured: Vec<bool> = rows
        .iter()
        .filter(|r| r.kind == ConnKind::OutboundTcp)
        .map(|r| r.secured)
        .collect();
    assert_eq!(secured.len(), 2);
    assert!(
        secured.contains(&true) && secured.contains(&false),
        "{rows:?}"
    );
    // The outside address stays in the connection table, while its
    // metrics share the one `external` series.
    assert!(
        rows.iter()
            .any(|r| r.meta.destination_addr == Some(outside)),
        "{rows:?}"
    );
    let outside_s = outside.to_string();
    assert_eq!(
        mesh.a.metric(
            "sluice_tcp_connections_total",
            &["destination=\"external\"", "secured=\"false\""]
        ),
        1.0,
        "{}",
        mesh.a.metrics()
    );
    assert!(!mesh.a.metrics().contains(&outside_s));
    // The pod outside the mesh is one series by its name, whichever port.
    for addr in unmeshed {
        let mut u = mesh.connect(web().ip, addr).await;
        assert_eq!(read_n(&mut u, 4).await.len(), 4);
    }
    assert_eq!(
        mesh.a.metric(
            "sluice_tcp_connections_total",
            &["destination=\"shop/cart-1\"", "secured=\"false\""]
        ),
        2.0,
        "{}",
        mesh.a.metrics()
    );
    for addr in unmeshed {
        assert!(!mesh.a.metrics().contains(&addr.to_string()));
    }
    drop((t, o));
    mesh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_snapshot_keeps_open_connections_and_applies_to_new_ones() {
    let mesh = Mesh::standard().await;
    let echo = tcp_server(SocketAddr::new(cart(0).ip, 0), None).await;
    let mut svc = mesh.service("echo", 1, echo.port(), &[cart(0)]);
    svc.ports[0].app_protocol = Some("tcp".into());
    mesh.publish(&Snapshot {
        services: vec![svc.clone()],
        ..Default::default()
    })
    .await;
    let mut long = mesh.connect(web().ip, SocketAddr::new(vip(1), 80)).await;
    long.write_all(b"before").await.unwrap();
    assert_eq!(read_n(&mut long, 6).await, b"before");

    // The service loses its endpoint; the open connection must not notice.
    let mut gone = svc.clone();
    gone.endpoints.clear();
    mesh.publish(&Snapshot {
        services: vec![gone],
        ..Default::default()
    })
    .await;
    // Reset, perhaps before `connect` even returns.
    let fresh = mesh
        .try_connect(web().ip, SocketAddr::new(vip(1), 80))
        .await;
    let refused = match fresh {
        Ok(mut fresh) => closed_by_peer(&mut fresh).await,
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
    };
    assert!(
        refused,
        "a new connection sees the new snapshot: no endpoint"
    );
    long.write_all(b"after").await.unwrap();
    assert_eq!(read_n(&mut long, 5).await, b"after");

    // And a snapshot that adds it back serves new connections again.
    mesh.publish(&Snapshot {
        services: vec![svc],
        ..Default::default()
    })
    .await;
    let mut again = mesh.connect(web().ip, SocketAddr::new(vip(1), 80)).await;
    again.write_all(b"again").await.unwrap();
    assert_eq!(read_n(&mut again, 5).await, b"again");
    drop((long, again));
    mesh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_drains_requests_in_flight() {
    let mesh = Mesh::standard().await;
    let srv = mesh.serve_cart().await;
    let mut c = mesh.http1(web().ip, SocketAddr::new(vip(1), 80)).await;
    let slow = tokio::spawn(async move { c.get("/slow/300").await });
    // Wait for the request to reach the server before shutting down.
    eventually("the slow request reached the server", || srv[0].hits() == 1).await;
    let Mesh { a, b, .. } = mesh;
    let mut a = a;
    let outbound = a.proxy().outbound_addr();
    let shutdown = tokio::spawn(async move { a.proxy.take().unwrap().shutdown().await });
    let r = slow.await.unwrap();
    assert_eq!(
        r.status, 200,
        "the request in flight finished during the drain"
    );
    shutdown.await.unwrap();
    assert!(
        tokio::net::TcpStream::connect(outbound).await.is_err(),
        "no new connections after shutdown"
    );
    let mut b = b;
    b.proxy.take().unwrap().shutdown().await;
}

/// An opaque TCP relay still open when the drain timeout cuts it ends with
/// a reset, for the caller (node A shut down) and for the workload (node B
/// shut down): a FIN would pass the cut stream for a whole one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tcp_relay_cut_at_the_drain_timeout_ends_with_a_reset() {
    for node_b in [false, true] {
        let mut mesh = Mesh::with_settings(vec![web()], vec![cart(0)], &|s| {
            s.drain_timeout_ms = 300;
        })
        .await;
        let (addr, ends) = tcp_server_noting_ends(SocketAddr::new(cart(0).ip, 0)).await;
        mesh.publish_tcp_service("echo", 1, addr.port(), &[cart(0)])
            .await;
        let mut t = mesh.connect(web().ip, SocketAddr::new(vip(1), 80)).await;
        t.write_all(b"ping").await.unwrap();
        assert_eq!(read_n(&mut t, 4).await, b"ping");
        let node = if node_b { &mut mesh.b } else { &mut mesh.a };
        node.proxy.take().unwrap().shutdown().await;
        if node_b {
            eventually("the workload's side ends", || {
                !ends.lock().unwrap().is_empty()
            })
            .await;
            let end = ends.lock().unwrap()[0].clone();
            assert_eq!(end, "ConnectionReset", "the workload saw {end}");
        } else {
            let mut buf = [0u8; 8];
            let end = tokio::time::timeout(Duration::from_secs(10), t.read(&mut buf))
                .await
                .expect("the caller's side ends");
            assert!(
                matches!(&end, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
                "the caller saw {end:?}"
            );
        }
        drop(t);
        mesh.shutdown().await;
    }
}

/// A TCP relay the drain timeout cuts still has its access-log line, on
/// the node that shut down, with its bytes and the reason (the task was
/// aborted before it wrote one).
#[tokio::test]
async fn a_tcp_relay_cut_at_the_drain_timeout_is_logged() {
    for (node_b, direction) in [(false, "outbound"), (true, "inbound")] {
        let (log, _default) = capture_access_log();
        let mut mesh = Mesh::with_settings(vec![web()], vec![cart(0)], &|s| {
            s.drain_timeout_ms = 300;
        })
        .await;
        let (addr, _ends) = tcp_server_noting_ends(SocketAddr::new(cart(0).ip, 0)).await;
        mesh.publish_tcp_service("echo", 1, addr.port(), &[cart(0)])
            .await;
        let mut t = mesh.connect(web().ip, SocketAddr::new(vip(1), 80)).await;
        t.write_all(b"ping").await.unwrap();
        assert_eq!(read_n(&mut t, 4).await, b"ping");
        let node = if node_b { &mut mesh.b } else { &mut mesh.a };
        node.proxy.take().unwrap().shutdown().await;
        let (text, records) = access_records(&log);
        let r = records
            .iter()
            .find(|r| r["direction"] == direction && r["protocol"] == "tcp")
            .unwrap_or_else(|| panic!("no {direction} TCP line in {text}"));
        assert_eq!(
            r["reason"], "the proxy's shutdown cut it (drain timeout over)",
            "{r}"
        );
        assert_eq!(r["source_identity"], web().identity().to_string(), "{r}");
        assert_eq!(
            r["destination_identity"],
            cart(0).identity().to_string(),
            "{r}"
        );
        assert_eq!(
            (&r["bytes_sent"], &r["bytes_received"]),
            (&4.into(), &4.into()),
            "{r}"
        );
        drop(t);
        mesh.shutdown().await;
    }
}

/// An echo server that notes how each connection ended: `eof` or the
/// error's kind.
async fn tcp_server_noting_ends(
    addr: SocketAddr,
) -> (SocketAddr, Arc<std::sync::Mutex<Vec<String>>>) {
    let l = tokio::net::TcpListener::bind(addr).await.unwrap();
    let addr = l.local_addr().unwrap();
    let ends = Arc::new(std::sync::Mutex::new(Vec::new()));
    let noted = ends.clone();
    tokio::spawn(async move {
        while let Ok((mut c, _)) = l.accept().await {
            let noted = noted.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                let end = loop {
                    match c.read(&mut buf).await {
                        Ok(0) => break "eof".to_string(),
                        Ok(n) => {
                            if c.write_all(&buf[..n]).await.is_err() {
                                break "write failed".to_string();
                            }
                        }
                        Err(e) => break format!("{:?}", e.kind()),
                    }
                };
                noted.lock().unwrap().push(end);
            });
        }
    });
    (addr, ends)
}

/// A tunnel connection that carried HTTP requests closes once idle, on
/// both sides: nothing of its finished streams keeps it open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_tunnel_connection_that_carried_requests_closes_on_both_sides() {
    let mesh = Mesh::with_settings(vec![web()], vec![cart(0)], &|s| {
        s.tunnel_idle_timeout_ms = 1_000;
    })
    .await;
    let _srv = mesh.serve_cart().await;
    let mut c = mesh.http1(web().ip, SocketAddr::new(vip(1), 80)).await;
    for _ in 0..5 {
        assert_eq!(c.get("/").await.status, 200);
    }
    assert_eq!(mesh.a.proxy().tunnel_connections(), 1);
    let rows = |node: &Node, kind| {
        node.proxy()
            .connections()
            .iter()
            .filter(|r| r.kind == kind)
            .count()
    };
    assert_eq!(rows(&mesh.b, ConnKind::TunnelIn), 1);
    // The workload's own connection stays open; the tunnel goes: out of
    // node A's pool, then closed (its row goes with its task), and so on
    // node B, which has no idle timeout of its own for it.
    eventually("node A's idle tunnel left the pool", || {
        mesh.a.proxy().tunnel_connections() == 0
    })
    .await;
    eventually("node A's tunnel connection closed", || {
        rows(&mesh.a, ConnKind::TunnelOut) == 0
    })
    .await;
    eventually("node B's end of it closed", || {
        rows(&mesh.b, ConnKind::TunnelIn) == 0
    })
    .await;
    // And the next request opens another.
    assert_eq!(c.get("/").await.status, 200);
    assert_eq!(rows(&mesh.b, ConnKind::TunnelIn), 1);
    mesh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tunnels_are_bounded_and_closed_when_idle() {
    // Two streams per tunnel connection, at most two connections per key.
    let mesh = Mesh::with_settings(vec![web()], vec![cart(0)], &|s| {
        s.tunnel_max_streams = 2;
        s.tunnel_max_connections = 2;
        s.tunnel_idle_timeout_ms = 300;
    })
    .await;
    let echo = tcp_server(SocketAddr::new(cart(0).ip, 0), None).await;
    mesh.publish_tcp_service("echo", 1, echo.port(), &[cart(0)])
        .await;
    let mut open = Vec::new();
    for i in 0..4u8 {
        let mut t = mesh.connect(web().ip, SocketAddr::new(vip(1), 80)).await;
        t.write_all(&[i]).await.unwrap();
        assert_eq!(read_n(&mut t, 1).await, [i]);
        open.push(t);
    }
    assert_eq!(
        mesh.a.proxy().tunnel_connections(),
        2,
        "two streams each on two connections"
    );
    // Both connections are full and no third may open: the fifth stream waits
    // for room (the peer allows two streams per connection), and gets it when
    // others close (one on each connection, whichever the fifth queued on).
    let mut fifth = mesh.connect(web().ip, SocketAddr::new(vip(1), 80)).await;
    fifth.write_all(b"5").await.unwrap();
    drop(open.remove(2));
    drop(open.remove(0));
    assert_eq!(read_n(&mut fifth, 1).await, b"5");
    assert_eq!(
        mesh.a.proxy().tunnel_connections(),
        2,
        "never more than the cap per key"
    );
    let rows = mesh.a.proxy().connections();
    assert_eq!(
        rows.iter()
            .filter(|r| r.kind == ConnKind::TunnelOut)
            .count(),
        2
    );
    open.push(fifth);
    drop(open);
    // With no stream left, the idle timeout closes both connections.
    eventually("idle tunnels closed", || {
        mesh.a.proxy().tunnel_connections() == 0
    })
    .await;
    eventually("their rows are gone", || {
        !mesh
            .a
            .proxy()
            .connections()
            .iter()
            .any(|r| r.kind == ConnKind::TunnelOut)
    })
    .await;
    mesh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_go_on_while_the_peer_proxy_restarts_with_a_stream_open() {
    let mut mesh = Mesh::standard().await;
    let (srv, port) = servers(&[cart(0)]).await;
    let echo = tcp_server(SocketAddr::new(cart(0).ip, 0), None).await;
    let mut tcp = mesh.service("echo", 2, echo.port(), &[cart(0)]);
    tcp.ports[0].app_protocol = Some("tcp".into());
    mesh.publish(&Snapshot {
        services: vec![mesh.service("cart", 1, port, &[cart(0)]), tcp],
        // A retry on 503: a request the old proxy refuses while its GOAWAY
        // is on the way goes again.
        http_routes: vec![HttpRoute {
            id: ObjectRef::new("shop", "cart"),
            created_unix: 0,
            parents: vec![ParentRef {
                service: ObjectRef::new("shop", "cart"),
                port: None,
            }],
            rules: vec![HttpRouteRule {
                backends: vec![BackendRef {
                    service: ObjectRef::new("shop", "cart"),
                    port: 80,
                    weight: 1,
                    filters: vec![],
                    invalid: None,
                }],
                retry: Some(Retry {
                    codes: vec![503],
                    attempts: 5,
                    backoff_ms: 10,
                }),
                ..Default::default()
            }],
        }],
        ..Default::default()
    })
    .await;
    // A long-lived TCP stream and a request share one tunnel connection.
    let mut stream = mesh.connect(web().ip, SocketAddr::new(vip(2), 80)).await;
    stream.write_all(b"a").await.unwrap();
    assert_eq!(read_n(&mut stream, 1).await, b"a");
    let mut c = mesh.http1(web().ip, SocketAddr::new(vip(1), 80)).await;
    assert_eq!(c.get("/").await.status, 200);
    assert_eq!(mesh.a.proxy().tunnel_connections(), 1);
    // The peer restarts (an agent upgrade): the old proxy drains, keeping the
    // stream, and sends GOAWAY on that connection.
    let draining = mesh.restart_b().await;
    for _ in 0..5 {
        let r = c.get("/").await;
        assert_eq!(r.status, 200, "{r:?}");
    }
    // The stream still flows through the old proxy.
    stream.write_all(b"b").await.unwrap();
    assert_eq!(read_n(&mut stream, 1).await, b"b");
    drop(stream);
    draining.await.unwrap();
    assert_eq!(srv[0].hits(), 6);
    mesh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoints_outside_the_mesh_get_plain_http_directly() {
    let mesh = Mesh::standard().await;
    let (srv, port) = servers(&[cart(0)]).await;
    let mut svc = mesh.service("cart", 1, port, &[cart(0)]);
    // Not enrolled (or DISABLED): no node proxy, no identity.
    svc.endpoints[0].node_proxy = None;
    svc.endpoints[0].identity = None;
    mesh.publish(&Snapshot {
        services: vec![svc],
        ..Default::default()
    })
    .await;
    let mut c = mesh.http1(web().ip, SocketAddr::new(vip(1), 80)).await;
    let r = c.get("/plain").await;
    assert_eq!(r.status, 200);
    let e = r.echo();
    assert_eq!(e["server"], "cart-0");
    assert!(
        e["headers"].get("sluice-source-identity").is_none(),
        "no identity without the tunnel"
    );
    assert_eq!(srv[0].hits(), 1);
    // Nor can an endpoint outside the mesh answer as the mesh.
    let r = c.get("/forge").await;
    for h in ["sluice-reason", "sluice-source-identity"] {
        assert!(r.headers.get(h).is_none(), "{h} reached the caller");
    }
    assert_eq!(
        mesh.a.proxy().tunnel_connections(),
        0,
        "no tunnel was opened"
    );
    assert!(
        mesh.b.proxy().connections().is_empty(),
        "node B's proxy saw nothing"
    );
    mesh.shutdown().await;
}

/// The mark `ebpf-lb` recognises the proxy's sockets by.
const MARK: u32 = 0x5100;

/// Established sockets towards `dst`, as `ss` shows them (with `fwmark:`).
fn sockets_to(dst: SocketAddr) -> String {
    let out = std::process::Command::new("ss")
        .args(["-Htne", "dst", &dst.to_string()])
        .output()
        .expect("ss (iproute2) is installed by `cargo xtask setup`");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_socket_the_proxy_opens_carries_its_mark() {
    // Setting SO_MARK needs CAP_NET_ADMIN: say so plainly when not root.
    let uid = std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .and_then(|l| l.split_whitespace().nth(2).map(str::to_owned))
        .unwrap();
    assert_eq!(
        uid, "0",
        "this test sets SO_MARK and must run as root (cargo xtask test does)"
    );
    let mesh =
        Mesh::with_settings(vec![web()], vec![cart(0)], &|s| s.socket_mark = Some(MARK)).await;
    let echo = tcp_server(SocketAddr::new(cart(0).ip, 0), None).await;
    let outside = tcp_server(SocketAddr::new(pod_b(99), 0), None).await;
    mesh.publish_tcp_service("echo", 1, echo.port(), &[cart(0)])
        .await;
    let mut t = mesh.connect(web().ip, SocketAddr::new(vip(1), 80)).await;
    t.write_all(b"marked").await.unwrap();
    assert_eq!(read_n(&mut t, 6).await, b"marked");
    let mut o = mesh.connect(web().ip, outside).await;
    o.write_all(b"out").await.unwrap();
    assert_eq!(read_n(&mut o, 3).await, b"out");
    let mark = format!("fwmark:{MARK:#x}");
    for (what, dst) in [
        ("tunnel to node B", mesh.node_b_proxy()),
        ("node B to the workload", echo),
        ("node A to a destination outside the mesh", outside),
    ] {
        let ss = sockets_to(dst);
        assert!(!ss.is_empty(), "no socket for the {what}");
        assert!(
            ss.lines().all(|l| l.contains(&mark)),
            "{what} without {mark}: {ss}"
        );
    }
    drop((t, o));
    mesh.shutdown().await;
}

/// `sessionAffinity: ClientIP` on a meshed Service: a client's requests and
/// connections stay on the endpoint it got first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_ip_affinity_keeps_a_client_on_one_endpoint() {
    let mesh = Mesh::standard().await;
    let carts = [cart(0), cart(1), cart(2)];
    let (_srv, port) = servers(&carts).await;
    // TCP servers that name themselves first, on one port of each cart.
    let raw = tcp_server(SocketAddr::new(cart(0).ip, 0), Some("cart-0\n")).await;
    tcp_server(SocketAddr::new(cart(1).ip, raw.port()), Some("cart-1\n")).await;
    tcp_server(SocketAddr::new(cart(2).ip, raw.port()), Some("cart-2\n")).await;
    let http = mesh.service("cart", 1, port, &carts);
    let mut tcp = mesh.service("raw", 2, raw.port(), &carts);
    tcp.ports[0].app_protocol = Some("tcp".into());
    let publish = |affinity: Option<u32>| {
        let (mut http, mut tcp) = (http.clone(), tcp.clone());
        http.affinity_timeout_s = affinity;
        tcp.affinity_timeout_s = affinity;
        let mesh = &mesh;
        async move {
            mesh.publish(&Snapshot {
                services: vec![http, tcp],
                ..Default::default()
            })
            .await
        }
    };
    async fn requests(mesh: &Mesh) -> std::collections::BTreeSet<String> {
        let mut c = mesh.http1(web().ip, SocketAddr::new(vip(1), 80)).await;
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..30 {
            let r = c.get("/").await;
            seen.insert(r.echo()["server"].as_str().unwrap().to_string());
        }
        seen
    }
    async fn connections(mesh: &Mesh) -> std::collections::BTreeSet<String> {
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..12 {
            let mut t = mesh.connect(web().ip, SocketAddr::new(vip(2), 80)).await;
            seen.insert(String::from_utf8(read_n(&mut t, 7).await).unwrap());
        }
        seen
    }
    // Without affinity they spread (so the checks below can fail).
    publish(None).await;
    assert!(requests(&mesh).await.len() > 1);
    assert!(connections(&mesh).await.len() > 1);
    publish(Some(60)).await;
    let r = requests(&mesh).await;
    assert_eq!(r.len(), 1, "{r:?}");
    let t = connections(&mesh).await;
    assert_eq!(t.len(), 1, "{t:?}");
    mesh.shutdown().await;
}

/// How a workload's TCP connection ended: the bytes it read, and whether
/// by a clean end of stream (FIN) or an error (a reset).
/// A listener on cart-0 behind the Service `name`, published as port 7000
/// of `vip(1)`: a workload that speaks whatever the test has it speak.
async fn tcp_workload(mesh: &Mesh, name: &str) -> std::sync::Arc<tokio::net::TcpListener> {
    let listener = tokio::net::TcpListener::bind(SocketAddr::new(cart(0).ip, 0))
        .await
        .unwrap();
    let mut svc = mesh.service(name, 1, listener.local_addr().unwrap().port(), &[cart(0)]);
    svc.ports[0].port = 7000;
    mesh.publish(&Snapshot {
        services: vec![svc],
        ..Default::default()
    })
    .await;
    std::sync::Arc::new(listener)
}

async fn one_upload(
    listener: std::sync::Arc<tokio::net::TcpListener>,
) -> (Vec<u8>, std::io::Result<()>) {
    use tokio::io::AsyncReadExt;
    let (mut s, _) = listener.accept().await.unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        match s.read(&mut buf).await {
            Ok(0) => return (got, Ok(())),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) => return (got, Err(e)),
        }
    }
}

/// A caller whose TCP connection is reset mid-upload: the workload must see
/// a reset too, not an end of stream that would pass the cut upload for a
/// whole one; a caller that half-closes gives a clean end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_callers_reset_reaches_the_workload_as_a_reset_and_a_close_as_a_close() {
    let mesh = Mesh::standard().await;
    let listener = tcp_workload(&mesh, "upload").await;
    for reset in [true, false] {
        let workload = tokio::spawn(one_upload(listener.clone()));
        let mut t = mesh.connect(web().ip, SocketAddr::new(vip(1), 7000)).await;
        t.write_all(b"part one of the upload").await.unwrap();
        let got_first = |n: usize| {
            let rows = mesh.b.proxy().connections();
            rows.iter()
                .any(|r| r.kind == ConnKind::InboundTcp && r.bytes_sent as usize >= n)
        };
        eventually("the first part at node B", || got_first(22)).await;
        if reset {
            t.set_zero_linger().unwrap();
            drop(t);
        } else {
            t.shutdown().await.unwrap();
        }
        let (got, end) = tokio::time::timeout(std::time::Duration::from_secs(10), workload)
            .await
            .expect("the workload's connection ends")
            .unwrap();
        assert_eq!(got, b"part one of the upload");
        match (reset, end) {
            (true, Err(e)) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}"),
            (false, Ok(())) => {}
            (reset, end) => panic!("reset {reset}: the workload saw {end:?}"),
        }
    }
    mesh.shutdown().await;
}

/// The caller's proxy ending an idle connection ends it for the workload
/// with a plain close, not a reset (a dropped tunnel stream would be
/// cancelled, which the far side passes on as a reset).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_connection_ends_for_the_workload_with_a_plain_close() {
    // Only node A's idle timeout is short: it is the one that ends it.
    let mesh = Mesh::with_settings(
        vec![web(), bot()],
        vec![cart(0), cart(1), cart(2), mirror_pod()],
        &|s| {
            if s.inbound_addr.ip() == node_a_ip() {
                s.tcp_idle_timeout_ms = 300;
            }
        },
    )
    .await;
    let listener = tcp_workload(&mesh, "quiet").await;
    let workload = tokio::spawn(one_upload(listener.clone()));
    let mut t = mesh.connect(web().ip, SocketAddr::new(vip(1), 7000)).await;
    t.write_all(b"one word").await.unwrap();
    let (got, end) = tokio::time::timeout(std::time::Duration::from_secs(10), workload)
        .await
        .expect("the idle connection ends")
        .unwrap();
    assert_eq!(got, b"one word");
    assert!(end.is_ok(), "the workload saw {end:?}, not a plain close");
    // And the caller a plain close too.
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 8];
    let read = tokio::time::timeout(std::time::Duration::from_secs(10), t.read(&mut buf))
        .await
        .expect("the caller's side ends");
    assert!(matches!(read, Ok(0)), "the caller saw {read:?}");
    drop(t);
    mesh.shutdown().await;
}

/// `tunnel_idle_timeout_ms` and `tunnel_max_age_ms` at `0` turn those limits
/// off, as `0` does for the other timeouts (the server side said GOAWAY
/// to every new connection at once, and cross-node requests failed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zero_tunnel_idle_timeout_and_age_mean_no_limit() {
    let mesh = Mesh::with_settings(vec![web()], vec![cart(0)], &|s| {
        s.tunnel_idle_timeout_ms = 0;
        s.tunnel_max_age_ms = 0;
    })
    .await;
    let _srv = mesh.serve_cart().await;
    let mut c = mesh.http1(web().ip, SocketAddr::new(vip(1), 80)).await;
    for _ in 0..3 {
        assert_eq!(c.get("/").await.status, 200);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let tunnels = |n: &Node, kind| {
        n.proxy()
            .connections()
            .iter()
            .filter(|r| r.kind == kind)
            .count()
    };
    assert_eq!(
        tunnels(&mesh.a, ConnKind::TunnelOut),
        1,
        "one connection, kept"
    );
    assert_eq!(tunnels(&mesh.b, ConnKind::TunnelIn), 1);
    mesh.shutdown().await;
}

/// A captured connection from an address that is no enrolled workload of
/// the node (a pod the snapshot does not know yet) is reset: a clean end
/// would pass for a server that closed after an empty answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_captured_connection_from_an_unknown_source_is_reset() {
    use tokio::io::AsyncReadExt;
    let mesh = Mesh::standard().await;
    let _servers = mesh.serve_cart().await;
    let end = match mesh
        .try_connect(pod_a(77), SocketAddr::new(vip(1), 80))
        .await
    {
        Ok(mut t) => match t.write_all(b"GET / HTTP/1.1\r\nhost: cart\r\n\r\n").await {
            // The reset came first, and the write learnt it.
            Err(e) => Err(e),
            Ok(()) => {
                let mut buf = [0u8; 16];
                tokio::time::timeout(std::time::Duration::from_secs(10), t.read(&mut buf))
                    .await
                    .expect("the connection ends")
            }
        },
        Err(e) => Err(e),
    };
    match end {
        Err(e) => assert!(
            matches!(
                e.kind(),
                std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
            ),
            "{e}"
        ),
        Ok(n) => panic!("read {n} bytes, not a reset"),
    }
    mesh.shutdown().await;
}

/// A TCP connection to a Service with no ready endpoint is reset, as a
/// refused connection would be, not answered with a clean end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tcp_connection_to_a_service_without_endpoints_is_reset() {
    use tokio::io::AsyncReadExt;
    let mesh = Mesh::standard().await;
    let mut svc = mesh.service("empty", 1, 9000, &[]);
    svc.ports[0].port = 7000;
    mesh.publish(&Snapshot {
        services: vec![svc],
        ..Default::default()
    })
    .await;
    let end = match mesh
        .try_connect(web().ip, SocketAddr::new(vip(1), 7000))
        .await
    {
        Ok(mut t) => {
            let _ = t.write_all(b"not HTTP, so opaque TCP").await;
            let mut buf = [0u8; 16];
            tokio::time::timeout(std::time::Duration::from_secs(10), t.read(&mut buf))
                .await
                .expect("the connection ends")
        }
        // The reset came before `connect` returned.
        Err(e) => Err(e),
    };
    match end {
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}"),
        Ok(n) => panic!("read {n} bytes, not a reset"),
    }
    mesh.shutdown().await;
}

/// Outside the mesh too (a direct connection, no tunnel): a caller's reset
/// reaches the destination as a reset.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_callers_reset_reaches_a_destination_outside_the_mesh_as_a_reset() {
    let mesh = Mesh::standard().await;
    // Not in the snapshot: a destination outside the mesh.
    let listener = std::sync::Arc::new(
        tokio::net::TcpListener::bind(SocketAddr::new(pod_b(99), 0))
            .await
            .unwrap(),
    );
    let outside = listener.local_addr().unwrap();
    mesh.publish(&Snapshot::default()).await;
    let workload = tokio::spawn(one_upload(listener.clone()));
    let mut t = mesh.connect(web().ip, outside).await;
    t.write_all(b"part one of the upload").await.unwrap();
    let got_first = || {
        let rows = mesh.a.proxy().connections();
        rows.iter()
            .any(|r| r.kind == ConnKind::OutboundTcp && r.bytes_sent >= 22)
    };
    eventually("the first part relayed", got_first).await;
    t.set_zero_linger().unwrap();
    drop(t);
    let (got, end) = tokio::time::timeout(std::time::Duration::from_secs(10), workload)
        .await
        .expect("the destination's connection ends")
        .unwrap();
    assert_eq!(got, b"part one of the upload");
    match end {
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}"),
        Ok(()) => panic!("the destination saw a clean end"),
    }
    mesh.shutdown().await;
}

/// A workload that resets its connection after an answer: the caller gets
/// the whole answer, then a reset, not an end of stream that would pass a
/// cut exchange for a whole one; a workload that closes gives a clean end.
/// The caller reads late, through a small receive buffer: most of the answer
/// still waits in node A's send queue when the reset comes, and must not be
/// thrown away with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workloads_reset_reaches_the_caller_after_the_answer_and_a_close_as_a_close() {
    use std::time::Duration;
    use tokio::io::AsyncReadExt;
    const ANSWER: usize = 256 * 1024;
    let mesh = Mesh::standard().await;
    let listener = tcp_workload(&mesh, "answers").await;
    let answer: Vec<u8> = (0..ANSWER).map(|i| (i % 251) as u8).collect();
    for reset in [true, false] {
        let mut t = mesh
            .connect_with_recv_buffer(web().ip, SocketAddr::new(vip(1), 7000), Some(4096))
            .await;
        t.write_all(b"give me the answer\n").await.unwrap();
        let (mut s, _) = tokio::time::timeout(Duration::from_secs(10), listener.accept())
            .await
            .expect("the connection reaches the workload")
            .unwrap();
        let mut ask = [0u8; 19];
        s.read_exact(&mut ask).await.unwrap();
        s.write_all(&answer).await.unwrap();
        // Out of the workload's own send queue before it ends (node B read
        // it all), so that only the proxies hold what the caller has not
        // read: the reset comes right behind it.
        let b_read_all = || {
            let rows = mesh.b.proxy().connections();
            rows.iter()
                .any(|r| r.kind == ConnKind::InboundTcp && r.bytes_received as usize >= ANSWER)
        };
        eventually("node B has the whole answer", b_read_all).await;
        if reset {
            s.set_zero_linger().unwrap();
        } else {
            s.shutdown().await.unwrap();
        }
        drop(s);
        // The end reaches node A before the caller starts reading.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut got = Vec::new();
        let mut buf = vec![0u8; 16 * 1024];
        let end = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                match t.read(&mut buf).await {
                    Ok(0) => return Ok(()),
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                    Err(e) => return Err(e),
                }
            }
        })
        .await
        .expect("the caller's connection ends");
        assert_eq!(got.len(), ANSWER, "reset {reset}: bytes of the answer");
        assert!(got == answer, "reset {reset}: the answer arrived altered");
        match (reset, end) {
            (true, Err(e)) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}"),
            (false, Ok(())) => {}
            (reset, end) => panic!("reset {reset}: the caller saw {end:?}"),
        }
    }
    mesh.shutdown().await;
}

/// A connection whose first request has a method outside the usual ones
/// (WebDAV's PROPFIND), on a request line of a few hundred bytes, is HTTP,
/// not opaque TCP: it crosses the tunnel as requests, each routed and
/// counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_request_with_an_extension_method_is_http() {
    let mesh = Mesh::standard().await;
    let _srv = mesh.serve_cart().await;
    let mut c = mesh.http1(web().ip, SocketAddr::new(vip(1), 80)).await;
    let path = format!("/remote.php/dav/files/{}/", "d".repeat(200));
    for method in ["PROPFIND", "GET"] {
        let r = c.send(request(method, &path, &[], "")).await.unwrap();
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(r.echo()["method"], method);
    }
    let rows = mesh.a.proxy().connections();
    assert!(
        rows.iter().all(|r| r.kind != ConnKind::OutboundTcp),
        "taken for opaque TCP: {rows:?}"
    );
    assert_eq!(
        mesh.a
            .metric("sluice_requests_total", &["direction=\"Outbound\""]),
        2.0
    );
    mesh.shutdown().await;
}

/// Trailers cross the tunnel, but never a `sluice-` field among them: an
/// HTTP/2 workload gets its trailers as they come, and must not read a
/// caller's forged identity there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trailers_reach_an_http2_workload_without_the_mesh_fields() {
    let mesh = Mesh::standard().await;
    let srv = mesh.serve_cart().await;
    let mut send = mesh.http2_raw(web().ip, SocketAddr::new(vip(1), 80)).await;
    let mut trailers = http::HeaderMap::new();
    trailers.insert("x-checksum", "c0ffee".parse().unwrap());
    trailers.insert(
        "sluice-source-identity",
        "spiffe://cluster.local/ns/x/sa/admin".parse().unwrap(),
    );
    let frames = vec![
        Ok::<_, std::convert::Infallible>(hyper::body::Frame::data(bytes::Bytes::from_static(
            b"payload",
        ))),
        Ok(hyper::body::Frame::trailers(trailers)),
    ];
    let req = http::Request::post("http://cart/upload")
        .body(http_body_util::StreamBody::new(futures_util::stream::iter(
            frames,
        )))
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let seen = srv[0].seen.lock().unwrap()[0].clone();
    assert_eq!(seen["version"], "HTTP/2.0", "{seen}");
    assert_eq!(seen["trailers"]["x-checksum"], "c0ffee", "{seen}");
    assert!(
        seen["trailers"].get("sluice-source-identity").is_none(),
        "{seen}"
    );
    mesh.shutdown().await;
}

/// Serves `name`'s first `STALLED` connections with `stalled`, later ones
/// with an echo.
async fn stall_then_echo<F, Fut>(mesh: &Mesh, name: &str, stalled: F)
where
    F: Fn(TcpStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = tcp_workload(mesh, name).await;
    tokio::spawn(async move {
        for n in 0.. {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            if n < STALLED {
                tokio::spawn(stalled(s));
            } else {
                tokio::spawn(async move { echo_bytes(&mut s).await });
            }
        }
    });
}

/// A new stream between the same caller and node still carries bytes both
/// ways.
async fn still_moving(mesh: &Mesh) {
    let mut t = mesh.connect(web().ip, SocketAddr::new(vip(1), 7000)).await;
    t.write_all(b"still moving").await.unwrap();
    let mut buf = [0u8; 12];
    tokio::time::timeout(std::time::Duration::from_secs(10), t.read_exact(&mut buf))
        .await
        .expect("an answer within 10 s, beside the stalled streams")
        .unwrap();
    assert_eq!(&buf, b"still moving");
}

/// Downloads whose callers stopped reading hold their own tunnel streams'
/// windows, not the tunnel connection's, however many: another stream
/// between the same workload and node still carries data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_downloads_do_not_stall_the_tunnel() {
    let mesh = Mesh::standard().await;
    stall_then_echo(&mesh, "firehose", |mut s| async move {
        let chunk = vec![3u8; 64 << 10];
        while s.write_all(&chunk).await.is_ok() {}
    })
    .await;
    let mut stalled = Vec::new();
    for _ in 0..STALLED {
        // Callers that take a few KB and then read nothing.
        stalled.push(
            mesh.connect_with_recv_buffer(web().ip, SocketAddr::new(vip(1), 7000), Some(4096))
                .await,
        );
    }
    until_stalled(&mesh, ConnKind::OutboundTcp, STALLED as u64 * 4096, |r| {
        r.bytes_received
    })
    .await;
    still_moving(&mesh).await;
    drop(stalled);
    mesh.shutdown().await;
}

/// Uploads whose destination reads nothing hold their own tunnel streams'
/// windows on the destination's node, not the connection's: another stream
/// of the same caller to that node still carries data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_uploads_do_not_stall_the_tunnel() {
    let mesh = Mesh::standard().await;
    // Connections held open and never read, until `release` goes.
    let (release, held) = tokio::sync::watch::channel(());
    stall_then_echo(&mesh, "sink", move |s| {
        let mut held = held.clone();
        async move {
            let _ = held.changed().await;
            drop(s);
        }
    })
    .await;
    let mut writers = Vec::new();
    for _ in 0..STALLED {
        let mut c = mesh.connect(web().ip, SocketAddr::new(vip(1), 7000)).await;
        writers.push(tokio::spawn(async move {
            let chunk = vec![5u8; 64 << 10];
            while c.write_all(&chunk).await.is_ok() {}
        }));
    }
    until_stalled(
        &mesh,
        ConnKind::OutboundTcp,
        STALLED as u64 * (64 << 10),
        |r| r.bytes_sent,
    )
    .await;
    still_moving(&mesh).await;
    for w in writers {
        w.abort();
    }
    drop(release);
    mesh.shutdown().await;
}

/// HTTP/2 downloads whose callers stopped reading hold their own streams'
/// windows on the workload's connection (one per workload, shared by every
/// caller), not the connection's, however many: another caller is still
/// answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_http2_downloads_do_not_stall_the_workloads_connection() {
    use http_body_util::{BodyExt, Empty};
    let mesh = Mesh::standard().await;
    let _srv = mesh.serve_cart().await;
    let to = SocketAddr::new(vip(1), 80);
    let mut stalled = Vec::new();
    for _ in 0..STALLED {
        let mut h2 = mesh.http2_raw::<Empty<bytes::Bytes>>(web().ip, to).await;
        let req = http::Request::get("http://cart.shop/big/32")
            .body(Empty::new())
            .unwrap();
        let resp = tokio::time::timeout(std::time::Duration::from_secs(10), h2.send_request(req))
            .await
            .expect("a download's head within 10 s")
            .unwrap();
        assert_eq!(resp.status(), 200);
        // Its body is not read.
        stalled.push((h2, resp));
    }
    until_stalled(&mesh, ConnKind::OutboundHttp, STALLED as u64, |r| {
        r.bytes_received
    })
    .await;
    let mut h2 = mesh.http2_raw::<Empty<bytes::Bytes>>(bot().ip, to).await;
    let req = http::Request::get("http://cart.shop/small")
        .body(Empty::new())
        .unwrap();
    let body = tokio::time::timeout(std::time::Duration::from_secs(10), async {
        let resp = h2.send_request(req).await.unwrap();
        resp.into_body().collect().await.unwrap().to_bytes()
    })
    .await
    .expect("another caller's answer within 10 s, beside the stalled downloads");
    assert!(
        String::from_utf8_lossy(&body).contains("\"path\":\"/small\""),
        "{body:?}"
    );
    drop(stalled);
    mesh.shutdown().await;
}

/// A captured HTTP/1.1 connection's row counts the bytes its caller sent
/// and was sent, heads and bodies, request after request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_captured_http_connections_row_counts_its_bytes_both_ways() {
    let mesh = Mesh::standard().await;
    let _srv = mesh.serve_cart().await;
    let mut t = mesh.connect(web().ip, SocketAddr::new(vip(1), 80)).await;
    let req: &[u8] = b"POST /items HTTP/1.1\r\nhost: cart\r\ncontent-length: 5\r\n\r\nhello";
    let (mut sent, mut received) = (0, 0);
    for round in 1..=2 {
        t.write_all(req).await.unwrap();
        let answer = read_response(&mut t).await;
        assert!(answer.starts_with(b"HTTP/1.1 200"), "round {round}");
        sent += req.len() as u64;
        received += answer.len() as u64;
        let row = || {
            let rows = mesh.a.proxy().connections();
            rows.into_iter()
                .find(|r| r.kind == ConnKind::OutboundHttp)
                .map(|r| (r.bytes_sent, r.bytes_received))
        };
        eventually("the row's counts", || row() == Some((sent, received))).await;
    }
    mesh.shutdown().await;
}

/// One HTTP/1.1 response with a `content-length`, as its bytes.
async fn read_response(t: &mut tokio::net::TcpStream) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&got[..end]).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .expect("a content-length")
                .trim()
                .parse()
                .unwrap();
            if got.len() >= end + 4 + len {
                assert_eq!(got.len(), end + 4 + len, "one response, nothing more");
                return got;
            }
        }
        let n = t.read(&mut buf).await.unwrap();
        assert!(n > 0, "the connection closed mid-response");
        got.extend_from_slice(&buf[..n]);
    }
}

/// A tunnelled TCP stream whose connect to the workload fails has its
/// access-log line on the workload's node too, with both identities and
/// the reason (only the caller's node logged it).
#[tokio::test]
async fn a_tcp_stream_the_workload_refuses_is_logged_on_its_node() {
    let (log, _default) = capture_access_log();
    let mesh = Mesh::standard().await;
    // Nothing listens at cart-0's port.
    let port = tokio::net::TcpListener::bind(SocketAddr::new(cart(0).ip, 0))
        .await
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut svc = mesh.service("shut", 1, port, &[cart(0)]);
    svc.ports[0].port = 7000;
    svc.ports[0].app_protocol = Some("tcp".into());
    mesh.publish(&Snapshot {
        services: vec![svc],
        ..Default::default()
    })
    .await;
    if let Ok(mut t) = mesh
        .try_connect(web().ip, SocketAddr::new(vip(1), 7000))
        .await
    {
        assert!(closed_by_peer(&mut t).await, "the caller is let go");
    }
    eventually("node B's line", || {
        access_records(&log)
            .1
            .iter()
            .any(|r| r["direction"] == "inbound")
    })
    .await;
    let (text, records) = access_records(&log);
    let r = record(&records, &text, "inbound", None);
    assert_eq!(r["protocol"], "tcp", "{r}");
    assert_eq!(r["source_identity"], web().identity().to_string(), "{r}");
    assert_eq!(
        r["destination_identity"],
        cart(0).identity().to_string(),
        "{r}"
    );
    assert!(
        r["reason"].as_str().unwrap().starts_with("connecting to"),
        "{r}"
    );
    mesh.shutdown().await;
}

/// `sluice_tcp_connections_total` counts connections that opened: one
/// whose direct connect was refused, or whose destination's node proxy is
/// out of reach, is not counted (its access record gives the reason).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tcp_connection_that_never_opened_is_not_counted() {
    let mesh = Mesh::standard().await;
    let closed = |ip| async move {
        let l = tokio::net::TcpListener::bind(SocketAddr::new(ip, 0))
            .await
            .unwrap();
        l.local_addr().unwrap()
    };
    // The tunnel's way: cart-0's node proxy is not listening.
    let mut svc = mesh.service("gone", 1, 7000, &[cart(0)]);
    svc.ports[0].app_protocol = Some("tcp".into());
    svc.endpoints[0].node_proxy = Some(closed(node_b_ip()).await);
    mesh.publish(&Snapshot {
        services: vec![svc],
        ..Default::default()
    })
    .await;
    // The proxy's reset can come before `connect` returns.
    let let_go = |t: std::io::Result<tokio::net::TcpStream>| async move {
        match t {
            Ok(mut t) => closed_by_peer(&mut t).await,
            Err(_) => true,
        }
    };
    let t = mesh
        .try_connect(web().ip, SocketAddr::new(vip(1), 80))
        .await;
    assert!(let_go(t).await, "the caller is let go");
    // The direct way: nothing listens at an address outside the mesh.
    let o = mesh.try_connect(web().ip, closed(pod_b(97)).await).await;
    assert!(let_go(o).await, "the caller is let go");
    let opened = |mesh: &Mesh| mesh.a.metric("sluice_tcp_connections_total", &[]);
    assert_eq!(opened(&mesh), 0.0, "{}", mesh.a.metrics());
    // One that opens is counted.
    let outside = tcp_server(SocketAddr::new(pod_b(97), 0), Some("outside\n")).await;
    let mut o = mesh.connect(web().ip, outside).await;
    assert_eq!(read_n(&mut o, 8).await, b"outside\n");
    assert_eq!(opened(&mesh), 1.0, "{}", mesh.a.metrics());
    drop(o);
    mesh.shutdown().await;
}

/// The answer on `t` to a request for cart: a 200 whose echo names the
/// source identity the workload was told.
async fn source_identity_echoed(t: &mut tokio::net::TcpStream) -> String {
    let answer = read_response(t).await;
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    let body = &text[text.find("\r\n\r\n").unwrap() + 4..];
    let echo: serde_json::Value = serde_json::from_str(body).unwrap();
    echo["headers"]["sluice-source-identity"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// A pod's first connection can reach the proxy before the configuration
/// that enrols it (the kernel enrols its cgroup as the agent publishes it;
/// an agent restarting starts its proxy before its first sync): it waits
/// for that configuration and is served, not reset.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_comes_before_its_pods_configuration_waits_for_it() {
    let mesh = Mesh::standard().await;
    let _srv = mesh.serve_cart().await;
    let late = l7_proxy::config::LocalWorkload {
        ip: pod_a(12),
        id: l7_proxy::config::ObjectRef::new("shop", "web-2"),
        ..web().local()
    };
    let mut t = mesh.connect(late.ip, SocketAddr::new(vip(1), 80)).await;
    t.write_all(b"GET / HTTP/1.1\r\nhost: cart\r\n\r\n")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    mesh.a.add_local(late).await;
    assert_eq!(
        source_identity_echoed(&mut t).await,
        web().identity().to_string()
    );
    drop(t);
    mesh.shutdown().await;
}

/// A pod whose certificate is on its way (wanted, not issued yet: a new
/// pod's first connections) has its request wait for it, up to the connect
/// timeout, instead of a 503 at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_waits_for_its_sources_certificate_on_its_way() {
    let mesh = Mesh::standard().await;
    let _srv = mesh.serve_cart().await;
    let late = l7_proxy::config::LocalWorkload {
        ip: pod_a(13),
        id: l7_proxy::config::ObjectRef::new("shop", "late-1"),
        service_account: "late".into(),
        identity: id("shop", "late"),
        ..web().local()
    };
    // Wanted; issued only when the test says.
    mesh.a
        .identities
        .want([web().identity(), bot().identity(), late.identity.clone()])
        .unwrap();
    assert!(!mesh.a.identities.has_certificate(&late.identity));
    mesh.a.add_local(late.clone()).await;
    let mut t = mesh.connect(late.ip, SocketAddr::new(vip(1), 80)).await;
    t.write_all(b"GET / HTTP/1.1\r\nhost: cart\r\n\r\n")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let report = mesh.a.identities.rotate_due().await;
    assert!(report.failed.is_empty(), "{:?}", report.failed);
    assert_eq!(
        source_identity_echoed(&mut t).await,
        late.identity.to_string()
    );
    drop(t);
    mesh.shutdown().await;
}

/// A pod that reaches its own address (the kernel sends an enrolled pod's
/// connections to meshed pods' addresses to the proxy, its own included)
/// is connected straight to itself, not through the tunnel as a caller of
/// itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_reaching_its_own_address_is_connected_straight_to_itself() {
    let mesh = Mesh::standard().await;
    // cart-0's address as a caller on node A too: the configuration knows it
    // as a meshed pod, reached through the tunnel by anyone else.
    mesh.publish(&Snapshot {
        workloads: vec![mesh.tunnelled(&cart(0))],
        ..Default::default()
    })
    .await;
    mesh.a.add_local(cart(0).local()).await;
    let own = tcp_server(SocketAddr::new(cart(0).ip, 0), None).await;
    let mut t = mesh.connect(cart(0).ip, own).await;
    t.write_all(b"ping").await.unwrap();
    assert_eq!(read_n(&mut t, 4).await, b"ping");
    let tcp = |secured: &str| {
        mesh.a.metric(
            "sluice_tcp_connections_total",
            &["direction=\"Outbound\"", &format!("secured=\"{secured}\"")],
        )
    };
    assert_eq!(tcp("true"), 0.0, "{}", mesh.a.metrics());
    assert_eq!(tcp("false"), 1.0, "{}", mesh.a.metrics());
    drop(t);
    mesh.shutdown().await;
}

/// A pod that leaves the mesh while its HTTP/1.1 connection stays
/// captured: its next answer closes the connection (its identity goes, and
/// with it any new tunnel), so it reconnects straight, as the kernel now
/// sends it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_that_left_the_mesh_has_its_captured_connection_closed_after_an_answer() {
    let mesh = Mesh::standard().await;
    let _srv = mesh.serve_cart().await;
    let mut c = mesh.http1(web().ip, SocketAddr::new(vip(1), 80)).await;
    let r = c.get("/").await;
    assert_eq!(r.status, 200);
    assert!(r.headers.get("connection").is_none(), "{:?}", r.headers);
    mesh.a.remove_local(web().ip).await;
    let r = c.get("/").await;
    assert_eq!(r.status, 200, "answered while the tunnel is there");
    assert_eq!(r.headers["connection"], "close", "{:?}", r.headers);
    // And it is closed.
    assert!(c.send(request("GET", "/", &[], "")).await.is_err());
    mesh.shutdown().await;
}

/// A dual-stack node: the second capture listener (the other address
/// family) serves the pods' connections of that family as the first does,
/// through the tunnel with the caller's identity.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_capture_listener_serves_the_other_address_family() {
    let mesh = Mesh::with_settings(vec![web()], vec![cart(0)], &|s| {
        s.second_outbound_addr = Some("[::1]:0".parse().unwrap());
    })
    .await;
    let _srv = mesh.serve_cart().await;
    let second = mesh.a.proxy().second_outbound_addr().expect("bound");
    assert!(second.is_ipv6(), "{second}");
    // Port 0 asked: the first listener's port, as the kernel needs.
    assert_eq!(second.port(), mesh.a.proxy().outbound_addr().port());
    // web's IPv6 address.
    let web6: std::net::IpAddr = "::1".parse().unwrap();
    mesh.a
        .add_local(l7_proxy::config::LocalWorkload {
            ip: web6,
            ..web().local()
        })
        .await;
    let sock = tokio::net::TcpSocket::new_v6().unwrap();
    sock.bind(SocketAddr::new(web6, 0)).unwrap();
    mesh.odst
        .insert(sock.local_addr().unwrap(), SocketAddr::new(vip(1), 80));
    let mut t = sock
        .connect(second)
        .await
        .expect("the second listener accepts");
    t.write_all(b"GET / HTTP/1.1\r\nhost: cart\r\n\r\n")
        .await
        .unwrap();
    let answer = read_response(&mut t).await;
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    let body = &text[text.find("\r\n\r\n").unwrap() + 4..];
    let echo: serde_json::Value = serde_json::from_str(body).unwrap();
    assert_eq!(echo["server"], "cart-0");
    assert_eq!(
        echo["headers"]["sluice-source-identity"],
        web().identity().to_string()
    );
    drop(t);
    mesh.shutdown().await;
}

/// A caller that gives up before the answer (closes its connection while
/// the workload takes its time): the request does not vanish; both proxies
/// count it as `cancelled` under its route and destination, and log it with
/// the reason.
#[tokio::test]
async fn a_request_whose_caller_leaves_before_the_answer_is_counted_and_logged() {
    let (log, _default) = capture_access_log();
    let mesh = Mesh::standard().await;
    let (_srv, tcp) = slow_request(&mesh).await;
    drop(tcp);
    let web_id = web().identity().to_string();
    cancelled_on_both(&mesh, &[]).await;
    // The caller's node names the service chosen.
    assert_eq!(
        mesh.a.metric(
            "sluice_requests_total",
            &["destination=\"shop/cart\"", "status_class=\"cancelled\""]
        ),
        1.0,
        "{}",
        mesh.a.metrics()
    );
    // Nothing else was counted for it, and no latency (it had no answer).
    for proxy in [&mesh.a, &mesh.b] {
        assert_eq!(
            proxy.metric("sluice_requests_total", &[]),
            1.0,
            "{}",
            proxy.metrics()
        );
        assert_eq!(
            proxy.metric("sluice_request_duration_seconds_count", &[]),
            0.0,
            "{}",
            proxy.metrics()
        );
    }
    let (text, records) = access_records(&log);
    for direction in ["outbound", "inbound"] {
        let r = record(&records, &text, direction, None);
        assert_eq!(r["reason"], "the caller went away before the answer", "{r}");
        assert_eq!(r["path"], "/slow/5000", "{r}");
        assert_eq!(r["source_identity"], web_id, "{r}");
        assert!(r.get("status").is_none_or(|s| s.is_null()), "{r}");
    }
    mesh.shutdown().await;
}

/// A mesh whose proxies drain for 300 ms, and a request from web that
/// cart 0 holds for 5 s (in flight once this returns).
async fn slow_request_with_short_drain() -> (Mesh, Vec<EchoServer>, tokio::net::TcpStream) {
    let mesh = Mesh::with_settings(vec![web()], vec![cart(0)], &|s| {
        s.drain_timeout_ms = 300;
    })
    .await;
    let (srv, tcp) = slow_request(&mesh).await;
    (mesh, srv, tcp)
}

/// Cart served, and a request from web that cart 0 holds for 5 s (in
/// flight once this returns).
async fn slow_request(mesh: &Mesh) -> (Vec<EchoServer>, tokio::net::TcpStream) {
    let srv = mesh.serve_cart().await;
    let mut tcp = mesh.connect(web().ip, SocketAddr::new(vip(1), 80)).await;
    tcp.write_all(b"GET /slow/5000 HTTP/1.1\r\nhost: cart\r\n\r\n")
        .await
        .unwrap();
    eventually("the request reached the workload", || srv[0].hits() == 1).await;
    (srv, tcp)
}

/// A request still waiting for its answer when the caller's proxy shuts
/// down outlives the drain time and is cut: counted `cancelled`, and its
/// access-log line says the proxy's shutdown cut it, not that its caller
/// left. The workload's node, whose caller (the other proxy) did go away,
/// says so.
#[tokio::test]
async fn a_request_cut_by_the_proxys_shutdown_is_logged_as_such() {
    let (log, _default) = capture_access_log();
    let (mut mesh, _srv, tcp) = slow_request_with_short_drain().await;
    mesh.a.proxy.take().unwrap().shutdown().await;
    cancelled_on_both(&mesh, &[]).await;
    let (text, records) = access_records(&log);
    let reason = |direction: &str| record(&records, &text, direction, None)["reason"].clone();
    assert_eq!(
        reason("outbound"),
        "the proxy's shutdown cut it before the answer (drain timeout over)",
        "{text}"
    );
    assert_eq!(
        reason("inbound"),
        "the caller went away before the answer",
        "{text}"
    );
    drop(tcp);
    mesh.shutdown().await;
}

/// The same on the workload's node: its shutdown cuts the request after
/// the drain time, and its line says so; the caller gets an error answer
/// from its own proxy, which counts that.
#[tokio::test]
async fn a_request_cut_by_the_workload_nodes_shutdown_is_logged_as_such() {
    let (log, _default) = capture_access_log();
    let (mut mesh, _srv, mut tcp) = slow_request_with_short_drain().await;
    mesh.b.proxy.take().unwrap().shutdown().await;
    let answer = read_head(&mut tcp).await;
    assert!(answer.starts_with("HTTP/1.1 50"), "{answer}");
    // The stream's task may hear of the cut after the shutdown returned.
    eventually("node B logged the request", || {
        access_records(&log)
            .1
            .iter()
            .any(|r| r["direction"] == "inbound")
    })
    .await;
    let (text, records) = access_records(&log);
    let inbound = record(&records, &text, "inbound", None);
    assert_eq!(
        inbound["reason"], "the proxy's shutdown cut it before the answer (drain timeout over)",
        "{text}"
    );
    assert_eq!(
        mesh.b.metric(
            "sluice_requests_total",
            &["direction=\"Inbound\"", "status_class=\"cancelled\""]
        ),
        1.0,
        "{}",
        mesh.b.metrics()
    );
    mesh.shutdown().await;
}

/// A Content-Length that HTTP/1.1 allows but HTTP/2 does not (a list of one
/// value, leading zeros, two equal lines; RFC 9112 section 6.3) reaches the
/// workload through the tunnel as the one number it means, with the body;
/// two different values, or two Host lines, are refused with a 400 before
/// anything is sent.
#[tokio::test]
async fn content_lengths_http1_allows_cross_the_tunnel_and_ambiguous_heads_are_refused() {
    let mesh = Mesh::standard().await;
    let srv = mesh.serve_cart().await;
    for (i, length) in [
        "content-length: 5, 5\r\n",
        "content-length: 0005\r\n",
        "content-length: 5\r\ncontent-length: 5\r\n",
    ]
    .into_iter()
    .enumerate()
    {
        let mut tcp = mesh.connect(web().ip, SocketAddr::new(vip(1), 80)).await;
        let req = format!("POST /up HTTP/1.1\r\nhost: cart\r\n{length}\r\nhello");
        tcp.write_all(req.as_bytes()).await.unwrap();
        let head = read_head(&mut tcp).await;
        assert!(head.starts_with("HTTP/1.1 200 "), "{length:?}: {head}");
        eventually("the workload recorded the request", || {
            srv[0].recorded() == i + 1
        })
        .await;
        let seen = srv[0].seen.lock().unwrap()[i].clone();
        assert_eq!(seen["body"], "hello", "{seen}");
        assert_eq!(seen["headers"]["content-length"], "5", "{seen}");
    }
    for bad in [
        "content-length: 5\r\ncontent-length: 6\r\n",
        "host: cart\r\n",
    ] {
        let mut tcp = mesh.connect(web().ip, SocketAddr::new(vip(1), 80)).await;
        let req = format!("POST /up HTTP/1.1\r\nhost: cart\r\n{bad}content-length: 5\r\n\r\nhello");
        tcp.write_all(req.as_bytes()).await.unwrap();
        let head = read_head(&mut tcp).await;
        assert!(head.starts_with("HTTP/1.1 400 "), "{bad:?}: {head}");
    }
    assert_eq!(srv[0].hits(), 3, "a refused request reached the workload");
    mesh.shutdown().await;
}

/// A gRPC call's access-log line carries its grpc-status, written once the
/// status has passed in the trailers, on both proxies; other requests'
/// lines have none.
#[tokio::test]
async fn a_grpc_calls_access_log_line_has_its_status() {
    let (log, _default) = capture_access_log();
    let mesh = Mesh::standard().await;
    let (_srv, mut c) = h2c_cart(&mesh).await;
    assert_eq!(c.get("/plain").await.status, 200);
    let req = grpc_call("/shop.Cart/Add", &[("x-grpc-status", "14")]);
    let r = c.send(req).await.unwrap();
    assert_eq!(r.trailers.expect("trailers")["grpc-status"], "14");
    eventually("both proxies logged the call", || {
        access_records(&log)
            .1
            .iter()
            .filter(|r| r["path"] == "/shop.Cart/Add")
            .count()
            == 2
    })
    .await;
    let (text, records) = access_records(&log);
    for direction in ["outbound", "inbound"] {
        let call = record(&records, &text, direction, Some("/shop.Cart/Add"));
        assert_eq!(call["grpc_status"], "14", "{call}");
        assert_eq!(call["status"], 200, "{call}");
        assert_eq!(
            call["source_identity"],
            web().identity().to_string(),
            "{call}"
        );
        let plain = record(&records, &text, direction, Some("/plain"));
        assert!(plain.get("grpc_status").is_none(), "{plain}");
    }
    assert_eq!(records.len(), 4, "one line per request and proxy: {text}");
    mesh.shutdown().await;
}

/// A gRPC call its caller cancels before the answer (the workload takes its
/// time): counted and logged with grpc_status 1 (CANCELLED) by both proxies.
#[tokio::test]
async fn a_grpc_call_cancelled_before_its_answer_is_counted_and_logged_as_cancelled() {
    let (log, _default) = capture_access_log();
    let mesh = Mesh::standard().await;
    let (srv, mut c) = h2c_cart(&mesh).await;
    let req = grpc_call("/slow/5000", &[]);
    {
        let call = c.send(req);
        tokio::pin!(call);
        tokio::select! {
            _ = &mut call => panic!("the workload answered before its time"),
            _ = eventually("the call reached the workload", || srv[0].hits() == 1) => {}
        }
        // Dropped here: the caller resets its stream.
    }
    cancelled_on_both(&mesh, &["grpc_status=\"1\""]).await;
    let (text, records) = access_records(&log);
    for direction in ["outbound", "inbound"] {
        let r = record(&records, &text, direction, None);
        assert_eq!(r["grpc_status"], "1", "{r}");
        assert_eq!(r["reason"], "the caller went away before the answer", "{r}");
    }
    assert_eq!(records.len(), 2, "{text}");
    mesh.shutdown().await;
}

/// cart-0's echo server behind service `cart` (VIP 1) on a port declared
/// HTTP/2 (h2c), published, and an HTTP/2 client of web's for it.
async fn h2c_cart(mesh: &Mesh) -> (Vec<EchoServer>, Client) {
    let (srv, port) = servers(&[cart(0)]).await;
    let mut svc = mesh.service("cart", 1, port, &[cart(0)]);
    svc.ports[0].app_protocol = Some("kubernetes.io/h2c".into());
    mesh.publish(&Snapshot {
        services: vec![svc],
        ..Default::default()
    })
    .await;
    let c = mesh.http2(web().ip, SocketAddr::new(vip(1), 80)).await;
    (srv, c)
}
