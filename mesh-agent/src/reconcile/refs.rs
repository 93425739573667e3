//! Whether a route's references resolve: its Service parents (and their
//! ports), and its backends and mirror targets, in its own namespace or any
//! other. One index of the model answers both the route status
//! (`ResolvedRefs`, `Accepted`) and the translation for the proxy, so what the
//! status says and what the proxy does cannot differ.
//!
//! A backend in another namespace needs no ReferenceGrant: GEP-1294 lets
//! mesh routes refer to any namespace, and a route exposes nothing its
//! callers could not reach anyway, since their requests keep the caller's
//! own identity and the backend's AccessPolicy is checked against it.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use crate::state::{Key, Store};

/// Why a backend reference does not resolve: the `ResolvedRefs` reasons of
/// the Gateway API.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum RefReason {
    /// Not a core Service.
    InvalidKind,
    /// In another namespace that is not in the mesh: the proxy would reach
    /// it from the node in plaintext, past its NetworkPolicies.
    RefNotPermitted,
    /// The Service, or the port on it, does not exist (or no port is given).
    BackendNotFound,
}

impl RefReason {
    pub fn as_str(self) -> &'static str {
        match self {
            RefReason::InvalidKind => "InvalidKind",
            RefReason::RefNotPermitted => "RefNotPermitted",
            RefReason::BackendNotFound => "BackendNotFound",
        }
    }
}

/// A backend reference that does not resolve, and why.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct RefProblem {
    pub reason: RefReason,
    /// Names the field and the reference.
    pub message: String,
}

/// A backend reference as a route spells it (`backendRefs[]` or a mirror's
/// `backendRef`).
#[derive(Clone, Copy, Debug, Default)]
pub struct BackendTarget<'a> {
    pub group: Option<&'a str>,
    pub kind: Option<&'a str>,
    pub name: &'a str,
    pub namespace: Option<&'a str>,
    pub port: Option<i64>,
}

impl<'a> BackendTarget<'a> {
    /// From a reference in its JSON form.
    pub fn of_json(v: &'a serde_json::Value) -> Self {
        Self {
            group: v["group"].as_str(),
            kind: v["kind"].as_str(),
            name: v["name"].as_str().unwrap_or(""),
            namespace: v["namespace"].as_str(),
            port: v["port"].as_i64(),
        }
    }
}

/// The Services of the model and their ports: what route references may
/// point at.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct RefIndex {
    /// Every Service, and the port numbers it serves.
    pub services: BTreeMap<Key, BTreeSet<u16>>,
    /// The names of Services' ports (a Service parent's `sectionName`).
    pub port_names: BTreeMap<Key, BTreeMap<String, u16>>,
    /// Services a route cannot attach to, and why: it binds to a Service's
    /// ClusterIP, which headless and ExternalName Services lack (their
    /// callers reach the pods, or the external name, directly).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub no_cluster_ip: BTreeMap<Key, String>,
    /// Namespaces of Services that are not in the mesh: the kernel balances
    /// connections to their Services itself, and no route applies to them.
    #[serde(skip_serializing_if = "BTreeSet::is_empty")]
    pub outside_mesh: BTreeSet<String>,
}

/// Whether an API group names the core group (Services), as references
/// spell it: absent, empty or `core`.
pub(crate) fn is_core(group: Option<&str>) -> bool {
    matches!(group, None | Some("") | Some("core"))
}

impl RefIndex {
    pub fn of(store: &Store) -> Self {
        let services = store
            .services
            .iter()
            .map(|(key, svc)| {
                let ports = svc
                    .spec
                    .iter()
                    .flat_map(|s| s.ports.iter().flatten())
                    .filter_map(|p| u16::try_from(p.port).ok())
                    .collect();
                (key.clone(), ports)
            })
            .collect();
        let port_names = store
            .services
            .iter()
            .map(|(key, svc)| {
                let names = svc
                    .spec
                    .iter()
                    .flat_map(|s| s.ports.iter().flatten())
                    .filter_map(|p| Some((p.name.clone()?, u16::try_from(p.port).ok()?)))
                    .collect();
                (key.clone(), names)
            })
            .collect();
        let no_cluster_ip = store
            .services
            .iter()
            .filter_map(|(key, svc)| {
                let spec = svc.spec.as_ref()?;
                let why = if spec.type_.as_deref() == Some("ExternalName") {
                    "is of type ExternalName"
                } else if spec.cluster_ip.as_deref() == Some("None") {
                    "is headless (clusterIP: None)"
                } else {
                    return None;
                };
                Some((key.clone(), why.to_string()))
            })
            .collect();
        let outside_mesh = store
            .services
            .keys()
            .map(|k| k.namespace.as_str())
            .filter(|ns| !store.namespace_enrolled(ns))
            .map(str::to_owned)
            .collect();
        Self {
            services,
            port_names,
            no_cluster_ip,
            outside_mesh,
        }
    }

