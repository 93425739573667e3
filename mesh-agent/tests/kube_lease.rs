//! The status writer Lease against a scripted fake API server
//! (`tower_test::mock`): which agent writes route and policy status, and the
//! exact requests that decide it.

use std::time::{Duration, Instant};

use http::{Method, Request, Response, StatusCode};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::client::Body;
use mesh_agent::{
    reconcile::policies::StatusWrite,
    sources::kube::{
        lease::{self, Elector},
        status,
    },
    state::{Key, Kind},
};
use serde_json::{Value, json};
use tower_test::mock::{self, Handle};

type Api = Handle<Request<Body>, Response<Body>>;

const LEASES: &str = "/apis/coordination.k8s.io/v1/namespaces/sluice-system/leases";
const LEASE: &str =
    "/apis/coordination.k8s.io/v1/namespaces/sluice-system/leases/sluice-status-writer";

mod support;
use support::json_response as respond;

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
    let e = std::sync::Arc::new(e);
    let lead = tokio::spawn({
        let e = e.clone();
        async move { e.try_lead(t0(), Instant::now()).await }
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
        async move { e.try_lead(later, Instant::now()).await }
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
async fn another_agents_lease_is_taken_over_only_after_no_change_for_its_duration() {
    let (e, mut api) = elector("node-a");
    let e = std::sync::Arc::new(e);
    let t = t0() + SignedDuration::from_secs(100);
    let at = |secs: i64| t + SignedDuration::from_secs(secs);
    // The node's monotonic clock, here in step with its wall clock.
    let mono = Instant::now();
    let try_lead = |now: Timestamp| {
        let e = e.clone();
        let seen_at = mono + now.duration_since(t).unsigned_abs();
        tokio::spawn(async move { e.try_lead(now, seen_at).await })
    };

    // node-b's clock is an hour behind node-a's, but it renews every 5 s:
    // each renewal is a change node-a sees, so node-a never takes over.
    for (i, secs) in [0, 5, 10, 20].into_iter().enumerate() {
        let lead = try_lead(at(secs));
        let rv = (20 + i).to_string();
        expect(&mut api, Method::GET, LEASE)
            .await
            .1
            .send_response(respond(
                StatusCode::OK,
                &lease(&rv, "node-b", at(secs) - SignedDuration::from_secs(3600), 2),
            ));
        assert!(!lead.await.unwrap().unwrap(), "at +{secs} s");
    }
    nothing_more(&mut api).await;

    // node-b stops renewing (same version from +20 s on). Not before 15 s
    // of node-a's own clock have passed does node-a take over...
    let stale = lease("23", "node-b", at(20) - SignedDuration::from_secs(3600), 2);
    let lead = try_lead(at(34));
    expect(&mut api, Method::GET, LEASE)
        .await
        .1
        .send_response(respond(StatusCode::OK, &stale));
    assert!(!lead.await.unwrap().unwrap(), "14 s without a change");
    nothing_more(&mut api).await;
    // ...then it writes the Lease with the version it read; node-c was
    // faster (409): node-a does not lead.
    let lead = try_lead(at(36));
    expect(&mut api, Method::GET, LEASE)
        .await
        .1
        .send_response(respond(StatusCode::OK, &stale));
    let (body, send) = expect(&mut api, Method::PUT, LEASE).await;
    assert_eq!(body["metadata"]["resourceVersion"], "23");
    assert_eq!(body["spec"]["holderIdentity"], "node-a");
    assert_eq!(body["spec"]["leaseTransitions"], 3);
    assert_eq!(body["spec"]["acquireTime"], micro(at(36)));
    send.send_response(respond(StatusCode::CONFLICT, &status(409, "Conflict")));
    assert!(!lead.await.unwrap().unwrap(), "lost the race");

    // The same, uncontested: node-a leads.
    let lead = try_lead(at(37));
    expect(&mut api, Method::GET, LEASE)
        .await
        .1
        .send_response(respond(StatusCode::OK, &stale));
    let (_, send) = expect(&mut api, Method::PUT, LEASE).await;
    send.send_response(respond(StatusCode::OK, &lease("24", "node-a", at(37), 3)));
    assert!(lead.await.unwrap().unwrap());

    // The API server failing: an error, which the loop takes as "not leading".
    let lead = try_lead(at(40));
    expect(&mut api, Method::GET, LEASE)
        .await
        .1
        .send_response(respond(
            StatusCode::INTERNAL_SERVER_ERROR,
            &status(500, "InternalError"),
        ));
    assert!(lead.await.unwrap().is_err());
}

/// A step of this node's wall clock (NTP correcting it by an hour) is no
/// time passing: the monotonic clock alone says how long the holder's Lease
/// went without a change.
#[tokio::test]
async fn a_wall_clock_step_does_not_hand_the_lease_over() {
    let (e, mut api) = elector("node-a");
    let e = std::sync::Arc::new(e);
    let mono = Instant::now();
    let stale = lease("30", "node-b", t0(), 1);
    let try_lead = |wall: Timestamp, secs: u64| {
        let e = e.clone();
        tokio::spawn(async move { e.try_lead(wall, mono + Duration::from_secs(secs)).await })
    };
    async fn answer(api: &mut Api, with: &Value) {
        let (_, send) = expect(api, Method::GET, LEASE).await;
        send.send_response(respond(StatusCode::OK, with));
    }
    // First seen at 0 s; one second later the wall clock jumped an hour.
    let lead = try_lead(t0(), 0);
    answer(&mut api, &stale).await;
    assert!(!lead.await.unwrap().unwrap());
    let lead = try_lead(t0() + SignedDuration::from_secs(3601), 1);
    answer(&mut api, &stale).await;
    // 1 s of this node's time without a change, whatever its wall clock
    // says: no write.
    nothing_more(&mut api).await;
    assert!(!lead.await.unwrap().unwrap());
    // 16 s without a change: taken over.
    let lead = try_lead(t0() + SignedDuration::from_secs(3616), 16);
    answer(&mut api, &stale).await;
    let (body, send) = expect(&mut api, Method::PUT, LEASE).await;
    assert_eq!(body["spec"]["holderIdentity"], "node-a");
    send.send_response(respond(StatusCode::OK, &lease("31", "node-a", t0(), 2)));
    assert!(lead.await.unwrap().unwrap());
}

#[tokio::test(start_paused = true)]
async fn the_writer_stops_writing_when_a_renewal_hangs_and_gives_the_lease_up_on_stop() {
    let (e, mut api) = elector("node-a");
    let (until_tx, until) = tokio::sync::watch::channel(None);
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let gained = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let g = gained.clone();
    let (synced_tx, mut synced) = tokio::sync::watch::channel(false);
    let run = tokio::spawn(lease::run(
        e,
        until_tx,
        move || {
            g.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        },
        stop,
        async move {
            let _ = synced.wait_for(|s| *s).await;
        },
    ));
    // Not synced yet: it does not compete for the Lease.
    tokio::time::sleep(lease::RENEW * 3).await;
    nothing_more(&mut api).await;
    assert!(!lease::may_write(&until.borrow()));
    synced_tx.send_replace(true);
    expect(&mut api, Method::GET, LEASE)
        .await
        .1
        .send_response(respond(StatusCode::NOT_FOUND, &status(404, "NotFound")));
    let (_, send) = expect(&mut api, Method::POST, LEASES).await;
    send.send_response(respond(StatusCode::CREATED, &lease("1", "node-a", t0(), 0)));
    let mut watch = until.clone();
    watch.changed().await.unwrap();
    assert!(lease::may_write(&until.borrow()), "the creator writes");
    assert_eq!(gained.load(std::sync::atomic::Ordering::SeqCst), 1);

    // The next renewal gets no answer: within RENEW, writing stops.
    let (_req, _never) = api.next_request().await.expect("a renewal");
    watch.changed().await.unwrap();
    assert!(!lease::may_write(&until.borrow()));

    // Stopped: it gives the Lease up (read, then write it without a holder).
    stop_tx.send_replace(true);
    loop {
        let (req, send) = api.next_request().await.expect("a request");
        if req.method() == Method::GET {
            send.send_response(respond(StatusCode::OK, &lease("9", "node-a", t0(), 0)));
            continue;
        }
        assert_eq!((req.method(), req.uri().path()), (&Method::PUT, LEASE));
        let body: Value =
            serde_json::from_slice(&req.into_body().collect_bytes().await.unwrap()).unwrap();
        assert!(body["spec"]["holderIdentity"].is_null(), "{body}");
        send.send_response(respond(StatusCode::OK, &lease("10", "", t0(), 0)));
        break;
    }
    run.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn only_the_lease_holder_writes_status_and_a_failed_write_is_sent_again() {
    let (svc, mut api) = mock::pair::<Request<Body>, Response<Body>>();
    let client = kube::Client::new(svc, "default");
    let (tx, rx) = mesh_agent::reconcile::policies::status_queue();
    let (until, until_rx) = tokio::sync::watch::channel(None);
    let (_stop_tx, stop) = tokio::sync::watch::channel(false);
    let resends = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let r = resends.clone();
    let writer = tokio::spawn(status::run(client, rx, until_rx, stop, move || {
        r.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }));
    let write = |name: &str| StatusWrite {
        kind: Kind::HTTPRoute,
        key: Key::new("shop", name),
        status: json!({"parents": []}),
    };
    tx.send(write("decided-while-another-led")).unwrap();
    nothing_more(&mut api).await;
    until.send_replace(Some(std::time::Instant::now() + Duration::from_secs(3600)));
    tx.send(write("web")).unwrap();
    // The first request is for the second write: the first was left to the
    // holder of the time.
    let (_, send) = expect(
        &mut api,
        Method::GET,
        "/apis/gateway.networking.k8s.io/v1/namespaces/shop/httproutes/web/status",
    )
    .await;
    send.send_response(respond(
        StatusCode::INTERNAL_SERVER_ERROR,
        &status(500, "InternalError"),
    ));
    // The write failed: a while later the reconciler is asked to send what
    // still differs (not this write again, which may be outdated by then).
    tokio::time::sleep(status::RETRY_AFTER + Duration::from_secs(1)).await;
    assert_eq!(resends.load(std::sync::atomic::Ordering::SeqCst), 1);
    drop(tx);
    writer.await.unwrap();
    nothing_more(&mut api).await;
}
