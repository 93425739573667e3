//! The status writer Lease against a scripted fake API server
//! (`tower_test::mock`): which agent writes route and policy status, and the
//! exact requests that decide it.

use std::time::Duration;

use http::{Method, Request, Response, StatusCode};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::client::Body;
use mesh_agent::{
    reconcile::policies::StatusWrite,
    sources::kube::{lease::Elector, status},
    state::{Key, Kind},
};
use serde_json::{Value, json};
use tower_test::mock::{self, Handle};

type Api = Handle<Request<Body>, Response<Body>>;

const LEASES: &str = "/apis/coordination.k8s.io/v1/namespaces/sluice-system/leases";
const LEASE: &str =
    "/apis/coordination.k8s.io/v1/namespaces/sluice-system/leases/sluice-status-writer";

fn respond(code: StatusCode, v: &Value) -> Response<Body> {
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(Body::from(serde_json::to_vec(v).unwrap()))
        .unwrap()
}

fn status(code: u16, reason: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": reason,
           "message": reason, "code": code})
}

fn t0() -> Timestamp {
    Timestamp::from_second(1_790_000_000).unwrap()
}

fn micro(t: Timestamp) -> String {
    t.strftime("%Y-%m-%dT%H:%M:%S%.6fZ").to_string()
}

fn lease(rv: &str, holder: &str, renewed: Timestamp, transitions: i32) -> Value {
    json!({
        "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": "sluice-status-writer", "namespace": "sluice-system",
                     "resourceVersion": rv},
        "spec": {"holderIdentity": holder, "leaseDurationSeconds": 15,
                 "acquireTime": micro(t0()), "renewTime": micro(renewed),
                 "leaseTransitions": transitions}
    })
}

/// The next request: method and path as given; its JSON body (if any) and
/// the handle to answer it.
async fn expect(
    api: &mut Api,
    method: Method,
    path: &str,
) -> (Value, mock::SendResponse<Response<Body>>) {
    let (req, send) = api.next_request().await.expect("a request");
    assert_eq!((req.method(), req.uri().path()), (&method, path), "{req:?}");
    let body = req.into_body().collect_bytes().await.unwrap();
    let v = if body.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&body).unwrap()
    };
    (v, send)
}

async fn nothing_more(api: &mut Api) {
    // Nothing within 100 ms, or the client is gone.
    if let Ok(Some((req, _))) =
        tokio::time::timeout(Duration::from_millis(100), api.next_request()).await
    {
        panic!("unexpected request: {req:?}");
    }
}

fn elector(holder: &str) -> (Elector, Api) {
    let (svc, api) = mock::pair::<Request<Body>, Response<Body>>();
    let client = kube::Client::new(svc, "default");
    (Elector::new(client, "sluice-system", holder), api)
}

#[tokio::test]
async fn the_first_agent_creates_the_lease_then_renews_it() {
    let (e, mut api) = elector("node-a");
    let lead = tokio::spawn({
        let e = e.clone();
        async move { e.try_lead(t0()).await }
    });
    expect(&mut api, Method::GET, LEASE)
        .await
        .1
        .send_response(respond(StatusCode::NOT_FOUND, &status(404, "NotFound")));
    let (body, send) = expect(&mut api, Method::POST, LEASES).await;
    assert_eq!(body["spec"]["holderIdentity"], "node-a");
    assert_eq!(body["spec"]["leaseDurationSeconds"], 15);
    assert_eq!(body["spec"]["renewTime"], micro(t0()));
    send.send_response(respond(StatusCode::CREATED, &lease("1", "node-a", t0(), 0)));
    assert!(lead.await.unwrap().unwrap(), "the creator leads");

    // Five seconds later: renewed, with the version read as precondition.
    let later = t0() + SignedDuration::from_secs(5);
    let lead = tokio::spawn({
        let e = e.clone();
        async move { e.try_lead(later).await }
    });
    expect(&mut api, Method::GET, LEASE)
        .await
        .1
        .send_response(respond(StatusCode::OK, &lease("7", "node-a", t0(), 0)));
    let (body, send) = expect(&mut api, Method::PUT, LEASE).await;
    assert_eq!(body["metadata"]["resourceVersion"], "7");
    assert_eq!(body["spec"]["holderIdentity"], "node-a");
    assert_eq!(body["spec"]["renewTime"], micro(later));
    assert_eq!(
        body["spec"]["acquireTime"],
        micro(t0()),
        "still the first acquisition"
    );
    assert_eq!(body["spec"]["leaseTransitions"], 0);
    send.send_response(respond(StatusCode::OK, &lease("8", "node-a", later, 0)));
    assert!(lead.await.unwrap().unwrap());
    nothing_more(&mut api).await;
}

