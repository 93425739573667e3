//! HTTP routing per request, with Gateway API `HTTPRoute`/`GRPCRoute`
//! semantics for a Service parent (GAMMA).
//!
//! Every `matches` entry of every rule becomes one [`Entry`]; entries are
//! sorted once per snapshot by Gateway API precedence, and a request takes the
//! first entry that matches:
//! 1. `Exact` path, then `RegularExpression` (longer pattern first; the spec
//!    leaves regex precedence to implementations), then `PathPrefix`, longest
//!    prefix first;
//! 2. a method match;
//! 3. more header matches, then more query parameter matches;
//! 4. the older route, then `namespace/name` order, then rule and match order.
//!
//! gRPC requests (`content-type: application/grpc*`) try the service's
//! `GRPCRoute`s first, then its `HTTPRoute`s.

use std::{collections::HashMap, sync::Arc};

use http::{HeaderMap, Method};
use regex::Regex;

use crate::config::{
    BackendRef, GrpcRoute, GrpcRouteMatch, GrpcRouteRule, HttpFilter, HttpRoute, HttpRouteMatch,
    HttpRouteRule, ObjectRef, PathMatch, PathModifier, Retry, Timeouts, ValueMatch, ValueMatchKind,
};

#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    #[error("route {route} rule {rule}: invalid regular expression {pattern:?}: {source}")]
    Regex {
        route: ObjectRef,
        rule: usize,
        pattern: String,
        source: Box<regex::Error>,
    },
    #[error("route {route} rule {rule}: invalid header name {name:?} in a match")]
    HeaderName {
        route: ObjectRef,
        rule: usize,
        name: String,
    },
    #[error("route {route} rule {rule}: invalid method {method:?} in a match")]
    Method {
        route: ObjectRef,
        rule: usize,
        method: String,
    },
    #[error("route {route} rule {rule}: {}", PREFIX_REWRITE)]
    PrefixRewrite { route: ObjectRef, rule: usize },
}

const PREFIX_REWRITE: &str = "a ReplacePrefixMatch path modifier needs every match of its rule \
    to be a PathPrefix match (use ReplaceFullPath, or a PathPrefix match)";

impl RouteError {
    /// What is wrong, without the route and rule.
    pub fn problem(&self) -> String {
        match self {
            RouteError::Regex {
                pattern, source, ..
            } => format!("invalid regular expression {pattern:?}: {source}"),
            RouteError::HeaderName { name, .. } => format!("invalid header name {name:?}"),
            RouteError::Method { method, .. } => format!("invalid method {method:?}"),
            RouteError::PrefixRewrite { .. } => PREFIX_REWRITE.into(),
        }
    }
}

/// Why the proxy would leave out a match of `rule` ([`RouteTable::build`]
/// compiles it the same way), if it would. The agent checks every rule with
/// it, so that a route's status and what the proxy serves agree.
pub fn check_http_rule(rule: &HttpRouteRule) -> Result<(), String> {
    let route = HttpRoute {
        id: ObjectRef::new("", ""),
        created_unix: 0,
        parents: Vec::new(),
        rules: vec![rule.clone()],
    };
    first_problem(RouteTable::build(&[route], &[]).1)
}

/// [`check_http_rule`] for a GRPCRoute rule.
pub fn check_grpc_rule(rule: &GrpcRouteRule) -> Result<(), String> {
    let route = GrpcRoute {
        id: ObjectRef::new("", ""),
        created_unix: 0,
        parents: Vec::new(),
        rules: vec![rule.clone()],
    };
    first_problem(RouteTable::build(&[], &[route]).1)
}

fn first_problem(errors: Vec<RouteError>) -> Result<(), String> {
    match errors.first() {
        Some(e) => Err(e.problem()),
        None => Ok(()),
    }
}

/// A rule as the forwarding path uses it.
#[derive(Debug)]
pub struct Rule {
    /// `namespace/name` of the route.
    pub route: ObjectRef,
    /// Rule name, or its index.
    pub name: String,
    /// `namespace/name#rule`, for metrics and logs.
    pub label: crate::metrics::Label,
    pub filters: Vec<HttpFilter>,
    pub backends: Vec<BackendRef>,
    pub timeouts: Timeouts,
    pub retry: Option<Retry>,
    /// A GRPCRoute's rule: a call it cannot send to a backend (none of
    /// weight above zero, one that does not resolve) is answered
    /// `UNAVAILABLE`, as the GRPCRoute spec asks, not `INTERNAL`.
    pub grpc: bool,
}

impl Rule {
    /// The implicit rule of a service with no routes: itself, on the port
    /// the client connected to.
    pub fn default_for(service: &ObjectRef, port: u16) -> Arc<Rule> {
        Arc::new(Rule {
            route: service.clone(),
            name: "default".into(),
            // The Service itself, without a `#<rule>` that a route's rules
            // have (a rule may be named `default`).
            label: service.to_string().into(),
            filters: Vec::new(),
            backends: vec![BackendRef {
                service: service.clone(),
                port,
                weight: 1,
                filters: Vec::new(),
                invalid: None,
            }],
            timeouts: Timeouts::default(),
            retry: None,
            grpc: false,
        })
    }
}

#[derive(Debug)]
enum PathCond {
    Exact(String),
    Prefix(String),
    Regex(Regex),
}

#[derive(Debug)]
enum ValueCond {
    Exact(String),
    Regex(Regex),
}

impl ValueCond {
    fn matches(&self, v: &str) -> bool {
        match self {
            ValueCond::Exact(s) => s == v,
            ValueCond::Regex(r) => r.is_match(v),
        }
    }
}

#[derive(Debug)]
struct Entry {
    port: Option<u16>,
    path: PathCond,
    method: Option<Method>,
    headers: Vec<(http::HeaderName, ValueCond)>,
    query: Vec<(String, ValueCond)>,
    rule: Arc<Rule>,
    key: Precedence,
}

