//! The files source: a directory of Kubernetes-style YAML manifests
//! (multi-document files allowed) plus `kind: SluiceWorkloads` documents for
//! what kubelets would report ([`format`]). Standalone mode reads it.
//!
//! The directory is watched (inotify, with a slow poll as a safety net). A
//! file that fails to parse is reported with its path, document number,
//! object and field, and its last good version stays in force; the other
//! files' changes still apply.
//!
//! Services with a selector and no EndpointSlice of their own get slices
//! derived from the matching workloads, as the endpoint controller would.

pub mod format;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    path::{Path, PathBuf},
    sync::mpsc,
    time::Duration,
};

use crate::gateway::{GrpcRoute, HttpRoute};
use k8s_openapi::{
    api::{
        core::v1::{Namespace, ObjectReference, Service},
        discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice},
    },
    apimachinery::pkg::util::intstr::IntOrString,
};
use kube::{ResourceExt as _, api::ObjectMeta};
use serde::{Serialize, de::DeserializeOwned};

use self::format::{WorkloadEntry, WorkloadsDoc};
use crate::{
    admin::api::ConfigError,
    config,
    crds::{AccessPolicy, MeshPolicy},
    reconcile::{Input, routes::RouteRefs},
    state::{Key, Kind, NodeInfo, Object, Update, Workload},
};

/// Errors that stop the source itself (not a bad file: those are reported
/// and skipped).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "reading the files source directory {dir}: {source}; create it or pass another with --source files:<dir>"
    )]
    Dir {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("watching {dir} for changes: {source}")]
    Watch {
        dir: PathBuf,
        #[source]
        source: notify::Error,
    },
}

/// What one file contributes.
#[derive(Clone, Debug, Default)]
struct Parsed {
    objects: Vec<Object>,
    workloads: Vec<WorkloadsDoc>,
}

/// A document of a kind the source reads, in an apiVersion it does not:
/// ignored with a note, unless it names an object the file's last good
/// version defined (then the edit would delete that object by mistake).
struct OtherVersion {
    kind: String,
    key: Key,
    /// The apiVersion written.
    api: String,
    /// The note, in `ignored`.
    note: usize,
}

impl OtherVersion {
    /// `HTTPRoute shop/r`; the workloads document by its kind alone.
    fn name(kind: &str, key: &Key) -> String {
        if kind == format::KIND {
            kind.to_string()
        } else {
            format!("{kind} {key}")
        }
    }

    /// Whether `p` defines the object this document was meant to (for the
    /// workloads document, any: it has no name of its own that matters).
    fn defined_in(&self, p: &Parsed) -> bool {
        if self.kind == format::KIND {
            return !p.workloads.is_empty();
        }
        p.objects
            .iter()
            .any(|o| o.kind().to_string() == self.kind && o.key() == self.key)
    }
}

#[derive(Clone, Debug, Default)]
struct FileState {
    /// What was last read (`None`: unreadable then, so read in full again).
    contents: Option<String>,
    /// Some version of the file has parsed since the agent started.
    ever_good: bool,
    /// When the file appeared (see `FilesSource::next_seen`).
    seen: u64,
    /// The last version of the file that parsed.
    good: Parsed,
    errors: Vec<ConfigError>,
}

/// How long the directory must be quiet after a change before it is read,
/// and the longest wait for that.
const QUIET: Duration = Duration::from_millis(100);
const QUIET_MAX: Duration = Duration::from_secs(2);

/// Whether a watch event can mean changed contents. The agent's own reads
/// (open, read, close after reading) cannot: forwarding them made every
/// reload trigger the next.
fn is_change(kind: &notify::EventKind) -> bool {
    use notify::event::{AccessKind, AccessMode, EventKind};
    match kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) => false,
        _ => true,
    }
}

/// Watches `dir` and below, sending the paths of each change.
fn watch(
    dir: &Path,
    tx: tokio::sync::mpsc::UnboundedSender<Vec<PathBuf>>,
) -> Result<notify::RecommendedWatcher, notify::Error> {
    use notify::Watcher as _;
    let mut watcher = notify::recommended_watcher(move |ev: notify::Result<notify::Event>| {
        if let Ok(ev) = ev
            && is_change(&ev.kind)
        {
            let _ = tx.send(ev.paths);
        }
    })?;
    watcher.watch(dir, notify::RecursiveMode::Recursive)?;
    Ok(watcher)
}

/// The state of the directory.
#[derive(Debug)]
pub struct FilesSource {
    dir: PathBuf,
    files: BTreeMap<PathBuf, FileState>,
    /// Numbers the files in the order they appeared (path order within one
    /// reload): of two files defining one object, the earlier one keeps it.
    next_seen: u64,
    /// Subdirectories that could not be listed in the last reload: their
    /// files keep their last good version.
    unlisted: Vec<(PathBuf, ConfigError)>,
}

fn is_manifest(p: &Path) -> bool {
    matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml"))
}

fn is_hidden(p: &Path) -> bool {
    p.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with('.'))
}

