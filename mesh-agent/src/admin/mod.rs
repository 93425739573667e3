//! The admin API on port 15020: `/metrics` (Prometheus text), `/healthz`,
//! `/readyz`, and the JSON documents of [`api`] under `/v1/` for the CLI.

pub mod api;
mod metrics;

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex, OnceLock, Weak},
    time::Duration,
};

use axum::{
    Json, Router,
    extract::State,
    http::{StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use tokio::sync::watch;

use self::api::{
    CaStatus, Check, CheckResult, Connections, Counts, Outcome, ProxyStatus, Routes, Status,
    Workloads,
};
use crate::reconcile::{AgentView, dataplane::Dataplane, mesh::MeshView};

/// What the node proxy tells the admin API.
pub trait ProxyHandle: Send + Sync {
    /// Live connections, with identities and TLS details.
    fn connections(&self) -> Vec<api::ConnectionInfo>;
    /// Requests and 5xx errors per route (`namespace/name` of the route, or
    /// `namespace/name#default` of the Service for its default route).
    fn route_stats(&self) -> BTreeMap<String, (u64, u64)>;
    /// The proxy's metrics in Prometheus text (without `# EOF`).
    fn encode_metrics(&self, out: &mut String);
    /// Configuration the proxy could not take (a route rule left out).
    fn config_problems(&self) -> Vec<String>;
}

/// What the identity manager and CA tell the admin API.
pub trait IdentityHandle: Send + Sync {
    /// Roots in the trust bundle.
    fn roots(&self) -> Vec<api::CertSummary>;
    /// Expiry (RFC 3339) of the certificate held for a SPIFFE ID.
    fn cert_expiry(&self, spiffe_id: &str) -> Option<String>;
    /// What is wrong with that certificate, if anything: none yet, expired
    /// or about to, a renewal failing.
    fn cert_problem(&self, _spiffe_id: &str) -> Option<CertProblem> {
        None
    }
    /// Of these identities, how many hold a certificate peers accept now.
    fn certified(&self, _spiffe_ids: &std::collections::BTreeSet<String>) -> usize {
        0
    }
}

/// A workload certificate's trouble, for `sluice workloads` and `sluice check`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertProblem {
    /// Peers refuse it (expired, not yet valid) or there is none.
    pub fatal: bool,
    pub text: String,
}

/// Fixed facts the admin API reports.
#[derive(Clone, Debug, Default)]
pub struct AdminInfo {
    pub node: String,
    pub node_addresses: Vec<String>,
    pub source: String,
    pub trust_domain: String,
    /// `embedded`, `external` or `off`.
    pub proxy_mode: String,
    pub capture: Option<String>,
    /// `in-process`, `remote <url>` or `none`.
    pub ca_mode: String,
    pub bpffs: PathBuf,
    /// The kernel programs are loaded (false with `--dataplane none`).
    pub kernel: bool,
}

pub struct AdminState {
    pub info: AdminInfo,
    pub view: watch::Receiver<Arc<AgentView>>,
    pub mesh: watch::Receiver<Arc<MeshView>>,
    pub dp: Arc<dyn Dataplane>,
    pub proxy: Option<Arc<dyn ProxyHandle>>,
    pub identity: Option<Arc<dyn IdentityHandle>>,
}

impl AdminState {
    fn view(&self) -> Arc<AgentView> {
        self.view.borrow().clone()
    }

    /// The configuration's problems as `status`, `check` and the
    /// `sluice_agent_config_errors` metric all count them: the agent's
    /// refused files and objects, with its notes (documents of kinds it does
    /// not read) among them, then the node proxy's.
    fn config_errors(&self, v: &AgentView) -> Vec<api::ConfigError> {
        let mut out: Vec<api::ConfigError> = v.config_errors.clone();
        out.extend(self.proxy_config_errors());
        out
    }

    /// The node proxy's problems, as configuration errors.
    fn proxy_config_errors(&self) -> impl Iterator<Item = api::ConfigError> + '_ {
        self.proxy
            .iter()
            .flat_map(|p| p.config_problems())
            .map(|message| api::ConfigError {
                source: "node proxy".into(),
                object: None,
                field: None,
                message,
            })
    }

    /// How many of [`AdminState::config_errors`] are problems (not notes),
    /// without copying the agent's list (each status and metrics scrape).
    pub(crate) fn config_problem_count(&self, v: &AgentView) -> usize {
        let agent = v.config_errors.iter().filter(|e| !e.is_note()).count();
        agent + self.proxy_config_errors().filter(|e| !e.is_note()).count()
    }

    pub fn status(&self) -> Status {
        let v = self.view();
        Status {
            version: env!("CARGO_PKG_VERSION").into(),
            node: self.info.node.clone(),
            node_addresses: self.info.node_addresses.clone(),
            source: self.info.source.clone(),
            synced: v.synced,
            enrolled_namespaces: v.enrolled_namespaces.clone(),
            counts: Counts {
                services: v.services.len(),
                frontends: v.services.iter().map(|s| s.frontends.len()).sum(),
                ready_backends: v.services.iter().map(|s| s.ready_backends).sum(),
                local_workloads: v.workloads.iter().filter(|w| w.local).count(),
                enrolled_workloads: v.workloads.iter().filter(|w| w.captured()).count(),
                // Route objects (one on two Services has a row on each).
                routes: v
                    .routes
                    .iter()
                    .filter_map(|r| Some((r.kind.as_str(), r.route.as_deref()?)))
                    .collect::<std::collections::BTreeSet<_>>()
                    .len(),
                policies: v.policies,
                // As `sluice check` counts them: notes (documents of kinds
                // the agent does not read) are not problems.
                config_errors: self.config_problem_count(&v),
            },
            ca: CaStatus {
                mode: self.info.ca_mode.clone(),
                trust_domain: self.info.trust_domain.clone(),
                roots: self
                    .identity
                    .as_ref()
                    .map(|i| i.roots())
                    .unwrap_or_default(),
                identities: v.identities.len(),
                certified: self
                    .identity
                    .as_ref()
                    .map_or(0, |i| i.certified(&v.identities)),
            },
            proxy: ProxyStatus {
                mode: self.info.proxy_mode.clone(),
                capture: self.info.capture.clone(),
                running: self.proxy.is_some(),
            },
        }
    }

    pub fn workloads(&self) -> Workloads {
        let mut workloads = self.view().workloads.clone();
        if let Some(id) = &self.identity {
            for w in workloads.iter_mut().filter(|w| w.local && w.enrolled) {
                w.cert_expiry = id.cert_expiry(&w.identity);
                w.cert_problem = id.cert_problem(&w.identity).map(|p| p.text);
            }
        }
        Workloads { workloads }
    }

    pub fn connections(&self) -> Connections {
        match &self.proxy {
            Some(p) => Connections {
                proxy_running: true,
                connections: p.connections(),
            },
            None => Connections::default(),
        }
    }

    pub fn routes(&self) -> Routes {
        let v = self.view();
        let stats = self.proxy.as_ref().map(|p| p.route_stats());
        let mut counts: BTreeMap<String, u64> = BTreeMap::new();
        for (s, frontends) in self.kernel_frontends(&v) {
            let mut n = 0;
            for fe in frontends {
                if let Some(c) = self.dp.counters(&fe) {
                    n += c.balanced + c.redirected;
                }
            }
            counts.insert(s.key.to_string(), n);
        }
        let routes = v
            .routes
            .iter()
            .cloned()
            .map(|mut r| {
                if let Some(stats) = &stats {
                    // A Service's own row counts its default route only.
                    let key = match &r.route {
                        Some(route) => route.clone(),
                        None => format!("{}#default", r.service),
                    };
                    let (req, err) = stats.get(&key).copied().unwrap_or_default();
                    r.requests = Some(req);
                    r.errors = Some(err);
                }
                r.connections = counts.get(&r.service).copied().unwrap_or_default();
                r
            })
            .collect();
        Routes { routes }
    }

    /// The kernel's frontends of each Service of `v`, in the view's order:
    /// one listing of the kernel's services, whatever their number.
    fn kernel_frontends<'v>(
        &self,
        v: &'v AgentView,
    ) -> Vec<(&'v crate::reconcile::ServiceSummary, Vec<ebpf_lb::Frontend>)> {
        let in_kernel: std::collections::HashMap<String, ebpf_lb::Frontend> = self
            .dp
            .services()
            .into_iter()
            .map(|st| (st.frontend.to_string(), st.frontend))
            .collect();
        v.services
            .iter()
            .map(|s| {
                let fes = s
                    .frontends
                    .iter()
                    .filter_map(|f| in_kernel.get(f).copied())
                    .collect();
                (s, fes)
            })
            .collect()
    }

    pub fn check(&self) -> Check {
        let v = self.view();
        // The agent's own view of what differs from the CLI's process.
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        let mut checks = vec![
            crate::check::check_caps(&status, "the agent"),
            crate::check::check_bpffs(&self.info.bpffs),
        ];
        for c in &mut checks {
            c.name = format!("agent: {}", c.name);
        }
        checks.push(CheckResult {
            name: "agent: kernel programs".into(),
            outcome: if self.info.kernel {
                Outcome::Pass
            } else {
                Outcome::Warn
            },
            detail: if self.info.kernel {
                "loaded and attached".into()
            } else {
                "not loaded (--dataplane none): nothing is balanced or redirected".into()
            },
        });
        // Documents of kinds the agent does not read are notes, not problems.
        let config_errors = self.config_errors(&v);
        let problems = config_errors.iter().filter(|e| !e.is_note()).count();
        checks.push(CheckResult {
            name: "agent: configuration".into(),
            outcome: if problems == 0 {
                Outcome::Pass
            } else {
                Outcome::Warn
            },
            detail: if problems == 0 {
                format!("{} in sync", self.info.source)
            } else {
                format!("{problems} problem(s); the last good version of each stays in force")
            },
        });
        checks.push(CheckResult {
            name: "agent: sync".into(),
            outcome: if v.synced && !v.cleanup_pending {
                Outcome::Pass
            } else {
                Outcome::Warn
            },
            detail: if !v.synced {
                "waiting for the source's initial state".into()
            } else if !v.cleanup_pending {
                "initial state programmed".into()
            } else if v.cleanup_waits_for.is_empty() {
                "initial state programmed; removing what an earlier run left that the \
                 configuration does not name (within 2 s)"
                    .into()
            } else {
                format!(
                    "initial state programmed, but services and cgroups an earlier run left \
                     that the configuration does not name are kept until {} reads in full \
                     (a broken file may define them): fix the configuration errors below",
                    v.cleanup_waits_for.join(", ")
                )
            },
        });
        if let Some(id) = &self.identity {
            let mut problems: Vec<(bool, String)> = Vec::new();
            let mut held = 0;
            for w in v.workloads.iter().filter(|w| w.local && w.enrolled) {
                held += 1;
                if let Some(p) = id.cert_problem(&w.identity) {
                    problems.push((p.fatal, format!("{}/{}: {}", w.namespace, w.name, p.text)));
                }
            }
            problems.sort();
            problems.dedup();
            checks.push(CheckResult {
                name: "agent: certificates".into(),
                outcome: if problems.iter().any(|(fatal, _)| *fatal) {
                    Outcome::Fail
                } else if problems.is_empty() {
                    Outcome::Pass
                } else {
                    Outcome::Warn
                },
                detail: if problems.is_empty() {
                    format!("{held} enrolled workload(s) on this node hold valid certificates")
                } else {
                    problems
                        .into_iter()
                        .map(|(_, t)| t)
                        .collect::<Vec<_>>()
                        .join("; ")
                },
            });
        }
        // A limit of the node's network (a STRICT pod with no interface of
        // its own) is a warning: a gate on `sluice check` must not fail on
        // every node of such a cluster.
        checks.push(CheckResult {
            name: "agent: kernel updates".into(),
            outcome: match (v.dataplane_errors.is_empty(), v.dataplane_limits.is_empty()) {
                (true, true) => Outcome::Pass,
                (true, false) => Outcome::Warn,
                (false, _) => Outcome::Fail,
            },
            detail: if v.dataplane_errors.is_empty() && v.dataplane_limits.is_empty() {
                "all applied".into()
            } else {
                v.dataplane_errors
                    .iter()
                    .chain(&v.dataplane_limits)
                    .map(String::as_str)
                    .collect::<Vec<_>>()
                    .join("; ")
            },
        });
        Check {
            checks,
            config_errors,
        }
    }

    pub fn metrics(&self) -> String {
        let mut out = metrics::encode(self);
        if let Some(p) = &self.proxy {
            p.encode_metrics(&mut out);
        }
        out.push_str("# EOF\n");
        out
    }
}

