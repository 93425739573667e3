//! Renewal, retries while the CA is down, the background loop, and root
//! rotation without a failed handshake. Time moves by the test's clock.

mod support;

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use certs::{
    Ca, CaError, CertificateAuthority, IdentityManager, TrustBundle,
    ca::{BoxFuture, Issued, SignRequest},
    status::CertState,
    verify::{self, Usage},
};
use support::*;

fn serial(m: &IdentityManager, id: &certs::SpiffeId) -> String {
    m.status()
        .into_iter()
        .find(|s| &s.identity == id)
        .and_then(|s| s.certificate)
        .map(|c| c.serial)
        .expect("identity has a certificate")
}

#[tokio::test]
async fn renewal_happens_at_half_life_and_the_next_handshake_uses_the_new_certificate() {
    let clock = clock();
    let ca = ca(&clock);
    let cart = id("shop", "cart");
    let pay = id("bank", "payments");
    let a = node(&ca, &clock, std::slice::from_ref(&cart)).await;
    let b = node(&ca, &clock, std::slice::from_ref(&pay)).await;
    // Configs taken once, before any renewal, as a listener would hold them.
    let a_client = a.client_config(&cart, &pay).unwrap();
    let b_server = b.server_config();
    let first = serial(&a, &cart);
    let (_, seen) = handshake(a_client.clone(), certs::server_name(&pay), b_server.clone())
        .await
        .ok();
    assert_eq!(seen.peer_serial, first);

    // Renewal is planned between 40 % and 50 % of the lifetime (24 h, and
    // the few minutes notBefore is set back for clock skew).
    let st = &a.status()[0];
    let cert = st.certificate.as_ref().unwrap();
    let (nb, lifetime) = (cert.not_before, cert.not_after - cert.not_before);
    let planned = st.next_renewal.unwrap() - nb;
    assert!(
        lifetime >= ::time::Duration::hours(24) && lifetime <= ::time::Duration::hours(25),
        "{lifetime}"
    );
    assert!(
        planned >= lifetime * 4 / 10 && planned <= lifetime / 2,
        "renewal planned {planned} after not-before, of a lifetime of {lifetime}"
    );

    clock.advance(Duration::from_secs(9 * 3600));
    assert!(a.rotate_due().await.issued.is_empty(), "too early to renew");
    assert_eq!(serial(&a, &cart), first);

    clock.advance(Duration::from_secs(3 * 3600 + 60));
    let report = a.rotate_due().await;
    assert_eq!(report.issued, vec![cart.clone()]);
    let second = serial(&a, &cart);
    assert_ne!(second, first);
    assert_eq!(
        a.status()[0].certificate.as_ref().unwrap().state,
        CertState::Valid
    );

    let (_, seen) = handshake(a_client, certs::server_name(&pay), b_server)
        .await
        .ok();
    assert_eq!(
        seen.peer_serial, second,
        "the renewed certificate is presented"
    );
}

/// A CA that can be switched off, like a CA service that is down.
#[derive(Debug)]
struct Flaky {
    ca: Arc<Ca>,
    down: AtomicBool,
}

impl CertificateAuthority for Flaky {
    fn sign(&self, request: SignRequest) -> BoxFuture<'_, Result<Issued, CaError>> {
        Box::pin(async move {
            if self.down.load(Ordering::SeqCst) {
                return Err(CaError::Unavailable {
                    endpoint: "test".into(),
                    reason: "switched off".into(),
                });
            }
            self.ca.sign(request).await
        })
    }
    fn trust_bundle(&self) -> BoxFuture<'_, Result<TrustBundle, CaError>> {
        self.ca.trust_bundle()
    }
}

/// A CA whose bundle answers can be switched off.
#[derive(Debug)]
struct BundleDown {
    ca: Arc<Ca>,
    down: AtomicBool,
}

