//! Peer verification for both directions of the mTLS tunnel: the chain must
//! lead to a root of the current trust bundle at the injected clock's time,
//! and the leaf must carry exactly one SPIFFE ID of our trust domain. The
//! client side also requires one specific server identity.

use std::{fmt, sync::Arc, time::SystemTime};

use rustls::{
    CertificateError, CommonState, DigitallySignedStruct, DistinguishedName, OtherError,
    SignatureScheme,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::WebPkiSupportedAlgorithms,
    server::danger::{ClientCertVerified, ClientCertVerifier},
};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::{
    bundle::{SharedTrustBundle, TrustBundle},
    clock::{SharedClock, to_unix},
    spiffe::SpiffeId,
    x509::{CertError, CertInfo, Fingerprint},
};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error("the peer presented no certificate")]
    NoCertificate,
    #[error(
        "peer certificate {serial} expired at {not_after} ({} s before this node's clock, {now})",
        now.unix_timestamp() - not_after.unix_timestamp()
    )]
    Expired {
        serial: String,
        not_after: OffsetDateTime,
        /// This node's time when it checked.
        now: OffsetDateTime,
    },
    #[error(
        "peer certificate {serial} is not valid before {not_before}, {} s after this node's clock \
         ({now}): a clock behind the issuing CA's by more than the 5 minutes certificates are \
         backdated (check NTP on this node)",
        not_before.unix_timestamp() - now.unix_timestamp()
    )]
    NotYetValid {
        serial: String,
        not_before: OffsetDateTime,
        /// This node's time when it checked.
        now: OffsetDateTime,
    },
    #[error(
        "peer certificate {serial} does not chain to a root of the {trust_domain:?} trust bundle ({reason})"
    )]
    Untrusted {
        serial: String,
        trust_domain: String,
        reason: String,
    },
    #[error(transparent)]
    Identity(#[from] CertError),
    #[error("peer identity {identity} is outside our trust domain {trust_domain:?}")]
    ForeignTrustDomain {
        identity: SpiffeId,
        trust_domain: String,
    },
    #[error("peer is {actual}, but {expected} was expected")]
    UnexpectedIdentity {
        expected: SpiffeId,
        actual: SpiffeId,
    },
}

impl VerifyError {
    fn into_rustls(self) -> rustls::Error {
        // Standard cases keep rustls's own variants (and TLS alerts); ours
        // travel as `Other` so the message reaches the logs.
        let ce = match self {
            VerifyError::NoCertificate => return rustls::Error::NoCertificatesPresented,
            // The context variants say by how many seconds.
            VerifyError::Expired { not_after, now, .. } => CertificateError::ExpiredContext {
                time: unix_time(now),
                not_after: unix_time(not_after),
            },
            VerifyError::NotYetValid {
                not_before, now, ..
            } => CertificateError::NotValidYetContext {
                time: unix_time(now),
                not_before: unix_time(not_before),
            },
            other => CertificateError::Other(OtherError(Arc::new(other))),
        };
        rustls::Error::InvalidCertificate(ce)
    }
}

/// `at` without its fraction of a second, as certificates give times.
fn whole_seconds(at: SystemTime) -> OffsetDateTime {
    let at = OffsetDateTime::from(at);
    at.replace_nanosecond(0).unwrap_or(at)
}

/// `at` in whole seconds since the epoch (0 before it).
fn unix_time(at: OffsetDateTime) -> rustls::pki_types::UnixTime {
    rustls::pki_types::UnixTime::since_unix_epoch(std::time::Duration::from_secs(
        at.unix_timestamp().max(0) as u64,
    ))
}

/// Which extended key usage the leaf must allow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Usage {
    Server,
    Client,
}

/// A peer whose chain and identity were checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedPeer {
    pub identity: SpiffeId,
    pub leaf: CertInfo,
    /// The bundle root the chain ends at.
    pub root: Option<Fingerprint>,
}

pub(crate) fn algorithms() -> WebPkiSupportedAlgorithms {
    crate::provider().signature_verification_algorithms
}