/// Parts of the agent whose end makes it unhealthy (the reconciler thread,
/// the configuration source): each holds an [`Alive`] while it runs.
#[derive(Clone, Default)]
pub struct Health(Arc<Mutex<Vec<Watched>>>);

/// A part's name, and its token while it runs.
type Watched = (&'static str, Weak<()>);

/// Held by a running part of the agent; dropping it (the part returned or
/// panicked) turns `/healthz` red.
#[must_use = "the part counts as ended once this is dropped"]
pub struct Alive(#[allow(dead_code)] Arc<()>);

impl Health {
    /// Watches a part named `what` ("the reconciler thread").
    pub fn watch(&self, what: &'static str) -> Alive {
        let token = Arc::new(());
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((what, Arc::downgrade(&token)));
        Alive(token)
    }

    /// The watched parts that have ended.
    pub fn ended(&self) -> Vec<&'static str> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|(_, w)| w.strong_count() == 0)
            .map(|(what, _)| *what)
            .collect()
    }
}

/// How the admin API's answers begin while the agent starts (the CLI
/// recognises it).
pub const STARTING: &str = "the agent is starting:";

/// The admin API from the agent's first step: it listens before the slow
/// parts of the start (kernel programs, the CA's trust bundle, the Kubernetes
/// API), so the liveness probe passes while they wait, and `/readyz` and the
/// `/v1/` documents say what the agent is waiting for until
/// [`Admin::running`] hands over the state.
pub struct Admin {
    state: OnceLock<Arc<AdminState>>,
    phase: Mutex<String>,
    pub health: Health,
}

impl Default for Admin {
    fn default() -> Self {
        Admin {
            state: OnceLock::new(),
            phase: Mutex::new("starting".into()),
            health: Health::default(),
        }
    }
}

impl Admin {
    /// What the start is doing now ("waiting for the CA's trust bundle at …").
    pub fn set_phase(&self, phase: impl Into<String>) {
        *self.phase.lock().unwrap_or_else(|e| e.into_inner()) = phase.into();
    }

    fn phase(&self) -> String {
        self.phase.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The agent is up: every route answers from `state` from now on.
    pub fn running(&self, state: Arc<AdminState>) {
        let _ = self.state.set(state);
    }

    /// The running state, or the 503 that says what the start waits for.
    fn state(&self) -> Result<&Arc<AdminState>, Box<Response>> {
        self.state.get().ok_or_else(|| {
            Box::new(
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("{STARTING} {}\n", self.phase()),
                )
                    .into_response(),
            )
        })
    }

    fn unhealthy(&self) -> Option<String> {
        let ended = self.health.ended();
        (!ended.is_empty()).then(|| {
            format!(
                "{} ended; the agent no longer follows its configuration (its log says why)",
                ended.join(" and ")
            )
        })
    }
}

async fn healthz(State(a): State<Arc<Admin>>) -> Response {
    match a.unhealthy() {
        None => (StatusCode::OK, "ok\n").into_response(),
        Some(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("unhealthy: {why}\n"),
        )
            .into_response(),
    }
}

async fn readyz(State(a): State<Arc<Admin>>) -> Response {
    let s = match a.state() {
        Ok(s) => s,
        Err(_) => {
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: starting: {}\n", a.phase()),
            )
                .into_response();
        }
    };
    if let Some(why) = a.unhealthy() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}\n"),
        )
            .into_response();
    }
    if s.view().synced {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: waiting for the configuration source's initial state\n",
        )
            .into_response()
    }
}

