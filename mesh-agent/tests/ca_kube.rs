//! `mesh-agent ca`'s use of the Kubernetes API, against the fake API server:
//! the root Secret is created once and re-used, and the trust bundle is
//! published in a ConfigMap.

use std::sync::Arc;

use certs::{CaOptions, SharedClock, SystemClock, TrustBundle};
use mesh_agent::ca::{BUNDLE, ROOT_CERT, ROOT_KEY, publish_bundle, root_from_secret};

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
    assert_eq!(again.bundle().fingerprints(), ca.bundle().fingerprints());
    assert_eq!(again.bundle().active_root(), ca.bundle().active_root());
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
