//! Sluice's per-node L7 proxy.
#![forbid(unsafe_code)]

pub mod config;
pub mod identity;
