//! One JSON line per request or connection, emitted as a `tracing` event with
//! target `sluice::access` (the agent routes that target to its access log).

use serde::Serialize;

use crate::config::SpiffeId;

pub const TARGET: &str = "sluice::access";

#[derive(Debug, Default, Serialize)]
pub struct AccessRecord<'a> {
    /// `outbound` or `inbound`.
    pub direction: &'a str,
    /// `http` or `tcp`.
    pub protocol: &'a str,
    pub source_addr: Option<String>,
    pub source_identity: Option<&'a SpiffeId>,
    pub destination: Option<String>,
    pub destination_addr: Option<String>,
    pub destination_identity: Option<&'a SpiffeId>,
    pub secured: bool,
    pub method: Option<&'a str>,
    pub path: Option<&'a str>,
    pub route: Option<&'a str>,
    pub status: Option<u16>,
    pub attempts: Option<u32>,
    pub bytes_sent: Option<u64>,
    pub bytes_received: Option<u64>,
    pub duration_ms: f64,
    /// Why the proxy answered or closed instead of the destination.
    pub reason: Option<&'a str>,
}

impl AccessRecord<'_> {
    pub fn emit(&self) {
        // Serialising costs more than the rest of a small request: skip it
        // when nobody listens.
        if !tracing::enabled!(target: TARGET, tracing::Level::INFO) {
            return;
        }
        match serde_json::to_string(self) {
            Ok(line) => tracing::info!(target: TARGET, "{line}"),
            Err(e) => tracing::warn!("access record not serialisable: {e}"),
        }
    }
}
