//! Authenticates node agents in a Kubernetes cluster: the agent sends its
//! (bound, projected) service-account token; the CA asks the API server's
//! TokenReview API whether it is valid, and learns the agent's node from the
//! `authentication.kubernetes.io/node-name` extra that Kubernetes 1.30+ adds
//! for tokens bound to a pod. Plain hyper and JSON keep the crate light.
//!
//! The CA's own service account needs RBAC to create `tokenreviews`
//! (the built-in `system:auth-delegator` ClusterRole).

use std::{
    collections::HashMap,
    path::Path,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{Method, Request, StatusCode, header};
use http_body_util::Full;
use ring::digest;
use rustls::ClientConfig;
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;

use super::{
    auth::{AuthError, Authenticator, Caller, Credential},
    authority::BoxFuture,
    jwks,
};
use crate::{
    https::{self, Endpoint},
    storage,
};

pub const TOKENREVIEW_PATH: &str = "/apis/authentication.k8s.io/v1/tokenreviews";
pub const NODE_NAME_EXTRA: &str = "authentication.kubernetes.io/node-name";
/// The audience of the tokens agents present to the CA: a token the kubelet
/// projected for the CA alone, never the pod's API-server token.
pub const CA_TOKEN_AUDIENCE: &str = "sluice-ca";
const SA_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

#[derive(Debug, Clone)]
pub struct TokenReviewConfig {
    /// `https://host:port` of the API server.
    pub api_server: String,
    /// PEM roots that sign the API server's certificate.
    pub ca_pem: String,
    /// The CA's own credential for the API server.
    pub credential: Credential,
    /// Audiences the reviewed token must be valid for (empty: the API
    /// server's default).
    pub audiences: Vec<String>,
    /// Usernames allowed to obtain certificates, e.g.
    /// `system:serviceaccount:sluice-system:sluice-agent`.
    pub allowed_users: Vec<String>,
    pub timeout: Duration,
    /// How long an answer is reused for the same token: accepted tokens for
    /// this long, refused ones for a tenth of it (at least a second). Zero
    /// asks the API server every time.
    pub cache_ttl: Duration,
    /// TokenReviews in flight at most; further callers wait (up to
    /// `timeout`, then get "unavailable", which agents retry), so a flood
    /// of requests to the CA cannot become a flood to the API server.
    pub max_in_flight: usize,
}

impl TokenReviewConfig {
    /// The in-cluster configuration (service host from the environment,
    /// CA certificate and token from the pod's service-account mount).
    pub fn in_cluster(allowed_users: Vec<String>, audiences: Vec<String>) -> Result<Self, String> {
        let host = std::env::var("KUBERNETES_SERVICE_HOST")
            .map_err(|_| "KUBERNETES_SERVICE_HOST is not set: not running in a pod?".to_string())?;
        let port = std::env::var("KUBERNETES_SERVICE_PORT").unwrap_or_else(|_| "443".into());
        let host = if host.contains(':') {
            format!("[{host}]")
        } else {
            host
        };
        let dir = Path::new(SA_DIR);
        Ok(Self {
            api_server: format!("https://{host}:{port}"),
            ca_pem: storage::read(&dir.join("ca.crt")).map_err(|e| e.to_string())?,
            credential: Credential::File(dir.join("token")),
            audiences,
            allowed_users,
            timeout: Duration::from_secs(10),
            cache_ttl: DEFAULT_CACHE_TTL,
            max_in_flight: DEFAULT_MAX_IN_FLIGHT,
        })
    }
}

/// Like the API server's own token cache: a revoked token (its pod deleted)
/// still passes for at most this long, and the node check that follows is
/// never cached.
pub const DEFAULT_CACHE_TTL: Duration = Duration::from_secs(30);
pub const DEFAULT_MAX_IN_FLIGHT: usize = 16;
/// Accepted answers kept at most; past that, new ones are not cached.
const CACHE_MAX_ACCEPTED: usize = 4096;
/// Refusals kept at most, apart from accepted answers so that a flood of bad
/// tokens cannot push good ones out; past that, the refusals are forgotten.
const CACHE_MAX_REFUSED: usize = 1024;
/// Expired entries are swept at most this often (not on every insert into a
/// full cache).
const SWEEP_EVERY: Duration = Duration::from_secs(1);
/// Callers wait at most this long for a review slot, well within an agent's
/// own request timeout, then hear "unavailable" (which they retry).
const QUEUE_WAIT: Duration = Duration::from_secs(3);

/// Answers by SHA-256 of the token (tokens themselves are not kept).
#[derive(Debug, Default)]
struct ReviewCache {
    accepted: HashMap<[u8; 32], (Instant, Caller)>,
    refused: HashMap<[u8; 32], (Instant, String)>,
    next_sweep: Option<Instant>,
}

/// What a token says about itself, unverified: a service-account token is a
/// JWT whose payload names its audiences and expiry. Used only to refuse
/// tokens early (before a TokenReview) and to cache no longer than `exp`;
/// accepting always takes the API server's word.
#[derive(Debug, Default, PartialEq)]
struct Claims {
    audiences: Vec<String>,
    expires: Option<i64>,
}

fn claims(token: &str) -> Option<Claims> {
    use base64::Engine as _;
    let mut parts = token.split('.');
    let (_header, payload, _signature) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || payload.len() > 16 * 1024 {
        return None;
    }
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let v: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    let audiences = match &v["aud"] {
        serde_json::Value::String(a) => vec![a.clone()],
        serde_json::Value::Array(a) => a
            .iter()
            .filter_map(|x| x.as_str().map(String::from))
            .collect(),
        _ => Vec::new(),
    };
    Some(Claims {
        audiences,
        expires: v["exp"].as_i64(),
    })
}

#[derive(Debug)]
pub struct TokenReviewAuthenticator {
    endpoint: Endpoint,
    tls: Arc<ClientConfig>,
    credential: Credential,
    audiences: Vec<String>,
    allowed_users: Vec<String>,
    timeout: Duration,
    cache_ttl: Duration,
    cache: Mutex<ReviewCache>,
    in_flight: Semaphore,
    /// The API server's signing keys, checked under this short lock;
    /// `fetching` makes one fetch at a time without holding it, so tokens
    /// naming a known key never wait for a fetch.
    keys: Mutex<jwks::KeyCache>,
    fetching: tokio::sync::Mutex<()>,
}

/// Puts a key fetch's start back when the fetch is given up half way.
struct FetchUndo<'a> {
    cache: &'a Mutex<jwks::KeyCache>,
    armed: bool,
}