/// Sort key of an entry, smaller first: path kind, path length (longer
/// first), no method match, header and query match counts (more first),
/// route age, route name, rule index, match index.
type Precedence = (
    u8,
    std::cmp::Reverse<usize>,
    bool,
    std::cmp::Reverse<usize>,
    std::cmp::Reverse<usize>,
    i64,
    ObjectRef,
    usize,
    usize,
);

/// The request facts routing looks at.
pub struct RequestView<'a> {
    pub method: &'a Method,
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub headers: &'a HeaderMap,
    /// The URI's authority: an HTTP/2 request's host (`:authority`), which
    /// a `host` header match reads when there is no `host` field.
    pub authority: Option<&'a str>,
}

/// The outcome of routing one request.
#[derive(Clone, Debug)]
pub struct Decision {
    pub rule: Arc<Rule>,
    /// The prefix matched, for `ReplacePrefixMatch`.
    pub matched_prefix: Option<String>,
}

/// The entries of one service's routes (GAMMA): producer routes, in the
/// service's own namespace, serve every client; a consumer route, in another
/// namespace, serves only clients of its namespace, and for those clients the
/// consumer routes replace the producer routes.
#[derive(Debug, Default)]
struct ServiceRoutes {
    producer: Vec<Entry>,
    consumers: HashMap<String, Vec<Entry>>,
}

impl ServiceRoutes {
    fn sort(&mut self) {
        for entries in std::iter::once(&mut self.producer).chain(self.consumers.values_mut()) {
            entries.sort_by(|a, b| a.key.cmp(&b.key));
        }
    }
}

/// Routes of every service, compiled from one snapshot.
#[derive(Debug, Default)]
pub struct RouteTable {
    http: HashMap<ObjectRef, ServiceRoutes>,
    grpc: HashMap<ObjectRef, ServiceRoutes>,
}

/// The [`RuleParts`] of an `HttpRouteRule` or a `GrpcRouteRule`: the same
/// fields in two types.
macro_rules! rule_parts {
    ($r:expr) => {
        RuleParts {
            name: &$r.name,
            matches: &$r.matches,
            filters: &$r.filters,
            backends: &$r.backends,
            timeouts: $r.timeouts,
            retry: &$r.retry,
        }
    };
}

/// What HTTP and gRPC route rules have in common, for compiling them alike.
struct RuleParts<'a, M> {
    name: &'a Option<String>,
    matches: &'a [M],
    filters: &'a [HttpFilter],
    backends: &'a [BackendRef],
    timeouts: crate::config::Timeouts,
    retry: &'a Option<crate::config::Retry>,
}

impl RouteTable {
    /// Compiles the routes; a rule that does not compile is left out and
    /// reported, the others stay in force.
    pub fn build(http_routes: &[HttpRoute], grpc_routes: &[GrpcRoute]) -> (Self, Vec<RouteError>) {
        let mut table = RouteTable::default();
        let mut errors = Vec::new();
        for route in http_routes {
            let rules = route.rules.iter().map(|r| rule_parts!(r));
            add_route(
                &mut table.http,
                &mut errors,
                &route.id,
                &route.parents,
                rules,
                false,
                |ri, mi, m, rule| compile_http_match(route, ri, mi, m, rule),
            );
        }
        for route in grpc_routes {
            let rules = route.rules.iter().map(|r| rule_parts!(r));
            add_route(
                &mut table.grpc,
                &mut errors,
                &route.id,
                &route.parents,
                rules,
                true,
                |ri, mi, m, rule| compile_grpc_match(route, ri, mi, m, rule),
            );
        }
        for routes in table.http.values_mut().chain(table.grpc.values_mut()) {
            routes.sort();
        }
        (table, errors)
    }

    /// Whether any route is attached to the service.
    pub fn has_routes(&self, service: &ObjectRef) -> bool {
        self.http.contains_key(service) || self.grpc.contains_key(service)
    }

    /// The rule for a request from a client in namespace `client_ns` to
    /// `service` on `port`. `None` when no route of the service serves that
    /// client (use [`Rule::default_for`]); `Some(None)` when routes serve it
    /// and none matches (404).
    pub fn route(
        &self,
        service: &ObjectRef,
        port: u16,
        client_ns: &str,
        req: &RequestView<'_>,
    ) -> Option<Option<Decision>> {
        let (http, grpc) = (self.http.get(service), self.grpc.get(service));
        if http.is_none() && grpc.is_none() {
            return None;
        }
        // Routes attach to one port of the Service when their parentRef
        // names one (GEP-1294), to all of them otherwise.
        let on_port = |e: &[Entry]| e.iter().any(|e| e.port.is_none_or(|p| p == port));
        fn consumers<'t>(r: Option<&'t ServiceRoutes>, ns: &str) -> Option<&'t [Entry]> {
            r.and_then(|r| r.consumers.get(ns)).map(|e| &e[..])
        }
        fn producers(r: Option<&ServiceRoutes>) -> &[Entry] {
            r.map_or(&[], |r| &r.producer[..])
        }
        // Consumer routes of the client's namespace on this port, HTTP or
        // gRPC, replace the producer routes of both kinds.
        let (ch, cg) = (consumers(http, client_ns), consumers(grpc, client_ns));
        let consumer = [ch, cg].into_iter().flatten().any(on_port);
        let (http, grpc) = if consumer {
            (ch.unwrap_or_default(), cg.unwrap_or_default())
        } else {
            (producers(http), producers(grpc))
        };
        if !on_port(http) && !on_port(grpc) {
            return None;
        }
        let is_grpc = req
            .headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|ct| ct.starts_with("application/grpc"));
        let grpc = if is_grpc { grpc } else { &[] };
        // Decoding the query string costs allocations: only when a rule asks.
        let query = if grpc.iter().chain(http).any(|e| !e.query.is_empty()) {
            parse_query(req.query.unwrap_or(""))
        } else {
            Vec::new()
        };
        for e in grpc.iter().chain(http) {
            if let Some(d) = e.matches(port, req, &query) {
                return Some(Some(d));
            }
        }
        Some(None)
    }
}

