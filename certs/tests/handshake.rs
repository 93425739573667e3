//! Real mutual TLS 1.3 handshakes over loopback with the identity manager's
//! configs, and every way a peer must be refused.

mod support;

use std::{sync::Arc, time::Duration};

use certs::{
    IdentityManager, ManualClock, TrustBundle, bundle,
    verify::{self, SpiffeServerVerifier, Usage, VerifyError},
    x509::CertInfo,
};
use rcgen::{CertificateParams, ExtendedKeyUsagePurpose, KeyPair, KeyUsagePurpose, SanType};
use rustls::ClientConfig;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use support::*;

#[tokio::test]
async fn mutual_tls13_each_side_sees_the_other_identity() {
    let clock = clock();
    let ca = ca(&clock);
    let cart = id("shop", "cart");
    let (pay, ledger) = (id("bank", "payments"), id("bank", "ledger.v2"));
    let a = node(&ca, &clock, std::slice::from_ref(&cart)).await;
    let b = node(&ca, &clock, &[pay.clone(), ledger.clone()]).await;

    for dst in [&pay, &ledger] {
        let (client_saw, server_saw) = tunnel(&a, &cart, &b, dst).await.ok();
        assert_eq!(
            &client_saw.identity, dst,
            "server presented the identity the SNI asked for"
        );
        assert_eq!(server_saw.identity, cart);
        assert_eq!(b.identity_for_sni(&dst.sni()).as_ref(), Some(dst));
        for seen in [&client_saw, &server_saw] {
            assert_eq!(seen.protocol, "TLSv1.3");
            assert_eq!(seen.alpn.as_deref(), Some("h2"));
            assert!(
                seen.cipher_suite.starts_with("TLS13_"),
                "{}",
                seen.cipher_suite
            );
        }
        // The peer's not-after is the one of the certificate the peer holds.
        let b_status = b.status();
        let st = b_status.iter().find(|s| &s.identity == dst).unwrap();
        let cert = st.certificate.as_ref().unwrap();
        assert_eq!(client_saw.peer_not_after, cert.not_after);
        assert_eq!(client_saw.peer_serial, cert.serial);
    }
}

#[tokio::test]
async fn client_requires_the_expected_server_identity() {
    let clock = clock();
    let ca = ca(&clock);
    let cart = id("shop", "cart");
    let pay = id("bank", "payments");
    let impostor = id("bank", "impostor");
    let a = node(&ca, &clock, std::slice::from_ref(&cart)).await;
    let b = node(&ca, &clock, std::slice::from_ref(&impostor)).await;
    // The client asks for `pay` but the server can only present `impostor`
    // (steered by SNI): the client refuses.
    let cfg = a.client_config(&cart, &pay).unwrap();
    let out = handshake(cfg, certs::server_name(&impostor), b.server_config()).await;
    let err = out.client_error();
    assert!(
        err.contains("payments") && err.contains("impostor"),
        "{err}"
    );
    // A server asked for an identity it does not hold presents nothing.
    let out = tunnel(&a, &cart, &b, &pay).await;
    assert!(out.client.is_err() && out.server.is_err(), "{out:?}");
}

#[tokio::test]
async fn expired_and_not_yet_valid_peers_are_refused() {
    let start = clock();
    let ca = ca(&start);
    let cart = id("shop", "cart");
    let pay = id("bank", "payments");
    let a = node(&ca, &start, std::slice::from_ref(&cart)).await;
    // B's clock is its own, so it can be moved alone.
    let b_clock = ManualClock::at(certs::Clock::now(&start));
    let b = node(&ca, &b_clock, std::slice::from_ref(&pay)).await;
    tunnel(&a, &cart, &b, &pay).await.ok();

    // 25 h later for B: A's client certificate (24 h) has expired.
    b_clock.advance(Duration::from_secs(25 * 3600));
    let out = tunnel(&a, &cart, &b, &pay).await;
    let err = out.server_error();
    assert!(err.to_lowercase().contains("expired"), "{err}");
    // By how long, at B's clock: 25 h less the certificate's 24 h from its
    // issue.
    assert_eq!(seconds_before(&err, " seconds ago"), Some(3600), "{err}");
    let st = b.status();
    assert_eq!(
        st[0].certificate.as_ref().unwrap().state,
        certs::status::CertState::Expired
    );

    // B's clock an hour behind: A's certificate is not valid yet (backdating
    // covers only five minutes of skew).
    b_clock.set(certs::Clock::now(&start) - Duration::from_secs(3600));
    let out = tunnel(&a, &cart, &b, &pay).await;
    let err = out.server_error();
    assert!(err.to_lowercase().contains("not valid yet"), "{err}");
    // The skew B's log shows: its clock an hour behind, less the 5 minutes
    // certificates are backdated.
    assert_eq!(
        seconds_before(&err, " seconds in future"),
        Some(3600 - 300),
        "{err}"
    );

    // And the client side rejects an expired server the same way (a config
    // taken while A's own certificate was valid).
    b_clock.set(certs::Clock::now(&start));
    let cfg = a.client_config(&cart, &pay).unwrap();
    start.advance(Duration::from_secs(25 * 3600));
    let out = handshake(cfg, certs::server_name(&pay), b.server_config()).await;
    assert!(
        out.client_error().to_lowercase().contains("expired"),
        "{out:?}"
    );
    // A new config with A's own certificate expired is not offered.
    let err = a.client_config(&cart, &pay).unwrap_err().to_string();
    assert!(err.contains("expired"), "{err}");
}

