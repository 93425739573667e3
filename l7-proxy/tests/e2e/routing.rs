//! HTTPRoute and GRPCRoute behaviour across the tunnel: matches, filters,
//! weights, retries, timeouts, mirrors.

use std::net::SocketAddr;

use l7_proxy::{
    Snapshot,
    config::{
        BackendRef, Fraction, GrpcMethodMatch, GrpcRoute, GrpcRouteMatch, GrpcRouteRule,
        HeaderModifier, HeaderPair, HttpFilter, HttpRoute, HttpRouteMatch, HttpRouteRule,
        ObjectRef, ParentRef, PathMatch, PathModifier, RequestMirror, RequestRedirect, Retry,
        Service, Timeouts, UrlRewrite, ValueMatch, ValueMatchKind,
    },
};

use crate::{support::*, traffic::servers};

fn backend(name: &str, weight: u32) -> BackendRef {
    BackendRef {
        service: ObjectRef::new("shop", name),
        port: 80,
        weight,
        filters: vec![],
        invalid: None,
    }
}

fn route(rules: Vec<HttpRouteRule>) -> HttpRoute {
    HttpRoute {
        id: ObjectRef::new("shop", "cart-route"),
        created_unix: 0,
        parents: vec![ParentRef {
            service: ObjectRef::new("shop", "cart"),
            port: None,
        }],
        rules,
    }
}

fn rule(matches: Vec<HttpRouteMatch>, backends: Vec<BackendRef>) -> HttpRouteRule {
    HttpRouteRule {
        matches,
        backends,
        ..Default::default()
    }
}

/// `cart` (VIP 1) is the parent; `v0`, `v1`, `v2` are one-pod services on
/// cart(0..3); `mirror` is the mirror pod. Returns the echo servers.
async fn setup(mesh: &Mesh, routes: Vec<HttpRoute>) -> (Vec<EchoServer>, EchoServer) {
    let (srv, port) = servers(&[cart(0), cart(1), cart(2)]).await;
    let mirror = EchoServer::start("mirror", SocketAddr::new(mirror_pod().ip, port)).await;
    let services: Vec<Service> = vec![
        mesh.service("cart", 1, port, &[cart(0), cart(1), cart(2)]),
        mesh.service("v0", 10, port, &[cart(0)]),
        mesh.service("v1", 11, port, &[cart(1)]),
        mesh.service("v2", 12, port, &[cart(2)]),
        mesh.service("mirror", 13, port, &[mirror_pod()]),
    ];
    mesh.publish(&Snapshot {
        services,
        http_routes: routes,
        ..Default::default()
    })
    .await;
    (srv, mirror)
}

