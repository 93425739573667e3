//! The translation of the agent's view into the proxy's snapshot.

use l7_proxy::config::{
    Fraction, HeaderModifier, HeaderPair, HttpFilter, HttpRouteRule, ParentRef, PathMatch,
    PathModifier, RequestMirror, Retry, Timeouts, UrlRewrite, ValueMatchKind,
};

use super::{routes::http_route, *};
use crate::{
    config,
    crds::MtlsMode as CrdMode,
    gateway::{GrpcRoute as GwGrpcRoute, HttpRoute as GwHttpRoute},
    reconcile::refs::RefIndex,
    reconcile::{mesh::mesh_view, workloads::workload_infos},
    state::{NodeInfo, Object, Store, Update},
    testing::*,
};

fn store(objs: Vec<Object>) -> Store {
    let mut s = Store::new();
    for o in objs {
        s.apply(Update::Upsert(o));
    }
    s
}

fn view(s: &Store) -> MeshView {
    let mut w = workload_infos(s, "n1", "cluster.local", CrdMode::Permissive);
    // As the reconciler does once the cgroup is enrolled.
    for x in &mut w {
        if x.local && x.enrolled {
            x.cgroup_id = Some(1);
        }
    }
    mesh_view(s, "n1", "cluster.local", w, 1)
}

fn base() -> Vec<Object> {
    vec![
        Object::Namespace(namespace("shop", true)),
        Object::Namespace(namespace("plain", false)),
        Object::Node(NodeInfo {
            name: "n1".into(),
            addresses: vec!["192.0.2.1".parse().unwrap()],
        }),
        Object::Node(NodeInfo {
            name: "n2".into(),
            addresses: vec!["192.0.2.2".parse().unwrap()],
        }),
        Object::Pod(workload("shop", "web-0", "web", "10.0.1.1", "n1")),
        Object::Pod(workload("shop", "db-0", "db", "10.0.2.1", "n2")),
        Object::Pod(workload("plain", "legacy-0", "legacy", "10.0.2.9", "n2")),
        Object::Service(service("shop", "db", "127.96.0.5", &[5432])),
        Object::EndpointSlice(slice(
            "shop",
            "db-1",
            "db",
            &[5433],
            &[ep_ready("10.0.2.1")],
        )),
        Object::Service(service("plain", "legacy", "127.96.0.6", &[80])),
        Object::EndpointSlice(slice(
            "plain",
            "legacy-1",
            "legacy",
            &[8080],
            &[ep_ready("10.0.2.9")],
        )),
    ]
}

#[test]
fn services_endpoints_and_workloads_follow_enrolment() {
    let s = store(base());
    let (snap, errors) = snapshot(&view(&s), 15008);
    assert_eq!(errors, Vec::<String>::new());
    let db = snap.services.iter().find(|x| x.id.name == "db").unwrap();
    assert_eq!(db.vips, ["127.96.0.5".parse::<IpAddr>().unwrap()]);
    assert_eq!((db.ports[0].port, db.ports[0].target_port), (5432, 5433));
    let ep = &db.endpoints[0];
    assert_eq!(
        ep.node_proxy,
        Some("192.0.2.2:15008".parse().unwrap()),
        "meshed pod: through its node proxy"
    );
    assert_eq!(
        ep.identity.as_ref().unwrap().to_string(),
        "spiffe://cluster.local/ns/shop/sa/db"
    );
    let legacy = snap
        .services
        .iter()
        .find(|x| x.id.name == "legacy")
        .unwrap();
    assert_eq!(
        legacy.endpoints[0].node_proxy, None,
        "not enrolled: plaintext, directly"
    );
    assert_eq!(legacy.endpoints[0].identity, None);
    // Local enrolled workloads are the proxy's sources.
    assert_eq!(snap.local_workloads.len(), 1);
    assert_eq!(snap.local_workloads[0].id, ObjectRef::new("shop", "web-0"));
    assert_eq!(
        snap.local_workloads[0].ip,
        "10.0.1.1".parse::<IpAddr>().unwrap()
    );
    // Meshed pods anywhere, for pod-IP traffic.
    let names: Vec<&str> = snap.workloads.iter().map(|w| w.id.name.as_str()).collect();
    assert_eq!(names, ["web-0", "db-0"]);
}

/// A meshed pod on a node whose address nothing gives (a files source's
/// `nodes:` without it, a `node:` typo) cannot be reached through its node
/// proxy: the translation says so, naming the node, its pods and the fix.
#[test]
fn meshed_pods_on_a_node_of_no_known_address_are_reported() {
    let mut objs = base();
    objs.push(Object::Pod(workload(
        "shop", "db-1", "db", "10.0.3.1", "n3",
    )));
    objs.push(Object::Pod(workload(
        "shop", "db-2", "db", "10.0.3.2", "n3",
    )));
    // Out of the mesh: reached in plaintext anyway, nothing to say.
    objs.push(Object::Pod(workload(
        "plain", "legacy-1", "legacy", "10.0.3.9", "n3",
    )));
    // Pending (no node, no address yet): nothing reaches it.
    let mut pending = workload("shop", "db-9", "db", "10.0.3.3", "");
    pending.ips.clear();
    objs.push(Object::Pod(pending));
    let (snap, errors) = snapshot(&view(&store(objs)), 15008);
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(
        errors[0].contains("node \"n3\"")
            && errors[0].contains("shop/db-1, shop/db-2")
            && !errors[0].contains("legacy")
            && errors[0].contains("`nodes:`"),
        "{}",
        errors[0]
    );
    let db1 = snap.workloads.iter().find(|w| w.id.name == "db-1");
    assert!(db1.is_none(), "{db1:?}");
}

