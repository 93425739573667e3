//! The `Accepted` condition of Sluice policies.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;

use super::routes::{Cond, conditions_match, to_conditions};
use crate::{
    crds::{MtlsMode, PolicyStatus},
    state::{Key, Kind, Store},
};

/// A status the Kubernetes source should write.
#[derive(Clone, Debug, PartialEq)]
pub struct StatusWrite {
    pub kind: Kind,
    pub key: Key,
    /// Sluice's policies: the whole `status` object. Routes: `{"parents":
    /// [...]}` with Sluice's entries only, merged by the writer into the
    /// route's current `status.parents`.
    pub status: serde_json::Value,
}

/// A queue of status writes that keeps the latest per object: the
/// reconciler sends every status that differs after each change, and the
/// writer takes them one at a time over HTTP (and may wait on the Lease or
/// a retry); a plain channel grew by every object on every change, while
/// only an object's latest status is worth writing. Objects leave in the
/// order they first came; a newer status takes an older one's place.
pub fn status_queue() -> (StatusSender, StatusReceiver) {
    let shared = std::sync::Arc::new(QueueShared {
        pending: std::sync::Mutex::new(Pending {
            senders: 1,
            ..Pending::default()
        }),
        notify: tokio::sync::Notify::new(),
    });
    (
        StatusSender {
            shared: shared.clone(),
        },
        StatusReceiver { shared },
    )
}

#[derive(Default)]
struct Pending {
    writes: std::collections::HashMap<(Kind, Key), StatusWrite>,
    order: std::collections::VecDeque<(Kind, Key)>,
    senders: usize,
    receiver_gone: bool,
}

impl Pending {
    fn pop(&mut self) -> Option<StatusWrite> {
        while let Some(id) = self.order.pop_front() {
            if let Some(w) = self.writes.remove(&id) {
                return Some(w);
            }
        }
        None
    }
}

struct QueueShared {
    pending: std::sync::Mutex<Pending>,
    notify: tokio::sync::Notify,
}

impl QueueShared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The reconciler's end of [`status_queue`].
pub struct StatusSender {
    shared: std::sync::Arc<QueueShared>,
}

/// The writer's end of [`status_queue`].
pub struct StatusReceiver {
    shared: std::sync::Arc<QueueShared>,
}

/// The writer went away; the write is handed back.
#[derive(Debug)]
pub struct WriterGone(pub StatusWrite);

/// Nothing is waiting.
#[derive(Debug, PartialEq, Eq)]
pub struct Empty;

impl StatusSender {
    pub fn send(&self, w: StatusWrite) -> Result<(), WriterGone> {
        let mut p = self.shared.lock();
        if p.receiver_gone {
            return Err(WriterGone(w));
        }
        let id = (w.kind, w.key.clone());
        if p.writes.insert(id.clone(), w).is_none() {
            p.order.push_back(id);
        }
        drop(p);
        self.shared.notify.notify_one();
        Ok(())
    }
}

impl Clone for StatusSender {
    fn clone(&self) -> Self {
        self.shared.lock().senders += 1;
        Self {
            shared: self.shared.clone(),
        }
    }
}

impl Drop for StatusSender {
    fn drop(&mut self) {
        self.shared.lock().senders -= 1;
        self.shared.notify.notify_one();
    }
}

impl StatusReceiver {
    /// The next write, waiting for one; `None` once every sender is gone
    /// and nothing is left.
    pub async fn recv(&mut self) -> Option<StatusWrite> {
        loop {
            {
                // One look, under one lock: a last send just before the
                // last sender went is still taken.
                let mut p = self.shared.lock();
                if let Some(w) = p.pop() {
                    return Some(w);
                }
                if p.senders == 0 {
                    return None;
                }
            }
            // A send between the look and the wait leaves a permit: the
            // wait then ends at once.
            self.shared.notify.notified().await;
        }
    }

    pub fn try_recv(&mut self) -> Result<StatusWrite, Empty> {
        self.shared.lock().pop().ok_or(Empty)
    }

