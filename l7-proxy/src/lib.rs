//! Sluice's per-node L7 proxy.
#![forbid(unsafe_code)]

pub mod accesslog;
pub mod balance;
pub mod config;
pub mod conntable;
pub mod identity;
pub mod io;
pub mod metrics;
pub mod policy;
pub mod router;
pub mod sniff;
pub mod state;
pub mod target;
