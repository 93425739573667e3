//! `mesh-agent run`: the source, the reconciler thread, the admin API (and the
//! node proxy and identity manager where wired), tied together.

use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::{
        Arc,
        mpsc::{self, RecvTimeoutError},
    },
    thread,
};

use clap::{Args, ValueEnum};
use ebpf_lb::ProxyTarget;

use crate::{
    admin::{self, Admin, AdminInfo, AdminState, Alive},
    cgroups::PodCgroups,
    config,
    crds::MtlsMode,
    identity::Identities,
    proxy::{EmbeddedProxy, LbOriginalDst},
    reconcile::{
        Input, Outputs, Reconciler, Settings,
        dataplane::{Dataplane, MemoryDataplane},
    },
    sources::{SourceSpec, files::FilesSource, kube::KubeSource},
};

/// Runs the reconciler on its own thread: each batch of inputs that arrived
/// together is handled in one step, and a tick retries what failed at least
/// every [`config::CGROUP_RETRY`], however busy the input is (in a large
/// cluster pod and EndpointSlice changes may never pause that long). Ends
/// when every sender is gone; `alive` is dropped when the thread ends, also by
/// a panic, which turns `/healthz` red.
pub fn spawn_reconciler(
    mut r: Reconciler,
    rx: mpsc::Receiver<Vec<Input>>,
    alive: Option<Alive>,
) -> thread::JoinHandle<Reconciler> {
    thread::Builder::new()
        .name("reconciler".into())
        .spawn(move || {
            let _alive = alive;
            let mut next_tick = std::time::Instant::now() + config::CGROUP_RETRY;
            loop {
                let wait = next_tick.saturating_duration_since(std::time::Instant::now());
                let mut batch = match rx.recv_timeout(wait) {
                    Ok(mut batch) => {
                        while let Ok(more) = rx.try_recv() {
                            batch.extend(more);
                        }
                        batch
                    }
                    Err(RecvTimeoutError::Timeout) => Vec::new(),
                    Err(RecvTimeoutError::Disconnected) => return r,
                };
                if std::time::Instant::now() >= next_tick {
                    batch.push(Input::Tick);
                    next_tick = std::time::Instant::now() + config::CGROUP_RETRY;
                }
                r.step(batch);
            }
        })
        .expect("spawning the reconciler thread")
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum DataplaneKind {
    /// Load and attach the eBPF programs (needs root or CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN).
    Kernel,
    /// Program nothing: check a configuration and serve the admin API only.
    None,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ProxyMode {
    /// Run the node proxy (l7-proxy) in the agent: capture listener on the
    /// capture address (15001), mTLS tunnel listener on the inbound address
    /// (15008).
    Embedded,
    /// Another process serves the node proxy: the kernel redirects enrolled
    /// connections to the capture address.
    External,
    /// No proxy: meshed Services are balanced in the kernel like the others.
    Off,
}

/// The proxy's capture addresses: those given (at most one per address
/// family, on one port, each an address the kernel can send connections
/// to), or port 15001 on the first node address of each family. `embedded`:
/// the agent's own proxy, which listens where it is told (port 0 included);
/// an external one on a dual-stack node must be given its addresses (it may
/// listen on one family only, and a family sent nowhere is not meshed).
fn capture_addrs(
    node: &[IpAddr],
    given: &[SocketAddr],
    embedded: bool,
) -> Result<Vec<SocketAddr>, String> {
    let list = || {
        given
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(",")
    };
    if given.len() > 2 || (given.len() == 2 && given[0].is_ipv4() == given[1].is_ipv4()) {
        return Err(format!(
            "--proxy-capture-addr {}: give at most one address per family (IPv4, IPv6)",
            list()
        ));
    }
    if given.len() == 2 && given[0].port() != given[1].port() {
        return Err(format!(
            "--proxy-capture-addr {}: both families' capture addresses need one port (the \
             kernel redirects to one port)",
            list()
        ));
    }
    if let Some(a) = given.iter().find(|a| a.ip().is_unspecified()) {
        return Err(format!(
            "--proxy-capture-addr {a}: the kernel sends connections to an address, not to a \
             wildcard; give the node's or a loopback address"
        ));
    }
    if let Some(a) = given.iter().find(|a| !embedded && a.port() == 0) {
        return Err(format!(
            "--proxy-capture-addr {a}: an external proxy's capture port is needed (0 only \
             picks a free port for the embedded proxy)"
        ));
    }
    if !given.is_empty() {
        return Ok(given.to_vec());
    }
    let first = node
        .first()
        .copied()
        .unwrap_or(IpAddr::from([127, 0, 0, 1]));
    let other = node.iter().find(|a| a.is_ipv4() != first.is_ipv4());
    if !embedded && other.is_some() {
        return Err(
            "--proxy external on a dual-stack node: give --proxy-capture-addr for each family \
             the external proxy listens on (IPv4,IPv6); a family given none is balanced \
             without mTLS or policy"
                .into(),
        );
    }
    Ok(std::iter::once(first)
        .chain(other.copied())
        .map(|ip| SocketAddr::new(ip, config::PROXY_CAPTURE_PORT))
        .collect())
}

/// Where the kernel sends enrolled connections of each family: one port
/// for both (the kernel's redirect keeps a connection's port choice to one).
fn proxy_target(capture: &[SocketAddr], mark: u32) -> Result<ProxyTarget, String> {
    let port = capture[0].port();
    if capture.iter().any(|a| a.port() != port) {
        return Err(format!(
            "capture addresses {capture:?}: both families' capture listeners must use one port"
        ));
    }
    let pick = |v4: bool| capture.iter().find(|a| a.is_ipv4() == v4).map(|a| a.ip());
    Ok(ProxyTarget {
        v4: match pick(true) {
            Some(IpAddr::V4(ip)) => Some(ip),
            _ => None,
        },
        v6: match pick(false) {
            Some(IpAddr::V6(ip)) => Some(ip),
            _ => None,
        },
        port,
        mark,
    })
}

/// `--proxy-mark`: a number, decimal or `0x` hexadecimal, not 0.
fn parse_mark(s: &str) -> Result<u32, String> {
    let n = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u32::from_str_radix(&hex.replace('_', ""), 16),
        None => s.replace('_', "").parse(),
    }
    .map_err(|e| format!("{s:?} is not a 32-bit mark: {e}"))?;
    if n == 0 {
        return Err("0 marks nothing: the proxy's sockets would be redirected back to it".into());
    }
    Ok(n)
}

/// Families (`"IPv4"`, `"IPv6"`) of this node's addresses that no capture
/// address covers.
fn uncaptured_families(node: &[IpAddr], capture: &[SocketAddr]) -> Vec<&'static str> {
    let mut out = Vec::new();
    for (v4, name) in [(true, "IPv4"), (false, "IPv6")] {
        if node.iter().any(|a| a.is_ipv4() == v4) && !capture.iter().any(|a| a.is_ipv4() == v4) {
            out.push(name);
        }
    }
    out
}

