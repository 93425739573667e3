use std::fs;

use super::*;
use crate::state::Store;

fn write(dir: &Path, name: &str, contents: &str) {
    fs::write(dir.join(name), contents).unwrap();
}

const SHOP: &str = r#"
apiVersion: v1
kind: Namespace
metadata:
  name: shop
  annotations:
    sluice.dev/mesh: enabled
---
apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: shop
spec:
  clusterIP: 127.96.1.1
  selector:
    app: web
  ports:
    - name: http
      port: 80
      targetPort: http
---
"#;

const WORKLOADS: &str = r#"
apiVersion: sluice.dev/v1alpha1
kind: SluiceWorkloads
nodes:
  - name: node-a
    address: 192.0.2.1
workloads:
  - name: web-0
    namespace: shop
    serviceAccount: web
    ip: 127.0.10.1
    node: node-a
    cgroup: shop/web-0
    labels: {app: web}
    ports: {http: 8080}
  - name: web-1
    namespace: shop
    serviceAccount: web
    ip: 127.0.10.2
    node: node-a
    labels: {app: web}
    ports: {http: 8080}
    ready: false
"#;

fn store_of(src: &FilesSource) -> Store {
    let mut s = Store::new();
    for u in src.updates() {
        s.apply(u);
    }
    s
}

#[test]
fn reads_manifests_and_workloads_and_derives_endpoints() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "shop.yaml", SHOP);
    fs::create_dir(dir.path().join("nodes")).unwrap();
    write(&dir.path().join("nodes"), "workloads.yml", WORKLOADS);
    write(dir.path(), "notes.txt", "not a manifest");
    let mut src = FilesSource::new(dir.path());
    assert!(src.reload().unwrap());
    assert_eq!(src.errors(), vec![]);
    let s = store_of(&src);
    assert!(s.namespace_enrolled("shop"));
    assert_eq!(
        s.nodes["node-a"].addresses,
        ["192.0.2.1".parse::<IpAddr>().unwrap()]
    );
    let w = &s.pods[&Key::new("shop", "web-0")];
    assert_eq!(w.service_account, "web");
    assert_eq!(w.uid, "files-shop-web-0");
    assert_eq!(w.cgroup.as_deref(), Some(Path::new("shop/web-0")));
    let specs =
        crate::reconcile::lb::desired_specs(&s, &Key::new("shop", "web"), "node-a").unwrap();
    assert_eq!(specs.len(), 1);
    let b: Vec<(String, ebpf_lb::BackendState)> = specs[0]
        .backends
        .iter()
        .map(|b| (b.addr.to_string(), b.state))
        .collect();
    assert_eq!(
        b,
        [
            ("127.0.10.1:8080".to_string(), ebpf_lb::BackendState::Ready),
            (
                "127.0.10.2:8080".to_string(),
                ebpf_lb::BackendState::NotReady
            ),
        ]
    );
    // Nothing changed: a reload says so.
    assert!(!src.reload().unwrap());
}

/// A hand-written EndpointSlice of another Service that happens to carry
/// the name a derived slice would take (`web-v4-0`) is kept, and the Service
/// `web` still gets its derived endpoints under another name.
#[test]
fn a_derived_slice_never_replaces_a_hand_written_one_of_the_same_name() {
    let dir = tempfile::tempdir().unwrap();
    let api = r#"
apiVersion: v1
kind: Service
metadata:
  name: api
  namespace: shop
spec:
  clusterIP: 127.96.1.2
  ports:
    - name: http
      port: 80
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-v4-0
  namespace: shop
  labels:
    kubernetes.io/service-name: api
addressType: IPv4
ports:
  - name: http
    port: 9090
endpoints:
  - addresses: ["127.0.20.1"]
"#;
    write(dir.path(), "shop.yaml", &format!("{SHOP}{api}"));
    write(dir.path(), "workloads.yaml", WORKLOADS);
    let mut src = FilesSource::new(dir.path());
    src.reload().unwrap();
    assert_eq!(src.errors(), vec![]);
    let s = store_of(&src);
    let backends = |svc: &str| -> Vec<String> {
        crate::reconcile::lb::desired_specs(&s, &Key::new("shop", svc), "node-a").unwrap()[0]
            .backends
            .iter()
            .map(|b| b.addr.to_string())
            .collect()
    };
    assert_eq!(backends("api"), ["127.0.20.1:9090"]);
    assert_eq!(backends("web"), ["127.0.10.1:8080", "127.0.10.2:8080"]);
}

