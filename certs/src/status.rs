//! What the CLI shows about identities and the trust bundle (`sluice status`,
//! `sluice workloads`). Plain serialisable data.

use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::{spiffe::SpiffeId, x509::Fingerprint};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CertState {
    /// Inside its validity period with plenty of time left.
    Valid,
    /// Still valid but inside the expiry window: renewal is overdue or failing.
    Expiring,
    /// Past not-after (or not yet valid): peers reject it.
    Expired,
    NotYetValid,
}

impl CertState {
    /// The state at `now` of a certificate valid over `[not_before, not_after]`
    /// that counts as expiring during the last `window` of its life.
    pub fn at(
        now: SystemTime,
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
        window: Duration,
    ) -> Self {
        let now = OffsetDateTime::from(now);
        if now < not_before {
            CertState::NotYetValid
        } else if now > not_after {
            CertState::Expired
        } else if not_after - now < window {
            CertState::Expiring
        } else {
            CertState::Valid
        }
    }
}

impl std::fmt::Display for CertState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            CertState::Valid => "valid",
            CertState::Expiring => "expiring",
            CertState::Expired => "expired",
            CertState::NotYetValid => "not-yet-valid",
        })
    }
}

/// One local workload identity held by the node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdentityStatus {
    pub identity: SpiffeId,
    /// Absent while the first certificate has not been obtained.
    pub certificate: Option<CertificateStatus>,
    /// When the next renewal attempt is planned.
    #[serde(with = "time::serde::rfc3339::option")]
    pub next_renewal: Option<OffsetDateTime>,
    /// The last failure to obtain or renew, cleared on success.
    pub last_error: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertificateStatus {
    /// Lowercase hex.
    pub serial: String,
    #[serde(with = "time::serde::rfc3339")]
    pub not_before: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub not_after: OffsetDateTime,
    pub issuer: String,
    /// The trust-bundle root this certificate chains to.
    pub root: Option<Fingerprint>,
    pub state: CertState,
}

/// The roots this node trusts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BundleStatus {
    pub trust_domain: String,
    pub roots: Vec<RootStatus>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RootStatus {
    pub fingerprint: Fingerprint,
    pub subject: String,
    #[serde(with = "time::serde::rfc3339")]
    pub not_before: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub not_after: OffsetDateTime,
    /// The root new certificates are issued under; the others are kept only
    /// while a rotation completes.
    pub active: bool,
    pub state: CertState,
}
