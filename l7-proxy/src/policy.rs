//! Inbound authorisation: `AccessPolicy` allow-lists, checked against the
//! verified SPIFFE ID of the caller.
//!
//! Default allow until a policy targets a Service the workload belongs to;
//! from then on, default deny unless a rule of one of those policies allows.
//! The Services that count are those whose ports lead to the port the caller
//! asked for (a policy on the metrics Service does not open the API port);
//! a port no Service leads to is governed by all of them.

use http::Method;

use crate::{
    config::{
        AccessPolicy, AccessRule, AccessSource, HttpConditions, LocalWorkload, PathCondition,
        SpiffeId,
    },
    state::State,
};

/// The HTTP facts of a request, when the stream is HTTP.
#[derive(Clone, Copy, Debug)]
pub struct HttpFacts<'a> {
    pub method: &'a Method,
    pub path: &'a str,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    Deny(Denial),
}

/// Why a caller was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Denial {
    /// What the caller is told (`sluice-reason`): who may not do what. The
    /// policies are not named there: their names are the workload's
    /// namespace's business, not every caller's.
    pub reason: String,
    /// The policies that were checked (`namespace/name`, comma-separated),
    /// for this node's log and access record.
    pub policies: String,
}

impl Denial {
    /// The reason with the policies, as this node's log gives it.
    pub fn logged(&self) -> String {
        format!("{} (access policies {})", self.reason, self.policies)
    }
}

pub fn authorize(
    state: &State,
    caller: &SpiffeId,
    target: &LocalWorkload,
    port: u16,
    http: Option<HttpFacts<'_>>,
) -> Verdict {
    // Only Services of the workload's own namespace govern it: a Service
    // elsewhere can list any address in a hand-made EndpointSlice, and its
    // policies must neither open nor close another tenant's workload.
    let services = state.services_for(target.ip, port, &target.id.namespace);
    let policies: Vec<&AccessPolicy> = state
        .snapshot
        .access_policies
        .iter()
        .filter(|p| services.contains(&&p.target))
        .collect();
    if policies.is_empty() {
        return Verdict::Allow;
    }
    for p in &policies {
        if p.rules.iter().any(|r| rule_allows(r, caller, http)) {
            return Verdict::Allow;
        }
    }
    let names: Vec<String> = policies.iter().map(|p| p.id.to_string()).collect();
    Verdict::Deny(Denial {
        reason: format!(
            "{caller} is not allowed{} by the access policies governing {}",
            match http {
                Some(h) => format!(" to {} {}", h.method, shorten(h.path)),
                None => String::new(),
            },
            target.identity
        ),
        policies: names.join(", "),
    })
}

/// A path as a denial's reason shows it: the first 200 bytes (a caller
/// sending 60 KiB paths to a workload it may not call must not make every
/// log line that long).
fn shorten(path: &str) -> std::borrow::Cow<'_, str> {
    const SHOWN: usize = 200;
    if path.len() <= SHOWN {
        return path.into();
    }
    let mut end = SHOWN;
    while !path.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}... ({} bytes)", &path[..end], path.len()).into()
}

fn rule_allows(rule: &AccessRule, caller: &SpiffeId, http: Option<HttpFacts<'_>>) -> bool {
    let from_ok = rule.from.is_empty() || rule.from.iter().any(|s| source_matches(s, caller));
    from_ok
        && match (&rule.to, http) {
            (None, _) => true,
            (Some(_), None) => false,
            (Some(c), Some(h)) => conditions_match(c, h),
        }
}

fn source_matches(s: &AccessSource, caller: &SpiffeId) -> bool {
    match s {
        AccessSource::Identity(id) => id == caller,
        AccessSource::Namespace(ns) => caller.namespace() == ns,
        AccessSource::ServiceAccount(sa) => {
            caller.namespace() == sa.namespace && caller.service_account() == sa.name
        }
    }
}

