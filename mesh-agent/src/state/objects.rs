//! The object kinds the model holds, and their keys.

use std::{collections::BTreeMap, fmt, net::IpAddr, path::PathBuf};

use crate::gateway::{GrpcRoute, HttpRoute};
use k8s_openapi::api::{
    core::v1::{Namespace, Service},
    discovery::v1::EndpointSlice,
};
use kube::ResourceExt as _;
use serde::{Deserialize, Serialize};

use crate::crds::{AccessPolicy, MeshPolicy};

/// `namespace/name`; cluster-scoped objects have an empty namespace.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Key {
    pub namespace: String,
    pub name: String,
}

impl Key {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }

    pub fn cluster(name: impl Into<String>) -> Self {
        Self::new("", name)
    }

    /// The key of any Kubernetes object.
    pub fn of<K: kube::Resource>(obj: &K) -> Self {
        Self::new(obj.namespace().unwrap_or_default(), obj.name_any())
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.namespace.is_empty() {
            f.write_str(&self.name)
        } else {
            write!(f, "{}/{}", self.namespace, self.name)
        }
    }
}

/// The kinds of object the model holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Kind {
    Namespace,
    Node,
    Pod,
    Service,
    EndpointSlice,
    HTTPRoute,
    GRPCRoute,
    MeshPolicy,
    AccessPolicy,
}

impl Kind {
    pub const ALL: [Kind; 9] = [
        Kind::Namespace,
        Kind::Node,
        Kind::Pod,
        Kind::Service,
        Kind::EndpointSlice,
        Kind::HTTPRoute,
        Kind::GRPCRoute,
        Kind::MeshPolicy,
        Kind::AccessPolicy,
    ];

    /// Kinds served by CRDs a cluster may not have installed (Gateway API,
    /// Sluice's own): their absence means "none", not an outage.
    pub fn is_optional(self) -> bool {
        matches!(
            self,
            Kind::HTTPRoute | Kind::GRPCRoute | Kind::MeshPolicy | Kind::AccessPolicy
        )
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// A node: its name and addresses (the node proxy listens there).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    pub name: String,
    pub addresses: Vec<IpAddr>,
}

/// A pod, as much of it as the agent needs (what a kubelet reports, or an
/// entry of the workloads file).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Workload {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub service_account: String,
    pub ips: Vec<IpAddr>,
    /// The node it is scheduled on.
    pub node: String,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    /// Named TCP container ports, for Services' named target ports.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub ports: BTreeMap<String, u16>,
    /// Its cgroup directory when a source knows it (the files source);
    /// otherwise found from `uid` under the kubepods tree.
    pub cgroup: Option<PathBuf>,
    /// Ready to serve (for endpoints the files source derives; always true
    /// from a cluster, where EndpointSlices say it).
    pub ready: bool,
    /// Deletion requested: it may still serve (and call out) for its grace
    /// period, so it stays enrolled with its identity until it is gone.
    pub terminating: bool,
    /// Finished (phase Succeeded or Failed): it runs nothing any more, and
    /// the network may give its IP, which it keeps, to another pod.
    pub finished: bool,
    /// The host side of its veth, when a source knows it (the files source);
    /// otherwise found from the routes to its IP.
    pub interface: Option<String>,
    /// Uses the node's network namespace: never enrolled (its address is the
    /// node's, so it cannot be told apart by IP).
    pub host_network: bool,
}

/// The annotation the kubelet puts on the API server's mirror of a static
/// pod (a pod from a manifest file on the node).
pub const MIRROR_ANNOTATION: &str = "kubernetes.io/config.mirror";

impl Workload {
    pub fn key(&self) -> Key {
        Key::new(&self.namespace, &self.name)
    }

    /// A static pod: whoever writes the node's manifest directory creates
    /// it, in any namespace, and it cannot name a service account. It gets
    /// no mesh identity (else a node could claim any namespace's `default`
    /// one).
    pub fn is_static(&self) -> bool {
        self.annotations.contains_key(MIRROR_ANNOTATION)
    }

    /// The pod opted out of the mesh (`sluice.dev/mesh: disabled`).
    pub fn opted_out(&self) -> bool {
        self.annotations
            .get(crate::config::MESH_ANNOTATION)
            .map(String::as_str)
            == Some(crate::config::MESH_DISABLED)
    }
}

/// One object of any kind the model holds.
// Objects are moved once per update into the store; boxing them would only
// add an allocation.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug)]
pub enum Object {
    Namespace(Namespace),
    Node(NodeInfo),
    Pod(Workload),
    Service(Service),
    EndpointSlice(EndpointSlice),
    HTTPRoute(HttpRoute),
    GRPCRoute(GrpcRoute),
    MeshPolicy(MeshPolicy),
    AccessPolicy(AccessPolicy),
}

impl Object {
    pub fn kind(&self) -> Kind {
        match self {
            Object::Namespace(_) => Kind::Namespace,
            Object::Node(_) => Kind::Node,
            Object::Pod(_) => Kind::Pod,
            Object::Service(_) => Kind::Service,
            Object::EndpointSlice(_) => Kind::EndpointSlice,
            Object::HTTPRoute(_) => Kind::HTTPRoute,
            Object::GRPCRoute(_) => Kind::GRPCRoute,
            Object::MeshPolicy(_) => Kind::MeshPolicy,
            Object::AccessPolicy(_) => Kind::AccessPolicy,
        }
    }

    pub fn key(&self) -> Key {
        match self {
            Object::Namespace(o) => Key::of(o),
            Object::Node(n) => Key::cluster(&n.name),
            Object::Pod(w) => w.key(),
            Object::Service(o) => Key::of(o),
            Object::EndpointSlice(o) => Key::of(o),
            Object::HTTPRoute(o) => Key::of(o),
            Object::GRPCRoute(o) => Key::of(o),
            Object::MeshPolicy(o) => Key::of(o),
            Object::AccessPolicy(o) => Key::of(o),
        }
    }
}
