//! Test support: CAs, node identity managers and a loopback TLS handshake
//! that reports what each side saw.
#![allow(dead_code)]

use std::{sync::Arc, time::Duration};

use certs::{
    Ca, CaOptions, IdentityManager, IdentityOptions, ManualClock, PeerInfo, SharedClock, SpiffeId,
    ca::CaPem, peer_info, storage::PrivateKeyPem,
};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
use rustls::{ClientConfig, ServerConfig};
use rustls_pki_types::ServerName;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

pub const TD: &str = "cluster.local";

pub fn id(ns: &str, sa: &str) -> SpiffeId {
    SpiffeId::new(TD, ns, sa).unwrap()
}

pub fn clock() -> ManualClock {
    ManualClock::new()
}

pub fn shared(c: &ManualClock) -> SharedClock {
    Arc::new(c.clone())
}

pub fn ca(clock: &ManualClock) -> Arc<Ca> {
    Arc::new(Ca::generate(CaOptions::default(), shared(clock)).unwrap())
}

/// A root made by the test itself, so the test can also sign malformed leaves.
pub struct TestRoot {
    pub cert_pem: String,
    pub key: KeyPair,
    pub params: CertificateParams,
}

impl TestRoot {
    pub fn new(cn: &str) -> Self {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, cn);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let cert = params.self_signed(&key).unwrap();
        Self {
            cert_pem: cert.pem(),
            key,
            params,
        }
    }

    pub fn ca(&self, td: &str, clock: &ManualClock) -> Arc<Ca> {
        Arc::new(
            Ca::from_pem(
                CaOptions {
                    trust_domain: td.into(),
                    ..CaOptions::default()
                },
                shared(clock),
                CaPem {
                    root_cert: self.cert_pem.clone(),
                    root_key: Some(PrivateKeyPem::new(self.key.serialize_pem())),
                    ..CaPem::default()
                },
            )
            .unwrap(),
        )
    }

    pub fn issuer(&self) -> rcgen::Issuer<'_, &KeyPair> {
        rcgen::Issuer::from_params(&self.params, &self.key)
    }
}

pub fn fast_opts() -> IdentityOptions {
    IdentityOptions {
        max_idle: Duration::from_millis(20),
        ..IdentityOptions::default()
    }
}

/// A node holding `ids`, with certificates from `ca`.
pub async fn node(ca: &Arc<Ca>, clock: &ManualClock, ids: &[SpiffeId]) -> IdentityManager {
    let m = IdentityManager::new(ca.clone(), ca.bundle(), shared(clock), fast_opts());
    let report = m.set_identities(ids.iter().cloned()).await.unwrap();
    assert!(report.failed.is_empty(), "{:?}", report.failed);
    m
}

#[derive(Debug)]
pub struct Outcome {
    /// What the client saw of the server, or why the exchange failed.
    pub client: Result<PeerInfo, String>,
    /// What the server saw of the client, or why the handshake failed.
    pub server: Result<PeerInfo, String>,
}

impl Outcome {
    pub fn ok(self) -> (PeerInfo, PeerInfo) {
        match (self.client, self.server) {
            (Ok(c), Ok(s)) => (c, s),
            other => panic!("handshake failed: {other:?}"),
        }
    }

    pub fn server_error(&self) -> String {
        self.server
            .clone()
            .expect_err("the server accepted the client")
    }

    pub fn client_error(&self) -> String {
        self.client
            .clone()
            .expect_err("the client accepted the server")
    }
}

/// A TLS connection over loopback; on success the client sends `ping` and
/// the server answers `pong`, so both sides have really finished.
pub async fn handshake(
    client: Arc<ClientConfig>,
    name: ServerName<'static>,
    server: Arc<ServerConfig>,
) -> Outcome {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server_task = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.map_err(|e| e.to_string())?;
        let mut tls = tokio_rustls::TlsAcceptor::from(server)
            .accept(tcp)
            .await
            .map_err(|e| certs::verify::describe_io(&e))?;
        let info = peer_info(tls.get_ref().1).map_err(|e| e.to_string())?;
        let mut buf = [0u8; 4];
        tls.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
        assert_eq!(&buf, b"ping");
        tls.write_all(b"pong").await.map_err(|e| e.to_string())?;
        tls.shutdown().await.map_err(|e| e.to_string())?;
        Ok::<_, String>(info)
    });
    let client_side = async {
        let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        let mut tls = tokio_rustls::TlsConnector::from(client)
            .connect(name, tcp)
            .await
            .map_err(|e| certs::verify::describe_io(&e))?;
        tls.write_all(b"ping").await.map_err(|e| e.to_string())?;
        let mut buf = [0u8; 4];
        // In TLS 1.3 the server judges the client certificate after the
        // client's handshake completed: a refusal shows up here.
        tls.read_exact(&mut buf)
            .await
            .map_err(|e| certs::verify::describe_io(&e))?;
        assert_eq!(&buf, b"pong");
        peer_info(tls.get_ref().1).map_err(|e| e.to_string())
    };
    let client = tokio::time::timeout(Duration::from_secs(10), client_side)
        .await
        .unwrap_or_else(|_| Err("client timed out".into()));
    let server = tokio::time::timeout(Duration::from_secs(10), server_task)
        .await
        .map(|j| j.unwrap())
        .unwrap_or_else(|_| Err("server timed out".into()));
    Outcome { client, server }
}

/// Handshake from `src` on `client` to `dst` on `server`.
pub async fn tunnel(
    client: &IdentityManager,
    src: &SpiffeId,
    server: &IdentityManager,
    dst: &SpiffeId,
) -> Outcome {
    let cfg = client.client_config(src, dst).unwrap();
    handshake(cfg, certs::server_name(dst), server.server_config()).await
}
