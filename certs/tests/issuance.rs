//! The CA: what a workload certificate contains, read back with x509-parser,
//! and what the CA refuses.

mod support;

use std::{os::unix::fs::PermissionsExt as _, time::Duration};

use ::time::OffsetDateTime;
use certs::{Ca, CaError, CaOptions, ca::CaPem, storage::PrivateKeyPem, verify, x509::CertInfo};
use rcgen::{CertificateParams, KeyPair, SanType};
use support::*;
use x509_parser::{
    extensions::{GeneralName, ParsedExtension},
    prelude::*,
};

fn csr(san: Vec<SanType>, key: &KeyPair) -> Vec<u8> {
    let mut p = CertificateParams::default();
    p.distinguished_name = rcgen::DistinguishedName::new();
    p.subject_alt_names = san;
    p.serialize_request(key).unwrap().der().to_vec()
}

fn uri(s: &str) -> SanType {
    SanType::URI(s.try_into().unwrap())
}

fn check_leaf(der: &[u8], expect_id: &str, issued_at: OffsetDateTime) {
    let (_, cert) = parse_x509_certificate(der).unwrap();
    // Exactly one SAN, the URI of the authorised identity.
    let san = cert
        .subject_alternative_name()
        .unwrap()
        .expect("SAN present");
    assert_eq!(san.value.general_names, vec![GeneralName::URI(expect_id)]);
    assert!(san.critical, "empty subject requires a critical SAN");
    let ku = cert.key_usage().unwrap().expect("key usage present");
    assert!(ku.critical);
    assert!(ku.value.digital_signature());
    assert!(!ku.value.key_cert_sign() && !ku.value.crl_sign());
    let eku = cert.extended_key_usage().unwrap().expect("EKU present");
    assert!(eku.value.server_auth && eku.value.client_auth);
    assert!(!eku.value.any && !eku.value.code_signing);
    assert!(!cert.is_ca());
    let bc = cert
        .extensions()
        .iter()
        .find_map(|e| match e.parsed_extension() {
            ParsedExtension::BasicConstraints(bc) => Some(bc.ca),
            _ => None,
        });
    assert_eq!(bc, Some(false), "basicConstraints cA=false");
    // 24 h lifetime, backdated by 5 minutes.
    let nb = cert.validity().not_before.to_datetime();
    let na = cert.validity().not_after.to_datetime();
    let backdate = issued_at - nb;
    assert!(
        backdate >= ::time::Duration::minutes(5) - ::time::Duration::seconds(1)
            && backdate <= ::time::Duration::minutes(5) + ::time::Duration::seconds(1),
        "backdate {backdate}"
    );
    let life = na - issued_at;
    assert!(
        (life - ::time::Duration::hours(24)).abs() <= ::time::Duration::seconds(1),
        "life {life}"
    );
    // 128-bit random serial, positive.
    let serial = cert.raw_serial();
    let significant: Vec<u8> = serial.iter().copied().skip_while(|b| *b == 0).collect();
    assert!(
        serial.len() >= 16 && serial.len() <= 17 && significant.len() >= 14,
        "{serial:?}"
    );
    assert!(serial[0] & 0x80 == 0, "serial must be a positive INTEGER");
}

#[test]
fn issued_certificate_has_san_eku_validity_and_chains_to_the_root() {
    for intermediate in [false, true] {
        let clock = clock();
        let ca = Ca::generate(
            CaOptions {
                intermediate,
                ..CaOptions::default()
            },
            shared(&clock),
        )
        .unwrap();
        let wid = id("shop", "cart.v2");
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let issued = ca
            .sign_csr(&csr(vec![uri(wid.as_str())], &key), &wid)
            .unwrap();
        assert_eq!(issued.chain.len(), if intermediate { 2 } else { 1 });
        check_leaf(
            &issued.chain[0],
            wid.as_str(),
            OffsetDateTime::from(clock_now(&clock)),
        );
        // The certificate certifies the CSR's key.
        let (_, leaf) = parse_x509_certificate(&issued.chain[0]).unwrap();
        use rcgen::PublicKeyData as _;
        assert_eq!(
            leaf.public_key().raw,
            key.subject_public_key_info().as_slice()
        );
        let peer = verify::verify_chain(
            &issued.trust_bundle,
            &issued.chain[0],
            &issued.chain[1..],
            clock_now(&clock),
            verify::Usage::Client,
        )
        .unwrap();
        assert_eq!(peer.identity, wid);
        assert_eq!(peer.root, Some(issued.trust_bundle.active_root()));
        // Two issuances have different serials.
        let again = ca
            .sign_csr(&csr(vec![uri(wid.as_str())], &key), &wid)
            .unwrap();
        assert_ne!(
            CertInfo::parse(&again.chain[0]).unwrap().serial,
            CertInfo::parse(&issued.chain[0]).unwrap().serial
        );
        assert_eq!(ca.status().issued, 2);
    }
}

