//! One dial at a time per destination (a tunnel key, a workload's HTTP/2
//! address), and the last dial's failure for the requests that queued
//! behind it: they get it at once rather than dialling again one after
//! another, each waiting out the connect timeout.

use std::{hash::Hash, sync::Arc, sync::Mutex};

use tokio::{sync::OwnedMutexGuard, time::Instant};

use crate::FastMap;

/// A failed dial.
pub(crate) struct DialFailure {
    at: Instant,
    pub reason: String,
    pub unreachable: bool,
}

type Slot = Arc<tokio::sync::Mutex<Option<DialFailure>>>;

/// The dial locks of the destinations being dialled.
pub(crate) struct DialLocks<K>(Mutex<FastMap<K, Slot>>);

impl<K> Default for DialLocks<K> {
    fn default() -> Self {
        DialLocks(Mutex::default())
    }
}

impl<K: Hash + Eq + Clone> DialLocks<K> {
    /// Waits for `key`'s turn to dial.
    pub(crate) async fn turn(&self, key: &K) -> DialTurn {
        let slot = {
            let mut d = self.0.lock().unwrap_or_else(|e| e.into_inner());
            // Destinations nobody dials now go (peers, identities and
            // workloads come and go; dialling is rare enough to sweep here).
            d.retain(|k, m| k == key || Arc::strong_count(m) > 1);
            d.entry(key.clone()).or_default().clone()
        };
        let since = Instant::now();
        DialTurn {
            last: slot.lock_owned().await,
            since,
        }
    }
}

/// A destination's turn to dial (its lock, held until dropped).
pub(crate) struct DialTurn {
    last: OwnedMutexGuard<Option<DialFailure>>,
    since: Instant,
}

impl DialTurn {
    /// The failure of a dial that ended while this turn waited.
    pub(crate) fn failed_meanwhile(&self) -> Option<&DialFailure> {
        self.last.as_ref().filter(|f| f.at >= self.since)
    }

    /// Notes how this turn's dial ended: `Some((reason, unreachable))` when
    /// it failed.
    pub(crate) fn ended(&mut self, failure: Option<(String, bool)>) {
        *self.last = failure.map(|(reason, unreachable)| DialFailure {
            at: Instant::now(),
            reason,
            unreachable,
        });
    }
}