impl CertificateAuthority for BundleDown {
    fn sign(&self, request: SignRequest) -> BoxFuture<'_, Result<Issued, CaError>> {
        self.ca.sign(request)
    }
    fn trust_bundle(&self) -> BoxFuture<'_, Result<TrustBundle, CaError>> {
        Box::pin(async move {
            if self.down.load(Ordering::SeqCst) {
                return Err(CaError::Unavailable {
                    endpoint: "test".into(),
                    reason: "switched off".into(),
                });
            }
            self.ca.trust_bundle().await
        })
    }
}

/// A bundle refresh that fails is tried again within seconds, not a whole
/// refresh period (5 minutes) later: a root prepared meanwhile reaches the
/// node before an operator following the rotation steps activates it.
#[tokio::test]
async fn a_failed_bundle_refresh_is_retried_soon_and_a_prepared_root_arrives() {
    let clock = clock();
    let ca = ca(&clock);
    let cart = id("shop", "cart");
    let svc = Arc::new(BundleDown {
        ca: ca.clone(),
        down: AtomicBool::new(true),
    });
    let a = IdentityManager::new(svc.clone(), ca.bundle(), shared(&clock), fast_opts());
    a.set_identities([cart.clone()]).await.unwrap();
    let task = a.spawn();
    // The loop's first refresh fails; the root is prepared meanwhile.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let new_root = ca.prepare_root_rotation().unwrap();
    svc.down.store(false, Ordering::SeqCst);
    // Well within the first backoff steps, far from 5 minutes.
    clock.advance(Duration::from_secs(3));
    let deadline = Instant::now() + Duration::from_secs(10);
    while !a.trust_bundle().load().contains(&new_root) {
        assert!(
            Instant::now() < deadline,
            "the prepared root did not arrive after the failed refresh"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    task.abort();
}

/// An identity is awaited (a tunnel for it waits) while its first
/// certificate is on its way, not once an attempt has failed (a CA down is
/// no reason to hold requests) nor once it is held.
#[tokio::test]
async fn an_identity_is_awaited_only_while_its_first_certificate_is_on_its_way() {
    let clock = clock();
    let ca = ca(&clock);
    let flaky = Arc::new(Flaky {
        ca: ca.clone(),
        down: AtomicBool::new(true),
    });
    let cart = id("shop", "cart");
    let a = IdentityManager::new(flaky.clone(), ca.bundle(), shared(&clock), fast_opts());
    assert!(!a.awaiting(&cart), "not wanted");
    a.want([cart.clone()]).unwrap();
    assert!(a.awaiting(&cart), "wanted, no attempt yet");
    assert_eq!(a.rotate_due().await.failed.len(), 1);
    assert!(!a.awaiting(&cart), "its attempt failed");
    flaky.down.store(false, Ordering::SeqCst);
    clock.advance(Duration::from_secs(5));
    assert!(a.rotate_due().await.failed.is_empty());
    assert!(a.has_certificate(&cart));
    assert!(!a.awaiting(&cart), "held");
}

#[tokio::test]
async fn ca_outage_keeps_the_valid_certificate_and_retries_with_backoff() {
    let clock = clock();
    let ca = ca(&clock);
    let flaky = Arc::new(Flaky {
        ca: ca.clone(),
        down: AtomicBool::new(false),
    });
    let cart = id("shop", "cart");
    let pay = id("bank", "payments");
    let a = IdentityManager::new(flaky.clone(), ca.bundle(), shared(&clock), fast_opts());
    a.set_identities([cart.clone()]).await.unwrap();
    let b = node(&ca, &clock, std::slice::from_ref(&pay)).await;
    let first = serial(&a, &cart);

    flaky.down.store(true, Ordering::SeqCst);
    clock.advance(Duration::from_secs(12 * 3600 + 60));
    let report = a.rotate_due().await;
    assert_eq!(report.failed.len(), 1);
    let st = &a.status()[0];
    assert!(st.last_error.as_ref().unwrap().contains("switched off"));
    // Retry planned ~1 s later (first backoff step, ±10 %).
    let now = ::time::OffsetDateTime::from(certs::Clock::now(&clock));
    let wait = st.next_renewal.unwrap() - now;
    assert!(
        wait > ::time::Duration::milliseconds(800) && wait < ::time::Duration::milliseconds(1200),
        "{wait}"
    );
    // Still serving the old, still valid certificate.
    let (_, seen) = tunnel(&a, &cart, &b, &pay).await.ok();
    assert_eq!(seen.peer_serial, first);

    // Backoff doubles while the CA stays down.
    clock.advance(Duration::from_secs(2));
    assert_eq!(a.rotate_due().await.failed.len(), 1);
    let wait = a.status()[0].next_renewal.unwrap()
        - ::time::OffsetDateTime::from(certs::Clock::now(&clock));
    assert!(
        wait > ::time::Duration::milliseconds(1600) && wait < ::time::Duration::milliseconds(2400),
        "{wait}"
    );
    assert!(
        a.rotate_due().await.failed.is_empty(),
        "no attempt before the backoff ends"
    );

    flaky.down.store(false, Ordering::SeqCst);
    clock.advance(Duration::from_secs(3));
    assert_eq!(a.rotate_due().await.issued, vec![cart.clone()]);
    assert!(a.status()[0].last_error.is_none());
    let (_, seen) = tunnel(&a, &cart, &b, &pay).await.ok();
    assert_ne!(seen.peer_serial, first);

    // An outage that outlasts the certificate: no tunnel is offered with an
    // expired certificate (peers would refuse it with a bare alert); the
    // error says what expired and why it was not renewed.
    flaky.down.store(true, Ordering::SeqCst);
    clock.advance(Duration::from_secs(25 * 3600));
    assert_eq!(a.rotate_due().await.failed.len(), 1);
    let err = a.client_config(&cart, &pay).unwrap_err().to_string();
    assert!(
        err.contains("expired") && err.contains("switched off") && err.contains(&cart.to_string()),
        "{err}"
    );
}

/// A first issuance that fails in a round the caller ran (the agent's
/// feed, for a new pod) is retried by the background loop after the first
/// backoff step, ~1 s, not after the loop's longest sleep (30 s).
#[tokio::test]
async fn a_failed_first_issuance_is_retried_after_the_first_backoff() {
    let clock: certs::SharedClock = Arc::new(certs::SystemClock);
    let ca = Arc::new(Ca::generate(certs::CaOptions::default(), clock.clone()).unwrap());
    let flaky = Arc::new(Flaky {
        ca: ca.clone(),
        down: AtomicBool::new(true),
    });
    let a = IdentityManager::new(
        flaky.clone(),
        ca.bundle(),
        clock,
        certs::IdentityOptions::default(),
    );
    let task = a.spawn();
    // The loop has started and sleeps.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let cart = id("shop", "cart");
    let report = a.set_identities([cart.clone()]).await.unwrap();
    assert_eq!(report.failed.len(), 1);
    flaky.down.store(false, Ordering::SeqCst);
    let deadline = Instant::now() + Duration::from_secs(5);
    while !a.has_certificate(&cart) {
        assert!(
            Instant::now() < deadline,
            "not retried within 5 s of a first backoff of 1 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    task.abort();
}

/// A CA that counts the certificate requests it holds at once.
#[derive(Debug)]
struct Counting {
    ca: Arc<Ca>,
    now: std::sync::atomic::AtomicUsize,
    most: std::sync::atomic::AtomicUsize,
}

impl CertificateAuthority for Counting {
    fn sign(&self, request: SignRequest) -> BoxFuture<'_, Result<Issued, CaError>> {
        Box::pin(async move {
            let n = self.now.fetch_add(1, Ordering::SeqCst) + 1;
            self.most.fetch_max(n, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(100)).await;
            self.now.fetch_sub(1, Ordering::SeqCst);
            self.ca.sign(request).await
        })
    }
    fn trust_bundle(&self) -> BoxFuture<'_, Result<TrustBundle, CaError>> {
        self.ca.trust_bundle()
    }
}

/// Two rounds at once (the agent's feed adding pods while a round it ran
/// is in flight) hold no more requests to the CA than `concurrency` in all:
/// the CA takes only so many connections from one address.
#[tokio::test]
async fn rounds_at_once_share_the_concurrency() {
    let clock = clock();
    let counting = Arc::new(Counting {
        ca: ca(&clock),
        now: Default::default(),
        most: Default::default(),
    });
    let bundle = counting.ca.bundle();
    let a = IdentityManager::new(counting.clone(), bundle, shared(&clock), fast_opts());
    let first: Vec<_> = (0..20).map(|i| id("shop", &format!("a{i}"))).collect();
    let all: Vec<_> = (0..20)
        .map(|i| id("shop", &format!("b{i}")))
        .chain(first.clone())
        .collect();
    let (r1, r2) = tokio::join!(a.set_identities(first), async {
        tokio::time::sleep(Duration::from_millis(5)).await;
        a.set_identities(all).await
    });
    let issued = r1.unwrap().issued.len() + r2.unwrap().issued.len();
    assert_eq!(issued, 40);
    let most = counting.most.load(Ordering::SeqCst);
    assert!(
        most <= certs::IdentityOptions::default().concurrency,
        "{most} at once"
    );
}

#[tokio::test]
async fn the_background_loop_renews_without_being_asked() {
    let clock = clock();
    let ca = ca(&clock);
    let cart = id("shop", "cart");
    let a = node(&ca, &clock, std::slice::from_ref(&cart)).await;
    let first = serial(&a, &cart);
    let task = a.spawn();
    clock.advance(Duration::from_secs(12 * 3600 + 60));
    let deadline = Instant::now() + Duration::from_secs(10);
    while serial(&a, &cart) == first {
        assert!(
            Instant::now() < deadline,
            "the loop did not renew within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    task.abort();
}

#[tokio::test]
async fn root_rotation_without_a_failed_handshake() {
    let clock = clock();
    let ca = ca(&clock);
    let cart = id("shop", "cart");
    let pay = id("bank", "payments");
    let a = node(&ca, &clock, std::slice::from_ref(&cart)).await;
    let b = node(&ca, &clock, std::slice::from_ref(&pay)).await;
    let old_root = ca.bundle().active_root();
    let old_leaf_of_a = leaf_der(&a, &cart).await;
    // Both directions, checked at every step.
    let both_ways = || async {
        tunnel(&a, &cart, &b, &pay).await.ok();
        tunnel(&b, &pay, &a, &cart).await.ok();
    };
    both_ways().await;

    // 1. The new root joins the bundle; nothing is signed by it yet.
    let new_root = ca.prepare_root_rotation().unwrap();
    assert!(a.refresh_trust_bundle().await.unwrap());
    both_ways().await; // B has not refreshed yet: still fine.
    assert!(b.refresh_trust_bundle().await.unwrap());
    assert_eq!(a.bundle_status().roots.len(), 2);
    assert!(
        a.rotate_due().await.issued.is_empty(),
        "no reissue before the root is active"
    );
    both_ways().await;

    // 2. Activation: nodes see the new active root and reissue within the
    // rotation spread. A goes first; B still holds an old-root leaf.
    ca.activate_root(&new_root).unwrap();
    a.refresh_trust_bundle().await.unwrap();
    clock.advance(Duration::from_secs(61));
    assert_eq!(a.rotate_due().await.issued, vec![cart.clone()]);
    assert_eq!(
        a.status()[0].certificate.as_ref().unwrap().root,
        Some(new_root)
    );
    both_ways().await;
    b.refresh_trust_bundle().await.unwrap();
    clock.advance(Duration::from_secs(61));
    assert_eq!(b.rotate_due().await.issued, vec![pay.clone()]);
    both_ways().await;

    // 3. Retire the old root: refused while its leaves may be valid, forced
    // once every node reissued.
    assert!(ca.retire_root(&old_root, false).is_err());
    ca.retire_root(&old_root, true).unwrap();
    a.refresh_trust_bundle().await.unwrap();
    b.refresh_trust_bundle().await.unwrap();
    assert_eq!(b.bundle_status().roots.len(), 1);
    both_ways().await;
    // A leaf under the retired root is now refused; the current one passes.
    let bundle = ca.bundle();
    let now = certs::Clock::now(&clock);
    let err = verify::verify_chain(&bundle, &old_leaf_of_a, &[], now, Usage::Client).unwrap_err();
    assert!(
        matches!(err, verify::VerifyError::Untrusted { .. }),
        "{err}"
    );
    let current =
        verify::verify_chain(&bundle, &leaf_der(&a, &cart).await, &[], now, Usage::Client).unwrap();
    assert_eq!(current.root, Some(new_root));
}

/// The DER of the certificate `a` presents for `id` (via a handshake with a
/// probing server).
async fn leaf_der(
    a: &IdentityManager,
    id: &certs::SpiffeId,
) -> rustls_pki_types::CertificateDer<'static> {
    // Status carries the facts; for DER, present as a server and read it back.
    let probe = a.client_config(id, id).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = a.server_config();
    let t = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let tls = tokio_rustls::TlsAcceptor::from(server)
            .accept(tcp)
            .await
            .unwrap();
        tls.get_ref().1.peer_certificates().unwrap()[0]
            .clone()
            .into_owned()
    });
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let _c = tokio_rustls::TlsConnector::from(probe)
        .connect(certs::server_name(id), tcp)
        .await
        .unwrap();
    t.await.unwrap()
}

/// A CA that never answers while `hang` is set.
#[derive(Debug)]
struct Hanging {
    ca: Arc<Ca>,
    hang: AtomicBool,
}

impl CertificateAuthority for Hanging {
    fn sign(&self, request: SignRequest) -> BoxFuture<'_, Result<Issued, CaError>> {
        Box::pin(async move {
            if self.hang.load(Ordering::SeqCst) {
                std::future::pending::<()>().await;
            }
            self.ca.sign(request).await
        })
    }
    fn trust_bundle(&self) -> BoxFuture<'_, Result<TrustBundle, CaError>> {
        self.ca.trust_bundle()
    }
}