fn conditions_match(c: &HttpConditions, h: HttpFacts<'_>) -> bool {
    let method_ok = c.methods.is_empty()
        || c.methods
            .iter()
            // Methods are case-sensitive (RFC 9110 §9.1): `get` is not
            // `GET`, and a workload may treat it as something else.
            .any(|m| m == h.method.as_str());
    let path_ok = c.paths.is_empty()
        || (!ambiguous_path(h.path)
            && c.paths.iter().any(|p| match p {
                // By whole segments: `/a` is `/a` and `/a/…`, never `/ab`.
                PathCondition::Subtree(base) => {
                    let base = base.trim_end_matches('/');
                    h.path == base
                        || h.path
                            .strip_prefix(base)
                            .is_some_and(|rest| rest.starts_with('/'))
                }
                PathCondition::Exact(p) => p == h.path,
            }));
    method_ok && path_ok
}

/// A path a workload might resolve to another one than it reads as: one
/// with a `.` or `..` segment once `%2e`, `%2f` and `%5c` are decoded, a
/// backslash taken as `/`, and `;…` path parameters cut from each segment
/// (as Tomcat, Jetty and Spring do), or with a `%25` (a double encoding),
/// a `%` not followed by two hexadecimal digits (`%u002e`, a dot to IIS and
/// to some Jetty releases) or a `%00` (a NUL, where some servers end the
/// path: `/public/..%00/admin`). Path conditions never allow such a path,
/// so neither `/public/../admin` nor `/public/..;/admin` passes for
/// `/public/*`. Encoded slashes inside a segment (`group%2Fproject`) and
/// repeated slashes are fine: they stay under the prefix however they are
/// read.
fn ambiguous_path(path: &str) -> bool {
    (path.contains('%') && odd_escape(path.as_bytes()))
        || crate::router::dot_segment_read_loosely(path)
}

