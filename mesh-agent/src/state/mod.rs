//! The agent's one in-memory model of the cluster, filled by either source
//! (Kubernetes watchers or the files directory).
//!
//! Sources send [`Update`]s; [`Store::apply`] folds them in and says what they
//! touched ([`Dirty`]), so the reconciler re-derives only that: a change to one
//! EndpointSlice dirties only its Service.

mod objects;
mod store;

pub use objects::{Key, Kind, NodeInfo, Object, Workload};
pub(crate) use store::slice_service;
pub use store::{Dirty, Rejected, Store, Update};