async fn metrics_handler(State(a): State<Arc<Admin>>) -> Response {
    off_the_workers(a, |s| {
        (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            s.metrics(),
        )
            .into_response()
    })
    .await
}

/// A `/v1/` document from the running state.
/// The header of a `/v1/` document whose figures may be out of date: the
/// parts of the agent that have stopped (the reconciler thread, the
/// configuration source), whose last view the document still shows.
pub const STALE: &str = "sluice-stale";

async fn document<T: serde::Serialize>(
    a: Arc<Admin>,
    f: impl FnOnce(&AdminState) -> T + Send + 'static,
) -> Response {
    let ended = a.health.ended();
    let mut resp = off_the_workers(a, |s| Json(f(s)).into_response()).await;
    if !ended.is_empty()
        && let Ok(v) = http::HeaderValue::from_str(&ended.join(", "))
    {
        resp.headers_mut().insert(STALE, v);
    }
    resp
}

/// `f`'s answer from the running state, computed on a blocking thread: it
/// may read the kernel's tables, whose lock an apply holds through its RCU
/// barrier and socket resets, and the embedded proxy's requests share the
/// async workers.
async fn off_the_workers(
    a: Arc<Admin>,
    f: impl FnOnce(&AdminState) -> Response + Send + 'static,
) -> Response {
    // Two at a time: while an apply holds the tables, further requests
    // wait here (and go when their client does) instead of each taking a
    // thread of the blocking pool the rest of the agent uses.
    static BLOCKING: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(2);
    let Ok(permit) = BLOCKING.acquire().await else {
        return http::StatusCode::SERVICE_UNAVAILABLE.into_response();
    };
    tokio::task::spawn_blocking(move || {
        let _permit = permit;
        match a.state() {
            Ok(s) => f(s),
            Err(starting) => *starting,
        }
    })
    .await
    .unwrap_or_else(|e| {
        (
            http::StatusCode::INTERNAL_SERVER_ERROR,
            format!("the admin API's handler failed: {e}\n"),
        )
            .into_response()
    })
}

