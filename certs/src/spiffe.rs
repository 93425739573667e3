//! SPIFFE IDs of workloads: `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
//!
//! Parsing follows the SPIFFE ID specification (trust domain charset and length,
//! no userinfo/port/query/fragment/percent-encoding, no empty or dot path
//! segments), then Sluice's shape: exactly the `ns` and `sa` segments.

use std::{fmt, str::FromStr, sync::Arc};

use ring::digest;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The trust domain used when none is configured.
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";

/// The DNS suffix of the SNI names that encode identities (see [`SpiffeId::sni`]).
pub const SNI_SUFFIX: &str = ".id.sluice";

/// Maximum length of a whole SPIFFE ID, in bytes (SPIFFE ID specification).
pub const MAX_ID_LEN: usize = 2048;
/// Maximum length of a trust domain name, in bytes (SPIFFE ID specification).
pub const MAX_TRUST_DOMAIN_LEN: usize = 255;

const SCHEME: &str = "spiffe://";

/// A workload identity. Cheap to clone; compares, hashes and orders by its
/// string form.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    uri: Arc<str>,
    // Byte ranges of the parts inside `uri` (at most MAX_ID_LEN).
    td_end: u16,
    ns: (u16, u16),
    sa: (u16, u16),
}

/// Which rule of the SPIFFE ID specification (or Sluice's ID shape) an input broke.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpiffeIdError {
    #[error("empty SPIFFE ID")]
    Empty,
    #[error("SPIFFE ID is {len} bytes; the limit is {MAX_ID_LEN}")]
    TooLong { len: usize },
    #[error("{input:?}: a SPIFFE ID starts with the lowercase scheme \"spiffe://\"")]
    Scheme { input: String },
    #[error("{input:?}: the trust domain is empty")]
    EmptyTrustDomain { input: String },
    #[error("{input:?}: the trust domain is {len} bytes; the limit is {MAX_TRUST_DOMAIN_LEN}")]
    TrustDomainTooLong { input: String, len: usize },
    #[error("{input:?}: a SPIFFE ID carries no port in its trust domain")]
    Port { input: String },
    #[error("{input:?}: a SPIFFE ID carries no userinfo (`@`) in its trust domain")]
    UserInfo { input: String },
    #[error(
        "{input:?}: character {ch:?} is not allowed in a trust domain (only lowercase a-z, 0-9, `.`, `-`, `_`)"
    )]
    TrustDomainChar { input: String, ch: char },
    #[error("{input:?}: a SPIFFE ID has no query (`?`)")]
    Query { input: String },
    #[error("{input:?}: a SPIFFE ID has no fragment (`#`)")]
    Fragment { input: String },
    #[error("{input:?}: percent-encoding is not allowed in a SPIFFE ID")]
    PercentEncoded { input: String },
    #[error("{input:?}: the path has an empty segment (`//` or a trailing `/`)")]
    EmptySegment { input: String },
    #[error("{input:?}: the path has a `.` or `..` segment")]
    DotSegment { input: String },
    #[error(
        "{input:?}: character {ch:?} is not allowed in a path segment (only a-z, A-Z, 0-9, `.`, `-`, `_`)"
    )]
    PathChar { input: String, ch: char },
    #[error("{input:?}: a workload identity has the path /ns/<namespace>/sa/<service-account>")]
    Shape { input: String },
    #[error("{what} {value:?} is not valid in a SPIFFE ID: {reason}")]
    Part {
        what: &'static str,
        value: String,
        reason: String,
    },
}

fn short(input: &str) -> String {
    // Errors quote the input; keep them readable when it is huge.
    const MAX: usize = 120;
    if input.len() <= MAX {
        return input.to_string();
    }
    let mut end = MAX;
    while !input.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &input[..end])
}

fn td_char_ok(c: char) -> bool {
    c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '-' | '_')
}

fn path_char_ok(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_')
}

fn check_trust_domain(input: &str, td: &str) -> Result<(), SpiffeIdError> {
    let owned = || short(input);
    if td.is_empty() {
        return Err(SpiffeIdError::EmptyTrustDomain { input: owned() });
    }
    if td.len() > MAX_TRUST_DOMAIN_LEN {
        return Err(SpiffeIdError::TrustDomainTooLong {
            input: owned(),
            len: td.len(),
        });
    }
    if td.contains('@') {
        return Err(SpiffeIdError::UserInfo { input: owned() });
    }
    if td.contains(':') {
        return Err(SpiffeIdError::Port { input: owned() });
    }
    if td.contains('%') {
        return Err(SpiffeIdError::PercentEncoded { input: owned() });
    }
    if let Some(ch) = td.chars().find(|c| !td_char_ok(*c)) {
        return Err(SpiffeIdError::TrustDomainChar { input: owned(), ch });
    }
    Ok(())
}