/// The manifests under `dir`. A subdirectory that cannot be listed (no
/// permission, a symlink loop) is recorded in `unlisted` and skipped; only
/// the top directory failing is an error.
fn list(
    dir: &Path,
    out: &mut Vec<PathBuf>,
    unlisted: &mut Vec<(PathBuf, std::io::Error)>,
) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let p = entry.path();
        if is_hidden(&p) {
            continue;
        }
        // A symbolic link that cannot be followed for another reason than a
        // missing target (a loop, say) may hide a directory.
        if entry.file_type()?.is_symlink()
            && let Err(e) = std::fs::metadata(&p)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            unlisted.push((p, e));
            continue;
        }
        if p.is_dir() {
            if let Err(e) = list(&p, out, unlisted) {
                unlisted.push((p, e));
            }
        } else if is_manifest(&p) {
            out.push(p);
        }
    }
    Ok(())
}

fn error(
    file: &Path,
    object: Option<String>,
    field: Option<String>,
    message: impl Into<String>,
) -> ConfigError {
    ConfigError {
        source: file.display().to_string(),
        object,
        field,
        message: message.into(),
    }
}

/// Reads a document as `T`, refusing fields `T` does not have: a typo
/// (`selctor:` in a MeshPolicy, `matchs:` in a route rule) would otherwise
/// be dropped and its object taken without it (a namespace-wide policy, a
/// rule matching every request), where `kubectl apply` refuses it.
fn typed<T: DeserializeOwned + Serialize>(
    value: serde_yaml::Value,
) -> Result<T, (Option<String>, String)> {
    let read: T = serde_path_to_error::deserialize(value.clone()).map_err(|e| {
        let path = e.path().to_string();
        let field = (path != "." && !path.is_empty()).then_some(path);
        (field, e.into_inner().to_string())
    })?;
    // What `T` keeps of the document, written back: a field of the
    // document with a value and nothing there was dropped.
    let kept = serde_yaml::to_value(&read).map_err(|e| (None, e.to_string()))?;
    if let Some(field) = unknown_field(&value, &kept, String::new()) {
        return Err((
            Some(field),
            "unknown field: the agent's types for this kind (Kubernetes 1.32, Gateway API's \
             experimental channel of its release, Sluice's CRDs) have no such field; misspelt, \
             in the wrong place, or from a newer API than this agent reads, it would be ignored"
                .into(),
        ));
    }
    Ok(read)
}

/// The path of the first field of `doc` that `kept` lacks, in the form of
/// `serde_path_to_error` (`spec.rules[0].matchs`). Fields without a value
/// (null, `[]`, `{}`) are passed over: they say nothing, and types leave
/// empty lists out when they write themselves back.
fn unknown_field(
    doc: &serde_yaml::Value,
    kept: &serde_yaml::Value,
    path: String,
) -> Option<String> {
    use serde_yaml::Value;
    let empty = |v: &Value| match v {
        Value::Null => true,
        Value::Sequence(s) => s.is_empty(),
        Value::Mapping(m) => m.is_empty(),
        _ => false,
    };
    match (doc, kept) {
        (Value::Mapping(d), Value::Mapping(k)) => d.iter().find_map(|(key, v)| {
            let name = match key {
                Value::String(s) => s.clone(),
                other => serde_yaml::to_string(other).ok()?.trim().to_string(),
            };
            let here = if path.is_empty() {
                name
            } else {
                format!("{path}.{name}")
            };
            match k.get(key) {
                None if empty(v) => None,
                None => Some(here),
                Some(kv) => unknown_field(v, kv, here),
            }
        }),
        (Value::Sequence(d), Value::Sequence(k)) => d
            .iter()
            .zip(k)
            .enumerate()
            .find_map(|(i, (v, kv))| unknown_field(v, kv, format!("{path}[{i}]"))),
        (Value::Tagged(d), _) => unknown_field(&d.value, kept, path),
        _ => None,
    }
}

/// A Service that is not headless or ExternalName needs its cluster IP
/// written out: in a cluster the API server allocates one, here nothing
/// does, and without one the Service would balance nothing while routes
/// attached to it showed as accepted.
fn needs_cluster_ip(svc: &Service) -> Result<(), (Option<String>, String)> {
    let Some(spec) = &svc.spec else {
        return Err((Some("spec".into()), "missing".into()));
    };
    if spec.type_.as_deref() == Some("ExternalName") {
        return Ok(());
    }
    let given = spec
        .cluster_ips
        .iter()
        .flatten()
        .chain(&spec.cluster_ip)
        .any(|ip| !ip.is_empty());
    if given {
        return Ok(());
    }
    Err((
        Some("spec.clusterIP".into()),
        "missing: the files source allocates no cluster IP, so give one (host-namespace \
         addresses: 127.96.0.0/16), or None for a headless Service"
            .into(),
    ))
}

/// A hand-written EndpointSlice says which Service it serves: without the
/// label it would serve none, and a Service without a selector (whose
/// endpoints are only such slices) would refuse every connection.
fn names_its_service(slice: &EndpointSlice) -> Result<(), (Option<String>, String)> {
    let label = "kubernetes.io/service-name";
    match slice.metadata.labels.as_ref().and_then(|l| l.get(label)) {
        Some(name) if !name.is_empty() => Ok(()),
        _ => Err((
            Some(format!("metadata.labels.{label}")),
            "missing: the label names the Service whose endpoints the slice lists".into(),
        )),
    }
}