#[test]
fn a_pod_address_of_the_family_its_node_lacks_still_goes_through_the_tunnel() {
    let mut objs = base();
    // db-0 is dual-stack; its node n2 is known by an IPv4 address only.
    for o in &mut objs {
        if let Object::Pod(w) = o
            && w.name == "db-0"
        {
            w.ips.push("fd00::21".parse().unwrap());
        }
    }
    let (snap, _) = snapshot(&view(&store(objs.clone())), 15008);
    let v6 = snap
        .workloads
        .iter()
        .find(|w| w.ip == "fd00::21".parse::<IpAddr>().unwrap())
        .expect("the pod's IPv6 address is a meshed workload");
    assert_eq!(v6.node_proxy, Some("192.0.2.2:15008".parse().unwrap()));
    assert!(v6.identity.is_some());
    // A dual-stack node listed IPv4 first: its proxy listens there (its
    // first address), so IPv6 pods are reached there too.
    for o in &mut objs {
        if let Object::Node(n) = o
            && n.name == "n2"
        {
            n.addresses.push("2001:db8::2".parse().unwrap());
        }
    }
    let (snap, _) = snapshot(&view(&store(objs)), 15008);
    let v6 = snap
        .workloads
        .iter()
        .find(|w| w.ip == "fd00::21".parse::<IpAddr>().unwrap())
        .unwrap();
    assert_eq!(v6.node_proxy, Some("192.0.2.2:15008".parse().unwrap()));
}

#[test]
fn a_disabled_destination_is_reached_in_plaintext() {
    let mut objs = base();
    let mut p = crate::crds::MeshPolicy::new(
        "off",
        serde_json::from_value(serde_json::json!({"mode": "DISABLED"})).unwrap(),
    );
    p.metadata.namespace = Some("shop".into());
    objs.push(Object::MeshPolicy(p));
    let (snap, _) = snapshot(&view(&store(objs)), 15008);
    let db = snap.services.iter().find(|x| x.id.name == "db").unwrap();
    assert_eq!(db.endpoints[0].node_proxy, None);
    assert_eq!(snap.local_workloads[0].mtls_mode, MtlsMode::Disabled);
}

#[test]
fn http_routes_translate_matches_filters_backends_and_timeouts() {
    let r: GwHttpRoute = serde_json::from_value(serde_json::json!({
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
        "metadata": {"name": "db-split", "namespace": "shop", "creationTimestamp": "2026-01-01T00:00:00Z"},
        "spec": {
            "parentRefs": [{"group": "", "kind": "Service", "name": "db", "port": 5432}, {"name": "gw"}],
            "rules": [
                {
                    "name": "v2",
                    "matches": [{"path": {"type": "PathPrefix", "value": "/v2"},
                                 "headers": [{"name": "x-canary", "value": "1"}],
                                 "queryParams": [{"type": "RegularExpression", "name": "u", "value": "a.*"}],
                                 "method": "POST"}],
                    "filters": [
                        {"type": "RequestHeaderModifier", "requestHeaderModifier": {"set": [{"name": "x-a", "value": "b"}], "remove": ["x-c"]}},
                        {"type": "URLRewrite", "urlRewrite": {"path": {"type": "ReplacePrefixMatch", "replacePrefixMatch": "/"}}},
                        {"type": "RequestMirror", "requestMirror": {"backendRef": {"name": "db", "port": 5432}, "percent": 10}}
                    ],
                    "backendRefs": [{"name": "db", "port": 5432, "weight": 3},
                                    {"name": "db", "namespace": "shop", "port": 5432,
                                     "filters": [{"type": "ResponseHeaderModifier", "responseHeaderModifier": {"add": [{"name": "x-b", "value": "2"}]}}]}],
                    "timeouts": {"request": "1m30s", "backendRequest": "500ms"}
                },
                {"filters": [{"type": "ExtensionRef", "extensionRef": {"group": "x", "kind": "y", "name": "z"}}]}
            ]
        }
    }))
    .unwrap();
    let t = http_route(&r, &RefIndex::of(&store(base())));
    let h = t.route.expect("one rule translates");
    assert_eq!(h.created_unix, 1_767_225_600);
    assert_eq!(
        h.parents,
        [ParentRef {
            service: ObjectRef::new("shop", "db"),
            port: Some(5432)
        }]
    );
    // The ExtensionRef rule cannot be carried out; it is kept to answer
    // its matches (here every request the first rule does not take) with
    // 500, not left out to let them through unfiltered.
    assert_eq!(h.rules.len(), 2);
    assert_eq!(h.rules[1].filters, vec![]);
    let closed = &h.rules[1].backends;
    assert_eq!(closed.len(), 1);
    assert!(
        closed[0]
            .invalid
            .as_deref()
            .is_some_and(|why| why.contains("ExtensionRef")),
        "{closed:?}"
    );
    assert_eq!(t.rules, 2);
    assert_eq!(t.dropped.len(), 1);
    assert_eq!(t.dropped[0].index, 1);
    assert!(t.dropped[0].closed);
    assert!(
        t.dropped[0]
            .message
            .contains("spec.rules[1].filters[0].type")
            && t.dropped[0].message.contains("ExtensionRef"),
        "{:?}",
        t.dropped
    );
    assert_eq!(t.refused, vec![], "every reference resolves");
    let rule = &h.rules[0];
    let m = &rule.matches[0];
    assert_eq!(m.path, Some(PathMatch::PathPrefix("/v2".into())));
    assert_eq!(m.headers[0].kind, ValueMatchKind::Exact);
    assert_eq!(m.query_params[0].kind, ValueMatchKind::RegularExpression);
    assert_eq!(m.method.as_deref(), Some("POST"));
    assert_eq!(
        rule.filters[0],
        HttpFilter::RequestHeaderModifier(HeaderModifier {
            set: vec![HeaderPair {
                name: "x-a".into(),
                value: "b".into()
            }],
            add: vec![],
            remove: vec!["x-c".into()],
        })
    );
    assert_eq!(
        rule.filters[1],
        HttpFilter::UrlRewrite(UrlRewrite {
            hostname: None,
            path: Some(PathModifier::ReplacePrefixMatch("/".into()))
        })
    );
    assert_eq!(
        rule.filters[2],
        HttpFilter::RequestMirror(RequestMirror {
            service: ObjectRef::new("shop", "db"),
            port: 5432,
            fraction: Some(Fraction::percent(10))
        })
    );
    assert_eq!(rule.backends[0].weight, 3);
    assert_eq!(rule.backends[1].weight, 1);
    assert!(matches!(
        rule.backends[1].filters[0],
        HttpFilter::ResponseHeaderModifier(_)
    ));
    assert_eq!(
        rule.timeouts,
        Timeouts {
            request_ms: Some(90_000),
            backend_request_ms: Some(500)
        }
    );
    // The result is a valid snapshot for the proxy (it compiles it).
    let snap = Snapshot {
        http_routes: vec![h],
        ..Default::default()
    };
    let json = serde_json::to_string(&snap).unwrap();
    let back: Snapshot = serde_json::from_str(&json).unwrap();
    assert_eq!(back, snap);
}

