//! The reconciler: folds source updates into the model and programs what
//! follows from them, incrementally:
//!
//! - ebpf-lb ([`lb`]): every Service's VIPs and ready endpoints, the meshed
//!   flag, enrolled pods' cgroups and the proxy address;
//! - the proxy's view ([`mesh`]), published on a watch channel;
//! - the identity manager: the SPIFFE IDs of enrolled local pods;
//! - object status (routes, policies) for the Kubernetes source to write.
//!
//! It is synchronous (ebpf-lb calls block on an RCU grace period) and runs on
//! its own thread; tests drive it directly.

pub mod dataplane;
pub mod lb;
pub mod mesh;
pub mod policies;
pub mod refs;
pub mod routes;
pub mod workloads;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use ebpf_lb::{Frontend, ProxyTarget};
use serde::Serialize;
use tokio::sync::watch;

use self::{
    dataplane::Dataplane,
    lb::{LbState, ServicePlan},
    mesh::MeshView,
    policies::StatusWrite,
    refs::RefIndex,
    routes::RouteEval,
    workloads::{Enrolled, EnrolledCgroup},
};
use crate::{
    admin::api::{ConfigError, RouteInfo, WorkloadInfo},
    cgroups::CgroupResolver,
    crds::MtlsMode,
    netdev::{InterfaceResolver, NoInterface, RouteTable},
    state::{Dirty, Key, Store, Update},
};

/// What the reconciler is told.
#[derive(Debug)]
pub enum Input {
    Updates(Vec<Update>),
    /// The current problems of one source (a file, the Kubernetes watches):
    /// replaces that source's previous list.
    SourceErrors {
        source: String,
        errors: Vec<ConfigError>,
        /// Some of the source's objects have never been read (a file broken
        /// since the agent started): what an earlier run programmed for them
        /// is not stale, so the first sync's clean-up waits.
        incomplete: bool,
    },
    /// Time passed: retry what failed (a cgroup not there yet, a full map).
    Tick,
    /// Send every status that differs from the stored one again: this agent
    /// just became the cluster's status writer.
    ResendStatus,
}

/// Fixed facts about this node and agent.
#[derive(Clone, Debug)]
pub struct Settings {
    pub node: String,
    pub node_addresses: Vec<IpAddr>,
    pub trust_domain: String,
    pub default_mode: MtlsMode,
    /// Where the kernel sends enrolled connections; None: no proxy, meshed
    /// services are balanced like the others.
    pub proxy: Option<ProxyTarget>,
    /// The proxy marks its sockets with the proxy mark, so the kernel may
    /// refuse everything else to STRICT pods. Without it, STRICT is left to
    /// the proxy (the kernel would refuse the proxy's own connections).
    pub kernel_strict: bool,
}

/// A Service as programmed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ServiceSummary {
    pub key: Key,
    /// `VIP:port/protocol`.
    pub frontends: Vec<String>,
    pub ready_backends: usize,
    pub meshed: bool,
}

/// Counters of the reconciler's work.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Stats {
    pub batches_applied: u64,
    pub changes_applied: u64,
    pub batch_failures: u64,
    pub enrolments: u64,
    pub unenrolments: u64,
    pub removed_backends: u64,
    /// Sockets the kernel reset because their backend left its service.
    pub sockets_reset: u64,
    pub status_writes: u64,
}

/// Everything the admin API shows, as of the last reconcile.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct AgentView {
    /// The source's initial state is programmed.
    pub synced: bool,
    pub enrolled_namespaces: Vec<String>,
    pub workloads: Vec<WorkloadInfo>,
    pub services: Vec<ServiceSummary>,
    pub routes: Vec<RouteInfo>,
    pub config_errors: Vec<ConfigError>,
    /// Kernel updates that failed (retried on every tick).
    pub dataplane_errors: Vec<String>,
    /// What the kernel cannot do on this node's network, by design of the
    /// network and not a failure: STRICT pods behind an interface they
    /// share (a route for a prefix, as Cilium's `cilium_host`): plaintext
    /// sent to their addresses is not refused.
    pub dataplane_limits: Vec<String>,
    /// The first sync's clean-up of what an earlier run left has not run
    /// yet: it waits for `cleanup_waits_for` to read in full, then for the
    /// next tick (so that their objects have arrived).
    pub cleanup_pending: bool,
    /// The sources whose unread objects hold it back.
    pub cleanup_waits_for: Vec<String>,
    /// SPIFFE IDs of enrolled local pods.
    pub identities: BTreeSet<String>,
    pub policies: usize,
    pub stats: Stats,
}

/// Where the reconciler's results go.
pub struct Outputs {
    pub view: watch::Sender<Arc<AgentView>>,
    pub mesh: watch::Sender<Arc<MeshView>>,
    pub identities: watch::Sender<BTreeSet<String>>,
    /// Status for the Kubernetes source to write; None for files.
    pub status: Option<policies::StatusSender>,
}

impl Outputs {
    /// Outputs with fresh channels; the receivers are returned alongside.
    pub fn channels() -> (Self, OutputReceivers) {
        let (view, view_rx) = watch::channel(Arc::new(AgentView::default()));
        let (mesh, mesh_rx) = watch::channel(Arc::new(MeshView::default()));
        let (identities, identities_rx) = watch::channel(BTreeSet::new());
        (
            Self {
                view,
                mesh,
                identities,
                status: None,
            },
            OutputReceivers {
                view: view_rx,
                mesh: mesh_rx,
                identities: identities_rx,
            },
        )
    }
}

pub struct OutputReceivers {
    pub view: watch::Receiver<Arc<AgentView>>,
    pub mesh: watch::Receiver<Arc<MeshView>>,
    pub identities: watch::Receiver<BTreeSet<String>>,
}

/// Keys of the first sync's steps among the kernel errors, retried on ticks.
const PROXY_STEP: &str = "proxy";
const STALE_SERVICES_STEP: &str = "stale services";
const STALE_CGROUP_STEP: &str = "stale cgroup ";