async fn client(mesh: &Mesh) -> Client {
    mesh.http1(web().ip, SocketAddr::new(vip(1), 80)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_match_kind_selects_its_backend() {
    let mesh = Mesh::standard().await;
    let hm = |name: &str, value: &str, kind| ValueMatch {
        kind,
        name: name.into(),
        value: value.into(),
    };
    setup(
        &mesh,
        vec![route(vec![
            rule(
                vec![HttpRouteMatch {
                    path: Some(PathMatch::Exact("/exact".into())),
                    ..Default::default()
                }],
                vec![backend("v1", 1)],
            ),
            rule(
                vec![HttpRouteMatch {
                    path: Some(PathMatch::RegularExpression("/re/[0-9]+".into())),
                    ..Default::default()
                }],
                vec![backend("v2", 1)],
            ),
            rule(
                vec![HttpRouteMatch {
                    headers: vec![hm("x-version", "v[12]", ValueMatchKind::RegularExpression)],
                    ..Default::default()
                }],
                vec![backend("v1", 1)],
            ),
            rule(
                vec![HttpRouteMatch {
                    query_params: vec![hm("canary", "true", ValueMatchKind::Exact)],
                    ..Default::default()
                }],
                vec![backend("v2", 1)],
            ),
            rule(
                vec![HttpRouteMatch {
                    method: Some("DELETE".into()),
                    ..Default::default()
                }],
                vec![backend("v2", 1)],
            ),
            rule(
                vec![HttpRouteMatch {
                    path: Some(PathMatch::PathPrefix("/api".into())),
                    ..Default::default()
                }],
                vec![backend("v1", 1)],
            ),
            rule(vec![], vec![backend("v0", 1)]),
        ])],
    )
    .await;
    let mut c = client(&mesh).await;
    let mut who = async |method: &str, path: &str, headers: &[(&str, &str)]| {
        let r = c.send(request(method, path, headers, "")).await.unwrap();
        assert_eq!(r.status, 200, "{method} {path}: {r:?}");
        r.server()
    };
    assert_eq!(who("GET", "/exact", &[]).await, "cart-1");
    assert_eq!(who("GET", "/exact/more", &[]).await, "cart-0");
    assert_eq!(who("GET", "/re/42", &[]).await, "cart-2");
    assert_eq!(who("GET", "/re/4x", &[]).await, "cart-0");
    assert_eq!(who("GET", "/", &[("x-version", "v2")]).await, "cart-1");
    assert_eq!(who("GET", "/", &[("x-version", "v3")]).await, "cart-0");
    assert_eq!(who("GET", "/?canary=true", &[]).await, "cart-2");
    assert_eq!(who("DELETE", "/", &[]).await, "cart-2");
    assert_eq!(who("GET", "/api/items", &[]).await, "cart-1");
    assert_eq!(who("GET", "/apiary", &[]).await, "cart-0");
    mesh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_matching_rule_is_404() {
    let mesh = Mesh::standard().await;
    setup(
        &mesh,
        vec![route(vec![rule(
            vec![HttpRouteMatch {
                path: Some(PathMatch::Exact("/only".into())),
                ..Default::default()
            }],
            vec![backend("v1", 1)],
        )])],
    )
    .await;
    let mut c = client(&mesh).await;
    let r = c.get("/other").await;
    assert_eq!(r.status, 404);
    assert!(
        r.headers["sluice-reason"]
            .to_str()
            .unwrap()
            .contains("no route"),
        "{r:?}"
    );
    mesh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filters_modify_redirect_and_rewrite() {
    let mesh = Mesh::standard().await;
    let pair = |n: &str, v: &str| HeaderPair {
        name: n.into(),
        value: v.into(),
    };
    let prefix = |p: &str| {
        vec![HttpRouteMatch {
            path: Some(PathMatch::PathPrefix(p.into())),
            ..Default::default()
        }]
    };
    let mut headers = rule(prefix("/headers"), vec![backend("v1", 1)]);
    headers.filters = vec![
        HttpFilter::RequestHeaderModifier(HeaderModifier {
            set: vec![pair("x-set", "new")],
            add: vec![pair("x-added", "yes")],
            remove: vec!["x-secret".into()],
        }),
        HttpFilter::ResponseHeaderModifier(HeaderModifier {
            set: vec![pair("x-server", "hidden")],
            add: vec![pair("x-resp", "added")],
            remove: vec![],
        }),
    ];
    let mut redirect = rule(prefix("/old"), vec![]);
    redirect.filters = vec![HttpFilter::RequestRedirect(RequestRedirect {
        path: Some(PathModifier::ReplacePrefixMatch("/new".into())),
        status_code: Some(301),
        ..Default::default()
    })];
    let mut rewrite = rule(prefix("/v1/api"), vec![backend("v2", 1)]);
    rewrite.filters = vec![HttpFilter::UrlRewrite(UrlRewrite {
        hostname: Some("cart-internal".into()),
        path: Some(PathModifier::ReplacePrefixMatch("/api".into())),
    })];
    let mut per_backend = rule(prefix("/backend-filter"), vec![backend("v0", 1)]);
    per_backend.backends[0].filters = vec![HttpFilter::RequestHeaderModifier(HeaderModifier {
        set: vec![pair("x-backend", "v0")],
        ..Default::default()
    })];
    setup(
        &mesh,
        vec![route(vec![headers, redirect, rewrite, per_backend])],
    )
    .await;
    let mut c = client(&mesh).await;

    let r = c
        .send(request(
            "GET",
            "/headers",
            &[("x-set", "old"), ("x-secret", "s3cr3t")],
            "",
        ))
        .await
        .unwrap();
    let e = r.echo();
    assert_eq!(e["headers"]["x-set"], "new");
    assert_eq!(e["headers"]["x-added"], "yes");
    assert!(e["headers"].get("x-secret").is_none());
    assert_eq!(r.headers["x-server"], "hidden");
    assert_eq!(r.headers["x-resp"], "added");

    // Headers the caller names in `Connection` are its hop's: gone before
    // routing, so they cannot undo what the route sets.
    let r = c
        .send(request(
            "GET",
            "/headers",
            &[
                ("connection", "x-set, x-added, x-hop"),
                ("x-set", "old"),
                ("x-hop", "1"),
            ],
            "",
        ))
        .await
        .unwrap();
    let e = r.echo();
    assert_eq!(e["headers"]["x-set"], "new", "{e}");
    assert_eq!(e["headers"]["x-added"], "yes", "{e}");
    assert!(e["headers"].get("x-hop").is_none(), "{e}");

    let r = c.get("/old/page?q=1").await;
    assert_eq!(r.status, 301);
    assert_eq!(r.headers["location"], "http://cart.shop/new/page?q=1");

    let r = c.get("/v1/api/items?x=2").await;
    let e = r.echo();
    assert_eq!(e["server"], "cart-2");
    assert_eq!(e["path"], "/api/items?x=2");
    assert_eq!(e["headers"]["host"], "cart-internal");
    let r = c
        .send(request(
            "GET",
            "/v1/api/items",
            &[("connection", "host")],
            "",
        ))
        .await
        .unwrap();
    assert_eq!(r.echo()["headers"]["host"], "cart-internal");

    let r = c.get("/backend-filter").await;
    assert_eq!(r.echo()["headers"]["x-backend"], "v0");
    mesh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weighted_split_over_1000_requests() {
    let mesh = Mesh::standard().await;
    setup(
        &mesh,
        vec![route(vec![rule(
            vec![],
            vec![backend("v1", 80), backend("v2", 20)],
        )])],
    )
    .await;
    let mut c = client(&mesh).await;
    let mut v1 = 0;
    for _ in 0..1000 {
        match c.get("/").await.server().as_str() {
            "cart-1" => v1 += 1,
            "cart-2" => {}
            other => panic!("unexpected backend {other}"),
        }
    }
    // Binomial(1000, 0.8): standard deviation 12.6; ±60 is nearly 5 of them.
    assert!(
        (740..=860).contains(&v1),
        "v1 got {v1} of 1000, expected ~800"
    );
    mesh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_too_big_to_replay_are_sent_once_whole_and_small_ones_are_retried() {
    // 4 KiB per body, 2 KiB for all bodies buffered at once.
    let mesh = Mesh::with_settings(
        vec![web(), bot()],
        vec![cart(0), cart(1), cart(2), mirror_pod()],
        &|s| {
            s.max_buffered_body_bytes = 4096;
            s.max_buffered_total_bytes = 2048;
        },
    )
    .await;
    let retried = retried_on_503("v1", 2);
    let (srv, _) = setup(&mesh, vec![route(vec![retried])]).await;
    let mut c = client(&mesh).await;
    let bodies = |srv: &EchoServer| -> Vec<usize> {
        srv.seen
            .lock()
            .unwrap()
            .iter()
            .map(|s| s["body"].as_str().unwrap().len())
            .collect()
    };
    // Small: buffered and replayed on each of the 1 + 2 attempts.
    let small = "s".repeat(1000);
    let r = c
        .send(request("POST", "/status/503", &[], &small))
        .await
        .unwrap();
    assert_eq!(r.status, 503);
    assert_eq!(bodies(&srv[1]), [1000, 1000, 1000]);
    // Over the per-body limit, and over the proxy-wide budget: each is sent
    // once, whole, and its 503 comes back instead of a refusal.
    for len in [5000, 3000] {
        srv[1].seen.lock().unwrap().clear();
        let big = "b".repeat(len);
        let r = c
            .send(request("POST", "/status/503", &[], &big))
            .await
            .unwrap();
        assert_eq!(r.status, 503, "{r:?}");
        assert_eq!(bodies(&srv[1]), [len], "sent once, whole");
    }
    // The budget came back: small bodies are retried again.
    srv[1].seen.lock().unwrap().clear();
    let r = c
        .send(request("POST", "/status/503", &[], &small))
        .await
        .unwrap();
    assert_eq!(r.status, 503);
    assert_eq!(bodies(&srv[1]).len(), 3);
    mesh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_http2_request_keeps_its_trailers() {
    let mesh = Mesh::standard().await;
    let retried = retried_on_503("v1", 1);
    let (srv, _) = setup(&mesh, vec![route(vec![retried])]).await;
    let mut send = mesh.http2_raw(web().ip, SocketAddr::new(vip(1), 80)).await;
    let mut trailers = http::HeaderMap::new();
    trailers.insert("x-checksum", "c0ffee".parse().unwrap());
    let frames = vec![
        Ok::<_, std::convert::Infallible>(hyper::body::Frame::data(bytes::Bytes::from_static(
            b"payload",
        ))),
        Ok(hyper::body::Frame::trailers(trailers)),
    ];
    let req = http::Request::post("http://cart/status/503")
        .body(http_body_util::StreamBody::new(futures_util::stream::iter(
            frames,
        )))
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 503);
    let seen = srv[1].seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 2, "one retry: {seen:?}");
    for s in &seen {
        assert_eq!(s["body"], "payload", "{s}");
        assert_eq!(s["trailers"]["x-checksum"], "c0ffee", "{s}");
    }
    mesh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_on_503_until_the_backend_recovers() {
    let mesh = Mesh::standard().await;
    let mut retried = rule(
        vec![HttpRouteMatch {
            headers: vec![ValueMatch {
                kind: ValueMatchKind::Exact,
                name: "x-retry".into(),
                value: "yes".into(),
            }],
            ..Default::default()
        }],
        vec![backend("v1", 1)],
    );
    retried.retry = Some(Retry {
        codes: vec![503],
        attempts: 3,
        backoff_ms: 5,
    });
    let plain = rule(vec![], vec![backend("v2", 1)]);
    let (srv, _) = setup(&mesh, vec![route(vec![retried, plain])]).await;
    let mut c = client(&mesh).await;
    // Two 503s, then success: within 3 retries.
    let r = c
        .send(request(
            "POST",
            "/flaky/2",
            &[("x-retry", "yes")],
            "payload",
        ))
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(srv[1].hits(), 3);
    let bodies: Vec<String> = srv[1]
        .seen
        .lock()
        .unwrap()
        .iter()
        .map(|s| s["body"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        bodies,
        ["payload", "payload", "payload"],
        "the body is replayed on each attempt"
    );
    // Without a retry policy the 503 comes back as is.
    let r = c.get("/flaky/1").await;
    assert_eq!(r.status, 503, "v2's rule has no retries");
    assert_eq!(srv[2].hits(), 1);
    mesh.shutdown().await;
}

/// A retry whose backoff would end past the request timeout is not made,
/// and the caller gets the answer in hand (the workload's 503), not a 504
/// of the proxy's before the timeout is even up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_that_cannot_fit_in_the_request_timeout_leaves_the_answer_in_hand() {
    let mesh = Mesh::standard().await;
    let mut r = rule(vec![], vec![backend("v1", 1)]);
    r.retry = Some(Retry {
        codes: vec![503],
        attempts: 3,
        backoff_ms: 5_000,
    });
    r.timeouts = Timeouts {
        request_ms: Some(2_000),
        backend_request_ms: None,
    };
    let (srv, _) = setup(&mesh, vec![route(vec![r])]).await;
    let mut c = client(&mesh).await;
    let r = c.get("/flaky/5").await;
    assert_eq!(r.status, 503, "{r:?}");
    assert!(
        r.headers.get("sluice-reason").is_none(),
        "the proxy answered instead of the workload: {r:?}"
    );
    assert_eq!(srv[1].hits(), 1);
    mesh.shutdown().await;
}

/// A route's timeouts longer than the exchange idle timeout are the ones
/// that count: a backend that takes longer than the idle timeout to start
/// its answer, within the route's `request` (or `backendRequest`) timeout,
/// is waited for; past the idle timeout without such a route it is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_timeout_longer_than_the_exchange_idle_timeout_is_waited_for() {
    let mesh = mesh_with_idle_timeout_300ms().await;
    let timed = |case: &str, t: Timeouts| {
        let mut r = rule(
            vec![HttpRouteMatch {
                headers: vec![ValueMatch {
                    kind: ValueMatchKind::Exact,
                    name: "x-timeout".into(),
                    value: case.into(),
                }],
                ..Default::default()
            }],
            vec![backend("v1", 1)],
        );
        r.timeouts = t;
        r
    };
    let rules = vec![
        timed(
            "request",
            Timeouts {
                request_ms: Some(5_000),
                backend_request_ms: None,
            },
        ),
        timed(
            "backend",
            Timeouts {
                request_ms: None,
                backend_request_ms: Some(5_000),
            },
        ),
        rule(vec![], vec![backend("v1", 1)]),
    ];
    let (_srv, _) = setup(&mesh, vec![route(rules)]).await;
    let mut c = client(&mesh).await;
    for case in ["request", "backend"] {
        let r = c
            .send(request("GET", "/slow/900", &[("x-timeout", case)], ""))
            .await
            .unwrap();
        assert_eq!(r.status, 200, "{case}: {r:?}");
    }
    let r = c.get("/slow/900").await;
    assert_eq!(r.status, 504, "the idle timeout without a route's: {r:?}");
    mesh.shutdown().await;
}

/// The standard mesh with an exchange idle timeout of 300 ms.
async fn mesh_with_idle_timeout_300ms() -> Mesh {
    Mesh::with_settings(
        vec![web(), bot()],
        vec![cart(0), cart(1), cart(2), mirror_pod()],
        &|s| s.exchange_idle_timeout_ms = 300,
    )
    .await
}

/// [`mesh_with_idle_timeout_300ms`] with one route to `v1`.
async fn one_route_with_idle_timeout_300ms() -> Mesh {
    let mesh = mesh_with_idle_timeout_300ms().await;
    let (_srv, _) = setup(
        &mesh,
        vec![route(vec![rule(vec![], vec![backend("v1", 1)])])],
    )
    .await;
    mesh
}

/// A gRPC call's own deadline (`grpc-timeout`) longer than the exchange
/// idle timeout is waited for, on both nodes; without one, the idle
/// timeout ends the call (DEADLINE_EXCEEDED).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_calls_own_deadline_longer_than_the_idle_timeout_is_waited_for() {
    let mesh = one_route_with_idle_timeout_300ms().await;
    let mut c = client(&mesh).await;
    let call = |deadline: Option<&'static str>| {
        let mut h = vec![("content-type", "application/grpc")];
        if let Some(d) = deadline {
            h.push(("grpc-timeout", d));
        }
        request("POST", "/slow/900", &h, "")
    };
    let r = c.send(call(Some("5S"))).await.unwrap();
    assert_eq!(r.status, 200, "{r:?}");
    assert!(!r.headers.contains_key("grpc-status"), "{r:?}");
    assert!(r.body.ends_with(':'), "the server's answer: {r:?}");
    let r = c.send(call(Some("100m"))).await.unwrap();
    assert_eq!(
        r.headers.get("grpc-status").map(|v| v.to_str().unwrap()),
        Some("4"),
        "a deadline shorter than the idle timeout changes nothing: {r:?}"
    );
    let r = c.send(call(None)).await.unwrap();
    assert_eq!(
        r.headers.get("grpc-status").map(|v| v.to_str().unwrap()),
        Some("4"),
        "the idle timeout without a deadline: {r:?}"
    );
    mesh.shutdown().await;
}

/// A gRPC server stream that goes quiet past the exchange idle timeout
/// ends with DEADLINE_EXCEEDED in trailers after the messages it sent, as
/// gRPC clients read a deadline, not with a reset (INTERNAL to them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiet_grpc_stream_cut_by_the_idle_timeout_ends_as_deadline_exceeded() {
    let mesh = one_route_with_idle_timeout_300ms().await;
    let mut c = client(&mesh).await;
    let r = c
        .send(request(
            "POST",
            "/quiet",
            &[("content-type", "application/grpc"), ("te", "trailers")],
            "",
        ))
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{r:?}");
    assert!(r.body.ends_with(':'), "the message sent before: {r:?}");
    let trailers = r.trailers.as_ref().expect("trailers, not a reset");
    assert_eq!(trailers["grpc-status"], "4", "{r:?}");
    // A caller that cannot read trailers: cut, not ended as if whole.
    let cut = c
        .send(request(
            "POST",
            "/quiet",
            &[("content-type", "application/grpc")],
            "",
        ))
        .await;
    assert!(cut.is_err(), "looked whole: {cut:?}");
    mesh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_and_backend_timeouts_answer_504() {
    let mesh = Mesh::standard().await;
    let slow = |p: &str| {
        vec![HttpRouteMatch {
            path: Some(PathMatch::PathPrefix(p.into())),
            ..Default::default()
        }]
    };
    let mut per_try = rule(slow("/slow"), vec![backend("v1", 1)]);
    per_try.timeouts = Timeouts {
        request_ms: None,
        backend_request_ms: Some(100),
    };
    let mut whole = rule(slow("/whole"), vec![backend("v1", 1)]);
    whole.timeouts = Timeouts {
        request_ms: Some(150),
        backend_request_ms: None,
    };
    let rewrite = UrlRewrite {
        path: Some(PathModifier::ReplaceFullPath("/slow/3000".into())),
        ..Default::default()
    };
    whole.filters = vec![HttpFilter::UrlRewrite(rewrite)];
    setup(&mesh, vec![route(vec![per_try, whole])]).await;
    let mut c = client(&mesh).await;
    let r = c.get("/slow/3000").await;
    assert_eq!(r.status, 504, "{r:?}");
    assert!(
        r.headers["sluice-reason"]
            .to_str()
            .unwrap()
            .contains("backend request timeout")
    );
    let r = c.get("/slow/10").await;
    assert_eq!(r.status, 200, "under the timeout");
    let mut c = client(&mesh).await;
    let r = c.get("/whole").await;
    assert_eq!(r.status, 504);
    assert!(
        r.headers["sluice-reason"]
            .to_str()
            .unwrap()
            .contains("request timeout")
    );
    mesh.shutdown().await;
}

/// Relays each connection to `to` once `delay` has passed since it came (a
/// peer proxy slow to answer its handshakes).
async fn slow_forwarder(to: SocketAddr, delay: std::time::Duration) -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = l.accept().await {
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                let mut up = tokio::net::TcpStream::connect(to).await.unwrap();
                let _ = tokio::io::copy_bidirectional(&mut tcp, &mut up).await;
            });
        }
    });
    addr
}

