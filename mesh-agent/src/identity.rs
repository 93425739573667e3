//! Workload identities on this node: the identity manager (from `certs`)
//! holds a certificate for every enrolled local pod's SPIFFE ID, obtained from
//! the CA: in-process in standalone mode (root in the state directory), or
//! the cluster's CA service (`mesh-agent ca`).

use std::{collections::BTreeSet, path::Path, sync::Arc, time::Duration};

use certs::{
    Ca, CaOptions, IdentityManager, IdentityOptions, SharedClock, SpiffeId, SystemClock,
    TrustBundle,
    ca::{
        auth::Credential,
        client::{CaClient, CaClientConfig},
    },
};
use tokio::sync::watch;

use crate::admin::{IdentityHandle, api::CertSummary};

/// Why identities could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the in-process CA (root in {dir}): {source}")]
    InProcess {
        dir: std::path::PathBuf,
        #[source]
        source: certs::CaError,
    },
    #[error(
        "reading the trust bundle {path} for the CA at {url}: {reason}; the CA publishes it (ConfigMap sluice-trust-bundle in a cluster)"
    )]
    Bundle {
        url: String,
        path: std::path::PathBuf,
        reason: String,
    },
    #[error("the CA client for {url}: {source}")]
    Client {
        url: String,
        #[source]
        source: certs::CaError,
    },
}

/// The node's identities and where they come from.
#[derive(Clone)]
pub struct Identities {
    pub manager: IdentityManager,
    /// `in-process` or `remote <url>`.
    pub mode: String,
    /// The in-process CA, when there is one.
    pub ca: Option<Arc<Ca>>,
}

fn rfc3339(t: time::OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| t.to_string())
}

impl Identities {
    /// Standalone: a CA in this process, its root kept in `dir` (created with
    /// mode 0700, the key 0600).
    pub fn in_process(dir: &Path, trust_domain: &str) -> Result<Self, Error> {
        let clock: SharedClock = Arc::new(SystemClock);
        let opts = CaOptions {
            trust_domain: trust_domain.into(),
            ..CaOptions::default()
        };
        let ca = Arc::new(
            Ca::open_or_create(dir, opts, clock.clone()).map_err(|source| Error::InProcess {
                dir: dir.into(),
                source,
            })?,
        );
        let manager =
            IdentityManager::new(ca.clone(), ca.bundle(), clock, IdentityOptions::default());
        Ok(Self {
            manager,
            mode: format!("in-process (root in {})", dir.display()),
            ca: Some(ca),
        })
    }

    /// In a cluster: the CA service at `url`, trusted through the bundle in
    /// `bundle_file`, authenticated with the token in `token_file`.
    pub fn remote(
        url: &str,
        bundle_file: &Path,
        token_file: &Path,
        trust_domain: &str,
    ) -> Result<Self, Error> {
        let bundle_err = |reason: String| Error::Bundle {
            url: url.into(),
            path: bundle_file.into(),
            reason,
        };
        let pem = std::fs::read_to_string(bundle_file).map_err(|e| bundle_err(e.to_string()))?;
        let bundle =
            TrustBundle::from_pem(trust_domain, &pem).map_err(|e| bundle_err(e.to_string()))?;
        let client = CaClient::new(CaClientConfig {
            endpoint: url.into(),
            bundle: bundle.clone(),
            credential: Credential::File(token_file.into()),
            timeout: Duration::from_secs(10),
            bundle_file: Some(bundle_file.into()),
        })
        .map_err(|source| Error::Client {
            url: url.into(),
            source,
        })?;
        let manager = IdentityManager::new(
            Arc::new(client),
            bundle,
            Arc::new(SystemClock),
            IdentityOptions::default(),
        );
        Ok(Self {
            manager,
            mode: format!("remote {url}"),
            ca: None,
        })
    }

