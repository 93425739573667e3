//! A minimal HTTPS/1.1 client for the two calls this crate makes (a node to
//! the CA service, the CA to the Kubernetes TokenReview API): one request per
//! connection, which suits calls made a few times a day per identity.

use std::{sync::Arc, time::Duration};

use bytes::Bytes;
use http::{Request, StatusCode, Uri};
use http_body_util::{BodyExt as _, Full, Limited};
use hyper_util::rt::TokioIo;
use rustls::{ClientConfig, RootCertStore, client::WebPkiServerVerifier};
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;

/// Largest response body accepted.
const MAX_BODY: usize = 1 << 20;

#[derive(Debug, Clone, thiserror::Error)]
pub enum HttpsError {
    #[error("{url:?} is not a usable https:// URL: {reason}")]
    BadUrl { url: String, reason: String },
    #[error("{endpoint}: {stage}: {reason}")]
    Failed {
        endpoint: String,
        stage: &'static str,
        reason: String,
    },
    #[error("{endpoint}: no answer within {timeout:?}")]
    Timeout { endpoint: String, timeout: Duration },
}

/// Where to connect: `https://host[:port][/base]`.
#[derive(Debug, Clone)]
pub(crate) struct Endpoint {
    pub url: String,
    host: String,
    port: u16,
    base: String,
    server_name: ServerName<'static>,
}

impl Endpoint {
    pub fn parse(url: &str) -> Result<Self, HttpsError> {
        let bad = |reason: &str| HttpsError::BadUrl {
            url: url.into(),
            reason: reason.into(),
        };
        let uri: Uri = url
            .parse()
            .map_err(|e: http::uri::InvalidUri| bad(&e.to_string()))?;
        if uri.scheme_str() != Some("https") {
            return Err(bad("the scheme must be https"));
        }
        let host = uri.host().ok_or_else(|| bad("no host"))?;
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let server_name = ServerName::try_from(host.clone())
            .map_err(|_| bad("the host is neither a DNS name nor an IP address"))?;
        Ok(Self {
            url: url.trim_end_matches('/').into(),
            port: uri.port_u16().unwrap_or(443),
            base: uri.path().trim_end_matches('/').into(),
            host,
            server_name,
        })
    }

    /// `path` under the endpoint's base path, as a request URI.
    pub fn path(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

/// A TLS client config that trusts `roots` and checks the server name as
/// usual for HTTPS (these servers have DNS or IP names, not SPIFFE IDs).
pub(crate) fn client_config<'a>(
    roots: impl IntoIterator<Item = &'a CertificateDer<'static>>,
) -> Result<Arc<ClientConfig>, String> {
    let mut store = RootCertStore::empty();
    for r in roots {
        store
            .add(r.clone())
            .map_err(|e| format!("trust root: {e}"))?;
    }
    let provider = crate::provider();
    let verifier = WebPkiServerVerifier::builder_with_provider(Arc::new(store), provider.clone())
        .build()
        .map_err(|e| format!("building the verifier: {e}"))?;
    let cfg = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_webpki_verifier(verifier)
        .with_no_client_auth();
    Ok(Arc::new(cfg))
}

/// Sends one request and reads the whole response.
pub(crate) async fn send(
    tls: Arc<ClientConfig>,
    ep: &Endpoint,
    mut req: Request<Full<Bytes>>,
    timeout: Duration,
) -> Result<(StatusCode, Bytes), HttpsError> {
    let fail = |stage: &'static str| {
        let endpoint = ep.url.clone();
        move |e: &dyn std::fmt::Display| HttpsError::Failed {
            endpoint,
            stage,
            reason: e.to_string(),
        }
    };
    req.headers_mut().insert(
        http::header::HOST,
        ep.authority()
            .parse()
            .map_err(|e: http::header::InvalidHeaderValue| fail("host header")(&e))?,
    );
    let work = async {
        let tcp = TcpStream::connect((ep.host.as_str(), ep.port))
            .await
            .map_err(|e| fail("connecting")(&e))?;
        let tls = tokio_rustls::TlsConnector::from(tls)
            .connect(ep.server_name.clone(), tcp)
            .await
            .map_err(|e| fail("TLS handshake")(&e))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| fail("HTTP handshake")(&e))?;
        let conn = tokio::spawn(conn);
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| fail("sending the request")(&e))?;
        let status = resp.status();
        let body = Limited::new(resp.into_body(), MAX_BODY)
            .collect()
            .await
            .map_err(|e| fail("reading the response")(&*e))?
            .to_bytes();
        conn.abort();
        Ok((status, body))
    };
    tokio::time::timeout(timeout, work)
        .await
        .unwrap_or_else(|_| {
            Err(HttpsError::Timeout {
                endpoint: ep.url.clone(),
                timeout,
            })
        })
}