/// A rotation given up half way (its caller timed out) does not leave the
/// identity marked in flight: the next rotation renews it.
#[tokio::test]
async fn a_rotation_cut_short_does_not_stop_later_renewals() {
    let clock = clock();
    let ca = ca(&clock);
    let hanging = Arc::new(Hanging {
        ca: ca.clone(),
        hang: AtomicBool::new(false),
    });
    let cart = id("shop", "cart");
    let a = IdentityManager::new(hanging.clone(), ca.bundle(), shared(&clock), fast_opts());
    a.set_identities([cart.clone()]).await.unwrap();
    let first = serial(&a, &cart);

    clock.advance(Duration::from_secs(12 * 3600 + 60));
    hanging.hang.store(true, Ordering::SeqCst);
    let cut = tokio::time::timeout(Duration::from_millis(100), a.rotate_due()).await;
    assert!(cut.is_err(), "the CA hangs: the rotation is given up");

    hanging.hang.store(false, Ordering::SeqCst);
    let report = a.rotate_due().await;
    assert_eq!(report.issued, vec![cart.clone()]);
    assert_ne!(serial(&a, &cart), first);
}

/// A CA whose reply to the first request, sent before a root rotation,
/// arrives after the reply to a second one sent after it: the first reply
/// carries the CA's roots as they were when it was sent.
#[derive(Debug)]
struct Straddle {
    ca: Arc<Ca>,
    first: std::sync::Mutex<Option<tokio::sync::oneshot::Receiver<()>>>,
}