#[tokio::test]
async fn a_live_lease_of_another_agent_is_left_alone_and_an_expired_one_is_taken_over() {
    let (e, mut api) = elector("node-a");
    let now = t0() + SignedDuration::from_secs(100);
    let try_lead = |e: &Elector| {
        let e = e.clone();
        tokio::spawn(async move { e.try_lead(now).await })
    };

    // node-b renewed 3 s ago: it leads; node-a does not even write.
    let lead = try_lead(&e);
    expect(&mut api, Method::GET, LEASE)
        .await
        .1
        .send_response(respond(
            StatusCode::OK,
            &lease("9", "node-b", now - SignedDuration::from_secs(3), 2),
        ));
    assert!(!lead.await.unwrap().unwrap());
    nothing_more(&mut api).await;

    // node-b silent for 20 s (> 15 s): node-a takes over, but node-c was
    // faster (409): node-a does not lead.
    let stale = lease("9", "node-b", now - SignedDuration::from_secs(20), 2);
    let lead = try_lead(&e);
    expect(&mut api, Method::GET, LEASE)
        .await
        .1
        .send_response(respond(StatusCode::OK, &stale));
    let (body, send) = expect(&mut api, Method::PUT, LEASE).await;
    assert_eq!(body["metadata"]["resourceVersion"], "9");
    assert_eq!(body["spec"]["holderIdentity"], "node-a");
    assert_eq!(body["spec"]["leaseTransitions"], 3);
    assert_eq!(body["spec"]["acquireTime"], micro(now));
    send.send_response(respond(StatusCode::CONFLICT, &status(409, "Conflict")));
    assert!(!lead.await.unwrap().unwrap(), "lost the race");

    // The same, uncontested: node-a leads.
    let lead = try_lead(&e);
    expect(&mut api, Method::GET, LEASE)
        .await
        .1
        .send_response(respond(StatusCode::OK, &stale));
    let (_, send) = expect(&mut api, Method::PUT, LEASE).await;
    send.send_response(respond(StatusCode::OK, &lease("10", "node-a", now, 3)));
    assert!(lead.await.unwrap().unwrap());

    // The API server failing: an error, which the loop takes as "not leading".
    let lead = try_lead(&e);
    expect(&mut api, Method::GET, LEASE)
        .await
        .1
        .send_response(respond(
            StatusCode::INTERNAL_SERVER_ERROR,
            &status(500, "InternalError"),
        ));
    assert!(lead.await.unwrap().is_err());
}

#[tokio::test]
async fn only_the_lease_holder_writes_status() {
    let (svc, mut api) = mock::pair::<Request<Body>, Response<Body>>();
    let client = kube::Client::new(svc, "default");
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let (leading, leading_rx) = tokio::sync::watch::channel(false);
    let writer = tokio::spawn(status::run(client, rx, leading_rx));
    let write = |name: &str| StatusWrite {
        kind: Kind::HTTPRoute,
        key: Key::new("shop", name),
        status: json!({"parents": []}),
    };
    tx.send(write("decided-while-another-led")).unwrap();
    nothing_more(&mut api).await;
    leading.send_replace(true);
    tx.send(write("web")).unwrap();
    // The first request is for the second write: the first was left to the
    // holder of the time.
    let (_, send) = expect(
        &mut api,
        Method::GET,
        "/apis/gateway.networking.k8s.io/v1/namespaces/shop/httproutes/web/status",
    )
    .await;
    send.send_response(respond(StatusCode::NOT_FOUND, &status(404, "NotFound")));
    drop(tx);
    writer.await.unwrap();
    nothing_more(&mut api).await;
}