#[test]
fn a_broken_file_is_reported_with_document_and_field_and_its_last_good_version_stays() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "shop.yaml", SHOP);
    write(dir.path(), "workloads.yaml", WORKLOADS);
    let mut src = FilesSource::new(dir.path());
    src.reload().unwrap();
    let broken = SHOP.replace("port: 80", "port: eighty");
    write(dir.path(), "shop.yaml", &broken);
    assert!(src.reload().unwrap());
    let errors = src.errors();
    let e = &errors[0];
    assert!(e.source.ends_with("shop.yaml"), "{e}");
    assert_eq!(e.object.as_deref(), Some("document 2 (Service web)"));
    assert_eq!(e.field.as_deref(), Some("spec.ports[0].port"));
    assert!(
        e.message.contains("eighty") || e.message.contains("invalid type"),
        "{e}"
    );
    assert!(
        errors[1].message.contains("last good version stays"),
        "{errors:?}"
    );
    // The Service is still there, with its old port.
    let s = store_of(&src);
    let specs =
        crate::reconcile::lb::desired_specs(&s, &Key::new("shop", "web"), "node-a").unwrap();
    assert_eq!(specs[0].frontend.vip.port(), 80);

    // A YAML syntax error names the document too.
    write(dir.path(), "shop.yaml", "apiVersion: v1\nkind: [\n");
    src.reload().unwrap();
    let e = &src.errors()[0];
    assert_eq!(e.object.as_deref(), Some("document 1"));
    // Fixed again: no errors.
    write(dir.path(), "shop.yaml", SHOP);
    src.reload().unwrap();
    assert_eq!(src.errors(), vec![]);
}

#[test]
fn workloads_typos_are_refused_by_field() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "w.yaml",
        &WORKLOADS.replace(
            "serviceAccount: web\n    ip: 127.0.10.1",
            "serviceAcount: web\n    ip: 127.0.10.1",
        ),
    );
    let mut src = FilesSource::new(dir.path());
    src.reload().unwrap();
    let e = &src.errors()[0];
    assert_eq!(
        e.field.as_deref(),
        Some("workloads[0].serviceAcount"),
        "{e}"
    );
    assert!(e.message.contains("serviceAcount"), "{e}");
}

/// A misspelt field of any kind is refused with its path, the object
/// staying as it was: dropped, it would change what the object means (a
/// MeshPolicy without its selector is namespace-wide, a route rule without
/// its matches takes every request).
#[test]
fn unknown_fields_of_every_kind_are_refused_by_path() {
    let cases = [
        (
            "apiVersion: sluice.dev/v1alpha1\nkind: MeshPolicy\nmetadata: {name: p, namespace: shop}\n\
             spec: {mode: STRICT, selctor: {matchLabels: {app: web}}}\n",
            "spec.selctor",
        ),
        (
            "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r, namespace: shop}\n\
             spec:\n  parentRefs: [{group: '', kind: Service, name: web, port: 80}]\n\
             \x20 rules:\n  - matchs: [{path: {type: PathPrefix, value: /admin}}]\n\
             \x20   backendRefs: [{name: web, port: 80}]\n",
            "spec.rules[0].matchs",
        ),
        (
            "apiVersion: v1\nkind: Service\nmetadata: {name: db, namespace: shop}\n\
             spec: {clusterIP: 127.96.1.9, ports: [{port: 5432, targetPrt: 5433}]}\n",
            "spec.ports[0].targetPrt",
        ),
        (
            "apiVersion: sluice.dev/v1alpha1\nkind: AccessPolicy\nmetadata: {name: a, namespace: shop}\n\
             spec:\n  targetRefs: [{kind: Service, name: web}]\n  rules:\n\
             \x20 - from: [{serviceAccount: {name: front}}]\n    to: [{method: [GET]}]\n",
            "spec.rules[0].to[0].method",
        ),
    ];
    for (doc, field) in cases {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "shop.yaml", SHOP);
        write(dir.path(), "x.yaml", doc);
        let mut src = FilesSource::new(dir.path());
        src.reload().unwrap();
        let errors = src.errors();
        let e = errors
            .iter()
            .find(|e| e.source.ends_with("x.yaml"))
            .unwrap_or_else(|| panic!("{field}: no error: {errors:?}"));
        assert_eq!(e.field.as_deref(), Some(field), "{e}");
        assert!(e.message.contains("unknown field"), "{e}");
        // Written right, the same document is read.
        let right = doc
            .replace("selctor", "selector")
            .replace("matchs", "matches")
            .replace("targetPrt", "targetPort")
            .replace("method:", "methods:");
        write(dir.path(), "x.yaml", &right);
        src.reload().unwrap();
        assert_eq!(src.errors(), vec![], "{right}");
    }
}

/// What a cluster would fill in or default differently is refused with the
/// fix: a Service without a cluster IP (nothing allocates one here), a
/// route's Service parent without `group: ""` (a cluster defaults the group
/// to Gateway API's, and the route attaches to nothing there).
#[test]
fn what_a_cluster_would_read_otherwise_is_refused_with_the_fix() {
    let cases = [
        (
            "apiVersion: v1\nkind: Service\nmetadata: {name: db, namespace: shop}\n\
             spec: {selector: {app: db}, ports: [{port: 5432}]}\n",
            "spec.clusterIP",
            "127.96.0.0/16",
        ),
        (
            "apiVersion: v1\nkind: Service\nmetadata: {name: db, namespace: shop}\n\
             spec: {clusterIP: '', ports: [{port: 5432}]}\n",
            "spec.clusterIP",
            "headless",
        ),
        (
            "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\n\
             metadata: {name: r, namespace: shop}\n\
             spec: {parentRefs: [{kind: Service, name: web, port: 80}]}\n",
            "spec.parentRefs[0].group",
            "group: \"\"",
        ),
        (
            "apiVersion: gateway.networking.k8s.io/v1\nkind: GRPCRoute\n\
             metadata: {name: g, namespace: shop}\n\
             spec: {parentRefs: [{group: '', kind: Service, name: web}, {kind: Service, name: api}]}\n",
            "spec.parentRefs[1].group",
            "group: \"\"",
        ),
        (
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
             metadata: {name: db-1, namespace: shop}\naddressType: IPv4\n\
             endpoints: [{addresses: [10.0.0.5]}]\nports: [{port: 5432}]\n",
            "metadata.labels.kubernetes.io/service-name",
            "names the Service",
        ),
    ];
    for (doc, field, fix) in cases {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "x.yaml", doc);
        let mut src = FilesSource::new(dir.path());
        src.reload().unwrap();
        let errors = src.errors();
        assert_eq!(errors[0].field.as_deref(), Some(field), "{doc}: {errors:?}");
        assert!(errors[0].message.contains(fix), "{}", errors[0]);
    }
    // Headless and ExternalName Services need no cluster IP.
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "x.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: db, namespace: shop}\n\
         spec: {clusterIP: None, ports: [{port: 5432}]}\n---\n\
         apiVersion: v1\nkind: Service\nmetadata: {name: ext, namespace: shop}\n\
         spec: {type: ExternalName, externalName: db.example.com}\n",
    );
    let mut src = FilesSource::new(dir.path());
    src.reload().unwrap();
    assert_eq!(src.errors(), vec![]);
}

