//! `mesh-agent ca`: the cluster's CA service. The root lives in a Kubernetes
//! Secret (created on first start) or a directory; callers are node agents,
//! authenticated by their service account token (TokenReview), and a node may
//! only obtain identities of pods scheduled on it (a pods watcher says which).
//! The trust bundle is published in a ConfigMap the agents mount.
//!
//! Root rotation: `mesh-agent ca rotate --prepare | --activate | --retire`
//! runs one step of `certs`' three-step rotation on the root in its store
//! (the Secret is replaced only at the version it read) and exits. The
//! running CA reads its store every [`ROOT_POLL`]; when the root changed it
//! restarts its service with it (a serving certificate from the now active
//! root included) and publishes the new bundle. The store is the one source
//! of truth, so CA replicas and restarts agree.

use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
    os::unix::fs::DirBuilderExt as _,
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
    time::Duration,
};

use certs::{
    Ca, CaOptions, SharedClock, SpiffeId, SystemClock,
    ca::{
        auth::{Authenticator, Authoriser, NodeAuthoriser, NodeWorkloads},
        service::{CaServer, CaService, serving_tls},
        tokenreview::{TokenReviewAuthenticator, TokenReviewConfig},
    },
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

/// File names inside the root Secret (and the root directory): those
/// `certs::Ca::open_or_create` reads and writes, and the time after which the
/// old root may be retired.
pub const ROOT_CERT: &str = "root-cert.pem";
pub const ROOT_KEY: &str = "root-key.pem";
pub const BUNDLE: &str = "trust-bundle.pem";
/// During a rotation: the prepared root, trusted but not signing yet.
pub const NEXT_ROOT_CERT: &str = "next-root-cert.pem";
pub const NEXT_ROOT_KEY: &str = "next-root-key.pem";
/// RFC 3339; set when a new root is activated, cleared when the old retires.
pub const RETIRABLE_AFTER: &str = "retirable-after";
/// RFC 3339; set when a new root is prepared, cleared when it is activated.
pub const PREPARED_AT: &str = "prepared-at";
pub const ROOT_FILES: [&str; 7] = [
    ROOT_CERT,
    ROOT_KEY,
    BUNDLE,
    NEXT_ROOT_CERT,
    NEXT_ROOT_KEY,
    RETIRABLE_AFTER,
    PREPARED_AT,
];
/// How long after `--prepare` every node is taken to hold the new bundle:
/// agents fetch it every 5 minutes (and retry a failure within a minute).
pub const ACTIVATE_AFTER: Duration = Duration::from_secs(10 * 60);
/// How often the running CA reads its root store for a rotation step.
pub const ROOT_POLL: Duration = Duration::from_secs(10);
/// Default CA service port.
pub const CA_PORT: u16 = 15012;

/// `mesh-agent ca` flags.
#[derive(Clone, Debug, Args)]
pub struct CaArgs {
    /// Address of the CA service (HTTPS).
    #[arg(long, default_value_t = SocketAddr::from(([0, 0, 0, 0], CA_PORT)))]
    pub listen: SocketAddr,
    #[command(flatten)]
    pub root: RootArgs,
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
    /// Audience agents' tokens must be issued for (checked by TokenReview):
    /// agents present a projected token for it, so that a token meant for
    /// any other service cannot be replayed to the CA.
    #[arg(long, default_value = certs::ca::tokenreview::CA_TOKEN_AUDIENCE)]
    pub token_audience: String,
}

/// `mesh-agent ca rotate`: one step of a root rotation, on the root store
/// the running CA reads (it picks the change up within
/// [`ROOT_POLL`], serves and publishes the new bundle).
#[derive(Clone, Debug, Args)]
#[command(group(clap::ArgGroup::new("step").required(true).args(["prepare", "activate", "retire"])))]
pub struct RotateArgs {
    /// Step 1: add a new root to the trust bundle; it signs nothing yet.
    #[arg(long)]
    pub prepare: bool,
    /// Step 2 (once every node has the new bundle: refused for 10 minutes
    /// after --prepare without --force): the new root signs; nodes reissue
    /// their certificates.
    #[arg(long)]
    pub activate: bool,
    /// Step 3: the old root leaves the bundle. Refused while certificates it
    /// signed may be valid (one certificate lifetime after --activate).
    #[arg(long)]
    pub retire: bool,
    /// With --activate: activate before every node is taken to have the
    /// new bundle (once `sluice status` on every node shows both roots).
    /// With --retire: retire now (once `sluice status` on every node says
    /// the old root signs 0 certificates there).
    #[arg(long, conflicts_with = "prepare")]
    pub force: bool,
    /// The same root store and settings as the running `mesh-agent ca`.
    #[command(flatten)]
    pub root: RootArgs,
}

/// Where the CA's root lives and what it signs: shared by `mesh-agent ca`
/// and `mesh-agent ca rotate`, which must agree on them.
#[derive(Clone, Debug, Args)]
pub struct RootArgs {
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
}

impl RootArgs {
    fn store(&self) -> Result<RootStore, Error> {
        RootStore::from_args(self.root_secret.as_deref(), self.root_dir.as_deref())
    }

    fn options(&self) -> CaOptions {
        CaOptions {
            trust_domain: self.trust_domain.clone(),
            leaf_lifetime: self.workload_cert_ttl,
            ..CaOptions::default()
        }
    }
}

impl RotateArgs {
    pub fn step(&self) -> RotateStep {
        if self.prepare {
            RotateStep::Prepare
        } else if self.activate {
            RotateStep::Activate { force: self.force }
        } else {
            RotateStep::Retire { force: self.force }
        }
    }
}

/// `mesh-agent ca rotate ...`, with the Kubernetes client from the
/// environment (kubeconfig, or the pod's service account under
/// `kubectl exec`).
pub async fn rotate_command(args: RotateArgs) -> Result<Rotated, Error> {
    let store = args.root.store()?;
    let opts = args.root.options();
    let client = match store {
        RootStore::Secret { .. } => Some(
            Client::try_default()
                .await
                .map_err(|e| Error::Kube(Box::new(e)))?,
        ),
        RootStore::Dir(_) => None,
    };
    rotate(
        client.as_ref(),
        &store,
        args.step(),
        opts,
        Arc::new(SystemClock),
    )
    .await
}

/// `90s`, `30m`, `24h`, `7d`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let (n, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = n
        .parse()
        .map_err(|_| format!("{s:?}: expected a number and a unit (s, m, h, d)"))?;
    let per = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(format!("{s:?}: unknown unit {unit:?}; use s, m, h or d")),
    };
    let secs = n
        .checked_mul(per)
        .ok_or_else(|| format!("{s:?}: too long"))?;
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
    #[error("the CA root in {store}: {reason}")]
    Store { store: String, reason: String },
    #[error("rotating the CA root in {store}: {reason}")]
    Rotate { store: String, reason: String },
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
    #[error("the CA's serving certificate: {0}")]
    Serving(String),
}

