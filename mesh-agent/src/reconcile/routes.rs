//! Gateway API routes attached to Services (GAMMA): which Services they
//! attach to, and the `Accepted` / `ResolvedRefs` parent conditions the agent
//! writes into their status.

use crate::gateway::{GrpcRoute, HttpRoute};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use serde::{Deserialize, Serialize};

use super::refs::{RefIndex, RefProblem};
use crate::{
    config,
    proxy::routes::{self as proxy_routes, DroppedRule},
    state::{Key, Kind, Store},
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
        super::refs::is_core(self.group.as_deref()) && self.kind.as_deref() == Some("Service")
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

/// A route and what its translation for the proxy left out.
#[derive(Clone, Debug, PartialEq)]
pub struct RouteEval {
    pub route: RouteRefs,
    pub dropped: Vec<DroppedRule>,
    pub refused: Vec<RefProblem>,
    /// HTTPRoute parents a GRPCRoute also attaches to (Service, port as the
    /// HTTPRoute names it, the GRPCRoute): GEP-1426 gives the Service port
    /// to the GRPCRoute, and this route is not in force there.
    pub conflicted: Vec<(Key, Option<i32>, Key)>,
}

impl RouteEval {
    /// Every rule was left out.
    pub fn all_dropped(&self) -> bool {
        self.route.rules > 0
            && self.dropped.iter().filter(|d| !d.closed).count() == self.route.rules
    }

    pub fn kind(&self) -> Kind {
        if self.route.kind == "HTTPRoute" {
            Kind::HTTPRoute
        } else {
            Kind::GRPCRoute
        }
    }
}

/// Every route in the store translated once against `index`: the
/// evaluations route status is written from, and the proxy's form of each
/// route left with a parent and a rule.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Translations {
    pub evals: Vec<RouteEval>,
    pub http: Vec<l7_proxy::config::HttpRoute>,
    pub grpc: Vec<l7_proxy::config::GrpcRoute>,
}

pub fn translate_all(store: &Store, index: &RefIndex) -> Translations {
    /// The evaluation, and the proxy's form of the route when it is kept.
    fn eval<R>(route: RouteRefs, t: proxy_routes::Translated<R>) -> (RouteEval, Option<R>) {
        let e = RouteEval {
            route,
            dropped: t.dropped,
            refused: t.refused,
            conflicted: Vec::new(),
        };
        (e, t.route)
    }
    let mut t = Translations::default();
    let mut grpc_evals = Vec::new();
    for r in store.grpc_routes.values() {
        let (e, route) = eval(RouteRefs::of_grpc(r), proxy_routes::grpc_route(r, index));
        t.grpc.extend(route);
        grpc_evals.push(e);
    }
    // Where GRPCRoutes are in force: (Service, port or every port, route).
    let grpc_parents: Vec<(&l7_proxy::config::ObjectRef, Option<u16>, Key)> = t
        .grpc
        .iter()
        .flat_map(|g| {
            g.parents
                .iter()
                .map(|p| (&p.service, p.port, Key::new(&g.id.namespace, &g.id.name)))
        })
        .collect();
    for r in store.http_routes.values() {
        let (mut e, route) = eval(RouteRefs::of_http(r), proxy_routes::http_route(r, index));
        if let Some(mut route) = route {
            // GEP-1426: on a Service port a GRPCRoute attaches to, the
            // HTTPRoute is ignored (status: Accepted=False, Conflicted).
            // Only within one scope: routes of one namespace apply to the
            // same callers (the Service's own namespace: every caller; any
            // other: its own clients, GAMMA), so a consumer GRPCRoute of
            // another namespace must not switch off this one for all.
            let mut kept = Vec::new();
            for p in std::mem::take(&mut route.parents) {
                let svc = Key::new(&p.service.namespace, &p.service.name);
                let grpc: Vec<(Option<u16>, &Key)> = grpc_parents
                    .iter()
                    .filter(|(s, _, g)| **s == p.service && g.namespace == route.id.namespace)
                    .map(|(_, port, g)| (*port, g))
                    .collect();
                let taken = |port: u16| grpc.iter().find(|(gp, _)| gp.is_none_or(|gp| gp == port));
                let conflict = match p.port {
                    // One port: the route's there unless a GRPCRoute has it.
                    Some(port) => taken(port).map(|(_, g)| *g),
                    // Every port: a GRPCRoute on every port takes them all;
                    // one on some ports leaves the route the others.
                    None => match grpc.iter().find(|(gp, _)| gp.is_none()) {
                        Some((_, g)) => Some(*g),
                        None if grpc.is_empty() => None,
                        None => {
                            let ports = index.services.get(&svc).into_iter().flatten();
                            let free: Vec<u16> = ports
                                .copied()
                                .filter(|port| taken(*port).is_none())
                                .collect();
                            if free.is_empty() {
                                Some(grpc[0].1)
                            } else {
                                kept.extend(free.into_iter().map(|port| {
                                    l7_proxy::config::ParentRef {
                                        service: p.service.clone(),
                                        port: Some(port),
                                    }
                                }));
                                continue;
                            }
                        }
                    },
                };
                match conflict {
                    None => kept.push(p),
                    Some(g) => e.conflicted.push((svc, p.port.map(i32::from), g.clone())),
                }
            }
            route.parents = kept;
            if !route.parents.is_empty() {
                t.http.push(route);
            }
        }
        t.evals.push(e);
    }
    t.evals.extend(grpc_evals);
    t
}