/// YAML merge keys bring their fields into the object, as kubectl reads
/// them: neither an unknown field nor fields dropped.
#[test]
fn merge_keys_bring_their_fields() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "x.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: db, namespace: shop}\n\
         spec:\n  <<: &common {selector: {app: db}, ports: [{port: 5432}]}\n  clusterIP: 127.96.1.9\n",
    );
    let mut src = FilesSource::new(dir.path());
    src.reload().unwrap();
    assert_eq!(src.errors(), vec![]);
    let s = store_of(&src);
    let svc = &s.services[&Key::new("shop", "db")];
    let spec = svc.spec.as_ref().unwrap();
    assert_eq!(spec.ports.as_ref().unwrap()[0].port, 5432);
    assert_eq!(spec.selector.as_ref().unwrap()["app"], "db");
}

#[test]
fn a_known_kind_in_another_api_version_is_ignored_naming_the_version_read() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "r.yaml",
        "apiVersion: gateway.networking.k8s.io/v1beta1\nkind: HTTPRoute\nmetadata: {name: r, namespace: shop}\nspec: {}\n",
    );
    let mut src = FilesSource::new(dir.path());
    src.reload().unwrap();
    let errors = src.errors();
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!(errors[0].field.as_deref(), Some("apiVersion"));
    assert_eq!(
        errors[0].message,
        "ignored: the files source reads HTTPRoute as apiVersion gateway.networking.k8s.io/v1, \
         not gateway.networking.k8s.io/v1beta1: this document defines nothing (write apiVersion: \
         gateway.networking.k8s.io/v1 for it to define HTTPRoute shop/r)"
    );
    // A note: the file counts as read.
    assert!(!src.incomplete());
}

#[test]
fn an_edit_that_moves_a_defined_object_to_another_api_version_keeps_the_last_good_version() {
    let dir = tempfile::tempdir().unwrap();
    let route = |api: &str, name: &str| {
        format!(
            "apiVersion: {api}\nkind: HTTPRoute\nmetadata: {{name: {name}, namespace: shop}}\nspec: {{}}\n"
        )
    };
    let routes = |src: &FilesSource| -> Vec<String> {
        src.updates()
            .into_iter()
            .filter_map(|u| match u {
                Update::Replace(Kind::HTTPRoute, objs) => Some(objs),
                _ => None,
            })
            .flatten()
            .map(|o| o.key().to_string())
            .collect()
    };
    write(
        dir.path(),
        "r.yaml",
        &route("gateway.networking.k8s.io/v1", "r"),
    );
    let mut src = FilesSource::new(dir.path());
    src.reload().unwrap();
    assert_eq!(routes(&src), vec!["shop/r".to_string()]);
    // The version is edited wrong: that is not how to delete the route.
    write(
        dir.path(),
        "r.yaml",
        &route("gateway.networking.k8s.io/v1beta1", "r"),
    );
    assert!(src.reload().unwrap());
    assert_eq!(
        routes(&src),
        vec!["shop/r".to_string()],
        "the last good version stays"
    );
    let errors = src.errors();
    let problem = errors
        .iter()
        .find(|e| !e.is_note() && e.field.as_deref() == Some("apiVersion"))
        .unwrap_or_else(|| panic!("an error, not a note: {errors:?}"));
    assert_eq!(
        problem.message,
        "HTTPRoute shop/r: apiVersion gateway.networking.k8s.io/v1beta1 is not read (the files \
         source reads gateway.networking.k8s.io/v1); the file's last good version defines it, so \
         this edit would remove it: write apiVersion: gateway.networking.k8s.io/v1, or delete the \
         document to remove it"
    );
    // A copy in the wrong version beside the right one removes nothing: a
    // note, and this version of the file applies.
    let doubled = format!(
        "{}---\n{}---\n{}",
        route("gateway.networking.k8s.io/v1", "r"),
        route("gateway.networking.k8s.io/v1beta1", "r"),
        route("gateway.networking.k8s.io/v1", "s")
    );
    write(dir.path(), "r.yaml", &doubled);
    assert!(src.reload().unwrap());
    let errors = src.errors();
    assert!(errors.iter().all(|e| e.is_note()), "{errors:?}");
    assert_eq!(
        routes(&src),
        vec!["shop/r".to_string(), "shop/s".to_string()]
    );
    // Both gone to the wrong version: two errors, in document order.
    let both_wrong = format!(
        "{}---\n{}",
        route("gateway.networking.k8s.io/v1beta1", "r"),
        route("gateway.networking.k8s.io/v1beta1", "s")
    );
    write(dir.path(), "r.yaml", &both_wrong);
    assert!(src.reload().unwrap());
    let refused: Vec<String> = src
        .errors()
        .into_iter()
        .filter(|e| !e.is_note() && e.field.as_deref() == Some("apiVersion"))
        .filter_map(|e| e.object)
        .collect();
    assert_eq!(
        refused,
        vec![
            "document 1 (HTTPRoute r)".to_string(),
            "document 2 (HTTPRoute s)".to_string()
        ]
    );
    assert_eq!(
        routes(&src),
        vec!["shop/r".to_string(), "shop/s".to_string()]
    );
    write(
        dir.path(),
        "r.yaml",
        &route("gateway.networking.k8s.io/v1", "r"),
    );
    assert!(src.reload().unwrap());
    // A new object in that version, which the file never defined, is a note.
    let both = format!(
        "{}---\n{}",
        route("gateway.networking.k8s.io/v1", "r"),
        route("gateway.networking.k8s.io/v1beta1", "other")
    );
    write(dir.path(), "r.yaml", &both);
    assert!(src.reload().unwrap());
    let errors = src.errors();
    assert!(errors.iter().all(|e| e.is_note()), "{errors:?}");
    assert_eq!(routes(&src), vec!["shop/r".to_string()]);
}