/// Past its signer's end the CA service has no certificate to serve: an
/// error that says so, not one that expired before it was made.
#[test]
fn no_serving_certificate_once_the_signer_has_expired() {
    let clock = clock();
    let ca = ca(&clock);
    assert!(ca.issue_serving_certificate(&["sluice-ca"], &[]).is_ok());
    clock.advance(Duration::from_secs(11 * 365 * 24 * 3600));
    let e = ca
        .issue_serving_certificate(&["sluice-ca"], &[])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("expired at") && e.contains("rotate the root"),
        "{e}"
    );
}

fn clock_now(c: &certs::ManualClock) -> std::time::SystemTime {
    use certs::Clock as _;
    c.now()
}

#[test]
fn configurable_lifetime() {
    let clock = clock();
    let ca = Ca::generate(
        CaOptions {
            leaf_lifetime: Duration::from_secs(3600),
            ..CaOptions::default()
        },
        shared(&clock),
    )
    .unwrap();
    let wid = id("a", "b");
    let key = KeyPair::generate().unwrap();
    let info = CertInfo::parse(
        &ca.sign_csr(&csr(vec![uri(wid.as_str())], &key), &wid)
            .unwrap()
            .chain[0],
    )
    .unwrap();
    // X.509 times have whole seconds.
    let life = info.not_after - OffsetDateTime::from(clock_now(&clock));
    assert!(
        (life - ::time::Duration::hours(1)).abs() < ::time::Duration::seconds(1),
        "{life}"
    );
}

#[test]
fn a_signer_too_close_to_its_end_refuses_rather_than_issue_a_leaf_due_at_once() {
    let clock = clock();
    let ca = Ca::generate(CaOptions::default(), shared(&clock)).unwrap();
    let wid = id("a", "b");
    let key = KeyPair::generate().unwrap();
    let sign = || ca.sign_csr(&csr(vec![uri(wid.as_str())], &key), &wid);
    // A day before the root's end: a leaf capped at it, a day long.
    clock.advance(CaOptions::default().root_lifetime - Duration::from_secs(24 * 3600));
    let info = CertInfo::parse(&sign().unwrap().chain[0]).unwrap();
    assert!(info.not_after - OffsetDateTime::from(clock_now(&clock)) > ::time::Duration::hours(20));
    // Four minutes before: refused, naming the fix.
    clock.advance(Duration::from_secs(24 * 3600 - 240));
    let msg = sign().expect_err("refused").to_string();
    assert!(
        msg.contains("too soon to issue") && msg.contains("mesh-agent ca rotate"),
        "{msg}"
    );
}

#[test]
fn a_lifetime_that_would_renew_continuously_is_refused() {
    // Certificates start 5 minutes early; renewed at half their life, a
    // 90 s certificate would be due as soon as issued.
    let err = Ca::generate(
        CaOptions {
            leaf_lifetime: Duration::from_secs(90),
            ..CaOptions::default()
        },
        shared(&clock()),
    )
    .expect_err("refused");
    let msg = err.to_string();
    assert!(
        msg.contains("--workload-cert-ttl") && msg.contains("twice the backdate of 300s"),
        "{msg}"
    );
}