    /// Whether a backend reference of a route in `route_ns` resolves: to an
    /// existing Service and port, in that namespace or another (no
    /// ReferenceGrant is needed, see the module doc). `field` names it in
    /// the message.
    pub fn check_backend(
        &self,
        route_ns: &str,
        b: &BackendTarget<'_>,
        field: &str,
    ) -> Result<(), RefProblem> {
        let problem = |reason, message: String| {
            Err(RefProblem {
                reason,
                message: format!("{field}: {message}"),
            })
        };
        if !is_core(b.group) || !matches!(b.kind, None | Some("Service")) {
            return problem(
                RefReason::InvalidKind,
                format!(
                    "{} has group {:?} and kind {:?}; only Services are supported",
                    b.name,
                    b.group.unwrap_or(""),
                    b.kind.unwrap_or("Service")
                ),
            );
        }
        let key = Key::new(b.namespace.unwrap_or(route_ns), b.name);
        let Some(ports) = self.services.get(&key) else {
            return problem(
                RefReason::BackendNotFound,
                format!("Service {key} does not exist"),
            );
        };
        // Within the mesh the request keeps its caller's identity, and the
        // target's AccessPolicy decides; a namespace outside it is reached
        // from the node, in plaintext, where its NetworkPolicies would stop
        // the caller's pod: a broader reach than the caller has, which the
        // route of another namespace may not give (GEP-1294).
        if key.namespace != route_ns && self.outside_mesh.contains(&key.namespace) {
            return problem(
                RefReason::RefNotPermitted,
                format!(
                    "Service {key} is in namespace {}, which is not in the mesh: the node proxy \
                     would reach it in plaintext from the node, past its NetworkPolicies; a \
                     route sends to another namespace's Services only within the mesh \
                     (annotate {} {}: {})",
                    key.namespace,
                    key.namespace,
                    crate::config::MESH_ANNOTATION,
                    crate::config::MESH_ENABLED
                ),
            );
        }
        match b.port {
            None => problem(
                RefReason::BackendNotFound,
                format!("Service {key}: port is required"),
            ),
            Some(p) if !u16::try_from(p).is_ok_and(|p| ports.contains(&p)) => problem(
                RefReason::BackendNotFound,
                format!("Service {key} has no port {p}"),
            ),
            Some(_) => Ok(()),
        }
    }

