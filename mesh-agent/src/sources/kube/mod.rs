//! The Kubernetes source: kube-rs watchers for Namespaces, Nodes, Pods,
//! Services, EndpointSlices, `HTTPRoute`s, `GRPCRoute`s and the Sluice CRDs,
//! feeding the model (which is the agent's store of them), and a writer for
//! the status the reconciler decides ([`status`]).
//!
//! Every kind is listed and watched on its own. The reconciler is told the
//! source is synced once every kind has been listed, or has failed its first
//! list (a CRD that is not installed: reported, and treated as empty while the
//! watcher keeps retrying).

pub mod lease;
pub mod owner;
pub mod status;

/// Whether `e` is the API server answering with HTTP status `code`.
fn is_status(e: &kube::Error, code: u16) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == code)
}

use std::{
    collections::BTreeMap,
    fmt::Debug,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    time::Duration,
};

use crate::gateway::{GrpcRoute, HttpRoute};
use futures::{StreamExt as _, TryStreamExt as _};
use k8s_openapi::api::{
    core::v1::{Namespace, Node, Pod, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    Api, Client, Resource, ResourceExt as _,
    api::{ApiResource, DynamicObject},
    runtime::{WatchStreamExt as _, watcher, watcher::DefaultBackoff},
};
use serde::de::DeserializeOwned;

use crate::{
    admin::api::ConfigError,
    crds::{AccessPolicy, MeshPolicy},
    reconcile::Input,
    state::{Key, Kind, NodeInfo, Object, Update, Workload},
};

/// A pod as the model keeps it.
pub fn workload_of(p: &Pod) -> Workload {
    let spec = p.spec.as_ref();
    let status = p.status.as_ref();
    let mut ips: Vec<std::net::IpAddr> = status
        .and_then(|s| s.pod_ips.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|ip| ip.ip.parse().ok())
        .collect();
    if ips.is_empty()
        && let Some(ip) = status
            .and_then(|s| s.pod_ip.as_ref())
            .and_then(|ip| ip.parse().ok())
    {
        ips.push(ip);
    }
    let phase = status.and_then(|s| s.phase.as_deref());
    // In a cluster a pod's readiness reaches the agent through its
    // EndpointSlices; read from the pod too, every readiness flip anywhere
    // in the cluster would change the pod's workload and rebuild every
    // agent's view of the mesh. Only the files source derives slices from
    // it.
    let ready = true;
    Workload {
        namespace: p.namespace().unwrap_or_default(),
        name: p.name_any(),
        uid: p.uid().unwrap_or_default(),
        service_account: spec
            .and_then(|s| s.service_account_name.clone())
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "default".into()),
        ips,
        node: spec.and_then(|s| s.node_name.clone()).unwrap_or_default(),
        labels: p.labels().clone(),
        annotations: p.annotations().clone(),
        // As the EndpointSlice controller resolves a named target port: the
        // first container port of that name (and protocol: TCP, the only
        // one the proxy carries).
        ports: spec
            .into_iter()
            .flat_map(|s| {
                // Sidecars (restartable init containers) count too.
                let sidecars = s.init_containers.iter().flatten();
                s.containers
                    .iter()
                    .chain(sidecars.filter(|c| c.restart_policy.as_deref() == Some("Always")))
            })
            .flat_map(|c| c.ports.iter().flatten())
            .filter(|cp| cp.protocol.as_deref().unwrap_or("TCP") == "TCP")
            .filter_map(|cp| Some((cp.name.clone()?, u16::try_from(cp.container_port).ok()?)))
            .fold(BTreeMap::new(), |mut m, (name, port)| {
                m.entry(name).or_insert(port);
                m
            }),
        cgroup: None,
        interface: None,
        ready,
        terminating: p.metadata.deletion_timestamp.is_some(),
        finished: matches!(phase, Some("Succeeded" | "Failed")),
        host_network: spec.and_then(|s| s.host_network).unwrap_or(false),
    }
}

