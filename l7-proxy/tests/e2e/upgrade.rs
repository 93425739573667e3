//! HTTP/1.1 upgrades (WebSocket and the like) through the mesh: the request
//! is routed and checked against policy like any other, then the two sides
//! exchange raw bytes.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use l7_proxy::{
    Snapshot,
    config::{AccessPolicy, AccessRule, AccessSource, HttpConditions, ObjectRef, PathCondition},
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

use crate::support::*;

/// What an upgrade server saw: the request head of each connection.
type Seen = Arc<Mutex<Vec<String>>>;

/// Ends the upgrade servers' stalls (`.../stall`).
static STALL_RELEASE: tokio::sync::Notify = tokio::sync::Notify::const_new();

/// A server that answers requests for `.../no` and without `upgrade: echo`
/// (or `websocket`) with a plain 400 and keeps the connection for the next request (as a
/// keep-alive server does), requests for `.../plain` with a plain 200, and
/// every other upgrade request with `101`, then greets with `srv=<name>;`
/// and echoes (`.../stall`: reads nothing until [`STALL_RELEASE`], then
/// closes).
async fn upgrade_server(name: &'static str, addr: SocketAddr) -> (SocketAddr, Seen) {
    let listener = TcpListener::bind(addr).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Seen::default();
    let s = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut tcp, _)) = listener.accept().await else {
                return;
            };
            let s = s.clone();
            tokio::spawn(async move {
                loop {
                    let head = read_head(&mut tcp).await;
                    if head.is_empty() {
                        // Closed (after a request, or without a byte).
                        return;
                    }
                    s.lock().unwrap().push(head.clone());
                    let lower = head.to_ascii_lowercase();
                    let path = head.split(' ').nth(1).unwrap_or_default();
                    let websocket = lower.contains("\r\nupgrade: websocket\r\n");
                    if path.ends_with("/no")
                        || !(lower.contains("\r\nupgrade: echo\r\n") || websocket)
                    {
                        // With a header only the mesh may set.
                        let no = b"HTTP/1.1 400 Bad Request\r\nsluice-reason: forged\r\ncontent-length: 2\r\n\r\nno";
                        if tcp.write_all(no).await.is_err() {
                            return;
                        }
                        continue;
                    }
                    if path.ends_with("/plain") {
                        // Not an upgrade server after all: a plain answer.
                        let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n";
                        if tcp.write_all(ok).await.is_err() {
                            return;
                        }
                        continue;
                    }
                    let protocol = if websocket {
                        "websocket\r\nsec-websocket-accept: from-the-server"
                    } else {
                        "echo"
                    };
                    let greeting = format!(
                        "HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: {protocol}\r\nx-server: {name}\r\n\r\nsrv={name};"
                    );
                    if tcp.write_all(greeting.as_bytes()).await.is_err() {
                        return;
                    }
                    if path.ends_with("/reset") {
                        // A last word, then a reset once it has left.
                        let _ = tcp.write_all(b"bye").await;
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        let _ = tcp.set_zero_linger();
                    } else if path.ends_with("/stall") {
                        // Reads nothing more until the test lets go (or
                        // 30 s), then closes with what came unread.
                        let _ =
                            tokio::time::timeout(Duration::from_secs(30), STALL_RELEASE.notified())
                                .await;
                    } else if path.ends_with("/watch") {
                        // Echoes, and records how the caller's side ended.
                        let mut buf = [0u8; 4096];
                        let end = loop {
                            match tcp.read(&mut buf).await {
                                Ok(0) => break "END eof".to_string(),
                                Ok(n) => {
                                    if tcp.write_all(&buf[..n]).await.is_err() {
                                        break "END write failed".into();
                                    }
                                }
                                Err(e) => break format!("END {:?}", e.kind()),
                            }
                        };
                        s.lock().unwrap().push(end);
                    } else {
                        echo_bytes(&mut tcp).await;
                    }
                    return;
                }
            });
        }
    });
    (addr, seen)
}

/// HTTP policy denials of `caller` counted on node B.
fn http_denials(mesh: &Mesh, caller: &str) -> f64 {
    mesh.b.metric(
        "sluice_policy_denials_total",
        &[caller, "protocol=\"http\""],
    )
}

/// The standard mesh with an upgrade server as cart-0 behind service cart
/// (VIP `vip(1)`), under `policies`.
async fn cart_mesh(policies: Vec<AccessPolicy>) -> (Mesh, SocketAddr, Seen) {
    let mesh = Mesh::standard().await;
    let (addr, seen) = serve_upgrade_cart(&mesh, policies).await;
    (mesh, addr, seen)
}

/// The `cart` Service of `mesh`, with `policies`, served by an upgrade
/// server as cart-0.
async fn serve_upgrade_cart(mesh: &Mesh, policies: Vec<AccessPolicy>) -> (SocketAddr, Seen) {
    let (addr, seen) = upgrade_server("cart-0", SocketAddr::new(cart(0).ip, 0)).await;
    mesh.publish(&Snapshot {
        services: vec![mesh.service("cart", 1, addr.port(), &[cart(0)])],
        access_policies: policies,
        ..Default::default()
    })
    .await;
    (addr, seen)
}