impl Drop for FetchUndo<'_> {
    fn drop(&mut self) {
        if self.armed {
            let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
            // Asked again at once by the next caller that needs the keys.
            cache.fetched = None;
        }
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Review<'a> {
    api_version: &'static str,
    kind: &'static str,
    spec: ReviewSpec<'a>,
}

#[derive(Serialize)]
struct ReviewSpec<'a> {
    token: &'a str,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    audiences: &'a [String],
}

#[derive(Deserialize)]
struct ReviewResponse {
    #[serde(default)]
    status: ReviewStatus,
}

#[derive(Deserialize, Default)]
struct ReviewStatus {
    #[serde(default)]
    authenticated: bool,
    #[serde(default)]
    user: ReviewUser,
    #[serde(default)]
    error: String,
    /// The requested audiences the token is valid for; empty when the
    /// authenticator does not know about audiences.
    #[serde(default)]
    audiences: Vec<String>,
}

#[derive(Deserialize, Default)]
struct ReviewUser {
    #[serde(default)]
    username: String,
    #[serde(default)]
    extra: HashMap<String, Vec<String>>,
}

impl TokenReviewAuthenticator {
    pub fn new(cfg: TokenReviewConfig) -> Result<Self, String> {
        let endpoint = Endpoint::parse(&cfg.api_server).map_err(|e| e.to_string())?;
        let roots =
            storage::certs_from_pem("API server CA", &cfg.ca_pem).map_err(|e| e.to_string())?;
        let tls = https::client_config(&roots)?;
        if cfg.allowed_users.is_empty() {
            return Err(
                "TokenReview authenticator: no allowed users; name the agent's service account"
                    .into(),
            );
        }
        Ok(Self {
            endpoint,
            tls,
            credential: cfg.credential,
            audiences: cfg.audiences,
            allowed_users: cfg.allowed_users,
            timeout: cfg.timeout,
            cache_ttl: cfg.cache_ttl,
            cache: Mutex::default(),
            in_flight: Semaphore::new(cfg.max_in_flight.max(1)),
            keys: Mutex::default(),
            fetching: tokio::sync::Mutex::default(),
        })
    }