/// A request given up on while its tunnel connection was being dialled
/// (its per-try timeout shorter than the peer's handshake) does not cut
/// the dial short: the connection is made and pooled, and the next
/// request finds it (each dial was cancelled in turn, and every request
/// timed out).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dial_outlives_the_request_given_up_on_while_it_ran() {
    let mesh = Mesh::standard().await;
    let (_srv, port) = servers(&[cart(0), cart(1), cart(2)]).await;
    let slow = slow_forwarder(mesh.node_b_proxy(), std::time::Duration::from_millis(1500)).await;
    let mut v1 = mesh.service("v1", 11, port, &[cart(1)]);
    v1.endpoints[0].node_proxy = Some(slow);
    let mut r = rule(vec![], vec![backend("v1", 1)]);
    r.timeouts = Timeouts {
        request_ms: None,
        backend_request_ms: Some(500),
    };
    mesh.publish(&Snapshot {
        services: vec![mesh.service("cart", 1, port, &[cart(0)]), v1],
        http_routes: vec![route(vec![r])],
        ..Default::default()
    })
    .await;
    let mut c = client(&mesh).await;
    assert_eq!(c.get("/").await.status, 504, "given up on during the dial");
    // The dial goes on, and its connection is pooled.
    eventually("the dialled connection pooled", || {
        mesh.a.proxy().tunnel_connections() == 1
    })
    .await;
    let r = c.get("/").await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.server(), "cart-1");
    mesh.shutdown().await;
}

/// A backend with no ready endpoint is not retried: the request's
/// endpoints are those of its snapshot, so each attempt would find none
/// again, after waiting out the backoff.
#[tokio::test]
async fn a_backend_without_ready_endpoints_is_not_retried() {
    let (log, _default) = capture_access_log();
    let mesh = Mesh::standard().await;
    let (_srv, port) = servers(&[cart(1)]).await;
    let mut empty = mesh.service("empty", 14, port, &[cart(1)]);
    empty.endpoints[0].ready = false;
    let mut r = rule(vec![], vec![backend("empty", 1)]);
    r.retry = Some(Retry {
        codes: vec![503],
        attempts: 3,
        backoff_ms: 500,
    });
    mesh.publish(&Snapshot {
        services: vec![mesh.service("cart", 1, port, &[cart(0)]), empty],
        http_routes: vec![route(vec![r])],
        ..Default::default()
    })
    .await;
    let (status, r) = get_and_record(&mesh, &log, "/none").await;
    assert_eq!(status, 503);
    assert_eq!(r["attempts"], 1, "{r}");
    mesh.shutdown().await;
}

/// A request that crossed the tunnel and timed out there is logged as
/// secured, with the identity it was sent to (the proxy answered it, but
/// not in plaintext and not to nobody).
#[tokio::test]
async fn a_tunnelled_request_that_times_out_is_logged_with_the_identity_it_went_to() {
    let (log, _default) = capture_access_log();
    let mesh = Mesh::standard().await;
    let mut r = rule(vec![], vec![backend("v1", 1)]);
    r.timeouts = Timeouts {
        request_ms: None,
        backend_request_ms: Some(100),
    };
    setup(&mesh, vec![route(vec![r])]).await;
    let (status, r) = get_and_record(&mesh, &log, "/slow/3000").await;
    assert_eq!(status, 504);
    assert_eq!(r["status"], 504, "{r}");
    assert_went_to(&r, Some(&cart(1)));
    mesh.shutdown().await;
}

/// A request that crossed to a node proxy that could not reach its pod
/// (gone) is logged as secured, with the identity it went to: it went over
/// mutual TLS all the same.
#[tokio::test]
async fn a_request_whose_pod_is_gone_behind_its_node_proxy_is_logged_as_secured() {
    let (log, _default) = capture_access_log();
    let mesh = Mesh::standard().await;
    let nothing = tokio::net::TcpListener::bind(std::net::SocketAddr::new(cart(1).ip, 0))
        .await
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    mesh.publish(&Snapshot {
        services: vec![mesh.service("cart", 1, nothing, &[cart(1)])],
        ..Default::default()
    })
    .await;
    let (status, r) = get_and_record(&mesh, &log, "/gone").await;
    assert_eq!(status, 503);
    assert_went_to(&r, Some(&cart(1)));
    mesh.shutdown().await;
}

/// A request that never crossed (its endpoint's node proxy could not be
/// reached) is not logged as secured, nor with an identity it never met.
#[tokio::test]
async fn a_request_whose_tunnel_never_opened_is_not_logged_as_secured() {
    let (log, _default) = capture_access_log();
    let mesh = Mesh::standard().await;
    let (_srv, port) = servers(&[cart(1)]).await;
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let mut down = mesh.service("cart", 1, port, &[cart(1)]);
    down.endpoints[0].node_proxy = Some(closed);
    mesh.publish(&Snapshot {
        services: vec![down],
        ..Default::default()
    })
    .await;
    let (status, r) = get_and_record(&mesh, &log, "/nowhere").await;
    assert!(status == 503 || status == 502, "{status}");
    assert_went_to(&r, None);
    mesh.shutdown().await;
}

/// GETs `path` from web through the cart VIP: its status, and the access
/// record of it on the caller's node (from `log`).
async fn get_and_record(
    mesh: &Mesh,
    log: &std::sync::Mutex<Vec<u8>>,
    path: &str,
) -> (http::StatusCode, serde_json::Value) {
    let status = client(mesh).await.get(path).await.status;
    let (text, records) = access_records(log);
    (
        status,
        record(&records, &text, "outbound", Some(path)).clone(),
    )
}

/// The access record `r` says the request went across the tunnel to
/// `pod`'s identity, or (`None`) never crossed.
fn assert_went_to(r: &serde_json::Value, pod: Option<&Pod>) {
    assert_eq!(r["secured"], pod.is_some(), "{r}");
    match pod {
        Some(p) => assert_eq!(r["destination_identity"], p.identity().to_string(), "{r}"),
        None => assert!(r["destination_identity"].is_null(), "{r}"),
    }
}

/// The `cart` service at `port` on pod cart-0, behind a route whose
/// requests time out after `ms`.
async fn publish_cart_with_request_timeout(mesh: &Mesh, port: u16, ms: u64) {
    let mut r = rule(vec![], vec![backend("cart", 1)]);
    r.timeouts = Timeouts {
        request_ms: Some(ms),
        backend_request_ms: None,
    };
    mesh.publish(&Snapshot {
        services: vec![mesh.service("cart", 1, port, &[cart(0)])],
        http_routes: vec![route(vec![r])],
        ..Default::default()
    })
    .await;
}

/// A workload that answers a head and the start of a 100-byte body, then
/// stalls: the route's request timeout cuts the response instead of letting
/// it hang.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_body_that_stalls_is_cut_at_the_request_timeout() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mesh = Mesh::standard().await;
    let listener = tokio::net::TcpListener::bind(SocketAddr::new(cart(0).ip, 0))
        .await
        .unwrap();
    let port = listener.local_addr().unwrap().port();
    let stalling = tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let (mut buf, mut got) = (vec![0u8; 4096], Vec::new());
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
                let head = b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\npartial";
                let _ = s.write_all(head).await;
                tokio::time::sleep(std::time::Duration::from_secs(60)).await;
            });
        }
    });
    publish_cart_with_request_timeout(&mesh, port, 300).await;
    let mut tcp = mesh.connect(web().ip, SocketAddr::new(vip(1), 80)).await;
    tcp.write_all(b"GET / HTTP/1.1\r\nhost: cart\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let read = tokio::time::timeout(
        std::time::Duration::from_secs(20),
        tcp.read_to_end(&mut answer),
    )
    .await;
    assert!(read.is_ok(), "the stalled response was not cut");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        answer.ends_with("partial"),
        "only what came in time: {answer}"
    );
    stalling.abort();
    mesh.shutdown().await;
}

