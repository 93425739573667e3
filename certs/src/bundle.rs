//! The trust bundle: every root this trust domain accepts. During a root
//! rotation it holds the old and the new root; the first root is the one new
//! certificates are issued under.

use std::{sync::Arc, time::Duration, time::SystemTime};

use arc_swap::ArcSwap;
use rustls_pki_types::{CertificateDer, TrustAnchor};

use crate::{
    spiffe::{self, SpiffeIdError},
    status::{BundleStatus, CertState, RootStatus},
    storage::{self, StorageError},
    x509::{CertError, CertInfo, Fingerprint},
};

/// Roots count as expiring in their last 30 days.
pub const ROOT_EXPIRY_WINDOW: Duration = Duration::from_secs(30 * 24 * 3600);

#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("trust bundle has no root certificate")]
    Empty,
    #[error("trust bundle for {trust_domain:?}: invalid trust domain: {source}")]
    TrustDomain {
        trust_domain: String,
        source: SpiffeIdError,
    },
    #[error("trust bundle root #{index}: {source}")]
    Cert { index: usize, source: CertError },
    #[error("trust bundle root #{index} ({fingerprint}) is not usable as a trust anchor: {reason}")]
    Anchor {
        index: usize,
        fingerprint: Fingerprint,
        reason: String,
    },
    #[error(transparent)]
    Pem(#[from] StorageError),
}

#[derive(Clone, Debug)]
struct Root {
    der: CertificateDer<'static>,
    info: CertInfo,
}

#[derive(Clone, Debug)]
pub struct TrustBundle {
    trust_domain: String,
    roots: Vec<Root>,
    anchors: Vec<TrustAnchor<'static>>,
}

impl PartialEq for TrustBundle {
    fn eq(&self, other: &Self) -> bool {
        self.trust_domain == other.trust_domain && self.fingerprints() == other.fingerprints()
    }
}
impl Eq for TrustBundle {}

impl TrustBundle {
    /// `roots[0]` is the active root. Duplicates are dropped.
    pub fn new(
        trust_domain: &str,
        roots: impl IntoIterator<Item = CertificateDer<'static>>,
    ) -> Result<Self, BundleError> {
        spiffe::validate_trust_domain(trust_domain).map_err(|source| BundleError::TrustDomain {
            trust_domain: trust_domain.into(),
            source,
        })?;
        let mut out = Self {
            trust_domain: trust_domain.into(),
            roots: Vec::new(),
            anchors: Vec::new(),
        };
        for (index, der) in roots.into_iter().enumerate() {
            let info =
                CertInfo::parse(&der).map_err(|source| BundleError::Cert { index, source })?;
            if out.contains(&info.fingerprint) {
                continue;
            }
            let anchor = webpki::anchor_from_trusted_cert(&der)
                .map_err(|e| BundleError::Anchor {
                    index,
                    fingerprint: info.fingerprint,
                    reason: format!("{e:?}"),
                })?
                .to_owned();
            out.anchors.push(anchor);
            out.roots.push(Root { der, info });
        }
        if out.roots.is_empty() {
            return Err(BundleError::Empty);
        }
        Ok(out)
    }

    pub fn from_pem(trust_domain: &str, pem: &str) -> Result<Self, BundleError> {
        Self::new(trust_domain, storage::certs_from_pem("trust bundle", pem)?)
    }

    pub fn to_pem(&self) -> String {
        storage::certs_to_pem(&self.roots().cloned().collect::<Vec<_>>())
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    pub fn roots(&self) -> impl Iterator<Item = &CertificateDer<'static>> {
        self.roots.iter().map(|r| &r.der)
    }

    /// The roots valid at `now` (one past its end vouches for nothing).
    pub fn roots_valid_at(
        &self,
        now: std::time::SystemTime,
    ) -> impl Iterator<Item = &CertificateDer<'static>> {
        let at = time::OffsetDateTime::from(now);
        self.roots
            .iter()
            .filter(move |r| r.info.not_before <= at && at <= r.info.not_after)
            .map(|r| &r.der)
    }

    pub(crate) fn anchors(&self) -> &[TrustAnchor<'static>] {
        &self.anchors
    }

    pub fn fingerprints(&self) -> Vec<Fingerprint> {
        self.roots.iter().map(|r| r.info.fingerprint).collect()
    }

    pub(crate) fn info_at(&self, i: usize) -> &CertInfo {
        &self.roots[i].info
    }

    /// The root new certificates are issued under.
    pub fn active_root(&self) -> Fingerprint {
        self.roots[0].info.fingerprint
    }

    pub fn contains(&self, fp: &Fingerprint) -> bool {
        self.roots.iter().any(|r| &r.info.fingerprint == fp)
    }

    pub fn status(&self, now: SystemTime) -> BundleStatus {
        BundleStatus {
            trust_domain: self.trust_domain.clone(),
            roots: self
                .roots
                .iter()
                .enumerate()
                .map(|(i, r)| RootStatus {
                    fingerprint: r.info.fingerprint,
                    subject: r.info.subject.clone(),
                    not_before: r.info.not_before,
                    not_after: r.info.not_after,
                    active: i == 0,
                    state: CertState::at(
                        now,
                        r.info.not_before,
                        r.info.not_after,
                        ROOT_EXPIRY_WINDOW,
                    ),
                })
                .collect(),
        }
    }
}

/// A trust bundle that verifiers read on every handshake and the identity
/// manager replaces when the CA's roots change.
pub type SharedTrustBundle = Arc<ArcSwap<TrustBundle>>;

pub fn shared(bundle: TrustBundle) -> SharedTrustBundle {
    Arc::new(ArcSwap::from_pointee(bundle))
}
