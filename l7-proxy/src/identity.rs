//! The seam between the proxy and the `certs` crate: where TLS configurations
//! and verified peer identities come from. The agent passes its
//! `certs::IdentityManager`; tests may pass anything else that implements
//! [`IdentityProvider`].

pub use certs::SpiffeId;

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
    /// Whether `identity`'s certificate is on its way (wanted, not issued
    /// yet): a tunnel for it waits for it a little rather than failing.
    fn awaiting(&self, _identity: &SpiffeId) -> bool {
        false
    }
}

impl IdentityProvider for certs::IdentityManager {
    fn client_config(
        &self,
        source: &SpiffeId,
        server: &SpiffeId,
    ) -> Result<Arc<rustls::ClientConfig>, IdentityError> {
        certs::IdentityManager::client_config(self, source, server)
            .map_err(|e| IdentityError(e.to_string()))
    }

    fn server_name(&self, server: &SpiffeId) -> Result<ServerName<'static>, IdentityError> {
        Ok(certs::server_name(server))
    }

    fn awaiting(&self, identity: &SpiffeId) -> bool {
        certs::IdentityManager::awaiting(self, identity)
    }

    fn server_config(&self) -> Result<Arc<rustls::ServerConfig>, IdentityError> {
        Ok(certs::IdentityManager::server_config(self))
    }

    fn peer(&self, conn: &rustls::CommonState) -> Result<(SpiffeId, TlsInfo), IdentityError> {
        let p = certs::peer_info(conn).map_err(|e| IdentityError(e.to_string()))?;
        Ok((
            p.identity,
            TlsInfo {
                version: p.protocol,
                cipher_suite: p.cipher_suite,
                peer_cert_not_after: u64::try_from(p.peer_not_after.unix_timestamp()).ok(),
            },
        ))
    }
}