pub struct Reconciler {
    store: Store,
    dp: Arc<dyn Dataplane>,
    cgroups: Box<dyn CgroupResolver>,
    interfaces: Box<dyn InterfaceResolver>,
    settings: Settings,
    out: Outputs,
    synced: bool,
    lb: LbState,
    /// Config errors of Services (their last good entries stay).
    service_errors: BTreeMap<Key, Vec<crate::crds::FieldError>>,
    /// The last version of each Service the plan accepted: a refused update
    /// leaves the proxy with it, as it leaves the kernel with its entries.
    last_good: BTreeMap<Key, k8s_openapi::api::core::v1::Service>,
    /// Services whose kernel update failed: retried on tick.
    retry: BTreeMap<Key, String>,
    enrolled: Enrolled,
    /// Local enrolled pods whose cgroup could not be enrolled, and why.
    enrol_errors: BTreeMap<Key, String>,
    /// Since when each pod's cgroup has failed to enrol, by pod UID, and
    /// the UIDs of those whose failure lasted long enough to be logged and
    /// listed.
    enrol_failing_since: BTreeMap<String, (Key, std::time::Instant)>,
    enrol_reported: BTreeSet<String>,
    /// mTLS modes pushed to the kernel, by workload IP.
    modes: BTreeMap<IpAddr, ebpf_lb::MtlsMode>,
    /// Meshed pods' addresses pushed to the kernel (`None`: not yet).
    meshed_pods: Option<BTreeSet<IpAddr>>,
    /// Interfaces carrying the STRICT guard, and their pod.
    guarded: BTreeMap<String, Key>,
    /// The index each guarded interface had when guarded: a pod recreated
    /// with the same veth name has a new interface, without the guard.
    guard_index: BTreeMap<String, u32>,
    source_errors: BTreeMap<String, Vec<ConfigError>>,
    /// Sources that have not read all their objects yet.
    incomplete_sources: BTreeSet<String>,
    /// The first sync's clean-up waits for them.
    cleanup_deferred: bool,
    /// Kernel operations that failed, by what they were for; an entry goes
    /// when the same operation later succeeds.
    other_errors: BTreeMap<String, String>,
    workloads: Vec<WorkloadInfo>,
    /// Every route as translated for the proxy, as of the last mesh view.
    routes: Vec<RouteEval>,
    /// The index they were resolved against.
    refs: RefIndex,
    /// Route problems already logged.
    logged_route_problems: BTreeSet<String>,
    mesh_generation: u64,
    stats: Stats,
}

/// Every problem the agent would report with the model `inputs` describe
/// (a source's updates and its own errors), found without touching the
/// node: the Service, policy, route and annotation checks of a running
/// agent over a kernel held in memory, no pod local, PERMISSIVE the default
/// mode. `mesh-agent validate` gates manifests with it, so what it accepts
/// the agent does not refuse.
pub fn offline_problems(inputs: Vec<Input>) -> Vec<ConfigError> {
    /// No pod is local here: nothing asks for a cgroup.
    struct NoCgroups;
    impl CgroupResolver for NoCgroups {
        fn resolve(&self, _: &crate::state::Workload) -> Result<std::path::PathBuf, String> {
            Err("no cgroups offline".into())
        }
    }
    let (out, rx) = Outputs::channels();
    let settings = Settings {
        node: String::new(),
        node_addresses: Vec::new(),
        trust_domain: crate::config::DEFAULT_TRUST_DOMAIN.into(),
        default_mode: MtlsMode::Permissive,
        proxy: None,
        kernel_strict: false,
    };
    let mut r = Reconciler::new(
        Arc::new(dataplane::MemoryDataplane::new()),
        Box::new(NoCgroups),
        settings,
        out,
    );
    r.step(inputs);
    let problems = r.config_errors();
    drop(rx);
    problems
}

impl Reconciler {
    pub fn new(
        dp: Arc<dyn Dataplane>,
        cgroups: Box<dyn CgroupResolver>,
        settings: Settings,
        out: Outputs,
    ) -> Self {
        Self {
            store: Store::new(),
            dp,
            cgroups,
            interfaces: Box::new(RouteTable),
            settings,
            out,
            synced: false,
            lb: LbState::default(),
            service_errors: BTreeMap::new(),
            last_good: BTreeMap::new(),
            retry: BTreeMap::new(),
            enrolled: Enrolled::new(),
            enrol_errors: BTreeMap::new(),
            enrol_failing_since: BTreeMap::new(),
            enrol_reported: BTreeSet::new(),
            modes: BTreeMap::new(),
            meshed_pods: None,
            guarded: BTreeMap::new(),
            guard_index: BTreeMap::new(),
            source_errors: BTreeMap::new(),
            incomplete_sources: BTreeSet::new(),
            cleanup_deferred: false,
            other_errors: BTreeMap::new(),
            workloads: Vec::new(),
            routes: Vec::new(),
            refs: RefIndex::default(),
            logged_route_problems: BTreeSet::new(),
            mesh_generation: 0,
            stats: Stats::default(),
        }
    }