#[test]
fn csr_for_another_identity_is_refused() {
    let clock = clock();
    let ca = ca(&clock);
    let key = KeyPair::generate().unwrap();
    let authorised = id("shop", "cart");
    let err = ca
        .sign_csr(
            &csr(vec![uri(id("bank", "vault").as_str())], &key),
            &authorised,
        )
        .unwrap_err();
    assert!(matches!(err, CaError::IdentityMismatch { .. }), "{err}");
    assert!(
        err.to_string()
            .contains("spiffe://cluster.local/ns/bank/sa/vault"),
        "{err}"
    );
    // An extra SAN next to the right one is refused as well.
    let err = ca
        .sign_csr(
            &csr(
                vec![
                    uri(authorised.as_str()),
                    SanType::DnsName("evil.example".try_into().unwrap()),
                ],
                &key,
            ),
            &authorised,
        )
        .unwrap_err();
    assert!(matches!(err, CaError::IdentityMismatch { .. }), "{err}");
    // No SAN at all.
    let err = ca.sign_csr(&csr(vec![], &key), &authorised).unwrap_err();
    assert!(matches!(err, CaError::IdentityMismatch { .. }), "{err}");
    // Authorised identity of another trust domain.
    let foreign = certs::SpiffeId::new("other.example", "shop", "cart").unwrap();
    let err = ca
        .sign_csr(&csr(vec![uri(foreign.as_str())], &key), &foreign)
        .unwrap_err();
    assert!(matches!(err, CaError::ForeignTrustDomain { .. }), "{err}");
    assert_eq!(ca.status().issued, 0);
}

#[test]
fn tampered_or_garbage_csr_is_refused() {
    let clock = clock();
    let ca = ca(&clock);
    let wid = id("shop", "cart");
    let key = KeyPair::generate().unwrap();
    let mut der = csr(vec![uri(wid.as_str())], &key);
    // Flip a bit in the signature (the last bytes).
    let n = der.len();
    der[n - 3] ^= 0x01;
    let err = ca.sign_csr(&der, &wid).unwrap_err();
    assert!(matches!(err, CaError::InvalidCsr { .. }), "{err}");
    let err = ca.sign_csr(b"not a csr", &wid).unwrap_err();
    assert!(matches!(err, CaError::InvalidCsr { .. }), "{err}");
    // A P-384 key is refused: workloads use P-256.
    let k384 = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
    let err = ca
        .sign_csr(&csr(vec![uri(wid.as_str())], &k384), &wid)
        .unwrap_err();
    assert!(err.to_string().contains("P-256"), "{err}");
}