impl CertificateAuthority for Straddle {
    fn sign(&self, request: SignRequest) -> BoxFuture<'_, Result<Issued, CaError>> {
        Box::pin(async move {
            let wait = self.first.lock().unwrap().take();
            match wait {
                Some(release) => {
                    let roots_then = self.ca.bundle();
                    let _ = release.await;
                    let mut issued = self.ca.sign(request).await?;
                    issued.trust_bundle = roots_then;
                    Ok(issued)
                }
                None => self.ca.sign(request).await,
            }
        })
    }
    fn trust_bundle(&self) -> BoxFuture<'_, Result<TrustBundle, CaError>> {
        self.ca.trust_bundle()
    }
}

#[tokio::test]
async fn a_late_reply_with_older_roots_does_not_undo_a_rotation() {
    let clock = clock();
    let ca = ca(&clock);
    let (release, wait) = tokio::sync::oneshot::channel();
    let straddle = Arc::new(Straddle {
        ca: ca.clone(),
        first: std::sync::Mutex::new(Some(wait)),
    });
    let (cart, pay) = (id("shop", "cart"), id("bank", "payments"));
    let m = IdentityManager::new(straddle.clone(), ca.bundle(), shared(&clock), fast_opts());
    // The first request leaves before the rotation and is held.
    let slow = {
        let m = m.clone();
        let cart = cart.clone();
        tokio::spawn(async move { m.set_identities([cart]).await })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    let new_root = ca.prepare_root_rotation().unwrap();
    // The second leaves after it and brings the new root.
    m.add(pay.clone()).await.unwrap();
    assert!(m.trust_bundle().load().fingerprints().contains(&new_root));
    // The first reply comes last, with the roots of before.
    release.send(()).unwrap();
    slow.await.unwrap().unwrap();
    assert!(
        m.trust_bundle().load().fingerprints().contains(&new_root),
        "the older reply put back the bundle without the new root"
    );
}

/// A node whose clock runs 13 h ahead of the CA's gets certificates that are
/// due for renewal (by its clock) as soon as they are issued: it renews
/// them halfway to what is left of them, not every second.
#[tokio::test]
async fn a_node_clock_ahead_of_the_cas_does_not_renew_in_a_loop() {
    let ca_clock = clock();
    let node_clock = clock();
    node_clock.advance(Duration::from_secs(13 * 3600));
    let ca = ca(&ca_clock);
    let cart = id("shop", "cart");
    let a = node(&ca, &node_clock, std::slice::from_ref(&cart)).await;
    let first = serial(&a, &cart);
    // Left by the node's clock: 24 h - 13 h (+ the CA's 5 min backdate).
    let next = a.status()[0].next_renewal.unwrap();
    let nb = a.status()[0].certificate.as_ref().unwrap().not_before;
    let planned = next - nb;
    assert!(
        planned >= ::time::Duration::hours(18) && planned <= ::time::Duration::hours(19),
        "renewal planned {planned} after not-before"
    );
    for _ in 0..5 {
        node_clock.advance(Duration::from_secs(1));
        assert!(
            a.rotate_due().await.issued.is_empty(),
            "renewed again at once"
        );
    }
    assert_eq!(serial(&a, &cart), first);
}

/// A CA whose answers to signing requests wait at a gate after signing
/// (a slow round trip back), while the test changes things meanwhile.
#[derive(Debug)]
struct SlowReply {
    ca: Arc<Ca>,
    /// Answers wait for `release` while set.
    held: AtomicBool,
    release: tokio::sync::Notify,
    signed: tokio::sync::Notify,
}

impl CertificateAuthority for SlowReply {
    fn sign(&self, request: SignRequest) -> BoxFuture<'_, Result<Issued, CaError>> {
        Box::pin(async move {
            let r = self.ca.sign(request).await;
            if self.held.load(Ordering::SeqCst) {
                self.signed.notify_one();
                self.release.notified().await;
            }
            r
        })
    }
    fn trust_bundle(&self) -> BoxFuture<'_, Result<TrustBundle, CaError>> {
        self.ca.trust_bundle()
    }
}

