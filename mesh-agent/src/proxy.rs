//! The node proxy (`l7-proxy`) inside the agent: the agent's mesh view
//! translated into the proxy's [`Snapshot`] and published on a watch channel,
//! the original-destination lookup from ebpf-lb, and what the admin API shows
//! (connections, request counts, metrics).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
};

use crate::gateway::{GrpcRoute as GwGrpcRoute, HttpRoute as GwHttpRoute};
use l7_proxy::config::{
    AccessPolicy, AccessRule, AccessSource, BackendRef, Endpoint, GrpcMethodMatch, GrpcRoute,
    GrpcRouteMatch, GrpcRouteRule, HeaderModifier, HeaderPair, HttpConditions, HttpFilter,
    HttpRoute, HttpRouteMatch, HttpRouteRule, LocalWorkload, MtlsMode, ObjectRef, ParentRef,
    PathMatch, PathModifier, RequestMirror, RequestRedirect, Retry, Service, ServicePort, Snapshot,
    SpiffeId, Timeouts, UrlRewrite, ValueMatch, ValueMatchKind, Workload,
};
use prometheus_client::registry::Registry;
use serde_json::Value;
use tokio::sync::watch;

use crate::{
    admin::{ProxyHandle, api},
    config,
    crds::{self, PathMatchType},
    reconcile::{dataplane::Dataplane, mesh::MeshView},
    state::Key,
};

fn oref(k: &Key) -> ObjectRef {
    ObjectRef::new(&k.namespace, &k.name)
}

fn mode(m: crds::MtlsMode) -> MtlsMode {
    match m {
        crds::MtlsMode::Strict => MtlsMode::Strict,
        crds::MtlsMode::Permissive => MtlsMode::Permissive,
        crds::MtlsMode::Disabled => MtlsMode::Disabled,
    }
}

/// Where a pod's node proxy takes tunnels, if the pod is reached through it.
struct PodInfo {
    key: Key,
    identity: Option<SpiffeId>,
    node_proxy: Option<SocketAddr>,
}

/// The proxy's snapshot of the mesh view, and what could not be translated
/// (a route rule with an invalid field is left out and named).
pub fn snapshot(view: &MeshView, inbound_port: u16) -> (Snapshot, Vec<String>) {
    let mut errors = Vec::new();
    let node_addr = |node: &str, v4: bool| {
        view.nodes
            .iter()
            .find(|n| n.name == node)
            .and_then(|n| n.addresses.iter().find(|a| a.is_ipv4() == v4).copied())
    };
    // Pods by IP: identity, and the tunnel address when they are meshed and
    // not DISABLED.
    let mut pods: BTreeMap<IpAddr, PodInfo> = BTreeMap::new();
    for w in &view.workloads {
        let key = Key::new(&w.namespace, &w.name);
        let meshed = view.meshed_pods.contains(&key) && w.mtls_mode != crds::MtlsMode::Disabled;
        for ip in w.ips.iter().filter_map(|ip| ip.parse::<IpAddr>().ok()) {
            let node_proxy = meshed
                .then(|| node_addr(&w.node, ip.is_ipv4()))
                .flatten()
                .map(|a| SocketAddr::new(a, inbound_port));
            pods.insert(
                ip,
                PodInfo {
                    key: key.clone(),
                    identity: node_proxy.and(w.identity.parse().ok()),
                    node_proxy,
                },
            );
        }
    }
    let mut snap = Snapshot::default();
    for s in &view.services {
        let mut ports = Vec::new();
        let mut endpoints: BTreeMap<IpAddr, Endpoint> = BTreeMap::new();
        for p in s.ports.iter().filter(|p| p.protocol == "TCP") {
            ports.push(ServicePort {
                port: p.port,
                target_port: p.endpoints.first().map_or(p.port, |e| e.addr.port()),
                app_protocol: p.app_protocol.clone(),
            });
            for e in &p.endpoints {
                let ip = e.addr.ip();
                let pod = pods.get(&ip);
                let ep = endpoints.entry(ip).or_insert_with(|| Endpoint {
                    ip,
                    ready: e.ready,
                    workload: pod.map(|p| oref(&p.key)),
                    node_proxy: pod.and_then(|p| p.node_proxy),
                    identity: pod.and_then(|p| p.identity.clone()),
                });
                ep.ready |= e.ready;
            }
        }
        if ports.is_empty() {
            continue;
        }
        snap.services.push(Service {
            id: oref(&s.key),
            vips: s.vips.clone(),
            ports,
            endpoints: endpoints.into_values().collect(),
        });
    }
    for (ip, p) in &pods {
        if p.node_proxy.is_some() {
            snap.workloads.push(Workload {
                ip: *ip,
                id: oref(&p.key),
                node_proxy: p.node_proxy,
                identity: p.identity.clone(),
            });
        }
    }
    for w in view.workloads.iter().filter(|w| w.local && w.enrolled) {
        let Ok(identity) = w.identity.parse::<SpiffeId>() else {
            errors.push(format!(
                "pod {}/{}: {:?} is not a SPIFFE ID",
                w.namespace, w.name, w.identity
            ));
            continue;
        };
        for ip in w.ips.iter().filter_map(|ip| ip.parse().ok()) {
            snap.local_workloads.push(LocalWorkload {
                ip,
                id: ObjectRef::new(&w.namespace, &w.name),
                service_account: w.service_account.clone(),
                identity: identity.clone(),
                mtls_mode: mode(w.mtls_mode),
            });
        }
    }
    for r in &view.http_routes {
        snap.http_routes.push(http_route(r, &mut errors));
    }
    for r in &view.grpc_routes {
        snap.grpc_routes.push(grpc_route(r, &mut errors));
    }
    for p in &view.access_policies {
        snap.access_policies.extend(access_policies(p, &mut errors));
    }
    (snap, errors)
}