#[test]
fn a_workloads_document_moved_to_another_api_version_keeps_the_last_good_version() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "workloads.yaml", WORKLOADS);
    let mut src = FilesSource::new(dir.path());
    src.reload().unwrap();
    let pods = |src: &FilesSource| store_of(src).pods.len();
    let before = pods(&src);
    assert!(before > 0);
    let wrong = WORKLOADS.replacen(crate::crds::API_VERSION, "sluice.dev/v1", 1);
    assert_ne!(wrong, WORKLOADS);
    write(dir.path(), "workloads.yaml", &wrong);
    assert!(src.reload().unwrap());
    assert_eq!(pods(&src), before, "the pods stay");
    let errors = src.errors();
    assert!(
        errors
            .iter()
            .any(|e| !e.is_note() && e.message.starts_with(format::KIND)),
        "{errors:?}"
    );
}

#[test]
fn a_file_unreadable_for_a_while_is_read_again_when_it_comes_back_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "shop.yaml", SHOP);
    let mut src = FilesSource::new(dir.path());
    src.reload().unwrap();
    // Not UTF-8 (a stray save in another encoding): the last good version
    // stays, and the error says why.
    fs::write(dir.path().join("shop.yaml"), b"\xff\xfe not yaml").unwrap();
    assert!(src.reload().unwrap());
    let errors = src.errors();
    assert!(errors[0].message.contains("not UTF-8"), "{errors:?}");
    assert!(
        store_of(&src)
            .services
            .contains_key(&Key::new("shop", "web"))
    );
    // Restored byte for byte (git checkout): the error goes.
    write(dir.path(), "shop.yaml", SHOP);
    assert!(src.reload().unwrap());
    assert_eq!(src.errors(), vec![]);
}

#[test]
fn a_symbolic_link_whose_target_is_gone_takes_its_objects_with_it() {
    let dir = tempfile::tempdir().unwrap();
    let elsewhere = tempfile::tempdir().unwrap();
    let target = elsewhere.path().join("shop.yaml");
    fs::write(&target, SHOP).unwrap();
    std::os::unix::fs::symlink(&target, dir.path().join("shop.yaml")).unwrap();
    let mut src = FilesSource::new(dir.path());
    src.reload().unwrap();
    assert!(
        store_of(&src)
            .services
            .contains_key(&Key::new("shop", "web"))
    );
    fs::remove_file(&target).unwrap();
    assert!(src.reload().unwrap());
    assert!(
        !store_of(&src)
            .services
            .contains_key(&Key::new("shop", "web"))
    );
    let errors = src.errors();
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(
        errors[0]
            .message
            .contains("symbolic link to a missing file"),
        "{errors:?}"
    );
    // Nothing new on the next round; and nothing unknown (it defines
    // nothing), so the first sync's clean-up need not wait for it.
    assert!(!src.reload().unwrap());
    assert!(!src.incomplete());
}

#[tokio::test]
async fn the_agents_own_reads_are_not_changes() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "a.yaml", SHOP);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let _w = watch(dir.path(), tx).unwrap();
    // What a reload does to every file: open, read, close.
    fs::read_to_string(dir.path().join("a.yaml")).unwrap();
    write(dir.path(), "b.yaml", SHOP);
    // The first event is the write, not the read (which made every reload
    // trigger the next, forever).
    let paths = tokio::time::timeout(Duration::from_secs(30), rx.recv())
        .await
        .expect("the write was seen")
        .unwrap();
    assert!(paths.iter().all(|p| p.ends_with("b.yaml")), "{paths:?}");
}

