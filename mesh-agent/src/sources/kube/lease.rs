//! One agent of the cluster writes status: the holder of a
//! `coordination.k8s.io/v1` Lease in the agent's namespace. Every agent
//! computes the same status from the same objects, but each would otherwise
//! read and write every route on every change, and agents whose watches lag
//! would write back an older view.
//!
//! The holder renews the Lease every [`RENEW`]; another agent takes it over
//! when it has not been renewed for [`LEASE_DURATION`]. Every change is a
//! write with the `resourceVersion` read (optimistic concurrency), so two
//! agents can never both take it. An agent that cannot reach the API server
//! stops writing at once, before its Lease could pass to another.

use std::time::Duration;

use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
    jiff::{SignedDuration, Timestamp},
};
use kube::{
    Api, Client,
    api::{PostParams, Resource},
};
use tokio::sync::watch;

use crate::config;

/// Name of the Lease, in the agent's namespace.
pub const LEASE_NAME: &str = "sluice-status-writer";
/// How long a Lease not renewed still belongs to its holder.
pub const LEASE_DURATION: Duration = Duration::from_secs(15);
/// How often the holder renews it, and the others look at it.
pub const RENEW: Duration = Duration::from_secs(5);

/// This agent's view of the Lease.
#[derive(Clone, Debug)]
pub struct Elector {
    api: Api<Lease>,
    /// Who this agent is (its node name).
    holder: String,
    duration: Duration,
}

fn is_status(e: &kube::Error, code: u16) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == code)
}

impl Elector {
    pub fn new(client: Client, namespace: &str, holder: &str) -> Elector {
        Elector {
            api: Api::namespaced(client, namespace),
            holder: holder.into(),
            duration: LEASE_DURATION,
        }
    }

    fn spec(&self, now: Timestamp, acquired: Option<MicroTime>, transitions: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(self.holder.clone()),
            lease_duration_seconds: Some(self.duration.as_secs() as i32),
            acquire_time: Some(acquired.unwrap_or(MicroTime(now))),
            renew_time: Some(MicroTime(now)),
            lease_transitions: Some(transitions),
            ..LeaseSpec::default()
        }
    }

    /// Takes or renews the Lease; whether this agent holds it now.
    pub async fn try_lead(&self, now: Timestamp) -> Result<bool, kube::Error> {
        let current = match self.api.get_opt(LEASE_NAME).await? {
            Some(l) => l,
            None => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(LEASE_NAME.into()),
                        labels: Some(
                            [(
                                "app.kubernetes.io/managed-by".to_string(),
                                config::FIELD_MANAGER.to_string(),
                            )]
                            .into(),
                        ),
                        ..ObjectMeta::default()
                    },
                    spec: Some(self.spec(now, None, 0)),
                };
                return match self.api.create(&PostParams::default(), &lease).await {
                    Ok(_) => Ok(true),
                    // Another agent created it first.
                    Err(e) if is_status(&e, 409) => Ok(false),
                    Err(e) => Err(e),
                };
            }
        };
        let spec = current.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.as_deref().unwrap_or("");
        let mine = holder == self.holder;
        let duration = spec
            .lease_duration_seconds
            .map_or(self.duration, |s| Duration::from_secs(s.max(1) as u64));
        let expired = match &spec.renew_time {
            Some(MicroTime(t)) => {
                now.duration_since(*t) > SignedDuration::try_from(duration).unwrap_or_default()
            }
            None => true,
        };
        if !mine && !holder.is_empty() && !expired {
            return Ok(false);
        }
        let transitions = spec.lease_transitions.unwrap_or(0) + i32::from(!mine);
        let acquired = if mine { spec.acquire_time } else { None };
        let mut next = Lease {
            metadata: current.metadata.clone(),
            spec: Some(self.spec(now, acquired, transitions)),
        };
        next.meta_mut().managed_fields = None;
        // The resourceVersion read is the precondition: a 409 means another
        // agent renewed or took it in between.
        match self
            .api
            .replace(LEASE_NAME, &PostParams::default(), &next)
            .await
        {
            Ok(_) => Ok(true),
            Err(e) if is_status(&e, 409) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Gives the Lease up (on shutdown), so that another agent takes it at
    /// once rather than after [`LEASE_DURATION`].
    pub async fn release(&self) {
        let Ok(Some(current)) = self.api.get_opt(LEASE_NAME).await else {
            return;
        };
        let Some(mut spec) = current.spec.clone() else {
            return;
        };
        if spec.holder_identity.as_deref() != Some(&self.holder) {
            return;
        }
        spec.holder_identity = None;
        spec.renew_time = None;
        let mut next = Lease {
            metadata: current.metadata.clone(),
            spec: Some(spec),
        };
        next.meta_mut().managed_fields = None;
        if let Err(e) = self
            .api
            .replace(LEASE_NAME, &PostParams::default(), &next)
            .await
        {
            tracing::debug!("releasing the status writer lease: {e}");
        }
    }
}

/// Keeps trying to lead, every [`RENEW`], until `stop`; says in `leading`
/// whether this agent is the status writer, and calls `gained` each time it
/// becomes it (the reconciler then sends every status again: what this agent
/// decided while another wrote was not written). On stop, gives the Lease up.
pub async fn run(
    elector: Elector,
    leading: watch::Sender<bool>,
    gained: impl Fn(),
    mut stop: watch::Receiver<bool>,
) {
    while !*stop.borrow() {
        let now = leading_now(&elector).await;
        let was = leading.send_replace(now);
        if now && !was {
            tracing::info!(holder = %elector.holder, "this agent now writes route and policy status");
            gained();
        } else if was && !now {
            tracing::info!(holder = %elector.holder, "another agent writes route and policy status now");
        }
        tokio::select! {
            _ = tokio::time::sleep(RENEW) => {}
            _ = stop.changed() => {}
        }
    }
    if leading.send_replace(false) {
        elector.release().await;
    }
}

async fn leading_now(elector: &Elector) -> bool {
    match elector.try_lead(Timestamp::now()).await {
        Ok(l) => l,
        Err(e) => {
            // Unsure: stop writing; the Lease passes on if this lasts.
            tracing::warn!("status writer lease {LEASE_NAME}: {e}");
            false
        }
    }
}
