//! A fake Kubernetes API server for tests (`tower_test::mock`): lists from
//! fixtures, watches that stay open until the test sends an event, single
//! objects by path, and a log of writes.
#![allow(dead_code)]

use std::{
    collections::HashMap,
    pin::pin,
    sync::{Arc, Mutex},
};

use http::{Request, Response, StatusCode};
use kube::client::Body;
use serde_json::{Value, json};
use tower_test::mock::{self, SendResponse};

type Responder = SendResponse<Response<Body>>;

/// Which list path each fixture answers.
const FIXTURES: &[(&str, &str)] = &[
    ("/api/v1/namespaces", "namespaces.json"),
    ("/api/v1/nodes", "nodes.json"),
    ("/api/v1/pods", "pods.json"),
    ("/api/v1/services", "services.json"),
    (
        "/apis/discovery.k8s.io/v1/endpointslices",
        "endpointslices.json",
    ),
    (
        "/apis/gateway.networking.k8s.io/v1/httproutes",
        "httproutes.json",
    ),
    (
        "/apis/sluice.dev/v1alpha1/accesspolicies",
        "accesspolicies.json",
    ),
    (
        "/apis/sluice.dev/v1alpha1/meshpolicies",
        "meshpolicies.json",
    ),
];

#[derive(Default)]
struct FakeState {
    lists: HashMap<String, Value>,
    /// Single objects by path (GET), including created ones.
    objects: HashMap<String, Value>,
    /// POSTs and apply PATCHes: (path, body).
    writes: Vec<(String, String, Value)>,
    parked: HashMap<String, Vec<Responder>>,
    queued: HashMap<String, Vec<Value>>,
    patches: Vec<(String, Value)>,
    /// Statuses written by PATCH, by the object's `/status` path.
    statuses: HashMap<String, Value>,
    /// Lists answered with 503 for the given number of next requests, as by
    /// an overloaded API server.
    failing_lists: HashMap<String, usize>,
    failing_watches: HashMap<String, usize>,
    /// Paths whose next PUT is answered with 409, as if another writer got
    /// there first.
    conflicts: std::collections::HashSet<String>,
    /// Kinds whose CRD was deleted: lists and watches answer 404.
    gone: std::collections::HashSet<String>,
    /// Lists answered (200), by path.
    lists_served: HashMap<String, usize>,
    /// The query of each list request, by path.
    list_queries: HashMap<String, Vec<String>>,
    /// Paths whose lists wait until released, and the lists waiting.
    held_lists: std::collections::HashSet<String>,
    waiting_lists: HashMap<String, Vec<Responder>>,
}

/// A fake API server: lists from fixtures, watches that stay open until the
/// test sends an event, and a log of PATCH requests.
#[derive(Clone, Default)]
pub struct FakeApi {
    state: Arc<Mutex<FakeState>>,
}

/// A JSON response with status `code`.
/// The API server's answer while it cannot serve.
fn unavailable() -> Response<Body> {
    json_response(
        StatusCode::SERVICE_UNAVAILABLE,
        &json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                "reason": "ServiceUnavailable", "code": 503,
                "message": "the server is currently unable to handle the request"}),
    )
}

pub fn json_response(code: StatusCode, v: &Value) -> Response<Body> {
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(Body::from(serde_json::to_vec(v).unwrap()))
        .unwrap()
}

fn not_found(path: &str) -> Response<Body> {
    json_response(
        StatusCode::NOT_FOUND,
        &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": format!("the server could not find the requested resource ({path})"),
                "reason": "NotFound", "details": {}, "code": 404}),
    )
}

fn watch_body(events: &[Value]) -> Response<Body> {
    let mut body = Vec::new();
    for e in events {
        body.extend(serde_json::to_vec(e).unwrap());
        body.push(b'\n');
    }
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .body(Body::from(body))
        .unwrap()
}

impl FakeApi {
    pub fn with_fixtures() -> Self {
        let fake = FakeApi::default();
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/kube");
        for (path, file) in FIXTURES {
            let v: Value = serde_json::from_slice(&std::fs::read(dir.join(file)).unwrap()).unwrap();
            fake.state.lock().unwrap().lists.insert(path.to_string(), v);
        }
        fake
    }