#[test]
fn grpc_routes_translate_method_matches() {
    let r: GwGrpcRoute = serde_json::from_value(serde_json::json!({
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "GRPCRoute",
        "metadata": {"name": "g", "namespace": "shop"},
        "spec": {
            "parentRefs": [{"kind": "Service", "name": "db"}],
            "rules": [{"matches": [{"method": {"service": "shop.Db", "method": "Get"}}],
                       "backendRefs": [{"name": "db", "port": 5432}]}]
        }
    }))
    .unwrap();
    let t = routes::grpc_route(&r, &RefIndex::of(&store(base())));
    assert!(t.dropped.is_empty() && t.refused.is_empty(), "{t:?}");
    let g = t.route.unwrap();
    let m = g.rules[0].matches[0].method.as_ref().unwrap();
    assert_eq!(
        (m.service.as_deref(), m.method.as_deref()),
        (Some("shop.Db"), Some("Get"))
    );
    assert_eq!(g.parents[0].service, ObjectRef::new("shop", "db"));
}

#[test]
fn access_policies_become_one_per_target_with_prefixes_expanded() {
    let mut p = crate::crds::AccessPolicy::new(
        "readers",
        serde_json::from_value(serde_json::json!({
            "targetRefs": [{"name": "db"}, {"name": "cache"}],
            "rules": [
                {"from": [{"serviceAccount": {"name": "web"}}, {"namespace": "ops"},
                          {"identity": "spiffe://cluster.local/ns/x/sa/y"}],
                 "to": [{"methods": ["GET"], "paths": [{"value": "/api"}, {"type": "Exact", "value": "/health"}]},
                        {"methods": ["POST"]}]},
                {"from": [{"namespace": "admin"}]}
            ]
        }))
        .unwrap(),
    );
    p.metadata.namespace = Some("shop".into());
    let mut errors = Vec::new();
    let out = access_policies(&p, &mut errors);
    assert!(errors.is_empty());
    assert_eq!(out.len(), 2);
    assert_eq!(out[1].target, ObjectRef::new("shop", "cache"));
    let rules = &out[0].rules;
    assert_eq!(
        rules.len(),
        3,
        "two operations, then a rule with no operation"
    );
    assert_eq!(
        rules[0].from,
        [
            AccessSource::ServiceAccount(ObjectRef::new("shop", "web")),
            AccessSource::Namespace("ops".into()),
            AccessSource::Identity("spiffe://cluster.local/ns/x/sa/y".parse().unwrap()),
        ]
    );
    assert_eq!(
        rules[0].to.as_ref().unwrap().paths,
        [
            PathCondition::Subtree("/api".into()),
            PathCondition::Exact("/health".into())
        ]
    );
    assert_eq!(rules[1].to.as_ref().unwrap().methods, ["POST"]);
    assert_eq!(rules[2].to, None);
}

/// A rule whose caller cannot be translated is left out, never kept with
/// no caller (which would allow every one). Validation refuses such a
/// policy before it gets here; this is the translation's own guard.
#[test]
fn a_rule_whose_caller_does_not_translate_is_left_out() {
    let mut p = crate::crds::AccessPolicy::new(
        "readers",
        serde_json::from_value(serde_json::json!({
            "targetRefs": [{"name": "db"}],
            "rules": [
                {"from": [{"identity": "not a spiffe id"}]},
                {"from": [{"namespace": "admin"}]}
            ]
        }))
        .unwrap(),
    );
    p.metadata.namespace = Some("shop".into());
    let mut errors = Vec::new();
    let out = access_policies(&p, &mut errors);
    assert_eq!(
        out[0].rules,
        [AccessRule {
            from: vec![AccessSource::Namespace("admin".into())],
            to: None
        }]
    );
    assert!(errors[0].contains("the rule is left out"), "{errors:?}");
}

#[test]
fn request_counts_come_from_the_proxy_metrics() {
    let text = "# TYPE sluice_requests counter\n\
        sluice_requests_total{direction=\"outbound\",source=\"a\",destination=\"b\",route=\"shop/db-split#v2\",status_class=\"2xx\"} 7\n\
        sluice_requests_total{direction=\"outbound\",source=\"a\",destination=\"b\",route=\"shop/db-split#0\",status_class=\"5xx\"} 2\n\
        sluice_requests_total{direction=\"outbound\",source=\"a\",destination=\"b\",route=\"shop/web\",status_class=\"2xx\"} 1\n\
        sluice_requests_total{direction=\"outbound\",source=\"a\",destination=\"b\",route=\"shop/db-split#default\",status_class=\"2xx\"} 5\n\
        sluice_requests_total{direction=\"outbound\",source=\"a\",destination=\"b\",route=\"shop/web#0\",status_class=\"5xx\"} 3\n\
        sluice_requests_total{direction=\"inbound\",source=\"x\",destination=\"y\",route=\"\",status_class=\"2xx\"} 4\n\
        sluice_requests_total{direction=\"outbound\",source=\"a\",destination=\"c\",route=\"shop/cart#0\",status_class=\"2xx\",grpc_status=\"0\"} 6\n\
        sluice_requests_total{direction=\"outbound\",source=\"a\",destination=\"c\",route=\"shop/cart#0\",status_class=\"2xx\",grpc_status=\"14\"} 2\n\
        sluice_requests_total{direction=\"outbound\",source=\"a\",destination=\"c\",route=\"shop/cart#1\",status_class=\"5xx\",grpc_status=\"unknown\"} 1\n\
        sluice_requests_total{direction=\"outbound\",source=\"a\",destination=\"c\",route=\"shop/cart#1\",status_class=\"cancelled\",grpc_status=\"1\"} 4\n\
        sluice_requests_total{direction=\"outbound\",source=\"a\",destination=\"b\",route=\"shop/web#0\",status_class=\"cancelled\"} 5\n";
    let s = request_stats(text);
    // A rule named `default` is the route's.
    assert_eq!(s["shop/db-split"], (14, 2));
    // The Service shop/web's default route, apart from the HTTPRoute
    // shop/web.
    assert_eq!(s["shop/web#default"], (1, 0));
    // Callers that went away are requests, not errors.
    assert_eq!(s["shop/web"], (8, 3));
    // A gRPC call failed by its grpc-status, even with a 2xx, counted once
    // when both say so; CANCELLED is the caller's doing.
    assert_eq!(s["shop/cart"], (13, 3));
    assert_eq!(s.len(), 4, "inbound requests have no route: {s:?}");
}