#[test]
fn unknown_kinds_are_ignored_with_a_note_and_duplicates_are_conflicts() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "a.yaml", SHOP);
    write(
        dir.path(),
        "b.yaml",
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: x}\n---\napiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\nspec: {clusterIP: 127.96.9.9}\n",
    );
    let mut src = FilesSource::new(dir.path());
    src.reload().unwrap();
    let errors = src.errors();
    assert_eq!(errors.len(), 2, "{errors:?}");
    assert!(errors[0].message.starts_with("ignored: apps/v1 Deployment"));
    assert_eq!(errors[1].object.as_deref(), Some("Service shop/web"));
    assert!(errors[1].message.contains("a.yaml"));
    // The first file wins.
    let s = store_of(&src);
    let svc = &s.services[&Key::new("shop", "web")];
    assert_eq!(
        svc.spec.as_ref().unwrap().cluster_ip.as_deref(),
        Some("127.96.1.1")
    );
}

/// Two workloads with one uid, or one cgroup: the agent enrols by both,
/// so the second is a conflict and left out (not enrolled by turns).
#[test]
fn workloads_sharing_a_uid_or_a_cgroup_are_conflicts() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "a.yaml", SHOP);
    write(
        dir.path(),
        "w.yaml",
        &format!(
            "{WORKLOADS}  - {{name: web-2, namespace: shop, serviceAccount: web, ip: 127.0.10.3, \
             node: node-a, cgroup: shop/web-0}}\n  - {{name: a, namespace: shop, serviceAccount: \
             web, ip: 127.0.10.4, node: node-a, uid: u1}}\n  - {{name: b, namespace: shop, \
             serviceAccount: web, ip: 127.0.10.5, node: node-a, uid: u1}}\n"
        ),
    );
    let mut src = FilesSource::new(dir.path());
    src.reload().unwrap();
    let errors = src.errors();
    let about = |w: &str| {
        errors
            .iter()
            .find(|e| e.object.as_deref() == Some(w))
            .unwrap_or_else(|| panic!("no error about {w}: {errors:?}"))
            .message
            .clone()
    };
    assert!(
        about("workload shop/web-2")
            .contains("cgroup \"shop/web-0\" is already workload shop/web-0's")
    );
    assert!(about("workload shop/b").contains("uid \"u1\" is already workload shop/a's"));
    assert_eq!(errors.len(), 2, "{errors:?}");
    let s = store_of(&src);
    for (name, kept) in [("web-0", true), ("web-2", false), ("a", true), ("b", false)] {
        assert_eq!(s.pods.contains_key(&Key::new("shop", name)), kept, "{name}");
    }
}

#[test]
fn objects_without_namespace_land_in_default_and_a_deleted_file_removes_its_objects() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "svc.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: db}\nspec: {clusterIP: 127.96.2.2, ports: [{port: 5432}]}\n",
    );
    let mut src = FilesSource::new(dir.path());
    src.reload().unwrap();
    assert!(
        store_of(&src)
            .services
            .contains_key(&Key::new("default", "db"))
    );
    fs::remove_file(dir.path().join("svc.yaml")).unwrap();
    assert!(src.reload().unwrap());
    assert!(store_of(&src).services.is_empty());
}

#[tokio::test]
async fn the_watcher_sends_changes() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "shop.yaml", SHOP);
    let (tx, rx) = mpsc::channel();
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(FilesSource::new(dir.path()).run(tx, stop));
    let first = tokio::task::spawn_blocking(move || {
        let first = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("initial state");
        (first, rx)
    })
    .await
    .unwrap();
    let (first, rx) = first;
    assert!(
        matches!(&first[0], Input::Updates(u) if u.iter().any(|u| matches!(u, Update::Synced)))
    );
    write(
        dir.path(),
        "more.yaml",
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: extra}\n",
    );
    let next = tokio::task::spawn_blocking(move || {
        rx.recv_timeout(Duration::from_secs(30)).expect("a change")
    })
    .await
    .unwrap();
    let Input::Updates(u) = &next[0] else {
        panic!()
    };
    let ns = u
        .iter()
        .find_map(|u| match u {
            Update::Replace(Kind::Namespace, objs) => Some(objs.len()),
            _ => None,
        })
        .unwrap();
    assert_eq!(ns, 2);
    stop_tx.send(true).unwrap();
    task.await.unwrap().unwrap();
}

#[test]
fn pods_with_different_named_ports_get_their_own_slices() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "shop.yaml", SHOP);
    write(
        dir.path(),
        "w.yaml",
        &WORKLOADS.replacen("ports: {http: 8080}", "ports: {http: 8081}", 1),
    );
    let mut src = FilesSource::new(dir.path());
    src.reload().unwrap();
    let s = store_of(&src);
    let specs =
        crate::reconcile::lb::desired_specs(&s, &Key::new("shop", "web"), "node-a").unwrap();
    let addrs: Vec<String> = specs[0]
        .backends
        .iter()
        .map(|b| b.addr.to_string())
        .collect();
    assert_eq!(addrs, ["127.0.10.1:8081", "127.0.10.2:8080"]);
}

