//! The demo's topology end to end: the real mesh-agent (files source,
//! in-process CA, embedded proxy, kernel load balancer) on examples/demo, pods
//! in network namespaces and cgroups, real HTTP. Needs root and the workspace
//! binaries (mesh-agent, sluice, netprobe), which nextest builds.

use std::path::PathBuf;

use anyhow::Result;
use integration::demo::{self, Binaries};

fn refused(a: &[integration::probe::Attempt]) -> bool {
    !a.is_empty() && a.iter().all(|a| a.errno == Some(libc::ECONNREFUSED))
}

#[test]
fn the_demo_does_what_it_shows() -> Result<()> {
    integration::require_root();
    let manifests = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/demo");
    let mut log = Vec::new();
    let r = demo::run(Binaries::beside_current_exe()?, &manifests, &mut |s| {
        log.push(s.to_string())
    })?;

    // HTTP through a ClusterIP to three backends, via the proxy and mTLS.
    assert!(r.web_failures.is_empty(), "{:?}", r.web_failures);
    assert_eq!(
        r.web.keys().cloned().collect::<Vec<_>>(),
        ["web-1", "web-2", "web-3"],
        "{:?}",
        r.web
    );
    assert_eq!(r.web.values().sum::<usize>(), 90);

    // An HTTPRoute 90/10 split, per request on one connection.
    assert!(r.reviews_failures.is_empty(), "{:?}", r.reviews_failures);
    let v1 = r.reviews.get("reviews-v1").copied().unwrap_or(0);
    let v2 = r.reviews.get("reviews-v2").copied().unwrap_or(0);
    assert_eq!(v1 + v2, 400);
    // Binomial(400, 0.1): mean 40, standard deviation 6.
    assert!((15..=75).contains(&v2), "reviews-v2 got {v2} of 400");

    // An enrolled client straight to a STRICT pod's address (no Service)
    // is carried by the proxy in mTLS: STRICT lets it in.
    assert!(r.direct_failures.is_empty(), "{:?}", r.direct_failures);
    assert_eq!(
        r.direct,
        [("web-1".to_string(), 5)].into(),
        "{:?}",
        r.direct
    );

    // A plaintext client is refused by STRICT, at the pod and through the VIP.
    assert!(refused(&r.plaintext_direct), "{:?}", r.plaintext_direct);
    assert!(refused(&r.plaintext_vip), "{:?}", r.plaintext_vip);

    // A client that is not enrolled is balanced by the kernel alone.
    assert!(r.echo_failures.is_empty(), "{:?}", r.echo_failures);
    assert_eq!(
        r.echo.keys().cloned().collect::<Vec<_>>(),
        ["echo-1", "echo-2"],
        "{:?}",
        r.echo
    );

    // `sluice tls` shows the frontend -> web connection secured, with both
    // identities and TLS 1.3.
    let conns = r.tls_json["connections"].as_array().expect("connections");
    let secured = conns.iter().any(|c| {
        c["mtls"] == true
            && c["source_identity"] == "spiffe://cluster.local/ns/shop/sa/frontend"
            && c["destination_identity"] == "spiffe://cluster.local/ns/shop/sa/web"
            && c["tls_version"].as_str().is_some_and(|v| v.contains("1.3"))
            && c["peer_cert_expiry"].is_string()
    });
    assert!(
        secured,
        "no secured frontend -> web connection in {conns:#?}"
    );
    assert!(
        conns
            .iter()
            .all(|c| c["source_workload"] != "legacy/legacy-client"),
        "the legacy client went through the proxy: {conns:#?}"
    );
    assert!(r.tls.contains("TLSv1.3"), "{}", r.tls);
    assert!(r.status.contains("shop"), "{}", r.status);
    assert!(r.workloads.contains("frontend"), "{}", r.workloads);
    Ok(())
}