impl SpiffeId {
    /// Builds `spiffe://<trust_domain>/ns/<namespace>/sa/<service_account>`,
    /// checking each part.
    pub fn new(
        trust_domain: &str,
        namespace: &str,
        service_account: &str,
    ) -> Result<Self, SpiffeIdError> {
        for (what, value) in [
            ("namespace", namespace),
            ("service account", service_account),
        ] {
            if value.is_empty() || value.contains('/') {
                return Err(SpiffeIdError::Part {
                    what,
                    value: short(value),
                    reason: "it must be one non-empty path segment".into(),
                });
            }
        }
        format!("{SCHEME}{trust_domain}/ns/{namespace}/sa/{service_account}")
            .parse()
            .map_err(|e: SpiffeIdError| SpiffeIdError::Part {
                what: "identity part",
                value: short(&format!("{trust_domain}/{namespace}/{service_account}")),
                reason: e.to_string(),
            })
    }

    pub fn trust_domain(&self) -> &str {
        &self.uri[SCHEME.len()..self.td_end as usize]
    }

    pub fn namespace(&self) -> &str {
        &self.uri[self.ns.0 as usize..self.ns.1 as usize]
    }

    pub fn service_account(&self) -> &str {
        &self.uri[self.sa.0 as usize..self.sa.1 as usize]
    }

    pub fn as_str(&self) -> &str {
        &self.uri
    }

    /// A DNS-safe TLS server name that stands for this identity:
    /// `<32 hex digits>.id.sluice`, the first 128 bits of the SHA-256 of the
    /// ID. Deterministic, so the client can ask the inbound proxy for the
    /// certificate of one of its several local identities. (Service account
    /// names may contain dots and trust domains are long, so the ID itself
    /// cannot be a DNS label.)
    pub fn sni(&self) -> String {
        let d = digest::digest(&digest::SHA256, self.uri.as_bytes());
        let mut s = crate::x509::hex(&d.as_ref()[..16]);
        s.push_str(SNI_SUFFIX);
        s
    }
}

impl FromStr for SpiffeId {
    type Err = SpiffeIdError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let owned = || short(input);
        if input.is_empty() {
            return Err(SpiffeIdError::Empty);
        }
        if input.len() > MAX_ID_LEN {
            return Err(SpiffeIdError::TooLong { len: input.len() });
        }
        let Some(rest) = input.strip_prefix(SCHEME) else {
            return Err(SpiffeIdError::Scheme { input: owned() });
        };
        if input.contains('#') {
            return Err(SpiffeIdError::Fragment { input: owned() });
        }
        if input.contains('?') {
            return Err(SpiffeIdError::Query { input: owned() });
        }
        let (td, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        check_trust_domain(input, td)?;
        let td_end = SCHEME.len() + td.len();

        // Generic SPIFFE path rules first, so the error names the real rule.
        let mut segments = Vec::new();
        if !path.is_empty() {
            let mut offset = td_end + 1;
            for seg in path[1..].split('/') {
                if seg.is_empty() {
                    return Err(SpiffeIdError::EmptySegment { input: owned() });
                }
                if seg == "." || seg == ".." {
                    return Err(SpiffeIdError::DotSegment { input: owned() });
                }
                if seg.contains('%') {
                    return Err(SpiffeIdError::PercentEncoded { input: owned() });
                }
                if let Some(ch) = seg.chars().find(|c| !path_char_ok(*c)) {
                    return Err(SpiffeIdError::PathChar { input: owned(), ch });
                }
                segments.push((offset, offset + seg.len()));
                offset += seg.len() + 1;
            }
        }
        match segments.as_slice() {
            [k1, ns, k2, sa] if &input[k1.0..k1.1] == "ns" && &input[k2.0..k2.1] == "sa" => {
                // Offsets fit: the whole ID is at most MAX_ID_LEN bytes.
                let o = |x: usize| x as u16;
                Ok(SpiffeId {
                    uri: Arc::from(input),
                    td_end: o(td_end),
                    ns: (o(ns.0), o(ns.1)),
                    sa: (o(sa.0), o(sa.1)),
                })
            }
            _ => Err(SpiffeIdError::Shape { input: owned() }),
        }
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.uri)
    }
}

impl fmt::Debug for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SpiffeId({})", self.uri)
    }
}

impl AsRef<str> for SpiffeId {
    fn as_ref(&self) -> &str {
        &self.uri
    }
}

impl TryFrom<&str> for SpiffeId {
    type Error = SpiffeIdError;
    fn try_from(s: &str) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl TryFrom<String> for SpiffeId {
    type Error = SpiffeIdError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl Serialize for SpiffeId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.uri)
    }
}

