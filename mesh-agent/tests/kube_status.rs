//! The route status writer against a scripted fake API server
//! (`tower_test::mock`): the exact requests it sends when another controller
//! writes the same route's `status.parents` at the same time.

use http::{Method, Request, Response, StatusCode};
use kube::client::Body;
use mesh_agent::{
    reconcile::policies::StatusWrite,
    sources::kube::status::{self, CONFLICT_ATTEMPTS, Error},
    state::{Key, Kind},
};
use serde_json::{Value, json};
use tower_test::mock::{self, Handle};

const STATUS: &str = "/apis/gateway.networking.k8s.io/v1/namespaces/shop/httproutes/web/status";

type Api = Handle<Request<Body>, Response<Body>>;

mod support;
use support::json_response as respond;

fn route(resource_version: &str, parents: &[Value]) -> Value {
    json!({
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
        "metadata": {"name": "web", "namespace": "shop", "resourceVersion": resource_version,
                     "generation": 2},
        "spec": {"parentRefs": [{"kind": "Service", "name": "web"}]},
        "status": {"parents": parents}
    })
}

fn entry(controller: &str, parent: &str, accepted: &str) -> Value {
    json!({
        "parentRef": {"kind": "Service", "name": parent},
        "controllerName": controller,
        "conditions": [{"type": "Accepted", "status": accepted, "reason": "Accepted",
                        "message": "", "observedGeneration": 2,
                        "lastTransitionTime": "2026-03-05T08:00:00Z"}]
    })
}

fn conflict() -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Conflict",
           "message": "the object has been modified; please apply your changes to the latest version",
           "code": 409})
}

/// The next request: it must be a GET of the route's status.
async fn expect_get(api: &mut Api) -> mock::SendResponse<Response<Body>> {
    let (req, send) = api.next_request().await.expect("a GET");
    assert_eq!(
        (req.method(), req.uri().path()),
        (&Method::GET, STATUS),
        "{req:?}"
    );
    send
}

/// The next request: it must be a merge PATCH of the route's status; its body.
async fn expect_patch(api: &mut Api) -> (Value, mock::SendResponse<Response<Body>>) {
    let (req, send) = api.next_request().await.expect("a PATCH");
    assert_eq!(
        (req.method(), req.uri().path()),
        (&Method::PATCH, STATUS),
        "{req:?}"
    );
    assert_eq!(
        req.headers()["content-type"],
        "application/merge-patch+json"
    );
    assert!(
        req.uri()
            .query()
            .unwrap_or("")
            .contains("fieldManager=sluice-mesh-agent"),
        "{:?}",
        req.uri()
    );
    let body = req.into_body().collect_bytes().await.unwrap();
    (serde_json::from_slice(&body).unwrap(), send)
}

fn write_of(ours: &Value) -> StatusWrite {
    StatusWrite {
        kind: Kind::HTTPRoute,
        key: Key::new("shop", "web"),
        status: json!({"parents": [ours]}),
    }
}

#[tokio::test]
async fn another_controllers_entries_survive_a_concurrent_write_and_a_conflict_is_retried() {
    let (svc, mut api) = mock::pair::<Request<Body>, Response<Body>>();
    let client = kube::Client::new(svc, "default");
    let ours = entry("sluice.dev/mesh-agent", "web", "False");
    let stale = entry("sluice.dev/mesh-agent", "web", "True");
    let gateway = entry("example.com/gateway", "gw", "True");
    let other_mesh = entry("example.com/mesh", "web", "True");
    let w = write_of(&ours);
    let writer = tokio::spawn(async move { status::write(&client, &w).await });

    // It reads the route as it is now (the gateway's entry and our old one)...
    expect_get(&mut api).await.send_response(respond(
        StatusCode::OK,
        &route("100", &[gateway.clone(), stale.clone()]),
    ));
    // ...and writes the merged list, conditioned on what it read.
    let (patch, send) = expect_patch(&mut api).await;
    assert_eq!(patch["metadata"]["resourceVersion"], "100");
    assert_eq!(
        patch["status"]["parents"],
        json!([gateway.clone(), ours.clone()])
    );
    // Another mesh wrote its entry in between: the API server refuses.
    send.send_response(respond(StatusCode::CONFLICT, &conflict()));
    expect_get(&mut api).await.send_response(respond(
        StatusCode::OK,
        &route("101", &[gateway.clone(), stale, other_mesh.clone()]),
    ));
    let (patch, send) = expect_patch(&mut api).await;
    assert_eq!(patch["metadata"]["resourceVersion"], "101");
    assert_eq!(
        patch["status"]["parents"],
        json!([gateway.clone(), other_mesh.clone(), ours.clone()]),
        "neither the gateway's nor the other mesh's entry is dropped"
    );
    send.send_response(respond(
        StatusCode::OK,
        &route("102", &[gateway, other_mesh, ours]),
    ));
    writer.await.unwrap().expect("written");
}

