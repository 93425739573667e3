//! The store: every object by kind and key, plus the objects refused by
//! validation (whose last good version stays in force).

use std::collections::{BTreeMap, BTreeSet};

use crate::gateway::{GrpcRoute, HttpRoute};
use k8s_openapi::api::{
    core::v1::{Namespace, Service},
    discovery::v1::EndpointSlice,
};
use kube::ResourceExt as _;

use super::{Key, Kind, NodeInfo, Object, Workload};
use crate::{
    config,
    crds::{AccessPolicy, FieldError, MeshPolicy},
};

/// A change from a source.
#[allow(clippy::large_enum_variant)] // see `Object`
#[derive(Clone, Debug)]
pub enum Update {
    /// An object was created or changed.
    Upsert(Object),
    /// An object went away.
    Delete(Kind, Key),
    /// The complete current set of objects of one kind (a re-list, or a
    /// reloaded directory): objects of that kind not in it are deleted.
    Replace(Kind, Vec<Object>),
    /// The source has delivered its complete initial state: until then the
    /// reconciler leaves the kernel's pinned state alone.
    Synced,
}

/// What an update touched, i.e. what must be derived again.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Dirty {
    /// Services whose load-balancer entries may have changed.
    pub services: BTreeSet<Key>,
    /// Local workloads (enrolment, identities, mTLS modes) may have changed.
    pub workloads: bool,
    /// The proxy's view (routes, policies, endpoints, nodes) and object
    /// status may have changed.
    pub mesh: bool,
    /// The source finished its initial sync.
    pub synced: bool,
}

impl Dirty {
    pub fn merge(&mut self, other: Dirty) {
        self.services.extend(other.services);
        self.workloads |= other.workloads;
        self.mesh |= other.mesh;
        self.synced |= other.synced;
    }

    pub fn is_empty(&self) -> bool {
        *self == Dirty::default()
    }
}

/// An object that failed validation; the store keeps its last good version.
#[derive(Clone, Debug, PartialEq)]
pub struct Rejected {
    pub kind: Kind,
    pub key: Key,
    /// `metadata.generation` of the refused version, for status.
    pub generation: Option<i64>,
    pub errors: Vec<FieldError>,
    /// The refused version's `status.conditions`, to know whether they must
    /// be written.
    pub conditions: Vec<k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition>,
}

/// Every object the agent knows, by kind.
#[derive(Clone, Debug, Default)]
pub struct Store {
    pub namespaces: BTreeMap<String, Namespace>,
    pub nodes: BTreeMap<String, NodeInfo>,
    pub pods: BTreeMap<Key, Workload>,
    pub services: BTreeMap<Key, Service>,
    pub slices: BTreeMap<Key, EndpointSlice>,
    /// Service -> its EndpointSlices.
    slices_of: BTreeMap<Key, BTreeSet<Key>>,
    pub http_routes: BTreeMap<Key, HttpRoute>,
    pub grpc_routes: BTreeMap<Key, GrpcRoute>,
    pub mesh_policies: BTreeMap<Key, MeshPolicy>,
    pub access_policies: BTreeMap<Key, AccessPolicy>,
    /// Objects refused by validation.
    pub rejected: BTreeMap<(Kind, Key), Rejected>,
}

/// The Service an EndpointSlice belongs to.
pub(crate) fn slice_service(slice: &EndpointSlice) -> Option<Key> {
    let name = slice.labels().get(config::SERVICE_NAME_LABEL)?;
    Some(Key::new(slice.namespace().unwrap_or_default(), name))
}

fn is_enrolled(ns: Option<&Namespace>) -> bool {
    ns.is_some_and(|ns| {
        ns.annotations()
            .get(config::MESH_ANNOTATION)
            .map(String::as_str)
            == Some(config::MESH_ENABLED)
    })
}

impl Store {
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether the namespace carries `sluice.dev/mesh: enabled`.
    pub fn namespace_enrolled(&self, ns: &str) -> bool {
        is_enrolled(self.namespaces.get(ns))
    }