/// Why `sluice` cannot read the `/v1/` documents of an admin API listening
/// at `addr`, if it cannot: they answer on loopback only, and an address
/// that is neither loopback nor every address (`0.0.0.0`, `::`) takes no
/// connection from it.
pub fn unreachable_for_cli(addr: SocketAddr) -> Option<String> {
    let ip = addr.ip();
    (!ip.is_loopback() && !ip.is_unspecified()).then(|| {
        format!(
            "the admin API listens on {addr} only, where its /v1/ documents answer nobody (they \
             answer on loopback only): `sluice` cannot show anything; give --admin-addr \
             127.0.0.1:{port} or 0.0.0.0:{port}",
            port = addr.port()
        )
    })
}

/// The routes clients off the node get: probes and Prometheus scrapes. The
/// `/v1/` documents (every pod, policy and connection of the mesh) answer
/// on loopback only, to `sluice` on the node.
pub fn open_router(admin: Arc<Admin>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_handler))
        .fallback(|| async {
            (
                http::StatusCode::FORBIDDEN,
                "the admin API's /v1/ documents answer on the node's loopback only: run \
                 sluice on the node (kubectl exec into the agent) with --admin \
                 http://127.0.0.1:<port>, the agent listening there (--admin-addr 127.0.0.1 or \
                 0.0.0.0); /metrics, /healthz and /readyz answer everywhere\n",
            )
        })
        .with_state(admin)
}

/// The admin API's routes.
pub fn router(admin: Arc<Admin>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_handler))
        .route(
            "/v1/status",
            get(|State(a): State<Arc<Admin>>| document(a, AdminState::status)),
        )
        .route(
            "/v1/workloads",
            get(|State(a): State<Arc<Admin>>| document(a, AdminState::workloads)),
        )
        .route(
            "/v1/connections",
            get(|State(a): State<Arc<Admin>>| document(a, AdminState::connections)),
        )
        .route(
            "/v1/routes",
            get(|State(a): State<Arc<Admin>>| document(a, AdminState::routes)),
        )
        .route(
            "/v1/check",
            get(|State(a): State<Arc<Admin>>| async move {
                let admin = a.clone();
                document(a, move |s| {
                    let mut check = s.check();
                    let (outcome, detail) = match admin.unhealthy() {
                        None => (Outcome::Pass, "the reconciler and the source run".into()),
                        Some(why) => (Outcome::Fail, why),
                    };
                    check.checks.push(CheckResult {
                        name: "agent: health".into(),
                        outcome,
                        detail,
                    });
                    check
                })
                .await
            }),
        )
        .route(
            "/v1/mesh",
            get(|State(a): State<Arc<Admin>>| document(a, |s| (**s.mesh.borrow()).clone())),
        )
        .with_state(admin)
}

/// Errors of the admin server.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "binding the admin API to {addr}: {source}; is another agent running? (--admin-addr picks another address)"
    )]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("serving the admin API: {0}")]
    Serve(#[source] std::io::Error),
}

pub async fn bind(addr: SocketAddr) -> Result<tokio::net::TcpListener, Error> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| Error::Bind { addr, source })
}

/// Limits of the admin server. The API is for probes, scrapes and the CLI on
/// the node: a few short requests at a time.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    /// A client has this long to send a request's headers.
    pub header_read_timeout: Duration,
    /// Connections served at once; more are closed as they arrive.
    pub max_connections: usize,
    /// Further connections served for loopback peers only (the kubelet's
    /// probes and the CLI on the node), so that clients elsewhere holding
    /// every slot cannot fail the liveness probe.
    pub loopback_reserve: usize,
    /// A keep-alive connection is closed (after its request in flight) when
    /// it is this old, idle or not.
    pub max_connection_age: Duration,
    /// On stop, connections get this long to finish their request.
    pub drain: Duration,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            header_read_timeout: Duration::from_secs(10),
            max_connections: 64,
            loopback_reserve: 8,
            max_connection_age: Duration::from_secs(300),
            drain: Duration::from_secs(2),
        }
    }
}

/// Serves until `stop` fires (or its sender is gone), then gives the
/// connections `opts.drain` to finish.
pub async fn serve(
    listener: tokio::net::TcpListener,
    admin: Arc<Admin>,
    opts: ServeOptions,
    mut stop: watch::Receiver<bool>,
) {
    let (full, open) = (router(admin.clone()), open_router(admin));
    let slots = Arc::new(tokio::sync::Semaphore::new(opts.max_connections));
    let reserve = Arc::new(tokio::sync::Semaphore::new(opts.loopback_reserve));
    let conns = tokio_util::task::TaskTracker::new();
    loop {
        let (tcp, peer) = tokio::select! {
            _ = stopped(&mut stop) => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                // The peer gave up before the accept: nothing to wait for.
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionAborted => continue,
                Err(e) => {
                    // Out of file descriptors, mostly: wait, not spin.
                    tracing::warn!(error = %e, "admin API: accepting a connection");
                    tokio::select! {
                        _ = stopped(&mut stop) => break,
                        _ = tokio::time::sleep(Duration::from_millis(100)) => continue,
                    }
                }
            },
        };
        // A listener on [::] sees IPv4 probes as ::ffff:127.0.0.1.
        let loopback = peer.ip().to_canonical().is_loopback();
        let slot = slots.clone().try_acquire_owned().or_else(|_| {
            if loopback {
                reserve.clone().try_acquire_owned()
            } else {
                Err(tokio::sync::TryAcquireError::NoPermits)
            }
        });
        let Ok(slot) = slot else {
            tracing::debug!(
                %peer,
                limit = opts.max_connections,
                "admin API: connection limit reached; closing a new connection"
            );
            continue;
        };
        conns.spawn(serve_connection(
            tcp,
            if loopback { full.clone() } else { open.clone() },
            opts.clone(),
            stop.clone(),
            slot,
        ));
    }
    drop(listener);
    conns.close();
    conns.wait().await;
}

/// Returns when `stop` fires or its sender is gone.
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

async fn serve_connection(
    tcp: tokio::net::TcpStream,
    router: Router,
    opts: ServeOptions,
    mut stop: watch::Receiver<bool>,
    _slot: tokio::sync::OwnedSemaphorePermit,
) {
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(opts.header_read_timeout)
        .serve_connection(
            hyper_util::rt::TokioIo::new(tcp),
            hyper_util::service::TowerToHyperService::new(router),
        );
    let mut conn = std::pin::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => return,
        _ = stopped(&mut stop) => {}
        _ = tokio::time::sleep(opts.max_connection_age) => {}
    }
    conn.as_mut().graceful_shutdown();
    let _ = tokio::time::timeout(opts.drain, conn).await;
}