#[test]
fn http_route_retry_from_a_file_reaches_the_proxy_configuration() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "shop.yaml", SHOP);
    write(
        dir.path(),
        "route.yaml",
        r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata:
  name: web-retry
  namespace: shop
spec:
  parentRefs:
    - {group: "", kind: Service, name: web, port: 80}
  rules:
    - backendRefs:
        - {name: web, port: 80}
      retry:
        attempts: 4
        backoff: 50ms
        codes: [503]
      timeouts:
        request: 3s
"#,
    );
    let mut src = FilesSource::new(dir.path());
    src.reload().unwrap();
    assert_eq!(src.errors(), vec![]);
    let s = store_of(&src);
    let route = &s.http_routes[&Key::new("shop", "web-retry")];
    let t = crate::proxy::routes::http_route(route, &crate::reconcile::refs::RefIndex::of(&s));
    assert_eq!((t.dropped, t.refused), (vec![], vec![]));
    let rule = &t.route.expect("the route is in force").rules[0];
    assert_eq!(
        rule.retry,
        Some(l7_proxy::config::Retry {
            codes: vec![503],
            attempts: 4,
            backoff_ms: 50
        })
    );
    assert_eq!(rule.timeouts.request_ms, Some(3000));
}

/// Mesh routes need no ReferenceGrant (GEP-1294): a grant in the directory
/// (at either version clusters serve) is a note, not an error, says why,
/// and defines nothing; the route's backend in another namespace resolves
/// with or without it.
#[test]
fn a_reference_grant_is_ignored_with_a_note_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "shop.yaml", SHOP);
    write(
        dir.path(),
        "data.yaml",
        r#"
apiVersion: v1
kind: Namespace
metadata: {name: data, annotations: {sluice.dev/mesh: enabled}}
---
apiVersion: v1
kind: Service
metadata: {name: db, namespace: data}
spec: {clusterIP: 127.96.1.2, ports: [{port: 5432}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: to-db, namespace: shop}
spec:
  parentRefs: [{group: "", kind: Service, name: web, port: 80}]
  rules:
    - backendRefs: [{name: db, namespace: data, port: 5432}]
"#,
    );
    let keys = |src: &FilesSource| -> Vec<(Kind, Vec<Key>)> {
        src.updates()
            .into_iter()
            .filter_map(|u| match u {
                Update::Replace(k, objs) => Some((k, objs.iter().map(Object::key).collect())),
                _ => None,
            })
            .collect()
    };
    let mut without = FilesSource::new(dir.path());
    without.reload().unwrap();
    assert_eq!(without.errors(), vec![]);
    write(
        dir.path(),
        "grants.yaml",
        r#"
apiVersion: gateway.networking.k8s.io/v1beta1
kind: ReferenceGrant
metadata: {name: shop-to-db, namespace: data}
spec:
  from: [{group: gateway.networking.k8s.io, kind: HTTPRoute, namespace: shop}]
  to: [{group: "", kind: Service, name: db}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: ReferenceGrant
metadata: {name: all, namespace: data}
spec:
  from: [{group: gateway.networking.k8s.io, kind: GRPCRoute, namespace: shop}]
  to: [{group: "", kind: Service}]
"#,
    );
    let mut src = FilesSource::new(dir.path());
    src.reload().unwrap();
    let errors = src.errors();
    assert_eq!(errors.len(), 2, "{errors:?}");
    for (e, api) in errors.iter().zip(["v1beta1", "v1"]) {
        assert_eq!(e.field.as_deref(), Some("apiVersion"));
        assert_eq!(
            e.message,
            format!(
                "ignored: gateway.networking.k8s.io/{api} ReferenceGrant is not read by the files \
                 source: mesh routes need no ReferenceGrant (GEP-1294); a route's backends and \
                 mirror targets may be in any namespace, since requests keep the caller's \
                 identity and the target's AccessPolicy decides"
            )
        );
    }
    // A note: the file counts as read, and it defines nothing.
    assert!(!src.incomplete());
    assert_eq!(keys(&src), keys(&without));
    let s = store_of(&src);
    let route = &s.http_routes[&Key::new("shop", "to-db")];
    let t = crate::proxy::routes::http_route(route, &crate::reconcile::refs::RefIndex::of(&s));
    assert_eq!((t.dropped, t.refused), (vec![], vec![]));
    let rule = &t.route.expect("the route is in force").rules[0];
    assert_eq!(
        rule.backends[0].service,
        l7_proxy::config::ObjectRef::new("data", "db")
    );
    assert_eq!(rule.backends[0].invalid, None);
}

#[test]
fn an_unreadable_subdirectory_is_reported_and_keeps_its_files_while_others_apply() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "a.yaml", SHOP);
    let sub = dir.path().join("team");
    std::fs::create_dir(&sub).unwrap();
    write(
        &sub,
        "b.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: api, namespace: shop}\nspec: {clusterIP: 127.96.9.8}\n",
    );
    let mut src = FilesSource::new(dir.path());
    src.reload().unwrap();
    assert!(
        store_of(&src)
            .services
            .contains_key(&Key::new("shop", "api"))
    );
    // The subdirectory cannot be listed any more: a symbolic link loop
    // fails for root too, where a mode would not.
    std::fs::remove_dir_all(&sub).unwrap();
    std::os::unix::fs::symlink(&sub, &sub).unwrap();
    src.reload()
        .expect("one bad subdirectory does not stop the reload");
    let errors = src.errors();
    let e = errors
        .iter()
        .find(|e| e.source == sub.display().to_string())
        .unwrap_or_else(|| panic!("{errors:?}"));
    assert!(e.message.starts_with("cannot list this directory"), "{e:?}");
    // Its file keeps its last good version; the rest still applies.
    let s = store_of(&src);
    assert!(s.services.contains_key(&Key::new("shop", "api")), "kept");
    assert!(s.services.contains_key(&Key::new("shop", "web")));
}