#[tokio::test]
async fn nothing_is_written_when_the_route_already_says_it() {
    let (svc, mut api) = mock::pair::<Request<Body>, Response<Body>>();
    let client = kube::Client::new(svc, "default");
    let ours = entry("sluice.dev/mesh-agent", "web", "True");
    // Another agent wrote the same conditions a moment earlier.
    let mut theirs = ours.clone();
    theirs["conditions"][0]["lastTransitionTime"] = json!("2026-03-05T09:00:00Z");
    let w = write_of(&ours);
    let writer = tokio::spawn(async move { status::write(&client, &w).await });
    expect_get(&mut api)
        .await
        .send_response(respond(StatusCode::OK, &route("7", &[theirs])));
    writer.await.unwrap().expect("nothing to write");
    // The client is gone with the writer: no PATCH was ever sent.
    assert!(
        api.next_request().await.is_none(),
        "a request after the GET"
    );
}

#[tokio::test]
async fn a_route_that_keeps_changing_is_given_up_after_the_attempts_and_said_so() {
    let (svc, mut api) = mock::pair::<Request<Body>, Response<Body>>();
    let client = kube::Client::new(svc, "default");
    let ours = entry("sluice.dev/mesh-agent", "web", "True");
    let w = write_of(&ours);
    let writer = tokio::spawn(async move { status::write(&client, &w).await });
    for i in 0..CONFLICT_ATTEMPTS {
        expect_get(&mut api)
            .await
            .send_response(respond(StatusCode::OK, &route(&i.to_string(), &[])));
        let (patch, send) = expect_patch(&mut api).await;
        assert_eq!(patch["metadata"]["resourceVersion"], i.to_string());
        send.send_response(respond(StatusCode::CONFLICT, &conflict()));
    }
    let e = writer.await.unwrap().unwrap_err();
    assert!(matches!(e, Error::Conflict { .. }), "{e}");
    assert!(e.to_string().contains("shop/web"), "{e}");
}

/// A write the API server refuses (an admission webhook's 403, a status
/// over its size limit) is not sent again with the same status before the
/// retry: the reconciler queues every status that differs on each change
/// anywhere in the cluster, and each one was a GET and a PATCH again.
#[tokio::test]
async fn a_refused_write_is_not_repeated_before_its_retry() {
    let (svc, mut api) = mock::pair::<Request<Body>, Response<Body>>();
    let client = kube::Client::new(svc, "default");
    let (tx, rx) = mesh_agent::reconcile::policies::status_queue();
    let (_lease, write_until) = tokio::sync::watch::channel(Some(
        std::time::Instant::now() + std::time::Duration::from_secs(3600),
    ));
    let (_stop_tx, stop) = tokio::sync::watch::channel(false);
    let resends = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = resends.clone();
    tokio::spawn(status::run(client, rx, write_until, stop, move || {
        counted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }));
    let refused = || {
        json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Forbidden",
               "message": "denied by a webhook", "code": 403})
    };
    let ours = entry("sluice.dev/mesh-agent", "web", "True");
    tx.send(write_of(&ours)).unwrap();
    expect_get(&mut api)
        .await
        .send_response(respond(StatusCode::OK, &route("1", &[])));
    let (_, send) = expect_patch(&mut api).await;
    send.send_response(respond(StatusCode::FORBIDDEN, &refused()));
    // The same status again at once, three times: nothing is sent.
    for _ in 0..3 {
        tx.send(write_of(&ours)).unwrap();
    }
    let quiet =
        tokio::time::timeout(std::time::Duration::from_millis(500), api.next_request()).await;
    assert!(quiet.is_err(), "a request before the retry: {quiet:?}");
    // The retry asks the reconciler for what still differs, and that is
    // written.
    let deadline = std::time::Instant::now() + status::RETRY_AFTER * 2;
    while resends.load(std::sync::atomic::Ordering::Relaxed) == 0 {
        assert!(std::time::Instant::now() < deadline, "no resend");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    tx.send(write_of(&ours)).unwrap();
    expect_get(&mut api)
        .await
        .send_response(respond(StatusCode::OK, &route("1", &[])));
    let (_, send) = expect_patch(&mut api).await;
    send.send_response(respond(
        StatusCode::OK,
        &route("2", std::slice::from_ref(&ours)),
    ));
    // Another status for it is written at once.
    let other = entry("sluice.dev/mesh-agent", "web", "False");
    tx.send(write_of(&other)).unwrap();
    expect_get(&mut api)
        .await
        .send_response(respond(StatusCode::OK, &route("1", &[])));
    let (patch, send) = expect_patch(&mut api).await;
    assert_eq!(
        patch["status"]["parents"][0]["conditions"][0]["status"],
        "False"
    );
    send.send_response(respond(
        StatusCode::OK,
        &route("3", std::slice::from_ref(&other)),
    ));
    assert_eq!(resends.load(std::sync::atomic::Ordering::Relaxed), 1);
}
