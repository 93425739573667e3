//! One agent of the cluster writes status: the holder of a
//! `coordination.k8s.io/v1` Lease in the agent's namespace. Every agent
//! computes the same status from the same objects, but each would otherwise
//! read and write every route on every change, and agents whose watches lag
//! would write back an older view.
//!
//! The holder renews the Lease every [`RENEW`]. Another agent takes it over
//! when it has seen no change to it for [`LEASE_DURATION`], measured on its
//! own monotonic clock from when it saw the last change (as client-go does),
//! so clocks that differ between nodes do not matter, and neither does a
//! step of this node's own wall clock (NTP correcting it by a minute would
//! otherwise hand the Lease over at once, while its holder still writes). Every change is a write with the
//! `resourceVersion` read (optimistic concurrency), so two agents can never
//! both take it. The holder may write status only until [`LEASE_DURATION`]
//! minus [`MARGIN`] after its last successful renewal began: an agent whose
//! renewals fail or hang stops writing before anyone else could take over.

use std::{
    sync::Mutex,
    time::{Duration, Instant},
};

use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
    jiff::Timestamp,
};
use kube::{
    Api, Client,
    api::{PostParams, Resource},
};
use tokio::sync::watch;

use super::is_status;
use crate::config;

/// Name of the Lease, in the agent's namespace.
pub const LEASE_NAME: &str = "sluice-status-writer";
/// How long a Lease nobody renews still belongs to its holder.
pub const LEASE_DURATION: Duration = Duration::from_secs(15);
/// How often the holder renews it, and the others look at it.
pub const RENEW: Duration = Duration::from_secs(5);
/// The holder stops writing this long before its Lease could pass on.
pub const MARGIN: Duration = Duration::from_secs(3);
/// Giving the Lease up on shutdown waits at most this long.
const RELEASE_TIMEOUT: Duration = Duration::from_secs(2);

/// Until when this agent may write status; `None`: it may not.
pub type WriteUntil = Option<Instant>;

/// The Lease as this agent last saw it, and when (its own monotonic clock).
#[derive(Clone, Debug, PartialEq)]
struct Seen {
    holder: String,
    renew_time: Option<Timestamp>,
    resource_version: Option<String>,
    at: Instant,
}

/// This agent's side of the election.
#[derive(Debug)]
pub struct Elector {
    api: Api<Lease>,
    /// Who this agent is (its pod name).
    holder: String,
    duration: Duration,
    seen: Mutex<Option<Seen>>,
}

impl Elector {
    pub fn new(client: Client, namespace: &str, holder: &str) -> Elector {
        Elector {
            api: Api::namespaced(client, namespace),
            holder: holder.into(),
            duration: LEASE_DURATION,
            seen: Mutex::new(None),
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

    /// Whether another holder's Lease has gone unrenewed for its duration:
    /// measured from when this agent first saw it as it is now.
    fn expired(&self, lease: &Lease, now: Instant) -> bool {
        let spec = lease.spec.clone().unwrap_or_default();
        let seen = Seen {
            holder: spec.holder_identity.unwrap_or_default(),
            renew_time: spec.renew_time.map(|MicroTime(t)| t),
            resource_version: lease.metadata.resource_version.clone(),
            at: now,
        };
        let duration = spec
            .lease_duration_seconds
            .map_or(self.duration, |s| Duration::from_secs(s.max(1) as u64));
        let mut last = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        let since = match &*last {
            Some(s)
                if s.holder == seen.holder
                    && s.renew_time == seen.renew_time
                    && s.resource_version == seen.resource_version =>
            {
                s.at
            }
            _ => {
                *last = Some(seen);
                now
            }
        };
        now.saturating_duration_since(since) > duration
    }

    /// Takes or renews the Lease; whether this agent holds it now. `now` is
    /// this node's wall clock, written into the Lease; `seen_at` its
    /// monotonic clock, which alone measures how long another holder's
    /// Lease went without a change.
    pub async fn try_lead(&self, now: Timestamp, seen_at: Instant) -> Result<bool, kube::Error> {
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
        if !mine && !holder.is_empty() && !self.expired(&current, seen_at) {
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

    /// Gives the Lease up if this agent holds it (on shutdown), so that
    /// another agent takes it at once rather than after [`LEASE_DURATION`].
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

/// Once `ready` (the agent's first sync done), keeps trying to lead, every
/// [`RENEW`], until `stop`. Says in `write_until` until when this agent may
/// write status, and calls `gained` each time it becomes the writer (the
/// reconciler then sends every status again: what this agent decided while
/// another wrote was not written). On stop, gives the Lease up. An agent
/// whose first lists have not finished writes nothing; holding the Lease
/// meanwhile (a new pod of a rolling update winning it, one whose lists
/// never finish) would leave every route and policy without status.
pub async fn run(
    elector: Elector,
    write_until: watch::Sender<WriteUntil>,
    gained: impl Fn(),
    mut stop: watch::Receiver<bool>,
    ready: impl std::future::Future<Output = ()>,
) {
    tokio::select! {
        () = ready => {}
        _ = stop.changed() => return,
    }
    while !*stop.borrow() {
        let began = Instant::now();
        let attempt = tokio::time::timeout(RENEW, elector.try_lead(Timestamp::now(), began));
        let leads = tokio::select! {
            r = attempt => match r {
                Ok(Ok(l)) => l,
                Ok(Err(e)) => {
                    // Unsure: stop writing; the Lease passes on if this lasts.
                    tracing::warn!("status writer lease {LEASE_NAME}: {e}");
                    false
                }
                Err(_) => {
                    tracing::warn!("status writer lease {LEASE_NAME}: no answer within {RENEW:?}");
                    false
                }
            },
            _ = stop.changed() => break,
        };
        let until = leads.then(|| began + LEASE_DURATION - MARGIN);
        let was = write_until.send_replace(until).is_some();
        if leads && !was {
            tracing::info!(holder = %elector.holder, "this agent now writes route and policy status");
            gained();
        } else if was && !leads {
            tracing::info!(holder = %elector.holder, "this agent no longer writes route and policy status");
        }
        tokio::select! {
            _ = tokio::time::sleep(RENEW.saturating_sub(began.elapsed())) => {}
            _ = stop.changed() => {}
        }
    }
    write_until.send_replace(None);
    let _ = tokio::time::timeout(RELEASE_TIMEOUT, elector.release()).await;
}

/// Whether `write_until` allows writing now.
pub fn may_write(write_until: &WriteUntil) -> bool {
    write_until.is_some_and(|t| Instant::now() < t)
}