#[cfg(test)]
mod tests {
    use tokio::{
        io::{AsyncReadExt as _, AsyncWriteExt as _},
        net::TcpStream,
    };

    use super::*;
    use crate::reconcile::dataplane::MemoryDataplane;

    /// A dataplane whose `services()` waits until the test lets it go, as
    /// the kernel's tables do while an apply holds their lock.
    struct Held {
        inner: MemoryDataplane,
        entered: std::sync::mpsc::SyncSender<()>,
        release: std::sync::Mutex<std::sync::mpsc::Receiver<()>>,
    }

    impl Dataplane for Held {
        fn set_meshed_pods(
            &self,
            pods: &std::collections::BTreeSet<std::net::IpAddr>,
        ) -> Result<(), ebpf_lb::Error> {
            self.inner.set_meshed_pods(pods)
        }
        fn meshed_pods(&self) -> std::collections::BTreeSet<std::net::IpAddr> {
            self.inner.meshed_pods()
        }
        fn services(&self) -> Vec<ebpf_lb::ServiceState> {
            let _ = self.entered.try_send(());
            let _ = self.release.lock().unwrap().recv();
            self.inner.services()
        }
        fn apply(&self, c: &[ebpf_lb::Change]) -> Result<ebpf_lb::ApplyReport, ebpf_lb::Error> {
            self.inner.apply(c)
        }
        fn enroll(&self, cgroup: &std::path::Path) -> Result<u64, ebpf_lb::Error> {
            self.inner.enroll(cgroup)
        }
        fn unenroll(&self, id: u64) -> Result<(), ebpf_lb::Error> {
            self.inner.unenroll(id)
        }
        fn set_proxy(&self, t: Option<ebpf_lb::ProxyTarget>) -> Result<(), ebpf_lb::Error> {
            self.inner.set_proxy(t)
        }
        fn enrolled(&self) -> Vec<u64> {
            self.inner.enrolled()
        }
        fn counters(&self, fe: &ebpf_lb::Frontend) -> Option<ebpf_lb::ServiceCounters> {
            self.inner.counters(fe)
        }
        fn set_workload_mode(
            &self,
            ip: std::net::IpAddr,
            mode: Option<ebpf_lb::MtlsMode>,
        ) -> Result<(), ebpf_lb::Error> {
            self.inner.set_workload_mode(ip, mode)
        }
        fn guard_interface(&self, ifname: &str) -> Result<(), ebpf_lb::Error> {
            self.inner.guard_interface(ifname)
        }
        fn unguard_interface(&self, ifname: &str) -> Result<(), ebpf_lb::Error> {
            self.inner.unguard_interface(ifname)
        }
        fn workload_modes(&self) -> Vec<(std::net::IpAddr, ebpf_lb::MtlsMode)> {
            self.inner.workload_modes()
        }
        fn guarded_interfaces(&self) -> Vec<(String, u32)> {
            self.inner.guarded_interfaces()
        }
        fn interface_index(&self, ifname: &str) -> Option<u32> {
            self.inner.interface_index(ifname)
        }
        fn refusals(&self, ip: std::net::IpAddr) -> u64 {
            self.inner.refusals(ip)
        }
        fn original_destination(&self, peer: SocketAddr, local: SocketAddr) -> Option<SocketAddr> {
            self.inner.original_destination(peer, local)
        }
    }

    /// A scrape that waits for the kernel's tables (an apply holding their
    /// lock) does not hold up the async workers the embedded proxy shares:
    /// on a runtime of one thread, a probe is answered meanwhile.
    #[tokio::test(flavor = "current_thread")]
    async fn a_scrape_waiting_for_the_kernel_tables_holds_up_no_one() {
        let (entered_tx, entered) = std::sync::mpsc::sync_channel(4);
        let (release, release_rx) = std::sync::mpsc::channel();
        let state = running_state(true);
        let state = Arc::new(AdminState {
            info: AdminInfo::default(),
            view: state.view.clone(),
            mesh: state.mesh.clone(),
            dp: Arc::new(Held {
                inner: MemoryDataplane::new(),
                entered: entered_tx,
                release: std::sync::Mutex::new(release_rx),
            }),
            proxy: None,
            identity: None,
        });
        let admin = Arc::new(Admin::default());
        admin.running(state);
        let s = server(admin, ServeOptions::default()).await;
        // Lets the scrape go when told, or after 10 s on its own (then the
        // probe had to wait for it: the runtime's one thread was held).
        let (go, go_rx) = std::sync::mpsc::channel::<()>();
        let waited = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let waited2 = waited.clone();
        let watchdog = std::thread::spawn(move || {
            if go_rx.recv_timeout(Duration::from_secs(10)).is_err() {
                waited2.store(true, std::sync::atomic::Ordering::SeqCst);
            }
            let _ = release.send(());
        });
        let scrape = tokio::spawn(get(s.addr, "/metrics"));
        // The scrape is inside the kernel's tables, and stays there.
        tokio::task::spawn_blocking(move || entered.recv().unwrap())
            .await
            .unwrap();
        assert_eq!(get(s.addr, "/healthz").await.0, 200);
        assert!(
            !waited.load(std::sync::atomic::Ordering::SeqCst),
            "the probe waited for the scrape"
        );
        go.send(()).unwrap();
        assert_eq!(scrape.await.unwrap().0, 200);
        watchdog.join().unwrap();
        let _ = s.stop.send(true);
        s.done.await.unwrap();
    }

    /// A running state whose view says `synced`.
    fn running_state(synced: bool) -> Arc<AdminState> {
        state_of(AgentView {
            synced,
            ..AgentView::default()
        })
    }

    /// A running state showing `view`.
    fn state_of(view: AgentView) -> Arc<AdminState> {
        let (_, view) = watch::channel(Arc::new(view));
        let (_, mesh) = watch::channel(Arc::new(MeshView::default()));
        Arc::new(AdminState {
            info: AdminInfo::default(),
            view,
            mesh,
            dp: Arc::new(MemoryDataplane::new()),
            proxy: None,
            identity: None,
        })
    }

