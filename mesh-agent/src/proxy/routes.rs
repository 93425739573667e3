//! Gateway API routes with Service parents (GAMMA) in the node proxy's form.
//!
//! One translation serves the proxy and the route status (`reconcile::routes`),
//! so the status says exactly what the proxy does:
//! - a rule using something the proxy cannot do is left out ([`DroppedRule`]);
//!   the route's status then says `PartiallyInvalid`, or `Accepted: False`
//!   when no rule is left; but a rule whose filters (its own or its
//!   backends') the proxy cannot apply stays for its matches and answers
//!   them with 500 (`closed`): skipped, an `ExternalAuth` or `ExtensionRef`
//!   filter would let its requests through to a rule without it, where the
//!   Gateway API asks for an error response;
//! - a backend reference that does not resolve ([`RefProblem`]) keeps its
//!   weight and is marked `invalid` with the reason, so the proxy answers its
//!   share of requests with 500 as the Gateway API asks, and never sends them
//!   to a Service the route may not use; a mirror whose target does not
//!   resolve is dropped;
//! - parents that do not exist (or lack the named port) are left out.

use l7_proxy::config::{
    BackendRef, Fraction, GrpcMethodMatch, GrpcRoute, GrpcRouteMatch, GrpcRouteRule,
    HeaderModifier, HeaderPair, HttpFilter, HttpRoute, HttpRouteMatch, HttpRouteRule, ObjectRef,
    ParentRef, PathMatch, PathModifier, RequestMirror, RequestRedirect, Retry, Timeouts,
    UrlRewrite, ValueMatch, ValueMatchKind,
};
use serde_json::Value;

use crate::{
    config,
    gateway::{GrpcRoute as GwGrpcRoute, HttpRoute as GwHttpRoute},
    reconcile::refs::{BackendTarget, RefIndex, RefProblem, is_core},
    state::Key,
};

/// A rule the proxy cannot take: left out of its configuration, or kept
/// for its matches and answering them with 500 (`closed`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DroppedRule {
    /// Its index in `spec.rules`.
    pub index: usize,
    /// `field: why`, the field spelled from `spec`.
    pub message: String,
    /// Kept for its matches, answered with 500 (a filter the proxy cannot
    /// apply must not be skipped).
    pub closed: bool,
}

/// A route in the proxy's form, and what could not be carried over.
#[derive(Clone, Debug, PartialEq)]
pub struct Translated<R> {
    /// None when no parent resolves, or every rule was left out.
    pub route: Option<R>,
    /// Rules in `spec.rules`.
    pub rules: usize,
    pub dropped: Vec<DroppedRule>,
    /// Backend and mirror references that do not resolve.
    pub refused: Vec<RefProblem>,
}

impl<R> Translated<R> {
    /// Every rule was left out (a route without rules is not "all
    /// dropped"; one kept to answer 500 is not left out).
    pub fn all_dropped(&self) -> bool {
        self.rules > 0 && self.dropped.iter().filter(|d| !d.closed).count() == self.rules
    }
}

/// The backends of a rule kept only to answer its matches with 500: one,
/// invalid with the reason, named after the rule's first backend.
fn closed_backends(r: &Value, ns: &str, why: &str) -> Vec<BackendRef> {
    let first = &r["backendRefs"][0];
    vec![BackendRef {
        service: ObjectRef::new(
            first["namespace"].as_str().unwrap_or(ns),
            first["name"].as_str().unwrap_or_default(),
        ),
        port: port_of(&first["port"]).unwrap_or_default(),
        weight: 1,
        filters: Vec::new(),
        invalid: Some(format!("the rule is not carried out: {why}")),
    }]
}

/// The route being translated: where references are resolved from.
struct Ctx<'a> {
    ns: &'a str,
    refs: &'a RefIndex,
    refused: Vec<RefProblem>,
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

