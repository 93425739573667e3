//! The seam between the proxy and the `certs` crate: where TLS configurations
//! and verified peer identities come from.
//!
//! PLACEHOLDER until `certs` is merged: `SpiffeId` is defined here with the
//! same string and serde form as `certs::SpiffeId`, which replaces it.

use std::{fmt, str::FromStr};

use serde::{Deserialize, Serialize};

/// `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct SpiffeId {
    trust_domain: String,
    namespace: String,
    service_account: String,
}

impl SpiffeId {
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }
    pub fn namespace(&self) -> &str {
        &self.namespace
    }
    pub fn service_account(&self) -> &str {
        &self.service_account
    }
}

impl FromStr for SpiffeId {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let rest = s
            .strip_prefix("spiffe://")
            .ok_or_else(|| format!("{s:?} is not a SPIFFE ID: it must start with spiffe://"))?;
        let parts: Vec<&str> = rest.split('/').collect();
        match parts.as_slice() {
            [td, "ns", ns, "sa", sa] if !td.is_empty() && !ns.is_empty() && !sa.is_empty() => {
                Ok(Self {
                    trust_domain: td.to_string(),
                    namespace: ns.to_string(),
                    service_account: sa.to_string(),
                })
            }
            _ => Err(format!(
                "{s:?} is not of the form spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>"
            )),
        }
    }
}

impl TryFrom<String> for SpiffeId {
    type Error = String;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<SpiffeId> for String {
    fn from(id: SpiffeId) -> Self {
        id.to_string()
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

use std::sync::Arc;

use rustls::pki_types::ServerName;

use crate::conntable::TlsInfo;

/// Something `certs` could not give: which identity, and why.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct IdentityError(pub String);

/// Where the proxy's TLS configurations come from: the agent's `certs`
/// identity manager. The one seam between the proxy and certificate handling.
pub trait IdentityProvider: Send + Sync + 'static {
    /// TLS 1.3 client configuration presenting `source`'s certificate and
    /// accepting only a server that proves `server`.
    fn client_config(
        &self,
        source: &SpiffeId,
        server: &SpiffeId,
    ) -> Result<Arc<rustls::ClientConfig>, IdentityError>;
    /// The SNI naming `server` (the peer picks its certificate by it).
    fn server_name(&self, server: &SpiffeId) -> Result<ServerName<'static>, IdentityError>;
    /// Server configuration for the inbound tunnel: a certificate per local
    /// workload chosen by SNI, client certificates required and verified.
    fn server_config(&self) -> Result<Arc<rustls::ServerConfig>, IdentityError>;
    /// The verified peer identity and TLS facts of a finished handshake.
    fn peer(&self, conn: &rustls::CommonState) -> Result<(SpiffeId, TlsInfo), IdentityError>;
}