    /// Writes waiting.
    pub fn len(&self) -> usize {
        self.shared.lock().writes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Drop for StatusReceiver {
    fn drop(&mut self) {
        self.shared.lock().receiver_gone = true;
    }
}

fn accepted_saying(
    message: &str,
    generation: Option<i64>,
    stored: &[Condition],
) -> Option<serde_json::Value> {
    let conds = [Cond {
        type_: "Accepted",
        status: true,
        reason: "Accepted".into(),
        message: message.into(),
    }];
    write(&conds, generation, stored)
}

/// Why a MeshPolicy in `ns` changes nothing: its namespace is not in the
/// mesh, so no pod it selects is (a pod can only opt out), and no mode of
/// it reaches the kernel or a proxy.
pub fn mesh_policy_idle(store: &Store, ns: &str) -> Option<String> {
    (!store.namespace_enrolled(ns)).then(|| {
        format!(
            "{}: no pod the policy selects is, and its mode applies to none of them",
            crate::config::not_in_mesh(ns)
        )
    })
}

/// Why a namespace-wide MeshPolicy sets no pod's mode, whatever the pods:
/// an older namespace-wide one (or one first by name, of the same age)
/// with another mode takes every pod no policy with a selector takes.
pub fn mesh_policy_shadowed(store: &Store, key: &Key) -> Option<String> {
    let p = store.mesh_policies.get(key)?;
    use super::workloads::{namespace_wide, rank};
    if !namespace_wide(p) {
        return None;
    }
    // The namespace-wide policy that wins: the first by age, then name.
    let (winner, q) = store
        .mesh_policies
        .iter()
        .filter(|(k, q)| k.namespace == key.namespace && namespace_wide(q))
        .min_by_key(|(k, q)| rank(k, q))?;
    (winner != key && q.spec.mode != p.spec.mode).then(|| {
        format!(
            "MeshPolicy {} sets the mode of every pod of the namespace that no policy with a \
             selector takes (between namespace-wide policies the oldest wins)",
            winner.name
        )
    })
}

/// Why a MeshPolicy's mode is not that of some pods it selects, or of any
/// (`true`): another MeshPolicy of the namespace, with another mode, takes
/// them (one with a selector beats a namespace-wide one; between equals the
/// oldest). `None` when every pod it selects has its mode (or it selects
/// none yet).
pub fn mesh_policy_overridden(store: &Store, key: &Key) -> Option<(bool, String)> {
    let p = store.mesh_policies.get(key)?;
    let mut selected = 0;
    let mut taken = 0;
    let mut by: std::collections::BTreeSet<&Key> = std::collections::BTreeSet::new();
    // The pods a mode applies to: in the mesh (the namespace is, see
    // mesh_policy_idle), not opted out, not on the node's network.
    let in_mesh = |w: &&crate::state::Workload| {
        w.namespace == key.namespace
            && !w.host_network
            && !w.is_static()
            && !w.finished
            && !w.opted_out()
    };
    for w in store.pods.values().filter(in_mesh) {
        if p.spec
            .selector
            .as_ref()
            .is_some_and(|sel| !crate::crds::selector_matches(sel, &w.labels))
        {
            continue;
        }
        selected += 1;
        // Taken by one that sets another mode (one that sets the same
        // changes nothing this policy asks).
        if let Some((winner, mode)) = super::workloads::mesh_policy_of(store, w)
            && winner != key
            && mode != p.spec.mode
        {
            taken += 1;
            by.insert(winner);
        }
    }
    if taken == 0 {
        return None;
    }
    let names: Vec<String> = by.iter().map(|k| k.name.clone()).collect();
    let all = taken == selected;
    Some((
        all,
        format!(
            "MeshPolicy {} sets the mode of {} the pods it selects (a policy with a selector \
             beats a namespace-wide one; between equals the oldest)",
            names.join(", "),
            if all { "all of" } else { "some of" },
        ),
    ))
}

fn write(
    conds: &[Cond],
    generation: Option<i64>,
    stored: &[Condition],
) -> Option<serde_json::Value> {
    if conditions_match(stored, conds, generation) {
        return None;
    }
    let status = PolicyStatus {
        observed_generation: generation,
        conditions: to_conditions(conds, generation, stored),
    };
    Some(serde_json::to_value(status).expect("status serialises"))
}

/// Status writes for every policy whose stored status is not what the agent
/// decided (accepted, or refused with the reasons); `default_mode` as for
/// [`bypassed_pods`].
pub fn policy_status_writes(store: &Store, default_mode: MtlsMode) -> Vec<StatusWrite> {
    let mut out = Vec::new();
    let stored = |s: Option<&PolicyStatus>| s.map(|s| s.conditions.clone()).unwrap_or_default();
    for (key, p) in &store.mesh_policies {
        if store
            .rejected
            .contains_key(&(Kind::MeshPolicy, key.clone()))
        {
            continue;
        }
        // Decided by the policies alone, not their pods: a status that
        // followed pods coming and going would be written again and again.
        let message = match (
            mesh_policy_idle(store, &key.namespace),
            mesh_policy_shadowed(store, key),
        ) {
            (Some(why), _) | (None, Some(why)) => format!("accepted, but not in force: {why}"),
            (None, None) => "the policy is in force".to_string(),
        };
        if let Some(status) =
            accepted_saying(&message, p.metadata.generation, &stored(p.status.as_ref()))
        {
            out.push(StatusWrite {
                kind: Kind::MeshPolicy,
                key: key.clone(),
                status,
            });
        }
    }
    for (key, p) in &store.access_policies {
        if store
            .rejected
            .contains_key(&(Kind::AccessPolicy, key.clone()))
        {
            continue;
        }
        let missing = missing_targets(store, key, p);
        let ungoverned: Vec<String> = ungoverned_pods(store, key, p)
            .iter()
            .map(Ungoverned::status_message)
            .collect();
        let bypassed = bypassed_pods(store, key, p, default_mode);
        let unpoliced = bypassed.iter().any(|b| b.how == Bypass::Unpoliced);
        let bypassed: Vec<String> = bypassed.iter().map(Bypassed::status_message).collect();
        let not_found = missing
            .iter()
            .filter(|m| m.ends_with("does not exist"))
            .count();
        let conds = [
            if missing.is_empty() && ungoverned.is_empty() && bypassed.is_empty() {
                Cond {
                    type_: "Accepted",
                    status: true,
                    reason: "Accepted".into(),
                    message: "the policy is in force".into(),
                }
            } else if missing.len() == p.spec.target_refs.len() {
                // GEP-713: a policy whose target does not exist is not accepted;
                // nor one whose targets govern no pod port.
                Cond {
                    type_: "Accepted",
                    status: false,
                    reason: if not_found == missing.len() {
                        "TargetNotFound".into()
                    } else {
                        "NoPortsToGovern".into()
                    },
                    message: format!(
                        "{}; the policy protects nothing until its target exists and has a TCP port",
                        missing.join("; ")
                    ),
                }
            } else {
                Cond {
                    type_: "Accepted",
                    status: true,
                    reason: "Accepted".into(),
                    message: format!(
                        "the policy is in force{}; {}",
                        match (
                            missing.is_empty(),
                            ungoverned.is_empty() && !unpoliced,
                            bypassed.is_empty()
                        ) {
                            (false, true, true) => " for its other targets",
                            (true, false, _) => ", except on pods it cannot govern",
                            (true, true, _) => " for callers in the mesh",
                            (false, false, _) => {
                                " for its other targets, except on pods it cannot govern"
                            }
                            (false, true, false) => " for its other targets (callers in the mesh)",
                        },
                        missing
                            .iter()
                            .chain(&ungoverned)
                            .chain(&bypassed)
                            .map(String::as_str)
                            .collect::<Vec<_>>()
                            .join("; ")
                    ),
                }
            },
        ];
        if let Some(status) = write(&conds, p.metadata.generation, &stored(p.status.as_ref())) {
            out.push(StatusWrite {
                kind: Kind::AccessPolicy,
                key: key.clone(),
                status,
            });
        }
    }
    for r in store.rejected.values() {
        let message = r
            .errors
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("; ");
        let conds = [Cond {
            type_: "Accepted",
            status: false,
            reason: "Invalid".into(),
            message: format!("{message} (the last valid version stays in force)"),
        }];
        if let Some(status) = write(&conds, r.generation, &r.conditions) {
            out.push(StatusWrite {
                kind: r.kind,
                key: r.key.clone(),
                status,
            });
        }
    }
    out
}

/// How messages name target `i` of the policy `key`.
fn target_at(i: usize, key: &Key, name: &str) -> String {
    format!("spec.targetRefs[{i}]: Service {}/{name}", key.namespace)
}

/// `spec.targetRefs[i]: Service ns/name does not exist` for each target of
/// `p` the store does not have, and `... has no TCP port ...` for each that
/// leads to no pod port the proxy polices (a headless Service without
/// ports, UDP only, `ExternalName`): either leaves the intended pods open to
/// every caller, so it is said in status and as a config error.
pub fn missing_targets(store: &Store, key: &Key, p: &crate::crds::AccessPolicy) -> Vec<String> {
    p.spec
        .target_refs
        .iter()
        .enumerate()
        .filter_map(|(i, t)| {
            let at = target_at(i, key, &t.name);
            let spec = match store.services.get(&Key::new(&key.namespace, &t.name)) {
                None => return Some(format!("{at} does not exist")),
                Some(svc) => svc.spec.as_ref(),
            };
            let external = spec.is_some_and(|s| s.type_.as_deref() == Some("ExternalName"));
            let tcp = spec.and_then(|s| s.ports.as_ref()).is_some_and(|ps| {
                ps.iter()
                    .any(|p| p.protocol.as_deref().unwrap_or("TCP") == "TCP")
            });
            (external || !tcp)
                .then(|| format!("{at} has no TCP port to govern (or is ExternalName)"))
        })
        .collect()
}

/// Most pods one message names.
const NAMED_PODS: usize = 3;

/// `ns/a, ns/b, ns/c and 4 more`: the pods named, of `total`.
fn named(pods: &[Key], total: usize) -> String {
    let names: Vec<String> = pods.iter().map(ToString::to_string).collect();
    match total - pods.len() {
        0 => names.join(", "),
        more => format!("{} and {more} more", names.join(", ")),
    }
}

/// The pods one target of an AccessPolicy cannot govern: every TCP port of
/// the target Service names its target port, and these enrolled pods its
/// selector picks declare none of the names. The EndpointSlice controller
/// gives them no port of the Service, but anyone can reach them directly;
/// the policy stays in force for the target's other pods.
#[derive(Debug, PartialEq)]
pub struct Ungoverned {
    at: String,
    port_names: Vec<String>,
    /// The first [`NAMED_PODS`] of them.
    pods: Vec<Key>,
    total: usize,
}

impl Ungoverned {
    fn what(&self) -> String {
        format!(
            "{} selects pods that declare none of its named target ports ({})",
            self.at,
            self.port_names.join(", ")
        )
    }

    /// For the policy's status: the same while pods come and go.
    pub fn status_message(&self) -> String {
        format!(
            "{}; the policy does not govern them (`sluice check` names them)",
            self.what()
        )
    }

    /// For `sluice check`: which pods, and the fix.
    pub fn detail(&self) -> String {
        format!(
            "{}: {}; the policy does not govern them (declare the port names in their \
             containers' ports, or give the Service port numbers)",
            self.what(),
            named(&self.pods, self.total),
        )
    }
}

/// The targets of `p` with enrolled pods it cannot govern ([`Ungoverned`]).
pub fn ungoverned_pods(store: &Store, key: &Key, p: &crate::crds::AccessPolicy) -> Vec<Ungoverned> {
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

    use super::{
        mesh::{pod_selector, selects, tcp_ports},
        workloads::not_enrolled_reason,
    };
    p.spec
        .target_refs
        .iter()
        .enumerate()
        .filter_map(|(i, t)| {
            let spec = store
                .services
                .get(&Key::new(&key.namespace, &t.name))?
                .spec
                .as_ref()?;
            let selector = pod_selector(spec)?;
            // Only where every TCP port names its target port can a pod
            // get none of them (none at all: missing_targets says so).
            let mut port_names = tcp_ports(spec)
                .iter()
                .map(|p| match &p.target_port {
                    Some(IntOrString::String(n)) => Some(n.clone()),
                    _ => None,
                })
                .collect::<Option<Vec<String>>>()
                .filter(|n| !n.is_empty())?;
            port_names.sort_unstable();
            port_names.dedup();
            let mut pods = Vec::new();
            let mut total = 0;
            let in_namespace = store
                .pods
                .range(Key::new(&key.namespace, "")..)
                .take_while(|(k, _)| k.namespace == key.namespace);
            for (k, w) in in_namespace {
                if selects(selector, w)
                    && !port_names.iter().any(|n| w.ports.contains_key(n))
                    && not_enrolled_reason(store, w).is_none()
                {
                    total += 1;
                    if pods.len() < NAMED_PODS {
                        pods.push(k.clone());
                    }
                }
            }
            (total > 0).then(|| Ungoverned {
                at: target_at(i, key, &t.name),
                port_names,
                pods,
                total,
            })
        })
        .collect()
}

/// How callers reach pods of an AccessPolicy's target past the policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bypass {
    /// `DISABLED`, or not in the mesh: every caller connects to them
    /// directly, past the node proxies, so the policy is not applied.
    Unpoliced,
    /// `PERMISSIVE`: mesh callers are policed; plaintext callers from
    /// outside the mesh reach them directly.
    Plaintext,
}

/// Pods one target of an AccessPolicy selects that callers can reach past
/// the policy ([`Bypass`]).
#[derive(Debug, PartialEq)]
pub struct Bypassed {
    at: String,
    pub how: Bypass,
    /// The first [`NAMED_PODS`] of them.
    pods: Vec<Key>,
    total: usize,
}

impl Bypassed {
    fn what(&self) -> String {
        match self.how {
            Bypass::Unpoliced => format!(
                "{} selects pods no node proxy polices (mTLS mode DISABLED, or not in the \
                 mesh): their callers reach them directly and the policy does not apply",
                self.at
            ),
            Bypass::Plaintext => format!(
                "{} selects PERMISSIVE pods: callers outside the mesh reach them in plaintext, \
                 past the policy",
                self.at
            ),
        }
    }

