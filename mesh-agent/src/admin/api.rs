//! The JSON documents of the admin API (`/v1/...`): written by the agent,
//! read by the `sluice` CLI. One definition for both sides.

use serde::{Deserialize, Serialize};

use crate::crds::MtlsMode;

/// A configuration problem: a file or object the agent refused (its last
/// good version stays in force).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ConfigError {
    /// Where it came from: a file path, or `kubernetes`.
    pub source: String,
    /// The object or document: `Service shop/web`, `document 2`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub object: Option<String>,
    /// The field, `spec.ports[0].port`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    pub message: String,
}

impl ConfigError {
    /// A note rather than a problem: a document of a kind the agent does
    /// not read (a Deployment beside the Services), left out on purpose, or
    /// a fact worth knowing (PERMISSIVE pods an AccessPolicy targets).
    pub fn is_note(&self) -> bool {
        self.message.starts_with("ignored:") || self.message.starts_with("note:")
    }
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.source)?;
        if let Some(o) = &self.object {
            write!(f, ": {o}")?;
        }
        if let Some(field) = &self.field {
            write!(f, ": {field}")?;
        }
        write!(f, ": {}", self.message)
    }
}

/// `GET /v1/status`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub version: String,
    pub node: String,
    pub node_addresses: Vec<String>,
    /// `kube` or `files:<dir>`.
    pub source: String,
    /// The source has delivered its initial state and it is programmed.
    pub synced: bool,
    pub enrolled_namespaces: Vec<String>,
    pub counts: Counts,
    pub ca: CaStatus,
    pub proxy: ProxyStatus,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    pub services: usize,
    /// Service frontends (ClusterIP:port) in the kernel.
    pub frontends: usize,
    pub ready_backends: usize,
    pub local_workloads: usize,
    pub enrolled_workloads: usize,
    pub routes: usize,
    pub policies: usize,
    pub config_errors: usize,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct CaStatus {
    /// `in-process`, `remote <url>`, or `none`.
    pub mode: String,
    pub trust_domain: String,
    /// Roots in the trust bundle.
    pub roots: Vec<CertSummary>,
    /// Workload identities of this node's enrolled pods.
    pub identities: usize,
    /// Of them, those holding a certificate peers accept now (valid or
    /// expiring, not expired or not yet valid).
    #[serde(default)]
    pub certified: usize,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertSummary {
    pub subject: String,
    /// RFC 3339.
    pub not_after: String,
    /// SHA-256 of the certificate (hex), to compare across nodes during a
    /// root rotation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fingerprint: Option<String>,
    /// RFC 3339.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_before: Option<String>,
    /// `valid`, `expiring`, `expired` or `not-yet-valid`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
    /// A root of the trust bundle: how many of this node's workload
    /// certificates chain to it (a root rotation's progress).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificates: Option<usize>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProxyStatus {
    /// `embedded`, `external` or `off`.
    pub mode: String,
    /// Where the kernel sends enrolled connections (`ip:port`), if anywhere.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capture: Option<String>,
    pub running: bool,
}

/// `GET /v1/workloads`: pods of this node (and, standalone, every pod).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Workloads {
    pub workloads: Vec<WorkloadInfo>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkloadInfo {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub service_account: String,
    /// SPIFFE ID.
    pub identity: String,
    pub ips: Vec<String>,
    pub node: String,
    /// Scheduled on this node.
    pub local: bool,
    /// Its connections go through its node's proxy (for a pod of another
    /// node: as that node's agent takes it, by the same rules).
    pub enrolled: bool,
    /// Why it is not enrolled, or what keeps its enrolment from working.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub mtls_mode: MtlsMode,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup_id: Option<u64>,
    /// Kernel STRICT enforcement: `guarded on <interface>`, or why not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strict_guard: Option<String>,
    /// Expiry of its workload certificate (RFC 3339), when one is held.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_expiry: Option<String>,
    /// What is wrong with that certificate (none yet, expired or expiring,
    /// a renewal failing, with the CA's error).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_problem: Option<String>,
}

impl WorkloadInfo {
    /// A local mesh pod whose cgroup the kernel has enrolled: its outbound
    /// connections are captured (one whose cgroup could not be enrolled is
    /// in the mesh for everything else).
    pub fn captured(&self) -> bool {
        self.local && self.enrolled && self.cgroup_id.is_some()
    }
}

/// `GET /v1/connections`: live connections through the node proxy.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Connections {
    /// False when no proxy runs in this agent (nothing to list).
    pub proxy_running: bool,
    pub connections: Vec<ConnectionInfo>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnectionInfo {
    /// `outbound` (from a local workload) or `inbound` (to one).
    pub direction: String,
    pub source_addr: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_workload: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_identity: Option<String>,
    pub destination_addr: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination_workload: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination_identity: Option<String>,
    /// The hop is mutual TLS.
    pub mtls: bool,
    /// Not mutual TLS yet, but on its way: a tunnel connection's handshake,
    /// or a captured TCP connection's tunnel stream, is being set up.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub mtls_pending: bool,
    /// A captured HTTP connection's requests so far sent through the tunnel,
    /// and in plaintext (copies mirrored in plaintext included).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests_mtls: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests_plaintext: Option<u64>,
    /// A captured HTTP connection whose requests reached more than one
    /// identity (no `destination_identity` then).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub several_identities: bool,
    /// A captured HTTP connection whose requests' tunnel connections
    /// differed in TLS version or cipher suite (no `tls_version` then).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub mixed_tls: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cipher: Option<String>,
    /// Expiry of the peer's certificate (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_cert_expiry: Option<String>,
    /// What the proxy does with the connection: `outbound-http` (a captured
    /// connection whose requests are routed one by one), `outbound-tcp`,
    /// `tunnel-out`, `tunnel-in` or `inbound-tcp`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
    /// Bytes so far towards the destination, and from it.
    #[serde(default)]
    pub bytes_sent: u64,
    #[serde(default)]
    pub bytes_received: u64,
}

/// `GET /v1/routes`: per Service, how its traffic is routed.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Routes {
    pub routes: Vec<RouteInfo>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteInfo {
    /// The Service (`namespace/name`).
    pub service: String,
    /// `HTTPRoute`, `GRPCRoute`, or `Service` (no route: per-connection balancing).
    pub kind: String,
    /// The route object, `namespace/name`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub route: Option<String>,
    pub rules: usize,
    /// Backend Services with weights, `reviews-v2:8080 (w=10)`.
    pub backends: Vec<String>,
    pub accepted: bool,
    pub resolved_refs: bool,
    /// Why not accepted or not resolved, or which rules were left out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Requests (or connections) through the node proxy; None without one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub errors: Option<u64>,
    /// Kernel-balanced connections to the Service's frontends: the
    /// Service's, repeated on each of its rows (sum them per Service, not
    /// per row).
    pub connections: u64,
}

/// `GET /v1/check`: the agent's own checks and the configuration errors.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Check {
    pub checks: Vec<CheckResult>,
    pub config_errors: Vec<ConfigError>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Pass,
    Warn,
    Fail,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckResult {
    pub name: String,
    pub outcome: Outcome,
    pub detail: String,
}