    /// A cached answer for `key`, if still fresh.
    fn cached(&self, key: &[u8; 32]) -> Option<Result<Caller, AuthError>> {
        let cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        if let Some((until, caller)) = cache.accepted.get(key)
            && now < *until
        {
            return Some(Ok(caller.clone()));
        }
        let (until, reason) = cache.refused.get(key)?;
        (now < *until).then(|| {
            Err(AuthError::Unauthenticated {
                reason: reason.clone(),
            })
        })
    }

    /// Keeps an accepted or refused answer (never "unavailable"), at most
    /// until the token expires.
    fn remember(
        &self,
        key: [u8; 32],
        answer: &Result<Caller, AuthError>,
        expires_in: Option<Duration>,
    ) {
        if self.cache_ttl.is_zero() {
            return;
        }
        let cap = |ttl: Duration| expires_in.map_or(ttl, |e| ttl.min(e));
        let now = Instant::now();
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        let full =
            cache.accepted.len() >= CACHE_MAX_ACCEPTED || cache.refused.len() >= CACHE_MAX_REFUSED;
        if full && cache.next_sweep.is_none_or(|t| now >= t) {
            cache.accepted.retain(|_, (until, _)| *until > now);
            cache.refused.retain(|_, (until, _)| *until > now);
            cache.next_sweep = Some(now + SWEEP_EVERY);
        }
        match answer {
            Ok(c) => {
                if cache.accepted.len() < CACHE_MAX_ACCEPTED {
                    cache
                        .accepted
                        .insert(key, (now + cap(self.cache_ttl), c.clone()));
                }
            }
            Err(AuthError::Unauthenticated { reason }) => {
                if cache.refused.len() >= CACHE_MAX_REFUSED {
                    cache.refused.clear();
                }
                let ttl = (self.cache_ttl / 10).max(Duration::from_secs(1));
                cache.refused.insert(key, (now + cap(ttl), reason.clone()));
            }
            Err(_) => {}
        }
    }

    /// Whether `audiences` (a token's, or those a review vouched for) name
    /// one the CA asks for; any do when it asks for none.
    fn for_our_audience(&self, audiences: &[String]) -> bool {
        self.audiences.is_empty() || audiences.iter().any(|a| self.audiences.contains(a))
    }

    /// The refusal of a token (`what`) for another audience, with the fix.
    fn wrong_audience(&self, what: &str) -> AuthError {
        AuthError::Unauthenticated {
            reason: format!(
                "{what} is not issued for the audience {:?}; the agent must present a projected \
                 service-account token with that audience (the chart mounts one at \
                 /var/run/secrets/sluice/ca-token)",
                self.audiences.join(", ")
            ),
        }
    }

    /// Refuses, without asking the API server, a token that is not a JWT,
    /// names none of the wanted audiences, or has expired; else how long it
    /// is still valid, if it says.
    fn precheck(&self, token: &str) -> Result<Option<Duration>, AuthError> {
        let refuse = |reason: String| Err(AuthError::Unauthenticated { reason });
        let Some(c) = claims(token) else {
            return refuse(
                "not a service-account token (a JWT); the agent must present its projected token"
                    .into(),
            );
        };
        if !self.for_our_audience(&c.audiences) {
            return Err(self.wrong_audience(&format!("the token (it names {:?})", c.audiences)));
        }
        let Some(exp) = c.expires else {
            return Ok(None);
        };
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        if exp <= now {
            return refuse(format!(
                "the token expired {} s ago",
                now.saturating_sub(exp)
            ));
        }
        Ok(Some(Duration::from_secs((exp - now) as u64)))
    }

    async fn authenticate_token(&self, token: &str) -> Result<Caller, AuthError> {
        let key: [u8; 32] = digest::digest(&digest::SHA256, token.as_bytes())
            .as_ref()
            .try_into()
            .expect("SHA-256 is 32 bytes");
        if let Some(answer) = self.cached(&key) {
            return answer;
        }
        // Junk, expired, foreign and forged tokens never take a review slot.
        let expires_in = self.precheck(token)?;
        match self.signature(token).await {
            jwks::Check::Forged(reason) => {
                let answer = Err(AuthError::Unauthenticated { reason });
                self.remember(key, &answer, expires_in);
                return answer;
            }
            jwks::Check::NotYet(reason) => return Err(AuthError::Unavailable { reason }),
            jwks::Check::Signed | jwks::Check::Unknown => {}
        }
        let wait = QUEUE_WAIT.min(self.timeout);
        let _permit = match tokio::time::timeout(wait, self.in_flight.acquire()).await {
            Ok(Ok(p)) => p,
            _ => {
                return Err(AuthError::Unavailable {
                    reason: "too many token reviews in flight; retry".into(),
                });
            }
        };
        // Another caller with the same token may have been answered while
        // this one waited.
        if let Some(answer) = self.cached(&key) {
            return answer;
        }
        let answer = self.review(token).await;
        self.remember(key, &answer, expires_in);
        answer
    }

