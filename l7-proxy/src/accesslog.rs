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
    /// A gRPC call's status, as the `grpc_status` label of
    /// `sluice_requests_total` has it; absent for other requests.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grpc_status: Option<&'a str>,
}

/// Whether access records are wanted; build them only then.
pub fn enabled() -> bool {
    tracing::enabled!(target: TARGET, tracing::Level::INFO)
}

impl AccessRecord<'_> {
    /// The record of a gRPC call whose status is still to come, to be
    /// emitted with it ([`Deferred::emit`]); `None` when nobody listens.
    pub fn defer(&self) -> Option<Deferred> {
        if !enabled() {
            return None;
        }
        serde_json::to_value(self).ok().map(Deferred)
    }

    pub fn emit(&self) {
        // Serialising costs more than the rest of a small request: skip it
        // when nobody listens.
        if !enabled() {
            return;
        }
        write(self);
    }
}

fn write(record: &impl Serialize) {
    match serde_json::to_string(record) {
        Ok(line) => tracing::info!(target: TARGET, "{line}"),
        Err(e) => tracing::warn!("access record not serialisable: {e}"),
    }
}

/// Why a connection's record says it ended when the proxy's shutdown cut
/// it (its task aborted past the drain timeout).
pub const CUT_AT_SHUTDOWN: &str = "the proxy's shutdown cut it (drain timeout over)";

/// A connection's record, written once with the reason it ended
/// ([`OnEnd::log`]), or with [`CUT_AT_SHUTDOWN`] if it is dropped first: a
/// relay whose task the proxy's shutdown aborts never reaches its own line,
/// and must not vanish from the log. Not on a panic (logged as what it is).
pub struct OnEnd<F: FnOnce(Option<&str>)>(Option<F>);

impl<F: FnOnce(Option<&str>)> OnEnd<F> {
    pub fn new(emit: F) -> Self {
        OnEnd(Some(emit))
    }

    /// Writes the record: `reason` why it ended, if not cleanly.
    pub fn log(mut self, reason: Option<&str>) {
        if let Some(emit) = self.0.take() {
            emit(reason);
        }
    }
}

impl<F: FnOnce(Option<&str>)> Drop for OnEnd<F> {
    fn drop(&mut self) {
        if let Some(emit) = self.0.take()
            && !std::thread::panicking()
        {
            emit(Some(CUT_AT_SHUTDOWN));
        }
    }
}

/// An access record held until its gRPC call's status is known.
#[derive(Debug)]
pub struct Deferred(serde_json::Value);

impl Deferred {
    pub fn emit(mut self, grpc_status: &str) {
        self.0["grpc_status"] = grpc_status.into();
        write(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_is_one_json_line_with_both_identities() {
        let src: SpiffeId = "spiffe://cluster.local/ns/shop/sa/web".parse().unwrap();
        let dst: SpiffeId = "spiffe://cluster.local/ns/shop/sa/cart".parse().unwrap();
        let r = AccessRecord {
            direction: "outbound",
            protocol: "http",
            source_identity: Some(&src),
            destination_identity: Some(&dst),
            secured: true,
            method: Some("GET"),
            path: Some("/a\nb"),
            status: Some(200),
            ..Default::default()
        };
        let line = serde_json::to_string(&r).unwrap();
        assert!(!line.contains('\n'), "{line}");
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["source_identity"], src.to_string());
        assert_eq!(v["destination_identity"], dst.to_string());
        assert_eq!(
            (v["status"].as_u64(), v["secured"].as_bool()),
            (Some(200), Some(true))
        );
    }
}
