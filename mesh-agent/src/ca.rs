//! `mesh-agent ca`: the cluster's CA service. The root lives in a Kubernetes
//! Secret (created on first start) or a directory; callers are node agents,
//! authenticated by their service account token (TokenReview), and a node may
//! only obtain identities of pods scheduled on it (a pods watcher says which).
//! The trust bundle is published in a ConfigMap the agents mount.

use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, RwLock},
    time::Duration,
};

use certs::{
    Ca, CaOptions, SharedClock, SpiffeId, SystemClock,
    ca::{
        CaPem,
        auth::{NodeAuthoriser, NodeWorkloads},
        service::{CaServer, CaService, serving_tls},
        tokenreview::{TokenReviewAuthenticator, TokenReviewConfig},
    },
    storage::PrivateKeyPem,
};
use clap::Args;
use futures::TryStreamExt as _;
use k8s_openapi::{
    ByteString,
    api::core::v1::{ConfigMap, Pod, Secret},
};
use kube::{
    Api, Client,
    api::{ObjectMeta, Patch, PatchParams, PostParams},
    runtime::{WatchStreamExt as _, watcher},
};

use crate::{config, reconcile::workloads::spiffe_id, state::Key};

/// File names inside the root Secret (and the root directory).
pub const ROOT_CERT: &str = "root-cert.pem";
pub const ROOT_KEY: &str = "root-key.pem";
pub const BUNDLE: &str = "trust-bundle.pem";
/// Default CA service port.
pub const CA_PORT: u16 = 15012;

fn pod_namespace() -> String {
    std::env::var("POD_NAMESPACE").unwrap_or_else(|_| "sluice-system".into())
}

/// `mesh-agent ca` flags.
#[derive(Clone, Debug, Args)]
pub struct CaArgs {
    /// Address of the CA service (HTTPS).
    #[arg(long, default_value_t = SocketAddr::from(([0, 0, 0, 0], CA_PORT)))]
    pub listen: SocketAddr,
    /// Kubernetes Secret (`namespace/name`) holding the root (root-cert.pem,
    /// root-key.pem, trust-bundle.pem); created with a new root if missing.
    #[arg(long, conflicts_with = "root_dir")]
    pub root_secret: Option<String>,
    /// Directory holding the root instead (created if missing; key 0600).
    #[arg(long)]
    pub root_dir: Option<PathBuf>,
    /// SPIFFE trust domain.
    #[arg(long, env = "SLUICE_TRUST_DOMAIN", default_value = config::DEFAULT_TRUST_DOMAIN)]
    pub trust_domain: String,
    /// Lifetime of workload certificates (`90m`, `24h`, `7d`); renewed at half-life.
    #[arg(long, default_value = "24h", value_parser = parse_duration)]
    pub workload_cert_ttl: Duration,
    /// ConfigMap (`namespace/name`) the trust bundle is published in, for
    /// agents to mount.
    #[arg(long)]
    pub bundle_configmap: Option<String>,
    /// Users allowed to ask for certificates (repeat). Default: the agent's
    /// service account in this pod's namespace (POD_NAMESPACE).
    #[arg(long = "allowed-user")]
    pub allowed_users: Vec<String>,
    /// DNS names in the service's certificate (repeat). Default:
    /// sluice-ca.<POD_NAMESPACE>.svc.
    #[arg(long = "dns-name")]
    pub dns_names: Vec<String>,
}

/// `90s`, `30m`, `24h`, `7d`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let (n, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = n
        .parse()
        .map_err(|_| format!("{s:?}: expected a number and a unit (s, m, h, d)"))?;
    let secs = match unit {
        "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86_400,
        _ => return Err(format!("{s:?}: unknown unit {unit:?}; use s, m, h or d")),
    };
    if secs == 0 {
        return Err(format!("{s:?}: must be more than zero"));
    }
    Ok(Duration::from_secs(secs))
}

