//! `mesh-agent ca`'s use of the Kubernetes API, against the fake API server:
//! the root Secret is created once and re-used, the trust bundle is
//! published in a ConfigMap, and a root rotation written to the Secret by
//! `mesh-agent ca rotate` is served and published by the running CA.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::Arc,
    time::{Duration, Instant},
};

use certs::{
    CaOptions, CertificateAuthority as _, SharedClock, SpiffeId, SystemClock, TrustBundle,
    ca::{
        SignRequest,
        auth::{BootstrapTokens, Credential, NodeAuthoriser, StaticNodeWorkloads},
        client::{CaClient, CaClientConfig},
    },
    x509::Fingerprint,
};
use mesh_agent::ca::{
    BUNDLE, NEXT_ROOT_CERT, NEXT_ROOT_KEY, PREPARED_AT, RETIRABLE_AFTER, ROOT_CERT, ROOT_KEY,
    RootStore, RotateStep, Serving, publish_bundle, root_from_secret, rotate, serve,
};

mod support;
use support::FakeApi;

#[tokio::test]
async fn a_missing_root_secret_is_created_and_a_present_one_is_loaded() {
    let fake = FakeApi::default();
    let client = fake.client();
    let clock: SharedClock = Arc::new(SystemClock);
    let ca = root_from_secret(
        &client,
        "sluice-system/sluice-ca-root",
        CaOptions::default(),
        clock.clone(),
    )
    .await
    .unwrap();
    let writes = fake.writes();
    assert_eq!(writes.len(), 1, "{writes:?}");
    let (method, path, secret) = &writes[0];
    assert_eq!(
        (method.as_str(), path.as_str()),
        ("POST", "/api/v1/namespaces/sluice-system/secrets")
    );
    assert_eq!(secret["metadata"]["name"], "sluice-ca-root");
    for key in [ROOT_CERT, ROOT_KEY, BUNDLE] {
        assert!(
            secret["data"][key].is_string(),
            "the Secret lacks {key}: {secret}"
        );
    }
    // A second CA (a restart, another replica) loads the same root.
    let again = root_from_secret(
        &client,
        "sluice-system/sluice-ca-root",
        CaOptions::default(),
        clock,
    )
    .await
    .unwrap();
    assert_eq!(fake.writes().len(), 1, "nothing more is written");
    assert_eq!(
        again.ca.bundle().fingerprints(),
        ca.ca.bundle().fingerprints()
    );
    assert_eq!(
        again.ca.bundle().active_root(),
        ca.ca.bundle().active_root()
    );
}

#[tokio::test]
async fn the_trust_bundle_is_applied_to_its_configmap() {
    let fake = FakeApi::default();
    let client = fake.client();
    let ca = certs::Ca::generate(CaOptions::default(), Arc::new(SystemClock)).unwrap();
    let pem = ca.bundle().to_pem();
    publish_bundle(&client, "sluice-system/sluice-trust-bundle", &pem)
        .await
        .unwrap();
    let writes = fake.writes();
    let (method, path, cm) = &writes[0];
    assert_eq!(method, "APPLY");
    assert_eq!(
        path,
        "/api/v1/namespaces/sluice-system/configmaps/sluice-trust-bundle"
    );
    let published = cm["data"][BUNDLE].as_str().unwrap();
    let bundle = TrustBundle::from_pem("cluster.local", published).unwrap();
    assert_eq!(bundle.fingerprints(), ca.bundle().fingerprints());
}

/// A Secret made beforehand with other key names (or none) is refused,
/// naming what it has and what is wanted; the CA would otherwise make a new
/// root on every start and save none of them.
#[tokio::test]
async fn a_root_secret_without_a_root_is_refused_not_replaced_in_memory() {
    let fake = FakeApi::default();
    let client = fake.client();
    let path = "/api/v1/namespaces/sluice-system/secrets/sluice-ca-root";
    fake.put_object(
        path,
        serde_json::json!({
            "apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": "sluice-ca-root", "namespace": "sluice-system", "resourceVersion": "1"},
            "data": {"ca.crt": "AA==", "ca.key": "AA=="},
        }),
    );
    let clock: SharedClock = Arc::new(SystemClock);
    let e = root_from_secret(
        &client,
        "sluice-system/sluice-ca-root",
        CaOptions::default(),
        clock,
    )
    .await;
    let Err(e) = e else {
        panic!("a Secret without a root was accepted")
    };
    let text = e.to_string();
    assert!(text.contains("sluice-system/sluice-ca-root"), "{text}");
    assert!(
        text.contains("root-cert.pem and root-key.pem wanted; it has ca.crt, ca.key"),
        "{text}"
    );
    assert!(fake.writes().is_empty(), "{:?}", fake.writes());
}

