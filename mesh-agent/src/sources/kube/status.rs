//! Writes the status the reconciler decides: route parent conditions and the
//! `Accepted` condition of Sluice policies. Only one agent of the cluster
//! writes: the holder of the status writer Lease ([`super::lease`]).
//!
//! A route's `status.parents` is shared with other controllers (a Gateway's,
//! another mesh's), and the Gateway API CRDs make it an atomic list: a merge
//! patch or an apply replaces it whole. So the writer reads the route's
//! current status, replaces only Sluice's entries, and writes the list back
//! with the `resourceVersion` it read as a precondition; when another writer
//! got there first (409 Conflict) it reads again and retries. An entry
//! another controller adds between the agent's watch and its write is never
//! dropped. Sluice's own policies are Sluice's alone: a merge patch of their
//! `status`.

use kube::{
    Api, Client, Resource,
    api::{ApiResource, DynamicObject, Patch, PatchParams},
};
use serde_json::{Value, json};

use super::is_status;
use crate::{
    config,
    crds::{AccessPolicy, MeshPolicy},
    gateway::{GrpcRoute, HttpRoute},
    reconcile::{policies::StatusWrite, routes},
    state::{Key, Kind},
};

/// How many times a route status write is retried after a conflict.
pub const CONFLICT_ATTEMPTS: usize = 5;

/// Why a status write failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("writing the status of {kind} {key}: {source}")]
    Patch {
        kind: Kind,
        key: Key,
        #[source]
        source: kube::Error,
    },
    #[error(
        "writing the status of {kind} {key}: it changed under every one of {CONFLICT_ATTEMPTS} \
         attempts (409 Conflict); it is written again on the next change"
    )]
    Conflict { kind: Kind, key: Key },
    #[error("{0} has no status the agent writes")]
    Unsupported(Kind),
}

fn params() -> PatchParams {
    PatchParams {
        field_manager: Some(config::FIELD_MANAGER.into()),
        ..PatchParams::default()
    }
}

