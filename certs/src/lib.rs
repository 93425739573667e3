//! Workload identity for Sluice: SPIFFE IDs, the CA (in-process or over
//! HTTPS), certificate issuance and rotation on the node, and the rustls
//! configs and verifiers of the mutual TLS tunnel between node proxies.
//!
//! - [`spiffe`]: [`SpiffeId`] and its SNI encoding.
//! - [`ca`]: the [`Ca`](ca::Ca), the [`CertificateAuthority`](ca::CertificateAuthority)
//!   trait, the CA service, its client and the caller checks.
//! - [`identity`]: the node's [`IdentityManager`](identity::IdentityManager).
//! - [`verify`]: the rustls verifiers and [`peer_info`](verify::peer_info).
//! - [`bundle`]: the [`TrustBundle`](bundle::TrustBundle) of trusted roots.
//! - [`status`]: what the CLI shows.

#![forbid(unsafe_code)]

pub mod bundle;
pub mod ca;
pub mod clock;
#[doc(hidden)]
pub mod fuzzing;
pub mod identity;
pub mod spiffe;
pub mod status;
pub mod storage;
pub mod verify;
pub mod x509;

use std::sync::{Arc, OnceLock};

pub use bundle::{SharedTrustBundle, TrustBundle};
pub use ca::{Ca, CaError, CaOptions, CertificateAuthority};
pub use clock::{Clock, ManualClock, SharedClock, SystemClock};
pub use identity::{IdentityError, IdentityManager, IdentityOptions, server_name};
pub use spiffe::{DEFAULT_TRUST_DOMAIN, SpiffeId, SpiffeIdError};
pub use verify::{PeerInfo, VerifyError, peer_info};

/// The rustls crypto provider Sluice uses everywhere (ring).
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    static P: OnceLock<Arc<rustls::crypto::CryptoProvider>> = OnceLock::new();
    P.get_or_init(|| Arc::new(rustls::crypto::ring::default_provider()))
        .clone()
}