/// Compiles the rules of one route and files each match under every parent
/// service, as a producer or a consumer route of it.
fn add_route<'a, M: Default + 'a>(
    table: &mut HashMap<ObjectRef, ServiceRoutes>,
    errors: &mut Vec<RouteError>,
    id: &ObjectRef,
    parents: &[crate::config::ParentRef],
    rules: impl Iterator<Item = RuleParts<'a, M>>,
    grpc: bool,
    compile: impl Fn(usize, usize, &M, &Arc<Rule>) -> Result<Entry, RouteError>,
) {
    for (ri, rule) in rules.enumerate() {
        let name = rule.name.clone().unwrap_or_else(|| ri.to_string());
        let compiled = Arc::new(Rule {
            route: id.clone(),
            label: format!("{id}#{name}").into(),
            name,
            filters: rule.filters.to_vec(),
            backends: rule.backends.to_vec(),
            timeouts: rule.timeouts,
            retry: rule.retry.clone(),
            grpc,
        });
        let default_match = [M::default()];
        let matches = if rule.matches.is_empty() {
            &default_match[..]
        } else {
            rule.matches
        };
        for (mi, m) in matches.iter().enumerate() {
            let entry = match compile(ri, mi, m, &compiled) {
                Ok(e) => e,
                Err(e) => {
                    errors.push(e);
                    continue;
                }
            };
            for parent in parents {
                let routes = table.entry(parent.service.clone()).or_default();
                let entries = if parent.service.namespace == id.namespace {
                    &mut routes.producer
                } else {
                    routes.consumers.entry(id.namespace.clone()).or_default()
                };
                entries.push(entry.clone_for(parent.port));
            }
        }
    }
}

impl Entry {
    fn clone_for(&self, port: Option<u16>) -> Entry {
        Entry {
            port,
            path: match &self.path {
                PathCond::Exact(s) => PathCond::Exact(s.clone()),
                PathCond::Prefix(s) => PathCond::Prefix(s.clone()),
                PathCond::Regex(r) => PathCond::Regex(r.clone()),
            },
            method: self.method.clone(),
            headers: self
                .headers
                .iter()
                .map(|(n, c)| (n.clone(), c.clone_cond()))
                .collect(),
            query: self
                .query
                .iter()
                .map(|(n, c)| (n.clone(), c.clone_cond()))
                .collect(),
            rule: self.rule.clone(),
            key: self.key.clone(),
        }
    }

    fn matches(
        &self,
        port: u16,
        req: &RequestView<'_>,
        query: &[(String, String)],
    ) -> Option<Decision> {
        if self.port.is_some_and(|p| p != port) {
            return None;
        }
        if self.method.as_ref().is_some_and(|m| m != req.method) {
            return None;
        }
        let matched_prefix = match &self.path {
            PathCond::Exact(p) => (p == req.path).then_some(None)?,
            PathCond::Prefix(p) => prefix_matches(p, req.path).then(|| Some(p.clone()))?,
            PathCond::Regex(r) => r.is_match(req.path).then_some(None)?,
        };
        for (name, cond) in &self.headers {
            let mut values = req.headers.get_all(name).iter();
            let Some(first) = values.next() else {
                match req.authority {
                    Some(a) if name == http::header::HOST && cond.matches(a) => continue,
                    _ => return None,
                }
            };
            let matched = match values.next() {
                None => cond.matches(first.to_str().ok()?),
                // A repeated field is one list, its values joined by commas
                // (RFC 9110 5.3), as the Gateway API asks; but `cookie`
                // fields (one per cookie from HTTP/2 callers) join with
                // "; ", as the workload receives them (RFC 9113 8.2.3).
                Some(_) => {
                    let sep = if name == http::header::COOKIE {
                        "; "
                    } else {
                        ", "
                    };
                    let joined = req
                        .headers
                        .get_all(name)
                        .iter()
                        .map(|v| v.to_str().ok())
                        .collect::<Option<Vec<_>>>()?
                        .join(sep);
                    cond.matches(&joined)
                }
            };
            if !matched {
                return None;
            }
        }
        for (name, cond) in &self.query {
            // The first value of a repeated parameter counts.
            let v = query.iter().find(|(k, _)| k == name)?;
            if !cond.matches(&v.1) {
                return None;
            }
        }
        Some(Decision {
            rule: self.rule.clone(),
            matched_prefix,
        })
    }
}

impl ValueCond {
    fn clone_cond(&self) -> ValueCond {
        match self {
            ValueCond::Exact(s) => ValueCond::Exact(s.clone()),
            ValueCond::Regex(r) => ValueCond::Regex(r.clone()),
        }
    }
}

/// `path` with its dot segments resolved (RFC 3986 5.2.4), `%2e` read as
/// a dot: what the workload will read it as, so that it is routed (and
/// rewritten) as that, not as what it spells (`/api/../admin` is `/admin`,
/// not under `/api`). `None` when it has none (the usual case, no copy).
/// Other escapes and repeated slashes stay as they are.
pub fn normalized_path(path: &str) -> Option<String> {
    let rest = path.strip_prefix('/')?;
    // Every dot segment holds a `.` or a `%` (`%2e`): most paths hold
    // neither, and are passed without splitting them.
    if !rest.bytes().any(|b| b == b'.' || b == b'%') || !rest.split('/').any(|s| dot_segment(s) > 0)
    {
        return None;
    }
    let segments: Vec<&str> = rest.split('/').collect();
    let mut out: Vec<&str> = Vec::with_capacity(segments.len());
    let last = segments.len() - 1;
    for (i, seg) in segments.iter().enumerate() {
        match dot_segment(seg) {
            0 => out.push(seg),
            d => {
                if d == 2 {
                    out.pop();
                }
                // A dot segment at the end leaves a directory: `/a/b/..` is `/a/`.
                if i == last {
                    out.push("");
                }
            }
        }
    }
    Some(format!("/{}", out.join("/")))
}