/// The bot may GET `/public/*` of cart, and nobody anything else.
fn bot_reads_public() -> AccessPolicy {
    AccessPolicy {
        id: ObjectRef::new("shop", "cart-access"),
        target: ObjectRef::new("shop", "cart"),
        rules: vec![AccessRule {
            from: vec![AccessSource::Identity(bot().identity())],
            to: Some(HttpConditions {
                methods: vec!["GET".into()],
                paths: vec![PathCondition::Subtree("/public".into())],
            }),
        }],
    }
}

fn upgrade_request(path: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nhost: cart.shop\r\nconnection: Upgrade\r\nupgrade: echo\r\nx-app: 1\r\n\r\n"
    )
}

/// Sends an upgrade request for `path` from `from` to the VIP and returns the
/// connection with the response head read.
async fn upgrade(mesh: &Mesh, from: std::net::IpAddr, path: &str) -> (TcpStream, String) {
    let mut tcp = mesh.connect(from, SocketAddr::new(vip(1), 80)).await;
    tcp.write_all(upgrade_request(path).as_bytes())
        .await
        .unwrap();
    let head = read_head(&mut tcp).await;
    (tcp, head)
}

/// Ordinary requests are served by the proxy's own HTTP/1.1 server; an
/// upgrade after them on the same connection (here pipelined behind one)
/// goes to hyper's with the bytes already read, and still switches.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_behind_an_ordinary_request_on_one_connection_switches() {
    let (mesh, _, seen) = cart_mesh(vec![]).await;
    let mut tcp = mesh.connect(web().ip, SocketAddr::new(vip(1), 80)).await;
    let mut wire = b"GET /first HTTP/1.1\r\nhost: cart.shop\r\n\r\n".to_vec();
    wire.extend_from_slice(upgrade_request("/chat").as_bytes());
    tcp.write_all(&wire).await.unwrap();
    // The workload refuses a request that is no upgrade.
    let first = read_head(&mut tcp).await;
    assert!(first.starts_with("HTTP/1.1 400"), "{first}");
    assert_eq!(read_n(&mut tcp, 2).await, b"no");
    let head = read_head(&mut tcp).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert_eq!(read_n(&mut tcp, 11).await, b"srv=cart-0;");
    tcp.write_all(b"ping").await.unwrap();
    assert_eq!(read_n(&mut tcp, 4).await, b"ping");
    let heads = seen.lock().unwrap().clone();
    assert_eq!(heads.len(), 2, "{heads:?}");
    assert!(heads[0].starts_with("GET /first HTTP/1.1\r\n"), "{heads:?}");
    assert!(heads[1].starts_with("GET /chat HTTP/1.1\r\n"), "{heads:?}");
    mesh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_style_upgrade_crosses_the_tunnel_and_relays_both_ways() {
    let (mesh, _, seen) = cart_mesh(vec![]).await;

    let (mut tcp, head) = upgrade(&mesh, web().ip, "/chat?room=1").await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    let lower = head.to_ascii_lowercase();
    assert!(lower.contains("upgrade: echo"), "{head}");
    assert!(lower.contains("connection: upgrade\r\n"), "{head}");
    assert!(lower.contains("x-server: cart-0"), "{head}");
    // The server speaks first after the switch, then echoes.
    assert_eq!(read_n(&mut tcp, 11).await, b"srv=cart-0;");
    for msg in [
        &b"ping"[..],
        &[0u8, 255, 13, 10, 13, 10],
        &vec![7u8; 100_000],
    ] {
        tcp.write_all(msg).await.unwrap();
        assert_eq!(read_n(&mut tcp, msg.len()).await, msg);
    }

    let heads = seen.lock().unwrap().clone();
    assert_eq!(heads.len(), 1);
    let h = heads[0].to_ascii_lowercase();
    assert!(h.starts_with("get /chat?room=1 http/1.1\r\n"), "{h}");
    assert!(
        h.contains("connection: upgrade") && h.contains("upgrade: echo"),
        "{h}"
    );
    assert!(
        h.contains("host: cart.shop") && h.contains("x-app: 1"),
        "{h}"
    );
    assert!(
        h.contains(&format!("sluice-source-identity: {}", web().identity())),
        "the workload learns the caller's verified identity: {h}"
    );
    // The spliced bytes are counted on both nodes, the switch as a request.
    let (web_id, cart_id) = (web().identity().to_string(), cart(0).identity().to_string());
    let sent = 4 + 6 + 100_000;
    eventually("both proxies count the client's bytes", || {
        mesh.a.metric(
            "sluice_tcp_sent_bytes_total",
            &["Outbound", &web_id, &cart_id],
        ) == sent as f64
            && mesh.b.metric(
                "sluice_tcp_sent_bytes_total",
                &["Inbound", &web_id, &cart_id],
            ) == sent as f64
    })
    .await;
    eventually("and the workload's", || {
        mesh.a.metric(
            "sluice_tcp_received_bytes_total",
            &["Outbound", &web_id, &cart_id],
        ) == (sent + 11) as f64
    })
    .await;
    assert_eq!(
        mesh.b
            .metric("sluice_requests_total", &["Inbound", &web_id, "1xx"]),
        1.0,
        "{}",
        mesh.b.metrics()
    );
    // The relay ends when the client leaves.
    drop(tcp);
    mesh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_upgrade_is_an_ordinary_response() {
    let (mesh, _, _seen) = cart_mesh(vec![]).await;
    let (mut tcp, head) = upgrade(&mesh, web().ip, "/no").await;
    assert!(head.starts_with("HTTP/1.1 400"), "{head}");
    assert!(
        !head.contains("sluice-reason"),
        "the workload spoke for the mesh: {head}"
    );
    assert_eq!(read_n(&mut tcp, 2).await, b"no");
    mesh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_to_a_workload_outside_the_mesh_goes_direct() {
    let (mesh, seen) = outside_mesh("plain").await;
    let (mut tcp, head) = upgrade(&mesh, web().ip, "/direct").await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert_eq!(read_n(&mut tcp, 10).await, b"srv=plain;");
    tcp.write_all(b"hello").await.unwrap();
    assert_eq!(read_n(&mut tcp, 5).await, b"hello");
    assert_eq!(seen.lock().unwrap().len(), 1);
    drop(tcp);
    // A refusal from outside the mesh cannot pose as the mesh's either.
    let (_tcp, head) = upgrade(&mesh, web().ip, "/no").await;
    assert!(head.starts_with("HTTP/1.1 400"), "{head}");
    assert!(!head.contains("sluice-reason"), "{head}");
    mesh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_policy_path_conditions_apply_to_upgrades() {
    let (mesh, _, seen) = cart_mesh(vec![bot_reads_public()]).await;

    let (mut ok, head) = upgrade(&mesh, bot().ip, "/public/feed").await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert_eq!(read_n(&mut ok, 11).await, b"srv=cart-0;");

    let (_no, head) = upgrade(&mesh, bot().ip, "/private").await;
    assert!(head.starts_with("HTTP/1.1 403"), "{head}");
    let (_no, head) = upgrade(&mesh, web().ip, "/public/feed").await;
    assert!(
        head.starts_with("HTTP/1.1 403"),
        "web has no rule at all: {head}"
    );
    assert_eq!(
        seen.lock().unwrap().len(),
        1,
        "denied upgrades never reach the workload"
    );
    let bot_id = bot().identity().to_string();
    assert_eq!(http_denials(&mesh, &bot_id), 1.0);
    drop(ok);
    mesh.shutdown().await;
}

/// A tunnel connection to node B with the bot's real certificate.
async fn tunnel_as_bot(
    mesh: &Mesh,
) -> hyper::client::conn::http2::SendRequest<http_body_util::Empty<bytes::Bytes>> {
    let config = mesh
        .a
        .identities
        .client_config(&bot().identity(), &cart(0).identity())
        .unwrap();
    let tcp = TcpStream::connect(mesh.node_b_proxy()).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(certs::server_name(&cart(0).identity()), tcp)
        .await
        .unwrap();
    let (send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tls),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    send
}

/// A CONNECT stream on `tunnel` marked as an upgrade, naming `GET
/// /public/feed`, as a byte stream.
async fn upgrade_stream_on(
    tunnel: &mut hyper::client::conn::http2::SendRequest<http_body_util::Empty<bytes::Bytes>>,
    workload: SocketAddr,
) -> Result<hyper_util::rt::TokioIo<hyper::upgrade::Upgraded>, hyper::Error> {
    let req = http::Request::builder()
        .method("CONNECT")
        .uri(workload.to_string())
        .header("sluice-upgrade-request", "GET /public/feed")
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let resp = tunnel.send_request(req).await?;
    assert_eq!(resp.status(), 200);
    Ok(hyper_util::rt::TokioIo::new(
        hyper::upgrade::on(resp).await.unwrap(),
    ))
}

/// Speaks the tunnel directly with the bot's real certificate: opens a
/// CONNECT stream marked as an upgrade, naming `GET /public/feed`, sends
/// `request` on it and returns everything that comes back.
async fn raw_upgrade_stream(mesh: &Mesh, workload: SocketAddr, request: &str) -> String {
    let mut tunnel = tunnel_as_bot(mesh).await;
    let mut io = upgrade_stream_on(&mut tunnel, workload).await.unwrap();
    io.write_all(request.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), io.read_to_end(&mut got)).await;
    String::from_utf8_lossy(&got).into_owned()
}

/// A WebSocket across the tunnel that goes quiet keeps its tunnel
/// connection: the workload's node counts the stream open until the splice
/// ends, not only until the `101` went out, and says no idle GOAWAY to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiet_upgraded_stream_keeps_its_tunnel_connection() {
    let mesh = Mesh::with_settings(vec![web(), bot()], vec![cart(0)], &|s| {
        s.tunnel_idle_timeout_ms = 200;
    })
    .await;
    let (addr, _seen) = serve_upgrade_cart(&mesh, vec![]).await;
    let mut tunnel = tunnel_as_bot(&mesh).await;
    let mut quiet = upgrade_stream_on(&mut tunnel, addr).await.unwrap();
    quiet
        .write_all(upgrade_request("/public/feed").as_bytes())
        .await
        .unwrap();
    let mut got = Vec::new();
    while !got.ends_with(b"srv=cart-0;") {
        let mut buf = [0u8; 512];
        let n = tokio::time::timeout(Duration::from_secs(5), quiet.read(&mut buf))
            .await
            .expect("the switch and greeting")
            .unwrap();
        assert_ne!(n, 0, "closed: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    assert!(
        got.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&got)
    );
    // Five times the server side's idle limit, nothing on the stream.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let second = upgrade_stream_on(&mut tunnel, addr).await;
    assert!(
        second.is_ok(),
        "the connection took no new stream: {:?}",
        second.err()
    );
    quiet.write_all(b"ping").await.unwrap();
    let mut echo = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(5), quiet.read_exact(&mut echo))
        .await
        .expect("the echo")
        .unwrap();
    assert_eq!(&echo, b"ping");
    drop((quiet, second, tunnel));
    mesh.shutdown().await;
}