/// A request the caller's side gives up on (its route's timeout resets the
/// tunnel stream) is given up on the workload's side too: the workload's
/// connection closes, rather than the far proxy waiting for an answer nobody
/// will read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_given_up_by_the_caller_is_dropped_at_the_workload() {
    use tokio::io::AsyncReadExt as _;
    let mesh = Mesh::standard().await;
    let listener = tokio::net::TcpListener::bind(SocketAddr::new(cart(0).ip, 0))
        .await
        .unwrap();
    let port = listener.local_addr().unwrap().port();
    let (closed_tx, closed_rx) = tokio::sync::oneshot::channel();
    let silent = tokio::spawn(async move {
        let Ok((mut s, _)) = listener.accept().await else {
            return;
        };
        let mut buf = vec![0u8; 4096];
        // Reads the request, never answers, and reports when the proxy
        // closes the connection.
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
        let _ = closed_tx.send(());
    });
    publish_cart_with_request_timeout(&mesh, port, 200).await;
    let mut c = client(&mesh).await;
    let r = c.get("/").await;
    assert_eq!(r.status, 504, "{r:?}");
    let closed = tokio::time::timeout(std::time::Duration::from_secs(10), closed_rx).await;
    assert!(
        matches!(closed, Ok(Ok(()))),
        "the workload's connection stayed open after the caller gave up"
    );
    silent.abort();
    mesh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attempt_that_times_out_is_retried_whatever_the_listed_codes() {
    let mesh = Mesh::standard().await;
    let mut r = rule(vec![], vec![backend("v1", 1)]);
    r.timeouts = Timeouts {
        request_ms: None,
        backend_request_ms: Some(100),
    };
    // 504 is not listed: the timeout is a connection error all the same.
    r.retry = Some(Retry {
        codes: vec![503],
        attempts: 2,
        backoff_ms: 1,
    });
    let (srv, _) = setup(&mesh, vec![route(vec![r])]).await;
    let mut c = client(&mesh).await;
    let r = c.get("/slow/3000").await;
    assert_eq!(r.status, 504, "{r:?}");
    assert_eq!(srv[1].hits(), 3, "the first try and two retries");
    // A POST that timed out may have been carried out: it is not repeated.
    let r = c
        .send(request("POST", "/slow/3000", &[], "order"))
        .await
        .unwrap();
    assert_eq!(r.status, 504, "{r:?}");
    assert_eq!(srv[1].hits(), 4, "one try of the POST");
    // Unless the route asks for 504s to be retried: then the POST's timeout
    // goes again as a workload's own 504 would.
    let mut r = rule(vec![], vec![backend("v1", 1)]);
    r.timeouts.backend_request_ms = Some(100);
    r.retry = Some(Retry {
        codes: vec![504],
        attempts: 2,
        backoff_ms: 1,
    });
    let (srv, _) = setup(&mesh, vec![route(vec![r])]).await;
    let r = c
        .send(request("POST", "/slow/3000", &[], "order"))
        .await
        .unwrap();
    assert_eq!(r.status, 504, "{r:?}");
    assert_eq!(srv[1].hits(), 3, "the POST's first try and two retries");
    mesh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirror_gets_a_copy_and_the_client_gets_the_primary_answer() {
    let mesh = Mesh::standard().await;
    let mut r = rule(vec![], vec![backend("v1", 1)]);
    // Filters apply in order: the mirror gets the request before the
    // header modifier listed after it.
    r.filters = vec![
        HttpFilter::RequestMirror(RequestMirror {
            service: ObjectRef::new("shop", "mirror"),
            port: 80,
            fraction: None,
        }),
        HttpFilter::RequestHeaderModifier(HeaderModifier {
            set: vec![],
            add: vec![HeaderPair {
                name: "x-after-mirror".into(),
                value: "yes".into(),
            }],
            remove: vec![],
        }),
    ];
    let (srv, mirror) = setup(&mesh, vec![route(vec![r])]).await;
    let mut c = client(&mesh).await;
    let reply = c
        .send(request("PUT", "/orders/1", &[], "order"))
        .await
        .unwrap();
    assert_eq!(reply.server(), "cart-1");
    eventually("the mirror received the copy", || mirror.recorded() == 1).await;
    let seen = mirror.seen.lock().unwrap()[0].clone();
    assert_eq!(seen["method"], "PUT");
    assert_eq!(seen["path"], "/orders/1");
    assert_eq!(seen["body"], "order");
    assert!(seen["headers"].get("x-after-mirror").is_none(), "{seen}");
    assert_eq!(srv[1].hits(), 1);
    let primary = srv[1].seen.lock().unwrap()[0].clone();
    assert_eq!(primary["headers"]["x-after-mirror"], "yes");
    // The caller's row shows its own request, to cart, not the proxy's
    // copy to the mirror (another identity).
    let row = mesh
        .a
        .proxy()
        .connections()
        .into_iter()
        .find(|r| r.kind == l7_proxy::conntable::ConnKind::OutboundHttp)
        .expect("the captured connection's row");
    assert_ne!(mirror_pod().identity(), cart(1).identity());
    assert_eq!(
        row.meta.destination_identity,
        Some(cart(1).identity()),
        "{row:?}"
    );
    mesh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_backend_keeps_its_share_and_answers_500_with_the_reason() {
    let mesh = Mesh::standard().await;
    let mut refused = backend("v2", 1);
    refused.invalid = Some("BackendNotFound: Service shop/v2 has no port 81".into());
    let (srv, _mirror) = setup(
        &mesh,
        vec![route(vec![rule(vec![], vec![backend("v1", 1), refused])])],
    )
    .await;
    let mut c = client(&mesh).await;
    let (mut ok, mut refused) = (0, 0);
    for _ in 0..200 {
        let r = c.get("/x").await;
        match r.status.as_u16() {
            200 => ok += 1,
            500 => {
                let why = r.headers["sluice-reason"].to_str().unwrap();
                assert!(
                    why.contains("BackendNotFound: Service shop/v2 has no port 81"),
                    "{why}"
                );
                refused += 1;
            }
            s => panic!("unexpected status {s}"),
        }
    }
    assert_eq!(ok + refused, 200);
    // Binomial(200, 1/2): mean 100, standard deviation 7.1.
    assert!((60..=140).contains(&refused), "{refused} of 200 refused");
    assert_eq!(srv[2].hits(), 0, "v2 (cart-2) is never reached");
    mesh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mirror_fraction_copies_that_share_of_requests() {
    let mesh = Mesh::standard().await;
    let mut r = rule(vec![], vec![backend("v1", 1)]);
    r.filters = vec![HttpFilter::RequestMirror(RequestMirror {
        service: ObjectRef::new("shop", "mirror"),
        port: 80,
        fraction: Some(Fraction {
            numerator: 1,
            denominator: 4,
        }),
    })];
    let (srv, mirror) = setup(&mesh, vec![route(vec![r])]).await;
    let mut c = client(&mesh).await;
    for _ in 0..400 {
        assert_eq!(c.get("/x").await.status, 200);
    }
    assert_eq!(srv[1].hits(), 400, "every request reaches the primary");
    // Mirrors are sent in the background: wait until they settle.
    let mut last = usize::MAX;
    while last != mirror.hits() {
        last = mirror.hits();
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    // Binomial(400, 1/4): mean 100, standard deviation 8.7.
    assert!((55..=145).contains(&last), "{last} of 400 mirrored");
    mesh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_routes_match_service_and_method() {
    let mesh = Mesh::standard().await;
    let (_srv, port) = servers(&[cart(0), cart(1), cart(2)]).await;
    let mut parent = mesh.service("cart", 1, port, &[cart(0)]);
    parent.ports[0].app_protocol = Some("grpc".into());
    let g = GrpcRoute {
        id: ObjectRef::new("shop", "grpc"),
        created_unix: 0,
        parents: vec![ParentRef {
            service: ObjectRef::new("shop", "cart"),
            port: None,
        }],
        rules: vec![
            GrpcRouteRule {
                matches: vec![GrpcRouteMatch {
                    method: Some(GrpcMethodMatch {
                        kind: ValueMatchKind::Exact,
                        service: Some("shop.Cart".into()),
                        method: Some("Add".into()),
                    }),
                    headers: vec![],
                }],
                backends: vec![backend("v1", 1)],
                ..Default::default()
            },
            GrpcRouteRule {
                matches: vec![GrpcRouteMatch {
                    method: None,
                    headers: vec![ValueMatch {
                        kind: ValueMatchKind::Exact,
                        name: "x-tenant".into(),
                        value: "gold".into(),
                    }],
                }],
                backends: vec![backend("v2", 1)],
                ..Default::default()
            },
            GrpcRouteRule {
                backends: vec![backend("v0", 1)],
                ..Default::default()
            },
        ],
    };
    mesh.publish(&Snapshot {
        services: vec![
            parent,
            mesh.service("v0", 10, port, &[cart(0)]),
            mesh.service("v1", 11, port, &[cart(1)]),
            mesh.service("v2", 12, port, &[cart(2)]),
        ],
        grpc_routes: vec![g],
        ..Default::default()
    })
    .await;
    let mut c = mesh.http2(web().ip, SocketAddr::new(vip(1), 80)).await;
    let mut call = async |path: &str, tenant: &str| {
        let r = c
            .send(grpc_call(path, &[("x-tenant", tenant)]))
            .await
            .unwrap();
        r.trailers.expect("trailers")["x-served-by"]
            .to_str()
            .unwrap()
            .to_string()
    };
    assert_eq!(call("/shop.Cart/Add", "").await, "cart-1");
    assert_eq!(call("/shop.Cart/Remove", "gold").await, "cart-2");
    assert_eq!(call("/shop.Cart/Remove", "silver").await, "cart-0");
    mesh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_on_one_connection_are_balanced_across_endpoints() {
    let mesh = Mesh::standard().await;
    // No routes: the service itself, three ready endpoints and one not ready.
    let (srv, port) = servers(&[cart(0), cart(1), cart(2)]).await;
    let mut svc = mesh.service("cart", 1, port, &[cart(0), cart(1), cart(2)]);
    svc.endpoints[2].ready = false;
    mesh.publish(&Snapshot {
        services: vec![svc],
        ..Default::default()
    })
    .await;
    let mut c = client(&mesh).await;
    for _ in 0..200 {
        assert_eq!(c.get("/").await.status, 200);
    }
    assert!(
        srv[0].hits() > 0 && srv[1].hits() > 0,
        "both ready endpoints served: {} / {}",
        srv[0].hits(),
        srv[1].hits()
    );
    assert_eq!(srv[0].hits() + srv[1].hits(), 200);
    assert_eq!(srv[2].hits(), 0, "a not-ready endpoint gets no request");
    mesh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connect_request_is_refused_not_tunnelled() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mesh = Mesh::standard().await;
    let (srv, _) = setup(
        &mesh,
        vec![route(vec![rule(vec![], vec![backend("v1", 1)])])],
    )
    .await;
    // On an HTTP/1.1 connection (its first request made it one), a CONNECT
    // to the routed Service naming another pod's port: it would reach the
    // peer proxy as an opaque stream to that address.
    let mut tcp = mesh.connect(web().ip, SocketAddr::new(vip(1), 80)).await;
    let read_head = async |tcp: &mut tokio::net::TcpStream| {
        let mut buf = vec![0u8; 4096];
        let n = tokio::time::timeout(std::time::Duration::from_secs(10), tcp.read(&mut buf))
            .await
            .expect("an answer")
            .unwrap();
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    tcp.write_all(b"GET / HTTP/1.1\r\nhost: cart\r\n\r\n")
        .await
        .unwrap();
    let head = read_head(&mut tcp).await;
    assert!(head.contains("x-server: cart-1"), "{head}");
    let target = format!("{}:{}", cart(2).ip, 9);
    tcp.write_all(format!("CONNECT {target} HTTP/1.1\r\nhost: {target}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let head = read_head(&mut tcp).await;
    assert!(head.starts_with("HTTP/1.1 405"), "{head}");
    assert_eq!(srv[2].hits(), 0);
    assert_eq!(srv[1].hits(), 1);
    mesh.shutdown().await;
}

/// A POST from web to cart whose body stops after 10 of its 100 bytes: the
/// head of the answer it gets while it holds the upload (and the
/// connection, kept open).
async fn stalled_upload(mesh: &Mesh) -> (String, tokio::net::TcpStream) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut tcp = mesh.connect(web().ip, SocketAddr::new(vip(1), 80)).await;
    tcp.write_all(b"POST /upload HTTP/1.1\r\nhost: cart\r\ncontent-length: 100\r\n\r\n0123456789")
        .await
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(std::time::Duration::from_secs(10), tcp.read(&mut buf))
        .await
        .expect("an answer while the client still holds its upload")
        .unwrap();
    (String::from_utf8_lossy(&buf[..n]).into_owned(), tcp)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_body_that_stops_coming_is_cut() {
    let mesh = mesh_with_idle_timeout_300ms().await;
    // With retries the body streams to the first try while it is kept for
    // the next: the workload has the request at once, and the caller the
    // 408 that says why it ended.
    let r = retried_on_503("v1", 1);
    let (srv, _) = setup(&mesh, vec![route(vec![r])]).await;
    let (head, _tcp) = stalled_upload(&mesh).await;
    assert!(head.starts_with("HTTP/1.1 408"), "{head}");
    assert!(head.contains("sent nothing for"), "{head}");
    assert_eq!(srv[1].hits(), 1, "the head went on at once");
    mesh.shutdown().await;
}

/// Without retries or mirrors the body is sent once, as it comes; when it
/// stops coming, the caller hears 408 for its own upload, not a 502 that
/// blames the workload (and its endpoint in the balancer).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_body_sent_once_that_stops_coming_is_a_408() {
    let mesh = one_route_with_idle_timeout_300ms().await;
    let (head, _tcp) = stalled_upload(&mesh).await;
    assert!(head.starts_with("HTTP/1.1 408"), "{head}");
    assert!(head.contains("reading the request body"), "{head}");
    mesh.shutdown().await;
}

/// GEP-1731 retries for an upload the workload answered before taking it
/// (load shedding): the next attempt gets what was read, then the rest. The
/// caller sends the rest only once the retry has reached the workload, so
/// the answer surely came before the body's end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_answered_503_before_its_end_is_retried_whole() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mesh = Mesh::standard().await;
    let r = retried_on_503("v1", 1);
    let (srv, _) = setup(&mesh, vec![route(vec![r])]).await;
    let first: String = "a".repeat(30_000);
    let rest: String = "b".repeat(70_000);
    let mut tcp = mesh.connect(web().ip, SocketAddr::new(vip(1), 80)).await;
    tcp.write_all(
        format!("POST /early/1 HTTP/1.1\r\nhost: cart\r\ncontent-length: 100000\r\n\r\n{first}")
            .as_bytes(),
    )
    .await
    .unwrap();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    while srv[1].hits() < 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no retry reached the workload while the upload was open ({} requests)",
            srv[1].hits()
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    tcp.write_all(rest.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    let head_end = loop {
        let n = tokio::time::timeout(std::time::Duration::from_secs(10), tcp.read(&mut buf))
            .await
            .expect("an answer")
            .unwrap();
        assert!(n > 0, "closed: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
        if let Some(i) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
    };
    let head = String::from_utf8_lossy(&got[..head_end]).to_string();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let seen = srv[1].seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 1, "the 503 read nothing, the retry all");
    let body = seen[0]["body"].as_str().unwrap();
    assert_eq!(body.len(), 100_000);
    assert_eq!(body, format!("{first}{rest}"), "in order, nothing twice");

    // The same from an HTTP/2 caller, its body of no declared length.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<
        Result<hyper::body::Frame<bytes::Bytes>, std::convert::Infallible>,
    >(4);
    let body =
        http_body_util::StreamBody::new(futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx)));
    let mut send = mesh.http2_raw(web().ip, SocketAddr::new(vip(1), 80)).await;
    // The third request to `/early/3` on this server is its first answered.
    let req = http::Request::post("http://cart/early/3")
        .body(body)
        .unwrap();
    let answer = tokio::spawn(async move { send.send_request(req).await });
    let frame = |s: &str| Ok(hyper::body::Frame::data(bytes::Bytes::from(s.to_string())));
    tx.send(frame(&first)).await.unwrap();
    while srv[1].hits() < 4 {
        assert!(
            tokio::time::Instant::now() < deadline + std::time::Duration::from_secs(10),
            "no retry of the HTTP/2 upload ({} requests)",
            srv[1].hits()
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    tx.send(frame(&rest)).await.unwrap();
    drop(tx);
    let resp = tokio::time::timeout(std::time::Duration::from_secs(10), answer)
        .await
        .expect("an answer")
        .unwrap()
        .unwrap();
    assert_eq!(resp.status(), 200);
    let seen = srv[1].seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert_eq!(
        seen[1]["body"].as_str().unwrap(),
        format!("{first}{rest}"),
        "in order, nothing twice"
    );
    mesh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_shows_secured_only_while_none_of_its_requests_went_in_plaintext() {
    let mesh = Mesh::standard().await;
    let (_srv, port) = servers(&[cart(0), cart(1)]).await;
    // `/legacy` goes to v1, outside the mesh; the rest to v0, in it.
    let mut v1 = mesh.service("v1", 11, port, &[cart(1)]);
    v1.endpoints[0].node_proxy = None;
    v1.endpoints[0].identity = None;
    mesh.publish(&Snapshot {
        services: vec![
            mesh.service("cart", 1, port, &[cart(0)]),
            mesh.service("v0", 10, port, &[cart(0)]),
            v1,
        ],
        http_routes: vec![route(vec![
            rule(
                vec![HttpRouteMatch {
                    path: Some(PathMatch::PathPrefix("/legacy".into())),
                    ..Default::default()
                }],
                vec![backend("v1", 1)],
            ),
            rule(vec![], vec![backend("v0", 1)]),
        ])],
        ..Default::default()
    })
    .await;
    let row = |mesh: &Mesh| {
        let rows = mesh.a.proxy().connections();
        rows.into_iter()
            .find(|r| r.kind == l7_proxy::conntable::ConnKind::OutboundHttp)
            .expect("the captured connection's row")
    };
    let mut c = client(&mesh).await;
    assert_eq!(c.get("/").await.echo()["server"], "cart-0");
    let r = row(&mesh);
    assert!(r.secured, "{r:?}");
    assert_eq!(r.meta.destination_identity, Some(cart(0).identity()));
    // With the TLS facts of the tunnel connection its requests took: the
    // same as that connection's own row.
    let tls = r.meta.tls.clone().expect("TLS facts on the HTTP row");
    assert_eq!(tls.version, "TLSv1.3");
    let tunnel = mesh
        .a
        .proxy()
        .connections()
        .into_iter()
        .find(|r| r.kind == l7_proxy::conntable::ConnKind::TunnelOut)
        .expect("the tunnel's row");
    assert_eq!(Some(&tls), tunnel.meta.tls.as_ref());
    // One request in plaintext, and the connection no longer shows as
    // secured (its Service's endpoints are all in the mesh), nor TLS facts.
    assert_eq!(c.get("/legacy").await.echo()["server"], "cart-1");
    let r = row(&mesh);
    assert!(!r.secured, "{r:?}");
    assert_eq!(r.meta.tls, None, "{r:?}");
    // A later tunnelled request does not bring them back.
    assert_eq!(c.get("/").await.echo()["server"], "cart-0");
    assert_eq!(row(&mesh).meta.tls, None);
    mesh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workload_outside_the_mesh_keeps_its_connection_fields_to_itself() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mesh = Mesh::standard().await;
    // A plain HTTP/1.1 server outside the mesh that closes every connection
    // and names a field of its own as hop-by-hop.
    let listener = tokio::net::TcpListener::bind((cart(1).ip, 0))
        .await
        .unwrap();
    let port = listener.local_addr().unwrap().port();
    let served = tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            let mut buf = vec![0u8; 4096];
            let mut got = Vec::new();
            while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = tcp.read(&mut buf).await.unwrap();
                if n == 0 {
                    break;
                }
                got.extend_from_slice(&buf[..n]);
            }
            let _ = tcp
                .write_all(
                    b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close, x-hop\r\n\
                      x-hop: private\r\nkeep-alive: timeout=5\r\nx-kept: yes\r\n\r\nok",
                )
                .await;
        }
    });
    let mut legacy = mesh.service("legacy", 5, port, &[cart(1)]);
    legacy.endpoints[0].node_proxy = None;
    legacy.endpoints[0].identity = None;
    mesh.publish(&Snapshot {
        services: vec![legacy],
        ..Default::default()
    })
    .await;
    let mut c = mesh.http1(web().ip, SocketAddr::new(vip(5), 80)).await;
    // Two requests on the caller's one connection: the workload's close
    // was its own connection's, not the caller's.
    for _ in 0..2 {
        let r = c.get("/").await;
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(r.body, "ok");
        assert_eq!(r.headers["x-kept"], "yes");
        for name in ["connection", "x-hop", "keep-alive"] {
            assert!(
                !r.headers.contains_key(name),
                "{name} reached the caller: {r:?}"
            );
        }
    }
    served.abort();
    mesh.shutdown().await;
}

/// A workload that answers at once and sends each piece of the request body
/// back as it arrives (a bidirectional stream).
async fn stream_echo(addr: SocketAddr) -> tokio::task::JoinHandle<()> {
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    |req: http::Request<hyper::body::Incoming>| async move {
                        use futures_util::StreamExt as _;
                        let echoed = http_body_util::BodyStream::new(req.into_body()).filter_map(
                            |f| async move {
                                let data = f.ok()?.into_data().ok()?;
                                Some(Ok::<_, std::convert::Infallible>(hyper::body::Frame::data(
                                    data,
                                )))
                            },
                        );
                        Ok::<_, std::convert::Infallible>(http::Response::new(
                            http_body_util::StreamBody::new(echoed),
                        ))
                    },
                );
                let _ = hyper_util::server::conn::auto::Builder::new(
                    hyper_util::rt::TokioExecutor::new(),
                )
                .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                .await;
            });
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streaming_request_flows_through_a_rule_with_retries_and_a_mirror() {
    use http_body_util::BodyExt as _;
    let mesh = Mesh::standard().await;
    let port = tokio::net::TcpListener::bind((cart(1).ip, 0))
        .await
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let streamer = stream_echo(SocketAddr::new(cart(1).ip, port)).await;
    let mirror = EchoServer::start("mirror", SocketAddr::new(mirror_pod().ip, port)).await;
    let mut r = retried_on_503("cart", 2);
    r.filters = vec![HttpFilter::RequestMirror(RequestMirror {
        service: ObjectRef::new("shop", "mirror"),
        port: 80,
        fraction: None,
    })];
    mesh.publish(&Snapshot {
        services: vec![
            mesh.service("cart", 1, port, &[cart(1)]),
            mesh.service("mirror", 13, port, &[mirror_pod()]),
        ],
        http_routes: vec![route(vec![r])],
        ..Default::default()
    })
    .await;
    let mut send = mesh.http2_raw(web().ip, SocketAddr::new(vip(1), 80)).await;
    let (tx, mut rx) = tokio::sync::mpsc::channel::<bytes::Bytes>(4);
    let body = http_body_util::StreamBody::new(futures_util::stream::poll_fn(move |cx| {
        rx.poll_recv(cx)
            .map(|d| d.map(|d| Ok::<_, std::convert::Infallible>(hyper::body::Frame::data(d))))
    }));
    let req = http::Request::post("http://cart/chat").body(body).unwrap();
    tx.send(bytes::Bytes::from_static(b"hello ")).await.unwrap();
    // The answer and the first echo come while the request is still open:
    // nothing waits for the whole body.
    let wait = std::time::Duration::from_secs(10);
    let resp = tokio::time::timeout(wait, send.send_request(req))
        .await
        .expect("the answer's head while the request streams")
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut answer = resp.into_body();
    let first = tokio::time::timeout(wait, answer.frame())
        .await
        .expect("the first echo while the request streams")
        .unwrap()
        .unwrap();
    assert_eq!(first.into_data().unwrap(), "hello ");
    assert_eq!(mirror.hits(), 0, "the mirror waits for the whole body");
    tx.send(bytes::Bytes::from_static(b"world")).await.unwrap();
    drop(tx);
    let rest = answer.collect().await.unwrap().to_bytes();
    assert_eq!(rest, "world");
    // The mirror gets the whole body once it has ended.
    eventually("the mirror received the copy", || mirror.recorded() == 1).await;
    assert_eq!(mirror.seen.lock().unwrap()[0]["body"], "hello world");
    streamer.abort();
    mesh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxys_own_refusals_of_a_grpc_call_carry_a_grpc_status() {
    let mesh = Mesh::standard().await;
    let (srv, port) = servers(&[cart(0), cart(1)]).await;
    let rule = |method: &str, backend_name: &str, timeout_ms: Option<u64>| GrpcRouteRule {
        matches: vec![GrpcRouteMatch {
            method: Some(GrpcMethodMatch {
                kind: ValueMatchKind::Exact,
                service: Some("slow".into()),
                method: Some(method.into()),
            }),
            headers: vec![],
        }],
        backends: vec![backend(backend_name, 1)],
        timeouts: Timeouts {
            request_ms: timeout_ms,
            backend_request_ms: None,
        },
        ..Default::default()
    };
    let mut empty = mesh.service("empty", 14, port, &[cart(1)]);
    empty.endpoints[0].ready = false;
    mesh.publish(&Snapshot {
        services: vec![
            mesh.service("cart", 1, port, &[cart(0)]),
            mesh.service("v0", 10, port, &[cart(0)]),
            empty,
        ],
        grpc_routes: vec![GrpcRoute {
            id: ObjectRef::new("shop", "grpc"),
            created_unix: 0,
            parents: vec![ParentRef {
                service: ObjectRef::new("shop", "cart"),
                port: None,
            }],
            rules: vec![
                rule("3000", "v0", Some(100)),
                rule("0", "empty", None),
                rule("1", "v0", None),
                // Backends a call cannot go to: UNAVAILABLE, as the
                // GRPCRoute spec asks (INTERNAL is an HTTPRoute's 500).
                rule("gone", "nowhere", None),
                {
                    let mut r = rule("refused", "v0", None);
                    r.backends[0].invalid = Some("InvalidKind".into());
                    r
                },
            ],
        }],
        ..Default::default()
    })
    .await;
    let mut c = mesh.http2(web().ip, SocketAddr::new(vip(1), 80)).await;
    let mut call = async |path: &str| c.send(grpc_call(path, &[])).await.unwrap();
    // (path, grpc-status, words of the message)
    let cases = [
        ("/slow/3000", "4", "request timeout of 100ms exceeded"),
        ("/slow/0", "14", "no ready endpoint"),
        ("/other/Call", "12", "no route of service shop/cart matches"),
        ("/slow/gone", "14", "which does not exist"),
        ("/slow/refused", "14", "InvalidKind"),
    ];
    for (path, code, words) in cases {
        let r = call(path).await;
        assert_eq!(r.status, 200, "{path}: {r:?}");
        assert_eq!(r.headers["content-type"], "application/grpc", "{path}");
        assert_eq!(r.headers["grpc-status"], code, "{path}: {r:?}");
        let message = r.headers["grpc-message"].to_str().unwrap();
        assert!(message.contains(words), "{path}: {message}");
        assert!(r.headers.contains_key("sluice-reason"), "{path}");
        assert!(r.body.is_empty(), "{path}: trailers-only");
    }
    // A workload's own answer is untouched.
    let r = call("/slow/1").await;
    assert_eq!(r.trailers.expect("trailers")["grpc-status"], "0");
    assert_eq!(srv[0].hits(), 2, "the timed-out call and the last one");
    mesh.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_with_a_body_goes_to_another_endpoint_when_the_first_cannot_be_reached() {
    let mesh = Mesh::standard().await;
    let (srv, port) = servers(&[cart(0), cart(1)]).await;
    // Seven endpoints whose node proxy is gone (nothing listens where it
    // was), and cart-1. Endpoints not measured yet are preferred, so most
    // requests try one of the unreachable ones first.
    let gone = std::net::TcpListener::bind((mesh.node_b_proxy().ip(), 0))
        .unwrap()
        .local_addr()
        .unwrap();
    let mut svc = mesh.service("cart", 1, port, &[cart(1)]);
    for n in 2..9 {
        let mut e = mesh.endpoint_b(&cart(n));
        e.node_proxy = Some(gone);
        svc.endpoints.push(e);
    }
    let mut r = rule(vec![], vec![backend("cart", 1)]);
    r.retry = Some(Retry {
        codes: vec![503],
        // Two of the eight are drawn for each try and the cheaper one goes:
        // once every unreachable one has failed, a try reaches cart-1 with a
        // chance of 1 in 4. Enough tries that none runs out.
        attempts: 60,
        backoff_ms: 0,
    });
    mesh.publish(&Snapshot {
        services: vec![svc],
        http_routes: vec![route(vec![r])],
        ..Default::default()
    })
    .await;
    let mut c = client(&mesh).await;
    // Each try that finds no one goes again, with its body.
    for i in 0..16 {
        let body = format!("order {i}");
        let r = c
            .send(request("POST", "/orders", &[], &body))
            .await
            .unwrap();
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(r.server(), "cart-1");
        assert_eq!(r.echo()["body"], body.as_str());
    }
    assert_eq!(srv[1].hits(), 16);
    mesh.shutdown().await;
}

/// A workload that refuses connections behind a live node proxy: the peer
/// proxy says nothing reached it, so a request is retried elsewhere under a
/// retry stanza (a POST too) and the endpoint is avoided afterwards, as when
/// a workload reached directly refuses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workload_refusing_behind_its_node_proxy_is_retried_elsewhere_and_avoided() {
    let mesh = Mesh::standard().await;
    // cart-2 is a local workload of node B, but nothing listens on the port.
    let (srv, port) = servers(&[cart(0), cart(1)]).await;
    let svc = mesh.service("cart", 1, port, &[cart(1), cart(2)]);
    let mut r = rule(vec![], vec![backend("cart", 1)]);
    r.retry = Some(Retry {
        codes: vec![],
        attempts: 1,
        backoff_ms: 0,
    });
    let plain = rule(
        vec![HttpRouteMatch {
            path: Some(PathMatch::PathPrefix("/plain".into())),
            ..Default::default()
        }],
        vec![backend("cart", 1)],
    );
    mesh.publish(&Snapshot {
        services: vec![svc],
        http_routes: vec![route(vec![r, plain])],
        ..Default::default()
    })
    .await;
    let mut c = client(&mesh).await;
    // POSTs without a body: one with a body is retried only once the
    // caller's body is all in, which may come after the peer's quick 503
    // (a known limit, see the README's retries), and the test would race.
    for i in 0..12 {
        let r = c
            .send(request("POST", &format!("/orders/{i}"), &[], ""))
            .await
            .unwrap();
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(r.server(), "cart-1");
        assert_eq!(r.echo()["path"], format!("/orders/{i}"));
        assert!(!r.headers.contains_key("sluice-unreachable"), "{r:?}");
    }
    assert_eq!(srv[1].hits(), 12);
    // Without retries, the caller reads 503 with the reason while cart-2
    // is avoided for a while: at most the first try lands there.
    let mut refused = 0;
    for _ in 0..8 {
        let r = c.get("/plain").await;
        if r.status != 200 {
            assert_eq!(r.status, 503, "{r:?}");
            assert!(
                r.headers["sluice-reason"]
                    .to_str()
                    .unwrap()
                    .contains("could not reach"),
                "{r:?}"
            );
            assert!(!r.headers.contains_key("sluice-unreachable"), "{r:?}");
            refused += 1;
        }
    }
    assert!(refused <= 1, "cart-2 kept being picked: {refused} of 8");
    mesh.shutdown().await;
}

/// The same for gRPC, whose refusal the workload's node answers in gRPC's
/// own form (`200`, `grpc-status: 14`): the caller's node still reads it as
/// "not reached" and retries it elsewhere, instead of taking it for a fast,
/// healthy answer (which reached the caller, marker and all).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_call_refused_behind_its_node_proxy_is_retried_elsewhere() {
    let mesh = Mesh::standard().await;
    let (srv, port) = servers(&[cart(0), cart(1)]).await;
    let svc = mesh.service("cart", 1, port, &[cart(1), cart(2)]);
    let mut r = rule(vec![], vec![backend("cart", 1)]);
    r.retry = Some(Retry {
        codes: vec![],
        attempts: 1,
        backoff_ms: 0,
    });
    mesh.publish(&Snapshot {
        services: vec![svc],
        http_routes: vec![route(vec![r])],
        ..Default::default()
    })
    .await;
    let mut c = client(&mesh).await;
    for i in 0..12 {
        let r = c
            .send(request(
                "POST",
                &format!("/shop.Cart/Add{i}"),
                &[("content-type", "application/grpc")],
                "",
            ))
            .await
            .unwrap();
        assert_eq!(r.status, 200, "{r:?}");
        assert!(!r.headers.contains_key("grpc-status"), "{r:?}");
        // The test server's gRPC answer: one message naming it.
        assert!(r.body.ends_with("cart-1:"), "{r:?}");
    }
    assert_eq!(srv[1].hits(), 12);
    mesh.shutdown().await;
}

/// Mirrors in flight are bounded (`max_mirrors_in_flight`): a mirror
/// target that never answers holds that many, the next mirrors are dropped
/// and counted, and the primary requests are served all along.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirrors_in_flight_are_bounded_and_the_primary_goes_on() {
    let mesh = Mesh::with_settings(
        vec![web(), bot()],
        vec![cart(0), cart(1), cart(2), mirror_pod()],
        &|s| s.max_mirrors_in_flight = 2,
    )
    .await;
    let (srv, port) = servers(&[cart(1)]).await;
    // The mirror target takes connections and never answers.
    let hang = tokio::net::TcpListener::bind(SocketAddr::new(mirror_pod().ip, 0))
        .await
        .unwrap();
    let hang_port = hang.local_addr().unwrap().port();
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = accepted.clone();
    let holder = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = hang.accept().await {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            held.push(s);
        }
    });
    let mut r = rule(vec![], vec![backend("v1", 1)]);
    r.filters = vec![HttpFilter::RequestMirror(RequestMirror {
        service: ObjectRef::new("shop", "mirror"),
        port: 80,
        fraction: None,
    })];
    mesh.publish(&Snapshot {
        services: vec![
            mesh.service("cart", 1, port, &[cart(1)]),
            mesh.service("v1", 11, port, &[cart(1)]),
            mesh.service("mirror", 13, hang_port, &[mirror_pod()]),
        ],
        http_routes: vec![route(vec![r])],
        ..Default::default()
    })
    .await;
    let mut c = client(&mesh).await;
    for _ in 0..5 {
        let reply = c.get("/x").await;
        assert_eq!(reply.status, 200, "{reply:?}");
        assert_eq!(reply.server(), "cart-0");
    }
    assert_eq!(srv[0].hits(), 5);
    let held = || accepted.load(std::sync::atomic::Ordering::SeqCst);
    eventually("two mirrors held at the target", || held() == 2).await;
    assert_eq!(mesh.a.metric("sluice_mirrors_dropped_total", &[]), 3.0);
    assert_eq!(held(), 2, "a dropped mirror was sent after all");
    holder.abort();
    mesh.shutdown().await;
}