fn default_source() -> String {
    if std::env::var_os("KUBERNETES_SERVICE_HOST").is_some() {
        "kube".into()
    } else {
        "files:/etc/sluice/config".into()
    }
}

fn default_node_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "localhost".into())
}

/// `mesh-agent run` flags.
/// Who this agent is in the status writer Lease: its pod (`POD_NAME`, set by
/// the chart; two pods of one node during a rolling update are two
/// candidates), else its node.
fn lease_holder(node: &str) -> String {
    std::env::var("POD_NAME")
        .ok()
        .filter(|p| !p.is_empty())
        .unwrap_or_else(|| node.to_string())
}

/// Where the chart mounts the agent's CA token (audience `sluice-ca`).
pub const DEFAULT_CA_TOKEN: &str = "/var/run/secrets/sluice/ca-token/token";

#[derive(Clone, Debug, Args)]
pub struct RunArgs {
    /// Where the configuration comes from: `kube` (the Kubernetes API, in a
    /// cluster) or `files:<dir>` (standalone: a directory of manifests and
    /// SluiceWorkloads documents, watched for changes). Default: `kube` inside
    /// a pod, else `files:/etc/sluice/config`.
    #[arg(long, env = "SLUICE_SOURCE", default_value_t = default_source())]
    pub source: String,
    /// This node's name, as pods' `spec.nodeName` (and the workloads file's
    /// `node`) say. Default: the host name.
    #[arg(long, env = "NODE_NAME", default_value_t = default_node_name())]
    pub node_name: String,
    /// This node's address(es), where its proxy is reached by other nodes;
    /// repeat for dual stack. In a cluster, pass status.hostIP.
    #[arg(
        long = "node-address",
        env = "NODE_IP",
        value_delimiter = ',',
        default_value = "127.0.0.1"
    )]
    pub node_addresses: Vec<IpAddr>,
    /// The cgroup v2 directory the programs attach to (its whole subtree is
    /// balanced). Relative workload cgroup paths of the files source are
    /// relative to it. Default: the cgroup v2 mount (every process).
    #[arg(long, env = "SLUICE_CGROUP_ROOT")]
    pub cgroup_root: Option<PathBuf>,
    /// Directory for the agent's own state (the standalone CA root, 0600).
    #[arg(long, env = "SLUICE_STATE_DIR", default_value = config::DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,
    /// Admin API address (/metrics, /healthz, /readyz, /v1/... for `sluice`).
    #[arg(long, env = "SLUICE_ADMIN_ADDR", default_value = config::DEFAULT_ADMIN_ADDR)]
    pub admin_addr: SocketAddr,
    /// bpffs mount point (mounted if missing).
    #[arg(long, default_value = ebpf_lb::DEFAULT_BPFFS)]
    pub bpffs: PathBuf,
    /// Name of the folder under bpffs holding the pinned maps and links.
    #[arg(long, default_value = config::LB_INSTANCE)]
    pub lb_instance: String,
    /// Service frontends (VIP:port) the kernel tables hold. The tables are
    /// sized when first created: a new size takes `mesh-agent uninstall`
    /// (balancing through the old tables stops until the next start).
    #[arg(long, default_value_t = ebpf_lb::Options::default().max_services)]
    pub lb_max_services: u32,
    /// Backends over all services the kernel tables hold (an update needs
    /// room for a service's old and new backends at once). Sized like
    /// --lb-max-services.
    #[arg(long, default_value_t = ebpf_lb::Options::default().max_backends)]
    pub lb_max_backends: u32,
    /// Let connections from the node itself through the kernel's STRICT
    /// guard: kubelet's liveness and readiness probes come from there (as do
    /// host-network processes). `false` lets only the node proxy's through,
    /// and a STRICT pod with probes never becomes ready.
    #[arg(long, env = "SLUICE_STRICT_ALLOWS_NODE", default_value_t = true, action = clap::ArgAction::Set)]
    pub strict_allows_node: bool,
    /// `kernel` programs the eBPF load balancer; `none` programs nothing.
    #[arg(long, value_enum, default_value_t = DataplaneKind::Kernel)]
    pub dataplane: DataplaneKind,
    /// The DaemonSet this agent runs in (`--source kube`, in the agent's
    /// namespace): when it has been deleted (`helm uninstall`) by the time
    /// the agent stops, the agent removes its kernel programs and pinned
    /// state, which otherwise stay (through restarts and upgrades, so that
    /// meshed traffic never leaves in plaintext). Empty: never.
    #[arg(long, env = "SLUICE_DAEMONSET", default_value = crate::sources::kube::owner::DAEMONSET)]
    pub daemonset: String,
    /// The node proxy: `embedded` (in this process), `external` (another
    /// process listens on the capture address and marks its sockets with
    /// `--proxy-mark`) or `off`.
    #[arg(long, value_enum, default_value_t = ProxyMode::Embedded)]
    pub proxy: ProxyMode,
    /// Where the kernel sends enrolled connections (the proxy's capture
    /// listener): one address per family (repeat, or comma-separate, on a
    /// dual-stack node), on one port. Default: the first node address of
    /// each family, port 15001; an external proxy on a dual-stack node must
    /// be given them.
    #[arg(long, value_delimiter = ',')]
    pub proxy_capture_addr: Vec<SocketAddr>,
    /// The embedded proxy's mTLS tunnel listener. Default: the first node
    /// address, port 15008.
    #[arg(long)]
    pub proxy_inbound_addr: Option<SocketAddr>,
    /// A setting of the embedded proxy, `NAME=VALUE` (repeat for several):
    /// its limits and timeouts, e.g. `exchange_idle_timeout_ms=900000` for
    /// exchanges silent longer than 5 minutes, `tcp_idle_timeout_ms=0`, or
    /// `max_header_bytes=131072`. The names are l7-proxy's `ProxySettings`
    /// fields (README, "Limits"); an unknown one is refused at start.
    #[arg(long = "proxy-setting", value_name = "NAME=VALUE")]
    pub proxy_settings: Vec<String>,
    /// The `SO_MARK` the node proxy puts on its sockets: the kernel neither
    /// redirects them back to it nor refuses them at STRICT pods. Change it
    /// when another component of the node uses these bits (kube-proxy's
    /// iptables mode uses 0x4000 and 0x8000, Calico 0xffff0000 by default);
    /// an external proxy must set the same.
    #[arg(long, env = "SLUICE_PROXY_MARK", default_value = "0x5c1ce000", value_parser = parse_mark)]
    pub proxy_mark: u32,
    /// SPIFFE trust domain of workload identities.
    #[arg(long, env = "SLUICE_TRUST_DOMAIN", default_value = config::DEFAULT_TRUST_DOMAIN)]
    pub trust_domain: String,
    /// mTLS mode of workloads no MeshPolicy selects.
    #[arg(long, default_value = "PERMISSIVE")]
    pub default_mtls_mode: MtlsMode,
    /// Where the in-process CA keeps its root (default `<state-dir>/ca`).
    /// Agents of several standalone nodes on one machine share a trust
    /// domain by pointing at the same directory (the first to start
    /// creates the root, under a lock).
    #[arg(long, env = "SLUICE_CA_DIR")]
    pub ca_dir: Option<PathBuf>,
    /// The cluster's CA service (`mesh-agent ca`), `https://host:port`.
    /// Without it the agent runs a CA in-process, its root in
    /// `<state-dir>/ca` (standalone mode).
    #[arg(long, env = "SLUICE_CA_URL")]
    pub ca_url: Option<String>,
    /// The trust bundle (PEM roots) that signs the CA service's certificate.
    #[arg(
        long,
        env = "SLUICE_CA_BUNDLE",
        default_value = "/etc/sluice/trust/trust-bundle.pem"
    )]
    pub ca_bundle: PathBuf,
    /// The token the agent authenticates to the CA with: its service account
    /// token projected by the kubelet for the audience `sluice-ca` (the chart
    /// mounts it here; the kubelet rotates it and it is read on each use).
    /// The pod's API-server token is refused by the CA.
    #[arg(
        long,
        env = "SLUICE_CA_TOKEN",
        default_value = DEFAULT_CA_TOKEN
    )]
    pub ca_token: PathBuf,
}