#[tokio::test]
async fn a_bad_secret_reference_is_refused() {
    let fake = FakeApi::default();
    let e = root_from_secret(
        &fake.client(),
        "no-namespace",
        CaOptions::default(),
        Arc::new(SystemClock),
    )
    .await
    .unwrap_err();
    assert!(e.to_string().contains("namespace/name"), "{e}");
}

const SECRET: &str = "/api/v1/namespaces/sluice-system/secrets/sluice-ca-root";
const CONFIGMAP: &str = "/api/v1/namespaces/sluice-system/configmaps/sluice-trust-bundle";
const TOKEN: &str = "0123456789abcdef0123456789abcdef";

fn store() -> RootStore {
    RootStore::Secret {
        namespace: "sluice-system".into(),
        name: "sluice-ca-root".into(),
    }
}

/// The bundle last published in the ConfigMap.
fn published(fake: &FakeApi) -> Option<TrustBundle> {
    let (_, _, cm) = fake
        .writes()
        .into_iter()
        .rfind(|(m, p, _)| m == "APPLY" && p == CONFIGMAP)?;
    TrustBundle::from_pem("cluster.local", cm["data"][BUNDLE].as_str()?).ok()
}

async fn eventually<T>(what: &str, mut f: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn secret_keys(fake: &FakeApi) -> Vec<String> {
    let s = fake.object(SECRET).expect("the root Secret");
    s["data"].as_object().unwrap().keys().cloned().collect()
}

#[tokio::test]
async fn a_root_rotation_is_served_and_published_by_the_running_ca() {
    let fake = FakeApi::default();
    let client = fake.client();
    let clock: SharedClock = Arc::new(SystemClock);
    let web: SpiffeId = "spiffe://cluster.local/ns/shop/sa/web".parse().unwrap();
    let workloads = Arc::new(StaticNodeWorkloads::new());
    workloads.set("node-a", [web.clone()]);
    let serving = Serving {
        listen: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0),
        dns_names: vec!["sluice-ca.test".into()],
        ips: vec![IpAddr::V4(Ipv4Addr::LOCALHOST)],
        authenticator: Arc::new(BootstrapTokens::new([("node-a", TOKEN)]).unwrap()),
        authoriser: Arc::new(NodeAuthoriser::new(workloads)),
        bundle_configmap: Some("sluice-system/sluice-trust-bundle".into()),
        poll: Duration::from_millis(50),
    };
    let (addr_tx, mut addr_rx) = tokio::sync::watch::channel(None);
    let (stop, stop_rx) = tokio::sync::watch::channel(false);
    let ca = tokio::spawn(serve(
        client.clone(),
        store(),
        CaOptions::default(),
        clock.clone(),
        serving,
        addr_tx,
        stop_rx,
    ));
    let addr = *addr_rx.wait_for(Option::is_some).await.unwrap();
    let addr = addr.unwrap();
    let first = eventually("the first bundle", async || published(&fake)).await;
    assert_eq!(first.fingerprints().len(), 1);
    // Applied again on each poll, not only when it changes: a ConfigMap
    // deleted or edited by hand comes back.
    let applies = || {
        (fake.writes().iter())
            .filter(|(m, p, _)| m == "APPLY" && p == CONFIGMAP)
            .count()
    };
    let once = applies();
    eventually("the bundle applied again", async || {
        (applies() > once).then_some(())
    })
    .await;
    let old = first.active_root();
    // A node agent, trusting what the ConfigMap says.
    let node = CaClient::new(CaClientConfig {
        endpoint: format!("https://{addr}"),
        bundle: first,
        credential: Credential::Token(TOKEN.into()),
        timeout: Duration::from_secs(10),
        bundle_file: None,
    })
    .unwrap();
    let sign = async || {
        let key = certs::ca::generate_workload_key().unwrap();
        node.sign(SignRequest {
            identity: web.clone(),
            csr_der: certs::ca::csr_for(&web, &key).unwrap(),
        })
        .await
        .unwrap()
    };
    assert_eq!(sign().await.trust_bundle.active_root(), old);

    // 1. prepare: the new root is trusted everywhere, signs nothing.
    let r = rotate(
        Some(&client),
        &store(),
        RotateStep::Prepare,
        CaOptions::default(),
        clock.clone(),
    )
    .await
    .unwrap();
    assert!(r.summary.contains("--activate"), "{}", r.summary);
    let new_root = r
        .bundle
        .roots
        .iter()
        .find(|x| x.fingerprint != old)
        .unwrap();
    let (new, new_subject): (Fingerprint, String) =
        (new_root.fingerprint, new_root.subject.clone());
    assert!(secret_keys(&fake).contains(&NEXT_ROOT_KEY.to_string()));
    assert!(secret_keys(&fake).contains(&NEXT_ROOT_CERT.to_string()));
    let b = eventually("the bundle with both roots", async || {
        published(&fake).filter(|b| b.fingerprints().len() == 2)
    })
    .await;
    assert_eq!(b.active_root(), old);
    assert!(b.fingerprints().contains(&new));
    let served = node.trust_bundle().await.unwrap();
    assert_eq!(served.fingerprints().len(), 2, "the CA serves it too");
    assert_eq!(sign().await.trust_bundle.active_root(), old);

    // Activating twice is refused: there is nothing prepared any more after.
    let activate = async |force: bool| {
        rotate(
            Some(&client),
            &store(),
            RotateStep::Activate { force },
            CaOptions::default(),
            clock.clone(),
        )
        .await
    };
    // Too soon after --prepare for every node to have the new bundle:
    // refused, saying until when, and nothing changes.
    assert!(secret_keys(&fake).contains(&PREPARED_AT.to_string()));
    let e = activate(false).await.unwrap_err();
    assert!(
        e.to_string().contains("Wait until") && e.to_string().contains("--force"),
        "{e}"
    );
    assert!(secret_keys(&fake).contains(&NEXT_ROOT_KEY.to_string()));
    // 2. activate (forced: every node here has it): new certificates chain
    // to the new root (the serving one too: the node reaches the CA through
    // the restarted service).
    activate(true).await.unwrap();
    assert!(!secret_keys(&fake).contains(&PREPARED_AT.to_string()));
    assert!(secret_keys(&fake).contains(&RETIRABLE_AFTER.to_string()));
    eventually("the new root to sign", async || {
        (published(&fake)?.active_root() == new).then_some(())
    })
    .await;
    let issued = eventually("a certificate under the new root", async || {
        let i = sign().await;
        (i.trust_bundle.active_root() == new).then_some(i)
    })
    .await;
    let leaf = certs::x509::CertInfo::parse(&issued.chain[0]).unwrap();
    assert_eq!(leaf.issuer, new_subject, "signed by the new root");
    let e = activate(true).await.unwrap_err();
    assert!(e.to_string().contains("--prepare"), "{e}");

    // 3. retire: refused while leaves of the old root may be valid...
    let retire = async |force: bool| {
        rotate(
            Some(&client),
            &store(),
            RotateStep::Retire { force },
            CaOptions::default(),
            clock.clone(),
        )
        .await
    };
    let e = retire(false).await.unwrap_err();
    assert!(e.to_string().contains("--force"), "{e}");
    // ...and done when forced: the old root leaves the bundle everywhere.
    let r = retire(true).await.unwrap();
    assert!(r.summary.contains(&old.to_string()), "{}", r.summary);
    assert!(!secret_keys(&fake).contains(&RETIRABLE_AFTER.to_string()));
    let b = eventually("the bundle without the old root", async || {
        published(&fake).filter(|b| b.fingerprints() == vec![new])
    })
    .await;
    assert_eq!(b.active_root(), new);
    assert_eq!(node.trust_bundle().await.unwrap().fingerprints(), vec![new]);
    let e = retire(true).await.unwrap_err();
    assert!(e.to_string().contains("nothing to retire"), "{e}");

    let _ = stop.send(true);
    ca.await.unwrap().unwrap();
}

