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
//!
//! ```
//! use std::sync::Arc;
//! use certs::{Ca, CaOptions, IdentityManager, IdentityOptions, SpiffeId, SystemClock};
//!
//! # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
//! let clock: certs::SharedClock = Arc::new(SystemClock);
//! let ca = Arc::new(Ca::generate(CaOptions::default(), clock.clone())?);
//! let node = IdentityManager::new(ca.clone(), ca.bundle(), clock, IdentityOptions::default());
//! let cart: SpiffeId = "spiffe://cluster.local/ns/shop/sa/cart".parse()?;
//! let pay = SpiffeId::new("cluster.local", "bank", "payments")?;
//! node.set_identities([cart.clone(), pay.clone()]).await?;
//! let _renewals = node.spawn(); // renew at half-life, refresh the bundle
//!
//! // Outbound: present `cart`, require the server to be `pay`.
//! let client = node.client_config(&cart, &pay)?;
//! let connector = tokio_rustls::TlsConnector::from(client);
//! let _server_name = certs::server_name(&pay); // the SNI that selects `pay`'s certificate
//! // Inbound (port 15008): one config for all local identities.
//! let acceptor = tokio_rustls::TlsAcceptor::from(node.server_config());
//! // After a handshake: `certs::peer_info(conn)` gives the verified peer
//! // identity, TLS version, cipher suite and the peer certificate's expiry.
//! # let _ = (connector, acceptor);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! # }).unwrap();
//! ```

#![forbid(unsafe_code)]

pub mod bundle;
pub mod ca;
pub mod clock;
#[doc(hidden)]
pub mod fuzzing;
mod https;
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
