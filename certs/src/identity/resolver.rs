//! How rustls finds the certificate to present: the client side by the
//! source workload identity of the connection, the server side by the SNI
//! name the client sent ([`SpiffeId::sni`]). Both read the live certificate
//! set on every handshake, so renewals apply without rebuilding configs.

use std::{collections::HashMap, fmt, sync::Arc};

use arc_swap::ArcSwap;
use rustls::{
    client::ResolvesClientCert,
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};

use crate::{spiffe::SpiffeId, x509::CertInfo, x509::Fingerprint};

/// A certificate in use.
pub(crate) struct LiveCert {
    pub key: Arc<CertifiedKey>,
    pub info: CertInfo,
    pub root: Option<Fingerprint>,
}

/// The certificates presented right now, swapped whole on each change.
#[derive(Default)]
pub(crate) struct LiveSet {
    pub by_id: HashMap<SpiffeId, Arc<LiveCert>>,
    pub by_sni: HashMap<String, SpiffeId>,
}

pub(crate) type SharedLiveSet = Arc<ArcSwap<LiveSet>>;

pub(crate) struct ClientResolver {
    pub live: SharedLiveSet,
    pub source: SpiffeId,
}

impl fmt::Debug for ClientResolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientResolver")
            .field("source", &self.source)
            .finish()
    }
}

impl ResolvesClientCert for ClientResolver {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        // None (identity dropped meanwhile) sends no certificate; the server
        // then refuses the handshake, which is what should happen.
        self.live
            .load()
            .by_id
            .get(&self.source)
            .map(|c| c.key.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

pub(crate) struct ServerResolver {
    pub live: SharedLiveSet,
}

impl fmt::Debug for ServerResolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerResolver").finish_non_exhaustive()
    }
}

impl ResolvesServerCert for ServerResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let sni = hello.server_name()?;
        let live = self.live.load();
        let id = live.by_sni.get(sni)?;
        let cert = live.by_id.get(id);
        if cert.is_none() {
            tracing::debug!(%sni, "no certificate for the requested identity");
        }
        cert.map(|c| c.key.clone())
    }
}
