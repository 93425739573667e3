//! One definition of each default, port, name and annotation the agent and
//! the CLI share.

use std::time::Duration;

/// Admin API: `/metrics`, `/healthz`, `/readyz`, `/v1/...`.
pub const ADMIN_PORT: u16 = 15020;
/// Default admin address the agent binds and the CLI calls.
pub const DEFAULT_ADMIN_ADDR: &str = "127.0.0.1:15020";
/// Default admin URL for the CLI.
pub const DEFAULT_ADMIN_URL: &str = "http://127.0.0.1:15020";
/// Node proxy outbound capture listener (connect4 sends enrolled traffic here).
pub const PROXY_CAPTURE_PORT: u16 = 15001;
/// Node proxy inbound mTLS tunnel.
pub const PROXY_INBOUND_PORT: u16 = 15008;
/// `SO_MARK` on the proxy's own sockets, so the kernel never redirects them.
pub const PROXY_MARK: u32 = 0x5c1c_e000;

/// Annotation on a Namespace (`enabled`) or a Pod (`disabled`) that decides
/// enrolment.
pub const MESH_ANNOTATION: &str = "sluice.dev/mesh";
pub const MESH_ENABLED: &str = "enabled";
pub const MESH_DISABLED: &str = "disabled";

/// `namespace <ns> is not in the mesh (annotate it sluice.dev/mesh: enabled)`:
/// why a policy or route there has no effect, and the fix.
pub fn not_in_mesh(ns: &str) -> String {
    format!("namespace {ns} is not in the mesh (annotate it {MESH_ANNOTATION}: {MESH_ENABLED})")
}

/// The trust domain of SPIFFE IDs when none is configured.
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";

/// Label linking an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// `endpointslice.kubernetes.io/managed-by` value on slices the files source
/// derives from Service selectors.
pub const FILES_MANAGED_BY: &str = "files.sluice.dev";
pub const MANAGED_BY_LABEL: &str = "endpointslice.kubernetes.io/managed-by";

/// Gateway API controller name written in route status.
pub const CONTROLLER_NAME: &str = "sluice.dev/mesh-agent";
/// Retries of an HTTPRoute rule whose `retry` leaves `attempts` out (the
/// Gateway API leaves the number to implementations; Istio's default too).
pub const DEFAULT_RETRY_ATTEMPTS: u32 = 2;
/// Wait before the first retry when `retry.backoff` is left out (Envoy's
/// base interval); the proxy doubles it for each further retry.
pub const DEFAULT_RETRY_BACKOFF: Duration = Duration::from_millis(25);

/// Field manager for status patches.
pub const FIELD_MANAGER: &str = "sluice-mesh-agent";

/// The ebpf-lb instance (folder under bpffs) the agent uses.
pub const LB_INSTANCE: &str = "sluice";
/// Default state directory (CA root in standalone mode).
pub const DEFAULT_STATE_DIR: &str = "/var/lib/sluice";

/// Kubernetes' default `ClientIP` affinity timeout (3 h).
pub const DEFAULT_AFFINITY_TIMEOUT: Duration = Duration::from_secs(10_800);

/// How often pods whose cgroup was not found yet are looked up again.
pub const CGROUP_RETRY: Duration = Duration::from_secs(2);
/// How often the files source re-reads its directory even without a
/// file-system event (some file systems do not report changes).
pub const FILES_POLL: Duration = Duration::from_secs(5);

/// The namespace this pod runs in (`POD_NAMESPACE`, set by the chart), or
/// the chart's default namespace.
pub fn pod_namespace() -> String {
    std::env::var("POD_NAMESPACE").unwrap_or_else(|_| "sluice-system".into())
}