/// A renewal signed by the old root, whose answer comes back after the node
/// has learnt of the new active root, is reissued within the rotation
/// spread like the node's other certificates, not at its half-life.
#[tokio::test]
async fn a_renewal_signed_by_the_old_root_during_activation_is_reissued_soon() {
    let clock = clock();
    let ca = ca(&clock);
    let slow = Arc::new(SlowReply {
        ca: ca.clone(),
        held: AtomicBool::new(false),
        release: tokio::sync::Notify::new(),
        signed: tokio::sync::Notify::new(),
    });
    let cart = id("shop", "cart");
    let m = IdentityManager::new(slow.clone(), ca.bundle(), shared(&clock), fast_opts());
    m.set_identities([cart.clone()]).await.unwrap();
    let old_root = ca.bundle().active_root();
    // The next answer waits.
    slow.held.store(true, Ordering::SeqCst);
    assert!(m.renew_now(&cart));
    let renewing = tokio::spawn({
        let m = m.clone();
        async move { m.rotate_due().await }
    });
    slow.signed.notified().await;
    // Signed by the old root; meanwhile the root rotates and the node
    // learns of it.
    let new_root = ca.prepare_root_rotation().unwrap();
    ca.activate_root(&new_root).unwrap();
    assert!(m.refresh_trust_bundle().await.unwrap());
    slow.held.store(false, Ordering::SeqCst);
    slow.release.notify_one();
    let report = renewing.await.unwrap();
    assert_eq!(report.issued, vec![cart.clone()]);
    let st = m.status().into_iter().find(|s| s.identity == cart).unwrap();
    assert_eq!(st.certificate.as_ref().unwrap().root, Some(old_root));
    let next = st.next_renewal.unwrap();
    let now = ::time::OffsetDateTime::from(certs::Clock::now(&clock));
    assert!(
        next - now <= ::time::Duration::seconds(61),
        "reissued at {next}, {} from now",
        next - now
    );
}

