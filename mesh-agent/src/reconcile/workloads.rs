//! Pods -> workload identities, enrolment and mTLS modes.

use std::collections::BTreeMap;

use kube::ResourceExt as _;

use crate::{
    admin::api::WorkloadInfo,
    config,
    crds::{MtlsMode, selector_matches},
    state::{Store, Workload},
};

/// `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
pub fn spiffe_id(trust_domain: &str, namespace: &str, service_account: &str) -> String {
    match certs::SpiffeId::new(trust_domain, namespace, service_account) {
        Ok(id) => id.to_string(),
        // Names Kubernetes accepts are valid; keep the plain form otherwise
        // (the identity manager reports it).
        Err(_) => format!("spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}"),
    }
}

/// The mTLS mode of a workload: a MeshPolicy selecting it beats a
/// namespace-wide one; between equals the oldest, then the first by name.
pub fn mtls_mode(store: &Store, w: &Workload, default: MtlsMode) -> MtlsMode {
    mesh_policy_of(store, w).map_or(default, |(_, mode)| mode)
}

/// Whether a MeshPolicy applies to every pod of its namespace: no selector,
/// or an empty one (`selector: {}` selects every pod, and does not outrank
/// an older namespace-wide policy).
pub fn namespace_wide(p: &crate::crds::MeshPolicy) -> bool {
    p.spec.selector.as_ref().is_none_or(|s| {
        s.match_labels.as_ref().is_none_or(|m| m.is_empty())
            && s.match_expressions.as_ref().is_none_or(|e| e.is_empty())
    })
}

/// A MeshPolicy's place among equals: the oldest first, then by name.
pub type PolicyRank<'a> = (Option<&'a k8s_openapi::jiff::Timestamp>, &'a str);

pub fn rank<'a>(key: &'a crate::state::Key, p: &'a crate::crds::MeshPolicy) -> PolicyRank<'a> {
    (
        p.metadata.creation_timestamp.as_ref().map(|t| &t.0),
        key.name.as_str(),
    )
}