/// A mirror waiting for an answer that never comes does not hold the
/// buffer budget its body had once the body has gone: with two such
/// mirrors taking the whole budget (for their 30 s), every other body
/// went unbuffered and was never retried.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirrors_waiting_for_an_answer_give_their_buffer_budget_back() {
    let mesh = Mesh::with_settings(
        vec![web(), bot()],
        vec![cart(0), cart(1), cart(2), mirror_pod()],
        &|s| {
            s.max_buffered_body_bytes = 4096;
            s.max_buffered_total_bytes = 2048;
        },
    )
    .await;
    let (srv, port) = servers(&[cart(1)]).await;
    // The mirror target takes connections, reads, and never answers.
    let hang = tokio::net::TcpListener::bind(SocketAddr::new(mirror_pod().ip, 0))
        .await
        .unwrap();
    let hang_port = hang.local_addr().unwrap().port();
    let read = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = read.clone();
    let holder = tokio::spawn(async move {
        while let Ok((mut s, _)) = hang.accept().await {
            let counter = counter.clone();
            tokio::spawn(async move {
                use tokio::io::AsyncReadExt as _;
                let mut buf = [0u8; 4096];
                while let Ok(n @ 1..) = s.read(&mut buf).await {
                    counter.fetch_add(n, std::sync::atomic::Ordering::SeqCst);
                }
                std::future::pending::<()>().await;
            });
        }
    });
    let mut mirrored = rule(
        vec![HttpRouteMatch {
            path: Some(PathMatch::PathPrefix("/m".into())),
            ..Default::default()
        }],
        vec![backend("v1", 1)],
    );
    mirrored.filters = vec![HttpFilter::RequestMirror(RequestMirror {
        service: ObjectRef::new("shop", "mirror"),
        port: 80,
        fraction: None,
    })];
    mesh.publish(&Snapshot {
        services: vec![
            mesh.service("cart", 1, port, &[cart(1)]),
            mesh.service("v1", 11, port, &[cart(1)]),
            mesh.service("mirror", 13, hang_port, &[mirror_pod()]),
        ],
        http_routes: vec![route(vec![mirrored, retried_on_503("v1", 2)])],
        ..Default::default()
    })
    .await;
    let mut c = client(&mesh).await;
    let body = "s".repeat(1000);
    for _ in 0..2 {
        let r = c.send(request("POST", "/m", &[], &body)).await.unwrap();
        assert_eq!(r.status, 200, "{r:?}");
    }
    // The mirrors' bodies have gone (the target read both).
    eventually("the mirrors' bodies at the target", || {
        read.load(std::sync::atomic::Ordering::SeqCst) >= 2000
    })
    .await;
    srv[0].seen.lock().unwrap().clear();
    let r = c
        .send(request("POST", "/status/503", &[], &body))
        .await
        .unwrap();
    assert_eq!(r.status, 503);
    assert_eq!(srv[0].seen.lock().unwrap().len(), 3, "buffered and retried");
    holder.abort();
    mesh.shutdown().await;
}