/// Verifies a certificate chain (leaf first) against `bundle` at `now` and
/// returns the SPIFFE ID it proves, with the leaf's details.
pub fn verify_chain(
    bundle: &TrustBundle,
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    now: SystemTime,
    usage: Usage,
) -> Result<VerifiedPeer, VerifyError> {
    let (identity, root) = verify_identity(bundle, end_entity, intermediates, now, usage)?;
    Ok(VerifiedPeer {
        identity,
        leaf: CertInfo::parse(end_entity)?,
        root,
    })
}

/// The handshake path of [`verify_chain`]: the chain, then the SPIFFE ID,
/// without formatting the leaf's details unless something fails.
fn verify_identity(
    bundle: &TrustBundle,
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    now: SystemTime,
    usage: Usage,
) -> Result<(SpiffeId, Option<Fingerprint>), VerifyError> {
    let untrusted = |reason: String| match CertInfo::parse(end_entity) {
        Ok(leaf) => VerifyError::Untrusted {
            serial: leaf.serial,
            trust_domain: bundle.trust_domain().into(),
            reason,
        },
        Err(e) => VerifyError::Identity(e),
    };
    let ee = webpki::EndEntityCert::try_from(end_entity)
        .map_err(|e| untrusted(format!("unparseable leaf: {e}")))?;
    let eku = match usage {
        Usage::Server => webpki::KeyUsage::server_auth(),
        Usage::Client => webpki::KeyUsage::client_auth(),
    };
    let anchors = bundle.anchors();
    let path = ee
        .verify_for_usage(
            algorithms().all,
            anchors,
            intermediates,
            to_unix(now),
            eku,
            None,
            None,
        )
        .map_err(|e| match (e, CertInfo::parse(end_entity)) {
            (_, Err(e)) => VerifyError::Identity(e),
            (webpki::Error::CertExpired { .. }, Ok(leaf)) => VerifyError::Expired {
                serial: leaf.serial,
                not_after: leaf.not_after,
                now: whole_seconds(now),
            },
            (webpki::Error::CertNotValidYet { .. }, Ok(leaf)) => VerifyError::NotYetValid {
                serial: leaf.serial,
                not_before: leaf.not_before,
                now: whole_seconds(now),
            },
            (other, Ok(leaf)) => VerifyError::Untrusted {
                serial: leaf.serial,
                trust_domain: bundle.trust_domain().into(),
                reason: format!("{other}"),
            },
        })?;
    // webpki's trust anchors carry no validity: a root past its end (still
    // in a bundle after a rotation, its key perhaps no longer guarded)
    // must not vouch for a leaf made with its key today. Of the roots with
    // the anchor's name and key (a root renewed with its key), one valid
    // now will do.
    let anchor = path.anchor();
    let at = time::OffsetDateTime::from(now);
    let mut root = None;
    let mut lapsed = None;
    for (i, a) in anchors.iter().enumerate() {
        if a.subject_public_key_info != anchor.subject_public_key_info
            || a.subject != anchor.subject
        {
            continue;
        }
        let info = bundle.info_at(i);
        if info.not_before <= at && at <= info.not_after {
            root = Some(info.fingerprint);
            break;
        }
        lapsed.get_or_insert(info);
    }
    if root.is_none()
        && let Some(info) = lapsed
    {
        return Err(untrusted(format!(
            "its root {} is valid from {} to {} only",
            info.fingerprint, info.not_before, info.not_after
        )));
    }
    let identity = crate::x509::spiffe_id_of(end_entity)?;
    if identity.trust_domain() != bundle.trust_domain() {
        return Err(VerifyError::ForeignTrustDomain {
            identity,
            trust_domain: bundle.trust_domain().into(),
        });
    }
    Ok((identity, root))
}

/// Client side: the server must prove `expected`.
pub struct SpiffeServerVerifier {
    bundle: SharedTrustBundle,
    clock: SharedClock,
    expected: SpiffeId,
    algs: WebPkiSupportedAlgorithms,
}

impl SpiffeServerVerifier {
    pub fn new(bundle: SharedTrustBundle, clock: SharedClock, expected: SpiffeId) -> Self {
        Self {
            bundle,
            clock,
            expected,
            algs: algorithms(),
        }
    }
}