/// The MeshPolicy that sets a workload's mode (see [`mtls_mode`]), if any
/// selects it.
pub fn mesh_policy_of<'a>(
    store: &'a Store,
    w: &Workload,
) -> Option<(&'a crate::state::Key, MtlsMode)> {
    let mut best: Option<(bool, PolicyRank<'_>, &crate::state::Key, MtlsMode)> = None;
    for (key, p) in &store.mesh_policies {
        if key.namespace != w.namespace {
            continue;
        }
        if let Some(sel) = &p.spec.selector
            && !selector_matches(sel, &w.labels)
        {
            continue;
        }
        let cand = (!namespace_wide(p), rank(key, p), key, p.spec.mode);
        best = match best {
            None => Some(cand),
            Some(b) => {
                let better = (cand.0 && !b.0) || (cand.0 == b.0 && cand.1 < b.1);
                Some(if better { cand } else { b })
            }
        };
    }
    best.map(|b| (b.2, b.3))
}

/// Why a local workload is not enrolled, if it is not.
pub(crate) fn not_enrolled_reason(store: &Store, w: &Workload) -> Option<String> {
    if !store.namespace_enrolled(&w.namespace) {
        return Some(format!(
            "namespace {} is not enrolled (annotate it {}={})",
            w.namespace,
            config::MESH_ANNOTATION,
            config::MESH_ENABLED
        ));
    }
    if w.opted_out() {
        return Some(format!(
            "opted out ({}={})",
            config::MESH_ANNOTATION,
            config::MESH_DISABLED
        ));
    }
    if w.host_network {
        return Some("uses the host network".into());
    }
    if w.is_static() {
        return Some(
            "a static pod (from a kubelet manifest): it has no service account, so no mesh identity"
                .into(),
        );
    }
    if w.finished {
        return Some("finished (Succeeded or Failed)".into());
    }
    None
}

/// Every pod the agent knows that has not finished, with identity, enrolment
/// and mode. `enrolled` here is the intent; the reconciler adds what the
/// kernel side reports. Finished pods (Succeeded, Failed) are left out: they
/// keep their IP, which the network may already have given to another pod.
/// An address two pods claim is one pod's (see [`addresses_of`]).
pub fn workload_infos(
    store: &Store,
    node: &str,
    trust_domain: &str,
    default_mode: MtlsMode,
) -> Vec<WorkloadInfo> {
    let pods: Vec<&Workload> = store.pods.values().filter(|w| !w.finished).collect();
    let owned = addresses_of(&pods, store, node);
    pods.into_iter()
        .zip(owned)
        .map(|(w, ips)| {
            let local = w.node == node;
            // A pod of another node: enrolled as its node's agent takes it
            // (the reasons are the same everywhere), shown with `-A`.
            let reason = if w.node.is_empty() {
                Some("not scheduled to a node yet".into())
            } else {
                not_enrolled_reason(store, w)
            };
            WorkloadInfo {
                namespace: w.namespace.clone(),
                name: w.name.clone(),
                uid: w.uid.clone(),
                service_account: w.service_account.clone(),
                identity: spiffe_id(trust_domain, &w.namespace, &w.service_account),
                ips: ips.iter().map(ToString::to_string).collect(),
                node: w.node.clone(),
                local,
                enrolled: reason.is_none(),
                reason,
                mtls_mode: mtls_mode(store, w, default_mode),
                cgroup: None,
                cgroup_id: None,
                strict_guard: None,
                cert_expiry: None,
                cert_problem: None,
            }
        })
        .collect()
}

/// The addresses each pod of `pods` owns, in order. Pods on the pod network
/// have addresses of their own, so one claimed twice means a pod that is
/// gone (kept by a finalizer, or left Running on a lost node) and one the
/// network has given its address since. Exactly one keeps it, the first of:
/// not terminating; on this node (its network plugin gave the address out,
/// and the kernel's STRICT guard and mode follow it); on a node the agent
/// knows; then, as before, the last in name order. Host-network pods share
/// their node's address and keep it.
fn addresses_of(pods: &[&Workload], store: &Store, node: &str) -> Vec<Vec<std::net::IpAddr>> {
    use std::collections::HashMap;
    let rank = |w: &Workload| {
        (
            !w.terminating,
            w.node == node,
            store.nodes.contains_key(&w.node),
        )
    };
    // Per address: the index of the pod that keeps it (pods are in name
    // order, so the later of two equal ranks wins).
    let mut owner: HashMap<std::net::IpAddr, usize> = HashMap::new();
    for (i, w) in pods.iter().enumerate().filter(|(_, w)| !w.host_network) {
        for ip in &w.ips {
            let keep = owner
                .get(ip)
                .is_some_and(|&o| o != i && rank(pods[o]) > rank(w));
            if !keep {
                owner.insert(*ip, i);
            }
        }
    }
    pods.iter()
        .enumerate()
        .map(|(i, w)| {
            w.ips
                .iter()
                .copied()
                .filter(|ip| w.host_network || owner.get(ip) == Some(&i))
                .collect()
        })
        .collect()
}

/// Names of the enrolled namespaces.
pub fn enrolled_namespaces(store: &Store) -> Vec<String> {
    store
        .namespaces
        .values()
        .filter(|ns| store.namespace_enrolled(&ns.name_any()))
        .map(|ns| ns.name_any())
        .collect()
}

/// A cgroup the agent enrolled, by pod UID.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EnrolledCgroup {
    pub id: u64,
    pub path: std::path::PathBuf,
}