/// An upgrade request the workload takes and never answers gets a `504`
/// from the workload's node after its exchange idle timeout, rather than
/// holding the stream and the workload's connection for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_the_workload_never_answers_is_answered_504() {
    let mesh = Mesh::with_settings(vec![web(), bot()], vec![cart(0)], &|s| {
        s.exchange_idle_timeout_ms = 300;
    })
    .await;
    let l = tokio::net::TcpListener::bind(SocketAddr::new(cart(0).ip, 0))
        .await
        .unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                while matches!(tcp.read(&mut buf).await, Ok(1..)) {}
            });
        }
    });
    mesh.publish(&Snapshot {
        services: vec![mesh.service("cart", 1, addr.port(), &[cart(0)])],
        ..Default::default()
    })
    .await;
    let answer = raw_upgrade_stream(
        &mesh,
        addr,
        "GET /public/feed HTTP/1.1\r\nhost: c\r\nconnection: upgrade\r\nupgrade: echo\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 504"), "{answer:?}");
    assert!(
        answer.contains("no answer to the upgrade request"),
        "{answer}"
    );
    mesh.shutdown().await;
}

/// An HTTP/2 WebSocket that goes idle is ended with its stream's end, a
/// plain close as for an HTTP/1.1 one, not reset as if it broke off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_http2_websocket_ends_cleanly() {
    let mesh = Mesh::with_settings(
        vec![web(), bot()],
        vec![cart(0), cart(1), cart(2), mirror_pod()],
        &|s| s.tcp_idle_timeout_ms = 300,
    )
    .await;
    let _served = serve_upgrade_cart(&mesh, vec![]).await;
    let mut h2 = websocket_client(&mesh).await;
    let (resp, _send) = h2.send_request(websocket("/chat/watch"), false).unwrap();
    let resp = resp.await.unwrap();
    assert_eq!(resp.status(), 200, "{resp:?}");
    let mut socket = resp.into_body();
    assert_eq!(read_h2(&mut socket, 11).await, b"srv=cart-0;");
    let end = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match socket.data().await {
                // The end may come as an empty last frame.
                Some(Ok(b)) if b.is_empty() => continue,
                other => break other,
            }
        }
    })
    .await
    .expect("the idle WebSocket ends");
    assert!(end.is_none(), "not a plain end: {end:?}");
    mesh.shutdown().await;
}