    /// The EndpointSlices of a Service.
    pub fn slices_of<'a>(&'a self, service: &Key) -> impl Iterator<Item = &'a EndpointSlice> + 'a {
        self.slices_of
            .get(service)
            .into_iter()
            .flatten()
            .filter_map(|k| self.slices.get(k))
    }

    /// Folds one update in and says what it touched.
    pub fn apply(&mut self, update: Update) -> Dirty {
        let mut dirty = Dirty::default();
        match update {
            Update::Upsert(obj) => self.upsert(obj, &mut dirty),
            Update::Delete(kind, key) => self.delete(kind, &key, &mut dirty),
            Update::Replace(kind, objs) => {
                let keep: BTreeSet<Key> = objs.iter().map(Object::key).collect();
                for key in self.keys(kind) {
                    if !keep.contains(&key) {
                        self.delete(kind, &key, &mut dirty);
                    }
                }
                // Rejections of objects that are gone are gone too.
                self.rejected
                    .retain(|(k, key), _| *k != kind || keep.contains(key));
                for obj in objs {
                    if obj.kind() == kind {
                        self.upsert(obj, &mut dirty);
                    }
                }
            }
            Update::Synced => dirty.synced = true,
        }
        dirty
    }

    fn keys(&self, kind: Kind) -> Vec<Key> {
        match kind {
            Kind::Namespace => self.namespaces.keys().map(Key::cluster).collect(),
            Kind::Node => self.nodes.keys().map(Key::cluster).collect(),
            Kind::Pod => self.pods.keys().cloned().collect(),
            Kind::Service => self.services.keys().cloned().collect(),
            Kind::EndpointSlice => self.slices.keys().cloned().collect(),
            Kind::HTTPRoute => self.http_routes.keys().cloned().collect(),
            Kind::GRPCRoute => self.grpc_routes.keys().cloned().collect(),
            Kind::MeshPolicy => self.mesh_policies.keys().cloned().collect(),
            Kind::AccessPolicy => self.access_policies.keys().cloned().collect(),
        }
    }

    fn services_in<'a>(&'a self, ns: &'a str) -> impl Iterator<Item = Key> + 'a {
        self.services
            .keys()
            .filter(move |k| k.namespace == ns)
            .cloned()
    }

    fn upsert(&mut self, obj: Object, dirty: &mut Dirty) {
        let kind = obj.kind();
        let key = obj.key();
        let conditions = |s: Option<&crate::crds::PolicyStatus>| {
            s.map(|s| s.conditions.clone()).unwrap_or_default()
        };
        let (errors, generation, conditions) = match &obj {
            Object::MeshPolicy(p) => (
                p.spec.validate(),
                p.metadata.generation,
                conditions(p.status.as_ref()),
            ),
            Object::AccessPolicy(p) => (
                p.spec.validate(),
                p.metadata.generation,
                conditions(p.status.as_ref()),
            ),
            _ => (Vec::new(), None, Vec::new()),
        };
        if !errors.is_empty() {
            let rejected = Rejected {
                kind,
                key: key.clone(),
                generation,
                errors,
                conditions,
            };
            if self.rejected.get(&(kind, key.clone())) != Some(&rejected) {
                self.rejected.insert((kind, key), rejected);
                dirty.mesh = true;
            }
            return;
        }
        if self.rejected.remove(&(kind, key.clone())).is_some() {
            dirty.mesh = true;
        }
        match obj {
            Object::Namespace(ns) => {
                let name = key.name;
                let old = self.namespaces.get(&name);
                if old == Some(&ns) {
                    return;
                }
                if is_enrolled(old) != is_enrolled(Some(&ns)) {
                    dirty.services.extend(self.services_in(&name));
                }
                dirty.workloads = true;
                dirty.mesh = true;
                self.namespaces.insert(name, ns);
            }
            Object::Node(n) => {
                if self.nodes.get(&n.name) != Some(&n) {
                    self.nodes.insert(n.name.clone(), n);
                    dirty.mesh = true;
                }
            }
            Object::Pod(w) => {
                if self.pods.get(&key) != Some(&w) {
                    self.pods.insert(key, w);
                    dirty.workloads = true;
                    dirty.mesh = true;
                }
            }
            Object::Service(s) => {
                if self.services.get(&key) != Some(&s) {
                    self.services.insert(key.clone(), s);
                    dirty.services.insert(key);
                    dirty.mesh = true;
                }
            }
            Object::EndpointSlice(s) => {
                if self.slices.get(&key) == Some(&s) {
                    return;
                }
                let new_svc = slice_service(&s);
                if let Some(old) = self.slices.insert(key.clone(), s) {
                    self.unindex_slice(&old, &key, dirty);
                }
                if let Some(svc) = new_svc {
                    self.slices_of.entry(svc.clone()).or_default().insert(key);
                    dirty.services.insert(svc);
                }
                dirty.mesh = true;
            }
            Object::HTTPRoute(r) => {
                if self.http_routes.get(&key) != Some(&r) {
                    self.http_routes.insert(key, r);
                    dirty.mesh = true;
                }
            }
            Object::GRPCRoute(r) => {
                if self.grpc_routes.get(&key) != Some(&r) {
                    self.grpc_routes.insert(key, r);
                    dirty.mesh = true;
                }
            }
            Object::MeshPolicy(p) => {
                if self.mesh_policies.get(&key) != Some(&p) {
                    self.mesh_policies.insert(key, p);
                    dirty.workloads = true;
                    dirty.mesh = true;
                }
            }
            Object::AccessPolicy(p) => {
                if self.access_policies.get(&key) != Some(&p) {
                    self.access_policies.insert(key, p);
                    dirty.mesh = true;
                }
            }
        }
    }

    fn unindex_slice(&mut self, old: &EndpointSlice, key: &Key, dirty: &mut Dirty) {
        if let Some(svc) = slice_service(old) {
            if let Some(set) = self.slices_of.get_mut(&svc) {
                set.remove(key);
                if set.is_empty() {
                    self.slices_of.remove(&svc);
                }
            }
            dirty.services.insert(svc);
        }
    }

    fn delete(&mut self, kind: Kind, key: &Key, dirty: &mut Dirty) {
        if self.rejected.remove(&(kind, key.clone())).is_some() {
            dirty.mesh = true;
        }
        let removed = match kind {
            Kind::Namespace => {
                let old = self.namespaces.remove(&key.name);
                if is_enrolled(old.as_ref()) {
                    dirty.services.extend(self.services_in(&key.name));
                }
                if old.is_some() {
                    dirty.workloads = true;
                }
                old.is_some()
            }
            Kind::Node => self.nodes.remove(&key.name).is_some(),
            Kind::Pod => {
                let gone = self.pods.remove(key).is_some();
                dirty.workloads |= gone;
                gone
            }
            Kind::Service => {
                let gone = self.services.remove(key).is_some();
                if gone {
                    dirty.services.insert(key.clone());
                }
                gone
            }
            Kind::EndpointSlice => match self.slices.remove(key) {
                Some(old) => {
                    self.unindex_slice(&old, key, dirty);
                    true
                }
                None => false,
            },
            Kind::HTTPRoute => self.http_routes.remove(key).is_some(),
            Kind::GRPCRoute => self.grpc_routes.remove(key).is_some(),
            Kind::MeshPolicy => {
                let gone = self.mesh_policies.remove(key).is_some();
                dirty.workloads |= gone;
                gone
            }
            Kind::AccessPolicy => self.access_policies.remove(key).is_some(),
        };
        dirty.mesh |= removed;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{ep_ready, namespace, service, slice};

    #[test]
    fn a_slice_change_dirties_only_its_service() {
        let mut s = Store::new();
        s.apply(Update::Upsert(Object::Service(service(
            "shop",
            "a",
            "127.96.1.1",
            &[80],
        ))));
        s.apply(Update::Upsert(Object::Service(service(
            "shop",
            "b",
            "127.96.1.2",
            &[80],
        ))));
        let d = s.apply(Update::Upsert(Object::EndpointSlice(slice(
            "shop",
            "a-1",
            "a",
            &[8080],
            &[ep_ready("10.0.0.1")],
        ))));
        assert_eq!(d.services, BTreeSet::from([Key::new("shop", "a")]));
        // The same object again touches nothing.
        let d = s.apply(Update::Upsert(Object::EndpointSlice(slice(
            "shop",
            "a-1",
            "a",
            &[8080],
            &[ep_ready("10.0.0.1")],
        ))));
        assert!(d.is_empty(), "{d:?}");
        // Moving a slice to another service dirties both.
        let d = s.apply(Update::Upsert(Object::EndpointSlice(slice(
            "shop",
            "a-1",
            "b",
            &[8080],
            &[ep_ready("10.0.0.1")],
        ))));
        assert_eq!(
            d.services,
            BTreeSet::from([Key::new("shop", "a"), Key::new("shop", "b")])
        );
        assert_eq!(s.slices_of(&Key::new("shop", "a")).count(), 0);
        assert_eq!(s.slices_of(&Key::new("shop", "b")).count(), 1);
    }

    #[test]
    fn enrolling_a_namespace_dirties_its_services_only() {
        let mut s = Store::new();
        s.apply(Update::Upsert(Object::Namespace(namespace("shop", false))));
        s.apply(Update::Upsert(Object::Service(service(
            "shop",
            "a",
            "127.96.1.1",
            &[80],
        ))));
        s.apply(Update::Upsert(Object::Service(service(
            "other",
            "b",
            "127.96.1.2",
            &[80],
        ))));
        let d = s.apply(Update::Upsert(Object::Namespace(namespace("shop", true))));
        assert_eq!(d.services, BTreeSet::from([Key::new("shop", "a")]));
        assert!(d.workloads);
        assert!(s.namespace_enrolled("shop"));
        assert!(!s.namespace_enrolled("other"));
    }

    #[test]
    fn replace_deletes_what_is_missing() {
        let mut s = Store::new();
        s.apply(Update::Upsert(Object::Service(service(
            "shop",
            "a",
            "127.96.1.1",
            &[80],
        ))));
        s.apply(Update::Upsert(Object::Service(service(
            "shop",
            "b",
            "127.96.1.2",
            &[80],
        ))));
        let d = s.apply(Update::Replace(
            Kind::Service,
            vec![Object::Service(service("shop", "b", "127.96.1.2", &[80]))],
        ));
        assert_eq!(d.services, BTreeSet::from([Key::new("shop", "a")]));
        assert_eq!(
            s.services.keys().collect::<Vec<_>>(),
            [&Key::new("shop", "b")]
        );
    }

    #[test]
    fn an_invalid_policy_keeps_the_last_good_version() {
        use crate::crds::{AccessPolicy, AccessPolicySpec};
        let good: AccessPolicySpec =
            serde_json::from_value(serde_json::json!({"targetRefs": [{"name": "a"}]})).unwrap();
        let bad: AccessPolicySpec =
            serde_json::from_value(serde_json::json!({"targetRefs": [{"name": "A!"}]})).unwrap();
        let mut p = AccessPolicy::new("p", good.clone());
        p.metadata.namespace = Some("shop".into());
        let mut s = Store::new();
        s.apply(Update::Upsert(Object::AccessPolicy(p.clone())));
        let mut q = p.clone();
        q.spec = bad;
        let d = s.apply(Update::Upsert(Object::AccessPolicy(q)));
        assert!(d.mesh);
        let key = Key::new("shop", "p");
        assert_eq!(s.access_policies[&key].spec, good);
        let r = &s.rejected[&(Kind::AccessPolicy, key.clone())];
        assert_eq!(r.errors[0].field, "spec.targetRefs[0].name");
        // Fixing it clears the rejection.
        s.apply(Update::Upsert(Object::AccessPolicy(p)));
        assert!(s.rejected.is_empty());
    }
}