#[test]
fn a_file_broken_since_the_start_makes_the_source_incomplete_until_it_parses() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "shop.yaml", "apiVersion: v1\nkind: [\n");
    write(dir.path(), "workloads.yaml", WORKLOADS);
    let mut src = FilesSource::new(dir.path());
    src.reload().unwrap();
    assert!(src.incomplete());
    let Input::SourceErrors { incomplete, .. } = &src.inputs(true)[1] else {
        panic!("errors second")
    };
    assert!(incomplete);
    write(dir.path(), "shop.yaml", SHOP);
    src.reload().unwrap();
    assert!(!src.incomplete());
    // Broken again later: its last good version stands for it.
    write(dir.path(), "shop.yaml", "apiVersion: v1\nkind: [\n");
    src.reload().unwrap();
    assert!(!src.incomplete());
}

#[test]
fn a_copy_added_later_does_not_take_an_object_over_even_sorting_first() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "shop.yaml", SHOP);
    let mut src = FilesSource::new(dir.path());
    src.reload().unwrap();
    // `cp shop.yaml 0-backup.yaml`, then the original is edited.
    write(dir.path(), "0-backup.yaml", SHOP);
    write(
        dir.path(),
        "shop.yaml",
        &SHOP.replace("127.96.1.1", "127.96.1.2"),
    );
    src.reload().unwrap();
    let s = store_of(&src);
    let svc = &s.services[&Key::new("shop", "web")];
    assert_eq!(
        svc.spec.as_ref().unwrap().cluster_ip.as_deref(),
        Some("127.96.1.2"),
        "the edit to the file that defined it applies"
    );
    // The conflict is reported against the copy.
    let errors = src.errors();
    let e = errors
        .iter()
        .find(|e| e.object.as_deref() == Some("Service shop/web"))
        .expect("a conflict");
    assert!(e.source.ends_with("0-backup.yaml"), "{e}");
    assert!(e.message.contains("shop.yaml"), "{e}");
}

/// What `kubectl get -o yaml` writes for several objects, a `kind: List`,
/// defines its items; a kustomization.yaml (no name) is only a note.
#[test]
fn a_list_defines_its_items_and_a_kustomization_is_only_a_note() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "workloads.yaml", WORKLOADS);
    let items: String = SHOP
        .split("---")
        .filter(|d| !d.trim().is_empty())
        .map(|d| {
            let lines: Vec<String> = d.trim().lines().map(|l| format!("    {l}")).collect();
            format!("  - {}\n", lines.join("\n").trim_start())
        })
        .collect();
    write(
        dir.path(),
        "list.yaml",
        &format!("apiVersion: v1\nkind: List\nitems:\n{items}"),
    );
    write(
        dir.path(),
        "kustomization.yaml",
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources: [list.yaml]\n",
    );
    let mut src = FilesSource::new(dir.path());
    src.reload().unwrap();
    let errors = src.errors();
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(
        errors[0]
            .message
            .starts_with("ignored: kustomize.config.k8s.io/v1beta1 Kustomization"),
        "{errors:?}"
    );
    assert!(errors[0].is_note(), "{errors:?}");
    let s = store_of(&src);
    assert!(s.services.contains_key(&Key::new("shop", "web")));
    assert!(s.namespaces.contains_key("shop"));

    // An item's error names the item.
    let broken = fs::read_to_string(dir.path().join("list.yaml"))
        .unwrap()
        .replace("port: 80", "port: eighty");
    write(dir.path(), "list.yaml", &broken);
    src.reload().unwrap();
    let errors = src.errors();
    assert!(
        errors
            .iter()
            .any(|e| e.object.as_deref() == Some("document 1, item 2 (Service web)")),
        "{errors:?}"
    );
}

/// A read kind spelt in another case, or an unknown kind of sluice.dev, is
/// an error (an API server refuses it), not a kind passed over: an edit
/// that misspelt a defined object's kind would have removed the object.
#[test]
fn a_misspelt_kind_is_an_error_and_keeps_the_last_good_version() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "shop.yaml", SHOP);
    write(dir.path(), "workloads.yaml", WORKLOADS);
    let mut src = FilesSource::new(dir.path());
    src.reload().unwrap();
    assert_eq!(src.errors(), vec![]);
    for (from, to, says) in [
        ("kind: Service", "kind: service", "write Service"),
        (
            "apiVersion: v1\nkind: Service",
            "apiVersion: sluice.dev/v1alpha1\nkind: MeshPolcy",
            "kinds of sluice.dev are",
        ),
    ] {
        write(dir.path(), "shop.yaml", &SHOP.replace(from, to));
        src.reload().unwrap();
        let errors = src.errors();
        assert_eq!(errors[0].field.as_deref(), Some("kind"), "{errors:?}");
        assert!(errors[0].message.contains(says), "{errors:?}");
        assert!(!errors[0].is_note(), "{errors:?}");
        assert!(
            errors[1].message.contains("last good version stays"),
            "{errors:?}"
        );
        assert!(
            store_of(&src)
                .services
                .contains_key(&Key::new("shop", "web"))
        );
    }
    // A kind of another group is still a note.
    write(
        dir.path(),
        "other.yaml",
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: x}\n",
    );
    write(dir.path(), "shop.yaml", SHOP);
    src.reload().unwrap();
    let errors = src.errors();
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(errors[0].is_note(), "{errors:?}");
}