fn created_unix(meta: &kube::api::ObjectMeta) -> i64 {
    meta.creation_timestamp
        .as_ref()
        .map_or(0, |t| t.0.as_second())
}

fn str_of(v: &Value) -> Option<String> {
    v.as_str().map(str::to_string)
}

fn port_of(v: &Value) -> Option<u16> {
    v.as_u64().and_then(|p| u16::try_from(p).ok())
}

/// A Gateway API duration (`10s`, `1m30s`, `500ms`) in milliseconds.
fn millis(v: &Value, field: &str) -> Result<Option<u64>, String> {
    match v.as_str() {
        None => Ok(None),
        Some(s) => s
            .parse::<gateway_api::Duration>()
            .map(|d| Some(d.as_millis() as u64))
            .map_err(|e| format!("{field}: {s:?} is not a Gateway API duration: {e}")),
    }
}

/// A timeout: a zero duration disables it (GEP-1742).
fn timeout_millis(v: &Value, field: &str) -> Result<Option<u64>, String> {
    Ok(millis(v, field)?.filter(|ms| *ms > 0))
}

fn parents(v: &Value, route_ns: &str) -> Vec<ParentRef> {
    v.as_array()
        .into_iter()
        .flatten()
        .filter(|p| {
            matches!(p["group"].as_str(), None | Some("") | Some("core"))
                && p["kind"].as_str() == Some("Service")
        })
        .map(|p| ParentRef {
            service: ObjectRef::new(
                p["namespace"].as_str().unwrap_or(route_ns),
                p["name"].as_str().unwrap_or(""),
            ),
            port: port_of(&p["port"]),
        })
        .collect()
}

fn value_matches(v: &Value, field: &str) -> Result<Vec<ValueMatch>, String> {
    v.as_array()
        .into_iter()
        .flatten()
        .enumerate()
        .map(|(i, m)| {
            let kind = match m["type"].as_str().unwrap_or("Exact") {
                "Exact" => ValueMatchKind::Exact,
                "RegularExpression" => ValueMatchKind::RegularExpression,
                other => return Err(format!("{field}[{i}].type: {other:?} is not supported")),
            };
            Ok(ValueMatch {
                kind,
                name: str_of(&m["name"]).unwrap_or_default(),
                value: str_of(&m["value"]).unwrap_or_default(),
            })
        })
        .collect()
}

