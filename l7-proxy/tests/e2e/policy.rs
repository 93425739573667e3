//! The inbound side: only mTLS from the mesh's CA, AccessPolicy allow and
//! deny, denials counted.

use std::{net::SocketAddr, sync::Arc};

use l7_proxy::{
    Snapshot,
    config::{AccessPolicy, AccessRule, AccessSource, HttpConditions, ObjectRef, PathCondition},
};
use tokio::io::AsyncWriteExt;

use crate::{support::*, traffic::servers};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_clients_are_refused_on_the_tunnel_port() {
    let mesh = Mesh::standard().await;
    let (srv, port) = servers(&[cart(0)]).await;
    mesh.publish(&Snapshot {
        services: vec![mesh.service("cart", 1, port, &[cart(0)])],
        ..Default::default()
    })
    .await;
    let target = mesh.node_b_proxy();
    // An HTTP/1.1 client, then an HTTP/2 (h2c) one, straight at port 15008.
    for hello in [
        format!(
            "GET / HTTP/1.1\r\nHost: x\r\nsluice-target: {}:{port}\r\n\r\n",
            cart(0).ip
        ),
        "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_string(),
    ] {
        let mut t = tokio::net::TcpStream::connect(target).await.unwrap();
        t.write_all(hello.as_bytes()).await.unwrap();
        assert!(
            closed_by_peer(&mut t).await,
            "plaintext {hello:?} must be cut off"
        );
    }
    assert_eq!(srv[0].hits(), 0, "nothing reached the workload");
    assert_eq!(
        mesh.b.metric(
            "sluice_tls_handshake_failures_total",
            &["Inbound", "not_tls"]
        ),
        2.0,
        "{}",
        mesh.b.metrics()
    );
    mesh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_certificate_from_another_ca_is_refused() {
    let mesh = Mesh::standard().await;
    let srv = mesh.serve_cart().await;
    // A client whose certificate comes from a rogue CA and which accepts any
    // server: only the server's check can stop it.
    let config = rogue_client_config(web().identity().as_ref());
    let tcp = tokio::net::TcpStream::connect(mesh.node_b_proxy())
        .await
        .unwrap();
    let result = async {
        let mut tls = tokio_rustls::TlsConnector::from(config)
            .connect(certs::server_name(&cart(0).identity()), tcp)
            .await?;
        // TLS 1.3: the server's verdict on the client certificate may only
        // show on the first read.
        tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await?;
        let mut buf = [0u8; 64];
        let n = tokio::io::AsyncReadExt::read(&mut tls, &mut buf).await?;
        Ok::<usize, std::io::Error>(n)
    }
    .await;
    assert!(
        matches!(result, Err(_) | Ok(0)),
        "the rogue client got through: {result:?}"
    );
    assert_eq!(srv[0].hits(), 0);
    eventually("the failure is counted", || {
        mesh.b.metric(
            "sluice_tls_handshake_failures_total",
            &["Inbound", "bad_certificate"],
        ) == 1.0
    })
    .await;
    mesh.shutdown().await;
}

/// TLS 1.3, ALPN h2, a SPIFFE certificate for `spiffe_id` signed by a CA
/// nobody trusts, and no check at all of the server.
fn rogue_client_config(spiffe_id: &str) -> Arc<rustls::ClientConfig> {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair, SanType};
    let ca_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut ca_params = CertificateParams::default();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let _ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::from_params(&ca_params, &ca_key);
    let leaf_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut leaf = CertificateParams::default();
    leaf.subject_alt_names = vec![SanType::URI(spiffe_id.try_into().unwrap())];
    let leaf = leaf.signed_by(&leaf_key, &issuer).unwrap();
    let key = rustls::pki_types::PrivateKeyDer::try_from(leaf_key.serialize_der()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAnyServer(provider)))
        .with_client_auth_cert(vec![leaf.der().clone()], key)
        .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec()];
    Arc::new(config)
}