fn one_rule_route(rule: serde_json::Value) -> GwHttpRoute {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
        "metadata": {"name": "r", "namespace": "shop"},
        "spec": {
            "parentRefs": [{"kind": "Service", "name": "db", "port": 5432}],
            "rules": [rule]
        }
    }))
    .unwrap()
}

/// The rule as translated, or the reason it was left out.
fn translate_rule(rule: serde_json::Value) -> Result<HttpRouteRule, String> {
    let t = http_route(&one_rule_route(rule), &RefIndex::of(&store(base())));
    match (t.route, t.dropped.first()) {
        (Some(r), None) => Ok(r.rules.into_iter().next().unwrap()),
        (None, Some(d)) => Err(d.message.clone()),
        // Kept to answer its matches with 500, nothing else.
        (Some(r), Some(d)) if d.closed => {
            let rule = &r.rules[0];
            assert!(rule.filters.is_empty(), "{rule:?}");
            assert!(
                rule.backends.len() == 1
                    && rule.backends[0]
                        .invalid
                        .as_deref()
                        .is_some_and(|why| why.contains(&d.message)),
                "{rule:?}"
            );
            Err(d.message.clone())
        }
        other => panic!("a rule is either translated or reported: {other:?}"),
    }
}

#[test]
fn rules_the_proxy_cannot_compile_are_dropped_with_the_reason() {
    let backend = serde_json::json!([{"name": "db", "port": 5432}]);
    // A lookahead: valid elsewhere, not in the proxy's regex dialect.
    let err = translate_rule(serde_json::json!({
        "matches": [{"path": {"type": "RegularExpression", "value": "/(?=a)"}}],
        "backendRefs": backend,
    }))
    .unwrap_err();
    assert!(
        err.starts_with("spec.rules[0].matches: invalid regular expression \"/(?=a)\""),
        "{err}"
    );
    let err = translate_rule(serde_json::json!({
        "matches": [{"headers": [{"name": "x-user", "type": "RegularExpression", "value": "u[0-9"}]}],
        "backendRefs": backend,
    }))
    .unwrap_err();
    assert!(
        err.contains("invalid regular expression \"u[0-9\""),
        "{err}"
    );
    let err = translate_rule(serde_json::json!({
        "matches": [{"headers": [{"name": "bad header", "value": "1"}]}],
        "backendRefs": backend,
    }))
    .unwrap_err();
    assert!(err.contains("invalid header name \"bad header\""), "{err}");
    // Header modifiers a request or response could not carry.
    let modifier = |kind: &str, m: serde_json::Value| {
        let key = format!("{}{}", kind[..1].to_lowercase(), &kind[1..]);
        translate_rule(serde_json::json!({
            "filters": [{"type": kind, key: m}],
            "backendRefs": backend,
        }))
    };
    let err = modifier(
        "RequestHeaderModifier",
        serde_json::json!({"set": [{"name": "x-ok", "value": "1"}, {"name": "x-env", "value": "a\nb"}]}),
    )
    .unwrap_err();
    assert!(
        err.contains("requestHeaderModifier.set[1].value: \"a\\nb\" is not a header value"),
        "{err}"
    );
    let err = modifier(
        "ResponseHeaderModifier",
        serde_json::json!({"add": [{"name": "bad name", "value": "1"}]}),
    )
    .unwrap_err();
    assert!(
        err.contains("responseHeaderModifier.add[0].name: \"bad name\" is not a header name"),
        "{err}"
    );
    let err = modifier(
        "RequestHeaderModifier",
        serde_json::json!({"remove": ["x-ok", "no:colon"]}),
    )
    .unwrap_err();
    assert!(err.contains("requestHeaderModifier.remove[1]"), "{err}");
    // The mesh's own headers are the proxies' to set (sluice-timeout-ms
    // would hold the workload's node for a day).
    for m in [
        serde_json::json!({"set": [{"name": "Sluice-Timeout-Ms", "value": "86400000"}]}),
        serde_json::json!({"remove": ["sluice-source-identity"]}),
    ] {
        let err = modifier("RequestHeaderModifier", m).unwrap_err();
        assert!(err.contains("a header of the mesh's own"), "{err}");
    }
    assert!(
        modifier(
            "RequestHeaderModifier",
            serde_json::json!({"set": [{"name": "X-Env", "value": "prod"}], "remove": ["x-secret"]})
        )
        .is_ok()
    );
    // One action per header name, whatever its case (the Gateway API's
    // HTTPHeaderFilter).
    for m in [
        serde_json::json!({"set": [{"name": "X-Env", "value": "a"}, {"name": "x-env", "value": "b"}]}),
        serde_json::json!({"set": [{"name": "X-Env", "value": "a"}], "remove": ["x-env"]}),
        serde_json::json!({"add": [{"name": "x-env", "value": "a"}], "set": [{"name": "X-ENV", "value": "b"}]}),
    ] {
        let err = modifier("RequestHeaderModifier", m.clone()).unwrap_err();
        assert!(
            err.contains("requestHeaderModifier: header") && err.contains("one action per header"),
            "{m}: {err}"
        );
    }
    // A redirect code the Gateway API does not allow.
    let err = translate_rule(serde_json::json!({
        "filters": [{"type": "RequestRedirect", "requestRedirect": {"statusCode": 305}}],
    }))
    .unwrap_err();
    assert!(
        err.contains("requestRedirect.statusCode: 305 is not a redirect code"),
        "{err}"
    );
    // ReplacePrefixMatch with a match that is not a PathPrefix (the CRD's
    // validation refuses it; files do not have that validation).
    let prefix_rewrite = |path: serde_json::Value| {
        translate_rule(serde_json::json!({
            "matches": [{"path": {"type": "PathPrefix", "value": "/a"}}, {"path": path}],
            "filters": [{"type": "URLRewrite", "urlRewrite": {
                "path": {"type": "ReplacePrefixMatch", "replacePrefixMatch": "/b"}}}],
            "backendRefs": backend,
        }))
    };
    let err = prefix_rewrite(serde_json::json!({"type": "Exact", "value": "/old"})).unwrap_err();
    assert!(
        err.contains(
            "ReplacePrefixMatch path modifier needs every match of its rule to be a PathPrefix"
        ),
        "{err}"
    );
    // A match without a path is PathPrefix "/".
    assert!(prefix_rewrite(serde_json::json!(null)).is_ok());
    // A rewrite to what no request target can carry (it became `/`).
    let rewrite = |path: serde_json::Value| {
        translate_rule(serde_json::json!({
            "filters": [{"type": "URLRewrite", "urlRewrite": {"path": path}}],
            "backendRefs": backend,
        }))
    };
    for bad in ["/a b", "no-slash", "/a?b=1", "/a#frag", ""] {
        let err = rewrite(serde_json::json!({"type": "ReplaceFullPath", "replaceFullPath": bad}))
            .unwrap_err();
        assert!(
            err.contains(&format!("replaceFullPath: {bad:?} is not a path")),
            "{err}"
        );
    }
    assert!(
        rewrite(serde_json::json!({"type": "ReplaceFullPath", "replaceFullPath": "/a%20b/c"}))
            .is_ok()
    );
    assert!(
        rewrite(serde_json::json!({"type": "ReplacePrefixMatch", "replacePrefixMatch": "/x y"}))
            .unwrap_err()
            .contains("replacePrefixMatch: \"/x y\" is not a path")
    );
    assert!(
        rewrite(serde_json::json!({"type": "ReplacePrefixMatch", "replacePrefixMatch": ""}))
            .is_ok()
    );
    // A valid regular expression passes.
    let rule = translate_rule(serde_json::json!({
        "matches": [{"path": {"type": "RegularExpression", "value": "/v[0-9]+/.*"}}],
        "backendRefs": backend,
    }))
    .unwrap();
    assert_eq!(rule.matches.len(), 1);
}