    /// Keeps the manager's identities equal to what the reconciler publishes
    /// (enrolled local pods), and renews certificates at half-life.
    pub fn spawn(
        &self,
        mut ids: watch::Receiver<BTreeSet<String>>,
    ) -> Vec<tokio::task::JoinHandle<()>> {
        let renewals = self.manager.spawn();
        let manager = self.manager.clone();
        let feed = tokio::spawn(async move {
            loop {
                let wanted: Vec<SpiffeId> = ids
                    .borrow_and_update()
                    .iter()
                    .filter_map(|s| match s.parse::<SpiffeId>() {
                        Ok(id) => Some(id),
                        Err(e) => {
                            tracing::warn!(identity = %s, error = %e, "not a valid SPIFFE ID; no certificate");
                            None
                        }
                    })
                    .collect();
                // Applied here, in the order of the changes, at once (a pod
                // gone must stop being served however slowly the CA
                // answers); the new identities' certificates in a round of
                // their own, not after whatever round the background loop
                // (woken too) is in the middle of, which a CA that does not
                // answer can hold for ten seconds. Rounds at once share the
                // manager's concurrency, and take different identities.
                match manager.want(wanted) {
                    Ok(()) => {
                        let manager = manager.clone();
                        tokio::spawn(async move {
                            let report = manager.rotate_due().await;
                            tracing::debug!(?report, "identities updated");
                        });
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "updating identities; retried on the next change")
                    }
                }
                if ids.changed().await.is_err() {
                    return;
                }
            }
        });
        vec![renewals, feed]
    }
}

impl IdentityHandle for Identities {
    fn roots(&self) -> Vec<CertSummary> {
        let certs = self.manager.status();
        self.manager
            .bundle_status()
            .roots
            .into_iter()
            .map(|r| CertSummary {
                certificates: Some(
                    certs
                        .iter()
                        .filter_map(|s| s.certificate.as_ref())
                        .filter(|c| c.root == Some(r.fingerprint))
                        .count(),
                ),
                subject: if r.active {
                    format!("{} (active)", r.subject)
                } else {
                    r.subject
                },
                not_after: rfc3339(r.not_after),
                fingerprint: Some(r.fingerprint.to_string()),
                not_before: Some(rfc3339(r.not_before)),
                state: Some(
                    match r.state {
                        certs::status::CertState::Valid => "valid",
                        certs::status::CertState::Expiring => "expiring",
                        certs::status::CertState::Expired => "expired",
                        certs::status::CertState::NotYetValid => "not-yet-valid",
                    }
                    .into(),
                ),
            })
            .collect()
    }

    fn cert_expiry(&self, spiffe_id: &str) -> Option<String> {
        let id: SpiffeId = spiffe_id.parse().ok()?;
        self.manager
            .status()
            .into_iter()
            .find(|s| s.identity == id)
            .and_then(|s| s.certificate)
            .map(|c| rfc3339(c.not_after))
    }

    fn certified(&self, spiffe_ids: &BTreeSet<String>) -> usize {
        use certs::status::CertState;
        self.manager
            .status()
            .iter()
            .filter(|s| spiffe_ids.contains(s.identity.as_str()))
            .filter(|s| {
                s.certificate
                    .as_ref()
                    .is_some_and(|c| matches!(c.state, CertState::Valid | CertState::Expiring))
            })
            .count()
    }