/// A caller's connection whose one request is a WebSocket through the
/// tunnel shows the tunnel's TLS in the connection table (`sluice tls`),
/// as one with plain requests does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_only_connection_shows_the_tunnels_tls() {
    let (mesh, _, _seen) = cart_mesh(vec![]).await;
    let (tcp, head) = upgrade(&mesh, web().ip, "/chat").await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    let rows = mesh.a.proxy().connections();
    let row = rows
        .iter()
        .find(|r| r.kind == l7_proxy::conntable::ConnKind::OutboundHttp)
        .unwrap_or_else(|| panic!("no HTTP row: {rows:?}"));
    let tls = row.meta.tls.as_ref().expect("the tunnel's TLS");
    assert_eq!(tls.version, "TLSv1.3", "{row:?}");
    drop(tcp);
    mesh.shutdown().await;
}

/// An upgrade request to a pod port declared `appProtocol: tcp` is refused
/// on the stream with `403` and the reason, as a plain request is (it was
/// reset, which reached the caller as a bare 502).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_to_a_port_declared_tcp_is_refused_with_403() {
    let mesh = Mesh::standard().await;
    let (addr, seen) = upgrade_server("cart-0", SocketAddr::new(cart(0).ip, 0)).await;
    let mut svc = mesh.service("cart", 1, addr.port(), &[cart(0)]);
    svc.ports[0].app_protocol = Some("tcp".into());
    mesh.publish(&Snapshot {
        services: vec![svc],
        ..Default::default()
    })
    .await;
    let answer = raw_upgrade_stream(
        &mesh,
        addr,
        "GET /public/feed HTTP/1.1\r\nhost: c\r\nconnection: upgrade\r\nupgrade: echo\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 403"), "{answer:?}");
    assert!(answer.contains("declared TCP"), "{answer}");
    assert!(seen.lock().unwrap().is_empty(), "the workload saw nothing");
    mesh.shutdown().await;
}

/// A denied upgrade request's access record on the workload's node names
/// the policies; the caller's answer does not.
#[tokio::test]
async fn a_denied_upgrades_record_names_the_policies() {
    let (log, _default) = capture_access_log();
    let (mesh, addr, _seen) = cart_mesh(vec![bot_reads_public()]).await;
    let answer = raw_upgrade_stream(
        &mesh,
        addr,
        "GET /private HTTP/1.1\r\nhost: c\r\nconnection: upgrade\r\nupgrade: echo\r\n\r\n",
    )
    .await;
    assert!(
        answer.starts_with("HTTP/1.1 403") && !answer.contains("cart-access"),
        "{answer}"
    );
    mesh.shutdown().await;
    let (text, records) = access_records(&log);
    let r = records
        .iter()
        .find(|r| r["protocol"] == "http-upgrade")
        .unwrap_or_else(|| panic!("no upgrade record in {text}"));
    assert!(
        r["reason"]
            .as_str()
            .is_some_and(|m| m.ends_with("(access policies shop/cart-access)")),
        "{r}"
    );
}