#[test]
fn retry_is_translated_with_attempts_backoff_and_codes() {
    let rule = translate_rule(serde_json::json!({
        "backendRefs": [{"name": "db", "port": 5432}],
        "retry": {"attempts": 3, "backoff": "100ms", "codes": [502, 503, 504]}
    }))
    .unwrap();
    assert_eq!(
        rule.retry,
        Some(Retry {
            codes: vec![502, 503, 504],
            attempts: 3,
            backoff_ms: 100
        })
    );
    // Left-out attempts and backoff take the documented defaults.
    let rule = translate_rule(serde_json::json!({"retry": {"codes": [503]}})).unwrap();
    assert_eq!(
        rule.retry,
        Some(Retry {
            codes: vec![503],
            attempts: config::DEFAULT_RETRY_ATTEMPTS,
            backoff_ms: config::DEFAULT_RETRY_BACKOFF.as_millis() as u64,
        })
    );
    // Zero attempts: no retries at all.
    let rule = translate_rule(serde_json::json!({"retry": {"attempts": 0, "codes": [503]}}));
    assert_eq!(rule.unwrap().retry, None);
    // No retry field: none.
    assert_eq!(translate_rule(serde_json::json!({})).unwrap().retry, None);
}

#[test]
fn a_bad_retry_leaves_the_rule_out_and_names_the_field() {
    let e = translate_rule(serde_json::json!({"retry": {"codes": [200]}})).unwrap_err();
    assert!(
        e.contains("spec.rules[0].retry.codes[0]") && e.contains("200"),
        "{e}"
    );
    let e = translate_rule(serde_json::json!({"retry": {"backoff": "soon"}})).unwrap_err();
    assert!(e.contains("spec.rules[0].retry.backoff"), "{e}");
    let e = translate_rule(serde_json::json!({"retry": {"attempts": -1}})).unwrap_err();
    assert!(e.contains("spec.rules[0].retry.attempts"), "{e}");
}

#[test]
fn zero_timeouts_disable_and_a_backend_timeout_beyond_the_request_one_is_refused() {
    let rule = translate_rule(serde_json::json!({
        "timeouts": {"request": "0s", "backendRequest": "2s"}
    }))
    .unwrap();
    assert_eq!(
        rule.timeouts,
        Timeouts {
            request_ms: None,
            backend_request_ms: Some(2000)
        }
    );
    let e = translate_rule(serde_json::json!({
        "timeouts": {"request": "1s", "backendRequest": "2s"}
    }))
    .unwrap_err();
    assert!(e.contains("spec.rules[0].timeouts.backendRequest"), "{e}");
}