/// A node's name and its internal (else external) addresses.
pub fn node_info(n: &Node) -> NodeInfo {
    let addrs = n
        .status
        .as_ref()
        .and_then(|s| s.addresses.as_ref())
        .cloned()
        .unwrap_or_default();
    let pick = |t: &str| -> Vec<std::net::IpAddr> {
        addrs
            .iter()
            .filter(|a| a.type_ == t)
            .filter_map(|a| a.address.parse().ok())
            .collect()
    };
    let mut addresses = pick("InternalIP");
    if addresses.is_empty() {
        addresses = pick("ExternalIP");
    }
    NodeInfo {
        name: n.name_any(),
        addresses,
    }
}

/// Tracks which kinds have delivered their first list.
struct SyncGate {
    pending: Mutex<BTreeMap<Kind, ()>>,
    done: AtomicBool,
}

impl SyncGate {
    fn new(kinds: &[Kind]) -> Self {
        Self {
            pending: Mutex::new(kinds.iter().map(|k| (*k, ())).collect()),
            done: AtomicBool::new(false),
        }
    }

    /// Marks `kind` listed; true for the call that completes the set.
    fn listed(&self, kind: Kind) -> bool {
        let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        p.remove(&kind);
        p.is_empty() && !self.done.swap(true, Ordering::SeqCst)
    }
}

fn source_name(kind: Kind) -> String {
    format!("kubernetes {kind}")
}

/// How a watched object becomes a model object: `Ok(None)` when it is not
/// one (an update then deletes it), `Err((field, problem))` when this agent
/// cannot read it.
type Convert<K> = fn(K) -> Result<Option<Object>, (Option<String>, String)>;

/// The kinds whose objects are decoded one by one ([`DynamicObject`] lists):
/// CRDs can be newer than the types this agent was built with (a filter
/// type added by a later Gateway API release), and one such object must not
/// fail the list of all the others (and hold the whole sync back).
fn decode<K: DeserializeOwned>(o: DynamicObject) -> Result<K, (Option<String>, String)> {
    let v = serde_json::to_value(&o).map_err(|e| (None, e.to_string()))?;
    serde_path_to_error::deserialize(v).map_err(|e| {
        let path = e.path().to_string();
        ((path != ".").then_some(path), e.into_inner().to_string())
    })
}

/// A type the source watches.
trait Watched {
    /// Objects of this type can fail to decode (the CRDs, read as
    /// [`DynamicObject`]s): the last readable version of each is kept.
    /// Core kinds always decode, and keeping a copy of every Pod would cost
    /// memory for nothing.
    const MAY_BE_UNREADABLE: bool = false;
}

impl Watched for Namespace {}
impl Watched for Node {}
impl Watched for Pod {}
impl Watched for Service {}
impl Watched for EndpointSlice {}
impl Watched for DynamicObject {
    const MAY_BE_UNREADABLE: bool = true;
}

