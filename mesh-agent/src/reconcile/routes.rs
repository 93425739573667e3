//! Gateway API routes attached to Services (GAMMA): which Services they
//! attach to, and the `Accepted` / `ResolvedRefs` parent conditions the agent
//! writes into their status.

use crate::gateway::{GrpcRoute, HttpRoute};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use serde::{Deserialize, Serialize};

use crate::{
    config,
    state::{Key, Store},
};

/// The reference to a route's parent, as in `status.parents[].parentRef`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ParentRef {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub section_name: Option<String>,
}

impl ParentRef {
    /// A Service parent (GAMMA); other parents (Gateways) are not Sluice's.
    pub fn is_service(&self) -> bool {
        matches!(self.group.as_deref(), None | Some("") | Some("core"))
            && self.kind.as_deref() == Some("Service")
    }

    pub fn service_key(&self, route_ns: &str) -> Key {
        Key::new(self.namespace.as_deref().unwrap_or(route_ns), &self.name)
    }
}

/// A backend reference of a route rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendRef {
    pub group: Option<String>,
    pub kind: Option<String>,
    pub name: String,
    pub namespace: Option<String>,
    pub port: Option<i32>,
    pub weight: Option<i32>,
}

/// The parts of an HTTPRoute or GRPCRoute the agent reasons about.
#[derive(Clone, Debug, PartialEq)]
pub struct RouteRefs {
    pub kind: &'static str,
    pub key: Key,
    pub generation: Option<i64>,
    pub parents: Vec<ParentRef>,
    pub backends: Vec<BackendRef>,
    pub rules: usize,
    /// `status.parents` as stored (every controller's entries).
    pub status_parents: Vec<serde_json::Value>,
}

fn status_parents<T: Serialize>(status: Option<&T>) -> Vec<serde_json::Value> {
    status
        .and_then(|s| serde_json::to_value(s).ok())
        .and_then(|v| v.get("parents").and_then(|p| p.as_array()).cloned())
        .unwrap_or_default()
}

macro_rules! parent_refs {
    ($refs:expr) => {
        $refs
            .iter()
            .flatten()
            .map(|p| ParentRef {
                group: p.group.clone(),
                kind: p.kind.clone(),
                name: p.name.clone(),
                namespace: p.namespace.clone(),
                port: p.port,
                section_name: p.section_name.clone(),
            })
            .collect()
    };
}

macro_rules! backend_refs {
    ($rules:expr) => {
        $rules
            .iter()
            .flatten()
            .flat_map(|r| r.backend_refs.iter().flatten())
            .map(|b| BackendRef {
                group: b.group.clone(),
                kind: b.kind.clone(),
                name: b.name.clone(),
                namespace: b.namespace.clone(),
                port: b.port,
                weight: b.weight,
            })
            .collect()
    };
}

impl RouteRefs {
    pub fn of_http(r: &HttpRoute) -> Self {
        Self {
            kind: "HTTPRoute",
            key: Key::of(r),
            generation: r.metadata.generation,
            parents: parent_refs!(r.spec.parent_refs),
            backends: backend_refs!(r.spec.rules),
            rules: r.spec.rules.as_ref().map_or(0, Vec::len),
            status_parents: status_parents(r.status.as_ref()),
        }
    }

    pub fn of_grpc(r: &GrpcRoute) -> Self {
        Self {
            kind: "GRPCRoute",
            key: Key::of(r),
            generation: r.metadata.generation,
            parents: parent_refs!(r.spec.parent_refs),
            backends: backend_refs!(r.spec.rules),
            rules: r.spec.rules.as_ref().map_or(0, Vec::len),
            status_parents: status_parents(r.status.as_ref()),
        }
    }

    /// Every route in the store.
    pub fn all(store: &Store) -> Vec<RouteRefs> {
        store
            .http_routes
            .values()
            .map(Self::of_http)
            .chain(store.grpc_routes.values().map(Self::of_grpc))
            .collect()
    }

    /// The Service parents this route attaches to.
    pub fn service_parents(&self) -> impl Iterator<Item = &ParentRef> {
        self.parents.iter().filter(|p| p.is_service())
    }
}

/// One condition, before a transition time is set.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cond {
    pub type_: &'static str,
    pub status: bool,
    pub reason: String,
    pub message: String,
}

