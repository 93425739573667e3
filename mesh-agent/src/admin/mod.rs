//! The admin API on port 15020: `/metrics` (Prometheus text), `/healthz`,
//! `/readyz`, and the JSON documents of [`api`] under `/v1/` for the CLI.

pub mod api;
mod metrics;

use std::{collections::BTreeMap, net::SocketAddr, path::PathBuf, sync::Arc};

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
    /// of the Service for traffic no route matched).
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
                enrolled_workloads: v.workloads.iter().filter(|w| w.local && w.enrolled).count(),
                routes: v.routes.iter().filter(|r| r.route.is_some()).count(),
                policies: v.policies,
                config_errors: v.config_errors.len(),
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
        for s in &v.services {
            let mut n = 0;
            for fe in self.dp_frontends(&s.key.to_string()) {
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
                    let owner = r.route.as_ref().unwrap_or(&r.service);
                    let (req, err) = stats.get(owner).copied().unwrap_or_default();
                    r.requests = Some(req);
                    r.errors = Some(err);
                }
                r.connections = counts.get(&r.service).copied().unwrap_or_default();
                r
            })
            .collect();
        Routes { routes }
    }

    fn dp_frontends(&self, service: &str) -> Vec<ebpf_lb::Frontend> {
        let v = self.view();
        let Some(s) = v.services.iter().find(|s| s.key.to_string() == service) else {
            return Vec::new();
        };
        let wanted: Vec<&String> = s.frontends.iter().collect();
        self.dp
            .services()
            .into_iter()
            .map(|st| st.frontend)
            .filter(|f| wanted.contains(&&f.to_string()))
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
        checks.push(CheckResult {
            name: "agent: configuration".into(),
            outcome: if v.config_errors.is_empty() {
                Outcome::Pass
            } else {
                Outcome::Warn
            },
            detail: if v.config_errors.is_empty() {
                format!("{} in sync", self.info.source)
            } else {
                format!(
                    "{} problem(s); the last good version of each stays in force",
                    v.config_errors.len()
                )
            },
        });
        checks.push(CheckResult {
            name: "agent: sync".into(),
            outcome: if v.synced {
                Outcome::Pass
            } else {
                Outcome::Warn
            },
            detail: if v.synced {
                "initial state programmed".into()
            } else {
                "waiting for the source's initial state".into()
            },
        });
        checks.push(CheckResult {
            name: "agent: kernel updates".into(),
            outcome: if v.dataplane_errors.is_empty() {
                Outcome::Pass
            } else {
                Outcome::Fail
            },
            detail: if v.dataplane_errors.is_empty() {
                "all applied".into()
            } else {
                v.dataplane_errors.join("; ")
            },
        });
        let mut config_errors = v.config_errors.clone();
        for p in self.proxy.iter().flat_map(|p| p.config_problems()) {
            config_errors.push(api::ConfigError {
                source: "node proxy".into(),
                object: None,
                field: None,
                message: p,
            });
        }
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

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(s): State<Arc<AdminState>>) -> Response {
    let v = s.view();
    if v.synced {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: waiting for the configuration source's initial state\n",
        )
            .into_response()
    }
}

async fn metrics_handler(State(s): State<Arc<AdminState>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.metrics(),
    )
        .into_response()
}

/// The admin API's routes.
pub fn router(state: Arc<AdminState>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_handler))
        .route(
            "/v1/status",
            get(|State(s): State<Arc<AdminState>>| async move { Json(s.status()) }),
        )
        .route(
            "/v1/workloads",
            get(|State(s): State<Arc<AdminState>>| async move { Json(s.workloads()) }),
        )
        .route(
            "/v1/connections",
            get(|State(s): State<Arc<AdminState>>| async move { Json(s.connections()) }),
        )
        .route(
            "/v1/routes",
            get(|State(s): State<Arc<AdminState>>| async move { Json(s.routes()) }),
        )
        .route(
            "/v1/check",
            get(|State(s): State<Arc<AdminState>>| async move { Json(s.check()) }),
        )
        .route(
            "/v1/mesh",
            get(|State(s): State<Arc<AdminState>>| async move {
                let v = s.mesh.borrow().clone();
                Json((*v).clone())
            }),
        )
        .with_state(state)
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

/// Serves until `stop` fires.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<AdminState>,
    mut stop: watch::Receiver<bool>,
) -> Result<(), Error> {
    axum::serve(listener, router(state))
        .with_graceful_shutdown(async move {
            let _ = stop.changed().await;
        })
        .await
        .map_err(Error::Serve)
}