/// A server that answers at once and then sends a chunk every 50 ms,
/// twenty in all, whatever the request body does (a gRPC server stream).
async fn ticker(addr: SocketAddr) -> tokio::task::JoinHandle<()> {
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    |_req: http::Request<hyper::body::Incoming>| async move {
                        let ticks = futures_util::stream::unfold(0u8, |n| async move {
                            if n == 20 {
                                return None;
                            }
                            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                            let f = hyper::body::Frame::data(bytes::Bytes::from(vec![b'a' + n]));
                            Some((Ok::<_, std::convert::Infallible>(f), n + 1))
                        });
                        Ok::<_, std::convert::Infallible>(http::Response::new(
                            http_body_util::StreamBody::new(ticks),
                        ))
                    },
                );
                let _ =
                    hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                        .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                        .await;
            });
        }
    })
}

/// A streaming call whose client sends one message and then only listens
/// is not cut by the exchange idle timeout while the server's
/// messages flow: nothing is idle.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiet_request_is_not_idle_while_its_response_streams() {
    use http_body_util::BodyExt as _;
    let mesh = Mesh::with_settings(
        vec![web(), bot()],
        vec![cart(0), cart(1), cart(2), mirror_pod()],
        &|s| s.exchange_idle_timeout_ms = 400,
    )
    .await;
    let probe = std::net::TcpListener::bind((cart(0).ip, 0)).unwrap();
    let port = probe.local_addr().unwrap().port();
    drop(probe);
    let _server = ticker(SocketAddr::new(cart(0).ip, port)).await;
    mesh.publish(&Snapshot {
        services: vec![mesh.service("cart", 1, port, &[cart(0)])],
        ..Default::default()
    })
    .await;
    let mut send = mesh.http2_raw(web().ip, SocketAddr::new(vip(1), 80)).await;
    // One message, then nothing until the answer has ended.
    let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
    let first = futures_util::stream::once(async {
        Ok::<_, std::convert::Infallible>(hyper::body::Frame::data(bytes::Bytes::from_static(
            b"subscribe",
        )))
    });
    let rest = futures_util::stream::once(async move {
        let _ = done_rx.await;
        Ok::<_, std::convert::Infallible>(hyper::body::Frame::data(bytes::Bytes::new()))
    });
    let body =
        http_body_util::StreamBody::new(Box::pin(futures_util::StreamExt::chain(first, rest)));
    let req = http::Request::post("http://cart/watch").body(body).unwrap();
    let resp = send.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let got = resp
        .into_body()
        .collect()
        .await
        .expect("the whole stream")
        .to_bytes();
    assert_eq!(
        &got[..],
        b"abcdefghijklmnopqrst",
        "a second of messages, none cut"
    );
    let _ = done_tx.send(());
    mesh.shutdown().await;
}