/// Whether every backend reference resolves: `None` if so, else the
/// `ResolvedRefs` reason and message.
pub fn unresolved(store: &Store, route: &RouteRefs) -> Option<(String, String)> {
    for b in &route.backends {
        let group_ok = matches!(b.group.as_deref(), None | Some("") | Some("core"));
        let kind_ok = matches!(b.kind.as_deref(), None | Some("Service"));
        if !group_ok || !kind_ok {
            return Some((
                "InvalidKind".into(),
                format!(
                    "backendRef {} has group {:?} kind {:?}; only Services are supported",
                    b.name,
                    b.group.as_deref().unwrap_or(""),
                    b.kind.as_deref().unwrap_or("Service")
                ),
            ));
        }
        let ns = b.namespace.as_deref().unwrap_or(&route.key.namespace);
        if ns != route.key.namespace {
            return Some((
                "RefNotPermitted".into(),
                format!(
                    "backendRef {ns}/{} is in another namespace; cross-namespace backends are not \
                     supported (ReferenceGrant is not implemented)",
                    b.name
                ),
            ));
        }
        if !store.services.contains_key(&Key::new(ns, &b.name)) {
            return Some((
                "BackendNotFound".into(),
                format!("Service {ns}/{} does not exist", b.name),
            ));
        }
        if b.port.is_none() {
            return Some((
                "BackendNotFound".into(),
                format!(
                    "backendRef {ns}/{} has no port (required for a Service)",
                    b.name
                ),
            ));
        }
    }
    None
}

/// The conditions for one Service parent of a route.
pub fn parent_conditions(store: &Store, route: &RouteRefs, parent: &ParentRef) -> Vec<Cond> {
    let svc = parent.service_key(&route.key.namespace);
    let accepted = if store.services.contains_key(&svc) {
        Cond {
            type_: "Accepted",
            status: true,
            reason: "Accepted".into(),
            message: format!("attached to Service {svc}"),
        }
    } else {
        Cond {
            type_: "Accepted",
            status: false,
            reason: "NoMatchingParent".into(),
            message: format!("parent Service {svc} does not exist"),
        }
    };
    let resolved = match unresolved(store, route) {
        None => Cond {
            type_: "ResolvedRefs",
            status: true,
            reason: "ResolvedRefs".into(),
            message: "all backend references resolve".into(),
        },
        Some((reason, message)) => Cond {
            type_: "ResolvedRefs",
            status: false,
            reason,
            message,
        },
    };
    vec![accepted, resolved]
}

/// Kubernetes conditions for `conds`, keeping the transition time of a
/// condition whose status did not change.
pub fn to_conditions(
    conds: &[Cond],
    generation: Option<i64>,
    previous: &[Condition],
) -> Vec<Condition> {
    let now = Time(k8s_openapi::jiff::Timestamp::now());
    conds
        .iter()
        .map(|c| {
            let status = if c.status { "True" } else { "False" };
            let since = previous
                .iter()
                .find(|p| p.type_ == c.type_ && p.status == status)
                .map(|p| p.last_transition_time.clone())
                .unwrap_or_else(|| now.clone());
            Condition {
                type_: c.type_.into(),
                status: status.into(),
                reason: c.reason.clone(),
                message: c.message.clone(),
                observed_generation: generation,
                last_transition_time: since,
            }
        })
        .collect()
}

/// Whether stored conditions already say what `conds` say (times aside).
pub fn conditions_match(stored: &[Condition], conds: &[Cond], generation: Option<i64>) -> bool {
    stored.len() == conds.len()
        && conds.iter().all(|c| {
            stored.iter().any(|s| {
                s.type_ == c.type_
                    && s.status == if c.status { "True" } else { "False" }
                    && s.reason == c.reason
                    && s.message == c.message
                    && s.observed_generation == generation
            })
        })
}