    fn cert_problem(&self, spiffe_id: &str) -> Option<crate::admin::CertProblem> {
        use certs::status::CertState;
        let none = |text: String| Some(crate::admin::CertProblem { fatal: true, text });
        // An enrolled pod the manager holds nothing for has no certificate,
        // whatever the reason: never "valid".
        let id: SpiffeId = match spiffe_id.parse() {
            Ok(id) => id,
            Err(e) => {
                return none(format!(
                    "no certificate: {spiffe_id:?} is not a SPIFFE ID ({e}); check the pod's \
                     service account name"
                ));
            }
        };
        let Some(st) = self.manager.status().into_iter().find(|s| s.identity == id) else {
            return none("no certificate yet (not requested yet)".into());
        };
        let why = st
            .last_error
            .as_deref()
            .map(|e| format!(": {e}"))
            .unwrap_or_default();
        let (fatal, text) = match &st.certificate {
            None => (true, format!("no certificate yet{why}")),
            Some(c) => match c.state {
                CertState::Expired => (true, format!("expired at {}{why}", rfc3339(c.not_after))),
                CertState::NotYetValid => (true, "not valid yet (is the clock right?)".into()),
                CertState::Expiring => (
                    false,
                    format!(
                        "expires at {} and is not renewed yet{why}",
                        rfc3339(c.not_after)
                    ),
                ),
                CertState::Valid if st.last_error.is_some() => {
                    (false, format!("renewal failing{why}"))
                }
                CertState::Valid => return None,
            },
        };
        Some(crate::admin::CertProblem { fatal, text })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A CA that never answers for `db`.
    #[derive(Debug)]
    struct HangsForDb(Arc<Ca>);

    impl certs::CertificateAuthority for HangsForDb {
        fn sign(
            &self,
            request: certs::ca::SignRequest,
        ) -> certs::ca::BoxFuture<'_, Result<certs::ca::Issued, certs::CaError>> {
            Box::pin(async move {
                if request.identity.to_string().ends_with("/sa/db") {
                    std::future::pending::<()>().await;
                }
                self.0.sign(request).await
            })
        }
        fn trust_bundle(&self) -> certs::ca::BoxFuture<'_, Result<TrustBundle, certs::CaError>> {
            self.0.trust_bundle()
        }
    }

    /// A pod gone while another's certificate is still being asked for (a
    /// CA slow to answer): its identity stops being served at once, not
    /// once that round is over.
    #[tokio::test]
    async fn an_identity_removed_during_a_slow_round_goes_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Arc::new(
            Ca::open_or_create(dir.path(), CaOptions::default(), Arc::new(SystemClock)).unwrap(),
        );
        let ids = Identities {
            manager: IdentityManager::new(
                Arc::new(HangsForDb(ca.clone())),
                ca.bundle(),
                Arc::new(SystemClock),
                IdentityOptions::default(),
            ),
            mode: "test".into(),
            ca: Some(ca),
        };
        let set = |v: &[&str]| -> BTreeSet<String> { v.iter().map(|s| s.to_string()).collect() };
        let (web, db) = (
            "spiffe://cluster.local/ns/shop/sa/web",
            "spiffe://cluster.local/ns/shop/sa/db",
        );
        let (tx, rx) = watch::channel(set(&[web]));
        let tasks = ids.spawn(rx);
        let web_id: SpiffeId = web.parse().unwrap();
        let held = async |want: bool| {
            for _ in 0..500 {
                if ids.manager.has_certificate(&web_id) == want {
                    return true;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            false
        };
        assert!(held(true).await, "web's certificate");
        // db's round hangs; then web's pod goes.
        tx.send(set(&[web, db])).unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        tx.send(set(&[db])).unwrap();
        assert!(held(false).await, "web still served behind db's round");
        for t in tasks {
            t.abort();
        }
    }

    /// An enrolled pod whose identity the manager holds no certificate for
    /// (not requested yet, or not a SPIFFE ID at all: a service account name
    /// SPIFFE refuses) is shown as having none, a fatal problem: it was
    /// shown with no problem, and `sluice check` said every enrolled pod
    /// held a valid certificate.
    #[tokio::test]
    async fn an_identity_without_a_certificate_is_a_problem_never_valid() {
        let dir = tempfile::tempdir().unwrap();
        let ids = Identities::in_process(dir.path(), "cluster.local").unwrap();
        let held = "spiffe://cluster.local/ns/shop/sa/web";
        ids.manager
            .set_identities([held.parse().unwrap()])
            .await
            .unwrap();
        assert!(ids.cert_problem(held).is_none(), "a valid certificate");
        let wanted: BTreeSet<String> = [held, "spiffe://cluster.local/ns/shop/sa/db"]
            .into_iter()
            .map(String::from)
            .collect();
        assert_eq!(ids.certified(&wanted), 1);
        let p = ids
            .cert_problem("spiffe://cluster.local/ns/shop/sa/db")
            .expect("a problem");
        assert!(
            p.fatal && p.text.contains("no certificate yet"),
            "{}",
            p.text
        );
        let p = ids
            .cert_problem("spiffe://cluster.local/ns/shop/sa/web:v1")
            .expect("a problem");
        assert!(
            p.fatal && p.text.contains("is not a SPIFFE ID"),
            "{}",
            p.text
        );
    }
}