/// A route's parent of kind Service needs `group: ""`: the Gateway API CRDs
/// default a missing group to `gateway.networking.k8s.io`, so in a cluster
/// such a route attaches to nothing; read here as the core group, the same
/// file would work standalone and silently not in a cluster.
fn service_parents_grouped(
    parents: Vec<crate::reconcile::routes::ParentRef>,
) -> Result<(), (Option<String>, String)> {
    match parents
        .iter()
        .position(|p| p.kind.as_deref() == Some("Service") && p.group.is_none())
    {
        None => Ok(()),
        Some(i) => Err((
            Some(format!("spec.parentRefs[{i}].group")),
            "missing: a Service parent needs group: \"\" (a cluster defaults a missing group to \
             gateway.networking.k8s.io, where no Service is, and the route would attach to \
             nothing)"
                .into(),
        )),
    }
}

fn with_default_ns(meta: &mut ObjectMeta) {
    if meta.namespace.as_deref().unwrap_or("").is_empty() {
        meta.namespace = Some("default".into());
    }
}

/// Parses one file. Errors make the whole file count as broken.
fn parse_file(
    path: &Path,
    contents: &str,
) -> (
    Parsed,
    Vec<ConfigError>,
    Vec<ConfigError>,
    Vec<OtherVersion>,
) {
    let mut parsed = Parsed::default();
    let mut errors = Vec::new();
    let mut ignored = Vec::new();
    let mut other_versions = Vec::new();
    for (i, doc) in serde_yaml::Deserializer::from_str(contents).enumerate() {
        let n = i + 1;
        let mut value = match <serde_yaml::Value as serde::Deserialize>::deserialize(doc) {
            Ok(v) => v,
            Err(e) => {
                errors.push(error(
                    path,
                    Some(format!("document {n}")),
                    None,
                    e.to_string(),
                ));
                // The YAML stream cannot be read past a syntax error.
                break;
            }
        };
        // Merge keys (`<<: *defaults`) as kubectl reads them: their fields
        // are the object's.
        if let Err(e) = value.apply_merge() {
            errors.push(error(
                path,
                Some(format!("document {n}")),
                None,
                format!("merge key (<<): {e}"),
            ));
            continue;
        }
        if value.is_null() {
            continue; // an empty document (`---` at the end)
        }
        let mut read = Read {
            path,
            parsed: &mut parsed,
            errors: &mut errors,
            ignored: &mut ignored,
            other_versions: &mut other_versions,
        };
        // A `kind: List` (what `kubectl get -o yaml` writes for several
        // objects) is read as its items, as `kubectl apply` reads it.
        if value.get("apiVersion").and_then(|v| v.as_str()) == Some("v1")
            && value.get("kind").and_then(|v| v.as_str()) == Some("List")
        {
            match value.get_mut("items").map(std::mem::take) {
                Some(serde_yaml::Value::Sequence(items)) => {
                    for (j, item) in items.into_iter().enumerate() {
                        read.document(format!("document {n}, item {}", j + 1), item);
                    }
                }
                Some(serde_yaml::Value::Null) | None => {}
                Some(_) => read.errors.push(error(
                    path,
                    Some(format!("document {n} (List)")),
                    Some("items".into()),
                    "not a list of objects",
                )),
            }
            continue;
        }
        read.document(format!("document {n}"), value);
    }
    (parsed, errors, ignored, other_versions)
}

/// Where [`parse_file`] puts what one document defines.
struct Read<'a> {
    path: &'a Path,
    parsed: &'a mut Parsed,
    errors: &'a mut Vec<ConfigError>,
    ignored: &'a mut Vec<ConfigError>,
    other_versions: &'a mut Vec<OtherVersion>,
}