/// The full `status.parents` a route should have (other controllers' entries
/// kept as they are), or `None` when it already has it.
pub fn route_status_parents(store: &Store, route: &RouteRefs) -> Option<Vec<serde_json::Value>> {
    let ours = |v: &serde_json::Value| v["controllerName"] == config::CONTROLLER_NAME;
    let mut out: Vec<serde_json::Value> = route
        .status_parents
        .iter()
        .filter(|v| !ours(v))
        .cloned()
        .collect();
    let mut changed = false;
    let mut seen = 0;
    for parent in route.service_parents() {
        let conds = parent_conditions(store, route, parent);
        let prev = route.status_parents.iter().find(|v| {
            ours(v)
                && serde_json::from_value::<ParentRef>(v["parentRef"].clone())
                    .ok()
                    .as_ref()
                    == Some(parent)
        });
        let prev_conds: Vec<Condition> = prev
            .and_then(|v| serde_json::from_value(v["conditions"].clone()).ok())
            .unwrap_or_default();
        if prev.is_none() || !conditions_match(&prev_conds, &conds, route.generation) {
            changed = true;
        }
        seen += 1;
        out.push(serde_json::json!({
            "parentRef": parent,
            "controllerName": config::CONTROLLER_NAME,
            "conditions": to_conditions(&conds, route.generation, &prev_conds),
        }));
    }
    // Entries of ours for parents the route no longer has must go.
    let stale = route.status_parents.iter().filter(|v| ours(v)).count() != seen;
    (changed || stale).then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        state::{Object, Update},
        testing::*,
    };

    fn route(json: serde_json::Value) -> HttpRoute {
        serde_json::from_value(json).unwrap()
    }

    fn web_route(backend: &str) -> HttpRoute {
        route(serde_json::json!({
            "apiVersion": "gateway.networking.k8s.io/v1",
            "kind": "HTTPRoute",
            "metadata": {"name": "web", "namespace": "shop", "generation": 3},
            "spec": {
                "parentRefs": [
                    {"group": "", "kind": "Service", "name": "web", "port": 80},
                    {"name": "some-gateway"}
                ],
                "rules": [{"backendRefs": [{"name": backend, "port": 8080, "weight": 90}]}]
            }
        }))
    }

    #[test]
    fn accepted_and_resolved_when_parent_and_backends_exist() {
        let mut s = Store::new();
        s.apply(Update::Upsert(Object::Service(service(
            "shop",
            "web",
            "127.96.0.1",
            &[80],
        ))));
        s.apply(Update::Upsert(Object::Service(service(
            "shop",
            "web-v2",
            "127.96.0.2",
            &[8080],
        ))));
        let r = RouteRefs::of_http(&web_route("web-v2"));
        assert_eq!(
            r.service_parents().count(),
            1,
            "the Gateway parent is not ours"
        );
        let parents = route_status_parents(&s, &r).expect("no status yet: must write");
        assert_eq!(parents.len(), 1);
        let conds = &parents[0]["conditions"];
        assert_eq!(conds[0]["type"], "Accepted");
        assert_eq!(conds[0]["status"], "True");
        assert_eq!(conds[1]["type"], "ResolvedRefs");
        assert_eq!(conds[1]["status"], "True");
        assert_eq!(conds[1]["observedGeneration"], 3);
        assert_eq!(parents[0]["controllerName"], config::CONTROLLER_NAME);

        // Once written, nothing more to write.
        let mut written = web_route("web-v2");
        written.status =
            Some(serde_json::from_value(serde_json::json!({"parents": parents})).unwrap());
        assert_eq!(
            route_status_parents(&s, &RouteRefs::of_http(&written)),
            None
        );
    }

    #[test]
    fn a_missing_backend_is_backend_not_found_and_a_missing_parent_not_accepted() {
        let mut s = Store::new();
        let r = RouteRefs::of_http(&web_route("nope"));
        let c = parent_conditions(&s, &r, &r.parents[0]);
        assert_eq!(
            (c[0].status, c[0].reason.as_str()),
            (false, "NoMatchingParent")
        );
        assert_eq!(
            (c[1].status, c[1].reason.as_str()),
            (false, "BackendNotFound")
        );
        assert!(c[1].message.contains("shop/nope"), "{}", c[1].message);
        s.apply(Update::Upsert(Object::Service(service(
            "shop",
            "web",
            "127.96.0.1",
            &[80],
        ))));
        let c = parent_conditions(&s, &r, &r.parents[0]);
        assert!(c[0].status);
    }

    #[test]
    fn other_controllers_entries_are_kept() {
        let s = Store::new();
        let mut r = web_route("web");
        r.status = Some(
            serde_json::from_value(serde_json::json!({"parents": [{
                "parentRef": {"name": "some-gateway"},
                "controllerName": "example.com/gateway",
                "conditions": []
            }]}))
            .unwrap(),
        );
        let parents = route_status_parents(&s, &RouteRefs::of_http(&r)).unwrap();
        assert_eq!(parents.len(), 2);
        assert_eq!(parents[0]["controllerName"], "example.com/gateway");
    }
}