    /// Whether a Service parent exists (with the port, when one is given by
    /// number or by name, its `sectionName`: both must then name the same
    /// port): `Ok` is the port it attaches to (`None`: every port), `Err`
    /// the `NoMatchingParent` message.
    pub fn check_parent(
        &self,
        service: &Key,
        port: Option<i32>,
        section: Option<&str>,
    ) -> Result<Option<u16>, String> {
        let Some(ports) = self.services.get(service) else {
            return Err(format!("parent Service {service} does not exist"));
        };
        if let Some(why) = self.no_cluster_ip.get(service) {
            return Err(format!(
                "parent Service {service} {why}: a route applies to the connections made to a \
                 Service's ClusterIP, and its callers reach its pods (or the external name) \
                 directly; attach the route to a Service with a ClusterIP"
            ));
        }
        let numbered = match port {
            None => None,
            Some(p) => match u16::try_from(p).ok().filter(|p| ports.contains(p)) {
                Some(p) => Some(p),
                None => return Err(format!("parent Service {service} has no port {p}")),
            },
        };
        let Some(name) = section else {
            return Ok(numbered);
        };
        let named = self
            .port_names
            .get(service)
            .and_then(|n| n.get(name))
            .copied();
        match (named, numbered) {
            (None, _) => Err(format!(
                "parent Service {service} has no port named {name:?} (sectionName)"
            )),
            (Some(n), Some(p)) if n != p => Err(format!(
                "parent Service {service}: sectionName {name:?} is port {n}, not the port {p} \
                 the reference names too"
            )),
            (Some(n), _) => Ok(Some(n)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        state::{Object, Update},
        testing::service,
    };

    fn index() -> RefIndex {
        let mut s = Store::new();
        for (ns, meshed) in [("shop", true), ("other", true), ("legacy", false)] {
            s.apply(Update::Upsert(Object::Namespace(
                crate::testing::namespace(ns, meshed),
            )));
        }
        s.apply(Update::Upsert(Object::Service(service(
            "legacy",
            "old",
            "127.96.0.3",
            &[80],
        ))));
        s.apply(Update::Upsert(Object::Service(service(
            "shop",
            "web",
            "127.96.0.1",
            &[80, 8080],
        ))));
        s.apply(Update::Upsert(Object::Service(service(
            "other",
            "db",
            "127.96.0.2",
            &[5432],
        ))));
        RefIndex::of(&s)
    }

    fn target<'a>(ns: Option<&'a str>, name: &'a str, port: Option<i64>) -> BackendTarget<'a> {
        BackendTarget {
            name,
            namespace: ns,
            port,
            ..Default::default()
        }
    }

    #[test]
    fn backends_resolve_only_to_existing_services_and_ports() {
        let i = index();
        let check = |b: BackendTarget<'_>| i.check_backend("shop", &b, "f").map_err(|p| p.reason);
        assert_eq!(check(target(None, "web", Some(8080))), Ok(()));
        assert_eq!(
            check(target(None, "web", Some(81))),
            Err(RefReason::BackendNotFound)
        );
        assert_eq!(
            check(target(None, "web", None)),
            Err(RefReason::BackendNotFound)
        );
        assert_eq!(
            check(target(None, "nope", Some(80))),
            Err(RefReason::BackendNotFound)
        );
        let mut b = target(None, "web", Some(80));
        b.group = Some("example.com");
        b.kind = Some("Bucket");
        assert_eq!(check(b), Err(RefReason::InvalidKind));
        let e = i
            .check_backend(
                "shop",
                &target(None, "web", Some(81)),
                "spec.rules[0].backendRefs[1]",
            )
            .unwrap_err();
        assert_eq!(
            e.message,
            "spec.rules[0].backendRefs[1]: Service shop/web has no port 81"
        );
    }

    /// GEP-1294: a mesh route may send to a Service in any namespace, with
    /// no ReferenceGrant; the Service and its port must still exist there.
    #[test]
    fn a_backend_in_another_namespace_resolves_without_a_grant() {
        let i = index();
        let check = |route_ns: &str, b: BackendTarget<'_>| {
            i.check_backend(route_ns, &b, "f").map_err(|p| p.reason)
        };
        assert_eq!(
            check("shop", target(Some("other"), "db", Some(5432))),
            Ok(())
        );
        // Whichever namespace the route is in, an explicit namespace wins.
        assert_eq!(
            check("other", target(Some("shop"), "web", Some(80))),
            Ok(())
        );
        assert_eq!(
            check("other", target(None, "web", Some(80))),
            Err(RefReason::BackendNotFound),
            "no namespace: the route's own"
        );
        let e = i
            .check_backend("shop", &target(Some("other"), "cache", Some(6379)), "f")
            .unwrap_err();
        assert_eq!(
            (e.reason, e.message.as_str()),
            (
                RefReason::BackendNotFound,
                "f: Service other/cache does not exist"
            )
        );
        assert_eq!(
            check("shop", target(Some("other"), "db", Some(5433))),
            Err(RefReason::BackendNotFound)
        );
        // Another namespace outside the mesh would be reached from the
        // node in plaintext, past its NetworkPolicies: refused.
        let e = i
            .check_backend("shop", &target(Some("legacy"), "old", Some(80)), "f")
            .unwrap_err();
        assert_eq!(e.reason, RefReason::RefNotPermitted, "{e:?}");
        assert!(e.message.contains("not in the mesh"), "{e:?}");
        assert_eq!(
            check("legacy", target(None, "old", Some(80))),
            Ok(()),
            "its own namespace's"
        );
    }

    #[test]
    fn parents_need_the_service_and_the_named_port() {
        let i = index();
        let web = Key::new("shop", "web");
        // Headless and ExternalName Services have no ClusterIP to attach to.
        let mut s = Store::new();
        let mut headless = service("shop", "db", "None", &[5432]);
        headless.spec.as_mut().unwrap().cluster_ip = Some("None".into());
        let mut external = service("shop", "ext", "127.96.0.9", &[443]);
        external.spec.as_mut().unwrap().type_ = Some("ExternalName".into());
        s.apply(Update::Upsert(Object::Service(headless)));
        s.apply(Update::Upsert(Object::Service(external)));
        let j = RefIndex::of(&s);
        for (name, why) in [("db", "headless"), ("ext", "ExternalName")] {
            let e = j
                .check_parent(&Key::new("shop", name), None, None)
                .unwrap_err();
            assert!(e.contains(why) && e.contains("ClusterIP"), "{e}");
        }
        assert_eq!(i.check_parent(&web, None, None), Ok(None));
        assert_eq!(i.check_parent(&web, Some(80), None), Ok(Some(80)));
        assert!(
            i.check_parent(&web, Some(81), None)
                .unwrap_err()
                .contains("no port 81")
        );
        assert!(
            i.check_parent(&Key::new("shop", "x"), None, None)
                .unwrap_err()
                .contains("does not exist")
        );
        // sectionName names a port (the test Services name theirs p<number>).
        assert_eq!(i.check_parent(&web, None, Some("p8080")), Ok(Some(8080)));
        assert_eq!(
            i.check_parent(&web, Some(8080), Some("p8080")),
            Ok(Some(8080))
        );
        let e = i.check_parent(&web, Some(80), Some("p8080")).unwrap_err();
        assert!(e.contains("is port 8080, not the port 80"), "{e}");
        let e = i.check_parent(&web, None, Some("admin")).unwrap_err();
        assert!(e.contains("no port named \"admin\""), "{e}");
    }
}