#[test]
fn mirror_percent_and_fraction_are_taken_bad_ones_refused() {
    let mirror = |m: serde_json::Value| {
        let mut f = serde_json::json!({"backendRef": {"name": "db", "port": 5432}});
        f.as_object_mut()
            .unwrap()
            .extend(m.as_object().unwrap().clone());
        translate_rule(serde_json::json!({
            "filters": [{"type": "RequestMirror", "requestMirror": f}]
        }))
        .map(|r| match &r.filters[0] {
            HttpFilter::RequestMirror(m) => m.fraction.map(|f| (f.numerator, f.denominator)),
            other => panic!("{other:?}"),
        })
    };
    assert_eq!(
        mirror(serde_json::json!({"percent": 25})),
        Ok(Some((25, 100)))
    );
    assert_eq!(
        mirror(serde_json::json!({"fraction": {"numerator": 1, "denominator": 4}})),
        Ok(Some((1, 4)))
    );
    assert_eq!(
        mirror(serde_json::json!({"fraction": {"numerator": 1, "denominator": 1000}})),
        Ok(Some((1, 1000))),
        "finer than a percent"
    );
    // The denominator defaults to 100.
    assert_eq!(
        mirror(serde_json::json!({"fraction": {"numerator": 7}})),
        Ok(Some((7, 100)))
    );
    assert_eq!(mirror(serde_json::json!({})), Ok(None), "all requests");
    let e = mirror(serde_json::json!({"percent": 150})).unwrap_err();
    assert!(e.contains("requestMirror.percent"), "{e}");
    let e =
        mirror(serde_json::json!({"fraction": {"numerator": 3, "denominator": 2}})).unwrap_err();
    assert!(
        e.contains("requestMirror.fraction") && e.contains("3/2"),
        "{e}"
    );
    let e =
        mirror(serde_json::json!({"fraction": {"numerator": 0, "denominator": 0}})).unwrap_err();
    assert!(e.contains("requestMirror.fraction"), "{e}");
    assert!(mirror(serde_json::json!({"fraction": {"numerator": -1}})).is_err());
}

#[test]
fn session_persistence_and_unsupported_filters_leave_the_rule_out() {
    let e = translate_rule(serde_json::json!({
        "sessionPersistence": {"sessionName": "s", "type": "Cookie"}
    }))
    .unwrap_err();
    assert!(e.contains("spec.rules[0].sessionPersistence"), "{e}");
    for f in [
        serde_json::json!({"type": "CORS", "cors": {"allowOrigins": ["https://a.example"]}}),
        serde_json::json!({"type": "ExternalAuth", "externalAuth": {"protocol": "HTTP",
            "backendRef": {"name": "auth", "port": 80}}}),
    ] {
        let e = translate_rule(serde_json::json!({"filters": [f]})).unwrap_err();
        assert!(
            e.contains("spec.rules[0].filters[0].type") && e.contains("not supported"),
            "{e}"
        );
    }
}

/// A backend or mirror target in another namespace of the mesh is used
/// with no ReferenceGrant (GEP-1294); one that does not exist there is
/// refused like a missing one in the route's own namespace, and one in a
/// namespace outside the mesh (reached from the node in plaintext, past its
/// NetworkPolicies) is not permitted.
#[test]
fn refused_backends_keep_their_share_but_point_nowhere_and_refused_mirrors_are_dropped() {
    let mut objs = base();
    objs.push(Object::Namespace(namespace("data", true)));
    objs.push(Object::Service(service(
        "data",
        "other",
        "127.96.0.7",
        &[80],
    )));
    let s = store(objs);
    let mirror = |name: &str| {
        serde_json::json!({"type": "RequestMirror",
            "requestMirror": {"backendRef": {"name": name, "namespace": "data", "port": 80}}})
    };
    let r = one_rule_route(serde_json::json!({
        "filters": [mirror("other"), mirror("gone")],
        "backendRefs": [
            {"name": "db", "port": 5432, "weight": 3},
            {"name": "other", "namespace": "data", "port": 80, "weight": 1},
            {"name": "gone", "namespace": "data", "port": 80, "weight": 1},
            {"name": "db", "port": 9999, "weight": 1},
            {"name": "legacy", "namespace": "plain", "port": 80, "weight": 1}
        ]
    }));
    let t = http_route(&r, &RefIndex::of(&s));
    let refused: Vec<(&str, &str)> = t
        .refused
        .iter()
        .map(|p| (p.reason.as_str(), p.message.as_str()))
        .collect();
    assert_eq!(
        refused,
        [
            (
                "BackendNotFound",
                "spec.rules[0].filters[1].requestMirror.backendRef: Service data/gone does not \
                 exist"
            ),
            (
                "BackendNotFound",
                "spec.rules[0].backendRefs[2]: Service data/gone does not exist"
            ),
            (
                "BackendNotFound",
                "spec.rules[0].backendRefs[3]: Service shop/db has no port 9999"
            ),
            (
                "RefNotPermitted",
                "spec.rules[0].backendRefs[4]: Service plain/legacy is in namespace plain, which \
                 is not in the mesh: the node proxy would reach it in plaintext from the node, \
                 past its NetworkPolicies; a route sends to another namespace's Services only \
                 within the mesh (annotate plain sluice.dev/mesh: enabled)"
            ),
        ]
    );
    let rule = &t.route.unwrap().rules[0];
    assert_eq!(
        rule.filters,
        [HttpFilter::RequestMirror(RequestMirror {
            service: ObjectRef::new("data", "other"),
            port: 80,
            fraction: None,
        })],
        "the mirror to data/other is kept, the refused one dropped"
    );
    let weights: Vec<u32> = rule.backends.iter().map(|b| b.weight).collect();
    assert_eq!(weights, [3, 1, 1, 1, 1], "shares stay as written");
    let services: Vec<&ObjectRef> = rule.backends.iter().map(|b| &b.service).collect();
    assert_eq!(
        services,
        [
            &ObjectRef::new("shop", "db"),
            &ObjectRef::new("data", "other"),
            &ObjectRef::new("data", "gone"),
            &ObjectRef::new("shop", "db"),
            &ObjectRef::new("plain", "legacy"),
        ]
    );
    // The backend in data is sent its share; the refused ones say why: the
    // proxy answers their share with 500 and that reason.
    assert_eq!(
        (&rule.backends[0].invalid, &rule.backends[1].invalid),
        (&None, &None)
    );
    let why: Vec<&str> = rule.backends[2..]
        .iter()
        .map(|b| b.invalid.as_deref().expect("refused backends are marked"))
        .collect();
    assert!(
        why[..2].iter().all(|w| w.starts_with("BackendNotFound: "))
            && why[2].starts_with("RefNotPermitted: "),
        "{why:?}"
    );
}