impl<'de> Deserialize<'de> for SpiffeId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Checks a trust domain name on its own (for configuration).
pub fn validate_trust_domain(td: &str) -> Result<(), SpiffeIdError> {
    check_trust_domain(td, td)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(s: &str) -> SpiffeIdError {
        s.parse::<SpiffeId>().unwrap_err()
    }

    #[test]
    fn parses_and_prints_a_workload_id() {
        let id: SpiffeId = "spiffe://cluster.local/ns/shop/sa/cart.v2".parse().unwrap();
        assert_eq!(id.trust_domain(), "cluster.local");
        assert_eq!(id.namespace(), "shop");
        assert_eq!(id.service_account(), "cart.v2");
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/shop/sa/cart.v2");
        assert_eq!(
            SpiffeId::new(DEFAULT_TRUST_DOMAIN, "shop", "cart.v2").unwrap(),
            id
        );
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(json, "\"spiffe://cluster.local/ns/shop/sa/cart.v2\"");
        assert_eq!(serde_json::from_str::<SpiffeId>(&json).unwrap(), id);
        assert!(serde_json::from_str::<SpiffeId>("\"spiffe://X/ns/a/sa/b\"").is_err());
    }

    #[test]
    fn each_rule_has_its_own_error() {
        use SpiffeIdError as E;
        assert_eq!(err(""), E::Empty);
        assert!(matches!(err("http://td/ns/a/sa/b"), E::Scheme { .. }));
        assert!(matches!(err("SPIFFE://td/ns/a/sa/b"), E::Scheme { .. }));
        assert!(matches!(
            err("spiffe:///ns/a/sa/b"),
            E::EmptyTrustDomain { .. }
        ));
        assert!(matches!(err("spiffe://td:443/ns/a/sa/b"), E::Port { .. }));
        assert!(matches!(err("spiffe://u@td/ns/a/sa/b"), E::UserInfo { .. }));
        assert!(matches!(
            err("spiffe://Cluster.local/ns/a/sa/b"),
            E::TrustDomainChar { ch: 'C', .. }
        ));
        assert!(matches!(err("spiffe://td/ns/a/sa/b?x=1"), E::Query { .. }));
        assert!(matches!(err("spiffe://td/ns/a/sa/b#f"), E::Fragment { .. }));
        assert!(matches!(
            err("spiffe://td/ns/a%41/sa/b"),
            E::PercentEncoded { .. }
        ));
        assert!(matches!(
            err("spiffe://td/ns//sa/b"),
            E::EmptySegment { .. }
        ));
        assert!(matches!(
            err("spiffe://td/ns/a/sa/b/"),
            E::EmptySegment { .. }
        ));
        assert!(matches!(
            err("spiffe://td/ns/../sa/b"),
            E::DotSegment { .. }
        ));
        assert!(matches!(err("spiffe://td/ns/./sa/b"), E::DotSegment { .. }));
        assert!(matches!(
            err("spiffe://td/ns/a b/sa/b"),
            E::PathChar { ch: ' ', .. }
        ));
        assert!(matches!(err("spiffe://td"), E::Shape { .. }));
        assert!(matches!(err("spiffe://td/ns/a"), E::Shape { .. }));
        assert!(matches!(err("spiffe://td/ns/a/sa/b/c"), E::Shape { .. }));
        assert!(matches!(err("spiffe://td/sa/a/ns/b"), E::Shape { .. }));
        let long_td = "a".repeat(256);
        assert!(matches!(
            err(&format!("spiffe://{long_td}/ns/a/sa/b")),
            E::TrustDomainTooLong { len: 256, .. }
        ));
        let ok_td = "a".repeat(255);
        assert!(
            format!("spiffe://{ok_td}/ns/a/sa/b")
                .parse::<SpiffeId>()
                .is_ok()
        );
        let long = format!("spiffe://td/ns/a/sa/{}", "b".repeat(2048));
        assert!(matches!(err(&long), E::TooLong { .. }));
        // The message names the rule and the input.
        let msg = err("spiffe://td:8080/ns/a/sa/b").to_string();
        assert!(msg.contains("port") && msg.contains("td:8080"), "{msg}");
        assert!(SpiffeId::new("td", "a/b", "c").is_err());
        assert!(SpiffeId::new("TD", "a", "c").is_err());
    }

    #[test]
    fn sni_is_a_dns_name_and_distinct_per_identity() {
        let a = SpiffeId::new("cluster.local", "a", "x.y").unwrap();
        let b = SpiffeId::new("cluster.local", "a.x", "y").unwrap();
        assert_ne!(a.sni(), b.sni());
        assert_eq!(a.sni(), a.clone().sni());
        assert!(a.sni().ends_with(SNI_SUFFIX));
        assert_eq!(a.sni().len(), 32 + SNI_SUFFIX.len());
        assert!(rustls_pki_types::ServerName::try_from(a.sni()).is_ok());
    }
}