impl fmt::Debug for SpiffeServerVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SpiffeServerVerifier")
            .field("expected", &self.expected)
            .finish_non_exhaustive()
    }
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        // The SNI only selected the certificate; the SPIFFE ID is what we check.
        let bundle = self.bundle.load();
        let (identity, _) = verify_identity(
            &bundle,
            end_entity,
            intermediates,
            self.clock.now(),
            Usage::Server,
        )
        .map_err(VerifyError::into_rustls)?;
        if identity != self.expected {
            return Err(VerifyError::UnexpectedIdentity {
                expected: self.expected.clone(),
                actual: identity,
            }
            .into_rustls());
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// Server side: every client must present a certificate of our trust domain.
/// Which identities may reach what is policy, applied by the proxy with
/// [`peer_info`] after the handshake.
pub struct SpiffeClientVerifier {
    bundle: SharedTrustBundle,
    clock: SharedClock,
    algs: WebPkiSupportedAlgorithms,
}

impl SpiffeClientVerifier {
    pub fn new(bundle: SharedTrustBundle, clock: SharedClock) -> Self {
        Self {
            bundle,
            clock,
            algs: algorithms(),
        }
    }
}

impl fmt::Debug for SpiffeClientVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SpiffeClientVerifier")
            .finish_non_exhaustive()
    }
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // Every client holds certificates of this one trust domain.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let bundle = self.bundle.load();
        verify_identity(
            &bundle,
            end_entity,
            intermediates,
            self.clock.now(),
            Usage::Client,
        )
        .map_err(VerifyError::into_rustls)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// The facts about an established connection that `sluice tls` shows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerInfo {
    /// The peer's SPIFFE ID (verified during the handshake).
    pub identity: SpiffeId,
    /// For example `TLSv1.3`.
    pub protocol: String,
    /// For example `TLS13_AES_256_GCM_SHA384`.
    pub cipher_suite: String,
    /// The negotiated ALPN protocol, if any.
    pub alpn: Option<String>,
    pub peer_serial: String,
    #[serde(with = "time::serde::rfc3339")]
    pub peer_not_after: OffsetDateTime,
}

/// Reads the peer identity and TLS facts of a finished handshake, from either
/// side (`&ServerConnection` and `&ClientConnection` deref to `CommonState`).
/// The verifiers above already checked the chain; this re-reads the leaf.
pub fn peer_info(conn: &CommonState) -> Result<PeerInfo, VerifyError> {
    let leaf = conn
        .peer_certificates()
        .and_then(|c| c.first())
        .ok_or(VerifyError::NoCertificate)?;
    let info = CertInfo::parse(leaf)?;
    let identity = info.spiffe_id()?;
    let protocol = match conn.protocol_version() {
        Some(rustls::ProtocolVersion::TLSv1_3) => "TLSv1.3".to_string(),
        Some(rustls::ProtocolVersion::TLSv1_2) => "TLSv1.2".to_string(),
        Some(other) => format!("{other:?}"),
        None => "unknown".to_string(),
    };
    let cipher_suite = conn
        .negotiated_cipher_suite()
        .map(|s| {
            let s = s.suite();
            s.as_str().map_or_else(|| format!("{s:?}"), str::to_string)
        })
        .unwrap_or_else(|| "unknown".into());
    Ok(PeerInfo {
        identity,
        protocol,
        cipher_suite,
        alpn: conn
            .alpn_protocol()
            .map(|p| String::from_utf8_lossy(p).into_owned()),
        peer_serial: info.serial,
        peer_not_after: info.not_after,
    })
}

/// A readable reason for a failed handshake: our verifiers' messages (which
/// rustls only shows in Debug form) in their Display form.
pub fn describe(err: &rustls::Error) -> String {
    if let rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(inner))) = err
        && let Some(v) = inner.downcast_ref::<VerifyError>()
    {
        return format!("invalid peer certificate: {v}");
    }
    err.to_string()
}

/// [`describe`] for the `io::Error` that tokio-rustls returns.
pub fn describe_io(err: &std::io::Error) -> String {
    match err
        .get_ref()
        .and_then(|e| e.downcast_ref::<rustls::Error>())
    {
        Some(tls) => describe(tls),
        None => err.to_string(),
    }
}