    /// Identities whose certificates have the problems given, by SPIFFE ID.
    struct Certs(Vec<(&'static str, CertProblem)>);

    impl IdentityHandle for Certs {
        fn roots(&self) -> Vec<api::CertSummary> {
            Vec::new()
        }
        fn cert_expiry(&self, _: &str) -> Option<String> {
            Some("2026-11-27T00:00:00Z".into())
        }
        fn cert_problem(&self, id: &str) -> Option<CertProblem> {
            self.0
                .iter()
                .find(|(i, _)| *i == id)
                .map(|(_, p)| p.clone())
        }
    }

    #[test]
    fn status_counts_configuration_problems_as_check_does() {
        let e = |message: &str| api::ConfigError {
            source: "m.yaml".into(),
            object: None,
            field: None,
            message: message.into(),
        };
        let st = state_of(AgentView {
            config_errors: vec![
                e("ignored: apps/v1 Deployment is not a kind the agent reads"),
                e("spec.ports[0].port: 0 is not a port"),
            ],
            ..AgentView::default()
        });
        let line = |check: &Check| {
            let c = check
                .checks
                .iter()
                .find(|c| c.name == "agent: configuration");
            c.unwrap().detail.clone()
        };
        assert_eq!(st.status().counts.config_errors, 1);
        assert!(
            line(&st.check()).starts_with("1 problem"),
            "{}",
            line(&st.check())
        );
        // The node proxy's problems count in all three places too.
        let mut st = Arc::try_unwrap(st).ok().unwrap();
        st.proxy = Some(Arc::new(RuleLeftOut));
        assert_eq!(st.status().counts.config_errors, 2);
        let check = st.check();
        assert!(line(&check).starts_with("2 problem"), "{}", line(&check));
        assert_eq!(check.config_errors.len(), 3, "the note listed too");
        assert!(
            st.metrics().contains("\nsluice_agent_config_errors 2\n"),
            "{}",
            st.metrics()
        );
    }

    /// A limit of the node's network (a STRICT pod behind a shared
    /// interface) warns; a kernel update that failed fails the check.
    #[test]
    fn kernel_limits_warn_and_kernel_failures_fail() {
        let outcome = |view: AgentView| {
            let c = state_of(view).check();
            let k = c
                .checks
                .into_iter()
                .find(|c| c.name == "agent: kernel updates")
                .unwrap();
            (k.outcome, k.detail)
        };
        assert_eq!(outcome(AgentView::default()).0, Outcome::Pass);
        let shared = "STRICT pods: no interface of their own to guard: cilium_host is shared";
        let (o, detail) = outcome(AgentView {
            dataplane_limits: vec![shared.into()],
            ..AgentView::default()
        });
        assert_eq!((o, detail.as_str()), (Outcome::Warn, shared));
        let (o, detail) = outcome(AgentView {
            dataplane_errors: vec!["Service shop/web: map full".into()],
            dataplane_limits: vec![shared.into()],
            ..AgentView::default()
        });
        assert_eq!(o, Outcome::Fail);
        assert!(
            detail.contains("map full") && detail.contains(shared),
            "{detail}"
        );
    }

    /// A node proxy that left a route rule out.
    struct RuleLeftOut;

    impl ProxyHandle for RuleLeftOut {
        fn connections(&self) -> Vec<api::ConnectionInfo> {
            Vec::new()
        }
        fn route_stats(&self) -> BTreeMap<String, (u64, u64)> {
            BTreeMap::new()
        }
        fn encode_metrics(&self, _: &mut String) {}
        fn config_problems(&self) -> Vec<String> {
            vec!["HTTPRoute shop/r rule 0 left out: bad regex".into()]
        }
    }

    #[test]
    fn certificate_trouble_shows_in_workloads_and_fails_the_check() {
        let workload = |name: &str, sa: &str| api::WorkloadInfo {
            namespace: "shop".into(),
            name: name.into(),
            identity: format!("spiffe://cluster.local/ns/shop/sa/{sa}"),
            local: true,
            enrolled: true,
            ..Default::default()
        };
        let view = AgentView {
            synced: true,
            workloads: vec![workload("web-0", "web"), workload("db-0", "db")],
            ..AgentView::default()
        };
        let with = |problems: Vec<(&'static str, CertProblem)>| {
            let mut st = Arc::try_unwrap(state_of(view.clone())).ok().unwrap();
            st.identity = Some(Arc::new(Certs(problems)));
            st
        };
        let outcome = |st: &AdminState| {
            st.check()
                .checks
                .into_iter()
                .find(|c| c.name == "agent: certificates")
                .unwrap()
        };
        let st = with(vec![]);
        assert_eq!(outcome(&st).outcome, Outcome::Pass);
        // A renewal failing on a valid certificate warns; an expired one fails.
        let failing = CertProblem {
            fatal: false,
            text: "renewal failing: the CA is unreachable".into(),
        };
        let st = with(vec![("spiffe://cluster.local/ns/shop/sa/web", failing)]);
        assert_eq!(outcome(&st).outcome, Outcome::Warn);
        let expired = CertProblem {
            fatal: true,
            text: "expired at 2026-11-25T00:00:00Z: the CA is unreachable".into(),
        };
        let st = with(vec![("spiffe://cluster.local/ns/shop/sa/db", expired)]);
        let c = outcome(&st);
        assert_eq!(c.outcome, Outcome::Fail);
        assert!(c.detail.contains("shop/db-0: expired"), "{}", c.detail);
        let w = st.workloads();
        let db = w.workloads.iter().find(|w| w.name == "db-0").unwrap();
        assert!(db.cert_problem.as_ref().unwrap().contains("expired"));
        let out = crate::cli::render_workloads(&w, false, None);
        assert!(
            out.contains("(!)") && out.contains("Certificate problems"),
            "{out}"
        );
    }

    struct Server {
        addr: SocketAddr,
        stop: watch::Sender<bool>,
        done: tokio::task::JoinHandle<()>,
    }

    async fn server(admin: Arc<Admin>, opts: ServeOptions) -> Server {
        server_on("127.0.0.1:0", admin, opts).await
    }

    /// A server listening on `bind_addr`; its `addr` is on 127.0.0.1.
    async fn server_on(bind_addr: &str, admin: Arc<Admin>, opts: ServeOptions) -> Server {
        let listener = bind(bind_addr.parse().unwrap()).await.unwrap();
        let addr = SocketAddr::from(([127, 0, 0, 1], listener.local_addr().unwrap().port()));
        let (stop, rx) = watch::channel(false);
        let done = tokio::spawn(serve(listener, admin, opts, rx));
        Server { addr, stop, done }
    }

    /// One GET on a new connection: (status, body).
    async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        let req = format!("GET {path} HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n");
        tcp.write_all(req.as_bytes()).await.unwrap();
        let mut out = String::new();
        tcp.read_to_string(&mut out).await.unwrap();
        let status = out[9..12].parse().unwrap();
        let body = out.split("\r\n\r\n").nth(1).unwrap_or_default().to_string();
        (status, body)
    }

    /// A kept-alive connection the server has taken (it answered a request
    /// on it).
    async fn served_connection(addr: SocketAddr) -> TcpStream {
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        tcp.write_all(b"GET /healthz HTTP/1.1\r\nhost: a\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 256];
        let n = tcp.read(&mut buf).await.unwrap();
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
        tcp
    }

    /// Waits (at most 10 s, a guard rather than a measurement) for the server
    /// to close `tcp`; true if it did.
    async fn closed_by_server(tcp: &mut TcpStream) -> bool {
        let mut buf = [0u8; 512];
        loop {
            match tokio::time::timeout(Duration::from_secs(10), tcp.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return true,
                Ok(Ok(_)) => continue,
                Err(_) => return false,
            }
        }
    }

    #[test]
    fn the_sync_check_warns_while_an_earlier_runs_leftovers_wait_for_a_broken_source() {
        let sync = |view: AgentView| {
            state_of(view)
                .check()
                .checks
                .into_iter()
                .find(|c| c.name == "agent: sync")
                .expect("a sync check")
        };
        let done = sync(AgentView {
            synced: true,
            ..AgentView::default()
        });
        assert_eq!(done.outcome, Outcome::Pass, "{}", done.detail);
        let held = sync(AgentView {
            synced: true,
            cleanup_pending: true,
            cleanup_waits_for: vec!["files:/etc/sluice".into()],
            ..AgentView::default()
        });
        assert_eq!(held.outcome, Outcome::Warn);
        assert!(
            held.detail
                .contains("until files:/etc/sluice reads in full"),
            "{}",
            held.detail
        );
        // Read in full, the clean-up due at the next tick.
        let due = sync(AgentView {
            synced: true,
            cleanup_pending: true,
            ..AgentView::default()
        });
        assert_eq!(due.outcome, Outcome::Warn);
        assert!(due.detail.contains("within 2 s"), "{}", due.detail);
    }

    #[tokio::test]
    async fn while_starting_probes_and_documents_say_what_the_agent_waits_for() {
        let admin = Arc::new(Admin::default());
        admin.set_phase("waiting for the CA's trust bundle at /etc/sluice/trust/b.pem");
        let s = server(admin.clone(), ServeOptions::default()).await;
        assert_eq!(get(s.addr, "/healthz").await.0, 200);
        let (code, body) = get(s.addr, "/readyz").await;
        assert_eq!(code, 503);
        assert!(
            body.contains("trust bundle at /etc/sluice/trust/b.pem"),
            "{body}"
        );
        for path in ["/v1/status", "/v1/routes", "/metrics"] {
            let (code, body) = get(s.addr, path).await;
            assert_eq!(code, 503, "{path}");
            assert!(
                body.contains("the agent is starting: waiting for the CA"),
                "{body}"
            );
        }

        admin.running(running_state(true));
        assert_eq!(get(s.addr, "/readyz").await, (200, "ready\n".into()));
        let (code, body) = get(s.addr, "/v1/status").await;
        assert_eq!(code, 200);
        let status: api::Status = serde_json::from_str(&body).unwrap();
        assert!(status.synced);
        let _ = s.stop.send(true);
        s.done.await.unwrap();
    }

    #[tokio::test]
    async fn clients_off_the_node_get_probes_and_metrics_only() {
        use hyper::service::Service as _;
        let admin = Arc::new(Admin::default());
        admin.running(running_state(true));
        let call = |path: &'static str| {
            let router = open_router(admin.clone());
            async move {
                let req = http::Request::get(path)
                    .body(axum::body::Body::empty())
                    .unwrap();
                let resp = hyper_util::service::TowerToHyperService::new(router)
                    .call(req)
                    .await
                    .unwrap();
                let code = resp.status().as_u16();
                let body = axum::body::to_bytes(resp.into_body(), 1 << 20)
                    .await
                    .unwrap();
                (code, String::from_utf8_lossy(&body).into_owned())
            }
        };
        for path in ["/healthz", "/readyz", "/metrics"] {
            assert_eq!(call(path).await.0, 200, "{path}");
        }
        for path in ["/v1/mesh", "/v1/workloads", "/v1/connections", "/v1/status"] {
            let (code, body) = call(path).await;
            assert_eq!(code, 403, "{path}");
            assert!(body.contains("loopback only"), "{body}");
        }
    }

    #[test]
    fn an_admin_address_sluice_cannot_reach_is_named() {
        let why = unreachable_for_cli("10.0.0.5:15020".parse().unwrap()).unwrap();
        assert!(
            why.contains("10.0.0.5:15020") && why.contains("--admin-addr 127.0.0.1:15020"),
            "{why}"
        );
        for fine in ["127.0.0.1:15020", "0.0.0.0:15020", "[::]:15020", "[::1]:1"] {
            assert_eq!(unreachable_for_cli(fine.parse().unwrap()), None, "{fine}");
        }
    }

    #[tokio::test]
    async fn a_part_that_ends_turns_health_and_readiness_red() {
        let admin = Arc::new(Admin::default());
        admin.running(running_state(true));
        let reconciler = admin.health.watch("the reconciler thread");
        let source = admin.health.watch("the configuration source");
        let s = server(admin.clone(), ServeOptions::default()).await;
        assert_eq!(get(s.addr, "/healthz").await.0, 200);
        assert_eq!(get(s.addr, "/readyz").await.0, 200);
        // The `/v1/` documents say when what they show may be out of date.
        let head = |path: &'static str| async move {
            let mut tcp = TcpStream::connect(s.addr).await.unwrap();
            let req = format!("GET {path} HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n");
            tcp.write_all(req.as_bytes()).await.unwrap();
            let mut out = String::new();
            tcp.read_to_string(&mut out).await.unwrap();
            out.split("\r\n\r\n").next().unwrap().to_ascii_lowercase()
        };
        assert!(!head("/v1/status").await.contains(STALE));

        // A thread that panics drops what it holds.
        let t = std::thread::spawn(move || {
            let _alive = reconciler;
            panic!("a bug in the reconciler");
        });
        assert!(t.join().is_err());
        let (code, body) = get(s.addr, "/healthz").await;
        assert_eq!(code, 503);
        assert!(body.contains("the reconciler thread ended"), "{body}");
        assert!(!body.contains("configuration source"), "{body}");
        let (code, body) = get(s.addr, "/readyz").await;
        assert_eq!(code, 503);
        assert!(body.contains("the reconciler thread ended"), "{body}");
        let (_, body) = get(s.addr, "/v1/check").await;
        let check: api::Check = serde_json::from_str(&body).unwrap();
        let health = check
            .checks
            .iter()
            .find(|c| c.name == "agent: health")
            .unwrap();
        assert_eq!(health.outcome, Outcome::Fail);
        assert!(
            health.detail.contains("the reconciler thread ended"),
            "{health:?}"
        );
        for path in [
            "/v1/status",
            "/v1/workloads",
            "/v1/routes",
            "/v1/connections",
        ] {
            let h = head(path).await;
            assert!(
                h.contains("sluice-stale: the reconciler thread\r\n"),
                "{path}: {h}"
            );
        }
        drop(source);
        let (_, body) = get(s.addr, "/healthz").await;
        assert!(
            body.contains("the reconciler thread and the configuration source ended"),
            "{body}"
        );
        let _ = s.stop.send(true);
        s.done.await.unwrap();
    }

