//! The CA service for clusters: HTTPS (HTTP/1.1 over rustls) in front of a
//! [`Ca`]. A node agent posts a CSR with a bearer credential; the
//! authenticator names the caller's node and the authoriser checks that the
//! identity runs there.
//!
//! - `POST /v1/sign`: [`SignRequestBody`] → [`SignResponseBody`]
//! - `GET /v1/trust-bundle`: → [`BundleBody`]
//!
//! Errors are `{"error": "..."}` with 400 (bad request or CSR), 401 (bad
//! credential), 403 (identity not on the caller's node), 503 (the
//! authenticator's backend is down).

use std::{convert::Infallible, net::SocketAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::{body::Incoming, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use rustls::ServerConfig;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde::{Deserialize, Serialize};
use tokio::{net::TcpListener, sync::oneshot, task::JoinSet};

use super::{
    Ca, CaError,
    auth::{AuthError, Authenticator, Authoriser},
};
use crate::{bundle::TrustBundle, spiffe::SpiffeId, storage};

pub const SIGN_PATH: &str = "/v1/sign";
pub const BUNDLE_PATH: &str = "/v1/trust-bundle";
/// Largest request body accepted (a CSR is under 1 KiB).
pub const MAX_REQUEST: usize = 64 * 1024;
/// Time a caller has to send a request body once its head is in.
pub const BODY_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// Connections the CA service holds at once (one per node agent is the
/// norm; a node may briefly hold a few).
pub const MAX_CONNECTIONS: usize = 4096;
/// Connections one address holds at once: an agent holds at most its
/// certificate requests in flight (16 by default, across all its rounds)
/// and a bundle refresh, and no single client can take the whole
/// [`MAX_CONNECTIONS`] (and with it the TokenReview slots) from the others.
pub const MAX_CONNECTIONS_PER_PEER: usize = 32;

/// Open connections per client address; a [`PeerSlot`] gives its place back.
type PeerCounts = Arc<std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>>;

/// One connection's place in its address's count.
struct PeerSlot {
    counts: PeerCounts,
    ip: std::net::IpAddr,
}

impl PeerSlot {
    fn take(counts: &PeerCounts, ip: std::net::IpAddr) -> Option<PeerSlot> {
        let mut map = counts.lock().unwrap_or_else(|e| e.into_inner());
        let n = map.entry(ip).or_default();
        if *n >= MAX_CONNECTIONS_PER_PEER {
            return None;
        }
        *n += 1;
        Some(PeerSlot {
            counts: counts.clone(),
            ip,
        })
    }
}

impl Drop for PeerSlot {
    fn drop(&mut self) {
        let mut map = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = map.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.ip);
            }
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SignRequestBody {
    pub identity: String,
    /// PEM `CERTIFICATE REQUEST`.
    pub csr: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SignResponseBody {
    /// PEM, leaf first, then intermediates.
    pub chain: String,
    pub trust_bundle: BundleBody,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BundleBody {
    pub trust_domain: String,
    /// PEM, the active root first.
    pub roots: String,
}

impl From<&TrustBundle> for BundleBody {
    fn from(b: &TrustBundle) -> Self {
        Self {
            trust_domain: b.trust_domain().into(),
            roots: b.to_pem(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("CA service: binding {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("CA service TLS configuration: {reason}")]
    Tls { reason: String },
}

/// The request handler: the CA and who may use it.
#[derive(Debug, Clone)]
pub struct CaService {
    ca: Arc<Ca>,
    authenticator: Arc<dyn Authenticator>,
    authoriser: Arc<dyn Authoriser>,
}

/// TLS for the service: TLS 1.3 and 1.2 (HTTPS clients beyond our own may
/// call it), no client certificates, ALPN `http/1.1`.
pub fn serving_tls(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<Arc<ServerConfig>, ServiceError> {
    let mut cfg = ServerConfig::builder_with_provider(crate::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| ServiceError::Tls {
            reason: e.to_string(),
        })?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| ServiceError::Tls {
            reason: e.to_string(),
        })?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

fn json<T: Serialize>(status: StatusCode, body: &T) -> Response<Full<Bytes>> {
    let bytes = serde_json::to_vec(body).unwrap_or_else(|_| b"{}".to_vec());
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(bytes)))
        .expect("static response parts are valid")
}

fn error(status: StatusCode, msg: impl Into<String>) -> Response<Full<Bytes>> {
    json(status, &ErrorBody { error: msg.into() })
}

fn auth_status(e: &AuthError) -> StatusCode {
    match e {
        AuthError::Unauthenticated { .. } => StatusCode::UNAUTHORIZED,
        AuthError::Forbidden { .. } => StatusCode::FORBIDDEN,
        AuthError::Unavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
    }
}

impl CaService {
    pub fn new(
        ca: Arc<Ca>,
        authenticator: Arc<dyn Authenticator>,
        authoriser: Arc<dyn Authoriser>,
    ) -> Self {
        Self {
            ca,
            authenticator,
            authoriser,
        }
    }

    async fn handle(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let token = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(|t| t.trim().to_string());
        let route = (req.method().clone(), req.uri().path().to_string());
        let known = matches!(
            (&route.0, route.1.as_str()),
            (&Method::POST, SIGN_PATH) | (&Method::GET, BUNDLE_PATH)
        );
        if !known {
            return error(
                StatusCode::NOT_FOUND,
                format!("no route {} {}", route.0, route.1),
            );
        }
        let Some(token) = token else {
            return error(
                StatusCode::UNAUTHORIZED,
                "missing `Authorization: Bearer <token>`",
            );
        };
        let caller = match self.authenticator.authenticate(&token).await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, path = %route.1, "CA request refused: authentication");
                return error(auth_status(&e), e.to_string());
            }
        };
        if route.0 == Method::GET {
            return json(StatusCode::OK, &BundleBody::from(&self.ca.bundle()));
        }
        // A caller that sends its head and then trickles (or stops) must not
        // hold one of the service's connections.
        let read = Limited::new(req.into_body(), MAX_REQUEST).collect();
        let body = match tokio::time::timeout(BODY_READ_TIMEOUT, read).await {
            Ok(Ok(b)) => b.to_bytes(),
            Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
                return error(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!("request body: {e} (limit {MAX_REQUEST} bytes)"),
                );
            }
            Ok(Err(e)) => {
                return error(StatusCode::BAD_REQUEST, format!("request body: {e}"));
            }
            Err(_) => {
                return error(
                    StatusCode::REQUEST_TIMEOUT,
                    format!("request body not received within {BODY_READ_TIMEOUT:?}"),
                );
            }
        };
        let body: SignRequestBody = match serde_json::from_slice(&body) {
            Ok(b) => b,
            Err(e) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    format!("request body is not a sign request: {e}"),
                );
            }
        };
        let identity: SpiffeId = match body.identity.parse() {
            Ok(id) => id,
            Err(e) => return error(StatusCode::BAD_REQUEST, format!("identity: {e}")),
        };
        if let Err(e) = self.authoriser.authorise(&caller, &identity) {
            tracing::warn!(node = %caller.node, subject = %caller.subject, %identity, error = %e, "CA request refused: authorisation");
            return error(auth_status(&e), e.to_string());
        }
        let csr = match pem::parse(&body.csr) {
            Ok(p) if p.tag() == "CERTIFICATE REQUEST" => p.into_contents(),
            Ok(p) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    format!(
                        "csr: expected a CERTIFICATE REQUEST PEM block, got {}",
                        p.tag()
                    ),
                );
            }
            Err(e) => return error(StatusCode::BAD_REQUEST, format!("csr: not PEM: {e}")),
        };
        match self.ca.sign_csr(&csr, &identity) {
            Ok(issued) => {
                tracing::info!(node = %caller.node, %identity, "certificate issued");
                json(
                    StatusCode::OK,
                    &SignResponseBody {
                        chain: storage::certs_to_pem(&issued.chain),
                        trust_bundle: BundleBody::from(&issued.trust_bundle),
                    },
                )
            }
            Err(e) => {
                tracing::warn!(node = %caller.node, %identity, error = %e, "CA request refused: CSR");
                let status = match e {
                    CaError::InvalidCsr { .. }
                    | CaError::IdentityMismatch { .. }
                    | CaError::ForeignTrustDomain { .. } => StatusCode::BAD_REQUEST,
                    _ => StatusCode::INTERNAL_SERVER_ERROR,
                };
                error(status, e.to_string())
            }
        }
    }
}