impl Read<'_> {
    /// Reads one object, `doc` saying where it is in its file.
    fn document(&mut self, doc: String, value: serde_yaml::Value) {
        let Read {
            path,
            ref mut parsed,
            ref mut errors,
            ref mut ignored,
            ref mut other_versions,
        } = *self;
        let api = value
            .get("apiVersion")
            .and_then(|v| v.as_str())
            .unwrap_or("")
            .to_string();
        let kind = value
            .get("kind")
            .and_then(|v| v.as_str())
            .unwrap_or("")
            .to_string();
        let name = value
            .get("metadata")
            .and_then(|m| m.get("name"))
            .and_then(|v| v.as_str())
            .unwrap_or("")
            .to_string();
        let what = if name.is_empty() {
            format!("{doc} ({kind})")
        } else {
            format!("{doc} ({kind} {name})")
        };
        if api.is_empty() || kind.is_empty() {
            errors.push(error(
                path,
                Some(doc.clone()),
                Some(if api.is_empty() { "apiVersion" } else { "kind" }.into()),
                "missing: every document needs apiVersion and kind",
            ));
            return;
        }
        // Only what is read needs a name: a kustomization.yaml or a kind
        // the source does not read is a note, whatever it holds.
        let read_here = kind != format::KIND && read_api_version(&kind) == Some(api.as_str());
        if read_here && name.is_empty() {
            let not_text = value
                .get("metadata")
                .and_then(|m| m.get("name"))
                .is_some_and(|v| !v.is_null());
            errors.push(error(
                path,
                Some(what),
                Some("metadata.name".into()),
                if not_text {
                    "not a string: quote it"
                } else {
                    "missing"
                },
            ));
            return;
        }
        // A kind misspelt is not another kind: `MeshPolicy` as `Meshpolicy`
        // or `HTTPRoute` as `HttpRoute` would be passed over as a kind not
        // read, and an edit that misspelt a defined object's kind would
        // remove it. An API server refuses such kinds too.
        if read_api_version(&kind).is_none() {
            let meant = READ_KINDS
                .iter()
                .map(|(k, _)| k)
                .find(|k| k.eq_ignore_ascii_case(&kind));
            let ours = api.split('/').next() == crate::crds::API_VERSION.split('/').next();
            if meant.is_some() || ours {
                let message = match meant {
                    Some(k) => {
                        format!("unknown kind {kind:?}: kinds are case-sensitive; write {k}")
                    }
                    None => format!(
                        "unknown kind {kind:?} in {api}: the kinds of sluice.dev are MeshPolicy, \
                         AccessPolicy and {}",
                        format::KIND
                    ),
                };
                errors.push(error(path, Some(what), Some("kind".into()), message));
                return;
            }
        }
        let result: Result<Option<Object>, (Option<String>, String)> = match (
            api.as_str(),
            kind.as_str(),
        ) {
            ("v1", "Namespace") => typed::<Namespace>(value).map(|o| Some(Object::Namespace(o))),
            ("v1", "Service") => typed::<Service>(value)
                .and_then(|o| needs_cluster_ip(&o).map(|()| o))
                .map(|mut o| {
                    with_default_ns(&mut o.metadata);
                    Some(Object::Service(o))
                }),
            ("discovery.k8s.io/v1", "EndpointSlice") => typed::<EndpointSlice>(value)
                .and_then(|o| names_its_service(&o).map(|()| o))
                .map(|mut o| {
                    with_default_ns(&mut o.metadata);
                    Some(Object::EndpointSlice(o))
                }),
            ("gateway.networking.k8s.io/v1", "HTTPRoute") => typed::<HttpRoute>(value)
                .and_then(|o| service_parents_grouped(RouteRefs::of_http(&o).parents).map(|()| o))
                .map(|mut o| {
                    with_default_ns(&mut o.metadata);
                    Some(Object::HTTPRoute(o))
                }),
            ("gateway.networking.k8s.io/v1", "GRPCRoute") => typed::<GrpcRoute>(value)
                .and_then(|o| service_parents_grouped(RouteRefs::of_grpc(&o).parents).map(|()| o))
                .map(|mut o| {
                    with_default_ns(&mut o.metadata);
                    Some(Object::GRPCRoute(o))
                }),
            (crate::crds::API_VERSION, "MeshPolicy") => typed::<MeshPolicy>(value).map(|mut o| {
                with_default_ns(&mut o.metadata);
                Some(Object::MeshPolicy(o))
            }),
            (crate::crds::API_VERSION, "AccessPolicy") => {
                typed::<AccessPolicy>(value).map(|mut o| {
                    with_default_ns(&mut o.metadata);
                    Some(Object::AccessPolicy(o))
                })
            }
            (crate::crds::API_VERSION, format::KIND) => typed::<WorkloadsDoc>(value).map(|d| {
                parsed.workloads.push(d);
                None
            }),
            _ => {
                let message = match read_api_version(&kind) {
                    // A kind it reads, in another version: say which one.
                    Some(read) => {
                        let key = if kind == "Namespace" {
                            Key::cluster(&name)
                        } else {
                            let ns = value
                                .get("metadata")
                                .and_then(|m| m.get("namespace"))
                                .and_then(|v| v.as_str())
                                .filter(|ns| !ns.is_empty())
                                .unwrap_or("default");
                            Key::new(ns, &name)
                        };
                        let message = format!(
                            "ignored: the files source reads {kind} as apiVersion {read}, not \
                                 {api}: this document defines nothing (write apiVersion: {read} for \
                                 it to define {})",
                            OtherVersion::name(&kind, &key)
                        );
                        other_versions.push(OtherVersion {
                            kind: kind.clone(),
                            key,
                            api: api.clone(),
                            note: ignored.len(),
                        });
                        message
                    }
                    // Not needed, rather than not supported: a directory
                    // written for an agent that read grants, or for a
                    // Gateway, still applies, and the note says why the
                    // grant changes nothing.
                    None if kind == "ReferenceGrant"
                        && api.starts_with("gateway.networking.k8s.io/") =>
                    {
                        format!(
                            "ignored: {api} {kind} is not read by the files source: mesh routes \
                                 need no ReferenceGrant (GEP-1294); a route's backends and mirror \
                                 targets may be in any namespace, since requests keep the caller's \
                                 identity and the target's AccessPolicy decides"
                        )
                    }
                    None => format!(
                        "ignored: {api} {kind} is not read by the files source (it reads Namespace, \
                             Service, EndpointSlice, HTTPRoute, GRPCRoute, MeshPolicy, AccessPolicy \
                             and {})",
                        format::KIND
                    ),
                };
                ignored.push(error(
                    path,
                    Some(what.clone()),
                    Some("apiVersion".into()),
                    message,
                ));
                Ok(None)
            }
        };
        match result {
            Ok(Some(o)) => parsed.objects.push(o),
            Ok(None) => {}
            Err((field, message)) => errors.push(error(path, Some(what), field, message)),
        }
    }
}