    pub fn client(&self) -> kube::Client {
        let (svc, handle) = mock::pair::<Request<Body>, Response<Body>>();
        let me = self.clone();
        tokio::spawn(async move {
            let mut handle = pin!(handle);
            while let Some((req, send)) = handle.next_request().await {
                me.serve(req, send).await;
            }
        });
        kube::Client::new(svc, "default")
    }

    async fn serve(&self, req: Request<Body>, send: Responder) {
        let path = req.uri().path().to_string();
        let query = req.uri().query().unwrap_or("").to_string();
        if req.method() == http::Method::POST {
            let body: Value =
                serde_json::from_slice(&req.into_body().collect_bytes().await.unwrap()).unwrap();
            let name = body["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            let mut body = body;
            body["metadata"]["resourceVersion"] = json!("1");
            let mut st = self.state.lock().unwrap();
            st.writes.push(("POST".into(), path.clone(), body.clone()));
            let at = format!("{path}/{name}");
            if st.objects.contains_key(&at) {
                send.send_response(json_response(
                    StatusCode::CONFLICT,
                    &json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "AlreadyExists",
                            "message": format!("{name} already exists"), "code": 409}),
                ));
                return;
            }
            st.objects.insert(at, body.clone());
            send.send_response(json_response(StatusCode::CREATED, &body));
            return;
        }
        if req.method() == http::Method::PUT {
            // A replace: only of the version the client read.
            let body: Value =
                serde_json::from_slice(&req.into_body().collect_bytes().await.unwrap()).unwrap();
            let mut st = self.state.lock().unwrap();
            st.writes.push(("PUT".into(), path.clone(), body.clone()));
            let Some(stored) = st.objects.get(&path) else {
                send.send_response(not_found(&path));
                return;
            };
            let version = stored["metadata"]["resourceVersion"].clone();
            if st.conflicts.remove(&path) || body["metadata"]["resourceVersion"] != version {
                send.send_response(json_response(
                    StatusCode::CONFLICT,
                    &json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                            "reason": "Conflict", "code": 409,
                            "message": "the object has been modified; please apply your changes to the latest version"}),
                ));
                return;
            }
            let next: u64 = version.as_str().and_then(|v| v.parse().ok()).unwrap_or(0) + 1;
            let mut body = body;
            body["metadata"]["resourceVersion"] = json!(next.to_string());
            st.objects.insert(path, body.clone());
            send.send_response(json_response(StatusCode::OK, &body));
            return;
        }
        let apply = req
            .headers()
            .get("content-type")
            .is_some_and(|v| v.to_str().unwrap_or("").contains("apply-patch"));
        if req.method() == http::Method::PATCH && apply {
            let bytes = req.into_body().collect_bytes().await.unwrap();
            let body: Value = serde_json::from_slice(&bytes)
                .or_else(|_| serde_yaml::from_slice(&bytes))
                .unwrap();
            let mut st = self.state.lock().unwrap();
            st.writes.push(("APPLY".into(), path.clone(), body.clone()));
            st.objects.insert(path.clone(), body.clone());
            send.send_response(json_response(StatusCode::OK, &body));
            return;
        }
        if req.method() == http::Method::PATCH {
            let body = req.into_body().collect_bytes().await.unwrap();
            let patch: Value = serde_json::from_slice(&body).unwrap();
            let reply = self.patched_object(&path, &patch);
            self.state
                .lock()
                .unwrap()
                .patches
                .push((path.clone(), patch));
            send.send_response(match reply {
                Some(obj) => json_response(StatusCode::OK, &obj),
                None => not_found(&path),
            });
            return;
        }
        let mut st = self.state.lock().unwrap();
        if query.contains("watch=true") {
            if st.gone.contains(&path) {
                send.send_response(not_found(&path));
                return;
            }
            if let Some(n) = st.failing_watches.get_mut(&path).filter(|n| **n > 0) {
                *n -= 1;
                send.send_response(unavailable());
                return;
            }
            match st.queued.remove(&path) {
                Some(events) if !events.is_empty() => send.send_response(watch_body(&events)),
                _ => st.parked.entry(path).or_default().push(send),
            }
            return;
        }
        st.list_queries
            .entry(path.clone())
            .or_default()
            .push(query.clone());
        if st.gone.contains(&path) {
            send.send_response(not_found(&path));
            return;
        }
        if st.held_lists.contains(&path) {
            st.waiting_lists.entry(path).or_default().push(send);
            return;
        }
        if let Some(n) = st.failing_lists.get_mut(&path).filter(|n| **n > 0) {
            *n -= 1;
            send.send_response(unavailable());
            return;
        }
        match st
            .lists
            .get(&path)
            .or_else(|| st.objects.get(&path))
            .cloned()
        {
            Some(v) => {
                *st.lists_served.entry(path).or_default() += 1;
                send.send_response(json_response(StatusCode::OK, &v))
            }
            None => {
                drop(st);
                match self.listed_object(&path) {
                    Some(v) => send.send_response(json_response(StatusCode::OK, &v)),
                    None => send.send_response(not_found(&path)),
                }
            }
        }
    }

    /// A listed object by its path (`.../<plural>/<name>` or its `/status`),
    /// with the status written since.
    fn listed_object(&self, path: &str) -> Option<Value> {
        // /apis/<group>/<version>/namespaces/<ns>/<plural>/<name>[/status]
        let status_path = if path.ends_with("/status") {
            path.to_string()
        } else {
            format!("{path}/status")
        };
        let parts: Vec<&str> = status_path.trim_start_matches('/').split('/').collect();
        let [_, group, version, _, ns, plural, name, _] = parts[..] else {
            return None;
        };
        let list_path = format!("/apis/{group}/{version}/{plural}");
        let st = self.state.lock().unwrap();
        let mut obj = st.lists.get(&list_path)?["items"]
            .as_array()?
            .iter()
            .find(|o| o["metadata"]["namespace"] == ns && o["metadata"]["name"] == name)?
            .clone();
        if let Some(status) = st.statuses.get(&status_path) {
            obj["status"] = status.clone();
        }
        Some(obj)
    }

    /// The object a status PATCH targets, with the patched status.
    fn patched_object(&self, path: &str, patch: &Value) -> Option<Value> {
        // /apis/<group>/<version>/namespaces/<ns>/<plural>/<name>/status
        let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        let [_, group, version, _, ns, plural, name, _] = parts[..] else {
            return None;
        };
        let list_path = format!("/apis/{group}/{version}/{plural}");
        let st = self.state.lock().unwrap();
        let list = st.lists.get(&list_path)?;
        let mut obj = list["items"]
            .as_array()?
            .iter()
            .find(|o| o["metadata"]["namespace"] == ns && o["metadata"]["name"] == name)?
            .clone();
        obj["status"] = patch["status"].clone();
        drop(st);
        self.state
            .lock()
            .unwrap()
            .statuses
            .insert(path.to_string(), patch["status"].clone());
        Some(obj)
    }

    /// Sends a watch event for `path` (to an open watch, or the next one).
    pub fn event(&self, path: &str, type_: &str, object: Value) {
        let ev = json!({"type": type_, "object": object});
        let mut st = self.state.lock().unwrap();
        match st.parked.get_mut(path).and_then(|v| v.pop()) {
            Some(send) => send.send_response(watch_body(&[ev])),
            None => st.queued.entry(path.to_string()).or_default().push(ev),
        }
    }

    pub fn patches(&self) -> Vec<(String, Value)> {
        self.state.lock().unwrap().patches.clone()
    }

    pub fn watching(&self, path: &str) -> bool {
        self.state
            .lock()
            .unwrap()
            .parked
            .get(path)
            .is_some_and(|v| !v.is_empty())
    }
}