    /// Finds pods' host interfaces another way than from the routes.
    pub fn with_interfaces(mut self, r: Box<dyn InterfaceResolver>) -> Self {
        self.interfaces = r;
        self
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn lb(&self) -> &LbState {
        &self.lb
    }

    pub fn enrolled(&self) -> &Enrolled {
        &self.enrolled
    }

    /// Handles a batch of inputs: folds every update in, then programs once.
    pub fn step(&mut self, inputs: Vec<Input>) {
        let mut dirty = Dirty::default();
        let mut tick = false;
        let mut resend_status = false;
        for input in inputs {
            match input {
                Input::Updates(updates) => {
                    for u in updates {
                        dirty.merge(self.store.apply(u));
                    }
                }
                Input::SourceErrors {
                    source,
                    errors,
                    incomplete,
                } => {
                    // The same errors again (a watch retrying a list that
                    // keeps failing) are neither logged again nor rebuild
                    // any view.
                    let same = self
                        .source_errors
                        .get(&source)
                        .map_or(errors.is_empty(), |e| *e == errors);
                    for e in errors.iter().filter(|_| !same) {
                        if e.is_note() {
                            tracing::info!(note = %e, "configuration");
                        } else {
                            tracing::warn!(error = %e, "configuration refused; the last good version stays in force");
                        }
                    }
                    let changed_incomplete = if incomplete {
                        self.incomplete_sources.insert(source.clone())
                    } else {
                        self.incomplete_sources.remove(&source)
                    };
                    if !same {
                        if errors.is_empty() {
                            self.source_errors.remove(&source);
                        } else {
                            self.source_errors.insert(source, errors);
                        }
                    }
                    dirty.mesh |= changed_incomplete || !same;
                }
                Input::Tick => tick = true,
                Input::ResendStatus => resend_status = true,
            }
        }
        if dirty.synced && !self.synced {
            self.synced = true;
            self.first_sync(&mut dirty);
        }
        if !self.synced {
            // Leave the kernel's pinned state alone until the source has
            // said everything: it keeps balancing meanwhile.
            self.publish_view();
            return;
        }
        if tick {
            dirty.services.extend(self.retry.keys().cloned());
            // A Service refused for a ClusterIP another one held may be
            // fine now that the other moved: plan the refused ones again.
            dirty.services.extend(self.service_errors.keys().cloned());
            // Failed enrolments and kernel operations are tried again; not
            // a STRICT pod's missing interface of its own (a fact of the
            // node's routing, looked at again when pods change), which
            // would rebuild the views every 2 s on such a node; nor the
            // removal of stale services, retried on its own just below (one
            // deferred while a Service's address does not read would
            // otherwise rebuild them every tick).
            let retry = self.other_errors.keys().any(|k| {
                !k.starts_with("guard of pod ")
                    && !k.starts_with("guard shared ")
                    // A full map stays full: written again with the next
                    // change of the pods, not rebuilt every tick.
                    && k != MESHED_PODS_FULL
                    && k != STALE_SERVICES_STEP
            });
            if !self.enrol_errors.is_empty() || retry {
                dirty.workloads = true;
            }
            let errors_before = self.other_errors.clone();
            self.retry_first_sync_steps();
            if self.other_errors != errors_before {
                // What `sluice check` shows changed (a retried step went
                // through, or failed otherwise).
                self.publish_view();
            }
            if self.cleanup_deferred && self.incomplete_sources.is_empty() {
                self.cleanup_deferred = false;
                self.remove_stale_services();
                self.unenrol_stale_cgroups();
                if self.adopt_pinned_strict_state() {
                    dirty.workloads = true;
                }
                self.publish_view();
            }
        }
        if dirty.is_empty() {
            if resend_status {
                self.send_status_writes();
            }
            return;
        }
        // A Service accepted or refused now changes what the proxy is shown
        // (see `publish_mesh`), a retry's on a tick included.
        let refusals_changed = self.reconcile_services(&dirty.services);
        if dirty.workloads {
            self.reconcile_workloads();
        }
        if dirty.mesh || dirty.workloads || refusals_changed {
            self.publish_mesh();
        } else if resend_status {
            self.send_status_writes();
        }
        self.publish_view();
    }

    /// The source's initial state is in: program everything, and drop what an
    /// earlier agent left in the kernel that is no longer wanted.
    fn first_sync(&mut self, dirty: &mut Dirty) {
        self.set_proxy_address();
        dirty.services.extend(self.store.services.keys().cloned());
        dirty.workloads = true;
        dirty.mesh = true;
        let _ = self.reconcile_services(&dirty.services);
        self.remove_stale_services();
        self.adopt_pinned_strict_state();
        self.reconcile_workloads();
        self.unenrol_stale_cgroups();
        dirty.services.clear();
        dirty.workloads = false;
    }

    /// Retries, on a tick, the first sync's steps that failed: each is safe
    /// to run again at any time.
    fn retry_first_sync_steps(&mut self) {
        if self.other_errors.contains_key(PROXY_STEP) {
            self.set_proxy_address();
        }
        if self.other_errors.contains_key(STALE_SERVICES_STEP) {
            self.remove_stale_services();
        }
        if self
            .other_errors
            .keys()
            .any(|k| k.starts_with(STALE_CGROUP_STEP))
        {
            self.unenrol_stale_cgroups();
        }
    }

    fn set_proxy_address(&mut self) {
        let r = self.dp.set_proxy(self.settings.proxy);
        self.outcome(
            PROXY_STEP.into(),
            r.map_err(|e| format!("setting the proxy address: {e}")),
        );
    }

    /// Removes the kernel services an earlier run left that no Service
    /// claims now.
    fn remove_stale_services(&mut self) {
        if self.defer_cleanup() {
            return;
        }
        let wanted: BTreeSet<Frontend> = self.lb.frontends().map(|(f, _)| *f).collect();
        // A Service refused now (or whose update failed) keeps what an
        // earlier run programmed for its addresses: its last good entries.
        let mut kept: BTreeSet<std::net::IpAddr> = BTreeSet::new();
        let mut unread = None;
        for (key, spec) in self
            .service_errors
            .keys()
            .chain(self.retry.keys())
            .filter_map(|k| Some((k, self.store.services.get(k)?.spec.as_ref()?)))
        {
            for ip in spec.cluster_ips.iter().flatten().chain(&spec.cluster_ip) {
                match ip.parse() {
                    Ok(ip) => {
                        kept.insert(ip);
                    }
                    // Headless.
                    Err(_) if ip.is_empty() || ip == "None" => {}
                    Err(_) => unread = Some((key.clone(), ip.clone())),
                }
            }
        }
        // An address that does not read (a typo since the earlier run):
        // which entries were that Service's is not known, so none goes
        // until it is fixed (retried on the tick, as a failed removal).
        if let Some((key, ip)) = unread {
            self.outcome(
                STALE_SERVICES_STEP.into(),
                Err(format!(
                    "keeping the services an earlier run left that no Service claims: Service \
                     {key}'s cluster IP {ip:?} does not read, so which of them were its own is \
                     not known; they go once it is fixed"
                )),
            );
            return;
        }
        let stale: Vec<ebpf_lb::Change> = self
            .dp
            .services()
            .into_iter()
            .filter(|s| !wanted.contains(&s.frontend) && !kept.contains(&s.frontend.vip.ip()))
            .map(|s| ebpf_lb::Change::Remove(s.frontend))
            .collect();
        let r = if stale.is_empty() {
            Ok(())
        } else {
            tracing::info!(
                count = stale.len(),
                "removing services left by an earlier run"
            );
            self.dp.apply(&stale).map(drop)
        };
        self.outcome(
            STALE_SERVICES_STEP.into(),
            r.map_err(|e| format!("removing stale services: {e}")),
        );
    }

    /// Unenrols the cgroups an earlier run enrolled that no pod claims now.
    fn unenrol_stale_cgroups(&mut self) {
        if self.defer_cleanup() {
            return;
        }
        let ours: BTreeSet<u64> = self.enrolled.values().map(|e| e.id).collect();
        let kernel: BTreeSet<u64> = self.dp.enrolled().into_iter().collect();
        for &id in kernel.iter().filter(|id| !ours.contains(id)) {
            let r = self.dp.unenroll(id);
            self.outcome(
                format!("{STALE_CGROUP_STEP}{id}"),
                r.map_err(|e| format!("unenrolling stale cgroup {id}: {e}")),
            );
        }
        // Gone meanwhile (or ours again): nothing to retry.
        self.other_errors
            .retain(|k, _| match k.strip_prefix(STALE_CGROUP_STEP) {
                Some(id) => id
                    .parse()
                    .is_ok_and(|id: u64| kernel.contains(&id) && !ours.contains(&id)),
                None => true,
            });
    }

    /// Returns whether what the proxy is shown of the Services changed: one
    /// was refused or accepted that was not before (or refused for other
    /// reasons), or the kernel took or failed to take one it had not.
    fn reconcile_services(&mut self, dirty: &BTreeSet<Key>) -> bool {
        if dirty.is_empty() {
            return false;
        }
        let behind_before: BTreeSet<Key> = self.retry.keys().cloned().collect();
        let changed = self.reconcile_services_inner(dirty);
        changed || !self.retry.keys().eq(behind_before.iter())
    }

    fn reconcile_services_inner(&mut self, dirty: &BTreeSet<Key>) -> bool {
        let plan = self.lb.plan(&self.store, dirty, &self.settings.node);
        let mut changed = false;
        for key in dirty {
            if !plan.errors.contains_key(key) {
                changed |= self.service_errors.remove(key).is_some();
            }
        }
        for (key, errors) in &plan.errors {
            // Said once per new problem, not on every retry.
            if self.service_errors.get(key) != Some(errors) {
                changed = true;
                for e in errors {
                    tracing::warn!(service = %key, error = %e, "Service refused; its last good entries stay");
                }
            }
            self.service_errors.insert(key.clone(), errors.clone());
        }
        // The kernel has these as they are: the version the proxy is shown
        // while a later one is refused or not in the kernel yet.
        for key in &plan.unchanged {
            self.retry.remove(key);
            self.keep_as_last_good(key);
        }
        if plan.services.is_empty() {
            return changed;
        }
        let changes = plan.changes();
        match self.dp.apply(&changes) {
            Ok(report) => {
                self.stats.sockets_reset += report.reset.destroyed as u64;
                warn_apply_report(&report);
                for p in &plan.services {
                    self.committed(p);
                }
                self.stats.batches_applied += 1;
                self.stats.changes_applied += changes.len() as u64;
            }
            Err(e) => {
                // One bad Service must not hold the others back.
                tracing::warn!(error = %e, "batch of {} changes failed; applying per service", changes.len());
                self.stats.batch_failures += 1;
                // Those that release a frontend go first: another Service may
                // claim it in the same plan, and a Remove applied after that
                // claim would delete the new entry.
                let mut order: Vec<&lb::ServicePlan> = plan.services.iter().collect();
                order.sort_by_key(|p| {
                    !p.changes
                        .iter()
                        .any(|c| matches!(c, ebpf_lb::Change::Remove(_)))
                });
                for p in order {
                    let mut one = plan.clone();
                    one.services = vec![p.clone()];
                    match self.dp.apply(&one.changes()) {
                        Ok(report) => {
                            self.stats.sockets_reset += report.reset.destroyed as u64;
                            warn_apply_report(&report);
                            self.committed(p);
                            self.stats.batches_applied += 1;
                            self.stats.changes_applied += p.changes.len() as u64;
                        }
                        Err(e) => {
                            tracing::warn!(service = %p.service, error = %e, "kernel update failed; will retry");
                            self.stats.batch_failures += 1;
                            self.retry.insert(p.service.clone(), e.to_string());
                        }
                    }
                }
            }
        }
        changed
    }

    /// Notes the store's version of Service `key` as the one the kernel
    /// has (gone: none).
    fn keep_as_last_good(&mut self, key: &Key) {
        match self.store.services.get(key) {
            Some(s) => self.last_good.insert(key.clone(), s.clone()),
            None => self.last_good.remove(key),
        };
    }

    fn committed(&mut self, p: &ServicePlan) {
        self.lb.commit(p);
        self.retry.remove(&p.service);
        self.keep_as_last_good(&p.service);
        if !p.removed_backends.is_empty() {
            // No longer ready, or gone. ebpf-lb has reset, in `apply`, the
            // sockets connected to those gone (and, for UDP, to those not
            // ready): `sockets_reset` counts them; a not-ready TCP
            // backend keeps its connections.
            self.stats.removed_backends += p.removed_backends.len() as u64;
            tracing::debug!(service = %p.service, removed = ?p.removed_backends, "backends left the service");
        }
    }

    fn reconcile_workloads(&mut self) {
        let mut infos = workloads::workload_infos(
            &self.store,
            &self.settings.node,
            &self.settings.trust_domain,
            self.settings.default_mode,
        );
        let mut keep: BTreeSet<String> = BTreeSet::new();
        self.enrol_errors.clear();
        for info in &mut infos {
            // Another node's pods are that node's agent's to enrol.
            if !info.local || !info.enrolled {
                continue;
            }
            let key = Key::new(&info.namespace, &info.name);
            let Some(w) = self.store.pods.get(&key).cloned() else {
                continue;
            };
            match self.cgroups.resolve(&w) {
                Ok(path) => {
                    let have = self.enrolled.get(&w.uid);
                    if have.is_some_and(|h| h.path == path) {
                        keep.insert(w.uid.clone());
                    } else {
                        if let Some(old) = have.cloned() {
                            self.unenroll(&w.uid, old.id);
                        }
                        match self.dp.enroll(&path) {
                            Ok(id) => {
                                tracing::info!(pod = %key, cgroup = %path.display(), id, "enrolled");
                                self.stats.enrolments += 1;
                                self.enrolled
                                    .insert(w.uid.clone(), EnrolledCgroup { id, path });
                                keep.insert(w.uid.clone());
                            }
                            Err(e) => {
                                self.enrol_errors.insert(
                                    key.clone(),
                                    format!("enrolling cgroup {}: {e}", path.display()),
                                );
                            }
                        }
                    }
                }
                Err(e) => {
                    self.enrol_errors.insert(key.clone(), e);
                }
            }
            // Enrolled, and still (not unenrolled below for a cgroup that
            // went away).
            if keep.contains(&w.uid)
                && let Some(e) = self.enrolled.get(&w.uid)
            {
                info.cgroup = Some(e.path.display().to_string());
                info.cgroup_id = Some(e.id);
            }
            if let Some(err) = self.enrol_errors.get(&key) {
                info.reason = Some(err.clone());
            }
        }
        let gone: Vec<(String, u64)> = self
            .enrolled
            .iter()
            .filter(|(uid, _)| !keep.contains(*uid))
            .map(|(uid, e)| (uid.clone(), e.id))
            .collect();
        for (uid, id) in gone {
            self.unenroll(&uid, id);
        }
        // A local pod whose cgroup is not enrolled (not created yet, or the
        // kernel refused it) stays in the mesh for what does not need its
        // cgroup: its identity, its mTLS mode and STRICT guard (by address
        // and interface) and the proxy's inbound side, which peers on other
        // nodes use because their agents count it meshed. Only its own
        // outbound connections are not captured: the reason says so, and a
        // failure that lasts is a kernel-update problem of `sluice check`.
        // By UID: a pod recreated under its name starts afresh.
        let now = std::time::Instant::now();
        let mut failing = BTreeMap::new();
        for info in &mut infos {
            if info.local && info.enrolled && info.cgroup_id.is_none() {
                let key = Key::new(&info.namespace, &info.name);
                let since = self
                    .enrol_failing_since
                    .get(&info.uid)
                    .map_or(now, |(_, t)| *t);
                let err = info.reason.take().unwrap_or_default();
                if now.duration_since(since) >= ENROL_FAILURE_REPORTED_AFTER
                    && self.enrol_reported.insert(info.uid.clone())
                {
                    tracing::warn!(pod = %key, "its outbound connections are not captured: {err}");
                }
                info.reason = Some(format!("outbound not captured: {err}"));
                failing.insert(info.uid.clone(), (key, since));
            }
        }
        self.enrol_failing_since = failing;
        self.enrol_reported
            .retain(|uid| self.enrol_failing_since.contains_key(uid));
        self.reconcile_modes(&mut infos);
        let ids: BTreeSet<String> = infos
            .iter()
            .filter(|w| w.local && w.enrolled)
            .map(|w| w.identity.clone())
            .collect();
        self.out.identities.send_if_modified(|cur| {
            if *cur == ids {
                false
            } else {
                *cur = ids;
                true
            }
        });
        self.workloads = infos;
    }

    /// Pushes local mesh workloads' mTLS modes into the kernel and guards the
    /// interfaces of STRICT ones. Only with a proxy: a STRICT workload
    /// accepts nothing but the proxy's connections.
    fn reconcile_modes(&mut self, infos: &mut [WorkloadInfo]) {
        let mut modes: BTreeMap<IpAddr, ebpf_lb::MtlsMode> = BTreeMap::new();
        let mut guards: BTreeMap<String, Key> = BTreeMap::new();
        // The error keys of this pass's STRICT pods and interfaces.
        let mut guard_keys: BTreeSet<String> = BTreeSet::new();
        // Interfaces two STRICT pods resolved to, and those pods.
        let mut shared: BTreeMap<String, Vec<Key>> = BTreeMap::new();

        for info in infos.iter_mut() {
            // `enrolled` is still the intent here (namespace, opt-out).
            if !info.local || !info.enrolled {
                continue;
            }
            if self.settings.proxy.is_none() {
                // No mode is pushed (STRICT would refuse every connection),
                // and nothing enforces it: say so where STRICT is asked.
                if info.mtls_mode == MtlsMode::Strict {
                    info.strict_guard = Some(STRICT_WITHOUT_PROXY.into());
                }
                continue;
            }
            let key = Key::new(&info.namespace, &info.name);
            let mode = match info.mtls_mode {
                MtlsMode::Strict if !self.settings.kernel_strict => {
                    info.strict_guard = Some(
                        "not enforced: no node proxy marks its sockets, so the kernel cannot \
                         tell its connections from plaintext; plaintext sent to the pod's \
                         address is not refused"
                            .into(),
                    );
                    ebpf_lb::MtlsMode::Permissive
                }
                MtlsMode::Strict => ebpf_lb::MtlsMode::Strict,
                MtlsMode::Permissive => ebpf_lb::MtlsMode::Permissive,
                MtlsMode::Disabled => ebpf_lb::MtlsMode::Disabled,
            };
            let ips: Vec<IpAddr> = info.ips.iter().filter_map(|ip| ip.parse().ok()).collect();
            for ip in &ips {
                modes.insert(*ip, mode);
            }
            if mode != ebpf_lb::MtlsMode::Strict {
                continue;
            }
            let known = self.store.pods.get(&key).and_then(|w| w.interface.clone());
            let iface = match (known, ips.first()) {
                (Some(i), _) => Ok(i),
                (None, Some(ip)) => self.interfaces.interface(*ip),
                (None, None) => Err(NoInterface::NoRoute("the pod has no IP yet".into())),
            };
            // Not finding the interface (the pod is starting) is a kernel
            // problem until it is found; an interface that is not the pod's
            // own (a prefix route, a bridge) a limit of the network, shown
            // apart (`sluice check` warns).
            let find = format!("guard of pod {key}");
            let limit = format!("{GUARD_SHARED}pod {key}");
            guard_keys.extend([find.clone(), limit.clone()]);
            let (missing, not_its_own) = match iface {
                Ok(i) => {
                    info.strict_guard = Some(format!("guarded on {i}"));
                    if let Some(other) = guards.insert(i.clone(), key.clone()) {
                        shared
                            .entry(i)
                            .or_insert_with(|| vec![other])
                            .push(key.clone());
                    }
                    (Ok(()), Ok(()))
                }
                Err(e) => {
                    info.strict_guard = Some(format!(
                        "not enforced in the kernel: {e}; plaintext sent to the pod is not refused"
                    ));
                    let err = Err(format!("STRICT pod {key}: no interface to guard: {e}"));
                    match e {
                        NoInterface::NotItsOwn(_) => (Ok(()), err),
                        NoInterface::NoRoute(_) => (err, Ok(())),
                    }
                }
            };
            self.outcome(find, missing);
            self.outcome(limit, not_its_own);
        }
        // An interface several pods are reached through (a route for a
        // whole prefix: Cilium's cilium_host, an overlay or gateway port) is
        // no pod's own: traffic may reach the pods past it (Cilium
        // redirects in BPF), so a guard there would be reported while it
        // does not hold. Such pods are left unguarded, and said so: plaintext
        // sent to their addresses reaches them (callers in the mesh still
        // come through the tunnel).
        for (iface, pods) in &shared {
            guards.remove(iface);
            let names: Vec<String> = pods.iter().map(ToString::to_string).collect();
            let why = format!(
                "{iface} is shared by pods {} (routed for a prefix, not a veth per pod)",
                names.join(", ")
            );
            for info in infos.iter_mut() {
                if pods
                    .iter()
                    .any(|k| k.name == info.name && k.namespace == info.namespace)
                {
                    info.strict_guard = Some(format!(
                        "not enforced in the kernel: {why}; plaintext sent to the pod is not refused"
                    ));
                }
            }
            let what = format!("{GUARD_SHARED}{iface}");
            guard_keys.insert(what.clone());
            self.outcome(
                what,
                Err(format!("STRICT pods: no interface of their own to guard: {why}; plaintext sent to their addresses is not refused (a route per pod, as Cilium's endpointRoutes.enabled=true, lets the kernel guard them)")),
            );
        }
        for (ip, mode) in &modes {
            if self.modes.get(ip) != Some(mode) {
                let r = self.dp.set_workload_mode(*ip, Some(*mode));
                if r.is_ok() {
                    self.modes.insert(*ip, *mode);
                }
                self.outcome(
                    format!("mode {ip}"),
                    r.map_err(|e| format!("setting the mTLS mode of {ip}: {e}")),
                );
            }
        }
        let gone: Vec<IpAddr> = self
            .modes
            .keys()
            .filter(|ip| !modes.contains_key(ip))
            .copied()
            .collect();
        for ip in gone {
            let r = self.dp.set_workload_mode(ip, None);
            if r.is_ok() {
                self.modes.remove(&ip);
            }
            self.outcome(
                format!("mode {ip}"),
                r.map_err(|e| format!("clearing the mTLS mode of {ip}: {e}")),
            );
        }
        // A mode that never reached the kernel and is not wanted any more
        // (its pod is gone) is no error any more.
        let known = &self.modes;
        self.other_errors.retain(|what, _| {
            match what
                .strip_prefix("mode ")
                .and_then(|ip| ip.parse::<IpAddr>().ok())
            {
                Some(ip) => modes.contains_key(&ip) || known.contains_key(&ip),
                None => true,
            }
        });
        for (iface, key) in &guards {
            guard_keys.insert(format!("guard {iface}"));
            let index = self.dp.interface_index(iface);
            if !self.guarded.contains_key(iface) || self.guard_index.get(iface) != index.as_ref() {
                let r = self.dp.guard_interface(iface);
                match &r {
                    Ok(()) => {
                        tracing::info!(pod = %key, interface = %iface, "STRICT guard attached");
                        self.guarded.insert(iface.clone(), key.clone());
                        if let Some(i) = index {
                            self.guard_index.insert(iface.clone(), i);
                        }
                    }
                    Err(e) => {
                        for info in infos
                            .iter_mut()
                            .filter(|i| i.name == key.name && i.namespace == key.namespace)
                        {
                            info.strict_guard = Some(format!(
                                "not enforced in the kernel: {e}; plaintext sent to the pod is not refused"
                            ));
                        }
                    }
                }
                self.outcome(
                    format!("guard {iface}"),
                    r.map_err(|e| format!("guarding {iface} of STRICT pod {key}: {e}")),
                );
            }
        }
        // Guard problems of pods no longer STRICT here are no errors either.
        self.other_errors
            .retain(|what, _| !what.starts_with("guard ") || guard_keys.contains(what));
        let stale: Vec<String> = self
            .guarded
            .keys()
            .filter(|i| !guards.contains_key(*i))
            .cloned()
            .collect();
        for iface in stale {
            // The interface may be gone with its pod: then so is the link.
            if let Err(e) = self.dp.unguard_interface(&iface) {
                tracing::debug!(interface = %iface, error = %e, "unguarding");
            }
            self.guarded.remove(&iface);
            self.guard_index.remove(&iface);
        }
    }

    /// Records how a kernel operation for `what` went: a failure is kept
    /// (and logged when new) until the same operation succeeds.
    /// Whether the first sync's clean-up must wait (a source has objects
    /// not read yet); it then runs on the first tick after they are read.
    /// Not a kernel error: the broken file is reported as a configuration
    /// problem already.
    /// Takes in the mTLS modes and interface guards an earlier agent left
    /// pinned, so that the next workload pass clears those of pods that are
    /// gone or left the mesh (or STRICT) meanwhile, and attaches this
    /// agent's program to wanted guards. Not while a source has objects not
    /// read yet (a broken file may name those pods: STRICT would fail open);
    /// then they stay until it reads in full. Says whether it took them.
    fn adopt_pinned_strict_state(&mut self) -> bool {
        if self.defer_cleanup() {
            return false;
        }
        for (ip, mode) in self.dp.workload_modes() {
            self.modes.entry(ip).or_insert(mode);
        }
        for (iface, _) in self.dp.guarded_interfaces() {
            self.guarded
                .entry(iface)
                .or_insert_with(|| Key::new("", "(an earlier agent's)"));
        }
        true
    }

    fn defer_cleanup(&mut self) -> bool {
        if self.incomplete_sources.is_empty() {
            return false;
        }
        if !self.cleanup_deferred {
            let names: Vec<&str> = self.incomplete_sources.iter().map(String::as_str).collect();
            tracing::warn!(
                "keeping the services, cgroups and STRICT modes an earlier run left that the \
                 configuration does not name, because {} has objects not read yet (a broken \
                 file may define them); they go once it reads in full",
                names.join(", ")
            );
        }
        self.cleanup_deferred = true;
        true
    }

    fn outcome(&mut self, what: String, r: Result<(), String>) {
        match r {
            Ok(()) => {
                self.other_errors.remove(&what);
            }
            Err(e) => {
                if self.other_errors.get(&what) != Some(&e) {
                    tracing::warn!("{e}");
                }
                self.other_errors.insert(what, e);
            }
        }
    }

    fn unenroll(&mut self, uid: &str, id: u64) {
        let r = self.dp.unenroll(id);
        if r.is_ok() {
            tracing::info!(uid, id, "unenrolled");
            self.stats.unenrolments += 1;
            self.enrolled.remove(uid);
        }
        self.outcome(
            format!("cgroup {id}"),
            r.map_err(|e| format!("unenrolling cgroup {id} of pod {uid}: {e}")),
        );
    }

    fn publish_mesh(&mut self) {
        self.mesh_generation += 1;
        // Refused Services are shown to the proxy as last accepted, and one
        // refused from the start without its ClusterIPs: the kernel does not
        // have them, so neither may the proxy (it would take another
        // Service's ClusterIP there, say, and send that Service's callers to
        // its pods). So are
        // those the kernel did not take yet (a full map): the kernel still
        // sends enrolled callers of the old ClusterIP to the proxy, which
        // must still know it.
        let patched;
        let behind = || self.service_errors.keys().chain(self.retry.keys());
        let store = if behind()
            .any(|k| self.store.services.contains_key(k) || self.last_good.contains_key(k))
        {
            let mut s = self.store.clone();
            for key in behind() {
                match self.last_good.get(key) {
                    Some(good) => {
                        s.services.insert(key.clone(), good.clone());
                    }
                    // Never in the kernel: no ClusterIP for the proxy either,
                    // but the Service stays, so that an AccessPolicy naming
                    // it still governs its pods (without it they had none,
                    // and every caller was let in).
                    None => {
                        if let Some(spec) =
                            s.services.get_mut(key).and_then(|svc| svc.spec.as_mut())
                        {
                            spec.cluster_ip = None;
                            spec.cluster_ips = None;
                        }
                    }
                }
            }
            patched = s;
            &patched
        } else {
            &self.store
        };
        let (view, evals) = mesh::mesh_view_and_routes(
            store,
            &self.settings.node,
            &self.settings.trust_domain,
            self.workloads.clone(),
            self.mesh_generation,
        );
        self.refs = view.refs.clone();
        // Enrolled pods' connections straight to these pods' addresses go
        // to the proxy, which carries them through the tunnel.
        // Not before the sources have said everything, and only added to
        // while one is not read in full (a file broken since the start): a
        // partial view would take out pods the pinned map has, whose
        // enrolled callers would then reach them in plaintext (refused by
        // a STRICT pod).
        let mut pods = view.tunnelled_pod_ips();
        if !self.incomplete_sources.is_empty() {
            pods.extend(self.dp.meshed_pods());
        }
        if self.synced && self.meshed_pods.as_ref() != Some(&pods) {
            let r = self.dp.set_meshed_pods(&pods);
            if r.is_ok() {
                self.meshed_pods = Some(pods);
            }
            // A full map stays full: written again with the next change of
            // the pods, not on every tick as other failures are.
            let full = matches!(r, Err(ebpf_lb::Error::MapFull { .. }));
            let (this, other) = if full {
                (MESHED_PODS_FULL, MESHED_PODS_STEP)
            } else {
                (MESHED_PODS_STEP, MESHED_PODS_FULL)
            };
            self.other_errors.remove(other);
            self.outcome(
                this.into(),
                r.map_err(|e| format!("writing the meshed pods' addresses: {e}")),
            );
        }
        self.out.mesh.send_replace(Arc::new(view));
        // The same translation as the proxy's: the store's routes are those
        // of the view's store (only refused Services are patched there).
        self.routes = evals;
        self.log_route_problems();
        self.send_status_writes();
    }

    /// Sends the status writer every route and policy status that differs
    /// from the stored one.
    fn send_status_writes(&mut self) {
        if let Some(status) = &self.out.status {
            let mut writes =
                policies::policy_status_writes(&self.store, self.settings.default_mode);
            for r in &self.routes {
                if let Some(parents) = routes::route_status_parents(&self.refs, r) {
                    writes.push(StatusWrite {
                        kind: r.kind(),
                        key: r.route.key.clone(),
                        status: serde_json::json!({ "parents": parents }),
                    });
                }
            }
            for w in writes {
                self.stats.status_writes += 1;
                let _ = status.send(w);
            }
        }
    }

    /// What the routes' conditions say is wrong, one line per problem.
    fn route_problems(&self) -> Vec<ConfigError> {
        let mut out = Vec::new();
        for r in &self.routes {
            for p in r.route.service_parents() {
                for c in routes::parent_conditions(&self.refs, r, p) {
                    // PartiallyInvalid is only ever set True, and is bad
                    // news; so is a route on a Service outside the mesh.
                    let idle = c.type_ == "Accepted"
                        && c.status
                        && self
                            .refs
                            .outside_mesh
                            .contains(&p.service_key(&r.route.key.namespace).namespace);
                    if !c.status || c.type_ == "PartiallyInvalid" || idle {
                        out.push(ConfigError {
                            source: "model".into(),
                            object: Some(format!("{} {}", r.route.kind, r.route.key)),
                            field: None,
                            message: format!(
                                "{} is {} ({}): {}",
                                c.type_,
                                if c.status { "True" } else { "False" },
                                c.reason,
                                c.message
                            ),
                        });
                    }
                }
            }
        }
        out.sort();
        out.dedup();
        out
    }

    /// Logs route problems once, when they appear (standalone, the log and
    /// `sluice check` are where they are seen).
    fn log_route_problems(&mut self) {
        let now: BTreeSet<String> = self
            .route_problems()
            .iter()
            .map(ToString::to_string)
            .collect();
        for p in now.difference(&self.logged_route_problems) {
            tracing::warn!("route: {p}");
        }
        self.logged_route_problems = now;
    }

    /// Config errors of every kind, sorted.
    pub fn config_errors(&self) -> Vec<ConfigError> {
        let mut out: Vec<ConfigError> = self.source_errors.values().flatten().cloned().collect();
        for (key, errors) in &self.service_errors {
            for e in errors {
                out.push(ConfigError {
                    source: "model".into(),
                    object: Some(format!("Service {key}")),
                    field: Some(e.field.clone()),
                    message: e.message.clone(),
                });
            }
        }
        for r in self.store.rejected.values() {
            for e in &r.errors {
                out.push(ConfigError {
                    source: "model".into(),
                    object: Some(format!("{} {}", r.kind, r.key)),
                    field: Some(e.field.clone()),
                    message: e.message.clone(),
                });
            }
        }
        out.extend(self.route_problems());
        out.extend(annotation_problems(&self.store));
        for (key, p) in &self.store.mesh_policies {
            if self
                .store
                .rejected
                .contains_key(&(crate::state::Kind::MeshPolicy, key.clone()))
            {
                continue;
            }
            // Its mode taken from pods by another policy: a STRICT one then
            // lets plaintext in where its author meant it refused.
            let taken = policies::mesh_policy_shadowed(&self.store, key)
                .map(|why| (true, why))
                .or_else(|| policies::mesh_policy_overridden(&self.store, key));
            if policies::mesh_policy_idle(&self.store, &key.namespace).is_none()
                && let Some((all, why)) = taken
            {
                let strict = p.spec.mode == MtlsMode::Strict;
                out.push(ConfigError {
                    source: "model".into(),
                    object: Some(format!("MeshPolicy {key}")),
                    field: None,
                    message: match (strict, all) {
                        (true, true) => format!("not in force: {why}: plaintext is not refused"),
                        (true, false) => {
                            format!("{why}: plaintext to those pods is not refused")
                        }
                        (false, _) => format!("note: {why}"),
                    },
                });
            }
            if let Some(why) = policies::mesh_policy_idle(&self.store, &key.namespace) {
                // A STRICT policy that refuses nothing is a problem; another
                // mode changes what no mesh does anyway.
                let strict = p.spec.mode == MtlsMode::Strict;
                out.push(ConfigError {
                    source: "model".into(),
                    object: Some(format!("MeshPolicy {key}")),
                    field: None,
                    message: if strict {
                        format!("{why}: plaintext is not refused")
                    } else {
                        format!("note: {why}")
                    },
                });
            }
        }
        for (key, p) in &self.store.access_policies {
            for message in policies::missing_targets(&self.store, key, p) {
                out.push(ConfigError {
                    source: "model".into(),
                    object: Some(format!("AccessPolicy {key}")),
                    field: None,
                    message: format!("{message}: the policy protects nothing there"),
                });
            }
            for u in policies::ungoverned_pods(&self.store, key, p) {
                out.push(ConfigError {
                    source: "model".into(),
                    object: Some(format!("AccessPolicy {key}")),
                    field: None,
                    message: u.detail(),
                });
            }
            // Pods no proxy polices are a problem; PERMISSIVE ones, the
            // mode's own trade, a note.
            let mode = self.settings.default_mode;
            for b in policies::bypassed_pods(&self.store, key, p, mode) {
                out.push(ConfigError {
                    source: "model".into(),
                    object: Some(format!("AccessPolicy {key}")),
                    field: None,
                    message: match b.how {
                        policies::Bypass::Unpoliced => b.detail(),
                        policies::Bypass::Plaintext => format!("note: {}", b.detail()),
                    },
                });
            }
        }
        out.sort();
        out.dedup();
        out
    }

    fn route_infos(&self) -> Vec<RouteInfo> {
        // The routes' Service parents by Service, found once: for each
        // Service, every route's parents were scanned (with a key made for
        // each), services x routes on every step in a large cluster.
        let mut parents: BTreeMap<Key, Vec<(&routes::RouteEval, &routes::ParentRef)>> =
            BTreeMap::new();
        for eval in &self.routes {
            let r = &eval.route;
            for p in r.service_parents() {
                parents
                    .entry(p.service_key(&r.key.namespace))
                    .or_default()
                    .push((eval, p));
            }
        }
        let mut out: Vec<RouteInfo> = Vec::new();
        // Services, and parents that name no Service (a typo): those routes
        // have a row too, saying why they are not in force.
        let keys: BTreeSet<&Key> = self.store.services.keys().chain(parents.keys()).collect();
        for key in keys {
            let service = key.to_string();
            let mut any = false;
            for &(eval, p) in parents.get(key).into_iter().flatten() {
                let r = &eval.route;
                any = true;
                let conds = routes::parent_conditions(&self.refs, eval, p);
                // On a Service outside the mesh, the Accepted message says
                // the route applies to nothing.
                let reason = conds
                    .iter()
                    .find(|c| !c.status || c.type_ == "PartiallyInvalid")
                    .or_else(|| {
                        self.refs
                            .outside_mesh
                            .contains(&key.namespace)
                            .then_some(&conds[0])
                    })
                    .map(|c| format!("{}: {}", c.reason, c.message));
                // One row per route and Service: a route naming the Service
                // twice (two of its ports) is in force as far as both say.
                let route = Some(r.key.to_string());
                if let Some(row) = out
                    .iter_mut()
                    .rev()
                    .take_while(|x| x.service == service)
                    .find(|x| x.route == route && x.kind == r.kind)
                {
                    row.accepted &= conds[0].status;
                    row.resolved_refs &= conds[1].status;
                    if row.reason.is_none() {
                        row.reason = reason;
                    }
                    continue;
                }
                out.push(RouteInfo {
                    service: service.clone(),
                    kind: r.kind.into(),
                    route,
                    rules: r.rules,
                    backends: r
                        .backends
                        .iter()
                        .map(|b| {
                            let port = b.port.map(|p| format!(":{p}")).unwrap_or_default();
                            match b.weight {
                                Some(w) => format!("{}{port} (w={w})", b.name),
                                None => format!("{}{port}", b.name),
                            }
                        })
                        .collect(),
                    accepted: conds[0].status,
                    resolved_refs: conds[1].status,
                    reason,
                    ..Default::default()
                });
            }
            if !any {
                out.push(RouteInfo {
                    service: key.to_string(),
                    kind: "Service".into(),
                    accepted: true,
                    resolved_refs: true,
                    ..Default::default()
                });
            }
        }
        out
    }

    fn publish_view(&mut self) {
        let services = self
            .lb
            .applied()
            .iter()
            .map(|(key, specs)| {
                let ready: BTreeSet<SocketAddr> = specs
                    .iter()
                    .flat_map(|s| s.backends.iter())
                    .filter(|b| b.state == ebpf_lb::BackendState::Ready)
                    .map(|b| b.addr)
                    .collect();
                ServiceSummary {
                    key: key.clone(),
                    frontends: specs.iter().map(|s| s.frontend.to_string()).collect(),
                    ready_backends: ready.len(),
                    meshed: specs.iter().any(|s| s.meshed),
                }
            })
            .collect();
        let mut dataplane_errors: Vec<String> = self
            .retry
            .iter()
            .map(|(k, e)| format!("Service {k}: {e}"))
            .collect();
        let (limits, errors): (Vec<_>, Vec<_>) = self
            .other_errors
            .iter()
            .partition(|(what, _)| what.starts_with(GUARD_SHARED));
        dataplane_errors.extend(errors.into_iter().map(|(_, e)| e.clone()));
        let dataplane_limits = limits.into_iter().map(|(_, e)| e.clone()).collect();
        dataplane_errors.extend(self.enrol_reported.iter().filter_map(|uid| {
            let (k, _) = self.enrol_failing_since.get(uid)?;
            let e = self.enrol_errors.get(k)?;
            Some(format!(
                "pod {k}: its outbound connections are not captured: {e}"
            ))
        }));
        let view = AgentView {
            synced: self.synced,
            enrolled_namespaces: workloads::enrolled_namespaces(&self.store),
            workloads: self.workloads.clone(),
            services,
            routes: self.route_infos(),
            config_errors: self.config_errors(),
            dataplane_errors,
            dataplane_limits,
            cleanup_pending: self.cleanup_deferred,
            cleanup_waits_for: if self.cleanup_deferred {
                self.incomplete_sources.iter().cloned().collect()
            } else {
                Vec::new()
            },
            identities: self.out.identities.borrow().clone(),
            policies: self.store.mesh_policies.len() + self.store.access_policies.len(),
            stats: self.stats.clone(),
        };
        self.out.view.send_if_modified(|cur| {
            if **cur == view {
                false
            } else {
                *cur = Arc::new(view);
                true
            }
        });
    }
}

/// A pod's cgroup failing to enrol for this long (past a pod's start, when
/// its containers' cgroups appear) is logged and listed by `sluice check`.
const ENROL_FAILURE_REPORTED_AFTER: std::time::Duration = std::time::Duration::from_secs(30);

/// The key prefix of a shared interface's entry among the kernel errors:
/// a limit of the node's network, shown apart ([`AgentView::dataplane_limits`]).
const GUARD_SHARED: &str = "guard shared ";

/// A STRICT pod's `strict_guard` when no node proxy runs: nothing enforces
/// its mode.
/// The error keys of writing the meshed pods' addresses: a failure retried
/// on ticks, and a full map, written again only when the pods change.
const MESHED_PODS_STEP: &str = "meshed pods";
const MESHED_PODS_FULL: &str = "meshed pods (map full)";

pub(crate) const STRICT_WITHOUT_PROXY: &str = "not enforced: no node proxy runs (--proxy off)";

/// Sockets pinned to removed backends that could not be reset stay until
/// their next send fails: say where, since the update itself went through.
fn warn_apply_report(r: &ebpf_lb::ApplyReport) {
    for f in &r.reset.failed {
        tracing::warn!("sockets to removed backends not reset in {f}");
    }
    if r.stuck_members > 0 {
        tracing::warn!(
            stuck = r.stuck_members,
            "departed backends' session-affinity entries could not be removed from the kernel \
             (tried again with every update); until then affinity may still pick them"
        );
    }
    if let Some(why) = &r.kept_slots {
        tracing::warn!(
            "kernel update applied, but its replaced backend slots stay allocated until the \
             agent restarts: waiting for programs still reading them failed ({why})"
        );
    }
}

#[cfg(test)]
mod tests;

/// `sluice.dev/mesh` values the agent does not read: a Namespace annotated
/// `Enabled` or `true` stays out of the mesh, a Pod annotated `false` stays
/// in it, so each is reported with the values that work.
fn annotation_problems(store: &Store) -> Vec<ConfigError> {
    use crate::config::{MESH_ANNOTATION, MESH_DISABLED, MESH_ENABLED};
    let problem = |object: String, value: &str, meaning: &str| ConfigError {
        source: "model".into(),
        object: Some(object),
        field: Some(format!("metadata.annotations[{MESH_ANNOTATION}]")),
        message: format!(
            "{value:?} is not a value Sluice reads ({meaning}); use {MESH_ENABLED:?} or \
             {MESH_DISABLED:?}"
        ),
    };
    let mut out = Vec::new();
    for (name, ns) in &store.namespaces {
        if let Some(v) = ns
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(MESH_ANNOTATION))
            && v != MESH_ENABLED
            && v != MESH_DISABLED
        {
            out.push(problem(
                format!("Namespace {name}"),
                v,
                "the namespace is not enrolled",
            ));
        }
    }
    for (key, pod) in &store.pods {
        if let Some(v) = pod.annotations.get(MESH_ANNOTATION)
            && v != MESH_ENABLED
            && v != MESH_DISABLED
        {
            out.push(problem(
                format!("Pod {key}"),
                v,
                "the pod follows its namespace",
            ));
        }
    }
    out
}