/// 1 for a `.` segment, 2 for `..` (`%2e` read as a dot), else 0; no copy.
fn dot_segment(seg: &str) -> usize {
    let is = |a: &str| seg.eq_ignore_ascii_case(a);
    match seg.len() {
        1 if seg == "." => 1,
        2 if seg == ".." => 2,
        3 if is("%2e") => 1,
        4 if is(".%2e") || is("%2e.") => 2,
        6 if is("%2e%2e") => 2,
        _ => 0,
    }
}

/// Whether `path` has a `.` or `..` segment once read as some servers do:
/// `%2f`, `%5c` and `\` as `/`, and `;…` path parameters cut from each
/// segment (Tomcat, Jetty, Spring): `/api/..;/admin` is `/admin` to them.
/// [`normalized_path`] resolves the plain ones; these cannot be resolved
/// one way for every workload.
pub fn dot_segment_read_loosely(path: &str) -> bool {
    // Most paths have none of the characters a looser reading needs (gRPC
    // paths all hold dots): read as they are, with no copies.
    if !path.bytes().any(|b| matches!(b, b'%' | b'\\' | b';')) {
        return path.contains('.') && path.split('/').any(|seg| seg == "." || seg == "..");
    }
    let decoded = path
        .to_ascii_lowercase()
        .replace("%2e", ".")
        .replace("%2f", "/")
        .replace("%5c", "/")
        .replace('\\', "/");
    decoded
        .split('/')
        .map(|seg| seg.split(';').next().unwrap_or_default())
        .any(|seg| seg == "." || seg == "..")
}

/// `PathPrefix` matches whole path elements: `/foo` matches `/foo` and
/// `/foo/bar`, not `/foobar`; a trailing slash in the prefix is ignored.
pub fn prefix_matches(prefix: &str, path: &str) -> bool {
    let prefix = prefix.trim_end_matches('/');
    if prefix.is_empty() {
        return true;
    }
    match path.strip_prefix(prefix) {
        Some(rest) => rest.is_empty() || rest.starts_with('/'),
        None => false,
    }
}

fn anchored(route: &ObjectRef, rule: usize, pattern: &str) -> Result<Regex, RouteError> {
    // Gateway API regex matches are full matches.
    Regex::new(&format!("^(?:{pattern})$")).map_err(|e| RouteError::Regex {
        route: route.clone(),
        rule,
        pattern: pattern.into(),
        source: Box::new(e),
    })
}

fn value_cond(route: &ObjectRef, rule: usize, m: &ValueMatch) -> Result<ValueCond, RouteError> {
    Ok(match m.kind {
        ValueMatchKind::Exact => ValueCond::Exact(m.value.clone()),
        ValueMatchKind::RegularExpression => ValueCond::Regex(anchored(route, rule, &m.value)?),
    })
}

fn header_conds(
    route: &ObjectRef,
    rule: usize,
    headers: &[ValueMatch],
) -> Result<Vec<(http::HeaderName, ValueCond)>, RouteError> {
    let mut out: Vec<(http::HeaderName, ValueCond)> = Vec::new();
    for h in headers {
        let name = http::HeaderName::from_bytes(h.name.as_bytes()).map_err(|_| {
            RouteError::HeaderName {
                route: route.clone(),
                rule,
                name: h.name.clone(),
            }
        })?;
        // Gateway API: of entries with equivalent names only the first counts.
        if out.iter().any(|(n, _)| *n == name) {
            continue;
        }
        out.push((name, value_cond(route, rule, h)?));
    }
    Ok(out)
}

fn compile_http_match(
    route: &HttpRoute,
    ri: usize,
    mi: usize,
    m: &HttpRouteMatch,
    rule: &Arc<Rule>,
) -> Result<Entry, RouteError> {
    let (path, rank, len) = match &m.path {
        // No path is PathPrefix "/" (the CRD's default): the same length.
        None => (PathCond::Prefix("/".into()), 2, 0),
        Some(PathMatch::Exact(p)) => (PathCond::Exact(p.clone()), 0, p.len()),
        Some(PathMatch::RegularExpression(p)) => {
            (PathCond::Regex(anchored(&route.id, ri, p)?), 1, p.len())
        }
        Some(PathMatch::PathPrefix(p)) => (
            PathCond::Prefix(p.clone()),
            2,
            p.trim_end_matches('/').len(),
        ),
    };
    // Gateway API: ReplacePrefixMatch only with PathPrefix matches.
    let replaces_prefix = rule
        .filters
        .iter()
        .chain(rule.backends.iter().flat_map(|b| b.filters.iter()))
        .any(|f| {
            let path = match f {
                HttpFilter::RequestRedirect(r) => &r.path,
                HttpFilter::UrlRewrite(u) => &u.path,
                _ => return false,
            };
            matches!(path, Some(PathModifier::ReplacePrefixMatch(_)))
        });
    if replaces_prefix && rank != 2 {
        return Err(RouteError::PrefixRewrite {
            route: route.id.clone(),
            rule: ri,
        });
    }
    let headers = header_conds(&route.id, ri, &m.headers)?;
    let mut query: Vec<(String, ValueCond)> = Vec::new();
    for q in &m.query_params {
        if query.iter().any(|(n, _)| *n == q.name) {
            continue;
        }
        query.push((q.name.clone(), value_cond(&route.id, ri, q)?));
    }
    let method = match &m.method {
        Some(s) => Some(
            Method::from_bytes(s.as_bytes()).map_err(|_| RouteError::Method {
                route: route.id.clone(),
                rule: ri,
                method: s.clone(),
            })?,
        ),
        None => None,
    };
    let key = (
        rank,
        std::cmp::Reverse(len),
        method.is_none(),
        std::cmp::Reverse(headers.len()),
        std::cmp::Reverse(query.len()),
        route.created_unix,
        route.id.clone(),
        ri,
        mi,
    );
    Ok(Entry {
        port: None,
        path,
        method,
        headers,
        query,
        rule: rule.clone(),
        key,
    })
}