/// Watches one kind until the reconciler goes away. Objects `convert`
/// cannot read are reported (each by name) and left out; one that was read
/// before keeps its last readable version (`tolerant` kinds remember them).
async fn watch_kind<K>(
    api: Api<K>,
    config: watcher::Config,
    kind: Kind,
    convert: Convert<K>,
    ctx: Watching,
) where
    K: Watched + Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
{
    let Watching {
        tx,
        gate,
        recovered_after,
        absent_after,
    } = ctx;
    // Since when its lists have answered 404 (none in between succeeded).
    let mut absent_since: Option<std::time::Instant> = None;
    let mut initial: Vec<Object> = Vec::new();
    let mut listed = false;
    // The kind was found not served, and emptied, since its last list.
    let mut emptied = false;
    let mut failing = false;
    // The last error was a failed (re)list.
    let mut list_failing = false;
    // Objects that cannot be read, by key; and during a (re)list, the ones
    // found so far.
    let mut unreadable: BTreeMap<Key, ConfigError> = BTreeMap::new();
    let mut unreadable_init: BTreeMap<Key, ConfigError> = BTreeMap::new();
    // The last readable version of each object, for the kinds that can be
    // unreadable (the CRDs; core kinds always decode).
    // The uid tells a recreated object from the one read before.
    let tolerant = K::MAY_BE_UNREADABLE;
    let mut last_read: BTreeMap<Key, (Option<String>, Object)> = BTreeMap::new();
    // During a (re)list: the uid of each object seen.
    let mut uids_init: BTreeMap<Key, Option<String>> = BTreeMap::new();
    let problem = |key: &Key, (field, message): (Option<String>, String)| ConfigError {
        source: source_name(kind),
        object: Some(format!("{kind} {key}")),
        field,
        message: format!(
            "this agent cannot read it ({message}); it is left out, or keeps the version read \
             last, until it is fixed or the agent is upgraded"
        ),
    };
    let url = api.resource_url().to_owned();
    let mut stream = watcher(api, config)
        .backoff(GrowingBackoff::default())
        .boxed();
    loop {
        // Not after a failed list: a list that succeeds says so (Init ..
        // InitDone), and one that hangs is no recovery.
        let next = if failing && !list_failing {
            match tokio::time::timeout(recovered_after, stream.try_next()).await {
                Ok(next) => next,
                Err(_) => {
                    // No new error for that long: the watch resumed (see
                    // `WATCH_RECOVERED_AFTER`).
                    failing = false;
                    tracing::info!("watching {kind} again");
                    let cleared = vec![Input::SourceErrors {
                        source: source_name(kind),
                        errors: unreadable.values().cloned().collect(),
                        incomplete: false,
                    }];
                    if tx.send(cleared).is_err() {
                        return;
                    }
                    continue;
                }
            }
        } else {
            stream.try_next().await
        };
        let mut inputs = Vec::new();
        let mut report = false;
        match next {
            Ok(None) => return,
            Ok(Some(ev)) => {
                // Served again (`Init` comes before every list attempt,
                // answered or not).
                if !matches!(ev, watcher::Event::Init) {
                    absent_since = None;
                }
                // A (re)list under way is no recovery yet (kube-runtime
                // says Init before it even asks): the error stays until the
                // list is done or the watch delivers, and no quiet clears it.
                if matches!(ev, watcher::Event::Init | watcher::Event::InitApply(_)) {
                    list_failing |= failing;
                } else {
                    report |= std::mem::take(&mut failing);
                    list_failing = false;
                }
                match ev {
                    watcher::Event::Init => {
                        initial.clear();
                        unreadable_init.clear();
                        uids_init.clear();
                    }
                    watcher::Event::InitApply(o) => {
                        let key = Key::of(&o);
                        if tolerant {
                            uids_init.insert(key.clone(), o.meta().uid.clone());
                        }
                        match convert(o) {
                            Ok(Some(obj)) => initial.push(obj),
                            Ok(None) => {}
                            Err(e) => {
                                let err = problem_for(&problem, &key, e);
                                unreadable_init.insert(key, err);
                            }
                        }
                    }
                    watcher::Event::InitDone => {
                        emptied = false;
                        let mut objects = std::mem::take(&mut initial);
                        // An object unreadable now that was read before
                        // keeps that version; one recreated under its name
                        // meanwhile (another uid) does not.
                        let uids = std::mem::take(&mut uids_init);
                        objects.extend(unreadable_init.keys().filter_map(|k| {
                            let (uid, o) = last_read.get(k)?;
                            (uids.get(k) == Some(uid)).then(|| o.clone())
                        }));
                        if tolerant {
                            last_read = objects
                                .iter()
                                .map(|o| {
                                    let key = o.key();
                                    (key.clone(), (uids.get(&key).cloned().flatten(), o.clone()))
                                })
                                .collect();
                        }
                        unreadable = std::mem::take(&mut unreadable_init);
                        report = true;
                        let mut updates = vec![Update::Replace(kind, objects)];
                        if !listed {
                            listed = true;
                            if gate.listed(kind) {
                                updates.push(Update::Synced);
                            }
                        }
                        inputs.push(Input::Updates(updates));
                    }
                    watcher::Event::Apply(o) => {
                        let key = Key::of(&o);
                        let uid = o.meta().uid.clone();
                        match convert(o) {
                            Ok(Some(obj)) => {
                                if tolerant {
                                    last_read.insert(key.clone(), (uid, obj.clone()));
                                }
                                report |= unreadable.remove(&key).is_some();
                                inputs.push(Input::Updates(vec![Update::Upsert(obj)]));
                            }
                            Ok(None) => {
                                last_read.remove(&key);
                                report |= unreadable.remove(&key).is_some();
                                inputs.push(Input::Updates(vec![Update::Delete(kind, key)]));
                            }
                            // The version in force (if any) stays.
                            Err(e) => {
                                let err = problem_for(&problem, &key, e);
                                unreadable.insert(key, err);
                                report = true;
                            }
                        }
                    }
                    watcher::Event::Delete(o) => {
                        let key = Key::of(&o);
                        last_read.remove(&key);
                        report |= unreadable.remove(&key).is_some();
                        inputs.push(Input::Updates(vec![Update::Delete(kind, key)]));
                    }
                }
                if report {
                    inputs.push(Input::SourceErrors {
                        source: source_name(kind),
                        errors: unreadable.values().cloned().collect(),
                        incomplete: false,
                    });
                }
            }
            // A watch that expired (410, common after an API server
            // restart): kube-runtime lists again, as it should. Nothing is
            // wrong, and nothing is reported or rebuilt for it.
            Err(watcher::Error::WatchError(s)) if s.code == 410 => {
                tracing::debug!("watching {kind}: expired ({}), listing again", s.message);
                continue;
            }
            Err(e) => {
                // Only a CRD that is not installed means "none of that kind";
                // any other failure of a first list (an overloaded or
                // unreachable API server, a missing permission) leaves the
                // kind unlisted, and the kernel's pinned state alone, until a
                // retry succeeds.
                // Not served: never installed, or its CRD deleted since (the
                // API server deletes its objects first, and the watch says
                // so). Only a list's 404 counts: a watch's (an API server
                // restarting, not serving the CRD yet) is retried from where
                // it was, and no relist would bring the objects back.
                let not_served = kind.is_optional()
                    && matches!(&e, watcher::Error::InitialListFailed(k) if is_status(k, 404));
                // Before the first list, at once (a CRD not installed must
                // not hold the agent back); after it, once it lasts.
                let since =
                    not_served.then(|| *absent_since.get_or_insert_with(std::time::Instant::now));
                let absent = since.is_some_and(|t| !listed || t.elapsed() >= absent_after);
                let hint = match &e {
                    watcher::Error::InitialListFailed(kube::Error::Api(s))
                    | watcher::Error::WatchStartFailed(kube::Error::Api(s))
                    | watcher::Error::WatchFailed(kube::Error::Api(s))
                        if s.code == 404 =>
                    {
                        format!(
                            "{kind} is not served by the API server at {url} ({e}); install its \
                             CRD, with that version served (the Gateway API's from release 1.1, \
                             which serves GRPCRoute as v1). {}",
                            if absent || emptied || !not_served {
                                "Until then Sluice treats it as empty".to_string()
                            } else {
                                format!(
                                    "Its objects read last stay in force unless it is still not \
                                     served {absent_after:?} after the first such answer"
                                )
                            }
                        )
                    }
                    watcher::Error::InitialListFailed(kube::Error::Api(s)) if s.code == 403 => {
                        format!(
                            "not allowed to list {kind} ({e}); check the agent's RBAC (ClusterRole sluice-agent)"
                        )
                    }
                    _ => format!("watching {kind}: {e}; retrying"),
                };
                tracing::warn!("{hint}");
                failing = true;
                list_failing = matches!(e, watcher::Error::InitialListFailed(_));
                let mut errors = vec![ConfigError {
                    source: source_name(kind),
                    object: None,
                    field: None,
                    message: hint,
                }];
                errors.extend(unreadable.values().cloned());
                inputs.push(Input::SourceErrors {
                    source: source_name(kind),
                    errors,
                    incomplete: false,
                });
                if absent && !emptied {
                    // None of that kind: a CRD that is not installed does not
                    // hold the whole agent back, and the objects of one
                    // deleted since are no longer in force.
                    emptied = true;
                    last_read.clear();
                    unreadable.clear();
                    let mut updates = vec![Update::Replace(kind, Vec::new())];
                    if !listed {
                        listed = true;
                        if gate.listed(kind) {
                            updates.push(Update::Synced);
                        }
                    }
                    inputs.push(Input::Updates(updates));
                }
            }
        }
        if !inputs.is_empty() && tx.send(inputs).is_err() {
            return;
        }
    }
}

