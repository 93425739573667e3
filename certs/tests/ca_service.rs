//! The CA service over HTTPS on loopback: issuance through `CaClient`,
//! refusal of bad tokens and of identities from another node, and the
//! Kubernetes TokenReview authenticator against a fake API server.

mod support;

use std::{
    convert::Infallible,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use certs::{
    Ca, CaError, CertificateAuthority, IdentityManager,
    ca::{
        SignRequest,
        auth::{Authenticator, BootstrapTokens, Credential, NodeAuthoriser, StaticNodeWorkloads},
        client::{CaClient, CaClientConfig},
        service::{CaServer, CaService, serving_tls},
        tokenreview::{TokenReviewAuthenticator, TokenReviewConfig},
    },
};
use http_body_util::{BodyExt as _, Full};
use hyper::{Request, Response, service::service_fn};
use hyper_util::rt::TokioIo;
use support::*;

const LOOPBACK: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
const NODE_A_TOKEN: &str = "0123456789abcdef0123456789abcdef-node-a";
const NODE_B_TOKEN: &str = "fedcba9876543210fedcba9876543210-node-b";

struct Cluster {
    ca: Arc<Ca>,
    server: CaServer,
    workloads: Arc<StaticNodeWorkloads>,
}

async fn cluster_with(ca: Arc<Ca>, authn: Arc<dyn Authenticator>) -> Cluster {
    let workloads = Arc::new(StaticNodeWorkloads::new());
    workloads.set("node-a", [id("shop", "cart")]);
    workloads.set("node-b", [id("bank", "payments")]);
    let (chain, key) = ca
        .issue_serving_certificate(&["sluice-ca.sluice-system.svc"], &[LOOPBACK])
        .unwrap();
    let server = CaServer::bind(
        SocketAddr::new(LOOPBACK, 0),
        serving_tls(chain, key).unwrap(),
        CaService::new(
            ca.clone(),
            authn,
            Arc::new(NodeAuthoriser::new(workloads.clone())),
        ),
    )
    .await
    .unwrap();
    Cluster {
        ca,
        server,
        workloads,
    }
}

async fn cluster(clock: &certs::ManualClock) -> Cluster {
    let tokens =
        BootstrapTokens::new([("node-a", NODE_A_TOKEN), ("node-b", NODE_B_TOKEN)]).unwrap();
    cluster_with(ca(clock), Arc::new(tokens)).await
}

fn client(c: &Cluster, token: &str) -> Arc<CaClient> {
    Arc::new(
        CaClient::new(CaClientConfig {
            endpoint: format!("https://{}", c.server.local_addr()),
            bundle: c.ca.bundle(),
            credential: Credential::Token(token.into()),
            timeout: Duration::from_secs(10),
            bundle_file: None,
        })
        .unwrap(),
    )
}

#[tokio::test]
async fn node_obtains_its_identities_through_the_service() {
    let clock = clock();
    let c = cluster(&clock).await;
    let cart = id("shop", "cart");
    let pay = id("bank", "payments");
    let a = IdentityManager::connect(client(&c, NODE_A_TOKEN), shared(&clock), fast_opts())
        .await
        .unwrap();
    a.add(cart.clone()).await.unwrap();
    let b = IdentityManager::connect(client(&c, NODE_B_TOKEN), shared(&clock), fast_opts())
        .await
        .unwrap();
    b.add(pay.clone()).await.unwrap();
    let (client_saw, server_saw) = tunnel(&a, &cart, &b, &pay).await.ok();
    assert_eq!(client_saw.identity, pay);
    assert_eq!(server_saw.identity, cart);
    assert_eq!(c.ca.status().issued, 2);
    c.server.shutdown().await;
}

#[tokio::test]
async fn bad_token_is_refused() {
    let clock = clock();
    let c = cluster(&clock).await;
    let cart = id("shop", "cart");
    let m = IdentityManager::new(
        client(&c, "not-a-token"),
        c.ca.bundle(),
        shared(&clock),
        fast_opts(),
    );
    let err = m.add(cart.clone()).await.unwrap_err();
    assert!(
        matches!(&err, certs::IdentityError::Ca { source, .. } if matches!(**source, CaError::Unauthenticated { .. })),
        "{err}"
    );
    assert!(err.to_string().contains("unknown bootstrap token"), "{err}");
    assert!(!m.has_certificate(&cart));
    // The status shows why.
    assert!(
        m.status()[0]
            .last_error
            .as_ref()
            .unwrap()
            .contains("credential")
    );
    // No token at all, and the bundle endpoint is guarded too.
    let err = client(&c, "").trust_bundle().await.unwrap_err();
    assert!(matches!(err, CaError::Unauthenticated { .. }), "{err}");
    assert_eq!(c.ca.status().issued, 0);
}

#[tokio::test]
async fn identity_of_a_workload_on_another_node_is_refused() {
    let clock = clock();
    let c = cluster(&clock).await;
    let a = IdentityManager::new(
        client(&c, NODE_A_TOKEN),
        c.ca.bundle(),
        shared(&clock),
        fast_opts(),
    );
    let err = a.add(id("bank", "payments")).await.unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("node-a") && msg.contains("bank/sa/payments"),
        "{msg}"
    );
    assert!(
        matches!(&err, certs::IdentityError::Ca { source, .. } if matches!(**source, CaError::Forbidden { .. }))
    );
    // Once the workload is scheduled on node-a, the same request succeeds.
    c.workloads
        .set("node-a", [id("shop", "cart"), id("bank", "payments")]);
    a.add(id("bank", "payments")).await.unwrap();
}