    /// For the policy's status: the same while pods come and go.
    pub fn status_message(&self) -> String {
        format!("{} (`sluice check` names them)", self.what())
    }

    /// For `sluice check`: which pods, and the fix.
    pub fn detail(&self) -> String {
        format!(
            "{}: {} ({})",
            self.what(),
            named(&self.pods, self.total),
            match self.how {
                Bypass::Unpoliced => "enrol them and give them STRICT or PERMISSIVE",
                Bypass::Plaintext => "a STRICT MeshPolicy refuses plaintext to them",
            }
        )
    }
}

/// The targets of `p` whose selected pods callers can reach past it
/// ([`Bypassed`]); `default_mode` is the agent's mTLS mode where no
/// MeshPolicy speaks. Pods of a target the EndpointSlices list but its
/// selector does not pick (hand-made slices) are not looked for.
pub fn bypassed_pods(
    store: &Store,
    key: &Key,
    p: &crate::crds::AccessPolicy,
    default_mode: MtlsMode,
) -> Vec<Bypassed> {
    use super::{
        mesh::{pod_selector, selects},
        workloads::{mtls_mode, not_enrolled_reason},
    };
    let mut out = Vec::new();
    for (i, t) in p.spec.target_refs.iter().enumerate() {
        let Some(selector) = store
            .services
            .get(&Key::new(&key.namespace, &t.name))
            .and_then(|s| s.spec.as_ref())
            .and_then(pod_selector)
        else {
            continue;
        };
        let mut found: [(Vec<Key>, usize); 2] = Default::default();
        let in_namespace = store
            .pods
            .range(Key::new(&key.namespace, "")..)
            .take_while(|(k, _)| k.namespace == key.namespace);
        for (k, w) in in_namespace {
            if w.finished || !selects(selector, w) {
                continue;
            }
            let how = if not_enrolled_reason(store, w).is_some() {
                Bypass::Unpoliced
            } else {
                match mtls_mode(store, w, default_mode) {
                    MtlsMode::Strict => continue,
                    MtlsMode::Permissive => Bypass::Plaintext,
                    MtlsMode::Disabled => Bypass::Unpoliced,
                }
            };
            let (pods, total) = &mut found[match how {
                Bypass::Unpoliced => 0,
                Bypass::Plaintext => 1,
            }];
            *total += 1;
            if pods.len() < NAMED_PODS {
                pods.push(k.clone());
            }
        }
        for (how, (pods, total)) in [Bypass::Unpoliced, Bypass::Plaintext]
            .into_iter()
            .zip(found)
        {
            if total > 0 {
                out.push(Bypassed {
                    at: target_at(i, key, &t.name),
                    how,
                    pods,
                    total,
                });
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    /// Sends faster than the writer takes them leave one write per object,
    /// the latest, in the order the objects first came.
    #[tokio::test]
    async fn the_status_queue_keeps_the_latest_write_per_object() {
        let (tx, mut rx) = super::status_queue();
        let w = |name: &str, n: u32| super::StatusWrite {
            kind: Kind::HTTPRoute,
            key: Key::new("shop", name),
            status: serde_json::json!({ "n": n }),
        };
        for n in 0..1000 {
            tx.send(w("a", n)).unwrap();
            tx.send(w("b", n)).unwrap();
        }
        tx.send(w("c", 0)).unwrap();
        assert_eq!(rx.len(), 3);
        assert_eq!(rx.recv().await, Some(w("a", 999)));
        assert_eq!(rx.recv().await, Some(w("b", 999)));
        // Sent again after it was taken: written again.
        tx.send(w("a", 1000)).unwrap();
        assert_eq!(rx.try_recv(), Ok(w("c", 0)));
        assert_eq!(rx.try_recv(), Ok(w("a", 1000)));
        assert_eq!(rx.try_recv(), Err(super::Empty));
        // A waiting writer wakes for the next; it ends once senders are gone.
        let tx2 = tx.clone();
        let waiting = tokio::spawn(async move { (rx.recv().await, rx.recv().await) });
        tokio::task::yield_now().await;
        tx2.send(w("d", 1)).unwrap();
        drop((tx, tx2));
        assert_eq!(waiting.await.unwrap(), (Some(w("d", 1)), None));
    }

    use super::*;
    use crate::{
        crds::{AccessPolicy, AccessPolicySpec},
        state::{Object, Update},
    };

    /// A MeshPolicy of a namespace outside the mesh selects no pod in it:
    /// its status says it is not in force and why, and the agent's problems
    /// list a STRICT one (it refuses no plaintext), the others as notes.
    #[test]
    fn a_mesh_policy_outside_the_mesh_says_it_is_not_in_force() {
        use crate::crds::{MeshPolicy, MeshPolicySpec};
        let mut s = Store::new();
        s.apply(Update::Upsert(Object::Namespace(
            crate::testing::namespace("legacy", false),
        )));
        let spec: MeshPolicySpec =
            serde_json::from_value(serde_json::json!({"mode": "STRICT"})).unwrap();
        let mut p = MeshPolicy::new("strict", spec);
        p.metadata.namespace = Some("legacy".into());
        s.apply(Update::Upsert(Object::MeshPolicy(p.clone())));
        let message = |s: &Store| {
            let w = policy_status_writes(s, MtlsMode::Permissive);
            w[0].status["conditions"][0]["message"]
                .as_str()
                .unwrap()
                .to_string()
        };
        let m = message(&s);
        assert!(
            m.starts_with("accepted, but not in force: namespace legacy is not in the mesh")
                && m.contains("sluice.dev/mesh: enabled"),
            "{m}"
        );
        // Enrolled, it is in force.
        s.apply(Update::Upsert(Object::Namespace(
            crate::testing::namespace("legacy", true),
        )));
        assert_eq!(message(&s), "the policy is in force");
    }

    /// A namespace-wide STRICT MeshPolicy added where an older
    /// PERMISSIVE one, or one with a selector, already sets the pods' mode
    /// does not say it is in force: its status and the agent's problems say
    /// which policy takes the pods; one that sets the same mode is no
    /// override.
    #[test]
    fn a_mesh_policy_whose_pods_another_takes_says_so() {
        use crate::crds::{MeshPolicy, MeshPolicySpec};
        let policy = |name: &str, mode: &str, selector: Option<&str>, age: i64| {
            let mut spec = serde_json::json!({ "mode": mode });
            if let Some(app) = selector {
                spec["selector"] = serde_json::json!({"matchLabels": {"app": app}});
            }
            let spec: MeshPolicySpec = serde_json::from_value(spec).unwrap();
            let mut p = MeshPolicy::new(name, spec);
            p.metadata.namespace = Some("shop".into());
            p.metadata.creation_timestamp =
                Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                    k8s_openapi::jiff::Timestamp::from_second(1_700_000_000 + age).unwrap(),
                ));
            Object::MeshPolicy(p)
        };
        let mut s = Store::new();
        for o in [
            Object::Namespace(crate::testing::namespace("shop", true)),
            Object::Pod(crate::testing::workload(
                "shop", "web", "web", "10.0.0.1", "n1",
            )),
            Object::Pod(crate::testing::workload(
                "shop", "db", "db", "10.0.0.2", "n1",
            )),
            policy("open", "PERMISSIVE", None, 0),
            policy("strict", "STRICT", None, 10),
        ] {
            s.apply(Update::Upsert(o));
        }
        let message = |s: &Store, name: &str| {
            policy_status_writes(s, MtlsMode::Permissive)
                .iter()
                .find(|w| w.key.name == name)
                .map(|w| {
                    w.status["conditions"][0]["message"]
                        .as_str()
                        .unwrap()
                        .to_string()
                })
                .unwrap()
        };
        let m = message(&s, "strict");
        assert!(
            m.starts_with(
                "accepted, but not in force: MeshPolicy open sets the mode of every pod of the \
                 namespace"
            ),
            "{m}"
        );
        assert_eq!(message(&s, "open"), "the policy is in force");
        let key = Key::new("shop", "strict");
        let (all, _) = mesh_policy_overridden(&s, &key).unwrap();
        assert!(all);
        // A third, newest, with the winner's mode: in force (the middle one
        // with another mode does not take its pods).
        s.apply(Update::Upsert(policy("strict-too", "STRICT", None, 30)));
        s.apply(Update::Upsert(policy("open", "STRICT", None, 0)));
        s.apply(Update::Upsert(policy("strict", "PERMISSIVE", None, 10)));
        assert_eq!(message(&s, "strict-too"), "the policy is in force");
        assert!(message(&s, "strict").starts_with("accepted, but not in force"));
        s.apply(Update::Delete(
            Kind::MeshPolicy,
            Key::new("shop", "strict-too"),
        ));
        s.apply(Update::Upsert(policy("open", "PERMISSIVE", None, 0)));
        s.apply(Update::Upsert(policy("strict", "STRICT", None, 10)));
        // Whatever the pods: none yet, it says the same.
        let mut empty = s.clone();
        empty.apply(Update::Delete(Kind::Pod, Key::new("shop", "web")));
        empty.apply(Update::Delete(Kind::Pod, Key::new("shop", "db")));
        assert_eq!(message(&empty, "strict"), m);
        // A selector takes web only: "strict" still sets db's mode.
        s.apply(Update::Delete(Kind::MeshPolicy, Key::new("shop", "open")));
        s.apply(Update::Upsert(policy(
            "web-open",
            "DISABLED",
            Some("web"),
            20,
        )));
        // The status does not follow pods (it would be written as they come
        // and go); the agent's own problems say which pods another takes.
        assert_eq!(message(&s, "strict"), "the policy is in force");
        let (all, why) = mesh_policy_overridden(&s, &key).unwrap();
        assert!(!all);
        assert!(
            why.starts_with("MeshPolicy web-open sets the mode of some of"),
            "{why}"
        );
        // One that asks the same mode takes nothing from it.
        s.apply(Update::Upsert(policy(
            "web-open",
            "STRICT",
            Some("web"),
            20,
        )));
        assert_eq!(message(&s, "strict"), "the policy is in force");
    }

    #[test]
    fn invalid_policies_get_a_false_condition_with_the_field() {
        let mut s = Store::new();
        let spec: AccessPolicySpec =
            serde_json::from_value(serde_json::json!({"targetRefs": []})).unwrap();
        let mut p = AccessPolicy::new("p", spec);
        p.metadata.namespace = Some("shop".into());
        p.metadata.generation = Some(2);
        s.apply(Update::Upsert(Object::AccessPolicy(p.clone())));
        let w = policy_status_writes(&s, MtlsMode::Strict);
        assert_eq!(w.len(), 1);
        let c = &w[0].status["conditions"][0];
        assert_eq!(c["type"], "Accepted");
        assert_eq!(c["status"], "False");
        assert_eq!(c["reason"], "Invalid");
        assert!(
            c["message"].as_str().unwrap().contains("spec.targetRefs"),
            "{c}"
        );
        assert_eq!(w[0].status["observedGeneration"], 2);

        // Once the object carries that status, there is nothing to write.
        p.status = Some(serde_json::from_value(w[0].status.clone()).unwrap());
        s.apply(Update::Upsert(Object::AccessPolicy(p)));
        assert_eq!(policy_status_writes(&s, MtlsMode::Strict), vec![]);
    }

    #[test]
    fn a_policy_whose_target_service_is_missing_is_not_accepted() {
        let mut s = Store::new();
        let spec: AccessPolicySpec = serde_json::from_value(serde_json::json!({
            "targetRefs": [{"kind": "Service", "name": "crt"}],
            "rules": [{"from": [{"namespace": "shop"}]}]
        }))
        .unwrap();
        let mut p = AccessPolicy::new("p", spec);
        p.metadata.namespace = Some("shop".into());
        s.apply(Update::Upsert(Object::AccessPolicy(p)));
        let w = policy_status_writes(&s, MtlsMode::Strict);
        let c = &w[0].status["conditions"][0];
        assert_eq!(c["status"], "False", "{c}");
        assert_eq!(c["reason"], "TargetNotFound");
        assert!(
            c["message"]
                .as_str()
                .unwrap()
                .starts_with("spec.targetRefs[0]: Service shop/crt does not exist"),
            "{c}"
        );
        // The Service appears: accepted.
        s.apply(Update::Upsert(Object::Service(crate::testing::service(
            "shop",
            "crt",
            "127.96.0.5",
            &[80],
        ))));
        let w = policy_status_writes(&s, MtlsMode::Strict);
        assert_eq!(w[0].status["conditions"][0]["status"], "True");
    }

    #[test]
    fn a_policy_whose_target_has_no_tcp_port_is_not_accepted() {
        let mut s = Store::new();
        let spec: AccessPolicySpec = serde_json::from_value(serde_json::json!({
            "targetRefs": [{"kind": "Service", "name": "db"}],
            "rules": [{"from": [{"namespace": "shop"}]}]
        }))
        .unwrap();
        let mut p = AccessPolicy::new("p", spec);
        p.metadata.namespace = Some("shop".into());
        s.apply(Update::Upsert(Object::AccessPolicy(p)));
        // A headless Service without ports (a StatefulSet's, say).
        let mut db = crate::testing::service("shop", "db", "None", &[]);
        db.spec.as_mut().unwrap().ports = None;
        s.apply(Update::Upsert(Object::Service(db.clone())));
        let w = policy_status_writes(&s, MtlsMode::Strict);
        let c = &w[0].status["conditions"][0];
        assert_eq!(c["status"], "False", "{c}");
        assert_eq!(c["reason"], "NoPortsToGovern");
        assert!(
            c["message"].as_str().unwrap().contains("has no TCP port"),
            "{c}"
        );
        // UDP only: the same.
        db.spec.as_mut().unwrap().ports = Some(vec![k8s_openapi::api::core::v1::ServicePort {
            port: 53,
            protocol: Some("UDP".into()),
            ..Default::default()
        }]);
        s.apply(Update::Upsert(Object::Service(db.clone())));
        let w = policy_status_writes(&s, MtlsMode::Strict);
        assert_eq!(w[0].status["conditions"][0]["reason"], "NoPortsToGovern");
        // A TCP port: accepted.
        db.spec.as_mut().unwrap().ports = Some(vec![k8s_openapi::api::core::v1::ServicePort {
            port: 5432,
            ..Default::default()
        }]);
        s.apply(Update::Upsert(Object::Service(db)));
        let w = policy_status_writes(&s, MtlsMode::Strict);
        assert_eq!(w[0].status["conditions"][0]["status"], "True");
    }

    /// A store with namespace shop enrolled and AccessPolicy shop/p on
    /// Service web (not in the store yet); and the policy.
    fn enrolled_shop_with_a_policy_on_web() -> (Store, AccessPolicy) {
        let mut s = Store::new();
        s.apply(Update::Upsert(Object::Namespace(
            crate::testing::namespace("shop", true),
        )));
        let spec: AccessPolicySpec = serde_json::from_value(serde_json::json!({
            "targetRefs": [{"kind": "Service", "name": "web"}],
            "rules": [{"from": [{"namespace": "shop"}]}]
        }))
        .unwrap();
        let mut p = AccessPolicy::new("p", spec);
        p.metadata.namespace = Some("shop".into());
        s.apply(Update::Upsert(Object::AccessPolicy(p.clone())));
        (s, p)
    }

    /// A policy is enforced by the node proxies: pods callers reach past
    /// them (DISABLED: every caller; PERMISSIVE: plaintext callers outside
    /// the mesh) are named in its status, and in `sluice check`.
    #[test]
    fn pods_callers_reach_past_the_policy_are_reported() {
        let (mut s, p) = enrolled_shop_with_a_policy_on_web();
        s.apply(Update::Upsert(Object::Service(crate::testing::service(
            "shop",
            "web",
            "127.96.0.5",
            &[80],
        ))));
        let mut pod = |name: &str, app: &str| {
            let mut w = crate::testing::workload("shop", name, "web", "10.0.1.5", "n1");
            w.labels = [("app".to_string(), app.to_string())].into();
            s.apply(Update::Upsert(Object::Pod(w)));
        };
        pod("web-0", "web");
        pod("web-1", "web");
        // Not selected by the target: not its business.
        pod("api-0", "api");
        let key = Key::new("shop", "p");
        let message = |s: &Store, mode| {
            let w = policy_status_writes(s, mode);
            let w = w.iter().find(|w| w.kind == Kind::AccessPolicy).unwrap();
            w.status["conditions"][0]["message"]
                .as_str()
                .unwrap()
                .to_string()
        };
        assert!(bypassed_pods(&s, &key, &p, MtlsMode::Strict).is_empty());
        assert_eq!(message(&s, MtlsMode::Strict), "the policy is in force");

        let found = bypassed_pods(&s, &key, &p, MtlsMode::Permissive);
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].how, Bypass::Plaintext);
        assert!(
            found[0]
                .detail()
                .contains("past the policy: shop/web-0, shop/web-1 (a STRICT"),
            "{}",
            found[0].detail()
        );
        assert_eq!(
            message(&s, MtlsMode::Permissive),
            "the policy is in force for callers in the mesh; spec.targetRefs[0]: Service \
             shop/web selects PERMISSIVE pods: callers outside the mesh reach them in \
             plaintext, past the policy (`sluice check` names them)"
        );

        // A MeshPolicy turning one pod DISABLED: that one is not policed
        // at all, the other still PERMISSIVE.
        let mut off = crate::crds::MeshPolicy::new(
            "off",
            serde_json::from_value(serde_json::json!({
                "mode": "DISABLED",
                "selector": {"matchLabels": {"off": "yes"}}
            }))
            .unwrap(),
        );
        off.metadata.namespace = Some("shop".into());
        s.apply(Update::Upsert(Object::MeshPolicy(off)));
        let mut w = crate::testing::workload("shop", "web-1", "web", "10.0.1.5", "n1");
        w.labels = [("app", "web"), ("off", "yes")]
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .into();
        s.apply(Update::Upsert(Object::Pod(w)));
        let found = bypassed_pods(&s, &key, &p, MtlsMode::Permissive);
        let hows: Vec<Bypass> = found.iter().map(|b| b.how).collect();
        assert_eq!(hows, [Bypass::Unpoliced, Bypass::Plaintext]);
        assert!(
            found[0]
                .detail()
                .contains("does not apply: shop/web-1 (enrol"),
            "{}",
            found[0].detail()
        );
        assert!(
            message(&s, MtlsMode::Permissive)
                .starts_with("the policy is in force, except on pods it cannot govern; "),
            "{}",
            message(&s, MtlsMode::Permissive)
        );
    }