/// Whether `path` holds an escape other than `%XY` (two hexadecimal digits)
/// for a byte other than NUL or `%`.
fn odd_escape(path: &[u8]) -> bool {
    path.iter().enumerate().any(|(i, &b)| {
        b == b'%'
            && match path.get(i + 1..i + 3) {
                Some([x, y]) if x.is_ascii_hexdigit() && y.is_ascii_hexdigit() => {
                    matches!([*x, y.to_ascii_lowercase()], [b'0', b'0'] | [b'2', b'5'])
                }
                _ => true,
            }
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::config::{
        Endpoint, MtlsMode, ObjectRef, SelectedBy, Service, ServicePort, Snapshot,
    };

    fn id(s: &str) -> SpiffeId {
        s.parse().unwrap()
    }

    fn state(policies: Vec<AccessPolicy>) -> (State, LocalWorkload) {
        let w = LocalWorkload {
            ip: "10.0.0.7".parse().unwrap(),
            id: ObjectRef::new("shop", "cart-1"),
            service_account: "cart".into(),
            identity: id("spiffe://cluster.local/ns/shop/sa/cart"),
            mtls_mode: MtlsMode::Strict,
            selected_by: Vec::new(),
        };
        let snap = Snapshot {
            services: vec![Service {
                id: ObjectRef::new("shop", "cart"),
                vips: vec![],
                ports: vec![ServicePort {
                    port: 80,
                    target_port: 8080,
                    app_protocol: None,
                }],
                endpoints: vec![Endpoint {
                    ip: w.ip,
                    ready: true,
                    workload: None,
                    node_proxy: None,
                    identity: None,
                    ports: Default::default(),
                    unready_ports: Vec::new(),
                }],
                affinity_timeout_s: None,
            }],
            local_workloads: vec![w.clone()],
            access_policies: policies,
            ..Default::default()
        };
        (State::build(Arc::new(snap)).0, w)
    }

    fn policy(target: &str, rules: Vec<AccessRule>) -> AccessPolicy {
        AccessPolicy {
            id: ObjectRef::new("shop", "p"),
            target: ObjectRef::new("shop", target),
            rules,
        }
    }

    /// A denial's reason shows a long path cut, at a character boundary.
    #[test]
    fn a_denials_reason_cuts_a_long_path() {
        assert_eq!(shorten("/a/b"), "/a/b");
        let long = format!("/{}", "\u{fc}".repeat(5_000));
        let shown = shorten(&long);
        assert!(shown.len() < 240, "{shown}");
        assert!(shown.starts_with("/\u{fc}\u{fc}"), "{shown}");
        assert!(shown.ends_with("... (10001 bytes)"), "{shown}");
    }

    #[test]
    fn no_policy_allows_everyone() {
        let (s, w) = state(vec![policy("other", vec![])]);
        assert_eq!(
            authorize(&s, &id("spiffe://cluster.local/ns/x/sa/y"), &w, 8080, None),
            Verdict::Allow
        );
    }

    #[test]
    fn a_service_of_another_namespace_listing_the_workload_governs_nothing() {
        let (s, w) = state(vec![]);
        let mut snap = (*s.snapshot).clone();
        // Namespace evil lists shop's pod in its own Service by hand.
        let mut evil = snap.services[0].clone();
        evil.id = ObjectRef::new("evil", "s");
        snap.services.push(evil);
        let allow_all = |ns: &str, target: &str| AccessPolicy {
            id: ObjectRef::new(ns, "p"),
            target: ObjectRef::new(ns, target),
            rules: vec![AccessRule {
                from: vec![],
                to: None,
            }],
        };
        let deny_all = |ns: &str, target: &str| AccessPolicy {
            rules: vec![],
            ..allow_all(ns, target)
        };
        let caller = id("spiffe://cluster.local/ns/evil/sa/x");
        // shop's policy lets no one in; evil's would let everyone in.
        snap.access_policies = vec![deny_all("shop", "cart"), allow_all("evil", "s")];
        let st = State::build(Arc::new(snap.clone())).0;
        assert!(matches!(
            authorize(&st, &caller, &w, 8080, None),
            Verdict::Deny(_)
        ));
        // Without a policy of shop's, evil's deny-all closes nothing.
        snap.access_policies = vec![deny_all("evil", "s")];
        let st = State::build(Arc::new(snap)).0;
        assert_eq!(authorize(&st, &caller, &w, 8080, None), Verdict::Allow);
    }

    #[test]
    fn the_services_that_lead_to_the_port_govern_it() {
        let (s, w) = state(vec![]);
        let mut snap = (*s.snapshot).clone();
        // The same pod behind a second Service, for its metrics port.
        let mut metrics = snap.services[0].clone();
        metrics.id = ObjectRef::new("shop", "cart-metrics");
        metrics.ports[0].port = 9090;
        metrics.ports[0].target_port = 9090;
        snap.services.push(metrics);
        let only = |target: &str, ns: &str| AccessPolicy {
            id: ObjectRef::new("shop", target),
            target: ObjectRef::new("shop", target),
            rules: vec![AccessRule {
                from: vec![AccessSource::Namespace(ns.into())],
                to: None,
            }],
        };
        snap.access_policies = vec![only("cart", "web"), only("cart-metrics", "monitoring")];
        let st = State::build(Arc::new(snap)).0;
        let web = id("spiffe://cluster.local/ns/web/sa/x");
        let monitoring = id("spiffe://cluster.local/ns/monitoring/sa/prometheus");
        // The metrics policy does not open the API port, nor the reverse.
        assert_eq!(authorize(&st, &web, &w, 8080, None), Verdict::Allow);
        let Verdict::Deny(denial) = authorize(&st, &monitoring, &w, 8080, None) else {
            panic!("monitoring reached the API port");
        };
        assert!(
            denial.policies.contains("shop/cart") && !denial.policies.contains("cart-metrics"),
            "{denial:?}"
        );
        assert_eq!(authorize(&st, &monitoring, &w, 9090, None), Verdict::Allow);
        assert!(matches!(
            authorize(&st, &web, &w, 9090, None),
            Verdict::Deny(_)
        ));
        // A port no Service leads to: every policy of the pod's Services.
        assert_eq!(authorize(&st, &monitoring, &w, 6060, None), Verdict::Allow);
        let other = id("spiffe://cluster.local/ns/other/sa/x");
        assert!(matches!(
            authorize(&st, &other, &w, 6060, None),
            Verdict::Deny(_)
        ));
        // A Service of another namespace listing the pod on that port does
        // not take it out of shop's policies.
        let mut snap = (*st.snapshot).clone();
        let mut evil = snap.services[0].clone();
        evil.id = ObjectRef::new("evil", "s");
        evil.ports[0].port = 6060;
        evil.ports[0].target_port = 6060;
        snap.services.push(evil);
        let st = State::build(Arc::new(snap)).0;
        assert!(matches!(
            authorize(&st, &other, &w, 6060, None),
            Verdict::Deny(_)
        ));
    }

    /// A dual-stack pod whose Service's (hand-made) EndpointSlice lists one
    /// of its addresses: the Service's policies govern the other address
    /// too, or a caller would go round them by it.
    #[test]
    fn a_service_listing_one_address_of_a_pod_governs_all_of_them() {
        let only_web = policy(
            "cart",
            vec![AccessRule {
                from: vec![AccessSource::Namespace("web".into())],
                to: None,
            }],
        );
        let (s, w) = state(vec![only_web]);
        let mut snap = (*s.snapshot).clone();
        let v6 = LocalWorkload {
            ip: "fd00::7".parse().unwrap(),
            ..w.clone()
        };
        snap.local_workloads.push(v6.clone());
        let st = State::build(Arc::new(snap)).0;
        let ops = id("spiffe://cluster.local/ns/ops/sa/x");
        let web = id("spiffe://cluster.local/ns/web/sa/x");
        for w in [&w, &v6] {
            assert!(
                matches!(authorize(&st, &ops, w, 8080, None), Verdict::Deny(_)),
                "{}",
                w.ip
            );
            assert_eq!(authorize(&st, &web, w, 8080, None), Verdict::Allow);
        }
    }

    #[test]
    fn a_selecting_service_governs_before_any_endpoint_lists_the_workload() {
        let (s, mut w) = state(vec![]);
        let mut snap = (*s.snapshot).clone();
        // No EndpointSlice lists the pod yet.
        snap.services[0].endpoints.clear();
        let only_web = |ns: &str, target: &str| AccessPolicy {
            id: ObjectRef::new(ns, "p"),
            target: ObjectRef::new(ns, target),
            rules: vec![AccessRule {
                from: vec![AccessSource::Namespace("web".into())],
                to: None,
            }],
        };
        snap.access_policies = vec![only_web("shop", "cart"), only_web("evil", "s")];
        let ops = id("spiffe://cluster.local/ns/ops/sa/x");
        let web = id("spiffe://cluster.local/ns/web/sa/x");
        let build = |snap: &Snapshot, w: &LocalWorkload| {
            let mut snap = snap.clone();
            snap.local_workloads = vec![w.clone()];
            State::build(Arc::new(snap)).0
        };
        assert_eq!(
            authorize(&build(&snap, &w), &ops, &w, 8080, None),
            Verdict::Allow
        );
        w.selected_by = vec![SelectedBy {
            service: ObjectRef::new("shop", "cart"),
            ports: vec![8080],
            http_ports: Vec::new(),
            tcp_ports: Vec::new(),
        }];
        let st = build(&snap, &w);
        assert!(matches!(
            authorize(&st, &ops, &w, 8080, None),
            Verdict::Deny(_)
        ));
        assert_eq!(authorize(&st, &web, &w, 8080, None), Verdict::Allow);
        // It governs the ports no Service leads to as well.
        assert!(matches!(
            authorize(&st, &ops, &w, 9999, None),
            Verdict::Deny(_)
        ));
        // Leading to no port (a named target port the pod lacks), it
        // governs nothing: a pod no Service leads to takes every caller.
        w.selected_by[0].ports.clear();
        let st = build(&snap, &w);
        assert_eq!(authorize(&st, &ops, &w, 9999, None), Verdict::Allow);
        // Another namespace's Service governs nothing, named here or not.
        w.selected_by = vec![SelectedBy {
            service: ObjectRef::new("evil", "s"),
            ports: vec![8080],
            http_ports: Vec::new(),
            tcp_ports: Vec::new(),
        }];
        assert_eq!(
            authorize(&build(&snap, &w), &ops, &w, 8080, None),
            Verdict::Allow
        );
    }

    #[test]
    fn sources_by_identity_namespace_and_service_account() {
        let (s, w) = state(vec![policy(
            "cart",
            vec![AccessRule {
                from: vec![
                    AccessSource::Identity(id("spiffe://cluster.local/ns/a/sa/one")),
                    AccessSource::Namespace("b".into()),
                    AccessSource::ServiceAccount(ObjectRef::new("c", "web")),
                ],
                to: None,
            }],
        )]);
        for ok in [
            "spiffe://cluster.local/ns/a/sa/one",
            "spiffe://cluster.local/ns/b/sa/any",
            "spiffe://cluster.local/ns/c/sa/web",
        ] {
            assert_eq!(
                authorize(&s, &id(ok), &w, 8080, None),
                Verdict::Allow,
                "{ok}"
            );
        }
        for bad in [
            "spiffe://cluster.local/ns/a/sa/two",
            "spiffe://cluster.local/ns/c/sa/db",
        ] {
            let Verdict::Deny(denial) = authorize(&s, &id(bad), &w, 8080, None) else {
                panic!("{bad} allowed");
            };
            // The caller is told who and what, the log which policies too.
            assert!(
                denial.reason.contains(bad) && !denial.reason.contains("shop/p"),
                "{denial:?}"
            );
            assert_eq!(denial.policies, "shop/p");
            assert!(denial.logged().ends_with("(access policies shop/p)"));
        }
    }

    #[test]
    fn http_conditions_narrow_and_never_allow_tcp() {
        let (s, w) = state(vec![policy(
            "cart",
            vec![AccessRule {
                from: vec![],
                to: Some(HttpConditions {
                    methods: vec!["GET".into()],
                    paths: vec![
                        PathCondition::Subtree("/public".into()),
                        PathCondition::Exact("/health".into()),
                        PathCondition::Exact("/api*".into()),
                        // Literal, not a subtree of `/files`.
                        PathCondition::Exact("/files/*".into()),
                    ],
                }),
            }],
        )]);
        let caller = id("spiffe://cluster.local/ns/a/sa/one");
        let facts = |m: &'static Method, p: &'static str| Some(HttpFacts { method: m, path: p });
        assert_eq!(
            authorize(&s, &caller, &w, 8080, facts(&Method::GET, "/public/x")),
            Verdict::Allow
        );
        assert_eq!(
            authorize(&s, &caller, &w, 8080, facts(&Method::GET, "/public")),
            Verdict::Allow
        );
        // A subtree is whole segments; a `*` in an exact path is literal.
        for outside in ["/publicity", "/apiadmin", "/api", "/files/x", "/files"] {
            assert!(
                matches!(
                    authorize(&s, &caller, &w, 8080, facts(&Method::GET, outside)),
                    Verdict::Deny(_)
                ),
                "{outside}"
            );
        }
        assert_eq!(
            authorize(&s, &caller, &w, 8080, facts(&Method::GET, "/api*")),
            Verdict::Allow
        );
        assert_eq!(
            authorize(&s, &caller, &w, 8080, facts(&Method::GET, "/health")),
            Verdict::Allow
        );
        assert!(matches!(
            authorize(&s, &caller, &w, 8080, facts(&Method::POST, "/health")),
            Verdict::Deny(_)
        ));
        // Methods are case-sensitive: a `get` is not the `GET` allowed.
        let lower: &'static Method = Box::leak(Box::new(Method::from_bytes(b"get").unwrap()));
        assert!(matches!(
            authorize(&s, &caller, &w, 8080, facts(lower, "/health")),
            Verdict::Deny(_)
        ));
        assert!(matches!(
            authorize(&s, &caller, &w, 8080, facts(&Method::GET, "/private")),
            Verdict::Deny(_)
        ));
        assert!(matches!(
            authorize(&s, &caller, &w, 8080, None),
            Verdict::Deny(_)
        ));
        for sneaky in [
            "/public/../admin",
            "/public/%2e%2e/admin",
            "/public/.%2E/admin",
            "/public/./x",
            "/public%2f..%2fadmin",
            "/public/x%2F..%2F..%2Fadmin",
            "/public/..\\admin",
            "/public/..;/admin",
            "/public/.;x=1/admin",
            "/public/%252e%252e/admin",
            "/public/%u002e%u002e/admin",
            "/public/..%00/admin",
            "/public/x%",
            "/public/x%4",
        ] {
            assert!(
                matches!(
                    authorize(&s, &caller, &w, 8080, facts(&Method::GET, sneaky)),
                    Verdict::Deny(_)
                ),
                "{sneaky}"
            );
        }
        for fine in [
            "/public/a.b/..c",
            "/public/group%2Fproject",
            "/public//x",
            "/public/x;v=1",
            "/public/caf%C3%A9",
        ] {
            assert_eq!(
                authorize(&s, &caller, &w, 8080, facts(&Method::GET, fine)),
                Verdict::Allow,
                "{fine}"
            );
        }
    }
}