/// A gRPC method match is a match on the request path `/<service>/<method>`.
fn compile_grpc_match(
    route: &GrpcRoute,
    ri: usize,
    mi: usize,
    m: &GrpcRouteMatch,
    rule: &Arc<Rule>,
) -> Result<Entry, RouteError> {
    // GRPCRoute precedence: most characters of service, then of method,
    // then most headers. Exact matches (rank 0) come before regular
    // expressions (rank 1, whose ranking the spec leaves open), and both
    // before a match on any method (rank 2); `len` holds the service's
    // characters above the method's.
    let chars = |service: usize, method: usize| service * 1_000_000 + method;
    let (path, rank, len) = match &m.method {
        None => (PathCond::Prefix("/".into()), 2, 0),
        Some(mm) => match (mm.kind, &mm.service, &mm.method) {
            (_, None, None) => (PathCond::Prefix("/".into()), 2, 0),
            (ValueMatchKind::Exact, Some(s), Some(me)) => (
                PathCond::Exact(format!("/{s}/{me}")),
                0,
                chars(s.len(), me.len()),
            ),
            (ValueMatchKind::Exact, Some(s), None) => {
                (PathCond::Prefix(format!("/{s}")), 0, chars(s.len(), 0))
            }
            (ValueMatchKind::Exact, None, Some(me)) => (
                PathCond::Regex(anchored(
                    &route.id,
                    ri,
                    &format!("/[^/]+/{}", regex::escape(me)),
                )?),
                0,
                chars(0, me.len()),
            ),
            (ValueMatchKind::RegularExpression, s, me) => {
                let len = chars(
                    s.as_deref().map_or(0, str::len),
                    me.as_deref().map_or(0, str::len),
                );
                let s = s.as_deref().unwrap_or("[^/]+");
                let me = me.as_deref().unwrap_or("[^/]+");
                (
                    PathCond::Regex(anchored(&route.id, ri, &format!("/(?:{s})/(?:{me})"))?),
                    1,
                    len,
                )
            }
        },
    };
    let headers = header_conds(&route.id, ri, &m.headers)?;
    let key = (
        rank,
        std::cmp::Reverse(len),
        true,
        std::cmp::Reverse(headers.len()),
        std::cmp::Reverse(0),
        route.created_unix,
        route.id.clone(),
        ri,
        mi,
    );
    Ok(Entry {
        port: None,
        path,
        method: None,
        headers,
        query: Vec::new(),
        rule: rule.clone(),
        key,
    })
}