    /// Checks the token's signature against the API server's keys, fetching
    /// them when none are known or the token names one not seen yet (at most
    /// every [`jwks::REFRESH_EVERY`]; between fetches such a token is told
    /// to retry). One fetch at a time; checks against known keys go on
    /// meanwhile, the others wait for the first fetch.
    async fn signature(&self, token: &str) -> jwks::Check {
        let arrived = Instant::now();
        let kid = jwks::kid_of(token);
        let wants = |cache: &jwks::KeyCache| {
            let known = cache
                .keys
                .as_ref()
                .is_some_and(|k| kid.as_ref().is_some_and(|kid| k.contains_key(kid)));
            cache.wants_fetch(known, Instant::now())
        };
        // No keys yet and no failure: the first fetch is still to come or
        // under way, and its answer is waited for (without it, made-up
        // tokens would take review slots meanwhile).
        let first = |cache: &jwks::KeyCache| cache.keys.is_none() && !cache.last_failed;
        let wait = {
            let cache = self.key_cache();
            wants(&cache) || first(&cache)
        };
        if wait {
            let _one_fetch = self.fetching.lock().await;
            // A fetch that finished while this one waited may have answered.
            let go = {
                let mut cache = self.key_cache();
                let go = wants(&cache);
                if go {
                    cache.fetched = Some(Instant::now());
                }
                go
            };
            if go {
                // A caller that goes away mid-fetch leaves the cache as if
                // the fetch had not begun: the next caller fetches.
                let mut undo = FetchUndo {
                    cache: &self.keys,
                    armed: true,
                };
                let started = Instant::now();
                let fetched = self.fetch_keys().await;
                undo.armed = false;
                let mut cache = self.key_cache();
                match fetched {
                    Ok(keys) => {
                        cache.keys = Some(Arc::new(keys));
                        cache.keys_from = Some(started);
                        cache.last_failed = false;
                    }
                    Err(e) => {
                        cache.last_failed = true;
                        if cache.keys.is_some() {
                            // Keep checking with the keys known: a failed
                            // refresh is no reason to let forgeries through.
                            tracing::warn!(
                                error = %e,
                                "cannot read the API server's token signing keys again ({}); \
                                 tokens under a key not read yet go to a TokenReview (asking \
                                 again in {:?} at the earliest)",
                                jwks::JWKS_PATH,
                                jwks::REFRESH_EVERY
                            );
                        } else {
                            tracing::warn!(
                                error = %e,
                                "cannot read the API server's token signing keys ({}); every \
                                 token goes to a TokenReview (asking again in {:?})",
                                jwks::JWKS_PATH,
                                jwks::RETRY_UNAVAILABLE
                            );
                        }
                    }
                }
            }
        }
        let cache = self.key_cache();
        let (Some(keys), Some(from)) = (cache.keys.clone(), cache.keys_from) else {
            return jwks::Check::Unknown;
        };
        let retry_in = cache.fetched.map_or(Duration::ZERO, |at| {
            jwks::REFRESH_EVERY.saturating_sub(at.elapsed())
        });
        let last_failed = cache.last_failed;
        drop(cache);
        jwks::check_at(
            token,
            &keys,
            jwks::Read {
                from,
                last_failed,
                retry_in,
            },
            arrived,
        )
    }

    fn key_cache(&self) -> std::sync::MutexGuard<'_, jwks::KeyCache> {
        self.keys.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn fetch_keys(&self) -> Result<HashMap<String, jwks::VerifyKey>, String> {
        let own = self
            .credential
            .read()
            .map_err(|e| format!("reading the CA's own API token: {e}"))?;
        let req = Request::builder()
            .method(Method::GET)
            .uri(self.endpoint.path(jwks::JWKS_PATH))
            .header(header::AUTHORIZATION, format!("Bearer {own}"))
            .header(header::ACCEPT, "application/json, application/jwk-set+json")
            .body(Full::new(Bytes::new()))
            .map_err(|e| format!("building the request: {e}"))?;
        let (status, body) = https::send(self.tls.clone(), &self.endpoint, req, self.timeout)
            .await
            .map_err(|e| e.to_string())?;
        if status != StatusCode::OK {
            return Err(format!("the API server answered {status}"));
        }
        jwks::parse(&body)
    }