#[test]
fn a_route_with_every_rule_left_out_or_no_existing_parent_is_not_in_the_snapshot() {
    let mut dropped =
        one_rule_route(serde_json::json!({"sessionPersistence": {"sessionName": "x"}}));
    dropped.metadata.name = Some("dropped".into());
    let orphan: crate::gateway::HttpRoute = serde_json::from_value(serde_json::json!({
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
        "metadata": {"name": "orphan", "namespace": "shop"},
        "spec": {"parentRefs": [{"kind": "Service", "name": "gone"}],
                 "rules": [{"backendRefs": [{"name": "db", "port": 5432}]}]}
    }))
    .unwrap();
    let good = one_rule_route(serde_json::json!({"backendRefs": [{"name": "db", "port": 5432}]}));
    let mut objs = base();
    objs.extend([dropped, orphan, good].map(Object::HTTPRoute));
    let s = store(objs);
    let (v, evals) = crate::reconcile::mesh::mesh_view_and_routes(
        &s,
        "n1",
        "cluster.local",
        workload_infos(&s, "n1", "cluster.local", CrdMode::Permissive),
        1,
    );
    let (snap, errors) = snapshot(&v, 15008);
    assert_eq!(errors, Vec::<String>::new(), "route problems go to status");
    assert_eq!(snap.http_routes.len(), 1, "{:?}", snap.http_routes);
    assert_eq!(snap.http_routes[0].id, ObjectRef::new("shop", "r"));
    assert_eq!(snap.http_routes[0].rules.len(), 1);
    // Status comes from the same translation: all three are evaluated.
    let names: Vec<&str> = evals.iter().map(|e| e.route.key.name.as_str()).collect();
    assert_eq!(names, ["dropped", "orphan", "r"]);
    assert!(evals[0].all_dropped());
}

#[test]
fn each_endpoint_keeps_its_own_target_port() {
    // Named target ports that resolve to 8080/8081 on one pod and 9090/9091
    // on another (a rollout changing containerPort).
    // Slice ports carry the Service ports' names (p80, p81).
    let named = |name: &str, ports: &[i32], ip: &str| {
        let mut sl = slice("plain", name, "web", ports, &[ep_ready(ip)]);
        for (p, svc_port) in sl.ports.iter_mut().flatten().zip(["p80", "p81"]) {
            p.name = Some(svc_port.into());
        }
        Object::EndpointSlice(sl)
    };
    let mut objs = base();
    objs.extend([
        Object::Service(service("plain", "web", "127.96.0.8", &[80, 81])),
        named("web-old", &[8080, 8081], "10.0.2.20"),
        named("web-new", &[9090, 9091], "10.0.2.21"),
    ]);
    let s = store(objs);
    let (snap, errors) = snapshot(&view(&s), 15008);
    assert_eq!(errors, Vec::<String>::new());
    let web = snap.services.iter().find(|x| x.id.name == "web").unwrap();
    let ports: Vec<(IpAddr, Vec<(u16, u16)>)> = web
        .endpoints
        .iter()
        .map(|e| (e.ip, e.ports.iter().map(|(a, b)| (*a, *b)).collect()))
        .collect();
    assert_eq!(
        ports,
        [
            ("10.0.2.20".parse().unwrap(), vec![(80, 8080), (81, 8081)]),
            ("10.0.2.21".parse().unwrap(), vec![(80, 9090), (81, 9091)]),
        ]
    );
    // The proxy sends each pod's share to that pod's port.
    let (state, _) = l7_proxy::state::State::build(std::sync::Arc::new(snap.clone()));
    let ready = state.ready_set(&web.id, 80).unwrap();
    let mut addrs: Vec<String> = ready.upstreams.iter().map(|u| u.addr.to_string()).collect();
    addrs.sort();
    assert_eq!(addrs, ["10.0.2.20:8080", "10.0.2.21:9090"]);
}

/// Readiness is per port: a terminating pod standing in on the one port that
/// has no ready endpoint takes no requests on the port new pods serve.
#[test]
fn an_endpoint_ready_on_one_port_only_takes_requests_there_only() {
    // Slice ports named as the two-port Service names its own.
    let named = |mut s: k8s_openapi::api::discovery::v1::EndpointSlice| {
        for p in s.ports.iter_mut().flatten() {
            p.name = Some(format!("p{}", p.port.unwrap()));
        }
        Object::EndpointSlice(s)
    };
    let s = store(vec![
        Object::Namespace(namespace("shop", true)),
        Object::Node(NodeInfo {
            name: "n1".into(),
            addresses: vec!["192.0.2.1".parse().unwrap()],
        }),
        Object::Pod(workload("shop", "new-0", "web", "10.0.1.1", "n1")),
        Object::Pod(workload("shop", "old-0", "web", "10.0.1.2", "n1")),
        Object::Service(service("shop", "web", "127.96.0.1", &[80, 81])),
        // The new pod serves port 80 only; the old one, terminating but
        // serving, is all port 81 has.
        named(slice(
            "shop",
            "web-new",
            "web",
            &[80],
            &[ep_ready("10.0.1.1")],
        )),
        named(slice(
            "shop",
            "web-old",
            "web",
            &[80, 81],
            &[ep("10.0.1.2", Some(false), Some(true), Some(true))],
        )),
    ]);
    let (snap, errors) = snapshot(&view(&s), config::PROXY_INBOUND_PORT);
    assert!(errors.is_empty(), "{errors:?}");
    let (state, _) = l7_proxy::state::State::build(std::sync::Arc::new(snap));
    let web = l7_proxy::config::ObjectRef::new("shop", "web");
    let ready = |port: u16| -> Vec<std::net::IpAddr> {
        let set = state.ready_set(&web, port).unwrap();
        set.upstreams.iter().map(|u| u.addr.ip()).collect()
    };
    assert_eq!(ready(80), ["10.0.1.1".parse::<std::net::IpAddr>().unwrap()]);
    assert_eq!(ready(81), ["10.0.1.2".parse::<std::net::IpAddr>().unwrap()]);
}