#[tokio::test]
async fn csr_not_matching_the_requested_identity_is_refused_by_the_service() {
    let clock = clock();
    let c = cluster(&clock).await;
    let cl = client(&c, NODE_A_TOKEN);
    // Authorised for shop/cart (on node-a), but the CSR asks for payments.
    let key = certs::ca::generate_workload_key().unwrap();
    let csr_der = certs::ca::csr_for(&id("bank", "payments"), &key).unwrap();
    let err = cl
        .sign(SignRequest {
            identity: id("shop", "cart"),
            csr_der,
        })
        .await
        .unwrap_err();
    assert!(
        matches!(err, CaError::Rejected { status: 400, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("payments"), "{err}");
}

#[tokio::test]
async fn ca_down_is_transient_and_a_foreign_server_is_not_trusted() {
    let clock = clock();
    let c = cluster(&clock).await;
    let addr = c.server.local_addr();
    let bundle = c.ca.bundle();
    c.server.shutdown().await;
    let cl = CaClient::new(CaClientConfig {
        endpoint: format!("https://{addr}"),
        bundle: bundle.clone(),
        credential: Credential::Token(NODE_A_TOKEN.into()),
        timeout: Duration::from_secs(5),
        bundle_file: None,
    })
    .unwrap();
    let err = cl.trust_bundle().await.unwrap_err();
    assert!(err.is_transient(), "{err}");

    // A service with a certificate from another CA is not trusted.
    let other = cluster(&clock).await;
    let cl = CaClient::new(CaClientConfig {
        endpoint: format!("https://{}", other.server.local_addr()),
        bundle,
        credential: Credential::Token(NODE_A_TOKEN.into()),
        timeout: Duration::from_secs(5),
        bundle_file: None,
    })
    .unwrap();
    let err = cl.trust_bundle().await.unwrap_err();
    assert!(err.to_string().contains("TLS"), "{err}");
}

// --- Kubernetes TokenReview against a fake API server on loopback ---

const CA_OWN_TOKEN: &str = "ca-service-account-token";
const AGENT_SA: &str = "system:serviceaccount:sluice-system:sluice-agent";

/// Answers TokenReviews like the API server: knows three tokens; records the
/// reviewed tokens.
struct FakeApi {
    addr: SocketAddr,
    ca_pem: String,
    seen: Arc<Mutex<Vec<String>>>,
    /// The signing keys it publishes (`None`: 404, as for a CA without the
    /// permission), and how often they were asked for.
    jwks: Arc<Mutex<Option<serde_json::Value>>>,
    jwks_fetches: Arc<AtomicUsize>,
    /// How long it takes to answer for its keys (ms).
    jwks_delay_ms: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn fake_api() -> FakeApi {
    let clock = clock();
    let tls_ca = ca(&clock);
    let (chain, key) = tls_ca
        .issue_serving_certificate(&["kubernetes.default.svc"], &[LOOPBACK])
        .unwrap();
    let tls = serving_tls(chain, key).unwrap();
    let listener = tokio::net::TcpListener::bind((LOOPBACK, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let jwks: Arc<Mutex<Option<serde_json::Value>>> = Arc::default();
    let jwks_fetches = Arc::new(AtomicUsize::new(0));
    let jwks_delay_ms = Arc::new(AtomicUsize::new(0));
    let (seen2, jwks2, fetches2, delay2) = (
        seen.clone(),
        jwks.clone(),
        jwks_fetches.clone(),
        jwks_delay_ms.clone(),
    );
    let task = tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let tls = tokio_rustls::TlsAcceptor::from(tls.clone());
            let (seen, jwks, fetches, delay) = (
                seen2.clone(),
                jwks2.clone(),
                fetches2.clone(),
                delay2.clone(),
            );
            tokio::spawn(async move {
                let Ok(stream) = tls.accept(tcp).await else {
                    return;
                };
                let svc = service_fn(move |req: Request<hyper::body::Incoming>| {
                    let (seen, jwks, fetches, delay) =
                        (seen.clone(), jwks.clone(), fetches.clone(), delay.clone());
                    async move {
                        if req.uri().path() == "/openid/v1/jwks" {
                            fetches.fetch_add(1, Ordering::SeqCst);
                            let wait = delay.load(Ordering::SeqCst) as u64;
                            tokio::time::sleep(Duration::from_millis(wait)).await;
                            let keys = jwks.lock().unwrap().clone();
                            let (status, body) = match keys {
                                Some(k) => (200, k.to_string()),
                                None => (404, "{}".to_string()),
                            };
                            return Ok::<_, Infallible>(
                                Response::builder()
                                    .status(status)
                                    .body(Full::new(Bytes::from(body)))
                                    .unwrap(),
                            );
                        }
                        Ok::<_, Infallible>(api_answer(req, &seen).await)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    FakeApi {
        addr,
        ca_pem: tls_ca.bundle().to_pem(),
        seen,
        jwks,
        jwks_fetches,
        jwks_delay_ms,
        task,
    }
}

async fn api_answer(
    req: Request<hyper::body::Incoming>,
    seen: &Mutex<Vec<String>>,
) -> Response<Full<Bytes>> {
    let reply = |status: u16, v: serde_json::Value| {
        Response::builder()
            .status(status)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(v.to_string())))
            .unwrap()
    };
    let authorised = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        == Some(&format!("Bearer {CA_OWN_TOKEN}"));
    if req.uri().path() != "/apis/authentication.k8s.io/v1/tokenreviews" || req.method() != "POST" {
        return reply(404, serde_json::json!({"kind": "Status", "code": 404}));
    }
    if !authorised {
        return reply(
            403,
            serde_json::json!({"kind": "Status", "code": 403, "reason": "Forbidden"}),
        );
    }
    let body = req.into_body().collect().await.unwrap().to_bytes();
    let review: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(review["kind"], "TokenReview");
    assert_eq!(review["apiVersion"], "authentication.k8s.io/v1");
    assert_eq!(
        review["spec"]["audiences"],
        serde_json::json!(["sluice-ca"])
    );
    let token = token_name(review["spec"]["token"].as_str().unwrap());
    seen.lock().unwrap().push(token.clone());
    if token.starts_with("slow-") {
        // Counts reviews in progress at once.
        let now = SLOW_NOW.fetch_add(1, Ordering::SeqCst) + 1;
        SLOW_MAX.fetch_max(now, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(40)).await;
        SLOW_NOW.fetch_sub(1, Ordering::SeqCst);
    }
    let user = |name: &str, node: Option<&str>| {
        let mut extra = serde_json::Map::new();
        if let Some(n) = node {
            extra.insert(
                "authentication.kubernetes.io/node-name".into(),
                serde_json::json!([n]),
            );
            extra.insert(
                "authentication.kubernetes.io/pod-name".into(),
                serde_json::json!(["sluice-agent-x"]),
            );
        }
        serde_json::json!({"username": name, "uid": "u-1", "groups": ["system:serviceaccounts"], "extra": extra})
    };
    let status = match token.as_str() {
        "agent-on-node-a" => {
            serde_json::json!({"authenticated": true, "user": user(AGENT_SA, Some("node-a")), "audiences": ["sluice-ca"]})
        }
        "agent-unbound" => {
            serde_json::json!({"authenticated": true, "user": user(AGENT_SA, None), "audiences": ["sluice-ca"]})
        }
        "some-other-sa" => {
            serde_json::json!({"authenticated": true, "user": user("system:serviceaccount:default:default", Some("node-a")), "audiences": ["sluice-ca"]})
        }
        // An authenticator that ignores audiences says yes without naming one.
        "audience-unaware" => {
            serde_json::json!({"authenticated": true, "user": user(AGENT_SA, Some("node-a"))})
        }
        _ => serde_json::json!({"authenticated": false, "error": "invalid bearer token"}),
    };
    reply(
        201,
        serde_json::json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "metadata": {}, "spec": review["spec"], "status": status}),
    )
}

fn b64(v: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v)
}

/// A JWT shaped like a projected service-account token (unsigned: the fake
/// API server knows it by `name`, carried in its first segment).
fn jwt(name: &str, payload: serde_json::Value) -> String {
    format!(
        "{}.{}.{}",
        b64(name.as_bytes()),
        b64(payload.to_string().as_bytes()),
        b64(b"signature")
    )
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// A token for the CA's audience, valid for an hour.
fn sa_token(name: &str) -> String {
    jwt(
        name,
        serde_json::json!({"aud": ["sluice-ca"], "exp": unix_now() + 3600}),
    )
}

/// The name the fake API server knows a token by: its first segment, or
/// the `name` in it when it is a JSON header (a signed token).
fn token_name(token: &str) -> String {
    use base64::Engine as _;
    let Some(header) = token.split('.').next().and_then(|h| {
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(h)
            .ok()
    }) else {
        return token.to_string();
    };
    serde_json::from_slice::<serde_json::Value>(&header)
        .ok()
        .and_then(|v| v["name"].as_str().map(String::from))
        .unwrap_or_else(|| String::from_utf8_lossy(&header).into_owned())
}

/// A P-256 signing key as the API server's, and its JWKS entry (`kid`).
fn api_signing_key(kid: &str) -> (ring::signature::EcdsaKeyPair, serde_json::Value) {
    use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair as _};
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
    let pair =
        EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng).unwrap();
    let p = pair.public_key().as_ref();
    let jwk = serde_json::json!({
        "kty": "EC", "crv": "P-256", "kid": kid, "alg": "ES256", "use": "sig",
        "x": b64(&p[1..33]), "y": b64(&p[33..65]),
    });
    (pair, jwk)
}

/// A service-account token for the CA's audience, signed with `key` (ES256,
/// key id `kid`), that the fake API server knows as `name`.
fn signed_token(key: &ring::signature::EcdsaKeyPair, kid: &str, name: &str) -> String {
    let header = b64(
        serde_json::json!({"alg": "ES256", "kid": kid, "name": name})
            .to_string()
            .as_bytes(),
    );
    let payload = b64(
        serde_json::json!({"aud": ["sluice-ca"], "exp": unix_now() + 3600})
            .to_string()
            .as_bytes(),
    );
    let signed = format!("{header}.{payload}");
    let sig = key
        .sign(&ring::rand::SystemRandom::new(), signed.as_bytes())
        .unwrap();
    format!("{signed}.{}", b64(sig.as_ref()))
}

static SLOW_NOW: AtomicUsize = AtomicUsize::new(0);
static SLOW_MAX: AtomicUsize = AtomicUsize::new(0);

/// Every answer fresh from the API server (no cache).
fn reviewer(api: &FakeApi, own: &str) -> TokenReviewAuthenticator {
    reviewer_with(api, own, Duration::ZERO, 16)
}

fn reviewer_with(
    api: &FakeApi,
    own: &str,
    cache_ttl: Duration,
    max_in_flight: usize,
) -> TokenReviewAuthenticator {
    TokenReviewAuthenticator::new(TokenReviewConfig {
        api_server: format!("https://{}", api.addr),
        ca_pem: api.ca_pem.clone(),
        credential: Credential::Token(own.into()),
        audiences: vec![certs::ca::tokenreview::CA_TOKEN_AUDIENCE.into()],
        allowed_users: vec![AGENT_SA.into()],
        timeout: Duration::from_secs(5),
        cache_ttl,
        max_in_flight,
    })
    .unwrap()
}

#[tokio::test]
async fn tokenreview_answers_are_cached_and_reviews_in_flight_are_bounded() {
    let api = fake_api().await;
    let seen = |t: &str| api.seen.lock().unwrap().iter().filter(|s| *s == t).count();
    let r = reviewer_with(&api, CA_OWN_TOKEN, Duration::from_secs(2), 4);
    // Made once: the same bytes each time (a new one a second later would
    // carry another expiry, hence be another token).
    let (good, forged) = (sa_token("agent-on-node-a"), sa_token("forged"));
    for _ in 0..3 {
        let caller = r.authenticate(&good).await.unwrap();
        assert_eq!(caller.node, "node-a");
    }
    assert_eq!(seen("agent-on-node-a"), 1, "one review for three requests");
    for _ in 0..2 {
        let err = r.authenticate(&forged).await.unwrap_err();
        assert!(err.to_string().contains("invalid bearer token"), "{err}");
    }
    assert_eq!(seen("forged"), 1, "refusals are cached too");

    // Twenty different tokens at once: at most four reviews in progress.
    let all = futures_util::future::join_all((0..20).map(|i| {
        let r = &r;
        async move { r.authenticate(&sa_token(&format!("slow-{i}"))).await }
    }))
    .await;
    assert!(
        all.iter()
            .all(|a| matches!(a, Err(certs::ca::auth::AuthError::Unauthenticated { .. })))
    );
    let max = SLOW_MAX.load(Ordering::SeqCst);
    assert!(
        (2..=4).contains(&max),
        "{max} reviews ran at once, the limit is 4"
    );

    // The API server gone: a cached answer still serves until it expires,
    // then the CA says "unavailable" (agents retry), not "refused".
    drop(api);
    assert!(r.authenticate(&good).await.is_ok());
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let err = r.authenticate(&good).await.unwrap_err();
    assert!(
        matches!(err, certs::ca::auth::AuthError::Unavailable { .. }),
        "{err}"
    );
}

#[tokio::test]
async fn tokenreview_authenticator_names_the_callers_node() {
    let api = fake_api().await;
    let r = reviewer(&api, CA_OWN_TOKEN);
    let caller = r.authenticate(&sa_token("agent-on-node-a")).await.unwrap();
    assert_eq!(caller.node, "node-a");
    assert_eq!(caller.subject, AGENT_SA);
    let err = r.authenticate(&sa_token("forged")).await.unwrap_err();
    assert!(err.to_string().contains("invalid bearer token"), "{err}");
    let err = r
        .authenticate(&sa_token("agent-unbound"))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("not bound to a pod"), "{err}");
    let err = r
        .authenticate(&sa_token("some-other-sa"))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("not a Sluice node agent"), "{err}");
    // Tokens for another audience never open the CA, whoever's they are:
    // refused without asking the API server, as are expired and junk ones.
    let api_token = jwt(
        "agent-api-token",
        serde_json::json!({"aud": ["https://kubernetes.default.svc"], "exp": unix_now() + 3600}),
    );
    let err = r.authenticate(&api_token).await.unwrap_err();
    assert!(
        err.to_string().contains("not issued for the audience"),
        "{err}"
    );
    let expired = jwt(
        "expired",
        serde_json::json!({"aud": ["sluice-ca"], "exp": unix_now() - 60}),
    );
    let err = r.authenticate(&expired).await.unwrap_err();
    assert!(err.to_string().contains("expired"), "{err}");
    // An expiry as far in the past as the number can go: refused, no
    // overflow.
    let ancient = jwt(
        "ancient",
        serde_json::json!({"aud": ["sluice-ca"], "exp": i64::MIN}),
    );
    let err = r.authenticate(&ancient).await.unwrap_err();
    assert!(err.to_string().contains("expired"), "{err}");
    let err = r.authenticate("not-a-jwt").await.unwrap_err();
    assert!(
        err.to_string().contains("not a service-account token"),
        "{err}"
    );
    // One the API server vouches for without naming the audience: refused.
    let err = r
        .authenticate(&sa_token("audience-unaware"))
        .await
        .unwrap_err();
    assert!(
        matches!(err, certs::ca::auth::AuthError::Unauthenticated { .. }),
        "{err}"
    );
    assert!(
        err.to_string()
            .contains("not issued for the audience \"sluice-ca\"")
            && err.to_string().contains("projected service-account token"),
        "{err}"
    );
    assert_eq!(
        *api.seen.lock().unwrap(),
        vec![
            "agent-on-node-a",
            "forged",
            "agent-unbound",
            "some-other-sa",
            "audience-unaware"
        ]
    );
    // The CA's own credential refused by the API server: unavailable, with the fix.
    let err = reviewer(&api, "wrong")
        .authenticate(&sa_token("agent-on-node-a"))
        .await
        .unwrap_err();
    assert!(
        matches!(err, certs::ca::auth::AuthError::Unavailable { .. }),
        "{err}"
    );
    assert!(err.to_string().contains("system:auth-delegator"), "{err}");
}

#[tokio::test]
async fn ca_service_with_tokenreview_end_to_end() {
    let api = fake_api().await;
    let clock = clock();
    let c = cluster_with(ca(&clock), Arc::new(reviewer(&api, CA_OWN_TOKEN))).await;
    let a = IdentityManager::connect(
        client(&c, &sa_token("agent-on-node-a")),
        shared(&clock),
        fast_opts(),
    )
    .await
    .unwrap();
    a.add(id("shop", "cart")).await.unwrap();
    let err = a.add(id("bank", "payments")).await.unwrap_err();
    assert!(err.to_string().contains("not allowed"), "{err}");
    let err = client(&c, &sa_token("forged"))
        .trust_bundle()
        .await
        .unwrap_err();
    assert!(matches!(err, CaError::Unauthenticated { .. }), "{err}");
    // API server gone: the CA answers 503, which nodes retry.
    drop(api);
    let err = client(&c, &sa_token("agent-on-node-a"))
        .trust_bundle()
        .await
        .unwrap_err();
    assert!(err.is_transient(), "{err}");
}

/// A caller that sends a request head and then not its body is answered
/// `408` and let go, instead of holding one of the service's connections.
/// A TLS connection over `tcp` to the CA service, trusting its root.
async fn tls_to_ca(
    c: &Cluster,
    tcp: tokio::net::TcpStream,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let mut roots = rustls::RootCertStore::empty();
    for r in c.ca.bundle().roots() {
        roots.add(r.clone()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(
            rustls::pki_types::ServerName::try_from("sluice-ca.sluice-system.svc").unwrap(),
            tcp,
        )
        .await
        .unwrap()
}

#[tokio::test]
async fn a_request_body_that_never_comes_is_cut_off() {
    let clock = clock();
    let c = cluster(&clock).await;
    let tcp = tokio::net::TcpStream::connect(c.server.local_addr())
        .await
        .unwrap();
    let mut tls = tls_to_ca(&c, tcp).await;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    tls.write_all(
        format!(
            "POST /v1/sign HTTP/1.1\r\nhost: sluice-ca\r\nauthorization: Bearer {NODE_A_TOKEN}\r\n\
             content-type: application/json\r\ncontent-length: 1000\r\n\r\n{{\"identity\""
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(30), async {
        let mut buf = [0u8; 1024];
        while !answer.windows(4).any(|w| w == b"\r\n\r\n") {
            match tls.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => answer.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    assert!(read.is_ok(), "no answer: the connection was held");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
}

#[tokio::test]
async fn one_address_cannot_hold_every_connection() {
    use certs::ca::service::MAX_CONNECTIONS_PER_PEER;
    use tokio::io::AsyncReadExt as _;
    let clock = clock();
    let c = cluster(&clock).await;
    let to = c.server.local_addr();
    let from = |ip: [u8; 4]| async move {
        let s = tokio::net::TcpSocket::new_v4().unwrap();
        s.bind(SocketAddr::from((ip, 0))).unwrap();
        s.connect(to).await.unwrap()
    };
    // Connections that say nothing (a TLS handshake has 10 s).
    let mut held = Vec::new();
    for _ in 0..MAX_CONNECTIONS_PER_PEER {
        held.push(from([127, 0, 0, 1]).await);
    }
    let mut one_more = from([127, 0, 0, 1]).await;
    let mut buf = [0u8; 16];
    let closed = tokio::time::timeout(Duration::from_secs(5), one_more.read(&mut buf)).await;
    assert!(
        matches!(closed, Ok(Ok(0) | Err(_))),
        "a connection past the per-address limit was kept: {closed:?}"
    );
    // Another address is served meanwhile.
    let mut tls = tls_to_ca(&c, from([127, 0, 0, 2]).await).await;
    use tokio::io::AsyncWriteExt as _;
    let req = format!(
        "GET /v1/trust-bundle HTTP/1.1\r\nhost: sluice-ca\r\nauthorization: Bearer {NODE_A_TOKEN}\r\nconnection: close\r\n\r\n"
    );
    tls.write_all(req.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), tls.read_to_end(&mut answer)).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    drop(held);
}

#[tokio::test]
async fn forged_tokens_are_refused_without_a_token_review() {
    let api = fake_api().await;
    let (key, jwk) = api_signing_key("k1");
    *api.jwks.lock().unwrap() = Some(serde_json::json!({"keys": [jwk]}));
    let r = reviewer(&api, CA_OWN_TOKEN);
    let seen = |t: &str| api.seen.lock().unwrap().iter().filter(|s| *s == t).count();

    // Signed by the API server's key: reviewed, and accepted.
    let caller = r
        .authenticate(&signed_token(&key, "k1", "agent-on-node-a"))
        .await
        .unwrap();
    assert_eq!(caller.node, "node-a");
    assert_eq!(seen("agent-on-node-a"), 1);

    // Same claims, signed by someone else's key: refused here, the API
    // server never sees them.
    let (forger, _) = api_signing_key("k1");
    let err = r
        .authenticate(&signed_token(&forger, "k1", "forged"))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, certs::ca::auth::AuthError::Unauthenticated { reason } if reason.contains("signature")),
        "{err}"
    );
    // Made-up key ids within the refresh interval neither make the CA ask
    // the API server for its keys again nor take a review: "retry".
    let fetches = api.jwks_fetches.load(Ordering::SeqCst);
    assert_eq!(fetches, 1);
    for i in 0..5 {
        let err = r
            .authenticate(&signed_token(&forger, &format!("kid-{i}"), "forged"))
            .await
            .unwrap_err();
        assert!(
            matches!(&err, certs::ca::auth::AuthError::Unavailable { reason } if reason.contains("retry")),
            "{err}"
        );
    }
    assert_eq!(api.jwks_fetches.load(Ordering::SeqCst), fetches);
    assert_eq!(seen("forged"), 0);
}

/// Tokens that arrive while the CA reads the API server's keys for the
/// first time wait for them: made-up ones are then refused without a
/// review, real ones reviewed.
#[tokio::test]
async fn tokens_wait_for_the_first_read_of_the_keys() {
    let api = fake_api().await;
    let (k1, jwk1) = api_signing_key("k1");
    *api.jwks.lock().unwrap() = Some(serde_json::json!({"keys": [jwk1]}));
    api.jwks_delay_ms.store(500, Ordering::SeqCst);
    let r = Arc::new(reviewer(&api, CA_OWN_TOKEN));
    let r2 = r.clone();
    let first = tokio::spawn(async move {
        r2.authenticate(&signed_token(&k1, "k1", "agent-on-node-a"))
            .await
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (forger, _) = api_signing_key("k1");
    for kid in ["k1", "made-up"] {
        assert!(
            r.authenticate(&signed_token(&forger, kid, "forged"))
                .await
                .is_err()
        );
    }
    assert!(first.await.unwrap().is_ok());
    assert_eq!(
        api.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|s| *s == "forged")
            .count(),
        0,
        "a made-up token was reviewed while the keys were read"
    );
    assert_eq!(api.jwks_fetches.load(Ordering::SeqCst), 1);
}

/// The API server rotates its signing key: a token under the new key is
/// told to retry (not refused) until the CA may read the keys again, then
/// accepted; a key id still unknown after a read that followed the token
/// is a forgery. A slow read of the keys does not hold up tokens under a
/// known key.
#[tokio::test]
async fn a_new_signing_key_is_read_and_a_slow_read_holds_up_nobody() {
    let api = fake_api().await;
    let (k1, jwk1) = api_signing_key("k1");
    *api.jwks.lock().unwrap() = Some(serde_json::json!({"keys": [jwk1]}));
    let r = Arc::new(reviewer(&api, CA_OWN_TOKEN));
    let seen = |t: &str| api.seen.lock().unwrap().iter().filter(|s| *s == t).count();
    r.authenticate(&signed_token(&k1, "k1", "agent-on-node-a"))
        .await
        .unwrap();
    assert_eq!(api.jwks_fetches.load(Ordering::SeqCst), 1);

    let (k2, jwk2) = api_signing_key("k2");
    *api.jwks.lock().unwrap() = Some(serde_json::json!({"keys": [jwk1, jwk2]}));
    let err = r
        .authenticate(&signed_token(&k2, "k2", "agent-on-node-a"))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, certs::ca::auth::AuthError::Unavailable { reason } if reason.contains("\"k2\"")),
        "{err}"
    );
    assert_eq!(seen("agent-on-node-a"), 1, "no review for it yet");
    assert_eq!(api.jwks_fetches.load(Ordering::SeqCst), 1);

    tokio::time::sleep(certs::ca::jwks::REFRESH_EVERY).await;
    // A made-up key id now makes the CA read the keys, slowly.
    api.jwks_delay_ms.store(1500, Ordering::SeqCst);
    let (forger, _) = api_signing_key("made-up");
    let r2 = r.clone();
    let made_up = tokio::spawn(async move {
        r2.authenticate(&signed_token(&forger, "made-up", "forged"))
            .await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Meanwhile a token under a known key is answered at once.
    let known = tokio::time::timeout(
        Duration::from_millis(1000),
        r.authenticate(&signed_token(&k1, "k1", "agent-on-node-a")),
    )
    .await
    .expect("a token under a known key waited for the keys' read");
    assert!(known.is_ok(), "{known:?}");
    let err = made_up.await.unwrap().unwrap_err();
    assert!(
        matches!(&err, certs::ca::auth::AuthError::Unauthenticated { reason } if reason.contains("does not publish")),
        "{err}"
    );
    assert_eq!(seen("forged"), 0);
    // That read brought k2: its tokens are accepted now.
    api.jwks_delay_ms.store(0, Ordering::SeqCst);
    let caller = r
        .authenticate(&signed_token(&k2, "k2", "agent-on-node-a"))
        .await
        .unwrap();
    assert_eq!(caller.node, "node-a");
    assert_eq!(api.jwks_fetches.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn without_the_signing_keys_every_token_goes_to_a_token_review() {
    let api = fake_api().await;
    let r = reviewer(&api, CA_OWN_TOKEN);
    // The API server does not publish its keys to the CA (404): no
    // verdict of the CA's own, the TokenReview decides, as before.
    let (forger, _) = api_signing_key("k1");
    assert!(
        r.authenticate(&signed_token(&forger, "k1", "agent-on-node-a"))
            .await
            .is_ok()
    );
    assert_eq!(api.seen.lock().unwrap().len(), 1);
    assert_eq!(
        api.jwks_fetches.load(Ordering::SeqCst),
        1,
        "not asked again at once"
    );
}

/// A node that could not reach the CA while a new root was prepared holds
/// only the old root; once the CA serves with a certificate of the new one
/// it cannot verify the CA, and learns the new root from the mounted trust
/// bundle (the ConfigMap the CA keeps current) instead of being locked out.
#[tokio::test]
async fn a_node_that_missed_a_rotation_trusts_the_mounted_bundle() {
    let clock = clock();
    let ca = ca(&clock);
    let old_bundle = ca.bundle();
    let new = ca.prepare_root_rotation().unwrap();
    ca.activate_root(&new).unwrap();
    let tokens = BootstrapTokens::new([("node-a", NODE_A_TOKEN)]).unwrap();
    let c = cluster_with(ca.clone(), Arc::new(tokens)).await;
    let dir = std::env::temp_dir().join(format!("certs-mounted-{}", rand::random::<u64>()));
    std::fs::create_dir_all(&dir).unwrap();
    let mounted = dir.join("trust-bundle.pem");
    let node = |bundle_file: Option<std::path::PathBuf>| {
        CaClient::new(CaClientConfig {
            endpoint: format!("https://{}", c.server.local_addr()),
            bundle: old_bundle.clone(),
            credential: Credential::Token(NODE_A_TOKEN.into()),
            timeout: Duration::from_secs(5),
            bundle_file,
        })
        .unwrap()
    };
    // Without a newer mounted bundle, the CA is not trusted.
    std::fs::write(&mounted, old_bundle.to_pem()).unwrap();
    let err = node(Some(mounted.clone()))
        .trust_bundle()
        .await
        .unwrap_err();
    assert!(err.to_string().contains("TLS"), "{err}");
    // Nor with a file that holds none of the node's roots (no continuation
    // of what it trusts), even one that would verify the CA.
    let only_new = certs::TrustBundle::from_pem(
        ca.trust_domain(),
        &certs::storage::certs_to_pem(
            &ca.bundle()
                .roots()
                .zip(ca.bundle().fingerprints())
                .filter(|(_, f)| *f == new)
                .map(|(r, _)| r.clone())
                .collect::<Vec<_>>(),
        ),
    )
    .unwrap();
    std::fs::write(&mounted, only_new.to_pem()).unwrap();
    assert!(node(Some(mounted.clone())).trust_bundle().await.is_err());
    // With the bundle the CA published (both roots), it is.
    std::fs::write(&mounted, ca.bundle().to_pem()).unwrap();
    let got = node(Some(mounted))
        .trust_bundle()
        .await
        .expect("the CA, trusted");
    assert!(got.fingerprints().contains(&new));
    assert!(node(None).trust_bundle().await.is_err());
    let _ = std::fs::remove_dir_all(&dir);
}