/// `a=1&b=%20x` into decoded pairs, in order.
pub fn parse_query(q: &str) -> Vec<(String, String)> {
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                // Two hex digits (`from_str_radix` alone would take `+1`).
                let hex = std::str::from_utf8(&b[i + 1..i + 3])
                    .ok()
                    .filter(|h| h.bytes().all(|c| c.is_ascii_hexdigit()))
                    .and_then(|h| u8::from_str_radix(h, 16).ok());
                match hex {
                    Some(v) => {
                        out.push(v);
                        i += 3;
                    }
                    None => {
                        out.push(b'%');
                        i += 1;
                    }
                }
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    #[test]
    fn dot_segments_resolve_as_the_workload_reads_them() {
        for (path, want) in [
            ("/api/../admin", Some("/admin")),
            ("/api/%2e%2e/admin", Some("/admin")),
            ("/api/.%2E/admin", Some("/admin")),
            ("/a/./b", Some("/a/b")),
            ("/a/b/..", Some("/a/")),
            ("/a/.", Some("/a/")),
            ("/..", Some("/")),
            ("/../../x", Some("/x")),
            ("/a/b/../../../c", Some("/c")),
            ("/a..b/c.d", None),
            ("/v1.2/%41", None),
            ("/", None),
            ("/a//b", None),
            ("/pkg.Service/Method", None),
        ] {
            assert_eq!(normalized_path(path).as_deref(), want, "{path}");
        }
        for (path, loose) in [
            ("/api/..;/admin", true),
            ("/api/..%2fadmin", true),
            ("/api/..%5Cadmin", true),
            ("/api/..\\admin", true),
            ("/api/.;x=1/admin", true),
            ("/api/a;v=1/b", false),
            ("/group%2Fproject", false),
            ("/a.b/c", false),
        ] {
            assert_eq!(dot_segment_read_loosely(path), loose, "{path}");
        }
    }

    use super::*;
    use crate::config::{GrpcMethodMatch, GrpcRouteRule, HttpRouteRule, ParentRef};

    fn svc() -> ObjectRef {
        ObjectRef::new("shop", "cart")
    }

    fn backend(name: &str) -> BackendRef {
        BackendRef {
            service: ObjectRef::new("shop", name),
            port: 80,
            weight: 1,
            filters: vec![],
            invalid: None,
        }
    }

    fn route(name: &str, created: i64, rules: Vec<(Vec<HttpRouteMatch>, &str)>) -> HttpRoute {
        HttpRoute {
            id: ObjectRef::new("shop", name),
            created_unix: created,
            parents: vec![ParentRef {
                service: svc(),
                port: None,
            }],
            rules: rules
                .into_iter()
                .map(|(matches, b)| HttpRouteRule {
                    matches,
                    backends: vec![backend(b)],
                    ..Default::default()
                })
                .collect(),
        }
    }

    /// A GET of `path` with headers `h`.
    fn get<'a>(h: &'a HeaderMap, path: &'a str) -> RequestView<'a> {
        RequestView {
            method: &Method::GET,
            path,
            query: None,
            headers: h,
            authority: None,
        }
    }

    fn path(p: PathMatch) -> HttpRouteMatch {
        HttpRouteMatch {
            path: Some(p),
            ..Default::default()
        }
    }

    fn pick(t: &RouteTable, method: &str, uri: &str, headers: &[(&str, &str)]) -> Option<String> {
        let uri: http::Uri = uri.parse().unwrap();
        let mut h = HeaderMap::new();
        for (k, v) in headers {
            h.append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        let m = Method::from_bytes(method.as_bytes()).unwrap();
        let view = RequestView {
            method: &m,
            path: uri.path(),
            query: uri.query(),
            headers: &h,
            authority: uri.authority().map(|a| a.as_str()),
        };
        t.route(&svc(), 80, "shop", &view)
            .expect("service has routes")
            .map(|d| d.rule.backends[0].service.name.clone())
    }

    /// The backend a gRPC call of `path` is routed to.
    fn pick_grpc(t: &RouteTable, path: &str) -> Option<String> {
        pick(t, "POST", path, &[("content-type", "application/grpc")])
    }

    /// A GRPCRoute rule of one method match, to backend `b`.
    fn grpc_rule(
        kind: ValueMatchKind,
        service: Option<&str>,
        method: Option<&str>,
        b: &str,
    ) -> GrpcRouteRule {
        GrpcRouteRule {
            matches: vec![GrpcRouteMatch {
                method: Some(GrpcMethodMatch {
                    kind,
                    service: service.map(Into::into),
                    method: method.map(Into::into),
                }),
                headers: vec![],
            }],
            backends: vec![backend(b)],
            ..Default::default()
        }
    }

    /// GRPCRoute shop/g on the test service.
    fn grpc_route(rules: Vec<GrpcRouteRule>) -> GrpcRoute {
        GrpcRoute {
            id: ObjectRef::new("shop", "g"),
            created_unix: 0,
            parents: vec![ParentRef {
                service: svc(),
                port: None,
            }],
            rules,
        }
    }

    #[test]
    fn consumer_routes_serve_their_namespace_only_and_replace_producer_routes() {
        let producer = route("producer", 0, vec![(vec![], "v1")]);
        let mut consumer = route(
            "consumer",
            0,
            vec![(vec![path(PathMatch::Exact("/a".into()))], "v2")],
        );
        consumer.id = ObjectRef::new("web", "consumer");
        let (t, errs) = RouteTable::build(&[producer, consumer], &[]);
        assert!(errs.is_empty(), "{errs:?}");
        let h = HeaderMap::new();
        let decide = |ns: &str, p: &str| {
            let view = get(&h, p);
            t.route(&svc(), 80, ns, &view)
                .map(|d| d.map(|d| d.rule.route.to_string()))
        };
        // Clients of the service's namespace and of others: producer route.
        for ns in ["shop", "other"] {
            assert_eq!(decide(ns, "/a"), Some(Some("shop/producer".into())), "{ns}");
            assert_eq!(decide(ns, "/b"), Some(Some("shop/producer".into())), "{ns}");
        }
        // Clients of the consumer's namespace: only its rules, so /b has no
        // match rather than falling back to the producer route.
        assert_eq!(decide("web", "/a"), Some(Some("web/consumer".into())));
        assert_eq!(decide("web", "/b"), Some(None));

        // With only a consumer route, other clients get the default route.
        let mut consumer = route("consumer", 0, vec![(vec![], "v2")]);
        consumer.id = ObjectRef::new("web", "consumer");
        let (t, _) = RouteTable::build(&[consumer], &[]);
        let view = get(&h, "/");
        assert!(t.route(&svc(), 80, "shop", &view).is_none());
        assert!(
            t.route(&svc(), 80, "web", &view)
                .is_some_and(|d| d.is_some())
        );
    }

    #[test]
    fn routes_attach_to_the_port_their_parent_names() {
        // A producer route for every port, a consumer route (web) and a
        // producer route on port 8080 only.
        let producer = route("producer", 0, vec![(vec![], "v1")]);
        let mut consumer = route("consumer", 0, vec![(vec![], "v2")]);
        consumer.id = ObjectRef::new("web", "consumer");
        consumer.parents[0].port = Some(8080);
        let mut admin = route(
            "admin",
            0,
            vec![(vec![path(PathMatch::Exact("/admin".into()))], "v3")],
        );
        admin.parents[0].port = Some(9090);
        let (t, _) = RouteTable::build(&[producer, consumer], &[]);
        let h = HeaderMap::new();
        let view = get(&h, "/");
        let decide = |t: &RouteTable, port: u16, ns: &str| {
            t.route(&svc(), port, ns, &view)
                .map(|d| d.map(|d| d.rule.route.to_string()))
        };
        // web's consumer route is on 8080 only: on 80 web gets the producer.
        assert_eq!(decide(&t, 80, "web"), Some(Some("shop/producer".into())));
        assert_eq!(decide(&t, 8080, "web"), Some(Some("web/consumer".into())));
        assert_eq!(decide(&t, 8080, "shop"), Some(Some("shop/producer".into())));
        // A service whose only route is on 9090: other ports are unrouted,
        // not 404.
        let (t, _) = RouteTable::build(&[admin], &[]);
        assert_eq!(decide(&t, 80, "shop"), None);
        assert_eq!(
            decide(&t, 9090, "shop"),
            Some(None),
            "/ does not match /admin"
        );
    }

    #[test]
    fn path_kinds_and_their_precedence() {
        let (t, errs) = RouteTable::build(
            &[route(
                "r",
                0,
                vec![
                    (vec![path(PathMatch::PathPrefix("/".into()))], "root"),
                    (vec![path(PathMatch::PathPrefix("/api".into()))], "api"),
                    (vec![path(PathMatch::PathPrefix("/api/v2/".into()))], "v2"),
                    (
                        vec![path(PathMatch::Exact("/api/v2/special".into()))],
                        "exact",
                    ),
                    (
                        vec![path(PathMatch::RegularExpression(
                            "/api/v[0-9]+/items/[0-9]+".into(),
                        ))],
                        "regex",
                    ),
                ],
            )],
            &[],
        );
        assert!(errs.is_empty());
        assert_eq!(pick(&t, "GET", "/", &[]).as_deref(), Some("root"));
        assert_eq!(pick(&t, "GET", "/apix", &[]).as_deref(), Some("root"));
        assert_eq!(pick(&t, "GET", "/api", &[]).as_deref(), Some("api"));
        assert_eq!(pick(&t, "GET", "/api/v1", &[]).as_deref(), Some("api"));
        assert_eq!(pick(&t, "GET", "/api/v2", &[]).as_deref(), Some("v2"));
        assert_eq!(
            pick(&t, "GET", "/api/v2/special", &[]).as_deref(),
            Some("exact")
        );
        assert_eq!(
            pick(&t, "GET", "/api/v2/items/7", &[]).as_deref(),
            Some("regex")
        );
        assert_eq!(
            pick(&t, "GET", "/api/v2/items/7x", &[]).as_deref(),
            Some("v2")
        );
    }

    #[test]
    fn headers_query_and_method() {
        let hm = |name: &str, value: &str, kind| ValueMatch {
            kind,
            name: name.into(),
            value: value.into(),
        };
        let (t, _) = RouteTable::build(
            &[route(
                "r",
                0,
                vec![
                    (
                        vec![HttpRouteMatch {
                            headers: vec![hm("X-Canary", "yes", ValueMatchKind::Exact)],
                            ..Default::default()
                        }],
                        "canary",
                    ),
                    (
                        vec![HttpRouteMatch {
                            headers: vec![
                                hm("x-canary", "yes", ValueMatchKind::Exact),
                                hm("x-user", "u[0-9]+", ValueMatchKind::RegularExpression),
                            ],
                            ..Default::default()
                        }],
                        "canary-user",
                    ),
                    (
                        vec![HttpRouteMatch {
                            query_params: vec![hm("v", "2 beta", ValueMatchKind::Exact)],
                            ..Default::default()
                        }],
                        "query",
                    ),
                    (
                        vec![HttpRouteMatch {
                            method: Some("DELETE".into()),
                            ..Default::default()
                        }],
                        "delete",
                    ),
                    (
                        vec![HttpRouteMatch {
                            headers: vec![hm("cookie", "a=1; b=2", ValueMatchKind::Exact)],
                            ..Default::default()
                        }],
                        "cookies",
                    ),
                    (vec![], "rest"),
                ],
            )],
            &[],
        );
        assert_eq!(pick(&t, "GET", "/", &[]).as_deref(), Some("rest"));
        assert_eq!(
            pick(&t, "GET", "/", &[("x-canary", "yes")]).as_deref(),
            Some("canary")
        );
        assert_eq!(
            pick(&t, "GET", "/", &[("x-canary", "no")]).as_deref(),
            Some("rest")
        );
        assert_eq!(
            pick(&t, "GET", "/", &[("x-canary", "yes"), ("x-user", "u42")]).as_deref(),
            Some("canary-user")
        );
        assert_eq!(
            pick(&t, "GET", "/", &[("x-canary", "yes"), ("x-user", "u42x")]).as_deref(),
            Some("canary")
        );
        // Cookies match as the workload gets them: one line from an
        // HTTP/1.1 caller, one field per cookie from an HTTP/2 caller,
        // joined by "; " (RFC 9113 8.2.3).
        assert_eq!(
            pick(&t, "GET", "/", &[("cookie", "a=1; b=2")]).as_deref(),
            Some("cookies")
        );
        assert_eq!(
            pick(&t, "GET", "/", &[("cookie", "a=1"), ("cookie", "b=2")]).as_deref(),
            Some("cookies")
        );
        // A repeated field matches as its values joined by ", ".
        assert_eq!(
            pick(&t, "GET", "/", &[("x-canary", "yes"), ("x-canary", "yes")]).as_deref(),
            Some("rest")
        );
        assert_eq!(
            pick(
                &t,
                "GET",
                "/",
                &[("x-canary", "yes"), ("x-user", "u4"), ("x-user", "2")]
            )
            .as_deref(),
            Some("canary")
        );
        assert_eq!(
            pick(&t, "GET", "/?a=1&v=2+beta", &[]).as_deref(),
            Some("query")
        );
        assert_eq!(
            pick(&t, "GET", "/?v=2%20beta&v=3", &[]).as_deref(),
            Some("query")
        );
        assert_eq!(
            pick(&t, "GET", "/?v=3&v=2%20beta", &[]).as_deref(),
            Some("rest")
        );
        // A method match outranks header matches.
        assert_eq!(
            pick(&t, "DELETE", "/", &[("x-canary", "yes")]).as_deref(),
            Some("delete")
        );
    }

    #[test]
    fn a_host_match_reads_the_authority_of_an_http2_request() {
        let (t, _) = RouteTable::build(
            &[route(
                "r",
                0,
                vec![
                    (
                        vec![HttpRouteMatch {
                            headers: vec![ValueMatch {
                                kind: ValueMatchKind::Exact,
                                name: "Host".into(),
                                value: "cart.shop".into(),
                            }],
                            ..Default::default()
                        }],
                        "by-host",
                    ),
                    (vec![], "rest"),
                ],
            )],
            &[],
        );
        // HTTP/1.1: the host field.
        assert_eq!(
            pick(&t, "GET", "/", &[("host", "cart.shop")]).as_deref(),
            Some("by-host")
        );
        // HTTP/2: no host field, the :authority in the URI.
        assert_eq!(
            pick(&t, "GET", "http://cart.shop/", &[]).as_deref(),
            Some("by-host")
        );
        assert_eq!(
            pick(&t, "GET", "http://other/", &[]).as_deref(),
            Some("rest")
        );
        // A host field, when there is one, decides.
        assert_eq!(
            pick(&t, "GET", "http://cart.shop/", &[("host", "other")]).as_deref(),
            Some("rest")
        );
    }

    #[test]
    fn ties_go_to_the_oldest_route_then_by_name() {
        let m = || vec![(vec![path(PathMatch::PathPrefix("/a".into()))], "")];
        let mut young = route("a-young", 200, m());
        young.rules[0].backends = vec![backend("young")];
        let mut old = route("z-old", 100, m());
        old.rules[0].backends = vec![backend("old")];
        let (t, _) = RouteTable::build(&[young.clone(), old], &[]);
        assert_eq!(pick(&t, "GET", "/a", &[]).as_deref(), Some("old"));
        let mut same = route("b-same", 200, m());
        same.rules[0].backends = vec![backend("b")];
        let (t, _) = RouteTable::build(&[same, young], &[]);
        assert_eq!(pick(&t, "GET", "/a", &[]).as_deref(), Some("young"));
    }

    #[test]
    fn no_match_and_no_routes_differ() {
        let (t, _) = RouteTable::build(
            &[route(
                "r",
                0,
                vec![(vec![path(PathMatch::Exact("/only".into()))], "x")],
            )],
            &[],
        );
        assert_eq!(pick(&t, "GET", "/other", &[]), None);
        let h = HeaderMap::new();
        let view = get(&h, "/");
        assert!(
            t.route(&ObjectRef::new("shop", "other"), 80, "shop", &view)
                .is_none()
        );
    }

    #[test]
    fn parent_port_narrows_the_route() {
        let mut r = route("r", 0, vec![(vec![], "x")]);
        r.parents[0].port = Some(8080);
        let (t, _) = RouteTable::build(&[r], &[]);
        let h = HeaderMap::new();
        let view = get(&h, "/");
        assert!(
            t.route(&svc(), 80, "shop", &view).is_none(),
            "port 80 is not the parent port: the route does not apply there"
        );
        assert!(
            t.route(&svc(), 8080, "shop", &view)
                .is_some_and(|d| d.is_some())
        );
    }

    #[test]
    fn bad_regex_drops_only_its_rule() {
        let (t, errs) = RouteTable::build(
            &[route(
                "r",
                0,
                vec![
                    (vec![path(PathMatch::RegularExpression("/(".into()))], "bad"),
                    (vec![], "good"),
                ],
            )],
            &[],
        );
        assert_eq!(errs.len(), 1);
        assert!(errs[0].to_string().contains("shop/r rule 0"), "{}", errs[0]);
        assert_eq!(pick(&t, "GET", "/(", &[]).as_deref(), Some("good"));
    }

    #[test]
    fn no_path_ties_with_an_explicit_prefix_slash_and_more_headers_win() {
        // Rule "canary": PathPrefix "/" and a header; rule "plain": no
        // match at all (a missing path is PathPrefix "/").
        let canary = HttpRouteMatch {
            path: Some(PathMatch::PathPrefix("/".into())),
            headers: vec![ValueMatch {
                kind: ValueMatchKind::Exact,
                name: "x-canary".into(),
                value: "yes".into(),
            }],
            ..Default::default()
        };
        let r = route("r", 0, vec![(vec![], "plain"), (vec![canary], "canary")]);
        let (t, errs) = RouteTable::build(&[r], &[]);
        assert!(errs.is_empty(), "{errs:?}");
        assert_eq!(
            pick(&t, "GET", "/x", &[("x-canary", "yes")]).as_deref(),
            Some("canary")
        );
        assert_eq!(pick(&t, "GET", "/x", &[]).as_deref(), Some("plain"));
    }

    #[test]
    fn grpc_precedence_counts_service_then_method_characters() {
        let g = grpc_route(vec![
            grpc_rule(ValueMatchKind::Exact, None, Some("Add"), "method-only"),
            grpc_rule(
                ValueMatchKind::RegularExpression,
                Some(".*"),
                None,
                "any-service",
            ),
            grpc_rule(ValueMatchKind::Exact, Some("shop.Cart"), None, "service"),
        ]);
        let (t, errs) = RouteTable::build(&[], &[g]);
        assert!(errs.is_empty(), "{errs:?}");
        // The service's 9 characters beat the method's 3, and an exact
        // match beats a regular expression.
        assert_eq!(pick_grpc(&t, "/shop.Cart/Add").as_deref(), Some("service"));
        assert_eq!(
            pick_grpc(&t, "/shop.Users/Add").as_deref(),
            Some("method-only")
        );
        assert_eq!(
            pick_grpc(&t, "/shop.Users/Get").as_deref(),
            Some("any-service")
        );
    }

    #[test]
    fn grpc_routes_match_service_and_method() {
        let g = grpc_route(vec![
            grpc_rule(ValueMatchKind::Exact, Some("shop.Cart"), Some("Add"), "add"),
            grpc_rule(ValueMatchKind::Exact, Some("shop.Cart"), None, "cart"),
            grpc_rule(
                ValueMatchKind::RegularExpression,
                Some("shop\\..*"),
                Some("Get.*"),
                "getters",
            ),
        ]);
        let (t, errs) = RouteTable::build(&[route("h", 0, vec![(vec![], "http")])], &[g]);
        assert!(errs.is_empty(), "{errs:?}");
        assert_eq!(pick_grpc(&t, "/shop.Cart/Add").as_deref(), Some("add"));
        assert_eq!(pick_grpc(&t, "/shop.Cart/Remove").as_deref(), Some("cart"));
        assert_eq!(
            pick_grpc(&t, "/shop.Users/GetUser").as_deref(),
            Some("getters")
        );
        assert_eq!(pick_grpc(&t, "/other.X/Y").as_deref(), Some("http"));
        // Not gRPC: GRPCRoutes do not apply.
        assert_eq!(
            pick(&t, "POST", "/shop.Cart/Add", &[]).as_deref(),
            Some("http")
        );
    }

    #[test]
    fn query_decoding() {
        assert_eq!(
            parse_query("a=1&b=%41%2&c&d=x+y"),
            vec![
                ("a".into(), "1".into()),
                ("b".into(), "A%2".into()),
                ("c".into(), "".into()),
                ("d".into(), "x y".into())
            ]
        );
        // Two hex digits or nothing decoded: no sign (`+` is a space).
        assert_eq!(
            parse_query("v=%+1&w=%-f"),
            vec![("v".into(), "% 1".into()), ("w".into(), "%-f".into())]
        );
    }
}