/// A running CA service. Dropping it stops it.
#[derive(Debug)]
pub struct CaServer {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl CaServer {
    pub async fn bind(
        addr: SocketAddr,
        tls: Arc<ServerConfig>,
        service: CaService,
    ) -> Result<Self, ServiceError> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| ServiceError::Bind { addr, source })?;
        let local = listener
            .local_addr()
            .map_err(|source| ServiceError::Bind { addr, source })?;
        let (stop, mut stopped) = oneshot::channel();
        let service = Arc::new(service);
        let acceptor = tokio_rustls::TlsAcceptor::from(tls);
        let task = tokio::spawn(async move {
            let mut conns = JoinSet::new();
            let per_peer = PeerCounts::default();
            loop {
                let (tcp, peer) = tokio::select! {
                    _ = &mut stopped => break,
                    r = listener.accept() => match r {
                        Ok(c) => c,
                        Err(e) => {
                            tracing::warn!(error = %e, "CA service accept failed");
                            continue;
                        }
                    },
                    // Reap finished connections.
                    Some(_) = conns.join_next(), if !conns.is_empty() => continue,
                };
                // Bounded: beyond MAX_CONNECTIONS a new connection is closed
                // at once (agents retry with backoff), so no client can make
                // the CA hold unbounded sockets and TokenReviews.
                if conns.len() >= MAX_CONNECTIONS {
                    tracing::warn!(%peer, "CA service at {MAX_CONNECTIONS} connections; closing a new one");
                    drop(tcp);
                    continue;
                }
                let Some(slot) = PeerSlot::take(&per_peer, peer.ip().to_canonical()) else {
                    tracing::debug!(%peer, "CA service: {MAX_CONNECTIONS_PER_PEER} connections from this address; closing a new one");
                    drop(tcp);
                    continue;
                };
                let acceptor = acceptor.clone();
                let service = service.clone();
                conns.spawn(async move {
                    let _slot = slot;
                    let tls = match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
                        Ok(Ok(t)) => t,
                        Ok(Err(e)) => {
                            tracing::debug!(%peer, error = %e, "CA service TLS handshake failed");
                            return;
                        }
                        Err(_) => return,
                    };
                    let svc = service_fn(move |req| {
                        let service = service.clone();
                        async move { Ok::<_, Infallible>(service.handle(req).await) }
                    });
                    let conn = hyper::server::conn::http1::Builder::new()
                        .timer(TokioTimer::new())
                        .header_read_timeout(Duration::from_secs(10))
                        .serve_connection(TokioIo::new(tls), svc);
                    if let Err(e) = conn.await {
                        tracing::debug!(%peer, error = %e, "CA service connection ended with an error");
                    }
                });
            }
            // Dropping `conns` aborts the connections still open.
        });
        Ok(Self {
            addr: local,
            stop: Some(stop),
            task,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting, closes open connections and waits for the task.
    pub async fn shutdown(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        let _ = (&mut self.task).await;
    }
}

impl Drop for CaServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}
