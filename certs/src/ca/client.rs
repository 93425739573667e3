//! The node agent's side of the CA service: a [`CertificateAuthority`] that
//! sends CSRs over HTTPS. It trusts the CA service's certificate through the
//! trust bundle, which it updates from every answer (so a root rotation
//! reaches it too).

use std::{sync::Arc, time::Duration};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{Method, Request, StatusCode, header};
use http_body_util::Full;

use super::{
    auth::Credential,
    authority::{BoxFuture, CaError, CertificateAuthority, Issued, SignRequest},
    service::{BUNDLE_PATH, BundleBody, ErrorBody, SIGN_PATH, SignRequestBody, SignResponseBody},
};
use crate::{
    bundle::TrustBundle,
    https::{self, Endpoint, HttpsError},
    storage,
};

#[derive(Debug, Clone)]
pub struct CaClientConfig {
    /// `https://host:port` of the CA service.
    pub endpoint: String,
    /// The roots to trust at start (the cluster's trust bundle).
    pub bundle: TrustBundle,
    pub credential: Credential,
    /// Per request, connection included.
    pub timeout: Duration,
    /// Where the cluster's trust bundle is mounted (a ConfigMap the CA
    /// keeps current): read again when the CA service cannot be reached
    /// with the roots held, so a node that missed a root rotation's prepare
    /// step (it could not reach the CA then) trusts the CA's new serving
    /// certificate once the kubelet has updated the file.
    pub bundle_file: Option<std::path::PathBuf>,
}

#[derive(Debug)]
pub struct CaClient {
    endpoint: Endpoint,
    bundle: ArcSwap<TrustBundle>,
    credential: Credential,
    timeout: Duration,
    bundle_file: Option<std::path::PathBuf>,
}

impl CaClient {
    pub fn new(cfg: CaClientConfig) -> Result<Self, CaError> {
        let endpoint = Endpoint::parse(&cfg.endpoint).map_err(|e| CaError::Config {
            reason: e.to_string(),
        })?;
        Ok(Self {
            endpoint,
            bundle: ArcSwap::from_pointee(cfg.bundle),
            credential: cfg.credential,
            timeout: cfg.timeout,
            bundle_file: cfg.bundle_file,
        })
    }

    /// After a TLS handshake with the CA failed: the roots of `bundle_file`
    /// the client does not hold yet, added to those it holds, when the file
    /// is of the same trust domain and still holds one of them (the mounted
    /// bundle the CA publishes keeps the old root through a rotation; a file
    /// that does not is no continuation of what this node trusts). Whether
    /// any root was added.
    fn add_roots_from_bundle_file(&self) -> bool {
        let Some(path) = &self.bundle_file else {
            return false;
        };
        let ours = self.bundle.load_full();
        let Ok(pem) = std::fs::read_to_string(path) else {
            return false;
        };
        let Ok(file) = TrustBundle::from_pem(ours.trust_domain(), &pem) else {
            return false;
        };
        let known = ours.fingerprints();
        let (held, new): (Vec<_>, Vec<_>) = file
            .roots()
            .zip(file.fingerprints())
            .partition(|(_, f)| known.contains(f));
        if held.is_empty() || new.is_empty() {
            return false;
        }
        let mut roots: Vec<_> = ours.roots().cloned().collect();
        roots.extend(new.into_iter().map(|(der, _)| der.clone()));
        let Ok(merged) = TrustBundle::from_pem(ours.trust_domain(), &storage::certs_to_pem(&roots))
        else {
            return false;
        };
        tracing::warn!(
            file = %path.display(),
            "the CA service could not be verified with the roots held; adding the new roots of \
             the mounted trust bundle (a root rotation this node missed)"
        );
        self.bundle.store(Arc::new(merged));
        true
    }