    #[test]
    fn pods_that_declare_none_of_a_named_target_port_are_reported_as_ungoverned() {
        use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
        let (mut s, p) = enrolled_shop_with_a_policy_on_web();
        let mut web = crate::testing::service("shop", "web", "127.96.0.5", &[80]);
        web.spec.as_mut().unwrap().ports.as_mut().unwrap()[0].target_port =
            Some(IntOrString::String("http".into()));
        s.apply(Update::Upsert(Object::Service(web)));
        let pod = |name: &str, port: Option<u16>| {
            let mut w = crate::testing::workload("shop", name, "web", "10.0.1.5", "n1");
            w.labels = [("app".to_string(), "web".to_string())].into();
            if let Some(port) = port {
                w.ports.insert("http".into(), port);
            }
            w
        };
        s.apply(Update::Upsert(Object::Pod(pod("web-0", Some(8080)))));
        s.apply(Update::Upsert(Object::Pod(pod("web-1", None))));
        // Neither a finished pod nor one of another Service counts.
        let mut done = pod("web-2", None);
        done.finished = true;
        s.apply(Update::Upsert(Object::Pod(done)));
        let mut other = pod("api-0", None);
        other.labels = [("app".to_string(), "api".to_string())].into();
        s.apply(Update::Upsert(Object::Pod(other)));
        // Nor one out of the mesh: no policy governs it anyway.
        let mut out = pod("web-9", None);
        out.annotations.insert(
            crate::config::MESH_ANNOTATION.into(),
            crate::config::MESH_DISABLED.into(),
        );
        s.apply(Update::Upsert(Object::Pod(out)));

        let key = Key::new("shop", "p");
        let found = ungoverned_pods(&s, &key, &p);
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(
            found[0].detail().starts_with(
                "spec.targetRefs[0]: Service shop/web selects pods that declare none of its \
                 named target ports (http): shop/web-1; the policy does not govern them"
            ),
            "{found:?}"
        );
        // Still in force for web-0: accepted, saying which Service's pods
        // it misses (not which pods: the status would change with every
        // rollout). The pod out of the mesh is not policed either.
        let w = policy_status_writes(&s, MtlsMode::Strict);
        let c = &w[0].status["conditions"][0];
        assert_eq!(c["status"], "True", "{c}");
        assert_eq!(
            c["message"],
            "the policy is in force, except on pods it cannot govern; spec.targetRefs[0]: \
             Service shop/web selects pods that declare none of its named target ports \
             (http); the policy does not govern them (`sluice check` names them); \
             spec.targetRefs[0]: Service shop/web selects pods no node proxy polices (mTLS \
             mode DISABLED, or not in the mesh): their callers reach them directly and the \
             policy does not apply (`sluice check` names them)",
        );

        // Many such pods: three are named.
        for name in ["web-3", "web-4", "web-5"] {
            s.apply(Update::Upsert(Object::Pod(pod(name, None))));
        }
        let found = ungoverned_pods(&s, &key, &p);
        assert!(
            found[0]
                .detail()
                .contains("shop/web-1, shop/web-3, shop/web-4 and 1 more;"),
            "{found:?}"
        );
        // The status says the same as before: nothing to write.
        assert_eq!(
            policy_status_writes(&s, MtlsMode::Strict)[0].status["conditions"][0]["message"],
            c["message"]
        );

        // Once they declare the name, and the pod out of the mesh is gone,
        // nothing is reported.
        s.apply(Update::Delete(Kind::Pod, Key::new("shop", "web-9")));
        for name in ["web-1", "web-3", "web-4", "web-5"] {
            s.apply(Update::Upsert(Object::Pod(pod(name, Some(8080)))));
        }
        assert_eq!(ungoverned_pods(&s, &key, &p), vec![]);
        let w = policy_status_writes(&s, MtlsMode::Strict);
        assert_eq!(
            w[0].status["conditions"][0]["message"],
            "the policy is in force"
        );
    }
}
