//! Writes the status the reconciler decides: route parent conditions and the
//! `Accepted` condition of Sluice policies, as JSON merge patches of the
//! `status` subresource.

use kube::{
    Api, Client,
    api::{Patch, PatchParams},
};
use tokio::sync::mpsc;

use crate::{
    config,
    crds::{AccessPolicy, MeshPolicy},
    reconcile::policies::StatusWrite,
    state::Kind,
};

/// Why a status write failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("writing the status of {kind} {key}: {source}")]
    Patch {
        kind: Kind,
        key: crate::state::Key,
        #[source]
        source: kube::Error,
    },
    #[error("{0} has no status the agent writes")]
    Unsupported(Kind),
}

/// Writes one status.
pub async fn write(client: &Client, w: &StatusWrite) -> Result<(), Error> {
    let patch = Patch::Merge(serde_json::json!({ "status": w.status }));
    let pp = PatchParams {
        field_manager: Some(config::FIELD_MANAGER.into()),
        ..PatchParams::default()
    };
    let ns = &w.key.namespace;
    let name = &w.key.name;
    let res = match w.kind {
        Kind::HTTPRoute => Api::<crate::gateway::HttpRoute>::namespaced(client.clone(), ns)
            .patch_status(name, &pp, &patch)
            .await
            .map(drop),
        Kind::GRPCRoute => Api::<crate::gateway::GrpcRoute>::namespaced(client.clone(), ns)
            .patch_status(name, &pp, &patch)
            .await
            .map(drop),
        Kind::MeshPolicy => Api::<MeshPolicy>::namespaced(client.clone(), ns)
            .patch_status(name, &pp, &patch)
            .await
            .map(drop),
        Kind::AccessPolicy => Api::<AccessPolicy>::namespaced(client.clone(), ns)
            .patch_status(name, &pp, &patch)
            .await
            .map(drop),
        other => return Err(Error::Unsupported(other)),
    };
    match res {
        Ok(()) => Ok(()),
        // Deleted meanwhile: nothing to say about it.
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(source) => Err(Error::Patch {
            kind: w.kind,
            key: w.key.clone(),
            source,
        }),
    }
}

/// Writes statuses as the reconciler sends them, until it goes away.
pub async fn run(client: Client, mut rx: mpsc::UnboundedReceiver<StatusWrite>) {
    while let Some(w) = rx.recv().await {
        match write(&client, &w).await {
            Ok(()) => tracing::debug!(kind = %w.kind, object = %w.key, "status written"),
            Err(e) => {
                tracing::warn!(error = %e, "status not written; it is written again on the next change")
            }
        }
    }
}