/// The far side polices the request the stream carries, not the name it was
/// given; it forwards that one request only, with the verified identity.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_inbound_proxy_polices_and_forwards_exactly_one_request_per_upgrade_stream() {
    let (mesh, addr, seen) = cart_mesh(vec![bot_reads_public()]).await;
    // Named as an allowed request, but carrying another one: denied there.
    let forged = raw_upgrade_stream(
        &mesh,
        addr,
        "GET /private HTTP/1.1\r\nhost: c\r\nconnection: upgrade\r\nupgrade: echo\r\n\r\n",
    )
    .await;
    assert!(forged.starts_with("HTTP/1.1 403"), "{forged}");
    assert!(
        forged.contains("is not allowed to GET /private"),
        "{forged}"
    );
    assert!(seen.lock().unwrap().is_empty(), "the workload saw nothing");
    let bot_id = bot().identity().to_string();
    assert_eq!(http_denials(&mesh, &bot_id), 1.0);
    // An allowed request that the workload does not upgrade, with a second
    // request and a forged identity behind it: the workload (which would
    // keep the connection for more) gets the first request only, with the
    // caller's real identity.
    let smuggled = raw_upgrade_stream(
        &mesh,
        addr,
        "GET /public/no HTTP/1.1\r\nhost: c\r\nconnection: upgrade\r\nupgrade: echo\r\n\
         sluice-source-identity: spiffe://cluster.local/ns/shop/sa/admin\r\n\r\n\
         DELETE /admin HTTP/1.1\r\nhost: c\r\n\r\n",
    )
    .await;
    assert!(smuggled.starts_with("HTTP/1.1 400"), "{smuggled}");
    let heads = seen.lock().unwrap().clone();
    assert_eq!(heads.len(), 1, "{heads:?}");
    let h = heads[0].to_ascii_lowercase();
    assert!(h.starts_with("get /public/no http/1.1\r\n"), "{h}");
    assert!(
        h.contains(&format!("sluice-source-identity: {bot_id}")) && !h.contains("sa/admin"),
        "{h}"
    );
    // Naming the identity header in Connection does not make it go away.
    let _ = raw_upgrade_stream(
        &mesh,
        addr,
        "GET /public/no HTTP/1.1\r\nhost: c\r\n\
         connection: upgrade, sluice-source-identity\r\nupgrade: echo\r\n\r\n",
    )
    .await;
    let heads = seen.lock().unwrap().clone();
    assert_eq!(heads.len(), 2, "{heads:?}");
    assert!(
        heads[1].contains(&format!("sluice-source-identity: {bot_id}")),
        "{}",
        heads[1]
    );
    mesh.shutdown().await;
}

/// An upgrade request with a body is an ordinary request: its body cannot
/// ride ahead of a protocol switch as bytes the workload might take for a
/// request of their own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_request_with_a_body_is_an_ordinary_request() {
    let (mesh, _, seen) = cart_mesh(vec![]).await;
    let body = "DELETE /admin HTTP/1.1\r\n\r\n";
    let mut tcp = mesh.connect(web().ip, SocketAddr::new(vip(1), 80)).await;
    let req = format!(
        "GET /chat HTTP/1.1\r\nhost: cart.shop\r\nconnection: Upgrade\r\nupgrade: echo\r\n\
         content-length: {}\r\n\r\n{body}",
        body.len()
    );
    tcp.write_all(req.as_bytes()).await.unwrap();
    let head = read_head(&mut tcp).await;
    assert!(head.starts_with("HTTP/1.1 400"), "not switched: {head}");
    let first = seen.lock().unwrap()[0].to_ascii_lowercase();
    assert!(first.starts_with("get /chat http/1.1\r\n"), "{first}");
    assert!(
        !first.contains("upgrade: echo"),
        "no upgrade was asked for: {first}"
    );
    assert!(
        first.contains(&format!("content-length: {}", body.len())),
        "{first}"
    );
    drop(tcp);
    mesh.shutdown().await;
}

/// The upgrade server of [`cart_mesh`] behind the tunnel (true), or one
/// outside the mesh reached directly (false).
async fn reset_mesh(tunnel: bool) -> (Mesh, Seen) {
    if tunnel {
        let (mesh, _, seen) = cart_mesh(vec![]).await;
        return (mesh, seen);
    }
    outside_mesh("cart-0").await
}

/// The `cart` Service with one endpoint outside the mesh (no node proxy, no
/// identity): an upgrade server called `name`.
async fn outside_mesh(name: &'static str) -> (Mesh, Seen) {
    let mesh = Mesh::standard().await;
    let (addr, seen) = upgrade_server(name, SocketAddr::new(cart(1).ip, 0)).await;
    let mut svc = mesh.service("cart", 1, addr.port(), &[cart(1)]);
    svc.endpoints[0].node_proxy = None;
    svc.endpoints[0].identity = None;
    mesh.publish(&Snapshot {
        services: vec![svc],
        ..Default::default()
    })
    .await;
    (mesh, seen)
}