fn split_ref(r: &str) -> Result<(String, String), Error> {
    match r.split_once('/') {
        Some((ns, name)) if !ns.is_empty() && !name.is_empty() => Ok((ns.into(), name.into())),
        _ => Err(Error::BadRef(r.into())),
    }
}

/// Where the CA's root lives: a Kubernetes Secret (in a cluster) or a
/// directory. Both hold the same files ([`ROOT_FILES`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RootStore {
    Secret { namespace: String, name: String },
    Dir(PathBuf),
}

impl std::fmt::Display for RootStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RootStore::Secret { namespace, name } => write!(f, "Secret {namespace}/{name}"),
            RootStore::Dir(d) => write!(f, "directory {}", d.display()),
        }
    }
}

impl RootStore {
    /// From `--root-secret namespace/name` or `--root-dir DIR`.
    pub fn from_args(secret: Option<&str>, dir: Option<&Path>) -> Result<Self, Error> {
        match (secret, dir) {
            (Some(s), _) => {
                let (namespace, name) = split_ref(s)?;
                Ok(RootStore::Secret { namespace, name })
            }
            (None, Some(d)) => Ok(RootStore::Dir(d.into())),
            (None, None) => Err(Error::NoRoot),
        }
    }
}

/// The files of a root store, by name; private keys among them.
pub type RootFiles = BTreeMap<String, Vec<u8>>;

/// The CA's root as loaded from its store.
pub struct LoadedRoot {
    pub ca: Arc<Ca>,
    /// What it was loaded from, to notice a change.
    files: RootFiles,
    /// The Secret's `resourceVersion`, the precondition of a write back.
    version: Option<String>,
    /// The private copy the CA was opened from (and a rotation step writes).
    dir: tempfile::TempDir,
}

impl std::fmt::Debug for LoadedRoot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the files: they hold private keys.
        f.debug_struct("LoadedRoot")
            .field("ca", &self.ca)
            .field("version", &self.version)
            .finish_non_exhaustive()
    }
}

fn store_err(store: &RootStore, reason: impl std::fmt::Display) -> Error {
    Error::Store {
        store: store.to_string(),
        reason: reason.to_string(),
    }
}

/// A private directory (0700, under the system temporary directory) for a
/// root's files.
fn private_dir(store: &RootStore) -> Result<tempfile::TempDir, Error> {
    tempfile::Builder::new()
        .prefix("sluice-ca-")
        .tempdir()
        .map_err(|e| store_err(store, format!("a private temporary directory: {e}")))
}

fn is_private(file: &str) -> bool {
    file.ends_with("-key.pem")
}

/// Writes `files` into `dir` (keys mode 0600), removing the known files
/// `files` lacks: keys first, then certificates, then removals, so that a
/// write cut short leaves every key somewhere (an activation interrupted
/// after the new key is finished by the CA's next start).
fn write_files(store: &RootStore, dir: &Path, files: &RootFiles) -> Result<(), Error> {
    let order = ROOT_FILES
        .iter()
        .filter(|f| files.contains_key(**f) && is_private(f))
        .chain(
            ROOT_FILES
                .iter()
                .filter(|f| files.contains_key(**f) && !is_private(f)),
        )
        .chain(ROOT_FILES.iter().filter(|f| !files.contains_key(**f)));
    for f in order {
        let path = dir.join(f);
        match files.get(*f) {
            Some(bytes) if is_private(f) => certs::storage::write_private(&path, bytes),
            Some(bytes) => certs::storage::write_public(&path, bytes),
            None => {
                if let Err(e) = std::fs::remove_file(&path)
                    && e.kind() != std::io::ErrorKind::NotFound
                {
                    return Err(store_err(
                        store,
                        format!("removing {}: {e}", path.display()),
                    ));
                }
                Ok(())
            }
        }
        .map_err(|e| store_err(store, e))?;
    }
    Ok(())
}