/// Replaces Sluice's entries of a route's `status.parents` with `ours`,
/// keeping every other controller's: read, merge, write with the read
/// `resourceVersion`, again on a conflict. Ok when the route is gone.
pub async fn write_route_parents(
    api: &Api<DynamicObject>,
    kind: Kind,
    key: &Key,
    ours: &[Value],
) -> Result<(), Error> {
    let err = |source| Error::Patch {
        kind,
        key: key.clone(),
        source,
    };
    for _ in 0..CONFLICT_ATTEMPTS {
        let current = match api.get_status(&key.name).await {
            Ok(o) => o,
            // Deleted meanwhile: nothing to say about it.
            Err(e) if is_status(&e, 404) => return Ok(()),
            Err(e) => return Err(err(e)),
        };
        let parents: Vec<Value> = current.data["status"]["parents"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        if routes::parents_hold(&parents, ours) {
            return Ok(());
        }
        let patch = json!({
            "metadata": {"resourceVersion": current.metadata.resource_version},
            "status": {"parents": routes::merge_parents(&parents, ours)},
        });
        match api
            .patch_status(&key.name, &params(), &Patch::Merge(patch))
            .await
        {
            Ok(_) => return Ok(()),
            Err(e) if is_status(&e, 409) => {
                tracing::debug!(%kind, object = %key, "status changed meanwhile; reading it again");
            }
            Err(e) if is_status(&e, 404) => return Ok(()),
            Err(e) => return Err(err(e)),
        }
    }
    Err(Error::Conflict {
        kind,
        key: key.clone(),
    })
}

fn dynamic<K: Resource<DynamicType = ()>>(client: &Client, ns: &str) -> Api<DynamicObject> {
    Api::namespaced_with(client.clone(), ns, &ApiResource::erase::<K>(&()))
}

/// Writes one status.
pub async fn write(client: &Client, w: &StatusWrite) -> Result<(), Error> {
    let ns = &w.key.namespace;
    let name = &w.key.name;
    let ours = || w.status["parents"].as_array().cloned().unwrap_or_default();
    let patch = Patch::Merge(json!({ "status": w.status }));
    let res = match w.kind {
        Kind::HTTPRoute => {
            return write_route_parents(&dynamic::<HttpRoute>(client, ns), w.kind, &w.key, &ours())
                .await;
        }
        Kind::GRPCRoute => {
            return write_route_parents(&dynamic::<GrpcRoute>(client, ns), w.kind, &w.key, &ours())
                .await;
        }
        // Untyped, as the source reads them: an object this agent cannot
        // decode (a newer CRD version) must not turn a successful patch
        // into an error that is retried forever.
        Kind::MeshPolicy => dynamic::<MeshPolicy>(client, ns)
            .patch_status(name, &params(), &patch)
            .await
            .map(drop),
        Kind::AccessPolicy => dynamic::<AccessPolicy>(client, ns)
            .patch_status(name, &params(), &patch)
            .await
            .map(drop),
        other => return Err(Error::Unsupported(other)),
    };
    match res {
        Ok(()) => Ok(()),
        // Deleted meanwhile: nothing to say about it.
        Err(e) if is_status(&e, 404) => Ok(()),
        Err(source) => Err(Error::Patch {
            kind: w.kind,
            key: w.key.clone(),
            source,
        }),
    }
}

/// How long after a failed write the reconciler is asked to send every
/// status that still differs again.
pub const RETRY_AFTER: std::time::Duration = std::time::Duration::from_secs(5);

/// Writes statuses as the reconciler sends them, until it goes away or
/// `stop`, while `write_until` allows it (this agent holds the status writer
/// Lease, [`super::lease`]); otherwise leaves them to the agent that does.
/// After a failed write it calls `resend` (after [`RETRY_AFTER`]): the
/// reconciler then sends what still differs, from its current view, so a
/// retry never writes back an outdated status.
pub async fn run(
    client: Client,
    mut rx: crate::reconcile::policies::StatusReceiver,
    write_until: tokio::sync::watch::Receiver<super::lease::WriteUntil>,
    mut stop: tokio::sync::watch::Receiver<bool>,
    resend: impl Fn(),
) {
    let mut retry: Option<tokio::time::Instant> = None;
    // Writes that failed, and when: the same status again before
    // `RETRY_AFTER` is not written (a write the API server keeps refusing,
    // a webhook's 403, a status over its size limit, was sent again on
    // every change anywhere in the cluster); the resend after it is.
    let mut failed: std::collections::HashMap<
        (crate::state::Kind, crate::state::Key),
        (serde_json::Value, tokio::time::Instant),
    > = std::collections::HashMap::new();
    loop {
        let w = tokio::select! {
            w = rx.recv() => match w {
                Some(w) => w,
                None => return,
            },
            _ = async {
                match retry {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            } => {
                retry = None;
                if super::lease::may_write(&write_until.borrow()) {
                    resend();
                }
                continue;
            }
            _ = stop.changed() => return,
        };
        if !super::lease::may_write(&write_until.borrow()) {
            tracing::debug!(kind = %w.kind, object = %w.key, "status left to the agent holding the lease");
            continue;
        }
        let id = (w.kind, w.key.clone());
        let now = tokio::time::Instant::now();
        if failed
            .get(&id)
            .is_some_and(|(status, at)| *status == w.status && now < *at + RETRY_AFTER)
        {
            tracing::debug!(kind = %w.kind, object = %w.key, "status failed just now; left to the retry");
            continue;
        }
        match write(&client, &w).await {
            Ok(()) => {
                failed.remove(&id);
                tracing::debug!(kind = %w.kind, object = %w.key, "status written");
            }
            Err(e) => {
                tracing::warn!(error = %e, "status not written; trying again in {RETRY_AFTER:?}");
                retry.get_or_insert(now + RETRY_AFTER);
                // Those of objects since gone or written otherwise go.
                failed.retain(|_, (_, at)| now < *at + RETRY_AFTER * 10);
                // Stamped with the time the write began, as the retry is:
                // the resend it brings is written, not taken for a repeat.
                failed.insert(id, (w.status, now));
            }
        }
    }
}