/// A file emptied (a command writing it through `>`) keeps its objects
/// until its new contents come; deleting the file removes them.
#[test]
fn an_emptied_file_keeps_its_objects_until_written_or_deleted() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "shop.yaml", SHOP);
    write(dir.path(), "workloads.yaml", WORKLOADS);
    let mut src = FilesSource::new(dir.path());
    src.reload().unwrap();
    for empty in ["", "# being written\n"] {
        write(dir.path(), "shop.yaml", empty);
        src.reload().unwrap();
        let errors = src.errors();
        assert!(errors[0].message.contains("delete the file"), "{errors:?}");
        assert!(
            store_of(&src)
                .services
                .contains_key(&Key::new("shop", "web"))
        );
    }
    write(dir.path(), "shop.yaml", SHOP);
    src.reload().unwrap();
    assert_eq!(src.errors(), vec![]);
    // A list with no items is a whole file that defines nothing (what
    // `kubectl get -o yaml` writes when nothing matches).
    write(
        dir.path(),
        "shop.yaml",
        "apiVersion: v1\nkind: List\nitems: []\n",
    );
    src.reload().unwrap();
    assert_eq!(src.errors(), vec![]);
    assert!(
        !store_of(&src)
            .services
            .contains_key(&Key::new("shop", "web"))
    );
    write(dir.path(), "shop.yaml", SHOP);
    src.reload().unwrap();
    fs::remove_file(dir.path().join("shop.yaml")).unwrap();
    src.reload().unwrap();
    assert!(
        !store_of(&src)
            .services
            .contains_key(&Key::new("shop", "web"))
    );
    // An empty file that never defined anything is nothing to report.
    write(dir.path(), "new.yaml", "");
    src.reload().unwrap();
    assert_eq!(src.errors(), vec![]);
}

/// A file broken from its first read has nothing in force; a name that is
/// not a string is said so, not "missing".
#[test]
fn a_file_never_good_says_nothing_in_it_is_in_force() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "shop.yaml",
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: 123}\n",
    );
    let mut src = FilesSource::new(dir.path());
    src.reload().unwrap();
    let errors = src.errors();
    assert_eq!(errors[0].field.as_deref(), Some("metadata.name"));
    assert!(errors[0].message.contains("not a string"), "{errors:?}");
    assert!(
        errors[1]
            .message
            .contains("nothing in the file is in force"),
        "{errors:?}"
    );
}

/// As a cluster has them: a `targetPort` of `0` or `""` is the port (the
/// API server's default), and a Service publishing not-ready addresses has
/// its not-ready pods as ready endpoints (the endpoint controller's rule).
#[test]
fn derived_endpoints_follow_the_clusters_defaults() {
    let dir = tempfile::tempdir().unwrap();
    let svc = |name: &str, ip: &str, target: &str, publish: bool| {
        format!(
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: shop}}\n\
             spec:\n  clusterIP: {ip}\n  publishNotReadyAddresses: {publish}\n  \
             selector: {{app: web}}\n  ports:\n    - {{name: http, port: 80, targetPort: {target}}}\n"
        )
    };
    let manifests = [
        SHOP.to_string(),
        svc("zero", "127.96.1.3", "0", false),
        svc("blank", "127.96.1.4", "\"\"", false),
        svc("peers", "127.96.1.5", "http", true),
    ]
    .concat();
    write(dir.path(), "shop.yaml", &manifests);
    write(dir.path(), "workloads.yaml", WORKLOADS);
    let mut src = FilesSource::new(dir.path());
    src.reload().unwrap();
    assert_eq!(src.errors(), vec![]);
    let s = store_of(&src);
    let backends = |svc: &str| -> Vec<(String, ebpf_lb::BackendState)> {
        crate::reconcile::lb::desired_specs(&s, &Key::new("shop", svc), "node-a").unwrap()[0]
            .backends
            .iter()
            .map(|b| (b.addr.to_string(), b.state))
            .collect()
    };
    for svc in ["zero", "blank"] {
        let got: Vec<_> = backends(svc).into_iter().map(|(a, _)| a).collect();
        assert_eq!(got, ["127.0.10.1:80", "127.0.10.2:80"], "{svc}");
    }
    // web-1 is not ready: an endpoint of `peers` all the same.
    let peers = backends("peers");
    assert_eq!(peers.len(), 2, "{peers:?}");
    assert!(
        peers
            .iter()
            .all(|(_, st)| *st == ebpf_lb::BackendState::Ready),
        "{peers:?}"
    );
    // Without it, web-1 is not.
    assert!(
        backends("web")
            .iter()
            .any(|(a, st)| a == "127.0.10.2:8080" && *st != ebpf_lb::BackendState::Ready)
    );
}