/// Every route in the store, evaluated against `index` as the proxy gets it.
#[cfg(test)]
pub fn evaluate(store: &Store, index: &RefIndex) -> Vec<RouteEval> {
    translate_all(store, index).evals
}

/// The conditions for one Service parent of a route: `Accepted`,
/// `ResolvedRefs`, and `PartiallyInvalid` when some rules were left out.
pub fn parent_conditions(index: &RefIndex, eval: &RouteEval, parent: &ParentRef) -> Vec<Cond> {
    let svc = parent.service_key(&eval.route.key.namespace);
    let checked = index.check_parent(&svc, parent.port, parent.section_name.as_deref());
    // The port it attaches to, named by number or by sectionName.
    let port = checked.clone().ok().flatten().map(i32::from);
    let conflict = eval
        .conflicted
        .iter()
        .find(|(s, p, _)| *s == svc && *p == port);
    let accepted = match checked.map(|_| ()) {
        Err(message) => Cond {
            type_: "Accepted",
            status: false,
            reason: "NoMatchingParent".into(),
            message,
        },
        Ok(()) if conflict.is_some() => Cond {
            type_: "Accepted",
            status: false,
            reason: "Conflicted".into(),
            message: format!(
                "GRPCRoute {} attaches to Service {svc}{} too: a GRPCRoute takes the Service \
                 port, this HTTPRoute is ignored there (GEP-1426)",
                conflict.map(|c| c.2.to_string()).unwrap_or_default(),
                parent
                    .port
                    .map(|p| format!(" port {p}"))
                    .unwrap_or_default()
            ),
        },
        Ok(()) if eval.all_dropped() => Cond {
            type_: "Accepted",
            status: false,
            reason: "UnsupportedValue".into(),
            message: format!(
                "no rule can be carried out by the node proxy: {}",
                dropped_messages(eval)
            ),
        },
        Ok(()) => Cond {
            type_: "Accepted",
            status: true,
            reason: "Accepted".into(),
            message: if index.outside_mesh.contains(&svc.namespace) {
                format!(
                    "attached to Service {svc}, but {}: connections to the Service are \
                     balanced by the kernel and the route applies to none of them",
                    crate::config::not_in_mesh(&svc.namespace)
                )
            } else {
                format!("attached to Service {svc}")
            },
        },
    };
    let resolved = match eval.refused.first() {
        None => Cond {
            type_: "ResolvedRefs",
            status: true,
            reason: "ResolvedRefs".into(),
            message: "all backend references resolve".into(),
        },
        Some(first) => Cond {
            type_: "ResolvedRefs",
            status: false,
            reason: first.reason.as_str().into(),
            message: {
                // A mirror that does not resolve is dropped; a backend keeps
                // its share, answered with 500.
                let mirror = |p: &&RefProblem| p.message.contains(".requestMirror.");
                let (mirrors, backends) = (
                    eval.refused.iter().filter(mirror).count(),
                    eval.refused.iter().filter(|p| !mirror(p)).count(),
                );
                let what = match (backends, mirrors) {
                    (_, 0) => "requests for these backends are answered with 500",
                    (0, _) => "no copy is sent to these mirrors",
                    _ => {
                        "requests for these backends are answered with 500, and no copy is \
                         sent to these mirrors"
                    }
                };
                format!(
                    "{}; {what}",
                    eval.refused
                        .iter()
                        .map(|p| p.message.as_str())
                        .collect::<Vec<_>>()
                        .join("; ")
                )
            },
        },
    };
    let partial = (accepted.status && !eval.dropped.is_empty()).then(|| Cond {
        type_: "PartiallyInvalid",
        status: true,
        reason: "UnsupportedValue".into(),
        // The Gateway API asks for this prefix when invalid rules are dropped.
        message: format!(
            "Dropped Rule{} {}: {}",
            if eval.dropped.len() > 1 { "s" } else { "" },
            eval.dropped
                .iter()
                .map(|d| d.index.to_string())
                .collect::<Vec<_>>()
                .join(", "),
            dropped_messages(eval)
        ),
    });
    let mut out = vec![accepted, resolved];
    out.extend(partial);
    out
}