/// After the switch, a workload that resets: the caller reads what came
/// before, then a reset, not an end of stream that would pass a cut exchange
/// for a whole one; through the tunnel and directly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workloads_reset_after_an_upgrade_reaches_the_caller_as_a_reset() {
    for tunnel in [true, false] {
        let (mesh, _) = reset_mesh(tunnel).await;
        let (mut tcp, head) = upgrade(&mesh, web().ip, "/reset").await;
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        assert_eq!(read_n(&mut tcp, 14).await, b"srv=cart-0;bye");
        let mut buf = [0u8; 64];
        let end = tokio::time::timeout(Duration::from_secs(10), tcp.read(&mut buf))
            .await
            .expect("the caller's connection ends");
        match end {
            Err(e) => assert_eq!(
                e.kind(),
                std::io::ErrorKind::ConnectionReset,
                "tunnel {tunnel}: {e}"
            ),
            Ok(n) => panic!("tunnel {tunnel}: the caller read {n} bytes, not a reset"),
        }
        mesh.shutdown().await;
    }
}

/// After the switch, a caller that resets: the workload sees a reset; one
/// that closes, an end of stream; through the tunnel and directly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_callers_reset_after_an_upgrade_reaches_the_workload_as_a_reset() {
    for tunnel in [true, false] {
        let (mesh, seen) = reset_mesh(tunnel).await;
        for reset in [true, false] {
            let (mut tcp, head) = upgrade(&mesh, web().ip, "/watch").await;
            assert!(head.starts_with("HTTP/1.1 101"), "{head}");
            assert_eq!(read_n(&mut tcp, 11).await, b"srv=cart-0;");
            tcp.write_all(b"ping").await.unwrap();
            assert_eq!(read_n(&mut tcp, 4).await, b"ping");
            if reset {
                tcp.set_zero_linger().unwrap();
            } else {
                tcp.shutdown().await.unwrap();
            }
            drop(tcp);
            let want = if reset {
                "END ConnectionReset"
            } else {
                "END eof"
            };
            eventually(
                &format!("tunnel {tunnel}: the workload sees {want}"),
                || seen.lock().unwrap().last().map(String::as_str) == Some(want),
            )
            .await;
        }
        mesh.shutdown().await;
    }
}

/// An upgraded connection that node A ends for being idle ends for the
/// workload with a plain close, not a reset.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_upgraded_connection_ends_for_the_workload_with_a_plain_close() {
    let mesh = Mesh::with_settings(vec![web(), bot()], vec![cart(0), cart(1)], &|s| {
        if s.inbound_addr.ip() == node_a_ip() {
            s.tcp_idle_timeout_ms = 300;
        }
    })
    .await;
    let (_, seen) = serve_upgrade_cart(&mesh, vec![]).await;
    let (mut tcp, head) = upgrade(&mesh, web().ip, "/watch").await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert_eq!(read_n(&mut tcp, 11).await, b"srv=cart-0;");
    eventually("the workload's side ends", || {
        seen.lock()
            .unwrap()
            .last()
            .is_some_and(|l| l.starts_with("END"))
    })
    .await;
    assert_eq!(seen.lock().unwrap().last().unwrap(), "END eof");
    // And the caller a plain close too.
    let mut buf = [0u8; 8];
    let read = tokio::time::timeout(Duration::from_secs(10), tcp.read(&mut buf))
        .await
        .expect("the caller's side ends");
    assert!(matches!(read, Ok(0)), "the caller saw {read:?}");
    mesh.shutdown().await;
}