#[tokio::test]
async fn a_rotation_writes_only_the_version_it_read_and_changes_nothing_on_a_conflict() {
    let fake = FakeApi::default();
    let client = fake.client();
    let clock: SharedClock = Arc::new(SystemClock);
    root_from_secret(
        &client,
        "sluice-system/sluice-ca-root",
        CaOptions::default(),
        clock.clone(),
    )
    .await
    .unwrap();
    let before = fake.object(SECRET).unwrap();
    // Another writer changes the Secret while the step runs.
    fake.conflict_next_put(SECRET);
    let e = rotate(
        Some(&client),
        &store(),
        RotateStep::Prepare,
        CaOptions::default(),
        clock.clone(),
    )
    .await
    .unwrap_err();
    assert!(e.to_string().contains("run the command again"), "{e}");
    assert_eq!(fake.object(SECRET).unwrap(), before, "nothing changed");
    // The write was conditioned on the version read.
    let (_, _, put) = fake
        .writes()
        .into_iter()
        .rfind(|(m, p, _)| m == "PUT" && p == SECRET)
        .unwrap();
    assert_eq!(
        put["metadata"]["resourceVersion"],
        before["metadata"]["resourceVersion"]
    );
    // Run again, it goes through.
    rotate(
        Some(&client),
        &store(),
        RotateStep::Prepare,
        CaOptions::default(),
        clock,
    )
    .await
    .unwrap();
    assert!(secret_keys(&fake).contains(&NEXT_ROOT_CERT.to_string()));
}