/// A CA that, once armed, never answers for one identity.
#[derive(Debug)]
struct HangsFor {
    ca: Arc<Ca>,
    hung: certs::SpiffeId,
    armed: AtomicBool,
    hanging: tokio::sync::Notify,
}

impl CertificateAuthority for HangsFor {
    fn sign(&self, request: SignRequest) -> BoxFuture<'_, Result<Issued, CaError>> {
        Box::pin(async move {
            if self.armed.load(Ordering::SeqCst) && request.identity == self.hung {
                self.hanging.notify_one();
                std::future::pending::<()>().await;
            }
            self.ca.sign(request).await
        })
    }
    fn trust_bundle(&self) -> BoxFuture<'_, Result<TrustBundle, CaError>> {
        self.ca.trust_bundle()
    }
}

/// A renewal round its caller gives up on (one identity's request hangs)
/// keeps the certificates it already obtained: they are in force, and the
/// one left is tried again in the next round.
#[tokio::test]
async fn a_round_given_up_keeps_what_it_obtained() {
    let clock = clock();
    let ca = ca(&clock);
    let (cart, pay) = (id("shop", "cart"), id("bank", "payments"));
    let hangs = Arc::new(HangsFor {
        ca: ca.clone(),
        hung: pay.clone(),
        armed: AtomicBool::new(false),
        hanging: tokio::sync::Notify::new(),
    });
    let m = IdentityManager::new(hangs.clone(), ca.bundle(), shared(&clock), fast_opts());
    m.set_identities([cart.clone(), pay.clone()]).await.unwrap();
    let before = serial(&m, &cart);
    // Both due; payments' request never returns.
    hangs.armed.store(true, Ordering::SeqCst);
    clock.advance(Duration::from_secs(13 * 3600));
    let round = tokio::spawn({
        let m = m.clone();
        async move { m.rotate_due().await }
    });
    hangs.hanging.notified().await;
    // cart's answer comes back while payments' hangs; then the round is
    // given up.
    let deadline = Instant::now() + Duration::from_secs(10);
    while serial(&m, &cart) == before && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    round.abort();
    let _ = round.await;
    assert_ne!(
        serial(&m, &cart),
        before,
        "cart's new certificate was dropped"
    );
    // And payments is tried again in the next round.
    hangs.armed.store(false, Ordering::SeqCst);
    let pay_before = serial(&m, &pay);
    assert_eq!(m.rotate_due().await.issued, vec![pay.clone()]);
    assert_ne!(serial(&m, &pay), pay_before);
}