    fn unavailable(&self, reason: impl ToString) -> CaError {
        CaError::Unavailable {
            endpoint: self.endpoint.url.clone(),
            reason: reason.to_string(),
        }
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<Bytes, CaError> {
        let token = self.credential.read().map_err(|e| CaError::Config {
            reason: format!("reading the CA credential: {e}"),
        })?;
        let body = Bytes::from(body.unwrap_or_default());
        let request = || {
            let mut req = Request::builder()
                .method(method.clone())
                .uri(self.endpoint.path(path))
                .header(header::AUTHORIZATION, format!("Bearer {token}"));
            if !body.is_empty() {
                req = req.header(header::CONTENT_TYPE, "application/json");
            }
            req.body(Full::new(body.clone()))
                .map_err(|e| CaError::Config {
                    reason: format!("building the request (is the token valid header text?): {e}"),
                })
        };
        let send = |req| async {
            let bundle = self.bundle.load_full();
            // Only roots valid now vouch for the CA service, as for peers.
            let tls = https::client_config(bundle.roots_valid_at(std::time::SystemTime::now()))
                .map_err(|reason| CaError::Config { reason })?;
            Ok::<_, CaError>(https::send(tls, &self.endpoint, req, self.timeout).await)
        };
        let tls_failed = |e: &HttpsError| matches!(e, HttpsError::Failed { stage, .. } if *stage == "TLS handshake");
        let (status, body) = match send(request()?).await? {
            Err(e) if tls_failed(&e) && self.add_roots_from_bundle_file() => {
                send(request()?).await?.map_err(|e| self.unavailable(e))?
            }
            r => r.map_err(|e| self.unavailable(e))?,
        };
        if status == StatusCode::OK {
            return Ok(body);
        }
        let message = serde_json::from_slice::<ErrorBody>(&body)
            .map(|e| e.error)
            .unwrap_or_else(|_| String::from_utf8_lossy(&body).into_owned());
        Err(match status {
            StatusCode::UNAUTHORIZED => CaError::Unauthenticated { reason: message },
            StatusCode::FORBIDDEN => CaError::Forbidden {
                identity: path.into(),
                reason: message,
            },
            StatusCode::SERVICE_UNAVAILABLE => self.unavailable(message),
            s => CaError::Rejected {
                endpoint: self.endpoint.url.clone(),
                status: s.as_u16(),
                message,
            },
        })
    }

    fn bundle_from(&self, b: BundleBody) -> Result<TrustBundle, CaError> {
        let bundle = TrustBundle::from_pem(&b.trust_domain, &b.roots)?;
        let ours = self.bundle.load();
        if bundle.trust_domain() != ours.trust_domain() {
            return Err(CaError::Config {
                reason: format!(
                    "the CA service is for trust domain {:?}, this node for {:?}",
                    bundle.trust_domain(),
                    ours.trust_domain()
                ),
            });
        }
        self.bundle.store(Arc::new(bundle.clone()));
        Ok(bundle)
    }
}

impl CertificateAuthority for CaClient {
    fn sign(&self, request: SignRequest) -> BoxFuture<'_, Result<Issued, CaError>> {
        Box::pin(async move {
            let body = SignRequestBody {
                identity: request.identity.to_string(),
                csr: pem::encode(&pem::Pem::new("CERTIFICATE REQUEST", request.csr_der)),
            };
            let raw = self
                .call(
                    Method::POST,
                    SIGN_PATH,
                    Some(serde_json::to_vec(&body).expect("serialisable")),
                )
                .await
                .map_err(|e| match e {
                    CaError::Forbidden { reason, .. } => CaError::Forbidden {
                        identity: request.identity.to_string(),
                        reason,
                    },
                    other => other,
                })?;
            let resp: SignResponseBody = serde_json::from_slice(&raw).map_err(|e| {
                self.unavailable(format!(
                    "the CA answered something that is not a sign response: {e}"
                ))
            })?;
            let chain = storage::certs_from_pem("issued chain", &resp.chain)?;
            let trust_bundle = self.bundle_from(resp.trust_bundle)?;
            Ok(Issued {
                chain,
                trust_bundle,
            })
        })
    }

    fn trust_bundle(&self) -> BoxFuture<'_, Result<TrustBundle, CaError>> {
        Box::pin(async move {
            let raw = self.call(Method::GET, BUNDLE_PATH, None).await?;
            let body: BundleBody = serde_json::from_slice(&raw).map_err(|e| {
                self.unavailable(format!(
                    "the CA answered something that is not a bundle: {e}"
                ))
            })?;
            self.bundle_from(body)
        })
    }
}