/// Why each dropped rule was left out, `; `-separated; a rule kept to
/// answer its matches with 500 says so.
fn dropped_messages(eval: &RouteEval) -> String {
    eval.dropped
        .iter()
        .map(|d| {
            if d.closed {
                format!(
                    "{} (requests the rule matches are answered with 500, not passed to \
                     another rule)",
                    d.message
                )
            } else {
                d.message.clone()
            }
        })
        .collect::<Vec<_>>()
        .join("; ")
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

fn is_ours(v: &serde_json::Value) -> bool {
    v["controllerName"] == config::CONTROLLER_NAME
}

/// Sluice's entries of `status.parents` for a route (one per Service
/// parent), or `None` when the stored ones already say that. Other
/// controllers' entries are not Sluice's to write: the status writer merges
/// these into the route's current `status.parents` ([`merge_parents`]).
pub fn route_status_parents(index: &RefIndex, eval: &RouteEval) -> Option<Vec<serde_json::Value>> {
    let route = &eval.route;
    let mut out = Vec::new();
    let mut changed = false;
    for parent in route.service_parents() {
        let conds = parent_conditions(index, eval, parent);
        let prev = route.status_parents.iter().find(|v| {
            is_ours(v)
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
        out.push(serde_json::json!({
            "parentRef": parent,
            "controllerName": config::CONTROLLER_NAME,
            "conditions": to_conditions(&conds, route.generation, &prev_conds),
        }));
    }
    // Entries of ours for parents the route no longer has must go.
    let stale = route.status_parents.iter().filter(|v| is_ours(v)).count() != out.len();
    (changed || stale).then_some(out)
}

/// `current` (a route's `status.parents` as just read) with Sluice's entries
/// replaced by `ours`: every other controller's entry is kept as it is, in
/// its place.
pub fn merge_parents(
    current: &[serde_json::Value],
    ours: &[serde_json::Value],
) -> Vec<serde_json::Value> {
    current
        .iter()
        .filter(|v| !is_ours(v))
        .chain(ours)
        .cloned()
        .collect()
}

/// Whether `current` already holds `ours`, transition times aside (another
/// agent wrote the same conditions a moment earlier).
pub fn parents_hold(current: &[serde_json::Value], ours: &[serde_json::Value]) -> bool {
    let strip = |v: &serde_json::Value| {
        let mut v = v.clone();
        for c in v["conditions"].as_array_mut().into_iter().flatten() {
            if let Some(c) = c.as_object_mut() {
                c.remove("lastTransitionTime");
            }
        }
        v
    };
    let have: Vec<serde_json::Value> = current.iter().filter(|v| is_ours(v)).map(strip).collect();
    let want: Vec<serde_json::Value> = ours.iter().map(strip).collect();
    have == want
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        gateway::HttpRoute,
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

    /// The Services, each in a namespace of the mesh.
    fn store(services: &[(&str, &str, &[i32])]) -> Store {
        let mut s = Store::new();
        for (ns, _, _) in services {
            s.apply(Update::Upsert(Object::Namespace(
                crate::testing::namespace(ns, true),
            )));
        }
        for (i, (ns, name, ports)) in services.iter().enumerate() {
            s.apply(Update::Upsert(Object::Service(service(
                ns,
                name,
                &format!("127.96.0.{}", i + 1),
                ports,
            ))));
        }
        s
    }

    /// The route's evaluation in `s`, and the index it was resolved against.
    fn eval(s: &Store, r: &HttpRoute) -> (RefIndex, RouteEval) {
        let mut s = s.clone();
        s.apply(Update::Upsert(Object::HTTPRoute(r.clone())));
        let index = RefIndex::of(&s);
        let e = evaluate(&s, &index).remove(0);
        (index, e)
    }

    /// `(type, status, reason)` of the conditions of the route's first parent.
    fn conds(s: &Store, r: &HttpRoute) -> Vec<(&'static str, bool, String, String)> {
        let (index, e) = eval(s, r);
        parent_conditions(&index, &e, &e.route.parents[0])
            .into_iter()
            .map(|c| (c.type_, c.status, c.reason, c.message))
            .collect()
    }

    #[test]
    fn a_grpcroute_on_the_same_service_port_takes_it_from_an_httproute() {
        let mut s = store(&[("shop", "web", &[80, 8080]), ("shop", "api", &[8080])]);
        let grpc: crate::gateway::GrpcRoute = serde_json::from_value(serde_json::json!({
            "apiVersion": "gateway.networking.k8s.io/v1",
            "kind": "GRPCRoute",
            "metadata": {"name": "rpc", "namespace": "shop"},
            "spec": {
                "parentRefs": [{"group": "", "kind": "Service", "name": "web", "port": 80}],
                "rules": [{"backendRefs": [{"name": "api", "port": 8080}]}]
            }
        }))
        .unwrap();
        s.apply(Update::Upsert(Object::GRPCRoute(grpc)));
        // The HTTPRoute names web port 80, as the GRPCRoute does.
        s.apply(Update::Upsert(Object::HTTPRoute(web_route("api"))));
        let index = RefIndex::of(&s);
        let t = translate_all(&s, &index);
        assert!(
            t.http.is_empty(),
            "ignored where the GRPCRoute is: {:?}",
            t.http
        );
        assert_eq!(t.grpc.len(), 1);
        let e = t
            .evals
            .iter()
            .find(|e| e.route.kind == "HTTPRoute")
            .unwrap();
        let accepted = &parent_conditions(&index, e, &e.route.parents[0])[0];
        assert_eq!(
            (accepted.status, accepted.reason.as_str()),
            (false, "Conflicted")
        );
        assert!(
            accepted
                .message
                .starts_with("GRPCRoute shop/rpc attaches to Service shop/web port 80"),
            "{accepted:?}"
        );
        // The GRPCRoute itself is accepted.
        let g = t
            .evals
            .iter()
            .find(|e| e.route.kind == "GRPCRoute")
            .unwrap();
        assert!(parent_conditions(&index, g, &g.route.parents[0])[0].status);
    }

    fn grpc_on_web_port_80() -> crate::gateway::GrpcRoute {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "gateway.networking.k8s.io/v1",
            "kind": "GRPCRoute",
            "metadata": {"name": "rpc", "namespace": "shop"},
            "spec": {
                "parentRefs": [{"group": "", "kind": "Service", "name": "web", "port": 80}],
                "rules": [{"backendRefs": [{"name": "api", "port": 8080}]}]
            }
        }))
        .unwrap()
    }

    /// An HTTPRoute on every port of a Service: a GRPCRoute on one of them
    /// takes that one only.
    #[test]
    fn a_grpcroute_on_one_port_leaves_an_every_port_httproute_the_others() {
        // A GRPCRoute on web port 80, an HTTPRoute on every port of web.
        let both = |web_ports: &[i32]| {
            let mut s = store(&[("shop", "web", web_ports), ("shop", "api", &[8080])]);
            s.apply(Update::Upsert(Object::GRPCRoute(grpc_on_web_port_80())));
            let mut every_port = web_route("api");
            let parent = serde_json::json!({"group": "", "kind": "Service", "name": "web"});
            every_port.spec.parent_refs = Some(vec![serde_json::from_value(parent).unwrap()]);
            s.apply(Update::Upsert(Object::HTTPRoute(every_port)));
            s
        };
        let s = both(&[80, 8080]);
        let index = RefIndex::of(&s);
        let t = translate_all(&s, &index);
        assert_eq!(t.http.len(), 1, "{:?}", t.http);
        let ports: Vec<Option<u16>> = t.http[0].parents.iter().map(|p| p.port).collect();
        assert_eq!(ports, [Some(8080)]);
        let e = t
            .evals
            .iter()
            .find(|e| e.route.kind == "HTTPRoute")
            .unwrap();
        assert!(parent_conditions(&index, e, &e.route.parents[0])[0].status);

        // A Service with that one port only: nothing is left to it.
        let s = both(&[80]);
        let index = RefIndex::of(&s);
        let t = translate_all(&s, &index);
        assert!(t.http.is_empty(), "{:?}", t.http);
        let e = t
            .evals
            .iter()
            .find(|e| e.route.kind == "HTTPRoute")
            .unwrap();
        let c = &parent_conditions(&index, e, &e.route.parents[0])[0];
        assert_eq!((c.status, c.reason.as_str()), (false, "Conflicted"));
    }

    /// A Service parent's sectionName is a port name (Gateway API).
    #[test]
    fn a_service_parent_section_name_picks_the_named_port() {
        let s = store(&[("shop", "web", &[80, 9090]), ("shop", "api", &[8080])]);
        let mut named = web_route("api");
        named.spec.parent_refs = Some(vec![
            serde_json::from_value(serde_json::json!(
                {"group": "", "kind": "Service", "name": "web", "sectionName": "p9090"}
            ))
            .unwrap(),
        ]);
        let index = RefIndex::of(&s);
        let mut s2 = s.clone();
        s2.apply(Update::Upsert(Object::HTTPRoute(named.clone())));
        let t = translate_all(&s2, &index);
        let ports: Vec<Option<u16>> = t.http[0].parents.iter().map(|p| p.port).collect();
        assert_eq!(ports, [Some(9090)], "the named port only");
        assert!(conds(&s2, &named)[0].1);

        named.spec.parent_refs = Some(vec![
            serde_json::from_value(serde_json::json!(
                {"group": "", "kind": "Service", "name": "web", "sectionName": "admin"}
            ))
            .unwrap(),
        ]);
        let mut s3 = s.clone();
        s3.apply(Update::Upsert(Object::HTTPRoute(named.clone())));
        assert!(translate_all(&s3, &index).http.is_empty());
        let c = &conds(&s3, &named)[0];
        assert_eq!((c.1, c.2.as_str()), (false, "NoMatchingParent"));
        assert!(c.3.contains("no port named \"admin\""), "{c:?}");
    }

    #[test]
    fn a_grpcroute_of_another_namespace_leaves_the_services_httproute_alone() {
        let mut s = store(&[("shop", "web", &[80, 8080]), ("shop", "api", &[8080])]);
        s.apply(Update::Upsert(Object::Namespace(namespace("evil", false))));
        // A consumer route of namespace evil on shop's Service, every port:
        // it is for evil's own clients only.
        let grpc: crate::gateway::GrpcRoute = serde_json::from_value(serde_json::json!({
            "apiVersion": "gateway.networking.k8s.io/v1",
            "kind": "GRPCRoute",
            "metadata": {"name": "rpc", "namespace": "evil"},
            "spec": {
                "parentRefs": [{"group": "", "kind": "Service", "namespace": "shop", "name": "web"}],
                "rules": [{"backendRefs": [{"name": "nothing", "port": 1}]}]
            }
        }))
        .unwrap();
        s.apply(Update::Upsert(Object::GRPCRoute(grpc)));
        s.apply(Update::Upsert(Object::HTTPRoute(web_route("api"))));
        let index = RefIndex::of(&s);
        let t = translate_all(&s, &index);
        assert_eq!(t.http.len(), 1, "shop's own route stays in force");
        let e = t
            .evals
            .iter()
            .find(|e| e.route.kind == "HTTPRoute")
            .unwrap();
        assert!(e.conflicted.is_empty(), "{:?}", e.conflicted);
        let accepted = &parent_conditions(&index, e, &e.route.parents[0])[0];
        assert!(accepted.status, "{accepted:?}");
    }

    #[test]
    fn accepted_and_resolved_when_parent_and_backends_exist() {
        let s = store(&[("shop", "web", &[80]), ("shop", "web-v2", &[8080])]);
        let (index, e) = eval(&s, &web_route("web-v2"));
        assert_eq!(
            e.route.service_parents().count(),
            1,
            "the Gateway parent is not ours"
        );
        let parents = route_status_parents(&index, &e).expect("no status yet: must write");
        assert_eq!(parents.len(), 1);
        let conds = &parents[0]["conditions"];
        assert_eq!(conds.as_array().unwrap().len(), 2);
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
        let (index, e) = eval(&s, &written);
        assert_eq!(route_status_parents(&index, &e), None);
    }

    #[test]
    fn a_missing_backend_is_backend_not_found_and_a_missing_parent_not_accepted() {
        let c = conds(&Store::new(), &web_route("nope"));
        assert_eq!((c[0].1, c[0].2.as_str()), (false, "NoMatchingParent"));
        assert_eq!((c[1].1, c[1].2.as_str()), (false, "BackendNotFound"));
        assert!(c[1].3.contains("shop/nope"), "{}", c[1].3);
        let c = conds(&store(&[("shop", "web", &[80])]), &web_route("nope"));
        assert!(c[0].1, "{c:?}");
    }

    #[test]
    fn ports_that_the_services_lack_do_not_resolve() {
        // The parent names port 80, the Service serves 8080 only.
        let s = store(&[("shop", "web", &[8080]), ("shop", "web-v2", &[9090])]);
        let c = conds(&s, &web_route("web-v2"));
        assert_eq!((c[0].1, c[0].2.as_str()), (false, "NoMatchingParent"));
        assert!(c[0].3.contains("has no port 80"), "{}", c[0].3);
        assert_eq!((c[1].1, c[1].2.as_str()), (false, "BackendNotFound"));
        assert!(
            c[1].3
                .contains("spec.rules[0].backendRefs[0]: Service shop/web-v2 has no port 8080"),
            "{}",
            c[1].3
        );
    }

    /// GEP-1294: a mesh route's backend may be in any namespace without a
    /// ReferenceGrant; only a missing Service there, or another kind, is
    /// refused.
    #[test]
    fn other_namespaces_resolve_without_a_grant_and_other_kinds_are_refused() {
        let s = store(&[("shop", "web", &[80]), ("other", "db", &[8080])]);
        let to = |name: &str| {
            route(serde_json::json!({
                "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
                "metadata": {"name": "web", "namespace": "shop"},
                "spec": {
                    "parentRefs": [{"kind": "Service", "name": "web", "port": 80}],
                    "rules": [{"backendRefs": [{"name": name, "namespace": "other", "port": 8080}]}]
                }
            }))
        };
        let c = conds(&s, &to("db"));
        assert_eq!(
            (c[0].1, c[1].1, c[1].2.as_str()),
            (true, true, "ResolvedRefs"),
            "{c:?}"
        );
        let c = conds(&s, &to("gone"));
        assert!(c[0].1, "still accepted: {c:?}");
        assert_eq!((c[1].1, c[1].2.as_str()), (false, "BackendNotFound"));
        assert!(
            c[1].3
                .contains("spec.rules[0].backendRefs[0]: Service other/gone does not exist"),
            "{}",
            c[1].3
        );
        let r = route(serde_json::json!({
            "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
            "metadata": {"name": "web", "namespace": "shop"},
            "spec": {
                "parentRefs": [{"kind": "Service", "name": "web", "port": 80}],
                "rules": [{"backendRefs": [{"group": "example.com", "kind": "Bucket", "name": "b"}]}]
            }
        }));
        let c = conds(&s, &r);
        assert_eq!((c[1].1, c[1].2.as_str()), (false, "InvalidKind"));
        assert!(
            c[1].3
                .ends_with("requests for these backends are answered with 500"),
            "{c:?}"
        );
        // A mirror that does not resolve is dropped: the message says so.
        let r = route(serde_json::json!({
            "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
            "metadata": {"name": "web", "namespace": "shop"},
            "spec": {
                "parentRefs": [{"kind": "Service", "name": "web", "port": 80}],
                "rules": [{
                    "filters": [{"type": "RequestMirror",
                                 "requestMirror": {"backendRef": {"name": "gone", "port": 80}}}],
                    "backendRefs": [{"name": "web", "port": 80}]
                }]
            }
        }));
        let c = conds(&s, &r);
        assert_eq!((c[1].1, c[1].2.as_str()), (false, "BackendNotFound"));
        assert!(
            c[1].3.ends_with("no copy is sent to these mirrors") && !c[1].3.contains("500"),
            "{c:?}"
        );
    }

    #[test]
    fn rules_the_proxy_cannot_take_make_the_route_partially_invalid_or_not_accepted() {
        let s = store(&[("shop", "web", &[80])]);
        let rules = |n: usize| {
            let mut rules = vec![serde_json::json!({"backendRefs": [{"name": "web", "port": 80}]})];
            rules.extend((0..n).map(|_| {
                serde_json::json!({"filters": [{"type": "CORS", "cors": {"allowOrigins": ["*"]}}]})
            }));
            rules
        };
        let r = route(serde_json::json!({
            "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
            "metadata": {"name": "web", "namespace": "shop"},
            "spec": {"parentRefs": [{"kind": "Service", "name": "web"}], "rules": rules(2)}
        }));
        let c = conds(&s, &r);
        assert_eq!(c.len(), 3, "{c:?}");
        assert_eq!((c[0].1, c[0].2.as_str()), (true, "Accepted"));
        assert_eq!(
            (c[2].0, c[2].1, c[2].2.as_str()),
            ("PartiallyInvalid", true, "UnsupportedValue")
        );
        assert!(
            c[2].3
                .starts_with("Dropped Rules 1, 2: spec.rules[1].filters[0].type"),
            "{}",
            c[2].3
        );
        // Only the unsupported filter's rule: in force, answering 500, so
        // accepted and partially invalid (as the proxy has it).
        let r = route(serde_json::json!({
            "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
            "metadata": {"name": "web", "namespace": "shop"},
            "spec": {"parentRefs": [{"kind": "Service", "name": "web"}],
                     "rules": [rules(1)[1].clone()]}
        }));
        let c = conds(&s, &r);
        assert_eq!((c[0].1, c[0].2.as_str()), (true, "Accepted"), "{c:?}");
        assert_eq!((c[2].0, c[2].1), ("PartiallyInvalid", true), "{c:?}");
        assert!(
            c[2].3.contains("CORS") && c[2].3.contains("500"),
            "{}",
            c[2].3
        );
        // Only a rule the proxy cannot compile: nothing is left to accept.
        let r = route(serde_json::json!({
            "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
            "metadata": {"name": "web", "namespace": "shop"},
            "spec": {"parentRefs": [{"kind": "Service", "name": "web"}],
                     "rules": [{"matches": [{"path": {"type": "RegularExpression", "value": "/(?=a)"}}],
                                "backendRefs": [{"name": "web", "port": 80}]}]}
        }));
        let c = conds(&s, &r);
        assert_eq!(
            c.len(),
            2,
            "no PartiallyInvalid on a route not accepted: {c:?}"
        );
        assert_eq!((c[0].1, c[0].2.as_str()), (false, "UnsupportedValue"));
        assert!(c[0].3.contains("spec.rules[0].matches"), "{}", c[0].3);
    }

    #[test]
    fn only_our_entries_are_computed_and_the_merge_keeps_every_other_controllers() {
        let other = serde_json::json!({
            "parentRef": {"name": "some-gateway"},
            "controllerName": "example.com/gateway",
            "conditions": [],
            "futureField": 1
        });
        let mut r = web_route("web");
        r.status = Some(serde_json::from_value(serde_json::json!({"parents": [other]})).unwrap());
        let (index, e) = eval(&Store::new(), &r);
        let ours = route_status_parents(&index, &e).unwrap();
        assert_eq!(ours.len(), 1);
        assert_eq!(ours[0]["controllerName"], config::CONTROLLER_NAME);
        // Merged into what the API server holds now, which has changed since
        // the watch delivered the route: both other entries stay, ours is
        // replaced, untouched fields survive.
        let stale_ours = serde_json::json!({
            "parentRef": {"group": "", "kind": "Service", "name": "web", "port": 80},
            "controllerName": config::CONTROLLER_NAME,
            "conditions": [{"type": "Accepted", "status": "True"}]
        });
        let newer = serde_json::json!({
            "parentRef": {"name": "mesh-b"},
            "controllerName": "example.com/mesh",
            "conditions": []
        });
        let current = vec![other.clone(), stale_ours, newer.clone()];
        let merged = merge_parents(&current, &ours);
        assert_eq!(merged, vec![other, newer, ours[0].clone()]);
        assert!(parents_hold(&merged, &ours));
        assert!(!parents_hold(&current, &ours));
        // Times aside, an entry another agent wrote counts as written.
        let mut later = ours.clone();
        later[0]["conditions"][0]["lastTransitionTime"] = "2030-01-01T00:00:00Z".into();
        assert!(parents_hold(&merge_parents(&current, &later), &ours));
    }
}