    async fn review(&self, token: &str) -> Result<Caller, AuthError> {
        let unavailable = |reason: String| AuthError::Unavailable { reason };
        let own = self
            .credential
            .read()
            .map_err(|e| unavailable(format!("reading the CA's own API token: {e}")))?;
        let body = serde_json::to_vec(&Review {
            api_version: "authentication.k8s.io/v1",
            kind: "TokenReview",
            spec: ReviewSpec {
                token,
                audiences: &self.audiences,
            },
        })
        .expect("serialisable");
        let req = Request::builder()
            .method(Method::POST)
            .uri(self.endpoint.path(TOKENREVIEW_PATH))
            .header(header::AUTHORIZATION, format!("Bearer {own}"))
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::ACCEPT, "application/json")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| unavailable(format!("building the TokenReview request: {e}")))?;
        let (status, body) = https::send(self.tls.clone(), &self.endpoint, req, self.timeout)
            .await
            .map_err(|e| unavailable(format!("TokenReview: {e}")))?;
        match status {
            StatusCode::OK | StatusCode::CREATED => {}
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
                return Err(unavailable(format!(
                    "the API server refused the CA's TokenReview ({status}); the CA's service account \
                     needs the system:auth-delegator ClusterRole"
                )));
            }
            s => {
                return Err(unavailable(format!(
                    "TokenReview answered {s}: {}",
                    String::from_utf8_lossy(&body)
                        .chars()
                        .take(200)
                        .collect::<String>()
                )));
            }
        }
        let review: ReviewResponse = serde_json::from_slice(&body)
            .map_err(|e| unavailable(format!("TokenReview answer is not a TokenReview: {e}")))?;
        let st = review.status;
        if !st.authenticated {
            let why = if st.error.is_empty() {
                "token rejected".to_string()
            } else {
                st.error
            };
            return Err(AuthError::Unauthenticated { reason: why });
        }
        // A token for another audience (the API server's own, say) must not
        // open the CA: a service that received it could replay it here. An
        // answer without audiences comes from an authenticator that ignored
        // them, and proves nothing either (the TokenReview API docs say to
        // check this).
        if !self.for_our_audience(&st.audiences) {
            return Err(self.wrong_audience(&format!("the token of {}", st.user.username)));
        }
        if !self.allowed_users.iter().any(|u| u == &st.user.username) {
            return Err(AuthError::Unauthenticated {
                reason: format!(
                    "{} is not a Sluice node agent (allowed: {:?})",
                    st.user.username, self.allowed_users
                ),
            });
        }
        let node = st
            .user
            .extra
            .get(NODE_NAME_EXTRA)
            .and_then(|v| v.first())
            .filter(|n| !n.is_empty())
            .ok_or_else(|| AuthError::Unauthenticated {
                reason: format!(
                    "the token of {} is not bound to a pod on a node (no {NODE_NAME_EXTRA}); use the \
                     projected service-account token of the agent pod (Kubernetes 1.30+)",
                    st.user.username
                ),
            })?;
        Ok(Caller {
            node: node.clone(),
            subject: st.user.username,
        })
    }
}

impl Authenticator for TokenReviewAuthenticator {
    fn authenticate<'a>(&'a self, token: &'a str) -> BoxFuture<'a, Result<Caller, AuthError>> {
        Box::pin(self.authenticate_token(token))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine as _;

    fn jwt(payload: serde_json::Value) -> String {
        let b = |v: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v);
        format!(
            "{}.{}.{}",
            b(br#"{"alg":"RS256"}"#),
            b(payload.to_string().as_bytes()),
            b(b"sig")
        )
    }

    #[test]
    fn claims_of_a_service_account_token() {
        let c = claims(&jwt(
            serde_json::json!({"aud": ["sluice-ca", "x"], "exp": 1_900_000_000}),
        ));
        assert_eq!(
            c,
            Some(Claims {
                audiences: vec!["sluice-ca".into(), "x".into()],
                expires: Some(1_900_000_000)
            })
        );
        let c = claims(&jwt(serde_json::json!({"aud": "sluice-ca"}))).unwrap();
        assert_eq!(c.audiences, ["sluice-ca"]);
        for junk in ["", "abc", "a.b", "a.b.c.d", "a.!!!.c", "a.bm90IGpzb24.c"] {
            assert_eq!(claims(junk), None, "{junk:?}");
        }
    }
}