/// Logs an unreadable object once, when it is found, and builds its error.
fn problem_for(
    problem: &impl Fn(&Key, (Option<String>, String)) -> ConfigError,
    key: &Key,
    e: (Option<String>, String),
) -> ConfigError {
    let err = problem(key, e);
    tracing::warn!(object = ?err.object, field = ?err.field, "{}", err.message);
    err
}

/// The watch of a CRD kind `K`, decoding its objects one by one.
fn crd_api<K>(client: &Client) -> Api<DynamicObject>
where
    K: Resource<DynamicType = ()>,
{
    Api::all_with(client.clone(), &ApiResource::erase::<K>(&()))
}

/// What every kind's watcher shares.
#[derive(Clone)]
struct Watching {
    tx: mpsc::Sender<Vec<Input>>,
    gate: Arc<SyncGate>,
    recovered_after: Duration,
    absent_after: Duration,
}

/// The Kubernetes source.
pub struct KubeSource {
    client: Client,
    recovered_after: Duration,
    absent_after: Duration,
}

/// kube-runtime's default watch backoff (0.8 s doubling to 30 s, with
/// jitter, started over once 120 s pass without a failure), without its
/// reset on every item: the watcher yields `Init` before each list attempt,
/// and `StreamBackoff` resets on any item, so a list that kept failing (a
/// CRD not installed, a missing permission, an overloaded API server) was
/// retried every second or so by every node's agent, for ever.
#[derive(Default)]
pub struct GrowingBackoff(DefaultBackoff);