impl FakeApi {
    pub fn writes(&self) -> Vec<(String, String, Value)> {
        self.state.lock().unwrap().writes.clone()
    }

    pub fn put_object(&self, path: &str, v: Value) {
        self.state.lock().unwrap().objects.insert(path.into(), v);
    }

    /// Adds `item` to the list the fake serves for `path`.
    pub fn add_list_item(&self, path: &str, item: Value) {
        let mut st = self.state.lock().unwrap();
        let list = st.lists.get_mut(path).expect("a list the fake serves");
        list["items"].as_array_mut().unwrap().push(item);
    }

    /// The next `n` watches of `path` fail with 503.
    pub fn fail_next_watches(&self, path: &str, n: usize) {
        self.state
            .lock()
            .unwrap()
            .failing_watches
            .insert(path.into(), n);
    }

    /// The next `n` lists of `path` fail with 503.
    pub fn fail_next_lists(&self, path: &str, n: usize) {
        self.state
            .lock()
            .unwrap()
            .failing_lists
            .insert(path.into(), n);
    }

    /// The kind listed at `path` stops being served (its CRD deleted while
    /// the client's watch was away): its open watches end with 410 Gone (the
    /// client lists again), and its lists and watches answer 404.
    pub fn remove_kind(&self, path: &str) {
        self.state.lock().unwrap().lists.remove(path);
        self.stop_serving_kind(path);
    }