pub type Enrolled = BTreeMap<String, EnrolledCgroup>;

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, Time};

    use super::*;
    use crate::{
        crds::{MeshPolicy, MeshPolicySpec},
        state::{Object, Update},
        testing::*,
    };

    fn policy(name: &str, sel: Option<(&str, &str)>, mode: MtlsMode, age_s: i64) -> MeshPolicy {
        let mut p = MeshPolicy::new(
            name,
            MeshPolicySpec {
                selector: sel.map(|(k, v)| LabelSelector {
                    match_labels: Some(BTreeMap::from([(k.to_string(), v.to_string())])),
                    match_expressions: None,
                }),
                mode,
            },
        );
        p.metadata.namespace = Some("shop".into());
        p.metadata.creation_timestamp = Some(Time(
            k8s_openapi::jiff::Timestamp::from_second(1_700_000_000 - age_s).unwrap(),
        ));
        p
    }

    #[test]
    fn selector_policies_beat_namespace_policies_and_older_wins() {
        let mut s = Store::new();
        let w = workload("shop", "web-0", "web", "10.0.0.1", "n1");
        assert_eq!(
            mtls_mode(&s, &w, MtlsMode::Permissive),
            MtlsMode::Permissive
        );
        s.apply(Update::Upsert(Object::MeshPolicy(policy(
            "ns-wide",
            None,
            MtlsMode::Strict,
            10,
        ))));
        assert_eq!(mtls_mode(&s, &w, MtlsMode::Permissive), MtlsMode::Strict);
        s.apply(Update::Upsert(Object::MeshPolicy(policy(
            "web",
            Some(("app", "web-0")),
            MtlsMode::Disabled,
            1,
        ))));
        assert_eq!(mtls_mode(&s, &w, MtlsMode::Permissive), MtlsMode::Disabled);
        s.apply(Update::Upsert(Object::MeshPolicy(policy(
            "web-older",
            Some(("app", "web-0")),
            MtlsMode::Permissive,
            5,
        ))));
        assert_eq!(mtls_mode(&s, &w, MtlsMode::Strict), MtlsMode::Permissive);
        let other = workload("shop", "db-0", "db", "10.0.0.2", "n1");
        assert_eq!(
            mtls_mode(&s, &other, MtlsMode::Permissive),
            MtlsMode::Strict
        );
    }

    /// `selector: {}` selects every pod, as no selector does: it does not
    /// outrank an older namespace-wide policy.
    #[test]
    fn an_empty_selector_is_namespace_wide() {
        let mut s = Store::new();
        let w = workload("shop", "web-0", "web", "10.0.0.1", "n1");
        s.apply(Update::Upsert(Object::MeshPolicy(policy(
            "ns-wide",
            None,
            MtlsMode::Strict,
            10,
        ))));
        let mut empty = policy("empty", None, MtlsMode::Permissive, 1);
        empty.spec.selector = Some(LabelSelector::default());
        s.apply(Update::Upsert(Object::MeshPolicy(empty.clone())));
        assert_eq!(mtls_mode(&s, &w, MtlsMode::Disabled), MtlsMode::Strict);
        // Older than the other, it wins as any namespace-wide one would.
        empty.metadata.creation_timestamp = Some(Time(
            k8s_openapi::jiff::Timestamp::from_second(1_700_000_000 - 20).unwrap(),
        ));
        s.apply(Update::Upsert(Object::MeshPolicy(empty)));
        assert_eq!(mtls_mode(&s, &w, MtlsMode::Disabled), MtlsMode::Permissive);
    }

    #[test]
    fn enrolment_follows_namespace_annotation_and_pod_opt_out() {
        let mut s = Store::new();
        s.apply(Update::Upsert(Object::Namespace(namespace("shop", true))));
        s.apply(Update::Upsert(Object::Namespace(namespace("plain", false))));
        let mut out = workload("shop", "out", "default", "10.0.0.3", "n1");
        out.annotations
            .insert(config::MESH_ANNOTATION.into(), config::MESH_DISABLED.into());
        for w in [
            workload("shop", "web", "web", "10.0.0.1", "n1"),
            workload("plain", "db", "db", "10.0.0.2", "n1"),
            workload("shop", "far", "far", "10.0.0.9", "n2"),
            out,
        ] {
            s.apply(Update::Upsert(Object::Pod(w)));
        }
        let infos = workload_infos(&s, "n1", "example.org", MtlsMode::Permissive);
        let by: BTreeMap<&str, &WorkloadInfo> =
            infos.iter().map(|w| (w.name.as_str(), w)).collect();
        assert!(by["web"].enrolled);
        assert_eq!(by["web"].identity, "spiffe://example.org/ns/shop/sa/web");
        assert!(!by["db"].enrolled);
        assert!(
            by["db"]
                .reason
                .as_deref()
                .unwrap()
                .contains("namespace plain")
        );
        // Another node's pod, in an enrolled namespace: enrolled there.
        assert!(by["far"].enrolled && !by["far"].local, "{:?}", by["far"]);
        let plain_far = workload("plain", "far2", "db", "10.0.0.8", "n2");
        s.apply(Update::Upsert(Object::Pod(plain_far)));
        let infos = workload_infos(&s, "n1", "example.org", MtlsMode::Permissive);
        let far2 = infos.iter().find(|w| w.name == "far2").unwrap();
        assert!(!far2.enrolled && far2.reason.as_deref().unwrap().contains("namespace plain"));
        // A pod no node runs yet is nobody's to enrol.
        s.apply(Update::Upsert(Object::Pod(workload(
            "shop", "pending", "x", "10.0.0.7", "",
        ))));
        let infos = workload_infos(&s, "n1", "example.org", MtlsMode::Permissive);
        let pending = infos.iter().find(|w| w.name == "pending").unwrap();
        assert!(!pending.enrolled, "{pending:?}");
        assert!(!by["out"].enrolled);
        assert!(by["out"].reason.as_deref().unwrap().contains("opted out"));
        assert_eq!(enrolled_namespaces(&s), ["shop"]);
    }
}