/// Holds the store directory's lock (flock on `.lock` there) until
/// dropped: a rotation step and a first start (or two steps) writing the
/// directory at once would leave a key and a certificate that do not match.
struct DirLock(#[allow(dead_code)] std::fs::File);

/// Exclusive, to write.
fn lock_dir(store: &RootStore, dir: &Path) -> Result<DirLock, Error> {
    certs::storage::lock_exclusive(&dir.join(".lock"))
        .map(DirLock)
        .map_err(|e| store_err(store, e))
}

/// Shared, to read (a reader never sees a step's files half written): none
/// where no writer ever locked (no `.lock` yet) or the store cannot be
/// written at all (a read-only mount, where no step writes either).
fn lock_dir_to_read(store: &RootStore, dir: &Path) -> Result<Option<DirLock>, Error> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let opened = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(dir.join(".lock"));
    match opened {
        Ok(f) => f
            .lock_shared()
            .map(|()| Some(DirLock(f)))
            .map_err(|e| store_err(store, format!("locking {}: {e}", dir.display()))),
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound
                    | std::io::ErrorKind::PermissionDenied
                    | std::io::ErrorKind::ReadOnlyFilesystem
            ) =>
        {
            Ok(None)
        }
        Err(e) => Err(store_err(store, format!("locking {}: {e}", dir.display()))),
    }
}

/// The known files present in `dir`.
fn read_files(store: &RootStore, dir: &Path) -> Result<RootFiles, Error> {
    let mut out = RootFiles::new();
    for f in ROOT_FILES {
        match std::fs::read(dir.join(f)) {
            Ok(b) => {
                out.insert(f.to_string(), b);
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(store_err(store, format!("reading {f}: {e}"))),
        }
    }
    Ok(out)
}

/// The Secrets API of a Secret store.
fn secrets(client: Option<&Client>, store: &RootStore, ns: &str) -> Result<Api<Secret>, Error> {
    let client = client.ok_or_else(|| {
        store_err(
            store,
            "no Kubernetes client (KUBECONFIG, or the pod's service account) to reach it",
        )
    })?;
    Ok(Api::namespaced(client.clone(), ns))
}

/// The store's files and version now; None when the Secret or directory
/// holds no root yet.
pub async fn read_store(
    client: Option<&Client>,
    store: &RootStore,
) -> Result<Option<(RootFiles, Option<String>)>, Error> {
    match store {
        RootStore::Secret { namespace, name } => {
            let api: Api<Secret> = secrets(client, store, namespace)?;
            let Some(secret) = api.get_opt(name).await.map_err(|e| store_err(store, e))? else {
                return Ok(None);
            };
            let data = secret.data.unwrap_or_default();
            let keys: Vec<String> = data.keys().cloned().collect();
            let files: RootFiles = data
                .into_iter()
                .filter(|(k, _)| ROOT_FILES.contains(&k.as_str()))
                .map(|(k, v)| (k, v.0))
                .collect();
            holds_a_root(store, &files, &keys)?;
            Ok(Some((files, secret.metadata.resource_version)))
        }
        RootStore::Dir(d) => {
            let files = if d.exists() {
                let _lock = lock_dir_to_read(store, d)?;
                read_files(store, d)?
            } else {
                RootFiles::new()
            };
            if files.is_empty() {
                return Ok(None);
            }
            let keys: Vec<String> = files.keys().cloned().collect();
            holds_a_root(store, &files, &keys)?;
            Ok(Some((files, None)))
        }
    }
}

/// A store that is there must hold a root: opened without one, the CA would
/// make a new root on every start and never save it (every replica and
/// restart serving another). A Secret made by hand or by a GitOps tool with
/// other key names is the usual cause.
fn holds_a_root(store: &RootStore, files: &RootFiles, keys: &[String]) -> Result<(), Error> {
    if files.contains_key(ROOT_CERT) && files.contains_key(ROOT_KEY) {
        return Ok(());
    }
    Err(store_err(
        store,
        format!(
            "it holds no CA root ({ROOT_CERT} and {ROOT_KEY} wanted; it has {}): delete it, \
             and `mesh-agent ca` creates one, or store the root under those names (with \
             {BUNDLE})",
            if keys.is_empty() {
                "nothing".to_string()
            } else {
                keys.join(", ")
            }
        ),
    ))
}

/// `files` as a Secret's `data`.
fn secret_data(files: &RootFiles) -> BTreeMap<String, ByteString> {
    files
        .iter()
        .map(|(k, v)| (k.clone(), ByteString(v.clone())))
        .collect()
}

/// Writes `files` back to the store. A Secret is replaced only if it is
/// still at `version`, a directory only if it still holds `was` (another
/// rotation or CA replica may have written it meanwhile).
async fn write_store(
    client: Option<&Client>,
    store: &RootStore,
    files: &RootFiles,
    (version, was): (Option<String>, &RootFiles),
) -> Result<(), Error> {
    match store {
        RootStore::Secret { namespace, name } => {
            let api: Api<Secret> = secrets(client, store, namespace)?;
            let mut secret = api.get(name).await.map_err(|e| store_err(store, e))?;
            secret.metadata.resource_version = version;
            secret.data = Some(secret_data(files));
            match api.replace(name, &PostParams::default(), &secret).await {
                Ok(_) => Ok(()),
                Err(kube::Error::Api(s)) if s.code == 409 => {
                    Err(store_err(store, CHANGED_MEANWHILE))
                }
                Err(e) => Err(store_err(store, e)),
            }
        }
        RootStore::Dir(d) => {
            let _lock = lock_dir(store, d)?;
            if read_files(store, d)? != *was {
                return Err(store_err(store, CHANGED_MEANWHILE));
            }
            write_files(store, d, files)
        }
    }
}

/// A rotation step found its store written by someone else since it read it.
const CHANGED_MEANWHILE: &str = "it changed while the rotation ran (another rotation, or a new CA \
     root); nothing was changed: run the command again";

/// Opens the CA of `files` from a private copy.
fn open(
    store: &RootStore,
    files: RootFiles,
    version: Option<String>,
    opts: CaOptions,
    clock: SharedClock,
) -> Result<LoadedRoot, Error> {
    let dir = private_dir(store)?;
    write_files(store, dir.path(), &files)?;
    let ca = Ca::open_or_create(dir.path(), opts, clock).map_err(|e| store_err(store, e))?;
    Ok(LoadedRoot {
        ca: Arc::new(ca),
        files,
        version,
        dir,
    })
}

/// Loads the CA root from its store; a store without one gets a new root
/// when `create` is set (if several CA replicas race to create the Secret,
/// the first wins and the others load it).
pub async fn load_root(
    client: Option<&Client>,
    store: &RootStore,
    opts: CaOptions,
    clock: SharedClock,
    create: bool,
) -> Result<LoadedRoot, Error> {
    if let Some((files, version)) = read_store(client, store).await? {
        return open(store, files, version, opts, clock);
    }
    if !create {
        return Err(store_err(
            store,
            "it holds no CA root; start `mesh-agent ca` first, which creates one",
        ));
    }
    // Generated in a private directory, stored, then loaded like any other.
    let fresh = private_dir(store)?;
    Ca::open_or_create(fresh.path(), opts.clone(), clock.clone())?;
    let files = read_files(store, fresh.path())?;
    match store {
        RootStore::Secret { namespace, name } => {
            let api: Api<Secret> = secrets(client, store, namespace)?;
            let new = Secret {
                metadata: ObjectMeta {
                    name: Some(name.clone()),
                    namespace: Some(namespace.clone()),
                    labels: Some(BTreeMap::from([(
                        "app.kubernetes.io/name".into(),
                        "sluice".into(),
                    )])),
                    ..Default::default()
                },
                data: Some(secret_data(&files)),
                type_: Some("Opaque".into()),
                ..Default::default()
            };
            match api.create(&PostParams::default(), &new).await {
                Ok(s) => {
                    tracing::info!(%store, "created a new CA root");
                    open(store, files, s.metadata.resource_version, opts, clock)
                }
                Err(kube::Error::Api(s)) if s.code == 409 => {
                    let (files, version) = read_store(client, store)
                        .await?
                        .ok_or_else(|| store_err(store, "created by another CA, then gone"))?;
                    open(store, files, version, opts, clock)
                }
                Err(e) => Err(store_err(store, e)),
            }
        }
        RootStore::Dir(d) => {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(d)
                .map_err(|e| store_err(store, e))?;
            let _lock = lock_dir(store, d)?;
            // Another CA sharing the directory may have created one since.
            let there = read_files(store, d)?;
            if !there.is_empty() {
                let keys: Vec<String> = there.keys().cloned().collect();
                holds_a_root(store, &there, &keys)?;
                return open(store, there, None, opts, clock);
            }
            write_files(store, d, &files)?;
            tracing::info!(%store, "created a new CA root");
            open(store, files, None, opts, clock)
        }
    }
}

/// Loads the root from the Secret `namespace/name`, creating it with a new
/// root when it does not exist.
pub async fn root_from_secret(
    client: &Client,
    secret_ref: &str,
    opts: CaOptions,
    clock: SharedClock,
) -> Result<LoadedRoot, Error> {
    let store = RootStore::from_args(Some(secret_ref), None)?;
    load_root(Some(client), &store, opts, clock, true).await
}

/// The root loaded anew if its store changed since `current` was loaded.
pub async fn reload_if_changed(
    client: Option<&Client>,
    store: &RootStore,
    current: &LoadedRoot,
    opts: CaOptions,
    clock: SharedClock,
) -> Result<Option<LoadedRoot>, Error> {
    match read_store(client, store).await? {
        Some((files, version)) if files != current.files => {
            open(store, files, version, opts, clock).map(Some)
        }
        _ => Ok(None),
    }
}

/// One step of a root rotation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RotateStep {
    /// A new root joins the trust bundle without signing.
    Prepare,
    /// The prepared root signs from now on.
    Activate {
        /// Even before every node is taken to have the new bundle.
        force: bool,
    },
    /// The roots that no longer sign leave the bundle.
    Retire {
        /// Even though certificates they signed may still be valid.
        force: bool,
    },
}