/// A pod its Service's EndpointSlice does not list yet (the controller lags
/// behind a new pod) is governed by the Service's access policies all the
/// same: its selector decides, with the pod ports the Service's ports lead
/// to (named ones from the pod's container ports).
#[test]
fn a_pod_its_endpointslice_does_not_list_yet_is_governed_by_the_selecting_services_policies() {
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
    let mut cart = service("shop", "cart", "127.96.0.9", &[80, 81, 82, 53]);
    for p in cart.spec.as_mut().unwrap().ports.iter_mut().flatten() {
        p.target_port = Some(match p.port {
            80 => IntOrString::Int(8080),
            81 => IntOrString::String("metrics".into()),
            82 => IntOrString::String("missing".into()),
            _ => IntOrString::Int(5353),
        });
        if p.port == 53 {
            p.protocol = Some("UDP".into());
        }
        // What 81 leads to is HTTP only, before any EndpointSlice too.
        if p.port == 81 {
            p.app_protocol = Some("kubernetes.io/h2c".into());
        }
        // And 80's opaque TCP only (any case).
        if p.port == 80 {
            p.app_protocol = Some("TCP".into());
        }
    }
    let pod = |name: &str, ip: &str, node: &str, app: &str| {
        let mut w = workload("shop", name, "cart", ip, node);
        w.labels = BTreeMap::from([("app".to_string(), app.to_string())]);
        w.ports = BTreeMap::from([("metrics".to_string(), 9090)]);
        w
    };
    let mut finished = pod("cart-old", "10.0.1.12", "n1", "cart");
    finished.finished = true;
    // Services that lead to none of cart-0's TCP ports govern nothing.
    let mut udp = service("shop", "udp-only", "127.96.0.10", &[53]);
    let mut missing = service("shop", "missing-name", "127.96.0.11", &[90]);
    let mut external = service("shop", "external", "127.96.0.12", &[80]);
    for s in [&mut udp, &mut missing, &mut external] {
        s.spec.as_mut().unwrap().selector =
            Some(BTreeMap::from([("app".to_string(), "cart".to_string())]));
    }
    for p in udp.spec.as_mut().unwrap().ports.iter_mut().flatten() {
        p.protocol = Some("UDP".into());
    }
    for p in missing.spec.as_mut().unwrap().ports.iter_mut().flatten() {
        p.target_port = Some(IntOrString::String("nope".into()));
    }
    external.spec.as_mut().unwrap().type_ = Some("ExternalName".into());
    let mut policy = crate::crds::AccessPolicy::new(
        "cart-readers",
        serde_json::from_value(serde_json::json!({
            "targetRefs": [{"name": "cart"}],
            "rules": [{"from": [{"namespace": "web"}]}]
        }))
        .unwrap(),
    );
    policy.metadata.namespace = Some("shop".into());
    let mut objs = base();
    objs.extend([
        Object::Service(cart),
        Object::Pod(pod("cart-0", "10.0.1.10", "n1", "cart")),
        Object::Pod(pod("cart-1", "10.0.2.10", "n2", "cart")),
        Object::Pod(pod("other-0", "10.0.1.11", "n1", "other")),
        Object::Pod(finished),
        Object::AccessPolicy(policy),
        Object::Service(udp),
        Object::Service(missing),
        Object::Service(external),
    ]);
    let s = store(objs);
    let v = view(&s);
    let selects = &v
        .services
        .iter()
        .find(|x| x.key.name == "cart")
        .unwrap()
        .selects;
    // This node's running pods with the labels; 82's name resolves nowhere,
    // 53 is UDP.
    assert_eq!(
        selects,
        &[crate::reconcile::mesh::SelectedPod {
            pod: Key::new("shop", "cart-0"),
            ports: vec![8080, 9090],
            http_ports: vec![9090],
            tcp_ports: vec![8080],
        }]
    );
    let (snap, errors) = snapshot(&v, 15008);
    assert_eq!(errors, Vec::<String>::new());
    let local = |name: &str| {
        snap.local_workloads
            .iter()
            .find(|w| w.id.name == name)
            .unwrap_or_else(|| panic!("{name} not local: {:?}", snap.local_workloads))
            .clone()
    };
    let cart0 = local("cart-0");
    assert_eq!(
        cart0.selected_by,
        [SelectedBy {
            service: ObjectRef::new("shop", "cart"),
            ports: vec![8080, 9090],
            http_ports: vec![9090],
            tcp_ports: vec![8080],
        }]
    );
    assert!(local("other-0").selected_by.is_empty());
    for name in ["udp-only", "missing-name", "external"] {
        let svc = v.services.iter().find(|x| x.key.name == name).unwrap();
        assert!(svc.selects.is_empty(), "{name}: {:?}", svc.selects);
    }
    // No EndpointSlice lists cart-0, and still only callers from `web` get
    // in, on the ports the Service leads to and on those none leads to.
    let (state, _) = l7_proxy::state::State::build(std::sync::Arc::new(snap.clone()));
    let caller = |ns: &str| -> SpiffeId {
        format!("spiffe://cluster.local/ns/{ns}/sa/x")
            .parse()
            .unwrap()
    };
    for port in [8080, 9090, 7000] {
        assert_eq!(
            l7_proxy::policy::authorize(&state, &caller("web"), &cart0, port, None),
            l7_proxy::policy::Verdict::Allow,
            "port {port}"
        );
        assert!(
            matches!(
                l7_proxy::policy::authorize(&state, &caller("ops"), &cart0, port, None),
                l7_proxy::policy::Verdict::Deny(_)
            ),
            "port {port}"
        );
    }
    // A pod no policy's Service selects takes every caller.
    assert_eq!(
        l7_proxy::policy::authorize(&state, &caller("ops"), &local("other-0"), 8080, None),
        l7_proxy::policy::Verdict::Allow
    );
}