/// A node whose clock is behind the CA's by more than the 5 minutes
/// certificates are backdated holds no certificate, and says why: by how
/// many seconds, and what to check.
#[tokio::test]
async fn a_node_clock_behind_the_cas_is_named_as_the_cause() {
    let ca_clock = clock();
    let ca = ca(&ca_clock);
    let node_clock = ManualClock::at(certs::Clock::now(&ca_clock) - Duration::from_secs(600));
    let m = IdentityManager::new(ca.clone(), ca.bundle(), shared(&node_clock), fast_opts());
    let cart = id("shop", "cart");
    let report = m.set_identities([cart.clone()]).await.unwrap();
    assert!(report.issued.is_empty(), "{report:?}");
    let [(who, err)] = &report.failed[..] else {
        panic!("{report:?}");
    };
    assert_eq!(who, &cart);
    let err = err.to_string();
    assert!(
        err.contains("300 s after this node's clock") && err.contains("check NTP on this node"),
        "{err}"
    );
}

/// The number just before `suffix` in `text` ("(3300 seconds ago)").
fn seconds_before(text: &str, suffix: &str) -> Option<i64> {
    let head = &text[..text.find(suffix)?];
    let start = head.rfind(|c: char| !c.is_ascii_digit())? + 1;
    head[start..].parse().ok()
}

/// A leaf signed by `root` directly with rcgen, possibly malformed.
fn leaf(
    root: &TestRoot,
    sans: Vec<SanType>,
) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut p = CertificateParams::default();
    p.subject_alt_names = sans;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let cert = p.signed_by(&key, &root.issuer()).unwrap();
    (
        vec![cert.der().clone()],
        PrivatePkcs8KeyDer::from(key.serialize_der()).into(),
    )
}

fn uri(s: &str) -> SanType {
    SanType::URI(s.try_into().unwrap())
}

/// A plain rustls client presenting `chain`, checking the server like Sluice does.
fn raw_client(
    chain: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
    bundle: &TrustBundle,
    clock: &ManualClock,
    expected: &certs::SpiffeId,
) -> Arc<ClientConfig> {
    let b = ClientConfig::builder_with_provider(certs::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(SpiffeServerVerifier::new(
            bundle::shared(bundle.clone()),
            shared(clock),
            expected.clone(),
        )));
    let mut cfg = match chain {
        Some((c, k)) => b.with_client_auth_cert(c, k).unwrap(),
        None => b.with_no_client_auth(),
    };
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Arc::new(cfg)
}

#[tokio::test]
async fn server_refuses_missing_tampered_foreign_and_malformed_client_certificates() {
    let clock = clock();
    let root = TestRoot::new("sluice test root");
    let ca = root.ca(TD, &clock);
    let pay = id("bank", "payments");
    let b = node(&ca, &clock, std::slice::from_ref(&pay)).await;
    let bundle = ca.bundle();
    let try_client = |chain| {
        let cfg = raw_client(chain, &bundle, &clock, &pay);
        let server = b.server_config();
        let pay = pay.clone();
        async move { handshake(cfg, certs::server_name(&pay), server).await }
    };

    // Control: a well-formed leaf from the right root is accepted, which
    // shows the refusals below are about the certificate.
    let (_, seen) = try_client(Some(leaf(
        &root,
        vec![uri("spiffe://cluster.local/ns/shop/sa/cart")],
    )))
    .await
    .ok();
    assert_eq!(seen.identity, id("shop", "cart"));

    // No client certificate at all.
    let err = try_client(None).await.server_error();
    assert!(
        err.contains("No certificates") || err.contains("no certificate"),
        "{err}"
    );

    // Tampered: one bit of the signature flipped.
    let (mut chain, key) = leaf(&root, vec![uri("spiffe://cluster.local/ns/shop/sa/cart")]);
    let mut der = chain[0].to_vec();
    let n = der.len();
    der[n - 5] ^= 0x01;
    chain[0] = CertificateDer::from(der);
    let err = try_client(Some((chain, key))).await.server_error();
    assert!(
        err.contains("does not chain") || err.contains("Signature"),
        "{err}"
    );

    // Issued by a CA we do not trust (same trust domain, other root).
    let foreign = TestRoot::new("someone else's root");
    let err = try_client(Some(leaf(
        &foreign,
        vec![uri("spiffe://cluster.local/ns/shop/sa/cart")],
    )))
    .await
    .server_error();
    assert!(err.contains("does not chain"), "{err}");

    // Missing and multiple SPIFFE IDs.
    let err = try_client(Some(leaf(
        &root,
        vec![SanType::DnsName("cart.shop".try_into().unwrap())],
    )))
    .await
    .server_error();
    assert!(err.contains("no URI SAN"), "{err}");
    let err = try_client(Some(leaf(
        &root,
        vec![
            uri("spiffe://cluster.local/ns/shop/sa/cart"),
            uri("spiffe://cluster.local/ns/bank/sa/vault"),
        ],
    )))
    .await
    .server_error();
    assert!(err.contains("2 URI SANs"), "{err}");

    // Another trust domain, even under a root we trust.
    let err = try_client(Some(leaf(
        &root,
        vec![uri("spiffe://evil.example/ns/shop/sa/cart")],
    )))
    .await
    .server_error();
    assert!(err.contains("outside our trust domain"), "{err}");
}

