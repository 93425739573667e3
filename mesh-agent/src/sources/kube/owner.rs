//! Whether the agent's own DaemonSet is gone or going (`helm uninstall`,
//! `kubectl delete daemonset sluice-agent`). The kernel state outlives the
//! agent on purpose (a restart or an upgrade must not let meshed traffic
//! out in plaintext), so an agent whose DaemonSet is deleted would leave
//! it behind on every node for good: enrolled pods' connections to meshed
//! Services refused, a frozen service table balancing to pods long gone.
//! Such an agent removes its kernel state as it stops.
//!
//! The DaemonSet is watched while the agent runs, not read when it stops:
//! `helm uninstall` deletes the agent's RBAC right after the DaemonSet, so
//! by the time the agent is told to stop it may no longer read anything.

use futures::StreamExt as _;
use k8s_openapi::api::apps::v1::DaemonSet;
use kube::{
    Api, Client,
    runtime::{WatchStreamExt as _, watcher},
};
use tokio::sync::watch;

/// The agent's DaemonSet, as the chart names it.
pub const DAEMONSET: &str = "sluice-agent";

/// Watches the DaemonSet `name` in `namespace` until `stop`; the value is
/// `true` once it has been seen deleted or being deleted (and `false` again
/// if it comes back). A DaemonSet never seen (a wrong name, the agent run
/// outside the chart) never counts as deleted.
pub fn watch_deleted(
    client: Client,
    namespace: &str,
    name: &str,
    mut stop: watch::Receiver<bool>,
) -> (tokio::task::JoinHandle<()>, watch::Receiver<bool>) {
    let (tx, rx) = watch::channel(false);
    let api: Api<DaemonSet> = Api::namespaced(client, namespace);
    let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let what = format!("DaemonSet {namespace}/{name}");
    let task = tokio::spawn(async move {
        let mut stream = watcher(api, config).default_backoff().boxed();
        let (mut seen, mut in_list, mut failing) = (false, false, false);
        loop {
            let ev = tokio::select! {
                ev = stream.next() => ev,
                _ = stop.changed() => return,
            };
            match ev {
                None => return,
                // (Said before every list attempt, answered or not.)
                Some(Ok(watcher::Event::Init)) => in_list = false,
                Some(Ok(watcher::Event::InitApply(ds) | watcher::Event::Apply(ds))) => {
                    seen = true;
                    in_list = true;
                    tx.send_replace(ds.metadata.deletion_timestamp.is_some());
                }
                Some(Ok(watcher::Event::InitDone)) => {
                    failing = false;
                    if !in_list {
                        if seen {
                            // Deleted while the watch was down.
                            tx.send_replace(true);
                        } else {
                            tracing::warn!(
                                "{what} not found: this agent will leave its kernel state \
                                 behind when it stops, also when Sluice is uninstalled \
                                 (`mesh-agent uninstall` on the node removes it)"
                            );
                        }
                    }
                }
                Some(Ok(watcher::Event::Delete(_))) => {
                    tx.send_replace(true);
                }
                // Said once per spell of failures (a Role that does not
                // name this DaemonSet fails every retry): meanwhile what was
                // last seen stands. Not once it was seen deleted (helm
                // deletes the Role right after).
                Some(Err(e)) if !failing && !*tx.borrow() => {
                    failing = true;
                    tracing::warn!(
                        "watching {what}: {e}; until it can be read, an uninstall meanwhile \
                         leaves this node's kernel state behind (`mesh-agent uninstall` removes it)"
                    );
                }
                Some(Err(e)) => tracing::debug!("watching {what}: {e}"),
            }
        }
    });
    (task, rx)
}
