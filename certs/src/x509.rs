//! Reading certificates: the facts Sluice shows and checks (serial, validity,
//! issuer, fingerprint, the SPIFFE ID in the URI SAN).

use std::{fmt, str::FromStr};

use ring::digest;
use rustls_pki_types::CertificateDer;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use time::OffsetDateTime;
use x509_parser::{extensions::GeneralName, prelude::X509Certificate};

use crate::spiffe::{SpiffeId, SpiffeIdError};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CertError {
    #[error("certificate cannot be parsed as X.509 DER: {reason}")]
    Parse { reason: String },
    #[error(
        "certificate {serial} has no URI SAN; a workload certificate carries exactly one SPIFFE ID"
    )]
    NoSpiffeId { serial: String },
    #[error(
        "certificate {serial} has {count} URI SANs ({uris:?}); a workload certificate carries exactly one SPIFFE ID"
    )]
    MultipleUris {
        serial: String,
        count: usize,
        uris: Vec<String>,
    },
    #[error("certificate {serial} has an invalid SPIFFE ID in its URI SAN: {source}")]
    BadSpiffeId {
        serial: String,
        source: SpiffeIdError,
    },
}

/// SHA-256 of a certificate's DER encoding.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Fingerprint(pub [u8; 32]);

impl Fingerprint {
    pub fn of(der: &[u8]) -> Self {
        let d = digest::digest(&digest::SHA256, der);
        let mut out = [0; 32];
        out.copy_from_slice(d.as_ref());
        Self(out)
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex(&self.0))
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({self})")
    }
}

impl FromStr for Fingerprint {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim().trim_start_matches("sha256:");
        let bad = || format!("{s:?} is not a SHA-256 fingerprint (64 hex digits)");
        if s.len() != 64 || !s.is_ascii() {
            return Err(bad());
        }
        let mut out = [0; 32];
        for (i, b) in out.iter_mut().enumerate() {
            *b = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
        }
        Ok(Self(out))
    }
}

impl Serialize for Fingerprint {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Fingerprint {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// Lowercase hex without separators.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 15) as usize] as char);
    }
    s
}

/// What Sluice reports about one certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    /// Serial number, lowercase hex.
    pub serial: String,
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
    pub issuer: String,
    pub subject: String,
    pub fingerprint: Fingerprint,
    pub uri_sans: Vec<String>,
}

fn parse(der: &[u8]) -> Result<X509Certificate<'_>, CertError> {
    let (rest, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| CertError::Parse {
        reason: e.to_string(),
    })?;
    if !rest.is_empty() {
        return Err(CertError::Parse {
            reason: format!("{} trailing bytes after the certificate", rest.len()),
        });
    }
    Ok(cert)
}

fn uri_sans(cert: &X509Certificate<'_>) -> Result<Vec<String>, CertError> {
    let san = cert
        .subject_alternative_name()
        .map_err(|e| CertError::Parse {
            reason: format!("subject alternative name: {e}"),
        })?;
    Ok(san
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::URI(u) => Some(u.to_string()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default())
}

impl CertInfo {
    pub fn parse(der: &CertificateDer<'_>) -> Result<Self, CertError> {
        let cert = parse(der)?;
        Ok(Self {
            serial: hex(cert.raw_serial()),
            not_before: cert.validity().not_before.to_datetime(),
            not_after: cert.validity().not_after.to_datetime(),
            issuer: cert.issuer().to_string(),
            subject: cert.subject().to_string(),
            fingerprint: Fingerprint::of(der),
            uri_sans: uri_sans(&cert)?,
        })
    }

    /// The one SPIFFE ID of a workload certificate (X509-SVID: exactly one URI SAN).
    pub fn spiffe_id(&self) -> Result<SpiffeId, CertError> {
        id_from_uris(self.uri_sans.clone(), || self.serial.clone())
    }
}

fn id_from_uris(uris: Vec<String>, serial: impl Fn() -> String) -> Result<SpiffeId, CertError> {
    match uris.as_slice() {
        [] => Err(CertError::NoSpiffeId { serial: serial() }),
        [one] => one.parse().map_err(|source| CertError::BadSpiffeId {
            serial: serial(),
            source,
        }),
        many => Err(CertError::MultipleUris {
            serial: serial(),
            count: many.len(),
            uris: uris.clone(),
        }),
    }
}

/// The SPIFFE ID of a workload certificate. Reads only what it needs (this
/// runs in every handshake).
pub fn spiffe_id_of(der: &CertificateDer<'_>) -> Result<SpiffeId, CertError> {
    let cert = parse(der)?;
    id_from_uris(uri_sans(&cert)?, || hex(cert.raw_serial()))
}
