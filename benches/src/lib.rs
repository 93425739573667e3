//! Support for Sluice's benchmarks: each benchmark measures Sluice and its
//! baseline (or peer) in the same run and writes its own section of
//! `benches/RESULTS.md`, with figures as ratios to that baseline.

pub mod certs_handshake;
pub mod certs_issue;
pub mod lb;
pub mod pin;
pub mod proxy;
pub mod report;
pub mod reset;