#[test]
fn verify_chain_reports_each_rule() {
    let clock = clock();
    let now = certs::Clock::now(&clock);
    let root = TestRoot::new("r");
    let ca = root.ca(TD, &clock);
    let bundle = ca.bundle();
    let (good, _) = leaf(&root, vec![uri("spiffe://cluster.local/ns/a/sa/b")]);
    let peer = verify::verify_chain(&bundle, &good[0], &[], now, Usage::Server).unwrap();
    assert_eq!(peer.identity, id("a", "b"));
    assert_eq!(peer.leaf, CertInfo::parse(&good[0]).unwrap());

    let (two, _) = leaf(
        &root,
        vec![
            uri("spiffe://cluster.local/ns/a/sa/b"),
            uri("spiffe://cluster.local/ns/a/sa/c"),
        ],
    );
    assert!(matches!(
        verify::verify_chain(&bundle, &two[0], &[], now, Usage::Server),
        Err(VerifyError::Identity(
            certs::x509::CertError::MultipleUris { count: 2, .. }
        ))
    ));
    let (bad_uri, _) = leaf(&root, vec![uri("https://cluster.local/ns/a/sa/b")]);
    assert!(matches!(
        verify::verify_chain(&bundle, &bad_uri[0], &[], now, Usage::Server),
        Err(VerifyError::Identity(
            certs::x509::CertError::BadSpiffeId { .. }
        ))
    ));
    let (foreign, _) = leaf(&root, vec![uri("spiffe://other.example/ns/a/sa/b")]);
    assert!(matches!(
        verify::verify_chain(&bundle, &foreign[0], &[], now, Usage::Server),
        Err(VerifyError::ForeignTrustDomain { .. })
    ));
    // A leaf without the client-auth EKU is not a client.
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::default();
    p.subject_alt_names = vec![uri("spiffe://cluster.local/ns/a/sa/b")];
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let server_only = p.signed_by(&key, &root.issuer()).unwrap();
    assert!(verify::verify_chain(&bundle, server_only.der(), &[], now, Usage::Server).is_ok());
    assert!(matches!(
        verify::verify_chain(&bundle, server_only.der(), &[], now, Usage::Client),
        Err(VerifyError::Untrusted { .. })
    ));
}

#[tokio::test]
async fn a_dropped_identity_is_no_longer_served() {
    let clock = clock();
    let ca = ca(&clock);
    let cart = id("shop", "cart");
    let (pay, old) = (id("bank", "payments"), id("bank", "old"));
    let a = node(&ca, &clock, std::slice::from_ref(&cart)).await;
    let b = node(&ca, &clock, &[pay.clone(), old.clone()]).await;
    tunnel(&a, &cart, &b, &old).await.ok();
    let server_cfg = b.server_config();
    b.set_identities([pay.clone()]).await.unwrap();
    assert_eq!(b.identities(), vec![pay.clone()]);
    // Same server config object: the resolver follows the live set.
    let out = handshake(
        a.client_config(&cart, &old).unwrap(),
        certs::server_name(&old),
        server_cfg.clone(),
    )
    .await;
    assert!(out.server.is_err(), "{out:?}");
    tunnel(&a, &cart, &b, &pay).await.ok();
    assert!(matches!(
        b.client_config(&old, &cart),
        Err(certs::IdentityError::NotHeld { .. })
    ));
}