impl Iterator for GrowingBackoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        self.0.next()
    }
}

impl kube::runtime::utils::Backoff for GrowingBackoff {
    /// Nothing: the time since the last failure starts it over.
    fn reset(&mut self) {}
}

/// kube-runtime retries a failed watch after at most 30 s (60 s with its
/// jitter) and says nothing when it resumes where it left off: a kind whose
/// watch has failed and then gone this long without a new error is taken
/// to be watched again, and its error is cleared.
pub const WATCH_RECOVERED_AFTER: Duration = Duration::from_secs(90);

/// Once a kind has been listed, how long its lists must keep answering 404
/// before its objects are taken out of force: API servers answer 404 for a
/// custom resource for a moment while they start (kubernetes#115241), and
/// emptying the policies then would open every target they close. A CRD
/// really deleted has its objects' deletions on the watch before that.
pub const KIND_ABSENT_AFTER: Duration = Duration::from_secs(60);

impl KubeSource {
    pub fn new(client: Client) -> Self {
        Self {
            client,
            recovered_after: WATCH_RECOVERED_AFTER,
            absent_after: KIND_ABSENT_AFTER,
        }
    }

    /// How long a kind listed before must answer 404 before it is taken as
    /// gone ([`KIND_ABSENT_AFTER`] by default).
    pub fn absent_after(mut self, d: Duration) -> Self {
        self.absent_after = d;
        self
    }

    /// How long a failed watch must go without a new error for its error to
    /// be cleared ([`WATCH_RECOVERED_AFTER`] by default).
    pub fn recovered_after(mut self, quiet: Duration) -> Self {
        self.recovered_after = quiet;
        self
    }