    /// The kind listed at `path` answers 404 for a while, its objects kept
    /// (an API server starting, not serving the CRD yet): its open watches
    /// end with 410 Gone, and its lists and watches answer 404 until
    /// [`FakeApi::serve_kind_again`].
    pub fn stop_serving_kind(&self, path: &str) {
        self.state.lock().unwrap().gone.insert(path.into());
        self.expire_watches(path);
    }

    /// Open watches of `path` end with 410 Gone (expired: the client lists
    /// again), as after an API server restart.
    pub fn expire_watches(&self, path: &str) {
        let mut st = self.state.lock().unwrap();
        let gone = json!({"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1",
            "status": "Failure", "reason": "Expired", "code": 410,
            "message": "too old resource version"}});
        for send in st.parked.remove(path).unwrap_or_default() {
            send.send_response(watch_body(std::slice::from_ref(&gone)));
        }
    }

    /// Lists of `path` wait, unanswered, until [`FakeApi::release_lists`].
    pub fn hold_lists(&self, path: &str) {
        self.state.lock().unwrap().held_lists.insert(path.into());
    }

    /// How many lists of `path` are waiting.
    pub fn lists_waiting(&self, path: &str) -> usize {
        self.state
            .lock()
            .unwrap()
            .waiting_lists
            .get(path)
            .map_or(0, Vec::len)
    }

    /// Answers the lists of `path` held so far, and the next ones at once.
    pub fn release_lists(&self, path: &str) {
        let mut st = self.state.lock().unwrap();
        st.held_lists.remove(path);
        let list = st.lists.get(path).cloned().unwrap_or_default();
        for send in st.waiting_lists.remove(path).unwrap_or_default() {
            *st.lists_served.entry(path.into()).or_default() += 1;
            send.send_response(json_response(StatusCode::OK, &list));
        }
    }

    /// The queries of the list requests of `path` so far.
    pub fn list_queries(&self, path: &str) -> Vec<String> {
        self.state
            .lock()
            .unwrap()
            .list_queries
            .get(path)
            .cloned()
            .unwrap_or_default()
    }

    /// How many lists of `path` were answered.
    pub fn lists_served(&self, path: &str) -> usize {
        self.state
            .lock()
            .unwrap()
            .lists_served
            .get(path)
            .copied()
            .unwrap_or_default()
    }

    pub fn serve_kind_again(&self, path: &str) {
        self.state.lock().unwrap().gone.remove(path);
    }

    pub fn conflict_next_put(&self, path: &str) {
        self.state.lock().unwrap().conflicts.insert(path.into());
    }

    pub fn object(&self, path: &str) -> Option<Value> {
        self.state.lock().unwrap().objects.get(path).cloned()
    }
}