/// What stops `run`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Source(String),
    #[error("creating the state directory {path}: {source}")]
    StateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("loading the kernel load balancer: {0}")]
    Lb(#[source] ebpf_lb::Error),
    #[error("attaching to cgroup {path}: {source}")]
    Attach {
        path: PathBuf,
        #[source]
        source: ebpf_lb::Error,
    },
    #[error(
        "connecting to the Kubernetes API: {0} (in a pod, the service account is used; outside, KUBECONFIG)"
    )]
    Kube(#[source] kube::Error),
    #[error(transparent)]
    Files(#[from] crate::sources::files::Error),
    #[error(transparent)]
    Admin(#[from] admin::Error),
    #[error("the node proxy: {0}")]
    Proxy(#[source] Box<l7_proxy::ProxyError>),
    #[error("{0}")]
    ProxySetting(String),
    #[error("workload identities: {0}")]
    Identity(#[from] Box<crate::identity::Error>),
}

fn make_state_dir(path: &std::path::Path) -> Result<(), Error> {
    use std::os::unix::fs::DirBuilderExt as _;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
        .map_err(|source| Error::StateDir {
            path: path.into(),
            source,
        })
}

/// Settings other flags give the embedded proxy: not for `--proxy-setting`.
const PROXY_SETTINGS_OF_FLAGS: [(&str, &str); 4] = [
    ("outbound_addr", "--proxy-capture-addr"),
    ("second_outbound_addr", "--proxy-capture-addr"),
    ("inbound_addr", "--proxy-inbound-addr"),
    (
        "socket_mark",
        "--dataplane (kernel: the proxy marks its sockets)",
    ),
];

/// `base` with each `NAME=VALUE` of `--proxy-setting` applied: a value is
/// read as JSON (numbers, `true`), else taken as a string. An unknown name,
/// one another flag sets or a value of the wrong kind is an error that
/// names it.
pub fn proxy_settings(
    base: l7_proxy::ProxySettings,
    overrides: &[String],
) -> Result<l7_proxy::ProxySettings, String> {
    let serde_json::Value::Object(mut fields) =
        serde_json::to_value(&base).map_err(|e| e.to_string())?
    else {
        return Err("the proxy's settings are not an object".into());
    };
    for o in overrides {
        let Some((name, value)) = o.split_once('=') else {
            return Err(format!("--proxy-setting {o}: expected NAME=VALUE"));
        };
        let name = name.trim();
        if let Some((_, flag)) = PROXY_SETTINGS_OF_FLAGS.iter().find(|(n, _)| *n == name) {
            return Err(format!("--proxy-setting {name}: set by {flag}"));
        }
        if !fields.contains_key(name) {
            let mut known: Vec<&str> = fields
                .keys()
                .map(String::as_str)
                .filter(|k| !PROXY_SETTINGS_OF_FLAGS.iter().any(|(n, _)| n == k))
                .collect();
            known.sort_unstable();
            return Err(format!(
                "--proxy-setting {name}: no such setting (known: {})",
                known.join(", ")
            ));
        }
        let v = serde_json::from_str(value.trim())
            .unwrap_or_else(|_| serde_json::Value::String(value.into()));
        // Each checked alone, so the error names the one at fault.
        let mut one = fields.clone();
        one.insert(name.into(), v.clone());
        serde_json::from_value::<l7_proxy::ProxySettings>(one.into())
            .map_err(|e| format!("--proxy-setting {o}: {e}"))?
            .check()
            .map_err(|e| format!("--proxy-setting {o}: {e}"))?;
        fields.insert(name.into(), v);
    }
    serde_json::from_value(fields.into()).map_err(|e| e.to_string())
}

/// Waits for a file the CA publishes (the trust bundle, mounted from a
/// ConfigMap that appears when the CA first starts), logging while it waits.
async fn wait_for_file(path: &std::path::Path) {
    let mut waited = std::time::Duration::ZERO;
    let step = std::time::Duration::from_secs(2);
    while !path.exists() {
        if waited.as_secs().is_multiple_of(30) {
            tracing::info!(path = %path.display(), "waiting for the CA's trust bundle");
        }
        tokio::time::sleep(step).await;
        waited += step;
    }
}

/// Tasks of the agent, aborted if dropped: a start that fails (or is
/// dropped, on a signal) leaves nothing running.
#[derive(Default)]
struct Tasks(Vec<tokio::task::JoinHandle<()>>);

impl Tasks {
    fn push(&mut self, t: tokio::task::JoinHandle<()>) {
        self.0.push(t);
    }
}

impl Drop for Tasks {
    fn drop(&mut self) {
        for t in &self.0 {
            t.abort();
        }
    }
}

/// A running agent (for tests and the binary).
struct Uninstall {
    lb: Arc<ebpf_lb::LoadBalancer>,
    deleted: tokio::sync::watch::Receiver<bool>,
    /// Stops the watch: only once the agent has stopped, so that a deletion
    /// seen while the proxy drains still counts.
    _watching: tokio::sync::watch::Sender<bool>,
}

pub struct Agent {
    pub admin_addr: SocketAddr,
    stop: tokio::sync::watch::Sender<bool>,
    tasks: Tasks,
    background: Tasks,
    reconciler: Option<thread::JoinHandle<Reconciler>>,
    proxy: Option<Arc<EmbeddedProxy>>,
    /// The kernel state, and whether the agent's DaemonSet has been
    /// deleted: then it goes with the agent.
    uninstall: Option<Uninstall>,
}

impl Agent {
    /// Starts everything; returns once every part runs. The admin API
    /// listens first: while the slower parts start, `/healthz` answers and
    /// `/readyz` says what the agent waits for.
    pub async fn start(args: RunArgs) -> Result<Agent, Error> {
        let source: SourceSpec = args.source.parse().map_err(Error::Source)?;
        // Checked before anything starts: a typo fails at once.
        if !args.proxy_settings.is_empty() && args.proxy != ProxyMode::Embedded {
            return Err(Error::ProxySetting(format!(
                "--proxy-setting applies to the embedded proxy only (--proxy {})",
                args.proxy
                    .to_possible_value()
                    .map_or_else(String::new, |v| v.get_name().to_string())
            )));
        }
        let tuned = proxy_settings(l7_proxy::ProxySettings::default(), &args.proxy_settings)
            .map_err(Error::ProxySetting)?;
        make_state_dir(&args.state_dir)?;
        // Dropping `stop` (an error below) ends the admin server too.
        let (stop, stop_rx) = tokio::sync::watch::channel(false);
        let mut tasks = Tasks::default();
        let listener = admin::bind(args.admin_addr).await?;
        let admin_addr = listener.local_addr().map_err(admin::Error::Serve)?;
        if let Some(why) = admin::unreachable_for_cli(admin_addr) {
            tracing::warn!("{why}");
        }
        let admin = Arc::new(Admin::default());
        tasks.push(tokio::spawn(admin::serve(
            listener,
            admin.clone(),
            admin::ServeOptions::default(),
            stop_rx.clone(),
        )));
        let cgroup_root = match &args.cgroup_root {
            Some(p) => p.clone(),
            None => ebpf_lb::cgroup2_mount().map_err(Error::Lb)?,
        };
        let mut kernel = None;
        let dp: Arc<dyn Dataplane> = match args.dataplane {
            DataplaneKind::Kernel => {
                admin.set_phase("loading and attaching the kernel programs");
                let opts = ebpf_lb::Options {
                    bpffs: args.bpffs.clone(),
                    instance: args.lb_instance.clone(),
                    max_services: args.lb_max_services,
                    max_backends: args.lb_max_backends,
                    strict_allows_node: args.strict_allows_node,
                    ..ebpf_lb::Options::default()
                };
                // The agent it replaces may still run (a rollout that starts
                // the new pod first): wait for it to let go of the instance.
                let mut waited = false;
                let lb = loop {
                    match ebpf_lb::LoadBalancer::open(opts.clone()) {
                        Err(e @ ebpf_lb::Error::InUse { .. }) => {
                            if !waited {
                                tracing::warn!("waiting: {e}");
                                waited = true;
                            }
                            admin.set_phase(format!("waiting for the kernel programs: {e}"));
                            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                        }
                        other => break other.map_err(Error::Lb)?,
                    }
                };
                lb.attach(&cgroup_root).map_err(|source| Error::Attach {
                    path: cgroup_root.clone(),
                    source,
                })?;
                tracing::info!(cgroup = %cgroup_root.display(), pins = %lb.pin_dir().display(), "kernel programs attached");
                // An earlier run's root, if --cgroup-root changed: its
                // programs would go on balancing (and redirecting) there.
                match lb.detach_others(&cgroup_root) {
                    Ok(ids) if !ids.is_empty() => tracing::info!(
                        cgroups = ?ids,
                        "kernel programs detached from an earlier run's cgroup root"
                    ),
                    Ok(_) => {}
                    Err(e) => tracing::warn!(
                        "detaching an earlier run's kernel programs: {e}; `mesh-agent uninstall` \
                         removes them"
                    ),
                }
                let lb = Arc::new(lb);
                kernel = Some(lb.clone());
                lb
            }
            DataplaneKind::None => Arc::new(MemoryDataplane::new()),
        };
        if args.ca_url.is_some() && !args.ca_bundle.exists() {
            admin.set_phase(format!(
                "waiting for the CA's trust bundle at {} (the CA publishes it when it first starts)",
                args.ca_bundle.display()
            ));
            wait_for_file(&args.ca_bundle).await;
        }
        admin.set_phase("loading workload identities");
        let identities = match &args.ca_url {
            Some(url) => {
                Identities::remote(url, &args.ca_bundle, &args.ca_token, &args.trust_domain)
                    .map_err(Box::new)?
            }
            None => Identities::in_process(
                &args
                    .ca_dir
                    .clone()
                    .unwrap_or_else(|| args.state_dir.join("ca")),
                &args.trust_domain,
            )
            .map_err(Box::new)?,
        };
        tracing::info!(ca = %identities.mode, "workload identities");
        let (mut out, rx) = Outputs::channels();
        // Renewal loops run until aborted at shutdown.
        let mut background = Tasks(identities.spawn(rx.identities.clone()));
        let node_ip = args
            .node_addresses
            .first()
            .copied()
            .unwrap_or(IpAddr::from([127, 0, 0, 1]));
        // Without a proxy nothing is captured (and nothing checked).
        let captures = match args.proxy {
            ProxyMode::Off => Vec::new(),
            mode => capture_addrs(
                &args.node_addresses,
                &args.proxy_capture_addr,
                mode == ProxyMode::Embedded,
            )
            .map_err(Error::Source)?,
        };
        let mut embedded: Option<Arc<EmbeddedProxy>> = None;
        let capture: Option<Vec<SocketAddr>> = match args.proxy {
            ProxyMode::Off => None,
            ProxyMode::External => Some(captures.clone()),
            ProxyMode::Embedded => {
                admin.set_phase("starting the node proxy");
                let inbound = args
                    .proxy_inbound_addr
                    .unwrap_or(SocketAddr::new(node_ip, config::PROXY_INBOUND_PORT));
                let settings = l7_proxy::ProxySettings {
                    outbound_addr: captures[0],
                    second_outbound_addr: captures.get(1).copied(),
                    inbound_addr: inbound,
                    // With the kernel dataplane the proxy marks its sockets:
                    // they are never redirected back to it, and they pass the
                    // STRICT guard. (Setting a mark needs CAP_NET_ADMIN.)
                    socket_mark: (args.dataplane == DataplaneKind::Kernel)
                        .then_some(args.proxy_mark),
                    // Flag-owned settings are refused among the tuned ones.
                    ..tuned
                };
                let (snap_tx, snap_rx) =
                    tokio::sync::watch::channel(Arc::new(l7_proxy::Snapshot::default()));
                let mut registry = prometheus_client::registry::Registry::default();
                let proxy = l7_proxy::Proxy::builder(
                    settings,
                    snap_rx,
                    Arc::new(identities.manager.clone()),
                    Arc::new(LbOriginalDst(dp.clone())),
                )
                .start(&mut registry)
                .await
                .map_err(|e| Error::Proxy(Box::new(e)))?;
                let inbound_port = proxy.inbound_addr().port();
                let (problems_tx, problems) = tokio::sync::watch::channel(Vec::new());
                background.push(crate::proxy::spawn_translator(
                    rx.mesh.clone(),
                    snap_tx,
                    inbound_port,
                    problems_tx,
                ));
                let capture: Vec<SocketAddr> = std::iter::once(proxy.outbound_addr())
                    .chain(proxy.second_outbound_addr())
                    .collect();
                tracing::info!(?capture, inbound = %proxy.inbound_addr(), "node proxy running");
                embedded = Some(Arc::new(EmbeddedProxy {
                    proxy,
                    registry: std::sync::Mutex::new(registry),
                    problems,
                }));
                Some(capture)
            }
        };
        let proxy_target = match &capture {
            Some(c) => Some(proxy_target(c, args.proxy_mark).map_err(Error::Source)?),
            None => None,
        };
        if let Some(c) = &capture {
            for family in uncaptured_families(&args.node_addresses, c) {
                tracing::warn!(
                    "this node has an {family} address but the proxy captures no {family} \
                     connection: enrolled pods' {family} connections to meshed Services are \
                     balanced straight to a backend, without mTLS or policy (pass an {family} \
                     --proxy-capture-addr)"
                );
            }
        }
        let settings = Settings {
            node: args.node_name.clone(),
            node_addresses: args.node_addresses.clone(),
            trust_domain: args.trust_domain.clone(),
            default_mode: args.default_mtls_mode,
            proxy: proxy_target,
            // The embedded proxy marks its sockets (above); an external one
            // must use --proxy-mark too.
            kernel_strict: args.proxy != ProxyMode::Off,
        };
        let (tx, inputs) = mpsc::channel::<Vec<Input>>();
        let mut uninstall = None;
        let kube_client = match &source {
            SourceSpec::Kube => {
                use crate::sources::kube::{lease, status};
                admin.set_phase("connecting to the Kubernetes API");
                let client = kube::Client::try_default().await.map_err(Error::Kube)?;
                let (status_tx, status_rx) = crate::reconcile::policies::status_queue();
                out.status = Some(status_tx);
                // One agent of the cluster writes status: the Lease holder.
                let (write_until_tx, write_until) = tokio::sync::watch::channel(None);
                // Both ask the reconciler to send every status that differs
                // again: after a failed write, and when this agent takes over.
                let resend = |tx: mpsc::Sender<Vec<Input>>| {
                    move || {
                        let _ = tx.send(vec![Input::ResendStatus]);
                    }
                };
                tasks.push(tokio::spawn(status::run(
                    client.clone(),
                    status_rx,
                    write_until,
                    stop_rx.clone(),
                    resend(tx.clone()),
                )));
                let elector = lease::Elector::new(
                    client.clone(),
                    &config::pod_namespace(),
                    &lease_holder(&args.node_name),
                );
                if let Some(lb) = kernel.take()
                    && !args.daemonset.is_empty()
                {
                    let (watching, until) = tokio::sync::watch::channel(false);
                    let (task, deleted) = crate::sources::kube::owner::watch_deleted(
                        client.clone(),
                        &config::pod_namespace(),
                        &args.daemonset,
                        until,
                    );
                    background.push(task);
                    uninstall = Some(Uninstall {
                        lb,
                        deleted,
                        _watching: watching,
                    });
                }
                let mut view = rx.view.clone();
                tasks.push(tokio::spawn(lease::run(
                    elector,
                    write_until_tx,
                    resend(tx.clone()),
                    stop_rx.clone(),
                    async move {
                        let _ = view.wait_for(|v| v.synced).await;
                    },
                )));
                Some(client)
            }
            SourceSpec::Files(_) => None,
        };
        let resolver = PodCgroups {
            root: ebpf_lb::cgroup2_mount().unwrap_or_else(|_| cgroup_root.clone()),
            base: cgroup_root.clone(),
        };
        let reconciler = Reconciler::new(dp.clone(), Box::new(resolver), settings, out);
        let reconciler = spawn_reconciler(
            reconciler,
            inputs,
            Some(admin.health.watch("the reconciler thread")),
        );
        let source_alive = admin.health.watch("the configuration source");
        match (&source, kube_client) {
            (SourceSpec::Kube, Some(client)) => {
                let run = KubeSource::new(client).run(tx, stop_rx.clone());
                tasks.push(tokio::spawn(async move {
                    let _alive = source_alive;
                    run.await;
                }));
            }
            (SourceSpec::Files(dir), _) => {
                let src = FilesSource::new(dir);
                let stop_rx = stop_rx.clone();
                tasks.push(tokio::spawn(async move {
                    let _alive = source_alive;
                    if let Err(e) = src.run(tx, stop_rx).await {
                        tracing::error!(error = %e, "files source stopped");
                    }
                }));
            }
            _ => unreachable!("a kube source has a client"),
        }
        let state = Arc::new(AdminState {
            info: AdminInfo {
                node: args.node_name.clone(),
                node_addresses: args
                    .node_addresses
                    .iter()
                    .map(ToString::to_string)
                    .collect(),
                source: source.to_string(),
                trust_domain: args.trust_domain.clone(),
                proxy_mode: match args.proxy {
                    ProxyMode::Embedded => "embedded".into(),
                    ProxyMode::External => "external".into(),
                    ProxyMode::Off => "off".into(),
                },
                capture: capture.map(|c| {
                    c.iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join(", ")
                }),
                ca_mode: identities.mode.clone(),
                bpffs: args.bpffs.clone(),
                kernel: args.dataplane == DataplaneKind::Kernel,
            },
            view: rx.view,
            mesh: rx.mesh,
            dp,
            proxy: embedded.clone().map(|p| p as Arc<dyn admin::ProxyHandle>),
            identity: Some(Arc::new(identities)),
        });
        admin.running(state);
        tracing::info!(%admin_addr, source = %source, node = %args.node_name, "mesh-agent running");
        Ok(Agent {
            admin_addr,
            stop,
            tasks,
            background,
            reconciler: Some(reconciler),
            proxy: embedded,
            uninstall,
        })
    }

    /// The embedded proxy's capture and tunnel addresses, when it runs.
    pub fn proxy_addrs(&self) -> Option<(SocketAddr, SocketAddr)> {
        self.proxy
            .as_ref()
            .map(|p| (p.proxy.outbound_addr(), p.proxy.inbound_addr()))
    }

    /// Stops the source and the admin API, drains the node proxy meanwhile,
    /// and waits for the reconciler. The kernel state stays pinned: load
    /// balancing goes on without the agent, and enrolled pods' connections
    /// to meshed Services are refused until a proxy listens again (they fail
    /// closed rather than leave the mesh in plaintext). Unless the agent's
    /// DaemonSet has been deleted (`--daemonset`): then, once the proxy has
    /// drained, the kernel state is removed too.
    pub async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        let tasks = std::mem::take(&mut self.tasks.0);
        let proxy = self.proxy.take();
        tokio::join!(
            async {
                for t in tasks {
                    let _ = t.await;
                }
            },
            async {
                if let Some(p) = &proxy {
                    p.proxy.shutdown().await;
                }
            },
        );
        // Read after the drain: `helm uninstall` stops the pods moments after
        // it deletes the DaemonSet, and the watch may tell of it only now.
        let uninstall = self
            .uninstall
            .take()
            .filter(|u| *u.deleted.borrow())
            .map(|u| u.lb);
        for t in self.background.0.drain(..) {
            t.abort();
        }
        if let Some(r) = self.reconciler.take() {
            let _ = tokio::task::spawn_blocking(move || r.join()).await;
        }
        if let Some(lb) = uninstall {
            match lb.remove_pinned_state() {
                Ok(()) => tracing::info!(
                    pins = %lb.pin_dir().display(),
                    "this agent's DaemonSet was deleted: kernel programs detached and pinned \
                     state removed"
                ),
                Err(e) => tracing::error!(
                    "this agent's DaemonSet was deleted, but removing the kernel state failed: \
                     {e}; `mesh-agent uninstall` on this node removes it"
                ),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ips(s: &[&str]) -> Vec<IpAddr> {
        s.iter().map(|a| a.parse().unwrap()).collect()
    }
    fn addrs(s: &[&str]) -> Vec<SocketAddr> {
        s.iter().map(|a| a.parse().unwrap()).collect()
    }

    /// `--proxy-mark` takes hexadecimal or decimal; its default is the mark
    /// the README tells external proxies to set; 0 is refused.
    #[test]
    fn proxy_marks_are_read_and_zero_refused() {
        use clap::Parser as _;
        #[derive(clap::Parser)]
        struct Only {
            #[command(flatten)]
            run: RunArgs,
        }
        let default = Only::try_parse_from(["x"]).unwrap().run.proxy_mark;
        assert_eq!(default, config::PROXY_MARK);
        assert_eq!(parse_mark("0x1_0000"), Ok(0x1_0000));
        assert_eq!(parse_mark("4096"), Ok(4096));
        assert!(parse_mark("0").unwrap_err().contains("marks nothing"));
        assert!(
            parse_mark("0xzz")
                .unwrap_err()
                .contains("not a 32-bit mark")
        );
        let t = proxy_target(&addrs(&["127.0.0.1:15001"]), 0x2000).unwrap();
        assert_eq!(t.mark, 0x2000);
    }

    /// `--proxy-setting NAME=VALUE` changes that setting alone; a name that
    /// is unknown or another flag's, or a value of the wrong kind, is an
    /// error naming it.
    #[test]
    fn proxy_settings_take_name_value_overrides_and_name_what_is_wrong() {
        let base = l7_proxy::ProxySettings::default();
        let o = |v: &[&str]| v.iter().map(ToString::to_string).collect::<Vec<_>>();
        let s = proxy_settings(
            base.clone(),
            &o(&["exchange_idle_timeout_ms=900000", "tcp_idle_timeout_ms = 0"]),
        )
        .unwrap();
        assert_eq!(
            (s.exchange_idle_timeout_ms, s.tcp_idle_timeout_ms),
            (900_000, 0)
        );
        assert_eq!(s.max_header_bytes, base.max_header_bytes, "untouched");
        assert_eq!(proxy_settings(base.clone(), &[]).unwrap(), base);

        let err = |v: &[&str]| proxy_settings(base.clone(), &o(v)).unwrap_err();
        let e = err(&["exchange_idle_timeout=1"]);
        assert!(
            e.contains("exchange_idle_timeout: no such setting")
                && e.contains("exchange_idle_timeout_ms,")
                && !e.contains("inbound_addr"),
            "{e}"
        );
        let e = err(&["inbound_addr=127.0.0.1:1"]);
        assert!(e.contains("set by --proxy-inbound-addr"), "{e}");
        let e = err(&["max_header_bytes=64k"]);
        assert!(
            e.starts_with("--proxy-setting max_header_bytes=64k: invalid type"),
            "{e}"
        );
        let e = err(&["max_header_bytes"]);
        assert!(e.contains("expected NAME=VALUE"), "{e}");
        // 0 where it would let nothing through; where it means "no
        // limit", it is taken.
        let e = err(&["connect_timeout_ms=0"]);
        assert!(
            e.starts_with("--proxy-setting connect_timeout_ms=0: connect_timeout_ms cannot be 0"),
            "{e}"
        );
        // (The per-peer caps at 0 are off.)
        for off in [
            "tunnel_idle_timeout_ms=0",
            "max_handshakes_per_peer=0",
            "max_tunnel_connections_per_peer=0",
        ] {
            assert!(proxy_settings(base.clone(), &o(&[off])).is_ok(), "{off}");
        }
    }

    /// A dual-stack node's proxy captures both families by default, on
    /// port 15001 of its first address of each; the kernel then sends each
    /// family's enrolled connections to the capture address of that family.
    #[test]
    fn a_dual_stack_node_captures_both_families() {
        let node = ips(&["10.0.0.5", "10.0.0.6", "fd00::5"]);
        let c = capture_addrs(&node, &[], true).unwrap();
        assert_eq!(c, addrs(&["10.0.0.5:15001", "[fd00::5]:15001"]));
        let t = proxy_target(&c, config::PROXY_MARK).unwrap();
        assert_eq!(t.v4, Some("10.0.0.5".parse().unwrap()));
        assert_eq!(t.v6, Some("fd00::5".parse().unwrap()));
        assert_eq!(t.port, 15001);
        assert!(uncaptured_families(&node, &c).is_empty());
        // IPv6 first: the same, in that order.
        let c = capture_addrs(&ips(&["fd00::5", "10.0.0.5"]), &[], true).unwrap();
        assert_eq!(c, addrs(&["[fd00::5]:15001", "10.0.0.5:15001"]));
        // An external proxy on a dual-stack node is told where it listens
        // (it may serve one family: the other is then warned about).
        let e = capture_addrs(&node, &[], false).unwrap_err();
        assert!(
            e.contains("give --proxy-capture-addr for each family"),
            "{e}"
        );
        let c = capture_addrs(&node, &addrs(&["10.0.0.5:15001"]), false).unwrap();
        assert_eq!(uncaptured_families(&node, &c), ["IPv6"]);
        let e = capture_addrs(&node, &addrs(&["10.0.0.5:0"]), false).unwrap_err();
        assert!(e.contains("capture port is needed"), "{e}");
        // Single-stack: the default serves an external proxy as before.
        let c = capture_addrs(&ips(&["10.0.0.5"]), &[], false).unwrap();
        assert_eq!(c, addrs(&["10.0.0.5:15001"]));
        // A single-stack node: one.
        let c = capture_addrs(&ips(&["10.0.0.5"]), &[], true).unwrap();
        assert_eq!(c, addrs(&["10.0.0.5:15001"]));
        assert_eq!(proxy_target(&c, config::PROXY_MARK).unwrap().v6, None);
    }

    #[test]
    fn given_capture_addresses_are_one_per_family_on_one_port() {
        let node = ips(&["10.0.0.5", "fd00::5"]);
        let given = addrs(&["127.0.0.1:15001"]);
        assert_eq!(capture_addrs(&node, &given, true).unwrap(), given);
        // Only IPv4 given on a dual-stack node: IPv6 goes uncaptured (the
        // agent warns).
        assert_eq!(uncaptured_families(&node, &given), ["IPv6"]);
        let e = capture_addrs(&node, &addrs(&["127.0.0.1:1", "127.0.0.2:1"]), true).unwrap_err();
        assert!(e.contains("one address per family"), "{e}");
        // Checked before anything binds: ports, wildcards.
        let e = capture_addrs(&node, &addrs(&["127.0.0.1:0", "[::1]:0"]), true);
        assert!(e.is_ok(), "one port, 0 for both: {e:?}");
        let e = capture_addrs(&node, &addrs(&["127.0.0.1:1", "[::1]:2"]), true).unwrap_err();
        assert!(e.contains("one port"), "{e}");
        let e = capture_addrs(&node, &addrs(&["0.0.0.0:15001"]), true).unwrap_err();
        assert!(e.contains("wildcard"), "{e}");
        let e = proxy_target(&addrs(&["127.0.0.1:1", "[::1]:2"]), config::PROXY_MARK).unwrap_err();
        assert!(e.contains("one port"), "{e}");
    }
}