fn path_modifier(p: &Value, field: &str) -> Result<Option<PathModifier>, String> {
    if p.is_null() {
        return Ok(None);
    }
    match p["type"].as_str() {
        Some("ReplaceFullPath") => Ok(Some(PathModifier::ReplaceFullPath(
            str_of(&p["replaceFullPath"]).unwrap_or_default(),
        ))),
        Some("ReplacePrefixMatch") => Ok(Some(PathModifier::ReplacePrefixMatch(
            str_of(&p["replacePrefixMatch"]).unwrap_or_default(),
        ))),
        other => Err(format!("{field}.type: {other:?} is not supported")),
    }
}

fn header_modifier(v: &Value) -> HeaderModifier {
    let pairs = |v: &Value| {
        v.as_array()
            .into_iter()
            .flatten()
            .map(|p| HeaderPair {
                name: str_of(&p["name"]).unwrap_or_default(),
                value: str_of(&p["value"]).unwrap_or_default(),
            })
            .collect()
    };
    HeaderModifier {
        set: pairs(&v["set"]),
        add: pairs(&v["add"]),
        remove: v["remove"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(str_of)
            .collect(),
    }
}

/// One Gateway API filter (rule- or backend-level, in its JSON form).
fn filter(f: &Value, route_ns: &str, field: &str) -> Result<HttpFilter, String> {
    match f["type"].as_str() {
        Some("RequestHeaderModifier") => Ok(HttpFilter::RequestHeaderModifier(header_modifier(
            &f["requestHeaderModifier"],
        ))),
        Some("ResponseHeaderModifier") => Ok(HttpFilter::ResponseHeaderModifier(header_modifier(
            &f["responseHeaderModifier"],
        ))),
        Some("RequestRedirect") => {
            let r = &f["requestRedirect"];
            Ok(HttpFilter::RequestRedirect(RequestRedirect {
                scheme: str_of(&r["scheme"]),
                hostname: str_of(&r["hostname"]),
                path: path_modifier(&r["path"], &format!("{field}.requestRedirect.path"))?,
                port: port_of(&r["port"]),
                status_code: r["statusCode"].as_u64().and_then(|c| u16::try_from(c).ok()),
            }))
        }
        Some("URLRewrite") => {
            let r = &f["urlRewrite"];
            Ok(HttpFilter::UrlRewrite(UrlRewrite {
                hostname: str_of(&r["hostname"]),
                path: path_modifier(&r["path"], &format!("{field}.urlRewrite.path"))?,
            }))
        }
        Some("RequestMirror") => {
            let m = &f["requestMirror"];
            let b = &m["backendRef"];
            Ok(HttpFilter::RequestMirror(RequestMirror {
                service: ObjectRef::new(
                    b["namespace"].as_str().unwrap_or(route_ns),
                    b["name"].as_str().unwrap_or(""),
                ),
                port: port_of(&b["port"])
                    .ok_or_else(|| format!("{field}.requestMirror.backendRef.port: required"))?,
                percent: mirror_percent(m, &format!("{field}.requestMirror"))?,
            }))
        }
        other => Err(format!(
            "{field}.type: {other:?} filters are not supported by the node proxy"
        )),
    }
}

/// The share of requests a mirror takes, as the proxy's whole percentage:
/// `percent`, or a `fraction` that is a whole percentage (the proxy cannot
/// mirror 1 request in 1000).
fn mirror_percent(m: &Value, field: &str) -> Result<Option<u32>, String> {
    if let Some(p) = m.get("percent").filter(|p| !p.is_null()) {
        return match p.as_u64() {
            Some(p) if p <= 100 => Ok(Some(p as u32)),
            _ => Err(format!("{field}.percent: {p} is not between 0 and 100")),
        };
    }
    let f = &m["fraction"];
    if f.is_null() {
        return Ok(None);
    }
    let (Some(n), Some(d)) = (
        f["numerator"].as_u64(),
        f["denominator"].as_u64().or(Some(100)),
    ) else {
        return Err(format!(
            "{field}.fraction: numerator and denominator must be non-negative integers"
        ));
    };
    if d == 0 || n > d {
        return Err(format!(
            "{field}.fraction: {n}/{d} is not a fraction between 0 and 1"
        ));
    }
    if (n * 100) % d != 0 {
        return Err(format!(
            "{field}.fraction: {n}/{d} is not a whole percentage; the node proxy mirrors by \
             whole percent (use percent, or a fraction such as {}/100)",
            (n * 100 / d).max(1)
        ));
    }
    Ok(Some((n * 100 / d) as u32))
}

fn filters(v: &Value, route_ns: &str, field: &str) -> Result<Vec<HttpFilter>, String> {
    v.as_array()
        .into_iter()
        .flatten()
        .enumerate()
        .map(|(i, f)| filter(f, route_ns, &format!("{field}[{i}]")))
        .collect()
}

fn backends(v: &Value, route_ns: &str, field: &str) -> Result<Vec<BackendRef>, String> {
    v.as_array()
        .into_iter()
        .flatten()
        .enumerate()
        .map(|(i, b)| {
            let f = format!("{field}[{i}]");
            Ok(BackendRef {
                service: ObjectRef::new(
                    b["namespace"].as_str().unwrap_or(route_ns),
                    b["name"].as_str().unwrap_or(""),
                ),
                port: port_of(&b["port"])
                    .ok_or_else(|| format!("{f}.port: required for a Service backend"))?,
                weight: b["weight"].as_u64().map_or(1, |w| w as u32),
                filters: filters(&b["filters"], route_ns, &format!("{f}.filters"))?,
            })
        })
        .collect()
}

fn timeouts(v: &Value, field: &str) -> Result<Timeouts, String> {
    let t = Timeouts {
        request_ms: timeout_millis(&v["request"], &format!("{field}.request"))?,
        backend_request_ms: timeout_millis(
            &v["backendRequest"],
            &format!("{field}.backendRequest"),
        )?,
    };
    if let (Some(req), Some(backend)) = (t.request_ms, t.backend_request_ms)
        && backend > req
    {
        return Err(format!(
            "{field}.backendRequest: {backend} ms is longer than request ({req} ms), which \
             covers every attempt"
        ));
    }
    Ok(t)
}

/// `rules[].retry` (GEP-1731): `attempts` retries after the first try, on
/// the listed status codes (and on failures to reach an endpoint), waiting
/// `backoff`, doubled for each further retry.
fn retry(v: &Value, field: &str) -> Result<Option<Retry>, String> {
    if v.is_null() {
        return Ok(None);
    }
    let attempts = match &v["attempts"] {
        Value::Null => config::DEFAULT_RETRY_ATTEMPTS,
        a => a
            .as_u64()
            .and_then(|a| u32::try_from(a).ok())
            .ok_or_else(|| format!("{field}.attempts: {a} is not a number of retries"))?,
    };
    let codes = v["codes"]
        .as_array()
        .into_iter()
        .flatten()
        .enumerate()
        .map(|(i, c)| {
            c.as_u64()
                .and_then(|c| u16::try_from(c).ok())
                .filter(|c| (400..=599).contains(c))
                .ok_or_else(|| {
                    format!("{field}.codes[{i}]: {c} is not an HTTP status code from 400 to 599")
                })
        })
        .collect::<Result<Vec<u16>, String>>()?;
    let backoff_ms = match millis(&v["backoff"], &format!("{field}.backoff"))? {
        Some(ms) => ms,
        None => config::DEFAULT_RETRY_BACKOFF.as_millis() as u64,
    };
    Ok((attempts > 0).then_some(Retry {
        codes,
        attempts,
        backoff_ms,
    }))
}

/// Fields of a rule the node proxy has no equivalent for: refusing them
/// beats pretending they apply.
fn unsupported_rule_fields(r: &Value, field: &str) -> Result<(), String> {
    if !r["sessionPersistence"].is_null() {
        return Err(format!(
            "{field}.sessionPersistence: session persistence is not supported by the node proxy"
        ));
    }
    Ok(())
}

fn http_rule(r: &Value, ns: &str, field: &str) -> Result<HttpRouteRule, String> {
    unsupported_rule_fields(r, field)?;
    let mut matches = Vec::new();
    for (i, m) in r["matches"].as_array().into_iter().flatten().enumerate() {
        let f = format!("{field}.matches[{i}]");
        let path = match (
            m["path"]["type"].as_str().unwrap_or("PathPrefix"),
            str_of(&m["path"]["value"]),
        ) {
            (_, None) => None,
            ("Exact", Some(v)) => Some(PathMatch::Exact(v)),
            ("PathPrefix", Some(v)) => Some(PathMatch::PathPrefix(v)),
            ("RegularExpression", Some(v)) => Some(PathMatch::RegularExpression(v)),
            (other, _) => return Err(format!("{f}.path.type: {other:?} is not supported")),
        };
        matches.push(HttpRouteMatch {
            path,
            headers: value_matches(&m["headers"], &format!("{f}.headers"))?,
            query_params: value_matches(&m["queryParams"], &format!("{f}.queryParams"))?,
            method: str_of(&m["method"]),
        });
    }
    Ok(HttpRouteRule {
        name: str_of(&r["name"]),
        matches,
        filters: filters(&r["filters"], ns, &format!("{field}.filters"))?,
        backends: backends(&r["backendRefs"], ns, &format!("{field}.backendRefs"))?,
        timeouts: timeouts(&r["timeouts"], &format!("{field}.timeouts"))?,
        retry: retry(&r["retry"], &format!("{field}.retry"))?,
    })
}

/// The proxy's form of an HTTPRoute; a rule that cannot be translated is
/// left out and reported.
pub fn http_route(r: &GwHttpRoute, errors: &mut Vec<String>) -> HttpRoute {
    let key = Key::of(r);
    let spec = serde_json::to_value(&r.spec).unwrap_or_default();
    let mut rules = Vec::new();
    for (i, rule) in spec["rules"].as_array().into_iter().flatten().enumerate() {
        match http_rule(rule, &key.namespace, &format!("spec.rules[{i}]")) {
            Ok(x) => rules.push(x),
            Err(e) => errors.push(format!("HTTPRoute {key}: {e}; the rule is left out")),
        }
    }
    HttpRoute {
        id: oref(&key),
        created_unix: created_unix(&r.metadata),
        parents: parents(&spec["parentRefs"], &key.namespace),
        rules,
    }
}

fn grpc_rule(r: &Value, ns: &str, field: &str) -> Result<GrpcRouteRule, String> {
    unsupported_rule_fields(r, field)?;
    let mut matches = Vec::new();
    for (i, m) in r["matches"].as_array().into_iter().flatten().enumerate() {
        let f = format!("{field}.matches[{i}]");
        let method = if m["method"].is_null() {
            None
        } else {
            Some(GrpcMethodMatch {
                kind: match m["method"]["type"].as_str().unwrap_or("Exact") {
                    "Exact" => ValueMatchKind::Exact,
                    "RegularExpression" => ValueMatchKind::RegularExpression,
                    other => return Err(format!("{f}.method.type: {other:?} is not supported")),
                },
                service: str_of(&m["method"]["service"]),
                method: str_of(&m["method"]["method"]),
            })
        };
        matches.push(GrpcRouteMatch {
            method,
            headers: value_matches(&m["headers"], &format!("{f}.headers"))?,
        });
    }
    Ok(GrpcRouteRule {
        name: str_of(&r["name"]),
        matches,
        filters: filters(&r["filters"], ns, &format!("{field}.filters"))?,
        backends: backends(&r["backendRefs"], ns, &format!("{field}.backendRefs"))?,
        timeouts: Timeouts::default(),
        retry: None,
    })
}

pub fn grpc_route(r: &GwGrpcRoute, errors: &mut Vec<String>) -> GrpcRoute {
    let key = Key::of(r);
    let spec = serde_json::to_value(&r.spec).unwrap_or_default();
    let mut rules = Vec::new();
    for (i, rule) in spec["rules"].as_array().into_iter().flatten().enumerate() {
        match grpc_rule(rule, &key.namespace, &format!("spec.rules[{i}]")) {
            Ok(x) => rules.push(x),
            Err(e) => errors.push(format!("GRPCRoute {key}: {e}; the rule is left out")),
        }
    }
    GrpcRoute {
        id: oref(&key),
        created_unix: created_unix(&r.metadata),
        parents: parents(&spec["parentRefs"], &key.namespace),
        rules,
    }
}

/// One proxy policy per target; one proxy rule per operation of a rule.
pub fn access_policies(p: &crds::AccessPolicy, errors: &mut Vec<String>) -> Vec<AccessPolicy> {
    let key = Key::of(p);
    let mut rules = Vec::new();
    for r in &p.spec.rules {
        let mut from = Vec::new();
        for s in &r.from {
            if let Some(id) = &s.identity {
                match id.parse::<SpiffeId>() {
                    Ok(id) => from.push(AccessSource::Identity(id)),
                    Err(e) => errors.push(format!("AccessPolicy {key}: {e}")),
                }
            }
            if let Some(ns) = &s.namespace {
                from.push(AccessSource::Namespace(ns.clone()));
            }
            if let Some(sa) = &s.service_account {
                from.push(AccessSource::ServiceAccount(ObjectRef::new(
                    sa.namespace.as_deref().unwrap_or(&key.namespace),
                    &sa.name,
                )));
            }
        }
        if r.to.is_empty() {
            rules.push(AccessRule { from, to: None });
            continue;
        }
        for op in &r.to {
            let mut paths = Vec::new();
            for m in &op.paths {
                match m.kind {
                    PathMatchType::Exact => paths.push(m.value.clone()),
                    // Gateway API prefixes match whole segments: `/a` covers
                    // `/a` and `/a/...`.
                    PathMatchType::PathPrefix => {
                        let base = m.value.trim_end_matches('/');
                        if base.is_empty() {
                            paths.push("/*".into());
                        } else {
                            paths.push(base.to_string());
                            paths.push(format!("{base}/*"));
                        }
                    }
                }
            }
            rules.push(AccessRule {
                from: from.clone(),
                to: Some(HttpConditions {
                    methods: op.methods.clone(),
                    paths,
                }),
            });
        }
    }
    p.spec
        .target_refs
        .iter()
        .map(|t| AccessPolicy {
            id: oref(&key),
            target: ObjectRef::new(&key.namespace, &t.name),
            rules: rules.clone(),
        })
        .collect()
}

/// Translates every new mesh view into a snapshot for the proxy, until the
/// view channel closes.
pub fn spawn_translator(
    mut views: watch::Receiver<Arc<MeshView>>,
    snapshots: watch::Sender<Arc<Snapshot>>,
    inbound_port: u16,
    problems: watch::Sender<Vec<String>>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut last_errors: BTreeSet<String> = BTreeSet::new();
        loop {
            let view = views.borrow_and_update().clone();
            let (snap, errors) = snapshot(&view, inbound_port);
            let errors: BTreeSet<String> = errors.into_iter().collect();
            for e in errors.difference(&last_errors) {
                tracing::warn!("proxy configuration: {e}");
            }
            problems.send_replace(errors.iter().cloned().collect());
            last_errors = errors;
            snapshots.send_if_modified(|cur| {
                if **cur == snap {
                    false
                } else {
                    *cur = Arc::new(snap);
                    true
                }
            });
            if views.changed().await.is_err() {
                return;
            }
        }
    })
}