/// Reads `n` bytes of an HTTP/2 stream's data.
async fn read_h2(body: &mut h2::RecvStream, n: usize) -> Vec<u8> {
    let mut got = Vec::new();
    while got.len() < n {
        let chunk = tokio::time::timeout(Duration::from_secs(10), body.data())
            .await
            .expect("data within 10 s")
            .expect("the stream goes on")
            .expect("data");
        let _ = body.flow_control().release_capacity(chunk.len());
        got.extend_from_slice(&chunk);
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_over_http2_becomes_an_http1_upgrade_across_the_tunnel() {
    websocket_over_http2(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_over_http2_to_a_workload_outside_the_mesh_goes_direct() {
    websocket_over_http2(false).await;
}

/// An HTTP/2 client's WebSocket (extended CONNECT) to cart-0, through the
/// tunnel or to a cart-0 outside the mesh.
async fn websocket_over_http2(tunnel: bool) {
    let (mesh, seen) = reset_mesh(tunnel).await;
    let mut h2 = websocket_client(&mesh).await;
    let connect = |path: &str| {
        let mut req = websocket(path);
        let h = req.headers_mut();
        // Meaningless over HTTP/2: replaced.
        h.insert("sec-websocket-key", "from-the-client".parse().unwrap());
        h.insert("x-app", "1".parse().unwrap());
        req
    };
    let (resp, mut send) = h2.send_request(connect("/chat/watch"), false).unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(10), resp)
        .await
        .expect("an answer within 10 s")
        .unwrap();
    // The workload's switch is the HTTP/2 caller's 200, without the
    // HTTP/1.1 handshake's headers.
    assert_eq!(resp.status(), 200, "{resp:?}");
    assert_eq!(resp.headers()["x-server"], "cart-0");
    assert!(
        !resp.headers().contains_key("sec-websocket-accept")
            && !resp.headers().contains_key("upgrade"),
        "{resp:?}"
    );
    let mut socket = resp.into_body();
    assert_eq!(read_h2(&mut socket, 11).await, b"srv=cart-0;");
    for msg in [&b"ping"[..], &vec![7u8; 100_000]] {
        send.reserve_capacity(msg.len());
        send.send_data(bytes::Bytes::copy_from_slice(msg), false)
            .unwrap();
        assert_eq!(read_h2(&mut socket, msg.len()).await, msg);
    }

    // The workload got an HTTP/1.1 WebSocket upgrade request, with a key,
    // and through the tunnel the caller's verified identity.
    let h = seen.lock().unwrap()[0].to_ascii_lowercase();
    assert!(h.starts_with("get /chat/watch http/1.1\r\n"), "{h}");
    assert!(
        h.contains("\r\nconnection: upgrade\r\n") && h.contains("\r\nupgrade: websocket\r\n"),
        "{h}"
    );
    let key = h
        .split("\r\n")
        .find_map(|l| l.strip_prefix("sec-websocket-key: "))
        .unwrap_or_else(|| panic!("no sec-websocket-key: {h}"));
    assert_eq!(key.len(), 24, "16 bytes in base64: {h}");
    assert_eq!(h.matches("sec-websocket-key").count(), 1, "{h}");
    assert!(
        h.contains("\r\nsec-websocket-version: 13\r\n")
            && h.contains("\r\nhost: cart.shop\r\n")
            && h.contains("\r\nx-app: 1\r\n"),
        "{h}"
    );
    assert_eq!(
        h.contains(&format!("sluice-source-identity: {}", web().identity())),
        tunnel,
        "{h}"
    );

    // A refusal is an ordinary answer, and the connection serves on.
    let (resp, _send) = h2.send_request(connect("/no"), false).unwrap();
    let resp = resp.await.unwrap();
    assert_eq!(resp.status(), 400);
    // The workload's header cannot pose as the mesh's.
    assert!(!resp.headers().contains_key("sluice-reason"), "{resp:?}");
    let mut body = resp.into_body();
    assert_eq!(read_h2(&mut body, 2).await, b"no");
    // A workload that answers 200 did not open a WebSocket: the client
    // must not read that it did.
    let (resp, _send) = h2.send_request(connect("/plain"), false).unwrap();
    let resp = resp.await.unwrap();
    assert_eq!(resp.status(), 502);
    assert!(
        resp.headers()["sluice-reason"]
            .to_str()
            .unwrap()
            .contains("answered the WebSocket request 200 OK without switching protocols"),
        "{resp:?}"
    );
    // Nor is any protocol but websocket turned into an upgrade.
    let mut udp = http::Request::builder()
        .method(http::Method::CONNECT)
        .uri("http://cart.shop/udp")
        .body(())
        .unwrap();
    udp.extensions_mut()
        .insert(h2::ext::Protocol::from_static("connect-udp"));
    let (resp, _send) = h2.send_request(udp, true).unwrap();
    assert_eq!(resp.await.unwrap().status(), 405);
    // A CONNECT without a protocol is still not proxied.
    let plain = http::Request::builder()
        .method(http::Method::CONNECT)
        .uri("cart.shop:80")
        .body(())
        .unwrap();
    let (resp, _send) = h2.send_request(plain, true).unwrap();
    assert_eq!(resp.await.unwrap().status(), 405);
    // The caller ends its WebSocket: the workload's side ends too.
    send.send_data(bytes::Bytes::new(), true).unwrap();
    eventually("the workload sees the end", || {
        seen.lock().unwrap().iter().any(|h| h == "END eof")
    })
    .await;
    drop((send, socket, h2));
    mesh.shutdown().await;
}

/// WebSockets over HTTP/2 whose workload stops reading hold their own
/// streams' windows, not their client connection's or the tunnel's, however
/// many: another stream of the same connection still carries data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_http2_websockets_do_not_stall_their_connection() {
    let (mesh, _, _seen) = cart_mesh(vec![]).await;
    let mut h2 = websocket_client(&mesh).await;
    let mut stalled = Vec::new();
    // More than every buffer on the way (sockets, tunnel windows) takes:
    // the rest waits in the client for the stream's window.
    let big = bytes::Bytes::from(vec![1u8; 32 * 1024 * 1024]);
    for _ in 0..STALLED {
        let (resp, mut send) = h2.send_request(websocket("/chat/stall"), false).unwrap();
        assert_eq!(resp.await.unwrap().status(), 200);
        send.reserve_capacity(big.len());
        send.send_data(big.clone(), false).unwrap();
        stalled.push(send);
    }
    until_stalled(
        &mesh,
        l7_proxy::conntable::ConnKind::OutboundHttp,
        STALLED as u64,
        |r| r.bytes_sent,
    )
    .await;
    // Another WebSocket on the same connection, to the same workload,
    // still carries 600 kB both ways.
    let (resp, mut send) = h2.send_request(websocket("/chat/watch"), false).unwrap();
    let mut socket = resp.await.unwrap().into_body();
    assert_eq!(read_h2(&mut socket, 11).await, b"srv=cart-0;");
    let msg = vec![2u8; 600_000];
    send.reserve_capacity(msg.len());
    send.send_data(bytes::Bytes::from(msg.clone()), false)
        .unwrap();
    assert_eq!(read_h2(&mut socket, msg.len()).await, msg);
    STALL_RELEASE.notify_waiters();
    drop((stalled, send, socket, h2));
    mesh.shutdown().await;
}

/// An HTTP/2 caller's WebSocket is a stream in flight for as long as it is
/// open: its connection is not shut down at the keep-alive idle timeout
/// (it still takes new streams), and is once the WebSocket has ended.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_websocket_holds_its_connection_past_the_keep_alive_idle_timeout() {
    let mesh = Mesh::with_settings(vec![web()], vec![cart(0)], &|s| {
        s.keepalive_idle_timeout_ms = 1_000;
    })
    .await;
    let (_, _seen) = serve_upgrade_cart(&mesh, vec![]).await;
    let (mut h2, ended) = watched_h2(&mesh, SocketAddr::new(vip(1), 80)).await;
    eventually("the proxy allows extended CONNECT", || {
        h2.is_extended_connect_protocol_enabled()
    })
    .await;
    let (resp, mut send) = h2.send_request(websocket("/chat"), false).unwrap();
    let resp = resp.await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut socket = resp.into_body();
    assert_eq!(read_h2(&mut socket, 11).await, b"srv=cart-0;");
    // Two and a half idle timeouts with the WebSocket open.
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let mut h2 = h2
        .ready()
        .await
        .expect("the connection still takes streams (no GOAWAY)");
    let (other, mut other_send) = h2.send_request(websocket("/chat"), false).unwrap();
    let other = tokio::time::timeout(Duration::from_secs(10), other)
        .await
        .expect("an answer within 10 s")
        .expect("a new stream is served while a WebSocket is open");
    assert_eq!(other.status(), 200);
    let mut other_socket = other.into_body();
    assert_eq!(read_h2(&mut other_socket, 11).await, b"srv=cart-0;");
    send.send_data(bytes::Bytes::from_static(b"still here"), false)
        .unwrap();
    assert_eq!(read_h2(&mut socket, 10).await, b"still here");
    // Both WebSockets end; the connection goes at the idle timeout.
    send.send_data(bytes::Bytes::new(), true).unwrap();
    other_send.send_data(bytes::Bytes::new(), true).unwrap();
    closed_with_goaway(h2, ended).await;
    drop((socket, other_socket));
    mesh.shutdown().await;
}

/// An upgraded connection is opaque TCP: the HTTP exchange idle timeout no
/// longer applies to it, for an HTTP/1.1 or an HTTP/2 caller.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgraded_connection_outlives_the_exchange_idle_timeout() {
    let mesh = Mesh::with_settings(
        vec![web(), bot()],
        vec![cart(0), cart(1), cart(2), mirror_pod()],
        &|s| s.exchange_idle_timeout_ms = 1000,
    )
    .await;
    let (_, _seen) = serve_upgrade_cart(&mesh, vec![]).await;
    let (mut tcp, head) = upgrade(&mesh, web().ip, "/chat").await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert_eq!(read_n(&mut tcp, 11).await, b"srv=cart-0;");

    let mut h2 = websocket_client(&mesh).await;
    let (resp, mut send) = h2.send_request(websocket("/chat"), false).unwrap();
    let resp = resp.await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut socket = resp.into_body();
    assert_eq!(read_h2(&mut socket, 11).await, b"srv=cart-0;");

    // Two and a half idle timeouts' worth of silence, then both still
    // carry bytes.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    tcp.write_all(b"still here").await.unwrap();
    assert_eq!(read_n(&mut tcp, 10).await, b"still here");
    send.send_data(bytes::Bytes::from_static(b"me too"), false)
        .unwrap();
    assert_eq!(read_h2(&mut socket, 6).await, b"me too");
    drop((tcp, send, socket, h2));
    mesh.shutdown().await;
}