    #[tokio::test]
    async fn a_client_that_never_finishes_its_headers_is_cut_off() {
        let admin = Arc::new(Admin::default());
        admin.running(running_state(true));
        let s = server(
            admin,
            ServeOptions {
                header_read_timeout: Duration::from_millis(200),
                ..ServeOptions::default()
            },
        )
        .await;
        let mut slow = TcpStream::connect(s.addr).await.unwrap();
        slow.write_all(b"GET /metrics HTTP/1.1\r\nhost: a\r\n")
            .await
            .unwrap();
        assert!(
            closed_by_server(&mut slow).await,
            "slow client still connected"
        );
        assert_eq!(get(s.addr, "/healthz").await.0, 200);
        let _ = s.stop.send(true);
        s.done.await.unwrap();
    }

    #[tokio::test]
    async fn connections_over_the_limit_are_closed_and_the_slots_come_back() {
        let admin = Arc::new(Admin::default());
        admin.running(running_state(true));
        let s = server(
            admin,
            ServeOptions {
                max_connections: 2,
                loopback_reserve: 0,
                // Far off: only the limit may close the third connection.
                header_read_timeout: Duration::from_secs(3600),
                ..ServeOptions::default()
            },
        )
        .await;
        let mut held = Vec::new();
        for _ in 0..2 {
            held.push(served_connection(s.addr).await);
        }
        let mut third = TcpStream::connect(s.addr).await.unwrap();
        assert!(
            closed_by_server(&mut third).await,
            "a third connection was kept"
        );
        drop(held.pop());
        // The slot is free once the server has seen the close.
        let mut answered = false;
        for _ in 0..200 {
            let mut tcp = TcpStream::connect(s.addr).await.unwrap();
            if tcp
                .write_all(b"GET /healthz HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n")
                .await
                .is_ok()
            {
                let mut out = Vec::new();
                let _ = tcp.read_to_end(&mut out).await;
                if out.starts_with(b"HTTP/1.1 200") {
                    answered = true;
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(answered, "no connection was served after one closed");
        let _ = s.stop.send(true);
        s.done.await.unwrap();
    }

    #[tokio::test]
    async fn loopback_clients_get_reserved_slots_when_the_others_are_taken() {
        let admin = Arc::new(Admin::default());
        admin.running(running_state(true));
        // Every client here is on loopback: with no general slot, the
        // reserve serves them, and only it. The listener is on [::], where
        // IPv4 clients show as ::ffff:127.0.0.1.
        let s = server_on(
            "[::]:0",
            admin,
            ServeOptions {
                max_connections: 0,
                loopback_reserve: 1,
                header_read_timeout: Duration::from_secs(3600),
                ..ServeOptions::default()
            },
        )
        .await;
        let _held = served_connection(s.addr).await;
        let mut second = TcpStream::connect(s.addr).await.unwrap();
        assert!(
            closed_by_server(&mut second).await,
            "served past the reserve"
        );
        let _ = s.stop.send(true);
        s.done.await.unwrap();
    }

    #[tokio::test]
    async fn stop_does_not_wait_for_a_connection_stuck_in_its_headers() {
        let admin = Arc::new(Admin::default());
        admin.running(running_state(true));
        let s = server(
            admin,
            ServeOptions {
                drain: Duration::from_millis(100),
                header_read_timeout: Duration::from_secs(3600),
                ..ServeOptions::default()
            },
        )
        .await;
        let mut stuck = TcpStream::connect(s.addr).await.unwrap();
        stuck.write_all(b"GET /metrics HTTP/1.1\r\n").await.unwrap();
        // The server has the connection once a whole request on another works.
        assert_eq!(get(s.addr, "/healthz").await.0, 200);
        let _ = s.stop.send(true);
        // The header timeout is far off; the drain (100 ms) decides.
        tokio::time::timeout(Duration::from_secs(5), s.done)
            .await
            .expect("serve() still waiting for the stuck connection")
            .unwrap();
        assert!(closed_by_server(&mut stuck).await);
    }
}