fn workload_of(e: &WorkloadEntry) -> Workload {
    Workload {
        namespace: e.namespace.clone(),
        name: e.name.clone(),
        uid: e
            .uid
            .clone()
            .unwrap_or_else(|| format!("files-{}-{}", e.namespace, e.name)),
        service_account: e.service_account.clone(),
        ips: e.all_ips(),
        node: e.node.clone(),
        labels: e.labels.clone(),
        annotations: e.annotations.clone(),
        ports: e.ports.clone(),
        cgroup: e.cgroup.clone(),
        interface: e.interface.clone(),
        ready: e.ready,
        terminating: e.terminating,
        finished: false,
        host_network: false,
    }
}

/// EndpointSlices for a Service with a selector, from the workloads it
/// selects: as the endpoint controller does, one slice per address family and
/// per set of resolved target ports (named ports may differ between pods).
pub fn derive_slices(
    svc: &Service,
    workloads: &[(&WorkloadEntry, Workload)],
) -> Vec<EndpointSlice> {
    let Some(spec) = &svc.spec else {
        return Vec::new();
    };
    let Some(selector) = spec.selector.as_ref().filter(|s| !s.is_empty()) else {
        return Vec::new();
    };
    let ns = svc.namespace().unwrap_or_default();
    let name = svc.name_any();
    let svc_ports: Vec<_> = spec.ports.iter().flatten().collect();
    // Not-ready pods are endpoints too, ready ones (as the endpoint
    // controller has them: peer discovery of StatefulSets).
    let publish_not_ready = spec.publish_not_ready_addresses == Some(true);
    // Target port of each service port for one workload (None: it lacks the named port).
    let targets = |e: &WorkloadEntry| -> Vec<Option<i32>> {
        svc_ports
            .iter()
            .map(|p| match &p.target_port {
                // As the API server defaults a missing, `0` or `""` one.
                None | Some(IntOrString::Int(0)) => Some(p.port),
                Some(IntOrString::String(s)) if s.is_empty() => Some(p.port),
                Some(IntOrString::Int(i)) => Some(*i),
                Some(IntOrString::String(s)) => e.ports.get(s).map(|n| i32::from(*n)),
            })
            .collect()
    };
    let mut groups: BTreeMap<Vec<Option<i32>>, Vec<&Workload>> = BTreeMap::new();
    for (e, w) in workloads {
        if w.namespace == ns && selector.iter().all(|(k, v)| w.labels.get(k) == Some(v)) {
            groups.entry(targets(e)).or_default().push(w);
        }
    }
    let has_family = |v4: bool| {
        spec.cluster_ips
            .iter()
            .flatten()
            .chain(spec.cluster_ip.iter())
            .filter_map(|ip| ip.parse::<IpAddr>().ok())
            .any(|ip| ip.is_ipv4() == v4)
    };
    let mut out = Vec::new();
    for (family, v4) in [("IPv4", true), ("IPv6", false)] {
        let mut made = 0;
        for (g, (ports, members)) in groups.iter().enumerate() {
            let endpoints: Vec<Endpoint> = members
                .iter()
                .flat_map(|w| {
                    w.ips
                        .iter()
                        .filter(|ip| ip.is_ipv4() == v4)
                        .map(|ip| Endpoint {
                            addresses: vec![ip.to_string()],
                            conditions: Some(EndpointConditions {
                                ready: Some(publish_not_ready || (w.ready && !w.terminating)),
                                serving: Some(w.ready),
                                terminating: Some(w.terminating),
                            }),
                            node_name: Some(w.node.clone()),
                            target_ref: Some(ObjectReference {
                                kind: Some("Pod".into()),
                                name: Some(w.name.clone()),
                                namespace: Some(w.namespace.clone()),
                                uid: Some(w.uid.clone()),
                                ..Default::default()
                            }),
                            ..Default::default()
                        })
                })
                .collect();
            if endpoints.is_empty() {
                continue;
            }
            let slice_ports = svc_ports
                .iter()
                .zip(ports)
                .filter_map(|(p, t)| {
                    t.map(|t| EndpointPort {
                        name: p.name.clone(),
                        port: Some(t),
                        protocol: Some(p.protocol.clone().unwrap_or_else(|| "TCP".into())),
                        app_protocol: p.app_protocol.clone(),
                    })
                })
                .collect();
            out.push(slice_named(
                &ns,
                &format!("{name}-{}-{g}", if v4 { "v4" } else { "v6" }),
                &name,
                family,
                endpoints,
                slice_ports,
            ));
            made += 1;
        }
        // A Service with no endpoints of a family it serves still gets an
        // (empty) slice, as in a cluster.
        if made == 0 && has_family(v4) {
            out.push(slice_named(
                &ns,
                &format!("{name}-{}", if v4 { "v4" } else { "v6" }),
                &name,
                family,
                Vec::new(),
                Vec::new(),
            ));
        }
    }
    out
}

fn slice_named(
    ns: &str,
    slice: &str,
    service: &str,
    family: &str,
    endpoints: Vec<Endpoint>,
    ports: Vec<EndpointPort>,
) -> EndpointSlice {
    EndpointSlice {
        metadata: ObjectMeta {
            name: Some(slice.into()),
            namespace: Some(ns.into()),
            labels: Some(BTreeMap::from([
                (config::SERVICE_NAME_LABEL.to_string(), service.to_string()),
                (
                    config::MANAGED_BY_LABEL.to_string(),
                    config::FILES_MANAGED_BY.to_string(),
                ),
            ])),
            ..Default::default()
        },
        address_type: family.into(),
        endpoints,
        ports: Some(ports),
    }
}