/// A caller that gives up on an upgrade before its `101` (the workload
/// holds the request without answering): both proxies count it as
/// `cancelled`, as any request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_given_up_before_its_switch_is_counted_cancelled_on_both_nodes() {
    let mesh = Mesh::standard().await;
    let listener = tokio::net::TcpListener::bind(SocketAddr::new(cart(0).ip, 0))
        .await
        .unwrap();
    let port = listener.local_addr().unwrap().port();
    let heads = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let seen = heads.clone();
    // Reads each request head and never answers, holding the connection.
    let silent = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((mut tcp, _)) = listener.accept().await {
            let mut buf = Vec::new();
            let mut b = [0u8; 1024];
            while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                match tcp.read(&mut b).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => buf.extend_from_slice(&b[..n]),
                }
            }
            seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            held.push(tcp);
        }
    });
    mesh.publish(&Snapshot {
        services: vec![mesh.service("cart", 1, port, &[cart(0)])],
        ..Default::default()
    })
    .await;
    let mut tcp = mesh.connect(web().ip, SocketAddr::new(vip(1), 80)).await;
    tcp.write_all(upgrade_request("/chat").as_bytes())
        .await
        .unwrap();
    eventually("the upgrade request reached the workload", || {
        heads.load(std::sync::atomic::Ordering::SeqCst) == 1
    })
    .await;
    drop(tcp);
    cancelled_on_both(&mesh, &[]).await;
    for proxy in [&mesh.a, &mesh.b] {
        assert_eq!(
            proxy.metric("sluice_requests_total", &[]),
            1.0,
            "{}",
            proxy.metrics()
        );
    }
    silent.abort();
    mesh.shutdown().await;
}