/// A path with dot segments is routed, and sent, as what the workload will
/// read it as: `/api/../admin` is `/admin`, not under the `/api` rule.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_path_is_routed_as_its_dot_segments_resolve() {
    let mesh = Mesh::standard().await;
    let api = rule(
        vec![HttpRouteMatch {
            path: Some(PathMatch::PathPrefix("/api".into())),
            ..Default::default()
        }],
        vec![backend("v1", 1)],
    );
    let rest = rule(vec![], vec![backend("v0", 1)]);
    let (srv, _) = setup(&mesh, vec![route(vec![api, rest])]).await;
    let mut c = client(&mesh).await;
    for (path, server, seen) in [
        ("/api/../admin", "cart-0", "/admin"),
        ("/api/%2e%2e/admin?x=1", "cart-0", "/admin?x=1"),
        ("/other/../api/items", "cart-1", "/api/items"),
        ("/api/v1.2/items", "cart-1", "/api/v1.2/items"),
    ] {
        let r = c.get(path).await;
        assert_eq!(r.status, 200, "{path}: {r:?}");
        assert_eq!(r.server(), server, "{path}");
        assert_eq!(r.echo()["path"], seen, "{path}");
    }
    assert_eq!(srv[0].hits() + srv[1].hits(), 4);
    // Dot segments some servers resolve and others do not: refused.
    for path in ["/api/..;/admin", "/api/..%2fadmin", "/api/..%5cadmin"] {
        let r = c.get(path).await;
        assert_eq!(r.status, 400, "{path}: {r:?}");
        assert!(
            r.headers["sluice-reason"]
                .to_str()
                .unwrap()
                .contains("dot segment"),
            "{r:?}"
        );
    }
    assert_eq!(srv[0].hits() + srv[1].hits(), 4);
    mesh.shutdown().await;
}