/// What stops the CA.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("--root-secret {0:?}: expected namespace/name")]
    BadRef(String),
    #[error("pass --root-secret namespace/name (in a cluster) or --root-dir DIR")]
    NoRoot,
    #[error("the CA root in Secret {secret}: {reason}")]
    Secret { secret: String, reason: String },
    #[error("the CA: {0}")]
    Ca(#[from] certs::CaError),
    #[error("the CA service: {0}")]
    Service(#[from] certs::ca::service::ServiceError),
    #[error("connecting to the Kubernetes API: {0}")]
    Kube(#[source] Box<kube::Error>),
    #[error("publishing the trust bundle in ConfigMap {configmap}: {source}")]
    Publish {
        configmap: String,
        #[source]
        source: Box<kube::Error>,
    },
    #[error("the TokenReview authenticator: {0}")]
    Auth(String),
}

fn split_ref(r: &str) -> Result<(String, String), Error> {
    match r.split_once('/') {
        Some((ns, name)) if !ns.is_empty() && !name.is_empty() => Ok((ns.into(), name.into())),
        _ => Err(Error::BadRef(r.into())),
    }
}

fn text(secret: &Secret, key: &str) -> Option<String> {
    secret
        .data
        .as_ref()
        .and_then(|d| d.get(key))
        .map(|b| String::from_utf8_lossy(&b.0).into_owned())
}

/// Loads the root from the Secret `namespace/name`, creating it with a new
/// root when it does not exist (if several replicas race, the first create
/// wins and the others load it).
pub async fn root_from_secret(
    client: &Client,
    secret_ref: &str,
    opts: CaOptions,
    clock: SharedClock,
) -> Result<Ca, Error> {
    let (ns, name) = split_ref(secret_ref)?;
    let api: Api<Secret> = Api::namespaced(client.clone(), &ns);
    let err = |reason: String| Error::Secret {
        secret: secret_ref.into(),
        reason,
    };
    let secret = match api.get_opt(&name).await.map_err(|e| err(e.to_string()))? {
        Some(s) => s,
        None => {
            // Generate into a private temporary directory, store, forget.
            let tmp = tempfile::Builder::new()
                .prefix("sluice-ca-")
                .tempdir()
                .map_err(|e| err(format!("a temporary directory for the new root: {e}")))?;
            let dir = tmp.path().join("root");
            Ca::open_or_create(&dir, opts.clone(), clock.clone())?;
            let mut data = BTreeMap::new();
            for f in [ROOT_CERT, ROOT_KEY, BUNDLE] {
                let bytes = std::fs::read(dir.join(f))
                    .map_err(|e| err(format!("reading the new {f}: {e}")))?;
                data.insert(f.to_string(), ByteString(bytes));
            }
            let new = Secret {
                metadata: ObjectMeta {
                    name: Some(name.clone()),
                    namespace: Some(ns.clone()),
                    labels: Some(BTreeMap::from([(
                        "app.kubernetes.io/name".into(),
                        "sluice".into(),
                    )])),
                    ..Default::default()
                },
                data: Some(data),
                type_: Some("Opaque".into()),
                ..Default::default()
            };
            match api.create(&PostParams::default(), &new).await {
                Ok(s) => {
                    tracing::info!(secret = secret_ref, "created a new CA root");
                    s
                }
                Err(kube::Error::Api(s)) if s.code == 409 => {
                    api.get(&name).await.map_err(|e| err(e.to_string()))?
                }
                Err(e) => return Err(err(e.to_string())),
            }
        }
    };
    let root_cert = text(&secret, ROOT_CERT).ok_or_else(|| err(format!("no {ROOT_CERT} key")))?;
    let root_key = text(&secret, ROOT_KEY).ok_or_else(|| err(format!("no {ROOT_KEY} key")))?;
    Ok(Ca::from_pem(
        opts,
        clock,
        CaPem {
            root_cert,
            root_key: Some(PrivateKeyPem::new(root_key)),
            intermediate: None,
            extra_roots: text(&secret, BUNDLE),
        },
    )?)
}

/// Writes the trust bundle into a ConfigMap (server-side apply).
pub async fn publish_bundle(client: &Client, configmap: &str, pem: &str) -> Result<(), Error> {
    let (ns, name) = split_ref(configmap)?;
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    let cm = serde_json::json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": name, "namespace": ns},
        "data": {BUNDLE: pem},
    });
    api.patch(
        &name,
        &PatchParams::apply("sluice-ca").force(),
        &Patch::Apply(cm),
    )
    .await
    .map_err(|source| Error::Publish {
        configmap: configmap.into(),
        source: Box::new(source),
    })?;
    Ok(())
}