/// The Service parents that exist (with the named port).
fn parents(v: &Value, route_ns: &str, refs: &RefIndex) -> Vec<ParentRef> {
    v.as_array()
        .into_iter()
        .flatten()
        .filter(|p| is_core(p["group"].as_str()) && p["kind"].as_str() == Some("Service"))
        .filter_map(|p| {
            let service = Key::new(
                p["namespace"].as_str().unwrap_or(route_ns),
                p["name"].as_str().unwrap_or(""),
            );
            let port = p["port"].as_i64().and_then(|p| i32::try_from(p).ok());
            let port = refs
                .check_parent(&service, port, p["sectionName"].as_str())
                .ok()?;
            Some(ParentRef {
                service: ObjectRef::new(&service.namespace, &service.name),
                port,
            })
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
    // A value the request line could not carry would turn into `/`.
    let path = |key: &str, empty_ok: bool| -> Result<String, String> {
        let v = str_of(&p[key]).unwrap_or_default();
        let valid = (v.is_empty() && empty_ok)
            || (v.starts_with('/')
                && !v.contains(['?', '#'])
                && v.parse::<http::uri::PathAndQuery>().is_ok());
        if valid {
            Ok(v)
        } else {
            Err(format!(
                "{field}.{key}: {v:?} is not a path (a `/`, then characters a request \
                 target may carry, percent-encoded otherwise)"
            ))
        }
    };
    match p["type"].as_str() {
        Some("ReplaceFullPath") => Ok(Some(PathModifier::ReplaceFullPath(path(
            "replaceFullPath",
            false,
        )?))),
        Some("ReplacePrefixMatch") => Ok(Some(PathModifier::ReplacePrefixMatch(path(
            "replacePrefixMatch",
            true,
        )?))),
        other => Err(format!("{field}.type: {} is not supported", quoted(other))),
    }
}

/// `"value"`, or `missing`.
fn quoted(v: Option<&str>) -> String {
    v.map_or_else(|| "missing".into(), |v| format!("{v:?}"))
}

/// A header modifier whose names and values a request or response can
/// carry: one that cannot (a newline in a value, a space in a name) is
/// refused with the field that says it, rather than left out of every
/// request while the route shows as accepted.
fn header_modifier(v: &Value, field: &str) -> Result<HeaderModifier, String> {
    // `at`: the field that holds the name.
    let name = |n: String, at: String| match http::HeaderName::from_bytes(n.as_bytes()) {
        // The mesh's own headers (which node a request goes to, how long it
        // is waited for, who sent it) are the proxies' to set.
        Ok(h) if h.as_str().starts_with("sluice-") || h.as_str().starts_with("sluice_") => {
            Err(format!(
                "{at}: {n:?} is a header of the mesh's own (sluice-); a route may not set or remove it"
            ))
        }
        Ok(_) => Ok(n),
        Err(_) => Err(format!("{at}: {n:?} is not a header name")),
    };
    let pairs = |list: &str| {
        v[list]
            .as_array()
            .into_iter()
            .flatten()
            .enumerate()
            .map(|(i, p)| {
                let at = format!("{field}.{list}[{i}]");
                let value = str_of(&p["value"]).unwrap_or_default();
                if http::HeaderValue::from_str(&value).is_err() {
                    return Err(format!("{at}.value: {value:?} is not a header value"));
                }
                Ok(HeaderPair {
                    name: name(str_of(&p["name"]).unwrap_or_default(), format!("{at}.name"))?,
                    value,
                })
            })
            .collect::<Result<Vec<_>, String>>()
    };
    let m = HeaderModifier {
        set: pairs("set")?,
        add: pairs("add")?,
        remove: v["remove"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(str_of)
            .enumerate()
            .map(|(i, n)| name(n, format!("{field}.remove[{i}]")))
            .collect::<Result<_, _>>()?,
    };
    // One action per header name, names compared without case (the
    // Gateway API calls a filter with more invalid; the CRD's list keys
    // catch only the same spelling twice in one list).
    let mut seen: Vec<(String, String)> = Vec::new();
    let named = (m.set.iter().map(|p| ("set", &p.name)))
        .chain(m.add.iter().map(|p| ("add", &p.name)))
        .chain(m.remove.iter().map(|n| ("remove", n)));
    for (list, n) in named {
        let lower = n.to_ascii_lowercase();
        if let Some((first, _)) = seen.iter().find(|(_, l)| *l == lower) {
            return Err(format!(
                "{field}: header {n:?} is named in {first} and again in {list}: one action per \
                 header name, names compared without case"
            ));
        }
        seen.push((list.to_string(), lower));
    }
    Ok(m)
}

/// The share of requests a mirror takes: `percent`, or `fraction`
/// (denominator 100 when left out); all requests when neither is set.
fn mirror_fraction(m: &Value, field: &str) -> Result<Option<Fraction>, String> {
    if let Some(p) = m.get("percent").filter(|p| !p.is_null()) {
        return match p.as_u64() {
            Some(p) if p <= 100 => Ok(Some(Fraction::percent(p as u32))),
            _ => Err(format!("{field}.percent: {p} is not between 0 and 100")),
        };
    }
    let f = &m["fraction"];
    if f.is_null() {
        return Ok(None);
    }
    let whole = |v: &Value| v.as_u64().and_then(|n| u32::try_from(n).ok());
    let denominator = if f["denominator"].is_null() {
        Some(100)
    } else {
        whole(&f["denominator"])
    };
    let (Some(n), Some(d)) = (whole(&f["numerator"]), denominator) else {
        return Err(format!(
            "{field}.fraction: numerator and denominator must be non-negative 32-bit integers"
        ));
    };
    if d == 0 || n > d {
        return Err(format!(
            "{field}.fraction: {n}/{d} is not a fraction between 0 and 1 (the denominator must \
             be at least 1 and at least the numerator)"
        ));
    }
    Ok(Some(Fraction {
        numerator: n,
        denominator: d,
    }))
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

impl Ctx<'_> {
    /// One Gateway API filter (rule- or backend-level, in its JSON form);
    /// None for a mirror whose target does not resolve (it is dropped).
    fn filter(&mut self, f: &Value, field: &str) -> Result<Option<HttpFilter>, String> {
        match f["type"].as_str() {
            Some("RequestHeaderModifier") => {
                Ok(Some(HttpFilter::RequestHeaderModifier(header_modifier(
                    &f["requestHeaderModifier"],
                    &format!("{field}.requestHeaderModifier"),
                )?)))
            }
            Some("ResponseHeaderModifier") => {
                Ok(Some(HttpFilter::ResponseHeaderModifier(header_modifier(
                    &f["responseHeaderModifier"],
                    &format!("{field}.responseHeaderModifier"),
                )?)))
            }
            Some("RequestRedirect") => {
                let r = &f["requestRedirect"];
                let status_code = match r["statusCode"].as_u64() {
                    None => None,
                    Some(c @ (301 | 302 | 303 | 307 | 308)) => Some(c as u16),
                    Some(c) => {
                        return Err(format!(
                            "{field}.requestRedirect.statusCode: {c} is not a redirect code the \
                             Gateway API allows (301, 302, 303, 307, 308)"
                        ));
                    }
                };
                Ok(Some(HttpFilter::RequestRedirect(RequestRedirect {
                    scheme: str_of(&r["scheme"]),
                    hostname: str_of(&r["hostname"]),
                    path: path_modifier(&r["path"], &format!("{field}.requestRedirect.path"))?,
                    port: port_of(&r["port"]),
                    status_code,
                })))
            }
            Some("URLRewrite") => {
                let r = &f["urlRewrite"];
                Ok(Some(HttpFilter::UrlRewrite(UrlRewrite {
                    hostname: str_of(&r["hostname"]),
                    path: path_modifier(&r["path"], &format!("{field}.urlRewrite.path"))?,
                })))
            }
            Some("RequestMirror") => {
                let m = &f["requestMirror"];
                let fraction = mirror_fraction(m, &format!("{field}.requestMirror"))?;
                let b = &m["backendRef"];
                let target = BackendTarget::of_json(b);
                if let Err(p) = self.refs.check_backend(
                    self.ns,
                    &target,
                    &format!("{field}.requestMirror.backendRef"),
                ) {
                    self.refused.push(p);
                    return Ok(None);
                }
                Ok(Some(HttpFilter::RequestMirror(RequestMirror {
                    service: ObjectRef::new(target.namespace.unwrap_or(self.ns), target.name),
                    port: port_of(&b["port"]).unwrap_or_default(),
                    fraction,
                })))
            }
            other => Err(format!(
                "{field}.type: {} filters are not supported by the node proxy",
                quoted(other)
            )),
        }
    }

    fn filters(&mut self, v: &Value, field: &str) -> Result<Vec<HttpFilter>, String> {
        let mut out = Vec::new();
        for (i, f) in v.as_array().into_iter().flatten().enumerate() {
            out.extend(self.filter(f, &format!("{field}[{i}]"))?);
        }
        Ok(out)
    }

    fn backends(&mut self, v: &Value, field: &str) -> Result<Vec<BackendRef>, String> {
        let mut out = Vec::new();
        for (i, b) in v.as_array().into_iter().flatten().enumerate() {
            let f = format!("{field}[{i}]");
            let target = BackendTarget::of_json(b);
            let weight = b["weight"]
                .as_u64()
                .map_or(1, |w| u32::try_from(w).unwrap_or(u32::MAX));
            let (filters, invalid) = match self.refs.check_backend(self.ns, &target, &f) {
                Ok(()) => (self.filters(&b["filters"], &format!("{f}.filters"))?, None),
                Err(p) => {
                    // Its share of requests gets 500 from the proxy, with
                    // the reason.
                    let why = format!("{}: {}", p.reason.as_str(), p.message);
                    self.refused.push(p);
                    (Vec::new(), Some(why))
                }
            };
            out.push(BackendRef {
                service: ObjectRef::new(target.namespace.unwrap_or(self.ns), target.name),
                port: port_of(&b["port"]).unwrap_or_default(),
                weight,
                filters,
                invalid,
            });
        }
        Ok(out)
    }

    fn http_rule(
        &mut self,
        r: &Value,
        field: &str,
    ) -> Result<(HttpRouteRule, Option<String>), String> {
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
        let (filters, backends, closed) = self.filters_and_backends(r, field);
        let rule = HttpRouteRule {
            name: str_of(&r["name"]),
            matches,
            filters,
            backends,
            timeouts: timeouts(&r["timeouts"], &format!("{field}.timeouts"))?,
            retry: retry(&r["retry"], &format!("{field}.retry"))?,
        };
        // What the proxy could not compile (a regular expression, a header
        // name) drops the rule here, where the route's status says so.
        l7_proxy::router::check_http_rule(&rule).map_err(|p| format!("{field}.matches: {p}"))?;
        Ok((rule, closed))
    }

    /// A rule's filters and backends; when a filter (the rule's or a
    /// backend's) cannot be applied, none and one backend answering 500,
    /// with the reason.
    fn filters_and_backends(
        &mut self,
        r: &Value,
        field: &str,
    ) -> (Vec<HttpFilter>, Vec<BackendRef>, Option<String>) {
        let refused = self.refused.len();
        let filters = self.filters(&r["filters"], &format!("{field}.filters"));
        let backends = self.backends(&r["backendRefs"], &format!("{field}.backendRefs"));
        match (filters, backends) {
            (Ok(f), Ok(b)) => (f, b, None),
            (Err(why), _) | (_, Err(why)) => {
                // Nothing is sent to its backends or mirrors.
                self.refused.truncate(refused);
                let backends = closed_backends(r, self.ns, &why);
                (Vec::new(), backends, Some(why))
            }
        }
    }

    fn grpc_rule(
        &mut self,
        r: &Value,
        field: &str,
    ) -> Result<(GrpcRouteRule, Option<String>), String> {
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
                        other => {
                            return Err(format!("{f}.method.type: {other:?} is not supported"));
                        }
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
        let (filters, backends, closed) = self.filters_and_backends(r, field);
        let rule = GrpcRouteRule {
            name: str_of(&r["name"]),
            matches,
            filters,
            backends,
            timeouts: Timeouts::default(),
            retry: None,
        };
        l7_proxy::router::check_grpc_rule(&rule).map_err(|p| format!("{field}.matches: {p}"))?;
        Ok((rule, closed))
    }

    /// Every rule of `spec`, through `rule`; the ones that fail are
    /// dropped, and those kept closed are noted.
    fn rules<T>(
        &mut self,
        spec: &Value,
        mut rule: impl FnMut(&mut Self, &Value, &str) -> Result<(T, Option<String>), String>,
    ) -> (Vec<T>, usize, Vec<DroppedRule>) {
        let mut kept = Vec::new();
        let mut dropped = Vec::new();
        let all = spec["rules"].as_array().map_or(&[][..], Vec::as_slice);
        for (i, r) in all.iter().enumerate() {
            // A dropped rule's references are not the route's any more.
            let refused = self.refused.len();
            match rule(self, r, &format!("spec.rules[{i}]")) {
                Ok((x, closed)) => {
                    kept.push(x);
                    dropped.extend(closed.map(|message| DroppedRule {
                        index: i,
                        message,
                        closed: true,
                    }));
                }
                Err(message) => {
                    self.refused.truncate(refused);
                    dropped.push(DroppedRule {
                        index: i,
                        message,
                        closed: false,
                    });
                }
            }
        }
        (kept, all.len(), dropped)
    }
}

/// The proxy's form of an HTTPRoute, resolved against `refs`.
pub fn http_route(r: &GwHttpRoute, refs: &RefIndex) -> Translated<HttpRoute> {
    translate(
        &Source {
            key: Key::of(r),
            created_unix: created_unix(&r.metadata),
            spec: serde_json::to_value(&r.spec).unwrap_or_default(),
        },
        refs,
        Ctx::http_rule,
        |id, created_unix, parents, rules| HttpRoute {
            id,
            created_unix,
            parents,
            rules,
        },
    )
}

/// The proxy's form of a GRPCRoute, resolved against `refs`.
pub fn grpc_route(r: &GwGrpcRoute, refs: &RefIndex) -> Translated<GrpcRoute> {
    translate(
        &Source {
            key: Key::of(r),
            created_unix: created_unix(&r.metadata),
            spec: serde_json::to_value(&r.spec).unwrap_or_default(),
        },
        refs,
        Ctx::grpc_rule,
        |id, created_unix, parents, rules| GrpcRoute {
            id,
            created_unix,
            parents,
            rules,
        },
    )
}

/// A route to translate: its key, creation time and spec as JSON.
struct Source {
    key: Key,
    created_unix: i64,
    spec: Value,
}

/// What both route kinds share: rules translated one by one, parents
/// resolved, and the route kept only when a parent resolves and some rule
/// is left (or it had none).
fn translate<'a, R, T>(
    src: &'a Source,
    refs: &'a RefIndex,
    rule: impl FnMut(&mut Ctx<'a>, &Value, &str) -> Result<(T, Option<String>), String>,
    build: impl FnOnce(ObjectRef, i64, Vec<ParentRef>, Vec<T>) -> R,
) -> Translated<R> {
    let (key, spec) = (&src.key, &src.spec);
    let mut ctx = Ctx {
        ns: &key.namespace,
        refs,
        refused: Vec::new(),
    };
    let (rules, total, dropped) = ctx.rules(spec, rule);
    let parents = parents(&spec["parentRefs"], &key.namespace, refs);
    let all_dropped = total > 0 && rules.is_empty();
    let keep = !(parents.is_empty() || all_dropped);
    Translated {
        route: keep.then(|| {
            build(
                ObjectRef::new(&key.namespace, &key.name),
                src.created_unix,
                parents,
                rules,
            )
        }),
        rules: total,
        dropped,
        refused: ctx.refused,
    }
}