#[tokio::test]
async fn a_directory_root_rotates_the_same_way_without_kubernetes() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("ca");
    let store = RootStore::Dir(root.clone());
    let clock: SharedClock = Arc::new(SystemClock);
    let e = rotate(
        None,
        &store,
        RotateStep::Prepare,
        CaOptions::default(),
        clock.clone(),
    )
    .await
    .unwrap_err();
    assert!(e.to_string().contains("holds no CA root"), "{e}");
    let loaded = mesh_agent::ca::load_root(None, &store, CaOptions::default(), clock.clone(), true)
        .await
        .unwrap();
    let old = loaded.ca.bundle().active_root();
    let mode = |f: &str| {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::metadata(root.join(f))
            .unwrap()
            .permissions()
            .mode()
            & 0o777
    };
    assert_eq!(mode(ROOT_KEY), 0o600);
    rotate(
        None,
        &store,
        RotateStep::Prepare,
        CaOptions::default(),
        clock.clone(),
    )
    .await
    .unwrap();
    assert_eq!(mode(NEXT_ROOT_KEY), 0o600);
    let changed = mesh_agent::ca::reload_if_changed(
        None,
        &store,
        &loaded,
        CaOptions::default(),
        clock.clone(),
    )
    .await
    .unwrap()
    .expect("the running CA sees the prepared root");
    assert_eq!(changed.ca.bundle().fingerprints().len(), 2);
    assert_eq!(changed.ca.bundle().active_root(), old);
    assert!(
        mesh_agent::ca::reload_if_changed(None, &store, &changed, CaOptions::default(), clock)
            .await
            .unwrap()
            .is_none(),
        "nothing changed since"
    );
}

/// Accepts any server certificate and keeps it: the test looks at what the
/// CA serves, not whether it is trusted now.
#[derive(Debug)]
struct Record(std::sync::Mutex<Option<rustls::pki_types::CertificateDer<'static>>>);

impl rustls::client::danger::ServerCertVerifier for Record {
    fn verify_server_cert(
        &self,
        end_entity: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        *self.0.lock().unwrap() = Some(end_entity.clone().into_owned());
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }

    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        rustls::crypto::ring::default_provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The certificate the CA service at `addr` presents now (`None` while it
/// restarts).
async fn served_certificate(addr: SocketAddr) -> Option<certs::x509::CertInfo> {
    let record = Arc::new(Record(std::sync::Mutex::default()));
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .dangerous()
    .with_custom_certificate_verifier(record.clone())
    .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr).await.ok()?;
    let name = rustls::pki_types::ServerName::try_from("sluice-ca.test").unwrap();
    let handshake = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await;
    let der = record.0.lock().unwrap().take();
    if let Err(e) = handshake {
        eprintln!("handshake: {e}");
    }
    Some(certs::x509::CertInfo::parse(&der?).unwrap())
}

/// The CA's own serving certificate is renewed at half its life: a CA up
/// longer than that lifetime (90 days) does not start refusing every agent.
#[tokio::test]
async fn the_ca_serves_a_new_certificate_of_its_own_at_half_its_life() {
    let fake = FakeApi::default();
    let manual = certs::ManualClock::new();
    let clock: SharedClock = Arc::new(manual.clone());
    let serving = Serving {
        listen: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0),
        dns_names: vec!["sluice-ca.test".into()],
        ips: vec![IpAddr::V4(Ipv4Addr::LOCALHOST)],
        authenticator: Arc::new(BootstrapTokens::new([("node-a", TOKEN)]).unwrap()),
        authoriser: Arc::new(NodeAuthoriser::new(Arc::new(StaticNodeWorkloads::new()))),
        bundle_configmap: None,
        poll: Duration::from_millis(50),
    };
    let (addr_tx, mut addr_rx) = tokio::sync::watch::channel(None);
    let (stop, stop_rx) = tokio::sync::watch::channel(false);
    let ca = tokio::spawn(serve(
        fake.client(),
        store(),
        CaOptions::default(),
        clock,
        serving,
        addr_tx,
        stop_rx,
    ));
    let addr = addr_rx.wait_for(Option::is_some).await.unwrap().unwrap();
    let first = served_certificate(addr).await.expect("the CA serves");
    // A day short of half its life: the same certificate.
    let half = (first.not_after - first.not_before).unsigned_abs() / 2;
    manual.advance(half - Duration::from_secs(24 * 3600));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(served_certificate(addr).await.unwrap().serial, first.serial);
    // Past half its life: a new one, valid for as long again.
    manual.advance(Duration::from_secs(2 * 24 * 3600));
    let second = eventually("a new serving certificate", async || {
        served_certificate(addr)
            .await
            .filter(|c| c.serial != first.serial)
    })
    .await;
    assert!(second.not_after > first.not_after + half, "{second:?}");
    let _ = stop.send(true);
    ca.await.unwrap().unwrap();
}