impl FilesSource {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            files: BTreeMap::new(),
            next_seen: 0,
            unlisted: Vec::new(),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The state of `path`, numbered when new.
    fn entry(&mut self, path: &Path) -> &mut FileState {
        let next = &mut self.next_seen;
        self.files.entry(path.to_path_buf()).or_insert_with(|| {
            *next += 1;
            FileState {
                seen: *next,
                ..FileState::default()
            }
        })
    }

    /// Re-reads the directory. Returns whether anything changed.
    pub fn reload(&mut self) -> Result<bool, Error> {
        let mut paths = Vec::new();
        let mut unlisted = Vec::new();
        list(&self.dir, &mut paths, &mut unlisted).map_err(|source| Error::Dir {
            dir: self.dir.clone(),
            source,
        })?;
        paths.sort();
        let unlisted: Vec<(PathBuf, ConfigError)> = unlisted
            .into_iter()
            .map(|(dir, e)| {
                let err = error(
                    &dir,
                    None,
                    None,
                    format!(
                        "cannot list this directory ({e}): the files under it keep their last \
                         good version; make it readable by the agent, or move it out of {}",
                        self.dir.display()
                    ),
                );
                (dir, err)
            })
            .collect();
        let mut changed = unlisted
            .iter()
            .map(|u| &u.1)
            .ne(self.unlisted.iter().map(|u| &u.1));
        self.unlisted = unlisted;
        let present: BTreeSet<&PathBuf> = paths.iter().collect();
        let before = self.files.len();
        let unlisted = &self.unlisted;
        self.files.retain(|p, _| {
            present.contains(p) || unlisted.iter().any(|(dir, _)| p.starts_with(dir))
        });
        changed |= self.files.len() != before;
        for path in &paths {
            let contents = match std::fs::read_to_string(path) {
                Ok(c) => c,
                // A symbolic link to a file that is gone: its objects go
                // too, as the target's removal would take them.
                Err(e)
                    if e.kind() == std::io::ErrorKind::NotFound
                        && std::fs::symlink_metadata(path).is_ok_and(|m| m.is_symlink()) =>
                {
                    let err = error(
                        path,
                        None,
                        None,
                        "a symbolic link to a missing file: it defines nothing; restore its \
                         target or remove the link",
                    );
                    let st = self.entry(path);
                    if st.errors != [err.clone()] || st.contents.is_some() {
                        *st = FileState {
                            contents: None,
                            good: Parsed::default(),
                            // It defines nothing: nothing unknown.
                            ever_good: true,
                            errors: vec![err],
                            seen: st.seen,
                        };
                        changed = true;
                    }
                    continue;
                }
                // Removed between listing and reading: the next reload sees it.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => {
                    let hint = if e.kind() == std::io::ErrorKind::InvalidData {
                        "it is not UTF-8 text"
                    } else {
                        "make it readable by the agent"
                    };
                    let err = error(
                        path,
                        None,
                        None,
                        format!("cannot read ({e}): the file's last good version stays; {hint}"),
                    );
                    let st = self.entry(path);
                    // Read again in full once readable, even if unchanged.
                    st.contents = None;
                    if st.errors != [err.clone()] {
                        st.errors = vec![err];
                        changed = true;
                    }
                    continue;
                }
            };
            if self
                .files
                .get(path)
                .is_some_and(|st| st.contents.as_ref() == Some(&contents))
            {
                continue;
            }
            changed = true;
            let (parsed, mut errors, mut ignored, other_versions) = parse_file(path, &contents);
            let st = self.entry(path);
            // An object the file's last good version defined, now in a
            // version the source does not read: an edit gone wrong, not a
            // removal. Kept, like any broken file, until it is fixed.
            // (Unless this version still defines it in the right version.)
            let mut refused = Vec::new();
            for o in other_versions.iter().rev() {
                if o.defined_in(&st.good) && !o.defined_in(&parsed) {
                    let mut e = ignored.remove(o.note);
                    let read = read_api_version(&o.kind).unwrap_or_default();
                    e.message = format!(
                        "{}: apiVersion {} is not read (the files source reads {read}); the \
                         file's last good version defines it, so this edit would remove it: \
                         write apiVersion: {read}, or delete the document to remove it",
                        OtherVersion::name(&o.kind, &o.key),
                        o.api
                    );
                    refused.push(e);
                }
            }
            // In document order.
            errors.extend(refused.into_iter().rev());
            st.contents = Some(contents);
            // A file emptied while a command writes it (`kubectl get ... >
            // file`, `helm template ... > file`): its objects are not
            // removed for the moment (an API server refuses to apply an
            // empty file too). Deleting the file removes them.
            let nothing = st.contents.as_deref().is_some_and(|c| {
                c.lines().all(|l| {
                    let l = l.trim();
                    l.is_empty() || l.starts_with('#') || l == "---" || l == "..."
                })
            });
            if nothing && (!st.good.objects.is_empty() || !st.good.workloads.is_empty()) {
                errors.push(error(
                    path,
                    None,
                    None,
                    "no objects (empty, or comments only, as while a command writes it); to \
                     remove its objects, delete the file",
                ));
            }
            if errors.is_empty() {
                st.good = parsed;
                st.ever_good = true;
            } else {
                errors.push(error(
                    path,
                    None,
                    None,
                    if st.ever_good {
                        "the file's last good version stays in force until it is fixed"
                    } else {
                        "nothing in the file is in force until it is fixed"
                    },
                ));
            }
            errors.extend(ignored);
            st.errors = errors;
        }
        Ok(changed)
    }

    /// Problems found in the files, and conflicts between them.
    pub fn errors(&self) -> Vec<ConfigError> {
        let mut out: Vec<ConfigError> =
            self.files.values().flat_map(|f| f.errors.clone()).collect();
        out.extend(self.unlisted.iter().map(|(_, e)| e.clone()));
        out.extend(self.merge().1);
        out
    }

    /// The file that defines `object` (as the agent's checks name it:
    /// `Service shop/web`), the one that defined it first where several do.
    pub fn origin_of(&self, object: &str) -> Option<&Path> {
        let mut files: Vec<(&PathBuf, &FileState)> = self.files.iter().collect();
        files.sort_by_key(|(_, f)| f.seen);
        files.into_iter().find_map(|(path, f)| {
            f.good
                .objects
                .iter()
                .any(|o| format!("{} {}", o.kind(), o.key()) == object)
                .then_some(path.as_path())
        })
    }

    /// The whole directory as model objects, and the conflicts found merging
    /// files: the file that appeared first keeps an object both define (a
    /// copy made later, even one sorting first, does not take it over).
    fn merge(&self) -> (BTreeMap<Kind, BTreeMap<Key, Object>>, Vec<ConfigError>) {
        let mut by_kind: BTreeMap<Kind, BTreeMap<Key, Object>> = BTreeMap::new();
        let mut origin: BTreeMap<(Kind, Key), &Path> = BTreeMap::new();
        let mut conflicts = Vec::new();
        let mut entries: Vec<(&Path, &WorkloadEntry)> = Vec::new();
        let mut nodes: BTreeMap<String, NodeInfo> = BTreeMap::new();
        let mut files: Vec<(&PathBuf, &FileState)> = self.files.iter().collect();
        files.sort_by_key(|(_, f)| f.seen);
        for (path, f) in files {
            for o in &f.good.objects {
                let (kind, key) = (o.kind(), o.key());
                if let Some(first) = origin.get(&(kind, key.clone())) {
                    conflicts.push(error(
                        path,
                        Some(format!("{kind} {key}")),
                        None,
                        format!("also defined in {}; that one is used", first.display()),
                    ));
                    continue;
                }
                origin.insert((kind, key.clone()), path);
                by_kind.entry(kind).or_default().insert(key, o.clone());
            }
            for d in &f.good.workloads {
                for n in &d.nodes {
                    let mut addresses = n.addresses.clone();
                    addresses.extend(n.address.filter(|a| !n.addresses.contains(a)));
                    if nodes.contains_key(&n.name) {
                        conflicts.push(error(
                            path,
                            Some(format!("node {}", n.name)),
                            None,
                            "defined twice; the first is used",
                        ));
                        continue;
                    }
                    nodes.insert(
                        n.name.clone(),
                        NodeInfo {
                            name: n.name.clone(),
                            addresses,
                        },
                    );
                }
                entries.extend(d.workloads.iter().map(|w| (path.as_path(), w)));
            }
        }
        let mut pods: Vec<(&WorkloadEntry, Workload)> = Vec::new();
        let mut pod_keys: BTreeSet<Key> = BTreeSet::new();
        // The agent enrols and unenrols by uid and by cgroup: two workloads
        // sharing one would take turns, or unenrol the other.
        let mut uids: BTreeMap<String, Key> = BTreeMap::new();
        let mut cgroups: BTreeMap<PathBuf, Key> = BTreeMap::new();
        for (path, e) in entries {
            let w = workload_of(e);
            let taken = if pod_keys.contains(&w.key()) {
                Some("defined twice; the first is used".to_string())
            } else if let Some(other) = uids.get(&w.uid) {
                Some(format!(
                    "uid {:?} is already workload {other}'s; this one is left out",
                    w.uid
                ))
            } else {
                w.cgroup.as_ref().and_then(|c| cgroups.get(c)).map(|other| {
                    format!(
                        "cgroup {:?} is already workload {other}'s; this one is left out",
                        w.cgroup.as_deref().unwrap_or(Path::new(""))
                    )
                })
            };
            if let Some(message) = taken {
                conflicts.push(error(
                    path,
                    Some(format!("workload {}", w.key())),
                    None,
                    message,
                ));
                continue;
            }
            pod_keys.insert(w.key());
            uids.insert(w.uid.clone(), w.key());
            if let Some(c) = &w.cgroup {
                cgroups.insert(c.clone(), w.key());
            }
            pods.push((e, w));
        }
        // Derived slices for Services that have none of their own.
        let own: BTreeSet<Key> = by_kind
            .get(&Kind::EndpointSlice)
            .into_iter()
            .flat_map(|m| m.values())
            .filter_map(|o| match o {
                Object::EndpointSlice(s) => crate::state::slice_service(s),
                _ => None,
            })
            .collect();
        let services: Vec<Service> = by_kind
            .get(&Kind::Service)
            .into_iter()
            .flat_map(|m| m.values())
            .filter_map(|o| match o {
                Object::Service(s) => Some(s.clone()),
                _ => None,
            })
            .collect();
        for svc in services {
            if own.contains(&Key::of(&svc)) {
                continue;
            }
            let slices = by_kind.entry(Kind::EndpointSlice).or_default();
            for mut s in derive_slices(&svc, &pods) {
                // A hand-written slice of another Service may have the name
                // derived here (`web-v4-0` for Service `api`): never replace
                // it, take a free name instead.
                let base = s.metadata.name.clone().unwrap_or_default();
                let mut n = 1;
                while slices.contains_key(&Key::of(&s)) {
                    s.metadata.name = Some(format!("{base}-derived-{n}"));
                    n += 1;
                }
                slices.insert(Key::of(&s), Object::EndpointSlice(s));
            }
        }
        let pods_map = by_kind.entry(Kind::Pod).or_default();
        for (_, w) in pods {
            pods_map.insert(w.key(), Object::Pod(w));
        }
        let nodes_map = by_kind.entry(Kind::Node).or_default();
        for (name, n) in nodes {
            nodes_map.insert(Key::cluster(name), Object::Node(n));
        }
        (by_kind, conflicts)
    }

    /// The directory's full state: a `Replace` for every kind.
    pub fn updates(&self) -> Vec<Update> {
        let (mut by_kind, _) = self.merge();
        Kind::ALL
            .iter()
            .map(|k| {
                Update::Replace(
                    *k,
                    by_kind
                        .remove(k)
                        .unwrap_or_default()
                        .into_values()
                        .collect(),
                )
            })
            .collect()
    }

    /// Whether some file has not parsed once since the agent started (and
    /// so defines objects the agent does not know). A subdirectory it cannot
    /// list does not count: it may hold nothing (`lost+found`).
    pub fn incomplete(&self) -> bool {
        self.files
            .values()
            .any(|f| !f.ever_good && !f.errors.is_empty())
    }

    /// What to send the reconciler after a reload.
    pub fn inputs(&self, first: bool) -> Vec<Input> {
        let mut updates = self.updates();
        if first {
            updates.push(Update::Synced);
        }
        vec![
            Input::Updates(updates),
            Input::SourceErrors {
                source: format!("files:{}", self.dir.display()),
                errors: self.errors(),
                incomplete: self.incomplete(),
            },
        ]
    }

    /// Reads the directory, sends its state, then watches it and sends every
    /// change, until `stop` fires or the reconciler goes away.
    pub async fn run(
        mut self,
        tx: mpsc::Sender<Vec<Input>>,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) -> Result<(), Error> {
        self.reload()?;
        for e in self.errors() {
            tracing::warn!(error = %e, "files source");
        }
        if tx.send(self.inputs(true)).is_err() {
            return Ok(());
        }
        let (ev_tx, mut ev_rx) = tokio::sync::mpsc::unbounded_channel();
        // Kept while the source runs; without it (inotify out of instances
        // or watches, common on busy nodes), the periodic poll carries on.
        let _watcher = match watch(&self.dir, ev_tx) {
            Ok(w) => Some(w),
            Err(source) => {
                let e = Error::Watch {
                    dir: self.dir.clone(),
                    source,
                };
                tracing::warn!(
                    "{e}; changes are picked up by polling every {:?} instead",
                    config::FILES_POLL
                );
                None
            }
        };
        let mut poll = tokio::time::interval(config::FILES_POLL);
        loop {
            tokio::select! {
                _ = stop.changed() => return Ok(()),
                Some(_) = ev_rx.recv() => {
                    // Editors and `>` redirections write in several steps:
                    // wait for a quiet moment (bounded, for a file written
                    // without pause).
                    let deadline = tokio::time::Instant::now() + QUIET_MAX;
                    loop {
                        tokio::select! {
                            _ = stop.changed() => return Ok(()),
                            () = tokio::time::sleep(QUIET) => {}
                        }
                        let mut more = false;
                        while ev_rx.try_recv().is_ok() {
                            more = true;
                        }
                        if !more || tokio::time::Instant::now() >= deadline {
                            break;
                        }
                    }
                }
                _ = poll.tick() => {}
            }
            match self.reload() {
                Ok(false) => {}
                Ok(true) => {
                    tracing::info!(dir = %self.dir.display(), "files changed; reloading");
                    for e in self.errors() {
                        tracing::warn!(error = %e, "files source");
                    }
                    if tx.send(self.inputs(false)).is_err() {
                        return Ok(());
                    }
                }
                Err(e) => tracing::warn!(error = %e, "files source; keeping the last good state"),
            }
        }
    }
}

/// The apiVersion the files source reads `kind` as, for the kinds it reads.
fn read_api_version(kind: &str) -> Option<&'static str> {
    READ_KINDS.iter().find(|(k, _)| *k == kind).map(|(_, v)| *v)
}

/// The kinds the files source reads, and the apiVersion it reads each as.
const READ_KINDS: [(&str, &str); 8] = [
    ("Namespace", "v1"),
    ("Service", "v1"),
    ("EndpointSlice", "discovery.k8s.io/v1"),
    ("HTTPRoute", "gateway.networking.k8s.io/v1"),
    ("GRPCRoute", "gateway.networking.k8s.io/v1"),
    ("MeshPolicy", crate::crds::API_VERSION),
    ("AccessPolicy", crate::crds::API_VERSION),
    (format::KIND, crate::crds::API_VERSION),
];

#[cfg(test)]
mod tests;