/// What a rotation step did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rotated {
    /// One line for the operator: what happened and what to do next.
    pub summary: String,
    pub bundle: certs::status::BundleStatus,
}

fn rfc3339(t: time::OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| t.to_string())
}

/// Runs one rotation step on the root in its store and writes the result
/// back; a running `mesh-agent ca` picks it up on its next read of the store.
pub async fn rotate(
    client: Option<&Client>,
    store: &RootStore,
    step: RotateStep,
    opts: CaOptions,
    clock: SharedClock,
) -> Result<Rotated, Error> {
    let leaf_lifetime = opts.leaf_lifetime;
    let root = load_root(client, store, opts, clock.clone(), false).await?;
    let now = time::OffsetDateTime::from(clock.now());
    let rotation = |reason: String| Error::Rotate {
        store: store.to_string(),
        reason,
    };
    let ca = &root.ca;
    // Times the store records (RFC 3339).
    let stored = |name: &str| {
        root.files
            .get(name)
            .and_then(|b| std::str::from_utf8(b).ok())
            .and_then(|s| {
                time::OffsetDateTime::parse(
                    s.trim(),
                    &time::format_description::well_known::Rfc3339,
                )
                .ok()
            })
    };
    let mut retirable_after = stored(RETIRABLE_AFTER);
    let mut prepared_at = stored(PREPARED_AT);
    let summary = match step {
        RotateStep::Prepare => {
            let fp = ca.prepare_root_rotation()?;
            prepared_at = Some(now);
            format!(
                "prepared root {fp}: it is in the trust bundle and signs nothing yet. Once every \
                 node has fetched the bundle ({} minutes, until {}), run `mesh-agent ca rotate \
                 --activate`",
                ACTIVATE_AFTER.as_secs() / 60,
                rfc3339(now + ACTIVATE_AFTER)
            )
        }
        RotateStep::Activate { force } => {
            let fp = ca.status().pending_root.ok_or_else(|| {
                rotation(
                    "no rotation is prepared; run `mesh-agent ca rotate --prepare` first".into(),
                )
            })?;
            // A node still without the new root would refuse every peer
            // (and the CA itself) once it signs.
            match prepared_at {
                Some(t) if now < t + ACTIVATE_AFTER && !force => {
                    return Err(rotation(format!(
                        "root {fp} was prepared at {}; a node that has not fetched the trust \
                         bundle since would lose the mesh. Wait until {}, or pass --force once \
                         `sluice status` on every node shows both roots",
                        rfc3339(t),
                        rfc3339(t + ACTIVATE_AFTER)
                    )));
                }
                None if !force => {
                    return Err(rotation(format!(
                        "when root {fp} was prepared is not recorded (an older version prepared \
                         it); pass --force once `sluice status` on every node shows both roots"
                    )));
                }
                _ => {}
            }
            ca.activate_root(&fp)?;
            prepared_at = None;
            // Certificates the old root signed live at most this long.
            let until = now + leaf_lifetime;
            retirable_after = Some(until);
            format!(
                "root {fp} signs from now on; nodes see it at their next trust bundle refresh \
                 (every 5 minutes) and reissue their certificates within a minute of that. \
                 The old root can be retired after {} (`mesh-agent ca rotate --retire`), or \
                 earlier with --force once `sluice status` on every node says the old root \
                 signs 0 certificates there",
                rfc3339(until)
            )
        }
        RotateStep::Retire { force } => {
            let bundle = ca.bundle().status(clock.now());
            let old: Vec<_> = bundle
                .roots
                .iter()
                .filter(|r| !r.active)
                .map(|r| r.fingerprint)
                .collect();
            if old.is_empty() {
                return Err(rotation(
                    "the trust bundle holds only the active root: nothing to retire".into(),
                ));
            }
            if ca.status().pending_root.is_some() {
                return Err(rotation(
                    "a prepared root is not active yet; run `mesh-agent ca rotate --activate` \
                     first"
                        .into(),
                ));
            }
            match retirable_after {
                Some(t) if t > now && !force => {
                    return Err(rotation(format!(
                        "certificates signed by the old root may be valid until {}; wait until \
                         then, or pass --force once `sluice status` on every node says the old \
                         root signs 0 certificates there",
                        rfc3339(t)
                    )));
                }
                None if !force => {
                    return Err(rotation(
                        "when the old root stopped signing is not recorded; pass --force once \
                         `sluice status` on every node says the old root signs 0 certificates \
                         there"
                            .into(),
                    ));
                }
                _ => {}
            }
            for fp in &old {
                ca.retire_root(fp, true)?;
            }
            retirable_after = None;
            format!(
                "retired {} from the trust bundle",
                old.iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        }
    };
    let mut files = read_files(store, root.dir.path())?;
    for (name, at) in [
        (RETIRABLE_AFTER, retirable_after),
        (PREPARED_AT, prepared_at),
    ] {
        match at {
            Some(t) => {
                files.insert(name.into(), rfc3339(t).into_bytes());
            }
            None => {
                files.remove(name);
            }
        }
    }
    write_store(client, store, &files, (root.version.clone(), &root.files)).await?;
    tracing::info!(%store, "{summary}");
    Ok(Rotated {
        summary,
        bundle: ca.bundle().status(clock.now()),
    })
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
    /// The first complete list of the cluster's pods is in.
    listed: std::sync::atomic::AtomicBool,
    /// Since when the watch has failed without a good event since, and
    /// when it last failed: failing for longer than [`STALE_AFTER`], the
    /// index no longer says who runs where (a pod moved meanwhile would
    /// still be authorised on its old node).
    failing: std::sync::Mutex<Option<(tokio::time::Instant, tokio::time::Instant)>>,
}

/// How long a failing pods watch is trusted before requests are told to
/// come back later (renewals happen at half-life: minutes do not matter).
pub const STALE_AFTER: std::time::Duration = std::time::Duration::from_secs(300);

/// A watch that has not failed for this long has resumed (the watcher
/// retries at least every 30 s while it fails), though a quiet cluster may
/// have sent no event since.
pub const RESUMED_AFTER: std::time::Duration = std::time::Duration::from_secs(120);

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
            listed: std::sync::atomic::AtomicBool::new(false),
            failing: std::sync::Mutex::new(None),
        }
    }

    fn failing(
        &self,
    ) -> std::sync::MutexGuard<'_, Option<(tokio::time::Instant, tokio::time::Instant)>> {
        self.failing.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The watch failed (it retries with a backoff).
    pub fn watch_failed(&self) {
        let now = tokio::time::Instant::now();
        let mut f = self.failing();
        let since = f.map_or(now, |(since, _)| since);
        *f = Some((since, now));
    }

    /// The watch works again: a change or a complete list came.
    fn watch_works(&self) {
        *self.failing() = None;
    }

    /// Whether the watch has been failing for longer than [`STALE_AFTER`].
    fn stale(&self) -> bool {
        self.failing().is_some_and(|(since, last)| {
            since.elapsed() >= STALE_AFTER && last.elapsed() < RESUMED_AFTER
        })
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, PodIndex> {
        self.inner.write().unwrap_or_else(|e| e.into_inner())
    }

    /// A pod was created or changed.
    pub fn apply(&self, pod: &Pod) {
        self.apply_to(&mut self.write(), pod);
    }

    fn apply_to(&self, idx: &mut PodIndex, pod: &Pod) {
        let w = crate::sources::kube::workload_of(pod);
        let key = w.key();
        idx.remove(&key);
        // A static pod names no service account (the API server refuses one
        // that does), and a node can create one in any namespace: counting
        // it as `default` would let a node have that identity signed.
        let named_account = pod
            .spec
            .as_ref()
            .and_then(|s| s.service_account_name.as_deref())
            .is_some_and(|sa| !sa.is_empty());
        if w.node.is_empty() || w.finished || w.is_static() || !named_account {
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

    /// Replaces everything (a re-list), at once: a request meanwhile sees
    /// the old list or the new one, never a part of it.
    pub fn reset(&self, pods: &[Pod]) {
        let mut idx = PodIndex::default();
        for p in pods {
            self.apply_to(&mut idx, p);
        }
        *self.write() = idx;
        self.listed
            .store(true, std::sync::atomic::Ordering::Release);
    }

    /// Follows the cluster's pods until the stream ends.
    pub async fn watch(self: Arc<Self>, client: Client) {
        let mut initial = Vec::new();
        let mut stream = std::pin::pin!(
            watcher(Api::<Pod>::all(client), watcher::Config::default())
                .backoff(crate::sources::kube::GrowingBackoff::default())
        );
        loop {
            match stream.try_next().await {
                Ok(Some(watcher::Event::Init)) => initial.clear(),
                Ok(Some(watcher::Event::InitApply(p))) => initial.push(p),
                Ok(Some(watcher::Event::InitDone)) => {
                    self.reset(&std::mem::take(&mut initial));
                    self.watch_works();
                }
                Ok(Some(watcher::Event::Apply(p))) => {
                    self.apply(&p);
                    self.watch_works();
                }
                Ok(Some(watcher::Event::Delete(p))) => {
                    self.delete(&p);
                    self.watch_works();
                }
                Ok(None) => return,
                Err(e) => {
                    tracing::warn!(error = %e, "watching pods; retrying");
                    self.watch_failed();
                }
            }
        }
    }
}

impl NodeWorkloads for PodIdentities {
    fn ready(&self) -> bool {
        self.listed.load(std::sync::atomic::Ordering::Acquire) && !self.stale()
    }

    fn runs_on(&self, node: &str, identity: &SpiffeId) -> bool {
        self.inner
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .nodes
            .get(node)
            .is_some_and(|ids| ids.contains_key(identity))
    }
}

/// What a running CA serves with, besides its root.
#[derive(Clone)]
pub struct Serving {
    pub listen: SocketAddr,
    pub dns_names: Vec<String>,
    /// IP addresses in the serving certificate, for clients that dial one.
    pub ips: Vec<std::net::IpAddr>,
    pub authenticator: Arc<dyn Authenticator>,
    pub authoriser: Arc<dyn Authoriser>,
    /// `namespace/name` of the ConfigMap the bundle is published in.
    pub bundle_configmap: Option<String>,
    /// How often the root store is read for a rotation step.
    pub poll: Duration,
}

/// The CA service listening, and when its serving certificate is at half its
/// life (then a new one is served).
async fn start_server(
    ca: &Arc<Ca>,
    serving: &Serving,
    addr: SocketAddr,
    clock: &SharedClock,
) -> Result<(CaServer, std::time::SystemTime), Error> {
    let dns: Vec<&str> = serving.dns_names.iter().map(String::as_str).collect();
    // Issued under the active root: after an activation, under the new one.
    let (chain, key) = ca.issue_serving_certificate(&dns, &serving.ips)?;
    let leaf =
        certs::x509::CertInfo::parse(&chain[0]).map_err(|e| Error::Serving(e.to_string()))?;
    let renew_at = serving_renewal(
        std::time::SystemTime::from(leaf.not_before),
        std::time::SystemTime::from(leaf.not_after),
        clock.now(),
    );
    let service = CaService::new(
        ca.clone(),
        serving.authenticator.clone(),
        serving.authoriser.clone(),
    );
    let server = CaServer::bind(addr, serving_tls(chain, key)?, service).await?;
    Ok((server, renew_at))
}

/// When to renew the CA's serving certificate: at half its life, and not
/// within the hour. A certificate cut short by its signer's end (the root's
/// last days) is no longer when renewed: without the floor, each renewal
/// at half of what is left would restart the service sooner, until every
/// poll did (aborting the requests in flight each time).
fn serving_renewal(
    not_before: std::time::SystemTime,
    not_after: std::time::SystemTime,
    now: std::time::SystemTime,
) -> std::time::SystemTime {
    let half = not_after
        .duration_since(not_before)
        .unwrap_or_default()
        .checked_div(2)
        .unwrap_or_default();
    (not_before + half).max(now + std::time::Duration::from_secs(3600))
}

/// Serves the CA of `store` until `stop` fires. The store is read again every
/// `serving.poll`: when a rotation step changed the root, the service
/// restarts on the same address with it (and a serving certificate from
/// its active root), and the bundle is published again. `addr` is told the
/// address once listening.
pub async fn serve(
    client: Client,
    store: RootStore,
    opts: CaOptions,
    clock: SharedClock,
    serving: Serving,
    addr: tokio::sync::watch::Sender<Option<SocketAddr>>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> Result<(), Error> {
    let mut root = load_root(Some(&client), &store, opts.clone(), clock.clone(), true).await?;
    let (mut server, mut renew_at) =
        start_server(&root.ca, &serving, serving.listen, &clock).await?;
    let bound = server.local_addr();
    tracing::info!(addr = %bound, %store, "CA service listening");
    addr.send_replace(Some(bound));
    let mut published: Option<String> = None;
    let mut poll = tokio::time::interval(serving.poll);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let pem = root.ca.bundle().to_pem();
        // Applied on every poll, not only when the bundle changes: a
        // ConfigMap deleted or edited by hand comes back (nothing else
        // writes it, and agents starting meanwhile would wait for it).
        // An unchanged apply changes nothing on the server.
        if let Some(cm) = &serving.bundle_configmap {
            match publish_bundle(&client, cm, &pem).await {
                Ok(()) if published.as_ref() != Some(&pem) => {
                    tracing::info!(configmap = %cm, roots = root.ca.bundle().fingerprints().len(), "trust bundle published");
                    published = Some(pem);
                }
                Ok(()) => {}
                // Tried again on the next poll.
                Err(e) => tracing::warn!(error = %e, "trust bundle not published"),
            }
        }
        tokio::select! {
            _ = stop.changed() => break,
            _ = poll.tick() => {}
        }
        match reload_if_changed(Some(&client), &store, &root, opts.clone(), clock.clone()).await {
            Ok(None) => {}
            Ok(Some(new)) => {
                tracing::info!(%store, "the CA root changed; serving it");
                server.shutdown().await;
                root = new;
                (server, renew_at) = start_server(&root.ca, &serving, bound, &clock).await?;
                continue;
            }
            Err(e) => tracing::warn!(error = %e, "reading the CA root; keeping the one in use"),
        }
        // The service's own certificate is renewed at half its life, as the
        // workloads' are: a CA up longer than its lifetime must not start
        // refusing every agent's handshake.
        if clock.now() >= renew_at {
            tracing::info!("the CA's serving certificate is at half its life; serving a new one");
            server.shutdown().await;
            (server, renew_at) = start_server(&root.ca, &serving, bound, &clock).await?;
        }
    }
    server.shutdown().await;
    Ok(())
}

/// Runs the CA service until `stop` fires.
pub async fn run(args: CaArgs, stop: tokio::sync::watch::Receiver<bool>) -> Result<(), Error> {
    let clock: SharedClock = Arc::new(SystemClock);
    let opts = args.root.options();
    let store = args.root.store()?;
    let client = Client::try_default()
        .await
        .map_err(|e| Error::Kube(Box::new(e)))?;
    let ns = config::pod_namespace();
    let allowed = if args.allowed_users.is_empty() {
        vec![format!("system:serviceaccount:{ns}:sluice-agent")]
    } else {
        args.allowed_users.clone()
    };
    let dns_names: Vec<String> = if args.dns_names.is_empty() {
        vec![
            format!("sluice-ca.{ns}.svc"),
            format!("sluice-ca.{ns}.svc.cluster.local"),
        ]
    } else {
        args.dns_names.clone()
    };
    let auth = TokenReviewAuthenticator::new(
        TokenReviewConfig::in_cluster(allowed, vec![args.token_audience.clone()])
            .map_err(Error::Auth)?,
    )
    .map_err(Error::Auth)?;
    let pods = Arc::new(PodIdentities::new(&args.root.trust_domain));
    let watch = tokio::spawn(pods.clone().watch(client.clone()));
    let serving = Serving {
        listen: args.listen,
        dns_names,
        ips: Vec::new(),
        authenticator: Arc::new(auth),
        authoriser: Arc::new(NodeAuthoriser::new(pods)),
        bundle_configmap: args.bundle_configmap.clone(),
        poll: ROOT_POLL,
    };
    let (addr, _) = tokio::sync::watch::channel(None);
    let r = serve(client, store, opts, clock, serving, addr, stop).await;
    watch.abort();
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The serving certificate renews at half its life, but never within
    /// the hour: one its root's end cut short stays no shorter when
    /// renewed, and halving what is left each time would restart the
    /// service on every poll.
    #[test]
    fn the_serving_certificate_renews_at_half_life_not_within_the_hour() {
        use std::time::{Duration, SystemTime};
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let day = Duration::from_secs(86_400);
        assert_eq!(serving_renewal(now, now + 90 * day, now), now + 45 * day);
        let cut = serving_renewal(
            now - Duration::from_secs(300),
            now + Duration::from_secs(1800),
            now,
        );
        assert_eq!(cut, now + Duration::from_secs(3600));
    }

    fn pod(ns: &str, name: &str, sa: &str, node: &str) -> Pod {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": ns},
            "spec": {"serviceAccountName": sa, "nodeName": node, "containers": []}
        }))
        .unwrap()
    }

    /// A directory store written by someone else after a step read it (two
    /// rotations at once) is not overwritten: the later write is refused,
    /// as a Secret's is by its resourceVersion, and the store keeps the
    /// first step's result.
    #[tokio::test]
    async fn a_directory_store_changed_meanwhile_is_not_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let store = RootStore::Dir(dir.path().join("root"));
        let clock: SharedClock = Arc::new(SystemClock);
        let opts = CaOptions::default();
        let first = load_root(None, &store, opts.clone(), clock.clone(), true)
            .await
            .unwrap();
        // Another step runs in between: a root is prepared.
        rotate(None, &store, RotateStep::Prepare, opts, clock)
            .await
            .unwrap();
        let RootStore::Dir(d) = &store else {
            unreachable!()
        };
        let prepared = read_files(&store, d).unwrap();
        assert!(prepared.contains_key(NEXT_ROOT_KEY));
        // The first step writes what it computed from the older state.
        let e = write_store(None, &store, &first.files, (None, &first.files))
            .await
            .unwrap_err();
        assert!(
            e.to_string().contains("changed while the rotation ran"),
            "{e}"
        );
        assert_eq!(read_files(&store, d).unwrap(), prepared, "left as it was");
    }

    /// A write cut short after the first file (here: the certificate cannot
    /// be written) has put the key in place already: an activation then
    /// leaves the new key where the CA's next start finds it.
    #[test]
    fn root_files_are_written_keys_first_and_removed_last() {
        let dir = tempfile::tempdir().unwrap();
        let store = RootStore::Dir(dir.path().into());
        std::fs::write(dir.path().join(NEXT_ROOT_KEY), b"new key").unwrap();
        // root-cert.pem cannot be replaced: a directory stands there.
        std::fs::create_dir(dir.path().join(ROOT_CERT)).unwrap();
        std::fs::write(dir.path().join(ROOT_CERT).join("x"), b"").unwrap();
        let files = RootFiles::from([
            (ROOT_CERT.to_string(), b"new cert".to_vec()),
            (ROOT_KEY.to_string(), b"new key".to_vec()),
        ]);
        assert!(write_files(&store, dir.path(), &files).is_err());
        assert_eq!(
            std::fs::read(dir.path().join(ROOT_KEY)).unwrap(),
            b"new key"
        );
        assert!(
            dir.path().join(NEXT_ROOT_KEY).exists(),
            "nothing is removed before every file is written"
        );
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

    /// An authoriser over an empty pod index, node A's agent asking, and
    /// the identity it asks for.
    fn node_a_authoriser() -> (
        Arc<PodIdentities>,
        certs::ca::auth::NodeAuthoriser,
        certs::ca::auth::Caller,
        SpiffeId,
    ) {
        let p = Arc::new(PodIdentities::new("cluster.local"));
        let web: SpiffeId = "spiffe://cluster.local/ns/shop/sa/web".parse().unwrap();
        let authz = certs::ca::auth::NodeAuthoriser::new(p.clone());
        let caller = certs::ca::auth::Caller {
            subject: "system:serviceaccount:sluice-system:sluice-agent".into(),
            node: "node-a".into(),
        };
        (p, authz, caller, web)
    }

    #[test]
    fn until_the_pods_are_listed_requests_are_told_to_come_back() {
        use certs::ca::auth::{AuthError, Authoriser};
        let (p, authz, caller, web) = node_a_authoriser();
        assert!(matches!(
            authz.authorise(&caller, &web),
            Err(AuthError::Unavailable { .. })
        ));
        p.reset(&[pod("shop", "web-1", "web", "node-a")]);
        assert!(authz.authorise(&caller, &web).is_ok());
        let db: SpiffeId = "spiffe://cluster.local/ns/shop/sa/db".parse().unwrap();
        assert!(matches!(
            authz.authorise(&caller, &db),
            Err(AuthError::Forbidden { .. })
        ));
    }

    /// A pods watch failing for longer than STALE_AFTER: the index may be
    /// out of date, so requests are told to come back (503) until it works
    /// again, rather than authorised by who ran where.
    #[tokio::test(start_paused = true)]
    async fn a_pods_watch_failing_for_long_makes_requests_come_back_later() {
        use certs::ca::auth::{AuthError, Authoriser};
        let (p, authz, caller, web) = node_a_authoriser();
        p.reset(&[pod("shop", "web-1", "web", "node-a")]);
        let step = std::time::Duration::from_secs(30);
        // Failing (as the watcher retries) for less than STALE_AFTER: fine.
        let mut failed_for = std::time::Duration::ZERO;
        while failed_for < STALE_AFTER {
            assert!(
                authz.authorise(&caller, &web).is_ok(),
                "failing {failed_for:?}"
            );
            p.watch_failed();
            tokio::time::advance(step).await;
            failed_for += step;
        }
        p.watch_failed();
        assert!(matches!(
            authz.authorise(&caller, &web),
            Err(AuthError::Unavailable { .. })
        ));
        // A good event: at once.
        p.watch_works();
        assert!(authz.authorise(&caller, &web).is_ok());
        // Or no failure for RESUMED_AFTER (a quiet cluster sends nothing).
        for _ in 0..12 {
            p.watch_failed();
            tokio::time::advance(step).await;
        }
        assert!(authz.authorise(&caller, &web).is_err());
        tokio::time::advance(RESUMED_AFTER).await;
        assert!(authz.authorise(&caller, &web).is_ok());
    }

    #[test]
    fn a_static_pod_gives_its_node_no_identity() {
        let p = PodIdentities::new("cluster.local");
        let default: SpiffeId = "spiffe://cluster.local/ns/payments/sa/default"
            .parse()
            .unwrap();
        // The mirror of a manifest a node's root wrote: no service account.
        let mirror: Pod = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {
                "name": "x-node-a", "namespace": "payments",
                "annotations": {"kubernetes.io/config.mirror": "abc"}
            },
            "spec": {"nodeName": "node-a", "containers": []}
        }))
        .unwrap();
        p.apply(&mirror);
        assert!(!p.runs_on("node-a", &default));
        // Even if it named one, a mirror pod counts for nothing.
        let mut named = mirror.clone();
        named.spec.as_mut().unwrap().service_account_name = Some("default".into());
        p.apply(&named);
        assert!(!p.runs_on("node-a", &default));
        // A pod the API server admitted names its account, `default` too.
        p.apply(&pod("payments", "api-1", "default", "node-a"));
        assert!(p.runs_on("node-a", &default));
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
