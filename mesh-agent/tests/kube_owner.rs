//! The agent's watch of its own DaemonSet (`sources::kube::owner`) against
//! the fake API server: deleted or being deleted (helm uninstall) means the
//! agent removes its kernel state as it stops; never seen means never.

use std::time::Duration;

use mesh_agent::sources::kube::owner;
use serde_json::{Value, json};
use tokio::sync::watch;

mod support;
use support::FakeApi;

const DAEMONSETS: &str = "/apis/apps/v1/namespaces/sluice-system/daemonsets";

fn daemonset(deleting: bool) -> Value {
    let mut ds = json!({
        "apiVersion": "apps/v1", "kind": "DaemonSet",
        "metadata": {"name": "sluice-agent", "namespace": "sluice-system",
                     "uid": "u1", "resourceVersion": "6"},
        "spec": {"selector": {"matchLabels": {"app": "sluice-agent"}},
                 "template": {"metadata": {"labels": {"app": "sluice-agent"}},
                              "spec": {"containers": [{"name": "agent", "image": "x"}]}}}
    });
    if deleting {
        ds["metadata"]["deletionTimestamp"] = json!("2026-11-28T12:00:00Z");
    }
    ds
}

fn listing(items: Vec<Value>) -> Value {
    json!({"apiVersion": "apps/v1", "kind": "DaemonSetList",
           "metadata": {"resourceVersion": "5"}, "items": items})
}

async fn until_watching(fake: &FakeApi) {
    tokio::time::timeout(Duration::from_secs(5), async {
        while !fake.watching(DAEMONSETS) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the DaemonSet watched");
}

async fn becomes(deleted: &mut watch::Receiver<bool>, want: bool) {
    tokio::time::timeout(Duration::from_secs(5), deleted.wait_for(|d| *d == want))
        .await
        .unwrap_or_else(|_| panic!("deleted never became {want}"))
        .unwrap();
}

#[tokio::test]
async fn the_agents_daemonset_deleted_or_being_deleted_is_seen() {
    let fake = FakeApi::default();
    fake.put_object(DAEMONSETS, listing(vec![daemonset(false)]));
    let (_stop, stop) = watch::channel(false);
    let (_task, mut deleted) =
        owner::watch_deleted(fake.client(), "sluice-system", "sluice-agent", stop);
    until_watching(&fake).await;
    assert!(!*deleted.borrow(), "there and not being deleted");
    let queries = fake.list_queries(DAEMONSETS);
    assert!(
        queries
            .iter()
            .all(|q| q.contains("fieldSelector=metadata.name%3Dsluice-agent")),
        "watched by name only (its RBAC names it): {queries:?}"
    );
    // helm uninstall with foreground deletion: marked first.
    fake.event(DAEMONSETS, "MODIFIED", daemonset(true));
    becomes(&mut deleted, true).await;
    // Made again (a DaemonSet deleted to be re-created): kept again.
    fake.event(DAEMONSETS, "ADDED", daemonset(false));
    becomes(&mut deleted, false).await;
    // Background deletion: gone at once.
    fake.event(DAEMONSETS, "DELETED", daemonset(false));
    becomes(&mut deleted, true).await;
}

/// A DaemonSet of another name, or none (the agent run outside the chart):
/// never taken for deleted, so a restart never uninstalls.
#[tokio::test]
async fn a_daemonset_never_seen_never_counts_as_deleted() {
    let fake = FakeApi::default();
    fake.put_object(DAEMONSETS, listing(vec![]));
    let (_stop, stop) = watch::channel(false);
    let (_task, deleted) =
        owner::watch_deleted(fake.client(), "sluice-system", "sluice-agent", stop);
    until_watching(&fake).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!*deleted.borrow());
}