    /// Runs every watcher until `stop` fires or the reconciler goes away.
    pub async fn run(
        self,
        tx: mpsc::Sender<Vec<Input>>,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) {
        let ctx = Watching {
            tx: tx.clone(),
            gate: Arc::new(SyncGate::new(&Kind::ALL)),
            recovered_after: self.recovered_after,
            absent_after: self.absent_after,
        };
        let c = &self.client;
        // Lists from the API server's watch cache (`resourceVersion=0`), as
        // informers list: every node's agent lists every Pod and
        // EndpointSlice at start and on each relist, and quorum reads of
        // those from etcd by the whole fleet at once (a DaemonSet rollout)
        // load it for nothing; the watch from the list's version catches up.
        // Not paged: a list at version 0 is served whole from the cache (the
        // API server ignores a limit there, and kube leaves the version out
        // of a paged list).
        let cfg = || {
            let mut c = watcher::Config::default().any_semantic();
            c.page_size = None;
            c
        };
        let tasks = vec![
            tokio::spawn(watch_kind::<Namespace>(
                Api::all(c.clone()),
                cfg(),
                Kind::Namespace,
                |o| Ok(Some(Object::Namespace(o))),
                ctx.clone(),
            )),
            tokio::spawn(watch_kind::<Node>(
                Api::all(c.clone()),
                cfg(),
                Kind::Node,
                |o| Ok(Some(Object::Node(node_info(&o)))),
                ctx.clone(),
            )),
            // All pods, not only this node's: the proxy needs the identity
            // (service account) behind every endpoint it tunnels to.
            tokio::spawn(watch_kind::<Pod>(
                Api::all(c.clone()),
                cfg(),
                Kind::Pod,
                |o| Ok(Some(Object::Pod(workload_of(&o)))),
                ctx.clone(),
            )),
            tokio::spawn(watch_kind::<Service>(
                Api::all(c.clone()),
                cfg(),
                Kind::Service,
                |o| Ok(Some(Object::Service(o))),
                ctx.clone(),
            )),
            tokio::spawn(watch_kind::<EndpointSlice>(
                Api::all(c.clone()),
                cfg(),
                Kind::EndpointSlice,
                |o| Ok(Some(Object::EndpointSlice(o))),
                ctx.clone(),
            )),
            tokio::spawn(watch_kind::<DynamicObject>(
                crd_api::<HttpRoute>(c),
                cfg(),
                Kind::HTTPRoute,
                |o| Ok(Some(Object::HTTPRoute(decode(o)?))),
                ctx.clone(),
            )),
            tokio::spawn(watch_kind::<DynamicObject>(
                crd_api::<GrpcRoute>(c),
                cfg(),
                Kind::GRPCRoute,
                |o| Ok(Some(Object::GRPCRoute(decode(o)?))),
                ctx.clone(),
            )),
            tokio::spawn(watch_kind::<DynamicObject>(
                crd_api::<MeshPolicy>(c),
                cfg(),
                Kind::MeshPolicy,
                |o| Ok(Some(Object::MeshPolicy(decode(o)?))),
                ctx.clone(),
            )),
            tokio::spawn(watch_kind::<DynamicObject>(
                crd_api::<AccessPolicy>(c),
                cfg(),
                Kind::AccessPolicy,
                |o| Ok(Some(Object::AccessPolicy(decode(o)?))),
                ctx.clone(),
            )),
        ];
        drop(tx);
        let aborts: Vec<_> = tasks.iter().map(|t| t.abort_handle()).collect();
        // A watcher ends only when the reconciler is gone, or by a panic; then
        // its kind would no longer be followed, so the source ends (and the
        // agent's /healthz says so).
        tokio::select! {
            _ = stop.changed() => {}
            (ended, _, _) = futures::future::select_all(tasks) => {
                if let Err(e) = ended {
                    tracing::error!(error = %e, "a watcher of the Kubernetes source failed; the source stops");
                }
            }
        }
        // Each watcher holds a sender of the reconciler's inputs: they end
        // here, so that the reconciler sees its inputs close and the agent
        // can stop.
        for a in aborts {
            a.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The watcher yields `Init` before each list attempt and `StreamBackoff`
    /// resets its backoff on every item: the backoff must grow through
    /// those resets while lists keep failing (to 30 s, not 1 s for ever),
    /// and start over only once two minutes pass without a failure.
    #[tokio::test(start_paused = true)]
    async fn the_watch_backoff_grows_while_lists_keep_failing() {
        use kube::runtime::utils::Backoff as _;
        let mut b = GrowingBackoff::default();
        let mut delays = Vec::new();
        for _ in 0..8 {
            // The `Init` of the next attempt.
            b.reset();
            let d = b.next().expect("it never gives up");
            delays.push(d);
            tokio::time::advance(d).await;
        }
        assert!(delays[0] < Duration::from_secs(2), "{delays:?}");
        assert!(delays[4] >= Duration::from_millis(6_400), "{delays:?}");
        assert!(
            delays[7] >= Duration::from_secs(25) && delays[7] <= Duration::from_secs(60),
            "{delays:?}"
        );
        // Healthy for longer than two minutes: the next failure is retried
        // soon again.
        tokio::time::advance(Duration::from_secs(121)).await;
        b.reset();
        assert!(b.next().unwrap() < Duration::from_secs(2));
    }

    #[test]
    fn pods_convert_with_identity_inputs_and_state() {
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": "web-7d9f", "namespace": "shop", "uid": "0b5c7a8e-2f61-4f0e-9b7a-1d2c3e4f5a6b",
                "labels": {"app": "web"},
                "annotations": {"sluice.dev/mesh": "disabled"},
                "deletionTimestamp": "2026-01-01T00:00:00Z"
            },
            "spec": {"nodeName": "node-a", "serviceAccountName": "web", "containers": [
                {"name": "app", "ports": [
                    {"containerPort": 8080},
                    {"name": "http", "containerPort": 8081},
                    {"name": "dns", "containerPort": 53, "protocol": "UDP"}
                ]},
                {"name": "sidecar", "ports": [{"name": "http", "containerPort": 9999}]}
            ], "initContainers": [
                {"name": "proxy", "restartPolicy": "Always", "ports": [{"name": "admin", "containerPort": 15000}]},
                {"name": "setup", "ports": [{"name": "once", "containerPort": 1}]}
            ]},
            "status": {
                "phase": "Running",
                "podIP": "10.244.1.7",
                "podIPs": [{"ip": "10.244.1.7"}, {"ip": "fd00::7"}],
                "conditions": [{"type": "Ready", "status": "False"}]
            }
        }))
        .unwrap();
        let w = workload_of(&pod);
        assert_eq!(w.key(), Key::new("shop", "web-7d9f"));
        assert_eq!(w.service_account, "web");
        assert_eq!(w.node, "node-a");
        assert_eq!(w.ips.len(), 2);
        // Readiness is the EndpointSlices' to say: a flip leaves the
        // workload as it was.
        assert!(w.ready);
        assert!(w.terminating);
        assert_eq!(w.annotations["sluice.dev/mesh"], "disabled");
        // Named TCP ports, the first container's of a name winning (as the
        // EndpointSlice controller resolves a Service's named target port).
        // Sidecars (restartable init containers) too, not other init ones.
        assert_eq!(
            w.ports,
            BTreeMap::from([("admin".to_string(), 15000), ("http".to_string(), 8081)])
        );
    }

    #[test]
    fn nodes_prefer_internal_addresses() {
        let n: Node = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-a"},
            "status": {"addresses": [
                {"type": "Hostname", "address": "node-a"},
                {"type": "ExternalIP", "address": "203.0.113.4"},
                {"type": "InternalIP", "address": "192.0.2.4"}
            ]}
        }))
        .unwrap();
        assert_eq!(
            node_info(&n).addresses,
            ["192.0.2.4".parse::<std::net::IpAddr>().unwrap()]
        );
    }
}