/// Which identities run on which node, from a pods watcher.
#[derive(Debug, Default)]
pub struct PodIdentities {
    trust_domain: String,
    inner: RwLock<PodIndex>,
}

#[derive(Debug, Default)]
struct PodIndex {
    pods: HashMap<Key, (String, SpiffeId)>,
    /// node -> identity -> number of pods.
    nodes: HashMap<String, HashMap<SpiffeId, usize>>,
}

impl PodIndex {
    fn remove(&mut self, key: &Key) {
        if let Some((node, id)) = self.pods.remove(key)
            && let Some(ids) = self.nodes.get_mut(&node)
        {
            if let Some(n) = ids.get_mut(&id) {
                *n -= 1;
                if *n == 0 {
                    ids.remove(&id);
                }
            }
            if ids.is_empty() {
                self.nodes.remove(&node);
            }
        }
    }
}

impl PodIdentities {
    pub fn new(trust_domain: &str) -> Self {
        Self {
            trust_domain: trust_domain.into(),
            inner: RwLock::default(),
        }
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, PodIndex> {
        self.inner.write().unwrap_or_else(|e| e.into_inner())
    }

    /// A pod was created or changed.
    pub fn apply(&self, pod: &Pod) {
        let w = crate::sources::kube::workload_of(pod);
        let key = w.key();
        let mut idx = self.write();
        idx.remove(&key);
        if w.node.is_empty() || w.terminating {
            return;
        }
        let Ok(id) =
            spiffe_id(&self.trust_domain, &w.namespace, &w.service_account).parse::<SpiffeId>()
        else {
            return;
        };
        *idx.nodes
            .entry(w.node.clone())
            .or_default()
            .entry(id.clone())
            .or_default() += 1;
        idx.pods.insert(key, (w.node, id));
    }

    pub fn delete(&self, pod: &Pod) {
        self.write().remove(&Key::of(pod));
    }

    /// Replaces everything (a re-list).
    pub fn reset(&self, pods: &[Pod]) {
        *self.write() = PodIndex::default();
        for p in pods {
            self.apply(p);
        }
    }

    /// Follows the cluster's pods until the stream ends.
    pub async fn watch(self: Arc<Self>, client: Client) {
        let mut initial = Vec::new();
        let mut stream = std::pin::pin!(
            watcher(Api::<Pod>::all(client), watcher::Config::default()).default_backoff()
        );
        loop {
            match stream.try_next().await {
                Ok(Some(watcher::Event::Init)) => initial.clear(),
                Ok(Some(watcher::Event::InitApply(p))) => initial.push(p),
                Ok(Some(watcher::Event::InitDone)) => self.reset(&std::mem::take(&mut initial)),
                Ok(Some(watcher::Event::Apply(p))) => self.apply(&p),
                Ok(Some(watcher::Event::Delete(p))) => self.delete(&p),
                Ok(None) => return,
                Err(e) => tracing::warn!(error = %e, "watching pods; retrying"),
            }
        }
    }
}

impl NodeWorkloads for PodIdentities {
    fn runs_on(&self, node: &str, identity: &SpiffeId) -> bool {
        self.inner
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .nodes
            .get(node)
            .is_some_and(|ids| ids.contains_key(identity))
    }
}

/// Runs the CA service until `stop` fires.
pub async fn run(args: CaArgs, mut stop: tokio::sync::watch::Receiver<bool>) -> Result<(), Error> {
    let clock: SharedClock = Arc::new(SystemClock);
    let opts = CaOptions {
        trust_domain: args.trust_domain.clone(),
        leaf_lifetime: args.workload_cert_ttl,
        ..CaOptions::default()
    };
    let client = Client::try_default()
        .await
        .map_err(|e| Error::Kube(Box::new(e)))?;
    let ca = match (&args.root_secret, &args.root_dir) {
        (Some(s), _) => root_from_secret(&client, s, opts, clock.clone()).await?,
        (None, Some(d)) => Ca::open_or_create(d, opts, clock.clone())?,
        (None, None) => return Err(Error::NoRoot),
    };
    let ca = Arc::new(ca);
    if let Some(cm) = &args.bundle_configmap {
        publish_bundle(&client, cm, &ca.bundle().to_pem()).await?;
        tracing::info!(configmap = %cm, "trust bundle published");
    }
    let ns = pod_namespace();
    let allowed = if args.allowed_users.is_empty() {
        vec![format!("system:serviceaccount:{ns}:sluice-agent")]
    } else {
        args.allowed_users.clone()
    };
    let dns: Vec<String> = if args.dns_names.is_empty() {
        vec![
            format!("sluice-ca.{ns}.svc"),
            format!("sluice-ca.{ns}.svc.cluster.local"),
        ]
    } else {
        args.dns_names.clone()
    };
    let auth = TokenReviewAuthenticator::new(
        TokenReviewConfig::in_cluster(allowed, Vec::new()).map_err(Error::Auth)?,
    )
    .map_err(Error::Auth)?;
    let pods = Arc::new(PodIdentities::new(&args.trust_domain));
    let watch = tokio::spawn(pods.clone().watch(client));
    let dns_refs: Vec<&str> = dns.iter().map(String::as_str).collect();
    let (chain, key) = ca.issue_serving_certificate(&dns_refs, &[])?;
    let service = CaService::new(ca, Arc::new(auth), Arc::new(NodeAuthoriser::new(pods)));
    let server = CaServer::bind(args.listen, serving_tls(chain, key)?, service).await?;
    tracing::info!(addr = %server.local_addr(), "CA service listening");
    let _ = stop.changed().await;
    server.shutdown().await;
    watch.abort();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(ns: &str, name: &str, sa: &str, node: &str) -> Pod {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": ns},
            "spec": {"serviceAccountName": sa, "nodeName": node, "containers": []}
        }))
        .unwrap()
    }

    #[test]
    fn a_node_may_have_only_the_identities_of_its_pods() {
        let p = PodIdentities::new("cluster.local");
        let web: SpiffeId = "spiffe://cluster.local/ns/shop/sa/web".parse().unwrap();
        p.apply(&pod("shop", "web-1", "web", "node-a"));
        p.apply(&pod("shop", "web-2", "web", "node-a"));
        assert!(p.runs_on("node-a", &web));
        assert!(!p.runs_on("node-b", &web));
        // One of two pods goes: the node still runs the identity.
        p.delete(&pod("shop", "web-1", "web", "node-a"));
        assert!(p.runs_on("node-a", &web));
        // The other moves (re-created elsewhere): node-a no longer may.
        p.apply(&pod("shop", "web-2", "web", "node-b"));
        assert!(!p.runs_on("node-a", &web));
        assert!(p.runs_on("node-b", &web));
        p.reset(&[]);
        assert!(!p.runs_on("node-b", &web));
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("24h"), Ok(Duration::from_secs(86_400)));
        assert_eq!(parse_duration("90m"), Ok(Duration::from_secs(5_400)));
        assert!(parse_duration("1w").unwrap_err().contains("unknown unit"));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("h").is_err());
    }
}
