//! What a node needs from a CA, whether it runs in-process ([`crate::ca::Ca`])
//! or behind the CA service ([`crate::ca::client::CaClient`]).

use std::{fmt, future::Future, pin::Pin};

use rustls_pki_types::CertificateDer;

use crate::{
    bundle::{BundleError, TrustBundle},
    spiffe::SpiffeId,
    storage::StorageError,
    x509::Fingerprint,
};

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A request to certify the key of one workload identity.
#[derive(Clone, Debug)]
pub struct SignRequest {
    /// The identity asked for; the CSR must request exactly this one.
    pub identity: SpiffeId,
    /// A PKCS#10 CSR (DER) whose only SAN is `identity`'s URI.
    pub csr_der: Vec<u8>,
}

/// A signed workload certificate.
#[derive(Clone, Debug)]
pub struct Issued {
    /// Leaf first, then the intermediates up to (not including) a root.
    pub chain: Vec<CertificateDer<'static>>,
    /// The CA's trust bundle when it signed (carries a new root during a rotation).
    pub trust_bundle: TrustBundle,
}

pub trait CertificateAuthority: Send + Sync + fmt::Debug {
    fn sign(&self, request: SignRequest) -> BoxFuture<'_, Result<Issued, CaError>>;
    fn trust_bundle(&self) -> BoxFuture<'_, Result<TrustBundle, CaError>>;
}

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("CSR for {identity} refused: {reason}")]
    InvalidCsr { identity: String, reason: String },
    #[error(
        "CSR refused: it requests {requested:?} but the caller is authorised for {authorised}; \
         a CSR must carry exactly the authorised SPIFFE ID as its only SAN"
    )]
    IdentityMismatch {
        authorised: SpiffeId,
        requested: Vec<String>,
    },
    #[error(
        "CSR for {identity} refused: {identity} is not in this CA's trust domain {trust_domain:?}"
    )]
    ForeignTrustDomain {
        identity: SpiffeId,
        trust_domain: String,
    },
    #[error("CA refused the credential: {reason}")]
    Unauthenticated { reason: String },
    #[error("CA refused to issue {identity}: {reason}")]
    Forbidden { identity: String, reason: String },
    #[error("CA at {endpoint} is unavailable: {reason}; will retry")]
    Unavailable { endpoint: String, reason: String },
    #[error("CA at {endpoint} answered {status}: {message}")]
    Rejected {
        endpoint: String,
        status: u16,
        message: String,
    },
    #[error("CA configuration: {reason}")]
    Config { reason: String },
    /// A rotation step out of order (prepare twice, activate a root that
    /// is not the prepared one).
    #[error("root rotation refused: {reason}")]
    Rotation { reason: String },
    #[error("root {fingerprint} cannot be retired: {reason}")]
    Retire {
        fingerprint: Fingerprint,
        reason: String,
    },
    #[error("CA internal error while {action}: {reason}")]
    Internal {
        action: &'static str,
        reason: String,
    },
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error(transparent)]
    Bundle(#[from] BundleError),
}

impl CaError {
    /// Worth trying again later (the CA or its network is down), as opposed to
    /// a refusal that will repeat.
    pub fn is_transient(&self) -> bool {
        match self {
            CaError::Unavailable { .. } | CaError::Internal { .. } => true,
            CaError::Rejected { status, .. } => *status >= 500,
            _ => false,
        }
    }

    pub(crate) fn internal(action: &'static str) -> impl FnOnce(rcgen::Error) -> CaError {
        move |e| CaError::Internal {
            action,
            reason: e.to_string(),
        }
    }
}
