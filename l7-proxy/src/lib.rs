//! Sluice's per-node L7 proxy.
//!
//! - [`outbound`]: the capture listener (15001): original destination, source
//!   workload, protocol detection, then HTTP routing ([`forward`]) or TCP.
//! - [`tunnel`]: HTTP/2 over mutual TLS 1.3 to peer proxies.
//! - [`inbound`]: the tunnel listener (15008): identity, policy, delivery.
//! - [`config`]: settings and the snapshot contract with the agent;
//!   [`proxy`]: the handle the agent embeds.
// One `ioctl` in `abort` (reading a socket's send queue) is allowed there.
#![deny(unsafe_code)]

mod abort;
pub mod accesslog;
pub mod balance;
pub mod batch;
pub mod body;
pub mod config;
pub mod connect;
pub mod conntable;
mod dial;
mod drain;
pub mod filters;
pub mod forward;
pub mod h1client;
pub mod h1server;
mod h2idle;
pub mod h2stream;
mod head_timer;
pub mod identity;
pub mod inbound;
pub mod io;
pub mod metrics;
pub mod outbound;
pub mod policy;
pub mod proxy;
mod replay;
pub mod router;
pub mod sniff;
pub mod state;
pub mod target;
mod throttle;
pub mod tunnel;
pub mod upgrade;
pub mod upstream;

/// The seed corpus of fuzz target `target` (`fuzz/corpus-seed/<target>`),
/// which the unit tests run each harness over.
#[cfg(test)]
pub(crate) fn fuzz_seeds(target: &str) -> Vec<Vec<u8>> {
    let dir = format!("{}/fuzz/corpus-seed/{target}", env!("CARGO_MANIFEST_DIR"));
    let seeds: Vec<Vec<u8>> = std::fs::read_dir(&dir)
        .expect("seed corpus present")
        .map(|entry| std::fs::read(entry.unwrap().path()).unwrap())
        .collect();
    assert!(!seeds.is_empty(), "no seeds in {dir}");
    seeds
}

pub use config::{ProxySettings, Snapshot};
pub use identity::{IdentityError, IdentityProvider};
pub use outbound::{MapOriginalDst, OriginalDst};
pub use proxy::{Proxy, ProxyBuilder, ProxyError};

/// A map for the per-request lookups (destinations, local workloads, pooled
/// connections, tunnels): SipHash, the std default, costs more than the rest
/// of such a lookup. Their keys cannot be multiplied by a peer, which is
/// what flooding a fast seeded hash would take: they come from the snapshot
/// (bounded by the API server), or are a pooled connection's address, a
/// workload's IP from the snapshot with a port the caller chose, pooled only
/// once a connection to it succeeded (its listening ports, a handful).
/// Maps a peer fills as it likes (per-address handshake counts) keep the
/// default.
pub(crate) type FastMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;
/// The set counterpart of [`FastMap`].
pub(crate) type FastSet<T> = std::collections::HashSet<T, foldhash::fast::RandomState>;