#[derive(Debug)]
struct AcceptAnyServer(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AcceptAnyServer {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("TLS 1.2 is not offered".into()))
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

fn policy(rules: Vec<AccessRule>) -> AccessPolicy {
    AccessPolicy {
        id: ObjectRef::new("shop", "cart-access"),
        target: ObjectRef::new("shop", "cart"),
        rules,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_policy_allows_and_denies_http_with_a_reason() {
    let mesh = Mesh::standard().await;
    let (srv, port) = servers(&[cart(0)]).await;
    mesh.publish(&Snapshot {
        services: vec![mesh.service("cart", 1, port, &[cart(0)])],
        access_policies: vec![policy(vec![
            AccessRule {
                from: vec![AccessSource::Namespace("shop".into())],
                to: None,
            },
            AccessRule {
                from: vec![AccessSource::ServiceAccount(ObjectRef::new("other", "bot"))],
                to: Some(HttpConditions {
                    methods: vec!["GET".into()],
                    paths: vec![PathCondition::Subtree("/public".into())],
                }),
            },
        ])],
        ..Default::default()
    })
    .await;
    let mut w = mesh.http1(web().ip, SocketAddr::new(vip(1), 80)).await;
    assert_eq!(
        w.send(request("POST", "/private", &[], ""))
            .await
            .unwrap()
            .status,
        200,
        "shop may do anything"
    );

    let mut b = mesh.http1(bot().ip, SocketAddr::new(vip(1), 80)).await;
    assert_eq!(
        b.get("/public/page").await.status,
        200,
        "bot may GET /public/*"
    );
    let denied = b.get("/private").await;
    assert_eq!(denied.status, 403);
    let reason = denied.headers["sluice-reason"].to_str().unwrap();
    // Who and what, not which policies (the target namespace's business).
    assert!(
        reason.contains(&bot().identity().to_string())
            && reason.contains("GET /private")
            && !reason.contains("cart-access"),
        "{reason}"
    );
    let denied = b
        .send(request("POST", "/public/page", &[], ""))
        .await
        .unwrap();
    assert_eq!(denied.status, 403, "bot may not POST");
    // A gRPC call reads its refusal from grpc-status: PERMISSION_DENIED.
    let denied = b
        .send(request(
            "POST",
            "/shop.Cart/Add",
            &[("content-type", "application/grpc")],
            "",
        ))
        .await
        .unwrap();
    assert_eq!(denied.status, 200, "{denied:?}");
    assert_eq!(denied.headers["grpc-status"], "7", "{denied:?}");
    let message = denied.headers["grpc-message"].to_str().unwrap();
    assert!(
        message.contains("is not allowed to POST /shop.Cart/Add")
            && !message.contains("cart-access"),
        "{message}"
    );
    // A refused upload larger than the tunnel's stream window gets its 403
    // too, over either protocol.
    let big = "x".repeat(2 << 20);
    for mut b in [
        mesh.http1(bot().ip, SocketAddr::new(vip(1), 80)).await,
        mesh.http2(bot().ip, SocketAddr::new(vip(1), 80)).await,
    ] {
        let denied = b
            .send(request("POST", "/public/page", &[], &big))
            .await
            .unwrap();
        assert_eq!(denied.status, 403, "{denied:?}");
    }
    assert_eq!(srv[0].hits(), 2, "denied requests never reach the workload");
    let bot_id = bot().identity().to_string();
    let cart_id = cart(0).identity().to_string();
    assert_eq!(
        mesh.b.metric(
            "sluice_policy_denials_total",
            &[&bot_id, &cart_id, "protocol=\"http\""]
        ),
        5.0
    );
    mesh.shutdown().await;
}

/// The standard mesh with cart-0's TCP echo server behind `cart` (opaque
/// TCP), which a policy opens to web alone; and the echo server's address.
async fn tcp_cart_for_web_only() -> (Mesh, SocketAddr) {
    let mesh = Mesh::standard().await;
    let echo = tcp_server(SocketAddr::new(cart(0).ip, 0), None).await;
    let mut svc = mesh.service("cart", 1, echo.port(), &[cart(0)]);
    svc.ports[0].app_protocol = Some("tcp".into());
    mesh.publish(&Snapshot {
        services: vec![svc],
        access_policies: vec![policy(vec![AccessRule {
            from: vec![AccessSource::Identity(web().identity())],
            to: None,
        }])],
        ..Default::default()
    })
    .await;
    (mesh, echo)
}

/// A refused TCP stream has its access-log line, like a refused request:
/// both identities, the address asked for and the reason.
#[tokio::test]
async fn a_refused_tcp_stream_is_in_the_access_log() {
    let (log, _default) = capture_access_log();
    let (mesh, echo) = tcp_cart_for_web_only().await;
    let mut no = mesh.connect(bot().ip, SocketAddr::new(vip(1), 80)).await;
    let _ = no.write_all(b"denied?").await;
    assert!(closed_by_peer(&mut no).await, "the stream was not refused");
    mesh.shutdown().await;
    let (text, records) = access_records(&log);
    let r = record(&records, &text, "inbound", None);
    assert_eq!(
        (
            &r["protocol"],
            &r["source_identity"],
            &r["destination_identity"]
        ),
        (
            &"tcp".into(),
            &bot().identity().to_string().into(),
            &cart(0).identity().to_string().into()
        ),
        "{text}"
    );
    assert_eq!(
        r["destination_addr"],
        SocketAddr::new(cart(0).ip, echo.port()).to_string(),
        "{text}"
    );
    // This node's record names the policies.
    let reason = r["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("is not allowed") && reason.ends_with("(access policies shop/cart-access)"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_policy_refuses_tcp_streams() {
    let (mesh, _echo) = tcp_cart_for_web_only().await;
    let mut ok = mesh.connect(web().ip, SocketAddr::new(vip(1), 80)).await;
    ok.write_all(b"allowed").await.unwrap();
    assert_eq!(read_n(&mut ok, 7).await, b"allowed");

    let mut no = mesh.connect(bot().ip, SocketAddr::new(vip(1), 80)).await;
    let _ = no.write_all(b"denied?").await;
    assert!(
        closed_by_peer(&mut no).await,
        "the bot's stream is refused and its connection closed"
    );
    let bot_id = bot().identity().to_string();
    assert_eq!(
        mesh.b.metric(
            "sluice_policy_denials_total",
            &[&bot_id, "protocol=\"tcp\""]
        ),
        1.0
    );
    // The allowed connection is unaffected.
    ok.write_all(b"still").await.unwrap();
    assert_eq!(read_n(&mut ok, 5).await, b"still");
    mesh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_other_than_the_identity_asked_for_is_refused_and_counted_with_both() {
    let mesh = Mesh::standard().await;
    let echo = tcp_server(SocketAddr::new(cart(0).ip, 0), None).await;
    let mut svc = mesh.service("cart", 1, echo.port(), &[cart(0)]);
    svc.ports[0].app_protocol = Some("tcp".into());
    // Node A believes cart-0's address is the mirror's identity: it asks
    // node B for the mirror's certificate, then for cart-0's address.
    svc.endpoints[0].identity = Some(mirror_pod().identity());
    mesh.publish(&Snapshot {
        services: vec![svc],
        ..Default::default()
    })
    .await;
    let mut no = mesh.connect(web().ip, SocketAddr::new(vip(1), 80)).await;
    let _ = no.write_all(b"hello?").await;
    assert!(closed_by_peer(&mut no).await, "the stream was not refused");
    assert_eq!(
        tcp_denials(&mesh, &web(), &cart(0)),
        1.0,
        "{}",
        mesh.b.metrics()
    );
    mesh.shutdown().await;
}

/// The proxies' own answers to a HEAD request (a policy's refusal on the
/// far side, no endpoint on the near side) are heads only: HTTP/2 lets a
/// HEAD answer carry no DATA, and a peer that gets some resets the stream
/// (and, repeated, the whole tunnel connection).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxies_own_answers_to_head_carry_no_body() {
    let mesh = Mesh::standard().await;
    let (srv, port) = servers(&[cart(0)]).await;
    let mut empty = mesh.service("empty", 2, port, &[]);
    empty.endpoints.clear();
    mesh.publish(&Snapshot {
        services: vec![mesh.service("cart", 1, port, &[cart(0)]), empty],
        access_policies: vec![policy(vec![AccessRule {
            from: vec![AccessSource::Namespace("shop".into())],
            to: None,
        }])],
        ..Default::default()
    })
    .await;
    let head = || request("HEAD", "/x", &[], "");
    for h2 in [false, true] {
        let mut b = if h2 {
            mesh.http2(bot().ip, SocketAddr::new(vip(1), 80)).await
        } else {
            mesh.http1(bot().ip, SocketAddr::new(vip(1), 80)).await
        };
        for _ in 0..3 {
            let denied = b.send(head()).await.expect("an answer, not a reset");
            assert_eq!(denied.status, 403, "h2 {h2}: {denied:?}");
            assert!(denied.body.is_empty(), "{denied:?}");
            assert!(
                denied.headers["sluice-reason"]
                    .to_str()
                    .unwrap()
                    .contains("is not allowed to HEAD /x"),
                "{denied:?}"
            );
        }
        let mut e = if h2 {
            mesh.http2(bot().ip, SocketAddr::new(vip(2), 80)).await
        } else {
            mesh.http1(bot().ip, SocketAddr::new(vip(2), 80)).await
        };
        let none = e.send(head()).await.expect("an answer, not a reset");
        assert_eq!(none.status, 503, "h2 {h2}: {none:?}");
        assert!(none.body.is_empty(), "{none:?}");
    }
    // The workload's own answer to HEAD still comes through.
    let mut w = mesh.http1(web().ip, SocketAddr::new(vip(1), 80)).await;
    let ok = w.send(head()).await.unwrap();
    assert_eq!(ok.status, 200, "{ok:?}");
    assert_eq!(srv[0].hits(), 1);
    mesh.shutdown().await;
}

/// On a port declared HTTP (`appProtocol`), a caller that waits past the
/// sniff timeout before its request still gets HTTP: its forged
/// `sluice-source-identity` is replaced by its verified one, never relayed
/// as opaque bytes. So through the declaring Service, through a sibling
/// Service that says nothing, and to the pod's address; and an opaque TCP
/// stream to that port (through a Service that says `tcp`) is refused by
/// the workload's node proxy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_port_declared_http_takes_http_only_and_the_identity_header_cannot_be_forged() {
    let mesh = Mesh::standard().await;
    let (srv, port) = servers(&[cart(0)]).await;
    let mut http = mesh.service("cart", 1, port, &[cart(0)]);
    http.ports[0].app_protocol = Some("http".into());
    let mut raw = mesh.service("cart-raw", 2, port, &[cart(0)]);
    raw.ports[0].app_protocol = Some("tcp".into());
    let plain = mesh.service("cart-plain", 3, port, &[cart(0)]);
    mesh.publish(&Snapshot {
        services: vec![http, raw, plain],
        // As the Service's endpoints name the pod.
        workloads: vec![mesh.tunnelled(&cart(0))],
        ..Default::default()
    })
    .await;
    let forged = "GET / HTTP/1.1\r\nHost: cart\r\nConnection: close\r\n\
                  sluice-source-identity: spiffe://cluster.local/ns/shop/sa/admin\r\n\r\n";
    let targets = [
        SocketAddr::new(vip(1), 80),
        SocketAddr::new(vip(3), 80),
        SocketAddr::new(cart(0).ip, port),
    ];
    for to in targets {
        // Past the sniff timeout (200 ms in these tests) before any byte.
        let mut slow = mesh.connect(web().ip, to).await;
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        slow.write_all(forged.as_bytes())
            .await
            .unwrap_or_else(|e| panic!("{to}: {e}"));
        let mut got = Vec::new();
        tokio::time::timeout(
            std::time::Duration::from_secs(10),
            tokio::io::AsyncReadExt::read_to_end(&mut slow, &mut got),
        )
        .await
        .expect("an answer")
        .unwrap();
        let text = String::from_utf8_lossy(&got);
        assert!(text.starts_with("HTTP/1.1 200"), "{to}: {text}");
        let body = &text[text.find("\r\n\r\n").expect("a head") + 4..];
        let echo: serde_json::Value = serde_json::from_str(body).expect("the echo's JSON");
        assert_eq!(
            echo["headers"]["sluice-source-identity"],
            web().identity().to_string(),
            "{to}: {echo}"
        );
    }

    // Opaque TCP to the same pod port is refused, and counted (the reset
    // may come before the connection is even up: no byte waited for).
    refused_at_cart(&mesh, SocketAddr::new(vip(2), 80), forged.as_bytes()).await;
    assert_eq!(
        srv[0].hits(),
        targets.len(),
        "the refused stream reached cart"
    );
    mesh.shutdown().await;
}

/// Web's opaque TCP connection to `to`, sending `bytes`, is refused by
/// cart-0's node proxy (the reset may come before the connection is even
/// up: no byte waited for), and counted there as one denial.
async fn refused_at_cart(mesh: &Mesh, to: SocketAddr, bytes: &[u8]) {
    match mesh.try_connect(web().ip, to).await {
        Ok(mut no) => {
            let _ = no.write_all(bytes).await;
            assert!(closed_by_peer(&mut no).await, "the stream was not refused");
        }
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}"),
    }
    assert_eq!(
        tcp_denials(mesh, &web(), &cart(0)),
        1.0,
        "{}",
        mesh.b.metrics()
    );
}

/// A pod whose Service declares its port HTTP but whose EndpointSlice does
/// not list it yet (the controller lags behind a new pod): its node proxy
/// knows from the Service's selector, and refuses an opaque TCP stream to
/// that port all the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_port_declared_http_is_http_only_before_the_endpointslice_lists_the_pod() {
    let mesh = Mesh::standard().await;
    let (srv, port) = servers(&[cart(0)]).await;
    let mut http = mesh.service("cart", 1, port, &[]);
    http.ports[0].app_protocol = Some("http".into());
    let mut raw = mesh.service("cart-raw", 2, port, &[cart(0)]);
    raw.ports[0].app_protocol = Some("tcp".into());
    let mut selected = cart(0).local();
    selected.selected_by = vec![l7_proxy::config::SelectedBy {
        service: http.id.clone(),
        ports: vec![port],
        http_ports: vec![port],
        tcp_ports: Vec::new(),
    }];
    mesh.publish(&Snapshot {
        services: vec![http, raw],
        local_workloads: vec![selected],
        ..Default::default()
    })
    .await;
    refused_at_cart(
        &mesh,
        SocketAddr::new(vip(2), 80),
        b"GET / HTTP/1.1\r\n\r\n",
    )
    .await;
    assert_eq!(srv[0].hits(), 0, "the refused stream reached cart");
    mesh.shutdown().await;
}

/// A client of a port declared HTTP that has sent nothing when shutdown
/// begins holds no request: it is let go at once, not kept until the drain
/// timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_client_of_a_port_declared_http_does_not_hold_up_shutdown() {
    let mut mesh = Mesh::with_settings(vec![web()], vec![cart(0)], &|s| {
        s.drain_timeout_ms = 60_000;
    })
    .await;
    let (_srv, port) = servers(&[cart(0)]).await;
    let mut http = mesh.service("cart", 1, port, &[cart(0)]);
    http.ports[0].app_protocol = Some("http".into());
    mesh.publish(&Snapshot {
        services: vec![http],
        ..Default::default()
    })
    .await;
    let mut silent = mesh.connect(web().ip, SocketAddr::new(vip(1), 80)).await;
    // Past the sniff timeout: still waiting for its first bytes.
    tokio::time::sleep(std::time::Duration::from_millis(400)).await;
    let proxy = mesh.a.proxy.take().unwrap();
    tokio::time::timeout(std::time::Duration::from_secs(20), proxy.shutdown())
        .await
        .expect("shutdown waited for a client that sent nothing (drain timeout 60 s)");
    assert!(closed_by_peer(&mut silent).await);
    mesh.shutdown().await;
}

/// Node B's count of TCP streams from `from` to `to` it refused.
fn tcp_denials(mesh: &Mesh, from: &Pod, to: &Pod) -> f64 {
    mesh.b.metric(
        "sluice_policy_denials_total",
        &[
            from.identity().as_ref(),
            &format!("destination=\"{}\"", to.identity()),
            "protocol=\"tcp\"",
        ],
    )
}