#[test]
fn root_is_stored_with_mode_0600_and_reloaded() {
    let dir = std::env::temp_dir().join(format!("certs-ca-{}", rand::random::<u64>()));
    let clock = clock();
    let ca = Ca::open_or_create(&dir, CaOptions::default(), shared(&clock)).unwrap();
    let fp = ca.bundle().active_root();
    let key_mode = std::fs::metadata(dir.join("root-key.pem"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(key_mode & 0o777, 0o600);
    assert_eq!(
        std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777,
        0o700
    );
    // Debug output never carries key material.
    let dbg = format!("{ca:?}");
    assert!(!dbg.contains("PRIVATE KEY"), "{dbg}");
    drop(ca);
    let again = Ca::open_or_create(&dir, CaOptions::default(), shared(&clock)).unwrap();
    assert_eq!(again.bundle().active_root(), fp);
    let wid = id("a", "b");
    let key = KeyPair::generate().unwrap();
    let issued = again
        .sign_csr(&csr(vec![uri(wid.as_str())], &key), &wid)
        .unwrap();
    verify::verify_chain(
        &again.bundle(),
        &issued.chain[0],
        &[],
        clock_now(&clock),
        verify::Usage::Server,
    )
    .unwrap();

    // A rotation prepared before a restart survives it.
    let next = again.prepare_root_rotation().unwrap();
    // Twice is out of order, and says so.
    let e = again.prepare_root_rotation().unwrap_err().to_string();
    assert!(
        e.contains(&format!("root {next} is already prepared")) && !e.contains("retired"),
        "{e}"
    );
    drop(again);
    let third = Ca::open_or_create(&dir, CaOptions::default(), shared(&clock)).unwrap();
    assert_eq!(third.bundle().fingerprints(), vec![fp, next]);
    third.activate_root(&next).unwrap();
    drop(third);
    let fourth = Ca::open_or_create(&dir, CaOptions::default(), shared(&clock)).unwrap();
    assert_eq!(fourth.bundle().active_root(), next);
    assert_eq!(fourth.bundle().fingerprints().len(), 2);
    // After a restart the old root may still have valid leaves: retiring it
    // needs force until a leaf lifetime has passed.
    assert!(fourth.retire_root(&fp, false).is_err());
    clock.advance(Duration::from_secs(24 * 3600 + 1));
    fourth.retire_root(&fp, false).unwrap();
    assert_eq!(fourth.bundle().fingerprints(), vec![next]);
    drop(fourth);
    let fifth = Ca::open_or_create(&dir, CaOptions::default(), shared(&clock)).unwrap();
    assert_eq!(fifth.bundle().fingerprints(), vec![next]);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A CA directory others can write to, a root key others can read, a root
/// key without its certificate, or a lock file that is a link: the CA does
/// not start, says what to fix, and changes nothing.
#[test]
fn a_ca_directory_that_is_not_private_or_lost_its_certificate_is_refused() {
    let dir = std::env::temp_dir().join(format!("certs-ca-{}", rand::random::<u64>()));
    let clock = clock();
    let ca = Ca::open_or_create(&dir, CaOptions::default(), shared(&clock)).unwrap();
    let fp = ca.bundle().active_root();
    drop(ca);
    let key = std::fs::read(dir.join("root-key.pem")).unwrap();
    let set_mode = |path: &std::path::Path, mode: u32| {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap()
    };
    let refused = |what: &str| {
        let err = Ca::open_or_create(&dir, CaOptions::default(), shared(&clock))
            .expect_err(what)
            .to_string();
        assert_eq!(
            std::fs::read(dir.join("root-key.pem")).unwrap(),
            key,
            "{what}: the key changed"
        );
        err
    };
    set_mode(&dir, 0o777);
    let err = refused("a world-writable directory");
    assert!(
        err.contains("writable by everyone") && err.contains("chmod 700"),
        "{err}"
    );
    set_mode(&dir, 0o700);
    set_mode(&dir.join("root-key.pem"), 0o604);
    let err = refused("a readable root key");
    assert!(
        err.contains("root-key.pem") && err.contains("chmod 600"),
        "{err}"
    );
    set_mode(&dir.join("root-key.pem"), 0o600);
    // The lock is not taken through a link (which it would truncate).
    let victim = dir.with_extension("victim");
    std::fs::write(&victim, b"keep me").unwrap();
    std::fs::remove_file(dir.join(".lock")).ok();
    std::os::unix::fs::symlink(&victim, dir.join(".lock")).unwrap();
    let err = refused("a lock file that is a link");
    assert!(err.contains("locking"), "{err}");
    assert_eq!(std::fs::read(&victim).unwrap(), b"keep me");
    std::fs::remove_file(dir.join(".lock")).unwrap();
    std::fs::remove_file(&victim).unwrap();
    // A key without its certificate is not replaced by a new root.
    let cert = std::fs::read(dir.join("root-cert.pem")).unwrap();
    std::fs::remove_file(dir.join("root-cert.pem")).unwrap();
    let err = refused("a key without its certificate");
    assert!(
        err.contains("no root-cert.pem") && err.contains("restore"),
        "{err}"
    );
    // Put back as it was, it starts with the same root.
    std::fs::write(dir.join("root-cert.pem"), cert).unwrap();
    let ca = Ca::open_or_create(&dir, CaOptions::default(), shared(&clock)).unwrap();
    assert_eq!(ca.bundle().active_root(), fp);
    drop(ca);
    // A first start that stopped after writing the key (no certificate, no
    // bundle yet): that key signed nothing, and the next start replaces it.
    std::fs::remove_file(dir.join("root-cert.pem")).unwrap();
    std::fs::remove_file(dir.join("trust-bundle.pem")).unwrap();
    let ca = Ca::open_or_create(&dir, CaOptions::default(), shared(&clock))
        .expect("a first start that stopped part way starts again");
    assert_ne!(ca.bundle().active_root(), fp);
    drop(ca);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn loading_a_root_with_the_wrong_key_fails_clearly() {
    let clock = clock();
    let root = TestRoot::new("root");
    let other = KeyPair::generate().unwrap();
    let err = Ca::from_pem(
        CaOptions::default(),
        shared(&clock),
        CaPem {
            root_cert: root.cert_pem.clone(),
            root_key: Some(PrivateKeyPem::new(other.serialize_pem())),
            ..CaPem::default()
        },
    )
    .unwrap_err();
    assert!(err.to_string().contains("does not belong"), "{err}");
    // Loaded correctly, it signs leaves that chain to that root.
    let ca = root.ca(TD, &clock);
    let wid = id("a", "b");
    let key = KeyPair::generate().unwrap();
    let issued = ca
        .sign_csr(&csr(vec![uri(wid.as_str())], &key), &wid)
        .unwrap();
    let root_der = certs::storage::certs_from_pem("root", &root.cert_pem).unwrap();
    assert_eq!(
        issued.trust_bundle.roots().cloned().collect::<Vec<_>>(),
        root_der
    );
}

/// An intermediate loaded from PEM signs only if its root's key signed it:
/// another root of the same name (a re-generated root, an intermediate of
/// an earlier one) is refused at load with the fix named, instead of
/// issuing leaves no peer can verify.
#[test]
fn an_intermediate_must_be_signed_by_the_root_not_only_name_it() {
    use rcgen::{BasicConstraints, IsCa, KeyUsagePurpose};
    let clock = clock();
    let root = TestRoot::new("Sluice root");
    let impostor = TestRoot::new("Sluice root");
    let int_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = CertificateParams::default();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "Sluice intermediate");
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let int_cert = params.signed_by(&int_key, &root.issuer()).unwrap();
    let load = |root_cert: &str| {
        Ca::from_pem(
            CaOptions {
                trust_domain: TD.into(),
                ..CaOptions::default()
            },
            shared(&clock),
            CaPem {
                root_cert: root_cert.into(),
                intermediate: Some((int_cert.pem(), PrivateKeyPem::new(int_key.serialize_pem()))),
                ..CaPem::default()
            },
        )
    };
    let err = load(&impostor.cert_pem).unwrap_err().to_string();
    assert!(
        err.contains("did not sign") && err.contains("Sluice root"),
        "{err}"
    );
    let ca = load(&root.cert_pem).unwrap();
    let wid = id("a", "b");
    let key = KeyPair::generate().unwrap();
    let issued = ca
        .sign_csr(&csr(vec![uri(wid.as_str())], &key), &wid)
        .unwrap();
    assert_eq!(issued.chain.len(), 2);
    let peer = verify::verify_chain(
        &ca.bundle(),
        &issued.chain[0],
        &issued.chain[1..],
        clock_now(&clock),
        verify::Usage::Server,
    )
    .unwrap();
    assert_eq!(peer.identity, wid);
}

/// A root past its end vouches for nothing: a leaf made with its key today
/// (the key of a root long rotated out, no longer guarded) is refused, though
/// the leaf itself is valid and the root still in the bundle.
#[test]
fn a_root_past_its_end_vouches_for_no_leaf() {
    use rcgen::{BasicConstraints, DnType, ExtendedKeyUsagePurpose, IsCa, KeyUsagePurpose};
    let clock = clock();
    let now = OffsetDateTime::from(clock_now(&clock));
    let root_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let root_at = |not_after: OffsetDateTime| {
        let mut p = CertificateParams::default();
        p.distinguished_name.push(DnType::CommonName, "Old root");
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign];
        p.not_before = now - Duration::from_secs(10 * 86_400);
        p.not_after = not_after;
        let cert = p.self_signed(&root_key).unwrap();
        (p, cert)
    };
    let wid = id("a", "b");
    let leaf_of = |params: &CertificateParams| {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut p = CertificateParams::default();
        p.subject_alt_names = vec![uri(wid.as_str())];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        p.not_before = now - Duration::from_secs(3600);
        p.not_after = now + Duration::from_secs(3600);
        p.signed_by(&key, &rcgen::Issuer::from_params(params, &root_key))
            .unwrap()
    };
    let check = |not_after: OffsetDateTime| {
        let (params, root) = root_at(not_after);
        let bundle = certs::TrustBundle::from_pem(TD, &root.pem()).unwrap();
        verify::verify_chain(
            &bundle,
            leaf_of(&params).der(),
            &[],
            clock_now(&clock),
            verify::Usage::Server,
        )
    };
    // Valid for a day more: the leaf is verified.
    assert_eq!(
        check(now + Duration::from_secs(86_400)).unwrap().identity,
        wid
    );
    // Ended yesterday: refused, saying why.
    let err = check(now - Duration::from_secs(86_400))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("does not chain to a root") && err.contains("is valid from"),
        "{err}"
    );
    // Nor does it vouch for the CA service (the roots a CA client trusts).
    let valid = |not_after| {
        let pem = root_at(not_after).1.pem();
        let bundle = certs::TrustBundle::from_pem(TD, &pem).unwrap();
        bundle.roots_valid_at(clock_now(&clock)).count()
    };
    assert_eq!(valid(now + Duration::from_secs(86_400)), 1);
    assert_eq!(valid(now - Duration::from_secs(86_400)), 0);
}

/// The root key and certificate are replaced one after the other: a CA
/// that stopped in between (new key, old certificate) finishes the
/// activation when it starts again instead of refusing to start.
#[test]
fn an_interrupted_root_activation_is_finished_on_the_next_start() {
    let dir = std::env::temp_dir().join(format!("certs-ca-{}", rand::random::<u64>()));
    let clock = clock();
    let ca = Ca::open_or_create(&dir, CaOptions::default(), shared(&clock)).unwrap();
    let old = ca.bundle().active_root();
    let new = ca.prepare_root_rotation().unwrap();
    drop(ca);
    // What activate_root leaves when it stops after its first write.
    std::fs::copy(dir.join("next-root-key.pem"), dir.join("root-key.pem")).unwrap();

    let ca = Ca::open_or_create(&dir, CaOptions::default(), shared(&clock))
        .expect("the CA starts, finishing the activation");
    assert_eq!(ca.bundle().active_root(), new);
    assert!(
        ca.bundle().fingerprints().contains(&old),
        "the old root is still trusted"
    );
    assert!(!dir.join("next-root-cert.pem").exists());
    assert!(!dir.join("next-root-key.pem").exists());
    let wid = id("a", "b");
    let key = KeyPair::generate().unwrap();
    let issued = ca
        .sign_csr(&csr(vec![uri(wid.as_str())], &key), &wid)
        .unwrap();
    let peer = verify::verify_chain(
        &ca.bundle(),
        &issued.chain[0],
        &[],
        clock_now(&clock),
        verify::Usage::Server,
    )
    .unwrap();
    assert_eq!(peer.identity, wid);
    drop(ca);
    // And it stays that way.
    let again = Ca::open_or_create(&dir, CaOptions::default(), shared(&clock)).unwrap();
    assert_eq!(again.bundle().active_root(), new);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The same with the certificate written first (an agent's root store
/// writes the files in its own order): the new key, in `next-root-key.pem`
/// only, is kept and takes its place.
#[test]
fn an_activation_interrupted_after_the_certificate_keeps_the_new_key() {
    let dir = std::env::temp_dir().join(format!("certs-ca-{}", rand::random::<u64>()));
    let clock = clock();
    let ca = Ca::open_or_create(&dir, CaOptions::default(), shared(&clock)).unwrap();
    let new = ca.prepare_root_rotation().unwrap();
    drop(ca);
    std::fs::copy(dir.join("next-root-cert.pem"), dir.join("root-cert.pem")).unwrap();
    let new_key = std::fs::read(dir.join("next-root-key.pem")).unwrap();

    let ca = Ca::open_or_create(&dir, CaOptions::default(), shared(&clock))
        .expect("the CA starts, finishing the activation");
    assert_eq!(ca.bundle().active_root(), new);
    assert_eq!(std::fs::read(dir.join("root-key.pem")).unwrap(), new_key);
    assert!(!dir.join("next-root-key.pem").exists());
    let wid = id("a", "b");
    let key = KeyPair::generate().unwrap();
    ca.sign_csr(&csr(vec![uri(wid.as_str())], &key), &wid)
        .expect("the new root signs");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A root that signed before a restart and nothing after it may still have
/// valid leaves out there: once replaced, retiring it waits a leaf
/// lifetime (or needs force), restart or not.
#[test]
fn a_root_replaced_after_a_restart_is_not_retired_before_its_leaves_expire() {
    let dir = std::env::temp_dir().join(format!("certs-ca-{}", rand::random::<u64>()));
    let clock = clock();
    let ca = Ca::open_or_create(&dir, CaOptions::default(), shared(&clock)).unwrap();
    let old = ca.bundle().active_root();
    let wid = id("a", "b");
    let key = KeyPair::generate().unwrap();
    ca.sign_csr(&csr(vec![uri(wid.as_str())], &key), &wid)
        .unwrap();
    drop(ca);
    let ca = Ca::open_or_create(&dir, CaOptions::default(), shared(&clock)).unwrap();
    let new = ca.prepare_root_rotation().unwrap();
    ca.activate_root(&new).unwrap();
    assert!(ca.retire_root(&old, false).is_err());
    clock.advance(Duration::from_secs(24 * 3600 + 1));
    ca.retire_root(&old, false).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

/// An activation whose write fails keeps the prepared root: it can be
/// activated again once the directory takes writes.
#[test]
fn an_activation_that_could_not_write_can_be_done_again() {
    let dir = std::env::temp_dir().join(format!("certs-ca-{}", rand::random::<u64>()));
    let clock = clock();
    let ca = Ca::open_or_create(&dir, CaOptions::default(), shared(&clock)).unwrap();
    let old = ca.bundle().active_root();
    let new = ca.prepare_root_rotation().unwrap();
    // root-key.pem cannot be replaced: a directory stands there.
    let key_path = dir.join("root-key.pem");
    let old_key = std::fs::read(&key_path).unwrap();
    std::fs::remove_file(&key_path).unwrap();
    std::fs::create_dir(&key_path).unwrap();
    std::fs::write(key_path.join("x"), b"").unwrap();
    assert!(ca.activate_root(&new).is_err());
    assert_eq!(ca.bundle().active_root(), old, "the old root still signs");
    std::fs::remove_dir_all(&key_path).unwrap();
    std::fs::write(&key_path, old_key).unwrap();
    ca.activate_root(&new)
        .expect("the prepared root is still there");
    assert_eq!(ca.bundle().active_root(), new);
    drop(ca);
    let again = Ca::open_or_create(&dir, CaOptions::default(), shared(&clock)).unwrap();
    assert_eq!(again.bundle().active_root(), new);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn agents_starting_together_on_an_empty_directory_share_one_root() {
    let dir = std::env::temp_dir().join(format!("certs-ca-{}", rand::random::<u64>()));
    let clock = clock();
    let go = std::sync::Arc::new(std::sync::Barrier::new(4));
    let roots: Vec<_> = (0..4)
        .map(|_| {
            let (go, dir, clock) = (go.clone(), dir.clone(), shared(&clock));
            std::thread::spawn(move || {
                go.wait();
                Ca::open_or_create(&dir, CaOptions::default(), clock)
                    .map(|ca| ca.bundle().active_root())
            })
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|t| t.join().unwrap().expect("every agent opens the CA"))
        .collect();
    assert!(roots.windows(2).all(|w| w[0] == w[1]), "{roots:?}");
    // What is on disk is that root, with its own key.
    let again = Ca::open_or_create(&dir, CaOptions::default(), shared(&clock)).unwrap();
    assert_eq!(again.bundle().active_root(), roots[0]);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_generated_intermediate_is_renewed_before_it_cuts_leaves_short() {
    let clock = clock();
    let day = Duration::from_secs(24 * 3600);
    let with_intermediate = |lifetime| {
        Ca::generate(
            CaOptions {
                intermediate: true,
                intermediate_lifetime: lifetime,
                ..CaOptions::default()
            },
            shared(&clock),
        )
    };
    let ca = with_intermediate(9 * day).unwrap();
    let wid = id("shop", "cart");
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let issue = || {
        let issued = ca
            .sign_csr(&csr(vec![uri(wid.as_str())], &key), &wid)
            .unwrap();
        // Whatever signed it, the leaf chains to the same root now.
        verify::verify_chain(
            &issued.trust_bundle,
            &issued.chain[0],
            &issued.chain[1..],
            clock_now(&clock),
            verify::Usage::Client,
        )
        .unwrap();
        let leaf = CertInfo::parse(&issued.chain[0]).unwrap();
        let int = CertInfo::parse(&issued.chain[1]).unwrap();
        (leaf, int)
    };
    let (_, first) = issue();
    // Early in its life the intermediate is kept: not one per issuance.
    clock.advance(day);
    let (_, same) = issue();
    assert_eq!(same.fingerprint, first.fingerprint);
    // With less than a third of its 9 days left, a new one signs, and the
    // leaf gets its full 24 h (it would end with the old intermediate, in
    // 12 h).
    clock.advance(day * 15 / 2);
    let issued_at = OffsetDateTime::from(clock_now(&clock));
    let (leaf, renewed) = issue();
    assert_ne!(renewed.fingerprint, first.fingerprint);
    assert!(renewed.not_after > first.not_after);
    let life = leaf.not_after - issued_at;
    assert!(
        (life - ::time::Duration::hours(24)).abs() <= ::time::Duration::seconds(1),
        "leaf life {life}"
    );
    assert_eq!(ca.status().signer, renewed.subject);
    // One that would have to be replaced at nearly every issuance is refused.
    let short = with_intermediate(2 * day);
    assert!(
        matches!(&short, Err(CaError::Config { reason }) if reason.contains("intermediate lifetime")),
        "{:?}",
        short.err()
    );
}