/// An HTTP/1.0 request without Host: a redirect within the same scheme and
/// port is a relative reference; one to another scheme names the Service.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_without_host_is_redirected_without_an_empty_host() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mesh = Mesh::standard().await;
    let prefix = |p: &str| {
        vec![HttpRouteMatch {
            path: Some(PathMatch::PathPrefix(p.into())),
            ..Default::default()
        }]
    };
    let mut same = rule(prefix("/old"), vec![]);
    same.filters = vec![HttpFilter::RequestRedirect(RequestRedirect {
        path: Some(PathModifier::ReplacePrefixMatch("/new".into())),
        ..Default::default()
    })];
    let mut secure = rule(prefix("/login"), vec![]);
    secure.filters = vec![HttpFilter::RequestRedirect(RequestRedirect {
        scheme: Some("https".into()),
        ..Default::default()
    })];
    let (_srv, _) = setup(&mesh, vec![route(vec![same, secure])]).await;
    for (path, want) in [
        ("/old/a", "location: /new/a\r\n"),
        ("/login", "location: https://cart.shop/login\r\n"),
    ] {
        let mut tcp = mesh.connect(web().ip, SocketAddr::new(vip(1), 80)).await;
        tcp.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut buf = Vec::new();
        tokio::time::timeout(
            std::time::Duration::from_secs(10),
            tcp.read_to_end(&mut buf),
        )
        .await
        .expect("an answer")
        .unwrap();
        let head = String::from_utf8_lossy(&buf).to_ascii_lowercase();
        assert!(head.starts_with("http/1.0 302"), "{head}");
        assert!(head.contains(want), "{path}: {head}");
    }
    mesh.shutdown().await;
}

/// A request cart's workload never answers (`/silent`): the proxy's 504,
/// counted under `destination` and `route` though the exchange that knew
/// them was dropped.
async fn silent_504(mesh: &Mesh, destination: &str, route: &str) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut tcp = mesh.connect(web().ip, SocketAddr::new(vip(1), 80)).await;
    tcp.write_all(b"GET /silent HTTP/1.1\r\nhost: cart\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(std::time::Duration::from_secs(10), tcp.read(&mut buf))
        .await
        .expect("an answer from the proxy, though the workload gives none")
        .unwrap();
    let head = String::from_utf8_lossy(&buf[..n]);
    assert!(head.starts_with("HTTP/1.1 504"), "{head}");
    assert!(head.contains("no answer for 300ms"), "{head}");
    assert_eq!(
        mesh.a.metric(
            "sluice_requests_total",
            &[
                "direction=\"Outbound\"",
                "status_class=\"5xx\"",
                &format!("destination=\"{destination}\""),
                &format!("route=\"{route}\""),
            ]
        ),
        1.0,
        "{}",
        mesh.a.metrics()
    );
}

/// A workload that never answers, or stops in the middle of its answer,
/// does not hold its caller for ever: with nothing moving either way for
/// the idle timeout, the caller gets a 504, or its answer is cut.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workload_that_stops_answering_is_cut_off() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mesh = mesh_with_idle_timeout_300ms().await;
    // Reads a request head; `/silent` gets nothing back, anything else a
    // head and 3 of its 100 bytes. Holds the connection meanwhile.
    let listener = tokio::net::TcpListener::bind(SocketAddr::new(cart(0).ip, 0))
        .await
        .unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut b = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    if s.read(&mut b).await.unwrap_or(0) == 0 {
                        return;
                    }
                    head.push(b[0]);
                }
                if !head.starts_with(b"GET /silent ") {
                    let _ = s
                        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nabc")
                        .await;
                }
                tokio::time::sleep(std::time::Duration::from_secs(30)).await;
            });
        }
    });
    mesh.publish(&Snapshot {
        services: vec![mesh.service("cart", 1, port, &[cart(0)])],
        ..Default::default()
    })
    .await;

    silent_504(&mesh, "shop/cart", "shop/cart").await;
    // A route sending cart's requests to another service: counted under
    // that service, as its other answers are.
    mesh.publish(&Snapshot {
        services: vec![
            mesh.service("cart", 1, port, &[cart(0)]),
            mesh.service("v1", 11, port, &[cart(0)]),
        ],
        http_routes: vec![route(vec![rule(vec![], vec![backend("v1", 1)])])],
        ..Default::default()
    })
    .await;
    silent_504(&mesh, "shop/v1", "shop/cart-route#0").await;

    let mut buf = vec![0u8; 4096];
    let mut tcp = mesh.connect(web().ip, SocketAddr::new(vip(1), 80)).await;
    tcp.write_all(b"GET /stall HTTP/1.1\r\nhost: cart\r\n\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    let end = tokio::time::timeout(std::time::Duration::from_secs(10), async {
        loop {
            match tcp.read(&mut buf).await {
                Ok(0) => return Ok(()),
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) => return Err(e),
            }
        }
    })
    .await
    .expect("the stalled answer ends, though the workload holds it");
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.ends_with("\r\n\r\nabc"), "only what came: {text}");
    // Cut: the caller learns it short of its 100 bytes (end or reset).
    let _ = end;
    mesh.shutdown().await;
}

/// An upload the workload neither reads nor answers: after the caller's
/// answer (504, or 408 for the stalled body), the rest of the upload stops
/// and its tunnel stream ends, rather than holding its slot (and the
/// workload's request) for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unanswered_upload_lets_go_of_its_tunnel_stream() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    const BODY: usize = 16 << 20;
    // One stream per tunnel connection: a stream still held shows as a
    // second connection.
    let mesh = Mesh::with_settings(vec![web()], vec![cart(0)], &|s| {
        s.exchange_idle_timeout_ms = 300;
        s.tunnel_max_streams = 1;
    })
    .await;
    let listener = tokio::net::TcpListener::bind(SocketAddr::new(cart(0).ip, 0))
        .await
        .unwrap();
    let port = listener.local_addr().unwrap().port();
    // Takes the connection and reads nothing, for longer than the test.
    let _workload = tokio::spawn(async move {
        let (s, _) = listener.accept().await.unwrap();
        tokio::time::sleep(std::time::Duration::from_secs(30)).await;
        drop(s);
    });
    // The same workload answers on another port.
    let echo = EchoServer::start("cart-0", SocketAddr::new(cart(0).ip, 0)).await;
    let mut other = mesh.service("other", 2, echo.addr.port(), &[cart(0)]);
    other.ports[0].port = 80;
    mesh.publish(&Snapshot {
        services: vec![mesh.service("cart", 1, port, &[cart(0)]), other],
        ..Default::default()
    })
    .await;
    let tcp = mesh.connect(web().ip, SocketAddr::new(vip(1), 80)).await;
    let (mut rd, mut wr) = tcp.into_split();
    let upload = tokio::spawn(async move {
        let head = format!("POST /upload HTTP/1.1\r\nhost: cart\r\ncontent-length: {BODY}\r\n\r\n");
        let _ = wr.write_all(head.as_bytes()).await;
        let _ = wr.write_all(&vec![b'u'; BODY]).await;
        // Holds its side open.
        tokio::time::sleep(std::time::Duration::from_secs(30)).await;
        drop(wr);
    });
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(std::time::Duration::from_secs(10), rd.read(&mut buf))
        .await
        .expect("the caller's answer")
        .unwrap();
    let head = String::from_utf8_lossy(&buf[..n]);
    assert!(
        head.starts_with("HTTP/1.1 504") || head.starts_with("HTTP/1.1 408"),
        "{head}"
    );
    assert_eq!(mesh.a.proxy().tunnel_connections(), 1);
    // The aborted upload task is dropped on the runtime's next turns.
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    // The next request to the same workload takes the freed stream: no
    // second tunnel connection.
    let mut c = mesh.http1(web().ip, SocketAddr::new(vip(2), 80)).await;
    let r = tokio::time::timeout(std::time::Duration::from_secs(10), c.get("/next"))
        .await
        .expect("the next request is answered");
    assert_eq!(r.status, 200);
    assert_eq!(
        mesh.a.proxy().tunnel_connections(),
        1,
        "the upload's stream was still held"
    );
    upload.abort();
    mesh.shutdown().await;
}

/// A WebSocket over HTTP/2 on a rule with a mirror: the mirror gets a
/// plain request (the caller's stream belongs to the primary), as for an
/// HTTP/1.1 upgrade.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_websocket_is_mirrored_as_a_plain_request() {
    let mesh = Mesh::standard().await;
    let mut r = rule(vec![], vec![backend("v1", 1)]);
    r.filters = vec![HttpFilter::RequestMirror(RequestMirror {
        service: ObjectRef::new("shop", "mirror"),
        port: 80,
        fraction: None,
    })];
    let (_srv, mirror) = setup(&mesh, vec![route(vec![r])]).await;
    let mut h2 = websocket_client(&mesh).await;
    let (resp, _send) = h2.send_request(websocket("/chat"), false).unwrap();
    // v1 is no WebSocket server: it answers 200 without switching.
    let resp = resp.await.unwrap();
    assert_eq!(resp.status(), 502, "{resp:?}");
    eventually("the mirror received a copy", || mirror.recorded() == 1).await;
    let seen = mirror.seen.lock().unwrap()[0].clone();
    assert_eq!(seen["method"], "GET", "{seen}");
    assert_eq!(seen["path"], "/chat", "{seen}");
    assert!(seen["headers"].get("upgrade").is_none(), "{seen}");
    drop(h2);
    mesh.shutdown().await;
}

/// A rule to `backend` retried on 503, `attempts` times, 1 ms apart.
fn retried_on_503(backend_name: &str, attempts: u32) -> HttpRouteRule {
    let mut r = rule(vec![], vec![backend(backend_name, 1)]);
    r.retry = Some(Retry {
        codes: vec![503],
        attempts,
        backoff_ms: 1,
    });
    r
}
