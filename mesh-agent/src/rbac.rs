//! The Kubernetes permissions the agent needs, derived from the types its
//! watchers and status writer use. The chart's ClusterRole is checked against
//! these (`tests/chart.rs`), so neither can drift from the code.

use crate::gateway::{GrpcRoute, HttpRoute};
use k8s_openapi::api::{
    core::v1::{Namespace, Node, Pod, Service},
    discovery::v1::EndpointSlice,
};
use kube::Resource;

use crate::{
    crds::{AccessPolicy, MeshPolicy},
    state::Kind,
};

/// One RBAC rule: API group, resource, verbs.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Rule {
    pub group: String,
    pub resource: String,
    pub verbs: Vec<String>,
}

fn gr<K: Resource<DynamicType = ()>>() -> (String, String) {
    (K::group(&()).into_owned(), K::plural(&()).into_owned())
}

/// API group and plural of each kind the Kubernetes source watches.
pub fn watched(kind: Kind) -> (String, String) {
    match kind {
        Kind::Namespace => gr::<Namespace>(),
        Kind::Node => gr::<Node>(),
        Kind::Pod => gr::<Pod>(),
        Kind::Service => gr::<Service>(),
        Kind::EndpointSlice => gr::<EndpointSlice>(),
        Kind::HTTPRoute => gr::<HttpRoute>(),
        Kind::GRPCRoute => gr::<GrpcRoute>(),
        Kind::MeshPolicy => gr::<MeshPolicy>(),
        Kind::AccessPolicy => gr::<AccessPolicy>(),
    }
}

/// Kinds whose status the agent writes.
pub const STATUS_WRITTEN: [Kind; 4] = [
    Kind::HTTPRoute,
    Kind::GRPCRoute,
    Kind::MeshPolicy,
    Kind::AccessPolicy,
];

/// Every cluster-wide rule the CA (`mesh-agent ca`) needs: TokenReviews to
/// authenticate agents, and a pods watcher to know which node runs what.
pub fn ca_rules() -> Vec<Rule> {
    let review = certs::ca::tokenreview::TOKENREVIEW_PATH
        .trim_start_matches("/apis/")
        .split('/')
        .collect::<Vec<_>>();
    let (group, _version, resource) = (review[0], review[1], review[2]);
    let (pg, pr) = gr::<Pod>();
    let mut out = vec![
        Rule {
            group: group.into(),
            resource: resource.into(),
            verbs: vec!["create".into()],
        },
        Rule {
            group: pg,
            resource: pr,
            verbs: vec!["list".into(), "watch".into()],
        },
    ];
    out.sort();
    out
}

/// Every rule the agent needs, one resource per rule, sorted.
pub fn agent_rules() -> Vec<Rule> {
    let mut out: Vec<Rule> = Kind::ALL
        .iter()
        .map(|k| {
            let (group, resource) = watched(*k);
            Rule {
                group,
                resource,
                verbs: vec!["list".into(), "watch".into()],
            }
        })
        .collect();
    for k in STATUS_WRITTEN {
        let (group, resource) = watched(k);
        // A route's status is shared with other controllers: read before
        // written (see `sources::kube::status`).
        let verbs = match k {
            Kind::HTTPRoute | Kind::GRPCRoute => vec!["get".into(), "patch".into()],
            _ => vec!["patch".into()],
        };
        out.push(Rule {
            group,
            resource: format!("{resource}/status"),
            verbs,
        });
    }
    out.sort();
    out
}

/// The rules the agent needs in its own namespace: the status writer Lease
/// (`sources::kube::lease`), by name except for creating it, and its own
/// DaemonSet, by name (`sources::kube::owner`: watched with a
/// `metadata.name` field selector, which RBAC needs for a named list or
/// watch). Each rule: (rule, resource names).
pub fn agent_namespace_rules() -> Vec<(Rule, Vec<String>)> {
    let (group, resource) = gr::<k8s_openapi::api::coordination::v1::Lease>();
    let name = crate::sources::kube::lease::LEASE_NAME.to_string();
    let (ds_group, ds_resource) = gr::<k8s_openapi::api::apps::v1::DaemonSet>();
    vec![
        (
            Rule {
                group: group.clone(),
                resource: resource.clone(),
                verbs: vec!["get".into(), "update".into()],
            },
            vec![name],
        ),
        (
            Rule {
                group,
                resource,
                verbs: vec!["create".into()],
            },
            vec![],
        ),
        (
            Rule {
                group: ds_group,
                resource: ds_resource,
                verbs: vec!["list".into(), "watch".into()],
            },
            vec![crate::sources::kube::owner::DAEMONSET.to_string()],
        ),
    ]
}