/// Original destinations of captured connections, from ebpf-lb's sockops map.
pub struct LbOriginalDst(pub Arc<dyn Dataplane>);

impl l7_proxy::OriginalDst for LbOriginalDst {
    fn lookup(&self, peer: SocketAddr, local: SocketAddr) -> Option<SocketAddr> {
        self.0.original_destination(peer, local)
    }
}

/// The embedded proxy, as the admin API sees it.
pub struct EmbeddedProxy {
    pub proxy: l7_proxy::Proxy,
    pub registry: Mutex<Registry>,
    /// What the last snapshot left out, and why.
    pub problems: watch::Receiver<Vec<String>>,
}

fn rfc3339_unix(secs: u64) -> Option<String> {
    let t = time::OffsetDateTime::from_unix_timestamp(i64::try_from(secs).ok()?).ok()?;
    t.format(&time::format_description::well_known::Rfc3339)
        .ok()
}

/// Sums `sluice_requests_total`, and those with a 5xx status class, by route
/// (`namespace/name` of the HTTPRoute or GRPCRoute, or of the Service for
/// its default route), from the proxy's metrics text. The proxy labels rules
/// `<route>#<rule>`.
pub fn request_stats(text: &str) -> BTreeMap<String, (u64, u64)> {
    let mut out: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    for line in text
        .lines()
        .filter(|l| l.starts_with("sluice_requests_total{"))
    {
        let Some((labels, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(v) = value.parse::<f64>() else {
            continue;
        };
        let label = |name: &str| {
            let pat = format!("{name}=\"");
            labels.find(&pat).map(|i| {
                let rest = &labels[i + pat.len()..];
                rest[..rest.find('"').unwrap_or(rest.len())].to_string()
            })
        };
        let Some(route) = label("route") else {
            continue;
        };
        let Some((owner, _rule)) = route.split_once('#') else {
            continue;
        };
        let e = out.entry(owner.to_string()).or_default();
        e.0 += v as u64;
        if label("status_class").is_some_and(|c| c.starts_with('5')) {
            e.1 += v as u64;
        }
    }
    out
}

impl EmbeddedProxy {
    fn metrics_text(&self) -> String {
        let registry = self.registry.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode_registry(&mut out, &registry);
        out
    }
}

impl ProxyHandle for EmbeddedProxy {
    fn connections(&self) -> Vec<api::ConnectionInfo> {
        self.proxy
            .connections()
            .into_iter()
            .map(|c| {
                let v = serde_json::to_value(c.kind).unwrap_or_default();
                let kind = v.as_str().unwrap_or("");
                let m = &c.meta;
                api::ConnectionInfo {
                    direction: if kind.starts_with("outbound") || kind == "tunnel-out" {
                        "outbound".into()
                    } else {
                        "inbound".into()
                    },
                    source_addr: m.source_addr.map(|a| a.to_string()).unwrap_or_default(),
                    source_workload: m.source_workload.as_ref().map(ToString::to_string),
                    source_identity: m.source_identity.as_ref().map(ToString::to_string),
                    destination_addr: m
                        .destination_addr
                        .map(|a| a.to_string())
                        .unwrap_or_default(),
                    destination_workload: m.destination.as_ref().map(ToString::to_string),
                    destination_identity: m.destination_identity.as_ref().map(ToString::to_string),
                    mtls: c.secured,
                    tls_version: m.tls.as_ref().map(|t| t.version.clone()),
                    cipher: m.tls.as_ref().map(|t| t.cipher_suite.clone()),
                    peer_cert_expiry: m
                        .tls
                        .as_ref()
                        .and_then(|t| t.peer_cert_not_after)
                        .and_then(rfc3339_unix),
                    protocol: Some(kind.to_string()),
                }
            })
            .collect()
    }

    fn route_stats(&self) -> BTreeMap<String, (u64, u64)> {
        request_stats(&self.metrics_text())
    }

    fn encode_metrics(&self, out: &mut String) {
        out.push_str(&self.metrics_text());
    }

    fn config_problems(&self) -> Vec<String> {
        self.problems.borrow().clone()
    }
}

#[cfg(test)]
mod tests;
